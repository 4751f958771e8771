//! The riscv64 platform of the test kernel: QEMU `virt` with OpenSBI (`-bios default`,
//! `-kernel` ELF entered in S-mode at 0x8020_0000), an NS16550A UART, SBI HSM for the
//! other harts, SBI IPIs for the synchronisation round, Sv39 paging and an exit through
//! `sifive_test`. It shares the harness with x86_64 and aarch64 (`N passed, M failed`,
//! exit status 33/35) and runs the shared test list (`crate::shared::run`: boot patching
//! on CPU 0 through `crate::shared::ksites_init` first, then the platform tests of
//! [`tests`], the probe, SMP, trap-route and module tests), providing the platform
//! interface `crate::shared` documents.
//!
//! * [`boot`]: `_start`, `_secondary_start`, the trap vector (assembly).
//! * [`exceptions`]: the vector's Rust side: IPIs, `ebreak`s (the probe route), caught
//!   faults, reports.
//! * [`mmu`]: Sv39 identity map, text R X / rodata R / data R W, the writable alias and
//!   its `TextPoker` ([`mmu::AliasPoker`]); [`module_arena`]: the module blocks' pages.
//! * [`dt`]: the device tree (harts, timebase, RAM, `riscv,isa`).
//! * [`sbi`], [`serial`], [`timer`], [`exit`]: firmware calls and devices.
//! * [`smp`]: secondary start-up, `sync_cores` (a `fence.i` on every hart through
//!   IPIs), jobs for the other harts.
//! * [`tests`]: the platform tests; [`testing`]: the instruction-level helpers of the
//!   shared tests.

pub mod boot;
pub mod dt;
pub mod exceptions;
pub mod exit;
pub mod mmu;
pub use crate::shared::module_arena;
pub mod sbi;
pub mod serial;
pub mod smp;
pub mod testing;
pub mod tests;
pub mod timer;

use core::ops::Range;

use kernel_loader::CpuFeatures;
use kernel_loader::arch::riscv64::cpu::init_from_fdt;

use crate::harness::Harness;
use crate::println;

/// Entered from `_start` on the boot hart (CPU 0): boot stack, `.bss` zeroed, `stvec`
/// set, FP state on, paging off; `hartid` and `dtb` as OpenSBI passed them.
#[unsafe(no_mangle)]
extern "C" fn kmain(hartid: usize, dtb: usize) -> ! {
    serial::init();
    println!("ksites test kernel (riscv64, QEMU virt, OpenSBI)");
    smp::init_boot_hart(hartid);
    // SAFETY: `smp::cpu_index` reads `tp`, set on every hart before any Rust runs there
    // (`boot.rs`): callable from any context, fixed per hart and distinct between harts
    // (this kernel never migrates or preempts); live probe changes use
    // `mmu::AliasPoker`, whose `sync_cores` runs `fence.i` on every online hart.
    unsafe { kernel_loader::probe::set_cpu_index(smp::cpu_index) };
    // SAFETY: `dtb` is what OpenSBI passed in a1; paging is off and nothing writes it.
    let machine = match unsafe { dt::init(dtb as u64) } {
        Ok(m) => m,
        Err(e) => {
            println!("FAULT: device tree at {dtb:#x}: {e}");
            exit::exit_qemu(false)
        }
    };
    println!(
        "dt: {} harts {:?}, boot hart {hartid}, timebase {} Hz, RAM {:#x}+{:#x}, dtb {:#x} ({} bytes)",
        machine.hart_count,
        machine.harts(),
        machine.timebase,
        machine.memory.0,
        machine.memory.1,
        machine.dtb,
        machine.dtb_size,
    );
    println!(
        "dt: riscv,isa {}{}",
        machine.isa(),
        if machine.isa_uniform {
            ""
        } else {
            " (harts differ)"
        }
    );
    // SAFETY: as for `dt::init`.
    let features = match unsafe { init_from_fdt(dtb as *const u8) } {
        Ok(f) => f,
        Err(e) => {
            println!("FAULT: CPU features from the device tree: {e}");
            exit::exit_qemu(false)
        }
    };
    print_features(features);
    let sbi = sbi::info();
    println!(
        "sbi: spec {}.{}, implementation {} version {:#x}; HSM {} IPI {} RFENCE {} SRST {}",
        sbi.spec.0,
        sbi.spec.1,
        sbi.impl_id,
        sbi.impl_version,
        sbi.hsm,
        sbi.ipi,
        sbi.rfence,
        sbi.srst
    );
    if let Err(e) = mmu::init() {
        println!("FAULT: mmu: {e}");
        exit::exit_qemu(false);
    }
    // SAFETY: `mmu::init` succeeded and the kernel is identity mapped.
    unsafe { mmu::enable() };
    let l = mmu::layout();
    println!(
        "mmu: Sv39 on; text {:#x}..{:#x} RX, rodata {:#x}..{:#x} R, data/bss ..{:#x} RW, alias +{:#x}",
        l.text_start,
        l.text_end,
        l.rodata_start,
        l.data_start,
        l.kernel_end,
        mmu::ALIAS_OFFSET
    );
    let state = ksites_simd_state();
    println!(
        "simd: fp {} vector {} ({} byte vectors), save area {} bytes",
        state.fp, state.vector, state.vector_bytes, state.save_area_size
    );
    let mut harness = Harness::new();
    crate::shared::run(&mut harness);
    harness.finish()
}

/// The extensions the `features:` line shows (`NAME=0|1`), the xtask compares them
/// across CPU models.
pub const SHOWN_FEATURES: &[(&str, CpuFeatures)] = &[
    ("zba", CpuFeatures::ZBA),
    ("zbb", CpuFeatures::ZBB),
    ("zbc", CpuFeatures::ZBC),
    ("zbs", CpuFeatures::ZBS),
    ("zbkb", CpuFeatures::ZBKB),
    ("zkn", CpuFeatures::ZKN),
    ("v", CpuFeatures::V),
    ("zicbom", CpuFeatures::ZICBOM),
    ("zicond", CpuFeatures::ZICOND),
];

/// Prints `features: zba=0|1 … (riscv,isa)`.
fn print_features(f: CpuFeatures) {
    crate::print!("features:");
    for (name, bit) in SHOWN_FEATURES {
        crate::print!(" {name}={}", u8::from(f.contains(*bit)));
    }
    println!(" (from the device tree, bits {:#x})", f.bits());
}

/// The FP and vector register state on, on the running hart, for the features the
/// device tree named (recorded at boot).
pub fn ksites_simd_state() -> kernel_loader::arch::riscv64::cpu::SimdState {
    // SAFETY: S-mode; the trap vector saves f0-f31/fcsr when FS is on; nothing compiled
    // for riscv64gc (handlers included) uses the vector registers, which only the
    // vector implementations of `kfuncs` touch, outside any trap.
    unsafe { kernel_loader::arch::riscv64::cpu::enable_simd_state() }
}

/// The executable ranges the table is validated against: the kernel text.
pub fn ksites_exec() -> [Range<u64>; 1] {
    let l = mmu::layout();
    let text = l.text_start..l.text_end;
    [text]
}

/// The FP/vector state enabled (the implementations use vector registers), then the
/// features the resolvers get.
pub fn ksites_features() -> CpuFeatures {
    ksites_simd_state();
    CpuFeatures::detect()
}
