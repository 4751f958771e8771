//! The aarch64 platform of the test kernel: QEMU `virt` (`-M virt`, `-kernel` ELF,
//! entered at EL1), a PL011 UART, GICv2 SGIs, PSCI `CPU_ON` for the other CPUs and a
//! semihosting exit. It shares the harness with x86_64 (`N passed, M failed`, exit
//! status 33/35) and runs the shared test list (`crate::shared::run`: boot patching on
//! CPU 0 through `crate::shared::ksites_init` first, then the platform tests of
//! [`tests`], the probe, SMP, trap-route and module tests), providing the platform
//! interface `crate::shared` documents.
//!
//! * [`boot`]: `_start`, `_secondary_start`, the exception vectors (assembly).
//! * [`exceptions`]: the vectors' Rust side: IRQ, BRK route, caught faults, reports.
//! * [`mmu`]: 4 KiB-granule identity map, text RX / rodata R / data RW NX, the writable
//!   alias and its `TextPoker`.
//! * [`gic`], [`psci`], [`serial`], [`timer`], [`exit`]: the devices and firmware calls.
//! * [`smp`]: secondary start-up, `sync_cores` (an `isb` on every CPU through SGIs),
//!   jobs for the other CPUs.
//! * [`tests`]: the platform tests; [`testing`]: the instruction-level helpers of the
//!   shared tests; [`far_module_tests`]: a module out of `bl` reach (veneers).

pub mod boot;
pub mod exceptions;
pub mod exit;
pub mod far_module_tests;
pub mod gic;
pub mod mmu;
pub use crate::shared::module_arena;
pub mod psci;
pub mod serial;
pub mod smp;
pub mod testing;
pub mod tests;
pub mod timer;

use core::ops::Range;

use kernel_loader::CpuFeatures;

use crate::harness::Harness;
use crate::println;

/// Entered from `_start` on CPU 0: boot stack, `.bss` zeroed, vectors set, MMU off.
#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    println!("ksites test kernel (aarch64, QEMU virt)");
    // SAFETY: `smp::cpu_index` reads MPIDR_EL1.Aff0: callable from any context, fixed
    // per CPU and distinct between CPUs (this kernel never migrates or preempts); live
    // probe changes will use `mmu::AliasPoker`, whose `sync_cores` runs `isb` on every
    // online CPU.
    unsafe { kernel_loader::probe::set_cpu_index(smp::cpu_index) };
    if let Err(e) = mmu::init() {
        println!("FAULT: mmu: {e}");
        exit::exit_qemu(false);
    }
    // SAFETY: `mmu::init` succeeded and the kernel is identity mapped.
    unsafe { mmu::enable() };
    let l = mmu::layout();
    println!(
        "mmu: on; text {:#x}..{:#x} RX, rodata {:#x}..{:#x} R NX, data/bss ..{:#x} RW NX, alias +{:#x}",
        l.text_start,
        l.text_end,
        l.rodata_start,
        l.data_start,
        l.kernel_end,
        mmu::ALIAS_OFFSET
    );
    let (major, minor) = psci::version();
    println!("psci: version {major}.{minor} (hvc)");
    gic::init_distributor();
    gic::init_cpu();
    let mut harness = Harness::new();
    crate::shared::run(&mut harness);
    harness.finish()
}

/// The executable ranges the table is validated against: the kernel text.
pub fn ksites_exec() -> [Range<u64>; 1] {
    let l = mmu::layout();
    let text = l.text_start..l.text_end;
    [text]
}

/// The FP/AdvSIMD/SVE state enabled (the implementations use vector registers), then the
/// features the resolvers get.
pub fn ksites_features() -> CpuFeatures {
    // SAFETY: EL1 on QEMU virt without EL2/EL3 traps; nothing holds FP state to save.
    unsafe { kernel_loader::arch::aarch64::enable_simd_state() };
    CpuFeatures::detect()
}
