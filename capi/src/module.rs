//! The C API's module loader (`ksites_module_*` in `ksites.h`) over
//! `kernel_loader::module`: load an embedded ET_REL object into memory the kernel's C
//! callbacks provide, resolve its symbols against the kernel's export array (and an
//! optional lookup callback; the loader's runtime entry points and the C API itself are
//! always exported), patch its ifunc sites, register its probes, run its init; unload,
//! symbol lookup, hold/release, and what loading did.
//!
//! Loaded modules live in a fixed pool of [`MAX_MODULES`] slots (no allocator). A
//! `struct ksites_module *` is an opaque handle naming one slot and one load of it (a
//! generation number): every call checks both, so a handle is invalid
//! (`KSITES_EINVAL`) for ever once its module is unloaded, even after the slot is reused
//! by another load. Each slot has a reader-writer lock, never waited for: load and
//! unload take it exclusively, the other calls shared, so any number of CPUs may look
//! up symbols or hold and release a module at once, and only a call that meets a load
//! or unload in progress on the same slot (another CPU, or the module's own init or
//! exit calling back) returns `KSITES_EBUSY` instead of spinning.

use core::ffi::{CStr, c_char, c_int, c_void};
use core::fmt::{self, Write as _};
use core::ops::Range;

use kernel_loader::module::{
    Export, Kernel, MAX_KERNEL_EXEC, Module, ModuleError, ModuleMemory, Prot, ProtectError,
    RUNTIME_EXPORTS, Region, RelocFailure, Symbols,
};
use kernel_loader::probe::ProbeError;
use kernel_loader::{CpuFeatures, Error, cell};

use crate::{
    CPoker, KSITES_EBUSY, KSITES_EFORMAT, KSITES_EINIT, KSITES_EINVAL, KSITES_ELEAKED,
    KSITES_EMODULE, KSITES_EMODULES, KSITES_ENOMEM, KSITES_ENOTEMBEDDED, KSITES_ENOTFOUND,
    KSITES_ENOTIFUNC, KSITES_EOVERFLOW, KSITES_EPROTECT, KSITES_ESYMBOL, KSITES_EUNSUPPORTED,
    KSITES_OK, KsitesPoker, KsitesRange, code, poker,
};

/// Most modules loaded at once.
pub const MAX_MODULES: usize = 16;

/// `KSITES_PROT_RX`: read + execute (code).
pub const KSITES_PROT_RX: c_int = 1;
/// `KSITES_PROT_R`: read-only (rodata, the module's table).
pub const KSITES_PROT_R: c_int = 2;
/// `KSITES_PROT_RW`: read + write (data, bss, bookkeeping; freed memory).
pub const KSITES_PROT_RW: c_int = 3;
/// What `protect` returns for a range outside the region.
pub const KSITES_PROTECT_RANGE: c_int = 1;

/// `struct ksites_export`: one kernel symbol a module may link against.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KsitesExport {
    /// NUL-terminated name (entries with a null name are skipped).
    pub name: *const c_char,
    /// Its address.
    pub addr: u64,
}

/// `struct ksites_region`: memory from the kernel's `alloc`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KsitesRegion {
    /// Where the loader writes.
    pub ptr: *mut c_void,
    /// The address the module runs at (normally `ptr`).
    pub addr: u64,
    /// Size in bytes, at least what was asked, a multiple of 4096.
    pub size: usize,
}

/// Allocates `size` bytes (page-aligned, RW, within rel32 reach of the kernel); 0 on
/// success.
pub type AllocFn = unsafe extern "C" fn(*mut c_void, usize, *mut KsitesRegion) -> c_int;
/// Sets `len` bytes at `offset` of a region to a `KSITES_PROT_*`; 0 on success,
/// `KSITES_PROTECT_RANGE` for a range outside it, anything else: the mapping failed.
pub type ProtectFn =
    unsafe extern "C" fn(*mut c_void, *const KsitesRegion, usize, usize, c_int) -> c_int;
/// Takes a region back.
pub type FreeFn = unsafe extern "C" fn(*mut c_void, *const KsitesRegion);
/// Looks up `len` bytes of name (not NUL-terminated); 1 and the address, or 0.
pub type LookupFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize, *mut u64) -> c_int;

