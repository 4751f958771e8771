//! The table format (writer here, reader in kernel-loader) and the boot patch engine, on
//! the host: tables are written with the build tool's writer and patched into a fake
//! "image" in a heap buffer through a `TextPoker` that can be told to fail.

mod common;

use common::*;
use kernel_loader::format::{
    FormatError, HEADER_SIZE, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncField, Part, Table,
};
use kernel_loader::patch::{PatchError, PokeError, TextPoker, patch_ifuncs};
use ksites::table::build_table;

#[test]
fn format_round_trip() {
    let img = Image::new();
    let t = img.table();
    assert_eq!(t.ifunc_count(), 2);
    let f: Vec<_> = t.ifuncs().collect();
    assert_eq!(f[0].name, "t::zero");
    assert_eq!(f[0].trampoline, img.addr(TRAMP0));
    assert_eq!(f[0].slot, img.addr(SLOT0));
    assert_eq!(f[0].resolver, img.addr(RESOLVER));
    assert_eq!(f[1].default, img.addr(IMPL_B0));
    let s: Vec<_> = t
        .sites()
        .map(|s| (s.addr, s.kind, s.prefixes, s.ifunc))
        .collect();
    let want: Vec<_> = img
        .sites()
        .iter()
        .map(|s| (s.addr, s.kind, s.prefixes, s.ifunc))
        .collect();
    assert_eq!(s, want);
    assert_eq!(
        t.site_containing(img.addr(S_PCALL) + 3).unwrap().addr,
        img.addr(S_PCALL)
    );
    assert!(t.site_containing(img.addr(S_CALL) - 1).is_none());
    // 8 bytes per site, as promised.
    assert_eq!(IFUNC_SITE_SIZE, 8);
}

#[test]
fn patching_rewrites_every_site_to_the_chosen_implementation() {
    let img = Image::new();
    let t = img.table();
    let mut p = FakePoker::default();
    // SAFETY: the table describes `img`, which nothing executes.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap();
    assert_eq!((r.ifuncs, r.sites_patched, r.sites_out_of_reach), (2, 4, 0));
    assert_eq!(img.rel_target(S_CALL, 1), IMPL_A1);
    assert_eq!(img.rel_target(S_JMP, 1), IMPL_B1);
    assert_eq!(img.rel_target(S_PCALL, 2), IMPL_A1);
    assert_eq!(img.rel_target(S_JCC, 2), IMPL_B1);
    // Opcodes and prefixes untouched.
    assert_eq!(img.bytes()[S_PCALL..S_PCALL + 2], [0x2e, 0xe8]);
    assert_eq!(img.bytes()[S_JCC..S_JCC + 2], [0x0f, 0x85]);
    assert_eq!(img.slot(SLOT0), img.addr(IMPL_A1));
    assert_eq!(img.slot(SLOT1), img.addr(IMPL_B1));
    assert_eq!((p.began, p.ended, p.syncs), (1, 1, 1));

    // A second run finds patched sites and refuses, touching nothing.
    let before = img.bytes().to_vec();
    let mut p = FakePoker::default();
    // SAFETY: as above.
    let e = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap_err();
    assert!(
        matches!(
            e,
            PatchError::AlreadyPatched { ifunc, .. } if ifunc == "t::zero"
        ),
        "{e}"
    );
    assert_eq!(img.bytes(), &before[..]);
    assert_eq!(p.writes, 0);
}

#[test]
fn each_resolver_runs_exactly_once() {
    let img = Image::new();
    let t = img.table();
    let mut calls = [0u32; 2];
    let mut resolve = |f: &kernel_loader::format::Ifunc<'_>| {
        calls[f.index as usize] += 1;
        img.addr(if f.index == 0 { IMPL_A1 } else { IMPL_B1 })
    };
    // SAFETY: as above.
    unsafe { patch_ifuncs(&t, &img.exec(), &mut FakePoker::default(), &mut resolve) }.unwrap();
    assert_eq!(calls, [1, 1]);
}

