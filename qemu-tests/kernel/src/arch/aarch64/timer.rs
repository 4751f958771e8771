//! The generic timer's physical count (CNTPCT_EL0 / CNTFRQ_EL0), for timeouts.

/// Microseconds since an arbitrary point (the counter's start).
pub fn micros() -> u64 {
    let (count, freq): (u64, u64);
    // SAFETY: the counter registers are readable at EL1; no side effect.
    unsafe {
        core::arch::asm!(
            "isb",
            "mrs {0}, CNTPCT_EL0",
            "mrs {1}, CNTFRQ_EL0",
            out(reg) count,
            out(reg) freq,
            options(nomem, nostack),
        );
    }
    (u128::from(count) * 1_000_000 / u128::from(freq.max(1))) as u64
}

/// Polls `done` until it returns true (→ true) or `micros` microseconds pass (→ false).
pub fn wait_until(micros: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = self::micros();
    loop {
        if done() {
            return true;
        }
        if self::micros().wrapping_sub(start) > micros {
            return done();
        }
        core::hint::spin_loop();
    }
}
