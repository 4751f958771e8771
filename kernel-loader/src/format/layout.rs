//! The table's plain-old-data structs and their little-endian byte encodings (no
//! validation: that is [`super::reader`]'s job).

use super::{
    FormatError, HEADER_SIZE, HEADER_SIZE_V1, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, KEY_DESC_SIZE,
    KEY_SITE_SIZE, PROBE_DESC_SIZE, PROBE_SITE_SIZE,
};
use crate::arch::SiteKind;

/// Offset and count of one sub-table (for strings: offset and size in bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubTable {
    /// Byte offset from the start of the table.
    pub offset: u32,
    /// Number of entries (bytes, for the string table).
    pub count: u32,
}

/// The table header: [`HEADER_SIZE`] bytes in v2, [`HEADER_SIZE_V1`] in v1 (which ends
/// before `keys`; a v1 header decodes with empty key sub-tables).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`](super::MAGIC).
    pub magic: [u8; 8],
    /// [`VERSION`](super::VERSION).
    pub version: u16,
    /// The architecture: a [`crate::arch::ids`] value ([`super::ARCH_X86_64`] today).
    pub arch: u16,
    /// Reserved, must be 0.
    pub flags: u32,
    /// [`HEADER_SIZE`] (v2) or [`HEADER_SIZE_V1`] (v1).
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
    /// [`KeyDesc`] entries (v2; empty in a v1 table).
    pub keys: SubTable,
    /// [`KeySite`] entries (v2; empty in a v1 table).
    pub key_sites: SubTable,
}

/// One ifunc: where its trampoline, slot, resolver and default implementation live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfuncDesc {
    /// Self-relative: the trampoline (an indirect jump through the slot) every original
    /// call targets.
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
    /// Number of arguments (0..=6), or [`NARGS_UNKNOWN`](super::NARGS_UNKNOWN).
    pub nargs: u16,
    /// Reserved, 0.
    pub flags: u16,
}

/// One probe site: one instruction (the architecture's probe site length) the loader
/// toggles between a disabled and an enabled form. 12 bytes: Rust sites carry their out-of-line target (as Linux's
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

/// One static key an image's sites test (12 bytes). A key object is data (a
/// `kernel_loader::key::StaticKey`); the table names it and says how it starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyDesc {
    /// Self-relative: the key object. Never 0 (that would point into the table itself).
    pub key: i32,
    /// String-table offset of the key's name.
    pub name: u32,
    /// Bit 0 ([`KEY_DEFAULT_TRUE`]): the key starts enabled; bit 1 ([`KEY_IMPORTED`]):
    /// another image's key (a module's sites of a kernel key); other bits reserved (0).
    pub flags: u32,
}

/// One static-key site (12 bytes): one instruction (the architecture's probe site
/// length) that holds either the native NOP or a branch to `target`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySite {
    /// Self-relative: the site instruction's first byte.
    pub site: i32,
    /// Self-relative: the branch target (the asm-goto label).
    pub target: i32,
    /// Bit 0 ([`KEY_SITE_LIKELY`]): a `static_branch_likely!` site; bits 1..=7 reserved
    /// (0); bits 8..=31: the key's index in the key descriptors.
    pub info: u32,
}

/// `KeyDesc::flags`: the key's default (boot) state is enabled.
pub const KEY_DEFAULT_TRUE: u32 = 1;
/// `KeyDesc::flags`: the key object is another image's (an import).
pub const KEY_IMPORTED: u32 = 2;
/// `KeySite::info`: the site is a `static_branch_likely!` (falls through when enabled).
pub const KEY_SITE_LIKELY: u32 = 1;
/// Largest key index a site can name, plus one (24 bits).
pub const MAX_KEYS: u32 = 1 << 24;

pub use crate::arch::ProbeKind;

/// Largest number of prefix bytes a site's encoding can carry (3 bits).
pub const MAX_PREFIXES: u32 = 7;
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
    /// Decodes a header (no validation): the v1 fields from the first
    /// [`HEADER_SIZE_V1`] bytes, and the key sub-tables from bytes 64..80 when `version`
    /// is 2 or more and they are there (else empty: [`Table::parse`](super::Table::parse)
    /// checks a v2 table is long enough).
    pub fn read(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SIZE_V1 {
            return Err(FormatError::Truncated {
                len: b.len(),
                needed: HEADER_SIZE_V1,
            });
        }
        let version = rd_u16(b, 8);
        let v2 = version >= 2 && b.len() >= HEADER_SIZE;
        let sub = |at| {
            if v2 {
                SubTable::read(b, at)
            } else {
                SubTable::default()
            }
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        Ok(Header {
            magic,
            version,
            arch: rd_u16(b, 10),
            flags: rd_u32(b, 12),
            header_size: rd_u32(b, 16),
            total_size: rd_u32(b, 20),
            ifuncs: SubTable::read(b, 24),
            ifunc_sites: SubTable::read(b, 32),
            probes: SubTable::read(b, 40),
            probe_sites: SubTable::read(b, 48),
            strings: SubTable::read(b, 56),
            keys: sub(64),
            key_sites: sub(72),
        })
    }

    /// Encodes the header, v2 layout ([`HEADER_SIZE`] bytes, the key sub-tables
    /// included).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..HEADER_SIZE_V1].copy_from_slice(&self.to_bytes_v1());
        self.keys.write(&mut b[64..72]);
        self.key_sites.write(&mut b[72..80]);
        b
    }

    /// Encodes the v1 fields only ([`HEADER_SIZE_V1`] bytes: a v1 header; `keys` and
    /// `key_sites` are not written).
    pub fn to_bytes_v1(&self) -> [u8; HEADER_SIZE_V1] {
        let mut b = [0u8; HEADER_SIZE_V1];
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

impl KeyDesc {
    /// Decodes a key descriptor (no validation).
    #[inline]
    pub fn read(b: &[u8]) -> KeyDesc {
        KeyDesc {
            key: rd_i32(b, 0),
            name: rd_u32(b, 4),
            flags: rd_u32(b, 8),
        }
    }

    /// Encodes the key descriptor.
    pub fn to_bytes(&self) -> [u8; KEY_DESC_SIZE] {
        let mut b = [0u8; KEY_DESC_SIZE];
        b[0..4].copy_from_slice(&self.key.to_le_bytes());
        b[4..8].copy_from_slice(&self.name.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// The `flags` of a key with boot state `default`, imported or not.
    pub const fn pack_flags(default: bool, imported: bool) -> u32 {
        (if default { KEY_DEFAULT_TRUE } else { 0 }) | (if imported { KEY_IMPORTED } else { 0 })
    }
}

impl KeySite {
    /// Decodes a key site (no validation).
    #[inline]
    pub fn read(b: &[u8]) -> KeySite {
        KeySite {
            site: rd_i32(b, 0),
            target: rd_i32(b, 4),
            info: rd_u32(b, 8),
        }
    }

    /// Encodes the key site.
    pub fn to_bytes(&self) -> [u8; KEY_SITE_SIZE] {
        let mut b = [0u8; KEY_SITE_SIZE];
        b[0..4].copy_from_slice(&self.site.to_le_bytes());
        b[4..8].copy_from_slice(&self.target.to_le_bytes());
        b[8..12].copy_from_slice(&self.info.to_le_bytes());
        b
    }

    /// Packs `info`; `None` if the key index does not fit in 24 bits.
    pub const fn pack_info(likely: bool, key: u32) -> Option<u32> {
        if key >= MAX_KEYS {
            return None;
        }
        Some((if likely { KEY_SITE_LIKELY } else { 0 }) | (key << 8))
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
