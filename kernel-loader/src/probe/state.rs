//! The registry's storage, shared by the registry operations, the batch protocol and the
//! lock-free dispatchers: the per-probe live state ([`STATES`]), the image slots, the
//! lock that serializes every change ([`Control`], only obtainable by [`lock`]), and the
//! trap counters.
//!
//! The lock-free readers run inside a read-side section (`percpu::Section`, which
//! [`with_image_at`] takes as proof); every change they may observe is published, then
//! waited out with the poker's `sync_cores` and `percpu::synchronize` ([`ProbeState::drain`],
//! [`free`]). Readers write nothing shared.
//!
//! Writers hold [`Control`]; readers under the lock borrow it (`&Control`), writers of a
//! slot's data borrow it mutably (`&mut Control`), so a reference obtained under the lock
//! cannot outlive it nor coexist with a write. Lock-free readers (the dispatchers and
//! the #BP hook) go through [`with_image_at`] and [`kernel_image`].
//!
//! `crate::key` shares it (the lock, the live images, the trap counters): a key batch
//! holds the same lock, so it serialises with probe batches and module load/unload.

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::percpu::{self, Section};
use super::{MAX_PROBES, ProbeId};
use crate::format::Table;
use crate::patch::TextPoker;

/// Most images (the kernel and its loaded modules) the registry holds.
pub const MAX_IMAGES: usize = 32;

/// One probe's live state: read by every CPU that fires it, written only by the
/// registry's writers (so its cache line stays shared). Its hits are counted per CPU
/// (`percpu`).
pub(super) struct ProbeState {
    pub(super) enabled: AtomicBool,
    /// The `Handler`, as an address; 0 for none.
    pub(super) handler: AtomicUsize,
}

impl ProbeState {
    pub(super) const fn new() -> ProbeState {
        ProbeState {
            enabled: AtomicBool::new(false),
            handler: AtomicUsize::new(0),
        }
    }

    /// After a change of this probe's state was published (SeqCst) **and** the poker's
    /// `sync_cores` ran after it (a batch's rounds end with one): waits until no other
    /// CPU can still run the old state (the old handler, whose code may be a module's).
    /// It waits for every dispatcher section open on another CPU (not only this
    /// probe's): see `percpu::synchronize`. The caller holds the registry lock.
    pub(super) fn drain(&self) {
        percpu::synchronize();
    }

    /// Back to disabled, no handler, no hits (a probe id being given out or freed; no
    /// CPU can be counting a hit of it: it is disabled and was drained, or never used).
    pub(super) fn reset(&self, id: u32) {
        self.enabled.store(false, Ordering::Relaxed);
        self.handler.store(0, Ordering::Relaxed);
        percpu::reset_hits(id as usize);
    }
}

/// Every probe's state, by global id.
pub(super) static STATES: [ProbeState; MAX_PROBES] = [const { ProbeState::new() }; MAX_PROBES];
static IMAGES: [ImageSlot; MAX_IMAGES] = [const { ImageSlot::new() }; MAX_IMAGES];
/// Bit `i` set: module slot `i` (1..) may be live. Set after a slot goes live, cleared
/// before it is freed, so the dispatchers look only at those slots (one load when no
/// module is loaded) and still re-check each slot's state.
static LIVE_MODULES: AtomicU32 = AtomicU32::new(0);
const _: () = assert!(MAX_IMAGES <= 32, "LIVE_MODULES has one bit per slot");
static CONTROL: spin::Mutex<()> = spin::Mutex::new(());

/// The registry's id epoch, in the bits above a global id's (a multiple of
/// [`MAX_PROBES`], never 0): `ProbeRecord`s cache their global id tagged with it, and a
/// tag from another epoch is a miss. [`free`] moves to the next epoch once no CPU can
/// still be using the freed image, before its ids can be given out again, so a record
/// whose memory is registered again (at other ids) does not fire through its old cache
/// (unless exactly a multiple of 2^22 unloads happened in between, when the tag wraps).
pub(super) static ID_EPOCH: AtomicU32 = AtomicU32::new(MAX_PROBES as u32);
const _: () = assert!(
    MAX_PROBES.is_power_of_two(),
    "ID_EPOCH counts above the id bits"
);

