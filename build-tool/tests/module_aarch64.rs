//! aarch64 modules on the x86-64 host: real objects from `aarch64-linux-gnu-gcc` (C with
//! kernel-like flags, and assembly naming every relocation type the loader applies) and
//! from `rustc --target aarch64-unknown-none`, relocated by kernel-loader's module
//! loader into a host buffer at a chosen address, then checked three ways:
//!
//! 1. every relocated instruction and data field is decoded here (from the ARM ARM
//!    encodings, independently of the loader's encoder) and must compute the symbol's
//!    address plus the addend;
//! 2. the same object linked by GNU `aarch64-linux-gnu-ld` with a script that puts every
//!    section at the loader's address and every kernel symbol at its export address
//!    must have byte-identical sections;
//! 3. each checked type overflows (or is misaligned) with a symbol out of range, and
//!    the error names the section, offset, symbol and type; far `bl`/`b` go through a
//!    veneer the loader builds.
//!
//! The cross tools come from the Debian packages `gcc-aarch64-linux-gnu` and
//! `binutils-aarch64-linux-gnu`, and rustc's `aarch64-unknown-none` target (`rustup
//! target add aarch64-unknown-none`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::CpuFeatures;
use kernel_loader::module::{
    self, Kernel, LoadReport, ModuleError, ModuleMemory, Prot, ProtectError, Region, RelocFailure,
    layout,
};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{
    LittleEndian as LE, Object as _, ObjectSection as _, ObjectSymbol as _, RelocationFlags,
    RelocationTarget, SymbolSection,
};

const GCC: &str = "aarch64-linux-gnu-gcc";
const LD: &str = "aarch64-linux-gnu-ld";
/// Where modules are laid out.
const BASE: u64 = 0x1_0000_0000;
/// Where the kernel's exports lie by default: 16 MiB below the module, in `bl` reach.
const KERNEL: u64 = BASE - (16 << 20);
/// The C flags of an arm64 kernel module.
const KERNEL_CFLAGS: [&str; 7] = [
    "-c",
    "-O2",
    "-fno-pic",
    "-mgeneral-regs-only",
    "-ffreestanding",
    "-fno-asynchronous-unwind-tables",
    "-fno-common",
];

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd:?}: {e} (install gcc-aarch64-linux-gnu / binutils-aarch64-linux-gnu)"
        )
    })
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("module_aarch64_{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `src` (C, or assembly if `name` ends in `.S`) with `flags`.
fn gcc(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    std::fs::write(dir.join(name), src).unwrap();
    let out = dir.join(format!("{name}.o"));
    ok(
        run(Command::new(GCC)
            .args(flags)
            .arg("-c")
            .arg(name)
            .arg("-o")
            .arg(&out)
            .current_dir(dir)),
        name,
    );
    out
}

/// Compiles a `no_std` Rust library to one aarch64 object.
fn rustc(dir: &Path, name: &str, src: &str) -> PathBuf {
    std::fs::write(dir.join(format!("{name}.rs")), src).unwrap();
    let out = dir.join(format!("{name}.o"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    ok(
        run(Command::new(rustc)
            .args([
                "--target",
                "aarch64-unknown-none",
                "--crate-type=lib",
                "--emit=obj",
                "-C",
                "relocation-model=static",
                "-C",
                "panic=abort",
                "-C",
                "opt-level=2",
                "-C",
                "codegen-units=1",
                "-o",
            ])
            .arg(&out)
            .arg(format!("{name}.rs"))
            .current_dir(dir)),
        name,
    );
    out
}

/// Host memory posing as kernel memory at [`BASE`]; it keeps every region's bytes
/// (free drops nothing), so a test reads what the loader wrote.
#[derive(Default)]
struct Keep {
    bufs: Vec<(u64, Vec<u8>)>,
}

impl ModuleMemory for Keep {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        let mut v = vec![0u8; size];
        let r = Region {
            ptr: v.as_mut_ptr(),
            addr: BASE,
            size,
        };
        self.bufs.push((BASE, v));
        Some(r)
    }

    unsafe fn protect(
        &mut self,
        _: &Region,
        _: usize,
        _: usize,
        _: Prot,
    ) -> Result<(), ProtectError> {
        Ok(())
    }

    unsafe fn free(&mut self, _: Region) {}
}

impl Keep {
    fn read(&self, addr: u64, len: usize) -> &[u8] {
        let (base, v) = self.bufs.last().unwrap();
        let off = (addr - base) as usize;
        &v[off..off + len]
    }

    fn u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.read(addr, 4).try_into().unwrap())
    }
}

