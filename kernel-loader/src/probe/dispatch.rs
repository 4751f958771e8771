//! Firing probes: the dispatcher every enabled site ends up in ([`fire`]), its entry
//! points (`fire_inline`, compiled into each `probe!` block with the `inline-fire`
//! feature, else called through `ksites_probe_fire`; `ksites_probe_c_entry` for C call
//! sites), and the #BP hook ([`handle_int3`]) that finds the probe site a CPU trapped
//! on and has the architecture emulate it.
//!
//! Everything here is lock-free: it runs on any CPU, in trap context in a kernel and in
//! a signal handler on a host (see `crate::host`), so probe handlers run there too. Each
//! entry point opens one read-side section ([`percpu::enter`]) before it reads the
//! registry (image slots, probe state) and closes it after the handler returned: that
//! is what `disable`, a live handler change and module unload wait for, and on the fire
//! path it writes only this CPU's slot.
//!
//! A `probe!` block finds the probe without a registry lookup: a `ProbeRecord` caches
//! its global id (tagged with the registry's id epoch, which moves on when a module's
//! ids are freed), written by the first fire that looks it up.

use core::sync::atomic::Ordering;

use super::percpu::{self, Section};
use super::records::ProbeRecord;
use super::state::{
    ID_EPOCH, IN_INT3, INT3_DRAIN_WAITS, INT3_EMULATIONS, STATES, SlotData, with_image_at,
};
use super::{Handler, ProbeId};
use crate::arch::native::probe::{
    self as arch, Int3Frame, Stubs, ksites_probe_ret0, ksites_probe_ret1,
};
use crate::format::ProbeKind;

/// Runs probe `id`'s handler if it is enabled, in a section of its own.
#[cfg(test)]
pub(super) fn fire(id: u32, args: &[u64; 6]) {
    let sec = percpu::enter();
    fire_in(&sec, id, args);
}

/// Runs probe `id`'s handler if it is enabled, inside the caller's section `sec`.
#[inline(always)]
fn fire_in(sec: &Section, id: u32, args: &[u64; 6]) {
    let Some(st) = STATES.get(id as usize) else {
        return;
    };
    // Read inside the section: a writer publishes a change, then waits for every
    // section that may have read the old state (`percpu::synchronize`).
    if st.enabled.load(Ordering::SeqCst) {
        sec.hit(id as usize);
        let h = st.handler.load(Ordering::SeqCst);
        if h != 0 {
            // SAFETY: `handler` only ever holds 0 or a `Handler` stored by `set_state`
            // (a fn pointer as `usize`, same size); its code stays mapped while the
            // probe is enabled or a section that read it is open (a module cannot
            // unload then: disabling its probes waits for the sections).
            let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
            h(ProbeId(id), args);
        }
    }
}

/// What an enabled `probe!` site's out-of-line block runs (hidden: the macro's
/// expansion). With the `inline-fire` feature, [`fire_inline`]: the dispatch compiled
/// into the block itself, for code linked with this crate (the kernel image). Without
/// it, a call of the unmangled [`ksites_probe_fire`], which code linked separately (a
/// module, which may import only unmangled kernel symbols) must use.
#[doc(hidden)]
#[inline(always)]
pub fn fire_site(rec: &ProbeRecord, args: &[u64; 6]) {
    #[cfg(feature = "inline-fire")]
    fire_inline(rec, args);
    #[cfg(not(feature = "inline-fire"))]
    ksites_probe_fire(rec, args);
}

/// Entry point of an enabled `probe!` site's out-of-line block when the dispatch is not
/// inlined into it (stable symbol, so modules can link against it by name): `rec` is
/// the site's [`ProbeRecord`], `args` the six arguments. Its body is the fast path
/// `probe!` blocks run inline with the `inline-fire` feature.
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_fire(rec: &ProbeRecord, args: &[u64; 6]) {
    fire_inline(rec, args);
}

/// The dispatch of an enabled `probe!` site, inlined into its caller ([`fire_site`],
/// [`ksites_probe_fire`]).
///
/// The fast path is one straight line with no call but the handler's: the CPU's slot
/// from the index word (`set_cpu_index_word`), its section depth counted in, the
/// probe's global id from the record's cache, the probe's state, the hit on the CPU's
/// own counter, the handler, the section depth put back (after one more outermost exit,
/// if it was the outermost). Anything else (a CPU index from a hook, no slot, a record
/// not cached yet) calls a cold function out of line, which opens a section of its
/// own: so the inlined code is only that line and two calls of it.
#[inline(always)]
pub(super) fn fire_inline(rec: &ProbeRecord, args: &[u64; 6]) {
    let Some(cpu) = percpu::this_cpu_by_word() else {
        return fire_record(rec, args);
    };
    let sec = percpu::enter_on(cpu);
    // Read inside the section: `state::free` moves the epoch on only after waiting for
    // the sections that may have cached an id of the image it frees.
    let epoch = ID_EPOCH.load(Ordering::Relaxed);
    match rec.cached_global(epoch) {
        Some(id) => fire_in(&sec, id, args),
        // Out of line, in a section of its own nested in this one (sections nest on a
        // CPU), so this line has one exit.
        None => fire_record(rec, args),
    }
}

