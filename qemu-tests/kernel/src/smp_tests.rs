//! SMP tests: the APs are really up and configured like the boot CPU, cross-CPU
//! serialization reaches every CPU, live probe patching holds up while three CPUs run
//! the sites, a CPU that runs a site mid-patch is sent through the int3 emulation and
//! carries on correctly, and text is never writable through its executable mapping.
//!
//! The APs run *workers* ([`worker`]): loops over every probe site the test probes have
//! (Rust `probe!`/`probe_enabled!`, C call, tail, is-enabled and guarded sites, the
//! `kfuncs` crate's site) and over ifunc'd functions, checking every result. Between
//! passes a worker naps until the next interrupt or for at most [`NAP_US`]
//! ([`smp::nap`]): QEMU runs each CPU on a host thread, and with four CPUs busy on a
//! two-core host a CPU that must acknowledge a sync IPI can wait milliseconds for a
//! time slice (~19 ms per round measured without naps, ~0.15 ms with). A sync IPI
//! wakes a napping worker at once, so workers run the sites right inside the patch
//! windows.
//! Before each call a worker tells the probe handler, through its per-CPU slot, which
//! probe and arguments the call may fire with; the handler counts per CPU and checks
//! them; the worker counts the calls it saw fire (the handler's per-CPU count moved by
//! exactly 0 or 1). At the end three independent counts must agree exactly: the
//! handler's, the registry's hits, and the sum of what the APs observed.
//!
//! **The handler never outlives its batch.** When an AP is inside the #BP hook for a
//! site of the probe whose batch is in flight and the emulation calls the handler (an
//! enabling C call site), the handler records the batch generation, lingers, and checks
//! the batch has not finished meanwhile: the batch's last serialization round cannot
//! complete while a CPU is inside the (interrupts-off) #BP handler, and the loader then
//! waits until no CPU is inside `handle_int3`. While `ctest:tail` is enabled its site
//! traps on every call; the handler lingers there too, so batches of *other* probes
//! really have to wait in the loader's drain (`probe::int3_drain_waits`).
//!
//! **QEMU keeps stale translations.** Its multi-threaded TCG can keep running a
//! translation of a site made while another CPU wrote it (see `probe_tests::bp_hook`):
//! traps at sites that hold no `int3` are counted apart (and measured with nothing
//! patched, [`stale_without_patching`]); they are emulated correctly, since the
//! handler reads only the static table and the probe's current state.
//!
//! With one CPU these tests are skipped (one `ok` line says so).

use core::hint::black_box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use kernel_loader::format::Table;
use kernel_loader::patch::{PokeError, TextPoker};
use kernel_loader::probe::{self, ProbeId};

use crate::harness::{Harness, Msg};
use crate::poker::{ALIAS_STATS, AliasPoker};
use crate::probe_tests::{self as pt};
use crate::smp::{self, MAX_CPUS};
use crate::{apic, cpu, ensure, msg, paging, println};

/// Batches (each one enable or one disable) CPU 0 runs in the stress test: 10,002
/// enables and 10,002 disables, spread over [`PROBES`] in turn.
const STRESS_BATCHES: usize = 20_004;
/// How long a worker naps between passes at most (it wakes at once on an IPI).
const NAP_US: u32 = 100;
/// Enable+disable rounds per probe in the forced mid-patch test.
const MID_ROUNDS: usize = 4;

/// The probes the workers fire, by index into [`IDS`].
const PROBES: [&str; 6] = [
    "rtest:one",
    "ctest:one",
    "rtest:six",
    "ctest:six",
    "kfuncs:bitmap",
    "ctest:tail",
];
const R_ONE: usize = 0;
const C_ONE: usize = 1;
const R_SIX: usize = 2;
const C_SIX: usize = 3;
const BITMAP: usize = 4;
const C_TAIL: usize = 5;
/// "No probe may fire": the expected probe of an is-enabled check or an ifunc call.
const NONE: u32 = u32::MAX;

static IDS: [AtomicU32; PROBES.len()] = [const { AtomicU32::new(NONE) }; PROBES.len()];

/// Whether CPU 0 is running a batch for probe `p` (set around every batch these tests
/// run; see [`set`]).
pub(crate) fn batch_in_flight(p: u32) -> bool {
    BATCH_GEN.load(Ordering::SeqCst) % 2 == 1 && BATCH_PROBE.load(Ordering::SeqCst) == p
}

fn pid(k: usize) -> u32 {
    IDS[k].load(Ordering::Relaxed)
}

/// What a worker checks, for its first error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Check {
    Ok = 0,
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
    Sum,
    Memcpy,
    FiredTwice,
    FiredWhenNothingMay,
}

