//! Secondary harts and the synchronisation round.
//!
//! CPU 0 (the boot hart) starts each other hart the device tree lists with SBI HSM
//! `hart_start` at `_secondary_start` (`boot.rs`), passing its CPU index (kept in `tp`:
//! [`cpu_index`]). A secondary turns paging on, reports in ([`online`]), enables
//! supervisor software interrupts and waits (`wfi`) for work ([`start_job`]).
//! [`sync_cores`] is `TextPoker::sync_cores` for this kernel: a `fence.i` here, then an
//! SBI IPI to every other online hart, whose handler runs `fence.i` and acknowledges; it
//! returns once every online hart has acknowledged this round.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::{dt, sbi, timer};

/// CPUs this kernel can run.
pub const MAX_CPUS: usize = 8;
/// Bytes of each secondary hart's stack.
pub const STACK_SIZE: usize = 32 * 1024;
/// `sie.SSIE` / `sip.SSIP`: supervisor software interrupts (IPIs).
const SSI: u64 = 1 << 1;

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static ONLINE_COUNT: AtomicU32 = AtomicU32::new(1);
/// Per CPU index: its hart id (`usize::MAX`: none yet). CPU 0's is set by [`init_boot_hart`].
static HART_OF: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(usize::MAX) }; MAX_CPUS];
/// The round [`sync_cores`] is waiting for.
static ROUND: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the last round its IPI handler acknowledged.
static ACKED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: IPIs handled (each runs `fence.i`).
pub static IPIS_HANDLED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The aarch64 platform's name for [`IPIS_HANDLED`] (its IPIs are GIC SGIs), so tests
/// shared between the platforms use one name.
pub use self::IPIS_HANDLED as SGIS_HANDLED;

unsafe extern "C" {
    fn _secondary_start();
}

/// The running CPU's index (0 = the boot hart), kept in `tp` (`boot.rs` sets it before
/// any Rust runs; compiled code never changes it: the target has no thread-local
/// storage).
pub fn cpu_index() -> usize {
    let tp: usize;
    // SAFETY: reading a register.
    unsafe { core::arch::asm!("mv {}, tp", out(reg) tp, options(nomem, nostack)) };
    tp
}

/// The hart id of CPU `cpu`, if it has one.
pub fn hart_of(cpu: usize) -> Option<usize> {
    HART_OF
        .get(cpu)
        .map(|h| h.load(Ordering::SeqCst))
        .filter(|&h| h != usize::MAX)
}

/// Records the boot hart's id as CPU 0's and enables IPIs on it (interrupts stay off
/// until the first wait). Call once on CPU 0.
pub fn init_boot_hart(hartid: usize) {
    HART_OF[0].store(hartid, Ordering::SeqCst);
    // SAFETY: enabling the software interrupt source; sstatus.SIE gates delivery.
    unsafe { core::arch::asm!("csrs sie, {}", in(reg) SSI, options(nomem, nostack)) };
}

/// CPUs online (CPU 0 included).
pub fn online() -> u32 {
    ONLINE_COUNT.load(Ordering::SeqCst)
}

/// Whether CPU `i` reported in.
pub fn is_online(i: usize) -> bool {
    i == 0 || ONLINE.get(i).is_some_and(|o| o.load(Ordering::SeqCst))
}

/// What [`start_secondaries`] found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Started {
    /// Harts SBI accepted `hart_start` for (CPU 0 not counted).
    pub accepted: u32,
    /// SBI's error for the first hart it refused, or 0.
    pub stop_status: i64,
    /// Harts that did not report in within [`ACK_TIMEOUT_US`].
    pub missing: u32,
}

/// Starts every hart of the device tree but the boot hart, as CPUs 1, 2…, with SBI HSM
/// `hart_start`, and waits for each to report in. Call once, on CPU 0, after
/// `mmu::init` and `dt::init`.
pub fn start_secondaries() -> Started {
    let mut s = Started::default();
    let Some(m) = dt::machine() else {
        return s;
    };
    let boot = hart_of(0);
    let others = m.harts().iter().filter(|&&h| Some(h) != boot);
    for (cpu, &hart) in (1..MAX_CPUS).zip(others) {
        HART_OF[cpu].store(hart, Ordering::SeqCst);
        let status = sbi::hart_start(hart, _secondary_start as *const () as usize, cpu);
        if status != 0 {
            HART_OF[cpu].store(usize::MAX, Ordering::SeqCst);
            s.stop_status = status as i64;
            break;
        }
        s.accepted += 1;
        if !timer::wait_until(ACK_TIMEOUT_US, || ONLINE[cpu].load(Ordering::SeqCst)) {
            s.missing += 1;
        }
    }
    s
}

