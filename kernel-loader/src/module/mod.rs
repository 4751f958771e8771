//! The ET_REL module loader (feature `module`).
//!
//! [`Module::load`] takes a relocatable object for the architecture being compiled for that `ksites embed` processed and
//! makes it run in the kernel, allocation-free (the kernel supplies the memory through
//! [`ModuleMemory`]):
//!
//! 1. **Lay out** every `SHF_ALLOC` section in three page-aligned groups — executable,
//!    read-only, writable (`NOBITS` included) — each group in section-header order at
//!    the section's own alignment. `ksites embed` relies on that order: it sorts the
//!    module's table by (section index, offset), so the sorted table stays sorted once
//!    placed, and [`Table::parse_module`] checks it.
//! 2. **Resolve** every symbol: defined ones from the layout, undefined ones against the
//!    kernel's exports ([`Symbols`]), by name. An unknown strong symbol fails the load and
//!    is named; an unknown weak one is 0.
//! 3. **Relocate** every allocated section with the relocation types of the object's
//!    architecture ([`Machine`], from `e_machine`): [`crate::arch::x86_64::reloc`]
//!    (`64`, `PC32`, `PLT32`, `32`, `32S`, `PC64` and `NONE`, each 32-bit result
//!    checked for overflow), [`crate::arch::aarch64::reloc`] (data, page/low-12-bit,
//!    move-wide, branch and PC-relative address forms, each checked as its ABI says;
//!    a call or jump out of reach goes through a veneer the loader writes in an
//!    executable area after its bookkeeping, see [`Module::veneers`]) or
//!    [`crate::arch::riscv64::reloc`] (data, branches, `auipc`+`jalr` calls with
//!    veneers likewise, PC-relative and absolute HI20/LO12 pairs, label differences,
//!    `ALIGN` padding kept and checked, `RELAX` ignored: the loader does not relax).
//!    Anything else fails with its type, section and offset (and, on aarch64 and
//!    riscv64, symbol). [`check`] relocates any supported architecture's
//!    module on any host; [`Module::load`] only the one it is compiled for. `.rela.ksites` is relocated like any other
//!    section, which turns the module's table into the self-relative form of a linked
//!    image's.
//! 4. **Validate the table** ([`Table::parse_module`]): sites and the module's own
//!    ifuncs in its text; imported ifuncs' trampolines in the kernel's text, and each one
//!    an ifunc of the kernel's table.
//! 5. **Protect** the groups: text RX, read-only R, data RW (never W+X).
//! 6. **Patch**: the module's own ifuncs are resolved against the CPU's features and
//!    their sites patched; calls to kernel ifuncs go straight to the implementation the
//!    kernel's slot holds ([`crate::patch::patch_ifuncs`], all-or-nothing).
//! 7. **Register** the module's probes (they get the next free global ids).
//! 8. **Init**: run `ksites_module_init` if the module defines it; non-zero fails.
//!
//! Any failure undoes every earlier step (probes unregistered, memory freed): nothing is
//! patched outside the module's own memory, and nothing leaks. [`Module::unload`]
//! refuses while the module is held ([`Module::hold`]) or an enabled probe's handler
//! lies in its code; otherwise it disables and unregisters its probes, runs
//! `ksites_module_exit`, and frees its memory.
//!
//! [`check`] runs steps 1–4 on the host into any buffer (`ksites check-module`),
//! reporting every problem instead of stopping at the first.

//!
//! Files: [`layout`] (the layout contract, shared with `ksites embed` and
//! `check-module`), `object` (the parsed ELF), `machine` ([`Machine`]: relocation
//! dispatch), `link` (steps 1–4, veneers), `loaded`
//! ([`Module`]: steps 5–8 and unload), [`error`] ([`ModuleError`]).

use core::fmt;
use core::ops::Range;

use crate::CpuFeatures;
use crate::format::Table;
use crate::patch::InitReport;
use crate::probe::{self, STUB_SYMBOLS};

pub mod error;
pub mod layout;
mod link;
mod loaded;
mod machine;
mod object;

pub use error::{
    Malformed, ModuleError, ProtectError, RelocFailure, RelocationProblem, SectionSymbol,
    SymbolProblem,
};
pub use layout::PAGE_SIZE;
pub use loaded::Module;
pub use machine::Machine;

/// The name of a relocation type of the architecture compiled for (see
/// [`Machine::reloc_name`] for any module's).
pub use crate::arch::native::reloc::name as reloc_name;

/// Optional `extern "C" fn() -> i32` a module runs at load; non-zero fails the load.
pub const INIT_SYMBOL: &str = "ksites_module_init";
/// Optional `extern "C" fn()` a module runs at unload.
pub const EXIT_SYMBOL: &str = "ksites_module_exit";
/// Most executable ranges of the kernel [`Kernel::exec`] may list.
pub const MAX_KERNEL_EXEC: usize = 7;

/// Page permissions of a part of a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    /// Code.
    ReadExec,
    /// Read-only data (and the table).
    Read,
    /// Data, bss, and the loader's bookkeeping.
    ReadWrite,
}

/// Memory for one module, from [`ModuleMemory::alloc`].
#[derive(Debug)]
pub struct Region {
    /// Where the loader writes the region's bytes.
    pub ptr: *mut u8,
    /// The address the module runs at (in a kernel, `ptr` itself; [`check`] on the
    /// host lays a module out for a kernel address in a host buffer).
    pub addr: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: usize,
}

/// How the kernel gives a module memory.
pub trait ModuleMemory {
    /// `size` bytes (a multiple of [`PAGE_SIZE`]), page-aligned, readable and writable,
    /// and within ±2 GiB of everything the module may reference (rel32 reach).
    fn alloc(&mut self, size: usize) -> Option<Region>;

