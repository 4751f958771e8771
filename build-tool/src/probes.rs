//! Probe discovery: `probe!`/`probe_enabled!` site records, and dtrace-style C probe
//! calls (`call`/`jmp __dtrace_probe_<provider>___<name>` and
//! `__dtraceenabled_<provider>___<name>`), which are rewritten into their disabled form.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::format::{NARGS_UNKNOWN, PSite, ProbeKind, SiteKind};
use kernel_loader::probe::{
    DECL_SECTION, DECL_SIZE, PROBE_RECORD_MAGIC, RECORD_NARGS_NONE, SITE_RECORD_SECTION,
    SITE_RECORD_SIZE, STUB_SYMBOLS, Stubs, decl, record,
};
use object::read::elf::Sym as _;
use object::{LittleEndian, Object, ObjectSection, ObjectSymbol, SectionIndex, SymbolKind};

use crate::elf::{Image, RawRela, Reloc, demangle};
use crate::record_section::{
    self, Declared, PROBE_DECLS, PROBE_SITE_RECORDS, Relative, declare, probe_site_kind, u32_at,
    u64_at,
};
use crate::sites::{Selected, find_sites_with};
use crate::table::{ProbeEntry, ProbeSiteEntry};
use crate::target::{ProbeBytes, RelocClass};

/// Prefix of C probe functions.
pub const C_PROBE_PREFIX: &str = "__dtrace_probe_";
/// Prefix of C is-enabled functions.
pub const C_ENABLED_PREFIX: &str = "__dtraceenabled_";

/// One probe site found, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundProbeSite {
    /// Address.
    pub addr: u64,
    /// Kind.
    pub kind: ProbeKind,
    /// Probe index.
    pub probe: u32,
    /// `function+0xoff`.
    pub location: String,
}

/// Everything the probe scan produces.
#[derive(Clone, Debug, Default)]
pub struct ProbeScan {
    /// Probes, sorted by provider then name (their index is their id).
    pub probes: Vec<ProbeEntry>,
    /// Sites for the table.
    pub sites: Vec<ProbeSiteEntry>,
    /// Sites with locations, sorted by address.
    pub found: Vec<FoundProbeSite>,
    /// `probe!` records whose id field must be set: (record address, id).
    pub record_ids: Vec<(u64, u32)>,
    /// C call sites to rewrite into their disabled form: (address, bytes).
    pub rewrites: Vec<(u64, ProbeBytes)>,
}

fn read_str(img: &Image<'_>, ptr: u64, len: u64, what: &str) -> Result<String> {
    let b = img
        .read_va(ptr, len)
        .with_context(|| format!("{}: {what} string at {ptr:#x} is not in the file", img.path))?;
    Ok(std::str::from_utf8(b)
        .with_context(|| format!("{}: {what} at {ptr:#x} is not UTF-8", img.path))?
        .to_string())
}

/// Splits `__dtrace_probe_net___rx` into ("net", "rx").
pub fn split_c_probe(sym: &str) -> Option<(bool, &str, &str)> {
    let (enabled, rest) = if let Some(r) = sym.strip_prefix(C_PROBE_PREFIX) {
        (false, r)
    } else {
        (true, sym.strip_prefix(C_ENABLED_PREFIX)?)
    };
    let (prov, name) = rest.split_once("___")?;
    if prov.is_empty() || name.is_empty() {
        return None;
    }
    Some((enabled, prov, name))
}

struct Pending {
    addr: u64,
    /// A C probe call whose rewrite spans more than the site
    /// ([`crate::target::Target::c_probe_rewrite`]): its first byte and length.
    call: Option<(u64, u8)>,
    target: u64,
    kind: ProbeKind,
    key: (String, String),
    rec: Option<u64>,
}

