//! aarch64 branch encodings: `bl`/`b` sites (imm26, ±128 MiB), the ifunc trampoline
//! (`adrp x16` / `ldr x16` / `br x16` through the slot), and the linker range-extension
//! veneers a site may branch to.
//!
//! Every instruction is 4 bytes, little-endian, 4-aligned. A site is one instruction:
//! `bl label` (`0x94000000 | imm26`, [`SiteKind::Call`]) or `b label`
//! (`0x14000000 | imm26`, [`SiteKind::Jmp`]), where `imm26` is the signed word offset
//! from the instruction itself (not from the next one, as on x86-64). The offset and the
//! opcode share the word, so the *target field* patching rewrites is the whole
//! instruction (offsets `0..4`), written as one aligned 32-bit store.
//!
//! aarch64 has no prefixes, and conditional branches (`b.cond`, `cbz`/`cbnz`,
//! `tbz`/`tbnz`) are not patched: their imm19/imm14 reaches only ±1 MiB/±32 KiB and
//! shares bits with the condition and register, so the build tool leaves them on the
//! trampoline (where they keep working) and the table never holds one;
//! [`supports_site`] refuses one.
//!
//! # Veneers
//!
//! When a `bl`/`b` cannot reach its target, the linker points it at a range-extension
//! veneer (thunk) it adds nearby, which reaches anywhere through `x16` (IP0, the
//! register AAPCS64 reserves for this). The forms [`veneer_target`] decodes:
//!
//! | linker | form | bytes |
//! |---|---|---|
//! | lld `AArch64ADRPThunk`, GNU ld `aarch64_adrp_branch_stub` (±4 GiB) | `adrp x16, T; add x16, x16, :lo12:T; br x16` | `90xxxxx0 91xxx210 d61f0200` |
//! | lld `AArch64ABSLongThunk` (absolute) | `ldr x16, .+8; br x16; .quad T` | `58000050 d61f0200 T` |
//! | GNU ld `aarch64_long_branch_stub` (PC-relative) | `ldr x16, .+16; adr x17, .; add x16, x16, x17; br x16; .quad T - (veneer + 4)` | `58000090 10000011 8b110210 d61f0200 …` |
//!
//! (lld may put `bti c` in front when BTI is on; [`veneer_target`] skips one.)
//!
//! **Veneered sites: a note for the build tool.** Decoding belongs here (it is an
//! encoding fact, and both the build tool and a future loader check use it); deciding
//! what to record is the build tool's. The loader checks a site against the branch the
//! table says it holds, a `bl`/`b` to the ifunc's trampoline ([`is_original`]), and a
//! rollback rewrites exactly that branch; a site whose `bl` reaches only a veneer
//! (`bl V`, [`veneer_target`]`(V) == trampoline`) can satisfy neither, and format v1 has
//! no per-site field to name `V`. So until the format gains one (a "via" offset per
//! site, or a flag meaning "the original target is the veneer at the decoded
//! destination", checked by reading `V`): `ksites embed` should recognise such sites
//! (so `scan`/`inspect` count them as calls of the ifunc), leave them out of the
//! table, where they keep working through veneer and trampoline, and report them
//! (a site, the veneer, the reason) as x86-64 reports out-of-reach sites.

use core::ops::Range;

use crate::arch::{BranchSite, InsnBytes, SiteKind, TargetField};

