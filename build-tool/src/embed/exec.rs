//! `ksites embed` on linked images (ET_EXEC, and ET_DYN PIEs at their link-time
//! addresses, which the self-relative cell does not depend on): the table goes into a
//! `.ksites` section the linker script reserved ([`reserved_slot`]), or else into a new
//! `PT_LOAD` ([`append_segment`]); the image's table cell points at it, C probe sites get their
//! disabled form (their relocations become "none"), `probe!` records get their ids,
//! static key sites get their initial form ([`crate::keys`]), and SystemTap notes
//! describe the probe sites ([`stapsdt_notes`]).

use anyhow::{Context, Result, ensure};
use kernel_loader::cell::{CELL_MAGIC, CELL_SIZE, CELL_SYMBOL};
use kernel_loader::format::{SECTION_NAME, Table};
use kernel_loader::probe::record as probe_record;
use object::elf::{self, FileHeader64, ProgramHeader64, SectionHeader64};
use object::pod::{bytes_of, from_bytes, slice_from_bytes};
use object::{LittleEndian as LE, U16, U32, U64};

use super::report::{AlreadyEmbedded, EmbedReport};
use super::{Embedded, Output};
use crate::elf::Image;
use crate::keys::find_keys;
use crate::probes::{ProbeScan, find_probes};
use crate::records::{find_ifunc_sites, read_ifuncs};
use crate::table::{IfuncEntry, SiteEntry, TableInput, build_sites_for, table_size_with};
use crate::target::{RelocClass, Target};

/// What [`verify_output`] checks in an output: the table's address and size, and the
/// cell that must point at it.
#[derive(Clone, Copy, Debug)]
pub(super) struct OutputCheck {
    table: u64,
    size: usize,
    cell: u64,
}

/// A `.ksites` section the image's linker script reserved for the table: allocated,
/// with file contents, all zero.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reserved {
    addr: u64,
    offset: u64,
    size: u64,
}

/// What the linker-script snippet that reserves a slot looks like (for error messages).
const RESERVE_HINT: &str = "reserve it with contents, e.g. `.ksites : ALIGN(8) { \
     __ksites_table_start = .; BYTE(0); . += N - 1; __ksites_table_end = .; }` \
     (a bare `. += N` makes GNU ld emit NOBITS)";

/// Classifies a linked image's `.ksites` section `sec`: `None` if it holds a table
/// already (it starts with the table magic), the slot if it is a zero-filled
/// reservation, an error otherwise (not allocated, no file contents, other bytes).
pub(super) fn reserved_slot(
    path: &str,
    sec: &object::read::elf::ElfSection64<'_, '_, LE>,
) -> Result<Option<Reserved>> {
    use object::read::elf::SectionHeader as _;
    let h = sec.elf_section_header();
    let (addr, size) = (h.sh_addr(LE), h.sh_size(LE));
    ensure!(
        h.sh_flags(LE).0 & elf::SHF_ALLOC.0 != 0,
        "{path}: section {SECTION_NAME} is not allocated (SHF_ALLOC); a reserved table slot \
         must be loaded: place it in an output section of a PT_LOAD segment"
    );
    ensure!(
        h.sh_type(LE).0 != elf::SHT_NOBITS.0,
        "{path}: the reserved section {SECTION_NAME} ({size} bytes at {addr:#x}) is NOBITS, \
         so the table has no file bytes to go into; {RESERVE_HINT}"
    );
    let bytes = h
        .data(LE, sec.elf_file().data())
        .map_err(|_| anyhow::anyhow!("{path}: section {SECTION_NAME} lies outside the file"))?;
    if bytes.starts_with(&kernel_loader::format::MAGIC) {
        return Ok(None);
    }
    ensure!(
        bytes.iter().all(|&b| b == 0),
        "{path}: section {SECTION_NAME} ({size} bytes at {addr:#x}) is neither a table nor \
         a zero-filled reservation; fill the reserved slot with zeros"
    );
    ensure!(
        addr % 8 == 0,
        "{path}: the reserved section {SECTION_NAME} at {addr:#x} is not 8-byte aligned; \
         {RESERVE_HINT}"
    );
    Ok(Some(Reserved {
        addr,
        offset: h.sh_offset(LE),
        size,
    }))
}

