//! SDT probes, checked inside the booted kernel: Rust `probe!`/`probe_enabled!` sites and
//! dtrace-style C sites (c/cprobes.c, rewritten by `ksites embed`), with 0, 1 and 6
//! arguments, in several functions and two crates; enabling and disabling them live with
//! the int3 protocol; and a CPU forced through the int3 emulation mid-patch.
//!
//! Live patching goes through [`AliasPoker`] (text is never writable); these tests run
//! on the boot CPU while the APs, if any, are parked. [`bp_hook`] (installed here and
//! left installed for [`crate::smp_tests`]) also counts, per CPU and per probe, the
//! traps the loader emulated.

use core::cell::UnsafeCell;
use core::hint::black_box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kernel_loader::format::{PSite, ProbeKind, Table};
use kernel_loader::patch::{PokeError, TextPoker};
use kernel_loader::probe::{self, Int3Frame, ProbeError, ProbeId};
use kernel_loader::{cell, probe_enabled};

use crate::harness::{Harness, Msg};
use crate::poker::{AliasPoker, WpPoker};
use crate::smp::{self, MAX_CPUS};
use crate::{ensure, msg, paging, println};

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

fn c_work_now() -> u64 {
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

/// The image's table, for [`bp_hook`] to name the probe of a trapping site.
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
        // SAFETY: not yet published, and only the boot CPU calls this (once, before
        // any AP runs a probe site).
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

/// Per CPU: int3 traps the loader emulated.
static INT3_BY_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: emulated traps at a site that held no `int3` while no batch of its probe
/// was in flight: the CPU ran a stale translation.
static STALE_BY_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Emulated traps at a site of the probe whose batch is in flight that no longer held
/// `int3` when the hook looked: the batch's final byte landed after the trap.
static LATE: AtomicU64 = AtomicU64::new(0);
/// Per probe: emulated traps on an AP at a site that held `int3` in memory.
static AP_TRAPS_BY_PROBE: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
/// Per CPU: while inside [`bp_hook`] for a probe site, 1 + the probe, with
/// [`HELD_INT3`] set if the site held `int3` in memory; else 0.
static IN_BP: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
const HELD_INT3: u32 = 1 << 31;

/// Per CPU: emulated traps at sites that are not probe sites (static key and ifunc
/// sites mid-patch).
static OTHER_BY_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Emulated traps on the APs at sites that are not probe sites (static key and ifunc
/// sites being patched).
pub(crate) fn other_traps_on_aps() -> u64 {
    OTHER_BY_CPU
        .iter()
        .take(crate::smp::online())
        .skip(1)
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// Emulated int3 traps on CPU `cpu`.
pub(crate) fn int3_on_cpu(cpu: usize) -> u64 {
    INT3_BY_CPU[cpu].load(Ordering::Relaxed)
}

/// Emulated traps on CPU `cpu` that ran a stale translation of a site: it held no
/// `int3` and no batch of its probe was in flight (QEMU's TCG; see [`bp_hook`]).
pub(crate) fn stale_on_cpu(cpu: usize) -> u64 {
    STALE_BY_CPU[cpu].load(Ordering::Relaxed)
}

/// Emulated traps, on any CPU, at a site of the probe being patched whose final byte
/// was written between the trap and the hook's look at it.
pub(crate) fn late_traps() -> u64 {
    LATE.load(Ordering::Relaxed)
}

/// Emulated traps on APs at sites of probe `p` that held `int3` in memory.
pub(crate) fn ap_traps_on(p: ProbeId) -> u64 {
    AP_TRAPS_BY_PROBE
        .get(p.0 as usize)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// While this CPU is inside [`bp_hook`] for a probe site: the probe, and whether the
/// site held `int3` in memory when the hook looked.
pub(crate) fn in_bp_for(cpu: usize) -> Option<(ProbeId, bool)> {
    match IN_BP[cpu].load(Ordering::Relaxed) {
        0 => None,
        v => Some((ProbeId((v & !HELD_INT3) - 1), v & HELD_INT3 != 0)),
    }
}

/// The #BP hook (`probe::set_int3_hook`: the crate's `int3_entry` runs it instead of
/// `handle_int3`): hands the trap to the loader's emulation, counting what it emulated.
///
/// It also reads the trapping site's first byte. Normally it is `int3` (the CPU ran
/// the site mid-patch, or an enabled C tail site). If not, either a batch of the
/// site's probe is in flight and wrote the final byte after the trap ("late"), or this
/// CPU ran a *stale translation*: QEMU's multi-threaded TCG links a translation block
/// (and write-protects its page) only after reading the guest code, so a write by
/// another CPU racing a translation of a page that had no translations is not seen,
/// and the old code keeps running until the next write that overlaps it. Such traps
/// are emulated like any other (the table is static, the state is the probe's current
/// one) and counted apart.
pub(crate) fn bp_hook(f: &mut Int3Frame) -> bool {
    let cpu = smp::cpu_index();
    let site = f.rip.wrapping_sub(1);
    let probe = table().and_then(|t| t.probe_site_at(site)).map(|s| s.probe);
    let held = probe.is_some() && read5(site)[0] == 0xcc;
    IN_BP[cpu].store(
        probe.map_or(0, |p| (p + 1) | if held { HELD_INT3 } else { 0 }),
        Ordering::Relaxed,
    );
    // SAFETY: `f` is this CPU's interrupted context, given by the crate's #BP entry
    // (`probe::int3_entry`, installed in vector 3), which writes it back.
    let mut handled = unsafe { probe::handle_int3(f) };
    IN_BP[cpu].store(0, Ordering::Relaxed);
    if !handled && probe.is_none() {
        // Counted, and failed by the retarget tests: see the function.
        handled = crate::retarget_tests::emulate_unhandled_ifunc_trap(f);
    }
    if handled {
        INT3_BY_CPU[cpu].fetch_add(1, Ordering::Relaxed);
        if probe.is_none() {
            // A static key or ifunc site the loader is patching (issue 18).
            OTHER_BY_CPU[cpu].fetch_add(1, Ordering::Relaxed);
        } else if !held {
            if probe.is_some_and(crate::smp_tests::batch_in_flight) {
                LATE.fetch_add(1, Ordering::Relaxed);
            } else {
                STALE_BY_CPU[cpu].fetch_add(1, Ordering::Relaxed);
            }
        } else if cpu != 0
            && let Some(c) = probe.and_then(|p| AP_TRAPS_BY_PROBE.get(p as usize))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    handled
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn id(spec: &str) -> Result<ProbeId, Msg> {
    probe::lookup(spec).ok_or_else(|| msg!("probe {spec} not registered"))
}

pub(crate) fn read5(addr: u64) -> [u8; 5] {
    let mut b = [0u8; 5];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: probe sites lie in mapped text (validated).
        *x = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
    }
    b
}

const MAX_SITES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    n: usize,
    bytes: [(u64, [u8; 5]); MAX_SITES],
}

fn snapshot(t: &Table<'_>) -> Snapshot {
    let mut s = Snapshot {
        n: 0,
        bytes: [(0, [0; 5]); MAX_SITES],
    };
    for site in t.probe_sites().take(MAX_SITES) {
        s.bytes[s.n] = (site.addr, read5(site.addr));
        s.n += 1;
    }
    s
}

/// Every site of `id` holds its `on` form, and every other site its disabled form.
pub(crate) fn check_sites(t: &Table<'_>, on_probe: Option<ProbeId>) -> Result<(), Msg> {
    for s in t.probe_sites() {
        let on = on_probe == Some(ProbeId(s.probe));
        let want = probe::site_bytes(&s, on).map_err(|e| msg!("{e}"))?;
        let found = read5(s.addr);
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

fn enable(id: ProbeId) -> Result<(), Msg> {
    let mut p = AliasPoker::default();
    // SAFETY: the #BP hook is installed; AliasPoker writes through an alias and
    // serializes every online CPU (the APs are parked, not running the sites).
    unsafe { probe::enable(id, handler, &mut p) }.map_err(|e| msg!("enable {}: {e}", id.0))?;
    ensure!(
        p.syncs == 3,
        "enable used {} serializations, expected 3 (one batch)",
        p.syncs
    );
    Ok(())
}

fn disable(id: ProbeId) -> Result<(), Msg> {
    let mut p = AliasPoker::default();
    // SAFETY: as in `enable`.
    unsafe { probe::disable(id, &mut p) }.map_err(|e| msg!("disable {}: {e}", id.0))
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
    let kinds = |k: ProbeKind| t.probe_sites().filter(|s| s.kind == k).count();
    for k in [
        ProbeKind::RustJmp,
        ProbeKind::RustEnabled,
        ProbeKind::CCall,
        ProbeKind::CTail,
        ProbeKind::CEnabled,
        ProbeKind::CEnabledTail,
    ] {
        ensure!(kinds(k) >= 1, "no {} site in the image", k.name());
    }
    Ok(())
}

fn disabled_are_nops(t: &Table<'_>) -> Result<(), Msg> {
    check_sites(t, None)?;
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

fn enable_patches_only_its_sites(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let one = id("rtest:one")?;
    enable(one)?;
    check_sites(t, Some(one))?;
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
        check_sites(t, Some(p)).map_err(|e| msg!("{spec}: {e}"))?;
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
        let c0 = calls(p);
        fire()?;
        let got = last_args();
        disable(p)?;
        ensure!(calls(p) == c0 + 1, "{spec}: fired {} times", calls(p) - c0);
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
    let w = c_work_now();
    // SAFETY: plain C function.
    unsafe { c_fire_tail(5) };
    ensure!(
        c_work_now() == w + 5 && calls(tail) == c0,
        "disabled tail site"
    );
    enable(tail)?;
    // SAFETY: plain C function; its tail site traps, fires and returns for it.
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
    disable(tail)?;
    // SAFETY: plain C function.
    unsafe { c_fire_tail(1) };
    ensure!(calls(tail) == c0 + 1 && c_work_now() == w + 13);
    Ok(())
}

fn toggle_10000(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let r = id("rtest:one")?;
    let c = id("ctest:one")?;
    let (r0, c0) = (calls(r), calls(c));
    let (rh0, ch0) = (
        probe::info(r).map_or(0, |i| i.hits),
        probe::info(c).map_or(0, |i| i.hits),
    );
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
        "rtest:one handler calls {} != {}",
        calls(r) - r0,
        N
    );
    ensure!(
        calls(c) - c0 == N / 2,
        "ctest:one handler calls {} != {}",
        calls(c) - c0,
        N / 2
    );
    let rh = probe::info(r).map_or(0, |i| i.hits) - rh0;
    let ch = probe::info(c).map_or(0, |i| i.hits) - ch0;
    ensure!(rh == N && ch == N / 2, "registry hits {rh}/{ch}");
    ensure!(snapshot(t) == before, "bytes differ after 10,000 toggles");
    println!("toggled probes {N} times: rtest:one {rh} hits, ctest:one {ch} hits");
    Ok(())
}

/// A poker that, right after the `cc` round (the first `sync_cores`), runs `sites` on
/// this CPU (text is read-only, as always), as a concurrent CPU would: every site of
/// the batch then holds `int3` and must be emulated into the state it is becoming.
struct MidPatch<F: FnMut() -> [u64; 3]> {
    inner: AliasPoker,
    fired: bool,
    sites: F,
    results: [u64; 3],
}

impl<F: FnMut() -> [u64; 3]> MidPatch<F> {
    fn new(sites: F) -> Self {
        MidPatch {
            inner: AliasPoker::default(),
            fired: false,
            sites,
            results: [0; 3],
        }
    }

    /// Enables or disables `p` through this poker; returns what `sites` returned.
    fn toggle(mut self, p: ProbeId, on: bool) -> Result<[u64; 3], Msg> {
        // SAFETY: the #BP hook is installed; the inner poker writes through an alias.
        unsafe {
            if on {
                probe::enable(p, handler, &mut self)
            } else {
                probe::disable(p, &mut self)
            }
        }
        .map_err(|e| msg!("{e}"))?;
        ensure!(self.fired, "the batch never serialized");
        Ok(self.results)
    }
}

impl<F: FnMut() -> [u64; 3]> TextPoker for MidPatch<F> {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.inner.begin()
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: forwarded from the engine.
        unsafe { self.inner.write(addr, bytes) }
    }

    fn sync_cores(&mut self) {
        self.inner.sync_cores();
        if self.fired {
            return;
        }
        self.fired = true;
        self.results = (self.sites)();
    }

    fn end(&mut self) {
        self.inner.end()
    }
}

fn int3_mid_patch(t: &Table<'_>) -> Result<(), Msg> {
    let r = id("rtest:one")?;
    let em0 = probe::int3_emulations();
    for on in [true, false] {
        let c0 = calls(r);
        let results =
            MidPatch::new(|| [r_one(40), r_one_again(4), u64::from(r_enabled())]).toggle(r, on)?;
        let want = [41, 6, u64::from(on)];
        ensure!(
            results == want,
            "on={on}: results {results:?}, expected {want:?}"
        );
        let fired = calls(r) - c0;
        ensure!(
            fired == if on { 2 } else { 0 },
            "on={on}: fired {fired} times mid-patch"
        );
        check_probe_sites(t, r, on)?;
    }
    let em = probe::int3_emulations() - em0;
    ensure!(em == 6, "{em} int3 emulations for 2 x 3 site executions");
    let em1 = probe::int3_emulations();
    c_sites_mid_patch()?;
    let em_c = probe::int3_emulations() - em1;
    println!("int3 emulations: {em} in rtest:one batches, {em_c} in C probe batches");
    Ok(())
}

fn check_probe_sites(t: &Table<'_>, p: ProbeId, on: bool) -> Result<(), Msg> {
    for s in t.probe_sites().filter(|s| s.probe == p.0) {
        let want = probe::site_bytes(&s, on).map_err(|e| msg!("{e}"))?;
        ensure!(
            read5(s.addr) == want,
            "site {:#x} not in state {on}",
            s.addr
        );
    }
    Ok(())
}

/// Each C probe's own batch runs its sites mid-patch: call (ctest:one), tail
/// (ctest:tail), is-enabled call and tail (ctest:six's guard, ctest:one's check).
fn c_sites_mid_patch() -> Result<(), Msg> {
    let run = |spec: &str| -> [u64; 3] {
        let w = c_work_now();
        // SAFETY: plain C functions.
        unsafe {
            match spec {
                "ctest:one" => [c_fire_one(20), c_one_enabled() as u64, 0],
                "ctest:tail" => {
                    c_fire_tail(3);
                    [c_work_now() - w, 0, 0]
                }
                _ => [c_guarded(1) - c_work_now(), c_fire_six(1, 1, 1, 1, 1, 1), 0],
            }
        }
    };
    for (spec, on_out, off_out, fires_on) in [
        ("ctest:one", [21, 1, 0], [21, 0, 0], 1u64),
        ("ctest:tail", [3, 0, 0], [3, 0, 0], 1),
        ("ctest:six", [1, 6, 0], [1, 6, 0], 2),
    ] {
        let p = id(spec)?;
        for on in [true, false] {
            let em0 = probe::int3_emulations();
            let c0 = calls(p);
            let out = MidPatch::new(|| run(spec)).toggle(p, on)?;
            let want = if on { on_out } else { off_out };
            ensure!(
                out == want,
                "{spec} on={on}: results {out:?}, expected {want:?}"
            );
            let fired = calls(p) - c0;
            ensure!(
                fired == if on { fires_on } else { 0 },
                "{spec} on={on}: fired {fired} times mid-patch"
            );
            ensure!(
                probe::int3_emulations() > em0,
                "{spec} on={on}: no int3 emulation"
            );
        }
    }
    Ok(())
}

/// An alias poker that fails its `from`-th write, once or for good.
fn failing(from: usize, forever: bool) -> AliasPoker {
    let mut p = AliasPoker::failing_at(from);
    p.fail_forever = forever;
    p
}

fn failed_batch_restores(t: &Table<'_>) -> Result<(), Msg> {
    let before = snapshot(t);
    let six = id("ctest:six")?;
    let sites = probe::info(six).map_or(0, |i| i.sites as usize);
    // Fail each write of an enable batch, then of a disable batch, in turn (3 rounds of
    // `sites` writes each): every site is restored and the state is unchanged.
    for on in [true, false] {
        if !on {
            enable(six)?;
        }
        let want = snapshot(t);
        for fail_at in 0..3 * sites {
            let mut p = failing(fail_at, false);
            // SAFETY: #BP hook installed; the APs are parked; the poker writes through the alias.
            let r = unsafe {
                if on {
                    probe::enable(six, handler, &mut p)
                } else {
                    probe::disable(six, &mut p)
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
            ensure!(paging::write_protect_enabled(), "WP left clear");
        }
    }
    disable(six)?;
    ensure!(snapshot(t) == before);

    // A poker that fails for good from the 2nd write: the rollback cannot finish, says
    // which site, leaves the probe disabled and behaving as disabled (a `cc` residue is
    // emulated), and the next batch with a working poker repairs it.
    let mut p = failing(1, true);
    // SAFETY: #BP hook installed; the APs are parked; the poker writes through the alias.
    let r = unsafe { probe::enable(six, handler, &mut p) };
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
    check_probe_sites(t, six, true)?;
    disable(six)?;
    ensure!(snapshot(t) == before, "not repaired by the next batches");
    Ok(())
}

fn text_still_read_only(t: &Table<'_>) -> Result<(), Msg> {
    ensure!(
        paging::write_protect_enabled(),
        "CR0.WP clear after probe patching"
    );
    for s in t.probe_sites() {
        let pi = paging::translate(s.addr).ok_or_else(|| msg!("site {:#x} unmapped", s.addr))?;
        ensure!(
            !pi.writable && pi.executable,
            "site {:#x}: writable text",
            s.addr
        );
    }
    // What the alias poker checked from the page tables during every write.
    let stats = &crate::poker::ALIAS_STATS;
    let (writes, checks, scans, violations) = (
        stats.writes.load(Ordering::SeqCst),
        stats.checks.load(Ordering::SeqCst),
        stats.scans.load(Ordering::SeqCst),
        stats.violations.load(Ordering::SeqCst),
    );
    ensure!(
        violations == 0,
        "{violations} page-table violations while the alias was mapped, first at {:#x}",
        stats.first_violation.load(Ordering::SeqCst)
    );
    ensure!(
        writes > 0 && checks >= writes && scans > 0,
        "alias writes {writes}, checks {checks}, W^X scans {scans}"
    );
    ensure!(
        paging::translate(paging::POKE_WINDOW).is_none(),
        "poke window left mapped"
    );
    Ok(())
}

fn sites_for<'a>(t: &'a Table<'_>, p: ProbeId) -> impl Iterator<Item = PSite> + 'a {
    t.probe_sites().filter(move |s| s.probe == p.0)
}

/// Runs the probe tests.
pub fn run(h: &mut Harness) {
    let text = paging::text_range();
    // SAFETY: as in ifunc_tests: the image was embedded; the table is mapped, read-only.
    let table = match unsafe { cell::image_table(&[text]) } {
        Ok(t) => t,
        Err(e) => {
            h.check("probe_table", Err(e));
            return;
        }
    };
    set_table(table);
    // SAFETY: `bp_hook` passes every trap to `probe::handle_int3` and returns its result.
    unsafe { probe::set_int3_hook(Some(bp_hook)) };
    let poker = WpPoker::default();
    match probe::register_image(table, &poker) {
        Ok(n) => println!(
            "probes: {n} registered, {} sites ({} in rtest:one)",
            table.probe_site_count(),
            probe::lookup("rtest:one").map_or(0, |p| sites_for(&table, p).count())
        ),
        Err(e) => {
            h.check("probe_register", Err(e));
            return;
        }
    }
    h.check("probe_registry_lookup_glob_nargs", registry(&table));
    h.check("probe_disabled_sites_are_nops", disabled_are_nops(&table));
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
    h.check("probe_int3_emulation_mid_patch", int3_mid_patch(&table));
    h.check(
        "probe_failed_batch_restores_sites",
        failed_batch_restores(&table),
    );
    h.check("probe_text_read_only_after", text_still_read_only(&table));
    // The hook stays installed: the SMP tests run probe sites on every CPU.
}