/// [`fire_inline`] in a section of any kind, out of line (`#[cold]`, so the word's path
/// is the straight line: a CPU index from the hook costs a call anyway, and a record is
/// uncached once per id epoch).
#[cold]
#[inline(never)]
fn fire_record(rec: &ProbeRecord, args: &[u64; 6]) {
    let sec = percpu::enter();
    let epoch = ID_EPOCH.load(Ordering::Relaxed);
    match rec.cached_global(epoch) {
        Some(id) => fire_in(&sec, id, args),
        None => fire_uncached(sec, rec, args, epoch),
    }
}

/// Fires `rec`'s probe, whose global id is not cached for `epoch`: finds it through the
/// image holding the record (the record's `id` is its index in that image's table),
/// caches it, fires. (Once per record and id epoch.)
#[cold]
#[inline(never)]
fn fire_uncached(sec: Section, rec: &ProbeRecord, args: &[u64; 6], epoch: u32) {
    let Some(local) = rec.id() else { return };
    let id = with_image_at(&sec, rec as *const ProbeRecord as u64, |d| {
        (local.0 < d.table.probe_count()).then_some(d.base + local.0)
    });
    if let Some(Some(id)) = id {
        rec.cache_global(id, epoch);
        fire_in(&sec, id, args);
    }
}

// `ksites_probe_c_entry`: saves the argument registers, calls `fire_c`.
arch::c_entry!(fire_c);

/// What `ksites_probe_c_entry` calls: `ret` is the return address the site's call
/// pushed, `args` the six argument registers.
extern "C" fn fire_c(ret: u64, args: &[u64; 6]) {
    let site = arch::call_site(ret);
    let sec = percpu::enter();
    let id = with_image_at(&sec, site, |d| {
        d.table
            .probe_site_at(site)
            .filter(|s| s.kind == ProbeKind::CCall)
            .map(|s| d.base + s.probe)
    });
    if let Some(Some(id)) = id {
        fire_in(&sec, id, args);
    }
}

/// This image's stubs.
#[inline(always)]
pub(super) fn this_image_stubs() -> Stubs {
    Stubs {
        c_entry: ksites_probe_c_entry as *const () as u64,
        ret0: ksites_probe_ret0 as *const () as u64,
        ret1: ksites_probe_ret1 as *const () as u64,
    }
}

impl Stubs {
    /// This image's stubs (defined here, next to `ksites_probe_c_entry`, which the
    /// architecture's module cannot name).
    #[inline]
    pub fn this_image() -> Stubs {
        this_image_stubs()
    }
}

/// The #BP hook: if the trap came from a probe site, emulates the instruction the site
/// is becoming (or, for an enabled C tail site, fires and returns) and returns `true`;
/// if from a static key's site (mid-batch), emulates the form of the key's published
/// state. Returns `false` for any other trap.
///
/// Enabled C call and tail sites run the probe's handler from here: in trap context in
/// a kernel, in a `SIGTRAP` handler on a host.
///
/// # Safety
///
/// `f` is the interrupted context of a #BP on this CPU; the kernel writes back the
/// registers the architecture's emulation changes (see [`Int3Frame`]) before returning
/// from the trap.
pub unsafe fn handle_int3(f: &mut Int3Frame) -> bool {
    IN_INT3.fetch_add(1, Ordering::AcqRel);
    // SAFETY: forwarded.
    let r = unsafe { emulate(f) };
    IN_INT3.fetch_sub(1, Ordering::AcqRel);
    r
}

/// [`handle_int3`] while counted in `IN_INT3`.
///
/// # Safety
///
/// As for [`handle_int3`].
unsafe fn emulate(f: &mut Int3Frame) -> bool {
    // SAFETY: forwarded. (An ifunc site mid-retarget; one load when none is in flight.)
    if unsafe { crate::ifunc::emulate_retarget_trap(f) } {
        return true;
    }
    let addr = arch::trap_site(f);
    let sec = percpu::enter();
    // The site is copied out (it is plain data): nothing below reads the table.
    let Some(Some((s, id))) = with_image_at(&sec, addr, |d| {
        d.table.probe_site_at(addr).map(|s| (s, d.base + s.probe))
    }) else {
        // Not a probe site: a static key's (`crate::key`), or not the loader's.
        // SAFETY: `f` is the live context of this trap (precondition); the table is
        // read inside the section `sec`.
        let key = |d: &SlotData| unsafe { crate::key::registry::emulate_trap(&d.table, f, addr) };
        return with_image_at(&sec, addr, key).unwrap_or(false);
    };
    // (A registered site's probe always has a state; `get` keeps the trap path free of
    // a panicking index all the same.)
    let Some(state) = STATES.get(id as usize) else {
        return false;
    };
    INT3_EMULATIONS.fetch_add(1, Ordering::Relaxed);
    let on = state.enabled.load(Ordering::SeqCst);
    if on && matches!(s.kind, ProbeKind::CCall | ProbeKind::CTail) {
        fire_in(&sec, id, &arch::trap_args(f));
    }
    // SAFETY: `f` is the live context of a trap at site `s` (precondition).
    unsafe { arch::emulate(f, &s.arch_ref(), on) };
    true
}

/// How many times a CPU was sent through [`handle_int3`]'s emulation.
pub fn int3_emulations() -> u64 {
    INT3_EMULATIONS.load(Ordering::Relaxed)
}

/// How many batches, when done writing, found a CPU still inside [`handle_int3`] and
/// waited for it to leave (step 4 of the protocol).
pub fn int3_drain_waits() -> u64 {
    INT3_DRAIN_WAITS.load(Ordering::Relaxed)
}
