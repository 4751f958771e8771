//! `scan` is exact on code that no sized function symbol describes: on gcc objects whose
//! local function symbols were stripped, with `-ffunction-sections` and without, with
//! `.cold` parts and with hand-written asm (no `.size`, code past a function's end,
//! nop/int3/zero padding, a section with no symbol), the sites it lists are exactly the
//! `call`/`jmp`/`jcc rel32` instructions whose rel32 carries a relocation in
//! `objdump -dr`'s listing: same section, offset, kind and target symbol.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ksites::scan::{ScanOptions, scan_bytes};
use object::{Object, ObjectSection, ObjectSymbol, SectionIndex, SymbolKind};

/// (section, offset of the instruction's first byte, kind, target symbol).
type Site = (String, u64, String, String);

fn run(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `gcc -c` of `src` (C or, for a `.s` name, assembly) written to `dir/name`, into
/// `dir/out`.
fn gcc(dir: &Path, name: &str, src: &str, flags: &[&str], out: &str) -> PathBuf {
    std::fs::write(dir.join(name), src).unwrap();
    run(Command::new("gcc")
        .args(flags)
        .args(["-c", name, "-o", out])
        .current_dir(dir));
    dir.join(out)
}

/// `objcopy ARGS input output`, into `dir/out`.
fn objcopy(dir: &Path, input: &Path, args: &[&str], out: &str) -> PathBuf {
    run(Command::new("objcopy")
        .args(args)
        .arg(input)
        .arg(out)
        .current_dir(dir));
    dir.join(out)
}

/// What `ksites scan --calls-to '*' --jumps-to '*'` lists.
fn scanned(path: &Path) -> BTreeSet<Site> {
    let data = std::fs::read(path).unwrap();
    let opts = ScanOptions {
        calls_to: vec!["*".into()],
        jumps_to: vec!["*".into()],
    };
    let scan = scan_bytes(&path.display().to_string(), &data, &opts).unwrap();
    scan.hits()
        .map(|h| (h.section, h.offset, h.kind.name().to_string(), h.symbol))
        .collect()
}

/// One instruction of `objdump -dr`'s listing.
struct Line {
    section: String,
    offset: u64,
    bytes: Vec<u8>,
    /// (offset, type, symbol+addend) of the relocations printed after it.
    relocs: Vec<(u64, String, String)>,
}

fn objdump(path: &Path) -> Vec<Line> {
    let o = run(Command::new("objdump").arg("-dr").arg(path));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut lines: Vec<Line> = Vec::new();
    let mut section = String::new();
    for l in text.lines() {
        if let Some(s) = l.strip_prefix("Disassembly of section ") {
            section = s.trim_end_matches(':').to_string();
            continue;
        }
        if let Some(r) = l.strip_prefix("\t\t\t") {
            // `6: R_X86_64_PLT32	ext_a-0x4`
            let (off, rest) = r.split_once(": ").unwrap();
            let (ty, sym) = rest.split_once('\t').unwrap();
            let off = u64::from_str_radix(off.trim(), 16).unwrap();
            let last = lines.last_mut().expect("a relocation after an instruction");
            last.relocs
                .push((off, ty.to_string(), sym.trim().to_string()));
            continue;
        }
        // `   5:	e8 00 00 00 00       	call   a <f+0xa>`, or a continuation line
        // holding only bytes.
        let Some((off, rest)) = l.split_once(":\t") else {
            continue;
        };
        let Ok(offset) = u64::from_str_radix(off.trim(), 16) else {
            continue;
        };
        let mut fields = rest.split('\t');
        let bytes: Vec<u8> = fields
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        match fields.next() {
            Some(_) => lines.push(Line {
                section: section.clone(),
                offset,
                bytes,
                relocs: Vec::new(),
            }),
            None => lines
                .last_mut()
                .expect("a continuation after an instruction")
                .bytes
                .extend(bytes),
        }
    }
    lines
}

/// `name+0x1c` / `name-0x4` / `name` → (name, addend).
fn sym_addend(s: &str) -> (&str, i64) {
    for (sep, sign) in [("+0x", 1), ("-0x", -1)] {
        if let Some((n, a)) = s.rsplit_once(sep) {
            return (n, sign * i64::from_str_radix(a, 16).unwrap());
        }
    }
    (s, 0)
}

/// The sites `objdump -dr` shows: `call`/`jmp`/`jcc rel32` (`e8`, `e9`, `0f 8x`, no
/// prefix) whose last four bytes carry a PC32/PLT32 relocation, named as `scan` names
/// targets: a symbol's own name, or, for a section symbol, the symbol defined where the
/// branch lands (a function first, then by name); a target nothing names cannot be listed.
fn expected(path: &Path) -> BTreeSet<Site> {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mut named: BTreeMap<(String, u64), Vec<(bool, String)>> = BTreeMap::new();
    for s in file.symbols() {
        let (Some(i), Ok(name)) = (s.section_index(), s.name()) else {
            continue;
        };
        if name.is_empty() || matches!(s.kind(), SymbolKind::Section | SymbolKind::File) {
            continue;
        }
        let sec = file
            .section_by_index(i)
            .unwrap()
            .name()
            .unwrap()
            .to_string();
        named
            .entry((sec, s.address()))
            .or_default()
            .push((s.kind() != SymbolKind::Text, name.to_string()));
    }
    let sections: BTreeSet<String> = file
        .sections()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    let mut out = BTreeSet::new();
    for l in objdump(path) {
        let b = &l.bytes;
        let (kind, op) = match b.as_slice() {
            [0xe8, ..] => ("call", 1),
            [0xe9, ..] => ("jmp", 1),
            [0x0f, 0x80..=0x8f, ..] => ("jcc", 2),
            _ => continue,
        };
        if b.len() != op + 4 {
            continue;
        }
        let field = l.offset + op as u64;
        let Some((_, _, sym)) = l.relocs.iter().find(|(off, ty, _)| {
            *off == field && (ty == "R_X86_64_PLT32" || ty == "R_X86_64_PC32")
        }) else {
            continue;
        };
        let (name, addend) = sym_addend(sym);
        let target = if sections.contains(name) {
            let at = (addend + 4) as u64;
            let Some(mut syms) = named.get(&(name.to_string(), at)).cloned() else {
                continue;
            };
            syms.sort();
            syms[0].1.clone()
        } else {
            name.to_string()
        };
        out.insert((l.section, l.offset, kind.to_string(), target));
    }
    out
}

/// Sites no sized function symbol covers (the code this test is about).
fn gap_sites(path: &Path, sites: &BTreeSet<Site>) -> usize {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let covered = |sec: SectionIndex, off: u64| {
        file.symbols().any(|s| {
            s.kind() == SymbolKind::Text
                && s.section_index() == Some(sec)
                && s.size() > 0
                && (s.address()..s.address() + s.size()).contains(&off)
        })
    };
    sites
        .iter()
        .filter(|(sec, off, ..)| {
            file.sections()
                .filter(|s| s.name() == Ok(sec.as_str()))
                .any(|s| !covered(s.index(), *off))
        })
        .count()
}

/// Asserts `scan` equals `objdump -dr` on `path`; returns (sites, sites in gaps).
fn assert_exact(path: &Path) -> (usize, usize) {
    let want = expected(path);
    let got = scanned(path);
    let missed: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missed.is_empty() && extra.is_empty(),
        "{}: scan missed {missed:#?}\nand listed sites objdump does not show {extra:#?}",
        path.display()
    );
    (want.len(), gap_sites(path, &want))
}

