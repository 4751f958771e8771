//! Key batches on the host: tables built by hand over text in static buffers (near the
//! key statics, so every self-relative field reaches), registered as modules (the
//! kernel's slot holds an empty table), written with a poker that stores directly and
//! can fail a write or simulate a CPU trapping on a site mid-batch.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use std::sync::Once;
use std::vec::Vec;

use super::batch::Batch;
use super::registry::set_sites_with;
use super::{KeyError, StaticKey};
use crate::arch::ids;
use crate::arch::native::key as arch;
use crate::arch::native::probe as probe_arch;
use crate::format::Table;
use crate::format::test_table::{KeySiteSpec, KeySpec, key_table, table_for};
use crate::patch::{PokeError, PokeFailure, TextPoker};
use crate::probe::{
    self, ImageHandle, ProbeError, register_loaded_module, register_module, unregister_module,
};

/// 512 bytes of "text" and 512 of table, 8-aligned, in the test binary's data.
#[repr(C, align(8))]
pub(super) struct Area(UnsafeCell<[u8; 1024]>);
// SAFETY: each test uses its own areas, written only through the test's poker or
// before registration.
unsafe impl Sync for Area {}
impl Area {
    pub(super) const fn new() -> Area {
        Area(UnsafeCell::new([0; 1024]))
    }
    fn text(&self) -> u64 {
        self.0.get() as u64
    }
    pub(super) fn table_base(&self) -> u64 {
        self.text() + 512
    }
    fn bytes(&self) -> &'static mut [u8; 1024] {
        // SAFETY: the test owns the area (see `Sync`); nothing executes it.
        unsafe { &mut *self.0.get() }
    }
    /// Copies `t` into the table half and parses it (text: the first half).
    fn table(&'static self, t: &[u8]) -> Table<'static> {
        let b = self.bytes();
        b[512..512 + t.len()].copy_from_slice(t);
        let exec = self.text()..self.text() + 512;
        Table::parse(
            &b[512..512 + t.len()],
            self.table_base(),
            core::slice::from_ref(&exec),
        )
        .unwrap()
    }
    /// Copies `t` into the table half and parses it with the executable ranges `exec`.
    pub(super) fn table_with(
        &'static self,
        t: &[u8],
        exec: &[core::ops::Range<u64>],
    ) -> Table<'static> {
        let b = self.bytes();
        b[512..512 + t.len()].copy_from_slice(t);
        Table::parse(&b[512..512 + t.len()], self.table_base(), exec).unwrap()
    }
    fn range(&self) -> core::ops::Range<u64> {
        self.text()..self.text() + 1024
    }
    fn snapshot(&self) -> Vec<u8> {
        self.bytes()[..512].to_vec()
    }
}

/// Registers an empty kernel table once (keys need the kernel registered) and
/// declares the #BP route (the tests' sites are never executed).
pub(super) fn kernel() {
    static ONCE: Once = Once::new();
    static KERNEL: Area = Area::new();
    ONCE.call_once(|| {
        let t = KERNEL.table(&key_table(KERNEL.table_base(), &[], &[]));
        probe::register_image(t, &Mem::default()).unwrap();
        // SAFETY: no test site is ever executed.
        unsafe { probe::declare_int3_route() };
    });
}

/// A native (x86-64) key site word.
fn form(site: u64, target: u64, jumps: bool) -> u64 {
    arch::site_word(site, target, jumps).unwrap()
}

/// Writes every site of `sites` (of keys `keys`, whose objects are `objs`) in the form
/// of its key's state `on[key]`.
fn write_forms(area: &Area, sites: &[KeySiteSpec], on: &[bool]) {
    let b = area.bytes();
    for &(site, target, likely, key) in sites {
        let w = form(site, target, on[key as usize] != likely).to_le_bytes();
        let at = (site - area.text()) as usize;
        b[at..at + arch::SITE_LEN].copy_from_slice(&w[..arch::SITE_LEN]);
    }
}

/// The bytes of the site at `site` of `area`.
fn site_now(area: &Area, site: u64) -> u64 {
    assert!(area.range().contains(&site));
    site_now_at(site)
}

