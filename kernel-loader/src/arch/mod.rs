//! Architecture-specific pieces. Each architecture is a module defining the same names
//! (instruction encodings, probe bytes, the live-patch protocol, trap emulation,
//! relocations, CPU features); the rest of the crate uses [`native`], the one for the
//! architecture being compiled for, or dispatches on [`Arch`], the architecture a table
//! was written for. The modules compile on every host (only `asm!` is behind
//! `cfg(target_arch)`), so the build tool can use any architecture's encoders.
//!
//! # What every architecture module defines
//!
//! * Branch sites ([`x86_64::branch`], [`aarch64::branch`], [`riscv64::branch`]): `MAX_SITE_LEN`,
//!   `PROBE_SITE_LEN`, `TRAMPOLINE_LEN`, `site_len(kind, prefixes)`,
//!   `target_field(kind, prefixes)`, `encode_branch`, `encode_target`,
//!   `decode_branch_target`, `is_original`, `has_branch_opcode`, `expected_original` and
//!   `trampoline_slot` (aarch64 and riscv64 also `supports_site`, which
//!   [`Arch::supports_site`] answers for every architecture). On riscv64 a site's
//!   `prefixes` value is its *form* (`auipc`+`jalr` pair, relaxed `jal` or `c.j`). [`Arch`] dispatches to them by the architecture
//!   named in a table's header.
//! * Probe sites (`probe`): the probe forms' bytes in each state, and the live-patch
//!   protocol: `SINGLE_STORE` (false on x86-64: the int3 protocol, a trap written
//!   first and `ROUNDS` = 3 synchronisation rounds per batch; true on aarch64 and
//!   riscv64: one store per site and one round per batch), `ROUNDS`, `round`, `is_residue`, the trap
//!   frame and its emulation. The generic batch (`crate::probe`) runs whichever the
//!   native module defines.
//! * The enabled `probe!` fire path (`probe`): `CPU_BASE` and `read_cpu_word(offset) ->
//!   u32`, the `u32` at `offset` from the per-CPU base register, read with no call and
//!   no branch (x86-64: `gs` freestanding, `fs` hosted; aarch64: `TPIDR_EL1`,
//!   `TPIDR_EL0`; a riscv64 port: `tp`, which a kernel points at its per-CPU or task
//!   data and a host thread at its TLS), which `probe::set_cpu_index_word` uses. The
//!   rest of the shape is generic and the same on every architecture: the enabled site
//!   is a branch to its out-of-line block (the `asm goto` label of `probe!`), which
//!   stores the six arguments in an array on its stack and dispatches (inline with the
//!   `inline-fire` feature, else by calling `extern "C" fn ksites_probe_fire(rec:
//!   &ProbeRecord, args: &[u64; 6])`), then branches back after the site. The
//!   dispatcher's fast path is one straight line (the slot from the index word, the
//!   section depth counted in, the probe's global id from the record's cache,
//!   `enabled` and the handler from the probe's state, the hit on the CPU's own
//!   counter, the handler's call, the section depth put back); the architecture supplies
//!   only `read_cpu_word` and `local::{inc, fetch_inc}` (a CPU-local add that an
//!   interrupt cannot split).
//! * `CpuFeatures`: a `bitflags` set over `u64` of what the CPU (and the OS's state
//!   setup) allows, with `from_bits_retain` and `detect()`. Resolvers receive it, and the
//!   C resolver ABI passes its bits as the first (`u64`) argument, which fits an
//!   aarch64 (ID_AA64ISAR*/PFR0 fields) or riscv64 (ISA extensions) set as well.
//!   [`crate::CpuFeatures`] is [`native`]'s. Also `CpuFeatures::unusable()` (features the
//!   CPU has but the OS's state setup keeps from use) and `unsafe fn
//!   enable_simd_state() -> SimdState` (the per-CPU register setup those features need),
//!   which [`crate::cpu`] re-exports.
//! * The ifunc trampoline macro `__ksites_arch_trampoline!` (`#[macro_export]`, hidden,
//!   defined under `cfg(target_arch)`, so each architecture defines the same name) that
//!   [`crate::ifunc!`] expands to, and its C counterpart in `c/ksites_arch.h`.
//!
//! # Dependencies
//!
//! `arch` is a leaf: it imports nothing from the rest of the crate. The neutral types it
//! shares with the table format and the patch engine ([`SiteKind`], [`ProbeKind`],
//! [`ProbeSiteRef`], [`BranchSite`], [`InsnBytes`], [`TargetField`], [`RoundPiece`],
//! [`LiveProtocol`], and the probe stubs' [`Stubs`], [`STUB_SYMBOLS`], [`OutOfReach`])
//! live here, and `format` and `patch` re-export them, so the import
//! graph only goes `format`/`patch`/`probe` → `arch`.

