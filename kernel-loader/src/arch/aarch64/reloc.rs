//! AArch64 ELF relocations: the machine number, the relocation types a module may use,
//! how each is computed and written into its data field or instruction, each checked
//! for overflow, the range-extension veneer, and their names.
//!
//! The authority is Arm's *ELF for the Arm 64-bit Architecture (AArch64)*, "aaelf64"
//! (<https://github.com/ARM-software/abi-aa/blob/main/aaelf64/aaelf64.rst>), section
//! "Relocation operations" (tables "Static Data relocations", "Group relocations to
//! create a 16-, 32-, 48-, or 64-bit unsigned data value or address inline",
//! "Relocations to generate 19, 21 and 33 bit PC-relative addresses", "Relocations for
//! control-flow instructions"). Its notation: `S` the symbol's address, `A` the
//! addend, `P` the place, `X` the result, `Page(expr)` the expression with its low 12
//! bits cleared. The `_NC` forms have no overflow check; every other form below is
//! checked against the range the ABI gives. As `lld` and GNU `ld` do, the loader also
//! refuses a `LDST{16,32,64,128}_ABS_LO12_NC` whose address is not a multiple of the
//! access size (the low bits would be dropped) and a branch or literal load to an
//! address that is not 4-byte aligned.
//!
//! Every architecture's `reloc` module defines the same names: [`MACHINE`],
//! [`ARCH_NAME`], [`NONE`], [`ABS64`], [`TABLE_FIELD`], [`RelocError`], [`Value`],
//! [`width`], [`compute`], [`apply`] and [`name`]. Unlike x86-64's, this [`compute`]
//! reads the instruction already at the place (an AArch64 relocation rewrites an
//! immediate field and keeps the opcode and registers); [`apply`] has the same
//! signature everywhere. AArch64 adds [`needs_veneer`], [`VENEER_LEN`] and [`veneer`]
//! for `bl`/`b` targets beyond ±128 MiB.

use core::fmt;

/// `e_machine` of the objects this architecture loads (`EM_AARCH64`).
pub const MACHINE: u16 = 183;
/// The architecture's name in messages.
pub const ARCH_NAME: &str = "aarch64";

/// The relocation that does nothing (`R_AARCH64_NONE`; aaelf64 also reserves 256 for it).
pub const NONE: u32 = 0;
/// A 64-bit absolute address, `S + A` (`R_AARCH64_ABS64`).
pub const ABS64: u32 = 257;
/// A 32-bit place-relative field, `S + A - P` (`R_AARCH64_PREL32`): what a module's
/// `.ksites` table's self-relative fields are relocated with.
pub const TABLE_FIELD: u32 = PREL32;

const NONE_256: u32 = 256;
const ABS32: u32 = 258;
const ABS16: u32 = 259;
const PREL64: u32 = 260;
const PREL32: u32 = 261;
const PREL16: u32 = 262;
const MOVW_UABS_G0: u32 = 263;
const MOVW_UABS_G0_NC: u32 = 264;
const MOVW_UABS_G1: u32 = 265;
const MOVW_UABS_G1_NC: u32 = 266;
const MOVW_UABS_G2: u32 = 267;
const MOVW_UABS_G2_NC: u32 = 268;
const MOVW_UABS_G3: u32 = 269;
const LD_PREL_LO19: u32 = 273;
const ADR_PREL_LO21: u32 = 274;
const ADR_PREL_PG_HI21: u32 = 275;
const ADR_PREL_PG_HI21_NC: u32 = 276;
const ADD_ABS_LO12_NC: u32 = 277;
const LDST8_ABS_LO12_NC: u32 = 278;
const TSTBR14: u32 = 279;
const CONDBR19: u32 = 280;
const JUMP26: u32 = 282;
const CALL26: u32 = 283;
const LDST16_ABS_LO12_NC: u32 = 284;
const LDST32_ABS_LO12_NC: u32 = 285;
const LDST64_ABS_LO12_NC: u32 = 286;
const LDST128_ABS_LO12_NC: u32 = 299;

