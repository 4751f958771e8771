//! `cargo xtask test`: tidy, fmt, clippy, host tests, then the QEMU runs of the three
//! architectures. Stops at the first failure.

use std::path::Path;

use anyhow::{Context, Result};
use xshell::{Shell, cmd};

use crate::qemu::{self, Paths, QemuArgs};
use crate::{example, host, install};
use crate::{qemu_aarch64, qemu_riscv64};

pub(crate) fn run(sh: &Shell, root: &Path) -> Result<()> {
    let paths = Paths::new(root);
    let kernel_dir = &paths.qemu_tests;

    heading("tidy");
    crate::tidy::run(root)?;

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
    {
        let _dir = in_dir(sh, &root.join(example::DIR));
        cmd!(sh, "cargo fmt --check").run().context(
            "fmt: the example is not formatted (run `cargo fmt` in examples/minimal-kernel/)",
        )?;
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
    qemu_aarch64::install_tools(sh, kernel_dir)?;
    {
        let _dir = in_dir(sh, kernel_dir);
        let target = qemu_aarch64::TARGET;
        cmd!(
            sh,
            "cargo clippy --release -p qemu-tests --target {target} -- -D warnings"
        )
        .run()
        .context("clippy: warnings in the aarch64 test kernel (qemu-tests)")?;
    }
    qemu_riscv64::install_tools(sh, kernel_dir)?;
    {
        let _dir = in_dir(sh, kernel_dir);
        let target = qemu_riscv64::TARGET;
        cmd!(
            sh,
            "cargo clippy --release -p qemu-tests --target {target} -- -D warnings"
        )
        .run()
        .context("clippy: warnings in the riscv64 test kernel (qemu-tests)")?;
    }
    {
        let _dir = in_dir(sh, &root.join(example::DIR));
        cmd!(sh, "cargo clippy --release -- -D warnings")
            .run()
            .context("clippy: warnings in examples/minimal-kernel")?;
    }

    heading("test");
    println!("$ cargo test --workspace");
    let host = host_tests(root).context("test: host tests failed (`cargo test --workspace`)")?;

    heading("host");
    let host_checks = host::selftest(sh, root).context(
        "host: the self-patching host binary failed (kernel-loader/examples/host_selftest.rs)",
    )?;

    heading("aarch64 corpus");
    let corpus = crate::corpus_modules::run(sh, root, &crate::corpus_aarch64::AARCH64)
        .context("aarch64 corpus: check-module or embed failed on a real C object")?;

    heading("riscv64 corpus");
    let corpus_riscv64 = crate::corpus_modules::run(sh, root, &crate::corpus_riscv64::RISCV64)
        .context("riscv64 corpus: check-module or embed failed on a real C object")?;

    heading("qemu");
    let kernel =
        qemu::run(sh, root, &QemuArgs::default()).context("qemu: the test kernel runs failed")?;

    heading("example");
    let example = example::run(sh, root).context("example: examples/minimal-kernel failed")?;

    println!(
        "\nxtask test: all steps passed ({host} host tests, {host_checks} host self-test checks, \
         {corpus} aarch64 corpus objects, {corpus_riscv64} riscv64 corpus objects, {kernel} in-kernel tests over all CPU models and architectures, {example} example kernel checks)"
    );
    println!(
        "xtask: {} passed, 0 failed",
        host + host_checks + corpus + corpus_riscv64 + kernel + example
    );
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

/// Runs `cargo test --workspace`, echoing its output, and returns the number of tests
/// that passed (summed over every `test result:` line).
fn host_tests(root: &Path) -> Result<u32> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new("cargo")
        .args(["test", "--workspace", "--color", "never"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo")?;
    let mut passed = 0;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        passed += count_passed(&line);
    }
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "cargo test exited with {status}");
    Ok(passed)
}

/// `test result: ok. 5 passed; 0 failed; ...` → 5; other lines → 0.
fn count_passed(line: &str) -> u32 {
    line.strip_prefix("test result: ")
        .and_then(|r| r.split(". ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_passed;

    #[test]
    fn counts_cargo_test_summaries() {
        assert_eq!(
            count_passed(
                "test result: ok. 17 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
            ),
            17
        );
        assert_eq!(
            count_passed("test result: ok. 0 passed; 0 failed; 2 ignored"),
            0
        );
        assert_eq!(count_passed("running 5 tests"), 0);
    }
}
