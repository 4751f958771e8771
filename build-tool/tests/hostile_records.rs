//! Hostile records and symbols (issue 14, rows 3 and 8): GNU ifuncs and probe functions
//! in images without relocations, probe function symbols of unexpected types and
//! sections, malformed segment and section headers, and the property over thousands of
//! mutated real images: `embed` either fails cleanly or produces an output `verify`
//! accepts, with no live call to a probe function left in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};
use kernel_loader::format::SiteKind;
use ksites::elf::Image;
use ksites::probes::split_c_probe;
use ksites::target::RelocClass;
use object::{Object, ObjectSymbol};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn gcc(dir: &Path, args: &[&str]) {
    let o = Command::new("gcc")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("gcc is needed to build test fixtures");
    assert!(
        o.status.success(),
        "gcc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn cell_c() -> String {
    format!(
        "struct ksites_cell {{ unsigned long m, o, s; }};\n\
         __attribute__((used)) struct ksites_cell {CELL_SYMBOL} = {{ {CELL_MAGIC:#x}UL, 0, 0 }};\n"
    )
}

/// `ksites embed IN -o OUT` in `dir`: (exit code, stdout + stderr).
fn embed_cli(dir: &Path, input: &str, out: &str) -> (Option<i32>, String) {
    let o = Command::new(KSITES)
        .args(["embed", input, "-o", out])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text)
}

#[test]
fn row_03_gnu_ifunc_image_without_relocations_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("a.c"),
        format!(
            "#include <stdio.h>\n\
             static long a(long x) {{ return x; }}\n\
             static long b(long x) {{ return 2 * x; }}\n\
             static long (*pick(void))(long) {{ return b; }}\n\
             long scale(long x) __attribute__((ifunc(\"pick\")));\n\
             {}\
             int main(int argc, char **argv) {{ (void)argv; printf(\"%ld\\n\", scale(argc)); return 0; }}\n",
            cell_c()
        ),
    )
    .unwrap();
    gcc(
        d,
        &[
            "-O2",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "a.c",
            "-o",
            "with",
        ],
    );
    gcc(d, &["-O2", "-static", "-no-pie", "a.c", "-o", "without"]);

    // With relocations: the ifuncs are found (ours and glibc's own).
    let data = std::fs::read(d.join("with")).unwrap();
    let (_, report) = ksites::embed::embed_bytes("with", &data).unwrap();
    assert!(
        report.ifuncs.iter().any(|f| f.name == "scale"),
        "{:?}",
        report.ifuncs
    );
    assert!(!report.scan.sites.is_empty());

    // Without: an error like the other relocation-less cases, naming the file and an
    // ifunc; no output.
    let before = std::fs::read(d.join("without")).unwrap();
    let (code, text) = embed_cli(d, "without", "out");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("without: has ")
            && text.contains("GNU ifunc symbols (e.g. `")
            && text.contains("but no relocation sections; link with --emit-relocs"),
        "{text}"
    );
    assert!(!d.join("out").exists(), "output written despite the error");
    assert_eq!(std::fs::read(d.join("without")).unwrap(), before);
}

#[test]
fn row_03_probe_functions_without_relocations_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Probe functions, no declaration section, no ifuncs: nothing but the calls tells
    // that the image has probes.
    std::fs::write(
        d.join("p.s"),
        "    .text\n    .globl _start\n_start:\n    call __dtrace_probe_net___tx\n    ret\n\
         \x20   .weak __dtrace_probe_net___tx\n    .type __dtrace_probe_net___tx,@function\n\
         __dtrace_probe_net___tx: ret\n",
    )
    .unwrap();
    gcc(d, &["-nostdlib", "-static", "-no-pie", "p.s", "-o", "p"]);
    let (code, text) = embed_cli(d, "p", "out");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("p: has 1 probe function symbols (e.g. `__dtrace_probe_net___tx`)")
            && text.contains("no relocation sections; link with --emit-relocs"),
        "{text}"
    );
    assert!(!d.join("out").exists());
}

