//! Secondary CPUs and the synchronisation round.
//!
//! CPU 0 starts each other CPU with PSCI `CPU_ON` at `_secondary_start` (`boot.rs`),
//! passing the top of that CPU's stack. A secondary turns its MMU on, enables its SIMD
//! state and its GIC CPU interface, reports in ([`online`]), unmasks IRQs and waits
//! (`wfe`) for work ([`start_job`]). [`sync_cores`] is `TextPoker::sync_cores` for this
//! kernel: an `isb` here, then SGI [`SYNC_SGI`] to every other CPU, whose handler runs
//! `isb` and acknowledges; it returns once every online CPU has acknowledged this round.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use kernel_loader::arch::aarch64::isb;

use super::{gic, psci, timer};

/// CPUs this kernel can run (QEMU `virt` numbers them MPIDR.Aff0 = 0, 1, 2…).
pub const MAX_CPUS: usize = 8;
/// The SGI of a synchronisation round.
pub const SYNC_SGI: u32 = 1;
const STACK_SIZE: usize = 32 * 1024;

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// The secondaries' stacks (`_secondary_start` gets the top of its own).
static mut STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static ONLINE_COUNT: AtomicU32 = AtomicU32::new(1);
/// The round [`sync_cores`] is waiting for.
static ROUND: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the last round its SGI handler acknowledged.
static ACKED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: synchronisation SGIs handled.
pub static SGIS_HANDLED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

unsafe extern "C" {
    fn _secondary_start();
}

/// The running CPU's index: MPIDR_EL1.Aff0.
pub fn cpu_index() -> usize {
    let mpidr: u64;
    // SAFETY: reading MPIDR_EL1 at EL1 has no side effect.
    unsafe { core::arch::asm!("mrs {}, MPIDR_EL1", out(reg) mpidr, options(nomem, nostack)) };
    (mpidr & 0xff) as usize
}

/// CPUs online (CPU 0 included).
pub fn online() -> u32 {
    ONLINE_COUNT.load(Ordering::SeqCst)
}

/// Whether CPU `i` reported in.
pub fn is_online(i: usize) -> bool {
    i == 0 || ONLINE[i].load(Ordering::SeqCst)
}

/// What [`start_secondaries`] found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Started {
    /// CPUs PSCI accepted `CPU_ON` for (CPU 0 not counted).
    pub accepted: u32,
    /// PSCI's answer for the first MPIDR that is not a CPU (`INVALID_PARAMETERS`), or 0
    /// if all [`MAX_CPUS`] exist.
    pub stop_status: i64,
    /// CPUs that did not report in within a second.
    pub missing: u32,
}

/// Starts CPUs 1, 2… with PSCI `CPU_ON` until PSCI says an MPIDR is not a CPU, and waits
/// (≤ 1 s each) for each to report in. Call once, on CPU 0, after `mmu::init`.
pub fn start_secondaries() -> Started {
    let mut s = Started::default();
    for (cpu, online) in ONLINE.iter().enumerate().skip(1) {
        // SAFETY: computes an address inside STACKS without creating a reference.
        let top = unsafe { core::ptr::addr_of!(STACKS.0[cpu]) as u64 } + STACK_SIZE as u64;
        let status = psci::cpu_on(cpu as u64, _secondary_start as *const () as u64, top);
        if status != 0 {
            s.stop_status = status;
            break;
        }
        s.accepted += 1;
        if !timer::wait_until(ACK_TIMEOUT_US, || online.load(Ordering::SeqCst)) {
            s.missing += 1;
        }
    }
    s
}

