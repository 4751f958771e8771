//! `ksites-bench`: ksites side by side with the alternatives, in one criterion run.
//!
//! Built non-PIE with `--emit-relocs` and processed by `ksites embed` (`cargo xtask bench`
//! does all of it), this program patches its own ifunc calls at start with the host
//! poker, registers its probes, then measures:
//!
//! * ifunc dispatch ([`calls`]), probes ([`probes`]),
//! * patching 10^5 ifunc sites and toggling a probe with 10^4 sites ([`patching`]),
//! * `ksites embed`/`scan` against `objcopy` on an image with 10^6 relocations, and their
//!   peak memory ([`tool`]),
//! * `ksites scan --calls-to __fentry__` against `recordmcount` on real C objects
//!   ([`mcount`]),
//! * loading a generated C module (`module::check`) against copying its sections and
//!   against parsing it ([`module`]),
//!
//! then prints a table of ratios (and writes it as Markdown), plus a paired, interleaved
//! re-measurement of the close calls, whose spread shows the noise.
//!
//! ```text
//! ksites-bench [--quick] [--no-tool] [--out DIR] [--ksites PATH] [--filter REGEX]
//!              [--mcount CORPUS_DIR --recordmcount PATH]
//! ```

mod calls;
mod keys;
mod mcount;
mod module;
mod patching;
mod probes;
mod report;
mod tool;

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};

/// A benchmarked variant: id, row label, the function that runs one iteration.
pub type Variant = (&'static str, &'static str, fn(u64) -> u64);
/// A paired comparison: name, A, B.
type Pair = (&'static str, fn(u64) -> u64, fn(u64) -> u64);
use kernel_loader::{CpuFeatures, cell, host, patch, probe};

struct Options {
    quick: bool,
    tool: bool,
    out: PathBuf,
    ksites: Option<PathBuf>,
    filter: Option<String>,
    mcount: Option<PathBuf>,
    recordmcount: Option<PathBuf>,
}

impl Options {
    /// Whether a non-criterion measurement `id` passes `--filter`.
    fn wants(&self, id: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| {
            regex::Regex::new(f)
                .unwrap_or_else(|e| panic!("--filter: {e}"))
                .is_match(id)
        })
    }
}