use core::fmt;
use core::ops::Range;

pub mod aarch64;
pub mod riscv64;
pub mod x86_64;

/// The architecture this crate is compiled for.
#[cfg(target_arch = "aarch64")]
pub use aarch64 as native;
/// The architecture this crate is compiled for.
#[cfg(target_arch = "riscv64")]
pub use riscv64 as native;
/// The architecture this crate is compiled for.
#[cfg(target_arch = "x86_64")]
pub use x86_64 as native;

/// Raw architecture ids of the table header's `arch` field; [`Arch::from_id`] accepts
/// each.
pub mod ids {
    /// x86-64.
    pub const X86_64: u16 = 1;
    /// aarch64.
    pub const AARCH64: u16 = 2;
    /// riscv64.
    pub const RISCV64: u16 = 3;

    /// The name of a known (supported or reserved) architecture id.
    pub const fn name(id: u16) -> Option<&'static str> {
        match id {
            X86_64 => Some("x86-64"),
            AARCH64 => Some("aarch64"),
            RISCV64 => Some("riscv64"),
            _ => None,
        }
    }
}

/// An architecture a table can be written for: the header's `arch` field, decoded. It
/// picks the per-architecture facts the reader and the patch engine need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum Arch {
    /// x86-64 ([`ids::X86_64`]).
    X86_64 = ids::X86_64,
    /// aarch64 ([`ids::AARCH64`]).
    Aarch64 = ids::AARCH64,
    /// riscv64 ([`ids::RISCV64`]).
    Riscv64 = ids::RISCV64,
}

impl Arch {
    /// Every architecture this crate supports (what [`Arch::from_id`] accepts).
    pub const ALL: &'static [Arch] = &[Arch::X86_64, Arch::Aarch64, Arch::Riscv64];

    /// The architecture of a header id, if this crate supports it.
    #[inline]
    pub const fn from_id(id: u16) -> Option<Arch> {
        match id {
            ids::X86_64 => Some(Arch::X86_64),
            ids::AARCH64 => Some(Arch::Aarch64),
            ids::RISCV64 => Some(Arch::Riscv64),
            _ => None,
        }
    }

    /// The header id.
    pub const fn id(self) -> u16 {
        self as u16
    }

    /// The architecture this crate is compiled for.
    #[cfg(target_arch = "x86_64")]
    pub const fn native() -> Arch {
        Arch::X86_64
    }

    /// The architecture this crate is compiled for.
    #[cfg(target_arch = "aarch64")]
    pub const fn native() -> Arch {
        Arch::Aarch64
    }

    /// The architecture this crate is compiled for.
    #[cfg(target_arch = "riscv64")]
    pub const fn native() -> Arch {
        Arch::Riscv64
    }

    /// Display name.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86-64",
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// Length of a branch site of `kind` with `prefixes` bytes before its opcode (on
    /// riscv64, in form `prefixes`).
    #[inline(always)]
    pub const fn site_len(self, kind: SiteKind, prefixes: u8) -> usize {
        match self {
            Arch::X86_64 => x86_64::site_len(kind, prefixes),
            Arch::Aarch64 => aarch64::site_len(kind, prefixes),
            Arch::Riscv64 => riscv64::site_len(kind, prefixes),
        }
    }

