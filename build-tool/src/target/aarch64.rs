//! The aarch64 target: the one classification of `bl`/`b` sites (R_AARCH64_CALL26 /
//! JUMP26, the relocation on the instruction itself: no bias, no prefixes), conditional
//! branches (`b.cond`/`cbz`/`tbz`, CONDBR19/TSTBR14) as `jcc`-class references, the
//! `R_AARCH64_*` relocation classes, the `adrp x16; ldr x16; br x16` trampoline and its
//! slot relocation in an object, linker range-extension veneers, the disabled probe
//! instructions, the AAPCS64 argument registers of stapsdt notes (`x0`..`x7`) and the
//! relocations `embed` writes into a module. Every encoding comes from
//! `kernel_loader::arch::aarch64` (never defined twice).

use kernel_loader::arch::ProbeSiteRef;
use kernel_loader::arch::aarch64::probe::{Stubs, site_bytes};
use kernel_loader::arch::aarch64::{
    B_OPCODE_MASK, BL, INSN_LEN, MAX_VENEER_LEN, NOP, branch_dest, cond_branch, insn_at, mnemonic,
};
pub use kernel_loader::arch::aarch64::{PROBE_SITE_LEN, TRAMPOLINE_LEN};
use kernel_loader::arch::ids;
use kernel_loader::format::{PSite, ProbeKind, SiteKind};
use kernel_loader::probe::ProbeError;
use object::elf;

use super::{Insn, RelocClass, SiteInsn};
use crate::elf::Reloc;

/// GNU ld for this target on a host of another architecture.
pub const CROSS_GNU_LD: &str = "aarch64-linux-gnu-ld";
/// The ELF machine.
pub const E_MACHINE: u16 = elf::EM_AARCH64.0;
/// The `.ksites` header's architecture field.
pub const TABLE_ARCH: u16 = ids::AARCH64;
/// Human name, for messages.
pub const NAME: &str = "aarch64";
/// A branch's "field" is its whole instruction (the imm26 shares the word with the
/// opcode), and the relocation sits on the instruction itself.
pub const BRANCH_FIELD_LEN: u64 = INSN_LEN as u64;
/// The trampoline's slot relocation (`R_AARCH64_ADR_PREL_PG_HI21`) is on its first
/// instruction, the `adrp`.
pub const TRAMPOLINE_SLOT_FIELD: u64 = 0;
/// The AAPCS64 argument registers, as SystemTap's stapsdt argument strings name them
/// (`8@x0`).
pub const ARG_REGISTERS: [&str; 8] = ["x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7"];
/// The relocation of a self-relative 32-bit table field (`S + A - P`).
pub const TABLE_RELOC: u32 = elf::R_AARCH64_PREL32.0;
/// The relocation of a `b` to a symbol, and its addend (0: the offset is from the
/// instruction itself).
pub const BRANCH_RELOC: (u32, i64) = (elf::R_AARCH64_JUMP26.0, 0);
/// The relocation of a `bl` to a symbol.
const CALL_RELOC: (u32, i64) = (elf::R_AARCH64_CALL26.0, 0);
/// No relocation.
pub const NONE_RELOC: u32 = elf::R_AARCH64_NONE.0;
/// A 64-bit absolute address.
pub const ABS64_RELOC: u32 = elf::R_AARCH64_ABS64.0;
/// The IRELATIVE relocation of a GNU ifunc's slot.
pub const IRELATIVE_RELOC: u32 = elf::R_AARCH64_IRELATIVE.0;
/// The dynamic relocation of an absolute pointer in a position-independent image.
pub const RELATIVE_RELOC: u32 = elf::R_AARCH64_RELATIVE.0;
/// Bytes a veneer may span ([`veneer_target`] reads this many, or what is left).
pub const VENEER_LEN: usize = MAX_VENEER_LEN;

