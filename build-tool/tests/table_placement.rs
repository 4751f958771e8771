//! Table placement (issue 13, item 5): a linker script reserves a zero-filled `.ksites`
//! section and `ksites embed` writes the table there, appending no segment. A static
//! non-PIE C program (`KSITES_TABLE_CELL()`, a GNU ifunc, a C probe), linked by GNU ld
//! and by lld with an `INSERT AFTER .rodata` script, embeds with its program headers
//! unchanged (SystemTap notes as a section only), verifies, runs, and checks at run time that its cell points inside
//! `[__ksites_table_start, __ksites_table_end)`. A slot that is too small, or NOBITS,
//! is refused with the fix and no output; an embedded output is refused again (exit 3).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use object::read::elf::{ElfFile64, FileHeader};
use object::{Object, ObjectSection, ObjectSymbol};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

/// The recommended reservation (the README's snippet), `n` bytes.
fn script(n: u32) -> String {
    format!(
        "SECTIONS\n{{\n  .ksites : ALIGN(8) {{\n    __ksites_table_start = .;\n    BYTE(0);\n    \
         . += {} ;\n    __ksites_table_end = .;\n  }}\n}}\nINSERT AFTER .rodata;\n",
        n - 1
    )
}

/// A bare `. += n`: GNU ld makes the section NOBITS.
fn nobits_script(n: u32) -> String {
    format!(
        "SECTIONS {{ .ksites : ALIGN(8) {{ __ksites_table_start = .; . += {n}; \
         __ksites_table_end = .; }} }} INSERT AFTER .rodata;\n"
    )
}

const PROGRAM: &str = r#"#include <stdio.h>
#include <string.h>
#include "ksites.h"
#include "ksites_sdt.h"
KSITES_TABLE_CELL();
extern const char __ksites_table_start[], __ksites_table_end[];
static long twice(long x) { return 2 * x; }
static long (*pick(void))(long) { return twice; }
long scale(long x) __attribute__((ifunc("pick")));
KSITES_PROBE_DECL(app, tick, 1, (unsigned long n))
int main(void) {
    KSITES_PROBE(app, tick, 7);
    const volatile uint64_t *c = __ksites_table_cell;
    if (c[1] == 0) { puts("cell empty"); return 2; }
    const char *t = (const char *)c + (long)c[1];
    if (t < __ksites_table_start || t + c[2] > __ksites_table_end) { puts("outside"); return 3; }
    if (memcmp(t, "KSITES\0\0", 8) != 0) { puts("no magic"); return 4; }
    printf("scale %ld\n", scale(21));
    return 0;
}
"#;

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds [`PROGRAM`] with the linker script `ld_script`, and `flags`.
fn build(dir: &Path, name: &str, ld_script: &str, flags: &[String]) -> PathBuf {
    let src = dir.join("p.c");
    std::fs::write(&src, PROGRAM).unwrap();
    let lds = dir.join(format!("{name}.ld"));
    std::fs::write(&lds, ld_script).unwrap();
    let exe = dir.join(name);
    let o = run(Command::new("gcc")
        .args(["-static", "-no-pie", "-O1"])
        .arg(format!(
            "-I{}/../kernel-loader/c",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(&src)
        .arg(format!("-Wl,-T,{}", lds.display()))
        .arg("-Wl,--emit-relocs")
        .args(flags)
        .arg("-o")
        .arg(&exe));
    assert!(o.status.success(), "gcc: {}", text(&o.stderr));
    exe
}

fn ksites(args: &[&Path]) -> Output {
    let mut c = Command::new(KSITES);
    for a in args {
        c.arg(a);
    }
    run(&mut c)
}

fn embed(input: &Path, output: &Path) -> Output {
    run(Command::new(KSITES)
        .arg("embed")
        .arg(input)
        .arg("-o")
        .arg(output))
}

/// The program header table's bytes and the value of a symbol.
fn phdrs(data: &[u8]) -> (u16, Vec<u8>) {
    let h = object::elf::FileHeader64::<object::LittleEndian>::parse(data).unwrap();
    let e = object::LittleEndian;
    let off = h.e_phoff(e) as usize;
    let len = usize::from(h.e_phnum(e)) * usize::from(h.e_phentsize(e));
    (h.e_phnum(e), data[off..off + len].to_vec())
}

fn symbol(data: &[u8], name: &str) -> u64 {
    let f = ElfFile64::<object::LittleEndian>::parse(data).unwrap();
    f.symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no {name}"))
        .address()
}

/// Embeds into a program linked with `flags` whose script reserves 16 KiB, and checks
/// everything the reservation promises.
fn fills_the_reserved_slot(flags: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "p", &script(16384), flags);
    let out = dir.path().join("p.out");
    let o = embed(&exe, &out);
    assert!(o.status.success(), "embed: {}", text(&o.stderr));
    let (input, output) = (std::fs::read(&exe).unwrap(), std::fs::read(&out).unwrap());

    // No new segment: the program header table is byte for byte the input's.
    assert_eq!(phdrs(&input), phdrs(&output));

    // The table (found as verify finds it, through the section and the cell) lies
    // inside the reserved range.
    let f = ElfFile64::<object::LittleEndian>::parse(&*output).unwrap();
    let sec = f.section_by_name(".ksites").unwrap();
    let (start, end) = (
        symbol(&output, "__ksites_table_start"),
        symbol(&output, "__ksites_table_end"),
    );
    assert_eq!((sec.address(), sec.size()), (start, end - start));
    let cell = symbol(&output, "__ksites_table_cell");
    let cb = f
        .sections()
        .find(|s| s.address() <= cell && cell + 24 <= s.address() + s.size())
        .unwrap()
        .data_range(cell, 24)
        .unwrap()
        .unwrap();
    let table = cell.wrapping_add_signed(i64::from_le_bytes(cb[8..16].try_into().unwrap()));
    let size = u64::from_le_bytes(cb[16..24].try_into().unwrap());
    assert!(
        size > 0 && start <= table && table + size <= end,
        "{table:#x}+{size}"
    );
    assert!(sec.data().unwrap().starts_with(b"KSITES\0\0"));
    // The SystemTap notes: `.stapsdt.base` follows the table inside the slot, the
    // notes (not loaded) name the probe.
    let base = f.section_by_name(".stapsdt.base").unwrap();
    assert_eq!(base.address(), table + size);
    assert!(base.address() < end);
    let notes = f.section_by_name(".note.stapsdt").unwrap().data().unwrap();
    assert!(notes.windows(9).any(|w| w == b"app\0tick\0"), "{notes:?}");

    let v = ksites(&[Path::new("verify"), &out]);
    assert!(
        v.status.success(),
        "verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    let i = ksites(&[Path::new("inspect"), &out]);
    assert!(i.status.success(), "inspect: {}", text(&i.stderr));
    assert!(
        text(&i.stdout).contains("ifunc scale"),
        "{}",
        text(&i.stdout)
    );

    // The program runs and finds its table inside the reservation.
    let r = run(&mut Command::new(&out));
    assert_eq!(r.status.code(), Some(0), "{}", text(&r.stdout));
    assert_eq!(text(&r.stdout), "scale 42\n");

    // Embedding the output again: already embedded.
    let again = dir.path().join("again");
    let o = embed(&out, &again);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(!again.exists());
}

/// A reservation smaller than the table: exit 1, the message names the file, the
/// section's size and the size needed, and no output is written.
fn refuses_a_small_slot(flags: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "small", &script(64), flags);
    let out = dir.path().join("small.out");
    let o = embed(&exe, &out);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}: the reserved section .ksites (64 bytes",
            exe.display()
        )) && err.contains("reserve at least "),
        "{err}"
    );
    assert!(!out.exists());
    // No temporary file is left beside the output either.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["p.c", "small", "small.ld"]);
}

