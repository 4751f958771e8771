//! C kernels: `KSITES_TABLE_CELL()` from `kernel-loader/c/ksites.h` defines a cell that
//! `ksites embed` fills (a static C program with a GNU ifunc embeds, verifies and still
//! runs), and the C API's declarations in `ksites.h` link against the
//! `kernel-loader-capi` static library and behave as documented on the host: errors
//! before `embed`, and after it `ksites_init`, a C call and a C tail probe enabled with
//! a C handler (the tail's `int3` reaching `ksites_handle_int3` from a `SIGTRAP`
//! handler), hits, disable; C modules loaded, called, probed, held, unloaded and
//! refused with each error code through the C module API; and the hand-written header
//! declares exactly the library's functions (parameter counts) and constants.

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
static int allocs;
static int m_alloc(void *ctx, size_t size, struct ksites_region *out) {
    (void)ctx; (void)size; (void)out; allocs++; return 1;
}
static int m_protect(void *ctx, const struct ksites_region *r, size_t off, size_t len, int prot) {
    (void)ctx; (void)r; (void)off; (void)len; (void)prot; return 2;
}
static void m_free(void *ctx, const struct ksites_region *r) { (void)ctx; (void)r; }

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
    /* Modules: bad arguments, and no kernel table before embed. */
    struct ksites_module *m = NULL;
    char msg[64];
    CHECK(ksites_module_load("x", "x", 1, NULL, &poker, &m, msg, sizeof msg) == KSITES_EINVAL);
    CHECK(strstr(msg, "env") && m == NULL);
    struct ksites_module_env env = { NULL, NULL, 0, NULL, &exec, 1, m_alloc, m_protect, m_free };
    CHECK(ksites_module_load("x", "x", 1, &env, &poker, &m, msg, sizeof msg) == KSITES_ECELL);
    CHECK(strstr(msg, "kernel table") && m == NULL && allocs == 0);
    env.nexec = 8;
    CHECK(ksites_module_load("x", "x", 1, &env, &poker, &m, NULL, 0) == KSITES_EINVAL);
    CHECK(ksites_module_unload(NULL, &poker) == KSITES_EINVAL);
    CHECK(ksites_module_hold(NULL) == KSITES_EINVAL && ksites_module_release(NULL) == KSITES_EINVAL);
    struct ksites_module_info info;
    CHECK(ksites_module_info(NULL, &info) == KSITES_EINVAL);
    CHECK(strstr(ksites_strerror(KSITES_EBUSY), "in use"));
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

/// What the embedded host programs share: includes, an `mprotect` poker over the
/// program's text (and, through `extra_write`, over anything else it pokes), a
/// `SIGTRAP` handler that calls `ksites_handle_int3` (as a C kernel's #BP handler
/// would), `CHECK`, and `setup()` (text range, handler).
macro_rules! host_prelude {
    () => {
        r#"#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include "ksites.h"

extern char __executable_start[], etext[];

/* The text poker: the executable range writable between begin and end. */
static uintptr_t lo, hi;
static int writes, protects;
static int (*extra_write)(uint64_t addr, const uint8_t *b, size_t n);
static int p_begin(void *ctx) {
    (void)ctx;
    protects++;
    return mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE | PROT_EXEC) ? KSITES_POKE_PROTECT : 0;
}
static int p_write(void *ctx, uint64_t addr, const uint8_t *b, size_t n) {
    (void)ctx;
    if (addr < lo || addr + n > hi) return extra_write ? extra_write(addr, b, n) : KSITES_POKE_NOT_TEXT;
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
        (uint64_t)g[REG_R9], (uint64_t)g[REG_EFL],
    };
    if (!ksites_handle_int3(&f)) _exit(70);
    traps++;
    g[REG_RIP] = (greg_t)f.rip;
    g[REG_RSP] = (greg_t)f.rsp;
    g[REG_RAX] = (greg_t)f.rax;
}

#define CHECK(e) do { if (!(e)) { printf("failed: %s\n", #e); return 1; } } while (0)

static struct ksites_poker poker = { NULL, p_begin, p_write, p_sync, p_end };
static struct ksites_range exec;

