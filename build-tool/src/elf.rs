//! Read side: a parsed little-endian ELF64 image or object, with the lookups the tool
//! needs, and its [`Target`] (chosen once, from `e_machine`).

use std::ops::Range;

use anyhow::{Context, Result, anyhow, bail};
use object::elf;
use object::read::elf::{ElfFile64, ElfSection64, FileHeader, Rela as _, SectionHeader, Sym as _};
use object::{
    LittleEndian, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex, SymbolKind,
};

use crate::target::Target;

/// What kind of ELF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfKind {
    /// ET_EXEC: a linked image at fixed addresses.
    Exec,
    /// ET_DYN: a PIE or shared object.
    Dyn,
    /// ET_REL: a relocatable object (section offsets, no addresses).
    Rel,
}

/// A symbol the tool may name in output.
#[derive(Clone, Debug)]
pub struct Sym {
    /// Address (ET_EXEC/ET_DYN) or section offset (ET_REL).
    pub addr: u64,
    /// Size, 0 if unknown.
    pub size: u64,
    /// Raw (mangled) name.
    pub name: String,
    /// Section it is defined in.
    pub section: SectionIndex,
    /// STT_FUNC.
    pub is_func: bool,
}

/// One relocation of an executable section.
#[derive(Clone, Copy, Debug)]
pub struct Reloc {
    /// `r_offset`: address (linked images) or section offset (ET_REL).
    pub offset: u64,
    /// The raw relocation type; [`Target::reloc_class`] says what it is.
    pub r_type: u32,
    /// `S`: the symbol's value (for a section symbol, the section's address).
    pub sym_value: u64,
    /// Index of the symbol.
    pub sym_index: usize,
    /// Whether the symbol is a section symbol (then `sym_value` is the section address).
    pub sym_is_section: bool,
    /// Section the symbol is defined in (`None`: undefined or absolute).
    pub sym_section: Option<SectionIndex>,
    /// `A`.
    pub addend: i64,
}

/// One raw `Elf64_Rela` entry (see [`raw_relas`]), with where it is in the file, so it
/// can be rewritten in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRela {
    /// File offset of the entry.
    pub file_offset: usize,
    /// Index of the section it applies to (`sh_info`).
    pub section: usize,
    /// `r_offset`.
    pub offset: u64,
    /// The raw relocation type (`ELF64_R_TYPE`).
    pub r_type: u32,
    /// The symbol index (`ELF64_R_SYM`).
    pub sym_index: usize,
    /// `r_addend`.
    pub addend: i64,
}

/// Every entry of every `SHT_RELA` section of `file` (parsed from `data`), read raw: the
/// one RELA walker of the build tool (`embed` rewrites entries in place through
/// [`RawRela::file_offset`]). A section whose bytes lie outside the file is skipped.
pub fn raw_relas<'a>(
    file: &'a ElfFile64<'_, LittleEndian>,
    data: &'a [u8],
) -> impl Iterator<Item = RawRela> + 'a {
    file.elf_section_table()
        .iter()
        .filter(|sec| sec.sh_type(LittleEndian).0 == elf::SHT_RELA.0)
        .filter_map(move |sec| {
            let off = usize::try_from(sec.sh_offset(LittleEndian)).ok()?;
            let size = usize::try_from(sec.sh_size(LittleEndian)).ok()?;
            let bytes = data.get(off..off.checked_add(size)?)?;
            Some((off, sec.sh_info(LittleEndian) as usize, bytes))
        })
        .flat_map(|(off, section, bytes)| {
            bytes.chunks_exact(24).enumerate().map(move |(i, e)| {
                let word =
                    |at: usize| u64::from_le_bytes(e[at..at + 8].try_into().expect("8 bytes"));
                let info = word(8);
                RawRela {
                    file_offset: off + 24 * i,
                    section,
                    offset: word(0),
                    r_type: info as u32,
                    sym_index: (info >> 32) as usize,
                    addend: word(16) as i64,
                }
            })
        })
}

/// A parsed ELF file and its source bytes.
pub struct Image<'d> {
    /// The file name, for messages.
    pub path: String,
    /// The whole file.
    pub data: &'d [u8],
    /// The parsed file.
    pub file: ElfFile64<'d, LittleEndian>,
    /// ET_* kind.
    pub kind: ElfKind,
    /// The instruction set, from `e_machine`: everything architecture-specific goes
    /// through it.
    pub target: Target,
    /// Defined symbols, sorted by (section, address).
    syms: Vec<Sym>,
    /// Which relocation sections apply to which section (as the `object` crate maps them).
    reloc_sections: object::read::elf::RelocationSections,
    /// The header's MIPS64 little-endian flag (relocation entries are read through it).
    mips64el: bool,
    /// The symbol table's and the section headers' string tables.
    sym_strings: Strings<'d>,
    section_strings: Strings<'d>,
}

