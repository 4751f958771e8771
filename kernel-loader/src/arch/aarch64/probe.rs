//! aarch64 probe sites: the disabled and enabled instruction of every probe form, the
//! live-patch protocol (one store per site, one synchronisation round per batch), the
//! BRK trap frame and its emulation, and the dispatcher entry stubs (AAPCS64).
//!
//! The generic probe code (`crate::probe`) uses the same names as on x86-64:
//! [`SITE_LEN`], [`SiteBytes`]/[`SiteWord`] ([`word`], [`bytes_of`]),
//! [`site_bytes`]/[`site_word`]/[`site_word_again`], [`Stubs`],
//! [`SINGLE_STORE`]/[`ROUNDS`]/[`round`]/[`RoundPiece`]/[`round_uses_new`]/[`is_residue`],
//! [`Int3Frame`] (here the BRK frame), [`trap_site`]/[`trap_args`]/[`emulate`]/
//! [`call_site`], the entry stubs and the `c_entry!`, `__ksites_probe_site_asm!` and
//! `__ksites_probe_section_asm!` macros.
//!
//! The enabled `probe!` fire path: the site branches to its out-of-line block, which
//! stores the six arguments on its stack and dispatches (inline with the `inline-fire`
//! feature; else by calling `ksites_probe_fire(&record, &args)`, C ABI: the record in
//! the first argument register, the array's address in the second), then branches back
//! after the site. The dispatcher reads the CPU's index with
//! [`read_cpu_word`] ([`CPU_BASE`]: `TPIDR_EL1` (freestanding) or `TPIDR_EL0` (hosted)), one load and no call; everything
//! else on the path is generic (`crate::probe`'s `dispatch` and `percpu`).
//!
//! # The live-patch protocol
//!
//! Every form is one instruction from {`b`, `bl`, `nop`, `brk`} in both states. The
//! Arm ARM (DDI 0487, chapter B2, "Concurrent modification and execution of
//! instructions"; B2.6.5 in issue A.a, the section Linux's `aarch64_insn_hotpatch_safe`
//! cites) makes an exception to "concurrently modified instructions may behave
//! as anything": where the instruction before and the instruction after the
//! modification are each one of B, BL, BRK, HVC, ISB, NOP, SMC or SVC, a CPU executing
//! it behaves as either the old or the new instruction, never a mix, provided the
//! write is a single-copy-atomic (aligned 32-bit) store. Seeing the new one takes the
//! cache maintenance and a context synchronisation event below. So a batch is
//! ([`SINGLE_STORE`]):
//!
//! 1. check every site holds the old instruction (nothing is written if one does not);
//! 2. publish the new state;
//! 3. one aligned 32-bit store per site, each followed (by the kernel's
//!    `TextPoker::write`, on the site's own address) by `DC CVAU; DSB ISH; IC IVAU;
//!    DSB ISH` (`super::sync_icache`), which reach every CPU of the Inner Shareable
//!    domain;
//! 4. **one** `TextPoker::sync_cores` for the batch: an `ISB` (context
//!    synchronisation) on every CPU, so each stops executing instructions it fetched
//!    before the store: after it, every CPU runs the new state. Linux's arm64 jump
//!    labels (`aarch64_insn_patch_text_nosync`) toggle `nop` ↔ `b` the same way.
//!
//! No CPU ever executes a half-written site, so no trap is needed while patching; the
//! only trap is the enabled C tail form's `brk`, which is its job. A failed store rolls
//! the batch back with the same single round (old instructions, then one
//! `sync_cores`).
//!
//! `mov w0, #imm` (what x86-64's is-enabled form corresponds to) is *not* in the
//! Arm ARM's list, so the is-enabled forms branch to two tiny stubs instead.

use core::convert::Infallible;

pub use crate::arch::RoundPiece;
use crate::arch::{LiveProtocol, ProbeKind, ProbeSiteRef};

use super::branch::{B, BL, NOP, brk, imm26};

/// Length of every probe site: one instruction.
pub const SITE_LEN: usize = 4;

/// The bytes of one probe site.
pub type SiteBytes = [u8; SITE_LEN];

/// The `brk` immediate of an enabled C tail site ("KS"): the kernel's synchronous
/// exception handler passes a BRK with this comment to `crate::probe::handle_int3`
/// (see [`super::trap`]).
pub const BRK_IMM: u16 = 0x4b53;
/// Enabled C tail call: `brk #0x4b53` (fires, then emulates `ret`).
pub const C_TAIL_ON: SiteBytes = brk(BRK_IMM).to_le_bytes();

