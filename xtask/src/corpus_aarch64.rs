//! `cargo xtask corpus-aarch64` (a step of `cargo xtask test`): `ksites check-module` and
//! `ksites embed` on a few hundred arm64 objects of real C code.
//!
//! The C corpus ([`crate::corpus`]: Lua, zstd, xz, zlib, bzip2, lcms2, libdeflate,
//! libwebp) is compiled with `aarch64-linux-gnu-gcc` and kernel-like flags ([`CFLAGS`]:
//! `-fno-pic -mgeneral-regs-only -ffreestanding`, no unwind tables), every file once,
//! and a part of it again with `-mcmodel=large`, `-mcmodel=tiny` and
//! `-ffunction-sections` (see [`VARIANTS`]), into `target/ksites-corpus-aarch64/obj/` (cached, keyed by the
//! sources, the compiler and the flags). A file gcc refuses under
//! `-mgeneral-regs-only` because it uses floating point is compiled without that flag,
//! as Kbuild compiles its FPU files (arm64 `CC_FLAGS_FPU`/`CC_FLAGS_NO_FPU`), and counted.
//!
//! Every object must:
//! 1. load under `ksites check-module` with no kernel (exit 0, "would load": every
//!    relocation applied, undefined symbols at the placeholder below the module), with
//!    as many relocations applied as binutils' `readelf -r` lists;
//! 2. load again with a System.map placing each of its undefined symbols 1 GiB below
//!    the module, so every `bl`/`b` to the kernel is out of reach and goes through a
//!    veneer the loader builds (not the `-mcmodel=tiny` objects: their `adr` reaches
//!    1 MiB);
//! 3. go through `ksites embed` (exit 0) with no ifunc or probe found (real C has
//!    none); a module always gets a table, so the output is the input plus an empty
//!    `.ksites` and `.rela.ksites`, every other section's bytes and relocations the
//!    same, and it loads under `check-module` too.
//!
//! The step prints the counts: objects, relocations applied, the relocation types
//! (readelf's names) with their counts, objects with veneers, and fails on any failure,
//! naming the object and quoting ksites.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use xshell::Shell;

use crate::corpus::{self, Unit};
use crate::{host, install};

/// The cross compiler (Debian `gcc-aarch64-linux-gnu`).
const CC: &str = "aarch64-linux-gnu-gcc";
/// binutils' readelf for arm64, an independent count of the relocations.
const READELF: &str = "aarch64-linux-gnu-readelf";
/// What Kbuild passes for an arm64 kernel object, reduced to what matters for code
/// shape (`-w`: these are user-space libraries built freestanding).
const CFLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-PIE",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-stack-protector",
    "-w",
];
/// Flags for one library that make it kernel-like. zstd's tracing hooks are weak
/// undefined functions whose address it tests; gcc reaches a weak undefined symbol
/// through the GOT even with `-fno-pic` (`R_AARCH64_ADR_GOT_PAGE`,
/// `LD64_GOT_LO12_NC`), which no kernel module loader applies (Linux's arm64
/// `apply_relocate_add` refuses them; the kernel's own copy of zstd is built without
/// tracing), so tracing is off, as in the kernel.
const LIBRARY_FLAGS: &[(&str, &[&str])] = &[("zstd-sys", &["-DZSTD_TRACE=0"])];
/// The flag floating-point files drop (Kbuild's arm64 `CC_FLAGS_NO_FPU`).
const NO_FPU: &str = "-mgeneral-regs-only";

/// One way of compiling (a part of) the corpus.
#[derive(Debug)]
struct Variant {
    /// Subdirectory of `obj/`.
    dir: &'static str,
    /// Added to [`CFLAGS`].
    flags: &'static [&'static str],
    /// The crates compiled this way (empty: all).
    crates: &'static [&'static str],
    /// Whether its objects can reach a kernel 1 GiB away (the second check).
    far: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        dir: "small",
        flags: &[],
        crates: &[],
        far: true,
    },
    // Literal pools in the text (ABS64 in `.text`) instead of `adrp` + `:lo12:`: how
    // Linux once built arm64 modules (`CONFIG_ARM64_MODULE_CMODEL_LARGE`).
    Variant {
        dir: "large",
        flags: &["-mcmodel=large", "-mpc-relative-literal-loads"],
        crates: &["lua-src"],
        far: true,
    },
    // `adr` (ADR_PREL_LO21, ±1 MiB) for every address: the module and what it uses
    // within 1 MiB, so not checked with the kernel far away.
    Variant {
        dir: "tiny",
        flags: &["-mcmodel=tiny"],
        crates: &["libz-sys", "bzip2-sys"],
        far: false,
    },
    // A section per function and per datum: calls and references between sections the
    // loader places apart, relocated against section symbols.
    Variant {
        dir: "sections",
        flags: &["-ffunction-sections", "-fdata-sections"],
        crates: &["zstd-sys", "libdeflate-sys"],
        far: true,
    },
];

