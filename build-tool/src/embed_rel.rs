//! `ksites embed` on relocatable objects (ET_REL kernel modules).
//!
//! The output is the input object plus two sections:
//!
//! * `.ksites` (`SHT_PROGBITS`, flags `SHF_ALLOC` only, alignment 8): a v1 table
//!   ([`kernel_loader::format`]) whose self-relative `i32` fields are **0 in the file**;
//! * `.rela.ksites` (`SHT_RELA`, `SHF_INFO_LINK`, `sh_link` = `.symtab`, `sh_info` =
//!   `.ksites`): one `R_X86_64_PC32` per self-relative field. A target at offset `off`
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
//! their relocation becomes `R_X86_64_NONE`, except a C is-enabled tail call
//! (`jmp __dtraceenabled_*`), whose disabled form `jmp ksites_probe_ret0` keeps a
//! `R_X86_64_PLT32` relocation, retargeted to the (undefined) symbol
//! `ksites_probe_ret0`, addend -4. Each `probe!` record gets its probe id in section
//! data. Nothing else changes: sections, symbols and relocations keep their contents
//! (symbol indices may change when a section symbol is added; relocations, group
//! signatures and `.llvm_addrsig` follow).
//!
//! # Layout contract
//!
//! The module loader places `SHF_ALLOC` sections in three groups, each starting on a
//! page boundary: executable (`SHF_EXECINSTR`), then read-only, then writable
//! (`SHF_WRITE`, `SHT_NOBITS` included). **Within a group, sections are placed in
//! section-header-index order**, each at its own alignment. Addresses within executable
//! code therefore increase with (section index, offset), and every sorted list of the
//! table — ifunc sites, probe sites, defined ifunc descriptors by trampoline — is sorted
//! by (section index, offset). [`kernel_loader::format::Table::parse`] checks the order,
//! so a loader that breaks the contract gets an error at load time, never a silently
//! wrong table.
//!
//! To find sites with the same engine as for linked images, the object is "virtually
//! linked" at a layout that follows the contract ([`VirtualLayout`]), and the
//! addresses are mapped back to (section, offset) or symbol when the relocations are
//! written.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::rc::Rc;

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::arch::x86_64::{JMP_RIP_INDIRECT, NOP5, TRAMPOLINE_LEN};
use kernel_loader::format::{NARGS_UNKNOWN, ProbeKind, SECTION_NAME, Table};
use kernel_loader::ifunc::{
    IMPORT_SECTION, RECORD_MAGIC, RECORD_SECTION, RECORD_SIZE, RECORD_VERSION,
    record as ifunc_record,
};
use kernel_loader::probe::{
    C_ENABLED_OFF, C_TAIL_OFF, PROBE_RECORD_MAGIC, RECORD_NARGS_NONE, SITE_RECORD_MAGIC,
    SITE_RECORD_SECTION, SITE_RECORD_SIZE, STUB_SYMBOLS, record as probe_record,
};
use object::build::Id as _;
use object::build::elf::{Builder, Relocation as BRel, SectionData, SectionId, SymbolId};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{
    LittleEndian as LE, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex, SymbolIndex, SymbolKind,
};

use crate::elf::{Image, Reloc};
use crate::embed::{AlreadyEmbedded, EmbedReport};
use crate::probes::{DECL_MAGIC, DECL_SECTION, FoundProbeSite, ProbeScan, split_c_probe};
use crate::records::IfuncInfo;
use crate::sites::{Selected, SiteScan, find_sites_with, reloc_target};
use crate::table::{IfuncEntry, ProbeEntry, ProbeSiteEntry, SiteEntry, TableInput, build_with};

/// `.rela.ksites`.
pub const RELA_SECTION_NAME: &str = ".rela.ksites";
/// `sh_type` of `.llvm_addrsig`.
const SHT_LLVM_ADDRSIG: u32 = 0x6fff_4c03;
const PAGE: u64 = 0x1000;

/// Where a relocated field of an object points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Offset `off` in the section with index `sec`.
    Sec {
        /// Section index.
        sec: usize,
        /// Offset in it.
        off: u64,
    },
    /// An undefined symbol (index in `.symtab`) plus an addend.
    Undef {
        /// Symbol index.
        sym: usize,
        /// Addend.
        addend: i64,
    },
}

