//! `embed` and `inspect` on a small image linked for real: an assembly fixture laid out
//! exactly as the `ifunc!` macro lays out an ifunc (trampoline, slot, record, cell),
//! assembled and linked by gcc/GNU ld with `--emit-relocs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};
use kernel_loader::format::{SECTION_NAME, SiteKind, Table};
use ksites::elf::Image;
use ksites::embed::{AlreadyEmbedded, embed_bytes, embed_file};
use object::{Object, ObjectSection, ObjectSymbol};

fn fixture_asm() -> String {
    format!(
        r#"
    .section .text.tramp,"ax",@progbits
    .globl f1
    .type f1,@function
f1: jmp *f1_slot(%rip)
    int3
    int3
    .size f1, .-f1
    .globl f2
    .type f2,@function
f2: jmp *f2_slot(%rip)
    int3
    int3
    .size f2, .-f2

    .text
    .globl _start
    .type _start,@function
_start:
    call f1              # plain call
    .byte 0x2e           # CS prefix (gas drops a `cs` mnemonic in 64-bit mode)
    call f1              # prefixed call: the site starts at the 2e byte
    test %eax, %eax
    jne f1               # conditional tail call (0f 85 rel32)
    lea f1(%rip), %rax   # address taken: not a site
    mov $f1, %eax        # absolute address: not a site
    call f2
    call impl_a          # unrelated call
    jmp f2               # tail call
    .size _start, .-_start

    .type impl_a,@function
impl_a: mov $1, %eax
    ret
    .size impl_a, .-impl_a
    .type impl_b,@function
impl_b: mov $2, %eax
    ret
    .size impl_b, .-impl_b
    .type resolver,@function
resolver: xor %eax, %eax
    ret
    .size resolver, .-resolver

    .data
    .balign 8
f1_slot: .quad impl_a
f2_slot: .quad impl_b
fnptr:   .quad f1            # data reference: ignored (not in text)

    .section .rodata
name1: .ascii "fixture::f1"
name1_end:
name2: .ascii "fixture::f2"
name2_end:

    .section .ksites_ifuncs,"awR",@progbits
    .balign 8
    .long 0x4649534b, 1
    .quad f1, f1_slot, resolver, impl_a, name1, name1_end - name1
    .long 0x4649534b, 1
    .quad f2, f2_slot, resolver, impl_b, name2, name2_end - name2

    .section .data.cell,"aw",@progbits
    .balign 8
    .globl {CELL_SYMBOL}
{CELL_SYMBOL}: .quad {CELL_MAGIC:#x}, 0, 0
"#
    )
}

fn build_fixture(dir: &Path, asm: &str, name: &str, emit_relocs: bool) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    let out = dir.join(name);
    std::fs::write(&src, asm).unwrap();
    let mut cmd = Command::new("gcc");
    cmd.args(["-nostdlib", "-static", "-no-pie", "-o"])
        .arg(&out)
        .arg(&src);
    if emit_relocs {
        cmd.arg("-Wl,--emit-relocs");
    }
    let st = cmd.status().expect("gcc is needed to link test fixtures");
    assert!(st.success(), "gcc failed on {name}");
    out
}

fn sym(img: &Image<'_>, name: &str) -> u64 {
    img.file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap()
        .address()
}

