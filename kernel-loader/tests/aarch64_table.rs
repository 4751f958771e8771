//! A `.ksites` table whose header says aarch64, read and patched on any host: the
//! reader checks its sites with aarch64 rules, and `patch_ifuncs` rewrites `bl`/`b`
//! sites into direct branches with aarch64 encodings (into a buffer nothing executes),
//! leaves an out-of-reach one on the trampoline, and rolls back a failed batch.

use std::ops::Range;

use kernel_loader::arch::aarch64::{self, BL, NOP};
use kernel_loader::arch::{Arch, ids};
use kernel_loader::format::{
    FormatError, HEADER_SIZE, Header, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncDesc, IfuncSite,
    MAGIC, PROBE_SITE_SIZE, ProbeDesc, ProbeKind, ProbeSite, SiteKind, SubTable, Table, VERSION,
    make_rel,
};
use kernel_loader::patch::{PatchError, PokeError, PokeFailure, TextPoker, patch_ifuncs};

/// Offsets in the image buffer.
const TRAMPOLINE: u64 = 0x100;
const IMPL_A: u64 = 0x400;
const RESOLVER: u64 = 0x600;
const IMPL_B: u64 = 0x800;
const SITES: [(u64, SiteKind); 3] = [
    (0x1000, SiteKind::Call),
    (0x1004, SiteKind::Jmp),
    (0x100c, SiteKind::Call),
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

    fn word(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
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
    sites: &[(u64, SiteKind, u32)],
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
            info: IfuncSite::pack_info(kind, prefixes, 0).unwrap(),
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

/// An image as `ksites embed` leaves it: the trampoline through the slot, the slot
/// holding the default, each site a branch of its kind to the trampoline, the probe
/// site a `nop`; and its table (arch aarch64) written at `TABLE`.
fn image() -> (Image, usize) {
    let mut img = Image::new();
    let b = img.base;
    let t = aarch64::trampoline(b + TRAMPOLINE, b + SLOT).unwrap();
    for (i, w) in t.iter().enumerate() {
        img.set_word(TRAMPOLINE + 4 * i as u64, *w);
    }
    img.bytes[SLOT as usize..SLOT as usize + 8].copy_from_slice(&(b + IMPL_A).to_le_bytes());
    for (off, kind) in SITES {
        let w = aarch64::branch_insn(b + off, b + TRAMPOLINE, kind == SiteKind::Call).unwrap();
        img.set_word(off, w);
    }
    img.set_word(0x1008, NOP);
    img.set_word(PROBE_AT, NOP);
    let sites: Vec<_> = SITES.iter().map(|&(o, k)| (o, k, 0)).collect();
    let tb = table(
        &img,
        ids::AARCH64,
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
        // An aarch64 site is rewritten whole: one aligned 4-byte store.
        assert_eq!((bytes.len(), addr % 4), (4, 0), "write at {addr:#x}");
        self.writes += 1;
        // SAFETY: `addr` is a site inside the test's leaked image buffer, which nothing
        // executes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, 4) };
        Ok(())
    }
    fn sync_cores(&mut self) {
        self.syncs += 1;
    }
    fn end(&mut self) {}
}

#[test]
fn an_aarch64_table_is_read_with_aarch64_rules() {
    let (img, len) = image();
    let t = parse(&img, len).unwrap();
    assert_eq!(t.arch(), Arch::Aarch64);
    let sites: Vec<_> = t.sites().collect();
    assert_eq!(sites.len(), 3);
    for (s, (off, kind)) in sites.iter().zip(SITES) {
        assert_eq!((s.addr, s.kind, s.len()), (img.base + off, kind, 4));
        assert_eq!(
            s.target_field(),
            s.addr..s.addr + 4,
            "the whole instruction"
        );
    }
    let f = t.ifuncs().next().unwrap();
    assert_eq!(
        (f.trampoline, f.slot),
        (img.base + TRAMPOLINE, img.base + SLOT)
    );
    let p = t.probe_sites().next().unwrap();
    assert_eq!(p.addr, img.base + PROBE_AT);
    // The aarch64 probe forms of that site: `nop` ↔ `b` to its out-of-line block.
    let stubs = aarch64::probe::Stubs {
        c_entry: 0,
        ret0: 0,
        ret1: 0,
    };
    let on = aarch64::probe::site_word(&p.arch_ref(), true, &stubs).unwrap() as u32;
    assert_eq!(aarch64::branch_dest(on, p.addr), Some(p.addr + 0x40));
    let off = aarch64::probe::site_word(&p.arch_ref(), false, &stubs).unwrap() as u32;
    assert_eq!(off, NOP);
}

#[test]
fn sites_aarch64_does_not_patch_are_refused() {
    let img = Image::new();
    let exec = img.exec();
    let at = img.base + TABLE;
    let parse_with = |sites: &[(u64, SiteKind, u32)], probes: &[(u64, ProbeKind)]| {
        let tb = table(&img, ids::AARCH64, sites, probes);
        let tb: &'static [u8] = Box::leak(tb.into_boxed_slice());
        // The table's own address only anchors its self-relative fields.
        Table::parse(tb, at, &exec).map(|_| ())
    };
    // A conditional branch, a misaligned site, a "prefix", a misaligned probe site.
    let e = parse_with(&[(0x1000, SiteKind::Jcc, 0)], &[]).unwrap_err();
    assert_eq!(
        e,
        FormatError::SiteUnsupported {
            site: 0,
            addr: img.base + 0x1000
        }
    );
    assert!(e.to_string().contains("ifunc site 0"), "{e}");
    let e = parse_with(&[(0x1002, SiteKind::Call, 0)], &[]).unwrap_err();
    assert_eq!(
        e,
        FormatError::SiteUnsupported {
            site: 0,
            addr: img.base + 0x1002
        }
    );
    let e = parse_with(&[(0x1000, SiteKind::Call, 1)], &[]).unwrap_err();
    assert_eq!(e, FormatError::SiteTooLong { site: 0 });
    let e = parse_with(&[], &[(0x1101, ProbeKind::CCall)]).unwrap_err();
    assert_eq!(
        e,
        FormatError::ProbeSiteMisaligned {
            site: 0,
            addr: img.base + 0x1101
        }
    );
    // The same entries are fine for x86-64, whose instructions have any length and
    // alignment.
    let tb = table(
        &img,
        ids::X86_64,
        &[(0x1001, SiteKind::Jcc, 1)],
        &[(0x1101, ProbeKind::CCall)],
    );
    let tb: &'static [u8] = Box::leak(tb.into_boxed_slice());
    assert!(Table::parse(tb, at, &exec).is_ok());
}

#[test]
fn patching_rewrites_bl_and_b_into_direct_branches() {
    let (img, len) = image();
    let t = parse(&img, len).unwrap();
    let mut p = Mem::default();
    let b = img.base;
    // SAFETY: the table describes the leaked buffer; nothing executes it.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| b + IMPL_B) }.unwrap();
    assert_eq!((r.ifuncs, r.sites_patched, r.sites_out_of_reach), (1, 3, 0));
    assert_eq!(img.slot(), b + IMPL_B);
    // Each site is now the same kind of branch, to the implementation: `bl`/`b` with the
    // offset from the site itself.
    assert_eq!(
        img.word(0x1000),
        BL | ((IMPL_B as u32).wrapping_sub(0x1000) >> 2 & 0x03ff_ffff)
    );
    for (off, kind) in SITES {
        let w = img.word(off);
        assert_eq!(
            aarch64::branch_dest(w, b + off),
            Some(b + IMPL_B),
            "{off:#x}"
        );
        assert_eq!(
            aarch64::is_b_or_bl(w) && (w >> 31 == 1),
            kind == SiteKind::Call
        );
    }
    assert_eq!(img.word(0x1008), NOP, "not a site: untouched");
    assert_eq!((p.writes, p.syncs), (3, 1));
    // A second run finds the sites patched.
    // SAFETY: as above.
    let again = unsafe { patch_ifuncs(&t, &img.exec(), &mut Mem::default(), &mut |_| b + IMPL_B) };
    assert!(
        matches!(again, Err(PatchError::AlreadyPatched { .. })),
        "{again:?}"
    );
}

#[test]
fn an_implementation_out_of_reach_stays_on_the_trampoline() {
    let (img, len) = image();
    let b = img.base;
    // The implementation 128 MiB + 4 KiB past the sites, in a second executable range
    // (nothing reads it).
    let far = b + 0x1000 + (1 << 27) + 0x1000;
    let mut exec = img.exec();
    exec.push(far..far + 0x100);
    let at = (b + TABLE) as *const u8;
    // SAFETY: the leaked image's table bytes.
    let bytes = unsafe { std::slice::from_raw_parts(at, len) };
    let t = Table::parse(bytes, b + TABLE, &exec).unwrap();
    let mut p = Mem::default();
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &exec, &mut p, &mut |_| far) }.unwrap();
    assert_eq!((r.sites_patched, r.sites_out_of_reach), (0, 3));
    assert_eq!(
        img.slot(),
        far,
        "calls still reach it through the trampoline"
    );
    for (off, _) in SITES {
        let w = img.word(off);
        assert_eq!(aarch64::branch_dest(w, b + off), Some(b + TRAMPOLINE));
    }
    assert_eq!(p.writes, 0);
}

#[test]
fn a_failed_write_restores_every_site_and_the_slot() {
    let (img, len) = image();
    let before = img.bytes[..TEXT_END as usize].to_vec();
    let t = parse(&img, len).unwrap();
    let b = img.base;
    let mut p = Mem {
        fail_at: Some(b + 0x100c),
        ..Mem::default()
    };
    // SAFETY: as above.
    let r = unsafe { patch_ifuncs(&t, &img.exec(), &mut p, &mut |_| b + IMPL_B) };
    assert!(matches!(r, Err(PatchError::Poke { .. })), "{r:?}");
    assert_eq!(&img.bytes[..TEXT_END as usize], &before[..]);
    assert_eq!(img.slot(), b + IMPL_A);
    assert!(
        p.writes >= 4,
        "two sites written, then restored: {}",
        p.writes
    );
}
