//! Static keys written with kernel-loader's own macros, through the build tool: a Rust
//! kernel (`static_key!`, `static_branch_likely!`/`static_branch_unlikely!`) linked by
//! `ksites-ld` with rust-lld and GNU ld, a Rust module with a key of its own and a
//! kernel key it imports, and C (`ksites_key.h`): a program run before and after
//! `embed` (each site in its key's default state only after), and modules for x86-64,
//! aarch64 and riscv64.

#[path = "common/module_build.rs"]
mod module_build;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::format::Table;
use ksites::embed_rel::{VirtualLayout, relocated_table};
use object::read::elf::ElfFile64;
use object::{LittleEndian as LE, Object, ObjectSection, ObjectSymbol};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");
const KSITES_LD: &str = env!("CARGO_BIN_EXE_ksites-ld");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kernel_loader() -> PathBuf {
    module_build::kernel_loader_for_none(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("keys_macros_kl"),
    )
}

fn header_dir() -> String {
    format!("{}/../kernel-loader/c", env!("CARGO_MANIFEST_DIR"))
}

/// Four sites, one per (key, likeliness); the sum says which way each went.
const KERNEL: &str = r#"
#![no_std]
#![no_main]
use kernel_loader::{static_branch_likely, static_branch_unlikely, static_key};
static_key!(pub ON: default true);
static_key!(OFF: default false);
#[inline(never)]
#[unsafe(no_mangle)]
pub fn on_unlikely() -> u32 { if static_branch_unlikely!(ON) { 1 } else { 0 } }
#[inline(never)]
#[unsafe(no_mangle)]
pub fn off_likely() -> u32 { if static_branch_likely!(OFF) { 2 } else { 0 } }
#[inline(never)]
#[unsafe(no_mangle)]
pub fn on_likely() -> u32 { if static_branch_likely!(ON) { 4 } else { 0 } }
#[inline(never)]
#[unsafe(no_mangle)]
pub fn off_unlikely() -> u32 { if static_branch_unlikely!(OFF) { 8 } else { 0 } }
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    // SAFETY: the image is processed by `ksites embed` (the test checks it).
    let t = unsafe { kernel_loader::cell::image_table_bytes() };
    core::hint::black_box((on_unlikely() + off_likely() + on_likely() + off_unlikely(), t.is_ok()));
    loop {}
}
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! { loop {} }
"#;

#[test]
fn rust_kernel_linked_by_ksites_ld() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kl = kernel_loader();
    std::fs::write(d.join("k.rs"), KERNEL).unwrap();
    for linker in ["lld", "bfd"] {
        let out = format!("kernel-{linker}");
        let o = run(Command::new("rustc")
            .args(["--edition", "2024", "-O", "--target", "x86_64-unknown-none"])
            .args(["-C", "panic=abort", "k.rs", "-o", &out])
            .arg("--extern")
            .arg(format!(
                "kernel_loader={}",
                kl.join("libkernel_loader.rlib").display()
            ))
            .arg("-L")
            .arg(format!("dependency={}", kl.join("deps").display()))
            .arg("-C")
            .arg(format!("linker={KSITES_LD}"))
            .env("KSITES_LINKER", linker)
            .current_dir(d));
        assert!(o.status.success(), "{linker}: {}", text(&o.stderr));
        let v = run(Command::new(KSITES).arg("verify").arg(d.join(&out)));
        assert!(
            v.status.success() && text(&v.stdout).contains(", 4 key sites)"),
            "{linker}: verify: {}{}",
            text(&v.stdout),
            text(&v.stderr)
        );
        let i = run(Command::new(KSITES).arg("inspect").arg(d.join(&out)));
        let l = text(&i.stdout);
        assert!(i.status.success(), "{linker}: {}", text(&i.stderr));
        assert!(
            l.contains("key k::OFF default=false imported=no sites=2\n")
                && l.contains("key k::ON default=true imported=no sites=2\n"),
            "{linker}: {l}"
        );
        // The sites that start as jumps: ON's unlikely one and OFF's likely one.
        for (f, kind, form) in [
            ("on_unlikely", "unlikely", "jump"),
            ("off_likely", "likely", "jump"),
            ("on_likely", "likely", "nop"),
            ("off_unlikely", "unlikely", "nop"),
        ] {
            let line = l
                .lines()
                .find(|s| {
                    s.contains(&format!(" {kind} {f}+")) || s.contains(&format!(" {kind} {f} "))
                })
                .unwrap_or_else(|| panic!("{linker}: no {kind} site in {f}: {l}"));
            assert!(line.ends_with(&format!("form={form}")), "{linker}: {line}");
        }
    }
}

