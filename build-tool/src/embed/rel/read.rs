//! Reading a module's ksites records: defined ifuncs (and their trampolines), imports,
//! `probe!` records, C probe declarations and C probe calls, each as a [`Target`].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::format::ProbeKind;
use kernel_loader::ifunc::{IMPORT_SECTION, RECORD_SECTION, RECORD_SIZE, record as ifunc_record};
use kernel_loader::probe::{
    DECL_SECTION, DECL_SIZE, PROBE_RECORD_MAGIC, RECORD_NARGS_NONE, SITE_RECORD_SECTION,
    SITE_RECORD_SIZE, decl, record as probe_record,
};
use object::elf;
use object::read::elf::SectionHeader as _;
use object::{
    LittleEndian as LE, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex, SymbolIndex, SymbolKind,
};

use super::layout::Target;
use crate::elf::{Image, Reloc};
use crate::probes::split_c_probe;
use crate::record_section::{
    self, Declared, IFUNC_RECORDS, PROBE_DECLS, PROBE_SITE_RECORDS, declare, probe_site_kind,
    u32_at, u64_at,
};
use crate::sites::{Selected, find_sites_with, reloc_target};

/// The relocations of one section, by offset: (type, symbol index, addend).
pub(super) struct RelocMap(HashMap<u64, (u32, usize, i64)>);

pub(super) struct Obj<'a, 'd> {
    pub(super) img: &'a Image<'d>,
    pub(super) path: &'a str,
    /// Relocation maps by section index, built once each.
    pub(super) reloc_cache: RefCell<HashMap<usize, Rc<RelocMap>>>,
}

impl<'d> Obj<'_, 'd> {
    /// The relocations applying to `sec`, by offset.
    pub(super) fn relocs(
        &self,
        sec: &object::read::elf::ElfSection64<'d, '_, LE>,
    ) -> Result<Rc<RelocMap>> {
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
            m.insert(off, (r_type.0, sym, r.addend()));
        }
        let m = Rc::new(RelocMap(m));
        self.reloc_cache
            .borrow_mut()
            .insert(sec.index().0, m.clone());
        Ok(m)
    }

    /// Where symbol `sym` + `addend` points.
    pub(super) fn target(
        &self,
        sym: usize,
        addend: i64,
        what: &dyn Fn() -> String,
    ) -> Result<Target> {
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

    /// The record-pointer field (64-bit absolute relocation) at `off` of a record
    /// section.
    pub(super) fn field(&self, relocs: &RelocMap, sec: &str, off: u64) -> Result<Target> {
        let what = || format!("{sec}+{off:#x}");
        let &(t, sym, addend) = relocs.0.get(&off).with_context(|| {
            format!(
                "{}: {}: no relocation for a pointer field",
                self.path,
                what()
            )
        })?;
        ensure!(
            t == self.img.target.abs64_reloc(),
            "{}: {}: relocation type {t}, expected {}",
            self.path,
            what(),
            self.img.target.reloc_name(self.img.target.abs64_reloc())
        );
        self.target(sym, addend, &what)
    }

    /// The contents of `sec`, with the section named in the error.
    pub(super) fn data_of(
        &self,
        sec: &object::read::elf::ElfSection64<'d, '_, LE>,
    ) -> Result<&'d [u8]> {
        sec.data().map_err(|e| {
            anyhow::anyhow!(
                "{}: {}: cannot read its contents: {e}",
                self.path,
                self.img.section_label(sec.index())
            )
        })
    }

    /// The section with index `sec`.
    fn section(&self, sec: usize) -> Result<object::read::elf::ElfSection64<'d, '_, LE>> {
        self.img
            .file
            .section_by_index(SectionIndex(sec))
            .with_context(|| format!("{}: bad section index {sec}", self.path))
    }

    pub(super) fn section_data(&self, sec: usize) -> Result<&'d [u8]> {
        self.data_of(&self.section(sec)?)
    }

    pub(super) fn bytes_at(&self, t: Target, len: u64, what: &str) -> Result<&'d [u8]> {
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

    pub(super) fn string(&self, t: Target, len: u64, what: &str) -> Result<String> {
        let b = self.bytes_at(t, len, what)?;
        Ok(std::str::from_utf8(b)
            .with_context(|| format!("{}: {what} is not UTF-8", self.path))?
            .to_string())
    }

    pub(super) fn is_exec(&self, sec: usize) -> bool {
        self.img
            .file
            .section_by_index(SectionIndex(sec))
            .map(|s| {
                let f = s.elf_section_header().sh_flags(LE).0;
                f & elf::SHF_EXECINSTR.0 != 0 && f & elf::SHF_ALLOC.0 != 0
            })
            .unwrap_or(false)
    }

    pub(super) fn describe(&self, t: Target) -> String {
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

/// A defined ifunc, as (section, offset) targets.
pub(super) struct DefIfunc {
    pub(super) name: String,
    pub(super) trampoline: Target,
    pub(super) slot: Target,
    pub(super) resolver: Target,
    pub(super) default: Target,
}

pub(super) fn read_defined_ifuncs(o: &Obj<'_, '_>) -> Result<Vec<DefIfunc>> {
    let mut out = Vec::new();
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(RECORD_SECTION) {
            continue;
        }
        let data = o.data_of(&sec)?;
        let relocs = o.relocs(&sec)?;
        // A zero word is padding unless a relocation fills the word after it.
        let padding = |off: usize| !relocs.0.contains_key(&(off as u64 + 8));
        for off in record_section::walk(o.path, &IFUNC_RECORDS, data, padding)? {
            let r = &data[off..off + RECORD_SIZE];
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
        }
    }
    Ok(out)
}

