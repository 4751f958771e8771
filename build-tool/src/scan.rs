//! `ksites scan`: the generic site finder. Lists every `call rel32` to a symbol matching
//! a `--calls-to` glob and every `jmp rel32`/`jcc rel32` to one matching a `--jumps-to`
//! glob, in any ELF file of a supported target (ET_REL, or ET_EXEC/ET_DYN linked with
//! `--emit-relocs`), the way recordmcount finds `__fentry__` calls and objtool finds
//! retpoline-thunk calls. Sites are found through relocations and decoded from the start
//! of the enclosing function, or, for code no sized function symbol covers, from the last
//! symbol or section start before it, as `objdump -d` decodes it ([`crate::sites`]).

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use kernel_loader::format::SiteKind;
use kernel_loader::probe::glob_match_str;

use crate::elf::{ElfKind, Image, Reloc, demangle, read_file};
use crate::sites::{FoundSite, Selected, SiteScan, find_sites_with};
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

/// Every hit in one file, in output order (by section name, then offset). Hits are kept
/// compact (an image can have millions); [`FileScan::hit`] gives one as a [`ScanHit`],
/// [`FileScan::write_text`] prints them all without building one.
#[derive(Debug)]
pub struct FileScan {
    /// The file's name, as printed.
    pub file: String,
    /// A linked image (hits have addresses).
    linked: bool,
    /// The sites found, filtered to the hits, in output order.
    scan: SiteScan,
    /// Target symbols ([`FoundSite::target`]), raw names.
    names: Vec<String>,
}

impl FileScan {
    /// Number of hits.
    pub fn len(&self) -> usize {
        self.scan.sites.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.scan.sites.is_empty()
    }

    /// Hit `i`.
    pub fn hit(&self, i: usize) -> ScanHit {
        let s = &self.scan.sites[i];
        ScanHit {
            file: self.file.clone(),
            section: self.scan.section_name(s).to_string(),
            offset: self.scan.section_offset(s),
            length: s.len,
            kind: s.kind,
            symbol: self.names[s.target as usize].clone(),
            address: self.linked.then_some(s.addr),
        }
    }

    /// Every hit.
    pub fn hits(&self) -> impl Iterator<Item = ScanHit> + '_ {
        (0..self.len()).map(|i| self.hit(i))
    }

    /// Prints every hit as [`ScanHit::to_text`] does, one line each, through `out` in
    /// large writes.
    pub fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        const FLUSH_AT: usize = 1 << 16;
        let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_AT + 4096);
        for s in &self.scan.sites {
            buf.extend_from_slice(self.file.as_bytes());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(self.scan.section_name(s).as_bytes());
            buf.push(b'+');
            push_hex(&mut buf, self.scan.section_offset(s));
            if self.linked {
                buf.push(b' ');
                push_hex(&mut buf, s.addr);
            }
            buf.push(b' ');
            buf.extend_from_slice(s.kind.name().as_bytes());
            buf.extend_from_slice(b" (");
            push_decimal(&mut buf, s.len);
            buf.extend_from_slice(b" bytes) -> ");
            buf.extend_from_slice(self.names[s.target as usize].as_bytes());
            buf.push(b'\n');
            if buf.len() >= FLUSH_AT {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        out.write_all(&buf)
    }
}

/// Appends `v` as `{:#x}` formats it (digit by digit: a copy of a variable-length
/// slice costs more than the few pushes).
fn push_hex(buf: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(b"0x");
    let digits = (64 - (v | 1).leading_zeros()).div_ceil(4);
    for k in (0..digits).rev() {
        buf.push(DIGITS[((v >> (4 * k)) & 0xf) as usize]);
    }
}

/// Appends `v` in decimal.
fn push_decimal(buf: &mut Vec<u8>, v: u8) {
    if v >= 100 {
        buf.push(b'0' + v / 100);
    }
    if v >= 10 {
        buf.push(b'0' + v / 10 % 10);
    }
    buf.push(b'0' + v % 10);
}

/// The name a relocation refers to: the symbol's own name, or, for a section symbol,
/// the symbol defined at the branch target inside that section.
fn target_name<'d>(img: &Image<'d>, r: &Reloc) -> Option<&'d str> {
    let n = img.raw_symbol_name(r.sym_index);
    (!n.is_empty()).then_some(n)
}

fn matches(globs: &[String], raw: &str) -> bool {
    if globs.is_empty() {
        return false;
    }
    if globs.iter().any(|g| glob_match_str(g, raw)) {
        return true;
    }
    let dem = demangled(raw);
    *dem != *raw && globs.iter().any(|g| glob_match_str(g, &dem))
}

/// [`demangle`]`(raw)`, without running the demangler on a name it leaves as it is (a C
/// object's every name): `rustc_demangle` changes only a name that starts like a
/// Rust symbol (`_ZN`, `ZN`, `__ZN`; `_R`, `R`, `__R`) or ends in `.llvm.HASH`.
fn demangled(raw: &str) -> Cow<'_, str> {
    let s = raw
        .strip_prefix("__")
        .or_else(|| raw.strip_prefix('_'))
        .unwrap_or(raw);
    if s.starts_with("ZN") || s.starts_with('R') || raw.as_bytes().contains(&b'.') {
        Cow::Owned(demangle(raw))
    } else {
        Cow::Borrowed(raw)
    }
}

