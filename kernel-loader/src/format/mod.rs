//! The `.ksites` table, format v2 (the reader also accepts v1).
//!
//! One table per image or module. All multi-byte fields are little-endian. Every
//! reference to code or data is **self-relative**: `target = address_of(field) + value`
//! (an `i32`), so the table needs no run-time relocation and works at any load address.
//!
//! ```text
//! offset 0   Header (80 bytes; 64 in a v1 table)
//!            IfuncDesc[ifuncs.count]        (20 bytes each, 4-aligned, sorted by trampoline)
//!            IfuncSite[ifunc_sites.count]   (8 bytes each, 4-aligned, sorted by address)
//!            ProbeDesc[probes.count]        (12 bytes each, 4-aligned, sorted by name)
//!            ProbeSite[probe_sites.count]   (12 bytes each, 4-aligned, sorted by address)
//!            KeyDesc[keys.count]            (12 bytes each, 4-aligned, sorted by name; v2)
//!            KeySite[key_sites.count]       (12 bytes each, 4-aligned, sorted by address; v2)
//!            strings                        (NUL-terminated UTF-8)
//! ```
//!
//! Version 2 adds the static keys: the v1 header's fields, then the `keys` and
//! `key_sites` sub-tables (header bytes 64..80). A v1 table (64-byte header) has no
//! keys; [`Table::version`] says which version a parsed table is. Writers write v2.
//!
//! [`Table::parse`] validates everything a patcher relies on before anything is touched:
//! sizes, bounds, alignment, ordering, indices, strings, and that every site and code
//! pointer lies inside an executable range supplied by the caller. Accessors on a parsed
//! [`Table`] cannot fail and never panic.
//!
//! The structs in [`layout`] document the layout; they are decoded field by field from
//! bytes (`from_le_bytes`), so reading never depends on the alignment of a host buffer.
//!
//! The format is architecture-neutral: the header's `arch` field names an [`Arch`], and
//! the reader asks it for every instruction fact (site lengths, the probe site length,
//! the trampoline length). A table for an architecture this crate does not support is a
//! [`FormatError::WrongArch`].
//!
//! * [`layout`]: the POD structs and their byte encodings.
//! * [`error`]: [`FormatError`] and the parts it names.
//! * [`reader`]: the validating reader, [`Table`], and the decoded entries.
//! * [`key_reader`]: the decoded keys and key sites ([`Key`], [`KSite`]) and their
//!   validation.

pub mod error;
pub mod key_reader;
pub mod layout;
pub mod reader;

pub use crate::arch::{Arch, SiteKind};
pub use error::{FormatError, IfuncField, Part};
pub use key_reader::{KSite, Key, KeySitesOf};
pub use layout::{
    Header, IfuncDesc, IfuncSite, KEY_DEFAULT_TRUE, KEY_IMPORTED, KEY_SITE_LIKELY, KeyDesc,
    KeySite, MAX_IFUNCS, MAX_KEYS, MAX_PREFIXES, ProbeDesc, ProbeKind, ProbeSite, SubTable,
    make_rel, resolve_rel,
};
pub use reader::{Ifunc, PSite, Probe, ProbeSitesOf, Site, SiteWalk, Table};

/// First eight bytes of every table.
pub const MAGIC: [u8; 8] = *b"KSITES\0\0";
/// The format version writers write (the reader also accepts [`VERSION_1`]).
pub const VERSION: u16 = 2;
/// The first format version: no key sub-tables, a [`HEADER_SIZE_V1`]-byte header.
pub const VERSION_1: u16 = 1;
/// `Header::arch` for x86-64 (= `Arch::X86_64.id()`; see [`crate::arch::ids`] for the
/// reserved ids of other architectures).
pub const ARCH_X86_64: u16 = crate::arch::ids::X86_64;
/// Name of the section the build tool writes.
pub const SECTION_NAME: &str = ".ksites";
/// Required alignment of the table's start address.
pub const TABLE_ALIGN: u64 = 8;

