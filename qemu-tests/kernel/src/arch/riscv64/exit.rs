//! Leaving QEMU on riscv64: the `sifive_test` device of QEMU `virt` (0x10_0000), SBI
//! SRST `system_reset` if that store did not end QEMU, and the panic handler.
//!
//! Writing `(code << 16) | 0x3333` (FINISHER_FAIL) makes QEMU exit with status `code`;
//! `0x5555` (FINISHER_PASS) would exit with 0, which a guest poweroff gives too. The
//! kernel uses the statuses of the x86_64 kernel's isa-debug-exit (33 = success,
//! 35 = failure) through FINISHER_FAIL, so the xtask judges all three architectures'
//! runs the same way and only this kernel's deliberate exit yields 33.

use core::panic::PanicInfo;

use super::sbi;

/// QEMU's exit status on success (as x86_64's isa-debug-exit gives it).
pub const EXIT_SUCCESS: u32 = 33;
/// QEMU's exit status on failure.
pub const EXIT_FAILURE: u32 = 35;
/// The `sifive_test` device (identity mapped, in the device gigapage).
pub const SIFIVE_TEST: usize = 0x10_0000;
/// `sifive_test`'s FINISHER_FAIL: QEMU exits with the status in bits 16..31.
const FINISHER_FAIL: u32 = 0x3333;

/// Exits QEMU with 33 (`success`) or 35; never returns.
pub fn exit_qemu(success: bool) -> ! {
    let code = if success { EXIT_SUCCESS } else { EXIT_FAILURE };
    // SAFETY: a 32-bit store to the sifive_test register, mapped as a device; QEMU ends
    // the emulation on it.
    unsafe { core::ptr::write_volatile(SIFIVE_TEST as *mut u32, (code << 16) | FINISHER_FAIL) };
    crate::println!("exit: sifive_test did not stop QEMU; SBI SRST shutdown (status {code} lost)");
    sbi::shutdown(success);
    halt_forever()
}

/// Turns interrupts off and waits, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: clearing sstatus.SIE and `wfi` only stop this hart.
        unsafe { core::arch::asm!("csrci sstatus, 2", "wfi", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("PANIC: {info}");
    exit_qemu(false)
}
