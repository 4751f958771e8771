//! Module loading: `kernel_loader::module::check` (lay out, resolve against the kernel's
//! exports, relocate, validate the table: the load path minus protecting, patching and
//! running) on a generated C module, against copying its `SHF_ALLOC` sections into the
//! same buffer (what any loader must do) and against `object`'s ELF parse plus a walk
//! over every relocation (the parse cost).
//!
//! The module is generated at bench time: [`FUNCS`] functions that call 4 kernel ifuncs
//! (`KSITES_IFUNC_IMPORT`) and other kernel functions, read and write kernel and module
//! data (PC32), call each other through a pointer table (`R_X86_64_64`) and fire
//! `KSITES_PROBE` sites; compiled by gcc for the kernel code model and `ksites embed`ded.
//! It is laid out at a kernel address in one preallocated buffer that every iteration
//! reuses, so no allocation is measured.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_loader::CpuFeatures;
use kernel_loader::format::Table;
use kernel_loader::module::{self, Export, Kernel, LoadReport, ModuleMemory, Prot, Region};
use object::read::elf::{ElfFile64, SectionHeader as _};
use object::{LittleEndian, Object as _, ObjectSection as _};

/// Functions in the generated module.
pub const FUNCS: usize = 400;
/// The imported kernel ifuncs.
const IFUNCS: [&str; 4] = ["kf_popcount", "kf_crc32c", "kf_memhash", "kf_checksum"];
/// Other kernel functions the module calls.
const KFUNCS: [&str; 6] = [
    "kmalloc",
    "kfree",
    "printk",
    "spin_lock",
    "spin_unlock",
    "memcpy",
];
/// Kernel data the module reads and writes.
const KDATA: [&str; 2] = ["jiffies", "kstats"];

/// Where the kernel's text starts (exports are laid out from here).
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;
/// Kernel data (exported variables, the ifuncs' slots).
const KERNEL_DATA: u64 = 0xffff_ffff_8200_0000;
/// The kernel's `.ksites` table.
const KERNEL_TABLE: u64 = 0xffff_ffff_8300_0000;
/// Where the module is laid out.
pub const MODULE_ADDR: u64 = 0xffff_ffff_a000_0000;

fn source() -> String {
    let mut s = String::with_capacity(FUNCS * 600);
    s.push_str("#include \"ksites_module.h\"\n#include \"ksites_sdt.h\"\n\n");
    for f in IFUNCS {
        let _ = writeln!(
            s,
            "unsigned long {f}(unsigned long x);\nKSITES_IFUNC_IMPORT({f});"
        );
    }
    s.push_str(
        "void *kmalloc(unsigned long size);\nvoid kfree(void *p);\n\
         int printk(const char *fmt, ...);\nvoid spin_lock(int *l);\nvoid spin_unlock(int *l);\n\
         void *memcpy(void *d, const void *s, unsigned long n);\n\
         extern unsigned long jiffies;\nextern unsigned long kstats[64];\n\n\
         KSITES_PROBE_DECL(gen, enter, 2, (unsigned long x, unsigned long r))\n\
         KSITES_PROBE_DECL(gen, leave, 1, (unsigned long r))\n\n",
    );
    let _ = writeln!(
        s,
        "static unsigned long counters[{FUNCS}];\nstatic int lock;\nstatic unsigned long last[8];"
    );
    for f in 0..FUNCS {
        let _ = writeln!(s, "unsigned long f{f}(unsigned long x);");
    }
    // The pointer table (R_X86_64_64 against the module's own functions) and one of
    // kernel functions (R_X86_64_64 against undefined symbols).
    let _ = writeln!(s, "unsigned long (*ops[{FUNCS}])(unsigned long) = {{");
    for f in 0..FUNCS {
        let _ = writeln!(s, "  f{f},");
    }
    s.push_str("};\nvoid *kernel_ops[] = { kmalloc, kfree, printk, spin_lock, spin_unlock };\n\n");
    for f in 0..FUNCS {
        let (a, b) = (IFUNCS[f % 4], IFUNCS[(f + 1) % 4]);
        let _ = writeln!(
            s,
            "__attribute__((noinline)) unsigned long f{f}(unsigned long x)\n{{\n\
             \x20 unsigned long r = {a}(x ^ jiffies) + {b}(counters[{f}]);"
        );
        if f % 4 == 0 {
            let _ = writeln!(s, "  KSITES_PROBE(gen, enter, x, r);");
        }
        match f % 5 {
            0 => {
                let _ = writeln!(
                    s,
                    "  if (r & 1) {{ unsigned long *p = kmalloc(64); if (p) {{ memcpy(p, last, 64); kfree(p); }} }}"
                );
            }
            1 => {
                let _ = writeln!(s, "  if (r > x) printk(\"f{f}: %lu\\n\", r);");
            }
            2 => {
                let _ = writeln!(
                    s,
                    "  spin_lock(&lock); last[{}] = r; spin_unlock(&lock);",
                    f % 8
                );
            }
            _ => {}
        }
        let _ = writeln!(
            s,
            "  counters[{f}] += r;\n  kstats[{}] += 1;\n  if (x & {}) r += ops[{}](x >> 1);",
            f % 64,
            1u64 << (f % 7 + 3),
            (f * 7 + 1) % FUNCS
        );
        if f % 8 == 3 {
            let _ = writeln!(s, "  KSITES_PROBE(gen, leave, r);");
        }
        s.push_str("  return r;\n}\n");
    }
    s
}