/// A string table, read as `object`'s `StringTable` reads it (the same bounds, the same
/// failures) but without `memchr`: its first use runs CPU-feature detection (`cpuid`,
/// slow in a VM), which dominated the names a small object's scan looks up.
#[derive(Clone, Copy, Default)]
struct Strings<'d>(Option<&'d [u8]>);

impl<'d> Strings<'d> {
    /// The table at file offsets `start..start + size` of `data`.
    fn new(data: &'d [u8], start: u64, size: u64) -> Self {
        let range = start
            .checked_add(size)
            .and_then(|end| Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?));
        Strings(range.and_then(|r| data.get(r)))
    }

    /// The NUL-terminated UTF-8 string at `offset`.
    fn get(self, offset: u32) -> Option<&'d str> {
        let tail = self.0?.get(usize::try_from(offset).ok()?..)?;
        let len = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..len]).ok()
    }
}

impl std::fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .finish()
    }
}

impl<'d> Image<'d> {
    /// Parses `data` (the contents of `path`) as a little-endian ELF64 file of a
    /// supported [`Target`].
    pub fn parse(path: &str, data: &'d [u8]) -> Result<Image<'d>> {
        refuse_archive(path, data)?;
        let file = ElfFile64::<LittleEndian>::parse(data)
            .with_context(|| format!("{path}: not a valid ELF64 little-endian file"))?;
        let hdr = file.elf_header();
        let e = LittleEndian;
        let target =
            Target::from_machine(hdr.e_machine(e).0).map_err(|m| anyhow!("{path}: {m}"))?;
        let kind = match hdr.e_type(e) {
            elf::ET_EXEC => ElfKind::Exec,
            elf::ET_DYN => ElfKind::Dyn,
            elf::ET_REL => ElfKind::Rel,
            t => bail!("{path}: ELF type {} is not ET_EXEC, ET_DYN or ET_REL", t.0),
        };
        let sym_strings = match file.elf_symbol_table().string_section() {
            SectionIndex(0) => Strings::default(),
            i => file
                .elf_section_table()
                .section(i)
                .ok()
                .filter(|h| h.sh_type(e).0 == elf::SHT_STRTAB.0)
                .map_or_else(Strings::default, |h| {
                    Strings::new(data, h.sh_offset(e), h.sh_size(e))
                }),
        };
        let section_strings = match file.elf_section_table().is_empty() {
            true => Strings::default(),
            false => hdr
                .section_strings_index(e, data)
                .ok()
                .and_then(|i| file.elf_section_table().section(i).ok())
                .and_then(|h| h.file_range(e))
                .map_or_else(Strings::default, |(off, size)| {
                    Strings::new(data, off, size)
                }),
        };
        check_sections(path, &file, data, section_strings)?;
        let mut syms: Vec<Sym> = file
            .symbols()
            .filter_map(|s| {
                let section = s.section_index()?;
                let name = sym_strings.get(s.elf_symbol().st_name(e))?;
                if name.is_empty()
                    || s.kind() == SymbolKind::Section
                    || s.kind() == SymbolKind::File
                {
                    return None;
                }
                Some(Sym {
                    addr: s.address(),
                    size: s.size(),
                    name: name.to_string(),
                    section,
                    is_func: s.kind() == SymbolKind::Text,
                })
            })
            .collect();
        syms.sort_by(|a, b| {
            (a.section.0, a.addr, !a.is_func, &a.name).cmp(&(
                b.section.0,
                b.addr,
                !b.is_func,
                &b.name,
            ))
        });
        let reloc_sections = file
            .elf_section_table()
            .relocation_sections(e, file.elf_symbol_table().section())
            .with_context(|| format!("{path}: bad relocation sections"))?;
        let mips64el = hdr.is_mips64el(e);
        Ok(Image {
            path: path.to_string(),
            data,
            file,
            kind,
            target,
            syms,
            reloc_sections,
            mips64el,
            sym_strings,
            section_strings,
        })
    }

    /// A section's name (`None` if the string table does not hold one), as
    /// `ObjectSection::name` reads it.
    pub fn section_name(&self, sec: &ElfSection64<'d, '_, LittleEndian>) -> Option<&'d str> {
        self.section_strings
            .get(sec.elf_section_header().sh_name(LittleEndian))
    }