/// Why a relocation could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocError {
    /// The loader does not implement this type.
    Unsupported,
    /// The result does not fit the field.
    Overflow {
        /// The value that did not fit (`X`).
        value: i64,
        /// The range it must lie in (`min <= X < max`), for the message.
        min: i64,
        /// Exclusive upper bound.
        max: i64,
    },
    /// The result's low bits, which the field drops, are not zero.
    Misaligned {
        /// The value (`X`).
        value: i64,
        /// The alignment it needs, in bytes.
        align: u8,
    },
    /// The place is shorter than the field.
    Short,
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocError::Unsupported => f.write_str("unsupported relocation type"),
            RelocError::Overflow { value, min, max } => write!(
                f,
                "{value:#x} does not fit (the field holds {min:#x} <= X < {max:#x})"
            ),
            RelocError::Misaligned { value, align } => {
                write!(f, "{value:#x} is not {align}-byte aligned")
            }
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

    fn new(v: u64, len: usize) -> Value {
        Value {
            bytes: v.to_le_bytes(),
            len,
        }
    }
}

/// The width in bytes of the field `r_type` writes (0 for `NONE`, 4 for every
/// instruction), or `None` if the loader does not implement it.
#[inline]
pub fn width(r_type: u32) -> Option<usize> {
    match r_type {
        NONE | NONE_256 => Some(0),
        ABS64 | PREL64 => Some(8),
        ABS16 | PREL16 => Some(2),
        ABS32 | PREL32 | MOVW_UABS_G0 | MOVW_UABS_G0_NC | MOVW_UABS_G1 | MOVW_UABS_G1_NC
        | MOVW_UABS_G2 | MOVW_UABS_G2_NC | MOVW_UABS_G3 | LD_PREL_LO19 | ADR_PREL_LO21
        | ADR_PREL_PG_HI21 | ADR_PREL_PG_HI21_NC | ADD_ABS_LO12_NC | LDST8_ABS_LO12_NC
        | TSTBR14 | CONDBR19 | JUMP26 | CALL26 | LDST16_ABS_LO12_NC | LDST32_ABS_LO12_NC
        | LDST64_ABS_LO12_NC | LDST128_ABS_LO12_NC => Some(4),
        _ => None,
    }
}

/// Whether an overflowing `r_type` can be served by a range-extension veneer: the
/// `bl` (`CALL26`) and `b` (`JUMP26`) the ABI lets a linker redirect through one that
/// clobbers only IP0/IP1 (aaelf64, "Call and Jump relocations").
#[inline]
pub fn needs_veneer(r_type: u32) -> bool {
    matches!(r_type, CALL26 | JUMP26)
}

/// Bytes of one veneer.
pub const VENEER_LEN: usize = 16;

/// A veneer reaching any 64-bit `target`: `ldr x16, #8; br x16; .quad target`. x16
/// (IP0) is the intra-procedure-call scratch register AAPCS64 gives veneers. It must
/// lie 8-byte aligned (its literal is loaded with one 64-bit load).
pub fn veneer(target: u64) -> [u8; VENEER_LEN] {
    const LDR_X16_PC8: u32 = 0x5800_0050; // ldr x16, .+8
    const BR_X16: u32 = 0xd61f_0200; // br x16
    let mut v = [0u8; VENEER_LEN];
    v[0..4].copy_from_slice(&LDR_X16_PC8.to_le_bytes());
    v[4..8].copy_from_slice(&BR_X16.to_le_bytes());
    v[8..16].copy_from_slice(&target.to_le_bytes());
    v
}

/// The target a [`veneer`] branches to, if `bytes` is one.
pub fn veneer_target(bytes: &[u8; VENEER_LEN]) -> Option<u64> {
    let v = veneer(0);
    (bytes[..8] == v[..8]).then(|| {
        let mut t = [0u8; 8];
        t.copy_from_slice(&bytes[8..]);
        u64::from_le_bytes(t)
    })
}

/// Checks `min <= x < max`.
fn range(x: i64, min: i64, max: i64) -> Result<i64, RelocError> {
    if x < min || x >= max {
        return Err(RelocError::Overflow { value: x, min, max });
    }
    Ok(x)
}

