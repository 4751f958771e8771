//! The command-line front ends under hostile and careless use (issue 14): `ksites-ld`
//! with the linkers' informational flags, nested and non-UTF-8 response files, an output
//! that is one of its inputs and a linker that cannot run; `check-module` against
//! kernels that cannot say whether an import is an ifunc, and on inputs that are not
//! modules; usage errors for bad globs and load addresses.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");
const KSITES_LD: &str = env!("CARGO_BIN_EXE_ksites-ld");
/// Both linkers `ksites-ld` knows by name (the toolchain's rust-lld, else ld.lld; and
/// GNU ld), as in tests/cli.rs.
const LINKERS: [&str; 2] = ["bfd", "lld"];

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn gcc(dir: &Path, args: &[&str]) {
    let o = run(Command::new("gcc").args(args).current_dir(dir));
    assert!(o.status.success(), "gcc {args:?}: {}", text(&o));
}

/// `ksites-ld ARGS` in `dir` with `KSITES_LINKER=linker`.
fn ld(dir: &Path, linker: &str, args: &[&OsStr]) -> Output {
    run(Command::new(KSITES_LD)
        .env("KSITES_LINKER", linker)
        .args(args)
        .current_dir(dir))
}

fn os<'a>(v: &[&'a str]) -> Vec<&'a OsStr> {
    v.iter().map(|s| OsStr::new(*s)).collect()
}

/// Whether `ksites verify` accepts `file` (so it was embedded: it has a `.ksites` table).
fn verified(dir: &Path, file: &OsStr) -> bool {
    run(Command::new(KSITES)
        .arg("verify")
        .arg(file)
        .current_dir(dir))
    .status
    .success()
}

/// `k.o`: freestanding C with one GNU ifunc `scale` (3 sites), a plain function
/// `popcount`, the ksites cell and an `_start`.
fn kernel_object(dir: &Path) {
    std::fs::write(
        dir.join("k.c"),
        format!(
            r#"static long a(long x) {{ return x; }}
static long b(long x) {{ return 2 * x; }}
static long (*pick(unsigned long f))(long) {{ return (f & 1) ? b : a; }}
long scale(long x) __attribute__((ifunc("pick")));
unsigned popcount(unsigned long x) {{ return (unsigned)(x & 0xff); }}
struct cell {{ unsigned long m, o, s; }};
__attribute__((used)) struct cell {CELL_SYMBOL} = {{ {CELL_MAGIC:#x}UL, 0, 0 }};
volatile long sink;
void _start(void) {{ sink = scale(1) + scale(2) + scale(3) + popcount(7); for (;;) {{}} }}
"#
        ),
    )
    .unwrap();
    gcc(
        dir,
        &[
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-fno-inline",
            "-mcmodel=kernel",
            "-fcf-protection=none",
            "-fno-stack-protector",
            "-c",
            "k.c",
            "-o",
            "k.o",
        ],
    );
}

fn assert_no_temp_files(dir: &Path) {
    let left = common::temp_files_left(dir);
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn row_04_version_flags_with_inputs_still_link_and_embed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    for linker in LINKERS {
        let banner = if linker == "bfd" { "GNU ld" } else { "LLD" };
        // -v and -V print the version and link (both linkers): the output is embedded.
        for flag in ["-v", "-V"] {
            let out = format!("v-{linker}{flag}.img");
            let o = ld(
                d,
                linker,
                &[
                    OsStr::new("-static"),
                    OsStr::new("k.o"),
                    OsStr::new("-o"),
                    OsStr::new(&out),
                    OsStr::new(flag),
                ],
            );
            let t = text(&o);
            assert!(o.status.success(), "{linker} {flag}: {t}");
            assert!(
                t.contains(banner),
                "{linker} {flag}: version not printed: {t}"
            );
            assert!(
                verified(d, OsStr::new(&out)),
                "{linker} {flag}: {out} is not embedded"
            );
        }
        // --version with inputs: both linkers print it and link nothing; nor does
        // ksites-ld (no output, no temporary file, exit 0).
        let o = ld(
            d,
            linker,
            &os(&["-static", "k.o", "-o", "q.img", "--version"]),
        );
        let t = text(&o);
        assert!(o.status.success(), "{linker}: {t}");
        assert!(t.contains(banner), "{linker}: {t}");
        assert!(
            !d.join("q.img").exists(),
            "{linker}: --version wrote an output"
        );
        // Nothing to link: a pure query, passed through (no a.out appears).
        for flag in ["-v", "-V", "--version"] {
            let o = ld(d, linker, &os(&[flag]));
            assert!(o.status.success(), "{linker} {flag}: {}", text(&o));
            assert!(text(&o).contains(banner), "{linker} {flag}: {}", text(&o));
            assert!(!d.join("a.out").exists(), "{linker} {flag}");
        }
        assert_no_temp_files(d);
    }
}

#[test]
fn row_05_nested_response_files_expand_as_the_linkers_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    std::fs::create_dir(d.join("rsp")).unwrap();
    // Nested paths are relative to the current directory (libiberty's expandargv), and
    // libiberty's quoting holds: a quoted name with a space, a backslash escape.
    std::fs::write(d.join("rsp/ok.rsp"), "-static\n'k.o' -o \"out put.img\"\n").unwrap();
    std::fs::write(d.join("rsp/outer.rsp"), "@rsp/ok.rsp --build\\-id=none\n").unwrap();
    for linker in LINKERS {
        let _ = std::fs::remove_file(d.join("out put.img"));
        let o = ld(d, linker, &os(&["@rsp/outer.rsp"]));
        assert!(o.status.success(), "{linker}: {}", text(&o));
        assert!(
            verified(d, OsStr::new("out put.img")),
            "{linker}: the output named in a nested response file is not embedded"
        );
    }
    // A file that includes itself (through another) is an error naming both.
    std::fs::write(d.join("a.rsp"), "k.o @b.rsp").unwrap();
    std::fs::write(d.join("b.rsp"), "-o loop.img @a.rsp").unwrap();
    let o = ld(d, "bfd", &os(&["@a.rsp"]));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("a.rsp includes itself: a.rsp -> b.rsp -> a.rsp"),
        "{t}"
    );
    assert!(!d.join("loop.img").exists());
    // Nesting deeper than the limit stops with the file where it stopped.
    for i in 0..70 {
        std::fs::write(d.join(format!("n{i}.rsp")), format!("@n{}.rsp", i + 1)).unwrap();
    }
    std::fs::write(d.join("n70.rsp"), "k.o -o deep.img").unwrap();
    let o = ld(d, "bfd", &os(&["@n0.rsp"]));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("nested deeper than 64; stopped at n64.rsp"),
        "{t}"
    );
    assert!(t.contains("(named in response file n63.rsp)"), "{t}");
    // A missing one is named, with the file that named it.
    std::fs::write(d.join("m.rsp"), "@gone.rsp").unwrap();
    let t = text(&ld(d, "bfd", &os(&["@m.rsp"])));
    assert!(
        t.contains("cannot read response file gone.rsp (named in response file m.rsp)"),
        "{t}"
    );
    assert_no_temp_files(d);
}

