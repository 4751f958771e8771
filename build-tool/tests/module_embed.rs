//! `ksites embed` on relocatable objects (kernel modules): real gcc and rustc objects
//! are embedded, `.rela.ksites` is applied by a small relocator of this test at a layout
//! that follows the layout contract, and the loader's own reader must accept the table.
//! Expected counts come from `objdump -dr` and the input's record sections, never from
//! the tool.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::format::{ProbeKind, SECTION_NAME, Table};
use kernel_loader::ifunc::{IMPORT_SECTION, RECORD_SECTION, RECORD_SIZE, record as ifunc_record};
use kernel_loader::module::layout;
use kernel_loader::probe::{SITE_RECORD_SECTION, SITE_RECORD_SIZE, UNASSIGNED, record};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _, Sym as _};
use object::{
    LittleEndian as LE, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SymbolKind,
};

#[path = "common/module_build.rs"]
mod module_build;
#[path = "common/module_mem.rs"]
mod module_mem;
use module_mem::HostMemory;

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");
/// Where the test "loads" modules (kernel module area) ...
const MODULE_BASE: u64 = 0xffff_ffff_a000_0000;
/// ... and where the "kernel" it links them against has its text (imports live there).
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("module_embed_{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn header_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c")
}

/// `gcc -c` with the module flags the brief names.
fn gcc_module(dir: &Path, src: &str, out: &str) -> PathBuf {
    std::fs::write(dir.join("m.c"), src).unwrap();
    let o = run(Command::new("gcc")
        .args(module_build::GCC_MODULE_FLAGS)
        .arg("-I")
        .arg(header_dir())
        .args(["m.c", "-o", out])
        .current_dir(dir));
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    dir.join(out)
}

fn rustc_module(dir: &Path, src: &str, out: &str) -> PathBuf {
    let kl = module_build::kernel_loader_for_none(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("module_embed_kl"),
    );
    module_build::rustc_module(dir, "modr", src, out, &kl)
}

fn embed(input: &Path, output: &Path) -> Output {
    run(Command::new(KSITES)
        .arg("embed")
        .arg(input)
        .arg("-o")
        .arg(output))
}

// ---------------------------------------------------------------------------------------
// objdump -dr of the input: every instruction with a relocation.

#[derive(Debug, Clone)]
struct RelocInsn {
    section: String,
    /// Section offset of the instruction.
    insn: u64,
    mnemonic: String,
    r_type: String,
    /// `sym-0x4` as objdump prints it.
    target: String,
}

fn objdump_relocs(path: &Path) -> Vec<RelocInsn> {
    let o = run(Command::new("objdump")
        .args(["-dr", "--no-show-raw-insn"])
        .arg(path));
    assert!(o.status.success(), "objdump: {}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut out = Vec::new();
    let mut section = String::new();
    let mut last: Option<(u64, String)> = None;
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Disassembly of section ") {
            section = s.trim_end_matches(':').to_string();
            last = None;
            continue;
        }
        let t = line.trim_start();
        let Some((addr, rest)) = t.split_once(':') else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("R_X86_64_") {
            let (ty, target) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
            if let Some((insn, m)) = &last {
                out.push(RelocInsn {
                    section: section.clone(),
                    insn: *insn,
                    mnemonic: m.clone(),
                    r_type: format!("R_X86_64_{ty}"),
                    target: target.trim().to_string(),
                });
            }
        } else if !rest.is_empty() {
            let m = rest.split_whitespace().next().unwrap_or("").to_string();
            last = Some((addr, m));
        }
    }
    out
}

fn is_branch(m: &str) -> bool {
    m == "call" || m.starts_with('j')
}

/// (section, offset) of every call/jmp/jcc whose rel32 reaches `sym`.
fn branch_sites(insns: &[RelocInsn], sym: &str) -> BTreeSet<(String, u64)> {
    insns
        .iter()
        .filter(|r| {
            is_branch(&r.mnemonic)
                && matches!(r.r_type.as_str(), "R_X86_64_PLT32" | "R_X86_64_PC32")
                && r.target == format!("{sym}-0x4")
        })
        .map(|r| (r.section.clone(), r.insn))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The test's own relocator: the layout contract, then `.rela.ksites` applied.

struct Loaded {
    /// Address of each section (by index), if allocated.
    sec_addr: Vec<Option<u64>>,
    /// Section names by index.
    sec_name: Vec<String>,
    /// Imports' addresses in the "kernel".
    kernel: BTreeMap<String, u64>,
    exec: Vec<Range<u64>>,
    table: Vec<u8>,
    table_addr: u64,
}

impl Loaded {
    fn table(&self) -> Table<'_> {
        Table::parse(&self.table, self.table_addr, &self.exec)
            .unwrap_or_else(|e| panic!("Table::parse: {e}"))
    }

    /// (section name, offset) of a module address.
    fn place(&self, addr: u64) -> (String, u64) {
        let (i, base) = self
            .sec_addr
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|a| (i, a)))
            .filter(|&(_, a)| a <= addr)
            .max_by_key(|&(_, a)| a)
            .unwrap();
        (self.sec_name[i].clone(), addr - base)
    }
}

