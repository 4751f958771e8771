//! Static keys in ET_REL modules: the fixture of `tests/keys.rs` assembled with `-c`
//! (x86-64, aarch64, riscv64), with a site of a kernel key the module imports (an
//! undefined symbol), and a rustc object whose sites come from `asm!` with a `label`.
//! The table is read as the module loader will see it (`.rela.ksites` applied at the
//! layout contract) and each site's bytes and relocations are checked.

#[path = "common/keys_fixture.rs"]
mod keys_fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::format::Table;
use keys_fixture::{AARCH64, Arch, RISCV64, X86_64, fixture, sites_of};
use ksites::embed_rel::{VirtualLayout, relocated_table};
use object::read::elf::ElfFile64;
use object::{
    LittleEndian as LE, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn embed(input: &Path, out: &Path) -> Output {
    run(Command::new(KSITES)
        .arg("embed")
        .arg(input)
        .arg("-o")
        .arg(out))
}

/// The relocated table of an embedded module, and its layout.
fn table(file: &ElfFile64<'_, LE>) -> (Vec<u8>, u64, VirtualLayout) {
    let layout = VirtualLayout::new(file, 0x1000).unwrap();
    let target =
        ksites::target::Target::from_machine(file.elf_header().e_machine.get(LE).0).unwrap();
    let (bytes, addr) = relocated_table(target, file, &layout).unwrap();
    (bytes, addr, layout)
}

/// (section index, offset) of a symbol of the object.
fn sym(file: &ElfFile64<'_, LE>, name: &str) -> (usize, u64) {
    let s = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name}"));
    (s.section_index().map_or(0, |i| i.0), s.address())
}