/// Parses a `--calls-to`/`--jumps-to` pattern: `*` matches any run of characters and
/// `?` one character; everything else matches itself. A pattern that could only be a
/// mistake is refused: an empty one (it matches no symbol), and one
/// with `[`, `]`, `{`, `}` or `\`, which a shell glob would treat as a character class,
/// a brace list or an escape, while here they would silently match only themselves.
pub fn parse_glob(pattern: &str) -> std::result::Result<String, String> {
    if pattern.is_empty() {
        return Err("an empty pattern matches no symbol".into());
    }
    if let Some(c) = pattern.chars().find(|c| "[]{}\\".contains(*c)) {
        return Err(format!(
            "`{c}` is not supported in a pattern: only `*` (any run of \
             characters) and `?` (one character) are; use `?` to match a `{c}`"
        ));
    }
    Ok(pattern.to_string())
}

/// A per-symbol answer not computed yet.
const UNKNOWN: u32 = u32::MAX;
/// A symbol that matches no glob.
const NO_MATCH: u32 = u32::MAX - 1;

/// The target names that match, and what each symbol resolved to (an index into
/// `names`, [`NO_MATCH`] or [`UNKNOWN`]): matched and demangled once per symbol, not
/// once per relocation, by whichever thread meets it first.
struct Targets<'o> {
    opts: &'o ScanOptions,
    /// The names, and each name's index (distinct symbols can share a name).
    names: Mutex<Names>,
    /// By symbol table index.
    by_symbol: Vec<AtomicU32>,
    /// Section symbols' targets, by the index ([`Image::sym`]) of the symbol defined there.
    by_defined: Vec<AtomicU32>,
}

/// The matching target names ([`FileScan::names`]), whether each matches a `--calls-to`
/// and a `--jumps-to` glob, and each name's index.
#[derive(Default)]
struct Names {
    names: Vec<String>,
    wants: Vec<Wants>,
    index: std::collections::HashMap<String, u32>,
}

/// Whether a name matches a `--calls-to` glob, and a `--jumps-to` one.
#[derive(Clone, Copy)]
struct Wants {
    call: bool,
    jump: bool,
}

impl Targets<'_> {
    /// The index in `names` of the symbol `key` of `cache` (named by `name`), if it
    /// matches.
    fn resolve<'n>(
        &self,
        cache: &[AtomicU32],
        key: usize,
        name: impl FnOnce() -> Option<&'n str>,
    ) -> Option<usize> {
        let slot = cache.get(key)?;
        let mut t = slot.load(Ordering::Relaxed);
        if t == UNKNOWN {
            let mut guard = self.names.lock().expect("no poisoning");
            let Names {
                names,
                wants,
                index,
            } = &mut *guard;
            t = slot.load(Ordering::Relaxed);
            if t == UNKNOWN {
                let w = name().map(|n| {
                    let w = Wants {
                        call: matches(&self.opts.calls_to, n),
                        jump: matches(&self.opts.jumps_to, n),
                    };
                    (n, w)
                });
                t = match w {
                    Some((n, w)) if w.call || w.jump => {
                        *index.entry(n.to_string()).or_insert_with(|| {
                            names.push(n.to_string());
                            wants.push(w);
                            // One per symbol: fewer than the symbol table's u32 indices.
                            (names.len() - 1) as u32
                        })
                    }
                    _ => NO_MATCH,
                };
                slot.store(t, Ordering::Relaxed);
            }
        }
        (t != NO_MATCH).then_some(t as usize)
    }
}

