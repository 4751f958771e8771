//! `ksites link`: a linker wrapper. It runs the real linker with `--emit-relocs` into a
//! temporary file beside the requested output, then `embed`s that into the output, so a
//! `cargo build` (with `-C linker=ksites-ld`) or a C build (`LD=ksites-ld`) produces the
//! final, embedded image in one step. The output is written only if both succeed.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::embed::{EmbedReport, embed_file};

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
            Linker::Program(p) => Command::new(p),
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

/// The linker's arguments with the output path taken out: `(output, args with a
/// placeholder index where -o goes)`.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkArgs {
    /// The requested output.
    pub output: PathBuf,
    /// Every other argument, in order (`-flavor X` dropped).
    pub rest: Vec<OsString>,
    /// Whether `--emit-relocs` (or `-q`) was already given.
    pub has_emit_relocs: bool,
}

/// Splits a linker command line. Accepts `-o X`, `-oX`, `--output X`, `--output=X`;
/// drops a leading `-flavor gnu` (what rustc passes to `rust-lld`).
pub fn parse_link_args(args: &[OsString]) -> Result<LinkArgs> {
    let mut output = None;
    let mut rest = Vec::new();
    let mut has_emit_relocs = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let s = a.to_string_lossy();
        if s == "-flavor" {
            i += 2;
            continue;
        }
        if s == "-o" || s == "--output" {
            let v = args
                .get(i + 1)
                .with_context(|| format!("linker argument {s} has no value"))?;
            output = Some(PathBuf::from(v));
            i += 2;
            continue;
        }
        if let Some(v) = s.strip_prefix("--output=") {
            output = Some(PathBuf::from(v));
        } else if let Some(v) = s
            .strip_prefix("-o")
            .filter(|v| !v.is_empty() && !s.starts_with("--"))
        {
            output = Some(PathBuf::from(v));
        } else {
            if s == "--emit-relocs" || s == "-q" {
                has_emit_relocs = true;
            }
            rest.push(a.clone());
        }
        i += 1;
    }
    let output = output.context("no output file (-o) on the linker command line")?;
    Ok(LinkArgs {
        output,
        rest,
        has_emit_relocs,
    })
}

/// Expands `@file` response files (as GNU ld and lld do; rustc uses one when a command
/// line gets too long): whitespace-separated arguments, with `'`/`"` quoting and `\`.
pub fn expand_response_files(args: &[OsString]) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for a in args {
        let s = a.to_string_lossy();
        let Some(path) = s.strip_prefix('@') else {
            out.push(a.clone());
            continue;
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read response file {path}"))?;
        let (mut cur, mut quote, mut any) = (String::new(), None, false);
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                        any = true;
                    }
                }
                ('\'' | '"', None) => {
                    quote = Some(c);
                    any = true;
                }
                (c, Some(q)) if c == q => quote = None,
                (c, None) if c.is_whitespace() => {
                    if any {
                        out.push(std::mem::take(&mut cur).into());
                        any = false;
                    }
                }
                (c, _) => {
                    cur.push(c);
                    any = true;
                }
            }
        }
        if any {
            out.push(cur.into());
        }
    }
    Ok(out)
}

/// Whether a command line is not a final link `embed` should process: a partial link
/// (`-r`), a version query, or no output file. Those go to the real linker unchanged.
pub fn is_pass_through(args: &[OsString]) -> bool {
    let has = |f: &[&str]| args.iter().any(|a| f.iter().any(|x| a == *x));
    has(&[
        "-r",
        "--relocatable",
        "-Ur",
        "--version",
        "-v",
        "-V",
        "--help",
    ]) || parse_link_args(args).is_err()
}

/// Links, then embeds. Returns the embed report for the final output, or `None` for a
/// command line passed through to the real linker unchanged (see [`is_pass_through`]).
pub fn link(linker: &Linker, args: &[OsString]) -> Result<Option<EmbedReport>> {
    let args = expand_response_files(args)?;
    if is_pass_through(&args) {
        let mut cmd = linker.command()?;
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
            .with_context(|| format!("cannot run the linker ({linker:?})"))?;
        ensure!(status.success(), "the linker failed ({status})");
        return Ok(None);
    }
    let la = parse_link_args(&args)?;
    // Beside the output (by the user's, maybe relative, path; in the temporary
    // directory for a device, FIFO or stdout output); removed on error, on drop and on
    // SIGINT/SIGTERM/SIGHUP.
    let beside = match crate::output::Dest::resolve(&la.output)? {
        crate::output::Dest::Replace { target } => target,
        _ => std::env::temp_dir().join("out"),
    };
    let tmp = crate::output::TempFile::beside(&beside, ".ksites-link-")
        .map_err(crate::output::write_error(&la.output))?;
    let mut cmd = linker.command()?;
    cmd.args(&la.rest);
    if !la.has_emit_relocs {
        cmd.arg("--emit-relocs");
    }
    cmd.arg("-o").arg(tmp.path());
    let status = cmd
        .status()
        .with_context(|| format!("cannot run the linker ({linker:?}): {cmd:?}"))?;
    if !status.success() {
        bail!(
            "the linker failed ({status}); {} not written",
            la.output.display()
        );
    }
    ensure!(tmp.path().is_file(), "the linker produced no output");
    let report = embed_file(tmp.path(), &la.output).with_context(|| {
        format!(
            "embedding into {} failed; the output was not written",
            la.output.display()
        )
    })?;
    drop(tmp);
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
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
        assert!(parse_link_args(&os(&["a.o"])).is_err());
    }

    #[test]
    fn response_files_and_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let resp = dir.path().join("args");
        std::fs::write(&resp, "a.o \"b c.o\"\n-o out 'd e'\n").unwrap();
        let v =
            expand_response_files(&[OsString::from(format!("@{}", resp.display())), "-x".into()])
                .unwrap();
        assert_eq!(v, os(&["a.o", "b c.o", "-o", "out", "d e", "-x"]));
        assert!(is_pass_through(&os(&["--version"])));
        assert!(is_pass_through(&os(&["-r", "a.o", "-o", "x.o"])));
        assert!(is_pass_through(&os(&["a.o"])));
        assert!(!is_pass_through(&os(&["a.o", "-o", "x"])));
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
