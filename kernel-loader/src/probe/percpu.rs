//! The dispatchers' read-side sections, per CPU, and the per-CPU hit counters: firing a
//! probe writes nothing that another CPU writes, and a writer (disable, a live handler
//! change, module unload) can still wait for every CPU that may be using the old state.
//!
//! # The fire path
//!
//! With a CPU index installed ([`set_cpu_index_word`]: one load from the per-CPU base
//! register; or [`set_cpu_index`]: a hook, a call per fire), a dispatcher runs inside a
//! [`Section`] on its CPU's slot, whose one word holds the CPU's section depth (low 32
//! bits) and its count of outermost exits (high 32 bits). Entering adds 1 to the word
//! and keeps the old value `w`, in one instruction without `lock`
//! (`arch::native::local`, atomic against interrupts on this CPU); then the dispatcher
//! reads the registry (image slots, the probe's state), counts the hit in its CPU's own
//! counter and calls the handler. Leaving stores `w` back, plus one outermost exit if
//! `w`'s depth was 0: frames on one CPU are LIFO, so every frame that nested inside
//! (a probe fired by the handler, an interrupt) has already put the word back to `w + 1`
//! and the store loses nothing. A fire is one read-modify-write and one plain store on
//! this CPU's line, plus the hit; no fence. Each CPU writes only its own cache lines;
//! the registry it reads is written only by the (rare) writers, so those lines stay
//! shared. The writer pays for the ordering with an asymmetric barrier, the poker's
//! `sync_cores` (an IPI round in a kernel, `membarrier` on a host), as RCU-sched does.
//!
//! Without an index (no hook, or an index `>= MAX_CPUS`), a section counts itself in one
//! of two shared counters with atomic read-modify-writes, SRCU-style: correct on any
//! number of CPUs, just slower.
//!
//! # The writer's side ([`synchronize`])
//!
//! A writer (under the registry lock) publishes the new state with a SeqCst store, then
//! calls its poker's `sync_cores`, then [`synchronize`]. When that returns, every section
//! that may have read the old state has ended:
//!
//! * **Per-CPU slots.** `sync_cores` makes every CPU execute a serializing instruction and
//!   waits for it: each CPU's earlier stores (its section entries) are then visible to
//!   the writer, and each CPU's later loads see the published state. So a section that
//!   entered after that point reads the new state and needs no wait; one that entered
//!   before it is counted in the word the writer reads next. For each CPU the writer
//!   reads the word once: depth 0 means no section is active (all sections that started
//!   before the barrier have ended). Otherwise it spins until the word shows depth 0 or
//!   an outermost-exit count other than the one it read. That second exit is exact even
//!   with nesting: an outermost exit is stored at a moment when the CPU has no section
//!   active at all (every frame nested inside it has ended, LIFO), and a CPU's stores
//!   become visible in program order, so an exit the writer did not see at its first
//!   read comes after the entry of every section active then, and ends them all. A CPU
//!   that keeps firing does exit its outermost frame between fires, so the wait ends.
//! * **The shared counters.** The writer waits for the counter of the *other* phase (only
//!   sections that read the phase before the previous flip can still enter it: at most
//!   one per CPU), flips the phase, then waits for the counter of the old phase (again
//!   only stragglers enter it). A section counted in after the writer read its counter
//!   as 0 reads the state after the publish (everything is SeqCst), so it needs no wait;
//!   every section counted in before is waited for. New sections never delay the writer.
//!
//! The calling CPU's own slot is skipped: the writer cannot be inside a section on its
//! own CPU unless it was called from a probe handler (or an interrupt that interrupted
//! one), and then waiting for its own frame would never end. So a drain called from a
//! handler does **not** wait for the handler frames below it on the same CPU. Without a
//! CPU index (shared counters), a drain called from a handler deadlocks, as the
//! per-probe drain before it did for its own probe.
//!
//! Since every writer waits for every CPU inside any probe, a handler must not wait for
//! the registry lock (`info`, `lookup`, `enable`, …) while another CPU may be draining:
//! the drain holds the lock.

