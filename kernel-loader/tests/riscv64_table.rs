//! A `.ksites` table whose header says riscv64, read and patched on any host: the
//! reader checks its sites with riscv64 rules (forms in the `prefixes` field, 2-aligned
//! sites, 4-aligned probe sites), and `patch_ifuncs` rewrites `auipc`+`jalr` pairs,
//! `jal` and `c.j` sites into direct branches of their own form (into a buffer nothing
//! executes), leaves a relaxed site whose implementation is out of its reach on the
//! trampoline (counted), refuses a site whose bytes are not the form the table says,
//! and rolls back a failed batch.

use std::ops::Range;

use kernel_loader::arch::riscv64::{self, C_NOP, FORM_C_J, FORM_JAL, FORM_PAIR, NOP};
use kernel_loader::arch::{Arch, BranchSite, ids};
use kernel_loader::format::{
    FormatError, HEADER_SIZE, Header, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncDesc, IfuncSite,
    MAGIC, PROBE_SITE_SIZE, ProbeDesc, ProbeKind, ProbeSite, SiteKind, SubTable, Table, VERSION,
    make_rel,
};
use kernel_loader::patch::{PatchError, PokeError, PokeFailure, TextPoker, patch_ifuncs};

/// Offsets in the image buffer.
const IMPL_A: u64 = 0x400;
const RESOLVER: u64 = 0x600;
const TRAMPOLINE: u64 = 0xf00;
/// Within every form's reach of every site.
const IMPL_B: u64 = 0x1400;
/// Beyond the `c.j` site's ±2 KiB, within everything else's.
const IMPL_C: u64 = 0x1c00;
/// The sites: (offset, kind, form). The `c.j` at 0x1016 follows a `c.nop`, and the
/// last `jal` is at 2 mod 4, as RVC code has them.
const SITES: [(u64, SiteKind, u8); 5] = [
    (0x1000, SiteKind::Call, FORM_PAIR),
    (0x1008, SiteKind::Jmp, FORM_PAIR),
    (0x1010, SiteKind::Call, FORM_JAL),
    (0x1016, SiteKind::Jmp, FORM_C_J),
    (0x101a, SiteKind::Jmp, FORM_JAL),
];
const PROBE_AT: u64 = 0x1100;
const TEXT_END: u64 = 0x2000;
const SLOT: u64 = 0x3000;
const TABLE: u64 = 0x4000;
const SIZE: usize = 0x5000;

/// A leaked, 8-aligned buffer standing for an image: text at `0..TEXT_END`, the slot,
/// the table.
struct Image {
    base: u64,
    bytes: &'static mut [u8],
}

impl Image {
    fn new() -> Image {
        let words: &'static mut [u64] = Box::leak(vec![0u64; SIZE / 8].into_boxed_slice());
        let base = words.as_mut_ptr() as u64;
        // SAFETY: the leaked buffer, reinterpreted as bytes; it lives forever and only
        // this `Image` refers to it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, SIZE) };
        Image { base, bytes }
    }

    fn set_word(&mut self, off: u64, w: u32) {
        let o = off as usize;
        self.bytes[o..o + 4].copy_from_slice(&w.to_le_bytes());
    }

    fn slot(&self) -> u64 {
        let o = SLOT as usize;
        u64::from_le_bytes(self.bytes[o..o + 8].try_into().unwrap())
    }

    fn exec(&self) -> Vec<Range<u64>> {
        std::iter::once(self.base..self.base + TEXT_END).collect()
    }
}

