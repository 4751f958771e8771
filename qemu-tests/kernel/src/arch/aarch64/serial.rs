//! The PL011 UART of QEMU `virt` at 0x0900_0000 (transmit only), and `print!`/`println!`.
//!
//! QEMU's PL011 needs no set-up; the kernel only writes the data register (DR) after
//! the flag register (FR) says the transmit FIFO has room. Output from several CPUs is
//! serialised by a spin lock that gives up after a while, so a fault report from a CPU
//! that died holding it still gets out.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

/// The PL011's physical (= virtual: identity mapped as device memory) base address.
pub const UART_BASE: usize = 0x0900_0000;
const DR: usize = 0x00;
const FR: usize = 0x18;
/// FR.TXFF: the transmit FIFO is full.
const FR_TXFF: u32 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

fn put_byte(b: u8) {
    for _ in 0..100_000 {
        // SAFETY: FR is a read-only register of the PL011, mapped as device memory;
        // reading it has no side effect.
        let fr = unsafe { core::ptr::read_volatile((UART_BASE + FR) as *const u32) };
        if fr & FR_TXFF == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: DR is the PL011's data register; a write queues one byte for transmission.
    unsafe { core::ptr::write_volatile((UART_BASE + DR) as *mut u32, u32::from(b)) };
}

/// Writes `bytes` as they are (QEMU's `-nographic` stdio passes `\n` on).
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        put_byte(b);
    }
}

/// A `fmt::Write` handle on the UART (unlocked: use [`_print`] through the macros).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut locked = false;
    for _ in 0..10_000_000 {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            locked = true;
            break;
        }
        core::hint::spin_loop();
    }
    let _ = Serial.write_fmt(args);
    if locked {
        LOCK.store(false, Ordering::Release);
    }
}

/// Prints to the PL011.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the PL011.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::_print(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
