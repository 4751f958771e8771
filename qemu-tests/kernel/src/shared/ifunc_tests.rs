//! Boot-time ifunc patching, checked from inside the booted kernel (the x86_64
//! `ifunc_tests` by name where they apply): the table `ksites-ld` embedded, calls
//! before init, fault injection with rollback, [`super::ksites_init`], the choices
//! against the CPU's features read without `CpuFeatures` (`testing::raw_features`), every
//! site read back and decoded as a direct call/jump to the choice (or, a relaxed site
//! whose form does not reach it, still to the trampoline), results of every
//! implementation the CPU can run, text never writable through its own mapping, and one
//! synchronisation round per batch.

use kernel_loader::arch::Arch;
use kernel_loader::format::{Ifunc, Site, SiteKind, Table};
use kernel_loader::patch::{self, PatchError, PokeFailure};
use kernel_loader::{CpuFeatures, PokeError, TextPoker};

use super::testing;
use super::{Ksites, ksites_init, ksites_table};
use crate::arch::exceptions::try_store;
use crate::arch::mmu::AliasPoker;
use crate::arch::{ksites_exec, ksites_features};
use crate::harness::{Harness, Msg, TestResult};
use crate::{ensure, msg, println};

/// The slot's value (an implementation's address).
pub(crate) fn read_slot(addr: u64) -> u64 {
    // SAFETY: slot addresses come from the validated table: 8-aligned, mapped data.
    unsafe { core::ptr::read_volatile(addr as usize as *const u64) }
}

/// The bytes of a site (at most 16).
fn site_bytes(s: &Site) -> ([u8; 16], usize) {
    let mut b = [0u8; 16];
    let n = s.len().min(b.len());
    for (i, x) in b[..n].iter_mut().enumerate() {
        // SAFETY: sites lie in mapped, readable text (validated against the exec range).
        *x = unsafe { core::ptr::read_volatile((s.addr + i as u64) as usize as *const u8) };
    }
    (b, n)
}