#[test]
fn row_14_response_file_with_non_utf8_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    // GNU ld takes arguments as bytes; so does ksites-ld.
    std::fs::write(d.join("b.rsp"), b"-static k.o -o out\xff\xfe.img\n").unwrap();
    let out = OsStr::from_bytes(b"out\xff\xfe.img");
    for linker in LINKERS {
        let _ = std::fs::remove_file(d.join(out));
        let o = ld(d, linker, &os(&["@b.rsp"]));
        let t = text(&o);
        assert!(o.status.success(), "{linker}: {t}");
        assert!(!t.contains("valid UTF-8"), "{t}");
        assert!(verified(d, out), "{linker}: not embedded");
    }
    // A NUL byte is refused, naming the file and the offset.
    std::fs::write(d.join("z.rsp"), b"k.o\0-o z.img").unwrap();
    let t = text(&ld(d, "bfd", &os(&["@z.rsp"])));
    assert!(
        t.contains("response file z.rsp: a NUL byte at offset 0x3"),
        "{t}"
    );
}

#[test]
fn row_06_output_equal_to_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    let before = std::fs::read(d.join("k.o")).unwrap();
    std::fs::hard_link(d.join("k.o"), d.join("same.o")).unwrap();
    for linker in LINKERS {
        // The same path, another spelling of it, and a hard link to it.
        for (input, out) in [("k.o", "k.o"), ("./k.o", "k.o"), ("k.o", "same.o")] {
            let o = ld(d, linker, &os(&["-static", input, "-o", out]));
            let t = text(&o);
            assert_eq!(o.status.code(), Some(1), "{linker} {input} -o {out}: {t}");
            assert!(
                t.contains(&format!(
                    "input file {input} is the same as the output file {out}"
                )),
                "{t}"
            );
            assert_eq!(std::fs::read(d.join("k.o")).unwrap(), before, "{linker}");
        }
    }
    // An output named like an input that does not exist yet is compared by path.
    let o = ld(d, "bfd", &os(&["-static", "k.o", "new.o", "-o", "./new.o"]));
    assert!(
        text(&o).contains("is the same as the output file"),
        "{}",
        text(&o)
    );
    assert!(!d.join("new.o").exists());
    assert_no_temp_files(d);
}

