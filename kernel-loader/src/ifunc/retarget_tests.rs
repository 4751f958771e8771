//! Host tests of live ifunc retargeting: hand-built tables over a text buffer nothing
//! executes (a kernel image and a module importing its ifunc), a poker that writes it
//! directly and can fail a chosen write, and the #BP emulation of trapped sites run
//! from inside the batch.

use std::boxed::Box;
use std::sync::Mutex;
use std::vec::Vec;

use super::retarget::{
    MAX_PREFIXED_SITES, RetargetError, emulate_with, refresh_imports, reresolve_in,
    reset_in_flight_for_tests, retarget_in, site_of,
};
use crate::arch::{Arch, BranchSite, SiteKind, ids, x86_64};
use crate::format::{IfuncDesc, IfuncSite, Table, make_rel};
use crate::patch::{PokeError, PokeFailure, TextPoker};

/// The tests share the batch's published state (one retarget at a time, as the
/// registry lock makes it in a kernel).
static SERIAL: Mutex<()> = Mutex::new(());

pub(super) fn serial() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A test that failed mid-batch may have left it published.
    reset_in_flight_for_tests();
    g
}

/// A descriptor: `slot` 0 makes it an import (only the trampoline set).
pub(super) struct Desc {
    pub(super) trampoline: u64,
    pub(super) slot: u64,
    pub(super) resolver: u64,
    pub(super) default: u64,
    pub(super) name: &'static str,
}

/// A site: address, kind, prefix count, ifunc index.
pub(super) type SiteSpec = (u64, SiteKind, u8, u32);

/// A v1 table (64-byte header) at `base` for `arch`.
fn table_bytes(arch: u16, base: u64, descs: &[Desc], sites: &[SiteSpec]) -> Vec<u8> {
    let descs_off = 64u32;
    let sites_off = descs_off + 20 * descs.len() as u32;
    let end = sites_off + 8 * sites.len() as u32;
    let mut strings = Vec::new();
    let mut names = Vec::new();
    for d in descs {
        names.push(strings.len() as u32);
        strings.extend_from_slice(d.name.as_bytes());
        strings.push(0);
    }
    let total = end + strings.len() as u32;
    let mut v = Vec::new();
    v.extend_from_slice(b"KSITES\0\0");
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&arch.to_le_bytes());
    for w in [0, 64, total] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    let n_descs = descs.len() as u32;
    let n_sites = sites.len() as u32;
    let subs = [
        (descs_off, n_descs),
        (sites_off, n_sites),
        (end, 0),
        (end, 0),
        (end, strings.len() as u32),
    ];
    for (o, c) in subs {
        v.extend_from_slice(&o.to_le_bytes());
        v.extend_from_slice(&c.to_le_bytes());
    }
    for (d, &name) in descs.iter().zip(&names) {
        let at = base + v.len() as u64;
        let rel = |off: u64, to: u64| {
            if to == 0 {
                0
            } else {
                make_rel(at + off, to).unwrap()
            }
        };
        let e = IfuncDesc {
            trampoline: rel(0, d.trampoline),
            slot: rel(4, d.slot),
            resolver: rel(8, d.resolver),
            default: rel(12, d.default),
            name,
        };
        v.extend_from_slice(&e.to_bytes());
    }
    for &(addr, kind, prefixes, ifunc) in sites {
        let at = base + v.len() as u64;
        let e = IfuncSite {
            site: make_rel(at, addr).unwrap(),
            info: IfuncSite::pack_info(kind, u32::from(prefixes), ifunc).unwrap(),
        };
        v.extend_from_slice(&e.to_bytes());
    }
    v.extend_from_slice(&strings);
    v
}

/// Where the tests' text, tables and slots live: in the test binary's own `.bss`, so
/// every rel32 between them and the binary's functions (the resolvers) reaches (a test
/// thread's heap may lie terabytes away).
struct Arena(core::cell::UnsafeCell<[u64; ARENA_WORDS]>);
const ARENA_WORDS: usize = 1 << 17;
// SAFETY: handed out in disjoint pieces (`alloc`), each used by one test.
unsafe impl Sync for Arena {}
static ARENA: Arena = Arena(core::cell::UnsafeCell::new([0; ARENA_WORDS]));
static NEXT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// `len` zeroed bytes of the arena, 8-aligned, never handed out again.
fn alloc(len: usize) -> &'static mut [u8] {
    let words = len.div_ceil(8);
    let at = NEXT.fetch_add(words, core::sync::atomic::Ordering::Relaxed);
    assert!(at + words <= ARENA_WORDS, "test arena exhausted");
    // SAFETY: words `at..at + words` of the arena, handed out once.
    unsafe { core::slice::from_raw_parts_mut((ARENA.0.get() as *mut u64).add(at) as *mut u8, len) }
}