/// Writes the table into the reserved slot `r`: the program headers stay as they are.
/// With probe notes, the `.stapsdt.base` byte follows the table inside the slot, and the
/// (not loaded) `.note.stapsdt` section is appended with a new section header table.
fn fill_reserved<'a>(
    path: &str,
    data: &'a [u8],
    r: &Reserved,
    size: usize,
    contents: impl FnOnce(u64) -> Result<Vec<u8>>,
    notes: impl FnOnce(u64) -> Vec<u8>,
) -> Result<(Output<'a>, u64)> {
    let base_addr = r.addr.saturating_add(size as u64);
    let notes = notes(base_addr);
    let needed = size as u64 + u64::from(!notes.is_empty());
    ensure!(
        needed <= r.size,
        "{path}: the reserved section {SECTION_NAME} ({} bytes at {:#x}) is too small for \
         the table: reserve at least {needed} bytes",
        r.size,
        r.addr
    );
    let table = contents(r.addr)?;
    ensure!(
        table.len() == size,
        "internal: table has {} bytes, expected {size}",
        table.len()
    );
    let mut output = Output::new(data);
    output.patch(r.offset as usize, &table).with_context(|| {
        format!("{path}: the reserved section {SECTION_NAME} lies past the end of the file")
    })?;
    if notes.is_empty() {
        return Ok((output, r.addr));
    }
    // The notes and a new section header table, after everything.
    let (shdrs, shstrndx) = input_sections(path, data)?;
    let mut out = Tail {
        start: output.base_len(),
        out: &mut output,
        piece: Vec::new(),
    };
    out.resize(align_up(out.len() as u64, 4) as usize);
    let notes_off = out.len() as u64;
    out.extend_from_slice(&notes);
    let added = notes_sections(base_addr, r.offset + size as u64, notes_off, notes.len());
    let (shoff, shnum) = append_section_table(path, data, shdrs, shstrndx, &mut out, &added)?;
    out.finish();
    let e = LE;
    let (fh, _) = from_bytes::<FileHeader64<LE>>(data)
        .map_err(|()| anyhow::anyhow!("{path}: truncated ELF header"))?;
    let mut nfh = *fh;
    nfh.e_shoff = U64::new(e, shoff);
    nfh.e_shnum = U16::new(e, shnum);
    output
        .patch(0, bytes_of(&nfh))
        .with_context(|| format!("{path}: truncated ELF header"))?;
    Ok((output, r.addr))
}