/// Where the second check lays each module out ...
const FAR_LOAD: u64 = 0x8000_0000;
/// ... and puts the kernel's symbols: 1 GiB below, out of `bl` reach (±128 MiB) and in
/// reach of everything else (`adrp` ±4 GiB, PREL32 ±2 GiB, ABS32 below 4 GiB).
const FAR_KERNEL: u64 = 0x4000_0000;

/// A compiled object.
#[derive(Debug)]
struct Object {
    /// Relative to `obj/`.
    path: String,
    /// Compiled without [`NO_FPU`] (it uses floating point).
    fpu: bool,
}

impl Object {
    /// Whether its variant can reach a kernel 1 GiB away.
    fn far(&self) -> bool {
        VARIANTS
            .iter()
            .any(|v| v.far && self.path.starts_with(&format!("{}/", v.dir)))
    }
}

/// What the checks of one object found.
#[derive(Debug, Default)]
struct Checked {
    relocations: u64,
    types: BTreeMap<String, u64>,
    /// Checked with the kernel far away (and then how many veneers it needed).
    far: bool,
    veneers: u64,
}

/// The step: builds the tool and the corpus, checks every object, prints the counts;
/// returns the number of objects checked.
pub(crate) fn run(sh: &Shell, root: &Path) -> Result<u32> {
    install::host_tool(sh, CC, "gcc-aarch64-linux-gnu")?;
    install::host_tool(sh, READELF, "binutils-aarch64-linux-gnu")?;
    let ksites = host::build_tool(sh, root)?;
    let dir = root.join("target/ksites-corpus-aarch64");
    let start = Instant::now();
    let objects = prepare(&dir)?;
    println!(
        "xtask: aarch64 corpus: {} objects ready in {:.1?}",
        objects.len(),
        start.elapsed()
    );
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let obj = dir.join("obj");
    let start = Instant::now();
    let checked = corpus::parallel(&objects, |o| check(&ksites, &obj, &work, o))?;
    let _ = std::fs::remove_dir_all(&work);
    ensure!(!checked.is_empty(), "the aarch64 corpus has no objects");
    println!("{}", summary(&objects, &checked, start.elapsed()));
    Ok(u32::try_from(objects.len()).unwrap_or(u32::MAX))
}

/// The key of the corpus: sources, compiler, flags, variants.
fn key() -> String {
    corpus::key(&format!("{CC}{CFLAGS:?}{LIBRARY_FLAGS:?}{VARIANTS:?}"))
}

/// Builds the corpus in `dir` unless its listing has the current key; returns the
/// objects.
fn prepare(dir: &Path) -> Result<Vec<Object>> {
    let key = key();
    if let Some(lines) = corpus::cached(dir, &key) {
        return Ok(lines.iter().filter_map(|l| parse_line(l)).collect());
    }
    let units = corpus::unpack(dir)?;
    let obj = dir.join("obj");
    let _ = std::fs::remove_dir_all(&obj);
    std::fs::create_dir_all(&obj)?;
    let jobs: Vec<(&Variant, &Unit)> = VARIANTS
        .iter()
        .flat_map(|v| {
            units
                .iter()
                .filter(|u| v.crates.is_empty() || v.crates.contains(&u.source.krate))
                .map(move |u| (v, u))
        })
        .collect();
    println!(
        "xtask: compiling the aarch64 corpus: {} objects from {} files with {CC} {}",
        jobs.len(),
        units.len(),
        CFLAGS.join(" ")
    );
    let objects = corpus::parallel(&jobs, |(v, u)| {
        let path = format!("{}/{}", v.dir, u.object());
        let out = obj.join(&path);
        let library = LIBRARY_FLAGS
            .iter()
            .filter(|(k, _)| *k == u.source.krate)
            .flat_map(|(_, f)| f.iter());
        let mut flags: Vec<&str> = CFLAGS
            .iter()
            .chain(v.flags)
            .chain(library)
            .copied()
            .collect();
        let r = u.compile(CC, &flags, &out)?;
        if r.status.success() {
            return Ok(Object { path, fpu: false });
        }
        if !String::from_utf8_lossy(&r.stderr).contains(NO_FPU) {
            bail!("{}", u.failed(CC, &r));
        }
        flags.retain(|f| *f != NO_FPU);
        let r = u.compile(CC, &flags, &out)?;
        if !r.status.success() {
            bail!("{}", u.failed(CC, &r));
        }
        Ok(Object { path, fpu: true })
    })?;
    let lines: Vec<String> = objects
        .iter()
        .map(|o| {
            if o.fpu {
                format!("{} fpu", o.path)
            } else {
                o.path.clone()
            }
        })
        .collect();
    corpus::write_listing(dir, &key, &lines)?;
    Ok(objects)
}