#[test]
fn row_08_probe_call_without_a_relocation_is_refused() {
    // A local probe function in the caller's section: the assembler resolves the call
    // itself and emits no relocation, so only the code says it is a probe call.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("loc.s"),
        format!(
            "    .text\n    .globl _start\n    .type _start,@function\n_start:\n\
             \x20   call __dtrace_probe_loc___x\n    call other\n    ret\n\
             \x20   .size _start, .-_start\n\
             \x20   .type __dtrace_probe_loc___x,@function\n__dtrace_probe_loc___x: ret\n\
             \x20   .size __dtrace_probe_loc___x, 1\n\
             \x20   .globl other\n    .type other,@function\nother: ret\n    .size other, 1\n\
             \x20   .section .data.cell,\"aw\",@progbits\n    .balign 8\n\
             \x20   .globl {CELL_SYMBOL}\n{CELL_SYMBOL}: .quad {CELL_MAGIC:#x}, 0, 0\n"
        ),
    )
    .unwrap();
    gcc(
        d,
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "loc.s",
            "-o",
            "loc",
        ],
    );
    let (code, text) = embed_cli(d, "loc", "out");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("loc: the call at 0x")
            && text.contains(
                "(_start) reaches probe function __dtrace_probe_loc___x but has no relocation"
            ),
        "{text}"
    );
    assert!(!d.join("out").exists());
}

