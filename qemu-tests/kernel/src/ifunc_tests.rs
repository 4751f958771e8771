//! Boot-time ifunc patching, checked from inside the booted kernel: the table the build
//! tool embedded, calls before `init`, the resolvers' choices against raw CPUID, every
//! patched site read back from memory, results across implementations, and that text is
//! read-only again afterwards.

use core::ops::Range;

use kernel_loader::arch::x86_64::cpuid;
use kernel_loader::format::{SiteKind, Table};
use kernel_loader::patch::{self, PatchError};
use kernel_loader::{CpuFeatures, cell};

use crate::harness::{Harness, Msg};
use crate::poker::WpPoker;
use crate::{ensure, msg, paging, println};

/// What raw CPUID (not `CpuFeatures`) says each ifunc should pick.
pub(crate) struct RawChoice {
    pub(crate) popcnt: bool,
    pub(crate) sse42: bool,
    pub(crate) erms: bool,
    pub(crate) avx2: bool,
}

pub(crate) fn raw_choice() -> RawChoice {
    let (_, _, ecx1, _) = cpuid(1, 0);
    let (_, ebx7, _, _) = cpuid(7, 0);
    let osxsave = ecx1 & (1 << 27) != 0;
    let xcr0 = if osxsave {
        kernel_loader::arch::x86_64::xcr0()
    } else {
        0
    };
    RawChoice {
        popcnt: ecx1 & (1 << 23) != 0,
        sse42: ecx1 & (1 << 20) != 0,
        erms: ebx7 & (1 << 9) != 0,
        avx2: ebx7 & (1 << 5) != 0 && ecx1 & (1 << 28) != 0 && osxsave && xcr0 & 0b110 == 0b110,
    }
}

// The GNU ifunc in c/cifunc.c.
unsafe extern "C" {
    fn c_scale(x: i64) -> i64;
    fn c_scale_sum(x: i64) -> i64;
    fn c_scale_tail(x: i64) -> i64;
    static c_scale_impls: [unsafe extern "C" fn(i64) -> i64; 2];
}

/// The name of the implementation at `addr`: a kfuncs one, or one of c_scale's.
pub(crate) fn impl_name(addr: u64) -> &'static str {
    // SAFETY: `c_scale_impls` is an immutable C array of two function pointers.
    let c = unsafe { c_scale_impls };
    if addr == c[0] as usize as u64 {
        "c_scale_soft"
    } else if addr == c[1] as usize as u64 {
        "c_scale_fast"
    } else if let Some(name) = crate::retarget_tests::impl_name(addr) {
        name
    } else {
        kfuncs::impl_name(addr as usize)
    }
}

/// Calls through the GNU ifunc, from Rust and from C (two sites and a tail call there).
/// Only valid after `init`: a GNU ifunc has no default implementation.
fn check_c_ifunc_results() -> Result<(), Msg> {
    for x in [0i64, 1, -7, 1 << 40] {
        // SAFETY: plain C functions over integers; `init` resolved the ifunc.
        unsafe {
            ensure!(c_scale(x) == 3 * x, "c_scale({x})");
            ensure!(c_scale_sum(x) == 3 * x + 3 * (x + 1), "c_scale_sum({x})");
            ensure!(c_scale_tail(x) == 3 * (x ^ 1), "c_scale_tail({x})");
            for f in c_scale_impls {
                ensure!(f(x) == 3 * x, "c_scale implementations disagree at {x}");
            }
        }
    }
    Ok(())
}

pub(crate) fn expected_impl(name: &str, c: &RawChoice) -> &'static str {
    match name.rsplit("::").next().unwrap_or("") {
        "c_scale" if c.popcnt => "c_scale_fast",
        "c_scale" => "c_scale_soft",
        "memcpy" if c.erms => "memcpy_erms",
        "memcpy" => "memcpy_sse2",
        "popcount" if c.popcnt => "popcount_popcnt",
        "popcount" => "popcount_soft",
        "crc32c" if c.sse42 => "crc32c_sse42",
        "crc32c" => "crc32c_table",
        "sum_u32" if c.avx2 => "sum_u32_avx2",
        "sum_u32" => "sum_u32_scalar",
        // The retarget tests' ifunc: SSE2, which every x86-64 CPU has.
        "retarget_tag" => "tag_b",
        _ => "?",
    }
}

pub(crate) fn read_slot(addr: u64) -> u64 {
    // SAFETY: slot addresses come from the validated table: 8-aligned, mapped data.
    unsafe { core::ptr::read_volatile(addr as usize as *const u64) }
}

pub(crate) fn read_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut b = [0u8; N];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: sites lie in mapped, readable text (validated against `text_range`).
        *x = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
    }
    b
}

