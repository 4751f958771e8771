//! COM1 (I/O port 0x3f8), polled: what `-serial stdio` shows.
//!
//! [`print!`](crate::print) and [`println!`](crate::println) write here. A short spin
//! lock keeps lines from different CPUs apart; it gives up after a bounded wait so a
//! fault or panic while a line is being printed can still report.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
/// Line status register: transmitter holding register empty.
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Initialises COM1: 115200 baud, 8N1, FIFOs on, interrupts off.
pub fn init() {
    // SAFETY: COM1's registers are plain I/O ports that no other code drives; this is
    // the standard 16550 initialisation sequence.
    unsafe {
        outb(COM1 + 1, 0x00); // IER: no interrupts
        outb(COM1 + 3, 0x80); // LCR: DLAB on
        outb(COM1, 0x01); // divisor low: 115200 baud
        outb(COM1 + 1, 0x00); // divisor high
        outb(COM1 + 3, 0x03); // LCR: 8N1, DLAB off
        outb(COM1 + 2, 0xc7); // FCR: enable + clear FIFOs, 14-byte threshold
        outb(COM1 + 4, 0x03); // MCR: DTR | RTS
    }
}

fn put_byte(b: u8) {
    // Bounded: a missing UART must not hang the kernel.
    for _ in 0..100_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        if unsafe { inb(COM1 + 5) } & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing the transmit register only sends the byte.
    unsafe { outb(COM1, b) };
}

/// Writes raw bytes to COM1.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        put_byte(b);
    }
}

/// A [`fmt::Write`] sink for COM1. Holds no state; any number may exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Implementation of [`print!`](crate::print): formats `args` to COM1 as one unit.
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

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to COM1 (`\n` only, no `\r`).
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::_print(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