/// Embeds into a linked image `img` (parsed from `data`, with no table yet): into
/// `reserved` when the linker script reserved a slot, else into a new segment.
pub(super) fn embed_exec<'a>(
    path: &str,
    data: &'a [u8],
    img: &Image<'_>,
    reserved: Option<Reserved>,
) -> Result<Embedded<'a>> {
    let ifuncs = read_ifuncs(img)?;
    let probes = find_probes(img)?;
    let keys = find_keys(img)?;
    if ifuncs.is_empty() && probes.probes.is_empty() && keys.is_empty() {
        // Nothing to describe: the output is the input, unchanged.
        return Ok(Embedded {
            out: Output::new(data),
            report: EmbedReport::default(),
            check: None,
        });
    }
    // Ifunc and probe sites are found through relocations; static key sites only
    // through their records.
    ensure!(
        img.has_text_relocations() || (ifuncs.is_empty() && probes.probes.is_empty()),
        "{path}: executable sections carry no relocations; link with --emit-relocs \
         (e.g. `-C link-arg=--emit-relocs`) so call sites can be found"
    );
    let scan = find_ifunc_sites(img, &ifuncs)?;

    let cell = img.symbol(CELL_SYMBOL).with_context(|| {
        format!(
            "{path}: the image has ifuncs, probes or static keys but no `{CELL_SYMBOL}` symbol; \
             link kernel-loader and call `kernel_loader::cell::image_table` so the kernel can find its table"
        )
    })?;
    let cell_addr = cell.addr;
    let cell_bytes = img
        .read_va(cell_addr, CELL_SIZE as u64)
        .with_context(|| format!("{path}: {CELL_SYMBOL} at {cell_addr:#x} has no file contents"))?;
    let magic = u64::from_le_bytes(cell_bytes[..8].try_into()?);
    ensure!(
        magic == CELL_MAGIC,
        "{path}: {CELL_SYMBOL} has magic {magic:#x}, expected {CELL_MAGIC:#x}"
    );
    if cell_bytes[8..].iter().any(|&b| b != 0) {
        return Err(AlreadyEmbedded(path.to_string()).into());
    }

    let entries: Vec<IfuncEntry> = ifuncs
        .iter()
        .map(|f| IfuncEntry {
            name: f.name.clone(),
            trampoline: f.trampoline,
            slot: f.slot,
            resolver: f.resolver,
            default: f.default,
        })
        .collect();
    // The sites are read from the scan where they are, not copied into the input.
    let site = |i: usize| {
        let s = &scan.sites[i];
        SiteEntry {
            addr: s.addr,
            kind: s.kind,
            prefixes: s.prefixes,
            ifunc: s.target,
        }
    };
    let input = TableInput {
        ifuncs: entries,
        sites: Vec::new(),
        probes: probes.probes.clone(),
        probe_sites: probes.sites.clone(),
        keys: keys.keys.clone(),
        key_sites: keys.sites.clone(),
    };
    let size = table_size_with(&input, scan.sites.len());
    let build = |addr: u64| {
        crate::table::check_reach(img, addr, size)?;
        build_sites_for(img.target, addr, &input, scan.sites.len(), &site)
            .with_context(|| format!("{path}: cannot build the table"))
    };
    let notes = |base| stapsdt_notes(img.target, &probes, base);
    let (mut out, table_addr) = match &reserved {
        Some(r) => fill_reserved(path, data, r, size, build, notes)?,
        None => append_segment_to(path, data, size, build, notes)?,
    };

    // Rewrite C probe calls into their disabled form, and give every `probe!` record its
    // probe id. Original bytes keep their file offsets in `out`.
    let patch = |out: &mut Output<'_>, addr: u64, bytes: &[u8], what: &str| -> Result<()> {
        let at = img
            .va_to_file_offset(addr, bytes.len() as u64)
            .with_context(|| format!("{path}: {what} at {addr:#x} is not file-backed"))?
            as usize;
        out.patch(at, bytes)
            .with_context(|| format!("{path}: {what} at {addr:#x} lies past the end of the file"))
    };
    for (addr, bytes) in &probes.rewrites {
        patch(&mut out, *addr, bytes, "probe site")?;
    }
    // Static key sites whose key's default differs from their likeliness start out
    // branching, so the image boots in every key's default state.
    for (addr, bytes) in &keys.initial {
        patch(&mut out, *addr, bytes, "key site")?;
    }
    // Their relocations now describe bytes that are gone: make them "none" (as
    // `dtrace -G` does), keeping the symbol, so no tool re-applies them over the new
    // instruction.
    let rewritten: std::collections::HashSet<u64> = probes
        .rewrites
        .iter()
        .map(|(a, _)| img.target.plain_branch_field(*a))
        .collect();
    for at in rela_entries_at(img, &rewritten) {
        out.patch(at + 8, &img.target.none_reloc().to_le_bytes())
            .with_context(|| format!("{path}: relocation entry at {at:#x} is outside the file"))?;
    }
    // A GNU ifunc's slot starts out pointing at its trampoline (the linkers leave 0 or
    // a lazy-binding stub there): it has no default, and the loader checks the slot
    // holds the recorded default before resolving.
    for f in ifuncs.iter().filter(|f| f.gnu_symbol.is_some()) {
        patch(
            &mut out,
            f.slot,
            &f.trampoline.to_le_bytes(),
            "GNU ifunc slot",
        )?;
    }
    for (rec, id) in &probes.record_ids {
        patch(
            &mut out,
            rec + probe_record::ID as u64,
            &id.to_le_bytes(),
            "probe record",
        )?;
    }

    // Fill the cell: table address relative to the cell, and the size. Original bytes
    // keep their file offsets, so the input's mapping still applies.
    let offset = i64::try_from(i128::from(table_addr) - i128::from(cell_addr))?;
    let at =
        img.va_to_file_offset(cell_addr, CELL_SIZE as u64)
            .with_context(|| format!("{path}: {CELL_SYMBOL} is not file-backed"))? as usize;
    let mut fill = [0u8; 16];
    fill[..8].copy_from_slice(&offset.to_le_bytes());
    fill[8..].copy_from_slice(&(size as u64).to_le_bytes());
    out.patch(at + 8, &fill)
        .with_context(|| format!("{path}: {CELL_SYMBOL} lies past the end of the file"))?;

    Ok(Embedded {
        out,
        report: EmbedReport {
            ifuncs,
            scan,
            probes,
            keys,
            table: Some((table_addr, size)),
            relocatable: false,
        },
        check: Some(OutputCheck {
            table: table_addr,
            size,
            cell: cell_addr,
        }),
    })
}

