//! The #BP route: the ready entry stub [`int3_entry`] (the architecture's, calling
//! [`int3_trap`]), the kernel's hook and fallback for it, and the declaration
//! ([`declare_int3_route`]) that [`super::enable`] requires, so a kernel cannot enable a
//! probe whose mid-patch `int3` would reach no handler.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::dispatch::handle_int3;
use super::{Int3Frame, ProbeError};
#[cfg(target_arch = "x86_64")]
use crate::arch::native::trap as arch;

/// A #BP hook or fallback: gets the interrupted context, returns whether it handled the
/// trap (then every field it changed is written back before the trap returns).
pub type Int3Hook = fn(&mut Int3Frame) -> bool;

/// Whether the kernel declared that a #BP reaches [`handle_int3`].
static ROUTE: AtomicBool = AtomicBool::new(false);
/// The [`Int3Hook`] [`int3_entry`] runs instead of [`handle_int3`], or 0.
static HOOK: AtomicUsize = AtomicUsize::new(0);
/// The [`Int3Hook`] [`int3_entry`] runs for a trap nothing else handled, or 0.
static FALLBACK: AtomicUsize = AtomicUsize::new(0);

/// Declares that every #BP on every CPU that may run probe sites reaches
/// [`handle_int3`]: [`int3_entry`] is installed in IDT vector 3, or the kernel's own #BP
/// handler calls [`handle_int3`] and writes back what it changes. Until this is called,
/// [`super::enable`] refuses with [`ProbeError::NoTrapRoute`]: while a batch writes a
/// site, a CPU reaching it executes `int3`, and a C tail site is an `int3` while
/// enabled.
///
/// # Safety
///
/// The route is in place (on every CPU, before any of them can run a probe site) for as
/// long as probes may be enabled.
pub unsafe fn declare_int3_route() {
    ROUTE.store(true, Ordering::SeqCst);
}

/// Whether [`declare_int3_route`] was called.
pub fn int3_route_declared() -> bool {
    ROUTE.load(Ordering::SeqCst)
}

/// [`ProbeError::NoTrapRoute`] unless the route was declared.
pub(super) fn check_route() -> Result<(), ProbeError> {
    if int3_route_declared() {
        Ok(())
    } else {
        Err(ProbeError::NoTrapRoute)
    }
}

