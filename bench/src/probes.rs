//! Probes: the same loop body with no probe, a disabled `probe!`, an `AtomicBool`-guarded
//! call, and the `probe` crate's SystemTap SDT probe; an enabled `probe!` against a direct
//! call of its handler; and a probe with 10^4 sites for the toggling benchmarks.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel_loader::probe::ProbeId;

/// Loop iterations per benchmark iteration.
pub const ITERS: u64 = 100;

static GUARD: AtomicBool = AtomicBool::new(false);
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// The handler every enabled variant calls.
#[inline(never)]
pub fn handler(_id: ProbeId, args: &[u64; 6]) {
    black_box(args);
}

#[inline(never)]
fn guarded_handler(x: u64) {
    HANDLED.fetch_add(black_box(x), Ordering::Relaxed);
}

macro_rules! body_loop {
    ($x:expr) => {{
        let mut acc = $x;
        for i in 0..ITERS {
            acc = acc.wrapping_mul(31).wrapping_add(black_box(i));
        }
        acc
    }};
    ($x:expr, |$acc:ident| $probe:expr) => {{
        let mut $acc = $x;
        for i in 0..ITERS {
            $acc = $acc.wrapping_mul(31).wrapping_add(black_box(i));
            $probe;
        }
        $acc
    }};
}

/// No probe at all.
#[inline(never)]
pub fn none(x: u64) -> u64 {
    body_loop!(x)
}

/// A disabled `probe!` (one 5-byte NOP).
#[inline(never)]
pub fn ksites_off(x: u64) -> u64 {
    body_loop!(x, |acc| kernel_loader::probe!(bench, off, acc))
}

/// `if FLAG { handler(acc) }`, the flag false: one byte load and a branch per iteration.
#[inline(never)]
pub fn atomic_bool(x: u64) -> u64 {
    body_loop!(x, |acc| if flag(&GUARD) {
        guarded_handler(acc)
    })
}

/// Reads an `AtomicBool` the way a relaxed load compiles (one `movzx` from its address),
/// but volatile: the benchmark never writes `GUARD`, so LLVM would otherwise fold a
/// relaxed load to `false` or hoist it out of the loop and measure no check at all.
#[inline(always)]
pub fn flag(f: &AtomicBool) -> bool {
    // SAFETY: the pointer comes from a live `AtomicBool`; no thread writes the flags this
    // is used on while benchmarks run, so the non-atomic read races with nothing.
    unsafe { std::ptr::read_volatile(f.as_ptr()) }
}

/// The `probe` crate's `probe!` (a NOP plus an SDT note; the argument is materialised).
#[inline(never)]
pub fn sdt_crate(x: u64) -> u64 {
    body_loop!(x, |acc| probe::probe!(bench, sdt, acc))
}

/// An enabled `probe!` (`jmp` to the out-of-line block, dispatcher, handler).
#[inline(never)]
pub fn ksites_on(x: u64) -> u64 {
    body_loop!(x, |acc| kernel_loader::probe!(bench, on, acc))
}

/// The handler called directly, with the same argument array.
#[inline(never)]
pub fn direct_handler(x: u64) -> u64 {
    body_loop!(x, |acc| handler(ProbeId(0), &[acc, 0, 0, 0, 0, 0]))
}

/// Disabled-probe variants: id, row label, function.
pub const OFF: &[crate::Variant] = &[
    ("none", "no probe", none),
    ("ksites_off", "disabled probe! (ksites)", ksites_off),
    ("atomic_bool", "AtomicBool-guarded call", atomic_bool),
    ("sdt_crate", "probe crate SDT probe", sdt_crate),
];

/// Enabled variants.
pub const ON: &[crate::Variant] = &[
    ("ksites_on", "enabled probe! (ksites)", ksites_on),
    (
        "direct_handler",
        "direct call of the handler",
        direct_handler,
    ),
];

/// Number of sites of `bench:many`.
pub const MANY_SITES: usize = 10_000;

macro_rules! x10 {
    ($($t:tt)*) => { $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* };
}

macro_rules! many_fn {
    ($name:ident) => {
        /// 1,000 sites of `bench:many`.
        #[inline(never)]
        pub fn $name(x: u64) {
            x10! { x10! { x10! { kernel_loader::probe!(bench, many, x); } } }
        }
    };
}

many_fn!(many0);
many_fn!(many1);
many_fn!(many2);
many_fn!(many3);
many_fn!(many4);
many_fn!(many5);
many_fn!(many6);
many_fn!(many7);
many_fn!(many8);
many_fn!(many9);

/// Runs every site of `bench:many` once (keeps them alive; used to check they fire).
pub fn run_many(x: u64) {
    for f in [
        many0, many1, many2, many3, many4, many5, many6, many7, many8, many9,
    ] {
        f(x);
    }
}
