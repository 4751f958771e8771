//! Probes: the same loop body with no probe, a disabled `probe!`, an `AtomicBool`-guarded
//! call, and the `probe` crate's SystemTap SDT probe; an enabled `probe!` against a direct
//! call of its handler; the enabled `probe!` fired by 1, 2 and 4 threads at once (per-fire
//! thread CPU time); and a probe with 10^4 sites for the toggling benchmarks.
//!
//! Every thread that fires probes gets a CPU index of its own (the hook a kernel would
//! install is [`cpu_index`], a thread-local here), so probes fire as they would on a
//! kernel's CPUs: on per-CPU counters.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use criterion::Criterion;
use kernel_loader::probe::{self as kprobe, ProbeId};

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

thread_local! {
    /// This thread's CPU index for the probe dispatchers (none until it claims one).
    static CPU: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The probe dispatchers' CPU-index hook: this thread's index.
fn cpu_index() -> usize {
    CPU.with(Cell::get)
}

/// Gives the calling thread CPU index `i`; the main thread takes 0 (see [`use_cpu_index`]).
fn claim_cpu(i: usize) {
    CPU.with(|c| c.set(i));
}

/// Gives the dispatchers this thread's index the way a kernel gives its CPU's: as a word
/// at a fixed offset from the per-thread base register (`fs`, where [`CPU`] lives; a
/// kernel's would be `gs`), read with one load; the main thread is CPU 0. Falls back to
/// the [`cpu_index`] hook (a call per fire) if `CPU` is not at the same offset from
/// `fs` on another thread (it is in this non-PIE executable: local-exec TLS).
pub fn use_cpu_index() {
    claim_cpu(0);
    let here = tls_offset();
    let there = std::thread::spawn(tls_offset).join().expect("tls_offset");
    match Some(here).filter(|&o| o == there) {
        // SAFETY: every thread that fires probes has its own index (the main thread 0,
        // the scaling threads 1..=4 while they run, one group at a time) or none
        // (usize::MAX, whose low half is past MAX_CPUS: the shared counters), kept in
        // `CPU` at the same offset from `fs` on every thread (checked above on two), and
        // a thread's index does not change while it fires. The host poker's
        // `sync_cores` is `membarrier`, a barrier on every thread.
        Some(o) => unsafe { kprobe::set_cpu_index_word(o) },
        // SAFETY: as above, through the hook.
        None => unsafe { kprobe::set_cpu_index(cpu_index) },
    }
}

/// `CPU`'s offset from this thread's `fs` base.
fn tls_offset() -> isize {
    let fs: usize;
    // SAFETY: on x86-64 Linux, `fs:0` holds the thread control block's own address
    // (the TLS ABI); the load writes nothing.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) fs, options(nostack, readonly, preserves_flags))
    };
    let cell = CPU.with(|c| c.as_ptr() as usize);
    cell.wrapping_sub(fs) as isize
}

/// Thread counts of the scaling benchmark.
pub const SCALING_THREADS: &[usize] = &[1, 2, 4];

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `timespec` to write; the clock id is a constant.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `threads` threads, each with its own CPU index, run `iters` iterations of
/// [`ksites_on`] (100 enabled fires each) at once; returns the mean of their thread CPU
/// times, so criterion's figure is the CPU time one thread spends per iteration.
fn fire_on_threads(threads: usize, iters: u64) -> Duration {
    let start = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=threads)
            .map(|i| {
                let start = &start;
                s.spawn(move || {
                    claim_cpu(i);
                    start.wait();
                    let t = thread_cpu_time();
                    for k in 0..iters {
                        black_box(ksites_on(black_box(k)));
                    }
                    thread_cpu_time() - t
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("firing thread"))
            .sum()
    });
    total / threads as u32
}

/// The `probe_scaling` group: the enabled `probe!` fired on 1, 2 and 4 threads at once.
pub fn bench_scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("probe_scaling");
    for &n in SCALING_THREADS {
        g.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| fire_on_threads(n, iters))
        });
    }
    g.finish();
}

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
