//! The module check on real C (a step of `cargo xtask test` per architecture):
//! `ksites check-module` and `ksites embed` on a few hundred objects of real C code,
//! compiled for one architecture by its cross gcc. What differs per architecture — the
//! compiler, the kernel-like flags, the variants, where the far check puts the kernel,
//! which relocations are branches a veneer serves — is an [`ArchCorpus`]
//! ([`crate::corpus_aarch64::AARCH64`], [`crate::corpus_riscv64::RISCV64`]); the rest is
//! here.
//!
//! The C corpus ([`crate::corpus`]: Lua, zstd, xz, zlib, bzip2, lcms2, libdeflate,
//! libwebp) is compiled with the architecture's `CC` and flags, every file once, and a
//! part of it again in each of the architecture's other [`Variant`]s, into
//! `target/ksites-corpus-ARCH/obj/` (cached, keyed by the sources, the compiler and the
//! flags). Where the architecture has a flag that forbids floating point (arm64's
//! `-mgeneral-regs-only`), a file gcc refuses under it is compiled without it, as Kbuild
//! compiles its FPU files, and counted.
//!
//! Every object must:
//! 1. load under `ksites check-module` with no kernel (exit 0, "would load": every
//!    relocation applied, undefined symbols at the placeholder below the module), with
//!    as many relocations applied as binutils' `readelf -r` lists (less the types that
//!    apply nothing: `NONE`, and riscv64's `RELAX` hint);
//! 2. load again with a System.map placing its undefined symbols far from the module,
//!    so every call to the kernel is out of reach and goes through a veneer the loader
//!    builds (on riscv64, where a PC-relative data reference reaches no further than a
//!    call, only the symbols the object only calls are far, the others in reach; not
//!    the variants whose addressing cannot reach a far kernel);
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

/// What one architecture's corpus is made of.
#[derive(Debug)]
pub(crate) struct ArchCorpus {
    /// The architecture's name: in messages, and `target/ksites-corpus-NAME/`.
    pub(crate) name: &'static str,
    /// The cross compiler and the Debian package that has it.
    pub(crate) cc: (&'static str, &'static str),
    /// binutils' readelf for the architecture (an independent count of the
    /// relocations) and its package.
    pub(crate) readelf: (&'static str, &'static str),
    /// The kernel-like flags every object is compiled with.
    pub(crate) cflags: &'static [&'static str],
    /// Flags for one library that make it kernel-like.
    pub(crate) library_flags: &'static [(&'static str, &'static [&'static str])],
    /// The flag a floating-point file drops (Kbuild's FPU files), if the architecture's
    /// flags forbid floating point.
    pub(crate) no_fpu: Option<&'static str>,
    /// The ways (parts of) the corpus are compiled; the first compiles every file.
    pub(crate) variants: &'static [Variant],
    /// Where the second check lays each module out ...
    pub(crate) far_load: u64,
    /// ... and puts the kernel's symbols it only branches to (out of a call's reach) ...
    pub(crate) far_kernel: u64,
    /// ... and the others, where the architecture's data references do not reach
    /// `far_kernel` (`None`: they are at `far_kernel` too).
    pub(crate) near_kernel: Option<u64>,
    /// What the far check is, for the summary.
    pub(crate) far_text: &'static str,
    /// readelf's names of the branch relocations a veneer serves.
    pub(crate) branch_types: &'static [&'static str],
    /// readelf's names of the types that apply nothing (not counted as applied).
    pub(crate) no_op_types: &'static [&'static str],
}

/// One way of compiling (a part of) the corpus.
#[derive(Debug)]
pub(crate) struct Variant {
    /// Subdirectory of `obj/`.
    pub(crate) dir: &'static str,
    /// Added to the architecture's flags.
    pub(crate) flags: &'static [&'static str],
    /// The crates compiled this way (empty: all).
    pub(crate) crates: &'static [&'static str],
    /// Whether its objects can reach a far kernel (the second check).
    pub(crate) far: bool,
}

/// A compiled object.
#[derive(Debug)]
struct Object {
    /// Relative to `obj/`.
    path: String,
    /// Compiled without the architecture's `no_fpu` flag (it uses floating point).
    fpu: bool,
}