/// A listing line: `PATH` or `PATH fpu`.
fn parse_line(line: &str) -> Option<Object> {
    let mut words = line.split_whitespace();
    let path = words.next()?.to_string();
    Some(Object {
        path,
        fpu: words.next() == Some("fpu"),
    })
}

/// Checks one object (see the module documentation).
fn check(ksites: &Path, obj: &Path, work: &Path, o: &Object) -> Result<Checked> {
    let path = obj.join(&o.path);
    let name = o.path.replace('/', "_");
    let relocs = readelf(&path)?;
    let listed = relocs.total();

    // 1. No kernel: undefined symbols at the placeholder.
    let mut cmd = Command::new(ksites);
    cmd.arg("check-module").arg("--json").arg(&path);
    let near = loads(&path, &mut cmd)?;
    let mut c = Checked {
        relocations: number(&near, "relocations"),
        ..Checked::default()
    };
    ensure!(
        c.relocations == listed,
        "{}: check-module applied {} relocations, readelf lists {listed}",
        path.display(),
        c.relocations
    );

    ensure!(
        number(&near, "veneers") == 0,
        "{}: veneers with every symbol in reach",
        path.display()
    );

    // 2. The kernel 1 GiB away: calls to it through veneers.
    if o.far() {
        let imports: Vec<&str> = near["imports"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
            .unwrap_or_default();
        let mut map = String::new();
        for (i, n) in (0u64..).zip(&imports) {
            let _ = writeln!(map, "{:016x} T {n}", FAR_KERNEL + 16 * i);
        }
        let map_path = work.join(format!("{name}.map"));
        std::fs::write(&map_path, map)?;
        let mut cmd = Command::new(ksites);
        cmd.arg("check-module")
            .arg("--json")
            .arg("--kernel-symbols")
            .arg(&map_path)
            .arg("--load-address")
            .arg(format!("{FAR_LOAD:x}"))
            .arg(&path);
        let far = loads(&path, &mut cmd)?;
        ensure!(
            number(&far, "relocations") == listed,
            "{}: with the kernel far away, check-module applied {} relocations, readelf lists {listed}",
            path.display(),
            number(&far, "relocations")
        );
        c.veneers = number(&far, "veneers");
        c.far = true;
        // One veneer per kernel function called (the loader shares them by target).
        let called = imports
            .iter()
            .filter(|n| relocs.branch_targets.contains(**n))
            .count() as u64;
        ensure!(
            c.veneers == called,
            "{}: with the kernel far away, {} veneers for {called} kernel functions called",
            path.display(),
            c.veneers
        );
        let _ = std::fs::remove_file(&map_path);
    }

    // 3. embed: an empty table added, nothing else changed, and the result loads.
    let out_path = work.join(format!("{name}.embedded.o"));
    let out = run_ksites(
        Command::new(ksites)
            .arg("embed")
            .arg(&path)
            .arg("-o")
            .arg(&out_path),
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}: ksites embed failed ({}): {}{said}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        said.contains(": 0 ifuncs, 0 sites, 0 other references, 0 probes, 0 probe sites;"),
        "{}: ksites embed found ifuncs or probes in plain C: {said}",
        path.display()
    );
    let (input, output) = (std::fs::read(&path)?, std::fs::read(&out_path)?);
    same_but_table(&input, &output).with_context(|| format!("{}: ksites embed", path.display()))?;
    let mut cmd = Command::new(ksites);
    cmd.arg("check-module").arg("--json").arg(&out_path);
    let embedded = loads(&path, &mut cmd)
        .with_context(|| format!("{}: after ksites embed", path.display()))?;
    let listed_after = readelf(&out_path)?.total();
    ensure!(
        number(&embedded, "relocations") == listed_after,
        "{}: embedded, check-module applied {} relocations, readelf lists {listed_after}",
        path.display(),
        number(&embedded, "relocations")
    );
    let _ = std::fs::remove_file(&out_path);
    c.types = relocs.types;
    Ok(c)
}

