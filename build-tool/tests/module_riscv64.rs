//! riscv64 modules on the host: real objects from `riscv64-linux-gnu-gcc` (C with
//! kernel-like flags, relaxation on and off, and assembly naming every relocation type
//! the loader applies) and from `rustc --target riscv64gc-unknown-none-elf`, relocated
//! by kernel-loader's module loader into a host buffer at a chosen address, then
//! checked three ways:
//!
//! 1. every relocated instruction and data field is decoded here (from the ISA
//!    manual's instruction formats, independently of the loader's encoder) and must
//!    compute the symbol's address plus the addend; a `PCREL_LO12` is decoded with the
//!    `auipc` at its label, so the pair must reach the high part's target; label
//!    differences are recomputed from the object's bytes;
//! 2. the same object linked by GNU `riscv64-linux-gnu-ld --no-relax` with a script that
//!    puts every section at the loader's address and every kernel symbol at its export
//!    address must have byte-identical sections — for every object without
//!    `R_RISCV_ALIGN` (even with `--no-relax`, ld deletes the excess of an `ALIGN`'s
//!    padding, which the loader keeps and runs through: those objects are checked by
//!    decoding, and their padding must be intact NOPs);
//! 3. each checked type overflows with a symbol out of range, and the error names the
//!    section, offset, symbol and type; far calls (`call`, `tail`, `jal`) go through a
//!    veneer the loader builds; a `PCREL_LO12` without its `PCREL_HI20`, a label
//!    difference too big for its field and an `ALIGN` over bytes that are not NOPs are
//!    refused.
//!
//! The cross tools come from the Debian packages `gcc-riscv64-linux-gnu` and
//! `binutils-riscv64-linux-gnu`, and rustc's `riscv64gc-unknown-none-elf` target
//! (`rustup target add riscv64gc-unknown-none-elf`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernel_loader::CpuFeatures;
use kernel_loader::arch::riscv64::reloc::name as reloc_name;
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

const GCC: &str = "riscv64-linux-gnu-gcc";
const LD: &str = "riscv64-linux-gnu-ld";
/// Where modules are laid out: in the top 2 GiB of the address space, as Linux's riscv64
/// modules are (so `-mcmodel=medlow`'s absolute `lui` reaches them too).
const BASE: u64 = 0xffff_ffff_8800_0000;
/// Where the kernel's exports lie by default: 16 MiB below the module.
const KERNEL: u64 = BASE - (16 << 20);
/// The C flags of a riscv64 kernel module.
const KERNEL_CFLAGS: [&str; 8] = [
    "-c",
    "-O2",
    "-mcmodel=medany",
    "-fno-pic",
    "-ffreestanding",
    "-fno-common",
    "-march=rv64gc",
    "-mabi=lp64d",
];
/// Assembly flags.
const ASFLAGS: [&str; 3] = ["-c", "-march=rv64gc", "-mabi=lp64d"];

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd:?}: {e} (install gcc-riscv64-linux-gnu / binutils-riscv64-linux-gnu)"
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
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("module_riscv64_{name}"));
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

