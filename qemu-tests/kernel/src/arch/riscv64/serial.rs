//! The NS16550A UART of QEMU `virt` at 0x1000_0000 (byte registers, stride 1), driven by
//! the `uart_16550` crate's MMIO backend, and `print!`/`println!`.
//!
//! CPU 0 initialises it ([`init`]) before anything prints. Output from several harts is
//! serialised by a spin lock that gives up after a while, so a fault report from a hart
//! that died holding it still gets out.

use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use uart_16550::backend::MmioBackend;
use uart_16550::{Config, Uart16550};

/// The UART's physical (= virtual: identity mapped) base address.
pub const UART_BASE: usize = 0x1000_0000;

struct Port(UnsafeCell<Option<Uart16550<MmioBackend>>>);
// SAFETY: written once by `init` (CPU 0, before any other hart starts), then used
// only while `LOCK` is held (or by a fault report that gave up waiting for it).
unsafe impl Sync for Port {}

static PORT: Port = Port(UnsafeCell::new(None));
static LOCK: AtomicBool = AtomicBool::new(false);

/// Sets the UART up (8N1, FIFOs on). Call once, on CPU 0, first thing.
pub fn init() {
    let Some(base) = NonNull::new(UART_BASE as *mut u8) else {
        return;
    };
    // SAFETY: QEMU virt's NS16550A lives at UART_BASE with byte-wide registers; this
    // kernel maps it (identity, RW) and nothing else drives it.
    let Ok(mut uart) = (unsafe { Uart16550::new_mmio(base, 1) }) else {
        return;
    };
    // If the set-up fails the UART is still usable as OpenSBI left it.
    let _ = uart.init(Config::default());
    // SAFETY: the only write, before any other hart runs or anything prints.
    unsafe { *PORT.0.get() = Some(uart) };
}

/// Writes `bytes` as they are (QEMU's stdio serial passes `\n` on).
pub fn write_bytes(bytes: &[u8]) {
    // SAFETY: see `Port`: the caller holds the lock (or gave up on it to report).
    if let Some(uart) = unsafe { (*PORT.0.get()).as_mut() } {
        uart.send_bytes_exact(bytes);
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

/// Prints to the UART.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the UART.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::_print(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