    /// `section NAME (index N)`, for messages.
    pub fn section_label(&self, index: SectionIndex) -> String {
        let name = self
            .file
            .elf_section_table()
            .section(index)
            .ok()
            .and_then(|h| self.section_strings.get(h.sh_name(LittleEndian)));
        label(name, index.0)
    }

    /// Sections that are allocated and executable.
    pub fn exec_sections(&self) -> impl Iterator<Item = ElfSection64<'d, '_, LittleEndian>> + '_ {
        self.file.sections().filter(|s| {
            let f = s.elf_section_header().sh_flags(LittleEndian).0;
            f & elf::SHF_EXECINSTR.0 != 0 && f & elf::SHF_ALLOC.0 != 0
        })
    }

    /// Address ranges of the executable sections (linked images).
    pub fn exec_ranges(&self) -> Vec<Range<u64>> {
        let mut v: Vec<Range<u64>> = self
            .exec_sections()
            .filter(|s| s.size() > 0)
            .map(|s| s.address()..s.address().saturating_add(s.size()))
            .collect();
        v.sort_by_key(|r| r.start);
        v
    }

    /// A section by name.
    pub fn section_by_name(&self, name: &str) -> Option<ElfSection64<'d, '_, LittleEndian>> {
        self.file.section_by_name(name)
    }

    /// `len` bytes of file-backed contents at virtual address `addr`.
    pub fn read_va(&self, addr: u64, len: u64) -> Option<&'d [u8]> {
        for s in self.file.sections() {
            let h = s.elf_section_header();
            if h.sh_type(LittleEndian).0 == elf::SHT_NOBITS.0
                || h.sh_flags(LittleEndian).0 & elf::SHF_ALLOC.0 == 0
            {
                continue;
            }
            let (start, size) = (s.address(), s.size());
            if addr >= start && addr.checked_add(len)? <= start.saturating_add(size) {
                let data = s.data().ok()?;
                let off = (addr - start) as usize;
                return data.get(off..off + len as usize);
            }
        }
        None
    }

    /// File offset of virtual address `addr` (inside a file-backed section).
    pub fn va_to_file_offset(&self, addr: u64, len: u64) -> Option<u64> {
        for s in self.file.sections() {
            let h = s.elf_section_header();
            if h.sh_type(LittleEndian).0 == elf::SHT_NOBITS.0
                || h.sh_flags(LittleEndian).0 & elf::SHF_ALLOC.0 == 0
            {
                continue;
            }
            let (start, size) = (s.address(), s.size());
            if addr >= start && addr.checked_add(len)? <= start.saturating_add(size) {
                let (off, _) = s.file_range()?;
                let at = off.checked_add(addr - start)?;
                // A malformed header can point a section past the end of the file.
                return (at.checked_add(len)? <= self.data.len() as u64).then_some(at);
            }
        }
        None
    }

    /// A defined symbol by exact name.
    pub fn symbol(&self, name: &str) -> Option<&Sym> {
        self.syms.iter().find(|s| s.name == name)
    }

    /// Name of a symbol at exactly `addr` in `section`, preferring functions.
    pub fn symbol_at(&self, section: SectionIndex, addr: u64) -> Option<&Sym> {
        self.symbol_at_index(section, addr).map(|i| &self.syms[i])
    }

    /// [`Image::symbol_at`], as an index for [`Image::sym`].
    pub fn symbol_at_index(&self, section: SectionIndex, addr: u64) -> Option<usize> {
        let i = self
            .syms
            .partition_point(|s| (s.section.0, s.addr) < (section.0, addr));
        self.syms
            .get(i)
            .filter(|s| s.section == section && s.addr == addr)
            .map(|_| i)
    }

    /// The symbol that contains `addr` in `section`: the last one starting at or before
    /// it whose size covers it (or that has no size). Functions win over labels.
    pub fn enclosing_symbol(&self, section: SectionIndex, addr: u64) -> Option<&Sym> {
        self.enclosing_index(section, addr).map(|i| &self.syms[i])
    }

    fn enclosing_index(&self, section: SectionIndex, addr: u64) -> Option<usize> {
        self.enclosing_span(section, addr).0
    }

    /// [`Image::enclosing_symbol`]'s answer for `addr` (as an index into the sorted
    /// symbols), and the end of the range `addr..end` over which that answer stays the
    /// same: the answer depends only on which symbols start at or before the address
    /// (fixed until the next symbol's start) and on which of them cover it (fixed until
    /// the first end of a sized symbol examined past `addr`). Callers walking
    /// relocations in address order reuse one answer for a whole function.
    pub fn enclosing_span(&self, section: SectionIndex, addr: u64) -> (Option<usize>, u64) {
        let end = self
            .syms
            .partition_point(|s| (s.section.0, s.addr) <= (section.0, addr));
        let mut until = self
            .syms
            .get(end)
            .filter(|s| s.section == section)
            .map_or(u64::MAX, |s| s.addr);
        let mut best: Option<usize> = None;
        for (i, s) in self.syms[..end].iter().enumerate().rev() {
            if s.section != section {
                break;
            }
            let s_end = s.addr.saturating_add(s.size);
            if s.size != 0 && addr < s_end {
                // Covers `addr`, and stops covering at its end.
                until = until.min(s_end);
            }
            let covers = s.size == 0 || addr < s_end;
            if covers && s.is_func {
                return (Some(i), until);
            }
            if covers && best.is_none() {
                best = Some(i);
            }
            // Sized functions never nest; stop once we are past any plausible start.
            if s.is_func && s.size != 0 && addr >= s_end && best.is_some() {
                break;
            }
        }
        (best, until)
    }

    /// The number of entries of the symbol table (relocations name symbols by their
    /// index in it, below this).
    pub fn symbol_count(&self) -> usize {
        self.file.elf_symbol_table().len()
    }

    /// The number of defined symbols [`Image::sym`] indexes.
    pub fn defined_count(&self) -> usize {
        self.syms.len()
    }

    /// A symbol of [`Image::enclosing_span`] by its index.
    pub fn sym(&self, i: usize) -> &Sym {
        &self.syms[i]
    }

    /// Start of the next symbol after `addr` in `section` (to bound a sizeless symbol).
    pub fn next_symbol_start(&self, section: SectionIndex, addr: u64) -> Option<u64> {
        let i = self
            .syms
            .partition_point(|s| (s.section.0, s.addr) <= (section.0, addr));
        self.syms
            .get(i)
            .filter(|s| s.section == section)
            .map(|s| s.addr)
    }

    /// `symbol+0xoff` for an address in `section`, demangled, for humans.
    pub fn describe(&self, section: SectionIndex, addr: u64) -> String {
        self.location(section, addr).to_string()
    }

    /// The same as [`Image::describe`], without formatting (the name is demangled only
    /// when displayed).
    pub fn location(&self, section: SectionIndex, addr: u64) -> Location<'_> {
        match self.enclosing_index(section, addr) {
            Some(i) => {
                let s = &self.syms[i];
                Location {
                    function: Some(&s.name),
                    offset: addr - s.addr,
                    addr,
                }
            }
            None => Location {
                function: None,
                offset: 0,
                addr,
            },
        }
    }

    /// The relocations applying to `section` (from `.rela<name>` sections: `--emit-relocs`
    /// output in linked images, ordinary relocations in objects), decoded one at a time
    /// (an image can carry millions: they are not collected).
    pub fn relocations<'s>(
        &'s self,
        section: &'s ElfSection64<'d, '_, LittleEndian>,
    ) -> impl Iterator<Item = Result<Reloc>> + 's {
        section.relocations().filter_map(move |(offset, r)| {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                return None;
            };
            let sym = match r.target() {
                RelocationTarget::Symbol(i) => Some(i),
                RelocationTarget::Absolute => None,
                _ => return None,
            };
            Some(self.reloc(&|| Some(section.index()), offset, r_type.0, sym, r.addend()))
        })
    }

    /// The relocations of [`Image::relocations`], as the slices of raw `Elf64_Rela`
    /// entries they come from (in the same order: random access, so the work can be
    /// split), when every relocation section applying to `section` is `SHT_RELA` (the
    /// x86-64 norm); `None` if one is `SHT_REL` or `SHT_CREL`. [`Image::rela_reloc`]
    /// decodes an entry.
    pub fn rela_tables(
        &self,
        section: SectionIndex,
    ) -> Option<Vec<&'d [elf::Rela64<LittleEndian>]>> {
        let sections = self.file.elf_section_table();
        let mut tables = Vec::new();
        let mut i = section;
        while let Some(next) = self.reloc_sections.get(i) {
            i = next;
            let s = sections.section(i).ok()?;
            if s.sh_type(LittleEndian).0 != elf::SHT_RELA.0 {
                return None;
            }
            // An unreadable table is skipped, as the `object` crate's iterator does.
            if let Ok(t) = s.data_as_array(LittleEndian, self.data) {
                tables.push(t);
            }
        }
        Some(tables)
    }

    /// One entry of [`Image::rela_tables`], as [`Image::relocations`] gives it.
    pub fn rela_reloc(&self, r: &elf::Rela64<LittleEndian>) -> Result<Reloc> {
        let e = LittleEndian;
        let sym = r.r_sym(e, self.mips64el);
        let sym = (sym != 0).then_some(object::SymbolIndex(sym as usize));
        self.reloc(
            &|| self.rela_section(r),
            r.r_offset(e),
            r.r_type(e, self.mips64el).0,
            sym,
            r.r_addend(e),
        )
    }

    /// The section that relocation entry `r` (a reference into the file's bytes, from
    /// [`Image::rela_tables`]) applies to, found from where it lies (for messages).
    fn rela_section(&self, r: &elf::Rela64<LittleEndian>) -> Option<SectionIndex> {
        let at = (r as *const elf::Rela64<LittleEndian> as usize)
            .checked_sub(self.data.as_ptr() as usize)? as u64;
        self.file.elf_section_table().iter().find_map(|h| {
            let (off, size) = h.file_range(LittleEndian)?;
            (h.sh_type(LittleEndian).0 == elf::SHT_RELA.0 && at >= off && at - off < size)
                .then(|| SectionIndex(h.sh_info(LittleEndian) as usize))
        })
    }

    /// A relocation at `offset` of the section `section()` gives (asked only for an
    /// error message) against symbol `sym` (`None`: absolute).
    fn reloc(
        &self,
        section: &dyn Fn() -> Option<SectionIndex>,
        offset: u64,
        r_type: u32,
        sym: Option<object::SymbolIndex>,
        addend: i64,
    ) -> Result<Reloc> {
        let (sym_value, sym_index, sym_is_section, sym_section) = match sym {
            Some(i) => {
                let sym = self.file.symbol_by_index(i).map_err(|_| {
                    let sec = section()
                        .map_or_else(String::new, |s| format!("{}: ", self.section_label(s)));
                    anyhow!(
                        "{}: {sec}relocation at offset {offset:#x} names symbol {}, past the \
                         end of the symbol table ({} entries)",
                        self.path,
                        i.0,
                        self.symbol_count()
                    )
                })?;
                let v = if sym.kind() == SymbolKind::Section {
                    match sym.section_index() {
                        Some(si) => self
                            .file
                            .section_by_index(si)
                            .map(|s| s.address())
                            .unwrap_or(0),
                        None => 0,
                    }
                } else {
                    // The raw st_value: object 0.40's `address()` is 0 for SHN_COMMON,
                    // and a linked image's relocation was resolved with the value.
                    sym.elf_symbol().st_value(LittleEndian)
                };
                (
                    v,
                    i.0,
                    sym.kind() == SymbolKind::Section,
                    sym.section_index(),
                )
            }
            None => (0, 0, false, None),
        };
        Ok(Reloc {
            offset,
            r_type,
            sym_value,
            sym_index,
            sym_is_section,
            sym_section,
            addend,
        })
    }

    /// Every entry of every `SHT_RELA` section (dynamic, PLT and `--emit-relocs` ones
    /// alike), read raw: the `object` crate's relocation iterator does not attribute a
    /// NONE relocation to its symbol.
    pub fn raw_relas(&self) -> impl Iterator<Item = RawRela> + '_ {
        raw_relas(&self.file, self.data)
    }

    /// Whether any executable section carries relocations (i.e. `--emit-relocs` was used,
    /// or this is an object).
    pub fn has_text_relocations(&self) -> bool {
        self.exec_sections()
            .any(|s| s.relocations().next().is_some())
    }

    /// The raw name of the symbol with index `i`.
    pub fn symbol_name(&self, i: usize) -> String {
        self.raw_symbol_name(i).to_string()
    }

    /// [`Image::symbol_name`], borrowed from the file (empty if there is none).
    pub fn raw_symbol_name(&self, i: usize) -> &'d str {
        self.file
            .symbol_by_index(object::SymbolIndex(i))
            .ok()
            .and_then(|s| self.sym_strings.get(s.elf_symbol().st_name(LittleEndian)))
            .unwrap_or_default()
    }
}

