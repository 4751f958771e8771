//! CPU-local counters: a read-modify-write of a word that only the running CPU writes,
//! atomic with respect to interrupts (and NMIs, and, on a host, signals) on that CPU but
//! not against other CPUs, so it needs no `lock` prefix and never takes the cache line
//! away from another core (Linux's `this_cpu_inc`).
//!
//! A relaxed load followed by a store would not do: an interrupt between the two that
//! runs the same code (a probe firing in an NMI handler) would have its update
//! overwritten. One `add`/`sub` with a memory operand cannot be split by an interrupt.

use core::sync::atomic::AtomicU64;

/// Adds 1 to `c`, in one instruction (`add qword ptr [c], 1`, no `lock`).
///
/// Only the CPU (or thread) that owns `c` may call this; other CPUs only read it.
#[inline(always)]
pub fn inc(c: &AtomicU64) {
    // SAFETY: `c` is a live, aligned `u64` (an `AtomicU64`); the instruction writes only
    // it. Not `nomem`: the compiler must treat it as touching memory, so it is also a
    // compiler barrier. It changes the flags (no `preserves_flags`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "add qword ptr [{c}], 1",
            c = in(reg) c.as_ptr(),
            options(nostack),
        )
    };
    // (This module compiles on every host, for the build tool; only an x86-64 kernel
    // runs it.)
    #[cfg(not(target_arch = "x86_64"))]
    c.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

/// Adds 1 to `c` and returns its old value, in one instruction (`xadd qword ptr [c], r`,
/// no `lock`).
///
/// Only the CPU (or thread) that owns `c` may call this; other CPUs only read it.
#[inline(always)]
pub fn fetch_inc(c: &AtomicU64) -> u64 {
    #[cfg(not(target_arch = "x86_64"))]
    return c.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    let mut v: u64 = 1;
    // SAFETY: as in `inc`; the register operand receives the old value.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "xadd qword ptr [{c}], {v}",
            c = in(reg) c.as_ptr(),
            v = inout(reg) v,
            options(nostack),
        )
    };
    #[cfg(target_arch = "x86_64")]
    return v;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;

    #[test]
    fn inc_and_fetch_inc_count() {
        let c = AtomicU64::new(0);
        inc(&c);
        inc(&c);
        assert_eq!(c.load(Ordering::Relaxed), 2);
        assert_eq!(fetch_inc(&c), 2);
        assert_eq!(fetch_inc(&c), 3);
        assert_eq!(c.load(Ordering::Relaxed), 4);
    }
}
