//! The site finder: for every relocation in an executable section whose target is one of
//! a set of addresses, decode the instruction that holds it (decoding from the start of
//! the enclosing function, never guessing from the bytes before the relocation) and
//! classify it as a `call`/`jmp`/`jcc rel32` site or as some other reference.
//!
//! Relocations are taken in file order and classified as they come, one function at a
//! time (an image can carry millions: nothing is collected per relocation). Where the
//! enclosing functions do not come in address order, the section is redone the general
//! way (every candidate collected, then stably sorted by function), which gives the same
//! result the streaming pass gives in the usual case.

use std::collections::HashMap;

use anyhow::{Context, Result};
use kernel_loader::format::SiteKind;
use object::read::elf::ElfSection64;
use object::{LittleEndian, ObjectSection, SectionIndex};

use crate::elf::{Image, Location, Reloc};
use crate::target::{FunctionCursor, RelocClass, SiteInsn};

/// Kept at its old path for `embed` (which will ask `img.target`).
pub use crate::target::x86_64::reloc_target;

/// A branch to one of the targets. Kept small (an image can have millions): its section
/// and enclosing function are indices into the [`SiteScan`]'s tables, whose methods
/// give their names ([`SiteScan::section_name`], [`SiteScan::location`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundSite {
    /// Address of the instruction's first byte (prefixes included).
    pub addr: u64,
    /// Which target (index given by the caller).
    pub target: u32,
    /// Index into [`SiteScan::sections`].
    pub section: u32,
    /// Index into [`SiteScan::functions`] of the symbol enclosing the site, or
    /// [`NO_FUNCTION`].
    pub function: u32,
    /// Instruction length.
    pub len: u8,
    /// `call`, `jmp` or `jcc`.
    pub kind: SiteKind,
    /// Prefix bytes before the opcode.
    pub prefixes: u8,
}

/// [`FoundSite::function`] of a site no symbol encloses.
pub const NO_FUNCTION: u32 = u32::MAX;

/// An executable section the finder went through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedSection {
    /// Its index (section names need not be unique in an object).
    pub index: SectionIndex,
    /// Its name.
    pub name: String,
    /// Its address (0 in an object).
    pub addr: u64,
}

/// A symbol enclosing a site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteFunction {
    /// Raw (mangled) name: demangled only when a location is displayed.
    pub name: String,
    /// Its address.
    pub addr: u64,
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
    /// Patchable branches, sorted by address (then section), deduplicated.
    pub sites: Vec<FoundSite>,
    /// Other references, sorted by address.
    pub other_refs: Vec<OtherRef>,
    /// The executable sections, in section order ([`FoundSite::section`]).
    pub sections: Vec<ScannedSection>,
    /// The symbols enclosing sites ([`FoundSite::function`]).
    pub functions: Vec<SiteFunction>,
}

impl SiteScan {
    /// The section of a site.
    pub fn section(&self, s: &FoundSite) -> &ScannedSection {
        &self.sections[s.section as usize]
    }

    /// The name of a site's section.
    pub fn section_name(&self, s: &FoundSite) -> &str {
        &self.section(s).name
    }

    /// The index of a site's section.
    pub fn section_index(&self, s: &FoundSite) -> SectionIndex {
        self.section(s).index
    }

    /// Section offset of a site's first byte.
    pub fn section_offset(&self, s: &FoundSite) -> u64 {
        s.addr - self.section(s).addr
    }

    /// `function+0xoff` of a site (displays demangled).
    pub fn location(&self, s: &FoundSite) -> Location<'_> {
        match self.functions.get(s.function as usize) {
            Some(f) => Location {
                function: Some(&f.name),
                offset: s.addr - f.addr,
                addr: s.addr,
            },
            None => Location {
                function: None,
                offset: 0,
                addr: s.addr,
            },
        }
    }
}