/// FNV-1a over every site's bytes, to prove a refused batch changed nothing.
fn sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for s in t.sites() {
        for b in read_bytes::<8>(s.addr).iter().take(s.len()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

// Reference results, computed without any ifunc.
pub(crate) fn ref_popcount(x: u64) -> u32 {
    let mut n = 0;
    for i in 0..64 {
        n += ((x >> i) & 1) as u32;
    }
    n
}

pub(crate) fn ref_crc32c(data: &[u8]) -> u32 {
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

const POP_INPUTS: [u64; 6] = [
    0,
    1,
    u64::MAX,
    0x8000_0000_0000_0001,
    0xf0f0_0000_ffff_0001,
    0x0123_4567_89ab_cdef,
];

fn test_data() -> [u8; 200] {
    let mut d = [0u8; 200];
    let mut x = 0x1234_5678u32;
    for b in d.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    d
}

fn test_words() -> [u32; 203] {
    let mut w = [0u32; 203];
    for (i, x) in w.iter_mut().enumerate() {
        *x = (i as u32).wrapping_mul(2_654_435_761) | 0x8000_0000;
    }
    w
}

/// The calls every test makes through the ifuncs (patched or not) and their helpers.
pub(crate) fn check_ifunc_results() -> Result<(), Msg> {
    for x in POP_INPUTS {
        ensure!(
            kfuncs::popcount(x) == ref_popcount(x),
            "popcount({x:#x}) wrong"
        );
        ensure!(
            kfuncs::popcount_tail(x) == ref_popcount(x),
            "popcount_tail({x:#x}) wrong"
        );
        ensure!(kfuncs::hamming(x, !x) == 64, "hamming wrong");
    }
    ensure!(
        kfuncs::bitmap_weight(&POP_INPUTS)
            == POP_INPUTS
                .iter()
                .map(|&x| u64::from(ref_popcount(x)))
                .sum::<u64>()
    );
    let d = test_data();
    for n in [0, 1, 7, 8, 9, 63, 200] {
        let want = ref_crc32c(&d[..n]);
        ensure!(
            kfuncs::crc32c_of(&d[..n]) == want,
            "crc32c_of(len {n}) wrong"
        );
        ensure!(
            !kfuncs::crc32c_tail(!0, d.as_ptr(), n) == want,
            "crc32c_tail(len {n}) wrong"
        );
    }
    ensure!(
        kfuncs::crc32c_of(b"123456789") == 0xe306_9283,
        "crc32c check value"
    );
    let w = test_words();
    for n in [0, 1, 7, 8, 9, 64, 203] {
        let want: u64 = w[..n].iter().map(|&x| u64::from(x)).sum();
        ensure!(kfuncs::sum_of(&w[..n]) == want, "sum_of(len {n}) wrong");
        ensure!(
            kfuncs::sum_tail(w.as_ptr(), n) == want,
            "sum_tail(len {n}) wrong"
        );
    }
    for n in [0, 1, 15, 16, 17, 100, 200] {
        let mut dst = [0u8; 200];
        kfuncs::copy_into(&mut dst, &d[..n]);
        ensure!(
            dst[..n] == d[..n] && dst[n..].iter().all(|&b| b == 0),
            "copy_into(len {n}) wrong"
        );
        let mut dst2 = [0u8; 200];
        kfuncs::memcpy_tail(dst2.as_mut_ptr(), d.as_ptr(), n);
        ensure!(dst2[..n] == d[..n], "memcpy_tail(len {n}) wrong");
    }
    // A direct call from this crate (a site in another crate than the ifunc's).
    ensure!(kfuncs::popcount(0xff) == 8);
    Ok(())
}

/// Every implementation this CPU supports agrees with the reference on the same inputs.
fn check_all_implementations(c: &RawChoice) -> Result<(), Msg> {
    let d = test_data();
    let w = test_words();
    for x in POP_INPUTS {
        // SAFETY: popcount_soft runs anywhere; popcount_popcnt only when CPUID says so.
        unsafe {
            ensure!(
                kfuncs::popcount_soft(x) == ref_popcount(x),
                "popcount_soft({x:#x})"
            );
            if c.popcnt {
                ensure!(
                    kfuncs::popcount_popcnt(x) == ref_popcount(x),
                    "popcount_popcnt({x:#x})"
                );
            }
        }
    }
    for n in [0, 1, 9, 200] {
        let want = !ref_crc32c(&d[..n]);
        // SAFETY: `d` is valid for n bytes; the SSE4.2 version only when supported.
        unsafe {
            ensure!(
                kfuncs::crc32c_table(!0, d.as_ptr(), n) == want,
                "crc32c_table(len {n})"
            );
            if c.sse42 {
                ensure!(
                    kfuncs::crc32c_sse42(!0, d.as_ptr(), n) == want,
                    "crc32c_sse42(len {n})"
                );
            }
        }
        let want: u64 = w[..n].iter().map(|&x| u64::from(x)).sum();
        // SAFETY: `w` is valid for n elements; AVX2 only when supported and enabled.
        unsafe {
            ensure!(
                kfuncs::sum_u32_scalar(w.as_ptr(), n) == want,
                "sum_u32_scalar(len {n})"
            );
            if c.avx2 {
                ensure!(
                    kfuncs::sum_u32_avx2(w.as_ptr(), n) == want,
                    "sum_u32_avx2(len {n})"
                );
            }
        }
        let mut a = [0u8; 200];
        let mut b = [0u8; 200];
        // SAFETY: disjoint 200-byte buffers; rep movsb works on every x86-64 CPU (ERMS
        // only makes it fast), SSE2 is baseline.
        unsafe {
            kfuncs::memcpy_erms(a.as_mut_ptr(), d.as_ptr(), n);
            kfuncs::memcpy_sse2(b.as_mut_ptr(), d.as_ptr(), n);
        }
        ensure!(
            a[..n] == d[..n] && b[..n] == d[..n],
            "memcpy implementations (len {n})"
        );
    }
    Ok(())
}

fn check_table(t: &Table<'_>) -> Result<(), Msg> {
    ensure!(t.ifunc_count() >= 5, "only {} ifuncs", t.ifunc_count());
    ensure!(
        t.ifuncs()
            .any(|f| f.name == "c_scale" && f.default == f.trampoline),
        "the GNU ifunc c_scale is not in the table"
    );
    for f in t.ifuncs() {
        let n = t.sites().filter(|s| s.ifunc == f.index).count();
        ensure!(n >= 2, "{} has only {n} sites", f.name);
    }
    let tails = t.sites().filter(|s| s.kind != SiteKind::Call).count();
    ensure!(tails >= 1, "no tail-call (jmp/jcc) sites recorded");
    println!(
        "ksites table at {:#x}: {} ifuncs, {} sites ({} tail calls)",
        t.base(),
        t.ifunc_count(),
        t.site_count(),
        tails
    );
    Ok(())
}

fn check_slots_hold_defaults(t: &Table<'_>) -> Result<(), Msg> {
    for f in t.ifuncs() {
        ensure!(
            read_slot(f.slot) == f.default,
            "{}: slot is not the default before init",
            f.name
        );
    }
    // These calls go trampoline -> slot -> default implementation.
    check_ifunc_results()
}

fn check_choices(t: &Table<'_>, c: &RawChoice) -> Result<(), Msg> {
    println!(
        "cpuid: popcnt={} sse4.2={} erms={} avx2(+ymm state)={}",
        c.popcnt, c.sse42, c.erms, c.avx2
    );
    for f in t.ifuncs() {
        let chosen = impl_name(read_slot(f.slot));
        println!("ifunc-choice {} {}", f.name, chosen);
        let want = expected_impl(f.name, c);
        ensure!(
            chosen == want,
            "{}: chose {chosen}, CPUID calls for {want}",
            f.name
        );
    }
    Ok(())
}

fn check_sites(t: &Table<'_>) -> Result<(), Msg> {
    for s in t.sites() {
        let f = t
            .ifunc(s.ifunc)
            .ok_or_else(|| msg!("site {:#x}: no ifunc", s.addr))?;
        let b: [u8; 8] = read_bytes(s.addr);
        let p = s.prefixes as usize;
        let op_ok = match s.kind {
            SiteKind::Call => b[p] == 0xe8,
            SiteKind::Jmp => b[p] == 0xe9,
            SiteKind::Jcc => b[p] == 0x0f && b[p + 1] & 0xf0 == 0x80,
        };
        ensure!(
            op_ok,
            "site {:#x} ({}): opcode {:02x?}",
            s.addr,
            f.name,
            &b[..s.len()]
        );
        let at = s.len() - 4;
        let rel = i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let target = s.end().wrapping_add_signed(i64::from(rel));
        let chosen = read_slot(f.slot);
        ensure!(
            target == chosen,
            "site {:#x} ({}) targets {target:#x}, chosen implementation is {chosen:#x}",
            s.addr,
            f.name
        );
    }
    Ok(())
}

fn check_text_read_only(t: &Table<'_>, text: &Range<u64>) -> Result<(), Msg> {
    ensure!(
        paging::write_protect_enabled(),
        "CR0.WP is clear after patching"
    );
    let mut page = text.start;
    while page < text.end {
        let pi = paging::translate(page).ok_or_else(|| msg!("text page {page:#x} unmapped"))?;
        ensure!(
            !pi.writable && pi.executable,
            "text page {page:#x}: writable={} executable={}",
            pi.writable,
            pi.executable
        );
        page += 4096;
    }
    // Actually try: writing a site's own first byte back must fault.
    for s in t.sites().step_by(7) {
        let b: [u8; 1] = read_bytes(s.addr);
        // SAFETY: writes the byte the site already holds (so even a successful write
        // changes nothing); only the boot CPU runs.
        match unsafe { crate::idt::probe_write(s.addr, b[0]) } {
            Ok(()) => return Err(msg!("write to site {:#x} did not fault", s.addr)),
            Err(f) => ensure!(
                f.is_page_fault() && f.is_write() && f.is_protection(),
                "write to {:#x}: unexpected fault {:?}",
                s.addr,
                f
            ),
        }
    }
    Ok(())
}

/// Boot patching with a poker that fails the Nth write, for N across the batch: every
/// attempt must fail cleanly and leave every site and slot as it was.
fn init_fault_injection(t: &Table<'_>, exec: &[Range<u64>], f: &CpuFeatures) -> Result<(), Msg> {
    let digest = sites_digest(t);
    let n = t.site_count() as usize;
    for fail_at in [0, 1, n / 2, n - 1] {
        let mut p = WpPoker {
            fail_at: Some(fail_at),
            ..WpPoker::default()
        };
        // SAFETY: one CPU runs; the table describes this image; the batch rolls back.
        let r = unsafe { patch::init(t, exec, f, &mut p) };
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
            paging::write_protect_enabled(),
            "fail_at {fail_at}: CR0.WP left clear"
        );
    }
    Ok(())
}

/// Runs the ifunc tests; `init` happens in the middle, after the pre-init checks.
pub fn run(h: &mut Harness) {
    let text = paging::text_range();
    let exec = [text.clone()];
    // SAFETY: the image was processed by `ksites embed` (the xtask does it), the table
    // segment is mapped read-only-data by paging::init, and nothing writes it.
    let table = match unsafe { cell::image_table(&exec) } {
        Ok(t) => t,
        Err(e) => {
            h.check("ksites_table_valid", Err(e));
            return;
        }
    };
    h.check("ksites_table_valid", check_table(&table));
    h.check(
        "ifunc_calls_before_init_use_default",
        check_slots_hold_defaults(&table),
    );

    let features = CpuFeatures::detect();
    h.check(
        "ifunc_init_fault_injection_restores",
        init_fault_injection(&table, &exec, &features),
    );
    let mut poker = WpPoker::default();
    // SAFETY: one CPU runs; the table describes this image and its resolvers are
    // `ifunc!` adapters; WpPoker writes only where the engine asks.
    let r = unsafe { patch::init(&table, &exec, &features, &mut poker) };
    h.check(
        "ifunc_init_patches_every_site",
        match r {
            Ok(r) => {
                println!(
                    "init: {} ifuncs resolved, {} sites patched, {} out of reach, {} writes",
                    r.ifuncs, r.sites_patched, r.sites_out_of_reach, poker.writes
                );
                if r.sites_patched == table.site_count()
                    && r.sites_out_of_reach == 0
                    && r.ifuncs == table.ifunc_count()
                {
                    Ok(())
                } else {
                    Err(msg!("report {:?} does not cover the table", r))
                }
            }
            Err(e) => Err(msg!("{e}")),
        },
    );

    let c = raw_choice();
    h.check("ifunc_choice_matches_cpuid", check_choices(&table, &c));
    h.check(
        "ifunc_sites_are_direct_branches_to_choice",
        check_sites(&table),
    );
    h.check("ifunc_results_after_init", check_ifunc_results());
    h.check("gnu_ifunc_in_c_results_after_init", check_c_ifunc_results());
    h.check("ifunc_implementations_agree", check_all_implementations(&c));
    h.check(
        "text_read_only_after_patching",
        check_text_read_only(&table, &text),
    );

    let before = sites_digest(&table);
    let mut poker = WpPoker::default();
    // SAFETY: as above; the engine must refuse: the sites are patched (and the slots
    // resolved, unless the default was chosen).
    let again = unsafe { patch::init(&table, &exec, &features, &mut poker) };
    h.check(
        "ifunc_second_init_refused_unchanged",
        match again {
            Err(PatchError::AlreadyPatched { .. } | PatchError::SlotNotDefault { .. })
                if poker.writes == 0 && sites_digest(&table) == before =>
            {
                Ok(())
            }
            Err(e) => Err(msg!("unexpected error or bytes changed: {e}")),
            Ok(_) => Err(msg!("second init succeeded")),
        },
    );
}
