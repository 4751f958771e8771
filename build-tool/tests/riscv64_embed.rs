//! The build tool's riscv64 target end to end on the x86-64 host: C from
//! `riscv64-linux-gnu-gcc -O2 -mcmodel=medany -fno-pic -ffreestanding` (calls and tail
//! calls of an ifunc's trampoline, C probes through `ksites_sdt.h`, conditional
//! branches to the trampoline) and an assembly trampoline with its `.ksites_ifuncs`
//! record, compiled with `-mrelax` and `-mno-relax` and linked by `riscv64-linux-gnu-ld`
//! and `rust-lld -flavor gnu` with relaxation on and off (`--emit-relocs`), then `ksites
//! embed`, `verify`, `inspect`, `scan` and `link`:
//!
//! * the table, read back with kernel-loader's reader, is a riscv64 table whose sites
//!   are exactly the calls and tail calls of the trampoline `riscv64-linux-gnu-objdump
//!   -dr` shows (`auipc`+`jalr ra`/`jr` pairs, relaxed `jal`/`j`), each holding that
//!   branch in the form the table names (the pair, `jal` or `c.j`), and `inspect`'s
//!   count is objdump's, for relaxation on and off;
//! * C probe calls became their disabled form (kernel-loader's
//!   `arch::riscv64::probe::is_c_site_disabled`, padding included); SystemTap notes name
//!   `a0`, `a1`;
//! * conditional branches to the trampoline are `jcc`-class references, not sites;
//! * hostile inputs (a CALL relocation on bytes that are no pair, a conditional branch
//!   or a misaligned relaxed call to a probe function) are refused naming the place,
//!   with no output, and the input is never modified.
//!
//! Needs the Debian packages `gcc-riscv64-linux-gnu` / `binutils-riscv64-linux-gnu`
//! and the toolchain's `rust-lld`; fails saying so without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kernel_loader::arch::Arch;
use kernel_loader::arch::riscv64::decode_site;
use kernel_loader::arch::riscv64::probe::{Stubs, is_c_site_disabled, site_bytes};
use kernel_loader::format::{SECTION_NAME, SiteKind, Table};
use ksites::elf::Image;

const GCC: &str = "riscv64-linux-gnu-gcc";
const LD: &str = "riscv64-linux-gnu-ld";
const OBJDUMP: &str = "riscv64-linux-gnu-objdump";

/// The ifunc `fixture_add` (trampoline, slot, record), its implementation, the probe
/// stubs and the table cell, in assembly.
const IFUNC_S: &str = r#"
    .section .text.tramp,"ax",@progbits
    .option push
    .option norvc
    .option norelax
    .balign 4
    .globl fixture_add
    .type fixture_add,@function
fixture_add:
1:  auipc t1, %pcrel_hi(fixture_add_slot)
    ld t1, %pcrel_lo(1b)(t1)
    jr t1
    .size fixture_add, .-fixture_add
    .option pop
    # `beq a0, a1, fixture_add` and `c.bnez a0, fixture_add`, as words (the assembler
    # would turn a branch to a global symbol into a branch around a `j`); near the
    # trampoline, in reach of `c.bnez`.
    .globl c_condbr
    .type c_condbr,@function
c_condbr:
    .reloc ., R_RISCV_BRANCH, fixture_add
    .4byte 0x00b50063
    .reloc ., R_RISCV_RVC_BRANCH, fixture_add
    .2byte 0xe101
    ret
    .size c_condbr, .-c_condbr
    .text
    .globl add_impl
    .type add_impl,@function
add_impl:
    add a0, a0, a1
    ret
    .size add_impl, .-add_impl
    .globl ksites_probe_c_entry
    .type ksites_probe_c_entry,@function
ksites_probe_c_entry:
    ret
    .size ksites_probe_c_entry, .-ksites_probe_c_entry
    .globl ksites_probe_ret0
    .type ksites_probe_ret0,@function
ksites_probe_ret0:
    li a0, 0
    ret
    .size ksites_probe_ret0, .-ksites_probe_ret0
    .globl ksites_probe_ret1
    .type ksites_probe_ret1,@function
ksites_probe_ret1:
    li a0, 1
    ret
    .size ksites_probe_ret1, .-ksites_probe_ret1
    .data
    .balign 8
fixture_add_slot: .quad add_impl
    .section .rodata
n1: .ascii "fixture::add"
n1e:
    .section .ksites_ifuncs,"awR",@progbits
    .balign 8
    .long 0x4649534b, 1
    .quad fixture_add, fixture_add_slot, add_impl, add_impl, n1, n1e - n1
    .section .data.cell,"aw",@progbits
    .balign 8
    .globl __ksites_table_cell
__ksites_table_cell: .quad 0x01004c4c4543534b, 0, 0
"#;