/// Sets (or with `None` removes) what [`int3_entry`] runs for an `int3` that is not a
/// probe site's (a debugger's breakpoint, an `int3` in the kernel's own code). It
/// returns `true` if it handled the trap; if it returns `false`, or none is set, the
/// stub ends in `ud2` (see [`int3_entry`]). It runs in trap context.
///
/// # Safety
///
/// What `fallback` leaves in the frame when it returns `true` is where and how the
/// interrupted code resumes (its instruction and stack pointers and registers): it
/// must be a valid continuation of that code (e.g. resuming right after a debugger's
/// breakpoint).
pub unsafe fn set_int3_fallback(fallback: Option<Int3Hook>) {
    FALLBACK.store(fallback.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// Sets (or with `None` removes) a hook [`int3_entry`] runs *instead of*
/// [`handle_int3`] (the fallback still runs if it returns `false`): for a kernel that
/// counts or traces traps around the emulation. The hook must call [`handle_int3`] on
/// the frame it gets (and return `true` when that does), or enabled probes break.
///
/// # Safety
///
/// The hook passes every trap at a probe site to [`handle_int3`] and returns its result,
/// leaving the frame as [`handle_int3`] left it: the frame decides where the interrupted
/// code resumes, and a site mid-patch resumed anywhere else runs half an instruction.
pub unsafe fn set_int3_hook(hook: Option<Int3Hook>) {
    HOOK.store(hook.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// The hook stored in `slot`, if any.
fn load(slot: &AtomicUsize) -> Option<Int3Hook> {
    match slot.load(Ordering::SeqCst) {
        0 => None,
        // SAFETY: the slots only ever hold 0 or an `Int3Hook` stored by the setters
        // above (a fn pointer as `usize`, same size).
        raw => Some(unsafe { core::mem::transmute::<usize, Int3Hook>(raw) }),
    }
}

/// What [`int3_entry`] calls with the frame it built: the hook (or [`handle_int3`]),
/// then the fallback. Returns whether the trap was handled. Called by the stub only: `f`
/// is this CPU's interrupted #BP context, and the stub writes every field back before
/// `iretq`.
extern "C" fn int3_trap(f: &mut Int3Frame) -> bool {
    let handled = match load(&HOOK) {
        Some(hook) => hook(f),
        // SAFETY: `f` is the live #BP context and the stub writes every field back
        // (this function's contract with the stub).
        None => unsafe { handle_int3(f) },
    };
    handled || load(&FALLBACK).is_some_and(|fallback| fallback(f))
}

#[cfg(target_arch = "x86_64")]
arch::int3_entry!(int3_trap);

/// aarch64: what the kernel's synchronous exception handler calls for a trap that
/// `arch::aarch64::trap::is_probe_brk` accepts, with the frame that module describes:
/// the hook set by [`set_int3_hook`] (or [`handle_int3`]), then the fallback. Returns
/// whether the trap was handled; then the handler writes the frame's fields back as
/// that module says.
///
/// # Safety
///
/// As for [`handle_int3`]: `f` is this CPU's interrupted BRK context, and the handler
/// writes those fields back before `eret`.
#[cfg(target_arch = "aarch64")]
pub unsafe fn handle_brk(f: &mut Int3Frame) -> bool {
    int3_trap(f)
}

/// riscv64: what the kernel's trap handler calls for a trap that
/// `arch::riscv64::trap::is_probe_ebreak` accepts, with the frame that module describes:
/// the hook set by [`set_int3_hook`] (or [`handle_int3`]), then the fallback. Returns
/// whether the trap was handled; then the handler writes the frame's fields back as
/// that module says.
///
/// # Safety
///
/// As for [`handle_int3`]: `f` is this hart's interrupted `ebreak` context, and the
/// handler writes those fields back before `sret`.
#[cfg(target_arch = "riscv64")]
pub unsafe fn handle_ebreak(f: &mut Int3Frame) -> bool {
    int3_trap(f)
}

/// The address of [`int3_entry`], for the kernel's IDT (vector 3).
#[cfg(target_arch = "x86_64")]
pub fn int3_entry_address() -> u64 {
    int3_entry as *const () as u64
}

/// Declares the route for the crate's unit tests, whose probes have no sites or sites
/// in buffers nothing executes.
#[cfg(test)]
pub(super) fn route_for_tests() {
    // SAFETY: the tests' sites are never executed, so no `int3` of theirs can trap.
    unsafe { declare_int3_route() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::AtomicU32;

    static RUNS: AtomicU32 = AtomicU32::new(0);

    fn accept(_: &mut Int3Frame) -> bool {
        RUNS.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn decline(_: &mut Int3Frame) -> bool {
        RUNS.fetch_add(100, Ordering::SeqCst);
        false
    }

    /// `int3_trap` on a frame at no probe site, with `RUNS` reset: whether it was
    /// handled, and what the hooks added to `RUNS`.
    fn trap() -> (bool, u32) {
        RUNS.store(0, Ordering::SeqCst);
        // (The default frame's trap site is at no registered image.)
        let handled = int3_trap(&mut Int3Frame::default());
        (handled, RUNS.load(Ordering::SeqCst))
    }

    #[test]
    fn an_int3_outside_probe_sites_goes_to_the_fallback() {
        // (The only test that sets the hook and fallback slots.)
        // SAFETY: nothing traps in this test; the hooks are only called by hand.
        unsafe {
            set_int3_fallback(None);
            assert_eq!(trap(), (false, 0), "no fallback: unhandled");
            set_int3_fallback(Some(decline));
            assert_eq!(trap(), (false, 100));
            set_int3_fallback(Some(accept));
            assert_eq!(trap(), (true, 1));
            set_int3_hook(Some(decline));
            assert_eq!(trap(), (true, 101), "hook declined: the fallback runs");
            set_int3_hook(Some(accept));
            set_int3_fallback(Some(decline));
            assert_eq!(trap(), (true, 1), "hook handled: no fallback");
            set_int3_hook(None);
            set_int3_fallback(None);
        }
        assert_eq!(trap(), (false, 0));
        assert_ne!(int3_entry_address(), 0);
    }
}
