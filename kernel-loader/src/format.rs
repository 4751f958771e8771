//! The `.ksites` table, format v1.
//!
//! One table per image or module. All multi-byte fields are little-endian. Every
//! reference to code or data is **self-relative**: `target = address_of(field) + value`
//! (an `i32`), so the table needs no run-time relocation and works at any load address.
//!
//! ```text
//! offset 0   Header (64 bytes)
//!            IfuncDesc[ifuncs.count]        (20 bytes each, 4-aligned, sorted by trampoline)
//!            IfuncSite[ifunc_sites.count]   (8 bytes each, 4-aligned, sorted by address)
//!            ProbeDesc[probes.count]        (12 bytes each, 4-aligned, sorted by name)
//!            ProbeSite[probe_sites.count]   (12 bytes each, 4-aligned, sorted by address)
//!            strings                        (NUL-terminated UTF-8)
//! ```
//!
//! [`Table::parse`] validates everything a patcher relies on before anything is touched:
//! sizes, bounds, alignment, ordering, indices, strings, and that every site and code
//! pointer lies inside an executable range supplied by the caller. Accessors on a parsed
//! [`Table`] cannot fail and never panic.
//!
//! The structs below document the layout; they are decoded field by field from bytes
//! (`from_le_bytes`), so reading never depends on the alignment of a host buffer.

use core::fmt;
use core::ops::Range;

use crate::arch::x86_64::TRAMPOLINE_LEN;

/// First eight bytes of every table.
pub const MAGIC: [u8; 8] = *b"KSITES\0\0";
/// The format version this reader understands.
pub const VERSION: u16 = 1;
/// `Header::arch` for x86-64.
pub const ARCH_X86_64: u16 = 1;
/// Name of the section the build tool writes.
pub const SECTION_NAME: &str = ".ksites";
/// Required alignment of the table's start address.
pub const TABLE_ALIGN: u64 = 8;

/// Size of [`Header`] in bytes.
pub const HEADER_SIZE: usize = 64;
/// Size of [`IfuncDesc`] in bytes.
pub const IFUNC_DESC_SIZE: usize = 20;
/// Size of [`IfuncSite`] in bytes.
pub const IFUNC_SITE_SIZE: usize = 8;
/// Size of [`ProbeDesc`] in bytes.
pub const PROBE_DESC_SIZE: usize = 12;
/// Size of [`ProbeSite`] in bytes.
pub const PROBE_SITE_SIZE: usize = 12;
/// Length of every probe site: one 5-byte instruction.
pub const PROBE_SITE_LEN: usize = 5;
/// `ProbeDesc::nargs` when no site declares the argument count.
pub const NARGS_UNKNOWN: u16 = 0xffff;

/// Offset and count of one sub-table (for strings: offset and size in bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubTable {
    /// Byte offset from the start of the table.
    pub offset: u32,
    /// Number of entries (bytes, for the string table).
    pub count: u32,
}

/// The table header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: u16,
    /// [`ARCH_X86_64`].
    pub arch: u16,
    /// Reserved, must be 0 in v1.
    pub flags: u32,
    /// [`HEADER_SIZE`].
    pub header_size: u32,
    /// Size of the whole table in bytes, header included.
    pub total_size: u32,
    /// [`IfuncDesc`] entries.
    pub ifuncs: SubTable,
    /// [`IfuncSite`] entries.
    pub ifunc_sites: SubTable,
    /// [`ProbeDesc`] entries.
    pub probes: SubTable,
    /// [`ProbeSite`] entries.
    pub probe_sites: SubTable,
    /// The string table (`count` = size in bytes).
    pub strings: SubTable,
}

/// One ifunc: where its trampoline, slot, resolver and default implementation live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfuncDesc {
    /// Self-relative: the trampoline (`jmp [rip+slot]`) every original call targets.
    pub trampoline: i32,
    /// Self-relative: the 8-byte slot the trampoline jumps through.
    pub slot: i32,
    /// Self-relative: `extern "C" fn(features: u64) -> usize`.
    pub resolver: i32,
    /// Self-relative: the implementation the slot holds before resolution.
    pub default: i32,
    /// Offset of the NUL-terminated name in the string table.
    pub name: u32,
}

/// One call site of an ifunc (8 bytes, like Linux's `.static_call_sites`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfuncSite {
    /// Self-relative: the first byte of the instruction, prefixes included.
    pub site: i32,
    /// Bits 0..=1: [`SiteKind`]; bits 2..=4: number of prefix bytes; bits 5..=7:
    /// reserved (0); bits 8..=31: index into the ifunc descriptors.
    pub info: u32,
}

/// One probe (`provider:name`); its sites refer to it by index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeDesc {
    /// String-table offset of the provider.
    pub provider: u32,
    /// String-table offset of the name.
    pub name: u32,
    /// Number of arguments (0..=6), or [`NARGS_UNKNOWN`].
    pub nargs: u16,
    /// Reserved, 0.
    pub flags: u16,
}

/// One probe site: a 5-byte instruction the loader toggles between a disabled and an
/// enabled form. 12 bytes: Rust sites carry their out-of-line target (as Linux's
/// `__jump_table` entries carry theirs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Self-relative: the site's first byte.
    pub site: i32,
    /// Self-relative: the out-of-line block a Rust site jumps to when enabled; 0 for C
    /// sites (they call the dispatcher or trap).
    pub target: i32,
    /// Bits 0..=2: [`ProbeKind`]; bits 3..=7 reserved (0); bits 8..=31: probe index.
    pub info: u32,
}