/// A relocation picked for decoding.
#[derive(Clone, Copy)]
struct Candidate {
    reloc_at: u64,
    target_addr: Option<u64>,
    target: u32,
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
    let mut functions = HashMap::new();
    for sec in img.exec_sections() {
        let section = u32::try_from(scan.sections.len()).context("too many sections")?;
        scan.sections.push(ScannedSection {
            index: sec.index(),
            name: sec.name().unwrap_or("?").to_string(),
            addr: sec.address(),
        });
        let (sites, refs) = (scan.sites.len(), scan.other_refs.len());
        let data = sec.data().unwrap_or(&[]);
        // Streaming first; if the functions come out of address order, the section
        // starts over, sorted.
        for sorted in [false, true] {
            let mut s = SectionScan {
                img,
                sec: &sec,
                section,
                data,
                scan: &mut scan,
                functions: &mut functions,
                last_function: (usize::MAX, NO_FUNCTION),
            };
            if s.run(select, sorted)? {
                break;
            }
            scan.sites.truncate(sites);
            scan.other_refs.truncate(refs);
        }
    }
    // In an object every section starts at 0: equal addresses in different sections
    // are different sites. (Sections are numbered in section-index order.) The sites
    // usually come sorted already; the sort is stable, so skipping it changes nothing.
    if !scan.sites.is_sorted_by_key(|s| (s.addr, s.section)) {
        scan.sites.sort_by_key(|s| (s.addr, s.section));
    }
    scan.sites.dedup_by_key(|s| (s.addr, s.section));
    scan.other_refs.sort_by_key(|r| r.addr);
    Ok(scan)
}

/// An address range over which [`Image::enclosing_span`] gives one answer.
#[derive(Clone, Copy)]
struct Span {
    lo: u64,
    hi: u64,
    sym: Option<usize>,
}

impl Span {
    const EMPTY: Span = Span {
        lo: 1,
        hi: 0,
        sym: None,
    };

    /// The symbol enclosing `addr` in `sec`, from the cached span when it covers `addr`.
    fn enclosing(&mut self, img: &Image<'_>, sec: SectionIndex, addr: u64) -> Option<usize> {
        if !(self.lo <= addr && addr < self.hi) {
            let (sym, hi) = img.enclosing_span(sec, addr);
            *self = Span { lo: addr, hi, sym };
        }
        self.sym
    }
}

/// The function whose relocations are being classified.
struct Group<'c> {
    /// Its start as the enclosing symbol gives it (unclamped): the grouping key.
    key: u64,
    cursor: FunctionCursor<'c>,
}

/// One executable section's pass.
struct SectionScan<'a, 'd, 's> {
    img: &'a Image<'d>,
    sec: &'a ElfSection64<'d, 's, LittleEndian>,
    section: u32,
    data: &'d [u8],
    scan: &'a mut SiteScan,
    /// Symbol index → index into `scan.functions`.
    functions: &'a mut HashMap<usize, u32>,
    /// The last entry of `functions` used (most sites are in the previous site's function).
    last_function: (usize, u32),
}