/// Calls and tail calls to externals and to static functions, a cold function, a path
/// to a cold external (split into a `.cold` part at -O2), unlikely branches, a static
/// function reached through an alias.
const C_SRC: &str = r#"
extern int ext_a(int);
extern int ext_b(int, int);
extern void ext_fail(const char *) __attribute__((noreturn));
extern int ext_tail(int);
extern void ext_log(const char *);
extern void ext_cold(int) __attribute__((cold));
int counter;

static __attribute__((noinline)) int helper(int x) { return ext_a(x * 3) + ext_b(x, 7); }
static __attribute__((noinline, cold)) void slow_path(int x) { ext_log("slow"); ext_a(x); }

int api_one(int x) {
    if (x < 0) { ext_cold(x); ext_log("neg"); return ext_a(-x) + ext_tail(x); }
    if (__builtin_expect(x == 7, 0)) ext_fail("seven");
    return helper(x) + 1;
}
int api_two(int x) { if (x == 42) slow_path(x); return ext_tail(x + helper(x)); }
static __attribute__((noinline)) int helper2(int x) { counter++; return ext_tail(x); }
int api_three(int x, int y) {
    int r = helper2(x);
    if (__builtin_expect(r == y, 0)) { ext_log("eq"); return ext_b(r, y) + helper2(y); }
    return r;
}
static int impl_fn(int x) { return ext_b(x, ext_a(x)) ? ext_tail(x) : 0; }
int alias_fn(int) __attribute__((alias("impl_fn")));
static __attribute__((noinline)) int last_static(int x) { ext_log("last"); return ext_tail(x); }
int api_four(int x) { return last_static(x) + api_two(x); }
"#;

const C_FLAGS: &[&[&str]] = &[
    &["-O2"],
    &["-O2", "-ffunction-sections"],
    &["-O2", "-fno-toplevel-reorder"],
    &["-O2", "-ffunction-sections", "-fno-toplevel-reorder"],
    &[
        "-O2",
        "-pg",
        "-mfentry",
        "-fno-toplevel-reorder",
        "-mcmodel=kernel",
        "-fno-pic",
    ],
    &["-Os", "-fno-toplevel-reorder"],
    &["-O0"],
];

