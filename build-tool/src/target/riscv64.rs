//! The riscv64 target (RV64GC): the one classification of call and tail-call sites
//! in every form a linker leaves them — an `auipc rX` + `jalr rd, lo(rX)` pair
//! (R_RISCV_CALL / CALL_PLT, relocation on the `auipc`: the site is the pair's first
//! byte), a `jal rd` (R_RISCV_JAL, or a relaxed CALL) and a compressed `c.j`
//! (R_RISCV_RVC_JUMP, or a relaxed tail CALL) — with `rd = ra` a call and `rd = x0` a
//! tail call, any other link register no site; conditional branches (`b<cond>`,
//! `c.beqz`/`c.bnez`, R_RISCV_BRANCH / RVC_BRANCH) as `jcc`-class references the loader
//! leaves on the trampoline; the `R_RISCV_*` relocation classes; the `auipc t1; ld t1;
//! jr t1` trampoline and its slot relocation in an object; the disabled probe forms;
//! the psABI argument registers of stapsdt notes (`a0`..`a7`) and the relocations
//! `embed` writes into a module.
//!
//! A site is always decoded from its bytes, never inferred from its relocation's type:
//! GNU ld and lld both rewrite a relaxed CALL's type to JAL/RVC_JUMP, but the bytes are
//! what runs. [`check_branch_reloc`] refuses a relocation on bytes its type cannot fill
//! (a CALL on anything but a pair or the relaxed `jal`/`c.j`), so the relocations and
//! the code never disagree silently. RV64 has no `c.jal` (its encoding is `c.addiw`).
//! The table's per-site `prefixes` field holds the form ([`FORM_PAIR`], [`FORM_JAL`],
//! [`FORM_CJ`]), whose length is the site's.

use kernel_loader::arch::ids;
use kernel_loader::format::{PSite, ProbeKind, SiteKind};
use kernel_loader::probe::ProbeError;
use object::elf;

use super::{Insn, RelocClass, SiteInsn};
use crate::elf::Reloc;

/// Length of a probe site: one 4-byte instruction.
pub const PROBE_SITE_LEN: usize = 4;
/// Length of the trampoline: `auipc t1; ld t1; jr t1`, uncompressed.
pub const TRAMPOLINE_LEN: usize = 12;
/// `addi x0, x0, 0`.
const NOP: u32 = 0x0000_0013;

/// Form of an `auipc`+`jalr` pair site (8 bytes).
pub const FORM_PAIR: u8 = 0;
/// Form of a `jal` site (4 bytes).
pub const FORM_JAL: u8 = 1;
/// Form of a `c.j` site (2 bytes).
pub const FORM_CJ: u8 = 2;

/// GNU ld for this target on a host of another architecture.
pub const CROSS_GNU_LD: &str = "riscv64-linux-gnu-ld";
/// The ELF machine.
pub const E_MACHINE: u16 = elf::EM_RISCV.0;
/// The `.ksites` header's architecture field.
pub const TABLE_ARCH: u16 = ids::RISCV64;
/// Human name, for messages.
pub const NAME: &str = "riscv64";
/// A branch's "field" is its whole site, read from the relocation: up to an
/// `auipc`+`jalr` pair.
pub const BRANCH_FIELD_LEN: u64 = 8;
/// The trampoline's slot relocation (R_RISCV_PCREL_HI20) is on its `auipc`.
pub const TRAMPOLINE_SLOT_FIELD: u64 = 0;
/// The psABI integer argument registers, as stapsdt argument strings name them
/// (`8@a0`, as gcc's `sys/sdt.h` writes them for RISC-V).
pub const ARG_REGISTERS: [&str; 8] = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"];
/// The relocation of a self-relative 32-bit table field (`S + A - P`).
pub const TABLE_RELOC: u32 = elf::R_RISCV_32_PCREL.0;
/// The relocation of a branch to a symbol, and its addend (0: offsets are from the
/// instruction itself): `jal`.
pub const BRANCH_RELOC: (u32, i64) = (elf::R_RISCV_JAL.0, 0);
/// No relocation.
pub const NONE_RELOC: u32 = elf::R_RISCV_NONE.0;
/// A 64-bit absolute address.
pub const ABS64_RELOC: u32 = elf::R_RISCV_64.0;
/// The IRELATIVE relocation of a GNU ifunc's slot.
pub const IRELATIVE_RELOC: u32 = elf::R_RISCV_IRELATIVE.0;
/// The dynamic relocation of an absolute pointer in a position-independent image.
pub const RELATIVE_RELOC: u32 = elf::R_RISCV_RELATIVE.0;
/// Length of a GNU ifunc's PLT entry: `auipc t3; ld t3; jalr t1, t3; nop`.
pub const PLT_ENTRY_LEN: usize = 16;

