//! Host test of live ifunc retargeting over real, running code: the test binary's own
//! sites, trapped mid-batch and emulated through the `SIGTRAP` handler.

use std::vec::Vec;

use super::retarget::retarget_in;
use super::retarget_tests::{Desc, SiteSpec, no_drain, parse, resolver_t, serial, slot};
use crate::arch::x86_64::emulate::live_code;
use crate::arch::{Arch, BranchSite, SiteKind, ids, x86_64};
use crate::format::Table;
use crate::host::{HostPoker, exec_ranges, install_int3_handler};
use crate::patch::{PokeError, TextPoker};

/// Real sites, really run: the test binary's own code (`arch::x86_64::emulate::
/// live_code`), registered as a module, retargeted with the host poker while this
/// thread runs the sites from inside the batch, trapped: the `SIGTRAP` handler's
/// emulation (a real pushed return address, real RFLAGS) must land in the current
/// implementation and come back.
/// The live code's sites in their boot-time form (direct calls of `a`, what
/// `patch::init` leaves, written with the host poker), the slot holding `a`, and its
/// table registered as a module (with the `SIGTRAP` route installed).
fn setup() -> (
    live_code::LiveCode,
    &'static Table<'static>,
    crate::probe::ImageHandle,
) {
    let c = live_code::code();
    let mut hp = HostPoker::new();
    let exec = exec_ranges();
    let sites: [(u64, SiteKind, u8); 3] = [
        (c.call_site.0, SiteKind::Call, c.call_site.1),
        (c.jmp_site.0, SiteKind::Jmp, c.jmp_site.1),
        (c.jcc_site.0, SiteKind::Jcc, c.jcc_site.1),
    ];
    let rt = resolver_t as *const () as u64;
    let descs = [Desc {
        trampoline: c.trampoline,
        slot: c.slot,
        resolver: rt,
        default: c.a,
        name: "live::t",
    }];
    let specs: Vec<SiteSpec> = sites.iter().map(|&(a, k, p)| (a, k, p, 0)).collect();
    let table = parse(ids::X86_64, &descs, &specs, &exec, &exec);
    hp.begin().unwrap();
    for &(addr, kind, p) in &sites {
        let s = BranchSite {
            addr,
            kind,
            prefixes: p,
            len: x86_64::site_len(kind, p) as u8,
        };
        let f = Arch::X86_64.encode_target(&s, c.a).unwrap();
        let at = addr + x86_64::target_field(kind, p).start as u64;
        // SAFETY: the site's rel32, in this binary's text; no thread runs it now.
        unsafe { hp.write(at, &f.value.to_le_bytes()[..4]) }.unwrap();
    }
    hp.sync_cores();
    hp.end();
    // SAFETY: the live code's slot, which nothing else writes.
    unsafe { core::ptr::write_volatile(c.slot as *mut u64, c.a) };
    assert_eq!(live_code::run(), [1, 1, 1, 7], "direct calls of `a`");
    assert!(install_int3_handler());
    // SAFETY: the table describes this binary's code, which stays mapped.
    let h = unsafe { crate::probe::register_module(*table, c.code.clone(), &hp) }.unwrap();
    (c, table, h)
}

