//! The raw `Elf64_Rela` entries of an ELF64 file, with their file offsets (so an entry
//! can be rewritten in place): one walker for `embed` and the tests.

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _};

/// One `Elf64_Rela` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRela {
    /// File offset of the entry.
    pub file_offset: usize,
    /// Index of the section it applies to (`sh_info`).
    pub section: usize,
    /// `r_offset`.
    pub r_offset: u64,
    /// Relocation type.
    pub r_type: u32,
    /// Symbol index.
    pub sym: u32,
    /// `r_addend`.
    pub addend: i64,
}

/// Every entry of every `SHT_RELA` section of `data` (none if it is not ELF64
/// little-endian; a section whose bytes lie outside the file is skipped).
pub fn raw_relas(data: &[u8]) -> Vec<RawRela> {
    let mut out = Vec::new();
    let Ok(file) = ElfFile64::<LE>::parse(data) else {
        return out;
    };
    for sec in file.elf_section_table().iter() {
        if sec.sh_type(LE) != elf::SHT_RELA {
            continue;
        }
        let (off, size) = (sec.sh_offset(LE) as usize, sec.sh_size(LE) as usize);
        let Some(bytes) = off.checked_add(size).and_then(|end| data.get(off..end)) else {
            continue;
        };
        for (i, e) in bytes.chunks_exact(24).enumerate() {
            let word = |at: usize| u64::from_le_bytes(e[at..at + 8].try_into().expect("8 bytes"));
            let info = word(8);
            out.push(RawRela {
                file_offset: off + 24 * i,
                section: sec.sh_info(LE) as usize,
                r_offset: word(0),
                r_type: info as u32,
                sym: (info >> 32) as u32,
                addend: word(16) as i64,
            });
        }
    }
    out
}