use core::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering, compiler_fence};

use super::MAX_PROBES;
use crate::arch::native::local;
use crate::arch::native::probe as arch;

/// Most CPU indices that get a slot of their own; a CPU whose index is at least this
/// fires through the shared (atomic) counters.
///
/// Each slot holds a `u64` hit counter for every probe ([`MAX_PROBES`]), so this costs
/// `MAX_CPUS * (8 * MAX_PROBES + 64)` bytes of `.bss` (528 KiB at 64 CPUs and 1024
/// probes). Counters stay 64-bit: at a few nanoseconds per fire a 32-bit one would wrap
/// within seconds.
pub const MAX_CPUS: usize = 64;

/// Returns the index of the CPU it runs on: see [`set_cpu_index`].
pub type CpuIndex = fn() -> usize;

/// One CPU's slot: its section word, its hit counters. Only that CPU writes it (with
/// [`local`] increments and plain stores); writers and [`hits`] read it.
#[repr(C, align(64))]
pub(super) struct Cpu {
    /// Sections active on this CPU, nested ones included (low 32 bits), and times that
    /// went back to 0 (high 32 bits, wrapping).
    word: AtomicU64,
    /// Hits per probe id, on this CPU.
    hits: [AtomicU64; MAX_PROBES],
}

/// A counter alone on its cache line.
#[repr(align(64))]
struct Line(AtomicU64);

static CPUS: [Cpu; MAX_CPUS] = [const {
    Cpu {
        word: AtomicU64::new(0),
        hits: [const { AtomicU64::new(0) }; MAX_PROBES],
    }
}; MAX_CPUS];

/// The [`CpuIndex`] hook, as an address; 0 for none.
static HOOK: AtomicUsize = AtomicUsize::new(0);
/// Sections counted in without a CPU slot, by phase.
static SHARED: [Line; 2] = [const { Line(AtomicU64::new(0)) }; 2];
/// Which of [`SHARED`] new sections count themselves in (its low bit).
static PHASE: AtomicUsize = AtomicUsize::new(0);
/// Hits counted without a CPU slot.
static SHARED_HITS: [AtomicU64; MAX_PROBES] = [const { AtomicU64::new(0) }; MAX_PROBES];

/// Installs the kernel's CPU index: the dispatchers then count in and out, and count
/// hits, on their own CPU's slot, with no locked instruction and no write to a cache
/// line another CPU writes. Without it (the default) they use shared atomic counters,
/// correct on any number of CPUs but a contended cache line on many.
///
/// May be called at any time, also while probes fire (each section remembers where it
/// counted itself in, and writers wait for both kinds); typically once at boot, before
/// the other CPUs start.
///
/// # Safety
///
/// `index` is callable from every context a probe fires in (any CPU, trap and interrupt
/// context, and what the kernel's #BP handler runs in) and returns an index that stays
/// the same for the whole time a probe fires on that CPU, and that no other CPU gets
/// meanwhile: probes fire with preemption and migration off, as Linux's tracepoints do,
/// so nested fires (a probe in a handler, an interrupt) on one CPU are strictly LIFO.
/// An index `>= MAX_CPUS` is allowed and falls back to the shared counters. On a host,
/// a thread can stand for a CPU (an index per thread: its signal handlers nest LIFO).
/// The poker passed to `enable`, `disable` and `unregister_module` must make every CPU
/// that fires probes execute a serializing instruction in `sync_cores` (as the
/// live-patch protocol already requires).
///
/// Writers also call `index` (outside any probe, possibly where the kernel could migrate
/// them), only to skip their own CPU's slot: a CPU running a writer outside a handler
/// has no section open below it, and sections it opens later begin after the writer's
/// `sync_cores`, so a value that is stale by the time it is used is harmless.
pub unsafe fn set_cpu_index(index: CpuIndex) {
    HOOK.store(index as usize, Ordering::Release);
    WORD_OFFSET.store(NO_WORD, Ordering::Relaxed);
}

