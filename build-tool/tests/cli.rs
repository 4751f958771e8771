//! The `ksites` CLI end to end: `scan` on gcc- and rustc-built objects, `verify`,
//! `link` with rust-lld and GNU ld, stapsdt notes read by `readelf -n`, killing `embed`
//! mid-write, and the help texts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");
const KSITES_LD: &str = env!("CARGO_BIN_EXE_ksites-ld");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gcc(args: &[&str], dir: &Path) {
    let o = run(Command::new("gcc").args(args).current_dir(dir));
    assert!(o.status.success(), "gcc {args:?}: {}", stderr(&o));
}

/// `ksites link --linker LINKER -- -static OBJECT -o OUT` in `dir`, then `ksites verify`
/// on the result; both must succeed.
fn link_and_verify(dir: &Path, linker: &str, object: &str, out: &str) {
    let o = run(Command::new(KSITES)
        .args([
            "link", "--linker", linker, "--", "-static", object, "-o", out,
        ])
        .current_dir(dir));
    assert!(o.status.success(), "{linker}: {}", stderr(&o));
    let v = run(Command::new(KSITES).args(["verify", out]).current_dir(dir));
    assert!(v.status.success(), "{linker}: {}", stdout(&v));
}

/// Assembly for an image with one ifunc `f1` laid out as `ifunc!` lays it out
/// (trampoline, slot, record, cell), `_start` holding `start`, and `impl_a` holding
/// `impl_body`; `extra` is appended.
fn one_ifunc_asm(name: &str, start: &str, impl_body: &str, extra: &str) -> String {
    format!(
        r#"
    .section .text.tramp,"ax",@progbits
    .globl f1
    .type f1,@function
f1: jmp *f1_slot(%rip)
    int3
    int3
    .size f1, .-f1
    .text
    .globl _start
    .type _start,@function
_start:
{start}
    .size _start, .-_start
    .type impl_a,@function
impl_a: {impl_body}
    .size impl_a, .-impl_a
    .data
    .balign 8
f1_slot: .quad impl_a
    .section .rodata
n1: .ascii "{name}::f1"
n1e:
    .section .ksites_ifuncs,"awR",@progbits
    .balign 8
    .long 0x4649534b, 1
    .quad f1, f1_slot, impl_a, impl_a, n1, n1e - n1
    .section .data.cell,"aw",@progbits
    .balign 8
    .globl {CELL_SYMBOL}
{CELL_SYMBOL}: .quad {CELL_MAGIC:#x}, 0, 0
{extra}
"#
    )
}

/// Runs `ksites scan ARGS --json` in `dir` and parses one JSON object per line.
fn scan_json(dir: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let o = run(Command::new(KSITES)
        .arg("scan")
        .arg("--json")
        .args(args)
        .current_dir(dir));
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An object (ET_REL) built by gcc from assembly with every kind of reference.
const SCAN_ASM: &str = r#"
    .text
    .globl f
    .type f,@function
f:
    call target_fn            # 0: call (5)
    .byte 0x2e
    call target_fn            # 5: prefixed call (6): the site is the 2e byte
    test %eax, %eax           # 11
    jne target_fn             # 13: jcc (6)
    lea target_fn(%rip), %rax # 19: address taken: not a site
    mov $target_fn, %eax      # 26: absolute: not a site
    call other_fn             # 31: other symbol
    call target_two           # 36: call (5), matched by the glob
    jmp target_fn             # 41: tail call (5)
    .size f, .-f
"#;

#[test]
fn scan_gcc_object_lists_exactly_the_call_and_jump_sites() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.s"), SCAN_ASM).unwrap();
    gcc(&["-c", "s.s", "-o", "s.o"], dir.path());
    let lines = scan_json(
        dir.path(),
        &["--calls-to", "target_*", "--jumps-to", "target_fn", "s.o"],
    );
    let got: Vec<(u64, u64, &str, &str)> = lines
        .iter()
        .map(|v| {
            assert_eq!(v["file"], "s.o");
            assert_eq!(v["section"], ".text");
            assert!(v.get("address").is_none(), "no address for an ET_REL");
            (
                v["offset"].as_u64().unwrap(),
                v["length"].as_u64().unwrap(),
                v["kind"].as_str().unwrap(),
                v["symbol"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 5, "call", "target_fn"),
            (5, 6, "call", "target_fn"),
            (13, 6, "jcc", "target_fn"),
            (36, 5, "call", "target_two"),
            (41, 5, "jmp", "target_fn"),
        ]
    );

    // Only calls when only --calls-to is given; text output names file+section+offset.
    let o = run(Command::new(KSITES)
        .args(["scan", "--calls-to", "target_fn", "s.o"])
        .current_dir(dir.path()));
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("s.o: .text+0x5 call (6 bytes) -> target_fn"),
        "{text}"
    );
}

/// A function nested inside another (`g` in `f`): the relocations' enclosing functions
/// go f, g, f, out of address order; and sections whose file order is not their name
/// order.
const NESTED_ASM: &str = r#"
    .section .text.b,"ax",@progbits
    .globl f
    .type f,@function
f:
    call target_fn            # .text.b+0 in f
    .globl g
    .type g,@function
g:
    call target_fn            # .text.b+5 in g
    .size g, .-g
    call target_fn            # .text.b+10 in f again
    ret
    .size f, .-f
    .section .text.a,"ax",@progbits
h:
    call target_fn            # .text.a+0
    lea target_fn(%rip), %rax # not a site
    ret
"#;

#[test]
fn scan_nested_functions_and_section_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("n.s"), NESTED_ASM).unwrap();
    gcc(&["-c", "n.s", "-o", "n.o"], dir.path());
    let o = run(Command::new(KSITES)
        .args(["scan", "--calls-to", "target_*", "n.o"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    let want = [
        "n.o: .text.a+0x0 call (5 bytes) -> target_fn",
        "n.o: .text.b+0x0 call (5 bytes) -> target_fn",
        "n.o: .text.b+0x5 call (5 bytes) -> target_fn",
        "n.o: .text.b+0xa call (5 bytes) -> target_fn",
    ];
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), want);
    // The JSON lines say the same, in the same order.
    let json: Vec<String> = scan_json(dir.path(), &["--calls-to", "target_*", "n.o"])
        .iter()
        .map(|v| {
            format!(
                "{}: {}+{:#x} {} ({} bytes) -> {}",
                v["file"].as_str().unwrap(),
                v["section"].as_str().unwrap(),
                v["offset"].as_u64().unwrap(),
                v["kind"].as_str().unwrap(),
                v["length"].as_u64().unwrap(),
                v["symbol"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(json, want);
}

/// A section with more relocations than one thread takes (it is split between the
/// CPUs), in address order; and the same with a function nested in its second half
/// (which sends the section to the sorted pass): every call, once, in order, and the
/// text output the same lines the hits give one by one.
#[test]
fn scan_of_a_large_section_split_between_threads() {
    const FUNCS: usize = 300;
    const CALLS: usize = 250;
    let dir = tempfile::tempdir().unwrap();
    for nested in [false, true] {
        let mut asm = String::from(".text\n");
        for f in 0..FUNCS {
            asm += &format!(".globl f{f}\n.type f{f},@function\nf{f}:\n");
            for c in 0..CALLS {
                if nested && f == 200 && c == 100 {
                    asm += ".globl g\n.type g,@function\ng:\n";
                }
                asm += "  call target_fn\n";
                if nested && f == 200 && c == 101 {
                    asm += ".size g, .-g\n";
                }
            }
            asm += &format!("  ret\n.size f{f}, .-f{f}\n");
        }
        std::fs::write(dir.path().join("big.s"), asm).unwrap();
        gcc(&["-c", "big.s", "-o", "big.o"], dir.path());
        let data = std::fs::read(dir.path().join("big.o")).unwrap();
        let opts = ksites::scan::ScanOptions {
            calls_to: vec!["target_*".into()],
            jumps_to: Vec::new(),
        };
        let r = ksites::scan::scan_bytes("big.o", &data, &opts).unwrap();
        let got: Vec<u64> = r.hits().map(|h| h.offset).collect();
        let want: Vec<u64> = (0..FUNCS)
            .flat_map(|f| (0..CALLS).map(move |c| (f * (CALLS * 5 + 1) + c * 5) as u64))
            .collect();
        assert_eq!(got, want, "nested: {nested}");
        let mut text = Vec::new();
        r.write_text(&mut text).unwrap();
        let lines: String = r.hits().map(|h| h.to_text() + "\n").collect();
        assert_eq!(String::from_utf8(text).unwrap(), lines);
    }
}

#[test]
fn scan_rustc_object_and_linked_image() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.rs"),
        r#"#![no_std]
unsafe extern "C" { fn target_fn(x: u64) -> u64; }
#[unsafe(no_mangle)] #[inline(never)]
pub extern "C" fn plain(x: u64) -> u64 {
    // SAFETY: target_fn (defined by the test's assembly) takes any u64.
    unsafe { target_fn(x) }.wrapping_mul(3)
}
#[unsafe(no_mangle)] #[inline(never)]
pub extern "C" fn tail(x: u64) -> u64 {
    // SAFETY: as in `plain`.
    unsafe { target_fn(x ^ 5) }
}
#[unsafe(no_mangle)] #[inline(never)]
pub extern "C" fn addr() -> usize { target_fn as usize }
"#,
    )
    .unwrap();
    let o = run(Command::new("rustc")
        .args([
            "--crate-type=lib",
            "--emit=obj",
            "-O",
            "-C",
            "panic=abort",
            "--target",
            "x86_64-unknown-none",
            "-C",
            "relocation-model=static",
            "-o",
            "r.o",
            "r.rs",
        ])
        .current_dir(dir.path()));
    assert!(o.status.success(), "rustc: {}", stderr(&o));
    let v = scan_json(
        dir.path(),
        &["--calls-to", "target_fn", "--jumps-to", "target_fn", "r.o"],
    );
    let kinds: Vec<(&str, &str)> = v
        .iter()
        .map(|h| (h["section"].as_str().unwrap(), h["kind"].as_str().unwrap()))
        .collect();
    // One call (plain), one tail jmp (tail); the address-taken reference is not a site.
    assert_eq!(
        kinds,
        [(".text.plain", "call"), (".text.tail", "jmp")],
        "{v:?}"
    );

    // Link it with a definition and scan the image: the same sites, now with addresses.
    std::fs::write(
        dir.path().join("t.s"),
        ".text\n.globl target_fn\n.type target_fn,@function\ntarget_fn: ret\n.globl _start\n_start: call plain\n call tail\n call addr\n ret\n",
    )
    .unwrap();
    gcc(
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "-o",
            "img",
            "r.o",
            "t.s",
        ],
        dir.path(),
    );
    let v = scan_json(
        dir.path(),
        &[
            "--calls-to",
            "target_fn",
            "--jumps-to",
            "target_fn",
            "img",
            "r.o",
        ],
    );
    assert_eq!(v.len(), 4, "{v:?}");
    // Files in the order given; linked sites carry an address.
    assert_eq!(v[0]["file"], "img");
    assert!(v[0]["address"].as_u64().unwrap() > 0x400000);
    assert_eq!(v[3]["file"], "r.o");
}

/// The fixture from tests/embed.rs, reduced: one ifunc with three sites, one C probe.
fn embedded_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let asm = one_ifunc_asm(
        "fixture",
        "    call f1\n    call __dtrace_probe_io___start\n    jmp f1",
        "ret",
        "    .text\n    .weak __dtrace_probe_io___start\n    .type __dtrace_probe_io___start,@function\n__dtrace_probe_io___start: ret\n    .size __dtrace_probe_io___start, 1",
    );
    std::fs::write(dir.join("fx.s"), asm).unwrap();
    gcc(
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "-o",
            "fx",
            "fx.s",
        ],
        dir,
    );
    let out = dir.join("fx.ksites");
    let o = run(Command::new(KSITES)
        .args(["embed", "fx", "-o", "fx.ksites"])
        .current_dir(dir));
    assert!(o.status.success(), "{}", stderr(&o));
    (dir.join("fx"), out)
}

