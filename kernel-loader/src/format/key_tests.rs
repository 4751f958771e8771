//! Tests of format v2's key sub-tables and of reading v1 tables.

use super::test_table::{KeySiteSpec, KeySpec, key_table, probe_table, table_for};
use super::*;
use crate::arch::ids;
use std::vec::Vec;

const BASE: u64 = 0x10_0000;
const TEXT: core::ops::Range<u64> = 0x1000..0x2000;
const KEY_A: u64 = 0x20_0000;
const KEY_B: u64 = 0x20_0020;

fn parse(bytes: &[u8], base: u64) -> Result<Table<'_>, FormatError> {
    Table::parse(bytes, base, &[TEXT])
}

/// Two keys (`a` default false, `b` default true and imported) and four sites.
fn two_keys() -> (Vec<KeySpec<'static>>, Vec<KeySiteSpec>) {
    let keys = std::vec![(KEY_A, "k::a", false, false), (KEY_B, "k::b", true, true)];
    let sites = std::vec![
        (0x1000, 0x1800, false, 0),
        (0x1010, 0x1810, true, 1),
        (0x1020, 0x1820, true, 0),
        (0x1030, 0x1830, false, 1),
    ];
    (keys, sites)
}

/// Offset of key descriptor `i` in a [`key_table`] with `keys` keys (no probes).
fn key_off(i: usize) -> usize {
    HEADER_SIZE + i * KEY_DESC_SIZE
}

