//! SDT probes in the kernel, checked live: Rust `probe!`/`probe_enabled!` sites and
//! dtrace-style C sites (c/cprobes.c, built with the cross gcc and rewritten by `ksites
//! embed`): C call, tail (its enabled form the probe trap, `brk`/`ebreak`, routed to the
//! loader by the platform's trap vector), is-enabled and is-enabled tail, with 0, 1 and
//! 6 arguments, and the `kfuncs` crate's site (a second crate). The architecture's
//! forms are `kernel_loader::arch::<arch>::probe`'s.
//! The tests mirror the x86_64 kernel's `probe_tests.rs` by name.
//!
//! Live patching goes through [`Poker`] (the platform's `AliasPoker`, counting its
//! writes and synchronisation rounds, checking with `testing::translates` that each site
//! is read-only at its own address and writable only through the alias, and able to
//! fail its N-th write). These tests run on CPU 0 while the other CPUs idle;
//! [`trap_hook`] (installed here, left installed for [`super::smp_tests`]) counts the
//! traps the loader handled, per CPU.

use core::cell::UnsafeCell;
use core::hint::black_box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kernel_loader::format::{ProbeKind, Table};
use kernel_loader::patch::{PokeError, PokeFailure, TextPoker};
use kernel_loader::probe::{self, Int3Frame, ProbeError, ProbeId};
use kernel_loader::probe_enabled;

use super::testing::{self, translates};
use crate::arch::mmu::{self, AliasPoker};
use crate::arch::smp::{self, MAX_CPUS};
use crate::harness::{Harness, Msg};
use crate::{ensure, msg, println};

// ---------------------------------------------------------------------------------------
// Probe sites.

