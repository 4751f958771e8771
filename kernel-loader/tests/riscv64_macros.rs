//! `ifunc!`, `probe!` and `probe_enabled!` expanded and assembled for riscv64: a tiny
//! `#![no_std]` crate using them is built with `cargo build --target
//! riscv64gc-unknown-none-elf` (offline, with this workspace's lock file), and its
//! object is disassembled with `riscv64-linux-gnu-objdump`: the trampoline is `auipc t1`
//! / `ld t1` / `jr t1` relocated against the slot with no relaxation, the probe sites
//! are 4-byte, 4-aligned `nop`s, and the record sections are there. Needs the Rust
//! target (`rustup target add riscv64gc-unknown-none-elf`) and GNU binutils for riscv64;
//! fails saying so without them.

use std::path::{Path, PathBuf};
use std::process::Command;

const LIB: &str = r#"#![no_std]
use kernel_loader::{CpuFeatures, ifunc, probe, probe_enabled};

unsafe extern "C" fn add_llsc(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}
unsafe extern "C" fn add_lse(a: u64, b: u64) -> u64 {
    a.wrapping_add(b) ^ 1
}
fn pick_add(f: &CpuFeatures) -> unsafe extern "C" fn(u64, u64) -> u64 {
    if f.contains(CpuFeatures::ZBB) { add_lse } else { add_llsc }
}

ifunc! {
    /// An ifunc.
    pub fn fixture_add(a: u64, b: u64) -> u64;
    default = add_llsc;
    resolver = pick_add;
}

#[unsafe(no_mangle)]
pub extern "C" fn fixture_fire(x: u64) -> u64 {
    probe!(fixture, hit, x, 7);
    if probe_enabled!(fixture, on) { 1 } else { fixture_add(x, 2) }
}
"#;

fn manifest(loader: &Path) -> String {
    format!(
        "[package]\nname = \"rv64fixture\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
         [lib]\npath = \"lib.rs\"\n\n[dependencies]\nkernel-loader = {{ path = {:?} }}\n\n\
         [workspace]\n",
        loader.display().to_string()
    )
}

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

