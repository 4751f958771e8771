//! Boot-time ifunc patching on aarch64, checked from inside the booted kernel (the
//! x86_64 `ifunc_tests` by name where they apply): the table `ksites-ld` embedded,
//! calls before init, fault injection with rollback, [`super::ksites_init`], the
//! choices against the raw ID registers, every site read back and decoded as a direct
//! `bl`/`b` to the choice, results of both implementations, text never writable through
//! its own mapping, and one synchronisation round per batch.

use kernel_loader::arch::aarch64::{B, B_OPCODE_MASK, BL, branch_dest};
use kernel_loader::format::{SiteKind, Table};
use kernel_loader::patch::{self, PatchError, PokeFailure};
use kernel_loader::{CpuFeatures, PokeError, TextPoker};

use super::exceptions::{EC_DATA_ABORT, try_store};
use super::mmu::AliasPoker;
use super::{Ksites, ksites_exec, ksites_features, ksites_init, ksites_table};
use crate::harness::{Harness, Msg, TestResult};
use crate::{ensure, msg, println};

/// The slot's value (an implementation's address).
pub(crate) fn read_slot(addr: u64) -> u64 {
    // SAFETY: slot addresses come from the validated table: 8-aligned, mapped data.
    unsafe { core::ptr::read_volatile(addr as usize as *const u64) }
}

/// The instruction at a site.
fn read_insn(addr: u64) -> u32 {
    // SAFETY: sites lie in mapped, readable text (validated against the exec range),
    // 4-aligned.
    unsafe { core::ptr::read_volatile(addr as usize as *const u32) }
}

/// FNV-1a over every site's instruction, to prove a refused batch changed nothing.
fn sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for s in t.sites() {
        for b in read_insn(s.addr).to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// What the raw ID registers (not `CpuFeatures`) say each ifunc should pick.
struct RawChoice {
    asimd: bool,
    crc32: bool,
    lse: bool,
    sha3: bool,
}

fn raw_choice() -> RawChoice {
    let (isar0, pfr0): (u64, u64);
    // SAFETY: ID registers are readable at EL1; no side effect.
    unsafe {
        core::arch::asm!(
            "mrs {0}, ID_AA64ISAR0_EL1",
            "mrs {1}, ID_AA64PFR0_EL1",
            out(reg) isar0, out(reg) pfr0,
            options(nomem, nostack),
        );
    }
    let field = |r: u64, lsb: u32| (r >> lsb) & 0xf;
    RawChoice {
        asimd: field(pfr0, 20) != 0xf,
        crc32: field(isar0, 16) >= 1,
        lse: field(isar0, 20) >= 2,
        sha3: field(isar0, 32) >= 1,
    }
}

fn expected_impl(name: &str, c: &RawChoice) -> &'static str {
    match name.rsplit("::").next().unwrap_or("") {
        "popcount" if c.asimd => "popcount_cnt",
        "popcount" => "popcount_soft",
        "crc32c" if c.crc32 => "crc32c_hw",
        "crc32c" => "crc32c_table",
        "fetch_add" if c.lse => "fetch_add_lse",
        "fetch_add" => "fetch_add_llsc",
        "xor3" if c.sha3 => "xor3_eor3",
        "xor3" => "xor3_neon",
        _ => "?",
    }
}

/// The platform's poker, counting writes, optionally failing write number `fail_at`.
#[derive(Default)]
struct CountingPoker {
    inner: AliasPoker,
    writes: usize,
    fail_at: Option<usize>,
}

impl TextPoker for CountingPoker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at == Some(self.writes) {
            self.fail_at = None;
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        // SAFETY: forwarded: the engine's contract for `write`.
        unsafe { self.inner.write(addr, bytes) }?;
        self.writes += 1;
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.inner.sync_cores();
    }

    fn end(&mut self) {
        self.inner.end();
    }
}

// Reference results, computed without any ifunc.
fn ref_popcount(x: u64) -> u32 {
    (0..64).map(|i| ((x >> i) & 1) as u32).sum()
}

fn ref_crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Pseudo-random bytes (an LCG), `seed` picking the sequence.
fn test_data<const N: usize>(seed: u32) -> [u8; N] {
    let mut d = [0u8; N];
    let mut x = seed;
    for b in d.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    d
}

/// 64 words: edge cases, then an LCG.
fn pop_inputs() -> [u64; 64] {
    let mut w = [0u64; 64];
    let edges = [0, 1, u64::MAX, 0x8000_0000_0000_0001, 0x0123_4567_89ab_cdef];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, v) in w.iter_mut().enumerate() {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *v = edges.get(i).copied().unwrap_or(x);
    }
    w
}

