//! `cargo xtask example`: build `examples/minimal-kernel` the way its README says (the
//! build tool's `ksites-ld` on PATH, `cargo build --release` in the example), check it
//! is a PIE, and boot it on `qemu64` and `max`.
//!
//! Each run must pass as the test kernel's do ([`judge::judge`]: exit status 33, an
//! `N passed, 0 failed` line, no `FAIL`/`FAULT`/`PANIC`), report a choice for each of the
//! example's ifuncs, and the two models must choose differently for at least one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use xshell::{Shell, cmd};

use crate::judge::{self, Exit};
use crate::{host, install};

/// The example, relative to the project root.
pub(crate) const DIR: &str = "examples/minimal-kernel";
/// The CPU models it boots on.
const MODELS: [&str; 2] = ["qemu64", "max"];
/// The ifuncs it declares (suffixes of their names in `ifunc-choice` lines).
const IFUNCS: [&str; 2] = ["::popcount", "::byte_sum"];
/// Seconds one run may take (it takes about one).
const TIMEOUT_SECS: u64 = 60;
/// `e_type` of a position-independent executable.
const ET_DYN: u16 = 3;

/// Builds and boots the example; returns its passed checks summed over the models.
pub(crate) fn run(sh: &Shell, root: &Path) -> Result<u32> {
    let kernel = build(sh, root)?;
    let elf = std::fs::read(&kernel).with_context(|| format!("reading {}", kernel.display()))?;
    let e_type = elf_type(&elf).with_context(|| format!("{} is not an ELF", kernel.display()))?;
    ensure!(
        e_type == ET_DYN,
        "{} has e_type {e_type}, expected ET_DYN (a PIE: the target's default)",
        kernel.display()
    );
    println!("xtask: {} is ET_DYN (PIE)", kernel.display());
    let ksites = root.join("target/release/ksites");
    cmd!(sh, "{ksites} verify {kernel}").run()?;

    install::host_tool(sh, "qemu-system-x86_64", "qemu-system-x86")?;
    let mut passed = 0;
    let mut choices = Vec::new();
    for model in MODELS {
        let (exit, serial) = boot(model, &kernel)?;
        let verdict = judge::judge(&exit, &serial);
        ensure!(
            verdict.ok(),
            "[example/{model}] failed: {}",
            verdict.problems.join("; ")
        );
        let chosen = judge::parse_choices(&serial);
        for suffix in IFUNCS {
            ensure!(
                chosen.keys().any(|name| name.ends_with(suffix)),
                "[example/{model}] no `ifunc-choice …{suffix} …` line"
            );
        }
        println!("xtask: [example/{model}] passed ({exit})");
        passed += verdict.passed.unwrap_or(0);
        choices.push(chosen);
    }
    let differ = choices_differ(&choices[0], &choices[1]);
    ensure!(
        !differ.is_empty(),
        "the example's ifuncs chose the same on {} and {}: {:?}",
        MODELS[0],
        MODELS[1],
        choices[0]
    );
    println!(
        "xtask: example: {} differ between {} and {}",
        differ.join(", "),
        MODELS[0],
        MODELS[1]
    );
    Ok(passed)
}

/// The build tool, then the example with the tool's directory first on PATH (as if
/// `cargo install --path build-tool` had put `ksites-ld` there). Returns the kernel.
fn build(sh: &Shell, root: &Path) -> Result<PathBuf> {
    let ksites = host::build_tool(sh, root)?;
    let dir = root.join(DIR);
    let _dir = sh.push_dir(&dir);
    install::rust_target(sh, "x86_64-unknown-none")?;
    let bin = ksites.parent().context("the build tool has a directory")?;
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let _path = sh.push_env("PATH", path);
    println!("xtask: in {DIR}, with {} first on PATH", bin.display());
    cmd!(sh, "cargo build --release")
        .run()
        .context("building examples/minimal-kernel failed")?;
    Ok(dir.join("target/x86_64-unknown-none/release/minimal-kernel"))
}

/// An ELF file's `e_type`, if it is an ELF file.
fn elf_type(bytes: &[u8]) -> Option<u16> {
    (bytes.get(..4)? == b"\x7fELF").then_some(())?;
    Some(u16::from_le_bytes(bytes.get(16..18)?.try_into().ok()?))
}

/// The ifuncs both runs reported with different implementations.
fn choices_differ(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    a.iter()
        .filter(|(name, choice)| b.get(*name).is_some_and(|other| other != *choice))
        .map(|(name, choice)| format!("{name} ({choice} / {})", b[name]))
        .collect()
}

/// Boots `kernel` on `model` (under `timeout`, so a hung kernel ends) and returns how
/// QEMU ended and the serial lines, which it also prints.
fn boot(model: &str, kernel: &Path) -> Result<(Exit, Vec<String>)> {
    let mut qemu = Command::new("timeout");
    qemu.arg(TIMEOUT_SECS.to_string())
        .args([
            "qemu-system-x86_64",
            "-cpu",
            model,
            "-m",
            "128M",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-monitor", "none"])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
        ])
        .arg(kernel);
    println!("$ {qemu:?}");
    let out = qemu.output().context("running QEMU (through `timeout`)")?;
    let serial: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect();
    for line in &serial {
        println!("[example/{model}] {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        eprintln!("[example/{model}] {line}");
    }
    let exit = match out.status.code() {
        Some(124) => Exit::Timeout(TIMEOUT_SECS),
        Some(code) => Exit::Code(code),
        None => Exit::Signal,
    };
    Ok((exit, serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_types() {
        let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0".to_vec();
        assert_eq!(elf_type(&elf), Some(ET_DYN));
        elf[16] = 2;
        assert_eq!(elf_type(&elf), Some(2));
        assert_eq!(elf_type(b"\x7fELF"), None);
        assert_eq!(elf_type(b"MZ\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x03\0"), None);
    }

    #[test]
    fn choices_must_differ_somewhere() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| ((*a).into(), (*b).into()))
                .collect()
        };
        let qemu64 = map(&[("k::popcount", "soft"), ("k::byte_sum", "scalar")]);
        let max = map(&[("k::popcount", "popcnt"), ("k::byte_sum", "scalar")]);
        assert_eq!(
            choices_differ(&qemu64, &max),
            ["k::popcount (soft / popcnt)"]
        );
        assert!(choices_differ(&qemu64, &qemu64).is_empty());
        assert!(choices_differ(&qemu64, &BTreeMap::new()).is_empty());
    }
}