/// Calls and tail calls of the ifunc.
const CALLS_C: &str = r#"
#include <stdint.h>
extern uint64_t fixture_add(uint64_t a, uint64_t b);
volatile uint64_t sink;
__attribute__((noinline)) uint64_t c_calls(uint64_t x) {
    uint64_t a = fixture_add(x, 1);
    sink = a;
    return fixture_add(a, 3) + 1;
}
__attribute__((noinline)) uint64_t c_tail(uint64_t x) { return fixture_add(x, 5); }
__attribute__((noinline)) uint64_t c_tail2(uint64_t x) { return fixture_add(x, x); }
void c_condbr(void);
"#;

/// Every C probe form, and the entry point.
const PROBES_C: &str = r#"
#include <stdint.h>
#include "ksites_sdt.h"
KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
KSITES_PROBE_DECL(net, tx, 1, (unsigned long len))
extern uint64_t c_calls(uint64_t), c_tail(uint64_t), c_tail2(uint64_t);
extern void c_condbr(void);
extern volatile uint64_t sink;
__attribute__((noinline)) void c_probe(unsigned long n) { KSITES_PROBE(net, rx, n, 80); sink = n; }
__attribute__((noinline)) void c_probe_tail(unsigned long n) { KSITES_PROBE(net, tx, n); }
__attribute__((noinline)) unsigned long c_enabled(unsigned long n) {
    if (KSITES_PROBE_ENABLED(net, rx))
        sink = n * 3;
    return n;
}
__attribute__((noinline)) int c_enabled_tail(void) { return KSITES_PROBE_ENABLED(net, tx); }
void _start(void) {
    sink = c_calls(1) + c_tail(2) + c_tail2(3) + c_enabled(4) + c_enabled_tail();
    c_probe(5);
    c_probe_tail(6);
    c_condbr();
    for (;;) {}
}
"#;

/// The Rust half: an ifunc (its trampoline also under the C name `fixture_add_c`), Rust
/// callers, and `probe!`/`probe_enabled!` sites (kernel-loader's riscv64 macros).
const LIB: &str = r#"#![no_std]
use kernel_loader::{CpuFeatures, ifunc, probe, probe_enabled};

unsafe extern "C" fn add_soft(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}
unsafe extern "C" fn add_zbb(a: u64, b: u64) -> u64 {
    a.wrapping_add(b) ^ 1
}
fn pick_add(f: &CpuFeatures) -> unsafe extern "C" fn(u64, u64) -> u64 {
    if f.contains(CpuFeatures::ZBB) { add_zbb } else { add_soft }
}

ifunc! {
    /// An ifunc.
    pub fn fixture_add(a: u64, b: u64) -> u64;
    default = add_soft;
    resolver = pick_add;
}

// The trampoline under a C name, for C callers.
core::arch::global_asm!(".globl fixture_add_c", ".set fixture_add_c, {t}", t = sym fixture_add);