/// `struct ksites_module_env`: what modules load against.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KsitesModuleEnv {
    /// Passed to every callback.
    pub ctx: *mut c_void,
    /// The kernel's exports.
    pub exports: *const KsitesExport,
    /// How many.
    pub nexports: usize,
    /// Optional: names not in `exports`.
    pub lookup: Option<LookupFn>,
    /// The kernel's executable ranges (its table is validated against them).
    pub exec: *const KsitesRange,
    /// How many (1 to [`MAX_KERNEL_EXEC`]).
    pub nexec: usize,
    /// Required.
    pub alloc: Option<AllocFn>,
    /// Required.
    pub protect: Option<ProtectFn>,
    /// Required.
    pub free: Option<FreeFn>,
}

/// `struct ksites_module_info`: what loading did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KsitesModuleInfo {
    /// The module's code: `[text_start, text_end)`.
    pub text_start: u64,
    /// End of its code.
    pub text_end: u64,
    /// All of its memory.
    pub mem_start: u64,
    /// End of its memory.
    pub mem_end: u64,
    /// Allocated sections placed.
    pub sections: u32,
    /// Relocations applied.
    pub relocations: u32,
    /// Undefined symbols resolved against the kernel.
    pub kernel_symbols: u32,
    /// The module's own ifuncs.
    pub ifuncs: u32,
    /// Kernel ifuncs it imports.
    pub imports: u32,
    /// Ifunc sites patched into direct branches.
    pub sites_patched: u32,
    /// Probes (global ids `first_probe ..`).
    pub probes: u32,
    /// Probe sites.
    pub probe_sites: u32,
    /// The first probe's id.
    pub first_probe: u32,
    /// Outstanding holds.
    pub users: u32,
}

/// The kernel's memory callbacks, kept with each module for its unload, and the poker
/// of the current load or unload.
#[derive(Clone, Copy)]
struct CMemory {
    ctx: *mut c_void,
    alloc: AllocFn,
    protect: ProtectFn,
    free: FreeFn,
    poker: KsitesPoker,
    /// A probe with a C handler in the module could not be disabled when its memory was
    /// to be released: the memory was kept (leaked) instead, and unload says so.
    handler_left_enabled: bool,
}

impl ModuleMemory for CMemory {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        let mut r = KsitesRegion {
            ptr: core::ptr::null_mut(),
            addr: 0,
            size: 0,
        };
        // SAFETY: the C caller of load promised valid callbacks; `r` is writable.
        let rc = unsafe { (self.alloc)(self.ctx, size, &mut r) };
        (rc == 0 && !r.ptr.is_null() && r.size >= size).then(|| Region {
            ptr: r.ptr.cast(),
            addr: r.addr,
            size: r.size,
        })
    }

    unsafe fn protect(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        prot: Prot,
    ) -> Result<(), ProtectError> {
        let r = c_region(region);
        if prot == Prot::ReadWrite && offset == 0 && len == region.size {
            // The loader releases the region (a failed load, or an unload after the
            // module's exit): no enabled probe may keep a C handler in it. (Rust
            // handlers the loader checks itself; C ones all go through `dispatch`.)
            let start = region.addr;
            let code = start..start.saturating_add(region.size as u64);
            // SAFETY: the C caller of load/unload promised a poker that writes live
            // text safely; the region is still mapped.
            if unsafe { crate::disable_c_handlers_in(&code, &mut CPoker(self.poker)) }.is_err() {
                // Not made writable, so not freed: the handler's code stays.
                self.handler_left_enabled = true;
                return Err(ProtectError::Failed);
            }
        }
        let prot = match prot {
            Prot::ReadExec => KSITES_PROT_RX,
            Prot::Read => KSITES_PROT_R,
            Prot::ReadWrite => KSITES_PROT_RW,
        };
        // SAFETY: the C caller promised valid callbacks; the loader's precondition holds.
        match unsafe { (self.protect)(self.ctx, &r, offset, len, prot) } {
            0 => Ok(()),
            KSITES_PROTECT_RANGE => Err(ProtectError::OutOfRange),
            _ => Err(ProtectError::Failed),
        }
    }

    unsafe fn free(&mut self, region: Region) {
        let r = c_region(&region);
        // SAFETY: the C caller promised valid callbacks; nothing refers to the region.
        unsafe { (self.free)(self.ctx, &r) }
    }
}

fn c_region(r: &Region) -> KsitesRegion {
    KsitesRegion {
        ptr: r.ptr.cast(),
        addr: r.addr,
        size: r.size,
    }
}

