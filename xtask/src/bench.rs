//! `cargo xtask bench`: build the tool and the benchmark binary, embed, run, print the
//! ratio table (the binary prints it and writes `target/ksites-bench/ratios.md`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use xshell::Shell;

use crate::host;

mod mcount;

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Shorter measurements (a smoke run; the figures are noisier)
    #[arg(long)]
    quick: bool,
    /// Skip the build-tool benchmarks (they generate a ~30 MB image with gcc, and a
    /// corpus of ~300 C objects for the recordmcount comparison)
    #[arg(long)]
    no_tool: bool,
    /// Only run the criterion benchmarks whose `group/id` matches this regex
    #[arg(long, value_name = "REGEX")]
    filter: Option<String>,
}

pub(crate) fn run(sh: &Shell, root: &Path, args: &BenchArgs) -> Result<()> {
    if !args.no_tool {
        for tool in ["gcc", "objcopy"] {
            if crate::install::find_on_path(tool).is_none() {
                bail!("{tool} is needed for the build-tool benchmarks (or pass --no-tool)");
            }
        }
    }
    let ksites = host::build_tool(sh, root)?;
    let built = root.join("target/release/ksites-bench");
    let out_dir = root.join("target/ksites-bench");
    let bin = out_dir.join("ksites-bench");
    host::build_and_embed(
        sh,
        root,
        &ksites,
        &["-p", "ksites-bench", "--bin", "ksites-bench"],
        // Every function 64-byte aligned: the variants' loops are then laid out alike
        // relative to cache lines (unaligned, an identical `call` measured up to 20%
        // apart depending on where its loop fell).
        &["-C", "llvm-args=-align-all-functions=6"],
        &built,
        &bin,
    )?;
    // The recordmcount comparison: its corpus and Debian's recordmcount. Either missing
    // skips only that part, with a message.
    let mut mcount_args = Vec::new();
    let wants_mcount = args.filter.as_deref().is_none_or(|f| f.contains("mcount"));
    if !args.no_tool && wants_mcount {
        match mcount_inputs(sh, &out_dir.join("mcount")) {
            Ok((corpus, rmc)) => {
                mcount_args.push("--mcount".into());
                mcount_args.push(corpus.into_os_string());
                mcount_args.push("--recordmcount".into());
                mcount_args.push(rmc.into_os_string());
            }
            Err(e) => println!("xtask: skipping the recordmcount benchmark: {e:#}"),
        }
    }
    print_machine();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--out").arg(&out_dir).arg("--ksites").arg(&ksites);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.no_tool {
        cmd.arg("--no-tool");
    }
    if let Some(f) = &args.filter {
        cmd.arg("--filter").arg(f);
    }
    cmd.args(&mcount_args);
    println!("$ {cmd:?}");
    let status = cmd
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("the benchmarks failed ({status})");
    }
    Ok(())
}

/// The corpus (built on demand) and recordmcount (installed on demand).
fn mcount_inputs(sh: &Shell, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let rmc = Path::new(mcount::RECORDMCOUNT);
    crate::install::debian_file(sh, rmc, mcount::RECORDMCOUNT_PACKAGE)?;
    let corpus = mcount::prepare(dir).context("cannot build the recordmcount corpus")?;
    Ok((corpus, rmc.to_path_buf()))
}

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("xtask: machine: {model}, {cpus} CPUs");
}