    /// Whether the patcher handles a branch site of `kind` with `prefixes` at `addr`
    /// (x86-64: every one, prefixes being bounded by [`Arch::max_site_len`]; aarch64: a
    /// 4-aligned `bl`/`b`, never a conditional branch; riscv64: a 2-aligned call or
    /// tail call in one of the three forms of [`riscv64::branch`]).
    pub const fn supports_site(self, kind: SiteKind, prefixes: u8, addr: u64) -> bool {
        match self {
            Arch::X86_64 => true,
            Arch::Aarch64 => aarch64::supports_site(kind, prefixes, addr),
            Arch::Riscv64 => riscv64::supports_site(kind, prefixes, addr),
        }
    }

    /// The alignment every instruction (so every branch site) has: 1 on x86-64, 4 on
    /// aarch64, 2 on riscv64 (compressed instructions).
    pub const fn insn_align(self) -> u64 {
        match self {
            Arch::X86_64 => 1,
            Arch::Aarch64 => aarch64::INSN_LEN as u64,
            Arch::Riscv64 => riscv64::C_INSN_LEN as u64,
        }
    }

    /// The alignment every probe site has: [`Arch::insn_align`], except on riscv64,
    /// where a probe site is a 4-aligned 4-byte instruction (so one aligned store
    /// rewrites it whole).
    pub const fn probe_align(self) -> u64 {
        match self {
            Arch::X86_64 => 1,
            Arch::Aarch64 => aarch64::INSN_LEN as u64,
            Arch::Riscv64 => riscv64::PROBE_SITE_LEN as u64,
        }
    }

    /// Whether a site of `kind` in form `prefixes` is a short, relaxed form whose reach
    /// is less than the architecture's full call reach (riscv64 `jal` ±1 MiB, `c.j`
    /// ±2 KiB): when its implementation is out of that reach it stays on the
    /// trampoline (`patch::InitReport::relaxed_sites_on_trampoline`).
    pub const fn is_relaxed_form(self, _kind: SiteKind, prefixes: u8) -> bool {
        match self {
            Arch::X86_64 | Arch::Aarch64 => false,
            Arch::Riscv64 => prefixes != riscv64::FORM_PAIR,
        }
    }

    /// The bytes of a site (offsets from its first byte) that patching rewrites: the
    /// branch's target field.
    #[inline(always)]
    pub const fn target_field(self, kind: SiteKind, prefixes: u8) -> Range<usize> {
        match self {
            Arch::X86_64 => x86_64::target_field(kind, prefixes),
            Arch::Aarch64 => aarch64::target_field(kind, prefixes),
            Arch::Riscv64 => riscv64::target_field(kind, prefixes),
        }
    }

    /// Longest branch site the patcher handles.
    pub const fn max_site_len(self) -> usize {
        match self {
            Arch::X86_64 => x86_64::MAX_SITE_LEN,
            Arch::Aarch64 => aarch64::MAX_SITE_LEN,
            Arch::Riscv64 => riscv64::MAX_SITE_LEN,
        }
    }

    /// Length of every probe site.
    #[inline(always)]
    pub const fn probe_site_len(self) -> usize {
        match self {
            Arch::X86_64 => x86_64::PROBE_SITE_LEN,
            Arch::Aarch64 => aarch64::PROBE_SITE_LEN,
            Arch::Riscv64 => riscv64::PROBE_SITE_LEN,
        }
    }

    /// Length of an ifunc trampoline.
    pub const fn trampoline_len(self) -> usize {
        match self {
            Arch::X86_64 => x86_64::TRAMPOLINE_LEN,
            Arch::Aarch64 => aarch64::TRAMPOLINE_LEN,
            Arch::Riscv64 => riscv64::TRAMPOLINE_LEN,
        }
    }

    /// The bytes `site` holds when it branches to `target`, keeping the non-target bytes
    /// of `current`; `None` if `target` is out of the branch's reach.
    #[inline(always)]
    pub fn encode_branch(
        self,
        site: &BranchSite,
        current: &InsnBytes,
        target: u64,
    ) -> Option<InsnBytes> {
        match self {
            Arch::X86_64 => x86_64::encode_branch(site, current, target),
            Arch::Aarch64 => aarch64::encode_branch(site, current, target),
            Arch::Riscv64 => riscv64::encode_branch(site, current, target),
        }
    }

