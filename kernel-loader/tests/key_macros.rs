//! `static_key!`, `static_branch_unlikely!` and `static_branch_likely!` expanded and
//! assembled for aarch64 and riscv64 (x86-64 runs them for real in the crate's host
//! test), and `ksites_key.h` compiled for all three: a tiny `#![no_std]` crate built
//! with `cargo build --target ...` (offline, this workspace's lock file, the same
//! target directories as the `*_macros.rs` tests), its object disassembled: each site
//! is the architecture's probe site NOP and each has a 32-byte `KSKS` record in
//! `.ksites_key_sites` whose relocations name the site, its label and the key. Needs
//! the Rust targets and GNU binutils/gcc for aarch64 and riscv64; fails saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

const LIB: &str = r#"#![no_std]
use kernel_loader::{static_branch_likely, static_branch_unlikely, static_key};

static_key!(pub FIXTURE_OFF: default false);
static_key!(pub FIXTURE_ON: default true);

#[unsafe(no_mangle)]
pub extern "C" fn fixture_keys(x: u64) -> u64 {
    let mut y = x;
    if static_branch_unlikely!(FIXTURE_OFF) {
        y = y.wrapping_mul(3);
    }
    if static_branch_likely!(FIXTURE_ON) {
        y ^= 0x55;
    }
    y
}
"#;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}: {what}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({what}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One architecture: its Rust target, the fixture target directory the other macro
/// tests use, the binutils prefix, the NOP as objdump prints it, the 64-bit absolute
/// relocation, and gcc's extra flags.
struct Arch {
    target: &'static str,
    fixture_dir: &'static str,
    prefix: &'static str,
    nop: &'static str,
    abs64: &'static str,
    cflags: &'static [&'static str],
}

const AARCH64: Arch = Arch {
    target: "aarch64-unknown-none",
    fixture_dir: "aarch64-macros-fixture",
    prefix: "aarch64-linux-gnu-",
    nop: "d503201f \tnop",
    abs64: "R_AARCH64_ABS64",
    cflags: &["-mgeneral-regs-only"],
};

const RISCV64: Arch = Arch {
    target: "riscv64gc-unknown-none-elf",
    fixture_dir: "riscv64-macros-fixture",
    prefix: "riscv64-linux-gnu-",
    nop: "00000013          \tnop",
    abs64: "R_RISCV_64",
    cflags: &["-mcmodel=medany", "-mno-relax"],
};

/// The `.ksites_key_sites` relocations of `obj` (objdump -r), as (offset, target) in
/// record order, and the section's size.
fn records(a: &Arch, obj: &Path) -> (Vec<(u64, String)>, u64) {
    let objdump = format!("{}objdump", a.prefix);
    let relocs = run(
        Command::new(&objdump)
            .args(["-r", "-j", ".ksites_key_sites"])
            .arg(obj),
        "needs GNU binutils",
    );
    let mut out: Vec<(u64, String)> = relocs
        .lines()
        .filter(|l| l.contains(a.abs64))
        .map(|l| {
            let mut f = l.split_whitespace();
            let off = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
            (off, f.nth(1).unwrap().to_string())
        })
        .collect();
    out.sort_by_key(|r| r.0);
    let heads = run(
        Command::new(&objdump).arg("-h").arg(obj),
        "needs GNU binutils",
    );
    let line = heads
        .lines()
        .find(|l| l.contains(".ksites_key_sites") && !l.contains(".rela"))
        .unwrap_or_else(|| panic!("no .ksites_key_sites in:\n{heads}"));
    let size = u64::from_str_radix(line.split_whitespace().nth(2).unwrap(), 16).unwrap();
    (out, size)
}

/// Every record's three relocations: the site and the label, then the key (a symbol
/// named as one of `keys`, or data: LLVM may merge the key statics into one
/// `.data..L_MergedGlobals` and relocate against it); and the section's magic.
fn check_records(a: &Arch, obj: &Path, keys: &[&str]) {
    let (relocs, size) = records(a, obj);
    assert!(size >= 64 && size % 32 == 0, "section size {size}");
    let n = size / 32;
    assert_eq!(relocs.len() as u64, 3 * n, "{relocs:?}");
    for r in 0..n {
        let at = |k: u64| {
            relocs
                .iter()
                .find(|x| x.0 == 32 * r + k)
                .map(|x| x.1.clone())
        };
        let key = at(24).unwrap_or_else(|| panic!("record {r}: no key relocation: {relocs:?}"));
        let data = [".data", ".bss", ".L_MergedGlobals"]
            .iter()
            .any(|p| key.starts_with(p));
        assert!(
            data || keys.iter().any(|k| key.contains(k)),
            "record {r} key {key}"
        );
        assert!(
            at(8).is_some() && at(16).is_some(),
            "record {r}: {relocs:?}"
        );
    }
    let dump = run(
        Command::new(format!("{}objdump", a.prefix))
            .args(["-s", "-j", ".ksites_key_sites"])
            .arg(obj),
        "needs GNU binutils",
    );
    assert!(dump.contains("4b534b53"), "no KSKS magic:\n{dump}");
}

