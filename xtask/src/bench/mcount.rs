//! The corpus of the recordmcount benchmark: real C libraries vendored by crates.io
//! crates (pinned versions), fetched with `cargo fetch` into cargo's cache, unpacked, and
//! compiled one object per source file the way Kbuild compiles a kernel with ftrace
//! (`-pg -mfentry`, no `-mrecord-mcount`: `__fentry__` calls and no `__mcount_loc`), into
//! `target/ksites-bench/mcount/obj/`. Built once; `obj/CORPUS` lists the objects and
//! records a key of everything below, so a change of sources or flags rebuilds it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

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

/// One vendored C library: which crate carries it, and how to compile its files.
#[derive(Debug)]
struct Source {
    krate: &'static str,
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
    flags: &'static [&'static str],
}

const SOURCES: &[Source] = &[
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

/// A key for everything that determines the corpus.
fn key() -> String {
    let text = format!("{SOURCES:?}{CFLAGS:?}");
    // FNV-1a, 64 bits: only to notice a change.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The listing of a built corpus: `dir/obj/CORPUS`.
pub(crate) fn listing(dir: &Path) -> PathBuf {
    dir.join("obj/CORPUS")
}

/// Makes sure the corpus is built in `dir` (`target/ksites-bench/mcount`); returns the
/// directory holding the objects and their listing.
pub(crate) fn prepare(dir: &Path) -> Result<PathBuf> {
    let obj = dir.join("obj");
    let list = listing(dir);
    let key = key();
    if let Ok(text) = std::fs::read_to_string(&list)
        && text.lines().next() == Some(&format!("# key {key}"))
    {
        return Ok(obj);
    }
    for tool in ["cargo", "tar", "gcc"] {
        if crate::install::find_on_path(tool).is_none() {
            bail!("`{tool}` is not on PATH (needed to fetch and build the corpus)");
        }
    }
    let crates = fetch(dir)?;
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&obj);
    std::fs::create_dir_all(&src)?;
    std::fs::create_dir_all(&obj)?;
    let mut jobs = Vec::new();
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
        let out = obj.join(s.krate);
        std::fs::create_dir_all(&out)?;
        for file in files(s, &root)? {
            let name = file.trim_end_matches(".c").replace('/', "_");
            let o = out.join(format!("{name}.o"));
            jobs.push((s, root.clone(), file, o));
        }
    }
    println!(
        "xtask: compiling the recordmcount corpus: {} files with gcc {}",
        jobs.len(),
        CFLAGS.join(" ")
    );
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                while let Some((s, root, file, o)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    let r = Command::new("gcc")
                        .args(CFLAGS)
                        .args(s.flags)
                        .arg("-c")
                        .arg(file)
                        .arg("-o")
                        .arg(o)
                        .current_dir(root)
                        .output();
                    let msg = match r {
                        Ok(out) if out.status.success() => continue,
                        Ok(out) => format!(
                            "gcc -c {file} ({}) failed: {}",
                            s.krate,
                            String::from_utf8_lossy(&out.stderr)
                        ),
                        Err(e) => format!("cannot run gcc: {e}"),
                    };
                    errors.lock().expect("no poisoning").push(msg);
                }
            });
        }
    });
    let errors = errors.into_inner().expect("no poisoning");
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    let mut text = format!("# key {key}\n");
    for (_, _, _, o) in &jobs {
        let rel = o.strip_prefix(&obj).expect("under obj");
        let _ = writeln!(text, "{}", rel.display());
    }
    std::fs::write(&list, text)?;
    Ok(obj)
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
        "# Generated by `cargo xtask bench`: only to fetch the corpus crates.\n\
         [package]\nname = \"ksites-mcount-corpus\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[workspace]\n\n[dependencies]\n",
    );
    for s in SOURCES {
        let _ = writeln!(manifest, "{} = \"={}\"", s.krate, s.version);
    }
    std::fs::write(fetch.join("Cargo.toml"), manifest)?;
    std::fs::write(fetch.join("src/lib.rs"), "")?;
    println!(
        "xtask: fetching the recordmcount corpus crates ({}) with cargo fetch",
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
        let root = std::env::temp_dir().join(format!("xtask-mcount-{}", std::process::id()));
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
    fn sources_are_pinned_and_kernel_like() {
        for s in SOURCES {
            assert!(
                s.version.split('+').next().unwrap().split('.').count() == 3,
                "{} {}: an exact version",
                s.krate,
                s.version
            );
        }
        // `__fentry__` calls, and no `__mcount_loc` from the compiler.
        assert!(CFLAGS.contains(&"-mfentry") && CFLAGS.contains(&"-pg"));
        assert!(!CFLAGS.iter().any(|f| f.contains("record-mcount")));
        assert_ne!(key(), "");
    }
}
