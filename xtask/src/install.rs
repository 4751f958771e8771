//! Install what a fresh machine lacks, and say so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

/// Make sure `rustup` has `target` installed for the toolchain used in the shell's directory.
pub(crate) fn rust_target(sh: &Shell, target: &str) -> Result<()> {
    if find_on_path("rustup").is_none() {
        // A toolchain without rustup: look in the sysroot instead.
        let sysroot = cmd!(sh, "rustc --print sysroot").quiet().read()?;
        let dir = PathBuf::from(sysroot.trim())
            .join("lib/rustlib")
            .join(target);
        if !dir.is_dir() {
            bail!("Rust target {target} is not installed and rustup is not on PATH to add it");
        }
        return Ok(());
    }
    let installed = cmd!(sh, "rustup target list --installed")
        .quiet()
        .read()
        .context("listing installed Rust targets")?;
    if !installed.lines().any(|l| l.trim() == target) {
        println!("xtask: installing Rust target {target} (rustup target add)");
        cmd!(sh, "rustup target add {target}").run()?;
    }
    Ok(())
}

/// Make sure the rustup component (`rustfmt`, `clippy`) is installed.
pub(crate) fn rust_component(sh: &Shell, component: &str) -> Result<()> {
    if find_on_path("rustup").is_none() {
        // Nothing we can install; the cargo subcommand itself will fail clearly if missing.
        return Ok(());
    }
    let installed = cmd!(sh, "rustup component list --installed")
        .quiet()
        .read()
        .context("listing installed rustup components")?;
    if !has_component(&installed, component) {
        println!("xtask: installing Rust component {component} (rustup component add)");
        cmd!(sh, "rustup component add {component}").run()?;
    }
    Ok(())
}

/// `apt-get update` runs at most once per xtask run.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Make sure `program` is on PATH; install Debian/Ubuntu `package` with apt-get when
/// running as root, else fail with a message naming the package.
pub(crate) fn host_tool(sh: &Shell, program: &str, package: &str) -> Result<()> {
    if find_on_path(program).is_some() {
        return Ok(());
    }
    apt_install(sh, &format!("`{program}` is not on PATH"), package)?;
    if find_on_path(program).is_none() {
        bail!("installed package {package}, but `{program}` is still not on PATH");
    }
    Ok(())
}

/// Make sure the file `path` (a program outside PATH, such as Debian's
/// `/usr/lib/linux-kbuild-6.1/scripts/recordmcount`) exists; install Debian `package`
/// with apt-get when running as root, else fail with a message naming the package.
pub(crate) fn debian_file(sh: &Shell, path: &Path, package: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    apt_install(sh, &format!("{} does not exist", path.display()), package)?;
    if !path.is_file() {
        bail!(
            "installed package {package}, but {} still does not exist",
            path.display()
        );
    }
    Ok(())
}

/// `apt-get install -y package` (after one `apt-get update` per run) when running as
/// root on a system with apt-get; else an error saying `missing` and what to install.
fn apt_install(sh: &Shell, missing: &str, package: &str) -> Result<()> {
    let is_root = cmd!(sh, "id -u")
        .quiet()
        .ignore_stderr()
        .read()
        .is_ok_and(|uid| uid.trim() == "0");
    if !is_root || find_on_path("apt-get").is_none() {
        bail!(
            "{missing}. Install it and rerun: on Debian/Ubuntu \
             `sudo apt-get install {package}`, elsewhere your distribution's equivalent package"
        );
    }
    println!("xtask: {missing}; installing package {package} with apt-get");
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    if !APT_UPDATED.swap(true, Ordering::Relaxed) {
        cmd!(sh, "apt-get update")
            .run()
            .context("apt-get update failed")?;
    }
    cmd!(sh, "apt-get install -y {package}")
        .run()
        .with_context(|| format!("apt-get install {package} failed"))
}

/// The first executable file named `program` in `$PATH`.
pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &std::path::Path) -> bool {
    path.is_file()
}

/// Whether `rustup component list --installed` output lists `component`
/// (lines look like `clippy-x86_64-unknown-linux-gnu`).
fn has_component(installed: &str, component: &str) -> bool {
    installed.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                    rust-std-x86_64-unknown-none\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "clippy"));
        assert!(!has_component(list, "rustfmt"));
        assert!(has_component(
            &format!("{list}rustfmt-x86_64-unknown-linux-gnu"),
            "rustfmt"
        ));
        assert!(!has_component(list, "rust-src"));
    }

    #[test]
    fn path_lookup() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("surely-no-such-program-xtask").is_none());
    }
}