/// Installs the kernel's CPU index as a word each CPU keeps at `offset` from its
/// per-CPU base register (`arch::native::probe::CPU_BASE`: on x86-64 `gs` in a
/// freestanding build, `fs` in a hosted one; on aarch64 `TPIDR_EL1`, `TPIDR_EL0`): the
/// dispatchers then read it with one load instead of calling a [`CpuIndex`] hook (a
/// call and a return per fire, two of the fire's taken branches). The word is a `u32`
/// (the low half of a little-endian `u64` index will do). Replaces an earlier
/// [`set_cpu_index`] hook; a later `set_cpu_index` replaces it.
///
/// # Safety
///
/// As for [`set_cpu_index`], with "the `u32` at `CPU_BASE + offset`" for "`index()`":
/// on every CPU that fires probes, in every context it fires in (and on the CPUs of
/// writers, which read it to skip their own slot), the base register holds that CPU's
/// own pointer, readable at that privilege level, and the `u32` there is its index.
/// `offset` is not `isize::MIN` (which stands for "no word").
pub unsafe fn set_cpu_index_word(offset: isize) {
    // (`NO_WORD` is no offset a kernel or thread can use: the whole address space away.)
    WORD_OFFSET.store(offset, Ordering::Relaxed);
}

/// [`set_cpu_index_word`]'s offset, or [`NO_WORD`] when it is not in force (then the
/// hook, if any). One word, so one load on the fire path.
static WORD_OFFSET: AtomicIsize = AtomicIsize::new(NO_WORD);
const NO_WORD: isize = isize::MIN;

/// This CPU's slot, if it has one: from the index word, else from the hook.
#[inline(always)]
pub(super) fn this_cpu() -> Option<&'static Cpu> {
    // Relaxed: the offset is the whole message.
    let offset = WORD_OFFSET.load(Ordering::Relaxed);
    let index = if offset != NO_WORD {
        // SAFETY: `set_cpu_index_word`'s caller promised every CPU that fires probes a
        // readable index word there.
        unsafe { arch::read_cpu_word(offset) as usize }
    } else {
        // Relaxed: a code address, which carries no data. (A section remembers the
        // slot it counted itself in, whichever source it read.)
        let f = HOOK.load(Ordering::Relaxed);
        if f == 0 {
            return None;
        }
        // SAFETY: `HOOK` only ever holds 0 or a `CpuIndex` stored by `set_cpu_index` (a
        // fn pointer as `usize`, same size).
        let index = unsafe { core::mem::transmute::<usize, CpuIndex>(f) };
        index()
    };
    CPUS.get(index)
}

/// One outermost exit, in a slot's word.
const OUTER_EXIT: u64 = 1 << 32;
/// The depth bits of a slot's word.
const DEPTH: u64 = OUTER_EXIT - 1;

/// A dispatcher's read-side section: while it lives, writers that published a change
/// wait for it in [`synchronize`]. Ends when dropped.
pub(super) enum Section {
    /// Counted in on this CPU's slot, whose word was `.1` before.
    Cpu(&'static Cpu, u64),
    /// Counted in on `SHARED[phase]`.
    Shared(usize),
}

/// This CPU's slot from the index word ([`set_cpu_index_word`]); `None` without one
/// (the hook, if any, is [`this_cpu`]'s) or past [`MAX_CPUS`].
#[inline(always)]
pub(super) fn this_cpu_by_word() -> Option<&'static Cpu> {
    // Relaxed: the offset is the whole message.
    let offset = WORD_OFFSET.load(Ordering::Relaxed);
    if offset == NO_WORD {
        return None;
    }
    // SAFETY: `set_cpu_index_word`'s caller promised every CPU that fires probes a
    // readable index word there.
    let index = unsafe { arch::read_cpu_word(offset) as usize };
    CPUS.get(index)
}

/// Enters a read-side section on this CPU.
#[inline(always)]
pub(super) fn enter() -> Section {
    match this_cpu() {
        Some(cpu) => enter_on(cpu),
        None => enter_shared(),
    }
}

