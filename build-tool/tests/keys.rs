//! Static keys through the build tool: `.ksites_key_sites` records and `StaticKey`
//! objects (the contract's bytes, written by hand in assembly, by gcc's `asm goto` and
//! by rustc's `asm!` with a `label`) in images linked by GNU ld and lld (static and
//! PIE) and in ET_REL modules (a key the module defines, a kernel key it imports).
//! Checked: the table's key sub-tables (parsed with the loader's reader), the initial
//! forms `embed` writes (a program run before and after `embed` takes each key's
//! default path only after), `inspect`'s and `verify`'s listings, and every refusal.

mod common;
#[path = "common/keys_fixture.rs"]
mod keys_fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::format::{SECTION_NAME, Table};
use keys_fixture::{Arch, Site, X86_64, fixture, sites_of};
use ksites::elf::Image;
use object::{Object, ObjectSection, ObjectSymbol};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ksites(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    run(Command::new(KSITES).args(args.iter().map(|a| a.as_ref())))
}

/// Assembles and links `src` with `flags` into `dir/name`.
fn link(dir: &Path, name: &str, a: &Arch, src: &str, flags: &[&str]) -> PathBuf {
    let s = dir.join(format!("{name}.s"));
    std::fs::write(&s, src).unwrap();
    let out = dir.join(name);
    let o = run(Command::new(a.gcc)
        .args(["-nostdlib", "-Wl,--emit-relocs"])
        .args(flags)
        .arg(&s)
        .arg("-o")
        .arg(&out));
    assert!(
        o.status.success(),
        "{} {flags:?}: {}",
        a.gcc,
        text(&o.stderr)
    );
    out
}

/// `embed` must refuse `input` (exit 1) with a message containing every one of
/// `needles`, and write no output.
fn refused(input: &Path, needles: &[&str]) {
    let out = input.with_extension("k");
    let o = ksites(&[&"embed", &input, &"-o", &out]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}: {err}", input.display());
    for n in needles {
        assert!(err.contains(n), "{}: `{n}` not in: {err}", input.display());
    }
    assert!(!out.exists(), "{}: output written", input.display());
}

/// The table of a linked image, and the image.
fn table_of(data: &[u8]) -> (Image<'_>, Table<'_>) {
    let img = Image::parse("out", data).unwrap();
    let sec = img.section_by_name(SECTION_NAME).expect(".ksites");
    let t = Table::parse(sec.data().unwrap(), sec.address(), &img.exec_ranges()).unwrap();
    (img, t)
}

fn sym(img: &Image<'_>, name: &str) -> u64 {
    img.file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name}"))
        .address()
}

