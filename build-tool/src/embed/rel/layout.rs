//! Addresses for a module's sections at the module layout contract
//! ([`kernel_loader::module::layout`]), and [`Target`]: where a relocated field points,
//! as (section, offset) or undefined symbol.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{Result, bail};
use kernel_loader::module::layout;
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{LittleEndian as LE, Object, ObjectSymbol, SectionIndex};

use crate::elf::Image;

/// Refuses a section of `img` whose `sh_addralign` is above the page size, the most
/// the module loader gives any section ([`layout::layout`] refuses it for allocated
/// sections; the output writer would pad the file to it for the others: gigabytes for
/// an alignment of 2^31). Run before anything is laid out or copied.
pub(super) fn check_alignments(img: &Image<'_>) -> Result<()> {
    let page = layout::PAGE_SIZE as u64;
    for (i, h) in img.file.elf_section_table().iter().enumerate() {
        let align = h.sh_addralign(LE);
        if align > page {
            bail!(
                "{}: {}: sh_addralign {align:#x} is above the page size ({page:#x}), the \
                 most a module section may have",
                img.path,
                img.section_label(SectionIndex(i))
            );
        }
    }
    Ok(())
}

/// Where a relocated field of an object points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Offset `off` in the section with index `sec`.
    Sec {
        /// Section index.
        sec: usize,
        /// Offset in it.
        off: u64,
    },
    /// An undefined symbol (index in `.symtab`) plus an addend.
    Undef {
        /// Symbol index.
        sym: usize,
        /// Addend.
        addend: i64,
    },
}

/// Addresses for an object's sections that follow the layout contract (see the module
/// documentation), with every undefined symbol at a distinct address in a region after
/// them (16 bytes apart), and the executable ranges (text, plus the undefined region,
/// standing in for the kernel's text).
#[derive(Clone, Debug)]
pub struct VirtualLayout {
    /// Address of each section by index (`None`: not allocated).
    pub sections: Vec<Option<u64>>,
    /// Address of each undefined symbol by symbol index.
    pub undefined: HashMap<usize, u64>,
    /// Executable ranges: the executable sections and the undefined region.
    pub exec: Vec<Range<u64>>,
}

impl VirtualLayout {
    /// Lays out `file` at `base` (page-aligned) by the layout contract; an error if the
    /// sections do not fit in the address space or have a bad alignment (a malformed
    /// file, which the loader refuses too).
    pub fn new(file: &ElfFile64<'_, LE>, base: u64) -> Result<VirtualLayout, layout::LayoutError> {
        let headers = file.elf_section_table();
        let mut sections = vec![None; headers.len()];
        let mut exec = Vec::new();
        let groups = layout::layout(
            headers.iter().map(layout::from_elf),
            base,
            &mut |i, addr| sections[i] = Some(addr),
        )?;
        for (i, s) in headers.iter().enumerate() {
            if let Some(addr) = sections[i]
                && layout::group(s.sh_flags(LE).0) == Some(layout::Group::Exec)
            {
                let end = addr + s.sh_size(LE);
                if end > addr {
                    exec.push(addr..end);
                }
            }
        }
        let page = layout::PAGE_SIZE as u64;
        let too_big = layout::LayoutError::TooBig;
        let undef_base = groups.end().checked_add(page).ok_or(too_big)?;
        let mut undefined = HashMap::new();
        for s in file.symbols() {
            if s.is_undefined() && s.index().0 != 0 {
                let a = undef_base
                    .checked_add(16 * undefined.len() as u64)
                    .ok_or(too_big)?;
                undefined.insert(s.index().0, a);
            }
        }
        if !undefined.is_empty() {
            let end = undef_base
                .checked_add(16 * undefined.len() as u64)
                .ok_or(too_big)?;
            exec.push(undef_base..end);
        }
        exec.sort_by_key(|r| r.start);
        Ok(VirtualLayout {
            sections,
            undefined,
            exec,
        })
    }

    /// The address of `t`.
    pub fn addr(&self, t: Target) -> Option<u64> {
        match t {
            Target::Sec { sec, off } => Some(self.sections.get(sec).copied()??.checked_add(off)?),
            Target::Undef { sym, addend } => self.undefined.get(&sym)?.checked_add_signed(addend),
        }
    }
}
