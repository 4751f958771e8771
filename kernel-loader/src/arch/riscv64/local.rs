//! CPU-local counters: a read-modify-write of a word that only the running hart writes,
//! atomic with respect to interrupts on that hart (Linux's `this_cpu_inc`).
//!
//! RISC-V has no memory-increment instruction, so these are relaxed atomic
//! read-modify-writes (`amoadd.d`, one instruction with the A extension, which RV64GC
//! has). Only the owning hart writes the word, so the cache line is not contended.
//!
//! Also the instruction-fetch side of a text write: `fence_i` after the store, on the
//! storing hart (what a kernel's `TextPoker::write` needs), and
//! `sbi_remote_fence_i`, a `fence.i` on every other hart through the SBI firmware
//! (what `TextPoker::sync_cores` needs).

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

/// SBI RFENCE extension id ("RFNC"), SBI v0.2+.
pub const SBI_EXT_RFENCE: u64 = 0x5246_4e43;
/// RFENCE function `sbi_remote_fence_i`.
pub const SBI_RFENCE_REMOTE_FENCE_I: u64 = 0;
/// `hart_mask_base` meaning "every hart" (the mask is then ignored).
pub const SBI_HART_MASK_ALL: u64 = u64::MAX;

/// Asks the SBI firmware (OpenSBI) to run `fence.i` on the harts of `hart_mask`
/// (bit `i` = hart `hart_mask_base + i`; [`SBI_HART_MASK_ALL`] as the base = every
/// hart): a ready `TextPoker::sync_cores` for the single-store protocol. Returns the SBI
/// error code on failure (e.g. −2, not supported).
///
/// # Safety
///
/// The caller runs in S-mode under an SBI implementation (an `ecall` here traps to
/// M-mode firmware, which clobbers only `a0` and `a1`).
#[cfg(target_arch = "riscv64")]
pub unsafe fn sbi_remote_fence_i(hart_mask: u64, hart_mask_base: u64) -> Result<(), i64> {
    let err: i64;
    // SAFETY: an SBI call per the contract: arguments in a0/a1, ids in a7/a6; the
    // firmware returns the error in a0 and a value in a1, nothing else changes.
    unsafe {
        core::arch::asm!(
            "ecall",
            inlateout("a0") hart_mask as i64 => err,
            inlateout("a1") hart_mask_base => _,
            in("a6") SBI_RFENCE_REMOTE_FENCE_I,
            in("a7") SBI_EXT_RFENCE,
            options(nostack),
        )
    };
    if err == 0 { Ok(()) } else { Err(err) }
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
