//! The ET_REL module loader (feature `module`).
//!
//! [`Module::load`] takes a relocatable x86-64 object that `ksites embed` processed and
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
//! 3. **Relocate** every allocated section: `R_X86_64_64`, `PC32`, `PLT32`, `32`, `32S`,
//!    `PC64` (and `NONE`), each 32-bit result checked for overflow. Anything else fails
//!    with its type, section and offset. `.rela.ksites` is relocated like any other
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

use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicU32, Ordering};

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader as _, Sym as _};
use object::read::{SectionIndex, SymbolIndex};

use crate::CpuFeatures;
use crate::format::{FormatError, PROBE_SITE_LEN, Table};
use crate::patch::{self, InitReport, PatchError, TextPoker};
use crate::probe::{self, ImageHandle, ProbeError, STUB_SYMBOLS, Stubs};

type Ehdr = elf::FileHeader64<LE>;
type Shdr = elf::SectionHeader64<LE>;
type ElfSym = elf::Sym64<LE>;
type SymTab<'b> = object::read::elf::SymbolTable<'b, Ehdr, &'b [u8]>;

/// Page size the layout and [`ModuleMemory`] work in.
pub const PAGE_SIZE: usize = 4096;
/// Optional `extern "C" fn() -> i32` a module runs at load; non-zero fails the load.
pub const INIT_SYMBOL: &str = "ksites_module_init";
/// Optional `extern "C" fn()` a module runs at unload.
pub const EXIT_SYMBOL: &str = "ksites_module_exit";
/// Most executable ranges of the kernel [`Kernel::exec`] may list.
pub const MAX_KERNEL_EXEC: usize = 7;

/// Sections whose presence means the object needs a `.ksites` table.
const RECORD_SECTIONS: [&str; 4] = [
    crate::ifunc::RECORD_SECTION,
    crate::ifunc::IMPORT_SECTION,
    probe::SITE_RECORD_SECTION,
    ".ksites_probe_decls",
];

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
    ) -> Result<(), &'static str>;

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
    /// ifuncs. `None` accepts any `jmp [rip+slot]` trampoline.
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

