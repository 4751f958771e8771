//! riscv64 branch encodings: ifunc call sites in the three forms a linked RV64GC kernel
//! holds them in (an `auipc`+`jalr` pair, a relaxed `jal`, a relaxed `c.j`), the ifunc
//! trampoline (`auipc t1` / `ld t1` / `jr t1` through the slot), and the instruction
//! fields ksites reads and writes.
//!
//! Instructions are 4 bytes, or 2 bytes for the compressed (C) ones, little-endian; with
//! C, a 4-byte instruction needs only 2-byte alignment. Offsets are from the
//! instruction itself.
//!
//! # Site forms
//!
//! The table's per-site `prefixes` field (3 bits) holds the site's *form* on riscv64
//! ([`FORM_PAIR`], [`FORM_JAL`], [`FORM_C_J`]); the address is the first byte of the
//! site:
//!
//! | form | kind `Call` | kind `Jmp` (tail call) | length | reach |
//! |---|---|---|---|---|
//! | [`FORM_PAIR`] = 0 | `auipc ra, hi20; jalr ra, lo12(ra)` | `auipc t1, hi20; jalr x0, lo12(t1)` | 8 | ±2 GiB |
//! | [`FORM_JAL`] = 1 | `jal ra, off` | `jal x0, off` | 4 | ±1 MiB |
//! | [`FORM_C_J`] = 2 | — (RV64 has no `c.jal`) | `c.j off` | 2 | ±2 KiB |
//!
//! The pair is what `call`/`tail` assemble to (GNU as and LLVM; `tail` uses `t1` = x6,
//! free at a call boundary); `jal` and `c.j` are what linker relaxation turns a pair
//! into when the target is near. A pair through another scratch register, a
//! conditional branch (`beq`…, `c.beqz`…) and `jalr` through a register loaded some
//! other way are not sites: the build tool leaves them on the trampoline (where they
//! keep working) and the table never holds one ([`supports_site`] refuses them, and
//! [`SiteKind::Jcc`]).
//!
//! Patching rewrites the **whole site** (both words of a pair: the *target field* is
//! offsets `0..len`): the offset is split between the two instructions, so one cannot
//! be changed without the other. That is only done where no other hart runs the site
//! (boot, module load; `patch::patch_ifuncs` precondition 2), so the 8 bytes need not
//! be one store.
//!
//! # Relaxation rule
//!
//! A site keeps its form: the loader never turns a `jal` or `c.j` back into a pair (the
//! bytes after it are other code). So a relaxed site can only be pointed at an
//! implementation within its own reach (±1 MiB for `jal`, ±2 KiB for `c.j`). When the
//! chosen implementation is farther, the site **stays a branch to the trampoline**,
//! which reaches its slot anywhere (`auipc`+`ld`, ±2 GiB) and so still calls the chosen
//! implementation, just not directly; `patch::InitReport::sites_out_of_reach` counts it,
//! and `InitReport::relaxed_sites_on_trampoline` counts the relaxed ones among them. It
//! is never an error and never misread: every site's bytes are checked against the
//! exact form the table names ([`is_original`]) before it is written, and a site whose
//! bytes are another form (say a `jal` where the table says pair) is refused with the
//! whole batch (every site written before it is put back). A kernel that wants every site direct links with relaxation off (`-mno-relax`
//! / `--no-relax`), so every site is a pair.

use core::ops::Range;

use crate::arch::{BranchSite, InsnBytes, SiteKind, TargetField};

/// Length of an uncompressed instruction.
pub const INSN_LEN: usize = 4;
/// Length of a compressed instruction.
pub const C_INSN_LEN: usize = 2;

/// Site form: `auipc`+`jalr` pair, 8 bytes (the `prefixes` value of the table entry).
pub const FORM_PAIR: u8 = 0;
/// Site form: `jal`, 4 bytes.
pub const FORM_JAL: u8 = 1;
/// Site form: `c.j`, 2 bytes (tail calls only).
pub const FORM_C_J: u8 = 2;

/// Register x0 (`zero`).
pub const ZERO: u32 = 0;
/// Register x1 (`ra`): the link register of a call.
pub const RA: u32 = 1;
/// Register x6 (`t1`): the scratch register of `tail` and of the trampoline.
pub const T1: u32 = 6;
/// Register x10 (`a0`).
pub const A0: u32 = 10;