    /// Only the target field of `site` branching to `target` (what patching writes at
    /// the field's first byte); `None` if `target` is out of reach.
    #[inline(always)]
    pub fn encode_target(self, site: &BranchSite, target: u64) -> Option<TargetField> {
        match self {
            Arch::X86_64 => x86_64::encode_target(site, target),
            Arch::Aarch64 => aarch64::encode_target(site, target),
            Arch::Riscv64 => riscv64::encode_target(site, target),
        }
    }

    /// Where the branch `bytes` at `site` goes, if they are a branch of its kind.
    pub fn decode_branch_target(self, site: &BranchSite, bytes: &[u8]) -> Option<u64> {
        match self {
            Arch::X86_64 => x86_64::decode_branch_target(site, bytes),
            Arch::Aarch64 => aarch64::decode_branch_target(site, bytes),
            Arch::Riscv64 => riscv64::decode_branch_target(site, bytes),
        }
    }

    /// Whether `v` (the site's bytes, little-endian) is exactly the unpatched branch to
    /// `trampoline`.
    #[inline(always)]
    pub fn is_original(self, site: &BranchSite, v: u64, trampoline: u64) -> bool {
        match self {
            Arch::X86_64 => x86_64::is_original(site, v, trampoline),
            Arch::Aarch64 => aarch64::is_original(site, v, trampoline),
            Arch::Riscv64 => riscv64::is_original(site, v, trampoline),
        }
    }

    /// Whether `bytes` hold a branch of the site's kind (whatever its target).
    pub fn has_branch_opcode(self, site: &BranchSite, bytes: &[u8]) -> bool {
        match self {
            Arch::X86_64 => x86_64::has_branch_opcode(site, bytes),
            Arch::Aarch64 => aarch64::has_branch_opcode(site, bytes),
            Arch::Riscv64 => riscv64::has_branch_opcode(site, bytes),
        }
    }

    /// The unpatched bytes of `site` (a branch to `trampoline`), shaped after what was
    /// `found` there, for error messages; `None` if the trampoline is out of reach.
    pub fn expected_original(
        self,
        site: &BranchSite,
        found: &InsnBytes,
        trampoline: u64,
    ) -> Option<InsnBytes> {
        match self {
            Arch::X86_64 => x86_64::expected_original(site, found, trampoline),
            Arch::Aarch64 => aarch64::expected_original(site, found, trampoline),
            Arch::Riscv64 => riscv64::expected_original(site, found, trampoline),
        }
    }

    /// The slot the trampoline `bytes` (read at `addr`) jump through, or `None` if they
    /// are not this architecture's trampoline, or the slot would be null or misaligned.
    pub fn trampoline_slot(self, bytes: &[u8], addr: u64) -> Option<u64> {
        match self {
            Arch::X86_64 => x86_64::trampoline_slot(bytes, addr),
            Arch::Aarch64 => aarch64::trampoline_slot(bytes, addr),
            Arch::Riscv64 => riscv64::trampoline_slot(bytes, addr),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The target field of a branch, encoded: up to eight bytes, little-endian in a word so
/// the patch engine writes and verifies it without a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetField {
    /// The bytes, little-endian (the first byte in the low bits).
    pub value: u64,
    /// How many (≤ 8).
    pub len: u8,
}

impl TargetField {
    /// The bytes.
    #[inline(always)]
    pub fn bytes(&self) -> [u8; 8] {
        self.value.to_le_bytes()
    }
}

/// Longest trampoline of any architecture (a buffer size for readers).
pub const MAX_TRAMPOLINE_LEN: usize = 16;

/// What a branch site does, whatever the architecture encodes it as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// A call.
    Call,
    /// An unconditional jump: a tail call.
    Jmp,
    /// A conditional jump: a conditional tail call.
    Jcc,
}

impl SiteKind {
    /// The 2-bit encoding in `format::IfuncSite::info`.
    pub const fn bits(self) -> u32 {
        match self {
            SiteKind::Call => 0,
            SiteKind::Jmp => 1,
            SiteKind::Jcc => 2,
        }
    }

