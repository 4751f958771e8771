//! The x86-64 target: iced-x86 decoding and the one classification of `call`/`jmp`/`jcc
//! rel32` sites, the `R_X86_64_*` relocation classes and their `+4` bias, the
//! `jmp [rip+disp32]` trampoline, `endbr64` PLT entries, the disabled probe bytes, the
//! SysV argument registers of stapsdt notes and the relocations `embed` writes into a
//! module. Encodings come from `kernel_loader::arch::x86_64` (never defined twice).

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kernel_loader::arch::ProbeSiteRef;
use kernel_loader::arch::x86_64::probe::{Stubs, site_bytes};
use kernel_loader::arch::x86_64::{
    JMP_REL32, JMP_RIP_INDIRECT, MAX_SITE_LEN, NOP5, REL32_LEN, is_branch_prefix, opcode_len,
    opcode_matches,
};
pub use kernel_loader::arch::x86_64::{PROBE_SITE_LEN, TRAMPOLINE_LEN};
use kernel_loader::format::{ARCH_X86_64, PSite, ProbeKind, SiteKind};
use kernel_loader::probe::ProbeError;
use object::elf;

use super::{Insn, RelocClass, SiteInsn};
use crate::elf::Reloc;

/// GNU ld for this target on a host of another architecture.
pub const CROSS_GNU_LD: &str = "x86_64-linux-gnu-ld";
/// The ELF machine.
pub const E_MACHINE: u16 = elf::EM_X86_64.0;
/// The `.ksites` header's architecture field.
pub const TABLE_ARCH: u16 = ARCH_X86_64;
/// Human name, for messages.
pub const NAME: &str = "x86-64";
/// A rel32 field ends its instruction: the branch goes to `S + A + 4`.
pub const BRANCH_FIELD_LEN: u64 = 4;
/// `endbr64`: an IBT PLT entry starts with it.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Opcode bytes of a prefix-less `call`/`jmp rel32` (before its rel32).
pub const PLAIN_BRANCH_OPCODE_LEN: u64 = 1;
/// Offset of the trampoline's disp32 (after `ff 25`); like a rel32 it ends the
/// instruction, so its relocation reaches `S + A + 4`.
pub const TRAMPOLINE_SLOT_FIELD: u64 = JMP_RIP_INDIRECT.len() as u64;
/// The SysV argument registers, as stapsdt argument strings name them.
pub const ARG_REGISTERS: [&str; 6] = ["%rdi", "%rsi", "%rdx", "%rcx", "%r8", "%r9"];
/// The relocation of a self-relative 32-bit table field (`S + A - P`, `A` = the
/// target's offset from its symbol).
pub const TABLE_RELOC: u32 = elf::R_X86_64_PC32.0;
/// The relocation of a branch's rel32 to a symbol, and its addend (`-4`: the field
/// ends the instruction).
pub const BRANCH_RELOC: (u32, i64) = (elf::R_X86_64_PLT32.0, -(BRANCH_FIELD_LEN as i64));
/// No relocation.
pub const NONE_RELOC: u32 = elf::R_X86_64_NONE.0;
/// A 64-bit absolute address.
pub const ABS64_RELOC: u32 = elf::R_X86_64_64.0;
/// The IRELATIVE relocation of a GNU ifunc's slot.
pub const IRELATIVE_RELOC: u32 = elf::R_X86_64_IRELATIVE.0;

/// The dynamic relocation of an absolute pointer in a position-independent image
/// (`B + A`): its addend is the pointer's link-time value.
pub const RELATIVE_RELOC: u32 = elf::R_X86_64_RELATIVE.0;