/// The bytes of the site at `site`, in some test area.
fn site_now_at(site: u64) -> u64 {
    let mut w = [0u8; 8];
    // SAFETY: a site in a test area (inside its text).
    unsafe { core::ptr::copy_nonoverlapping(site as *const u8, w.as_mut_ptr(), arch::SITE_LEN) };
    u64::from_le_bytes(w)
}

/// Writes memory directly; optionally fails write number `fail_at` (0-based) and,
/// after every write, simulates a CPU trapping on each of `watch`'s sites that starts
/// with the protocol's trap, recording where the #BP hook resumed it.
#[derive(Default)]
struct Mem {
    writes: usize,
    syncs: usize,
    fail_at: Option<usize>,
    watch: Vec<(u64, u64)>,
    key: Option<&'static StaticKey>,
    /// (write number, site, where it resumed, the key's published state then).
    traps: Vec<(usize, u64, u64, bool)>,
}

impl TextPoker for Mem {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at == Some(self.writes) {
            self.fail_at = None;
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        self.writes += 1;
        // SAFETY: a test area, which nothing executes.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        for &(site, _) in &self.watch {
            // The site starts with the protocol's trap (round 0's piece).
            if probe_arch::round(0, 0).is_in(site_now_at(site)) {
                let mut f = arch::trap_frame_at(site);
                // SAFETY: a simulated trap at a site nothing executes; the frame is ours.
                let handled = unsafe { probe::handle_int3(&mut f) };
                assert!(handled, "trap at {site:#x} not handled");
                let published = self.key.is_some_and(|k| k.published());
                self.traps
                    .push((self.writes, site, arch::resume_addr(&f), published));
            }
        }
        Ok(())
    }
    fn sync_cores(&mut self) {
        self.syncs += 1;
    }
    fn end(&mut self) {}
}

/// Two images: A defines `key` (index 0) and `other` (index 1), B imports both. Returns
/// the sites of `key` and of `other` in each.
struct TwoImages {
    a: &'static Area,
    b: &'static Area,
    sites_a: Vec<KeySiteSpec>,
    sites_b: Vec<KeySiteSpec>,
    ha: ImageHandle,
    hb: ImageHandle,
}

fn two_images(
    a: &'static Area,
    b: &'static Area,
    key: &'static StaticKey,
    other: &'static StaticKey,
) -> TwoImages {
    kernel();
    // Names sorted: `key`'s before `other`'s (the tests name them so).
    assert!(key.name() < other.name());
    let mk = |area: &Area, imported: bool| -> (Vec<KeySpec<'static>>, Vec<KeySiteSpec>) {
        let keys = std::vec![
            (key.addr(), key.name(), key.default(), imported),
            (other.addr(), other.name(), other.default(), imported),
        ];
        let t = area.text();
        // Sites of both keys interleaved, unlikely and likely.
        let sites = std::vec![
            (t, t + 0x100, false, 0),
            (t + 0x10, t + 0x110, false, 1),
            (t + 0x20, t + 0x120, true, 0),
            (t + 0x30, t + 0x130, false, 0),
            (t + 0x40, t + 0x140, true, 1),
        ];
        (keys, sites)
    };
    let (ka, sites_a) = mk(a, false);
    let (kb, sites_b) = mk(b, true);
    let on = [key.is_enabled(), other.is_enabled()];
    write_forms(a, &sites_a, &on);
    write_forms(b, &sites_b, &on);
    let ta = a.table(&key_table(a.table_base(), &ka, &sites_a));
    let tb = b.table(&key_table(b.table_base(), &kb, &sites_b));
    // SAFETY: the areas are static; their keys are the statics above.
    let ha = unsafe { register_module(ta, a.range(), &Mem::default()) }.unwrap();
    // SAFETY: as above.
    let hb = unsafe { register_module(tb, b.range(), &Mem::default()) }.unwrap();
    TwoImages {
        a,
        b,
        sites_a,
        sites_b,
        ha,
        hb,
    }
}