struct Exports(BTreeMap<String, u64>);

impl module::Symbols for Exports {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }
}

/// Loads (checks) `obj` at [`BASE`] against `exports`: the report and the memory, or
/// every problem.
fn load(obj: &[u8], exports: &Exports) -> Result<(LoadReport, Keep), Vec<ModuleError>> {
    let exec = vec![std::ops::Range {
        start: KERNEL - (1 << 30),
        end: BASE,
    }];
    let k = Kernel {
        symbols: exports,
        table: None,
        exec: &exec,
        features: CpuFeatures::empty(),
    };
    let mut mem = Keep::default();
    let mut problems = Vec::new();
    match module::check(obj, &k, &mut mem, &mut |e| problems.push(e)) {
        Ok(r) if problems.is_empty() => Ok((r, mem)),
        Ok(_) => Err(problems),
        Err(e) => {
            if !problems.contains(&e) {
                problems.push(e);
            }
            Err(problems)
        }
    }
}

/// Every undefined symbol of `f` at a distinct address 16 bytes apart from `KERNEL`,
/// overridden by `fixed`.
fn exports_for(f: &ElfFile64<'_, LE>, fixed: &[(&str, u64)]) -> Exports {
    exports_at(f, KERNEL, fixed)
}

/// Every undefined symbol of `f` at a distinct address 16 bytes apart from `kernel`,
/// overridden by `fixed`.
fn exports_at(f: &ElfFile64<'_, LE>, kernel: u64, fixed: &[(&str, u64)]) -> Exports {
    let mut m = BTreeMap::new();
    for s in f.symbols().filter(|s| s.is_undefined()) {
        let n = s.name().unwrap();
        if !n.is_empty() {
            let a = kernel + 16 * m.len() as u64;
            m.insert(n.to_string(), a);
        }
    }
    for (n, a) in fixed {
        m.insert(n.to_string(), *a);
    }
    Exports(m)
}

/// Each section's address by the layout contract at [`BASE`].
fn section_addrs(f: &ElfFile64<'_, LE>) -> Vec<Option<u64>> {
    let headers = f.elf_section_table();
    let mut v = vec![None; headers.len()];
    layout::layout(headers.iter().map(layout::from_elf), BASE, &mut |i, a| {
        v[i] = Some(a)
    })
    .unwrap();
    v
}

fn sext(v: u64, bits: u32) -> i64 {
    ((v << (64 - bits)) as i64) >> (64 - bits)
}