/// Length of every instruction.
pub const INSN_LEN: usize = 4;
/// `b label`: opcode bits (imm26 in bits 0..26).
pub const B: u32 = 0x1400_0000;
/// `bl label`: opcode bits (imm26 in bits 0..26).
pub const BL: u32 = 0x9400_0000;
/// The bits of `b`/`bl` that are not the offset.
pub const B_OPCODE_MASK: u32 = 0xfc00_0000;
/// `nop`.
pub const NOP: u32 = 0xd503_201f;
/// `ret` (`ret x30`).
pub const RET: u32 = 0xd65f_03c0;
/// `brk #0`: the imm16 goes in bits 5..21.
pub const BRK: u32 = 0xd420_0000;
/// `br x16`.
pub const BR_X16: u32 = 0xd61f_0200;
/// `adrp x16, 0`: immlo in bits 29..31, immhi in bits 5..24.
pub const ADRP_X16: u32 = 0x9000_0010;
/// The bits of `adrp xN` that are not the page offset (nor the register).
const ADRP_MASK: u32 = 0x9f00_0000;
/// `ldr x16, [x16, #0]` (64-bit, unsigned offset): imm12 (in 8-byte units) in bits
/// 10..22.
pub const LDR_X16_X16: u32 = 0xf940_0210;
/// `add x16, x16, #0` (64-bit, no shift): imm12 in bits 10..22.
pub const ADD_X16_X16: u32 = 0x9100_0210;
/// The bits of a `ldr`/`add` immediate form that are not the imm12.
const IMM12_MASK: u32 = 0xffc0_03ff;
/// `ldr x16, .+0` (literal): imm19 (in words) in bits 5..24.
pub const LDR_LIT_X16: u32 = 0x5800_0010;
/// `adr x17, .`.
pub const ADR_X17_0: u32 = 0x1000_0011;
/// `add x16, x16, x17`.
pub const ADD_X16_X16_X17: u32 = 0x8b11_0210;
/// `bti c`.
pub const BTI_C: u32 = 0xd503_245f;
/// Length of a trampoline: `adrp`, `ldr`, `br`.
pub const TRAMPOLINE_LEN: usize = 12;
/// Every site is one instruction.
pub const MAX_SITE_LEN: usize = INSN_LEN;
/// Length of every probe site: one instruction.
pub const PROBE_SITE_LEN: usize = INSN_LEN;
/// Farthest forward a `b`/`bl` reaches: 128 MiB − 4.
pub const MAX_FORWARD: i64 = (1 << 27) - 4;
/// Farthest backward a `b`/`bl` reaches: −128 MiB.
pub const MAX_BACKWARD: i64 = -(1 << 27);

/// `brk #imm`.
pub const fn brk(imm: u16) -> u32 {
    BRK | (imm as u32) << 5
}

/// The opcode bits of a site of `kind` (`None` for a conditional branch).
const fn opcode(kind: SiteKind) -> Option<u32> {
    match kind {
        SiteKind::Call => Some(BL),
        SiteKind::Jmp => Some(B),
        SiteKind::Jcc => None,
    }
}

/// The imm26 of a `b`/`bl` at `pc` that reaches `target`: `None` if `target` is not
/// 4-aligned relative to `pc` or is out of reach ([`MAX_BACKWARD`]..=[`MAX_FORWARD`]).
#[inline(always)]
pub fn imm26(pc: u64, target: u64) -> Option<u32> {
    let off = i64::try_from(target as i128 - pc as i128).ok()?;
    (off & 3 == 0 && (MAX_BACKWARD..=MAX_FORWARD).contains(&off))
        .then_some((off >> 2) as u32 & 0x03ff_ffff)
}

/// The `b` (or `bl`, with `link`) at `pc` that reaches `target`; `None` if out of reach
/// or misaligned.
#[inline(always)]
pub fn branch_insn(pc: u64, target: u64, link: bool) -> Option<u32> {
    Some(if link { BL } else { B } | imm26(pc, target)?)
}

/// Where the `b`/`bl` `insn` at `pc` goes (`None` if it is neither).
#[inline(always)]
pub fn branch_dest(insn: u32, pc: u64) -> Option<u64> {
    if !is_b_or_bl(insn) {
        return None;
    }
    // Sign-extend the 26-bit word offset.
    let off = (((insn << 6) as i32) >> 6) as i64 * 4;
    pc.checked_add_signed(off)
}

/// Whether `insn` is a `b` or `bl`.
#[inline(always)]
pub const fn is_b_or_bl(insn: u32) -> bool {
    matches!(insn & B_OPCODE_MASK, B | BL)
}

/// Length of a site: one instruction, plus any prefixes (aarch64 has none, so a site
/// claiming some is longer than [`MAX_SITE_LEN`] and the reader refuses it).
#[inline(always)]
pub const fn site_len(_kind: SiteKind, prefixes: u8) -> usize {
    INSN_LEN + prefixes as usize
}

/// The bytes patching rewrites: the whole instruction (the offset and the opcode share
/// it).
#[inline(always)]
pub const fn target_field(_kind: SiteKind, prefixes: u8) -> Range<usize> {
    prefixes as usize..prefixes as usize + INSN_LEN
}

/// Whether the patcher handles a site of `kind` with `prefixes` at `addr`: an
/// unconditional `bl`/`b`, no prefixes, 4-aligned.
pub const fn supports_site(kind: SiteKind, prefixes: u8, addr: u64) -> bool {
    opcode(kind).is_some() && prefixes == 0 && addr.is_multiple_of(INSN_LEN as u64)
}

/// The instruction `site` holds when it branches to `target`. `None` if `target` is out
/// of reach (or the site is one the patcher does not handle).
#[inline(always)]
pub fn encode_branch(site: &BranchSite, _current: &InsnBytes, target: u64) -> Option<InsnBytes> {
    let f = encode_target(site, target)?;
    Some(InsnBytes::from_word(f.value, INSN_LEN))
}