/// What a raw relocation type is. The PC-relative ones in code (branches, and the
/// `adr`/`adrp` and literal loads that take an address) are [`RelocClass::Branch`]:
/// decoding the instruction tells a site from an address taken, as `lea` is told from
/// `call` on x86-64.
#[inline]
pub fn reloc_class(t: u32) -> RelocClass {
    match elf::RelocationType(t) {
        elf::R_AARCH64_CALL26
        | elf::R_AARCH64_JUMP26
        | elf::R_AARCH64_CONDBR19
        | elf::R_AARCH64_TSTBR14
        | elf::R_AARCH64_ADR_PREL_PG_HI21
        | elf::R_AARCH64_ADR_PREL_PG_HI21_NC
        | elf::R_AARCH64_ADR_PREL_LO21
        | elf::R_AARCH64_LD_PREL_LO19
        | elf::R_AARCH64_PREL32 => RelocClass::Branch,
        elf::R_AARCH64_ADR_GOT_PAGE
        | elf::R_AARCH64_LD64_GOT_LO12_NC
        | elf::R_AARCH64_LD64_GOTPAGE_LO15
        | elf::R_AARCH64_GOT_LD_PREL19 => RelocClass::Got,
        elf::R_AARCH64_ABS64
        | elf::R_AARCH64_ABS32
        | elf::R_AARCH64_MOVW_UABS_G0
        | elf::R_AARCH64_MOVW_UABS_G0_NC => RelocClass::Absolute,
        elf::R_AARCH64_IRELATIVE => RelocClass::IRelative,
        elf::R_AARCH64_NONE => RelocClass::None,
        _ => RelocClass::Other,
    }
}

/// The address a relocation refers to: `S + A` (a branch's offset is from the
/// instruction itself, where the relocation is), the symbol itself through the GOT.
#[inline]
pub fn reloc_target(r: &Reloc) -> u64 {
    match reloc_class(r.r_type) {
        RelocClass::Got => r.sym_value,
        _ => r.sym_value.wrapping_add_signed(r.addend),
    }
}

/// `R_AARCH64_*` name.
pub fn reloc_name(t: u32) -> &'static str {
    kernel_loader::arch::aarch64::reloc::name(t)
}

/// Where the `b`/`bl` `field` (its whole instruction) at `at` goes.
pub fn branch_field_dest(field: &[u8], at: u64) -> Option<u64> {
    let insn = u32::from_le_bytes(field.try_into().ok()?);
    branch_dest(insn, at)
}

/// The first byte of the `b`/`bl` whose relocation is at `field_at`: the same address,
/// if it is an instruction boundary.
pub fn plain_branch_start(field_at: u64) -> Option<u64> {
    field_at.is_multiple_of(INSN_LEN as u64).then_some(field_at)
}

/// Applies a [`TABLE_RELOC`] to the start of `place`, as the module loader does.
pub fn apply_table_reloc(place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), String> {
    kernel_loader::arch::aarch64::reloc::apply(TABLE_RELOC, place, s, a, p)
        .map_err(|e| e.to_string())
}

/// The slot a trampoline (`bytes` at `at`) jumps through, or `None` if it is not one.
pub fn trampoline_slot(bytes: &[u8], at: u64) -> Option<u64> {
    kernel_loader::arch::aarch64::trampoline_slot(bytes, at)
}

/// Whether `bytes` are the trampoline's form whatever its page and offset (in an
/// object the `adrp`/`ldr` immediates are 0 until linked, which at address 0 would
/// name the null slot): decoded at an address where any immediate names a valid slot.
pub fn is_trampoline_form(bytes: &[u8]) -> bool {
    trampoline_slot(bytes, 1 << 40).is_some()
}

/// Whether a relocation of type `t` on the trampoline's `adrp` reaches its slot's page.
pub fn is_trampoline_slot_reloc(t: u32) -> bool {
    matches!(
        elf::RelocationType(t),
        elf::R_AARCH64_ADR_PREL_PG_HI21 | elf::R_AARCH64_ADR_PREL_PG_HI21_NC
    )
}