pub use crate::arch::{OutOfReach, STUB_SYMBOLS, Stubs};

/// The instruction site `s` holds in state `on`, with the given stub addresses:
///
/// | kind | disabled | enabled |
/// |---|---|---|
/// | `RustJmp` (`probe!`) | `nop` | `b` out-of-line block |
/// | `RustEnabled` (`probe_enabled!`) | `nop` | `b` block setting `true` |
/// | `CCall` (`bl __dtrace_probe_*`) | `nop` | `bl ksites_probe_c_entry` |
/// | `CTail` (`b __dtrace_probe_*`) | `b ksites_probe_ret0` (returns) | `brk #0x4b53`: fires, then returns |
/// | `CEnabled` (`bl __dtraceenabled_*`) | `bl ksites_probe_ret0` | `bl ksites_probe_ret1` |
/// | `CEnabledTail` (`b __dtraceenabled_*`) | `b ksites_probe_ret0` | `b ksites_probe_ret1` |
#[inline(always)]
pub fn site_bytes(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteBytes, OutOfReach> {
    site_word(s, on, stubs).map(bytes_of)
}

/// [`site_bytes`] as a [`SiteWord`].
#[inline(always)]
pub fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteWord, OutOfReach> {
    encode(s, on, stubs, |pc, target| {
        imm26(pc, target).ok_or(OutOfReach { target })
    })
}

/// What [`site_word`] returned for the same site, state and stubs, when it returned
/// `Ok`: the offset is not range-checked again.
#[inline(always)]
pub fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> SiteWord {
    let wrapped = |pc: u64, target: u64| Ok((target.wrapping_sub(pc) >> 2) as u32 & 0x03ff_ffff);
    match encode::<Infallible>(s, on, stubs, wrapped) {
        Ok(w) => w,
        Err(never) => match never {},
    }
}

/// The instruction of site `s` in state `on`, with `imm(pc, target)` for a branch's
/// imm26.
#[inline(always)]
fn encode<E>(
    s: &ProbeSiteRef,
    on: bool,
    stubs: &Stubs,
    imm: impl Fn(u64, u64) -> Result<u32, E>,
) -> Result<SiteWord, E> {
    let branch =
        |op: u32, target: u64| -> Result<SiteWord, E> { Ok(u64::from(op | imm(s.addr, target)?)) };
    Ok(match (s.kind, on) {
        (ProbeKind::RustJmp | ProbeKind::RustEnabled | ProbeKind::CCall, false) => u64::from(NOP),
        (ProbeKind::RustJmp | ProbeKind::RustEnabled, true) => branch(B, s.target)?,
        (ProbeKind::CCall, true) => branch(BL, stubs.c_entry)?,
        (ProbeKind::CTail, false) => branch(B, stubs.ret0)?,
        (ProbeKind::CTail, true) => word(&C_TAIL_ON),
        (ProbeKind::CEnabled, false) => branch(BL, stubs.ret0)?,
        (ProbeKind::CEnabled, true) => branch(BL, stubs.ret1)?,
        (ProbeKind::CEnabledTail, false) => branch(B, stubs.ret0)?,
        (ProbeKind::CEnabledTail, true) => branch(B, stubs.ret1)?,
    })
}

/// Whether a batch writes each site's new instruction with one store and then
/// synchronises every CPU once (true here), instead of trapping each site first (the
/// x86-64 int3 protocol). With it, the generic batch checks every site before writing
/// any, and [`ROUNDS`] is 1.
pub const SINGLE_STORE: bool = true;

/// Number of rounds of the live-patch protocol: one store per site, then one
/// `sync_cores`.
pub const ROUNDS: usize = 1;

/// What round `r` writes at a site that becomes `new`: the whole instruction, at
/// offset 0 (one aligned 32-bit store).
#[inline(always)]
pub const fn round(_r: usize, new: SiteWord) -> RoundPiece {
    RoundPiece {
        offset: 0,
        bytes: new,
        len: SITE_LEN,
    }
}

/// Whether [`round`] `r` reads its `new` argument: always (the one round writes it).
#[inline(always)]
pub const fn round_uses_new(_r: usize) -> bool {
    true
}

/// Whether `found` is what an interrupted batch between `old` and `new` may have left:
/// only the complete new instruction (a store is never torn).
#[inline(always)]
pub const fn is_residue(found: SiteWord, _old: SiteWord, new: SiteWord) -> bool {
    found == new
}

/// The single-store protocol, for the generic batch ([`LiveProtocol`]).
#[derive(Clone, Copy, Debug)]
pub struct Live;

impl LiveProtocol for Live {
    type Stubs = Stubs;
    const SITE_LEN: usize = SITE_LEN;
    const SINGLE_STORE: bool = SINGLE_STORE;
    const ROUNDS: usize = ROUNDS;
    #[inline(always)]
    fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<u64, u64> {
        site_word(s, on, stubs).map_err(|e| e.target)
    }
    #[inline(always)]
    fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> u64 {
        site_word_again(s, on, stubs)
    }
    #[inline(always)]
    fn round(r: usize, new: u64) -> RoundPiece {
        round(r, new)
    }
    #[inline(always)]
    fn is_residue(found: u64, old: u64, new: u64) -> bool {
        is_residue(found, old, new)
    }
}

/// The instruction of a probe site, in the low 4 bytes of a word (the rest 0).
pub type SiteWord = u64;

/// Site bytes as a [`SiteWord`].
#[inline(always)]
pub const fn word(b: &SiteBytes) -> SiteWord {
    u32::from_le_bytes(*b) as u64
}

/// A [`SiteWord`]'s bytes.
#[inline(always)]
pub const fn bytes_of(w: SiteWord) -> SiteBytes {
    (w as u32).to_le_bytes()
}

/// The registers the BRK hook (`crate::probe::handle_int3`, named after x86-64's
/// `int3`) reads and may change: of these, [`emulate`] writes only `pc` and `x0`, which
/// the kernel's exception handler must write back (`pc` into ELR_EL1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Int3Frame {
    /// ELR_EL1: the address of the `brk` itself (a BRK's preferred return address).
    pub pc: u64,
    /// The link register (x30) of the interrupted code.
    pub lr: u64,
    /// x0: first argument and return register.
    pub x0: u64,
    /// x1.
    pub x1: u64,
    /// x2.
    pub x2: u64,
    /// x3.
    pub x3: u64,
    /// x4.
    pub x4: u64,
    /// x5.
    pub x5: u64,
}

