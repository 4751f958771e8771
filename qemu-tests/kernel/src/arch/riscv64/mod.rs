//! The riscv64 platform of the test kernel: QEMU `virt` with OpenSBI (`-bios default`,
//! `-kernel` ELF entered in S-mode at 0x8020_0000), an NS16550A UART, SBI HSM for the
//! other harts, SBI IPIs for the synchronisation round, Sv39 paging and an exit through
//! `sifive_test`. It shares the harness with x86_64 and aarch64 (`N passed, M failed`,
//! exit status 33/35), then runs the platform tests of [`tests`].
//!
//! * [`boot`]: `_start`, `_secondary_start`, the trap vector (assembly).
//! * [`trap`]: the vector's Rust side: IPIs, `ebreak`s, caught faults, reports.
//! * [`mmu`]: Sv39 identity map, text R X / rodata R / data R W, the writable alias.
//! * [`dt`]: the device tree (harts, timebase, RAM, `riscv,isa`).
//! * [`sbi`], [`serial`], [`timer`], [`exit`]: firmware calls and devices.
//! * [`smp`]: secondary start-up, `sync_cores` (a `fence.i` on every hart through
//!   IPIs), jobs for the other harts.
//! * [`tests`]: the platform tests.

pub mod boot;
pub mod dt;
pub mod exit;
pub mod mmu;
pub mod sbi;
pub mod serial;
pub mod smp;
pub mod tests;
pub mod timer;
pub mod trap;

use crate::harness::Harness;
use crate::println;

/// Entered from `_start` on the boot hart (CPU 0): boot stack, `.bss` zeroed, `stvec`
/// set, FP state on, paging off; `hartid` and `dtb` as OpenSBI passed them.
#[unsafe(no_mangle)]
extern "C" fn kmain(hartid: usize, dtb: usize) -> ! {
    serial::init();
    println!("ksites test kernel (riscv64, QEMU virt, OpenSBI)");
    smp::init_boot_hart(hartid);
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
    let mut harness = Harness::new();
    tests::run(&mut harness);
    harness.finish()
}