impl TwoImages {
    /// Whether every site of key index `k` is in the form of state `on`.
    fn all_in(&self, k: u32, on: bool) -> bool {
        [(self.a, &self.sites_a), (self.b, &self.sites_b)]
            .iter()
            .all(|(area, sites)| {
                sites
                    .iter()
                    .filter(|s| s.3 == k)
                    .all(|&(site, target, likely, _)| {
                        site_now(area, site) == form(site, target, on != likely)
                    })
            })
    }

    fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        (self.a.snapshot(), self.b.snapshot())
    }

    fn unregister(self) {
        // SAFETY: the areas are static; nothing executes them.
        unsafe { unregister_module(&self.ha, 0..0, &mut Mem::default()) }.unwrap();
        // SAFETY: as above.
        unsafe { unregister_module(&self.hb, 0..0, &mut Mem::default()) }.unwrap();
    }
}

#[test]
fn enable_disable_inc_dec_move_exactly_the_keys_sites_in_both_images() {
    static A: Area = Area::new();
    static B: Area = Area::new();
    static K: StaticKey = StaticKey::new("t1::k", false);
    static OTHER: StaticKey = StaticKey::new("t1::other", false);
    let im = two_images(&A, &B, &K, &OTHER);
    assert!(im.all_in(0, false) && im.all_in(1, false));
    let other_before = |im: &TwoImages| {
        im.sites_a
            .iter()
            .chain(&im.sites_b)
            .filter(|s| s.3 == 1)
            .map(|s| s.0)
            .collect::<Vec<_>>()
    };
    let others = other_before(&im);
    let other_bytes = |im: &TwoImages| {
        others
            .iter()
            .map(|&s| {
                let area = if A.range().contains(&s) { im.a } else { im.b };
                site_now(area, s)
            })
            .collect::<Vec<_>>()
    };
    let untouched = other_bytes(&im);

    // Enable: one batch of three int3 rounds over K's 6 sites (3 writes each).
    let mut p = Mem::default();
    // SAFETY: the sites are in test areas nothing executes.
    unsafe { K.enable(&mut p) }.unwrap();
    assert!(K.is_enabled() && K.count() == 1);
    assert!(im.all_in(0, true), "every site of the key, in both images");
    assert_eq!(other_bytes(&im), untouched, "no site of another key");
    assert_eq!((p.writes, p.syncs), (6 * 3, 3));
    // Idempotent enable, counted inc/dec above 0: no write.
    let mut p = Mem::default();
    // SAFETY: as above.
    unsafe {
        K.enable(&mut p).unwrap();
        K.inc(&mut p).unwrap();
        assert_eq!(K.count(), 2);
        K.dec(&mut p).unwrap();
    }
    assert_eq!((p.writes, K.count()), (0, 1));
    // 1 -> 0: one batch back.
    let mut p = Mem::default();
    // SAFETY: as above.
    unsafe { K.dec(&mut p) }.unwrap();
    assert!(!K.is_enabled() && im.all_in(0, false));
    assert_eq!(p.writes, 18);
    // Underflow: an error naming the key, nothing changed.
    let mut p = Mem::default();
    // SAFETY: as above.
    let e = unsafe { K.dec(&mut p) }.unwrap_err();
    assert_eq!(
        e,
        KeyError::Underflow {
            key: "t1::k".into()
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "static key t1::k: dec with a count of 0"
    );
    assert_eq!((p.writes, K.count()), (0, 0));
    // Disable at 0 is a no-op; inc from 0 patches; disable from 2 goes to 0.
    // SAFETY: as above.
    unsafe {
        K.disable(&mut p).unwrap();
        assert_eq!(p.writes, 0);
        K.inc(&mut p).unwrap();
        K.inc(&mut p).unwrap();
        assert!(im.all_in(0, true) && K.count() == 2);
        K.disable(&mut p).unwrap();
    }
    assert!(im.all_in(0, false) && K.count() == 0);
    assert_eq!(other_bytes(&im), untouched);
    // Introspection: K, defined by A, with sites in A and B.
    let info = super::keys().find(|k| k.addr == K.addr()).unwrap();
    assert_eq!(
        (info.name, info.enabled, info.count, info.sites, info.images),
        ("t1::k".into(), false, 0, 6, 2)
    );
    assert_eq!(super::keys().filter(|k| k.addr == K.addr()).count(), 1);
    im.unregister();
    assert!(super::keys().all(|k| k.addr != K.addr()));
}

#[test]
fn a_bad_site_or_a_failed_write_restores_every_byte_and_the_count() {
    static A: Area = Area::new();
    static B: Area = Area::new();
    static K: StaticKey = StaticKey::new("t2::k", false);
    static OTHER: StaticKey = StaticKey::new("t2::other", false);
    let im = two_images(&A, &B, &K, &OTHER);
    // B's second site of K holds something else: A's three sites were trapped, B's
    // first too, then all were put back.
    let bad = im.sites_b[2].0;
    let at = (bad - B.text()) as usize + 2;
    let good = B.bytes()[at];
    B.bytes()[at] = 0x99;
    let before = im.snapshot();
    let mut p = Mem::default();
    // SAFETY: as above.
    let e = unsafe { K.enable(&mut p) }.unwrap_err();
    match e {
        KeyError::UnexpectedBytes { site, key, .. } => {
            assert_eq!((site, key), (bad, "t2::k".into()));
        }
        e => panic!("{e:?}"),
    }
    assert!(std::format!("{e}").starts_with(&std::format!(
        "static key t2::k site {bad:#x}: expected bytes"
    )));
    assert_eq!(im.snapshot(), before, "every byte restored");
    assert!(
        p.writes >= 4,
        "four sites were trapped then restored: {}",
        p.writes
    );
    assert_eq!(
        (K.count(), K.is_enabled(), K.published()),
        (0, false, false)
    );
    B.bytes()[at] = good;

    // A write of the second round fails: every site back, the count unchanged.
    for fail_at in [0, 3, 6, 9, 13] {
        let before = im.snapshot();
        let mut p = Mem {
            fail_at: Some(fail_at),
            ..Mem::default()
        };
        // SAFETY: as above.
        let e = unsafe { K.enable(&mut p) }.unwrap_err();
        assert!(matches!(e, KeyError::Poke(_)), "{e:?}");
        assert_eq!(im.snapshot(), before, "fail at write {fail_at}");
        assert_eq!((K.count(), K.published()), (0, false));
    }
    // Then it goes through.
    // SAFETY: as above.
    unsafe { K.enable(&mut Mem::default()) }.unwrap();
    assert!(im.all_in(0, true));
    // And back, with a failure on the way: still enabled, every site as it was.
    let before = im.snapshot();
    let mut p = Mem {
        fail_at: Some(8),
        ..Mem::default()
    };
    // SAFETY: as above.
    assert!(unsafe { K.disable(&mut p) }.is_err());
    assert_eq!(im.snapshot(), before);
    assert_eq!((K.count(), K.published()), (1, true));
    // SAFETY: as above.
    unsafe { K.disable(&mut Mem::default()) }.unwrap();
    im.unregister();
}

#[test]
fn a_cpu_trapping_on_a_site_mid_batch_resumes_in_the_published_state() {
    static A: Area = Area::new();
    static B: Area = Area::new();
    static K: StaticKey = StaticKey::new("t3::k", false);
    static OTHER: StaticKey = StaticKey::new("t3::other", false);
    let im = two_images(&A, &B, &K, &OTHER);
    let watch: Vec<_> = im
        .sites_a
        .iter()
        .chain(&im.sites_b)
        .filter(|s| s.3 == 0)
        .map(|s| (s.0, s.1))
        .collect();
    let likely = |site: u64| {
        im.sites_a
            .iter()
            .chain(&im.sites_b)
            .any(|s| s.0 == site && s.2)
    };
    for on in [true, false] {
        let mut p = Mem {
            watch: watch.clone(),
            key: Some(&K),
            ..Mem::default()
        };
        // SAFETY: as above; the traps are simulated.
        unsafe {
            if on {
                K.enable(&mut p)
            } else {
                K.disable(&mut p)
            }
        }
        .unwrap();
        // Round 0 traps each site (published: the old state), then the new state is
        // published and rounds 1 and 2 run (a site keeps its int3 until round 2).
        assert!(
            p.traps.iter().any(|t| t.3 != on),
            "a trap before publishing"
        );
        assert!(p.traps.iter().any(|t| t.3 == on), "a trap after publishing");
        for &(_, site, resumed, published) in &p.traps {
            let target = watch.iter().find(|w| w.0 == site).unwrap().1;
            let jumps = published != likely(site);
            let want = if jumps {
                target
            } else {
                site + arch::SITE_LEN as u64
            };
            assert_eq!(resumed, want, "site {site:#x}, published {published}");
        }
    }
    // A trap elsewhere in the images is not the loader's.
    let mut f = arch::trap_frame_at(A.text() + 0x50);
    // SAFETY: a simulated trap; the frame is ours.
    assert!(!unsafe { probe::handle_int3(&mut f) });
    im.unregister();
}

#[test]
fn a_module_s_sites_of_an_enabled_key_are_set_at_registration() {
    static A: Area = Area::new();
    static B: Area = Area::new();
    static C: Area = Area::new();
    static K: StaticKey = StaticKey::new("t4::k", false);
    static OTHER: StaticKey = StaticKey::new("t4::other", true);
    let im = two_images(&A, &B, &K, &OTHER);
    // SAFETY: as above.
    unsafe { K.enable(&mut Mem::default()) }.unwrap();
    // C imports K and OTHER; its sites are as the build tool writes imports: NOPs.
    let t = C.text();
    let keys = [
        (K.addr(), K.name(), false, true),
        (OTHER.addr(), OTHER.name(), true, true),
    ];
    let sites = [
        (t, t + 0x100, false, 0),
        (t + 0x10, t + 0x110, true, 0),
        (t + 0x20, t + 0x120, false, 1),
        (t + 0x30, t + 0x130, true, 1),
    ];
    let nop = form(t, t, false);
    let c = |i: usize| site_now(&C, sites[i].0);
    for &(s, _, _, _) in &sites {
        let at = (s - t) as usize;
        C.bytes()[at..at + arch::SITE_LEN].copy_from_slice(&arch::NOP);
    }
    let table = C.table(&key_table(C.table_base(), &keys, &sites));
    // A plain registration checks: K is enabled, so its unlikely site must jump.
    // SAFETY: as above.
    let e = unsafe { register_module(table, C.range(), &Mem::default()) }.unwrap_err();
    assert!(
        matches!(e, ProbeError::Key(KeyError::UnexpectedBytes { site, .. }) if site == t),
        "{e:?}"
    );
    // The module loader's registration sets them first: K enabled, OTHER enabled.
    let mut p = Mem::default();
    // SAFETY: as above; nothing executes C.
    let hc = unsafe { register_loaded_module(table, C.range(), &mut p) }.unwrap();
    assert_eq!(
        c(0),
        form(sites[0].0, sites[0].1, true),
        "unlikely site of K jumps"
    );
    assert_eq!(c(1), nop, "likely site of K falls through");
    assert_eq!(
        c(2),
        form(sites[2].0, sites[2].1, true),
        "unlikely site of OTHER"
    );
    assert_eq!(c(3), nop);
    assert_eq!(
        (p.writes, p.syncs),
        (2, 1),
        "two whole-site writes, one sync"
    );
    // From now on K's batches include C.
    // SAFETY: as above.
    unsafe { K.disable(&mut Mem::default()) }.unwrap();
    assert_eq!((c(0), c(1)), (nop, form(sites[1].0, sites[1].1, true)));
    assert!(im.all_in(0, false));
    // Unregistered, C is never touched again (its text may be freed).
    // SAFETY: as above.
    unsafe { unregister_module(&hc, 0..0, &mut Mem::default()) }.unwrap();
    C.bytes()[..0x40].iter_mut().for_each(|b| *b = 0xee);
    let gone = C.snapshot();
    // SAFETY: as above.
    unsafe { K.enable(&mut Mem::default()) }.unwrap();
    assert!(im.all_in(0, true));
    assert_eq!(C.snapshot(), gone);
    // SAFETY: as above.
    unsafe { K.disable(&mut Mem::default()) }.unwrap();
    im.unregister();
}

#[test]
fn registration_refuses_an_address_that_is_no_key() {
    static A: Area = Area::new();
    static NOT_A_KEY: [u64; 4] = [0x1234, 0, 0, 0];
    kernel();
    let t = A.text();
    let addr = NOT_A_KEY.as_ptr() as u64;
    let keys = [(addr, "t5::x", false, false)];
    let table = A.table(&key_table(
        A.table_base(),
        &keys,
        &[(t, t + 0x40, false, 0)],
    ));
    // SAFETY: as above.
    let e = unsafe { register_module(table, A.range(), &Mem::default()) }.unwrap_err();
    assert_eq!(e, ProbeError::Key(KeyError::NotAKey { addr }));
    assert!(std::format!("{e}").contains("no key is there"));
    // Misaligned.
    let keys = [(addr + 4, "t5::x", false, false)];
    let table = A.table(&key_table(
        A.table_base(),
        &keys,
        &[(t, t + 0x40, false, 0)],
    ));
    // SAFETY: as above.
    let e = unsafe { register_module(table, A.range(), &Mem::default()) }.unwrap_err();
    assert_eq!(e, ProbeError::Key(KeyError::NotAKey { addr: addr + 4 }));
}

#[test]
fn key_objects_have_the_contract_s_layout() {
    static K: StaticKey = StaticKey::new("t6::k", true);
    let p = K.addr() as *const u8;
    // SAFETY: reading the 32 bytes of the static.
    let b = unsafe { core::slice::from_raw_parts(p, super::KEY_SIZE) };
    assert_eq!(&b[0..4], b"KSKY");
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
    let name = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let len = u64::from_le_bytes(b[16..24].try_into().unwrap());
    // SAFETY: the name pointer and length the key holds.
    let s = unsafe { core::slice::from_raw_parts(name as usize as *const u8, len as usize) };
    assert_eq!(s, b"t6::k");
    assert_eq!(
        u32::from_le_bytes(b[24..28].try_into().unwrap()),
        1,
        "count = default"
    );
    assert_eq!(&b[28..32], &[0; 4]);
    assert!(K.is_enabled() && K.default() && K.published());
    assert_eq!(super::SITE_RECORD_MAGIC.to_le_bytes(), *b"KSKS");
}

/// The batch with a single-store protocol (aarch64's, riscv64's) over two tables: one
/// store per site, one round; a failed check writes nothing; a failed store restores.
macro_rules! single_store {
    ($name:ident, $arch:ident, $id:ident, $foreign:expr) => {
        #[test]
        fn $name() {
            use crate::arch::$arch::key as arch;
            static A: Area = Area::new();
            static B: Area = Area::new();
            static K: StaticKey = StaticKey::new("s::k", false);
            let mk = |area: &'static Area, imported| {
                let t = area.text();
                let sites = std::vec![
                    (t, t + 0x100, false, 0),
                    (t + 8, t + 0x108, true, 0),
                    (t + 16, t + 0x110, false, 0),
                ];
                let keys = [(K.addr(), K.name(), false, imported)];
                let table = table_for(ids::$id, area.table_base(), 0, &[], &keys, &sites);
                for &(s, target, likely, _) in &sites {
                    let w = arch::site_word(s, target, likely).unwrap() as u32;
                    let at = (s - t) as usize;
                    area.bytes()[at..at + 4].copy_from_slice(&w.to_le_bytes());
                }
                (area.table(&table), sites)
            };
            let (ta, sa) = mk(&A, false);
            let (tb, sb) = mk(&B, true);
            let tables = [ta, tb];
            let b = Batch::<arch::Live, _> {
                key: &K,
                images: tables.iter(),
                stubs: arch::stubs(),
                site_ref: arch::site_ref,
                arch: PhantomData,
            };
            let all_in = |on: bool| {
                [(&A, &sa), (&B, &sb)].iter().all(|(area, sites)| {
                    sites.iter().all(|&(s, target, likely, _)| {
                        let at = (s - area.text()) as usize;
                        let w = u32::from_le_bytes(area.bytes()[at..at + 4].try_into().unwrap());
                        u64::from(w) == arch::site_word(s, target, on != likely).unwrap()
                    })
                })
            };
            assert!(all_in(false));
            let mut p = Mem::default();
            // SAFETY: the sites are in test areas nothing executes.
            unsafe { b.switch(true, &mut p) }.unwrap();
            assert!(all_in(true) && K.published());
            assert_eq!((p.writes, p.syncs), (6, 1), "one store per site, one round");
            // A site holding something else: nothing written.
            let at = 8;
            let keep = B.bytes()[at..at + 4].to_vec();
            B.bytes()[at..at + 4].copy_from_slice(&($foreign as u32).to_le_bytes());
            let mut p = Mem::default();
            // SAFETY: as above.
            let e = unsafe { b.switch(false, &mut p) }.unwrap_err();
            assert!(matches!(e, KeyError::UnexpectedBytes { site, .. } if site == B.text() + 8));
            assert_eq!((p.writes, p.syncs), (0, 0));
            assert!(K.published(), "the old state stays published");
            B.bytes()[at..at + 4].copy_from_slice(&keep);
            // The fifth store fails: all six sites restored, in one round.
            let mut p = Mem {
                fail_at: Some(4),
                ..Mem::default()
            };
            // SAFETY: as above.
            let e = unsafe { b.switch(false, &mut p) }.unwrap_err();
            assert!(matches!(e, KeyError::Poke(_)), "{e:?}");
            assert!(all_in(true) && K.published());
            // Then through.
            // SAFETY: as above.
            unsafe { b.switch(false, &mut Mem::default()) }.unwrap();
            assert!(all_in(false) && !K.published());
            // A module's sites set at registration, as protocol `A` encodes them.
            // SAFETY: nothing executes B; K is a key.
            let n = unsafe {
                set_sites_with::<arch::Live, Mem>(&tb, &mut Mem::default(), arch::stubs(), arch::site_ref)
            };
            assert_eq!(n, Ok(0), "already in K's state");
        }
    };
}