/// What a raw relocation type is. The PC-relative ones in code (branches, calls, and
/// the `auipc` of an address taken) are [`RelocClass::Branch`]: decoding tells a site
/// from anything else. A PCREL_LO12 names the `auipc`'s label, not the target: other.
#[inline]
pub fn reloc_class(t: u32) -> RelocClass {
    match elf::RelocationType(t) {
        elf::R_RISCV_CALL
        | elf::R_RISCV_CALL_PLT
        | elf::R_RISCV_JAL
        | elf::R_RISCV_BRANCH
        | elf::R_RISCV_RVC_JUMP
        | elf::R_RISCV_RVC_BRANCH
        | elf::R_RISCV_PCREL_HI20
        | elf::R_RISCV_32_PCREL => RelocClass::Branch,
        elf::R_RISCV_GOT_HI20 => RelocClass::Got,
        elf::R_RISCV_64 | elf::R_RISCV_32 | elf::R_RISCV_HI20 => RelocClass::Absolute,
        elf::R_RISCV_IRELATIVE => RelocClass::IRelative,
        elf::R_RISCV_NONE => RelocClass::None,
        _ => RelocClass::Other,
    }
}

/// The address a relocation refers to: `S + A` (offsets are from the instruction the
/// relocation is on), the symbol itself through the GOT.
#[inline]
pub fn reloc_target(r: &Reloc) -> u64 {
    match reloc_class(r.r_type) {
        RelocClass::Got => r.sym_value,
        _ => r.sym_value.wrapping_add_signed(r.addend),
    }
}

/// `R_RISCV_*` name.
pub fn reloc_name(t: u32) -> &'static str {
    match elf::RelocationType(t) {
        elf::R_RISCV_NONE => "R_RISCV_NONE",
        elf::R_RISCV_32 => "R_RISCV_32",
        elf::R_RISCV_64 => "R_RISCV_64",
        elf::R_RISCV_RELATIVE => "R_RISCV_RELATIVE",
        elf::R_RISCV_BRANCH => "R_RISCV_BRANCH",
        elf::R_RISCV_JAL => "R_RISCV_JAL",
        elf::R_RISCV_CALL => "R_RISCV_CALL",
        elf::R_RISCV_CALL_PLT => "R_RISCV_CALL_PLT",
        elf::R_RISCV_GOT_HI20 => "R_RISCV_GOT_HI20",
        elf::R_RISCV_PCREL_HI20 => "R_RISCV_PCREL_HI20",
        elf::R_RISCV_PCREL_LO12_I => "R_RISCV_PCREL_LO12_I",
        elf::R_RISCV_PCREL_LO12_S => "R_RISCV_PCREL_LO12_S",
        elf::R_RISCV_HI20 => "R_RISCV_HI20",
        elf::R_RISCV_LO12_I => "R_RISCV_LO12_I",
        elf::R_RISCV_LO12_S => "R_RISCV_LO12_S",
        elf::R_RISCV_ALIGN => "R_RISCV_ALIGN",
        elf::R_RISCV_RVC_BRANCH => "R_RISCV_RVC_BRANCH",
        elf::R_RISCV_RVC_JUMP => "R_RISCV_RVC_JUMP",
        elf::R_RISCV_RELAX => "R_RISCV_RELAX",
        elf::R_RISCV_32_PCREL => "R_RISCV_32_PCREL",
        elf::R_RISCV_IRELATIVE => "R_RISCV_IRELATIVE",
        _ => "R_RISCV_?",
    }
}

