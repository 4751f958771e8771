//! The whole pipeline on the host: this program, linked non-PIE with `--emit-relocs` and
//! processed by `ksites embed`, patches its own ifunc call sites at start, checks that
//! they became direct calls, and toggles a probe (also while another thread runs its
//! site, through the `SIGTRAP` hook).
//!
//! `cargo xtask test` builds, embeds and runs it; by hand:
//!
//! ```sh
//! cargo rustc --release -p kernel-loader --features std --example host_selftest -- \
//!     -C relocation-model=static -C link-arg=-Wl,--emit-relocs
//! ksites embed target/release/examples/host_selftest -o /tmp/host_selftest
//! /tmp/host_selftest
//! ```
//!
//! Prints one line per check and `N passed, N failed`; exits 1 on any failure, 2 if the
//! binary was not embedded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel_loader::probe::{self, ProbeId};
use kernel_loader::{CpuFeatures, cell, host, ifunc, patch};

static SOFT_CALLS: AtomicU64 = AtomicU64::new(0);
static FAST_CALLS: AtomicU64 = AtomicU64::new(0);

extern "C" fn mix_soft(a: u64, b: u64) -> u64 {
    SOFT_CALLS.fetch_add(1, Ordering::Relaxed);
    a.rotate_left(7) ^ b
}

extern "C" fn mix_fast(a: u64, b: u64) -> u64 {
    FAST_CALLS.fetch_add(1, Ordering::Relaxed);
    a.rotate_left(7) ^ b
}

fn pick_mix(f: &CpuFeatures) -> unsafe extern "C" fn(u64, u64) -> u64 {
    // Every x86-64 CPU has SSE2: the fast version is always chosen.
    if f.contains(CpuFeatures::SSE2) {
        mix_fast
    } else {
        mix_soft
    }
}

ifunc! {
    /// An ifunc whose two implementations count their calls.
    pub fn mix(a: u64, b: u64) -> u64;
    default = mix_soft;
    resolver = pick_mix;
}

#[inline(never)]
fn call_mix(a: u64) -> u64 {
    mix(std::hint::black_box(a), 3)
}

#[inline(never)]
fn traced(x: u64) -> u64 {
    kernel_loader::probe!(host, traced, x, x + 1);
    x.wrapping_mul(3)
}

static HITS: AtomicU64 = AtomicU64::new(0);
static LAST_ARG: AtomicU64 = AtomicU64::new(0);

fn on_traced(_id: ProbeId, args: &[u64; 6]) {
    HITS.fetch_add(1, Ordering::Relaxed);
    LAST_ARG.store(args[0] * 1000 + args[1], Ordering::Relaxed);
}

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        if ok {
            self.passed += 1;
            println!("ok   {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail}");
        }
    }
}