#[test]
fn a_failed_write_restores_every_site_and_slot() {
    for fail_at in 0..4 {
        let img = Image::new();
        let before = img.bytes().to_vec();
        let t = img.table();
        let mut p = FakePoker {
            fail_at: Some(fail_at),
            ..Default::default()
        };
        // SAFETY: as above.
        let e =
            unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap_err();
        assert!(matches!(e, PatchError::Poke { .. }), "{e}");
        assert!(e.to_string().contains("injected"), "{e}");
        assert_eq!(
            img.bytes(),
            &before[..],
            "fail_at={fail_at}: image not restored"
        );
        assert_eq!(p.ended, 1, "text must be made read-only again");
    }
}

#[test]
fn a_torn_failed_write_is_restored_too() {
    for fail_at in 0..4 {
        let img = Image::new();
        let before = img.bytes().to_vec();
        let t = img.table();
        let mut p = FakePoker {
            fail_at: Some(fail_at),
            partial: 2,
            ..Default::default()
        };
        // SAFETY: as above.
        let e =
            unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap_err();
        assert!(matches!(e, PatchError::Poke { .. }), "{e}");
        assert_eq!(
            img.bytes(),
            &before[..],
            "fail_at={fail_at}: torn site not restored"
        );
    }
}

#[test]
fn a_rollback_that_cannot_write_says_which_site() {
    let img = Image::new();
    let t = img.table();
    let mut p = FakePoker {
        fail_at: Some(2),
        fail_forever: true,
        partial: 1,
        ..Default::default()
    };
    // SAFETY: as above.
    let e = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap_err();
    // Sites 0 and 1 were written and cannot be put back; site 0 is named.
    assert_eq!(
        e,
        PatchError::RollbackIncomplete {
            site: img.addr(S_CALL),
            ifunc: "t::zero".into()
        }
    );
    // The slots are restored regardless: calls through the trampolines stay valid.
    assert_eq!(img.slot(SLOT0), img.addr(IMPL_A0));
    assert_eq!(img.slot(SLOT1), img.addr(IMPL_B0));
}

#[test]
fn sites_longer_than_eight_bytes_are_rejected_not_patched() {
    // Four CS prefixes before a call: 9 bytes.
    let mut img = Image::new();
    img.branch(S_CALL, &[0x2e, 0x2e, 0x2e, 0x2e, 0xe8], TRAMP0);
    let mut sites = img.sites();
    sites.retain(|s| s.addr != img.addr(S_JMP) && s.addr != img.addr(S_PCALL));
    sites[0].prefixes = 4;
    let table = build_table(img.addr(TABLE), &img.ifuncs(), &sites).unwrap();
    img.bytes_mut()[TABLE..TABLE + table.len()].copy_from_slice(&table);
    let e = Table::parse(
        &img.table_bytes()[..table.len()],
        img.addr(TABLE),
        &img.exec(),
    )
    .unwrap_err();
    assert_eq!(e, FormatError::SiteTooLong { site: 0 });
}

#[test]
fn unexpected_site_bytes_abort_before_any_write() {
    let mut img = Image::new();
    img.bytes_mut()[S_JMP] = 0x90; // someone changed the jmp
    let before = img.bytes().to_vec();
    let t = img.table();
    let mut p = FakePoker::default();
    // SAFETY: as above.
    let e = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve_fast(&img)) }.unwrap_err();
    match e {
        PatchError::UnexpectedSiteBytes {
            site,
            ifunc,
            expected,
            found,
        } => {
            assert_eq!(site, img.addr(S_JMP));
            assert_eq!(ifunc, "t::one");
            assert_eq!(expected.as_slice()[0], 0xe9);
            assert_eq!(found.as_slice()[0], 0x90);
        }
        e => panic!("wrong error {e}"),
    }
    assert_eq!(p.writes, 0);
    assert_eq!(img.bytes(), &before[..]);

    // A rel32 that points elsewhere is caught too.
    let mut img = Image::new();
    img.branch(S_CALL, &[0xe8], IMPL_B1);
    let t = img.table();
    // SAFETY: as above.
    let e = unsafe {
        patch_ifuncs(
            &t,
            &img.exec(),
            &mut FakePoker::default(),
            &mut resolve_fast(&img),
        )
    };
    assert!(matches!(e, Err(PatchError::UnexpectedSiteBytes { .. })));
}

