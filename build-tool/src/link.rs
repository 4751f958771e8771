//! `ksites link`: a linker wrapper. It runs the real linker with `--emit-relocs` into a
//! temporary file beside the requested output, then `embed`s that into the output, so a
//! `cargo build` (with `-C linker=ksites-ld`) or a C build (`LD=ksites-ld`) produces the
//! final, embedded image in one step. The output is written only if both succeed.
//!
//! The command line is read as the linkers read it: `@file` response files expanded
//! (nested, as bytes, libiberty's quoting: [`expand_response_files`]), `-o` found in all
//! its spellings (`a.out` without one: [`parse_link_args`]). Informational flags
//! (`-v`, `-V`, `--version`) do not make a link a query: the linker decides whether it
//! links, and whatever it writes is embedded. An output that is one of the inputs is
//! refused before the linker runs, as GNU ld refuses it. Errors name the linker program
//! and the user's `-o` path, never the temporary file.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::embed::{AlreadyEmbedded, EmbedReport, embed_file};
use crate::target::Target;

/// Environment variable choosing the real linker for `ksites-ld` (and the default for
/// `ksites link`).
pub const LINKER_ENV: &str = "KSITES_LINKER";

/// Which linker to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Linker {
    /// The toolchain's `rust-lld` (`-flavor gnu`), else `ld.lld` from PATH.
    Lld,
    /// GNU ld (`ld.bfd`).
    Bfd,
    /// Any other program, given by name or path.
    Program(OsString),
}

impl Linker {
    /// Parses a `--linker` value or `KSITES_LINKER`: `lld`, `rust-lld`, `ld.lld` → LLD;
    /// `bfd`, `ld.bfd`, `gnu`, `ld` → GNU ld; anything else is a program.
    pub fn parse(s: &OsStr) -> Linker {
        match s.to_str() {
            Some("" | "lld" | "rust-lld" | "ld.lld") => Linker::Lld,
            Some("bfd" | "ld.bfd" | "gnu" | "ld") => Linker::Bfd,
            _ => Linker::Program(s.to_owned()),
        }
    }

    /// The linker chosen by `KSITES_LINKER`, or LLD.
    pub fn from_env() -> Linker {
        std::env::var_os(LINKER_ENV).map_or(Linker::Lld, |v| Linker::parse(&v))
    }

    /// The command to run for a link whose inputs are for `target` (GNU ld is one
    /// program per architecture: [`Target::gnu_ld`]; lld handles every one).
    fn command_for(&self, target: Option<Target>) -> Result<Command> {
        match (self, target) {
            (Linker::Bfd, Some(t)) => Ok(Command::new(t.gnu_ld())),
            _ => self.command(),
        }
    }

    /// The command to run, with any leading arguments it needs.
    fn command(&self) -> Result<Command> {
        Ok(match self {
            Linker::Lld => match rust_lld() {
                Some(p) => {
                    let mut c = Command::new(p);
                    c.args(["-flavor", "gnu"]);
                    c
                }
                None => Command::new("ld.lld"),
            },
            Linker::Bfd => Command::new("ld.bfd"),
            Linker::Program(p) => {
                let mut c = Command::new(p);
                // rust-lld is lld's generic driver: it needs the flavor rustc gives it,
                // which `parse_link_args` drops.
                let name = Path::new(p).file_name().unwrap_or_default().as_bytes();
                if name.starts_with(b"rust-lld") || name == b"lld" {
                    c.args(["-flavor", "gnu"]);
                }
                c
            }
        })
    }
}

/// The active toolchain's `rust-lld`, if there is one.
fn rust_lld() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let vv = Command::new(&rustc).arg("-vV").output().ok()?;
    let sysroot = String::from_utf8(sysroot.stdout).ok()?;
    let host = String::from_utf8(vv.stdout)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))?;
    let p = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/rust-lld");
    p.is_file().then_some(p)
}

/// The linker's arguments with the output path taken out.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkArgs {
    /// The requested output (`a.out`, the linkers' default, without `-o`).
    pub output: PathBuf,
    /// Every other argument, in order (`-flavor X` dropped).
    pub rest: Vec<OsString>,
    /// Whether `--emit-relocs` (or `-q`) was already given.
    pub has_emit_relocs: bool,
}

