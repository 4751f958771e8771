//! The ET_REL module loader on the host: objects built at test time by `gcc -c` (C and
//! assembly with `.reloc` directives) and `rustc --emit=obj` are loaded into mmap'd
//! memory near this test binary, linked against its functions and statics, and run.
//! Every test counts the memory it hands out and checks all of it comes back, and that
//! the global probe registry is left as it was.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kernel_loader::CpuFeatures;
use kernel_loader::export;
use kernel_loader::module::{
    self, Export, Kernel, Module, ModuleError, ModuleMemory, PAGE_SIZE, Prot, Region,
};
use kernel_loader::patch::{PokeError, TextPoker};
use kernel_loader::probe;
use object::{Object, ObjectSection};

#[path = "common/mmap_region.rs"]
mod mmap_region;
#[path = "common/module_build.rs"]
mod module_build;

// ---------------------------------------------------------------------------------------
// Harness.

/// The probe registry and the module-init counters are global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every live module region of every `TestMem` (the poker writes module text there).
static MODULE_REGIONS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());

/// Memory for modules: anonymous mappings within rel32 reach of this binary's text.
#[derive(Debug, Default)]
struct TestMem {
    regions: mmap_region::Regions,
    /// Every `protect` call, in order.
    protects: Vec<(usize, usize, Prot)>,
    /// Fail the next `alloc`.
    fail_alloc: bool,
}

/// A function of this binary, the anchor module memory must lie near.
#[inline(never)]
extern "C" fn anchor() -> u64 {
    0x5eed
}

const REACH: u64 = 0x7000_0000; // comfortably inside ±2 GiB

fn near_text(addr: u64, size: usize) -> bool {
    let a = anchor as *const () as u64;
    let end = addr + size as u64;
    addr.abs_diff(a) < REACH && end.abs_diff(a) < REACH
}

impl ModuleMemory for TestMem {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        assert_eq!(size % PAGE_SIZE, 0, "alloc of {size:#x}");
        if std::mem::take(&mut self.fail_alloc) {
            return None;
        }
        let a = anchor as *const () as u64 & !0xfff;
        // Below the binary first (the heap usually follows it), then above.
        let hints = (1..64u64).map_while(|i| {
            if i % 2 == 1 {
                a.checked_sub(0x1000_0000 + (i / 2) * 0x100_0000)
            } else {
                Some(a + 0x2000_0000 + (i / 2) * 0x100_0000)
            }
        });
        let p = mmap_region::map_near(size, hints, near_text)?;
        Some(self.regions.track(&MODULE_REGIONS, p, size))
    }

    unsafe fn protect(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        prot: Prot,
    ) -> Result<(), kernel_loader::module::ProtectError> {
        assert!(
            self.regions.live.contains(&(region.addr, region.size)),
            "not ours"
        );
        assert!(
            offset.is_multiple_of(PAGE_SIZE)
                && len.is_multiple_of(PAGE_SIZE)
                && offset + len <= region.size
        );
        self.protects.push((offset, len, prot));
        // SAFETY: inside a live mapping of ours (asserted above); the caller guarantees
        // nothing runs there unless `prot` allows it.
        unsafe { mmap_region::protect(region.ptr.add(offset), len, prot) }
    }

    unsafe fn free(&mut self, region: Region) {
        // SAFETY: from `alloc`; nothing refers to it any more (trait contract).
        unsafe { self.regions.release(&MODULE_REGIONS, region) };
    }
}

impl TestMem {
    #[track_caller]
    fn assert_clean(&self) {
        assert_eq!(
            self.regions.allocs, self.regions.frees,
            "module memory leaked"
        );
        assert!(self.regions.live.is_empty());
    }
}

/// A poker for this process: the main program's text through [`HostPoker`], module
/// text (any live region of `mem`) by making the page writable around each store.
#[derive(Debug)]
struct TestPoker {
    host: kernel_loader::host::HostPoker,
    module_writes: u32,
}

impl TestPoker {
    fn new() -> TestPoker {
        TestPoker {
            host: kernel_loader::host::HostPoker::new(),
            module_writes: 0,
        }
    }
}