/// Re-reads what was produced: the table must validate with the loader's own reader at
/// its address, and the cell must point at it.
pub(super) fn verify_output(path: &str, out: &[u8], check: &OutputCheck) -> Result<()> {
    let OutputCheck {
        table: addr,
        size,
        cell: cell_addr,
    } = *check;
    let img = Image::parse(path, out).context("re-reading the output")?;
    let bytes = img
        .read_va(addr, size as u64)
        .with_context(|| format!("{path}: output lost the table at {addr:#x}"))?;
    let exec = img.exec_ranges();
    Table::parse(bytes, addr, &exec)
        .map_err(|e| anyhow::anyhow!("{path}: written table does not validate: {e}"))?;
    let cell = img
        .read_va(cell_addr, CELL_SIZE as u64)
        .context("output lost the cell")?;
    let off = i64::from_le_bytes(cell[8..16].try_into()?);
    ensure!(
        cell_addr.wrapping_add_signed(off) == addr,
        "{path}: cell does not point at the table"
    );
    Ok(())
}

const PAGE: u64 = 0x1000;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// How far [`place_segment`] may pad the file, or leave addresses unused before the
/// new segment, to keep `AT_PHDR` right for Linux before 5.18.
const LEGACY_GAP_LIMIT: u64 = 1 << 20;

/// The smallest `y >= x` with `y % PAGE == residue`.
fn up_to_residue(x: u64, residue: u64) -> Option<u64> {
    let y = (x - x % PAGE).checked_add(residue)?;
    if y >= x { Some(y) } else { y.checked_add(PAGE) }
}

/// Where the new segments go, as (file offset, address), for an input of `file_len`
/// bytes whose PT_LOAD segments end at address `end` and file offset `file_end`, and
/// whose first PT_LOAD (in table order) has `p_vaddr - p_offset == first_delta`.
///
/// The program headers come first, in a PT_LOAD of their own, so `e_phoff` is the
/// returned offset; the table's PT_LOAD follows directly. Three rules:
///
/// * They start where binutils' `objcopy`/`strip` would put them when they
///   rewrite the image (packed behind the loaded contents, at `file_end`): at the same
///   offset within a page. They then keep every section's address (load address
///   included) for a GNU ld image, so the copy still verifies.
/// * Their address is past every segment, `.bss` included, on pages of their own, and
///   congruent to their offset modulo the page size.
/// * Linux since 5.18 sets `AT_PHDR` from the PT_LOAD holding `e_phoff`, right for
///   any placement; earlier kernels used `first_delta + e_phoff`, right only if the
///   headers' segment has the first one's `p_vaddr - p_offset`. That placement is chosen
///   when it costs at most [`LEGACY_GAP_LIMIT`] of file padding (a large `.bss`) or of
///   unused addresses (large sections that are not loaded, such as symbols and
///   relocations: a kernel is loaded by physical address, so the gap would be
///   physical memory). Otherwise only Linux 5.18 and later pass the right `AT_PHDR`
///   (`PT_PHDR` does not change what the kernel passes).
fn place_segment(file_len: u64, file_end: u64, end: u64, first_delta: u64) -> Option<(u64, u64)> {
    let residue = file_end % PAGE;
    let off = up_to_residue(file_len, residue)?;
    let addr = up_to_residue(end.checked_next_multiple_of(PAGE)?, residue)?;
    if first_delta.is_multiple_of(PAGE) {
        // The smallest (offset, address) pair with address - offset == first_delta.
        let legacy_off = addr.wrapping_sub(first_delta);
        if legacy_off >= off && legacy_off - off <= LEGACY_GAP_LIMIT {
            return Some((legacy_off, addr));
        }
        if let Some(legacy_addr) = off.checked_add(first_delta)
            && legacy_addr >= addr
            && legacy_addr - addr <= LEGACY_GAP_LIMIT
        {
            return Some((off, legacy_addr));
        }
    }
    Some((off, addr))
}

/// Appends an allocated, read-only section `.ksites` of `size` bytes after every
/// existing segment, and returns the new file and the section's address.
/// `contents` receives the address and returns exactly `size` bytes.
///
/// Every original byte keeps its file offset. The program header table has to grow by
/// two entries, and linkers such as GNU ld put the first section right behind it, so
/// it cannot grow in place: it is rewritten at the end of the file, in a read-only
/// PT_LOAD of its own (a `PT_PHDR` entry is moved with it), directly followed by the
/// table's PT_LOAD; [`place_segment`] says where. The headers must be loaded: Linux
/// passes their address as `AT_PHDR`, computed from the PT_LOAD holding `e_phoff`,
/// and static glibc finds its TLS segment through it, the dynamic loader everything.
/// The section header table and a copy of `.shstrtab` with the new names are appended
/// too. The `object` crate's `build::elf::Builder` was the first choice, but it requires
/// the program headers to stay directly after the file header, which fails on exactly
/// those GNU ld images.
pub fn append_segment(
    path: &str,
    data: &[u8],
    size: usize,
    contents: impl FnOnce(u64) -> Result<Vec<u8>>,
    notes: impl FnOnce(u64) -> Vec<u8>,
) -> Result<(Vec<u8>, u64)> {
    let (out, addr) = append_segment_to(path, data, size, contents, notes)?;
    Ok((out.to_vec(), addr))
}