/// What the relocated field at `p` computes, decoded from the ARM ARM encodings, and
/// what it must equal given `sa` = S + A: `(found, wanted)`.
fn decode(r_type: u32, mem: &Keep, p: u64, sa: u64) -> (u64, u64) {
    let w = u64::from(mem.u32(p));
    let page = |v: u64| v & !0xfff;
    let bits = |lo: u32, n: u32| (w >> lo) & ((1 << n) - 1);
    let pc = |imm: i64| p.wrapping_add_signed(imm);
    let lo12 = |scale: u32| (bits(10, 12) << scale, sa & 0xfff);
    match elf::RelocationType(r_type) {
        elf::R_AARCH64_ABS64 => (u64::from_le_bytes(mem.read(p, 8).try_into().unwrap()), sa),
        elf::R_AARCH64_PREL64 => (
            u64::from_le_bytes(mem.read(p, 8).try_into().unwrap()),
            sa.wrapping_sub(p),
        ),
        elf::R_AARCH64_ABS32 => (w, sa),
        elf::R_AARCH64_PREL32 => (sext(w, 32) as u64, sa.wrapping_sub(p)),
        elf::R_AARCH64_ABS16 => (w & 0xffff, sa),
        elf::R_AARCH64_PREL16 => (sext(w & 0xffff, 16) as u64, sa.wrapping_sub(p)),
        elf::R_AARCH64_CALL26 | elf::R_AARCH64_JUMP26 => (pc(sext(bits(0, 26), 26) * 4), sa),
        elf::R_AARCH64_CONDBR19 | elf::R_AARCH64_LD_PREL_LO19 => {
            (pc(sext(bits(5, 19), 19) * 4), sa)
        }
        elf::R_AARCH64_TSTBR14 => (pc(sext(bits(5, 14), 14) * 4), sa),
        elf::R_AARCH64_ADR_PREL_LO21 => (pc(sext(bits(5, 19) << 2 | bits(29, 2), 21)), sa),
        elf::R_AARCH64_ADR_PREL_PG_HI21 | elf::R_AARCH64_ADR_PREL_PG_HI21_NC => (
            page(p).wrapping_add_signed(sext(bits(5, 19) << 2 | bits(29, 2), 21) << 12),
            page(sa),
        ),
        elf::R_AARCH64_ADD_ABS_LO12_NC | elf::R_AARCH64_LDST8_ABS_LO12_NC => lo12(0),
        elf::R_AARCH64_LDST16_ABS_LO12_NC => lo12(1),
        elf::R_AARCH64_LDST32_ABS_LO12_NC => lo12(2),
        elf::R_AARCH64_LDST64_ABS_LO12_NC => lo12(3),
        elf::R_AARCH64_LDST128_ABS_LO12_NC => lo12(4),
        elf::R_AARCH64_MOVW_UABS_G0 | elf::R_AARCH64_MOVW_UABS_G0_NC => (bits(5, 16), sa & 0xffff),
        elf::R_AARCH64_MOVW_UABS_G1 | elf::R_AARCH64_MOVW_UABS_G1_NC => {
            (bits(5, 16), (sa >> 16) & 0xffff)
        }
        elf::R_AARCH64_MOVW_UABS_G2 | elf::R_AARCH64_MOVW_UABS_G2_NC => {
            (bits(5, 16), (sa >> 32) & 0xffff)
        }
        elf::R_AARCH64_MOVW_UABS_G3 => (bits(5, 16), sa >> 48),
        t => panic!("no decoder for relocation type {}", t.0),
    }
}

/// Loads `path` with its kernel symbols from `kernel` on (some `fixed`), then checks
/// every relocation by decoding it, and compares every section with GNU ld's link at
/// the same addresses. Returns the relocation types seen.
fn check_object(dir: &Path, path: &Path, kernel: u64, fixed: &[(&str, u64)]) -> BTreeSet<u32> {
    let bytes = std::fs::read(path).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_at(&f, kernel, fixed);
    let (report, mem) =
        load(&bytes, &exports).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    assert_eq!(
        report.veneers,
        0,
        "{}: every export is in reach",
        path.display()
    );
    let addrs = section_addrs(&f);
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    for sec in f.sections() {
        let Some(base) = addrs[sec.index().0] else {
            continue;
        };
        for (off, r) in sec.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                unreachable!()
            };
            let r_type = r_type.0;
            if r_type == elf::R_AARCH64_NONE.0 {
                continue;
            }
            let RelocationTarget::Symbol(si) = r.target() else {
                panic!("relocation without a symbol")
            };
            let sym = f.symbol_by_index(si).unwrap();
            let s = match sym.section() {
                SymbolSection::Section(i) => addrs[i.0].unwrap() + sym.address(),
                SymbolSection::Undefined => exports.0[sym.name().unwrap()],
                SymbolSection::Absolute => sym.address(),
                other => panic!("symbol in {other:?}"),
            };
            let sa = s.wrapping_add_signed(r.addend());
            let p = base + off;
            let (found, wanted) = decode(r_type, &mem, p, sa);
            assert_eq!(
                found,
                wanted,
                "{}: {} at {}+{off:#x} against {}",
                path.display(),
                kernel_loader::arch::aarch64::reloc::name(r_type),
                sec.name().unwrap(),
                sym.name().unwrap()
            );
            seen.insert(r_type);
            checked += 1;
        }
    }
    assert!(checked > 0, "{}: no relocations", path.display());
    assert_eq!(report.relocations, checked, "{}", path.display());
    compare_with_ld(dir, path, &f, &addrs, &exports, &mem);
    seen
}