const LENS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 63, 200];

/// The calls every test makes through the ifuncs (patched or not) and their helpers.
fn check_ifunc_results() -> TestResult {
    let words = pop_inputs();
    for x in words {
        ensure!(kfuncs::popcount(x) == ref_popcount(x), "popcount({x:#x})");
        ensure!(
            kfuncs::popcount_tail(x) == ref_popcount(x),
            "popcount_tail({x:#x})"
        );
        ensure!(kfuncs::hamming(x, !x) == 64, "hamming({x:#x})");
    }
    let want: u64 = words.iter().map(|&x| u64::from(ref_popcount(x))).sum();
    ensure!(kfuncs::bitmap_weight(&words) == want, "bitmap_weight");
    let d: [u8; 200] = test_data(0x1234_5678);
    for n in LENS {
        let want = ref_crc32c(&d[..n]);
        ensure!(kfuncs::crc32c_of(&d[..n]) == want, "crc32c_of(len {n})");
        ensure!(
            !kfuncs::crc32c_tail(!0, d.as_ptr(), n) == want,
            "crc32c_tail(len {n})"
        );
    }
    ensure!(
        kfuncs::crc32c_of(b"123456789") == 0xe306_9283,
        "crc32c check value"
    );
    let c = core::sync::atomic::AtomicU64::new(5);
    ensure!(kfuncs::counter_add(&c, 10) == 5, "counter_add old value");
    kfuncs::counter_bump(&c, 1000);
    ensure!(
        kfuncs::fetch_add_tail(c.as_ptr(), 1) == 1015,
        "fetch_add_tail"
    );
    ensure!(c.into_inner() == 1016, "fetch_add total");
    let (a, b): ([u8; 200], [u8; 200]) = (test_data(1), test_data(2));
    for n in LENS {
        let mut dst: [u8; 200] = test_data(3);
        let orig = dst;
        kfuncs::xor_into(&mut dst[..n], &a, &b);
        ensure!(
            (0..200).all(|i| dst[i]
                == if i < n {
                    orig[i] ^ a[i] ^ b[i]
                } else {
                    orig[i]
                }),
            "xor_into(len {n})"
        );
        kfuncs::xor3_tail(dst.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n);
        ensure!(dst == orig, "xor3_tail(len {n}) did not undo xor_into");
    }
    Ok(())
}

fn check_table(t: &Table<'_>) -> TestResult {
    ensure!(t.ifunc_count() >= 4, "only {} ifuncs", t.ifunc_count());
    for f in t.ifuncs() {
        let n = t.sites().filter(|s| s.ifunc == f.index).count();
        ensure!(n >= 2, "{} has only {n} sites", f.name);
        ensure!(
            read_slot(f.slot) == f.default,
            "{}: slot is not the default",
            f.name
        );
    }
    let tails = t.sites().filter(|s| s.kind != SiteKind::Call).count();
    ensure!(tails >= 1, "no tail-call (b) sites recorded");
    println!(
        "ksites table at {:#x}: {} ifuncs, {} sites ({} tail calls)",
        t.base(),
        t.ifunc_count(),
        t.site_count(),
        tails
    );
    Ok(())
}

/// Boot patching with a poker that fails the Nth write, for N across the batch: every
/// attempt must fail cleanly, leave every site and slot as it was, and cost one round.
fn init_fault_injection(t: &Table<'_>, f: &CpuFeatures) -> TestResult {
    let digest = sites_digest(t);
    let n = t.site_count() as usize;
    for fail_at in [0, 1, n / 2, n - 1] {
        let mut p = CountingPoker {
            fail_at: Some(fail_at),
            ..CountingPoker::default()
        };
        // SAFETY: one CPU runs; the table describes this image; the batch rolls back.
        let r = unsafe { patch::init(t, &ksites_exec(), f, &mut p) };
        ensure!(
            matches!(r, Err(PatchError::Poke { .. })),
            "fail_at {fail_at}: {:?}",
            r.map(|_| ())
        );
        ensure!(
            sites_digest(t) == digest,
            "fail_at {fail_at}: sites not restored"
        );
        for i in t.ifuncs() {
            ensure!(
                read_slot(i.slot) == i.default,
                "fail_at {fail_at}: slot of {} not restored",
                i.name
            );
        }
        ensure!(
            p.inner.rounds == 1,
            "fail_at {fail_at}: {} sync rounds",
            p.inner.rounds
        );
    }
    Ok(())
}

