//! The x86-64 target: iced-x86 decoding and the one classification of `call`/`jmp`/`jcc
//! rel32` sites, the `R_X86_64_*` relocation classes and their `+4` bias, the
//! `jmp [rip+disp32]` trampoline, `endbr64` PLT entries, the disabled probe bytes, the
//! SysV argument registers of stapsdt notes and the relocations `embed` writes into a
//! module. Encodings come from `kernel_loader::arch::x86_64` (never defined twice).

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kernel_loader::arch::x86_64::{
    JMP_RIP_INDIRECT, NOP5, TRAMPOLINE_LEN, is_branch_prefix, opcode_matches,
};
use kernel_loader::format::{ARCH_X86_64, MAX_SITE_LEN, PROBE_SITE_LEN, PSite, SiteKind};
use kernel_loader::probe::{ProbeError, Stubs, site_bytes_with};
use object::elf;

use super::{Decoded, Insn, RelocClass, SiteInsn};
use crate::elf::Reloc;

/// The ELF machine.
pub const E_MACHINE: u16 = elf::EM_X86_64;
/// The `.ksites` header's architecture field.
pub const TABLE_ARCH: u16 = ARCH_X86_64;
/// Human name, for messages.
pub const NAME: &str = "x86-64";
/// A rel32 field ends its instruction: the branch goes to `S + A + 4`.
pub const BRANCH_FIELD_LEN: u64 = 4;
/// `endbr64`: an IBT PLT entry starts with it.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Opcode bytes of a prefix-less `call`/`jmp rel32` (before its rel32).
const PLAIN_BRANCH_OPCODE_LEN: u64 = 1;
/// The SysV argument registers, as stapsdt argument strings name them.
pub const ARG_REGISTERS: [&str; 6] = ["%rdi", "%rsi", "%rdx", "%rcx", "%r8", "%r9"];
/// The relocation of a self-relative 32-bit table field (`S + A - P`, `A` = the
/// target's offset from its symbol).
pub const TABLE_RELOC: u32 = elf::R_X86_64_PC32;
/// The relocation of a branch's rel32 to a symbol, and its addend (`-4`: the field
/// ends the instruction).
pub const BRANCH_RELOC: (u32, i64) = (elf::R_X86_64_PLT32, -(BRANCH_FIELD_LEN as i64));
/// No relocation.
pub const NONE_RELOC: u32 = elf::R_X86_64_NONE;
/// A 64-bit absolute address.
pub const ABS64_RELOC: u32 = elf::R_X86_64_64;
/// The IRELATIVE relocation of a GNU ifunc's slot.
pub const IRELATIVE_RELOC: u32 = elf::R_X86_64_IRELATIVE;

/// What a raw relocation type is.
#[inline]
pub fn reloc_class(t: u32) -> RelocClass {
    match t {
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => RelocClass::Branch,
        elf::R_X86_64_GOT32
        | elf::R_X86_64_GOTPCREL
        | elf::R_X86_64_GOTPCRELX
        | elf::R_X86_64_REX_GOTPCRELX
        | elf::R_X86_64_GOTPCREL64
        | elf::R_X86_64_GOT64 => RelocClass::Got,
        elf::R_X86_64_64 | elf::R_X86_64_32 | elf::R_X86_64_32S => RelocClass::Absolute,
        elf::R_X86_64_IRELATIVE => RelocClass::IRelative,
        elf::R_X86_64_NONE => RelocClass::None,
        _ => RelocClass::Other,
    }
}

/// The address a relocation refers to: for a rel32 that ends its instruction (PC32,
/// PLT32), S + A + 4 is where the branch goes; through the GOT, the symbol itself;
/// otherwise S + A.
#[inline]
pub fn reloc_target(r: &Reloc) -> u64 {
    let base = r.sym_value.wrapping_add_signed(r.addend);
    match reloc_class(r.r_type) {
        RelocClass::Branch => base.wrapping_add(BRANCH_FIELD_LEN),
        RelocClass::Got => r.sym_value,
        _ => base,
    }
}

/// `R_X86_64_*` name.
pub fn reloc_name(t: u32) -> &'static str {
    match t {
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        _ => "R_X86_64_?",
    }
}

/// Where a branch whose rel32 (`field`, little-endian) is at `at` goes.
pub fn branch_field_dest(field: &[u8], at: u64) -> Option<u64> {
    let rel = i32::from_le_bytes(field.try_into().ok()?);
    Some(
        at.wrapping_add(BRANCH_FIELD_LEN)
            .wrapping_add_signed(rel.into()),
    )
}

/// The first byte of a prefix-less `call`/`jmp rel32` whose rel32 is at `field_at`.
pub fn plain_branch_start(field_at: u64) -> Option<u64> {
    field_at.checked_sub(PLAIN_BRANCH_OPCODE_LEN)
}