const CHECK_NAMES: [&str; 15] = [
    "ok",
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
    "sum_of result",
    "copy_into result",
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
    /// Calls this AP saw fire.
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
static BSP_FIRES: AtomicU64 = AtomicU64::new(0);
static MISMATCHES: AtomicU64 = AtomicU64::new(0);
static FIRST_MISMATCH: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Odd while CPU 0 runs a batch for probe [`BATCH_PROBE`].
static BATCH_GEN: AtomicU64 = AtomicU64::new(0);
static BATCH_PROBE: AtomicU32 = AtomicU32::new(NONE);
static GEN_CHECKED: AtomicU64 = AtomicU64::new(0);
static GEN_OUTLIVED: AtomicU64 = AtomicU64::new(0);
static TAIL_HOLDS: AtomicU64 = AtomicU64::new(0);
static EXPECT_CRC: AtomicU32 = AtomicU32::new(0);
static EXPECT_SUM: AtomicU64 = AtomicU64::new(0);

const CRC_DATA: &[u8] = b"ksites: live patching on every CPU";

fn sum_words() -> [u32; 37] {
    core::array::from_fn(|i| (i as u32).wrapping_mul(2_654_435_761) | 1)
}

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
        &BSP_FIRES,
        &MISMATCHES,
        &GEN_CHECKED,
        &GEN_OUTLIVED,
        &TAIL_HOLDS,
    ] {
        a.store(0, Ordering::Relaxed);
    }
}