/* The text range, the SIGTRAP handler; 0 on success. */
static int setup(void) {
    long page = sysconf(_SC_PAGESIZE);
    lo = (uintptr_t)__executable_start & ~(uintptr_t)(page - 1);
    hi = ((uintptr_t)etext + page - 1) & ~(uintptr_t)(page - 1);
    exec.start = (uint64_t)(uintptr_t)__executable_start;
    exec.end = (uint64_t)(uintptr_t)etext;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    return sigaction(SIGTRAP, &sa, NULL);
}
"#
    };
}

/// A C program using the whole C API on itself once embedded: a call probe and a tail
/// probe (an `int3` while enabled) on top of [`host_prelude`].
const INIT_PROGRAM: &str = concat!(
    host_prelude!(),
    r#"
KSITES_PROBE_DECL(capi, call, 1, (unsigned long a))
KSITES_PROBE_DECL(capi, tail, 1, (unsigned long a))

volatile unsigned long work;
__attribute__((noinline)) unsigned long fire_call(unsigned long x) {
    KSITES_PROBE(capi, call, x);
    return x + 1;
}
__attribute__((noinline)) void fire_tail(unsigned long x) {
    work += x;
    KSITES_PROBE(capi, tail, x);
}

static uint64_t calls[2], last[2];
static uint32_t ids[2];
static void handler(uint32_t id, const uint64_t args[6]) {
    int i = id == ids[1];
    calls[i]++;
    last[i] = args[0];
}

int main(void) {
    CHECK(setup() == 0);
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
"#
);

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

/// A C module for [`MODULE_PROGRAM`]: calls the program's `host_add` (an export) and
/// `host_sub` (found by the lookup callback), has a probe `hmod:ping`, a probe handler
/// `hmod_on`, init and exit. With `-DFAIL_INIT` its init enables the program's probe
/// `hprog:add` with `hmod_on` (through the C API the loader exports and the program's
/// exported poker) and fails; with `-DMISSING` it calls a function nobody exports.
const HOST_MODULE: &str = r#"#include "ksites.h"

extern struct ksites_poker host_poker;
long host_add(long a, long b);
long host_sub(long a, long b);
long host_missing(long a);

KSITES_PROBE_DECL(hmod, ping, 1, (unsigned long x))

static long inits, exits, seen;
void hmod_on(uint32_t id, const uint64_t args[6]) { (void)id; seen += (long)args[0]; }
long hmod_seen(void) { return seen; }

int ksites_module_init(void) {
#ifdef FAIL_INIT
    uint32_t id;
    if (ksites_probe_lookup("hprog:add", &id)) return 8;
    return ksites_probe_enable(id, hmod_on, &host_poker) ? 9 : 7;
#endif
    inits++;
    return 0;
}
void ksites_module_exit(void) { exits++; }

long hmod_calc(long x) {
    KSITES_PROBE(hmod, ping, x);
#ifdef MISSING
    x = host_missing(x);
#endif
    return host_sub(host_add(x, 100 * inits), exits);
}
"#;

/// An embedded C program that loads the modules named on its command line (good,
/// missing symbol, failing init) through the C module API into a page arena in its
/// `.bss` (`mprotect` for permissions), and checks load, symbol, calls, the module's
/// probe, info, hold/unload refused, unload, and each error code.
const MODULE_PROGRAM: &str = concat!(
    host_prelude!(),
    r#"
/* A probe of the program's own (an image with no sites gets no table). */
KSITES_PROBE_DECL(hprog, add, 2, (long a, long b))
long host_add(long a, long b) { KSITES_PROBE(hprog, add, a, b); return a + b; }
long host_sub(long a, long b) { return a - b; }

#define PAGES 64
static unsigned char arena[PAGES * 4096] __attribute__((aligned(4096)));
static unsigned char used[PAGES];
static int fail_alloc, fail_protect, frees;

static int pages_used(void) { int n = 0; for (int i = 0; i < PAGES; i++) n += used[i]; return n; }
static int m_alloc(void *ctx, size_t size, struct ksites_region *out) {
    (void)ctx;
    size_t n = (size + 4095) / 4096;
    if (fail_alloc) return 1;
    for (size_t s = 0; s + n <= PAGES; s++) {
        size_t k = 0;
        while (k < n && !used[s + k]) k++;
        if (k == n) {
            memset(used + s, 1, n);
            out->ptr = arena + s * 4096;
            out->addr = (uint64_t)(uintptr_t)out->ptr;
            out->size = n * 4096;
            return 0;
        }
    }
    return 1;
}
static int m_protect(void *ctx, const struct ksites_region *r, size_t off, size_t len, int prot) {
    (void)ctx;
    if (off + len > r->size) return KSITES_PROTECT_RANGE;
    if (fail_protect && prot == KSITES_PROT_RX) return 2; /* RW again works: freed */
    int p = prot == KSITES_PROT_RX ? PROT_READ | PROT_EXEC
          : prot == KSITES_PROT_R ? PROT_READ : PROT_READ | PROT_WRITE;
    return mprotect((char *)r->ptr + off, len, p) ? 2 : 0;
}
static void m_free(void *ctx, const struct ksites_region *r) {
    (void)ctx;
    memset(r->ptr, 0, r->size);
    memset(used + ((unsigned char *)r->ptr - arena) / 4096, 0, r->size / 4096);
    frees++;
}
/* Module text is RX once loaded: the poker opens its page around the write. */
static int arena_write(uint64_t addr, const uint8_t *b, size_t n) {
    uintptr_t a = (uintptr_t)addr, page = a & ~(uintptr_t)4095;
    if (a < (uintptr_t)arena || a + n > (uintptr_t)arena + sizeof arena) return KSITES_POKE_NOT_TEXT;
    size_t len = (a + n + 4095 - page) & ~(size_t)4095;
    if (mprotect((void *)page, len, PROT_READ | PROT_WRITE | PROT_EXEC)) return KSITES_POKE_PROTECT;
    memcpy((void *)a, b, n);
    mprotect((void *)page, len, PROT_READ | PROT_EXEC);
    writes++;
    return 0;
}
static int lookups;
static int lookup(void *ctx, const char *name, size_t len, uint64_t *addr) {
    (void)ctx;
    lookups++;
    if (len == 8 && !memcmp(name, "host_sub", 8)) { *addr = (uint64_t)(uintptr_t)host_sub; return 1; }
    return 0;
}

static void *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    static unsigned char bufs[3][1 << 16] __attribute__((aligned(16)));
    static int next;
    unsigned char *b = bufs[next++];
    *len = fread(b, 1, sizeof bufs[0], f);
    fclose(f);
    return b;
}

static uint64_t pings, last_ping;
static void on_ping(uint32_t id, const uint64_t args[6]) { (void)id; pings++; last_ping = args[0]; }

int main(int argc, char **argv) {
    CHECK(argc == 4 && setup() == 0);
    extra_write = arena_write;
    uint32_t n = 0;
    int r = ksites_init(&exec, 1, &poker, &n);
    if (r) { printf("init: %s\n", ksites_strerror(r)); return 1; }
    ksites_declare_int3_route();
    size_t len[3];
    void *img[3] = { slurp(argv[1], &len[0]), slurp(argv[2], &len[1]), slurp(argv[3], &len[2]) };
    CHECK(img[0] && img[1] && img[2]);
    struct ksites_export exports[] = {
        { "host_add", (uint64_t)(uintptr_t)host_add }, { NULL, 0 },
        { "host_poker", (uint64_t)(uintptr_t)&poker },
    };
    struct ksites_module_env env = { NULL, exports, 3, lookup, &exec, 1, m_alloc, m_protect, m_free };
    struct ksites_module *m = NULL, *bad = NULL;
    char msg[200];

    r = ksites_module_load("hmod", img[0], len[0], &env, &poker, &m, msg, sizeof msg);
    if (r) { printf("load: %d %s: %s\n", r, ksites_strerror(r), msg); return 1; }
    CHECK(lookups >= 1);
    struct ksites_module_info info;
    CHECK(ksites_module_info(m, &info) == 0);
    CHECK(info.probes == 1 && info.probe_sites == 1 && info.kernel_symbols >= 2 && info.users == 0);
    CHECK(info.text_start >= (uint64_t)(uintptr_t)arena && info.mem_end <= (uint64_t)(uintptr_t)arena + sizeof arena);
    uint64_t a = 0;
    CHECK(ksites_module_symbol(m, "nope", &a) == KSITES_ENOTFOUND);
    CHECK(ksites_module_symbol(m, NULL, &a) == KSITES_EINVAL);
    CHECK(ksites_module_symbol(m, "hmod_calc", &a) == 0 && a >= info.text_start && a < info.text_end);
    long (*calc)(long) = (long (*)(long))(uintptr_t)a;
    CHECK(calc(5) == 105);

    uint32_t id, missing;
    CHECK(ksites_probe_lookup("hmod:ping", &id) == 0 && id == info.first_probe);
    CHECK(ksites_probe_enable(id, on_ping, &poker) == 0);
    CHECK(calc(7) == 107 && pings == 1 && last_ping == 7 && ksites_probe_hits(id) == 1);
    CHECK(ksites_probe_disable(id, &poker) == 0);
    CHECK(calc(8) == 108 && pings == 1);

    CHECK(ksites_module_hold(m) == 0);
    CHECK(ksites_module_unload(m, &poker) == KSITES_EBUSY);
    CHECK(ksites_module_info(m, &info) == 0 && info.users == 1);
    CHECK(calc(0) == 100); /* exit did not run */
    CHECK(ksites_module_release(m) == 0);
    CHECK(ksites_probe_enable(id, on_ping, &poker) == 0); /* unload disables it */
    /* A program probe with the module's C handler: unload disables it too. */
    uint32_t add_id;
    CHECK(ksites_probe_lookup("hprog:add", &add_id) == 0);
    CHECK(ksites_module_symbol(m, "hmod_on", &a) == 0);
    CHECK(ksites_probe_enable(add_id, (ksites_handler)(uintptr_t)a, &poker) == 0);
    CHECK(host_add(20, 1) == 21 && KSITES_PROBE_ENABLED(hprog, add));
    CHECK(ksites_module_symbol(m, "hmod_seen", &a) == 0 && ((long (*)(void))(uintptr_t)a)() == 20);
    CHECK(ksites_module_unload(NULL, &poker) == KSITES_EINVAL);
    CHECK(ksites_module_unload(m, NULL) == KSITES_EINVAL);
    CHECK(ksites_module_unload(m, &poker) == 0);
    CHECK(ksites_probe_lookup("hmod:ping", &missing) == KSITES_ENOTFOUND);
    CHECK(!KSITES_PROBE_ENABLED(hprog, add) && host_add(1, 2) == 3);
    CHECK(ksites_module_symbol(m, "hmod_calc", &a) == KSITES_EINVAL);
    CHECK(ksites_module_hold((struct ksites_module *)arena) == KSITES_EINVAL);
    CHECK(pages_used() == 0 && frees == 1);

    /* Every error: the code, a message, nothing left behind. */
    r = ksites_module_load("bad", img[1], len[1], &env, &poker, &bad, msg, sizeof msg);
    CHECK(r == KSITES_ESYMBOL && strstr(msg, "host_missing") && bad == NULL);
    CHECK(strstr(ksites_strerror(r), "does not export"));
    r = ksites_module_load("failing", img[2], len[2], &env, &poker, &bad, msg, sizeof msg);
    CHECK(r == KSITES_EINIT && strstr(msg, "returned 7") && bad == NULL);
    /* Its init enabled hprog:add with its own handler: disabled before the free. */
    CHECK(!KSITES_PROBE_ENABLED(hprog, add) && host_add(2, 2) == 4);
    CHECK(ksites_probe_lookup("hmod:ping", &missing) == KSITES_ENOTFOUND);
    CHECK(ksites_module_load("junk", "junk", 4, &env, &poker, &bad, msg, sizeof msg) == KSITES_EMODULE);
    fail_alloc = 1;
    CHECK(ksites_module_load("hmod", img[0], len[0], &env, &poker, &bad, msg, sizeof msg) == KSITES_ENOMEM);
    fail_alloc = 0;
    fail_protect = 1;
    CHECK(ksites_module_load("hmod", img[0], len[0], &env, &poker, &bad, msg, 8) == KSITES_EPROTECT);
    CHECK(strlen(msg) == 7); /* truncated to the buffer */
    fail_protect = 0;
    struct ksites_module_env no_free = env;
    no_free.free = NULL;
    CHECK(ksites_module_load("hmod", img[0], len[0], &no_free, &poker, &bad, NULL, 0) == KSITES_EINVAL);
    struct ksites_range far = { 1, 2 };
    struct ksites_module_env wrong_exec = env;
    wrong_exec.exec = &far;
    CHECK(ksites_module_load("hmod", img[0], len[0], &wrong_exec, &poker, &bad, NULL, 0) < 0);
    CHECK(bad == NULL && pages_used() == 0);

    /* And it loads again, into the same slot; the old handle stays invalid. */
    struct ksites_module *old = m;
    CHECK(ksites_module_load("hmod", img[0], len[0], &env, &poker, &m, NULL, 0) == 0);
    CHECK(m != old && ksites_module_info(old, &info) == KSITES_EINVAL);
    CHECK(ksites_module_hold(old) == KSITES_EINVAL && ksites_module_unload(old, &poker) == KSITES_EINVAL);
    CHECK(ksites_module_info(m, &info) == 0 && info.users == 0);
    CHECK(ksites_module_symbol(m, "hmod_calc", &a) == 0 && ((long (*)(long))(uintptr_t)a)(1) == 101);
    CHECK(ksites_module_unload(m, &poker) == 0 && pages_used() == 0);
    printf("ok\n");
    return 0;
}
"#
);

