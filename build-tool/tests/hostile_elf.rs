//! Hostile ELF input (issue 14, rows 2 and 12): huge section alignments in modules,
//! sections past the end of the file, bad symbol indices, archives and a table out of
//! reach of the code. Each must fail fast, with exit 1, an error naming the file and the
//! section (and value) at fault, and no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use object::{Object, ObjectSection};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

/// A module-like object: a call to an imported ifunc (so `embed` has a table with a
/// relocated field to write).
const MODULE: &str = r#"
    .text
    .globl f
    .type f,@function
f:  call ext
    ret
    .size f, .-f
    .section .ksites_ifunc_imports,"",@progbits
    .quad ext
    .section .comment,"",@progbits
    .ascii "hostile"
"#;

fn assemble(dir: &Path, name: &str, src: &str) -> PathBuf {
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&s, src).unwrap();
    let r = Command::new("gcc")
        .args(["-c", "-o"])
        .arg(&o)
        .arg(&s)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    o
}

/// Index of section `name`.
fn section_index(data: &[u8], name: &str) -> usize {
    let f = object::File::parse(data).unwrap();
    f.section_by_name(name).unwrap().index().0
}

/// Sets the 8-byte field at `field` of section header `index`.
fn set_shdr(data: &mut [u8], index: usize, field: usize, value: u64) {
    let shoff = u64::from_le_bytes(data[0x28..0x30].try_into().unwrap()) as usize;
    let at = shoff + 64 * index + field;
    data[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

const SH_OFFSET: usize = 24;
const SH_ADDRALIGN: usize = 48;

/// Runs `ksites ARGS` in `dir`; asserts it finished within `limit`.
fn ksites(dir: &Path, args: &[&str], limit: Duration) -> Output {
    let t = Instant::now();
    let o = Command::new(KSITES)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(t.elapsed() < limit, "{args:?} took {:?}", t.elapsed());
    o
}

/// Asserts a failure with exit 1 whose message holds every one of `want`.
fn assert_refused(o: &Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for w in want {
        assert!(err.contains(w), "want {w:?} in: {err}");
    }
}

/// Peak RSS in KiB of `ksites ARGS` (via `/usr/bin/time -v`), if that tool exists.
fn peak_rss_kib(dir: &Path, args: &[&str]) -> Option<u64> {
    let o = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(KSITES)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.parse().ok())
}

/// Row 2: a module with one `sh_addralign` of 2^31, 2^32, 2^40 or 2^63 (on a
/// non-allocated section, which the layout ignores, and on `.text`) used to give 2-4 GB
/// outputs, an abort or a `capacity overflow` panic. Now: exit 1 at once, the file,
/// section and value named, no output, small memory.
#[test]
fn row_02_huge_section_alignment_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let obj = std::fs::read(assemble(dir, "m", MODULE)).unwrap();
    for section in [".comment", ".text"] {
        let index = section_index(&obj, section);
        for shift in [31u32, 32, 40, 63] {
            let align = 1u64 << shift;
            let mut m = obj.clone();
            set_shdr(&mut m, index, SH_ADDRALIGN, align);
            let name = format!("a{shift}{section}.o");
            std::fs::write(dir.join(&name), &m).unwrap();
            let args = ["embed", name.as_str(), "-o", "out.o"];
            let o = ksites(dir, &args, Duration::from_secs(20));
            let label =
                format!("{name}: section {section} (index {index}): sh_addralign {align:#x}");
            assert_refused(&o, &[&label, "above the page size (0x1000)"]);
            assert!(!dir.join("out.o").exists(), "{name}: output written");
            if let Some(kib) = peak_rss_kib(dir, &args) {
                assert!(kib < 200 * 1024, "{name}: peak RSS {kib} KiB");
            }
            // The library entry too (what the fuzz target calls).
            let e = ksites::embed::embed_bytes(&name, &m).unwrap_err();
            assert!(format!("{e:#}").contains(&label), "{e:#}");
            let leftovers = std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('.')
                })
                .count();
            assert_eq!(leftovers, 0, "{name}: temporary file left");
        }
    }
}

/// Row 12: a section whose contents lie past the end of the file: every command names
/// the file, the section, its offset and size (the `object` crate said only "Invalid
/// ELF section size or offset").
#[test]
fn row_12_section_past_end_names_file_section_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut m = std::fs::read(assemble(dir, "m", MODULE)).unwrap();
    let index = section_index(&m, ".comment");
    set_shdr(&mut m, index, SH_OFFSET, 0x10_0000);
    std::fs::write(dir.join("past.o"), &m).unwrap();
    let want = format!("past.o: section .comment (index {index}): contents at offset 0x100000");
    for args in [
        &["embed", "past.o", "-o", "out.o"][..],
        &["inspect", "past.o"],
        &["verify", "past.o"],
        &["scan", "--calls-to", "ext", "past.o"],
    ] {
        let o = ksites(dir, args, Duration::from_secs(20));
        assert_refused(&o, &[&want, "past the end of the file"]);
    }
    assert!(!dir.join("out.o").exists());
}

/// Rewrites the symbol of relocation `entry` of section `rela` to `sym`.
fn set_reloc_symbol(data: &mut [u8], rela: &str, entry: usize, sym: u32) {
    let f = object::File::parse(&*data).unwrap();
    let off = f.section_by_name(rela).unwrap().file_range().unwrap().0 as usize;
    let at = off + 24 * entry + 12;
    data[at..at + 4].copy_from_slice(&sym.to_le_bytes());
}