/// A kernel-like image: gcc-compiled C with declared probes (plain, tail and is-enabled
/// calls), a GNU ifunc, the table cell, and an assembly probe stub without `.type`
/// (an `STT_NOTYPE` probe function) called and tail-called from assembly; linked by GNU
/// ld (`k`).
fn kernel_like(dir: &Path) -> PathBuf {
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c");
    std::fs::write(
        dir.join("k.c"),
        format!(
            r#"#include "ksites_sdt.h"
KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
KSITES_PROBE_DECL(net, tx, 1, (unsigned long len))
static long a(long x) {{ return x; }}
static long b(long x) {{ return 2 * x; }}
static long (*pick(unsigned long f))(long) {{ return (f & 1) ? b : a; }}
long scale(long x) __attribute__((ifunc("pick")));
{cell}
volatile long sink;
void asm_caller(void);
void rx(unsigned long len, unsigned long port) {{
    KSITES_PROBE(net, rx, len, port);
    sink = scale(len);
}}
void tx(unsigned long len) {{
    sink += len;
    KSITES_PROBE(net, tx, len);
}}
void tx2(unsigned long len) {{
    KSITES_PROBE(net, tx, len + 1);
    sink = len;
}}
int rx_on(void) {{ return KSITES_PROBE_ENABLED(net, rx); }}
long twice(long x) {{ if (KSITES_PROBE_ENABLED(net, tx)) sink = 1; return scale(x) + scale(x + 1); }}
void _start(void) {{ rx(1, 2); tx(3); tx2(4); asm_caller(); sink = rx_on() + twice(4); for (;;) {{}} }}
void ksites_probe_ret0(void) {{}}
void ksites_probe_ret1(void) {{}}
"#,
            cell = cell_c()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("stub.s"),
        "    .text\n    .globl __dtrace_probe_asm___tick\n__dtrace_probe_asm___tick: ret\n\
         \x20   .globl asm_caller\n    .type asm_caller,@function\nasm_caller:\n\
         \x20   call __dtrace_probe_asm___tick\n    jmp __dtrace_probe_asm___tick\n\
         \x20   .size asm_caller, .-asm_caller\n",
    )
    .unwrap();
    let inc = format!("-I{}", header.display());
    gcc(
        dir,
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
    );
    gcc(
        dir,
        &[
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--emit-relocs",
            "k.o",
            "stub.s",
            "-o",
            "k",
        ],
    );
    dir.join("k")
}

/// The same objects linked by the toolchain's rust-lld (`k-lld`, with lld's layout:
/// `PT_PHDR`, other segment boundaries), if it has one.
fn kernel_like_lld(dir: &Path) -> Option<PathBuf> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let lld = Path::new(String::from_utf8_lossy(&sysroot.stdout).trim())
        .join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld");
    if !lld.exists() {
        return None;
    }
    gcc(dir, &["-c", "stub.s", "-o", "stub.o"]);
    let o = Command::new(lld)
        .args([
            "-flavor",
            "gnu",
            "-static",
            "--emit-relocs",
            "k.o",
            "stub.o",
            "-o",
            "k-lld",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(dir.join("k-lld"))
}

// ELF64 field offsets, for editing the fixture.
const E_PHOFF: usize = 0x20;
const E_SHOFF: usize = 0x28;
const E_PHNUM: usize = 0x38;
const E_SHNUM: usize = 0x3c;
const E_SHSTRNDX: usize = 0x3e;
const SHDR: usize = 64;
const PHDR: usize = 56;
const SYM: usize = 24;
const RELA: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHT_RELA: u32 = 4;
const SHF_EXECINSTR: u64 = 4;

fn rd(d: &[u8], at: usize, n: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&d[at..at + n]);
    u64::from_le_bytes(b)
}

fn wr(d: &mut [u8], at: usize, n: usize, v: u64) {
    d[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
}

/// Where the editable parts of the fixture are (file offsets).
#[derive(Debug, Default)]
struct Layout {
    shdrs: Vec<usize>,
    phdrs: Vec<usize>,
    /// Symbol entries, and the names of the symbols.
    syms: Vec<(usize, String)>,
    /// RELA entries, and the name of the symbol each names.
    relas: Vec<(usize, String)>,
    shstrtab: usize,
    /// File offsets of the executable sections' bytes.
    code: Vec<std::ops::Range<usize>>,
}

fn layout(d: &[u8]) -> Layout {
    let mut l = Layout::default();
    let (shoff, shnum) = (rd(d, E_SHOFF, 8) as usize, rd(d, E_SHNUM, 2) as usize);
    let (phoff, phnum) = (rd(d, E_PHOFF, 8) as usize, rd(d, E_PHNUM, 2) as usize);
    l.shdrs = (0..shnum).map(|i| shoff + i * SHDR).collect();
    l.phdrs = (0..phnum).map(|i| phoff + i * PHDR).collect();
    l.shstrtab = l.shdrs[rd(d, E_SHSTRNDX, 2) as usize];
    let sec = |h: usize| (rd(d, h + 24, 8) as usize, rd(d, h + 32, 8) as usize);
    let symtab = *l
        .shdrs
        .iter()
        .find(|&&h| rd(d, h + 4, 4) as u32 == SHT_SYMTAB)
        .unwrap();
    let (so, ss) = sec(symtab);
    let (stro, _) = sec(l.shdrs[rd(d, symtab + 40, 4) as usize]);
    let name = |at: usize| {
        let s = &d[stro + rd(d, at, 4) as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap()]).into_owned()
    };
    let names: Vec<String> = (0..ss / SYM).map(|i| name(so + i * SYM)).collect();
    l.syms = (0..ss / SYM)
        .map(|i| (so + i * SYM, names[i].clone()))
        .collect();
    for &h in &l.shdrs {
        if rd(d, h + 8, 8) & SHF_EXECINSTR != 0 {
            let (o, s) = sec(h);
            l.code.push(o..o + s);
        }
        if rd(d, h + 4, 4) as u32 == SHT_RELA {
            let (o, s) = sec(h);
            for e in (o..o + s).step_by(RELA) {
                let sym = (rd(d, e + 8, 8) >> 32) as usize;
                l.relas
                    .push((e, names.get(sym).cloned().unwrap_or_default()));
            }
        }
    }
    l
}

fn is_probe(name: &str) -> bool {
    split_c_probe(name).is_some()
}

/// The symbol entry named `name`.
fn sym_entry(l: &Layout, name: &str) -> usize {
    l.syms.iter().find(|(_, n)| n == name).unwrap().0
}

/// Why an output of `embed` breaks the promise, if it does: `verify` fails or reports a
/// problem, or a call to a probe function is still live (a branch relocation naming a
/// probe function that was not rewritten, or one of the input's probe call sites still
/// holding its call to a function named as a probe).
fn broken_output(out: &[u8], sites: &[(u64, usize, Vec<u8>)]) -> Option<String> {
    let img = Image::parse("out", out).ok()?;
    // (An input with nothing to describe is copied unchanged: there is no table to
    // verify, but there must be no live probe call either.)
    if img
        .section_by_name(kernel_loader::format::SECTION_NAME)
        .is_some()
    {
        match ksites::verify::verify("out", out) {
            Err(e) => return Some(format!("verify error: {e:#}")),
            Ok(r) if !r.problems.is_empty() => {
                return Some(format!("verify problem: {}", r.problems[0]));
            }
            Ok(_) => {}
        }
    }
    let t = img.target;
    let probe_addrs: Vec<u64> = img
        .file
        .symbols()
        .filter(|s| s.name().is_ok_and(is_probe))
        .map(|s| s.address())
        .collect();
    let exec = img.exec_ranges();
    for r in img.raw_relas() {
        if t.reloc_class(r.r_type) != RelocClass::Branch
            || !is_probe(&img.symbol_name(r.sym_index))
            || !exec.iter().any(|x| x.contains(&r.offset))
        {
            continue;
        }
        let Some(start) = t.plain_branch_start(r.offset) else {
            continue;
        };
        if let Some(code) = img.read_va(start, 5) {
            let i = t.decode_insn(code, start);
            if matches!(i.kind, Some(SiteKind::Call | SiteKind::Jmp)) && i.len == 5 {
                return Some(format!(
                    "live call at {start:#x} to {}",
                    img.symbol_name(r.sym_index)
                ));
            }
        }
    }
    for (addr, off, orig) in sites {
        if out.get(*off..off + orig.len()) == Some(&orig[..]) {
            let i = t.decode_insn(orig, *addr);
            if probe_addrs.contains(&i.branch_target) {
                return Some(format!("live call left at input probe site {addr:#x}"));
            }
        }
    }
    None
}

/// The input's C probe call sites: (address, file offset, original bytes).
fn probe_sites(path: &str, data: &[u8]) -> Vec<(u64, usize, Vec<u8>)> {
    let (_, report) = ksites::embed::embed_bytes(path, data).unwrap();
    let img = Image::parse(path, data).unwrap();
    report
        .probes
        .rewrites
        .iter()
        .map(|(a, b)| {
            let off = img.va_to_file_offset(*a, b.len() as u64).unwrap() as usize;
            (*a, off, data[off..off + b.len()].to_vec())
        })
        .collect()
}

/// What `embed` did with a mutated input.
enum Outcome {
    Embedded,
    /// A clean error; whether its message names the file.
    Refused(bool),
    /// A broken promise: a panic, or a broken output.
    Broken(String),
}

/// `embed` on `data`: an output must pass [`broken_output`], and nothing may panic.
fn check(data: &[u8], sites: &[(u64, usize, Vec<u8>)]) -> Outcome {
    let panic_text = |p: Box<dyn std::any::Any + Send>| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    };
    match std::panic::catch_unwind(|| ksites::embed::embed_bytes("k", data)) {
        Err(p) => Outcome::Broken(format!("panic in embed: {}", panic_text(p))),
        Ok(Err(e)) => Outcome::Refused(format!("{e:#}").contains("k:")),
        Ok(Ok((out, _))) => match std::panic::catch_unwind(|| broken_output(&out, sites)) {
            Err(p) => Outcome::Broken(format!("panic in verify: {}", panic_text(p))),
            Ok(Some(why)) => Outcome::Broken(why),
            Ok(None) => Outcome::Embedded,
        },
    }
}

