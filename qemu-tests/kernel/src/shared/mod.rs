//! The test list every non-x86 platform of the test kernel runs (aarch64, riscv64): the
//! architecture-neutral bodies of the ifunc, probe, SMP, trap-route, live-patching,
//! W^X and module tests. They were the aarch64 kernel's, and keep its test names and
//! output lines; a platform runs them all with [`run`] from its `kmain`.
//!
//! # The platform interface
//!
//! The tests reach the platform only through these names under `crate::arch` (the
//! platform module, `src/arch/<arch>/mod.rs`, mapped by `main.rs`). Every platform
//! defines exactly these; anything else it has is its own business.
//!
//! * `crate::arch::ksites_exec() -> [Range<u64>; 1]`: the kernel text, what the table
//!   is validated against; `crate::arch::ksites_features() -> CpuFeatures`: enables the
//!   per-CPU state the implementations need (vector registers) and returns the
//!   features the resolvers get.
//! * `crate::arch::tests::run(&mut Harness)`: the platform's own tests; [`run`] runs
//!   them right after the ifunc tests, and they must start the other CPUs (the probe,
//!   SMP and module tests after them use every CPU `smp::online` reports). The shared
//!   W^X and live-patching tests ([`wx_tests`], [`live_tests`]) are called from there,
//!   under the platform's own test names (`<arch>_text_is_not_writable`, …).
//! * `smp`: `MAX_CPUS: usize`; `cpu_index() -> usize` (0 = the boot CPU);
//!   `online() -> u32`; `is_online(usize) -> bool`; `start_job(fn(usize)) -> u64` (every
//!   other online CPU runs the job once, with interrupts enabled, so a round's IPI wakes
//!   it from [`testing::wait_for_interrupt`]) and `wait_job(u64, micros: u64) -> bool`;
//!   `sync_cores()`: one synchronisation round (every online CPU serialises its
//!   instruction stream) and `ROUNDS: AtomicU64`, the rounds run so far.
//! * `timer`: `micros() -> u64` and `wait_until(micros: u64, impl FnMut() -> bool) ->
//!   bool` (polls until true or the time is up).
//! * `mmu`: `AliasPoker` (`Default`, `TextPoker` writing kernel and module text through
//!   a writable alias, `pub rounds: u64` counting its `sync_cores` calls);
//!   `layout()` with `text_start`, `text_end` (RX, never writable at its own address)
//!   and `patch_page` (the page [`testing`]'s patch-page function is on);
//!   `alias(addr) -> Option<u64>`; the module block: `module_range() -> Range<u64>`,
//!   `module_page_perms(addr) -> Option<(writable, executable)>`, `module_wx_pages() ->
//!   usize`, `unsafe protect_module(addr, len, ModulePerm) -> Result<(), &str>` (with
//!   `ModulePerm::ReadWrite`), `PAGE_SIZE: u64`, `ALIAS_OFFSET: u64`.
//! * `module_arena`: `ModuleArena` (unit struct; `ModuleMemory` over the module block,
//!   `used_pages() -> usize`) and `PAGES: usize`, the block's size in pages.
//! * `exceptions`: `unsafe try_store(addr, u32) -> Result<(), CaughtFault>` and `unsafe
//!   try_call(addr) -> Result<u64, CaughtFault>` (CPU 0: a fault is caught and returned,
//!   `CaughtFault: Copy + Debug`); every CPU routes the probe trap (`brk`/`ebreak`) to
//!   `kernel_loader::probe::handle_int3`'s hook and writes the frame back.
//! * `testing`: the instruction-level facts the tests need, written with the tests
//!   (aarch64: `src/arch/aarch64/testing.rs`; its doc lists each item: code that returns
//!   an immediate, fault classification, `translates`, the trap-route drivers, the
//!   CPU-model expectations of the ifunc choices, the module's own-ifunc tags and the
//!   platform's extra module tests).
//!
//! The image's C probe functions (`c/cprobes.c`) and the `kfuncs` crate are linked in by
//! the platform's build, and `$OUT_DIR/modules.rs` defines `RMOD`, `CMOD`, `BADMOD` and
//! `FARMOD` (`build.rs`).

pub mod ifunc_tests;
pub mod live_tests;
pub mod module_arena;
pub mod module_tests;
pub mod probe_tests;
pub mod smp_tests;
pub mod trap_tests;
pub mod wx_tests;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use kernel_loader::format::Table;
use kernel_loader::patch::{self, InitReport};
use kernel_loader::{CpuFeatures, cell};

use crate::arch::{ksites_exec, ksites_features, mmu};
use crate::harness::{Harness, Msg};
use crate::{msg, println};

pub(crate) use crate::arch::testing;

/// Runs the whole list on CPU 0, in boot order: the ifunc tests (boot patching, one
/// CPU), the platform's tests (which start the other CPUs), the probe tests, the SMP
/// tests, the trap-route tests, then the module tests (after the probe tests: they check
/// `enable` is refused before the trap route is declared, and register the kernel's
/// probes first).
pub fn run(h: &mut Harness) {
    ifunc_tests::run(h);
    crate::arch::tests::run(h);
    probe_tests::run(h);
    smp_tests::run(h);
    trap_tests::run(h);
    module_tests::run(h);
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

/// This image's table, as `ksites-ld` embedded it.
pub fn ksites_table() -> Result<Table<'static>, Msg> {
    // SAFETY: the image was linked by `ksites-ld` (which runs `ksites embed`); the table
    // lies in `.ksites`, mapped read-only by the platform's MMU setup, and nothing
    // writes it.
    unsafe { cell::image_table(&ksites_exec()) }.map_err(Msg::display)
}

/// The first call's result; written once by CPU 0, before the other CPUs start.
struct InitOnce(UnsafeCell<Option<Result<Ksites, Msg>>>);
// SAFETY: written only by the first `ksites_init` call (CPU 0, before SMP start, guarded
// by `INIT_STARTED`); read-only afterwards.
unsafe impl Sync for InitOnce {}
static INIT: InitOnce = InitOnce(UnsafeCell::new(None));
static INIT_STARTED: AtomicBool = AtomicBool::new(false);

/// Initialises ksites once: vector state enabled, features detected, the table read,
/// every ifunc resolved and every site patched through `mmu::AliasPoker` in one batch
/// (one synchronisation round), and one `ifunc-choice NAME IMPL` line printed per ifunc
/// (as the x86_64 kernel prints them; the xtask's judge compares them across CPU
/// models). Later calls return the first call's result. Call it on CPU 0 before the
/// other CPUs start (the boot-time `patch::init` contract: nobody else runs the text).
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
