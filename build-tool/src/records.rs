//! Reads the ifunc descriptor records the `ifunc!` macro leaves in `.ksites_ifuncs`.

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::ifunc::{RECORD_SECTION, RECORD_SIZE, record};
use std::collections::HashMap;

use object::elf;
use object::{Object, ObjectSection, ObjectSymbol};

use crate::elf::{Image, Reloc};
use crate::record_section::{self, IFUNC_RECORDS, Relative, u64_at};
use crate::sites::{Selected, SiteScan, find_sites_checked};
use crate::target::RelocClass;

/// One ifunc, with absolute addresses in the linked image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfuncInfo {
    /// `module::path::name`.
    pub name: String,
    /// The trampoline (the ifunc's own symbol).
    pub trampoline: u64,
    /// Raw symbol name of the trampoline, if the image has one.
    pub trampoline_symbol: String,
    /// The slot.
    pub slot: u64,
    /// The resolver adapter.
    pub resolver: u64,
    /// The default implementation (for a GNU ifunc, the trampoline itself: it has no
    /// default, and the slot is made to point at the trampoline until resolution).
    pub default: u64,
    /// For a GNU ifunc (`STT_GNU_IFUNC`), the index of its symbol: calls to it are
    /// relocated against the symbol (whose value is the resolver) and routed by the
    /// linker through the IPLT entry, the trampoline.
    pub gnu_symbol: Option<usize>,
}

/// Every ifunc of a linked image: `ifunc!` records and GNU ifuncs, sorted by trampoline
/// address. An image with neither has no ifuncs (not an error).
pub fn read_ifuncs(img: &Image<'_>) -> Result<Vec<IfuncInfo>> {
    crate::elf::check_linked_headers(img)?;
    let mut out = read_gnu_ifuncs(img)?;
    out.extend(read_rust_ifuncs(img)?);
    out.sort_by_key(|f| f.trampoline);
    for w in out.windows(2) {
        ensure!(
            w[0].trampoline != w[1].trampoline,
            "{}: two ifunc records for one trampoline ({} and {})",
            img.path,
            w[0].name,
            w[1].name
        );
    }
    Ok(out)
}

/// Every call/jmp/jcc site of `ifuncs` (and every other reference to them).
pub fn find_ifunc_sites(img: &Image<'_>, ifuncs: &[IfuncInfo]) -> Result<SiteScan> {
    find_ifunc_sites_checked(img, ifuncs, true)
}

/// [`find_ifunc_sites`], reporting malformed branch relocations instead of refusing
/// the file unless `strict` (see [`crate::sites::find_sites_checked`]).
pub fn find_ifunc_sites_checked(
    img: &Image<'_>,
    ifuncs: &[IfuncInfo],
    strict: bool,
) -> Result<SiteScan> {
    // Few ifuncs, millions of relocations: sorted vectors searched by halving, not
    // hash maps. Where two ifuncs share a key, the later one answers (as a map built
    // from the list in order would have it).
    let last_per_key = |mut v: Vec<(u64, usize)>| {
        v.sort_by_key(|&(k, _)| k);
        let mut out: Vec<(u64, usize)> = Vec::with_capacity(v.len());
        for (k, i) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = i,
                _ => out.push((k, i)),
            }
        }
        out
    };
    let lookup =
        |v: &[(u64, usize)], k: u64| v.binary_search_by_key(&k, |&(k, _)| k).ok().map(|j| v[j].1);
    let by_addr = last_per_key(
        ifuncs
            .iter()
            .enumerate()
            .map(|(i, f)| (f.trampoline, i))
            .collect(),
    );
    let by_sym = last_per_key(
        ifuncs
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.gnu_symbol.map(|s| (s as u64, i)))
            .collect(),
    );
    let mut scan = find_sites_checked(
        img,
        &|r: &Reloc| {
            if !r.sym_is_section
                && let Some(i) = lookup(&by_sym, r.sym_index as u64)
            {
                return Some(Selected {
                    target: i,
                    target_addr: Some(ifuncs[i].trampoline),
                });
            }
            let t = img.target.reloc_target(r);
            lookup(&by_addr, t).map(|target| Selected {
                target,
                target_addr: Some(t),
            })
        },
        strict,
    )?;
    scan.keep_patchable(img);
    Ok(scan)
}

