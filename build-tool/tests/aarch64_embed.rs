//! The build tool's aarch64 target end to end on the x86-64 host: real C from
//! `aarch64-linux-gnu-gcc -O2 -fno-pic -mgeneral-regs-only -ffreestanding` (C probes
//! through `ksites_sdt.h`, calls of a Rust ifunc's trampoline, conditional branches to
//! it) and Rust from `cargo build --target aarch64-unknown-none` (`ifunc!`, `probe!`,
//! `probe_enabled!`), linked by `rust-lld -flavor gnu` and `aarch64-linux-gnu-ld`
//! (static and PIE, `--emit-relocs`), then `ksites embed`, `verify`, `inspect`, `scan`,
//! `link` and `check-module`:
//!
//! * the table, read back with kernel-loader's reader, is an aarch64 table whose sites per
//!   ifunc are exactly the `bl`/`b` lines to its trampoline in `aarch64-linux-gnu-objdump
//!   -d`, each holding that branch, and whose probe sites hold their disabled instruction;
//! * conditional branches to the trampoline are `jcc`-class references, not sites;
//! * a trampoline placed 256 MiB away (linker veneers) leaves the veneered calls
//!   reported "not patched: through a veneer", never misread;
//! * output is deterministic, a second embed is refused, and malformed inputs
//!   (truncated, a relocation of the wrong type, a misaligned one) are refused naming
//!   file, section, offset and symbol, with no output written.
//!
//! Needs `rustup target add aarch64-unknown-none` and the Debian packages
//! `gcc-aarch64-linux-gnu` / `binutils-aarch64-linux-gnu`; fails saying so without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kernel_loader::arch::Arch;
use kernel_loader::arch::aarch64::branch_dest;
use kernel_loader::arch::aarch64::probe::{Stubs, site_bytes};
use kernel_loader::format::{SECTION_NAME, SiteKind, Table};
use ksites::elf::Image;

const GCC: &str = "aarch64-linux-gnu-gcc";
const LD: &str = "aarch64-linux-gnu-ld";
const OBJDUMP: &str = "aarch64-linux-gnu-objdump";
const NOP: [u8; 4] = [0x1f, 0x20, 0x03, 0xd5];

/// The Rust half: an ifunc (its trampoline also under the C name `fixture_add_c`), Rust
/// callers, and `probe!`/`probe_enabled!` sites.
const LIB: &str = r#"#![no_std]
use kernel_loader::{CpuFeatures, ifunc, probe, probe_enabled};

unsafe extern "C" fn add_llsc(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}
unsafe extern "C" fn add_lse(a: u64, b: u64) -> u64 {
    a.wrapping_add(b) ^ 1
}
fn pick_add(f: &CpuFeatures) -> unsafe extern "C" fn(u64, u64) -> u64 {
    if f.contains(CpuFeatures::LSE) { add_lse } else { add_llsc }
}

ifunc! {
    /// An ifunc.
    pub fn fixture_add(a: u64, b: u64) -> u64;
    default = add_llsc;
    resolver = pick_add;
}

// The trampoline under a C name, for C callers.
core::arch::global_asm!(".globl fixture_add_c", ".set fixture_add_c, {t}", t = sym fixture_add);

#[unsafe(no_mangle)]
pub extern "C" fn fixture_fire(x: u64) -> u64 {
    probe!(fixture, hit, x, 7);
    if probe_enabled!(fixture, on) { 1 } else { fixture_add(x, 2) }
}

