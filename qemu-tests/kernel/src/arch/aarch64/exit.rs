//! Leaving QEMU on aarch64: Arm semihosting `SYS_EXIT` (QEMU runs with `-semihosting`),
//! PSCI `SYSTEM_OFF` if semihosting is off, and the panic handler.
//!
//! `SYS_EXIT` (operation 0x18) takes, on AArch64, a parameter block `[reason, status]`;
//! with reason `ADP_Stopped_ApplicationExit` QEMU exits with `status`. The kernel uses
//! the statuses of the x86_64 kernel's isa-debug-exit (33 = success, 35 = failure), so
//! the xtask judges both architectures' runs the same way.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use super::psci;

/// QEMU's exit status on success (as x86_64's isa-debug-exit gives it).
pub const EXIT_SUCCESS: u64 = 33;
/// QEMU's exit status on failure.
pub const EXIT_FAILURE: u64 = 35;
/// Semihosting operation `SYS_EXIT`.
const SYS_EXIT: u64 = 0x18;
/// `ADP_Stopped_ApplicationExit`: the reason whose status QEMU passes on.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// Set by the first [`exit_qemu`]: semihosting was tried.
static SEMIHOSTING_TRIED: AtomicBool = AtomicBool::new(false);

/// Exits QEMU with 33 (`success`) or 35; never returns.
pub fn exit_qemu(success: bool) -> ! {
    let code = if success { EXIT_SUCCESS } else { EXIT_FAILURE };
    let block = [ADP_STOPPED_APPLICATION_EXIT, code];
    // Without -semihosting the `hlt` is an undefined instruction: the vector reports
    // it and comes back here, where the second attempt goes straight to PSCI.
    if SEMIHOSTING_TRIED.swap(true, Ordering::SeqCst) {
        crate::println!("exit: no semihosting; PSCI SYSTEM_OFF (status {code} lost)");
        psci::system_off();
        halt_forever()
    }
    // SAFETY: `hlt #0xf000` is the A64 semihosting call; QEMU (with -semihosting)
    // reads the two-word block `x1` points at and exits; it does not return then.
    unsafe {
        core::arch::asm!(
            "hlt #0xf000",
            in("x0") SYS_EXIT,
            in("x1") block.as_ptr(),
            options(nostack, readonly),
        );
    }
    psci::system_off();
    halt_forever()
}

/// Masks interrupts and waits, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: masking DAIF and `wfe` only stop this CPU; no memory is touched.
        unsafe { core::arch::asm!("msr daifset, #0xf", "wfe", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("PANIC: {info}");
    exit_qemu(false)
}
