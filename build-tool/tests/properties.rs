//! Property tests (proptest, in normal CI) for the entry points the fuzz targets cover:
//! the table writer/reader round trip, the reader and patcher on mutated tables
//! (all-or-nothing: an error leaves the code unchanged), and the build tool on mutated
//! ELF files (a result, never a panic).

#![allow(clippy::single_range_in_vec_init)] // one executable range is the point

mod common;

use common::*;
use kernel_loader::format::{SiteKind, Table};
use kernel_loader::patch::patch_ifuncs;
use ksites::table::{IfuncEntry, SiteEntry, build_table};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn table_round_trip(
        n_ifuncs in 1usize..8,
        sites in proptest::collection::vec((0u8..3, 0u8..3, any::<u16>(), 1u64..40), 0..60),
    ) {
        // Sites laid out in order with random gaps; kinds, prefixes and ifunc indices
        // random. Addresses are plain numbers: the table is never executed here.
        let base = 0x10_0000u64;
        let ifuncs: Vec<IfuncEntry> = (0..n_ifuncs)
            .map(|i| IfuncEntry {
                name: format!("m::f{i}"),
                trampoline: base + 8 * i as u64,
                slot: base + 0x10_0000 + 8 * i as u64,
                resolver: base + 0x800,
                default: base + 0x900,
            })
            .collect();
        let mut at = base + 0x1000;
        let mut entries = Vec::new();
        for (k, p, f, gap) in sites {
            let kind = [SiteKind::Call, SiteKind::Jmp, SiteKind::Jcc][k as usize];
            entries.push(SiteEntry { addr: at, kind, prefixes: p, ifunc: u32::from(f) % n_ifuncs as u32 });
            at += u64::from(p) + kind.opcode_len() as u64 + 4 + gap;
        }
        let table_addr = base + 0x8_0000;
        let bytes = build_table(table_addr, &ifuncs, &entries).unwrap();
        let exec = [base..base + 0x8_0000];
        let t = Table::parse(&bytes, table_addr, &exec).unwrap();
        let back: Vec<_> = t.sites().map(|s| (s.addr, s.kind, s.prefixes, s.ifunc)).collect();
        let want: Vec<_> = entries.iter().map(|s| (s.addr, s.kind, s.prefixes, s.ifunc)).collect();
        prop_assert_eq!(back, want);
        for (i, f) in t.ifuncs().enumerate() {
            prop_assert_eq!(f.name, ifuncs[i].name.as_str());
            prop_assert_eq!(f.trampoline, ifuncs[i].trampoline);
            prop_assert_eq!(f.slot, ifuncs[i].slot);
        }
    }

    #[test]
    fn mutated_tables_fail_cleanly_and_change_no_code(
        edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..6),
    ) {
        let mut img = Image::new();
        let len = img.table().bytes().len();
        for (at, v) in edits {
            img.bytes_mut()[TABLE + at % len] = v;
        }
        let code = img.bytes()[TEXT..DATA].to_vec();
        if let Ok(t) = Table::parse(&img.table_bytes()[..len], img.addr(TABLE), &img.exec()) {
            let target = img.addr(IMPL_A1);
            let mut p = FakePoker::default();
            // SAFETY: sites are validated into the test image's text.
            let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| target) };
            if r.is_err() {
                prop_assert_eq!(&img.bytes()[TEXT..DATA], &code[..]);
            }
        }
    }

    #[test]
    fn mutated_elf_files_never_panic_the_tool(
        seed in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/elf");
        let name = ["13-already-embedded", "04-no-emit-relocs", "17-nargs-disagree"][seed];
        let mut data = std::fs::read(dir.join(name)).unwrap();
        for (at, v) in edits {
            let n = data.len();
            data[at % n] = v;
        }
        let _ = ksites::embed::embed_bytes("p", &data);
        let _ = ksites::inspect::inspect("p", &data);
        let _ = ksites::verify::verify("p", &data);
        let opts = ksites::scan::ScanOptions { calls_to: vec!["*".into()], jumps_to: vec!["*".into()] };
        let _ = ksites::scan::scan_bytes("p", &data, &opts);
    }
}