/// Why a module did not load or unload. Names and section names borrow from the
/// module's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleError<'b> {
    /// The bytes are not a well-formed ELF file (`object`'s message).
    Elf(object::read::Error),
    /// Something about the object's layout the loader refuses (a message).
    Malformed(&'static str),
    /// `.ksites` is not an allocated, read-only, non-executable section.
    BadTableSection,
    /// Not a little-endian ELF64 x86-64 relocatable object.
    NotRelocatable {
        /// `e_type`.
        e_type: u16,
        /// `e_machine`.
        machine: u16,
    },
    /// The object has ksites records but no `.ksites` table: run `ksites embed` on it.
    NotEmbedded {
        /// The record section found.
        section: &'b str,
    },
    /// An undefined symbol the kernel does not export.
    UnknownSymbol {
        /// Its name.
        name: &'b str,
    },
    /// A symbol the loader cannot place.
    UnsupportedSymbol {
        /// Its name.
        name: &'b str,
        /// Why.
        why: &'static str,
    },
    /// A relocation type the loader does not implement.
    UnsupportedRelocation {
        /// `R_X86_64_*` number.
        r_type: u32,
        /// Section it applies to.
        section: &'b str,
        /// Offset in that section.
        offset: u64,
    },
    /// A relocation whose result does not fit its field.
    Overflow {
        /// `R_X86_64_*` number.
        r_type: u32,
        /// Section it applies to.
        section: &'b str,
        /// Offset in that section.
        offset: u64,
        /// The value that did not fit.
        value: i64,
    },
    /// A malformed relocation (offset outside its section, bad symbol index, `SHT_REL`).
    BadRelocation {
        /// Section it applies to.
        section: &'b str,
        /// Offset in that section.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// [`ModuleMemory::alloc`] failed.
    OutOfMemory {
        /// Bytes asked for.
        size: usize,
    },
    /// [`ModuleMemory::protect`] failed.
    Protect(&'static str),
    /// The module's `.ksites` table is invalid.
    Table(FormatError),
    /// An imported ifunc's symbol is not an ifunc of the kernel's table.
    NotAKernelIfunc {
        /// The imported name.
        name: &'b str,
        /// What the symbol resolved to.
        addr: u64,
    },
    /// Patching the module's ifunc sites failed (nothing was left patched).
    Patch(PatchError),
    /// Registering or unregistering the module's probes failed.
    Probe(ProbeError),
    /// `ksites_module_init` returned non-zero.
    InitFailed(i32),
    /// A load failed, and then unregistering the module's probes failed too: the
    /// module's memory is deliberately leaked (something may still point into it).
    CleanupFailed(ProbeError),
    /// Unload refused: the module is held ([`Module::hold`]).
    InUse {
        /// Outstanding holds.
        users: u32,
    },
}

impl fmt::Display for ModuleError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::Elf(e) => write!(f, "malformed ELF: {e}"),
            ModuleError::Malformed(e) => write!(f, "malformed module: {e}"),
            ModuleError::BadTableSection => write!(
                f,
                ".ksites must be an allocated, read-only, non-executable section"
            ),
            ModuleError::NotRelocatable { e_type, machine } => write!(
                f,
                "not an x86-64 relocatable object (e_type {e_type}, e_machine {machine})"
            ),
            ModuleError::NotEmbedded { section } => write!(
                f,
                "the object has {section} but no .ksites table: run `ksites embed` on it"
            ),
            ModuleError::UnknownSymbol { name } => {
                write!(f, "unknown symbol `{name}`: the kernel does not export it")
            }
            ModuleError::UnsupportedSymbol { name, why } => {
                write!(f, "symbol `{name}`: {why}")
            }
            ModuleError::UnsupportedRelocation {
                r_type,
                section,
                offset,
            } => write!(
                f,
                "unsupported relocation {} ({r_type}) in {section} at offset {offset:#x}",
                reloc_name(*r_type)
            ),
            ModuleError::Overflow {
                r_type,
                section,
                offset,
                value,
            } => write!(
                f,
                "relocation {} in {section} at offset {offset:#x} overflows: {value:#x} does not fit",
                reloc_name(*r_type)
            ),
            ModuleError::BadRelocation {
                section,
                offset,
                why,
            } => write!(
                f,
                "bad relocation in {section} at offset {offset:#x}: {why}"
            ),
            ModuleError::OutOfMemory { size } => {
                write!(f, "no memory for the module ({size} bytes)")
            }
            ModuleError::Protect(e) => write!(f, "setting page permissions failed: {e}"),
            ModuleError::Table(e) => write!(f, "invalid .ksites table: {e}"),
            ModuleError::NotAKernelIfunc { name, addr } => write!(
                f,
                "`{name}` is declared an ifunc import but resolves to {addr:#x}, which is not a kernel ifunc"
            ),
            ModuleError::Patch(e) => write!(f, "patching the module's ifunc sites: {e}"),
            ModuleError::Probe(e) => write!(f, "module probes: {e}"),
            ModuleError::InitFailed(r) => write!(f, "{INIT_SYMBOL} returned {r}"),
            ModuleError::CleanupFailed(e) => write!(
                f,
                "the load failed and its probes could not be unregistered ({e}): the module's memory is leaked, not freed"
            ),
            ModuleError::InUse { users } => {
                write!(f, "the module is in use ({users} holds): not unloaded")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ModuleError<'_> {}

/// The name of an `R_X86_64_*` relocation type.
pub fn reloc_name(r_type: u32) -> &'static str {
    match r_type {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => "R_X86_64_?",
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
// SAFETY: shared access only reads immutable fields and the atomic `users`.
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

/// Where the three groups and the bookkeeping lie, as offsets in the region.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    text: usize,
    ro: usize,
    rw: usize,
    /// Bookkeeping: one `u64` address per section, then one per symbol.
    meta: usize,
    end: usize,
    sections: usize,
    symbols: usize,
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    let a = a.max(1);
    if !a.is_power_of_two() {
        return None;
    }
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

/// Which group a section goes in, or `None` if it is not loaded.
fn group(sh: &Shdr) -> Option<usize> {
    let flags = sh.sh_flags.get(LE);
    if flags & u64::from(elf::SHF_ALLOC) == 0 {
        return None;
    }
    if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
        Some(0)
    } else if flags & u64::from(elf::SHF_WRITE) == 0 {
        Some(1)
    } else {
        Some(2)
    }
}

/// The parsed object.
struct Object<'b> {
    bytes: &'b [u8],
    sections: &'b [Shdr],
    table: object::read::elf::SectionTable<'b, Ehdr, &'b [u8]>,
    symtab: SymTab<'b>,
}

impl<'b> Object<'b> {
    fn parse(bytes: &'b [u8]) -> Result<Object<'b>, ModuleError<'b>> {
        let eh = Ehdr::parse(bytes).map_err(elf_err)?;
        let (e_type, machine) = (eh.e_type.get(LE), eh.e_machine.get(LE));
        if !eh.is_little_endian() || e_type != elf::ET_REL || machine != elf::EM_X86_64 {
            return Err(ModuleError::NotRelocatable { e_type, machine });
        }
        let table = eh.sections(LE, bytes).map_err(elf_err)?;
        let symtab = table.symbols(LE, bytes, elf::SHT_SYMTAB).map_err(elf_err)?;
        Ok(Object {
            bytes,
            sections: table.iter().as_slice(),
            table,
            symtab,
        })
    }

    fn section_name(&self, sh: &Shdr) -> &'b str {
        self.table
            .section_name(LE, sh)
            .ok()
            .and_then(|n| core::str::from_utf8(n).ok())
            .unwrap_or("?")
    }

    fn section_by_name(&self, name: &str) -> Option<(usize, &'b Shdr)> {
        self.sections
            .iter()
            .enumerate()
            .find(|(_, sh)| self.section_name(sh) == name)
    }

    fn symbol_name(&self, sym: &ElfSym) -> &'b str {
        self.symtab
            .symbol_name(LE, sym)
            .ok()
            .and_then(|n| core::str::from_utf8(n).ok())
            .unwrap_or("?")
    }

    /// Fails with [`ModuleError::NotEmbedded`] if the object has ksites records but no
    /// `.ksites` table.
    fn check_embedded(&self) -> Result<(), ModuleError<'b>> {
        if self.section_by_name(crate::format::SECTION_NAME).is_some() {
            return Ok(());
        }
        for name in RECORD_SECTIONS {
            if let Some((_, sh)) = self.section_by_name(name) {
                return Err(ModuleError::NotEmbedded {
                    section: self.section_name(sh),
                });
            }
        }
        Ok(())
    }

    /// Computes the layout (offsets from the region start).
    fn layout(&self) -> Result<Layout, ModuleError<'b>> {
        let too_big = ModuleError::OutOfMemory { size: usize::MAX };
        let mut starts = [0usize; 3];
        let mut at = 0usize;
        for (g, start) in starts.iter_mut().enumerate() {
            *start = at;
            for sh in self.sections.iter().filter(|sh| group(sh) == Some(g)) {
                let align = usize::try_from(sh.sh_addralign.get(LE)).map_err(|_| too_big)?;
                if align > PAGE_SIZE {
                    // The region is only page-aligned.
                    return Err(ModuleError::Malformed(
                        "section alignment above the page size",
                    ));
                }
                let size = usize::try_from(sh.sh_size.get(LE)).map_err(|_| too_big)?;
                at = align_up(at, align).ok_or(ModuleError::Malformed("bad section alignment"))?;
                at = at.checked_add(size).ok_or(too_big)?;
            }
            at = align_up(at, PAGE_SIZE).ok_or(too_big)?;
        }
        let meta = at;
        let n = self.sections.len() + self.symtab.len();
        let end = n
            .checked_mul(8)
            .and_then(|b| meta.checked_add(b))
            .and_then(|e| align_up(e, PAGE_SIZE))
            .ok_or(too_big)?;
        Ok(Layout {
            text: starts[0],
            ro: starts[1],
            rw: starts[2],
            meta,
            end: end.max(PAGE_SIZE),
            sections: self.sections.len(),
            symbols: self.symtab.len(),
        })
    }
}

