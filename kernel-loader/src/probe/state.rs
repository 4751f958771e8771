//! The registry's storage, shared by the registry operations, the batch protocol and the
//! lock-free dispatchers: the per-probe live state ([`STATES`]), the image slots, the
//! lock that serializes every change ([`Control`], only obtainable by [`lock`]), and the
//! trap counters.
//!
//! Writers hold [`Control`]; readers under the lock borrow it (`&Control`), writers of a
//! slot's data borrow it mutably (`&mut Control`), so a reference obtained under the lock
//! cannot outlive it nor coexist with a write. Lock-free readers (the dispatchers and
//! the #BP hook) go through [`with_image_at`] and [`kernel_image`].

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::{MAX_PROBES, ProbeId};
use crate::format::Table;

/// Most images (the kernel and its loaded modules) the registry holds.
pub const MAX_IMAGES: usize = 32;

/// One probe's live state.
pub(super) struct ProbeState {
    pub(super) enabled: AtomicBool,
    /// The `Handler`, as an address; 0 for none.
    pub(super) handler: AtomicUsize,
    pub(super) hits: AtomicU64,
    /// CPUs inside `fire` for this probe (from before the `enabled` check until the
    /// handler returned): a disable, or a handler change, waits for it to drain, so when
    /// it returns no CPU runs the old handler any more (its code may be a module's).
    pub(super) inflight: AtomicU32,
}

impl ProbeState {
    const fn new() -> ProbeState {
        ProbeState {
            enabled: AtomicBool::new(false),
            handler: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
        }
    }

    /// Waits until no CPU is inside `fire` for this probe.
    pub(super) fn drain(&self) {
        while self.inflight.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
    }

    /// Back to disabled, no handler, no hits (a probe id being given out or freed).
    pub(super) fn reset(&self) {
        self.enabled.store(false, Ordering::Relaxed);
        self.handler.store(0, Ordering::Relaxed);
        self.hits.store(0, Ordering::Relaxed);
    }
}

/// Every probe's state, by global id.
pub(super) static STATES: [ProbeState; MAX_PROBES] = [const { ProbeState::new() }; MAX_PROBES];
static IMAGES: [ImageSlot; MAX_IMAGES] = [const { ImageSlot::new() }; MAX_IMAGES];
static CONTROL: spin::Mutex<()> = spin::Mutex::new(());

/// CPUs inside the #BP hook: a batch waits for it to drop to 0 (step 4 of the protocol).
pub(super) static IN_INT3: AtomicU32 = AtomicU32::new(0);
/// Times the #BP hook emulated a probe site.
pub(super) static INT3_EMULATIONS: AtomicU64 = AtomicU64::new(0);
/// Batches that waited for a CPU inside the #BP hook.
pub(super) static INT3_DRAIN_WAITS: AtomicU64 = AtomicU64::new(0);

/// Proof that the caller holds the registry lock: only [`lock`] makes one, and the lock
/// is released when it drops. Functions that read slot data under the lock take
/// `&Control`; functions that write it take `&mut Control`.
pub(super) struct Control {
    _guard: spin::MutexGuard<'static, ()>,
}

/// Takes the registry lock.
pub(super) fn lock() -> Control {
    Control {
        _guard: CONTROL.lock(),
    }
}

const SLOT_FREE: u8 = 0;
const SLOT_LIVE: u8 = 1;

/// One registered table. Slot 0 is the kernel image, never removed; the others are
/// modules. `data` is written only through a `&mut Control` while the state is
/// `SLOT_FREE` (by [`free`] once `readers` drained; by [`publish`] before it stores
/// `SLOT_LIVE`); slot 0's data is written once, before it goes live.
///
/// Lock-free readers (the trap handler, the dispatchers) find a module's slot by
/// address through `start..end`, then count themselves in `readers` and re-check the
/// state before touching `data` (a hazard count, per slot, so unloading one module
/// waits only for CPUs inside *that* module's data, never for the steady traffic of
/// other probes); [`free`] frees the slot, then waits for `readers` to drain.
struct ImageSlot {
    state: AtomicU8,
    readers: AtomicU32,
    start: AtomicU64,
    end: AtomicU64,
    data: core::cell::UnsafeCell<Option<SlotData>>,
}