/// The trampoline must be the indirect jump through its slot
/// ([`crate::target::Target::trampoline_text`]), with a rel32 relocation reaching the slot.
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
    let arch = o.img.target;
    let b = o.bytes_at(f.trampoline, arch.trampoline_len() as u64, "trampoline")?;
    let relocs = o.relocs(&o.section(sec)?)?;
    let reaches = relocs
        .0
        .get(&(off + arch.trampoline_slot_field()))
        .is_some_and(|&(t, sym, addend)| {
            arch.is_trampoline_slot_reloc(t)
                && o.target(sym, addend.wrapping_add(arch.branch_bias()), &String::new)
                    .ok()
                    == Some(f.slot)
        });
    ensure!(
        // In the object the slot field is 0 (the relocation fills it): only the form counts.
        arch.is_trampoline_form(b) && reaches,
        "{}: ifunc {}: trampoline at {} is not {} to its slot {}",
        o.path,
        f.name,
        o.describe(f.trampoline),
        arch.trampoline_text(None),
        o.describe(f.slot)
    );
    Ok(())
}

/// Imported ifuncs: (symbol index, name), sorted by name, distinct.
pub(super) fn read_imports(o: &Obj<'_, '_>) -> Result<Vec<(usize, String)>> {
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
                        r_type: elf::RelocationType(o.img.target.abs64_reloc())
                    }),
                "{}: {IMPORT_SECTION}+{off:#x}: expected an {} relocation",
                o.path,
                o.img.target.reloc_name(o.img.target.abs64_reloc())
            );
            let s = o.img.file.symbol_by_index(i).with_context(|| {
                format!(
                    "{}: {IMPORT_SECTION}+{off:#x}: relocation names symbol {}, past the end \
                     of the symbol table",
                    o.path, i.0
                )
            })?;
            let name = s
                .name()
                .with_context(|| {
                    format!(
                        "{}: {IMPORT_SECTION}+{off:#x}: symbol {} has no name",
                        o.path, i.0
                    )
                })?
                .to_string();
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
pub(super) fn rel32_target(r: &Reloc) -> Option<Target> {
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
pub(super) struct PendingProbe {
    pub(super) site: Target,
    /// A C probe call whose rewrite spans more than the site (riscv64): its section
    /// offset and length ([`crate::target::Target::c_probe_rewrite`]).
    pub(super) call: Option<(u64, u8)>,
    pub(super) target: Option<Target>,
    pub(super) kind: ProbeKind,
    pub(super) key: (String, String),
    pub(super) record: Option<Target>,
}

/// Everything found, before numbering.
pub(super) struct ProbeFind {
    pub(super) pending: Vec<PendingProbe>,
    pub(super) nargs: Declared,
}

pub(super) fn find_probes_rel(o: &Obj<'_, '_>) -> Result<ProbeFind> {
    let mut pending = Vec::new();
    let mut nargs = Declared::new();
    let path = o.path;

    // 1. `probe!` / `probe_enabled!` records.
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(SITE_RECORD_SECTION) {
            continue;
        }
        let data = o.data_of(&sec)?;
        let relocs = o.relocs(&sec)?;
        for off in record_section::walk(path, &PROBE_SITE_RECORDS, data, |_| true)? {
            let r = &data[off..off + SITE_RECORD_SIZE];
            let kind = probe_site_kind(path, off, r)?;
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
            let rrelocs = o.relocs(&o.section(rsec)?)?;
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
            let bytes = o.bytes_at(site, o.img.target.probe_site_len() as u64, "probe site")?;
            ensure!(
                bytes == o.img.target.probe_nop(),
                "{path}: probe site {} ({provider}:{name}) holds {bytes:02x?}, expected the {}-byte NOP",
                o.describe(site),
                o.img.target.probe_site_len()
            );
            if let Target::Sec { off: soff, .. } = site
                && let Some(why) = o.img.target.probe_site_misaligned(soff)
            {
                bail!(
                    "{path}: probe site {} ({provider}:{name}) {why}",
                    o.describe(site)
                );
            }
            let n = u32_at(rb, 4);
            let key = (provider, name);
            declare(
                &mut nargs,
                path,
                &key,
                (n != RECORD_NARGS_NONE).then_some(n),
            )?;
            pending.push(PendingProbe {
                site,
                call: None,
                target: Some(target),
                kind,
                key,
                record: Some(rec),
            });
        }
    }

    // 2. C declarations.
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(DECL_SECTION) {
            continue;
        }
        let data = o.data_of(&sec)?;
        let relocs = o.relocs(&sec)?;
        // A zero word is padding unless a relocation fills the word after it.
        let padding = |off: usize| !relocs.0.contains_key(&(off as u64 + 8));
        for off in record_section::walk(path, &PROBE_DECLS, data, padding)? {
            let r = &data[off..off + DECL_SIZE];
            let n = u32_at(r, decl::NARGS);
            let f = |field: usize| o.field(&relocs, DECL_SECTION, (off + field) as u64);
            let prov = o.string(
                f(decl::PROVIDER)?,
                u64_at(r, decl::PROVIDER_LEN),
                "provider",
            )?;
            let name = o.string(f(decl::NAME)?, u64_at(r, decl::NAME_LEN), "name")?;
            ensure!(
                n <= 6,
                "{path}: C probe {prov}:{name} declares {n} arguments (at most 6)"
            );
            declare(&mut nargs, path, &(prov, name), Some(n))?;
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
            let c = &c_syms[s.target as usize];
            let kind = crate::probes::c_site_kind(&scan, s, c.0, &c.3, o.img.target)
                .with_context(|| path.to_string())?;
            let key = (c.1.clone(), c.2.clone());
            nargs.entry(key.clone()).or_insert(None);
            let call = scan.section_offset(s);
            // The site's offset in the call when the rewrite spans more (the section is
            // then aligned so offsets keep their alignment: `write_object`).
            let (off, call) = match o.img.target.c_probe_rewrite(kind, call, s.len, None) {
                None => (call, None),
                Some(Ok(r)) => (r.site, Some((call, s.len))),
                Some(Err(why)) => bail!(
                    "{path}: section {}+{call:#x} in {}: {} to probe function {}: {why}",
                    scan.section_name(s),
                    scan.location(s),
                    s.kind.name(),
                    c.3
                ),
            };
            pending.push(PendingProbe {
                site: Target::Sec {
                    sec: scan.section_index(s).0,
                    off,
                },
                call,
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
                a != b || x + o.img.target.probe_site_len() as u64 <= y,
                "{path}: probe sites at {} and {} overlap",
                o.describe(w[0].site),
                o.describe(w[1].site)
            );
        }
    }
    Ok(ProbeFind { pending, nargs })
}