/// How a probe site is disabled and enabled.
///
/// | kind | disabled | enabled |
/// |---|---|---|
/// | `RustJmp` (`probe!`) | `0f 1f 44 00 00` (nop) | `e9 rel32` → out-of-line block |
/// | `RustEnabled` (`probe_enabled!`) | `0f 1f 44 00 00` | `e9 rel32` → block setting `true` |
/// | `CCall` (`call __dtrace_probe_*`) | `0f 1f 44 00 00` | `e8 rel32` → C dispatcher |
/// | `CTail` (`jmp __dtrace_probe_*`) | `c3 90 90 90 90` (ret) | `cc 90 90 90 90`: int3 fires, then returns |
/// | `CEnabled` (`call __dtraceenabled_*`) | `b8 00 00 00 00` (eax = 0) | `b8 01 00 00 00` (eax = 1) |
/// | `CEnabledTail` (`jmp __dtraceenabled_*`) | `e9 rel32` → `ksites_probe_ret0` | `e9 rel32` → `ksites_probe_ret1` |
///
/// Each form is a single instruction in both states, so a CPU stopped anywhere during
/// the int3 protocol resumes on an instruction boundary.
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

/// The instruction at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// `e8 rel32`.
    Call,
    /// `e9 rel32`, a tail call.
    Jmp,
    /// `0f 8x rel32`, a conditional tail call.
    Jcc,
}

impl SiteKind {
    /// The 2-bit encoding in [`IfuncSite::info`].
    pub const fn bits(self) -> u32 {
        match self {
            SiteKind::Call => 0,
            SiteKind::Jmp => 1,
            SiteKind::Jcc => 2,
        }
    }

    /// Decodes the 2-bit encoding.
    pub const fn from_bits(bits: u32) -> Option<SiteKind> {
        match bits {
            0 => Some(SiteKind::Call),
            1 => Some(SiteKind::Jmp),
            2 => Some(SiteKind::Jcc),
            _ => None,
        }
    }

    /// Opcode length (without prefixes): 1 for `e8`/`e9`, 2 for `0f 8x`.
    pub const fn opcode_len(self) -> usize {
        match self {
            SiteKind::Call | SiteKind::Jmp => 1,
            SiteKind::Jcc => 2,
        }
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

/// Largest number of prefix bytes a site's encoding can carry (3 bits).
pub const MAX_PREFIXES: u32 = 7;
/// Longest site instruction the patcher handles (the architectural limit is 15; real
/// compilers emit at most one or two prefixes before a branch). Longer sites are
/// rejected by the reader and reported, not recorded, by the build tool.
pub const MAX_SITE_LEN: usize = 8;
/// Largest ifunc index a site can name (24 bits).
pub const MAX_IFUNCS: u32 = 1 << 24;

impl IfuncSite {
    /// Packs `info` from its parts; `None` if a part does not fit.
    pub const fn pack_info(kind: SiteKind, prefixes: u32, ifunc: u32) -> Option<u32> {
        if prefixes > MAX_PREFIXES || ifunc >= MAX_IFUNCS {
            return None;
        }
        Some(kind.bits() | (prefixes << 2) | (ifunc << 8))
    }
}

/// A part of the table, as named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The header.
    Header,
    /// The ifunc descriptors.
    Ifuncs,
    /// The ifunc site entries.
    IfuncSites,
    /// The probe descriptors.
    Probes,
    /// The probe site entries.
    ProbeSites,
    /// The string table.
    Strings,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Ifuncs => "ifunc descriptors",
            Part::IfuncSites => "ifunc sites",
            Part::Probes => "probe descriptors",
            Part::ProbeSites => "probe sites",
            Part::Strings => "string table",
        })
    }
}

/// What a code pointer in an ifunc descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfuncField {
    /// The trampoline.
    Trampoline,
    /// The slot.
    Slot,
    /// The resolver.
    Resolver,
    /// The default implementation.
    Default,
}

impl fmt::Display for IfuncField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IfuncField::Trampoline => "trampoline",
            IfuncField::Slot => "slot",
            IfuncField::Resolver => "resolver",
            IfuncField::Default => "default implementation",
        })
    }
}