/// Addresses for an object's sections that follow the layout contract (see the module
/// documentation), with every undefined symbol at a distinct address in a region after
/// them (16 bytes apart), and the executable ranges (text, plus the undefined region,
/// standing in for the kernel's text).
#[derive(Clone, Debug)]
pub struct VirtualLayout {
    /// Address of each section by index (`None`: not allocated).
    pub sections: Vec<Option<u64>>,
    /// Address of each undefined symbol by symbol index.
    pub undefined: HashMap<usize, u64>,
    /// Executable ranges: the executable sections and the undefined region.
    pub exec: Vec<Range<u64>>,
}

impl VirtualLayout {
    /// Lays out `file` at `base` (page-aligned); `None` if the sections do not fit in
    /// the address space (a malformed file).
    pub fn new(file: &ElfFile64<'_, LE>, base: u64) -> Option<VirtualLayout> {
        let align_up = |x: u64, a: u64| x.checked_next_multiple_of(a.max(1));
        let n = file.elf_section_table().len();
        let mut sections = vec![None; n];
        let mut exec = Vec::new();
        let mut addr = base;
        for group in 0..3 {
            addr = align_up(addr, PAGE)?;
            for (i, s) in file.elf_section_table().iter().enumerate() {
                let f = s.sh_flags(LE);
                if f & u64::from(elf::SHF_ALLOC) == 0 {
                    continue;
                }
                let g = if f & u64::from(elf::SHF_EXECINSTR) != 0 {
                    0
                } else if f & u64::from(elf::SHF_WRITE) != 0 || s.sh_type(LE) == elf::SHT_NOBITS {
                    2
                } else {
                    1
                };
                if g != group {
                    continue;
                }
                addr = align_up(addr, s.sh_addralign(LE))?;
                sections[i] = Some(addr);
                let end = addr.checked_add(s.sh_size(LE))?;
                if g == 0 && end > addr {
                    exec.push(addr..end);
                }
                addr = end;
            }
        }
        let undef_base = align_up(addr, PAGE)?.checked_add(PAGE)?;
        let mut undefined = HashMap::new();
        for s in file.symbols() {
            if s.is_undefined() && s.index().0 != 0 {
                let a = undef_base.checked_add(16 * undefined.len() as u64)?;
                undefined.insert(s.index().0, a);
            }
        }
        if !undefined.is_empty() {
            exec.push(undef_base..undef_base.checked_add(16 * undefined.len() as u64)?);
        }
        exec.sort_by_key(|r| r.start);
        Some(VirtualLayout {
            sections,
            undefined,
            exec,
        })
    }

    /// The address of `t`.
    pub fn addr(&self, t: Target) -> Option<u64> {
        match t {
            Target::Sec { sec, off } => Some(self.sections.get(sec).copied()??.checked_add(off)?),
            Target::Undef { sym, addend } => self.undefined.get(&sym)?.checked_add_signed(addend),
        }
    }
}

/// The relocations of one section, by offset: (type, symbol index, addend).
struct RelocMap(HashMap<u64, (u32, usize, i64)>);

struct Obj<'a, 'd> {
    img: &'a Image<'d>,
    path: &'a str,
    /// Relocation maps by section index, built once each.
    reloc_cache: RefCell<HashMap<usize, Rc<RelocMap>>>,
}

