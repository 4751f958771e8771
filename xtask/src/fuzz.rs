//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a while each.
//!
//! cargo fuzz needs the nightly toolchain (the product itself builds on stable); the
//! task installs `cargo-fuzz` from crates.io if it is missing, and says so. Each target
//! starts from its own corpus in `fuzz/corpus/<target>` plus seeds under version control:
//! the ELF cases of the malformed-input corpus (`build-tool/tests/corpus/elf`), valid
//! tables (`fuzz/seeds/table_reader`, made by build-tool/tests/corpus.rs), the test
//! modules (`fuzz/seeds/module_loader`) and, for `rel_layout`, section-header edit lists
//! (`fuzz/seeds/rel_layout_edits`) applied to un-embedded modules. Every target runs under
//! a 2 GB memory limit (RSS and single allocation): a hostile size or alignment that
//! makes a tool allocate more is a crash. A crash stops the run and leaves the input in
//! `fuzz/artifacts/<target>/`; turn it into a corpus case.

use std::path::Path;

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (repeatable; default: all of `table_reader`, `elf_tools`,
    /// `module_loader`, `rel_layout`).
    #[arg(long = "target", value_name = "TARGET")]
    targets: Vec<String>,
}

const TARGETS: [&str; 4] = ["table_reader", "elf_tools", "module_loader", "rel_layout"];

/// The memory limit of every run, in MB (libFuzzer's `-rss_limit_mb` and
/// `-malloc_limit_mb`).
const MEMORY_LIMIT_MB: u32 = 2048;

pub(crate) fn run(sh: &Shell, root: &Path, args: &FuzzArgs) -> Result<()> {
    let toolchains = cmd!(sh, "rustup toolchain list").read()?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!("cargo fuzz needs a nightly toolchain: `rustup toolchain install nightly`");
    }
    if cmd!(sh, "cargo +nightly fuzz --version")
        .quiet()
        .ignore_stderr()
        .read()
        .is_err()
    {
        println!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        cmd!(sh, "cargo install cargo-fuzz --locked")
            .run()
            .context("installing cargo-fuzz failed")?;
    }
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        args.targets.clone()
    };
    let corpus_cases = root.join("build-tool/tests/corpus/elf");
    let table_seeds = root.join("fuzz/seeds/table_reader");
    let _dir = sh.push_dir(root.join("fuzz"));
    let secs = args.seconds.to_string();
    let limit = MEMORY_LIMIT_MB.to_string();
    let mut summary = Vec::new();
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?} (targets: {})", TARGETS.join(", "));
        }
        let corpus = format!("corpus/{t}");
        sh.create_dir(&corpus)?;
        let module_seeds = root.join("fuzz/seeds/module_loader");
        let rel_edits = root.join("fuzz/seeds/rel_layout_edits");
        // elf_tools also starts from the test modules, so `embed` on ET_REL is fuzzed.
        let seeds: Vec<&std::path::Path> = if t == "elf_tools" {
            vec![&corpus_cases, &module_seeds]
        } else if t == "module_loader" {
            vec![&module_seeds]
        } else if t == "rel_layout" {
            vec![&rel_edits]
        } else {
            vec![&table_seeds]
        };
        println!("\n==> fuzz {t} for {secs} s (memory limit {limit} MB)");
        let out = cmd!(
            sh,
            "cargo +nightly fuzz run {t} -O -a {corpus} {seeds...} -- -max_total_time={secs} -rss_limit_mb={limit} -malloc_limit_mb={limit}"
        )
        .ignore_status()
        .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        let done = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .map(str::to_owned);
        if !out.status.success() {
            eprint!("{stderr}");
            bail!("fuzz target {t} failed (crash or build error); see fuzz/artifacts/{t}/");
        }
        summary.push((t.clone(), done.unwrap_or_else(|| "no summary line".into())));
    }
    println!();
    for (t, done) in summary {
        println!("{t:14} {done}");
    }
    Ok(())
}