/// ABI names of the integer registers.
const REG_NAMES: [&str; 32] = [
    "zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2", "a3", "a4",
    "a5", "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "t3", "t4",
    "t5", "t6",
];
/// `ra` (x1), the link register of a call.
const RA: u32 = 1;
/// `t1` (x6), the trampoline's scratch register.
const T1: u32 = 6;
/// `t3` (x28), the PLT entry's scratch register.
const T3: u32 = 28;

/// Opcodes (bits 0..7 of a 32-bit instruction).
const OP_AUIPC: u32 = 0x17;
const OP_JAL: u32 = 0x6f;
const OP_JALR: u32 = 0x67;
const OP_BRANCH: u32 = 0x63;
const OP_LOAD: u32 = 0x03;
/// `ld`'s funct3.
const F3_LD: u32 = 3;

fn rd(i: u32) -> u32 {
    (i >> 7) & 0x1f
}
fn rs1(i: u32) -> u32 {
    (i >> 15) & 0x1f
}
fn funct3(i: u32) -> u32 {
    (i >> 12) & 7
}
/// The sign-extended I-type immediate.
fn imm_i(i: u32) -> i64 {
    i64::from((i as i32) >> 20)
}
/// The `auipc`/`lui` immediate, shifted into place and sign-extended.
fn imm_u(i: u32) -> i64 {
    i64::from((i & 0xffff_f000) as i32)
}
/// The J-type (`jal`) offset.
fn imm_j(i: u32) -> i64 {
    let v = ((i >> 31) & 1) << 20
        | ((i >> 12) & 0xff) << 12
        | ((i >> 20) & 1) << 11
        | ((i >> 21) & 0x3ff) << 1;
    i64::from(((v << 11) as i32) >> 11)
}
/// The B-type (conditional branch) offset.
fn imm_b(i: u32) -> i64 {
    let v = ((i >> 31) & 1) << 12
        | ((i >> 7) & 1) << 11
        | ((i >> 25) & 0x3f) << 5
        | ((i >> 8) & 0xf) << 1;
    i64::from(((v << 19) as i32) >> 19)
}
/// The CJ-type (`c.j`) offset.
fn imm_cj(h: u16) -> i64 {
    let h = u32::from(h);
    let v = ((h >> 12) & 1) << 11
        | ((h >> 11) & 1) << 4
        | ((h >> 9) & 3) << 8
        | ((h >> 8) & 1) << 10
        | ((h >> 7) & 1) << 6
        | ((h >> 6) & 1) << 7
        | ((h >> 3) & 7) << 1
        | ((h >> 2) & 1) << 5;
    i64::from(((v << 20) as i32) >> 20)
}
/// The CB-type (`c.beqz`/`c.bnez`) offset.
fn imm_cb(h: u16) -> i64 {
    let h = u32::from(h);
    let v = ((h >> 12) & 1) << 8
        | ((h >> 10) & 3) << 3
        | ((h >> 5) & 3) << 6
        | ((h >> 3) & 3) << 1
        | ((h >> 2) & 1) << 5;
    i64::from(((v << 23) as i32) >> 23)
}

/// The 16-bit parcel at `off` of `code`.
fn parcel(code: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(code.get(off..off + 2)?.try_into().ok()?))
}

/// The instruction at `off` of `code`: a 32-bit one (low bits `11`), or a compressed
/// one as `Err(parcel)`. `None` if truncated (or a longer encoding RV64GC lacks).
fn insn_at(code: &[u8], off: usize) -> Option<Result<u32, u16>> {
    let lo = parcel(code, off)?;
    if lo & 3 != 3 {
        return Some(Err(lo));
    }
    if lo & 0x1c == 0x1c {
        // 48-bit and longer encodings: none in RV64GC.
        return None;
    }
    let hi = parcel(code, off + 2)?;
    Some(Ok(u32::from(lo) | u32::from(hi) << 16))
}