/// The C API's own entry points, exported to every module (a C module may look up and
/// toggle probes).
static CAPI_EXPORTS: [Export; 5] = [
    Export::new(
        "ksites_probe_lookup",
        crate::ksites_probe_lookup as *const (),
    ),
    Export::new(
        "ksites_probe_enable",
        crate::ksites_probe_enable as *const (),
    ),
    Export::new(
        "ksites_probe_disable",
        crate::ksites_probe_disable as *const (),
    ),
    Export::new("ksites_probe_hits", crate::ksites_probe_hits as *const ()),
    Export::new("ksites_strerror", crate::ksites_strerror as *const ()),
];
static RUNTIME: [Export; 4] = RUNTIME_EXPORTS;

/// The kernel's exports as [`Symbols`]: the loader's runtime entry points, the C API,
/// the C array, then the C callback.
struct CSymbols<'a> {
    exports: &'a [KsitesExport],
    ctx: *mut c_void,
    lookup: Option<LookupFn>,
}

impl Symbols for CSymbols<'_> {
    fn lookup(&self, name: &str) -> Option<u64> {
        if let Some(a) = RUNTIME.lookup(name).or_else(|| CAPI_EXPORTS.lookup(name)) {
            return Some(a);
        }
        for e in self.exports.iter().filter(|e| !e.name.is_null()) {
            // SAFETY: the C caller promised NUL-terminated names (null ones are skipped).
            if unsafe { CStr::from_ptr(e.name) }.to_bytes() == name.as_bytes() {
                return Some(e.addr);
            }
        }
        let f = self.lookup?;
        let mut addr = 0u64;
        // SAFETY: the C caller promised a valid callback; `name` is valid for its
        // length and `addr` writable.
        let found = unsafe { f(self.ctx, name.as_ptr().cast(), name.len(), &mut addr) };
        (found != 0).then_some(addr)
    }
}

/// A loaded module and the memory callbacks that free it.
struct Loaded {
    module: Module<'static>,
    mem: CMemory,
}

// SAFETY: `Module` is Send; the callbacks' `ctx` is the kernel's, which the C caller
// promised may be used from whichever CPU loads and unloads (ksites.h).
unsafe impl Send for Loaded {}

// SAFETY: a shared `&Loaded` only reaches `with_module`'s closures, which call
// `Module`'s `&self` methods (symbol lookup and the load report read immutable data;
// hold and release are atomic counters); `mem` (raw C pointers) is used only under the
// slot's exclusive lock, by load and unload.
unsafe impl Sync for Loaded {}

/// `struct ksites_module`: what a handle points into (opaque to C; a handle is not
/// this slot's address but [`handle`]'s encoding of its index and generation).
#[derive(Debug)]
pub struct KsitesModule {
    slot: spin::RwLock<Slot>,
}

/// A slot's state: the module loaded in it, and how many loads it has had (the
/// generation a handle must carry).
#[derive(Debug)]
struct Slot {
    generation: u32,
    loaded: Option<Loaded>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.module, f)
    }
}

static MODULES: [KsitesModule; MAX_MODULES] = [const {
    KsitesModule {
        slot: spin::RwLock::new(Slot {
            generation: 0,
            loaded: None,
        }),
    }
}; MAX_MODULES];

/// High bits every handle carries ("ks"), so a stray pointer is never mistaken for one.
const HANDLE_TAG: usize = 0x6b73 << 48;
/// Bits of a handle that hold the slot index plus one (`MAX_MODULES` fits).
const INDEX_BITS: u32 = 8;

/// The handle of load number `generation` of slot `index`.
fn handle(index: usize, generation: u32) -> *mut KsitesModule {
    let raw = HANDLE_TAG | ((generation as usize) << INDEX_BITS) | (index + 1);
    core::ptr::without_provenance_mut(raw)
}

/// The slot a handle names and the generation it carries, if it is well formed
/// (whether that load is still the slot's is checked under the slot's lock).
fn slot(m: *const KsitesModule) -> Option<(&'static KsitesModule, u32)> {
    let raw = m.addr();
    if raw & !((1 << 48) - 1) != HANDLE_TAG {
        return None;
    }
    let index = (raw & ((1 << INDEX_BITS) - 1)).checked_sub(1)?;
    let generation = u32::try_from((raw & ((1 << 48) - 1)) >> INDEX_BITS).ok()?;
    Some((MODULES.get(index)?, generation))
}

