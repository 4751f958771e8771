//! The aarch64 platform of the test kernel: QEMU `virt` (`-M virt`, `-kernel` ELF,
//! entered at EL1), a PL011 UART, GICv2 SGIs, PSCI `CPU_ON` for the other CPUs and a
//! semihosting exit. It shares the harness with x86_64 (`N passed, M failed`, exit
//! status 33/35) and runs the platform tests of [`tests`]; the ksites test list (ifuncs,
//! probes, modules, SMP stress) plugs in once the build tool embeds aarch64 kernels.
//!
//! * [`boot`]: `_start`, `_secondary_start`, the exception vectors (assembly).
//! * [`exceptions`]: the vectors' Rust side: IRQ, BRK route, caught faults, reports.
//! * [`mmu`]: 4 KiB-granule identity map, text RX / rodata R / data RW NX, the writable
//!   alias and its `TextPoker`.
//! * [`gic`], [`psci`], [`serial`], [`timer`], [`exit`]: the devices and firmware calls.
//! * [`smp`]: secondary start-up, `sync_cores` (an `isb` on every CPU through SGIs),
//!   jobs for the other CPUs.
//! * [`tests`], [`live_tests`]: the platform tests.
//! * [`probe_tests`], [`smp_tests`]: probes of every form, live, and the SMP stress.

pub mod boot;
pub mod exceptions;
pub mod exit;
pub mod gic;
pub mod live_tests;
pub mod mmu;
pub mod probe_tests;
pub mod psci;
pub mod serial;
pub mod smp;
pub mod smp_tests;
pub mod tests;
pub mod timer;

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
    tests::run(&mut harness);
    probe_tests::run(&mut harness);
    smp_tests::run(&mut harness);
    harness.finish()
}
