//! Reads the ifunc descriptor records the `ifunc!` macro leaves in `.ksites_ifuncs`.

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::arch::x86_64::{JMP_RIP_INDIRECT, TRAMPOLINE_LEN};
use kernel_loader::ifunc::{RECORD_MAGIC, RECORD_SECTION, RECORD_SIZE, RECORD_VERSION, record};
use std::collections::HashMap;

use object::elf;
use object::read::elf::SectionHeader;
use object::{LittleEndian, Object, ObjectSection, ObjectSymbol};

use crate::elf::{ElfKind, Image, Reloc};
use crate::sites::{Selected, SiteScan, find_sites_with, reloc_target};

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

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Every ifunc of a linked image: `ifunc!` records and GNU ifuncs, sorted by trampoline
/// address. An image with neither has no ifuncs (not an error).
pub fn read_ifuncs(img: &Image<'_>) -> Result<Vec<IfuncInfo>> {
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
    let by_addr: HashMap<u64, usize> = ifuncs
        .iter()
        .enumerate()
        .map(|(i, f)| (f.trampoline, i))
        .collect();
    let by_sym: HashMap<usize, usize> = ifuncs
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.gnu_symbol.map(|s| (s, i)))
        .collect();
    find_sites_with(img, &|r: &Reloc| {
        if let Some(&i) = by_sym.get(&r.sym_index).filter(|_| !r.sym_is_section) {
            return Some(Selected {
                target: i,
                target_addr: Some(ifuncs[i].trampoline),
            });
        }
        let t = reloc_target(r);
        by_addr.get(&t).map(|&target| Selected {
            target,
            target_addr: Some(t),
        })
    })
}

/// GNU ifuncs: `STT_GNU_IFUNC` symbols of a static image, each with the
/// `R_X86_64_IRELATIVE` relocation the linker made for it (slot = its offset, resolver =
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
    ensure!(
        img.kind == ElfKind::Exec,
        "{}: GNU ifuncs are supported in static ET_EXEC images only",
        img.path
    );
    // IRELATIVE relocations, wherever the linker put them (.rela.plt, .rela.iplt, .rela.dyn).
    let mut irel: Vec<(u64, u64)> = Vec::new();
    for sec in img.file.sections() {
        if sec.elf_section_header().sh_type(LittleEndian) != elf::SHT_RELA {
            continue;
        }
        let Ok(data) = sec.data() else { continue };
        for e in data.chunks_exact(24) {
            let info = u64_at(e, 8);
            if (info & 0xffff_ffff) as u32 == elf::R_X86_64_IRELATIVE {
                irel.push((u64_at(e, 0), u64_at(e, 16)));
            }
        }
    }
    // Pair each ifunc with its PLT entry through a call to it: the linker routed the
    // call's rel32 to the entry (which jumps through the IRELATIVE slot). Several ifuncs
    // may share a resolver, so the pairing goes call -> entry -> slot, never by addend.
    let irel: HashMap<u64, u64> = irel.into_iter().collect();
    let mut first_call: HashMap<usize, u64> = HashMap::new();
    for sec in img.exec_sections() {
        for r in img.relocations(&sec) {
            let r = r?;
            if matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32) && !r.sym_is_section {
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
        let rel = img
            .read_va(at, 4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .with_context(|| {
                format!(
                    "{}: call to GNU ifunc {name} at {at:#x} is not in the file",
                    img.path
                )
            })?;
        let trampoline = at.wrapping_add(4).wrapping_add_signed(rel.into());
        let entry = img
            .read_va(trampoline, TRAMPOLINE_LEN as u64)
            .unwrap_or(&[]);
        if entry.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
            bail!(
                "{}: GNU ifunc {name}: its PLT entry at {trampoline:#x} starts with endbr64 (an IBT \
                 PLT); build with -fcf-protection=none (IBT PLTs are not supported yet)",
                img.path
            );
        }
        ensure!(
            entry.len() == TRAMPOLINE_LEN && entry[..2] == JMP_RIP_INDIRECT,
            "{}: GNU ifunc {name}: the call at {at:#x} does not reach a `jmp [rip+slot]` PLT entry",
            img.path
        );
        let disp = i32::from_le_bytes(entry[2..6].try_into().expect("4 bytes"));
        let slot = (trampoline + TRAMPOLINE_LEN as u64).wrapping_add_signed(disp.into());
        let Some(&irel_resolver) = irel.get(&slot) else {
            bail!(
                "{}: GNU ifunc {name}: its PLT slot {slot:#x} has no R_X86_64_IRELATIVE relocation",
                img.path
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
    if img.kind != ElfKind::Exec {
        bail!(
            "{}: ifunc records can only be read from ET_EXEC images so far (this file is {:?})",
            img.path,
            img.kind
        );
    }
    let data = sec
        .data()
        .with_context(|| format!("{}: cannot read section {RECORD_SECTION}", img.path))?;
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
    let mut off = 0usize;
    while off < data.len() {
        // The linker may pad between input sections; records are 8-aligned and start with
        // a non-zero magic, so skip zero words.
        if data.len() - off >= 8 && u64_at(data, off) == 0 {
            off += 8;
            continue;
        }
        ensure!(
            data.len() - off >= RECORD_SIZE,
            "{}: {RECORD_SECTION}+{off:#x}: truncated ifunc record ({} bytes left, need {RECORD_SIZE})",
            img.path,
            data.len() - off
        );
        let r = &data[off..off + RECORD_SIZE];
        let (magic, version) = (u32_at(r, 0), u32_at(r, 4));
        ensure!(
            magic == RECORD_MAGIC,
            "{}: {RECORD_SECTION}+{off:#x}: bad ifunc record magic {magic:#x}",
            img.path
        );
        ensure!(
            version == RECORD_VERSION,
            "{}: {RECORD_SECTION}+{off:#x}: ifunc record version {version}, this tool reads {RECORD_VERSION} \
             (rebuild with the matching kernel-loader)",
            img.path
        );
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
        off += RECORD_SIZE;
    }
    Ok(out)
}

/// The trampoline must be `jmp [rip+slot]`: anything else means the record is stale.
fn check_trampoline(img: &Image<'_>, f: &IfuncInfo) -> Result<()> {
    let b = img
        .read_va(f.trampoline, TRAMPOLINE_LEN as u64)
        .with_context(|| {
            format!(
                "{}: ifunc {}: trampoline {:#x} is not in the file",
                img.path, f.name, f.trampoline
            )
        })?;
    let disp = i32::from_le_bytes(b[2..6].try_into().expect("4 bytes"));
    let target = (f.trampoline + TRAMPOLINE_LEN as u64).wrapping_add_signed(i64::from(disp));
    ensure!(
        b[..2] == JMP_RIP_INDIRECT && target == f.slot,
        "{}: ifunc {}: trampoline at {:#x} is not `jmp [rip+{:#x}]` (found {:02x?})",
        img.path,
        f.name,
        f.trampoline,
        f.slot,
        b
    );
    Ok(())
}
