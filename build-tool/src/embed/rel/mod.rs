//! `ksites embed` on relocatable objects (ET_REL kernel modules).
//!
//! The output is the input object plus two sections:
//!
//! * `.ksites` (`SHT_PROGBITS`, flags `SHF_ALLOC` only, alignment 8): a v1 table
//!   ([`kernel_loader::format`]) whose self-relative `i32` fields are **0 in the file**;
//! * `.rela.ksites` (`SHT_RELA`, `SHF_INFO_LINK`, `sh_link` = `.symtab`, `sh_info` =
//!   `.ksites`): one table-field relocation (the architecture's 32-bit `S + A - P`,
//!   PC32 on x86-64) per self-relative field. A target at offset `off`
//!   of section `X` is relocated against `X`'s section symbol (added when the object has
//!   none) with addend `off`; an undefined symbol (a kernel ifunc the module imports)
//!   against that symbol with addend 0. `S + A - P` is then exactly `target - field`:
//!   once a module loader has applied `.rela.ksites`, the table has the self-relative
//!   form of a linked image's table and [`kernel_loader::format::Table::parse`] reads it
//!   unchanged.
//!
//! Import descriptors (from `.ksites_ifunc_imports`) have a trampoline field relocated
//! against the undefined symbol and slot, resolver and default fields 0 with no
//! relocation; they follow every defined descriptor and are sorted by name.
//!
//! Besides, C probe calls are rewritten in section data into their disabled form and
//! their relocation becomes the "none" relocation, except a C is-enabled tail call
//! (`jmp __dtraceenabled_*`), whose disabled form `jmp ksites_probe_ret0` keeps a
//! branch relocation (PLT32 on x86-64), retargeted to the (undefined) symbol
//! `ksites_probe_ret0`, addend -4. Every encoding and relocation type involved comes
//! from the input's [`crate::target::Target`]. Each `probe!` record gets its probe id in section
//! data. Nothing else changes: sections, symbols and relocations keep their contents
//! (symbol indices may change when a section symbol is added; relocations, group
//! signatures and `.llvm_addrsig` follow).
//!
//! # Layout contract
//!
//! The module loader places `SHF_ALLOC` sections by the layout contract defined once in
//! [`kernel_loader::module::layout`]: three groups, each starting on a page boundary —
//! executable (`SHF_EXECINSTR`), then read-only, then writable (`SHF_WRITE`); the
//! flags alone pick the group, so a read-only `SHT_NOBITS` section is read-only data.
//! **Within a group, sections are placed in section-header-index order**, each at its
//! own alignment. Addresses within executable code therefore increase with (section
//! index, offset), and every sorted list of the table — ifunc sites, probe sites,
//! defined ifunc descriptors by trampoline — is sorted by (section index, offset).
//! [`kernel_loader::format::Table::parse`] checks the order, so a loader that breaks
//! the contract gets an error at load time, never a silently wrong table.
//!
//! To find sites with the same engine as for linked images, the object is "virtually
//! linked" at the contract's layout ([`VirtualLayout`]), and the addresses are mapped
//! back to (section, offset) or symbol when the relocations are written.
//!
//! Static key sites ([`crate::keys`]) whose key the module defines and whose default
//! differs from their likeliness get their branch form in section data: computed
//! there when the label is in the site's section, else left for a branch relocation
//! added to the section's relocations (against the label section's symbol). Sites of
//! an imported key (an undefined symbol) stay NOP: the module loader sets them.
//!
//! Files: `layout` ([`VirtualLayout`], [`Target`]), `read` (the records), `keys` (the
//! key site records and key objects), `write` (the
//! output object).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::format::{NARGS_UNKNOWN, SECTION_NAME, Table};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{
    LittleEndian as LE, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex, SymbolKind,
};

use super::report::{AlreadyEmbedded, EmbedReport};
use crate::elf::{Image, Reloc};
use crate::keys::{RawKey, RawSite};
use crate::probes::{FoundProbeSite, ProbeScan};
use crate::records::IfuncInfo;
use crate::sites::{Selected, SiteScan, find_sites_with};
use crate::table::{IfuncEntry, ProbeEntry, ProbeSiteEntry, SiteEntry, TableInput, build_with_for};

mod keys;
mod layout;
mod read;
mod write;

pub use layout::{Target, VirtualLayout};
use read::{Obj, find_probes_rel, read_defined_ifuncs, read_imports, rel32_target};

pub use write::RELA_SECTION_NAME;
/// Where the virtual layout starts (any page-aligned, non-zero address).
const BASE: u64 = kernel_loader::module::PAGE_SIZE as u64;