/// Embeds the fixture linked with `flags` and checks everything a user relies on: the
/// input unchanged, the table's keys and sites, each site's bytes (the branch form
/// exactly where the key's default differs from the site's likeliness), `inspect` and
/// `verify`; then that `verify` catches a site put back to its NOP, and that a second
/// `embed` exits 3.
fn linked_image_round_trip(a: &Arch, name: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = link(dir.path(), name, a, &fixture(a, false), flags);
    let before = std::fs::read(&input).unwrap();
    let out = dir.path().join(format!("{name}.k"));
    let o = ksites(&[&"embed", &input, &"-o", &out]);
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(", 2 keys, 5 key sites (3 starting as jumps); table at"),
        "{name}: {}",
        text(&o.stdout)
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "{name}: input changed"
    );

    let data = std::fs::read(&out).unwrap();
    let (img, t) = table_of(&data);
    assert_eq!(t.version(), 2);
    let keys: Vec<(String, bool, bool)> = t
        .keys()
        .map(|k| (k.name.to_string(), k.default, k.imported))
        .collect();
    assert_eq!(
        keys,
        [
            ("test::OFF".to_string(), false, false),
            ("test::ON".to_string(), true, false)
        ],
        "{name}"
    );
    let key_addr: Vec<u64> = t.keys().map(|k| k.addr).collect();
    assert_eq!(
        key_addr,
        [sym(&img, "key_off"), sym(&img, "key_on")],
        "{name}"
    );
    let want: Vec<(u64, u64, bool, u32)> = sites_of(false)
        .iter()
        .map(|s| (sym(&img, s.site), sym(&img, s.label), s.likely, s.index))
        .collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    let found: Vec<(u64, u64, bool, u32)> = t
        .key_sites()
        .map(|s| (s.addr, s.target, s.likely, s.key))
        .collect();
    assert_eq!(found, want_sorted, "{name}");
    for (s, &(addr, label, _, _)) in sites_of(false).iter().zip(&want) {
        let got = img.read_va(addr, a.site_len).unwrap();
        let expect = if s.jumps() {
            (a.branch)(addr, label)
        } else {
            a.nop.to_vec()
        };
        assert_eq!(got, &expect[..], "{name}: site {} ({:#x})", s.site, addr);
        assert_eq!(
            Image::parse("in", &before)
                .unwrap()
                .read_va(addr, a.site_len)
                .unwrap(),
            a.nop,
            "{name}: input site {}",
            s.site
        );
    }

    // inspect lists the keys and each site's form; verify agrees with the file.
    let o = ksites(&[&"inspect", &out]);
    let listing = text(&o.stdout);
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    assert!(listing.contains(", 2 keys, 5 key sites\n"), "{listing}");
    assert!(
        listing.contains("key test::OFF default=false imported=no sites=2\n"),
        "{listing}"
    );
    assert!(
        listing.contains("key test::ON default=true imported=no sites=3\n"),
        "{listing}"
    );
    let s2 = sym(&img, "s2");
    assert!(
        listing.contains(&format!(
            "  site {s2:#x} unlikely f2 label={:#x} form=jump\n",
            sym(&img, "l2")
        )),
        "{listing}"
    );
    let s3 = sym(&img, "s3");
    assert!(
        listing.contains(&format!("  site {s3:#x} likely f2+")) && listing.contains("form=nop"),
        "{listing}"
    );
    let json = ksites(&[&"inspect", &"--json", &out]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["keys"][1]["name"], "test::ON");
    assert_eq!(v["keys"][1]["default"], true);
    assert_eq!(v["keys"][1]["sites"][0]["form"], "jump");
    // Before embedding, inspect lists what embed would record (every site a NOP).
    let o = ksites(&[&"inspect", &input]);
    assert!(
        text(&o.stdout).contains("key test::ON default=true imported=no sites=3\n")
            && !text(&o.stdout).contains("form=jump"),
        "{}",
        text(&o.stdout)
    );
    let o = ksites(&[&"verify", &out]);
    assert!(
        o.status.success()
            && text(&o.stdout).contains("ok (0 ifunc sites, 0 probe sites, 5 key sites)"),
        "{name}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );

    // A site put back to its NOP: verify names it, its key and what it expected.
    let mut bad = data.clone();
    let at = img.va_to_file_offset(s2, a.site_len).unwrap() as usize;
    bad[at..at + a.nop.len()].copy_from_slice(a.nop);
    let bad_path = dir.path().join(format!("{name}.bad"));
    std::fs::write(&bad_path, &bad).unwrap();
    let o = ksites(&[&"verify", &bad_path]);
    assert_eq!(o.status.code(), Some(4), "{name}: {}", text(&o.stdout));
    assert!(
        text(&o.stdout)
            .contains("(f2) (key test::ON, unlikely, default true): expected jump, found nop"),
        "{name}: {}",
        text(&o.stdout)
    );
    // Embedding the output again: exit 3, nothing written.
    let again = dir.path().join(format!("{name}.k2"));
    let o = ksites(&[&"embed", &out, &"-o", &again]);
    assert_eq!(o.status.code(), Some(3), "{name}: {}", text(&o.stderr));
    assert!(!again.exists());
}

#[test]
fn gnu_ld_static_image() {
    linked_image_round_trip(&X86_64, "bfd", &["-static", "-no-pie"]);
}

#[test]
fn lld_static_pie_image() {
    // lld leaves the records' pointers zero in a PIE: they are read from their
    // RELATIVE relocations, the key objects' name pointers too.
    let lld = common::toolchain::lld_flags();
    let mut flags = vec!["-static-pie"];
    flags.extend(lld.iter().map(String::as_str));
    linked_image_round_trip(&X86_64, "lld-pie", &flags);
}

#[test]
fn gnu_ld_static_pie_image() {
    linked_image_round_trip(&X86_64, "bfd-pie", &["-static-pie"]);
}

#[test]
fn aarch64_images() {
    let a = &keys_fixture::AARCH64;
    linked_image_round_trip(a, "a64-bfd", &["-static"]);
    let lld = common::toolchain::lld_flags();
    let mut flags = vec!["-static"];
    flags.extend(lld.iter().map(String::as_str));
    linked_image_round_trip(a, "a64-lld", &flags);
}