/// Major opcode of `auipc`.
pub const OP_AUIPC: u32 = 0x17;
/// Major opcode of `jal`.
pub const OP_JAL: u32 = 0x6f;
/// Major opcode of `jalr` (funct3 0).
pub const OP_JALR: u32 = 0x67;
/// Major opcode of loads (`ld` is funct3 3).
pub const OP_LOAD: u32 = 0x03;
/// `nop` (`addi x0, x0, 0`).
pub const NOP: u32 = 0x0000_0013;
/// `c.nop`.
pub const C_NOP: u16 = 0x0001;
/// `ret` (`jalr x0, 0(ra)`).
pub const RET: u32 = 0x0000_8067;
/// `ebreak` (the 4-byte one).
pub const EBREAK: u32 = 0x0010_0073;
/// `c.j` with a zero offset; the offset bits are `0x1ffc`.
pub const C_J: u16 = 0xa001;
/// The bits of `c.j` that are not the offset.
pub const C_J_MASK: u16 = 0xe003;

/// Length of a trampoline: `auipc`, `ld`, `jr`.
pub const TRAMPOLINE_LEN: usize = 12;
/// Longest site: a pair.
pub const MAX_SITE_LEN: usize = 8;
/// Length of every probe site: one 4-byte, 4-aligned instruction.
pub const PROBE_SITE_LEN: usize = INSN_LEN;

/// Farthest forward a pair reaches (even): 2 GiB − 2 KiB − 2.
pub const PAIR_MAX_FORWARD: i64 = (1 << 31) - 0x800 - 2;
/// Farthest backward a pair reaches: −2 GiB − 2 KiB.
pub const PAIR_MAX_BACKWARD: i64 = -(1 << 31) - 0x800;
/// Farthest forward a `jal` reaches: 1 MiB − 2.
pub const JAL_MAX_FORWARD: i64 = (1 << 20) - 2;
/// Farthest backward a `jal` reaches: −1 MiB.
pub const JAL_MAX_BACKWARD: i64 = -(1 << 20);
/// Farthest forward a `c.j` reaches: 2 KiB − 2.
pub const C_J_MAX_FORWARD: i64 = (1 << 11) - 2;
/// Farthest backward a `c.j` reaches: −2 KiB.
pub const C_J_MAX_BACKWARD: i64 = -(1 << 11);

/// `auipc rd, imm20` (`imm20` is the raw 20-bit field).
pub const fn auipc(rd: u32, imm20: u32) -> u32 {
    OP_AUIPC | (rd & 31) << 7 | (imm20 & 0xf_ffff) << 12
}

/// `jalr rd, imm12(rs1)`.
pub const fn jalr(rd: u32, rs1: u32, imm12: i32) -> u32 {
    OP_JALR | (rd & 31) << 7 | (rs1 & 31) << 15 | ((imm12 as u32) & 0xfff) << 20
}

/// `ld rd, imm12(rs1)`.
pub const fn ld(rd: u32, rs1: u32, imm12: i32) -> u32 {
    OP_LOAD | 3 << 12 | (rd & 31) << 7 | (rs1 & 31) << 15 | ((imm12 as u32) & 0xfff) << 20
}

/// `addi rd, x0, imm12` (`li rd, imm` for a 12-bit `imm`).
pub const fn li(rd: u32, imm12: i32) -> u32 {
    0x13 | (rd & 31) << 7 | ((imm12 as u32) & 0xfff) << 20
}

/// The signed offset from `pc` to `target`, if it fits an `i64` and is even (every
/// instruction is 2-aligned).
#[inline(always)]
fn offset(pc: u64, target: u64) -> Option<i64> {
    let off = i64::try_from(target as i128 - pc as i128).ok()?;
    (off & 1 == 0).then_some(off)
}

/// Splits `off` into the `auipc` hi20 field and the `jalr`/`ld` lo12 immediate
/// (`hi20 = (off + 0x800) >> 12`, so the sign-extended lo12 corrects it); `None` beyond
/// ±2 GiB ([`PAIR_MAX_BACKWARD`] ..= 2 GiB − 2 KiB − 1).
#[inline(always)]
pub const fn hi_lo(off: i64) -> Option<(u32, i32)> {
    if off < PAIR_MAX_BACKWARD || off > PAIR_MAX_FORWARD + 1 {
        return None;
    }
    let hi = (off + 0x800) >> 12;
    let lo = off - (hi << 12);
    Some(((hi as u32) & 0xf_ffff, lo as i32))
}