fn elf_err(e: object::read::Error) -> ModuleError<'static> {
    ModuleError::Elf(e)
}

/// The loader's working state over one region.
struct Linker<'b, 'k, 'm> {
    obj: Object<'b>,
    kernel: &'k Kernel<'k>,
    region: &'m Region,
    layout: Layout,
    report: LoadReport,
}

impl<'b> Linker<'b, '_, '_> {
    // The region is raw memory the linker owns, not data behind `&self`.
    #[allow(clippy::mut_from_ref)]
    fn mem(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.region.size);
        // SAFETY: the region is `size` bytes of writable memory the loader owns while it
        // links; offsets are computed from the layout, which fits in `size`.
        unsafe { core::slice::from_raw_parts_mut(self.region.ptr.add(off), len) }
    }

    fn meta(&self, i: usize) -> u64 {
        let b = self.mem(self.layout.meta + 8 * i, 8);
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    fn set_meta(&self, i: usize, v: u64) {
        self.mem(self.layout.meta + 8 * i, 8)
            .copy_from_slice(&v.to_le_bytes());
    }

    fn section_addr(&self, i: usize) -> u64 {
        self.meta(i)
    }

    fn symbol_addr(&self, i: usize) -> u64 {
        self.meta(self.layout.sections + i)
    }

    /// Places every allocated section: records its address and copies (or zeroes) its
    /// bytes.
    fn place(&mut self) -> Result<(), ModuleError<'b>> {
        self.mem(0, self.region.size).fill(0);
        let mut at = [self.layout.text, self.layout.ro, self.layout.rw];
        for (i, sh) in self.obj.sections.iter().enumerate() {
            let Some(g) = group(sh) else {
                self.set_meta(i, 0);
                continue;
            };
            let off = align_up(at[g], sh.sh_addralign.get(LE) as usize)
                .ok_or(ModuleError::Malformed("bad section alignment"))?;
            let size = sh.sh_size.get(LE) as usize;
            if sh.sh_type.get(LE) != elf::SHT_NOBITS {
                let data = sh.data(LE, self.obj.bytes).map_err(elf_err)?;
                self.mem(off, size)
                    .copy_from_slice(&data[..size.min(data.len())]);
            }
            self.set_meta(i, self.region.addr + off as u64);
            at[g] = off + size;
            self.report.sections += 1;
        }
        Ok(())
    }

    /// Resolves every symbol's address; reports each problem to `issue`.
    fn resolve(&mut self, issue: &mut dyn FnMut(ModuleError<'b>)) {
        for (i, sym) in self.obj.symtab.enumerate() {
            let addr = match self.symbol_value(i, sym) {
                Ok(a) => a,
                Err(e) => {
                    issue(e);
                    0
                }
            };
            self.set_meta(self.layout.sections + i.0, addr);
        }
    }

    fn symbol_value(&mut self, i: SymbolIndex, sym: &ElfSym) -> Result<u64, ModuleError<'b>> {
        if i.0 == 0 {
            return Ok(0);
        }
        let name = || self.obj.symbol_name(sym);
        match sym.st_type() {
            elf::STT_GNU_IFUNC => {
                return Err(ModuleError::UnsupportedSymbol {
                    name: name(),
                    why: "GNU ifuncs are not supported in modules (declare it with ifunc!)",
                });
            }
            elf::STT_TLS => {
                return Err(ModuleError::UnsupportedSymbol {
                    name: name(),
                    why: "thread-local storage is not supported in modules",
                });
            }
            _ => {}
        }
        match sym.st_shndx(LE) {
            elf::SHN_ABS => return Ok(sym.st_value(LE)),
            elf::SHN_COMMON => {
                return Err(ModuleError::UnsupportedSymbol {
                    name: name(),
                    why: "common symbol (build with -fno-common)",
                });
            }
            _ => {}
        }
        match self
            .obj
            .symtab
            .symbol_section(LE, sym, i)
            .map_err(elf_err)?
        {
            Some(SectionIndex(s)) => {
                let sh = self
                    .obj
                    .sections
                    .get(s)
                    .ok_or(ModuleError::Malformed("bad symbol section index"))?;
                if group(sh).is_none() {
                    return Ok(0);
                }
                Ok(self.section_addr(s).wrapping_add(sym.st_value(LE)))
            }
            None if sym.st_shndx(LE) != elf::SHN_UNDEF => Ok(sym.st_value(LE)),
            None => {
                let n = name();
                match self.kernel.symbols.lookup(n) {
                    Some(a) => {
                        self.report.kernel_symbols += 1;
                        Ok(a)
                    }
                    None if sym.st_bind() == elf::STB_WEAK => Ok(0),
                    None => Err(ModuleError::UnknownSymbol { name: n }),
                }
            }
        }
    }

    /// Whether symbol `i` failed to resolve (`resolve` reported it and recorded 0).
    fn unresolved(&self, i: SymbolIndex) -> bool {
        let Ok(sym) = self.obj.symtab.symbol(i) else {
            return false;
        };
        if i.0 == 0 {
            return false;
        }
        if matches!(sym.st_type(), elf::STT_GNU_IFUNC | elf::STT_TLS)
            || sym.st_shndx(LE) == elf::SHN_COMMON
        {
            return true;
        }
        sym.st_shndx(LE) == elf::SHN_UNDEF
            && sym.st_bind() != elf::STB_WEAK
            && self
                .kernel
                .symbols
                .lookup(self.obj.symbol_name(sym))
                .is_none()
    }

    /// Applies every relocation section that targets an allocated section; reports each
    /// problem to `issue`.
    fn relocate(&mut self, issue: &mut dyn FnMut(ModuleError<'b>)) -> Result<(), ModuleError<'b>> {
        for rs in self.obj.sections {
            let ty = rs.sh_type.get(LE);
            if ty != elf::SHT_RELA && ty != elf::SHT_REL {
                continue;
            }
            let target = rs.sh_info.get(LE) as usize;
            let Some(tsh) = self.obj.sections.get(target) else {
                return Err(ModuleError::Malformed(
                    "relocation section targets no section",
                ));
            };
            if group(tsh).is_none() {
                continue;
            }
            let tname = self.obj.section_name(tsh);
            if ty == elf::SHT_REL {
                issue(ModuleError::BadRelocation {
                    section: tname,
                    offset: 0,
                    why: "SHT_REL (no addends) is not used on x86-64",
                });
                continue;
            }
            let Some((relas, _)) = rs.rela(LE, self.obj.bytes).map_err(elf_err)? else {
                continue;
            };
            for r in relas {
                if let Err(e) = self.apply(target, tsh, tname, r) {
                    issue(e);
                }
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        target: usize,
        tsh: &Shdr,
        tname: &'b str,
        r: &elf::Rela64<LE>,
    ) -> Result<(), ModuleError<'b>> {
        let offset = r.r_offset(LE);
        let r_type = r.r_type(LE, false);
        let sym = r.r_sym(LE, false) as usize;
        let bad = |why| ModuleError::BadRelocation {
            section: tname,
            offset,
            why,
        };
        if sym >= self.layout.symbols {
            return Err(bad("symbol index out of range"));
        }
        let width = match r_type {
            elf::R_X86_64_NONE => return Ok(()),
            elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8,
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_32 | elf::R_X86_64_32S => 4,
            _ => {
                return Err(ModuleError::UnsupportedRelocation {
                    r_type,
                    section: tname,
                    offset,
                });
            }
        };
        let size = tsh.sh_size.get(LE);
        if offset.checked_add(width).is_none_or(|e| e > size) {
            return Err(bad("offset outside its section"));
        }
        let s = self.symbol_addr(sym);
        if s == 0 && self.unresolved(SymbolIndex(sym)) {
            // `resolve` already reported the symbol; a value computed from its
            // placeholder 0 would only add a spurious overflow for every reference.
            return Ok(());
        }
        let a = r.r_addend(LE);
        let p = self.section_addr(target).wrapping_add(offset);
        let sa = s.wrapping_add_signed(a);
        let overflow = |value: i64| ModuleError::Overflow {
            r_type,
            section: tname,
            offset,
            value,
        };
        let bytes: [u8; 8] = match r_type {
            elf::R_X86_64_64 => sa.to_le_bytes(),
            elf::R_X86_64_PC64 => sa.wrapping_sub(p).to_le_bytes(),
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                let v = sa.wrapping_sub(p) as i64;
                let v32 = i32::try_from(v).map_err(|_| overflow(v))?;
                u64::from(v32 as u32).to_le_bytes()
            }
            elf::R_X86_64_32 => {
                let v = u32::try_from(sa).map_err(|_| overflow(sa as i64))?;
                u64::from(v).to_le_bytes()
            }
            _ => {
                // R_X86_64_32S
                let v = i32::try_from(sa as i64).map_err(|_| overflow(sa as i64))?;
                u64::from(v as u32).to_le_bytes()
            }
        };
        let at = (p - self.region.addr) as usize;
        self.mem(at, width as usize)
            .copy_from_slice(&bytes[..width as usize]);
        self.report.relocations += 1;
        Ok(())
    }

    /// The module's table, validated in place, if it has one.
    fn table(&mut self) -> Result<Option<Table<'static>>, ModuleError<'b>> {
        let Some((i, sh)) = self.obj.section_by_name(crate::format::SECTION_NAME) else {
            self.obj.check_embedded()?;
            return Ok(None);
        };
        if group(sh) != Some(1) {
            return Err(ModuleError::BadTableSection);
        }
        let addr = self.section_addr(i);
        let off = (addr - self.region.addr) as usize;
        let len = sh.sh_size.get(LE) as usize;
        // SAFETY: the table lies in the region, which outlives the `Table` (the module
        // keeps both and drops the table first; `check` uses it only while linking).
        let bytes: &'static [u8] =
            unsafe { core::slice::from_raw_parts(self.region.ptr.add(off), len) };
        let text = self.text_range();
        let t = Table::parse_module(bytes, addr, core::slice::from_ref(&text), self.kernel.exec)
            .map_err(ModuleError::Table)?;
        // The module's own slots are written at load: they must be in its writable data.
        let data =
            self.region.addr + self.layout.rw as u64..self.region.addr + self.layout.meta as u64;
        for f in t.ifuncs().filter(|f| !f.imported) {
            if !(data.contains(&f.slot) && f.slot + 8 <= data.end) {
                return Err(ModuleError::Table(FormatError::BadIfuncPointer {
                    ifunc: f.index,
                    field: crate::format::IfuncField::Slot,
                    addr: f.slot,
                }));
            }
        }
        // Every import must be a kernel ifunc.
        for f in t.ifuncs().filter(|f| f.imported) {
            let known = match &self.kernel.table {
                Some(kt) => kt
                    .ifuncs()
                    .any(|k| !k.imported && k.trampoline == f.trampoline),
                None => true,
            };
            if !known {
                return Err(ModuleError::NotAKernelIfunc {
                    name: rebase_str(f.name, bytes, sh.data(LE, self.obj.bytes).unwrap_or(&[])),
                    addr: f.trampoline,
                });
            }
        }
        self.report.ifuncs = t.ifuncs().filter(|f| !f.imported).count() as u32;
        self.report.imports = t.ifuncs().filter(|f| f.imported).count() as u32;
        self.report.sites = t.site_count();
        self.report.probes = t.probe_count();
        self.report.probe_sites = t.probe_site_count();
        Ok(Some(t))
    }

    fn text_range(&self) -> Range<u64> {
        self.region.addr + self.layout.text as u64..self.region.addr + self.layout.ro as u64
    }

    /// Checks every probe site holds its disabled form (read from the region, so this
    /// works for a host buffer too).
    fn check_probe_sites(&self, t: &Table<'_>) -> Result<(), ModuleError<'b>> {
        let k = self.kernel.symbols;
        let (Some(c_entry), Some(ret0), Some(ret1)) = (
            k.lookup(STUB_SYMBOLS[0]),
            k.lookup(STUB_SYMBOLS[1]),
            k.lookup(STUB_SYMBOLS[2]),
        ) else {
            return Ok(());
        };
        let stubs = Stubs {
            c_entry,
            ret0,
            ret1,
        };
        for s in t.probe_sites() {
            let want = probe::site_bytes_with(&s, false, &stubs).map_err(ModuleError::Probe)?;
            let off = (s.addr - self.region.addr) as usize;
            let found = self.mem(off, PROBE_SITE_LEN);
            if found != want {
                return Err(ModuleError::Probe(ProbeError::UnexpectedBytes {
                    site: s.addr,
                    probe: probe::ProbeId(s.probe),
                    expected: patch::InsnBytes::new(&want),
                    found: patch::InsnBytes::new(found),
                }));
            }
        }
        Ok(())
    }
}

/// `s` points into `mem`; the same bytes at the same offset of `file`.
fn rebase_str<'f>(s: &str, mem: &[u8], file: &'f [u8]) -> &'f str {
    let off = (s.as_ptr() as usize).wrapping_sub(mem.as_ptr() as usize);
    // `s` may not point into `mem` (the patch engine's "?" placeholder): then `off` is
    // arbitrary and `off + len` must not overflow.
    off.checked_add(s.len())
        .and_then(|end| file.get(off..end))
        .and_then(|b| core::str::from_utf8(b).ok())
        .unwrap_or("?")
}

