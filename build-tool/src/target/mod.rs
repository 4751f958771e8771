//! The build tool's architecture seam. One [`Target`], chosen once from the ELF header's
//! `e_machine` (as the `object` crate maps raw relocation types to kinds in one `match`),
//! owns everything that depends on the instruction set: decoding a function and
//! classifying the instruction that holds a relocation (the one classification `scan`,
//! `embed` and `verify` share), relocation classes and their addend rules, the ifunc
//! trampoline and its slot, unsupported PLT forms, the disabled probe bytes, the stapsdt
//! argument registers, and the relocations `embed` writes into a module's table.
//!
//! Generic code (`sites`, `scan`, `verify`, `records`, `probes`, `table`, `inspect`)
//! asks the target and names no instruction byte, relocation type or register. Each
//! target is a module defining the same functions ([`x86_64`], [`aarch64`], [`riscv64`]).
//! Every method is an enum `match` the compiler inlines: no dynamic dispatch on the
//! per-relocation path.

pub mod aarch64;
pub mod riscv64;
pub mod x86_64;

use kernel_loader::format::{PSite, ProbeKind, SiteKind};
use kernel_loader::probe::{ProbeError, Stubs};

use crate::elf::Reloc;

/// The longest probe site of any target the tool supports, in bytes ([`ProbeBytes`]
/// holds up to this many). Each target's own length is [`Target::probe_site_len`], not
/// the host's: the tool processes any target's files on any host.
pub const PROBE_SITE_LEN: usize = max(
    x86_64::PROBE_SITE_LEN,
    max(aarch64::PROBE_SITE_LEN, riscv64::PROBE_SITE_LEN),
);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// The most bytes a C probe call's rewrite spans (riscv64's `auipc`+`jalr` pair).
pub const REWRITE_MAX: usize = max(PROBE_SITE_LEN, riscv64::C_CALL_MAX);

/// The bytes of one probe site ([`Target::probe_site_len`] of them), or of a rewritten
/// C probe call (up to [`REWRITE_MAX`]). Formats (`{:02x?}`) as the byte slice it holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeBytes {
    buf: [u8; REWRITE_MAX],
    len: u8,
}

impl ProbeBytes {
    /// The bytes of `b` (at most [`REWRITE_MAX`]).
    const fn new<const N: usize>(b: [u8; N]) -> ProbeBytes {
        let mut buf = [0; REWRITE_MAX];
        let mut i = 0;
        while i < N {
            buf[i] = b[i];
            i += 1;
        }
        ProbeBytes { buf, len: N as u8 }
    }
}

impl ProbeBytes {
    /// The first `len` bytes (all of them if `len` is larger).
    pub const fn truncated(mut self, len: usize) -> ProbeBytes {
        if len < self.len as usize {
            self.len = len as u8;
        }
        self
    }
}

impl std::fmt::Debug for ProbeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<ProbeBytes> for &[u8] {
    fn eq(&self, other: &ProbeBytes) -> bool {
        *self == &**other
    }
}

impl std::ops::Deref for ProbeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// What a static key site holds ([`Target::key_form`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyForm {
    /// The NOP: the site falls through.
    Nop,
    /// The branch form, to this address.
    Branch(u64),
    /// Neither.
    Other,
}

/// How `embed` rewrites one C probe call ([`Target::c_probe_rewrite`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CProbeRewrite {
    /// The probe site (what the table records).
    pub site: u64,
    /// The bytes written over the whole call, from its first byte.
    pub bytes: ProbeBytes,
}

/// An instruction set the build tool handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// x86-64, [`x86_64`].
    X86_64,
    /// aarch64, [`aarch64`].
    Aarch64,
    /// riscv64 (RV64GC), [`riscv64`].
    Riscv64,
}

/// The target of tables built with no ELF header to take it from (`table::build`, used
/// by tests and benches): x86-64, the first target (every ELF input names its own).
impl Default for Target {
    fn default() -> Self {
        Target::X86_64
    }
}

/// Every supported target, in the order messages list them.
pub const TARGETS: [Target; 3] = [Target::X86_64, Target::Aarch64, Target::Riscv64];

/// An ELF machine no [`Target`] handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedMachine(pub u16);

impl std::fmt::Display for UnsupportedMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "machine {} is not ", self.0)?;
        for (i, t) in TARGETS.iter().enumerate() {
            match i {
                0 => {}
                _ if i + 1 == TARGETS.len() => f.write_str(" or ")?,
                _ => f.write_str(", ")?,
            }
            f.write_str(t.name())?;
        }
        Ok(())
    }
}

impl std::error::Error for UnsupportedMachine {}

