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
//! The table's per-site `prefixes` field holds the form (`FORM_PAIR`, `FORM_JAL`,
//! `FORM_C_J`), whose length is the site's. What is a site is kernel-loader's
//! `arch::riscv64::decode_site` (the forms its patcher accepts, e.g. a tail-call pair
//! through `t1`); this module adds what is no site (branches, other link registers,
//! addresses taken), for reports. Every encoding of the forms, the trampoline and the
//! probe instructions comes from `kernel_loader::arch::riscv64` (never defined twice).

use kernel_loader::arch::ids;
use kernel_loader::arch::riscv64::probe::{CSiteError, c_site_disabled, site_bytes};
pub use kernel_loader::arch::riscv64::{FORM_C_J, FORM_JAL, FORM_PAIR};
use kernel_loader::arch::riscv64::{
    MAX_SITE_LEN, NOP, auipc_offset, c_j_offset, decode_site, i_imm, jal_offset, pair_dest, rd, rs1,
};
pub use kernel_loader::arch::riscv64::{PROBE_SITE_LEN, TRAMPOLINE_LEN};
use kernel_loader::format::{PSite, ProbeKind, SiteKind};
use kernel_loader::probe::{ProbeError, Stubs};
use object::elf;

use super::{CProbeRewrite, Insn, ProbeBytes, RelocClass, SiteInsn};
use crate::elf::Reloc;

/// The longest C probe call `embed` rewrites: an `auipc`+`jalr` pair.
pub const C_CALL_MAX: usize = MAX_SITE_LEN;
/// The C probe calls `embed` rewrites, for messages.
pub const C_PROBE_CALL_FORMS: &str =
    "an `auipc`+`jalr` pair or a 4-aligned `jal` (compile C with probes with -mno-relax)";

/// Why a `probe!` site at `site` cannot be patched: it is not 4-aligned. Built with
/// relaxation (rustc's `+relax`, gcc's default), `.p2align 2` before the site becomes a
/// `c.nop` plus an `R_RISCV_ALIGN` the linker resolves; an object embedded directly (a
/// module) keeps the site where the assembler put it, possibly at 2 mod 4.
pub fn probe_site_misaligned(site: u64) -> Option<String> {
    (!site.is_multiple_of(4)).then(|| {
        format!(
            "is at {site:#x}, not 4-aligned (relaxation padding, R_RISCV_ALIGN, left for a \
             linker): build with -C target-feature=-relax (Rust) or gcc -mno-relax (C)"
        )
    })
}

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
/// `t1` (x6), the PLT entry's link register.
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

