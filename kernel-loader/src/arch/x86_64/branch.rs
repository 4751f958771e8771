//! x86-64 branch encodings: call/jmp/jcc sites, prefixes, rel32, the ifunc trampoline.
//!
//! A site is `prefixes* opcode rel32`: `e8` (call), `e9` (jmp) or `0f 8x` (jcc), then a
//! 4-byte displacement relative to the next instruction. Patching rewrites only the
//! rel32 (the site's last four bytes). The trampoline is `jmp qword ptr [rip + disp32]`
//! (`ff 25 disp32`) through the ifunc's 8-byte slot.

use core::ops::Range;

use crate::arch::{BranchSite, InsnBytes, SiteKind, TargetField};

/// `call rel32` opcode.
pub const CALL_REL32: u8 = 0xe8;
/// `jmp rel32` opcode.
pub const JMP_REL32: u8 = 0xe9;
/// First byte of `jcc rel32` (`0f 80+cc`).
pub const TWO_BYTE_ESCAPE: u8 = 0x0f;
/// The recommended 5-byte NOP, `nopl 0x0(%rax,%rax,1)`.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `jmp qword ptr [rip + disp32]`: the trampoline's first two bytes.
pub const JMP_RIP_INDIRECT: [u8; 2] = [0xff, 0x25];
/// Length of a trampoline's `jmp [rip+disp32]`.
pub const TRAMPOLINE_LEN: usize = 6;
/// Length of the displacement every site ends with.
pub const REL32_LEN: usize = 4;
/// Longest site instruction the patcher handles (the architectural limit is 15; real
/// compilers emit at most one or two prefixes before a branch). Longer sites are
/// rejected by the reader and reported, not recorded, by the build tool.
pub const MAX_SITE_LEN: usize = 8;
/// Length of every probe site: one 5-byte instruction.
pub const PROBE_SITE_LEN: usize = 5;
/// The prefix shown in an "expected" site when the one found is not a branch prefix.
const DS_PREFIX: u8 = 0x3e;
/// The `jcc` second byte shown in an "expected" site when the one found is not `8x`
/// (`jne`).
const JNE_REL32: u8 = 0x85;

/// `int3`: what the live-patch protocol writes over a site's first byte while it
/// rewrites the rest (a live ifunc retarget, `crate::ifunc`).
pub const INT3: u8 = 0xcc;

/// The first opcode byte of a site of `kind` (`e8`, `e9`, or `0f` for `jcc`): its byte 0
/// when it has no prefix.
#[inline(always)]
pub const fn first_opcode_byte(kind: SiteKind) -> u8 {
    match kind {
        SiteKind::Call => CALL_REL32,
        SiteKind::Jmp => JMP_REL32,
        SiteKind::Jcc => TWO_BYTE_ESCAPE,
    }
}

/// Legacy prefixes a compiler may put before a branch (segment overrides used as
/// branch hints, operand/address size, `bnd`/`rep`). REX is never valid on `e8`/`e9`.
pub const fn is_branch_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf2 | 0xf3
    )
}

/// Opcode length (without prefixes): 1 for `e8`/`e9`, 2 for `0f 8x`.
#[inline(always)]
pub const fn opcode_len(kind: SiteKind) -> usize {
    // Arithmetic, not a `match`: the engine computes it for every site, where a
    // three-way match compiled to a jump table.
    1 + matches!(kind, SiteKind::Jcc) as usize
}

/// Length of a site: prefixes, opcode, rel32.
#[inline(always)]
pub const fn site_len(kind: SiteKind, prefixes: u8) -> usize {
    prefixes as usize + opcode_len(kind) + REL32_LEN
}

/// The rel32: the bytes of a site patching rewrites.
#[inline(always)]
pub const fn target_field(kind: SiteKind, prefixes: u8) -> Range<usize> {
    let len = site_len(kind, prefixes);
    len - REL32_LEN..len
}

/// Whether `opcode` (the bytes after the prefixes) is the opcode of `kind`.
pub fn opcode_matches(kind: SiteKind, opcode: &[u8]) -> bool {
    match kind {
        SiteKind::Call => opcode.first() == Some(&CALL_REL32),
        SiteKind::Jmp => opcode.first() == Some(&JMP_REL32),
        SiteKind::Jcc => {
            opcode.first() == Some(&TWO_BYTE_ESCAPE)
                && opcode.get(1).is_some_and(|b| b & 0xf0 == 0x80)
        }
    }
}