    /// Decodes the 2-bit encoding.
    #[inline]
    pub const fn from_bits(bits: u32) -> Option<SiteKind> {
        match bits {
            0 => Some(SiteKind::Call),
            1 => Some(SiteKind::Jmp),
            2 => Some(SiteKind::Jcc),
            _ => None,
        }
    }

    /// Opcode length (without prefixes) on the native architecture.
    #[cfg(target_arch = "x86_64")]
    pub const fn opcode_len(self) -> usize {
        native::opcode_len(self)
    }

    /// Lower-case name, as the build tool prints it.
    pub const fn name(self) -> &'static str {
        match self {
            SiteKind::Call => "call",
            SiteKind::Jmp => "jmp",
            SiteKind::Jcc => "jcc",
        }
    }
}

/// How a probe site is disabled and enabled: which form it has in each state is the
/// architecture's business (each architecture module lists its forms: [`x86_64`],
/// [`aarch64`], [`riscv64`]).
/// Each form is a single instruction in both states, so a CPU stopped anywhere while a
/// site is rewritten resumes on an instruction boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// A `probe!` site.
    RustJmp,
    /// A `probe_enabled!` site.
    RustEnabled,
    /// A C call of `__dtrace_probe_<provider>___<name>`.
    CCall,
    /// A C tail call (`jmp`) of `__dtrace_probe_…`.
    CTail,
    /// A C call of `__dtraceenabled_<provider>___<name>`.
    CEnabled,
    /// A C tail call of `__dtraceenabled_…`.
    CEnabledTail,
}

impl ProbeKind {
    /// The 3-bit encoding.
    pub const fn bits(self) -> u32 {
        match self {
            ProbeKind::RustJmp => 0,
            ProbeKind::RustEnabled => 1,
            ProbeKind::CCall => 2,
            ProbeKind::CTail => 3,
            ProbeKind::CEnabled => 4,
            ProbeKind::CEnabledTail => 5,
        }
    }

    /// Decodes the 3-bit encoding.
    #[inline]
    pub const fn from_bits(b: u32) -> Option<ProbeKind> {
        match b {
            0 => Some(ProbeKind::RustJmp),
            1 => Some(ProbeKind::RustEnabled),
            2 => Some(ProbeKind::CCall),
            3 => Some(ProbeKind::CTail),
            4 => Some(ProbeKind::CEnabled),
            5 => Some(ProbeKind::CEnabledTail),
            _ => None,
        }
    }

    /// Whether the site has an out-of-line target.
    pub const fn is_rust(self) -> bool {
        matches!(self, ProbeKind::RustJmp | ProbeKind::RustEnabled)
    }

    /// Whether it is an is-enabled check rather than a firing site.
    pub const fn is_enabled_check(self) -> bool {
        matches!(
            self,
            ProbeKind::RustEnabled | ProbeKind::CEnabled | ProbeKind::CEnabledTail
        )
    }

    /// Short name for listings.
    pub const fn name(self) -> &'static str {
        match self {
            ProbeKind::RustJmp => "rust",
            ProbeKind::RustEnabled => "rust-is-enabled",
            ProbeKind::CCall => "c-call",
            ProbeKind::CTail => "c-tail",
            ProbeKind::CEnabled => "c-is-enabled",
            ProbeKind::CEnabledTail => "c-is-enabled-tail",
        }
    }
}

/// A probe site as the architecture layer sees it: what the generic probe code passes
/// to `probe::site_bytes` and `probe::emulate` (built from a table's `format::PSite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSiteRef {
    /// Address of the site's first byte.
    pub addr: u64,
    /// Out-of-line target (Rust sites), else 0.
    pub target: u64,
    /// The kind.
    pub kind: ProbeKind,
}

/// Addresses of the loader's entry points that C probe sites branch to (every
/// architecture's probe forms use the same three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stubs {
    /// `ksites_probe_c_entry`: what an enabled C call site calls.
    pub c_entry: u64,
    /// `ksites_probe_ret0`: returns 0; where a disabled C is-enabled site (and on
    /// aarch64 a disabled C tail site) branches.
    pub ret0: u64,
    /// `ksites_probe_ret1`: returns 1, for an enabled C is-enabled site.
    pub ret1: u64,
}

