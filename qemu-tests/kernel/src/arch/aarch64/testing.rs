//! The aarch64 facts the shared tests (`crate::shared`) need, behind the names every
//! platform's `testing` module defines (riscv64: `src/arch/riscv64/testing.rs`):
//!
//! * code: [`ret_imm`] (two words returning an immediate), [`jump_insn`], the text
//!   functions [`text_canary`], [`patch_page`] and [`live_site`] (the live-patching
//!   site: a jump over a trap to `ret_imm(1)`, then room for `ret_imm` stubs of two
//!   words each), [`DIRECT_CALL_REACH`], [`MODULE_MACHINE`];
//! * faults: [`is_store_fault`], [`is_exec_fault`] (a caught permission fault of that
//!   access at that address), [`translates`] (a stage-1 translation check, no access);
//! * [`wait_for_interrupt`];
//! * the trap route: [`trap_with_registers`], [`trap_then_return`];
//! * CPU models: [`raw_features`] (per ifunc, its fast implementation's feature as read
//!   without `CpuFeatures`) and [`RAW_SOURCE`], [`RMOD_MIX`] (rmod's own ifunc);
//! * modules: [`EXTRA_MODULES`] (embedded besides rmod, cmod and badmod),
//!   [`veneer_target`] and [`module_tests`] (the platform's extra module tests, here
//!   the far module of [`super::far_module_tests`]).

use core::arch::asm;

use kernel_loader::CpuFeatures;
use kernel_loader::arch::aarch64::branch::branch_insn;
use kernel_loader::arch::aarch64::probe::BRK_IMM;

use super::exceptions::{CaughtFault, EC_DATA_ABORT, EC_INSTRUCTION_ABORT};
use crate::harness::Harness;
use crate::shared::module_tests::{Env, FARMOD};

/// `EM_AARCH64`: the `e_machine` of the embedded modules.
pub const MODULE_MACHINE: u16 = 183;

/// How far a module may be from the kernel text for its calls to reach it directly
/// (`bl`: ±128 MiB).
pub const DIRECT_CALL_REACH: u64 = 1 << 27;

/// `mov w0, #imm; ret`: code returning `imm` (at most 0x7ff: every architecture's
/// one-instruction immediate load takes it), two instruction words.
pub const fn ret_imm(imm: u16) -> [u32; 2] {
    [0x5280_0000 | ((imm as u32) << 5), 0xd65f_03c0]
}

/// The one-word jump (`b`) at `pc` to `target`, if in reach.
pub fn jump_insn(pc: u64, target: u64) -> Option<u32> {
    branch_insn(pc, target, false)
}

core::arch::global_asm!(
    r#"
    .text
    .global ksites_a64_text_canary
ksites_a64_text_canary:
    mov x0, #42
    ret

    .section .text.patch_page, "ax"
    .balign 4096
    .global ksites_a64_patch_page
ksites_a64_patch_page:
    mov w0, #1
    ret
    .fill 1022, 4, 0xd4200000

    .balign 64
    .global ksites_a64_live_site
ksites_a64_live_site:
    b 1f
    brk #0
1:  mov w0, #1
    ret
    .fill 64, 4, 0xd4200000
"#
);

unsafe extern "C" {
    fn ksites_a64_text_canary() -> u64;
    fn ksites_a64_patch_page() -> u64;
    fn ksites_a64_live_site() -> u64;
}

/// A text function returning 42 (`mov x0, #42; ret`).
pub fn text_canary() -> unsafe extern "C" fn() -> u64 {
    ksites_a64_text_canary
}

/// The function at the start of `mmu::layout().patch_page`: `ret_imm(1)`, then traps
/// to the end of the page.
pub fn patch_page() -> unsafe extern "C" fn() -> u64 {
    ksites_a64_patch_page
}

/// The live-patching site: `b 1f; brk; 1: ret_imm(1)`, then 64 words of room.
pub fn live_site() -> unsafe extern "C" fn() -> u64 {
    ksites_a64_live_site
}

/// `fault` is a permission fault of a store (a data abort, WnR) at `addr`.
pub fn is_store_fault(fault: &CaughtFault, addr: u64) -> bool {
    fault.class() == EC_DATA_ABORT
        && fault.is_permission_fault()
        && fault.is_write()
        && fault.far == addr
}

/// `fault` is a permission fault of an instruction fetch at `addr`, taken there.
pub fn is_exec_fault(fault: &CaughtFault, addr: u64) -> bool {
    fault.class() == EC_INSTRUCTION_ABORT
        && fault.is_permission_fault()
        && fault.far == addr
        && fault.elr == addr
}

/// Whether a stage-1 EL1 translation of `addr` for a write (`write`) or a read
/// succeeds (`AT S1E1W`/`AT S1E1R`, then PAR_EL1.F).
pub fn translates(addr: u64, write: bool) -> bool {
    let par: u64;
    // SAFETY: an address translation instruction only writes PAR_EL1 (this CPU's,
    // nothing else reads it); the `isb` makes the result visible to the `mrs`.
    unsafe {
        if write {
            asm!("at s1e1w, {a}", "isb", "mrs {p}, PAR_EL1", a = in(reg) addr, p = out(reg) par, options(nostack));
        } else {
            asm!("at s1e1r, {a}", "isb", "mrs {p}, PAR_EL1", a = in(reg) addr, p = out(reg) par, options(nostack));
        }
    }
    par & 1 == 0
}

