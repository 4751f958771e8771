//! Probe discovery: `probe!`/`probe_enabled!` site records, and dtrace-style C probe
//! calls (`call`/`jmp __dtrace_probe_<provider>___<name>` and
//! `__dtraceenabled_<provider>___<name>`), which are rewritten into their disabled form.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::format::{NARGS_UNKNOWN, PSite, ProbeKind, SiteKind};
use kernel_loader::probe::{
    DECL_SECTION, DECL_SIZE, PROBE_RECORD_MAGIC, RECORD_NARGS_NONE, SITE_RECORD_SECTION,
    SITE_RECORD_SIZE, STUB_SYMBOLS, Stubs, decl, record,
};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::elf::{ElfKind, Image};
use crate::record_section::{
    self, Declared, PROBE_DECLS, PROBE_SITE_RECORDS, declare, probe_site_kind, u32_at, u64_at,
};
use crate::sites::find_sites;
use crate::table::{ProbeEntry, ProbeSiteEntry};
use crate::target::{PROBE_SITE_LEN, RelocClass};

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
    pub rewrites: Vec<(u64, [u8; PROBE_SITE_LEN])>,
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

    // 1. `probe!` / `probe_enabled!` records.
    if let Some(sec) = img.section_by_name(SITE_RECORD_SECTION) {
        ensure!(
            img.kind == ElfKind::Exec,
            "{}: probe records can only be read from ET_EXEC images so far",
            img.path
        );
        let data = sec.data()?;
        for off in record_section::walk(&img.path, &PROBE_SITE_RECORDS, data, |_| true)? {
            let r = &data[off..off + SITE_RECORD_SIZE];
            let kind = probe_site_kind(&img.path, off, r)?;
            let (site, target, rec) = (u64_at(r, 8), u64_at(r, 16), u64_at(r, 24));
            let rb = img.read_va(rec, record::SIZE as u64).with_context(|| {
                format!("{}: probe record at {rec:#x} is not in the file", img.path)
            })?;
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
            let key = (provider, name);
            declare(
                &mut nargs,
                &img.path,
                &key,
                (n != RECORD_NARGS_NONE).then_some(n),
            )?;
            pending.push(Pending {
                addr: site,
                target,
                kind,
                key,
                rec: Some(rec),
            });
        }
    }

    // 2. C declarations (argument counts).
    if let Some(sec) = img.section_by_name(DECL_SECTION) {
        let data = sec.data()?;
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
    let mut c_syms: Vec<(u64, bool, String, String, String)> = Vec::new();
    for s in img.file.symbols() {
        let Ok(n) = s.name() else { continue };
        if s.kind() != SymbolKind::Text || s.section_index().is_none() {
            continue;
        }
        if let Some((enabled, prov, name)) = split_c_probe(n) {
            c_syms.push((
                s.address(),
                enabled,
                prov.to_string(),
                name.to_string(),
                n.to_string(),
            ));
        }
    }
    c_syms.sort();
    c_syms.dedup();
    let mut targets: HashMap<u64, usize> = HashMap::new();
    for (i, c) in c_syms.iter().enumerate() {
        if let Some(&j) = targets.get(&c.0) {
            bail!(
                "{}: probe functions {} and {} share address {:#x}; cannot tell their calls apart \
                 (identical code folding?)",
                img.path,
                c_syms[j].4,
                c.4,
                c.0
            );
        }
        targets.insert(c.0, i);
    }
    if !targets.is_empty() {
        ensure!(
            img.kind == ElfKind::Exec,
            "{}: C probes can only be rewritten in ET_EXEC images so far",
            img.path
        );
        let scan = find_sites(img, &targets)?;
        if let Some(r) = scan.other_refs.first() {
            bail!(
                "{}: {} at {:#x} in {} references probe function {}: not a call this tool can \
                 rewrite safely",
                img.path,
                r.what,
                r.addr,
                r.location,
                c_syms[r.target].4
            );
        }
        for s in &scan.sites {
            let c = &c_syms[s.target as usize];
            let kind = c_site_kind(&scan, s, c.1, &c.4).with_context(|| img.path.to_string())?;
            let key = (c.2.clone(), c.3.clone());
            nargs.entry(key.clone()).or_insert(None);
            pending.push(Pending {
                addr: s.addr,
                target: 0,
                kind,
                key,
                rec: None,
            });
        }
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
        let disabled = match p.kind {
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
                if p.kind == ProbeKind::CEnabledTail && stubs.ret0 == 0 {
                    bail!(
                        "{}: C is-enabled tail call at {:#x} needs kernel-loader's `{}` in the image",
                        img.path,
                        p.addr,
                        STUB_SYMBOLS[1]
                    );
                }
                Some(
                    img.target
                        .disabled_probe(&site, &stubs)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", img.path))?,
                )
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
        let data = sec.data()?;
        for off in record_section::walk(&img.path, &PROBE_SITE_RECORDS, data, |_| true)? {
            out.push(u64_at(data, off + 8));
        }
    }
    // Raw RELA entries: `embed` turned these relocations into NONE ones, which the
    // object crate's relocation iterator does not attribute to their symbol.
    for r in img.raw_relas() {
        if !matches!(
            img.target.reloc_class(r.r_type),
            RelocClass::Branch | RelocClass::None
        ) {
            continue;
        }
        if split_c_probe(&img.symbol_name(r.sym_index)).is_some()
            && let Some(site) = img.target.plain_branch_start(r.offset)
        {
            out.push(site);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The kind of a C probe site (a call or jump to `__dtrace_probe_*`, or to
/// `__dtraceenabled_*` when `is_enabled`), or why it cannot be rewritten: only a plain
/// 5-byte `call`/`jmp` can (images and modules alike).
pub(crate) fn c_site_kind(
    scan: &crate::sites::SiteScan,
    s: &crate::sites::FoundSite,
    is_enabled: bool,
    func: &str,
) -> Result<ProbeKind> {
    if s.prefixes != 0 || s.kind == SiteKind::Jcc || usize::from(s.len) != PROBE_SITE_LEN {
        bail!(
            "section {}+{:#x} in {}: {} to probe function {func} is {} bytes{}; only a plain \
             5-byte call or jmp can be rewritten safely",
            scan.section_name(s),
            scan.section_offset(s),
            scan.location(s),
            s.kind.name(),
            s.len,
            if s.prefixes != 0 {
                " with prefixes"
            } else {
                ""
            }
        );
    }
    Ok(match (is_enabled, s.kind) {
        (false, SiteKind::Call) => ProbeKind::CCall,
        (false, _) => ProbeKind::CTail,
        (true, SiteKind::Call) => ProbeKind::CEnabled,
        (true, _) => ProbeKind::CEnabledTail,
    })
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
