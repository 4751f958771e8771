//! Races of the x86-64 #BP hook with consecutive retarget batches: a CPU delayed inside
//! the hook while one batch ends and the next starts must be resumed at the site, never
//! declined and never emulated into another batch's target.

use std::boxed::Box;

use super::*;

/// (Found in review.) A CPU whose #BP hook read "no batch in flight", then, delayed,
/// finds the site's first byte trapped again by the next batch of the same ifunc (which
/// started after that read) is resumed at the site, never declined (a declined trap is
/// `ud2` in a kernel, SIGTRAP death on a host).
#[test]
fn a_stale_trap_trapped_again_by_the_next_batch_is_resumed() {
    use x86_64::emulate::testing::{resumes, trapped_at};
    let _g = serial();
    let w = World::new(true);
    retarget(&w, w.b, &mut Mem::default()).unwrap(); // no batch in flight now
    let tables = w.images();
    let (s0, _, _, _) = w.t_sites[0];
    let find = move |addr: u64, tramp: Option<u64>| {
        let r = tables
            .iter()
            .flatten()
            .find_map(|t| site_of(t, addr, tramp));
        if tramp.is_none() {
            // The next retarget of the same ifunc starts and writes its round-0 trap.
            crate::ifunc::retarget::start_generation();
            // SAFETY: `addr` is a site of the test world's writable fake text.
            unsafe { core::ptr::write_volatile(addr as usize as *mut u8, x86_64::INT3) };
        }
        r
    };
    let mut stack = [0u64; 4];
    let top = stack.as_mut_ptr() as u64 + 32;
    let mut f = trapped_at(s0, top, 0);
    // SAFETY: `f` is a frame of a trap at `s0`, a site of the live test tables.
    let handled = unsafe { emulate_with(&mut f, find) };
    assert!(handled, "declined: the CPU would run ud2 / die of SIGTRAP");
    assert_eq!(
        resumes(&f),
        (s0, top),
        "resumed at the site, to trap into the new batch"
    );
}

/// (Found in review.) A CPU that read "ifunc T's batch in flight" and is delayed until
/// a later batch of another ifunc U published U's target is resumed at the site, never
/// emulated into U's implementation.
#[test]
fn a_trap_never_runs_the_target_of_a_later_batch_of_another_ifunc() {
    use std::sync::mpsc;
    use x86_64::emulate::testing::{resumes, trapped_at};
    let _g = serial();
    let w = World::new(true);
    let tables = w.images();
    let t = w.t;
    let (s0, _, _, _) = w.t_sites[0];
    let (start_tx, start_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        start_rx.recv().unwrap();
        let find = |addr: u64, tramp: Option<u64>| {
            let r = tables
                .iter()
                .flatten()
                .find_map(|tb| site_of(tb, addr, tramp));
            if tramp == Some(t) {
                entered_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            r
        };
        let mut stack = [0u64; 4];
        let top = stack.as_mut_ptr() as u64 + 32;
        let mut f = trapped_at(s0, top, 0);
        // SAFETY: `f` is a frame of a trap at `s0`, a site of the live test tables.
        let handled = unsafe { emulate_with(&mut f, find) };
        (handled, resumes(&f).0)
    });
    let mut p = Mem {
        on_sync: Some(Box::new(move |n| {
            if n == 3 {
                start_tx.send(()).unwrap();
                entered_rx.recv().unwrap();
            }
        })),
        ..Mem::default()
    };
    retarget(&w, w.b, &mut p).unwrap();
    // The next batch: ifunc U, to an implementation that is not T's.
    let c = w.a + 0x100;
    // SAFETY: the test world's tables and fake text; no other writer.
    unsafe { retarget_in(&w.images(), w.u, c, &mut Mem::default(), &no_drain) }.unwrap();
    go_tx.send(()).unwrap();
    let (handled, at) = h.join().unwrap();
    assert!(handled);
    assert!(
        at == s0 || at == w.a || at == w.b,
        "T's site emulated into {at:#x} (U's is {c:#x}), a {:#x} b {:#x}",
        w.a,
        w.b
    );
}
