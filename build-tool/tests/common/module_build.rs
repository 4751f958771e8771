//! Building module objects: the gcc flags of a C kernel module; kernel-loader for
//! `x86_64-unknown-none` (or any other feature set, with `cargo build`), then a Rust
//! module crate against it with `rustc`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `gcc` flags for a C module object (kernel code model, no PIC, no CET), before `-I`.
pub const GCC_MODULE_FLAGS: [&str; 7] = [
    "-c",
    "-O2",
    "-fno-pic",
    "-mcmodel=kernel",
    "-fno-common",
    "-ffreestanding",
    "-fcf-protection=none",
];

fn check(o: std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `cargo build -q ARGS` of kernel-loader into `target_dir` (without the caller's
/// RUSTFLAGS).
pub fn cargo_build_kernel_loader(args: &[&str], target_dir: &Path) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-loader/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args(["build", "-q"])
        .args(args)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cargo");
    check(o, "cargo build kernel-loader");
}

/// kernel-loader built for `x86_64-unknown-none` under `target_dir` (so a module crate
/// gets the real macros): its debug output directory (the rlib, and `deps`).
pub fn kernel_loader_for_none(target_dir: &Path) -> PathBuf {
    cargo_build_kernel_loader(&["--target", "x86_64-unknown-none"], target_dir);
    target_dir.join("x86_64-unknown-none/debug")
}

/// Compiles `src` (written to `dir/<crate>.rs`) into the relocatable object `dir/out`,
/// a `--crate-name <crate>` library for `x86_64-unknown-none` against the kernel-loader
/// in `kl` (from [`kernel_loader_for_none`]).
pub fn rustc_module(dir: &Path, krate: &str, src: &str, out: &str, kl: &Path) -> PathBuf {
    let file = format!("{krate}.rs");
    std::fs::write(dir.join(&file), src).unwrap();
    let o = Command::new("rustc")
        .args([
            "--edition",
            "2024",
            "--crate-type=lib",
            "--crate-name",
            krate,
            "--emit=obj",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
            "-C",
            "opt-level=2",
            "--target",
            "x86_64-unknown-none",
            "--extern",
        ])
        .arg(format!(
            "kernel_loader={}",
            kl.join("libkernel_loader.rlib").display()
        ))
        .arg("-L")
        .arg(format!("dependency={}", kl.join("deps").display()))
        .args(["-o", out, &file])
        .current_dir(dir)
        .output()
        .expect("rustc");
    check(o, &format!("rustc {file}"));
    dir.join(out)
}