#[test]
fn embed_finds_calls_tail_calls_jcc_and_prefixed_calls_only() {
    let dir = tempfile::tempdir().unwrap();
    let input = build_fixture(dir.path(), &fixture_asm(), "fixture", true);
    let data = std::fs::read(&input).unwrap();
    let (out, report) = embed_bytes("fixture", &data).unwrap();

    assert_eq!(report.ifuncs.len(), 2);
    let img = Image::parse("in", &data).unwrap();
    let start = sym(&img, "_start");
    // _start: e8 (5) | 2e e8 (6) | 85 c0 (2) | 0f 85 (6) | lea (7) | mov (5) | e8 (5) | e8 (5) | e9 (5)
    let expect = [
        (start, SiteKind::Call, 0u8, "fixture::f1"),
        (start + 5, SiteKind::Call, 1, "fixture::f1"),
        (start + 13, SiteKind::Jcc, 0, "fixture::f1"),
        (start + 31, SiteKind::Call, 0, "fixture::f2"),
        (start + 41, SiteKind::Jmp, 0, "fixture::f2"),
    ];
    let got: Vec<_> = report
        .scan
        .sites
        .iter()
        .map(|s| {
            (
                s.addr,
                s.kind,
                s.prefixes,
                report.ifuncs[s.target as usize].name.as_str(),
            )
        })
        .collect();
    assert_eq!(got, expect);
    // The lea and the absolute mov are reported, not recorded.
    assert_eq!(
        report.scan.other_refs.len(),
        2,
        "{:?}",
        report.scan.other_refs
    );
    assert!(
        report.scan.other_refs[0].what.starts_with("lea"),
        "{:?}",
        report.scan.other_refs
    );
    assert!(report.scan.other_refs[1].what.contains("absolute"));

    // The output's table validates with the loader's reader and matches the scan.
    let oimg = Image::parse("out", &out).unwrap();
    let sec = oimg
        .file
        .section_by_name(SECTION_NAME)
        .expect(".ksites section");
    let table = Table::parse(sec.data().unwrap(), sec.address(), &oimg.exec_ranges()).unwrap();
    assert_eq!(table.ifunc_count(), 2);
    let tsites: Vec<_> = table
        .sites()
        .map(|s| {
            (
                s.addr,
                s.kind,
                s.prefixes,
                table.ifunc(s.ifunc).unwrap().name,
            )
        })
        .collect();
    assert_eq!(tsites, expect);
    let f1 = table.ifuncs().find(|f| f.name == "fixture::f1").unwrap();
    assert_eq!(f1.trampoline, sym(&img, "f1"));
    assert_eq!(f1.slot, sym(&img, "f1_slot"));
    assert_eq!(f1.default, sym(&img, "impl_a"));
    assert_eq!(f1.resolver, sym(&img, "resolver"));

    // The table sits in its own read-only PT_LOAD, and the cell points at it.
    let seg = oimg
        .file
        .elf_program_headers()
        .iter()
        .find(|p| {
            use object::read::elf::ProgramHeader;
            let e = object::LittleEndian;
            p.p_type(e) == object::elf::PT_LOAD && p.p_vaddr(e) == sec.address()
        })
        .expect("a PT_LOAD for the table");
    {
        use object::read::elf::ProgramHeader;
        assert_eq!(seg.p_flags(object::LittleEndian), object::elf::PF_R);
    }
    let cell = sym(&oimg, CELL_SYMBOL);
    let cb = oimg.read_va(cell, 24).unwrap();
    assert_eq!(u64::from_le_bytes(cb[0..8].try_into().unwrap()), CELL_MAGIC);
    let off = i64::from_le_bytes(cb[8..16].try_into().unwrap());
    assert_eq!(cell.wrapping_add_signed(off), sec.address());
    assert_eq!(
        u64::from_le_bytes(cb[16..24].try_into().unwrap()),
        sec.size()
    );

    // Code bytes are untouched by embed (ifunc sites are patched at boot).
    let text = img.file.section_by_name(".text").unwrap();
    let otext = oimg.file.section_by_name(".text").unwrap();
    assert_eq!(text.data().unwrap(), otext.data().unwrap());
    assert_eq!(text.address(), otext.address());
}

#[test]
fn embed_twice_is_detected_and_output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let input = build_fixture(dir.path(), &fixture_asm(), "fixture", true);
    let before = std::fs::read(&input).unwrap();
    let out1 = dir.path().join("out1");
    let out2 = dir.path().join("out2");
    embed_file(&input, &out1).unwrap();
    embed_file(&input, &out2).unwrap();
    assert_eq!(std::fs::read(&input).unwrap(), before, "input modified");
    assert_eq!(
        std::fs::read(&out1).unwrap(),
        std::fs::read(&out2).unwrap(),
        "not deterministic"
    );

    // Written from the input by two threads (the bulk copied early, the rest after),
    // the file is what the in-memory embed builds.
    let (in_memory, _) = embed_bytes("fixture", &before).unwrap();
    assert_eq!(std::fs::read(&out1).unwrap(), in_memory);

    let err = embed_file(&out1, &dir.path().join("out3")).unwrap_err();
    assert!(err.downcast_ref::<AlreadyEmbedded>().is_some(), "{err:#}");
    assert!(!dir.path().join("out3").exists());
    // The temporary file the early copy went to is gone with the error.
    let tmp = common::temp_files_left(dir.path());
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");

    let err = embed_file(&input, &input).unwrap_err();
    assert!(format!("{err:#}").contains("refusing to overwrite the input"));
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn embed_without_emit_relocs_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = build_fixture(dir.path(), &fixture_asm(), "norelocs", false);
    let err = embed_bytes("norelocs", &std::fs::read(&input).unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("--emit-relocs"), "{err:#}");
}

#[test]
fn image_without_ifuncs_is_copied_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start: call g\n ret\ng: ret\n";
    let input = build_fixture(dir.path(), asm, "plain", true);
    let data = std::fs::read(&input).unwrap();
    let (out, report) = embed_bytes("plain", &data).unwrap();
    assert_eq!(out, data);
    assert!(report.table.is_none());
    let copy = dir.path().join("plain.out");
    assert!(embed_file(&input, &copy).unwrap().table.is_none());
    assert_eq!(std::fs::read(&copy).unwrap(), data);
}

#[test]
fn inspect_lists_each_ifunc_with_its_site_count() {
    let dir = tempfile::tempdir().unwrap();
    let input = build_fixture(dir.path(), &fixture_asm(), "fixture", true);
    let out = dir.path().join("fixture.ksites");
    embed_file(&input, &out).unwrap();
    for path in [&input, &out] {
        let text = ksites::inspect::inspect("x", &std::fs::read(path).unwrap()).unwrap();
        let lines: Vec<_> = text.lines().filter(|l| l.starts_with("ifunc ")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("ifunc fixture::f1 trampoline=0x")
                && lines[0].ends_with(" f1 sites=3"),
            "{text}"
        );
        assert!(lines[1].ends_with(" f2 sites=2"), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("  site ")).count(),
            5,
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("  ref ")).count(),
            2,
            "{text}"
        );
    }
}