/// The error code of a module error.
pub(crate) fn module_code(e: ModuleError) -> c_int {
    match e {
        ModuleError::Elf(_)
        | ModuleError::Malformed(_)
        | ModuleError::BadTableSection
        | ModuleError::NotRelocatable { .. }
        | ModuleError::BadRelocation { .. } => KSITES_EMODULE,
        ModuleError::NotEmbedded { .. } => KSITES_ENOTEMBEDDED,
        ModuleError::UnknownSymbol { .. } => KSITES_ESYMBOL,
        ModuleError::UnsupportedSymbol { .. } | ModuleError::UnsupportedRelocation { .. } => {
            KSITES_EUNSUPPORTED
        }
        ModuleError::Overflow { .. } => KSITES_EOVERFLOW,
        ModuleError::RelocationFailed { why, .. } => match why {
            RelocFailure::Unsupported => KSITES_EUNSUPPORTED,
            RelocFailure::Misaligned { .. } => KSITES_EMODULE,
            _ => KSITES_EOVERFLOW,
        },
        ModuleError::OutOfMemory { .. } => KSITES_ENOMEM,
        ModuleError::Protect(_) => KSITES_EPROTECT,
        ModuleError::Table(_) => KSITES_EFORMAT,
        ModuleError::NotAKernelIfunc { .. } => KSITES_ENOTIFUNC,
        ModuleError::Patch(p) => code(Error::Patch(p)),
        ModuleError::Probe(ProbeError::HandlerInModule { .. }) | ModuleError::InUse { .. } => {
            KSITES_EBUSY
        }
        ModuleError::Probe(p) => code(Error::Probe(p)),
        ModuleError::InitFailed(_) => KSITES_EINIT,
        ModuleError::CleanupFailed(_) => KSITES_ELEAKED,
    }
}

/// Writes into a C buffer, truncating, always NUL-terminated (if it has room for one).
struct MsgBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for MsgBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len().saturating_sub(1 + self.len);
        let n = s.len().min(room);
        if let Some(dst) = self.buf.get_mut(self.len..self.len + n) {
            dst.copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
        }
        if let Some(nul) = self.buf.get_mut(self.len) {
            *nul = 0;
        }
        Ok(())
    }
}

/// Writes `what` into the C buffer `msg` of `len` bytes (nothing if null or empty).
///
/// # Safety
///
/// `msg` is null or writable for `len` bytes.
unsafe fn message(msg: *mut c_char, len: usize, what: fmt::Arguments<'_>) {
    if msg.is_null() || len == 0 {
        return;
    }
    // SAFETY: the caller's precondition.
    let buf = unsafe { core::slice::from_raw_parts_mut(msg.cast::<u8>(), len) };
    buf[0] = 0;
    let _ = MsgBuf { buf, len: 0 }.write_fmt(what);
}

/// The memory callbacks of `env`, if all three are there.
fn memory(env: &KsitesModuleEnv, p: &CPoker) -> Option<CMemory> {
    Some(CMemory {
        ctx: env.ctx,
        alloc: env.alloc?,
        protect: env.protect?,
        free: env.free?,
        poker: p.0,
        handler_left_enabled: false,
    })
}