/// Moves [`ID_EPOCH`] on (wrapping past 0, which an empty cache holds).
fn next_epoch(_lock: &mut Control) {
    let e = ID_EPOCH
        .load(Ordering::Relaxed)
        .wrapping_add(MAX_PROBES as u32);
    let e = if e == 0 { MAX_PROBES as u32 } else { e };
    ID_EPOCH.store(e, Ordering::SeqCst);
}

/// CPUs inside the #BP hook: a batch waits for it to drop to 0 (step 4 of the protocol).
pub(crate) static IN_INT3: AtomicU32 = AtomicU32::new(0);
/// Times the #BP hook emulated a probe site.
pub(crate) static INT3_EMULATIONS: AtomicU64 = AtomicU64::new(0);
/// Batches that waited for a CPU inside the #BP hook.
pub(crate) static INT3_DRAIN_WAITS: AtomicU64 = AtomicU64::new(0);

/// Proof that the caller holds the registry lock: only [`lock`] makes one, and the lock
/// is released when it drops. Functions that read slot data under the lock take
/// `&Control`; functions that write it take `&mut Control`.
pub(crate) struct Control {
    _guard: spin::MutexGuard<'static, ()>,
}

/// Takes the registry lock.
pub(crate) fn lock() -> Control {
    Control {
        _guard: CONTROL.lock(),
    }
}

const SLOT_FREE: u8 = 0;
const SLOT_LIVE: u8 = 1;

/// One registered table. Slot 0 is the kernel image, never removed; the others are
/// modules. `data` is written only through a `&mut Control` while the state is
/// `SLOT_FREE` (by [`free`] once no reader can be inside it; by [`publish`] before it
/// stores `SLOT_LIVE`); slot 0's data is written once, before it goes live.
///
/// Lock-free readers (the trap handler, the dispatchers) run inside a read-side section
/// (RCU-like, `percpu`): they find a module's slot by address through `start..end` and
/// read `data` only if they saw `SLOT_LIVE`, writing nothing. [`free`] stores
/// `SLOT_FREE`, serializes every CPU and waits for every section open before that
/// (`percpu::synchronize`), then clears `data`. (Unloading thus waits for CPUs inside any
/// probe, for the length of one handler call each, never for new fires.)
struct ImageSlot {
    state: AtomicU8,
    start: AtomicU64,
    end: AtomicU64,
    data: core::cell::UnsafeCell<Option<SlotData>>,
}

/// A live image: its table and where its ids start.
#[derive(Clone)]
pub(crate) struct SlotData {
    pub(crate) table: Table<'static>,
    /// Global id of the table's probe 0.
    pub(super) base: u32,
}

// SAFETY: `data` is written only by `publish` and `free`, which take `&mut Control` (so
// no reference from `ImageSlot::get` is alive). `free` stores `SLOT_FREE` (SeqCst),
// serializes every CPU and waits for every read-side section open before (see
// `percpu`), so no reader that saw `SLOT_LIVE` is still reading when it writes, and
// every later reader sees `SLOT_FREE`. `publish` writes only a `SLOT_FREE` slot: a
// reader reads `data` only after an Acquire load of `SLOT_LIVE`, which `publish` stores
// with Release after writing, so it reads the complete new data and never during the
// write. Slot 0, never freed, is read only after an Acquire load of `SLOT_LIVE`. Every
// other field is atomic.
unsafe impl Sync for ImageSlot {}

impl ImageSlot {
    const fn new() -> ImageSlot {
        ImageSlot {
            state: AtomicU8::new(SLOT_FREE),
            start: AtomicU64::new(0),
            end: AtomicU64::new(0),
            data: core::cell::UnsafeCell::new(None),
        }
    }

