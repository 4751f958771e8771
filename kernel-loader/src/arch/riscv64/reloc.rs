//! RISC-V (RV64) ELF relocations: the machine number, the relocation types a module may
//! use, how each is computed and written into its data field or instruction, each
//! checked for overflow, the range-extension veneer, and their names.
//!
//! The authority is the *RISC-V ABIs Specification*, "ELF Object Files" chapter
//! (<https://github.com/riscv-non-isa/riscv-elf-psabi-doc>, `riscv-elf.adoc`, table
//! "Relocation types" and section "Calculations"): `S` the symbol's address, `A` the
//! addend, `P` the place. Instruction fields come from the unprivileged ISA manual
//! (I/S/B/U/J types, compressed CB/CJ formats).
//!
//! What the loader does with each type gcc and rustc emit for kernel code (`-mcmodel=medany`
//! or `medlow`, `-fno-pic`):
//!
//! * **Data**: `64`, `32` (`S + A` in `-2^31 <= X < 2^32`), `32_PCREL` (`S + A - P`,
//!   signed 32 bits).
//! * **Branches**: `BRANCH` (B-type, ±4 KiB), `JAL` (J-type, ±1 MiB), `RVC_BRANCH` (CB,
//!   ±256 B), `RVC_JUMP` (CJ, ±2 KiB): `S + A - P`, checked for reach and for an even
//!   offset (bit 0 is not encoded).
//! * **Calls**: `CALL` and `CALL_PLT`, an `auipc` + `jalr` pair (8 bytes) reaching
//!   `S + A - P` within `-2^31 - 2^11 <= X < 2^31 - 2^11` (the `+0x800` rounding of the
//!   high part). A call (or a `JAL`) out of reach — a module loaded more than 2 GiB from
//!   the kernel — goes through a [`veneer`] the loader writes next to the module, as
//!   aarch64's far `bl` does.
//! * **PC-relative addresses**: `PCREL_HI20` (the `auipc`, same range as a call) and its
//!   partners `PCREL_LO12_I` / `PCREL_LO12_S` (the `addi`/load or the store). A LO12
//!   relocation's symbol is not the target: it is the label of the `auipc` that carries
//!   the HI20, and its value is the low 12 bits of *that* HI20's `S + A - P` (plus the
//!   LO12's own addend). The loader finds the HI20 by the label's address in a table it
//!   sorts once per module (`module::link`; a binary search per LO12, not a scan), and
//!   calls [`compute`] with the HI20's target as `S` and the `auipc`'s address as `P`.
//!   A LO12 whose label carries no HI20 is refused.
//! * **Absolute addresses** (`-mcmodel=medlow`): `HI20` (`lui`, `S + A` in
//!   `-2^31 - 2^11 <= X < 2^31 - 2^11`), `LO12_I`, `LO12_S` (the low part: no overflow
//!   possible).
//! * **Label differences** (switch tables with relaxation on, `.eh_frame`): `ADD8/16/32/64`
//!   add `S + A` to the field, `SUB6/8/16/32/64` subtract it, `SET6/8/16/32` write it
//!   (`SUB6`/`SET6` keep the top two bits of their byte). The field holds a difference
//!   only once both halves are applied, so one alone is modular arithmetic; the loader
//!   checks the pair instead ([`difference_half`], [`check_difference`]): an `ADDn` or
//!   `SETn` followed by a `SUBn` at the same place must leave a difference that fits
//!   `n` bits (`-2^(n-1) <= d < 2^n`).
//! * **`RELAX`** is a hint that the preceding relocation's instructions may be relaxed:
//!   the loader does not relax, so it does nothing (the unrelaxed code is correct).
//! * **`ALIGN`**: with relaxation on, the assembler cannot know the final alignment, so
//!   at each alignment directive in code it emits the worst case of NOP padding
//!   (alignment minus the smallest instruction) and an `ALIGN` whose addend is the
//!   padding's length, for the linker to delete the excess. The loader deletes nothing:
//!   the padding stays and is executed as NOPs, so the code is correct as placed (the
//!   module's sections are placed at their `sh_addralign`, so every offset is what the
//!   assembler computed); what is lost is the alignment itself, a performance hint for
//!   code. The loader checks what correctness needs ([`align_padding`],
//!   [`padding_insn`]): the addend is a well-formed padding (`2^k - 2` or `2^k - 4`
//!   bytes), and every byte of it is `nop` or `c.nop`. Code whose placement matters
//!   (probe sites, ifunc sites) is checked where it is used, by the table's validation.
//!   Build modules with `-mno-relax` (as Linux builds its riscv modules) to get no
//!   `ALIGN` at all: the assembler then pads exactly.
//!
//! Refused (with [`RelocError::Unsupported`], which the loader reports with the type,
//! section, offset and symbol): GOT, TLS, GP-relative and dynamic relocations,
//! `SET_ULEB128`/`SUB_ULEB128` (not emitted by gcc 12 with binutils 2.40), and anything
//! else.
//!
//! Every architecture's `reloc` module defines the same names: [`MACHINE`],
//! [`ARCH_NAME`], [`NONE`], [`ABS64`], [`TABLE_FIELD`], [`RelocError`], [`Value`],
//! [`width`], [`compute`], [`apply`] and [`name`]; like aarch64's, this [`compute`] reads
//! the instruction (or the data) already at the place. riscv64 adds, as aarch64 does,
//! [`needs_veneer`], [`VENEER_LEN`], [`veneer`] and [`veneer_target`], and its own
//! [`PCREL_HI20`], [`is_pcrel_lo`], [`difference_half`], [`check_difference`],
//! [`align_padding`] and [`padding_insn`].

