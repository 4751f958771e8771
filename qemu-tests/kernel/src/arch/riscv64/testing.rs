//! The riscv64 facts the shared tests (`crate::shared`) need, behind the names every
//! platform's `testing` module defines (the aarch64 module's doc lists them). Every
//! instruction here is 4 bytes (`.option norvc`): the probe trap is the 4-byte `ebreak`.
//!
//! * code: [`ret_imm`] (`li a0, imm; ret`), [`jump_insn`] (`jal x0`), [`text_canary`]
//!   and [`patch_page`] (the platform tests' `ksites_rv_text_canary` and
//!   `ksites_rv_patch_page`, `tests.rs`), [`live_site`], [`DIRECT_CALL_REACH`]
//!   (`auipc`+`jalr`), [`MODULE_MACHINE`];
//! * faults: [`is_store_fault`], [`is_exec_fault`] (store / instruction page faults
//!   with `stval` the address), [`translates`] (`mmu::translates`, a software Sv39
//!   walk);
//! * [`wait_for_interrupt`] (`wfi`);
//! * the trap route: [`trap_with_registers`], [`trap_then_return`];
//! * CPU models: [`raw_features`] reads the extensions by executing one instruction
//!   of each (an illegal-instruction trap, caught, says it is absent): independent of
//!   the device tree `CpuFeatures` come from; [`RMOD_MIX`] (rmod's own ifunc);
//! * modules: [`EXTRA_MODULES`] (none), [`veneer_target`] (the module loader builds no
//!   veneers on riscv64: `auipc`+`jalr` reaches ±2 GiB), [`module_tests`] (none).

use core::arch::asm;

use kernel_loader::CpuFeatures;
use kernel_loader::arch::riscv64::branch::{jal_to, jalr, li};

use super::exceptions::{
    CaughtFault, EXC_ILLEGAL_INSTRUCTION, EXC_INSTRUCTION_PAGE_FAULT, EXC_STORE_PAGE_FAULT,
    try_call,
};
use crate::harness::Harness;
use crate::shared::module_tests::Env;

/// `EM_RISCV`: the `e_machine` of the embedded modules.
pub const MODULE_MACHINE: u16 = 243;

/// How far a module may be from the kernel text for its calls to reach it directly
/// (`auipc`+`jalr`, what `R_RISCV_CALL_PLT` is: ±2 GiB).
pub const DIRECT_CALL_REACH: u64 = 1 << 31;

/// `a0`.
const A0: u32 = 10;
/// `ra`.
const RA: u32 = 1;

/// `li a0, imm; ret` (`addi a0, x0, imm; jalr x0, 0(ra)`): code returning `imm` (at
/// most 0x7ff, `addi`'s positive range), two instruction words.
pub const fn ret_imm(imm: u16) -> [u32; 2] {
    [li(A0, imm as i32), jalr(0, RA, 0)]
}

/// The one-word jump (`jal x0`) at `pc` to `target`, if in reach (±1 MiB).
pub fn jump_insn(pc: u64, target: u64) -> Option<u32> {
    jal_to(0, pc, target)
}

core::arch::global_asm!(
    r#"
    .option push
    .option norvc
    .section .text.ksites_live_site, "ax"
    .balign 64
    .global ksites_rv_live_site
ksites_rv_live_site:
    j 1f
    ebreak
1:  li a0, 1
    ret
    .fill 64, 4, 0x00100073

    .text
    .balign 4
ksites_rv_has_zbb:
    .option arch, +zbb
    cpop a0, a0
    li a0, 1
    ret
ksites_rv_has_zbc:
    .option arch, +zbc
    clmul a0, a0, a0
    li a0, 1
    ret
ksites_rv_has_a:
    .option arch, +a
    amoadd.d zero, zero, (sp)
    li a0, 1
    ret
ksites_rv_has_v:
    .option arch, +v
    vsetvli t0, zero, e8, m1, ta, ma
    li a0, 1
    ret
    .option pop
"#
);

unsafe extern "C" {
    fn ksites_rv_live_site() -> u64;
    fn ksites_rv_has_zbb() -> u64;
    fn ksites_rv_has_zbc() -> u64;
    fn ksites_rv_has_a() -> u64;
    fn ksites_rv_has_v() -> u64;
    // The platform tests' text functions (`tests.rs`).
    fn ksites_rv_text_canary() -> u64;
    fn ksites_rv_patch_page() -> u64;
}

/// A text function returning 42 (`li a0, 42; ret`).
pub fn text_canary() -> unsafe extern "C" fn() -> u64 {
    ksites_rv_text_canary
}

/// The function at the start of `mmu::layout().patch_page`: `ret_imm(1)`, then traps
/// to the end of the page.
pub fn patch_page() -> unsafe extern "C" fn() -> u64 {
    ksites_rv_patch_page
}

/// The live-patching site: `j 1f; ebreak; 1: ret_imm(1)`, then 64 words of room.
pub fn live_site() -> unsafe extern "C" fn() -> u64 {
    ksites_rv_live_site
}

/// `fault` is a store page fault at `addr`.
pub fn is_store_fault(fault: &CaughtFault, addr: u64) -> bool {
    fault.cause == EXC_STORE_PAGE_FAULT && fault.tval == addr
}

/// `fault` is an instruction page fault at `addr`, taken there.
pub fn is_exec_fault(fault: &CaughtFault, addr: u64) -> bool {
    fault.cause == EXC_INSTRUCTION_PAGE_FAULT && fault.tval == addr && fault.epc == addr
}