    /// Sets the permissions of `len` bytes at `offset` in `region` (both page-aligned).
    ///
    /// # Safety
    ///
    /// `region` came from `alloc` and is not freed; nothing executes in the range
    /// unless `prot` allows it.
    unsafe fn protect(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        prot: Prot,
    ) -> Result<(), ProtectError>;

    /// Takes the region back (the loader has made it all [`Prot::ReadWrite`] first).
    ///
    /// # Safety
    ///
    /// `region` came from `alloc`, and nothing refers to it any more.
    unsafe fn free(&mut self, region: Region);
}

/// Symbols a module may link against, by name.
pub trait Symbols {
    /// The address of `name`, if exported.
    fn lookup(&self, name: &str) -> Option<u64>;
}

/// One exported kernel symbol (see [`export!`](crate::export)).
#[derive(Clone, Copy, Debug)]
pub struct Export {
    name: &'static str,
    addr: *const (),
}

// SAFETY: an export is a name and an address, both immutable.
unsafe impl Sync for Export {}
// SAFETY: as above.
unsafe impl Send for Export {}

impl Export {
    /// Exports `addr` as `name`.
    pub const fn new(name: &'static str, addr: *const ()) -> Export {
        Export { name, addr }
    }

    /// The exported name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }
}

impl Symbols for [Export] {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.iter().find(|e| e.name == name).map(Export::addr)
    }
}

impl Symbols for &[Export] {
    fn lookup(&self, name: &str) -> Option<u64> {
        (**self).lookup(name)
    }
}

impl<const N: usize> Symbols for [Export; N] {
    fn lookup(&self, name: &str) -> Option<u64> {
        self[..].lookup(name)
    }
}

impl<A: Symbols + ?Sized, B: Symbols + ?Sized> Symbols for (&A, &B) {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.0.lookup(name).or_else(|| self.1.lookup(name))
    }
}

/// An [`Export`] of a function or static: `export!(path)` exports it under its last path
/// segment, `export!(path as "name")` under `name`.
///
/// ```ignore
/// static EXPORTS: [Export; 2] = [export!(kfuncs::popcount), export!(my_log as "log")];
/// ```
#[macro_export]
macro_rules! export {
    ($path:path as $name:literal) => {
        $crate::module::Export::new($name, $path as *const ())
    };
    ($($seg:ident)::+) => {
        $crate::module::Export::new(
            $crate::__ksites_last_ident!($($seg)::+),
            $($seg)::+ as *const (),
        )
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_last_ident {
    ($last:ident) => {
        ::core::stringify!($last)
    };
    ($first:ident :: $($rest:ident)::+) => {
        $crate::__ksites_last_ident!($($rest)::+)
    };
}

/// The loader's own entry points that module code links against (`probe!` and C probe
/// sites reach them): a kernel includes these in its exports.
pub const RUNTIME_EXPORTS: [Export; 4] = [
    Export::new("ksites_probe_fire", probe::ksites_probe_fire as *const ()),
    Export::new(STUB_SYMBOLS[0], probe::ksites_probe_c_entry as *const ()),
    Export::new(STUB_SYMBOLS[1], probe::ksites_probe_ret0 as *const ()),
    Export::new(STUB_SYMBOLS[2], probe::ksites_probe_ret1 as *const ()),
];

/// What a module is loaded against.
#[derive(Clone, Copy)]
pub struct Kernel<'k> {
    /// The kernel's exports.
    pub symbols: &'k dyn Symbols,
    /// The kernel's `.ksites` table: every ifunc a module imports must be one of its
    /// ifuncs. `None` accepts any well-formed trampoline.
    pub table: Option<Table<'k>>,
    /// The kernel's executable ranges (where imported trampolines and the
    /// implementations they resolve to lie), at most [`MAX_KERNEL_EXEC`].
    pub exec: &'k [Range<u64>],
    /// The CPU's features, for the module's own resolvers.
    pub features: CpuFeatures,
}

impl fmt::Debug for Kernel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("table", &self.table.is_some())
            .field("exec", &self.exec)
            .field("features", &self.features)
            .finish()
    }
}

/// What loading (or checking) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Allocated sections placed.
    pub sections: u32,
    /// Bytes of code, read-only data and writable data (each group page-rounded).
    pub text_size: usize,
    /// Read-only group size.
    pub ro_size: usize,
    /// Writable group size (bookkeeping included).
    pub rw_size: usize,
    /// Relocations applied.
    pub relocations: u32,
    /// Range-extension veneers built (for calls out of reach; aarch64 and riscv64).
    pub veneers: u32,
    /// Undefined symbols resolved against the kernel.
    pub kernel_symbols: u32,
    /// The module's own ifuncs.
    pub ifuncs: u32,
    /// Kernel ifuncs it imports.
    pub imports: u32,
    /// Ifunc sites in the table.
    pub sites: u32,
    /// What patching did (zero for [`check`]).
    pub patch: InitReport,
    /// Probes.
    pub probes: u32,
    /// Probe sites.
    pub probe_sites: u32,
}

/// Lays out, resolves, relocates and validates `bytes` into memory from `mem` (which
/// may be a host buffer with a kernel address: nothing is executed or patched), calls
/// `issue` for every problem found, frees the memory, and returns what loading would
/// have done, or the first problem.
pub fn check(
    bytes: &[u8],
    kernel: &Kernel<'_>,
    mem: &mut dyn ModuleMemory,
    issue: &mut dyn FnMut(ModuleError),
) -> Result<LoadReport, ModuleError> {
    // The table (which points into the region) is not kept.
    let (region, _, report, _) = link::link(bytes, kernel, mem, issue, false)?;
    // SAFETY: nothing refers to the region any more.
    unsafe { mem.free(region) };
    Ok(report)
}