/// Finds every probe site in a linked image.
pub fn find_probes(img: &Image<'_>) -> Result<ProbeScan> {
    let mut pending: Vec<Pending> = Vec::new();
    // (provider, name) -> declared nargs
    let mut nargs = Declared::new();

    // Pointers in records, read through their RELATIVE relocations in a PIE.
    let rel = Relative::of(img);

    // 1. `probe!` / `probe_enabled!` records.
    if let Some(sec) = img.section_by_name(SITE_RECORD_SECTION) {
        let data = sec
            .data()
            .with_context(|| format!("{}: cannot read section {SITE_RECORD_SECTION}", img.path))?;
        let data = &*rel.apply(sec.address(), data);
        for off in record_section::walk(&img.path, &PROBE_SITE_RECORDS, data, |_| true)? {
            let r = &data[off..off + SITE_RECORD_SIZE];
            let kind = probe_site_kind(&img.path, off, r)?;
            let (site, target, rec) = (u64_at(r, 8), u64_at(r, 16), u64_at(r, 24));
            let rb = rel
                .read_va(img, rec, record::SIZE as u64)
                .with_context(|| {
                    format!("{}: probe record at {rec:#x} is not in the file", img.path)
                })?;
            let rb = &*rb;
            ensure!(
                u32_at(rb, 0) == PROBE_RECORD_MAGIC,
                "{}: probe record at {rec:#x} has bad magic (kernel-loader version mismatch?)",
                img.path
            );
            let n = u32_at(rb, 4);
            let provider = read_str(
                img,
                u64_at(rb, record::PROVIDER),
                u64_at(rb, record::PROVIDER_LEN),
                "provider",
            )?;
            let name = read_str(
                img,
                u64_at(rb, record::NAME),
                u64_at(rb, record::NAME_LEN),
                "name",
            )?;
            let bytes = img
                .read_va(site, img.target.probe_site_len() as u64)
                .with_context(|| {
                    format!("{}: probe site {site:#x} is not in the file", img.path)
                })?;
            ensure!(
                bytes == img.target.probe_nop(),
                "{}: probe site {site:#x} ({provider}:{name}) holds {bytes:02x?}, expected the {}-byte NOP",
                img.path,
                img.target.probe_site_len()
            );
            if let Some(why) = img.target.probe_site_misaligned(site) {
                bail!("{}: probe site ({provider}:{name}) {why}", img.path);
            }
            let key = (provider, name);
            declare(
                &mut nargs,
                &img.path,
                &key,
                (n != RECORD_NARGS_NONE).then_some(n),
            )?;
            pending.push(Pending {
                addr: site,
                call: None,
                target,
                kind,
                key,
                rec: Some(rec),
            });
        }
    }

    // 2. C declarations (argument counts).
    if let Some(sec) = img.section_by_name(DECL_SECTION) {
        let data = sec
            .data()
            .with_context(|| format!("{}: cannot read section {DECL_SECTION}", img.path))?;
        let data = &*rel.apply(sec.address(), data);
        for off in record_section::walk(&img.path, &PROBE_DECLS, data, |_| true)? {
            let r = &data[off..off + DECL_SIZE];
            let n = u32_at(r, decl::NARGS);
            let prov = read_str(
                img,
                u64_at(r, decl::PROVIDER),
                u64_at(r, decl::PROVIDER_LEN),
                "provider",
            )?;
            let name = read_str(
                img,
                u64_at(r, decl::NAME),
                u64_at(r, decl::NAME_LEN),
                "name",
            )?;
            ensure!(
                n <= 6,
                "{}: C probe {prov}:{name} declares {n} arguments (at most 6)",
                img.path
            );
            declare(&mut nargs, &img.path, &(prov, name), Some(n))?;
        }
    }

    // 3. C probe calls, found like ifunc sites: relocations to the probe functions.
    let funcs = ProbeFunctions::read(img)?;
    if !funcs.is_empty() {
        ensure!(
            img.has_text_relocations(),
            "{}: has {} probe function symbols (e.g. `{}`) but no relocation sections; \
             link with --emit-relocs",
            img.path,
            funcs.funcs.len(),
            funcs.funcs[0].symbol
        );
        let scan = find_sites_with(img, &|r: &Reloc| funcs.select(img, r))?;
        if let Some(r) = scan.other_refs.first() {
            bail!(
                "{}: {} at {:#x} in {} references probe function {}: not a call this tool can \
                 rewrite safely",
                img.path,
                r.what,
                r.addr,
                r.location,
                funcs.funcs[r.target].symbol
            );
        }
        let mut recorded = HashSet::new();
        for s in &scan.sites {
            let f = &funcs.funcs[s.target as usize];
            // The site's bytes change: code decoded from a symbol inside them would read
            // differently before and after (and `verify` would disagree with `embed`).
            let end = s.addr.saturating_add(u64::from(s.len));
            if let Some(inside) = img
                .next_symbol_start(scan.section_index(s), s.addr)
                .filter(|&a| a < end)
            {
                let name = img
                    .symbol_at(scan.section_index(s), inside)
                    .map_or("?", |y| &y.name);
                bail!(
                    "{}: symbol `{}` at {inside:#x} starts inside the call to probe function {} \
                     at {:#x} ({}): the symbols and the code disagree",
                    img.path,
                    demangle(name),
                    f.symbol,
                    s.addr,
                    scan.location(s)
                );
            }
            let kind = c_site_kind(&scan, s, f.enabled, &f.symbol, img.target)
                .with_context(|| img.path.to_string())?;
            let key = (f.provider.clone(), f.name.clone());
            nargs.entry(key.clone()).or_insert(None);
            // Where the site is in the call, when the rewrite spans more than the site.
            let (addr, call) = match img.target.c_probe_rewrite(kind, s.addr, s.len, None) {
                None => (s.addr, None),
                Some(Ok(r)) => (r.site, Some((s.addr, s.len))),
                Some(Err(why)) => bail!(
                    "{}: section {}+{:#x} in {}: {} to probe function {}: {why}",
                    img.path,
                    scan.section_name(s),
                    scan.section_offset(s),
                    scan.location(s),
                    s.kind.name(),
                    f.symbol
                ),
            };
            recorded.insert(addr);
            pending.push(Pending {
                addr,
                call,
                target: 0,
                kind,
                key,
                rec: None,
            });
        }
        funcs.check_all_recorded(img, &recorded)?;
    }

    // 4. Number the probes (sorted by provider, name) and build the outputs.
    let stubs = image_stubs(img);
    let mut scan = ProbeScan::default();
    let mut index: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (i, (key, n)) in nargs.iter().enumerate() {
        index.insert(key.clone(), i as u32);
        scan.probes.push(ProbeEntry {
            provider: key.0.clone(),
            name: key.1.clone(),
            nargs: n.map_or(NARGS_UNKNOWN, |n| n as u16),
        });
    }
    pending.sort_by_key(|p| p.addr);
    for w in pending.windows(2) {
        ensure!(
            w[0].addr + img.target.probe_site_len() as u64 <= w[1].addr,
            "{}: probe sites at {:#x} and {:#x} overlap",
            img.path,
            w[0].addr,
            w[1].addr
        );
    }
    for p in pending {
        let id = index[&p.key];
        if let Some(rec) = p.rec {
            scan.record_ids.push((rec, id));
        }
        if p.call.is_some() && img.target.probe_stub_reloc(p.kind).is_some() && stubs.ret0 == 0 {
            bail!(
                "{}: C is-enabled tail call at {:#x} needs kernel-loader's `{}` in the image",
                img.path,
                p.addr,
                STUB_SYMBOLS[1]
            );
        }
        let whole = p.call.and_then(|(call, len)| {
            img.target
                .c_probe_rewrite(p.kind, call, len, Some(&stubs))
                .map(|r| (call, r))
        });
        let is_whole = whole.is_some();
        if let Some((call, r)) = whole {
            let r = r.map_err(|why| {
                anyhow::anyhow!(
                    "{}: C probe {}:{} called at {call:#x}: {why}",
                    img.path,
                    p.key.0,
                    p.key.1
                )
            })?;
            scan.rewrites.push((call, r.bytes));
        }
        let disabled = match p.kind {
            _ if is_whole => None,
            ProbeKind::RustJmp | ProbeKind::RustEnabled => None,
            ProbeKind::CCall => Some(img.target.probe_nop()),
            ProbeKind::CTail | ProbeKind::CEnabled | ProbeKind::CEnabledTail => {
                let site = PSite {
                    index: 0,
                    addr: p.addr,
                    target: 0,
                    kind: p.kind,
                    probe: id,
                };
                if img.target.probe_stub_reloc(p.kind).is_some() && stubs.ret0 == 0 {
                    bail!(
                        "{}: C is-enabled tail call at {:#x} needs kernel-loader's `{}` in the image",
                        img.path,
                        p.addr,
                        STUB_SYMBOLS[1]
                    );
                }
                Some(img.target.disabled_probe(&site, &stubs).map_err(|e| {
                    // Where the site is, and the probe, for the message.
                    let at = ExecCode::new(img)
                        .section(p.addr)
                        .map(|(start, _, sec)| {
                            let name = object::Object::section_by_index(&img.file, sec)
                                .ok()
                                .and_then(|s| img.section_name(&s))
                                .unwrap_or("?");
                            format!(
                                "section {name}+{:#x} in {}",
                                p.addr - start,
                                img.describe(sec, p.addr)
                            )
                        })
                        .unwrap_or_default();
                    anyhow::anyhow!("{}: {e} ({at}, probe {}:{})", img.path, p.key.0, p.key.1)
                })?)
            }
        };
        if let Some(b) = disabled {
            scan.rewrites.push((p.addr, b));
        }
        let location = img
            .file
            .sections()
            .find(|s| s.address() <= p.addr && p.addr < s.address().saturating_add(s.size()))
            .map(|s| img.describe(s.index(), p.addr))
            .unwrap_or_default();
        scan.found.push(FoundProbeSite {
            addr: p.addr,
            kind: p.kind,
            probe: id,
            location,
        });
        scan.sites.push(ProbeSiteEntry {
            addr: p.addr,
            target: p.target,
            kind: p.kind,
            probe: id,
        });
    }
    scan.record_ids.sort();
    scan.record_ids.dedup();
    Ok(scan)
}