/// Every way a table can be wrong. Offsets are byte offsets from the table start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer bytes than a header.
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic,
    /// A version this reader does not understand.
    UnsupportedVersion(u16),
    /// A table for another architecture.
    WrongArch(u16),
    /// Reserved header flags are set.
    UnknownFlags(u32),
    /// `header_size` is not [`HEADER_SIZE`].
    BadHeaderSize(u32),
    /// `total_size` exceeds the bytes available (or is smaller than the header).
    BadTotalSize {
        /// Declared size.
        total_size: u32,
        /// Bytes available.
        len: usize,
    },
    /// The table's address, or a sub-table's offset, is not suitably aligned.
    Misaligned {
        /// Which part.
        part: Part,
        /// Its offset (0 with `Part::Header`: the table's own address).
        offset: u32,
    },
    /// A sub-table extends past `total_size` (or its size overflows).
    OutOfBounds {
        /// Which part.
        part: Part,
        /// Its offset.
        offset: u32,
        /// Its count.
        count: u32,
    },
    /// A sub-table overlaps the header or another sub-table.
    Overlap {
        /// One part.
        a: Part,
        /// The other.
        b: Part,
    },
    /// The string table does not end in NUL.
    StringTableUnterminated,
    /// A name offset points outside the string table.
    StringOutOfBounds {
        /// The offset.
        offset: u32,
    },
    /// A name is not valid UTF-8.
    StringNotUtf8 {
        /// The offset.
        offset: u32,
    },
    /// A self-relative reference leaves the 64-bit address space.
    AddressOverflow {
        /// Which part holds the entry.
        part: Part,
        /// Entry index.
        index: u32,
    },
    /// A descriptor's code pointer does not lie in an executable range (or, for the
    /// slot, lies in one, or is not 8-aligned).
    BadIfuncPointer {
        /// Descriptor index.
        ifunc: u32,
        /// Which pointer.
        field: IfuncField,
        /// Its address.
        addr: u64,
    },
    /// Descriptors are not sorted: defined ones by trampoline address, then imports by
    /// name.
    IfuncsUnsorted {
        /// The first descriptor out of order.
        ifunc: u32,
    },
    /// Two descriptors share a trampoline (or two imports a name).
    DuplicateIfunc {
        /// The later descriptor.
        ifunc: u32,
    },
    /// A site's kind bits are invalid.
    BadSiteKind {
        /// Site index.
        site: u32,
    },
    /// A site's reserved bits are set.
    ReservedSiteBits {
        /// Site index.
        site: u32,
    },
    /// A site names a descriptor that does not exist.
    IfuncIndexOutOfRange {
        /// Site index.
        site: u32,
        /// The index it names.
        ifunc: u32,
        /// Number of descriptors.
        count: u32,
    },
    /// A site's instruction is longer than [`MAX_SITE_LEN`] (too many prefixes).
    SiteTooLong {
        /// Site index.
        site: u32,
    },
    /// Sites are not in strictly ascending address order, or two sites overlap.
    Unsorted {
        /// Index of the first site out of order.
        site: u32,
    },
    /// A probe site's kind bits are invalid or reserved bits are set.
    BadProbeSite {
        /// Probe site index.
        site: u32,
    },
    /// A probe site names a probe that does not exist.
    ProbeIndexOutOfRange {
        /// Probe site index.
        site: u32,
        /// The index it names.
        probe: u32,
        /// Number of probes.
        count: u32,
    },
    /// Probe sites are not sorted and disjoint.
    ProbeSitesUnsorted {
        /// Index of the first site out of order.
        site: u32,
    },
    /// A probe site, or a Rust site's out-of-line target, is not in an executable range.
    ProbeSiteNotExecutable {
        /// Probe site index.
        site: u32,
        /// The address.
        addr: u64,
    },
    /// A probe descriptor declares more than six arguments, or has reserved flags set.
    BadProbeDesc {
        /// Probe index.
        probe: u32,
    },
    /// A site does not lie wholly inside one executable range.
    SiteNotExecutable {
        /// Site index.
        site: u32,
        /// Its address.
        addr: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::Truncated { len, needed } => {
                write!(f, "table truncated: {len} bytes, need at least {needed}")
            }
            FormatError::BadMagic => write!(f, "bad table magic (expected \"KSITES\\0\\0\")"),
            FormatError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported table version {v} (this reader knows {VERSION})"
                )
            }
            FormatError::WrongArch(a) => {
                write!(
                    f,
                    "table is for architecture {a}, expected {ARCH_X86_64} (x86-64)"
                )
            }
            FormatError::UnknownFlags(x) => write!(f, "unknown header flags {x:#x}"),
            FormatError::BadHeaderSize(s) => {
                write!(f, "header size {s}, expected {HEADER_SIZE}")
            }
            FormatError::BadTotalSize { total_size, len } => write!(
                f,
                "declared table size {total_size} does not fit the {len} bytes available"
            ),
            FormatError::Misaligned { part, offset } => {
                write!(f, "{part} at offset {offset:#x} is misaligned")
            }
            FormatError::OutOfBounds {
                part,
                offset,
                count,
            } => write!(
                f,
                "{part} (offset {offset:#x}, count {count}) extend past the end of the table"
            ),
            FormatError::Overlap { a, b } => write!(f, "{a} overlap {b}"),
            FormatError::StringTableUnterminated => {
                write!(f, "string table does not end with NUL")
            }
            FormatError::StringOutOfBounds { offset } => {
                write!(f, "name offset {offset:#x} is outside the string table")
            }
            FormatError::StringNotUtf8 { offset } => {
                write!(f, "name at string offset {offset:#x} is not UTF-8")
            }
            FormatError::AddressOverflow { part, index } => {
                write!(
                    f,
                    "{part} entry {index}: reference overflows the address space"
                )
            }
            FormatError::BadIfuncPointer { ifunc, field, addr } => match field {
                IfuncField::Slot => write!(
                    f,
                    "ifunc {ifunc}: slot {addr:#x} is misaligned or lies in executable text"
                ),
                _ => write!(
                    f,
                    "ifunc {ifunc}: {field} {addr:#x} is not in an executable range"
                ),
            },
            FormatError::IfuncsUnsorted { ifunc } => {
                write!(
                    f,
                    "ifunc {ifunc}: descriptors must be sorted by trampoline address, imports last and by name"
                )
            }
            FormatError::DuplicateIfunc { ifunc } => {
                write!(
                    f,
                    "ifunc {ifunc}: trampoline (or import name) already described by an earlier entry"
                )
            }
            FormatError::BadSiteKind { site } => write!(f, "ifunc site {site}: invalid kind"),
            FormatError::ReservedSiteBits { site } => {
                write!(f, "ifunc site {site}: reserved bits set")
            }
            FormatError::IfuncIndexOutOfRange { site, ifunc, count } => write!(
                f,
                "ifunc site {site}: names ifunc {ifunc}, but there are only {count}"
            ),
            FormatError::SiteTooLong { site } => write!(
                f,
                "ifunc site {site}: instruction longer than {MAX_SITE_LEN} bytes (too many prefixes)"
            ),
            FormatError::Unsorted { site } => write!(
                f,
                "ifunc site {site}: not after the previous site (sites must be sorted and disjoint)"
            ),
            FormatError::BadProbeSite { site } => {
                write!(f, "probe site {site}: invalid kind or reserved bits set")
            }
            FormatError::ProbeIndexOutOfRange { site, probe, count } => write!(
                f,
                "probe site {site}: names probe {probe}, but there are only {count}"
            ),
            FormatError::ProbeSitesUnsorted { site } => write!(
                f,
                "probe site {site}: not after the previous site (sites must be sorted and disjoint)"
            ),
            FormatError::ProbeSiteNotExecutable { site, addr } => write!(
                f,
                "probe site {site}: {addr:#x} is not inside an executable range"
            ),
            FormatError::BadProbeDesc { probe } => {
                write!(
                    f,
                    "probe {probe}: more than 6 arguments or reserved flags set"
                )
            }
            FormatError::SiteNotExecutable { site, addr } => write!(
                f,
                "ifunc site {site} at {addr:#x} is not inside an executable range"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FormatError {}

// ---------------------------------------------------------------------------------------
// Little-endian field access that cannot panic.

#[inline]
fn rd_u16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        x.copy_from_slice(s);
    }
    u16::from_le_bytes(x)
}