/// Waits for an interrupt (`wfi`): a synchronisation round's IPI wakes it.
pub fn wait_for_interrupt() {
    // SAFETY: `wfi` only waits; a pending IPI (each batch sends one) wakes it.
    unsafe { asm!("wfi", options(nomem, nostack)) };
}

/// Whether the Sv39 tables translate `addr` for a write (`write`) or a read.
pub fn translates(addr: u64, write: bool) -> bool {
    super::mmu::translates(addr, write)
}

/// The name of the translation check, for reports.
pub const TRANSLATION_CHECK: &str = "Sv39 walk";

// ---------------------------------------------------------------------------------------
// The trap route.

/// Runs the probe trap (a 4-byte `ebreak`) where no probe site is, with `regs` in
/// a0..a7, t3 and t4 and `ra` in `ra`; afterwards `regs` and `ra` hold what those
/// registers hold. Returns the address of the `ebreak`.
pub fn trap_with_registers(regs: &mut [u64; 10], ra: &mut u64) -> u64 {
    let r = regs;
    let site: u64;
    // SAFETY: no probe site is at this `ebreak`, so the loader's hook declines it and
    // the fallback of the test resumes after it, changing at most the registers given
    // as operands; `ra` is one (in/out), so the compiler saved the real return address.
    unsafe {
        asm!(
            ".option push",
            ".option norvc",
            "lla {site}, 2f",
            ".option pop",
            // 4-aligned, as a probe site's (`is_probe_ebreak` refuses an `ebreak` at
            // 2 mod 4); the padding, if any, is a `c.nop`, so RVC is on here.
            ".p2align 2",
            ".option push",
            ".option norvc",
            "2: ebreak",
            ".option pop",
            inout("a0") r[0], inout("a1") r[1], inout("a2") r[2], inout("a3") r[3], inout("a4") r[4],
            inout("a5") r[5], inout("a6") r[6], inout("a7") r[7], inout("t3") r[8], inout("t4") r[9],
            inout("ra") *ra, site = out(reg) site,
        );
    }
    site
}

/// Whether a probe trap whose fallback emulates a `ret` resumes at `ra`: `ra` points
/// at a label after the `ebreak`, and right after the `ebreak` is an illegal
/// instruction (resuming there faults and fails the run).
pub fn trap_then_return() -> bool {
    let landed: u64;
    // SAFETY: ra = label 3, where the fallback resumes; the `unimp` right after the
    // `ebreak` is only reached if it does not (and then faults, failing the run).
    unsafe {
        asm!(
            ".option push",
            ".option norvc",
            "li {landed}, 0",
            "lla ra, 3f",
            ".option pop",
            // 4-aligned, as in `trap_with_registers`.
            ".p2align 2",
            ".option push",
            ".option norvc",
            "ebreak",
            "unimp",
            "3: li {landed}, 1",
            ".option pop",
            landed = out(reg) landed, out("ra") _,
        );
    }
    landed == 1
}

// ---------------------------------------------------------------------------------------
// CPU models.

/// Where [`raw_features`] reads the features, for reports.
pub const RAW_SOURCE: &str = "instruction probes";

/// Whether `probe` (`<one instruction>; li a0, 1; ret`) runs: an illegal-instruction
/// trap means the extension is absent (or, for V, its state off).
fn runs(probe: unsafe extern "C" fn() -> u64) -> bool {
    // SAFETY: each probe is one instruction of its extension (registers only, or an
    // add of zero to the stack word for A), then `li a0, 1; ret`; on CPU 0 (these
    // tests run there) an illegal instruction is caught and returned.
    match unsafe { try_call(probe as usize as u64) } {
        Ok(v) => v == 1,
        Err(f) => {
            if f.cause != EXC_ILLEGAL_INSTRUCTION {
                crate::println!("testing: probe {:#x} faulted: {f:?}", probe as usize);
            }
            false
        }
    }
}

/// Per `kfuncs` ifunc (by name), the extension its fast implementation needs and
/// whether the CPU runs one of its instructions (not through `CpuFeatures`).
pub fn raw_features() -> [(&'static str, &'static str, bool); 4] {
    [
        ("popcount", "zbb", runs(ksites_rv_has_zbb)),
        ("crc32c", "zbc", runs(ksites_rv_has_zbc)),
        ("fetch_add", "a", runs(ksites_rv_has_a)),
        ("xor3", "v", runs(ksites_rv_has_v)),
    ]
}

/// rmod's own ifunc `rmod_mix` (qemu-tests/modules/rmod/src/lib.rs): its flavours by
/// preference, each with the features it needs (the first the CPU has wins), its tag
/// and its name.
pub const RMOD_MIX: [(CpuFeatures, u64, &str); 3] = [
    (CpuFeatures::ZBB, 0x2bb0_0000_0000_0000, "mix_zbb"),
    (CpuFeatures::ZBC, 0x2bc0_0000_0000_0000, "mix_zbc"),
    (CpuFeatures::empty(), 0xbaba_0000_0000_0000, "mix_base"),
];

// ---------------------------------------------------------------------------------------
// Modules.

/// The modules the platform embeds besides rmod, cmod and badmod: none.
pub static EXTRA_MODULES: &[(&str, &[u8])] = &[];

/// Where a module loader veneer at `addr` goes: riscv64 modules have none (every call
/// relocation reaches ±2 GiB), so a branch into the veneer area is not followed.
pub fn veneer_target(_addr: u64) -> Option<u64> {
    None
}

/// The platform's module tests: none beyond the shared ones.
pub fn module_tests(_h: &mut Harness, _env: &Env) {}
