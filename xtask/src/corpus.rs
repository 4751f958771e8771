//! The C corpus: real C libraries vendored by crates.io crates (pinned versions), fetched
//! with `cargo fetch` into cargo's cache, unpacked, and compiled one object per source
//! file. Shared by the recordmcount benchmark (`bench::mcount`: x86-64, `-pg -mfentry`)
//! and the module checks (`corpus_modules`, per architecture: `aarch64-linux-gnu-gcc`,
//! `riscv64-linux-gnu-gcc`, kernel-like flags). Each user compiles into its own
//! directory and keeps a listing, `obj/CORPUS`, whose first line records a key of the
//! sources and flags, so a change rebuilds it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

/// One vendored C library: which crate carries it, and how to compile its files.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) krate: &'static str,
    version: &'static str,
    /// Directory (inside the unpacked crate) the paths below are relative to; gcc runs there.
    root: &'static str,
    /// Every `*.c` in these directories...
    dirs: &'static [&'static str],
    /// ... except those whose file stem contains one of these...
    skip: &'static [&'static str],
    /// ... plus these files.
    files: &'static [&'static str],
    /// `-I`, `-D` and other flags.
    pub(crate) flags: &'static [&'static str],
}

pub(crate) const SOURCES: &[Source] = &[
    Source {
        krate: "lua-src",
        version: "551.1.0",
        root: "lua-5.4.9",
        dirs: &["."],
        skip: &[],
        files: &[],
        flags: &[],
    },
    Source {
        krate: "zstd-sys",
        version: "2.1.3+zstd.1.5.7",
        root: "zstd/lib",
        dirs: &[
            "common",
            "compress",
            "decompress",
            "dictBuilder",
            "deprecated",
            "legacy",
        ],
        skip: &[],
        files: &[],
        flags: &[
            "-I.",
            "-Icommon",
            "-Ilegacy",
            "-DZSTD_DISABLE_ASM",
            "-DZSTD_LEGACY_SUPPORT=1",
        ],
    },
    Source {
        krate: "lzma-sys",
        version: "0.1.20",
        root: ".",
        dirs: &[
            "xz-5.2/src/liblzma/common",
            "xz-5.2/src/liblzma/lzma",
            "xz-5.2/src/liblzma/lz",
            "xz-5.2/src/liblzma/check",
            "xz-5.2/src/liblzma/delta",
            "xz-5.2/src/liblzma/rangecoder",
            "xz-5.2/src/liblzma/simple",
        ],
        // As lzma-sys's build script: the small CRC variants and the table generators
        // are alternatives to other files.
        skip: &["crc32_small", "crc64_small", "tablegen"],
        files: &[
            "xz-5.2/src/common/tuklib_cpucores.c",
            "xz-5.2/src/common/tuklib_physmem.c",
        ],
        flags: &[
            "-std=c99",
            "-DHAVE_CONFIG_H=1",
            "-I.",
            "-Ixz-5.2/src/liblzma/api",
            "-Ixz-5.2/src/liblzma/lzma",
            "-Ixz-5.2/src/liblzma/lz",
            "-Ixz-5.2/src/liblzma/check",
            "-Ixz-5.2/src/liblzma/simple",
            "-Ixz-5.2/src/liblzma/delta",
            "-Ixz-5.2/src/liblzma/common",
            "-Ixz-5.2/src/liblzma/rangecoder",
            "-Ixz-5.2/src/common",
        ],
    },
    Source {
        krate: "libz-sys",
        version: "1.1.33",
        root: "src/zlib",
        dirs: &["."],
        skip: &[],
        files: &[],
        flags: &["-I."],
    },
    Source {
        krate: "bzip2-sys",
        version: "0.1.13+1.0.8",
        root: "bzip2-1.0.8",
        dirs: &[],
        skip: &[],
        files: &[
            "blocksort.c",
            "huffman.c",
            "crctable.c",
            "randtable.c",
            "compress.c",
            "decompress.c",
            "bzlib.c",
        ],
        flags: &["-I."],
    },
    Source {
        krate: "lcms2-sys",
        version: "4.0.7",
        root: "vendor",
        dirs: &["src"],
        skip: &[],
        files: &[],
        flags: &["-Iinclude", "-Isrc"],
    },
    Source {
        krate: "libdeflate-sys",
        version: "1.26.1",
        root: "libdeflate",
        dirs: &["lib", "lib/x86"],
        skip: &[],
        files: &[],
        flags: &["-I."],
    },
    Source {
        krate: "libwebp-sys",
        version: "0.14.4",
        root: "vendor",
        dirs: &[
            "sharpyuv",
            "src/dec",
            "src/demux",
            "src/dsp",
            "src/enc",
            "src/mux",
            "src/utils",
        ],
        // Other architectures' DSP files (empty on x86-64).
        skip: &["_neon", "_mips32", "_mips_dsp_r2", "_msa"],
        files: &[],
        flags: &["-I."],
    },
];