/// The rel32 that makes a branch ending at `next_ip` reach `target`, if in range.
#[inline(always)]
pub fn rel32(next_ip: u64, target: u64) -> Option<i32> {
    // `target - next_ip` exactly (no wrap), as `i32`: the wrapped difference is the
    // exact one when its sign says which is larger (a few instructions; the same
    // result as an `i128` subtraction, which compiled to a dozen on every site).
    let d = target.wrapping_sub(next_ip) as i64;
    if (target < next_ip) != (d < 0) {
        return None;
    }
    i32::try_from(d).ok()
}

/// The bytes `site` holds when its rel32 targets `target`, keeping the prefix and
/// opcode bytes of `current`. `None` if `target` is out of reach.
#[inline(always)]
pub fn encode_branch(site: &BranchSite, current: &InsnBytes, target: u64) -> Option<InsnBytes> {
    let rel = rel32(site.end(), target)?;
    let mut b = *current;
    let at = target_field(site.kind, site.prefixes);
    b.as_mut_slice()
        .get_mut(at)?
        .copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// The rel32 of `site` branching to `target`; `None` if out of reach.
#[inline(always)]
pub fn encode_target(site: &BranchSite, target: u64) -> Option<TargetField> {
    let rel = rel32(site.end(), target)?;
    Some(TargetField {
        value: u64::from(rel as u32),
        len: REL32_LEN as u8,
    })
}

/// Whether `bytes` are valid prefixes followed by the opcode of the site's kind.
pub fn has_branch_opcode(site: &BranchSite, bytes: &[u8]) -> bool {
    let p = site.prefixes as usize;
    bytes.len() >= p
        && bytes[..p].iter().all(|&b| is_branch_prefix(b))
        && opcode_matches(site.kind, &bytes[p..])
}

/// Where the branch `bytes` at `site` go, if they are a branch of the site's kind.
pub fn decode_branch_target(site: &BranchSite, bytes: &[u8]) -> Option<u64> {
    if !has_branch_opcode(site, bytes) {
        return None;
    }
    let rel = bytes.get(target_field(site.kind, site.prefixes))?;
    let rel = i32::from_le_bytes(rel.try_into().ok()?);
    site.end().checked_add_signed(i64::from(rel))
}

/// Whether the site's bytes `v` (`site.len` of them, little-endian) are exactly an
/// unpatched site: valid prefixes, the opcode of its kind, and a rel32 that reaches
/// `trampoline`. The patch engine's fast path: it reads every site.
#[inline(always)]
pub fn is_original(site: &BranchSite, v: u64, trampoline: u64) -> bool {
    let p = site.prefixes as usize;
    let len = site.len as usize;
    let byte = |i: usize| (v >> (8 * i)) as u8;
    if len > 8 || !(0..p).all(|i| is_branch_prefix(byte(i))) {
        return false;
    }
    // The opcode bytes (1 or 2, after the prefixes) under a mask, looked up by kind
    // rather than matched (no branch per kind): `e8`, `e9`, `0f 8x`.
    const { assert!(SiteKind::Call as usize == 0 && SiteKind::Jcc as usize == 2) };
    const OPCODES: [(u64, u64); 3] = [
        (CALL_REL32 as u64, 0xff),
        (JMP_REL32 as u64, 0xff),
        (TWO_BYTE_ESCAPE as u64 | 0x80 << 8, 0xf0ff),
    ];
    let (want, mask) = OPCODES[site.kind as usize];
    let opcode_ok = (v >> (8 * p)) & mask == want;
    let rel = (v >> (8 * (len - REL32_LEN))) as u32 as i32;
    // Where the rel32 goes, exactly (no wrap), is the trampoline: the same as
    // `rel32(site.end(), trampoline) == Some(rel)`, with one addition.
    opcode_ok && site.end().checked_add_signed(i64::from(rel)) == Some(trampoline)
}

/// The bytes an unpatched site must hold: valid prefixes, the opcode of its kind, and a
/// rel32 that reaches `trampoline`; prefix and opcode bytes are taken from `found` where
/// they are valid, so an error shows what was wanted.
pub fn expected_original(
    site: &BranchSite,
    found: &InsnBytes,
    trampoline: u64,
) -> Option<InsnBytes> {
    let p = site.prefixes as usize;
    let mut exp = encode_branch(site, found, trampoline)?;
    let b = exp.as_mut_slice();
    for b in &mut b[..p] {
        if !is_branch_prefix(*b) {
            *b = DS_PREFIX;
        }
    }
    match site.kind {
        SiteKind::Call => b[p] = CALL_REL32,
        SiteKind::Jmp => b[p] = JMP_REL32,
        SiteKind::Jcc => {
            b[p] = TWO_BYTE_ESCAPE;
            if b[p + 1] & 0xf0 != 0x80 {
                b[p + 1] = JNE_REL32;
            }
        }
    }
    Some(exp)
}

/// The slot a `jmp [rip+disp32]` trampoline (its bytes `b`, read at `addr`) jumps
/// through, or `None` if the bytes are not that instruction, or the slot would be null,
/// misaligned or outside the address space.
pub fn trampoline_slot(b: &[u8], addr: u64) -> Option<u64> {
    let b = b.get(..TRAMPOLINE_LEN)?;
    let disp = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let slot = addr
        .checked_add(TRAMPOLINE_LEN as u64)?
        .checked_add_signed(i64::from(disp))?;
    (b[..2] == JMP_RIP_INDIRECT
        && slot.is_multiple_of(8)
        && slot != 0
        && slot.checked_add(8).is_some())
    .then_some(slot)
}

/// The instructions of an ifunc trampoline (for [`crate::ifunc!`]'s `naked_asm!`): an
/// indirect jump through the 8-byte slot at the local label `2` that follows, padded with
/// traps. Every architecture defines this macro under the same name.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_arch_trampoline {
    () => {
        "jmp qword ptr [rip + 2f]\nint3\nint3"
    };
}