/// What one decoded instruction (or `auipc`+`jalr` pair) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoded {
    /// `auipc rx, hi` + `jalr rd, lo(rx)`: link register `rd`, to `dest`.
    Pair { rx: u32, rd: u32, dest: u64 },
    /// `jal rd, dest`.
    Jal { rd: u32, dest: u64 },
    /// `c.j dest`.
    CJ { dest: u64 },
    /// `b<cond>` (4 bytes) to `dest`.
    Branch { mnemonic: &'static str, dest: u64 },
    /// `c.beqz`/`c.bnez` to `dest`.
    CBranch { mnemonic: &'static str, dest: u64 },
    /// An `auipc` not followed by a `jalr` through its register.
    Auipc { rx: u32 },
    /// Any other 32-bit instruction.
    Other32(u32),
    /// Any other compressed instruction.
    Other16(u16),
}

impl Decoded {
    /// Length in bytes.
    fn len(self) -> usize {
        match self {
            Decoded::Pair { .. } => 8,
            Decoded::Jal { .. } | Decoded::Branch { .. } | Decoded::Auipc { .. } => 4,
            Decoded::Other32(_) => 4,
            Decoded::CJ { .. } | Decoded::CBranch { .. } | Decoded::Other16(_) => 2,
        }
    }

    /// The site kind and form, if it is a call (`rd = ra`) or tail call (`rd = x0`),
    /// or a conditional branch (`jcc`, form 0: never patched).
    fn site(self) -> Option<(SiteKind, u8, u64)> {
        let link = |rd| match rd {
            RA => Some(SiteKind::Call),
            0 => Some(SiteKind::Jmp),
            _ => None,
        };
        match self {
            Decoded::Pair { rd, dest, .. } => Some((link(rd)?, FORM_PAIR, dest)),
            Decoded::Jal { rd, dest } => Some((link(rd)?, FORM_JAL, dest)),
            Decoded::CJ { dest } => Some((SiteKind::Jmp, FORM_CJ, dest)),
            Decoded::Branch { dest, .. } | Decoded::CBranch { dest, .. } => {
                Some((SiteKind::Jcc, 0, dest))
            }
            _ => None,
        }
    }

    /// Where it branches, if it is a direct branch.
    fn dest(self) -> Option<u64> {
        match self {
            Decoded::Pair { dest, .. }
            | Decoded::Jal { dest, .. }
            | Decoded::CJ { dest }
            | Decoded::Branch { dest, .. }
            | Decoded::CBranch { dest, .. } => Some(dest),
            _ => None,
        }
    }

    /// The instruction for messages.
    fn describe(self) -> String {
        let r = |x: u32| REG_NAMES[x as usize & 31];
        match self {
            Decoded::Pair { rx, rd, dest } => {
                format!("auipc {} + jalr {}, {} {dest:#x}", r(rx), r(rd), r(rx))
            }
            Decoded::Jal { rd, dest } => format!("jal {}, {dest:#x}", r(rd)),
            Decoded::CJ { dest } => format!("c.j {dest:#x}"),
            Decoded::Branch { mnemonic, dest } | Decoded::CBranch { mnemonic, dest } => {
                format!("{mnemonic} {dest:#x}")
            }
            Decoded::Auipc { rx } => format!("auipc {} (no jalr through it follows)", r(rx)),
            Decoded::Other32(i) => format!("instruction {i:#010x}"),
            Decoded::Other16(h) => format!("compressed instruction {h:#06x}"),
        }
    }
}

/// Decodes the instruction at `code[0..]`, at address `pc` (a pair when an `auipc rX`
/// is followed by `jalr rd, lo(rX)`).
fn decode(code: &[u8], pc: u64) -> Option<Decoded> {
    let i = match insn_at(code, 0)? {
        Err(h) => {
            let q1 = h & 3 == 1;
            let f3 = h >> 13;
            return Some(match (q1, f3) {
                (true, 5) => Decoded::CJ {
                    dest: pc.wrapping_add_signed(imm_cj(h)),
                },
                (true, 6 | 7) => Decoded::CBranch {
                    mnemonic: if f3 == 6 { "c.beqz" } else { "c.bnez" },
                    dest: pc.wrapping_add_signed(imm_cb(h)),
                },
                _ => Decoded::Other16(h),
            });
        }
        Ok(i) => i,
    };
    Some(match i & 0x7f {
        OP_AUIPC => {
            let rx = rd(i);
            let next = match insn_at(code, 4) {
                Some(Ok(j)) => Some(j),
                _ => None,
            };
            match next {
                Some(j) if rx != 0 && j & 0x7f == OP_JALR && funct3(j) == 0 && rs1(j) == rx => {
                    Decoded::Pair {
                        rx,
                        rd: rd(j),
                        dest: pc.wrapping_add_signed(imm_u(i)).wrapping_add_signed(imm_i(j)),
                    }
                }
                _ => Decoded::Auipc { rx },
            }
        }
        OP_JAL => Decoded::Jal {
            rd: rd(i),
            dest: pc.wrapping_add_signed(imm_j(i)),
        },
        OP_BRANCH => {
            let mnemonic = match funct3(i) {
                0 => "beq",
                1 => "bne",
                4 => "blt",
                5 => "bge",
                6 => "bltu",
                7 => "bgeu",
                _ => return Some(Decoded::Other32(i)),
            };
            Decoded::Branch {
                mnemonic,
                dest: pc.wrapping_add_signed(imm_b(i)),
            }
        }
        _ => Decoded::Other32(i),
    })
}

/// Where the site whose relocation is at `at` (its bytes `field`, up to a pair) goes:
/// a pair, `jal` or `c.j` at a 2-byte boundary; `None` for anything else.
pub fn branch_field_dest(field: &[u8], at: u64) -> Option<u64> {
    if !at.is_multiple_of(2) {
        return None;
    }
    match decode(field, at)? {
        d @ (Decoded::Pair { .. } | Decoded::Jal { .. } | Decoded::CJ { .. }) => d.dest(),
        _ => None,
    }
}

/// The first byte of the site whose relocation is at `field_at`: the same address
/// (the relocation is on the `auipc`, `jal` or `c.j`), if it is a 2-byte boundary.
pub fn plain_branch_start(field_at: u64) -> Option<u64> {
    field_at.is_multiple_of(2).then_some(field_at)
}

/// Applies a [`TABLE_RELOC`] (`S + A - P`, a signed 32-bit field) to the start of
/// `place`, as the module loader does.
pub fn apply_table_reloc(place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), String> {
    let v = s.wrapping_add_signed(a).wrapping_sub(p) as i64;
    let v = i32::try_from(v).map_err(|_| {
        format!("R_RISCV_32_PCREL: {v:#x} does not fit in a signed 32-bit field")
    })?;
    let field = place
        .get_mut(..4)
        .ok_or("R_RISCV_32_PCREL: the field is past the end of its section")?;
    field.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

/// The 32-bit instructions of `bytes` (`n` of them), if all are uncompressed.
fn words<const N: usize>(bytes: &[u8]) -> Option<[u32; N]> {
    let mut out = [0; N];
    for (k, w) in out.iter_mut().enumerate() {
        *w = insn_at(bytes, 4 * k)?.ok()?;
    }
    Some(out)
}

/// The slot a trampoline (`auipc t1, hi; ld t1, lo(t1); jr t1`, `bytes` at `at`) jumps
/// through, or `None` if it is not one.
pub fn trampoline_slot(bytes: &[u8], at: u64) -> Option<u64> {
    let [auipc, ld, jr] = words::<3>(bytes)?;
    let ok = auipc & 0xfff == (T1 << 7 | OP_AUIPC)
        && ld & 0x7f == OP_LOAD
        && funct3(ld) == F3_LD
        && rd(ld) == T1
        && rs1(ld) == T1
        && jr == (T1 << 15 | OP_JALR);
    ok.then(|| at.wrapping_add_signed(imm_u(auipc)).wrapping_add_signed(imm_i(ld)))
}

/// Whether `bytes` are the trampoline's form whatever its offsets (in an object they
/// are 0 until linked).
pub fn is_trampoline_form(bytes: &[u8]) -> bool {
    trampoline_slot(bytes, 0).is_some()
}

/// Whether a relocation of type `t` on the trampoline's `auipc` reaches its slot.
pub fn is_trampoline_slot_reloc(t: u32) -> bool {
    elf::RelocationType(t) == elf::R_RISCV_PCREL_HI20
}

/// The trampoline's form for messages.
pub fn trampoline_text(slot: Option<u64>) -> String {
    match slot {
        Some(s) => format!("`auipc t1, %pcrel_hi({s:#x}); ld t1, %pcrel_lo(1b)(t1); jr t1`"),
        None => "`auipc t1, %pcrel_hi(slot); ld t1, %pcrel_lo(1b)(t1); jr t1`".to_string(),
    }
}

/// The slot a GNU ifunc's PLT entry (`auipc t3, hi; ld t3, lo(t3); jalr t1, t3; nop`,
/// `bytes` at `at`) jumps through.
pub fn plt_slot(bytes: &[u8], at: u64) -> Option<u64> {
    let [auipc, ld, jalr, nop] = words::<4>(bytes)?;
    let ok = auipc & 0xfff == (T3 << 7 | OP_AUIPC)
        && ld & 0x7f == OP_LOAD
        && funct3(ld) == F3_LD
        && rd(ld) == T3
        && rs1(ld) == T3
        && jalr == (T3 << 15 | T1 << 7 | OP_JALR)
        && nop == NOP;
    ok.then(|| at.wrapping_add_signed(imm_u(auipc)).wrapping_add_signed(imm_i(ld)))
}

/// Every PLT form riscv64 linkers write for a static image is supported
/// ([`plt_slot`]).
pub fn unsupported_plt_entry(_entry: &[u8]) -> Option<&'static str> {
    None
}

/// riscv64 has no range-extension veneers (a pair reaches ±2 GiB).
pub fn veneer_target(_bytes: &[u8], _at: u64) -> Option<u64> {
    None
}

/// The disabled form of a `probe!` site and of a C probe call: `nop`.
pub const fn probe_nop() -> [u8; PROBE_SITE_LEN] {
    NOP.to_le_bytes()
}

/// The disabled instruction of a probe site of any kind.
pub fn disabled_probe(
    site: &PSite,
    _stubs: &kernel_loader::probe::Stubs,
) -> Result<[u8; PROBE_SITE_LEN], ProbeError> {
    match site.kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled | ProbeKind::CCall => Ok(probe_nop()),
        _ => Err(ProbeError::OutOfReach {
            site: site.addr,
            target: 0,
        }),
    }
}