#[test]
fn row_12_linker_errors_name_the_program_and_the_users_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    let o = ld(
        d,
        "/nonexistent/ld",
        &os(&["-static", "k.o", "-o", "v.img"]),
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(
            "ksites-ld: error: cannot run the linker /nonexistent/ld: No such file or directory"
        ),
        "{t}"
    );
    assert!(
        !t.contains("Program(") && !t.contains(".ksites-link"),
        "{t}"
    );
    assert!(!d.join("v.img").exists());
    assert_no_temp_files(d);

    // An embed error about what the linker produced names the -o path, not the
    // temporary file the linker wrote: here the linked image is already embedded
    // (its object carries a .ksites section holding a table's magic; a zero-filled one
    // would be a slot reserved for the table).
    std::fs::write(
        d.join("t.s"),
        ".section .ksites,\"a\",@progbits\n.ascii \"KSITES\\0\\0\"\n.quad 0\n",
    )
    .unwrap();
    gcc(d, &["-c", "t.s", "-o", "t.o"]);
    for linker in LINKERS {
        let o = ld(d, linker, &os(&["-static", "k.o", "t.o", "-o", "w.img"]));
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{linker}: {t}");
        assert!(t.contains("w.img"), "{linker}: {t}");
        assert!(!t.contains(".ksites-link"), "{linker}: {t}");
        assert!(!d.join("w.img").exists());
        // Another embed error: --gc-sections drops the table cell the image needs.
        let o = ld(
            d,
            linker,
            &os(&["-static", "--gc-sections", "k.o", "-o", "g.img"]),
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{linker}: {t}");
        assert!(
            t.contains("embedding into g.img failed; the output was not written: g.img: "),
            "{linker}: {t}"
        );
        assert!(!t.contains(".ksites-link"), "{linker}: {t}");
        assert!(!d.join("g.img").exists());
    }
    // The linker's own warnings name the user's output too (GNU ld warns about the
    // RWX segment `-N` makes, naming the file it writes).
    let o = ld(d, "bfd", &os(&["-static", "-N", "k.o", "-o", "rwx.img"]));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("rwx.img has a LOAD segment with RWX permissions"),
        "{t}"
    );
    assert!(!t.contains(".ksites-link"), "{t}");
    assert_no_temp_files(d);
}

/// `m.ko`: a module importing the kernel ifunc `popcount`, embedded.
fn module(dir: &Path) -> PathBuf {
    std::fs::write(
        dir.join("m.c"),
        "#include \"ksites_module.h\"\n\
         extern unsigned popcount(unsigned long);\n\
         KSITES_IFUNC_IMPORT(popcount);\n\
         unsigned mod_count(unsigned long x) { return popcount(x) + popcount(x >> 1); }\n",
    )
    .unwrap();
    let inc = format!(
        "-I{}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kernel-loader/c")
            .display()
    );
    gcc(
        dir,
        &[
            "-O2",
            "-fno-pic",
            "-fno-common",
            "-ffreestanding",
            "-fcf-protection=none",
            "-mcmodel=kernel",
            &inc,
            "-c",
            "m.c",
            "-o",
            "m.o",
        ],
    );
    let o = run(Command::new(KSITES)
        .args(["embed", "m.o", "-o", "m.ko"])
        .current_dir(dir));
    assert!(o.status.success(), "{}", text(&o));
    dir.join("m.ko")
}

fn check_module(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(KSITES)
        .arg("check-module")
        .args(args)
        .current_dir(dir))
}