impl Stubs {
    /// No stub: what a static-key site's forms take (they branch to the site's own label).
    pub const NONE: Stubs = Stubs {
        c_entry: 0,
        ret0: 0,
        ret1: 0,
    };
}

/// A static-key site at `addr` branching to `target`, as every architecture's probe
/// protocol sees it: a `probe!` site whose out-of-line block is the label, its state
/// `true` the jump. (Each architecture's `key` module re-exports it as `site_ref`.)
#[inline(always)]
pub const fn key_site_ref(addr: u64, target: u64) -> ProbeSiteRef {
    ProbeSiteRef {
        addr,
        target,
        kind: ProbeKind::RustJmp,
    }
}

/// The stubs a static-key site's forms take: [`Stubs::NONE`]. (Each architecture's `key`
/// module re-exports it as `stubs`.)
#[inline(always)]
pub const fn key_stubs() -> Stubs {
    Stubs::NONE
}

/// Symbol names of [`Stubs`], in field order (the build tool looks them up).
pub const STUB_SYMBOLS: [&str; 3] = [
    "ksites_probe_c_entry",
    "ksites_probe_ret0",
    "ksites_probe_ret1",
];

/// A branch from a probe site to its target does not fit the instruction's reach
/// (rel32 on x86-64; ±128 MiB and 4-aligned on aarch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfReach {
    /// The branch target.
    pub target: u64,
}

/// What one round of a live-patch protocol writes at one site: `len` bytes
/// (little-endian in `bytes`) at `offset` from the site's first byte. Each
/// architecture's `probe::round` returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundPiece {
    /// Offset from the site's first byte.
    pub offset: u64,
    /// The bytes, little-endian (the first in the low bits).
    pub bytes: u64,
    /// How many (≤ the architecture's probe site length).
    pub len: usize,
}

impl RoundPiece {
    /// Whether the site (its bytes little-endian in a word) holds this piece.
    #[inline(always)]
    pub const fn is_in(&self, site: u64) -> bool {
        let mask = (1u64 << (8 * self.len)) - 1;
        (site >> (8 * self.offset)) & mask == self.bytes
    }
}

/// An architecture's live-patch protocol for probe sites, as the generic batch
/// (`crate::probe`) runs it: a unit type in each architecture's `probe` module
/// (`Live`) forwarding to that module's functions. The batch is generic over it, so the
/// protocol of an architecture other than the native one runs on any host (in tests,
/// over a buffer nothing executes); the kernel's batches use the native one.
pub trait LiveProtocol {
    /// Addresses of the loader's entry points C probe sites branch to (`probe::Stubs`).
    type Stubs: Copy;
    /// Length of every probe site.
    const SITE_LEN: usize;
    /// Whether each site's new bytes are written with one store, after every site was
    /// checked, with one synchronisation round for the batch (aarch64); else the
    /// check is fused with round 0, which writes a trap (x86-64's int3 protocol).
    const SINGLE_STORE: bool;
    /// Rounds per batch (each: a piece of every site, then `sync_cores`).
    const ROUNDS: usize;
    /// The site's bytes (a word) in state `on`; `Err(target)` when a branch cannot reach
    /// `target`.
    fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Self::Stubs) -> Result<u64, u64>;
    /// What [`LiveProtocol::site_word`] returned when it returned `Ok`, not
    /// range-checked again.
    fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Self::Stubs) -> u64;
    /// What round `r` writes at a site becoming `new`.
    fn round(r: usize, new: u64) -> RoundPiece;
    /// Whether `found` is what an interrupted batch between `old` and `new` may have
    /// left.
    fn is_residue(found: u64, old: u64, new: u64) -> bool;
}

