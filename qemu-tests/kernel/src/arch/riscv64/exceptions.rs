//! The Rust side of the trap vector (`boot.rs`): supervisor software interrupts (IPIs)
//! go to [`super::smp::handle_ipi`], the platform's own `ebreak`s are resumed, any
//! other 4-byte `ebreak` goes to the ksites probe route (`kernel_loader::probe::
//! handle_ebreak`, with the frame and write-back of `kernel_loader::arch::riscv64::
//! trap`), an
//! *expected* fault (armed by [`try_store`] / [`try_call`]) is caught and reported to
//! its test, and anything else prints `FAULT: …` with `scause`, `stval` and `sepc` and
//! fails the run.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel_loader::arch::riscv64::probe::Int3Frame;
use kernel_loader::arch::riscv64::trap::is_probe_ebreak;

use super::exit::exit_qemu;

/// The registers `boot.rs` saves on every trap, in its order.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// x0..x31 (`x[0]` is not saved; `x[2]` is the interrupted `sp`).
    pub x: [u64; 32],
    /// `sepc`: where `sret` resumes (the handler may change it).
    pub sepc: u64,
    /// `sstatus` at the trap (restored by `sret`'s path).
    pub sstatus: u64,
    /// `scause`: bit 63 = interrupt, the rest the code.
    pub scause: u64,
    /// `stval`: the faulting address (page and access faults) or instruction.
    pub stval: u64,
    /// f0..f31, saved when `sstatus.FS` was not Off.
    pub f: [u64; 32],
    /// `fcsr`.
    pub fcsr: u64,
    _pad: u64,
}

/// `scause` bit 63: an interrupt.
pub const INTERRUPT: u64 = 1 << 63;
/// Interrupt code: supervisor software interrupt (an IPI).
pub const IRQ_SUPERVISOR_SOFT: u64 = 1;
/// Exception code: instruction access fault.
pub const EXC_INSTRUCTION_ACCESS: u64 = 1;
/// Exception code: illegal instruction.
pub const EXC_ILLEGAL_INSTRUCTION: u64 = 2;
/// Exception code: breakpoint (`ebreak`, `c.ebreak`).
pub const EXC_BREAKPOINT: u64 = 3;
/// Exception code: store/AMO access fault.
pub const EXC_STORE_ACCESS: u64 = 7;
/// Exception code: instruction page fault.
pub const EXC_INSTRUCTION_PAGE_FAULT: u64 = 12;
/// Exception code: load page fault.
pub const EXC_LOAD_PAGE_FAULT: u64 = 13;
/// Exception code: store/AMO page fault.
pub const EXC_STORE_PAGE_FAULT: u64 = 15;

/// A fault caught while armed: its `scause`, `stval` and `sepc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaughtFault {
    /// The exception code.
    pub cause: u64,
    /// The faulting address.
    pub tval: u64,
    /// The faulting instruction's address.
    pub epc: u64,
}

impl CaughtFault {
    /// Whether this is a page fault (a permission refused by the page tables).
    pub fn is_page_fault(&self) -> bool {
        matches!(
            self.cause,
            EXC_INSTRUCTION_PAGE_FAULT | EXC_LOAD_PAGE_FAULT | EXC_STORE_PAGE_FAULT
        )
    }

    /// Whether the faulting access was a store.
    pub fn is_write(&self) -> bool {
        matches!(self.cause, EXC_STORE_PAGE_FAULT | EXC_STORE_ACCESS)
    }
}

/// Armed by [`try_store`]/[`try_call`] (CPU 0 only): the next synchronous fault is
/// caught instead of reported.
static ARMED: AtomicBool = AtomicBool::new(false);
static CAUGHT: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static CAUGHT_VALID: AtomicBool = AtomicBool::new(false);
/// Platform `ebreak`s resumed so far.
pub static PLATFORM_EBREAKS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .text
    .balign 4
    .global ksites_rv_try_store
ksites_rv_try_store:
    sw a1, 0(a0)
    ret
    .global ksites_rv_try_call
ksites_rv_try_call:
    addi sp, sp, -16
    sd ra, 8(sp)
    jalr ra, 0(a0)
    ld ra, 8(sp)
    addi sp, sp, 16
    ret
    .global ksites_rv_fault_landing
ksites_rv_fault_landing:
    ret

    .option push
    .option norvc
    .global ksites_rv_ebreak_fn
ksites_rv_ebreak_fn:
    li a0, 0
    .global ksites_rv_ebreak_site