/// The bytes appended after an input, built up in pieces (a large piece, the table, is
/// added as it is, without a copy).
struct Tail<'o, 'a> {
    out: &'o mut Output<'a>,
    /// The piece being built, and the output offset of its first byte.
    piece: Vec<u8>,
    start: usize,
}

impl Tail<'_, '_> {
    /// The output's length so far.
    fn len(&self) -> usize {
        self.start + self.piece.len()
    }

    /// Pads with zeros up to `len` (never shrinks: every caller pads forward).
    fn resize(&mut self, len: usize) {
        if len > self.len() {
            self.piece.resize(len - self.start, 0);
        }
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.piece.extend_from_slice(bytes);
    }

    fn push(&mut self, b: u8) {
        self.piece.push(b);
    }

    /// Appends `bytes` as a piece of its own.
    fn append(&mut self, bytes: Vec<u8>) {
        self.out.append(std::mem::take(&mut self.piece));
        self.out.append(bytes);
        self.start = self.out.len();
    }

    fn finish(self) {
        self.out.append(self.piece);
    }
}

/// [`append_segment`], as an [`Output`] that refers to `data`.
fn append_segment_to<'a>(
    path: &str,
    data: &'a [u8],
    size: usize,
    contents: impl FnOnce(u64) -> Result<Vec<u8>>,
    notes: impl FnOnce(u64) -> Vec<u8>,
) -> Result<(Output<'a>, u64)> {
    let e = LE;
    let (fh, _) = from_bytes::<FileHeader64<LE>>(data)
        .map_err(|()| anyhow::anyhow!("{path}: truncated ELF header"))?;
    let phoff = fh.e_phoff.get(e) as usize;
    let phnum = fh.e_phnum.get(e) as usize;
    let shoff = fh.e_shoff.get(e) as usize;
    let shnum = fh.e_shnum.get(e) as usize;
    let shstrndx = fh.e_shstrndx.get(e).0 as usize;
    ensure!(
        fh.e_phentsize.get(e) as usize == size_of::<ProgramHeader64<LE>>()
            && fh.e_shentsize.get(e) as usize == size_of::<SectionHeader64<LE>>(),
        "{path}: unexpected program/section header entry size"
    );
    ensure!(
        shnum > 0 && shnum < elf::SHN_LORESERVE as usize && shstrndx < shnum && phnum + 2 < 0xffff,
        "{path}: extended section numbering is not supported"
    );
    let phdrs = data
        .get(phoff..)
        .and_then(|d| slice_from_bytes::<ProgramHeader64<LE>>(d, phnum).ok())
        .map(|(p, _)| p)
        .with_context(|| format!("{path}: program headers out of bounds"))?;
    let shdrs = data
        .get(shoff..)
        .and_then(|d| slice_from_bytes::<SectionHeader64<LE>>(d, shnum).ok())
        .map(|(s, _)| s)
        .with_context(|| format!("{path}: section headers out of bounds"))?;
    let last_load = phdrs
        .iter()
        .filter(|p| p.p_type.get(e) == elf::PT_LOAD)
        .max_by_key(|p| p.p_vaddr.get(e).saturating_add(p.p_memsz.get(e)))
        .with_context(|| format!("{path}: no PT_LOAD segment"))?;
    let end = last_load
        .p_vaddr
        .get(e)
        .checked_add(last_load.p_memsz.get(e))
        .filter(|end| end.checked_add(2 * PAGE).is_some())
        .with_context(|| format!("{path}: a PT_LOAD segment ends past the address space"))?;
    let loads = || phdrs.iter().filter(|p| p.p_type.get(e) == elf::PT_LOAD);
    let first_load = loads()
        .next()
        .with_context(|| format!("{path}: no PT_LOAD segment"))?;
    let file_end = loads()
        .map(|p| p.p_offset.get(e).saturating_add(p.p_filesz.get(e)))
        .max()
        .unwrap_or(0);
    let (seg_off, vaddr) = place_segment(
        data.len() as u64,
        file_end,
        end,
        first_load
            .p_vaddr
            .get(e)
            .wrapping_sub(first_load.p_offset.get(e)),
    )
    .with_context(|| format!("{path}: no room for a new segment after {end:#x}"))?;
    let paddr = vaddr.wrapping_sub(
        last_load
            .p_vaddr
            .get(e)
            .wrapping_sub(last_load.p_paddr.get(e)),
    );

    let mut output = Output::new(data);
    let mut out = Tail {
        start: output.base_len(),
        out: &mut output,
        piece: Vec::new(),
    };
    // The new segment, placed by [`place_segment`]: first the program headers, so that
    // they are loaded (Linux derives `AT_PHDR` from the PT_LOAD holding `e_phoff`, and
    // static glibc finds its TLS segment through it; the dynamic loader reads them
    // there and computes the load bias from `PT_PHDR`, moved with them), then the
    // table, then the `.stapsdt.base` byte.
    out.resize(seg_off as usize);
    let ph_size = ((phnum + 2) * size_of::<ProgramHeader64<LE>>()) as u64;
    let table_off = align_up(seg_off + ph_size, 8);
    let table_addr = vaddr
        .checked_add(table_off - seg_off)
        .filter(|a| a.checked_add(size as u64 + 1).is_some())
        .with_context(|| format!("{path}: no room for a {size}-byte table after {end:#x}"))?;
    let table = contents(table_addr)?;
    ensure!(
        table.len() == size,
        "internal: table has {} bytes, expected {size}",
        table.len()
    );
    let base_addr = table_addr + size as u64;
    let notes = notes(base_addr);
    let table_seg_size = size as u64 + u64::from(!notes.is_empty());
    let new_phoff = seg_off;

    let mut headers = Vec::with_capacity(ph_size as usize);
    // Program headers: the old ones (PT_PHDR moved with them), then the two new
    // PT_LOADs: one for the headers, one for the table. Each starts where its contents
    // start, which is what binutils expects when it rewrites the image.
    for p in phdrs {
        let mut p = *p;
        if p.p_type.get(e) == elf::PT_PHDR {
            p.p_offset = U64::new(e, new_phoff);
            p.p_vaddr = U64::new(e, vaddr);
            p.p_paddr = U64::new(e, paddr);
            p.p_filesz = U64::new(e, ph_size);
            p.p_memsz = U64::new(e, ph_size);
        }
        headers.extend_from_slice(bytes_of(&p));
    }
    let load = |off: u64, size: u64| ProgramHeader64::<LE> {
        p_type: U32::new(e, elf::PT_LOAD),
        p_flags: U32::new(e, elf::PF_R),
        p_offset: U64::new(e, off),
        p_vaddr: U64::new(e, vaddr + (off - seg_off)),
        p_paddr: U64::new(e, paddr.wrapping_add(off - seg_off)),
        p_filesz: U64::new(e, size),
        p_memsz: U64::new(e, size),
        p_align: U64::new(e, PAGE),
    };
    headers.extend_from_slice(bytes_of(&load(seg_off, ph_size)));
    headers.extend_from_slice(bytes_of(&load(table_off, table_seg_size)));
    out.extend_from_slice(&headers);
    out.resize(table_off as usize);
    out.append(table);
    if !notes.is_empty() {
        out.push(0);
    }

    // The notes themselves: a non-allocated SHT_NOTE section.
    out.resize(align_up(out.len() as u64, 4) as usize);
    let notes_off = out.len() as u64;
    out.extend_from_slice(&notes);

    let mut added = vec![(
        SECTION_NAME,
        section(
            elf::SHT_PROGBITS.0,
            elf::SHF_ALLOC.0,
            table_addr,
            table_off,
            size as u64,
            8,
        ),
    )];
    if !notes.is_empty() {
        added.extend(notes_sections(
            base_addr,
            table_off + size as u64,
            notes_off,
            notes.len(),
        ));
    }
    let (new_shoff, new_shnum) =
        append_section_table(path, data, shdrs, shstrndx, &mut out, &added)?;

    // File header.
    let mut nfh = *fh;
    nfh.e_phoff = U64::new(e, new_phoff);
    nfh.e_phnum = U16::new(e, (phnum + 2) as u16);
    nfh.e_shoff = U64::new(e, new_shoff);
    nfh.e_shnum = U16::new(e, new_shnum);
    out.finish();
    output
        .patch(0, bytes_of(&nfh))
        .with_context(|| format!("{path}: truncated ELF header"))?;
    Ok((output, table_addr))
}

