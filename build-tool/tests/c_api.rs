//! C kernels: `KSITES_TABLE_CELL()` from `kernel-loader/c/ksites.h` defines a cell that
//! `ksites embed` fills (a static C program with a GNU ifunc embeds, verifies and still
//! runs), and the C API's declarations in `ksites.h` link against the
//! `kernel-loader-capi` static library and behave as documented on the host.

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

#define CHECK(e) do { if (!(e)) { printf("failed: %s\n", #e); return 1; } } while (0)

int main(void) {
    struct ksites_poker poker = { NULL, NULL, w, NULL, NULL };
    struct ksites_poker no_write = { NULL, NULL, NULL, NULL, NULL };
    struct ksites_range exec = { 0x1000, 0x2000 };
    uint32_t id = 7, n = 9;

    CHECK(strstr(ksites_strerror(KSITES_ENOTFOUND), "no such probe"));
    CHECK(strstr(ksites_strerror(KSITES_ENOTRAP), "ksites_declare_int3_route"));
    CHECK(strstr(ksites_strerror(-1000), "unknown"));
    CHECK(ksites_probe_lookup("no:such", &id) == KSITES_ENOTFOUND && id == 7);
    CHECK(ksites_probe_lookup(NULL, &id) == KSITES_EINVAL);
    CHECK(ksites_probe_lookup("\xff:x", &id) == KSITES_EINVAL);
    CHECK(ksites_probe_hits(0) == 0);
    CHECK(ksites_probe_enable(0, h, NULL) == KSITES_EINVAL);
    CHECK(ksites_probe_enable(0, h, &no_write) == KSITES_EINVAL);
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