/// What a raw relocation type does, as far as site finding cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocClass {
    /// The PC-relative field of a direct branch (the target's branch relocation
    /// types). Other instructions may carry the same types (PC-relative data operands):
    /// decoding the instruction tells them apart.
    Branch,
    /// Reaches its symbol through the GOT.
    Got,
    /// The symbol's absolute address.
    Absolute,
    /// A GNU ifunc slot, filled with its resolver's result at startup.
    IRelative,
    /// No relocation (what `embed` turns a rewritten C probe call's relocation into).
    None,
    /// Anything else.
    Other,
}

/// One decoded instruction, as site checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Its address.
    pub addr: u64,
    /// Its length (prefixes included).
    pub len: usize,
    /// The site kind it is, if it is a patchable branch form.
    pub kind: Option<SiteKind>,
    /// Where it branches (0 if it is no direct branch).
    pub branch_target: u64,
}

/// A patchable branch site found by [`FunctionCursor::classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteInsn {
    /// Address of the first byte (prefixes included).
    pub addr: u64,
    /// Instruction length.
    pub len: u8,
    /// `call`, `jmp` or `jcc`.
    pub kind: SiteKind,
    /// Prefix bytes before the opcode.
    pub prefixes: u8,
}

/// One function's instructions, decoded from its first byte by
/// [`Target::function_cursor`] as [`FunctionCursor::classify`] asks about the relocations
/// in it (in address order: one forward pass; otherwise the function is decoded once
/// and searched).
pub struct FunctionCursor<'c> {
    inner: Cursor<'c>,
}

/// The target's cursor. Unboxed although x86-64's is much the larger: the site engine
/// keeps one cursor per function in place, and a box would be an allocation per
/// function on the x86-64 path.
#[allow(clippy::large_enum_variant)]
enum Cursor<'c> {
    X86_64(x86_64::Cursor<'c>),
    Aarch64(aarch64::Cursor<'c>),
    Riscv64(riscv64::Cursor<'c>),
}

impl std::fmt::Debug for FunctionCursor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionCursor").finish_non_exhaustive()
    }
}

impl FunctionCursor<'_> {
    /// Classifies the instruction of the function holding the relocated field at
    /// `reloc_at`: a patchable branch site (to `target_addr`, when given), or, as `Err`,
    /// what else it is, for reports (an address-taking `lea`, a branch whose field does
    /// not hold the relocation, …).
    #[inline]
    pub fn classify(
        &mut self,
        reloc_at: u64,
        target_addr: Option<u64>,
    ) -> Result<SiteInsn, String> {
        match &mut self.inner {
            Cursor::X86_64(c) => c.classify(reloc_at, target_addr),
            Cursor::Aarch64(c) => c.classify(reloc_at, target_addr),
            Cursor::Riscv64(c) => c.classify(reloc_at, target_addr),
        }
    }
}

impl Target {
    /// The target of an ELF file's `e_machine`.
    pub fn from_machine(e_machine: u16) -> Result<Target, UnsupportedMachine> {
        TARGETS
            .into_iter()
            .find(|t| t.e_machine() == e_machine)
            .ok_or(UnsupportedMachine(e_machine))
    }