/// A section header with no name yet ([`append_section_table`] names it).
fn section(ty: u32, flags: u64, addr: u64, off: u64, size: u64, align: u64) -> SectionHeader64<LE> {
    let e = LE;
    SectionHeader64::<LE> {
        sh_name: U32::new(e, 0),
        sh_type: U32::new(e, elf::SectionType(ty)),
        sh_flags: U64::new(e, elf::SectionFlags(flags)),
        sh_addr: U64::new(e, addr),
        sh_offset: U64::new(e, off),
        sh_size: U64::new(e, size),
        sh_link: U32::new(e, 0),
        sh_info: U32::new(e, 0),
        sh_addralign: U64::new(e, align),
        sh_entsize: U64::new(e, 0),
    }
}

/// The SystemTap sections: the allocated `.stapsdt.base` byte at `base_addr` (file
/// offset `base_off`) and the `.note.stapsdt` notes (`len` bytes at `notes_off`).
fn notes_sections(
    base_addr: u64,
    base_off: u64,
    notes_off: u64,
    len: usize,
) -> [(&'static str, SectionHeader64<LE>); 2] {
    [
        (
            ".stapsdt.base",
            section(
                elf::SHT_PROGBITS.0,
                elf::SHF_ALLOC.0,
                base_addr,
                base_off,
                1,
                1,
            ),
        ),
        (
            ".note.stapsdt",
            section(elf::SHT_NOTE.0, 0, 0, notes_off, len as u64, 4),
        ),
    ]
}

/// The input's section headers (`e_shnum` of them at `e_shoff`), and `e_shstrndx`.
fn input_sections<'d>(path: &str, data: &'d [u8]) -> Result<(&'d [SectionHeader64<LE>], usize)> {
    let e = LE;
    let (fh, _) = from_bytes::<FileHeader64<LE>>(data)
        .map_err(|()| anyhow::anyhow!("{path}: truncated ELF header"))?;
    let shnum = fh.e_shnum.get(e) as usize;
    let shstrndx = fh.e_shstrndx.get(e).0 as usize;
    ensure!(
        fh.e_shentsize.get(e) as usize == size_of::<SectionHeader64<LE>>(),
        "{path}: unexpected section header entry size"
    );
    ensure!(
        shnum > 0 && shnum < elf::SHN_LORESERVE as usize && shstrndx < shnum,
        "{path}: extended section numbering is not supported"
    );
    let shdrs = data
        .get(fh.e_shoff.get(e) as usize..)
        .and_then(|d| slice_from_bytes::<SectionHeader64<LE>>(d, shnum).ok())
        .map(|(s, _)| s)
        .with_context(|| format!("{path}: section headers out of bounds"))?;
    Ok((shdrs, shstrndx))
}