/// Long options that begin with `-o` when written with one dash (GNU ld parses
/// single-dash long options, and so does lld): not an `-oFILE`.
const O_LONG_OPTIONS: &[&str] = &["omagic", "oformat", "orphan-handling", "opt-remarks"];

/// Splits a linker command line. Accepts `-o X`, `-oX`, `--output X`, `--output=X` (the
/// last one wins, as in the linkers; none: `a.out`); drops a leading `-flavor gnu` (what
/// rustc passes to `rust-lld`).
pub fn parse_link_args(args: &[OsString]) -> Result<LinkArgs> {
    let mut output = None;
    let mut rest = Vec::new();
    let mut has_emit_relocs = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let b = a.as_bytes();
        if b == b"-flavor" {
            i += 2;
            continue;
        }
        if b == b"-o" || b == b"--output" || b == b"-output" {
            let v = args
                .get(i + 1)
                .with_context(|| format!("linker argument {} has no value", a.to_string_lossy()))?;
            output = Some(PathBuf::from(v));
            i += 2;
            continue;
        }
        let long_o = |v: &[u8]| O_LONG_OPTIONS.iter().any(|o| v.starts_with(o.as_bytes()));
        if let Some(v) = b
            .strip_prefix(b"--output=")
            .or_else(|| b.strip_prefix(b"-output="))
        {
            output = Some(PathBuf::from(OsStr::from_bytes(v)));
        } else if let Some(v) = b
            .strip_prefix(b"-o")
            .filter(|v| !v.is_empty() && !long_o(&b[1..]))
        {
            output = Some(PathBuf::from(OsStr::from_bytes(v)));
        } else {
            if b == b"--emit-relocs" || b == b"-q" {
                has_emit_relocs = true;
            }
            rest.push(a.clone());
        }
        i += 1;
    }
    Ok(LinkArgs {
        output: output.unwrap_or_else(|| PathBuf::from("a.out")),
        rest,
        has_emit_relocs,
    })
}

/// Most response files one command line may read, nested ones included (libiberty's
/// limit, which is also what stops a file that names itself).
pub const MAX_RESPONSE_FILES: usize = 2000;
/// Deepest nesting of response files followed.
pub const MAX_RESPONSE_DEPTH: usize = 64;
/// Largest response file read (rustc's hold a few MB at most).
pub const MAX_RESPONSE_FILE_SIZE: u64 = 64 << 20;

/// Expands `@file` response files as GNU ld (libiberty's `expandargv`) and lld do; rustc
/// uses one when a command line gets too long. A file holds arguments separated by
/// whitespace, with `'`/`"` quoting and `\` escaping the next byte (also inside quotes);
/// `@file`s inside it are expanded in turn, their relative paths taken from the current
/// directory (as libiberty does). Files are read as bytes: any non-UTF-8 argument is
/// passed on unchanged. A file that includes itself, nesting deeper than
/// [`MAX_RESPONSE_DEPTH`], more than [`MAX_RESPONSE_FILES`] files, a file over
/// [`MAX_RESPONSE_FILE_SIZE`] or one with a NUL byte is an error naming the files.
pub fn expand_response_files(args: &[OsString]) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    let mut count = 0;
    expand_into(args, &mut out, &mut Vec::new(), &mut count)?;
    Ok(out)
}

/// A response file being expanded: its path and identity (device, inode).
type Open = (PathBuf, (u64, u64));

