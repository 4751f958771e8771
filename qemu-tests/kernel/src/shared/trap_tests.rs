//! The probe-trap route as the platform wires it (its vector hands a probe trap, `brk`
//! or `ebreak`, to `kernel_loader::probe`'s hook with an `Int3Frame`, and writes the
//! frame back), mirroring the x86_64 kernel's `trap_tests.rs` by name: a real probe
//! trap at no probe site reaches the loader's fallback with the interrupted pc, return
//! address and six argument registers, keeps every other register, and resumes where
//! the fallback says — after the trap with the return register set (the loader's
//! emulation of an enabled C is-enabled site), or at the return address (an emulated
//! `ret`, what a C tail site's emulation does). Run after the probe tests (the route is
//! declared). The instructions are `testing`'s; the frame is read and changed only
//! through the loader's own `trap_site`, `trap_args` and `emulate`.

use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::arch::native::probe::{emulate, trap_args, trap_site};
use kernel_loader::arch::{ProbeKind, ProbeSiteRef};
use kernel_loader::probe::{self, Int3Frame};

use super::testing;
use crate::ensure;
use crate::harness::{Harness, TestResult};

/// Runs the trap tests.
pub fn run(h: &mut Harness) {
    h.run(
        "trap_int3_entry_keeps_registers_and_writes_back_the_frame",
        keeps_registers,
    );
    h.run("trap_int3_entry_lands_on_an_emulated_ret", lands_on_ret);
}

/// Makes `f` resume as the loader's emulation of a probe site of `kind` at the trap in
/// state `on` does.
fn emulated(f: &mut Int3Frame, kind: ProbeKind, on: bool) {
    let site = ProbeSiteRef {
        addr: trap_site(f),
        target: 0,
        kind,
    };
    // SAFETY: `f` is a trap frame whose `pc` is `site.addr` (a live one the platform
    // writes back, or a copy); `emulate` only sets its pc and return register.
    unsafe { emulate(f, &site, on) };
}

/// The frame's return address: where an emulated `ret` (a disabled C tail site) would
/// resume.
fn return_address(f: &Int3Frame) -> u64 {
    let mut copy = *f;
    emulated(&mut copy, ProbeKind::CTail, false);
    trap_site(&copy)
}

/// What the fallback saw: pc, return address, six arguments.
static SEEN: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static HITS: AtomicU64 = AtomicU64::new(0);

/// Records the frame, then resumes after the trap with the return register 1 (an
/// enabled C is-enabled site's emulation).
fn record(f: &mut Int3Frame) -> bool {
    let a = trap_args(f);
    let v = [
        trap_site(f),
        return_address(f),
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
    ];
    for (s, v) in SEEN.iter().zip(v) {
        s.store(v, Ordering::SeqCst);
    }
    HITS.fetch_add(1, Ordering::SeqCst);
    emulated(f, ProbeKind::CEnabled, true);
    true
}

fn keeps_registers() -> TestResult {
    ensure!(
        probe::int3_route_declared(),
        "the trap route was not declared"
    );
    // SAFETY: the fallback only records the frame and resumes after the trap.
    unsafe { probe::set_int3_fallback(Some(record)) };
    let hits = HITS.load(Ordering::SeqCst);
    let mut r = [
        0x11u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
    ];
    let mut ra = 0x1e1e_u64;
    let site = testing::trap_with_registers(&mut r, &mut ra);
    // SAFETY: removing the fallback.
    unsafe { probe::set_int3_fallback(None) };
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    let seen: [u64; 8] = core::array::from_fn(|i| SEEN[i].load(Ordering::SeqCst));
    let want = [site, 0x1e1e, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
    ensure!(seen == want, "frame {seen:x?}, want {want:x?}");
    let back = [1u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa];
    ensure!(
        r == back && ra == 0x1e1e,
        "registers after the trap {r:x?} return address {ra:#x}, want {back:x?} 0x1e1e"
    );
    Ok(())
}

/// Emulates a `ret` (a disabled C tail site): resumes at the return address.
fn emulate_ret(f: &mut Int3Frame) -> bool {
    emulated(f, ProbeKind::CTail, false);
    HITS.fetch_add(1, Ordering::SeqCst);
    true
}

fn lands_on_ret() -> TestResult {
    // SAFETY: the fallback emulates the `ret` to the label the return address holds.
    unsafe { probe::set_int3_fallback(Some(emulate_ret)) };
    let hits = HITS.load(Ordering::SeqCst);
    let landed = testing::trap_then_return();
    // SAFETY: removing the fallback.
    unsafe { probe::set_int3_fallback(None) };
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    ensure!(landed, "did not land on the emulated return address");
    Ok(())
}