#[test]
fn a_bad_resolution_restores_slots() {
    let img = Image::new();
    let before = img.bytes().to_vec();
    let t = img.table();
    for bad in [0u64, img.addr(DATA + 64)] {
        let mut resolve = |f: &kernel_loader::format::Ifunc<'_>| {
            if f.index == 0 { img.addr(IMPL_A1) } else { bad }
        };
        let mut p = FakePoker::default();
        // SAFETY: as above.
        let e = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve) }.unwrap_err();
        assert!(
            matches!(e, PatchError::BadResolution { ifunc, addr } if addr == bad && ifunc == "t::one"),
            "{e}"
        );
        assert_eq!(img.bytes(), &before[..]);
        assert_eq!(p.writes, 0);
    }
}

/// A poker whose reads at `at` return the real bytes `good` times, then garbage (a
/// trampoline that changes under the engine).
struct FlakyReads {
    inner: FakePoker,
    at: u64,
    good: std::cell::Cell<usize>,
}

impl TextPoker for FlakyReads {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.inner.begin()
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: forwarded.
        unsafe { self.inner.write(addr, bytes) }
    }

    unsafe fn read(&self, addr: u64, out: &mut [u8]) {
        if addr == self.at {
            if self.good.get() == 0 {
                out.fill(0);
                return;
            }
            self.good.set(self.good.get() - 1);
        }
        // SAFETY: forwarded: the engine reads only inside the test image.
        unsafe { self.inner.read(addr, out) }
    }

    fn sync_cores(&mut self) {
        self.inner.sync_cores();
    }

    fn end(&mut self) {
        self.inner.end();
    }
}

/// Step 1 checks an import's trampoline once; resolving must not read it again (it
/// used to, and returned the second read's error with earlier slots left resolved).
#[test]
fn an_import_trampoline_is_read_once_and_no_slot_changes_on_error() {
    let mut img = Image::new();
    // Ifunc 1 ("t::one") becomes an import: slot, resolver and default fields 0. Its
    // trampoline still jumps through SLOT1 (the "defining image's" slot).
    let descs = get_u32(img.table_bytes(), H_IFUNCS) as usize;
    let d1 = TABLE + descs + IFUNC_DESC_SIZE;
    img.bytes_mut()[d1 + 4..d1 + 16].fill(0);
    let t = img.table();
    assert!(t.ifunc(1).unwrap().imported);
    let mut p = FlakyReads {
        inner: FakePoker::default(),
        at: img.addr(TRAMP1),
        good: std::cell::Cell::new(1),
    };
    let mut resolve = |f: &kernel_loader::format::Ifunc<'_>| {
        assert_eq!(f.index, 0, "imports are not resolved");
        img.addr(IMPL_A1)
    };
    // SAFETY: the table describes `img`, which nothing executes; the import's
    // trampoline is in the image.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut resolve) };
    match r {
        Ok(r) => {
            assert_eq!((r.ifuncs, r.sites_patched), (2, 4));
            assert_eq!(img.slot(SLOT0), img.addr(IMPL_A1));
            assert_eq!(
                img.rel_target(S_JMP, 1),
                IMPL_B0,
                "the import's current target"
            );
        }
        Err(e) => {
            assert_eq!(
                img.slot(SLOT0),
                img.addr(IMPL_A0),
                "slot left resolved: {e}"
            );
        }
    }
}

#[test]
fn a_broken_trampoline_is_refused() {
    let mut img = Image::new();
    img.tramp(TRAMP1, SLOT0); // jumps through the wrong slot
    let t = img.table();
    // SAFETY: as above.
    let e = unsafe {
        patch_ifuncs(
            &t,
            &img.exec(),
            &mut FakePoker::default(),
            &mut resolve_fast(&img),
        )
    };
    assert!(
        matches!(
            e,
            Err(PatchError::BadTrampoline { ifunc, .. }) if ifunc == "t::one"
        ),
        "{e:?}"
    );
}

#[test]
fn out_of_reach_implementations_leave_sites_on_the_trampoline() {
    let img = Image::new();
    let before = img.bytes().to_vec();
    let t = img.table();
    let far = img.addr(IMPL_A1).wrapping_add(1 << 40);
    let mut exec = img.exec();
    exec.push(far..far + 16);
    let mut resolve =
        |f: &kernel_loader::format::Ifunc<'_>| if f.index == 0 { far } else { img.addr(IMPL_B1) };
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &exec, &mut FakePoker::default(), &mut resolve) }.unwrap();
    assert_eq!((r.sites_patched, r.sites_out_of_reach), (2, 2));
    assert_eq!(img.bytes()[S_CALL..S_CALL + 5], before[S_CALL..S_CALL + 5]);
    assert_eq!(
        img.slot(SLOT0),
        far,
        "the trampoline still reaches it through the slot"
    );
    assert_eq!(img.rel_target(S_JMP, 1), IMPL_B1);
}

