//! The host toolchain as the C-program tests use it: gcc's flags for linking with lld.

use std::path::PathBuf;
use std::process::Command;

/// `-fuse-ld=lld` and, when no `ld.lld` is on `PATH`, `-B` for the Rust toolchain's own
/// (rust-lld behind its `gcc-ld/ld.lld` wrapper).
pub fn lld_flags() -> Vec<String> {
    let mut v = vec!["-fuse-ld=lld".to_string()];
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("ld.lld").is_file()));
    if !on_path {
        let o = Command::new("rustc")
            .args(["--print", "target-libdir"])
            .output()
            .expect("cannot run rustc");
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("../bin/gcc-ld");
        assert!(
            dir.join("ld.lld").is_file(),
            "no ld.lld in {}",
            dir.display()
        );
        v.push(format!("-B{}", dir.display()));
    }
    v
}