fn rust_fixture(a: &Arch) {
    let loader = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ws = loader.parent().unwrap();
    let dir = std::env::temp_dir().join(format!(
        "ksites-key-macros-{}-{}",
        a.target,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = format!(
        "[package]\nname = \"keyfixture\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
         [lib]\npath = \"lib.rs\"\n\n[dependencies]\nkernel-loader = {{ path = {:?} }}\n\n\
         [workspace]\n",
        loader.display().to_string()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("lib.rs"), LIB).unwrap();
    std::fs::copy(ws.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target_dir = ws.join("target").join(a.fixture_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo)
            .args(["build", "--offline", "--release", "--target", a.target])
            .arg("--manifest-path")
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir)
            .env_remove("RUSTFLAGS"),
        "needs the Rust target (rustup target add)",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let rlib = target_dir.join(format!("{}/release/libkeyfixture.rlib", a.target));
    let dis = run(
        Command::new(format!("{}objdump", a.prefix))
            .arg("-d")
            .arg(&rlib),
        "needs GNU binutils",
    );
    // The crate's only code is `fixture_keys` (objdump may split it at local labels).
    assert!(dis.contains("<fixture_keys>:"), "{dis}");
    let nops = dis.lines().filter(|l| l.contains(a.nop)).count();
    assert!(nops >= 2, "two key sites (nops) in fixture_keys:\n{dis}");
    // The rlib is an archive: check the object inside it.
    let objs = dir.with_extension("objs");
    std::fs::create_dir_all(&objs).unwrap();
    run(
        Command::new(format!("{}ar", a.prefix))
            .arg("x")
            .arg(&rlib)
            .current_dir(&objs),
        "needs GNU binutils",
    );
    let obj = std::fs::read_dir(&objs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "o")
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains("keyfixture")
        })
        .expect("the fixture's object in its rlib");
    check_records(a, &obj, &["FIXTURE_OFF", "FIXTURE_ON"]);
    let _ = std::fs::remove_dir_all(&objs);
}

const C_SRC: &str = "#include \"ksites.h\"\n\
    KSITES_STATIC_KEY_FALSE(trace_irqs);\n\
    KSITES_STATIC_KEY_TRUE(fast_path);\n\
    _Static_assert(sizeof(struct ksites_static_key) == 32, \"key\");\n\
    int f(int x) {\n\
        if (KSITES_STATIC_BRANCH_UNLIKELY(trace_irqs)) x += 100;\n\
        if (KSITES_STATIC_BRANCH_LIKELY(fast_path)) x *= 2;\n\
        if (KSITES_STATIC_BRANCH(trace_irqs)) x -= 1;\n\
        return x;\n\
    }\n";

fn c_header(gcc: &str, cflags: &[&str], check: impl Fn(&Path)) {
    let inc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("c");
    let dir = std::env::temp_dir().join(format!("ksites-key-c-{gcc}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("t.c");
    std::fs::write(&src, C_SRC).unwrap();
    for opt in ["-O0", "-O2"] {
        let obj = dir.join(format!("t{opt}.o"));
        run(
            Command::new(gcc)
                .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fno-pic", opt])
                .args(cflags)
                .arg("-c")
                .arg("-I")
                .arg(&inc)
                .arg(&src)
                .arg("-o")
                .arg(&obj),
            "needs gcc for the architecture",
        );
        check(&obj);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn key_macros_expand_and_assemble_for_aarch64() {
    rust_fixture(&AARCH64);
}

#[test]
fn key_macros_expand_and_assemble_for_riscv64() {
    rust_fixture(&RISCV64);
}

#[test]
fn ksites_key_h_compiles_for_every_architecture() {
    for a in [&AARCH64, &RISCV64] {
        c_header(&format!("{}gcc", a.prefix), a.cflags, |obj| {
            check_records(a, obj, &["trace_irqs", "fast_path"]);
        });
    }
    c_header("gcc", &["-mgeneral-regs-only"], |obj| {
        let r = run(
            Command::new("objdump")
                .args(["-r", "-s", "-j", ".ksites_key_sites"])
                .arg(obj),
            "needs binutils",
        );
        assert!(r.contains("R_X86_64_64") && r.contains("trace_irqs"), "{r}");
        assert!(r.contains("fast_path") && r.contains("4b534b53"), "{r}");
        let d = run(Command::new("objdump").arg("-d").arg(obj), "needs binutils");
        assert!(d.contains("0f 1f 44 00 00"), "the site NOP:\n{d}");
    });
}