/// `gcc -c` a module (`flags` added), then `ksites embed` it; the `.ko`'s path.
fn module(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let c = dir.join("hmod.c");
    std::fs::write(&c, HOST_MODULE).unwrap();
    let o = dir.join(format!("{name}.o"));
    let out = run(Command::new("gcc")
        .args([
            "-c", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-pic", "-fno-pie",
        ])
        .args(["-fno-common", "-fno-asynchronous-unwind-tables", "-I"])
        .arg(include_dir())
        .args(flags)
        .arg(&c)
        .arg("-o")
        .arg(&o));
    assert!(out.status.success(), "gcc {name}: {}", text(&out.stderr));
    let ko = dir.join(format!("{name}.ko"));
    let e = run(Command::new(KSITES).arg("embed").arg(&o).arg("-o").arg(&ko));
    assert!(e.status.success(), "embed {name}: {}", text(&e.stderr));
    ko
}

#[test]
fn c_api_module_load_call_probe_unload_and_errors() {
    let lib = host_staticlib();
    let dir = fresh_dir("c_api_module");
    let mods = [
        module(&dir, "hmod", &[]),
        module(&dir, "missing", &["-DMISSING"]),
        module(&dir, "failing", &["-DFAIL_INIT"]),
    ];
    let input = gcc(
        &dir,
        "loader",
        MODULE_PROGRAM,
        &["-no-pie", "-fno-pie", "-Wl,--emit-relocs"],
        &[&lib, Path::new("-lgcc_s"), Path::new("-lm")],
    );
    let output = dir.join("loader.k");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&output));
    assert!(o.status.success(), "embed: {}", text(&o.stderr));
    let o = run(Command::new(&output).args(&mods));
    assert_eq!(
        (o.status.code(), text(&o.stdout).as_str()),
        (Some(0), "ok\n"),
        "{}",
        text(&o.stderr)
    );
}

