//! # kernel-loader-capi
//!
//! The C API to `kernel-loader`, declared in `kernel-loader/c/ksites.h`: boot-time init
//! (table, ifunc patching, probe registration), probe lookup/enable/disable/hits, the
//! #BP hook, static keys ([`key`]), and module load/unload ([`module`]). Every `int` function returns 0 or a
//! negative `KSITES_E*` code ([`ksites_strerror`] names it); nothing panics on input.
//!
//! Build the C static library with
//! `cargo rustc -p kernel-loader-capi --release --target x86_64-unknown-none --crate-type staticlib --features panic-handler`
//! (`panic-handler` adds a spinning panic handler and, through `no-alloc`, a global
//! allocator that refuses every request: leave them out if the kernel has Rust ones). A
//! Rust kernel with C parts depends on the crate as an rlib instead.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

use core::ffi::{CStr, c_char, c_int, c_void};
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub mod key;
pub mod module;

use kernel_loader::cell::CellError;
use kernel_loader::key::KeyError;
use kernel_loader::patch::PatchError;
use kernel_loader::patch::PokeFailure;
use kernel_loader::probe::{self, MAX_PROBES, ProbeError, ProbeId};
use kernel_loader::{CpuFeatures, Error, PokeError, TextPoker, cell, patch};

/// Success.
pub const KSITES_OK: c_int = 0;
/// A null pointer (including a poker without `write`, `sync_cores` or `end`), a string
/// that is not UTF-8, or too many ranges.
pub const KSITES_EINVAL: c_int = -1;
/// No such probe.
pub const KSITES_ENOTFOUND: c_int = -2;
/// The image's table cell is empty or invalid.
pub const KSITES_ECELL: c_int = -3;
/// The `.ksites` table is malformed (also when found through the cell or by patching).
pub const KSITES_EFORMAT: c_int = -4;
/// Ifunc patching failed (every site was put back).
pub const KSITES_EPATCH: c_int = -5;
/// The poker's write failed.
pub const KSITES_EPOKE: c_int = -6;
/// Enable before `ksites_declare_int3_route`.
pub const KSITES_ENOTRAP: c_int = -7;
/// The image's table is not registered yet, or was registered twice (by a Rust part).
pub const KSITES_EREGISTERED: c_int = -8;
/// Another probe registry error.
pub const KSITES_EPROBE: c_int = -9;
/// Any other error.
pub const KSITES_EOTHER: c_int = -10;
/// A write failed and restoring a site failed too. From [`ksites_init`]: that site may
/// hold neither its original nor its patched bytes (the text is inconsistent). From
/// probe enable/disable: the probe is in its old state, a site may still hold the trap
/// (emulated by the #BP hook), and the next enable/disable rewrites it.
pub const KSITES_EROLLBACK: c_int = -11;
/// [`ksites_init`] already ran (the image is patched and registered).
pub const KSITES_EALREADY: c_int = -12;
/// Not a valid module: malformed ELF, not a relocatable object for this architecture,
/// a malformed relocation or section layout.
pub const KSITES_EMODULE: c_int = -13;
/// The module has ksites records but no `.ksites` table (run `ksites embed` on it).
pub const KSITES_ENOTEMBEDDED: c_int = -14;
/// The module needs a symbol the kernel does not export.
pub const KSITES_ESYMBOL: c_int = -15;
/// An unsupported symbol (GNU ifunc, TLS, common) or relocation type in the module.
pub const KSITES_EUNSUPPORTED: c_int = -16;
/// A relocation's value does not fit its field (the module is out of reach).
pub const KSITES_EOVERFLOW: c_int = -17;
/// The kernel's `alloc` callback gave no memory.
pub const KSITES_ENOMEM: c_int = -18;
/// The kernel's `protect` callback failed.
pub const KSITES_EPROTECT: c_int = -19;
/// An ifunc the module imports is not an ifunc of the kernel's table.
pub const KSITES_ENOTIFUNC: c_int = -20;
/// The module's `ksites_module_init` returned non-zero (the load was undone).
pub const KSITES_EINIT: c_int = -21;
/// A failed load could not unregister the module's probes: its memory is leaked.
pub const KSITES_ELEAKED: c_int = -22;
/// The module is held, an enabled probe's handler lies in its code, or another call is
/// using it: not unloaded.
pub const KSITES_EBUSY: c_int = -23;
/// [`module::MAX_MODULES`] modules are loaded already.
pub const KSITES_EMODULES: c_int = -24;