/// A branch site as the architecture layer sees it: where it is and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchSite {
    /// Address of its first byte.
    pub addr: u64,
    /// The branch.
    pub kind: SiteKind,
    /// Bytes before the opcode (left alone by patching); on riscv64 the site's form
    /// (`riscv64::FORM_PAIR`, `FORM_JAL`, `FORM_C_J`).
    pub prefixes: u8,
    /// Length of the whole instruction (or instruction sequence).
    pub len: u8,
}

impl BranchSite {
    /// Address just past the site.
    #[inline(always)]
    pub const fn end(&self) -> u64 {
        self.addr + self.len as u64
    }
}

/// Up to eight instruction bytes (a branch site, or the start of a longer sequence),
/// copied by value: what the patch engine compares and errors report.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InsnBytes {
    len: u8,
    bytes: [u8; 8],
}

impl InsnBytes {
    /// Up to the first eight bytes of `src`.
    pub fn new(src: &[u8]) -> InsnBytes {
        let mut bytes = [0u8; 8];
        let len = src.len().min(8);
        bytes[..len].copy_from_slice(&src[..len]);
        InsnBytes {
            len: len as u8,
            bytes,
        }
    }

    /// The first `len` (≤ 8) bytes of the little-endian `v`.
    #[inline(always)]
    pub const fn from_word(v: u64, len: usize) -> InsnBytes {
        InsnBytes {
            len: if len < 8 { len as u8 } else { 8 },
            bytes: v.to_le_bytes(),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_implemented_architectures_are_accepted() {
        assert_eq!(Arch::from_id(ids::X86_64), Some(Arch::X86_64));
        assert_eq!(Arch::from_id(ids::AARCH64), Some(Arch::Aarch64));
        assert_eq!(Arch::X86_64.id(), 1);
        assert_eq!(Arch::Aarch64.id(), 2);
        assert_eq!(Arch::from_id(ids::RISCV64), Some(Arch::Riscv64));
        assert_eq!(Arch::Riscv64.id(), 3);
        for id in [0, 4, 0xffff] {
            assert_eq!(Arch::from_id(id), None);
        }
        assert_eq!(ids::name(ids::AARCH64), Some("aarch64"));
        assert_eq!(Arch::Aarch64.name(), "aarch64");
        assert_eq!(ids::name(7), None);
    }

    #[test]
    fn all_lists_what_from_id_accepts() {
        for id in 0..=16 {
            assert_eq!(
                Arch::from_id(id),
                Arch::ALL.iter().copied().find(|a| a.id() == id)
            );
        }
    }

    #[test]
    fn x86_64_facts_through_the_dispatch() {
        let a = Arch::X86_64;
        assert_eq!(a.site_len(SiteKind::Call, 0), 5);
        assert_eq!(a.site_len(SiteKind::Jcc, 2), 8);
        assert_eq!(a.target_field(SiteKind::Jmp, 1), 2..6);
        assert_eq!(a.max_site_len(), 8);
        assert_eq!(a.probe_site_len(), 5);
        assert_eq!(a.trampoline_len(), 6);
        assert!(a.trampoline_len() <= MAX_TRAMPOLINE_LEN);
        assert!(a.supports_site(SiteKind::Jcc, 3, 0x1001));
        assert_eq!(a.insn_align(), 1);
    }

    #[test]
    fn aarch64_facts_through_the_dispatch() {
        let a = Arch::Aarch64;
        assert_eq!(a.site_len(SiteKind::Call, 0), 4);
        assert_eq!(a.target_field(SiteKind::Jmp, 0), 0..4);
        assert_eq!(a.max_site_len(), 4);
        assert_eq!(a.probe_site_len(), 4);
        assert_eq!(a.trampoline_len(), 12);
        assert!(a.trampoline_len() <= MAX_TRAMPOLINE_LEN);
        assert_eq!(a.insn_align(), 4);
        assert!(a.supports_site(SiteKind::Call, 0, 0x1000));
        assert!(!a.supports_site(SiteKind::Jcc, 0, 0x1000));
        assert!(!a.supports_site(SiteKind::Call, 0, 0x1002));
        let s = BranchSite {
            addr: 0x1000,
            kind: SiteKind::Call,
            prefixes: 0,
            len: 4,
        };
        // `bl 0x2000` from 0x1000: 0x94000400.
        let f = a.encode_target(&s, 0x2000).unwrap();
        assert_eq!((f.value, f.len), (0x9400_0400, 4));
        let b = a
            .encode_branch(&s, &InsnBytes::new(&[0; 4]), 0x2000)
            .unwrap();
        assert_eq!(b.as_slice(), &[0x00, 0x04, 0x00, 0x94]);
        assert_eq!(a.decode_branch_target(&s, b.as_slice()), Some(0x2000));
        assert!(a.is_original(&s, 0x9400_0400, 0x2000));
        assert!(a.has_branch_opcode(&s, b.as_slice()));
        assert_eq!(a.expected_original(&s, &b, 0x2000), Some(b));
        // The x86-64 reading of the same bytes differs: the dispatch picks the rules.
        assert_ne!(
            Arch::X86_64.decode_branch_target(&s, b.as_slice()),
            Some(0x2000)
        );
        let t = aarch64::trampoline(0x3000, 0x4008).unwrap();
        let mut tb = [0u8; 12];
        for (i, w) in t.iter().enumerate() {
            tb[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(a.trampoline_slot(&tb, 0x3000), Some(0x4008));
        assert_eq!(Arch::X86_64.trampoline_slot(&tb, 0x3000), None);
    }

    #[test]
    fn riscv64_facts_through_the_dispatch() {
        let a = Arch::Riscv64;
        assert_eq!(a.name(), "riscv64");
        assert_eq!(a.site_len(SiteKind::Call, riscv64::FORM_PAIR), 8);
        assert_eq!(a.site_len(SiteKind::Call, riscv64::FORM_JAL), 4);
        assert_eq!(a.site_len(SiteKind::Jmp, riscv64::FORM_C_J), 2);
        assert_eq!(a.target_field(SiteKind::Jmp, riscv64::FORM_PAIR), 0..8);
        assert_eq!(a.max_site_len(), 8);
        assert_eq!(a.probe_site_len(), 4);
        assert_eq!(a.trampoline_len(), 12);
        assert!(a.trampoline_len() <= MAX_TRAMPOLINE_LEN);
        assert_eq!((a.insn_align(), a.probe_align()), (2, 4));
        assert!(a.supports_site(SiteKind::Call, riscv64::FORM_PAIR, 0x1002));
        assert!(!a.supports_site(SiteKind::Call, riscv64::FORM_C_J, 0x1000));
        assert!(!a.supports_site(SiteKind::Jcc, riscv64::FORM_PAIR, 0x1000));
        assert!(a.is_relaxed_form(SiteKind::Call, riscv64::FORM_JAL));
        assert!(!a.is_relaxed_form(SiteKind::Call, riscv64::FORM_PAIR));
        assert!(!Arch::Aarch64.is_relaxed_form(SiteKind::Call, 0));
        let s = BranchSite {
            addr: 0x1000,
            kind: SiteKind::Call,
            prefixes: riscv64::FORM_PAIR,
            len: 8,
        };
        // `call 0x2000` from 0x1000: `auipc ra, 0x1; jalr ra, 0(ra)`.
        let f = a.encode_target(&s, 0x2000).unwrap();
        assert_eq!((f.value, f.len), (0x0000_80e7_0000_1097, 8));
        let b = a
            .encode_branch(&s, &InsnBytes::new(&[0; 8]), 0x2000)
            .unwrap();
        assert_eq!(a.decode_branch_target(&s, b.as_slice()), Some(0x2000));
        assert!(a.is_original(&s, f.value, 0x2000));
        assert!(a.has_branch_opcode(&s, b.as_slice()));
        assert_eq!(a.expected_original(&s, &b, 0x2000), Some(b));
        let t = riscv64::trampoline(0x3000, 0x4008).unwrap();
        let mut tb = [0u8; 12];
        for (i, w) in t.iter().enumerate() {
            tb[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(a.trampoline_slot(&tb, 0x3000), Some(0x4008));
        assert_eq!(Arch::Aarch64.trampoline_slot(&tb, 0x3000), None);
    }
}