// `struct ksites_int3_frame` in kernel-loader/c/ksites.h has this layout (64 bytes).
const _: () = assert!(core::mem::size_of::<Int3Frame>() == 64);

/// The address of the site whose `brk` produced `f` (ELR points at it).
#[inline(always)]
pub fn trap_site(f: &Int3Frame) -> u64 {
    f.pc
}

/// The first six argument registers of the trapped code (a C probe's arguments).
#[inline(always)]
pub fn trap_args(f: &Int3Frame) -> [u64; 6] {
    [f.x0, f.x1, f.x2, f.x3, f.x4, f.x5]
}

/// Makes `f` resume as if site `s` had executed its form for state `on`, except for
/// firing the probe (the caller fires an enabled C call or tail site first):
///
/// * `probe!`/`probe_enabled!`: continue after the site, or at its out-of-line block;
/// * C call: continue after the site (the call's effect is the firing);
/// * C tail: return (`pc = lr`), after firing if enabled;
/// * C is-enabled: `x0` = `on`, then continue after the site, or return for a tail.
///
/// Only the enabled C tail form traps in practice (nothing traps mid-patch here); the
/// rest keeps a stray `brk` at a site harmless.
///
/// # Safety
///
/// `f` is the live interrupted context of a BRK at `s`; the kernel writes `pc` and
/// `x0` back before returning from the exception.
#[inline(always)]
pub unsafe fn emulate(f: &mut Int3Frame, s: &ProbeSiteRef, on: bool) {
    let next = s.addr.wrapping_add(SITE_LEN as u64);
    match s.kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => f.pc = if on { s.target } else { next },
        ProbeKind::CCall => f.pc = next,
        ProbeKind::CTail => f.pc = f.lr,
        ProbeKind::CEnabled => {
            f.x0 = u64::from(on);
            f.pc = next;
        }
        ProbeKind::CEnabledTail => {
            f.x0 = u64::from(on);
            f.pc = f.lr;
        }
    }
}

/// The address of the probe site whose enabled `bl` set link register `ret`.
#[inline(always)]
pub fn call_site(ret: u64) -> u64 {
    ret.wrapping_sub(SITE_LEN as u64)
}