/// Most executable ranges [`ksites_init`] takes.
pub const MAX_EXEC_RANGES: usize = 16;

/// `struct ksites_poker`: a [`TextPoker`] made of C function pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KsitesPoker {
    /// Passed to every function.
    pub ctx: *mut c_void,
    /// Prepares for writes (text writable); 0 or a `KSITES_POKE_*` code. May be null
    /// only if `write` needs no preparation (e.g. it writes through a writable alias).
    pub begin: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
    /// Writes `len` bytes at `addr`; 0 or a `KSITES_POKE_*` code. Required.
    pub write: Option<unsafe extern "C" fn(*mut c_void, u64, *const u8, usize) -> c_int>,
    /// Serializes every CPU that may run the text. Required.
    pub sync_cores: Option<unsafe extern "C" fn(*mut c_void)>,
    /// Text is read-only again when it returns. Required (a no-op function if `begin`
    /// never makes the text writable).
    pub end: Option<unsafe extern "C" fn(*mut c_void)>,
}

/// `struct ksites_range`: an executable range `[start, end)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KsitesRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A C handler: `void (*)(uint32_t id, const uint64_t args[6])`.
pub type KsitesHandler = unsafe extern "C" fn(u32, *const u64);

/// The C poker's `KSITES_POKE_*` code as a [`PokeFailure`] (unknown codes: `Protect`).
fn failure(code: c_int) -> PokeFailure {
    match code {
        2 => PokeFailure::NotText,
        3 => PokeFailure::NotMapped,
        4 => PokeFailure::LargePage,
        5 => PokeFailure::Busy,
        6 => PokeFailure::ReadBack,
        _ => PokeFailure::Protect,
    }
}

/// [`KsitesPoker`] adapted to [`TextPoker`]; `write`, `sync_cores` and `end` are
/// required (checked by [`poker`]).
pub(crate) struct CPoker(pub(crate) KsitesPoker);

impl TextPoker for CPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        let Some(begin) = self.0.begin else {
            return Ok(());
        };
        // SAFETY: the C caller of the API function promised a valid poker.
        match unsafe { begin(self.0.ctx) } {
            0 => Ok(()),
            code => Err(PokeError::new(0, failure(code))),
        }
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        let Some(write) = self.0.write else {
            return Err(PokeError::new(addr, PokeFailure::NotText));
        };
        // SAFETY: the C caller promised a valid poker; `bytes` is valid for its length.
        match unsafe { write(self.0.ctx, addr, bytes.as_ptr(), bytes.len()) } {
            0 => Ok(()),
            code => Err(PokeError::new(addr, failure(code))),
        }
    }

    fn sync_cores(&mut self) {
        if let Some(sync) = self.0.sync_cores {
            // SAFETY: the C caller promised a valid poker.
            unsafe { sync(self.0.ctx) }
        }
    }

    fn end(&mut self) {
        if let Some(end) = self.0.end {
            // SAFETY: the C caller promised a valid poker.
            unsafe { end(self.0.ctx) }
        }
    }
}

/// Copies the C poker at `p`, or `None` if `p` is null or lacks `write`, `sync_cores` or
/// `end` (live patching without serialization, or text left writable, is refused).
///
/// # Safety
///
/// `p` is null or points to a valid `struct ksites_poker`.
pub(crate) unsafe fn poker(p: *const KsitesPoker) -> Option<CPoker> {
    // SAFETY: the caller's precondition.
    let p = unsafe { p.as_ref() }?;
    (p.write.is_some() && p.sync_cores.is_some() && p.end.is_some()).then_some(CPoker(*p))
}