#[inline]
fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

#[inline]
fn rd_i32(b: &[u8], at: usize) -> i32 {
    rd_u32(b, at) as i32
}

impl SubTable {
    fn read(b: &[u8], at: usize) -> SubTable {
        SubTable {
            offset: rd_u32(b, at),
            count: rd_u32(b, at + 4),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.offset.to_le_bytes());
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
    }
}

impl Header {
    /// Decodes a header from the first [`HEADER_SIZE`] bytes (no validation).
    pub fn read(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                len: b.len(),
                needed: HEADER_SIZE,
            });
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        Ok(Header {
            magic,
            version: rd_u16(b, 8),
            arch: rd_u16(b, 10),
            flags: rd_u32(b, 12),
            header_size: rd_u32(b, 16),
            total_size: rd_u32(b, 20),
            ifuncs: SubTable::read(b, 24),
            ifunc_sites: SubTable::read(b, 32),
            probes: SubTable::read(b, 40),
            probe_sites: SubTable::read(b, 48),
            strings: SubTable::read(b, 56),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(&self.magic);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.arch.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.header_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.total_size.to_le_bytes());
        self.ifuncs.write(&mut b[24..32]);
        self.ifunc_sites.write(&mut b[32..40]);
        self.probes.write(&mut b[40..48]);
        self.probe_sites.write(&mut b[48..56]);
        self.strings.write(&mut b[56..64]);
        b
    }
}

impl IfuncDesc {
    /// Decodes a descriptor (no validation).
    #[inline]
    pub fn read(b: &[u8]) -> IfuncDesc {
        IfuncDesc {
            trampoline: rd_i32(b, 0),
            slot: rd_i32(b, 4),
            resolver: rd_i32(b, 8),
            default: rd_i32(b, 12),
            name: rd_u32(b, 16),
        }
    }

    /// Encodes the descriptor.
    pub fn to_bytes(&self) -> [u8; IFUNC_DESC_SIZE] {
        let mut b = [0u8; IFUNC_DESC_SIZE];
        b[0..4].copy_from_slice(&self.trampoline.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..12].copy_from_slice(&self.resolver.to_le_bytes());
        b[12..16].copy_from_slice(&self.default.to_le_bytes());
        b[16..20].copy_from_slice(&self.name.to_le_bytes());
        b
    }
}

impl IfuncSite {
    /// Decodes a site entry (no validation).
    #[inline]
    pub fn read(b: &[u8]) -> IfuncSite {
        IfuncSite {
            site: rd_i32(b, 0),
            info: rd_u32(b, 4),
        }
    }

    /// Encodes the site entry.
    pub fn to_bytes(&self) -> [u8; IFUNC_SITE_SIZE] {
        let mut b = [0u8; IFUNC_SITE_SIZE];
        b[0..4].copy_from_slice(&self.site.to_le_bytes());
        b[4..8].copy_from_slice(&self.info.to_le_bytes());
        b
    }
}

impl ProbeDesc {
    /// Decodes a descriptor (no validation).
    pub fn read(b: &[u8]) -> ProbeDesc {
        ProbeDesc {
            provider: rd_u32(b, 0),
            name: rd_u32(b, 4),
            nargs: rd_u16(b, 8),
            flags: rd_u16(b, 10),
        }
    }