impl Object {
    /// Whether its variant can reach a far kernel.
    fn far(&self, arch: &ArchCorpus) -> bool {
        arch.variants
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

/// The step for `arch`: builds the tool and the corpus, checks every object, prints the
/// counts; returns the number of objects checked.
pub(crate) fn run(sh: &Shell, root: &Path, arch: &ArchCorpus) -> Result<u32> {
    install::host_tool(sh, arch.cc.0, arch.cc.1)?;
    install::host_tool(sh, arch.readelf.0, arch.readelf.1)?;
    let ksites = host::build_tool(sh, root)?;
    let dir = root.join(format!("target/ksites-corpus-{}", arch.name));
    let start = Instant::now();
    let objects = prepare(&dir, arch)?;
    println!(
        "xtask: {} corpus: {} objects ready in {:.1?}",
        arch.name,
        objects.len(),
        start.elapsed()
    );
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let obj = dir.join("obj");
    let start = Instant::now();
    let checked = corpus::parallel(&objects, |o| check(&ksites, &obj, &work, o, arch))?;
    let _ = std::fs::remove_dir_all(&work);
    ensure!(
        !checked.is_empty(),
        "the {} corpus has no objects",
        arch.name
    );
    println!("{}", summary(arch, &objects, &checked, start.elapsed()));
    Ok(u32::try_from(objects.len()).unwrap_or(u32::MAX))
}

/// The key of the corpus: sources, compiler, flags, variants.
fn key(arch: &ArchCorpus) -> String {
    corpus::key(&format!(
        "{}{:?}{:?}{:?}{:?}",
        arch.cc.0, arch.cflags, arch.library_flags, arch.no_fpu, arch.variants
    ))
}

/// Builds the corpus in `dir` unless its listing has the current key; returns the
/// objects.
fn prepare(dir: &Path, arch: &ArchCorpus) -> Result<Vec<Object>> {
    let key = key(arch);
    if let Some(lines) = corpus::cached(dir, &key) {
        return Ok(lines.iter().filter_map(|l| parse_line(l)).collect());
    }
    let units = corpus::unpack(dir)?;
    let obj = dir.join("obj");
    let _ = std::fs::remove_dir_all(&obj);
    std::fs::create_dir_all(&obj)?;
    let jobs: Vec<(&Variant, &Unit)> = arch
        .variants
        .iter()
        .flat_map(|v| {
            units
                .iter()
                .filter(|u| v.crates.is_empty() || v.crates.contains(&u.source.krate))
                .map(move |u| (v, u))
        })
        .collect();
    let cc = arch.cc.0;
    println!(
        "xtask: compiling the {} corpus: {} objects from {} files with {cc} {}",
        arch.name,
        jobs.len(),
        units.len(),
        arch.cflags.join(" ")
    );
    let objects = corpus::parallel(&jobs, |(v, u)| {
        let path = format!("{}/{}", v.dir, u.object());
        let out = obj.join(&path);
        let library = arch
            .library_flags
            .iter()
            .filter(|(k, _)| *k == u.source.krate)
            .flat_map(|(_, f)| f.iter());
        let mut flags: Vec<&str> = arch
            .cflags
            .iter()
            .chain(v.flags)
            .chain(library)
            .copied()
            .collect();
        let r = u.compile(cc, &flags, &out)?;
        if r.status.success() {
            return Ok(Object { path, fpu: false });
        }
        let Some(no_fpu) = arch
            .no_fpu
            .filter(|f| String::from_utf8_lossy(&r.stderr).contains(f))
        else {
            bail!("{}", u.failed(cc, &r));
        };
        flags.retain(|f| *f != no_fpu);
        let r = u.compile(cc, &flags, &out)?;
        if !r.status.success() {
            bail!("{}", u.failed(cc, &r));
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
fn check(ksites: &Path, obj: &Path, work: &Path, o: &Object, arch: &ArchCorpus) -> Result<Checked> {
    let path = obj.join(&o.path);
    let name = o.path.replace('/', "_");
    let relocs = readelf(arch, &path)?;
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

    // 2. The kernel far away: calls to it through veneers.
    if o.far(arch) {
        let imports: Vec<&str> = near["imports"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
            .unwrap_or_default();
        // Far: every import, or where data references reach no further than calls,
        // those only branched to.
        let is_far = |n: &str| arch.near_kernel.is_none() || !relocs.other_targets.contains(n);
        let mut map = String::new();
        for (i, n) in (0u64..).zip(&imports) {
            let at = match arch.near_kernel {
                Some(near) if !is_far(n) => near,
                _ => arch.far_kernel,
            };
            let _ = writeln!(map, "{:016x} T {n}", at + 16 * i);
        }
        let map_path = work.join(format!("{name}.map"));
        std::fs::write(&map_path, map)?;
        let mut cmd = Command::new(ksites);
        cmd.arg("check-module")
            .arg("--json")
            .arg("--kernel-symbols")
            .arg(&map_path)
            .arg("--load-address")
            .arg(format!("{:x}", arch.far_load))
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
        // One veneer per far kernel function called (the loader shares them by target).
        let called = imports
            .iter()
            .filter(|n| relocs.branch_targets.contains(**n) && is_far(n))
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
    let listed_after = readelf(arch, &out_path)?.total();
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
/// symbols the architecture's branch relocations go to, and those other relocations
/// refer to.
#[derive(Debug, Default)]
struct Listed {
    types: BTreeMap<String, u64>,
    /// How many of `types` apply nothing (`NONE`, `RELAX`).
    no_ops: u64,
    branch_targets: BTreeSet<String>,
    other_targets: BTreeSet<String>,
}

impl Listed {
    /// The relocations the loader applies (or checks).
    fn total(&self) -> u64 {
        self.types.values().sum::<u64>() - self.no_ops
    }
}

fn readelf(arch: &ArchCorpus, path: &Path) -> Result<Listed> {
    let tool = arch.readelf.0;
    let out = Command::new(tool)
        .arg("-rW")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} -rW {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_readelf(arch, &String::from_utf8_lossy(&out.stdout)))
}

/// Reads each relocation line (`OFFSET INFO TYPE [VALUE NAME + ADDEND]`).
fn parse_readelf(arch: &ArchCorpus, text: &str) -> Listed {
    let mut l = Listed::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [off, info, ty, rest @ ..] = words.as_slice() else {
            continue;
        };
        let hex = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(off) || !hex(info) || !ty.starts_with("R_") {
            continue;
        }
        *l.types.entry(ty.to_string()).or_insert(0) += 1;
        if arch.no_op_types.contains(ty) {
            l.no_ops += 1;
            continue;
        }
        if let [_, name, ..] = rest {
            if arch.branch_types.contains(ty) {
                l.branch_targets.insert(name.to_string());
            } else {
                l.other_targets.insert(name.to_string());
            }
        }
    }
    l
}

/// The step's report.
fn summary(
    arch: &ArchCorpus,
    objects: &[Object],
    checked: &[Checked],
    took: std::time::Duration,
) -> String {
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
    let fpu_text = match arch.no_fpu {
        Some(flag) => format!(
            " ({} with {flag}, {fpu} floating-point files without it as Kbuild's FPU files)",
            objects.len() - fpu
        ),
        None => String::new(),
    };
    let mut s = format!(
        "xtask: {} corpus: {} objects checked in {took:.1?}{fpu_text}, 0 failures\n\
         xtask: check-module: every object would load; {relocations} relocations applied \
         (each object's count equal to readelf's), {} types:\n",
        arch.name,
        objects.len(),
        by_count.len()
    );
    for (t, n) in &by_count {
        let note = if arch.no_op_types.contains(t) {
            " (applies nothing: not counted)"
        } else {
            ""
        };
        let _ = writeln!(s, "xtask:   {t:<32} {n:>7}{note}");
    }
    let near_only: Vec<&str> = arch
        .variants
        .iter()
        .filter(|v| !v.far)
        .map(|v| v.dir)
        .collect();
    let excluded = if near_only.is_empty() {
        String::new()
    } else {
        format!("; not the {} ones", near_only.join(", "))
    };
    let _ = write!(
        s,
        "xtask: veneers: none with the kernel's symbols in reach; {} ({far} objects{excluded}), \
         {with_veneers} objects need {veneers} veneers, and load\n\
         xtask: embed: all {} objects got an empty table, nothing else changed, and load",
        arch.far_text,
        objects.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus_aarch64::AARCH64;
    use crate::corpus_riscv64::RISCV64;

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
        let l = parse_readelf(&AARCH64, text);
        let t = &l.types;
        assert_eq!(t.len(), 4, "{t:?}");
        assert_eq!(t["R_AARCH64_CALL26"], 2);
        assert_eq!(t["R_AARCH64_ADR_PREL_PG_HI21"], 1);
        assert_eq!(t["R_AARCH64_ABS64"], 1);
        assert_eq!(t["R_AARCH64_NONE"], 1);
        assert_eq!(l.total(), 4);
        assert_eq!(
            l.branch_targets,
            BTreeSet::from(["bar".into(), "foo".into()])
        );
        assert_eq!(
            l.other_targets,
            BTreeSet::from([".rodata".into(), ".text".into()])
        );
        assert_eq!(
            parse_readelf(&AARCH64, "There are no relocations in this file.\n").total(),
            0
        );
    }

    #[test]
    fn riscv64_relax_is_listed_but_not_counted_and_calls_are_branches() {
        let text = "\
Relocation section '.rela.text' at offset 0x550 contains 5 entries:
    Offset             Info             Type               Symbol's Value  Symbol's Name + Addend
000000000000002c  0000001f00000013 R_RISCV_CALL_PLT       0000000000000000 kernel_fn + 0
000000000000002c  0000000000000033 R_RISCV_RELAX                             0
000000000000001a  0000001e00000017 R_RISCV_PCREL_HI20     0000000000000000 kernel_val + 0
000000000000001e  0000000d00000018 R_RISCV_PCREL_LO12_I   000000000000001a .L0  + 0
0000000000000036  000000000000002b R_RISCV_ALIGN                             6
";
        let l = parse_readelf(&RISCV64, text);
        assert_eq!(l.types.len(), 5);
        assert_eq!(l.total(), 4, "RELAX applies nothing; ALIGN is checked");
        assert_eq!(l.branch_targets, BTreeSet::from(["kernel_fn".into()]));
        assert!(l.other_targets.contains("kernel_val"));
        assert!(!l.other_targets.contains("kernel_fn"));
    }

    #[test]
    fn listing_lines() {
        let o = parse_line("large/lua-src/lvm.o fpu").unwrap();
        assert_eq!((o.path.as_str(), o.fpu), ("large/lua-src/lvm.o", true));
        assert!(!parse_line("small/libz-sys/inflate.o").unwrap().fpu);
        assert!(parse_line("").is_none());
    }
}
