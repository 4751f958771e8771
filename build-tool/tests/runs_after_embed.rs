//! An embedded image must still run: gcc-built C programs (static glibc, static PIE,
//! PIE, dynamic non-PIE) with a GNU ifunc of their own and thread-local data are run
//! before and after `ksites embed`, and must print the same and exit 0; each reports
//! the `AT_PHDR` Linux gave it, checked against the output's program headers. The
//! position-independent ones (ET_DYN, linked by ld.bfd and by lld) also fire C probes
//! (`KSITES_PROBE`) and check at run time, wherever Linux loaded them, that the table
//! cell leads to the table. A Rust PIE with `ifunc!` and `probe!` records (whose
//! pointers lld leaves zero, to be read from their RELATIVE relocations) embeds too.

mod common;
#[path = "common/module_build.rs"]
mod module_build;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};
use object::ObjectSection;
use object::elf::{FileHeader64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A C program that prints a line built from a GNU ifunc (`scale`), thread-local data
/// (initialised and zeroed) and libc's own ifuncs (`strcpy`, `strlen`), then reports on
/// stderr where `AT_PHDR` points (relative to the ELF header, `__ehdr_start`) and the
/// types of the `AT_PHNUM` entries it finds there. With `records`, it defines the
/// table cell and the ifunc; `extra` is appended.
fn program(records: bool, extra: &str) -> String {
    let records = if records {
        format!(
            "struct cell {{ unsigned long m, o, s; }};\n\
             __attribute__((used)) struct cell {CELL_SYMBOL} = {{ {CELL_MAGIC:#x}UL, 0, 0 }};\n\
             static long twice(long x) {{ return 2 * x; }}\n\
             static long (*pick(void))(long) {{ return twice; }}\n\
             long scale(long x) __attribute__((ifunc(\"pick\")));\n"
        )
    } else {
        "static long scale(long x) { return 2 * x; }\n".to_string()
    };
    format!(
        r#"#include <elf.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
{records}
__thread int tv = 5;
__thread char tb[64];
extern const char __ehdr_start[];
{extra}
int main(int argc, char **argv) {{
    (void)argv;
    strcpy(tb, "hello");
    printf("%s %ld %d %zu\n", tb, scale(argc + 20), tv, strlen(tb));
    const ElfW(Phdr) *ph = (const void *)getauxval(AT_PHDR);
    unsigned long n = getauxval(AT_PHNUM);
    fprintf(stderr, "phdr %#lx types", (unsigned long)((const char *)ph - __ehdr_start));
    for (unsigned long i = 0; i < n; i++) fprintf(stderr, " %#x", ph[i].p_type);
    fprintf(stderr, "\n");
    return 0;
}}
"#
    )
}

/// `gcc -O2 FLAGS -Wl,--emit-relocs` of `src` into `dir/name`.
fn gcc_program(dir: &Path, name: &str, flags: &[&str], src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let out = dir.join(name);
    let o = run(Command::new("gcc")
        .arg("-O2")
        .args(flags)
        .arg("-Wl,--emit-relocs")
        .arg(&c)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "gcc {flags:?}: {}", text(&o.stderr));
    out
}

/// Runs a program built from [`program`]: it must exit 0; returns its stdout and the
/// `AT_PHDR` line of its stderr.
fn run_program(exe: &Path) -> (String, String) {
    let o = run(&mut Command::new(exe));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{} did not run: {}",
        exe.display(),
        text(&o.stderr)
    );
    (text(&o.stdout), text(&o.stderr).trim().to_string())
}

/// Where the program headers of `data` are in memory, relative to the ELF header, by
/// the rule of Linux 5.18 and later (the PT_LOAD holding `e_phoff`) and by the earlier
/// rule (the first PT_LOAD's `p_vaddr - p_offset`, plus `e_phoff`); and the line
/// [`program`] prints when it finds them.
struct PhdrLayout {
    modern: Option<u64>,
    legacy: u64,
    line: String,
}

fn phdr_layout(data: &[u8]) -> PhdrLayout {
    let e = object::LittleEndian;
    let fh = FileHeader64::<object::LittleEndian>::parse(data).unwrap();
    let phdrs = fh.program_headers(e, data).unwrap();
    let phoff = fh.e_phoff.get(e);
    let loads = || phdrs.iter().filter(|p| p.p_type(e) == PT_LOAD);
    let at = |p: &object::elf::ProgramHeader64<object::LittleEndian>, off: u64| {
        p.p_vaddr(e).wrapping_add(off.wrapping_sub(p.p_offset(e)))
    };
    let holds = |p: &&object::elf::ProgramHeader64<object::LittleEndian>, off: u64| {
        p.p_offset(e) <= off && off < p.p_offset(e) + p.p_filesz(e)
    };
    let ehdr = loads().find(|p| holds(p, 0)).map(|p| at(p, 0)).unwrap();
    let first = loads().next().unwrap();
    let modern = loads()
        .find(|p| holds(p, phoff))
        .map(|p| at(p, phoff) - ehdr);
    let types: String = phdrs
        .iter()
        .map(|p| format!(" {:#x}", p.p_type(e)))
        .collect();
    PhdrLayout {
        modern,
        legacy: at(first, phoff).wrapping_sub(ehdr),
        line: format!("phdr {:#x} types{types}", modern.unwrap_or(u64::MAX)),
    }
}