fn main() {
    let exec = host::exec_ranges();
    // SAFETY: this image was processed by `ksites embed` (or not at all: `Empty`), and
    // nothing writes the table.
    let table = match unsafe { cell::image_table(&exec) } {
        Ok(t) => t,
        Err(e) => {
            eprintln!("host_selftest: {e}");
            std::process::exit(2);
        }
    };
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    let mut poker = host::HostPoker::new();

    // Before patching, calls go through the trampoline to the default.
    let before = call_mix(5);
    r.check(
        "unpatched call reaches the default",
        before == 5u64.rotate_left(7) ^ 3 && SOFT_CALLS.load(Ordering::Relaxed) == 1,
        format!("soft calls {}", SOFT_CALLS.load(Ordering::Relaxed)),
    );

    // SAFETY: the table describes this running image; only this thread runs yet.
    let rep = unsafe { patch::init(&table, &exec, &CpuFeatures::detect(), &mut poker) };
    let rep = match rep {
        Ok(rep) => rep,
        Err(e) => {
            println!("FAIL patch::init: {e}");
            println!("{} passed, {} failed", r.passed, r.failed + 1);
            std::process::exit(1);
        }
    };
    r.check(
        "init patched every site",
        rep.ifuncs == 1 && rep.sites_patched >= 1 && rep.sites_out_of_reach == 0,
        format!("{rep:?}"),
    );
    let fast = mix_fast as *const () as u64;
    let direct = table.sites().all(|s| {
        let mut b = [0u8; 4];
        // SAFETY: the site lies in this program's text (validated).
        unsafe { std::ptr::copy_nonoverlapping(s.rel32_addr() as *const u8, b.as_mut_ptr(), 4) };
        s.end().wrapping_add_signed(i32::from_le_bytes(b).into()) == fast
    });
    r.check(
        "every site is a direct branch to the chosen implementation",
        direct,
        format!("{} sites", table.site_count()),
    );
    let after = call_mix(5);
    r.check(
        "patched call reaches the chosen implementation",
        after == before && FAST_CALLS.load(Ordering::Relaxed) == 1,
        format!("fast calls {}", FAST_CALLS.load(Ordering::Relaxed)),
    );
    // A second init is refused without writing.
    let writes = poker.writes;
    // SAFETY: as above.
    let again = unsafe { patch::init(&table, &exec, &CpuFeatures::detect(), &mut poker) };
    r.check(
        "a second init is refused",
        matches!(again, Err(patch::PatchError::AlreadyPatched { .. })) && poker.writes == writes,
        format!("{again:?}"),
    );

    // Probes.
    let n = probe::register_image(table, &poker);
    r.check("probe table registers", n.is_ok(), format!("{n:?}"));
    let Some(id) = probe::lookup("host:traced") else {
        r.check("probe host:traced exists", false, String::new());
        println!("{} passed, {} failed", r.passed, r.failed);
        std::process::exit(1);
    };
    traced(1);
    r.check(
        "disabled probe does not fire",
        HITS.load(Ordering::Relaxed) == 0,
        String::new(),
    );
    // The SIGTRAP hook is the #BP route `probe::enable` requires (it declares it).
    r.check(
        "SIGTRAP hook installed",
        host::install_int3_handler(),
        String::new(),
    );
    // SAFETY: the host poker writes this program's text; the SIGTRAP hook is installed
    // before any other thread runs a site.
    let e = unsafe { probe::enable(id, on_traced, &mut poker) };
    traced(7);
    r.check(
        "enabled probe fires with its arguments",
        e.is_ok() && HITS.load(Ordering::Relaxed) == 1 && LAST_ARG.load(Ordering::Relaxed) == 7008,
        format!("{e:?}, hits {}", HITS.load(Ordering::Relaxed)),
    );
    // SAFETY: as above.
    let d = unsafe { probe::disable(id, &mut poker) };
    traced(9);
    r.check(
        "disabled again, it stops firing",
        d.is_ok() && HITS.load(Ordering::Relaxed) == 1,
        format!("{d:?}"),
    );

    // Live toggling while another thread runs the site.
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let toggles = 2000;
    let mut errors = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                traced(std::hint::black_box(2));
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
        for _ in 0..toggles {
            // SAFETY: as above.
            errors += unsafe { probe::enable(id, on_traced, &mut poker) }.is_err() as u32;
            // SAFETY: as above.
            errors += unsafe { probe::disable(id, &mut poker) }.is_err() as u32;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let hits = HITS.load(Ordering::Relaxed) - 1;
    let calls = calls.load(Ordering::Relaxed);
    r.check(
        "live toggling with a concurrent caller",
        errors == 0 && hits <= calls && !probe::is_enabled(id),
        format!("{errors} errors, {hits} hits for {calls} calls"),
    );
    println!(
        "host: {toggles} toggles while another thread made {calls} calls: {hits} hits, \
         {} int3 emulations, membarrier sync-core: {}",
        probe::int3_emulations(),
        poker.serializes_all_threads()
    );
    println!("{} passed, {} failed", r.passed, r.failed);
    if r.failed > 0 {
        std::process::exit(1);
    }
}