/// The name of the translation check, for reports.
pub const TRANSLATION_CHECK: &str = "AT S1E1W/S1E1R";

/// Waits for an interrupt (`wfi`): a synchronisation round's SGI wakes it.
pub fn wait_for_interrupt() {
    // SAFETY: `wfi` only waits; a pending SGI (each batch sends one) wakes it.
    unsafe { asm!("wfi", options(nomem, nostack)) };
}

// ---------------------------------------------------------------------------------------
// The trap route.

/// Executes the probe trap (`brk #0x4b53`) at no probe site with x0..x7, x16, x17 =
/// `regs` and the link register = `lr`, and stores what those registers hold after it
/// back; returns the trap's address.
pub fn trap_with_registers(regs: &mut [u64; 10], lr: &mut u64) -> u64 {
    let site: u64;
    let r = regs;
    // SAFETY: the trap is at no probe site: the loader's hook declines it and the
    // test's fallback resumes after it (changing at most the declared registers); x30
    // is an in/out operand, so the compiler saved the real return address.
    unsafe {
        asm!(
            "adr {site}, 2f",
            "2: brk #{imm}",
            site = out(reg) site,
            imm = const BRK_IMM,
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            inout("x4") r[4], inout("x5") r[5], inout("x6") r[6], inout("x7") r[7],
            inout("x16") r[8], inout("x17") r[9], inout("x30") *lr,
        );
    }
    site
}

/// Executes the probe trap with the link register pointing at a label after it (and
/// an undefined instruction right after the trap); returns whether execution resumed at
/// the label (if it resumes after the trap instead, the undefined instruction faults
/// and fails the run).
pub fn trap_then_return() -> bool {
    let landed: u64;
    // SAFETY: x30 = label 3; the fallback resumes there, so the `udf` after the `brk`
    // is never reached if it works (and faults, failing the run, if not).
    unsafe {
        asm!(
            "mov {landed}, #0",
            "adr x30, 3f",
            "brk #{imm}",
            "udf #0",
            "3:",
            "mov {landed}, #1",
            landed = out(reg) landed,
            imm = const BRK_IMM,
            out("x30") _,
        );
    }
    landed == 1
}

// ---------------------------------------------------------------------------------------
// CPU models.

/// Where [`raw_features`] reads the features, for reports.
pub const RAW_SOURCE: &str = "id registers";

/// Per `kfuncs` ifunc (by name), the feature its fast implementation needs and whether
/// the CPU has it, read from the ID registers (not through `CpuFeatures`).
pub fn raw_features() -> [(&'static str, &'static str, bool); 4] {
    let (isar0, pfr0): (u64, u64);
    // SAFETY: ID registers are readable at EL1; no side effect.
    unsafe {
        asm!(
            "mrs {0}, ID_AA64ISAR0_EL1",
            "mrs {1}, ID_AA64PFR0_EL1",
            out(reg) isar0, out(reg) pfr0,
            options(nomem, nostack),
        );
    }
    let field = |r: u64, lsb: u32| (r >> lsb) & 0xf;
    [
        ("popcount", "asimd", field(pfr0, 20) != 0xf),
        ("crc32c", "crc32", field(isar0, 16) >= 1),
        ("fetch_add", "lse", field(isar0, 20) >= 2),
        ("xor3", "sha3", field(isar0, 32) >= 1),
    ]
}

/// rmod's own ifunc `rmod_mix` (qemu-tests/modules/rmod/src/lib.rs): its flavours by
/// preference, each with the features it needs (the first the CPU has wins), its tag
/// and its name.
pub const RMOD_MIX: [(CpuFeatures, u64, &str); 3] = [
    (CpuFeatures::LSE, 0x15e0_0000_0000_0000, "mix_lse"),
    (CpuFeatures::CRC32, 0xc3c3_0000_0000_0000, "mix_crc32"),
    (CpuFeatures::empty(), 0xbaba_0000_0000_0000, "mix_base"),
];

// ---------------------------------------------------------------------------------------
// Modules.

/// The modules the platform embeds besides rmod, cmod and badmod.
pub static EXTRA_MODULES: &[(&str, &[u8])] = &[("farmod", &FARMOD.0)];

/// Where the module loader's veneer at `addr` goes.
pub fn veneer_target(addr: u64) -> Option<u64> {
    let mut b = [0u8; 28];
    for (i, w) in b.chunks_exact_mut(4).enumerate() {
        // SAFETY: a veneer lies in the module's mapped RX veneer area, 4-aligned.
        let word = unsafe { core::ptr::read_volatile((addr + 4 * i as u64) as *const u32) };
        w.copy_from_slice(&word.to_le_bytes());
    }
    kernel_loader::arch::aarch64::branch::veneer_target(&b, addr)
}

/// The platform's module tests, run after `module_unknown_symbol_fails_cleanly`.
pub fn module_tests(h: &mut Harness, env: &Env) {
    super::far_module_tests::run(h, env);
}