/// Where an address is, for humans: `function+0xoff` (demangled when displayed, so
/// a location nobody prints costs no demangling), or the bare address when no symbol
/// encloses it. Displays as [`Image::describe`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location<'a> {
    /// The enclosing symbol's raw (mangled) name.
    pub function: Option<&'a str>,
    /// Offset from the symbol.
    pub offset: u64,
    /// The address.
    pub addr: u64,
}

impl std::fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.function {
            Some(name) if self.offset == 0 => write!(f, "{:#}", rustc_demangle::demangle(name)),
            Some(name) => write!(f, "{:#}+{:#x}", rustc_demangle::demangle(name), self.offset),
            None => write!(f, "{:#x}", self.addr),
        }
    }
}

/// Demangles a Rust (legacy or v0) or returns the name unchanged.
pub fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// `section NAME (index N)` (`?` for a name the string table does not hold).
fn label(name: Option<&str>, index: usize) -> String {
    format!("section {} (index {index})", name.unwrap_or("?"))
}

/// Checks what [`Image::parse`] takes from every section header before anything is
/// read through it: `sh_addralign` is 0 or a power of two, and the bytes of a section
/// with file contents lie inside the file. The error names the file, the section (name
/// and index) and the bad value.
fn check_sections(
    path: &str,
    file: &ElfFile64<'_, LittleEndian>,
    data: &[u8],
    names: Strings<'_>,
) -> Result<()> {
    let e = LittleEndian;
    let len = data.len() as u64;
    for (i, h) in file.elf_section_table().iter().enumerate().skip(1) {
        let what = || label(names.get(h.sh_name(e)), i);
        let align = h.sh_addralign(e);
        if align != 0 && !align.is_power_of_two() {
            bail!(
                "{path}: {}: sh_addralign {align:#x} is not a power of two",
                what()
            );
        }
        let (off, size) = (h.sh_offset(e), h.sh_size(e));
        let t = h.sh_type(e).0;
        if t == elf::SHT_NOBITS.0 || t == elf::SHT_NULL.0 || size == 0 {
            continue;
        }
        if off.checked_add(size).is_none_or(|end| end > len) {
            bail!(
                "{path}: {}: contents at offset {off:#x}, size {size:#x} run past the end of \
                 the file ({len:#x} bytes)",
                what()
            );
        }
    }
    Ok(())
}

