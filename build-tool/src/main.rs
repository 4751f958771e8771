//! `ksites`: finds ifunc call sites, SDT probe sites and static-key sites in x86-64,
//! aarch64 and riscv64 ELF files, embeds the `.ksites` table the kernel-loader patches
//! from, wraps the linker, scans for arbitrary call/jump sites, and verifies embedded
//! images.
//!
//! The binary defines the C `main` itself (`#![no_main]`, see [`main`]): a kernel build
//! starts it once per object (`ksites scan --calls-to __fentry__`, like `recordmcount`),
//! and the standard library's start-up work is then a good part of the run.

// (Unit tests of this file run under the test harness's `main`, which calls none of it.)
#![cfg_attr(not(test), no_main)]
#![cfg_attr(test, allow(dead_code, unused_imports))]

use std::ffi::{OsString, c_char, c_int};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ksites::embed::{AlreadyEmbedded, EmbedReport, embed_file};
use ksites::link::{Linker, link};
use ksites::scan::{ScanOptions, scan_files};

#[global_allocator]
static ALLOC: ksites::HugePageAlloc = ksites::HugePageAlloc;

const EXIT_CODES: &str = "\
Exit status:
  0  success (scan: whether or not anything matched; check-module: it would load)
  1  error: unreadable or malformed input (check-module too: a file that is not an
     ELF64 relocatable object, or a malformed one), a site that cannot be rewritten
     safely, a failed link, a link output that is one of its inputs (the message
     names the file, section, offset and symbol)
  2  usage error (an unknown option, an invalid --calls-to/--jumps-to glob, a
     --load-address that is not page-aligned)
  3  embed/link: the input was already processed by `ksites embed`
  4  verify: the image is inconsistent with its table (one line per problem);
     check-module: the module, a well-formed object, would not load (one line per
     problem); nothing else exits 4";