fn run_ksites(cmd: &mut Command) -> Result<Output> {
    cmd.output().context("cannot run ksites")
}

/// Runs `check-module --json`; the JSON if it exits 0 and says the module loads.
fn loads(path: &Path, cmd: &mut Command) -> Result<serde_json::Value> {
    let out = run_ksites(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{}: ksites check-module refused it ({}): {err}{text}",
        path.display(),
        out.status
    );
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: check-module --json printed {text}", path.display()))?;
    ensure!(
        v["loads"] == true,
        "{}: check-module exited 0 but does not say it would load: {text}",
        path.display()
    );
    Ok(v)
}

/// `report.KEY` of a check-module JSON.
fn number(v: &serde_json::Value, key: &str) -> u64 {
    v["report"][key].as_u64().unwrap_or(u64::MAX)
}

/// Checks that `output` (`ksites embed`'s) is `input` plus `.ksites` and
/// `.rela.ksites`: every other section in the same order with the same name, flags and
/// bytes, and the same relocations (offset, type, addend, and target by name), whatever
/// the symbol indices became. The symbol and string tables are compared through the
/// relocations.
fn same_but_table(input: &[u8], output: &[u8]) -> Result<()> {
    let (a, b) = (object::File::parse(input)?, object::File::parse(output)?);
    let (sa, sb) = (kept_sections(&a), kept_sections(&b));
    let table: Vec<String> = b
        .sections()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .filter(|n| n.contains(".ksites"))
        .collect();
    ensure!(
        table == [".ksites", ".rela.ksites"],
        "added sections {table:?}, expected .ksites and .rela.ksites"
    );
    ensure!(
        sa.len() == sb.len(),
        "{} sections became {}",
        sa.len(),
        sb.len()
    );
    for (x, y) in sa.iter().zip(&sb) {
        let name = x.name()?;
        ensure!(name == y.name()?, "section {name} became {}", y.name()?);
        ensure!(x.flags() == y.flags(), "section {name}: flags changed");
        ensure!(x.data()? == y.data()?, "section {name}: contents changed");
        let (ra, rb) = (relocations(&a, x)?, relocations(&b, y)?);
        ensure!(ra == rb, "section {name}: relocations changed");
    }
    Ok(())
}

/// The sections `embed` must keep as they are (all but the symbol, string and
/// relocation tables, which it rewrites, and its own).
fn kept_sections<'d, 'f>(f: &'f object::File<'d>) -> Vec<object::Section<'d, 'f>> {
    f.sections()
        .filter(|s| {
            let n = s.name().unwrap_or("");
            !(n.starts_with(".rela")
                || n.contains(".ksites")
                || [".symtab", ".strtab", ".shstrtab"].contains(&n))
        })
        .collect()
}

/// A section's relocations: offset, type, addend, and the target's name (the section's
/// for a section symbol).
fn relocations(
    f: &object::File<'_>,
    s: &object::Section<'_, '_>,
) -> Result<Vec<(u64, object::RelocationFlags, i64, String)>> {
    let mut out = Vec::new();
    for (off, r) in s.relocations() {
        let target = match r.target() {
            object::RelocationTarget::Symbol(i) => {
                let sym = f.symbol_by_index(i)?;
                match sym.section_index() {
                    Some(si) if sym.kind() == object::SymbolKind::Section => {
                        f.section_by_index(si)?.name()?.to_string()
                    }
                    _ => sym.name()?.to_string(),
                }
            }
            other => format!("{other:?}"),
        };
        out.push((off, r.flags(), r.addend(), target));
    }
    Ok(out)
}

/// What `readelf -rW` lists: the relocation types (binutils' names) with counts, the
/// `NONE` relocation not counted (there is nothing to apply), and the symbols `bl`/`b`
/// relocations (CALL26/JUMP26) go to.
#[derive(Debug, Default)]
struct Listed {
    types: BTreeMap<String, u64>,
    branch_targets: BTreeSet<String>,
}

impl Listed {
    fn total(&self) -> u64 {
        self.types.values().sum()
    }
}