/// The table for `img` (header `arch`), with one ifunc `t::f` and the given sites
/// (offset, kind, prefixes) and probe sites (offset, kind).
fn table(
    img: &Image,
    arch: u16,
    sites: &[(u64, SiteKind, u8)],
    probes: &[(u64, ProbeKind)],
) -> Vec<u8> {
    let b = img.base;
    let at = TABLE + b;
    let descs = HEADER_SIZE as u32;
    let site_off = descs + IFUNC_DESC_SIZE as u32;
    let pdesc = site_off + (sites.len() * IFUNC_SITE_SIZE) as u32;
    let psite = pdesc + 12;
    let strs = psite + (probes.len() * PROBE_SITE_SIZE) as u32;
    let strings = b"t::f\0t\0p\0";
    let st = |offset, count| SubTable { offset, count };
    let h = Header {
        magic: MAGIC,
        version: VERSION,
        arch,
        flags: 0,
        header_size: HEADER_SIZE as u32,
        total_size: strs + strings.len() as u32,
        ifuncs: st(descs, 1),
        ifunc_sites: st(site_off, sites.len() as u32),
        probes: st(pdesc, 1),
        probe_sites: st(psite, probes.len() as u32),
        strings: st(strs, strings.len() as u32),
        keys: st(strs, 0),
        key_sites: st(strs, 0),
    };
    let mut v = Vec::from(h.to_bytes());
    let rel = |field: u64, to: u64| make_rel(at + field, b + to).unwrap();
    let d = u64::from(descs);
    v.extend_from_slice(
        &IfuncDesc {
            trampoline: rel(d, TRAMPOLINE),
            slot: rel(d + 4, SLOT),
            resolver: rel(d + 8, RESOLVER),
            default: rel(d + 12, IMPL_A),
            name: 0,
        }
        .to_bytes(),
    );
    for &(off, kind, prefixes) in sites {
        let e = IfuncSite {
            site: rel(v.len() as u64, off),
            info: IfuncSite::pack_info(kind, u32::from(prefixes), 0).unwrap(),
        };
        v.extend_from_slice(&e.to_bytes());
    }
    v.extend_from_slice(
        &ProbeDesc {
            provider: 5,
            name: 7,
            nargs: 0,
            flags: 0,
        }
        .to_bytes(),
    );
    for &(off, kind) in probes {
        let field = v.len() as u64;
        let e = ProbeSite {
            site: rel(field, off),
            target: if kind.is_rust() {
                rel(field + 4, off + 0x40)
            } else {
                0
            },
            info: ProbeSite::pack_info(kind, 0).unwrap(),
        };
        v.extend_from_slice(&e.to_bytes());
    }
    v.extend_from_slice(strings);
    v
}

fn branch(b: u64, off: u64, kind: SiteKind, form: u8) -> BranchSite {
    BranchSite {
        addr: b + off,
        kind,
        prefixes: form,
        len: riscv64::site_len(kind, form) as u8,
    }
}

impl Image {
    fn bytes_at(&self, off: u64, len: usize) -> &[u8] {
        &self.bytes[off as usize..off as usize + len]
    }

    /// Where site `i` of [`SITES`] goes now.
    fn dest(&self, i: usize) -> Option<u64> {
        let (off, kind, form) = SITES[i];
        let s = branch(self.base, off, kind, form);
        riscv64::decode_branch_target(&s, self.bytes_at(off, s.len as usize))
    }
}

/// An image as `ksites embed` leaves it: the trampoline through the slot, the slot
/// holding the default, each site a branch of its kind and form to the trampoline, a
/// `c.nop` before the `c.j`, the probe site a `nop`; and its table (arch riscv64)
/// written at `TABLE`.
fn image() -> (Image, usize) {
    let mut img = Image::new();
    let b = img.base;
    let t = riscv64::trampoline(b + TRAMPOLINE, b + SLOT).unwrap();
    for (i, w) in t.iter().enumerate() {
        img.set_word(TRAMPOLINE + 4 * i as u64, *w);
    }
    img.bytes[SLOT as usize..SLOT as usize + 8].copy_from_slice(&(b + IMPL_A).to_le_bytes());
    for (off, kind, form) in SITES {
        let s = branch(b, off, kind, form);
        let f = riscv64::encode_target(&s, b + TRAMPOLINE).unwrap();
        let o = off as usize;
        img.bytes[o..o + f.len as usize].copy_from_slice(&f.value.to_le_bytes()[..f.len as usize]);
    }
    img.bytes[0x1014..0x1016].copy_from_slice(&C_NOP.to_le_bytes());
    img.set_word(PROBE_AT, NOP);
    let sites: Vec<_> = SITES.to_vec();
    let tb = table(
        &img,
        ids::RISCV64,
        &sites,
        &[(PROBE_AT, ProbeKind::RustJmp)],
    );
    img.bytes[TABLE as usize..TABLE as usize + tb.len()].copy_from_slice(&tb);
    (img, tb.len())
}