/// Find ifunc call sites, SDT probe sites and static-key sites in x86-64, aarch64 and
/// riscv64 ELF files and embed the `.ksites` table that kernel-loader patches from at boot and at module load.
#[derive(Parser, Debug)]
#[command(name = "ksites", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find every call/jmp/jcc to an ifunc trampoline and every probe site in IMAGE
    /// (an ET_EXEC, or an ET_DYN PIE, linked with --emit-relocs), rewrite dtrace-style
    /// C probe calls into their disabled form (5 bytes on x86-64, one instruction on
    /// aarch64), write the `.ksites` table (into a zero-filled `.ksites` section the linker script reserved, or else into a new
    /// read-only PT_LOAD past the image, behind one holding the program headers) plus
    /// one `.note.stapsdt` note per probe site, point the image's table cell at the
    /// table, and write the result to OUTPUT. IMAGE is never modified; identical input
    /// gives identical output. An image without ifuncs or probes is copied unchanged.
    /// Static-key sites (`static_branch_*!`, `KSITES_STATIC_BRANCH*`) are checked and
    /// each site of a key the file defines is written in the form of the key's default.
    /// IMAGE may also be an ET_REL module (`gcc -c`, `rustc --emit=obj`): it gets a
    /// `.ksites` section and `.rela.ksites` (a PC-relative relocation per field), which
    /// the module loader relocates into the same self-relative table; see `check-module`.
    #[command(after_help = EXIT_CODES)]
    Embed {
        /// The linked image, or a relocatable module object.
        image: PathBuf,
        /// Where to write the result (must differ from IMAGE). A regular file is
        /// replaced through a temporary file and a rename (through a symbolic link: the
        /// file it leads to); a character device or FIFO (`/dev/null`) is written to
        /// directly, never replaced; `-` (or `/dev/stdout`) writes to stdout (the
        /// summary then goes to stderr).
        #[arg(short, long)]
        output: PathBuf,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        /// Refuse inputs larger than BYTES and outputs larger than twice BYTES (a
        /// number, or with K, M, G or T; default 2G, or $KSITES_MAX_SIZE).
        #[arg(long, value_name = "BYTES", value_parser = ksites::output::parse_size)]
        max_size: Option<u64>,
    },
    /// Run the real linker with --emit-relocs, then `embed`, writing the linker's `-o`
    /// output only if both succeed. Everything after `--` is passed to the linker.
    /// Use the `ksites-ld` binary (same as `ksites link --`) where a single program is
    /// needed: `-C linker=ksites-ld` for rustc, `LD=ksites-ld` for C builds. `@file`
    /// response files are expanded as GNU ld does (nested ones too, as bytes). Without
    /// `-o` the output is `a.out`. `-v`/`-V`/`--version` print the linker's version and
    /// the output, if the linker writes one, is embedded; only partial links (`-r`) and
    /// `--help` go to the real linker unchanged. An output that is one of the inputs is
    /// refused. The image may be an ET_EXEC or a PIE (ET_DYN, the default of rustc's
    /// x86_64-unknown-none): a PIE's table holds link-time addresses.
    #[command(after_help = EXIT_CODES)]
    Link {
        /// The real linker: `lld` (the toolchain's rust-lld, else ld.lld; the default),
        /// `bfd` (GNU ld), or a program name or path. Defaults to $KSITES_LINKER.
        #[arg(long, value_name = "LINKER")]
        linker: Option<OsString>,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        /// The linker's arguments (including `-o OUTPUT`).
        #[arg(last = true, required = true, value_name = "LINKER-ARGS")]
        args: Vec<OsString>,
    },
    /// List ifuncs, probes, static keys, their sites, and references left on the
    /// trampoline. Works on
    /// embedded images (reads the table) and on linked images not yet embedded (shows
    /// what embed would record).
    #[command(after_help = EXIT_CODES)]
    Inspect {
        /// The file to list.
        file: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-decode every site of an embedded image and check it against its table entry,
    /// check every probe site holds its disabled form, that the table's sites are
    /// exactly those the relocations show, that the cell points at the table, and that
    /// the table's PT_LOAD loads it at its address (catching a later objcopy/strip that
    /// moved it), and that every static-key site holds its key's default form.
    /// Prints one line per problem and exits 4 if there is any.
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The embedded image.
        file: PathBuf,
    },
    /// Run kernel-loader's module loader on MODULE (an ET_REL object, normally after
    /// `ksites embed`) on the host: lay it out and relocate it into a buffer at the
    /// address it would get in the kernel, validate its `.ksites` table, and check its
    /// imported ifuncs are kernel ifuncs — executing nothing — then report whether it
    /// would load, listing every unresolved symbol and unsupported relocation.
    /// Exits 4 if it would not.
    #[command(name = "check-module", after_help = EXIT_CODES)]
    CheckModule {
        /// The module object.
        module: PathBuf,
        /// The kernel's symbols: its ELF image (symbols, text ranges and `.ksites`
        /// table) or a System.map-style file (`ADDRESS TYPE NAME` per line). Without
        /// it, undefined symbols are listed but not checked.
        #[arg(long, value_name = "FILE")]
        kernel_symbols: Option<PathBuf>,
        /// The address to lay the module out at, in hex, a multiple of the 4 KiB page
        /// (default: the first 2 MiB boundary past the kernel's text).
        #[arg(long, value_name = "ADDR", value_parser = parse_load_addr)]
        load_address: Option<u64>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    // (Its help is `ScanArgs`' doc comment.)
    #[command(after_help = EXIT_CODES)]
    Scan(ScanArgs),
}

