//! `cargo xtask test`: fmt, clippy, host tests, then the QEMU runs. Stops at the first failure.

use std::path::Path;

use anyhow::{Context, Result};
use xshell::{Shell, cmd};

use crate::install;
use crate::qemu::{self, Paths, QemuArgs};

pub(crate) fn run(sh: &Shell, root: &Path) -> Result<()> {
    let paths = Paths::new(root);
    let kernel_dir = &paths.qemu_tests;

    heading("fmt");
    install::rust_component(sh, "rustfmt")?;
    cmd!(sh, "cargo fmt --all --check")
        .run()
        .context("fmt: the workspace is not formatted (run `cargo fmt --all`)")?;
    {
        let _dir = in_dir(sh, kernel_dir);
        cmd!(sh, "cargo fmt --all --check")
            .run()
            .context("fmt: qemu-tests is not formatted (run `cargo fmt --all` in qemu-tests/)")?;
    }

    heading("clippy");
    install::rust_component(sh, "clippy")?;
    qemu::install_kernel_target(sh, &paths)?;
    cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings")
        .run()
        .context("clippy: warnings in the workspace")?;
    {
        let _dir = in_dir(sh, kernel_dir);
        cmd!(sh, "cargo clippy --release -- -D warnings")
            .run()
            .context("clippy: warnings in qemu-tests")?;
    }

    heading("test");
    cmd!(sh, "cargo test --workspace")
        .run()
        .context("test: host tests failed (`cargo test --workspace`)")?;

    heading("qemu");
    qemu::run(sh, root, &QemuArgs::default()).context("qemu: the test kernel runs failed")?;

    println!("\nxtask test: all steps passed");
    Ok(())
}

/// `push_dir`, saying so (xshell echoes commands without their directory).
fn in_dir<'a>(sh: &'a Shell, dir: &Path) -> xshell::PushDir<'a> {
    println!("xtask: in {}", dir.display());
    sh.push_dir(dir)
}

fn heading(step: &str) {
    println!("\n==> {step}");
}
