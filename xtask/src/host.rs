//! Host binaries that patch themselves: built non-PIE with `--emit-relocs`, processed by
//! `ksites embed`, then run. `cargo xtask test` runs the self-test
//! (`kernel-loader/examples/host_selftest.rs`); `cargo xtask bench` runs the benchmarks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

/// How host binaries are linked so `ksites embed` can process them: a static
/// (non-PIE) ET_EXEC, dynamically linked against libc, keeping its relocations. Only
/// the final crate gets these flags (`cargo rustc`), so dependencies stay shared with
/// the normal build.
pub(crate) const LINK_ARGS: [&str; 4] = [
    "-C",
    "relocation-model=static",
    "-C",
    "link-arg=-Wl,--emit-relocs",
];

/// `cargo build --release -p build-tool`: the `ksites` binary.
pub(crate) fn build_tool(sh: &Shell, root: &Path) -> Result<PathBuf> {
    let _dir = sh.push_dir(root);
    cmd!(sh, "cargo build --release -p build-tool")
        .run()
        .context("building the build tool failed")?;
    Ok(root.join("target/release/ksites"))
}

/// Builds `target` (`cargo rustc` arguments selecting it, in release) with
/// [`LINK_ARGS`] and `rustc_args`, then embeds `built` into `out`.
pub(crate) fn build_and_embed(
    sh: &Shell,
    root: &Path,
    ksites: &Path,
    target: &[&str],
    rustc_args: &[&str],
    built: &Path,
    out: &Path,
) -> Result<()> {
    let _dir = sh.push_dir(root);
    cmd!(
        sh,
        "cargo rustc --release {target...} -- {LINK_ARGS...} {rustc_args...}"
    )
    .run()
    .with_context(|| format!("building {} failed", built.display()))?;
    if let Some(dir) = out.parent() {
        sh.create_dir(dir)?;
    }
    cmd!(sh, "{ksites} embed {built} -o {out}")
        .run()
        .with_context(|| format!("ksites embed {} failed", built.display()))?;
    Ok(())
}

/// Builds, embeds and runs the host self-test; returns the number of checks passed.
pub(crate) fn selftest(sh: &Shell, root: &Path) -> Result<u32> {
    let ksites = build_tool(sh, root)?;
    let built = root.join("target/release/examples/host_selftest");
    let out = root.join("target/ksites/host_selftest");
    build_and_embed(
        sh,
        root,
        &ksites,
        &[
            "-p",
            "kernel-loader",
            "--features",
            "std",
            "--example",
            "host_selftest",
        ],
        &[],
        &built,
        &out,
    )?;
    let output = std::process::Command::new(&out)
        .output()
        .with_context(|| format!("cannot run {}", out.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("the host self-test failed ({})", output.status);
    }
    let passed = stdout
        .lines()
        .find_map(|l| {
            let (p, f) = l.split_once(" passed, ")?;
            (f.trim() == "0 failed").then(|| p.trim().parse::<u32>().ok())?
        })
        .context("the host self-test printed no `N passed, 0 failed` line")?;
    Ok(passed)
}
