//! aarch64: every encoding, protocol and register convention ksites needs on this
//! architecture, under the names `x86_64` defines too.
//!
//! * [`branch`]: `bl`/`b` site encodings (imm26, ±128 MiB), the `adrp`/`ldr`/`br x16`
//!   trampoline, linker veneers.
//! * [`probe`]: the disabled and enabled instruction of every probe form, the
//!   single-store live-patch protocol, BRK-frame emulation and the dispatcher entry
//!   stubs.
//! * [`key`]: static-key sites (`nop` ↔ `b`, the single-store protocol).
//! * [`cpu`]: ID_AA64ISAR0/ISAR1/PFR0_EL1 and the feature set resolvers receive;
//!   CPACR_EL1 for the FP/SIMD/SVE state.
//! * [`local`]: CPU-local counters.
//! * [`trap`]: how a kernel's exception handler routes a probe's `brk`.
//!
//! * [`reloc`]: the ELF machine, the relocation types a module may use (each checked
//!   for overflow as aaelf64 says), and the range-extension veneer for `bl`/`b`.
//!
//! # Probe forms
//!
//! How each [`crate::arch::ProbeKind`] is disabled and enabled (4-byte sites, each state
//! one of `b`, `bl`, `nop`, `brk`, which the Arm ARM lets a CPU overwrite while others
//! execute it; see [`probe`] for the protocol and the rule):
//!
//! | kind | disabled | enabled |
//! |---|---|---|
//! | `RustJmp` (`probe!`) | `nop` | `b` → out-of-line block |
//! | `RustEnabled` (`probe_enabled!`) | `nop` | `b` → block setting `true` |
//! | `CCall` (`bl __dtrace_probe_*`) | `nop` | `bl ksites_probe_c_entry` |
//! | `CTail` (`b __dtrace_probe_*`) | `b ksites_probe_ret0` | `brk #0x4b53`: fires, then returns |
//! | `CEnabled` (`bl __dtraceenabled_*`) | `bl ksites_probe_ret0` | `bl ksites_probe_ret1` |
//! | `CEnabledTail` (`b __dtraceenabled_*`) | `b ksites_probe_ret0` | `b ksites_probe_ret1` |
//!
//! The build tool writes the disabled form over the compiler's `bl`/`b` (DTrace's
//! `dtrace -G` does the same with NOPs).

pub mod branch;
pub mod cpu;
pub mod key;
pub mod local;
pub mod probe;
pub mod reloc;
pub mod trap;

pub use branch::*;
pub use cpu::*;

/// Makes the instruction bytes at `addr .. addr + len` (just written, through any
/// mapping) visible to instruction fetch on every CPU of the Inner Shareable domain:
/// `DC CVAU` (clean to the Point of Unification) on each D-cache line, `DSB ISH`,
/// `IC IVAU` on each I-cache line, `DSB ISH`. What remains for a CPU to run the new
/// instruction is a context synchronisation event (`ISB`) on that CPU: locally right
/// after this, remotely the one `TextPoker::sync_cores` round of the batch.
///
/// A kernel's `TextPoker::write` calls this with the site's own (executable) address
/// after its store, as Linux's `aarch64_insn_patch_text_nosync` does.
///
/// # Safety
///
/// `addr .. addr + len` is mapped (readable) at `addr`.
#[cfg(target_arch = "aarch64")]
pub unsafe fn sync_icache(addr: u64, len: usize) {
    let ctr: u64;
    // SAFETY: CTR_EL0 is readable at EL1 (and EL0 unless SCTLR_EL1.UCT traps it, which
    // the loader at EL1 is not subject to); no side effect.
    unsafe {
        core::arch::asm!("mrs {}, CTR_EL0", out(reg) ctr, options(nomem, nostack, preserves_flags))
    };
    // CTR_EL0.DminLine (bits 16..20) and IminLine (bits 0..4): log2 of words.
    let dline = 4u64 << ((ctr >> 16) & 0xf);
    let iline = 4u64 << (ctr & 0xf);
    let end = addr + len as u64;
    let mut a = addr & !(dline - 1);
    while a < end {
        // SAFETY: `a` lies in a line of the mapped range (precondition); cleaning a line
        // to PoU only writes dirty data back.
        unsafe { core::arch::asm!("dc cvau, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += dline;
    }
    // SAFETY: barriers only.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
    let mut a = addr & !(iline - 1);
    while a < end {
        // SAFETY: as above; invalidating I-cache lines only forces a refetch.
        unsafe { core::arch::asm!("ic ivau, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += iline;
    }
    // SAFETY: barriers only.
    unsafe { core::arch::asm!("dsb ish", "isb", options(nostack, preserves_flags)) };
}

/// A context synchronisation event on the running CPU (`ISB`): what a kernel's
/// `TextPoker::sync_cores` runs on every CPU (through an IPI on the others).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier; no memory or register effect.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}
