//! Live retargeting of ifuncs (issue 18), checked inside the booted kernel.
//!
//! The test ifunc [`retarget_tag`] has two implementations that report themselves:
//! [`tag_a`] and [`tag_b`] return `x ^ TAG_A` / `x ^ TAG_B` and count their calls per
//! CPU. Its resolver picks `tag_b` when the CPU has SSE2 (every x86-64 CPU), so boot
//! patching chooses it, and a re-resolution without features chooses `tag_a`. The kernel
//! exports it to modules as `retarget_tag` (rmod and cmod import it).
//!
//! * every site (counted from the table, decoded through `introspect`) and the slot
//!   follow a retarget, for the test ifunc and for `kfuncs::popcount`; retargeting to
//!   the current target writes nothing; a non-ifunc address is refused;
//! * a failing poker at every write of a batch: an error, every site and the slot as
//!   before;
//! * modules: loaded after a retarget, their sites call the current target; a retarget
//!   while they are loaded rewrites their sites too;
//! * `reresolve_all` without features picks every baseline, and with the CPU's features
//!   again the boot choices;
//! * with several CPUs: [`RETARGETS`] retargets between `tag_a` and `tag_b` by CPU 0
//!   while the APs call the ifunc (a call site, a tail call, through the slot): every
//!   result right, the implementations' own call counts equal to the calls the APs
//!   attributed to them, and every settled call (see [`crate::live_seq`]) in the
//!   implementation the ifunc had.

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::format::{SiteKind, Table};
use kernel_loader::ifunc::{reresolve_all, retarget_raw};
use kernel_loader::introspect::{LiveImage, SiteState};
use kernel_loader::module::Module;
use kernel_loader::probe::Int3Frame;
use kernel_loader::{CpuFeatures, ifunc};

use crate::harness::{Harness, Msg};
use crate::ifunc_tests::{self as it, RawChoice, read_bytes, read_slot};
use crate::live_seq::{Crew, NAP_US, Seq, ms_since};
use crate::module_tests::{self as mt, Env};
use crate::poker::AliasPoker;
use crate::probe_tests as pt;
use crate::smp::{self, MAX_CPUS};
use crate::{apic, cpu, ensure, msg, println};

/// What [`tag_a`] XORs into its argument.
pub const TAG_A: u64 = 0x7a7a_0000_0000_0000;
/// What [`tag_b`] XORs into its argument.
pub const TAG_B: u64 = 0x7b7b_0000_0000_0000;

static CALLS_A: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CALLS_B: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Implementation A of [`retarget_tag`]: counts the call on this CPU, returns `x ^ TAG_A`.
///
/// # Safety
///
/// None: safe on every CPU (`unsafe` to match the ifunc's slot type).
// Unmangled: one definition, so its address is the same from every codegen unit (LLVM
// may otherwise give a unit its own copy, and the slot another address than `tag_a`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tag_a(x: u64) -> u64 {
    CALLS_A[smp::cpu_index()].fetch_add(1, Ordering::Relaxed);
    x ^ TAG_A
}

/// Implementation B of [`retarget_tag`]: counts the call on this CPU, returns `x ^ TAG_B`.
///
/// # Safety
///
/// None: safe on every CPU (`unsafe` to match the ifunc's slot type).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tag_b(x: u64) -> u64 {
    CALLS_B[smp::cpu_index()].fetch_add(1, Ordering::Relaxed);
    x ^ TAG_B
}