/// The number of top-level comma-separated items in `params` (0 for empty or `void`).
fn count_params(params: &str) -> usize {
    let (mut depth, mut n, mut any) = (0i32, 0, false);
    for ch in params.chars() {
        match ch {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                n += 1;
                any = false;
                continue;
            }
            _ => {}
        }
        any |= !ch.is_whitespace();
    }
    let p = params.trim();
    if p.is_empty() || p == "void" {
        0
    } else {
        n + usize::from(any)
    }
}

/// The text after `open` (just past a `(`) up to its matching `)`.
fn until_close(open: &str) -> &str {
    let mut depth = 1;
    for (i, ch) in open.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &open[..i];
                }
            }
            _ => {}
        }
    }
    open
}

/// `name → parameter count` of every `#[unsafe(no_mangle)]` function in `capi/src`.
fn library_functions() -> std::collections::BTreeMap<String, usize> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/src");
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("#[unsafe(no_mangle)]") {
            let rest = &text[i..];
            let f = rest.find("fn ").expect("a function after no_mangle");
            let rest = &rest[f + 3..];
            let open = rest.find('(').unwrap();
            let name = rest[..open].trim().to_owned();
            out.insert(name, count_params(until_close(&rest[open + 1..])));
        }
    }
    out
}

/// `name → parameter count` of every `ksites_*` function `ksites.h` declares.
fn header_prototypes() -> std::collections::BTreeMap<String, usize> {
    let raw = std::fs::read_to_string(include_dir().join("ksites.h")).unwrap();
    // Without comments and preprocessor lines (with their continuations).
    let mut text = String::new();
    let mut rest = raw.as_str();
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .split_once("*/")
            .map_or("", |(_, after)| after);
    }
    text.push_str(rest);
    let mut code = String::new();
    let mut continued = false;
    for line in text.lines() {
        let directive = continued || line.trim_start().starts_with('#');
        continued = directive && line.trim_end().ends_with('\\');
        if !directive {
            code.push_str(line);
            code.push('\n');
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for statement in code.split([';', '{', '}']) {
        let s = statement.trim();
        let Some(open) = s.find('(') else { continue };
        let head = s[..open].trim_end();
        let name = head.rsplit([' ', '*']).next().unwrap_or("");
        if name.starts_with("ksites_") && !s.starts_with("typedef") && head.len() > name.len() {
            out.insert(name.to_owned(), count_params(until_close(&s[open + 1..])));
        }
    }
    out
}

/// The header is kept by hand (no cbindgen), so this checks it: every function the
/// library exports has a prototype in `ksites.h` with as many parameters, and the
/// header declares nothing the library lacks.
#[test]
fn c_api_header_declares_every_library_function() {
    let lib = library_functions();
    let header = header_prototypes();
    assert!(
        lib.contains_key("ksites_module_load") && lib.len() >= 15,
        "{lib:?}"
    );
    assert_eq!(header.get("ksites_module_load"), Some(&8), "{header:?}");
    assert_eq!(header.get("ksites_int3_entry_address"), Some(&0));
    assert_eq!(lib, header, "capi/src (left) vs ksites.h (right)");

    // And every `KSITES_*` integer constant of the library has its `#define`.
    let h = std::fs::read_to_string(include_dir().join("ksites.h")).unwrap();
    let define = |name: &str| {
        h.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("#define ")?.strip_prefix(name)?;
            let value = rest.split_whitespace().next()?;
            value.trim_matches(['(', ')']).parse::<i64>().ok()
        })
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/src");
    let mut constants = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const KSITES_") else {
                continue;
            };
            let (name, value) = rest.split_once(": c_int = ").unwrap();
            let name = format!("KSITES_{name}");
            let value: i64 = value.trim_end_matches(';').parse().unwrap();
            assert_eq!(define(&name), Some(value), "{name} in ksites.h");
            constants += 1;
        }
    }
    assert!(constants >= 29, "{constants} constants");
}

/// The README's command builds the no_std static library a C kernel links (a panic
/// handler and a refusing allocator included: `object` links `alloc`), and it defines
/// the whole API.
#[test]
fn c_api_no_std_staticlib_builds_with_the_readme_command() {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_api_no_std");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = run(Command::new(cargo)
        .args(["rustc", "-q", "--target", "x86_64-unknown-none"])
        .args(["--crate-type", "staticlib", "--features", "panic-handler"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS"));
    assert!(o.status.success(), "cargo rustc: {}", text(&o.stderr));
    let lib = target.join("x86_64-unknown-none/debug/libkernel_loader_capi.a");
    let nm = run(Command::new("nm").arg("--defined-only").arg(&lib));
    let symbols = text(&nm.stdout);
    for name in library_functions().keys() {
        assert!(
            symbols.lines().any(|l| l.ends_with(&format!(" T {name}"))),
            "{name} not defined in {}",
            lib.display()
        );
    }
}