    /// Human name (`x86-64`).
    pub const fn name(self) -> &'static str {
        match self {
            Target::X86_64 => x86_64::NAME,
            Target::Aarch64 => aarch64::NAME,
            Target::Riscv64 => riscv64::NAME,
        }
    }

    /// The ELF machine number.
    pub const fn e_machine(self) -> u16 {
        match self {
            Target::X86_64 => x86_64::E_MACHINE,
            Target::Aarch64 => aarch64::E_MACHINE,
            Target::Riscv64 => riscv64::E_MACHINE,
        }
    }

    /// The GNU ld program that links for this target: `ld.bfd` on a host of the same
    /// architecture, else the cross linker (`aarch64-linux-gnu-ld`).
    pub const fn gnu_ld(self) -> &'static str {
        match self {
            Target::X86_64 if cfg!(target_arch = "x86_64") => "ld.bfd",
            Target::Aarch64 if cfg!(target_arch = "aarch64") => "ld.bfd",
            Target::Riscv64 if cfg!(target_arch = "riscv64") => "ld.bfd",
            Target::X86_64 => x86_64::CROSS_GNU_LD,
            Target::Aarch64 => aarch64::CROSS_GNU_LD,
            Target::Riscv64 => riscv64::CROSS_GNU_LD,
        }
    }

    /// The `.ksites` header's architecture field for tables of this target.
    pub const fn table_arch(self) -> u16 {
        match self {
            Target::X86_64 => x86_64::TABLE_ARCH,
            Target::Aarch64 => aarch64::TABLE_ARCH,
            Target::Riscv64 => riscv64::TABLE_ARCH,
        }
    }

    /// What the raw relocation type `r_type` is.
    #[inline]
    pub fn reloc_class(self, r_type: u32) -> RelocClass {
        match self {
            Target::X86_64 => x86_64::reloc_class(r_type),
            Target::Aarch64 => aarch64::reloc_class(r_type),
            Target::Riscv64 => riscv64::reloc_class(r_type),
        }
    }

    /// Whether the instruction a relocation of type `r_type` sits on (`code` from
    /// `at` on) is one that relocation type can fill: on aarch64 a CALL26 must be on a
    /// 4-aligned `bl`, a JUMP26 on a `b`, a CONDBR19 on `b.cond`/`cbz`/`cbnz`, a TSTBR14
    /// on `tbz`/`tbnz`; anything else is a malformed file. (x86-64's PC32/PLT32 also
    /// fill data operands: nothing is checked there.)
    pub fn check_branch_reloc(self, r_type: u32, code: &[u8], at: u64) -> Result<(), String> {
        match self {
            Target::X86_64 => Ok(()),
            Target::Aarch64 => aarch64::check_branch_reloc(r_type, code, at),
            Target::Riscv64 => riscv64::check_branch_reloc(r_type, code, at),
        }
    }

    /// The name of a relocation type, for messages.
    pub fn reloc_name(self, r_type: u32) -> &'static str {
        match self {
            Target::X86_64 => x86_64::reloc_name(r_type),
            Target::Aarch64 => aarch64::reloc_name(r_type),
            Target::Riscv64 => riscv64::reloc_name(r_type),
        }
    }

    /// The address a relocation refers to: where a branch holding it goes (the
    /// architecture's bias applied, [`Target::branch_bias`]), the symbol itself for a GOT
    /// reference, otherwise `S + A`.
    #[inline]
    pub fn reloc_target(self, r: &Reloc) -> u64 {
        match self {
            Target::X86_64 => x86_64::reloc_target(r),
            Target::Aarch64 => aarch64::reloc_target(r),
            Target::Riscv64 => riscv64::reloc_target(r),
        }
    }

    /// Size of a branch's PC-relative field, as [`Target::branch_field_dest`] reads it.
    pub const fn branch_field_len(self) -> u64 {
        match self {
            Target::X86_64 => x86_64::BRANCH_FIELD_LEN,
            Target::Aarch64 => aarch64::BRANCH_FIELD_LEN,
            Target::Riscv64 => riscv64::BRANCH_FIELD_LEN,
        }
    }

    /// Where a branch whose PC-relative field (`field`, its bytes) is at `at` goes;
    /// `None` if `field` is not [`Target::branch_field_len`] bytes.
    pub fn branch_field_dest(self, field: &[u8], at: u64) -> Option<u64> {
        match self {
            Target::X86_64 => x86_64::branch_field_dest(field, at),
            Target::Aarch64 => aarch64::branch_field_dest(field, at),
            Target::Riscv64 => riscv64::branch_field_dest(field, at),
        }
    }

    /// The step between the places a branch field can start when code is searched for
    /// one: 2 on riscv64 (instructions are 2-byte aligned), 1 elsewhere.
    pub const fn branch_field_step(self) -> usize {
        match self {
            Target::Riscv64 => 2,
            _ => 1,
        }
    }

    /// Where the branch whose field is at `at` goes, its bytes read by `read(len)`: the
    /// longest field, or, at the end of a section, a shorter one (riscv64's 4-byte `jal`
    /// and 2-byte `c.j`).
    pub fn branch_dest_at<'d>(
        self,
        read: impl Fn(u64) -> Option<&'d [u8]>,
        at: u64,
    ) -> Option<u64> {
        let lens: &[u64] = match self {
            Target::Riscv64 => &[8, 4, 2],
            _ => &[self.branch_field_len()],
        };
        lens.iter()
            .find_map(|&n| read(n))
            .and_then(|f| self.branch_field_dest(f, at))
    }

    /// The first byte of a plain (prefix-less) call or jump whose branch field is at
    /// `field_at`.
    pub fn plain_branch_start(self, field_at: u64) -> Option<u64> {
        match self {
            Target::X86_64 => x86_64::plain_branch_start(field_at),
            Target::Aarch64 => aarch64::plain_branch_start(field_at),
            Target::Riscv64 => riscv64::plain_branch_start(field_at),
        }
    }

    /// The branch field of a plain (prefix-less) call or jump starting at `start`
    /// (the inverse of [`Target::plain_branch_start`]).
    pub const fn plain_branch_field(self, start: u64) -> u64 {
        match self {
            Target::X86_64 => start + x86_64::PLAIN_BRANCH_OPCODE_LEN,
            Target::Aarch64 | Target::Riscv64 => start,
        }
    }

    /// A cursor over `code`, a function starting at `start`, for
    /// [`FunctionCursor::classify`].
    #[inline]
    pub fn function_cursor(self, code: &[u8], start: u64) -> FunctionCursor<'_> {
        match self {
            Target::X86_64 => FunctionCursor {
                inner: Cursor::X86_64(x86_64::Cursor::new(code, start)),
            },
            Target::Aarch64 => FunctionCursor {
                inner: Cursor::Aarch64(aarch64::Cursor::new(code, start)),
            },
            Target::Riscv64 => FunctionCursor {
                inner: Cursor::Riscv64(riscv64::Cursor::new(code, start)),
            },
        }
    }

    /// Decodes the one instruction at `ip` (`code` holds it) and classifies it the same
    /// way [`FunctionCursor::classify`] does.
    pub fn decode_insn(self, code: &[u8], ip: u64) -> Insn {
        match self {
            Target::X86_64 => x86_64::decode_insn(code, ip),
            Target::Aarch64 => aarch64::decode_insn(code, ip),
            Target::Riscv64 => riscv64::decode_insn(code, ip),
        }
    }

    /// The instruction at `ip` as assembly text, for messages.
    pub fn disasm(self, code: &[u8], ip: u64) -> String {
        match self {
            Target::X86_64 => x86_64::disasm(code, ip),
            Target::Aarch64 => aarch64::disasm(code, ip),
            Target::Riscv64 => riscv64::disasm(code, ip),
        }
    }

    /// Length of an ifunc trampoline.
    pub const fn trampoline_len(self) -> usize {
        match self {
            Target::X86_64 => x86_64::TRAMPOLINE_LEN,
            Target::Aarch64 => aarch64::TRAMPOLINE_LEN,
            Target::Riscv64 => riscv64::TRAMPOLINE_LEN,
        }
    }

    /// The slot the trampoline `bytes` at `at` jumps through, or `None` if they are not
    /// a trampoline.
    pub fn trampoline_slot(self, bytes: &[u8], at: u64) -> Option<u64> {
        match self {
            Target::X86_64 => x86_64::trampoline_slot(bytes, at),
            Target::Aarch64 => aarch64::trampoline_slot(bytes, at),
            Target::Riscv64 => riscv64::trampoline_slot(bytes, at),
        }
    }

    /// Offset in a trampoline of its PC-relative slot field, which a relocation of
    /// [`RelocClass::Branch`] fills in an object (reaching the slot as
    /// [`Target::reloc_target`] says).
    pub const fn trampoline_slot_field(self) -> u64 {
        match self {
            Target::X86_64 => x86_64::TRAMPOLINE_SLOT_FIELD,
            Target::Aarch64 => aarch64::TRAMPOLINE_SLOT_FIELD,
            Target::Riscv64 => riscv64::TRAMPOLINE_SLOT_FIELD,
        }
    }

    /// The trampoline's form, for messages, jumping through `slot` (or a placeholder).
    pub fn trampoline_text(self, slot: Option<u64>) -> String {
        match self {
            Target::X86_64 => x86_64::trampoline_text(slot),
            Target::Aarch64 => aarch64::trampoline_text(slot),
            Target::Riscv64 => riscv64::trampoline_text(slot),
        }
    }

    /// Length of a GNU ifunc's PLT entry (on x86-64 the trampoline's form).
    pub const fn plt_entry_len(self) -> usize {
        match self {
            Target::X86_64 => x86_64::TRAMPOLINE_LEN,
            Target::Aarch64 => aarch64::PLT_ENTRY_LEN,
            Target::Riscv64 => riscv64::PLT_ENTRY_LEN,
        }
    }

    /// The slot a GNU ifunc's PLT entry (`bytes` at `at`) jumps through, or `None` if
    /// they are not one.
    pub fn plt_slot(self, bytes: &[u8], at: u64) -> Option<u64> {
        match self {
            Target::X86_64 => x86_64::trampoline_slot(bytes, at),
            Target::Aarch64 => aarch64::plt_slot(bytes, at),
            Target::Riscv64 => riscv64::plt_slot(bytes, at),
        }
    }

    /// The slot the ifunc entry at `at` jumps through: an `ifunc!` trampoline or a GNU
    /// ifunc's PLT entry, its bytes read by `read(len)`.
    pub fn entry_slot<'d>(self, read: impl Fn(u64) -> Option<&'d [u8]>, at: u64) -> Option<u64> {
        read(self.trampoline_len() as u64)
            .and_then(|b| self.trampoline_slot(b, at))
            .or_else(|| read(self.plt_entry_len() as u64).and_then(|b| self.plt_slot(b, at)))
    }

    /// Whether `bytes` are the trampoline's form whatever slot it names (in an object,
    /// before the slot relocation is applied).
    pub fn is_trampoline_form(self, bytes: &[u8]) -> bool {
        match self {
            Target::X86_64 => x86_64::trampoline_slot(bytes, 0).is_some(),
            Target::Aarch64 => aarch64::is_trampoline_form(bytes),
            Target::Riscv64 => riscv64::is_trampoline_form(bytes),
        }
    }

    /// Whether a relocation of type `r_type` at [`Target::trampoline_slot_field`] makes
    /// the trampoline reach its slot (at `S + A` plus [`Target::branch_bias`]).
    pub fn is_trampoline_slot_reloc(self, r_type: u32) -> bool {
        match self {
            Target::X86_64 => x86_64::reloc_class(r_type) == RelocClass::Branch,
            Target::Aarch64 => aarch64::is_trampoline_slot_reloc(r_type),
            Target::Riscv64 => riscv64::is_trampoline_slot_reloc(r_type),
        }
    }

    /// Whether the loader patches a branch site of `kind` on this target (aarch64 leaves
    /// conditional branches on the trampoline).
    pub const fn patches_site(self, kind: SiteKind) -> bool {
        match self {
            Target::X86_64 => true,
            Target::Aarch64 | Target::Riscv64 => !matches!(kind, SiteKind::Jcc),
        }
    }

    /// Longest linker range-extension veneer, in bytes (0: the target has none).
    pub const fn veneer_len(self) -> usize {
        match self {
            Target::X86_64 => 0,
            Target::Aarch64 => aarch64::VENEER_LEN,
            Target::Riscv64 => 0,
        }
    }

    /// Where the linker veneer `bytes` at `at` goes, if they are one.
    pub fn veneer_target(self, bytes: &[u8], at: u64) -> Option<u64> {
        match self {
            Target::X86_64 => None,
            Target::Aarch64 => aarch64::veneer_target(bytes, at),
            Target::Riscv64 => None,
        }
    }

    /// Why a GNU ifunc's PLT entry is of a form not supported yet, if it is.
    pub fn unsupported_plt_entry(self, entry: &[u8]) -> Option<&'static str> {
        match self {
            Target::X86_64 => x86_64::unsupported_plt_entry(entry),
            Target::Aarch64 => aarch64::unsupported_plt_entry(entry),
            Target::Riscv64 => riscv64::unsupported_plt_entry(entry),
        }
    }

    /// The length of a probe site ([`PROBE_SITE_LEN`]).
    pub const fn probe_site_len(self) -> usize {
        match self {
            Target::X86_64 => x86_64::PROBE_SITE_LEN,
            Target::Aarch64 => aarch64::PROBE_SITE_LEN,
            Target::Riscv64 => riscv64::PROBE_SITE_LEN,
        }
    }
    /// Why a `probe!` site recorded at `site` cannot be patched, when it is not aligned
    /// as the target's sites must be (riscv64: 4; linker relaxation's `R_RISCV_ALIGN`
    /// padding left in an object); `None` if it is, and on x86-64 and aarch64.
    pub fn probe_site_misaligned(self, site: u64) -> Option<String> {
        match self {
            Target::Riscv64 => riscv64::probe_site_misaligned(site),
            _ => None,
        }
    }

    /// The disabled form of a `probe!` site and of a C probe call.
    pub const fn probe_nop(self) -> ProbeBytes {
        match self {
            Target::X86_64 => ProbeBytes::new(x86_64::probe_nop()),
            Target::Aarch64 => ProbeBytes::new(aarch64::probe_nop()),
            Target::Riscv64 => ProbeBytes::new(riscv64::probe_nop()),
        }
    }

    /// The form a static key site holds as compiled, and while it falls through: the
    /// probe site's NOP ([`Target::probe_nop`]), [`Target::probe_site_len`] bytes,
    /// aligned as a probe site ([`Target::probe_site_misaligned`]).
    pub const fn key_nop(self) -> ProbeBytes {
        self.probe_nop()
    }

    /// The branch form of a static key site at `site` to its label `target` (x86-64
    /// `jmp rel32`, aarch64 `b`, riscv64 `jal x0`); `Err`: what it cannot reach.
    pub fn key_branch(self, site: u64, target: u64) -> Result<ProbeBytes, &'static str> {
        let (form, reach) = match self {
            Target::X86_64 => (
                x86_64::key_branch(site, target).map(ProbeBytes::new),
                x86_64::KEY_BRANCH_REACH,
            ),
            Target::Aarch64 => (
                aarch64::key_branch(site, target).map(ProbeBytes::new),
                aarch64::KEY_BRANCH_REACH,
            ),
            Target::Riscv64 => (
                riscv64::key_branch(site, target).map(ProbeBytes::new),
                riscv64::KEY_BRANCH_REACH,
            ),
        };
        form.ok_or(reach)
    }

    /// What the bytes `b` of a key site at `site` are: its NOP, its branch form (to
    /// where), or something else.
    pub fn key_form(self, b: &[u8], site: u64) -> KeyForm {
        if b == self.key_nop() {
            return KeyForm::Nop;
        }
        let dest = match self {
            Target::X86_64 => x86_64::key_branch_dest(b, site),
            Target::Aarch64 => aarch64::key_branch_dest(b, site),
            Target::Riscv64 => riscv64::key_branch_dest(b, site),
        };
        dest.map_or(KeyForm::Other, KeyForm::Branch)
    }

    /// The disabled bytes of a probe site of any kind (`stubs`: the image's entry
    /// points, for the forms that branch to one).
    pub fn disabled_probe(self, site: &PSite, stubs: &Stubs) -> Result<ProbeBytes, ProbeError> {
        match self {
            Target::X86_64 => x86_64::disabled_probe(site, stubs).map(ProbeBytes::new),
            Target::Aarch64 => aarch64::disabled_probe(site, stubs).map(ProbeBytes::new),
            Target::Riscv64 => riscv64::disabled_probe(site, stubs).map(ProbeBytes::new),
        }
    }

    /// The disabled bytes of a C probe site of `kind` in a relocatable object (branch
    /// fields left 0 for the relocation [`Target::probe_stub_reloc`] names); `None` for a
    /// `probe!` site, which needs no rewrite.
    pub fn disabled_probe_unlinked(self, kind: ProbeKind) -> Option<ProbeBytes> {
        match self {
            Target::X86_64 => x86_64::disabled_probe_unlinked(kind).map(ProbeBytes::new),
            Target::Aarch64 => aarch64::disabled_probe_unlinked(kind).map(ProbeBytes::new),
            Target::Riscv64 => riscv64::disabled_probe_unlinked(kind).map(ProbeBytes::new),
        }
    }

    /// Whether a call or jump of this length and form (`prefixes`) to a C probe
    /// function can be rewritten: on x86-64 and aarch64 a plain one exactly
    /// [`Target::probe_site_len`] long; on riscv64 an `auipc`+`jalr` pair or a `jal`.
    pub const fn c_probe_call_ok(self, len: u8, prefixes: u8) -> bool {
        match self {
            Target::X86_64 | Target::Aarch64 => {
                prefixes == 0 && len as usize == self.probe_site_len()
            }
            Target::Riscv64 => riscv64::c_probe_call_ok(len, prefixes),
        }
    }

    /// The C probe calls [`Target::c_probe_call_ok`] accepts, for messages.
    pub const fn c_probe_call_forms(self) -> &'static str {
        match self {
            Target::X86_64 => "a plain 5-byte call or jmp",
            Target::Aarch64 => "a plain 4-byte bl or b",
            Target::Riscv64 => riscv64::C_PROBE_CALL_FORMS,
        }
    }

    /// Where the probe site of a C probe call whose relocation is at `reloc_at` is (its
    /// bytes are the disabled form once `embed` rewrote it): the call's first byte on
    /// x86-64 and aarch64, the first 4-aligned byte of the call on riscv64.
    pub fn c_probe_site_of_reloc(self, reloc_at: u64) -> Option<u64> {
        match self {
            Target::X86_64 | Target::Aarch64 => self.plain_branch_start(reloc_at),
            Target::Riscv64 => riscv64::c_probe_site_of_reloc(reloc_at),
        }
    }

    /// How `embed` rewrites a C probe call of `kind`, `len` bytes at `call`, when the
    /// rewrite spans more than the site (riscv64: the site and its padding over the
    /// whole call); `stubs`: the image's, `None` in a relocatable object. `None` on the
    /// targets where the call is the site and its bytes are [`Target::disabled_probe`].
    pub fn c_probe_rewrite(
        self,
        kind: ProbeKind,
        call: u64,
        len: u8,
        stubs: Option<&Stubs>,
    ) -> Option<Result<CProbeRewrite, String>> {
        match self {
            Target::X86_64 | Target::Aarch64 => None,
            Target::Riscv64 => Some(riscv64::c_probe_rewrite(kind, call, len, stubs)),
        }
    }

    /// What is wrong after the rewritten C probe site at `site` (`after`: the bytes from
    /// its end on), if part of the original call is left there (riscv64: a pair's
    /// `jalr`); `None` on the targets where the call is the site.
    pub fn c_probe_remnant(self, site: u64, after: &[u8]) -> Option<String> {
        match self {
            Target::X86_64 | Target::Aarch64 => None,
            Target::Riscv64 => riscv64::c_probe_remnant(site, after),
        }
    }

    /// Whether a relocation of type `r_type` goes with a C probe call's own relocation
    /// and is dropped with it when `embed` rewrites the call (riscv64's R_RISCV_RELAX,
    /// which would let a linker shrink the rewritten bytes).
    pub fn dropped_with_call(self, r_type: u32) -> bool {
        match self {
            Target::X86_64 | Target::Aarch64 => false,
            Target::Riscv64 => riscv64::dropped_with_call(r_type),
        }
    }

    /// The relocation (type, addend) the disabled form of a C probe site of `kind`
    /// needs to reach `ksites_probe_ret0` (the image must then define it); `None` if
    /// that form branches nowhere.
    pub const fn probe_stub_reloc(self, kind: ProbeKind) -> Option<(u32, i64)> {
        match self {
            Target::X86_64 => match kind {
                ProbeKind::CEnabledTail => Some(x86_64::BRANCH_RELOC),
                _ => None,
            },
            Target::Aarch64 => aarch64::probe_stub_reloc(kind),
            Target::Riscv64 => riscv64::probe_stub_reloc(kind),
        }
    }

    /// The registers holding a probe's arguments at the site, in order, as stapsdt
    /// argument strings name them.
    pub const fn stapsdt_arg_registers(self) -> &'static [&'static str] {
        match self {
            Target::X86_64 => &x86_64::ARG_REGISTERS,
            Target::Aarch64 => &aarch64::ARG_REGISTERS,
            Target::Riscv64 => &riscv64::ARG_REGISTERS,
        }
    }

    /// The relocation type of a self-relative 32-bit table field in an ET_REL module;
    /// its addend is [`Target::table_reloc_addend`].
    pub const fn table_reloc(self) -> u32 {
        match self {
            Target::X86_64 => x86_64::TABLE_RELOC,
            Target::Aarch64 => aarch64::TABLE_RELOC,
            Target::Riscv64 => riscv64::TABLE_RELOC,
        }
    }

    /// The addend of a [`Target::table_reloc`] to the address `offset` bytes past its
    /// symbol (the field holds `S + A - P`).
    pub const fn table_reloc_addend(self, offset: i64) -> i64 {
        match self {
            Target::X86_64 | Target::Aarch64 | Target::Riscv64 => offset,
        }
    }

    /// The relocation type and addend that make a branch's field reach its symbol's
    /// first byte.
    pub const fn branch_reloc(self) -> (u32, i64) {
        match self {
            Target::X86_64 => x86_64::BRANCH_RELOC,
            Target::Aarch64 => aarch64::BRANCH_RELOC,
            Target::Riscv64 => riscv64::BRANCH_RELOC,
        }
    }

    /// Applies a [`Target::table_reloc`] (`S + A - P`, overflow checked) to the start of
    /// `place`, exactly as the module loader will.
    pub fn apply_table_reloc(self, place: &mut [u8], s: u64, a: i64, p: u64) -> Result<(), String> {
        match self {
            Target::X86_64 => x86_64::apply_table_reloc(place, s, a, p),
            Target::Aarch64 => aarch64::apply_table_reloc(place, s, a, p),
            Target::Riscv64 => riscv64::apply_table_reloc(place, s, a, p),
        }
    }
    /// What a relocation of [`RelocClass::Branch`] adds to `S + A` to name the address
    /// its branch reaches (a PC-relative field is relative to the end of the instruction
    /// on x86-64, so `S + A + 4`). [`Target::reloc_target`] applies it.
    pub const fn branch_bias(self) -> i64 {
        match self {
            Target::X86_64 => x86_64::BRANCH_FIELD_LEN as i64,
            Target::Aarch64 | Target::Riscv64 => 0,
        }
    }
    /// The relocation type that does nothing.
    pub const fn none_reloc(self) -> u32 {
        match self {
            Target::X86_64 => x86_64::NONE_RELOC,
            Target::Aarch64 => aarch64::NONE_RELOC,
            Target::Riscv64 => riscv64::NONE_RELOC,
        }
    }

    /// The relocation type of a 64-bit absolute address.
    pub const fn abs64_reloc(self) -> u32 {
        match self {
            Target::X86_64 => x86_64::ABS64_RELOC,
            Target::Aarch64 => aarch64::ABS64_RELOC,
            Target::Riscv64 => riscv64::ABS64_RELOC,
        }
    }

    /// The relocation type of a GNU ifunc slot.
    pub const fn irelative_reloc(self) -> u32 {
        match self {
            Target::X86_64 => x86_64::IRELATIVE_RELOC,
            Target::Aarch64 => aarch64::IRELATIVE_RELOC,
            Target::Riscv64 => riscv64::IRELATIVE_RELOC,
        }
    }

    /// The dynamic relocation type of an absolute pointer in a position-independent
    /// image (`B + A`, the addend being the link-time value).
    pub const fn relative_reloc(self) -> u32 {
        match self {
            Target::X86_64 => x86_64::RELATIVE_RELOC,
            Target::Aarch64 => aarch64::RELATIVE_RELOC,
            Target::Riscv64 => riscv64::RELATIVE_RELOC,
        }
    }
}