fn expand_into(
    args: &[OsString],
    out: &mut Vec<OsString>,
    chain: &mut Vec<Open>,
    count: &mut usize,
) -> Result<()> {
    for a in args {
        let Some(name) = a.as_bytes().strip_prefix(b"@").filter(|n| !n.is_empty()) else {
            out.push(a.clone());
            continue;
        };
        let path = PathBuf::from(OsStr::from_bytes(name));
        let within = || match chain.last() {
            Some((p, _)) => format!(" (named in response file {})", p.display()),
            None => String::new(),
        };
        *count += 1;
        ensure!(
            *count <= MAX_RESPONSE_FILES,
            "more than {MAX_RESPONSE_FILES} response files; stopped at {}{}",
            path.display(),
            within()
        );
        ensure!(
            chain.len() < MAX_RESPONSE_DEPTH,
            "response files nested deeper than {MAX_RESPONSE_DEPTH}; stopped at {}{}",
            path.display(),
            within()
        );
        let (bytes, id) = read_response_file(&path)
            .with_context(|| format!("cannot read response file {}{}", path.display(), within()))?;
        if let Some(first) = chain.iter().position(|(_, i)| *i == id) {
            let names: Vec<_> = chain[first..]
                .iter()
                .map(|(p, _)| p.display().to_string())
                .chain(std::iter::once(path.display().to_string()))
                .collect();
            bail!(
                "response file {} includes itself: {}",
                path.display(),
                names.join(" -> ")
            );
        }
        let words = split_response(&bytes)
            .with_context(|| format!("response file {}{}", path.display(), within()))?;
        chain.push((path, id));
        expand_into(&words, out, chain, count)?;
        chain.pop();
    }
    Ok(())
}

/// Reads a response file (at most [`MAX_RESPONSE_FILE_SIZE`] bytes) and its identity.
fn read_response_file(path: &Path) -> Result<(Vec<u8>, (u64, u64))> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let f = std::fs::File::open(path)?;
    let m = f.metadata()?;
    ensure!(!m.is_dir(), "it is a directory");
    let mut bytes = Vec::new();
    f.take(MAX_RESPONSE_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    ensure!(
        bytes.len() as u64 <= MAX_RESPONSE_FILE_SIZE,
        "larger than {} MiB",
        MAX_RESPONSE_FILE_SIZE >> 20
    );
    Ok((bytes, (m.dev(), m.ino())))
}

/// Splits a response file's bytes into arguments as libiberty's `buildargv` does.
fn split_response(bytes: &[u8]) -> Result<Vec<OsString>> {
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        bail!("a NUL byte at offset {at:#x} (not a text file)");
    }
    let space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && space(bytes[i]) {
            i += 1;
        }
        if i == bytes.len() {
            return Ok(out);
        }
        let (mut arg, mut quote, mut escaped) = (Vec::new(), None, false);
        while i < bytes.len() {
            let c = bytes[i];
            if escaped {
                arg.push(c);
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if let Some(q) = quote {
                if c == q {
                    quote = None;
                } else {
                    arg.push(c);
                }
            } else if c == b'\'' || c == b'"' {
                quote = Some(c);
            } else if space(c) {
                break;
            } else {
                arg.push(c);
            }
            i += 1;
        }
        out.push(OsString::from_vec(arg));
    }
}

/// Whether a command line is not a final link `embed` should process: a partial link
/// (`-r`), a help request, `--version` (which neither linker follows with a link), or
/// a command line that names no input file (`ld -v`, `ld --verbose`, `ld -V`: a query
/// the linker answers without writing `a.out`). Those go to the real linker unchanged.
/// (`-v`/`-V`/`--verbose` with input files still link, so they are linked like any
/// command line, and only when the linker writes no output is nothing embedded.)
pub fn is_pass_through(args: &[OsString]) -> bool {
    let flag = args.iter().any(|a| {
        [
            "-r",
            "--relocatable",
            "-Ur",
            "--help",
            "-help",
            "--target-help",
            "--version",
            "-version",
        ]
        .iter()
        .any(|x| a == *x)
    });
    flag || !names_an_input(args)
}

/// Whether a linker command line names something to link: an argument that is not an
/// option nor an option's value (`-o x`, `-m elf_x86_64`, `-L dir`), or a `-lNAME`.
fn names_an_input(args: &[OsString]) -> bool {
    let mut skip_next = false;
    for a in args {
        let b = a.as_bytes();
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if b.starts_with(b"-l") && b.len() > 2 {
            return true;
        }
        if b.starts_with(b"-") {
            if !b.contains(&b'=') {
                let name = b.strip_prefix(b"-").unwrap_or(b);
                let name = name.strip_prefix(b"-").unwrap_or(name);
                skip_next = matches!(name, b"o" | b"output" | b"flavor" | b"T" | b"script")
                    || NOT_INPUT_VALUE.iter().any(|n| n.as_bytes() == name);
            }
            continue;
        }
        if !b.is_empty() {
            return true;
        }
    }
    false
}