/// The generated module.
pub struct Input {
    /// The embedded object (`.ko`).
    pub bytes: Vec<u8>,
    /// Relocations in the object (every relocation section).
    pub relocations: usize,
    /// The object file.
    pub path: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Writes, compiles and embeds the module in `dir`; `Err` when gcc or ksites cannot.
pub fn generate(dir: &Path, ksites: &Path) -> Result<Input, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("write {name}: {e}"))
    };
    write(
        "ksites_module.h",
        include_str!("../../kernel-loader/c/ksites_module.h"),
    )?;
    write(
        "ksites_sdt.h",
        include_str!("../../kernel-loader/c/ksites_sdt.h"),
    )?;
    write(
        "ksites_arch.h",
        include_str!("../../kernel-loader/c/ksites_arch.h"),
    )?;
    write("gen.c", &source())?;
    let obj = dir.join("gen.o");
    let ko = dir.join("gen.ko");
    run(Command::new("gcc")
        .args([
            "-c",
            "-O2",
            "-fno-pic",
            "-mcmodel=kernel",
            "-fno-common",
            "-ffreestanding",
            "-fcf-protection=none",
            "-I",
        ])
        .arg(dir)
        .arg(dir.join("gen.c"))
        .arg("-o")
        .arg(&obj))?;
    run(Command::new(ksites)
        .arg("embed")
        .arg(&obj)
        .arg("-o")
        .arg(&ko)
        .arg("-q"))?;
    let bytes = std::fs::read(&ko).map_err(|e| format!("{}: {e}", ko.display()))?;
    let relocations = walk_relocations(&bytes).1;
    Ok(Input {
        bytes,
        relocations,
        path: ko,
    })
}

/// The kernel the module is checked against: exports at kernel addresses, the kernel's
/// text range, and a kernel `.ksites` table listing the 4 ifuncs (so every import is
/// checked against it).
pub struct FakeKernel {
    exports: Exports,
    exec: Vec<Range<u64>>,
    table: Vec<u8>,
}

impl FakeKernel {
    /// Builds it.
    pub fn new() -> FakeKernel {
        let mut exports = Vec::new();
        let mut text = KERNEL_TEXT;
        let mut ifuncs = Vec::new();
        for (k, name) in IFUNCS.iter().enumerate() {
            // The trampoline, then its default implementation.
            ifuncs.push(ksites::table::IfuncEntry {
                name: (*name).to_string(),
                trampoline: text,
                slot: KERNEL_DATA + 0x1000 + 8 * k as u64,
                resolver: text + 16,
                default: text + 32,
            });
            exports.push(Export::new(name, text as *const ()));
            text += 64;
        }
        let runtime = module::RUNTIME_EXPORTS.map(|e| e.name());
        for name in KFUNCS.iter().chain(&runtime) {
            exports.push(Export::new(name, text as *const ()));
            text += 64;
        }
        for (k, name) in KDATA.iter().enumerate() {
            exports.push(Export::new(
                name,
                (KERNEL_DATA + 0x100 * k as u64) as *const (),
            ));
        }
        let exec = std::iter::once(KERNEL_TEXT..KERNEL_TEXT + 0x10_0000).collect();
        let table = ksites::table::build_table(KERNEL_TABLE, &ifuncs, &[]).expect("kernel table");
        FakeKernel {
            exports: Exports(exports),
            exec,
            table,
        }
    }