fn module_round_trip(a: &Arch, name: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join(format!("{name}.s"));
    std::fs::write(&s, fixture(a, true)).unwrap();
    let input = dir.path().join(format!("{name}.o"));
    let o = run(Command::new(a.gcc)
        .arg("-c")
        .args(flags)
        .arg(&s)
        .arg("-o")
        .arg(&input));
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    let out = dir.path().join(format!("{name}.k.o"));
    let o = embed(&input, &out);
    assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(", 3 keys, 6 key sites (3 starting as jumps); table in .ksites"),
        "{name}: {}",
        text(&o.stdout)
    );
    let data = std::fs::read(&out).unwrap();
    let file = ElfFile64::<LE>::parse(&*data).unwrap();
    let (bytes, addr, layout) = table(&file);
    let t = Table::parse(&bytes, addr, &layout.exec).unwrap();
    let at = |name: &str| {
        let (sec, off) = sym(&file, name);
        layout.sections[sec].unwrap() + off
    };
    let keys: Vec<(String, bool, bool, u64)> = t
        .keys()
        .map(|k| (k.name.to_string(), k.default, k.imported, k.addr))
        .collect();
    let kernel_key = file
        .symbols()
        .find(|s| s.name() == Ok("kernel_key"))
        .unwrap();
    assert!(kernel_key.is_undefined());
    assert_eq!(
        keys,
        [
            (
                "kernel_key".to_string(),
                false,
                true,
                layout.undefined[&kernel_key.index().0]
            ),
            ("test::OFF".to_string(), false, false, at("key_off")),
            ("test::ON".to_string(), true, false, at("key_on")),
        ],
        "{name}"
    );
    let mut want: Vec<(u64, u64, bool, u32)> = sites_of(true)
        .iter()
        .map(|s| (at(s.site), at(s.label), s.likely, s.index))
        .collect();
    want.sort();
    let found: Vec<(u64, u64, bool, u32)> = t
        .key_sites()
        .map(|s| (s.addr, s.target, s.likely, s.key))
        .collect();
    assert_eq!(found, want, "{name}");

    // Each site's bytes in its section: the NOP, or the branch to its label (computed
    // in place when the label is in the same section, else a zero branch and a branch
    // relocation to the label).
    for s in sites_of(true) {
        let (sec, off) = sym(&file, s.site);
        let (lsec, loff) = sym(&file, s.label);
        let section = file.section_by_index(object::SectionIndex(sec)).unwrap();
        let got = &section.data().unwrap()[off as usize..(off + a.site_len) as usize];
        let relocs: Vec<_> = section
            .relocations()
            .filter(|(r, _)| (off..off + a.site_len).contains(r))
            .collect();
        if !s.jumps() {
            assert_eq!(got, a.nop, "{name}: {}", s.site);
            assert!(relocs.is_empty(), "{name}: {}", s.site);
        } else if sec == lsec {
            assert_eq!(got, &(a.branch)(off, loff)[..], "{name}: {}", s.site);
            assert!(relocs.is_empty(), "{name}: {}", s.site);
        } else {
            // The zero branch: a branch to its own field's end (x86-64) or to itself.
            let field = if a.site_len == 5 { off + 1 } else { off };
            let bias = if a.site_len == 5 { 4 } else { 0 };
            assert_eq!(
                got,
                &(a.branch)(off, field + bias)[..],
                "{name}: {}",
                s.site
            );
            assert_eq!(relocs.len(), 1, "{name}: {}", s.site);
            let (r_off, r) = &relocs[0];
            assert_eq!(*r_off, field, "{name}");
            let RelocationTarget::Symbol(i) = r.target() else {
                panic!("{name}: relocation without a symbol")
            };
            let rs = file.symbol_by_index(i).unwrap();
            let base = layout.sections[rs.section_index().unwrap().0].unwrap()
                + if rs.kind() == object::SymbolKind::Section {
                    0
                } else {
                    rs.address()
                };
            assert_eq!(
                base.wrapping_add_signed(r.addend() + bias as i64),
                at(s.label),
                "{name}: the relocated branch reaches its label"
            );
            let RelocationFlags::Elf { r_type } = r.flags() else {
                panic!()
            };
            let expect = match a.site_len {
                5 => object::elf::R_X86_64_PLT32,
                _ if a.gcc.starts_with("aarch64") => object::elf::R_AARCH64_JUMP26,
                _ => object::elf::R_RISCV_JAL,
            };
            assert_eq!(r_type.0, expect.0, "{name}");
        }
    }
    // The module loader, run on the host, loads it (the added branch relocation
    // applied); the imported key is a symbol the kernel must export, not an ifunc.
    let o = run(Command::new(KSITES).arg("check-module").arg(&out));
    assert!(
        o.status.success(),
        "{name}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        text(&o.stdout).contains(", 3 keys (1 imported), 6 key sites\n")
            && text(&o.stdout)
                .contains("needs from the kernel (not checked: no --kernel-symbols): kernel_key")
            && !text(&o.stdout).contains("not checked to be a kernel ifunc"),
        "{name}: {}",
        text(&o.stdout)
    );
    // Embedding the output again: exit 3.
    let again = dir.path().join(format!("{name}.k2.o"));
    let o = embed(&out, &again);
    assert_eq!(o.status.code(), Some(3), "{name}: {}", text(&o.stderr));
    // inspect and verify read linked images only, and say so.
    let o = run(Command::new(KSITES).arg("inspect").arg(&out));
    assert!(
        !o.status.success()
            && text(&o.stderr).contains("inspect and verify read linked images only"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn x86_64_module() {
    module_round_trip(&X86_64, "x86", &[]);
}

#[test]
fn aarch64_module() {
    module_round_trip(&AARCH64, "a64", &[]);
}

#[test]
fn riscv64_module() {
    module_round_trip(&RISCV64, "rv", &["-mno-relax"]);
}

/// A key whose undefined symbol carries an addend is no imported key: refused.
#[test]
fn imported_key_with_an_addend_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(&X86_64, true).replacen(", kernel_key\n", ", kernel_key + 8\n", 1);
    let s = dir.path().join("m.s");
    std::fs::write(&s, src).unwrap();
    let input = dir.path().join("m.o");
    assert!(
        run(Command::new("gcc").arg("-c").arg(&s).arg("-o").arg(&input))
            .status
            .success()
    );
    let out = dir.path().join("m.k.o");
    let o = embed(&input, &out);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("its key is the undefined symbol kernel_key with addend 8"),
        "{}",
        text(&o.stderr)
    );
    assert!(!out.exists());
}

