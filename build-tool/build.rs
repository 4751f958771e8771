//! Build script: links the unwinder into the `ksites` and `ksites-ld` binaries
//! statically on Linux/glibc, so that starting them does not load `libgcc_s.so.1`.
//!
//! The tool is started once per object by a kernel build (`ksites scan --calls-to
//! __fentry__`, like `recordmcount`), so process start-up is most of its cost there.
//! Loading `libgcc_s` (open, four mappings, its relocations, and its constructor, which
//! runs `cpuid`: a VM exit under virtualisation) was a measurable part of it. Rust's
//! standard library links `-lgcc_s` for unwinding unless the whole binary is built with
//! `-C target-feature=+crt-static`, which cannot be chosen per binary (nor per package) in
//! Cargo.toml. Pulling every member of `libgcc_eh.a` (the static unwinder GCC itself
//! links with `-static-libgcc`) in as objects defines the `_Unwind_*` symbols in the
//! binary, so `--as-needed` (which rustc passes) drops `libgcc_s` from its dependencies.
//! Unwinding (panics, backtraces) works as before: `libgcc_eh` finds the binary's unwind
//! tables through `dl_iterate_phdr` like `libgcc_s` does.
//!
//! Only the binaries are affected (`cargo:rustc-link-arg-bins`), and only where it is
//! known to work: a Linux glibc target whose linker driver knows `libgcc_eh.a`, not
//! already `crt-static` (that links `libgcc_eh` itself). Anywhere else nothing changes.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let static_crt = var("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|f| f == "crt-static");
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || static_crt {
        return;
    }
    // The linker driver rustc calls: the configured linker, or `cc` when building for
    // the host (a cross build without a configured linker is left alone: the host's
    // `cc` would name the host's library).
    let linker = match std::env::var_os("RUSTC_LINKER") {
        Some(l) => PathBuf::from(l),
        None if var("TARGET") == var("HOST") => PathBuf::from("cc"),
        None => return,
    };
    let Some(libgcc_eh) = Command::new(&linker)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        // A driver that does not know the file prints its name back, unqualified.
        .filter(|p| p.is_absolute() && p.is_file())
    else {
        return;
    };
    println!("cargo:rerun-if-changed={}", libgcc_eh.display());
    println!("cargo:rustc-link-arg-bins=-Wl,--whole-archive");
    println!("cargo:rustc-link-arg-bins={}", libgcc_eh.display());
    println!("cargo:rustc-link-arg-bins=-Wl,--no-whole-archive");
}