fn parse(img: &Image, len: usize) -> Result<Table<'static>, FormatError> {
    let at = (img.base + TABLE) as *const u8;
    // SAFETY: the table bytes inside the leaked image buffer, which lives forever; the
    // tests only write text and the slot after this, never the table.
    let bytes = unsafe { std::slice::from_raw_parts(at, len) };
    Table::parse(bytes, img.base + TABLE, &img.exec())
}

/// Writes memory directly, with one injected (one-shot) failure, counting writes and
/// rounds.
#[derive(Default)]
struct Mem {
    writes: usize,
    syncs: usize,
    fail_at: Option<u64>,
}

impl TextPoker for Mem {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at == Some(addr) {
            // Once: the rollback's write there succeeds.
            self.fail_at = None;
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        // A riscv64 site is rewritten whole: 8 (pair), 4 (`jal`) or 2 (`c.j`) bytes at
        // a 2-aligned address.
        assert!(
            matches!(bytes.len(), 2 | 4 | 8) && addr.is_multiple_of(2),
            "write at {addr:#x}"
        );
        self.writes += 1;
        // SAFETY: `addr` is a site inside the test's leaked image buffer, which nothing
        // executes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }
    fn sync_cores(&mut self) {
        self.syncs += 1;
    }
    fn end(&mut self) {}
}

#[test]
fn a_riscv64_table_is_read_with_riscv64_rules() {
    let (img, len) = image();
    let t = parse(&img, len).unwrap();
    assert_eq!(t.arch(), Arch::Riscv64);
    let sites: Vec<_> = t.sites().collect();
    assert_eq!(sites.len(), SITES.len());
    for (s, (off, kind, form)) in sites.iter().zip(SITES) {
        let len = [8, 4, 2][form as usize];
        assert_eq!(
            (s.addr, s.kind, s.prefixes, s.len()),
            (img.base + off, kind, form, len)
        );
        assert_eq!(
            s.target_field(),
            s.addr..s.addr + len as u64,
            "the whole site"
        );
    }
    for i in 0..SITES.len() {
        assert_eq!(img.dest(i), Some(img.base + TRAMPOLINE), "site {i}");
    }
    let p = t.probe_sites().next().unwrap();
    assert_eq!(p.addr, img.base + PROBE_AT);
    // The riscv64 probe forms of that site: `nop` <-> `jal x0` to its block.
    let stubs = riscv64::probe::Stubs {
        c_entry: 0,
        ret0: 0,
        ret1: 0,
    };
    let on = riscv64::probe::site_word(&p.arch_ref(), true, &stubs).unwrap() as u32;
    assert_eq!(on & 0xfff, 0x06f, "jal x0");
    assert_eq!(riscv64::jal_offset(on), Some(0x40));
    let off = riscv64::probe::site_word(&p.arch_ref(), false, &stubs).unwrap() as u32;
    assert_eq!(off, NOP);
}

#[test]
fn sites_riscv64_does_not_patch_are_refused() {
    let img = Image::new();
    let exec = img.exec();
    let at = img.base + TABLE;
    let parse_with = |sites: &[(u64, SiteKind, u8)], probes: &[(u64, ProbeKind)]| {
        let tb = table(&img, ids::RISCV64, sites, probes);
        let tb: &'static [u8] = Box::leak(tb.into_boxed_slice());
        Table::parse(tb, at, &exec).map(|_| ())
    };
    let unsupported = |off| FormatError::SiteUnsupported {
        site: 0,
        addr: img.base + off,
    };
    // A conditional branch, a `c.j` call (RV64 has no `c.jal`), an odd address, an
    // unknown form, a probe site at 2 mod 4.
    let e = parse_with(&[(0x1000, SiteKind::Jcc, FORM_PAIR)], &[]).unwrap_err();
    assert_eq!(e, unsupported(0x1000));
    let e = parse_with(&[(0x1000, SiteKind::Call, FORM_C_J)], &[]).unwrap_err();
    assert_eq!(e, unsupported(0x1000));
    let e = parse_with(&[(0x1001, SiteKind::Call, FORM_JAL)], &[]).unwrap_err();
    assert_eq!(e, unsupported(0x1001));
    let e = parse_with(&[(0x1000, SiteKind::Call, 3)], &[]).unwrap_err();
    assert_eq!(e, FormatError::SiteTooLong { site: 0 });
    let e = parse_with(&[], &[(0x1102, ProbeKind::CCall)]).unwrap_err();
    assert_eq!(
        e,
        FormatError::ProbeSiteMisaligned {
            site: 0,
            addr: img.base + 0x1102
        }
    );
    // 2-aligned sites of every form are fine.
    assert!(
        parse_with(
            &[(0x1002, SiteKind::Call, FORM_PAIR)],
            &[(0x1104, ProbeKind::CTail)]
        )
        .is_ok()
    );
}

#[test]
fn patching_rewrites_every_form_into_a_direct_branch_of_that_form() {
    let (img, len) = image();
    let t = parse(&img, len).unwrap();
    let mut p = Mem::default();
    let b = img.base;
    // SAFETY: the table describes the leaked buffer; nothing executes it.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| b + IMPL_B) }.unwrap();
    assert_eq!(
        (
            r.ifuncs,
            r.sites_patched,
            r.sites_out_of_reach,
            r.relaxed_sites_on_trampoline
        ),
        (1, 5, 0, 0)
    );
    assert_eq!(img.slot(), b + IMPL_B);
    for i in 0..SITES.len() {
        assert_eq!(img.dest(i), Some(b + IMPL_B), "site {i}");
    }
    // `call IMPL_B` from 0x1000: auipc ra, 0; jalr ra, 0x400(ra).
    assert_eq!(
        img.bytes_at(0x1000, 8),
        &[0x97, 0, 0, 0, 0xe7, 0x80, 0, 0x40]
    );
    assert_eq!(
        u16::from_le_bytes([img.bytes[0x1014], img.bytes[0x1015]]),
        C_NOP,
        "untouched"
    );
    assert_eq!((p.writes, p.syncs), (5, 1));
    // A second run finds the sites patched.
    // SAFETY: as above.
    let again = unsafe { patch_ifuncs(&t, &img.exec(), &mut Mem::default(), &mut |_| b + IMPL_B) };
    assert!(
        matches!(again, Err(PatchError::AlreadyPatched { .. })),
        "{again:?}"
    );
}

/// Patches a fresh image to `imp` (offset from the base; an extra executable range is
/// declared there when it lies outside the buffer); returns the report and the image.
fn patch_to(imp: u64) -> (kernel_loader::InitReport, Image) {
    let (img, len) = image();
    let b = img.base;
    let target = b.wrapping_add(imp);
    let mut exec = img.exec();
    if imp >= SIZE as u64 {
        exec.push(target..target + 0x100);
    }
    let at = (b + TABLE) as *const u8;
    // SAFETY: the leaked image's table bytes.
    let bytes = unsafe { std::slice::from_raw_parts(at, len) };
    let t = Table::parse(bytes, b + TABLE, &exec).unwrap();
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &exec, &mut Mem::default(), &mut |_| target) }.unwrap();
    assert_eq!(img.slot(), target, "calls reach it through the trampoline");
    (r, img)
}

