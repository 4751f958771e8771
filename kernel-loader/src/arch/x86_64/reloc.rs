//! x86-64 ELF relocations: the machine number, the relocation types a module may use,
//! how each is computed (`S + A - P` and friends, with overflow checks), and their names.
//!
//! Every architecture's `reloc` module defines the same names: [`MACHINE`], [`ARCH_NAME`], [`NONE`],
//! [`ABS64`], [`TABLE_FIELD`], [`RelocError`], [`Value`], [`compute`], [`apply`] and
//! [`name`]. Module code (the loader, `ksites embed`, `check-module`) uses only these.

use core::fmt;

/// `e_machine` of the objects this architecture loads (`EM_X86_64`).
pub const MACHINE: u16 = 62;
/// The architecture's name in messages.
pub const ARCH_NAME: &str = "x86-64";

/// The relocation that does nothing (`R_X86_64_NONE`).
pub const NONE: u32 = 0;
/// A 64-bit absolute address, `S + A` (`R_X86_64_64`): the pointer fields of ifunc and
/// probe records.
pub const ABS64: u32 = 1;
/// A 32-bit place-relative field, `S + A - P` (`R_X86_64_PC32`): every self-relative
/// field of a module's `.ksites` table is relocated with it (`.rela.ksites`).
pub const TABLE_FIELD: u32 = PC32;

const R_64: u32 = 1;
const PC32: u32 = 2;
const PLT32: u32 = 4;
const R_32: u32 = 10;
const R_32S: u32 = 11;
const PC64: u32 = 24;

/// Whether `r_type` is a 32-bit place-relative branch or data reference (`PC32` or
/// `PLT32`): what a `call`/`jmp rel32` to a symbol carries.
pub fn is_rel32(r_type: u32) -> bool {
    matches!(r_type, PC32 | PLT32)
}

/// The relocation a disabled probe's tail call to a stub carries (`R_X86_64_PLT32`).
pub const BRANCH32: u32 = PLT32;

/// Why a relocation could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocError {
    /// The loader does not implement this type.
    Unsupported,
    /// The result does not fit the field.
    Overflow {
        /// The value that did not fit.
        value: i64,
    },
    /// The place is shorter than the field.
    Short,
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocError::Unsupported => f.write_str("unsupported relocation type"),
            RelocError::Overflow { value } => write!(f, "{value:#x} does not fit"),
            RelocError::Short => f.write_str("field past the end of its section"),
        }
    }
}

/// The bytes a relocation writes at its place (little-endian, `len` of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Value {
    bytes: [u8; 8],
    len: usize,
}

impl Value {
    /// The bytes to write.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The width in bytes of the field `r_type` writes (0 for [`NONE`]), or `None` if the
/// loader does not implement it.
#[inline]
pub fn width(r_type: u32) -> Option<usize> {
    match r_type {
        NONE => Some(0),
        R_64 | PC64 => Some(8),
        PC32 | PLT32 | R_32 | R_32S => Some(4),
        _ => None,
    }
}

/// What relocation `r_type` writes for symbol value `s`, addend `a`, at place `p`:
/// `R_X86_64_64`, `PC64`, `PC32`, `PLT32`, `32`, `32S` (each 32-bit result checked for
/// overflow) and `NONE` (nothing).
#[inline]
pub fn compute(r_type: u32, s: u64, a: i64, p: u64) -> Result<Value, RelocError> {
    let sa = s.wrapping_add_signed(a);
    let four = |v: u32| Value {
        bytes: u64::from(v).to_le_bytes(),
        len: 4,
    };
    let overflow = |value: i64| RelocError::Overflow { value };
    Ok(match r_type {
        NONE => Value {
            bytes: [0; 8],
            len: 0,
        },
        R_64 => Value {
            bytes: sa.to_le_bytes(),
            len: 8,
        },
        PC64 => Value {
            bytes: sa.wrapping_sub(p).to_le_bytes(),
            len: 8,
        },
        PC32 | PLT32 => {
            let v = sa.wrapping_sub(p) as i64;
            four(i32::try_from(v).map_err(|_| overflow(v))? as u32)
        }
        R_32 => four(u32::try_from(sa).map_err(|_| overflow(sa as i64))?),
        R_32S => four(i32::try_from(sa as i64).map_err(|_| overflow(sa as i64))? as u32),
        _ => return Err(RelocError::Unsupported),
    })
}

/// Applies relocation `r_type` to the start of `place` (see [`compute`]).
pub fn apply(r_type: u32, place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), RelocError> {
    let v = compute(r_type, s, a, p)?;
    place
        .get_mut(..v.len)
        .ok_or(RelocError::Short)?
        .copy_from_slice(v.bytes());
    Ok(())
}

/// The name of relocation type `r_type` (`R_X86_64_*`).
pub fn name(r_type: u32) -> &'static str {
    match r_type {
        0 => "R_X86_64_NONE",
        1 => "R_X86_64_64",
        2 => "R_X86_64_PC32",
        3 => "R_X86_64_GOT32",
        4 => "R_X86_64_PLT32",
        9 => "R_X86_64_GOTPCREL",
        10 => "R_X86_64_32",
        11 => "R_X86_64_32S",
        12 => "R_X86_64_16",
        13 => "R_X86_64_PC16",
        14 => "R_X86_64_8",
        15 => "R_X86_64_PC8",
        23 => "R_X86_64_TPOFF32",
        24 => "R_X86_64_PC64",
        25 => "R_X86_64_GOTOFF64",
        26 => "R_X86_64_GOTPC32",
        32 => "R_X86_64_SIZE32",
        33 => "R_X86_64_SIZE64",
        41 => "R_X86_64_GOTPCRELX",
        42 => "R_X86_64_REX_GOTPCRELX",
        _ => "R_X86_64_?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pc32_checks_overflow_and_abs64_does_not() {
        assert_eq!(
            compute(PC32, 0x1010, -4, 0x1000).unwrap().bytes(),
            &12u32.to_le_bytes()
        );
        assert_eq!(
            compute(PC32, 0x1_0000_0000, 0, 0),
            Err(RelocError::Overflow {
                value: 0x1_0000_0000
            })
        );
        assert_eq!(compute(ABS64, u64::MAX, 1, 0).unwrap().bytes(), &[0; 8]);
        assert_eq!(compute(NONE, 1, 2, 3).unwrap().bytes(), &[] as &[u8]);
        assert_eq!(compute(9, 0, 0, 0), Err(RelocError::Unsupported));
        let mut b = [0u8; 3];
        assert_eq!(apply(PC32, &mut b, 0, 0, 0), Err(RelocError::Short));
        assert_eq!(name(TABLE_FIELD), "R_X86_64_PC32");
    }
}
