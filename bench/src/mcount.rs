//! `ksites scan --calls-to __fentry__` against Debian's `recordmcount` (Linux 6.1) on a
//! corpus of real C objects compiled as Kbuild compiles a kernel with ftrace (`cargo
//! xtask bench` fetches and builds it; see `xtask/src/bench/mcount.rs`).
//!
//! * **Check.** For every object, the (section, offset) of each `__fentry__` call that
//!   recordmcount records in `__mcount_loc` (read back from its relocations: symbol value
//!   plus addend, in the symbol's section) must be exactly the sites `ksites scan` prints
//!   in the sections recordmcount records at all. recordmcount ignores calls in other
//!   executable sections (and turns them into NOPs); those sites are counted and reported
//!   separately, never silently dropped. recordmcount also records a relocation against
//!   `__fentry__` from any instruction, where `--calls-to` lists calls only: a
//!   `jmp __fentry__` (which compilers do not emit) would show here as a mismatch.
//! * **Timing.** Whole processes, one per object, as Kbuild runs them
//!   (`recordmcount OBJ`, or with `-w` when `RECORDMCOUNT_WARN` is set) against
//!   `ksites scan --calls-to __fentry__ OBJ > /dev/null`, each on its own fresh copy of
//!   the object (recordmcount rewrites its input in place; the copies are made untimed
//!   before each round). The two alternate object by object, in ABBA order across
//!   objects and rounds; the ratio is total ksites time / total recordmcount time per
//!   round, and the result the median over rounds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// The corpus: objects listed in `DIR/CORPUS` (one path relative to DIR per line).
#[derive(Debug)]
pub struct Corpus {
    /// The directory of the objects.
    pub dir: PathBuf,
    /// The objects, relative to `dir`.
    pub objects: Vec<PathBuf>,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// Reads the listing `cargo xtask bench` wrote.
pub fn load(dir: &Path) -> Result<Corpus, String> {
    let list = dir.join("CORPUS");
    let text = std::fs::read_to_string(&list).map_err(|e| {
        format!(
            "cannot read {} ({e}); run `cargo xtask bench`",
            list.display()
        )
    })?;
    let objects: Vec<PathBuf> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(PathBuf::from)
        .collect();
    let mut bytes = 0;
    for o in &objects {
        let p = dir.join(o);
        bytes += std::fs::metadata(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .len();
    }
    if objects.is_empty() {
        return Err(format!("{} lists no object", list.display()));
    }
    Ok(Corpus {
        dir: dir.to_path_buf(),
        objects,
        bytes,
    })
}

/// Whether recordmcount records the calls in this section (Linux 6.1,
/// `scripts/recordmcount.c`, `is_mcounted_section_name`); it turns calls in any other
/// section into NOPs instead.
pub fn recorded_section(name: &str) -> bool {
    name.starts_with(".text")
        || [
            ".init.text",
            ".ref.text",
            ".sched.text",
            ".spinlock.text",
            ".irqentry.text",
            ".softirqentry.text",
            ".kprobes.text",
            ".cpuidle.text",
        ]
        .contains(&name)
}

type Sites = BTreeSet<(String, u64)>;

/// The result of the check.
#[derive(Debug, Default)]
pub struct Check {
    /// `__fentry__` sites `ksites scan` found.
    pub sites: usize,
    /// Entries recordmcount wrote.
    pub recorded: usize,
    /// Sites in sections recordmcount does not record: (object, section, count).
    pub unrecorded: Vec<(String, String, usize)>,
    /// Every disagreement, one line each.
    pub mismatches: Vec<String>,
}

/// `ksites scan --calls-to __fentry__ OBJ`, parsed: (section, offset) of each call.
fn scan_sites(ksites: &Path, obj: &Path) -> Result<Sites, String> {
    let out = Command::new(ksites)
        .args(["scan", "--calls-to", "__fentry__"])
        .arg(obj)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ksites.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ksites scan {} failed ({}): {}",
            obj.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| e.to_string())?;
    let prefix = format!("{}: ", obj.display());
    let mut sites = Sites::new();
    for line in text.lines() {
        // `FILE: SECTION+0xOFFSET call (5 bytes) -> __fentry__` (scan.rs, `to_text`).
        let parsed = line
            .strip_prefix(&prefix)
            .filter(|rest| rest.ends_with(" -> __fentry__"))
            .and_then(|rest| rest.split_once(" call ("))
            .and_then(|(at, _)| at.rsplit_once("+0x"))
            .and_then(|(sec, off)| Some((sec.to_string(), u64::from_str_radix(off, 16).ok()?)));
        match parsed {
            Some(s) => {
                sites.insert(s);
            }
            None => return Err(format!("unexpected ksites scan line: {line}")),
        }
    }
    Ok(sites)
}

/// The sites recordmcount recorded in `obj`: each `__mcount_loc` relocation's symbol
/// section and value plus addend.
fn recorded_sites(obj: &Path) -> Result<(Sites, usize), String> {
    let data = std::fs::read(obj).map_err(|e| format!("{}: {e}", obj.display()))?;
    let elf = ElfFile64::<object::LittleEndian>::parse(&*data)
        .map_err(|e| format!("{}: {e}", obj.display()))?;
    let mut sites = Sites::new();
    let Some(sec) = elf.section_by_name("__mcount_loc") else {
        return Ok((sites, 0));
    };
    let mut n = 0;
    for (at, r) in sec.relocations() {
        n += 1;
        let bad = |what: &str| format!("{}: __mcount_loc+{at:#x}: {what}", obj.display());
        let RelocationTarget::Symbol(si) = r.target() else {
            return Err(bad("not a symbol relocation"));
        };
        if r.size() != 64 || r.has_implicit_addend() {
            return Err(bad("not a 64-bit RELA relocation"));
        }
        let sym = elf.symbol_by_index(si).map_err(|e| bad(&e.to_string()))?;
        let shndx = sym.section_index().ok_or_else(|| bad("undefined symbol"))?;
        let name = elf
            .section_by_index(shndx)
            .and_then(|s| s.name().map(str::to_string))
            .map_err(|e| bad(&e.to_string()))?;
        let off = sym
            .address()
            .checked_add_signed(r.addend())
            .ok_or_else(|| bad("offset overflows"))?;
        if !sites.insert((name, off)) {
            return Err(bad("recorded twice"));
        }
    }
    Ok((sites, n))
}

/// Runs both tools once on every object (recordmcount on a copy in `work`) and compares.
pub fn check(ksites: &Path, rmc: &Path, c: &Corpus, work: &Path) -> Result<Check, String> {
    let mut out = Check::default();
    for rel in &c.objects {
        let orig = c.dir.join(rel);
        let copy = work.join("check").join(rel);
        copy_fresh(&orig, &copy)?;
        let found = scan_sites(ksites, &orig)?;
        let o = Command::new(rmc)
            .arg(&copy)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", rmc.display()))?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() || !stderr.trim().is_empty() {
            out.mismatches.push(format!(
                "{}: recordmcount exited {}: {}",
                rel.display(),
                o.status,
                stderr.trim()
            ));
            continue;
        }
        let (recorded, n) = recorded_sites(&copy)?;
        out.sites += found.len();
        out.recorded += n;
        let (want, elsewhere): (Sites, Sites) =
            found.into_iter().partition(|(s, _)| recorded_section(s));
        for (sec, _) in &elsewhere {
            match out.unrecorded.last_mut() {
                Some((f, s, k)) if *f == rel.display().to_string() && s == sec => *k += 1,
                _ => out
                    .unrecorded
                    .push((rel.display().to_string(), sec.clone(), 1)),
            }
        }
        for (sec, off) in want.difference(&recorded) {
            out.mismatches.push(format!(
                "{}: {sec}+{off:#x}: found by ksites scan, not recorded by recordmcount",
                rel.display()
            ));
        }
        for (sec, off) in recorded.difference(&want) {
            out.mismatches.push(format!(
                "{}: {sec}+{off:#x}: recorded by recordmcount, not found by ksites scan",
                rel.display()
            ));
        }
    }
    Ok(out)
}

