//! Writing the embedded object: the input rebuilt with `object`'s ELF builder, plus
//! `.ksites` and `.rela.ksites`, probe sites disabled, probe ids in records, and the
//! symbol indices of group signatures and `.llvm_addrsig` kept right.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::format::{ProbeKind, SECTION_NAME};
use kernel_loader::probe::{STUB_SYMBOLS, record as probe_record};
use object::LittleEndian as LE;
use object::build::Id as _;
use object::build::elf::{Builder, Relocation as BRel, SectionData, SectionId, SymbolId};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _};

use super::layout::Target;
use crate::target::{self, RelocClass};

/// `.rela.ksites`.
pub const RELA_SECTION_NAME: &str = ".rela.ksites";
/// `sh_type` of `.llvm_addrsig`.
const SHT_LLVM_ADDRSIG: u32 = 0x6fff_4c03;

/// A C probe site to rewrite: the site, its kind, and (riscv64) the call it is in
/// (section offset, length) when the rewrite spans the whole call.
pub(super) type Rewrite = (Target, ProbeKind, Option<(u64, u8)>);

/// What changes in the input's sections besides the new ones.
pub(super) struct Edits<'a> {
    /// `probe!` records and the ids they get.
    pub(super) record_ids: &'a BTreeSet<(Target, u32)>,
    /// C probe sites to disable.
    pub(super) rewrites: &'a [Rewrite],
    /// Static key sites that start out branching: (site, label).
    pub(super) key_forms: &'a [(Target, Target)],
}