/// Offset of key site `i` in a [`key_table`] with `keys` keys (no probes).
fn site_off(keys: usize, i: usize) -> usize {
    HEADER_SIZE + keys * KEY_DESC_SIZE + i * KEY_SITE_SIZE
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The v1 form of a v2 table `t` (built at `base`, without keys): the same entries at
/// the same addresses behind a 64-byte header, so the v1 table lives at `base + 16`.
fn as_v1(t: &[u8]) -> (Vec<u8>, u64) {
    let mut h = Header::read(t).unwrap();
    assert_eq!(h.keys.count + h.key_sites.count, 0);
    let d = (HEADER_SIZE - HEADER_SIZE_V1) as u32;
    h.version = VERSION_1;
    h.header_size = HEADER_SIZE_V1 as u32;
    h.total_size -= d;
    for st in [
        &mut h.ifuncs,
        &mut h.ifunc_sites,
        &mut h.probes,
        &mut h.probe_sites,
        &mut h.strings,
    ] {
        st.offset -= d;
    }
    let mut v = Vec::from(h.to_bytes_v1());
    v.extend_from_slice(&t[HEADER_SIZE..]);
    (v, BASE + u64::from(d))
}

#[test]
fn a_v1_table_still_parses_and_says_version_1() {
    let psites = [
        (0x1000, 0x1800, ProbeKind::RustJmp, 0),
        (0x1040, 0, ProbeKind::CCall, 1),
    ];
    let (v1, base) = as_v1(&probe_table(BASE, 2, &psites));
    assert_eq!(v1.len() + 16, probe_table(BASE, 2, &psites).len());
    let t = parse(&v1, base).unwrap();
    assert_eq!(t.version(), 1);
    assert_eq!(t.key_count(), 0);
    assert_eq!(t.key_site_count(), 0);
    assert_eq!(t.keys().count() + t.key_sites().count(), 0);
    assert_eq!(t.key_sites_of(0).count(), 0);
    assert_eq!(t.key_site_at(0x1000), None);
    // Its probes decode as they did.
    let sites: Vec<_> = t
        .probe_sites()
        .map(|s| (s.addr, s.target, s.probe))
        .collect();
    assert_eq!(sites, [(0x1000, 0x1800, 0), (0x1040, 0, 1)]);
    assert_eq!(t.probe(1).unwrap().name, "p1");
    // A v2 table says 2.
    let v2 = probe_table(BASE, 2, &psites);
    assert_eq!(parse(&v2, BASE).unwrap().version(), VERSION);
    assert_eq!(VERSION, 2);
}

#[test]
fn a_v2_table_decodes_its_keys_and_sites() {
    let (keys, sites) = two_keys();
    let bytes = key_table(BASE, &keys, &sites);
    let t = parse(&bytes, BASE).unwrap();
    assert_eq!(t.version(), 2);
    assert_eq!(t.key_count(), 2);
    assert_eq!(t.key_site_count(), 4);
    let k: Vec<_> = t.keys().collect();
    assert_eq!(
        k,
        [
            Key {
                index: 0,
                addr: KEY_A,
                name: "k::a",
                default: false,
                imported: false
            },
            Key {
                index: 1,
                addr: KEY_B,
                name: "k::b",
                default: true,
                imported: true
            }
        ]
    );
    let all: Vec<_> = t.key_sites().collect();
    let want: Vec<_> = sites
        .iter()
        .enumerate()
        .map(|(i, &(addr, target, likely, key))| KSite {
            index: i as u32,
            addr,
            target,
            likely,
            key,
        })
        .collect();
    assert_eq!(all, want);
    for key in 0..3 {
        let of: Vec<_> = t.key_sites_of(key).collect();
        let filtered: Vec<_> = all.iter().copied().filter(|s| s.key == key).collect();
        assert_eq!(of, filtered, "key {key}");
        assert_eq!(of.len(), if key < 2 { 2 } else { 0 });
    }
    for s in &all {
        assert_eq!(t.key_site_at(s.addr), Some(*s));
        assert_eq!(t.key_site_at(s.addr + 1), None);
    }
    // An unlikely site jumps when enabled, a likely one when disabled.
    assert!(all[0].jumps(true) && !all[0].jumps(false));
    assert!(!all[1].jumps(true) && all[1].jumps(false));
}

#[test]
fn keys_and_probes_share_a_table() {
    let psites = [(0x1100, 0x1900, ProbeKind::RustJmp, 0)];
    let keys = [(KEY_A, "a", false, false)];
    let ksites = [(0x1000, 0x1800, false, 0), (0x1200, 0x1800, true, 0)];
    for arch in [ids::X86_64, ids::AARCH64, ids::RISCV64] {
        let bytes = table_for(arch, BASE, 1, &psites, &keys, &ksites);
        let t = parse(&bytes, BASE).unwrap();
        assert_eq!(t.probe_sites().count(), 1);
        assert_eq!(
            t.key_sites_of(0).map(|s| s.addr).collect::<Vec<_>>(),
            [0x1000, 0x1200]
        );
    }
}

#[test]
fn each_bad_key_descriptor_is_named() {
    let (keys, sites) = two_keys();
    let good = key_table(BASE, &keys, &sites);
    // A null key pointer.
    let mut b = good.clone();
    put_u32(&mut b, key_off(1), 0);
    assert_eq!(
        parse(&b, BASE).unwrap_err(),
        FormatError::BadKeyDesc { key: 1 }
    );
    // Reserved flags.
    let mut b = good.clone();
    put_u32(&mut b, key_off(0) + 8, 4);
    let e = parse(&b, BASE).unwrap_err();
    assert_eq!(e, FormatError::BadKeyDesc { key: 0 });
    assert!(std::format!("{e}").contains("key 0: null key pointer or reserved flags"));
    // A name past the strings.
    let mut b = good.clone();
    put_u32(&mut b, key_off(1) + 4, 0xffff);
    assert_eq!(
        parse(&b, BASE).unwrap_err(),
        FormatError::StringOutOfBounds { offset: 0xffff }
    );
    // Not sorted by name.
    let swapped = [keys[1], keys[0]];
    let b = key_table(BASE, &swapped, &sites);
    let e = parse(&b, BASE).unwrap_err();
    assert_eq!(e, FormatError::KeysUnsorted { key: 1 });
    assert!(std::format!("{e}").contains("sorted by name"));
    // Equal names are allowed (C keys in two files may share one).
    let same = [(KEY_A, "k", false, false), (KEY_B, "k", false, false)];
    assert!(parse(&key_table(BASE, &same, &sites), BASE).is_ok());
}

#[test]
fn each_bad_key_site_is_named() {
    let (keys, sites) = two_keys();
    let good = key_table(BASE, &keys, &sites);
    assert!(parse(&good, BASE).is_ok());
    // Reserved info bits (1..=7).
    for bit in 1..8 {
        let mut b = good.clone();
        put_u32(&mut b, site_off(2, 2) + 8, (1 << bit) | 1);
        let e = parse(&b, BASE).unwrap_err();
        assert_eq!(e, FormatError::BadKeySite { site: 2 }, "bit {bit}");
        assert!(std::format!("{e}").contains("key site 2: reserved bits set"));
    }
    // A key index past the descriptors.
    let mut b = good.clone();
    put_u32(&mut b, site_off(2, 3) + 8, 2 << 8);
    let e = parse(&b, BASE).unwrap_err();
    assert_eq!(
        e,
        FormatError::KeyIndexOutOfRange {
            site: 3,
            key: 2,
            count: 2
        }
    );
    assert!(std::format!("{e}").contains("names key 2, but there are only 2"));
    // Unsorted, and a duplicate address.
    for (second, name) in [
        (0x0ff0, "unsorted"),
        (0x1000, "duplicate"),
        (0x1004, "overlap"),
    ] {
        let s = [(0x1000, 0x1800, false, 0), (second, 0x1800, false, 1)];
        let e = parse(&key_table(BASE, &keys, &s), BASE).unwrap_err();
        assert_eq!(e, FormatError::KeySitesUnsorted { site: 1 }, "{name}");
    }
    // A site, or a target, outside the text.
    for (site, target, bad) in [
        (0x3000, 0x1800, 0x3000),
        (0x1ffe, 0x1800, 0x1ffe),
        (0x1000, 0x4000, 0x4000),
    ] {
        let e = parse(&key_table(BASE, &keys, &[(site, target, false, 0)]), BASE).unwrap_err();
        assert_eq!(e, FormatError::KeySiteNotExecutable { site: 0, addr: bad });
        assert!(std::format!("{e}").contains("not inside an executable range"));
    }
    // Misaligned for a 4-byte-instruction architecture.
    for arch in [ids::AARCH64, ids::RISCV64] {
        let b = table_for(arch, BASE, 0, &[], &keys, &[(0x1002, 0x1800, false, 0)]);
        let e = parse(&b, BASE).unwrap_err();
        assert_eq!(
            e,
            FormatError::KeySiteMisaligned {
                site: 0,
                addr: 0x1002
            }
        );
    }
    // Any address on x86_64.
    assert!(parse(&key_table(BASE, &keys, &[(0x1003, 0x1800, false, 0)]), BASE).is_ok());
}

#[test]
fn bad_key_sub_tables_are_named() {
    let (keys, sites) = two_keys();
    let good = key_table(BASE, &keys, &sites);
    let h = Header::read(&good).unwrap();
    // Misaligned.
    let mut b = good.clone();
    put_u32(&mut b, 64, h.keys.offset + 2);
    assert_eq!(
        parse(&b, BASE).unwrap_err(),
        FormatError::Misaligned {
            part: Part::Keys,
            offset: h.keys.offset + 2
        }
    );
    // Past the end.
    let mut b = good.clone();
    put_u32(&mut b, 76, 1000);
    let e = parse(&b, BASE).unwrap_err();
    assert_eq!(
        e,
        FormatError::OutOfBounds {
            part: Part::KeySites,
            offset: h.key_sites.offset,
            count: 1000
        }
    );
    assert!(std::format!("{e}").starts_with("key sites (offset"));
    // Overlapping: the sites start inside the keys.
    let mut b = good.clone();
    put_u32(&mut b, 72, h.keys.offset + 4);
    assert_eq!(
        parse(&b, BASE).unwrap_err(),
        FormatError::Overlap {
            a: Part::Keys,
            b: Part::KeySites
        }
    );
    // Overlapping the header (80 bytes in v2).
    let mut b = good.clone();
    put_u32(&mut b, 64, 64);
    assert_eq!(
        parse(&b, BASE).unwrap_err(),
        FormatError::Overlap {
            a: Part::Header,
            b: Part::Keys
        }
    );
}

#[test]
fn the_header_size_and_length_follow_the_version() {
    let (keys, sites) = two_keys();
    let good = key_table(BASE, &keys, &sites);
    // A v2 table with a v1 header size, and a v1 table with a v2 size.
    let mut b = good.clone();
    put_u32(&mut b, 16, HEADER_SIZE_V1 as u32);
    let e = parse(&b, BASE).unwrap_err();
    assert_eq!(
        e,
        FormatError::BadHeaderSize {
            size: 64,
            version: 2
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "header size 64 in a version 2 table, expected 80"
    );
    let (mut v1, base) = as_v1(&probe_table(BASE, 0, &[]));
    put_u32(&mut v1, 16, HEADER_SIZE as u32);
    assert_eq!(
        parse(&v1, base).unwrap_err(),
        FormatError::BadHeaderSize {
            size: 80,
            version: 1
        }
    );
    // A v2 header cut short.
    let e = parse(&good[..70], BASE).unwrap_err();
    assert_eq!(
        e,
        FormatError::Truncated {
            len: 70,
            needed: 80
        }
    );
    // A 64-byte v1 table is complete.
    let (v1, base) = as_v1(&probe_table(BASE, 0, &[]));
    assert_eq!(v1.len(), HEADER_SIZE_V1);
    assert!(parse(&v1, base).is_ok());
    // Versions 0 and 3.
    for v in [0u16, 3] {
        let mut b = good.clone();
        b[8..10].copy_from_slice(&v.to_le_bytes());
        let e = parse(&b, BASE).unwrap_err();
        assert_eq!(e, FormatError::UnsupportedVersion(v));
        assert!(std::format!("{e}").contains("knows 1 and 2"));
    }
}

#[test]
fn encoders_round_trip() {
    let d = KeyDesc {
        key: -8,
        name: 3,
        flags: KeyDesc::pack_flags(true, true),
    };
    assert_eq!(KeyDesc::read(&d.to_bytes()), d);
    assert_eq!(d.flags, KEY_DEFAULT_TRUE | KEY_IMPORTED);
    let s = KeySite {
        site: 100,
        target: -100,
        info: KeySite::pack_info(true, 7).unwrap(),
    };
    assert_eq!(KeySite::read(&s.to_bytes()), s);
    assert_eq!(s.info, 7 << 8 | KEY_SITE_LIKELY);
    assert_eq!(KeySite::pack_info(false, MAX_KEYS), None);
    let h = Header::read(&key_table(BASE, &[], &[])).unwrap();
    assert_eq!(Header::read(&h.to_bytes()).unwrap(), h);
    assert_eq!(&h.to_bytes()[..64], &h.to_bytes_v1()[..]);
}