/// The slot a trampoline (`jmp [rip+disp32]`, `bytes` at `at`) jumps through, or `None`
/// if `bytes` is not one.
pub fn trampoline_slot(bytes: &[u8], at: u64) -> Option<u64> {
    if bytes.len() < TRAMPOLINE_LEN || bytes[..2] != JMP_RIP_INDIRECT {
        return None;
    }
    let disp = i32::from_le_bytes(bytes[2..6].try_into().ok()?);
    Some((at + TRAMPOLINE_LEN as u64).wrapping_add_signed(disp.into()))
}

/// The trampoline's form for messages: `` `jmp [rip+0x…]` `` or `` `jmp [rip+slot]` ``.
pub fn trampoline_text(slot: Option<u64>) -> String {
    match slot {
        Some(s) => format!("`jmp [rip+{s:#x}]`"),
        None => "`jmp [rip+slot]`".to_string(),
    }
}

/// Why a PLT entry cannot be a trampoline, when its form is one this tool does not
/// support yet.
pub fn unsupported_plt_entry(entry: &[u8]) -> Option<&'static str> {
    entry.starts_with(&ENDBR64).then_some(
        "starts with endbr64 (an IBT PLT); build with -fcf-protection=none (IBT PLTs are \
         not supported yet)",
    )
}

/// The disabled form of a `probe!` site and of a C probe call.
pub const fn probe_nop() -> [u8; PROBE_SITE_LEN] {
    NOP5
}

/// The disabled bytes of a probe site of any kind.
pub fn disabled_probe(site: &PSite, stubs: &Stubs) -> Result<[u8; PROBE_SITE_LEN], ProbeError> {
    site_bytes_with(site, false, stubs)
}

/// The one classification: which site kind an instruction is (`call rel32`,
/// `jmp rel32`, near `jcc`), if any.
#[inline]
pub fn branch_kind(insn: &Instruction) -> Option<SiteKind> {
    match insn.code() {
        Code::Call_rel32_64 => Some(SiteKind::Call),
        Code::Jmp_rel32_64 => Some(SiteKind::Jmp),
        _ if insn.is_jcc_near() => Some(SiteKind::Jcc),
        _ => None,
    }
}

/// Decodes `code` (a function starting at `ip`) into `out` (cleared first).
pub(super) fn decode_function(code: &[u8], ip: u64, out: &mut Decoded) {
    let out = &mut out.x86_64;
    let mut dec = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    out.clear();
    while dec.can_decode() {
        out.push(dec.decode());
    }
}

/// Decodes the one instruction at `ip` (`code` holds its bytes).
pub fn decode_insn(code: &[u8], ip: u64) -> Insn {
    let insn = Decoder::with_ip(64, code, ip, DecoderOptions::NONE).decode();
    Insn {
        addr: insn.ip(),
        len: insn.len(),
        kind: branch_kind(&insn),
        branch_target: insn.near_branch_target(),
    }
}

/// The instruction at `ip` as text (iced's default formatting).
pub fn disasm(code: &[u8], ip: u64) -> String {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .decode()
        .to_string()
}

/// Classifies the instruction of `d` (decoded from `code`, which starts at `start`)
/// that holds the relocated field at `reloc_at`: a patchable site, or what else it is.
pub(super) fn classify(
    d: &Decoded,
    code: &[u8],
    start: u64,
    reloc_at: u64,
    target_addr: Option<u64>,
) -> Result<SiteInsn, String> {
    let insns = &d.x86_64;
    let i = insns.partition_point(|x| x.next_ip() <= reloc_at);
    let Some(insn) = insns.get(i).filter(|x| x.ip() <= reloc_at) else {
        return Err("not inside a decodable instruction".into());
    };
    if insn.code() == Code::INVALID {
        return Err(format!("invalid instruction at {:#x}", insn.ip()));
    }
    let len = insn.len();
    let Some(kind) = branch_kind(insn) else {
        return Err(format!("{}", Mnemonic(insn)));
    };
    if insn.next_ip() != reloc_at + BRANCH_FIELD_LEN
        || target_addr.is_some_and(|t| insn.near_branch_target() != t)
    {
        return Err(format!(
            "{} whose rel32 does not hold the relocation",
            Mnemonic(insn)
        ));
    }
    if len > MAX_SITE_LEN {
        return Err(format!(
            "{} with too many prefixes ({len} bytes)",
            Mnemonic(insn)
        ));
    }
    let prefixes = len - kind.opcode_len() - 4;
    let off = (insn.ip() - start) as usize;
    let bytes = &code[off..off + len];
    if !bytes[..prefixes].iter().all(|&b| is_branch_prefix(b))
        || !opcode_matches(kind, &bytes[prefixes..])
    {
        return Err(format!(
            "{} with unsupported prefix bytes {:02x?}",
            Mnemonic(insn),
            &bytes[..prefixes]
        ));
    }
    Ok(SiteInsn {
        addr: insn.ip(),
        len: len as u8,
        kind,
        prefixes: prefixes as u8,
    })
}

struct Mnemonic<'a>(&'a Instruction);

impl std::fmt::Display for Mnemonic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let mut fmt = iced_x86::FastFormatter::new();
        fmt.format(self.0, &mut s);
        f.write_str(&s)
    }
}
