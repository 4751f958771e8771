//! The test modules the kernel loads at run time (issue 5): built here, before the
//! kernel, and embedded into it (`include_bytes!`, see `qemu-tests/kernel/build.rs`).
//!
//! * `rmod`: the Rust `#![no_std]` crate `qemu-tests/modules/rmod`, compiled alone into
//!   one relocatable object (`cargo rustc --release -p rmod --lib -- --emit=obj=…`; the
//!   workspace's release profile gives it one codegen unit and no overflow or debug
//!   checks; `-C relocation-model=static`, since the kernel's default is PIE);
//! * `cmod`, `badmod`: C, `qemu-tests/modules/*.c`, compiled by gcc.
//!
//! Each object then goes through `ksites embed X.o -o target/ksites-modules/X.ko`.
//! The kernel build finds that directory through [`MODULE_DIR_ENV`].
//!
//! The aarch64 kernel gets the same three modules built for aarch64 ([`build_aarch64`]:
//! rustc `--target aarch64-unknown-none`, `aarch64-linux-gnu-gcc`) in
//! `target/ksites-modules/aarch64/`, named by [`AARCH64_MODULE_DIR_ENV`]; the riscv64
//! kernel the same for riscv64 ([`build_riscv64`]: `riscv64gc-unknown-none-elf`,
//! `riscv64-linux-gnu-gcc`) in `target/ksites-modules/riscv64/`
//! ([`RISCV64_MODULE_DIR_ENV`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

/// The environment variable that tells `qemu-tests/kernel/build.rs` where the embedded
/// modules (`*.ko`) are.
pub(crate) const MODULE_DIR_ENV: &str = "KSITES_MODULE_DIR";
/// The same for the aarch64 kernel's modules.
pub(crate) const AARCH64_MODULE_DIR_ENV: &str = "KSITES_AARCH64_MODULE_DIR";
/// The same for the riscv64 kernel's modules.
pub(crate) const RISCV64_MODULE_DIR_ENV: &str = "KSITES_RISCV64_MODULE_DIR";

/// The C modules, by file stem, in `qemu-tests/modules/`.
const C_MODULES: &[&str] = &["cmod", "badmod"];
/// The aarch64 set's: `farmod` as well, which the aarch64 kernel loads out of `bl`
/// reach of its text (its calls into the kernel go through the loader's veneers).
const AARCH64_C_MODULES: &[&str] = &["cmod", "badmod", "farmod"];

/// The flags every C module is compiled with: freestanding, not PIC (on x86_64 and
/// aarch64 the kernel and the module arena lie below 2 GiB, so the small code model's
/// absolute 32-bit relocations reach them), no stack protector or unwind tables; the
/// architecture's own flags ([`Toolchain::arch_flags`]: no FP/SIMD state where the
/// compiler can promise it, the code model) follow.
const C_FLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-common",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wextra",
    "-Werror",
];

/// How one architecture's modules are built.
struct Toolchain {
    /// `--target` for `cargo rustc` (none: the workspace's default, x86_64).
    rust_target: Option<&'static str>,
    c_modules: &'static [&'static str],
    cc: &'static str,
    /// Added to [`C_FLAGS`] (x86_64: no red zone, interrupts write below `rsp`).
    arch_flags: &'static [&'static str],
    nm: &'static str,
}

const X86_64: Toolchain = Toolchain {
    rust_target: None,
    c_modules: C_MODULES,
    cc: "gcc",
    arch_flags: &["-mno-red-zone", "-mgeneral-regs-only"],
    nm: "nm",
};

const AARCH64: Toolchain = Toolchain {
    rust_target: Some("aarch64-unknown-none"),
    c_modules: AARCH64_C_MODULES,
    cc: "aarch64-linux-gnu-gcc",
    arch_flags: &["-mgeneral-regs-only"],
    nm: "aarch64-linux-gnu-nm",
};

/// riscv64: the kernel's ABI (RV64GC, lp64d; gcc has no general-registers-only mode,
/// and the modules use no floating point), `medany` (the kernel lies at 0x8020_0000,
/// above `medlow`'s reach), and no linker relaxation (`-mno-relax`: C probe calls stay
/// `auipc`+`jalr` pairs, the form `ksites embed` rewrites).
const RISCV64: Toolchain = Toolchain {
    rust_target: Some("riscv64gc-unknown-none-elf"),
    c_modules: C_MODULES,
    cc: "riscv64-linux-gnu-gcc",
    arch_flags: &[
        "-march=rv64gc",
        "-mabi=lp64d",
        "-mcmodel=medany",
        "-mno-relax",
    ],
    nm: "riscv64-linux-gnu-nm",
};

/// Where the module objects and the embedded modules go.
pub(crate) fn module_dir(root: &Path) -> PathBuf {
    root.join("target/ksites-modules")
}

/// Where the aarch64 modules go.
pub(crate) fn aarch64_module_dir(root: &Path) -> PathBuf {
    module_dir(root).join("aarch64")
}

/// Where the riscv64 modules go.
pub(crate) fn riscv64_module_dir(root: &Path) -> PathBuf {
    module_dir(root).join("riscv64")
}

/// Builds every module for riscv64 and embeds it; returns the directory holding them.
pub(crate) fn build_riscv64(sh: &Shell, root: &Path, ksites: &Path) -> Result<PathBuf> {
    build_set(sh, root, ksites, &RISCV64, riscv64_module_dir(root))
}