/// The trampoline's form for messages.
pub fn trampoline_text(slot: Option<u64>) -> String {
    match slot {
        Some(s) => format!("`adrp x16; ldr x16, [x16, :lo12:{s:#x}]; br x16`"),
        None => "`adrp x16, slot; ldr x16, [x16, :lo12:slot]; br x16`".to_string(),
    }
}

/// Every PLT form aarch64 linkers write for a static image is supported
/// ([`plt_slot`]).
pub fn unsupported_plt_entry(_entry: &[u8]) -> Option<&'static str> {
    None
}

/// Length of a GNU ifunc's PLT entry.
pub const PLT_ENTRY_LEN: usize = kernel_loader::arch::aarch64::PLT_ENTRY_LEN;

/// The slot a GNU ifunc's PLT entry (`adrp x16; ldr x17, [x16, #off]; add x16, x16,
/// #off; br x17`, `bytes` at `at`) jumps through.
pub fn plt_slot(bytes: &[u8], at: u64) -> Option<u64> {
    kernel_loader::arch::aarch64::plt_slot(bytes, at)
}

/// Where the linker veneer `bytes` at `at` goes, if they are one.
pub fn veneer_target(bytes: &[u8], at: u64) -> Option<u64> {
    kernel_loader::arch::aarch64::veneer_target(bytes, at)
}

/// The disabled form of a `probe!` site and of a C probe call: `nop`.
pub const fn probe_nop() -> [u8; PROBE_SITE_LEN] {
    NOP.to_le_bytes()
}

/// The aarch64 stub addresses of `stubs` (the same three entry points).
fn stubs_of(stubs: &kernel_loader::probe::Stubs) -> Stubs {
    Stubs {
        c_entry: stubs.c_entry,
        ret0: stubs.ret0,
        ret1: stubs.ret1,
    }
}

/// The disabled instruction of a probe site of any kind.
pub fn disabled_probe(
    site: &PSite,
    stubs: &kernel_loader::probe::Stubs,
) -> Result<[u8; PROBE_SITE_LEN], ProbeError> {
    site_bytes(&site.arch_ref(), false, &stubs_of(stubs)).map_err(|e| ProbeError::OutOfReach {
        site: site.addr,
        target: e.target,
    })
}

/// The disabled instruction of a C probe site of `kind` in a relocatable object, a
/// branch's offset left 0 for the relocation [`probe_stub_reloc`] names (`None`: a
/// `probe!` site, which holds its disabled form already).
pub fn disabled_probe_unlinked(kind: ProbeKind) -> Option<[u8; PROBE_SITE_LEN]> {
    match kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => None,
        _ => {
            // At address 0 with every stub at 0: a branch's offset is 0.
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
            site_bytes(&site, false, &stubs).ok()
        }
    }
}

/// The relocation (type, addend) the disabled form of a C probe site of `kind` needs
/// to reach `ksites_probe_ret0`: the tail forms are `b ksites_probe_ret0`, the
/// is-enabled call `bl ksites_probe_ret0`; `None` for `nop`.
pub const fn probe_stub_reloc(kind: ProbeKind) -> Option<(u32, i64)> {
    match kind {
        ProbeKind::CTail | ProbeKind::CEnabledTail => Some(BRANCH_RELOC),
        ProbeKind::CEnabled => Some(CALL_RELOC),
        ProbeKind::CCall | ProbeKind::RustJmp | ProbeKind::RustEnabled => None,
    }
}

