//! Patching throughput: `patch_ifuncs` on 10^5 sites of a generated table over fake text
//! in a heap buffer (as build-tool/tests/loader.rs does), against a plain loop writing
//! the same bytes; and toggling a probe with 10^4 real sites in this program's text,
//! batched, against per-site serialization and a plain loop.

use std::ops::Range;
use std::time::{Duration, Instant};

use kernel_loader::format::{SiteKind, Table};
use kernel_loader::host::HostPoker;
use kernel_loader::patch::{PokeError, TextPoker, patch_ifuncs};
use kernel_loader::probe::{self, ProbeId};
use ksites::table::{IfuncEntry, SiteEntry, build_table, table_size};

/// Ifunc sites in the fake image.
pub const IFUNC_SITES: usize = 100_000;
const IFUNCS: usize = 4;
const TRAMPS: usize = 0; // 8 bytes apart
const DEFAULTS: usize = 64; // 16 bytes apart
const FAST: usize = 128; // 16 bytes apart
const RESOLVER: usize = 192;
const SITES: usize = 256;
const TEXT_LEN: usize = (SITES + 5 * IFUNC_SITES).next_multiple_of(4096);

/// A fake image: text (trampolines, implementations, 10^5 `call` sites), then slots,
/// then the table. The buffer never moves, so the table's addresses stay valid.
pub struct FakeImage {
    mem: Vec<u64>,
    pristine: Vec<u8>,
    table_off: usize,
    table_len: usize,
    /// (rel32 address, value) of every site once patched, for the plain loop.
    pub plain: Vec<(u64, i32)>,
}

impl FakeImage {
    /// Builds the image and its table.
    pub fn new() -> FakeImage {
        let slots = TEXT_LEN;
        let table_off = slots + 64;
        let ifuncs_probe: Vec<IfuncEntry> = (0..IFUNCS)
            .map(|k| IfuncEntry {
                name: format!("bench::f{k}"),
                trampoline: 0,
                slot: 0,
                resolver: 0,
                default: 0,
            })
            .collect();
        let table_len = table_size(&ifuncs_probe, IFUNC_SITES);
        let total = table_off + table_len + 64;
        let mut img = FakeImage {
            mem: vec![0u64; total.div_ceil(8)],
            pristine: Vec::new(),
            table_off,
            table_len,
            plain: Vec::with_capacity(IFUNC_SITES),
        };
        let base = img.addr(0);
        let b = img.bytes_mut();
        b[..TEXT_LEN].fill(0xcc);
        for k in 0..IFUNCS {
            let (t, slot) = (TRAMPS + 8 * k, slots + 8 * k);
            b[t..t + 2].copy_from_slice(&[0xff, 0x25]);
            let disp = (slot as i64 - (t as i64 + 6)) as i32;
            b[t + 2..t + 6].copy_from_slice(&disp.to_le_bytes());
            let def = base + (DEFAULTS + 16 * k) as u64;
            b[slot..slot + 8].copy_from_slice(&def.to_le_bytes());
        }
        let mut sites = Vec::with_capacity(IFUNC_SITES);
        let mut plain = Vec::with_capacity(IFUNC_SITES);
        for i in 0..IFUNC_SITES {
            let at = SITES + 5 * i;
            let k = i % IFUNCS;
            let rel = ((TRAMPS + 8 * k) as i64 - (at as i64 + 5)) as i32;
            b[at] = 0xe8;
            b[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
            sites.push(SiteEntry {
                addr: base + at as u64,
                kind: SiteKind::Call,
                prefixes: 0,
                ifunc: k as u32,
            });
            let fast = ((FAST + 16 * k) as i64 - (at as i64 + 5)) as i32;
            plain.push((base + at as u64 + 1, fast));
        }
        let ifuncs: Vec<IfuncEntry> = (0..IFUNCS)
            .map(|k| IfuncEntry {
                name: format!("bench::f{k}"),
                trampoline: base + (TRAMPS + 8 * k) as u64,
                slot: base + (slots + 8 * k) as u64,
                resolver: base + RESOLVER as u64,
                default: base + (DEFAULTS + 16 * k) as u64,
            })
            .collect();
        let table = build_table(base + table_off as u64, &ifuncs, &sites).expect("table");
        assert_eq!(table.len(), table_len);
        b[table_off..table_off + table_len].copy_from_slice(&table);
        img.plain = plain;
        img.pristine = img.bytes()[..table_off].to_vec();
        img
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: reinterpreting an owned, initialised u64 buffer as bytes.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().cast(), self.mem.len() * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_mut_ptr().cast(), self.mem.len() * 8) }
    }

    fn addr(&self, off: usize) -> u64 {
        self.mem.as_ptr() as u64 + off as u64
    }

    /// The fake text range.
    pub fn exec(&self) -> Vec<Range<u64>> {
        std::iter::once(self.addr(0)..self.addr(TEXT_LEN)).collect()
    }

    /// The table, validated (the `Table::parse` benchmark).
    pub fn table(&self) -> Table<'_> {
        let bytes = &self.bytes()[self.table_off..self.table_off + self.table_len];
        Table::parse(bytes, self.addr(self.table_off), &self.exec()).expect("valid table")
    }

    /// Puts the text and slots back as built (untimed, between iterations).
    pub fn reset(&mut self) {
        let n = self.pristine.len();
        let p = std::mem::take(&mut self.pristine);
        self.bytes_mut()[..n].copy_from_slice(&p);
        self.pristine = p;
    }

    /// Where ifunc `k` resolves to.
    pub fn fast(&self, k: u32) -> u64 {
        self.addr(FAST + 16 * k as usize)
    }
}

