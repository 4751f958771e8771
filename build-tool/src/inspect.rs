//! `ksites inspect`: a readable listing of a file's ifuncs and sites.

use std::collections::HashMap;
use std::fmt::Write;

use anyhow::{Context, Result};
use kernel_loader::format::{SECTION_NAME, Table};
use object::{Object, ObjectSection};

use crate::elf::{Image, demangle};
use crate::records::read_ifuncs;
use crate::sites::find_sites;

fn sym_name(img: &Image<'_>, addr: u64) -> String {
    img.file
        .sections()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())
        .map(|s| img.describe(s.index(), addr))
        .unwrap_or_else(|| format!("{addr:#x}"))
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

    if let Some(sec) = img.section_by_name(SECTION_NAME) {
        let bytes = sec.data().context("cannot read .ksites")?;
        let t = Table::parse(bytes, sec.address(), &exec)
            .map_err(|e| anyhow::anyhow!("{path}: {SECTION_NAME} at {:#x}: {e}", sec.address()))?;
        writeln!(
            o,
            "{SECTION_NAME} table v{} at {:#x} ({} bytes): {} ifuncs, {} sites",
            t.header().version,
            t.base(),
            t.bytes().len(),
            t.ifunc_count(),
            t.site_count()
        )?;
        for f in t.ifuncs() {
            let sites: Vec<_> = t.sites().filter(|s| s.ifunc == f.index).collect();
            let tsym = ifunc_records
                .iter()
                .find(|r| r.trampoline == f.trampoline)
                .map(|r| r.trampoline_symbol.clone())
                .unwrap_or_else(|| "?".into());
            writeln!(
                o,
                "ifunc {} trampoline={:#x} {} sites={}",
                f.name,
                f.trampoline,
                tsym,
                sites.len()
            )?;
            writeln!(
                o,
                "  slot={:#x} resolver={:#x} default={:#x} {}",
                f.slot,
                f.resolver,
                f.default,
                sym_name(&img, f.default)
            )?;
            for s in sites {
                writeln!(
                    o,
                    "  site {:#x} {} {}",
                    s.addr,
                    s.kind.name(),
                    sym_name(&img, s.addr)
                )?;
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
    } else {
        writeln!(
            o,
            "no {SECTION_NAME} table (not embedded); listing what `ksites embed` would record"
        )?;
        for (i, f) in ifunc_records.iter().enumerate() {
            let sites: Vec<_> = scan.sites.iter().filter(|s| s.target == i).collect();
            writeln!(
                o,
                "ifunc {} trampoline={:#x} {} sites={}",
                f.name,
                f.trampoline,
                f.trampoline_symbol,
                sites.len()
            )?;
            writeln!(
                o,
                "  slot={:#x} resolver={:#x} default={:#x} {}",
                f.slot,
                f.resolver,
                f.default,
                demangle(&sym_name(&img, f.default))
            )?;
            for s in sites {
                writeln!(o, "  site {:#x} {} {}", s.addr, s.kind.name(), s.location)?;
            }
            for r in scan.other_refs.iter().filter(|r| r.target == i) {
                writeln!(
                    o,
                    "  ref {:#x} {} in {} (not patched: uses the slot)",
                    r.addr, r.what, r.location
                )?;
            }
        }
    }
    Ok(o)
}