impl TextPoker for TestPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.host.begin()
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        let end = addr + bytes.len() as u64;
        let in_module = MODULE_REGIONS
            .lock()
            .unwrap()
            .iter()
            .any(|&(a, s)| addr >= a && end <= a + s as u64);
        if !in_module {
            // SAFETY: forwarded.
            return unsafe { self.host.write(addr, bytes) };
        }
        let page = addr & !(PAGE_SIZE as u64 - 1);
        let len = (end - page).div_ceil(PAGE_SIZE as u64) as usize * PAGE_SIZE;
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        // SAFETY: the pages lie in a live module region (module text, which the engine
        // pokes only inside validated sites); keeping EXEC leaves running code mapped.
        unsafe {
            assert_eq!(libc::mprotect(page as usize as *mut _, len, rwx), 0);
            for (i, &b) in bytes.iter().enumerate() {
                core::ptr::write_volatile((addr as usize + i) as *mut u8, b);
            }
            let rx = libc::PROT_READ | libc::PROT_EXEC;
            assert_eq!(libc::mprotect(page as usize as *mut _, len, rx), 0);
        }
        self.module_writes += 1;
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.host.sync_cores();
    }

    fn end(&mut self) {
        self.host.end();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[track_caller]
fn ok(o: Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `gcc -c` of `src` (named `name`, `.c` or `.s`) with `flags`; the object's bytes.
fn gcc_obj(dir: &Path, name: &str, src: &str, flags: &[&str]) -> Vec<u8> {
    std::fs::write(dir.join(name), src).unwrap();
    let out = dir.join(format!("{name}.o"));
    ok(
        run(Command::new("gcc")
            .args(flags)
            .arg("-c")
            .arg(name)
            .arg("-o")
            .arg(&out)
            .current_dir(dir)),
        &format!("gcc {name}"),
    );
    std::fs::read(out).unwrap()
}

fn asm_obj(dir: &Path, name: &str, src: &str) -> Vec<u8> {
    gcc_obj(dir, name, src, &[])
}

/// Flags for C modules placed near a high (PIE) address: `-fpie` makes every data
/// reference rip-relative (PC32, extern data too: copy relocations are assumed) and
/// every call PLT32 (no GOT as long as `-fno-plt` is not given); `-fno-pic
/// -mcmodel=small` would index arrays with absolute R_X86_64_32S. No stack protector
/// (the canary is TLS).
const C_FLAGS: &[&str] = &[
    "-O2",
    "-fpie",
    "-fno-common",
    "-fno-stack-protector",
    "-ffreestanding",
];

fn rustc_obj(dir: &Path, name: &str, src: &str) -> Vec<u8> {
    std::fs::write(dir.join(name), src).unwrap();
    let out = dir.join(format!("{name}.o"));
    ok(
        run(Command::new("rustc")
            .args([
                "--edition",
                "2024",
                "--crate-type=lib",
                "--emit=obj",
                "-O",
                "-C",
                "panic=abort",
                "-C",
                "relocation-model=static",
                "-C",
                "code-model=small",
                "--target",
                "x86_64-unknown-none",
                "-o",
            ])
            .arg(&out)
            .arg(name)
            .current_dir(dir)),
        &format!("rustc {name}"),
    );
    std::fs::read(out).unwrap()
}

fn kernel(symbols: &dyn module::Symbols) -> Kernel<'_> {
    Kernel {
        symbols,
        table: None,
        exec: &[],
        features: CpuFeatures::detect(),
    }
}

fn load<'b>(
    bytes: &'b [u8],
    k: &Kernel<'_>,
    mem: &mut TestMem,
    poker: &mut TestPoker,
) -> Result<Module<'b>, ModuleError> {
    // SAFETY: `mem` hands out memory near this binary that it can execute once RX;
    // `poker` writes this process's text and the module regions; the exports are this
    // binary's functions and statics (or fake addresses nothing calls); the modules are
    // the tests' own code.
    unsafe { Module::load("test", bytes, k, mem, poker) }
}

// `Module::unload` hands the module back with the error (the loader cannot box).
#[allow(clippy::result_large_err)]
fn unload<'b>(
    m: Module<'b>,
    mem: &mut TestMem,
    poker: &mut TestPoker,
) -> Result<(), (Module<'b>, ModuleError)> {
    // SAFETY: no thread runs the module's code any more (the tests call it only
    // synchronously).
    unsafe { m.unload(mem, poker) }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: `addr` lies in a loaded module's readable memory (the callers pass
    // addresses of its symbols).
    unsafe { (addr as usize as *const u32).read_unaligned() }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in `read_u32`.
    unsafe { (addr as usize as *const u64).read_unaligned() }
}