#[test]
fn row_08_probe_symbols_of_any_type_or_section_are_handled_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = kernel_like(dir.path());
    let data = std::fs::read(&input).unwrap();
    let sites = probe_sites("k", &data);
    // plain rx, tail tx, tx2, is-enabled rx and tx, and the asm stub's call and jmp.
    assert!(sites.len() >= 7, "{sites:?}");
    let (_, report) = ksites::embed::embed_bytes("k", &data).unwrap();
    assert!(
        report
            .probes
            .probes
            .iter()
            .any(|p| p.provider == "asm" && p.name == "tick"),
        "the STT_NOTYPE probe function's calls are recorded"
    );
    let l = layout(&data);
    let tx = sym_entry(&l, "__dtrace_probe_net___tx");
    // (what, field offset in the entry, width, value, must succeed)
    let edits: [(&str, usize, usize, u64, bool); 8] = [
        ("STT_NOTYPE", 4, 1, 0x20, true),
        ("STT_OBJECT", 4, 1, 0x21, true),
        ("STT_FUNC local", 4, 1, 0x02, true),
        ("SHN_ABS", 6, 2, 0xfff1, true),
        ("SHN_UNDEF", 6, 2, 0, true),
        ("SHN_COMMON", 6, 2, 0xfff2, true),
        ("out-of-range section", 6, 2, 0x7fff, false),
        ("st_value elsewhere", 8, 8, 0x1234, false),
    ];
    for (what, at, n, v, ok) in edits {
        let mut m = data.clone();
        wr(&mut m, tx + at, n, v);
        match ksites::embed::embed_bytes("k", &m) {
            Ok((out, r)) => {
                assert_eq!(r.probes.sites.len(), sites.len(), "{what}: a site was lost");
                assert_eq!(broken_output(&out, &sites), None, "{what}");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("{what}: refused: {msg}");
                assert!(!ok, "{what}: {msg}");
                assert!(
                    msg.starts_with("k: ") && msg.contains("__dtrace_probe_net___tx"),
                    "{what}: {msg}"
                );
            }
        }
    }
}