/// The image's probe entry points (0 for any it lacks).
pub fn image_stubs(img: &Image<'_>) -> Stubs {
    let addr = |name: &str| img.symbol(name).map_or(0, |s| s.addr);
    Stubs {
        c_entry: addr(STUB_SYMBOLS[0]),
        ret0: addr(STUB_SYMBOLS[1]),
        ret1: addr(STUB_SYMBOLS[2]),
    }
}

/// Probe site addresses of an image `embed` already processed: the `probe!` records'
/// sites, and, for C probes, the instruction before each relocation against a probe
/// function (only plain 5-byte `call`/`jmp` were accepted, so it starts one byte
/// before the relocation; its bytes are the rewritten form now).
pub fn find_probes_in_embedded(img: &Image<'_>) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    if let Some(sec) = img.section_by_name(SITE_RECORD_SECTION) {
        let data = sec
            .data()
            .with_context(|| format!("{}: cannot read section {SITE_RECORD_SECTION}", img.path))?;
        let data = &*Relative::of(img).apply(sec.address(), data);
        for off in record_section::walk(&img.path, &PROBE_SITE_RECORDS, data, |_| true)? {
            out.push(u64_at(data, off + 8));
        }
    }
    // Raw RELA entries: `embed` turned these relocations into NONE ones, which the
    // object crate's relocation iterator does not attribute to their symbol. The same
    // test as `embed`'s ([`ProbeFunctions::reference`]).
    let funcs = ProbeFunctions::read(img)?;
    if !funcs.is_empty() {
        let exec = ExecCode::new(img);
        for r in img.raw_relas() {
            if funcs.reference(img, &exec, &r).is_some()
                && matches!(
                    img.target.reloc_class(r.r_type),
                    RelocClass::Branch | RelocClass::None
                )
                && let Some(site) = img.target.c_probe_site_of_reloc(r.offset)
            {
                out.push(site);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The kind of a C probe site (a call or jump to `__dtrace_probe_*`, or to
/// `__dtraceenabled_*` when `is_enabled`), or why it cannot be rewritten: only the forms
/// [`crate::target::Target::c_probe_call_ok`] accepts can (images and modules alike; a
/// plain 5-byte `call`/`jmp` on x86-64).
pub(crate) fn c_site_kind(
    scan: &crate::sites::SiteScan,
    s: &crate::sites::FoundSite,
    is_enabled: bool,
    func: &str,
    target: crate::target::Target,
) -> Result<ProbeKind> {
    if s.kind == SiteKind::Jcc || !target.c_probe_call_ok(s.len, s.prefixes) {
        bail!(
            "section {}+{:#x} in {}: {} to probe function {func} is {} bytes{}; only {} can be \
             rewritten safely",
            scan.section_name(s),
            scan.section_offset(s),
            scan.location(s),
            s.kind.name(),
            s.len,
            if s.prefixes != 0 && target == crate::target::Target::X86_64 {
                " with prefixes"
            } else {
                ""
            },
            target.c_probe_call_forms()
        );
    }
    Ok(match (is_enabled, s.kind) {
        (false, SiteKind::Call) => ProbeKind::CCall,
        (false, _) => ProbeKind::CTail,
        (true, SiteKind::Call) => ProbeKind::CEnabled,
        (true, _) => ProbeKind::CEnabledTail,
    })
}

/// [`ProbeFunctions`]' mark of a symbol that names no probe function.
const NOT_PROBE: u32 = u32::MAX;

/// One C probe function (a name; several symbols may carry it).
#[derive(Clone, Debug)]
pub struct ProbeFunction {
    /// `__dtraceenabled_*` (an is-enabled check) rather than `__dtrace_probe_*`.
    pub enabled: bool,
    /// Provider.
    pub provider: String,
    /// Probe name.
    pub name: String,
    /// The symbol's name.
    pub symbol: String,
}

/// The C probe functions of an image: every symbol named `__dtrace_probe_*` or
/// `__dtraceenabled_*`, whatever its type (`STT_FUNC`, an assembly stub's `STT_NOTYPE`,
/// `STT_OBJECT`, …), binding or section. A relocation refers to one when it names such
/// a symbol, or when (in executable code) it reaches the address of a defined one; the
/// site finder (`embed`) and [`find_probes_in_embedded`] (`verify`) use the same test.
#[derive(Debug, Default)]
pub struct ProbeFunctions {
    /// One per name, sorted by name.
    pub funcs: Vec<ProbeFunction>,
    /// Symbol index → index into `funcs` ([`NOT_PROBE`]: not a probe symbol).
    by_sym: Vec<u32>,
    /// Address of a defined probe symbol → index into `funcs`.
    by_addr: AddrMap,
    /// The value of every probe symbol, defined or not (a hostile file may leave a
    /// real address in an undefined one) → index into `funcs`: where no call may go
    /// unless its relocation says so.
    all_addrs: AddrMap,
}

/// Addresses → probe index, sorted: a lookup (one per relocation, most of them nowhere
/// near a probe function) is a range check, then halving.
#[derive(Debug, Default)]
struct AddrMap(Vec<(u64, usize)>);

impl AddrMap {
    fn new(map: HashMap<u64, usize>) -> Self {
        let mut v: Vec<(u64, usize)> = map.into_iter().collect();
        v.sort_unstable();
        AddrMap(v)
    }

    fn get(&self, addr: &u64) -> Option<&usize> {
        let (first, last) = (self.0.first()?, self.0.last()?);
        if *addr < first.0 || *addr > last.0 {
            return None;
        }
        let i = self.0.binary_search_by_key(addr, |e| e.0).ok()?;
        Some(&self.0[i].1)
    }
}

/// The executable sections' addresses, bytes and indices, sorted by address.
#[derive(Debug)]
pub struct ExecCode<'d>(Vec<(u64, &'d [u8], SectionIndex)>);

impl<'d> ExecCode<'d> {
    /// The executable sections of `img`.
    pub fn new(img: &Image<'d>) -> Self {
        let mut v: Vec<(u64, &'d [u8], SectionIndex)> = img
            .exec_sections()
            .map(|s| (s.address(), s.data().unwrap_or(&[]), s.index()))
            .filter(|(_, d, _)| !d.is_empty())
            .collect();
        v.sort_by_key(|s| s.0);
        ExecCode(v)
    }

    /// The section holding `addr`.
    fn section(&self, addr: u64) -> Option<(u64, &'d [u8], SectionIndex)> {
        let i = self.0.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let s = self.0[i];
        (addr - s.0 < s.1.len() as u64).then_some(s)
    }

    /// `len` bytes at `addr`, if an executable section holds them all.
    fn read(&self, addr: u64, len: u64) -> Option<&'d [u8]> {
        let (start, data, _) = self.section(addr)?;
        let off = usize::try_from(addr - start).ok()?;
        data.get(off..off.checked_add(usize::try_from(len).ok()?)?)
    }

    /// Whether `addr` is in an executable section.
    fn contains(&self, addr: u64) -> bool {
        self.section(addr).is_some()
    }
}

impl ProbeFunctions {
    /// Every probe function symbol of `img`. Refuses two probe functions at one address,
    /// and a probe function at the address of another function (identical code folding):
    /// their calls could not be told apart.
    pub fn read(img: &Image<'_>) -> Result<Self> {
        let e = LittleEndian;
        let mut names: BTreeMap<String, Vec<(usize, u64, bool)>> = BTreeMap::new();
        for s in img.file.symbols() {
            let n = img.raw_symbol_name(s.index().0);
            if split_c_probe(n).is_none() {
                continue;
            }
            // Undefined or common: no address of its own, but calls still name it.
            let shndx = s.elf_symbol().st_shndx(e);
            let defined = shndx != object::elf::SHN_UNDEF && shndx != object::elf::SHN_COMMON;
            names
                .entry(n.to_string())
                .or_default()
                .push((s.index().0, s.address(), defined));
        }
        let mut out = ProbeFunctions {
            by_sym: vec![NOT_PROBE; img.symbol_count()],
            ..ProbeFunctions::default()
        };
        let mut by_addr: HashMap<u64, usize> = HashMap::new();
        let mut all_addrs: HashMap<u64, usize> = HashMap::new();
        for (i, (symbol, syms)) in names.into_iter().enumerate() {
            let (enabled, provider, name) = split_c_probe(&symbol).expect("checked above");
            out.funcs.push(ProbeFunction {
                enabled,
                provider: provider.to_string(),
                name: name.to_string(),
                symbol: symbol.clone(),
            });
            for (index, addr, defined) in syms {
                if let Some(e) = out.by_sym.get_mut(index) {
                    *e = i as u32;
                }
                all_addrs.entry(addr).or_insert(i);
                if !defined {
                    continue;
                }
                if let Some(&j) = by_addr.get(&addr)
                    && j != i
                {
                    bail!(
                        "{}: probe functions {} and {symbol} share address {addr:#x}; cannot \
                         tell their calls apart (identical code folding?)",
                        img.path,
                        out.funcs[j].symbol
                    );
                }
                by_addr.insert(addr, i);
            }
        }
        out.by_addr = AddrMap::new(by_addr);
        out.all_addrs = AddrMap::new(all_addrs);
        if out.by_addr.0.is_empty() {
            return Ok(out);
        }
        for s in img.file.symbols() {
            let t = s.elf_symbol().st_type();
            if !matches!(t, object::elf::STT_FUNC | object::elf::STT_GNU_IFUNC)
                || s.section_index().is_none()
            {
                continue;
            }
            let n = img.raw_symbol_name(s.index().0);
            if let Some(&i) = out.by_addr.get(&s.address())
                && !n.is_empty()
                && split_c_probe(n).is_none()
            {
                bail!(
                    "{}: probe function {} shares address {:#x} with function {}; cannot tell \
                     calls to {} from probe calls (identical code folding?)",
                    img.path,
                    out.funcs[i].symbol,
                    s.address(),
                    demangle(n),
                    demangle(n)
                );
            }
        }
        Ok(out)
    }

    /// Whether the image has no probe function.
    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }

    /// The probe function the symbol with index `sym` names, if any.
    fn probe_symbol(&self, sym: usize) -> Option<usize> {
        self.by_sym
            .get(sym)
            .filter(|&&i| i != NOT_PROBE)
            .map(|&i| i as usize)
    }

    /// The site finder's selector: a relocation naming a probe function, or reaching one.
    fn select(&self, img: &Image<'_>, r: &Reloc) -> Option<Selected> {
        let t = img.target.reloc_target(r);
        let &target = self
            .probe_symbol(r.sym_index)
            .as_ref()
            .or_else(|| self.by_addr.get(&t))?;
        Some(Selected {
            target,
            target_addr: Some(t),
        })
    }

    /// The address a raw relocation refers to, read as a branch's (`S + A` plus the
    /// branch bias), `None` if its symbol cannot be read.
    fn branch_target(img: &Image<'_>, r: &RawRela) -> Option<u64> {
        let sym = img
            .file
            .symbol_by_index(object::SymbolIndex(r.sym_index))
            .ok()?;
        let s = if sym.kind() == SymbolKind::Section {
            img.file
                .section_by_index(sym.section_index()?)
                .ok()?
                .address()
        } else {
            sym.address()
        };
        Some(
            s.wrapping_add_signed(r.addend)
                .wrapping_add_signed(img.target.branch_bias()),
        )
    }

    /// The probe function a raw relocation refers to: by the name of its symbol
    /// (anywhere), or, for a branch relocation (or one `embed` made "none") in
    /// executable code, by where it goes.
    pub fn reference(&self, img: &Image<'_>, exec: &ExecCode<'_>, r: &RawRela) -> Option<usize> {
        if let Some(i) = self.probe_symbol(r.sym_index) {
            return Some(i);
        }
        if !matches!(
            img.target.reloc_class(r.r_type),
            RelocClass::Branch | RelocClass::None
        ) || !exec.contains(r.offset)
        {
            return None;
        }
        self.by_addr.get(&Self::branch_target(img, r)?).copied()
    }

    /// After the site finder: every relocation that refers to a probe function (as
    /// [`ProbeFunctions::reference`] tests it, the test `verify` applies) is a recorded
    /// site, or a reference outside executable code that is not a branch; and no branch
    /// in executable code reaches a probe function while its relocation says otherwise.
    /// Anything else is refused, naming the symbol: a probe call is never left live.
    fn check_all_recorded(&self, img: &Image<'_>, recorded: &HashSet<u64>) -> Result<()> {
        let exec = ExecCode::new(img);
        let t = img.target;
        // A relocation of a non-allocated section (debug information) holds an offset in
        // that section, not an address: it is no reference from code.
        let unallocated: HashSet<usize> = img
            .file
            .elf_section_table()
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                object::read::elf::SectionHeader::sh_flags(*h, object::LittleEndian).0
                    & object::elf::SHF_ALLOC.0
                    == 0
            })
            .map(|(i, _)| i)
            .collect();
        for r in img.raw_relas() {
            let class = t.reloc_class(r.r_type);
            let in_exec = exec.contains(r.offset) && !unallocated.contains(&r.section);
            let (i, why) = match self.reference(img, &exec, &r) {
                Some(_)
                    if class == RelocClass::Branch
                        && t.c_probe_site_of_reloc(r.offset)
                            .is_some_and(|s| recorded.contains(&s)) =>
                {
                    continue;
                }
                Some(_) if !in_exec && matches!(class, RelocClass::Absolute | RelocClass::Got) => {
                    continue;
                }
                Some(i) if class == RelocClass::None => (
                    i,
                    "it is already a \"none\" relocation (was the image rewritten by another \
                     tool? embed the linker's output)",
                ),
                Some(i) if !in_exec => (i, "it is not in an executable section"),
                Some(i) if class == RelocClass::Branch => (
                    i,
                    "its relocation section does not apply to the section holding it",
                ),
                Some(i) => (i, "not a call this tool can rewrite safely"),
                None => {
                    // Code that reaches a probe function although its relocation says
                    // otherwise: a branch's field, or a plain call or jmp holding a
                    // relocation of another kind.
                    if !in_exec {
                        continue;
                    }
                    let dest = match class {
                        RelocClass::Branch => {
                            t.branch_dest_at(|n| exec.read(r.offset, n), r.offset)
                        }
                        _ => t.plain_branch_start(r.offset).and_then(|start| {
                            let code = exec.read(start, t.probe_site_len() as u64)?;
                            let insn = t.decode_insn(code, start);
                            (insn.kind.is_some() && insn.len == code.len())
                                .then_some(insn.branch_target)
                        }),
                    };
                    let Some(dest) = dest else { continue };
                    let Some(&i) = self.all_addrs.get(&dest) else {
                        continue;
                    };
                    if class == RelocClass::Branch && Self::branch_target(img, &r) == Some(dest) {
                        continue;
                    }
                    bail!(
                        "{}: the branch at {:#x} reaches probe function {}, but its relocation \
                         ({}) names `{}` (symbol {}): the relocations do not describe the code",
                        img.path,
                        r.offset,
                        self.funcs[i].symbol,
                        t.reloc_name(r.r_type),
                        img.raw_symbol_name(r.sym_index),
                        r.sym_index
                    );
                }
            };
            bail!(
                "{}: relocation {} at {:#x} against probe function {} (symbol `{}`) is not a \
                 recorded probe site: {why}",
                img.path,
                t.reloc_name(r.r_type),
                r.offset,
                self.funcs[i].symbol,
                img.raw_symbol_name(r.sym_index)
            );
        }
        // Code that reaches a probe function and is no recorded site: every relocation
        // was checked above, so if it is a branch, none describes it.
        for (at, dest, i) in self.field_candidates(img, &exec) {
            if t.c_probe_site_of_reloc(at)
                .is_some_and(|s| recorded.contains(&s))
            {
                continue;
            }
            if let Some(site) = branch_at(img, &exec, at, dest) {
                bail!(
                    "{}: the {} at {:#x} ({}) reaches probe function {} but has no relocation \
                     (a call the assembler resolved itself, to a local probe function in the \
                     same section?): it cannot be recorded; make the probe function global or \
                     weak, as KSITES_PROBE_DECL does",
                    img.path,
                    site.kind.name(),
                    site.addr,
                    exec.section(at)
                        .map(|(_, _, sec)| img.describe(sec, site.addr))
                        .unwrap_or_default(),
                    self.funcs[i].symbol
                );
            }
        }
        Ok(())
    }

    /// The places in executable code whose bytes, read as a branch's field, reach a
    /// probe function, in address order: (field address, destination, probe index).
    /// Every byte is tried (every 2 bytes on riscv64; a window that lands exactly on a
    /// probe function is rare), with a shorter field at a section's end as
    /// [`crate::target::Target::branch_dest_at`] reads it (riscv64's `jal`/`c.j`); whether one is a
    /// branch is decided by [`branch_at`].
    fn field_candidates(&self, img: &Image<'_>, exec: &ExecCode<'_>) -> Vec<(u64, u64, usize)> {
        let t = img.target;
        let mut out = Vec::new();
        let (Some(&(lo, _)), Some(&(hi, _))) = (self.all_addrs.0.first(), self.all_addrs.0.last())
        else {
            return out;
        };
        for &(start, data, _) in &exec.0 {
            for k in (0..data.len()).step_by(t.branch_field_step()) {
                let at = start.wrapping_add(k as u64);
                let read = |n: u64| data.get(k..k.checked_add(usize::try_from(n).ok()?)?);
                let Some(dest) = t.branch_dest_at(read, at) else {
                    continue;
                };
                if (lo..=hi).contains(&dest)
                    && let Some(&i) = self.all_addrs.get(&dest)
                {
                    out.push((at, dest, i));
                }
            }
        }
        out
    }
}