/// Writes the fake text with plain stores; `sync_cores` does nothing (one call per batch
/// either way).
#[derive(Debug, Default)]
pub struct MemPoker;

impl TextPoker for MemPoker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the engine writes only inside validated sites of the fake image.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    unsafe fn read_word(&self, addr: u64, len: usize) -> u64 {
        // SAFETY: forwarded; the fake text is readable at its own address.
        unsafe { kernel_loader::patch::read_text_word(addr, len) }
    }

    fn sync_cores(&mut self) {}

    fn end(&mut self) {}
}

/// `patch_ifuncs` on the fake image, timed per iteration (the reset is not timed).
pub fn time_patch(img: &mut FakeImage, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        img.reset();
        let exec = img.exec();
        let t = img.table();
        let mut resolve = |f: &kernel_loader::format::Ifunc<'_>| img.fast(f.index);
        let start = Instant::now();
        // SAFETY: the table describes the fake image, which nothing executes.
        let r = unsafe { patch_ifuncs(&t, &exec, &mut MemPoker, &mut resolve) };
        total += start.elapsed();
        assert_eq!(r.expect("patched").sites_patched as usize, IFUNC_SITES);
    }
    total
}

/// `Table::parse` + `patch_ifuncs`: everything boot does for the table.
pub fn time_parse_and_patch(img: &mut FakeImage, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        img.reset();
        let exec = img.exec();
        let start = Instant::now();
        let t = img.table();
        let mut resolve = |f: &kernel_loader::format::Ifunc<'_>| img.fast(f.index);
        // SAFETY: as in `time_patch`.
        let r = unsafe { patch_ifuncs(&t, &exec, &mut MemPoker, &mut resolve) };
        total += start.elapsed();
        assert!(r.is_ok());
    }
    total
}

/// The baseline: a plain loop over the table's sites writing each new rel32, with no
/// checks, no read-back and no rollback (what a patcher without them would do: it still
/// has to read the site list).
pub fn time_plain_table(img: &mut FakeImage, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        img.reset();
        let t = img.table();
        let targets: Vec<u64> = (0..IFUNCS as u32).map(|k| img.fast(k)).collect();
        let start = Instant::now();
        for s in t.sites() {
            let rel = (targets[s.ifunc as usize] as i64 - s.end() as i64) as i32;
            // SAFETY: `rel32_addr` is the rel32 field of a validated site of the fake text.
            unsafe { std::ptr::write_unaligned(s.rel32_addr() as *mut i32, rel) };
        }
        total += start.elapsed();
    }
    total
}