/// A secondary hart's Rust entry (paging on, stack and `tp` set, interrupts off).
#[unsafe(no_mangle)]
extern "C" fn secondary_main(_hartid: usize) -> ! {
    let cpu = cpu_index();
    super::ksites_simd_state();
    // SAFETY: enabling the software interrupt source (IPIs); sstatus.SIE gates it.
    unsafe { core::arch::asm!("csrs sie, {}", in(reg) SSI, options(nomem, nostack)) };
    ONLINE[cpu].store(true, Ordering::SeqCst);
    ONLINE_COUNT.fetch_add(1, Ordering::SeqCst);
    let mut seen = 0;
    loop {
        // Interrupts off while checking for work, so an IPI between the check and the
        // `wfi` is not lost: it stays pending, and `wfi` returns at once (it waits for
        // an interrupt pending and enabled in `sie`, whatever sstatus.SIE says).
        // SAFETY: clears sstatus.SIE on this hart only.
        unsafe { core::arch::asm!("csrci sstatus, 2", options(nomem, nostack)) };
        let job = JOB_ROUND.load(Ordering::Acquire);
        if job == seen {
            riscv::asm::wfi();
        }
        // SAFETY: sets sstatus.SIE: a pending IPI is taken here (its handler only
        // touches this module's atomics and runs `fence.i`).
        unsafe { core::arch::asm!("csrsi sstatus, 2", options(nomem, nostack)) };
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
    }
}

/// How long [`sync_cores`] waits for each CPU's acknowledgement, in microseconds: 10 s
/// (QEMU's vCPU threads share a loaded host's cores).
pub const ACK_TIMEOUT_US: u64 = 10_000_000;

/// The job the other CPUs run (a `fn(usize)` as `usize`; 0 = none).
static JOB: AtomicUsize = AtomicUsize::new(0);
/// Bumped by every [`start_job`].
static JOB_ROUND: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the last job round it finished.
static JOB_DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The hart mask (bit = hart id) of every online CPU but this one.
fn others_mask() -> u64 {
    let me = cpu_index();
    (0..MAX_CPUS)
        .filter(|&c| c != me && is_online(c))
        .filter_map(hart_of)
        .filter(|&h| h < 64)
        .fold(0, |m, h| m | (1 << h))
}

/// Makes every other online CPU run `job(cpu)` once, from its idle loop (interrupts on,
/// so synchronisation rounds still reach it), and returns at once; see [`wait_job`].
/// CPU 0 only, one job at a time.
pub fn start_job(job: fn(usize)) -> u64 {
    JOB.store(job as usize, Ordering::Release);
    let round = JOB_ROUND.fetch_add(1, Ordering::AcqRel) + 1;
    let others = others_mask();
    if others != 0 {
        // Wakes them from `wfi` (the handler's `fence.i` does no harm).
        sbi::send_ipi(others);
    }
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

/// The supervisor software interrupt: clear it, `fence.i`, record the round.
pub fn handle_ipi() {
    // SAFETY: clears this hart's pending software interrupt (OpenSBI set sip.SSIP).
    unsafe { core::arch::asm!("csrc sip, {}", in(reg) SSI, options(nomem, nostack)) };
    let cpu = cpu_index();
    riscv::asm::fence_i();
    IPIS_HANDLED[cpu].fetch_add(1, Ordering::SeqCst);
    ACKED[cpu].store(ROUND.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// Rounds [`sync_cores`] ran.
pub static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// One synchronisation round: a `fence.i` on every online hart, this one included,
/// before it returns. CPU 0 only (one patcher at a time). Panics if a hart does not
/// acknowledge within [`ACK_TIMEOUT_US`] (a lost IPI is a kernel bug).
pub fn sync_cores() {
    ROUNDS.fetch_add(1, Ordering::SeqCst);
    fence_round();
}

/// Rounds [`tear_barrier`] ran (not counted in [`ROUNDS`]).
pub static TEAR_ROUNDS: AtomicU64 = AtomicU64::new(0);

/// The round of [`sync_cores`], not counted as a synchronisation round: `mmu::write_text`
/// runs it between the two stores of a disable that QEMU could fetch torn (see
/// `mmu::tears_harmfully`). CPU 0 only.
pub fn tear_barrier() {
    TEAR_ROUNDS.fetch_add(1, Ordering::SeqCst);
    fence_round();
}

/// `fence.i` here, an IPI to every other online hart, and the wait for their
/// acknowledgements (each handler runs `fence.i`).
fn fence_round() {
    riscv::asm::fence_i();
    let round = ROUND.fetch_add(1, Ordering::SeqCst) + 1;
    let me = cpu_index();
    let others = others_mask();
    if others != 0 {
        // The SBI call is an `ecall`: the stores of the patch (and ROUND) are ordered
        // before it by the fence.
        // SAFETY: a fence only.
        unsafe { core::arch::asm!("fence rw, rw", options(nostack)) };
        sbi::send_ipi(others);
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