#[test]
fn verify_accepts_a_good_image_and_catches_corrupted_sites() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = embedded_fixture(dir.path());
    let o = run(Command::new(KSITES).arg("verify").arg(&out));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("ok (2 ifunc sites, 1 probe sites)"),
        "{}",
        stdout(&o)
    );

    let data = std::fs::read(&out).unwrap();
    let img = ksites::elf::Image::parse("x", &data).unwrap();
    let start = img.symbol("_start").unwrap().addr;
    let off = img.va_to_file_offset(start, 15).unwrap() as usize;
    // Corrupt the first ifunc site (call -> jmp) and, separately, the probe site.
    for (at, byte, what) in [
        (off, 0xe9u8, "ifunc site 0"),
        (off + 5, 0xe8, "probe site 0"),
    ] {
        let mut bad = data.clone();
        bad[at] = byte;
        let p = dir.path().join("bad");
        std::fs::write(&p, &bad).unwrap();
        let o = run(Command::new(KSITES).arg("verify").arg(&p));
        assert_eq!(o.status.code(), Some(4), "{what}: {}", stdout(&o));
        let report = stdout(&o);
        assert!(
            report.contains(what) && report.contains(".text+0x"),
            "{what}: {report}"
        );
        assert!(
            report.contains("_start"),
            "report names the function: {report}"
        );
    }
    // Not embedded: a clear error, exit 1.
    let o = run(Command::new(KSITES)
        .arg("verify")
        .arg(dir.path().join("fx")));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not embedded"), "{}", stderr(&o));
}