/// `.pushsection <name>,"<flags>",<type>` with this assembler's spelling of the
/// `progbits` section type. Every architecture defines this macro under the same name.
#[cfg(target_arch = "x86_64")]
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

    fn site(kind: SiteKind, prefixes: u8) -> BranchSite {
        BranchSite {
            addr: 0x1000,
            kind,
            prefixes,
            len: site_len(kind, prefixes) as u8,
        }
    }

    #[test]
    fn encode_decode_and_is_original_agree() {
        let s = site(SiteKind::Jcc, 1);
        assert_eq!(s.len, 7);
        assert_eq!(target_field(s.kind, s.prefixes), 3..7);
        let cur = InsnBytes::new(&[0x3e, 0x0f, 0x84, 0, 0, 0, 0]);
        let b = encode_branch(&s, &cur, 0x2000).unwrap();
        assert_eq!(&b.as_slice()[..3], &[0x3e, 0x0f, 0x84]);
        assert_eq!(decode_branch_target(&s, b.as_slice()), Some(0x2000));
        let mut w = [0u8; 8];
        w[..7].copy_from_slice(b.as_slice());
        assert!(is_original(&s, u64::from_le_bytes(w), 0x2000));
        assert!(!is_original(&s, u64::from_le_bytes(w), 0x2001));
        assert!(encode_branch(&s, &cur, 0x1_0000_2000).is_none());
    }

    #[test]
    fn rel32_is_the_exact_difference_or_none() {
        let exact = |n: u64, t: u64| i32::try_from(t as i128 - n as i128).ok();
        let edges: [u64; 11] = [
            0,
            1,
            0x7fff_ffff,
            0x8000_0000,
            0x8000_0001,
            0xffff_ffff,
            0x1_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
            0xffff_ffff_8000_0000,
            0xffff_ffff_ffff_ffff,
        ];
        for &a in &edges {
            for &b in &edges {
                for (n, t) in [(a, b), (a, a.wrapping_add(b)), (a.wrapping_add(b), a)] {
                    assert_eq!(rel32(n, t), exact(n, t), "{n:#x} -> {t:#x}");
                }
            }
        }
    }

    #[test]
    fn expected_original_normalises_prefixes_and_opcode() {
        let s = site(SiteKind::Call, 1);
        let found = InsnBytes::new(&[0x90, 0x90, 0, 0, 0, 0]);
        let exp = expected_original(&s, &found, 0x1006).unwrap();
        assert_eq!(exp.as_slice(), &[DS_PREFIX, CALL_REL32, 0, 0, 0, 0]);
    }

    #[test]
    fn trampoline_slot_decodes_checks_and_refuses() {
        let mut b = [0xff, 0x25, 0, 0, 0, 0];
        b[2..].copy_from_slice(&(0x2000i32 - 0x1006).to_le_bytes());
        assert_eq!(trampoline_slot(&b, 0x1000), Some(0x2000));
        b[2] ^= 1; // misaligned slot
        assert_eq!(trampoline_slot(&b, 0x1000), None);
        assert_eq!(trampoline_slot(&[0xe9, 0, 0, 0, 0, 0], 0x1000), None);
        assert_eq!(trampoline_slot(&[0xff, 0x25], 0x1000), None);
        let to_null = (-0x1006i32).to_le_bytes();
        let b = [0xff, 0x25, to_null[0], to_null[1], to_null[2], to_null[3]];
        assert_eq!(trampoline_slot(&b, 0x1000), None);
    }
}
