//! The sequence word of the live key and retarget stress tests ([`crate::key_tests`],
//! [`crate::retarget_tests`]), and the APs' start and stop around them.
//!
//! CPU 0 changes one thing (a key's state, an ifunc's target) in batches; around each
//! it bumps a [`Seq`]: odd while the batch is in flight, even (2 × batches done) once it
//! returned. An AP reads the word before and after a call: if both reads are the same
//! even number, no batch overlapped the call and it must have seen exactly the state
//! that count of batches left ([`Seq::settled`]); otherwise it may have seen any state
//! the thing had during the call (the old or the new one).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::harness::Msg;
use crate::{cpu, msg, smp};

/// How long a worker naps between passes at most (it wakes at once on an IPI); see
/// `smp_tests` (`NAP_US`): QEMU needs the naps to schedule a CPU that must answer a
/// sync IPI.
pub(crate) const NAP_US: u32 = 100;

/// The batch sequence word (see the module documentation).
pub(crate) struct Seq(AtomicU64);

impl Seq {
    /// Zero batches done.
    pub(crate) const fn new() -> Seq {
        Seq(AtomicU64::new(0))
    }

    /// Back to zero (no AP may be reading it).
    pub(crate) fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// Before a batch: the word becomes odd.
    pub(crate) fn begin(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// After a batch returned: the word becomes even again.
    pub(crate) fn end(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// The word now.
    pub(crate) fn read(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// For a call between reads `before` and `after`: the number of batches done
    /// throughout it, if no batch overlapped it.
    pub(crate) fn settled(before: u64, after: u64) -> Option<u64> {
        (before == after && before.is_multiple_of(2)).then_some(before / 2)
    }
}

/// The APs' start and stop flags for one stress job.
pub(crate) struct Crew {
    stop: AtomicBool,
    started: AtomicUsize,
}

impl Crew {
    /// Nobody started.
    pub(crate) const fn new() -> Crew {
        Crew {
            stop: AtomicBool::new(false),
            started: AtomicUsize::new(0),
        }
    }

    /// Posts `job` to every AP and waits (up to 5 s) until each reported in through
    /// [`Crew::started`].
    pub(crate) fn start(&self, job: fn(usize)) -> Result<(), Msg> {
        self.stop.store(false, Ordering::SeqCst);
        self.started.store(0, Ordering::SeqCst);
        smp::run_on_aps(job);
        let aps = smp::online() - 1;
        let deadline = cpu::rdtsc() + 5_000 * crate::smp_tests::tsc_per_ms();
        while self.started.load(Ordering::Acquire) < aps {
            if cpu::rdtsc() > deadline {
                self.stop.store(true, Ordering::SeqCst);
                let _ = smp::wait_aps(4_000_000_000);
                return Err(msg!(
                    "only {} of {aps} APs started their worker",
                    self.started.load(Ordering::Relaxed)
                ));
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Called by a worker once it runs.
    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the workers must stop.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Tells the workers to stop and waits for them.
    pub(crate) fn stop(&self) -> Result<(), Msg> {
        self.stop.store(true, Ordering::SeqCst);
        smp::wait_aps(4_000_000_000).map_err(|cpu| msg!("CPU {cpu} did not stop its worker"))
    }
}

/// Milliseconds since `t0` (a TSC reading).
pub(crate) fn ms_since(t0: u64) -> u64 {
    (cpu::rdtsc() - t0) / crate::smp_tests::tsc_per_ms()
}