/// Applies every change to a [`Builder`] of the input and writes it.
pub(super) fn write_object(
    arch: target::Target,
    path: &str,
    data: &[u8],
    table: &[u8],
    table_relocs: &[(u64, Target)],
    edits: &Edits<'_>,
) -> Result<Vec<u8>> {
    let Edits {
        record_ids,
        rewrites,
        key_forms,
    } = *edits;
    // The builder rejects section types it does not model (SHT_GROUP, .llvm_addrsig,
    // ...): they are read and written as opaque PROGBITS and get their type back in
    // the output. Sections keep their indices (none is removed, new ones go last), so
    // group member lists stay valid.
    let (input, disguised) = disguise_section_types(path, data)?;
    let mut b = Builder::read(&input[..])
        .map_err(|e| anyhow::anyhow!("{path}: cannot read the object for rewriting: {e}"))?;
    let orig_type = |id: SectionId| -> u32 {
        disguised
            .iter()
            .find(|&&(i, _)| i == id.index() + 1)
            .map_or(b.sections.get(id).sh_type.0, |&(_, t)| t)
    };
    let section_ids: Vec<SectionId> = b.sections.iter().map(|s| s.id()).collect();
    let symbol_ids: Vec<SymbolId> = b.symbols.iter().map(|s| s.id()).collect();
    // ELF index -> builder id (the null entries are not in the builder).
    let sec_id = |i: usize| -> Result<SectionId> {
        i.checked_sub(1)
            .and_then(|i| section_ids.get(i).copied())
            .with_context(|| format!("{path}: bad section index {i}"))
    };
    let sym_id = |i: usize| -> Result<SymbolId> {
        i.checked_sub(1)
            .and_then(|i| symbol_ids.get(i).copied())
            .with_context(|| format!("{path}: bad symbol index {i}"))
    };
    // Group signatures are symbol indices in sh_info: remember them as ids.
    let groups: Vec<(SectionId, SymbolId)> = b
        .sections
        .iter()
        .filter(|s| orig_type(s.id()) == elf::SHT_GROUP.0)
        .map(|s| Ok((s.id(), sym_id(s.sh_info as usize)?)))
        .collect::<Result<_>>()?;
    let addrsig: Vec<SectionId> = b
        .sections
        .iter()
        .filter(|s| orig_type(s.id()) == SHT_LLVM_ADDRSIG)
        .map(|s| s.id())
        .collect();
    let old_order = symbol_order(&b);

    // Byte patches, by section: probe ids into `probe!` records, disabled forms into C
    // probe sites.
    let mut patches: BTreeMap<usize, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
    for &(rec, id) in record_ids {
        let Target::Sec { sec, off } = rec else {
            bail!("{path}: probe record is not in a section")
        };
        patches.entry(sec).or_default().push((
            (off as usize).saturating_add(probe_record::ID),
            id.to_le_bytes().to_vec(),
        ));
    }
    // C probe sites by section: offset of the call's relocation -> (kind, the site's
    // offset). Sections holding calls rewritten whole (riscv64) keep offsets' alignment
    // in the image: the site is 4-aligned in the section.
    let mut c_sites: BTreeMap<usize, HashMap<u64, (ProbeKind, u64)>> = BTreeMap::new();
    let mut align4: BTreeSet<usize> = BTreeSet::new();
    for &(site, kind, call) in rewrites {
        let Target::Sec { sec, off } = site else {
            bail!("{path}: probe site is not in a section")
        };
        if let Some((call, len)) = call {
            let r = match arch.c_probe_rewrite(kind, call, len, None) {
                Some(Ok(r)) if r.site == off => r,
                _ => bail!("{path}: C probe call at section {sec}+{call:#x} cannot be rewritten"),
            };
            patches
                .entry(sec)
                .or_default()
                .push((call as usize, r.bytes.to_vec()));
            c_sites
                .entry(sec)
                .or_default()
                .insert(arch.plain_branch_field(call), (kind, off));
            align4.insert(sec);
            continue;
        }
        // A form that branches to `ksites_probe_ret0` (on x86-64 the is-enabled tail
        // call's `jmp`) gets its offset from the retargeted relocation.
        let Some(bytes) = arch.disabled_probe_unlinked(kind) else {
            continue;
        };
        patches
            .entry(sec)
            .or_default()
            .push((off as usize, bytes.to_vec()));
        c_sites
            .entry(sec)
            .or_default()
            .insert(arch.plain_branch_field(off), (kind, off));
    }
    // Static key sites' branch forms: computed when the label is in the site's section
    // (the distance is fixed), else a zeroed branch plus a branch relocation to the
    // label, added below: (site section, site offset, label section, label offset).
    let mut key_relocs: Vec<(usize, u64, usize, u64)> = Vec::new();
    for &(site, label) in key_forms {
        let (
            Target::Sec { sec, off },
            Target::Sec {
                sec: tsec,
                off: toff,
            },
        ) = (site, label)
        else {
            bail!("{path}: key site or label is not in a section")
        };
        let form = if sec == tsec {
            arch.key_branch(off, toff)
        } else {
            key_relocs.push((sec, off, tsec, toff));
            // The branch whose field is 0 (what the relocation fills).
            arch.key_branch(
                0,
                arch.plain_branch_field(0)
                    .wrapping_add_signed(arch.branch_bias()),
            )
        }
        .map_err(|reach| {
            anyhow::anyhow!(
                "{path}: key site at section {sec}+{off:#x}: its label is beyond {reach}"
            )
        })?;
        patches
            .entry(sec)
            .or_default()
            .push((off as usize, form.to_vec()));
    }
    for &sec in &align4 {
        let s = b.sections.get_mut(sec_id(sec)?);
        s.sh_addralign = s.sh_addralign.max(arch.probe_site_len() as u64);
    }
    for (sec, list) in patches {
        let s = b.sections.get_mut(sec_id(sec)?);
        let SectionData::Data(d) = &mut s.data else {
            bail!("{path}: section {sec} (probe sites or records) has no file data");
        };
        let v = d.to_mut();
        for (at, bytes) in list {
            v.get_mut(at..at.saturating_add(bytes.len()))
                .with_context(|| {
                    format!("{path}: patch at section {sec}+{at:#x} is past the section end")
                })?
                .copy_from_slice(&bytes);
        }
    }

    // Their relocations: none, or for a C is-enabled tail call a branch relocation to
    // `ksites_probe_ret0` (an undefined symbol, added if the object lacks it).
    let needs_ret0 = rewrites
        .iter()
        .any(|&(_, k, _)| arch.probe_stub_reloc(k).is_some());
    let ret0: Option<SymbolId> = if needs_ret0 {
        let found = b
            .symbols
            .iter()
            .find(|s| s.name.as_slice() == STUB_SYMBOLS[1].as_bytes())
            .map(|s| s.id());
        Some(match found {
            Some(id) => id,
            None => {
                let s = b.symbols.add();
                s.name = STUB_SYMBOLS[1].as_bytes().to_vec().into();
                s.st_info = elf::SymbolInfo::new(elf::STB_GLOBAL, elf::STT_NOTYPE);
                s.st_shndx = elf::SHN_UNDEF;
                s.id()
            }
        })
    } else {
        None
    };
    for (sec, sites) in &c_sites {
        let target_sec = sec_id(*sec)?;
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for rs in b.sections.iter_mut() {
            if rs.sh_info_section != Some(target_sec) {
                continue;
            }
            let SectionData::Relocation(rels) = &mut rs.data else {
                continue;
            };
            for r in rels.iter_mut() {
                let Some(&(kind, site)) = sites.get(&r.r_offset) else {
                    continue;
                };
                if arch.dropped_with_call(r.r_type.0) {
                    r.r_type = elf::RelocationType(arch.none_reloc());
                    continue;
                }
                if arch.reloc_class(r.r_type.0) != RelocClass::Branch {
                    continue;
                }
                *seen.entry(r.r_offset).or_default() += 1;
                match (arch.probe_stub_reloc(kind), ret0) {
                    (Some((t, addend)), Some(id)) => {
                        r.symbol = Some(id);
                        (r.r_type, r.r_addend) = (elf::RelocationType(t), addend);
                        // On the site's instruction (riscv64: inside the call).
                        r.r_offset = arch.plain_branch_field(site);
                    }
                    _ => r.r_type = elf::RelocationType(arch.none_reloc()),
                }
            }
        }
        for off in sites.keys() {
            let n = seen.get(off).copied().unwrap_or(0);
            ensure!(
                n == 1,
                "{path}: probe site at section {sec}+{:#x}: expected one rel32 relocation, found {n}",
                arch.plain_branch_start(*off).unwrap_or(*off)
            );
        }
    }

    // Section symbols for every section the table points into.
    let mut sec_syms: HashMap<usize, SymbolId> = HashMap::new();
    for s in b.symbols.iter() {
        if s.st_type() == elf::STT_SECTION
            && let Some(id) = s.section
        {
            sec_syms.entry(id.index()).or_insert(s.id());
        }
    }
    let symtab = b
        .sections
        .iter()
        .find(|s| matches!(s.data, SectionData::Symbol))
        .map(|s| s.id())
        .with_context(|| format!("{path}: the object has no .symtab"))?;
    for &(sec, off, tsec, toff) in &key_relocs {
        let (sec, tsec) = (sec_id(sec)?, sec_id(tsec)?);
        let symbol = section_symbol(&mut b, &mut sec_syms, tsec);
        let (r_type, bias) = arch.branch_reloc();
        let r = BRel {
            r_offset: arch.plain_branch_field(off),
            symbol: Some(symbol),
            r_type: elf::RelocationType(r_type),
            r_addend: i64::try_from(toff)? + bias,
        };
        let existing = b.sections.iter_mut().find(|rs| {
            rs.sh_info_section == Some(sec) && matches!(rs.data, SectionData::Relocation(_))
        });
        match existing {
            Some(rs) => {
                if let SectionData::Relocation(v) = &mut rs.data {
                    v.push(r);
                }
            }
            None => {
                let mut name = b".rela".to_vec();
                name.extend_from_slice(&b.sections.get(sec).name);
                let rs = b.sections.add();
                rs.name = name.into();
                rs.sh_type = elf::SHT_RELA;
                rs.sh_flags = elf::SHF_INFO_LINK;
                rs.sh_addralign = 8;
                rs.sh_entsize = 24;
                rs.sh_link_section = Some(symtab);
                rs.sh_info_section = Some(sec);
                rs.data = SectionData::Relocation(vec![r]);
            }
        }
    }
    let mut rels: Vec<BRel> = Vec::new();
    for &(field, t) in table_relocs {
        let (symbol, addend) = match t {
            Target::Sec { sec, off } => (
                section_symbol(&mut b, &mut sec_syms, sec_id(sec)?),
                i64::try_from(off)?,
            ),
            Target::Undef { sym, addend } => (sym_id(sym)?, addend),
        };
        rels.push(BRel {
            r_offset: field,
            symbol: Some(symbol),
            r_type: elf::RelocationType(arch.table_reloc()),
            r_addend: addend,
        });
    }

    // Symbol indices after the write (locals first): fix group signatures and
    // `.llvm_addrsig`, which hold raw indices.
    let new_order = symbol_order(&b);
    let new_index: HashMap<usize, u32> = new_order
        .iter()
        .enumerate()
        .map(|(i, &id)| (id.index(), i as u32 + 1))
        .collect();
    for (g, sym) in groups {
        b.sections.get_mut(g).sh_info = new_index[&sym.index()];
    }
    if old_order != new_order {
        for &id in &addrsig {
            let s = b.sections.get_mut(id);
            let SectionData::Data(d) = &mut s.data else {
                continue;
            };
            let mut out = Vec::new();
            let mut rd = d.as_slice();
            while !rd.is_empty() {
                let (old, n) = uleb(rd).with_context(|| format!("{path}: bad .llvm_addrsig"))?;
                rd = &rd[n..];
                let id = old
                    .checked_sub(1)
                    .and_then(|i| old_order.get(i as usize))
                    .with_context(|| format!("{path}: .llvm_addrsig names symbol {old}"))?;
                write_uleb(&mut out, u64::from(new_index[&id.index()]));
            }
            s.data = SectionData::Data(out.into());
        }
    }

    // LLVM shares one `.strtab` between section and symbol names; the builder writes
    // them apart, so such an object gets its own `.shstrtab` (at the end, like the new
    // sections: every existing section keeps its index).
    if !b
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let s = b.sections.add();
        s.name = b".shstrtab".to_vec().into();
        s.sh_type = elf::SHT_STRTAB;
        s.sh_addralign = 1;
        s.data = SectionData::SectionString;
    }

    // The new sections, at the end (every existing section keeps its index).
    let ks = b.sections.add();
    ks.name = SECTION_NAME.as_bytes().to_vec().into();
    ks.sh_type = elf::SHT_PROGBITS;
    ks.sh_flags = elf::SHF_ALLOC;
    ks.sh_addralign = 8;
    ks.data = SectionData::Data(table.to_vec().into());
    let ks_id = ks.id();
    let rs = b.sections.add();
    rs.name = RELA_SECTION_NAME.as_bytes().to_vec().into();
    rs.sh_type = elf::SHT_RELA;
    rs.sh_flags = elf::SHF_INFO_LINK;
    rs.sh_addralign = 8;
    rs.sh_entsize = 24;
    rs.sh_link_section = Some(symtab);
    rs.sh_info_section = Some(ks_id);
    rs.data = SectionData::Relocation(rels);

    // ELF gives `sh_addralign` 0 the meaning of 1 (no constraint), but the builder
    // rounds each section's offset up as `offset + (align - 1)`: with 0 that wraps, and
    // a release build would place the section at offset 0, over the ELF header.
    for s in b.sections.iter_mut() {
        s.sh_addralign = s.sh_addralign.max(1);
    }
    let mut out = Vec::new();
    b.write(&mut out)
        .map_err(|e| anyhow::anyhow!("{path}: cannot write the object: {e}"))?;
    set_section_types(&mut out, &disguised)?;
    Ok(out)
}

