//! The corpus of the recordmcount benchmark: the C corpus ([`crate::corpus`]) compiled
//! one object per source file the way Kbuild compiles a kernel with ftrace (`-pg
//! -mfentry`, no `-mrecord-mcount`: `__fentry__` calls and no `__mcount_loc`), into
//! `target/ksites-bench/mcount/obj/`. Built once; `obj/CORPUS` lists the objects and
//! records a key of the sources and flags, so a change of either rebuilds it.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::corpus;

/// Where Debian's `linux-kbuild-6.1` puts the C recordmcount.
pub(crate) const RECORDMCOUNT: &str = "/usr/lib/linux-kbuild-6.1/scripts/recordmcount";
/// The package that ships it.
pub(crate) const RECORDMCOUNT_PACKAGE: &str = "linux-kbuild-6.1";

/// What Kbuild passes for an x86-64 kernel object with `CONFIG_FUNCTION_TRACER` and
/// without `-mrecord-mcount`, reduced to what matters for code shape; `-w` because these
/// are user-space libraries built freestanding.
const CFLAGS: &[&str] = &[
    "-O2",
    "-pg",
    "-mfentry",
    "-mno-red-zone",
    "-fno-pic",
    "-mcmodel=kernel",
    "-ffreestanding",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-asynchronous-unwind-tables",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-w",
];

/// The corpus key: the sources and these flags (as before the corpus was shared).
fn key() -> String {
    corpus::key(&format!("{CFLAGS:?}"))
}

/// Makes sure the corpus is built in `dir` (`target/ksites-bench/mcount`); returns the
/// directory holding the objects and their listing.
pub(crate) fn prepare(dir: &Path) -> Result<PathBuf> {
    let obj = dir.join("obj");
    let key = key();
    if corpus::cached(dir, &key).is_some() {
        return Ok(obj);
    }
    if crate::install::find_on_path("gcc").is_none() {
        bail!("`gcc` is not on PATH (needed to build the corpus)");
    }
    let units = corpus::unpack(dir)?;
    let _ = std::fs::remove_dir_all(&obj);
    std::fs::create_dir_all(&obj)?;
    println!(
        "xtask: compiling the recordmcount corpus: {} files with gcc {}",
        units.len(),
        CFLAGS.join(" ")
    );
    corpus::parallel(&units, |u| {
        let out = u.compile("gcc", CFLAGS, &obj.join(u.object()))?;
        if !out.status.success() {
            bail!("{}", u.failed("gcc", &out));
        }
        Ok(())
    })?;
    let lines: Vec<String> = units.iter().map(corpus::Unit::object).collect();
    corpus::write_listing(dir, &key, &lines)?;
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_kernel_like() {
        // `__fentry__` calls, and no `__mcount_loc` from the compiler.
        assert!(CFLAGS.contains(&"-mfentry") && CFLAGS.contains(&"-pg"));
        assert!(!CFLAGS.iter().any(|f| f.contains("record-mcount")));
        assert_ne!(key(), "");
    }
}