/// The per-CPU base register the probe dispatchers read a CPU's index through
/// (`crate::probe::set_cpu_index_word`): `TPIDR_EL1` in a freestanding build
/// (`target_os = "none"`: a kernel at EL1, as Linux keeps its per-CPU offset there
/// without VHE), `TPIDR_EL0` in a hosted one (a thread's TLS block). Fixed at build
/// time, so the read is a register read and one load with no branch.
pub const CPU_BASE: &str = if cfg!(target_os = "none") {
    "TPIDR_EL1"
} else {
    "TPIDR_EL0"
};

/// The `u32` at `offset` from the running CPU's [`CPU_BASE`]: a system register read
/// and one load, no call.
///
/// # Safety
///
/// On this CPU, [`CPU_BASE`] is readable at the current exception level and holds a
/// pointer such that pointer + `offset` is a readable, 4-aligned `u32` (the kernel or
/// thread set it up first).
#[inline(always)]
pub unsafe fn read_cpu_word(offset: isize) -> u32 {
    let v: u32;
    #[cfg(target_arch = "aarch64")]
    {
        let b: usize;
        // SAFETY: reading the register has no side effect; the caller runs where it is
        // readable (precondition).
        #[cfg(target_os = "none")]
        unsafe {
            core::arch::asm!("mrs {}, TPIDR_EL1", out(reg) b, options(nomem, nostack, preserves_flags))
        };
        // SAFETY: reading TPIDR_EL0 has no side effect.
        #[cfg(not(target_os = "none"))]
        unsafe {
            core::arch::asm!("mrs {}, TPIDR_EL0", out(reg) b, options(nomem, nostack, preserves_flags))
        };
        // SAFETY: the caller's precondition: a readable, aligned u32 there.
        v = unsafe { core::ptr::read_volatile(b.wrapping_add_signed(offset) as *const u32) };
    }
    // (Compiled on every host for the build tool; only an aarch64 kernel calls it.)
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = offset;
        v = u32::MAX;
    }
    v
}

/// Returns 0: a disabled C tail or is-enabled site branches here.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret0() -> u32 {
    core::arch::naked_asm!("mov w0, #0", "ret")
}

/// Returns 1: an enabled C is-enabled site branches here.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret1() -> u32 {
    core::arch::naked_asm!("mov w0, #1", "ret")
}

/// Defines `pub extern "C" fn ksites_probe_c_entry()`, what an enabled C site
/// (`bl ksites_probe_c_entry`) lands in: it saves the six argument registers and passes
/// them, with the link register (the site + 4), to `$fire: extern "C" fn(ret: u64,
/// args: &[u64; 6])`. Only what the replaced C call may clobber is clobbered.
#[cfg(target_arch = "aarch64")]
macro_rules! c_entry {
    ($fire:path) => {
        /// What an enabled C site (`bl ksites_probe_c_entry`) lands in: saves the six
        /// argument registers and passes them, with the return address, to the
        /// dispatcher.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ksites_probe_c_entry() {
            core::arch::naked_asm!(
                "stp x29, x30, [sp, #-64]!",
                "mov x29, sp",
                "stp x0, x1, [sp, #16]",
                "stp x2, x3, [sp, #32]",
                "stp x4, x5, [sp, #48]",
                "mov x0, x30",
                "add x1, sp, #16",
                "bl {fire}",
                "ldp x29, x30, [sp], #64",
                "ret",
                fire = sym $fire,
            )
        }
    };
}
#[cfg(target_arch = "aarch64")]
pub(crate) use c_entry;

/// The instruction a `probe!`/`probe_enabled!` site assembles to while disabled
/// (`nop`), labelled `2:`, as an `asm!` template string. Hidden: used by the macros.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_site_asm {
    () => {
        "2: nop"
    };
}