/// The linkers' informational flags: they print something and link only if there is
/// something to link (GNU ld: `-v`, `--version`, `-V`; lld: `-v`, and `--version`
/// never links).
fn is_informational(args: &[OsString]) -> bool {
    args.iter().any(|a| {
        ["-v", "-V", "--version", "-version", "--verbose"]
            .iter()
            .any(|x| a == *x)
    })
}

/// Linker options whose value (the next argument, or after `=`) names no file the link
/// reads: a soname, a symbol, a directory, an address, a file the linker writes. Their
/// values are not compared with the output (`-soname libx.so.1 -o libx.so.1` is usual).
#[rustfmt::skip]
const NOT_INPUT_VALUE: &[&str] = &[
    "soname", "h", "e", "entry", "m", "z", "u", "undefined", "require-defined", "y",
    "trace-symbol", "defsym", "wrap", "Map", "dynamic-linker", "I", "rpath", "rpath-link",
    "L", "library-path", "sysroot", "hash-style", "O", "plugin", "plugin-opt",
    "section-start", "Ttext", "Tdata", "Tbss", "Ttext-segment", "Trodata-segment",
    "Tldata-segment", "image-base", "exclude-libs", "a", "audit", "f", "auxiliary", "F",
    "filter", "A", "architecture", "b", "format", "oformat", "out-implib",
    "dependency-file", "package-metadata",
];

/// Refuses an output that is one of the link's inputs (GNU ld: "input file is the same
/// as output file"): the same file (device and inode) when the output exists, else the
/// same path. Every argument that may name a file the link reads is compared: a plain
/// argument, and the value of an option (`-T x`, `--script=x`), except the values of
/// [`NOT_INPUT_VALUE`] options.
fn refuse_output_among_inputs(output: &Path, rest: &[OsString]) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let out_id = id(output);
    fn plain(p: &Path) -> Vec<std::path::Component<'_>> {
        p.components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect()
    }
    let not_input = |opt: &[u8]| {
        let name = opt.strip_prefix(b"-").unwrap_or(opt);
        let name = name.strip_prefix(b"-").unwrap_or(name);
        NOT_INPUT_VALUE.iter().any(|n| n.as_bytes() == name)
    };
    let mut skip_next = false;
    for a in rest {
        let b = a.as_bytes();
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let cand = if b.starts_with(b"-") {
            match b.iter().position(|&c| c == b'=') {
                Some(eq) if !not_input(&b[..eq]) => &b[eq + 1..],
                Some(_) => continue,
                None => {
                    skip_next = not_input(b);
                    continue;
                }
            }
        } else {
            b
        };
        if cand.is_empty() {
            continue;
        }
        let p = Path::new(OsStr::from_bytes(cand));
        let same = match out_id {
            Some(o) => id(p) == Some(o),
            None => plain(p) == plain(output),
        };
        if same {
            bail!(
                "input file {} is the same as the output file {}; refusing to overwrite an input",
                p.display(),
                output.display()
            );
        }
    }
    Ok(())
}

/// The target of a link's inputs: the `e_machine` of the first input file that is an
/// ELF object or an archive of them, if the tool knows it.
fn input_target(args: &[OsString]) -> Option<Target> {
    use std::io::Read as _;
    for a in args {
        let p = Path::new(a);
        if a.as_bytes().starts_with(b"-") || !p.is_file() {
            continue;
        }
        let mut head = [0u8; 4096];
        let Ok(n) = std::fs::File::open(p).and_then(|mut f| f.read(&mut head)) else {
            continue;
        };
        let head = &head[..n];
        // An archive: its first member's header is 60 bytes after the 8-byte magic
        // (the symbol table first, usually: look for the first ELF header instead).
        let elf = match head.strip_prefix(b"!<arch>\n") {
            Some(rest) => rest
                .windows(4)
                .position(|w| w == b"\x7fELF")
                .map(|i| &rest[i..]),
            None => Some(head),
        };
        if let Some(e) = elf.filter(|e| e.starts_with(b"\x7fELF") && e.len() >= 20)
            && let Ok(t) = Target::from_machine(u16::from_le_bytes([e[18], e[19]]))
        {
            return Some(t);
        }
    }
    None
}