// ---------------------------------------------------------------------------------------
// The reader rejects every kind of broken table with its own error.

fn parse_mut(f: impl FnOnce(&mut Vec<u8>, u64) -> u64) -> Result<(), FormatError> {
    let img = Image::new();
    let mut t = img.table_bytes()[..img.table().bytes().len()].to_vec();
    let base = f(&mut t, img.addr(TABLE));
    Table::parse(&t, base, &img.exec()).map(|_| ())
}

fn put_u32(t: &mut [u8], at: usize, v: u32) {
    t[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(t: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
}

const H_VERSION: usize = 8;
const H_ARCH: usize = 10;
const H_TOTAL: usize = 20;
const H_IFUNCS: usize = 24;
const H_SITES: usize = 32;
const H_STRINGS: usize = 56;

#[test]
fn reader_rejects_broken_tables_with_distinct_errors() {
    assert_eq!(parse_mut(|_, b| b), Ok(()));
    assert!(matches!(
        parse_mut(|t, b| {
            t.truncate(HEADER_SIZE - 1);
            b
        }),
        Err(FormatError::Truncated {
            needed: HEADER_SIZE,
            ..
        })
    ));
    assert_eq!(
        parse_mut(|t, b| {
            t[0] = b'X';
            b
        }),
        Err(FormatError::BadMagic)
    );
    assert_eq!(
        parse_mut(|t, b| {
            t[H_VERSION] = 3;
            b
        }),
        Err(FormatError::UnsupportedVersion(3))
    );
    assert_eq!(
        parse_mut(|t, b| {
            t[H_ARCH] = 7;
            b
        }),
        Err(FormatError::WrongArch(7))
    );
    // Declared size larger than the bytes: truncated table.
    assert!(matches!(
        parse_mut(|t, b| {
            let n = t.len() as u32;
            t.truncate(t.len() - 8);
            put_u32(t, H_TOTAL, n);
            b
        }),
        Err(FormatError::BadTotalSize { .. })
    ));
    // Table at a misaligned address.
    assert_eq!(
        parse_mut(|_, b| b + 4),
        Err(FormatError::Misaligned {
            part: Part::Header,
            offset: 0
        })
    );
    // A sub-table at a misaligned offset.
    assert!(matches!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES);
            put_u32(t, H_SITES, o + 2);
            b
        }),
        Err(FormatError::Misaligned {
            part: Part::IfuncSites,
            ..
        })
    ));
    // Too many sites for the table: out of bounds (and no overflow with a huge count).
    for count in [50, u32::MAX] {
        assert!(matches!(
            parse_mut(|t, b| {
                put_u32(t, H_SITES + 4, count);
                b
            }),
            Err(FormatError::OutOfBounds {
                part: Part::IfuncSites,
                ..
            })
        ));
    }
    // Sites overlapping the descriptors.
    assert_eq!(
        parse_mut(|t, b| {
            put_u32(t, H_SITES, HEADER_SIZE as u32 + 8);
            b
        }),
        Err(FormatError::Overlap {
            a: Part::Ifuncs,
            b: Part::IfuncSites
        })
    );
    // String table without its final NUL.
    assert_eq!(
        parse_mut(|t, b| {
            let (o, n) = (
                get_u32(t, H_STRINGS) as usize,
                get_u32(t, H_STRINGS + 4) as usize,
            );
            t[o + n - 1] = b'x';
            b
        }),
        Err(FormatError::StringTableUnterminated)
    );
    // A name offset past the string table.
    assert!(matches!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_IFUNCS) as usize;
            put_u32(t, o + 16, 10_000);
            b
        }),
        Err(FormatError::StringOutOfBounds { offset: 10_000 })
    ));
    // A site naming ifunc 9 of 2.
    assert_eq!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES) as usize;
            let info = get_u32(t, o + 4);
            put_u32(t, o + 4, (info & 0xff) | (9 << 8));
            b
        }),
        Err(FormatError::IfuncIndexOutOfRange {
            site: 0,
            ifunc: 9,
            count: 2
        })
    );
    // Invalid kind bits, reserved bits.
    assert_eq!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES) as usize;
            let info = get_u32(t, o + 4);
            put_u32(t, o + 4, info | 3);
            b
        }),
        Err(FormatError::BadSiteKind { site: 0 })
    );
    assert_eq!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES) as usize;
            let info = get_u32(t, o + 4);
            put_u32(t, o + 4, info | 0x80);
            b
        }),
        Err(FormatError::ReservedSiteBits { site: 0 })
    );
    // Unsorted: site 1 moved before site 0 (re-biased by hand, as a sort must).
    assert_eq!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES) as usize + IFUNC_SITE_SIZE;
            let rel = get_u32(t, o) as i32;
            put_u32(t, o, (rel - 20) as u32);
            b
        }),
        Err(FormatError::Unsorted { site: 1 })
    );
    // A site outside the executable range.
    assert!(matches!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_SITES) as usize + 3 * IFUNC_SITE_SIZE;
            let rel = get_u32(t, o) as i32;
            put_u32(t, o, (rel + 4096) as u32);
            b
        }),
        Err(FormatError::SiteNotExecutable { site: 3, .. })
    ));
    // A resolver outside text; a slot inside text.
    assert!(matches!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_IFUNCS) as usize;
            let rel = get_u32(t, o + 8) as i32;
            put_u32(t, o + 8, (rel + 4096) as u32);
            b
        }),
        Err(FormatError::BadIfuncPointer {
            ifunc: 0,
            field: IfuncField::Resolver,
            ..
        })
    ));
    assert!(matches!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_IFUNCS) as usize;
            let rel = get_u32(t, o + 4) as i32;
            put_u32(t, o + 4, (rel - 2048) as u32);
            b
        }),
        Err(FormatError::BadIfuncPointer {
            ifunc: 0,
            field: IfuncField::Slot,
            ..
        })
    ));
    // A defined ifunc's slot at address 0: refused as a slot, not later as a trampoline
    // (a low base, so every field of descriptor 0 can point at small addresses).
    {
        let img = Image::new();
        let mut t = img.table_bytes()[..img.table().bytes().len()].to_vec();
        let base = 0x10_0000u64;
        let o = get_u32(&t, H_IFUNCS) as usize;
        for (field, target) in [(0, 0x1000u64), (4, 0), (8, 0x1010), (12, 0x1020)] {
            let rel = target as i64 - (base + (o + field) as u64) as i64;
            put_u32(&mut t, o + field, rel as i32 as u32);
        }
        let exec = std::iter::once(0x1000..0x2000).collect::<Vec<_>>();
        assert_eq!(
            Table::parse(&t, base, &exec).map(|_| ()),
            Err(FormatError::BadIfuncPointer {
                ifunc: 0,
                field: IfuncField::Slot,
                addr: 0,
            })
        );
    }
    // Two descriptors for one trampoline.
    assert_eq!(
        parse_mut(|t, b| {
            let o = get_u32(t, H_IFUNCS) as usize;
            let rel = get_u32(t, o) as i32;
            put_u32(t, o + 20, (rel - 20) as u32);
            b
        }),
        Err(FormatError::DuplicateIfunc { ifunc: 1 })
    );
}

#[test]
fn reader_and_patcher_never_panic_on_arbitrary_mutations() {
    // Every single-byte change of a valid table either parses or returns an error, and
    // when it parses, patching either succeeds or fails cleanly; it never panics.
    let good = Image::new().table().bytes().to_vec();
    for i in 0..good.len() {
        for v in [0u8, 1, 4, 0x1c, 0x7f, 0x80, 0xff] {
            let mut img = Image::new();
            img.bytes_mut()[TABLE + i] = v;
            let Ok(t) = Table::parse(
                &img.table_bytes()[..good.len()],
                img.addr(TABLE),
                &img.exec(),
            ) else {
                continue;
            };
            let mut p = FakePoker::default();
            let text = img.addr(IMPL_A1);
            // SAFETY: the table lies about sites only within the test image's text.
            let _ = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| text) };
        }
    }
}