#[test]
fn a_relaxed_site_out_of_its_reach_stays_on_the_trampoline() {
    let tramp_or = |img: &Image, i: usize, direct: u64| {
        let d = img.dest(i).unwrap();
        assert!(
            d == img.base + TRAMPOLINE || d == direct,
            "site {i}: {d:#x}"
        );
        d == direct
    };
    // Beyond the `c.j`'s 2 KiB only.
    let (r, img) = patch_to(IMPL_C);
    assert_eq!(
        (
            r.sites_patched,
            r.sites_out_of_reach,
            r.relaxed_sites_on_trampoline
        ),
        (4, 1, 1)
    );
    let direct: Vec<_> = (0..5)
        .map(|i| tramp_or(&img, i, img.base + IMPL_C))
        .collect();
    assert_eq!(direct, [true, true, true, false, true]);
    // Beyond a `jal`'s 1 MiB: only the pairs are direct.
    let (r, img) = patch_to(0x1000 + (1 << 20) + 0x1000);
    assert_eq!(
        (
            r.sites_patched,
            r.sites_out_of_reach,
            r.relaxed_sites_on_trampoline
        ),
        (2, 3, 3)
    );
    let far = img.base + 0x1000 + (1 << 20) + 0x1000;
    let direct: Vec<_> = (0..5).map(|i| tramp_or(&img, i, far)).collect();
    assert_eq!(direct, [true, true, false, false, false]);
    // Beyond a pair's 2 GiB: nothing is direct; the pairs are out of reach, not relaxed.
    let (r, img) = patch_to(1 << 32);
    assert_eq!(
        (
            r.sites_patched,
            r.sites_out_of_reach,
            r.relaxed_sites_on_trampoline
        ),
        (0, 5, 3)
    );
    for i in 0..5 {
        assert_eq!(img.dest(i), Some(img.base + TRAMPOLINE));
    }
}