impl<'a, 'd, 's> SectionScan<'a, 'd, 's> {
    /// Classifies every selected relocation of the section. Streaming (`sorted` false),
    /// gives up (returns `false`) at the first relocation whose enclosing function
    /// starts before the previous one's; `sorted` collects the candidates and stably
    /// sorts them by function first (relocations keep their order within a function).
    fn run(&mut self, select: &dyn Fn(&Reloc) -> Option<Selected>, sorted: bool) -> Result<bool> {
        let img = self.img;
        let sec_index = self.sec.index();
        let sec_addr = self.sec.address();
        let mut starts = Span::EMPTY;
        let mut locations = Span::EMPTY;
        // Decoding failures, reported after the section's absolute and GOT references.
        let mut late: Vec<OtherRef> = Vec::new();
        let mut by_func: Vec<(u64, Candidate)> = Vec::new();
        let mut group: Option<Group<'d>> = None;
        for r in img.relocations(self.sec) {
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
                let name = img.target.reloc_name(r.r_type);
                let what = if got {
                    format!("reference through the GOT ({name})")
                } else {
                    format!("absolute address ({name})")
                };
                self.scan.other_refs.push(OtherRef {
                    addr: r.offset,
                    target,
                    section: self.section_name().to_string(),
                    what,
                    location: img.describe(sec_index, r.offset),
                });
                continue;
            }
            let key = starts
                .enclosing(img, sec_index, r.offset)
                .map_or(sec_addr, |i| img.sym(i).addr);
            let c = Candidate {
                reloc_at: r.offset,
                target_addr,
                target: u32::try_from(target).context("too many targets")?,
            };
            if sorted {
                by_func.push((key, c));
                continue;
            }
            match &group {
                Some(g) if g.key == key => {}
                Some(g) if key < g.key => return Ok(false),
                _ => group = Some(self.group(key)),
            }
            let g = group.as_mut().expect("set above");
            self.classify(g, &c, &mut locations, &mut late);
        }
        if sorted {
            by_func.sort_by_key(|(key, _)| *key);
            for run in by_func.chunk_by(|a, b| a.0 == b.0) {
                let mut g = self.group(run[0].0);
                for (_, c) in run {
                    self.classify(&mut g, c, &mut locations, &mut late);
                }
            }
        }
        self.scan.other_refs.append(&mut late);
        Ok(true)
    }

    fn section_name(&self) -> &str {
        &self.scan.sections[self.section as usize].name
    }

    /// A cursor over the function starting at `key`.
    fn group(&self, key: u64) -> Group<'d> {
        let sec_addr = self.sec.address();
        let data = self.data;
        let sec_end = sec_addr.saturating_add(data.len() as u64);
        // A malformed file can put a symbol outside its section: clamp to the section.
        let start = key.clamp(sec_addr, sec_end);
        let end = function_end(self.img, self.sec.index(), start, sec_end);
        let code = data
            .get((start - sec_addr) as usize..(end - sec_addr) as usize)
            .unwrap_or(&[]);
        Group {
            key,
            cursor: self.img.target.function_cursor(code, start),
        }
    }

    fn classify(
        &mut self,
        g: &mut Group<'_>,
        c: &Candidate,
        locations: &mut Span,
        late: &mut Vec<OtherRef>,
    ) {
        let img = self.img;
        let sec_index = self.sec.index();
        let SiteInsn {
            addr,
            len,
            kind,
            prefixes,
        } = match g.cursor.classify(c.reloc_at, c.target_addr) {
            Ok(site) => site,
            Err(what) => {
                late.push(OtherRef {
                    addr: c.reloc_at,
                    target: c.target as usize,
                    section: self.section_name().to_string(),
                    what,
                    location: img.describe(sec_index, c.reloc_at),
                });
                return;
            }
        };
        let function = match locations.enclosing(img, sec_index, addr) {
            None => NO_FUNCTION,
            Some(i) if self.last_function.0 == i => self.last_function.1,
            Some(i) => *self.functions.entry(i).or_insert_with(|| {
                let s = img.sym(i);
                self.scan.functions.push(SiteFunction {
                    name: s.name.clone(),
                    addr: s.addr,
                });
                // One per symbol: a symbol table of 2^32 entries would be a 96 GiB file.
                (self.scan.functions.len() - 1) as u32
            }),
        };
        if function != NO_FUNCTION {
            self.last_function = (locations.sym.unwrap_or(usize::MAX), function);
        }
        self.scan.sites.push(FoundSite {
            addr,
            target: c.target,
            section: self.section,
            function,
            len,
            kind,
            prefixes,
        });
    }
}

fn function_end(img: &Image<'_>, sec: SectionIndex, start: u64, sec_end: u64) -> u64 {
    let sized = img
        .enclosing_symbol(sec, start)
        .filter(|s| s.addr == start && s.size > 0)
        .map(|s| s.addr.saturating_add(s.size));
    let next = img.next_symbol_start(sec, start);
    sized.or(next).unwrap_or(sec_end).min(sec_end).max(start)
}