fn readelf(path: &Path) -> Result<Listed> {
    let out = Command::new(READELF)
        .arg("-rW")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {READELF}"))?;
    ensure!(
        out.status.success(),
        "{READELF} -rW {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_readelf(&String::from_utf8_lossy(&out.stdout)))
}

/// Reads each relocation line (`OFFSET INFO TYPE [VALUE NAME + ADDEND]`).
fn parse_readelf(text: &str) -> Listed {
    let mut l = Listed::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [off, info, ty, rest @ ..] = words.as_slice() else {
            continue;
        };
        let hex = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(off) || !hex(info) || !ty.starts_with("R_") || ty.ends_with("_NONE") {
            continue;
        }
        *l.types.entry(ty.to_string()).or_insert(0) += 1;
        if let ("R_AARCH64_CALL26" | "R_AARCH64_JUMP26", [_, name, ..]) = (*ty, rest) {
            l.branch_targets.insert(name.to_string());
        }
    }
    l
}

/// The step's report.
fn summary(objects: &[Object], checked: &[Checked], took: std::time::Duration) -> String {
    let fpu = objects.iter().filter(|o| o.fpu).count();
    let relocations: u64 = checked.iter().map(|c| c.relocations).sum();
    let mut types: BTreeMap<&str, u64> = BTreeMap::new();
    for c in checked {
        for (t, n) in &c.types {
            *types.entry(t).or_insert(0) += n;
        }
    }
    let mut by_count: Vec<_> = types.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let with_veneers = checked.iter().filter(|c| c.veneers > 0).count();
    let far = checked.iter().filter(|c| c.far).count();
    let veneers: u64 = checked.iter().map(|c| c.veneers).sum();
    let mut s = format!(
        "xtask: aarch64 corpus: {} objects checked in {took:.1?} ({} with {NO_FPU}, {fpu} \
         floating-point files without it as Kbuild's FPU files), 0 failures\n\
         xtask: check-module: every object would load; {relocations} relocations applied \
         (each object's count equal to readelf's), {} types:\n",
        objects.len(),
        objects.len() - fpu,
        by_count.len()
    );
    for (t, n) in &by_count {
        let _ = writeln!(s, "xtask:   {t:<32} {n:>7}");
    }
    let _ = write!(
        s,
        "xtask: veneers: none with the kernel's symbols in reach; with them 1 GiB away \
         ({far} objects; not the -mcmodel=tiny ones), {with_veneers} objects need {veneers} \
         veneers, and load\n\
         xtask: embed: all {} objects got an empty table, nothing else changed, and load",
        objects.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readelf_lines_are_counted_by_type() {
        let text = "\
Relocation section '.rela.text' at offset 0x1c8 contains 3 entries:
    Offset             Info             Type               Symbol's Value  Symbol's Name + Addend
0000000000000008  000000090000011b R_AARCH64_CALL26       0000000000000000 foo + 0
0000000000000010  0000000300000113 R_AARCH64_ADR_PREL_PG_HI21 0000000000000000 .rodata + 8
0000000000000014  000000090000011b R_AARCH64_CALL26       0000000000000000 bar + 0
0000000000000018  0000000000000000 R_AARCH64_NONE                            0

Relocation section '.rela.data' at offset 0x200 contains 1 entry:
    Offset             Info             Type               Symbol's Value  Symbol's Name + Addend
0000000000000000  0000000300000101 R_AARCH64_ABS64        0000000000000000 .text + 10
";
        let l = parse_readelf(text);
        let t = &l.types;
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(t["R_AARCH64_CALL26"], 2);
        assert_eq!(t["R_AARCH64_ADR_PREL_PG_HI21"], 1);
        assert_eq!(t["R_AARCH64_ABS64"], 1);
        assert_eq!(l.total(), 4);
        assert_eq!(
            l.branch_targets,
            BTreeSet::from(["bar".into(), "foo".into()])
        );
        assert_eq!(
            parse_readelf("There are no relocations in this file.\n").total(),
            0
        );
    }

    #[test]
    fn listing_lines_and_flags() {
        let o = parse_line("large/lua-src/lvm.o fpu").unwrap();
        assert_eq!((o.path.as_str(), o.fpu), ("large/lua-src/lvm.o", true));
        assert!(!parse_line("small/libz-sys/inflate.o").unwrap().fpu);
        assert!(parse_line("").is_none());
        // Kernel-like: no PIC/PIE (no GOT), no FP/SIMD registers by default.
        assert!(CFLAGS.contains(&"-fno-pic") && CFLAGS.contains(&NO_FPU));
        assert!(
            VARIANTS[0].crates.is_empty(),
            "every file compiled at least once"
        );
    }
}