/// Steps 1–4 (lay out, resolve, relocate, validate the table) into a fresh region.
/// On success the region is returned with everything placed; on failure it is freed.
fn link<'b, 'k>(
    bytes: &'b [u8],
    kernel: &'k Kernel<'k>,
    mem: &mut dyn ModuleMemory,
    issue: &mut dyn FnMut(ModuleError<'b>),
) -> Result<(Region, Layout, LoadReport, Option<Table<'static>>), ModuleError<'b>> {
    if kernel.exec.len() > MAX_KERNEL_EXEC {
        return Err(ModuleError::Malformed(
            "the kernel lists too many executable ranges",
        ));
    }
    let obj = Object::parse(bytes)?;
    // Before resolving: an object `ksites embed` never saw names its ifunc imports as
    // undefined symbols the kernel need not export, and the cause is the missing table.
    obj.check_embedded()?;
    let layout = obj.layout()?;
    let region = mem
        .alloc(layout.end)
        .ok_or(ModuleError::OutOfMemory { size: layout.end })?;
    if region.size < layout.end || !region.addr.is_multiple_of(PAGE_SIZE as u64) {
        // SAFETY: the region came from `alloc` and nothing refers to it.
        unsafe { mem.free(region) };
        return Err(ModuleError::OutOfMemory { size: layout.end });
    }
    let mut l = Linker {
        obj,
        kernel,
        region: &region,
        layout,
        report: LoadReport {
            text_size: layout.ro - layout.text,
            ro_size: layout.rw - layout.ro,
            rw_size: layout.end - layout.rw,
            ..LoadReport::default()
        },
    };
    let first = core::cell::Cell::new(None);
    let mut note = |e: ModuleError<'b>| {
        if first.get().is_none() {
            first.set(Some(e));
        }
        issue(e);
    };
    let r = (|| {
        l.place()?;
        l.resolve(&mut note);
        l.relocate(&mut note)?;
        if let Some(e) = first.get() {
            return Err(e);
        }
        let t = l.table()?;
        if let Some(t) = &t {
            l.check_probe_sites(t)?;
        }
        Ok(t)
    })();
    let report = l.report;
    match r {
        Ok(t) => Ok((region, layout, report, t)),
        Err(e) => {
            // SAFETY: nothing refers to the region: no table was registered.
            unsafe { mem.free(region) };
            Err(e)
        }
    }
}

/// Lays out, resolves, relocates and validates `bytes` into memory from `mem` (which
/// may be a host buffer with a kernel address: nothing is executed or patched), calls
/// `issue` for every problem found, frees the memory, and returns what loading would
/// have done, or the first problem.
pub fn check<'b>(
    bytes: &'b [u8],
    kernel: &Kernel<'_>,
    mem: &mut dyn ModuleMemory,
    issue: &mut dyn FnMut(ModuleError<'b>),
) -> Result<LoadReport, ModuleError<'b>> {
    let (region, _, report, t) = link(bytes, kernel, mem, issue)?;
    let _ = t;
    // SAFETY: nothing refers to the region any more.
    unsafe { mem.free(region) };
    Ok(report)
}

