//! C probe rewriting on images linked by gcc/GNU ld with `--emit-relocs`: exact bytes for
//! plain, tail and is-enabled sites, the table entries, and refusal of sites that cannot
//! be rewritten safely (nothing written).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};
use kernel_loader::format::{ProbeKind, SECTION_NAME, Table};
use ksites::elf::Image;
use ksites::embed::embed_file;
use object::{Object, ObjectSection, ObjectSymbol};

const STUBS: &str = r#"
    .section .text.stubs,"ax",@progbits
    .weak __dtrace_probe_net___rx
    .type __dtrace_probe_net___rx,@function
__dtrace_probe_net___rx: ret
    .size __dtrace_probe_net___rx, 1
    .weak __dtraceenabled_net___rx
    .type __dtraceenabled_net___rx,@function
__dtraceenabled_net___rx: xor %eax, %eax
    ret
    .size __dtraceenabled_net___rx, 3
    .weak __dtrace_probe_net___tx
    .type __dtrace_probe_net___tx,@function
__dtrace_probe_net___tx: ret
    .size __dtrace_probe_net___tx, 1
    .weak __dtraceenabled_net___tx
    .type __dtraceenabled_net___tx,@function
__dtraceenabled_net___tx: xor %eax, %eax
    ret
    .size __dtraceenabled_net___tx, 3

    .text
    .globl ksites_probe_ret0
    .type ksites_probe_ret0,@function
ksites_probe_ret0: xor %eax, %eax
    ret
    .globl ksites_probe_ret1
    .type ksites_probe_ret1,@function
ksites_probe_ret1: mov $1, %eax
    ret

    .section .ksites_probe_decls,"awR",@progbits
    .p2align 3
    .long 0x4450534b, 2
    .quad p1, p1e - p1, n1, n1e - n1
    .section .rodata
p1: .ascii "net"
p1e:
n1: .ascii "rx"
n1e:
"#;

fn cell() -> String {
    format!(
        "    .section .data.cell,\"aw\",@progbits\n    .balign 8\n    .globl {CELL_SYMBOL}\n{CELL_SYMBOL}: .quad {CELL_MAGIC:#x}, 0, 0\n"
    )
}

fn link(dir: &Path, name: &str, text: &str) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    let out = dir.join(name);
    std::fs::write(&src, format!("{text}\n{STUBS}\n{}", cell())).unwrap();
    let st = Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc is needed to link test fixtures");
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

const GOOD: &str = r#"
    .text
    .globl _start
    .type _start,@function
_start:
    mov $1, %edi
    mov $2, %esi
    call __dtrace_probe_net___rx        # plain: NOP
    call __dtraceenabled_net___rx       # is-enabled: xor eax,eax + NOP
    test %eax, %eax
    jmp __dtrace_probe_net___tx         # tail: ret + NOPs
    .size _start, .-_start
    .globl check
    .type check,@function
check:
    jmp __dtraceenabled_net___tx        # is-enabled tail: xor eax,eax; ret
    .size check, .-check
"#;