    /// The [`Kernel`] view.
    pub fn kernel(&self) -> Kernel<'_> {
        Kernel {
            symbols: &self.exports,
            table: Some(Table::parse(&self.table, KERNEL_TABLE, &self.exec).expect("kernel table")),
            exec: &self.exec,
            features: CpuFeatures::empty(),
        }
    }
}

/// The exports, looked up as a kernel's `[Export]` array is (by name, in order).
struct Exports(Vec<Export>);

impl module::Symbols for Exports {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.0[..].lookup(name)
    }
}

/// One preallocated, page-aligned buffer posing as kernel memory at [`MODULE_ADDR`],
/// handed out again at every `alloc`.
pub struct Arena {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl Arena {
    /// `len` bytes (a multiple of the page size).
    pub fn new(len: usize) -> Arena {
        let layout = std::alloc::Layout::from_size_align(len, module::PAGE_SIZE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Arena { ptr, len, layout }
    }

    /// The buffer.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialised bytes, uniquely
        // borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

impl ModuleMemory for Arena {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        (size <= self.len).then_some(Region {
            ptr: self.ptr,
            addr: MODULE_ADDR,
            size,
        })
    }

    unsafe fn protect(
        &mut self,
        _: &Region,
        _: usize,
        _: usize,
        _: Prot,
    ) -> Result<(), kernel_loader::module::ProtectError> {
        Ok(())
    }

    unsafe fn free(&mut self, _: Region) {}
}

/// `module::check` once; panics on any problem.
pub fn check(bytes: &[u8], kernel: &Kernel<'_>, arena: &mut Arena) -> LoadReport {
    module::check(bytes, kernel, arena, &mut |e| panic!("module::check: {e}"))
        .unwrap_or_else(|e| panic!("module::check: {e}"))
}

/// Where the `SHF_ALLOC` sections' bytes go: (file range, buffer offset) to copy, and
/// (buffer offset, length) to zero (`NOBITS`), laid out one after the other at each
/// section's alignment.
pub struct Copies {
    copy: Vec<(Range<usize>, usize)>,
    zero: Vec<(usize, usize)>,
    /// Bytes laid out.
    pub size: usize,
}

/// The copy plan for `bytes`.
pub fn copies(bytes: &[u8]) -> Copies {
    let f = ElfFile64::<LittleEndian>::parse(bytes).expect("parse the module");
    let mut c = Copies {
        copy: Vec::new(),
        zero: Vec::new(),
        size: 0,
    };
    for s in f.sections() {
        let h = s.elf_section_header();
        if h.sh_flags(LittleEndian).0 & object::elf::SHF_ALLOC.0 == 0 {
            continue;
        }
        let align = h.sh_addralign(LittleEndian).max(1) as usize;
        let len = h.sh_size(LittleEndian) as usize;
        let at = c.size.next_multiple_of(align);
        if h.sh_type(LittleEndian).0 == object::elf::SHT_NOBITS.0 {
            c.zero.push((at, len));
        } else {
            let off = h.sh_offset(LittleEndian) as usize;
            c.copy.push((off..off + len, at));
        }
        c.size = at + len;
    }
    c
}

/// Baseline (a): copies the sections' bytes into the buffer (and zeroes `NOBITS`).
pub fn copy(bytes: &[u8], c: &Copies, buf: &mut [u8]) -> usize {
    for (src, at) in &c.copy {
        buf[*at..*at + src.len()].copy_from_slice(&bytes[src.clone()]);
    }
    for &(at, len) in &c.zero {
        buf[at..at + len].fill(0);
    }
    c.size
}

/// Baseline (b): `object`'s ELF parse and a walk over every relocation of every
/// section, applying none. Returns a checksum and the relocation count.
pub fn walk_relocations(bytes: &[u8]) -> (u64, usize) {
    let f = ElfFile64::<LittleEndian>::parse(bytes).expect("parse the module");
    let (mut sum, mut n) = (0u64, 0usize);
    for s in f.sections() {
        for (off, r) in s.relocations() {
            let target = match r.target() {
                object::RelocationTarget::Symbol(i) => i.0 as u64,
                _ => 0,
            };
            sum = sum
                .wrapping_add(off)
                .wrapping_add(r.addend() as u64)
                .wrapping_add(target)
                .wrapping_add(u64::from(r.size()));
            n += 1;
        }
    }
    (sum, n)
}