/// The disabled instruction of a C probe site of `kind` in a relocatable object (`None`:
/// a `probe!` site, which holds its disabled form already).
pub fn disabled_probe_unlinked(kind: ProbeKind) -> Option<[u8; PROBE_SITE_LEN]> {
    match kind {
        ProbeKind::CCall => Some(probe_nop()),
        _ => None,
    }
}

/// The relocation (type, addend) the disabled form of a C probe site of `kind` needs.
pub const fn probe_stub_reloc(_kind: ProbeKind) -> Option<(u32, i64)> {
    None
}

/// Whether the site at `at` (`code` from there on) is one a relocation of type `t`
/// fills: a CALL/CALL_PLT an `auipc rX` + `jalr rd, lo(rX)` pair (or, relaxed by the
/// linker, a `jal` or `c.j`), a JAL a `jal`, an RVC_JUMP a `c.j`, a BRANCH a `b<cond>`,
/// an RVC_BRANCH a `c.beqz`/`c.bnez`; anything else is a malformed file. Other types
/// are not checked.
pub fn check_branch_reloc(t: u32, code: &[u8], at: u64) -> Result<(), String> {
    let want: &str = match elf::RelocationType(t) {
        elf::R_RISCV_CALL | elf::R_RISCV_CALL_PLT => "an `auipc`+`jalr` pair (or a relaxed `jal`/`c.j`)",
        elf::R_RISCV_JAL => "a `jal`",
        elf::R_RISCV_RVC_JUMP => "a `c.j`",
        elf::R_RISCV_BRANCH => "a conditional branch",
        elf::R_RISCV_RVC_BRANCH => "a `c.beqz`/`c.bnez`",
        _ => return Ok(()),
    };
    if !at.is_multiple_of(2) {
        return Err(format!(
            "is at {at:#x}, not on a 2-byte instruction boundary"
        ));
    }
    let Some(d) = decode(code, at) else {
        return Err("is past the end of its section".into());
    };
    let fits = match elf::RelocationType(t) {
        elf::R_RISCV_CALL | elf::R_RISCV_CALL_PLT => matches!(
            d,
            Decoded::Pair { .. } | Decoded::Jal { .. } | Decoded::CJ { .. }
        ),
        elf::R_RISCV_JAL => matches!(d, Decoded::Jal { .. }),
        elf::R_RISCV_RVC_JUMP => matches!(d, Decoded::CJ { .. }),
        elf::R_RISCV_BRANCH => matches!(d, Decoded::Branch { .. }),
        _ => matches!(d, Decoded::CBranch { .. }),
    };
    match fits {
        true => Ok(()),
        false => Err(format!("is on `{}`, not on {want}", d.describe())),
    }
}