use core::fmt;

/// `e_machine` of the objects this architecture loads (`EM_RISCV`).
pub const MACHINE: u16 = 243;
/// The architecture's name in messages.
pub const ARCH_NAME: &str = "riscv64";

/// The relocation that does nothing (`R_RISCV_NONE`).
pub const NONE: u32 = 0;
/// A 64-bit absolute address, `S + A` (`R_RISCV_64`).
pub const ABS64: u32 = 2;
/// A 32-bit place-relative field, `S + A - P` (`R_RISCV_32_PCREL`): what a module's
/// `.ksites` table's self-relative fields are relocated with.
pub const TABLE_FIELD: u32 = PCREL32;
/// The high part of a PC-relative address (`R_RISCV_PCREL_HI20`), on an `auipc`: what
/// a `PCREL_LO12_I`/`_S` refers to through its label.
pub const PCREL_HI20: u32 = 23;

const ABS32: u32 = 1;
const BRANCH: u32 = 16;
const JAL: u32 = 17;
const CALL: u32 = 18;
const CALL_PLT: u32 = 19;
const PCREL_LO12_I: u32 = 24;
const PCREL_LO12_S: u32 = 25;
const HI20: u32 = 26;
const LO12_I: u32 = 27;
const LO12_S: u32 = 28;
const ADD8: u32 = 33;
const ADD16: u32 = 34;
const ADD32: u32 = 35;
const ADD64: u32 = 36;
const SUB8: u32 = 37;
const SUB16: u32 = 38;
const SUB32: u32 = 39;
const SUB64: u32 = 40;
const ALIGN: u32 = 43;
const RVC_BRANCH: u32 = 44;
const RVC_JUMP: u32 = 45;
const RELAX: u32 = 51;
const SUB6: u32 = 52;
const SET6: u32 = 53;
const SET8: u32 = 54;
const SET16: u32 = 55;
const SET32: u32 = 56;
const PCREL32: u32 = 57;

/// `nop` (`addi x0, x0, 0`).
const NOP: u32 = 0x0000_0013;
/// `c.nop`.
const C_NOP: u16 = 0x0001;

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

/// The width in bytes of the field `r_type` reads and writes (0 for `NONE`, `RELAX`
/// and `ALIGN`, 8 for a call's `auipc` + `jalr`), or `None` if the loader does not
/// implement it.
#[inline]
pub fn width(r_type: u32) -> Option<usize> {
    match r_type {
        NONE | RELAX | ALIGN => Some(0),
        ADD8 | SUB8 | SUB6 | SET6 | SET8 => Some(1),
        ADD16 | SUB16 | SET16 | RVC_BRANCH | RVC_JUMP => Some(2),
        ABS32 | PCREL32 | ADD32 | SUB32 | SET32 | BRANCH | JAL | PCREL_HI20 | PCREL_LO12_I
        | PCREL_LO12_S | HI20 | LO12_I | LO12_S => Some(4),
        ABS64 | ADD64 | SUB64 | CALL | CALL_PLT => Some(8),
        _ => None,
    }
}