/// A live image: its table and where its ids start.
#[derive(Clone)]
pub(super) struct SlotData {
    pub(super) table: Table<'static>,
    /// Global id of the table's probe 0.
    pub(super) base: u32,
}

// SAFETY: `data` is written only by `publish` and `free`, which take `&mut Control` (so
// no reference from `ImageSlot::get` is alive). `free` stores `SLOT_FREE` (SeqCst), then
// waits for `readers` to drain before writing, so no counted-in reader is reading.
// `publish` writes only a `SLOT_FREE` slot and does not wait for `readers`: a reader
// counted in meanwhile re-checks `state` (SeqCst) and reads `data` only if it then sees
// `SLOT_LIVE`, which `publish` stores with Release after writing, so it reads the
// complete new data and never during the write. Slot 0, never freed, is read only after
// an Acquire load of `SLOT_LIVE`. Every other field is atomic.
unsafe impl Sync for ImageSlot {}

impl ImageSlot {
    const fn new() -> ImageSlot {
        ImageSlot {
            state: AtomicU8::new(SLOT_FREE),
            readers: AtomicU32::new(0),
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
pub(super) fn images(lock: &Control) -> impl Iterator<Item = &SlotData> {
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
/// else the kernel. Lock-free (trap handler and dispatchers).
#[inline(always)]
pub(super) fn with_image_at<R>(addr: u64, f: impl FnOnce(&SlotData) -> R) -> Option<R> {
    for slot in &IMAGES[1..] {
        if slot.state.load(Ordering::Acquire) != SLOT_LIVE || !slot.owns(addr) {
            continue;
        }
        slot.readers.fetch_add(1, Ordering::SeqCst);
        // Re-check after counting in: a concurrent `free` either sees the count, or
        // freed the slot before it, which the re-check sees.
        let r = if slot.state.load(Ordering::SeqCst) == SLOT_LIVE && slot.owns(addr) {
            // SAFETY: live and counted in: `free` waits for `readers` to be 0 before it
            // writes `data`, and `publish` only writes free slots.
            unsafe { (*slot.data.get()).as_ref() }.map(f)
        } else {
            None
        };
        slot.readers.fetch_sub(1, Ordering::Release);
        return r;
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
pub(super) fn kernel_registered(lock: &Control) -> bool {
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
        STATES[i as usize].reset();
    }
    // SAFETY: the slot is free (callers found it so under the lock, and only lock
    // holders make a slot live), so no lock-free reader looks at its data; `_lock` is
    // borrowed mutably, so no reference from `ImageSlot::get` is alive.
    unsafe { *sl.data.get() = Some(SlotData { table, base }) };
    sl.start.store(range.start, Ordering::Release);
    sl.end.store(range.end, Ordering::Release);
    sl.state.store(SLOT_LIVE, Ordering::Release);
}

/// Frees module slot `slot` (1..), waiting for lock-free readers still inside it, and
/// resets the probes `ids`.
pub(super) fn free(slot: usize, ids: impl Iterator<Item = ProbeId>, _lock: &mut Control) {
    // The kernel's slot is never freed: callers pass a module's handle (`base` 1..).
    debug_assert!(slot != 0, "the kernel's slot is never freed");
    if slot == 0 {
        return;
    }
    let sl = &IMAGES[slot];
    sl.state.store(SLOT_FREE, Ordering::SeqCst);
    // A reader counts itself in, then re-checks the state: once the count is 0 after the
    // store above, no reader holds this slot's data, and none will.
    while sl.readers.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    sl.start.store(0, Ordering::Release);
    sl.end.store(0, Ordering::Release);
    // SAFETY: the slot is free and no lock-free reader is inside it (above); `_lock` is
    // borrowed mutably, so no reference from `ImageSlot::get` is alive.
    unsafe { *sl.data.get() = None };
    for id in ids {
        STATES[id.0 as usize].reset();
    }
}