/// A function's instructions: a relocation is on the first byte of its instruction
/// (the `auipc` of a pair), so the instruction holding one is read directly.
pub(super) struct Cursor<'c> {
    code: &'c [u8],
    start: u64,
}

impl<'c> Cursor<'c> {
    pub(super) fn new(code: &'c [u8], start: u64) -> Self {
        Cursor { code, start }
    }

    /// Classifies the instruction holding the relocation at `reloc_at`: a call or tail
    /// call in one of the three forms, or a conditional branch (branching to
    /// `target_addr`, when given), or what else it is.
    pub(super) fn classify(
        &mut self,
        reloc_at: u64,
        target_addr: Option<u64>,
    ) -> Result<SiteInsn, String> {
        if !reloc_at.is_multiple_of(2) {
            return Err(format!(
                "relocation at {reloc_at:#x} is not on a 2-byte instruction boundary"
            ));
        }
        let d = reloc_at
            .checked_sub(self.start)
            .and_then(|off| decode(self.code.get(usize::try_from(off).ok()?..)?, reloc_at));
        let Some(d) = d else {
            return Err("not inside a decodable instruction".into());
        };
        let Some((kind, form, dest)) = d.site() else {
            return Err(match d {
                Decoded::Pair { .. } | Decoded::Jal { .. } => {
                    format!("{} (links neither ra nor zero: no call or tail call)", d.describe())
                }
                _ => d.describe(),
            });
        };
        if target_addr.is_some_and(|t| t != dest) {
            return Err(format!(
                "{} whose offset does not reach the relocation's target",
                d.describe()
            ));
        }
        Ok(SiteInsn {
            addr: reloc_at,
            len: d.len() as u8,
            kind,
            prefixes: form,
        })
    }
}

