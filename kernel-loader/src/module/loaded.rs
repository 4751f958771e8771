//! [`Module`]: a loaded module, steps 5–8 of a load (permissions, ifunc patching,
//! registration of its probes and static-key sites, init) and unload.

use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicU32, Ordering};

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::Sym as _;

use crate::format::Table;
use crate::patch::{self, TextPoker};
use crate::probe::{self, ImageHandle, ProbeError};

use super::error::ModuleError;
use super::layout::Group;
use super::link::{Layout, is_loaded, link};
use super::machine::Machine;
use super::object::Object;
use super::{
    EXIT_SYMBOL, INIT_SYMBOL, Kernel, LoadReport, MAX_KERNEL_EXEC, ModuleMemory, Prot, Region,
};

/// A loaded module. Free it with [`Module::unload`]; dropping it frees nothing (its
/// memory and probes stay, which is safe but leaks).
pub struct Module<'b> {
    name: &'static str,
    bytes: &'b [u8],
    region: Region,
    layout: Layout,
    table: Option<Table<'static>>,
    probes: Option<ImageHandle>,
    exit: Option<u64>,
    users: AtomicU32,
    report: LoadReport,
}

// SAFETY: a `Module` owns its region (the raw pointer is its memory, used only through
// `&mut self` or read-only lookups); the kernel decides which CPU loads and unloads.
unsafe impl Send for Module<'_> {}
// SAFETY: shared access only reads immutable fields, the atomic `users`, and the
// region's table and bookkeeping, which nothing writes once the load has returned.
unsafe impl Sync for Module<'_> {}

impl fmt::Debug for Module<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
            .field("addr", &format_args!("{:#x}", self.region.addr))
            .field("size", &self.region.size)
            .field("report", &self.report)
            .finish()
    }
}