/// The magic of an `ar` archive, and of a GNU thin archive.
const AR_MAGICS: [&[u8]; 2] = [b"!<arch>\n", b"!<thin>\n"];

/// Whether `data` is an `ar` archive (a static library: `ar rcs x.a y.o`).
pub fn is_archive(data: &[u8]) -> bool {
    AR_MAGICS.iter().any(|m| data.starts_with(m))
}

/// An error naming `path` as an archive if it is one (commands that take one object or
/// image call it first, so an archive is not reported as a malformed ELF file).
pub fn refuse_archive(path: &str, data: &[u8]) -> Result<()> {
    if is_archive(data) {
        bail!(
            "{path}: is an ar archive; ksites takes one object or image here (extract the \
             members with `ar x`)"
        );
    }
    Ok(())
}

/// The members of the `ar` archive `data` (the contents of `path`) that are ELF files,
/// each named `path(member)` for messages, in archive order; the symbol table and
/// other non-ELF members are left out. An error for a thin archive (its members are
/// separate files) or a malformed one. `scan` reads an archive through it.
pub fn archive_members<'d>(path: &str, data: &'d [u8]) -> Result<Vec<(String, &'d [u8])>> {
    let ar = object::read::archive::ArchiveFile::parse(data)
        .with_context(|| format!("{path}: malformed ar archive"))?;
    if ar.is_thin() {
        bail!("{path}: is a thin ar archive (its members are separate files: scan those)");
    }
    let mut out = Vec::new();
    for m in ar.members() {
        let m = m.with_context(|| format!("{path}: malformed ar archive member header"))?;
        let name = format!("{path}({})", String::from_utf8_lossy(m.name()));
        let bytes = m
            .data(data)
            .with_context(|| format!("{name}: member data past the end of the archive"))?;
        if bytes.starts_with(&elf::ELFMAG) {
            out.push((name, bytes));
        }
    }
    Ok(out)
}