/// A module: a key of its own (default true) and the kernel's `KERNEL_KEY`.
const MODULE: &str = r#"
#![no_std]
use kernel_loader::key::StaticKey;
use kernel_loader::{static_branch_likely, static_branch_unlikely, static_key};
static_key!(pub MODKEY: default true);
unsafe extern "C" {
    static KERNEL_KEY: StaticKey;
}
#[unsafe(no_mangle)]
pub fn m_unlikely() -> u32 { if static_branch_unlikely!(MODKEY) { 7 } else { 1 } }
#[unsafe(no_mangle)]
pub fn m_imported() -> u32 { if static_branch_likely!(KERNEL_KEY) { 3 } else { 4 } }
"#;

/// The relocated table of an embedded module and the layout it was relocated at.
fn module_table(data: &[u8]) -> (Vec<u8>, u64, VirtualLayout) {
    let file = ElfFile64::<LE>::parse(data).unwrap();
    let layout = VirtualLayout::new(&file, 0x1000).unwrap();
    let t = ksites::target::Target::from_machine(file.elf_header().e_machine.get(LE).0).unwrap();
    let (bytes, addr) = relocated_table(t, &file, &layout).unwrap();
    (bytes, addr, layout)
}

/// (name, default, imported) of each key, and (site, likely, key, holds the branch
/// form) of each site, of the embedded module `data`.
type Keys = Vec<(String, bool, bool)>;
fn module_keys(data: &[u8]) -> (Keys, Vec<(bool, u32, bool)>) {
    let (bytes, addr, layout) = module_table(data);
    let t = Table::parse(&bytes, addr, &layout.exec).unwrap();
    let file = ElfFile64::<LE>::parse(data).unwrap();
    let arch = ksites::target::Target::from_machine(file.elf_header().e_machine.get(LE).0).unwrap();
    let keys = t
        .keys()
        .map(|k| (k.name.to_string(), k.default, k.imported))
        .collect();
    let sites = t
        .key_sites()
        .map(|s| {
            let (i, base) = layout
                .sections
                .iter()
                .enumerate()
                .filter_map(|(i, a)| Some((i, (*a)?)))
                .filter(|&(_, a)| a <= s.addr)
                .max_by_key(|&(_, a)| a)
                .unwrap();
            let sec = file.section_by_index(object::SectionIndex(i)).unwrap();
            let off = (s.addr - base) as usize;
            let b = &sec.data().unwrap()[off..off + arch.probe_site_len()];
            let jumps = b != arch.key_nop();
            if jumps {
                // The branch form computed in place (label in the same section).
                assert_eq!(b, &*arch.key_branch(s.addr, s.target).unwrap());
            }
            (s.likely, s.key, jumps)
        })
        .collect();
    (keys, sites)
}

#[test]
fn rust_module_with_a_kernel_key() {
    let dir = tempfile::tempdir().unwrap();
    let kl = kernel_loader();
    let input = module_build::rustc_module(dir.path(), "modk", MODULE, "modk.o", &kl);
    let out = dir.path().join("modk.k.o");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (keys, mut sites) = module_keys(&std::fs::read(&out).unwrap());
    assert_eq!(
        keys,
        [
            ("KERNEL_KEY".to_string(), false, true),
            ("modk::MODKEY".to_string(), true, false)
        ]
    );
    sites.sort();
    // The imported key's likely site stays NOP; MODKEY's unlikely site jumps.
    assert_eq!(sites, [(false, 1, true), (true, 0, false)]);
    let c = run(Command::new(KSITES).arg("check-module").arg(&out));
    assert!(
        c.status.success()
            && text(&c.stdout).contains(", 2 keys (1 imported), 2 key sites\n")
            && text(&c.stdout).contains("KERNEL_KEY"),
        "{}{}",
        text(&c.stdout),
        text(&c.stderr)
    );
}

