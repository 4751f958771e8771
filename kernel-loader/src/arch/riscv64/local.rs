//! CPU-local counters: a read-modify-write of a word that only the running hart writes,
//! atomic with respect to interrupts on that hart (Linux's `this_cpu_inc`).
//!
//! RISC-V has no memory-increment instruction, so these are relaxed atomic
//! read-modify-writes (`amoadd.d`, one instruction with the A extension, which RV64GC
//! has). Only the owning hart writes the word, so the cache line is not contended.
//!
//! Also the instruction-fetch side of a text write (what a kernel's
//! `TextPoker::write` needs): [`fence_i`] after the store, on the storing hart.

use core::sync::atomic::{AtomicU64, Ordering};

/// Adds 1 to `c`.
///
/// Only the hart (or thread) that owns `c` may call this; other harts only read it.
#[inline(always)]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds 1 to `c` and returns its old value.
///
/// Only the hart (or thread) that owns `c` may call this; other harts only read it.
#[inline(always)]
pub fn fetch_inc(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed)
}

/// `fence.i`: makes every store this hart made (instruction bytes included) visible to
/// its own instruction fetch (Zifencei). A kernel's `TextPoker::write` runs it right
/// after its one aligned store; `TextPoker::sync_cores` makes every other hart run it
/// (an IPI whose handler calls this, or SBI RFENCE `remote_fence_i`), since `fence.i`
/// orders only the hart that executes it.
#[cfg(target_arch = "riscv64")]
#[inline(always)]
pub fn fence_i() {
    // SAFETY: a fence; no register or memory effect beyond ordering.
    unsafe { core::arch::asm!("fence.i", options(nostack, preserves_flags)) };
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