/// The files in `data` (the contents of `path`) for a command that reads several:
/// the file itself, or for an `ar` archive its ELF members ([`archive_members`]), each
/// with the name to report.
pub fn inputs<'d>(path: &str, data: &'d [u8]) -> Result<Vec<(String, &'d [u8])>> {
    match is_archive(data) {
        true => archive_members(path, data),
        false => Ok(vec![(path.to_string(), data)]),
    }
}

/// Convenience for `FileHeader` trait use elsewhere.
pub fn e_type(data: &[u8]) -> Option<u16> {
    let h = object::elf::FileHeader64::<LittleEndian>::parse(data).ok()?;
    Some(h.e_type(LittleEndian).0)
}

/// Files at least this large are memory-mapped by [`read_file`]; smaller ones are read
/// (one `read(2)` costs less than mapping, faulting in and unmapping a few pages).
const MAP_AT_LEAST: u64 = 256 * 1024;

/// A whole input file's contents, as [`read_file`] gives them.
#[derive(Debug)]
pub enum FileBytes {
    /// Memory-mapped, read-only (large files: nothing is copied).
    Mapped(memmap2::Mmap),
    /// Read into memory.
    Read(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Read(v) => v,
        }
    }
}

/// Reads a whole file: a large regular file is mapped read-only, anything else is read
/// (with the same errors `std::fs::read` gives). A file larger than the input limit
/// ([`crate::output::max_input_size`]) is an error: a regular file's size is checked
/// before anything is read, and a pipe or device (`/dev/zero`) is read no further than
/// one byte past the limit.
pub fn read_file(path: &std::path::Path) -> std::io::Result<FileBytes> {
    use std::io::Read as _;
    let (mut f, meta) = crate::output::open_input(path)?;
    if !meta.is_file() {
        return crate::output::read_bounded(&mut f).map(FileBytes::Read);
    }
    if meta.len() >= MAP_AT_LEAST {
        // SAFETY: the map is read-only and this process never writes the file (outputs
        // go to a new temporary file that is renamed over the output path, never into
        // the input's inode). What the map cannot rule out is another process
        // rewriting or truncating the input while the tool runs (then reads see the new
        // bytes, or fault past a new end) — the caveat of every tool that maps its
        // input, as linkers do; the build system does not change a file it is
        // processing.
        return unsafe { memmap2::Mmap::map(&f) }.map(FileBytes::Mapped);
    }
    let mut v = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.read_to_end(&mut v)?;
    Ok(FileBytes::Read(v))
}