/// Every `C_FLAGS` build of `C_SRC`, plus what `more` makes of each, all checked.
fn c_objects(
    dir: &Path,
    more: impl Fn(&Path, &Path, &str) -> Vec<PathBuf>,
) -> Vec<(PathBuf, usize, usize)> {
    let mut out = Vec::new();
    for (i, flags) in C_FLAGS.iter().enumerate() {
        let mut f = vec!["-fcf-protection=none", "-fno-asynchronous-unwind-tables"];
        f.extend_from_slice(flags);
        let o = gcc(dir, "t.c", C_SRC, &f, &format!("c{i}.o"));
        for p in more(dir, &o, &format!("c{i}")) {
            let (n, gaps) = assert_exact(&p);
            out.push((p, n, gaps));
        }
    }
    out
}

#[test]
fn scan_equals_objdump_on_gcc_objects_with_and_without_function_sections() {
    let dir = tempfile::tempdir().unwrap();
    let all = c_objects(dir.path(), |_, o, _| vec![o.to_path_buf()]);
    assert!(all.iter().all(|(_, n, _)| *n >= 8), "{all:?}");
}

#[test]
fn scan_equals_objdump_on_objects_whose_local_symbols_are_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let all = c_objects(dir.path(), |d, o, stem| {
        vec![
            objcopy(d, o, &["--strip-unneeded"], &format!("{stem}-su.o")),
            objcopy(
                d,
                o,
                &[
                    "--localize-symbol=api_two",
                    "--localize-symbol=alias_fn",
                    "--strip-unneeded",
                ],
                &format!("{stem}-loc.o"),
            ),
            objcopy(
                d,
                o,
                &["--localize-symbol=api_three", "--strip-symbol=api_three"],
                &format!("{stem}-ss.o"),
            ),
        ]
    });
    // The point of the test: sites that no sized function symbol covers any more.
    let gaps: usize = all.iter().map(|(_, _, g)| g).sum();
    assert!(gaps >= 20, "{all:?}");
    assert!(
        all.iter()
            .any(|(p, _, g)| *g > 0 && !p.display().to_string().contains("c0-")),
        "{all:?}"
    );
}

