//! SMP tests of the non-x86 kernels, mirroring the x86_64 kernel's `smp_tests.rs` by
//! name: live probe patching holds up while three CPUs run every probe site
//! (`smp_stress_live_patching`), `disable` and a live handler change wait for handlers
//! still running on other CPUs (`smp_drain_waits_for_handlers_on_aps`), and text is
//! never writable through its own mapping on any CPU (`smp_text_never_writable`).
//!
//! The other CPUs run *workers* ([`worker`]): passes over every probe site of the test
//! image (Rust `probe!`/`probe_enabled!`, C call, tail, is-enabled, is-enabled tail and
//! guarded sites, the `kfuncs` crate's site) and over ifunc'd functions, checking every
//! result. Between passes a worker waits for an
//! interrupt (`testing::wait_for_interrupt`): QEMU runs each CPU on a host thread, and four busy CPUs on a
//! two-core host would make every synchronisation round wait for time slices. Each
//! batch's round (an IPI) wakes every worker, so workers run the sites right while the
//! next batch stores its instructions.
//!
//! Before each call a worker tells the probe handler, through its per-CPU slot, which
//! probe and arguments the call may fire with; the handler counts per CPU and checks
//! them; the worker counts the calls it saw fire (the handler's per-CPU count moved by
//! exactly 0 or 1). At the end three independent counts must agree exactly: the
//! handler's (per probe too), the registry's hits, and the sum of what the workers
//! observed — as on x86_64.
//!
//! **A handler never outlives the disable of its probe.** While `ctest:tail` is
//! enabled its site is the probe trap, and its handler runs inside the loader's trap
//! emulation
//! with IRQs masked; there it lingers and checks no disable of its probe returned
//! meanwhile. Batches of other probes wait in the loader's drain for such CPUs
//! (`probe::int3_drain_waits`).
//!
//! With one CPU these tests are skipped (one `ok` line says so).

use core::hint::black_box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use kernel_loader::format::Table;
use kernel_loader::patch::TextPoker;
use kernel_loader::probe::{self, ProbeId};

use super::probe_tests::{self as pt, Poker, WX};
use super::testing;
use crate::arch::smp::{self, MAX_CPUS};
use crate::arch::timer;
use crate::harness::{Harness, Msg};
use crate::{ensure, msg, println};

/// Batches (each one enable or one disable) CPU 0 runs in the stress test: 10,008
/// enables and 10,008 disables, over [`PROBES`] in turn (2,502 per probe, an even
/// number, so every probe ends disabled).
const STRESS_BATCHES: usize = 20_016;

/// The probes the workers fire, by index into [`IDS`].
const PROBES: [&str; 8] = [
    "rtest:zero",
    "rtest:one",
    "rtest:six",
    "ctest:zero",
    "ctest:one",
    "ctest:six",
    "ctest:tail",
    "kfuncs:bitmap",
];
const _: () = assert!(
    STRESS_BATCHES.is_multiple_of(2 * PROBES.len()),
    "every probe must be flipped an even number of times"
);
const R_ZERO: usize = 0;
const R_ONE: usize = 1;
const R_SIX: usize = 2;
const C_ZERO: usize = 3;
const C_ONE: usize = 4;
const C_SIX: usize = 5;
const C_TAIL: usize = 6;
const BITMAP: usize = 7;
/// "No probe may fire": the expected probe of an is-enabled check or an ifunc call.
const NONE: u32 = u32::MAX;

static IDS: [AtomicU32; PROBES.len()] = [const { AtomicU32::new(NONE) }; PROBES.len()];

fn pid(k: usize) -> u32 {
    IDS[k].load(Ordering::Relaxed)
}

/// What a worker checks, for its first error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Check {
    Ok = 0,
    RZero,
    ROne,
    ROneAgain,
    RSix,
    COne,
    CSix,
    COneEnabled,
    Bitmap,
    Popcount,
    Hamming,
    Crc32c,
    FiredTwice,
    FiredWhenNothingMay,
}

const CHECK_NAMES: [&str; 14] = [
    "ok",
    "r_zero result",
    "r_one result",
    "r_one_again result",
    "r_six result",
    "c_fire_one result",
    "c_fire_six result",
    "c_one_enabled not 0 or 1",
    "bitmap_weight result",
    "popcount result",
    "hamming result",
    "crc32c_of result",
    "one call fired the handler twice",
    "a call that may not fire did",
];

