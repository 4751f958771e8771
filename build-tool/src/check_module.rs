//! `ksites check-module`: runs kernel-loader's module loader on the host — lay out,
//! resolve, relocate, validate the table, into a buffer at the address the module would
//! get in the kernel, executing nothing — and reports whether the module would load.

use std::fmt::Write as _;
use std::ops::Range;

use anyhow::{Context, Result, bail};
use kernel_loader::CpuFeatures;
use kernel_loader::format::Table;
use kernel_loader::module::{
    self, Kernel, LoadReport, ModuleError, ModuleMemory, PAGE_SIZE, Prot, Region, RelocationProblem,
};
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{LittleEndian, Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind};

/// The kernel a module is checked against.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// Exported names and addresses.
    pub symbols: Vec<(String, u64)>,
    /// Executable ranges.
    pub exec: Vec<Range<u64>>,
    /// The kernel's `.ksites` table bytes and address, if it has one.
    pub table: Option<(Vec<u8>, u64)>,
    /// What the symbols came from.
    pub source: String,
    /// Whether they came from a `System.map`-style text file (which says nothing of
    /// ifuncs).
    pub map: bool,
}

impl KernelSymbols {
    /// Reads an ELF kernel image (its symbol table, executable sections and `.ksites`)
    /// or a `System.map`-style text file (`ADDRESS TYPE NAME` per line; `t`/`T` symbols
    /// make up the executable range).
    pub fn read(name: &str, data: &[u8]) -> Result<KernelSymbols> {
        if data.starts_with(b"\x7fELF") {
            return Self::from_elf(name, data);
        }
        let text = std::str::from_utf8(data)
            .with_context(|| format!("{name}: neither an ELF file nor a text symbol map"))?;
        Self::from_map(name, text)
    }

    fn from_elf(name: &str, data: &[u8]) -> Result<KernelSymbols> {
        let f = ElfFile64::<LittleEndian>::parse(data)
            .with_context(|| format!("{name}: not a 64-bit little-endian ELF file"))?;
        let symbols = f
            .symbols()
            .filter(|s| s.is_definition() && s.is_global())
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
            .collect();
        let exec = f
            .sections()
            .filter(|s| s.kind() == SectionKind::Text && s.size() > 0)
            .map(|s| s.address()..s.address() + s.size())
            .collect();
        let table = f
            .section_by_name(kernel_loader::format::SECTION_NAME)
            .filter(|s| s.elf_section_header().sh_type(LittleEndian).0 != object::elf::SHT_NOBITS.0)
            .and_then(|s| Some((s.data().ok()?.to_vec(), s.address())));
        Ok(KernelSymbols {
            symbols,
            exec,
            table,
            source: name.to_string(),
            map: false,
        })
    }

    fn from_map(name: &str, text: &str) -> Result<KernelSymbols> {
        let mut symbols = Vec::new();
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(addr), Some(ty), Some(sym)) = (it.next(), it.next(), it.next()) else {
                bail!(
                    "{name}:{}: expected `ADDRESS TYPE NAME`, found {line:?}",
                    n + 1
                );
            };
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16)
                .with_context(|| format!("{name}:{}: bad address {addr:?}", n + 1))?;
            if ty.eq_ignore_ascii_case("t") {
                lo = lo.min(addr);
                hi = hi.max(addr);
            }
            // Local symbols (lower-case types) are not exported, except that `t` still
            // marks text for the executable range above.
            if ty.chars().all(|c| c.is_ascii_uppercase()) || ty == "w" || ty == "v" {
                symbols.push((sym.to_string(), addr));
            }
        }
        // The map has no sizes: the range runs to one page past the last text symbol.
        let exec: Vec<Range<u64>> = (lo <= hi)
            .then(|| lo..hi.saturating_add(PAGE_SIZE as u64))
            .into_iter()
            .collect();
        Ok(KernelSymbols {
            symbols,
            exec,
            table: None,
            source: name.to_string(),
            map: true,
        })
    }

    /// Where a kernel's module arena would plausibly start: the first 2 MiB boundary
    /// past its highest executable address (within rel32 reach of all of it).
    pub fn default_load_address(&self) -> u64 {
        let end = self.exec.iter().map(|r| r.end).max().unwrap_or(0x4000_0000);
        end.div_ceil(0x20_0000) * 0x20_0000
    }
}

/// Kernel symbols by name; with no kernel given (`any_at`), every name resolves to
/// one placeholder address in reach, so layout and relocation can still be checked.
struct Lookup<'a> {
    kernel: &'a KernelSymbols,
    any_at: Option<u64>,
}