/// The offset `auipc` (`insn`) contributes: its sign-extended `imm20 << 12`.
#[inline(always)]
pub const fn auipc_offset(insn: u32) -> i64 {
    ((insn & 0xffff_f000) as i32) as i64
}

/// The sign-extended I-type immediate of `insn` (`jalr`, `ld`, `addi`).
#[inline(always)]
pub const fn i_imm(insn: u32) -> i64 {
    ((insn as i32) >> 20) as i64
}

/// `rd` of `insn`.
#[inline(always)]
pub const fn rd(insn: u32) -> u32 {
    (insn >> 7) & 31
}

/// `rs1` of `insn`.
#[inline(always)]
pub const fn rs1(insn: u32) -> u32 {
    (insn >> 15) & 31
}

/// The `jal rd` at `pc` that reaches `target`: `None` out of ±1 MiB or odd.
#[inline(always)]
pub fn jal_to(rd: u32, pc: u64, target: u64) -> Option<u32> {
    jal(rd, offset(pc, target)?)
}

/// `jal rd, off`: `None` if `off` is odd or beyond ±1 MiB.
#[inline(always)]
pub const fn jal(rd: u32, off: i64) -> Option<u32> {
    if off & 1 != 0 || off < JAL_MAX_BACKWARD || off > JAL_MAX_FORWARD {
        return None;
    }
    Some(jal_wrapping(rd, off))
}

/// `jal rd, off` with `off` taken modulo 2 MiB (not range-checked).
#[inline(always)]
pub const fn jal_wrapping(rd: u32, off: i64) -> u32 {
    let i = off as u32;
    let imm = (i & 0x10_0000) << 11 | (i & 0x7fe) << 20 | (i & 0x800) << 9 | (i & 0xf_f000);
    OP_JAL | (rd & 31) << 7 | imm
}

/// The offset of the `jal` `insn` (`None` if it is not a `jal`).
#[inline(always)]
pub const fn jal_offset(insn: u32) -> Option<i64> {
    if insn & 0x7f != OP_JAL {
        return None;
    }
    let imm = (insn >> 31) << 20
        | ((insn >> 21) & 0x3ff) << 1
        | ((insn >> 20) & 1) << 11
        | ((insn >> 12) & 0xff) << 12;
    // Sign-extend the 21-bit offset.
    Some((((imm << 11) as i32) >> 11) as i64)
}

/// `c.j off`: `None` if `off` is odd or beyond ±2 KiB.
#[inline(always)]
pub const fn c_j(off: i64) -> Option<u16> {
    if off & 1 != 0 || off < C_J_MAX_BACKWARD || off > C_J_MAX_FORWARD {
        return None;
    }
    let i = off as u32;
    // inst[12|11|10:9|8|7|6|5:3|2] = imm[11|4|9:8|10|6|7|3:1|5].
    let f = ((i >> 11) & 1) << 12
        | ((i >> 4) & 1) << 11
        | ((i >> 8) & 3) << 9
        | ((i >> 10) & 1) << 8
        | ((i >> 6) & 1) << 7
        | ((i >> 7) & 1) << 6
        | ((i >> 1) & 7) << 3
        | ((i >> 5) & 1) << 2;
    Some(C_J | f as u16)
}

/// The offset of the `c.j` `h` (`None` if it is not a `c.j`).
#[inline(always)]
pub const fn c_j_offset(h: u16) -> Option<i64> {
    if h & C_J_MASK != C_J {
        return None;
    }
    let h = h as u32;
    let imm = ((h >> 12) & 1) << 11
        | ((h >> 11) & 1) << 4
        | ((h >> 9) & 3) << 8
        | ((h >> 8) & 1) << 10
        | ((h >> 7) & 1) << 6
        | ((h >> 6) & 1) << 7
        | ((h >> 3) & 7) << 1
        | ((h >> 2) & 1) << 5;
    Some((((imm << 20) as i32) >> 20) as i64)
}

/// The registers of a pair site of `kind`: (the `auipc`'s and `jalr`'s `rs1`, the
/// `jalr`'s `rd`); `None` for a conditional branch.
const fn pair_regs(kind: SiteKind) -> Option<(u32, u32)> {
    match kind {
        SiteKind::Call => Some((RA, RA)),
        SiteKind::Jmp => Some((T1, ZERO)),
        SiteKind::Jcc => None,
    }
}