/// `VirtualLayout::new`, with the error in words.
fn virtual_layout(path: &str, file: &ElfFile64<'_, LE>) -> Result<VirtualLayout> {
    VirtualLayout::new(file, BASE).map_err(|e| match e {
        kernel_loader::module::layout::LayoutError::TooBig => {
            anyhow::anyhow!("{path}: allocated sections do not fit the address space")
        }
        e => anyhow::anyhow!("{path}: allocated sections: {e}"),
    })
}

/// Embeds into an ET_REL object; returns the new file contents. See the module
/// documentation for what the output holds.
pub fn embed_rel(path: &str, data: &[u8]) -> Result<(Vec<u8>, EmbedReport)> {
    let img = Image::parse(path, data)?;
    layout::check_alignments(&img)?;
    if img.section_by_name(SECTION_NAME).is_some() {
        return Err(AlreadyEmbedded(path.to_string()).into());
    }
    let o = Obj {
        img: &img,
        path,
        reloc_cache: RefCell::default(),
    };
    if let Some(s) = img
        .file
        .symbols()
        .find(|s| s.elf_symbol().st_type() == elf::STT_GNU_IFUNC)
    {
        bail!(
            "{path}: GNU ifunc symbol {} (STT_GNU_IFUNC) is not supported in modules; declare \
             the ifunc with kernel_loader::ifunc! instead",
            s.name().unwrap_or("?")
        );
    }
    let layout = virtual_layout(path, &img.file)?;
    // Every address handed to the table writer, mapped back to its target.
    let mut back: HashMap<u64, Target> = HashMap::new();
    let mut va = |t: Target| -> Result<u64> {
        let a = layout
            .addr(t)
            .with_context(|| format!("{path}: {} is not in an allocated section", o.describe(t)))?;
        ensure!(a != 0, "internal: target at address 0");
        if let Some(prev) = back.insert(a, t) {
            ensure!(
                prev == t,
                "internal: {} and {} share a virtual address",
                o.describe(prev),
                o.describe(t)
            );
        }
        Ok(a)
    };

    // Ifuncs: defined ones sorted by trampoline (section index, offset), then imports.
    let mut defined = read_defined_ifuncs(&o)?;
    defined.sort_by_key(|f| f.trampoline);
    for w in defined.windows(2) {
        ensure!(
            w[0].trampoline != w[1].trampoline,
            "{path}: two ifunc records for one trampoline ({} and {})",
            w[0].name,
            w[1].name
        );
    }
    let imports = read_imports(&o)?;
    let mut ifuncs: Vec<IfuncInfo> = Vec::new();
    let mut entries: Vec<IfuncEntry> = Vec::new();
    for f in &defined {
        let e = IfuncEntry {
            name: f.name.clone(),
            trampoline: va(f.trampoline)?,
            slot: va(f.slot)?,
            resolver: va(f.resolver)?,
            default: va(f.default)?,
        };
        let trampoline_symbol = match f.trampoline {
            Target::Sec { sec, off } => img
                .symbol_at(SectionIndex(sec), off)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            Target::Undef { .. } => String::new(),
        };
        ifuncs.push(IfuncInfo {
            name: e.name.clone(),
            trampoline: e.trampoline,
            trampoline_symbol,
            slot: e.slot,
            resolver: e.resolver,
            default: e.default,
            gnu_symbol: None,
        });
        entries.push(e);
    }
    for (sym, name) in &imports {
        let e = IfuncEntry {
            name: name.clone(),
            trampoline: va(Target::Undef {
                sym: *sym,
                addend: 0,
            })?,
            slot: 0,
            resolver: 0,
            default: 0,
        };
        ifuncs.push(IfuncInfo {
            name: name.clone(),
            trampoline: e.trampoline,
            trampoline_symbol: name.clone(),
            slot: 0,
            resolver: 0,
            default: 0,
            gnu_symbol: None,
        });
        entries.push(e);
    }

    // Sites: rel32 relocations reaching a defined trampoline or an imported symbol.
    let by_target: HashMap<Target, usize> = defined
        .iter()
        .enumerate()
        .map(|(i, f)| (f.trampoline, i))
        .chain(imports.iter().enumerate().map(|(i, (sym, _))| {
            (
                Target::Undef {
                    sym: *sym,
                    addend: 0,
                },
                defined.len() + i,
            )
        }))
        .collect();
    let mut scan: SiteScan = find_sites_with(&img, &|r: &Reloc| {
        let t = rel32_target(r)?;
        by_target.get(&t).map(|&target| Selected {
            target,
            target_addr: None,
        })
    })?;
    scan.keep_patchable(&img);
    let mut sites = std::mem::take(&mut scan.sites);
    sites.sort_by_key(|s| (scan.section_index(s).0, scan.section_offset(s)));
    scan.sites = sites;
    let mut site_entries = Vec::new();
    for s in &scan.sites {
        site_entries.push(SiteEntry {
            addr: va(Target::Sec {
                sec: scan.section_index(s).0,
                off: scan.section_offset(s),
            })?,
            kind: s.kind,
            prefixes: s.prefixes,
            ifunc: s.target,
        });
    }

    // Probes.
    let pf = find_probes_rel(&o)?;
    let mut probes = ProbeScan::default();
    let mut index: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (i, (key, n)) in pf.nargs.iter().enumerate() {
        index.insert(key.clone(), i as u32);
        probes.probes.push(ProbeEntry {
            provider: key.0.clone(),
            name: key.1.clone(),
            nargs: n.map_or(NARGS_UNKNOWN, |n| n as u16),
        });
    }
    let mut record_ids: BTreeSet<(Target, u32)> = BTreeSet::new();
    let mut rewrites: Vec<write::Rewrite> = Vec::new();
    for p in &pf.pending {
        let id = index[&p.key];
        if let Some(rec) = p.record {
            record_ids.insert((rec, id));
        }
        if !p.kind.is_rust() {
            rewrites.push((p.site, p.kind, p.call));
        }
        let addr = va(p.site)?;
        let target = match p.target {
            Some(t) => va(t)?,
            None => 0,
        };
        let location = match p.site {
            Target::Sec { sec, off } => img.describe(SectionIndex(sec), off),
            Target::Undef { .. } => String::new(),
        };
        probes.found.push(FoundProbeSite {
            addr,
            kind: p.kind,
            probe: id,
            location,
        });
        probes.sites.push(ProbeSiteEntry {
            addr,
            target,
            kind: p.kind,
            probe: id,
        });
    }

    // Static keys: numbered at the layout's addresses (reach checked there), then the
    // sites given their initial form mapped back to (section, offset).
    let (rel_keys, rel_sites) = keys::read_keys(&o)?;
    let mut raw_keys = Vec::with_capacity(rel_keys.len());
    for k in rel_keys {
        raw_keys.push(RawKey {
            addr: va(k.key)?,
            name: k.name,
            default: k.default,
        });
    }
    let mut raw_sites = Vec::with_capacity(rel_sites.len());
    let mut site_names: HashMap<u64, String> = HashMap::new();
    for s in &rel_sites {
        let addr = va(s.site)?;
        site_names.insert(addr, o.describe(s.site));
        raw_sites.push(RawSite {
            addr,
            target: va(s.target)?,
            likely: s.likely,
            key: va(s.key)?,
        });
    }
    let keys = crate::keys::number(path, img.target, raw_keys, raw_sites, &|a| {
        site_names
            .get(&a)
            .cloned()
            .unwrap_or_else(|| format!("{a:#x}"))
    })?;
    let key_forms: Vec<(Target, Target)> = keys
        .initial
        .iter()
        .filter_map(|&(a, _)| {
            let i = keys.sites.binary_search_by_key(&a, |s| s.addr).ok()?;
            Some((*back.get(&a)?, *back.get(&keys.sites[i].target)?))
        })
        .collect();
    ensure!(
        key_forms.len() == keys.initial.len(),
        "internal: a key site's address does not map back to the object"
    );

    // The table, with a relocation per self-relative field.
    if !(entries.is_empty()
        && site_entries.is_empty()
        && probes.sites.is_empty()
        && keys.is_empty())
    {
        check_span(&img, &layout)?;
    }
    let input = TableInput {
        ifuncs: entries,
        sites: site_entries,
        probes: probes.probes.clone(),
        probe_sites: probes.sites.clone(),
        keys: keys.keys.clone(),
        key_sites: keys.sites.clone(),
    };
    let mut table_relocs: Vec<(u64, Target)> = Vec::new();
    let table = build_with_for(img.target, &input, &mut |field, target| {
        if target != 0 {
            table_relocs.push((field as u64, *back.get(&target)?));
        }
        Some(0)
    })
    .with_context(|| format!("{path}: cannot build the table"))?;

    let out = write::write_object(
        img.target,
        path,
        data,
        &table,
        &table_relocs,
        &write::Edits {
            record_ids: &record_ids,
            rewrites: &rewrites,
            key_forms: &key_forms,
        },
    )?;
    verify_output(img.target, path, &out, &input)?;
    Ok((
        out,
        EmbedReport {
            ifuncs,
            scan,
            probes,
            keys,
            table: Some((0, table.len())),
            relocatable: true,
        },
    ))
}