/// Real sites, really run: the test binary's own code (`arch::x86_64::emulate::
/// live_code`), registered as a module, retargeted with the host poker while this
/// thread runs the sites from inside the batch, trapped: the `SIGTRAP` handler's
/// emulation (a real pushed return address, real RFLAGS) must land in the current
/// implementation and come back.
#[test]
fn real_sites_run_mid_batch_through_the_sigtrap_emulation() {
    use std::cell::RefCell;
    use std::rc::Rc;

    let _g = serial();
    let (c, table, h) = setup();

    /// The host poker, running the code after each round.
    struct Live {
        inner: HostPoker,
        seen: Rc<RefCell<Vec<[u32; 4]>>>,
    }
    impl TextPoker for Live {
        fn begin(&mut self) -> Result<(), PokeError> {
            self.inner.begin()
        }
        unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
            // SAFETY: forwarded.
            unsafe { self.inner.write(addr, bytes) }
        }
        fn sync_cores(&mut self) {
            self.inner.sync_cores();
            self.seen.borrow_mut().push(live_code::run());
        }
        fn end(&mut self) {
            self.inner.end()
        }
    }
    let seen = Rc::new(RefCell::new(Vec::new()));
    let mut p = Live {
        inner: HostPoker::new(),
        seen: seen.clone(),
    };
    let images = [Some(table)];
    let before = super::retarget_int3_emulations();
    // SAFETY: the sites are this binary's; the `SIGTRAP` handler is the #BP route.
    let r = unsafe { retarget_in(&images, c.trampoline, c.b, &mut p, &no_drain) }.unwrap();
    assert_eq!(r.sites_rewritten, 3);
    // After the traps and after the new rel32s (sites still trapped): emulated into
    // `b`; after the first bytes are back: direct calls of `b`.
    assert_eq!(*seen.borrow(), std::vec![[2, 2, 2, 7]; 3]);
    // Rounds 0 and 1: four trapped sites run each (the `jcc` twice).
    assert_eq!(super::retarget_int3_emulations() - before, 8);
    assert_eq!(live_code::run(), [2, 2, 2, 7]);
    assert_eq!(slot(c.slot), c.b);
    // And back.
    // SAFETY: as above.
    unsafe { retarget_in(&images, c.trampoline, c.a, &mut p, &no_drain) }.unwrap();
    assert_eq!(live_code::run(), [1, 1, 1, 7]);
    // SAFETY: registered above.
    unsafe { crate::probe::unregister_module(&h, 0..0, &mut HostPoker::new()) }.unwrap();
}

/// The SMP stress, on the host: three threads run the three sites without
/// pause while this one retargets the ifunc 2000 times between `a` and `b` through the
/// public [`super::retarget_raw`] (registry lock, `HostPoker`, `membarrier`): every
/// result is one of the two implementations' (and the `jcc` not taken stays 7), no
/// thread dies of a trap nothing handled, and the end state is exact.
#[test]
fn three_threads_run_the_sites_while_they_are_retargeted_2000_times() {
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let _g = serial();
    let (c, _table, h) = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut seen = [0u64; 2];
                while !stop.load(Ordering::Relaxed) {
                    let r = live_code::run();
                    for v in &r[..3] {
                        assert!(*v == 1 || *v == 2, "{r:?}");
                        seen[*v as usize - 1] += 1;
                    }
                    assert_eq!(r[3], 7, "{r:?}");
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();
    let mut p = HostPoker::new();
    let (before, stale) = (
        super::retarget_int3_emulations(),
        super::retarget_stale_traps(),
    );
    for i in 0..2000 {
        let to = if i % 2 == 0 { c.b } else { c.a };
        // SAFETY: the live code's sites; every thread's SIGTRAP reaches the hook.
        let r = unsafe { super::retarget_raw(c.trampoline as usize, to as usize, &mut p) };
        assert_eq!(r.map(|r| r.sites_rewritten), Ok(3), "retarget {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = [0u64; 2];
    for t in threads {
        let s = t.join().expect("a thread running the sites failed");
        seen[0] += s[0];
        seen[1] += s[1];
    }
    assert_eq!(live_code::run(), [1, 1, 1, 7]);
    assert_eq!(slot(c.slot), c.a);
    std::println!(
        "{} runs ({} in a, {} in b), {} emulated traps, {} stale traps, all threads \
         serialized: {}",
        calls.load(Ordering::Relaxed),
        seen[0],
        seen[1],
        super::retarget_int3_emulations() - before,
        super::retarget_stale_traps() - stale,
        p.serializes_all_threads()
    );
    // SAFETY: registered by `setup`.
    unsafe { crate::probe::unregister_module(&h, 0..0, &mut HostPoker::new()) }.unwrap();
}