/// A CPU's slots: what its next call may fire, what the handler saw, what it counted.
struct CpuSlot {
    expect_id: AtomicU32,
    expect_n: AtomicUsize,
    expect: [AtomicU64; 6],
    /// Handler calls on this CPU.
    fired: AtomicU64,
    /// Calls this CPU saw fire.
    observed: AtomicU64,
    /// Site-function calls made.
    calls: AtomicU64,
    loops: AtomicU64,
    error: AtomicU32,
    error_x: AtomicU64,
}

static SLOTS: [CpuSlot; MAX_CPUS] = [const {
    CpuSlot {
        expect_id: AtomicU32::new(NONE),
        expect_n: AtomicUsize::new(0),
        expect: [const { AtomicU64::new(0) }; 6],
        fired: AtomicU64::new(0),
        observed: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        loops: AtomicU64::new(0),
        error: AtomicU32::new(0),
        error_x: AtomicU64::new(0),
    }
}; MAX_CPUS];

static STOP: AtomicBool = AtomicBool::new(false);
static STARTED: AtomicUsize = AtomicUsize::new(0);
static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);
static PROBE_CALLS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static CPU0_FIRES: AtomicU64 = AtomicU64::new(0);
static MISMATCHES: AtomicU64 = AtomicU64::new(0);
static FIRST_MISMATCH: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Per probe: disables that returned (bumped by CPU 0 after `probe::disable`).
static DISABLED: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
/// Tail-handler runs inside the trap emulation that checked their probe's disables.
static TAIL_HOLDS: AtomicU64 = AtomicU64::new(0);
/// ... and saw a disable of their probe return while they ran.
static TAIL_OUTLIVED: AtomicU64 = AtomicU64::new(0);

fn reset_counters() {
    for s in &SLOTS {
        s.expect_id.store(NONE, Ordering::Relaxed);
        s.fired.store(0, Ordering::Relaxed);
        s.observed.store(0, Ordering::Relaxed);
        s.calls.store(0, Ordering::Relaxed);
        s.loops.store(0, Ordering::Relaxed);
        s.error.store(0, Ordering::Relaxed);
    }
    for c in &PROBE_CALLS {
        c.store(0, Ordering::Relaxed);
    }
    for a in [
        &HANDLER_CALLS,
        &CPU0_FIRES,
        &MISMATCHES,
        &TAIL_HOLDS,
        &TAIL_OUTLIVED,
    ] {
        a.store(0, Ordering::Relaxed);
    }
}

/// Spins for a while.
fn linger(iterations: u32) {
    for i in 0..iterations {
        black_box(i);
    }
}