/// Loads the embedded ET_REL module `image` (`len` bytes) as `name`; `*out` gets its
/// handle. On failure, nothing is left patched, registered or allocated, and `msg` (if
/// not null) gets the loader's full message (naming the symbol, relocation or section).
///
/// # Safety
///
/// `name` (NUL-terminated) and `image` stay valid and unchanged until the module is
/// unloaded; `env` and everything it points to are valid (its callbacks as
/// `ksites.h` describes; `exec` is the kernel's text, whose table the loader reads
/// through its cell); `poker` writes module text safely; `out` is writable; `msg` is
/// null or writable for `msg_len` bytes. The module's code is trusted (its resolvers
/// and init run now). As for `kernel_loader::module::Module::load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_module_load(
    name: *const c_char,
    image: *const c_void,
    len: usize,
    env: *const KsitesModuleEnv,
    poker_ptr: *const KsitesPoker,
    out: *mut *mut KsitesModule,
    msg: *mut c_char,
    msg_len: usize,
) -> c_int {
    // SAFETY: `msg`: the caller's precondition.
    let fail = |rc: c_int, what: fmt::Arguments<'_>| {
        // SAFETY: as above.
        unsafe { message(msg, msg_len, what) };
        rc
    };
    // SAFETY: the caller's preconditions: null or valid.
    let (env, p) = unsafe { (env.as_ref(), poker(poker_ptr)) };
    let (Some(env), Some(mut p)) = (env, p) else {
        return fail(KSITES_EINVAL, format_args!("null env or invalid poker"));
    };
    let Some(mut mem) = memory(env, &p) else {
        return fail(
            KSITES_EINVAL,
            format_args!("env lacks alloc, protect or free"),
        );
    };
    if name.is_null() || image.is_null() || len == 0 || out.is_null() {
        return fail(
            KSITES_EINVAL,
            format_args!("null name, image or out, or len 0"),
        );
    }
    if env.exec.is_null() || env.nexec == 0 || env.nexec > MAX_KERNEL_EXEC {
        return fail(
            KSITES_EINVAL,
            format_args!("env.exec: 1 to {MAX_KERNEL_EXEC} ranges"),
        );
    }
    if env.exports.is_null() && env.nexports != 0 {
        return fail(KSITES_EINVAL, format_args!("env.exports is null"));
    }
    // SAFETY: the caller's precondition: NUL-terminated, valid until unload.
    let Ok(name) = (unsafe { CStr::from_ptr::<'static>(name) }).to_str() else {
        return fail(KSITES_EINVAL, format_args!("name is not UTF-8"));
    };
    // SAFETY: the caller's precondition: `len` bytes, valid and unchanged until unload.
    let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(image.cast(), len) };
    // SAFETY: the caller's precondition: `nexec` ranges.
    let c_exec = unsafe { core::slice::from_raw_parts(env.exec, env.nexec) };
    let mut exec: [Range<u64>; MAX_KERNEL_EXEC] = Default::default();
    for (r, c) in exec.iter_mut().zip(c_exec) {
        *r = c.start..c.end;
    }
    let exec = &exec[..env.nexec];
    let exports: &[KsitesExport] = if env.exports.is_null() {
        &[]
    } else {
        // SAFETY: the caller's precondition: `nexports` entries.
        unsafe { core::slice::from_raw_parts(env.exports, env.nexports) }
    };
    // A free slot, locked for the whole load.
    let Some((index, mut guard)) = MODULES
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.slot.try_write().map(|g| (i, g)))
        .find(|(_, g)| g.loaded.is_none())
    else {
        return fail(
            KSITES_EMODULES,
            format_args!("{MAX_MODULES} modules are loaded (or busy)"),
        );
    };
    // SAFETY: the caller's precondition: this kernel was processed by `ksites embed`
    // and `exec` is its text.
    let table = match unsafe { cell::image_table(exec) } {
        Ok(t) => t,
        Err(e) => return fail(code(Error::Cell(e)), format_args!("kernel table: {e}")),
    };
    let symbols = CSymbols {
        exports,
        ctx: env.ctx,
        lookup: env.lookup,
    };
    let kernel = Kernel {
        symbols: &symbols,
        table: Some(table),
        exec,
        features: CpuFeatures::detect(),
    };
    // SAFETY: the caller's preconditions, which are `Module::load`'s: memory the kernel
    // can execute within reach, a poker that writes it, this kernel's exports and table
    // (so every import is checked against the kernel's ifuncs), trusted module code.
    match unsafe { Module::load(name, bytes, &kernel, &mut mem, &mut p) } {
        Ok(module) => {
            // A new generation for every load: handles of earlier ones stay invalid
            // (the counter wraps after 2^32 loads of one slot).
            guard.generation = guard.generation.wrapping_add(1);
            guard.loaded = Some(Loaded { module, mem });
            // SAFETY: the caller's precondition: writable.
            unsafe { *out = handle(index, guard.generation) };
            KSITES_OK
        }
        Err(e) => fail(module_code(e), format_args!("{name}: {e}")),
    }
}