fn pick_tag(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 {
    if f.contains(CpuFeatures::SSE2) {
        tag_b
    } else {
        tag_a
    }
}

ifunc! {
    /// The retarget tests' ifunc: `x ^` the tag of the implementation that ran.
    pub fn retarget_tag(x: u64) -> u64;
    default = tag_a;
    resolver = pick_tag;
}

/// A call site of [`retarget_tag`] (not a tail call: the result is used after it).
#[inline(never)]
pub fn tag_call(x: u64) -> u64 {
    black_box(retarget_tag(x))
}

/// A tail call of [`retarget_tag`].
#[inline(never)]
pub extern "C" fn tag_tail(x: u64) -> u64 {
    retarget_tag(x)
}

/// A call through the slot (the trampoline, reached by a function pointer).
#[inline(never)]
fn tag_via_slot(x: u64) -> u64 {
    let f: extern "C" fn(u64) -> u64 = black_box(retarget_tag);
    f(x)
}

fn addr(f: unsafe extern "C" fn(u64) -> u64) -> u64 {
    f as *const () as u64
}

/// `tag_a` or `tag_b` by address, for [`crate::ifunc_tests::impl_name`].
pub(crate) fn impl_name(a: u64) -> Option<&'static str> {
    if a == addr(tag_a) {
        Some("tag_a")
    } else if a == addr(tag_b) {
        Some("tag_b")
    } else {
        None
    }
}