/// Enters a read-side section on `cpu`, the running CPU's slot ([`this_cpu`]).
#[inline(always)]
pub(super) fn enter_on(cpu: &'static Cpu) -> Section {
    let w = local::fetch_inc(&cpu.word);
    // The registry is read after the increment (in program order; the writer's
    // `sync_cores` orders it on the hardware).
    compiler_fence(Ordering::SeqCst);
    Section::Cpu(cpu, w)
}

/// [`enter`] without a CPU slot (out of line: the per-CPU path is the hot one).
#[cold]
#[inline(never)]
fn enter_shared() -> Section {
    let phase = PHASE.load(Ordering::SeqCst) & 1;
    SHARED[phase].0.fetch_add(1, Ordering::SeqCst);
    Section::Shared(phase)
}

/// Counts a hit of probe `id` without a CPU slot.
#[cold]
#[inline(never)]
fn hit_shared(id: usize) {
    if let Some(h) = SHARED_HITS.get(id) {
        h.fetch_add(1, Ordering::Relaxed);
    }
}

/// Leaves a section counted in on `SHARED[phase]`.
#[cold]
#[inline(never)]
fn exit_shared(phase: usize) {
    SHARED[phase & 1].0.fetch_sub(1, Ordering::SeqCst);
}

impl Section {
    /// Counts a hit of probe `id` (a valid id: `< MAX_PROBES`; others are ignored).
    #[inline(always)]
    pub(super) fn hit(&self, id: usize) {
        match self {
            Section::Cpu(cpu, _) => {
                if let Some(h) = cpu.hits.get(id) {
                    local::inc(h);
                }
            }
            Section::Shared(_) => hit_shared(id),
        }
    }
}

impl Drop for Section {
    #[inline(always)]
    fn drop(&mut self) {
        match self {
            Section::Cpu(cpu, w) => {
                // Back to the word as this section found it (every nested section has
                // done the same), plus an outermost exit if it was the outermost. A
                // plain store: no interrupt can observe a half-done exit. Release (the
                // hardware keeps a CPU's earlier loads and stores before a later
                // store): everything the section did comes before the exit.
                let exit = if *w & DEPTH == 0 { OUTER_EXIT } else { 0 };
                cpu.word.store(w.wrapping_add(exit), Ordering::Release);
            }
            Section::Shared(phase) => exit_shared(*phase),
        }
    }
}

fn wait_zero(c: &AtomicU64) {
    while c.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
}