#[test]
fn riscv64_images() {
    let a = &keys_fixture::RISCV64;
    linked_image_round_trip(a, "rv-bfd", &["-static"]);
    let lld = common::toolchain::lld_flags();
    let mut flags = vec!["-static"];
    flags.extend(lld.iter().map(String::as_str));
    linked_image_round_trip(a, "rv-lld", &flags);
}

/// Every refusal names the site (function and offset) and its key; nothing is
/// written.
#[test]
fn bad_sites_and_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = &X86_64;
    let good = fixture(a, false);
    let case = |name: &str, from: &str, to: &str, needles: &[&str]| {
        assert!(good.contains(from), "{name}: fixture lacks {from}");
        let src = good.replacen(from, to, 1);
        let input = link(dir.path(), name, a, &src, &["-static", "-no-pie"]);
        refused(&input, needles);
    };
    case(
        "not-nop",
        "s1: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
        "s1: .byte 0x90, 0x90, 0x90, 0x90, 0x90",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "(key test::OFF)",
            "holds [90, 90, 90, 90, 90], expected the 5-byte NOP",
        ],
    );
    case(
        "label-in-data",
        ".quad s1, l1, key_off",
        ".quad s1, name_off, key_off",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "(key test::OFF)",
            "is not in an executable section",
        ],
    );
    case(
        "label-in-other-function",
        ".quad s1, l1, key_off",
        ".quad s1, l2, key_off",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "(key test::OFF)",
            "is in function f2, not in the site's function _start",
        ],
    );
    case(
        "bad-key-magic",
        "key_off: .long 0x594b534b",
        "key_off: .long 0x594b5300",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "not a StaticKey (magic 0x594b5300",
        ],
    );
    case(
        "bad-default",
        "key_off: .long 0x594b534b, 0",
        "key_off: .long 0x594b534b, 2",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "default state 2, expected 0 or 1",
        ],
    );
    case(
        "bad-flags",
        ".long 0x534b534b, 0\n    .quad s1",
        ".long 0x534b534b, 6\n    .quad s1",
        &[".ksites_key_sites+0x0: key site record flags 0x6"],
    );
    case(
        "bad-record-magic",
        ".long 0x534b534b, 0\n    .quad s1",
        ".long 0x534b5300, 0\n    .quad s1",
        &[".ksites_key_sites+0x0: bad key site record magic 0x534b5300"],
    );
    case(
        "duplicate-record",
        ".quad s1, l1, key_off",
        ".quad s1, l1, key_off\n    .long 0x534b534b, 0\n    .quad s1, l1, key_off",
        &["key sites at _start and _start overlap"],
    );
    case(
        "null-key",
        ".quad s1, l1, key_off",
        ".quad s1, l1, 0",
        &[
            "key site _start (.ksites_key_sites+0x0)",
            "its key pointer is 0",
        ],
    );
}

/// An image with static keys needs the table cell, as one with ifuncs or probes does.
#[test]
fn image_without_a_cell_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixture(&X86_64, false);
    let src = &good[..good.find("    .section .data.cell").unwrap()];
    let input = link(dir.path(), "no-cell", &X86_64, src, &["-static", "-no-pie"]);
    refused(
        &input,
        &["has ifuncs, probes or static keys but no `__ksites_table_cell` symbol"],
    );
}

/// riscv64: a key site must be 4-aligned, like a probe site.
#[test]
fn riscv64_misaligned_site_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = &keys_fixture::RISCV64;
    let good = fixture(a, false);
    let from = "    .p2align 2\ns1: nop";
    assert!(good.contains(from));
    let src = good.replacen(
        from,
        "    .option rvc\n    c.nop\n    .option norvc\ns1: nop",
        1,
    );
    let input = link(dir.path(), "rv-misaligned", a, &src, &["-static"]);
    refused(
        &input,
        &["key site _start+0x2", "(key test::OFF)", "not 4-aligned"],
    );
}

/// What `Site::jumps` says, for the fixture: default != likely.
#[test]
fn fixture_semantics() {
    let s: Vec<(&str, bool)> = sites_of(true).iter().map(|s| (s.site, s.jumps())).collect();
    assert_eq!(
        s,
        [
            ("s1", false),
            ("s2", true),
            ("s3", false),
            ("s4", true),
            ("s6", true),
            ("s5", false)
        ]
    );
    let _: &Site = &sites_of(false)[0];
}