/// A secondary CPU's Rust entry (MMU on, stack set, IRQs masked).
#[unsafe(no_mangle)]
extern "C" fn secondary_main() -> ! {
    let cpu = cpu_index();
    // SAFETY: EL1, nothing on this CPU has used FP/SIMD state yet.
    unsafe { kernel_loader::arch::aarch64::enable_simd_state() };
    gic::init_cpu();
    ONLINE[cpu].store(true, Ordering::SeqCst);
    ONLINE_COUNT.fetch_add(1, Ordering::SeqCst);
    // SAFETY: unmasking IRQs lets the SGI handler run (it only touches this module's
    // atomics and the GIC).
    unsafe { core::arch::asm!("msr daifclr, #2", options(nomem, nostack)) };
    let mut seen = 0;
    loop {
        let job = JOB_ROUND.load(Ordering::Acquire);
        if job != seen {
            seen = job;
            let f = JOB.load(Ordering::Acquire);
            if f != 0 {
                // SAFETY: JOB only ever holds 0 or a `fn(usize)` stored by `start_job`.
                let f = unsafe { core::mem::transmute::<usize, fn(usize)>(f) };
                f(cpu);
            }
            JOB_DONE[cpu].store(job, Ordering::Release);
        }
        // SAFETY: waits for an event (`start_job`'s `sev`) or an interrupt; a `sev`
        // between the check above and here leaves the event register set, so the
        // `wfe` returns at once.
        unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
    }
}

/// How long [`sync_cores`] waits for each CPU's acknowledgement, in microseconds of the
/// virtual counter: 10 s (two runs on a host at load 6.5 once needed more than 1 s).
pub const ACK_TIMEOUT_US: u64 = 10_000_000;

/// The job the other CPUs run (a `fn(usize)` as `usize`; 0 = none).
static JOB: AtomicUsize = AtomicUsize::new(0);
/// Bumped by every [`start_job`].
static JOB_ROUND: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the last job round it finished.
static JOB_DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Makes every other online CPU run `job(cpu)` once, from its idle loop (IRQs
/// unmasked, so synchronisation rounds still reach it), and returns at once; see
/// [`wait_job`]. CPU 0 only, one job at a time.
pub fn start_job(job: fn(usize)) -> u64 {
    JOB.store(job as usize, Ordering::Release);
    let round = JOB_ROUND.fetch_add(1, Ordering::AcqRel) + 1;
    // SAFETY: `dsb` orders the stores before the event; `sev` wakes CPUs in `wfe`.
    unsafe { core::arch::asm!("dsb ish", "sev", options(nostack)) };
    round
}

/// Waits (≤ `micros` µs) until every other online CPU finished job `round`; returns
/// whether they all did.
pub fn wait_job(round: u64, micros: u64) -> bool {
    let me = cpu_index();
    (0..MAX_CPUS)
        .filter(|&c| c != me && is_online(c))
        .all(|c| timer::wait_until(micros, || JOB_DONE[c].load(Ordering::Acquire) >= round))
}

/// The IRQ vector: acknowledge, handle a synchronisation SGI (`isb`, then record the
/// round), end the interrupt.
pub fn handle_irq() {
    let iar = gic::acknowledge();
    let id = iar & 0x3ff;
    if id == gic::SPURIOUS {
        return;
    }
    if id == SYNC_SGI {
        let cpu = cpu_index();
        isb();
        SGIS_HANDLED[cpu].fetch_add(1, Ordering::SeqCst);
        ACKED[cpu].store(ROUND.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    gic::end_of_interrupt(iar);
}

/// Rounds [`sync_cores`] ran.
pub static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// One synchronisation round: a context synchronisation event (`isb`) on every online
/// CPU, this one included, before it returns. CPU 0 only (one patcher at a time).
/// Panics if a CPU does not acknowledge within [`ACK_TIMEOUT_US`] (a lost IPI is a
/// kernel bug; the bound is generous because QEMU's vCPU threads share a loaded host's
/// cores, and idle CPUs in `wfe` keep spinning there).
pub fn sync_cores() {
    isb();
    ROUNDS.fetch_add(1, Ordering::SeqCst);
    let round = ROUND.fetch_add(1, Ordering::SeqCst) + 1;
    let me = cpu_index();
    if online() > 1 {
        // Make the patch (and ROUND) visible before the SGI.
        // SAFETY: a barrier only.
        unsafe { core::arch::asm!("dsb ish", options(nostack)) };
        gic::send_sgi_to_others(SYNC_SGI);
    }
    for cpu in (0..MAX_CPUS).filter(|&c| c != me && is_online(c)) {
        let acked = timer::wait_until(ACK_TIMEOUT_US, || {
            ACKED[cpu].load(Ordering::SeqCst) >= round
        });
        assert!(
            acked,
            "sync_cores: CPU {cpu} did not acknowledge round {round}"
        );
    }
}