/// A Rust module: the records and the `StaticKey` as a Rust crate writes them
/// (`asm!` with a `label`, a `#[repr(C)]` static holding a `&'static str`), one key
/// defined (default true) and one imported (`extern` static).
const RUST_MODULE: &str = r#"
#![no_std]
use core::sync::atomic::AtomicU32;
#[repr(C)]
pub struct StaticKey { magic: u32, default: u32, name: &'static str, count: AtomicU32, reserved: u32 }
#[unsafe(no_mangle)]
pub static RKEY: StaticKey = StaticKey {
    magic: u32::from_le_bytes(*b"KSKY"), default: 1, name: "rmod::RKEY",
    count: AtomicU32::new(1), reserved: 0,
};
unsafe extern "C" { static KERNEL_KEY: StaticKey; }
macro_rules! branch {
    ($k:path, $likely:literal) => {{
        let mut r = $likely != 0;
        // SAFETY: a NOP and a record; the label only sets `r`.
        unsafe {
            core::arch::asm!(
                "2: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                ".pushsection .ksites_key_sites,\"awR\",@progbits",
                ".balign 8",
                ".long 0x534b534b, {likely}",
                ".quad 2b, {l}, {k}",
                ".popsection",
                likely = const $likely,
                k = sym $k,
                l = label { r = $likely == 0; },
            );
        }
        r
    }};
}
#[unsafe(no_mangle)]
pub fn rust_unlikely() -> u32 { if branch!(RKEY, 0) { 7 } else { 1 } }
#[unsafe(no_mangle)]
pub fn rust_likely() -> u32 { if branch!(RKEY, 1) { 7 } else { 1 } }
#[unsafe(no_mangle)]
pub fn rust_imported() -> u32 { if branch!(KERNEL_KEY, 0) { 3 } else { 4 } }
"#;

fn rustc_object(dir: &Path) -> PathBuf {
    let src = dir.join("rmod.rs");
    std::fs::write(&src, RUST_MODULE).unwrap();
    let out = dir.join("rmod.o");
    let o = run(Command::new("rustc")
        .args([
            "--edition",
            "2024",
            "--crate-type=lib",
            "--crate-name",
            "rmod",
        ])
        .args(["--emit=obj", "-C", "panic=abort", "-C", "opt-level=2"])
        .args([
            "-C",
            "relocation-model=static",
            "--target",
            "x86_64-unknown-none",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "rustc: {}", text(&o.stderr));
    out
}

#[test]
fn rustc_module() {
    let dir = tempfile::tempdir().unwrap();
    let input = rustc_object(dir.path());
    let out = dir.path().join("rmod.k.o");
    let o = embed(&input, &out);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(", 2 keys, 3 key sites (1 starting as jumps)"),
        "{}",
        text(&o.stdout)
    );
    let data = std::fs::read(&out).unwrap();
    let file = ElfFile64::<LE>::parse(&*data).unwrap();
    let (bytes, addr, layout) = table(&file);
    let t = Table::parse(&bytes, addr, &layout.exec).unwrap();
    let keys: Vec<(String, bool, bool)> = t
        .keys()
        .map(|k| (k.name.to_string(), k.default, k.imported))
        .collect();
    assert_eq!(
        keys,
        [
            ("KERNEL_KEY".to_string(), false, true),
            ("rmod::RKEY".to_string(), true, false)
        ]
    );
    // Each site lies in its function; the unlikely site of RKEY (default true) jumps
    // to its label, in the same section (rustc's `.text.<fn>`).
    let func = |name: &str| {
        let (sec, off) = sym(&file, name);
        let size = file
            .symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap()
            .size();
        (sec, layout.sections[sec].unwrap() + off, size)
    };
    let mut seen = Vec::new();
    for s in t.key_sites() {
        let (fname, (sec, start, size)) = ["rust_unlikely", "rust_likely", "rust_imported"]
            .into_iter()
            .map(|f| (f, func(f)))
            .find(|(_, (_, start, size))| (*start..start + size).contains(&s.addr))
            .expect("site in one of the functions");
        assert!((start..start + size).contains(&s.target), "{fname}: label");
        let key = t.key(s.key).unwrap();
        seen.push((fname, key.name.to_string(), s.likely));
        let section = file.section_by_index(object::SectionIndex(sec)).unwrap();
        let off = (s.addr - layout.sections[sec].unwrap()) as usize;
        let got = &section.data().unwrap()[off..off + 5];
        let jumps = !key.imported && key.default != s.likely;
        let want = if jumps {
            X86_64.branch.to_owned()(s.addr, s.target)
        } else {
            X86_64.nop.to_vec()
        };
        assert_eq!(got, &want[..], "{fname}");
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("rust_imported", "KERNEL_KEY".to_string(), false),
            ("rust_likely", "rmod::RKEY".to_string(), true),
            ("rust_unlikely", "rmod::RKEY".to_string(), false)
        ]
    );
}

/// A module's bad sites and keys are refused as an image's are, naming the site.
#[test]
fn bad_module_sites_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixture(&X86_64, true);
    for (name, from, to, needle) in [
        (
            "not-nop",
            "s2: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
            "s2: .byte 0x90, 0x90, 0x90, 0x90, 0x90",
            "key site .text+0xe (f2) (.ksites_key_sites+0x20) (key test::ON): holds [90, 90, 90, 90, 90]",
        ),
        (
            "label-in-data",
            ".quad s2, l2, key_on",
            ".quad s2, name_on, key_on",
            "(key test::ON): its label .rodata+0x9",
        ),
        (
            "bad-key-magic",
            "key_on: .long 0x594b534b",
            "key_on: .long 0x594b5300",
            "not a StaticKey (magic 0x594b5300",
        ),
        (
            "label-in-other-function",
            ".quad s2, l2, key_on",
            ".quad s2, l5, key_on",
            "is in function f3, not in the site's function f2",
        ),
    ] {
        assert!(good.contains(from), "{name}");
        let s = dir.path().join(format!("{name}.s"));
        std::fs::write(&s, good.replacen(from, to, 1)).unwrap();
        let input = dir.path().join(format!("{name}.o"));
        assert!(
            run(Command::new("gcc").arg("-c").arg(&s).arg("-o").arg(&input))
                .status
                .success()
        );
        let out = dir.path().join(format!("{name}.k.o"));
        let o = embed(&input, &out);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{name}: {}",
            text(&o.stderr)
        );
        assert!(!out.exists(), "{name}");
    }
}