/// The section symbol of section `id` (the first one, or one added, local).
fn section_symbol(
    b: &mut Builder<'_>,
    sec_syms: &mut HashMap<usize, SymbolId>,
    id: SectionId,
) -> SymbolId {
    *sec_syms.entry(id.index()).or_insert_with(|| {
        let s = b.symbols.add();
        s.section = Some(id);
        s.st_info = elf::SymbolInfo::new(elf::STB_LOCAL, elf::STT_SECTION);
        s.id()
    })
}

/// Section types `object::build::elf::Builder` reads as what they are.
fn builder_models(t: u32) -> bool {
    matches!(
        elf::SectionType(t),
        elf::SHT_NULL
            | elf::SHT_PROGBITS
            | elf::SHT_NOBITS
            | elf::SHT_INIT_ARRAY
            | elf::SHT_FINI_ARRAY
            | elf::SHT_PREINIT_ARRAY
            | elf::SHT_REL
            | elf::SHT_RELA
            | elf::SHT_SYMTAB
            | elf::SHT_SYMTAB_SHNDX
            | elf::SHT_STRTAB
            | elf::SHT_NOTE
            | elf::SHT_GNU_ATTRIBUTES
            | elf::SHT_X86_64_UNWIND
    )
}

/// (section index, original `sh_type`) of the sections given to the builder as PROGBITS.
type Disguised = Vec<(usize, u32)>;