/// The branch whose field is at `at`, decoded from the start of the enclosing
/// function (or section), if it is one and reaches `dest`.
fn branch_at(
    img: &Image<'_>,
    exec: &ExecCode<'_>,
    at: u64,
    dest: u64,
) -> Option<crate::target::SiteInsn> {
    let (sec_addr, data, sec) = exec.section(at)?;
    let sec_end = sec_addr.checked_add(data.len() as u64)?;
    let start = img
        .enclosing_symbol(sec, at)
        .map_or(sec_addr, |s| s.addr)
        .max(sec_addr)
        .min(at);
    let end = img
        .next_symbol_start(sec, at)
        .unwrap_or(sec_end)
        .max(at.saturating_add(img.target.branch_field_len()))
        .min(sec_end);
    let code = data.get((start - sec_addr) as usize..(end - sec_addr) as usize)?;
    let mut cursor = img.target.function_cursor(code, start);
    let site = cursor.classify(at, Some(dest)).ok()?;
    Some(site)
}

#[cfg(test)]
mod tests {
    use super::split_c_probe;

    #[test]
    fn c_probe_names() {
        assert_eq!(
            split_c_probe("__dtrace_probe_net___rx"),
            Some((false, "net", "rx"))
        );
        assert_eq!(
            split_c_probe("__dtraceenabled_io___start_req"),
            Some((true, "io", "start_req"))
        );
        assert_eq!(split_c_probe("__dtrace_probe_net"), None);
        assert_eq!(split_c_probe("memcpy"), None);
    }
}