#[unsafe(no_mangle)]
pub extern "C" fn fixture_fire(x: u64) -> u64 {
    // The table cell: named, so the archive member that defines it is linked (which
    // other member of kernel-loader shares its object file is up to rustc).
    core::hint::black_box(&kernel_loader::cell::TABLE_CELL);
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

/// The C half of the Rust image: calls, a tail call and a C probe.
const RK_C: &str = r#"
#include <stdint.h>
#include "ksites_sdt.h"
KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
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
void _start(void) {
    sink = c_calls(1) + c_tail(2) + fixture_fire(3) + rust_calls(4);
    c_probe(5);
    for (;;) {}
}
"#;

/// A kernel-like layout (QEMU virt's S-mode entry) reserving the `.ksites` slot in the
/// read-only data, as the riscv64 test kernel's script does.
const KERNEL_LD: &str = "ENTRY(_start)
SECTIONS {
  . = 0x80200000;
  .text : { *(.text.boot) *(.text .text.*) }
  . = ALIGN(4096);
  .rodata : { *(.rodata .rodata.* .srodata .srodata.*) }
  .ksites : ALIGN(8) { __ksites_table_start = .; BYTE(0); . += 16384 - 1; }
  . = ALIGN(4096);
  .data : { *(.data .data.* .sdata .sdata.*) *(.got .got.*) }
  .ksites_ifuncs : { KEEP(*(.ksites_ifuncs)) }
  .bss (NOLOAD) : { *(.bss .bss.* .sbss .sbss.*) *(COMMON) }
}
";

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd:?}: {e} (install gcc-riscv64-linux-gnu / binutils-riscv64-linux-gnu)"
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
    let d = std::env::temp_dir().join(format!("ksites-rv64-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Rust half as a static library for riscv64gc-unknown-none-elf, built once.
fn rust_lib() -> PathBuf {
    static LIB_PATH: OnceLock<PathBuf> = OnceLock::new();
    LIB_PATH
        .get_or_init(|| {
            let dir = tmpdir("rs");
            let manifest = format!(
                "[package]\nname = \"rv64embed\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
                 [lib]\npath = \"lib.rs\"\ncrate-type = [\"staticlib\"]\n\n\
                 [dependencies]\nkernel-loader = {{ path = {:?} }}\n\n\
                 [profile.release]\npanic = \"abort\"\n\n[workspace]\n",
                ws().join("kernel-loader").display().to_string()
            );
            std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
            std::fs::write(dir.join("lib.rs"), LIB).unwrap();
            std::fs::copy(ws().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
            let target_dir = ws().join("target").join("riscv64-embed");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            ok(Command::new(cargo)
                .args(["build", "--offline", "--release", "--target"])
                .arg("riscv64gc-unknown-none-elf")
                .arg("--manifest-path")
                .arg(dir.join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS"));
            target_dir.join("riscv64gc-unknown-none-elf/release/librv64embed.a")
        })
        .clone()
}

/// `src` (C, or assembly when `name` ends in `.S.o`) compiled with the kernel flags
/// and `extra` into `dir/name`.
fn gcc(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
    let ext = if name.ends_with(".S.o") { "S" } else { "c" };
    let c = dir.join(name).with_extension(ext);
    std::fs::write(&c, src).unwrap();
    let o = dir.join(name);
    ok(Command::new(GCC)
        .args([
            "-O2",
            "-march=rv64gc",
            "-mabi=lp64d",
            "-mcmodel=medany",
            "-fno-pic",
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

/// Links `objs` with `ld` (relaxing with `relax`), static, `--emit-relocs`, into `out`.
fn link(ld: Ld, relax: bool, objs: &[&Path], out: &Path) {
    link_with(ld, relax, None, objs, out)
}

/// [`link`] with a linker script.
fn link_with(ld: Ld, relax: bool, script: Option<&Path>, objs: &[&Path], out: &Path) {
    let mut cmd = match ld {
        Ld::Bfd => Command::new(LD),
        Ld::Lld => {
            let mut c = Command::new(rust_lld());
            c.args(["-flavor", "gnu"]);
            c
        }
    };
    cmd.args(["--emit-relocs", "-static", "-e", "_start"]);
    cmd.arg(if relax { "--relax" } else { "--no-relax" });
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

/// The calls and tail calls of `sym` in `objdump -dr --no-show-raw-insn`: (address,
/// call?) of every CALL/CALL_PLT relocation on an `auipc` that a `jalr` linking `ra`
/// or a `jr` (no link) follows, and every JAL/RVC_JUMP (or relaxed CALL) relocation on
/// a `jal` linking `ra` or a `j`, against `sym`. Objdump's own reading, independent of
/// the tool's decoder.
fn objdump_calls(path: &Path, sym: &str) -> Vec<(u64, bool)> {
    let dis = ok(Command::new(OBJDUMP)
        .args(["-dr", "--no-show-raw-insn", "-M", "no-aliases,numeric"])
        .arg(path));
    // (address, mnemonic, operands) of each instruction; relocations of the last one.
    let mut insns: Vec<(u64, String, String)> = Vec::new();
    let mut relocs: Vec<(usize, String, String)> = Vec::new();
    for l in dis.lines() {
        let t = l.trim_start();
        let Some((addr, rest)) = t.split_once(':') else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let rest = rest.trim();
        if let Some(r) = rest.strip_prefix("R_RISCV_") {
            let mut f = r.split_whitespace();
            let (ty, s) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            if !insns.is_empty() {
                relocs.push((insns.len() - 1, ty.to_string(), s.to_string()));
            }
            continue;
        }
        let mut f = rest.splitn(2, char::is_whitespace);
        let m = f.next().unwrap_or("").to_string();
        // Operands without objdump's `# <symbol>` comment.
        let ops = f
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        insns.push((addr, m, ops));
    }
    let mut out = Vec::new();
    for (i, ty, s) in relocs {
        if s != sym {
            continue;
        }
        let (addr, m, ops) = &insns[i];
        let call = match (ty.as_str(), m.as_str()) {
            ("CALL" | "CALL_PLT", "auipc") => {
                // `jalr x1,0(x1)` / `jalr x0,0(x6)`: the link register, then the base.
                let Some((_, jm, jops)) = insns.get(i + 1) else {
                    continue;
                };
                let rx = ops.split(',').next().unwrap_or("");
                let mut j = jops.split(',');
                let rd = j.next().unwrap_or("");
                let base_ok = j.next().is_some_and(|b| b.ends_with(&format!("({rx})")));
                match (jm.as_str(), rd, base_ok) {
                    ("jalr", "x1", true) if rx == "x1" => true,
                    ("jalr", "x0", true) if rx == "x6" => false,
                    _ => continue,
                }
            }
            ("CALL" | "CALL_PLT" | "JAL", "jal") => match ops.split(',').next() {
                Some("x1") => true,
                Some("x0") => false,
                _ => continue,
            },
            ("CALL" | "CALL_PLT" | "RVC_JUMP", "c.j") => false,
            _ => continue,
        };
        out.push((*addr, call));
    }
    out.sort();
    out
}

/// The stubs of a linked image.
fn stubs_of(img: &Image<'_>) -> Stubs {
    let stub = |n: &str| img.symbol(n).map_or(0, |s| s.addr);
    Stubs {
        c_entry: stub("ksites_probe_c_entry"),
        ret0: stub("ksites_probe_ret0"),
        ret1: stub("ksites_probe_ret1"),
    }
}

/// Checks an embedded image: verify, the table against objdump, the sites' bytes, the
/// C probe rewrites. Returns the forms of the sites (pairs, `jal`s, `c.j`s), the probe
/// site count and `inspect`'s text.
fn check_embedded(input: &Path, out: &Path) -> ([usize; 3], usize, String) {
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
    assert_eq!(t.arch(), Arch::Riscv64);
    let f = t.ifuncs().next().expect("one ifunc");
    // Every name of the trampoline (the Rust symbol and its C alias).
    let names: Vec<String> = object::Object::symbols(&img.file)
        .filter(|s| object::ObjectSymbol::address(s) == f.trampoline)
        .filter_map(|s| Some(object::ObjectSymbol::name(&s).ok()?.to_string()))
        .filter(|n| !n.is_empty())
        .collect();
    let mut want: Vec<(u64, bool)> = names.iter().flat_map(|n| objdump_calls(input, n)).collect();
    want.sort();
    let got: Vec<(u64, bool)> = t
        .sites()
        .map(|s| (s.addr, s.kind == SiteKind::Call))
        .collect();
    assert_eq!(got, want, "{}: sites vs objdump -dr", input.display());
    let mut forms = [0; 3];
    for s in t.sites() {
        let code = img.read_va(s.addr, s.len() as u64).unwrap();
        let d = decode_site(code, s.addr).expect("a site form");
        assert_eq!(
            (d.kind, d.form, d.target, usize::from(d.len)),
            (s.kind, s.prefixes, f.trampoline, s.len()),
            "site {:#x}",
            s.addr
        );
        forms[usize::from(d.form)] += 1;
    }
    let inspect = ksites_ok(&[&"inspect", &out]);
    assert!(
        inspect.contains(&format!(" sites={}\n", want.len())),
        "inspect vs objdump ({}): {inspect}",
        want.len()
    );
    // Probe sites hold their disabled form, and each C call is rewritten whole.
    let stubs = stubs_of(&img);
    let orig = std::fs::read(input).unwrap();
    let before = Image::parse("in", &orig).unwrap();
    for p in t.probe_sites() {
        let want = site_bytes(&p.arch_ref(), false, &stubs).unwrap();
        assert_eq!(
            img.read_va(p.addr, 4).unwrap(),
            want,
            "probe site {:#x}",
            p.addr
        );
        if p.kind.is_rust() {
            continue;
        }
        // The call was at the site or 2 bytes before it: a pair, or a 4-aligned `jal`.
        let call = [p.addr, p.addr - 2]
            .into_iter()
            .find(|&a| decode_site(before.read_va(a, 8).unwrap_or(&[]), a).is_some())
            .expect("the original call");
        let len = match before.read_va(call, 4).unwrap()[0] & 0x7f {
            0x17 => 8,
            _ => 4,
        };
        let bytes = img.read_va(call, len).unwrap();
        assert!(
            is_c_site_disabled(p.kind, call, bytes, Some(&stubs)),
            "C probe call {call:#x} ({:?}): {bytes:02x?}",
            p.kind
        );
    }
    (forms, t.probe_site_count() as usize, inspect)
}

/// The file's bytes, to show the input is left as it was.
fn digest(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn images_relaxed_or_not_from_both_linkers_embed_verify_and_match_objdump() {
    let dir = tmpdir("images");
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    // Probe calls must stay 4-aligned pairs or `jal`s: compiled without relaxation.
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mno-relax"]);
    let calls_relax = gcc(&dir, "calls-relax.o", CALLS_C, &["-mrelax"]);
    let calls_norelax = gcc(&dir, "calls-norelax.o", CALLS_C, &["-mno-relax"]);
    for (ld, relax, calls, forms) in [
        // Relaxed: every call a `jal`, every tail call a `c.j` (all near).
        (Ld::Bfd, true, &calls_relax, [0, 2, 2]),
        (Ld::Lld, true, &calls_relax, [0, 2, 2]),
        // Not relaxed, or objects without R_RISCV_RELAX: pairs only.
        (Ld::Bfd, false, &calls_relax, [4, 0, 0]),
        (Ld::Lld, false, &calls_relax, [4, 0, 0]),
        (Ld::Bfd, true, &calls_norelax, [4, 0, 0]),
        (Ld::Lld, true, &calls_norelax, [4, 0, 0]),
    ] {
        let name = format!(
            "k-{ld:?}-{relax}-{}",
            calls.file_stem().unwrap().to_string_lossy()
        );
        let input = dir.join(format!("{name}.elf"));
        link(ld, relax, &[calls, &probes, &asm], &input);
        let before = digest(&input);
        let out = input.with_extension("emb");
        let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
        assert!(
            said.contains("1 ifuncs, 4 sites, 2 other references, 2 probes, 4 probe sites"),
            "{name}: {said}"
        );
        let (got_forms, probe_sites, inspect) = check_embedded(&input, &out);
        assert_eq!(got_forms, forms, "{name}: forms (pair, jal, c.j)");
        assert_eq!(probe_sites, 4, "{name}");
        assert_eq!(
            inspect.matches("(jcc-class branch: not patched)").count(),
            2,
            "{name}: {inspect}"
        );
        for kind in ["c-call", "c-tail", "c-is-enabled ", "c-is-enabled-tail"] {
            assert!(inspect.contains(kind), "{kind}: {inspect}");
        }
        // SystemTap notes name the RISC-V argument registers.
        let notes = ok(Command::new("readelf").arg("-nW").arg(&out));
        assert!(notes.contains("8@a0 8@a1"), "{notes}");
        // The input is unchanged; embedding is deterministic; a second embed is refused.
        assert!(digest(&input) == before, "{name}: input modified");
        let again = dir.join("again.emb");
        ksites_ok(&[&"embed", &input, &"-o", &again]);
        assert!(digest(&again) == digest(&out), "embed is not deterministic");
        let twice = dir.join("twice.emb");
        let o = ksites(&[&"embed", &out, &"-o", &twice]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("already"));
        assert!(!twice.exists());
    }
}

#[test]
fn scan_lists_pairs_relaxed_forms_and_conditional_branches() {
    let dir = tmpdir("scan");
    let calls = gcc(&dir, "calls.o", CALLS_C, &["-mrelax"]);
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    let said = ksites_ok(&[
        &"scan",
        &"--calls-to",
        &"fixture_add",
        &"--jumps-to",
        &"fixture_add",
        &calls,
        &asm,
    ]);
    // In the objects: four pairs (the site is the `auipc`), 8 bytes; two branches.
    let kinds: Vec<&str> = said
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap_or(""))
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "call").count(), 2, "{said}");
    assert_eq!(kinds.iter().filter(|k| **k == "jmp").count(), 2, "{said}");
    assert_eq!(kinds.iter().filter(|k| **k == "jcc").count(), 2, "{said}");
    assert_eq!(said.matches("(8 bytes)").count(), 4, "{said}");
    assert!(
        said.contains("jcc (4 bytes)") && said.contains("jcc (2 bytes)"),
        "{said}"
    );
    for (addr, _) in objdump_calls(&calls, "fixture_add") {
        assert!(said.contains(&format!("+{addr:#x} ")), "{addr:#x}: {said}");
    }
    // Linked with relaxation: the same calls as `jal` (4) and `c.j` (2).
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mno-relax"]);
    let img = dir.join("k.elf");
    link(Ld::Lld, true, &[&calls, &probes, &asm], &img);
    let said = ksites_ok(&[
        &"scan",
        &"--calls-to",
        &"fixture_add",
        &"--jumps-to",
        &"fixture_add",
        &img,
    ]);
    assert_eq!(said.matches("call (4 bytes)").count(), 2, "{said}");
    assert_eq!(said.matches("jmp (2 bytes)").count(), 2, "{said}");
}

#[test]
fn ksites_link_wraps_both_riscv64_linkers() {
    let dir = tmpdir("link");
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mno-relax"]);
    let calls = gcc(&dir, "calls.o", CALLS_C, &["-mrelax"]);
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
            &calls,
            &probes,
            &asm,
            &"-o",
            &out,
        ]);
        assert!(said.contains("4 sites"), "{said}");
        let v = ksites_ok(&[&"verify", &out]);
        assert!(v.contains("ok (4 ifunc sites, 4 probe sites)"), "{v}");
        outs.push(out);
    }
    // GNU ld through `ksites link` is the same as linking with it, then embedding.
    let plain = dir.join("plain.elf");
    link(Ld::Bfd, true, &[&calls, &probes, &asm], &plain);
    let emb = dir.join("plain.emb");
    ksites_ok(&[&"embed", &plain, &"-o", &emb]);
    assert!(digest(&emb) == digest(&outs[0]));
}

/// Runs `embed` on `input` expecting a refusal naming each of `want`, with no output
/// and the input untouched.
fn refused(dir: &Path, input: &Path, want: &[&str]) {
    let before = digest(input);
    let out = dir.join("refused.out");
    let o = ksites(&[&"embed", &input, &"-o", &out]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{} accepted", input.display());
    for w in want {
        assert!(err.contains(w), "{w:?} not in {err}");
    }
    assert!(!out.exists(), "output written");
    assert!(digest(input) == before, "input modified");
}

#[test]
fn hostile_inputs_are_refused_naming_the_place() {
    let dir = tmpdir("hostile");
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mno-relax"]);
    let calls = gcc(&dir, "calls.o", CALLS_C, &[]);
    // A CALL relocation on two `addi`s: no pair.
    let bad = gcc(
        &dir,
        "badcall.S.o",
        ".text\n.globl badcall\n.type badcall,@function\nbadcall:\n\
         .option norelax\n.reloc ., R_RISCV_CALL_PLT, fixture_add\n\
         addi a0, a0, 1\naddi a0, a0, 2\nret\n.size badcall, .-badcall\n",
        &[],
    );
    refused(
        &dir,
        &bad,
        &[
            "badcall.S.o",
            "section .text+0x0 (badcall)",
            "R_RISCV_CALL_PLT against `fixture_add`",
            "not on an `auipc`+`jalr` pair",
        ],
    );
    let o = ksites(&[&"scan", &"--calls-to", &"*", &bad]);
    assert!(!o.status.success());
    // The same in a linked image.
    let img = dir.join("badcall.elf");
    link(Ld::Bfd, false, &[&bad, &calls, &probes, &asm], &img);
    refused(
        &dir,
        &img,
        &["badcall.elf", "(badcall)", "not on an `auipc`+`jalr` pair"],
    );
    // A conditional branch to a probe function: never left live, never rewritten.
    let condbr = gcc(
        &dir,
        "condbr.S.o",
        ".text\n.globl c_condbr_probe\n.type c_condbr_probe,@function\nc_condbr_probe:\n\
         .reloc ., R_RISCV_BRANCH, __dtrace_probe_net___rx\n.4byte 0x00b50063\n\
         ret\n.size c_condbr_probe, .-c_condbr_probe\n",
        &[],
    );
    let img = dir.join("condbr.elf");
    link(Ld::Bfd, false, &[&condbr, &calls, &probes, &asm], &img);
    refused(
        &dir,
        &img,
        &[
            "condbr.elf",
            "in c_condbr_probe",
            "jcc to probe function __dtrace_probe_net___rx",
        ],
    );
    // A probe call that relaxation made a `jal` at 2 mod 4: no room for an aligned site.
    let mis = gcc(
        &dir,
        "mis.S.o",
        ".text\n.balign 4\n.globl mis\n.type mis,@function\nmis:\nc.nop\n\
         call __dtrace_probe_net___tx\nret\n.size mis, .-mis\n",
        &["-mrelax"],
    );
    let img = dir.join("mis.elf");
    link(Ld::Bfd, true, &[&mis, &calls, &probes, &asm], &img);
    refused(
        &dir,
        &img,
        &[
            "mis.elf",
            "in mis+0x2",
            "__dtrace_probe_net___tx",
            "4-aligned",
        ],
    );
    // The ifunc's own conditional branches are reported, not patched (like aarch64's).
    let img = dir.join("k.elf");
    link(Ld::Lld, true, &[&calls, &probes, &asm], &img);
    let out = dir.join("k.emb");
    let said = ksites_ok(&[&"embed", &img, &"-o", &out]);
    assert!(said.contains("2 other references"), "{said}");
}

#[test]
fn modules_embed_with_probe_calls_rewritten_whole() {
    let dir = tmpdir("module");
    let m = gcc(&dir, "m.o", PROBES_C, &["-mno-relax"]);
    let before = digest(&m);
    let out = dir.join("m.emb.o");
    let said = ksites_ok(&[&"embed", &m, &"-o", &out]);
    assert!(said.contains("2 probes, 4 probe sites"), "{said}");
    assert!(digest(&m) == before, "input modified");
    // Every call to a probe function is gone (its relocations "none", its RELAX too);
    // the is-enabled tail call's `jal` takes an R_RISCV_JAL to ksites_probe_ret0 at
    // the site; the text section keeps 4-byte alignment for the sites.
    let rel = ok(Command::new("readelf").arg("-rW").arg(&out));
    for l in rel.lines().filter(|l| l.contains("__dtrace")) {
        assert!(l.contains("R_RISCV_NONE"), "{l}");
    }
    assert!(rel.contains("R_RISCV_NONE"), "{rel}");
    assert_eq!(rel.matches("R_RISCV_JAL ").count(), 1, "{rel}");
    assert!(rel.contains("ksites_probe_ret0"), "{rel}");
    let sec = ok(Command::new("readelf").arg("-SW").arg(&out));
    let text = sec.lines().find(|l| l.contains(" .text ")).unwrap();
    assert!(text.trim_end().ends_with(" 4"), "{text}");
    let data = std::fs::read(&out).unwrap();
    let img = Image::parse("m", &data).unwrap();
    let t = img.section_by_name(".text").unwrap();
    let code = object::ObjectSection::data(&t).unwrap();
    let tab = img.section_by_name(SECTION_NAME).expect("a table");
    let _ = tab;
    let orig = std::fs::read(&m).unwrap();
    let oimg = Image::parse("m", &orig).unwrap();
    let otext = object::ObjectSection::data(&oimg.section_by_name(".text").unwrap()).unwrap();
    // The pairs' `auipc`s are gone: as many fewer `auipc ra`/`auipc t1` as sites.
    let auipcs = |c: &[u8]| {
        (0..c.len().saturating_sub(3))
            .step_by(2)
            .filter(|&i| decode_site(&c[i..], i as u64).is_some_and(|d| d.form == 0))
            .count()
    };
    assert_eq!(auipcs(otext) - auipcs(code), 4);
}

#[test]
fn rust_and_c_through_ksites_link_into_a_reserved_slot_with_both_linkers() {
    let dir = tmpdir("rust");
    let c = gcc(&dir, "rk.o", RK_C, &["-mno-relax"]);
    let lib = rust_lib();
    let script = dir.join("kernel.ld");
    std::fs::write(&script, KERNEL_LD).unwrap();
    for (linker, ld) in [("bfd", Ld::Bfd), ("lld", Ld::Lld)] {
        // Linked as `ksites-ld` links the test kernel (relaxing, but nothing relaxes:
        // rk.o is -mno-relax and riscv64gc-unknown-none-elf emits no R_RISCV_RELAX, so
        // every site stays a pair), for objdump; then through `ksites link` into the slot.
        let input = dir.join(format!("k-{linker}.elf"));
        link_with(ld, true, Some(&script), &[&c, &lib], &input);
        let out = dir.join(format!("k-{linker}.emb"));
        let said = ksites_ok(&[
            &"link",
            &"--linker",
            &linker,
            &"--",
            &"-static",
            &"-e",
            &"_start",
            &"-T",
            &script,
            &c,
            &lib,
            &"-o",
            &out,
        ]);
        assert!(said.contains("1 ifuncs, 6 sites"), "{linker}: {said}");
        let (forms, probe_sites, inspect) = check_embedded(&input, &out);
        assert_eq!(forms, [6, 0, 0], "{linker}: pairs, jal, c.j: {inspect}");
        // The C probe, `probe!` and `probe_enabled!`.
        assert_eq!(probe_sites, 3, "{linker}: {inspect}");
        for kind in ["c-call", "rust "] {
            assert!(inspect.contains(kind), "{kind}: {inspect}");
        }
        // The table is in the reserved slot: no new segment.
        let data = std::fs::read(&out).unwrap();
        let img = Image::parse("out", &data).unwrap();
        let sec = img.section_by_name(SECTION_NAME).unwrap();
        let slot = img.symbol("__ksites_table_start").unwrap().addr;
        assert_eq!(object::ObjectSection::address(&sec), slot);
        let loads = |p: &Path| {
            ok(Command::new("readelf").arg("-lW").arg(p))
                .matches("LOAD")
                .count()
        };
        assert_eq!(loads(&out), loads(&input), "{linker}");
    }
}

/// A GNU ifunc (`R_RISCV_IRELATIVE`, called through the linker's PLT entry `auipc t3;
/// ld t3; jalr t1, t3; nop`).
const G_C: &str = r#"
#include <stdint.h>
static uint64_t pc_a(uint64_t x) { return x + 1; }
static void *pick_pc(void) { return (void *)pc_a; }
uint64_t gpop(uint64_t x) __attribute__((ifunc("pick_pc")));
volatile uint64_t sink;
__attribute__((noinline)) uint64_t g_calls(uint64_t x) { sink = gpop(x); return gpop(x + 1) + 1; }
__attribute__((noinline)) uint64_t g_tail(uint64_t x) { return gpop(x); }
uint64_t __ksites_table_cell[3] = {0x01004c4c4543534bull, 0, 0};
void _start(void) { sink = g_calls(1) + g_tail(2); for (;;) {} }
"#;

#[test]
fn gnu_ifuncs_through_the_plt_of_both_linkers() {
    let dir = tmpdir("gnu");
    let g = gcc(&dir, "g.o", G_C, &[]);
    for ld in [Ld::Bfd, Ld::Lld] {
        let input = dir.join(format!("g-{ld:?}.elf"));
        link(ld, true, &[&g], &input);
        let out = input.with_extension("emb");
        let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
        assert!(said.contains("1 ifuncs, 3 sites"), "{ld:?}: {said}");
        assert!(ksites_ok(&[&"verify", &out]).contains("ok (3 ifunc sites"));
        let data = std::fs::read(&out).unwrap();
        let img = Image::parse("out", &data).unwrap();
        let sec = img.section_by_name(SECTION_NAME).unwrap();
        let t = Table::parse(
            object::ObjectSection::data(&sec).unwrap(),
            object::ObjectSection::address(&sec),
            &img.exec_ranges(),
        )
        .unwrap();
        let got: Vec<(u64, bool)> = t
            .sites()
            .map(|s| (s.addr, s.kind == SiteKind::Call))
            .collect();
        assert_eq!(got, objdump_calls(&input, "gpop"), "{ld:?}");
        // The slot is the IRELATIVE one.
        let rel = ok(Command::new("readelf").arg("-rW").arg(&input));
        let irel = rel
            .lines()
            .find(|l| l.contains("R_RISCV_IRELATIVE"))
            .expect("an IRELATIVE relocation");
        let slot = u64::from_str_radix(irel.split_whitespace().next().unwrap(), 16).unwrap();
        assert_eq!(t.ifuncs().next().unwrap().slot, slot, "{ld:?}");
    }
}

#[test]
fn verify_finds_a_probe_pair_not_rewritten_whole() {
    let dir = tmpdir("verify");
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mno-relax"]);
    let calls = gcc(&dir, "calls.o", CALLS_C, &["-mno-relax"]);
    let input = dir.join("k.elf");
    link(Ld::Bfd, false, &[&calls, &probes, &asm], &input);
    let out = dir.join("k.emb");
    ksites_ok(&[&"embed", &input, &"-o", &out]);
    let orig = std::fs::read(&input).unwrap();
    let before = Image::parse("in", &orig).unwrap();
    let mut data = std::fs::read(&out).unwrap();
    // A C call probe site that was a 4-aligned pair: put its `jalr` back.
    let (at, jalr) = {
        let img = Image::parse("out", &data).unwrap();
        let sec = img.section_by_name(SECTION_NAME).unwrap();
        let t = Table::parse(
            object::ObjectSection::data(&sec).unwrap(),
            object::ObjectSection::address(&sec),
            &img.exec_ranges(),
        )
        .unwrap();
        let site = t
            .probe_sites()
            .map(|p| p.addr)
            .find(|&a| {
                decode_site(before.read_va(a, 8).unwrap(), a)
                    .is_some_and(|d| d.form == 0 && d.kind == SiteKind::Call)
            })
            .expect("a 4-aligned C probe pair");
        let jalr: [u8; 4] = before.read_va(site + 4, 4).unwrap().try_into().unwrap();
        (img.va_to_file_offset(site + 4, 4).unwrap() as usize, jalr)
    };
    data[at..at + 4].copy_from_slice(&jalr);
    let bad = dir.join("bad.emb");
    std::fs::write(&bad, &data).unwrap();
    let o = ksites(&[&"verify", &bad]);
    assert_eq!(o.status.code(), Some(4));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("the pair was not rewritten whole"), "{said}");
}

#[test]
fn relaxable_probe_calls_linked_without_relaxation_lose_their_relax_relocations() {
    let dir = tmpdir("relaxrel");
    let asm = gcc(&dir, "ifunc.S.o", IFUNC_S, &[]);
    let probes = gcc(&dir, "probes.o", PROBES_C, &["-mrelax"]);
    let calls = gcc(&dir, "calls.o", CALLS_C, &[]);
    let input = dir.join("k.elf");
    link(Ld::Bfd, false, &[&calls, &probes, &asm], &input);
    let out = dir.join("k.emb");
    let said = ksites_ok(&[&"embed", &input, &"-o", &out]);
    assert!(said.contains("4 probe sites"), "{said}");
    assert!(ksites_ok(&[&"verify", &out]).contains(": ok ("));
    // Each rewritten pair's R_RISCV_RELAX went "none" with its CALL_PLT.
    let relax = |p: &Path| {
        ok(Command::new("readelf").arg("-rW").arg(p))
            .matches("R_RISCV_RELAX")
            .count()
    };
    assert_eq!(relax(&input) - relax(&out), 4);
}