/// A copy of `data` where every section type the builder does not model is
/// `SHT_PROGBITS`, and the (index, original type) pairs.
fn disguise_section_types(path: &str, data: &[u8]) -> Result<(Vec<u8>, Disguised)> {
    let file = ElfFile64::<LE>::parse(data).with_context(|| format!("{path}: not ELF64"))?;
    let shoff = file.elf_header().e_shoff.get(LE) as usize;
    let mut out = data.to_vec();
    let mut changed = Vec::new();
    for (i, s) in file.elf_section_table().iter().enumerate() {
        let t = s.sh_type(LE).0;
        if builder_models(t) || t == elf::SHT_NOBITS.0 {
            continue;
        }
        let at = shoff + i * size_of::<elf::SectionHeader64<LE>>() + 4;
        out.get_mut(at..at + 4)
            .with_context(|| format!("{path}: section header {i} out of bounds"))?
            .copy_from_slice(&elf::SHT_PROGBITS.0.to_le_bytes());
        changed.push((i, t));
    }
    Ok((out, changed))
}

/// Gives the sections [`disguise_section_types`] changed their types back.
fn set_section_types(out: &mut [u8], types: &[(usize, u32)]) -> Result<()> {
    let shoff = ElfFile64::<LE>::parse(&*out)?.elf_header().e_shoff.get(LE) as usize;
    for &(i, t) in types {
        let at = shoff + i * size_of::<elf::SectionHeader64<LE>>() + 4;
        out.get_mut(at..at + 4)
            .context("section header out of bounds")?
            .copy_from_slice(&t.to_le_bytes());
    }
    Ok(())
}

/// Symbol ids in the order the builder writes them: locals, then the rest.
fn symbol_order(b: &Builder<'_>) -> Vec<SymbolId> {
    let locals = b
        .symbols
        .iter()
        .filter(|s| !s.delete && s.st_bind() == elf::STB_LOCAL);
    let rest = b
        .symbols
        .iter()
        .filter(|s| !s.delete && s.st_bind() != elf::STB_LOCAL);
    locals.chain(rest).map(|s| s.id()).collect()
}

fn uleb(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn write_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}
