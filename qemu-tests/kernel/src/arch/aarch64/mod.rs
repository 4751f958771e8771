//! The aarch64 platform of the test kernel: QEMU `virt` (`-M virt`, `-kernel` ELF,
//! entered at EL1), a PL011 UART, GICv2 SGIs, PSCI `CPU_ON` for the other CPUs and a
//! semihosting exit. It shares the harness with x86_64 (`N passed, M failed`, exit
//! status 33/35). On CPU 0, before the other CPUs start, it initialises ksites
//! ([`ksites_init`]: the table `ksites-ld` embedded, the `kfuncs` ifuncs resolved and
//! every site patched through [`mmu::AliasPoker`]) inside the ifunc tests
//! ([`ifunc_tests`]), then runs the platform tests of [`tests`].
//!
//! * [`boot`]: `_start`, `_secondary_start`, the exception vectors (assembly).
//! * [`exceptions`]: the vectors' Rust side: IRQ, BRK route, caught faults, reports.
//! * [`mmu`]: 4 KiB-granule identity map, text RX / rodata R / data RW NX, the writable
//!   alias and its `TextPoker`.
//! * [`gic`], [`psci`], [`serial`], [`timer`], [`exit`]: the devices and firmware calls.
//! * [`smp`]: secondary start-up, `sync_cores` (an `isb` on every CPU through SGIs),
//!   jobs for the other CPUs.
//! * [`tests`], [`live_tests`]: the platform tests; [`ifunc_tests`]: boot patching.
//! * [`probe_tests`], [`smp_tests`], [`trap_tests`]: probes of every form, live, the
//!   SMP stress, the BRK route.

pub mod boot;
pub mod exceptions;
pub mod exit;
pub mod gic;
pub mod ifunc_tests;
pub mod live_tests;
pub mod mmu;
pub mod module_arena;
pub mod module_tests;
pub mod probe_tests;
pub mod psci;
pub mod serial;
pub mod smp;
pub mod smp_tests;
pub mod tests;
pub mod timer;
pub mod trap_tests;

use core::cell::UnsafeCell;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, Ordering};

use kernel_loader::format::Table;
use kernel_loader::patch::{self, InitReport};
use kernel_loader::{CpuFeatures, cell};

use crate::harness::{Harness, Msg};
use crate::{msg, println};

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
    ifunc_tests::run(&mut harness);
    tests::run(&mut harness);
    probe_tests::run(&mut harness);
    smp_tests::run(&mut harness);
    trap_tests::run(&mut harness);
    // After the probe tests: they check `enable` is refused before the BRK route is
    // declared, and register the kernel's probes first.
    module_tests::run(&mut harness);
    harness.finish()
}

/// What [`ksites_init`] did.
#[derive(Clone, Copy, Debug)]
pub struct Ksites {
    /// The image's table (validated against [`ksites_exec`]).
    pub table: Table<'static>,
    /// The features the resolvers received.
    pub features: CpuFeatures,
    /// The engine's report.
    pub report: InitReport,
    /// Synchronisation rounds the batch ran (`AliasPoker::rounds`).
    pub sync_rounds: u64,
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

/// This image's table, as `ksites-ld` embedded it.
pub fn ksites_table() -> Result<Table<'static>, Msg> {
    // SAFETY: the image was linked by `ksites-ld` (which runs `ksites embed`); the table
    // lies in `.ksites`, mapped read-only by `mmu::init`, and nothing writes it.
    unsafe { cell::image_table(&ksites_exec()) }.map_err(Msg::display)
}

/// The first call's result; written once by CPU 0, before the other CPUs start.
struct InitOnce(UnsafeCell<Option<Result<Ksites, Msg>>>);
// SAFETY: written only by the first `ksites_init` call (CPU 0, before SMP start, guarded
// by `INIT_STARTED`); read-only afterwards.
unsafe impl Sync for InitOnce {}
static INIT: InitOnce = InitOnce(UnsafeCell::new(None));
static INIT_STARTED: AtomicBool = AtomicBool::new(false);

/// Initialises ksites once: SIMD state enabled, features detected, the table read, every
/// ifunc resolved and every site patched through [`mmu::AliasPoker`] in one batch (one
/// synchronisation round), and one `ifunc-choice NAME IMPL` line printed per ifunc (as
/// the x86_64 kernel prints them; the xtask's judge compares them across CPU models).
/// Later calls return the first call's result. Call it on CPU 0 before the other CPUs
/// start (the boot-time `patch::init` contract: nobody else runs the text).
pub fn ksites_init() -> Result<Ksites, Msg> {
    if INIT_STARTED.swap(true, Ordering::SeqCst) {
        // SAFETY: the first call finished before any later one (CPU 0 only, no
        // preemption), and nothing writes `INIT` afterwards.
        return unsafe { (*INIT.0.get()).clone() }.unwrap_or(Err(msg!("ksites_init re-entered")));
    }
    let r = init_once();
    // SAFETY: the only write, from the first call (see `InitOnce`).
    unsafe { *INIT.0.get() = Some(r.clone()) };
    r
}

fn init_once() -> Result<Ksites, Msg> {
    let features = ksites_features();
    let table = ksites_table()?;
    let mut poker = mmu::AliasPoker::default();
    // SAFETY: CPU 0 alone runs (the other CPUs are not started); the table describes
    // this image and its resolvers are `ifunc!` adapters; the poker writes text only
    // through the alias, where the engine asks.
    let report = unsafe { patch::init(&table, &ksites_exec(), &features, &mut poker) }
        .map_err(Msg::display)?;
    println!(
        "init: {} ifuncs resolved, {} sites patched, {} out of reach, {} sync rounds",
        report.ifuncs, report.sites_patched, report.sites_out_of_reach, poker.rounds
    );
    for f in table.ifuncs() {
        let chosen = ifunc_tests::read_slot(f.slot);
        println!(
            "ifunc-choice {} {}",
            f.name,
            kfuncs::impl_name(chosen as usize)
        );
    }
    Ok(Ksites {
        table,
        features,
        report,
        sync_rounds: poker.rounds,
    })
}