unsafe extern "C" {
    pub(crate) fn c_fire_zero() -> u64;
    pub(crate) fn c_fire_one(x: u64) -> u64;
    pub(crate) fn c_fire_six(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64;
    pub(crate) fn c_fire_tail(x: u64);
    pub(crate) fn c_one_enabled() -> i32;
    pub(crate) fn c_guarded(x: u64) -> u64;
    static c_work: u64;
}

/// `c_one_enabled()`: the C is-enabled tail site of ctest:one.
pub(crate) fn c_one_on() -> i32 {
    // SAFETY: a plain C function without arguments or preconditions.
    unsafe { c_one_enabled() }
}

pub(crate) fn c_work_now() -> u64 {
    // SAFETY: `c_work` is a C `volatile unsigned long`; read it the same way.
    unsafe { core::ptr::read_volatile(&raw const c_work) }
}

#[inline(never)]
pub(crate) fn r_zero() -> u64 {
    kernel_loader::probe!(rtest, zero);
    black_box(1)
}

#[inline(never)]
pub(crate) fn r_one(x: u64) -> u64 {
    kernel_loader::probe!(rtest, one, x);
    x + 1
}

#[inline(never)]
pub(crate) fn r_one_again(x: u64) -> u64 {
    kernel_loader::probe!(rtest, one, x * 10);
    x + 2
}

#[inline(never)]
pub(crate) fn r_six(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
    kernel_loader::probe!(rtest, six, a, b, c, d, e, f);
    a ^ b ^ c ^ d ^ e ^ f
}

#[inline(never)]
pub(crate) fn r_enabled() -> bool {
    probe_enabled!(rtest, one)
}

// ---------------------------------------------------------------------------------------
// The handler records what it saw.

static CALLS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static LAST_ID: AtomicU32 = AtomicU32::new(u32::MAX);
static LAST_ARGS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

fn handler(id: ProbeId, args: &[u64; 6]) {
    if let Some(c) = CALLS.get(id.0 as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    LAST_ID.store(id.0, Ordering::Relaxed);
    for (slot, &a) in LAST_ARGS.iter().zip(args) {
        slot.store(a, Ordering::Relaxed);
    }
}

fn calls(id: ProbeId) -> u64 {
    CALLS[id.0 as usize].load(Ordering::Relaxed)
}

fn total_calls() -> u64 {
    CALLS.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

fn last_args() -> [u64; 6] {
    core::array::from_fn(|i| LAST_ARGS[i].load(Ordering::Relaxed))
}

fn hits(p: ProbeId) -> u64 {
    probe::info(p).map_or(0, |i| i.hits)
}

/// The image's table, for [`trap_hook`] and the SMP tests.
struct TableCell {
    set: AtomicBool,
    table: UnsafeCell<Option<Table<'static>>>,
}

// SAFETY: `table` is written once, before `set` is published (Release), and only read
// after `set` is seen (Acquire); it is never written again.
unsafe impl Sync for TableCell {}

static TABLE: TableCell = TableCell {
    set: AtomicBool::new(false),
    table: UnsafeCell::new(None),
};

fn set_table(t: Table<'static>) {
    if !TABLE.set.load(Ordering::Acquire) {
        // SAFETY: not yet published, and only CPU 0 calls this (once, before any other
        // CPU runs a probe site).
        unsafe { *TABLE.table.get() = Some(t) };
        TABLE.set.store(true, Ordering::Release);
    }
}

/// The registered image table, once [`run`] registered it.
pub(crate) fn table() -> Option<&'static Table<'static>> {
    if TABLE.set.load(Ordering::Acquire) {
        // SAFETY: published and never written again (see `TableCell`).
        unsafe { (*TABLE.table.get()).as_ref() }
    } else {
        None
    }
}

/// Per CPU: probe traps the loader handled.
static TRAPS_BY_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: while inside [`trap_hook`] for a probe site, 1 + the probe; else 0.
static IN_TRAP: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// Probe traps the loader handled on CPU `cpu`.
pub(crate) fn traps_on_cpu(cpu: usize) -> u64 {
    TRAPS_BY_CPU[cpu].load(Ordering::Relaxed)
}

/// While CPU `cpu` is inside [`trap_hook`] for a probe site: the probe.
pub(crate) fn in_trap_for(cpu: usize) -> Option<ProbeId> {
    match IN_TRAP[cpu].load(Ordering::Relaxed) {
        0 => None,
        v => Some(ProbeId(v - 1)),
    }
}

/// The trap hook (`probe::set_int3_hook`, run by the loader's trap entry, which the
/// platform's exception handler calls for a probe trap): hands the trap to the
/// loader's emulation, counting what it handled.
pub(crate) fn trap_hook(f: &mut Int3Frame) -> bool {
    let cpu = smp::cpu_index();
    let pc = kernel_loader::arch::native::probe::trap_site(f);
    let probe = table().and_then(|t| t.probe_site_at(pc)).map(|s| s.probe);
    IN_TRAP[cpu].store(probe.map_or(0, |p| p + 1), Ordering::Relaxed);
    // SAFETY: `f` is this CPU's interrupted trap context, which the platform writes
    // back before returning from the exception.
    let handled = unsafe { probe::handle_int3(f) };
    IN_TRAP[cpu].store(0, Ordering::Relaxed);
    if handled {
        TRAPS_BY_CPU[cpu].fetch_add(1, Ordering::Relaxed);
    }
    handled
}

// ---------------------------------------------------------------------------------------
// The poker and W^X checks.

/// What every [`Poker`] checked before its writes.
pub(crate) struct WxStats {
    /// Writes through the alias.
    pub writes: AtomicU64,
    /// Sites checked read-only at their own address and writable through the alias.
    pub checks: AtomicU64,
    /// Checks that failed.
    pub violations: AtomicU64,
    /// The first failed check's address.
    pub first_violation: AtomicU64,
}

pub(crate) static WX: WxStats = WxStats {
    writes: AtomicU64::new(0),
    checks: AtomicU64::new(0),
    violations: AtomicU64::new(0),
    first_violation: AtomicU64::new(0),
};

/// The platform's [`AliasPoker`], counting writes and rounds, checking W^X at every
/// write, optionally failing its `fail_at`-th write (0-based), once or for good.
#[derive(Debug, Default)]
pub(crate) struct Poker {
    inner: AliasPoker,
    /// Writes that reached the alias.
    pub writes: usize,
    /// Writes attempted (failed ones included).
    pub attempts: usize,
    /// `sync_cores` calls.
    pub rounds: usize,
    fail_at: Option<usize>,
    fail_forever: bool,
}

impl Poker {
    /// A poker that fails its `n`-th write (0-based), or every write from there.
    pub(crate) fn failing_at(n: usize, forever: bool) -> Poker {
        Poker {
            fail_at: Some(n),
            fail_forever: forever,
            ..Poker::default()
        }
    }
}

impl TextPoker for Poker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        let n = self.attempts;
        self.attempts += 1;
        if let Some(f) = self.fail_at
            && (n == f || (self.fail_forever && n > f))
        {
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        WX.checks.fetch_add(1, Ordering::Relaxed);
        let ok = !translates(addr, true)
            && translates(addr, false)
            && mmu::alias(addr).is_some_and(|a| translates(a, true));
        if !ok && WX.violations.fetch_add(1, Ordering::Relaxed) == 0 {
            WX.first_violation.store(addr, Ordering::Relaxed);
        }
        // SAFETY: forwarded from the engine.
        unsafe { self.inner.write(addr, bytes) }?;
        self.writes += 1;
        WX.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.rounds += 1;
        self.inner.sync_cores();
    }

    fn end(&mut self) {
        self.inner.end();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

pub(crate) fn id(spec: &str) -> Result<ProbeId, Msg> {
    probe::lookup(spec).ok_or_else(|| msg!("probe {spec} not registered"))
}

/// The instruction at a probe site.
pub(crate) fn read4(addr: u64) -> [u8; 4] {
    // SAFETY: probe sites lie in mapped text (validated), 4-aligned.
    unsafe { core::ptr::read_volatile(addr as *const u32) }.to_le_bytes()
}

const MAX_SITES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    n: usize,
    bytes: [(u64, [u8; 4]); MAX_SITES],
}

fn snapshot(t: &Table<'_>) -> Snapshot {
    let mut s = Snapshot {
        n: 0,
        bytes: [(0, [0; 4]); MAX_SITES],
    };
    for site in t.probe_sites().take(MAX_SITES) {
        s.bytes[s.n] = (site.addr, read4(site.addr));
        s.n += 1;
    }
    s
}

/// Every site of a probe in `enabled` holds its enabled form, every other site its
/// disabled form.
pub(crate) fn check_sites(t: &Table<'_>, enabled: &[ProbeId]) -> Result<(), Msg> {
    for s in t.probe_sites() {
        let on = enabled.contains(&ProbeId(s.probe));
        let want = probe::site_bytes(&s, on).map_err(|e| msg!("{e}"))?;
        let found = read4(s.addr);
        ensure!(
            found == want,
            "site {:#x} ({} of probe {}) holds {found:02x?}, expected {want:02x?} ({})",
            s.addr,
            s.kind.name(),
            s.probe,
            if on { "enabled" } else { "disabled" }
        );
    }
    Ok(())
}

/// Enables `p` with `handler`: one batch, one synchronisation round.
fn enable(p: ProbeId) -> Result<(), Msg> {
    let mut k = Poker::default();
    // SAFETY: the trap route is in place (the platform's vector); the poker writes
    // through the alias and synchronises every online CPU (the others idle, not
    // running sites).
    unsafe { probe::enable(p, handler, &mut k) }.map_err(|e| msg!("enable {}: {e}", p.0))?;
    ensure!(
        k.rounds == 1,
        "enable used {} sync rounds, expected 1",
        k.rounds
    );
    Ok(())
}

fn disable(p: ProbeId) -> Result<(), Msg> {
    let mut k = Poker::default();
    // SAFETY: as in `enable`.
    unsafe { probe::disable(p, &mut k) }.map_err(|e| msg!("disable {}: {e}", p.0))?;
    ensure!(
        k.rounds == 1,
        "disable used {} sync rounds, expected 1",
        k.rounds
    );
    Ok(())
}

/// Calls every probe site once (through its function) and checks the functions' own
/// results, which must not depend on the probes' state.
fn call_everything(x: u64) -> Result<(), Msg> {
    ensure!(r_zero() == 1);
    ensure!(r_one(x) == x + 1);
    ensure!(r_one_again(x) == x + 2);
    ensure!(r_six(1, 2, 4, 8, 16, x) == (1 ^ 2 ^ 4 ^ 8 ^ 16 ^ x));
    let w = c_work_now();
    // SAFETY: plain C functions with integer arguments.
    unsafe {
        ensure!(c_fire_zero() == w + 1);
        ensure!(c_fire_one(x) == x + 1);
        ensure!(c_fire_six(1, 2, 3, 4, 5, x) == 15 + x);
        c_fire_tail(x);
        ensure!(
            c_work_now() == w + 1 + x,
            "c_fire_tail did not return correctly"
        );
        ensure!(c_guarded(x) == x + c_work_now());
    }
    ensure!(kfuncs::bitmap_weight(&[1, 3, 7]) == 6);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tests.

fn registry(t: &Table<'_>) -> Result<(), Msg> {
    for (spec, nargs) in [
        ("rtest:zero", 0u16),
        ("rtest:one", 1),
        ("rtest:six", 6),
        ("ctest:zero", 0),
        ("ctest:one", 1),
        ("ctest:six", 6),
        ("ctest:tail", 1),
        ("kfuncs:bitmap", 1),
    ] {
        let i = probe::info(id(spec)?).ok_or_else(|| msg!("no info for {spec}"))?;
        ensure!(i.nargs == nargs, "{spec}: nargs {} != {nargs}", i.nargs);
        ensure!(i.sites >= 1 && !i.enabled && i.hits == 0, "{spec}: {i:?}");
        println!(
            "probe {}:{} nargs={} sites={}",
            i.provider, i.name, i.nargs, i.sites
        );
    }
    let rtest_one = probe::info(id("rtest:one")?).map_or(0, |i| i.sites);
    ensure!(
        rtest_one == 3,
        "rtest:one has {rtest_one} sites (2 probe!, 1 probe_enabled!)"
    );
    ensure!(probe::matching("ctest:*").count() == 4, "glob ctest:*");
    ensure!(probe::matching("rtest:*").count() == 3, "glob rtest:*");
    ensure!(probe::matching("*:six").count() == 2, "glob *:six");
    ensure!(probe::lookup("rtest:nope").is_none());
    let mut line = Msg::new();
    for k in [
        ProbeKind::RustJmp,
        ProbeKind::RustEnabled,
        ProbeKind::CCall,
        ProbeKind::CTail,
        ProbeKind::CEnabled,
        ProbeKind::CEnabledTail,
    ] {
        let n = t.probe_sites().filter(|s| s.kind == k).count();
        ensure!(n >= 1, "no {} site in the image", k.name());
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!(" {}={n}", k.name()));
    }
    println!("probe sites by form:{line}");
    Ok(())
}

fn disabled_are_nops(t: &Table<'_>) -> Result<(), Msg> {
    check_sites(t, &[])?;
    let before = total_calls();
    for x in 0..10 {
        call_everything(x)?;
    }
    ensure!(
        !r_enabled(),
        "probe_enabled!(rtest, one) true while disabled"
    );
    ensure!(c_one_on() == 0, "C is-enabled true while disabled");
    ensure!(
        total_calls() == before,
        "handler ran while every probe was disabled"
    );
    for p in probe::matching("*") {
        ensure!(
            probe::info(p).is_some_and(|i| i.hits == 0),
            "probe {} has hits",
            p.0
        );
    }
    Ok(())
}

/// Before any other enable: `probe::enable` refuses (nothing written, no round) until
/// the kernel declares its trap route; then the route is declared.
fn enable_refused_without_trap_route(t: &Table<'_>) -> Result<(), Msg> {
    ensure!(
        !probe::int3_route_declared(),
        "the trap route was declared before the probe tests"
    );
    let before = snapshot(t);
    let tail = id("ctest:tail")?;
    let mut k = Poker::default();
    // SAFETY: refused before any write (no route declared).
    let r = unsafe { probe::enable(tail, handler, &mut k) };
    ensure!(
        r == Err(ProbeError::NoTrapRoute),
        "enable without a route: {r:?}"
    );
    ensure!(
        k.attempts == 0 && k.rounds == 0 && !probe::is_enabled(tail),
        "a refused enable wrote {} times, ran {} rounds",
        k.attempts,
        k.rounds
    );
    ensure!(snapshot(t) == before, "a refused enable changed a site");
    // SAFETY: the platform's vector hands every probe trap on every CPU to the loader
    // and writes the frame back; the vectors are set on every CPU before it runs kernel
    // code.
    unsafe { probe::declare_int3_route() };
    enable(tail)?;
    check_sites(t, &[tail])?;
    disable(tail)?;
    ensure!(snapshot(t) == before);
    Ok(())
}

fn enable_patches_only_its_sites(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let one = id("rtest:one")?;
    enable(one)?;
    check_sites(t, &[one])?;
    ensure!(
        probe::is_enabled(one) && r_enabled(),
        "rtest:one not reported enabled"
    );
    let c0 = calls(one);
    ensure!(r_one(black_box(7)) == 8);
    ensure!(calls(one) == c0 + 1, "r_one did not fire");
    ensure!(LAST_ID.load(Ordering::Relaxed) == one.0, "wrong probe id");
    ensure!(last_args() == [7, 0, 0, 0, 0, 0], "args {:?}", last_args());
    ensure!(r_one_again(black_box(3)) == 5);
    ensure!(last_args()[0] == 30, "second site args {:?}", last_args());
    ensure!(calls(one) == c0 + 2);
    disable(one)?;
    ensure!(
        snapshot(t) == before,
        "disable did not restore the exact bytes"
    );
    ensure!(!probe::is_enabled(one) && !r_enabled());
    ensure!(
        r_one(1) == 2 && calls(one) == c0 + 2,
        "fired while disabled"
    );
    Ok(())
}

/// Like `enable_patches_only_its_sites`, for each C probe: all other sites unchanged.
fn c_enable_patches_only_its_sites(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    for spec in ["ctest:zero", "ctest:one", "ctest:six", "ctest:tail"] {
        let p = id(spec)?;
        enable(p)?;
        check_sites(t, &[p]).map_err(|e| msg!("{spec}: {e}"))?;
        disable(p)?;
        ensure!(
            snapshot(t) == before,
            "{spec}: disable did not restore the exact bytes"
        );
    }
    Ok(())
}

fn arguments_0_1_6() -> Result<(), Msg> {
    type Fire = fn() -> Result<(), Msg>;
    let cases: [(&str, Fire, [u64; 6]); 6] = [
        (
            "rtest:zero",
            || {
                ensure!(r_zero() == 1);
                Ok(())
            },
            [0; 6],
        ),
        (
            "rtest:six",
            || {
                ensure!(r_six(11, 22, 33, 44, 55, 66) == (11 ^ 22 ^ 33 ^ 44 ^ 55 ^ 66));
                Ok(())
            },
            [11, 22, 33, 44, 55, 66],
        ),
        (
            "ctest:zero",
            || {
                let w = c_work_now();
                // SAFETY: plain C function.
                ensure!(unsafe { c_fire_zero() } == w + 1);
                Ok(())
            },
            [0; 6],
        ),
        (
            "ctest:one",
            || {
                // SAFETY: plain C function.
                ensure!(unsafe { c_fire_one(0xfeed) } == 0xfeee);
                Ok(())
            },
            [0xfeed, 0, 0, 0, 0, 0],
        ),
        (
            "ctest:six",
            || {
                // SAFETY: plain C function.
                ensure!(unsafe { c_fire_six(1, 2, 3, 4, 5, 6) } == 21);
                Ok(())
            },
            [1, 2, 3, 4, 5, 6],
        ),
        (
            "kfuncs:bitmap",
            || {
                ensure!(kfuncs::bitmap_weight(&[u64::MAX; 5]) == 320);
                Ok(())
            },
            [5, 0, 0, 0, 0, 0],
        ),
    ];
    for (spec, fire, want) in cases {
        let p = id(spec)?;
        enable(p)?;
        for a in &LAST_ARGS {
            a.store(0xdead, Ordering::Relaxed);
        }
        let (c0, h0) = (calls(p), hits(p));
        fire()?;
        let got = last_args();
        disable(p)?;
        ensure!(calls(p) == c0 + 1, "{spec}: fired {} times", calls(p) - c0);
        ensure!(hits(p) == h0 + 1, "{spec}: registry hits {}", hits(p) - h0);
        ensure!(LAST_ID.load(Ordering::Relaxed) == p.0, "{spec}: wrong id");
        let n = probe::info(p).map_or(0, |i| i.nargs as usize);
        ensure!(
            got[..n] == want[..n],
            "{spec}: args {got:?}, expected {want:?}"
        );
    }
    // A guarded C site: the is-enabled check and the probe it guards.
    let six = id("ctest:six")?;
    let c0 = calls(six);
    // SAFETY: plain C function.
    let w = unsafe { c_guarded(2) };
    ensure!(
        calls(six) == c0 && w == 2 + c_work_now(),
        "guarded probe fired while disabled"
    );
    enable(six)?;
    // SAFETY: plain C function.
    unsafe { c_guarded(2) };
    let got = last_args();
    disable(six)?;
    ensure!(
        calls(six) == c0 + 1,
        "guarded probe did not fire once enabled"
    );
    ensure!(got == [2, 4, 6, 8, 10, 12], "guarded args {got:?}");
    Ok(())
}

fn is_enabled_reports_state() -> Result<(), Msg> {
    let one = id("ctest:one")?;
    let r = id("rtest:one")?;
    ensure!(c_one_on() == 0 && !r_enabled());
    enable(one)?;
    ensure!(c_one_on() == 1, "C is-enabled tail site not 1");
    ensure!(!r_enabled(), "Rust is-enabled of another probe flipped");
    enable(r)?;
    ensure!(r_enabled() && probe::is_enabled(r));
    disable(one)?;
    disable(r)?;
    ensure!(c_one_on() == 0 && !r_enabled() && !probe::is_enabled(one));
    Ok(())
}

fn c_tail_returns() -> Result<(), Msg> {
    let tail = id("ctest:tail")?;
    let c0 = calls(tail);
    let traps0 = traps_on_cpu(0);
    let w = c_work_now();
    // SAFETY: plain C function.
    unsafe { c_fire_tail(5) };
    ensure!(
        c_work_now() == w + 5 && calls(tail) == c0,
        "disabled tail site"
    );
    enable(tail)?;
    // SAFETY: plain C function; its tail site is the probe trap, which fires and
    // returns for it.
    unsafe { c_fire_tail(7) };
    let got = last_args();
    ensure!(
        c_work_now() == w + 12,
        "enabled tail site did not return into the caller correctly"
    );
    ensure!(
        calls(tail) == c0 + 1 && got[0] == 7,
        "tail probe: calls {} args {got:?}",
        calls(tail) - c0
    );
    ensure!(
        traps_on_cpu(0) == traps0 + 1,
        "{} traps for one enabled tail call",
        traps_on_cpu(0) - traps0
    );
    disable(tail)?;
    // SAFETY: plain C function.
    unsafe { c_fire_tail(1) };
    ensure!(calls(tail) == c0 + 1 && c_work_now() == w + 13);
    ensure!(
        traps_on_cpu(0) == traps0 + 1,
        "a disabled tail site trapped"
    );
    Ok(())
}

fn toggle_10000(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let r = id("rtest:one")?;
    let c = id("ctest:one")?;
    let (r0, c0) = (calls(r), calls(c));
    let (rh0, ch0) = (hits(r), hits(c));
    let rounds0 = smp::ROUNDS.load(Ordering::SeqCst);
    const N: u64 = 10_000;
    for i in 0..N {
        let p = if i % 2 == 0 { r } else { c };
        enable(p)?;
        ensure!(r_one(i) == i + 1 && r_one_again(i) == i + 2);
        // SAFETY: plain C function.
        ensure!(unsafe { c_fire_one(i) } == i + 1);
        disable(p)?;
        ensure!(r_one(i) == i + 1);
        // SAFETY: plain C function.
        ensure!(unsafe { c_fire_one(i) } == i + 1);
    }
    // Even iterations enable rtest:one (2 hits each), odd ones ctest:one (1 hit each).
    ensure!(
        calls(r) - r0 == N,
        "rtest:one handler calls {} != {N}",
        calls(r) - r0
    );
    ensure!(
        calls(c) - c0 == N / 2,
        "ctest:one handler calls {} != {}",
        calls(c) - c0,
        N / 2
    );
    let (rh, ch) = (hits(r) - rh0, hits(c) - ch0);
    ensure!(rh == N && ch == N / 2, "registry hits {rh}/{ch}");
    ensure!(snapshot(t) == before, "bytes differ after 10,000 toggles");
    let rounds = smp::ROUNDS.load(Ordering::SeqCst) - rounds0;
    ensure!(
        rounds == 2 * N,
        "{rounds} sync rounds for {} batches",
        2 * N
    );
    println!(
        "toggled probes {N} times: rtest:one {rh} hits, ctest:one {ch} hits; {} batches, {rounds} sync rounds",
        2 * N
    );
    Ok(())
}

/// One synchronisation round per batch, not per site: each probe's enable and disable
/// write each of its sites once and call `sync_cores` once.
fn one_sync_round_per_batch() -> Result<(), Msg> {
    let mut line = Msg::new();
    for p in probe::matching("*") {
        let i = probe::info(p).ok_or_else(|| msg!("no info for probe {}", p.0))?;
        for on in [true, false] {
            let mut k = Poker::default();
            let rounds0 = smp::ROUNDS.load(Ordering::SeqCst);
            // SAFETY: as in `enable`.
            unsafe {
                if on {
                    probe::enable(p, handler, &mut k)
                } else {
                    probe::disable(p, &mut k)
                }
            }
            .map_err(Msg::display)?;
            let rounds = smp::ROUNDS.load(Ordering::SeqCst) - rounds0;
            ensure!(
                k.rounds == 1 && rounds == 1 && k.writes == i.sites as usize,
                "{}:{} on={on}: {} sites, {} writes, {} sync_cores calls ({rounds} rounds)",
                i.provider,
                i.name,
                i.sites,
                k.writes,
                k.rounds
            );
        }
        let _ = core::fmt::Write::write_fmt(
            &mut line,
            format_args!(" {}:{}={}", i.provider, i.name, i.sites),
        );
    }
    println!("probe batches: 1 sync round each; sites per batch:{line}");
    Ok(())
}

fn failed_batch_restores(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let six = id("ctest:six")?;
    let sites = probe::info(six).map_or(0, |i| i.sites as usize);
    ensure!(sites >= 2, "ctest:six has {sites} sites");
    // Fail each write of an enable batch, then of a disable batch, in turn (one store
    // per site): every site is restored, the state is unchanged, and the failed batch
    // with its rollback costs one sync round.
    for on in [true, false] {
        if !on {
            enable(six)?;
        }
        let want = snapshot(t);
        for fail_at in 0..sites {
            let mut k = Poker::failing_at(fail_at, false);
            // SAFETY: as in `enable`.
            let r = unsafe {
                if on {
                    probe::enable(six, handler, &mut k)
                } else {
                    probe::disable(six, &mut k)
                }
            };
            ensure!(
                matches!(r, Err(ProbeError::Poke(_))),
                "on={on} fail_at {fail_at}: {r:?}"
            );
            ensure!(
                probe::is_enabled(six) != on,
                "on={on} fail_at {fail_at}: state changed"
            );
            ensure!(
                snapshot(t) == want,
                "on={on} fail_at {fail_at}: sites not restored"
            );
            ensure!(
                k.rounds == 1,
                "on={on} fail_at {fail_at}: {} sync rounds",
                k.rounds
            );
        }
    }
    disable(six)?;
    ensure!(snapshot(t) == before);

    // A poker that fails for good from the 2nd write: the rollback cannot finish, says
    // which site, leaves the probe disabled and behaving as disabled, and the next batch
    // with a working poker repairs it.
    let mut k = Poker::failing_at(1, true);
    // SAFETY: as in `enable`.
    let r = unsafe { probe::enable(six, handler, &mut k) };
    ensure!(
        matches!(r, Err(ProbeError::RollbackIncomplete { .. })),
        "{r:?}"
    );
    ensure!(!probe::is_enabled(six));
    let c0 = calls(six);
    // SAFETY: plain C functions.
    unsafe {
        ensure!(c_fire_six(1, 1, 1, 1, 1, 1) == 6 && c_guarded(3) == 3 + c_work_now());
    }
    ensure!(calls(six) == c0, "a half-restored disabled probe fired");
    enable(six)?;
    check_sites(t, &[six])?;
    disable(six)?;
    ensure!(snapshot(t) == before, "not repaired by the next batches");
    Ok(())
}

/// Every probe site is executable and read-only at its own address (a write does not
/// translate), and every write of these tests went through the writable alias.
pub(crate) fn text_still_read_only(t: &Table<'_>) -> Result<(), Msg> {
    let l = mmu::layout();
    for s in t.probe_sites() {
        ensure!(
            (l.text_start..l.text_end).contains(&s.addr),
            "site {:#x} outside text",
            s.addr
        );
        ensure!(
            !translates(s.addr, true) && translates(s.addr, false),
            "site {:#x}: writable (or unmapped) at its own address",
            s.addr
        );
    }
    let (writes, checks, violations) = (
        WX.writes.load(Ordering::SeqCst),
        WX.checks.load(Ordering::SeqCst),
        WX.violations.load(Ordering::SeqCst),
    );
    ensure!(
        violations == 0,
        "{violations} writes found their site writable at its own address or the alias not writable, first at {:#x}",
        WX.first_violation.load(Ordering::SeqCst)
    );
    ensure!(
        writes > 0 && checks >= writes,
        "alias writes {writes}, checks {checks}"
    );
    println!(
        "probes: text read-only at its own address: {writes} writes through the alias, {checks} {} checks, 0 violations",
        testing::TRANSLATION_CHECK
    );
    Ok(())
}

/// Runs the probe tests, with the other CPUs parked (waiting for an interrupt).
pub fn run(h: &mut Harness) {
    super::smp_tests::park_others();
    run_parked(h);
    if !super::smp_tests::unpark_others() {
        h.check("probe_unpark_other_cpus", Err("a parked CPU did not wake"));
    }
}

fn run_parked(h: &mut Harness) {
    let table = match super::ksites_table() {
        Ok(t) => t,
        Err(e) => {
            h.check("probe_table", Err(e));
            return;
        }
    };
    set_table(table);
    // SAFETY: `trap_hook` passes every trap to `probe::handle_int3` and returns its result.
    unsafe { probe::set_int3_hook(Some(trap_hook)) };
    match probe::register_image(table, &AliasPoker::default()) {
        Ok(n) => println!(
            "probes: {n} registered, {} sites ({} in rtest:one)",
            table.probe_site_count(),
            probe::lookup("rtest:one").map_or(0, |p| table
                .probe_sites()
                .filter(|s| s.probe == p.0)
                .count())
        ),
        Err(e) => {
            h.check("probe_register", Err(e));
            return;
        }
    }
    h.check("probe_registry_lookup_glob_nargs", registry(&table));
    h.check("probe_disabled_sites_are_nops", disabled_are_nops(&table));
    h.check(
        "probe_enable_refused_without_brk_route",
        enable_refused_without_trap_route(&table),
    );
    h.check(
        "probe_enable_c_probe_patches_only_its_sites",
        c_enable_patches_only_its_sites(&table),
    );
    h.check(
        "probe_enable_patches_only_its_sites",
        enable_patches_only_its_sites(&table),
    );
    h.check("probe_arguments_0_1_6_rust_and_c", arguments_0_1_6());
    h.check("probe_is_enabled_reports_state", is_enabled_reports_state());
    h.check("probe_c_tail_call_returns", c_tail_returns());
    h.check("probe_toggle_10000_counts_exact", toggle_10000(&table));
    h.check("probe_one_sync_round_per_batch", one_sync_round_per_batch());
    h.check(
        "probe_failed_batch_restores_sites",
        failed_batch_restores(&table),
    );
    h.check("probe_text_read_only_after", text_still_read_only(&table));
    // The hook stays installed: the SMP tests run probe sites on every CPU.
}