ksites_rv_ebreak_site:
    ebreak
    li a0, 7
    ret
    .global ksites_rv_clobber_site
ksites_rv_clobber_site:
    ebreak
    ret
    .option pop
"#
);

unsafe extern "C" {
    fn ksites_rv_try_store(addr: u64, value: u32);
    fn ksites_rv_try_call(addr: u64) -> u64;
    fn ksites_rv_fault_landing();
    /// `li a0, 0; ebreak (platform); li a0, 7; ret`: returns 7 once the `ebreak` is
    /// resumed after itself.
    pub fn ksites_rv_ebreak_fn() -> u64;
    static ksites_rv_ebreak_site: u8;
    /// `ebreak; ret`: the trap handler clobbers f0, f8, f31 and `fcsr.frm`.
    pub fn ksites_rv_clobber_site();
}

fn take_caught() -> Option<CaughtFault> {
    ARMED.store(false, Ordering::SeqCst);
    CAUGHT_VALID
        .swap(false, Ordering::SeqCst)
        .then(|| CaughtFault {
            cause: CAUGHT[0].load(Ordering::SeqCst),
            tval: CAUGHT[1].load(Ordering::SeqCst),
            epc: CAUGHT[2].load(Ordering::SeqCst),
        })
}

/// Stores `value` at `addr` with one `sw`; a fault is caught and returned. CPU 0 only.
///
/// # Safety
///
/// If the store succeeds it changes memory: `addr` must be a location whose change
/// cannot hurt (or one expected to fault).
pub unsafe fn try_store(addr: u64, value: u32) -> Result<(), CaughtFault> {
    CAUGHT_VALID.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: the caller's contract; a fault resumes at the landing, which returns
    // from `ksites_rv_try_store` (a leaf: `ra` is still our return address).
    unsafe { ksites_rv_try_store(addr, value) };
    take_caught().map_or(Ok(()), Err)
}

/// Calls `addr` (`jalr`) as `extern "C" fn() -> u64`; an instruction page fault (or
/// any fault) is caught and returned. CPU 0 only.
///
/// # Safety
///
/// If `addr` is executable it runs: it must be a function with that signature (or
/// memory expected not to be executable).
pub unsafe fn try_call(addr: u64) -> Result<u64, CaughtFault> {
    CAUGHT_VALID.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: the caller's contract; a fault at `addr` resumes at the landing, whose
    // `ret` goes back after the `jalr` (`ra`).
    let v = unsafe { ksites_rv_try_call(addr) };
    take_caught().map_or(Ok(v), Err)
}

/// The instruction at `pc` (its first 4 bytes, or a compressed one's 2).
fn insn_at(pc: u64) -> u32 {
    // SAFETY: `pc` is the address of an instruction that just trapped: mapped and
    // readable (text is R X), 2-byte aligned; a 4-byte instruction's second half is
    // in the same mapping.
    let low = unsafe { (pc as *const u16).read_volatile() };
    if low & 3 != 3 {
        return u32::from(low);
    }
    // SAFETY: as above.
    let high = unsafe { ((pc + 2) as *const u16).read_volatile() };
    u32::from(low) | (u32::from(high) << 16)
}

/// Length of the instruction at `pc`: 2 (compressed) or 4.
fn insn_len(pc: u64) -> u64 {
    if insn_at(pc) & 3 == 3 { 4 } else { 2 }
}

/// Called by the trap vector with the saved frame.
#[unsafe(no_mangle)]
extern "C" fn riscv64_trap(f: &mut TrapFrame) {
    if f.scause & INTERRUPT != 0 {
        if f.scause & !INTERRUPT == IRQ_SUPERVISOR_SOFT {
            return super::smp::handle_ipi();
        }
    } else if f.scause == EXC_BREAKPOINT && handle_ebreak(f) {
        return;
    } else if f.scause != EXC_BREAKPOINT && ARMED.swap(false, Ordering::SeqCst) {
        CAUGHT[0].store(f.scause, Ordering::SeqCst);
        CAUGHT[1].store(f.stval, Ordering::SeqCst);
        CAUGHT[2].store(f.sepc, Ordering::SeqCst);
        CAUGHT_VALID.store(true, Ordering::SeqCst);
        f.sepc = ksites_rv_fault_landing as *const () as u64;
        return;
    }
    crate::println!(
        "FAULT: unexpected {} {} on CPU {}: scause=0x{:x} stval=0x{:x} sepc=0x{:x} ra=0x{:x} sstatus=0x{:x}",
        if f.scause & INTERRUPT != 0 {
            "interrupt"
        } else {
            "exception"
        },
        f.scause & !INTERRUPT,
        super::smp::cpu_index(),
        f.scause,
        f.stval,
        f.sepc,
        f.x[1],
        f.sstatus,
    );
    backtrace(f);
    exit_qemu(false)
}