    /// The slot's data, if live, for as long as the lock is held.
    #[inline(always)]
    fn get<'c>(&'static self, _lock: &'c Control) -> Option<&'c SlotData> {
        if self.state.load(Ordering::Acquire) != SLOT_LIVE {
            return None;
        }
        // SAFETY: `data` is written only through `&mut Control` (`publish`, `free`);
        // `_lock` borrows the only `Control` there is for the returned lifetime, so no
        // write happens while the reference lives.
        unsafe { (*self.data.get()).as_ref() }
    }

    #[inline(always)]
    fn owns(&self, addr: u64) -> bool {
        self.start.load(Ordering::Acquire) <= addr && addr < self.end.load(Ordering::Acquire)
    }
}

/// Live images, kernel first.
pub(crate) fn images(lock: &Control) -> impl Iterator<Item = &SlotData> + Clone {
    IMAGES.iter().filter_map(move |s| s.get(lock))
}

/// The kernel image's data, if registered. Lock-free.
#[inline(always)]
pub(super) fn kernel_image() -> Option<&'static SlotData> {
    let slot = &IMAGES[0];
    if slot.state.load(Ordering::Acquire) != SLOT_LIVE {
        return None;
    }
    // SAFETY: slot 0 is published once (`publish` writes `data`, then stores
    // `SLOT_LIVE` with Release, read above with Acquire) and never freed: only module
    // slots (1..) are ever passed to `free`. So once live, its data is never written.
    unsafe { (*slot.data.get()).as_ref() }
}

/// Runs `f` on the image owning address `addr`: the module whose memory contains it,
/// else the kernel. Lock-free (trap handler and dispatchers), and writes nothing: the
/// caller's open section `_sec` is what [`free`] waits for.
#[inline(always)]
pub(super) fn with_image_at<R>(
    _sec: &Section,
    addr: u64,
    f: impl FnOnce(&SlotData) -> R,
) -> Option<R> {
    let mut live = LIVE_MODULES.load(Ordering::Acquire);
    while live != 0 {
        let i = live.trailing_zeros() as usize;
        live &= live - 1;
        let Some(slot) = IMAGES.get(i) else { break };
        if i == 0 || slot.state.load(Ordering::Acquire) != SLOT_LIVE || !slot.owns(addr) {
            continue;
        }
        // SAFETY: seen live (Acquire) inside the section `_sec`: `free` waits for the
        // section to end before it writes `data`, and `publish` only writes free slots.
        return unsafe { (*slot.data.get()).as_ref() }.map(f);
    }
    kernel_image().map(f)
}

/// The image holding global probe `id`, and the probe's index in its table.
pub(super) fn image_of(id: ProbeId, lock: &Control) -> Option<(&SlotData, u32)> {
    images(lock).find_map(|d| {
        let local = id.0.checked_sub(d.base)?;
        (local < d.table.probe_count()).then_some((d, local))
    })
}

/// The first run of `n` global ids no live image uses (first fit).
pub(super) fn free_ids(n: u32, lock: &Control) -> Option<u32> {
    let mut start = 0u32;
    loop {
        let end = start.checked_add(n)?;
        if end as usize > MAX_PROBES {
            return None;
        }
        match images(lock).find(|d| d.base < end && start < d.base + d.table.probe_count()) {
            None => return Some(start),
            Some(d) => start = d.base + d.table.probe_count(),
        }
    }
}

/// Whether the kernel's slot (0) is live.
pub(crate) fn kernel_registered(lock: &Control) -> bool {
    IMAGES[0].get(lock).is_some()
}

/// A free module slot (1..), if any.
pub(super) fn free_module_slot(_lock: &Control) -> Option<usize> {
    (1..MAX_IMAGES).find(|&i| IMAGES[i].state.load(Ordering::Acquire) == SLOT_FREE)
}

