//! The `time` CSR (`rdtime`, at the device tree's `timebase-frequency`), for timeouts.

use super::dt;

/// QEMU virt's timebase, if the device tree was not read.
const DEFAULT_TIMEBASE: u64 = 10_000_000;

/// Microseconds since an arbitrary point (the counter's start).
pub fn micros() -> u64 {
    let ticks = riscv::register::time::read64();
    let freq = dt::machine().map_or(DEFAULT_TIMEBASE, |m| m.timebase.max(1));
    (u128::from(ticks) * 1_000_000 / u128::from(freq)) as u64
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
