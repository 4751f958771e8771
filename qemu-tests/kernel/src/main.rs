//! The ksites test kernel.
//!
//! QEMU loads it with `-kernel` through its PVH note ([`boot`]); it sets up the CPU,
//! COM1, exceptions and its own W^X page tables, then runs the ifunc tests (boot
//! patching, one CPU), starts the other CPUs ([`smp`]: `smp: N CPUs online`), runs the
//! probe tests, the module tests ([`module_tests`]: the module arena, loadable
//! modules), the static key and live retarget tests ([`key_tests`], [`retarget_tests`]),
//! the SMP tests (live patching while the APs run the sites) and its own
//! infrastructure self-tests, printing one line per test and `N passed, M failed`, and
//! exits QEMU through isa-debug-exit (33 = success, 35 = failure).
//!
//! Built for `aarch64-unknown-none` it is the aarch64 platform instead ([`arch`],
//! `src/arch/aarch64/`: QEMU `virt`, PL011, GICv2, PSCI, semihosting exit), which
//! shares [`harness`] and [`no_alloc`] and runs the test list of `shared` (the
//! platform-neutral tests of every non-x86 kernel); every other module here is x86_64's.
//! Built for `riscv64gc-unknown-none-elf` it is the riscv64 platform
//! (`src/arch/riscv64/`: QEMU `virt` with OpenSBI, NS16550A, SBI HSM and IPIs, Sv39,
//! `sifive_test` exit).
#![no_std]
#![no_main]

/// Items that only the x86_64 kernel has.
macro_rules! x86_64_only {
    ($($item:item)*) => { $( #[cfg(target_arch = "x86_64")] $item )* };
}

#[cfg(target_arch = "aarch64")]
#[path = "arch/aarch64/mod.rs"]
pub mod arch;
#[cfg(target_arch = "aarch64")]
pub use arch::{exit, serial};
#[cfg(target_arch = "riscv64")]
#[path = "arch/riscv64/mod.rs"]
pub mod arch;
#[cfg(target_arch = "riscv64")]
pub use arch::{exit, serial};
pub mod harness;
pub mod no_alloc;
#[cfg(not(target_arch = "x86_64"))]
pub mod shared;
// Outside `x86_64_only!`: its `#[macro_export]` macros must not be macro-expanded.
#[cfg(target_arch = "x86_64")]
pub mod serial;

x86_64_only! {
    pub mod acpi;
    pub mod apic;
    pub mod arena;
    pub mod boot;
    pub mod capi_tests;
    pub mod cpu;
    pub mod cpu_state_tests;
    pub mod exit;
    pub mod idt;
    pub mod ifunc_tests;
    pub mod introspect_tests;
    pub mod key_tests;
    pub mod live_seq;
    pub mod load_tests;
    pub mod module_tests;
    pub mod paging;
    pub mod poker;
    pub mod probe_tests;
    pub mod retarget_tests;
    mod selftest;
    pub mod smp;
    pub mod smp_tests;
    pub mod trap_tests;

    use core::sync::atomic::{AtomicU64, Ordering};

    use harness::Harness;

    static START_INFO: AtomicU64 = AtomicU64::new(0);

    /// Physical address of the PVH `hvm_start_info` QEMU passed in `%ebx`.
    pub fn start_info() -> u64 {
        START_INFO.load(Ordering::Relaxed)
    }

    /// Entered from the boot stub on the 64 KiB boot stack, with `.bss` zeroed, identity
    /// paging and interrupts off.
    #[unsafe(no_mangle)]
    extern "C" fn kmain(start_info: u64) -> ! {
        smp::init_bsp();
        // SAFETY: `gs:[0]` is this CPU's index (what `smp::cpu_index` reads: its `PerCpu`,
        // whose GS base is set up on every CPU before anything else runs there, `init_bsp`
        // above, `ap_entry` on an AP), readable from any context; this kernel never
        // migrates or preempts, so it is stable while a probe fires, and each online CPU
        // has its own. Live probe changes use the `AliasPoker`, whose `sync_cores`
        // serializes every online CPU.
        unsafe { kernel_loader::probe::set_cpu_index_word(0) };
        cpu::init();
        serial::init();
        idt::init();
        paging::init();
        START_INFO.store(start_info, Ordering::Relaxed);
        println!("ksites test kernel");

        let mut harness = Harness::new();
        // Boot patching happens before the APs start: no other CPU runs the text yet.
        let c_boot = boot_ksites(&mut harness);
        cpu_state_tests::run(&mut harness);
        smp::init(start_info);
        if !c_boot {
            probe_tests::run(&mut harness);
        }
        introspect_tests::run(&mut harness);
        load_tests::run(&mut harness);
        module_tests::run(&mut harness);
        if !c_boot {
            key_tests::run(&mut harness);
            retarget_tests::run(&mut harness);
            smp_tests::run(&mut harness);
        }
        trap_tests::run(&mut harness);
        capi_tests::run(&mut harness);
        selftest::run(&mut harness);
        harness.finish()
    }

    /// Initialises ksites: from C through the C API with `ksites.boot=c` on the command
    /// line ([`capi_tests::c_boot`]; returns `true`), else in the Rust ifunc tests. The
    /// probe and SMP tests register the image themselves, so a C boot skips them.
    fn boot_ksites(harness: &mut Harness) -> bool {
        capi_tests::c_boot(harness) || {
            ifunc_tests::run(harness);
            false
        }
    }
}