/// The error code of `e`.
pub(crate) fn code(e: Error) -> c_int {
    match e {
        Error::Format(_)
        | Error::Cell(CellError::Format(_))
        | Error::Patch(PatchError::Format(_)) => KSITES_EFORMAT,
        Error::Cell(_) => KSITES_ECELL,
        Error::Patch(PatchError::RollbackIncomplete { .. }) => KSITES_EROLLBACK,
        Error::Patch(_) => KSITES_EPATCH,
        Error::Poke(_) => KSITES_EPOKE,
        Error::Probe(p) => match p {
            ProbeError::NoSuchProbe(_) => KSITES_ENOTFOUND,
            ProbeError::NoTrapRoute => KSITES_ENOTRAP,
            ProbeError::NotRegistered | ProbeError::AlreadyRegistered => KSITES_EREGISTERED,
            ProbeError::Poke(_) => KSITES_EPOKE,
            ProbeError::RollbackIncomplete { .. } => KSITES_EROLLBACK,
            _ => KSITES_EPROBE,
        },
        Error::Key(k) => match k {
            KeyError::NotRegistered => KSITES_EREGISTERED,
            KeyError::NoTrapRoute => KSITES_ENOTRAP,
            KeyError::Poke(_) => KSITES_EPOKE,
            KeyError::RollbackIncomplete { .. } => KSITES_EROLLBACK,
            _ => KSITES_EPROBE,
        },
        Error::Module(m) => module::module_code(m),
        _ => KSITES_EOTHER,
    }
}

/// 0 for `Ok`, the error's code otherwise.
fn result<E: Into<Error>>(r: Result<(), E>) -> c_int {
    r.map_or_else(|e| code(e.into()), |()| KSITES_OK)
}

/// The message of error code `err` (a static NUL-terminated string).
#[unsafe(no_mangle)]
pub extern "C" fn ksites_strerror(err: c_int) -> *const c_char {
    let s: &'static CStr = match err {
        KSITES_OK => c"success",
        KSITES_EINVAL => {
            c"invalid argument (null pointer, poker without write/sync_cores/end, bad string, or too many ranges)"
        }
        KSITES_ENOTFOUND => c"no such probe",
        KSITES_ECELL => c"the image's table cell is empty or invalid (run `ksites embed`)",
        KSITES_EFORMAT => c"the .ksites table is malformed",
        KSITES_EPATCH => c"ifunc patching failed; every site was put back",
        KSITES_EPOKE => c"the text poker's write failed",
        KSITES_ENOTRAP => c"no #BP route declared: call ksites_declare_int3_route() first",
        KSITES_EREGISTERED => c"the image's table is not registered, or registered twice",
        KSITES_EPROBE => c"probe registry error",
        KSITES_EOTHER => c"error",
        KSITES_EROLLBACK => {
            c"a failed write could not restore every site; the text is inconsistent (probe enable/disable: retry)"
        }
        KSITES_EALREADY => c"ksites_init already ran",
        KSITES_EMODULE => c"not a valid module (malformed ELF, not a relocatable object for this architecture, bad relocation or layout)",
        KSITES_ENOTEMBEDDED => c"the module has no .ksites table: run `ksites embed` on it",
        KSITES_ESYMBOL => c"the module needs a symbol the kernel does not export",
        KSITES_EUNSUPPORTED => c"unsupported symbol or relocation type in the module",
        KSITES_EOVERFLOW => c"a relocation overflows: the module is out of reach of the kernel",
        KSITES_ENOMEM => c"no memory for the module (alloc callback failed)",
        KSITES_EPROTECT => c"setting the module's page permissions failed (protect callback)",
        KSITES_ENOTIFUNC => c"an imported ifunc is not an ifunc of the kernel's table",
        KSITES_EINIT => c"the module's ksites_module_init failed; the load was undone",
        KSITES_ELEAKED => c"the module's memory is leaked: a failed load could not unregister its probes, or an unload could not disable a probe whose C handler lies in it",
        KSITES_EBUSY => c"the module is in use (held, a probe handler in it, or a load or unload on its slot in progress)",
        KSITES_EMODULES => c"too many modules loaded",
        _ => c"unknown ksites error code",
    };
    s.as_ptr()
}