#[test]
fn row_08_malformed_segment_and_section_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = kernel_like(dir.path());
    let data = std::fs::read(&input).unwrap();
    let l = layout(&data);
    // p_filesz > p_memsz in the first PT_LOAD.
    let load = *l.phdrs.iter().find(|&&p| rd(&data, p, 4) == 1).unwrap();
    let mut m = data.clone();
    let memsz = rd(&m, load + 40, 8);
    wr(&mut m, load + 32, 8, memsz + 0x1000);
    let msg = format!("{:#}", ksites::embed::embed_bytes("k", &m).unwrap_err());
    assert!(
        msg.starts_with("k: ") && msg.contains("p_filesz") && msg.contains("p_memsz"),
        "{msg}"
    );
    // `.shstrtab` of size 0.
    let mut m = data.clone();
    wr(&mut m, l.shstrtab + 32, 8, 0);
    let msg = format!("{:#}", ksites::embed::embed_bytes("k", &m).unwrap_err());
    assert!(
        msg.starts_with("k: ")
            && msg.contains("section name string table")
            && msg.contains("empty"),
        "{msg}"
    );
    // The other header contradictions the readers rely on: (what, edit, message).
    let text_rela = *l
        .shdrs
        .iter()
        .find(|&&h| rd(&data, h + 4, 4) as u32 == SHT_RELA && rd(&data, h + 8, 8) & 2 == 0)
        .unwrap();
    let first_rela = rd(&data, text_rela + 24, 8) as usize;
    let file_len = data.len() as u64;
    type Edit = Box<dyn Fn(&mut [u8])>;
    let cases: [(&str, Edit, &str); 5] = [
        (
            "PT_LOAD past the end",
            Box::new(move |m| wr(m, load + 8, 8, file_len)),
            "lie past the end of the file",
        ),
        (
            "PT_LOAD loads elsewhere",
            Box::new(move |m| {
                let v = rd(m, load + 16, 8);
                wr(m, load + 16, 8, v + 0x10_0000)
            }),
            "is not where any PT_LOAD segment loads its bytes",
        ),
        (
            "relocation outside its section",
            Box::new(move |m| wr(m, first_rela, 8, 0x10)),
            "outside the section it applies to",
        ),
        (
            "relocations without a symbol table",
            Box::new(move |m| wr(m, text_rela + 40, 4, 0)),
            "as its symbol table, which is not one",
        ),
        (
            "name past the string table",
            Box::new(move |m| wr(m, text_rela, 4, 0xffff)),
            "is past the end of the section name string table",
        ),
    ];
    for (what, edit, want) in cases {
        let mut m = data.clone();
        edit(&mut m);
        let msg = format!("{:#}", ksites::embed::embed_bytes("k", &m).unwrap_err());
        assert!(
            msg.starts_with("k: ") && msg.contains("malformed") && msg.contains(want),
            "{what}: {msg}"
        );
    }
    // The CLI: exit 1, no output.
    std::fs::write(dir.path().join("bad"), &m).unwrap();
    let (code, text) = embed_cli(dir.path(), "bad", "out");
    assert_eq!(code, Some(1), "{text}");
    assert!(!dir.path().join("out").exists());
}