/// Fills free slot `slot` (0 for the kernel) and makes it live, its probes reset.
/// `range` is the module's memory (`0..0` for the kernel).
pub(super) fn publish(
    slot: usize,
    table: Table<'static>,
    base: u32,
    range: Range<u64>,
    _lock: &mut Control,
) {
    let sl = &IMAGES[slot];
    debug_assert_eq!(sl.state.load(Ordering::Acquire), SLOT_FREE);
    for i in base..base + table.probe_count() {
        STATES[i as usize].reset(i);
    }
    // SAFETY: the slot is free (callers found it so under the lock, and only lock
    // holders make a slot live), so no lock-free reader looks at its data; `_lock` is
    // borrowed mutably, so no reference from `ImageSlot::get` is alive.
    unsafe { *sl.data.get() = Some(SlotData { table, base }) };
    sl.start.store(range.start, Ordering::Release);
    sl.end.store(range.end, Ordering::Release);
    sl.state.store(SLOT_LIVE, Ordering::Release);
    if slot != 0 {
        LIVE_MODULES.fetch_or(1 << slot, Ordering::SeqCst);
    }
}

/// Frees module slot `slot` (1..), waiting for lock-free readers that may still be
/// inside it (`poker.sync_cores`, then `percpu::synchronize`), and resets the probes
/// `ids`.
pub(super) fn free<P: TextPoker + ?Sized>(
    slot: usize,
    ids: impl Iterator<Item = ProbeId>,
    poker: &mut P,
    _lock: &mut Control,
) {
    // The kernel's slot is never freed: callers pass a module's handle (`base` 1..).
    debug_assert!(slot != 0, "the kernel's slot is never freed");
    let Some(sl) = IMAGES.get(slot).filter(|_| slot != 0) else {
        return;
    };
    LIVE_MODULES.fetch_and(!(1 << slot), Ordering::SeqCst);
    sl.state.store(SLOT_FREE, Ordering::SeqCst);
    // Every CPU serializes (so each either sees `SLOT_FREE` from here on, or its open
    // section is visible to the wait), then wait for the sections open before.
    poker.sync_cores();
    percpu::synchronize();
    // No section that may have cached one of its ids is open: caches from now on are
    // of the next epoch.
    next_epoch(_lock);
    sl.start.store(0, Ordering::Release);
    sl.end.store(0, Ordering::Release);
    // SAFETY: the slot is free and no lock-free reader is inside it (above); `_lock` is
    // borrowed mutably, so no reference from `ImageSlot::get` is alive.
    unsafe { *sl.data.get() = None };
    for id in ids {
        if let Some(st) = STATES.get(id.0 as usize) {
            st.reset(id.0);
        }
    }
}

// For ifunc retargeting (`crate::ifunc`), a writer and a #BP hook outside `probe`.

/// The registry lock held by a writer outside `probe` (an ifunc retarget), with read
/// access to the live images' tables for as long as it is held.
pub(crate) struct ImagesLock(Control);

impl ImagesLock {
    /// The live images' tables, kernel first.
    pub(crate) fn tables(&self) -> impl Iterator<Item = &Table<'static>> {
        images(&self.0).map(|d| &d.table)
    }

    /// Waits until no CPU is inside the #BP hook (the last step of a live batch).
    pub(crate) fn wait_for_int3(&self) {
        if IN_INT3.load(Ordering::Acquire) != 0 {
            INT3_DRAIN_WAITS.fetch_add(1, Ordering::Relaxed);
            while IN_INT3.load(Ordering::Acquire) != 0 {
                core::hint::spin_loop();
            }
        }
    }
}

/// Takes the registry lock for a writer outside `probe`.
pub(crate) fn lock_images() -> ImagesLock {
    ImagesLock(lock())
}

/// Runs `f` on the table of the live image owning `addr` (a module whose memory holds
/// it, else the kernel) inside a read-side section of its own. Lock-free: for the #BP
/// hook (x86-64's: the one architecture whose retarget writes traps).
#[cfg(target_arch = "x86_64")]
pub(crate) fn with_table_at<R>(addr: u64, f: impl FnOnce(&Table<'static>) -> R) -> Option<R> {
    let sec = percpu::enter();
    with_image_at(&sec, addr, |d| f(&d.table))
}
