//! The site finder: for every relocation in an executable section whose target is one of
//! a set of addresses, decode the instruction that holds it (decoding from the last
//! instruction boundary known, never guessing from the bytes before the relocation) and
//! classify it as a `call`/`jmp`/`jcc rel32` site or as some other reference.
//!
//! The boundaries known are the starts of symbols and of sections. A relocation inside a
//! function symbol is decoded from the function's first byte. One that no function
//! covers (code past a function's `st_size` such as a stripped static function or a
//! cold part, code in a section without symbols, asm without `.size`) is in a gap: it is
//! decoded linearly from the start of the last symbol at or before it (through that
//! symbol's end, the alignment padding after it, decoded like any other bytes, and
//! whatever follows), or from the section start, up to the next symbol: the regions
//! `objdump -d` decodes, so a gap's sites are the `call`/`jmp` lines `objdump -dr` shows
//! there, with the same limits (data inside code, or fill bytes that do not decode back
//! to the boundary they started on, put both out of step until the next symbol; a
//! relocation then met inside some other instruction is reported, never guessed from).
//!
//! Relocations are taken in file order and classified as they come, one function at a
//! time (an image can carry millions: nothing is collected per relocation). Where the
//! enclosing functions do not come in address order, the section is redone the general
//! way (every candidate collected, then stably sorted by function), which gives the same
//! result the streaming pass gives in the usual case.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use kernel_loader::format::SiteKind;
use object::read::elf::ElfSection64;
use object::{LittleEndian, ObjectSection, SectionIndex};

use crate::elf::{Image, Location, Reloc};
use crate::target::{FunctionCursor, RelocClass, SiteInsn};

/// Kept at its old path for `embed` (which will ask `img.target`).
pub use crate::target::x86_64::reloc_target;

/// How a site whose branch reaches its target only through a linker range-extension
/// veneer is reported (an [`OtherRef`]): format v1 cannot record it, so it stays on the
/// veneer and the trampoline.
pub const THROUGH_VENEER: &str = "not patched: through a veneer";

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