/// GNU ifuncs: `STT_GNU_IFUNC` symbols of a static image, each with the
/// IRELATIVE relocation the linker made for it (slot = its offset, resolver =
/// its addend = the symbol's value) and the PLT/IPLT entry that jumps through that slot.
pub fn read_gnu_ifuncs(img: &Image<'_>) -> Result<Vec<IfuncInfo>> {
    let syms: Vec<(usize, String, u64)> = img
        .file
        .symbols()
        .filter(|s| s.elf_symbol().st_type() == elf::STT_GNU_IFUNC && s.section_index().is_some())
        .filter_map(|s| Some((s.index().0, s.name().ok()?.to_string(), s.address())))
        .collect();
    if syms.is_empty() {
        return Ok(Vec::new());
    }
    // Each is paired with its PLT entry through a call's relocation: without
    // relocations none could be, and the image would look as if it had no ifunc.
    ensure!(
        img.has_text_relocations(),
        "{}: has {} GNU ifunc symbols (e.g. `{}`) but no relocation sections; link with \
         --emit-relocs",
        img.path,
        syms.len(),
        syms[0].1
    );
    // IRELATIVE relocations, wherever the linker put them (.rela.plt, .rela.iplt, .rela.dyn).
    let t = img.target;
    let irel: Vec<(u64, u64)> = img
        .raw_relas()
        .filter(|r| t.reloc_class(r.r_type) == RelocClass::IRelative)
        .map(|r| (r.offset, r.addend as u64))
        .collect();
    // Pair each ifunc with its PLT entry through a call to it: the linker routed the
    // call's rel32 to the entry (which jumps through the IRELATIVE slot). Several ifuncs
    // may share a resolver, so the pairing goes call -> entry -> slot, never by addend.
    let irel: HashMap<u64, u64> = irel.into_iter().collect();
    let mut first_call: HashMap<usize, u64> = HashMap::new();
    for sec in img.exec_sections() {
        for r in img.relocations(&sec) {
            let r = r?;
            if t.reloc_class(r.r_type) == RelocClass::Branch && !r.sym_is_section {
                first_call.entry(r.sym_index).or_insert(r.offset);
            }
        }
    }
    let mut out = Vec::new();
    for (index, name, resolver) in syms {
        // An ifunc nothing calls has no PLT entry and nothing to patch.
        let Some(&at) = first_call.get(&index) else {
            continue;
        };
        let trampoline = t
            .branch_dest_at(|n| img.read_va(at, n), at)
            .with_context(|| {
                format!(
                    "{}: call to GNU ifunc {name} at {at:#x} is not in the file",
                    img.path
                )
            })?;
        let entry = img
            .read_va(trampoline, t.plt_entry_len() as u64)
            .unwrap_or(&[]);
        if let Some(why) = t.unsupported_plt_entry(entry) {
            bail!(
                "{}: GNU ifunc {name}: its PLT entry at {trampoline:#x} {why}",
                img.path
            );
        }
        let Some(slot) = t.plt_slot(entry, trampoline) else {
            bail!(
                "{}: GNU ifunc {name}: the call at {at:#x} does not reach a {} PLT entry",
                img.path,
                t.trampoline_text(None)
            );
        };
        let Some(&irel_resolver) = irel.get(&slot) else {
            bail!(
                "{}: GNU ifunc {name}: its PLT slot {slot:#x} has no {} relocation",
                img.path,
                t.reloc_name(t.irelative_reloc())
            );
        };
        ensure!(
            irel_resolver == resolver,
            "{}: GNU ifunc {name}: its slot's IRELATIVE resolver {irel_resolver:#x} is not the symbol's {resolver:#x}",
            img.path
        );
        out.push(IfuncInfo {
            trampoline_symbol: name.clone(),
            name,
            trampoline,
            slot,
            resolver,
            default: trampoline,
            gnu_symbol: Some(index),
        });
    }
    // Aliases (two names, one IFUNC definition) share one trampoline: keep the first.
    out.sort_by_key(|f| f.trampoline);
    out.dedup_by_key(|f| f.trampoline);
    Ok(out)
}

fn read_rust_ifuncs(img: &Image<'_>) -> Result<Vec<IfuncInfo>> {
    let Some(sec) = img.section_by_name(RECORD_SECTION) else {
        return Ok(Vec::new());
    };
    let data = sec
        .data()
        .with_context(|| format!("{}: cannot read section {RECORD_SECTION}", img.path))?;
    // In a PIE the pointers are read through their RELATIVE relocations.
    let data = &*Relative::of(img).apply(sec.address(), data);
    // Function symbols by address, built once (a per-record scan is quadratic).
    let mut text_syms: HashMap<u64, String> = HashMap::new();
    for s in img.file.symbols() {
        if s.kind() == object::SymbolKind::Text
            && let Ok(n) = s.name()
        {
            text_syms
                .entry(s.address())
                .or_insert_with(|| n.to_string());
        }
    }
    let mut out = Vec::new();
    // The linker may pad between input sections; records are 8-aligned and start with a
    // non-zero magic, so every zero word is padding.
    for off in record_section::walk(&img.path, &IFUNC_RECORDS, data, |_| true)? {
        let r = &data[off..off + RECORD_SIZE];
        let name_ptr = u64_at(r, record::NAME_PTR);
        let name_len = u64_at(r, record::NAME_LEN);
        let name = img
            .read_va(name_ptr, name_len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .with_context(|| {
                format!(
                    "{}: {RECORD_SECTION}+{off:#x}: unreadable ifunc name at {name_ptr:#x}",
                    img.path
                )
            })?
            .to_string();
        let trampoline = u64_at(r, record::TRAMPOLINE);
        let slot = u64_at(r, record::SLOT);
        let info = IfuncInfo {
            trampoline_symbol: text_syms.get(&trampoline).cloned().unwrap_or_default(),
            name,
            trampoline,
            slot,
            resolver: u64_at(r, record::RESOLVER),
            default: u64_at(r, record::DEFAULT),
            gnu_symbol: None,
        };
        check_trampoline(img, &info)?;
        out.push(info);
    }
    Ok(out)
}

/// The trampoline must jump through the record's slot: anything else means the record is
/// stale.
fn check_trampoline(img: &Image<'_>, f: &IfuncInfo) -> Result<()> {
    let t = img.target;
    let b = img
        .read_va(f.trampoline, t.trampoline_len() as u64)
        .with_context(|| {
            format!(
                "{}: ifunc {}: trampoline {:#x} is not in the file",
                img.path, f.name, f.trampoline
            )
        })?;
    ensure!(
        t.trampoline_slot(b, f.trampoline) == Some(f.slot),
        "{}: ifunc {}: trampoline at {:#x} is not {} (found {:02x?})",
        img.path,
        f.name,
        f.trampoline,
        t.trampoline_text(Some(f.slot)),
        b
    );
    Ok(())
}