/// The whole instruction of `site` branching to `target`; `None` if out of reach.
#[inline(always)]
pub fn encode_target(site: &BranchSite, target: u64) -> Option<TargetField> {
    if !supports_site(site.kind, site.prefixes, site.addr) {
        return None;
    }
    let insn = opcode(site.kind)? | imm26(site.addr, target)?;
    Some(TargetField {
        value: u64::from(insn),
        len: INSN_LEN as u8,
    })
}

/// The first instruction of `bytes`, if there are four bytes.
#[inline(always)]
pub fn insn_at(bytes: &[u8], i: usize) -> Option<u32> {
    let b = bytes.get(i * INSN_LEN..(i + 1) * INSN_LEN)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

/// Whether `bytes` hold a branch of the site's kind (whatever its target).
pub fn has_branch_opcode(site: &BranchSite, bytes: &[u8]) -> bool {
    match (opcode(site.kind), insn_at(bytes, 0)) {
        (Some(op), Some(insn)) => site.prefixes == 0 && insn & B_OPCODE_MASK == op,
        _ => false,
    }
}

/// Where the branch `bytes` at `site` go, if they are a branch of its kind.
pub fn decode_branch_target(site: &BranchSite, bytes: &[u8]) -> Option<u64> {
    if !has_branch_opcode(site, bytes) {
        return None;
    }
    branch_dest(insn_at(bytes, 0)?, site.addr)
}

/// Whether the site's bytes `v` (little-endian) are exactly the unpatched site: the
/// branch of its kind to `trampoline`.
#[inline(always)]
pub fn is_original(site: &BranchSite, v: u64, trampoline: u64) -> bool {
    site.len as usize == INSN_LEN
        && encode_target(site, trampoline).is_some_and(|f| f.value == v & 0xffff_ffff)
}

/// The bytes an unpatched site must hold (the branch of its kind to `trampoline`), for
/// error messages; `None` if the trampoline is out of reach.
pub fn expected_original(
    site: &BranchSite,
    found: &InsnBytes,
    trampoline: u64,
) -> Option<InsnBytes> {
    encode_branch(site, found, trampoline)
}

/// The trampoline `adrp x16, slot; ldr x16, [x16, :lo12:slot]; br x16` at `addr` for
/// `slot`: `None` if the slot is not 8-aligned or more than ±4 GiB away.
pub fn trampoline(addr: u64, slot: u64) -> Option<[u32; 3]> {
    if !slot.is_multiple_of(8) {
        return None;
    }
    let pages = ((slot & !0xfff) as i128 - (addr & !0xfff) as i128) >> 12;
    let pages = i32::try_from(pages).ok()?;
    if !(-(1 << 20)..1 << 20).contains(&pages) {
        return None;
    }
    let imm = pages as u32;
    let adrp = ADRP_X16 | (imm & 3) << 29 | ((imm >> 2) & 0x7_ffff) << 5;
    let ldr = LDR_X16_X16 | (((slot & 0xfff) as u32 / 8) << 10);
    Some([adrp, ldr, BR_X16])
}

/// The page `adrp x16, …` (`insn`, at `pc`) puts in x16; `None` if `insn` is not
/// `adrp x16`.
pub fn adrp_x16_page(insn: u32, pc: u64) -> Option<u64> {
    if insn & ADRP_MASK != ADRP_X16 & ADRP_MASK || insn & 0x1f != 16 {
        return None;
    }
    let immlo = (insn >> 29) & 3;
    let immhi = (insn >> 5) & 0x7_ffff;
    // Sign-extend the 21-bit page count.
    let pages = ((((immhi << 2) | immlo) << 11) as i32 >> 11) as i64;
    (pc & !0xfff).checked_add_signed(pages.checked_mul(4096)?)
}

/// The imm12 of `insn` if it is `base` (an `add`/`ldr` immediate form of x16, x16) with
/// some immediate.
fn imm12_of(insn: u32, base: u32) -> Option<u64> {
    (insn & IMM12_MASK == base).then_some(u64::from((insn >> 10) & 0xfff))
}

/// The slot the trampoline `b` (read at `addr`) jumps through, or `None` if the bytes
/// are not `adrp x16, page; ldr x16, [x16, #off]; br x16`, or the slot would be null,
/// misaligned or outside the address space.
pub fn trampoline_slot(b: &[u8], addr: u64) -> Option<u64> {
    let page = adrp_x16_page(insn_at(b, 0)?, addr)?;
    let off = imm12_of(insn_at(b, 1)?, LDR_X16_X16)? * 8;
    if insn_at(b, 2)? != BR_X16 {
        return None;
    }
    let slot = page.checked_add(off)?;
    (slot != 0 && slot.checked_add(8).is_some()).then_some(slot)
}

/// `ldr x17, [x16, #0]` (64-bit, unsigned offset): imm12 (in 8-byte units) in bits
/// 10..22.
const LDR_X17_X16: u32 = 0xf940_0211;
/// `br x17`.
const BR_X17: u32 = 0xd61f_0220;
/// Length of a GNU ifunc's PLT entry (`.iplt`), as GNU ld and lld write it.
pub const PLT_ENTRY_LEN: usize = 16;

/// The slot (`.got.plt`/`.got` entry, filled through `R_AARCH64_IRELATIVE`) the GNU
/// ifunc PLT entry `b` (read at `addr`) jumps through: `adrp x16, page; ldr x17, [x16,
/// #off]; add x16, x16, #off; br x17` (GNU ld's and lld's static `.iplt` form). `None` if
/// the bytes are not that, or the slot would be null or outside the address space.
pub fn plt_slot(b: &[u8], addr: u64) -> Option<u64> {
    let page = adrp_x16_page(insn_at(b, 0)?, addr)?;
    let off = imm12_of(insn_at(b, 1)?, LDR_X17_X16)? * 8;
    let add = imm12_of(insn_at(b, 2)?, ADD_X16_X16)?;
    if add != off || insn_at(b, 3)? != BR_X17 {
        return None;
    }
    let slot = page.checked_add(off)?;
    (slot != 0 && slot.checked_add(8).is_some()).then_some(slot)
}

/// Longest veneer [`veneer_target`] decodes, in bytes (GNU ld's PC-relative long
/// branch stub after a `bti c`).
pub const MAX_VENEER_LEN: usize = 28;

/// Where the linker veneer `b` (read at `addr`) goes: one of the forms in the module
/// docs, optionally after `bti c`. `None` if the bytes are none of them.
pub fn veneer_target(b: &[u8], addr: u64) -> Option<u64> {
    let skip = usize::from(insn_at(b, 0)? == BTI_C);
    let at = addr.checked_add(4 * skip as u64)?;
    let b = b.get(skip * INSN_LEN..)?;
    let i0 = insn_at(b, 0)?;
    if let Some(page) = adrp_x16_page(i0, at) {
        let lo = imm12_of(insn_at(b, 1)?, ADD_X16_X16)?;
        return (insn_at(b, 2)? == BR_X16).then(|| page.checked_add(lo))?;
    }
    let quad = |i: usize| -> Option<u64> {
        let q = b.get(i * INSN_LEN..i * INSN_LEN + 8)?;
        Some(u64::from_le_bytes(q.try_into().ok()?))
    };
    // `ldr x16, .+8; br x16; .quad T`.
    if i0 == LDR_LIT_X16 | (2 << 5) && insn_at(b, 1)? == BR_X16 {
        return quad(2);
    }
    // `ldr x16, .+16; adr x17, .; add x16, x16, x17; br x16; .quad T - (adr's pc)`.
    if i0 == LDR_LIT_X16 | (4 << 5)
        && insn_at(b, 1)? == ADR_X17_0
        && insn_at(b, 2)? == ADD_X16_X16_X17
        && insn_at(b, 3)? == BR_X16
    {
        return at.checked_add(4)?.checked_add(quad(4)?);
    }
    None
}

/// `b.cond`: opcode bits (imm19 in bits 5..24, the condition in bits 0..4).
const B_COND: u32 = 0x5400_0000;
const B_COND_MASK: u32 = 0xff00_0010;
/// `cbz`/`cbnz` (either width): imm19 in bits 5..24.
const CBZ: u32 = 0x3400_0000;
const CBNZ: u32 = 0x3500_0000;
const CB_MASK: u32 = 0x7f00_0000;
/// `tbz`/`tbnz`: imm14 in bits 5..19.
const TBZ: u32 = 0x3600_0000;
const TBNZ: u32 = 0x3700_0000;
/// `adr`/`adrp` (any register).
const ADR: u32 = 0x1000_0000;
const ADRP: u32 = 0x9000_0000;
/// `br`/`blr`/`ret` (any register): the register in bits 5..10.
const BR_REG_MASK: u32 = 0xffff_fc1f;
const BR_REG: u32 = 0xd61f_0000;
const BLR_REG: u32 = 0xd63f_0000;
const RET_REG: u32 = 0xd65f_0000;

/// Where the conditional branch `insn` at `pc` goes (`b.cond`, `cbz`/`cbnz`: imm19,
/// ±1 MiB; `tbz`/`tbnz`: imm14, ±32 KiB), and its mnemonic; `None` if it is none of
/// them. These are never patched (see the module docs); the build tool reports them.
pub fn cond_branch(insn: u32, pc: u64) -> Option<(&'static str, u64)> {
    let (name, off) = cond_branch_offset(insn)?;
    Some((name, pc.checked_add_signed(off)?))
}

/// The mnemonic and byte offset of the conditional branch `insn`.
fn cond_branch_offset(insn: u32) -> Option<(&'static str, i64)> {
    let imm19 = || ((((insn >> 5) & 0x7_ffff) << 13) as i32 >> 13) as i64 * 4;
    let (name, off) = if insn & B_COND_MASK == B_COND {
        ("b.cond", imm19())
    } else if insn & CB_MASK == CBZ {
        ("cbz", imm19())
    } else if insn & CB_MASK == CBNZ {
        ("cbnz", imm19())
    } else if insn & CB_MASK == TBZ || insn & CB_MASK == TBNZ {
        let imm14 = ((((insn >> 5) & 0x3fff) << 18) as i32 >> 18) as i64 * 4;
        (if insn & CB_MASK == TBZ { "tbz" } else { "tbnz" }, imm14)
    } else {
        return None;
    };
    Some((name, off))
}

/// The mnemonic of `insn`, for messages about instructions that are not sites: every
/// branch form, `adr`/`adrp`, `nop`, `brk`, or `None` for anything else.
pub fn mnemonic(insn: u32) -> Option<&'static str> {
    if let Some((name, _)) = cond_branch_offset(insn) {
        return Some(name);
    }
    Some(match insn {
        _ if insn & B_OPCODE_MASK == BL => "bl",
        _ if insn & B_OPCODE_MASK == B => "b",
        _ if insn & ADRP_MASK == ADRP => "adrp",
        _ if insn & ADRP_MASK == ADR => "adr",
        _ if insn & BR_REG_MASK == BR_REG => "br",
        _ if insn & BR_REG_MASK == BLR_REG => "blr",
        _ if insn & BR_REG_MASK == RET_REG => "ret",
        NOP => "nop",
        _ if insn & 0xffe0_001f == BRK => "brk",
        _ => return None,
    })
}