/// The probe handler of these tests. Runs on the CPU that ran the site.
fn handler(id: ProbeId, args: &[u64; 6]) {
    let cpu = smp::cpu_index();
    HANDLER_CALLS.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = PROBE_CALLS.get(id.0 as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    if cpu == 0 {
        CPU0_FIRES.fetch_add(1, Ordering::Relaxed);
    }
    let slot = &SLOTS[cpu];
    slot.fired.fetch_add(1, Ordering::Relaxed);
    let n = slot.expect_n.load(Ordering::Relaxed);
    let want_id = slot.expect_id.load(Ordering::Relaxed);
    let args_ok = (0..n).all(|i| args[i] == slot.expect[i].load(Ordering::Relaxed));
    if (want_id != id.0 || !args_ok) && MISMATCHES.fetch_add(1, Ordering::Relaxed) == 0 {
        for (a, v) in
            FIRST_MISMATCH
                .iter()
                .zip([cpu as u64, u64::from(id.0), u64::from(want_id), args[0]])
        {
            a.store(v, Ordering::Relaxed);
        }
    }
    // An enabled tail site: this CPU is inside the loader's trap emulation (IRQs
    // masked). Stay a while; no disable of this probe may return meanwhile.
    if pt::in_trap_for(cpu) == Some(id)
        && let Some(d) = DISABLED.get(id.0 as usize)
    {
        let g = d.load(Ordering::SeqCst);
        linger(3_000);
        TAIL_HOLDS.fetch_add(1, Ordering::Relaxed);
        if d.load(Ordering::SeqCst) != g {
            TAIL_OUTLIVED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn fail(slot: &CpuSlot, what: Check, x: u64) {
    if slot
        .error
        .compare_exchange(0, what as u32, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        slot.error_x.store(x, Ordering::Relaxed);
    }
}

/// Makes one call that may fire probe `k` (or nothing, for `None`) with `args`;
/// returns how often it fired (0 or 1) and records a failed `ok`.
#[inline(always)]
fn call(
    slot: &CpuSlot,
    k: Option<usize>,
    args: &[u64],
    what: Check,
    x: u64,
    ok: impl FnOnce() -> bool,
) -> u64 {
    slot.expect_id.store(k.map_or(NONE, pid), Ordering::Relaxed);
    slot.expect_n.store(args.len(), Ordering::Relaxed);
    for (e, &a) in slot.expect.iter().zip(args) {
        e.store(a, Ordering::Relaxed);
    }
    let before = slot.fired.load(Ordering::Relaxed);
    if !ok() {
        fail(slot, what, x);
    }
    let fired = slot.fired.load(Ordering::Relaxed) - before;
    if fired > 1 {
        fail(slot, Check::FiredTwice, x);
    } else if fired == 1 && k.is_none() {
        fail(slot, Check::FiredWhenNothingMay, x);
    }
    fired
}

/// Safe wrappers of the C probe functions (c/cprobes.c).
mod c {
    use super::pt;

    pub(super) fn fire_zero() -> u64 {
        // SAFETY: a plain C function (it increments a global).
        unsafe { pt::c_fire_zero() }
    }

    pub(super) fn fire_one(x: u64) -> u64 {
        // SAFETY: a plain C function with an integer argument.
        unsafe { pt::c_fire_one(x) }
    }

    pub(super) fn fire_six(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
        // SAFETY: a plain C function with integer arguments.
        unsafe { pt::c_fire_six(a, b, c, d, e, f) }
    }

    pub(super) fn guarded(x: u64) -> u64 {
        // SAFETY: a plain C function with an integer argument (it reads a global).
        unsafe { pt::c_guarded(x) }
    }

    pub(super) fn fire_tail(x: u64) {
        // SAFETY: a plain C function with an integer argument (it adds to a global).
        unsafe { pt::c_fire_tail(x) }
    }
}

/// Calls per [`one_pass`].
const CALLS_PER_PASS: u64 = 15;

/// One pass over every probe site; returns how many calls fired.
fn one_pass(slot: &CpuSlot, x: u64) -> u64 {
    let mut fired = 0;
    // The tail site first: right after the round that woke this CPU.
    fired += call(slot, Some(C_TAIL), &[x], Check::Ok, x, || {
        c::fire_tail(x);
        true
    });
    fired += call(slot, Some(R_ZERO), &[], Check::RZero, x, || {
        pt::r_zero() == 1
    });
    fired += call(slot, Some(R_ONE), &[x], Check::ROne, x, || {
        pt::r_one(x) == x + 1
    });
    fired += call(slot, Some(R_ONE), &[x * 10], Check::ROneAgain, x, || {
        pt::r_one_again(x) == x + 2
    });
    let six = [x, 2, 4, 8, 16, x + 1];
    fired += call(slot, Some(R_SIX), &six, Check::RSix, x, || {
        pt::r_six(six[0], six[1], six[2], six[3], six[4], six[5])
            == six.iter().fold(0, |a, b| a ^ b)
    });
    fired += call(slot, None, &[], Check::Ok, x, || {
        black_box(pt::r_enabled());
        true
    });
    // c_fire_zero's and c_guarded's results depend on c_work, which other CPUs change.
    fired += call(slot, Some(C_ZERO), &[], Check::Ok, x, || {
        black_box(c::fire_zero());
        true
    });
    fired += call(slot, Some(C_ONE), &[x], Check::COne, x, || {
        c::fire_one(x) == x + 1
    });
    let six = [1, 2, 3, 4, 5, x];
    fired += call(slot, Some(C_SIX), &six, Check::CSix, x, || {
        c::fire_six(1, 2, 3, 4, 5, x) == 15 + x
    });
    let g = [x, 2 * x, 3 * x, 4 * x, 5 * x, 6 * x];
    fired += call(slot, Some(C_SIX), &g, Check::Ok, x, || {
        black_box(c::guarded(x));
        true
    });
    fired += call(slot, None, &[], Check::COneEnabled, x, || {
        matches!(pt::c_one_on(), 0 | 1)
    });
    let words = [x, !x, 0xff];
    fired += call(slot, Some(BITMAP), &[3], Check::Bitmap, x, || {
        kfuncs::bitmap_weight(&words) == 72
    });
    // ifunc'd functions, patched at boot: no probe may fire.
    let y = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    fired += call(slot, None, &[], Check::Popcount, x, || {
        kfuncs::popcount(y) == y.count_ones() && kfuncs::popcount_tail(y) == y.count_ones()
    });
    fired += call(slot, None, &[], Check::Hamming, x, || {
        kfuncs::hamming(y, !y) == 64
    });
    fired += call(slot, None, &[], Check::Crc32c, x, || {
        kfuncs::crc32c_of(CRC_DATA) == EXPECT_CRC.load(Ordering::Relaxed)
    });
    fired
}

const CRC_DATA: &[u8] = b"ksites: live patching on every CPU";
/// `crc32c_of(CRC_DATA)` as CPU 0 computed it.
static EXPECT_CRC: AtomicU32 = AtomicU32::new(0);

/// Waits for an interrupt (a synchronisation round's IPI); IRQs are unmasked in jobs.
fn nap() {
    testing::wait_for_interrupt();
}

/// A worker's job: run [`one_pass`] until told to stop, then publish its counts.
fn worker(cpu: usize) {
    let slot = &SLOTS[cpu];
    STARTED.fetch_add(1, Ordering::AcqRel);
    let (mut loops, mut observed) = (0u64, 0u64);
    while !STOP.load(Ordering::Relaxed) {
        observed += one_pass(slot, loops * 8 + cpu as u64);
        loops += 1;
        nap();
    }
    slot.expect_id.store(NONE, Ordering::Relaxed);
    slot.loops.store(loops, Ordering::Relaxed);
    slot.calls.store(loops * CALLS_PER_PASS, Ordering::Relaxed);
    slot.observed.store(observed, Ordering::Release);
}

static JOB: AtomicU64 = AtomicU64::new(0);
static PARK_STOP: AtomicBool = AtomicBool::new(false);
static PARK_JOB: AtomicU64 = AtomicU64::new(0);

/// A job: sleep in `nap` (acknowledging every synchronisation round) until
/// [`unpark_others`].
fn park_job(_cpu: usize) {
    while !PARK_STOP.load(Ordering::Acquire) {
        nap();
    }
}

/// Parks every other CPU in `nap` (a platform's idle loop may spin, e.g. aarch64's on
/// `wfe`, which QEMU's TCG does not sleep in): a synchronisation round then costs an
/// IPI, not a wait for time slices of spinning vCPU threads. CPU 0 only.
pub(crate) fn park_others() {
    if smp::online() > 1 {
        PARK_STOP.store(false, Ordering::SeqCst);
        PARK_JOB.store(smp::start_job(park_job), Ordering::SeqCst);
    }
}

/// Ends [`park_others`]: wakes the parked CPUs (a round each millisecond) until they
/// are back in their idle loop. Returns whether they all were within 5 s.
pub(crate) fn unpark_others() -> bool {
    PARK_STOP.store(true, Ordering::SeqCst);
    wake_until_done(PARK_JOB.load(Ordering::SeqCst))
}

/// Runs a round each millisecond until every other CPU finished job `job` (≤ 5 s).
fn wake_until_done(job: u64) -> bool {
    smp::online() < 2
        || (0..5_000).any(|_| {
            smp::sync_cores();
            smp::wait_job(job, 1_000)
        })
}

/// Starts the workers and waits until every other CPU runs one.
fn start_workers() -> Result<(), Msg> {
    STOP.store(false, Ordering::SeqCst);
    STARTED.store(0, Ordering::SeqCst);
    JOB.store(smp::start_job(worker), Ordering::SeqCst);
    let others = smp::online() as usize - 1;
    if !timer::wait_until(5_000_000, || STARTED.load(Ordering::Acquire) >= others) {
        stop_workers()?;
        return Err(msg!(
            "only {} of {others} CPUs started their worker",
            STARTED.load(Ordering::Relaxed)
        ));
    }
    Ok(())
}

/// Tells the workers to stop and wakes them (a round each millisecond) until they did.
fn stop_workers() -> Result<(), Msg> {
    STOP.store(true, Ordering::SeqCst);
    ensure!(
        wake_until_done(JOB.load(Ordering::SeqCst)),
        "a CPU did not stop its worker"
    );
    Ok(())
}

/// What the workers and the handler counted, checked for consistency.
struct Tally {
    handler: u64,
    observed: u64,
    registry: u64,
    calls: u64,
    loops: [u64; MAX_CPUS],
}

fn registry_hits() -> [u64; 64] {
    let mut h = [0u64; 64];
    for p in probe::matching("*") {
        if let (Some(slot), Some(i)) = (h.get_mut(p.0 as usize), probe::info(p)) {
            *slot = i.hits;
        }
    }
    h
}

/// After the workers stopped: no worker error, no argument mismatch, nothing fired on
/// CPU 0, the handler's count = the registry's hits (per probe too) = what the workers
/// saw.
fn tally(hits0: &[u64; 64]) -> Result<Tally, Msg> {
    let n = smp::online() as usize;
    let mut t = Tally {
        handler: HANDLER_CALLS.load(Ordering::SeqCst),
        observed: 0,
        registry: 0,
        calls: 0,
        loops: [0; MAX_CPUS],
    };
    for (cpu, s) in SLOTS.iter().enumerate().take(n).skip(1) {
        let e = s.error.load(Ordering::SeqCst);
        ensure!(
            e == 0,
            "CPU {cpu}: {} (x = {})",
            CHECK_NAMES.get(e as usize).unwrap_or(&"?"),
            s.error_x.load(Ordering::Relaxed)
        );
        t.observed += s.observed.load(Ordering::Acquire);
        t.calls += s.calls.load(Ordering::Relaxed);
        t.loops[cpu] = s.loops.load(Ordering::Relaxed);
        ensure!(t.loops[cpu] > 0, "CPU {cpu} never completed a pass");
    }
    let m = MISMATCHES.load(Ordering::SeqCst);
    ensure!(
        m == 0,
        "{m} handler calls with unexpected probe/arguments; first: cpu {} probe {} \
         (expected {}) arg0 {}",
        FIRST_MISMATCH[0].load(Ordering::Relaxed),
        FIRST_MISMATCH[1].load(Ordering::Relaxed),
        FIRST_MISMATCH[2].load(Ordering::Relaxed) as u32 as i64,
        FIRST_MISMATCH[3].load(Ordering::Relaxed)
    );
    ensure!(
        CPU0_FIRES.load(Ordering::SeqCst) == 0,
        "the handler ran on CPU 0"
    );
    let hits = registry_hits();
    for (i, (&now, &then)) in hits.iter().zip(hits0).enumerate() {
        let d = now - then;
        t.registry += d;
        let calls = PROBE_CALLS[i].load(Ordering::SeqCst);
        ensure!(
            d == calls,
            "probe {i}: registry counted {d} hits, the handler {calls} calls"
        );
    }
    ensure!(
        t.handler == t.registry && t.handler == t.observed,
        "hits: handler {}, registry {}, observed by the workers {}",
        t.handler,
        t.registry,
        t.observed
    );
    let outlived = TAIL_OUTLIVED.load(Ordering::SeqCst);
    ensure!(
        outlived == 0,
        "{outlived} handler runs inside the trap emulation outlived a disable of their probe"
    );
    Ok(t)
}

/// Every probe is in the state `enabled` says and every site holds its bytes.
fn check_all_sites(t: &Table<'_>, enabled: &[ProbeId]) -> Result<(), Msg> {
    for p in probe::matching("*") {
        ensure!(
            probe::is_enabled(p) == enabled.contains(&p),
            "probe {} enabled = {}",
            p.0,
            probe::is_enabled(p)
        );
    }
    pt::check_sites(t, enabled)
}

/// Enables (with [`handler`]) or disables `p` through `poker`; a disable is counted in
/// [`DISABLED`] once it returned.
fn set(p: ProbeId, on: bool, poker: &mut impl TextPoker) -> Result<(), Msg> {
    // SAFETY: the trap route is declared (probe tests); the poker writes through the
    // alias and synchronises every online CPU; only CPU 0 patches.
    let r = unsafe {
        if on {
            probe::enable(p, handler, poker)
        } else {
            probe::disable(p, poker)
        }
    };
    if !on && let Some(d) = DISABLED.get(p.0 as usize) {
        d.fetch_add(1, Ordering::SeqCst);
    }
    r.map_err(|e| {
        msg!(
            "{} probe {}: {e}",
            if on { "enable" } else { "disable" },
            p.0
        )
    })
}

fn ids() -> Result<[ProbeId; PROBES.len()], Msg> {
    let mut out = [ProbeId(0); PROBES.len()];
    for (k, spec) in PROBES.iter().enumerate() {
        let p = pt::id(spec)?;
        IDS[k].store(p.0, Ordering::Relaxed);
        out[k] = p;
    }
    Ok(out)
}

fn traps_on_others() -> u64 {
    (1..smp::online() as usize).map(pt::traps_on_cpu).sum()
}

fn probe_calls(k: usize) -> u64 {
    PROBE_CALLS[pid(k) as usize].load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// Tests.

fn stress(t: &Table<'_>) -> Result<(), Msg> {
    let ids = ids()?;
    check_all_sites(t, &[])?;
    reset_counters();
    let hits0 = registry_hits();
    let (drain0, traps0, writes0) = (
        probe::int3_drain_waits(),
        traps_on_others(),
        WX.writes.load(Ordering::Relaxed),
    );
    start_workers()?;
    let rounds0 = smp::ROUNDS.load(Ordering::SeqCst);
    let t0 = timer::micros();
    let mut enables = 0usize;
    let mut run = || -> Result<(), Msg> {
        for b in 0..STRESS_BATCHES {
            let p = ids[b % ids.len()];
            let on = !probe::is_enabled(p);
            let mut poker = Poker::default();
            set(p, on, &mut poker)?;
            ensure!(
                poker.rounds == 1,
                "batch {b}: {} sync rounds, expected 1",
                poker.rounds
            );
            enables += usize::from(on);
        }
        Ok(())
    };
    let r = run();
    let ms = (timer::micros() - t0) / 1000;
    let rounds = smp::ROUNDS.load(Ordering::SeqCst) - rounds0;
    stop_workers()?;
    r?;
    let tally = tally(&hits0)?;
    // Every probe was flipped an even number of times: all are disabled; check that,
    // then leave three enabled and check again.
    check_all_sites(t, &[])?;
    let ends_on = [ids[R_ONE], ids[C_SIX], ids[C_TAIL]];
    for &p in &ends_on {
        set(p, true, &mut Poker::default())?;
    }
    check_all_sites(t, &ends_on)?;
    for &p in &ends_on {
        set(p, false, &mut Poker::default())?;
    }
    check_all_sites(t, &[])?;

    let per_probe: [u64; PROBES.len()] = core::array::from_fn(probe_calls);
    ensure!(
        per_probe.iter().all(|&c| c > 0),
        "not every probe fired: {per_probe:?}"
    );
    ensure!(
        rounds == STRESS_BATCHES as u64,
        "{rounds} sync rounds for {STRESS_BATCHES} batches"
    );
    let traps = traps_on_others() - traps0;
    let drains = probe::int3_drain_waits() - drain0;
    let others = smp::online() as usize - 1;
    println!(
        "smp stress: CPU 0 ran {STRESS_BATCHES} batches ({enables} enables, {} disables) in \
         {ms} ms while {others} CPUs made {} calls ({:?} passes)",
        STRESS_BATCHES - enables,
        tally.calls,
        &tally.loops[1..=others]
    );
    println!(
        "smp stress: hits: handler {} = registry {} = observed by the callers {}; per probe \
         {per_probe:?} ({PROBES:?})",
        tally.handler, tally.registry, tally.observed,
    );
    println!(
        "smp stress: {rounds} sync rounds (1 per batch); {traps} probe traps on the other CPUs \
         (enabled tail site), {} tail-handler runs checked inside the trap, 0 outlived a \
         disable; {drains} batches waited in the drain for a CPU inside handle_int3; {} \
         alias writes",
        TAIL_HOLDS.load(Ordering::Relaxed),
        WX.writes.load(Ordering::Relaxed) - writes0
    );
    ensure!(
        traps > 0 && TAIL_HOLDS.load(Ordering::Relaxed) > 0,
        "no CPU ever trapped on the enabled tail site"
    );
    ensure!(enables >= 10_000 && STRESS_BATCHES - enables >= 10_000);
    Ok(())
}

/// Per CPU: the probe sites writable at their own address, and those checked, as a
/// job on that CPU found them (`testing::translates`).
static WRITABLE_SITES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CHECKED_SITES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn wx_job(cpu: usize) {
    let (mut checked, mut writable) = (0, 0);
    if let Some(t) = pt::table() {
        for s in t.probe_sites() {
            checked += 1;
            if testing::translates(s.addr, true) || !testing::translates(s.addr, false) {
                writable += 1;
            }
        }
    }
    WRITABLE_SITES[cpu].store(writable, Ordering::Release);
    CHECKED_SITES[cpu].store(checked, Ordering::Release);
}

fn text_never_writable(t: &Table<'_>) -> Result<(), Msg> {
    pt::text_still_read_only(t)?;
    for c in &CHECKED_SITES {
        c.store(0, Ordering::SeqCst);
    }
    let job = smp::start_job(wx_job);
    ensure!(smp::wait_job(job, 1_000_000), "a CPU did not run its job");
    wx_job(0);
    let sites = t.probe_site_count() as u64;
    for cpu in 0..smp::online() as usize {
        let (checked, writable) = (
            CHECKED_SITES[cpu].load(Ordering::Acquire),
            WRITABLE_SITES[cpu].load(Ordering::Acquire),
        );
        ensure!(
            checked == sites && writable == 0,
            "CPU {cpu}: {writable} of {checked} probe sites writable at their own address"
        );
    }
    println!(
        "smp: text never writable: {sites} probe sites read-only at their own address on \
         each of {} CPUs; every write went through the alias",
        smp::online()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The drain: disable and a live handler change wait for CPUs inside the old handler.

/// Per CPU: inside [`drain_a`] / [`drain_b`].
static IN_A: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static IN_B: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Bumped by CPU 0 when a change that retired [`drain_a`] / [`drain_b`] returned.
static RETIRED_A: AtomicU64 = AtomicU64::new(0);
static RETIRED_B: AtomicU64 = AtomicU64::new(0);
/// Handler runs that were still running when the change that retired them returned.
static DRAIN_OUTLIVED: AtomicU64 = AtomicU64::new(0);
static DRAIN_RUNS: AtomicU64 = AtomicU64::new(0);
static DRAIN_STOP: AtomicBool = AtomicBool::new(false);
/// Calls of `rtest:one`'s function by [`drain_worker`]s.
static DRAIN_CALLS: AtomicU64 = AtomicU64::new(0);

/// Lingers (longer than a sync round) with this CPU's flag in `inside` set, and counts
/// a run that the change retiring it (`retired` bumped) did not wait for.
fn drain_linger(inside: &[AtomicU32; MAX_CPUS], retired: &AtomicU64) {
    let cpu = smp::cpu_index();
    let g = retired.load(Ordering::SeqCst);
    inside[cpu].store(1, Ordering::SeqCst);
    DRAIN_RUNS.fetch_add(1, Ordering::Relaxed);
    linger(1_000_000);
    inside[cpu].store(0, Ordering::SeqCst);
    if retired.load(Ordering::SeqCst) != g {
        DRAIN_OUTLIVED.fetch_add(1, Ordering::Relaxed);
    }
}

fn drain_a(_: ProbeId, _: &[u64; 6]) {
    drain_linger(&IN_A, &RETIRED_A);
}

fn drain_b(_: ProbeId, _: &[u64; 6]) {
    drain_linger(&IN_B, &RETIRED_B);
}

/// A job: fire `rtest:one` until told to stop.
fn drain_worker(cpu: usize) {
    let mut x = cpu as u64;
    while !DRAIN_STOP.load(Ordering::Relaxed) {
        x = black_box(pt::r_one(x));
        DRAIN_CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

fn any_inside(inside: &[AtomicU32; MAX_CPUS]) -> bool {
    inside.iter().any(|f| f.load(Ordering::SeqCst) != 0)
}

/// Rewrites of sites with the instruction they already hold ([`wait_inside`]).
static NUDGES: AtomicU64 = AtomicU64::new(0);

/// Waits (up to two seconds) until some CPU is inside the handler of `inside`.
///
/// QEMU's multi-threaded TCG can keep running a translation of a site made while CPU 0
/// stored the site's new instruction (the platform's `live_tests` count such calls):
/// a worker then keeps running the old form. After each 20 ms without a CPU inside,
/// this rewrites every site of `p` with the instruction it holds (a no-op for the
/// architecture, which makes TCG drop its translations) and runs a round; such nudges
/// are counted and printed.
fn wait_inside(inside: &[AtomicU32; MAX_CPUS], p: ProbeId, poker: &mut Poker) -> Result<(), Msg> {
    for _ in 0..100 {
        if timer::wait_until(20_000, || any_inside(inside)) {
            return Ok(());
        }
        let Some(t) = pt::table() else { break };
        for s in t.probe_sites().filter(|s| s.probe == p.0) {
            let now = pt::read4(s.addr);
            // SAFETY: a validated site of `p`, rewritten with the instruction it holds
            // (one aligned store), so no CPU can observe a change.
            unsafe { poker.write(s.addr, &now) }.map_err(Msg::display)?;
        }
        poker.sync_cores();
        NUDGES.fetch_add(1, Ordering::Relaxed);
    }
    Err(msg!(
        "no CPU ran the handler within two seconds ({} handler runs, {} calls by the workers)",
        DRAIN_RUNS.load(Ordering::SeqCst),
        DRAIN_CALLS.load(Ordering::SeqCst)
    ))
}

/// While the other CPUs fire `rtest:one` and its handler lingers: a disable, and a
/// live handler change, return only once no CPU runs the old handler (each caught with
/// a CPU inside it), and no handler run outlives the change that retired it. The
/// loader's per-CPU drain is what waits: the batch's round ends long before the
/// handler does.
fn drain_waits_for_aps(poker: &mut Poker) -> Result<(), Msg> {
    const ROUNDS: usize = 8;
    let p = pt::id("rtest:one")?;
    ensure!(
        !probe::is_enabled(p),
        "rtest:one is enabled before the test"
    );
    DRAIN_OUTLIVED.store(0, Ordering::SeqCst);
    DRAIN_RUNS.store(0, Ordering::SeqCst);
    DRAIN_STOP.store(false, Ordering::SeqCst);
    let hits0 = probe::info(p).map_or(0, |i| i.hits);
    let job = smp::start_job(drain_worker);
    let result = (|| {
        for _ in 0..ROUNDS {
            // SAFETY: as in `set`.
            unsafe { probe::enable(p, drain_a, poker) }.map_err(Msg::display)?;
            wait_inside(&IN_A, p, poker)?;
            // A live handler change: drain_a retires.
            // SAFETY: as above.
            unsafe { probe::enable(p, drain_b, poker) }.map_err(Msg::display)?;
            RETIRED_A.fetch_add(1, Ordering::SeqCst);
            ensure!(
                !any_inside(&IN_A),
                "a handler change returned while a CPU ran the old handler"
            );
            wait_inside(&IN_B, p, poker)?;
            // SAFETY: as above.
            unsafe { probe::disable(p, poker) }.map_err(Msg::display)?;
            RETIRED_B.fetch_add(1, Ordering::SeqCst);
            ensure!(
                !any_inside(&IN_B),
                "disable returned while a CPU ran the handler"
            );
        }
        Ok(())
    })();
    DRAIN_STOP.store(true, Ordering::SeqCst);
    ensure!(smp::wait_job(job, 4_000_000), "a CPU did not stop");
    if probe::is_enabled(p) {
        // (A failed round: leave the probe disabled for the tests after this one.)
        // SAFETY: as above.
        unsafe { probe::disable(p, poker) }.map_err(Msg::display)?;
    }
    result?;
    let outlived = DRAIN_OUTLIVED.load(Ordering::SeqCst);
    ensure!(
        outlived == 0,
        "{outlived} handler runs outlived the change that retired them"
    );
    let runs = DRAIN_RUNS.load(Ordering::SeqCst);
    let hits = probe::info(p).map_or(0, |i| i.hits) - hits0;
    ensure!(
        hits == runs,
        "registry counted {hits} hits, the handlers {runs} runs"
    );
    println!(
        "smp: {ROUNDS} handler changes and {ROUNDS} disables, each with a CPU inside the old \
         handler, waited for it; {runs} handler runs; {} sync rounds; {} QEMU nudges (stale \
         translations)",
        poker.rounds,
        NUDGES.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Runs the SMP tests (after the probe tests registered the table, declared the trap
/// route and installed the trap hook).
pub fn run(h: &mut Harness) {
    if smp::online() < 2 {
        println!("smp: 1 CPU online: the SMP tests need more than one and are skipped");
        h.check("smp_tests_skipped_on_one_cpu", Ok::<(), Msg>(()));
        return;
    }
    let Some(t) = pt::table() else {
        h.check("smp_probe_table", Err("no probe table registered"));
        return;
    };
    EXPECT_CRC.store(kfuncs::crc32c_of(CRC_DATA), Ordering::Relaxed);
    h.check("smp_stress_live_patching", stress(t));
    h.check("smp_text_never_writable", text_never_writable(t));
    h.check(
        "smp_drain_waits_for_handlers_on_aps",
        drain_waits_for_aps(&mut Poker::default()),
    );
}