/// Spins for a while (no `pause`, which TCG turns into a slow exit).
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
        BSP_FIRES.fetch_add(1, Ordering::Relaxed);
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
    // Called from inside the #BP hook (the loader's emulation fired the probe)?
    if let Some((p, held_int3)) = pt::in_bp_for(cpu) {
        if p.0 == pid(C_TAIL) {
            // An enabled tail site: keep this CPU inside `handle_int3` for a while.
            TAIL_HOLDS.fetch_add(1, Ordering::Relaxed);
            linger(3_000);
        } else if p == id && held_int3 {
            // (A trap on a stale translation, at a site whose memory no longer holds
            // int3, is not tied to a batch: see `probe_tests::bp_hook`.)
            let g = BATCH_GEN.load(Ordering::SeqCst);
            if g % 2 == 1 && BATCH_PROBE.load(Ordering::SeqCst) == id.0 {
                // Mid-batch trap on a site of the batch's own probe.
                linger(20_000);
                GEN_CHECKED.fetch_add(1, Ordering::Relaxed);
                if BATCH_GEN.load(Ordering::SeqCst) != g {
                    GEN_OUTLIVED.fetch_add(1, Ordering::Relaxed);
                }
            }
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

/// Makes one call that may fire probe `k` (or nothing, for [`NONE`]) with `args`;
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
    use crate::probe_tests as pt;

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

/// One pass over every site and ifunc; returns the calls made and how many fired.
fn one_pass(slot: &CpuSlot, x: u64) -> (u64, u64) {
    let mut fired = 0;
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
    fired += call(slot, Some(C_ONE), &[x], Check::COne, x, || {
        c::fire_one(x) == x + 1
    });
    let six = [1, 2, 3, 4, 5, x];
    fired += call(slot, Some(C_SIX), &six, Check::CSix, x, || {
        c::fire_six(1, 2, 3, 4, 5, x) == 15 + x
    });
    // c_guarded's result depends on c_work, which other CPUs change: not checked.
    let g = [x, 2 * x, 3 * x, 4 * x, 5 * x, 6 * x];
    fired += call(slot, Some(C_SIX), &g, Check::Ok, x, || {
        black_box(c::guarded(x));
        true
    });
    fired += call(slot, Some(C_TAIL), &[x], Check::Ok, x, || {
        c::fire_tail(x);
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
    let w = sum_words();
    fired += call(slot, None, &[], Check::Sum, x, || {
        kfuncs::sum_of(&w) == EXPECT_SUM.load(Ordering::Relaxed)
    });
    fired += call(slot, None, &[], Check::Memcpy, x, || {
        let mut dst = [0u8; 40];
        kfuncs::copy_into(&mut dst, CRC_DATA);
        dst[..CRC_DATA.len()] == *CRC_DATA
    });
    (15, fired)
}

/// An AP's job: run [`one_pass`] until told to stop, then publish its counts.
fn worker(cpu: usize) {
    let slot = &SLOTS[cpu];
    STARTED.fetch_add(1, Ordering::AcqRel);
    let (mut loops, mut calls, mut observed) = (0u64, 0u64, 0u64);
    while !STOP.load(Ordering::Relaxed) {
        let x = loops * 8 + cpu as u64;
        let (c, f) = one_pass(slot, x);
        calls += c;
        observed += f;
        loops += 1;
        smp::nap(NAP_US);
    }
    slot.expect_id.store(NONE, Ordering::Relaxed);
    slot.loops.store(loops, Ordering::Relaxed);
    slot.calls.store(calls, Ordering::Relaxed);
    slot.observed.store(observed, Ordering::Release);
}

/// Starts the workers and waits until every AP runs one.
fn start_workers() -> Result<(), Msg> {
    STOP.store(false, Ordering::SeqCst);
    STARTED.store(0, Ordering::SeqCst);
    smp::run_on_aps(worker);
    let aps = smp::online() - 1;
    let deadline = cpu::rdtsc() + 5_000 * tsc_per_ms();
    while STARTED.load(Ordering::Acquire) < aps {
        if cpu::rdtsc() > deadline {
            STOP.store(true, Ordering::SeqCst);
            return Err(msg!(
                "only {} of {aps} APs started their worker",
                STARTED.load(Ordering::Relaxed)
            ));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn stop_workers() -> Result<(), Msg> {
    STOP.store(true, Ordering::SeqCst);
    smp::wait_aps(4_000_000_000).map_err(|cpu| msg!("CPU {cpu} did not stop its worker"))
}

static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// TSC ticks per millisecond, measured once against the PIT.
pub(crate) fn tsc_per_ms() -> u64 {
    match TSC_PER_MS.load(Ordering::Relaxed) {
        0 => {
            let t0 = cpu::rdtsc();
            apic::delay_us(20_000);
            let v = ((cpu::rdtsc() - t0) / 20).max(1);
            TSC_PER_MS.store(v, Ordering::Relaxed);
            v
        }
        v => v,
    }
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
/// CPU 0, the handler's count = the registry's hits (per probe too) = what the APs saw.
fn tally(hits0: &[u64; 64]) -> Result<Tally, Msg> {
    let n = smp::online();
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
        BSP_FIRES.load(Ordering::SeqCst) == 0,
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
        "hits: handler {}, registry {}, observed by the APs {}",
        t.handler,
        t.registry,
        t.observed
    );
    ensure!(
        GEN_OUTLIVED.load(Ordering::SeqCst) == 0,
        "{} handler runs inside #BP outlived the batch they trapped in",
        GEN_OUTLIVED.load(Ordering::SeqCst)
    );
    Ok(t)
}

/// Every site holds the bytes its probe's current state calls for; `enabled` lists the
/// probes that must be enabled (all others disabled).
fn check_all_sites(t: &Table<'_>, enabled: &[ProbeId]) -> Result<(), Msg> {
    for p in probe::matching("*") {
        ensure!(
            probe::is_enabled(p) == enabled.contains(&p),
            "probe {} enabled = {}",
            p.0,
            probe::is_enabled(p)
        );
    }
    for s in t.probe_sites() {
        let on = enabled.contains(&ProbeId(s.probe));
        let want = probe::site_bytes(&s, on).map_err(Msg::display)?;
        let found = pt::read5(s.addr);
        ensure!(
            found == want,
            "site {:#x} ({} of probe {}) holds {found:02x?}, expected {want:02x?}",
            s.addr,
            s.kind.name(),
            s.probe
        );
    }
    Ok(())
}

fn set(p: ProbeId, on: bool, poker: &mut impl TextPoker) -> Result<(), Msg> {
    BATCH_PROBE.store(p.0, Ordering::SeqCst);
    BATCH_GEN.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the #BP hook (probe_tests::bp_hook) is installed on the shared IDT; the
    // poker writes through an alias and serializes every online CPU; only CPU 0 patches.
    let r = unsafe {
        if on {
            probe::enable(p, handler, poker)
        } else {
            probe::disable(p, poker)
        }
    };
    BATCH_GEN.fetch_add(1, Ordering::SeqCst);
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
        let p = probe::lookup(spec).ok_or_else(|| msg!("probe {spec} not registered"))?;
        IDS[k].store(p.0, Ordering::Relaxed);
        out[k] = p;
    }
    Ok(out)
}

fn int3_on_aps() -> u64 {
    (1..smp::online()).map(pt::int3_on_cpu).sum()
}

fn stale_on_aps() -> u64 {
    (1..smp::online()).map(pt::stale_on_cpu).sum()
}

// ---------------------------------------------------------------------------------------
// Tests.

/// What an AP reports about itself.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct CpuReport {
    index: u64,
    apic_id: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    xcr0: u64,
    rflags: u64,
    rsp: u64,
    tr: u64,
    idt_base: u64,
    gdt_base: u64,
    text_rx: u64,
    trampoline_rx: u64,
    window_unmapped: u64,
}

const REPORT_WORDS: usize = 15;
static REPORTS: [[AtomicU64; REPORT_WORDS]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; REPORT_WORDS] }; MAX_CPUS];

fn describe_this_cpu() -> CpuReport {
    let rflags: u64;
    let rsp: u64;
    let tr: u16;
    let mut idtr = [0u8; 10];
    let mut gdtr = [0u8; 10];
    // SAFETY: reads flags, RSP, TR, IDTR and GDTR into locals; no side effects.
    unsafe {
        core::arch::asm!(
            "pushfq",
            "pop {f}",
            "mov {s}, rsp",
            "str {t:x}",
            "sidt [{i}]",
            "sgdt [{g}]",
            f = out(reg) rflags,
            s = out(reg) rsp,
            t = out(reg) tr,
            i = in(reg) idtr.as_mut_ptr(),
            g = in(reg) gdtr.as_mut_ptr(),
        );
    }
    let base = |d: &[u8; 10]| u64::from_le_bytes(core::array::from_fn(|i| d[2 + i]));
    let text = paging::text_range().start;
    let rx = |a: u64| u64::from(paging::translate(a).is_some_and(|p| !p.writable && p.executable));
    CpuReport {
        index: smp::cpu_index() as u64,
        apic_id: u64::from(apic::id()),
        cr0: cpu::read_cr0(),
        cr3: cpu::read_cr3(),
        cr4: cpu::read_cr4(),
        // SAFETY: IA32_EFER exists on every x86-64 CPU.
        efer: unsafe { cpu::rdmsr(cpu::MSR_EFER) },
        xcr0: if cpu::read_cr4() & cpu::CR4_OSXSAVE != 0 {
            kernel_loader::arch::x86_64::xcr0()
        } else {
            0
        },
        rflags,
        rsp,
        tr: u64::from(tr),
        idt_base: base(&idtr),
        gdt_base: base(&gdtr),
        text_rx: rx(text),
        trampoline_rx: rx(smp::TRAMPOLINE),
        window_unmapped: u64::from(paging::translate(paging::POKE_WINDOW).is_none()),
    }
}

fn report_job(cpu: usize) {
    let r = describe_this_cpu();
    let words = [
        r.index,
        r.apic_id,
        r.cr0,
        r.cr3,
        r.cr4,
        r.efer,
        r.xcr0,
        r.rflags,
        r.rsp,
        r.tr,
        r.idt_base,
        r.gdt_base,
        r.text_rx,
        r.trampoline_rx,
        r.window_unmapped,
    ];
    for (slot, w) in REPORTS[cpu].iter().zip(words) {
        slot.store(w, Ordering::Release);
    }
}

fn aps_configured() -> Result<(), Msg> {
    smp::run_on_aps(report_job);
    smp::wait_aps(1_000_000_000).map_err(|c| msg!("CPU {c} did not run its job"))?;
    let bsp = describe_this_cpu();
    let mut gdts = [0u64; MAX_CPUS];
    gdts[0] = bsp.gdt_base;
    for cpu in 1..smp::online() {
        let w: [u64; REPORT_WORDS] =
            core::array::from_fn(|i| REPORTS[cpu][i].load(Ordering::Acquire));
        let r = CpuReport {
            index: w[0],
            apic_id: w[1],
            cr0: w[2],
            cr3: w[3],
            cr4: w[4],
            efer: w[5],
            xcr0: w[6],
            rflags: w[7],
            rsp: w[8],
            tr: w[9],
            idt_base: w[10],
            gdt_base: w[11],
            text_rx: w[12],
            trampoline_rx: w[13],
            window_unmapped: w[14],
        };
        ensure!(r.index == cpu as u64, "CPU {cpu}: gs index {}", r.index);
        ensure!(
            r.apic_id == u64::from(smp::apic_id(cpu)) && r.apic_id != bsp.apic_id,
            "CPU {cpu}: APIC id {} (expected {})",
            r.apic_id,
            smp::apic_id(cpu)
        );
        ensure!(
            r.cr0 == bsp.cr0 && r.cr3 == bsp.cr3 && r.cr4 == bsp.cr4 && r.xcr0 == bsp.xcr0,
            "CPU {cpu}: cr0 {:#x} cr3 {:#x} cr4 {:#x} xcr0 {:#x}; CPU 0: {:#x} {:#x} {:#x} {:#x}",
            r.cr0,
            r.cr3,
            r.cr4,
            r.xcr0,
            bsp.cr0,
            bsp.cr3,
            bsp.cr4,
            bsp.xcr0
        );
        ensure!(r.cr0 & cpu::CR0_WP != 0, "CPU {cpu}: CR0.WP clear");
        const EFER_BITS: u64 = (1 << 8) | (1 << 10) | cpu::EFER_NXE; // LME, LMA, NXE
        ensure!(
            r.efer & EFER_BITS == bsp.efer & EFER_BITS,
            "CPU {cpu}: EFER {:#x}, CPU 0 {:#x}",
            r.efer,
            bsp.efer
        );
        ensure!(
            r.rflags & (1 << 9) != 0,
            "CPU {cpu}: interrupts off in a job"
        );
        let stack = smp::ap_stack(cpu);
        ensure!(
            stack.contains(&r.rsp),
            "CPU {cpu}: rsp {:#x} outside its stack {stack:#x?}",
            r.rsp
        );
        ensure!(
            r.tr == u64::from(crate::boot::TSS_SELECTOR),
            "CPU {cpu}: TR {:#x}",
            r.tr
        );
        ensure!(
            r.idt_base == bsp.idt_base,
            "CPU {cpu}: IDT at {:#x}",
            r.idt_base
        );
        ensure!(
            !gdts[..cpu].contains(&r.gdt_base),
            "CPU {cpu}: shares a GDT ({:#x})",
            r.gdt_base
        );
        gdts[cpu] = r.gdt_base;
        ensure!(
            r.text_rx == 1 && r.trampoline_rx == 1 && r.window_unmapped == 1,
            "CPU {cpu}: text rx {} trampoline rx {} poke window unmapped {}",
            r.text_rx,
            r.trampoline_rx,
            r.window_unmapped
        );
    }
    Ok(())
}

fn sync_reaches_every_cpu() -> Result<(), Msg> {
    const ROUNDS: u64 = 1000;
    let n = smp::online();
    let before: [u64; MAX_CPUS] = core::array::from_fn(smp::sync_ipis_handled);
    let r0 = smp::sync_rounds();
    let t0 = cpu::rdtsc();
    for _ in 0..ROUNDS {
        smp::sync_all_cores();
    }
    let us = (cpu::rdtsc() - t0) * 1000 / tsc_per_ms() / ROUNDS;
    ensure!(smp::sync_rounds() - r0 == ROUNDS);
    for (cpu, &b) in before.iter().enumerate().take(n).skip(1) {
        let d = smp::sync_ipis_handled(cpu) - b;
        ensure!(d == ROUNDS, "CPU {cpu} handled {d} of {ROUNDS} sync IPIs");
    }
    println!(
        "smp: {ROUNDS} sync rounds (IPI + serialize + ack on {} APs), ~{us} us each",
        n - 1
    );
    Ok(())
}

fn stress(t: &Table<'_>) -> Result<(), Msg> {
    let ids = ids()?;
    check_all_sites(t, &[])?;
    reset_counters();
    let hits0 = registry_hits();
    let (sync0, drain0, int3_0, stale0, late0) = (
        smp::sync_rounds(),
        probe::int3_drain_waits(),
        int3_on_aps(),
        stale_on_aps(),
        pt::late_traps(),
    );
    let alias0 = ALIAS_STATS.writes.load(Ordering::Relaxed);
    start_workers()?;
    let t0 = cpu::rdtsc();
    let mut enables = 0usize;
    let mut run = || -> Result<(), Msg> {
        for b in 0..STRESS_BATCHES {
            let p = ids[b % ids.len()];
            let on = !probe::is_enabled(p);
            let mut poker = AliasPoker::default();
            set(p, on, &mut poker)?;
            ensure!(
                poker.syncs == 3,
                "batch {b}: {} serializations, expected 3",
                poker.syncs
            );
            enables += usize::from(on);
        }
        Ok(())
    };
    let r = run();
    let ms = (cpu::rdtsc() - t0) / tsc_per_ms();
    stop_workers()?;
    r?;
    let tally = tally(&hits0)?;
    // 20,004 batches over 6 probes: each probe flipped 3,334 times, so all are disabled;
    // check that, then leave three enabled and check again.
    check_all_sites(t, &[])?;
    let ends_on = [ids[R_ONE], ids[C_SIX], ids[C_TAIL]];
    for &p in &ends_on {
        set(p, true, &mut AliasPoker::default())?;
    }
    check_all_sites(t, &ends_on)?;
    for &p in &ends_on {
        set(p, false, &mut AliasPoker::default())?;
    }
    check_all_sites(t, &[])?;

    ensure!(
        tally.handler > 0
            && (0..PROBES.len()).all(|k| PROBE_CALLS[pid(k) as usize].load(Ordering::Relaxed) > 0),
        "not every probe fired: {:?}",
        core::array::from_fn::<u64, 6, _>(|k| PROBE_CALLS[pid(k) as usize].load(Ordering::Relaxed))
    );
    let rounds = smp::sync_rounds() - sync0;
    ensure!(
        rounds == 3 * (STRESS_BATCHES as u64 + 6),
        "{rounds} sync rounds for {} batches",
        STRESS_BATCHES + 6
    );
    let em = int3_on_aps() - int3_0;
    let drains = probe::int3_drain_waits() - drain0;
    println!(
        "smp stress: CPU 0 ran {STRESS_BATCHES} batches ({enables} enables, {} disables) in \
         {ms} ms while {} APs made {} calls ({:?} passes)",
        STRESS_BATCHES - enables,
        smp::online() - 1,
        tally.calls,
        &tally.loops[1..smp::online()]
    );
    println!(
        "smp stress: hits: handler {} = registry {} = observed by APs {}; per probe {:?}",
        tally.handler,
        tally.registry,
        tally.observed,
        core::array::from_fn::<u64, 6, _>(|k| PROBE_CALLS[pid(k) as usize].load(Ordering::Relaxed))
    );
    println!(
        "smp stress: {em} int3 emulations on APs ({} fired an enabled tail site, {} mid-patch \
         whose final byte landed before the hook looked, {} on stale QEMU translations); \
         {drains} batches waited in the drain for a CPU inside handle_int3; {} handler runs \
         checked inside their batch, {} outlived it; {rounds} sync rounds; {} alias writes",
        TAIL_HOLDS.load(Ordering::Relaxed),
        pt::late_traps() - late0,
        stale_on_aps() - stale0,
        GEN_CHECKED.load(Ordering::Relaxed),
        GEN_OUTLIVED.load(Ordering::Relaxed),
        ALIAS_STATS.writes.load(Ordering::Relaxed) - alias0
    );
    ensure!(
        drains > 0,
        "no batch ever had to wait for a CPU to leave handle_int3"
    );
    stale_without_patching(t)?;
    ensure!(enables >= 10_000 && STRESS_BATCHES - enables >= 10_000);
    Ok(())
}

/// Runs the workers for 100 ms while nothing is patched (every site disabled) and
/// reports traps: each one ran a stale translation of a site that holds no `int3`
/// (always 0 on hardware; QEMU's TCG can keep such translations, see
/// `probe_tests::bp_hook`). Informational; the emulation handles them correctly.
fn stale_without_patching(t: &Table<'_>) -> Result<(), Msg> {
    check_all_sites(t, &[])?;
    reset_counters();
    let hits0 = registry_hits();
    let (int3_0, stale0) = (int3_on_aps(), stale_on_aps());
    start_workers()?;
    let t0 = cpu::rdtsc();
    while cpu::rdtsc() - t0 < 100 * tsc_per_ms() {
        core::hint::spin_loop();
    }
    stop_workers()?;
    let tally = tally(&hits0)?;
    ensure!(
        tally.handler == 0,
        "{} hits with every probe disabled",
        tally.handler
    );
    println!(
        "smp: 100 ms with nothing patched: {} int3 traps on APs ({} at sites holding no \
         int3: stale QEMU translations), {} calls, 0 hits",
        int3_on_aps() - int3_0,
        stale_on_aps() - stale0,
        tally.calls
    );
    Ok(())
}

/// A poker whose first two serializations (after the `cc` round, and after bytes
/// 1..5) do not return until an AP has trapped on a site of `target` that holds `int3`:
/// a CPU is then deterministically sent through the int3 emulation mid-patch.
///
/// If no AP traps within [`NUDGE_MS`], the CPUs may be running a stale translation of
/// a site made while the `cc` was being written (QEMU's TCG; see
/// `probe_tests::bp_hook`): the poker then writes each site's first byte again with
/// the value it already holds (`cc`), which changes nothing architecturally but makes
/// TCG drop translations of it, and waits again. Nudges are counted and reported.
struct WaitForApTrap {
    inner: AliasPoker,
    target: ProbeId,
    round: u32,
    waits: u32,
    seen: u32,
    nudges: u32,
}

/// See [`WaitForApTrap`].
const NUDGE_MS: u64 = 20;
/// How long [`WaitForApTrap`] waits for a trap in all.
const TRAP_WAIT_MS: u64 = 2_000;

impl WaitForApTrap {
    fn new(target: ProbeId) -> WaitForApTrap {
        WaitForApTrap {
            inner: AliasPoker::default(),
            target,
            round: 0,
            waits: 0,
            seen: 0,
            nudges: 0,
        }
    }

    fn nudge(&mut self) {
        let Some(t) = pt::table() else { return };
        for s in t.probe_sites().filter(|s| s.probe == self.target.0) {
            let first = pt::read5(s.addr)[0];
            // SAFETY: inside a validated site of the batch in flight; the byte written
            // is the one the site holds, so no CPU can observe a change.
            let _ = unsafe { self.inner.write(s.addr, &[first]) };
        }
    }
}

impl TextPoker for WaitForApTrap {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.inner.begin()
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: forwarded from the engine.
        unsafe { self.inner.write(addr, bytes) }
    }

    fn sync_cores(&mut self) {
        self.inner.sync_cores();
        self.round += 1;
        if self.round > 2 {
            return;
        }
        self.waits += 1;
        let before = pt::ap_traps_on(self.target);
        let start = cpu::rdtsc();
        let ms = tsc_per_ms();
        let mut nudged = false;
        while cpu::rdtsc() - start < TRAP_WAIT_MS * ms {
            if pt::ap_traps_on(self.target) > before {
                self.seen += 1;
                return;
            }
            if !nudged && cpu::rdtsc() - start > NUDGE_MS * ms {
                nudged = true;
                self.nudges += 1;
                self.nudge();
            }
        }
    }

    fn end(&mut self) {
        self.inner.end()
    }
}

fn int3_on_aps_mid_patch(t: &Table<'_>) -> Result<(), Msg> {
    let ids = ids()?;
    check_all_sites(t, &[])?;
    reset_counters();
    let hits0 = registry_hits();
    let em0 = int3_on_aps();
    let per_cpu0: [u64; MAX_CPUS] = core::array::from_fn(pt::int3_on_cpu);
    start_workers()?;
    let (mut waits, mut seen, mut nudges, mut target_traps) = (0u32, 0u32, 0u32, 0u64);
    let stale0 = stale_on_aps();
    let mut run = || -> Result<(), Msg> {
        for _ in 0..MID_ROUNDS {
            for &p in &ids {
                for on in [true, false] {
                    let traps0 = pt::ap_traps_on(p);
                    let mut poker = WaitForApTrap::new(p);
                    set(p, on, &mut poker)?;
                    waits += poker.waits;
                    seen += poker.seen;
                    nudges += poker.nudges;
                    target_traps += pt::ap_traps_on(p) - traps0;
                }
            }
        }
        Ok(())
    };
    let r = run();
    stop_workers()?;
    r?;
    let tally = tally(&hits0)?;
    check_all_sites(t, &[])?;
    let em = int3_on_aps() - em0;
    let n = smp::online();
    let mut per_cpu = [0u64; MAX_CPUS];
    for (cpu, c) in per_cpu.iter_mut().enumerate().take(n).skip(1) {
        *c = pt::int3_on_cpu(cpu) - per_cpu0[cpu];
    }
    println!(
        "smp: {em} int3 emulations on APs (per AP {:?}; {target_traps} at sites of the probe \
         being patched that held int3, {} on stale QEMU translations); {seen} of {waits} forced \
         mid-patch windows saw an AP trap ({nudges} after a QEMU nudge); hits: handler {} = \
         registry {} = observed {}",
        &per_cpu[1..n],
        stale_on_aps() - stale0,
        tally.handler,
        tally.registry,
        tally.observed
    );
    println!("smp: {} int3 emulations on APs since boot", int3_on_aps());
    ensure!(
        seen == waits && waits == (MID_ROUNDS * PROBES.len() * 2 * 2) as u32,
        "only {seen} of {waits} mid-patch windows saw an AP trap"
    );
    ensure!(
        target_traps >= u64::from(waits) && em >= target_traps,
        "{target_traps} traps on the patched probes' sites, {em} in all"
    );
    Ok(())
}

fn text_never_writable(t: &Table<'_>) -> Result<(), Msg> {
    let writes = ALIAS_STATS.writes.load(Ordering::SeqCst);
    let checks = ALIAS_STATS.checks.load(Ordering::SeqCst);
    let scans = ALIAS_STATS.scans.load(Ordering::SeqCst);
    let v = ALIAS_STATS.violations.load(Ordering::SeqCst);
    ensure!(
        v == 0,
        "{v} page-table violations while the alias was mapped, first at {:#x}",
        ALIAS_STATS.first_violation.load(Ordering::SeqCst)
    );
    ensure!(
        writes > 0 && checks >= writes && scans > 0,
        "alias writes {writes}, checks {checks}, scans {scans}"
    );
    ensure!(paging::write_protect_enabled(), "CR0.WP clear on CPU 0");
    let r = paging::wx_scan();
    ensure!(
        r.violations == 0,
        "{} writable+executable pages, first {:?}",
        r.violations,
        r.first
    );
    for s in t.probe_sites() {
        let pi = paging::translate(s.addr).ok_or_else(|| msg!("site {:#x} unmapped", s.addr))?;
        ensure!(
            !pi.writable && pi.executable,
            "site {:#x} writable or not executable",
            s.addr
        );
    }
    ensure!(
        paging::translate(paging::POKE_WINDOW).is_none(),
        "poke window left mapped"
    );
    println!(
        "smp: text never writable: {writes} alias writes, {checks} page-table checks and \
         {scans} full W^X scans ({} pages, {} executable) while the alias was mapped, 0 \
         violations",
        r.pages, r.executable
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The drain: disable and a live handler change wait for APs inside the old handler.

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

/// Lingers (milliseconds under TCG, longer than a sync round) with this CPU's flag in `inside` set, and
/// counts a run that the change retiring it (`retired` bumped) did not wait for.
fn drain_linger(inside: &[AtomicU32; MAX_CPUS], retired: &AtomicU64) {
    let cpu = smp::cpu_index();
    let g = retired.load(Ordering::SeqCst);
    inside[cpu].store(1, Ordering::SeqCst);
    DRAIN_RUNS.fetch_add(1, Ordering::Relaxed);
    linger(2_000_000);
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

/// An AP's job: fire `rtest:one` until told to stop.
fn drain_worker(cpu: usize) {
    let mut x = cpu as u64;
    while !DRAIN_STOP.load(Ordering::Relaxed) {
        x = black_box(pt::r_one(x));
        smp::nap(NAP_US);
    }
}

fn any_inside(inside: &[AtomicU32; MAX_CPUS]) -> bool {
    inside.iter().any(|f| f.load(Ordering::SeqCst) != 0)
}

/// Waits (up to about a second) until some AP is inside the handler of `inside`.
fn wait_inside(inside: &[AtomicU32; MAX_CPUS]) -> Result<(), Msg> {
    let deadline = cpu::rdtsc() + 1_000 * tsc_per_ms();
    while !any_inside(inside) {
        ensure!(
            cpu::rdtsc() < deadline,
            "no AP ran the handler within a second"
        );
        core::hint::spin_loop();
    }
    Ok(())
}

/// While the APs fire `rtest:one` and its handler lingers: a disable, and a live
/// handler change, return only once no AP runs the old handler (each caught with an AP
/// inside it), and no handler run outlives the change that retired it. The loader's
/// per-CPU drain is what waits: the batch's rounds end long before the handler does.
fn drain_waits_for_aps(poker: &mut AliasPoker) -> Result<(), Msg> {
    const ROUNDS: usize = 8;
    let p = probe::lookup("rtest:one").ok_or_else(|| msg!("rtest:one not registered"))?;
    ensure!(
        !probe::is_enabled(p),
        "rtest:one is enabled before the test"
    );
    DRAIN_OUTLIVED.store(0, Ordering::SeqCst);
    DRAIN_RUNS.store(0, Ordering::SeqCst);
    DRAIN_STOP.store(false, Ordering::SeqCst);
    let hits0 = probe::info(p).map_or(0, |i| i.hits);
    smp::run_on_aps(drain_worker);
    let result = (|| {
        for _ in 0..ROUNDS {
            // SAFETY: as in `set`.
            unsafe { probe::enable(p, drain_a, poker) }.map_err(Msg::display)?;
            wait_inside(&IN_A)?;
            // A live handler change: drain_a retires.
            // SAFETY: as above.
            unsafe { probe::enable(p, drain_b, poker) }.map_err(Msg::display)?;
            RETIRED_A.fetch_add(1, Ordering::SeqCst);
            ensure!(
                !any_inside(&IN_A),
                "a handler change returned while an AP ran the old handler"
            );
            wait_inside(&IN_B)?;
            // SAFETY: as above.
            unsafe { probe::disable(p, poker) }.map_err(Msg::display)?;
            RETIRED_B.fetch_add(1, Ordering::SeqCst);
            ensure!(
                !any_inside(&IN_B),
                "disable returned while an AP ran the handler"
            );
        }
        Ok(())
    })();
    DRAIN_STOP.store(true, Ordering::SeqCst);
    smp::wait_aps(4_000_000_000).map_err(|cpu| msg!("CPU {cpu} did not stop"))?;
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
        "smp: {ROUNDS} handler changes and {ROUNDS} disables, each with an AP inside the old \
         handler, waited for it; {runs} handler runs"
    );
    Ok(())
}

/// Runs the SMP tests (after the probe tests registered the table and installed the
/// #BP hook).
pub fn run(h: &mut Harness) {
    let n = smp::online();
    if n < 2 {
        println!("smp: 1 CPU online: the SMP tests need more than one and are skipped");
        h.check("smp_tests_skipped_on_one_cpu", Ok::<(), Msg>(()));
        return;
    }
    let Some(t) = pt::table() else {
        h.check("smp_probe_table", Err("no probe table registered"));
        return;
    };
    // SAFETY: `bp_hook` passes every trap to `probe::handle_int3` and returns its result.
    unsafe { probe::set_int3_hook(Some(pt::bp_hook)) };
    EXPECT_CRC.store(kfuncs::crc32c_of(CRC_DATA), Ordering::Relaxed);
    EXPECT_SUM.store(
        sum_words().iter().map(|&w| u64::from(w)).sum(),
        Ordering::Relaxed,
    );
    h.check("smp_aps_configured_like_cpu0", aps_configured());
    h.check("smp_sync_cores_reaches_every_cpu", sync_reaches_every_cpu());
    h.check("smp_stress_live_patching", stress(t));
    h.check(
        "smp_int3_emulation_on_aps_mid_patch",
        int3_on_aps_mid_patch(t),
    );
    h.check("smp_text_never_writable", text_never_writable(t));
    h.check(
        "smp_drain_waits_for_handlers_on_aps",
        drain_waits_for_aps(&mut AliasPoker::default()),
    );
}