/// Links `path` with GNU ld, every allocated section at the loader's address and every
/// export at its address, and compares the bytes of every section.
fn compare_with_ld(
    dir: &Path,
    path: &Path,
    f: &ElfFile64<'_, LE>,
    addrs: &[Option<u64>],
    exports: &Exports,
    mem: &Keep,
) {
    let file = path.file_name().unwrap().to_str().unwrap();
    let mut script = String::from("SECTIONS {\n");
    for (n, a) in &exports.0 {
        script += &format!("  {n} = {a:#x};\n");
    }
    let mut placed = Vec::new();
    for sec in f.sections() {
        if let Some(a) = addrs[sec.index().0] {
            let name = sec.name().unwrap();
            let out = format!(".ks{}", sec.index().0);
            script += &format!("  {out} {a:#x} : {{ KEEP({file}({name})) }}\n");
            placed.push((out, a, sec.size(), sec.elf_section_header().sh_type(LE)));
        }
    }
    script += "  /DISCARD/ : { *(.comment) *(.note.*) }\n}\n";
    let name = format!("{file}.ld");
    std::fs::write(dir.join(&name), &script).unwrap();
    let out = format!("{file}.elf");
    ok(
        run(Command::new(LD)
            .args(["-T", &name, "-e", "0", "-o", &out, file])
            .current_dir(dir)),
        &format!("ld {file}"),
    );
    let linked = std::fs::read(dir.join(&out)).unwrap();
    let lf = ElfFile64::<LE>::parse(&*linked).unwrap();
    let mut compared = 0;
    for (out, a, size, ty) in placed {
        if ty == elf::SHT_NOBITS || size == 0 {
            continue;
        }
        let s = lf
            .section_by_name(&out)
            .unwrap_or_else(|| panic!("{file}: ld has no {out}"));
        assert_eq!(s.address(), a, "{file}: {out}");
        assert_eq!(
            s.data().unwrap(),
            mem.read(a, size as usize),
            "{file}: {out} differs from ld's"
        );
        compared += 1;
    }
    assert!(compared > 0);
}

/// The types the loader must apply (the issue's list), each seen in a real object.
const REQUIRED: [elf::RelocationType; 22] = [
    elf::R_AARCH64_ABS64,
    elf::R_AARCH64_ABS32,
    elf::R_AARCH64_PREL64,
    elf::R_AARCH64_PREL32,
    elf::R_AARCH64_CALL26,
    elf::R_AARCH64_JUMP26,
    elf::R_AARCH64_ADR_PREL_PG_HI21,
    elf::R_AARCH64_ADR_PREL_PG_HI21_NC,
    elf::R_AARCH64_ADD_ABS_LO12_NC,
    elf::R_AARCH64_LDST8_ABS_LO12_NC,
    elf::R_AARCH64_LDST16_ABS_LO12_NC,
    elf::R_AARCH64_LDST32_ABS_LO12_NC,
    elf::R_AARCH64_LDST64_ABS_LO12_NC,
    elf::R_AARCH64_LDST128_ABS_LO12_NC,
    elf::R_AARCH64_MOVW_UABS_G0,
    elf::R_AARCH64_MOVW_UABS_G1,
    elf::R_AARCH64_MOVW_UABS_G2,
    elf::R_AARCH64_MOVW_UABS_G3,
    elf::R_AARCH64_CONDBR19,
    elf::R_AARCH64_TSTBR14,
    elf::R_AARCH64_ADR_PREL_LO21,
    elf::R_AARCH64_LD_PREL_LO19,
];