/// The link register a `jal` site of `kind` writes.
const fn link_reg(kind: SiteKind) -> Option<u32> {
    match kind {
        SiteKind::Call => Some(RA),
        SiteKind::Jmp => Some(ZERO),
        SiteKind::Jcc => None,
    }
}

/// The pair `auipc rx, hi20; jalr rd, lo12(rx)` at `pc` reaching `target`, as one
/// little-endian word (the `auipc` in the low half); `None` out of ±2 GiB or odd.
#[inline(always)]
pub fn pair_to(rx: u32, rd: u32, pc: u64, target: u64) -> Option<u64> {
    let (hi, lo) = hi_lo(offset(pc, target)?)?;
    Some(u64::from(auipc(rx, hi)) | u64::from(jalr(rd, rx, lo)) << 32)
}

/// Where the pair `auipc rx, …; jalr rd, …(rx)` (`lo` = the `auipc`, `hi` = the `jalr`)
/// at `pc` goes, with (`rx`, `rd`); `None` if the words are not such a pair.
#[inline(always)]
pub fn pair_dest(auipc_insn: u32, jalr_insn: u32, pc: u64) -> Option<(u64, u32, u32)> {
    let rx = rd(auipc_insn);
    if auipc_insn & 0x7f != OP_AUIPC
        || jalr_insn & 0x707f != OP_JALR
        || rs1(jalr_insn) != rx
        || rx == ZERO
    {
        return None;
    }
    let off = auipc_offset(auipc_insn) + i_imm(jalr_insn);
    Some((pc.checked_add_signed(off)? & !1, rx, rd(jalr_insn)))
}

/// Length of a site of `kind` in form `prefixes` ([`FORM_PAIR`] 8, [`FORM_JAL`] 4,
/// [`FORM_C_J`] 2); an unknown form is longer than [`MAX_SITE_LEN`], so the reader
/// refuses it.
#[inline(always)]
pub const fn site_len(_kind: SiteKind, prefixes: u8) -> usize {
    match prefixes {
        FORM_PAIR => 8,
        FORM_JAL => INSN_LEN,
        FORM_C_J => C_INSN_LEN,
        _ => MAX_SITE_LEN + INSN_LEN,
    }
}

/// The bytes patching rewrites: the whole site (the offset is spread over both words of
/// a pair, and shares the word with the opcode in `jal`/`c.j`).
#[inline(always)]
pub const fn target_field(kind: SiteKind, prefixes: u8) -> Range<usize> {
    0..site_len(kind, prefixes)
}

/// Whether the patcher handles a site of `kind` in form `prefixes` at `addr`: a call
/// or tail call in one of the three forms (`c.j` only for a tail call), 2-aligned.
pub const fn supports_site(kind: SiteKind, prefixes: u8, addr: u64) -> bool {
    let form_ok = match kind {
        SiteKind::Call => matches!(prefixes, FORM_PAIR | FORM_JAL),
        SiteKind::Jmp => matches!(prefixes, FORM_PAIR | FORM_JAL | FORM_C_J),
        SiteKind::Jcc => false,
    };
    form_ok && addr.is_multiple_of(C_INSN_LEN as u64)
}

/// The bytes `site` holds when it branches to `target`, in its own form. `None` if
/// `target` is out of that form's reach (or the site is one the patcher does not
/// handle).
#[inline(always)]
pub fn encode_branch(site: &BranchSite, _current: &InsnBytes, target: u64) -> Option<InsnBytes> {
    let f = encode_target(site, target)?;
    Some(InsnBytes::from_word(f.value, f.len as usize))
}

/// The whole site branching to `target`; `None` if out of its form's reach.
#[inline(always)]
pub fn encode_target(site: &BranchSite, target: u64) -> Option<TargetField> {
    if !supports_site(site.kind, site.prefixes, site.addr)
        || site.len as usize != site_len(site.kind, site.prefixes)
    {
        return None;
    }
    let value = match site.prefixes {
        FORM_PAIR => {
            let (rx, rd) = pair_regs(site.kind)?;
            pair_to(rx, rd, site.addr, target)?
        }
        FORM_JAL => u64::from(jal_to(link_reg(site.kind)?, site.addr, target)?),
        _ => u64::from(c_j(offset(site.addr, target)?)?),
    };
    Some(TargetField {
        value,
        len: site.len,
    })
}

