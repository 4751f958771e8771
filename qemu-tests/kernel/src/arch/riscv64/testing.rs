//! The riscv64 facts the shared tests (`crate::shared`) need, behind the names every
//! platform's `testing` module defines (aarch64: `src/arch/aarch64/testing.rs`):
//!
//! * code: [`ret_imm`] (`li a0, imm; ret`), [`jump_insn`] (`jal x0`), the text
//!   functions [`text_canary`], [`patch_page`] and [`live_site`] (a jump over an
//!   `ebreak` to `ret_imm(1)`, then room for `ret_imm` stubs of two words each),
//!   [`DIRECT_CALL_REACH`], [`MODULE_MACHINE`];
//! * faults: [`is_store_fault`], [`is_exec_fault`] (a caught page fault of that access
//!   at that address), [`translates`] (a software Sv39 walk: RISC-V has no translating
//!   instruction);
//! * [`wait_for_interrupt`];
//! * the trap route: [`trap_with_registers`], [`trap_then_return`],
//!   [`frame_return_address`], [`resume_after_trap`], [`resume_at_return_address`];
//! * CPU models: [`raw_features`] (per ifunc, its fast implementation's extension as the
//!   device tree's `riscv,isa` string names it, read without `CpuFeatures`) and
//!   [`RAW_SOURCE`], [`rmod_mix_expected`] and [`RMOD_MIX_TAGS`] (rmod's own ifunc);
//! * modules: [`EXTRA_MODULES`] (none), [`veneer_target`] and [`module_tests`] (none:
//!   every module block lies within `auipc`+`jalr` reach of the kernel).

use core::arch::asm;

use kernel_loader::CpuFeatures;
use kernel_loader::arch::riscv64::branch::jal_to;
use kernel_loader::arch::riscv64::reloc::{VENEER_LEN, veneer_target as decode_veneer};
use kernel_loader::probe::Int3Frame;

use super::exceptions::{CaughtFault, EXC_INSTRUCTION_PAGE_FAULT, EXC_STORE_PAGE_FAULT};
use super::{dt, mmu};
use crate::harness::Harness;
use crate::shared::module_tests::Env;

/// `EM_RISCV`: the `e_machine` of the embedded modules.
pub const MODULE_MACHINE: u16 = 243;

/// How far a module may be from the kernel text for its calls to reach it directly
/// (an `auipc`+`jalr` pair: ±2 GiB).
pub const DIRECT_CALL_REACH: u64 = 1 << 31;

/// `li a0, imm; ret`: code returning `imm` (at most 0x7ff), two instruction words.
pub const fn ret_imm(imm: u16) -> [u32; 2] {
    [0x0000_0513 | ((imm as u32 & 0xfff) << 20), 0x0000_8067]
}

/// The one-word jump (`jal x0`) at `pc` to `target`, if in reach (±1 MiB).
pub fn jump_insn(pc: u64, target: u64) -> Option<u32> {
    jal_to(0, pc, target)
}

core::arch::global_asm!(
    r#"
    .option push
    .option norvc
    .text
    .balign 4
    .global ksites_rv_text_canary
ksites_rv_text_canary:
    li a0, 42
    ret

    .section .text.patch_page, "ax"
    .balign 4096
    .global ksites_rv_patch_page
ksites_rv_patch_page:
    li a0, 1
    ret
    .fill 1022, 4, 0x00100073

    .balign 64
    .global ksites_rv_live_site
ksites_rv_live_site:
    j 1f
    ebreak
1:  li a0, 1
    ret
    .fill 64, 4, 0x00100073
    .option pop
"#
);

unsafe extern "C" {
    fn ksites_rv_text_canary() -> u64;
    fn ksites_rv_patch_page() -> u64;
    fn ksites_rv_live_site() -> u64;
}

/// A text function returning 42 (`li a0, 42; ret`).
pub fn text_canary() -> unsafe extern "C" fn() -> u64 {
    ksites_rv_text_canary
}

/// The function at the start of `mmu::layout().patch_page`: `ret_imm(1)`, then
/// `ebreak`s to the end of the page.
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

/// Whether the page tables let the kernel write (`write`) or read `addr`.
pub fn translates(addr: u64, write: bool) -> bool {
    mmu::translates(addr, write)
}

/// The name of the translation check, for reports.
pub const TRANSLATION_CHECK: &str = "a software Sv39 walk";

/// Waits for an interrupt (`wfi`): a synchronisation round's IPI wakes it.
pub fn wait_for_interrupt() {
    riscv::asm::wfi();
}

// ---------------------------------------------------------------------------------------
// The trap route.