/// Waits until every read-side section that may have seen state published before the
/// caller's last `sync_cores` has ended (see the [module docs](self)): call it after
/// publishing (a SeqCst store) and a `sync_cores` of the poker. Does not wait for
/// sections on the calling CPU. The caller holds the registry lock (one writer at a
/// time: the phase flip is not atomic against another writer).
pub(super) fn synchronize() {
    let p = PHASE.load(Ordering::SeqCst) & 1;
    wait_zero(&SHARED[p ^ 1].0);
    PHASE.store(p ^ 1, Ordering::SeqCst);
    wait_zero(&SHARED[p].0);

    let me = this_cpu().map(|c| c as *const Cpu);
    for cpu in &CPUS {
        if Some(cpu as *const Cpu) == me {
            continue;
        }
        let w = cpu.word.load(Ordering::SeqCst);
        if w & DEPTH == 0 {
            continue;
        }
        let exits = w & !DEPTH;
        loop {
            let now = cpu.word.load(Ordering::SeqCst);
            if now & DEPTH == 0 || now & !DEPTH != exits {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// Hits of probe `id`, summed over every CPU (a snapshot: other CPUs may be counting).
pub(super) fn hits(id: usize) -> u64 {
    let shared = SHARED_HITS.get(id).map_or(0, |h| h.load(Ordering::Relaxed));
    CPUS.iter()
        .filter_map(|c| c.hits.get(id))
        .fold(shared, |sum, h| sum.wrapping_add(h.load(Ordering::Relaxed)))
}

/// Sets probe `id`'s hits to 0 on every CPU. Only for an id no CPU can count: a
/// disabled probe, after a [`synchronize`] (ids being given out or freed).
pub(super) fn reset_hits(id: usize) {
    if let Some(h) = SHARED_HITS.get(id) {
        h.store(0, Ordering::Relaxed);
    }
    for c in &CPUS {
        if let Some(h) = c.hits.get(id) {
            h.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    //! Per-CPU sections on host threads (each thread that claims an index is a CPU),
    //! with the host poker, whose `sync_cores` is `membarrier`, a barrier on every thread.

    use super::super::dispatch::{fire, ksites_probe_fire};
    use super::super::records::ProbeRecord;
    use super::super::state::with_image_at;
    use super::super::{
        ImageHandle, ProbeId, disable, enable, info, register_module, unregister_module,
    };
    use super::*;
    use crate::format::{ARCH_X86_64, HEADER_SIZE, Header, MAGIC, ProbeDesc, SubTable, VERSION};
    use crate::format::{PROBE_DESC_SIZE, Table};
    use crate::host::HostPoker;
    use core::cell::Cell;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use std::vec::Vec;

    std::thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);

    fn test_index() -> usize {
        INDEX.with(Cell::get)
    }

    /// Held while a test changes where the index comes from and checks it.
    static SOURCE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `INDEX`'s offset from this thread's `fs` base (the same on every thread: the test
    /// binary's own TLS block, at a fixed place from the thread pointer).
    fn index_offset() -> isize {
        let fs: usize;
        // SAFETY: on x86-64 Linux, `fs:0` holds the thread control block's own address
        // (the TLS ABI); the load writes nothing.
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) fs, options(nostack, readonly, preserves_flags))
        };
        INDEX.with(|c| c.as_ptr() as usize).wrapping_sub(fs) as isize
    }

    /// Installs the index word (`INDEX`, through `fs`) and gives this thread a CPU index
    /// of its own.
    fn become_cpu() -> usize {
        {
            let _source = SOURCE.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: every thread's index is its own (claimed once, never shared), in
            // `INDEX` at the same offset from `fs` on every thread; threads without one
            // read `usize::MAX`'s low half (past MAX_CPUS: the shared counters). The
            // tests' poker is `membarrier`.
            unsafe { set_cpu_index_word(index_offset()) };
        }
        let i = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        assert!(i < MAX_CPUS, "test threads ran out of CPU indices");
        INDEX.with(|c| c.set(i));
        i
    }

    #[test]
    fn the_cpu_index_comes_from_the_word_or_the_hook() {
        std::thread::spawn(|| {
            let i = become_cpu();
            let there = std::thread::spawn(index_offset).join().unwrap();
            assert_eq!(index_offset(), there, "INDEX moved between threads");
            let _source = SOURCE.lock().unwrap_or_else(|e| e.into_inner());
            assert!(core::ptr::eq(this_cpu_by_word().unwrap(), &CPUS[i]));
            assert!(core::ptr::eq(this_cpu().unwrap(), &CPUS[i]));
            // SAFETY: as in `become_cpu`, through the hook (same `INDEX`).
            unsafe { set_cpu_index(test_index) };
            assert!(this_cpu_by_word().is_none(), "the hook replaces the word");
            assert!(core::ptr::eq(this_cpu().unwrap(), &CPUS[i]));
            // A thread without an index has no slot either way.
            assert!(std::thread::spawn(|| this_cpu().is_none()).join().unwrap());
            // SAFETY: as in `become_cpu`.
            unsafe { set_cpu_index_word(index_offset()) };
            assert!(core::ptr::eq(this_cpu_by_word().unwrap(), &CPUS[i]));
            assert!(std::thread::spawn(|| this_cpu().is_none()).join().unwrap());
        })
        .join()
        .unwrap();
    }

    static REC: ProbeRecord = ProbeRecord::new("pcpu", "rec", 0);
    static SEEN: AtomicU64 = AtomicU64::new(u64::MAX);

    fn seen(id: ProbeId, _: &[u64; 6]) {
        SEEN.store(u64::from(id.0), Ordering::SeqCst);
    }

    /// Fires `REC` (a record whose table index is 0) and returns the id its handler saw.
    fn fire_rec() -> u64 {
        SEEN.store(u64::MAX, Ordering::SeqCst);
        ksites_probe_fire(&REC, &[0; 6]);
        SEEN.load(Ordering::SeqCst)
    }

    #[test]
    fn a_record_fires_the_probe_of_its_current_registration() {
        REC.set_local_id(0);
        let at = &REC as *const ProbeRecord as u64;
        let range = at..at + core::mem::size_of::<ProbeRecord>() as u64;
        // The record's memory registered as a module (its table's probe 0), unloaded,
        // then registered again at other ids: the record must fire the new ids (its
        // cached id is of the old registration).
        let first = {
            let bytes = table_of(&["rec"]);
            let t = Table::parse(bytes, bytes.as_ptr() as u64, &[]).unwrap();
            // SAFETY: the table is leaked; it has no sites.
            unsafe { register_module(t, range.clone(), &poker()) }.unwrap()
        };
        super::super::trap::route_for_tests();
        let p = id(&first, 0);
        // SAFETY: no sites: nothing is written (here and below).
        unsafe { enable(p, seen, &mut poker()) }.unwrap();
        std::thread::spawn(move || {
            become_cpu();
            assert_eq!(fire_rec(), u64::from(p.0));
            // Cached now: the same again.
            assert_eq!(fire_rec(), u64::from(p.0));
        })
        .join()
        .unwrap();
        // A thread with no CPU slot (the shared counters) fires it too.
        assert_eq!(std::thread::spawn(fire_rec).join().unwrap(), u64::from(p.0));
        // SAFETY: as above.
        unsafe { disable(p, &mut poker()) }.unwrap();
        unload(&first);
        // Another module takes the freed ids (first fit), so the record's next
        // registration gets others.
        let (filler, _) = module(&["filler"]);
        let second = {
            let bytes = table_of(&["rec"]);
            let t = Table::parse(bytes, bytes.as_ptr() as u64, &[]).unwrap();
            // SAFETY: as above.
            unsafe { register_module(t, range.clone(), &poker()) }.unwrap()
        };
        let q = id(&second, 0);
        assert_ne!(
            p, q,
            "the second registration got the same ids: nothing tested"
        );
        // SAFETY: as above.
        unsafe { enable(q, seen, &mut poker()) }.unwrap();
        std::thread::spawn(move || {
            become_cpu();
            assert_eq!(
                fire_rec(),
                u64::from(q.0),
                "fired through a stale cached id"
            );
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        unsafe { disable(q, &mut poker()) }.unwrap();
        unload(&second);
        unload(&filler);
    }

    /// The host poker: its `sync_cores` is `membarrier`, a barrier on every thread (which
    /// these tests need); its tables have no sites, so it never writes.
    fn poker() -> HostPoker {
        let p = HostPoker::new();
        assert!(p.serializes_all_threads(), "membarrier is not available");
        p
    }

    /// A leaked table with probes `pcpu:<name>` for each name, and no sites.
    fn table_of(names: &[&str]) -> &'static [u8] {
        let mut strings: Vec<u8> = b"pcpu\0".to_vec();
        let descs: Vec<ProbeDesc> = names
            .iter()
            .map(|n| {
                let name = strings.len() as u32;
                strings.extend_from_slice(n.as_bytes());
                strings.push(0);
                ProbeDesc {
                    provider: 0,
                    name,
                    nargs: 0,
                    flags: 0,
                }
            })
            .collect();
        let probes = HEADER_SIZE as u32;
        let strs = probes + (PROBE_DESC_SIZE * names.len()) as u32;
        let sub = |offset, count: usize| SubTable {
            offset,
            count: count as u32,
        };
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            arch: ARCH_X86_64,
            flags: 0,
            header_size: probes,
            total_size: strs + strings.len() as u32,
            ifuncs: sub(probes, 0),
            ifunc_sites: sub(probes, 0),
            probes: sub(probes, names.len()),
            probe_sites: sub(strs, 0),
            strings: sub(strs, strings.len()),
            keys: SubTable::default(),
            key_sites: SubTable::default(),
        };
        let mut bytes = h.to_bytes().to_vec();
        descs
            .iter()
            .for_each(|d| bytes.extend_from_slice(&d.to_bytes()));
        bytes.extend_from_slice(&strings);
        // 8-aligned, as tables are: leaked as words.
        let mut words = std::vec![0u64; bytes.len().div_ceil(8)];
        for (w, c) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            *w = u64::from_le_bytes(b);
        }
        let words: &'static [u64] = std::boxed::Box::leak(words.into_boxed_slice());
        // SAFETY: leaked, so it lives forever; u64 → u8 reinterpretation.
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) }
    }

    /// Registers `names` as a module spanning its own table.
    fn module(names: &[&str]) -> (ImageHandle, Range) {
        let bytes = table_of(names);
        let base = bytes.as_ptr() as u64;
        let t = Table::parse(bytes, base, &[]).unwrap();
        let range = base..base + bytes.len() as u64;
        // SAFETY: the table is leaked (lives forever); it has no sites.
        let h = unsafe { register_module(t, range.clone(), &poker()) }.unwrap();
        super::super::trap::route_for_tests();
        (h, range)
    }
    type Range = core::ops::Range<u64>;

    fn id(h: &ImageHandle, i: u32) -> ProbeId {
        ProbeId(h.base() + i)
    }

    fn unload(h: &ImageHandle) {
        // SAFETY: no sites: nothing is written.
        unsafe { unregister_module(h, 0..0, &mut poker()) }.unwrap();
    }

    /// Spins until `f` holds.
    fn until(f: impl Fn() -> bool) {
        while !f() {
            std::hint::spin_loop();
        }
    }

    fn sleep_ms(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// Sets its flag when dropped (also when an assertion unwinds), so the firing
    /// threads stop and the scope can end.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    static SLOW_INSIDE: AtomicBool = AtomicBool::new(false);

    fn slow(_: ProbeId, _: &[u64; 6]) {
        SLOW_INSIDE.store(true, Ordering::SeqCst);
        sleep_ms(20);
        SLOW_INSIDE.store(false, Ordering::SeqCst);
    }

    #[test]
    fn disable_waits_for_a_handler_on_another_cpu() {
        let (h, _) = module(&["slow"]);
        let p = id(&h, 0);
        // SAFETY: no sites: nothing is written (here and below).
        unsafe { enable(p, slow, &mut poker()) }.unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let cpu = become_cpu();
                while !stop.load(Ordering::SeqCst) {
                    fire(p.0, &[0; 6]);
                }
                // Counted on this thread's own slot.
                assert!(CPUS[cpu].hits[p.0 as usize].load(Ordering::Relaxed) > 0);
            });
            let _stop = StopOnDrop(&stop);
            for _ in 0..5 {
                until(|| SLOW_INSIDE.load(Ordering::SeqCst));
                // SAFETY: as above.
                unsafe { disable(p, &mut poker()) }.unwrap();
                assert!(
                    !SLOW_INSIDE.load(Ordering::SeqCst),
                    "disable returned while another CPU ran the handler"
                );
                // SAFETY: as above.
                unsafe { enable(p, slow, &mut poker()) }.unwrap();
            }
        });
        assert!(info(p).unwrap().hits >= 5);
        unload(&h);
    }

    static OUTER_INSIDE: AtomicBool = AtomicBool::new(false);
    static INNER: AtomicU64 = AtomicU64::new(u64::MAX);

    fn inner(_: ProbeId, _: &[u64; 6]) {}

    /// Fires the inner probe (a nested section on the same CPU, which exits first)
    /// before and while the writer waits, then lingers.
    fn outer(_: ProbeId, _: &[u64; 6]) {
        OUTER_INSIDE.store(true, Ordering::SeqCst);
        let inner = INNER.load(Ordering::SeqCst) as u32;
        fire(inner, &[0; 6]);
        sleep_ms(10);
        fire(inner, &[0; 6]);
        sleep_ms(20);
        OUTER_INSIDE.store(false, Ordering::SeqCst);
    }

    fn replacement(_: ProbeId, _: &[u64; 6]) {}

    #[test]
    fn a_nested_exit_does_not_end_the_wait_for_the_outer_frame() {
        let (h, _) = module(&["outer", "inner"]);
        let (o, i) = (id(&h, 0), id(&h, 1));
        INNER.store(u64::from(i.0), Ordering::SeqCst);
        // SAFETY: no sites: nothing is written (here and below).
        unsafe { enable(i, inner, &mut poker()) }.unwrap();
        // SAFETY: as above.
        unsafe { enable(o, outer, &mut poker()) }.unwrap();
        let stop = AtomicBool::new(false);
        let go = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                become_cpu();
                while !stop.load(Ordering::SeqCst) {
                    if go.swap(false, Ordering::SeqCst) {
                        fire(o.0, &[0; 6]);
                    }
                }
            });
            let _stop = StopOnDrop(&stop);
            // A live handler change, then a disable, each while the outer handler runs
            // (and fires the inner probe, whose section exits while the writer waits).
            for change in [true, false] {
                go.store(true, Ordering::SeqCst);
                until(|| OUTER_INSIDE.load(Ordering::SeqCst));
                let r = if change {
                    // SAFETY: as above.
                    unsafe { enable(o, replacement, &mut poker()) }
                } else {
                    // SAFETY: as above.
                    unsafe { disable(o, &mut poker()) }
                };
                r.unwrap();
                assert!(
                    !OUTER_INSIDE.load(Ordering::SeqCst),
                    "returned while the old handler ran (change: {change})"
                );
                if change {
                    // Back to the old handler for the disable round.
                    // SAFETY: as above.
                    unsafe { enable(o, outer, &mut poker()) }.unwrap();
                }
            }
        });
        assert_eq!(info(o).unwrap().hits, 2);
        assert_eq!(info(i).unwrap().hits, 4);
        // SAFETY: as above.
        unsafe { disable(i, &mut poker()) }.unwrap();
        unload(&h);
    }

    #[test]
    fn unloading_a_module_waits_for_cpus_inside_its_slot() {
        let (h, range) = module(&["held"]);
        let released = AtomicBool::new(false);
        let inside = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                become_cpu();
                let sec = enter();
                let base = with_image_at(&sec, range.start, |d| {
                    inside.store(true, Ordering::SeqCst);
                    // Hold the slot's data while the module is being unloaded.
                    sleep_ms(50);
                    d.base
                });
                assert_eq!(base, Some(h.base()));
                released.store(true, Ordering::SeqCst);
                drop(sec);
            });
            until(|| inside.load(Ordering::SeqCst));
            unload(&h);
            assert!(
                released.load(Ordering::SeqCst),
                "the slot was freed while a CPU was inside it"
            );
        });
    }

    #[test]
    fn hits_are_summed_over_cpus_and_reset_with_the_ids() {
        let (h, _) = module(&["count"]);
        let p = id(&h, 0);
        // SAFETY: no sites: nothing is written (here and below).
        unsafe { enable(p, inner, &mut poker()) }.unwrap();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    become_cpu();
                    (0..1000).for_each(|_| fire(p.0, &[0; 6]));
                });
            }
            // This thread without an index: the shared counters.
            s.spawn(|| (0..500).for_each(|_| fire(p.0, &[0; 6])));
        });
        assert_eq!(info(p).unwrap().hits, 3500);
        assert_eq!(hits(p.0 as usize), 3500);
        // SAFETY: as above.
        unsafe { disable(p, &mut poker()) }.unwrap();
        unload(&h);
    }
}