single_store!(aarch64_single_store_batch, aarch64, AARCH64, 0xd65f_03c0u32); // ret
single_store!(riscv64_single_store_batch, riscv64, RISCV64, 0x0000_8067u32); // ret

#[test]
fn errors_say_what_is_wrong_and_chain_into_error() {
    let k = crate::name::Name::new("m::K");
    let insn = crate::patch::InsnBytes::new(&[7; 5]);
    let cases = [
        (KeyError::NotRegistered, "probe::register_image"),
        (KeyError::NoTrapRoute, "declare_int3_route"),
        (
            KeyError::Underflow { key: k },
            "static key m::K: dec with a count of 0",
        ),
        (
            KeyError::Overflow { key: k },
            "static key m::K: inc past a count of 4294967295",
        ),
        (
            KeyError::NotAKey { addr: 0x40 },
            "names 0x40 as a static key",
        ),
        (
            KeyError::UnexpectedBytes {
                site: 0x1000,
                key: k,
                expected: insn,
                found: insn,
            },
            "static key m::K site 0x1000: expected bytes [",
        ),
        (
            KeyError::OutOfReach {
                site: 0x1000,
                target: 0x9000,
            },
            "site 0x1000 cannot reach its label 0x9000",
        ),
        (
            KeyError::Poke(PokeError::new(0x1000, PokeFailure::Injected)),
            "(key batch rolled back)",
        ),
        (
            KeyError::RollbackIncomplete {
                site: 0x1000,
                key: k,
            },
            "static key m::K: a write failed and site 0x1000 could not be restored",
        ),
    ];
    for (e, want) in cases {
        let msg = std::format!("{e}");
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        let chained = || -> Result<(), crate::Error> { Err(e)? };
        assert_eq!(std::format!("{}", chained().unwrap_err()), msg);
        assert_eq!(std::format!("{}", ProbeError::Key(e)), msg);
    }
}