/// The `i`th 4-byte word of `bytes`, if there is one.
#[inline(always)]
pub fn insn_at(bytes: &[u8], i: usize) -> Option<u32> {
    let b = bytes.get(i * INSN_LEN..(i + 1) * INSN_LEN)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

/// The first two bytes of `bytes` as a halfword.
#[inline(always)]
fn half_at(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// Where the site's bytes go if they are its form and kind (whatever the target).
fn decode(site: &BranchSite, bytes: &[u8]) -> Option<u64> {
    if !supports_site(site.kind, site.prefixes, site.addr) {
        return None;
    }
    match site.prefixes {
        FORM_PAIR => {
            let (dest, rx, rd) = pair_dest(insn_at(bytes, 0)?, insn_at(bytes, 1)?, site.addr)?;
            (Some((rx, rd)) == pair_regs(site.kind)).then_some(dest)
        }
        FORM_JAL => {
            let insn = insn_at(bytes, 0)?;
            if Some(rd(insn)) != link_reg(site.kind) {
                return None;
            }
            site.addr.checked_add_signed(jal_offset(insn)?)
        }
        _ => site.addr.checked_add_signed(c_j_offset(half_at(bytes)?)?),
    }
}

/// Whether `bytes` hold a branch of the site's form and kind (whatever its target).
pub fn has_branch_opcode(site: &BranchSite, bytes: &[u8]) -> bool {
    decode(site, bytes).is_some()
}

/// Where the branch `bytes` at `site` go, if they are a branch of its form and kind.
pub fn decode_branch_target(site: &BranchSite, bytes: &[u8]) -> Option<u64> {
    decode(site, bytes)
}

/// Whether the site's bytes `v` (little-endian, the site's length) are exactly the
/// unpatched site: its form and kind branching to `trampoline`.
#[inline(always)]
pub fn is_original(site: &BranchSite, v: u64, trampoline: u64) -> bool {
    let mask = match site.len {
        8 => u64::MAX,
        n => (1u64 << (8 * n)) - 1,
    };
    encode_target(site, trampoline).is_some_and(|f| f.value == v & mask)
}

/// The bytes an unpatched site must hold (its form branching to `trampoline`), for
/// error messages; `None` if the trampoline is out of the form's reach.
pub fn expected_original(
    site: &BranchSite,
    found: &InsnBytes,
    trampoline: u64,
) -> Option<InsnBytes> {
    encode_branch(site, found, trampoline)
}

/// A call or tail call found in code, decoded ([`decode_site`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedSite {
    /// Call or tail call.
    pub kind: SiteKind,
    /// [`FORM_PAIR`], [`FORM_JAL`] or [`FORM_C_J`]: the table's `prefixes` value.
    pub form: u8,
    /// Where it goes.
    pub target: u64,
    /// Its length in bytes.
    pub len: u8,
}

/// The site `bytes` at `addr` hold, if they begin with one of the forms the patcher
/// handles: a pair (`auipc ra`+`jalr ra, (ra)` or `auipc t1`+`jalr x0, (t1)`), a `jal
/// ra`/`jal x0`, or a `c.j`. For the build tool's scan; what it records must satisfy
/// [`is_original`] for its trampoline.
pub fn decode_site(bytes: &[u8], addr: u64) -> Option<DecodedSite> {
    for (kind, form) in [
        (SiteKind::Call, FORM_PAIR),
        (SiteKind::Jmp, FORM_PAIR),
        (SiteKind::Call, FORM_JAL),
        (SiteKind::Jmp, FORM_JAL),
        (SiteKind::Jmp, FORM_C_J),
    ] {
        let len = site_len(kind, form) as u8;
        let s = BranchSite {
            addr,
            kind,
            prefixes: form,
            len,
        };
        if let Some(target) = decode(&s, bytes) {
            return Some(DecodedSite {
                kind,
                form,
                target,
                len,
            });
        }
    }
    None
}

/// The trampoline `auipc t1, %pcrel_hi(slot); ld t1, %pcrel_lo(slot)(t1); jr t1` at
/// `addr` for `slot`: `None` if the slot is not 8-aligned or beyond ±2 GiB.
pub fn trampoline(addr: u64, slot: u64) -> Option<[u32; 3]> {
    if !slot.is_multiple_of(8) {
        return None;
    }
    let off = i64::try_from(slot as i128 - addr as i128).ok()?;
    let (hi, lo) = hi_lo(off)?;
    Some([auipc(T1, hi), ld(T1, T1, lo), jalr(ZERO, T1, 0)])
}

/// The slot the trampoline `bytes` (read at `addr`) jump through; `None` if they are not
/// [`trampoline`]'s three instructions, or the slot would be null or misaligned.
pub fn trampoline_slot(bytes: &[u8], addr: u64) -> Option<u64> {
    let (a, l, j) = (insn_at(bytes, 0)?, insn_at(bytes, 1)?, insn_at(bytes, 2)?);
    if a & 0xfff != auipc(T1, 0) || l & 0xfffff != ld(T1, T1, 0) || j != jalr(ZERO, T1, 0) {
        return None;
    }
    let slot = addr.checked_add_signed(auipc_offset(a) + i_imm(l))?;
    (slot != 0 && slot.is_multiple_of(8)).then_some(slot)
}

/// The instructions of an ifunc trampoline (for [`crate::ifunc!`]'s `naked_asm!`): an
/// indirect jump through the 8-byte slot at the local label `2` that follows, with the
/// exact bytes [`trampoline_slot`] reads (`.option norvc` keeps the three 4-byte forms,
/// `.option norelax` keeps the linker from rewriting the `auipc`/`ld` pair). `t1` is
/// free at a call boundary (the psABI's `tail` uses it too). Every architecture defines
/// this macro under the same name.
#[cfg(target_arch = "riscv64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_arch_trampoline {
    () => {
        ".option push\n.option norvc\n.option norelax\n1: auipc t1, %pcrel_hi(2f)\nld t1, %pcrel_lo(1b)(t1)\njr t1\n.option pop"
    };
}

