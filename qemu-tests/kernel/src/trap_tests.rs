//! The crate's #BP entry (`kernel_loader::probe::int3_entry`) as this kernel installs it
//! in vector 3 ([`crate::idt::init`]): the gate points at it, the route is declared, and
//! a real `int3` through it keeps every register but the ones the hook changed, hands
//! the hook the interrupted RIP and RSP, and lands on a raised RSP (an emulated `ret`,
//! what a C tail site's emulation does). The probe tests' mid-patch and C tail tests
//! drive probe sites through the same stub.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::probe::{self, Int3Frame};

use crate::ensure;
use crate::harness::{Harness, TestResult};
use crate::idt::{self, BREAKPOINT};

/// Runs the trap tests.
pub fn run(h: &mut Harness) {
    h.run(
        "trap_vector_3_is_the_crate_int3_entry",
        vector_3_is_the_entry,
    );
    h.run(
        "trap_int3_entry_keeps_registers_and_writes_back_the_frame",
        keeps_registers,
    );
    h.run("trap_int3_entry_lands_on_an_emulated_ret", lands_on_ret);
}

fn vector_3_is_the_entry() -> TestResult {
    let mut idtr = [0u8; 10];
    // SAFETY: `sidt` stores 10 bytes into the buffer.
    unsafe { asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack, preserves_flags)) };
    let base = u64::from_le_bytes(idtr[2..10].try_into().unwrap_or_default());
    let entry = base + 16 * u64::from(BREAKPOINT);
    // SAFETY: the loaded IDT has 256 16-byte entries, mapped and readable.
    let w: [u64; 2] = unsafe { core::ptr::read_volatile(entry as *const [u64; 2]) };
    let offset = (w[0] & 0xffff) | ((w[0] >> 32) & 0xffff_0000) | (w[1] << 32);
    let kind = (w[0] >> 40) & 0xff;
    ensure!(
        offset == probe::int3_entry_address(),
        "vector 3 -> {offset:#x}, int3_entry is {:#x}",
        probe::int3_entry_address()
    );
    ensure!(
        kind == 0x8e,
        "vector 3 gate type/attributes {kind:#x}, want 0x8e"
    );
    ensure!(
        probe::int3_route_declared(),
        "the #BP route was not declared"
    );
    Ok(())
}

/// What the fallback saw: rip, rsp, rax, rdi, rsi, rdx, rcx, r8, r9.
static SEEN: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
static HITS: AtomicU64 = AtomicU64::new(0);

/// Records the frame, then changes rax and r9 (each written back by the stub).
fn record(f: &mut Int3Frame) -> bool {
    let v = [f.rip, f.rsp, f.rax, f.rdi, f.rsi, f.rdx, f.rcx, f.r8, f.r9];
    for (s, v) in SEEN.iter().zip(v) {
        s.store(v, Ordering::SeqCst);
    }
    HITS.fetch_add(1, Ordering::SeqCst);
    f.rax = 0xa0a0;
    f.r9 = 0x9090;
    true
}

fn keeps_registers() -> TestResult {
    idt::set_breakpoint_hook(record);
    let hits = HITS.load(Ordering::SeqCst);
    let mut r = [
        0x11u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
    ];
    let (after, sp): (u64, u64);
    // SAFETY: the `int3` is not a probe site's: `int3_entry` hands it to the fallback,
    // which records the frame and changes rax and r9 (declared as in/out here).
    unsafe {
        asm!(
            "mov r13, rsp",
            "int3",
            "2:",
            "lea r12, [rip + 2b]",
            inout("rax") r[0], inout("rdi") r[1], inout("rsi") r[2], inout("rdx") r[3],
            inout("rcx") r[4], inout("r8") r[5], inout("r9") r[6], inout("r10") r[7],
            inout("r11") r[8], inout("r14") r[9], inout("r15") r[10],
            out("r12") after, out("r13") sp,
        );
    }
    idt::clear_breakpoint_hook();
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    let seen: [u64; 9] = core::array::from_fn(|i| SEEN[i].load(Ordering::SeqCst));
    let want = [after, sp, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77];
    ensure!(seen == want, "frame {seen:x?}, want {want:x?}");
    let back = [
        0xa0a0u64, 0x22, 0x33, 0x44, 0x55, 0x66, 0x9090, 0x88, 0x99, 0xaa, 0xbb,
    ];
    ensure!(r == back, "registers after the trap {r:x?}, want {back:x?}");
    Ok(())
}

/// Emulates a `ret`: pops the return address off the interrupted stack.
fn emulate_ret(f: &mut Int3Frame) -> bool {
    // SAFETY: `lands_on_ret` pushed a return address just before its `int3`.
    f.rip = unsafe { core::ptr::read(f.rsp as *const u64) };
    f.rsp += 8;
    HITS.fetch_add(1, Ordering::SeqCst);
    true
}

fn lands_on_ret() -> TestResult {
    idt::set_breakpoint_hook(emulate_ret);
    let hits = HITS.load(Ordering::SeqCst);
    let (before, after): (u64, u64);
    // SAFETY: the fallback emulates the `ret` to label 3 that the pushed address asks
    // for; the `ud2` after the `int3` is never reached if it does.
    unsafe {
        asm!(
            "mov r13, rsp",
            "lea rax, [rip + 3f]",
            "push rax",
            "int3",
            "ud2",
            "3:",
            "mov r12, rsp",
            out("rax") _, out("r12") after, out("r13") before,
        );
    }
    idt::clear_breakpoint_hook();
    ensure!(
        HITS.load(Ordering::SeqCst) == hits + 1,
        "the fallback did not run once"
    );
    ensure!(
        after == before,
        "RSP after the emulated ret {after:#x}, want {before:#x}"
    );
    Ok(())
}