/// The offset in section `sec` of the first relocation of type `r_type` (ELF number).
fn reloc_offset(bytes: &[u8], sec: &str, r_type: u32) -> u64 {
    let f = object::File::parse(bytes).unwrap();
    let s = f.section_by_name(sec).unwrap();
    s.relocations()
        .find(|(_, r)| {
            r.flags()
                == object::RelocationFlags::Elf {
                    r_type: object::elf::RelocationType(r_type),
                }
        })
        .unwrap_or_else(|| panic!("no relocation {r_type} in {sec}"))
        .0
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------
// The "kernel": functions and statics of this binary that modules link against.

extern "C" fn kernel_add(a: i64, b: i64) -> i64 {
    a * 1000 + b
}

static KERNEL_COUNTER: AtomicI32 = AtomicI32::new(0);
static KERNEL_LAST: AtomicI64 = AtomicI64::new(0);

extern "C" fn kernel_note(v: i64) {
    KERNEL_LAST.store(v, Ordering::SeqCst);
}

/// A growable export list (`Symbols` is implemented for `[Export]`, which a `&dyn`
/// cannot point at, and for arrays).
#[derive(Clone, Debug)]
struct Exports(Vec<Export>);

impl module::Symbols for Exports {
    fn lookup(&self, name: &str) -> Option<u64> {
        self.0[..].lookup(name)
    }
}

impl Exports {
    fn push(&mut self, e: Export) {
        self.0.push(e);
    }
}

fn kernel_exports() -> Exports {
    Exports(vec![
        export!(kernel_add),
        export!(kernel_note),
        Export::new("kernel_counter", (&raw const KERNEL_COUNTER).cast()),
    ])
}

// ---------------------------------------------------------------------------------------
// 1. Every relocation type, exact values.

/// Fake addresses for absolute 32-bit relocations (never dereferenced).
const LOW32: u64 = 0x9abc_d000; // fits R_X86_64_32, not 32S
const NEG32: u64 = 0xffff_ffff_8123_4000; // a -mcmodel=kernel address: fits 32S only

const RELOC_ASM: &str = r#"
    .text
    .globl mod_func
    .type mod_func,@function
mod_func:
    ret
    .size mod_func, .-mod_func

    .section .rodata
    .globl ro_sym
ro_sym:
    .quad 0x1122334455667788
    .quad 0

    .bss
    .globl bss_sym
    .p2align 4
bss_sym:
    .zero 64

    .data
    .p2align 4
    .globl relocs
# Each field is followed by a guard word the loader must not touch.
relocs:
k64:    .quad 0
        .long 0xdeadbeef
kpc32:  .long 0
        .long 0xdeadbeef
kplt32: .long 0
        .long 0xdeadbeef
k32:    .long 0
        .long 0xdeadbeef
k32s:   .long 0
        .long 0xdeadbeef
kpc64:  .quad 0
        .long 0xdeadbeef
l64:    .quad 0
        .long 0xdeadbeef
lpc32:  .long 0
        .long 0xdeadbeef
lplt32: .long 0
        .long 0xdeadbeef
lpc64:  .quad 0
        .long 0xdeadbeef
lsec:   .quad 0
        .long 0xdeadbeef
knone:  .long 0x55aa55aa
        .long 0xdeadbeef

    .reloc k64, R_X86_64_64, kernel_add+5
    .reloc kpc32, R_X86_64_PC32, kernel_add-4
    .reloc kplt32, R_X86_64_PLT32, kernel_note-4
    .reloc k32, R_X86_64_32, low32+8
    .reloc k32s, R_X86_64_32S, neg32-16
    .reloc kpc64, R_X86_64_PC64, kernel_add+0x10
    .reloc l64, R_X86_64_64, ro_sym+3
    .reloc lpc32, R_X86_64_PC32, bss_sym+32
    .reloc lplt32, R_X86_64_PLT32, mod_func-4
    .reloc lpc64, R_X86_64_PC64, relocs-8
    .reloc lsec, R_X86_64_64, .rodata+8
    .reloc knone, R_X86_64_NONE, kernel_add
"#;

#[test]
fn every_relocation_type_writes_the_exact_value() {
    let _g = serial();
    let d = dir();
    let obj = asm_obj(d.path(), "relocs.s", RELOC_ASM);
    let mut exports = kernel_exports();
    exports.push(Export::new("low32", LOW32 as *const ()));
    exports.push(Export::new("neg32", NEG32 as *const ()));
    let k = kernel(&exports);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let probes = probe::count();
    let m = load(&obj, &k, &mut mem, &mut poker).unwrap();
    assert_eq!(mem.regions.allocs, 1);

    let base = m.symbol("relocs").unwrap();
    let ro = m.symbol("ro_sym").unwrap();
    let bss = m.symbol("bss_sym").unwrap();
    let func = m.symbol("mod_func").unwrap();
    let add = kernel_add as *const () as u64;
    let note = kernel_note as *const () as u64;
    // Placement: each symbol in its group, groups in order, memory near this binary.
    let text = m.text();
    assert!(text.contains(&func));
    assert!(
        func < ro && ro < base && base < bss,
        "{func:#x} {ro:#x} {base:#x} {bss:#x}"
    );
    assert!(m.memory().contains(&bss) && near_text(m.memory().start, 4096));
    assert_eq!(read_u64(ro), 0x1122_3344_5566_7788);
    assert_eq!(read_u64(bss), 0);

    let pc32 = |p: u64, sa: u64| sa.wrapping_sub(p) as i64 as i32 as u32;
    let mut off = 0u64;
    let mut field = |w: u64| {
        let p = base + off;
        // The guard after the field is intact.
        assert_eq!(read_u32(p + w), 0xdead_beef, "guard after field at {off}");
        off += w + 4;
        p
    };
    let p = field(8);
    assert_eq!(read_u64(p), add + 5, "R_X86_64_64 kernel");
    let p = field(4);
    assert_eq!(read_u32(p), pc32(p, add - 4), "R_X86_64_PC32 kernel");
    let p = field(4);
    assert_eq!(read_u32(p), pc32(p, note - 4), "R_X86_64_PLT32 kernel");
    let p = field(4);
    assert_eq!(read_u32(p), (LOW32 + 8) as u32, "R_X86_64_32");
    let p = field(4);
    assert_eq!(read_u32(p), (NEG32 - 16) as u32, "R_X86_64_32S");
    assert_eq!(read_u32(p) as i32 as i64 as u64, NEG32 - 16);
    let p = field(8);
    assert_eq!(
        read_u64(p),
        (add + 0x10).wrapping_sub(p),
        "R_X86_64_PC64 kernel"
    );
    let p = field(8);
    assert_eq!(read_u64(p), ro + 3, "R_X86_64_64 local");
    let p = field(4);
    assert_eq!(read_u32(p), pc32(p, bss + 32), "R_X86_64_PC32 to .bss");
    let p = field(4);
    assert_eq!(read_u32(p), pc32(p, func - 4), "R_X86_64_PLT32 local");
    let p = field(8);
    assert_eq!(
        read_u64(p),
        (base - 8).wrapping_sub(p),
        "R_X86_64_PC64 local"
    );
    let p = field(8);
    assert_eq!(read_u64(p), ro + 8, "R_X86_64_64 against a section");
    let p = field(4);
    assert_eq!(read_u32(p), 0x55aa_55aa, "R_X86_64_NONE writes nothing");

    let r = m.report();
    assert_eq!(r.relocations, 11, "{r:?}");
    assert_eq!(r.kernel_symbols, 4, "{r:?}");
    assert_eq!(r.sections, 4, "{r:?}");
    // Permissions: text RX, read-only R, data RW.
    assert_eq!(
        mem.protects.iter().map(|p| p.2).collect::<Vec<_>>(),
        [Prot::ReadExec, Prot::Read, Prot::ReadWrite]
    );
    unload(m, &mut mem, &mut poker).unwrap();
    mem.assert_clean();
    assert_eq!(probe::count(), probes);
}

// ---------------------------------------------------------------------------------------
// 2. Real compiler output.

static INIT_RUNS: AtomicI32 = AtomicI32::new(0);

extern "C" fn kernel_init_hook(v: i32) -> i32 {
    INIT_RUNS.fetch_add(1, Ordering::SeqCst);
    v
}

const C_MODULE: &str = r#"
extern long kernel_add(long a, long b);
extern void kernel_note(long v);
extern int kernel_init_hook(int v);
extern int kernel_counter;

static long state;
static const long table[4] = { 3, 5, 7, 11 };
static long twice(long a, long b) { return 2 * a + b; }
/* R_X86_64_64 in .data.rel.ro: one to the kernel, one to the module. */
static long (*const ops[2])(long, long) = { kernel_add, twice };

int ksites_module_init(void) {
    state = 42;
    kernel_counter += 1;
    return kernel_init_hook(INIT_RESULT);
}

void ksites_module_exit(void) {
    kernel_counter += 100;
    kernel_note(state);
}

long mod_compute(long x) {
    return kernel_add(x, state) * 2 + table[x & 3];
}

void mod_bump(void) {
    state++;
}

long mod_op(int i, long a, long b) {
    return ops[i & 1](a, b);
}
"#;

fn c_module(d: &Path, init_result: i32) -> Vec<u8> {
    let def = format!("-DINIT_RESULT={init_result}");
    let mut flags = C_FLAGS.to_vec();
    flags.push(&def);
    gcc_obj(
        d,
        &format!("cmod{}.c", init_result.unsigned_abs()),
        C_MODULE,
        &flags,
    )
}

fn c_exports() -> Exports {
    let mut e = kernel_exports();
    e.push(export!(kernel_init_hook));
    e
}

#[test]
fn c_module_runs_calls_back_and_inits_and_exits() {
    let _g = serial();
    let d = dir();
    let obj = c_module(d.path(), 0);
    let exports = c_exports();
    let k = kernel(&exports);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let probes = probe::count();
    let (c0, i0) = (
        KERNEL_COUNTER.load(Ordering::SeqCst),
        INIT_RUNS.load(Ordering::SeqCst),
    );
    let m = load(&obj, &k, &mut mem, &mut poker).unwrap();
    assert_eq!(
        KERNEL_COUNTER.load(Ordering::SeqCst),
        c0 + 1,
        "init ran once"
    );
    assert_eq!(INIT_RUNS.load(Ordering::SeqCst), i0 + 1);
    let f = m.symbol("mod_compute").unwrap();
    assert!(m.text().contains(&f));
    // SAFETY: `mod_compute` is `long (long)` in the module's text, mapped RX.
    let compute: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(f as usize) };
    assert_eq!(compute(7), (7 * 1000 + 42) * 2 + 11);
    assert_eq!(compute(2), (2 * 1000 + 42) * 2 + 7);
    let b = m.symbol("mod_bump").unwrap();
    // SAFETY: `mod_bump` is `void (void)` in the module's text.
    let bump: extern "C" fn() = unsafe { std::mem::transmute(b as usize) };
    bump();
    assert_eq!(compute(0), 43 * 2 + 3);
    let o = m.symbol("mod_op").unwrap();
    // SAFETY: `mod_op` is `long (int, long, long)` in the module's text.
    let op: extern "C" fn(i32, i64, i64) -> i64 = unsafe { std::mem::transmute(o as usize) };
    assert_eq!(op(0, 3, 4), 3004, "through a pointer to the kernel");
    assert_eq!(op(1, 3, 4), 10, "through a pointer to the module");
    assert!(m.report().relocations >= 12, "{:?}", m.report());
    assert!(
        m.symbol("state").is_none(),
        "static symbols are not exported"
    );
    assert!(m.symbol("nonexistent").is_none());
    KERNEL_LAST.store(0, Ordering::SeqCst);
    unload(m, &mut mem, &mut poker).unwrap();
    assert_eq!(KERNEL_COUNTER.load(Ordering::SeqCst), c0 + 101, "exit ran");
    assert_eq!(
        KERNEL_LAST.load(Ordering::SeqCst),
        43,
        "exit saw the module's state"
    );
    mem.assert_clean();
    assert_eq!(probe::count(), probes);

    // Load again: fresh state, init again.
    let m = load(&obj, &k, &mut mem, &mut poker).unwrap();
    assert_eq!(KERNEL_COUNTER.load(Ordering::SeqCst), c0 + 102);
    let f = m.symbol("mod_compute").unwrap();
    // SAFETY: as above.
    let compute: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(f as usize) };
    assert_eq!(compute(1), (1000 + 42) * 2 + 5);
    unload(m, &mut mem, &mut poker).unwrap();
    mem.assert_clean();
}

