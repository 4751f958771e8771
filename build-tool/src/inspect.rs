//! `ksites inspect`: a readable listing of a file's ifuncs and sites.

use std::collections::HashMap;
use std::fmt::Write;

use anyhow::{Context, Result};
use kernel_loader::format::{NARGS_UNKNOWN, SECTION_NAME, Table};
use object::{Object, ObjectSection};

use crate::elf::Image;
use crate::probes::find_probes;
use crate::records::read_ifuncs;
use crate::sites::find_sites;

fn sym_name(img: &Image<'_>, addr: u64) -> String {
    img.file
        .sections()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())
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

/// The listing for `data` (the contents of `path`).
///
/// For each ifunc, one line `ifunc NAME trampoline=0xADDR SYMBOL sites=N` (the format
/// `cargo xtask` parses), then indented details and one `site` line per site. An image
/// that has not been embedded yet is listed from its records and relocations: what
/// `embed` would record.
pub fn inspect(path: &str, data: &[u8]) -> Result<String> {
    let img = Image::parse(path, data)?;
    let mut o = String::new();
    writeln!(o, "{path}: ELF {:?} x86-64", img.kind)?;
    let exec = img.exec_ranges();
    let ifunc_records = read_ifuncs(&img)?;
    let targets: HashMap<u64, usize> = ifunc_records
        .iter()
        .enumerate()
        .map(|(i, f)| (f.trampoline, i))
        .collect();
    let scan = find_sites(&img, &targets)?;

    // Rows to print: from the table when embedded, else from what embed would record.
    let mut ifuncs: Vec<IfuncRow> = Vec::new();
    let mut probes: Vec<ProbeRow> = Vec::new();
    let sym_of = |addr: u64| -> String {
        ifunc_records
            .iter()
            .find(|r| r.trampoline == addr)
            .map_or_else(|| "?".into(), |r| r.trampoline_symbol.clone())
    };
    if let Some(sec) = img.section_by_name(SECTION_NAME) {
        let bytes = sec.data().context("cannot read .ksites")?;
        let t = Table::parse(bytes, sec.address(), &exec)
            .map_err(|e| anyhow::anyhow!("{path}: {SECTION_NAME} at {:#x}: {e}", sec.address()))?;
        writeln!(
            o,
            "{SECTION_NAME} table v{} at {:#x} ({} bytes): {} ifuncs, {} sites, {} probes, {} probe sites",
            t.header().version,
            t.base(),
            t.bytes().len(),
            t.ifunc_count(),
            t.site_count(),
            t.probe_count(),
            t.probe_site_count()
        )?;
        for f in t.ifuncs() {
            ifuncs.push(IfuncRow {
                name: f.name.to_string(),
                trampoline: f.trampoline,
                symbol: sym_of(f.trampoline),
                slot: f.slot,
                resolver: f.resolver,
                default: f.default,
                sites: t
                    .sites()
                    .filter(|s| s.ifunc == f.index)
                    .map(|s| (s.addr, s.kind.name(), sym_name(&img, s.addr)))
                    .collect(),
            });
        }
        for p in t.probes() {
            probes.push(ProbeRow {
                name: format!("{}:{}", p.provider, p.name),
                nargs: p.nargs,
                sites: t
                    .probe_sites()
                    .filter(|s| s.probe == p.index)
                    .map(|s| (s.addr, s.kind.name(), sym_name(&img, s.addr)))
                    .collect(),
            });
        }
    } else {
        writeln!(
            o,
            "no {SECTION_NAME} table (not embedded); listing what `ksites embed` would record"
        )?;
        for (i, f) in ifunc_records.iter().enumerate() {
            ifuncs.push(IfuncRow {
                name: f.name.clone(),
                trampoline: f.trampoline,
                symbol: f.trampoline_symbol.clone(),
                slot: f.slot,
                resolver: f.resolver,
                default: f.default,
                sites: scan
                    .sites
                    .iter()
                    .filter(|s| s.target == i)
                    .map(|s| (s.addr, s.kind.name(), s.location.clone()))
                    .collect(),
            });
        }
        let found = find_probes(&img)?;
        for (i, p) in found.probes.iter().enumerate() {
            probes.push(ProbeRow {
                name: format!("{}:{}", p.provider, p.name),
                nargs: p.nargs,
                sites: found
                    .found
                    .iter()
                    .filter(|s| s.probe == i as u32)
                    .map(|s| (s.addr, s.kind.name(), s.location.clone()))
                    .collect(),
            });
        }
    }

    for f in &ifuncs {
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
            f.slot,
            f.resolver,
            f.default,
            sym_name(&img, f.default)
        )?;
        for (addr, kind, loc) in &f.sites {
            writeln!(o, "  site {addr:#x} {kind} {loc}")?;
        }
        for r in scan
            .other_refs
            .iter()
            .filter(|r| ifunc_records[r.target].trampoline == f.trampoline)
        {
            writeln!(
                o,
                "  ref {:#x} {} in {} (not patched: uses the slot)",
                r.addr, r.what, r.location
            )?;
        }
    }
    for p in &probes {
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
    Ok(o)
}