/// Boot-time init: the image's table (through its cell, validated against `exec`),
/// every ifunc resolved for the detected CPU features and its sites patched, the
/// image's probes registered. `ifuncs`, if not null, gets the number of ifuncs resolved.
/// After a successful init (or one by a Rust part), returns [`KSITES_EALREADY`].
///
/// # Safety
///
/// Once, on one CPU, at boot, with SIMD state set up; `exec` points to `nexec` ranges
/// that are the image's executable text; `poker` is a valid poker that writes that text
/// safely; `ifuncs` is null or writable. As for `kernel_loader::patch::init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_init(
    exec: *const KsitesRange,
    nexec: usize,
    poker_ptr: *const KsitesPoker,
    ifuncs: *mut u32,
) -> c_int {
    // SAFETY: the caller's precondition.
    let Some(mut p) = (unsafe { poker(poker_ptr) }) else {
        return KSITES_EINVAL;
    };
    if exec.is_null() || nexec == 0 || nexec > MAX_EXEC_RANGES {
        return KSITES_EINVAL;
    }
    // SAFETY: the caller passes `nexec` valid ranges.
    let c_ranges = unsafe { core::slice::from_raw_parts(exec, nexec) };
    let mut ranges: [Range<u64>; MAX_EXEC_RANGES] = Default::default();
    for (r, c) in ranges.iter_mut().zip(c_ranges) {
        *r = c.start..c.end;
    }
    let ranges = &ranges[..nexec];
    if INITIALIZED.load(Ordering::Acquire) {
        return KSITES_EALREADY;
    }
    let run = |p: &mut CPoker| -> Result<u32, Error> {
        // SAFETY: the caller's precondition (this image, processed by `ksites embed`).
        let table = unsafe { cell::image_table(ranges) }?;
        // SAFETY: the caller's precondition.
        let report = unsafe { patch::init(&table, ranges, &CpuFeatures::detect(), p) }?;
        probe::register_image(table, p)?;
        Ok(report.ifuncs)
    };
    match run(&mut p) {
        Ok(n) => {
            INITIALIZED.store(true, Ordering::Release);
            // SAFETY: the caller's precondition: null or writable.
            if let Some(out) = unsafe { ifuncs.as_mut() } {
                *out = n;
            }
            KSITES_OK
        }
        // A Rust part of the kernel initialized already.
        Err(
            Error::Patch(PatchError::AlreadyPatched { .. })
            | Error::Probe(ProbeError::AlreadyRegistered),
        ) => KSITES_EALREADY,
        Err(e) => code(e),
    }
}

/// Set once [`ksites_init`] succeeded.
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// The id of probe `spec` ("provider:name").
///
/// # Safety
///
/// `spec` is null or a NUL-terminated string; `id` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_probe_lookup(spec: *const c_char, id: *mut u32) -> c_int {
    if spec.is_null() || id.is_null() {
        return KSITES_EINVAL;
    }
    // SAFETY: the caller's precondition.
    let Ok(spec) = unsafe { CStr::from_ptr(spec) }.to_str() else {
        return KSITES_EINVAL;
    };
    match probe::lookup(spec) {
        Some(found) => {
            // SAFETY: the caller's precondition: writable.
            unsafe { *id = found.0 };
            KSITES_OK
        }
        None => KSITES_ENOTFOUND,
    }
}

/// Each probe's C handler (a [`KsitesHandler`] address, or 0).
static C_HANDLERS: [AtomicUsize; MAX_PROBES] = [const { AtomicUsize::new(0) }; MAX_PROBES];

/// The Rust handler every C-enabled probe gets: runs the probe's C handler.
fn dispatch(id: ProbeId, args: &[u64; 6]) {
    let h = C_HANDLERS
        .get(id.0 as usize)
        .map_or(0, |h| h.load(Ordering::Acquire));
    if h != 0 {
        // SAFETY: only `ksites_probe_enable` stores here, and only KsitesHandler addresses.
        let h: KsitesHandler = unsafe { core::mem::transmute::<usize, KsitesHandler>(h) };
        // SAFETY: the handler's contract (ksites.h); `args` points to six u64s.
        unsafe { h(id.0, args.as_ptr()) }
    }
}

/// Enables probe `id`: every site of it calls `handler` (replacing any handler it had;
/// on error, the old handler stays).
///
/// # Safety
///
/// `handler` is a valid function; `poker` writes the live text safely for every CPU
/// that may run it; #BP reaches the hook. As for `kernel_loader::probe::enable`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_probe_enable(
    id: u32,
    handler: Option<KsitesHandler>,
    poker_ptr: *const KsitesPoker,
) -> c_int {
    // SAFETY: the caller's precondition.
    let (Some(handler), Some(mut p)) = (handler, unsafe { poker(poker_ptr) }) else {
        return KSITES_EINVAL;
    };
    let Some(slot) = C_HANDLERS.get(id as usize) else {
        return KSITES_ENOTFOUND;
    };
    if probe::info(ProbeId(id)).is_none() {
        return KSITES_ENOTFOUND;
    }
    let old = slot.swap(handler as usize, Ordering::AcqRel);
    // SAFETY: the caller's precondition.
    let r = result(unsafe { probe::enable(ProbeId(id), dispatch, &mut p) });
    if r != KSITES_OK {
        // A failed enable leaves the probe in its old state: so is its handler.
        // (Unless another enable stored its own handler meanwhile.)
        let _ = slot.compare_exchange(handler as usize, old, Ordering::AcqRel, Ordering::Relaxed);
    }
    r
}

