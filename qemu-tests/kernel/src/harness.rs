//! A tiny test runner that needs no allocator.
//!
//! ```ignore
//! fn adds() -> TestResult {
//!     ensure!(1 + 1 == 2, "1 + 1 = {}", 1 + 1);
//!     Ok(())
//! }
//! h.check("adds", adds());
//! ```
//!
//! Output, one line per test: `ok <name>` or `FAIL <name>: <message>`; then
//! `N passed, M failed`. [`Harness::finish`] exits QEMU with success iff nothing failed
//! and at least one test passed.

use core::fmt::{self, Write};

use crate::exit::exit_qemu;
use crate::println;

/// Capacity of a [`Msg`] in bytes.
pub const MSG_CAPACITY: usize = 256;

/// A fixed-capacity failure message. Writing past [`MSG_CAPACITY`] truncates (at a
/// character boundary) and marks the message with a trailing `...` when displayed.
#[derive(Clone)]
pub struct Msg {
    buf: [u8; MSG_CAPACITY],
    len: usize,
    truncated: bool,
}

/// What a test returns.
pub type TestResult = Result<(), Msg>;

impl Msg {
    /// An empty message.
    pub const fn new() -> Msg {
        Msg {
            buf: [0; MSG_CAPACITY],
            len: 0,
            truncated: false,
        }
    }

    /// A message formatted from `args` (see also [`msg!`](crate::msg)).
    pub fn from_fmt(args: fmt::Arguments<'_>) -> Msg {
        let mut m = Msg::new();
        let _ = m.write_fmt(args);
        m
    }

    /// A message holding `value`'s `Display` output, e.g. an error from
    /// `kernel_loader`: `result.map_err(Msg::display)?`.
    pub fn display<T: fmt::Display>(value: T) -> Msg {
        Msg::from_fmt(format_args!("{value}"))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // `write_str` only ever appends whole UTF-8 characters.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<invalid utf-8>")
    }

    /// Whether something was cut off.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }
}

impl Default for Msg {
    fn default() -> Msg {
        Msg::new()
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MSG_CAPACITY - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if self.truncated {
            f.write_str("...")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for Msg {
    fn from(s: &str) -> Msg {
        let mut m = Msg::new();
        let _ = m.write_str(s);
        m
    }
}

/// Counts and reports test results.
#[derive(Debug, Default)]
pub struct Harness {
    /// Tests that passed so far.
    pub passed: u32,
    /// Tests that failed so far.
    pub failed: u32,
}

impl Harness {
    /// A harness with no results yet.
    pub const fn new() -> Harness {
        Harness {
            passed: 0,
            failed: 0,
        }
    }

    /// Records one test's result and prints `ok <name>` or `FAIL <name>: <msg>`.
    /// Any `Display` error type works: [`Msg`], `&str`, the loader's error enums.
    pub fn check<E: fmt::Display>(&mut self, name: &str, result: Result<(), E>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("ok {name}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }

    /// Runs `test` and records its result under `name`.
    pub fn run<E: fmt::Display>(&mut self, name: &str, test: impl FnOnce() -> Result<(), E>) {
        self.check(name, test());
    }

    /// Prints `N passed, M failed` and exits QEMU: success iff M == 0 and N > 0.
    pub fn finish(self) -> ! {
        println!("{} passed, {} failed", self.passed, self.failed);
        exit_qemu(self.failed == 0 && self.passed > 0)
    }
}

/// Builds a [`Msg`](crate::harness::Msg) from format arguments.
#[macro_export]
macro_rules! msg {
    ($($arg:tt)*) => {
        $crate::harness::Msg::from_fmt(::core::format_args!($($arg)*))
    };
}

/// In a function returning `Result<_, Msg>`: if `cond` is false, returns
/// `Err(msg!(fmt, args…))` (or a message naming the condition when no format is given).
#[macro_export]
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            return ::core::result::Result::Err($crate::harness::Msg::from(
                ::core::concat!("condition failed: ", ::core::stringify!($cond)),
            ));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return ::core::result::Result::Err($crate::msg!($($arg)+));
        }
    };
}
