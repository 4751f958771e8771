//! `ksites scan`: the generic site finder. Lists every `call rel32` to a symbol matching
//! a `--calls-to` glob and every `jmp rel32`/`jcc rel32` to one matching a `--jumps-to`
//! glob, in any ELF file of a supported target (ET_REL, or ET_EXEC/ET_DYN linked with
//! `--emit-relocs`), the way recordmcount finds `__fentry__` calls and objtool finds
//! retpoline-thunk calls. Sites are found through relocations and decoded from the start
//! of the enclosing function.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use kernel_loader::format::SiteKind;
use kernel_loader::probe::glob_match_str;

use crate::elf::{ElfKind, Image, Reloc, demangle};
use crate::sites::{Selected, find_sites_with};
use crate::target::RelocClass;

/// What to look for.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Globs for `call` targets.
    pub calls_to: Vec<String>,
    /// Globs for `jmp`/`jcc` targets.
    pub jumps_to: Vec<String>,
}

/// One site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanHit {
    /// The file.
    pub file: String,
    /// Section name.
    pub section: String,
    /// Section offset of the instruction's first byte.
    pub offset: u64,
    /// Instruction length.
    pub length: u8,
    /// `call`, `jmp` or `jcc`.
    pub kind: SiteKind,
    /// The target symbol (raw name).
    pub symbol: String,
    /// Virtual address (linked images only).
    pub address: Option<u64>,
}

impl ScanHit {
    /// One JSON object, as `--json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "file": self.file,
            "section": self.section,
            "offset": self.offset,
            "length": self.length,
            "kind": self.kind.name(),
            "symbol": self.symbol,
        });
        if let Some(a) = self.address {
            v["address"] = a.into();
        }
        v
    }

    /// One text line.
    pub fn to_text(&self) -> String {
        let addr = self.address.map(|a| format!(" {a:#x}")).unwrap_or_default();
        format!(
            "{}: {}+{:#x}{addr} {} ({} bytes) -> {}",
            self.file,
            self.section,
            self.offset,
            self.kind.name(),
            self.length,
            self.symbol
        )
    }
}

/// The name a relocation refers to: the symbol's own name, or, for a section symbol,
/// the symbol defined at the branch target inside that section.
fn target_name(img: &Image<'_>, r: &Reloc) -> Option<String> {
    if !r.sym_is_section {
        let n = img.symbol_name(r.sym_index);
        return (!n.is_empty()).then_some(n);
    }
    let sec = r.sym_section?;
    let at = img.target.reloc_target(r);
    img.symbol_at(sec, at).map(|s| s.name.clone())
}

fn matches(globs: &[String], raw: &str) -> bool {
    if globs.is_empty() {
        return false;
    }
    let dem = demangle(raw);
    globs
        .iter()
        .any(|g| glob_match_str(g, raw) || glob_match_str(g, &dem))
}

/// Scans one file's contents.
pub fn scan_bytes(path: &str, data: &[u8], opts: &ScanOptions) -> Result<Vec<ScanHit>> {
    let img = Image::parse(path, data)?;
    anyhow::ensure!(
        img.kind == ElfKind::Rel
            || img.has_text_relocations()
            || img.exec_sections().next().is_none(),
        "{path}: executable sections carry no relocations; link with --emit-relocs to scan a linked image"
    );
    let mut names: Vec<String> = Vec::new();
    let names_cell = std::cell::RefCell::new(&mut names);
    // Whether a (non-section) symbol matches, and its index in `names`: looked up and
    // demangled once per symbol, not once per relocation.
    let by_symbol =
        std::cell::RefCell::new(std::collections::HashMap::<usize, Option<usize>>::new());
    let select = |r: &Reloc| -> Option<Selected> {
        if img.target.reloc_class(r.r_type) != RelocClass::Branch {
            return None;
        }
        let lookup = |r: &Reloc| -> Option<usize> {
            let name = target_name(&img, r)?;
            if !matches(&opts.calls_to, &name) && !matches(&opts.jumps_to, &name) {
                return None;
            }
            let mut names = names_cell.borrow_mut();
            Some(names.iter().position(|n| *n == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            }))
        };
        let target = if r.sym_is_section {
            lookup(r)?
        } else {
            let cached = by_symbol.borrow().get(&r.sym_index).copied();
            match cached {
                Some(t) => t?,
                None => {
                    let t = lookup(r);
                    by_symbol.borrow_mut().insert(r.sym_index, t);
                    t?
                }
            }
        };
        Some(Selected {
            target,
            target_addr: None,
        })
    };
    let found = find_sites_with(&img, &select)?;
    let linked = img.kind != ElfKind::Rel;
    let mut hits = Vec::new();
    let wants: Vec<(bool, bool)> = names
        .iter()
        .map(|n| (matches(&opts.calls_to, n), matches(&opts.jumps_to, n)))
        .collect();
    for s in found.sites {
        let symbol = names[s.target].clone();
        let wanted = match s.kind {
            SiteKind::Call => wants[s.target].0,
            SiteKind::Jmp | SiteKind::Jcc => wants[s.target].1,
        };
        if !wanted {
            continue;
        }
        hits.push(ScanHit {
            file: path.to_string(),
            section: s.section.to_string(),
            offset: s.section_offset,
            length: s.len,
            kind: s.kind,
            symbol,
            address: linked.then_some(s.addr),
        });
    }
    hits.sort_by(|a, b| (&a.section, a.offset).cmp(&(&b.section, b.offset)));
    Ok(hits)
}

/// Scans many files in parallel (one worker per CPU); results come back in input order.
pub fn scan_files(files: &[PathBuf], opts: &ScanOptions) -> Vec<Result<Vec<ScanHit>>> {
    let results: Vec<Mutex<Option<Result<Vec<ScanHit>>>>> =
        files.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let r = std::fs::read(f)
                        .with_context(|| format!("cannot read {}", f.display()))
                        .and_then(|d| scan_bytes(&f.display().to_string(), &d, opts));
                    *results[i].lock().expect("no poisoning") = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no poisoning")
                .expect("every file scanned")
        })
        .collect()
}