/// A table built by `build(base)` at an 8-aligned arena address (`len` bytes).
fn place(len: usize, build: impl Fn(u64) -> Vec<u8>) -> &'static [u8] {
    let b = alloc(len);
    let bytes = build(b.as_ptr() as u64);
    b.copy_from_slice(&bytes);
    b
}

/// Length of [`table_bytes`]'s table.
fn table_len(descs: &[Desc], sites: &[SiteSpec]) -> usize {
    64 + 20 * descs.len() + 8 * sites.len() + descs.iter().map(|d| d.name.len() + 1).sum::<usize>()
}

/// A leaked, parsed table.
pub(super) fn parse(
    arch: u16,
    descs: &[Desc],
    sites: &[SiteSpec],
    exec: &[core::ops::Range<u64>],
    import_exec: &[core::ops::Range<u64>],
) -> &'static Table<'static> {
    let b = place(table_len(descs, sites), |base| {
        table_bytes(arch, base, descs, sites)
    });
    let t = Table::parse_module(b, b.as_ptr() as u64, exec, import_exec).unwrap();
    Box::leak(Box::new(t))
}

fn leak_slot(v: u64) -> u64 {
    let b = alloc(8);
    b.copy_from_slice(&v.to_le_bytes());
    b.as_ptr() as u64
}