/// The directive opening the probe site record section (`.ksites_probe_sites`), as an
/// `asm!` template string. Hidden: used by the macros.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_section_asm {
    () => {
        ".pushsection .ksites_probe_sites,\"awR\",%progbits"
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::branch::{RET, branch_dest};

    const STUBS: Stubs = Stubs {
        c_entry: 0x10_0000,
        ret0: 0x10_0100,
        ret1: 0x10_0108,
    };

    fn site(kind: ProbeKind, addr: u64) -> ProbeSiteRef {
        ProbeSiteRef {
            addr,
            target: addr + 0x40,
            kind,
        }
    }

    const KINDS: [ProbeKind; 6] = [
        ProbeKind::RustJmp,
        ProbeKind::RustEnabled,
        ProbeKind::CCall,
        ProbeKind::CTail,
        ProbeKind::CEnabled,
        ProbeKind::CEnabledTail,
    ];

    /// Every state of every form is one of `b`, `bl`, `nop`, `brk`: the instructions the
    /// Arm ARM lets a CPU replace while others run them.
    #[test]
    fn every_form_is_b_bl_nop_or_brk_in_both_states() {
        for kind in KINDS {
            for on in [false, true] {
                let w = site_word(&site(kind, 0x1000), on, &STUBS).unwrap() as u32;
                let ok = w == NOP
                    || w & 0xfc00_0000 == B
                    || w & 0xfc00_0000 == BL
                    || w & 0xffe0_001f == 0xd420_0000;
                assert!(ok, "{kind:?} {on}: {w:08x}");
                assert_ne!(w, RET);
            }
        }
    }

    #[test]
    fn forms_go_where_the_table_says() {
        let at = |kind, on| site_word(&site(kind, 0x1000), on, &STUBS).unwrap() as u32;
        let dest = |w: u32| branch_dest(w, 0x1000);
        assert_eq!(at(ProbeKind::RustJmp, false), NOP);
        assert_eq!(dest(at(ProbeKind::RustJmp, true)), Some(0x1040));
        assert_eq!(at(ProbeKind::RustJmp, true) & 0xfc00_0000, B);
        assert_eq!(at(ProbeKind::CCall, true) & 0xfc00_0000, BL);
        assert_eq!(dest(at(ProbeKind::CCall, true)), Some(STUBS.c_entry));
        assert_eq!(dest(at(ProbeKind::CTail, false)), Some(STUBS.ret0));
        assert_eq!(at(ProbeKind::CTail, true), 0xd429_6a60, "brk #0x4b53");
        assert_eq!(dest(at(ProbeKind::CEnabled, false)), Some(STUBS.ret0));
        assert_eq!(dest(at(ProbeKind::CEnabled, true)), Some(STUBS.ret1));
        assert_eq!(at(ProbeKind::CEnabled, true) & 0xfc00_0000, BL);
        assert_eq!(at(ProbeKind::CEnabledTail, true) & 0xfc00_0000, B);
        // Out of reach: refused by the check, encoded the same by the unchecked copy.
        let far = ProbeSiteRef {
            addr: 0x1000,
            target: 0x1000 + (1 << 27),
            kind: ProbeKind::RustJmp,
        };
        assert_eq!(
            site_word(&far, true, &STUBS),
            Err(OutOfReach { target: far.target })
        );
        for kind in KINDS {
            for on in [false, true] {
                let s = site(kind, 0x2000);
                assert_eq!(
                    site_word(&s, on, &STUBS).unwrap(),
                    site_word_again(&s, on, &STUBS)
                );
                assert_eq!(
                    word(&site_bytes(&s, on, &STUBS).unwrap()),
                    site_word_again(&s, on, &STUBS)
                );
            }
        }
    }

    #[test]
    fn one_round_writes_the_whole_instruction() {
        const { assert!(SINGLE_STORE && ROUNDS == 1) };
        let new = u64::from(B | 0x10);
        let p = round(0, new);
        assert_eq!((p.offset, p.bytes, p.len), (0, new, 4));
        assert!(p.is_in(new));
        assert!(!p.is_in(u64::from(NOP)));
        assert!(round_uses_new(0));
        assert!(is_residue(new, u64::from(NOP), new));
        assert!(!is_residue(u64::from(RET), u64::from(NOP), new));
    }

    #[test]
    fn emulation_resumes_where_the_form_would() {
        let args = Int3Frame {
            pc: 0x1000,
            lr: 0x5554,
            x0: 9,
            x1: 1,
            x2: 2,
            x3: 3,
            x4: 4,
            x5: 5,
        };
        assert_eq!(trap_site(&args), 0x1000);
        assert_eq!(trap_args(&args), [9, 1, 2, 3, 4, 5]);
        let run = |kind, on| {
            let mut f = args;
            // SAFETY: no memory is read by this emulation.
            unsafe { emulate(&mut f, &site(kind, 0x1000), on) };
            (f.pc, f.x0)
        };
        assert_eq!(run(ProbeKind::RustJmp, true), (0x1040, 9));
        assert_eq!(run(ProbeKind::RustJmp, false), (0x1004, 9));
        assert_eq!(run(ProbeKind::CCall, true), (0x1004, 9));
        assert_eq!(run(ProbeKind::CTail, true), (0x5554, 9));
        assert_eq!(run(ProbeKind::CEnabled, true), (0x1004, 1));
        assert_eq!(run(ProbeKind::CEnabledTail, false), (0x5554, 0));
        assert_eq!(call_site(0x1004), 0x1000);
    }
}