impl SiteScan {
    /// Moves the sites `img`'s target cannot patch (aarch64's conditional branches) to
    /// [`SiteScan::other_refs`]: they keep branching to the trampoline and are reported
    /// as `jcc`-class references, not patched. Nothing moves on x86-64.
    pub fn keep_patchable(&mut self, img: &Image<'_>) {
        let t = img.target;
        if self.sites.iter().all(|s| t.patches_site(s.kind)) {
            return;
        }
        let (keep, moved): (Vec<FoundSite>, Vec<FoundSite>) =
            self.sites.iter().partition(|s| t.patches_site(s.kind));
        for s in moved {
            let off = (s.addr.wrapping_sub(self.section(&s).addr)) as usize;
            let code = object::Object::section_by_index(&img.file, self.section_index(&s))
                .ok()
                .and_then(|sec| sec.data().ok())
                .and_then(|d| d.get(off..))
                .unwrap_or(&[]);
            self.other_refs.push(OtherRef {
                addr: s.addr,
                target: s.target as usize,
                section: self.section_name(&s).to_string(),
                what: format!(
                    "{} ({}-class branch: not patched)",
                    t.disasm(code, s.addr),
                    s.kind.name()
                ),
                location: self.location(&s).to_string(),
            });
        }
        self.sites = keep;
        self.other_refs.sort_by_key(|r| r.addr);
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

/// A relocation selector: must be callable from several threads at once (a section's
/// relocations are split between them).
pub type Select<'a> = dyn Fn(&Reloc) -> Option<Selected> + Sync + 'a;

/// Sections with at least this many relocations are split between the CPUs.
const SPLIT_AT: usize = 1 << 16;

/// The engine: every branch-class relocation (and, reported as other references, every
/// absolute or GOT one) in an executable section that `select` picks is decoded and classified.
pub fn find_sites_with(img: &Image<'_>, select: &Select<'_>) -> Result<SiteScan> {
    find_sites_checked(img, select, true)
}

/// [`find_sites_with`]; with `strict` false, a branch relocation on an instruction it
/// cannot fill ([`crate::target::Target::check_branch_reloc`]) is reported as an other
/// reference instead of refusing the file (`verify` and `inspect` on an image whose
/// code changed since it was linked).
pub fn find_sites_checked(img: &Image<'_>, select: &Select<'_>, strict: bool) -> Result<SiteScan> {
    let mut scan = SiteScan::default();
    let mut functions: HashMap<usize, u32> = HashMap::new();
    for sec in img.exec_sections() {
        let section = u32::try_from(scan.sections.len()).context("too many sections")?;
        scan.sections.push(ScannedSection {
            index: sec.index(),
            name: img.section_name(&sec).unwrap_or("?").to_string(),
            addr: sec.address(),
        });
        let mut ctx = SectionCtx::new(img, &sec, section, select);
        ctx.strict = strict;
        // Streaming first, in parts on several CPUs when the section is large; if the
        // functions come out of address order, the section starts over, sorted.
        let parts = match img.rela_tables(sec.index()) {
            Some(tables) => {
                let n: usize = tables.iter().map(|t| t.len()).sum();
                let k = if n >= SPLIT_AT {
                    // (Asked only here: finding the CPU count reads several files.)
                    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
                    cpus.min(n / 4096).max(1)
                } else {
                    1
                };
                let ranges: Vec<(usize, usize)> =
                    (0..k).map(|p| (n * p / k, n * (p + 1) / k)).collect();
                let part = |&(a, b): &(usize, usize)| {
                    let relocs = rela_range(&tables, a, b).map(|r| img.rela_reloc(r));
                    // At most one site per relocation: room for the section's sites in the
                    // first part (the others are appended to it) and for its own in each
                    // other, allocated once (untouched room costs address space only).
                    let room = if a == 0 { n } else { b - a };
                    ctx.pass(relocs, false, room)
                };
                if k == 1 {
                    vec![part(&ranges[0])]
                } else {
                    std::thread::scope(|sc| {
                        let handles: Vec<_> =
                            ranges.iter().map(|r| sc.spawn(move || part(r))).collect();
                        handles
                            .into_iter()
                            .map(|h| h.join().expect("site finder threads do not panic"))
                            .collect()
                    })
                }
            }
            None => vec![ctx.pass(img.relocations(&sec), false, 0)],
        };
        // Parts in order: an error is the first a single pass would meet (every part
        // before it went through its whole range); after a part that stopped out of
        // order, the sorted pass decides.
        let mut done = Vec::with_capacity(parts.len());
        let mut in_order = true;
        for p in parts {
            let p = p?;
            if !p.in_order {
                in_order = false;
                break;
            }
            done.push(p);
        }
        // Across parts too (parts with no candidate have no keys).
        let keys: Vec<(u64, u64)> = done
            .iter()
            .filter_map(|p| Some((p.first_key?, p.last_key?)))
            .collect();
        let in_order = in_order && keys.windows(2).all(|w| w[0].1 <= w[1].0);
        if in_order {
            scan.merge(done, &mut functions);
        } else {
            let sorted = match img.rela_tables(sec.index()) {
                Some(tables) => {
                    let n = tables.iter().map(|t| t.len()).sum();
                    let relocs = rela_range(&tables, 0, n).map(|r| img.rela_reloc(r));
                    ctx.pass(relocs, true, n)?
                }
                None => ctx.pass(img.relocations(&sec), true, 0)?,
            };
            scan.merge(vec![sorted], &mut functions);
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

/// Entries `a..b` of the concatenation of `tables`.
fn rela_range<'t, T>(tables: &'t [&'t [T]], a: usize, b: usize) -> impl Iterator<Item = &'t T> {
    let mut skip = a;
    let mut take = b - a;
    tables.iter().flat_map(move |t| {
        let from = skip.min(t.len());
        skip -= from;
        let n = take.min(t.len() - from);
        take -= n;
        &t[from..from + n]
    })
}

impl SiteScan {
    /// Appends a section's parts, in order: their sites (function indices made
    /// global), their absolute and GOT references, then their decoding failures (the
    /// order a single pass reports them in).
    fn merge(&mut self, parts: Vec<Part>, functions: &mut HashMap<usize, u32>) {
        let mut late = Vec::new();
        for mut p in parts {
            let global: Vec<u32> = p
                .functions
                .iter()
                .map(|(sym, f)| {
                    *functions.entry(*sym).or_insert_with(|| {
                        self.functions.push(f.clone());
                        // One per symbol: 2^32 symbols would be a 96 GiB symbol table.
                        (self.functions.len() - 1) as u32
                    })
                })
                .collect();
            for s in &mut p.sites {
                if let Some(&g) = global.get(s.function as usize) {
                    s.function = g;
                }
            }
            if self.sites.is_empty() {
                // The usual case (one section): take the part's vector, no copy.
                std::mem::swap(&mut self.sites, &mut p.sites);
            } else {
                self.sites.append(&mut p.sites);
            }
            self.other_refs.append(&mut p.refs);
            late.append(&mut p.late);
        }
        self.other_refs.append(&mut late);
    }
}

/// An address range over which [`Image::enclosing_span`] gives one answer.
#[derive(Clone, Copy)]
struct Span {
    lo: u64,
    hi: u64,
    sym: Option<usize>,
    /// Where decoding starts for the range ([`SectionCtx::decode_start`]), once known.
    start: Option<u64>,
    /// How many of the section's symbols start at or before the range.
    before: usize,
}

impl Span {
    const EMPTY: Span = Span {
        lo: 1,
        hi: 0,
        sym: None,
        start: None,
        before: 0,
    };

    /// The symbol enclosing `addr` in the section, from the cached span when it covers
    /// `addr`.
    fn enclosing(&mut self, ctx: &SectionCtx<'_, '_>, addr: u64) -> Option<usize> {
        if self.lo <= addr && addr < self.hi {
            return self.sym;
        }
        if let Some((sym, hi)) = ctx.next_function_span(self.before, addr) {
            // The usual case, read from the next two symbols.
            *self = Span {
                lo: addr,
                hi,
                sym: Some(sym),
                start: None,
                before: self.before + 1,
            };
            return self.sym;
        }
        let before = ctx.symbols_before(addr, self.before);
        *self = match ctx.gap_at(addr, before) {
            // No symbol encloses it: answered without [`Image::enclosing_span`]'s walk
            // back over every symbol before it (one per stripped function).
            Some(Gap { start, end }) => Span {
                lo: addr,
                hi: end,
                sym: None,
                start: Some(start),
                before,
            },
            None => {
                let (sym, hi) = ctx.img.enclosing_span(ctx.sec_index, addr);
                Span {
                    lo: addr,
                    hi,
                    sym,
                    start: None,
                    before,
                }
            }
        };
        self.sym
    }

    /// The instruction boundary decoding starts from for `addr`, from the cached span
    /// when it covers `addr`: see [`SectionCtx::decode_start`].
    fn decode_start(&mut self, ctx: &SectionCtx<'_, '_>, addr: u64) -> u64 {
        let sym = self.enclosing(ctx, addr);
        if let Some(start) = self.start {
            return start;
        }
        let start = ctx
            .decode_start_of(sym)
            .unwrap_or_else(|| ctx.decode_start(self.before));
        self.start = Some(start);
        start
    }
}

/// A range of a section that no symbol encloses.
struct Gap {
    /// Where decoding starts: the start of the last symbol before it, or the section's.
    start: u64,
    /// Where the next symbol starts (or the end of the address space).
    end: u64,
}

/// The number of leading indices of `0..n` for which `pred` holds (`pred` holds for a
/// prefix).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The function (or gap region) whose relocations are being classified.
struct Group<'c> {
    /// Where decoding starts ([`decode_start`], unclamped): the grouping key.
    key: u64,
    cursor: FunctionCursor<'c>,
}

/// What one executable section's pass needs.
struct SectionCtx<'a, 'd> {
    img: &'a Image<'d>,
    sec_index: SectionIndex,
    sec_addr: u64,
    sec_name: &'d str,
    /// Index into [`SiteScan::sections`].
    section: u32,
    data: &'d [u8],
    select: &'a Select<'a>,
    /// Whether a malformed branch relocation refuses the file (else it is reported).
    strict: bool,
    /// The [`Image::sym`] index of the section's first symbol, and how many it has.
    first: usize,
    count: usize,
    /// For each of the section's symbols in address order, the farthest end of it and
    /// of the symbols before it (`u64::MAX` once one has no size: such a symbol encloses
    /// everything after it, for [`Image::enclosing_span`]); built for the first gap.
    reach: OnceLock<Vec<u64>>,
}

/// What a pass over (part of) a section's relocations found.
#[derive(Default)]
struct Part {
    sites: Vec<FoundSite>,
    /// Absolute and GOT references.
    refs: Vec<OtherRef>,
    /// Decoding failures (reported after the section's absolute and GOT references).
    late: Vec<OtherRef>,
    /// The functions enclosing `sites` ([`FoundSite::function`] indexes this), with
    /// their symbol indices.
    functions: Vec<(usize, SiteFunction)>,
    /// The first and last candidates' function keys.
    first_key: Option<u64>,
    last_key: Option<u64>,
    /// Whether the functions came in address order (else the streaming pass stopped).
    in_order: bool,
}

/// The state of a pass.
struct Pass {
    part: Part,
    /// The enclosing function of relocations, and of sites.
    starts: Span,
    locations: Span,
    /// The last function used: (symbol index, index into `part.functions`).
    last_function: (usize, u32),
    /// Symbol index → index into `part.functions` (asked when the function changes).
    function_index: HashMap<usize, usize>,
}

impl<'a, 'd> SectionCtx<'a, 'd> {
    /// The context of `sec`, [`SiteScan::sections`] entry `section`.
    fn new(
        img: &'a Image<'d>,
        sec: &ElfSection64<'d, '_, LittleEndian>,
        section: u32,
        select: &'a Select<'a>,
    ) -> Self {
        let index = sec.index();
        let first = partition(img.defined_count(), |i| img.sym(i).section.0 < index.0);
        SectionCtx {
            img,
            sec_index: index,
            sec_addr: sec.address(),
            sec_name: img.section_name(sec).unwrap_or("?"),
            section,
            data: sec.data().unwrap_or(&[]),
            select,
            strict: true,
            first,
            count: partition(img.defined_count() - first, |k| {
                img.sym(first + k).section == index
            }),
            reach: OnceLock::new(),
        }
    }

    /// The start of the section's symbol `k` (in address order).
    fn sym_addr(&self, k: usize) -> u64 {
        self.img.sym(self.first + k).addr
    }

    /// How many of the section's symbols start at or before `addr`, walking on from
    /// `hint` (the answer for an earlier address: relocations come in address order) a
    /// few symbols before searching.
    fn symbols_before(&self, addr: u64, hint: usize) -> usize {
        let mut k = hint;
        if k <= self.count && (k == 0 || self.sym_addr(k - 1) <= addr) {
            for _ in 0..8 {
                if k == self.count || self.sym_addr(k) > addr {
                    return k;
                }
                k += 1;
            }
        }
        partition(self.count, |k| self.sym_addr(k) <= addr)
    }

    /// The gap `addr` is in, if no symbol encloses it ([`Image::enclosing_span`] would
    /// answer `None`); `before` symbols start at or before it.
    fn gap_at(&self, addr: u64, before: usize) -> Option<Gap> {
        if before
            .checked_sub(1)
            .is_some_and(|k| self.is_sized_function_at(k, addr))
        {
            // Inside a sized function: no gap.
            return None;
        }
        let reach = self.reach.get_or_init(|| {
            let mut far = 0u64;
            (self.first..self.first + self.count)
                .map(|i| {
                    let s = self.img.sym(i);
                    far = far.max(match s.size {
                        0 => u64::MAX,
                        size => s.addr.saturating_add(size),
                    });
                    far
                })
                .collect()
        });
        let end = match before < self.count {
            true => self.sym_addr(before),
            false => u64::MAX,
        };
        match before.checked_sub(1) {
            None => Some(Gap {
                start: self.sec_addr,
                end,
            }),
            Some(k) if reach[k] <= addr => Some(Gap {
                start: self.sym_addr(k),
                end,
            }),
            Some(_) => None,
        }
    }

    /// Where decoding starts for a relocation whose enclosing symbol
    /// ([`Image::enclosing_span`]) is `sym`, when it is a sized function (the usual
    /// case): its first byte (the function is decoded whole, whatever labels it holds).
    fn decode_start_of(&self, sym: Option<usize>) -> Option<u64> {
        let s = self.img.sym(sym?);
        (s.is_func && s.size > 0).then_some(s.addr)
    }

    /// Where decoding starts for a relocation no sized function encloses (a gap, or a
    /// function without a size, which ends where the next symbol starts), `before` of
    /// the section's symbols starting at or before it: the start of the last of them,
    /// else the section's start. The answer only changes at a symbol's start or end, so
    /// it holds for the whole span the enclosing symbol holds for.
    fn decode_start(&self, before: usize) -> u64 {
        match before.checked_sub(1) {
            Some(k) => self.sym_addr(k),
            None => self.sec_addr,
        }
    }

    /// [`Image::enclosing_span`]'s answer for `addr` when the section's symbol `k` is a
    /// sized function holding it and the last symbol starting at or before it: that
    /// function (its [`Image::sym`] index), until its end or the next symbol's start.
    fn next_function_span(&self, k: usize, addr: u64) -> Option<(usize, u64)> {
        if !self.is_sized_function_at(k, addr) {
            return None;
        }
        let next = match k + 1 < self.count {
            true => self.sym_addr(k + 1),
            false => u64::MAX,
        };
        let s = self.img.sym(self.first + k);
        (next > addr).then(|| (self.first + k, next.min(s.addr.saturating_add(s.size))))
    }

    /// Whether the section's symbol `k` is a sized function holding `addr`.
    fn is_sized_function_at(&self, k: usize, addr: u64) -> bool {
        k < self.count && {
            let s = self.img.sym(self.first + k);
            s.is_func && s.addr <= addr && addr < s.addr.saturating_add(s.size)
        }
    }

    /// `symbol+0xoff` for `addr`, as [`Image::describe`] words it, through `span` (so a
    /// gap costs no walk back over the symbols before it).
    fn describe(&self, span: &mut Span, addr: u64) -> String {
        let function = span.enclosing(self, addr).map(|i| self.img.sym(i));
        Location {
            function: function.map(|s| s.name.as_str()),
            offset: function.map_or(0, |s| addr - s.addr),
            addr,
        }
        .to_string()
    }

    /// Classifies every selected relocation of `relocs`. Streaming (`sorted` false),
    /// stops at the first relocation whose enclosing function starts before the
    /// previous one's (the part is then not `in_order`); `sorted` collects the
    /// candidates and stably sorts them by function first (relocations keep their order
    /// within a function).
    /// `room`: the sites to make room for up front.
    fn pass(
        &self,
        relocs: impl Iterator<Item = Result<Reloc>>,
        sorted: bool,
        room: usize,
    ) -> Result<Part> {
        let img = self.img;
        let mut p = Pass {
            part: Part {
                in_order: true,
                sites: Vec::with_capacity(room),
                ..Part::default()
            },
            starts: Span::EMPTY,
            locations: Span::EMPTY,
            last_function: (usize::MAX, NO_FUNCTION),
            function_index: HashMap::new(),
        };
        // The function being classified (kept in place: a cursor is large).
        let mut group: Option<Group<'d>> = None;
        let mut by_func: Vec<(u64, Candidate)> = Vec::new();
        for r in relocs {
            let r = r?;
            let class = img.target.reloc_class(r.r_type);
            let (abs, got) = (class == RelocClass::Absolute, class == RelocClass::Got);
            if class != RelocClass::Branch && !abs && !got {
                continue;
            }
            // Every branch relocation, selected or not: a malformed file is refused
            // (reported, when not strict).
            if class == RelocClass::Branch
                && let Err(why) =
                    img.target
                        .check_branch_reloc(r.r_type, self.code_at(r.offset), r.offset)
            {
                let what = format!(
                    "{} against `{}` {why}: the relocations do not describe the code",
                    img.target.reloc_name(r.r_type),
                    img.raw_symbol_name(r.sym_index)
                );
                let location = self.describe(&mut p.locations, r.offset);
                anyhow::ensure!(
                    !self.strict,
                    "{}: section {}+{:#x} ({location}): {what}",
                    img.path,
                    self.sec_name,
                    r.offset.wrapping_sub(self.sec_addr),
                );
                if let Some(sel) = (self.select)(&r) {
                    p.part.late.push(OtherRef {
                        addr: r.offset,
                        target: sel.target,
                        section: self.sec_name.to_string(),
                        what,
                        location,
                    });
                }
                continue;
            }
            let Some(Selected {
                target,
                target_addr,
            }) = (self.select)(&r)
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
                p.part.refs.push(OtherRef {
                    addr: r.offset,
                    target,
                    section: self.sec_name.to_string(),
                    what,
                    location: self.describe(&mut p.locations, r.offset),
                });
                continue;
            }
            let key = p.starts.decode_start(self, r.offset);
            let c = Candidate {
                reloc_at: r.offset,
                target_addr,
                target: u32::try_from(target).context("too many targets")?,
            };
            p.part.first_key.get_or_insert(key);
            p.part.last_key = Some(key);
            if sorted {
                by_func.push((key, c));
                continue;
            }
            let g = match &mut group {
                Some(g) if g.key == key => g,
                Some(g) if key < g.key => {
                    p.part.in_order = false;
                    return Ok(p.part);
                }
                _ => group.insert(self.group(key)),
            };
            self.classify(&mut p, g, &c);
        }
        if sorted {
            by_func.sort_by_key(|(key, _)| *key);
            for run in by_func.chunk_by(|a, b| a.0 == b.0) {
                let mut g = self.group(run[0].0);
                for (_, c) in run {
                    self.classify(&mut p, &mut g, c);
                }
            }
        }
        Ok(p.part)
    }

    /// A cursor over the code decoded from `key` ([`decode_start`]) to its
    /// [`region_end`].
    fn group(&self, key: u64) -> Group<'d> {
        let sec_addr = self.sec_addr;
        let data = self.data;
        let sec_end = sec_addr.saturating_add(data.len() as u64);
        // A malformed file can put a symbol outside its section: clamp to the section.
        let start = key.clamp(sec_addr, sec_end);
        let end = region_end(self.img, self.sec_index, start, sec_end);
        let code = data
            .get((start - sec_addr) as usize..(end - sec_addr) as usize)
            .unwrap_or(&[]);
        Group {
            key,
            cursor: self.img.target.function_cursor(code, start),
        }
    }

    /// The section's bytes from `at` on (empty if `at` is outside it).
    fn code_at(&self, at: u64) -> &'d [u8] {
        at.checked_sub(self.sec_addr)
            .and_then(|o| self.data.get(usize::try_from(o).ok()?..))
            .unwrap_or(&[])
    }

    /// The linker range-extension veneer the branch at `at` goes to instead of
    /// `target`, when that veneer goes to `target`: such a site is still a call of
    /// `target`, but format v1 cannot record it (the loader checks a site against a
    /// branch to the target itself), so it stays on the veneer and is reported.
    fn veneer(&self, at: u64, target: u64) -> Option<u64> {
        let t = self.img.target;
        let n = t.veneer_len();
        let code = self.code_at(at);
        let dest = t.decode_insn(code, at);
        if n == 0 || dest.kind.is_none() || dest.branch_target == target {
            return None;
        }
        let v = dest.branch_target;
        // A veneer at the end of its section may be shorter than the longest form.
        let bytes = (1..=n).rev().find_map(|k| self.img.read_va(v, k as u64))?;
        (t.veneer_target(bytes, v) == Some(target)).then_some(v)
    }

    fn classify(&self, p: &mut Pass, g: &mut Group<'_>, c: &Candidate) {
        let img = self.img;
        let SiteInsn {
            addr,
            len,
            kind,
            prefixes,
        } = match g.cursor.classify(c.reloc_at, c.target_addr) {
            Ok(site) => site,
            Err(what) => {
                let what = match c.target_addr.and_then(|t| self.veneer(c.reloc_at, t)) {
                    Some(v) => format!(
                        "{} to the linker veneer at {v:#x}: {THROUGH_VENEER}",
                        img.target.disasm(self.code_at(c.reloc_at), c.reloc_at)
                    ),
                    None => what,
                };
                p.part.late.push(OtherRef {
                    addr: c.reloc_at,
                    target: c.target as usize,
                    section: self.sec_name.to_string(),
                    what,
                    location: self.describe(&mut p.locations, c.reloc_at),
                });
                return;
            }
        };
        let function = match p.locations.enclosing(self, addr) {
            None => NO_FUNCTION,
            Some(i) if p.last_function.0 == i => p.last_function.1,
            Some(i) => {
                let functions = &mut p.part.functions;
                let f = *p.function_index.entry(i).or_insert_with(|| {
                    let s = img.sym(i);
                    functions.push((
                        i,
                        SiteFunction {
                            name: s.name.clone(),
                            addr: s.addr,
                        },
                    ));
                    functions.len() - 1
                });
                // One per symbol: 2^32 symbols would be a 96 GiB symbol table.
                p.last_function = (i, f as u32);
                f as u32
            }
        };
        p.part.sites.push(FoundSite {
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

/// The end of the code decoded from `start` (a [`decode_start`]): the next symbol's start
/// (or the section's end), so that the gap after a function is decoded on from the
/// function's instructions, and at least the end of the function starting there (sized
/// functions can contain other symbols: the function is decoded whole from its start).
fn region_end(img: &Image<'_>, sec: SectionIndex, start: u64, sec_end: u64) -> u64 {
    let sized = img
        .enclosing_symbol(sec, start)
        .filter(|s| s.addr == start && s.size > 0)
        .map_or(start, |s| s.addr.saturating_add(s.size));
    let next = img.next_symbol_start(sec, start).unwrap_or(sec_end);
    sized.max(next).min(sec_end).max(start)
}

#[cfg(test)]
mod tests;
