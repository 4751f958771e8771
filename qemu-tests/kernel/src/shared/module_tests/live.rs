//! Live toggling of a module probe (`rmod:hit`) while the other CPUs run its site: the
//! x86_64 kernel's `module_probe_live_toggle_while_aps_run_it`.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kernel_loader::module::Module;
use kernel_loader::probe::{self, ProbeId};

use super::{Fn3, sym};
use crate::arch::mmu::AliasPoker;
use crate::arch::{smp, timer};
use crate::harness::Msg;
use crate::{ensure, msg, println};

static AP_FIRE: AtomicU64 = AtomicU64::new(0);
static AP_STOP: AtomicBool = AtomicBool::new(false);
static AP_STARTED: AtomicU32 = AtomicU32::new(0);
static AP_CALLS: AtomicU64 = AtomicU64::new(0);
static AP_WRONG: AtomicU64 = AtomicU64::new(0);
static SMP_HITS: AtomicU64 = AtomicU64::new(0);
static SMP_BAD_ARGS: AtomicU64 = AtomicU64::new(0);

/// Counts hits; another CPU fires `rmod:hit(cpu, n, 7)` with `1 <= cpu < MAX_CPUS`.
fn smp_handler(_id: ProbeId, args: &[u64; 6]) {
    SMP_HITS.fetch_add(1, Ordering::SeqCst);
    let cpu_ok = args[0] >= 1 && args[0] < smp::MAX_CPUS as u64;
    if !cpu_ok || args[2] != 7 || args[3..] != [0, 0, 0] {
        SMP_BAD_ARGS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Another CPU's job: call `rmod_fire(cpu, n, 7)` until told to stop.
fn ap_worker(cpu: usize) {
    // SAFETY: AP_FIRE holds rmod's `rmod_fire`, and rmod stays loaded (and held) until
    // every CPU finished this job.
    let fire =
        unsafe { core::mem::transmute::<usize, Fn3>(AP_FIRE.load(Ordering::Acquire) as usize) };
    AP_STARTED.fetch_add(1, Ordering::AcqRel);
    let cpu = cpu as u64;
    let mut n = 0u64;
    while !AP_STOP.load(Ordering::Relaxed) {
        if fire(cpu, n, 7) != cpu.wrapping_add(n).wrapping_add(7) {
            AP_WRONG.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
    AP_CALLS.fetch_add(n, Ordering::AcqRel);
}

fn delay_us(us: u64) {
    let _ = timer::wait_until(us, || false);
}

/// With every other CPU calling `rmod_fire` in a loop, CPU 0 enables and disables
/// `rmod:hit` 100 times: every result stays right, every hit has its CPU's arguments,
/// and the handler and the registry count the same hits. rmod is held meanwhile.
pub(super) fn probe_toggle_while_aps_run(rmod: &Module<'_>) -> Result<(), Msg> {
    let hit = probe::lookup("rmod:hit").ok_or("rmod:hit not registered")?;
    AP_FIRE.store(sym(rmod, "rmod_fire")?, Ordering::Release);
    for c in [&AP_CALLS, &AP_WRONG, &SMP_HITS, &SMP_BAD_ARGS] {
        c.store(0, Ordering::SeqCst);
    }
    AP_STOP.store(false, Ordering::SeqCst);
    AP_STARTED.store(0, Ordering::SeqCst);
    let registry_before = probe::info(hit).map_or(0, |i| i.hits);
    rmod.hold();
    let round = smp::start_job(ap_worker);
    let aps = smp::online() - 1;
    let started = timer::wait_until(2_000_000, || AP_STARTED.load(Ordering::Acquire) >= aps);
    let mut poker = AliasPoker::default();
    let mut r = Ok(());
    for _ in 0..100 {
        // SAFETY: `smp_handler` is a plain function; the poker syncs every CPU, and the
        // single-store protocol covers CPUs running the site mid-patch.
        r = unsafe { probe::enable(hit, smp_handler, &mut poker) }
            .and_then(|()| {
                delay_us(300);
                // SAFETY: as above.
                unsafe { probe::disable(hit, &mut poker) }
            })
            .map_err(|e| msg!("toggling rmod:hit: {e}"));
        if r.is_err() {
            break;
        }
        delay_us(100);
    }
    AP_STOP.store(true, Ordering::SeqCst);
    let stopped = smp::wait_job(round, 4_000_000);
    rmod.release();
    r?;
    ensure!(stopped, "the other CPUs did not finish their job");
    ensure!(
        started,
        "only {} of {aps} CPUs started",
        AP_STARTED.load(Ordering::SeqCst)
    );
    let (calls, hits) = (
        AP_CALLS.load(Ordering::SeqCst),
        SMP_HITS.load(Ordering::SeqCst),
    );
    let registry = probe::info(hit).map_or(0, |i| i.hits) - registry_before;
    println!(
        "modules: rmod:hit toggled 100 times while {aps} CPUs called rmod_fire {calls} times: {hits} hits (registry {registry}), {} sync rounds",
        poker.rounds
    );
    let wrong = AP_WRONG.load(Ordering::SeqCst);
    ensure!(wrong == 0, "{wrong} wrong results");
    let bad = SMP_BAD_ARGS.load(Ordering::SeqCst);
    ensure!(bad == 0, "{bad} hits with wrong arguments");
    ensure!(calls > 0 && hits > 0, "calls {calls}, hits {hits}");
    ensure!(
        hits == registry,
        "handler counted {hits} hits, registry {registry}"
    );
    ensure!(!probe::is_enabled(hit), "rmod:hit left enabled");
    Ok(())
}