/// Row 12: a relocation naming a symbol past the symbol table: the message names the
/// file, the section the relocation applies to, its offset and the symbol index (it was
/// the bare "Invalid ELF symbol index").
#[test]
fn row_12_bad_symbol_index_names_file_section_and_symbol() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let obj = std::fs::read(assemble(dir, "m", MODULE)).unwrap();
    let mut m = obj.clone();
    set_reloc_symbol(&mut m, ".rela.text", 0, 0x999);
    std::fs::write(dir.join("bad.o"), &m).unwrap();
    for args in [
        &["embed", "bad.o", "-o", "out.o"][..],
        &["scan", "--calls-to", "ext", "bad.o"],
    ] {
        let o = ksites(dir, args, Duration::from_secs(20));
        assert_refused(
            &o,
            &[
                "bad.o: section .text (index 1): relocation at offset 0x1 names symbol 2457",
                "past the end of the symbol table",
            ],
        );
    }
    let mut m = obj;
    set_reloc_symbol(&mut m, ".rela.ksites_ifunc_imports", 0, 0x999);
    std::fs::write(dir.join("bad2.o"), &m).unwrap();
    let o = ksites(
        dir,
        &["embed", "bad2.o", "-o", "out.o"],
        Duration::from_secs(20),
    );
    assert_refused(
        &o,
        &["bad2.o: .ksites_ifunc_imports+0x0: relocation names symbol 2457"],
    );
    assert!(!dir.join("out.o").exists());
}

/// Row 12: an `ar` archive is recognised as one (it was "not a valid ELF64
/// little-endian file: Unsupported ELF header"), and its ELF members can be listed for
/// `scan` as `archive(member)`.
#[test]
fn row_12_archive_is_recognised() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assemble(dir, "m", MODULE);
    let r = Command::new("ar")
        .args(["rcs", "x.a", "m.o"])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(r.success());
    for args in [
        &["embed", "x.a", "-o", "out.o"][..],
        &["inspect", "x.a"],
        &["verify", "x.a"],
    ] {
        let o = ksites(dir, args, Duration::from_secs(20));
        assert_refused(&o, &["x.a: is an ar archive", "`ar x`"]);
    }
    assert!(!dir.join("out.o").exists());
    // scan reads an archive's members, each named `archive(member)`, as a linker would.
    let o = ksites(
        dir,
        &["scan", "--calls-to", "*", "--json", "x.a", "m.o"],
        Duration::from_secs(20),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let from_member = out
        .lines()
        .filter(|l| l.contains(r#""file":"x.a(m.o)""#))
        .count();
    let from_object = out
        .lines()
        .filter(|l| l.contains(r#""file":"m.o""#))
        .count();
    assert!(from_member > 0 && from_member == from_object, "{out}");
    let data = std::fs::read(dir.join("x.a")).unwrap();
    let members = ksites::elf::archive_members("x.a", &data).unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].0, "x.a(m.o)");
    assert_eq!(members[0].1, std::fs::read(dir.join("m.o")).unwrap());
    assert_eq!(ksites::elf::inputs("x.a", &data).unwrap(), members);
    assert_eq!(
        ksites::elf::inputs("m.o", members[0].1).unwrap(),
        [("m.o".to_string(), members[0].1)]
    );
    let e = ksites::elf::archive_members("m.o", members[0].1).unwrap_err();
    assert!(
        format!("{e:#}").contains("m.o: malformed ar archive"),
        "{e:#}"
    );
}

/// Row 12: a module whose allocated sections span 16 GiB (a huge read-only
/// `SHT_NOBITS`): the table's 32-bit fields cannot reach across it. The message says so
/// and names the section (it was "written table: PC32 overflow").
#[test]
fn row_12_huge_section_in_module_puts_table_out_of_reach() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = format!("{MODULE}\n    .section .rodata.big,\"a\",@nobits\n    .skip 0x400000000\n");
    assemble(dir, "big", &src);
    let o = ksites(
        dir,
        &["embed", "big.o", "-o", "out.o"],
        Duration::from_secs(20),
    );
    assert_refused(
        &o,
        &[
            "big.o: the allocated sections span",
            "section .rodata.big (index",
            "0x400000000 bytes",
            "more than 2 GiB",
        ],
    );
    assert!(!dir.join("out.o").exists());
}

/// Row 12, linked images: a table placed after a 16 GiB `.bss` is out of reach of the
/// code; [`ksites::table::check_reach`] says where it would go and why.
#[test]
fn row_12_table_after_huge_bss_is_out_of_reach() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = dir.join("big.s");
    std::fs::write(
        &s,
        ".text\n.globl _start\n_start: ret\n.section .bss,\"aw\",@nobits\n.skip 0x400000000\n",
    )
    .unwrap();
    let img = dir.join("big");
    let r = Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-o"])
        .arg(&img)
        .arg(&s)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let data = std::fs::read(&img).unwrap();
    let img = ksites::elf::Image::parse("big", &data).unwrap();
    let bss = img.section_by_name(".bss").unwrap();
    let end = bss.address() + bss.size();
    let at = end.next_multiple_of(4096);
    let e = ksites::table::check_reach(&img, at, 64).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&format!("big: the table would be placed at {at:#x}"))
            && msg.contains(".bss (index")
            && msg.contains(&format!("ends at {end:#x}"))
            && msg.contains("more than 2 GiB from the code"),
        "{msg}"
    );
    // Right after the code it is in reach.
    let text = img.section_by_name(".text").unwrap();
    ksites::table::check_reach(&img, text.address() + 0x1000, 64).unwrap();
}