impl module::Symbols for Lookup<'_> {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.kernel
            .symbols
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, a)| a)
            .or(self.any_at)
    }
}

/// Largest module `check` lays out (256 MiB).
pub const MAX_MODULE_SIZE: usize = 256 << 20;

/// A host buffer posing as kernel memory at `addr`.
struct Buffer {
    addr: u64,
    bufs: Vec<Vec<u8>>,
}

impl ModuleMemory for Buffer {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        // A module object can ask for any size (a huge NOBITS section): refuse what no
        // kernel arena would give rather than abort on the host.
        if size > MAX_MODULE_SIZE {
            return None;
        }
        let mut v = vec![0u8; size];
        let r = Region {
            ptr: v.as_mut_ptr(),
            addr: self.addr,
            size,
        };
        self.bufs.push(v);
        Some(r)
    }

    unsafe fn protect(
        &mut self,
        _: &Region,
        _: usize,
        _: usize,
        _: Prot,
    ) -> Result<(), kernel_loader::module::ProtectError> {
        Ok(())
    }

    unsafe fn free(&mut self, region: Region) {
        self.bufs.retain(|b| b.as_ptr() != region.ptr.cast_const());
    }
}

/// The outcome of a check.
#[derive(Debug)]
pub struct CheckReport {
    /// Every problem found (empty: the module would load).
    pub problems: Vec<String>,
    /// Undefined symbols and what they resolved to (`None`: unresolved).
    pub imports: Vec<(String, Option<u64>)>,
    /// What loading would do, if it would load.
    pub load: Option<LoadReport>,
    /// The address the module was laid out at.
    pub addr: u64,
    /// Whether undefined symbols were checked against a kernel.
    pub symbols_checked: bool,
    /// The kernel ifuncs the module imports (its `.ksites` table's imports).
    pub ifunc_imports: Vec<String>,
    /// Why those imports could not be checked to be kernel ifuncs (`None`: they were,
    /// against the kernel's `.ksites` table).
    pub imports_unchecked: Option<String>,
    /// The module table's static keys: (keys, of which imported, key sites).
    pub keys: (u32, u32, u32),
}

/// Checks that `data` is what a module is, an ELF64 little-endian relocatable object,
/// and otherwise says what it is instead: an empty file, text, an archive, a 32-bit or
/// big-endian ELF file, a core file, a linked executable. (Such input is malformed, not
/// a module that would not load.)
pub fn check_input(name: &str, data: &[u8]) -> Result<()> {
    use object::elf;
    let what = if data.is_empty() {
        "an empty file".to_string()
    } else if data.starts_with(b"!<arch>\n") || data.starts_with(b"!<thin>\n") {
        "an ar archive (check its members one by one: `ar x`)".to_string()
    } else if !data.starts_with(&elf::ELFMAG) {
        "not an ELF file".to_string()
    } else if data.get(4 /* EI_CLASS */) == Some(&elf::ELFCLASS32.0) {
        "a 32-bit ELF file".to_string()
    } else if data.get(5 /* EI_DATA */) == Some(&elf::ELFDATA2MSB.0) {
        "a big-endian ELF file".to_string()
    } else if data.len() < 64 {
        format!("a truncated ELF header ({} bytes)", data.len())
    } else {
        match elf::FileType(u16::from_le_bytes([data[16], data[17]])) {
            elf::ET_REL => return Ok(()),
            elf::ET_EXEC => "a linked executable (ET_EXEC)".to_string(),
            elf::ET_DYN => "a shared object or PIE (ET_DYN)".to_string(),
            elf::ET_CORE => "a core file (ET_CORE)".to_string(),
            t => format!("an ELF file of type {:#x}", t.0),
        }
    };
    bail!(
        "{name}: {what}, not a module (an ELF64 little-endian relocatable object, as `gcc -c` makes)"
    )
}

/// Whether a loader error means the object is malformed (exit status 1) rather than a
/// well-formed module that would not load (4).
fn is_malformed(e: &ModuleError) -> bool {
    matches!(
        e,
        ModuleError::Elf(_)
            | ModuleError::NotRelocatable { .. }
            | ModuleError::Malformed(_)
            | ModuleError::BadRelocation {
                why: RelocationProblem::SymbolOutOfRange | RelocationProblem::OutsideSection,
                ..
            }
    )
}

