//! `ksites-ld`: `ksites link --` as a single program, for `-C linker=ksites-ld` (rustc)
//! or `LD=ksites-ld` (C builds). The real linker is chosen by `$KSITES_LINKER` (`lld`,
//! the default: the toolchain's rust-lld, else ld.lld; `bfd`: GNU ld; or a program).
//! Runs it with `--emit-relocs`, then `ksites embed`s the result into the `-o` output,
//! which is written only if both succeed. Prints nothing on success (but what the linker
//! prints, e.g. its version for `-v`); errors go to stderr and the exit status is
//! non-zero (1, or 3 when the input was already embedded). See [`ksites::link`] for the
//! command line: response files, informational flags, an output equal to an input.

use std::process::ExitCode;

use ksites::embed::AlreadyEmbedded;
use ksites::link::{Linker, link};

#[global_allocator]
static ALLOC: ksites::HugePageAlloc = ksites::HugePageAlloc;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.iter().any(|a| a == "--help") && args.len() == 1 {
        println!(
            "ksites-ld: a linker wrapper: runs the real linker ($KSITES_LINKER: lld (default), bfd, \
             or a program) with --emit-relocs, then `ksites embed`s the result into the -o output.\n\
             Usage: ksites-ld <linker arguments> (as passed to ld; @file response files are \
             expanded, nested ones too; -v/-V/--version still link when given inputs)"
        );
        return ExitCode::SUCCESS;
    }
    match link(&Linker::from_env(), &args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ksites-ld: error: {e:#}");
            if e.chain()
                .any(|c| c.downcast_ref::<AlreadyEmbedded>().is_some())
            {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