    /// Encodes the descriptor.
    pub fn to_bytes(&self) -> [u8; PROBE_DESC_SIZE] {
        let mut b = [0u8; PROBE_DESC_SIZE];
        b[0..4].copy_from_slice(&self.provider.to_le_bytes());
        b[4..8].copy_from_slice(&self.name.to_le_bytes());
        b[8..10].copy_from_slice(&self.nargs.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

impl ProbeSite {
    /// Decodes a probe site (no validation).
    #[inline]
    pub fn read(b: &[u8]) -> ProbeSite {
        ProbeSite {
            site: rd_i32(b, 0),
            target: rd_i32(b, 4),
            info: rd_u32(b, 8),
        }
    }

    /// Encodes the probe site.
    pub fn to_bytes(&self) -> [u8; PROBE_SITE_SIZE] {
        let mut b = [0u8; PROBE_SITE_SIZE];
        b[0..4].copy_from_slice(&self.site.to_le_bytes());
        b[4..8].copy_from_slice(&self.target.to_le_bytes());
        b[8..12].copy_from_slice(&self.info.to_le_bytes());
        b
    }

    /// Packs `info`; `None` if the index does not fit in 24 bits.
    pub const fn pack_info(kind: ProbeKind, probe: u32) -> Option<u32> {
        if probe >= MAX_IFUNCS {
            return None;
        }
        Some(kind.bits() | (probe << 8))
    }
}

/// `address_of(field) + rel`, or `None` on overflow.
#[inline]
pub fn resolve_rel(field_addr: u64, rel: i32) -> Option<u64> {
    field_addr.checked_add_signed(i64::from(rel))
}

/// The `i32` that makes `field_addr + rel == target`, or `None` if out of reach.
pub fn make_rel(field_addr: u64, target: u64) -> Option<i32> {
    let d = (target as i128) - (field_addr as i128);
    i32::try_from(d).ok()
}

// ---------------------------------------------------------------------------------------
// The validated table.

/// A validated table. Cheap to copy; borrows the table bytes.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    bytes: &'a [u8],
    base: u64,
    header: Header,
}

/// A decoded ifunc descriptor with absolute addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ifunc<'a> {
    /// Index in the table.
    pub index: u32,
    /// Name (from the string table).
    pub name: &'a str,
    /// Trampoline address.
    pub trampoline: u64,
    /// Slot address.
    pub slot: u64,
    /// Resolver address.
    pub resolver: u64,
    /// Default implementation address.
    pub default: u64,
    /// An *import*: an ifunc another image (the kernel) defines, which a module calls.
    /// Its descriptor has `slot`, `resolver` and `default` all 0 (a self-relative 0
    /// would point into the table itself, which is never code); only the trampoline is
    /// set, by the module's relocation. The decoded `slot`, `resolver` and `default`
    /// are 0; the loader patches its sites to whatever the trampoline's slot holds.
    pub imported: bool,
}

impl Ifunc<'_> {
    /// Whether a raw descriptor is an import (see [`Ifunc::imported`]).
    pub const fn desc_is_import(d: &IfuncDesc) -> bool {
        d.slot == 0 && d.resolver == 0 && d.default == 0
    }
}

/// A decoded ifunc site with its absolute address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// Index in the table.
    pub index: u32,
    /// Address of the instruction's first byte.
    pub addr: u64,
    /// The instruction.
    pub kind: SiteKind,
    /// Number of prefix bytes before the opcode.
    pub prefixes: u8,
    /// Index of the ifunc it calls.
    pub ifunc: u32,
}

impl Site {
    /// Length of the whole instruction.
    pub const fn len(&self) -> usize {
        self.prefixes as usize + self.kind.opcode_len() + 4
    }

    /// Always false: an instruction has at least five bytes.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Address of the rel32 field (the last four bytes).
    pub const fn rel32_addr(&self) -> u64 {
        self.addr + (self.prefixes as u64) + self.kind.opcode_len() as u64
    }

    /// Address of the next instruction (what rel32 is relative to).
    pub const fn end(&self) -> u64 {
        self.addr + self.len() as u64
    }
}

/// A decoded probe descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe<'a> {
    /// Index in the table.
    pub index: u32,
    /// Provider.
    pub provider: &'a str,
    /// Name.
    pub name: &'a str,
    /// Declared argument count, or [`NARGS_UNKNOWN`].
    pub nargs: u16,
}

/// A decoded probe site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PSite {
    /// Index in the table.
    pub index: u32,
    /// Address of the 5-byte instruction.
    pub addr: u64,
    /// Out-of-line target (Rust sites), else 0.
    pub target: u64,
    /// The kind.
    pub kind: ProbeKind,
    /// Index of its probe.
    pub probe: u32,
}

fn in_ranges(exec: &[Range<u64>], start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    exec.iter().any(|r| r.start <= start && end <= r.end)
}

fn sub_end(part: Part, st: SubTable, entry: usize, total: u32) -> Result<u32, FormatError> {
    let oob = FormatError::OutOfBounds {
        part,
        offset: st.offset,
        count: st.count,
    };
    let size = (st.count as u64).checked_mul(entry as u64).ok_or(oob)?;
    let end = (st.offset as u64).checked_add(size).ok_or(oob)?;
    if end > total as u64 {
        return Err(oob);
    }
    Ok(end as u32)
}