#[test]
fn gnu_ld_reserved_slot_holds_the_table() {
    fills_the_reserved_slot(&[]);
}

#[test]
fn lld_reserved_slot_holds_the_table() {
    fills_the_reserved_slot(&common::toolchain::lld_flags());
}

#[test]
fn gnu_ld_too_small_slot_is_refused() {
    refuses_a_small_slot(&[]);
}

#[test]
fn lld_too_small_slot_is_refused() {
    refuses_a_small_slot(&common::toolchain::lld_flags());
}

#[test]
fn nobits_slot_is_refused_with_the_fix() {
    // GNU ld makes `. += N` alone NOBITS: there are no file bytes for the table.
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "nobits", &nobits_script(16384), &[]);
    let out = dir.path().join("nobits.out");
    let o = embed(&exe, &out);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("{}: the reserved section .ksites", exe.display()))
            && err.contains("NOBITS")
            && err.contains("BYTE(0)"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn an_unfilled_slot_is_reported_as_such() {
    // Nothing to embed (no ifuncs, no probes, no libc): `embed` copies the image, the
    // reserved slot stays zero, and `inspect`/`verify` say that instead of "bad magic".
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("e.c");
    std::fs::write(&src, "void _start(void) { for (;;) { } }\n").unwrap();
    let lds = d.join("e.ld");
    std::fs::write(
        &lds,
        script(4096).replace("INSERT AFTER .rodata", "INSERT AFTER .text"),
    )
    .unwrap();
    let exe = d.join("e");
    let o = run(Command::new("gcc")
        .args(["-static", "-no-pie", "-nostdlib", "-O1"])
        .arg(&src)
        .arg(format!("-Wl,-T,{}", lds.display()))
        .arg("-Wl,--emit-relocs")
        .arg("-o")
        .arg(&exe));
    assert!(o.status.success(), "gcc: {}", text(&o.stderr));
    let out = d.join("e.out");
    let o = embed(&exe, &out);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let said = text(&o.stdout) + &text(&o.stderr);
    assert!(
        said.contains("no ifuncs, probes or static keys; copied unchanged"),
        "{said}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&exe).unwrap());
    let o = ksites(&[Path::new("inspect"), &out]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(".ksites: a reserved slot, not filled"),
        "{}",
        text(&o.stdout)
    );
    let o = ksites(&[Path::new("verify"), &out]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("is a reserved slot `ksites embed` did not fill") && !err.contains("magic"),
        "{err}"
    );
}