/// Checks `module` against `kernel` at `addr` (default: [`KernelSymbols::default_load_address`]).
/// With `kernel` `None`, undefined symbols are not checked (each resolves to a
/// placeholder just below the module) and are listed as what the kernel must export.
pub fn check(
    module: &[u8],
    kernel: Option<&KernelSymbols>,
    addr: Option<u64>,
) -> Result<CheckReport> {
    let none = KernelSymbols::default();
    let checked = kernel.is_some();
    let kernel = kernel.unwrap_or(&none);
    let addr = addr.unwrap_or_else(|| kernel.default_load_address());
    if !addr.is_multiple_of(PAGE_SIZE as u64) {
        bail!("load address {addr:#x} is not page-aligned");
    }
    let table = match &kernel.table {
        Some((bytes, at)) => Some(
            Table::parse(bytes, *at, &kernel.exec)
                .with_context(|| format!("{}: invalid .ksites table", kernel.source))?,
        ),
        None => None,
    };
    let any_at = (!checked).then(|| addr.saturating_sub(PAGE_SIZE as u64));
    let lookup = Lookup { kernel, any_at };
    // With no kernel, the placeholder page stands for the kernel's text.
    let exec: Vec<Range<u64>> = match any_at {
        Some(a) => std::iter::once(a..a + PAGE_SIZE as u64).collect(),
        None => kernel.exec.clone(),
    };
    let k = Kernel {
        symbols: &lookup,
        table,
        exec: &exec,
        features: CpuFeatures::empty(),
    };
    let mut mem = Buffer {
        addr,
        bufs: Vec::new(),
    };
    let mut problems = Vec::new();
    let mut malformed = None;
    let mut note = |e: ModuleError, problems: &mut Vec<String>| {
        let s = e.to_string();
        if is_malformed(&e) && malformed.is_none() {
            malformed = Some(s.clone());
        }
        if !problems.contains(&s) {
            problems.push(s);
        }
    };
    let r = module::check(module, &k, &mut mem, &mut |e| note(e, &mut problems));
    let load = match r {
        Ok(rep) => Some(rep),
        Err(e) => {
            note(e, &mut problems);
            None
        }
    };
    if let Some(m) = malformed {
        bail!("malformed module object: {m}");
    }
    let imports_unchecked = if !checked {
        Some("no --kernel-symbols".to_string())
    } else if kernel.table.is_some() {
        None
    } else if kernel.map {
        Some(format!(
            "{} is a System.map, which does not say which symbols are ifuncs",
            kernel.source
        ))
    } else {
        Some(format!(
            "{} has no .ksites table (not embedded), so its ifuncs are not known",
            kernel.source
        ))
    };
    Ok(CheckReport {
        problems,
        imports: undefined_symbols(module)
            .into_iter()
            .map(|n| {
                let a = module::Symbols::lookup(&lookup, &n);
                (n, a)
            })
            .collect(),
        load,
        addr,
        symbols_checked: checked,
        ifunc_imports: ifunc_imports(module),
        imports_unchecked,
        keys: key_counts(module),
    })
}

/// (keys, imported keys, key sites) of an embedded module's table, read from its
/// header and key descriptors (whose flags no relocation changes); zeros without one.
fn key_counts(data: &[u8]) -> (u32, u32, u32) {
    use kernel_loader::format::{Header, KEY_DESC_SIZE, KEY_IMPORTED, KeyDesc};
    let Ok(f) = ElfFile64::<LittleEndian>::parse(data) else {
        return (0, 0, 0);
    };
    let Some(b) = f
        .section_by_name(kernel_loader::format::SECTION_NAME)
        .and_then(|t| t.data().ok())
    else {
        return (0, 0, 0);
    };
    let Ok(h) = Header::read(b) else {
        return (0, 0, 0);
    };
    let imported = (0..h.keys.count as usize)
        .filter_map(|i| {
            let at = (h.keys.offset as usize).checked_add(i.checked_mul(KEY_DESC_SIZE)?)?;
            b.get(at..at.checked_add(KEY_DESC_SIZE)?)
        })
        .filter(|d| KeyDesc::read(d).flags & KEY_IMPORTED != 0)
        .count() as u32;
    (h.keys.count, imported, h.key_sites.count)
}