/// Whether `r_type` is a `PCREL_LO12_I` or `PCREL_LO12_S`: its symbol is the label of
/// the `auipc` whose [`PCREL_HI20`] gives the value (see the module docs).
#[inline]
pub fn is_pcrel_lo(r_type: u32) -> bool {
    matches!(r_type, PCREL_LO12_I | PCREL_LO12_S)
}

/// Whether an overflowing `r_type` can be served by a range-extension veneer: the
/// calls (`CALL`, `CALL_PLT`) and `JAL`, whose only effect besides the jump is the link
/// register, which the veneer leaves alone.
#[inline]
pub fn needs_veneer(r_type: u32) -> bool {
    matches!(r_type, CALL | CALL_PLT | JAL)
}

/// Bytes of one veneer.
pub const VENEER_LEN: usize = 24;

/// A veneer reaching any 64-bit `target`: `auipc t1, 0; ld t1, 16(t1); jr t1`, a
/// `nop` never executed, and `.quad target`. `t1` (x6) is a temporary the calling
/// convention leaves free at a call (the psABI's PLT stubs use it the same way); the
/// call's link register, set by the module's `jalr`/`jal`, is untouched, so the
/// target returns straight to the caller. It must lie 8-byte aligned (its literal is
/// loaded with one `ld`).
pub fn veneer(target: u64) -> [u8; VENEER_LEN] {
    const AUIPC_T1_0: u32 = 0x0000_0317; // auipc t1, 0
    const LD_T1_16_T1: u32 = 0x0103_3303; // ld t1, 16(t1)
    const JR_T1: u32 = 0x0003_0067; // jalr x0, 0(t1)
    let mut v = [0u8; VENEER_LEN];
    for (i, w) in [AUIPC_T1_0, LD_T1_16_T1, JR_T1, NOP].iter().enumerate() {
        v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    v[16..24].copy_from_slice(&target.to_le_bytes());
    v
}

/// The target a [`veneer`] branches to, if `bytes` is one.
pub fn veneer_target(bytes: &[u8; VENEER_LEN]) -> Option<u64> {
    let v = veneer(0);
    (bytes[..16] == v[..16]).then(|| {
        let mut t = [0u8; 8];
        t.copy_from_slice(&bytes[16..]);
        u64::from_le_bytes(t)
    })
}

/// Which half of a label difference `r_type` is: `Some((true, bits))` for the first
/// (`ADDn`, `SETn`), `Some((false, bits))` for the subtraction (`SUBn`), `None` for any
/// other type. See [`check_difference`].
#[inline]
pub fn difference_half(r_type: u32) -> Option<(bool, u32)> {
    Some(match r_type {
        SET6 => (true, 6),
        ADD8 | SET8 => (true, 8),
        ADD16 | SET16 => (true, 16),
        ADD32 | SET32 => (true, 32),
        ADD64 => (true, 64),
        SUB6 => (false, 6),
        SUB8 => (false, 8),
        SUB16 => (false, 16),
        SUB32 => (false, 32),
        SUB64 => (false, 64),
        _ => return None,
    })
}

/// Checks that the difference `d` (the first half's `S + A` minus the second's) of a
/// pair writing `bits` bits fits them: `-2^(bits-1) <= d < 2^bits` (a signed or an
/// unsigned reading of the field gives it back, as the assembler checks a `.byte`
/// difference it can resolve itself).
pub fn check_difference(bits: u32, d: i64) -> Result<(), RelocError> {
    if bits >= 64 {
        return Ok(());
    }
    range(d, -(1 << (bits - 1)), 1 << bits).map(|_| ())
}

/// For an `ALIGN` (`r_type`) with addend `a`: the length of the NOP padding it covers
/// at its place, and the alignment the assembler was asked for. `None` if `r_type` is
/// not `ALIGN`; [`RelocError::Unsupported`] if the addend is not a padding the
/// assembler makes (`2^k - 2` bytes where compressed instructions are on, `2^k - 4`
/// where they are off, at most 4094).
pub fn align_padding(r_type: u32, a: i64) -> Option<Result<(usize, u64), RelocError>> {
    if r_type != ALIGN {
        return None;
    }
    let len = match u64::try_from(a) {
        Ok(n) if n > 0 && n < 4096 && n % 2 == 0 => n,
        _ => return Some(Err(RelocError::Unsupported)),
    };
    let align = [len + 2, len + 4].into_iter().find(|x| x.is_power_of_two());
    Some(
        align
            .map(|al| (len as usize, al))
            .ok_or(RelocError::Unsupported),
    )
}

/// The length of the padding instruction `bytes` starts with (`c.nop`: 2, `nop`: 4),
/// or 0 if it is not one. `bytes` holds what is left of the padding (2 or more bytes).
pub fn padding_insn(bytes: &[u8]) -> usize {
    match bytes {
        [b0, b1, rest @ ..] => {
            let half = u16::from_le_bytes([*b0, *b1]);
            if half == C_NOP {
                2
            } else if let [b2, b3, ..] = rest
                && u32::from_le_bytes([*b0, *b1, *b2, *b3]) == NOP
            {
                4
            } else {
                0
            }
        }
        _ => 0,
    }
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

/// `x`'s bit `from` moved to bit `to` (as a `u32`).
#[inline]
fn bit(x: i64, from: u32, to: u32) -> u32 {
    (((x >> from) & 1) as u32) << to
}

/// `x`'s bits `hi..=lo` moved to start at bit `to`.
#[inline]
fn bits(x: i64, hi: u32, lo: u32, to: u32) -> u32 {
    let n = hi - lo + 1;
    ((((x >> lo) as u64) & ((1u64 << n) - 1)) as u32) << to
}

/// The high 20 bits of `x` for `auipc`/`lui`, rounded so that the sign-extended low 12
/// bits add back to `x`; checked: `-2^31 - 2^11 <= x < 2^31 - 2^11`.
fn hi20(x: i64) -> Result<u32, RelocError> {
    const MIN: i64 = -(1 << 31) - 0x800;
    const MAX: i64 = (1 << 31) - 0x800;
    range(x, MIN, MAX)?;
    Ok((((x + 0x800) >> 12) as u32) & 0xf_ffff)
}

/// The low 12 bits of `x`, as the sign-extended immediate [`hi20`]'s rounding expects.
fn lo12(x: i64) -> i64 {
    (x << 52) >> 52
}

/// A U-type instruction (`auipc`, `lui`) with immediate bits 31:12 = `hi`.
fn utype(insn: u32, hi: u32) -> u32 {
    (insn & 0xfff) | (hi << 12)
}

/// An I-type instruction (`addi`, loads, `jalr`) with imm[11:0] = `lo`.
fn itype(insn: u32, lo: i64) -> u32 {
    (insn & 0x000f_ffff) | bits(lo, 11, 0, 20)
}

/// An S-type instruction (stores) with imm[11:0] = `lo`.
fn stype(insn: u32, lo: i64) -> u32 {
    (insn & 0x01ff_f07f) | bits(lo, 11, 5, 25) | bits(lo, 4, 0, 7)
}

/// A B-type conditional branch to `x` (±4 KiB, even).
fn btype(insn: u32, x: i64) -> Result<u32, RelocError> {
    range(aligned(x, 2)?, -(1 << 12), 1 << 12)?;
    Ok((insn & 0x01ff_f07f)
        | bit(x, 12, 31)
        | bits(x, 10, 5, 25)
        | bits(x, 4, 1, 8)
        | bit(x, 11, 7))
}

/// A J-type `jal` to `x` (±1 MiB, even).
fn jtype(insn: u32, x: i64) -> Result<u32, RelocError> {
    range(aligned(x, 2)?, -(1 << 20), 1 << 20)?;
    Ok((insn & 0xfff) | bit(x, 20, 31) | bits(x, 10, 1, 21) | bit(x, 11, 20) | bits(x, 19, 12, 12))
}

/// A CB-format `c.beqz`/`c.bnez` to `x` (±256 B, even).
fn cbtype(insn: u16, x: i64) -> Result<u16, RelocError> {
    range(aligned(x, 2)?, -(1 << 8), 1 << 8)?;
    let imm =
        bit(x, 8, 12) | bits(x, 4, 3, 10) | bits(x, 7, 6, 5) | bits(x, 2, 1, 3) | bit(x, 5, 2);
    Ok((insn & 0xe383) | imm as u16)
}

/// A CJ-format `c.j` to `x` (±2 KiB, even).
fn cjtype(insn: u16, x: i64) -> Result<u16, RelocError> {
    range(aligned(x, 2)?, -(1 << 11), 1 << 11)?;
    let imm = bit(x, 11, 12)
        | bit(x, 4, 11)
        | bits(x, 9, 8, 9)
        | bit(x, 10, 8)
        | bit(x, 6, 7)
        | bit(x, 7, 6)
        | bits(x, 3, 1, 3)
        | bit(x, 5, 2);
    Ok((insn & 0xe003) | imm as u16)
}

/// What relocation `r_type` writes for symbol value `s`, addend `a`, at place `p`,
/// where `place` holds the field's current bytes (at least [`width`] of them: the
/// instruction whose immediate is rewritten, or the data an `ADD`/`SUB` changes).
///
/// For a `PCREL_LO12_I`/`_S`, the caller passes the target of the [`PCREL_HI20`] at the
/// LO12's label as `s` and that `auipc`'s address as `p` (see the module docs).
pub fn compute(r_type: u32, s: u64, a: i64, p: u64, place: &[u8]) -> Result<Value, RelocError> {
    let sa = s.wrapping_add_signed(a);
    let pcrel = sa.wrapping_sub(p) as i64;
    let w = width(r_type).ok_or(RelocError::Unsupported)?;
    let mut cur = [0u8; 8];
    cur[..w].copy_from_slice(place.get(..w).ok_or(RelocError::Short)?);
    let old = u64::from_le_bytes(cur);
    let insn = old as u32;
    let four = |v: u32| Value::new(u64::from(v), 4);
    let two = |v: u16| Value::new(u64::from(v), 2);
    Ok(match r_type {
        NONE | RELAX | ALIGN => Value::new(0, 0),
        ABS64 => Value::new(sa, 8),
        ABS32 => four(range(sa as i64, i32::MIN.into(), 1 << 32)? as u32),
        PCREL32 => four(range(pcrel, i32::MIN.into(), 1 << 31)? as u32),
        BRANCH => four(btype(insn, pcrel)?),
        JAL => four(jtype(insn, pcrel)?),
        RVC_BRANCH => two(cbtype(old as u16, pcrel)?),
        RVC_JUMP => two(cjtype(old as u16, pcrel)?),
        CALL | CALL_PLT => {
            let hi = hi20(aligned(pcrel, 2)?)?;
            let jalr = itype((old >> 32) as u32, lo12(pcrel));
            Value::new(u64::from(utype(insn, hi)) | u64::from(jalr) << 32, 8)
        }
        PCREL_HI20 => four(utype(insn, hi20(pcrel)?)),
        PCREL_LO12_I => four(itype(insn, lo12(pcrel))),
        PCREL_LO12_S => four(stype(insn, lo12(pcrel))),
        HI20 => four(utype(insn, hi20(sa as i64)?)),
        LO12_I => four(itype(insn, lo12(sa as i64))),
        LO12_S => four(stype(insn, lo12(sa as i64))),
        ADD8 | ADD16 | ADD32 | ADD64 => Value::new(old.wrapping_add(sa), w),
        SUB8 | SUB16 | SUB32 | SUB64 => Value::new(old.wrapping_sub(sa), w),
        SUB6 => Value::new((old & 0xc0) | (old.wrapping_sub(sa) & 0x3f), 1),
        SET6 => Value::new((old & 0xc0) | (sa & 0x3f), 1),
        SET8 | SET16 | SET32 => Value::new(sa, w),
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

/// The name of relocation type `r_type` (`R_RISCV_*`), for the types the loader applies
/// and the common ones it refuses (GOT, TLS, GP-relative, dynamic).
pub fn name(r_type: u32) -> &'static str {
    match r_type {
        0 => "R_RISCV_NONE",
        1 => "R_RISCV_32",
        2 => "R_RISCV_64",
        3 => "R_RISCV_RELATIVE",
        4 => "R_RISCV_COPY",
        5 => "R_RISCV_JUMP_SLOT",
        6..=11 => "R_RISCV_TLS*",
        12 => "R_RISCV_TLSDESC",
        16 => "R_RISCV_BRANCH",
        17 => "R_RISCV_JAL",
        18 => "R_RISCV_CALL",
        19 => "R_RISCV_CALL_PLT",
        20 => "R_RISCV_GOT_HI20",
        21 => "R_RISCV_TLS_GOT_HI20",
        22 => "R_RISCV_TLS_GD_HI20",
        23 => "R_RISCV_PCREL_HI20",
        24 => "R_RISCV_PCREL_LO12_I",
        25 => "R_RISCV_PCREL_LO12_S",
        26 => "R_RISCV_HI20",
        27 => "R_RISCV_LO12_I",
        28 => "R_RISCV_LO12_S",
        29 => "R_RISCV_TPREL_HI20",
        30 => "R_RISCV_TPREL_LO12_I",
        31 => "R_RISCV_TPREL_LO12_S",
        32 => "R_RISCV_TPREL_ADD",
        33 => "R_RISCV_ADD8",
        34 => "R_RISCV_ADD16",
        35 => "R_RISCV_ADD32",
        36 => "R_RISCV_ADD64",
        37 => "R_RISCV_SUB8",
        38 => "R_RISCV_SUB16",
        39 => "R_RISCV_SUB32",
        40 => "R_RISCV_SUB64",
        41 => "R_RISCV_GOT32_PCREL",
        43 => "R_RISCV_ALIGN",
        44 => "R_RISCV_RVC_BRANCH",
        45 => "R_RISCV_RVC_JUMP",
        46 => "R_RISCV_RVC_LUI",
        47 => "R_RISCV_GPREL_I",
        48 => "R_RISCV_GPREL_S",
        49 => "R_RISCV_TPREL_I",
        50 => "R_RISCV_TPREL_S",
        51 => "R_RISCV_RELAX",
        52 => "R_RISCV_SUB6",
        53 => "R_RISCV_SET6",
        54 => "R_RISCV_SET8",
        55 => "R_RISCV_SET16",
        56 => "R_RISCV_SET32",
        57 => "R_RISCV_32_PCREL",
        58 => "R_RISCV_IRELATIVE",
        59 => "R_RISCV_PLT32",
        60 => "R_RISCV_SET_ULEB128",
        61 => "R_RISCV_SUB_ULEB128",
        62..=65 => "R_RISCV_TLSDESC*",
        _ => "R_RISCV_?",
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

    fn half(r_type: u32, h: u16, s: u64, p: u64) -> Result<u16, RelocError> {
        let mut b = h.to_le_bytes();
        apply(r_type, &mut b, s, 0, p)?;
        Ok(u16::from_le_bytes(b))
    }

    // Expected words from GNU as 2.40 (`riscv64-linux-gnu-as -march=rv64gc`,
    // `.option norelax`), each branch at its own place.
    #[test]
    fn branches_encode_as_the_assembler_does_and_check_reach() {
        const BEQ: u32 = 0x00b5_0063; // beq a0, a1, .
        assert_eq!(insn(BRANCH, BEQ, 0x1ffe, 0, 0x1000), Ok(0x7eb5_0fe3));
        assert_eq!(
            insn(BRANCH, BEQ, 0x1004 - 0x1000, 0, 0x1004),
            Ok(0x80b5_0063)
        );
        assert!(insn(BRANCH, BEQ, 0x2000, 0, 0x1000).is_err());
        assert_eq!(
            insn(BRANCH, BEQ, 0x1001, 0, 0x1000),
            Err(RelocError::Misaligned { value: 1, align: 2 })
        );
        assert_eq!(insn(JAL, 0x0000_00ef, 0x10_0006, 0, 8), Ok(0x7fff_f0ef));
        assert_eq!(insn(JAL, 0x0000_006f, 0, -0x10_0000, 0), Ok(0x8000_006f));
        assert_eq!(
            insn(JAL, 0x6f, 0x10_0000, 0, 0),
            Err(RelocError::Overflow {
                value: 0x10_0000,
                min: -0x10_0000,
                max: 0x10_0000
            })
        );
        assert_eq!(half(RVC_BRANCH, 0xc101, 0x10e, 0x10), Ok(0xcd7d));
        assert_eq!(half(RVC_BRANCH, 0xe381, 0x1012 - 0x100, 0x1012), Ok(0xf381));
        assert!(half(RVC_BRANCH, 0xc101, 0x100, 0).is_err());
        assert_eq!(half(RVC_JUMP, 0xa001, 0x812, 0x14), Ok(0xaffd));
        assert_eq!(half(RVC_JUMP, 0xa001, 0x1016 - 0x800, 0x1016), Ok(0xb001));
        assert!(half(RVC_JUMP, 0xa001, 0x800, 0).is_err());
    }

    #[test]
    fn calls_and_pcrel_pairs() {
        // auipc ra, 0x12345; jalr ra, -292(ra) at 0x18 reaches 0x18 + 0x12344edc.
        let pair = |hi: u32, lo: u32| u64::from(hi) | u64::from(lo) << 32;
        let mut b = pair(0x0000_0097, 0x0000_80e7).to_le_bytes();
        apply(CALL_PLT, &mut b, 0x1234_4ef4, 0, 0x18).unwrap();
        assert_eq!(u64::from_le_bytes(b), pair(0x1234_5097, 0xedc0_80e7));
        assert_eq!(
            compute(CALL, 0x1234_4ef5, 0, 0x18, &b),
            Err(RelocError::Misaligned {
                value: 0x1234_4edd,
                align: 2
            })
        );
        let far = (1i64 << 31) - 0x800;
        assert!(compute(CALL, (far - 2) as u64, 0, 0, &b).is_ok());
        assert_eq!(
            compute(CALL, far as u64, 0, 0, &b),
            Err(RelocError::Overflow {
                value: far,
                min: -(1 << 31) - 0x800,
                max: far
            })
        );
        assert!(compute(CALL, 0, -(1 << 31) - 0x800, 0, &b).is_ok());
        assert!(compute(CALL, 0, -(1 << 31) - 0x802, 0, &b).is_err());
        assert_eq!(compute(CALL, 0, 0, 0, &b[..7]), Err(RelocError::Short));
        // The LO12 of the pair: sd a0, -291(a1) and sw a5, 2047(sp).
        assert_eq!(
            insn(PCREL_LO12_S, 0x00a5_b023, 0x1000 - 291, 0, 0x1000),
            Ok(0xeca5_bea3)
        );
        assert_eq!(insn(LO12_S, 0x00f1_2023, 0x7ff, 0, 0), Ok(0x7ef1_2fa3));
        // auipc a0, %pcrel_hi(x); addi a0, a0, %pcrel_lo(1b): the two add back to x.
        for x in [
            0x1234_5678i64,
            0x1234_5800,
            -0x7ff,
            0x7fff_f7ff,
            -(1 << 31) - 0x800,
        ] {
            let p = 0x8020_0000u64;
            let s = p.wrapping_add_signed(x);
            let hi = insn(PCREL_HI20, 0x0000_0517, s, 0, p).unwrap();
            let lo = insn(PCREL_LO12_I, 0x0005_0513, s, 0, p).unwrap();
            let back = i64::from((hi & 0xffff_f000) as i32) + i64::from((lo as i32) >> 20);
            assert_eq!(back, x, "{x:#x}");
        }
        // lui a0, %hi(x); ld a0, %lo(x)(a0).
        let hi = insn(HI20, 0x0000_0537, 0xffff_ffff_8000_0800, 0, 0).unwrap();
        let lo = insn(LO12_I, 0x0005_3503, 0xffff_ffff_8000_0800, 0, 0).unwrap();
        assert_eq!((hi, lo), (0x8000_1537, 0x8005_3503));
        assert!(insn(HI20, 0x537, 0x8000_0000, 0, 0).is_err());
        assert!(insn(HI20, 0x537, 0x7fff_f7ff, 0, 0).is_ok());
        assert!(is_pcrel_lo(PCREL_LO12_I) && is_pcrel_lo(PCREL_LO12_S) && !is_pcrel_lo(LO12_I));
    }

    #[test]
    fn data_differences_and_refusals() {
        let mut b = [0u8; 4];
        apply(PCREL32, &mut b, 0x2000, 4, 0x1000).unwrap();
        assert_eq!(b, 0x1004u32.to_le_bytes());
        assert!(apply(PCREL32, &mut b, 1 << 31, 0, 0).is_err());
        assert!(apply(PCREL32, &mut b, 0, -(1 << 31), 0).is_ok());
        assert!(apply(ABS32, &mut b, 0xffff_ffff, 0, 0).is_ok());
        assert!(apply(ABS32, &mut b, 1 << 32, 0, 0).is_err());
        assert_eq!(
            compute(ABS64, 1, -2, 0, &[0; 8]).unwrap().bytes(),
            &[0xff; 8]
        );
        // .word .L3 - .L4 (ADD32 then SUB32): the difference, whatever was there.
        let mut w = 7u32.to_le_bytes();
        apply(ADD32, &mut w, 0x8020_1234, 0, 0).unwrap();
        apply(SUB32, &mut w, 0x8020_1000, 0, 0).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0x234 + 7);
        // DW_CFA_advance_loc (0x40 | delta): SET6 then SUB6 keep the opcode bits.
        let mut c = [0x40u8];
        apply(SET6, &mut c, 0x1030, 0, 0).unwrap();
        apply(SUB6, &mut c, 0x1010, 0, 0).unwrap();
        assert_eq!(c, [0x40 | 0x20]);
        let mut c = [0u8; 2];
        apply(SET16, &mut c, 0x1_2345, 0, 0).unwrap();
        apply(SUB16, &mut c, 0x1_2300, 0, 0).unwrap();
        assert_eq!(c, 0x45u16.to_le_bytes());
        let mut q = [1u8; 8];
        apply(ADD64, &mut q, 2, 0, 0).unwrap();
        apply(SUB64, &mut q, 3, 0, 0).unwrap();
        assert_eq!(q, (0x0101_0101_0101_0101u64 - 1).to_le_bytes());
        assert_eq!(difference_half(ADD16), Some((true, 16)));
        assert_eq!(difference_half(SET6), Some((true, 6)));
        assert_eq!(difference_half(SUB8), Some((false, 8)));
        assert_eq!(difference_half(ABS64), None);
        assert!(check_difference(8, 255).is_ok() && check_difference(8, -128).is_ok());
        assert!(check_difference(8, 256).is_err() && check_difference(8, -129).is_err());
        assert!(check_difference(6, 63).is_ok() && check_difference(6, 64).is_err());
        assert!(check_difference(64, i64::MIN).is_ok());
        // Refused: GOT_HI20, TLS, SET_ULEB128.
        for t in [20, 29, 60] {
            assert_eq!(compute(t, 0, 0, 0, &b), Err(RelocError::Unsupported));
            assert_eq!(width(t), None);
        }
        assert_eq!(name(20), "R_RISCV_GOT_HI20");
        assert_eq!(name(TABLE_FIELD), "R_RISCV_32_PCREL");
        assert_eq!(name(ABS64), "R_RISCV_64");
        assert_eq!(name(PCREL_HI20), "R_RISCV_PCREL_HI20");
        assert_eq!(
            (width(RELAX), width(ALIGN), width(NONE)),
            (Some(0), Some(0), Some(0))
        );
    }

    #[test]
    fn align_padding_is_checked_nops() {
        assert_eq!(align_padding(ALIGN, 2), Some(Ok((2, 4))));
        assert_eq!(align_padding(ALIGN, 6), Some(Ok((6, 8))));
        assert_eq!(align_padding(ALIGN, 4), Some(Ok((4, 8))));
        assert_eq!(align_padding(ALIGN, 12), Some(Ok((12, 16))));
        for bad in [0, -2, 3, 8, 4096] {
            assert_eq!(
                align_padding(ALIGN, bad),
                Some(Err(RelocError::Unsupported)),
                "{bad}"
            );
        }
        assert_eq!(align_padding(RELAX, 2), None);
        assert_eq!(padding_insn(&[0x01, 0x00, 0xff, 0xff]), 2);
        assert_eq!(padding_insn(&[0x13, 0x00, 0x00, 0x00]), 4);
        assert_eq!(padding_insn(&[0x13, 0x00]), 0);
        assert_eq!(padding_insn(&[0x13, 0x01, 0x00, 0x00]), 0);
        assert_eq!(padding_insn(&[0x01]), 0);
    }

    #[test]
    fn veneer_round_trips_and_is_a_far_jump() {
        let v = veneer(0xdead_beef_0000_1234);
        assert_eq!(veneer_target(&v), Some(0xdead_beef_0000_1234));
        assert_eq!(veneer_target(&[0; VENEER_LEN]), None);
        // auipc t1, 0 / ld t1, 16(t1) / jalr x0, 0(t1): rd, rs1 and immediates.
        let w = |i: usize| u32::from_le_bytes(v[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!((w(0) & 0x7f, (w(0) >> 7) & 31, w(0) >> 12), (0x17, 6, 0));
        assert_eq!(
            (w(1) & 0x7f, (w(1) >> 12) & 7, (w(1) >> 15) & 31, w(1) >> 20),
            (0x03, 3, 6, 16)
        );
        assert_eq!(
            (w(2) & 0x7f, (w(2) >> 7) & 31, (w(2) >> 15) & 31, w(2) >> 20),
            (0x67, 0, 6, 0)
        );
        assert!(needs_veneer(CALL) && needs_veneer(CALL_PLT) && needs_veneer(JAL));
        assert!(!needs_veneer(BRANCH) && !needs_veneer(RVC_JUMP));
    }
}
