//! Passes the kernel's linker script to the linker with an absolute path, compiles
//! the C code (dtrace-style probes in c/cprobes.c, a GNU ifunc in c/cifunc.c, the C
//! API's use in c/capi.c, the C boot path in c/cboot.c) with gcc,
//! and includes the test modules (see [`include_modules`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The modules `cargo xtask qemu` builds and embeds (`NAME.ko`), in the directory named
/// by `KSITES_MODULE_DIR` (default: `target/ksites-modules` at the project root).
const MODULES: &[&str] = &["rmod", "cmod", "badmod"];
/// The aarch64 set: `farmod` too (loaded out of `bl` reach of the kernel).
const AARCH64_MODULES: &[&str] = &["rmod", "cmod", "badmod", "farmod"];

/// The riscv64 set (the modules built for riscv64).
const RISCV64_MODULES: &[&str] = &["rmod", "cmod", "badmod"];

/// Writes `$OUT_DIR/modules.rs`: one `pub static NAME: &Aligned<[u8]>` per module,
/// `include_bytes!` of `NAME.ko`, or an empty slice (and a warning) if it was not built,
/// so the kernel still builds (e.g. under `cargo clippy`) and its module tests fail
/// with a clear message instead.
fn include_modules(manifest_dir: &str) {
    write_modules(
        manifest_dir,
        "KSITES_MODULE_DIR",
        "target/ksites-modules",
        MODULES,
    );
}

/// The aarch64 kernel's [`include_modules`]: the same modules built for aarch64, from
/// `KSITES_AARCH64_MODULE_DIR` (default: `target/ksites-modules/aarch64`).
fn include_aarch64_modules(manifest_dir: &str) {
    write_modules(
        manifest_dir,
        "KSITES_AARCH64_MODULE_DIR",
        "target/ksites-modules/aarch64",
        AARCH64_MODULES,
    );
}

/// The riscv64 kernel's [`include_modules`]: the modules built for riscv64, from
/// `KSITES_RISCV64_MODULE_DIR` (default: `target/ksites-modules/riscv64`).
fn include_riscv64_modules(manifest_dir: &str) {
    write_modules(
        manifest_dir,
        "KSITES_RISCV64_MODULE_DIR",
        "target/ksites-modules/riscv64",
        RISCV64_MODULES,
    );
}

/// `$OUT_DIR/modules.rs` with `modules` from the directory `env` names (default:
/// `default` under the project root).
fn write_modules(manifest_dir: &str, env: &str, default: &str, modules: &[&str]) {
    println!("cargo:rerun-if-env-changed={env}");
    let dir = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(manifest_dir).join("../..").join(default));
    let mut code = String::new();
    for name in modules {
        let path = dir.join(format!("{name}.ko"));
        println!("cargo:rerun-if-changed={}", path.display());
        let upper = name.to_uppercase();
        if path.is_file() {
            let path = path.canonicalize().expect("canonicalize a module path");
            writeln!(
                code,
                "/// `{name}.ko`, embedded by the xtask.\n\
                 pub static {upper}: &Aligned<[u8]> = &Aligned(*include_bytes!({:?}));",
                path.display().to_string()
            )
            .unwrap();
        } else {
            println!(
                "cargo:warning=test module {} not built (run `cargo xtask qemu`); the module tests will fail",
                path.display()
            );
            writeln!(
                code,
                "/// `{name}.ko` was not built.\npub static {upper}: &Aligned<[u8]> = &Aligned([]);"
            )
            .unwrap();
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("modules.rs"), code).expect("write modules.rs");
}

/// The aarch64 kernel's C probe sites: c/cprobes.c (the x86_64 kernel's file, whose
/// call, tail, is-enabled and is-enabled tail sites `ksites embed` rewrites for either
/// architecture), built with the cross gcc and kernel flags (no FP/SIMD registers).
fn compile_aarch64_c_probes() {
    println!("cargo:rerun-if-changed=c/cprobes.c");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_sdt.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_arch.h");
    cc::Build::new()
        .compiler("aarch64-linux-gnu-gcc")
        .archiver("aarch64-linux-gnu-ar")
        .file("c/cprobes.c")
        .include("../../kernel-loader/c")
        .pic(false)
        .opt_level(2)
        .flag("-ffreestanding")
        .flag("-fno-pic")
        .flag("-mgeneral-regs-only")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .warnings(true)
        .extra_warnings(true)
        .compile("a64cprobes");
}

