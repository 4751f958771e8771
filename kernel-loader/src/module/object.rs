//! The parsed ET_REL object: its section and symbol tables, names, and whether it
//! carries ksites records without a table.

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::FileHeader;

use crate::Name;
use crate::probe;

use super::error::ModuleError;
use super::layout::{self, Groups, LayoutError};
use super::machine::Machine;

pub(super) type Ehdr = elf::FileHeader64<LE>;
pub(super) type Shdr = elf::SectionHeader64<LE>;
pub(super) type ElfSym = elf::Sym64<LE>;
type SymTab<'b> = object::read::elf::SymbolTable<'b, Ehdr, &'b [u8]>;

/// Sections whose presence means the object needs a `.ksites` table.
const RECORD_SECTIONS: [&str; 4] = [
    crate::ifunc::RECORD_SECTION,
    crate::ifunc::IMPORT_SECTION,
    probe::SITE_RECORD_SECTION,
    probe::DECL_SECTION,
];

/// The parsed object.
pub(super) struct Object<'b> {
    pub(super) bytes: &'b [u8],
    pub(super) sections: &'b [Shdr],
    table: object::read::elf::SectionTable<'b, Ehdr, &'b [u8]>,
    pub(super) symtab: SymTab<'b>,
    /// The architecture it was compiled for.
    pub(super) machine: Machine,
}

pub(super) fn elf_err(e: object::read::Error) -> ModuleError {
    ModuleError::Elf(e)
}

impl<'b> Object<'b> {
    /// Parses `bytes`: a little-endian ELF64 relocatable object for a [`Machine`] the
    /// loader relocates (with `native_only`, for the one it runs on).
    pub(super) fn parse(bytes: &'b [u8], native_only: bool) -> Result<Object<'b>, ModuleError> {
        let eh = Ehdr::parse(bytes).map_err(elf_err)?;
        let (e_type, e_machine) = (eh.e_type.get(LE).0, eh.e_machine.get(LE).0);
        let not = ModuleError::NotRelocatable {
            e_type,
            machine: e_machine,
        };
        let machine = Machine::from_e_machine(e_machine).ok_or(not)?;
        if !eh.is_little_endian()
            || e_type != elf::ET_REL.0
            || (native_only && machine != Machine::native())
        {
            return Err(not);
        }
        let table = eh.sections(LE, bytes).map_err(elf_err)?;
        let symtab = table.symbols(LE, bytes, elf::SHT_SYMTAB).map_err(elf_err)?;
        Ok(Object {
            bytes,
            sections: table.iter().as_slice(),
            table,
            symtab,
            machine,
        })
    }

    pub(super) fn section_name(&self, sh: &Shdr) -> &'b str {
        self.table
            .section_name(LE, sh)
            .ok()
            .and_then(|n| core::str::from_utf8(n).ok())
            .unwrap_or("?")
    }

    pub(super) fn section_by_name(&self, name: &str) -> Option<(usize, &'b Shdr)> {
        self.sections
            .iter()
            .enumerate()
            .find(|(_, sh)| self.section_name(sh) == name)
    }

    pub(super) fn symbol_name(&self, sym: &ElfSym) -> &'b str {
        self.symtab
            .symbol_name(LE, sym)
            .ok()
            .and_then(|n| core::str::from_utf8(n).ok())
            .unwrap_or("?")
    }

    /// Fails with [`ModuleError::NotEmbedded`] if the object has ksites records but no
    /// `.ksites` table.
    pub(super) fn check_embedded(&self) -> Result<(), ModuleError> {
        if self.section_by_name(crate::format::SECTION_NAME).is_some() {
            return Ok(());
        }
        for name in RECORD_SECTIONS {
            if let Some((_, sh)) = self.section_by_name(name) {
                return Err(ModuleError::NotEmbedded {
                    section: Name::new(self.section_name(sh)),
                });
            }
        }
        Ok(())
    }

    /// Lays the sections out from offset 0 (the [layout contract](layout)), calling
    /// `place(index, offset)` for every allocated section.
    pub(super) fn layout(&self, place: &mut dyn FnMut(usize, u64)) -> Result<Groups, ModuleError> {
        layout::layout(self.sections.iter().map(layout::from_elf), 0, place).map_err(|e| match e {
            LayoutError::TooBig => ModuleError::OutOfMemory { size: usize::MAX },
            e => ModuleError::Malformed(super::error::Malformed::Layout(e)),
        })
    }
}