/// The names of the kernel ifuncs an embedded module imports: the undefined symbols its
/// `.ksites` table's ifunc descriptors are relocated against (see [`crate::embed`]'s
/// module format; an imported static key's descriptor is relocated against its
/// undefined symbol too, and is no ifunc).
fn ifunc_imports(data: &[u8]) -> Vec<String> {
    let Ok(f) = ElfFile64::<LittleEndian>::parse(data) else {
        return Vec::new();
    };
    let Some(t) = f.section_by_name(kernel_loader::format::SECTION_NAME) else {
        return Vec::new();
    };
    let Some(ifuncs) = t
        .data()
        .ok()
        .and_then(|b| kernel_loader::format::Header::read(b).ok())
        .map(|h| {
            let start = u64::from(h.ifuncs.offset);
            start..start + u64::from(h.ifuncs.count) * kernel_loader::format::IFUNC_DESC_SIZE as u64
        })
    else {
        return Vec::new();
    };
    let mut names: Vec<String> = t
        .relocations()
        .filter(|(at, _)| ifuncs.contains(at))
        .filter_map(|(_, r)| match r.target() {
            object::RelocationTarget::Symbol(i) => f.symbol_by_index(i).ok(),
            _ => None,
        })
        .filter(|s| s.is_undefined())
        .filter_map(|s| Some(s.name().ok()?.to_string()))
        .collect();
    names.dedup();
    names
}

/// The module's undefined (non-weak or weak) symbol names, in symbol-table order.
fn undefined_symbols(data: &[u8]) -> Vec<String> {
    let Ok(f) = ElfFile64::<LittleEndian>::parse(data) else {
        return Vec::new();
    };
    if f.kind() != object::ObjectKind::Relocatable {
        return Vec::new();
    }
    f.symbols()
        .filter(|s| s.is_undefined() && !s.name().unwrap_or("").is_empty())
        .filter_map(|s| Some(s.name().ok()?.to_string()))
        .collect()
}

/// Text output.
pub fn to_text(name: &str, r: &CheckReport) -> String {
    let mut o = String::new();
    match &r.load {
        Some(l) if r.problems.is_empty() => {
            let _ = writeln!(
                o,
                "{name}: would load at {:#x}: {} sections ({} code, {} read-only, {} writable bytes), {} relocations, {} veneers, {} kernel symbols, {} ifuncs, {} imported ifuncs, {} ifunc sites, {} probes, {} probe sites",
                r.addr,
                l.sections,
                l.text_size,
                l.ro_size,
                l.rw_size,
                l.relocations,
                l.veneers,
                l.kernel_symbols,
                l.ifuncs,
                l.imports,
                l.sites,
                l.probes,
                l.probe_sites
            );
            // Static keys are counted when there are any (the line is unchanged without).
            if r.keys.0 != 0 {
                o.pop();
                let _ = writeln!(
                    o,
                    ", {} keys ({} imported), {} key sites",
                    r.keys.0, r.keys.1, r.keys.2
                );
            }
        }
        _ => {
            let _ = writeln!(
                o,
                "{name}: would NOT load ({} problem(s)):",
                r.problems.len()
            );
            for p in &r.problems {
                let _ = writeln!(o, "  {p}");
            }
        }
    }
    if let Some(why) = &r.imports_unchecked {
        for n in &r.ifunc_imports {
            let _ = writeln!(o, "  import {n}: not checked to be a kernel ifunc ({why})");
        }
    }
    if !r.symbols_checked {
        let names: Vec<_> = r.imports.iter().map(|(n, _)| n.as_str()).collect();
        let _ = writeln!(
            o,
            "  needs from the kernel (not checked: no --kernel-symbols): {}",
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        );
        return o;
    }
    let unresolved: Vec<_> = r
        .imports
        .iter()
        .filter(|(_, a)| a.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !unresolved.is_empty() {
        let _ = writeln!(o, "  unresolved symbols: {}", unresolved.join(", "));
    }
    o
}

/// JSON output.
pub fn to_json(name: &str, r: &CheckReport) -> serde_json::Value {
    serde_json::json!({
        "file": name,
        "loads": r.problems.is_empty() && r.load.is_some(),
        "address": r.addr,
        "symbols_checked": r.symbols_checked,
        "ifunc_imports": r.ifunc_imports,
        "ifunc_imports_checked": r.imports_unchecked.is_none(),
        "ifunc_imports_not_checked_because": r.imports_unchecked,
        "keys": r.keys.0,
        "imported_keys": r.keys.1,
        "key_sites": r.keys.2,
        "problems": r.problems,
        "imports": r.imports.iter().map(|(n, a)| serde_json::json!({"name": n, "address": a})).collect::<Vec<_>>(),
        "report": r.load.map(|l| serde_json::json!({
            "sections": l.sections,
            "relocations": l.relocations,
            "veneers": l.veneers,
            "kernel_symbols": l.kernel_symbols,
            "ifuncs": l.ifuncs,
            "imports": l.imports,
            "sites": l.sites,
            "probes": l.probes,
            "probe_sites": l.probe_sites,
        })),
    })
}