/// Prints `sp` and the return addresses of the frame-pointer chain (`s0`; the kernel is
/// built with frame pointers) while it stays on the running CPU's stack.
fn backtrace(f: &TrapFrame) {
    let stack = super::boot::stack_of(super::smp::cpu_index());
    crate::print!(
        "FAULT: sp=0x{:x} (stack 0x{:x}..0x{:x}) backtrace:",
        f.x[2],
        stack.start,
        stack.end
    );
    let mut fp = f.x[8];
    for _ in 0..24 {
        if fp < stack.start + 16 || fp > stack.end || !fp.is_multiple_of(8) {
            break;
        }
        // SAFETY: `fp - 16 .. fp` lies on this CPU's stack (checked above): mapped RW.
        let (ra, prev) = unsafe {
            (
                ((fp - 8) as *const u64).read_volatile(),
                ((fp - 16) as *const u64).read_volatile(),
            )
        };
        crate::print!(" 0x{ra:x}");
        if prev <= fp {
            break;
        }
        fp = prev;
    }
    crate::println!();
}

/// An `ebreak`: the platform's own sites resume after themselves (the clobber site
/// after overwriting FP state, as a compiled handler may); any other 4-byte `ebreak`
/// goes to the ksites probe route, and its `pc`, `ra` and `a0` are written back as the
/// loader's riscv64 trap module says.
fn handle_ebreak(f: &mut TrapFrame) -> bool {
    let pc = f.sepc;
    if platform_ebreak(f) {
        return true;
    }
    // Every breakpoint at a 4-aligned address goes to the loader, which decides by
    // address (its table) and emulates the site's *current* state. The word at `pc` is
    // not read to decide: the `ebreak` of a probe site this hart fetched may have been
    // rewritten (the probe disabled) before this handler runs, a legal interleaving of
    // the single-store protocol that QEMU's multi-threaded TCG makes frequent (a hart can
    // keep running a translation of the old `ebreak` after the store). Reading the word,
    // this was an "unexpected exception 3" at `c_fire_tail`'s site in the SMP stress. A
    // non-site address is declined and reported below.
    if !is_probe_ebreak(f.scause, pc) {
        return false;
    }
    let mut frame = Int3Frame {
        pc,
        ra: f.x[1],
        a0: f.x[10],
        a1: f.x[11],
        a2: f.x[12],
        a3: f.x[13],
        a4: f.x[14],
        a5: f.x[15],
    };
    // SAFETY: `frame` is this hart's interrupted `ebreak` context, and its pc, ra and
    // a0 are written back before `sret` (below).
    if unsafe { kernel_loader::probe::handle_ebreak(&mut frame) } {
        f.sepc = frame.pc;
        f.x[1] = frame.ra;
        f.x[10] = frame.a0;
        return true;
    }
    false
}

/// The platform's own `ebreak` sites (not ksites probes).
fn platform_ebreak(f: &mut TrapFrame) -> bool {
    let pc = f.sepc;
    if pc == core::ptr::addr_of!(ksites_rv_ebreak_site) as u64 {
        PLATFORM_EBREAKS.fetch_add(1, Ordering::SeqCst);
        f.sepc += insn_len(pc);
        return true;
    }
    if pc == ksites_rv_clobber_site as *const () as u64 {
        // What compiled handler code may do: use FP registers and change the rounding
        // mode. The trap entry must have saved them.
        // SAFETY: scratch FP registers only (declared clobbered); `fcsr.frm` is
        // restored by the trap's return path from the saved copy.
        unsafe {
            core::arch::asm!(
                "li {t}, 0x5a5a5a5a5a5a5a5a",
                "fmv.d.x f0, {t}",
                "fmv.d.x f8, {t}",
                "fmv.d.x f31, {t}",
                "fsrmi 3",
                t = out(reg) _,
                out("f0") _, out("f8") _, out("f31") _,
                options(nomem, nostack),
            )
        };
        f.sepc += insn_len(pc);
        return true;
    }
    false
}