fn copy_fresh(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// One timed whole-process run; panics unless it succeeds.
fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let s = t.elapsed().as_secs_f64();
    assert!(st.success(), "{cmd:?} failed: {st}");
    s
}

/// Total seconds of one round.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// `recordmcount OBJ`, every object.
    pub recordmcount: f64,
    /// `ksites scan --calls-to __fentry__ OBJ`, every object.
    pub scan: f64,
    /// `true`, once per object: the cost of starting a process, for scale.
    pub start: f64,
}

/// The totals of each round.
pub fn time(ksites: &Path, rmc: &Path, c: &Corpus, work: &Path, rounds: usize) -> Vec<Round> {
    let mut out = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let (a, b) = (work.join("rmc"), work.join("scan"));
        for rel in &c.objects {
            for d in [&a, &b] {
                copy_fresh(&c.dir.join(rel), &d.join(rel)).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let mut t = Round {
            recordmcount: 0.0,
            scan: 0.0,
            start: 0.0,
        };
        for (i, rel) in c.objects.iter().enumerate() {
            let mut rc = Command::new(rmc);
            rc.arg(a.join(rel));
            let mut kc = Command::new(ksites);
            kc.args(["scan", "--calls-to", "__fentry__"])
                .arg(b.join(rel))
                .stdout(Stdio::null());
            if (r + i) % 2 == 0 {
                t.recordmcount += timed(&mut rc);
                t.scan += timed(&mut kc);
            } else {
                t.scan += timed(&mut kc);
                t.recordmcount += timed(&mut rc);
            }
            t.start += timed(&mut Command::new("true"));
        }
        out.push(t);
    }
    out
}

/// Everything the report shows.
#[derive(Debug)]
pub struct Outcome {
    /// Number of objects.
    pub objects: usize,
    /// Their total size.
    pub bytes: u64,
    /// The check.
    pub check: Check,
    /// The totals of each round.
    pub rounds: Vec<Round>,
}