impl<'d> Obj<'_, 'd> {
    /// The relocations applying to `sec`, by offset.
    fn relocs(&self, sec: &object::read::elf::ElfSection64<'d, '_, LE>) -> Result<Rc<RelocMap>> {
        if let Some(m) = self.reloc_cache.borrow().get(&sec.index().0) {
            return Ok(m.clone());
        }
        let mut m = HashMap::new();
        for (off, r) in sec.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            let sym = match r.target() {
                RelocationTarget::Symbol(i) => i.0,
                _ => 0,
            };
            m.insert(off, (r_type, sym, r.addend()));
        }
        let m = Rc::new(RelocMap(m));
        self.reloc_cache
            .borrow_mut()
            .insert(sec.index().0, m.clone());
        Ok(m)
    }

    /// Where symbol `sym` + `addend` points.
    fn target(&self, sym: usize, addend: i64, what: &dyn Fn() -> String) -> Result<Target> {
        let s = self
            .img
            .file
            .symbol_by_index(SymbolIndex(sym))
            .with_context(|| format!("{}: {}: bad symbol index {sym}", self.path, what()))?;
        if s.elf_symbol().st_type() == elf::STT_GNU_IFUNC {
            bail!(
                "{}: {}: GNU ifunc symbol {} (STT_GNU_IFUNC is not supported in modules; use ifunc!)",
                self.path,
                what(),
                s.name().unwrap_or("?")
            );
        }
        if s.is_undefined() {
            return Ok(Target::Undef { sym, addend });
        }
        let Some(si) = s.section_index() else {
            bail!(
                "{}: {}: symbol {} is absolute or common, not in a section",
                self.path,
                what(),
                s.name().unwrap_or("?")
            );
        };
        let base = if s.kind() == SymbolKind::Section {
            0
        } else {
            s.address()
        };
        let off = base.checked_add_signed(addend).with_context(|| {
            format!(
                "{}: {}: negative offset in section {}",
                self.path,
                what(),
                si.0
            )
        })?;
        Ok(Target::Sec { sec: si.0, off })
    }

    /// The `R_X86_64_64` field at `off` of a record section.
    fn field(&self, relocs: &RelocMap, sec: &str, off: u64) -> Result<Target> {
        let what = || format!("{sec}+{off:#x}");
        let &(t, sym, addend) = relocs.0.get(&off).with_context(|| {
            format!(
                "{}: {}: no relocation for a pointer field",
                self.path,
                what()
            )
        })?;
        ensure!(
            t == elf::R_X86_64_64,
            "{}: {}: relocation type {t}, expected R_X86_64_64",
            self.path,
            what()
        );
        self.target(sym, addend, &what)
    }

    fn section_data(&self, sec: usize) -> Result<&'d [u8]> {
        let s = self
            .img
            .file
            .section_by_index(SectionIndex(sec))
            .with_context(|| format!("{}: bad section index {sec}", self.path))?;
        s.data()
            .with_context(|| format!("{}: cannot read section {sec}", self.path))
    }

    fn bytes_at(&self, t: Target, len: u64, what: &str) -> Result<&'d [u8]> {
        let Target::Sec { sec, off } = t else {
            bail!("{}: {what} points at an undefined symbol", self.path);
        };
        let d = self.section_data(sec)?;
        d.get(off as usize..)
            .and_then(|d| d.get(..len as usize))
            .with_context(|| {
                format!(
                    "{}: {what} at section {sec}+{off:#x} ({len} bytes) is outside its section",
                    self.path
                )
            })
    }

    fn string(&self, t: Target, len: u64, what: &str) -> Result<String> {
        let b = self.bytes_at(t, len, what)?;
        Ok(std::str::from_utf8(b)
            .with_context(|| format!("{}: {what} is not UTF-8", self.path))?
            .to_string())
    }

    fn is_exec(&self, sec: usize) -> bool {
        self.img
            .file
            .section_by_index(SectionIndex(sec))
            .map(|s| {
                let f = s.elf_section_header().sh_flags(LE);
                f & u64::from(elf::SHF_EXECINSTR) != 0 && f & u64::from(elf::SHF_ALLOC) != 0
            })
            .unwrap_or(false)
    }

    fn describe(&self, t: Target) -> String {
        match t {
            Target::Sec { sec, off } => {
                let name = self
                    .img
                    .file
                    .section_by_index(SectionIndex(sec))
                    .ok()
                    .and_then(|s| s.name().ok().map(str::to_string))
                    .unwrap_or_default();
                format!(
                    "{name}+{off:#x} ({})",
                    self.img.describe(SectionIndex(sec), off)
                )
            }
            Target::Undef { sym, addend } => {
                format!("{}{addend:+}", self.img.symbol_name(sym))
            }
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A defined ifunc, as (section, offset) targets.
struct DefIfunc {
    name: String,
    trampoline: Target,
    slot: Target,
    resolver: Target,
    default: Target,
}

fn read_defined_ifuncs(o: &Obj<'_, '_>) -> Result<Vec<DefIfunc>> {
    let mut out = Vec::new();
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(RECORD_SECTION) {
            continue;
        }
        let data = sec.data()?;
        let relocs = o.relocs(&sec)?;
        let mut off = 0usize;
        while off < data.len() {
            if data.len() - off >= 8
                && u64_at(data, off) == 0
                && !relocs.0.contains_key(&(off as u64 + 8))
            {
                off += 8;
                continue;
            }
            ensure!(
                data.len() - off >= RECORD_SIZE,
                "{}: {RECORD_SECTION}+{off:#x}: truncated ifunc record",
                o.path
            );
            let r = &data[off..off + RECORD_SIZE];
            ensure!(
                u32_at(r, 0) == RECORD_MAGIC && u32_at(r, 4) == RECORD_VERSION,
                "{}: {RECORD_SECTION}+{off:#x}: bad ifunc record magic or version",
                o.path
            );
            let f = |field: usize| o.field(&relocs, RECORD_SECTION, (off + field) as u64);
            let name_t = f(ifunc_record::NAME_PTR)?;
            let name_len = u64_at(r, ifunc_record::NAME_LEN);
            let name = o.string(name_t, name_len, "ifunc name")?;
            let d = DefIfunc {
                trampoline: f(ifunc_record::TRAMPOLINE)?,
                slot: f(ifunc_record::SLOT)?,
                resolver: f(ifunc_record::RESOLVER)?,
                default: f(ifunc_record::DEFAULT)?,
                name,
            };
            check_trampoline(o, &d)?;
            out.push(d);
            off += RECORD_SIZE;
        }
    }
    Ok(out)
}

/// The trampoline must be `jmp [rip+slot]`: `ff 25` and a PC32 relocation reaching the
/// slot.
fn check_trampoline(o: &Obj<'_, '_>, f: &DefIfunc) -> Result<()> {
    let Target::Sec { sec, off } = f.trampoline else {
        bail!(
            "{}: ifunc {}: its trampoline is an undefined symbol",
            o.path,
            f.name
        );
    };
    ensure!(
        o.is_exec(sec),
        "{}: ifunc {}: trampoline {} is not in an executable section",
        o.path,
        f.name,
        o.describe(f.trampoline)
    );
    let b = o.bytes_at(f.trampoline, TRAMPOLINE_LEN as u64, "trampoline")?;
    let s = o.img.file.section_by_index(SectionIndex(sec))?;
    let relocs = o.relocs(&s)?;
    let reaches = relocs.0.get(&(off + 2)).is_some_and(|&(t, sym, addend)| {
        matches!(t, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32)
            && o.target(sym, addend.wrapping_add(4), &String::new).ok() == Some(f.slot)
    });
    ensure!(
        b[..2] == JMP_RIP_INDIRECT && reaches,
        "{}: ifunc {}: trampoline at {} is not `jmp [rip+slot]` to its slot {}",
        o.path,
        f.name,
        o.describe(f.trampoline),
        o.describe(f.slot)
    );
    Ok(())
}

/// Imported ifuncs: (symbol index, name), sorted by name, distinct.
fn read_imports(o: &Obj<'_, '_>) -> Result<Vec<(usize, String)>> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(IMPORT_SECTION) {
            continue;
        }
        for (off, r) in sec.relocations() {
            let RelocationTarget::Symbol(i) = r.target() else {
                bail!(
                    "{}: {IMPORT_SECTION}+{off:#x}: relocation without a symbol",
                    o.path
                );
            };
            ensure!(
                r.flags()
                    == (RelocationFlags::Elf {
                        r_type: elf::R_X86_64_64
                    }),
                "{}: {IMPORT_SECTION}+{off:#x}: expected an R_X86_64_64 relocation",
                o.path
            );
            let s = o.img.file.symbol_by_index(i)?;
            let name = s.name()?.to_string();
            ensure!(
                s.is_undefined(),
                "{}: {name} is declared as an imported ifunc (ifunc_import!/KSITES_IFUNC_IMPORT) \
                 but the object defines it",
                o.path
            );
            ensure!(
                r.addend() == 0,
                "{}: {IMPORT_SECTION}+{off:#x}: import of {name} has addend {}",
                o.path,
                r.addend()
            );
            out.insert(name, i.0);
        }
    }
    Ok(out.into_iter().map(|(n, i)| (i, n)).collect())
}