#[test]
fn readelf_lists_each_probe_site_from_the_stapsdt_notes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = embedded_fixture(dir.path());
    let o = run(Command::new("readelf").arg("-n").arg(&out));
    let text = stdout(&o);
    assert!(text.contains("NT_STAPSDT"), "{text}");
    assert_eq!(text.matches("Provider: io").count(), 1, "{text}");
    assert!(text.contains("Name: start"), "{text}");
    let data = std::fs::read(&out).unwrap();
    let img = ksites::elf::Image::parse("x", &data).unwrap();
    let site = img.symbol("_start").unwrap().addr + 5;
    assert!(text.contains(&format!("Location: {site:#018x}")), "{text}");
    let base = img.section_by_name(".stapsdt.base").expect(".stapsdt.base");
    use object::ObjectSection;
    assert!(
        text.contains(&format!("Base: {:#018x}", base.address())),
        "{text}"
    );
}

#[test]
fn link_wrapper_with_rust_lld_and_gnu_ld() {
    let dir = tempfile::tempdir().unwrap();
    embedded_fixture(dir.path());
    gcc(&["-c", "fx.s", "-o", "fx.o"], dir.path());
    for linker in ["lld", "bfd"] {
        let out = format!("linked-{linker}");
        link_and_verify(dir.path(), linker, "fx.o", &out);
        let comment = run(Command::new("readelf")
            .args(["-p", ".comment", &out])
            .current_dir(dir.path()));
        assert_eq!(
            stdout(&comment).contains("LLD"),
            linker == "lld",
            "{linker} did not link it"
        );
    }
    // ksites-ld, as `LD=ksites-ld`: KSITES_LINKER picks the linker.
    let o = run(Command::new(KSITES_LD)
        .env("KSITES_LINKER", "bfd")
        .args(["-static", "fx.o", "-o", "via-ld"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        run(Command::new(KSITES)
            .args(["verify", "via-ld"])
            .current_dir(dir.path()))
        .status
        .success()
    );

    // A failing link leaves an existing output untouched and no temporary files.
    std::fs::write(dir.path().join("keep"), b"old").unwrap();
    let o = run(Command::new(KSITES_LD)
        .args(["-static", "fx.o", "missing.o", "-o", "keep"])
        .current_dir(dir.path()));
    assert!(!o.status.success());
    assert_eq!(std::fs::read(dir.path().join("keep")).unwrap(), b"old");
    let tmp = common::temp_files_left(dir.path());
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}

#[test]
fn killing_embed_mid_write_leaves_input_and_existing_output_intact() {
    let dir = tempfile::tempdir().unwrap();
    // A large image: 60,000 call sites.
    let asm = one_ifunc_asm("big", &"    call f1\n".repeat(60_000), "ret", "");
    std::fs::write(dir.path().join("big.s"), asm).unwrap();
    gcc(
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "-o",
            "big",
            "big.s",
        ],
        dir.path(),
    );
    let input = dir.path().join("big");
    let before = std::fs::read(&input).unwrap();
    let full = dir.path().join("full");
    let t0 = std::time::Instant::now();
    assert!(
        run(Command::new(KSITES)
            .arg("embed")
            .arg(&input)
            .arg("-o")
            .arg(&full))
        .status
        .success()
    );
    let took = t0.elapsed();
    let expected = std::fs::read(&full).unwrap();

    let out = dir.path().join("out");
    let mut killed_early = 0;
    for i in 0..12u32 {
        std::fs::write(&out, b"previous output").unwrap();
        // Half the runs write slowly (64 KiB chunks, 30 ms apart), so the kill lands in
        // the middle of writing the temporary file; the others race a normal run.
        let slow = i % 2 == 0;
        let mut cmd = Command::new(KSITES);
        cmd.arg("embed").arg(&input).arg("-o").arg(&out);
        if slow {
            cmd.env("KSITES_TEST_WRITE_DELAY_MS", "30");
        }
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(if slow {
            took + std::time::Duration::from_millis(60)
        } else {
            took * i / 10
        });
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !status.success() {
            killed_early += 1;
        }
        assert_eq!(
            std::fs::read(&input).unwrap(),
            before,
            "input changed (i={i})"
        );
        let now = std::fs::read(&out).unwrap();
        assert!(
            now == b"previous output" || now == expected,
            "output is neither the old nor the complete new file (i={i}, {} bytes)",
            now.len()
        );
        if slow {
            assert_eq!(
                now, b"previous output",
                "a slow run was not killed mid-write"
            );
        }
    }
    assert!(killed_early > 0, "no run was killed before finishing");
}

#[test]
fn help_texts_are_complete() {
    let o = run(Command::new(KSITES).arg("--help"));
    let top = stdout(&o);
    for sub in ["embed", "link", "inspect", "verify", "scan"] {
        assert!(top.contains(sub), "top-level help lacks {sub}: {top}");
        let o = run(Command::new(KSITES).args([sub, "--help"]));
        assert!(o.status.success());
        let h = stdout(&o);
        assert!(
            h.contains("Exit status:") && h.contains("4  verify"),
            "{sub} help lacks exit codes: {h}"
        );
    }
    let scan = stdout(&run(Command::new(KSITES).args(["scan", "--help"])));
    for opt in ["--calls-to", "--jumps-to", "--json", "offset", "address"] {
        assert!(scan.contains(opt), "scan help lacks {opt}");
    }
    let link = stdout(&run(Command::new(KSITES).args(["link", "--help"])));
    for opt in ["--linker", "KSITES_LINKER", "ksites-ld", "bfd"] {
        assert!(link.contains(opt), "link help lacks {opt}");
    }
    assert!(stdout(&run(Command::new(KSITES).args(["inspect", "--help"]))).contains("--json"));
    let ld = stdout(&run(Command::new(KSITES_LD).arg("--help")));
    assert!(ld.contains("KSITES_LINKER"), "{ld}");
}

#[test]
fn embedded_images_still_run_under_linux() {
    // The rewritten ELF (moved program headers, PT_PHDR, new PT_LOAD) must still be
    // loadable: link a tiny static Linux program through the wrapper and run it.
    let dir = tempfile::tempdir().unwrap();
    let asm = one_ifunc_asm(
        "run",
        "    call f1\n    mov %eax, %edi\n    mov $60, %eax\n    syscall",
        "mov $42, %eax\n    ret",
        "",
    );
    std::fs::write(dir.path().join("run.s"), asm).unwrap();
    gcc(&["-c", "run.s", "-o", "run.o"], dir.path());
    for linker in ["bfd", "lld"] {
        let out = format!("run-{linker}");
        link_and_verify(dir.path(), linker, "run.o", &out);
        let o = run(&mut Command::new(dir.path().join(&out)));
        assert_eq!(
            o.status.code(),
            Some(42),
            "{linker}-linked embedded image did not run"
        );
        // binutils' objcopy and strip keep the layout of a GNU ld image (the table where
        // the cell says): the copy verifies and runs. (strip removes the symbols and
        // relocations `verify` needs; the stripped image must still run.)
        for tool in ["objcopy", "strip"] {
            let copy = format!("{out}-{tool}");
            let mut c = Command::new(tool);
            if tool == "objcopy" {
                c.arg(&out).arg(&copy);
            } else {
                c.arg(&out).arg("-o").arg(&copy);
            }
            let o = run(c.current_dir(dir.path()));
            assert!(o.status.success(), "{tool}: {}", stderr(&o));
            let moved = stderr(&o).contains("adjusted");
            if tool == "objcopy" {
                // verify must agree with what binutils did: ok only if nothing moved.
                let v = run(Command::new(KSITES)
                    .args(["verify", &copy])
                    .current_dir(dir.path()));
                assert_eq!(
                    v.status.success(),
                    !moved,
                    "{linker}+{tool}: {}",
                    stdout(&v)
                );
            }
            if moved {
                // Only with lld's PT_PHDR layout does binutils move the header segment.
                assert_eq!(linker, "lld", "{tool} moved a section of a GNU ld image");
                continue;
            }
            let o = run(&mut Command::new(dir.path().join(&copy)));
            assert_eq!(
                o.status.code(),
                Some(42),
                "{linker}+{} image did not run",
                tool
            );
        }
    }
}

#[test]
fn gcc_c_with_gnu_ifuncs_and_sdt_probes_through_both_linkers() {
    // Real C, compiled by gcc as a kernel would compile it, using ksites_sdt.h and
    // __attribute__((ifunc)); linked through the wrapper by GNU ld and by rust-lld.
    let dir = tempfile::tempdir().unwrap();
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c");
    std::fs::write(
        dir.path().join("k.c"),
        format!(
            r#"#include "ksites_sdt.h"
KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
KSITES_PROBE_DECL(net, tx, 1, (unsigned long len))
static long a(long x) {{ return x; }}
static long b(long x) {{ return 2 * x; }}
static long (*pick(unsigned long f))(long) {{ return (f & 1) ? b : a; }}
long scale(long x) __attribute__((ifunc("pick")));
struct cell {{ unsigned long m, o, s; }};
__attribute__((used)) struct cell {CELL_SYMBOL} = {{ {CELL_MAGIC:#x}UL, 0, 0 }};
volatile long sink;
void rx(unsigned long len, unsigned long port) {{
    KSITES_PROBE(net, rx, len, port);
    sink = scale(len);
}}
void tx(unsigned long len) {{
    sink += len;
    KSITES_PROBE(net, tx, len);
}}
int rx_on(void) {{ return KSITES_PROBE_ENABLED(net, rx); }}
long twice(long x) {{ if (KSITES_PROBE_ENABLED(net, tx)) sink = 1; return scale(x) + scale(x + 1); }}
void _start(void) {{ rx(1, 2); tx(3); sink = rx_on() + twice(4); for (;;) {{}} }}
void ksites_probe_ret0(void) {{}}
void ksites_probe_ret1(void) {{}}
"#
        ),
    )
    .unwrap();
    let inc = format!("-I{}", header.display());
    gcc(
        &[
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-mcmodel=kernel",
            "-mno-red-zone",
            "-fcf-protection=none",
            "-fno-stack-protector",
            &inc,
            "-c",
            "k.c",
            "-o",
            "k.o",
        ],
        dir.path(),
    );
    for linker in ["bfd", "lld"] {
        let out = format!("k-{linker}");
        link_and_verify(dir.path(), linker, "k.o", &out);
        let data = std::fs::read(dir.path().join(&out)).unwrap();
        let j = ksites::inspect::inspect_json(&out, &data).unwrap();
        let ifuncs = j["ifuncs"].as_array().unwrap();
        assert_eq!(ifuncs.len(), 1, "{linker}: {j}");
        assert_eq!(ifuncs[0]["name"], "scale");
        assert_eq!(
            ifuncs[0]["sites"].as_array().unwrap().len(),
            3,
            "{linker}: {j}"
        );
        let probes = j["probes"].as_array().unwrap();
        let names: Vec<_> = probes
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["nargs"].clone()))
            .collect();
        assert_eq!(
            names,
            [("net:rx", 2.into()), ("net:tx", 1.into())],
            "{linker}"
        );
        let kinds: Vec<&str> = probes
            .iter()
            .flat_map(|p| {
                p["sites"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["kind"].as_str().unwrap())
            })
            .collect();
        for k in ["c-call", "c-tail", "c-is-enabled", "c-is-enabled-tail"] {
            assert!(kinds.contains(&k), "{linker}: no {k} site: {kinds:?}");
        }
        // readelf lists every firing site (not the is-enabled checks) with its arguments.
        let n = run(Command::new("readelf")
            .args(["-n", &out])
            .current_dir(dir.path()));
        let notes = stdout(&n);
        let firing = kinds
            .iter()
            .filter(|k| matches!(**k, "c-call" | "c-tail"))
            .count();
        assert!(firing >= 2);
        assert_eq!(
            notes.matches("NT_STAPSDT").count(),
            firing,
            "{linker}: {notes}"
        );
        assert!(notes.contains("Arguments: 8@%rdi 8@%rsi"), "{notes}");
        assert!(
            notes.contains("Name: tx") && notes.contains("Provider: net"),
            "{notes}"
        );
    }
}
