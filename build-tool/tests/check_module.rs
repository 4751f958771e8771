//! `ksites check-module`: a gcc module embedded by `ksites embed`, checked against a
//! System.map and against a real linked "kernel" ELF (gcc + ld), with the exit status
//! and the problems it lists.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/module_mem.rs"]
mod module_mem;
use module_mem::HostMemory;

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

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

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("check_module_{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gcc(dir: &Path, src: &str, out: &str, extra: &[&str]) -> PathBuf {
    std::fs::write(dir.join(format!("{out}.c")), src).unwrap();
    let o = run(Command::new("gcc")
        .args([
            "-O2",
            "-fno-pic",
            "-fno-common",
            "-ffreestanding",
            "-fcf-protection=none",
            "-I",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c"))
        .args(extra)
        .arg(format!("{out}.c"))
        .args(["-o", out])
        .current_dir(dir));
    assert!(o.status.success(), "gcc: {}", text(&o));
    dir.join(out)
}

const MODULE: &str = r#"
#include "ksites_module.h"
#include "ksites_sdt.h"
extern unsigned kernel_popcount(unsigned long);
KSITES_IFUNC_IMPORT(kernel_popcount);
extern void kernel_log(int);
KSITES_PROBE_DECL(mod, ev, 1, (unsigned long x))
unsigned long total;
unsigned long *total_p = &total;
unsigned mod_count(unsigned long x) {
    KSITES_PROBE(mod, ev, x);
    kernel_log((int)x);
    return kernel_popcount(x) + kernel_popcount(x >> 1);
}
int ksites_module_init(void) { total = 1; return 0; }
"#;

/// A module object, embedded.
fn module(dir: &Path) -> PathBuf {
    let o = gcc(dir, MODULE, "mod.o", &["-c", "-mcmodel=kernel"]);
    let out = dir.join("mod.ko");
    let r = run(Command::new(KSITES)
        .arg("embed")
        .arg(&o)
        .arg("-o")
        .arg(&out));
    assert!(r.status.success(), "embed: {}", text(&r));
    out
}

fn check(module: &Path, extra: &[&str]) -> Output {
    run(Command::new(KSITES)
        .arg("check-module")
        .arg(module)
        .args(extra))
}

#[test]
fn system_map_lists_every_unresolved_symbol() {
    let d = tmpdir("map");
    let m = module(&d);
    // Nothing exported but the probe stubs: both kernel functions are missing.
    std::fs::write(
        d.join("System.map"),
        "ffffffff81000000 T ksites_probe_c_entry\n\
         ffffffff81000010 T ksites_probe_ret0\n\
         ffffffff81000020 T ksites_probe_ret1\n\
         ffffffff81000030 t local_helper\n",
    )
    .unwrap();
    let o = check(
        &m,
        &["--kernel-symbols", d.join("System.map").to_str().unwrap()],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("would NOT load"), "{t}");
    assert!(t.contains("unknown symbol `kernel_popcount`"), "{t}");
    assert!(t.contains("unknown symbol `kernel_log`"), "{t}");
    assert!(
        t.contains("unresolved symbols: kernel_popcount, kernel_log")
            || t.contains("unresolved symbols: kernel_log, kernel_popcount"),
        "{t}"
    );

    // With them exported (as functions near the stubs) it would load.
    std::fs::write(
        d.join("ok.map"),
        "ffffffff81000000 T ksites_probe_c_entry\n\
         ffffffff81000010 T ksites_probe_ret0\n\
         ffffffff81000020 T ksites_probe_ret1\n\
         ffffffff81000100 T kernel_popcount\n\
         ffffffff81000200 T kernel_log\n",
    )
    .unwrap();
    let o = check(
        &m,
        &[
            "--kernel-symbols",
            d.join("ok.map").to_str().unwrap(),
            "--json",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["loads"], true, "{t}");
    assert_eq!(v["report"]["imports"], 1, "{t}");
    assert_eq!(v["report"]["sites"], 2, "{t}");
    assert_eq!(v["report"]["probes"], 1, "{t}");
    // The map has no kernel table, so imports are checked only for their form; the
    // module lands at the first 2 MiB boundary past the last text symbol.
    assert_eq!(v["address"], 0xffff_ffff_8120_0000u64, "{t}");

    // Laid out 4 GiB away, its rel32 calls into the kernel cannot reach.
    let o = check(
        &m,
        &[
            "--kernel-symbols",
            d.join("ok.map").to_str().unwrap(),
            "--load-address",
            "0xffffffff00000000",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("overflows"), "{t}");
    assert!(
        t.contains("R_X86_64_PLT32") || t.contains("R_X86_64_PC32"),
        "{t}"
    );
}

#[test]
fn elf_kernel_checks_imports_against_its_symbols_and_text() {
    let d = tmpdir("elf");
    let m = module(&d);
    // A small static "kernel" whose exported functions are the ones the module needs.
    let k = gcc(
        &d,
        "unsigned kernel_popcount(unsigned long x) { return (unsigned)(x & 0xff); }\n\
         void kernel_log(int x) { (void)x; }\n\
         void ksites_probe_c_entry(void) {}\n\
         int ksites_probe_ret0(void) { return 0; }\n\
         int ksites_probe_ret1(void) { return 1; }\n\
         void _start(void) { for (;;) {} }\n",
        "kernel",
        &["-nostdlib", "-static", "-Wl,-Ttext=0x200000"],
    );
    let o = check(&m, &["--kernel-symbols", k.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("would load at 0x400000"), "{t}");
    assert!(t.contains("1 imported ifuncs, 2 ifunc sites"), "{t}");

    // Without a kernel, the undefined symbols are listed, not judged.
    let o = check(&m, &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("needs from the kernel (not checked"), "{t}");
    assert!(
        t.contains("kernel_popcount") && t.contains("kernel_log"),
        "{t}"
    );

    // A linked image is not a module: malformed input (1), not "would not load" (4).
    let o = check(&k, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("a linked executable (ET_EXEC), not a module"));
}

#[test]
fn a_module_without_sites_loads_from_any_buffer_alignment() {
    // A module with nothing to patch gets an empty `.rela.ksites`; the loader must read
    // it (and every header) from bytes at any alignment, as `include_bytes!` gives them.
    // (kernel-loader enables `object`'s `unaligned` feature for this; on the host,
    // build-tool enables it too, so this guards the host path and the empty section.)
    let d = tmpdir("align");
    let o = gcc(
        &d,
        "int counter;\nint bump(int x) { return counter += x; }\n",
        "plain.o",
        &["-c", "-mcmodel=kernel"],
    );
    let ko = d.join("plain.ko");
    let r = run(Command::new(KSITES).arg("embed").arg(&o).arg("-o").arg(&ko));
    assert!(r.status.success(), "embed: {}", text(&r));
    let bytes = std::fs::read(&ko).unwrap();
    for shift in 0..8 {
        let mut buf = vec![0u8; shift];
        buf.extend_from_slice(&bytes);
        let r = ksites::check_module::check(&buf[shift..], None, None).unwrap();
        assert!(
            r.problems.is_empty() && r.load.is_some(),
            "shifted by {shift}: {:?}",
            r.problems
        );
    }
}

/// No-op poker: a bad table must fail before anything is written.
struct NoWrites(usize);

impl kernel_loader::patch::TextPoker for NoWrites {
    unsafe fn write(&mut self, _: u64, _: &[u8]) -> Result<(), kernel_loader::patch::PokeError> {
        self.0 += 1;
        Ok(())
    }
    fn sync_cores(&mut self) {}
    fn end(&mut self) {}
}

#[test]
fn a_bad_table_fails_the_load_with_nothing_written_or_leaked() {
    use kernel_loader::format::FormatError;
    use kernel_loader::module::{Export, Kernel, Module, ModuleError};
    use object::{Object as _, ObjectSection as _};

    let d = tmpdir("badtable");
    let ko = std::fs::read(module(&d)).unwrap();
    let f = object::File::parse(&*ko).unwrap();
    let sec = f.section_by_name(".ksites").unwrap();
    let (off, _) = sec.file_range().unwrap();
    let off = off as usize;
    let hdr = kernel_loader::format::Header::read(sec.data().unwrap()).unwrap();
    assert!(hdr.ifunc_sites.count > 0);

    // Kernel symbols the module needs, all in one "kernel text" page below the module.
    let base = 0x4000_0000u64;
    let names = [
        "kernel_popcount",
        "kernel_log",
        "ksites_probe_c_entry",
        "ksites_probe_ret0",
        "ksites_probe_ret1",
    ];
    let exports: Vec<Export> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Export::new(n, (base - 0x1000 + 16 * i as u64) as *const ()))
        .collect();
    let exports: &[Export] = &exports;
    let exec = [std::ops::Range {
        start: base - 0x1000,
        end: base,
    }];
    let kernel = Kernel {
        symbols: &exports,
        table: None,
        exec: &exec,
        features: kernel_loader::CpuFeatures::empty(),
    };

    let mut corrupt_version = ko.clone();
    corrupt_version[off + 8] = 9;
    let mut corrupt_site = ko.clone();
    // The first site's ifunc index (bits 8..) pointing past the descriptors.
    let info = off + hdr.ifunc_sites.offset as usize + 4;
    corrupt_site[info + 1] = 0x7f;

    for (what, bytes, want) in [
        ("version", &corrupt_version, "unsupported"),
        ("site", &corrupt_site, "ifunc"),
    ] {
        let mut mem = HostMemory::at(base);
        let mut poker = NoWrites(0);
        let probes = kernel_loader::probe::count();
        // SAFETY: the load fails while validating the table, before anything runs.
        let r = unsafe { Module::load("bad", bytes, &kernel, &mut mem, &mut poker) };
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{what}: a corrupt table loaded"));
        assert!(matches!(e, ModuleError::Table(_)), "{what}: {e:?}");
        let text = e.to_string();
        assert!(
            text.contains("invalid .ksites table") && text.to_lowercase().contains(want),
            "{what}: {text}"
        );
        if let ModuleError::Table(fe) = e {
            assert!(!matches!(fe, FormatError::BadMagic), "{what}: {fe:?}");
        }
        assert_eq!(mem.allocs, 1, "{what}");
        assert!(mem.live.is_empty(), "{what}: memory leaked");
        assert_eq!(poker.0, 0, "{what}: text written");
        assert_eq!(
            kernel_loader::probe::count(),
            probes,
            "{what}: registry changed"
        );
    }

    // The intact module loads through the same path up to the point of executing (the
    // check runs the same steps).
    let mut mem = HostMemory::at(base);
    let r = kernel_loader::module::check(&ko, &kernel, &mut mem, &mut |_| {});
    assert!(r.is_ok(), "{r:?}");
    assert!(mem.live.is_empty());
}

#[test]
fn a_module_ifunc_slot_outside_its_data_is_refused() {
    use object::read::elf::{ElfFile64, SectionHeader as _};
    use object::{LittleEndian as LE, Object as _, ObjectSection as _};

    // An `ifunc!` by hand (the macro's records, in assembly) and a call to it.
    let d = tmpdir("slot");
    std::fs::write(
        d.join("m.s"),
        r#"
        .text
        .globl f
f:      jmp *slot(%rip)
        int3
        int3
impl:   ret
resolve: lea impl(%rip), %rax
        ret
        .globl user
user:   call f
        ret
        .data
        .p2align 3
slot:   .quad impl
        .section .rodata.n,"a",@progbits
        .p2align 3
pad:    .quad 0
name:   .ascii "m::f"
        .section .ksites_ifuncs,"awR",@progbits
        .p2align 3
        .long 0x4649534b, 1
        .quad f, slot, resolve, impl, name, 4
"#,
    )
    .unwrap();
    let o = run(Command::new("gcc")
        .args(["-c", "m.s", "-o", "m.o"])
        .current_dir(&d));
    assert!(o.status.success(), "{}", text(&o));
    let r = run(Command::new(KSITES)
        .args(["embed", "m.o", "-o", "m.ko"])
        .current_dir(&d));
    assert!(r.status.success(), "{}", text(&r));
    let ko = std::fs::read(d.join("m.ko")).unwrap();

    // As embedded it would load: one ifunc, one site.
    let ok = ksites::check_module::check(&ko, None, None).unwrap();
    assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    assert_eq!(ok.load.map(|l| (l.ifuncs, l.sites)), Some((1, 1)));

    // Point the descriptor's slot field (offset 4 of descriptor 0) at `.rodata.n`, which
    // is read-only: 8-aligned and outside the text, so only the "slot in the module's
    // writable data" rule catches it.
    let f = ElfFile64::<LE>::parse(&*ko).unwrap();
    let ksites = f.section_by_name(".ksites").unwrap();
    let hdr = kernel_loader::format::Header::read(ksites.data().unwrap()).unwrap();
    let slot_field = u64::from(hdr.ifuncs.offset) + 4;
    let rodata = f.section_by_name(".rodata.n").unwrap().index();
    let ksites_sym = f
        .symbols()
        .find(|s| {
            use object::ObjectSymbol as _;
            s.kind() == object::SymbolKind::Section && s.section_index() == Some(rodata)
        })
        .map(|s| {
            use object::ObjectSymbol as _;
            s.index().0 as u64
        })
        .expect("a section symbol for .rodata.n");
    let rela = f
        .sections()
        .find(|s| s.name() == Ok(".rela.ksites"))
        .unwrap();
    let (roff, rsize) = rela.file_range().unwrap();
    let hdr_sh = rela.elf_section_header();
    assert_eq!(hdr_sh.sh_entsize(LE), 24);
    let mut bad = ko.clone();
    let mut patched = false;
    for e in (roff..roff + rsize).step_by(24) {
        let e = e as usize;
        let r_offset = u64::from_le_bytes(bad[e..e + 8].try_into().unwrap());
        if r_offset == slot_field {
            let info = (ksites_sym << 32) | u64::from(object::elf::R_X86_64_PC32.0);
            bad[e + 8..e + 16].copy_from_slice(&info.to_le_bytes());
            bad[e + 16..e + 24].copy_from_slice(&0i64.to_le_bytes());
            patched = true;
        }
    }
    assert!(patched, "no relocation for the slot field");
    let r = ksites::check_module::check(&bad, None, None).unwrap();
    assert!(r.load.is_none(), "a slot in read-only memory was accepted");
    assert!(
        r.problems.iter().any(|p| p.contains("slot")),
        "{:?}",
        r.problems
    );
}