impl<'a> Table<'a> {
    /// Validates `bytes` as a table living at address `base` (for a table in memory,
    /// `bytes.as_ptr() as u64`; for a file, the table's virtual address).
    ///
    /// `exec` lists the executable address ranges of the image or module: every site,
    /// trampoline, resolver and default implementation must lie inside one of them.
    /// Bytes after `total_size` are ignored.
    pub fn parse(
        bytes: &'a [u8],
        base: u64,
        exec: &[Range<u64>],
    ) -> Result<Table<'a>, FormatError> {
        Table::parse_module(bytes, base, exec, exec)
    }

    /// [`Table::parse`] for a module's table: everything the module defines (sites,
    /// probe sites, its own ifuncs) must lie in `exec`, its executable ranges, while the
    /// trampolines of imported ifuncs must lie in `import_exec`, the defining image's
    /// (the kernel's) executable ranges.
    pub fn parse_module(
        bytes: &'a [u8],
        base: u64,
        exec: &[Range<u64>],
        import_exec: &[Range<u64>],
    ) -> Result<Table<'a>, FormatError> {
        let header = Header::read(bytes)?;
        if header.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if header.version != VERSION {
            return Err(FormatError::UnsupportedVersion(header.version));
        }
        if header.arch != ARCH_X86_64 {
            return Err(FormatError::WrongArch(header.arch));
        }
        if header.flags != 0 {
            return Err(FormatError::UnknownFlags(header.flags));
        }
        if header.header_size as usize != HEADER_SIZE {
            return Err(FormatError::BadHeaderSize(header.header_size));
        }
        if (header.total_size as usize) < HEADER_SIZE || header.total_size as usize > bytes.len() {
            return Err(FormatError::BadTotalSize {
                total_size: header.total_size,
                len: bytes.len(),
            });
        }
        if !base.is_multiple_of(TABLE_ALIGN) {
            return Err(FormatError::Misaligned {
                part: Part::Header,
                offset: 0,
            });
        }
        let bytes = &bytes[..header.total_size as usize];
        let total = header.total_size;

        // Bounds and alignment of each sub-table, then pairwise disjointness.
        let parts = [
            (Part::Ifuncs, header.ifuncs, IFUNC_DESC_SIZE, 4u32),
            (Part::IfuncSites, header.ifunc_sites, IFUNC_SITE_SIZE, 4),
            (Part::Probes, header.probes, PROBE_DESC_SIZE, 4),
            (Part::ProbeSites, header.probe_sites, PROBE_SITE_SIZE, 4),
            (Part::Strings, header.strings, 1, 1),
        ];
        let mut spans = [(Part::Header, 0u32, HEADER_SIZE as u32); 6];
        for (i, &(part, st, entry, align)) in parts.iter().enumerate() {
            if !st.offset.is_multiple_of(align) {
                return Err(FormatError::Misaligned {
                    part,
                    offset: st.offset,
                });
            }
            let end = sub_end(part, st, entry, total)?;
            spans[i + 1] = (part, st.offset, end);
        }
        for i in 0..spans.len() {
            for j in i + 1..spans.len() {
                let (a, a0, a1) = spans[i];
                let (b, b0, b1) = spans[j];
                if a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1 {
                    return Err(FormatError::Overlap { a, b });
                }
            }
        }
        if header.strings.count > 0 {
            let last = header.strings.offset as usize + header.strings.count as usize - 1;
            if bytes.get(last) != Some(&0) {
                return Err(FormatError::StringTableUnterminated);
            }
        }

        let table = Table {
            bytes,
            base,
            header,
        };
        table.validate_ifuncs(exec, import_exec)?;
        table.validate_sites(exec)?;
        table.validate_probes(exec)?;
        Ok(table)
    }

    fn validate_ifuncs(
        &self,
        exec: &[Range<u64>],
        import_exec: &[Range<u64>],
    ) -> Result<(), FormatError> {
        let n = self.header.ifuncs.count;
        for i in 0..n {
            let f = self.try_ifunc(i)?;
            if f.imported {
                // Only the trampoline is known; it lies in the defining image's text,
                // which the caller includes in `exec`.
                if !in_ranges(import_exec, f.trampoline, TRAMPOLINE_LEN as u64) {
                    return Err(FormatError::BadIfuncPointer {
                        ifunc: i,
                        field: IfuncField::Trampoline,
                        addr: f.trampoline,
                    });
                }
                continue;
            }
            for (field, addr, len) in [
                (IfuncField::Trampoline, f.trampoline, TRAMPOLINE_LEN as u64),
                (IfuncField::Resolver, f.resolver, 1),
                (IfuncField::Default, f.default, 1),
            ] {
                if !in_ranges(exec, addr, len) {
                    return Err(FormatError::BadIfuncPointer {
                        ifunc: i,
                        field,
                        addr,
                    });
                }
            }
            if !f.slot.is_multiple_of(8)
                || f.slot.checked_add(8).is_none()
                || exec_overlaps(exec, f.slot, 8)
            {
                return Err(FormatError::BadIfuncPointer {
                    ifunc: i,
                    field: IfuncField::Slot,
                    addr: f.slot,
                });
            }
        }
        // Defined descriptors come first, sorted by trampoline address, which makes
        // "distinct trampolines" a linear check (no allocation, no quadratic scan).
        // Imports follow, sorted by name: their trampolines are only known once the
        // module is relocated, so their address order is not known when the table is
        // written.
        let mut prev = None;
        let mut prev_import: Option<&str> = None;
        for i in 0..n {
            let f = self.try_ifunc(i)?;
            if f.imported {
                match prev_import {
                    Some(p) if f.name == p => return Err(FormatError::DuplicateIfunc { ifunc: i }),
                    Some(p) if f.name < p => return Err(FormatError::IfuncsUnsorted { ifunc: i }),
                    _ => {}
                }
                prev_import = Some(f.name);
                continue;
            }
            if prev_import.is_some() {
                return Err(FormatError::IfuncsUnsorted { ifunc: i });
            }
            let t = f.trampoline;
            match prev {
                Some(p) if t == p => return Err(FormatError::DuplicateIfunc { ifunc: i }),
                Some(p) if t < p => return Err(FormatError::IfuncsUnsorted { ifunc: i }),
                _ => {}
            }
            prev = Some(t);
        }
        Ok(())
    }

    fn validate_sites(&self, exec: &[Range<u64>]) -> Result<(), FormatError> {
        let n = self.header.ifunc_sites.count;
        let mut prev_end = 0u64;
        for i in 0..n {
            let s = self.try_site(i)?;
            if s.len() > MAX_SITE_LEN {
                return Err(FormatError::SiteTooLong { site: i });
            }
            if i > 0 && s.addr < prev_end {
                return Err(FormatError::Unsorted { site: i });
            }
            if !in_ranges(exec, s.addr, s.len() as u64) {
                return Err(FormatError::SiteNotExecutable {
                    site: i,
                    addr: s.addr,
                });
            }
            prev_end = s.end();
        }
        Ok(())
    }

    fn validate_probes(&self, exec: &[Range<u64>]) -> Result<(), FormatError> {
        for i in 0..self.header.probes.count {
            let p = self.try_probe(i)?;
            if p.nargs > 6 && p.nargs != NARGS_UNKNOWN {
                return Err(FormatError::BadProbeDesc { probe: i });
            }
        }
        let mut prev_end = 0u64;
        for i in 0..self.header.probe_sites.count {
            let s = self.try_psite(i)?;
            if i > 0 && s.addr < prev_end {
                return Err(FormatError::ProbeSitesUnsorted { site: i });
            }
            if !in_ranges(exec, s.addr, PROBE_SITE_LEN as u64) {
                return Err(FormatError::ProbeSiteNotExecutable {
                    site: i,
                    addr: s.addr,
                });
            }
            if s.kind.is_rust() && !in_ranges(exec, s.target, 1) {
                return Err(FormatError::ProbeSiteNotExecutable {
                    site: i,
                    addr: s.target,
                });
            }
            prev_end = s.addr + PROBE_SITE_LEN as u64;
        }
        Ok(())
    }

    fn try_probe(&self, i: u32) -> Result<Probe<'a>, FormatError> {
        let off = self.header.probes.offset as usize + i as usize * PROBE_DESC_SIZE;
        let d = ProbeDesc::read(&self.bytes[off..off + PROBE_DESC_SIZE]);
        if d.flags != 0 {
            return Err(FormatError::BadProbeDesc { probe: i });
        }
        Ok(Probe {
            index: i,
            provider: self.string(d.provider)?,
            name: self.string(d.name)?,
            nargs: d.nargs,
        })
    }

    #[inline(always)]
    fn try_psite(&self, i: u32) -> Result<PSite, FormatError> {
        let off = self.header.probe_sites.offset as usize + i as usize * PROBE_SITE_SIZE;
        let e = ProbeSite::read(&self.bytes[off..off + PROBE_SITE_SIZE]);
        let kind = ProbeKind::from_bits(e.info & 7).ok_or(FormatError::BadProbeSite { site: i })?;
        if e.info & 0xf8 != 0 {
            return Err(FormatError::BadProbeSite { site: i });
        }
        let probe = e.info >> 8;
        if probe >= self.header.probes.count {
            return Err(FormatError::ProbeIndexOutOfRange {
                site: i,
                probe,
                count: self.header.probes.count,
            });
        }
        let ovf = FormatError::AddressOverflow {
            part: Part::ProbeSites,
            index: i,
        };
        let addr = resolve_rel(self.field_addr(off), e.site).ok_or(ovf)?;
        let target = if kind.is_rust() {
            resolve_rel(self.field_addr(off + 4), e.target).ok_or(ovf)?
        } else {
            0
        };
        Ok(PSite {
            index: i,
            addr,
            target,
            kind,
            probe,
        })
    }

    /// Number of probes.
    pub fn probe_count(&self) -> u32 {
        self.header.probes.count
    }

    /// Number of probe sites.
    #[inline]
    pub fn probe_site_count(&self) -> u32 {
        self.header.probe_sites.count
    }

    /// Probe `i`.
    pub fn probe(&self, i: u32) -> Option<Probe<'a>> {
        if i >= self.probe_count() {
            return None;
        }
        self.try_probe(i).ok()
    }

    /// Probe site `i`.
    #[inline]
    pub fn probe_site(&self, i: u32) -> Option<PSite> {
        if i >= self.probe_site_count() {
            return None;
        }
        self.try_psite(i).ok()
    }

    /// All probes.
    pub fn probes(&self) -> impl Iterator<Item = Probe<'a>> + '_ {
        (0..self.probe_count()).filter_map(|i| self.probe(i))
    }

    /// All probe sites, in address order.
    pub fn probe_sites(&self) -> impl Iterator<Item = PSite> + '_ {
        (0..self.probe_site_count()).filter_map(|i| self.probe_site(i))
    }

    /// The probe site starting exactly at `addr` (binary search).
    pub fn probe_site_at(&self, addr: u64) -> Option<PSite> {
        let (mut lo, mut hi) = (0u32, self.probe_site_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = self.probe_site(mid)?;
            if addr < s.addr {
                hi = mid;
            } else if addr > s.addr {
                lo = mid + 1;
            } else {
                return Some(s);
            }
        }
        None
    }

    #[inline]
    fn field_addr(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    fn string(&self, offset: u32) -> Result<&'a str, FormatError> {
        let st = self.header.strings;
        if offset >= st.count {
            return Err(FormatError::StringOutOfBounds { offset });
        }
        let start = st.offset as usize + offset as usize;
        let end = st.offset as usize + st.count as usize;
        let s = &self.bytes[start..end];
        // The table ends in NUL (checked in parse), so this always finds one.
        let len = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        core::str::from_utf8(&s[..len]).map_err(|_| FormatError::StringNotUtf8 { offset })
    }

    fn try_ifunc(&self, i: u32) -> Result<Ifunc<'a>, FormatError> {
        let off = self.header.ifuncs.offset as usize + i as usize * IFUNC_DESC_SIZE;
        let d = IfuncDesc::read(&self.bytes[off..off + IFUNC_DESC_SIZE]);
        let ovf = FormatError::AddressOverflow {
            part: Part::Ifuncs,
            index: i,
        };
        let at = |field: usize, rel: i32| resolve_rel(self.field_addr(off + field), rel).ok_or(ovf);
        if Ifunc::desc_is_import(&d) {
            return Ok(Ifunc {
                index: i,
                name: self.string(d.name)?,
                trampoline: at(0, d.trampoline)?,
                slot: 0,
                resolver: 0,
                default: 0,
                imported: true,
            });
        }
        Ok(Ifunc {
            index: i,
            name: self.string(d.name)?,
            trampoline: at(0, d.trampoline)?,
            slot: at(4, d.slot)?,
            resolver: at(8, d.resolver)?,
            default: at(12, d.default)?,
            imported: false,
        })
    }

    #[inline]
    fn try_site(&self, i: u32) -> Result<Site, FormatError> {
        let off = self.header.ifunc_sites.offset as usize + i as usize * IFUNC_SITE_SIZE;
        let e = IfuncSite::read(&self.bytes[off..off + IFUNC_SITE_SIZE]);
        let kind = SiteKind::from_bits(e.info & 3).ok_or(FormatError::BadSiteKind { site: i })?;
        if e.info & 0xe0 != 0 {
            return Err(FormatError::ReservedSiteBits { site: i });
        }
        let prefixes = ((e.info >> 2) & 7) as u8;
        let ifunc = e.info >> 8;
        if ifunc >= self.header.ifuncs.count {
            return Err(FormatError::IfuncIndexOutOfRange {
                site: i,
                ifunc,
                count: self.header.ifuncs.count,
            });
        }
        let addr =
            resolve_rel(self.field_addr(off), e.site).ok_or(FormatError::AddressOverflow {
                part: Part::IfuncSites,
                index: i,
            })?;
        Ok(Site {
            index: i,
            addr,
            kind,
            prefixes,
            ifunc,
        })
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The address the table was validated at.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The table's bytes (exactly `total_size` of them).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of ifunc descriptors.
    #[inline]
    pub fn ifunc_count(&self) -> u32 {
        self.header.ifuncs.count
    }

    /// Number of ifunc sites.
    #[inline]
    pub fn site_count(&self) -> u32 {
        self.header.ifunc_sites.count
    }

    /// Descriptor `i`, or `None` if out of range.
    pub fn ifunc(&self, i: u32) -> Option<Ifunc<'a>> {
        if i >= self.ifunc_count() {
            return None;
        }
        self.try_ifunc(i).ok()
    }

    /// Trampoline and slot addresses of ifunc `i`, without decoding its name (what the
    /// patch engine needs for every site). `None` if out of range. The slot of an
    /// import is 0 here (the engine reads it from the trampoline).
    #[inline]
    pub fn ifunc_trampoline_slot(&self, i: u32) -> Option<(u64, u64)> {
        if i >= self.ifunc_count() {
            return None;
        }
        let off = self.header.ifuncs.offset as usize + i as usize * IFUNC_DESC_SIZE;
        let d = IfuncDesc::read(&self.bytes[off..off + IFUNC_DESC_SIZE]);
        let trampoline = resolve_rel(self.field_addr(off), d.trampoline)?;
        if Ifunc::desc_is_import(&d) {
            return Some((trampoline, 0));
        }
        Some((trampoline, resolve_rel(self.field_addr(off + 4), d.slot)?))
    }

    /// Site `i`, or `None` if out of range.
    #[inline]
    pub fn site(&self, i: u32) -> Option<Site> {
        if i >= self.site_count() {
            return None;
        }
        self.try_site(i).ok()
    }

    /// All descriptors, in table order.
    pub fn ifuncs(&self) -> impl Iterator<Item = Ifunc<'a>> + '_ {
        (0..self.ifunc_count()).filter_map(|i| self.ifunc(i))
    }

    /// All sites, in address order.
    #[inline]
    pub fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        (0..self.site_count()).filter_map(|i| self.site(i))
    }

    /// The site whose instruction contains `addr` (binary search).
    pub fn site_containing(&self, addr: u64) -> Option<Site> {
        let (mut lo, mut hi) = (0u32, self.site_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = self.site(mid)?;
            if addr < s.addr {
                hi = mid;
            } else if addr >= s.end() {
                lo = mid + 1;
            } else {
                return Some(s);
            }
        }
        None
    }
}

fn exec_overlaps(exec: &[Range<u64>], start: u64, len: u64) -> bool {
    let end = start.saturating_add(len);
    exec.iter().any(|r| r.start < end && start < r.end)
}