/// Refuses a module whose allocated sections and imports span more than 2 GiB at the
/// layout contract: the table's 32-bit self-relative fields (placed among the
/// read-only sections) could not reach across them. Names the largest section.
fn check_span(img: &Image<'_>, layout: &VirtualLayout) -> Result<()> {
    let sizes = img
        .file
        .elf_section_table()
        .iter()
        .map(|h| h.sh_size(LE))
        .collect::<Vec<_>>();
    let placed = || {
        layout
            .sections
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i, (*a)?, sizes[i])))
    };
    let start = placed().map(|(_, a, _)| a).min().unwrap_or(BASE);
    let end = placed()
        .map(|(_, a, n)| a.saturating_add(n))
        .chain(layout.exec.iter().map(|r| r.end))
        .max()
        .unwrap_or(BASE);
    if end.saturating_sub(start) <= i32::MAX as u64 {
        return Ok(());
    }
    let (big, _, size) = placed().max_by_key(|&(_, _, n)| n).unwrap_or_default();
    bail!(
        "{}: the allocated sections span {:#x} bytes at the module layout ({} alone is \
         {size:#x} bytes): the table placed among them could not reach the code with its \
         32-bit self-relative fields (more than 2 GiB)",
        img.path,
        end - start,
        img.section_label(SectionIndex(big))
    )
}

