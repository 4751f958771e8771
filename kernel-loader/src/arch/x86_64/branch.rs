//! x86-64 branch encodings: call/jmp/jcc sites, prefixes, rel32, the ifunc trampoline.

use crate::format::SiteKind;

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

/// Legacy prefixes a compiler may put before a branch (segment overrides used as
/// branch hints, operand/address size, `bnd`/`rep`). REX is never valid on `e8`/`e9`.
pub const fn is_branch_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf2 | 0xf3
    )
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
pub fn rel32(next_ip: u64, target: u64) -> Option<i32> {
    i32::try_from(target as i128 - next_ip as i128).ok()
}