/// Compiles a `no_std` Rust library to one riscv64 object.
fn rustc(dir: &Path, name: &str, src: &str) -> PathBuf {
    std::fs::write(dir.join(format!("{name}.rs")), src).unwrap();
    let out = dir.join(format!("{name}.o"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    ok(
        run(Command::new(rustc)
            .args([
                "--target",
                "riscv64gc-unknown-none-elf",
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

    fn u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.read(addr, 8).try_into().unwrap())
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

/// A U-type instruction's immediate (`auipc`/`lui`): bits 31:12, sign-extended.
fn u_imm(w: u32) -> i64 {
    i64::from((w & 0xffff_f000) as i32)
}

/// An I-type instruction's immediate (`addi`, loads, `jalr`).
fn i_imm(w: u32) -> i64 {
    i64::from((w as i32) >> 20)
}

/// An S-type instruction's immediate (stores).
fn s_imm(w: u32) -> i64 {
    sext(u64::from(((w >> 25) << 5) | ((w >> 7) & 31)), 12)
}

/// A B-type branch's offset.
fn b_imm(w: u32) -> i64 {
    let w = u64::from(w);
    let v = ((w >> 31) & 1) << 12
        | ((w >> 7) & 1) << 11
        | ((w >> 25) & 0x3f) << 5
        | ((w >> 8) & 0xf) << 1;
    sext(v, 13)
}

/// A J-type `jal`'s offset.
fn j_imm(w: u32) -> i64 {
    let w = u64::from(w);
    let v = ((w >> 31) & 1) << 20
        | ((w >> 12) & 0xff) << 12
        | ((w >> 20) & 1) << 11
        | ((w >> 21) & 0x3ff) << 1;
    sext(v, 21)
}

/// A CB-format `c.beqz`/`c.bnez`'s offset.
fn cb_imm(h: u16) -> i64 {
    let h = u64::from(h);
    let v = ((h >> 12) & 1) << 8
        | ((h >> 5) & 3) << 6
        | ((h >> 2) & 1) << 5
        | ((h >> 10) & 3) << 3
        | ((h >> 3) & 3) << 1;
    sext(v, 9)
}

/// A CJ-format `c.j`'s offset.
fn cj_imm(h: u16) -> i64 {
    let h = u64::from(h);
    let v = ((h >> 12) & 1) << 11
        | ((h >> 8) & 1) << 10
        | ((h >> 9) & 3) << 8
        | ((h >> 6) & 1) << 7
        | ((h >> 7) & 1) << 6
        | ((h >> 2) & 1) << 5
        | ((h >> 11) & 1) << 4
        | ((h >> 3) & 7) << 1;
    sext(v, 12)
}

/// `x`'s high part as `lui`/`auipc` hold it (bits 31:12, rounded for the low part).
fn hi_part(x: i64) -> i64 {
    sext(((x + 0x800) as u64) & 0xffff_f000, 32)
}

/// What the relocated instruction or field at `p` computes, decoded from the ISA
/// manual's formats, and what it must equal given `sa` = S + A: `(found, wanted)`.
/// `None` for the label-difference and alignment types, checked separately.
fn decode(r_type: u32, mem: &Keep, p: u64, sa: u64) -> Option<(u64, u64)> {
    let w = mem.u32(p);
    let h = w as u16;
    let pc = |imm: i64| p.wrapping_add_signed(imm);
    let pcrel = sa.wrapping_sub(p) as i64;
    Some(match elf::RelocationType(r_type) {
        elf::R_RISCV_64 => (mem.u64(p), sa),
        elf::R_RISCV_32 => (u64::from(w), sa & 0xffff_ffff),
        elf::R_RISCV_32_PCREL => (sext(u64::from(w), 32) as u64, pcrel as u64),
        elf::R_RISCV_BRANCH => (pc(b_imm(w)), sa),
        elf::R_RISCV_JAL => (pc(j_imm(w)), sa),
        elf::R_RISCV_RVC_BRANCH => (pc(cb_imm(h)), sa),
        elf::R_RISCV_RVC_JUMP => (pc(cj_imm(h)), sa),
        elf::R_RISCV_CALL | elf::R_RISCV_CALL_PLT => (pc(u_imm(w) + i_imm(mem.u32(p + 4))), sa),
        elf::R_RISCV_PCREL_HI20 => (u_imm(w) as u64, hi_part(pcrel) as u64),
        elf::R_RISCV_HI20 => (u_imm(w) as u64, hi_part(sa as i64) as u64),
        elf::R_RISCV_LO12_I => (i_imm(w) as u64, sext(sa & 0xfff, 12) as u64),
        elf::R_RISCV_LO12_S => (s_imm(w) as u64, sext(sa & 0xfff, 12) as u64),
        _ => return None,
    })
}

/// Loads `path` with its kernel symbols from `kernel` on (some `fixed`), then checks
/// every relocation by decoding it, and, unless it has `ALIGN` padding, compares every
/// section with GNU ld's link at the same addresses. Returns the relocation types seen.
fn check_object(dir: &Path, path: &Path, kernel: u64, fixed: &[(&str, u64)]) -> BTreeSet<u32> {
    let bytes = std::fs::read(path).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_at(&f, kernel, fixed);
    let (report, mem) =
        load(&bytes, &exports).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    assert_eq!(
        report.veneers,
        0,
        "{}: every export in reach",
        path.display()
    );
    let addrs = section_addrs(&f);
    let symbol = |si| {
        let sym = f.symbol_by_index(si).unwrap();
        let s = match sym.section() {
            SymbolSection::Section(i) => addrs[i.0].unwrap() + sym.address(),
            SymbolSection::Undefined => exports.0[sym.name().unwrap()],
            SymbolSection::Absolute => sym.address(),
            other => panic!("symbol in {other:?}"),
        };
        (s, sym.name().unwrap().to_string())
    };
    // Every PCREL_HI20's target, by the address of its `auipc`.
    let mut highs = BTreeMap::new();
    for sec in f.sections() {
        let Some(base) = addrs[sec.index().0] else {
            continue;
        };
        for (off, r) in sec.relocations() {
            if rtype(&r) == elf::R_RISCV_PCREL_HI20.0 {
                let RelocationTarget::Symbol(si) = r.target() else {
                    unreachable!()
                };
                highs.insert(base + off, symbol(si).0.wrapping_add_signed(r.addend()));
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    let mut aligns = 0;
    // Label differences: the field as the object has it, then each ADD/SUB/SET.
    let mut fields: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    for sec in f.sections() {
        let Some(base) = addrs[sec.index().0] else {
            continue;
        };
        let data = sec.data().unwrap();
        for (off, r) in sec.relocations() {
            let r_type = rtype(&r);
            let p = base + off;
            let what = format!(
                "{}: {} at {}+{off:#x}",
                path.display(),
                reloc_name(r_type),
                sec.name().unwrap()
            );
            seen.insert(r_type);
            match elf::RelocationType(r_type) {
                elf::R_RISCV_NONE | elf::R_RISCV_RELAX => continue,
                elf::R_RISCV_ALIGN => {
                    let len = r.addend() as usize;
                    let pad = mem.read(p, len);
                    assert_eq!(pad, &data[off as usize..off as usize + len], "{what}");
                    let mut rest = pad;
                    while let [lo, hi, more @ ..] = rest {
                        rest = match ([*lo, *hi], more) {
                            ([0x01, 0x00], _) => more,                 // c.nop
                            ([0x13, 0x00], [0, 0, tail @ ..]) => tail, // nop
                            _ => panic!("{what}: padding {pad:02x?}"),
                        };
                    }
                    assert!(rest.is_empty(), "{what}: padding {pad:02x?}");
                    aligns += 1;
                    checked += 1;
                    continue;
                }
                _ => {}
            }
            let RelocationTarget::Symbol(si) = r.target() else {
                panic!("{what}: relocation without a symbol")
            };
            let (s, name) = symbol(si);
            let sa = s.wrapping_add_signed(r.addend());
            checked += 1;
            let bits: u32 = match elf::RelocationType(r_type) {
                elf::R_RISCV_PCREL_LO12_I | elf::R_RISCV_PCREL_LO12_S => {
                    // The `auipc` at the label plus this immediate: the high part's target.
                    let target = highs[&s].wrapping_add_signed(r.addend());
                    let lo = if r_type == elf::R_RISCV_PCREL_LO12_I.0 {
                        i_imm(mem.u32(p))
                    } else {
                        s_imm(mem.u32(p))
                    };
                    let found = s.wrapping_add_signed(u_imm(mem.u32(s)) + lo);
                    assert_eq!(found, target, "{what} against {name}");
                    continue;
                }
                elf::R_RISCV_SET6 | elf::R_RISCV_SUB6 => 6,
                elf::R_RISCV_ADD8 | elf::R_RISCV_SUB8 | elf::R_RISCV_SET8 => 8,
                elf::R_RISCV_ADD16 | elf::R_RISCV_SUB16 | elf::R_RISCV_SET16 => 16,
                elf::R_RISCV_ADD32 | elf::R_RISCV_SUB32 | elf::R_RISCV_SET32 => 32,
                elf::R_RISCV_ADD64 | elf::R_RISCV_SUB64 => 64,
                _ => {
                    let (found, wanted) =
                        decode(r_type, &mem, p, sa).unwrap_or_else(|| panic!("{what}: no decoder"));
                    assert_eq!(found, wanted, "{what} against {name}");
                    continue;
                }
            };
            let n = bits.div_ceil(8) as usize;
            let (v, _) = *fields.entry(p).or_insert_with(|| {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(&data[off as usize..off as usize + n]);
                (u64::from_le_bytes(b), bits)
            });
            let v = match elf::RelocationType(r_type) {
                elf::R_RISCV_SET6 => (v & 0xc0) | (sa & 0x3f),
                elf::R_RISCV_SUB6 => (v & 0xc0) | (v.wrapping_sub(sa) & 0x3f),
                elf::R_RISCV_SET8 | elf::R_RISCV_SET16 | elf::R_RISCV_SET32 => sa,
                t if reloc_name(t.0).contains("ADD") => v.wrapping_add(sa),
                _ => v.wrapping_sub(sa),
            };
            fields.insert(p, (v, bits));
        }
    }
    for (p, (v, bits)) in fields {
        let n = bits.div_ceil(8) as usize;
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(mem.read(p, n));
        assert_eq!(
            u64::from_le_bytes(b),
            v & (u64::MAX >> (64 - 8 * n)),
            "{}: label difference at {p:#x}",
            path.display()
        );
    }
    assert!(checked > 0, "{}: no relocations", path.display());
    assert_eq!(report.relocations, checked, "{}", path.display());
    if aligns == 0 {
        compare_with_ld(dir, path, &f, &addrs, &exports, &mem);
    }
    seen
}

/// Links `path` with GNU ld (no relaxation), every allocated section at the loader's
/// address and every export at its address, and compares the bytes of every section.
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
    script += "  /DISCARD/ : { *(.comment) *(.note.*) *(.riscv.attributes) }\n}\n";
    let name = format!("{file}.ld");
    std::fs::write(dir.join(&name), &script).unwrap();
    let out = format!("{file}.elf");
    ok(
        run(Command::new(LD)
            .args(["--no-relax", "-T", &name, "-e", "0", "-o", &out, file])
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
const REQUIRED: [elf::RelocationType; 31] = [
    elf::R_RISCV_64,
    elf::R_RISCV_32,
    elf::R_RISCV_32_PCREL,
    elf::R_RISCV_BRANCH,
    elf::R_RISCV_JAL,
    elf::R_RISCV_CALL,
    elf::R_RISCV_CALL_PLT,
    elf::R_RISCV_PCREL_HI20,
    elf::R_RISCV_PCREL_LO12_I,
    elf::R_RISCV_PCREL_LO12_S,
    elf::R_RISCV_HI20,
    elf::R_RISCV_LO12_I,
    elf::R_RISCV_LO12_S,
    elf::R_RISCV_RVC_BRANCH,
    elf::R_RISCV_RVC_JUMP,
    elf::R_RISCV_ADD8,
    elf::R_RISCV_ADD16,
    elf::R_RISCV_ADD32,
    elf::R_RISCV_ADD64,
    elf::R_RISCV_SUB8,
    elf::R_RISCV_SUB16,
    elf::R_RISCV_SUB32,
    elf::R_RISCV_SUB64,
    elf::R_RISCV_SUB6,
    elf::R_RISCV_SET6,
    elf::R_RISCV_SET8,
    elf::R_RISCV_SET16,
    elf::R_RISCV_SET32,
    elf::R_RISCV_ALIGN,
    elf::R_RISCV_RELAX,
    elf::R_RISCV_32_PCREL,
];

/// C a kernel module is made of: kernel calls and tail calls, globals of every access
/// size (PC-relative pairs, or `lui` pairs with `-mcmodel=medlow`), pointers in data,
/// a jump table (label differences with relaxation on), an aligned loop.
const C_MODULE: &str = r#"
extern int kcounter;
extern void klog(int);
extern long kread(const char *);
static unsigned char b8[64];
static unsigned short h16[64];
static unsigned int w32[64];
static unsigned long x64[64];
const char *greeting = "module says hello";
int *counter_p = &kcounter;
void (*log_p)(int) = klog;
__attribute__((noinline)) static long mix(long x) { return x * 7 + b8[x & 63]; }
long entry(long x) {
    klog((int)x);
    b8[x & 63]++; h16[x & 63] += 2; w32[x & 63] += 3; x64[x & 63] += 4;
    return mix(x) + kcounter + kread(greeting) + h16[1] + w32[2] + x64[3];
}
int pick(int x) {
    switch (x) {
    case 0: return kcounter;
    case 1: return w32[1];
    case 2: return (int)mix(2);
    case 3: return h16[3];
    case 4: return b8[4];
    case 5: return 77;
    case 6: return (int)x64[6];
    default: return -1;
    }
}
__attribute__((aligned(16))) long sum(const long *p, long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += p[i] * (i & 3 ? 1 : 3);
    return s;
}
void tail(int x) { klog(x + 1); }
int ksites_module_init(void) { kcounter = 0; return 0; }
"#;

/// Every instruction form with the relocation the loader must apply, against kernel
/// symbols, local labels and symbols in other sections; `.cfi` directives far apart
/// make `.eh_frame`'s SET/SUB 6/8/16/32.
const ASM_MODULE: &str = r#"
    .text
    .globl  a_fn
a_fn:
    .cfi_startproc
    call    kfunc
    tail    kfunc
    .reloc  ., R_RISCV_CALL, kfunc
    auipc   ra, 0
    jalr    ra, 0(ra)
    jal     ra, other
    beq     a0, a1, 7f
    c.beqz  a0, 7f
    c.j     7f
    jal     7f
    nop
7:
1:  auipc   a0, %pcrel_hi(data_start)
    addi    a0, a0, %pcrel_lo(1b)
2:  auipc   a1, %pcrel_hi(kvar)
    ld      a2, %pcrel_lo(2b)(a1)
    sd      a2, %pcrel_lo(2b)(a1)
3:  auipc   a4, %pcrel_hi(kvar + 8)
    lw      a5, %pcrel_lo(3b)(a4)
    lui     a3, %hi(kvar)
    addi    a3, a3, %lo(kvar)
    sw      a3, %lo(kvar)(a3)
    addi    sp, sp, -16
    .cfi_def_cfa_offset 16
    .fill   100, 1, 0
    addi    sp, sp, -16
    .cfi_def_cfa_offset 32
    .fill   300, 1, 0
    addi    sp, sp, -16
    .cfi_def_cfa_offset 48
    .fill   70000, 1, 0
    addi    sp, sp, -16
    .cfi_def_cfa_offset 64
9:  ret
    .cfi_endproc
8:
    .section .text.other,"ax",@progbits
    .globl  other
other:
    ret
    .data
    .balign 8
data_start:
    .quad   kvar
    .word   kvar
    .word   kfunc - .
    .quad   kfunc - .
    .byte   9b - 8b + 200
    .half   7b - a_fn
    .word   8b - a_fn
    .quad   8b - a_fn
"#;

#[test]
fn gcc_asm_and_rustc_objects_relocate_like_gnu_ld() {
    let d = tmpdir("ld");
    let mut seen = BTreeSet::new();
    let mut flagsets: Vec<Vec<&str>> = Vec::new();
    for extra in [
        &["-mrelax"][..],
        &["-mno-relax"],
        &["-mrelax", "-ffunction-sections", "-fdata-sections"],
        &["-mno-relax", "-mcmodel=medlow"],
        &["-mrelax", "-mcmodel=medlow", "-fasynchronous-unwind-tables"],
        &["-Os", "-mrelax"],
    ] {
        flagsets.push(
            KERNEL_CFLAGS
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .collect(),
        );
    }
    let mut with_ld = 0;
    for (i, flags) in flagsets.iter().enumerate() {
        let o = gcc(&d, &format!("c{i}.c"), C_MODULE, flags);
        with_ld += usize::from(!seen_align(&o));
        seen.extend(check_object(&d, &o, KERNEL, &[]));
    }
    // -mno-relax objects have no ALIGN: GNU ld's bytes are compared for them at least.
    assert!(with_ld >= 2, "{with_ld} objects compared with ld");
    let o = gcc(&d, "all.S", ASM_MODULE, &ASFLAGS);
    seen.extend(check_object(&d, &o, KERNEL, &[]));
    let o = gcc(
        &d,
        "norelax.S",
        &format!("    .option norelax\n{ASM_MODULE}"),
        &ASFLAGS,
    );
    assert!(!seen_align(&o));
    seen.extend(check_object(&d, &o, KERNEL, &[]));
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
#[unsafe(no_mangle)]
pub extern "C" fn rs_pick(x: u32) -> u32 {
    match x { 0 => 11, 1 => unsafe { kcounter as u32 }, 2 => 7, 3 => x * 9, 4 => 1, _ => 0 }
}
"#,
    );
    seen.extend(check_object(&d, &r, KERNEL, &[]));
    let missing: Vec<_> = REQUIRED
        .iter()
        .filter(|t| !seen.contains(&t.0))
        .map(|&t| reloc_name(t.0))
        .collect();
    assert!(missing.is_empty(), "never exercised: {missing:?}");
}

/// A relocation's raw ELF type.
fn rtype(r: &object::Relocation) -> u32 {
    match r.flags() {
        RelocationFlags::Elf { r_type } => r_type.0,
        f => panic!("not an ELF relocation: {f:?}"),
    }
}

/// Whether the object has an `R_RISCV_ALIGN`.
fn seen_align(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    f.sections().any(|s| {
        s.relocations()
            .any(|(_, r)| rtype(&r) == elf::R_RISCV_ALIGN.0)
    })
}

/// One instruction (or data directive) against `ksym`, at offset 4 of `.text`: the
/// errors.
fn errors(d: &Path, name: &str, insn: &str, at: u64) -> Vec<ModuleError> {
    let src = format!("    .text\n    .option norvc\n    nop\n    .option rvc\n{insn}\n    ret\n");
    let o = gcc(d, &format!("{name}.S"), &src, &ASFLAGS);
    let bytes = std::fs::read(o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_at(&f, KERNEL, &[("ksym", at)]);
    load(&bytes, &exports)
        .err()
        .unwrap_or_else(|| panic!("{name}: loaded"))
}

fn one_error(d: &Path, name: &str, insn: &str, at: u64) -> (ModuleError, String) {
    let e = errors(d, name, insn, at);
    assert_eq!(e.len(), 1, "{name}: {e:?}");
    (e[0], e[0].to_string())
}

#[test]
fn every_checked_type_overflows_with_a_clear_error() {
    let d = tmpdir("overflow");
    let p = BASE + 4; // `.text` is the module's first section; the insn is at +4.
    let far = (1i64 << 31) - 0x800;
    for (name, insn, at, type_name) in [
        (
            "branch",
            "    .reloc ., R_RISCV_BRANCH, ksym\n    beq a0, a1, .",
            p + 4096,
            "R_RISCV_BRANCH",
        ),
        (
            "branch_back",
            "    .reloc ., R_RISCV_BRANCH, ksym\n    bne a0, a1, .",
            p - 4098,
            "R_RISCV_BRANCH",
        ),
        (
            "cbranch",
            "    .reloc ., R_RISCV_RVC_BRANCH, ksym\n    c.beqz a0, .",
            p + 256,
            "R_RISCV_RVC_BRANCH",
        ),
        (
            "cjump",
            "    .reloc ., R_RISCV_RVC_JUMP, ksym\n    c.j .",
            p - 2050,
            "R_RISCV_RVC_JUMP",
        ),
        (
            "pcrel_hi",
            "1:  auipc a0, %pcrel_hi(ksym)\n    addi a0, a0, %pcrel_lo(1b)",
            p.wrapping_add(far as u64),
            "R_RISCV_PCREL_HI20",
        ),
        ("hi20", "    lui a0, %hi(ksym)", 0x7fff_f800, "R_RISCV_HI20"),
        ("abs32", "    .word ksym", 1 << 32, "R_RISCV_32"),
        (
            "pcrel32",
            "    .reloc ., R_RISCV_32_PCREL, ksym\n    .word 0",
            p.wrapping_add(1 << 31),
            "R_RISCV_32_PCREL",
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
        assert_eq!(machine, 243);
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
            s.starts_with(&format!("riscv64 relocation {type_name} (")),
            "{name}: {s}"
        );
        assert!(
            s.contains("against `ksym` in .text at offset 0x4 overflows: "),
            "{s}"
        );
    }
    // In range at the limit, they load (the checks are not off by one).
    for (name, insn, at) in [
        (
            "branch_ok",
            "    .reloc ., R_RISCV_BRANCH, ksym\n    beq a0, a1, .",
            p + 4094,
        ),
        (
            "cjump_ok",
            "    .reloc ., R_RISCV_RVC_JUMP, ksym\n    c.j .",
            p - 2048,
        ),
        (
            "pcrel_hi_ok",
            "1:  auipc a0, %pcrel_hi(ksym)\n    addi a0, a0, %pcrel_lo(1b)",
            p.wrapping_add(far as u64 - 2),
        ),
        ("hi20_ok", "    lui a0, %hi(ksym)", 0x7fff_f7fe),
        ("abs32_ok", "    .word ksym", 0xffff_ffff),
    ] {
        let src =
            format!("    .text\n    .option norvc\n    nop\n    .option rvc\n{insn}\n    ret\n");
        let o = gcc(&d, &format!("{name}.S"), &src, &ASFLAGS);
        let bytes = std::fs::read(o).unwrap();
        let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
        let r = load(&bytes, &exports_at(&f, KERNEL, &[("ksym", at)]));
        assert!(r.is_ok(), "{name}: {:?}", r.err());
    }
    // An odd branch target: bit 0 is not encoded.
    let (e, s) = one_error(
        &d,
        "odd",
        "    .reloc ., R_RISCV_BRANCH, ksym\n    beq a0, a1, .",
        p + 9,
    );
    let ModuleError::RelocationFailed { why, .. } = e else {
        panic!("{e:?}")
    };
    assert_eq!(why, RelocFailure::Misaligned { value: 9, align: 2 });
    assert!(s.contains("is not 2-byte aligned"), "{s}");
    // A GOT reference is refused by number and name.
    let (e, s) = one_error(&d, "got", "1:  auipc a0, %got_pcrel_hi(ksym)", KERNEL);
    assert!(
        matches!(
            e,
            ModuleError::RelocationFailed {
                why: RelocFailure::Unsupported,
                r_type: 20,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        s,
        "riscv64 relocation R_RISCV_GOT_HI20 (20) against `ksym` in .text at offset 0x4 is not supported"
    );
}

#[test]
fn hostile_pairs_and_padding_are_refused() {
    let d = tmpdir("hostile");
    // A PCREL_LO12 whose label is a plain `nop`: no high part to complete.
    let (e, s) = one_error(
        &d,
        "lo_alone",
        "    addi a0, a0, %pcrel_lo(1f)\n1:  nop",
        KERNEL,
    );
    let ModuleError::RelocationFailed {
        r_type,
        offset,
        why,
        ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!((r_type, offset), (elf::R_RISCV_PCREL_LO12_I.0, 4));
    assert_eq!(why, RelocFailure::NoHighPart { label: BASE + 8 });
    assert!(
        s.starts_with("riscv64 relocation R_RISCV_PCREL_LO12_I (24) against `")
            && s.contains(&format!(
                "has no PC-relative high-part relocation at its label {:#x}",
                BASE + 8
            )),
        "{s}"
    );
    // A high part against an unknown symbol: one error (the symbol), not one per low part.
    let src = "    .text\n1:  auipc a0, %pcrel_hi(kmissing)\n    ld a1, %pcrel_lo(1b)(a0)\n    sd a1, %pcrel_lo(1b)(a0)\n";
    let o = gcc(&d, "hi_unknown.S", src, &ASFLAGS);
    let e = load(&std::fs::read(o).unwrap(), &Exports(BTreeMap::new()))
        .err()
        .unwrap();
    assert!(
        matches!(e.as_slice(), [ModuleError::UnknownSymbol { .. }]),
        "{e:?}"
    );
    // A label difference too big for its byte (302: the assembler leaves it to the
    // linker when relaxation is on).
    let src = "    .text\n1:  nop\n    .fill 300, 1, 0\n2:\n    .data\n    .byte 2b - 1b\n";
    let o = gcc(&d, "diff.S", src, &ASFLAGS);
    let bytes = std::fs::read(o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let e = load(&bytes, &exports_at(&f, KERNEL, &[])).err().unwrap();
    let [
        ModuleError::RelocationFailed {
            r_type, at, why, ..
        },
    ] = e.as_slice()
    else {
        panic!("{e:?}")
    };
    assert_eq!(*r_type, elf::R_RISCV_SUB8.0);
    assert_eq!(at.section(), ".data");
    assert_eq!(
        *why,
        RelocFailure::Overflow {
            value: 302,
            min: -128,
            max: 256
        }
    );
    // In reach, the same pair loads and the byte is the difference.
    let src = "    .text\n1:  nop\n    .fill 200, 1, 0\n2:\n    .data\n    .byte 2b - 1b\n";
    let o = gcc(&d, "diff_ok.S", src, &ASFLAGS);
    let bytes = std::fs::read(o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let (_, mem) = load(&bytes, &exports_at(&f, KERNEL, &[])).unwrap();
    let data = section_addrs(&f)[f.section_by_name(".data").unwrap().index().0].unwrap();
    assert_eq!(mem.read(data, 1), [202]);
    // ALIGN padding overwritten with something else than NOPs.
    let src = "    .text\n    .globl f\nf:  c.nop\n    .p2align 3\n    ret\n";
    let o = gcc(&d, "align.S", src, &ASFLAGS);
    let mut bytes = std::fs::read(&o).unwrap();
    let (pad_off, pad_len) = {
        let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
        let text = f.section_by_name(".text").unwrap();
        let (off, r) = text
            .relocations()
            .find(|(_, r)| rtype(r) == elf::R_RISCV_ALIGN.0)
            .expect("an R_RISCV_ALIGN");
        let (file_off, _) = text.file_range().unwrap();
        ((file_off + off) as usize, r.addend() as usize)
    };
    assert_eq!(pad_len, 6);
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let (report, _) = load(&bytes, &exports_at(&f, KERNEL, &[])).unwrap();
    assert_eq!(report.relocations, 1, "the ALIGN, checked");
    bytes[pad_off + 2] = 0xff;
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let e = load(&bytes, &exports_at(&f, KERNEL, &[])).err().unwrap();
    let [ModuleError::RelocationFailed { r_type, why, .. }] = e.as_slice() else {
        panic!("{e:?}")
    };
    assert_eq!(
        (*r_type, *why),
        (elf::R_RISCV_ALIGN.0, RelocFailure::NotPadding)
    );
    assert!(
        e[0].to_string().contains("R_RISCV_ALIGN (43)")
            && e[0]
                .to_string()
                .contains("covers bytes that are not NOP padding")
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
void c(int x) { kfar2(x); }
"#;
    let mut flags: Vec<&str> = KERNEL_CFLAGS.to_vec();
    flags.push("-mrelax");
    let o = gcc(&d, "far.c", src, &flags);
    let bytes = std::fs::read(&o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let far = BASE - (3 << 30);
    let far2 = BASE - (5 << 30);
    let exports = exports_at(&f, KERNEL, &[("kfar", far), ("kfar2", far2)]);
    let (report, mem) = load(&bytes, &exports).unwrap();
    // Two distinct far targets: two veneers, whatever the number of calls.
    assert_eq!(report.veneers, 2);
    let addrs = section_addrs(&f);
    let text = f.section_by_name(".text").unwrap();
    let base = addrs[text.index().0].unwrap();
    let mut calls = BTreeMap::<String, Vec<u64>>::new();
    for (off, r) in text.relocations() {
        let r_type = rtype(&r);
        if r_type != elf::R_RISCV_CALL_PLT.0 {
            continue;
        }
        let RelocationTarget::Symbol(si) = r.target() else {
            unreachable!()
        };
        let name = f.symbol_by_index(si).unwrap().name().unwrap().to_string();
        let (to, _) = decode(r_type, &mem, base + off, 0).unwrap();
        calls.entry(name).or_default().push(to);
    }
    assert_eq!(
        calls["knear"],
        [exports.0["knear"]],
        "a near call goes straight"
    );
    for (sym, target) in [("kfar", far), ("kfar2", far2)] {
        let v = &calls[sym];
        assert!(v.len() >= 2, "{sym}: {v:x?}");
        assert!(v.iter().all(|&a| a == v[0]), "{sym}: one veneer per target");
        let veneer = v[0];
        // The veneer lies in the module's memory, past its sections, 8-byte aligned.
        assert!(veneer > base && veneer < BASE + (1 << 20) && veneer.is_multiple_of(8));
        // auipc t1, 0 ; ld t1, 16(t1) ; jr t1 ; nop ; .quad target
        assert_eq!(
            [mem.u32(veneer), mem.u32(veneer + 4), mem.u32(veneer + 8)],
            [0x0000_0317, 0x0103_3303, 0x0003_0067],
            "{sym}"
        );
        assert_eq!(mem.u64(veneer + 16), target);
    }
    // `tail` (auipc t1 + jr t1), the older R_RISCV_CALL, and `jal`: a symbol with three
    // addends is three targets, each with its own veneer.
    let asm = "    .text\n    tail kfar\n    call kfar\n    call kfar + 16\n    tail kfar + 16\n    call knear\n    jal kfar + 32\n    .reloc ., R_RISCV_CALL, kfar\n    auipc ra, 0\n    jalr ra, 0(ra)\n";
    let o = gcc(&d, "tail.S", asm, &ASFLAGS);
    let bytes = std::fs::read(&o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_at(&f, KERNEL, &[("kfar", far)]);
    let (report, mem) = load(&bytes, &exports).unwrap();
    assert_eq!(report.veneers, 3);
    let call = |i: u64| {
        decode(elf::R_RISCV_CALL.0, &mem, BASE + 8 * i, 0)
            .unwrap()
            .0
    };
    let (v0, v1) = (call(0), call(2));
    let old_call = decode(elf::R_RISCV_CALL.0, &mem, BASE + 44, 0).unwrap().0;
    assert_eq!(
        (call(1), call(3), old_call),
        (v0, v1, v0),
        "one veneer per target"
    );
    assert_ne!(v0, v1);
    assert_eq!(call(4), exports.0["knear"]);
    let jal = decode(elf::R_RISCV_JAL.0, &mem, BASE + 40, 0).unwrap().0;
    for (v, target) in [(v0, far), (v1, far + 16), (jal, far + 32)] {
        assert_eq!(mem.u32(v + 8), 0x0003_0067);
        assert_eq!(mem.u64(v + 16), target);
    }
    // Far from the module, a PC-relative address has no veneer: a clear error.
    let (e, s) = one_error(
        &d,
        "far_addr",
        "1:  auipc a0, %pcrel_hi(ksym)\n    addi a0, a0, %pcrel_lo(1b)",
        far,
    );
    assert!(matches!(
        e,
        ModuleError::RelocationFailed {
            why: RelocFailure::Overflow { .. },
            r_type: 23,
            ..
        }
    ));
    assert!(
        s.contains("R_RISCV_PCREL_HI20") && s.contains("against `ksym`"),
        "{s}"
    );
}

#[test]
fn check_module_cli_on_a_riscv64_object() {
    let d = tmpdir("cli");
    let o = gcc(&d, "m.c", C_MODULE, &KERNEL_CFLAGS);
    let map = "ffffffff80000000 T klog\nffffffff80000100 T kread\nffffffff80100000 D kcounter\n";
    std::fs::write(d.join("System.map"), map).unwrap();
    let run_check = |addr: &str| {
        run(Command::new(env!("CARGO_BIN_EXE_ksites"))
            .arg("check-module")
            .arg(&o)
            .arg("--kernel-symbols")
            .arg(d.join("System.map"))
            .args(["--load-address", addr]))
    };
    let out = run_check("0xffffffff80400000");
    let s =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("would load at") && s.contains(" 0 veneers"),
        "{s}"
    );
    // 6 GiB below the kernel: calls go through veneers, but the data references
    // overflow (no veneer for auipc), and check-module names them.
    let out = run_check("0xfffffffe00000000");
    let s =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{s}");
    assert!(s.contains("would NOT load"), "{s}");
    assert!(
        s.contains("R_RISCV_PCREL_HI20") && s.contains("against `kcounter`"),
        "{s}"
    );
    assert!(
        !s.contains("R_RISCV_CALL_PLT"),
        "calls reach through veneers: {s}"
    );
}

#[test]
fn low_parts_find_their_high_part_in_any_order() {
    let d = tmpdir("order");
    let mut flags: Vec<&str> = KERNEL_CFLAGS.to_vec();
    flags.push("-mrelax");
    let o = gcc(&d, "m.c", C_MODULE, &flags);
    let bytes = std::fs::read(&o).unwrap();
    let f = ElfFile64::<LE>::parse(&*bytes).unwrap();
    let exports = exports_at(&f, KERNEL, &[]);
    let (report, mem) = load(&bytes, &exports).unwrap();
    let text = f.section_by_name(".text").unwrap();
    let text_at = section_addrs(&f)[text.index().0].unwrap();
    let want = mem.read(text_at, text.size() as usize).to_vec();
    // The same object with `.rela.text` reversed: every PCREL_LO12 now comes before the
    // PCREL_HI20 at its label.
    let rela = f.section_by_name(".rela.text").unwrap();
    let (off, len) = rela.file_range().unwrap();
    let (off, len) = (off as usize, len as usize);
    assert_eq!(len % 24, 0);
    let mut reversed = bytes.clone();
    let entries: Vec<&[u8]> = bytes[off..off + len].chunks(24).collect();
    for (i, e) in entries.iter().rev().enumerate() {
        reversed[off + 24 * i..off + 24 * i + 24].copy_from_slice(e);
    }
    assert_ne!(reversed, bytes);
    let (report2, mem2) = load(&reversed, &exports).unwrap();
    assert_eq!(report2.relocations, report.relocations);
    assert_eq!(mem2.read(text_at, want.len()), want.as_slice());
}
