//! `ksites inspect`: a readable listing of a file's ifuncs, probes, static keys and their
//! sites.

use std::fmt::Write;

use anyhow::{Context, Result};
use kernel_loader::format::{NARGS_UNKNOWN, SECTION_NAME, Table};
use object::{Object, ObjectSection};

use crate::elf::Image;
use crate::probes::find_probes;
use crate::records::{find_ifunc_sites_checked, read_ifuncs};

fn sym_name(img: &Image<'_>, addr: u64) -> String {
    img.file
        .sections()
        .find(|s| s.address() <= addr && addr < s.address().saturating_add(s.size()))
        .map(|s| img.describe(s.index(), addr))
        .unwrap_or_else(|| format!("{addr:#x}"))
}

struct IfuncRow {
    name: String,
    trampoline: u64,
    symbol: String,
    slot: u64,
    resolver: u64,
    default: u64,
    sites: Vec<(u64, &'static str, String)>,
}

struct KeyRow {
    name: String,
    default: bool,
    imported: bool,
    /// (address, likely, label, current form, location)
    sites: Vec<(u64, bool, u64, String, String)>,
}

struct ProbeRow {
    name: String,
    nargs: u16,
    sites: Vec<(u64, &'static str, String)>,
}

fn nargs_str(n: u16) -> String {
    if n == NARGS_UNKNOWN {
        "?".into()
    } else {
        n.to_string()
    }
}

/// Everything `inspect` shows.
struct Listing {
    header: String,
    embedded: bool,
    ifuncs: Vec<IfuncRow>,
    probes: Vec<ProbeRow>,
    keys: Vec<KeyRow>,
    /// (trampoline, address, what, location)
    other_refs: Vec<(u64, u64, String, String)>,
    default_names: std::collections::HashMap<u64, String>,
}

fn listing(path: &str, data: &[u8]) -> Result<Listing> {
    let img = Image::parse(path, data)?;
    ensure_not_embedded_object(&img)?;
    let mut o = String::new();
    writeln!(o, "{path}: ELF {:?} {}", img.kind, img.target.name())?;
    let exec = img.exec_ranges();
    let ifunc_records = read_ifuncs(&img)?;
    let scan = find_ifunc_sites_checked(&img, &ifunc_records, false)?;

    // Rows to print: from the table when embedded, else from what embed would record.
    let mut ifuncs: Vec<IfuncRow> = Vec::new();
    let mut probes: Vec<ProbeRow> = Vec::new();
    let mut keys: Vec<KeyRow> = Vec::new();
    let key_form = |addr: u64, label: u64| {
        let len = img.target.probe_site_len() as u64;
        crate::keys::form_name(img.target, img.read_va(addr, len), addr, label)
    };
    let symbols: std::collections::HashMap<u64, &str> = ifunc_records
        .iter()
        .map(|r| (r.trampoline, r.trampoline_symbol.as_str()))
        .collect();
    let sym_of = |addr: u64| -> String { symbols.get(&addr).map_or("?", |s| s).to_string() };
    // A linker-script-reserved slot `embed` left all zero (nothing to embed) is no table.
    let table_sec = img
        .section_by_name(SECTION_NAME)
        .filter(|s| !s.data().is_ok_and(is_unfilled_slot));
    if table_sec.is_none() && img.section_by_name(SECTION_NAME).is_some() {
        writeln!(
            o,
            "{SECTION_NAME}: a reserved slot, not filled (`ksites embed` copies an image with \
             no ifuncs or probes unchanged)"
        )?;
    }
    let embedded = table_sec.is_some();
    if let Some(sec) = table_sec {
        let bytes = sec
            .data()
            .with_context(|| format!("{path}: cannot read {SECTION_NAME}"))?;
        let t = Table::parse(bytes, sec.address(), &exec)
            .map_err(|e| anyhow::anyhow!("{path}: {SECTION_NAME} at {:#x}: {e}", sec.address()))?;
        writeln!(
            o,
            "{SECTION_NAME} table v{} at {:#x} ({} bytes): {} ifuncs, {} sites, {} probes, {} probe sites, {} keys, {} key sites",
            t.version(),
            t.base(),
            t.bytes().len(),
            t.ifunc_count(),
            t.site_count(),
            t.probe_count(),
            t.probe_site_count(),
            t.key_count(),
            t.key_site_count()
        )?;
        for k in t.keys() {
            keys.push(KeyRow {
                name: k.name.to_string(),
                default: k.default,
                imported: k.imported,
                sites: Vec::new(),
            });
        }
        for s in t.key_sites() {
            if let Some(row) = keys.get_mut(s.key as usize) {
                row.sites.push((
                    s.addr,
                    s.likely,
                    s.target,
                    key_form(s.addr, s.target),
                    sym_name(&img, s.addr),
                ));
            }
        }
        for f in t.ifuncs() {
            ifuncs.push(IfuncRow {
                name: f.name.to_string(),
                trampoline: f.trampoline,
                symbol: sym_of(f.trampoline),
                slot: f.slot,
                resolver: f.resolver,
                default: f.default,
                sites: Vec::new(),
            });
        }
        // One pass over the sites (tables may hold 10^5 of them).
        for s in t.sites() {
            if let Some(row) = ifuncs.get_mut(s.ifunc as usize) {
                row.sites
                    .push((s.addr, s.kind.name(), sym_name(&img, s.addr)));
            }
        }
        for p in t.probes() {
            probes.push(ProbeRow {
                name: format!("{}:{}", p.provider, p.name),
                nargs: p.nargs,
                sites: Vec::new(),
            });
        }
        for s in t.probe_sites() {
            if let Some(row) = probes.get_mut(s.probe as usize) {
                row.sites
                    .push((s.addr, s.kind.name(), sym_name(&img, s.addr)));
            }
        }
    } else {
        writeln!(
            o,
            "no {SECTION_NAME} table (not embedded); listing what `ksites embed` would record"
        )?;
        for f in ifunc_records.iter() {
            ifuncs.push(IfuncRow {
                name: f.name.clone(),
                trampoline: f.trampoline,
                symbol: f.trampoline_symbol.clone(),
                slot: f.slot,
                resolver: f.resolver,
                default: f.default,
                sites: Vec::new(),
            });
        }
        for s in &scan.sites {
            if let Some(row) = ifuncs.get_mut(s.target as usize) {
                row.sites
                    .push((s.addr, s.kind.name(), scan.location(s).to_string()));
            }
        }
        let found = find_probes(&img)?;
        for p in found.probes.iter() {
            probes.push(ProbeRow {
                name: format!("{}:{}", p.provider, p.name),
                nargs: p.nargs,
                sites: Vec::new(),
            });
        }
        for s in &found.found {
            if let Some(row) = probes.get_mut(s.probe as usize) {
                row.sites
                    .push((s.addr, s.kind.name(), s.location.to_string()));
            }
        }
        let found = crate::keys::find_keys(&img)?;
        for k in &found.keys {
            keys.push(KeyRow {
                name: k.name.clone(),
                default: k.default,
                imported: k.imported,
                sites: Vec::new(),
            });
        }
        for (s, loc) in found.sites.iter().zip(&found.locations) {
            if let Some(row) = keys.get_mut(s.key as usize) {
                row.sites.push((
                    s.addr,
                    s.likely,
                    s.target,
                    key_form(s.addr, s.target),
                    loc.clone(),
                ));
            }
        }
    }

    let default_names = ifuncs
        .iter()
        .map(|f| (f.default, sym_name(&img, f.default)))
        .collect();
    Ok(Listing {
        header: o,
        embedded,
        ifuncs,
        probes,
        keys,
        other_refs: scan
            .other_refs
            .iter()
            .map(|r| {
                (
                    ifunc_records[r.target].trampoline,
                    r.addr,
                    r.what.clone(),
                    r.location.clone(),
                )
            })
            .collect(),
        default_names,
    })
}

/// The text listing for `data` (the contents of `path`).
///
/// For each ifunc, one line `ifunc NAME trampoline=0xADDR SYMBOL sites=N` (the format
/// `cargo xtask` parses), then indented details and one `site` line per site; for each
/// probe, `probe PROVIDER:NAME nargs=N sites=N` and its sites; for each static key,
/// `key NAME default=true|false|? imported=yes|no sites=N` and one line per site
/// (`  site 0xADDR likely|unlikely LOCATION label=0xADDR form=nop|jump|…`, the form
/// the site holds in the file). An image that has not
/// been embedded yet is listed from its records and relocations: what `embed` would
/// record.
pub fn inspect(path: &str, data: &[u8]) -> Result<String> {
    let l = listing(path, data)?;
    let mut o = l.header.clone();
    let (ifuncs, probes) = (&l.ifuncs, &l.probes);
    for f in ifuncs {
        writeln!(
            o,
            "ifunc {} trampoline={:#x} {} sites={}",
            f.name,
            f.trampoline,
            f.symbol,
            f.sites.len()
        )?;
        writeln!(
            o,
            "  slot={:#x} resolver={:#x} default={:#x} {}",
            f.slot, f.resolver, f.default, l.default_names[&f.default]
        )?;
        for (addr, kind, loc) in &f.sites {
            writeln!(o, "  site {addr:#x} {kind} {loc}")?;
        }
        for (_, addr, what, location) in l.other_refs.iter().filter(|r| r.0 == f.trampoline) {
            writeln!(
                o,
                "  ref {addr:#x} {what} in {location} (not patched: uses the slot)"
            )?;
        }
    }
    for p in probes {
        writeln!(
            o,
            "probe {} nargs={} sites={}",
            p.name,
            nargs_str(p.nargs),
            p.sites.len()
        )?;
        for (addr, kind, loc) in &p.sites {
            writeln!(o, "  site {addr:#x} {kind} {loc}")?;
        }
    }
    for k in &l.keys {
        writeln!(
            o,
            "key {} default={} imported={} sites={}",
            k.name,
            if k.imported {
                "?"
            } else if k.default {
                "true"
            } else {
                "false"
            },
            if k.imported { "yes" } else { "no" },
            k.sites.len()
        )?;
        for (addr, likely, label, form, loc) in &k.sites {
            writeln!(
                o,
                "  site {addr:#x} {} {loc} label={label:#x} form={form}",
                likely_name(*likely)
            )?;
        }
    }
    Ok(o)
}

fn likely_name(likely: bool) -> &'static str {
    if likely { "likely" } else { "unlikely" }
}

/// The same listing as one JSON object: `file`, `embedded`, `ifuncs` (each with its
/// `sites` and unpatched `refs`), `probes` (each with its `sites`) and `keys` (each
/// with `default` (null when imported), `imported` and its `sites`).
pub fn inspect_json(path: &str, data: &[u8]) -> Result<serde_json::Value> {
    use serde_json::json;
    let l = listing(path, data)?;
    let site = |(addr, kind, loc): &(u64, &str, String)| json!({"address": addr, "kind": kind, "location": loc});
    Ok(json!({
        "file": path,
        "embedded": l.embedded,
        "ifuncs": l.ifuncs.iter().map(|f| json!({
            "name": f.name,
            "trampoline": f.trampoline,
            "trampoline_symbol": f.symbol,
            "slot": f.slot,
            "resolver": f.resolver,
            "default": f.default,
            "default_symbol": l.default_names[&f.default],
            "sites": f.sites.iter().map(site).collect::<Vec<_>>(),
            "refs": l.other_refs.iter().filter(|r| r.0 == f.trampoline).map(|r| json!({
                "address": r.1, "what": r.2, "location": r.3,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "probes": l.probes.iter().map(|p| json!({
            "name": p.name,
            "nargs": if p.nargs == NARGS_UNKNOWN { serde_json::Value::Null } else { p.nargs.into() },
            "sites": p.sites.iter().map(site).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "keys": l.keys.iter().map(|k| json!({
            "name": k.name,
            "default": if k.imported { serde_json::Value::Null } else { k.default.into() },
            "imported": k.imported,
            "sites": k.sites.iter().map(|(addr, likely, label, form, loc)| json!({
                "address": addr,
                "kind": likely_name(*likely),
                "label": label,
                "form": form,
                "location": loc,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    }))
}

/// A module's table only means something once `.rela.ksites` is applied (at load):
/// `inspect` and `verify` read linked images only.
pub fn ensure_not_embedded_object(img: &Image<'_>) -> Result<()> {
    if img.kind == crate::elf::ElfKind::Rel && img.section_by_name(SECTION_NAME).is_some() {
        anyhow::bail!(
            "{}: an embedded relocatable object (module): its .ksites table is relocated at \
             load time by .rela.ksites; inspect and verify read linked images only",
            img.path
        );
    }
    Ok(())
}

/// Whether a `.ksites` section's contents are a reserved slot nothing was written to
/// (all zero: `embed` had no ifuncs or probes to record).
pub(crate) fn is_unfilled_slot(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| b == 0)
}