/// Appends to `out` a copy of the input's `.shstrtab` with the names of `added`, then
/// the section header table: the input's (its `.shstrtab` moved to the copy) followed by
/// `added`, named. Returns the new `e_shoff` and `e_shnum`.
fn append_section_table(
    path: &str,
    data: &[u8],
    shdrs: &[SectionHeader64<LE>],
    shstrndx: usize,
    out: &mut Tail<'_, '_>,
    added: &[(&str, SectionHeader64<LE>)],
) -> Result<(u64, u16)> {
    let e = LE;
    let strtab = &shdrs[shstrndx];
    let (so, ss) = (
        strtab.sh_offset.get(e) as usize,
        strtab.sh_size.get(e) as usize,
    );
    let old_names = data
        .get(so..so.saturating_add(ss))
        .with_context(|| format!("{path}: .shstrtab out of bounds"))?;
    let strtab_off = out.len() as u64;
    out.extend_from_slice(old_names);
    let mut name_offs = Vec::with_capacity(added.len());
    for (name, _) in added {
        name_offs.push((out.len() as u64 - strtab_off) as u32);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    let strtab_size = out.len() as u64 - strtab_off;

    out.resize(align_up(out.len() as u64, 8) as usize);
    let shoff = out.len() as u64;
    for (i, s) in shdrs.iter().enumerate() {
        let mut s = *s;
        if i == shstrndx {
            s.sh_offset = U64::new(e, strtab_off);
            s.sh_size = U64::new(e, strtab_size);
        }
        out.extend_from_slice(bytes_of(&s));
    }
    for ((_, s), name) in added.iter().zip(name_offs) {
        let mut s = *s;
        s.sh_name = U32::new(e, name);
        out.extend_from_slice(bytes_of(&s));
    }
    let shnum = u16::try_from(shdrs.len() + added.len())
        .ok()
        .filter(|&n| n < elf::SHN_LORESERVE)
        .with_context(|| format!("{path}: too many sections"))?;
    Ok((shoff, shnum))
}

/// One SystemTap `NT_STAPSDT` note per firing probe site (is-enabled sites have none):
/// name `stapsdt`, type 3, desc = pc, base (the address of `.stapsdt.base`), semaphore
/// (0), then `provider\0name\0args\0`. Arguments are described for C sites, where they
/// are in the six argument registers at the call (`8@<reg>` each, from the x86-64
/// argument registers); a Rust site's
/// arguments are evaluated out of line, so its argument string is empty.
pub fn stapsdt_notes(target: Target, probes: &ProbeScan, base: u64) -> Vec<u8> {
    use kernel_loader::format::{NARGS_UNKNOWN, ProbeKind};
    let mut out = Vec::new();
    for s in &probes.sites {
        if s.kind.is_enabled_check() {
            continue;
        }
        let p = &probes.probes[s.probe as usize];
        let args = if s.kind == ProbeKind::RustJmp || p.nargs == NARGS_UNKNOWN {
            String::new()
        } else {
            let regs = target.stapsdt_arg_registers();
            regs[..usize::from(p.nargs).min(regs.len())]
                .iter()
                .map(|r| format!("8@{r}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut desc = Vec::new();
        desc.extend_from_slice(&s.addr.to_le_bytes());
        desc.extend_from_slice(&base.to_le_bytes());
        desc.extend_from_slice(&0u64.to_le_bytes());
        for part in [p.provider.as_bytes(), p.name.as_bytes(), args.as_bytes()] {
            desc.extend_from_slice(part);
            desc.push(0);
        }
        out.extend_from_slice(&8u32.to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(b"stapsdt\0");
        out.extend_from_slice(&desc);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// File offsets of the `Elf64_Rela` entries (in any SHT_RELA section) whose `r_offset` is
/// in `offsets` and whose type is a branch relocation, or one dropped with it
/// (riscv64's R_RISCV_RELAX, [`Target::dropped_with_call`]).
fn rela_entries_at(img: &Image<'_>, offsets: &std::collections::HashSet<u64>) -> Vec<usize> {
    if offsets.is_empty() {
        return Vec::new();
    }
    img.raw_relas()
        .filter(|r| {
            offsets.contains(&r.offset)
                && (img.target.reloc_class(r.r_type) == RelocClass::Branch
                    || img.target.dropped_with_call(r.r_type))
        })
        .map(|r| r.file_offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{LEGACY_GAP_LIMIT, PAGE, place_segment};

    #[test]
    fn segment_keeps_the_first_loads_delta_when_that_is_cheap() {
        // gcc -static -no-pie: loaded contents end at file 0xa62b0, memory (.bss) at
        // 0x4abae0; symbols and relocations make the file 0x106960 bytes long.
        let (off, addr) = place_segment(0x10_6960, 0xa_62b0, 0x4a_bae0, 0x40_0000).unwrap();
        assert_eq!((off, addr), (0x10_72b0, 0x50_72b0));
        // A large .bss: the file is padded instead.
        let (off, addr) = place_segment(0x8000, 0x72b0, 0x48_0000, 0x40_0000).unwrap();
        assert_eq!((off, addr), (0x8_02b0, 0x48_02b0));
    }

    #[test]
    fn segment_never_shares_a_page_with_bss_and_stays_congruent() {
        for (len, fend, end, delta) in [
            (0x5000, 0xf00, 0x40_1001, 0x40_0000),
            (0x5000, 0x10, 0x40_0fff, 0x40_0000),
            // Too far for the old rule either way: only the modern one holds.
            (0x1000, 0x0, 0x40_0000 + 4 * LEGACY_GAP_LIMIT, 0x40_0000),
            (0x40_0000 + 4 * LEGACY_GAP_LIMIT, 0x0, 0x40_1000, 0x40_0000),
            // A first PT_LOAD that is not page-congruent.
            (0x5000, 0x123, 0x40_1000, 0x40_0010),
        ] {
            let (off, addr) = place_segment(len, fend, end, delta).unwrap();
            assert!(
                off >= len && addr >= end.div_ceil(PAGE) * PAGE,
                "{len:#x} {end:#x}"
            );
            assert_eq!(off % PAGE, fend % PAGE);
            assert_eq!(addr % PAGE, off % PAGE);
            assert!(off - len < PAGE + LEGACY_GAP_LIMIT);
        }
        assert_eq!(place_segment(0x1000, 0x10, u64::MAX - 0x10, 0), None);
    }
}