/// C a kernel module is made of: kernel calls (`bl`), tail calls (`b`), globals of
/// every access size through `adrp` + `:lo12:`, pointers in data, a jump table.
const C_MODULE: &str = r#"
extern int kcounter;
extern void klog(int);
extern long kread(const char *);
struct pair { long a, b; } __attribute__((aligned(16)));
static unsigned char b8[64];
static unsigned short h16[64];
static unsigned int w32[64];
static unsigned long x64[64];
static struct pair q128[8];
const char *greeting = "module says hello";
int *counter_p = &kcounter;
void (*log_p)(int) = klog;
__attribute__((noinline)) static long mix(long x) { return x * 7 + b8[x & 63]; }
long entry(long x) {
    klog((int)x);
    b8[x & 63]++; h16[x & 63] += 2; w32[x & 63] += 3; x64[x & 63] += 4;
    q128[x & 7].a += x;
    return mix(x) + kcounter + kread(greeting) + h16[1] + w32[2] + x64[3] + q128[x & 7].b;
}
int pick(int x) {
    switch (x) {
    case 0: return kcounter;
    case 1: return w32[1];
    case 2: return (int)mix(2);
    case 3: return h16[3];
    case 4: return b8[4];
    case 5: return 77;
    default: return -1;
    }
}
void tail(int x) { klog(x + 1); }
int ksites_module_init(void) { kcounter = 0; return 0; }
"#;

/// Every instruction form with the relocation the loader must apply, against kernel
/// symbols, local symbols in other sections and absolute ones.
const ASM_MODULE: &str = r#"
    .text
    .globl  a_fn
a_fn:
    bl      kfunc
    b       kfunc
    b.eq    other
    cbz     x0, other
    tbz     w0, #3, other
    tbnz    x1, #40, other
    adr     x2, data_start
    ldr     x8, lit
    adrp    x3, data_start
    add     x3, x3, :lo12:data_start
    adrp    x4, :pg_hi21_nc:kvar
    ldrb    w5, [x3, :lo12:d8]
    ldrh    w5, [x3, :lo12:d16]
    ldr     w5, [x3, :lo12:d32]
    ldr     x5, [x3, :lo12:d64]
    ldr     q0, [x3, :lo12:d128]
    movz    x6, #:abs_g3:kvar
    movk    x6, #:abs_g2_nc:kvar
    movk    x6, #:abs_g1_nc:kvar
    movk    x6, #:abs_g0_nc:kvar
    movz    x7, #:abs_g0:ksmall
    movz    x7, #:abs_g1:kvar
    movz    x7, #:abs_g2:kvar
    ret
    .section .text.other,"ax",@progbits
    .globl  other
other:
    ret
    .section .rodata.lit,"a",@progbits
    .balign 8
    .globl  lit
lit:
    .xword  kvar
    .data
    .balign 16
data_start:
    .xword  kvar
    .word   kvar
    .word   kfunc - .
    .xword  kfunc - .
    .hword  ksmall
    .hword  lit - .
    .balign 16
d8:     .byte 1
    .balign 2
d16:    .hword 2
    .balign 4
d32:    .word 3
    .balign 8
d64:    .xword 4
    .balign 16
d128:   .xword 5, 6
"#;

#[test]
fn gcc_asm_and_rustc_objects_relocate_like_gnu_ld() {
    let d = tmpdir("ld");
    let mut seen = BTreeSet::new();
    let mut flagsets: Vec<Vec<&str>> = Vec::new();
    for extra in [
        &["-mcmodel=small"][..],
        &["-mcmodel=small", "-ffunction-sections", "-fdata-sections"],
        &["-mcmodel=large"],
        &["-mcmodel=tiny"],
        &["-Os", "-mcmodel=small"],
    ] {
        flagsets.push(
            KERNEL_CFLAGS
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .collect(),
        );
    }
    for (i, flags) in flagsets.iter().enumerate() {
        let o = gcc(&d, &format!("c{i}.c"), C_MODULE, flags);
        // The tiny model reaches everything with `adr` (±1 MiB): its kernel is near.
        let kernel = if flags.contains(&"-mcmodel=tiny") {
            BASE - (256 << 10)
        } else {
            KERNEL
        };
        seen.extend(check_object(&d, &o, kernel, &[]));
    }
    let o = gcc(&d, "all.S", ASM_MODULE, &["-c"]);
    // `ksmall` must fit 16 bits for the checked G0 form.
    seen.extend(check_object(&d, &o, KERNEL, &[("ksmall", 0x1234)]));
    let r = rustc(
        &d,
        "rmod",
        r#"#![no_std]
unsafe extern "C" { fn klog(x: i32); static kcounter: i32; }
static mut TABLE: [u64; 8] = [0; 8];
static NAMES: [&str; 2] = ["one", "two"];
#[unsafe(no_mangle)]
pub extern "C" fn rs_entry(x: usize) -> u64 {
    unsafe {
        klog(x as i32);
        TABLE[x & 7] += 1;
        TABLE[x & 7] + kcounter as u64 + NAMES[x & 1].len() as u64
    }
}
"#,
    );
    seen.extend(check_object(&d, &r, KERNEL, &[]));
    let missing: Vec<_> = REQUIRED
        .iter()
        .filter(|t| !seen.contains(&t.0))
        .map(|&t| kernel_loader::arch::aarch64::reloc::name(t.0))
        .collect();
    assert!(missing.is_empty(), "never exercised: {missing:?}");
}