fn check_init(k: &Ksites) -> TestResult {
    let r = k.report;
    ensure!(
        r.sites_patched == k.table.site_count()
            && r.sites_out_of_reach == 0
            && r.ifuncs == k.table.ifunc_count(),
        "report {r:?} does not cover the table"
    );
    ensure!(
        k.features == CpuFeatures::detect(),
        "features changed since init"
    );
    Ok(())
}

fn check_choices(t: &Table<'_>) -> TestResult {
    let c = raw_choice();
    println!(
        "id registers: asimd={} crc32={} lse={} sha3={}",
        c.asimd, c.crc32, c.lse, c.sha3
    );
    for f in t.ifuncs() {
        let chosen = kfuncs::impl_name(read_slot(f.slot) as usize);
        let want = expected_impl(f.name, &c);
        ensure!(
            chosen == want,
            "{}: chose {chosen}, the ID registers call for {want}",
            f.name
        );
    }
    Ok(())
}

fn check_sites(t: &Table<'_>) -> TestResult {
    for s in t.sites() {
        let f = t
            .ifunc(s.ifunc)
            .ok_or_else(|| msg!("site {:#x}: no ifunc", s.addr))?;
        let insn = read_insn(s.addr);
        let op = match s.kind {
            SiteKind::Call => BL,
            _ => B,
        };
        ensure!(
            insn & B_OPCODE_MASK == op,
            "site {:#x} ({}, {:?}): {insn:#010x} is not a {}",
            s.addr,
            f.name,
            s.kind,
            if op == BL { "bl" } else { "b" }
        );
        let chosen = read_slot(f.slot);
        let dest = branch_dest(insn, s.addr);
        ensure!(
            dest == Some(chosen),
            "site {:#x} ({}) goes to {dest:#x?}, the choice is {chosen:#x}",
            s.addr,
            f.name
        );
    }
    Ok(())
}