/// xorshift64*: a fixed, dependency-free sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

/// A value for a field of `n` bytes that held `old`: a boundary value, a small step, a
/// bit flip, or anything.
fn new_value(rng: &mut Rng, old: u64, n: usize) -> u64 {
    let mask = if n == 8 { u64::MAX } else { (1 << (8 * n)) - 1 };
    let v = match rng.below(6) {
        0 => rng.pick(&[0, 1, mask, mask >> 1, 0x1000, 0xfff1, 0xfff2, 0xff00]),
        1 => old.wrapping_add(rng.below(17) as u64).wrapping_sub(8),
        2 => old ^ (1 << rng.below(8 * n)),
        3 => old.wrapping_add(0x1000),
        4 => rng.next() & 0xffff,
        _ => rng.next(),
    };
    v & mask
}

/// One mutation of `m`: a field of a symbol (biased to the probe, ifunc and cell
/// symbols), a section header, a program header, a relocation (biased to those naming
/// probe functions or ifuncs), the ELF header, or a code byte (biased to the probe call
/// sites); returns what it changed.
fn mutate(rng: &mut Rng, m: &mut [u8], l: &Layout, sites: &[(u64, usize, Vec<u8>)]) -> String {
    let interesting = |n: &str| is_probe(n) || n == "scale" || n == CELL_SYMBOL;
    let (kind, at, n) = match rng.below(12) {
        10 => {
            // The ELF header's layout fields.
            let (f, w) = rng.pick(&[
                (0x10, 2),
                (0x18, 8),
                (E_PHOFF, 8),
                (E_SHOFF, 8),
                (0x36, 2),
                (E_PHNUM, 2),
                (0x3a, 2),
                (E_SHNUM, 2),
                (E_SHSTRNDX, 2),
            ]);
            ("ehdr", f, w)
        }
        11 => {
            // A code byte: at or near a probe call site, or anywhere.
            let at = if rng.below(2) == 0 {
                let (_, off, _) = &sites[rng.below(sites.len())];
                (off + rng.below(12)).saturating_sub(4)
            } else {
                let r = l.code[rng.below(l.code.len())].clone();
                r.start + rng.below(r.len().max(1))
            };
            ("code", at.min(m.len() - 1), 1)
        }
        0..=3 => {
            let hot: Vec<usize> = l
                .syms
                .iter()
                .filter(|(_, n)| interesting(n))
                .map(|s| s.0)
                .collect();
            let e = if rng.below(3) > 0 {
                rng.pick(&hot)
            } else {
                l.syms[rng.below(l.syms.len())].0
            };
            let (f, w) = rng.pick(&[(4, 1), (4, 1), (6, 2), (6, 2), (8, 8), (16, 8), (0, 4)]);
            ("sym", e + f, w)
        }
        4 | 5 => {
            let h = if rng.below(4) == 0 {
                l.shstrtab
            } else {
                l.shdrs[rng.below(l.shdrs.len())]
            };
            let (f, w) = rng.pick(&[
                (0, 4),
                (4, 4),
                (8, 8),
                (16, 8),
                (24, 8),
                (32, 8),
                (40, 4),
                (44, 4),
                (48, 8),
                (56, 8),
            ]);
            ("shdr", h + f, w)
        }
        6 => {
            let p = l.phdrs[rng.below(l.phdrs.len())];
            let (f, w) = rng.pick(&[(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8)]);
            ("phdr", p + f, w)
        }
        _ => {
            let hot: Vec<usize> = l
                .relas
                .iter()
                .filter(|(_, n)| interesting(n))
                .map(|r| r.0)
                .collect();
            let e = if rng.below(3) > 0 && !hot.is_empty() {
                rng.pick(&hot)
            } else {
                l.relas[rng.below(l.relas.len())].0
            };
            let (f, w) = rng.pick(&[(0, 8), (8, 4), (12, 4), (16, 8)]);
            ("rela", e + f, w)
        }
    };
    let old = rd(m, at, n);
    let v = new_value(rng, old, n);
    wr(m, at, n, v);
    format!("{kind}@{at:#x}:{old:#x}->{v:#x}")
}