#[test]
fn c_probe_calls_are_rewritten_into_their_disabled_forms() {
    let dir = tempfile::tempdir().unwrap();
    let input = link(dir.path(), "good", GOOD);
    let before = std::fs::read(&input).unwrap();
    let out = dir.path().join("good.ksites");
    let report = embed_file(&input, &out).unwrap();
    assert_eq!(std::fs::read(&input).unwrap(), before, "input modified");

    let data = std::fs::read(&out).unwrap();
    let img = Image::parse("out", &data).unwrap();
    let start = sym(&img, "_start");
    let check = sym(&img, "check");
    // mov (5) mov (5) | call rx @10 | call rx-enabled @15 | test (2) | jmp tx @22
    let at = |a: u64| img.read_va(a, 5).unwrap().to_vec();
    assert_eq!(at(start + 10), [0x0f, 0x1f, 0x44, 0x00, 0x00], "plain call");
    assert_eq!(
        at(start + 15),
        [0xb8, 0x00, 0x00, 0x00, 0x00],
        "is-enabled call: mov eax, 0"
    );
    assert_eq!(at(start + 22), [0xc3, 0x90, 0x90, 0x90, 0x90], "tail call");
    let ret0 = sym(&img, "ksites_probe_ret0");
    let rel = (ret0 as i64 - (check as i64 + 5)) as i32;
    let mut jmp_ret0 = vec![0xe9];
    jmp_ret0.extend_from_slice(&rel.to_le_bytes());
    assert_eq!(
        at(check),
        jmp_ret0,
        "is-enabled tail call: jmp ksites_probe_ret0"
    );
    // Nothing else in text changed.
    let orig = Image::parse("in", &before).unwrap();
    let (t0, t1) = (
        orig.file
            .section_by_name(".text")
            .unwrap()
            .data()
            .unwrap()
            .to_vec(),
        img.file
            .section_by_name(".text")
            .unwrap()
            .data()
            .unwrap()
            .to_vec(),
    );
    let changed: Vec<usize> = (0..t0.len()).filter(|&i| t0[i] != t1[i]).collect();
    assert!(
        changed.iter().all(|&i| (10..20).contains(&i)
            || (22..27).contains(&i)
            || i >= (check - start) as usize)
    );

    // The table describes two probes and four sites of the right kinds.
    let sec = img.file.section_by_name(SECTION_NAME).unwrap();
    let t = Table::parse(sec.data().unwrap(), sec.address(), &img.exec_ranges()).unwrap();
    let probes: Vec<_> = t.probes().map(|p| (p.provider, p.name, p.nargs)).collect();
    assert_eq!(probes, [("net", "rx", 2), ("net", "tx", 0xffff)]);
    let sites: Vec<_> = t.probe_sites().map(|s| (s.addr, s.kind, s.probe)).collect();
    assert_eq!(
        sites,
        [
            (start + 10, ProbeKind::CCall, 0),
            (start + 15, ProbeKind::CEnabled, 0),
            (start + 22, ProbeKind::CTail, 1),
            (check, ProbeKind::CEnabledTail, 1),
        ]
    );
    assert_eq!(report.probes.sites.len(), 4);

    // inspect lists providers, probes, argument counts and sites.
    let text = ksites::inspect::inspect("x", &data).unwrap();
    assert!(text.contains("probe net:rx nargs=2 sites=2"), "{text}");
    assert!(text.contains("probe net:tx nargs=? sites=2"), "{text}");
    assert!(text.contains("c-is-enabled-tail check"), "{text}");

    // The rewritten calls' relocations became R_X86_64_NONE.
    let relocs = Command::new("readelf")
        .arg("-rW")
        .arg(&out)
        .output()
        .unwrap();
    let relocs = String::from_utf8_lossy(&relocs.stdout);
    for l in relocs.lines().filter(|l| l.contains("__dtrace")) {
        assert!(l.contains("R_X86_64_NONE"), "stale relocation left: {l}");
    }
    assert!(relocs.contains("R_X86_64_NONE"), "{relocs}");
    // And verify still accepts the image.
    let r = ksites::verify::verify("out", &data).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.probe_sites, 4);
}

#[test]
fn unsafe_probe_sites_are_refused_and_nothing_is_written() {
    let cases = [
        ("jcc", "jne __dtrace_probe_net___rx", "jcc"),
        (
            "prefixed",
            ".byte 0x2e\n    call __dtrace_probe_net___rx",
            "prefixes",
        ),
        (
            "address",
            "lea __dtrace_probe_net___rx(%rip), %rax",
            "rewrite safely",
        ),
    ];
    for (name, insn, why) in cases {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "    .text\n    .globl _start\n    .type _start,@function\n_start:\n    {insn}\n    ret\n    .size _start, .-_start\n"
        );
        let input = link(dir.path(), name, &text);
        let out = dir.path().join("out");
        let err = embed_file(&input, &out).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(why) && msg.contains("__dtrace_probe_net___rx"),
            "{name}: {msg}"
        );
        assert!(
            msg.contains("_start"),
            "{name}: message does not name the function: {msg}"
        );
        assert!(!out.exists(), "{name}: output written despite the error");
        let leftovers = common::temp_files_left(dir.path());
        assert!(leftovers.is_empty(), "{name}: temporary file left behind");
    }
}