/// A C program (gcc `asm goto`, the contract's record and `struct ksites_static_key`
/// written out): its exit status says which way each of four sites went. Compiled,
/// every site falls through (12: the unlikely ones false, the likely ones true); after
/// `embed`, each site is in its key's default state (5: `c_on` enabled, `c_off` not).
const C_PROGRAM: &str = r#"
struct ksites_static_key { unsigned magic, dflt; const char *name; unsigned long len; unsigned count, reserved; };
struct cell { unsigned long m, o, s; };
__attribute__((used)) struct cell CELL = { MAGIC, 0, 0 };
struct ksites_static_key key_on = { 0x594b534b, 1, "c_on", 4, 1, 0 };
struct ksites_static_key key_off = { 0x594b534b, 0, "c_off", 5, 0, 0 };
#define BRANCH(key, likely, label) \
    asm goto("1: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n" \
             ".pushsection .ksites_key_sites,\"awR\",@progbits\n.balign 8\n" \
             ".long 0x534b534b, " #likely "\n.quad 1b, %l[" #label "], " #key "\n.popsection" \
             :::: label)
__attribute__((noinline)) int unlikely_on(void) { BRANCH(key_on, 0, yes); return 0; yes: return 1; }
__attribute__((noinline)) int unlikely_off(void) { BRANCH(key_off, 0, yes); return 0; yes: return 1; }
__attribute__((noinline)) int likely_on(void) { BRANCH(key_on, 1, no); return 1; no: return 0; }
__attribute__((noinline)) int likely_off(void) { BRANCH(key_off, 1, no); return 1; no: return 0; }
int main(void) { return unlikely_on() + 2 * unlikely_off() + 4 * likely_on() + 8 * likely_off(); }
"#;

fn c_program_boots_in_each_keys_default_state(name: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join(format!("{name}.c"));
    let src = C_PROGRAM
        .replace("CELL", kernel_loader::cell::CELL_SYMBOL)
        .replace(
            "MAGIC",
            &format!("{:#x}UL", kernel_loader::cell::CELL_MAGIC),
        );
    std::fs::write(&c, src).unwrap();
    let exe = dir.path().join(name);
    let o = run(Command::new("gcc")
        .args(["-O2", "-Wl,--emit-relocs"])
        .args(flags)
        .arg(&c)
        .arg("-o")
        .arg(&exe));
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    assert_eq!(
        run(&mut Command::new(&exe)).status.code(),
        Some(12),
        "{name}: before"
    );
    let out = dir.path().join(format!("{name}.k"));
    let o = ksites(&[&"embed", &exe, &"-o", &out]);
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(", 2 keys, 4 key sites (2 starting as jumps)"),
        "{name}: {}",
        text(&o.stdout)
    );
    assert_eq!(
        run(&mut Command::new(&out)).status.code(),
        Some(5),
        "{name}: after"
    );
    let o = ksites(&[&"verify", &out]);
    assert!(
        o.status.success() && text(&o.stdout).contains(", 4 key sites)"),
        "{name}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let o = ksites(&[&"inspect", &out]);
    let l = text(&o.stdout);
    assert!(
        l.contains("key c_off default=false imported=no sites=2\n")
            && l.contains("key c_on default=true imported=no sites=2\n")
            && l.contains(" unlikely unlikely_on label=")
            && l.matches("form=jump").count() == 2,
        "{name}: {l}"
    );
}

#[test]
fn gcc_asm_goto_program_static() {
    c_program_boots_in_each_keys_default_state("c-static", &["-static"]);
}

#[test]
fn gcc_asm_goto_program_lld_static_pie() {
    let lld = common::toolchain::lld_flags();
    let mut flags = vec!["-static-pie"];
    flags.extend(lld.iter().map(String::as_str));
    c_program_boots_in_each_keys_default_state("c-lld-pie", &flags);
}

/// An image embedded by a tool that wrote format v1 (the corpus keeps one) is still
/// listed and verified: no keys, its version said.
#[test]
fn v1_tables_are_still_read() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/elf/13-already-embedded");
    let data = std::fs::read(&f).unwrap();
    let (_, t) = table_of(&data);
    assert_eq!((t.version(), t.key_count(), t.key_site_count()), (1, 0, 0));
    let o = ksites(&[&"inspect", &f]);
    assert!(
        text(&o.stdout).contains(".ksites table v1 at ")
            && text(&o.stdout).contains(" 0 keys, 0 key sites\n"),
        "{}",
        text(&o.stdout)
    );
    let o = ksites(&[&"verify", &f]);
    assert!(
        o.status.success() && text(&o.stdout).contains("ok (1 ifunc sites, 0 probe sites)\n"),
        "{}",
        text(&o.stdout)
    );
}