#[test]
fn ifunc_and_probe_expand_and_assemble_for_riscv64() {
    let loader = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ws = loader.parent().unwrap();
    let dir = std::env::temp_dir().join(format!("ksites-rv64-macros-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Cargo.toml"), manifest(&loader)).unwrap();
    std::fs::write(dir.join("lib.rs"), LIB).unwrap();
    std::fs::copy(ws.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target_dir = ws.join("target").join("riscv64-macros-fixture");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo)
            .args([
                "build",
                "--offline",
                "--release",
                "--target",
                "riscv64gc-unknown-none-elf",
            ])
            .arg("--manifest-path")
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir)
            .env_remove("RUSTFLAGS"),
        "needs `rustup target add riscv64gc-unknown-none-elf`",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let rlib = target_dir.join("riscv64gc-unknown-none-elf/release/librv64fixture.rlib");
    let objdump = |args: &[&str]| {
        run(
            Command::new("riscv64-linux-gnu-objdump")
                .args(args)
                .arg(&rlib),
            "needs GNU binutils for riscv64 (apt-get install binutils-riscv64-linux-gnu)",
        )
    };
    let dis = objdump(&["-dr"]);
    // The trampoline: the ifunc's own (mangled) symbol, and the lines after it.
    let body = |name: &str| -> String {
        let mut lines = dis.lines().skip_while(|l| {
            !(l.ends_with(">:") && l.contains(name) && !l.contains("__ksites_resolve"))
        });
        lines
            .next()
            .unwrap_or_else(|| panic!("no {name} in:\n{dis}"));
        // (Up to the next section: riscv64 objdump breaks a function at its local
        // labels with a blank line.)
        lines
            .take_while(|l| !l.starts_with("Disassembly of section"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let t = body("fixture_add");
    let want_words = ["auipc\tt1", "ld\tt1,", "jr\tt1"];
    for want in want_words
        .iter()
        .chain(&["R_RISCV_PCREL_HI20\t", "R_RISCV_PCREL_LO12_I\t"])
    {
        assert!(t.contains(want), "trampoline lacks {want:?}:\n{t}");
    }
    assert!(!t.contains("R_RISCV_RELAX"), "trampoline relaxable:\n{t}");
    // Exactly three 4-byte instructions, in the order the loader decodes.
    let insns: Vec<&str> = t
        .lines()
        .filter(|l| {
            !l.trim_start().starts_with(|c: char| !c.is_ascii_hexdigit()) && l.contains(":\t")
        })
        .collect();
    assert!(insns.len() >= 3, "{t}");
    for (line, want) in insns.iter().zip(want_words) {
        assert!(line.contains(want), "{line} is not {want}");
    }
    // The probe sites: 4-byte `nop`s (00000013, not the 2-byte c.nop) at 4-aligned
    // addresses in the function (two: probe! and probe_enabled!).
    let fire = body("fixture_fire");
    let nops: Vec<u64> = fire
        .lines()
        .filter(|l| l.contains("\t00000013 "))
        .map(|l| u64::from_str_radix(l.trim().split(':').next().unwrap(), 16).unwrap())
        .collect();
    assert!(nops.len() >= 2, "probe sites:\n{fire}");
    for a in &nops {
        assert_eq!(a % 4, 0, "probe site at {a:#x}:\n{fire}");
    }
    // The records.
    let heads = objdump(&["-h"]);
    for sec in [".ksites_ifuncs", ".ksites_probe_sites", ".data.ksites_slot"] {
        assert!(heads.contains(sec), "no {sec}:\n{heads}");
    }
}

/// The C headers on riscv64 (`ksites_arch.h`'s riscv64 branch): a probe declaration,
/// its call sites and an ifunc import compile with `riscv64-linux-gnu-gcc` into
/// `auipc`+`jalr` call sites and the record sections `ksites embed` reads.
#[test]
fn c_headers_compile_for_riscv64() {
    let inc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("c");
    let dir = std::env::temp_dir().join(format!("ksites-rv64-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("t.c");
    std::fs::write(
        &src,
        "#include \"ksites.h\"\n\
         KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))\n\
         extern int popcnt(unsigned long);\n\
         KSITES_IFUNC_IMPORT(popcnt);\n\
         _Static_assert(sizeof(struct ksites_ebreak_frame) == 64, \"frame\");\n\
         _Static_assert(sizeof(struct ksites_int3_frame) == 64, \"frame\");\n\
         _Static_assert(KSITES_PROBE_EBREAK == 0x00100073u, \"ebreak\");\n\
         int f(unsigned long x) {\n\
             if (KSITES_PROBE_ENABLED(net, rx)) KSITES_PROBE(net, rx, x, 2);\n\
             return popcnt(x);\n\
         }\n",
    )
    .unwrap();
    let obj = dir.join("t.o");
    run(
        Command::new("riscv64-linux-gnu-gcc")
            .args([
                "-O2",
                "-fno-pic",
                "-mcmodel=medany",
                "-mno-relax",
                "-c",
                "-I",
            ])
            .arg(&inc)
            .arg(&src)
            .arg("-o")
            .arg(&obj),
        "needs gcc for riscv64 (apt-get install gcc-riscv64-linux-gnu)",
    );
    let dump = run(
        Command::new("riscv64-linux-gnu-objdump")
            .args(["-dr", "-h"])
            .arg(&obj),
        "needs GNU binutils for riscv64",
    );
    let _ = std::fs::remove_dir_all(&dir);
    for want in [
        ".ksites_probe_decls",
        ".ksites_ifunc_imports",
        "R_RISCV_CALL_PLT\t__dtraceenabled_net___rx",
        "R_RISCV_CALL_PLT\t__dtrace_probe_net___rx",
    ] {
        assert!(dump.contains(want), "no {want:?} in:\n{dump}");
    }
    // -mno-relax (as ksites_arch.h asks): nothing will move the probe sites.
    assert!(!dump.contains("R_RISCV_RELAX"), "{dump}");
}
