//! Leaving QEMU: `-device isa-debug-exit,iobase=0xf4,iosize=0x04`, and the panic handler.
//!
//! Writing `v` to port 0xf4 makes QEMU exit with status `(v << 1) | 1`: 0x10 gives 33
//! (success), 0x11 gives 35 (failure). Without the device the write does nothing and the
//! CPU halts forever (the xtask's timeout catches that).

use core::panic::PanicInfo;

use crate::cpu::outl;

/// isa-debug-exit I/O port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Value written for success; QEMU exits with 33.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Value written for failure; QEMU exits with 35.
pub const EXIT_FAILURE: u32 = 0x11;

/// Exits QEMU with 33 (`success`) or 35; never returns.
pub fn exit_qemu(success: bool) -> ! {
    let code = if success { EXIT_SUCCESS } else { EXIT_FAILURE };
    // SAFETY: port 0xf4 is the isa-debug-exit device (or nothing); the write affects no
    // memory.
    unsafe { outl(DEBUG_EXIT_PORT, code) };
    halt_forever()
}

/// Disables interrupts and halts, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt only stops this CPU; it touches no memory.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("PANIC: {info}");
    exit_qemu(false)
}