/// C with `ksites_key.h`: 12 as compiled (every site falls through), 5 after `embed`.
const C_PROGRAM: &str = r#"
#include "ksites_key.h"
struct cell { unsigned long m, o, s; };
__attribute__((used)) struct cell CELL = { MAGIC, 0, 0 };
KSITES_STATIC_KEY_TRUE(c_on);
KSITES_STATIC_KEY_FALSE(c_off);
__attribute__((noinline)) int unlikely_on(void) { return KSITES_STATIC_BRANCH_UNLIKELY(c_on); }
__attribute__((noinline)) int unlikely_off(void) { return KSITES_STATIC_BRANCH(c_off); }
__attribute__((noinline)) int likely_on(void) { return KSITES_STATIC_BRANCH_LIKELY(c_on); }
__attribute__((noinline)) int likely_off(void) { return KSITES_STATIC_BRANCH_LIKELY(c_off); }
int main(void) { return unlikely_on() + 2 * unlikely_off() + 4 * likely_on() + 8 * likely_off(); }
"#;

#[test]
fn c_program_with_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("p.c");
    let src = C_PROGRAM
        .replace("CELL", kernel_loader::cell::CELL_SYMBOL)
        .replace(
            "MAGIC",
            &format!("{:#x}UL", kernel_loader::cell::CELL_MAGIC),
        );
    std::fs::write(&c, src).unwrap();
    let exe = dir.path().join("p");
    let o = run(Command::new("gcc")
        .args(["-O2", "-fno-pic", "-no-pie", "-static", "-Wl,--emit-relocs"])
        .arg(format!("-I{}", header_dir()))
        .arg(&c)
        .arg("-o")
        .arg(&exe));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(run(&mut Command::new(&exe)).status.code(), Some(12));
    let out = dir.path().join("p.k");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&exe)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(", 2 keys, 4 key sites (2 starting as jumps)"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(run(&mut Command::new(&out)).status.code(), Some(5));
    let v = run(Command::new(KSITES).arg("verify").arg(&out));
    assert!(v.status.success(), "{}", text(&v.stdout));
}

/// The header's records in C modules of every architecture: a key of the module's and
/// a kernel key (`extern`).
#[test]
fn c_modules_with_the_header() {
    let src = r#"
#include "ksites_key.h"
KSITES_STATIC_KEY_TRUE(m_on);
extern struct ksites_static_key kernel_key;
int a(void) { return KSITES_STATIC_BRANCH_UNLIKELY(m_on) ? 7 : 1; }
int b(void) { return KSITES_STATIC_BRANCH_LIKELY(m_on) ? 7 : 1; }
int c(void) { return KSITES_STATIC_BRANCH_UNLIKELY(kernel_key) ? 3 : 4; }
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.c"), src).unwrap();
    for (gcc, extra) in [
        ("gcc", &["-mcmodel=kernel"][..]),
        ("aarch64-linux-gnu-gcc", &["-mgeneral-regs-only"][..]),
        (
            "riscv64-linux-gnu-gcc",
            &["-mno-relax", "-mcmodel=medany"][..],
        ),
    ] {
        let obj = dir.path().join(format!("{gcc}.o"));
        let o = run(Command::new(gcc)
            .args(["-c", "-O2", "-fno-pic", "-ffreestanding"])
            .args(extra)
            .arg(format!("-I{}", header_dir()))
            .arg(dir.path().join("m.c"))
            .arg("-o")
            .arg(&obj));
        assert!(o.status.success(), "{gcc}: {}", text(&o.stderr));
        let out = dir.path().join(format!("{gcc}.k.o"));
        let o = run(Command::new(KSITES)
            .arg("embed")
            .arg(&obj)
            .arg("-o")
            .arg(&out));
        assert!(o.status.success(), "{gcc}: {}", text(&o.stderr));
        let (keys, mut sites) = module_keys(&std::fs::read(&out).unwrap());
        assert_eq!(
            keys,
            [
                ("kernel_key".to_string(), false, true),
                ("m_on".to_string(), true, false)
            ],
            "{gcc}"
        );
        sites.sort();
        assert_eq!(
            sites,
            [(false, 0, false), (false, 1, true), (true, 1, false)],
            "{gcc}"
        );
        // The module's own symbols are untouched: `m_on` is still defined.
        let data = std::fs::read(&out).unwrap();
        let f = ElfFile64::<LE>::parse(&*data).unwrap();
        assert!(
            f.symbols()
                .any(|s| s.name() == Ok("m_on") && !s.is_undefined())
        );
    }
}
