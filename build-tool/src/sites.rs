//! The site finder: for every relocation in an executable section whose target is one of
//! a set of addresses, decode the instruction that holds it (decoding from the start of
//! the enclosing function, never guessing from the bytes before the relocation) and
//! classify it as a `call`/`jmp`/`jcc rel32` site or as some other reference.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use kernel_loader::format::SiteKind;
use object::{ObjectSection, SectionIndex};

use crate::elf::{Image, Location, Reloc};
use crate::target::{Decoded, RelocClass, SiteInsn};

/// Kept at its old path for `embed` (which will ask `img.target`).
pub use crate::target::x86_64::reloc_target;

/// A branch to one of the targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundSite {
    /// Address of the instruction's first byte (prefixes included).
    pub addr: u64,
    /// Instruction length.
    pub len: u8,
    /// `call`, `jmp` or `jcc`.
    pub kind: SiteKind,
    /// Prefix bytes before the opcode.
    pub prefixes: u8,
    /// Which target (index given by the caller).
    pub target: usize,
    /// Section name.
    pub section: Arc<str>,
    /// Section index (section names need not be unique in an object).
    pub section_index: SectionIndex,
    /// Section offset of the first byte.
    pub section_offset: u64,
    /// `function+0xoff` (displays as text).
    pub location: Location,
}

/// A reference to a target that is not a patchable branch (address taken, `lea`, data,
/// or a branch form the loader cannot patch). Such references keep working through the
/// trampoline; they are reported, not patched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherRef {
    /// Address of the relocated field.
    pub addr: u64,
    /// Which target.
    pub target: usize,
    /// Section name.
    pub section: String,
    /// What it is (an instruction's mnemonic, a relocation type's name, …).
    pub what: String,
    /// `function+0xoff`.
    pub location: String,
}

/// Everything the finder saw.
#[derive(Clone, Debug, Default)]
pub struct SiteScan {
    /// Patchable branches, sorted by address, deduplicated.
    pub sites: Vec<FoundSite>,
    /// Other references, sorted by address.
    pub other_refs: Vec<OtherRef>,
}

struct Candidate {
    reloc_at: u64,
    target_addr: Option<u64>,
    target: usize,
}

/// What a selector says about one relocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    /// The caller's index for the target.
    pub target: usize,
    /// Where the branch must go, when known (linked images); `None` skips the check
    /// (relocatable objects hold 0 in the rel32 until linked).
    pub target_addr: Option<u64>,
}

/// Finds every reference to the addresses in `targets` (address → caller's index) from
/// executable sections.
pub fn find_sites(img: &Image<'_>, targets: &HashMap<u64, usize>) -> Result<SiteScan> {
    find_sites_with(img, &|r: &Reloc| {
        let t = img.target.reloc_target(r);
        targets.get(&t).map(|&target| Selected {
            target,
            target_addr: Some(t),
        })
    })
}

/// The engine: every branch-class relocation (and, reported as other references, every
/// absolute or GOT one) in an executable section that `select` picks is decoded and classified.
pub fn find_sites_with(
    img: &Image<'_>,
    select: &dyn Fn(&Reloc) -> Option<Selected>,
) -> Result<SiteScan> {
    let mut scan = SiteScan::default();
    for sec in img.exec_sections() {
        let sec_name: Arc<str> = sec.name().unwrap_or("?").into();
        let sec_addr = sec.address();
        let data = sec.data().unwrap_or(&[]);
        // Candidates tagged with their enclosing symbol's start, then grouped by a stable
        // sort (relocations come in address order, so this is nearly free and the order
        // within a function is kept).
        let mut by_func: Vec<(u64, Candidate)> = Vec::new();
        for r in img.relocations(&sec) {
            let r = r?;
            let class = img.target.reloc_class(r.r_type);
            let (abs, got) = (class == RelocClass::Absolute, class == RelocClass::Got);
            if class != RelocClass::Branch && !abs && !got {
                continue;
            }
            let Some(Selected {
                target,
                target_addr,
            }) = select(&r)
            else {
                continue;
            };
            if abs || got {
                let location = img.describe(sec.index(), r.offset);
                let what = if got {
                    format!(
                        "reference through the GOT ({})",
                        img.target.reloc_name(r.r_type)
                    )
                } else {
                    format!("absolute address ({})", img.target.reloc_name(r.r_type))
                };
                scan.other_refs.push(OtherRef {
                    addr: r.offset,
                    target,
                    section: sec_name.to_string(),
                    what,
                    location,
                });
                continue;
            }
            let start = img
                .enclosing_symbol(sec.index(), r.offset)
                .map(|s| s.addr)
                .unwrap_or(sec_addr);
            by_func.push((
                start,
                Candidate {
                    reloc_at: r.offset,
                    target_addr,
                    target,
                },
            ));
        }
        by_func.sort_by_key(|(start, _)| *start);
        let sec_end = sec_addr.saturating_add(data.len() as u64);
        let mut decoded = Decoded::default();
        for group in by_func.chunk_by(|a, b| a.0 == b.0) {
            // A malformed file can put a symbol outside its section: clamp to the section.
            let start = group[0].0.clamp(sec_addr, sec_end);
            let end = function_end(img, sec.index(), start, sec_end);
            let code = data
                .get((start - sec_addr) as usize..(end - sec_addr) as usize)
                .unwrap_or(&[]);
            img.target.decode_function(code, start, &mut decoded);
            for (_, c) in group {
                classify(img, &sec, &sec_name, &decoded, code, start, c, &mut scan);
            }
        }
    }
    // In an object every section starts at 0: equal addresses in different sections
    // are different sites.
    scan.sites.sort_by_key(|s| (s.addr, s.section_index.0));
    scan.sites.dedup_by_key(|s| (s.addr, s.section_index.0));
    scan.other_refs.sort_by_key(|r| r.addr);
    Ok(scan)
}

fn function_end(img: &Image<'_>, sec: SectionIndex, start: u64, sec_end: u64) -> u64 {
    let sized = img
        .enclosing_symbol(sec, start)
        .filter(|s| s.addr == start && s.size > 0)
        .map(|s| s.addr.saturating_add(s.size));
    let next = img.next_symbol_start(sec, start);
    sized.or(next).unwrap_or(sec_end).min(sec_end).max(start)
}

#[allow(clippy::too_many_arguments)]
fn classify(
    img: &Image<'_>,
    sec: &object::read::elf::ElfSection64<'_, '_, object::LittleEndian>,
    sec_name: &Arc<str>,
    decoded: &Decoded,
    code: &[u8],
    start: u64,
    c: &Candidate,
    scan: &mut SiteScan,
) {
    let SiteInsn {
        addr,
        len,
        kind,
        prefixes,
    } = match img
        .target
        .classify(decoded, code, start, c.reloc_at, c.target_addr)
    {
        Ok(site) => site,
        Err(what) => {
            scan.other_refs.push(OtherRef {
                addr: c.reloc_at,
                target: c.target,
                section: sec_name.to_string(),
                what,
                location: img.describe(sec.index(), c.reloc_at),
            });
            return;
        }
    };
    scan.sites.push(FoundSite {
        addr,
        len,
        kind,
        prefixes,
        target: c.target,
        section: sec_name.clone(),
        section_index: sec.index(),
        section_offset: addr - sec.address(),
        location: img.location(sec.index(), addr),
    });
}