// Header consistency of linked images: checks `embed`'s readers of ifunc and probe
// records run first, kept apart from the parsing above.

/// Refuses a linked image (ET_EXEC or ET_DYN; others pass) whose headers contradict
/// themselves where the tool relies on them: a `PT_LOAD` with more file bytes than
/// memory (`p_filesz > p_memsz`) or whose file bytes lie outside the file, and a
/// missing or empty section name string table (no section could be found by name, and
/// records and probe declarations would silently be missed).
pub fn check_linked_headers(img: &Image<'_>) -> Result<()> {
    use object::read::elf::ProgramHeader as _;
    if img.kind == ElfKind::Rel {
        return Ok(());
    }
    let e = LittleEndian;
    let path = &img.path;
    for (i, p) in img.file.elf_program_headers().iter().enumerate() {
        if p.p_type(e).0 != elf::PT_LOAD.0 {
            continue;
        }
        let (off, filesz, memsz) = (p.p_offset(e), p.p_filesz(e), p.p_memsz(e));
        if filesz > memsz {
            bail!(
                "{path}: program header {i} (PT_LOAD at {:#x}) is malformed: p_filesz {filesz:#x} \
                 is larger than p_memsz {memsz:#x}",
                p.p_vaddr(e)
            );
        }
        if off
            .checked_add(filesz)
            .is_none_or(|end| end > img.data.len() as u64)
        {
            bail!(
                "{path}: program header {i} (PT_LOAD at {:#x}) is malformed: its file bytes \
                 {off:#x}+{filesz:#x} lie past the end of the file ({:#x} bytes)",
                p.p_vaddr(e),
                img.data.len()
            );
        }
    }
    let sections = img.file.elf_section_table();
    if sections.is_empty() {
        return Ok(());
    }
    let index = img
        .file
        .elf_header()
        .section_strings_index(e, img.data)
        .ok()
        .filter(|i| i.0 != 0);
    let Some(index) = index else {
        bail!("{path}: malformed: the file has sections but no section name string table");
    };
    let h = sections
        .section(index)
        .with_context(|| format!("{path}: malformed: bad section name string table index"))?;
    if h.sh_type(e).0 != elf::SHT_STRTAB.0 || h.sh_size(e) == 0 {
        bail!(
            "{path}: malformed: the section name string table (section {}) is {}",
            index.0,
            if h.sh_size(e) == 0 {
                "empty"
            } else {
                "not SHT_STRTAB"
            }
        );
    }
    // Allocated sections lie where a PT_LOAD maps them (their address is what the
    // segment loads at their file offset): otherwise what `embed` patches by section
    // is not what runs, and its new segment is placed from segments that lie.
    let loads: Vec<_> = img
        .file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(e).0 == elf::PT_LOAD.0)
        .map(|p| (p.p_offset(e), p.p_filesz(e), p.p_vaddr(e)))
        .collect();
    for (i, sh) in sections.iter().enumerate() {
        let (addr, off, size) = (sh.sh_addr(e), sh.sh_offset(e), sh.sh_size(e));
        // (A section whose addresses wrap is refused by the readers, as not in the file.)
        if sh.sh_flags(e).0 & elf::SHF_ALLOC.0 == 0
            || sh.sh_type(e).0 == elf::SHT_NOBITS.0
            || size == 0
            || addr.checked_add(size).is_none()
        {
            continue;
        }
        let mapped = loads.iter().any(|&(p_off, p_filesz, p_vaddr)| {
            off >= p_off
                && off.saturating_add(size) <= p_off.saturating_add(p_filesz)
                && p_vaddr.checked_add(off - p_off) == Some(addr)
        });
        if !mapped {
            bail!(
                "{path}: malformed: section {i} ({}) at {addr:#x} (file offset {off:#x}, \
                 {size:#x} bytes) is not where any PT_LOAD segment loads its bytes",
                img.section_strings.get(sh.sh_name(e)).unwrap_or("?")
            );
        }
    }
    // Relocations of executable sections (`--emit-relocs`) are whole entries inside the
    // file, each inside the section it applies to: the probe and ifunc call sites are
    // found through them, and one that points elsewhere hides a call.
    for (i, sh) in sections.iter().enumerate() {
        // (Dynamic relocations, `SHF_ALLOC`, are the dynamic linker's: not these.)
        if sh.sh_type(e).0 != elf::SHT_RELA.0 || sh.sh_flags(e).0 & elf::SHF_ALLOC.0 != 0 {
            continue;
        }
        let Ok(target) = sections.section(SectionIndex(sh.sh_info(e) as usize)) else {
            continue;
        };
        let flags = elf::SHF_ALLOC.0 | elf::SHF_EXECINSTR.0;
        if target.sh_flags(e).0 & flags != flags
            || sh.sh_info(e) == 0
            || target.sh_addr(e).checked_add(target.sh_size(e)).is_none()
        {
            continue;
        }
        let name = img.section_strings.get(sh.sh_name(e)).unwrap_or("?");
        let symtab = sections.section(SectionIndex(sh.sh_link(e) as usize));
        if !symtab.is_ok_and(|t| t.sh_type(e).0 == elf::SHT_SYMTAB.0) {
            bail!(
                "{path}: malformed: relocation section {i} ({name}) names section {} as its \
                 symbol table, which is not one",
                sh.sh_link(e)
            );
        }
        let (off, size) = (sh.sh_offset(e), sh.sh_size(e));
        let entry = size_of::<elf::Rela64<LittleEndian>>() as u64;
        let bytes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, n)| img.data.get(o..o.checked_add(n)?))
            .filter(|_| size % entry == 0);
        let Some(bytes) = bytes else {
            bail!(
                "{path}: malformed: relocation section {i} ({name}) at file offset {off:#x} \
                 ({size:#x} bytes) is not whole {entry}-byte entries inside the file"
            );
        };
        let (start, len) = (target.sh_addr(e), target.sh_size(e));
        for (k, r) in bytes.chunks_exact(entry as usize).enumerate() {
            let at = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            if at < start || at - start >= len {
                bail!(
                    "{path}: malformed: relocation {k} of section {i} ({name}) is at {at:#x}, \
                     outside the section it applies to ({start:#x}..{:#x})",
                    start.saturating_add(len)
                );
            }
        }
    }
    // Every name inside it: a name past its end would be read from whatever `embed`
    // appends there (the new section names), and sections would be mistaken for others.
    let size = h.sh_size(e);
    for (i, sh) in sections.iter().enumerate() {
        if u64::from(sh.sh_name(e)) >= size {
            bail!(
                "{path}: malformed: section {i}'s name offset {:#x} is past the end of the \
                 section name string table ({size:#x} bytes)",
                sh.sh_name(e)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod strings_tests {
    use super::Strings;

    /// The same names as `object`'s `StringTable` (which `ObjectSymbol::name` and
    /// `ObjectSection::name` read), for every offset, including tables that run past
    /// the file, lack a final NUL, or hold invalid UTF-8.
    #[test]
    fn strings_read_as_object_reads_them() {
        let data = b"\0abc\0\xff\0de\0tail".as_slice();
        let n = data.len() as u64;
        for start in 0..n + 2 {
            for size in [0, 1, 3, 5, 7, n - start.min(n), n + 1, u64::MAX] {
                let mine = Strings::new(data, start, size);
                let Some(end) = start.checked_add(size) else {
                    // object refuses such a table when it parses the file.
                    assert_eq!(mine.get(0), None);
                    continue;
                };
                let theirs = object::read::StringTable::new(data, start, end);
                for off in 0..(n as u32 + 3) {
                    let want = theirs
                        .get(off)
                        .ok()
                        .and_then(|b| std::str::from_utf8(b).ok());
                    assert_eq!(mine.get(off), want, "{start} {size} {off}");
                }
            }
        }
        assert_eq!(Strings::default().get(0), None);
        assert_eq!(Strings::new(data, 0, n).get(1), Some("abc"));
    }
}