/// Builds every module and embeds it; returns the directory holding the `*.ko` files.
pub(crate) fn build(sh: &Shell, root: &Path, ksites: &Path) -> Result<PathBuf> {
    build_set(sh, root, ksites, &X86_64, module_dir(root))
}

/// Builds every module for aarch64 and embeds it; returns the directory holding them.
pub(crate) fn build_aarch64(sh: &Shell, root: &Path, ksites: &Path) -> Result<PathBuf> {
    build_set(sh, root, ksites, &AARCH64, aarch64_module_dir(root))
}

fn build_set(
    sh: &Shell,
    root: &Path,
    ksites: &Path,
    tc: &Toolchain,
    out: PathBuf,
) -> Result<PathBuf> {
    sh.create_dir(&out)?;
    let qemu_tests = root.join("qemu-tests");
    let mut objects = vec![build_rmod(sh, &qemu_tests, &out, tc)?];
    for name in tc.c_modules {
        objects.push(build_c(sh, &qemu_tests, root, &out, name, tc)?);
    }
    for object in &objects {
        check_undefined(sh, object, tc)?;
        embed(sh, ksites, object)?;
    }
    Ok(out)
}

/// `cargo rustc` the rmod crate into `out/rmod.o`.
fn build_rmod(sh: &Shell, qemu_tests: &Path, out: &Path, tc: &Toolchain) -> Result<PathBuf> {
    let object = out.join("rmod.o");
    let _dir = sh.push_dir(qemu_tests);
    let emit = format!("--emit=obj={}", object.display());
    let target = tc.rust_target.map(|t| ["--target", t]);
    let target: &[&str] = target.as_ref().map_or(&[], |t| &t[..]);
    let _ = std::fs::remove_file(&object);
    let build = || {
        cmd!(
            sh,
            "cargo rustc --release -p rmod --lib {target...} -- -C relocation-model=static {emit}"
        )
        .run()
        .context("building the Rust test module (qemu-tests/modules/rmod) failed")
    };
    build()?;
    if !object.is_file() {
        // Cargo found the crate fresh and did not run rustc: make it stale.
        let lib = qemu_tests.join("modules/rmod/src/lib.rs");
        std::fs::File::options()
            .append(true)
            .open(&lib)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .with_context(|| format!("touching {}", lib.display()))?;
        build()?;
    }
    if !object.is_file() {
        bail!("cargo rustc did not write {}", object.display());
    }
    Ok(object)
}

/// gcc `qemu-tests/modules/NAME.c` into `out/NAME.o`.
fn build_c(
    sh: &Shell,
    qemu_tests: &Path,
    root: &Path,
    out: &Path,
    name: &str,
    tc: &Toolchain,
) -> Result<PathBuf> {
    let source = qemu_tests.join(format!("modules/{name}.c"));
    let object = out.join(format!("{name}.o"));
    let include = root.join("kernel-loader/c");
    let (cc, arch) = (tc.cc, tc.arch_flags);
    cmd!(
        sh,
        "{cc} {C_FLAGS...} {arch...} -I {include} {source} -o {object}"
    )
    .run()
    .with_context(|| format!("compiling the C test module {} failed", source.display()))?;
    Ok(object)
}

/// A module may only reference the kernel by unmangled names (the kernel exports no
/// Rust-mangled symbol): refuse an object that leaks a mangled `core` reference, which
/// a panicking path would add.
fn check_undefined(sh: &Shell, object: &Path, tc: &Toolchain) -> Result<()> {
    let nm = tc.nm;
    let undefined = cmd!(sh, "{nm} -u {object}").read()?;
    let mangled = mangled_undefined(&undefined);
    if !mangled.is_empty() {
        bail!(
            "{} references mangled symbols the kernel does not export (a panicking path?): {}",
            object.display(),
            mangled.join(", ")
        );
    }
    Ok(())
}

/// `ksites embed X.o -o X.ko`.
fn embed(sh: &Shell, ksites: &Path, object: &Path) -> Result<()> {
    let ko = object.with_extension("ko");
    cmd!(sh, "{ksites} embed {object} -o {ko}")
        .run()
        .with_context(|| format!("ksites embed failed on {}", object.display()))?;
    Ok(())
}

/// The Rust-mangled (legacy `_ZN` or v0 `_R`) names in `nm -u` output.
fn mangled_undefined(nm_output: &str) -> Vec<&str> {
    nm_output
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("_ZN") || s.starts_with("_R"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mangled_undefined_symbols() {
        let nm = "                 U crc32c\n\
                  \x20                U _ZN4core9panicking5panic17h0123456789abcdefE\n\
                  \x20                U ksites_probe_fire\n\
                  \x20                U _RNvNtCs1234_4core9panicking9panic_fmt\n";
        assert_eq!(
            mangled_undefined(nm),
            [
                "_ZN4core9panicking5panic17h0123456789abcdefE",
                "_RNvNtCs1234_4core9panicking9panic_fmt"
            ]
        );
        assert!(mangled_undefined("                 U popcount\n").is_empty());
        assert!(mangled_undefined("").is_empty());
    }

    #[test]
    fn module_dir_is_under_target() {
        assert_eq!(
            module_dir(Path::new("/r")),
            Path::new("/r/target/ksites-modules")
        );
        assert_eq!(
            aarch64_module_dir(Path::new("/r")),
            Path::new("/r/target/ksites-modules/aarch64")
        );
        assert_eq!(
            riscv64_module_dir(Path::new("/r")),
            Path::new("/r/target/ksites-modules/riscv64")
        );
    }
}
