//! The site finder: for every relocation in an executable section whose target is one of
//! a set of addresses, decode the instruction that holds it (decoding from the start of
//! the enclosing function, never guessing from the bytes before the relocation) and
//! classify it as a `call`/`jmp`/`jcc rel32` site or as some other reference.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kernel_loader::arch::x86_64::{is_branch_prefix, opcode_matches};
use kernel_loader::format::{MAX_SITE_LEN, SiteKind};
use object::elf;
use object::{ObjectSection, SectionIndex};

use crate::elf::{Image, Location, Reloc};

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
    /// What it is (`lea rax,[...]`, `R_X86_64_64`, …).
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
        let t = reloc_target(r);
        targets.get(&t).map(|&target| Selected {
            target,
            target_addr: Some(t),
        })
    })
}

/// Relocation types that reach a symbol through the GOT (`call *sym@GOTPCREL(%rip)`,
/// `mov sym@GOTPCREL(%rip), %rax`).
pub fn is_got_reloc(t: u32) -> bool {
    matches!(
        t,
        elf::R_X86_64_GOT32
            | elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_GOTPCREL64
            | elf::R_X86_64_GOT64
    )
}

/// The address a relocation refers to: for a rel32 that ends its instruction (PC32,
/// PLT32), S + A + 4 is where the branch goes; through the GOT, the symbol itself;
/// otherwise S + A.
pub fn reloc_target(r: &Reloc) -> u64 {
    let base = r.sym_value.wrapping_add_signed(r.addend);
    if matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32) {
        base.wrapping_add(4)
    } else if is_got_reloc(r.r_type) {
        r.sym_value
    } else {
        base
    }
}

/// The engine: every PC32/PLT32 relocation (and, reported as other references, every
/// absolute one) in an executable section that `select` picks is decoded and classified.
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
            let pc_rel = matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32);
            let abs = matches!(
                r.r_type,
                elf::R_X86_64_64 | elf::R_X86_64_32 | elf::R_X86_64_32S
            );
            let got = is_got_reloc(r.r_type);
            if !pc_rel && !abs && !got {
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
                    format!("reference through the GOT ({})", reloc_name(r.r_type))
                } else {
                    format!("absolute address ({})", reloc_name(r.r_type))
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
        let mut insns = Vec::new();
        for group in by_func.chunk_by(|a, b| a.0 == b.0) {
            // A malformed file can put a symbol outside its section: clamp to the section.
            let start = group[0].0.clamp(sec_addr, sec_end);
            let end = function_end(img, sec.index(), start, sec_end);
            let code = data
                .get((start - sec_addr) as usize..(end - sec_addr) as usize)
                .unwrap_or(&[]);
            decode_all(code, start, &mut insns);
            for (_, c) in group {
                classify(img, &sec, &sec_name, &insns, code, start, c, &mut scan);
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

fn decode_all(code: &[u8], ip: u64, out: &mut Vec<Instruction>) {
    let mut dec = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    out.clear();
    while dec.can_decode() {
        out.push(dec.decode());
    }
}

#[allow(clippy::too_many_arguments)]
fn classify(
    img: &Image<'_>,
    sec: &object::read::elf::ElfSection64<'_, '_, object::LittleEndian>,
    sec_name: &Arc<str>,
    insns: &[Instruction],
    code: &[u8],
    start: u64,
    c: &Candidate,
    scan: &mut SiteScan,
) {
    let mut other = |what: String| {
        scan.other_refs.push(OtherRef {
            addr: c.reloc_at,
            target: c.target,
            section: sec_name.to_string(),
            what,
            location: img.describe(sec.index(), c.reloc_at),
        })
    };
    let i = insns.partition_point(|x| x.next_ip() <= c.reloc_at);
    let Some(insn) = insns.get(i).filter(|x| x.ip() <= c.reloc_at) else {
        other("not inside a decodable instruction".into());
        return;
    };
    if insn.code() == Code::INVALID {
        other(format!("invalid instruction at {:#x}", insn.ip()));
        return;
    }
    let kind = match insn.code() {
        Code::Call_rel32_64 => Some(SiteKind::Call),
        Code::Jmp_rel32_64 => Some(SiteKind::Jmp),
        _ if insn.is_jcc_near() => Some(SiteKind::Jcc),
        _ => None,
    };
    let len = insn.len();
    let Some(kind) = kind else {
        other(format!("{}", Mnemonic(insn)));
        return;
    };
    if insn.next_ip() != c.reloc_at + 4
        || c.target_addr
            .is_some_and(|t| insn.near_branch_target() != t)
    {
        other(format!(
            "{} whose rel32 does not hold the relocation",
            Mnemonic(insn)
        ));
        return;
    }
    if len > MAX_SITE_LEN {
        other(format!(
            "{} with too many prefixes ({len} bytes)",
            Mnemonic(insn)
        ));
        return;
    }
    let prefixes = len - kind.opcode_len() - 4;
    let off = (insn.ip() - start) as usize;
    let bytes = &code[off..off + len];
    if !bytes[..prefixes].iter().all(|&b| is_branch_prefix(b))
        || !opcode_matches(kind, &bytes[prefixes..])
    {
        other(format!(
            "{} with unsupported prefix bytes {:02x?}",
            Mnemonic(insn),
            &bytes[..prefixes]
        ));
        return;
    }
    scan.sites.push(FoundSite {
        addr: insn.ip(),
        len: len as u8,
        kind,
        prefixes: prefixes as u8,
        target: c.target,
        section: sec_name.clone(),
        section_index: sec.index(),
        section_offset: insn.ip() - sec.address(),
        location: img.location(sec.index(), insn.ip()),
    });
}

struct Mnemonic<'a>(&'a Instruction);

impl std::fmt::Display for Mnemonic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let mut fmt = iced_x86::FastFormatter::new();
        fmt.format(self.0, &mut s);
        f.write_str(&s)
    }
}

/// `R_X86_64_*` name.
pub fn reloc_name(t: u32) -> &'static str {
    match t {
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        _ => "R_X86_64_?",
    }
}