/// Checks the low `log2(align)` bits of `x` are zero.
fn aligned(x: i64, align: u8) -> Result<i64, RelocError> {
    if x & (i64::from(align) - 1) != 0 {
        return Err(RelocError::Misaligned { value: x, align });
    }
    Ok(x)
}

/// `insn` with `bits` (already shifted into place) replacing the bits of `mask`.
fn field(insn: u32, mask: u32, bits: u32) -> u32 {
    (insn & !mask) | (bits & mask)
}

/// An `imm16` of `movz`/`movk` (bits 20:5) from `x >> shift`.
fn movw(insn: u32, x: u64, shift: u32) -> u32 {
    field(insn, 0xffff << 5, (((x >> shift) & 0xffff) as u32) << 5)
}

/// `adr`/`adrp`'s 21-bit immediate: immlo (bits 30:29) and immhi (bits 23:5).
fn adr_imm(insn: u32, imm: i64) -> u32 {
    let imm = imm as u32;
    let lo = (imm & 3) << 29;
    let hi = ((imm >> 2) & 0x7_ffff) << 5;
    field(insn, (3 << 29) | (0x7_ffff << 5), lo | hi)
}

/// A load/store or `add`'s unsigned 12-bit offset (bits 21:10) from bits 11:`scale`
/// of `x`, checked to be a multiple of `1 << scale`.
fn lo12(insn: u32, x: u64, scale: u8) -> Result<u32, RelocError> {
    aligned(x as i64, 1 << scale)?;
    Ok(field(
        insn,
        0xfff << 10,
        (((x & 0xfff) >> scale) as u32) << 10,
    ))
}

/// A PC-relative branch immediate: `x`'s bits `bits+1`:2 into an instruction field of
/// `bits` bits at `shift`, checked for ±2^(bits+1) and 4-byte alignment.
fn branch(insn: u32, x: i64, bits: u32, shift: u32) -> Result<u32, RelocError> {
    let reach = 1i64 << (bits + 1);
    range(aligned(x, 4)?, -reach, reach)?;
    let mask = ((1u32 << bits) - 1) << shift;
    Ok(field(insn, mask, (((x >> 2) as u32) << shift) & mask))
}

/// `expr & !0xfff`.
fn page(v: u64) -> u64 {
    v & !0xfff
}

/// What relocation `r_type` writes for symbol value `s`, addend `a`, at place `p`,
/// where `place` holds the field's current bytes (the instruction whose immediate is
/// rewritten; at least [`width`] bytes).
pub fn compute(r_type: u32, s: u64, a: i64, p: u64, place: &[u8]) -> Result<Value, RelocError> {
    let sa = s.wrapping_add_signed(a);
    let pcrel = sa.wrapping_sub(p) as i64;
    let w = width(r_type).ok_or(RelocError::Unsupported)?;
    let insn = match place.get(..4) {
        Some(&[b0, b1, b2, b3]) => u32::from_le_bytes([b0, b1, b2, b3]),
        _ if w == 4 => return Err(RelocError::Short),
        _ => 0,
    };
    let four = |v: u32| Value::new(u64::from(v), 4);
    const I32: (i64, i64) = (i32::MIN as i64, 1 << 32);
    const I16: (i64, i64) = (i16::MIN as i64, 1 << 16);
    // The unsigned G0..G2 results: 0 <= X < 2^16, 2^32, 2^48.
    let uabs = |max_bits: u32| range(sa as i64, 0, 1 << max_bits).map(|x| x as u64);
    Ok(match r_type {
        NONE | NONE_256 => Value::new(0, 0),
        ABS64 => Value::new(sa, 8),
        PREL64 => Value::new(pcrel as u64, 8),
        ABS32 => four(range(sa as i64, I32.0, I32.1)? as u32),
        PREL32 => four(range(pcrel, I32.0, I32.1)? as u32),
        ABS16 => Value::new(range(sa as i64, I16.0, I16.1)? as u64 & 0xffff, 2),
        PREL16 => Value::new(range(pcrel, I16.0, I16.1)? as u64 & 0xffff, 2),
        MOVW_UABS_G0 => four(movw(insn, uabs(16)?, 0)),
        MOVW_UABS_G0_NC => four(movw(insn, sa, 0)),
        MOVW_UABS_G1 => four(movw(insn, uabs(32)?, 16)),
        MOVW_UABS_G1_NC => four(movw(insn, sa, 16)),
        MOVW_UABS_G2 => four(movw(insn, uabs(48)?, 32)),
        MOVW_UABS_G2_NC => four(movw(insn, sa, 32)),
        MOVW_UABS_G3 => four(movw(insn, sa, 48)),
        LD_PREL_LO19 | CONDBR19 => four(branch(insn, pcrel, 19, 5)?),
        TSTBR14 => four(branch(insn, pcrel, 14, 5)?),
        JUMP26 | CALL26 => four(branch(insn, pcrel, 26, 0)?),
        ADR_PREL_LO21 => four(adr_imm(insn, range(pcrel, -(1 << 20), 1 << 20)?)),
        ADR_PREL_PG_HI21 | ADR_PREL_PG_HI21_NC => {
            let x = page(sa).wrapping_sub(page(p)) as i64;
            if r_type == ADR_PREL_PG_HI21 {
                range(x, -(1 << 32), 1 << 32)?;
            }
            four(adr_imm(insn, x >> 12))
        }
        ADD_ABS_LO12_NC | LDST8_ABS_LO12_NC => four(lo12(insn, sa, 0)?),
        LDST16_ABS_LO12_NC => four(lo12(insn, sa, 1)?),
        LDST32_ABS_LO12_NC => four(lo12(insn, sa, 2)?),
        LDST64_ABS_LO12_NC => four(lo12(insn, sa, 3)?),
        LDST128_ABS_LO12_NC => four(lo12(insn, sa, 4)?),
        _ => return Err(RelocError::Unsupported),
    })
}