/// Whether the instruction at `at` (`code` from there on) is one a relocation of type
/// `t` fills: see [`super::Target::check_branch_reloc`]. Other types are not checked.
pub fn check_branch_reloc(t: u32, code: &[u8], at: u64) -> Result<(), String> {
    let want: &[&str] = match elf::RelocationType(t) {
        elf::R_AARCH64_CALL26 => &["bl"],
        elf::R_AARCH64_JUMP26 => &["b"],
        elf::R_AARCH64_CONDBR19 => &["b.cond", "cbz", "cbnz"],
        elf::R_AARCH64_TSTBR14 => &["tbz", "tbnz"],
        _ => return Ok(()),
    };
    if !at.is_multiple_of(INSN_LEN as u64) {
        return Err(format!(
            "is at {at:#x}, not on a 4-byte instruction boundary"
        ));
    }
    let Some(insn) = insn_at(code, 0) else {
        return Err("is past the end of its section".into());
    };
    match mnemonic(insn) {
        Some(m) if want.contains(&m) => Ok(()),
        _ => Err(format!(
            "is on `{}`, not on a `{}`",
            describe(insn, at),
            want.join("`/`")
        )),
    }
}

/// The one classification: the site kind and destination of `insn` at `pc`, if it is
/// a direct branch (`bl`, `b`, or a conditional one as [`SiteKind::Jcc`]).
fn branch_of(insn: u32, pc: u64) -> Option<(SiteKind, u64)> {
    if let Some(dest) = branch_dest(insn, pc) {
        let kind = match insn & B_OPCODE_MASK {
            BL => SiteKind::Call,
            _ => SiteKind::Jmp,
        };
        return Some((kind, dest));
    }
    cond_branch(insn, pc).map(|(_, dest)| (SiteKind::Jcc, dest))
}

/// The instruction `insn` for messages: its mnemonic (and destination), or its word.
fn describe(insn: u32, pc: u64) -> String {
    let dest = branch_dest(insn, pc).or_else(|| cond_branch(insn, pc).map(|c| c.1));
    match (mnemonic(insn), dest) {
        (Some(m), Some(d)) => format!("{m} {d:#x}"),
        (Some(m), None) => m.to_string(),
        (None, _) => format!("instruction {insn:#010x}"),
    }
}

/// A function's instructions: every instruction is 4 bytes at a 4-aligned address, so
/// the one holding a relocation is read directly (no decoding from the start).
pub(super) struct Cursor<'c> {
    code: &'c [u8],
    start: u64,
}

impl<'c> Cursor<'c> {
    pub(super) fn new(code: &'c [u8], start: u64) -> Self {
        Cursor { code, start }
    }

    /// Classifies the instruction holding the relocation at `reloc_at`: a patchable
    /// `bl`/`b` or a conditional branch (branching to `target_addr`, when given), or
    /// what else it is.
    pub(super) fn classify(
        &mut self,
        reloc_at: u64,
        target_addr: Option<u64>,
    ) -> Result<SiteInsn, String> {
        if !reloc_at.is_multiple_of(INSN_LEN as u64) {
            return Err(format!(
                "relocation at {reloc_at:#x} is not on a 4-byte instruction boundary"
            ));
        }
        let insn = reloc_at
            .checked_sub(self.start)
            .and_then(|off| insn_at(self.code.get(usize::try_from(off).ok()?..)?, 0));
        let Some(insn) = insn else {
            return Err("not inside a decodable instruction".into());
        };
        let Some((kind, dest)) = branch_of(insn, reloc_at) else {
            return Err(describe(insn, reloc_at));
        };
        if target_addr.is_some_and(|t| t != dest) {
            return Err(format!(
                "{} whose offset does not reach the relocation's target",
                describe(insn, reloc_at)
            ));
        }
        Ok(SiteInsn {
            addr: reloc_at,
            len: INSN_LEN as u8,
            kind,
            prefixes: 0,
        })
    }
}

/// Decodes the one instruction at `ip` (`code` holds it).
pub fn decode_insn(code: &[u8], ip: u64) -> Insn {
    let branch = insn_at(code, 0).and_then(|i| branch_of(i, ip));
    Insn {
        addr: ip,
        len: INSN_LEN,
        kind: branch.map(|b| b.0),
        branch_target: branch.map_or(0, |b| b.1),
    }
}

/// The instruction at `ip` as text.
pub fn disasm(code: &[u8], ip: u64) -> String {
    match insn_at(code, 0) {
        Some(i) => describe(i, ip),
        None => format!("{} truncated bytes", code.len()),
    }
}