fn options() -> Options {
    let mut o = Options {
        quick: false,
        tool: true,
        out: PathBuf::from("target/ksites-bench"),
        ksites: std::env::var_os("KSITES_BIN").map(PathBuf::from),
        filter: None,
        mcount: None,
        recordmcount: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-tool" => o.tool = false,
            "--out" => o.out = args.next().expect("--out DIR").into(),
            "--ksites" => o.ksites = Some(args.next().expect("--ksites PATH").into()),
            "--filter" => o.filter = Some(args.next().expect("--filter REGEX")),
            "--mcount" => o.mcount = Some(args.next().expect("--mcount DIR").into()),
            "--recordmcount" => {
                o.recordmcount = Some(args.next().expect("--recordmcount PATH").into())
            }
            // What `cargo bench`-style runners pass; ignored.
            "--bench" => {}
            other => {
                eprintln!(
                    "usage: ksites-bench [--quick] [--no-tool] [--out DIR] [--ksites PATH] [--filter REGEX]"
                );
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    o
}

/// Patches this program and registers its probes; returns the ids of `bench:on` and
/// `bench:many`.
fn patch_self(poker: &mut host::HostPoker) -> (probe::ProbeId, probe::ProbeId) {
    let exec = host::exec_ranges();
    // SAFETY: `cargo xtask bench` ran `ksites embed` on this binary; nothing writes the
    // table.
    let table = unsafe { cell::image_table(&exec) }.unwrap_or_else(|e| {
        eprintln!("ksites-bench: {e} (run it through `cargo xtask bench`)");
        std::process::exit(2)
    });
    // SAFETY: the table describes this image; only this thread runs.
    let r = unsafe { patch::init(&table, &exec, &CpuFeatures::detect(), poker) }
        .unwrap_or_else(|e| panic!("patch::init: {e}"));
    println!(
        "ksites-bench: patched {} ifunc sites ({} ifuncs, {} out of reach)",
        r.sites_patched, r.ifuncs, r.sites_out_of_reach
    );
    probe::register_image(table, poker).expect("register probes");
    // The SIGTRAP hook is the #BP route `probe::enable` requires (it declares it).
    assert!(host::install_int3_handler(), "install the SIGTRAP hook");
    let on = probe::lookup("bench:on").expect("bench:on");
    let many = probe::lookup("bench:many").expect("bench:many");
    // SAFETY: this thread is the only one; the host poker writes this program's text.
    unsafe { probe::enable(on, probes::handler, poker) }.expect("enable bench:on");
    (on, many)
}

fn micro(g: &mut BenchmarkGroup<'_, WallTime>, variants: &[Variant], expect: Option<u64>) {
    for &(id, _, f) in variants {
        if let Some(want) = expect {
            assert_eq!(f(0x1234), want, "{id} computes something else");
        }
        g.bench_function(id, |b| b.iter(|| f(black_box(0x1234_5678_9abc_def0))));
    }
}

/// One A/B pair measured in interleaved rounds (ABBA order): the per-round ratios.
///
/// Each side is timed in this thread's CPU time, so a round in which the thread was
/// descheduled (other tenants, other builds) is not charged for the time it waited.
fn paired(a: fn(u64) -> u64, b: fn(u64) -> u64, rounds: usize, inner: u64) -> Vec<f64> {
    let time = |f: fn(u64) -> u64| {
        let t = probes::thread_cpu_time();
        for i in 0..inner {
            black_box(f(black_box(i)));
        }
        (probes::thread_cpu_time() - t).as_secs_f64()
    };
    for _ in 0..3 {
        time(a);
        time(b);
    }
    let mut ratios = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let (ta, tb) = if r % 2 == 0 {
            let ta = time(a);
            (ta, time(b))
        } else {
            let tb = time(b);
            (time(a), tb)
        };
        ratios.push(ta / tb);
    }
    ratios
}

fn main() {
    let o = options();
    assert!(
        is_x86_feature_detected!("popcnt"),
        "the dispatch benchmarks need a CPU with POPCNT"
    );
    let mut poker = host::HostPoker::new();
    let (_on, many) = patch_self(&mut poker);
    probes::use_cpu_index();
    keys::setup(&mut poker);
    calls::setup();
    probes::run_many(1);

    let (warm, measure) = if o.quick {
        (Duration::from_millis(200), Duration::from_millis(500))
    } else {
        (Duration::from_millis(500), Duration::from_millis(1500))
    };
    let crit_dir = o.out.join("criterion");
    if o.filter.is_none() {
        // A full run: no figure of an earlier run may leak into the table.
        let _ = std::fs::remove_dir_all(&crit_dir);
    }
    let mut c = Criterion::default()
        .output_directory(&crit_dir)
        .warm_up_time(warm)
        .measurement_time(measure)
        .sample_size(50)
        .without_plots();
    if let Some(f) = &o.filter {
        c = c.with_filter(f.as_str());
    }

    let expect = calls::direct(0x1234);
    micro(
        &mut c.benchmark_group("ifunc"),
        calls::VARIANTS,
        Some(expect),
    );
    let expect = probes::none(0x1234);
    micro(
        &mut c.benchmark_group("probe_off"),
        probes::OFF,
        Some(expect),
    );
    micro(&mut c.benchmark_group("probe_on"), probes::ON, Some(expect));
    probes::bench_scaling(&mut c);
    micro(&mut c.benchmark_group("key_off"), keys::OFF, Some(expect));
    // The enabled-key loops compute the same value (the branch calls, it returns nothing).
    micro(&mut c.benchmark_group("key_on"), keys::ON, Some(expect));

    {
        let mut img = patching::FakeImage::new();
        let mut g = c.benchmark_group("patch");
        g.sample_size(20);
        g.bench_function("patch_ifuncs", |b| {
            b.iter_custom(|n| patching::time_patch(&mut img, n))
        });
        g.bench_function("parse_and_patch", |b| {
            b.iter_custom(|n| patching::time_parse_and_patch(&mut img, n))
        });
        g.bench_function("plain_loop", |b| {
            b.iter_custom(|n| patching::time_plain_table(&mut img, n))
        });
        g.bench_function("raw_stores", |b| {
            b.iter_custom(|n| patching::time_plain(&mut img, n))
        });
        g.finish();
    }

    {
        let exec = host::exec_ranges();
        // SAFETY: as in `patch_self`.
        let table = unsafe { cell::image_table(&exec) }.expect("table");
        let sites = patching::many_sites(&table, many);
        assert_eq!(sites.len(), probes::MANY_SITES);
        let mut g = c.benchmark_group("toggle");
        g.sample_size(10);
        g.bench_function("batch_membarrier", |b| {
            b.iter(|| patching::toggle_batched(many, &mut poker))
        });
        let mut cp = patching::CpuidPoker(host::HostPoker::new());
        g.bench_function("batch_cpuid", |b| {
            b.iter(|| patching::toggle_batched(many, &mut cp))
        });
        g.bench_function("per_site_cpuid", |b| {
            b.iter(|| patching::toggle_per_site(&sites, &mut cp))
        });
        g.bench_function("plain_loop", |b| {
            b.iter(|| patching::toggle_plain(&sites, &mut cp.0))
        });
        g.finish();
        if o.wants("retarget/") {
            keys::bench_retarget(&mut c, many, &mut poker);
        }
        // Still a working probe: enable, fire every site once, disable.
        let before = probe::info(many).expect("info").hits;
        // SAFETY: as in `patch_self`.
        unsafe { probe::enable(many, probes::handler, &mut poker) }.expect("enable");
        probes::run_many(2);
        // SAFETY: as above.
        unsafe { probe::disable(many, &mut poker) }.expect("disable");
        let hits = probe::info(many).expect("info").hits - before;
        assert_eq!(
            hits as usize,
            probes::MANY_SITES,
            "every toggled site fires"
        );
    }

    let mut tool_ran = false;
    let mut extra = String::new();
    if o.tool {
        match o.ksites.as_deref() {
            None => {
                println!("ksites-bench: no --ksites/KSITES_BIN: skipping the build-tool benchmarks")
            }
            Some(ksites) => {
                let t = Instant::now();
                let inputs = tool::generate(&o.out.join("tool"));
                println!(
                    "ksites-bench: generated {} ({} bytes) in {:.1} s",
                    inputs.image.display(),
                    std::fs::metadata(&inputs.image).map_or(0, |m| m.len()),
                    t.elapsed().as_secs_f64()
                );
                let mut g = c.benchmark_group("tool");
                g.sample_size(10);
                g.warm_up_time(Duration::from_millis(100));
                g.measurement_time(Duration::from_secs(if o.quick { 3 } else { 8 }));
                g.bench_function("embed", |b| b.iter(|| tool::embed(ksites, &inputs)));
                g.bench_function("scan", |b| b.iter(|| tool::scan(ksites, &inputs)));
                g.bench_function("objcopy", |b| b.iter(|| tool::objcopy(&inputs)));
                g.finish();
                tool_ran = true;
                if o.wants("rss/embed") || o.wants("rss/scan") {
                    let rows = tool::peak_rss_rows(ksites, &inputs, 3);
                    let size = std::fs::metadata(&inputs.image).map_or(0, |m| m.len());
                    extra.push_str(&report::render_rss(&rows, size));
                }
            }
        }
    }
    let module_ran = match (o.ksites.as_deref(), module_inputs(&o)) {
        (None, _) => {
            println!("ksites-bench: no --ksites/KSITES_BIN: skipping the module benchmarks");
            false
        }
        (Some(_), Err(e)) => {
            println!(
                "ksites-bench: cannot build the benchmark module ({e}): skipping the module benchmarks"
            );
            false
        }
        (Some(_), Ok(input)) => {
            bench_module(&mut c, &input);
            true
        }
    };
    if o.tool && o.wants("mcount/scan") {
        extra.push_str(&bench_mcount(&o));
    }
    c.final_summary();

    // Paired, interleaved re-measurement of the pairs whose ratio is close to 1, and of
    // the enabled probe (whose criterion figure drifts with the machine's load). With
    // `--filter`, the pairs whose group (`paired/<group>`) it matches.
    let rounds = if o.quick { 101 } else { 401 };
    let pairs: [(&str, Pair); 10] = [
        ("ifunc", ("patched / direct", calls::patched, calls::direct)),
        ("ifunc", ("patched / slot", calls::patched, calls::via_slot)),
        (
            "ifunc",
            (
                "patched / multiversion",
                calls::patched,
                calls::multiversion,
            ),
        ),
        (
            "probe_off",
            (
                "disabled probe! / no probe",
                probes::ksites_off,
                probes::none,
            ),
        ),
        (
            "probe_off",
            (
                "disabled probe! / AtomicBool",
                probes::ksites_off,
                probes::atomic_bool,
            ),
        ),
        (
            "probe_off",
            (
                "disabled probe! / probe crate",
                probes::ksites_off,
                probes::sdt_crate,
            ),
        ),
        (
            "probe_on",
            (
                "enabled probe! / direct handler call",
                probes::ksites_on,
                probes::direct_handler,
            ),
        ),
        (
            "key_off",
            (
                "disabled static_branch_unlikely! / no branch",
                keys::key_off,
                probes::none,
            ),
        ),
        (
            "key_on",
            (
                "enabled static_branch_unlikely! / AtomicBool",
                keys::key_on,
                keys::atomic_on,
            ),
        ),
        (
            "key_on",
            (
                "enabled static_branch_likely! / AtomicBool",
                keys::key_on_likely,
                keys::atomic_on,
            ),
        ),
    ];
    let paired: Vec<(&str, Vec<f64>)> = pairs
        .iter()
        .filter(|(group, _)| o.wants(&format!("paired/{group}")))
        .map(|&(_, (name, a, b))| (name, paired(a, b, rounds, 2_000)))
        .collect();

    let mut text = report::render(&crit_dir, tool_ran, module_ran, &paired);
    if !extra.is_empty() {
        text.push('\n');
        text.push_str(&extra);
    }
    println!("\n{text}");
    std::fs::create_dir_all(&o.out).expect("create the output directory");
    let md = o.out.join("ratios.md");
    std::fs::write(&md, &text).expect("write ratios.md");
    println!("ksites-bench: wrote {}", md.display());
}

/// Generates and embeds the benchmark module (`Err`: no ksites, or gcc failed).
fn module_inputs(o: &Options) -> Result<module::Input, String> {
    let ksites = o.ksites.as_deref().ok_or("no ksites")?;
    let t = Instant::now();
    let input = module::generate(&o.out.join("module"), ksites)?;
    println!(
        "ksites-bench: generated {} ({} bytes, {} relocations) in {:.1} s",
        input.path.display(),
        input.bytes.len(),
        input.relocations,
        t.elapsed().as_secs_f64()
    );
    Ok(input)
}

/// The `module` group: `module::check` against copying the sections and parsing.
fn bench_module(c: &mut Criterion, input: &module::Input) {
    let kernel = module::FakeKernel::new();
    let k = kernel.kernel();
    let copies = module::copies(&input.bytes);
    let mut arena = module::Arena::new((2 * copies.size + (1 << 20)).next_multiple_of(4096));
    let r = module::check(&input.bytes, &k, &mut arena);
    println!(
        "ksites-bench: module: {} KiB text, {} KiB read-only, {} KiB data; {} relocations applied, \
         {} kernel symbols; {} imported ifuncs, {} own; {} ifunc sites; {} probes, {} probe sites",
        r.text_size / 1024,
        r.ro_size / 1024,
        r.rw_size / 1024,
        r.relocations,
        r.kernel_symbols,
        r.imports,
        r.ifuncs,
        r.sites,
        r.probes,
        r.probe_sites
    );
    let mut g = c.benchmark_group("module");
    g.sample_size(30);
    g.bench_function("check", |b| {
        b.iter(|| module::check(black_box(&input.bytes), &k, &mut arena))
    });
    g.bench_function("parse_relocs", |b| {
        b.iter(|| module::walk_relocations(black_box(&input.bytes)))
    });
    g.bench_function("copy", |b| {
        b.iter(|| module::copy(black_box(&input.bytes), &copies, arena.bytes_mut()))
    });
    g.finish();
}

/// `ksites scan` against recordmcount on the corpus: the check (exits on a mismatch),
/// then the timing; returns the report section.
fn bench_mcount(o: &Options) -> String {
    let (Some(ksites), Some(dir), Some(rmc)) = (&o.ksites, &o.mcount, &o.recordmcount) else {
        let why = "no --ksites, --mcount or --recordmcount (`cargo xtask bench` passes them when \
                   it could build the corpus and install recordmcount; see its messages)";
        println!("ksites-bench: skipping the recordmcount benchmark: {why}");
        return format!("### `ksites scan` against recordmcount\n\n(not measured: {why})\n\n");
    };
    let corpus = mcount::load(dir).unwrap_or_else(|e| panic!("recordmcount corpus: {e}"));
    let work = o.out.join("mcount/work");
    let _ = std::fs::remove_dir_all(&work);
    let t = Instant::now();
    let check = mcount::check(ksites, rmc, &corpus, &work).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "ksites-bench: mcount check: {} objects, {} sites found by ksites scan, {} recorded by \
         recordmcount, {} mismatches ({:.1} s)",
        corpus.objects.len(),
        check.sites,
        check.recorded,
        check.mismatches.len(),
        t.elapsed().as_secs_f64()
    );
    for (f, s, n) in &check.unrecorded {
        println!("ksites-bench: mcount: {f}: {n} sites in {s}, which recordmcount does not record");
    }
    if !check.mismatches.is_empty() {
        for m in &check.mismatches {
            eprintln!("ksites-bench: MISMATCH: {m}");
        }
        eprintln!(
            "ksites-bench: ksites scan and recordmcount disagree on {} sites",
            check.mismatches.len()
        );
        std::process::exit(1);
    }
    let rounds = if o.quick { 3 } else { 7 };
    let t = Instant::now();
    let timed = mcount::time(ksites, rmc, &corpus, &work, rounds);
    println!(
        "ksites-bench: mcount timing: {rounds} rounds in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
    report::render_mcount(&mcount::Outcome {
        objects: corpus.objects.len(),
        bytes: corpus.bytes,
        check,
        rounds: timed,
    })
}