/// List every `call rel32` to a symbol matching a --calls-to glob and every
/// `jmp rel32`/`jcc rel32` to one matching a --jumps-to glob, in ET_REL objects or
/// in ET_EXEC/ET_DYN images linked with --emit-relocs, or in the members of an `ar`
/// archive (printed as `lib.a(member.o)`) (like recordmcount for `__fentry__` or
/// objtool for retpoline thunks). Sites are found through relocations and decoded
/// from the start of the enclosing function, or, for code no sized function covers,
/// from the last symbol or the section start, as `objdump -d` does; a site is the
/// instruction's first byte, prefixes included. Calls through the GOT (`-fno-plt`)
/// are not rel32 sites and are not listed. Files are scanned in parallel; output
/// follows the order of the files. A linked image without relocations is an error.
#[derive(clap::Args, Debug)]
struct ScanArgs {
    /// Glob for call targets: `*` any run of characters, `?` one; matched against
    /// raw and demangled names. `[`, `]`, `{`, `}`, `\` and an empty glob are
    /// usage errors (no character classes, braces or escapes).
    #[arg(long, value_name = "GLOB", value_parser = ksites::scan::parse_glob)]
    calls_to: Vec<String>,
    /// Glob for jmp/jcc (tail call) targets, as for --calls-to.
    #[arg(long, value_name = "GLOB", value_parser = ksites::scan::parse_glob)]
    jumps_to: Vec<String>,
    /// One JSON object per line: file, section, offset (section offset of the first
    /// byte), length, kind (call|jmp|jcc), symbol, and address for linked images.
    #[arg(long)]
    json: bool,
    /// Refuse files larger than BYTES (a number, or with K, M, G or T; default 2G,
    /// or $KSITES_MAX_SIZE).
    #[arg(long, value_name = "BYTES", value_parser = ksites::output::parse_size)]
    max_size: Option<u64>,
    /// The files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// `ksites scan …` parsed by a command that has only the `scan` subcommand (the same
/// definition as [`Command::Scan`]'s): a kernel build starts `ksites scan` once per
/// object, and building every subcommand's arguments and help (most of clap's work)
/// for one that is not run cost more than parsing. The subcommand's help, usage and
/// errors are the same (they show nothing of the others); `ksites --help`, `ksites help
/// scan` and every other command line go through [`Cli`].
#[derive(Parser, Debug)]
#[command(name = "ksites", version, after_help = EXIT_CODES)]
struct ScanCli {
    #[command(subcommand)]
    command: ScanOnly,
}

#[derive(Subcommand, Debug)]
enum ScanOnly {
    // (Its help is `ScanArgs`' doc comment.)
    #[command(after_help = EXIT_CODES)]
    Scan(ScanArgs),
}

impl Cli {
    /// The command line, parsed (exits on a usage error, `--help` or `--version`).
    fn from_args() -> Cli {
        if std::env::args_os().nth(1).is_some_and(|a| a == "scan") {
            let ScanCli {
                command: ScanOnly::Scan(args),
            } = ScanCli::parse();
            return Cli {
                command: Command::Scan(args),
            };
        }
        Cli::parse()
    }
}

/// A `--load-address`: hex, page-aligned (the module loader gives each section group
/// (code, read-only, writable) its own pages, so it can protect each on its own).
fn parse_load_addr(s: &str) -> Result<u64, String> {
    let t = s.strip_prefix("0x").unwrap_or(s);
    let a =
        u64::from_str_radix(t, 16).map_err(|e| format!("{s:?}: expected a hex address: {e}"))?;
    let page = kernel_loader::module::PAGE_SIZE as u64;
    if !a.is_multiple_of(page) {
        return Err(format!(
            "{a:#x} is not a multiple of the page size ({page:#x}): the module loader \
             places the module's code, read-only and writable data on pages of their own \
             to give each its own permissions (try {:#x})",
            a.next_multiple_of(page)
        ));
    }
    Ok(a)
}

/// Reads an input file the way every subcommand does (see [`ksites::elf::read_file`]),
/// with an error naming it.
fn read_input(p: &std::path::Path) -> anyhow::Result<ksites::elf::FileBytes> {
    ksites::elf::read_file(p).with_context(|| format!("cannot read {}", p.display()))
}

fn print_embed(r: &EmbedReport, input: &std::path::Path, output: &std::path::Path) {
    // Static keys are counted when there are any (the line is unchanged without).
    let keys = match r.keys.sites.len() {
        0 if r.keys.keys.is_empty() => String::new(),
        n => format!(
            ", {} keys, {n} key sites ({} starting as jumps)",
            r.keys.keys.len(),
            r.keys.initial.len()
        ),
    };
    let line = match r.table {
        Some((_, size)) if r.relocatable => format!(
            "ksites: {}: {} ifuncs, {} sites, {} other references, {} probes, {} probe sites{keys}; table in .ksites ({size} bytes, relocated at load by .rela.ksites) -> {}",
            input.display(),
            r.ifuncs.len(),
            r.scan.sites.len(),
            r.scan.other_refs.len(),
            r.probes.probes.len(),
            r.probes.sites.len(),
            output.display()
        ),
        Some((addr, size)) => format!(
            "ksites: {}: {} ifuncs, {} sites, {} other references, {} probes, {} probe sites{keys}; table at {addr:#x} ({size} bytes) -> {}",
            input.display(),
            r.ifuncs.len(),
            r.scan.sites.len(),
            r.scan.other_refs.len(),
            r.probes.probes.len(),
            r.probes.sites.len(),
            output.display()
        ),
        None => format!(
            "ksites: {}: no ifuncs, probes or static keys; copied unchanged -> {}",
            input.display(),
            output.display()
        ),
    };
    let veneered = r
        .scan
        .other_refs
        .iter()
        .filter(|o| o.what.contains(ksites::sites::THROUGH_VENEER))
        .count();
    let line = match veneered {
        0 => line,
        n => format!(
            "{line}\nksites: {}: {n} ifunc sites {}: they keep working through the \
             linker veneer and the trampoline (`ksites inspect` lists them)",
            input.display(),
            ksites::sites::THROUGH_VENEER
        ),
    };
    // With `-o -` (or `/dev/stdout`) the output is on stdout: the summary goes to
    // stderr.
    if ksites::output::is_stdout(output) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// The exit status of a run that returns normally.
const SUCCESS: u8 = 0;

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Embed {
            image,
            output,
            quiet,
            max_size,
        } => {
            if let Some(n) = max_size {
                ksites::output::set_max_size(n);
            }
            let r = embed_file(&image, &output)?;
            if !quiet {
                print_embed(&r, &image, &output);
            }
        }
        Command::Link {
            linker,
            quiet,
            args,
        } => {
            let linker = linker.map_or_else(Linker::from_env, |l| Linker::parse(&l));
            if let Some((out, r)) = link(&linker, &args)?
                && !quiet
            {
                print_embed(&r, &out, &out);
            }
        }
        Command::Inspect { file, json } => {
            let data = read_input(&file)?;
            let name = file.display().to_string();
            if json {
                println!("{}", ksites::inspect::inspect_json(&name, &data)?);
            } else {
                print!("{}", ksites::inspect::inspect(&name, &data)?);
            }
        }
        Command::Verify { file } => {
            let data = read_input(&file)?;
            let r = ksites::verify::verify(&file.display().to_string(), &data)?;
            for p in &r.problems {
                println!("{p}");
            }
            if !r.problems.is_empty() {
                eprintln!(
                    "ksites: verify: {} problem(s) in {}",
                    r.problems.len(),
                    file.display()
                );
                return Ok(4);
            }
            let keys = match r.key_sites {
                0 => String::new(),
                n => format!(", {n} key sites"),
            };
            println!(
                "ksites: {}: ok ({} ifunc sites, {} probe sites{keys})",
                file.display(),
                r.ifunc_sites,
                r.probe_sites
            );
        }
        Command::CheckModule {
            module,
            kernel_symbols,
            load_address,
            json,
        } => {
            let data = read_input(&module)?;
            let name = module.display().to_string();
            ksites::check_module::check_input(&name, &data)?;
            let kernel = match &kernel_symbols {
                Some(p) => Some(ksites::check_module::KernelSymbols::read(
                    &p.display().to_string(),
                    &read_input(p)?,
                )?),
                None => None,
            };
            let r = ksites::check_module::check(&data, kernel.as_ref(), load_address)
                .with_context(|| name.clone())?;
            if json {
                println!("{}", ksites::check_module::to_json(&name, &r));
            } else {
                print!("{}", ksites::check_module::to_text(&name, &r));
            }
            if !r.problems.is_empty() || r.load.is_none() {
                return Ok(4);
            }
        }
        Command::Scan(ScanArgs {
            calls_to,
            jumps_to,
            json,
            max_size,
            files,
        }) => {
            if let Some(n) = max_size {
                ksites::output::set_max_size(n);
            }
            if calls_to.is_empty() && jumps_to.is_empty() {
                eprintln!("ksites: error: give at least one --calls-to or --jumps-to glob");
                return Ok(2);
            }
            let opts = ScanOptions { calls_to, jumps_to };
            let mut failed = None;
            // One buffered writer: a line-buffered `println!` per hit is a write(2) per
            // line, which dominated scanning images with 10^6 sites.
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            for r in scan_files(&files, &opts) {
                match r {
                    Ok(hits) => {
                        use std::io::Write as _;
                        if json {
                            for h in hits.hits() {
                                writeln!(out, "{}", h.to_json())?;
                            }
                        } else {
                            hits.write_text(&mut out)?;
                        }
                        out.flush()?;
                    }
                    Err(e) => {
                        eprintln!("ksites: error: {e:#}");
                        failed = Some(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e.context("some files could not be scanned"));
            }
        }
    }
    Ok(SUCCESS)
}

/// Parses the command line, runs it, reports an error; the exit status.
fn run_cli() -> u8 {
    match run(Cli::from_args()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksites: error: {e:#}");
            if e.downcast_ref::<AlreadyEmbedded>().is_some()
                || e.chain()
                    .any(|c| c.downcast_ref::<AlreadyEmbedded>().is_some())
            {
                3
            } else {
                1
            }
        }
    }
}

/// The program's entry point, called by the C runtime in place of the standard library's.
///
/// Rust's own start-up (`std::rt`) would also find the main thread's stack guard, which
/// glibc does by reading and parsing `/proc/self/maps` (a tenth of the instructions of a
/// `scan --calls-to __fentry__` of a typical object), and map an alternate signal stack
/// to report a stack overflow by name; both are skipped here (a stack overflow is then a
/// plain SIGSEGV). What the rest of the program relies on is done as std does it:
/// [`startup::init`] makes sure file descriptors 0-2 are open (so no file the tool
/// opens becomes its stdout) and ignores SIGPIPE (a closed pipe is a write error, as
/// before; child processes still start with the default). The command line is read
/// through `std::env::args_os`, which glibc provides to std before `main` runs. A panic
/// exits 101 with its message, as from std's `main`; stdout is flushed before returning.
// SAFETY: the only `main` symbol in the binary (`#![no_main]`: std defines none), with the
// signature the C runtime calls it with; it does not read `argv`.
#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    startup::init();
    let code = std::panic::catch_unwind(run_cli).unwrap_or(101);
    startup::finish(code)
}

/// What the standard library's start-up and shutdown did that the program relies on.
mod startup {
    use std::ffi::c_int;
    use std::io::Write as _;

