//! [`Name`]: a short string copied into a fixed buffer, so errors and registry entries
//! own their data without an allocator.

use core::fmt;

/// A name (probe provider or name, ifunc, symbol, section) copied out of a table or an
/// object, so errors and registry entries own their data (a module's table goes away at
/// unload). Up to [`Name::CAPACITY`] bytes; a longer one is cut at a character boundary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    buf: [u8; Name::CAPACITY],
}

impl Name {
    /// Longest name kept whole.
    pub const CAPACITY: usize = 64;

    /// Copies `s`, cut to [`Name::CAPACITY`] bytes at a character boundary.
    pub fn new(s: &str) -> Name {
        let mut len = s.len().min(Name::CAPACITY);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut buf = [0u8; Name::CAPACITY];
        buf[..len].copy_from_slice(&s.as_bytes()[..len]);
        Name {
            len: len as u8,
            buf,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Cut at a character boundary of a `str` in `new`.
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for Name {
    fn default() -> Name {
        Name::new("")
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::new(s)
    }
}