/// Re-reads the output: applies `.rela.ksites` at a layout that follows the contract
/// and checks that the loader's reader accepts the table with the expected counts.
fn verify_output(
    arch: crate::target::Target,
    path: &str,
    out: &[u8],
    input: &TableInput,
) -> Result<()> {
    let file = ElfFile64::<LE>::parse(out).context("re-reading the output")?;
    let layout = virtual_layout(path, &file)?;
    let (bytes, addr) = relocated_table(arch, &file, &layout)
        .map_err(|e| anyhow::anyhow!("{path}: written table: {e}"))?;
    let t = Table::parse(&bytes, addr, &layout.exec)
        .map_err(|e| anyhow::anyhow!("{path}: written table does not validate: {e}"))?;
    ensure!(
        t.ifunc_count() as usize == input.ifuncs.len()
            && t.site_count() as usize == input.sites.len()
            && t.probe_count() as usize == input.probes.len()
            && t.probe_site_count() as usize == input.probe_sites.len()
            && t.key_count() as usize == input.keys.len()
            && t.key_site_count() as usize == input.key_sites.len(),
        "{path}: written table lost entries"
    );
    Ok(())
}

/// The `.ksites` section of an embedded object with `.rela.ksites` applied at
/// `layout`, and its address.
pub fn relocated_table(
    arch: crate::target::Target,
    file: &ElfFile64<'_, LE>,
    layout: &VirtualLayout,
) -> Result<(Vec<u8>, u64)> {
    let sec = file
        .section_by_name(SECTION_NAME)
        .context("no .ksites section")?;
    let addr = layout
        .sections
        .get(sec.index().0)
        .copied()
        .flatten()
        .context(".ksites is not allocated")?;
    let mut bytes = sec.data().context("unreadable .ksites")?.to_vec();
    for (off, r) in sec.relocations() {
        ensure!(
            r.flags()
                == (RelocationFlags::Elf {
                    r_type: object::elf::RelocationType(arch.table_reloc())
                }),
            ".rela.ksites+{off:#x}: not {}",
            arch.reloc_name(arch.table_reloc())
        );
        let RelocationTarget::Symbol(i) = r.target() else {
            bail!(".rela.ksites: relocation without a symbol");
        };
        let s = file
            .symbol_by_index(i)
            .with_context(|| format!(".rela.ksites+{off:#x}: bad symbol index {}", i.0))?;
        let sv = if s.is_undefined() {
            *layout
                .undefined
                .get(&i.0)
                .context("undefined symbol without an address")?
        } else {
            let si = s.section_index().context("symbol not in a section")?;
            let base = layout
                .sections
                .get(si.0)
                .copied()
                .flatten()
                .context("symbol in a non-allocated section")?;
            if s.kind() == SymbolKind::Section {
                base
            } else {
                base.checked_add(s.address())
                    .context("symbol address overflows")?
            }
        };
        let p = addr
            .checked_add(off)
            .context("relocation offset overflows")?;
        let place = bytes
            .get_mut(off as usize..)
            .context("relocation past the table")?;
        arch.apply_table_reloc(place, sv, r.addend(), p)
            .map_err(|e| anyhow::anyhow!(".rela.ksites+{off:#x}: {e}"))?;
    }
    Ok((bytes, addr))
}