#[test]
fn scan_equals_objdump_on_cold_parts_with_and_without_their_symbols() {
    let dir = tempfile::tempdir().unwrap();
    let all = c_objects(dir.path(), |d, o, stem| {
        let data = std::fs::read(o).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let cold: Vec<String> = file
            .symbols()
            .filter(|s| {
                s.kind() == SymbolKind::Text
                    && s.size() > 0
                    && s.name().is_ok_and(|n| n.ends_with(".cold"))
                    && s.section_index().is_some_and(|i| {
                        file.section_by_index(i)
                            .is_ok_and(|s| s.name().is_ok_and(|n| n.starts_with(".text.unlikely")))
                    })
            })
            .map(|s| s.name().unwrap().to_string())
            .collect();
        if stem == "c0" {
            assert!(!cold.is_empty(), "-O2 splits `.cold` parts");
        }
        let mut args: Vec<String> = cold.iter().map(|c| format!("--strip-symbol={c}")).collect();
        args.push("--keep-symbol=api_one".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vec![
            o.to_path_buf(),
            objcopy(d, o, &args, &format!("{stem}-nocold.o")),
        ]
    });
    // Every stripped `.cold` part's sites are in a gap.
    let stripped: Vec<_> = all
        .iter()
        .filter(|(p, ..)| p.display().to_string().ends_with("c0-nocold.o"))
        .collect();
    assert!(stripped.iter().all(|(_, _, g)| *g >= 2), "{stripped:?}");
}

/// Functions without `.type`/`.size`, code after a `.size`d function's end, padding with
/// nops, int3 and zeros (of odd length once), a `.size` that ends inside an instruction, a `sub` whose
/// immediate carries a PLT32 relocation right after an `e8`/`e9` byte (not a call), and
/// a section with no symbol at all.
const ASM_SRC: &str = r#"
    .text
    .globl asm_sized
    .type asm_sized, @function
asm_sized:
    call ext_a
    ret
    .size asm_sized, .-asm_sized
    push %rbx
    call ext_b
    jmp ext_tail
    .p2align 4
    .globl nosize_global
nosize_global:
    mov $1, %eax
    call ext_a
    jne ext_tail
    je ext_a
    ret
    .p2align 4,0xcc
    call ext_log
    movabs $0x1234567890, %rax
    lea ext_a(%rip), %rdi
    call *ext_b@GOTPCREL(%rip)
    .byte 0x81, 0xe8
    .reloc ., R_X86_64_PLT32, ext_a-4
    .long 0
    .byte 0x81, 0xe9
    .reloc ., R_X86_64_PLT32, ext_b-4
    .long 0
    jmp ext_b
    .p2align 5,0
    call ext_a
    .byte 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
    call ext_b
    ret
    .type typed_nosize, @function
typed_nosize:
    nop
    call ext_tail
    .p2align 3
    call ext_log
    .type short_size, @function
short_size:
    nop
    call ext_a
    .size short_size, 4
    call ext_b
    jmp ext_a
local_label:
    call ext_tail
    ret

    .section .text.nosyms,"ax",@progbits
    nop
    call ext_a
    xor %eax, %eax
    jmp ext_b
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    call ext_tail
    .p2align 4,0xcc
    jg ext_log
    .p2align 4
    call ext_log

    .section .text.late_symbol,"ax",@progbits
    call ext_a
    .p2align 4,0x90
    .type late, @function
late:
    call ext_b
    ret
    .size late, .-late
    .byte 0xcc, 0xcc, 0xcc
    jmp ext_tail
"#;

#[test]
fn scan_equals_objdump_on_handwritten_asm() {
    let dir = tempfile::tempdir().unwrap();
    let o = gcc(dir.path(), "t.s", ASM_SRC, &[], "asm.o");
    let su = objcopy(dir.path(), &o, &["--strip-unneeded"], "asm-su.o");
    let (n, gaps) = assert_exact(&o);
    // 24 branches to externals but one: the 19 zero bytes `.p2align 5,0` puts before
    // `call ext_a` at 0x80 decode as `add` pairs, the last `00` taking the `e8` with it,
    // for objdump as for scan (code after zero fill of odd length, with no symbol to
    // start from, is out of step for both).
    assert_eq!(n, 23, "{}", o.display());
    assert!(
        !scanned(&o)
            .iter()
            .any(|(s, off, ..)| s == ".text" && *off == 0x80)
    );
    assert!(gaps >= 16, "{gaps}");
    let (n_su, _) = assert_exact(&su);
    assert_eq!(n_su, n);
    // The two `81 e8`/`81 e9` immediates are not sites, whatever the byte before says.
    let data = std::fs::read(&o).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let text = file.section_by_name(".text").unwrap().data().unwrap();
    let got = scanned(&o);
    let subs = got
        .iter()
        .filter(|(s, off, ..)| s == ".text" && text[*off as usize] == 0x81);
    assert_eq!(subs.count(), 0, "{got:#?}");
}

/// A module whose probe and ifunc-import calls sit in static functions placed after
/// sized ones (`-fno-toplevel-reorder`) and stripped: `embed` records every one.
const MODULE_SRC: &str = r#"
#include "ksites_sdt.h"
#include "ksites_module.h"
extern unsigned int kpopcount(unsigned long x);
KSITES_IFUNC_IMPORT(kpopcount);
KSITES_PROBE_DECL(mod, hit, 2, (unsigned long a, unsigned long b))
unsigned long first(unsigned long x) { return kpopcount(x) + 1; }
static __attribute__((noinline)) unsigned long hidden(unsigned long x) {
    KSITES_PROBE(mod, hit, x, 1);
    return kpopcount(x) + kpopcount(x >> 1);
}
unsigned long second(unsigned long x) { return hidden(x) + 2; }
static __attribute__((noinline)) unsigned long hidden_tail(unsigned long x) {
    KSITES_PROBE(mod, hit, x, 2);
    return kpopcount(x);
}
unsigned long third(unsigned long x) { return hidden_tail(x) * 3; }
"#;

#[test]
fn embed_records_sites_in_stripped_functions_of_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c");
    let include = format!("-I{}", include.display());
    let flags = [
        "-O2",
        "-fno-pic",
        "-mcmodel=kernel",
        "-fno-common",
        "-ffreestanding",
        "-fcf-protection=none",
        "-fno-toplevel-reorder",
        &include,
    ];
    let o = gcc(d, "m.c", MODULE_SRC, &flags, "m.o");
    let stripped = objcopy(d, &o, &["--strip-unneeded"], "ms.o");
    let want = expected(&stripped);
    let count = |prefix: &str| want.iter().filter(|s| s.3.starts_with(prefix)).count();
    let (calls, probes) = (count("kpopcount"), count("__dtrace_probe_"));
    assert_eq!((calls, probes), (4, 2), "{want:#?}");
    assert!(gap_sites(&stripped, &want) >= 5);
    let out = d.join("ms.ksites.o");
    let r = Command::new(env!("CARGO_BIN_EXE_ksites"))
        .arg("embed")
        .arg(&stripped)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "1 ifuncs, {calls} sites, 0 other references, 1 probes, {probes} probe sites"
        )),
        "{text}"
    );
}
