//! `ksites`: finds ifunc call sites in a linked kernel image and embeds the `.ksites`
//! table the kernel-loader patches from at boot.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ksites::embed::{AlreadyEmbedded, embed_file};

const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  error (message on stderr names the file, section, offset and symbol)
  2  usage error
  3  the input was already processed by `ksites embed`";

/// Find ifunc call sites and SDT probe sites in a linked x86-64 ELF image and embed the
/// `.ksites` table the kernel-loader patches from.
#[derive(Parser, Debug)]
#[command(name = "ksites", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find every call/jmp to an ifunc trampoline and every probe site in IMAGE (linked
    /// with --emit-relocs), rewrite dtrace-style C probe calls into their disabled
    /// 5-byte form, write the `.ksites` table into a new PT_LOAD segment, point the
    /// image's table cell at it, and write the result to OUTPUT (atomically; IMAGE is
    /// never modified). An image without ifuncs or probes is copied unchanged.
    #[command(after_help = EXIT_CODES)]
    Embed {
        /// The linked image (ET_EXEC, linked with --emit-relocs).
        image: PathBuf,
        /// Where to write the result (must differ from IMAGE).
        #[arg(short, long)]
        output: PathBuf,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List the ifuncs, probes, their sites, and references that are not patched. Works on
    /// embedded images (reads the table) and on plain ones (shows what embed would do).
    #[command(after_help = EXIT_CODES)]
    Inspect {
        /// The file to list.
        file: PathBuf,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed {
            image,
            output,
            quiet,
        } => {
            let r = embed_file(&image, &output)?;
            if !quiet {
                match r.table {
                    Some((addr, size)) => println!(
                        "ksites: {}: {} ifuncs, {} sites, {} other references, {} probes, {} probe sites; table at {addr:#x} ({size} bytes) -> {}",
                        image.display(),
                        r.ifuncs.len(),
                        r.scan.sites.len(),
                        r.scan.other_refs.len(),
                        r.probes.probes.len(),
                        r.probes.sites.len(),
                        output.display()
                    ),
                    None => println!(
                        "ksites: {}: no ifuncs or probes; copied unchanged -> {}",
                        image.display(),
                        output.display()
                    ),
                }
            }
            Ok(())
        }
        Command::Inspect { file } => {
            let data = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            print!(
                "{}",
                ksites::inspect::inspect(&file.display().to_string(), &data)?
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ksites: error: {e:#}");
            if e.downcast_ref::<AlreadyEmbedded>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