/// Unloads `m`: refused with `KSITES_EBUSY` while it is held (nothing run) or, after
/// its `ksites_module_exit` ran, while an enabled probe's Rust handler lies in its code
/// (it stays loaded); otherwise its probes are disabled and unregistered, every probe
/// still enabled with a C handler in its code is disabled (as a failed load does), and
/// its memory goes back through the `free` callback it was loaded with. The handle is
/// then invalid for ever. If such a probe could not be disabled (the poker failed), the
/// module is unloaded but its memory is kept, not freed, and this returns
/// `KSITES_ELEAKED`: that probe still calls into the module's code.
///
/// # Safety
///
/// `m` is null or a handle from `ksites_module_load`; `poker` writes module text
/// safely; no CPU runs the module's code any more (other than its probe sites, which
/// this disables). As for `kernel_loader::module::Module::unload`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_module_unload(
    m: *mut KsitesModule,
    poker_ptr: *const KsitesPoker,
) -> c_int {
    // SAFETY: the caller's precondition: null or valid.
    let (Some((s, generation)), Some(mut p)) = (slot(m), unsafe { poker(poker_ptr) }) else {
        return KSITES_EINVAL;
    };
    let Some(mut guard) = s.slot.try_write() else {
        return KSITES_EBUSY;
    };
    if guard.generation != generation {
        return KSITES_EINVAL;
    }
    let Some(Loaded { module, mut mem }) = guard.loaded.take() else {
        return KSITES_EINVAL;
    };
    mem.poker = p.0;
    // SAFETY: the caller's preconditions.
    match unsafe { module.unload(&mut mem, &mut p) } {
        // Unloaded, but a probe still calls a C handler in its code: the memory was
        // kept, and the caller must know the module's code still runs.
        Ok(()) if mem.handler_left_enabled => KSITES_ELEAKED,
        Ok(()) => KSITES_OK,
        Err((module, e)) => {
            guard.loaded = Some(Loaded { module, mem });
            module_code(e)
        }
    }
}

/// Runs `f` on the loaded module `m`: `KSITES_EINVAL` for a handle that is not a
/// loaded module's, `KSITES_EBUSY` while a load or unload holds its slot.
fn with_module(m: *const KsitesModule, f: impl FnOnce(&Module<'static>) -> c_int) -> c_int {
    let Some((s, generation)) = slot(m) else {
        return KSITES_EINVAL;
    };
    let Some(guard) = s.slot.try_read() else {
        return KSITES_EBUSY;
    };
    match &guard.loaded {
        Some(l) if guard.generation == generation => f(&l.module),
        _ => KSITES_EINVAL,
    }
}

/// The address of the global symbol `name` the module defines (`KSITES_ENOTFOUND`).
///
/// # Safety
///
/// `name` is null or NUL-terminated; `addr` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_module_symbol(
    m: *const KsitesModule,
    name: *const c_char,
    addr: *mut u64,
) -> c_int {
    if name.is_null() || addr.is_null() {
        return KSITES_EINVAL;
    }
    // SAFETY: the caller's precondition.
    let Ok(name) = unsafe { CStr::from_ptr(name) }.to_str() else {
        return KSITES_EINVAL;
    };
    with_module(m, |module| match module.symbol(name) {
        Some(a) => {
            // SAFETY: the caller's precondition: writable.
            unsafe { *addr = a };
            KSITES_OK
        }
        None => KSITES_ENOTFOUND,
    })
}

/// What loading `m` did, into `*info`.
///
/// # Safety
///
/// `info` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_module_info(
    m: *const KsitesModule,
    info: *mut KsitesModuleInfo,
) -> c_int {
    if info.is_null() {
        return KSITES_EINVAL;
    }
    with_module(m, |module| {
        let r = module.report();
        let (text, mem, probes) = (module.text(), module.memory(), module.probe_ids());
        let i = KsitesModuleInfo {
            text_start: text.start,
            text_end: text.end,
            mem_start: mem.start,
            mem_end: mem.end,
            sections: r.sections,
            relocations: r.relocations,
            kernel_symbols: r.kernel_symbols,
            ifuncs: r.ifuncs,
            imports: r.imports,
            sites_patched: r.patch.sites_patched,
            probes: probes.end - probes.start,
            probe_sites: r.probe_sites,
            first_probe: probes.start,
            users: module.users(),
        };
        // SAFETY: the caller's precondition: writable.
        unsafe { *info = i };
        KSITES_OK
    })
}

/// Something now depends on `m`: unload refuses (`KSITES_EBUSY`) until a matching
/// [`ksites_module_release`].
#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_hold(m: *const KsitesModule) -> c_int {
    with_module(m, |module| {
        module.hold();
        KSITES_OK
    })
}

/// Drops a [`ksites_module_hold`].
#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_release(m: *const KsitesModule) -> c_int {
    with_module(m, |module| {
        module.release();
        KSITES_OK
    })
}