/// The address of the program headers by `readelf -lW`'s reading of `exe` (the PT_LOAD
/// holding `e_phoff`, as Linux 5.18 and later compute `AT_PHDR`), relative to the ELF
/// header; readelf must have no complaint.
fn readelf_phdr(exe: &Path) -> u64 {
    let o = run(Command::new("readelf").arg("-lW").arg(exe));
    let out = text(&o.stdout);
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "readelf: {}",
        text(&o.stderr)
    );
    let phoff: u64 = out
        .split("starting at offset ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no e_phoff in {out}"));
    let hex = |f: &str| u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap();
    let loads: Vec<(u64, u64, u64)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"LOAD")).then(|| (hex(f[1]), hex(f[2]), hex(f[4])))
        })
        .collect();
    let at = |off: u64| {
        loads
            .iter()
            .find(|(o, _, size)| *o <= off && off < o + size)
            .map(|(o, v, _)| v + (off - o))
            .unwrap_or_else(|| panic!("offset {off:#x} is in no PT_LOAD: {out}"))
    };
    at(phoff) - at(0)
}

/// `ksites embed INPUT -o OUTPUT`.
fn embed(input: &Path, output: &Path) -> Output {
    run(Command::new(KSITES)
        .arg("embed")
        .arg(input)
        .arg("-o")
        .arg(output))
}

