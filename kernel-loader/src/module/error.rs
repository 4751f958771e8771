//! [`ModuleError`]: why a module did not load, check or unload. Every error owns its
//! data (names are copied into [`Name`]s), so it outlives the object's bytes and the
//! module's memory.

use core::fmt;

use crate::Name;
use crate::arch::native::reloc;
use crate::format::FormatError;
use crate::patch::PatchError;
use crate::probe::ProbeError;

use super::INIT_SYMBOL;
use super::layout::LayoutError;

/// Something about an object's layout the loader refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// [`super::Kernel::exec`] lists more than [`super::MAX_KERNEL_EXEC`] ranges.
    TooManyKernelRanges,
    /// The sections cannot be laid out (bad alignment).
    Layout(LayoutError),
    /// A symbol's section index names no section.
    BadSymbolSection,
    /// A relocation section's `sh_info` names no section.
    RelocationTargetsNoSection,
    /// A placed section, a relocated field or a probe site falls outside the module's
    /// memory (the layout should make this impossible; it is checked, not assumed).
    OutsideRegion,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::TooManyKernelRanges => {
                f.write_str("the kernel lists too many executable ranges")
            }
            Malformed::Layout(e) => fmt::Display::fmt(e, f),
            Malformed::BadSymbolSection => f.write_str("bad symbol section index"),
            Malformed::RelocationTargetsNoSection => {
                f.write_str("relocation section targets no section")
            }
            Malformed::OutsideRegion => f.write_str("a write falls outside the module's memory"),
        }
    }
}

/// Why a symbol cannot be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymbolProblem {
    /// `STT_GNU_IFUNC`.
    GnuIfunc,
    /// `STT_TLS`.
    ThreadLocal,
    /// `SHN_COMMON`.
    Common,
}

impl fmt::Display for SymbolProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SymbolProblem::GnuIfunc => {
                "GNU ifuncs are not supported in modules (declare it with ifunc!)"
            }
            SymbolProblem::ThreadLocal => "thread-local storage is not supported in modules",
            SymbolProblem::Common => "common symbol (build with -fno-common)",
        })
    }
}

/// What is wrong with a malformed relocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocationProblem {
    /// Its symbol index is past the symbol table.
    SymbolOutOfRange,
    /// Its field lies (partly) outside its section.
    OutsideSection,
    /// An `SHT_REL` section (no addends), which the architecture does not use.
    Rel,
}

impl fmt::Display for RelocationProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocationProblem::SymbolOutOfRange => f.write_str("symbol index out of range"),
            RelocationProblem::OutsideSection => f.write_str("offset outside its section"),
            RelocationProblem::Rel => write!(
                f,
                "SHT_REL (no addends) is not used on {}",
                reloc::ARCH_NAME
            ),
        }
    }
}

/// Why [`super::ModuleMemory::protect`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectError {
    /// The range is not inside the region (or not page-aligned).
    OutOfRange,
    /// The kernel could not change the mapping (a page-table update or `mprotect`
    /// failed).
    Failed,
}

impl fmt::Display for ProtectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtectError::OutOfRange => "range not inside the module's region",
            ProtectError::Failed => "the mapping could not be changed",
        })
    }
}

/// Why a module did not load, check or unload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleError {
    /// The bytes are not a well-formed ELF file (`object`'s message).
    Elf(object::read::Error),
    /// Something about the object's layout the loader refuses.
    Malformed(Malformed),
    /// `.ksites` is not an allocated, read-only, non-executable section.
    BadTableSection,
    /// Not a little-endian ELF64 relocatable object for this architecture.
    NotRelocatable {
        /// `e_type`.
        e_type: u16,
        /// `e_machine`.
        machine: u16,
    },
    /// The object has ksites records but no `.ksites` table: run `ksites embed` on it.
    NotEmbedded {
        /// The record section found.
        section: Name,
    },
    /// An undefined symbol the kernel does not export.
    UnknownSymbol {
        /// Its name.
        name: Name,
    },
    /// A symbol the loader cannot place.
    UnsupportedSymbol {
        /// Its name.
        name: Name,
        /// Why.
        why: SymbolProblem,
    },
    /// A relocation type the loader does not implement.
    UnsupportedRelocation {
        /// Relocation type (see [`reloc::name`]).
        r_type: u32,
        /// Section it applies to.
        section: Name,
        /// Offset in that section.
        offset: u64,
    },
    /// A relocation whose result does not fit its field.
    Overflow {
        /// Relocation type (see [`reloc::name`]).
        r_type: u32,
        /// Section it applies to.
        section: Name,
        /// Offset in that section.
        offset: u64,
        /// The value that did not fit.
        value: i64,
    },
    /// A malformed relocation.
    BadRelocation {
        /// Section it applies to.
        section: Name,
        /// Offset in that section.
        offset: u64,
        /// What is wrong.
        why: RelocationProblem,
    },
    /// [`super::ModuleMemory::alloc`] failed.
    OutOfMemory {
        /// Bytes asked for.
        size: usize,
    },
    /// [`super::ModuleMemory::protect`] failed.
    Protect(ProtectError),
    /// The module's `.ksites` table is invalid.
    Table(FormatError),
    /// An imported ifunc's symbol is not an ifunc of the kernel's table.
    NotAKernelIfunc {
        /// The imported name.
        name: Name,
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
    /// Unload refused: the module is held ([`super::Module::hold`]).
    InUse {
        /// Outstanding holds.
        users: u32,
    },
}

impl fmt::Display for ModuleError {
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
                "not an {} relocatable object (e_type {e_type}, e_machine {machine})",
                reloc::ARCH_NAME
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
                reloc::name(*r_type)
            ),
            ModuleError::Overflow {
                r_type,
                section,
                offset,
                value,
            } => write!(
                f,
                "relocation {} in {section} at offset {offset:#x} overflows: {value:#x} does not fit",
                reloc::name(*r_type)
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
impl std::error::Error for ModuleError {}
