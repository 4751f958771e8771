//! The Rust side of the exception vectors (`boot.rs`): IRQs go to the GIC handler,
//! BRKs to the ksites route or the platform's own resumable BRK, an *expected* fault
//! (armed by [`try_store`] / [`try_call`]) is caught and reported to its test, and
//! anything else prints `FAULT: …` with ESR, FAR and ELR and fails the run.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel_loader::arch::aarch64::probe::Int3Frame;
use kernel_loader::arch::aarch64::trap::{ESR_EC_BRK64, is_probe_brk};

use super::exit::exit_qemu;

/// The registers `boot.rs` saves on every exception, in its order.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// x0..x30.
    pub x: [u64; 31],
    /// ELR_EL1: where `eret` resumes (the handler may change it).
    pub elr: u64,
    /// SPSR_EL1.
    pub spsr: u64,
    /// ESR_EL1: the syndrome.
    pub esr: u64,
    /// FAR_EL1: the faulting address (data and instruction aborts).
    pub far: u64,
    /// Which of the 16 vectors: 4 = synchronous, 5 = IRQ (current EL, SP_EL1).
    pub kind: u64,
}

/// `ESR_EL1.EC` of an instruction abort taken without a change of exception level.
pub const EC_INSTRUCTION_ABORT: u64 = 0x21;
/// `ESR_EL1.EC` of a data abort taken without a change of exception level.
pub const EC_DATA_ABORT: u64 = 0x25;
/// The `brk` comment of the platform's own resumable breakpoint (not a ksites probe).
pub const PLATFORM_BRK_IMM: u64 = 0x7a;

const KINDS: [&str; 16] = [
    "sync (SP0)",
    "IRQ (SP0)",
    "FIQ (SP0)",
    "SError (SP0)",
    "sync",
    "IRQ",
    "FIQ",
    "SError",
    "sync (EL0 A64)",
    "IRQ (EL0 A64)",
    "FIQ (EL0 A64)",
    "SError (EL0 A64)",
    "sync (EL0 A32)",
    "IRQ (EL0 A32)",
    "FIQ (EL0 A32)",
    "SError (EL0 A32)",
];

/// A fault caught while armed: its ESR_EL1, FAR_EL1 and ELR_EL1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaughtFault {
    /// The syndrome.
    pub esr: u64,
    /// The faulting address.
    pub far: u64,
    /// The faulting instruction.
    pub elr: u64,
}

impl CaughtFault {
    /// ESR_EL1.EC.
    pub fn class(&self) -> u64 {
        (self.esr >> 26) & 0x3f
    }

    /// Whether this is a permission fault (DFSC/IFSC 0b0011xx) at any level.
    pub fn is_permission_fault(&self) -> bool {
        self.esr & 0x3c == 0x0c
    }

    /// For a data abort: ESR_EL1.ISS.WnR, the access was a write.
    pub fn is_write(&self) -> bool {
        self.esr & (1 << 6) != 0
    }
}

/// Armed by [`try_store`]/[`try_call`] (CPU 0 only): the next synchronous fault is
/// caught instead of reported.
static ARMED: AtomicBool = AtomicBool::new(false);
static CAUGHT: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static CAUGHT_VALID: AtomicBool = AtomicBool::new(false);
/// Platform BRKs resumed so far.
pub static PLATFORM_BRKS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .text
    .global ksites_a64_try_store
ksites_a64_try_store:
    str w1, [x0]
    ret
    .global ksites_a64_try_call
ksites_a64_try_call:
    stp x29, x30, [sp, #-16]!
    mov x29, sp
    blr x0
    ldp x29, x30, [sp], #16
    ret
    .global ksites_a64_fault_landing
ksites_a64_fault_landing:
    ret
"#
);

unsafe extern "C" {
    fn ksites_a64_try_store(addr: u64, value: u32);
    fn ksites_a64_try_call(addr: u64) -> u64;
    fn ksites_a64_fault_landing();
}

fn take_caught() -> Option<CaughtFault> {
    ARMED.store(false, Ordering::SeqCst);
    CAUGHT_VALID
        .swap(false, Ordering::SeqCst)
        .then(|| CaughtFault {
            esr: CAUGHT[0].load(Ordering::SeqCst),
            far: CAUGHT[1].load(Ordering::SeqCst),
            elr: CAUGHT[2].load(Ordering::SeqCst),
        })
}