/// Both implementations of every ifunc (the fast one where the ID registers allow it)
/// agree with the reference on the same inputs.
fn check_all_implementations() -> TestResult {
    let c = raw_choice();
    for x in pop_inputs() {
        // SAFETY: the soft version runs anywhere, `cnt` with AdvSIMD (enabled at init).
        unsafe {
            ensure!(
                kfuncs::popcount_soft(x) == ref_popcount(x),
                "popcount_soft({x:#x})"
            );
            if c.asimd {
                ensure!(
                    kfuncs::popcount_cnt(x) == ref_popcount(x),
                    "popcount_cnt({x:#x})"
                );
            }
        }
    }
    let d: [u8; 200] = test_data(0xfeed);
    for n in LENS {
        let want = !ref_crc32c(&d[..n]);
        // SAFETY: `d` is valid for n bytes; the CRC32 version only when implemented.
        unsafe {
            ensure!(
                kfuncs::crc32c_table(!0, d.as_ptr(), n) == want,
                "crc32c_table(len {n})"
            );
            if c.crc32 {
                ensure!(
                    kfuncs::crc32c_hw(!0, d.as_ptr(), n) == want,
                    "crc32c_hw(len {n})"
                );
            }
        }
    }
    let (a, b): ([u8; 200], [u8; 200]) = (test_data(7), test_data(8));
    for n in LENS {
        let mut x: [u8; 200] = test_data(9);
        let mut y = x;
        let orig = x;
        // SAFETY: disjoint 200-byte buffers; eor3 only with SHA3.
        unsafe {
            kfuncs::xor3_neon(x.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n);
            if c.sha3 {
                kfuncs::xor3_eor3(y.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n);
            } else {
                kfuncs::xor3_neon(y.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n);
            }
        }
        ensure!(
            (0..200).all(|i| x[i]
                == if i < n {
                    orig[i] ^ a[i] ^ b[i]
                } else {
                    orig[i]
                }),
            "xor3_neon(len {n})"
        );
        ensure!(x == y, "xor3_eor3 and xor3_neon disagree (len {n})");
    }
    let cell = core::sync::atomic::AtomicU64::new(0);
    for (i, v) in pop_inputs().into_iter().enumerate() {
        let before = cell.load(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: `cell` is valid, aligned and only accessed atomically; LSE only when
        // implemented.
        let old = unsafe {
            if c.lse && i % 2 == 1 {
                kfuncs::fetch_add_lse(cell.as_ptr(), v)
            } else {
                kfuncs::fetch_add_llsc(cell.as_ptr(), v)
            }
        };
        ensure!(
            old == before,
            "fetch_add #{i}: old {old:#x}, was {before:#x}"
        );
        ensure!(
            cell.load(core::sync::atomic::Ordering::SeqCst) == before.wrapping_add(v),
            "fetch_add #{i}: sum"
        );
    }
    Ok(())
}

/// Every seventh site (and the first) refuses a store through its own mapping with a
/// permission fault, and is unchanged afterwards.
fn check_text_read_only(t: &Table<'_>) -> TestResult {
    for s in t.sites().step_by(7) {
        let before = read_insn(s.addr);
        // SAFETY: expected to fault (text is read-only); were it to succeed it would
        // write the site's own instruction back, changing nothing.
        match unsafe { try_store(s.addr, before) } {
            Ok(()) => return Err(msg!("a store to site {:#x} succeeded", s.addr)),
            Err(f) => ensure!(
                f.class() == EC_DATA_ABORT
                    && f.is_permission_fault()
                    && f.is_write()
                    && f.far == s.addr,
                "store to site {:#x}: unexpected fault {f:?}",
                s.addr
            ),
        }
        ensure!(read_insn(s.addr) == before, "site {:#x} changed", s.addr);
    }
    Ok(())
}

/// A second boot-time init is refused before any write.
fn second_init_refused(t: &Table<'_>, f: &CpuFeatures) -> TestResult {
    let before = sites_digest(t);
    let mut p = CountingPoker::default();
    // SAFETY: as for the first; the engine must refuse (sites patched, slots resolved).
    let again = unsafe { patch::init(t, &ksites_exec(), f, &mut p) };
    match again {
        Err(PatchError::AlreadyPatched { .. } | PatchError::SlotNotDefault { .. })
            if p.writes == 0 && sites_digest(t) == before =>
        {
            Ok(())
        }
        Err(e) => Err(msg!("unexpected error or bytes changed: {e}")),
        Ok(_) => Err(msg!("second init succeeded")),
    }
}

fn one_sync_round_per_batch(k: &Ksites) -> TestResult {
    println!(
        "sync rounds: {} for {} sites",
        k.sync_rounds, k.report.sites_patched
    );
    ensure!(
        k.sync_rounds == 1 && k.report.sites_patched > 1,
        "{} rounds for {} sites",
        k.sync_rounds,
        k.report.sites_patched
    );
    Ok(())
}

/// Runs the ifunc tests on CPU 0 before the other CPUs start; [`ksites_init`] happens
/// in the middle, after the pre-init checks. None of it may allocate (the kernel's
/// allocator refuses and counts every request).
pub fn run(h: &mut Harness) {
    let allocs = crate::no_alloc::requests();
    run_tests(h);
    let more = crate::no_alloc::requests() - allocs;
    h.check(
        "ifunc_init_never_allocates",
        if more == 0 {
            Ok(())
        } else {
            Err(msg!("{more} allocation requests during the ifunc tests"))
        },
    );
}

fn run_tests(h: &mut Harness) {
    let features = ksites_features();
    let table = match ksites_table() {
        Ok(t) => t,
        Err(e) => {
            h.check("ksites_table_valid", Err(e));
            return;
        }
    };
    h.check("ksites_table_valid", check_table(&table));
    // These calls go trampoline -> slot -> default implementation.
    h.check("ifunc_calls_before_init_use_default", check_ifunc_results());
    h.check(
        "ifunc_init_fault_injection_restores",
        init_fault_injection(&table, &features),
    );
    let k = match ksites_init() {
        Ok(k) => k,
        Err(e) => {
            h.check("ifunc_init_patches_every_site", Err::<(), Msg>(e));
            return;
        }
    };
    h.check("ifunc_init_patches_every_site", check_init(&k));
    h.check("ifunc_choice_matches_id_registers", check_choices(&table));
    h.check(
        "ifunc_sites_are_direct_branches_to_choice",
        check_sites(&table),
    );
    h.check("ifunc_results_after_init", check_ifunc_results());
    h.check("ifunc_implementations_agree", check_all_implementations());
    h.check(
        "text_read_only_after_patching",
        check_text_read_only(&table),
    );
    h.check(
        "ifunc_second_init_refused_unchanged",
        second_init_refused(&table, &features),
    );
    h.check(
        "ifunc_one_sync_round_per_batch",
        one_sync_round_per_batch(&k),
    );
}