/// Code for the generic engine's tests, from the target: each instruction whole, a
/// branch's PC-relative field its last [`Target::branch_field_len`] bytes.
#[cfg(test)]
pub(crate) struct Samples {
    /// A `call` site.
    pub call: &'static [u8],
    /// A `jmp` site.
    pub jmp: &'static [u8],
    /// A conditional jump site.
    pub jcc: &'static [u8],
    /// No branch, though it ends with a field a branch relocation can fill and the
    /// byte before that field is the `call` opcode.
    pub not_branch: &'static [u8],
    /// Some other instructions.
    pub other: &'static [u8],
    /// Padding instructions, as an assembler's code alignment emits.
    pub nops: &'static [u8],
    /// The trap byte, as an alignment fill.
    pub trap: u8,
    /// A run of zero bytes whose length is a multiple of this decodes back to the
    /// boundary it started on.
    pub zero_step: usize,
}

#[cfg(test)]
impl Target {
    /// The target's [`Samples`].
    pub(crate) const fn samples(self) -> &'static Samples {
        match self {
            Target::X86_64 => &x86_64::SAMPLES,
            Target::Aarch64 => &aarch64::SAMPLES,
            Target::Riscv64 => &riscv64::SAMPLES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines() {
        assert_eq!(Target::from_machine(x86_64::E_MACHINE), Ok(Target::X86_64));
        assert_eq!(
            Target::from_machine(aarch64::E_MACHINE),
            Ok(Target::Aarch64)
        );
        assert_eq!(
            Target::from_machine(riscv64::E_MACHINE),
            Ok(Target::Riscv64)
        );
        let e = Target::from_machine(object::elf::EM_PPC64.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine 21 is not x86-64, aarch64 or riscv64"
        );
    }

    #[test]
    fn classes() {
        for t in TARGETS {
            classes_of(t);
        }
    }

    #[test]
    fn key_branch_forms_round_trip_and_stop_at_their_reach() {
        let site = 0x4000_0000u64;
        for t in TARGETS {
            for to in [site + 0x40, site - 0x100, site + 0x8_0000] {
                let b = t.key_branch(site, to).unwrap();
                assert_eq!(b.len(), t.probe_site_len(), "{t:?}");
                assert_eq!(t.key_form(&b, site), KeyForm::Branch(to), "{t:?}");
                assert_eq!(t.key_form(&b, site + 4), KeyForm::Branch(to + 4), "{t:?}");
            }
            assert_eq!(t.key_form(&t.key_nop(), site), KeyForm::Nop);
            let zeros = [0u8; PROBE_SITE_LEN];
            assert_eq!(
                t.key_form(&zeros[..t.probe_site_len()], site),
                KeyForm::Other
            );
            assert!(t.key_branch(site, site + (4 << 30)).is_err(), "{t:?}");
            assert!(t.key_branch(u64::MAX - 2, 0).is_err(), "{t:?}");
        }
        // Reach: aarch64 `b` +-128 MiB, riscv64 `jal` +-1 MiB, x86-64 rel32 +-2 GiB.
        let at = |t: Target, to: u64| t.key_branch(0x1000, to).map(|b| b.to_vec());
        assert!(at(Target::Aarch64, 0x1000 + (128 << 20) - 4).is_ok());
        assert!(at(Target::Aarch64, 0x1000 + (128 << 20)).is_err());
        assert!(at(Target::Aarch64, 0x1002).is_err(), "misaligned");
        assert!(at(Target::Riscv64, 0x1000 + (1 << 20) - 2).is_ok());
        assert!(at(Target::Riscv64, 0x1000 + (1 << 20)).is_err());
        assert!(at(Target::X86_64, 0x1005 + i32::MAX as u64).is_ok());
        assert!(at(Target::X86_64, 0x1006 + i32::MAX as u64).is_err());
    }

    fn classes_of(t: Target) {
        assert_eq!(t.reloc_class(t.table_reloc()), RelocClass::Branch);
        assert_eq!(t.reloc_class(t.branch_reloc().0), RelocClass::Branch);
        assert_eq!(t.reloc_class(t.none_reloc()), RelocClass::None);
        assert_eq!(t.reloc_class(t.abs64_reloc()), RelocClass::Absolute);
        assert_eq!(t.reloc_class(t.irelative_reloc()), RelocClass::IRelative);
    }
}
