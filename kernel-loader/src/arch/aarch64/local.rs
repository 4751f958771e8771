//! CPU-local counters: a read-modify-write of a word that only the running CPU writes,
//! atomic with respect to interrupts on that CPU (Linux's `this_cpu_inc`).
//!
//! aarch64 has no single-instruction memory increment without atomics, so these are
//! relaxed atomic read-modify-writes: `ldadd`/`stadd` with LSE (one instruction), or an
//! `ldxr`/`stxr` loop without (an exception taken between the two clears the exclusive
//! monitor, so the `stxr` fails and the loop retries: never a lost update). Only the
//! owning CPU writes the word, so the cache line is not contended.

use core::sync::atomic::{AtomicU64, Ordering};

/// Adds 1 to `c`.
///
/// Only the CPU (or thread) that owns `c` may call this; other CPUs only read it.
#[inline(always)]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds 1 to `c` and returns its old value.
///
/// Only the CPU (or thread) that owns `c` may call this; other CPUs only read it.
#[inline(always)]
pub fn fetch_inc(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inc_and_fetch_inc_count() {
        let c = AtomicU64::new(5);
        inc(&c);
        assert_eq!(fetch_inc(&c), 6);
        assert_eq!(c.load(Ordering::Relaxed), 7);
    }
}