/// What a relocation in text points at, as the engine sees it (`S + A + 4` for a
/// rel32 at the end of its instruction).
fn rel32_target(r: &Reloc) -> Option<Target> {
    match r.sym_section {
        None => {
            if r.sym_is_section {
                return None;
            }
            let a = reloc_target(&Reloc { sym_value: 0, ..*r }) as i64;
            Some(Target::Undef {
                sym: r.sym_index,
                addend: a,
            })
        }
        Some(si) => {
            let base = if r.sym_is_section { 0 } else { r.sym_value };
            let off = reloc_target(&Reloc {
                sym_value: base,
                ..*r
            });
            Some(Target::Sec { sec: si.0, off })
        }
    }
}

/// A probe site found in the object.
struct PendingProbe {
    site: Target,
    target: Option<Target>,
    kind: ProbeKind,
    key: (String, String),
    record: Option<Target>,
}

/// Everything found, before numbering.
struct ProbeFind {
    pending: Vec<PendingProbe>,
    nargs: BTreeMap<(String, String), Option<u32>>,
}

fn find_probes_rel(o: &Obj<'_, '_>) -> Result<ProbeFind> {
    let mut pending = Vec::new();
    let mut nargs: BTreeMap<(String, String), Option<u32>> = BTreeMap::new();
    let path = o.path;
    let mut declare = |key: &(String, String), n: Option<u32>| -> Result<()> {
        let e = nargs.entry(key.clone()).or_insert(None);
        match (*e, n) {
            (Some(a), Some(b)) if a != b => bail!(
                "{path}: probe {}:{} is declared with {a} and with {b} arguments",
                key.0,
                key.1
            ),
            (None, Some(b)) => *e = Some(b),
            _ => {}
        }
        Ok(())
    };

    // 1. `probe!` / `probe_enabled!` records.
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(SITE_RECORD_SECTION) {
            continue;
        }
        let data = sec.data()?;
        let relocs = o.relocs(&sec)?;
        let mut off = 0usize;
        while off < data.len() {
            if data.len() - off >= 8 && u64_at(data, off) == 0 {
                off += 8;
                continue;
            }
            ensure!(
                data.len() - off >= SITE_RECORD_SIZE,
                "{path}: {SITE_RECORD_SECTION}+{off:#x}: truncated probe site record"
            );
            let r = &data[off..off + SITE_RECORD_SIZE];
            ensure!(
                u32_at(r, 0) == SITE_RECORD_MAGIC,
                "{path}: {SITE_RECORD_SECTION}+{off:#x}: bad probe site record magic"
            );
            let kind = match u32_at(r, 4) {
                0 => ProbeKind::RustJmp,
                1 => ProbeKind::RustEnabled,
                k => bail!("{path}: {SITE_RECORD_SECTION}+{off:#x}: unknown probe site kind {k}"),
            };
            let f = |field: usize| o.field(&relocs, SITE_RECORD_SECTION, (off + field) as u64);
            let (site, target, rec) = (f(8)?, f(16)?, f(24)?);
            for (t, what) in [(site, "probe site"), (target, "out-of-line target")] {
                let ok = matches!(t, Target::Sec { sec, .. } if o.is_exec(sec));
                ensure!(
                    ok,
                    "{path}: {SITE_RECORD_SECTION}+{off:#x}: {what} {} is not in an executable section",
                    o.describe(t)
                );
            }
            let rb = o.bytes_at(rec, probe_record::SIZE as u64, "probe record")?;
            ensure!(
                u32_at(rb, 0) == PROBE_RECORD_MAGIC,
                "{path}: probe record at {} has bad magic (kernel-loader version mismatch?)",
                o.describe(rec)
            );
            let Target::Sec {
                sec: rsec,
                off: roff,
            } = rec
            else {
                unreachable!("bytes_at checked it")
            };
            let rrelocs = o.relocs(&o.img.file.section_by_index(SectionIndex(rsec))?)?;
            let rf = |field: usize| o.field(&rrelocs, "probe record", roff + field as u64);
            let provider = o.string(
                rf(probe_record::PROVIDER)?,
                u64_at(rb, probe_record::PROVIDER_LEN),
                "probe provider",
            )?;
            let name = o.string(
                rf(probe_record::NAME)?,
                u64_at(rb, probe_record::NAME_LEN),
                "probe name",
            )?;
            let bytes = o.bytes_at(site, 5, "probe site")?;
            ensure!(
                bytes == NOP5,
                "{path}: probe site {} ({provider}:{name}) holds {bytes:02x?}, expected the 5-byte NOP",
                o.describe(site)
            );
            let n = u32_at(rb, 4);
            let key = (provider, name);
            declare(&key, (n != RECORD_NARGS_NONE).then_some(n))?;
            pending.push(PendingProbe {
                site,
                target: Some(target),
                kind,
                key,
                record: Some(rec),
            });
            off += SITE_RECORD_SIZE;
        }
    }

    // 2. C declarations.
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(DECL_SECTION) {
            continue;
        }
        let data = sec.data()?;
        let relocs = o.relocs(&sec)?;
        let mut off = 0usize;
        while off + 40 <= data.len() {
            if u64_at(data, off) == 0 {
                off += 8;
                continue;
            }
            let r = &data[off..off + 40];
            ensure!(
                u32_at(r, 0) == DECL_MAGIC,
                "{path}: {DECL_SECTION}+{off:#x}: bad magic"
            );
            let n = u32_at(r, 4);
            let f = |field: usize| o.field(&relocs, DECL_SECTION, (off + field) as u64);
            let prov = o.string(f(8)?, u64_at(r, 16), "provider")?;
            let name = o.string(f(24)?, u64_at(r, 32), "name")?;
            ensure!(
                n <= 6,
                "{path}: C probe {prov}:{name} declares {n} arguments (at most 6)"
            );
            declare(&(prov, name), Some(n))?;
            off += 40;
        }
    }

    // 3. C probe calls: relocations against `__dtrace_probe_*` / `__dtraceenabled_*`
    // symbols (defined weak in the object, or undefined).
    let mut c_syms: Vec<(bool, String, String, String)> = Vec::new();
    let mut by_sym: HashMap<usize, usize> = HashMap::new();
    for s in o.img.file.symbols() {
        let Ok(n) = s.name() else { continue };
        if s.kind() == SymbolKind::Section {
            continue;
        }
        if let Some((enabled, prov, name)) = split_c_probe(n) {
            by_sym.insert(s.index().0, c_syms.len());
            c_syms.push((enabled, prov.to_string(), name.to_string(), n.to_string()));
        }
    }
    if !by_sym.is_empty() {
        let scan = find_sites_with(o.img, &|r: &Reloc| {
            if r.sym_is_section {
                return None;
            }
            by_sym.get(&r.sym_index).map(|&target| Selected {
                target,
                target_addr: None,
            })
        })?;
        if let Some(r) = scan.other_refs.first() {
            bail!(
                "{path}: {} at {}+{:#x} in {} references probe function {}: not a call this tool \
                 can rewrite safely",
                r.what,
                r.section,
                r.addr,
                r.location,
                c_syms[r.target].3
            );
        }
        for s in &scan.sites {
            let c = &c_syms[s.target];
            let kind =
                crate::probes::c_site_kind(s, c.0, &c.3).with_context(|| path.to_string())?;
            let key = (c.1.clone(), c.2.clone());
            nargs.entry(key.clone()).or_insert(None);
            pending.push(PendingProbe {
                site: Target::Sec {
                    sec: s.section_index.0,
                    off: s.section_offset,
                },
                target: None,
                kind,
                key,
                record: None,
            });
        }
    }
    pending.sort_by_key(|p| p.site);
    for w in pending.windows(2) {
        if let (Target::Sec { sec: a, off: x }, Target::Sec { sec: b, off: y }) =
            (w[0].site, w[1].site)
        {
            ensure!(
                a != b || x + 5 <= y,
                "{path}: probe sites at {} and {} overlap",
                o.describe(w[0].site),
                o.describe(w[1].site)
            );
        }
    }
    Ok(ProbeFind { pending, nargs })
}