/// Applies relocation `r_type` to the start of `place` (see [`compute`]).
pub fn apply(r_type: u32, place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), RelocError> {
    let v = compute(r_type, s, a, p, place)?;
    place
        .get_mut(..v.len)
        .ok_or(RelocError::Short)?
        .copy_from_slice(v.bytes());
    Ok(())
}

/// The name of relocation type `r_type` (`R_AARCH64_*`), for the types the loader
/// applies and the common ones it refuses (GOT, TLS, dynamic).
pub fn name(r_type: u32) -> &'static str {
    match r_type {
        0 | 256 => "R_AARCH64_NONE",
        257 => "R_AARCH64_ABS64",
        258 => "R_AARCH64_ABS32",
        259 => "R_AARCH64_ABS16",
        260 => "R_AARCH64_PREL64",
        261 => "R_AARCH64_PREL32",
        262 => "R_AARCH64_PREL16",
        263 => "R_AARCH64_MOVW_UABS_G0",
        264 => "R_AARCH64_MOVW_UABS_G0_NC",
        265 => "R_AARCH64_MOVW_UABS_G1",
        266 => "R_AARCH64_MOVW_UABS_G1_NC",
        267 => "R_AARCH64_MOVW_UABS_G2",
        268 => "R_AARCH64_MOVW_UABS_G2_NC",
        269 => "R_AARCH64_MOVW_UABS_G3",
        270 => "R_AARCH64_MOVW_SABS_G0",
        271 => "R_AARCH64_MOVW_SABS_G1",
        272 => "R_AARCH64_MOVW_SABS_G2",
        273 => "R_AARCH64_LD_PREL_LO19",
        274 => "R_AARCH64_ADR_PREL_LO21",
        275 => "R_AARCH64_ADR_PREL_PG_HI21",
        276 => "R_AARCH64_ADR_PREL_PG_HI21_NC",
        277 => "R_AARCH64_ADD_ABS_LO12_NC",
        278 => "R_AARCH64_LDST8_ABS_LO12_NC",
        279 => "R_AARCH64_TSTBR14",
        280 => "R_AARCH64_CONDBR19",
        282 => "R_AARCH64_JUMP26",
        283 => "R_AARCH64_CALL26",
        284 => "R_AARCH64_LDST16_ABS_LO12_NC",
        285 => "R_AARCH64_LDST32_ABS_LO12_NC",
        286 => "R_AARCH64_LDST64_ABS_LO12_NC",
        287 => "R_AARCH64_MOVW_PREL_G0",
        288 => "R_AARCH64_MOVW_PREL_G0_NC",
        289 => "R_AARCH64_MOVW_PREL_G1",
        290 => "R_AARCH64_MOVW_PREL_G1_NC",
        291 => "R_AARCH64_MOVW_PREL_G2",
        292 => "R_AARCH64_MOVW_PREL_G2_NC",
        293 => "R_AARCH64_MOVW_PREL_G3",
        299 => "R_AARCH64_LDST128_ABS_LO12_NC",
        307 => "R_AARCH64_GOTREL64",
        308 => "R_AARCH64_GOTREL32",
        309 => "R_AARCH64_GOT_LD_PREL19",
        310 => "R_AARCH64_LD64_GOTOFF_LO15",
        311 => "R_AARCH64_ADR_GOT_PAGE",
        312 => "R_AARCH64_LD64_GOT_LO12_NC",
        313 => "R_AARCH64_LD64_GOTPAGE_LO15",
        512..=580 => "R_AARCH64_TLS*",
        1024 => "R_AARCH64_COPY",
        1025 => "R_AARCH64_GLOB_DAT",
        1026 => "R_AARCH64_JUMP_SLOT",
        1027 => "R_AARCH64_RELATIVE",
        1028..=1031 => "R_AARCH64_TLS*",
        1032 => "R_AARCH64_IRELATIVE",
        _ => "R_AARCH64_?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(r_type: u32, word: u32, s: u64, a: i64, p: u64) -> Result<u32, RelocError> {
        let mut b = word.to_le_bytes();
        apply(r_type, &mut b, s, a, p)?;
        Ok(u32::from_le_bytes(b))
    }

    #[test]
    fn branches_encode_and_check_reach_and_alignment() {
        // bl .+8
        assert_eq!(
            insn(CALL26, 0x9400_0000, 0x1008, 0, 0x1000),
            Ok(0x9400_0002)
        );
        // b .-4
        assert_eq!(
            insn(JUMP26, 0x1400_0000, 0x1000, -4, 0x1000),
            Ok(0x17ff_ffff)
        );
        let far = 128 << 20;
        assert!(insn(CALL26, 0x9400_0000, far - 4, 0, 0).is_ok());
        assert_eq!(
            insn(CALL26, 0x9400_0000, far, 0, 0),
            Err(RelocError::Overflow {
                value: far as i64,
                min: -(far as i64),
                max: far as i64
            })
        );
        assert!(insn(CALL26, 0x9400_0000, 0, -(far as i64), 0).is_ok());
        assert_eq!(
            insn(CALL26, 0x9400_0000, 2, 0, 0),
            Err(RelocError::Misaligned { value: 2, align: 4 })
        );
        // b.eq .+0x100: imm19 = 0x40, cond kept.
        assert_eq!(insn(CONDBR19, 0x5400_0000, 0x100, 0, 0), Ok(0x5400_0800));
        assert!(insn(CONDBR19, 0x5400_0000, 1 << 20, 0, 0).is_err());
        // tbz w0, #3, .-4
        assert_eq!(insn(TSTBR14, 0x3618_0000, 0, -4, 0), Ok(0x361f_ffe0));
        assert!(insn(TSTBR14, 0x3618_0000, 1 << 15, 0, 0).is_err());
        assert!(insn(TSTBR14, 0x3618_0000, (1 << 15) - 4, 0, 0).is_ok());
    }

    #[test]
    fn adrp_add_ldst_movw() {
        // adrp x0, sym: page delta 0x12345 pages.
        let s = 0x1234_5678u64;
        let p = 0x1000u64;
        let delta = ((s & !0xfff) - p) >> 12;
        let w = insn(ADR_PREL_PG_HI21, 0x9000_0000, s, 0, p).unwrap();
        assert_eq!((w >> 29) & 3, (delta & 3) as u32);
        assert_eq!((w >> 5) & 0x7_ffff, (delta >> 2) as u32);
        assert!(insn(ADR_PREL_PG_HI21, 0x9000_0000, 1 << 32, 0, 0).is_err());
        assert!(insn(ADR_PREL_PG_HI21_NC, 0x9000_0000, 1 << 32, 0, 0).is_ok());
        // add x0, x0, :lo12:sym
        assert_eq!(
            insn(ADD_ABS_LO12_NC, 0x9100_0000, s, 0, p),
            Ok(0x9100_0000 | 0x678 << 10)
        );
        // ldr x1, [x0, :lo12:sym]: scaled by 8.
        assert_eq!(
            insn(LDST64_ABS_LO12_NC, 0xf940_0001, 0x1008, 0, 0),
            Ok(0xf940_0001 | 1 << 10)
        );
        assert_eq!(
            insn(LDST64_ABS_LO12_NC, 0xf940_0001, 0x1004, 0, 0),
            Err(RelocError::Misaligned {
                value: 0x1004,
                align: 8
            })
        );
        assert!(insn(LDST128_ABS_LO12_NC, 0x3dc0_0000, 0x1010, 0, 0).is_ok());
        assert!(insn(LDST128_ABS_LO12_NC, 0x3dc0_0000, 0x1018, 0, 0).is_err());
        // movz/movk x0, #:abs_gN:
        let v = 0x1122_3344_5566_7788u64;
        assert_eq!(
            insn(MOVW_UABS_G3, 0xd2e0_0000, v, 0, 0),
            Ok(0xd2e0_0000 | 0x1122 << 5)
        );
        assert_eq!(
            insn(MOVW_UABS_G0_NC, 0xf280_0000, v, 0, 0),
            Ok(0xf280_0000 | 0x7788 << 5)
        );
        assert!(insn(MOVW_UABS_G2, 0xf2c0_0000, v, 0, 0).is_err());
        assert!(insn(MOVW_UABS_G2, 0xf2c0_0000, 0xffff_ffff_ffff, 0, 0).is_ok());
        assert!(insn(MOVW_UABS_G1, 0xf2a0_0000, 1 << 32, 0, 0).is_err());
        assert!(insn(MOVW_UABS_G0, 0xd280_0000, 0x1_0000, 0, 0).is_err());
        // adr x0, .+5 (byte-exact).
        let w = insn(ADR_PREL_LO21, 0x1000_0000, 5, 0, 0).unwrap();
        assert_eq!(w, 0x1000_0000 | 1 << 29 | 1 << 5);
        assert!(insn(ADR_PREL_LO21, 0x1000_0000, 1 << 20, 0, 0).is_err());
    }

    #[test]
    fn data_fields_veneer_and_refusals() {
        let mut b = [0u8; 4];
        assert_eq!(apply(PREL32, &mut b, 0x2000, 4, 0x1000), Ok(()));
        assert_eq!(b, 0x1004u32.to_le_bytes());
        assert!(apply(PREL32, &mut b, 1 << 32, 0, 0).is_err());
        // ABS32 accepts -2^31..2^32.
        assert!(apply(ABS32, &mut b, 0xffff_ffff, 0, 0).is_ok());
        assert!(apply(ABS32, &mut b, 0, -(1 << 31), 0).is_ok());
        assert!(apply(ABS32, &mut b, 1 << 32, 0, 0).is_err());
        assert_eq!(compute(ABS64, 1, -2, 0, &[]).unwrap().bytes(), &[0xff; 8]);
        assert_eq!(
            apply(CALL26, &mut [0u8; 3], 0, 0, 0),
            Err(RelocError::Short)
        );
        assert_eq!(compute(311, 0, 0, 0, &b), Err(RelocError::Unsupported));
        assert_eq!(width(311), None);
        assert_eq!(name(311), "R_AARCH64_ADR_GOT_PAGE");
        assert_eq!(name(TABLE_FIELD), "R_AARCH64_PREL32");
        let v = veneer(0xdead_beef_0000_1234);
        assert_eq!(veneer_target(&v), Some(0xdead_beef_0000_1234));
        assert_eq!(veneer_target(&[0; VENEER_LEN]), None);
        assert!(needs_veneer(CALL26) && needs_veneer(JUMP26) && !needs_veneer(CONDBR19));
    }
}
