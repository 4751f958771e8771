//! C kernels: `KSITES_TABLE_CELL()` from `kernel-loader/c/ksites.h` defines a cell that
//! `ksites embed` fills (a static C program with a GNU ifunc embeds, verifies and still
//! runs), and the C API's declarations in `ksites.h` link against the
//! `kernel-loader-capi` static library and behave as documented on the host: errors
//! before `embed`, and after it `ksites_init`, a C call and a C tail probe enabled with
//! a C handler (the tail's `int3` reaching `ksites_handle_int3` from a `SIGTRAP`
//! handler), hits, disable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kernel-loader/c`, where the headers are.
fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/c")
}

/// A fresh directory under the target's test temp dir.
fn fresh_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `gcc -O2 -Wall -Wextra -Werror -I kernel-loader/c FLAGS SRC -o dir/name ARGS`.
fn gcc(dir: &Path, name: &str, src: &str, flags: &[&str], after: &[&Path]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let out = dir.join(name);
    let o = run(Command::new("gcc")
        .args(["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .args(flags)
        .arg(&c)
        .args(after)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "gcc {name}: {}", text(&o.stderr));
    out
}

/// Runs `exe`: it must exit 0; returns its stdout.
fn run_ok(exe: &Path) -> String {
    let o = run(&mut Command::new(exe));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}: {}{}",
        exe.display(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

const CELL_PROGRAM: &str = r#"#include <stdio.h>
#include "ksites.h"

KSITES_TABLE_CELL();

static long twice(long x) { return 2 * x; }
static long (*pick(void))(long) { return twice; }
long scale(long x) __attribute__((ifunc("pick")));

int main(int argc, char **argv) {
    (void)argv;
    printf("scale %ld size %lu\n", scale(argc + 20),
           (unsigned long)__ksites_table_cell[2]);
    return __ksites_table_cell[0] == KSITES_CELL_MAGIC ? 0 : 3;
}
"#;

#[test]
fn c_table_cell_macro_embeds_verifies_and_runs() {
    let dir = fresh_dir("c_api_cell");
    let input = gcc(
        &dir,
        "cell",
        CELL_PROGRAM,
        &["-static", "-no-pie", "-Wl,--emit-relocs"],
        &[],
    );
    assert_eq!(
        run_ok(&input),
        "scale 42 size 0\n",
        "before embed: empty cell"
    );

    // The cell holds exactly the Rust cell's bytes.
    let data = std::fs::read(&input).unwrap();
    let file = object::File::parse(&*data).unwrap();
    use object::{Object, ObjectSection, ObjectSymbol};
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(kernel_loader::cell::CELL_SYMBOL))
        .expect("the macro defines the cell symbol");
    assert_eq!(sym.size(), kernel_loader::cell::CELL_SIZE as u64);
    assert_eq!(sym.address() % 8, 0, "aligned");
    let sec = file.section_by_index(sym.section_index().unwrap()).unwrap();
    let off = (sym.address() - sec.address()) as usize;
    let bytes = &sec.data().unwrap()[off..off + 24];
    let mut want = kernel_loader::cell::CELL_MAGIC.to_le_bytes().to_vec();
    want.extend([0; 16]);
    assert_eq!(bytes, &want[..]);

    let output = dir.join("cell.k");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&output));
    assert!(o.status.success(), "embed: {}", text(&o.stderr));
    let v = run(Command::new(KSITES).arg("verify").arg(&output));
    assert!(
        v.status.success(),
        "verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    let after = run_ok(&output);
    let size: u64 = after
        .strip_prefix("scale 42 size ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("after embed printed {after:?}"));
    assert!(size > 0, "embed filled the cell: {after:?}");
}

/// `cargo rustc -p kernel-loader-capi --crate-type staticlib --features std` into a
/// target directory of its own; the library's path.
fn host_staticlib() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_api_target");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = run(Command::new(cargo)
        .args([
            "rustc",
            "-q",
            "--crate-type",
            "staticlib",
            "--features",
            "std",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS"));
    assert!(o.status.success(), "cargo rustc capi: {}", text(&o.stderr));
    target.join("debug/libkernel_loader_capi.a")
}

const API_PROGRAM: &str = r#"#include <stdio.h>
#include <string.h>
#include "ksites.h"

static int writes;
static int w(void *ctx, uint64_t addr, const uint8_t *b, size_t n) {
    (void)ctx; (void)addr; (void)b; (void)n; writes++; return KSITES_POKE_NOT_TEXT;
}
static void h(uint32_t id, const uint64_t args[6]) { (void)id; (void)args; }
static void nop(void *ctx) { (void)ctx; }

#define CHECK(e) do { if (!(e)) { printf("failed: %s\n", #e); return 1; } } while (0)

int main(void) {
    struct ksites_poker poker = { NULL, NULL, w, nop, nop };
    struct ksites_poker no_write = { NULL, NULL, NULL, nop, nop };
    struct ksites_poker no_sync = { NULL, NULL, w, NULL, nop };
    struct ksites_poker no_end = { NULL, NULL, w, nop, NULL };
    struct ksites_range exec = { 0x1000, 0x2000 };
    uint32_t id = 7, n = 9;

    CHECK(strstr(ksites_strerror(KSITES_ENOTFOUND), "no such probe"));
    CHECK(strstr(ksites_strerror(KSITES_ENOTRAP), "ksites_declare_int3_route"));
    CHECK(strstr(ksites_strerror(-1000), "unknown"));
    CHECK(strstr(ksites_strerror(KSITES_EROLLBACK), "inconsistent"));
    CHECK(strstr(ksites_strerror(KSITES_EALREADY), "already"));
    CHECK(ksites_probe_lookup("no:such", &id) == KSITES_ENOTFOUND && id == 7);
    CHECK(ksites_probe_lookup(NULL, &id) == KSITES_EINVAL);
    CHECK(ksites_probe_lookup("\xff:x", &id) == KSITES_EINVAL);
    CHECK(ksites_probe_hits(0) == 0);
    CHECK(ksites_probe_enable(0, h, NULL) == KSITES_EINVAL);
    CHECK(ksites_probe_enable(0, h, &no_write) == KSITES_EINVAL);
    /* Live patching without serialization, or text left writable: refused. */
    CHECK(ksites_probe_enable(0, h, &no_sync) == KSITES_EINVAL);
    CHECK(ksites_probe_enable(0, h, &no_end) == KSITES_EINVAL);
    CHECK(ksites_probe_disable(0, &no_sync) == KSITES_EINVAL);
    CHECK(ksites_init(&exec, 1, &no_sync, &n) == KSITES_EINVAL && n == 9);
    CHECK(ksites_init(&exec, 1, &no_end, &n) == KSITES_EINVAL && n == 9);
    CHECK(ksites_probe_enable(0, NULL, &poker) == KSITES_EINVAL);
    CHECK(ksites_probe_enable(0, h, &poker) == KSITES_ENOTFOUND);
    CHECK(ksites_probe_disable(0, &poker) == KSITES_ENOTFOUND);
    /* Not embedded: the library's cell is empty. */
    CHECK(ksites_init(&exec, 1, &poker, &n) == KSITES_ECELL && n == 9);
    CHECK(ksites_init(&exec, 0, &poker, &n) == KSITES_EINVAL);
    CHECK(ksites_init(&exec, 17, &poker, &n) == KSITES_EINVAL);
    CHECK(ksites_init(NULL, 1, &poker, &n) == KSITES_EINVAL);
    struct ksites_int3_frame f = { .rip = 1 };
    CHECK(ksites_handle_int3(&f) == 0 && f.rip == 1);
    CHECK(ksites_handle_int3(NULL) == 0);
    CHECK(ksites_int3_entry_address() != 0);
    ksites_declare_int3_route();
    CHECK(ksites_probe_enable(3, h, &poker) == KSITES_ENOTFOUND);
    CHECK(writes == 0);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn c_api_header_links_against_the_staticlib_and_behaves() {
    let lib = host_staticlib();
    let dir = fresh_dir("c_api_link");
    let exe = gcc(
        &dir,
        "api",
        API_PROGRAM,
        &[],
        &[&lib, Path::new("-lgcc_s"), Path::new("-lm")],
    );
    assert_eq!(run_ok(&exe), "ok\n");
}

/// A C program using the whole C API on itself once embedded: an `mprotect` poker over
/// its text, a `SIGTRAP` handler that calls `ksites_handle_int3` (as a C kernel's #BP
/// handler would), a call probe and a tail probe (an `int3` while enabled).
const INIT_PROGRAM: &str = r#"#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include "ksites.h"

KSITES_PROBE_DECL(capi, call, 1, (unsigned long a))
KSITES_PROBE_DECL(capi, tail, 1, (unsigned long a))

extern char __executable_start[], etext[];


volatile unsigned long work;
__attribute__((noinline)) unsigned long fire_call(unsigned long x) {
    KSITES_PROBE(capi, call, x);
    return x + 1;
}
__attribute__((noinline)) void fire_tail(unsigned long x) {
    work += x;
    KSITES_PROBE(capi, tail, x);
}

/* The text poker: the executable range writable between begin and end. */
static uintptr_t lo, hi;
static int writes, protects;
static int p_begin(void *ctx) {
    (void)ctx;
    protects++;
    return mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE | PROT_EXEC) ? KSITES_POKE_PROTECT : 0;
}
static int p_write(void *ctx, uint64_t addr, const uint8_t *b, size_t n) {
    (void)ctx;
    if (addr < lo || addr + n > hi) return KSITES_POKE_NOT_TEXT;
    memcpy((void *)(uintptr_t)addr, b, n);
    writes++;
    return 0;
}
static void p_sync(void *ctx) { (void)ctx; __sync_synchronize(); }
static void p_end(void *ctx) { (void)ctx; mprotect((void *)lo, hi - lo, PROT_READ | PROT_EXEC); }

/* The #BP hook from SIGTRAP, as a C kernel's own #BP handler would call it. */
static int traps;
static void on_trap(int sig, siginfo_t *si, void *uc_) {
    (void)sig; (void)si;
    ucontext_t *uc = uc_;
    greg_t *g = uc->uc_mcontext.gregs;
    struct ksites_int3_frame f = {
        (uint64_t)g[REG_RIP], (uint64_t)g[REG_RSP], (uint64_t)g[REG_RAX], (uint64_t)g[REG_RDI],
        (uint64_t)g[REG_RSI], (uint64_t)g[REG_RDX], (uint64_t)g[REG_RCX], (uint64_t)g[REG_R8],
        (uint64_t)g[REG_R9],
    };
    if (!ksites_handle_int3(&f)) _exit(70);
    traps++;
    g[REG_RIP] = (greg_t)f.rip;
    g[REG_RSP] = (greg_t)f.rsp;
    g[REG_RAX] = (greg_t)f.rax;
}

static uint64_t calls[2], last[2];
static uint32_t ids[2];
static void handler(uint32_t id, const uint64_t args[6]) {
    int i = id == ids[1];
    calls[i]++;
    last[i] = args[0];
}

#define CHECK(e) do { if (!(e)) { printf("failed: %s\n", #e); return 1; } } while (0)

int main(void) {
    long page = sysconf(_SC_PAGESIZE);
    lo = (uintptr_t)__executable_start & ~(uintptr_t)(page - 1);
    hi = ((uintptr_t)etext + page - 1) & ~(uintptr_t)(page - 1);
    struct ksites_poker poker = { NULL, p_begin, p_write, p_sync, p_end };
    struct ksites_range exec = { (uint64_t)(uintptr_t)__executable_start, (uint64_t)(uintptr_t)etext };
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    CHECK(sigaction(SIGTRAP, &sa, NULL) == 0);

    uint32_t n = 0;
    int r = ksites_init(&exec, 1, &poker, &n);
    if (r) { printf("init: %s\n", ksites_strerror(r)); return 1; }
    CHECK(n == 0);
    CHECK(ksites_probe_lookup("capi:call", &ids[0]) == 0);
    CHECK(ksites_probe_lookup("capi:tail", &ids[1]) == 0);
    CHECK(ksites_probe_enable(ids[0], handler, &poker) == KSITES_ENOTRAP);
    ksites_declare_int3_route();
    CHECK(ksites_probe_enable(ids[0], handler, &poker) == 0);
    CHECK(ksites_probe_enable(ids[1], handler, &poker) == 0);
    CHECK(fire_call(5) == 6);
    fire_tail(6);
    CHECK(calls[0] == 1 && last[0] == 5 && calls[1] == 1 && last[1] == 6);
    CHECK(ksites_probe_hits(ids[0]) == 1 && ksites_probe_hits(ids[1]) == 1);
    CHECK(traps >= 1);
    CHECK(ksites_probe_disable(ids[0], &poker) == 0);
    CHECK(ksites_probe_disable(ids[1], &poker) == 0);
    CHECK(fire_call(1) == 2);
    fire_tail(1);
    CHECK(calls[0] == 1 && calls[1] == 1 && work == 7);
    CHECK(ksites_init(&exec, 1, &poker, &n) == KSITES_EALREADY);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn c_api_init_enable_fire_disable_on_an_embedded_c_program() {
    let lib = host_staticlib();
    let dir = fresh_dir("c_api_init");
    let input = gcc(
        &dir,
        "init",
        INIT_PROGRAM,
        &["-no-pie", "-fno-pie", "-Wl,--emit-relocs"],
        &[&lib, Path::new("-lgcc_s"), Path::new("-lm")],
    );
    // Not embedded: the library's cell is empty.
    let o = run(&mut Command::new(&input));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stdout).contains("init: the image's table cell is empty"),
        "{}",
        text(&o.stdout)
    );
    let output = dir.join("init.k");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&output));
    assert!(o.status.success(), "embed: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("2 probes, 2 probe sites"),
        "{}",
        text(&o.stdout)
    );
    let v = run(Command::new(KSITES).arg("verify").arg(&output));
    assert!(
        v.status.success(),
        "verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    assert_eq!(run_ok(&output), "ok\n");
}