/// `.pushsection <name>,"<flags>",<type>` with this assembler's spelling of the
/// `progbits` section type (`@progbits`). Every architecture defines this macro under
/// the same name.
#[cfg(target_arch = "riscv64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_arch_pushsection {
    ($name:literal, $flags:literal) => {
        concat!(".pushsection ", $name, ",\"", $flags, "\",@progbits")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(kind: SiteKind, form: u8, addr: u64) -> BranchSite {
        BranchSite {
            addr,
            kind,
            prefixes: form,
            len: site_len(kind, form) as u8,
        }
    }

    #[test]
    fn hi_lo_rounds_and_reaches_2_gib() {
        assert_eq!(hi_lo(0), Some((0, 0)));
        assert_eq!(hi_lo(0x7ff), Some((0, 0x7ff)));
        assert_eq!(hi_lo(0x800), Some((1, -0x800)));
        assert_eq!(hi_lo(-0x800), Some((0, -0x800)));
        assert_eq!(hi_lo(-0x801), Some((0xf_ffff, 0x7ff)));
        assert!(hi_lo(PAIR_MAX_FORWARD + 1).is_some());
        assert!(hi_lo(PAIR_MAX_FORWARD + 2).is_none());
        assert!(hi_lo(PAIR_MAX_BACKWARD).is_some());
        assert!(hi_lo(PAIR_MAX_BACKWARD - 1).is_none());
        for off in [
            PAIR_MAX_BACKWARD,
            -0x1234_5678,
            -2,
            0x7fe,
            0x801,
            0x7654_3210,
            PAIR_MAX_FORWARD,
        ] {
            let (hi, lo) = hi_lo(off).unwrap();
            assert_eq!(auipc_offset(auipc(T1, hi)) + lo as i64, off, "{off:#x}");
        }
    }

    #[test]
    fn every_form_round_trips_and_refuses_past_its_reach() {
        let pc = 0x0000_4000_8020_0000u64;
        let cases: [(SiteKind, u8, i64, i64); 5] = [
            (
                SiteKind::Call,
                FORM_PAIR,
                PAIR_MAX_BACKWARD,
                PAIR_MAX_FORWARD,
            ),
            (
                SiteKind::Jmp,
                FORM_PAIR,
                PAIR_MAX_BACKWARD,
                PAIR_MAX_FORWARD,
            ),
            (SiteKind::Call, FORM_JAL, JAL_MAX_BACKWARD, JAL_MAX_FORWARD),
            (SiteKind::Jmp, FORM_JAL, JAL_MAX_BACKWARD, JAL_MAX_FORWARD),
            (SiteKind::Jmp, FORM_C_J, C_J_MAX_BACKWARD, C_J_MAX_FORWARD),
        ];
        for (kind, form, back, fwd) in cases {
            let s = site(kind, form, pc);
            let step = ((fwd - back) / 5000) & !1;
            let offs = (back..back + 64)
                .chain(-64..64)
                .chain(fwd - 64..=fwd)
                .chain((back..=fwd).step_by(step.max(2) as usize));
            for off in offs.filter(|o| o % 2 == 0) {
                let t = pc.checked_add_signed(off).unwrap();
                let f = encode_target(&s, t).unwrap_or_else(|| panic!("{kind:?} {form} {off:#x}"));
                assert_eq!(f.len as usize, site_len(kind, form));
                let b = f.value.to_le_bytes();
                assert_eq!(decode_branch_target(&s, &b[..f.len as usize]), Some(t));
                assert!(is_original(&s, f.value, t));
                assert!(!is_original(&s, f.value, t + 2));
                let d = decode_site(&b[..f.len as usize], pc).unwrap();
                assert_eq!((d.kind, d.form, d.target), (kind, form, t));
            }
            for off in [back - 2, fwd + 2, fwd + 1] {
                let t = pc.checked_add_signed(off).unwrap();
                assert!(encode_target(&s, t).is_none(), "{kind:?} {form} {off:#x}");
            }
        }
    }

    #[test]
    fn unsupported_sites_are_refused() {
        assert!(!supports_site(SiteKind::Call, FORM_C_J, 0x1000));
        assert!(!supports_site(SiteKind::Jcc, FORM_PAIR, 0x1000));
        assert!(!supports_site(SiteKind::Call, FORM_PAIR, 0x1001));
        assert!(!supports_site(SiteKind::Jmp, 3, 0x1000));
        assert!(supports_site(SiteKind::Call, FORM_JAL, 0x1002));
        assert!(site_len(SiteKind::Call, 3) > MAX_SITE_LEN);
        assert_eq!(target_field(SiteKind::Call, FORM_PAIR), 0..8);
        assert_eq!(target_field(SiteKind::Jmp, FORM_C_J), 0..2);
        // A call pair is not a tail pair, nor a jal.
        let call = site(SiteKind::Call, FORM_PAIR, 0x1000);
        let tail = site(SiteKind::Jmp, FORM_PAIR, 0x1000);
        let b = encode_target(&call, 0x5000).unwrap().value.to_le_bytes();
        assert!(has_branch_opcode(&call, &b));
        assert!(!has_branch_opcode(&tail, &b));
        assert!(!has_branch_opcode(
            &site(SiteKind::Call, FORM_JAL, 0x1000),
            &b
        ));
        assert!(!has_branch_opcode(&call, &b[..4]));
        let exp = expected_original(&call, &InsnBytes::new(&[0; 8]), 0x5000).unwrap();
        assert_eq!(exp.as_slice(), &b);
        // Odd targets.
        assert!(encode_target(&call, 0x5001).is_none());
    }

    #[test]
    fn trampoline_round_trips_and_is_checked() {
        for (addr, slot) in [
            (0x8020_0000u64, 0x8030_1008u64),
            (0x8040_0ffc, 0x8020_0000),
            (0x1000, 0x1000 + (1 << 31) - 0x808),
        ] {
            let t = trampoline(addr, slot).unwrap();
            let b: std::vec::Vec<u8> = t.iter().flat_map(|i| i.to_le_bytes()).collect();
            assert_eq!(trampoline_slot(&b, addr), Some(slot), "{addr:#x} {slot:#x}");
            let mut bad = b.clone();
            bad[8..].copy_from_slice(&RET.to_le_bytes());
            assert_eq!(trampoline_slot(&bad, addr), None);
            assert_eq!(trampoline_slot(&b[..8], addr), None);
        }
        assert!(trampoline(0x1000, 0x1004).is_none());
        assert!(trampoline(0x1000, 0x1000 + (1 << 31)).is_none());
        let null = trampoline(0x10, 0).unwrap();
        let b: std::vec::Vec<u8> = null.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(trampoline_slot(&b, 0x10), None);
    }
}
