//! The module layout contract, defined once: where every `SHF_ALLOC` section of an
//! ET_REL module goes. The loader places sections with it, and `ksites embed` and
//! `ksites check-module` compute the same addresses with it.
//!
//! * A section's **flags alone** pick its group ([`group`]): executable
//!   (`SHF_EXECINSTR`), else writable (`SHF_WRITE`), else read-only. The section type
//!   does not: a `SHT_NOBITS` section is zero-filled memory, and a read-only one (no
//!   `SHF_WRITE`) is mapped read-only like any other read-only data — the compiler
//!   asked for no write access, and the loader zeroes the region before protecting it.
//! * The groups follow each other in the order [`Group::ALL`] (executable, read-only,
//!   writable), each starting on a [`PAGE_SIZE`] boundary.
//! * Within a group, sections are placed **in section-header-index order**, each at its
//!   own alignment (`sh_addralign`, 0 and 1 meaning none; a power of two, at most
//!   [`PAGE_SIZE`]). Addresses within executable code therefore increase with (section
//!   index, offset): `ksites embed` sorts a module's table that way, and
//!   [`crate::format::Table::parse_module`] checks the order at load.
//!
//! The contract covers the sections only. What the loader puts after the groups in its
//! own region (its bookkeeping, then on aarch64 and riscv64 an executable area for
//! range-extension veneers; see `link`) changes no section's address, so `ksites embed` and
//! `check-module` need not know it.
//!
//! Everything is computed with checked arithmetic and without allocating ([`layout`]
//! reports each section's address through a callback).

use core::fmt;
use core::ops::Range;

/// Page size the layout and [`super::ModuleMemory`] work in.
pub const PAGE_SIZE: usize = 4096;

/// `SHF_WRITE`.
const SHF_WRITE: u64 = 0x1;
/// `SHF_ALLOC`.
const SHF_ALLOC: u64 = 0x2;
/// `SHF_EXECINSTR`.
const SHF_EXECINSTR: u64 = 0x4;
/// `SHT_NOBITS`.
const SHT_NOBITS: u32 = 8;

/// A group of sections sharing page permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Code: mapped read + execute.
    Exec,
    /// Read-only data (the `.ksites` table included, and read-only `SHT_NOBITS`).
    ReadOnly,
    /// Writable data and bss.
    Writable,
}

impl Group {
    /// The groups, in layout order.
    pub const ALL: [Group; 3] = [Group::Exec, Group::ReadOnly, Group::Writable];

    /// The page permissions of the group.
    pub fn prot(self) -> super::Prot {
        match self {
            Group::Exec => super::Prot::ReadExec,
            Group::ReadOnly => super::Prot::Read,
            Group::Writable => super::Prot::ReadWrite,
        }
    }
}

/// Which group a section with flags `sh_flags` goes in, or `None` if it is not loaded
/// (no `SHF_ALLOC`). The section type plays no part.
pub fn group(sh_flags: u64) -> Option<Group> {
    if sh_flags & SHF_ALLOC == 0 {
        None
    } else if sh_flags & SHF_EXECINSTR != 0 {
        Some(Group::Exec)
    } else if sh_flags & SHF_WRITE == 0 {
        Some(Group::ReadOnly)
    } else {
        Some(Group::Writable)
    }
}