/// The branch form of a static key site at `site`: `b target` (the enabled form of a
/// `probe!` site); `None` beyond ±128 MiB or misaligned.
pub fn key_branch(site: u64, target: u64) -> Option<[u8; PROBE_SITE_LEN]> {
    kernel_loader::arch::aarch64::branch_insn(site, target, false).map(u32::to_le_bytes)
}

/// Where the key site bytes `b` at `site` branch, if they are [`key_branch`]'s form
/// (a `b`, not a `bl`).
pub fn key_branch_dest(b: &[u8], site: u64) -> Option<u64> {
    let insn = u32::from_le_bytes(b.try_into().ok()?);
    (insn & B_OPCODE_MASK != BL)
        .then(|| branch_dest(insn, site))
        .flatten()
}

/// How far [`key_branch`] reaches, for messages.
pub const KEY_BRANCH_REACH: &str = "the ±128 MiB of a b";

/// `adrp x0, .` (a PC-relative instruction that is no branch).
#[cfg(test)]
const ADRP_X0: [u8; 4] = (kernel_loader::arch::aarch64::ADRP_X16 & !0x1f).to_le_bytes();

/// The code the generic engine's tests assemble objects from.
#[cfg(test)]
pub(crate) const SAMPLES: super::Samples = super::Samples {
    call: &[0, 0, 0, 0x94],
    jmp: &[0, 0, 0, 0x14],
    // `b.ne .`
    jcc: &[0x01, 0, 0, 0x54],
    // `adrp x0, .`
    not_branch: &ADRP_X0,
    // `stp x29, x30, [sp, #-16]!`, `ret`.
    other: &[0xfd, 0x7b, 0xbf, 0xa9, 0xc0, 0x03, 0x5f, 0xd6],
    // `nop`
    nops: &[0x1f, 0x20, 0x03, 0xd5],
    trap: 0,
    zero_step: 4,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_branch_is_b_and_bl_is_none() {
        assert_eq!(
            key_branch(0x1000, 0x1010),
            Some(0x1400_0004u32.to_le_bytes())
        );
        assert_eq!(
            key_branch(0x1010, 0x1000),
            Some(0x17ff_fffcu32.to_le_bytes())
        );
        assert_eq!(
            key_branch_dest(&0x1400_0004u32.to_le_bytes(), 0x1000),
            Some(0x1010)
        );
        assert_eq!(key_branch_dest(&0x9400_0004u32.to_le_bytes(), 0x1000), None);
        assert_eq!(key_branch_dest(&probe_nop(), 0x1000), None);
    }

    #[test]
    fn classification() {
        // bl .+8; b .-4; b.ne .+0x100; cbz x3, .-8; adrp x0, .; nop
        let words: [u32; 6] = [
            0x9400_0002,
            0x17ff_ffff,
            0x5400_0801,
            0xb4ff_ffc3,
            0x9000_0000,
            NOP,
        ];
        let code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let ip = 0x1000;
        let mut c = Cursor::new(&code, ip);
        let site = |addr, kind| {
            Ok(SiteInsn {
                addr,
                len: 4,
                kind,
                prefixes: 0,
            })
        };
        assert_eq!(
            c.classify(0x1000, Some(0x1008)),
            site(0x1000, SiteKind::Call)
        );
        assert_eq!(
            c.classify(0x1004, Some(0x1000)),
            site(0x1004, SiteKind::Jmp)
        );
        assert_eq!(
            c.classify(0x1008, Some(0x1108)),
            site(0x1008, SiteKind::Jcc)
        );
        assert_eq!(c.classify(0x100c, None), site(0x100c, SiteKind::Jcc));
        assert!(c.classify(0x1000, Some(0x100c)).is_err(), "wrong target");
        assert_eq!(c.classify(0x1010, None), Err("adrp".into()));
        assert!(c.classify(0x1002, None).unwrap_err().contains("boundary"));
        assert!(c.classify(0x1018, None).is_err(), "past the end");
        assert!(c.classify(0xffc, None).is_err(), "before the start");
        let i = decode_insn(&code[4..], 0x1004);
        assert_eq!(
            (i.kind, i.len, i.branch_target),
            (Some(SiteKind::Jmp), 4, 0x1000)
        );
        assert_eq!(decode_insn(&code[20..], 0x1014).kind, None);
        assert_eq!(disasm(&code, 0x1000), "bl 0x1008");
        assert_eq!(plain_branch_start(0x1004), Some(0x1004));
        assert_eq!(plain_branch_start(0x1005), None);
        assert_eq!(branch_field_dest(&code[..4], 0x1000), Some(0x1008));
        // Each branch relocation type on its own form only.
        let call = elf::R_AARCH64_CALL26.0;
        assert_eq!(check_branch_reloc(call, &code, 0x1000), Ok(()));
        assert!(
            check_branch_reloc(call, &code[4..], 0x1004)
                .unwrap_err()
                .contains("`bl`")
        );
        assert!(check_branch_reloc(elf::R_AARCH64_JUMP26.0, &code, 0x1000).is_err());
        assert_eq!(
            check_branch_reloc(elf::R_AARCH64_CONDBR19.0, &code[12..], 0x100c),
            Ok(())
        );
        assert!(check_branch_reloc(elf::R_AARCH64_TSTBR14.0, &code[12..], 0x100c).is_err());
        assert!(
            check_branch_reloc(call, &code[2..], 0x1002)
                .unwrap_err()
                .contains("boundary")
        );
        assert!(check_branch_reloc(call, &[], 0x1000).is_err());
        // Address-taking relocations are not branch forms: nothing to check.
        assert_eq!(
            check_branch_reloc(elf::R_AARCH64_ADR_PREL_PG_HI21.0, &code[16..], 0x1010),
            Ok(())
        );
    }

    #[test]
    fn unlinked_probe_forms_are_the_linked_ones_with_a_zero_offset() {
        for kind in [
            ProbeKind::CCall,
            ProbeKind::CTail,
            ProbeKind::CEnabled,
            ProbeKind::CEnabledTail,
        ] {
            let site = PSite {
                index: 0,
                addr: 0x5000,
                target: 0,
                kind,
                probe: 0,
            };
            let stubs = kernel_loader::probe::Stubs {
                c_entry: 0x9000,
                ret0: 0x5000,
                ret1: 0x6000,
            };
            assert_eq!(
                disabled_probe_unlinked(kind),
                disabled_probe(&site, &stubs).ok(),
                "{kind:?}"
            );
            // A form that branches needs the relocation, one that does not, none.
            let word = u32::from_le_bytes(disabled_probe_unlinked(kind).unwrap());
            assert_eq!(
                branch_dest(word, 0).is_some(),
                probe_stub_reloc(kind).is_some()
            );
        }
        assert_eq!(disabled_probe_unlinked(ProbeKind::RustJmp), None);
        assert_eq!(probe_nop(), [0x1f, 0x20, 0x03, 0xd5]);
    }

    #[test]
    fn trampoline_forms() {
        // The object's form (immediates 0) and a linked one.
        let t: Vec<u8> = kernel_loader::arch::aarch64::trampoline(0x1000, 0x2000)
            .unwrap()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(trampoline_slot(&t, 0x1000), Some(0x2000));
        assert!(is_trampoline_form(&t));
        let unlinked: Vec<u8> = kernel_loader::arch::aarch64::trampoline(0, 0)
            .unwrap()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert!(is_trampoline_form(&unlinked));
        assert!(!is_trampoline_form(&probe_nop()));
        assert!(is_trampoline_slot_reloc(elf::R_AARCH64_ADR_PREL_PG_HI21.0));
        assert!(!is_trampoline_slot_reloc(elf::R_AARCH64_CALL26.0));
    }
}