/// Decodes the one instruction (or pair) at `ip` (`code` holds it).
pub fn decode_insn(code: &[u8], ip: u64) -> Insn {
    let d = decode(code, ip);
    let site = d.and_then(|d| d.site());
    Insn {
        addr: ip,
        len: d.map_or(2, |d| d.len()),
        kind: site.map(|s| s.0),
        branch_target: site.map_or(0, |s| s.2),
    }
}

/// The instruction at `ip` as text.
pub fn disasm(code: &[u8], ip: u64) -> String {
    match decode(code, ip) {
        Some(d) => d.describe(),
        None => format!("{} truncated bytes", code.len()),
    }
}

/// The code the generic engine's tests assemble objects from.
#[cfg(test)]
pub(crate) const SAMPLES: super::Samples = super::Samples {
    // `auipc ra, 0; jalr ra, 0(ra)`
    call: &[0x97, 0, 0, 0, 0xe7, 0x80, 0, 0],
    // `auipc t1, 0; jr t1`
    jmp: &[0x17, 0x03, 0, 0, 0x67, 0x00, 0x03, 0],
    // `bnez a0, .`
    jcc: &[0x63, 0x10, 0x05, 0],
    // `auipc a0, 0` (an address taken)
    not_branch: &[0x17, 0x05, 0, 0],
    // `addi sp, sp, -16`, `ret`
    other: &[0x13, 0x01, 0x01, 0xff, 0x67, 0x80, 0, 0],
    // `nop`
    nops: &[0x13, 0, 0, 0],
    trap: 0,
    zero_step: 2,
};

#[cfg(test)]
mod tests;