/// Executes the probe trap (the 4-byte `ebreak`) at no probe site with a0..a7, t0, t1 =
/// `regs` and `ra` = `lr`, and stores what those registers hold after it back; returns
/// the trap's address.
pub fn trap_with_registers(regs: &mut [u64; 10], lr: &mut u64) -> u64 {
    let site: u64;
    let r = regs;
    // SAFETY: the trap is at no probe site: the loader's hook declines it and the
    // test's fallback resumes after it (changing at most the declared registers); `ra`
    // is an in/out operand, so the compiler saved the real return address.
    unsafe {
        asm!(
            ".option push",
            ".option norvc",
            "lla {site}, 2f",
            "2: ebreak",
            ".option pop",
            site = out(reg) site,
            inout("a0") r[0], inout("a1") r[1], inout("a2") r[2], inout("a3") r[3],
            inout("a4") r[4], inout("a5") r[5], inout("a6") r[6], inout("a7") r[7],
            inout("t0") r[8], inout("t1") r[9], inout("ra") *lr,
        );
    }
    site
}

/// Executes the probe trap with `ra` pointing at a label after it (and an illegal
/// instruction right after the trap); returns whether execution resumed at the label
/// (if it resumes after the trap instead, the illegal instruction faults and fails the
/// run).
pub fn trap_then_return() -> bool {
    let landed: u64;
    // SAFETY: ra = label 3; the fallback resumes there, so the `unimp` after the
    // `ebreak` is never reached if it works (and faults, failing the run, if not).
    unsafe {
        asm!(
            ".option push",
            ".option norvc",
            "li {landed}, 0",
            "lla ra, 3f",
            "ebreak",
            "unimp",
            "3:",
            "li {landed}, 1",
            ".option pop",
            landed = out(reg) landed,
            out("ra") _,
        );
    }
    landed == 1
}

/// The link register of a trap frame.
pub fn frame_return_address(f: &Int3Frame) -> u64 {
    f.ra
}

/// Makes `f` resume after its trap instruction with `value` in the return register.
pub fn resume_after_trap(f: &mut Int3Frame, value: u64) {
    f.a0 = value;
    f.pc += 4;
}

/// Makes `f` resume at its link register (an emulated `ret`).
pub fn resume_at_return_address(f: &mut Int3Frame) {
    f.pc = f.ra;
}

// ---------------------------------------------------------------------------------------
// CPU models.

/// Where [`raw_features`] reads the features, for reports.
pub const RAW_SOURCE: &str = "riscv,isa";

/// Per `kfuncs` ifunc (by name), the extension its fast implementation needs and
/// whether the device tree's `riscv,isa` names it (read as a string, not through
/// `CpuFeatures`).
pub fn raw_features() -> [(&'static str, &'static str, bool); 4] {
    let has = |name| dt::machine().is_some_and(|m| m.has_extension(name));
    [
        ("popcount", "zbb", has("zbb")),
        ("crc32c", "zbc", has("zbc")),
        ("fetch_add", "a", has("a")),
        ("xor3", "v", has("v")),
    ]
}

/// rmod's own ifunc `rmod_mix`: each implementation's tag and name
/// (qemu-tests/modules/rmod/src/lib.rs).
pub const RMOD_MIX_TAGS: [(u64, &str); 3] = [
    (0x2bb0_0000_0000_0000, "mix_zbb"),
    (0x2bc0_0000_0000_0000, "mix_zbc"),
    (0xbaba_0000_0000_0000, "mix_base"),
];

/// The `rmod_mix` implementation the features call for.
pub fn rmod_mix_expected(f: &CpuFeatures) -> &'static str {
    if f.contains(CpuFeatures::ZBB) {
        "mix_zbb"
    } else if f.contains(CpuFeatures::ZBC) {
        "mix_zbc"
    } else {
        "mix_base"
    }
}

// ---------------------------------------------------------------------------------------
// Modules.

/// The modules the platform embeds besides rmod, cmod and badmod: none.
pub static EXTRA_MODULES: &[(&str, &[u8])] = &[];

/// Where the module loader's veneer at `addr` goes.
pub fn veneer_target(addr: u64) -> Option<u64> {
    let mut b = [0u8; VENEER_LEN];
    for (i, w) in b.chunks_exact_mut(4).enumerate() {
        // SAFETY: a veneer lies in the module's mapped RX veneer area, 8-aligned.
        let word = unsafe { core::ptr::read_volatile((addr + 4 * i as u64) as *const u32) };
        w.copy_from_slice(&word.to_le_bytes());
    }
    decode_veneer(&b)
}

/// The platform's module tests, run after `module_unknown_symbol_fails_cleanly`: none
/// on riscv64 (no module block is out of direct call reach).
pub fn module_tests(_h: &mut Harness, _env: &Env) {}