impl<'b> Module<'b> {
    /// Loads `bytes` (steps 1–8 of the [module docs](crate::module)).
    ///
    /// # Safety
    ///
    /// 1. `mem` returns memory the kernel can execute once protected RX, within rel32
    ///    reach of the kernel; `poker` can write that memory once it is read-only, and
    ///    serialize every CPU.
    /// 2. `kernel` describes this running kernel (its exports and table are live), and
    ///    the kernel's #BP handler calls [`probe::handle_int3`].
    /// 3. The module's code is trusted: its resolvers and init run with kernel
    ///    privileges.
    /// 4. When `kernel.table` is `None`, every ifunc the module imports names the
    ///    trampoline of an ifunc the kernel defines (with the table, the loader checks
    ///    this itself and refuses anything else with [`ModuleError::NotAKernelIfunc`]).
    pub unsafe fn load(
        name: &'static str,
        bytes: &'b [u8],
        kernel: &Kernel<'_>,
        mem: &mut dyn ModuleMemory,
        poker: &mut dyn TextPoker,
    ) -> Result<Module<'b>, ModuleError> {
        let (region, layout, mut report, table) = link(bytes, kernel, mem, &mut |_| {}, true)?;
        let mut m = Module {
            name,
            bytes,
            region,
            layout,
            table,
            probes: None,
            exit: None,
            users: AtomicU32::new(0),
            report,
        };
        // From here on every failure goes through `fail`, which frees the region.
        fn fail<'b>(
            m: Module<'b>,
            mem: &mut dyn ModuleMemory,
            poker: &mut dyn TextPoker,
            e: ModuleError,
        ) -> Result<Module<'b>, ModuleError> {
            // A failed init may have enabled probes with handlers in the module: they go
            // first, so nothing is left pointing into the freed memory.
            // SAFETY: the caller's preconditions; nothing holds the module.
            let _ = unsafe { probe::disable_handlers_in(m.text(), poker) };
            // SAFETY: as above.
            match unsafe { m.release_all(mem, poker) } {
                Ok(()) => Err(e),
                Err((_leaked, pe)) => {
                    // Something still points into the module: its memory is leaked on
                    // purpose rather than freed under a live reference (dropping a
                    // `Module` frees nothing).
                    Err(ModuleError::CleanupFailed(pe))
                }
            }
        }
        // 5. Permissions.
        // SAFETY: the region came from `mem.alloc`; nothing runs in it yet.
        if let Err(e) = unsafe { m.protect(mem) } {
            return fail(m, mem, poker, e);
        }
        // 6. Ifuncs.
        if let Some(t) = &m.table {
            let mut exec: [Range<u64>; MAX_KERNEL_EXEC + 1] = core::array::from_fn(|_| 0..0);
            exec[0] = m.text();
            for (d, s) in exec[1..].iter_mut().zip(kernel.exec) {
                *d = s.clone();
            }
            let exec = &exec[..1 + kernel.exec.len()];
            // SAFETY: `patch::init`'s preconditions: (1) the table was validated against
            // this module's memory and `exec`, its slots lie in the module's writable data
            // (checked in `link`); (2) no other CPU runs the module's text yet; (3) every
            // import is a kernel ifunc (checked against `kernel.table`, or our
            // precondition 4); the resolvers are `ifunc!` adapters (precondition 3).
            let r = unsafe { patch::init(t, exec, &kernel.features, poker) };
            match r {
                Ok(p) => report.patch = p,
                Err(e) => {
                    // The names are copied out of the table before `fail` frees it.
                    let e = ModuleError::Patch(e);
                    return fail(m, mem, poker, e);
                }
            }
        }
        m.report = report;
        // 7. Probes and static keys: every module with a table is registered (a key
        // batch finds the module's sites of a kernel key through the registry), its key
        // sites set to their keys' current state first, under the registry lock.
        if let Some(t) = m.table {
            // SAFETY: the table lives in the region, which outlives the registration
            // (`release_all` unregisters before freeing); no CPU runs the module's text
            // yet; its key addresses are its own key objects or the kernel's (`link`
            // relocated them against the kernel's exports).
            match unsafe { probe::register_loaded_module(t, m.range(), poker) } {
                Ok(h) => m.probes = Some(h),
                Err(e) => return fail(m, mem, poker, ModuleError::Probe(e)),
            }
        }
        // 8. Init.
        m.exit = m.code_symbol(EXIT_SYMBOL);
        if let Some(init) = m.code_symbol(INIT_SYMBOL) {
            // SAFETY: precondition 3: `ksites_module_init` is `extern "C" fn() -> i32`, in
            // the module's text, which is mapped RX.
            let init: extern "C" fn() -> i32 = unsafe { core::mem::transmute(init as usize) };
            let r = init();
            if r != 0 {
                return fail(m, mem, poker, ModuleError::InitFailed(r));
            }
        }
        Ok(m)
    }

    /// Unloads the module: refuses while it is held ([`ModuleError::InUse`], nothing
    /// run); runs `ksites_module_exit` (once, where a module undoes what it registered);
    /// refuses while an enabled probe anywhere still has its handler in the module's
    /// code (the module comes back with the error, still loaded, its exit already run);
    /// otherwise disables and unregisters its probes and frees its memory.
    ///
    /// # Safety
    ///
    /// As for [`Module::load`]; and no CPU executes the module's code or uses its data
    /// any more, other than through its probe sites, which this disables. The loader
    /// waits for CPUs in the int3 handler, in a probe's handler and in a lookup of the
    /// module's table; a CPU that entered a module probe's out-of-line block just before
    /// the disable (between the site's `jmp` and the dispatcher) is covered only by the
    /// kernel's own quiescence — unload when the module's callers are known to be
    /// stopped (the test kernel holds a module while other CPUs run it).
    // The module comes back by value with the error (no allocator to box it in).
    #[allow(clippy::result_large_err)]
    pub unsafe fn unload(
        mut self,
        mem: &mut dyn ModuleMemory,
        poker: &mut dyn TextPoker,
    ) -> Result<(), (Module<'b>, ModuleError)> {
        let users = self.users.load(Ordering::Acquire);
        if users != 0 {
            return Err((self, ModuleError::InUse { users }));
        }
        // Exit first: it is where a module undoes what it registered (a handler on a
        // kernel probe, say). It runs once, even if the unload is then refused.
        if let Some(exit) = self.exit.take() {
            // SAFETY: precondition 3 of `load` (the module's code is trusted):
            // `ksites_module_exit` is `extern "C" fn()`; `code_symbol` found it in the
            // module's text, which is mapped RX while the module is loaded.
            let exit: extern "C" fn() = unsafe { core::mem::transmute(exit as usize) };
            exit();
        }
        if let Some((probe, handler)) = probe::handler_in(&self.text(), self.probes.as_ref()) {
            return Err((
                self,
                ModuleError::Probe(ProbeError::HandlerInModule { probe, handler }),
            ));
        }
        // SAFETY: forwarded.
        match unsafe { self.release_all(mem, poker) } {
            Ok(()) => Ok(()),
            Err((m, e)) => Err((m, ModuleError::Probe(e))),
        }
    }

    /// Unregisters probes (if registered; this disables them and refuses while anything
    /// still points into the module), makes the region RW, frees it. On an error nothing
    /// is freed and the module comes back.
    ///
    /// # Safety
    ///
    /// As for [`Module::unload`].
    #[allow(clippy::result_large_err)]
    unsafe fn release_all(
        mut self,
        mem: &mut dyn ModuleMemory,
        poker: &mut dyn TextPoker,
    ) -> Result<(), (Module<'b>, ProbeError)> {
        if let Some(h) = self.probes {
            // SAFETY: forwarded.
            if let Err(e) = unsafe { probe::unregister_module(&h, self.text(), poker) } {
                return Err((self, e));
            }
            self.probes = None;
        }
        self.table = None;
        // Freed memory must not stay executable; if the kernel cannot make it writable
        // again, it is not handed back either.
        // SAFETY: the region came from `mem.alloc`; nothing runs in it any more (the
        // caller's precondition; its probes are unregistered, so disabled, above).
        if unsafe { mem.protect(&self.region, 0, self.region.size, Prot::ReadWrite) }.is_err() {
            // Leaked: dropping a `Module` frees nothing.
            return Ok(());
        }
        let region = core::mem::replace(
            &mut self.region,
            Region {
                ptr: core::ptr::null_mut(),
                addr: 0,
                size: 0,
            },
        );
        // SAFETY: nothing refers to the region any more: the table (the only slice
        // into it) is dropped and the probe registry no longer lists it.
        unsafe { mem.free(region) };
        Ok(())
    }

    /// Sets the three groups' permissions.
    ///
    /// # Safety
    ///
    /// The region came from `mem`.
    unsafe fn protect(&self, mem: &mut dyn ModuleMemory) -> Result<(), ModuleError> {
        let l = &self.layout;
        for (start, end, prot) in [
            (l.text, l.ro, Group::Exec.prot()),
            (l.ro, l.rw, Group::ReadOnly.prot()),
            // The writable group and the bookkeeping after it.
            (l.rw, l.veneers, Group::Writable.prot()),
            // The veneers (empty unless the module needs them).
            (l.veneers, l.end, Group::Exec.prot()),
        ] {
            if end > start {
                // SAFETY: forwarded.
                unsafe { mem.protect(&self.region, start, end - start, prot) }
                    .map_err(ModuleError::Protect)?;
            }
        }
        Ok(())
    }

    fn range(&self) -> Range<u64> {
        self.region.addr..self.region.addr + self.region.size as u64
    }

    /// The name it was loaded as.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The module's code.
    pub fn text(&self) -> Range<u64> {
        self.region.addr + self.layout.text as u64..self.region.addr + self.layout.ro as u64
    }

    /// The range-extension veneers the loader built for branches whose target is out
    /// of their reach (the architecture's `reloc::veneer`; empty where there are
    /// none), mapped read + execute: a branch site whose target lies here reaches the
    /// veneer's target.
    pub fn veneers(&self) -> Range<u64> {
        let start = self.region.addr + self.layout.veneers as u64;
        let len = Machine::native().veneer_len() as u64 * u64::from(self.report.veneers);
        start..start + len
    }

    /// All of its memory.
    pub fn memory(&self) -> Range<u64> {
        self.range()
    }

    /// What loading did.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The module's relocated table, if it has one.
    pub fn table(&self) -> Option<Table<'_>> {
        self.table
    }

    /// Its probes' global ids.
    pub fn probe_ids(&self) -> Range<u32> {
        self.probes.map_or(0..0, |h| h.base()..h.base() + h.count())
    }

    /// The address of a global symbol the module defines.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        let obj = Object::parse(self.bytes, true).ok()?;
        for (i, sym) in obj.symtab.enumerate() {
            if sym.st_bind() == elf::STB_LOCAL
                || sym.st_shndx(LE) == elf::SHN_UNDEF
                || obj.symbol_name(sym) != name
            {
                continue;
            }
            let Some(sec) = obj.symtab.symbol_section(LE, sym, i).ok().flatten() else {
                continue;
            };
            let Some(sh) = obj.sections.get(sec.0) else {
                continue;
            };
            if !is_loaded(sh) {
                continue;
            }
            let base = self.meta_section_addr(sec.0)?;
            return Some(base.wrapping_add(sym.st_value(LE)));
        }
        None
    }

    /// A global symbol the module defines in its code.
    fn code_symbol(&self, name: &str) -> Option<u64> {
        self.symbol(name).filter(|a| self.text().contains(a))
    }

    fn meta_section_addr(&self, i: usize) -> Option<u64> {
        if i >= self.layout.sections {
            return None;
        }
        let off = self.layout.meta + 8 * i;
        let mut b = [0u8; 8];
        // SAFETY: `i < sections`, so `off + 8 <= meta + 8 * (sections + symbols) <= end
        // <= size`: the 8 bytes lie in the live region's bookkeeping, which stays mapped
        // readable (RW) while the module is loaded and is written only while linking.
        unsafe { core::ptr::copy_nonoverlapping(self.region.ptr.add(off), b.as_mut_ptr(), 8) };
        Some(u64::from_le_bytes(b))
    }

    /// Something (another module, a registered callback) now depends on this module:
    /// [`Module::unload`] refuses until a matching [`Module::release`].
    pub fn hold(&self) {
        self.users.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops a [`Module::hold`].
    pub fn release(&self) {
        let _ = self
            .users
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1));
    }

    /// Outstanding holds.
    pub fn users(&self) -> u32 {
        self.users.load(Ordering::Acquire)
    }
}
