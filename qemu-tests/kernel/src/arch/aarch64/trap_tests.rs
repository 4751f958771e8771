//! The BRK route as this kernel wires it (`exceptions.rs`: a `brk #0x4b53` goes to
//! `kernel_loader::probe::handle_brk` with an `Int3Frame`, and the frame's `pc` and `x0`
//! are written back), mirroring the x86_64 kernel's `trap_tests.rs` by name: a real
//! probe `brk` at no probe site reaches the loader's fallback with the interrupted
//! `pc`, `lr` and x0..x5, keeps every other register, and resumes where the fallback
//! says — after the `brk`, or at `lr` (an emulated `ret`, what an enabled C tail
//! site's emulation does). Run after the probe tests (the route is declared).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::probe::{self, Int3Frame};

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

/// What the fallback saw: pc, lr, x0..x5.
static SEEN: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static HITS: AtomicU64 = AtomicU64::new(0);

/// Records the frame, then resumes after the `brk` with x0 changed.
fn record(f: &mut Int3Frame) -> bool {
    let v = [f.pc, f.lr, f.x0, f.x1, f.x2, f.x3, f.x4, f.x5];
    for (s, v) in SEEN.iter().zip(v) {
        s.store(v, Ordering::SeqCst);
    }
    HITS.fetch_add(1, Ordering::SeqCst);
    f.x0 = 0xa0a0;
    f.pc += 4;
    true
}

fn keeps_registers() -> TestResult {
    ensure!(
        probe::int3_route_declared(),
        "the BRK route was not declared"
    );
    // SAFETY: the fallback only records the frame and resumes after the `brk`.
    unsafe { probe::set_int3_fallback(Some(record)) };
    let hits = HITS.load(Ordering::SeqCst);
    let mut r = [
        0x11u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
    ];
    let mut lr = 0x1e1e_u64;
    let site: u64;
    // SAFETY: the `brk #0x4b53` is at no probe site: the loader's hook declines it and
    // the fallback resumes after it with x0 changed (declared in/out here); x30 is an
    // in/out operand, so the compiler saved the real return address.
    unsafe {
        asm!(
            "adr {site}, 2f",
            "2: brk #0x4b53",
            site = out(reg) site,
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            inout("x4") r[4], inout("x5") r[5], inout("x6") r[6], inout("x7") r[7],
            inout("x16") r[8], inout("x17") r[9], inout("x30") lr,
        );
    }
    // SAFETY: removing the fallback.
    unsafe { probe::set_int3_fallback(None) };
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    let seen: [u64; 8] = core::array::from_fn(|i| SEEN[i].load(Ordering::SeqCst));
    let want = [site, 0x1e1e, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
    ensure!(seen == want, "frame {seen:x?}, want {want:x?}");
    let back = [
        0xa0a0u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
    ];
    ensure!(
        r == back && lr == 0x1e1e,
        "registers after the trap {r:x?} lr {lr:#x}, want {back:x?} lr 0x1e1e"
    );
    Ok(())
}

/// Emulates a `ret`: resumes at the link register.
fn emulate_ret(f: &mut Int3Frame) -> bool {
    f.pc = f.lr;
    HITS.fetch_add(1, Ordering::SeqCst);
    true
}

fn lands_on_ret() -> TestResult {
    // SAFETY: the fallback emulates the `ret` to label 3 that x30 holds.
    unsafe { probe::set_int3_fallback(Some(emulate_ret)) };
    let hits = HITS.load(Ordering::SeqCst);
    let landed: u64;
    // SAFETY: x30 = label 3; the fallback resumes there, so the `udf` after the `brk`
    // is never reached if it works (and faults, failing the run, if not).
    unsafe {
        asm!(
            "mov {landed}, #0",
            "adr x30, 3f",
            "brk #0x4b53",
            "udf #0",
            "3:",
            "mov {landed}, #1",
            landed = out(reg) landed,
            out("x30") _,
        );
    }
    // SAFETY: removing the fallback.
    unsafe { probe::set_int3_fallback(None) };
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    ensure!(landed == 1, "did not land on the emulated return address");
    Ok(())
}
