//! [`ModuleError`]: why a module did not load, check or unload. Every error owns its
//! data (names are copied into [`Name`]s), so it outlives the object's bytes and the
//! module's memory.

use core::fmt;

use crate::Name;
use crate::arch::x86_64::reloc;

use super::machine::Machine;
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
            RelocationProblem::Rel => {
                f.write_str("SHT_REL (no addends) is not used on ")?;
                machines(f)
            }
        }
    }
}

/// `x86-64, aarch64 or riscv64`: the machines the loader relocates.
fn machines(f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, m) in Machine::ALL.into_iter().enumerate() {
        if i > 0 {
            f.write_str(if i + 1 == Machine::ALL.len() {
                " or "
            } else {
                ", "
            })?;
        }
        f.write_str(m.name())?;
    }
    Ok(())
}

/// The section and the symbol of a failed relocation, in one [`Name`]'s space (so a
/// [`ModuleError`] stays small): each is cut at a character boundary when both do not
/// fit, the section to at most half, and a cut one prints with a trailing `…`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SectionSymbol {
    both: Name,
    split: u8,
    cut: u8,
}

impl SectionSymbol {
    /// Keeps `section` and `symbol`.
    pub fn new(section: &str, symbol: &str) -> SectionSymbol {
        let cap = Name::CAPACITY;
        let fit = |s: &str, max: usize| {
            let mut n = s.len().min(max);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            n
        };
        let sec = fit(section, cap.saturating_sub(symbol.len()).max(cap / 2));
        let sym = fit(symbol, cap - sec);
        let mut buf = [0u8; Name::CAPACITY];
        buf[..sec].copy_from_slice(&section.as_bytes()[..sec]);
        buf[sec..sec + sym].copy_from_slice(&symbol.as_bytes()[..sym]);
        let both = core::str::from_utf8(&buf[..sec + sym]).map_or(Name::default(), Name::new);
        SectionSymbol {
            both,
            split: sec as u8,
            cut: u8::from(sec < section.len()) | u8::from(sym < symbol.len()) << 1,
        }
    }

    /// The section (cut if long).
    pub fn section(&self) -> &str {
        self.both.as_str().get(..self.split as usize).unwrap_or("")
    }

    /// The symbol (cut if long).
    pub fn symbol(&self) -> &str {
        self.both.as_str().get(self.split as usize..).unwrap_or("")
    }

    fn show(f: &mut fmt::Formatter<'_>, s: &str, cut: bool) -> fmt::Result {
        f.write_str(s)?;
        if cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SectionSymbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:?}, {:?})", self.section(), self.symbol())
    }
}

/// `` `symbol` in section ``.
impl fmt::Display for SectionSymbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`")?;
        Self::show(f, self.symbol(), self.cut & 2 != 0)?;
        f.write_str("` in ")?;
        Self::show(f, self.section(), self.cut & 1 != 0)
    }
}

/// Why a relocation of [`ModuleError::RelocationFailed`] could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocFailure {
    /// The loader does not implement the type.
    Unsupported,
    /// The result does not fit the field: it must lie in `min <= value < max`.
    Overflow {
        /// The value (`X` of the ABI's formula).
        value: i64,
        /// Smallest value that fits.
        min: i64,
        /// One past the largest value that fits.
        max: i64,
    },
    /// The field drops low bits of the result that are not zero.
    Misaligned {
        /// The value.
        value: i64,
        /// The alignment it needs, in bytes.
        align: u8,
    },
    /// A branch out of reach needs a veneer, and the module's veneer area is full
    /// (the loader reserves one per branch relocation to a symbol outside the module,
    /// so this means a malformed count, never a normal module).
    NoVeneerRoom {
        /// Where the branch must go.
        target: u64,
    },
    /// A branch out of reach needs a veneer, and the veneer area is itself out of the
    /// branch's reach (a module larger than the branch's range).
    VeneerOutOfReach {
        /// Where the branch must go.
        target: u64,
        /// The veneer's address.
        veneer: u64,
    },
    /// A PC-relative low part (riscv64 `PCREL_LO12_I`/`_S`) whose label carries no
    /// high part (`PCREL_HI20`) to complete.
    NoHighPart {
        /// The label's address (where the high part's `auipc` should be).
        label: u64,
    },
    /// An alignment relocation (riscv64 `ALIGN`) covers bytes that are not NOP padding
    /// (the loader keeps the padding and runs through it, so it must be NOPs).
    NotPadding,
}

impl fmt::Display for RelocFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocFailure::Unsupported => f.write_str("is not supported"),
            RelocFailure::Overflow { value, min, max } => write!(
                f,
                "overflows: {value:#x} does not fit ({min:#x} <= X < {max:#x})"
            ),
            RelocFailure::Misaligned { value, align } => {
                write!(f, "is misaligned: {value:#x} is not {align}-byte aligned")
            }
            RelocFailure::NoVeneerRoom { target } => write!(
                f,
                "is out of reach of {target:#x} and no veneer space is left in the module"
            ),
            RelocFailure::VeneerOutOfReach { target, veneer } => write!(
                f,
                "is out of reach of {target:#x} and of its veneer at {veneer:#x}"
            ),
            RelocFailure::NoHighPart { label } => write!(
                f,
                "has no PC-relative high-part relocation at its label {label:#x} to complete"
            ),
            RelocFailure::NotPadding => f.write_str("covers bytes that are not NOP padding"),
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
    /// A relocation type the loader does not implement (x86-64 modules; aarch64 and
    /// riscv64 ones report [`ModuleError::RelocationFailed`]).
    UnsupportedRelocation {
        /// Relocation type (see [`reloc::name`]).
        r_type: u32,
        /// Section it applies to.
        section: Name,
        /// Offset in that section.
        offset: u64,
    },
    /// A relocation whose result does not fit its field (x86-64 modules; aarch64 and
    /// riscv64 ones report [`ModuleError::RelocationFailed`]).
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
    /// A relocation that could not be applied, named with its symbol and architecture
    /// (what aarch64 and riscv64 modules report; x86-64 modules keep
    /// [`ModuleError::Overflow`] and [`ModuleError::UnsupportedRelocation`]).
    RelocationFailed {
        /// `e_machine` of the module.
        machine: u16,
        /// Relocation type.
        r_type: u32,
        /// The section it applies to and the symbol it refers to (a section symbol by
        /// its section's name).
        at: SectionSymbol,
        /// Offset in that section.
        offset: u64,
        /// What went wrong.
        why: RelocFailure,
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
            ModuleError::NotRelocatable { e_type, machine } => {
                match Machine::from_e_machine(*machine) {
                    Some(m) => write!(f, "not an {} relocatable object", m.name())?,
                    None => {
                        f.write_str("not an ")?;
                        machines(f)?;
                        f.write_str(" relocatable object")?;
                    }
                }
                write!(f, " (e_type {e_type}, e_machine {machine})")
            }
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
            ModuleError::RelocationFailed {
                machine,
                r_type,
                at,
                offset,
                why,
            } => {
                let (arch, name) = match Machine::from_e_machine(*machine) {
                    Some(m) => (m.name(), m.reloc_name(*r_type)),
                    None => ("?", "?"),
                };
                write!(
                    f,
                    "{arch} relocation {name} ({r_type}) against {at} at offset {offset:#x} {why}"
                )
            }
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