/// Stores `value` at `addr` with one `str`; a fault is caught and returned. CPU 0 only.
///
/// # Safety
///
/// If the store succeeds it changes memory: `addr` must be a location whose change
/// cannot hurt (or one expected to fault).
pub unsafe fn try_store(addr: u64, value: u32) -> Result<(), CaughtFault> {
    CAUGHT_VALID.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: the caller's contract; a fault resumes at the landing, which returns
    // from `ksites_a64_try_store` (a leaf: x30 is still our return address).
    unsafe { ksites_a64_try_store(addr, value) };
    take_caught().map_or(Ok(()), Err)
}

/// Calls `addr` (`blr`) as `extern "C" fn() -> u64`; an instruction abort (or any
/// fault) is caught and returned. CPU 0 only.
///
/// # Safety
///
/// If `addr` is executable it runs: it must be a function with that signature (or
/// memory expected not to be executable).
pub unsafe fn try_call(addr: u64) -> Result<u64, CaughtFault> {
    CAUGHT_VALID.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: the caller's contract; a fault at `addr` resumes at the landing, whose
    // `ret` goes back to the `blr` (x30).
    let v = unsafe { ksites_a64_try_call(addr) };
    take_caught().map_or(Ok(v), Err)
}

/// Called by the vectors' common tail with the saved frame.
#[unsafe(no_mangle)]
extern "C" fn aarch64_exception(f: &mut ExceptionFrame) {
    match f.kind {
        5 => return super::smp::handle_irq(),
        4 => {
            let ec = (f.esr >> 26) & 0x3f;
            if ec == ESR_EC_BRK64 && handle_brk(f) {
                return;
            }
            if ec != ESR_EC_BRK64 && ARMED.swap(false, Ordering::SeqCst) {
                CAUGHT[0].store(f.esr, Ordering::SeqCst);
                CAUGHT[1].store(f.far, Ordering::SeqCst);
                CAUGHT[2].store(f.elr, Ordering::SeqCst);
                CAUGHT_VALID.store(true, Ordering::SeqCst);
                f.elr = ksites_a64_fault_landing as *const () as u64;
                return;
            }
        }
        _ => {}
    }
    crate::println!(
        "FAULT: unexpected exception {} on CPU {}: ESR=0x{:x} (EC 0x{:x}) FAR=0x{:x} ELR=0x{:x} SPSR=0x{:x}",
        KINDS[(f.kind & 15) as usize],
        super::smp::cpu_index(),
        f.esr,
        (f.esr >> 26) & 0x3f,
        f.far,
        f.elr,
        f.spsr,
    );
    exit_qemu(false)
}

/// A `brk`: a ksites probe's (`is_probe_brk`) goes to `kernel_loader::probe::handle_brk`
/// with an `Int3Frame`, and its `pc`/`x0` are written back as the loader's aarch64 trap
/// module says; the platform's own `brk #PLATFORM_BRK_IMM` resumes after itself.
fn handle_brk(f: &mut ExceptionFrame) -> bool {
    if is_probe_brk(f.esr) {
        let mut frame = Int3Frame {
            pc: f.elr,
            lr: f.x[30],
            x0: f.x[0],
            x1: f.x[1],
            x2: f.x[2],
            x3: f.x[3],
            x4: f.x[4],
            x5: f.x[5],
        };
        // SAFETY: `frame` is this CPU's interrupted BRK context, and its pc and x0 are
        // written back before `eret` (below).
        if unsafe { kernel_loader::probe::handle_brk(&mut frame) } {
            f.elr = frame.pc;
            f.x[0] = frame.x0;
            return true;
        }
        return false;
    }
    if f.esr & 0xffff == PLATFORM_BRK_IMM {
        PLATFORM_BRKS.fetch_add(1, Ordering::SeqCst);
        f.elr += 4;
        return true;
    }
    if f.esr & 0xffff == CLOBBER_BRK_IMM {
        // What compiled handler code may do (this kernel is built with NEON on): use
        // vector registers and change FPCR. The exception entry must have saved them.
        // SAFETY: scratch registers only; FPCR.RMode changes rounding, restored by the
        // exception return path from the saved copy.
        unsafe {
            core::arch::asm!(
                "movi v0.16b, #0x5a",
                "movi v8.16b, #0x5a",
                "movi v31.16b, #0x5a",
                "mrs {t}, FPCR",
                "orr {t}, {t}, #(3 << 22)",
                "msr FPCR, {t}",
                t = out(reg) _,
                out("v0") _, out("v8") _, out("v31") _,
                options(nomem, nostack),
            )
        };
        f.elr += 4;
        return true;
    }
    false
}

/// `brk #CLOBBER_BRK_IMM`: resumed after itself by a handler that overwrites v0, v8 and
/// v31 and FPCR's rounding mode (`aarch64_exceptions_preserve_fp_simd_state`).
pub const CLOBBER_BRK_IMM: u64 = 0x7b;