/// A static "kernel" image from `k.o` linked at 0x200000 with GNU ld, by `ksites-ld`
/// (embedded) or by `ld.bfd` (not).
fn kernel_image(dir: &Path, embedded: bool, out: &str) {
    let args = ["-static", "-Ttext=0x200000", "k.o", "-o", out];
    let o = if embedded {
        ld(dir, "bfd", &os(&args))
    } else {
        run(Command::new("ld.bfd").args(args).current_dir(dir))
    };
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn row_07_imports_that_could_not_be_checked_are_said() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    module(d);
    kernel_object(d);
    kernel_image(d, false, "plain.img");
    kernel_image(d, true, "embedded.img");
    std::fs::write(d.join("System.map"), "0000000000201000 T popcount\n").unwrap();
    // System.map and an image without a table cannot say whether popcount is an ifunc:
    // the module would load, and the import is reported as not checked, with why.
    for (kernel, why) in [
        (
            "System.map",
            "System.map is a System.map, which does not say",
        ),
        ("plain.img", "plain.img has no .ksites table (not embedded)"),
    ] {
        let o = check_module(d, &["m.ko", "--kernel-symbols", kernel]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{kernel}: {t}");
        assert!(t.contains("m.ko: would load at"), "{kernel}: {t}");
        assert!(
            t.contains("import popcount: not checked to be a kernel ifunc (") && t.contains(why),
            "{kernel}: {t}"
        );
        let o = check_module(d, &["m.ko", "--kernel-symbols", kernel, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["loads"], true, "{v}");
        assert_eq!(v["ifunc_imports"], serde_json::json!(["popcount"]), "{v}");
        assert_eq!(v["ifunc_imports_checked"], false, "{v}");
    }
    // With the kernel's table the import is checked: popcount is a plain function
    // there, so the module would not load.
    let o = check_module(d, &["m.ko", "--kernel-symbols", "embedded.img"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("`popcount` is declared an ifunc import"), "{t}");
    assert!(!t.contains("not checked"), "{t}");
}

#[test]
fn row_11_inputs_that_are_not_modules_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = std::fs::read(module(d)).unwrap();
    let mut elf32 = b"\x7fELF\x01\x01\x01".to_vec();
    elf32.resize(52, 0);
    let mut core = m.clone();
    core[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    std::fs::write(d.join("empty"), b"").unwrap();
    std::fs::write(d.join("notes.txt"), b"just some text\n").unwrap();
    std::fs::write(d.join("elf32.o"), &elf32).unwrap();
    std::fs::write(d.join("core"), &core).unwrap();
    // An ET_REL header whose section headers lie past the end of the file.
    std::fs::write(d.join("cut.o"), &m[..100]).unwrap();
    let ar = run(Command::new("ar")
        .args(["rc", "lib.a", "m.o"])
        .current_dir(d));
    assert!(ar.status.success(), "{}", text(&ar));
    for (file, what) in [
        ("empty", "an empty file"),
        ("notes.txt", "not an ELF file"),
        ("elf32.o", "a 32-bit ELF file"),
        ("lib.a", "an ar archive"),
        ("core", "a core file (ET_CORE)"),
        ("missing.o", "cannot read missing.o"),
        ("cut.o", "cut.o: malformed module object: malformed ELF"),
    ] {
        let o = check_module(d, &[file]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {t}");
        assert!(t.contains(what) && t.contains(file), "{file}: {t}");
        assert!(!t.contains("would NOT load"), "{file}: {t}");
    }
    // A well-formed module that would not load still exits 4.
    std::fs::write(d.join("empty.map"), "0000000000201000 T other\n").unwrap();
    let o = check_module(d, &["m.ko", "--kernel-symbols", "empty.map"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
}

#[test]
fn row_13_bad_globs_and_load_addresses_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kernel_object(d);
    for (flag, glob) in [
        ("--calls-to", "["),
        ("--jumps-to", "f[ab]"),
        ("--calls-to", "{a,b}"),
        ("--calls-to", "a\\*"),
        ("--calls-to", ""),
    ] {
        let o = run(Command::new(KSITES)
            .args(["scan", flag, glob, "k.o"])
            .current_dir(d));
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {glob:?}: {t}");
        assert!(
            t.contains(&format!("invalid value '{glob}' for '{flag} <GLOB>'")),
            "{t}"
        );
        assert!(o.stdout.is_empty(), "{t}");
    }
    // A valid glob still scans.
    let o = run(Command::new(KSITES)
        .args(["scan", "--calls-to", "sc?le", "k.o"])
        .current_dir(d));
    assert!(o.status.success(), "{}", text(&o));

    module(d);
    let o = check_module(d, &["m.ko", "--load-address", "0x1001"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("0x1001 is not a multiple of the page size (0x1000)")
            && t.contains("try 0x2000"),
        "{t}"
    );
    let o = check_module(d, &["m.ko", "--load-address", "zz"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = check_module(d, &["m.ko", "--load-address", "0xffffffffa0000000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