    /// Opens `/dev/null` on any of file descriptors 0, 1 and 2 that is closed (else the
    /// first file the tool opened would take its number and, for 1, receive what it
    /// prints), and ignores SIGPIPE, as std's start-up does; aborts if that fails.
    pub(crate) fn init() {
        let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of three `pollfd`s for the duration of the call;
        // a zero timeout returns at once.
        let polled = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
        if polled == -1 {
            // (std falls back to `fcntl(F_GETFD)` per descriptor where `poll` is not
            // available; it is on every Linux this runs on.)
            for fd in &mut fds {
                // SAFETY: F_GETFD on any number only reports whether it is open.
                if unsafe { libc::fcntl(fd.fd, libc::F_GETFD) } == -1 {
                    fd.revents = libc::POLLNVAL;
                }
            }
        }
        for fd in fds {
            if fd.revents & libc::POLLNVAL != 0 {
                // SAFETY: a NUL-terminated path and plain flags; the descriptor returned
                // is the lowest free one, i.e. `fd.fd` (the lower ones are open).
                let got = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR, 0) };
                if got != fd.fd {
                    std::process::abort();
                }
            }
        }
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
            std::process::abort();
        }
    }

    /// Flushes stdout, as std's shutdown does (a `print!` without a newline waits in its
    /// buffer; like std, a failure here does not change the exit status `code`).
    pub(crate) fn finish(code: u8) -> c_int {
        let _ = std::io::stdout().flush();
        c_int::from(code)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn both_command_lines_are_well_formed_and_scan_is_the_same_in_both() {
        super::Cli::command().debug_assert();
        super::ScanCli::command().debug_assert();
        let mut full = super::Cli::command();
        let mut only = super::ScanCli::command();
        let full = full
            .find_subcommand_mut("scan")
            .expect("scan")
            .render_long_help();
        let only = only
            .find_subcommand_mut("scan")
            .expect("scan")
            .render_long_help();
        assert_eq!(full.to_string(), only.to_string());
        assert!(full.to_string().contains("--calls-to <GLOB>"));
    }
}
