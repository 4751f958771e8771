//! [`Name`]: a short string copied into a fixed buffer, so errors and registry entries
//! own their data without an allocator.

use core::fmt::{self, Write};

/// A name (probe provider or name, ifunc, symbol, section) copied out of a table or an
/// object, so errors and registry entries own their data (a module's table goes away at
/// unload). Up to [`Name::CAPACITY`] bytes; a longer one is cut at a character boundary,
/// remembered as truncated: it prints with a trailing `…` and never equals the longer
/// string.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    truncated: bool,
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
            truncated: len < s.len(),
            buf,
        }
    }

    /// Whether the name it was made from was longer than what it keeps.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// The text kept (without a truncation mark).
    pub fn as_str(&self) -> &str {
        // Cut at a character boundary of a `str` in `new`.
        core::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        !self.truncated && self.as_str() == *other
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.as_str().chars() {
            for e in c.escape_debug() {
                f.write_char(e)?;
            }
        }
        if self.truncated {
            f.write_char('…')?;
        }
        f.write_char('"')
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if self.truncated {
            f.write_char('…')?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::String;

    #[test]
    fn a_long_name_is_marked_truncated() {
        let short = Name::new("t::zero");
        assert!(!short.is_truncated());
        assert_eq!(short, "t::zero");
        assert_eq!(format!("{short} {short:?}"), "t::zero \"t::zero\"");

        let long: String = core::iter::repeat_n('x', Name::CAPACITY + 1).collect();
        let n = Name::new(&long);
        assert!(n.is_truncated());
        assert_eq!(n.as_str(), &long[..Name::CAPACITY]);
        assert!(
            n != long.as_str(),
            "a truncated name never equals the longer string"
        );
        assert!(n != &long[..Name::CAPACITY], "nor its kept prefix");
        assert_eq!(format!("{n}"), format!("{}…", &long[..Name::CAPACITY]));
        assert_eq!(
            format!("{n:?}"),
            format!("\"{}…\"", &long[..Name::CAPACITY])
        );

        // Exactly CAPACITY bytes fit whole; a multi-byte character is not split.
        assert!(!Name::new(&long[..Name::CAPACITY]).is_truncated());
        let mut wide: String = core::iter::repeat_n('x', Name::CAPACITY - 1).collect();
        wide.push('é');
        let w = Name::new(&wide);
        assert!(w.is_truncated());
        assert_eq!(w.as_str(), &wide[..Name::CAPACITY - 1]);
    }
}