fn funct3(i: u32) -> u32 {
    (i >> 12) & 7
}
/// The B-type (conditional branch) offset.
fn imm_b(i: u32) -> i64 {
    let v = ((i >> 31) & 1) << 12
        | ((i >> 7) & 1) << 11
        | ((i >> 25) & 0x3f) << 5
        | ((i >> 8) & 0xf) << 1;
    i64::from(((v << 19) as i32) >> 19)
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
            if let Some(off) = c_j_offset(h) {
                return Some(Decoded::CJ {
                    dest: pc.wrapping_add_signed(off),
                });
            }
            return Some(match (h & 3, h >> 13) {
                (1, f3 @ (6 | 7)) => Decoded::CBranch {
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
            let pair = match insn_at(code, 4) {
                Some(Ok(j)) => pair_dest(i, j, pc),
                _ => None,
            };
            match pair {
                Some((dest, rx, rd)) => Decoded::Pair { rx, rd, dest },
                None => Decoded::Auipc { rx: rd(i) },
            }
        }
        OP_JAL => Decoded::Jal {
            rd: rd(i),
            dest: pc.wrapping_add_signed(jal_offset(i).unwrap_or(0)),
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

/// The one classification: the site the bytes at `pc` are — kernel-loader's
/// `decode_site` (kind, form, destination, length) — or a conditional branch as a
/// `jcc` (form 0, never patched); `Err` with what else they are, for reports.
fn classify_at(code: &[u8], pc: u64) -> Result<(SiteKind, u8, u64, usize), String> {
    if let Some(s) = decode_site(code, pc) {
        return Ok((s.kind, s.form, s.target, usize::from(s.len)));
    }
    let Some(d) = decode(code, pc) else {
        return Err("not inside a decodable instruction".into());
    };
    match d {
        Decoded::Branch { dest, .. } | Decoded::CBranch { dest, .. } => {
            Ok((SiteKind::Jcc, FORM_PAIR, dest, d.len()))
        }
        Decoded::Pair { .. } | Decoded::Jal { .. } => Err(format!(
            "{} (not a call through ra nor a tail call through t1/zero: not patched)",
            d.describe()
        )),
        _ => Err(d.describe()),
    }
}

/// Where the site whose relocation is at `at` (its bytes `field`, up to a pair) goes:
/// a pair, `jal` or `c.j` at a 2-byte boundary; `None` for anything else.
pub fn branch_field_dest(field: &[u8], at: u64) -> Option<u64> {
    if !at.is_multiple_of(2) {
        return None;
    }
    match decode(field, at)? {
        Decoded::Pair { dest, .. } | Decoded::Jal { dest, .. } | Decoded::CJ { dest } => Some(dest),
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
    let v = i32::try_from(v)
        .map_err(|_| format!("R_RISCV_32_PCREL: {v:#x} does not fit in a signed 32-bit field"))?;
    let field = place
        .get_mut(..4)
        .ok_or("R_RISCV_32_PCREL: the field is past the end of its section")?;
    field.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

/// The slot a trampoline (`auipc t1, hi; ld t1, lo(t1); jr t1`, `bytes` at `at`) jumps
/// through, or `None` if it is not one.
pub fn trampoline_slot(bytes: &[u8], at: u64) -> Option<u64> {
    kernel_loader::arch::riscv64::trampoline_slot(bytes, at)
}

/// Whether `bytes` are the trampoline's form whatever its offsets (in an object they
/// are 0 until linked): decoded at an address where they name a valid (non-null,
/// 8-aligned) slot, if there is one.
pub fn is_trampoline_form(bytes: &[u8]) -> bool {
    (0..8).any(|k| trampoline_slot(bytes, (1 << 40) + k).is_some())
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

/// The 32-bit instructions of `bytes` (`N` of them), if all are uncompressed.
fn words<const N: usize>(bytes: &[u8]) -> Option<[u32; N]> {
    let mut out = [0; N];
    for (k, w) in out.iter_mut().enumerate() {
        *w = insn_at(bytes, 4 * k)?.ok()?;
    }
    Some(out)
}

/// The slot a GNU ifunc's PLT entry (`auipc t3, hi; ld t3, lo(t3); jalr t1, t3; nop`,
/// as GNU ld and lld write it; `bytes` at `at`) jumps through.
pub fn plt_slot(bytes: &[u8], at: u64) -> Option<u64> {
    let [auipc, ld, jalr, nop] = words::<4>(bytes)?;
    let ok = auipc & 0xfff == (T3 << 7 | OP_AUIPC)
        && ld & 0x7f == OP_LOAD
        && funct3(ld) == F3_LD
        && rd(ld) == T3
        && rs1(ld) == T3
        && jalr == (T3 << 15 | T1 << 7 | OP_JALR)
        && nop == NOP;
    ok.then(|| {
        at.wrapping_add_signed(auipc_offset(auipc))
            .wrapping_add_signed(i_imm(ld))
    })
}

/// Every PLT form riscv64 linkers write for a static image is supported
/// ([`plt_slot`]).
pub fn unsupported_plt_entry(_entry: &[u8]) -> Option<&'static str> {
    None
}

/// The disabled form of a `probe!` site and of a C probe call: `nop`.
pub const fn probe_nop() -> [u8; PROBE_SITE_LEN] {
    NOP.to_le_bytes()
}

/// The disabled instruction of a probe site of any kind (kernel-loader's table: `nop`,
/// `ret`, `li a0, 0`, `jal x0, ksites_probe_ret0`).
pub fn disabled_probe(site: &PSite, stubs: &Stubs) -> Result<[u8; PROBE_SITE_LEN], ProbeError> {
    site_bytes(&site.arch_ref(), false, stubs).map_err(|e| ProbeError::OutOfReach {
        site: site.addr,
        target: e.target,
    })
}

/// The disabled instruction of a C probe site of `kind` in a relocatable object, a
/// `jal`'s offset left 0 for the relocation [`probe_stub_reloc`] names (`None`: a
/// `probe!` site, which holds its disabled form already).
pub fn disabled_probe_unlinked(kind: ProbeKind) -> Option<[u8; PROBE_SITE_LEN]> {
    let r = c_site_disabled(kind, 0, PROBE_SITE_LEN, None).ok()?;
    r.as_slice().try_into().ok()
}

/// The relocation (type, addend) the disabled form of a C probe site of `kind` needs
/// to reach `ksites_probe_ret0`: the is-enabled tail call's `jal x0`.
pub const fn probe_stub_reloc(kind: ProbeKind) -> Option<(u32, i64)> {
    match kind {
        ProbeKind::CEnabledTail => Some(BRANCH_RELOC),
        _ => None,
    }
}

/// Whether a C probe call of `len` bytes in `form` can be rewritten: a pair or a `jal`
/// (a `c.j` has no room for a 4-byte site).
pub const fn c_probe_call_ok(len: u8, form: u8) -> bool {
    matches!((len, form), (8, FORM_PAIR) | (4, FORM_JAL))
}

/// The probe site of the C probe call whose relocation (on its first byte) is at
/// `reloc_at`: its first 4-aligned byte (kernel-loader's `c_site_disabled` puts it
/// there; a call at 2 mod 4 is an 8-byte pair, since a `jal` there is refused).
pub fn c_probe_site_of_reloc(reloc_at: u64) -> Option<u64> {
    reloc_at
        .is_multiple_of(2)
        .then(|| reloc_at.next_multiple_of(PROBE_SITE_LEN as u64))
}

/// How `embed` rewrites the C probe call of `kind`, `len` bytes at `call`
/// (kernel-loader's `c_site_disabled`: the site 4-aligned, padded with `nop`/`c.nop`).
pub fn c_probe_rewrite(
    kind: ProbeKind,
    call: u64,
    len: u8,
    stubs: Option<&Stubs>,
) -> Result<CProbeRewrite, String> {
    match c_site_disabled(kind, call, usize::from(len), stubs) {
        Ok(r) => Ok(CProbeRewrite {
            site: r.site,
            bytes: ProbeBytes::new(r.bytes).truncated(r.len),
        }),
        Err(CSiteError::Misaligned) => Err(format!(
            "a {len}-byte `jal` (a call the linker relaxed) at {call:#x}, which is not \
             4-aligned, leaves no room for the 4-aligned probe site: compile the C code with \
             probes with -mno-relax (or link with --no-relax)"
        )),
        Err(CSiteError::BadLength) => Err(format!(
            "a {len}-byte call is not one this tool rewrites: only {C_PROBE_CALL_FORMS}"
        )),
        Err(CSiteError::NotACall) => Err("a `probe!` site is no call".into()),
        Err(CSiteError::OutOfReach) => Err(format!(
            "its disabled form's `jal` does not reach `{}` (±1 MiB)",
            kernel_loader::probe::STUB_SYMBOLS[1]
        )),
    }
}

/// What is wrong with the bytes after a rewritten C probe site at `site` (`after`: from
/// `site + 4` on), if they still hold the second half of the call: a `jalr ra, lo(ra)`
/// or `jr lo(t1)` right after the disabled instruction would jump through a stale
/// register (the `nop` padding of a pair was lost).
pub fn c_probe_remnant(site: u64, after: &[u8]) -> Option<String> {
    let Some(Ok(j)) = insn_at(after, 0) else {
        return None;
    };
    let stale = j & 0x707f == OP_JALR && matches!((rd(j), rs1(j)), (1, 1) | (0, T1));
    stale.then(|| {
        format!(
            "the call's `jalr` at {:#x} follows the disabled site: the pair was not rewritten \
             whole",
            site + PROBE_SITE_LEN as u64
        )
    })
}

/// R_RISCV_RELAX goes with a C probe call's CALL relocation: dropped with it, so no
/// linker shrinks the rewritten bytes.
pub fn dropped_with_call(t: u32) -> bool {
    elf::RelocationType(t) == elf::R_RISCV_RELAX
}

/// Whether the site at `at` (`code` from there on) is one a relocation of type `t`
/// fills: a CALL/CALL_PLT an `auipc rX` + `jalr rd, lo(rX)` pair (or, relaxed by the
/// linker, a `jal` or `c.j`), a JAL a `jal`, an RVC_JUMP a `c.j`, a BRANCH a `b<cond>`,
/// an RVC_BRANCH a `c.beqz`/`c.bnez`; anything else is a malformed file. Other types
/// are not checked.
pub fn check_branch_reloc(t: u32, code: &[u8], at: u64) -> Result<(), String> {
    let want: &str = match elf::RelocationType(t) {
        elf::R_RISCV_CALL | elf::R_RISCV_CALL_PLT => {
            "an `auipc`+`jalr` pair (or a relaxed `jal`/`c.j`)"
        }
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

/// Length of the instruction whose first 2-byte parcel is `h`, from its low bits (the
/// base ISA's length encoding): 2 (compressed), 4, 6 or 8; the reserved longer
/// encodings count as one parcel.
fn insn_len(h: u16) -> usize {
    match h {
        _ if h & 3 != 3 => 2,
        _ if h & 0x1c != 0x1c => 4,
        _ if h & 0x3f == 0x1f => 6,
        _ if h & 0x7f == 0x3f => 8,
        _ => 2,
    }
}

/// A function's instructions, walked in 2-byte parcels from its first byte (each
/// instruction's length from its low bits), as the relocations in it are asked about:
/// in address order one forward pass; an earlier address restarts the walk. An address
/// inside an instruction is never classified (the upper half of a `lui` can look like a
/// `c.j`).
pub(super) struct Cursor<'c> {
    code: &'c [u8],
    start: u64,
    /// Offset of the next instruction boundary the walk has reached.
    pos: usize,
}

impl<'c> Cursor<'c> {
    pub(super) fn new(code: &'c [u8], start: u64) -> Self {
        Cursor {
            code,
            start,
            pos: 0,
        }
    }

    /// Walks to `off`: `Ok` if an instruction starts there, else `Err` with the start of
    /// the instruction holding it.
    fn walk_to(&mut self, off: usize) -> Result<(), usize> {
        if off < self.pos {
            self.pos = 0;
        }
        let mut last = self.pos;
        while self.pos < off {
            let Some(b) = self.code.get(self.pos..self.pos + 2) else {
                break;
            };
            last = self.pos;
            self.pos += insn_len(u16::from_le_bytes([b[0], b[1]]));
        }
        if self.pos == off { Ok(()) } else { Err(last) }
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
        let off = reloc_at
            .checked_sub(self.start)
            .and_then(|off| usize::try_from(off).ok())
            .filter(|&off| off < self.code.len())
            .ok_or("not inside a decodable instruction")?;
        if let Err(insn) = self.walk_to(off) {
            let at = self.start + insn as u64;
            return Err(format!(
                "inside the instruction at {at:#x} ({})",
                disasm(&self.code[insn..], at)
            ));
        }
        let code = &self.code[off..];
        let (kind, form, dest, len) = classify_at(code, reloc_at)?;
        if target_addr.is_some_and(|t| t != dest) {
            return Err(format!(
                "{} whose offset does not reach the relocation's target",
                disasm(code, reloc_at)
            ));
        }
        Ok(SiteInsn {
            addr: reloc_at,
            len: len as u8,
            kind,
            prefixes: form,
        })
    }
}

/// Decodes the one instruction (or pair) at `ip` (`code` holds it).
pub fn decode_insn(code: &[u8], ip: u64) -> Insn {
    match classify_at(code, ip) {
        Ok((kind, _, dest, len)) => Insn {
            addr: ip,
            len,
            kind: Some(kind),
            branch_target: dest,
        },
        Err(_) => Insn {
            addr: ip,
            len: decode(code, ip).map_or(2, |d| d.len()),
            kind: None,
            branch_target: 0,
        },
    }
}

/// The instruction at `ip` as text.
pub fn disasm(code: &[u8], ip: u64) -> String {
    match decode(code, ip) {
        Some(d) => d.describe(),
        None => format!("{} truncated bytes", code.len()),
    }
}

/// The branch form of a static key site at `site`: `jal x0, target` (the enabled form
/// of a `probe!` site); `None` beyond ±1 MiB or odd.
pub fn key_branch(site: u64, target: u64) -> Option<[u8; PROBE_SITE_LEN]> {
    kernel_loader::arch::riscv64::jal_to(0, site, target).map(u32::to_le_bytes)
}

/// Where the key site bytes `b` at `site` branch, if they are [`key_branch`]'s form
/// (a `jal` that links nothing).
pub fn key_branch_dest(b: &[u8], site: u64) -> Option<u64> {
    let insn = u32::from_le_bytes(b.try_into().ok()?);
    if rd(insn) != 0 {
        return None;
    }
    site.checked_add_signed(jal_offset(insn)?)
}

/// How far [`key_branch`] reaches, for messages.
pub const KEY_BRANCH_REACH: &str = "the ±1 MiB of a jal";

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