/// The linker's program, for messages.
fn program(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// Runs the linker unchanged (a pass-through command line).
fn run_unchanged(linker: &Linker, args: &[OsString]) -> Result<()> {
    let mut cmd = linker.command_for(input_target(args))?;
    // `-flavor X` is for rust-lld only, and `command()` adds it where needed.
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-flavor" {
            it.next();
        } else {
            rest.push(a.clone());
        }
    }
    let status = cmd
        .args(&rest)
        .status()
        .with_context(|| format!("cannot run the linker {}", program(&cmd)))?;
    ensure!(status.success(), "the linker failed ({status})");
    Ok(())
}

/// Runs the linker with its standard error passed on line by line with the temporary
/// output's path replaced by the user's `output` (a warning such as "has a LOAD
/// segment with RWX permissions" names the file the user asked for), and with a signal
/// that ends this process passed on to it first ([`crate::output::ChildGuard`]).
fn run_naming_output(
    cmd: &mut Command,
    tmp: &Path,
    output: &Path,
) -> Result<std::process::ExitStatus> {
    use std::io::{BufRead as _, Write as _};
    let (mut child, guard) =
        crate::output::ChildGuard::spawn(cmd.stderr(std::process::Stdio::piped()))
            .with_context(|| format!("cannot run the linker {}", program(cmd)))?;
    if let Some(err) = child.stderr.take() {
        let (from, to) = (tmp.as_os_str().as_bytes(), output.as_os_str().as_bytes());
        let mut r = std::io::BufReader::new(err);
        let mut line = Vec::new();
        let mut stderr = std::io::stderr().lock();
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let _ = stderr.write_all(&replace_bytes(&line, from, to));
            line.clear();
        }
    }
    let status = child.wait();
    drop(guard);
    status.with_context(|| format!("waiting for the linker {} failed", program(cmd)))
}