/// Raw stores from a precomputed (address, rel32) array: a lower bound, not a patcher.
pub fn time_plain(img: &mut FakeImage, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        img.reset();
        let start = Instant::now();
        for &(at, rel) in std::hint::black_box(&img.plain) {
            // SAFETY: `at` is a rel32 field inside the fake text.
            unsafe { std::ptr::write_unaligned(at as *mut i32, rel) };
        }
        total += start.elapsed();
    }
    total
}

/// A host poker whose `sync_cores` executes `cpuid` (serializing, and a VM exit under
/// virtualization), like a kernel's per-CPU serialization.
#[derive(Debug)]
pub struct CpuidPoker(pub HostPoker);

impl TextPoker for CpuidPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.0.begin()
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: forwarded.
        unsafe { self.0.write(addr, bytes) }
    }

    unsafe fn read_word(&self, addr: u64, len: usize) -> u64 {
        // SAFETY: forwarded.
        unsafe { self.0.read_word(addr, len) }
    }

    fn sync_cores(&mut self) {
        std::hint::black_box(kernel_loader::arch::x86_64::cpuid(0, 0));
    }

    fn end(&mut self) {
        self.0.end();
    }
}

/// The 10^4 sites of `bench:many`: (address, enabled bytes, disabled bytes).
pub fn many_sites(table: &Table<'_>, id: ProbeId) -> Vec<(u64, [u8; 5], [u8; 5])> {
    table
        .probe_sites()
        .filter(|s| s.probe == id.0)
        .map(|s| {
            (
                s.addr,
                probe::site_bytes(&s, true).expect("in reach"),
                probe::site_bytes(&s, false).expect("in reach"),
            )
        })
        .collect()
}

/// Enable then disable, batched, through `poker`.
pub fn toggle_batched<P: TextPoker>(id: ProbeId, poker: &mut P) {
    // SAFETY: the poker writes this program's text; only this thread runs; the sites
    // are not executing.
    unsafe { probe::enable(id, crate::probes::handler, poker) }.expect("enable");
    // SAFETY: as above.
    unsafe { probe::disable(id, poker) }.expect("disable");
}

/// Enable then disable with the same int3 protocol, but one site at a time: three
/// serializations per site instead of three per batch.
pub fn toggle_per_site<P: TextPoker>(sites: &[(u64, [u8; 5], [u8; 5])], poker: &mut P) {
    for on in [true, false] {
        poker.begin().expect("begin");
        for (addr, en, dis) in sites {
            let new = if on { en } else { dis };
            // SAFETY: probe sites of this program's text; nothing runs them meanwhile.
            unsafe {
                poker.write(*addr, &[0xcc]).expect("write");
                poker.sync_cores();
                poker.write(addr + 1, &new[1..]).expect("write");
                poker.sync_cores();
                poker.write(*addr, &new[..1]).expect("write");
                poker.sync_cores();
            }
        }
        poker.end();
    }
}

/// Enable then disable with plain 5-byte stores: no checks, no protocol, no
/// serialization (the text made writable around each pass, as the others do).
pub fn toggle_plain(sites: &[(u64, [u8; 5], [u8; 5])], poker: &mut HostPoker) {
    for on in [true, false] {
        poker.begin().expect("begin");
        for (addr, en, dis) in std::hint::black_box(sites) {
            let new = if on { en } else { dis };
            // SAFETY: probe sites of this program's writable (begin) text.
            unsafe { std::ptr::copy_nonoverlapping(new.as_ptr(), *addr as *mut u8, 5) };
        }
        poker.end();
    }
}
