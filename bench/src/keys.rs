//! Static keys and live retargeting: a disabled `static_branch_unlikely!` against the
//! same loop with no branch, an enabled one against the same call guarded by an
//! `AtomicBool` that is true (and `static_branch_likely!` on an enabled key, the form
//! Linux uses for default-on paths), and retargeting an ifunc with [`RETARGET_SITES`]
//! call sites in this program's text against toggling the probe with the same number of
//! sites (`bench:many`).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use criterion::Criterion;
use kernel_loader::patch::TextPoker;
use kernel_loader::probe::ProbeId;
use kernel_loader::{CpuFeatures, ifunc, static_branch_likely, static_branch_unlikely, static_key};

use crate::probes::{self, ITERS};

static_key!(pub KEY_OFF: default false);
static_key!(pub KEY_ON: default false);

/// The guard of [`atomic_on`]: true for the whole run.
static FLAG_ON: AtomicBool = AtomicBool::new(true);
static TAKEN: AtomicU64 = AtomicU64::new(0);

/// What every taken branch calls: counts the call (a plain load and store, no `lock`:
/// only one thread runs these loops).
#[inline(never)]
fn taken(x: u64) {
    black_box(x);
    TAKEN.store(TAKEN.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

macro_rules! key_loop {
    ($x:expr, |$acc:ident| $body:expr) => {{
        let mut $acc = $x;
        for i in 0..ITERS {
            $acc = $acc.wrapping_mul(31).wrapping_add(black_box(i));
            $body;
        }
        $acc
    }};
}

/// A disabled `static_branch_unlikely!` (one 5-byte NOP) guarding a call.
#[inline(never)]
pub fn key_off(x: u64) -> u64 {
    key_loop!(x, |acc| if static_branch_unlikely!(KEY_OFF) {
        taken(acc)
    })
}

/// An enabled `static_branch_unlikely!` (`jmp` to the call, `jmp` back).
#[inline(never)]
pub fn key_on(x: u64) -> u64 {
    key_loop!(x, |acc| if static_branch_unlikely!(KEY_ON) {
        taken(acc)
    })
}

/// An enabled key read with `static_branch_likely!` (a NOP on the enabled path).
#[inline(never)]
pub fn key_on_likely(x: u64) -> u64 {
    key_loop!(x, |acc| if static_branch_likely!(KEY_ON) {
        taken(acc)
    })
}

/// The same call guarded by an `AtomicBool` that is true (a load and a branch).
#[inline(never)]
pub fn atomic_on(x: u64) -> u64 {
    key_loop!(x, |acc| if probes::flag(&FLAG_ON) {
        taken(acc)
    })
}

/// Disabled-key variants: id, row label, function (`none` is the no-probe loop).
pub const OFF: &[crate::Variant] = &[
    ("none", "no branch", probes::none),
    ("key_off", "disabled static_branch_unlikely!", key_off),
];

/// Enabled-key variants.
pub const ON: &[crate::Variant] = &[
    ("key_on", "enabled static_branch_unlikely!", key_on),
    (
        "key_on_likely",
        "enabled static_branch_likely!",
        key_on_likely,
    ),
    ("atomic_on", "AtomicBool check (true) + call", atomic_on),
];

/// Enables [`KEY_ON`] (through the same live batch a kernel uses).
pub fn setup<P: TextPoker + ?Sized>(poker: &mut P) {
    // SAFETY: the host poker writes this program's text; only this thread runs.
    unsafe { KEY_ON.enable(poker) }.expect("enable KEY_ON");
    assert!(KEY_ON.is_enabled() && !KEY_OFF.is_enabled());
    let before = TAKEN.load(Ordering::Relaxed);
    black_box(key_on(1));
    black_box(key_off(1));
    let after = TAKEN.load(Ordering::Relaxed);
    assert_eq!(
        after - before,
        ITERS,
        "the enabled key's site branches, the disabled one's does not"
    );
    black_box(key_on_likely(1));
    black_box(atomic_on(1));
    assert_eq!(
        TAKEN.load(Ordering::Relaxed) - after,
        2 * ITERS,
        "likely and AtomicBool loops call"
    );
}

// ---------------------------------------------------------------------------------------
// Retargeting.

/// Call sites of [`ks_retarget`].
pub const RETARGET_SITES: usize = 10_000;

/// Implementation A.
#[inline(never)]
pub extern "C" fn ret_a(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// Implementation B.
#[inline(never)]
pub extern "C" fn ret_b(x: u64) -> u64 {
    x.wrapping_add(2)
}

fn pick_a(_: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 {
    ret_a
}

ifunc! {
    /// The retargeted ifunc: 10^4 call sites below.
    pub fn ks_retarget(x: u64) -> u64;
    default = ret_a;
    resolver = pick_a;
}

macro_rules! x10 {
    ($($t:tt)*) => { $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* };
}

macro_rules! calls_fn {
    ($name:ident) => {
        /// 1,000 call sites of [`ks_retarget`].
        #[inline(never)]
        pub fn $name(x: u64) -> u64 {
            let mut acc = 0u64;
            x10! { x10! { x10! { acc = acc.wrapping_add(ks_retarget(black_box(x))); } } }
            acc
        }
    };
}

calls_fn!(calls0);
calls_fn!(calls1);
calls_fn!(calls2);
calls_fn!(calls3);
calls_fn!(calls4);
calls_fn!(calls5);
calls_fn!(calls6);
calls_fn!(calls7);
calls_fn!(calls8);
calls_fn!(calls9);

/// Runs every call site once; returns the sum of their results.
pub fn run_calls(x: u64) -> u64 {
    [
        calls0, calls1, calls2, calls3, calls4, calls5, calls6, calls7, calls8, calls9,
    ]
    .iter()
    .fold(0u64, |a, f| a.wrapping_add(f(x)))
}

/// Retargets [`ks_retarget`] to B and back to A: two live batches over its 10^4 sites
/// (and its slot), as a probe toggle is two batches over its 10^4.
pub fn retarget_twice<P: TextPoker + ?Sized>(poker: &mut P) {
    // SAFETY: the host poker writes this program's text; only this thread runs.
    unsafe { ks_retarget::retarget(ret_b, poker) }.expect("retarget to B");
    // SAFETY: as above.
    unsafe { ks_retarget::retarget(ret_a, poker) }.expect("retarget to A");
}

/// The `retarget` group: retargeting 10^4 sites (to B and back) against the probe
/// toggle of 10^4 sites (enable and disable), both with the `membarrier` poker; checks
/// before and after that every site calls what the ifunc targets.
pub fn bench_retarget<P: TextPoker>(c: &mut Criterion, many: ProbeId, poker: &mut P) {
    let n = RETARGET_SITES as u64;
    assert_eq!(run_calls(0), n, "every site calls A (x + 1)");
    // SAFETY: as in `retarget_twice`.
    unsafe { ks_retarget::retarget(ret_b, poker) }.expect("retarget to B");
    assert_eq!(run_calls(0), 2 * n, "every site calls B after the retarget");
    // SAFETY: as above.
    unsafe { ks_retarget::retarget(ret_a, poker) }.expect("retarget to A");
    let mut g = c.benchmark_group("retarget");
    g.sample_size(10);
    g.bench_function("retarget_10k", |b| b.iter(|| retarget_twice(poker)));
    g.bench_function("probe_toggle_10k", |b| {
        b.iter(|| crate::patching::toggle_batched(many, poker))
    });
    g.finish();
    assert_eq!(run_calls(0), n, "every site calls A again");
}