/// Traps at a kernel ifunc site that `probe::handle_int3` declined, per CPU.
static UNHANDLED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Traps at kernel ifunc sites the loader declined, on every CPU so far.
fn unhandled() -> u64 {
    UNHANDLED.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Called by the #BP hook (`probe_tests::bp_hook`) when `probe::handle_int3` declined
/// a trap outside any probe site. If it is at a kernel ifunc `call`/`jmp` site, the CPU
/// ran a stale QEMU translation of a retarget batch's `int3` (see
/// `probe_tests::bp_hook`) and reached the loader between two batches, when no retarget
/// was in flight: the loader must emulate that like a probe site's trap (the site's
/// current state is right in every case). This counts it (the retarget tests fail on
/// any) and carries on so the other tests still run: if the site holds `int3` again (the
/// next batch started meanwhile) it asks the loader once more, else it emulates the
/// branch the site holds. Anything else stays unhandled (`ud2`).
pub(crate) fn emulate_unhandled_ifunc_trap(f: &mut Int3Frame) -> bool {
    let site_addr = f.rip.wrapping_sub(1);
    let Some(s) = pt::table().and_then(|t| t.site_containing(site_addr)) else {
        return false;
    };
    if s.addr != site_addr {
        return false;
    }
    UNHANDLED[smp::cpu_index()].fetch_add(1, Ordering::Relaxed);
    let b: [u8; 8] = read_bytes(s.addr);
    let p = s.prefixes as usize;
    let at = s.len() - 4;
    let rel = i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let target = s.end().wrapping_add_signed(i64::from(rel));
    match (s.kind, b[p]) {
        (_, 0xcc) if p == 0 => {
            // SAFETY: `f` is this CPU's interrupted context (the caller's).
            return unsafe { kernel_loader::probe::handle_int3(f) };
        }
        (SiteKind::Call, 0xe8) => {
            f.rsp -= 8;
            // SAFETY: the interrupted stack, one word below its top: the #BP entry
            // leaves that gap for an emulated call (`probe::int3_entry`).
            unsafe { core::ptr::write_volatile(f.rsp as usize as *mut u64, s.end()) };
        }
        (SiteKind::Jmp, 0xe9) => {}
        _ => return false,
    }
    f.rip = target;
    true
}

fn calls(counters: &[AtomicU64; MAX_CPUS]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Which tag `r` (a result for argument `x`) carries: Some(true) for A, Some(false) for
/// B.
fn which(r: u64, x: u64) -> Option<bool> {
    match r ^ x {
        TAG_A => Some(true),
        TAG_B => Some(false),
        _ => None,
    }
}

/// Every call path gives `want`'s tag, and `want`'s counter counts them.
fn check_calls(want_a: bool) -> Result<(), Msg> {
    let (a0, b0) = (calls(&CALLS_A), calls(&CALLS_B));
    for x in [0u64, 1, 0xdead_beef] {
        for (path, r) in [
            ("call", tag_call(x)),
            ("tail call", tag_tail(x)),
            ("slot", tag_via_slot(x)),
        ] {
            ensure!(
                which(r, x) == Some(want_a),
                "{path}({x:#x}) = {r:#x}, expected implementation {}",
                if want_a { "A" } else { "B" }
            );
        }
    }
    let (da, db) = (calls(&CALLS_A) - a0, calls(&CALLS_B) - b0);
    ensure!(
        (da, db) == if want_a { (9, 0) } else { (0, 9) },
        "call counters moved by A {da}, B {db}"
    );
    Ok(())
}

/// The kernel ifunc whose trampoline is `trampoline`, with every site of it (from the
/// table, decoded through `introspect`) a direct branch to `target`, and its slot
/// holding `target`; returns the number of sites.
fn check_retargeted(t: &Table<'_>, trampoline: u64, target: u64) -> Result<usize, Msg> {
    // SAFETY: the table of this running kernel.
    let image = unsafe { LiveImage::new(*t) };
    let f = image
        .ifuncs()
        .find(|f| f.trampoline == trampoline)
        .ok_or_else(|| msg!("no ifunc with trampoline {trampoline:#x}"))?;
    ensure!(
        f.chosen == target && read_slot(f.slot) == target,
        "{}: slot holds {:#x} ({}), expected {target:#x} ({})",
        f.name,
        f.chosen,
        it::impl_name(f.chosen),
        it::impl_name(target)
    );
    let mut n = 0;
    for s in f.sites() {
        ensure!(
            s.state == SiteState::Patched,
            "{} site {:#x} ({}): {:?}",
            f.name,
            s.addr,
            s.kind.name(),
            s.state
        );
        n += 1;
    }
    let in_table = t.sites().filter(|s| s.ifunc == f.index).count();
    ensure!(
        n == in_table && n >= 2,
        "{}: introspect decoded {n} sites, the table has {in_table}",
        f.name
    );
    Ok(n)
}

/// FNV-1a over every ifunc site's bytes and every slot.
fn sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
    for s in t.sites() {
        eat(u64::from_le_bytes(read_bytes::<8>(s.addr)) & (u64::MAX >> (64 - 8 * s.len())));
    }
    for f in t.ifuncs() {
        eat(read_slot(f.slot));
    }
    h
}

/// Retargets [`retarget_tag`] to `to` through the signature-checked front.
fn retarget_tag_to(to: unsafe extern "C" fn(u64) -> u64, p: &mut AliasPoker) -> Result<(), Msg> {
    // SAFETY: both implementations run on every CPU; the poker writes through the alias
    // and serializes every online CPU; the #BP hook passes traps to
    // `probe::handle_int3`; only CPU 0 retargets.
    unsafe { retarget_tag::retarget(to, p) }
        .map(|_| ())
        .map_err(|e| msg!("retarget to {}: {e}", it::impl_name(addr(to))))
}

// ---------------------------------------------------------------------------------------
// One CPU.

fn every_site_and_slot(t: &Table<'_>) -> Result<(), Msg> {
    let tramp = retarget_tag as *const () as u64;
    check_retargeted(t, tramp, addr(tag_b))?;
    check_calls(false)?;
    let mut p = AliasPoker::default();
    retarget_tag_to(tag_a, &mut p)?;
    let n = check_retargeted(t, tramp, addr(tag_a))?;
    check_calls(true)?;
    ensure!(p.writes > 0, "the retarget wrote nothing");
    // To the current target: nothing to write.
    let w = p.writes;
    retarget_tag_to(tag_a, &mut p)?;
    ensure!(p.writes == w, "a retarget to the current target wrote {}", p.writes - w);
    // The macro front.
    // SAFETY: as in `retarget_tag_to`.
    unsafe { kernel_loader::retarget!(retarget_tag, tag_b, &mut p) }
        .map_err(|e| msg!("retarget! to tag_b: {e}"))?;
    check_retargeted(t, tramp, addr(tag_b))?;
    check_calls(false)?;

    // A kernel ifunc with sites in two crates: popcount, to its baseline and back.
    let pop = kfuncs::popcount as *const () as u64;
    let chosen = read_slot(
        t.ifuncs()
            .find(|f| f.trampoline == pop)
            .ok_or("popcount is not in the table")?
            .slot,
    );
    let soft = kfuncs::popcount_soft as *const () as u64;
    for to in [soft, chosen] {
        // SAFETY: popcount_soft runs on every CPU, and `chosen` is what the resolver
        // picked for this one; as above otherwise.
        unsafe { retarget_raw(pop as usize, to as usize, &mut p) }
            .map_err(|e| msg!("retarget popcount to {}: {e}", it::impl_name(to)))?;
        let sites = check_retargeted(t, pop, to)?;
        for x in [0u64, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            ensure!(
                kfuncs::popcount(x) == x.count_ones() && kfuncs::bitmap_weight(&[x, x]) == 2 * u64::from(x.count_ones()),
                "popcount({x:#x}) wrong after retargeting to {}",
                it::impl_name(to)
            );
        }
        if to == soft {
            println!(
                "retarget: retarget_tag's {n} sites and popcount's {sites} sites follow each \
                 retarget, slots too"
            );
        }
    }

    // Not an ifunc's trampoline: refused, nothing written.
    let digest = sites_digest(t);
    let w = p.writes;
    // SAFETY: must be refused before any write (`tag_call` is no trampoline).
    let r = unsafe { retarget_raw(tag_call as *const () as usize, addr(tag_a) as usize, &mut p) };
    ensure!(r.is_err(), "retargeting a non-ifunc address succeeded");
    ensure!(
        p.writes == w && sites_digest(t) == digest,
        "a refused retarget changed text"
    );
    Ok(())
}

/// A poker failing its Nth write, for N = 0, 1, … until a retarget gets through: each
/// failure leaves every site and slot as it was.
fn failed_batch_rolls_back(t: &Table<'_>) -> Result<(), Msg> {
    let tramp = retarget_tag as *const () as u64;
    let before = sites_digest(t);
    for n in 0..64 {
        let mut p = AliasPoker::failing_at(n);
        match retarget_tag_to(tag_a, &mut p) {
            Err(_) => {
                ensure!(sites_digest(t) == before, "write {n} failed: text not restored");
                check_retargeted(t, tramp, addr(tag_b))?;
                check_calls(false)?;
            }
            Ok(()) => {
                check_retargeted(t, tramp, addr(tag_a))?;
                retarget_tag_to(tag_b, &mut AliasPoker::default())?;
                ensure!(n >= 2, "the batch had only {n} writes");
                println!("retarget: a failed write at each of the batch's {n} writes rolled back");
                return Ok(());
            }
        }
    }
    Err(msg!("the retarget never succeeded in 64 attempts"))
}

// ---------------------------------------------------------------------------------------
// Modules.

type FnX = extern "C" fn(u64) -> u64;

/// The module's sites of its `retarget_tag` import are direct branches to `target`, and
/// its calls give that implementation's tag.
fn check_module(m: &Module<'_>, pre: &str, target: u64) -> Result<usize, Msg> {
    let t = m.table().ok_or_else(|| msg!("{pre}: no table"))?;
    let f = t
        .ifuncs()
        .find(|f| f.imported && f.name == "retarget_tag")
        .ok_or_else(|| msg!("{pre}: no import retarget_tag"))?;
    let mut n = 0;
    for s in t.sites().filter(|s| s.ifunc == f.index) {
        let b: [u8; 8] = read_bytes(s.addr);
        let p = s.prefixes as usize;
        ensure!(
            matches!((s.kind, b[p]), (SiteKind::Call, 0xe8) | (SiteKind::Jmp, 0xe9)),
            "{pre} site {:#x}: {:02x?}",
            s.addr,
            &b[..s.len()]
        );
        let at = s.len() - 4;
        let rel = i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let to = s.end().wrapping_add_signed(i64::from(rel));
        ensure!(
            to == target,
            "{pre} site {:#x} branches to {to:#x} ({}), expected {}",
            s.addr,
            it::impl_name(to),
            it::impl_name(target)
        );
        n += 1;
    }
    ensure!(n >= 1, "{pre}: no site calls retarget_tag");
    let want_a = target == addr(tag_a);
    // SAFETY: rmod and cmod define `PRE_tag_call(u64) -> u64`; the module stays loaded.
    let call: FnX = unsafe { mt::func(m, &mt::fmt_name(pre, "_tag_call")) }?;
    for x in [3u64, 0x1234] {
        ensure!(
            which(call(x), x) == Some(want_a),
            "{pre}_tag_call({x}) = {:#x}",
            call(x)
        );
    }
    Ok(n)
}

/// Retarget to `tag_a`, load rmod and cmod: their sites call `tag_a`; retarget to
/// `tag_b` while they are loaded: their sites follow; unload.
fn modules(env: &Env, t: &Table<'_>) -> Result<(), Msg> {
    let tramp = retarget_tag as *const () as u64;
    let mut p = AliasPoker::default();
    retarget_tag_to(tag_a, &mut p)?;
    let rmod = env.load("rmod", &mt::RMOD.0)?;
    let cmod = match env.load("cmod", &mt::CMOD.0) {
        Ok(c) => c,
        Err(e) => {
            let _ = mt::unload_ok(rmod);
            return Err(e);
        }
    };
    let r = (|| {
        let mut sites = 0;
        for (m, pre) in [(&rmod, "rmod"), (&cmod, "cmod")] {
            sites += check_module(m, pre, addr(tag_a))?;
        }
        retarget_tag_to(tag_b, &mut p)?;
        check_retargeted(t, tramp, addr(tag_b))?;
        for (m, pre) in [(&rmod, "rmod"), (&cmod, "cmod")] {
            check_module(m, pre, addr(tag_b))?;
        }
        retarget_tag_to(tag_a, &mut p)?;
        for (m, pre) in [(&rmod, "rmod"), (&cmod, "cmod")] {
            check_module(m, pre, addr(tag_a))?;
        }
        println!(
            "retarget: rmod and cmod loaded after a retarget call the current target at {sites} \
             sites, and follow two retargets while loaded"
        );
        Ok(())
    })();
    let u = mt::unload_ok(rmod).and(mt::unload_ok(cmod));
    r.and(u)?;
    // After unload the kernel's sites still follow.
    retarget_tag_to(tag_b, &mut p)?;
    check_retargeted(t, tramp, addr(tag_b))?;
    check_calls(false)
}

// ---------------------------------------------------------------------------------------
// Re-resolution.

fn reresolve(t: &Table<'_>) -> Result<(), Msg> {
    let boot: [u64; 16] = core::array::from_fn(|i| t.ifunc(i as u32).map_or(0, |f| read_slot(f.slot)));
    ensure!(t.ifunc_count() <= 16, "{} ifuncs", t.ifunc_count());
    let mut p = AliasPoker::default();
    let none = RawChoice {
        popcnt: false,
        sse42: false,
        erms: false,
        avx2: false,
    };
    // SAFETY: every resolver given no features picks a baseline that runs on every
    // CPU; the poker and #BP route as for a retarget; only CPU 0 patches.
    let r = unsafe { reresolve_all(&CpuFeatures::empty(), &mut p) }
        .map_err(|e| msg!("reresolve_all(no features): {e}"))?;
    println!("retarget: reresolve_all(no features): {r:?}");
    for f in t.ifuncs() {
        let chosen = read_slot(f.slot);
        let name = f.name.rsplit("::").next().unwrap_or("");
        let want = if name == "retarget_tag" {
            "tag_a"
        } else {
            it::expected_impl(f.name, &none)
        };
        ensure!(
            it::impl_name(chosen) == want,
            "{}: {} after reresolve_all(no features), expected {want}",
            f.name,
            it::impl_name(chosen)
        );
        check_retargeted(t, f.trampoline, chosen)?;
    }
    check_calls(true)?;
    it::check_ifunc_results()?;
    let features = CpuFeatures::detect();
    // SAFETY: as above, with this CPU's own features.
    unsafe { reresolve_all(&features, &mut p) }
        .map_err(|e| msg!("reresolve_all(detected): {e}"))?;
    for f in t.ifuncs() {
        let chosen = read_slot(f.slot);
        ensure!(
            chosen == boot[f.index as usize],
            "{}: {} after reresolve_all(detected), boot chose {}",
            f.name,
            it::impl_name(chosen),
            it::impl_name(boot[f.index as usize])
        );
        check_retargeted(t, f.trampoline, chosen)?;
    }
    check_calls(false)?;
    it::check_ifunc_results()
}

// ---------------------------------------------------------------------------------------
// Several CPUs.

/// Retargets in the SMP stress (A and B in turn, starting from B).
const RETARGETS: u64 = 10_000;
/// Pause after each retarget, so the APs also call between batches.
const GAP_US: u64 = 20;
/// Calls per pass between naps (a third through each path).
const PASS: u64 = 30;

struct TagSlot {
    calls: AtomicU64,
    saw_a: AtomicU64,
    saw_b: AtomicU64,
    settled: AtomicU64,
    wrong: AtomicU64,
    bad: AtomicU64,
    /// The first problem: result, argument, settled retarget count.
    first: [AtomicU64; 3],
}

static SLOTS: [TagSlot; MAX_CPUS] = [const {
    TagSlot {
        calls: AtomicU64::new(0),
        saw_a: AtomicU64::new(0),
        saw_b: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        wrong: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        first: [const { AtomicU64::new(0) }; 3],
    }
}; MAX_CPUS];
static SEQ: Seq = Seq::new();
static CREW: Crew = Crew::new();

/// Whether the ifunc targets `tag_a` after `batches` retargets (it starts at `tag_b`).
fn stress_target_a(batches: u64) -> bool {
    batches % 2 == 1
}

fn tag_worker(cpu: usize) {
    let s = &SLOTS[cpu];
    let (mut n, mut a, mut b, mut settled, mut wrong, mut bad) = (0u64, 0, 0, 0, 0, 0);
    CREW.started();
    while !CREW.stopping() {
        for i in 0..PASS {
            let x = (n << 8) | cpu as u64;
            let before = SEQ.read();
            let r = match i % 3 {
                0 => tag_call(x),
                1 => tag_tail(x),
                _ => tag_via_slot(x),
            };
            let after = SEQ.read();
            n += 1;
            let Some(is_a) = which(r, x) else {
                if wrong == 0 {
                    for (f, v) in s.first.iter().zip([r, x, u64::MAX]) {
                        f.store(v, Ordering::Relaxed);
                    }
                }
                wrong += 1;
                continue;
            };
            if is_a {
                a += 1;
            } else {
                b += 1;
            }
            if let Some(k) = Seq::settled(before, after) {
                settled += 1;
                if is_a != stress_target_a(k) {
                    if bad == 0 && wrong == 0 {
                        for (f, v) in s.first.iter().zip([r, x, k]) {
                            f.store(v, Ordering::Relaxed);
                        }
                    }
                    bad += 1;
                }
            }
        }
        smp::nap(NAP_US);
    }
    s.calls.store(n, Ordering::Relaxed);
    s.saw_a.store(a, Ordering::Relaxed);
    s.saw_b.store(b, Ordering::Relaxed);
    s.settled.store(settled, Ordering::Relaxed);
    s.wrong.store(wrong, Ordering::Relaxed);
    s.bad.store(bad, Ordering::Release);
}

fn stress(t: &Table<'_>) -> Result<(), Msg> {
    let tramp = retarget_tag as *const () as u64;
    check_retargeted(t, tramp, addr(tag_b))?;
    SEQ.reset();
    let n = smp::online();
    let counts0: [(u64, u64); MAX_CPUS] = core::array::from_fn(|c| {
        (CALLS_A[c].load(Ordering::SeqCst), CALLS_B[c].load(Ordering::SeqCst))
    });
    let traps0 = pt::other_traps_on_aps();
    let syncs0 = smp::sync_rounds();
    let unhandled0 = unhandled();
    let stale0 = kernel_loader::ifunc::retarget::retarget_stale_traps();
    CREW.start(tag_worker)?;
    let t0 = cpu::rdtsc();
    let mut p = AliasPoker::default();
    let mut run = || -> Result<(), Msg> {
        for k in 0..RETARGETS {
            let to = if stress_target_a(k + 1) { tag_a } else { tag_b };
            SEQ.begin();
            let r = retarget_tag_to(to, &mut p);
            SEQ.end();
            r?;
            apic::delay_us(GAP_US);
        }
        Ok(())
    };
    let r = run();
    let ms = ms_since(t0);
    CREW.stop()?;
    r?;
    let (mut calls, mut a, mut b, mut settled) = (0, 0, 0, 0);
    for (cpu, s) in SLOTS.iter().enumerate().take(n).skip(1) {
        let bad = s.bad.load(Ordering::Acquire);
        let wrong = s.wrong.load(Ordering::Relaxed);
        let f: [u64; 3] = core::array::from_fn(|i| s.first[i].load(Ordering::Relaxed));
        ensure!(
            wrong == 0,
            "CPU {cpu}: {wrong} wrong results; first: {:#x} for {:#x}",
            f[0],
            f[1]
        );
        ensure!(
            bad == 0,
            "CPU {cpu}: {bad} settled calls ran the old implementation; first: {:#x} for {:#x} \
             after {} retargets",
            f[0],
            f[1],
            f[2]
        );
        let (sa, sb) = (s.saw_a.load(Ordering::Relaxed), s.saw_b.load(Ordering::Relaxed));
        let (ca, cb) = (
            CALLS_A[cpu].load(Ordering::SeqCst) - counts0[cpu].0,
            CALLS_B[cpu].load(Ordering::SeqCst) - counts0[cpu].1,
        );
        ensure!(
            (ca, cb) == (sa, sb),
            "CPU {cpu}: implementations counted A {ca} B {cb} calls, the caller saw A {sa} B {sb}"
        );
        let c = s.calls.load(Ordering::Relaxed);
        ensure!(c == sa + sb && c > 0, "CPU {cpu}: {c} calls, A {sa} + B {sb}");
        calls += c;
        a += sa;
        b += sb;
        settled += s.settled.load(Ordering::Relaxed);
    }
    ensure!(
        CALLS_A[0].load(Ordering::SeqCst) == counts0[0].0
            && CALLS_B[0].load(Ordering::SeqCst) == counts0[0].1,
        "an implementation ran on CPU 0 during the stress"
    );
    ensure!(a > 0 && b > 0 && settled > 0, "A {a}, B {b}, settled {settled}");
    let declined = unhandled() - unhandled0;
    let stale = kernel_loader::ifunc::retarget::retarget_stale_traps() - stale0;
    check_retargeted(t, tramp, addr(tag_b))?;
    check_calls(false)?;
    println!(
        "retarget: {RETARGETS} retargets of retarget_tag in {ms} ms while {} APs made {calls} \
         calls (A {a} + B {b}, each counted by its implementation; {settled} between \
         batches, each in the current target); {} int3 emulations at non-probe sites on \
         APs ({stale} of them stale QEMU translations the loader ran again, {declined} declined); \
         {} sync rounds; {} alias writes",
        n - 1,
        pt::other_traps_on_aps() - traps0,
        smp::sync_rounds() - syncs0,
        p.writes
    );
    ensure!(
        declined == 0,
        "handle_int3 declined {declined} traps at retarget_tag's sites reached between two \
         batches (a stale QEMU translation of a batch's int3; the site held the branch, or \
         int3 again once the next batch began): the loader must handle an ifunc site's trap \
         at any time (the test kernel emulated them to carry on)"
    );
    Ok(())
}

/// Runs the retarget tests (after the probe tests registered the kernel image and
/// installed the #BP hook).
pub fn run(h: &mut Harness) {
    let Some(t) = pt::table() else {
        h.check("ifunc_retarget_table", Err("no table registered"));
        return;
    };
    h.check(
        "ifunc_retarget_rewrites_every_site_and_slot",
        every_site_and_slot(t),
    );
    h.check(
        "ifunc_retarget_failed_batch_rolls_back",
        failed_batch_rolls_back(t),
    );
    match Env::new() {
        Ok(env) => h.check(
            "ifunc_retarget_modules_follow_loaded_and_later",
            modules(&env, t),
        ),
        Err(e) => h.check("ifunc_retarget_module_env", Err(e)),
    }
    h.check("ifunc_retarget_reresolve_all_features", reresolve(t));
    if smp::online() > 1 {
        h.check(
            "ifunc_retarget_smp_10000_while_aps_call",
            stress(t),
        );
    }
}
