//! `cargo xtask …`: the project's build-and-check driver.
//!
//! * `cargo xtask qemu` builds the build tool and the test kernel, embeds the kernel's
//!   `.ksites` table, cross-checks `ksites inspect` against `objdump`, then boots the kernel
//!   in QEMU on several CPU models and judges what it prints; the same for the aarch64
//!   test kernel on QEMU `virt` ([`qemu_aarch64`]) and the riscv64 one on QEMU `virt` with
//!   OpenSBI ([`qemu_riscv64`]); `--arch` picks architectures.
//! * `cargo xtask example` builds `examples/minimal-kernel` (the README's walkthrough) and
//!   boots it on `qemu64` and `max`; see [`example`].
//! * `cargo xtask fuzz [--seconds N]` runs the cargo-fuzz targets (nightly).
//! * `cargo xtask tidy` checks the tree (the architecture seam, module docs and sizes,
//!   the README's lists); see [`tidy`].
//! * `cargo xtask corpus-aarch64` / `corpus-riscv64` compile the C corpus for arm64 /
//!   riscv64 and check every object with `ksites check-module` and `embed`; see
//!   [`corpus_modules`].
//! * `cargo xtask test` runs tidy, fmt, clippy and the host tests, the host self-test (a native
//!   binary that patches itself), the aarch64 and riscv64 corpora, then everything `qemu` and `example` do.
//! * `cargo xtask bench` builds the benchmark binary, embeds it, runs it, and prints the
//!   ratio table (not part of `test`).
//!
//! Paths are computed from this crate's location, never from the caller's working directory.

mod bench;
mod corpus;
mod corpus_aarch64;
mod corpus_modules;
mod corpus_riscv64;
mod crosscheck;
mod example;
mod fuzz;
mod host;
mod install;
mod judge;
mod modules;
mod qemu;
mod qemu_aarch64;
mod qemu_riscv64;
mod test;
mod tidy;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// Development tasks for ksites: build the test kernel and boot it in QEMU (`qemu`), run
/// every check the project has (`test`), or run the benchmarks (`bench`).
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the test kernel, embed its `.ksites` table, cross-check it against objdump,
    /// and boot it in QEMU on each CPU model, for x86_64, aarch64 and riscv64 (installs
    /// missing tools first).
    Qemu(qemu::QemuArgs),
    /// Build examples/minimal-kernel (a PIE, linked through the freshly built ksites-ld)
    /// and boot it on qemu64 and max; their ifunc choices must differ.
    Example,
    /// Check the tree: x86 facts only under `arch/` and the build tool's targets, every
    /// module documented and under 1,000 lines, the README's lists matching the tree.
    Tidy,
    /// Compile the C corpus (Lua, zstd, xz, zlib, …) for arm64 with kernel-like flags and
    /// run `ksites check-module` and `ksites embed` on every object (part of `test`).
    CorpusAarch64,
    /// Compile the C corpus for riscv64 with kernel-like flags (`-mcmodel=medany
    /// -fno-pic`, relaxation on and off) and run `ksites check-module` and `ksites embed`
    /// on every object (part of `test`).
    CorpusRiscv64,
    /// Run tidy, fmt, clippy and host tests for the workspace and the test kernel, the host
    /// self-test, then everything `qemu` does with the default CPU models, then `example`.
    /// Stops at the first failure.
    Test,
    /// Run the cargo-fuzz targets (table reader + patcher, build tool ELF reading) on
    /// the nightly toolchain, `--seconds` each (installs cargo-fuzz if missing).
    Fuzz(fuzz::FuzzArgs),
    /// Build, embed and run the benchmarks (ksites against the alternatives, side by
    /// side) and print the table of ratios; writes target/ksites-bench/ratios.md.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sh = xshell::Shell::new()?;
    let root = project_root();
    sh.change_dir(&root);
    match cli.command {
        Command::Qemu(args) => {
            let passed = qemu::run(&sh, &root, &args)?;
            println!("xtask: {passed} passed, 0 failed");
            Ok(())
        }
        Command::Example => {
            let passed = example::run(&sh, &root)?;
            println!("xtask: {passed} passed, 0 failed");
            Ok(())
        }
        Command::Tidy => tidy::run(&root),
        Command::CorpusAarch64 => {
            let passed = corpus_modules::run(&sh, &root, &corpus_aarch64::AARCH64)?;
            println!("xtask: {passed} passed, 0 failed");
            Ok(())
        }
        Command::CorpusRiscv64 => {
            let passed = corpus_modules::run(&sh, &root, &corpus_riscv64::RISCV64)?;
            println!("xtask: {passed} passed, 0 failed");
            Ok(())
        }
        Command::Test => test::run(&sh, &root),
        Command::Fuzz(args) => fuzz::run(&sh, &root, &args),
        Command::Bench(args) => bench::run(&sh, &root, &args),
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent directory")
        .to_path_buf()
}