/// The instructions of an ifunc trampoline (for [`crate::ifunc!`]'s `naked_asm!`): an
/// indirect branch through the 8-byte slot at the local label `2` that follows
/// (`adrp`/`ldr` reach ±4 GiB), then a `brk` so nothing runs past it speculatively.
/// Every architecture defines this macro under the same name.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_arch_trampoline {
    () => {
        "adrp x16, 2f\nldr x16, [x16, :lo12:2f]\nbr x16\nbrk #0x3e8"
    };
}

/// `.pushsection <name>,"<flags>",<type>` with this assembler's spelling of the
/// `progbits` section type (`%progbits`, which every ARM assembler accepts). Every
/// architecture defines this macro under the same name.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_arch_pushsection {
    ($name:literal, $flags:literal) => {
        concat!(".pushsection ", $name, ",\"", $flags, "\",%progbits")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(kind: SiteKind, addr: u64) -> BranchSite {
        BranchSite {
            addr,
            kind,
            prefixes: 0,
            len: INSN_LEN as u8,
        }
    }

    fn word(insn: u32) -> InsnBytes {
        InsnBytes::new(&insn.to_le_bytes())
    }

    /// Bytes from `aarch64-linux-gnu-as enc.s -o enc.o && aarch64-linux-gnu-objdump -d
    /// enc.o` (GNU binutils 2.42), where `enc.s` is, from address 0:
    /// `a0: bl a0+0x7fffffc`, `a1: b a1+0x7fffffc`, `a2: bl a2-0x8000000`,
    /// `a3: b a3-0x8000000`, `nop`, `brk #0x4b53`, `ret`, then at 0x30
    /// `a4: bl a4+0x1234` and `a5: b a5-8`. (The encoding depends only on the offset;
    /// the cases sit at `BASE` + the assembler's address so the backward ones do not
    /// wrap below 0, which the encoder refuses.)
    #[test]
    fn branches_match_the_assembler_at_the_reach_limits() {
        const BASE: u64 = 0xffff_0000_1000_0000;
        let cases: [(u64, i64, bool, u32); 6] = [
            (0x0, 0x7ff_fffc, true, 0x95ff_ffff),
            (0x4, 0x7ff_fffc, false, 0x15ff_ffff),
            (0x8, -0x800_0000, true, 0x9600_0000),
            (0xc, -0x800_0000, false, 0x1600_0000),
            (0x30, 0x1234, true, 0x9400_048d),
            (0x34, -8, false, 0x17ff_fffe),
        ];
        for (pc, off, link, want) in cases {
            let pc = BASE + pc;
            let target = pc.checked_add_signed(off).unwrap();
            assert_eq!(
                branch_insn(pc, target, link),
                Some(want),
                "{pc:#x} -> {target:#x}"
            );
            assert_eq!(branch_dest(want, pc), Some(target));
            let kind = if link { SiteKind::Call } else { SiteKind::Jmp };
            let s = site(kind, pc);
            let b = encode_branch(&s, &word(0), target).unwrap();
            assert_eq!(b.as_slice(), &want.to_le_bytes());
            assert_eq!(decode_branch_target(&s, b.as_slice()), Some(target));
            assert!(is_original(&s, u64::from(want), target));
            assert!(!is_original(&s, u64::from(want), target + 4));
        }
        assert_eq!(NOP, 0xd503_201f);
        assert_eq!(brk(0x4b53), 0xd429_6a60);
        assert_eq!(RET, 0xd65f_03c0);
    }

    /// Every word offset in reach (sampled: each end, around 0, and a stride across)
    /// encodes and decodes back; one word past either end is refused.
    #[test]
    fn encode_decode_round_trip_across_the_reach() {
        let pc = 0xffff_8000_4000_0000u64;
        let ends = (MAX_BACKWARD..MAX_BACKWARD + 4096)
            .chain(-4096..4096)
            .chain(MAX_FORWARD - 4096..=MAX_FORWARD)
            .chain((MAX_BACKWARD..=MAX_FORWARD).step_by(0x1_0004));
        let mut n = 0;
        for off in ends.filter(|o| o % 4 == 0) {
            let target = pc.checked_add_signed(off).unwrap();
            for kind in [SiteKind::Call, SiteKind::Jmp] {
                let s = site(kind, pc);
                let f = encode_target(&s, target).unwrap_or_else(|| panic!("{off:#x}"));
                let b = (f.value as u32).to_le_bytes();
                assert_eq!(decode_branch_target(&s, &b), Some(target), "{off:#x}");
                assert!(is_original(&s, f.value, target));
                n += 1;
            }
        }
        assert!(n > 8000, "{n}");
        for off in [MAX_FORWARD + 4, MAX_BACKWARD - 4, 1 << 30, -(1 << 30)] {
            let target = pc.checked_add_signed(off).unwrap();
            assert_eq!(imm26(pc, target), None, "{off:#x}");
        }
    }

    #[test]
    fn out_of_reach_and_misaligned_targets_are_refused() {
        let s = site(SiteKind::Call, 0x1000_0000);
        let cur = word(BL);
        // One word past each limit.
        assert!(encode_branch(&s, &cur, 0x1000_0000 + 0x800_0000).is_none());
        assert!(encode_target(&s, 0x1000_0000 - 0x800_0004).is_none());
        assert!(encode_target(&s, 0x1000_0000 + 0x7ff_fffc).is_some());
        assert!(encode_target(&s, 0x1000_0000 - 0x800_0000).is_some());
        // Not 4-aligned, or across the address space.
        assert!(encode_target(&s, 0x1000_0002).is_none());
        assert!(encode_target(&site(SiteKind::Call, 0), u64::MAX - 3).is_none());
        // A misaligned site, prefixes, a conditional branch: not patched.
        assert!(encode_target(&site(SiteKind::Call, 0x1002), 0x2000).is_none());
        assert!(encode_target(&site(SiteKind::Jcc, 0x1000), 0x2000).is_none());
        assert!(!supports_site(SiteKind::Call, 1, 0x1000));
        assert!(!supports_site(SiteKind::Jcc, 0, 0x1000));
        assert!(supports_site(SiteKind::Jmp, 0, 0x1000));
        assert_eq!(site_len(SiteKind::Call, 0), 4);
        assert!(site_len(SiteKind::Call, 1) > MAX_SITE_LEN);
        assert_eq!(target_field(SiteKind::Jmp, 0), 0..4);
    }

    #[test]
    fn kinds_are_told_apart() {
        let call = site(SiteKind::Call, 0x1000);
        let jmp = site(SiteKind::Jmp, 0x1000);
        let bl = (BL | 4).to_le_bytes();
        assert!(has_branch_opcode(&call, &bl));
        assert!(!has_branch_opcode(&jmp, &bl));
        assert_eq!(decode_branch_target(&jmp, &bl), None);
        assert_eq!(decode_branch_target(&call, &bl), Some(0x1010));
        assert!(!has_branch_opcode(&call, &NOP.to_le_bytes()));
        assert!(!has_branch_opcode(&call, &bl[..3]));
        let exp = expected_original(&call, &word(NOP), 0x2000).unwrap();
        assert_eq!(exp.as_slice(), &(BL | 0x400).to_le_bytes());
        assert!(expected_original(&call, &word(NOP), 0x2000_0000).is_none());
    }

    /// `trampoline` at 0x10000c for the slot at 0x1234560: from `aarch64-linux-gnu-as
    /// adrp.s -o adrp.o && aarch64-linux-gnu-ld -Ttext=0 adrp.o -o adrp.elf &&
    /// aarch64-linux-gnu-objdump -d adrp.elf`, with `adrp.s` = `.org 0x10000c; t: adrp
    /// x16, s; ldr x16, [x16, :lo12:s]; br x16; .org 0x1234560; s: .quad 0`:
    /// `900089b0 f942b210 d61f0200`.
    #[test]
    fn trampoline_encodes_as_the_linker_does_and_decodes_back() {
        let t = trampoline(0x10_000c, 0x123_4560).unwrap();
        assert_eq!(t, [0x9000_89b0, 0xf942_b210, 0xd61f_0200]);
        let bytes: std::vec::Vec<u8> = t.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(trampoline_slot(&bytes, 0x10_000c), Some(0x123_4560));
        // Backward, across pages, and at the ±4 GiB limit.
        for (addr, slot) in [
            (0x4000_1ffcu64, 0x1008u64),
            (0x1_0000_0000, 0x1ff8),
            (0x1000, 0x1000 + (1u64 << 32) - 8),
            (0x1_0000_1000, 0x1_0000_1000 - (1u64 << 32)),
        ] {
            let t = trampoline(addr, slot).unwrap();
            let b: std::vec::Vec<u8> = t.iter().flat_map(|i| i.to_le_bytes()).collect();
            assert_eq!(trampoline_slot(&b, addr), Some(slot), "{addr:#x} {slot:#x}");
        }
        assert!(trampoline(0x1000, 0x1000 + (1u64 << 32)).is_none());
        assert!(trampoline(0x1000, 0x2004).is_none());
        // Not a trampoline: wrong register, wrong last instruction, too short, null.
        let mut b = bytes.clone();
        b[0] ^= 1; // adrp x17
        assert_eq!(trampoline_slot(&b, 0x10_000c), None);
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&NOP.to_le_bytes());
        assert_eq!(trampoline_slot(&b, 0x10_000c), None);
        assert_eq!(trampoline_slot(&bytes[..8], 0x10_000c), None);
        let null = trampoline(0x10, 0).unwrap();
        let b: std::vec::Vec<u8> = null.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(trampoline_slot(&b, 0x10), None);
    }

    /// The three veneer forms (words from the linkers' stub templates: lld's
    /// `AArch64ADRPThunk`/`AArch64ABSLongThunk`, GNU ld's `aarch64_adrp_branch_stub` and
    /// `aarch64_long_branch_stub`; the `add x16, x16, #0xab8`, `ldr x16, .+8`,
    /// `ldr x16, .+16`, `adr x17, #0` and `add x16, x16, x17` words checked against
    /// `aarch64-linux-gnu-as`: `912ae210`, `58000050`, `58000090`, `10000011`,
    /// `8b110210`).
    #[test]
    fn veneers_are_followed_to_their_target() {
        let words =
            |w: &[u32]| -> std::vec::Vec<u8> { w.iter().flat_map(|i| i.to_le_bytes()).collect() };
        // adrp x16, 0x1234000 (from 0x10000c) ; add x16, x16, #0xab8 ; br x16
        let adrp = trampoline(0x10_000c, 0x123_4000).unwrap()[0];
        let v = words(&[adrp, 0x912a_e210, BR_X16]);
        assert_eq!(veneer_target(&v, 0x10_000c), Some(0x123_4ab8));
        let v = words(&[
            BTI_C,
            trampoline(0x10_0010, 0x123_4000).unwrap()[0],
            0x912a_e210,
            BR_X16,
        ]);
        assert_eq!(veneer_target(&v, 0x10_000c), Some(0x123_4ab8));
        // ldr x16, .+8 ; br x16 ; .quad 0xffff_8000_1234_5678
        let mut v = words(&[0x5800_0050, BR_X16]);
        v.extend_from_slice(&0xffff_8000_1234_5678u64.to_le_bytes());
        assert_eq!(veneer_target(&v, 0x4000), Some(0xffff_8000_1234_5678));
        // ldr x16, .+16 ; adr x17, . ; add x16, x16, x17 ; br x16 ; .quad T - (v + 4)
        let mut v = words(&[0x5800_0090, 0x1000_0011, 0x8b11_0210, BR_X16]);
        v.extend_from_slice(&(0x9000u64.wrapping_sub(0x4004)).to_le_bytes());
        assert_eq!(veneer_target(&v, 0x4000), Some(0x9000));
        assert!(v.len() + 4 <= MAX_VENEER_LEN);
        // Not veneers.
        assert_eq!(veneer_target(&words(&[NOP, BR_X16, 0, 0]), 0x4000), None);
        assert_eq!(
            veneer_target(&words(&[0x5800_0050, NOP, 0, 0]), 0x4000),
            None
        );
        assert_eq!(
            veneer_target(&words(&[adrp, LDR_X16_X16, BR_X16]), 0x10_000c),
            None
        );
        assert_eq!(veneer_target(&[], 0), None);
    }

    /// `b.ne .+0x100`, `cbz x3, .-8`, `cbnz w5, .+0xffffc`, `tbz x7, #33, .+0x7ffc`,
    /// `tbnz w2, #3, .-0x8000`, `b.eq .-0x100000`, then `adrp x0`, `adr x1`, `blr x3`,
    /// `br x9`: bytes from `aarch64-linux-gnu-as` + `objdump -d` (binutils 2.42).
    #[test]
    fn conditional_branches_and_mnemonics_match_the_assembler() {
        let pc = 0x4000_0000u64;
        let cases: [(u32, &str, i64); 6] = [
            (0x5400_0801, "b.cond", 0x100),
            (0xb4ff_ffc3, "cbz", -8),
            (0x357f_ffe5, "cbnz", 0xf_fffc),
            (0xb60b_ffe7, "tbz", 0x7ffc),
            (0x371c_0002, "tbnz", -0x8000),
            (0x5480_0000, "b.cond", -0x10_0000),
        ];
        for (insn, name, off) in cases {
            let want = pc.checked_add_signed(off).unwrap();
            assert_eq!(cond_branch(insn, pc), Some((name, want)), "{insn:#x}");
            assert_eq!(mnemonic(insn), Some(name));
            assert_eq!(branch_dest(insn, pc), None);
        }
        for (insn, name) in [
            (0x9000_0000, "adrp"),
            (0x1000_0001, "adr"),
            (0xd63f_0060, "blr"),
            (0xd61f_0120, "br"),
            (BR_X16, "br"),
            (RET, "ret"),
            (NOP, "nop"),
            (brk(0x4b53), "brk"),
            (0x9400_048d, "bl"),
            (0x17ff_fffe, "b"),
        ] {
            assert_eq!(mnemonic(insn), Some(name), "{insn:#x}");
            assert_eq!(cond_branch(insn, pc), None);
        }
        // `add x0, x0, #1` and a data word.
        assert_eq!(mnemonic(0x9100_0400), None);
        assert_eq!(mnemonic(0), None);
    }

    /// GNU ld's (at 0x400140) and lld's (at 0x251400) `.iplt` entries for a static
    /// aarch64 image with one GNU ifunc (`aarch64-linux-gnu-ld 2.42` and rust-lld,
    /// bytes from `objdump -d`), with the slots their `R_AARCH64_IRELATIVE` names.
    #[test]
    fn plt_entries_of_both_linkers() {
        let words = |w: [u32; 4]| -> [u8; 16] {
            let mut b = [0u8; 16];
            for (k, w) in w.iter().enumerate() {
                b[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
            }
            b
        };
        let bfd = words([0xf000_02f0, 0xf947_f611, 0x913f_a210, 0xd61f_0220]);
        assert_eq!(plt_slot(&bfd, 0x40_0140), Some(0x45_ffe8));
        let lld = words([0x9000_0090, 0xf942_ae11, 0x9115_6210, 0xd61f_0220]);
        assert_eq!(plt_slot(&lld, 0x25_1400), Some(0x26_1558));
        // Not a trampoline, and a trampoline is not an entry; `add` and `ldr`
        // disagreeing, a truncated entry, `br x16`: refused.
        assert_eq!(trampoline_slot(&bfd, 0x40_0140), None);
        let t = words([ADRP_X16, LDR_X16_X16 | 1 << 10, BR_X16, NOP]);
        assert_eq!(plt_slot(&t, 0x1000), None);
        let mut bad = lld;
        bad[8..12].copy_from_slice(&0x9115_6610u32.to_le_bytes());
        assert_eq!(plt_slot(&bad, 0x25_1400), None);
        assert_eq!(plt_slot(&lld[..12], 0x25_1400), None);
        let mut bad = lld;
        bad[12..].copy_from_slice(&BR_X16.to_le_bytes());
        assert_eq!(plt_slot(&bad, 0x25_1400), None);
    }
}