/// Builds `name` with `flags`, runs it, embeds it, and checks the output: `verify`
/// is clean, it runs with the same stdout, Linux's `AT_PHDR` points at its program
/// headers, and copies made by binutils' `objcopy` and `strip` still run (and the
/// `objcopy` copy still verifies). Returns the input's and the output's layouts.
fn embeds_and_runs(dir: &Path, name: &str, flags: &[&str], extra: &str) -> [PhdrLayout; 2] {
    let input = gcc_program(dir, name, flags, &program(true, extra));
    let (before, line) = run_program(&input);
    let in_layout = phdr_layout(&std::fs::read(&input).unwrap());
    assert_eq!(line, in_layout.line, "{name}: the input's own AT_PHDR");

    let output = dir.join(format!("{name}.k"));
    let o = embed(&input, &output);
    assert!(o.status.success(), "{name}: embed: {}", text(&o.stderr));
    let v = run(Command::new(KSITES).arg("verify").arg(&output));
    assert!(
        v.status.success(),
        "{name}: verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    let (after, line) = run_program(&output);
    assert_eq!(after, before, "{name}: embedded program printed otherwise");
    let layout = phdr_layout(&std::fs::read(&output).unwrap());
    assert!(
        layout.modern.is_some(),
        "{name}: program headers not loaded"
    );
    assert_eq!(
        line, layout.line,
        "{name}: AT_PHDR is not the program headers"
    );
    assert_eq!(
        layout.modern,
        Some(readelf_phdr(&output)),
        "{name}: readelf"
    );

    for tool in ["objcopy", "strip"] {
        let copy = dir.join(format!("{name}.{tool}"));
        let mut cmd = Command::new(tool);
        match tool {
            "objcopy" => cmd.arg(&output).arg(&copy),
            _ => cmd.arg(&output).arg("-o").arg(&copy),
        };
        let o = run(&mut cmd);
        assert!(o.status.success(), "{name}: {tool}: {}", text(&o.stderr));
        assert_eq!(text(&o.stderr), "", "{name}: {tool} moved something");
        assert_eq!(run_program(&copy).0, before, "{name}: {tool} copy");
    }
    let v = run(Command::new(KSITES)
        .arg("verify")
        .arg(dir.join(format!("{name}.objcopy"))));
    assert!(
        v.status.success(),
        "{name}: objcopy copy: {}",
        text(&v.stdout)
    );
    assert!(common::temp_files_left(dir).is_empty());
    [in_layout, layout]
}

#[test]
fn static_glibc_non_pie_with_tls_runs_after_embed() {
    // The case that crashed: glibc's own 25 ifuncs, and static glibc finds its TLS
    // segment through AT_PHDR.
    let dir = tempfile::tempdir().unwrap();
    let [_, out] = embeds_and_runs(dir.path(), "static", &["-static", "-no-pie"], "");
    // Small enough for the layout older kernels need too (first PT_LOAD's delta).
    assert_eq!(out.modern, Some(out.legacy), "{}", out.line);
}

#[test]
fn dynamic_non_pie_runs_after_embed() {
    // The dynamic loader reads the headers through AT_PHDR and PT_PHDR (moved).
    let dir = tempfile::tempdir().unwrap();
    let [input, out] = embeds_and_runs(dir.path(), "dynamic", &["-no-pie"], "");
    assert!(input.line.contains(" 0x6 0x3 "), "PT_PHDR, PT_INTERP first");
    assert!(out.line.contains(" 0x6 0x3 "), "{}", out.line);
    assert_eq!(out.modern, Some(out.legacy), "{}", out.line);
}

#[test]
fn static_glibc_with_a_large_bss_runs_after_embed_on_this_kernel() {
    // 8 MiB of .bss: the old kernels' layout would cost that much file padding, so
    // only the rule of Linux 5.18 and later (which this host runs) finds the headers.
    let dir = tempfile::tempdir().unwrap();
    let extra = "char big[8 << 20];\n__attribute__((constructor)) static void touch(void) { big[sizeof big - 1] = 1; }";
    let [_, out] = embeds_and_runs(dir.path(), "bigbss", &["-static", "-no-pie"], extra);
    assert_ne!(out.modern, Some(out.legacy), "{}", out.line);
    let (input, output) = (dir.path().join("bigbss"), dir.path().join("bigbss.k"));
    let grown = std::fs::metadata(output).unwrap().len() - std::fs::metadata(input).unwrap().len();
    assert!(grown < 64 << 10, "output grew by {grown} bytes");
}

/// C probes for [`program`]'s `extra` (built with [`sdt_flag`]), fired from a
/// constructor, and a check, wherever the image was loaded, that a filled table cell
/// (self-relative) leads to the table's magic: the program aborts if not.
fn probes_and_cell_check() -> String {
    format!(
        r#"#include <stdlib.h>
#include "ksites_sdt.h"
KSITES_PROBE_DECL(app, tick, 1, (unsigned long n))
KSITES_PROBE_DECL(app, tock, 0, (void))
__attribute__((constructor)) static void fire(void) {{
    KSITES_PROBE(app, tick, 7);
    if (KSITES_PROBE_ENABLED(app, tick)) puts("tick enabled");
    KSITES_PROBE(app, tock);
    const volatile struct cell *c = &{CELL_SYMBOL};
    if (c->o != 0 && memcmp((const char *)c + c->o, "KSITES\0\0", 8) != 0) abort();
}}
"#
    )
}

/// `-I` for `ksites_sdt.h`.
fn sdt_flag() -> String {
    format!("-I{}/../kernel-loader/c", env!("CARGO_MANIFEST_DIR"))
}

/// A PIE with a GNU ifunc and C probes, linked with `flags`: it embeds, verifies,
/// runs as before (see [`embeds_and_runs`]), and `inspect` lists the ifunc and the
/// probes with their sites.
fn pie_embeds_and_runs(name: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let sdt = sdt_flag();
    let flags: Vec<&str> = flags.iter().copied().chain([sdt.as_str()]).collect();
    let [input, out] = embeds_and_runs(dir.path(), name, &flags, &probes_and_cell_check());
    // PT_PHDR (dynamic PIEs, and lld's static ones) is kept, moved with the headers.
    let phdr = |l: &PhdrLayout| l.line.contains(" 0x6 ");
    assert_eq!(phdr(&out), phdr(&input), "{name}: {}", out.line);
    assert!(
        phdr(&out) || !flags.contains(&"-pie"),
        "{name}: {}",
        out.line
    );
    let o = run(Command::new(KSITES)
        .arg("inspect")
        .arg(dir.path().join(format!("{name}.k"))));
    let listing = text(&o.stdout);
    assert!(o.status.success(), "{name}: inspect: {}", text(&o.stderr));
    assert!(listing.contains(": ELF Dyn "), "{name}: {listing}");
    assert!(listing.contains("ifunc scale "), "{name}: {listing}");
    assert!(
        listing.contains("probe app:tick nargs=1 sites=2"),
        "{name}: {listing}"
    );
    assert!(
        listing.contains("probe app:tock nargs=0 sites=1"),
        "{name}: {listing}"
    );
}

#[test]
fn static_pie_with_ifuncs_and_probes_runs_after_embed() {
    // ET_DYN without a dynamic loader: glibc relocates itself (RELATIVE, IRELATIVE).
    pie_embeds_and_runs("static-pie", &["-static-pie"]);
}

#[test]
fn dynamic_pie_with_ifuncs_and_probes_runs_after_embed() {
    // ld.so finds the load bias through PT_PHDR (moved with the program headers).
    pie_embeds_and_runs("pie", &["-pie", "-fPIE"]);
}

#[test]
fn static_pie_linked_by_lld_runs_after_embed() {
    // lld leaves the fields of RELATIVE-relocated pointers zero: the records' pointers
    // are read from the relocations' addends.
    let lld = common::toolchain::lld_flags();
    let flags: Vec<&str> = ["-static-pie"]
        .into_iter()
        .chain(lld.iter().map(String::as_str))
        .collect();
    pie_embeds_and_runs("lld-static-pie", &flags);
}

#[test]
fn dynamic_pie_linked_by_lld_runs_after_embed() {
    let lld = common::toolchain::lld_flags();
    let flags: Vec<&str> = ["-pie", "-fPIE"]
        .into_iter()
        .chain(lld.iter().map(String::as_str))
        .collect();
    pie_embeds_and_runs("lld-pie", &flags);
}

/// A Rust program (host, PIE by default) with an `ifunc!` and a `probe!`.
const RUST_PIE: &str = r#"
use kernel_loader::{CpuFeatures, ifunc, probe};
extern "C" fn twice_soft(x: u64) -> u64 { 2 * x }
fn pick(_: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 { twice_soft }
ifunc! {
    pub fn twice(x: u64) -> u64;
    default = twice_soft;
    resolver = pick;
}
fn main() {
    let n = std::env::args().count() as u64;
    probe!(app, tick, n);
    println!("twice {}", twice(n + 20));
}
"#;

#[test]
fn rust_pie_with_ifunc_and_probe_records_runs_after_embed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    module_build::cargo_build_kernel_loader(&[], &d.join("kl"));
    let kl = d.join("kl/debug");
    std::fs::write(d.join("main.rs"), RUST_PIE).unwrap();
    let lld = common::toolchain::lld_flags();
    for (name, flags) in [
        ("rust-bfd", vec!["-fuse-ld=bfd".to_string()]),
        ("rust-lld", lld),
    ] {
        let mut cmd = Command::new("rustc");
        cmd.args(["--edition", "2024", "-O", "main.rs", "-o", name])
            .arg("--extern")
            .arg(format!(
                "kernel_loader={}",
                kl.join("libkernel_loader.rlib").display()
            ))
            .arg("-L")
            .arg(format!("dependency={}", kl.join("deps").display()))
            .args(["-C", "link-arg=-Wl,--emit-relocs"])
            .current_dir(d);
        for f in &flags {
            cmd.arg("-C").arg(format!("link-arg={f}"));
        }
        let o = run(&mut cmd);
        assert!(o.status.success(), "rustc {name}: {}", text(&o.stderr));
        let input = d.join(name);
        let data = std::fs::read(&input).unwrap();
        let img = ksites::elf::Image::parse(name, &data).unwrap();
        assert_eq!(img.kind, ksites::elf::ElfKind::Dyn, "{name}");
        // ld.bfd writes the records' pointers (the trampoline's, at +8) into the
        // section too; lld leaves them zero: both ways must be read.
        let rec = img.section_by_name(".ksites_ifuncs").unwrap();
        let tramp = u64::from_le_bytes(rec.data().unwrap()[8..16].try_into().unwrap());
        assert_eq!(tramp == 0, name == "rust-lld", "{name}: {tramp:#x}");
        let before = run_program_stdout(&input);
        assert_eq!(before, "twice 42\n");
        let output = d.join(format!("{name}.k"));
        let o = embed(&input, &output);
        assert!(o.status.success(), "{name}: embed: {}", text(&o.stderr));
        let v = run(Command::new(KSITES).arg("verify").arg(&output));
        assert!(v.status.success(), "{name}: verify: {}", text(&v.stdout));
        assert_eq!(run_program_stdout(&output), before, "{name}");
        let o = run(Command::new(KSITES).arg("inspect").arg(&output));
        let listing = text(&o.stdout);
        assert!(listing.contains("ifunc main::twice "), "{name}: {listing}");
        assert!(
            listing.contains("default=0x") && listing.contains(" main::twice_soft"),
            "{name}: {listing}"
        );
        assert!(
            listing.contains("probe app:tick nargs=1 sites=1"),
            "{name}: {listing}"
        );
    }
    assert!(common::temp_files_left(d).is_empty());
}

/// Runs `exe`: it must exit 0; returns its stdout.
fn run_program_stdout(exe: &Path) -> String {
    let o = run(&mut Command::new(exe));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}: {}",
        exe.display(),
        text(&o.stderr)
    );
    text(&o.stdout)
}

#[test]
fn pie_with_nothing_to_embed_is_copied_unchanged_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let input = gcc_program(dir.path(), "plain", &["-pie", "-fPIE"], &program(false, ""));
    let before = run_program(&input);
    let output = dir.path().join("plain.k");
    let o = embed(&input, &output);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("copied unchanged"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&input).unwrap()
    );
    assert_eq!(run_program(&output), before);
}