/// What a raw relocation type is.
#[inline]
pub fn reloc_class(t: u32) -> RelocClass {
    match elf::RelocationType(t) {
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
    match elf::RelocationType(t) {
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
        elf::R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
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

/// Applies a [`TABLE_RELOC`] to the start of `place`, as the module loader does.
pub fn apply_table_reloc(place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), String> {
    kernel_loader::arch::x86_64::reloc::apply(TABLE_RELOC, place, s, a, p)
        .map_err(|e| e.to_string())
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
    site_bytes(&site.arch_ref(), false, stubs).map_err(|e| ProbeError::OutOfReach {
        site: site.addr,
        target: e.target,
    })
}

/// The disabled bytes of a C probe site of `kind` in a relocatable object, where a
/// branch's rel32 is left 0 for the relocation that fills it (`None`: a `probe!` site,
/// which holds its disabled form already).
pub fn disabled_probe_unlinked(kind: ProbeKind) -> Option<[u8; PROBE_SITE_LEN]> {
    match kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => None,
        // `jmp ksites_probe_ret0`: the rel32 comes from the retargeted relocation.
        ProbeKind::CEnabledTail => Some([JMP_REL32, 0, 0, 0, 0]),
        ProbeKind::CCall | ProbeKind::CTail | ProbeKind::CEnabled => {
            let site = ProbeSiteRef {
                addr: 0,
                target: 0,
                kind,
            };
            let stubs = Stubs {
                c_entry: 0,
                ret0: 0,
                ret1: 0,
            };
            // These disabled forms branch nowhere: they cannot be out of reach.
            site_bytes(&site, false, &stubs).ok()
        }
    }
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

/// A function's instructions, decoded from its first byte as the relocations in it are
/// asked about: in address order (the usual case) one forward pass that keeps only the
/// current instruction; once asked about an earlier address, the whole function decoded
/// into a vector and searched, so any order costs one decode. A `call`/`jmp rel32` at a
/// known instruction boundary (see [`Cursor::at_boundary`]) is classified without the
/// decoder, which is only created when some relocation needs it (its first use builds
/// iced's tables: most of a small object's scan).
pub(super) struct Cursor<'c> {
    code: &'c [u8],
    start: u64,
    /// The forward pass's decoder, created on first use.
    dec: Option<Decoder<'c>>,
    /// The last instruction decoded by the forward pass (`None` before the first).
    cur: Option<Instruction>,
    /// Every instruction, once a request went backwards.
    all: Option<Vec<Instruction>>,
}

impl<'c> Cursor<'c> {
    pub(super) fn new(code: &'c [u8], start: u64) -> Self {
        Cursor {
            code,
            start,
            dec: None,
            cur: None,
            all: None,
        }
    }

    /// The site whose rel32 is at `reloc_at`, when it is a prefix-less `call`/`jmp
    /// rel32` starting at a known instruction boundary: the function's first byte, or
    /// right after an `endbr64` that starts the function. Decoding starts at the
    /// function's first byte, so an instruction there (or after the 4-byte `endbr64`)
    /// starts exactly where the decoder would start it, and an `e8`/`e9` with its four
    /// bytes inside the function is `call`/`jmp rel32` and nothing else: exactly what
    /// [`classify_insn`] answers for it. `None` (ask the decoder) in every other case,
    /// including a branch elsewhere than `target_addr` (the decoder words the error).
    fn at_boundary(&self, reloc_at: u64, target_addr: Option<u64>) -> Option<SiteInsn> {
        let field = usize::try_from(reloc_at.checked_sub(self.start)?).ok()?;
        let op = field.checked_sub(PLAIN_BRANCH_OPCODE_LEN as usize)?;
        if !(op == 0 || (op == ENDBR64.len() && self.code.starts_with(&ENDBR64))) {
            return None;
        }
        let rel32 = self.code.get(field..field.checked_add(REL32_LEN)?)?;
        let kind = [SiteKind::Call, SiteKind::Jmp]
            .into_iter()
            .find(|&k| opcode_matches(k, &self.code[op..]))?;
        if target_addr.is_some_and(|t| branch_field_dest(rel32, reloc_at) != Some(t)) {
            return None;
        }
        Some(SiteInsn {
            addr: self.start + op as u64,
            len: (PLAIN_BRANCH_OPCODE_LEN as usize + REL32_LEN) as u8,
            kind,
            prefixes: 0,
        })
    }

    /// The instruction holding the byte at `at`: the first whose end is past `at`, if it
    /// starts at or before `at`.
    fn find(&mut self, at: u64) -> Option<Instruction> {
        if self.all.is_none() && self.cur.is_some_and(|c| c.ip() > at) {
            let mut dec = Decoder::with_ip(64, self.code, self.start, DecoderOptions::NONE);
            let mut all = Vec::new();
            while dec.can_decode() {
                all.push(dec.decode());
            }
            self.all = Some(all);
        }
        if let Some(all) = &self.all {
            let i = all.partition_point(|x| x.next_ip() <= at);
            return all.get(i).filter(|x| x.ip() <= at).copied();
        }
        loop {
            match self.cur {
                Some(c) if c.next_ip() > at => return (c.ip() <= at).then_some(c),
                _ => {
                    let (code, start) = (self.code, self.start);
                    let dec = self.dec.get_or_insert_with(|| {
                        Decoder::with_ip(64, code, start, DecoderOptions::NONE)
                    });
                    if !dec.can_decode() {
                        return None;
                    }
                    self.cur = Some(dec.decode());
                }
            }
        }
    }

    /// Classifies the instruction that holds the relocated field at `reloc_at`: a
    /// patchable site (branching to `target_addr`, when given), or what else it is.
    pub(super) fn classify(
        &mut self,
        reloc_at: u64,
        target_addr: Option<u64>,
    ) -> Result<SiteInsn, String> {
        if let Some(site) = self.at_boundary(reloc_at, target_addr) {
            return Ok(site);
        }
        let Some(insn) = self.find(reloc_at) else {
            return Err("not inside a decodable instruction".into());
        };
        classify_insn(&insn, self.code, self.start, reloc_at, target_addr)
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

/// Classifies `insn` (decoded from `code`, which starts at `start`), the instruction
/// that holds the relocated field at `reloc_at`: a patchable site, or what else it is.
fn classify_insn(
    insn: &Instruction,
    code: &[u8],
    start: u64,
    reloc_at: u64,
    target_addr: Option<u64>,
) -> Result<SiteInsn, String> {
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
    let prefixes = len - opcode_len(kind) - REL32_LEN;
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

/// The branch form of a static key site at `site`: `jmp rel32` to `target` (the
/// enabled form of a `probe!` site); `None` beyond the rel32's ±2 GiB.
pub fn key_branch(site: u64, target: u64) -> Option<[u8; PROBE_SITE_LEN]> {
    let rel = kernel_loader::arch::x86_64::rel32(site.checked_add(PROBE_SITE_LEN as u64)?, target)?;
    let r = rel.to_le_bytes();
    Some([JMP_REL32, r[0], r[1], r[2], r[3]])
}

/// Where the key site bytes `b` at `site` branch, if they are [`key_branch`]'s form.
pub fn key_branch_dest(b: &[u8], site: u64) -> Option<u64> {
    let [JMP_REL32, r0, r1, r2, r3] = *b else {
        return None;
    };
    let rel = i32::from_le_bytes([r0, r1, r2, r3]);
    site.checked_add(PROBE_SITE_LEN as u64)?
        .checked_add_signed(i64::from(rel))
}

/// How far [`key_branch`] reaches, for messages.
pub const KEY_BRANCH_REACH: &str = "the ±2 GiB of a jmp rel32";

/// The code the generic engine's tests assemble objects from (they name no encoding).
#[cfg(test)]
pub(crate) const SAMPLES: super::Samples = super::Samples {
    call: &[0xe8, 0, 0, 0, 0],
    jmp: &[0xe9, 0, 0, 0, 0],
    jcc: &[0x0f, 0x85, 0, 0, 0, 0],
    // `sub eax, imm32`: the byte before the immediate is `call`'s opcode.
    not_branch: &[0x81, 0xe8, 0, 0, 0, 0],
    // `push r12`, `ret`.
    other: &[0x41, 0x54, 0xc3],
    // `nop word [rax+rax+0]`, `nop`.
    nops: &[0x66, 0x0f, 0x1f, 0x44, 0, 0, 0x90],
    trap: 0xcc,
    // `00 00` is `add [rax], al`.
    zero_step: 2,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_branch_is_jmp_rel32_and_a_call_is_none() {
        assert_eq!(key_branch(0x1000, 0x1010), Some([0xe9, 0x0b, 0, 0, 0]));
        assert_eq!(
            key_branch_dest(&[0xe9, 0x0b, 0, 0, 0], 0x1000),
            Some(0x1010)
        );
        assert_eq!(key_branch_dest(&[0xe8, 0x0b, 0, 0, 0], 0x1000), None);
        assert_eq!(key_branch_dest(&NOP5, 0x1000), None);
    }

    #[test]
    fn one_classification_for_whole_functions_and_single_instructions() {
        // call rel32; cs jmp rel32; jne rel32 (0f 85); lea rax, [rip+0]
        let code: [u8; 24] = [
            0xe8, 0, 0, 0, 0, 0x2e, 0xe9, 0, 0, 0, 0, 0x0f, 0x85, 0, 0, 0, 0, 0x48, 0x8d, 0x05, 0,
            0, 0, 0,
        ];
        let ip = 0x1000;
        let site = |at: u64| Cursor::new(&code, ip).classify(at, None);
        let want = |addr, len, kind, prefixes| {
            Ok(SiteInsn {
                addr,
                len,
                kind,
                prefixes,
            })
        };
        assert_eq!(site(0x1001), want(0x1000, 5, SiteKind::Call, 0));
        assert_eq!(site(0x1007), want(0x1005, 6, SiteKind::Jmp, 1));
        assert_eq!(site(0x100d), want(0x100b, 6, SiteKind::Jcc, 0));
        assert!(site(0x1014).is_err());
        assert!(site(0xfff).is_err(), "before the function");
        assert!(site(0x1018).is_err(), "past the function");
        // One cursor asked forwards, backwards and out of order answers as fresh ones do.
        let order = [
            0x1001, 0x1007, 0x100d, 0x1014, 0x1018, 0x1007, 0xfff, 0x1001, 0x100d,
        ];
        let mut c = Cursor::new(&code, ip);
        for at in order {
            assert_eq!(c.classify(at, None), site(at), "{at:#x}");
        }
        for (at, kind, len) in [
            (0x1000, Some(SiteKind::Call), 5),
            (0x1005, Some(SiteKind::Jmp), 6),
            (0x100b, Some(SiteKind::Jcc), 6),
            (0x1011, None, 7),
        ] {
            let off = (at - ip) as usize;
            let i = decode_insn(&code[off..], at);
            assert_eq!((i.kind, i.len), (kind, len));
        }
        assert_eq!(decode_insn(&code, ip).branch_target, 0x1005);
        assert_eq!(plain_branch_start(0x1001), Some(0x1000));
        assert_eq!(branch_field_dest(&code[1..5], 0x1001), Some(0x1005));
    }

    /// What the decoder alone answers (no boundary fast path).
    fn decoded(code: &[u8], start: u64, at: u64, target: Option<u64>) -> Result<SiteInsn, String> {
        let mut c = Cursor::new(code, start);
        let Some(insn) = c.find(at) else {
            return Err("not inside a decodable instruction".into());
        };
        classify_insn(&insn, code, start, at, target)
    }

    /// Every relocation offset in and around `code`, with and without a branch target
    /// (the right one, a wrong one): the cursor answers as the decoder alone does.
    fn assert_same_as_decoder(code: &[u8], start: u64) -> usize {
        let mut fast = 0;
        for at in start.saturating_sub(2)..start + code.len() as u64 + 2 {
            let off = at.wrapping_sub(start) as usize;
            let dest = code
                .get(off..off.wrapping_add(4))
                .and_then(|f| branch_field_dest(f, at));
            for target in [None, dest, dest.map(|d| d ^ 1)] {
                let mut c = Cursor::new(code, start);
                fast += usize::from(c.at_boundary(at, target).is_some());
                assert_eq!(
                    c.classify(at, target),
                    decoded(code, start, at, target),
                    "{code:02x?} at {at:#x} target {target:x?}"
                );
            }
        }
        fast
    }

    #[test]
    fn boundary_branches_without_the_decoder_are_what_the_decoder_says() {
        let start = 0x4000;
        let mut fast = 0;
        for head in [
            &[][..],
            &ENDBR64[..],
            &ENDBR64[..3],
            &[0xf3][..],
            &[0x2e][..],
        ] {
            for op in [0xe8, 0xe9, 0xeb, 0x0f, 0x90] {
                for tail in [
                    &[][..],
                    &[1][..],
                    &[1, 2, 3][..],
                    &[0x10, 0, 0, 0x80, 0xc3][..],
                ] {
                    let code: Vec<u8> = head
                        .iter()
                        .copied()
                        .chain([op])
                        .chain(tail.iter().copied())
                        .collect();
                    fast += assert_same_as_decoder(&code, start);
                }
            }
        }
        // The fast path answered: `call`/`jmp` at the start and after `endbr64`.
        assert!(fast >= 8, "{fast}");
        // endbr64; call rel32 — the site starts after the endbr64.
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0xe8, 0, 0, 0, 0];
        let mut c = Cursor::new(&code, start);
        assert_eq!(
            c.classify(start + 5, Some(start + 9)),
            Ok(SiteInsn {
                addr: start + 4,
                len: 5,
                kind: SiteKind::Call,
                prefixes: 0
            })
        );
        assert!(c.dec.is_none(), "answered without the decoder");
        // A `call` after another instruction needs the decoder.
        let code = [0x90, 0xe8, 0, 0, 0, 0];
        let mut c = Cursor::new(&code, start);
        assert!(c.classify(start + 2, None).is_ok());
        assert!(c.dec.is_some());
    }

    proptest::proptest! {
        #[test]
        fn any_function_start_classifies_as_the_decoder_does(
            head in proptest::sample::select(vec![vec![], ENDBR64.to_vec()]),
            op in proptest::sample::select(vec![0xe8u8, 0xe9, 0x66, 0xf3]),
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
        ) {
            let code: Vec<u8> = head.into_iter().chain([op]).chain(rest).collect();
            assert_same_as_decoder(&code, 0x1000);
        }
    }

    #[test]
    fn trampolines() {
        let mut t = [0u8; TRAMPOLINE_LEN];
        t[..2].copy_from_slice(&JMP_RIP_INDIRECT);
        t[2..].copy_from_slice(&0x10i32.to_le_bytes());
        assert_eq!(trampoline_slot(&t, 0x2000), Some(0x2016));
        assert_eq!(trampoline_slot(&t[..5], 0x2000), None);
        assert_eq!(trampoline_slot(&NOP5, 0x2000), None);
        assert!(unsupported_plt_entry(&ENDBR64).is_some());
        assert!(unsupported_plt_entry(&t).is_none());
    }

    #[test]
    fn unlinked_probe_forms_are_the_linked_ones_with_a_zero_rel32() {
        let stubs = Stubs {
            c_entry: 0x5000,
            ret0: 0x5000,
            ret1: 0x6000,
        };
        for kind in [
            ProbeKind::CCall,
            ProbeKind::CTail,
            ProbeKind::CEnabled,
            ProbeKind::CEnabledTail,
        ] {
            let site = PSite {
                index: 0,
                addr: 0x5000 - PROBE_SITE_LEN as u64,
                target: 0,
                kind,
                probe: 0,
            };
            assert_eq!(
                disabled_probe_unlinked(kind),
                disabled_probe(&site, &stubs).ok(),
                "{kind:?}"
            );
        }
        assert_eq!(disabled_probe_unlinked(ProbeKind::RustJmp), None);
    }
}