#[unsafe(no_mangle)]
pub extern "C" fn rust_calls(x: u64) -> u64 {
    fixture_add(x, 1).wrapping_add(fixture_add(x, 2))
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
"#;

/// The C half: two calls and a tail call of the ifunc, every C probe form, and (unless
/// `NO_CONDBR`) `cbz`/`b.ne`/`tbz` straight to the trampoline.
const K_C: &str = r#"
#include <stdint.h>
#include "ksites_sdt.h"

KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
KSITES_PROBE_DECL(net, tx, 1, (unsigned long len))

extern uint64_t fixture_add_c(uint64_t a, uint64_t b);
extern uint64_t fixture_fire(uint64_t x);
extern uint64_t rust_calls(uint64_t x);
volatile uint64_t sink;

__attribute__((noinline)) uint64_t c_calls(uint64_t x) {
    uint64_t a = fixture_add_c(x, 1);
    sink = a;
    return fixture_add_c(a, 3) + 1;
}
__attribute__((noinline)) uint64_t c_tail(uint64_t x) { return fixture_add_c(x, 5); }
__attribute__((noinline)) void c_probe(unsigned long n) { KSITES_PROBE(net, rx, n, 80); sink = n; }
__attribute__((noinline)) void c_probe_tail(unsigned long n) { KSITES_PROBE(net, tx, n); }
__attribute__((noinline)) unsigned long c_enabled(unsigned long n) {
    if (KSITES_PROBE_ENABLED(net, rx))
        sink = n * 3;
    return n;
}
__attribute__((noinline)) int c_enabled_tail(void) { return KSITES_PROBE_ENABLED(net, tx); }
void c_condbr(void);
__asm__(".text\n.globl c_condbr\n.type c_condbr, %function\nc_condbr:\n"
        "\tcbz x0, fixture_add_c\n\tb.ne fixture_add_c\n\ttbz x1, #3, fixture_add_c\n\tret\n"
        ".size c_condbr, .-c_condbr\n");
void _start(void) {
    sink = c_calls(1) + c_tail(2) + fixture_fire(3) + c_enabled(4) + c_enabled_tail()
        + rust_calls(5);
    c_probe(5);
    c_probe_tail(6);
    c_condbr();
    for (;;) {}
}
"#;

/// Calls of the ifunc from code 256 MiB below it ([`FAR_LD`]): through veneers.
const FAR_C: &str = r#"
#include <stdint.h>
extern uint64_t fixture_add_c(uint64_t a, uint64_t b);
extern uint64_t rust_calls(uint64_t x);
extern uint64_t fixture_fire(uint64_t x);
volatile uint64_t sink;
__attribute__((noinline)) uint64_t far_calls(uint64_t x) {
    sink = fixture_add_c(x, 1);
    return fixture_add_c(x, 2) + 1;
}
__attribute__((noinline)) uint64_t far_tail(uint64_t x) { return fixture_add_c(x, 3); }
#ifdef WITH_PROBE
#include "ksites_sdt.h"
KSITES_PROBE_DECL(net, tx, 1, (unsigned long len))
__attribute__((noinline)) void far_probe_tail(unsigned long n) { KSITES_PROBE(net, tx, n); }
#else
static void far_probe_tail(unsigned long n) { (void)n; }
#endif
void _start(void) {
    sink = far_calls(1) + far_tail(2) + rust_calls(3) + fixture_fire(4);
    far_probe_tail(5);
    for (;;) {}
}
"#;

const FAR_LD: &str = "SECTIONS {
  . = 0x400000;
  .text.near : { *far.o(.text .text.*) }
  . = 0x400000 + 0x10000000;
  .text : { *(.text .text.*) }
  .rodata : { *(.rodata .rodata.*) }
  .data : { *(.data .data.*) }
  .bss : { *(.bss .bss.*) }
}
";

/// A GNU ifunc (`R_AARCH64_IRELATIVE`, called through the linker's `.iplt` entry).
const G_C: &str = r#"
#include <stdint.h>
static uint64_t pc_a(uint64_t x) { return x + 1; }
static void *pick_pc(void) { return (void *)pc_a; }
uint64_t gpop(uint64_t x) __attribute__((ifunc("pick_pc")));
extern volatile uint64_t sink;
__attribute__((noinline)) uint64_t g_calls(uint64_t x) { sink = gpop(x); return gpop(x + 1) + 1; }
__attribute__((noinline)) uint64_t g_tail(uint64_t x) { return gpop(x); }
"#;

/// A module: calls of an imported ifunc and every C probe form.
const M_C: &str = r#"
#include <stdint.h>
#include "ksites_sdt.h"
#include "ksites_module.h"
KSITES_PROBE_DECL(mod, ev, 1, (unsigned long v))
extern uint64_t fixture_add_c(uint64_t a, uint64_t b);
KSITES_IFUNC_IMPORT(fixture_add_c);
volatile uint64_t msink;
uint64_t mod_calls(uint64_t x) { msink = fixture_add_c(x, 1); return fixture_add_c(x, 2) + 1; }
uint64_t mod_tail(uint64_t x) { return fixture_add_c(x, 3); }
#ifndef NO_PROBES
void mod_probe(unsigned long v) { KSITES_PROBE(mod, ev, v); msink = v; }
void mod_probe_tail(unsigned long v) { KSITES_PROBE(mod, ev, v); }
int mod_enabled(void) { if (KSITES_PROBE_ENABLED(mod, ev)) msink = 1; return 3; }
int mod_enabled_tail(void) { return KSITES_PROBE_ENABLED(mod, ev); }
#endif
"#;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd:?}: {e} (install gcc-aarch64-linux-gnu / \
             binutils-aarch64-linux-gnu and `rustup target add aarch64-unknown-none`)"
        )
    })
}

fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ksites-a64-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Rust half as a static library (position-independent for a PIE), built once.
fn rust_lib(pie: bool) -> PathBuf {
    static LIBS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    LIBS[usize::from(pie)]
        .get_or_init(|| {
            let dir = tmpdir(if pie { "rs-pie" } else { "rs" });
            let manifest = format!(
                "[package]\nname = \"a64embed\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
                 [lib]\npath = \"lib.rs\"\ncrate-type = [\"staticlib\"]\n\n\
                 [dependencies]\nkernel-loader = {{ path = {:?} }}\n\n\
                 [profile.release]\npanic = \"abort\"\n\n[workspace]\n",
                ws().join("kernel-loader").display().to_string()
            );
            std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
            std::fs::write(dir.join("lib.rs"), LIB).unwrap();
            std::fs::copy(ws().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
            let target_dir = ws().join("target").join(if pie {
                "aarch64-embed-pie"
            } else {
                "aarch64-embed"
            });
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--offline", "--release", "--target"])
                .arg("aarch64-unknown-none")
                .arg("--manifest-path")
                .arg(dir.join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS");
            if pie {
                cmd.env("RUSTFLAGS", "-C relocation-model=pie");
            }
            ok(&mut cmd);
            target_dir.join("aarch64-unknown-none/release/liba64embed.a")
        })
        .clone()
}

/// `src` compiled with the kernel flags (and `extra`) into `dir/name`.
fn gcc(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
    let c = dir.join(name).with_extension("c");
    std::fs::write(&c, src).unwrap();
    let o = dir.join(name);
    ok(Command::new(GCC)
        .args([
            "-O2",
            "-fno-pic",
            "-mgeneral-regs-only",
            "-ffreestanding",
            "-c",
        ])
        .arg(format!("-I{}", ws().join("kernel-loader/c").display()))
        .args(extra)
        .arg(&c)
        .arg("-o")
        .arg(&o));
    o
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ld {
    Bfd,
    Lld,
}

fn rust_lld() -> PathBuf {
    let o = ok(Command::new("rustc").args(["--print", "target-libdir"]));
    PathBuf::from(o.trim()).join("../bin/rust-lld")
}

/// Links `objs` with `ld` (a PIE with `pie`), `--emit-relocs`, into `out`.
fn link(ld: Ld, pie: bool, objs: &[&Path], script: Option<&Path>, out: &Path) {
    let mut cmd = match ld {
        Ld::Bfd => Command::new(LD),
        Ld::Lld => {
            let mut c = Command::new(rust_lld());
            c.args(["-flavor", "gnu"]);
            c
        }
    };
    cmd.args(["--emit-relocs", "-e", "_start"]);
    match (pie, ld) {
        (false, _) => cmd.arg("-static"),
        (true, Ld::Bfd) => cmd.args(["-pie", "--no-dynamic-linker"]),
        (true, Ld::Lld) => cmd.args(["-pie", "-z", "notext"]),
    };
    if let Some(s) = script {
        cmd.arg("-T").arg(s);
    }
    ok(cmd.args(objs).arg("-o").arg(out));
}

fn ksites(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_ksites")).args(args.iter().map(|a| a.as_ref())))
}

fn ksites_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = ksites(args);
    assert!(
        o.status.success(),
        "ksites {:?} failed:\n{}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `objdump -d`'s `bl`/`b` lines: (address, mnemonic, destination).
fn objdump_branches(path: &Path) -> Vec<(u64, String, u64)> {
    let dis = ok(Command::new(OBJDUMP)
        .args(["-d", "--no-show-raw-insn"])
        .arg(path));
    dis.lines()
        .filter_map(|l| {
            let mut f = l.trim_start().split('\t');
            let addr = u64::from_str_radix(f.next()?.strip_suffix(':')?, 16).ok()?;
            let m = f.next()?.trim();
            let dest = u64::from_str_radix(f.next()?.split_whitespace().next()?, 16).ok()?;
            matches!(m, "bl" | "b").then(|| (addr, m.to_string(), dest))
        })
        .collect()
}

/// The word at `addr` of a linked image.
fn word_at(img: &Image<'_>, addr: u64) -> [u8; 4] {
    img.read_va(addr, 4).unwrap().try_into().unwrap()
}

/// Checks an embedded image: verify, the table against objdump, the sites' bytes.
/// Returns the table's (ifunc sites, probe sites) and `inspect`'s text.
fn check_embedded(input: &Path, out: &Path) -> (usize, usize, String) {
    let v = ksites_ok(&[&"verify", &out]);
    assert!(v.contains(": ok ("), "{v}");
    let data = std::fs::read(out).unwrap();
    let img = Image::parse("out", &data).unwrap();
    let sec = img.section_by_name(SECTION_NAME).expect(".ksites section");
    let t = Table::parse(
        object::ObjectSection::data(&sec).unwrap(),
        object::ObjectSection::address(&sec),
        &img.exec_ranges(),
    )
    .unwrap();
    assert_eq!(t.arch(), Arch::Aarch64);
    let branches = objdump_branches(input);
    for f in t.ifuncs() {
        let want: Vec<u64> = branches
            .iter()
            .filter(|b| b.2 == f.trampoline)
            .map(|b| b.0)
            .collect();
        let got: Vec<u64> = t
            .sites()
            .filter(|s| s.ifunc == f.index)
            .map(|s| s.addr)
            .collect();
        assert_eq!(
            got,
            want,
            "{}: sites of {} vs objdump",
            input.display(),
            f.name
        );
        for s in t.sites().filter(|s| s.ifunc == f.index) {
            let w = u32::from_le_bytes(word_at(&img, s.addr));
            assert_eq!(branch_dest(w, s.addr), Some(f.trampoline), "{:#x}", s.addr);
            let bl = w & 0xfc00_0000 == kernel_loader::arch::aarch64::BL;
            assert_eq!(bl, s.kind == SiteKind::Call, "{:#x}", s.addr);
        }
    }
    let stub = |n: &str| img.symbol(n).map_or(0, |s| s.addr);
    let stubs = Stubs {
        c_entry: stub("ksites_probe_c_entry"),
        ret0: stub("ksites_probe_ret0"),
        ret1: stub("ksites_probe_ret1"),
    };
    for p in t.probe_sites() {
        let want = site_bytes(&p.arch_ref(), false, &stubs).unwrap();
        assert_eq!(
            word_at(&img, p.addr),
            want,
            "probe site {:#x} {:?}",
            p.addr,
            p.kind
        );
    }
    let inspect = ksites_ok(&[&"inspect", &out]);
    (
        t.site_count() as usize,
        t.probe_site_count() as usize,
        inspect,
    )
}

#[test]
fn images_from_both_linkers_embed_verify_and_match_objdump() {
    let dir = tmpdir("images");
    let k = gcc(&dir, "k.o", K_C, &[]);
    for (ld, pie) in [
        (Ld::Bfd, false),
        (Ld::Lld, false),
        (Ld::Bfd, true),
        (Ld::Lld, true),
    ] {
        let lib = rust_lib(pie);
        let input = dir.join(format!("k-{ld:?}-{pie}.elf"));
        link(ld, pie, &[&k, &lib], None, &input);
        let out = input.with_extension("emb");
        let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
        assert!(
            said.contains("1 ifuncs, 6 sites, 3 other references, 4 probes, 6 probe sites"),
            "{ld:?} pie={pie}: {said}"
        );
        let (sites, probe_sites, inspect) = check_embedded(&input, &out);
        // 3 C sites (2 `bl`, 1 tail `b`) and 3 Rust `bl`s; every probe form once, twice
        // for the C call.
        assert_eq!((sites, probe_sites), (6, 6), "{ld:?} pie={pie}");
        assert_eq!(
            inspect.matches("(jcc-class branch: not patched)").count(),
            3,
            "{inspect}"
        );
        for form in ["cbz", "b.cond", "tbz"] {
            let refs = inspect
                .lines()
                .filter(|l| l.trim_start().starts_with("ref "));
            assert_eq!(refs.filter(|l| l.contains(form)).count(), 1, "{inspect}");
        }
        for kind in [
            "c-call",
            "c-tail",
            "c-is-enabled ",
            "c-is-enabled-tail",
            "rust ",
        ] {
            assert!(inspect.contains(kind), "{kind}: {inspect}");
        }
        // The C call site was a `bl` and is a `nop` now; the input is unchanged.
        let data = std::fs::read(&out).unwrap();
        let img = Image::parse("out", &data).unwrap();
        let site = img.symbol("c_probe").unwrap().addr;
        let nops = (0..8)
            .filter(|i| word_at(&img, site + 4 * i) == NOP)
            .count();
        assert!(nops >= 1, "no nop in c_probe");
        // SystemTap notes name the aarch64 argument registers.
        let notes = ok(Command::new("readelf").arg("-nW").arg(&out));
        assert!(notes.contains("8@x0 8@x1"), "{notes}");
        // Deterministic; and a second embed is refused, writing nothing.
        let again = dir.join("again.emb");
        ksites_ok(&[&"embed", &input, &"-o", &again]);
        assert!(
            std::fs::read(&again).unwrap() == data,
            "embed is not deterministic"
        );
        let twice = dir.join("twice.emb");
        let o = ksites(&[&"embed", &out, &"-o", &twice]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("already"));
        assert!(!twice.exists());
    }
}

#[test]
fn gnu_ifuncs_through_the_iplt_of_both_linkers() {
    let dir = tmpdir("gnu");
    let k = gcc(&dir, "k.o", K_C, &[]);
    let g = gcc(&dir, "g.o", G_C, &[]);
    for ld in [Ld::Bfd, Ld::Lld] {
        let input = dir.join(format!("g-{ld:?}.elf"));
        link(ld, false, &[&k, &g, &rust_lib(false)], None, &input);
        let out = input.with_extension("emb");
        let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
        assert!(said.contains("2 ifuncs, 9 sites"), "{ld:?}: {said}");
        // The objdump cross-check covers the `.iplt` entry as gpop's trampoline.
        let (sites, _, inspect) = check_embedded(&input, &out);
        assert_eq!(sites, 9);
        assert!(inspect.contains("ifunc gpop trampoline="), "{inspect}");
        assert!(inspect.contains("gpop sites=3"), "{inspect}");
        // The slot is the IRELATIVE one.
        let rel = ok(Command::new("readelf").arg("-rW").arg(&input));
        let irel = rel
            .lines()
            .find(|l| l.contains("R_AARCH64_IRELATIVE"))
            .expect("an IRELATIVE relocation");
        let slot = irel
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches('0');
        assert!(
            inspect.contains(&format!("slot=0x{slot} ")),
            "{slot}: {inspect}"
        );
    }
}

#[test]
fn ksites_link_wraps_both_aarch64_linkers() {
    let dir = tmpdir("link");
    let k = gcc(&dir, "k.o", K_C, &[]);
    let lib = rust_lib(false);
    let mut outs = Vec::new();
    for linker in ["bfd", "lld"] {
        let out = dir.join(format!("k-{linker}.elf"));
        let said = ksites_ok(&[
            &"link",
            &"--linker",
            &linker,
            &"--",
            &"-static",
            &"-e",
            &"_start",
            &k,
            &lib,
            &"-o",
            &out,
        ]);
        assert!(said.contains("6 sites"), "{said}");
        assert!(ksites_ok(&[&"verify", &out]).contains("ok (6 ifunc sites, 6 probe sites)"));
        outs.push(out);
    }
    // GNU ld through `ksites link` is the same as linking with it, then embedding.
    let plain = dir.join("plain.elf");
    link(Ld::Bfd, false, &[&k, &lib], None, &plain);
    let emb = dir.join("plain.emb");
    ksites_ok(&[&"embed", &plain, &"-o", &emb]);
    assert!(std::fs::read(&emb).unwrap() == std::fs::read(&outs[0]).unwrap());
}

#[test]
fn a_far_trampoline_is_reached_through_veneers_which_are_reported() {
    let dir = tmpdir("far");
    let far = gcc(&dir, "far.o", FAR_C, &[]);
    let script = dir.join("far.ld");
    std::fs::write(&script, FAR_LD).unwrap();
    let lib = rust_lib(false);
    for ld in [Ld::Bfd, Ld::Lld] {
        let input = dir.join(format!("far-{ld:?}.elf"));
        link(ld, false, &[&far, &lib], Some(&script), &input);
        let dis = ok(Command::new(OBJDUMP).arg("-d").arg(&input));
        assert!(
            dis.contains("veneer>:") || dis.contains("Thunk_"),
            "{ld:?}: the linker made no veneer"
        );
        let out = input.with_extension("emb");
        let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
        assert!(
            said.contains("3 ifunc sites not patched: through a veneer"),
            "{ld:?}: {said}"
        );
        // The table holds the 3 Rust calls only (objdump's `bl`s to the trampoline),
        // never a veneered site read as something else.
        let (sites, _, inspect) = check_embedded(&input, &out);
        assert_eq!(sites, 3, "{ld:?}");
        let veneered: Vec<&str> = inspect
            .lines()
            .filter(|l| l.contains("not patched: through a veneer"))
            .collect();
        assert_eq!(veneered.len(), 3, "{inspect}");
        assert!(veneered.iter().all(|l| l.contains("far_")), "{inspect}");
    }
    // A C tail probe there: its disabled form (`b ksites_probe_ret0`) cannot reach the
    // stub 256 MiB away, which is an error naming the site, with no output.
    let farp = gcc(&dir, "far.o", FAR_C, &["-DWITH_PROBE"]);
    let input = dir.join("farp.elf");
    link(Ld::Bfd, false, &[&farp, &lib], Some(&script), &input);
    let out = dir.join("farp.emb");
    let o = ksites(&[&"embed", &input, &"-o", &out]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    for want in [
        "farp.elf: probe site 0x",
        "cannot reach",
        "section .text.near+0x",
        "in far_probe_tail",
        "probe net:tx",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn scan_lists_bl_b_and_conditional_branches() {
    let dir = tmpdir("scan");
    let k = gcc(&dir, "k.o", K_C, &[]);
    let input = dir.join("k.elf");
    link(Ld::Lld, false, &[&k, &rust_lib(false)], None, &input);
    for file in [&k, &input] {
        let calls = ksites_ok(&[&"scan", &"--calls-to", &"fixture_add_c", file]);
        let jumps = ksites_ok(&[&"scan", &"--jumps-to", &"fixture_add_c", file]);
        assert_eq!(calls.matches(" call (4 bytes)").count(), 2, "{calls}");
        assert_eq!(jumps.matches(" jmp (4 bytes)").count(), 1, "{jumps}");
        assert_eq!(jumps.matches(" jcc (4 bytes)").count(), 3, "{jumps}");
        assert!(!calls.contains(" jcc") && !jumps.contains(" call"));
    }
}

#[test]
fn modules_embed_and_check() {
    let dir = tmpdir("module");
    let m = gcc(&dir, "m.o", M_C, &[]);
    let out = dir.join("m.emb.o");
    let said = ksites_ok(&[&"embed", &m, &"-o", &out]);
    assert!(
        said.contains("1 ifuncs, 3 sites, 0 other references, 1 probes, 4 probe sites"),
        "{said}"
    );
    let again = dir.join("m.again.o");
    ksites_ok(&[&"embed", &m, &"-o", &again]);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&out).unwrap());
    // The disabled forms with their relocations: `nop` (none), `b`/`bl
    // ksites_probe_ret0`; the table relocated by PREL32s.
    let dis = ok(Command::new(OBJDUMP).arg("-dr").arg(&out));
    let body = |f: &str| -> String {
        dis.split(&format!("<{f}>:\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {f}:\n{dis}"))
            .split("\n\n")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(body("mod_probe").contains("\tnop"), "{}", body("mod_probe"));
    assert!(body("mod_probe").contains("R_AARCH64_NONE"));
    for (f, insn, reloc) in [
        (
            "mod_probe_tail",
            "\tb\t",
            "R_AARCH64_JUMP26\tksites_probe_ret0",
        ),
        (
            "mod_enabled",
            "\tbl\t",
            "R_AARCH64_CALL26\tksites_probe_ret0",
        ),
        (
            "mod_enabled_tail",
            "\tb\t",
            "R_AARCH64_JUMP26\tksites_probe_ret0",
        ),
    ] {
        let b = body(f);
        assert!(b.contains(insn) && b.contains(reloc), "{f}:\n{b}");
        assert!(!b.contains("26\t__dtrace"), "{f}:\n{b}");
    }
    let rel = ok(Command::new("readelf").arg("-rW").arg(&out));
    let ksites_rel = rel.split("'.rela.ksites'").nth(1).expect(".rela.ksites");
    assert!(ksites_rel.contains("R_AARCH64_PREL32"), "{ksites_rel}");
    // A rustc object as a module: `ifunc!` defined in it (its trampoline's `adrp`
    // relocated against the slot), Rust callers and `probe!` sites.
    let ar = dir.join("ar");
    std::fs::create_dir_all(&ar).unwrap();
    ok(Command::new("aarch64-linux-gnu-ar")
        .arg("x")
        .arg(rust_lib(false))
        .current_dir(&ar));
    let robj = std::fs::read_dir(&ar)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("a64embed"))
        .expect("the crate's object in the archive");
    let rout = dir.join("r.emb.o");
    let said = ksites_ok(&[&"embed", &robj, &"-o", &rout]);
    assert!(
        said.contains("1 ifuncs, 3 sites, 0 other references, 2 probes, 2 probe sites"),
        "{said}"
    );
    // The module with its probes loads too: the loader checks each probe site's
    // disabled form by the table's architecture (aarch64 here), not the host's.
    let check = ksites_ok(&[&"check-module", &out]);
    assert!(check.contains("would load"), "{check}");
    assert!(check.contains("1 probes, 4 probe sites"), "{check}");
    // And the Rust one (its `probe!` sites are `nop`s).
    let check = ksites_ok(&[&"check-module", &rout]);
    assert!(check.contains("would load"), "{check}");
    assert!(check.contains("2 probes, 2 probe sites"), "{check}");
    // An ifunc-only module with its table loads (checked by the module loader).
    let m2 = gcc(&dir, "m2.o", M_C, &["-DNO_PROBES"]);
    let out2 = dir.join("m2.emb.o");
    ksites_ok(&[&"embed", &m2, &"-o", &out2]);
    let check = ksites_ok(&[&"check-module", &out2]);
    assert!(check.contains("would load"), "{check}");
    assert!(
        check.contains("1 imported ifuncs, 3 ifunc sites"),
        "{check}"
    );
}

/// The file offset of the RELA entry of `.rela.text` at section offset `at` in `obj`.
fn rela_entry(obj: &[u8], at: u64) -> usize {
    use object::read::elf::{ElfFile64, FileHeader as _, SectionHeader as _};
    let f: ElfFile64<'_, object::LittleEndian> = ElfFile64::parse(obj).unwrap();
    let e = object::LittleEndian;
    let hdr = f.elf_header();
    let secs = hdr.sections(e, obj).unwrap();
    for s in secs.iter() {
        if secs.section_name(e, s).unwrap() == b".rela.text" {
            let off = s.sh_offset(e) as usize;
            for i in 0..s.sh_size(e) as usize / 24 {
                let ent = off + 24 * i;
                if u64::from_le_bytes(obj[ent..ent + 8].try_into().unwrap()) == at {
                    return ent;
                }
            }
        }
    }
    panic!("no relocation at .text+{at:#x}");
}

#[test]
fn malformed_inputs_are_refused_naming_the_place_with_no_output() {
    let dir = tmpdir("malformed");
    let k = gcc(&dir, "k.o", K_C, &[]);
    let data = std::fs::read(&k).unwrap();
    // The first `bl fixture_add_c` in the object.
    let dis = ok(Command::new(OBJDUMP).arg("-dr").arg(&k));
    let call = dis
        .lines()
        .find(|l| l.contains("R_AARCH64_CALL26\tfixture_add_c"))
        .and_then(|l| u64::from_str_radix(l.trim().split(':').next()?, 16).ok())
        .expect("a CALL26 against fixture_add_c");
    let ent = rela_entry(&data, call);
    let refuse = |name: &str, bytes: &[u8], want: &[&str]| {
        let input = dir.join(name);
        std::fs::write(&input, bytes).unwrap();
        let out = dir.join(format!("{name}.out"));
        for args in [
            vec![&"embed" as &dyn AsRef<std::ffi::OsStr>, &input, &"-o", &out],
            vec![&"scan", &"--calls-to", &"*", &input],
        ] {
            let o = ksites(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{name} accepted");
            for w in want {
                assert!(err.contains(w), "{name}: {w:?} not in {err}");
            }
        }
        assert!(!out.exists(), "{name}: output written");
    };
    // A CALL26 moved 2 bytes: not on an instruction.
    let mut b = data.clone();
    b[ent..ent + 8].copy_from_slice(&(call + 2).to_le_bytes());
    refuse(
        "misaligned.o",
        &b,
        &[
            "misaligned.o",
            "section .text+",
            "R_AARCH64_CALL26 against `fixture_add_c`",
            "not on a 4-byte instruction boundary",
        ],
    );
    // The `bl`'s relocation made a JUMP26: the wrong type for a `bl`.
    let mut b = data.clone();
    let jump26 = object::elf::R_AARCH64_JUMP26.0;
    b[ent + 8..ent + 12].copy_from_slice(&jump26.to_le_bytes());
    refuse(
        "wrongtype.o",
        &b,
        &[
            "wrongtype.o",
            &format!("section .text+{call:#x} (c_calls+"),
            "R_AARCH64_JUMP26 against `fixture_add_c`",
            "is on `bl",
            "not on a `b`",
        ],
    );
    // An embedded image whose site no longer holds its branch: `verify` finds it
    // (exit 4), naming the site.
    let input = dir.join("k.elf");
    link(Ld::Lld, false, &[&k, &rust_lib(false)], None, &input);
    let out = dir.join("k.emb");
    ksites_ok(&[&"embed", &input, &"-o", &out]);
    let mut img = std::fs::read(&out).unwrap();
    let site = {
        let i = Image::parse("out", &img).unwrap();
        let sec = i.section_by_name(SECTION_NAME).unwrap();
        let t = Table::parse(
            object::ObjectSection::data(&sec).unwrap(),
            object::ObjectSection::address(&sec),
            &i.exec_ranges(),
        )
        .unwrap();
        let s = t.site(0).unwrap().addr;
        let text = i.section_by_name(".text").unwrap();
        let (off, _) = object::ObjectSection::file_range(&text).unwrap();
        (off + s - object::ObjectSection::address(&text)) as usize
    };
    img[site..site + 4].copy_from_slice(&NOP);
    let bad = dir.join("bad.emb");
    std::fs::write(&bad, &img).unwrap();
    let o = ksites(&[&"verify", &bad]);
    assert_eq!(o.status.code(), Some(4));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("ifunc site 0 at .text+"), "{said}");
    assert!(said.contains("found [1f, 20, 03, d5] = `nop`"), "{said}");
    // Truncated anywhere in its headers or sections.
    for cut in [10, 64, data.len() / 2] {
        let input = dir.join(format!("cut{cut}.o"));
        std::fs::write(&input, &data[..cut]).unwrap();
        let out = dir.join(format!("cut{cut}.out"));
        let o = ksites(&[&"embed", &input, &"-o", &out]);
        assert!(!o.status.success(), "truncated at {cut} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("cut{cut}.o")), "{err}");
        assert!(!out.exists());
    }
}

/// Regenerates the aarch64 fuzz seeds in `fuzz/seeds/module_loader` (which the
/// `module_loader` and `elf_tools` targets start from): the module of
/// [`modules_embed_and_check`] as gcc wrote it (`embed`'s aarch64 path on `ET_REL`), and
/// embedded, with and without probes (the loader's aarch64 relocations and table).
#[test]
#[ignore]
fn regenerate_fuzz_seeds() {
    let dir = tmpdir("seeds");
    let seeds = ws().join("fuzz/seeds/module_loader");
    let m = gcc(&dir, "m.o", M_C, &[]);
    let m2 = gcc(&dir, "m2.o", M_C, &["-DNO_PROBES"]);
    std::fs::copy(&m, seeds.join("a64cmod.o")).unwrap();
    ksites_ok(&[&"embed", &m, &"-o", &seeds.join("a64cmod.ko")]);
    ksites_ok(&[&"embed", &m2, &"-o", &seeds.join("a64cmod-ifunc.ko")]);
}

#[test]
fn a_probe_whose_enabled_form_cannot_reach_the_kernel_is_refused_at_load() {
    // A C call probe is a `nop` while disabled and `bl ksites_probe_c_entry` while
    // enabled: a module loaded beyond that `bl`'s ±128 MiB would load and then fail at
    // `probe::enable`. The loader checks both forms at load instead.
    let dir = tmpdir("probe_reach");
    let src = "#include \"ksites_sdt.h\"\nKSITES_PROBE_DECL(mod, ev, 1, (unsigned long n))\n\
               long kfunc(long);\n\
               long work(long x) { KSITES_PROBE(mod, ev, x); return kfunc(x) + 1; }\n";
    let m = gcc(&dir, "p.o", src, &[]);
    let ko = dir.join("p.ko");
    ksites_ok(&[&"embed", &m, &"-o", &ko]);
    let map = |base: u64| {
        let path = dir.join(format!("{base:x}.map"));
        let names = [
            "kfunc",
            "ksites_probe_c_entry",
            "ksites_probe_ret0",
            "ksites_probe_ret1",
        ];
        let text: String = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{:016x} T {n}\n", base + 0x100 * i as u64))
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    };
    let near = map(0x4040_0000);
    let said = ksites_ok(&[
        &"check-module",
        &"--kernel-symbols",
        &near,
        &"--load-address",
        &"40000000",
        &ko,
    ]);
    assert!(said.contains("would load"), "{said}");
    let far = map(0x8000_0000);
    let o = ksites(&[
        &"check-module",
        &"--kernel-symbols",
        &far,
        &"--load-address",
        &"40000000",
        &ko,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(
        out.contains("would NOT load") && out.contains("cannot reach 0x80000100"),
        "{out}"
    );
}