/// What the layout needs of one section header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectionHeader {
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_size`.
    pub size: u64,
    /// `sh_addralign`.
    pub align: u64,
}

impl SectionHeader {
    /// The section's group (see [`group`]).
    pub fn group(&self) -> Option<Group> {
        group(self.flags)
    }

    /// Whether the section has no file data (it is zero-filled).
    pub fn is_nobits(&self) -> bool {
        self.sh_type == SHT_NOBITS
    }
}

/// Why sections cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// A section's alignment is not a power of two.
    BadAlignment,
    /// A section's alignment is above [`PAGE_SIZE`] (a module's memory is only
    /// page-aligned).
    AlignmentAbovePage,
    /// The sections do not fit in the address space.
    TooBig,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayoutError::BadAlignment => "bad section alignment",
            LayoutError::AlignmentAbovePage => "section alignment above the page size",
            LayoutError::TooBig => "the sections do not fit in the address space",
        })
    }
}

/// Where the groups lie: each range starts on a page boundary and ends on one (the
/// next group's start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Groups {
    /// Executable group.
    pub exec: Range<u64>,
    /// Read-only group.
    pub read_only: Range<u64>,
    /// Writable group.
    pub writable: Range<u64>,
}

impl Groups {
    /// The range of group `g`.
    pub fn range(&self, g: Group) -> Range<u64> {
        match g {
            Group::Exec => self.exec.clone(),
            Group::ReadOnly => self.read_only.clone(),
            Group::Writable => self.writable.clone(),
        }
    }

    /// The first page-aligned address after every group.
    pub fn end(&self) -> u64 {
        self.writable.end
    }
}

fn align_up(x: u64, align: u64) -> Result<u64, LayoutError> {
    let a = align.max(1);
    if !a.is_power_of_two() {
        return Err(LayoutError::BadAlignment);
    }
    x.checked_next_multiple_of(a).ok_or(LayoutError::TooBig)
}

/// Lays out `sections` (every section header of the object, in index order) from
/// `base` (page-aligned): calls `place(index, address)` for every allocated section, in
/// placement order, and returns where the groups lie.
pub fn layout<I>(
    sections: I,
    base: u64,
    place: &mut dyn FnMut(usize, u64),
) -> Result<Groups, LayoutError>
where
    I: IntoIterator<Item = SectionHeader>,
    I::IntoIter: Clone,
{
    let page = PAGE_SIZE as u64;
    let sections = sections.into_iter();
    let mut starts = [0u64; 3];
    let mut at = align_up(base, page)?;
    for (g, start) in Group::ALL.into_iter().zip(&mut starts) {
        *start = at;
        for (i, sh) in sections.clone().enumerate() {
            if sh.group() != Some(g) {
                continue;
            }
            if sh.align > page {
                return Err(LayoutError::AlignmentAbovePage);
            }
            at = align_up(at, sh.align)?;
            place(i, at);
            at = at.checked_add(sh.size).ok_or(LayoutError::TooBig)?;
        }
        at = align_up(at, page)?;
    }
    Ok(Groups {
        exec: starts[0]..starts[1],
        read_only: starts[1]..starts[2],
        writable: starts[2]..at,
    })
}

/// The header of an ELF64 little-endian section, for [`layout`].
#[cfg(feature = "module")]
pub fn from_elf(sh: &object::elf::SectionHeader64<object::LittleEndian>) -> SectionHeader {
    let le = object::LittleEndian;
    SectionHeader {
        flags: sh.sh_flags.get(le).0,
        sh_type: sh.sh_type.get(le).0,
        size: sh.sh_size.get(le),
        align: sh.sh_addralign.get(le),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = SHF_ALLOC;
    const W: u64 = SHF_WRITE;
    const X: u64 = SHF_EXECINSTR;

    fn sh(flags: u64, sh_type: u32, size: u64, align: u64) -> SectionHeader {
        SectionHeader {
            flags,
            sh_type,
            size,
            align,
        }
    }

    fn addrs(s: &[SectionHeader]) -> (std::vec::Vec<(usize, u64)>, Groups) {
        let mut v = std::vec::Vec::new();
        let g = layout(s.iter().copied(), 0x1000, &mut |i, a| v.push((i, a))).unwrap();
        (v, g)
    }

    #[test]
    fn groups_in_order_sections_in_index_order_at_their_alignment() {
        let s = [
            sh(0, 0, 0, 0),
            sh(A | W, 1, 3, 1),   // .data
            sh(A | X, 1, 5, 16),  // .text
            sh(A, 1, 1, 1),       // .rodata
            sh(A | X, 1, 2, 16),  // .text.b
            sh(A, 1, 8, 8),       // .ksites
            sh(A | W, 8, 16, 32), // .bss
            sh(0, 2, 100, 8),     // .symtab: not loaded
        ];
        let (v, g) = addrs(&s);
        assert_eq!(
            v,
            [
                (2, 0x1000),
                (4, 0x1010),
                (3, 0x2000),
                (5, 0x2008),
                (1, 0x3000),
                (6, 0x3020)
            ]
        );
        assert_eq!(g.exec, 0x1000..0x2000);
        assert_eq!(g.read_only, 0x2000..0x3000);
        assert_eq!(g.writable, 0x3000..0x4000);
    }

    /// The loader and `ksites embed` once disagreed here: a read-only `SHT_NOBITS`
    /// section goes with the read-only data, by its flags.
    #[test]
    fn read_only_nobits_goes_to_the_read_only_group() {
        let nobits_ro = sh(A, SHT_NOBITS, 0x40, 8);
        assert_eq!(nobits_ro.group(), Some(Group::ReadOnly));
        assert_eq!(group(A | W), Some(Group::Writable));
        let (v, g) = addrs(&[sh(0, 0, 0, 0), nobits_ro, sh(A | W, 1, 8, 8)]);
        assert_eq!(v, [(1, 0x1000), (2, 0x2000)]);
        assert!(g.read_only.contains(&0x1000));
        assert!(g.exec.is_empty());
    }

    #[test]
    fn bad_alignment_and_overflow_are_errors() {
        let one = |s: SectionHeader| layout([s], 0, &mut |_, _| {});
        assert_eq!(one(sh(A, 1, 1, 3)), Err(LayoutError::BadAlignment));
        assert_eq!(
            one(sh(A, 1, 1, 0x2000)),
            Err(LayoutError::AlignmentAbovePage)
        );
        assert_eq!(one(sh(A, 1, u64::MAX, 1)), Err(LayoutError::TooBig));
    }
}