pub(super) fn slot(addr: u64) -> u64 {
    // SAFETY: a leaked slot.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes memory directly; can fail its `fail_at`-th write (counting from 1); counts
/// writes and rounds, and runs `on_sync` at each `sync_cores` and `on_write` before
/// each write.
#[derive(Default)]
struct Mem {
    writes: usize,
    syncs: usize,
    fail_at: Option<usize>,
    on_sync: Option<Box<dyn FnMut(usize)>>,
    on_write: Option<Box<dyn FnMut(usize, u64)>>,
    log: Vec<(u64, Vec<u8>)>,
}

impl TextPoker for Mem {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        self.writes += 1;
        if let Some(h) = &mut self.on_write {
            h(self.writes, addr);
        }
        if self.fail_at == Some(self.writes) {
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        self.log.push((addr, bytes.to_vec()));
        // SAFETY: the test's text buffer, which nothing executes.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }
    fn sync_cores(&mut self) {
        self.syncs += 1;
        if let Some(h) = &mut self.on_sync {
            h(self.syncs);
        }
    }
    fn end(&mut self) {}
}

/// The x86-64 world: a kernel with ifuncs `T` (index 0) and `U` (index 1) and a module
/// importing `T`, over one text arena (so every rel32 reaches).
struct World {
    text: &'static mut [u8],
    k: u64,
    m: u64,
    t: u64,
    u: u64,
    /// Implementations.
    a: u64,
    b: u64,
    slot_t: u64,
    slot_u: u64,
    kernel: &'static Table<'static>,
    module: &'static Table<'static>,
    /// Sites of `T`: kernel then module (address, kind, prefix bytes, jcc condition).
    t_sites: Vec<(u64, SiteKind, &'static [u8], u8)>,
    u_sites: Vec<u64>,
}

const PREFIXES: [&[u8]; 3] = [&[], &[0x2e], &[0x3e, 0x2e]];

pub(super) extern "C" fn resolver_t(features: u64) -> usize {
    let (a, b) = *PICK.lock().unwrap_or_else(|e| e.into_inner());
    if features & 1 != 0 {
        b as usize
    } else {
        a as usize
    }
}

extern "C" fn resolver_u(_: u64) -> usize {
    PICK.lock().unwrap_or_else(|e| e.into_inner()).0 as usize
}

/// What the resolvers return: `T` → `.1` with feature bit 0, else `.0`; `U` → `.0`.
static PICK: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Writes the branch of `kind` (with `prefixes`, condition `cc`) at `addr` to `target`.
fn put_branch(
    text: &mut [u8],
    base: u64,
    addr: u64,
    kind: SiteKind,
    prefixes: &[u8],
    cc: u8,
    target: u64,
) {
    let mut b = prefixes.to_vec();
    b.push(x86_64::first_opcode_byte(kind));
    if kind == SiteKind::Jcc {
        b.push(0x80 | cc);
    }
    let end = addr + b.len() as u64 + 4;
    b.extend_from_slice(&x86_64::rel32(end, target).unwrap().to_le_bytes());
    let at = (addr - base) as usize;
    text[at..at + b.len()].copy_from_slice(&b);
}

fn site_len(kind: SiteKind, prefixes: &[u8]) -> u64 {
    x86_64::site_len(kind, prefixes.len() as u8) as u64
}

impl World {
    fn new(jcc_conditions: bool) -> World {
        let text: &'static mut [u8] = alloc(0x4000);
        let k = text.as_ptr() as u64;
        let m = k + 0x2000;
        let (t, u) = (k, k + 0x10);
        let (a, b) = (k + 0x100, k + 0x180);
        let slot_t = leak_slot(a);
        let slot_u = leak_slot(a);
        // Kernel sites: every kind with 0, 1 and 2 prefixes, all 16 conditions (or
        // just one), interleaved with `U`'s.
        let mut t_sites = Vec::new();
        let mut u_sites = Vec::new();
        let mut ksites: Vec<SiteSpec> = Vec::new();
        let mut at = k + 0x400;
        let conds: Vec<u8> = if jcc_conditions {
            (0..16).collect()
        } else {
            std::vec![4]
        };
        let mut forms = Vec::new();
        for p in PREFIXES {
            forms.push((SiteKind::Call, p, 0));
            forms.push((SiteKind::Jmp, p, 0));
        }
        for (i, &cc) in conds.iter().enumerate() {
            forms.push((SiteKind::Jcc, PREFIXES[i % 3], cc));
        }
        for (kind, p, cc) in forms {
            put_branch(text, k, at, kind, p, cc, a);
            t_sites.push((at, kind, p, cc));
            ksites.push((at, kind, p.len() as u8, 0));
            at += site_len(kind, p);
            // A site of `U` right after: never touched by a retarget of `T`.
            put_branch(text, k, at, SiteKind::Call, &[], 0, a);
            u_sites.push(at);
            ksites.push((at, SiteKind::Call, 0, 1));
            at += 5 + 3;
        }
        let rt = resolver_t as *const () as u64;
        let ru = resolver_u as *const () as u64;
        let kexec: Vec<_> = std::vec![k..k + 0x1000, rt..rt + 1, ru..ru + 1];
        let kdescs = [
            Desc {
                trampoline: t,
                slot: slot_t,
                resolver: rt,
                default: a,
                name: "k::t",
            },
            Desc {
                trampoline: u,
                slot: slot_u,
                resolver: ru,
                default: a,
                name: "k::u",
            },
        ];
        let kernel = parse(ids::X86_64, &kdescs, &ksites, &kexec, &kexec);
        // Module sites of `T`: a call, a prefixed jmp, a jcc.
        let mut msites: Vec<SiteSpec> = Vec::new();
        let mut at = m + 0x100;
        for (kind, p, cc) in [
            (SiteKind::Call, PREFIXES[0], 0),
            (SiteKind::Jmp, PREFIXES[1], 0),
            (SiteKind::Jcc, PREFIXES[2], 5),
        ] {
            put_branch(text, k, at, kind, p, cc, a);
            t_sites.push((at, kind, p, cc));
            msites.push((at, kind, p.len() as u8, 0));
            at += site_len(kind, p) + 1;
        }
        let mdescs = [Desc {
            trampoline: t,
            slot: 0,
            resolver: 0,
            default: 0,
            name: "k::t",
        }];
        let module = parse(
            ids::X86_64,
            &mdescs,
            &msites,
            core::slice::from_ref(&(m..m + 0x1000)),
            &kexec,
        );
        World {
            text,
            k,
            m,
            t,
            u,
            a,
            b,
            slot_t,
            slot_u,
            kernel,
            module,
            t_sites,
            u_sites,
        }
    }

    fn images(&self) -> [Option<&'static Table<'static>>; 2] {
        [Some(self.kernel), Some(self.module)]
    }

    fn snapshot(&self) -> Vec<u8> {
        self.text.to_vec()
    }

    /// Where site `addr` (of kind `kind`, `prefixes`) branches now.
    fn target_of(&self, addr: u64, kind: SiteKind, prefixes: &[u8]) -> u64 {
        let len = site_len(kind, prefixes);
        let s = BranchSite {
            addr,
            kind,
            prefixes: prefixes.len() as u8,
            len: len as u8,
        };
        let at = (addr - self.k) as usize;
        Arch::X86_64
            .decode_branch_target(&s, &self.text[at..at + len as usize])
            .unwrap()
    }

    fn t_targets(&self) -> Vec<u64> {
        self.t_sites
            .iter()
            .map(|&(a, k, p, _)| self.target_of(a, k, p))
            .collect()
    }
}

pub(super) fn no_drain() {}

/// Retargets `T` of `w` to `to` with poker `p`.
fn retarget(w: &World, to: u64, p: &mut Mem) -> Result<super::RetargetReport, RetargetError> {
    // SAFETY: the test's text buffer, which nothing executes; the slots are leaked.
    unsafe { retarget_in(&w.images(), w.t, to, p, &no_drain) }
}

#[test]
fn every_site_in_kernel_and_module_then_the_slot_in_three_rounds() {
    let _g = serial();
    let w = World::new(false);
    let n = w.t_sites.len() as u32;
    let u_before: Vec<u8> = w
        .u_sites
        .iter()
        .flat_map(|&a| w.text[(a - w.k) as usize..][..5].to_vec())
        .collect();
    let mut p = Mem::default();
    let r = retarget(&w, w.b, &mut p).unwrap();
    assert_eq!(
        (
            r.previous,
            r.sites,
            r.sites_rewritten,
            r.sites_on_trampoline,
            r.images
        ),
        (w.a, n, n, 0, 2)
    );
    assert!(
        w.t_targets().iter().all(|&t| t == w.b),
        "{:x?}",
        w.t_targets()
    );
    assert_eq!(slot(w.slot_t), w.b);
    assert_eq!(slot(w.slot_u), w.a, "the other ifunc's slot");
    let u_after: Vec<u8> = w
        .u_sites
        .iter()
        .flat_map(|&a| w.text[(a - w.k) as usize..][..5].to_vec())
        .collect();
    assert_eq!(u_before, u_after, "the other ifunc's sites");
    // One batch: three rounds for every site, three writes per site.
    assert_eq!((p.syncs, p.writes), (3, 3 * n as usize));
    // Round 0 traps each site's first byte, round 1 writes its rel32, round 2 its first
    // byte back (the prefix, for a prefixed site).
    for (i, &(addr, kind, pre, _)) in w.t_sites.iter().enumerate() {
        let n = n as usize;
        assert_eq!(p.log[i], (addr, std::vec![x86_64::INT3]));
        let field = addr + site_len(kind, pre) - 4;
        assert_eq!((p.log[n + i].0, p.log[n + i].1.len()), (field, 4));
        let first = pre
            .first()
            .copied()
            .unwrap_or(x86_64::first_opcode_byte(kind));
        assert_eq!(p.log[2 * n + i], (addr, std::vec![first]));
    }
    // And back.
    let mut p = Mem::default();
    let r = retarget(&w, w.a, &mut p).unwrap();
    assert_eq!((r.previous, r.sites_rewritten), (w.b, n));
    assert!(w.t_targets().iter().all(|&t| t == w.a));
    assert_eq!(slot(w.slot_t), w.a);
    // Retargeting to what it already is writes nothing.
    let mut p = Mem::default();
    let r = retarget(&w, w.a, &mut p).unwrap();
    assert_eq!((r.sites_rewritten, p.writes, p.syncs), (0, 0, 0));
}

#[test]
fn a_bad_site_byte_writes_nothing_and_keeps_the_slot() {
    let _g = serial();
    let w = World::new(false);
    // The last site (the module's jcc): its condition byte is fine, its opcode is not.
    let &(addr, _, pre, _) = w.t_sites.last().unwrap();
    let at = (addr - w.k) as usize + pre.len();
    let text = w.text.as_ptr() as *mut u8;
    // SAFETY: inside the leaked text buffer.
    unsafe { *text.add(at) = 0x91 };
    let before = w.snapshot();
    let mut p = Mem::default();
    let r = retarget(&w, w.b, &mut p);
    assert!(
        matches!(r, Err(RetargetError::UnexpectedSiteBytes { site, .. }) if site == addr),
        "{r:?}"
    );
    let msg = std::format!("{}", r.unwrap_err());
    assert!(
        msg.contains("k::t") && msg.contains("nothing written"),
        "{msg}"
    );
    assert_eq!((p.writes, p.syncs), (0, 0));
    assert_eq!(w.snapshot(), before);
    assert_eq!(slot(w.slot_t), w.a);
    // A site branching somewhere else than the old implementation: the same.
    // SAFETY: as above.
    unsafe { *text.add(at) = x86_64::first_opcode_byte(SiteKind::Jcc) };
    let &(addr0, kind0, pre0, _) = w.t_sites.first().unwrap();
    let mut t2 = w.text.to_vec();
    put_branch(&mut t2, w.k, addr0, kind0, pre0, 0, w.b);
    // SAFETY: as above; the first site, 5 bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(
            t2.as_ptr().add((addr0 - w.k) as usize),
            text.add((addr0 - w.k) as usize),
            5,
        )
    };
    let before = w.snapshot();
    let r = retarget(&w, w.b, &mut Mem::default());
    assert!(
        matches!(r, Err(RetargetError::UnexpectedSiteBytes { site, .. }) if site == addr0),
        "{r:?}"
    );
    assert_eq!(w.snapshot(), before);
    assert_eq!(slot(w.slot_t), w.a);
}

#[test]
fn a_failed_write_in_any_round_restores_every_byte_and_keeps_the_slot() {
    let _g = serial();
    let w = World::new(false);
    let n = w.t_sites.len();
    let before = w.snapshot();
    // Fail the 3rd write of round 0, the 2nd of round 1 (a prefixed site's rel32, after
    // earlier ones went through), the 5th and the last of round 2.
    for fail in [3, n + 2, 2 * n + 5, 3 * n] {
        let mut p = Mem {
            fail_at: Some(fail),
            ..Mem::default()
        };
        let r = retarget(&w, w.b, &mut p);
        assert!(
            matches!(r, Err(RetargetError::Poke { error, .. }) if error.reason == PokeFailure::Injected),
            "write {fail}: {r:?}"
        );
        assert_eq!(w.snapshot(), before, "write {fail}: every byte restored");
        assert_eq!(slot(w.slot_t), w.a, "write {fail}: the slot unchanged");
        assert!(std::format!("{}", r.unwrap_err()).contains("rolled back"));
    }
    // Then the batch goes through.
    retarget(&w, w.b, &mut Mem::default()).unwrap();
    assert!(w.t_targets().iter().all(|&t| t == w.b));
}

#[test]
fn a_new_implementation_out_of_reach_puts_the_sites_on_the_trampoline() {
    let _g = serial();
    let w = World::new(false);
    let n = w.t_sites.len() as u32;
    let far = w.k.wrapping_add(1 << 40);
    let r = retarget(&w, far, &mut Mem::default()).unwrap();
    assert_eq!((r.sites_rewritten, r.sites_on_trampoline), (n, n));
    assert!(w.t_targets().iter().all(|&t| t == w.t));
    assert_eq!(slot(w.slot_t), far);
    // From the trampoline back to a direct branch.
    let r = retarget(&w, w.b, &mut Mem::default()).unwrap();
    assert_eq!(
        (r.previous, r.sites_rewritten, r.sites_on_trampoline),
        (far, n, 0)
    );
    assert!(w.t_targets().iter().all(|&t| t == w.b));
    // Trampoline to trampoline: nothing written, the slot still moves.
    retarget(&w, far, &mut Mem::default()).unwrap();
    let mut p = Mem::default();
    let r = retarget(&w, far.wrapping_add(16), &mut p).unwrap();
    assert_eq!(
        (r.sites_rewritten, r.sites_on_trampoline, p.writes),
        (0, n, 0)
    );
    assert_eq!(slot(w.slot_t), far + 16);
}

#[test]
fn refused_retargets_name_what_is_wrong() {
    let _g = serial();
    let w = World::new(false);
    let r = retarget(&w, 0, &mut Mem::default());
    assert!(
        matches!(r, Err(RetargetError::BadImplementation { addr: 0, .. })),
        "{r:?}"
    );
    let r = retarget(&w, w.t, &mut Mem::default());
    assert!(
        matches!(r, Err(RetargetError::BadImplementation { .. })),
        "{r:?}"
    );
    // SAFETY: as in `retarget`.
    let r = unsafe { retarget_in(&w.images(), w.t + 1, w.b, &mut Mem::default(), &no_drain) };
    assert!(matches!(r, Err(RetargetError::NoSuchIfunc { .. })), "{r:?}");
    // The module alone imports `T` but does not define it.
    // SAFETY: as above.
    let r = unsafe { retarget_in(&[Some(w.module)], w.t, w.b, &mut Mem::default(), &no_drain) };
    assert!(matches!(r, Err(RetargetError::NoSuchIfunc { .. })), "{r:?}");
    assert!(std::format!("{}", r.unwrap_err()).contains("no registered image"));
    assert_eq!(MAX_PREFIXED_SITES, 4096);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_cpu_trapping_mid_batch_is_emulated_into_the_current_implementation() {
    use x86_64::emulate::testing::{cpu_condition, flags_of_cmp, resumes, trapped_at};
    let _g = serial();
    let w = World::new(true);
    let tables = w.images();
    let find = move |addr: u64, tramp: Option<u64>| {
        tables
            .iter()
            .flatten()
            .find_map(|t| site_of(t, addr, tramp))
    };
    // Real flag values: from `cmp` of a few pairs (equal, below, above, signed and
    // unsigned disagreeing, overflow).
    let flag_sets: Vec<u64> = [
        (1u64, 1u64),
        (1, 2),
        (2, 1),
        (u64::MAX, 1),
        (1 << 63, 1),
        (0, 1 << 63),
    ]
    .iter()
    .map(|&(a, b)| flags_of_cmp(a, b))
    .collect();
    let sites = w.t_sites.clone();
    let (a, b, u_site, m) = (w.a, w.b, w.u_sites[0], w.m);
    let checks = std::rc::Rc::new(std::cell::Cell::new(0u32));
    let c2 = checks.clone();
    // Emulates every site of `T` and checks the result goes to `to`.
    let check_all = move |to: u64| {
        let mut stack = [0u64; 4];
        let top = stack.as_mut_ptr() as u64 + 32;
        for &(addr, kind, pre, cc) in &sites {
            let next = addr + site_len(kind, pre);
            for &flags in &flag_sets {
                let mut f = trapped_at(addr, top, flags);
                // SAFETY: a frame of a trap on the site; a call's push lands in `stack`.
                assert!(unsafe { emulate_with(&mut f, find) }, "site {addr:#x}");
                let want = match kind {
                    SiteKind::Call => {
                        assert_eq!(stack[3], next, "the call's return address");
                        (to, top - 8)
                    }
                    SiteKind::Jmp => (to, top),
                    SiteKind::Jcc if cpu_condition(cc, flags) => (to, top),
                    SiteKind::Jcc => (next, top),
                };
                assert_eq!(
                    resumes(&f),
                    want,
                    "site {addr:#x} ({kind:?}, cc {cc:#x}, flags {flags:#x})"
                );
                c2.set(c2.get() + 1);
            }
        }
        // Not a site (an address inside a site, the module's memory): not handled.
        for not in [sites[0].0 + 1, m] {
            let mut f = trapped_at(not, top, 0);
            // SAFETY: as above; nothing is written when nothing is found.
            assert!(!unsafe { emulate_with(&mut f, find) });
        }
        // A site of `U`, whose first byte is no trap: a stale trap, run again.
        let mut f = trapped_at(u_site, top, 0);
        // SAFETY: as above.
        assert!(unsafe { emulate_with(&mut f, find) });
        assert_eq!(resumes(&f), (u_site, top));
    };
    let early = check_all.clone();
    let mut p = Mem {
        // Before every site is trapped: the old implementation.
        on_write: Some(Box::new(move |n, _| {
            if n == 2 {
                early(a);
            }
        })),
        // After round 0 (every site trapped) and after round 1: the new one.
        on_sync: Some(Box::new(move |n| {
            if n <= 2 {
                check_all(b);
            }
        })),
        ..Mem::default()
    };
    retarget(&w, w.b, &mut p).unwrap();
    assert_eq!(checks.get(), 3 * 6 * w.t_sites.len() as u32);
    // With no batch in flight, a CPU that trapped on a site just before its first
    // byte came back runs the site again; a trap elsewhere is not handled.
    let mut stack = [0u64; 4];
    let top = stack.as_mut_ptr() as u64 + 32;
    let (s0, s0_kind, s0_pre, _) = w.t_sites[0];
    let stale = super::retarget_stale_traps();
    let mut f = trapped_at(s0, top, 0);
    // SAFETY: as above.
    assert!(unsafe { emulate_with(&mut f, find) });
    assert_eq!(resumes(&f), (s0, top));
    assert!(super::retarget_stale_traps() > stale);
    let mut f = trapped_at(s0 + site_len(s0_kind, s0_pre) + 1, top, 0);
    // SAFETY: as above.
    assert!(!unsafe { emulate_with(&mut f, find) });
    // Through the registry, where these tables are not: not handled.
    let mut f = trapped_at(s0, top, 0);
    // SAFETY: as above.
    assert!(!unsafe { super::emulate_retarget_trap(&mut f) });
}

#[test]
fn a_failed_rollback_leaves_the_trap_emulated_and_refuses_later_retargets() {
    let _g = serial();
    let w = World::new(false);
    let n = w.t_sites.len();
    // Round 1's first write fails, then the rollback's writes (all but the traps it
    // finds in place) fail too.
    let mut p = Mem {
        fail_at: Some(n + 1),
        ..Mem::default()
    };
    p.on_write = Some(Box::new(move |_, _| {}));
    struct Failing(Mem, usize);
    impl TextPoker for Failing {
        unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
            if self.0.writes >= self.1 {
                self.0.writes += 1;
                return Err(PokeError::new(addr, PokeFailure::Injected));
            }
            // SAFETY: forwarded.
            unsafe { self.0.write(addr, bytes) }
        }
        fn sync_cores(&mut self) {}
        fn end(&mut self) {}
    }
    let mut f = Failing(Mem::default(), n);
    // SAFETY: as in `retarget`.
    let r = unsafe { retarget_in(&w.images(), w.t, w.b, &mut f, &no_drain) };
    assert!(
        matches!(r, Err(RetargetError::RollbackIncomplete { site, .. }) if site == w.t_sites[0].0),
        "{r:?}"
    );
    assert_eq!(slot(w.slot_t), w.a);
    let r2 = retarget(&w, w.b, &mut p);
    assert!(
        matches!(r2, Err(RetargetError::Stuck { trampoline }) if trampoline == w.t),
        "{r2:?}"
    );
    reset_in_flight_for_tests();
}

#[test]
fn reresolve_retargets_only_the_ifuncs_whose_choice_changed() {
    let _g = serial();
    let w = World::new(false);
    *PICK.lock().unwrap() = (w.a, w.b);
    let n = w.t_sites.len() as u32;
    let mut p = Mem::default();
    // SAFETY: as in `retarget`; the resolvers are `extern "C" fn(u64) -> usize`.
    let r = unsafe { reresolve_in(&w.images(), 1, &mut p, &no_drain) }.unwrap();
    assert_eq!(
        (
            r.ifuncs,
            r.retargeted,
            r.sites_rewritten,
            r.sites_on_trampoline
        ),
        (2, 1, n, 0)
    );
    assert_eq!((slot(w.slot_t), slot(w.slot_u)), (w.b, w.a));
    assert!(w.t_targets().iter().all(|&t| t == w.b));
    assert_eq!(p.syncs, 3, "one batch");
    // Nothing changed: nothing written.
    let mut p = Mem::default();
    // SAFETY: as above.
    let r = unsafe { reresolve_in(&w.images(), 1, &mut p, &no_drain) }.unwrap();
    assert_eq!((r.ifuncs, r.retargeted, p.writes), (2, 0, 0));
    // The feature gone: back.
    // SAFETY: as above.
    let r = unsafe { reresolve_in(&w.images(), 0, &mut Mem::default(), &no_drain) }.unwrap();
    assert_eq!(r.retargeted, 1);
    assert_eq!(slot(w.slot_t), w.a);
    // A failing retarget stops it, named.
    *PICK.lock().unwrap() = (w.a, 0);
    // SAFETY: as above.
    let e = unsafe { reresolve_in(&w.images(), 1, &mut Mem::default(), &no_drain) }.unwrap_err();
    assert!(
        matches!(e.error, RetargetError::BadImplementation { .. }),
        "{e:?}"
    );
    assert_eq!(e.trampoline, w.t);
    assert!(std::format!("{e}").contains("k::t"), "{e}");
    let _ = w.u;
}

#[test]
fn refresh_imports_brings_a_stale_module_to_the_current_slot() {
    let _g = serial();
    let w = World::new(false);
    // The kernel's `T` moved on to `B` after the module's sites were patched to `A`
    // (the kernel's own sites follow, as a retarget that did not see the module would
    // leave them).
    // SAFETY: the leaked slot.
    unsafe { core::ptr::write_volatile(w.slot_t as *mut u64, w.b) };
    let mut p = Mem::default();
    // SAFETY: the module's text is the test's buffer, which nothing executes.
    let n = unsafe { refresh_imports(w.module, [w.kernel].into_iter(), &mut p) }.unwrap();
    assert_eq!(n, 3);
    assert_eq!(p.syncs, 1);
    for &(addr, kind, pre, _) in w.t_sites.iter().filter(|s| s.0 >= w.m) {
        assert_eq!(w.target_of(addr, kind, pre), w.b);
    }
    // Kernel sites untouched.
    assert_eq!(
        w.target_of(w.t_sites[0].0, w.t_sites[0].1, w.t_sites[0].2),
        w.a
    );
    // Up to date: nothing written.
    let mut p = Mem::default();
    // SAFETY: as above.
    let n = unsafe { refresh_imports(w.module, [w.kernel].into_iter(), &mut p) }.unwrap();
    assert_eq!((n, p.writes, p.syncs), (0, 0, 0));
    // No definition registered: nothing to follow.
    // SAFETY: as above.
    let n = unsafe { refresh_imports(w.module, core::iter::empty(), &mut Mem::default()) }.unwrap();
    assert_eq!(n, 0);
}

/// aarch64: `bl`/`b` sites, one store each and one round.
#[test]
fn aarch64_rewrites_each_site_with_one_store_and_one_round_and_rolls_back() {
    let _g = serial();
    let raw = alloc(0x1000);
    // SAFETY: the arena piece, 8-aligned, as words.
    let text: &'static mut [u32] =
        unsafe { core::slice::from_raw_parts_mut(raw.as_mut_ptr() as *mut u32, 0x400) };
    let k = text.as_ptr() as u64;
    let (t, a, b) = (k, k + 0x100, k + 0x200);
    let sl = leak_slot(a);
    let a64 = Arch::Aarch64;
    let mut sites: Vec<SiteSpec> = Vec::new();
    for i in 0..6u64 {
        let kind = if i % 2 == 0 {
            SiteKind::Call
        } else {
            SiteKind::Jmp
        };
        let addr = k + 0x400 + 8 * i;
        let s = BranchSite {
            addr,
            kind,
            prefixes: 0,
            len: 4,
        };
        text[((addr - k) / 4) as usize] = a64.encode_target(&s, a).unwrap().value as u32;
        sites.push((addr, kind, 0, 0));
    }
    let descs = [Desc {
        trampoline: t,
        slot: sl,
        resolver: a,
        default: a,
        name: "k::t",
    }];
    let range = k..k + 0x1000;
    let exec = core::slice::from_ref(&range);
    let table = parse(ids::AARCH64, &descs, &sites, exec, exec);
    let words = |text: &[u32]| -> Vec<u32> {
        sites
            .iter()
            .map(|s| text[((s.0 - k) / 4) as usize])
            .collect()
    };
    let before = words(text);
    // A failed third store: the two before put back.
    let mut p = Mem {
        fail_at: Some(3),
        ..Mem::default()
    };
    // SAFETY: the test's buffer, which nothing executes.
    let r = unsafe { retarget_in(&[Some(table)], t, b, &mut p, &no_drain) };
    assert!(matches!(r, Err(RetargetError::Poke { .. })), "{r:?}");
    assert_eq!(words(text), before);
    assert_eq!(slot(sl), a);
    let mut p = Mem::default();
    // SAFETY: as above.
    let r = unsafe { retarget_in(&[Some(table)], t, b, &mut p, &no_drain) }.unwrap();
    assert_eq!((r.sites_rewritten, p.writes, p.syncs), (6, 6, 1));
    assert!(
        p.log.iter().all(|(addr, b)| b.len() == 4 && addr % 4 == 0),
        "one aligned store each"
    );
    for s in &sites {
        let bs = BranchSite {
            addr: s.0,
            kind: s.1,
            prefixes: 0,
            len: 4,
        };
        let w = text[((s.0 - k) / 4) as usize].to_le_bytes();
        assert_eq!(a64.decode_branch_target(&bs, &w), Some(b));
    }
    assert_eq!(slot(sl), b);
}

#[test]
fn riscv64_is_refused_as_unsupported() {
    let _g = serial();
    let text = alloc(0x1000);
    let k = text.as_ptr() as u64;
    let sl = leak_slot(k + 0x100);
    let descs = [Desc {
        trampoline: k,
        slot: sl,
        resolver: k + 0x100,
        default: k + 0x100,
        name: "k::t",
    }];
    let range = k..k + 0x1000;
    let exec = core::slice::from_ref(&range);
    let table = parse(ids::RISCV64, &descs, &[], exec, exec);
    // SAFETY: nothing is written.
    let r = unsafe { retarget_in(&[Some(table)], k, k + 0x200, &mut Mem::default(), &no_drain) };
    assert_eq!(
        r,
        Err(RetargetError::Unsupported {
            arch: Arch::Riscv64
        })
    );
    assert!(std::format!("{}", r.unwrap_err()).contains("riscv64"));
    assert_eq!(slot(sl), k + 0x100);
}

/// Races of the #BP hook with consecutive batches (found in review).
#[cfg(target_arch = "x86_64")]
#[path = "retarget_race_tests.rs"]
mod race;