#[test]
fn mutated_images_embed_cleanly_or_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = vec![kernel_like(dir.path())];
    images.extend(kernel_like_lld(dir.path()));
    let cases: usize = std::env::var("KSITES_MUTATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let seed: u64 = std::env::var("KSITES_MUTATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    for input in images {
        let data = std::fs::read(&input).unwrap();
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        mutate_and_check(&name, &data, cases, seed);
    }
}

/// `cases` mutations of `data` (from `seed`), each checked by [`check`].
fn mutate_and_check(name: &str, data: &[u8], cases: usize, seed: u64) {
    // The unmutated image embeds and verifies.
    let sites = probe_sites("k", data);
    assert!(matches!(check(data, &sites), Outcome::Embedded), "{name}");
    let l = layout(data);
    let mut rng = Rng(seed);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let (mut ok, mut refused, mut unnamed) = (0, 0, 0);
    for _ in 0..cases {
        let mut m = data.to_vec();
        let edits: Vec<String> = (0..1 + rng.below(3))
            .map(|_| mutate(&mut rng, &mut m, &l, &sites))
            .collect();
        let why = match check(&m, &sites) {
            Outcome::Embedded => {
                ok += 1;
                continue;
            }
            Outcome::Refused(named) => {
                refused += 1;
                unnamed += usize::from(!named);
                continue;
            }
            Outcome::Broken(why) => why,
        };
        // Classes by the message's first words, without addresses.
        let class: String = why
            .split_whitespace()
            .filter(|w| !w.contains("0x"))
            .take(6)
            .collect::<Vec<_>>()
            .join(" ");
        if std::env::var_os("KSITES_MUTATION_VERBOSE").is_some() {
            eprintln!("{class}: {edits:?}: {why}");
        }
        let e = failures
            .entry(class)
            .or_insert_with(|| (0, format!("{edits:?}: {why}")));
        e.0 += 1;
    }
    std::panic::set_hook(hook);
    let report: Vec<String> = failures
        .iter()
        .map(|(c, (n, ex))| format!("{n:5} {c}\n      e.g. {ex}"))
        .collect();
    eprintln!(
        "{name}: {cases} mutations: {ok} embedded, {refused} refused ({unnamed} without the file \
         name), {} broken",
        failures.values().map(|f| f.0).sum::<usize>()
    );
    assert!(failures.is_empty(), "{name}:\n{}", report.join("\n"));
    assert!(ok > cases / 10, "{name}: too few mutations embedded: {ok}");
}