/// Disables every enabled probe whose C handler lies in `code` (a module's memory about
/// to be freed), as the loader does for Rust handlers when a load fails; `Err` with the
/// first failure's code (that probe stays enabled).
///
/// # Safety
///
/// As for [`ksites_probe_disable`].
pub(crate) unsafe fn disable_c_handlers_in(code: &Range<u64>, p: &mut CPoker) -> Result<(), c_int> {
    for (id, h) in (0u32..).zip(C_HANDLERS.iter()) {
        let h = h.load(Ordering::Acquire) as u64;
        if h != 0 && code.contains(&h) && probe::info(ProbeId(id)).is_some_and(|i| i.enabled) {
            // SAFETY: the caller's precondition.
            match unsafe { disable(id, p) } {
                KSITES_OK => {}
                rc => return Err(rc),
            }
        }
    }
    Ok(())
}

/// Disables probe `id`.
///
/// # Safety
///
/// As for [`ksites_probe_enable`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_probe_disable(id: u32, poker_ptr: *const KsitesPoker) -> c_int {
    // SAFETY: the caller's precondition.
    let Some(mut p) = (unsafe { poker(poker_ptr) }) else {
        return KSITES_EINVAL;
    };
    // SAFETY: the caller's precondition.
    unsafe { disable(id, &mut p) }
}

/// Disables probe `id` and, once it is (no handler runs any more), forgets its C
/// handler.
///
/// # Safety
///
/// As for [`ksites_probe_disable`].
unsafe fn disable(id: u32, p: &mut CPoker) -> c_int {
    // SAFETY: the caller's precondition.
    let r = result(unsafe { probe::disable(ProbeId(id), p) });
    if r == KSITES_OK
        && let Some(h) = C_HANDLERS.get(id as usize)
    {
        h.store(0, Ordering::Release);
    }
    r
}

/// How many times probe `id` fired while enabled (0 for an unknown id).
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_hits(id: u32) -> u64 {
    probe::info(ProbeId(id)).map_or(0, |i| i.hits)
}

/// The #BP hook: 1 if the `int3` at `frame` was a probe site's (write back rip, rsp and
/// rax), 0 if not (or `frame` is null).
///
/// # Safety
///
/// `frame` is null or the interrupted context of a #BP on this CPU, as for
/// `kernel_loader::probe::handle_int3`.
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_handle_int3(frame: *mut probe::Int3Frame) -> c_int {
    // SAFETY: the caller's precondition: null or a valid, exclusive frame.
    let Some(f) = (unsafe { frame.as_mut() }) else {
        return 0;
    };
    // SAFETY: the caller's precondition.
    c_int::from(unsafe { probe::handle_int3(f) })
}

/// The address of the ready #BP entry stub (`kernel_loader::probe::int3_entry`).
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_int3_entry_address() -> u64 {
    probe::int3_entry_address()
}

/// Declares the #BP route (`kernel_loader::probe::declare_int3_route`).
///
/// # Safety
///
/// Every #BP on every CPU that may run probe sites reaches the hook, for as long as
/// probes may be enabled.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_declare_int3_route() {
    // SAFETY: the caller's precondition.
    unsafe { probe::declare_int3_route() }
}

/// The global allocator of a no_std C kernel's staticlib (feature `no-alloc`): refuses
/// every request (null). The loader never allocates; `object` only links `alloc`.
#[cfg(all(feature = "no-alloc", not(feature = "std")))]
#[global_allocator]
static NO_ALLOC: NoAlloc = NoAlloc;

/// See [`NO_ALLOC`].
#[cfg(all(feature = "no-alloc", not(feature = "std")))]
struct NoAlloc;

// SAFETY: `alloc` always fails (null), which `GlobalAlloc` permits; `dealloc` can then
// never be called with a pointer this allocator returned, so it does nothing.
#[cfg(all(feature = "no-alloc", not(feature = "std")))]
unsafe impl core::alloc::GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

/// Spins: the panic handler of a no_std C kernel's staticlib (feature `panic-handler`).
#[cfg(all(feature = "panic-handler", not(feature = "std")))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