/// A key for the sources and `extra` (the compiler and flags): only to notice a change.
pub(crate) fn key(extra: &str) -> String {
    let text = format!("{SOURCES:?}{extra}");
    // FNV-1a, 64 bits.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The listing of a corpus built in `dir`: `dir/obj/CORPUS`.
pub(crate) fn listing(dir: &Path) -> PathBuf {
    dir.join("obj/CORPUS")
}

/// The lines of `dir`'s listing after its key line, if it was written with `key`.
pub(crate) fn cached(dir: &Path, key: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(listing(dir)).ok()?;
    let mut lines = text.lines();
    (lines.next()? == format!("# key {key}")).then(|| lines.map(str::to_string).collect())
}

/// Writes `dir`'s listing: the key line, then `lines`.
pub(crate) fn write_listing(dir: &Path, key: &str, lines: &[String]) -> Result<()> {
    let mut text = format!("# key {key}\n");
    for l in lines {
        let _ = writeln!(text, "{l}");
    }
    let list = listing(dir);
    std::fs::write(&list, text).with_context(|| format!("cannot write {}", list.display()))
}

/// One C file of the corpus, unpacked.
#[derive(Debug)]
pub(crate) struct Unit {
    /// Its library.
    pub(crate) source: &'static Source,
    /// The directory gcc runs in.
    pub(crate) root: PathBuf,
    /// The file, relative to `root`.
    pub(crate) file: String,
}

impl Unit {
    /// The object's path below the object directory: `CRATE/PATH_WITH_UNDERSCORES.o`.
    pub(crate) fn object(&self) -> String {
        let name = self.file.trim_end_matches(".c").replace('/', "_");
        format!("{}/{name}.o", self.source.krate)
    }

    /// Runs `cc FLAGS SOURCE-FLAGS -c FILE -o OUT` in the unit's directory (creating
    /// OUT's directory); returns gcc's output, whether or not it succeeded.
    pub(crate) fn compile(&self, cc: &str, flags: &[&str], out: &Path) -> Result<Output> {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Command::new(cc)
            .args(flags)
            .args(self.source.flags)
            .arg("-c")
            .arg(&self.file)
            .arg("-o")
            .arg(out)
            .current_dir(&self.root)
            .output()
            .with_context(|| format!("cannot run {cc}"))
    }

    /// What failed, for an error message.
    pub(crate) fn failed(&self, cc: &str, out: &Output) -> String {
        format!(
            "{cc} -c {} ({}) failed ({}): {}",
            self.file,
            self.source.krate,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Fetches the pinned crates (unless cargo's cache has them), unpacks them afresh into
/// `dir/src`, and returns every C file of the corpus, in `SOURCES` order, each library's
/// sorted.
pub(crate) fn unpack(dir: &Path) -> Result<Vec<Unit>> {
    for tool in ["cargo", "tar"] {
        if crate::install::find_on_path(tool).is_none() {
            bail!("`{tool}` is not on PATH (needed to fetch the C corpus)");
        }
    }
    let crates = fetch(dir)?;
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let mut units = Vec::new();
    for (s, krate) in SOURCES.iter().zip(&crates) {
        let st = Command::new("tar")
            .arg("xzf")
            .arg(krate)
            .arg("-C")
            .arg(&src)
            .status()
            .context("cannot run tar")?;
        if !st.success() {
            bail!("tar xzf {} failed ({st})", krate.display());
        }
        let root = src.join(format!("{}-{}", s.krate, s.version)).join(s.root);
        for file in files(s, &root)? {
            units.push(Unit {
                source: s,
                root: root.clone(),
                file,
            });
        }
    }
    Ok(units)
}

/// Runs `f` on every item, on as many threads as there are CPUs; returns the results in
/// the items' order, or every error (one per line).
pub(crate) fn parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(items.len()));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    results.lock().expect("no poisoning").push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("no poisoning");
    results.sort_by_key(|(i, _)| *i);
    let mut ok = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (_, r) in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(ok)
}

/// The sources of `s` under `root`, relative to it, sorted.
fn files(s: &Source, root: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = s.files.iter().map(|f| f.to_string()).collect();
    for d in s.dirs {
        let entries =
            std::fs::read_dir(root.join(d)).with_context(|| format!("{}/{d}", root.display()))?;
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".c") else {
                continue;
            };
            if s.skip.iter().any(|k| stem.contains(k)) {
                continue;
            }
            out.push(if *d == "." {
                name
            } else {
                format!("{d}/{name}")
            });
        }
    }
    out.sort();
    Ok(out)
}

/// `cargo fetch` of a throwaway crate depending on the pinned crates (unless cargo's
/// cache has them all); returns the path of each `.crate` file, in `SOURCES` order.
fn fetch(dir: &Path) -> Result<Vec<PathBuf>> {
    let cache = cargo_home()?.join("registry/cache");
    let find = || -> Option<Vec<PathBuf>> {
        let regs: Vec<PathBuf> = std::fs::read_dir(&cache)
            .ok()?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        SOURCES
            .iter()
            .map(|s| {
                let name = format!("{}-{}.crate", s.krate, s.version);
                regs.iter().map(|r| r.join(&name)).find(|p| p.is_file())
            })
            .collect()
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    let fetch = dir.join("fetch");
    std::fs::create_dir_all(fetch.join("src"))?;
    let mut manifest = String::from(
        "# Generated by `cargo xtask`: only to fetch the C corpus crates.\n\
         [package]\nname = \"ksites-mcount-corpus\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[workspace]\n\n[dependencies]\n",
    );
    for s in SOURCES {
        let _ = writeln!(manifest, "{} = \"={}\"", s.krate, s.version);
    }
    std::fs::write(fetch.join("Cargo.toml"), manifest)?;
    std::fs::write(fetch.join("src/lib.rs"), "")?;
    println!(
        "xtask: fetching the C corpus crates ({}) with cargo fetch",
        SOURCES
            .iter()
            .map(|s| format!("{} {}", s.krate, s.version))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let st = Command::new("cargo")
        .arg("fetch")
        .arg("--manifest-path")
        .arg(fetch.join("Cargo.toml"))
        .status()
        .context("cannot run cargo fetch")?;
    if !st.success() {
        bail!("cargo fetch of the corpus crates failed ({st}); is crates.io reachable?");
    }
    find().with_context(|| {
        format!(
            "cargo fetch succeeded but the .crate files are not under {}",
            cache.display()
        )
    })
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Ok(h.into());
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_selection() {
        let root = std::env::temp_dir().join(format!("xtask-corpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        for f in ["a/y.c", "a/x.c", "a/x_neon.c", "a/x.h", "top.c"] {
            std::fs::write(root.join(f), "").unwrap();
        }
        let s = Source {
            krate: "k",
            version: "1.0.0",
            root: ".",
            dirs: &["a", "."],
            skip: &["_neon"],
            files: &["extra/z.c"],
            flags: &[],
        };
        let got = files(&s, &root).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(got, ["a/x.c", "a/y.c", "extra/z.c", "top.c"]);
    }

    #[test]
    fn sources_are_pinned() {
        for s in SOURCES {
            assert!(
                s.version.split('+').next().unwrap().split('.').count() == 3,
                "{} {}: an exact version",
                s.krate,
                s.version
            );
        }
        assert_ne!(key("a"), key("b"));
    }

    #[test]
    fn parallel_keeps_order_and_reports_every_error() {
        let items: Vec<u32> = (0..50).collect();
        assert_eq!(
            parallel(&items, |i| Ok(i * 2)).unwrap(),
            (0..50).map(|i| i * 2).collect::<Vec<_>>()
        );
        let e = parallel(&items, |i| {
            if i % 10 == 3 {
                bail!("item {i}")
            }
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "item 3\nitem 13\nitem 23\nitem 33\nitem 43");
    }
}