/// `line` with every `from` replaced by `to`.
fn replace_bytes(line: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if !from.is_empty() && line[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    out
}

/// An embed error about the linker's temporary output, told as about `output`: the
/// temporary file is an implementation detail the user never named.
fn name_output(e: anyhow::Error, tmp: &Path, output: &Path) -> anyhow::Error {
    let out = output.display().to_string();
    if e.chain()
        .any(|c| c.downcast_ref::<AlreadyEmbedded>().is_some())
    {
        return AlreadyEmbedded(format!(
            "{out} (as linked: an input carries a .ksites table)"
        ))
        .into();
    }
    let msg = format!("{e:#}").replace(&tmp.display().to_string(), &out);
    anyhow::anyhow!(msg)
}

/// Links, then embeds. Returns the output and the embed report, or `None` when no image
/// was embedded: a command line passed through to the real linker unchanged (see
/// [`is_pass_through`]), or an informational query (`-v`, `--version`) after which the
/// linker wrote no output.
pub fn link(linker: &Linker, args: &[OsString]) -> Result<Option<(PathBuf, EmbedReport)>> {
    let args = expand_response_files(args)?;
    if is_pass_through(&args) {
        run_unchanged(linker, &args)?;
        return Ok(None);
    }
    let la = parse_link_args(&args)?;
    refuse_output_among_inputs(&la.output, &la.rest)?;
    // Beside the output (by the user's, maybe relative, path; in the temporary
    // directory for a device, FIFO or stdout output); removed on error, on drop and on
    // SIGINT/SIGTERM/SIGHUP.
    let beside = match crate::output::Dest::resolve(&la.output)? {
        crate::output::Dest::Replace { target } => target,
        _ => std::env::temp_dir().join("out"),
    };
    let tmp = crate::output::TempFile::beside(&beside, ".ksites-link-")
        .map_err(crate::output::write_error(&la.output))?;
    let mut cmd = linker.command_for(input_target(&la.rest))?;
    cmd.args(&la.rest);
    if !la.has_emit_relocs {
        cmd.arg("--emit-relocs");
    }
    cmd.arg("-o").arg(tmp.path());
    let status = run_naming_output(&mut cmd, tmp.path(), &la.output)?;
    if !status.success() {
        bail!(
            "the linker failed ({status}); {} not written",
            la.output.display()
        );
    }
    let written = std::fs::metadata(tmp.path()).is_ok_and(|m| m.is_file() && m.len() > 0);
    if !written {
        // `ld -v` with nothing to link, `ld.lld --version`: a query, answered.
        ensure!(
            is_informational(&la.rest),
            "the linker produced no output; {} not written",
            la.output.display()
        );
        return Ok(None);
    }
    let report = embed_file(tmp.path(), &la.output)
        .map_err(|e| name_output(e, tmp.path(), &la.output))
        .with_context(|| {
            format!(
                "embedding into {} failed; the output was not written",
                la.output.display()
            )
        })?;
    drop(tmp);
    Ok(Some((la.output, report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn gnu_ld_follows_the_inputs_machine() {
        let dir = tempfile::tempdir().unwrap();
        let elf = |machine: u16| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(b"\x7fELF");
            h[18..20].copy_from_slice(&machine.to_le_bytes());
            h
        };
        let a64 = dir.path().join("a.o");
        std::fs::write(&a64, elf(Target::Aarch64.e_machine())).unwrap();
        let lib = dir.path().join("libx.a");
        let mut ar =
            b"!<arch>\n/               0           0     0     0       4         `\n\0\0\0\0"
                .to_vec();
        ar.extend(elf(Target::X86_64.e_machine()));
        std::fs::write(&lib, ar).unwrap();
        let args = |v: &[&std::path::Path]| -> Vec<OsString> {
            ["-static".into(), "-o".into()]
                .into_iter()
                .chain(v.iter().map(|p| p.as_os_str().to_owned()))
                .collect()
        };
        assert_eq!(input_target(&args(&[&a64, &lib])), Some(Target::Aarch64));
        assert_eq!(input_target(&args(&[&lib, &a64])), Some(Target::X86_64));
        assert_eq!(input_target(&args(&[])), None);
        let cmd = Linker::Bfd.command_for(Some(Target::Aarch64)).unwrap();
        assert_eq!(program(&cmd), Target::Aarch64.gnu_ld());
        assert_eq!(
            program(&Linker::Bfd.command_for(None).unwrap()),
            "ld.bfd",
            "no input told: the host's"
        );
    }

    #[test]
    fn output_forms_and_flavor() {
        let a = parse_link_args(&os(&[
            "-flavor",
            "gnu",
            "a.o",
            "-o",
            "out",
            "--gc-sections",
        ]))
        .unwrap();
        assert_eq!(a.output, PathBuf::from("out"));
        assert_eq!(a.rest, os(&["a.o", "--gc-sections"]));
        assert!(!a.has_emit_relocs);
        for form in [&["-oout"][..], &["--output=out"], &["--output", "out"]] {
            let mut v = os(form);
            v.push("--emit-relocs".into());
            let a = parse_link_args(&v).unwrap();
            assert_eq!(a.output, PathBuf::from("out"));
            assert!(a.has_emit_relocs);
        }
        // No -o: the linkers' a.out. One-dash long options are not -oFILE.
        assert_eq!(
            parse_link_args(&os(&["a.o"])).unwrap().output,
            PathBuf::from("a.out")
        );
        let a = parse_link_args(&os(&["-omagic", "-oformat=elf64-x86-64", "a.o"])).unwrap();
        assert_eq!(a.output, PathBuf::from("a.out"));
        assert_eq!(a.rest.len(), 3);
        assert!(parse_link_args(&os(&["a.o", "-o"])).is_err());
    }

    fn split(s: &[u8]) -> Vec<OsString> {
        split_response(s).unwrap()
    }

    #[test]
    fn response_file_quoting_as_libiberty() {
        assert_eq!(
            split(b"a.o \"b c.o\"\n-o out 'd e'\n"),
            os(&["a.o", "b c.o", "-o", "out", "d e"])
        );
        // Backslash escapes anywhere (inside single quotes too); '' is an empty argument;
        // quotes join with what touches them; any whitespace separates.
        assert_eq!(
            split(br"a\ b 'c\'d' e''f '' x\"),
            os(&["a b", "c'd", "ef", "", "x"])
        );
        assert_eq!(split(b"\t\x0b\x0c\r\n  "), Vec::<OsString>::new());
        assert_eq!(split(b"'a\"b' \"c'd\""), os(&["a\"b", "c'd"]));
        // Bytes, not UTF-8.
        assert_eq!(
            split(b"-o \xff\xfe.img"),
            vec![
                OsString::from("-o"),
                OsString::from_vec(b"\xff\xfe.img".to_vec())
            ]
        );
        assert!(split_response(b"a\0b").is_err());
    }

    #[test]
    fn nested_response_files_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n: &str| OsString::from(format!("@{}", dir.path().join(n).display()));
        std::fs::write(dir.path().join("inner"), "-o out").unwrap();
        std::fs::write(
            dir.path().join("outer"),
            format!("a.o {} b.o", at("inner").to_string_lossy()),
        )
        .unwrap();
        let v = expand_response_files(&[at("outer"), "-x".into()]).unwrap();
        assert_eq!(v, os(&["a.o", "-o", "out", "b.o", "-x"]));
        std::fs::write(dir.path().join("loop"), at("loop2").as_bytes()).unwrap();
        std::fs::write(dir.path().join("loop2"), at("loop").as_bytes()).unwrap();
        let e = format!("{:#}", expand_response_files(&[at("loop")]).unwrap_err());
        assert!(e.contains("includes itself") && e.contains("loop2"), "{e}");
        let e = format!("{:#}", expand_response_files(&[at("missing")]).unwrap_err());
        assert!(
            e.contains("cannot read response file") && e.contains("missing"),
            "{e}"
        );
        // `@` alone is an argument (libiberty leaves what it cannot open as it is).
        assert_eq!(expand_response_files(&os(&["@"])).unwrap(), os(&["@"]));
    }

    #[test]
    fn pass_through_and_queries() {
        assert!(is_pass_through(&os(&["-r", "a.o", "-o", "x.o"])));
        assert!(is_pass_through(&os(&["--help"])));
        // Queries with nothing to link go to the linker as they are.
        assert!(is_pass_through(&os(&["--version"])));
        assert!(is_pass_through(&os(&["a.o", "--version", "-o", "x"])));
        assert!(is_pass_through(&os(&["--verbose"])));
        assert!(is_pass_through(&os(&[
            "-m",
            "elf_x86_64",
            "-V",
            "-L",
            "lib"
        ])));
        assert!(is_pass_through(&os(&["-flavor", "gnu", "-v"])));
        // With something to link they link (and embed).
        assert!(!is_pass_through(&os(&["a.o", "-o", "x", "-v"])));
        assert!(!is_pass_through(&os(&["-lfoo", "--verbose"])));
        assert!(!is_pass_through(&os(&["-T", "k.ld", "a.o"])));
        assert!(is_informational(&os(&["a.o", "-V"])));
        assert!(!is_informational(&os(&["a.o"])));
    }

    #[test]
    fn same_input_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let o = dir.path().join("kk.o");
        std::fs::write(&o, b"x").unwrap();
        let e = refuse_output_among_inputs(&o, &[OsString::from("-static"), o.clone().into()]);
        assert!(format!("{:#}", e.unwrap_err()).contains("is the same as the output file"));
        let via = OsString::from(format!("--script={}", o.display()));
        assert!(refuse_output_among_inputs(&o, &[via]).is_err());
        let other = dir.path().join("other");
        assert!(refuse_output_among_inputs(&other, &[o.clone().into()]).is_ok());
        // A soname (or any value that names no input) equal to the output is usual.
        for v in [
            vec![OsString::from("-soname"), o.clone().into()],
            vec![OsString::from("-h"), o.clone().into()],
            vec![OsString::from(format!("--soname={}", o.display()))],
        ] {
            assert!(refuse_output_among_inputs(&o, &v).is_ok(), "{v:?}");
        }
        assert!(refuse_output_among_inputs(&o, &[OsString::from("-T"), o.clone().into()]).is_err());
    }

    #[test]
    fn linker_names() {
        assert_eq!(Linker::parse(OsStr::new("bfd")), Linker::Bfd);
        assert_eq!(Linker::parse(OsStr::new("ld.lld")), Linker::Lld);
        assert_eq!(
            Linker::parse(OsStr::new("/opt/ld")),
            Linker::Program("/opt/ld".into())
        );
    }
}