/// Scans one file's contents.
pub fn scan_bytes(path: &str, data: &[u8], opts: &ScanOptions) -> Result<FileScan> {
    let img = Image::parse(path, data)?;
    anyhow::ensure!(
        img.kind == ElfKind::Rel
            || img.has_text_relocations()
            || img.exec_sections().next().is_none(),
        "{path}: executable sections carry no relocations; link with --emit-relocs to scan a linked image"
    );
    let unknown = |n: usize| (0..n).map(|_| AtomicU32::new(UNKNOWN)).collect();
    let targets = Targets {
        opts,
        names: Mutex::new(Names::default()),
        by_symbol: unknown(img.symbol_count()),
        by_defined: unknown(img.defined_count()),
    };
    let select = |r: &Reloc| -> Option<Selected> {
        if img.target.reloc_class(r.r_type) != RelocClass::Branch {
            return None;
        }
        let target = if r.sym_is_section {
            let sec = r.sym_section?;
            let at = img.target.reloc_target(r);
            let i = img.symbol_at_index(sec, at)?;
            targets.resolve(&targets.by_defined, i, || Some(img.sym(i).name.as_str()))?
        } else {
            targets.resolve(&targets.by_symbol, r.sym_index, || target_name(&img, r))?
        };
        Some(Selected {
            target,
            target_addr: None,
        })
    };
    let mut scan = find_sites_with(&img, &select)?;
    let Names { names, wants, .. } = targets.names.into_inner().expect("no poisoning");
    scan.sites.retain(|s| match s.kind {
        SiteKind::Call => wants[s.target as usize].call,
        SiteKind::Jmp | SiteKind::Jcc => wants[s.target as usize].jump,
    });
    // Output order: by section name (names need not be unique: equal names rank
    // equal), then offset; a stable sort, so it is skipped when already in order.
    let mut by_name: Vec<usize> = (0..scan.sections.len()).collect();
    by_name.sort_by(|&a, &b| scan.sections[a].name.cmp(&scan.sections[b].name));
    let mut rank = vec![0u32; scan.sections.len()];
    for (k, w) in by_name.iter().enumerate() {
        rank[*w] = match k {
            0 => 0,
            _ if scan.sections[by_name[k - 1]].name == scan.sections[*w].name => {
                rank[by_name[k - 1]]
            }
            _ => k as u32,
        };
    }
    let key = |s: &FoundSite| (rank[s.section as usize], scan.section_offset(s));
    if !scan.sites.is_sorted_by_key(key) {
        let mut sites = std::mem::take(&mut scan.sites);
        sites.sort_by_key(|s| (rank[s.section as usize], scan.section_offset(s)));
        scan.sites = sites;
    }
    Ok(FileScan {
        file: path.to_string(),
        linked: img.kind != ElfKind::Rel,
        scan,
        names,
    })
}

/// Scans one file: one result, or one per ELF member of an `ar` archive (named
/// `lib.a(member.o)`, in archive order).
fn scan_file(f: &std::path::Path, opts: &ScanOptions) -> Vec<Result<FileScan>> {
    let data = match read_file(f).with_context(|| format!("cannot read {}", f.display())) {
        Ok(d) => d,
        Err(e) => return vec![Err(e)],
    };
    match crate::elf::inputs(&f.display().to_string(), &data) {
        Ok(members) => members
            .into_iter()
            .map(|(name, bytes)| scan_bytes(&name, bytes, opts))
            .collect(),
        Err(e) => vec![Err(e)],
    }
}

/// Scans many files in parallel (one worker per CPU); results come back in input order,
/// one per file or per ELF member of an archive.
pub fn scan_files(files: &[PathBuf], opts: &ScanOptions) -> Vec<Result<FileScan>> {
    if files.len() <= 1 {
        // No thread to start (nor CPUs to count) for one file.
        return files.iter().flat_map(|f| scan_file(f, opts)).collect();
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    let results: Vec<Mutex<Option<Vec<Result<FileScan>>>>> =
        files.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let r = scan_file(f, opts);
                    *results[i].lock().expect("no poisoning") = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .flat_map(|m| {
            m.into_inner()
                .expect("no poisoning")
                .expect("every file scanned")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{demangle, demangled, push_decimal, push_hex};

    #[test]
    fn names_are_demangled_as_demangle_does() {
        for n in [
            "__fentry__",
            "memcpy",
            "_",
            "",
            "R",
            "_R",
            "__R",
            "Rust",
            "_Z3foov",
            "ZN",
            "_ZN3foo3barE",
            "_ZN3foo3bar17h0123456789abcdefE",
            "__ZN3foo3bar17h0123456789abcdefE",
            "ZN3foo3bar17h0123456789abcdefE",
            "_ZN3foo3bar17h0123456789abcdefE.llvm.1234ABCD",
            "_RNvCs1234_7mycrate3foo",
            "RNvCs1234_7mycrate3foo",
            "__RNvCs1234_7mycrate3foo",
            "helper.llvm.1234ABCD",
            "helper.llvm.xyz",
            "helper.cold",
            "helper.part.0",
            "___ZN3foo3barE",
        ] {
            assert_eq!(demangled(n), demangle(n), "{n:?}");
        }
        // A C name is not copied.
        assert!(matches!(
            demangled("__fentry__"),
            std::borrow::Cow::Borrowed(_)
        ));
        // The cases the shortcut must not take.
        assert_eq!(demangled("helper.llvm.1234ABCD"), "helper");
        assert_eq!(demangled("_ZN3foo3barE"), "foo::bar");
    }

    #[test]
    fn numbers_print_as_format_does() {
        for v in [
            0,
            1,
            9,
            0xf,
            0x10,
            0x41,
            0x401041,
            u64::from(u32::MAX),
            1 << 63,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            push_hex(&mut b, v);
            assert_eq!(String::from_utf8(b).unwrap(), format!("{v:#x}"));
        }
        for v in 0..=u8::MAX {
            let mut b = Vec::new();
            push_decimal(&mut b, v);
            assert_eq!(String::from_utf8(b).unwrap(), v.to_string());
        }
    }
}
