//! The ratio table: criterion's medians (from its `estimates.json` files), divided by the
//! baseline of each section, plus the paired re-measurements and the targets.

use std::fmt::Write as _;
use std::path::Path;

use crate::{calls, keys, module, patching, probes, tool};

/// Median and its 95% confidence interval, in nanoseconds per criterion iteration.
#[derive(Clone, Copy, Debug)]
struct Est {
    median: f64,
    lo: f64,
    hi: f64,
}

fn estimate(dir: &Path, group: &str, id: &str) -> Option<Est> {
    let p = dir.join(group).join(id).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    let m = &v["median"];
    Some(Est {
        median: m["point_estimate"].as_f64()?,
        lo: m["confidence_interval"]["lower_bound"].as_f64()?,
        hi: m["confidence_interval"]["upper_bound"].as_f64()?,
    })
}

fn fmt_time(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.2} ns")
    }
}

struct Section<'a> {
    title: &'a str,
    group: &'a str,
    unit: &'a str,
    per: f64,
    baseline: &'a str,
    baseline_label: &'a str,
    rows: Vec<(&'a str, &'a str)>,
}

fn section(out: &mut String, dir: &Path, s: &Section<'_>) -> Vec<(String, f64)> {
    let mut ratios = Vec::new();
    let _ = writeln!(out, "### {}\n", s.title);
    let _ = writeln!(
        out,
        "| variant | {} (median) | 95% CI | ratio to {} |",
        s.unit, s.baseline_label
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let base = estimate(dir, s.group, s.baseline);
    for &(id, label) in &s.rows {
        let Some(e) = estimate(dir, s.group, id) else {
            let _ = writeln!(out, "| {label} | (not measured) | | |");
            continue;
        };
        let ratio = base.map(|b| e.median / b.median);
        let _ = writeln!(
            out,
            "| {label} | {} | {} – {} | {} |",
            fmt_time(e.median / s.per),
            fmt_time(e.lo / s.per),
            fmt_time(e.hi / s.per),
            ratio.map_or("?".into(), |r| format!("{r:.3}"))
        );
        if let Some(r) = ratio {
            ratios.push((format!("{}/{}", s.group, id), r));
        }
    }
    out.push('\n');
    ratios
}

fn ratio(dir: &Path, group: &str, a: &str, b: &str) -> Option<f64> {
    Some(estimate(dir, group, a)?.median / estimate(dir, group, b)?.median)
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// CPU model, CPU count and kernel, for the table's header.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// Renders every section, the paired table and the targets as Markdown.
pub fn render(dir: &Path, tool_ran: bool, module_ran: bool, paired: &[(&str, Vec<f64>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {}\n", machine());
    section(
        &mut out,
        dir,
        &Section {
            title: "ifunc dispatch (one call of a popcnt implementation, in a loop)",
            group: "ifunc",
            unit: "time per call",
            per: calls::CALLS as f64,
            baseline: "direct",
            baseline_label: "direct call",
            rows: calls::VARIANTS.iter().map(|&(i, l, _)| (i, l)).collect(),
        },
    );
    section(
        &mut out,
        dir,
        &Section {
            title: "Disabled probes (per loop iteration: a multiply-add and the probe)",
            group: "probe_off",
            unit: "time per iteration",
            per: probes::ITERS as f64,
            baseline: "none",
            baseline_label: "no probe",
            rows: probes::OFF.iter().map(|&(i, l, _)| (i, l)).collect(),
        },
    );
    section(
        &mut out,
        dir,
        &Section {
            title: "Enabled probes (per loop iteration)",
            group: "probe_on",
            unit: "time per iteration",
            per: probes::ITERS as f64,
            baseline: "direct_handler",
            baseline_label: "direct handler call",
            rows: probes::ON.iter().map(|&(i, l, _)| (i, l)).collect(),
        },
    );
    section(
        &mut out,
        dir,
        &Section {
            title: "Enabled probe fired by 1, 2 and 4 threads at once (thread CPU time per \
                    loop iteration, each thread with its own CPU index)",
            group: "probe_scaling",
            unit: "CPU time per iteration",
            per: probes::ITERS as f64,
            baseline: "1",
            baseline_label: "1 thread",
            rows: vec![("1", "1 thread"), ("2", "2 threads"), ("4", "4 threads")],
        },
    );
    section(
        &mut out,
        dir,
        &Section {
            title: "Disabled static keys (per loop iteration: a multiply-add and the branch)",
            group: "key_off",
            unit: "time per iteration",
            per: probes::ITERS as f64,
            baseline: "none",
            baseline_label: "no branch",
            rows: keys::OFF.iter().map(|&(i, l, _)| (i, l)).collect(),
        },
    );
    section(
        &mut out,
        dir,
        &Section {
            title: "Enabled static keys (per loop iteration: a multiply-add and a call)",
            group: "key_on",
            unit: "time per iteration",
            per: probes::ITERS as f64,
            baseline: "atomic_on",
            baseline_label: "AtomicBool check (true) + call",
            rows: keys::ON.iter().map(|&(i, l, _)| (i, l)).collect(),
        },
    );
    let sites = patching::IFUNC_SITES;
    section(
        &mut out,
        dir,
        &Section {
            title: &format!("Boot patching of {sites} ifunc sites (fake text in a buffer)"),
            group: "patch",
            unit: "time per batch",
            per: 1.0,
            baseline: "plain_loop",
            baseline_label: "plain loop",
            rows: vec![
                (
                    "patch_ifuncs",
                    "patch_ifuncs (check, resolve, write, verify)",
                ),
                ("parse_and_patch", "Table::parse + patch_ifuncs"),
                (
                    "plain_loop",
                    "plain loop over the table writing the rel32s, no checks",
                ),
                (
                    "raw_stores",
                    "raw stores from a precomputed (address, rel32) array",
                ),
            ],
        },
    );
    let many = probes::MANY_SITES;
    section(
        &mut out,
        dir,
        &Section {
            title: &format!(
                "Enable + disable a probe with {many} sites (this program's text, mprotect around each batch)"
            ),
            group: "toggle",
            unit: "time per enable+disable",
            per: 1.0,
            baseline: "plain_loop",
            baseline_label: "plain loop",
            rows: vec![
                (
                    "batch_membarrier",
                    "probe::enable/disable, sync = membarrier(SYNC_CORE)",
                ),
                ("batch_cpuid", "probe::enable/disable, sync = cpuid"),
                (
                    "per_site_cpuid",
                    "int3 protocol per site, sync = cpuid (3 per site)",
                ),
                (
                    "plain_loop",
                    "plain loop of 5-byte stores, no checks, no sync",
                ),
            ],
        },
    );
    let n = keys::RETARGET_SITES;
    section(
        &mut out,
        dir,
        &Section {
            title: &format!(
                "Retarget an ifunc with {n} call sites (to B and back: two live batches) against \
                 a probe toggle of {many} sites (enable + disable), both sync = membarrier"
            ),
            group: "retarget",
            unit: "time per two batches",
            per: 1.0,
            baseline: "probe_toggle_10k",
            baseline_label: "probe enable + disable",
            rows: vec![
                ("retarget_10k", "retarget to B, then back to A"),
                ("probe_toggle_10k", "probe::enable + probe::disable"),
            ],
        },
    );
    if tool_ran {
        let n = tool::FUNCS * tool::CALLS_PER_FUNC;
        section(
            &mut out,
            dir,
            &Section {
                title: &format!(
                    "Build tool on a static image with {n} call relocations (wall clock, whole process)"
                ),
                group: "tool",
                unit: "time per run",
                per: 1.0,
                baseline: "objcopy",
                baseline_label: "objcopy --add-section",
                rows: vec![
                    ("embed", "ksites embed"),
                    ("scan", "ksites scan --calls-to 'tramp_*'"),
                    ("objcopy", "objcopy --add-section (same size as the table)"),
                ],
            },
        );
    }
    if module_ran {
        section(
            &mut out,
            dir,
            &Section {
                title: &format!(
                    "Loading a generated C module ({} functions; one preallocated buffer at {:#x})",
                    module::FUNCS,
                    module::MODULE_ADDR
                ),
                group: "module",
                unit: "time per load",
                per: 1.0,
                baseline: "copy",
                baseline_label: "copying the sections",
                rows: vec![
                    (
                        "check",
                        "module::check (lay out, resolve, relocate, validate the table)",
                    ),
                    (
                        "parse_relocs",
                        "object ELF parse + iterate every relocation, none applied",
                    ),
                    ("copy", "copy the SHF_ALLOC sections' bytes, nothing else"),
                ],
            },
        );
    }

    let _ = writeln!(
        out,
        "### Paired re-measurement (interleaved A/B rounds of 2,000 iterations; ratio A/B)\n\n\
         | pair | rounds | median | 10th–90th percentile | min – max |\n|---|---:|---:|---:|---:|"
    );
    for (name, r) in paired {
        let _ = writeln!(
            out,
            "| {name} | {} | {:.3} | {:.3} – {:.3} | {:.3} – {:.3} |",
            r.len(),
            median(r),
            quantile(r, 0.1),
            quantile(r, 0.9),
            quantile(r, 0.0),
            quantile(r, 1.0)
        );
    }
    out.push('\n');

    // Targets.
    let p = |name: &str| {
        paired
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| median(r))
    };
    let mut targets: Vec<(String, Option<f64>, f64)> = vec![
        (
            "patched / direct call ≤ 1.02 (criterion)".into(),
            ratio(dir, "ifunc", "patched", "direct"),
            1.02,
        ),
        (
            "patched / direct call ≤ 1.02 (paired)".into(),
            p("patched / direct"),
            1.02,
        ),
        (
            "patched / slot ≤ 0.98 (faster, beyond the 2% noise)".into(),
            ratio(dir, "ifunc", "patched", "slot"),
            0.98,
        ),
        (
            "patched / retpoline thunk ≤ 0.98".into(),
            ratio(dir, "ifunc", "patched", "retpoline"),
            0.98,
        ),
        (
            "patched / multiversion ≤ 1.02 (not slower, within noise)".into(),
            p("patched / multiversion"),
            1.02,
        ),
        (
            "disabled probe! / no probe ≤ 1.02 (criterion)".into(),
            ratio(dir, "probe_off", "ksites_off", "none"),
            1.02,
        ),
        (
            "disabled probe! / no probe ≤ 1.02 (paired)".into(),
            p("disabled probe! / no probe"),
            1.02,
        ),
        (
            "disabled probe! / probe crate ≤ 1.02".into(),
            p("disabled probe! / probe crate"),
            1.02,
        ),
        (
            "disabled probe! / AtomicBool ≤ 1.02".into(),
            p("disabled probe! / AtomicBool"),
            1.02,
        ),
        (
            "enabled probe! / direct handler call ≤ 2 (criterion)".into(),
            ratio(dir, "probe_on", "ksites_on", "direct_handler"),
            2.0,
        ),
        (
            "enabled probe! / direct handler call ≤ 2 (paired)".into(),
            p("enabled probe! / direct handler call"),
            2.0,
        ),
        (
            "enabled probe!, 4 threads / 1 thread (CPU time per fire) ≤ 1.2".into(),
            ratio(dir, "probe_scaling", "4", "1"),
            1.2,
        ),
        (
            "patch_ifuncs / plain loop ≤ 3".into(),
            ratio(dir, "patch", "patch_ifuncs", "plain_loop"),
            3.0,
        ),
        (
            "probe batch (membarrier) / plain loop ≤ 5".into(),
            ratio(dir, "toggle", "batch_membarrier", "plain_loop"),
            5.0,
        ),
        (
            "disabled static_branch_unlikely! / no branch ≤ 1.02 (paired)".into(),
            p("disabled static_branch_unlikely! / no branch"),
            1.02,
        ),
        (
            "enabled static_branch_unlikely! / AtomicBool ≤ 1.0 (paired)".into(),
            p("enabled static_branch_unlikely! / AtomicBool"),
            1.0,
        ),
    ];
    if tool_ran {
        targets.push((
            "ksites embed / objcopy --add-section ≤ 2".into(),
            ratio(dir, "tool", "embed", "objcopy"),
            2.0,
        ));
    }
    let _ = writeln!(
        out,
        "### Targets\n\n| target | measured | |\n|---|---:|---|"
    );
    for (name, v, limit) in targets {
        let (val, verdict) = match v {
            Some(v) => (format!("{v:.3}"), if v <= limit { "met" } else { "MISSED" }),
            None => ("?".into(), "not measured"),
        };
        let _ = writeln!(out, "| {name} | {val} | {verdict} |");
    }
    out
}

/// The recordmcount comparison (timed by [`crate::mcount`], not criterion).
pub fn render_mcount(m: &crate::mcount::Outcome) -> String {
    let mut out = String::new();
    let ratios: Vec<f64> = m.rounds.iter().map(|r| r.scan / r.recordmcount).collect();
    let net: Vec<f64> = m
        .rounds
        .iter()
        .map(|r| (r.scan - r.start) / (r.recordmcount - r.start))
        .collect();
    let rmc: Vec<f64> = m.rounds.iter().map(|r| r.recordmcount).collect();
    let ks: Vec<f64> = m.rounds.iter().map(|r| r.scan).collect();
    let start: Vec<f64> = m.rounds.iter().map(|r| r.start).collect();
    let c = &m.check;
    let _ = writeln!(
        out,
        "### `ksites scan --calls-to __fentry__` against recordmcount ({} real C objects, {} KiB, \
         {} `__fentry__` sites; one process per object, on fresh copies, alternating)\n",
        m.objects,
        m.bytes / 1024,
        c.sites
    );
    let _ = writeln!(
        out,
        "| tool | total per round (median of {}) | per object | ratio to recordmcount (median; min – max) |\n|---|---:|---:|---:|",
        m.rounds.len()
    );
    let per = m.objects as f64;
    let _ = writeln!(
        out,
        "| `ksites scan --calls-to __fentry__ OBJ` | {} | {} | {:.3} ({:.3} – {:.3}) |",
        fmt_time(median(&ks) * 1e9),
        fmt_time(median(&ks) * 1e9 / per),
        median(&ratios),
        quantile(&ratios, 0.0),
        quantile(&ratios, 1.0)
    );
    let _ = writeln!(
        out,
        "| `recordmcount OBJ` (Debian linux-kbuild-6.1) | {} | {} | 1 |",
        fmt_time(median(&rmc) * 1e9),
        fmt_time(median(&rmc) * 1e9 / per)
    );
    let _ = writeln!(
        out,
        "| `true` (starting a process, for scale) | {} | {} | {:.3} |\n",
        fmt_time(median(&start) * 1e9),
        fmt_time(median(&start) * 1e9 / per),
        median(&start) / median(&rmc)
    );
    let _ = writeln!(
        out,
        "Net of process start (each total minus `true`'s): ksites scan / recordmcount {:.3} \
         (median over rounds).\n",
        median(&net)
    );
    let unrecorded: usize = c.unrecorded.iter().map(|u| u.2).sum();
    let _ = writeln!(
        out,
        "Same sites: recordmcount recorded {} entries, ksites scan found {} sites, {} of them in \
         sections recordmcount does not record (it NOPs those calls); {} mismatches.\n",
        c.recorded,
        c.sites,
        unrecorded,
        c.mismatches.len()
    );
    let r = median(&ratios);
    let _ = writeln!(
        out,
        "Target: ksites scan / recordmcount ≤ 1.0: {:.3}, {}\n",
        r,
        if r <= 1.0 { "met" } else { "MISSED" }
    );
    out
}

/// Peak memory of the build tool on the 10^6-relocation image: `(label, bytes)` rows.
pub fn render_rss(rows: &[(&str, u64)], input: u64) -> String {
    let mut out = String::new();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let _ = writeln!(
        out,
        "### Peak memory (max RSS from wait4) on the {}-relocation image ({:.1} MiB)\n\n\
         | command | max RSS | RSS / input size |\n|---|---:|---:|",
        tool::FUNCS * tool::CALLS_PER_FUNC,
        mib(input)
    );
    for &(label, b) in rows {
        let _ = writeln!(
            out,
            "| {label} | {:.1} MiB | {:.2} |",
            mib(b),
            b as f64 / input as f64
        );
    }
    out.push('\n');
    for &(label, b) in rows.iter().filter(|r| r.0.starts_with("ksites")) {
        let r = b as f64 / input as f64;
        let _ = writeln!(
            out,
            "Target: {label} RSS ≤ 3 × input: {r:.2}, {}",
            if r <= 3.0 { "met" } else { "MISSED" }
        );
    }
    out.push('\n');
    out
}