/// One instruction (or data directive) against `ksym`, placed at `at`: the error.
fn one_error(d: &Path, name: &str, insn: &str, at: u64) -> (ModuleError, String) {
    let src = format!("    .text\n    nop\n    {insn}\n    ret\n");
    let o = gcc(d, &format!("{name}.S"), &src, &["-c"]);
    let bytes = std::fs::read(o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_for(&f, &[("ksym", at)]);
    let e = load(&bytes, &exports)
        .err()
        .unwrap_or_else(|| panic!("{name}: loaded"));
    assert_eq!(e.len(), 1, "{name}: {e:?}");
    (e[0], e[0].to_string())
}

#[test]
fn every_checked_type_overflows_with_a_clear_error() {
    let d = tmpdir("overflow");
    let text = BASE; // `.text` is the module's first section; the insn is at +4.
    for (name, insn, at, type_name) in [
        (
            "condbr",
            "b.ne ksym",
            text + (1 << 20) + 4,
            "R_AARCH64_CONDBR19",
        ),
        (
            "cbz",
            "cbz x0, ksym",
            text + 4 - (1 << 20) - 4,
            "R_AARCH64_CONDBR19",
        ),
        (
            "tbz",
            "tbz w1, #2, ksym",
            text + 4 + (1 << 15),
            "R_AARCH64_TSTBR14",
        ),
        (
            "adr",
            "adr x0, ksym",
            text + 4 + (1 << 20),
            "R_AARCH64_ADR_PREL_LO21",
        ),
        (
            "ldr",
            "ldr x0, ksym",
            text + 4 + (1 << 20),
            "R_AARCH64_LD_PREL_LO19",
        ),
        (
            "adrp",
            "adrp x0, ksym",
            text + (4 << 30),
            "R_AARCH64_ADR_PREL_PG_HI21",
        ),
        (
            "g0",
            "movz x0, #:abs_g0:ksym",
            0x1_0000,
            "R_AARCH64_MOVW_UABS_G0",
        ),
        (
            "g1",
            "movz x0, #:abs_g1:ksym",
            1 << 32,
            "R_AARCH64_MOVW_UABS_G1",
        ),
        (
            "g2",
            "movz x0, #:abs_g2:ksym",
            1 << 48,
            "R_AARCH64_MOVW_UABS_G2",
        ),
        ("abs32", ".word ksym", 1 << 32, "R_AARCH64_ABS32"),
        (
            "prel32",
            ".word ksym - .",
            text + (8 << 30),
            "R_AARCH64_PREL32",
        ),
        ("abs16", ".hword ksym", 1 << 16, "R_AARCH64_ABS16"),
        (
            "prel16",
            ".hword ksym - .",
            text + (1 << 17),
            "R_AARCH64_PREL16",
        ),
    ] {
        let (e, s) = one_error(&d, name, insn, at);
        let ModuleError::RelocationFailed {
            machine,
            offset,
            at: place,
            why,
            ..
        } = e
        else {
            panic!("{name}: {e:?}")
        };
        assert_eq!(machine, 183);
        assert_eq!(
            (place.section(), place.symbol(), offset),
            (".text", "ksym", 4),
            "{name}"
        );
        assert!(
            matches!(why, RelocFailure::Overflow { .. }),
            "{name}: {why:?}"
        );
        assert!(
            s.starts_with(&format!("aarch64 relocation {type_name} (")),
            "{name}: {s}"
        );
        assert!(
            s.contains("against `ksym` in .text at offset 0x4 overflows: "),
            "{s}"
        );
    }
    // In range at the limit, they load (the checks are not off by one).
    for (name, insn, at) in [
        ("condbr_ok", "b.ne ksym", BASE + 4 + (1 << 20) - 4),
        ("tbz_ok", "tbz w1, #2, ksym", BASE + 4 - (1 << 15)),
        ("g0_ok", "movz x0, #:abs_g0:ksym", 0xffff),
        ("g2_ok", "movz x0, #:abs_g2:ksym", (1 << 48) - 1),
        ("adrp_ok", "adrp x0, ksym", BASE + (4 << 30) - 4096),
    ] {
        let src = format!("    .text\n    nop\n    {insn}\n    ret\n");
        let o = gcc(&d, &format!("{name}.S"), &src, &["-c"]);
        let bytes = std::fs::read(o).unwrap();
        let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
        let r = load(&bytes, &exports_for(&f, &[("ksym", at)]));
        assert!(r.is_ok(), "{name}: {:?}", r.err());
    }
    // Misaligned :lo12: accesses and branch targets.
    for (name, insn, at, align) in [
        ("ldst16", "ldrh w0, [x0, :lo12:ksym]", KERNEL + 1, 2),
        ("ldst32", "ldr w0, [x0, :lo12:ksym]", KERNEL + 2, 4),
        ("ldst64", "ldr x0, [x0, :lo12:ksym]", KERNEL + 4, 8),
        ("ldst128", "ldr q0, [x0, :lo12:ksym]", KERNEL + 8, 16),
        ("bl_odd", "bl ksym", KERNEL + 2, 4),
    ] {
        let (e, s) = one_error(&d, name, insn, at);
        let ModuleError::RelocationFailed { why, .. } = e else {
            panic!("{name}: {e:?}")
        };
        assert_eq!(
            why,
            RelocFailure::Misaligned {
                value: if name == "bl_odd" {
                    at as i64 - (BASE + 4) as i64
                } else {
                    at as i64
                },
                align
            },
            "{name}"
        );
        assert!(s.contains(&format!("is not {align}-byte aligned")), "{s}");
    }
    // A reference through a section symbol names the section (`.data` follows the
    // text page: the read-only group is empty).
    let src =
        "    .text\n    nop\n    movz x0, #:abs_g0:local\n    .data\n    .word 0\nlocal: .word 1\n";
    let o = gcc(&d, "secsym.S", src, &["-c"]);
    let bytes = std::fs::read(o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let e = load(&bytes, &exports_for(&f, &[])).err().unwrap();
    assert_eq!(
        e[0].to_string(),
        format!(
            "aarch64 relocation R_AARCH64_MOVW_UABS_G0 (263) against `.data` in .text at offset \
             0x4 overflows: {:#x} does not fit (0x0 <= X < 0x10000)",
            BASE + 0x1004
        )
    );
    // A GOT reference is refused by number and name.
    let (e, s) = one_error(&d, "got", "adrp x0, :got:ksym", KERNEL);
    assert!(
        matches!(
            e,
            ModuleError::RelocationFailed {
                why: RelocFailure::Unsupported,
                r_type: 311,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        s,
        "aarch64 relocation R_AARCH64_ADR_GOT_PAGE (311) against `ksym` in .text at offset 0x4 is not supported"
    );
}

#[test]
fn far_calls_go_through_veneers() {
    let d = tmpdir("veneer");
    let src = r#"
extern void kfar(int);
extern void kfar2(int);
extern void knear(int);
void a(int x) { kfar(x); kfar2(x); knear(x); kfar(x + 1); }
void b(int x) { kfar(x); }
"#;
    let mut flags: Vec<&str> = KERNEL_CFLAGS.to_vec();
    flags.push("-fno-optimize-sibling-calls");
    let o = gcc(&d, "far.c", src, &flags);
    let bytes = std::fs::read(&o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let far = BASE + (1 << 30);
    let far2 = BASE - (3 << 30);
    let exports = exports_for(&f, &[("kfar", far), ("kfar2", far2)]);
    let (report, mem) = load(&bytes, &exports).unwrap();
    // Two distinct far targets: two veneers, whatever the number of calls.
    assert_eq!(report.veneers, 2);
    let addrs = section_addrs(&f);
    let text = f.section_by_name(".text").unwrap();
    let base = addrs[text.index().0].unwrap();
    let mut calls = BTreeMap::<String, Vec<u64>>::new();
    for (off, r) in text.relocations() {
        let RelocationTarget::Symbol(si) = r.target() else {
            unreachable!()
        };
        let name = f.symbol_by_index(si).unwrap().name().unwrap().to_string();
        let (to, _) = decode(elf::R_AARCH64_CALL26.0, &mem, base + off, 0);
        calls.entry(name).or_default().push(to);
    }
    assert_eq!(
        calls["knear"],
        [exports.0["knear"]],
        "a near call goes straight"
    );
    for (sym, target) in [("kfar", far), ("kfar2", far2)] {
        let v = &calls[sym];
        assert!(v.len() >= 2 || sym == "kfar2");
        assert!(v.iter().all(|&a| a == v[0]), "{sym}: one veneer per target");
        let veneer = v[0];
        // The veneer lies in the module's memory, past its sections, 16-byte aligned.
        assert!(veneer > base && veneer < BASE + (1 << 20) && veneer.is_multiple_of(16));
        // ldr x16, .+8 ; br x16 ; .quad target
        assert_eq!(mem.u32(veneer), 0x5800_0050, "{sym}");
        assert_eq!(mem.u32(veneer + 4), 0xd61f_0200, "{sym}");
        assert_eq!(
            u64::from_le_bytes(mem.read(veneer + 8, 8).try_into().unwrap()),
            target
        );
    }
    // Tail calls (`b`, JUMP26) too, and one symbol with three addends is three
    // targets, each with its own veneer (more than the module has outside symbols).
    let asm = "    .text\n    b kfar\n    bl kfar\n    bl kfar + 16\n    b kfar + 16\n    bl knear\n    bl kfar + 32\n";
    let o = gcc(&d, "tail.S", asm, &["-c"]);
    let bytes = std::fs::read(&o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_for(&f, &[("kfar", far)]);
    let (report, mem) = load(&bytes, &exports).unwrap();
    assert_eq!(report.veneers, 3);
    let at = |i: u64| decode(elf::R_AARCH64_JUMP26.0, &mem, BASE + 4 * i, 0).0;
    let (v0, v1) = (at(0), at(2));
    assert_eq!((at(1), at(3)), (v0, v1), "one veneer per target");
    assert_ne!(v0, v1);
    assert_eq!(at(4), exports.0["knear"]);
    for (v, target) in [(v0, far), (v1, far + 16), (at(5), far + 32)] {
        assert_eq!(mem.u32(v + 4), 0xd61f_0200);
        assert_eq!(
            u64::from_le_bytes(mem.read(v + 8, 8).try_into().unwrap()),
            target
        );
    }
    // Far from the module, a conditional branch has no veneer: a clear error.
    let (e, _) = one_error(&d, "far_cond", "b.eq ksym", far);
    assert!(matches!(
        e,
        ModuleError::RelocationFailed {
            why: RelocFailure::Overflow { .. },
            ..
        }
    ));
}

#[test]
fn check_module_cli_on_an_aarch64_object() {
    let d = tmpdir("cli");
    let mut flags: Vec<&str> = KERNEL_CFLAGS.to_vec();
    flags.push("-mcmodel=small");
    let o = gcc(&d, "m.c", C_MODULE, &flags);
    let map = "0000000040000000 T klog\n0000000040000100 T kread\n0000000040100000 D kcounter\n";
    std::fs::write(d.join("System.map"), map).unwrap();
    let run_check = |addr: &str| {
        run(Command::new(env!("CARGO_BIN_EXE_ksites"))
            .arg("check-module")
            .arg(&o)
            .arg("--kernel-symbols")
            .arg(d.join("System.map"))
            .args(["--load-address", addr]))
    };
    let out = run_check("0x40400000");
    let s =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("would load at"), "{s}");
    // A module 8 GiB from the kernel: the data references overflow (no veneer for
    // adrp), and check-module names them.
    let out = run_check("0x240000000");
    let s =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{s}");
    assert!(s.contains("would NOT load"), "{s}");
    assert!(
        s.contains("R_AARCH64_ADR_PREL_PG_HI21") && s.contains("against `kcounter`"),
        "{s}"
    );
}