const RUST_MODULE: &str = r#"#![no_std]
use core::sync::atomic::{AtomicI32, AtomicI64, Ordering};

unsafe extern "C" {
    fn kernel_add(a: i64, b: i64) -> i64;
    fn kernel_note(v: i64);
    static kernel_counter: AtomicI32;
}

static STATE: AtomicI64 = AtomicI64::new(0);

#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_init() -> i32 {
    STATE.store(9, Ordering::Relaxed);
    // SAFETY: the kernel exports `kernel_counter` as an AtomicI32.
    unsafe { kernel_counter.fetch_add(10, Ordering::SeqCst) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_exit() {
    // SAFETY: as above.
    unsafe { kernel_counter.fetch_sub(3, Ordering::SeqCst) };
    // SAFETY: kernel_note takes any i64.
    unsafe { kernel_note(STATE.load(Ordering::Relaxed) + 1) };
}

#[unsafe(no_mangle)]
pub extern "C" fn rust_compute(x: i64) -> i64 {
    // SAFETY: kernel_add takes any i64s.
    unsafe { kernel_add(x, STATE.load(Ordering::Relaxed)) }.wrapping_add(1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
"#;

#[test]
fn rust_module_runs_calls_back_and_inits_and_exits() {
    let _g = serial();
    let d = dir();
    let obj = rustc_obj(d.path(), "rmod.rs", RUST_MODULE);
    let exports = kernel_exports();
    let k = kernel(&exports);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let probes = probe::count();
    let c0 = KERNEL_COUNTER.load(Ordering::SeqCst);
    let m = load(&obj, &k, &mut mem, &mut poker).unwrap();
    assert_eq!(KERNEL_COUNTER.load(Ordering::SeqCst), c0 + 10, "init ran");
    let f = m.symbol("rust_compute").unwrap();
    assert!(m.text().contains(&f));
    // SAFETY: `rust_compute` is `extern "C" fn(i64) -> i64` in the module's text.
    let compute: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(f as usize) };
    assert_eq!(compute(5), 5010);
    assert_eq!(compute(-1), -1000 + 9 + 1);
    assert!(m.report().kernel_symbols >= 3, "{:?}", m.report());
    unload(m, &mut mem, &mut poker).unwrap();
    assert_eq!(KERNEL_COUNTER.load(Ordering::SeqCst), c0 + 7, "exit ran");
    assert_eq!(KERNEL_LAST.load(Ordering::SeqCst), 10);
    mem.assert_clean();
    assert_eq!(probe::count(), probes);
}

// ---------------------------------------------------------------------------------------
// 3. Failures: named, nothing leaked, the registry unchanged.

/// Loads `obj`, expecting an error; checks nothing leaked and the registry is unchanged;
/// returns the error's text.
#[track_caller]
fn load_err(obj: &[u8], exports: &Exports) -> (String, ModuleError) {
    let k = kernel(exports);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let probes = probe::count();
    let e = match load(obj, &k, &mut mem, &mut poker) {
        Ok(m) => panic!("loaded: {m:?}"),
        Err(e) => e,
    };
    mem.assert_clean();
    assert_eq!(probe::count(), probes);
    assert_eq!(poker.module_writes, 0);
    let s = e.to_string();
    // Leak the bytes so the error can outlive this call (tests are short-lived).
    let obj: &'static [u8] = Box::leak(obj.to_vec().into_boxed_slice());
    let k = kernel(exports);
    // SAFETY: as in `load`.
    let e2 = unsafe { Module::load("again", obj, &k, &mut mem, &mut poker) }
        .map(|_| ())
        .unwrap_err();
    mem.assert_clean();
    assert_eq!(e2.to_string(), s, "deterministic");
    (s, e2)
}

/// `module::check` into test memory: every issue reported, and the result.
fn check_all(obj: &[u8], exports: &Exports) -> (Vec<String>, Result<(), String>) {
    let k = kernel(exports);
    let mut mem = TestMem::default();
    let mut issues = Vec::new();
    let r = module::check(obj, &k, &mut mem, &mut |e| issues.push(e.to_string()));
    mem.assert_clean();
    (issues, r.map(|_| ()).map_err(|e| e.to_string()))
}

#[test]
fn unknown_symbols_are_named_and_check_lists_them_all() {
    let _g = serial();
    let d = dir();
    let obj = asm_obj(
        d.path(),
        "unknown.s",
        r#"
    .text
    .globl f
f:  call nosuch_one
    call kernel_add
    call nosuch_two
    movq nosuch_three(%rip), %rax
    .weak maybe_there
    movq $maybe_there, %rax
    ret
"#,
    );
    let exports = kernel_exports();
    let (s, e) = load_err(&obj, &exports);
    assert_eq!(
        e,
        ModuleError::UnknownSymbol {
            name: "nosuch_one".into()
        }
    );
    assert_eq!(
        s,
        "unknown symbol `nosuch_one`: the kernel does not export it"
    );
    let (issues, r) = check_all(&obj, &exports);
    assert_eq!(
        issues,
        ["nosuch_one", "nosuch_two", "nosuch_three"]
            .map(|n| format!("unknown symbol `{n}`: the kernel does not export it"))
    );
    assert_eq!(r.unwrap_err(), issues[0]);
    // With all three exported, the weak one left undefined resolves to 0 and it loads.
    let mut more = exports.clone();
    for n in ["nosuch_one", "nosuch_two", "nosuch_three"] {
        more.push(Export::new(n, kernel_note as *const ()));
    }
    let (issues, r) = check_all(&obj, &more);
    assert!(issues.is_empty(), "{issues:?}");
    r.unwrap();
    let k = kernel(&more);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let m = load(&obj, &k, &mut mem, &mut poker).unwrap();
    let f = m.symbol("f").unwrap();
    // The weak absolute `movq $maybe_there, %rax` (R_X86_64_32S) holds 0: bytes
    // 48 c7 c0 00 00 00 00 after the three calls and the load.
    let at = f + 5 + 5 + 5 + 7;
    assert_eq!(read_u64(at) & 0xff_ffff_ffff_ffff, 0x00_0000_00c0_c748);
    assert_eq!(m.report().kernel_symbols, 4);
    unload(m, &mut mem, &mut poker).unwrap();
    mem.assert_clean();
}

#[test]
fn unsupported_relocation_names_type_section_offset() {
    let _g = serial();
    let d = dir();
    let obj = asm_obj(
        d.path(),
        "gotpcrel.s",
        r#"
    .text
    .globl f
f:  nop
    nop
    nop
x:  .long 0
    ret
    .reloc x, R_X86_64_GOTPCREL, kernel_add
"#,
    );
    let (s, e) = load_err(&obj, &kernel_exports());
    assert_eq!(
        e,
        ModuleError::UnsupportedRelocation {
            r_type: 9,
            section: ".text".into(),
            offset: 3
        }
    );
    assert_eq!(
        s,
        "unsupported relocation R_X86_64_GOTPCREL (9) in .text at offset 0x3"
    );
}

#[test]
fn overflow_from_absolute_32_bit_relocations_in_c_code() {
    let _g = serial();
    let d = dir();
    // `-mcmodel=small` materializes addresses as 32-bit zero-extended immediates,
    // `-mcmodel=kernel` as sign-extended ones: the module lies far above 4 GiB and far
    // below -2 GiB (near this PIE binary), so neither fits.
    let src = "static int state;\nint *addr_of_state(void) { return &state; }\n";
    for (model, r_type, name) in [
        ("-mcmodel=small", object::elf::R_X86_64_32, "R_X86_64_32"),
        ("-mcmodel=kernel", object::elf::R_X86_64_32S, "R_X86_64_32S"),
    ] {
        let flags = ["-O2", "-fno-pic", model, "-fno-asynchronous-unwind-tables"];
        let file = format!("abs{}.c", r_type);
        let obj = gcc_obj(d.path(), &file, src, &flags);
        let off = reloc_offset(&obj, ".text", r_type.0);
        let (s, e) = load_err(&obj, &kernel_exports());
        let ModuleError::Overflow {
            r_type: t,
            section,
            offset,
            value,
        } = e
        else {
            panic!("{model}: {e:?}")
        };
        assert_eq!(
            (t, section, offset),
            (r_type.0, ".text".into(), off),
            "{model}"
        );
        // The value is `state`'s address in the module's .bss, near this binary.
        assert!(near_text(value as u64, 0), "{model}: {value:#x}");
        assert_eq!(
            s,
            format!(
                "relocation {name} in .text at offset {off:#x} overflows: {value:#x} does not fit"
            )
        );
    }
    // A PC32 reference to a kernel symbol out of rel32 reach overflows too.
    let obj = asm_obj(
        d.path(),
        "far.s",
        "    .text\n    .globl f\nf:  call far_away\n    ret\n",
    );
    let mut exports = kernel_exports();
    exports.push(Export::new("far_away", 0x1000 as *const ()));
    let (s, e) = load_err(&obj, &exports);
    assert!(
        matches!(
            e,
            ModuleError::Overflow {
                r_type,
                section,
                offset: 1,
                ..
            } if section == ".text" && r_type == object::elf::R_X86_64_PLT32.0
        ),
        "{e:?}"
    );
    assert!(
        s.starts_with("relocation R_X86_64_PLT32 in .text at offset 0x1 overflows"),
        "{s}"
    );
}

#[test]
fn records_without_a_table_are_not_embedded() {
    let _g = serial();
    let d = dir();
    let obj = asm_obj(
        d.path(),
        "records.s",
        r#"
    .text
    .globl f
f:  nop
    ret
    .section .ksites_probe_sites,"a",@progbits
    .long 0
"#,
    );
    let (s, e) = load_err(&obj, &kernel_exports());
    assert_eq!(
        e,
        ModuleError::NotEmbedded {
            section: ".ksites_probe_sites".into()
        }
    );
    assert_eq!(
        s,
        "the object has .ksites_probe_sites but no .ksites table: run `ksites embed` on it"
    );
}

#[test]
fn executables_are_not_modules() {
    let _g = serial();
    let d = dir();
    std::fs::write(
        d.path().join("exe.s"),
        "    .text\n    .globl _start\n_start: hlt\n",
    )
    .unwrap();
    ok(
        run(Command::new("gcc")
            .args(["-nostdlib", "-static", "-no-pie", "exe.s", "-o", "exe"])
            .current_dir(d.path())),
        "link exe",
    );
    let exe = std::fs::read(d.path().join("exe")).unwrap();
    let (s, e) = load_err(&exe, &kernel_exports());
    assert_eq!(
        e,
        ModuleError::NotRelocatable {
            e_type: 2,
            machine: 62
        }
    );
    assert_eq!(
        s,
        "not an x86-64 relocatable object (e_type 2, e_machine 62)"
    );
}

#[test]
fn init_failure_frees_everything_and_skips_exit() {
    let _g = serial();
    let d = dir();
    let obj = c_module(d.path(), -5);
    let c0 = KERNEL_COUNTER.load(Ordering::SeqCst);
    let i0 = INIT_RUNS.load(Ordering::SeqCst);
    let (s, e) = load_err(&obj, &c_exports());
    assert_eq!(e, ModuleError::InitFailed(-5));
    assert_eq!(s, "ksites_module_init returned -5");
    // `load_err` loads twice: init ran twice, exit never.
    assert_eq!(INIT_RUNS.load(Ordering::SeqCst), i0 + 2);
    assert_eq!(KERNEL_COUNTER.load(Ordering::SeqCst), c0 + 2);
}

#[test]
fn out_of_memory_is_reported() {
    let _g = serial();
    let d = dir();
    let obj = asm_obj(d.path(), "tiny.s", "    .text\n    .globl f\nf: ret\n");
    let exports = kernel_exports();
    let k = kernel(&exports);
    let mut mem = TestMem {
        fail_alloc: true,
        ..TestMem::default()
    };
    let mut poker = TestPoker::new();
    let e = load(&obj, &k, &mut mem, &mut poker).unwrap_err();
    assert!(
        matches!(e, ModuleError::OutOfMemory { size } if size >= 2 * PAGE_SIZE),
        "{e:?}"
    );
    mem.assert_clean();
    assert_eq!(mem.regions.allocs, 0);
}

/// Garbage in (truncations, byte flips of a real object, random bytes): an error or a
/// load, never a panic, and never a leak.
#[test]
fn truncated_and_corrupted_objects_never_panic() {
    let _g = serial();
    let d = dir();
    // No init/exit (nothing is executed), relocations of every kind.
    let obj = asm_obj(d.path(), "fuzz.s", RELOC_ASM);
    let mut exports = kernel_exports();
    exports.push(Export::new("low32", LOW32 as *const ()));
    exports.push(Export::new("neg32", NEG32 as *const ()));
    let k = kernel(&exports);
    let mut mem = TestMem::default();
    let mut poker = TestPoker::new();
    let probes = probe::count();
    let (mut loaded, mut failed) = (0u32, 0u32);
    let mut try_one = |bytes: &[u8], mem: &mut TestMem, poker: &mut TestPoker| {
        match load(bytes, &k, mem, poker) {
            Ok(m) => {
                loaded += 1;
                unload(m, mem, poker).unwrap();
            }
            Err(e) => {
                failed += 1;
                let _ = e.to_string();
            }
        }
        let mut sink = 0usize;
        let _ = module::check(bytes, &k, mem, &mut |_| sink += 1);
        mem.assert_clean();
    };
    for len in (0..obj.len()).step_by(7) {
        try_one(&obj[..len], &mut mem, &mut poker);
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let mut b = obj.clone();
        for _ in 0..1 + rand() % 4 {
            let i = (rand() % b.len() as u64) as usize;
            b[i] = rand() as u8;
        }
        try_one(&b, &mut mem, &mut poker);
    }
    for n in [0usize, 1, 63, 64, 65, 200, 4096] {
        let b: Vec<u8> = (0..n).map(|_| rand() as u8).collect();
        try_one(&b, &mut mem, &mut poker);
    }
    assert!(
        failed > 100 && loaded > 0,
        "loaded {loaded} failed {failed}"
    );
    assert_eq!(probe::count(), probes);
}

/// `-fno-plt` calls through the GOT (`R_X86_64_GOTPCRELX`), which a module cannot have:
/// `check` names each such relocation (and `_GLOBAL_OFFSET_TABLE_` if referenced).
#[test]
fn got_relocations_from_fno_plt_are_unsupported() {
    let _g = serial();
    let d = dir();
    let src =
        "extern long kernel_add(long, long);\nlong f(long x) { return kernel_add(x, 1) + 1; }\n";
    let obj = gcc_obj(
        d.path(),
        "noplt.c",
        src,
        &[
            "-O2",
            "-fpie",
            "-fno-plt",
            "-fno-asynchronous-unwind-tables",
        ],
    );
    let off = reloc_offset(&obj, ".text", object::elf::R_X86_64_GOTPCRELX.0);
    let (issues, r) = check_all(&obj, &kernel_exports());
    let want =
        format!("unsupported relocation R_X86_64_GOTPCRELX (41) in .text at offset {off:#x}");
    assert!(issues.contains(&want), "{issues:?}");
    assert!(r.is_err());
    let (s, _) = load_err(&obj, &kernel_exports());
    assert!(issues.contains(&s), "{s} not among {issues:?}");
}

// ---------------------------------------------------------------------------------------
// 4. Embedded modules: Rust (its own ifunc, an imported kernel ifunc, probes) and C
// (the import, dtrace-style C probes).
//
// A module built for x86_64-unknown-none uses absolute 32-bit addresses (probe records,
// resolvers' function pointers), which fit only below 2 GiB, and this PIE test binary
// lies far above: the "kernel" is a non-PIE host program (`tests/fixtures/
// module_kernel.rs`) built here against kernel-loader (std + module), which loads the
// module below 2 GiB and runs the checks.

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

const MOD_SRC: &str = r#"#![no_std]
use core::sync::atomic::{AtomicU64, Ordering};
use kernel_loader::probe::ProbeId;
use kernel_loader::{CpuFeatures, ifunc, ifunc_import, probe, probe_enabled};

unsafe extern "C" fn double_soft(x: u64) -> u64 { x.wrapping_mul(2) }
unsafe extern "C" fn double_fast(x: u64) -> u64 { x.wrapping_mul(2) | 1 }
fn pick(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 {
    if f.contains(CpuFeatures::SSE2) { double_fast } else { double_soft }
}
ifunc! {
    /// Doubles (odd when the fast one was picked).
    pub fn mod_double(x: u64) -> u64;
    default = double_soft;
    resolver = pick;
}
ifunc_import! {
    /// The kernel's popcount.
    pub fn kpopcount(x: u64) -> u32;
}
unsafe extern "C" {
    fn kernel_add(a: i64, b: i64) -> i64;
}
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn work(x: u64) -> u64 {
    probe!(modr, work, x, x + 1);
    let r = mod_double(x) + kpopcount(x) as u64;
    if probe_enabled!(modr, check) { probe!(modr, check); }
    r
}
#[unsafe(no_mangle)]
pub extern "C" fn add_via_kernel(x: i64) -> i64 {
    // SAFETY: kernel_add takes any i64s.
    unsafe { kernel_add(x, 4) }
}
static HANDLED: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
pub fn mod_handler(_id: ProbeId, args: &[u64; 6]) { HANDLED.store(args[0], Ordering::SeqCst); }
#[unsafe(no_mangle)]
pub extern "C" fn mod_handled() -> u64 { HANDLED.load(Ordering::SeqCst) }
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! { loop {} }
"#;

const C_MOD_SRC: &str = r#"
#include "ksites_sdt.h"
#include "ksites_module.h"
extern unsigned int kpopcount(unsigned long x);
KSITES_IFUNC_IMPORT(kpopcount);
KSITES_PROBE_DECL(cmod, hit, 2, (unsigned long a, unsigned long b))
unsigned long count_bits(unsigned long x) {
    KSITES_PROBE(cmod, hit, x, 1);
    return kpopcount(x);
}
unsigned int tail_pop(unsigned long x) { return kpopcount(x); }
int is_on(void) { return KSITES_PROBE_ENABLED(cmod, hit); }
"#;

/// The one `lib{name}-*.rlib` in `deps`.
fn dep_rlib(deps: &Path, name: &str) -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir(deps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("lib{name}-")) && n.ends_with(".rlib")
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} in {deps:?}: {found:?}");
    found.pop().unwrap()
}

#[test]
fn embedded_rust_and_c_modules_ifuncs_probes_and_unload_rules() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("module_loader_kernel");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    // The module: kernel-loader for x86_64-unknown-none, rustc, ksites embed.
    let none = module_build::kernel_loader_for_none(&tmp.join("kl-none"));
    module_build::rustc_module(&tmp, "modr", MOD_SRC, "modr.o", &none);
    ok(
        run(Command::new(KSITES)
            .args(["embed", "modr.o", "-o", "modr.ksites.o"])
            .current_dir(&tmp)),
        "ksites embed modr.o",
    );

    std::fs::write(tmp.join("cmod.c"), C_MOD_SRC).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c");
    ok(
        run(Command::new("gcc")
            .args(module_build::GCC_MODULE_FLAGS)
            .arg("-I")
            .arg(&include)
            .args(["cmod.c", "-o", "cmod.o"])
            .current_dir(&tmp)),
        "gcc cmod.c",
    );
    ok(
        run(Command::new(KSITES)
            .args(["embed", "cmod.o", "-o", "cmod.ksites.o"])
            .current_dir(&tmp)),
        "ksites embed cmod.o",
    );

    // The un-embedded object is refused: it has records but no table (before its
    // ifunc import `kpopcount`, which this binary does not export, is looked up).
    let _g = serial();
    let raw = std::fs::read(tmp.join("modr.o")).unwrap();
    let (s, _) = load_err(&raw, &kernel_exports());
    assert!(
        s.contains("but no .ksites table: run `ksites embed` on it"),
        "{s}"
    );
    let embedded = std::fs::read(tmp.join("modr.ksites.o")).unwrap();
    // `check` on the host against the PIE binary: everything resolves; the module's
    // absolute 32-bit references cannot reach memory near this binary.
    let mut exports = kernel_exports();
    for e in module::RUNTIME_EXPORTS {
        exports.push(e);
    }
    exports.push(Export::new("kpopcount", kernel_note as *const ()));
    let (issues, r) = check_all(&embedded, &exports);
    assert!(r.is_err());
    assert!(
        issues.iter().all(|i| i.contains("overflows")),
        "only overflows: {issues:?}"
    );

    // The kernel: a non-PIE host program with kernel-loader (std + module).
    let host = tmp.join("kl-host");
    module_build::cargo_build_kernel_loader(&["--features", "std,module"], &host);
    let host = host.join("debug");
    let libc = dep_rlib(&host.join("deps"), "libc");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/module_kernel.rs");
    ok(
        run(Command::new("rustc")
            .args([
                "--edition",
                "2024",
                "-C",
                "relocation-model=static",
                "-C",
                "opt-level=1",
                "-C",
                "debug-assertions",
                "-D",
                "warnings",
                "--extern",
            ])
            .arg(format!(
                "kernel_loader={}",
                host.join("libkernel_loader.rlib").display()
            ))
            .arg("--extern")
            .arg(format!("libc={}", libc.display()))
            .arg("-L")
            .arg(format!("dependency={}", host.join("deps").display()))
            .arg("-o")
            .arg(tmp.join("module_kernel"))
            .arg(&fixture)),
        "rustc module_kernel",
    );
    let o = run(Command::new(tmp.join("module_kernel"))
        .arg(tmp.join("modr.ksites.o"))
        .arg(tmp.join("cmod.ksites.o")));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "module_kernel: {:?}\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let n: u32 = out
        .trim()
        .strip_prefix("PASS ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!(n >= 50, "{n} checks");
}