/// Lays the object out as the module loader does ([`layout`], the contract), gives every undefined symbol an address in a fake kernel text, and
/// applies `.rela.ksites` (only `R_X86_64_PC32` is accepted).
fn load(bytes: &[u8]) -> Loaded {
    let f = ElfFile64::<LE>::parse(bytes).unwrap();
    let shdrs = f.elf_section_table();
    let sec_name: Vec<String> = shdrs
        .iter()
        .map(|s| String::from_utf8_lossy(shdrs.section_name(LE, s).unwrap()).into())
        .collect();
    // The loader's own layout contract.
    let mut sec_addr = vec![None; shdrs.len()];
    layout::layout(
        shdrs.iter().map(layout::from_elf),
        MODULE_BASE,
        &mut |i, a| sec_addr[i] = Some(a),
    )
    .unwrap();
    let mut exec = Vec::new();
    for (i, s) in shdrs.iter().enumerate() {
        if let Some(a) = sec_addr[i]
            && layout::group(s.sh_flags(LE).0) == Some(layout::Group::Exec)
        {
            exec.push(a..a + s.sh_size(LE));
        }
    }
    let mut names: Vec<String> = f
        .symbols()
        .filter(|s| s.is_undefined() && s.index().0 != 0)
        .map(|s| s.name().unwrap().to_string())
        .collect();
    names.sort();
    let kernel: BTreeMap<String, u64> = names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, KERNEL_TEXT + 64 * i as u64))
        .collect();
    exec.push(KERNEL_TEXT..KERNEL_TEXT + 0x10000);

    let ks = f.section_by_name(SECTION_NAME).expect(".ksites");
    let table_addr = sec_addr[ks.index().0].expect(".ksites is allocated");
    let mut table = ks.data().unwrap().to_vec();
    let rela = f
        .sections()
        .find(|s| s.name() == Ok(".rela.ksites"))
        .expect(".rela.ksites");
    let rh = rela.elf_section_header();
    assert_eq!(rh.sh_type(LE), elf::SHT_RELA);
    assert_eq!(rh.sh_flags(LE), elf::SHF_INFO_LINK);
    assert_eq!(
        rh.sh_info(LE) as usize,
        ks.index().0,
        "sh_info names .ksites"
    );
    let symtab_index = f
        .sections()
        .find(|s| s.kind() == object::SectionKind::Metadata && s.name() == Ok(".symtab"))
        .unwrap()
        .index()
        .0;
    assert_eq!(
        rh.sh_link(LE) as usize,
        symtab_index,
        "sh_link names .symtab"
    );
    for (off, r) in ks.relocations() {
        assert_eq!(
            r.flags(),
            RelocationFlags::Elf {
                r_type: elf::R_X86_64_PC32
            },
            ".rela.ksites+{off:#x}"
        );
        let RelocationTarget::Symbol(si) = r.target() else {
            panic!("relocation without symbol")
        };
        let s = f.symbol_by_index(si).unwrap();
        let sv = if s.is_undefined() {
            kernel[s.name().unwrap()]
        } else {
            let base = sec_addr[s.section_index().unwrap().0].expect("allocated");
            if s.kind() == SymbolKind::Section {
                base
            } else {
                base + s.address()
            }
        };
        // The loader's own relocation arithmetic.
        kernel_loader::arch::x86_64::reloc::apply(
            elf::R_X86_64_PC32.0,
            &mut table[off as usize..],
            sv,
            r.addend(),
            table_addr + off,
        )
        .unwrap();
    }
    Loaded {
        sec_addr,
        sec_name,
        kernel,
        exec,
        table,
        table_addr,
    }
}

/// `.ksites` as the contract wants it: SHT_PROGBITS, SHF_ALLOC only, 8-aligned; every
/// field in the file is 0 where a relocation applies.
fn check_ksites_section(bytes: &[u8]) {
    let f = ElfFile64::<LE>::parse(bytes).unwrap();
    let ks = f.section_by_name(SECTION_NAME).unwrap();
    let h = ks.elf_section_header();
    assert_eq!(h.sh_type(LE), elf::SHT_PROGBITS);
    assert_eq!(h.sh_flags(LE), elf::SHF_ALLOC);
    assert_eq!(h.sh_addralign(LE), 8);
    let data = ks.data().unwrap();
    for (off, _) in ks.relocations() {
        assert_eq!(&data[off as usize..off as usize + 4], &[0; 4]);
    }
}