/// FNV-1a over every site's bytes, to prove a refused batch changed nothing.
fn sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for s in t.sites() {
        let (b, n) = site_bytes(&s);
        for &x in &b[..n] {
            h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
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

/// How the table's sites stand against their ifuncs' implementations.
struct Reach {
    /// Sites whose form reaches the implementation: `init` rewrites each of them with
    /// one write.
    direct: usize,
    /// Sites in a short, relaxed form (riscv64 `jal`/`c.j`) that does not reach it: they
    /// stay branches to the trampoline, which reaches it through the slot.
    on_trampoline: usize,
}

/// Sorts the sites by whether their own form reaches `choice(ifunc)`
/// (`Arch::encode_target`); with `show`, prints each site left on the trampoline. Only
/// a relaxed form may fall short: every other form reaches the whole kernel image.
fn reach(
    t: &Table<'_>,
    choice: impl Fn(&Ifunc<'_>) -> Result<u64, Msg>,
    show: bool,
) -> Result<Reach, Msg> {
    let arch = Arch::native();
    let mut r = Reach {
        direct: 0,
        on_trampoline: 0,
    };
    for s in t.sites() {
        let f = t
            .ifunc(s.ifunc)
            .ok_or_else(|| msg!("site {:#x}: no ifunc", s.addr))?;
        let to = choice(&f)?;
        if arch.encode_target(&s.branch(), to).is_some() {
            r.direct += 1;
            continue;
        }
        ensure!(
            arch.is_relaxed_form(s.kind, s.prefixes),
            "site {:#x} ({}, {:?}, form {}) cannot reach {to:#x}, yet it is not a relaxed form",
            s.addr,
            f.name,
            s.kind,
            s.prefixes
        );
        if show {
            println!(
                "ifunc reach: site {:#x} ({}, {:?}, relaxed form {}) is {:+} bytes from {} at \
                 {to:#x}, beyond its reach: it stays on the trampoline {:#x}",
                s.addr,
                f.name,
                s.kind,
                s.prefixes,
                to.wrapping_sub(s.addr) as i64,
                kfuncs::impl_name(to as usize),
                f.trampoline
            );
        }
        r.on_trampoline += 1;
    }
    Ok(r)
}

/// The implementation ifunc `f`'s resolver picks for `features` (what `init` will
/// store), checked to be the one the CPU's features read without `CpuFeatures` call for.
fn expected_choice(c: &RawChoice, features: &CpuFeatures, f: &Ifunc<'_>) -> Result<u64, Msg> {
    // SAFETY: the resolver is an `ifunc!` adapter, `extern "C" fn(u64) -> usize`
    // (validated to lie in the text), which only picks an implementation: as `init`
    // calls it.
    let resolve: extern "C" fn(u64) -> usize = unsafe { core::mem::transmute(f.resolver as usize) };
    let addr = resolve(features.bits());
    let (got, want) = (kfuncs::impl_name(addr), c.expected_impl(f.name));
    ensure!(
        got == want,
        "{}: the resolver picks {got} at {addr:#x}, the CPU ({c}) calls for {want}",
        f.name
    );
    Ok(addr as u64)
}

/// Boot patching with a poker that fails the Nth write, for N across the batch: every
/// attempt must fail cleanly, leave every site and slot as it was, put back exactly the
/// sites it wrote, and cost one round. The batch's writes are the sites whose form
/// reaches the implementation the CPU calls for ([`reach`]): a relaxed site that does
/// not is never written.
fn init_fault_injection(t: &Table<'_>, f: &CpuFeatures) -> TestResult {
    let digest = sites_digest(t);
    let c = RawChoice::read();
    let r = reach(t, |i| expected_choice(&c, f, i), true)?;
    println!(
        "ifunc reach: {} of {} sites reach the implementation the CPU calls for, {} stay \
         on the trampoline",
        r.direct,
        t.site_count(),
        r.on_trampoline
    );
    let n = r.direct;
    ensure!(n >= 2, "only {n} sites to write: too few to fail across");
    for fail_at in [0, 1, n / 2, n - 1] {
        let mut p = CountingPoker {
            fail_at: Some(fail_at),
            ..CountingPoker::default()
        };
        // SAFETY: one CPU runs; the table describes this image; the batch rolls back.
        let r = unsafe { patch::init(t, &ksites_exec(), f, &mut p) };
        ensure!(
            matches!(r, Err(PatchError::Poke { .. })),
            "fail_at {fail_at} of {n} writes: {:?}",
            r.map(|_| ())
        );
        ensure!(
            sites_digest(t) == digest,
            "fail_at {fail_at}: sites not restored"
        );
        // The `fail_at` sites written before the failure, then each of them put back.
        ensure!(
            p.writes == 2 * fail_at,
            "fail_at {fail_at}: {} writes, not {fail_at} and as many restores",
            p.writes
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
    // What the chosen implementations (`check_choices` checks them) and the sites' forms
    // say: every site that reaches its choice patched, every other one a relaxed site
    // left on the trampoline.
    let want = reach(&k.table, |f| Ok(read_slot(f.slot)), false)?;
    ensure!(
        r.sites_patched as usize == want.direct
            && r.sites_out_of_reach as usize == want.on_trampoline
            && r.relaxed_sites_on_trampoline == r.sites_out_of_reach
            && r.sites_patched + r.sites_out_of_reach == k.table.site_count()
            && r.ifuncs == k.table.ifunc_count(),
        "report {r:?} does not cover the table ({} sites reach their choice, {} relaxed \
         ones do not)",
        want.direct,
        want.on_trampoline
    );
    ensure!(
        k.features == CpuFeatures::detect(),
        "features changed since init"
    );
    Ok(())
}

/// What the CPU's features, read without `CpuFeatures` (`testing::raw_features`), say
/// about the `kfuncs` implementations (each list: the fast one first, the baseline last).
struct RawChoice {
    features: [(&'static str, &'static str, bool); 4],
}

impl RawChoice {
    fn read() -> RawChoice {
        RawChoice {
            features: testing::raw_features(),
        }
    }

    /// The names of ifunc `ifunc`'s implementations.
    fn impls(ifunc: &str) -> Option<[&'static str; 2]> {
        fn ends<F>(l: &[(&'static str, F)]) -> Option<[&'static str; 2]> {
            Some([l.first()?.0, l.last()?.0])
        }
        match ifunc {
            "popcount" => ends(&kfuncs::POPCOUNT_IMPLS),
            "crc32c" => ends(&kfuncs::CRC32C_IMPLS),
            "fetch_add" => ends(&kfuncs::FETCH_ADD_IMPLS),
            "xor3" => ends(&kfuncs::XOR3_IMPLS),
            _ => None,
        }
    }

    /// The implementation ifunc `name` (`kfuncs::NAME`) should have chosen.
    fn expected_impl(&self, name: &str) -> &'static str {
        let short = name.rsplit("::").next().unwrap_or("");
        let has = self.features.iter().find(|f| f.0 == short).map(|f| f.2);
        match (Self::impls(short), has) {
            (Some([fast, _]), Some(true)) => fast,
            (Some([_, baseline]), Some(false)) => baseline,
            _ => "?",
        }
    }

    /// Whether this CPU can run implementation `name`: a baseline, or a fast one whose
    /// feature it has.
    fn can_run(&self, name: &str) -> bool {
        self.features.iter().any(|&(ifunc, _, has)| {
            Self::impls(ifunc)
                .is_some_and(|[fast, baseline]| name == baseline || (name == fast && has))
        })
    }
}

impl core::fmt::Display for RawChoice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(testing::RAW_SOURCE)?;
        let mut sep = ":";
        for (_, feature, has) in self.features {
            write!(f, "{sep} {feature}={has}")?;
            sep = "";
        }
        Ok(())
    }
}

fn check_choices(t: &Table<'_>) -> TestResult {
    let c = RawChoice::read();
    println!("{c}");
    for f in t.ifuncs() {
        let chosen = kfuncs::impl_name(read_slot(f.slot) as usize);
        let want = c.expected_impl(f.name);
        ensure!(
            chosen == want,
            "{}: chose {chosen}, the CPU ({c}) calls for {want}",
            f.name
        );
    }
    Ok(())
}

/// Every site is a branch of its kind to the choice, or (only a relaxed form out of
/// its reach) still to its trampoline.
fn check_sites(t: &Table<'_>) -> TestResult {
    for s in t.sites() {
        let f = t
            .ifunc(s.ifunc)
            .ok_or_else(|| msg!("site {:#x}: no ifunc", s.addr))?;
        let (b, n) = site_bytes(&s);
        let bytes = &b[..n];
        let branch = s.branch();
        ensure!(
            Arch::native().has_branch_opcode(&branch, bytes),
            "site {:#x} ({}, {:?}): {bytes:02x?} is not a {}",
            s.addr,
            f.name,
            s.kind,
            if s.kind == SiteKind::Call {
                "call"
            } else {
                "jump"
            }
        );
        let chosen = read_slot(f.slot);
        // A relaxed site whose form does not reach the choice keeps calling the
        // trampoline (`reach`, which also refuses any other form out of reach).
        let arch = Arch::native();
        let want = if arch.encode_target(&branch, chosen).is_some() {
            chosen
        } else {
            ensure!(
                arch.is_relaxed_form(s.kind, s.prefixes),
                "site {:#x} ({}) cannot reach the choice {chosen:#x} and is not relaxed",
                s.addr,
                f.name
            );
            f.trampoline
        };
        let dest = arch.decode_branch_target(&branch, bytes);
        ensure!(
            dest == Some(want),
            "site {:#x} ({}) goes to {dest:#x?}, not {want:#x} (the choice is {chosen:#x})",
            s.addr,
            f.name
        );
    }
    Ok(())
}

/// Runs `check` on every implementation in `list` this CPU can run (at least one).
fn each_runnable<F: Copy>(
    c: &RawChoice,
    list: &[(&'static str, F)],
    mut check: impl FnMut(&'static str, F) -> TestResult,
) -> TestResult {
    let mut ran = 0;
    for &(name, f) in list {
        if c.can_run(name) {
            check(name, f)?;
            ran += 1;
        }
    }
    ensure!(
        ran >= 1 && list.len() >= 2,
        "{ran} of {} implementations runnable",
        list.len()
    );
    Ok(())
}

/// Every implementation of every ifunc this CPU can run (by its features read without
/// `CpuFeatures`) agrees with the reference on the same inputs.
fn check_all_implementations() -> TestResult {
    let c = RawChoice::read();
    each_runnable(&c, &kfuncs::POPCOUNT_IMPLS, |name, f| {
        for x in pop_inputs() {
            // SAFETY: the CPU runs `name` (`can_run`); vector state is enabled at init.
            let got = unsafe { f(x) };
            ensure!(got == ref_popcount(x), "{name}({x:#x}) = {got}");
        }
        Ok(())
    })?;
    let d: [u8; 200] = test_data(0xfeed);
    each_runnable(&c, &kfuncs::CRC32C_IMPLS, |name, f| {
        for n in LENS {
            let want = !ref_crc32c(&d[..n]);
            // SAFETY: `d` is valid for n bytes; the CPU runs `name`.
            let got = unsafe { f(!0, d.as_ptr(), n) };
            ensure!(got == want, "{name}(len {n}) = {got:#x}, want {want:#x}");
        }
        Ok(())
    })?;
    let (a, b): ([u8; 200], [u8; 200]) = (test_data(7), test_data(8));
    each_runnable(&c, &kfuncs::XOR3_IMPLS, |name, f| {
        for n in LENS {
            let mut x: [u8; 200] = test_data(9);
            let orig = x;
            // SAFETY: disjoint 200-byte buffers; the CPU runs `name`.
            unsafe { f(x.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n) };
            ensure!(
                (0..200).all(|i| x[i]
                    == if i < n {
                        orig[i] ^ a[i] ^ b[i]
                    } else {
                        orig[i]
                    }),
                "{name}(len {n})"
            );
        }
        Ok(())
    })?;
    let cell = core::sync::atomic::AtomicU64::new(0);
    each_runnable(&c, &kfuncs::FETCH_ADD_IMPLS, |name, f| {
        for (i, v) in pop_inputs().into_iter().enumerate() {
            let before = cell.load(core::sync::atomic::Ordering::SeqCst);
            // SAFETY: `cell` is valid, aligned and only accessed atomically; the CPU
            // runs `name`.
            let old = unsafe { f(cell.as_ptr(), v) };
            ensure!(old == before, "{name} #{i}: old {old:#x}, was {before:#x}");
            ensure!(
                cell.load(core::sync::atomic::Ordering::SeqCst) == before.wrapping_add(v),
                "{name} #{i}: sum"
            );
        }
        Ok(())
    })
}

/// Every seventh site (and the first) refuses a store through its own mapping with a
/// permission fault, and is unchanged afterwards.
fn check_text_read_only(t: &Table<'_>) -> TestResult {
    for s in t.sites().step_by(7) {
        let before = site_bytes(&s);
        let word = u32::from_le_bytes([before.0[0], before.0[1], before.0[2], before.0[3]]);
        // SAFETY: expected to fault (text is read-only); were it to succeed it would
        // write the site's own first word back, changing nothing.
        match unsafe { try_store(s.addr, word) } {
            Ok(()) => return Err(msg!("a store to site {:#x} succeeded", s.addr)),
            Err(f) => ensure!(
                testing::is_store_fault(&f, s.addr),
                "store to site {:#x}: unexpected fault {f:?}",
                s.addr
            ),
        }
        ensure!(site_bytes(&s) == before, "site {:#x} changed", s.addr);
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