#[test]
fn a_site_in_another_form_than_the_table_says_is_refused_not_misread() {
    // The `jal` site at 0x1010 rewritten as `c.j` + `c.nop` (what a second relaxation
    // could make of it): the table still says `jal`.
    let (img, len) = image();
    let b = img.base;
    let cj = riscv64::c_j((TRAMPOLINE as i64) - 0x1010).unwrap();
    img.bytes[0x1010..0x1012].copy_from_slice(&cj.to_le_bytes());
    img.bytes[0x1012..0x1014].copy_from_slice(&C_NOP.to_le_bytes());
    let before = img.bytes[..TEXT_END as usize].to_vec();
    let t = parse(&img, len).unwrap();
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut Mem::default(), &mut |_| b + IMPL_B) };
    match r {
        Err(PatchError::UnexpectedSiteBytes {
            site,
            expected,
            found,
            ..
        }) => {
            assert_eq!(site, b + 0x1010);
            assert_eq!(found.as_slice(), &img.bytes[0x1010..0x1014]);
            assert_eq!(expected.as_slice().len(), 4);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        &img.bytes[..TEXT_END as usize],
        &before[..],
        "nothing written"
    );
    assert_eq!(img.slot(), b + IMPL_A);
}

#[test]
fn a_failed_write_restores_every_site_and_the_slot() {
    let (img, len) = image();
    let before = img.bytes[..TEXT_END as usize].to_vec();
    let t = parse(&img, len).unwrap();
    let b = img.base;
    let mut p = Mem {
        fail_at: Some(b + 0x1016),
        ..Mem::default()
    };
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| b + IMPL_B) };
    assert!(matches!(r, Err(PatchError::Poke { .. })), "{r:?}");
    assert_eq!(&img.bytes[..TEXT_END as usize], &before[..]);
    assert_eq!(img.slot(), b + IMPL_A);
    assert!(
        p.writes >= 6,
        "three sites written, then restored: {}",
        p.writes
    );
}
