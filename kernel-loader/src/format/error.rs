//! [`FormatError`]: every way a table can be wrong, and the parts of a table it names.

use core::fmt;

use super::{HEADER_SIZE, HEADER_SIZE_V1, VERSION, VERSION_1};
use crate::arch::{Arch, ids};

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
    /// The static-key descriptors (v2).
    Keys,
    /// The static-key site entries (v2).
    KeySites,
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
            Part::Keys => "key descriptors",
            Part::KeySites => "key sites",
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
    /// The first eight bytes are not [`MAGIC`](super::MAGIC).
    BadMagic,
    /// A version this reader does not understand.
    UnsupportedVersion(u16),
    /// A table for an architecture this crate does not support (an unknown id, or one
    /// reserved in [`crate::arch::ids`] for an architecture not implemented yet).
    WrongArch(u16),
    /// Reserved header flags are set.
    UnknownFlags(u32),
    /// `header_size` is not the size of the table version's header ([`HEADER_SIZE`] for
    /// v2, [`HEADER_SIZE_V1`] for v1).
    BadHeaderSize {
        /// The declared size.
        size: u32,
        /// The table's version.
        version: u16,
    },
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
    /// A site's instruction is longer than its architecture's longest patchable site
    /// ([`crate::arch::Arch::max_site_len`]; too many prefixes).
    SiteTooLong {
        /// Site index.
        site: u32,
    },
    /// A site the table's architecture does not patch: misaligned, or a kind it leaves
    /// on the trampoline ([`crate::arch::Arch::supports_site`]; on aarch64 a
    /// conditional branch).
    SiteUnsupported {
        /// Site index.
        site: u32,
        /// Its address.
        addr: u64,
    },
    /// A probe site's address is not aligned as the table's architecture requires
    /// ([`crate::arch::Arch::probe_align`]).
    ProbeSiteMisaligned {
        /// Probe site index.
        site: u32,
        /// Its address.
        addr: u64,
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
    /// A key descriptor's key pointer is 0, or reserved flags are set.
    BadKeyDesc {
        /// Key index.
        key: u32,
    },
    /// Key descriptors are not sorted by name.
    KeysUnsorted {
        /// The first descriptor out of order.
        key: u32,
    },
    /// A key site's reserved bits are set.
    BadKeySite {
        /// Key site index.
        site: u32,
    },
    /// A key site names a key that does not exist.
    KeyIndexOutOfRange {
        /// Key site index.
        site: u32,
        /// The index it names.
        key: u32,
        /// Number of keys.
        count: u32,
    },
    /// Key sites are not sorted by address and disjoint.
    KeySitesUnsorted {
        /// Index of the first site out of order.
        site: u32,
    },
    /// A key site is not aligned as the table's architecture requires for a probe site
    /// (the same instruction).
    KeySiteMisaligned {
        /// Key site index.
        site: u32,
        /// Its address.
        addr: u64,
    },
    /// A key site, or its branch target, is not in an executable range.
    KeySiteNotExecutable {
        /// Key site index.
        site: u32,
        /// The address (the site's, or its target's).
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
                    "unsupported table version {v} (this reader knows {VERSION_1} and {VERSION})"
                )
            }
            FormatError::WrongArch(a) => {
                match ids::name(a) {
                    Some(name) => write!(f, "table is for architecture {a} ({name})")?,
                    None => write!(f, "table is for unknown architecture {a}")?,
                }
                f.write_str(", this reader supports ")?;
                for (i, arch) in Arch::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{arch} ({})", arch.id())?;
                }
                Ok(())
            }
            FormatError::UnknownFlags(x) => write!(f, "unknown header flags {x:#x}"),
            FormatError::BadHeaderSize { size, version } => {
                let expected = if version == VERSION_1 {
                    HEADER_SIZE_V1
                } else {
                    HEADER_SIZE
                };
                write!(
                    f,
                    "header size {size} in a version {version} table, expected {expected}"
                )
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
                "ifunc site {site}: instruction longer than the architecture allows (too many prefixes)"
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
            FormatError::SiteUnsupported { site, addr } => write!(
                f,
                "ifunc site {site} at {addr:#x}: misaligned, or a branch kind the architecture does not patch"
            ),
            FormatError::ProbeSiteMisaligned { site, addr } => write!(
                f,
                "probe site {site} at {addr:#x} is not aligned to an instruction boundary"
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
            FormatError::BadKeyDesc { key } => write!(
                f,
                "key {key}: null key pointer or reserved flags set (only default and imported are defined)"
            ),
            FormatError::KeysUnsorted { key } => {
                write!(f, "key {key}: key descriptors must be sorted by name")
            }
            FormatError::BadKeySite { site } => {
                write!(f, "key site {site}: reserved bits set")
            }
            FormatError::KeyIndexOutOfRange { site, key, count } => write!(
                f,
                "key site {site}: names key {key}, but there are only {count}"
            ),
            FormatError::KeySitesUnsorted { site } => write!(
                f,
                "key site {site}: not after the previous site (sites must be sorted and disjoint)"
            ),
            FormatError::KeySiteMisaligned { site, addr } => write!(
                f,
                "key site {site} at {addr:#x} is not aligned to an instruction boundary"
            ),
            FormatError::KeySiteNotExecutable { site, addr } => write!(
                f,
                "key site {site}: {addr:#x} is not inside an executable range"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FormatError {}