/// The riscv64 kernel's C probe sites: c/cprobes.c, built with the cross gcc for the
/// kernel's ABI (RV64GC, lp64d) and code model (`medany`: the kernel lies at
/// 0x8020_0000, above `medlow`'s reach), without linker relaxation.
fn compile_riscv64_c_probes() {
    println!("cargo:rerun-if-changed=c/cprobes.c");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_sdt.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_arch.h");
    cc::Build::new()
        .compiler("riscv64-linux-gnu-gcc")
        .archiver("riscv64-linux-gnu-ar")
        // rustc's flags translated for gcc include one riscv64 gcc lacks
        // (`-mno-omit-leaf-frame-pointer`); the frame pointers are asked for here.
        .inherit_rustflags(false)
        .flag("-fno-omit-frame-pointer")
        .file("c/cprobes.c")
        .include("../../kernel-loader/c")
        .pic(false)
        .opt_level(2)
        .flag("-ffreestanding")
        .flag("-fno-pic")
        .flag("-march=rv64gc")
        .flag("-mabi=lp64d")
        .flag("-mcmodel=medany")
        // No R_RISCV_RELAX: the linker keeps each probe call an `auipc`+`jalr` pair,
        // the form `ksites embed` rewrites (a relaxed `jal` would be refused).
        .flag("-mno-relax")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .warnings(true)
        .extra_warnings(true)
        .compile("rv64cprobes");
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    // The aarch64 platform (src/arch/aarch64/) has its own linker script, its own set
    // of test modules and, of the C code, only the probe file (built with the cross gcc).
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
        include_aarch64_modules(&dir);
        println!("cargo:rustc-link-arg-bins=-T{dir}/src/arch/aarch64/linker.ld");
        println!("cargo:rerun-if-changed=src/arch/aarch64/linker.ld");
        println!("cargo:rerun-if-changed=build.rs");
        compile_aarch64_c_probes();
        return;
    }
    // The riscv64 platform (src/arch/riscv64/): its own linker script and modules and,
    // of the C code, only the probe file (the cross gcc), as on aarch64.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("riscv64") {
        include_riscv64_modules(&dir);
        println!("cargo:rustc-link-arg-bins=-T{dir}/src/arch/riscv64/linker.ld");
        println!("cargo:rerun-if-changed=src/arch/riscv64/linker.ld");
        println!("cargo:rerun-if-changed=build.rs");
        compile_riscv64_c_probes();
        return;
    }
    include_modules(&dir);
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=c/cprobes.c");
    println!("cargo:rerun-if-changed=c/cifunc.c");
    println!("cargo:rerun-if-changed=c/capi.c");
    println!("cargo:rerun-if-changed=c/cboot.c");
    println!("cargo:rerun-if-changed=c/cpoker.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_module.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_sdt.h");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_arch.h");

    // The C code is built like the Rust code: position independent for the PIE kernel
    // (the default; rust-lld), for the kernel code model when the xtask builds the static
    // ET_EXEC (GNU ld, `-C relocation-model=static`).
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let static_kernel = std::env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|flags| {
        flags
            .split('\x1f')
            .any(|f| f.ends_with("relocation-model=static"))
    });
    let code_model: &[&str] = if static_kernel {
        &["-fno-pie", "-mcmodel=kernel"]
    } else {
        &["-fpie"]
    };
    let mut build = cc::Build::new();
    for flag in code_model {
        build.flag(flag);
    }
    build
        .compiler("gcc")
        .file("c/cprobes.c")
        .file("c/cifunc.c")
        .file("c/capi.c")
        .file("c/cboot.c")
        .include("../../kernel-loader/c")
        .pic(false)
        .opt_level(2)
        .flag("-ffreestanding")
        .flag("-mno-red-zone")
        .flag("-mno-sse")
        .flag("-mno-mmx")
        .flag("-mno-80387")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .warnings(true)
        .extra_warnings(true)
        .compile("cprobes");
}