/// The raw relocations of every SHT_RELA section against symbols named by `pred`:
/// (target section name, r_offset, type, symbol name, addend).
fn raw_relocs(bytes: &[u8]) -> Vec<(String, u64, u32, String, i64)> {
    let f = ElfFile64::<LE>::parse(bytes).unwrap();
    ksites::elf::raw_relas(&f, bytes)
        .map(|r| {
            let target = f.section_by_index(object::SectionIndex(r.section)).unwrap();
            let sym = f
                .symbol_by_index(object::SymbolIndex(r.sym_index))
                .map(|s| s.name().unwrap_or("").to_string())
                .unwrap_or_default();
            let tname = target.name().unwrap().to_string();
            (tname, r.offset, r.r_type, sym, r.addend)
        })
        .collect()
}

fn section_bytes<'a>(bytes: &'a [u8], name: &str) -> &'a [u8] {
    let f = ElfFile64::<LE>::parse(bytes).unwrap();
    let s = f.section_by_name(name).unwrap();
    let (off, size) = s.file_range().unwrap();
    &bytes[off as usize..(off + size) as usize]
}

/// Symbol names the input's `.ksites_ifunc_imports` lists, sorted, distinct.
fn import_names(bytes: &[u8]) -> Vec<String> {
    let f = ElfFile64::<LE>::parse(bytes).unwrap();
    let mut v: Vec<String> = f
        .sections()
        .filter(|s| s.name() == Ok(IMPORT_SECTION))
        .flat_map(|s| s.relocations().collect::<Vec<_>>())
        .map(|(_, r)| {
            let RelocationTarget::Symbol(i) = r.target() else {
                panic!()
            };
            f.symbol_by_index(i).unwrap().name().unwrap().to_string()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Asserts the loaded table's ifunc sites equal what objdump shows for each ifunc
/// (`symbols[i]`: the symbol calls to ifunc `i` name), sorted by address.
fn check_sites(l: &Loaded, insns: &[RelocInsn], symbols: &[String]) {
    let t = l.table();
    assert_eq!(t.ifunc_count() as usize, symbols.len());
    let mut prev = 0;
    for (i, sym) in symbols.iter().enumerate() {
        let expected = branch_sites(insns, sym);
        let got: BTreeSet<(String, u64)> = t
            .sites()
            .filter(|s| s.ifunc == i as u32)
            .map(|s| l.place(s.addr))
            .collect();
        assert_eq!(got, expected, "sites of ifunc {i} ({sym})");
    }
    for s in t.sites() {
        assert!(s.addr > prev, "sites sorted by address");
        prev = s.addr;
    }
}

// ---------------------------------------------------------------------------------------

const C_MODULE: &str = r#"
#include "ksites_sdt.h"
#include "ksites_module.h"
extern unsigned int kpopcount(unsigned long x);
extern unsigned long ksum(const unsigned char *p, unsigned long n);
KSITES_IFUNC_IMPORT(kpopcount);
KSITES_IFUNC_IMPORT(ksum);
KSITES_IFUNC_IMPORT(kpopcount);
KSITES_PROBE_DECL(mod, hit, 2, (unsigned long a, unsigned long b))
unsigned long plain_helper(unsigned long x);
unsigned long count_bits(unsigned long x) {
    KSITES_PROBE(mod, hit, x, 1);
    return kpopcount(x) + kpopcount(x >> 1);
}
unsigned long tail_sum(const unsigned char *p, unsigned long n) { return ksum(p, n); }
int is_on(void) { return KSITES_PROBE_ENABLED(mod, hit); }
unsigned long maybe(unsigned long x) {
    if (KSITES_PROBE_ENABLED(mod, hit)) KSITES_PROBE(mod, hit, x, 2);
    return plain_helper(x) + kpopcount(x);
}
void fire(unsigned long x) { KSITES_PROBE(mod, hit, x, 3); }
unsigned int (*kpopcount_ptr)(unsigned long) = kpopcount;
"#;

#[test]
fn gcc_module_with_imports_and_c_probes() {
    let dir = tmpdir("gcc");
    let input = gcc_module(&dir, C_MODULE, "m.o");
    let before = std::fs::read(&input).unwrap();
    let output = dir.join("m.ksites.o");
    let o = embed(&input, &output);
    assert!(o.status.success(), "embed: {}", stderr(&o));
    assert_eq!(std::fs::read(&input).unwrap(), before, "input unchanged");
    let out = std::fs::read(&output).unwrap();
    check_ksites_section(&out);

    let insns = objdump_relocs(&input);
    let imports = import_names(&before);
    assert_eq!(imports, ["kpopcount", "ksum"]);
    let l = load(&out);
    let t = l.table();
    // Imports only: all-zero slot/resolver/default, trampoline in the kernel, by name.
    for (i, f) in t.ifuncs().enumerate() {
        assert!(f.imported, "{f:?}");
        assert_eq!(f.name, imports[i]);
        assert_eq!(f.trampoline, l.kernel[&imports[i]]);
    }
    check_sites(&l, &insns, &imports);
    // The address-taken kpopcount (in .data) is not a site; the tail call to ksum is.
    assert!(
        t.sites()
            .any(|s| s.kind == kernel_loader::format::SiteKind::Jmp)
    );

    // Probes: every call/jmp of the probe functions, per objdump.
    let c_probe_insns: Vec<&RelocInsn> = insns
        .iter()
        .filter(|r| r.target.starts_with("__dtrace") && is_branch(&r.mnemonic))
        .collect();
    assert!(c_probe_insns.len() >= 4, "{c_probe_insns:?}");
    assert_eq!(t.probe_count(), 1);
    let p = t.probe(0).unwrap();
    assert_eq!((p.provider, p.name, p.nargs), ("mod", "hit", 2));
    assert_eq!(t.probe_site_count() as usize, c_probe_insns.len());
    let got: BTreeSet<(String, u64)> = t.probe_sites().map(|s| l.place(s.addr)).collect();
    let expected: BTreeSet<(String, u64)> = c_probe_insns
        .iter()
        .map(|r| (r.section.clone(), r.insn))
        .collect();
    assert_eq!(got, expected);

    // Their bytes are the disabled forms; their relocations are R_X86_64_NONE, except
    // the is-enabled tail call's, now a PLT32 to ksites_probe_ret0 - 4.
    let text = section_bytes(&out, ".text");
    let relocs = raw_relocs(&out);
    let mut saw_tail_enabled = false;
    for s in t.probe_sites() {
        let (sec, off) = l.place(s.addr);
        assert_eq!(sec, ".text");
        let b = &text[off as usize..off as usize + 5];
        let rel: Vec<_> = relocs
            .iter()
            .filter(|r| r.0 == ".text" && r.1 == off + 1)
            .collect();
        assert_eq!(rel.len(), 1, "{rel:?}");
        let r = rel[0];
        match s.kind {
            ProbeKind::CEnabledTail => {
                saw_tail_enabled = true;
                assert_eq!(b, [0xe9, 0, 0, 0, 0]);
                assert_eq!(
                    (r.2, r.3.as_str(), r.4),
                    (elf::R_X86_64_PLT32.0, "ksites_probe_ret0", -4)
                );
            }
            kind => {
                let want = match kind {
                    ProbeKind::CCall => kernel_loader::arch::x86_64::NOP5,
                    ProbeKind::CTail => kernel_loader::probe::C_TAIL_OFF,
                    ProbeKind::CEnabled => kernel_loader::probe::C_ENABLED_OFF,
                    k => panic!("unexpected kind {k:?}"),
                };
                assert_eq!(b, want, "{kind:?}");
                assert_eq!(r.2, elf::R_X86_64_NONE.0, "{r:?}");
                assert!(r.3.starts_with("__dtrace"), "{r:?}");
            }
        }
    }
    assert!(saw_tail_enabled, "is_on's tail call is a CEnabledTail site");
    let kinds: BTreeSet<ProbeKind> = t.probe_sites().map(|s| s.kind).collect();
    assert!(
        kinds.is_superset(&BTreeSet::from([
            ProbeKind::CCall,
            ProbeKind::CTail,
            ProbeKind::CEnabled,
            ProbeKind::CEnabledTail
        ])),
        "{kinds:?}"
    );
    // No relocation in the output still applies a rel32 to a probe function.
    assert!(
        !relocs
            .iter()
            .any(|r| r.3.starts_with("__dtrace") && r.2 != elf::R_X86_64_NONE.0)
    );

    // Everything else is unchanged: the same symbols, the same other relocations.
    let syms = |b: &[u8]| -> BTreeSet<(String, u8, u64)> {
        let f = ElfFile64::<LE>::parse(b).unwrap();
        f.symbols()
            .filter(|s| s.kind() != SymbolKind::Section)
            .map(|s| {
                (
                    s.name().unwrap().to_string(),
                    s.elf_symbol().st_info().0,
                    s.address(),
                )
            })
            .collect()
    };
    let mut expected_syms = syms(&before);
    expected_syms.insert((
        "ksites_probe_ret0".into(),
        elf::SymbolInfo::new(elf::STB_GLOBAL, elf::STT_NOTYPE).0,
        0,
    ));
    assert_eq!(syms(&out), expected_syms);
    let keep = |v: Vec<(String, u64, u32, String, i64)>| -> BTreeSet<_> {
        v.into_iter()
            .filter(|r| {
                !r.3.starts_with("__dtrace") && r.3 != "ksites_probe_ret0" && r.0 != SECTION_NAME
            })
            .collect()
    };
    assert_eq!(keep(raw_relocs(&out)), keep(raw_relocs(&before)));

    // A partial link keeps the table and its relocations.
    let o = run(Command::new("ld.bfd")
        .args(["-r", "m.ksites.o", "-o", "linked.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "ld -r: {}", stderr(&o));
    let linked = std::fs::read(dir.join("linked.o")).unwrap();
    load(&linked).table();

    // Deterministic: a second run writes the same bytes.
    let o = embed(&input, &dir.join("m.again.o"));
    assert!(o.status.success(), "embed: {}", stderr(&o));
    assert_eq!(std::fs::read(dir.join("m.again.o")).unwrap(), out);

    // inspect and verify say clearly that they read linked images only.
    for cmd in ["inspect", "verify"] {
        let o = run(Command::new(KSITES).arg(cmd).arg(&output));
        assert!(!o.status.success());
        assert!(stderr(&o).contains("relocatable object"), "{}", stderr(&o));
    }

    // Embedding again is refused with exit code 3, and writes nothing.
    let again = dir.join("again.o");
    let o = embed(&output, &again);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("already"), "{}", stderr(&o));
    assert!(!again.exists());
}

const RUST_MODULE: &str = r#"
#![no_std]
use kernel_loader::{CpuFeatures, ifunc, ifunc_import, probe, probe_enabled};

unsafe extern "C" fn double_soft(x: u64) -> u64 { x.wrapping_mul(2) }
#[target_feature(enable = "popcnt")]
unsafe extern "C" fn double_fast(x: u64) -> u64 { x << 1 }
fn pick(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 {
    if f.contains(CpuFeatures::POPCNT) { double_fast } else { double_soft }
}
ifunc! {
    /// Doubles.
    pub fn mod_double(x: u64) -> u64;
    default = double_soft;
    resolver = pick;
}
unsafe extern "C" fn triple_soft(x: u64) -> u64 { x.wrapping_mul(3) }
fn pick3(_: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 { triple_soft }
ifunc! {
    /// Triples.
    pub fn mod_triple(x: u64) -> u64;
    default = triple_soft;
    resolver = pick3;
}
ifunc_import! {
    /// The kernel's popcount.
    pub fn kpopcount(x: u64) -> u32;
    /// The kernel's checksum.
    pub fn ksum(p: *const u8, n: usize) -> u64;
}
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn work(x: u64) -> u64 {
    probe!(modr, work, x);
    let a = mod_double(x);
    let b = kpopcount(a) as u64;
    if probe_enabled!(modr, check) { probe!(modr, check); }
    a + b + mod_double(b) + mod_triple(a)
}
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tail(x: u64) -> u32 { kpopcount(x ^ 3) }
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sum(p: *const u8, n: usize) -> u64 { ksum(p, n).wrapping_add(mod_triple(n as u64)) }
"#;

#[test]
fn rustc_module_with_ifunc_imports_and_probes() {
    let dir = tmpdir("rustc");
    let input = rustc_module(&dir, RUST_MODULE, "r.o");
    let before = std::fs::read(&input).unwrap();
    let output = dir.join("r.ksites.o");
    let o = embed(&input, &output);
    assert!(o.status.success(), "embed: {}", stderr(&o));
    assert_eq!(std::fs::read(&input).unwrap(), before, "input unchanged");
    let out = std::fs::read(&output).unwrap();
    check_ksites_section(&out);

    // Defined ifuncs: one record each; the trampoline symbol from its record's
    // relocation in the input.
    let f = ElfFile64::<LE>::parse(&before[..]).unwrap();
    let rec = f.section_by_name(RECORD_SECTION).unwrap();
    let n_defined = rec.size() as usize / RECORD_SIZE;
    assert_eq!(n_defined, 2);
    let mut tramp_syms: Vec<(u64, String)> = Vec::new();
    for (off, r) in rec.relocations() {
        if off as usize % RECORD_SIZE == ifunc_record::TRAMPOLINE {
            let RelocationTarget::Symbol(i) = r.target() else {
                panic!()
            };
            tramp_syms.push((off, f.symbol_by_index(i).unwrap().name().unwrap().into()));
        }
    }
    assert_eq!(tramp_syms.len(), n_defined);
    let imports = import_names(&before);
    assert_eq!(imports, ["kpopcount", "ksum"]);

    let l = load(&out);
    let t = l.table();
    assert_eq!(t.ifunc_count() as usize, n_defined + imports.len());
    // Defined first (sorted by trampoline address), then imports by name.
    let mut symbols = Vec::new();
    let fo = ElfFile64::<LE>::parse(&out[..]).unwrap();
    for (i, d) in t.ifuncs().enumerate() {
        if i < n_defined {
            assert!(!d.imported);
            assert!(d.name.ends_with("mod_double") || d.name.ends_with("mod_triple"));
            // The trampoline address is the trampoline symbol's, in the test's layout.
            let (sec, off) = l.place(d.trampoline);
            let sym = fo
                .symbols()
                .find(|s| {
                    s.kind() == SymbolKind::Text
                        && s.address() == off
                        && s.section_index().map(|x| l.sec_name[x.0].clone()) == Some(sec.clone())
                        && tramp_syms.iter().any(|t| t.1 == s.name().unwrap())
                })
                .unwrap_or_else(|| panic!("no trampoline symbol at {sec}+{off:#x}"));
            symbols.push(sym.name().unwrap().to_string());
            // The slot is in writable data, the default and resolver in text.
            assert!(!l.exec.iter().any(|r| r.contains(&d.slot)));
        } else {
            assert!(d.imported);
            assert_eq!(d.name, imports[i - n_defined]);
            assert_eq!(d.trampoline, l.kernel[d.name]);
            symbols.push(d.name.to_string());
        }
    }
    let insns = objdump_relocs(&input);
    check_sites(&l, &insns, &symbols);
    for (i, s) in symbols.iter().enumerate() {
        assert!(
            !branch_sites(&insns, s).is_empty(),
            "fixture: ifunc {i} ({s}) has calls"
        );
    }

    // Probes: one table site per record.
    let psec = f.section_by_name(SITE_RECORD_SECTION).unwrap();
    let n_sites = psec.size() as usize / SITE_RECORD_SIZE;
    assert_eq!(n_sites, 3);
    assert_eq!(t.probe_site_count() as usize, n_sites);
    let names: Vec<(String, String)> = t
        .probes()
        .map(|p| (p.provider.into(), p.name.into()))
        .collect();
    assert_eq!(
        names,
        [
            ("modr".to_string(), "check".to_string()),
            ("modr".into(), "work".into())
        ]
    );
    let kinds: Vec<ProbeKind> = t.probe_sites().map(|s| s.kind).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ProbeKind::RustEnabled)
            .count(),
        1
    );
    for s in t.probe_sites() {
        let (sec, off) = l.place(s.addr);
        assert_eq!(sec, ".text.work");
        assert_eq!(
            &section_bytes(&out, &sec)[off as usize..off as usize + 5],
            kernel_loader::arch::x86_64::NOP5
        );
        assert_eq!(l.place(s.target).0, ".text.work");
    }
    // Every probe record got its id; the same records, in the input, are unassigned.
    let mut ids = BTreeSet::new();
    for (off, r) in psec.relocations() {
        if off as usize % SITE_RECORD_SIZE != 24 {
            continue;
        }
        let RelocationTarget::Symbol(i) = r.target() else {
            panic!()
        };
        let s = f.symbol_by_index(i).unwrap();
        let sec = f.section_by_index(s.section_index().unwrap()).unwrap();
        let base = if s.kind() == SymbolKind::Section {
            0
        } else {
            s.address()
        } as i64
            + r.addend();
        let at = base as usize + record::ID;
        let id_of = |b: &[u8]| {
            u32::from_le_bytes(
                section_bytes(b, sec.name().unwrap())[at..at + 4]
                    .try_into()
                    .unwrap(),
            )
        };
        assert_eq!(id_of(&before), UNASSIGNED);
        ids.insert(id_of(&out));
    }
    assert_eq!(ids, BTreeSet::from([0, 1]));

    // A partial link with GNU ld keeps a valid table.
    let o = run(Command::new("ld.bfd")
        .args(["-r", "r.ksites.o", "-o", "linked.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "ld -r: {}", stderr(&o));
    let linked = std::fs::read(dir.join("linked.o")).unwrap();
    assert_eq!(load(&linked).table().site_count(), t.site_count());

    let o = embed(&output, &dir.join("again.o"));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}

#[test]
fn object_without_sites_gets_an_empty_table() {
    let dir = tmpdir("empty");
    let input = gcc_module(&dir, "int answer(void) { return 42; }\n", "e.o");
    let output = dir.join("e.ksites.o");
    let o = embed(&input, &output);
    assert!(o.status.success(), "embed: {}", stderr(&o));
    let out = std::fs::read(&output).unwrap();
    check_ksites_section(&out);
    let l = load(&out);
    let t = l.table();
    assert_eq!(
        (
            t.ifunc_count(),
            t.site_count(),
            t.probe_count(),
            t.probe_site_count()
        ),
        (0, 0, 0, 0)
    );
}

#[test]
fn a_section_aligned_to_zero_is_written_in_place() {
    // `sh_addralign` 0 means "no constraint" (like 1). object's builder once computed
    // `offset + (align - 1)` with it: a panic in a debug build, and in a release build
    // the section written at offset 0, over the ELF header (found by the elf_tools
    // fuzzer on an aarch64 object).
    let dir = tmpdir("align0");
    let src = "const char greeting[] = \"hello\";\nint answer(void) { return 42; }\n";
    let input = gcc_module(&dir, src, "a.o");
    let mut data = std::fs::read(&input).unwrap();
    let f = object::read::elf::ElfFile64::<LE>::parse(&*data).unwrap();
    let hdr = f.elf_header();
    let shoff = hdr.e_shoff.get(LE) as usize;
    let rodata = f
        .sections()
        .find(|s| s.name().is_ok_and(|n| n.starts_with(".rodata")))
        .expect("a .rodata section")
        .index()
        .0;
    drop(f);
    let at = shoff + 64 * rodata + 48; // sh_addralign
    data[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    let zero = dir.join("a0.o");
    std::fs::write(&zero, &data).unwrap();
    let output = dir.join("a0.ksites.o");
    let o = embed(&zero, &output);
    assert!(o.status.success(), "embed: {}", stderr(&o));
    let out = std::fs::read(&output).unwrap();
    assert_eq!(&out[..4], b"\x7fELF");
    check_ksites_section(&out);
    // The section's bytes survive at their own offset, and the module still loads.
    let before = object::read::elf::ElfFile64::<LE>::parse(&*data).unwrap();
    let after = object::read::elf::ElfFile64::<LE>::parse(&*out).unwrap();
    let bytes = |f: &object::read::elf::ElfFile64<'_, LE>| {
        f.sections()
            .find(|s| s.name().is_ok_and(|n| n.starts_with(".rodata")))
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    };
    assert_eq!(bytes(&before), bytes(&after));
    let l = load(&out);
    assert_eq!(l.table().ifunc_count(), 0);
}

#[test]
fn module_errors_are_clear() {
    let dir = tmpdir("errors");
    // An import the object defines.
    let input = gcc_module(
        &dir,
        "#include \"ksites_module.h\"\nKSITES_IFUNC_IMPORT(f);\nint f(void) { return 1; }\nint g(void) { return f() + 1; }\n",
        "d.o",
    );
    let o = embed(&input, &dir.join("d.out.o"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("defines it"), "{}", stderr(&o));
    assert!(!dir.join("d.out.o").exists());

    // A GNU ifunc.
    let input = gcc_module(
        &dir,
        "static int impl(void) { return 1; }\nstatic void *res(void) { return impl; }\nint f(void) __attribute__((ifunc(\"res\")));\nint g(void) { return f(); }\n",
        "g.o",
    );
    let o = embed(&input, &dir.join("g.out.o"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("STT_GNU_IFUNC"), "{}", stderr(&o));
}

#[test]
fn sites_in_several_sections_sort_by_section_index() {
    // -ffunction-sections: every function in its own section, all at offset 0 -- equal
    // offsets in different sections are different sites, sorted by section index.
    let dir = tmpdir("sections");
    let src = "#include \"ksites_module.h\"\nextern int k(int);\nKSITES_IFUNC_IMPORT(k);\n\
               int a(int x) { return k(x) + 1; }\nint b(int x) { return k(x) + 2; }\n\
               int c(int x) { return k(x); }\n";
    std::fs::write(dir.join("s.c"), src).unwrap();
    let o = run(Command::new("gcc")
        .args([
            "-c",
            "-O2",
            "-fno-pic",
            "-mcmodel=kernel",
            "-ffunction-sections",
            "-fcf-protection=none",
            "-I",
        ])
        .arg(header_dir())
        .args(["s.c", "-o", "s.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    let o = embed(&dir.join("s.o"), &dir.join("s.ksites.o"));
    assert!(o.status.success(), "embed: {}", stderr(&o));
    let out = std::fs::read(dir.join("s.ksites.o")).unwrap();
    let l = load(&out);
    let insns = objdump_relocs(&dir.join("s.o"));
    check_sites(&l, &insns, &["k".to_string()]);
    let secs: Vec<String> = l.table().sites().map(|s| l.place(s.addr).0).collect();
    assert_eq!(secs, [".text.a", ".text.b", ".text.c"]);
}

#[test]
fn comdat_group_signature_follows_added_section_symbols() {
    // GNU as emits no section symbol for these sections; `embed` adds local ones, which
    // renumbers the globals: the group's signature (a symbol index in sh_info) must
    // still name `foo`, and GNU ld must still accept the object.
    let dir = tmpdir("group");
    std::fs::write(
        dir.join("g.s"),
        ".section .text.foo,\"axG\",@progbits,foo,comdat\n.globl foo\n.type foo,@function\n\
         foo: call k\n ret\n.size foo, .-foo\n.text\n.globl bar\n.type bar,@function\n\
         bar: call foo\n jmp k\n.size bar, .-bar\n\
         .section .ksites_ifunc_imports,\"\",@progbits\n.quad k\n",
    )
    .unwrap();
    let o = run(Command::new("gcc")
        .args(["-c", "g.s", "-o", "g.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    let o = embed(&dir.join("g.o"), &dir.join("g.ksites.o"));
    assert!(o.status.success(), "embed: {}", stderr(&o));
    let out = std::fs::read(dir.join("g.ksites.o")).unwrap();
    let signature = |b: &[u8]| -> String {
        let f = ElfFile64::<LE>::parse(b).unwrap();
        let g = f
            .elf_section_table()
            .iter()
            .find(|s| s.sh_type(LE) == elf::SHT_GROUP)
            .unwrap();
        let i = g.sh_info(LE) as usize;
        f.symbol_by_index(object::SymbolIndex(i))
            .unwrap()
            .name()
            .unwrap()
            .to_string()
    };
    assert_eq!(signature(&std::fs::read(dir.join("g.o")).unwrap()), "foo");
    assert_eq!(signature(&out), "foo");
    let l = load(&out);
    let insns = objdump_relocs(&dir.join("g.o"));
    check_sites(&l, &insns, &["k".to_string()]);
    let o = run(Command::new("ld.bfd")
        .args(["-r", "g.ksites.o", "-o", "linked.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "ld -r: {}", stderr(&o));
}

// ---------------------------------------------------------------------------------------
// The layout contract's one former disagreement: a read-only `SHT_NOBITS` section.

/// A module in assembly (so the section order is exact): a read-only NOBITS section,
/// then text with a hand-written ifunc (trampoline, default, resolver, a call site),
/// then the writable section holding its slot.
const RO_NOBITS_SRC: &str = r#"
    .section .rodata.zeros,"a",@nobits
    .balign 64
    .space 0x2800
    .text
    .globl f
f:  jmp *f_slot(%rip)
    .balign 16
f_default:
    mov %rdi, %rax
    ret
f_resolve:
    lea f_default(%rip), %rax
    ret
    .globl work
work:
    call f
    ret
    .section .data.slot,"aw",@progbits
    .balign 8
f_slot: .quad f_default
    .section .rodata.name,"a",@progbits
f_name: .ascii "f"
    .section .ksites_ifuncs,"aw",@progbits
    .balign 8
    .ascii "KSIF"
    .long 1
    .quad f, f_slot, f_resolve, f_default, f_name, 1
"#;

/// `ksites embed` lays a module out by the loader's contract: a read-only NOBITS
/// section is read-only data for both (it once went to the writable group in `embed`,
/// shifting every writable section after it: the addresses `embed` reported and
/// checked its table at were not where the loader puts them).
#[test]
fn read_only_nobits_is_read_only_data_for_embed_and_loader() {
    use kernel_loader::module::{self, Kernel};
    let dir = tmpdir("ro_nobits");
    std::fs::write(dir.join("n.s"), RO_NOBITS_SRC).unwrap();
    let o = run(Command::new("gcc")
        .args(["-c", "n.s", "-o", "n.o"])
        .current_dir(&dir));
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    let obj = std::fs::read(dir.join("n.o")).unwrap();

    // The case: a read-only NOBITS section, with a writable section after it.
    let f = ElfFile64::<LE>::parse(&obj[..]).unwrap();
    let zeros = f.section_by_name(".rodata.zeros").expect(".rodata.zeros");
    let zh = zeros.elf_section_header();
    assert_eq!(zh.sh_type(LE), elf::SHT_NOBITS);
    assert_eq!(zh.sh_flags(LE), elf::SHF_ALLOC);
    let slot_sec = f.section_by_name(".data.slot").expect(".data.slot");
    assert!(
        slot_sec.index().0 > zeros.index().0,
        "the slot's section comes after"
    );

    // Where `embed` put the ifunc's slot (its virtual layout starts at one page).
    let (out, report) = ksites::embed::embed_bytes("n.o", &obj).unwrap();
    assert_eq!(report.ifuncs.len(), 1);
    let embed_slot = report.ifuncs[0].slot - layout::PAGE_SIZE as u64;
    let file = ElfFile64::<LE>::parse(&out[..]).unwrap();
    let v = ksites::embed_rel::VirtualLayout::new(&file, layout::PAGE_SIZE as u64).unwrap();
    let groups = layout::layout(
        file.elf_section_table().iter().map(layout::from_elf),
        layout::PAGE_SIZE as u64,
        &mut |_, _| {},
    )
    .unwrap();
    let zeros_addr = v.sections[zeros.index().0].unwrap();
    assert!(
        groups.read_only.contains(&zeros_addr),
        "embed placed .rodata.zeros at {zeros_addr:#x}, outside the read-only group {:?}",
        groups.read_only
    );

    // Where the loader put it: its relocated table, read back from its memory.
    let exports: [module::Export; 0] = [];
    let k = Kernel {
        symbols: &exports,
        table: None,
        exec: &[],
        features: kernel_loader::CpuFeatures::empty(),
    };
    let mut mem = HostMemory::at(MODULE_BASE);
    let r = module::check(&out, &k, &mut mem, &mut |e| panic!("{e}")).unwrap();
    assert!(r.ro_size >= 0x2800, "the zeros are read-only: {r:?}");
    let region = &mem.last;
    let at = region
        .windows(8)
        .position(|w| w == kernel_loader::format::MAGIC)
        .expect("the table in the module's memory");
    let text = MODULE_BASE..MODULE_BASE + r.text_size as u64;
    let t = Table::parse(&region[at..], MODULE_BASE + at as u64, &[text]).unwrap();
    let loader_slot = t.ifuncs().next().unwrap().slot - MODULE_BASE;
    assert!(
        loader_slot >= (r.text_size + r.ro_size) as u64,
        "slot in writable data"
    );
    assert_eq!(
        embed_slot, loader_slot,
        "embed's layout and the loader's disagree on the slot's place"
    );
}