impl<'b> Module<'b> {
    /// Loads `bytes` (steps 1–8 of the [module docs](self)).
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
    pub unsafe fn load(
        name: &'static str,
        bytes: &'b [u8],
        kernel: &Kernel<'_>,
        mem: &mut dyn ModuleMemory,
        poker: &mut dyn TextPoker,
    ) -> Result<Module<'b>, ModuleError<'b>> {
        let (region, layout, mut report, table) = link(bytes, kernel, mem, &mut |_| {})?;
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
            e: ModuleError<'b>,
        ) -> Result<Module<'b>, ModuleError<'b>> {
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
            // SAFETY: precondition 1 and 3: the module's text is mapped RX and no other
            // CPU runs it yet; the resolvers are `ifunc!` adapters.
            let r = unsafe { patch::init(t, exec, &kernel.features, poker) };
            match r {
                Ok(p) => report.patch = p,
                Err(e) => {
                    let e = ModuleError::Patch(e);
                    return fail(m, mem, poker, e);
                }
            }
        }
        m.report = report;
        // 7. Probes.
        if let Some(t) = m.table
            && t.probe_count() > 0
        {
            // SAFETY: the table lives in the region, which outlives the registration
            // (`release_all` unregisters before freeing).
            match unsafe { probe::register_module(t, m.range(), poker) } {
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
    ) -> Result<(), (Module<'b>, ModuleError<'static>)> {
        let users = self.users.load(Ordering::Acquire);
        if users != 0 {
            return Err((self, ModuleError::InUse { users }));
        }
        // Exit first: it is where a module undoes what it registered (a handler on a
        // kernel probe, say). It runs once, even if the unload is then refused.
        if let Some(exit) = self.exit.take() {
            // SAFETY: `ksites_module_exit` is `extern "C" fn()` in the module's text.
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
        // SAFETY: the region came from `mem.alloc`; nothing runs in it any more.
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
        // SAFETY: nothing refers to the region any more.
        unsafe { mem.free(region) };
        Ok(())
    }

    /// Sets the three groups' permissions.
    ///
    /// # Safety
    ///
    /// The region came from `mem`.
    unsafe fn protect(&self, mem: &mut dyn ModuleMemory) -> Result<(), ModuleError<'b>> {
        let l = &self.layout;
        for (start, end, prot) in [
            (l.text, l.ro, Prot::ReadExec),
            (l.ro, l.rw, Prot::Read),
            (l.rw, l.end, Prot::ReadWrite),
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
        let obj = Object::parse(self.bytes).ok()?;
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
            if group(sh).is_none() {
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
        // SAFETY: the bookkeeping area lies inside the live region, which stays mapped
        // readable (RW) while the module is loaded.
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