/// Embeds into an ET_REL object; returns the new file contents. See the module
/// documentation for what the output holds.
pub fn embed_rel(path: &str, data: &[u8]) -> Result<(Vec<u8>, EmbedReport)> {
    let img = Image::parse(path, data)?;
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
    let layout = VirtualLayout::new(&img.file, PAGE)
        .with_context(|| format!("{path}: allocated sections do not fit the address space"))?;
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
    scan.sites
        .sort_by_key(|s| (s.section_index.0, s.section_offset));
    let mut site_entries = Vec::new();
    for s in &scan.sites {
        site_entries.push(SiteEntry {
            addr: va(Target::Sec {
                sec: s.section_index.0,
                off: s.section_offset,
            })?,
            kind: s.kind,
            prefixes: s.prefixes,
            ifunc: s.target as u32,
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
    let mut rewrites: Vec<(Target, ProbeKind)> = Vec::new();
    for p in &pf.pending {
        let id = index[&p.key];
        if let Some(rec) = p.record {
            record_ids.insert((rec, id));
        }
        if !p.kind.is_rust() {
            rewrites.push((p.site, p.kind));
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

    // The table, with a relocation per self-relative field.
    let input = TableInput {
        ifuncs: entries,
        sites: site_entries,
        probes: probes.probes.clone(),
        probe_sites: probes.sites.clone(),
    };
    let mut table_relocs: Vec<(u64, Target)> = Vec::new();
    let table = build_with(&input, &mut |field, target| {
        if target != 0 {
            table_relocs.push((field as u64, *back.get(&target)?));
        }
        Some(0)
    })?;

    let out = write_object(path, data, &table, &table_relocs, &record_ids, &rewrites)?;
    verify_output(path, &out, &input)?;
    Ok((
        out,
        EmbedReport {
            ifuncs,
            scan,
            probes,
            table: Some((0, table.len())),
            relocatable: true,
        },
    ))
}

/// Applies every change to a [`Builder`] of the input and writes it.
fn write_object(
    path: &str,
    data: &[u8],
    table: &[u8],
    table_relocs: &[(u64, Target)],
    record_ids: &BTreeSet<(Target, u32)>,
    rewrites: &[(Target, ProbeKind)],
) -> Result<Vec<u8>> {
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
            .map_or(b.sections.get(id).sh_type, |&(_, t)| t)
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
        .filter(|s| orig_type(s.id()) == elf::SHT_GROUP)
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
        patches
            .entry(sec)
            .or_default()
            .push((off as usize + probe_record::ID, id.to_le_bytes().to_vec()));
    }
    // C probe sites by section: offset of the rel32 -> kind.
    let mut c_sites: BTreeMap<usize, HashMap<u64, ProbeKind>> = BTreeMap::new();
    for &(site, kind) in rewrites {
        let Target::Sec { sec, off } = site else {
            bail!("{path}: probe site is not in a section")
        };
        let bytes: [u8; 5] = match kind {
            ProbeKind::CCall => NOP5,
            ProbeKind::CTail => C_TAIL_OFF,
            ProbeKind::CEnabled => C_ENABLED_OFF,
            // `jmp ksites_probe_ret0`: the rel32 comes from the retargeted relocation.
            ProbeKind::CEnabledTail => [0xe9, 0, 0, 0, 0],
            ProbeKind::RustJmp | ProbeKind::RustEnabled => continue,
        };
        patches
            .entry(sec)
            .or_default()
            .push((off as usize, bytes.to_vec()));
        c_sites.entry(sec).or_default().insert(off + 1, kind);
    }
    for (sec, list) in patches {
        let s = b.sections.get_mut(sec_id(sec)?);
        let SectionData::Data(d) = &mut s.data else {
            bail!("{path}: section {sec} (probe sites or records) has no file data");
        };
        let v = d.to_mut();
        for (at, bytes) in list {
            v.get_mut(at..at + bytes.len())
                .with_context(|| {
                    format!("{path}: patch at section {sec}+{at:#x} is past the section end")
                })?
                .copy_from_slice(&bytes);
        }
    }

    // Their relocations: R_X86_64_NONE, or for a C is-enabled tail call a PLT32 to
    // `ksites_probe_ret0` - 4 (an undefined symbol, added if the object lacks it).
    let needs_ret0 = rewrites.iter().any(|&(_, k)| k == ProbeKind::CEnabledTail);
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
                s.st_info = (elf::STB_GLOBAL << 4) | elf::STT_NOTYPE;
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
                if !matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32) {
                    continue;
                }
                let Some(&kind) = sites.get(&r.r_offset) else {
                    continue;
                };
                *seen.entry(r.r_offset).or_default() += 1;
                match (kind, ret0) {
                    (ProbeKind::CEnabledTail, Some(id)) => {
                        r.symbol = Some(id);
                        r.r_type = elf::R_X86_64_PLT32;
                        r.r_addend = -4;
                    }
                    _ => r.r_type = elf::R_X86_64_NONE,
                }
            }
        }
        for off in sites.keys() {
            let n = seen.get(off).copied().unwrap_or(0);
            ensure!(
                n == 1,
                "{path}: probe site at section {sec}+{:#x}: expected one rel32 relocation, found {n}",
                off - 1
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
    let mut rels: Vec<BRel> = Vec::new();
    for &(field, t) in table_relocs {
        let (symbol, addend) = match t {
            Target::Sec { sec, off } => {
                let id = sec_id(sec)?;
                let sym = match sec_syms.get(&id.index()) {
                    Some(&s) => s,
                    None => {
                        let s = b.symbols.add();
                        s.section = Some(id);
                        s.st_info = (elf::STB_LOCAL << 4) | elf::STT_SECTION;
                        let sid = s.id();
                        sec_syms.insert(id.index(), sid);
                        sid
                    }
                };
                (sym, i64::try_from(off)?)
            }
            Target::Undef { sym, addend } => (sym_id(sym)?, addend),
        };
        rels.push(BRel {
            r_offset: field,
            symbol: Some(symbol),
            r_type: elf::R_X86_64_PC32,
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
    let symtab = b
        .sections
        .iter()
        .find(|s| matches!(s.data, SectionData::Symbol))
        .map(|s| s.id())
        .with_context(|| format!("{path}: the object has no .symtab"))?;
    let ks = b.sections.add();
    ks.name = SECTION_NAME.as_bytes().to_vec().into();
    ks.sh_type = elf::SHT_PROGBITS;
    ks.sh_flags = u64::from(elf::SHF_ALLOC);
    ks.sh_addralign = 8;
    ks.data = SectionData::Data(table.to_vec().into());
    let ks_id = ks.id();
    let rs = b.sections.add();
    rs.name = RELA_SECTION_NAME.as_bytes().to_vec().into();
    rs.sh_type = elf::SHT_RELA;
    rs.sh_flags = u64::from(elf::SHF_INFO_LINK);
    rs.sh_addralign = 8;
    rs.sh_entsize = 24;
    rs.sh_link_section = Some(symtab);
    rs.sh_info_section = Some(ks_id);
    rs.data = SectionData::Relocation(rels);

    let mut out = Vec::new();
    b.write(&mut out)
        .map_err(|e| anyhow::anyhow!("{path}: cannot write the object: {e}"))?;
    set_section_types(&mut out, &disguised)?;
    Ok(out)
}

/// Section types `object::build::elf::Builder` reads as what they are.
fn builder_models(t: u32) -> bool {
    matches!(
        t,
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
        let t = s.sh_type(LE);
        if builder_models(t) || t == elf::SHT_NOBITS {
            continue;
        }
        let at = shoff + i * size_of::<elf::SectionHeader64<LE>>() + 4;
        out.get_mut(at..at + 4)
            .with_context(|| format!("{path}: section header {i} out of bounds"))?
            .copy_from_slice(&elf::SHT_PROGBITS.to_le_bytes());
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

/// Re-reads the output: applies `.rela.ksites` at a layout that follows the contract
/// and checks that the loader's reader accepts the table with the expected counts.
fn verify_output(path: &str, out: &[u8], input: &TableInput) -> Result<()> {
    let file = ElfFile64::<LE>::parse(out).context("re-reading the output")?;
    let layout = VirtualLayout::new(&file, PAGE)
        .with_context(|| format!("{path}: allocated sections do not fit the address space"))?;
    let (bytes, addr) = relocated_table(&file, &layout)
        .map_err(|e| anyhow::anyhow!("{path}: written table: {e}"))?;
    let t = Table::parse(&bytes, addr, &layout.exec)
        .map_err(|e| anyhow::anyhow!("{path}: written table does not validate: {e}"))?;
    ensure!(
        t.ifunc_count() as usize == input.ifuncs.len()
            && t.site_count() as usize == input.sites.len()
            && t.probe_count() as usize == input.probes.len()
            && t.probe_site_count() as usize == input.probe_sites.len(),
        "{path}: written table lost entries"
    );
    Ok(())
}

/// The `.ksites` section of an embedded object with `.rela.ksites` applied at
/// `layout`, and its address.
pub fn relocated_table(file: &ElfFile64<'_, LE>, layout: &VirtualLayout) -> Result<(Vec<u8>, u64)> {
    let sec = file
        .section_by_name(SECTION_NAME)
        .context("no .ksites section")?;
    let addr = layout
        .sections
        .get(sec.index().0)
        .copied()
        .flatten()
        .context(".ksites is not allocated")?;
    let mut bytes = sec.data()?.to_vec();
    for (off, r) in sec.relocations() {
        ensure!(
            r.flags()
                == (RelocationFlags::Elf {
                    r_type: elf::R_X86_64_PC32
                }),
            ".rela.ksites+{off:#x}: not R_X86_64_PC32"
        );
        let RelocationTarget::Symbol(i) = r.target() else {
            bail!(".rela.ksites: relocation without a symbol");
        };
        let s = file.symbol_by_index(i)?;
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
        let v = i64::try_from(i128::from(sv) + i128::from(r.addend()) - i128::from(p))?;
        let v = i32::try_from(v).context("PC32 overflow")?;
        bytes
            .get_mut(off as usize..off as usize + 4)
            .context("relocation past the table")?
            .copy_from_slice(&v.to_le_bytes());
    }
    Ok((bytes, addr))
}