/// Size of a v2 [`Header`] in bytes (what writers write).
pub const HEADER_SIZE: usize = 80;
/// Size of a v1 header in bytes: [`HEADER_SIZE`] without the key sub-tables.
pub const HEADER_SIZE_V1: usize = 64;
/// Size of [`IfuncDesc`] in bytes.
pub const IFUNC_DESC_SIZE: usize = 20;
/// Size of [`IfuncSite`] in bytes.
pub const IFUNC_SITE_SIZE: usize = 8;
/// Size of [`ProbeDesc`] in bytes.
pub const PROBE_DESC_SIZE: usize = 12;
/// Size of [`ProbeSite`] in bytes.
pub const PROBE_SITE_SIZE: usize = 12;
/// Size of [`KeyDesc`] in bytes.
pub const KEY_DESC_SIZE: usize = 12;
/// Size of [`KeySite`] in bytes.
pub const KEY_SITE_SIZE: usize = 12;
/// `ProbeDesc::nargs` when no site declares the argument count.
pub const NARGS_UNKNOWN: u16 = u16::MAX;

/// Length of every probe site on the native architecture (the reader uses the table's
/// [`Arch::probe_site_len`]).
pub const PROBE_SITE_LEN: usize = crate::arch::native::PROBE_SITE_LEN;
/// Longest site instruction the patcher handles on the native architecture (the reader
/// uses the table's [`Arch::max_site_len`]).
pub const MAX_SITE_LEN: usize = crate::arch::native::MAX_SITE_LEN;

/// Tables for the crate's unit tests, built from raw entries.
#[cfg(test)]
pub(crate) mod test_table {
    use super::*;
    use std::vec::Vec;

    /// A table at address `base` with `probes` probes (named `t:p0`, `t:p1`, ...) and
    /// the probe sites `(addr, target, kind, probe)`, as bytes to leak or keep at an
    /// 8-aligned address.
    pub(crate) fn probe_table(
        base: u64,
        probes: u32,
        sites: &[(u64, u64, ProbeKind, u32)],
    ) -> Vec<u8> {
        probe_table_for(ARCH_X86_64, base, probes, sites)
    }

    /// [`probe_table`] with the header's architecture `arch`.
    pub(crate) fn probe_table_for(
        arch: u16,
        base: u64,
        probes: u32,
        sites: &[(u64, u64, ProbeKind, u32)],
    ) -> Vec<u8> {
        table_for(arch, base, probes, sites, &[], &[])
    }

    /// One key of [`key_table`]: its object's address, name, default and imported.
    pub(crate) type KeySpec<'n> = (u64, &'n str, bool, bool);
    /// One key site of [`key_table`]: `(addr, target, likely, key index)`.
    pub(crate) type KeySiteSpec = (u64, u64, bool, u32);

    /// A v2 x86_64 table at `base` with the `keys` (in the given order: sorted by name
    /// for a valid table) and the key `sites`, and no ifuncs or probes.
    pub(crate) fn key_table(base: u64, keys: &[KeySpec<'_>], sites: &[KeySiteSpec]) -> Vec<u8> {
        table_for(ARCH_X86_64, base, 0, &[], keys, sites)
    }

    /// A v2 table for `arch` at `base`: `probes` probes (named `t:p0`, ...), probe
    /// sites, keys and key sites, each sub-table in the given order.
    pub(crate) fn table_for(
        arch: u16,
        base: u64,
        probes: u32,
        sites: &[(u64, u64, ProbeKind, u32)],
        keys: &[KeySpec<'_>],
        key_sites: &[KeySiteSpec],
    ) -> Vec<u8> {
        let mut strings = Vec::new();
        let mut descs = Vec::new();
        for p in 0..probes {
            let provider = strings.len() as u32;
            strings.extend_from_slice(b"t\0");
            let name = strings.len() as u32;
            strings.extend_from_slice(std::format!("p{p}\0").as_bytes());
            descs.push(ProbeDesc {
                provider,
                name,
                nargs: 0,
                flags: 0,
            });
        }
        let mut key_names = Vec::new();
        for &(_, name, _, _) in keys {
            key_names.push(strings.len() as u32);
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
        }
        let probes_off = HEADER_SIZE as u32;
        let sites_off = probes_off + probes * PROBE_DESC_SIZE as u32;
        let keys_off = sites_off + sites.len() as u32 * PROBE_SITE_SIZE as u32;
        let ksites_off = keys_off + keys.len() as u32 * KEY_DESC_SIZE as u32;
        let strs = ksites_off + key_sites.len() as u32 * KEY_SITE_SIZE as u32;
        let total = strs + strings.len() as u32;
        let st = |offset, count: usize| SubTable {
            offset,
            count: count as u32,
        };
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            arch,
            flags: 0,
            header_size: HEADER_SIZE as u32,
            total_size: total,
            ifuncs: st(probes_off, 0),
            ifunc_sites: st(probes_off, 0),
            probes: st(probes_off, probes as usize),
            probe_sites: st(sites_off, sites.len()),
            keys: st(keys_off, keys.len()),
            key_sites: st(ksites_off, key_sites.len()),
            strings: st(strs, strings.len()),
        };
        let mut v = Vec::new();
        v.extend_from_slice(&h.to_bytes());
        for d in &descs {
            v.extend_from_slice(&d.to_bytes());
        }
        for &(addr, target, kind, probe) in sites {
            let field = base + v.len() as u64;
            let e = ProbeSite {
                site: make_rel(field, addr).unwrap(),
                target: if kind.is_rust() {
                    make_rel(field + 4, target).unwrap()
                } else {
                    0
                },
                info: ProbeSite::pack_info(kind, probe).unwrap(),
            };
            v.extend_from_slice(&e.to_bytes());
        }
        for (&(addr, _, default, imported), &name) in keys.iter().zip(&key_names) {
            let field = base + v.len() as u64;
            let d = KeyDesc {
                key: make_rel(field, addr).unwrap(),
                name,
                flags: KeyDesc::pack_flags(default, imported),
            };
            v.extend_from_slice(&d.to_bytes());
        }
        for &(addr, target, likely, key) in key_sites {
            let field = base + v.len() as u64;
            let e = KeySite {
                site: make_rel(field, addr).unwrap(),
                target: make_rel(field + 4, target).unwrap(),
                info: KeySite::pack_info(likely, key).unwrap(),
            };
            v.extend_from_slice(&e.to_bytes());
        }
        v.extend_from_slice(&strings);
        v
    }
}

#[cfg(test)]
mod key_tests;

#[cfg(test)]
mod walk_tests {
    use super::*;
    use std::vec::Vec;

    /// A table at `base` with one ifunc (trampoline at `text`, slot past the table) and
    /// `sites` (address, kind, prefixes).
    fn ifunc_table(base: u64, text: u64, sites: &[(u64, SiteKind, u32)]) -> Vec<u8> {
        let descs = HEADER_SIZE as u32;
        let site_off = descs + IFUNC_DESC_SIZE as u32;
        let strs = site_off + (sites.len() * IFUNC_SITE_SIZE) as u32;
        let strings = b"f\0";
        let st = |offset, count| SubTable { offset, count };
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            arch: ARCH_X86_64,
            flags: 0,
            header_size: HEADER_SIZE as u32,
            total_size: strs + strings.len() as u32,
            ifuncs: st(descs, 1),
            ifunc_sites: st(site_off, sites.len() as u32),
            probes: st(strs, 0),
            probe_sites: st(strs, 0),
            strings: st(strs, strings.len() as u32),
            keys: st(strs, 0),
            key_sites: st(strs, 0),
        };
        let mut v = Vec::from(h.to_bytes());
        let rel = |at: u64, to: u64| make_rel(base + at, to).unwrap();
        let d = descs as u64;
        let desc = IfuncDesc {
            trampoline: rel(d, text),
            slot: rel(d + 4, base + 0x1000),
            resolver: rel(d + 8, text + 16),
            default: rel(d + 12, text + 24),
            name: 0,
        };
        v.extend_from_slice(&desc.to_bytes());
        for &(addr, kind, prefixes) in sites {
            let e = IfuncSite {
                site: rel(v.len() as u64, addr),
                info: IfuncSite::pack_info(kind, prefixes, 0).unwrap(),
            };
            v.extend_from_slice(&e.to_bytes());
        }
        v.extend_from_slice(strings);
        v
    }

    /// Where the tables of these tests lie: near 0, around 2^31, high, and near 2^64
    /// (the walks' bounds test replaces an overflow check per field).
    const BASES: [u64; 4] = [
        0x1000,
        0x8000_0000,
        0x7fff_0000_0000,
        0u64.wrapping_sub(0x2000),
    ];

    #[repr(align(8))]
    struct Buf([u8; 512]);

    /// `bytes`, copied into `buf`, parsed as a table at `base` whose text is
    /// `base - 0x800 .. base`.
    fn parsed<'b>(buf: &'b mut Buf, bytes: &[u8], base: u64) -> Table<'b> {
        buf.0[..bytes.len()].copy_from_slice(bytes);
        let exec: Vec<_> = core::iter::once(base - 0x800..base).collect();
        Table::parse(&buf.0[..bytes.len()], base, &exec).unwrap()
    }

    /// `site_walk()` yields what `sites()` yields.
    #[test]
    fn site_walk_agrees_with_sites() {
        for base in BASES {
            let text = base - 0x800;
            let kinds = [SiteKind::Call, SiteKind::Jmp, SiteKind::Jcc];
            let sites: Vec<_> = (0..9u64)
                .map(|i| {
                    (
                        text + 64 + 16 * i,
                        kinds[i as usize % 3],
                        (i % 4) as u32 % 3,
                    )
                })
                .collect();
            let mut buf = Buf([0; 512]);
            let t = parsed(&mut buf, &ifunc_table(base, text, &sites), base);
            let all: Vec<_> = t.sites().collect();
            assert_eq!(all.len(), 9);
            assert_eq!(t.site_walk().collect::<Vec<_>>(), all, "base {base:#x}");
        }
    }

    /// `probe_sites_of(p)` (and `until`) yield what `probe_sites()` yields for `p`.
    #[test]
    fn probe_sites_of_agrees_with_probe_sites() {
        for base in BASES {
            let text = base - 0x800;
            let kinds = [
                ProbeKind::RustJmp,
                ProbeKind::CCall,
                ProbeKind::RustEnabled,
                ProbeKind::CTail,
                ProbeKind::CEnabled,
                ProbeKind::CEnabledTail,
            ];
            let sites: Vec<_> = (0..12u64)
                .map(|i| {
                    (
                        text + 8 * i,
                        text + 0x400 + i,
                        kinds[i as usize % 6],
                        (i % 3) as u32 % 2,
                    )
                })
                .collect();
            let mut buf = Buf([0; 512]);
            let t = parsed(&mut buf, &test_table::probe_table(base, 2, &sites), base);
            for p in 0..4 {
                let all: Vec<_> = t.probe_sites().filter(|s| s.probe == p).collect();
                let of: Vec<_> = t.probe_sites_of(p).collect();
                assert_eq!(of, all, "base {base:#x} probe {p}");
                assert_eq!(of.is_empty(), p >= 2);
                let cut: Vec<_> = t.probe_sites_of(p).until(5).collect();
                assert_eq!(
                    cut,
                    all.into_iter().filter(|s| s.index < 5).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ids;

    fn header(arch: u16) -> [u8; HEADER_SIZE] {
        Header {
            magic: MAGIC,
            version: VERSION,
            arch,
            flags: 0,
            header_size: HEADER_SIZE as u32,
            total_size: HEADER_SIZE as u32,
            ifuncs: SubTable::default(),
            ifunc_sites: SubTable::default(),
            probes: SubTable::default(),
            probe_sites: SubTable::default(),
            strings: SubTable::default(),
            keys: SubTable::default(),
            key_sites: SubTable::default(),
        }
        .to_bytes()
    }

    #[repr(align(8))]
    struct Aligned([u8; HEADER_SIZE]);

    #[test]
    fn the_header_arch_picks_the_architecture() {
        let t = Aligned(header(ids::X86_64));
        let table = Table::parse(&t.0, 0x1000, &[]).unwrap();
        assert_eq!(table.arch(), Arch::X86_64);
        let t = Aligned(header(ids::AARCH64));
        let table = Table::parse(&t.0, 0x1000, &[]).unwrap();
        assert_eq!(table.arch(), Arch::Aarch64);
        let t = Aligned(header(ids::RISCV64));
        let table = Table::parse(&t.0, 0x1000, &[]).unwrap();
        assert_eq!(table.arch(), Arch::Riscv64);
        for id in [4, 9] {
            let t = Aligned(header(id));
            let e = Table::parse(&t.0, 0x1000, &[]).unwrap_err();
            assert_eq!(e, FormatError::WrongArch(id));
            let msg = std::format!("{e}");
            assert!(msg.contains("architecture"), "{msg}");
        }
        let msg = std::format!("{}", FormatError::WrongArch(ids::RISCV64));
        let native = std::format!(
            "supports {} ({}), {} ({}), {} ({})",
            Arch::X86_64,
            ids::X86_64,
            Arch::Aarch64,
            ids::AARCH64,
            Arch::Riscv64,
            ids::RISCV64
        );
        assert!(
            msg.contains("architecture 3 (riscv64)") && msg.ends_with(&native),
            "{msg}"
        );
        let msg = std::format!("{}", FormatError::WrongArch(9));
        assert!(msg.contains("unknown architecture 9, "), "{msg}");
    }
}
