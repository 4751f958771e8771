//! `cargo xtask qemu --arch riscv64`: build the riscv64 test kernel and boot it on
//! `qemu-system-riscv64 -M virt -bios default` (OpenSBI) on each run label, and judge
//! the runs.
//!
//! The kernel (`qemu-tests/kernel/src/arch/riscv64/`) is linked through `ksites-ld`
//! (rust-lld, then `ksites embed` into the `.ksites` slot its linker script reserves),
//! as the other kernels are; the build tool is built first. Before booting, the image is
//! `ksites verify`-ed, its `ksites inspect` printed, and its sites cross-checked
//! against `riscv64-linux-gnu-objdump -dr` (`crosscheck`: counts, addresses and forms).
//! The kernel is built twice: as configured, rustc emits no R_RISCV_RELAX, so the link
//! relaxes nothing and every site stays an `auipc`+`jalr` pair (relaxation off); and
//! with `-C target-feature=+relax` ([`RELAXED_RUSTFLAGS`], in its own target
//! directory), so rust-lld turns the calls in reach into `jal`/`c.j` (relaxation on).
//! The relaxed image must have such sites, the plain one none ([`check_forms`]); it
//! boots once more as run `MODEL/relaxed` (one CPU, [`RELAXED_RUN`]) under the same
//! judge. Every run's `init:` line must account for every site, and only relaxed sites
//! may be out of reach ([`check_init`]). The kernel enters in
//! S-mode at 0x8020_0000 and exits through QEMU's `sifive_test` device with the x86_64 kernel's statuses (33 =
//! success, 35 = failure), so [`judge::judge`] applies unchanged; on top, every run must
//! pass every platform test ([`REQUIRED_TESTS`]), the shared ifunc, probe, module (and
//! on SMP runs SMP) tests the aarch64 kernel runs too (the lists of `qemu_aarch64`,
//! without aarch64's far-module tests: [`shared_tests_for`]) and bring the expected
//! harts online, and `riscv64-rv64` and `riscv64-rv64-zbb` must report different CPU
//! features (Zbb and at least one more, from the device tree:
//! [`check_features_differ`]) and choose different implementations for the ifuncs of
//! [`MUST_DIFFER`].
//!
//! Run labels are `riscv64-MODEL[-smpN]`, where MODEL names a CPU set-up
//! ([`cpu_option`]): `rv64` is RV64GC with the bit-manipulation (Zba/Zbb/Zbc/Zbs) and
//! scalar crypto extensions turned off, `rv64-zbb` turns Zba/Zbb/Zbc/Zbs on, `max` is
//! QEMU's `max` CPU, or, on a QEMU without one (7.2), `rv64` with every extension of
//! [`MAX_EXTENSIONS`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::crosscheck;
use crate::install;
use crate::judge;
use crate::modules;
use crate::qemu::{self, Arch, QemuArgs, Run};
use crate::qemu_aarch64::{self, parse_features};

/// The Rust target of the riscv64 kernel.
pub(crate) const TARGET: &str = "riscv64gc-unknown-none-elf";
/// The runs booted when `--cpu` names none.
pub(crate) const DEFAULT_RUNS: &[&str] = &["riscv64-rv64", "riscv64-rv64-zbb", "riscv64-max-smp4"];
const PREFIX: &str = "riscv64-";
/// The OpenSBI firmware QEMU's `-bios default` loads (Debian's `opensbi` package).
const OPENSBI: &str = "/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin";

/// `-cpu` of the `rv64` model: RV64GC without the B and K extensions QEMU's `rv64` may
/// turn on by default (7.2 enables Zba/Zbb/Zbc/Zbs).
const RV64_BASE: &str = "rv64,zba=false,zbb=false,zbc=false,zbs=false,zbkb=false,\
                         zbkc=false,zbkx=false,zknd=false,zkne=false,zknh=false,v=false";
/// `-cpu` of the `rv64-zbb` model: the four bit-manipulation extensions on.
const RV64_ZBB: &str = "rv64,zba=true,zbb=true,zbc=true,zbs=true";
/// What `max` turns on when QEMU has no `max` CPU: B, the vector extension (1.0) and
/// the NIST scalar crypto suite.
pub(crate) const MAX_EXTENSIONS: &str =
    "zba=true,zbb=true,zbc=true,zbs=true,v=true,vext_spec=v1.0,zkn=true";

/// The platform tests every riscv64 run must pass.
pub(crate) const REQUIRED_TESTS: &[&str] = &[
    "riscv64_fp_state_enabled",
    "riscv64_device_tree_read",
    "riscv64_cpu_features_match_device_tree",
    "riscv64_text_is_not_writable",
    "riscv64_data_is_not_executable",
    "riscv64_fence_i_makes_new_code_visible",
    "riscv64_ebreak_is_trapped_and_resumed",
    "riscv64_traps_preserve_fp_state",
    "riscv64_secondary_harts_start",
    "riscv64_ipi_reaches_every_hart",
    "riscv64_jobs_run_on_every_hart_with_paging",
    "riscv64_live_patch_seen_by_every_hart",
];

/// The ifuncs `rv64` and `rv64-zbb` must resolve differently: `popcount` (`cpop`, Zbb,
/// vs a table) and `crc32c` (`clmul`, Zbc, vs a table).
pub(crate) const MUST_DIFFER: &[&str] = &["kfuncs::popcount", "kfuncs::crc32c"];

/// The shared tests (`qemu-tests/kernel/src/shared/`) a run with `cpus` CPUs must pass:
/// the aarch64 kernel's ifunc, probe (with SMP or its skip line) and module lists,
/// less the far-module tests (riscv64 has no module block out of direct call reach).
pub(crate) fn shared_tests_for(cpus: u32) -> Vec<&'static str> {
    let smp_modules: &[&str] = if cpus > 1 {
        qemu_aarch64::SMP_MODULE_TESTS
    } else {
        &[]
    };
    qemu_aarch64::IFUNC_TESTS
        .iter()
        .copied()
        .chain(qemu_aarch64::probe_tests_for(cpus))
        .chain(
            qemu_aarch64::MODULE_TESTS
                .iter()
                .copied()
                .filter(|t| !t.starts_with("module_far_")),
        )
        .chain(smp_modules.iter().copied())
        .collect()
}

/// Run labels, or `None` to skip the architecture.
pub(crate) type Runs = Option<Vec<String>>;

/// Takes the riscv64 runs out of `--arch`/`--cpu`: returns them (`None`: riscv64 is
/// skipped) and the arguments left for x86_64 and aarch64 (`None`: both are skipped).
/// Without `--cpu`, riscv64 boots [`DEFAULT_RUNS`] unless `--arch` leaves it out. With
/// `--cpu`, labels starting with `riscv64-` are its runs (with `--arch riscv64` alone,
/// every label is).
pub(crate) fn split_runs(args: &QemuArgs) -> Result<(Runs, Option<QemuArgs>)> {
    let explicit = !args.arches.is_empty();
    let wants = !explicit || args.arches.contains(&Arch::Riscv64);
    let other_arches: Vec<Arch> = args
        .arches
        .iter()
        .copied()
        .filter(|&a| a != Arch::Riscv64)
        .collect();
    let others_wanted = !explicit || !other_arches.is_empty();
    let rest = |cpus: Vec<String>| QemuArgs {
        arches: other_arches.clone(),
        cpus,
        ..args.clone()
    };
    if args.cpus.is_empty() {
        let runs = DEFAULT_RUNS.iter().map(|r| (*r).to_owned()).collect();
        return Ok((
            wants.then_some(runs),
            others_wanted.then(|| rest(Vec::new())),
        ));
    }
    let only_riscv64 = explicit && other_arches.is_empty();
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for label in &args.cpus {
        if label.starts_with(PREFIX) {
            mine.push(label.clone());
        } else if only_riscv64 {
            mine.push(format!("{PREFIX}{label}"));
        } else {
            theirs.push(label.clone());
        }
    }
    let runs = match (wants, mine.is_empty()) {
        (true, false) => Some(mine),
        (false, false) => bail!("--cpu {} is not a run of the selected --arch", mine[0]),
        (true, true) if explicit => {
            bail!("--arch riscv64 is selected but no --cpu names one of its runs")
        }
        _ => None,
    };
    let others = if theirs.is_empty() && !(explicit && others_wanted) {
        None
    } else {
        Some(rest(theirs))
    };
    Ok((runs, others))
}

/// The kernel image cargo builds.
pub(crate) fn kernel_path(root: &Path) -> PathBuf {
    root.join("qemu-tests/target")
        .join(TARGET)
        .join("release/qemu-tests-kernel")
}

/// The cargo target directory (under `qemu-tests/`) of the relaxed kernel: its own, so
/// the two builds' different RUSTFLAGS do not rebuild each other.
const RELAXED_TARGET_DIR: &str = "target/relaxed";
/// What the relaxed kernel is compiled with: rustc then marks every call with
/// R_RISCV_RELAX (the target's default is `-relax`), and rust-lld relaxes the calls in
/// reach into `jal`/`c.j`. The C probe file stays `-mno-relax` (kernel/build.rs does
/// not pass rustflags to gcc).
const RELAXED_RUSTFLAGS: (&str, &str) = (
    "CARGO_TARGET_RISCV64GC_UNKNOWN_NONE_ELF_RUSTFLAGS",
    "-C target-feature=+relax",
);
/// The run label the relaxed kernel boots on unless `--cpu` names runs (then the
/// first one's model, on one CPU).
const RELAXED_RUN: &str = "riscv64-rv64-zbb";

/// The relaxed kernel image (see [`RELAXED_RUSTFLAGS`]).
pub(crate) fn relaxed_kernel_path(root: &Path) -> PathBuf {
    root.join("qemu-tests")
        .join(RELAXED_TARGET_DIR)
        .join(TARGET)
        .join("release/qemu-tests-kernel")
}

/// Installs what is missing, builds the kernel (unless `--no-build`) and boots `labels`;
/// returns the tests passed, summed over the runs.
pub(crate) fn run(sh: &Shell, root: &Path, labels: &[String], args: &QemuArgs) -> Result<u32> {
    let qemu_tests = root.join("qemu-tests");
    install_tools(sh, &qemu_tests)?;
    if args.no_build {
        println!("xtask: --no-build: using the existing riscv64 test kernel");
    } else {
        {
            // `ksites-ld` (qemu-tests/.cargo/config.toml) is the linker.
            let _dir = sh.push_dir(root);
            cmd!(sh, "cargo build --release -p build-tool")
                .run()
                .context("building the build tool (build-tool) failed")?;
        }
        // The test modules first: the kernel includes them (kernel/build.rs).
        let ksites = root.join("target/release/ksites");
        let module_dir = modules::build_riscv64(sh, root, &ksites)?;
        let _modules = sh.push_env(modules::RISCV64_MODULE_DIR_ENV, &module_dir);
        let _dir = sh.push_dir(&qemu_tests);
        cmd!(sh, "cargo build --release -p qemu-tests --target {TARGET}")
            .run()
            .context("building the riscv64 test kernel failed")?;
        // The same kernel compiled for linker relaxation (cargo appends these flags to
        // the config's), in its own target directory.
        let _relax = sh.push_env(RELAXED_RUSTFLAGS.0, RELAXED_RUSTFLAGS.1);
        cmd!(
            sh,
            "cargo build --release -p qemu-tests --target {TARGET} --target-dir {RELAXED_TARGET_DIR}"
        )
        .run()
        .context("building the relaxed riscv64 test kernel failed")?;
    }
    let image = kernel_path(root);
    let relaxed = relaxed_kernel_path(root);
    for (what, path) in [("", &image), ("relaxed ", &relaxed)] {
        if !path.is_file() {
            bail!(
                "the {what}riscv64 test kernel is missing: {} (build it, or drop --no-build)",
                path.display()
            );
        }
    }
    let plain = check_image(sh, root, &image, false)?;
    let relaxed_sites = check_image(sh, root, &relaxed, true)?;
    let has_max = qemu_has_max_cpu();
    let timeout = Duration::from_secs(args.timeout);
    let passed = boot_all(&image, labels, timeout, has_max, &plain)?;
    let model = match labels.first() {
        Some(first) if !args.cpus.is_empty() => first.as_str(),
        _ => RELAXED_RUN,
    };
    Ok(passed + boot_relaxed(&relaxed, model, timeout, has_max, &relaxed_sites)?)
}

/// What the cross-check learnt of an image's ifunc sites, for judging its boot line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sites {
    /// Every ifunc site of the table.
    pub(crate) total: usize,
    /// Of them, the `jal` and `c.j` ones (relaxed by the linker).
    pub(crate) relaxed: usize,
}

/// `ksites verify` the kernel, print its `ksites inspect`, and check every ifunc's site
/// count equals `riscv64-linux-gnu-objdump -dr`'s calls and tail calls to its
/// trampoline, and every listed site is one of them ([`crosscheck::site_forms`]); print
/// the table with the sites by form. Linked with relaxation (`relaxed`), the image must
/// have relaxed (`jal`/`c.j`) sites, or it shows nothing the plain link does not;
/// without, every site must be a pair.
fn check_image(sh: &Shell, root: &Path, image: &Path, relaxed: bool) -> Result<Sites> {
    let ksites = root.join("target/release/ksites");
    cmd!(sh, "{ksites} verify {image}")
        .run()
        .with_context(|| format!("ksites verify failed on {}", image.display()))?;
    let inspect = cmd!(sh, "{ksites} inspect {image}")
        .read()
        .context("ksites inspect failed")?;
    println!("{inspect}");
    let objdump = cmd!(
        sh,
        "riscv64-linux-gnu-objdump -dr --no-show-raw-insn {image}"
    )
    .read()
    .context("riscv64-linux-gnu-objdump failed")?;
    let ifuncs = crosscheck::parse_inspect(&inspect).map_err(|e| anyhow::anyhow!(e))?;
    let sites = crosscheck::parse_inspect_sites(&inspect).map_err(|e| anyhow::anyhow!(e))?;
    let rows = crosscheck::compare(&ifuncs, &crosscheck::count_branch_relocs(&objdump));
    let forms = crosscheck::site_forms(&ifuncs, &sites, &crosscheck::riscv64_calls(&objdump));
    let link = if relaxed {
        "relaxation on: +relax, rust-lld relaxes"
    } else {
        "relaxation off: no R_RISCV_RELAX"
    };
    println!(
        "xtask: riscv64-linux-gnu-objdump cross-check of {} ({link})",
        image.display()
    );
    let empty = BTreeMap::new();
    print!(
        "{}",
        crosscheck::render_forms(&rows, forms.as_ref().unwrap_or(&empty))
    );
    crosscheck::check(&rows).map_err(|e| anyhow::anyhow!("objdump cross-check failed: {e}"))?;
    let forms = forms.map_err(|e| anyhow::anyhow!("objdump cross-check failed: {e}"))?;
    let total = crosscheck::FormCounts {
        pair: forms.values().map(|f| f.pair).sum(),
        jal: forms.values().map(|f| f.jal).sum(),
        c_j: forms.values().map(|f| f.c_j).sum(),
    };
    check_forms(relaxed, &total).map_err(|e| anyhow::anyhow!("{}: {e}", image.display()))?;
    println!(
        "xtask: {} sites: {} auipc+jalr pairs, {} jal, {} c.j",
        sites.len(),
        total.pair,
        total.jal,
        total.c_j
    );
    Ok(Sites {
        total: sites.len(),
        relaxed: total.relaxed(),
    })
}

/// A relaxed link must show relaxed sites; a plain one none.
fn check_forms(relaxed: bool, total: &crosscheck::FormCounts) -> Result<(), String> {
    match (relaxed, total.relaxed()) {
        (true, 0) => Err(format!(
            "linked with relaxation, yet no ifunc site is a `jal` or `c.j` ({} pairs): \
             the relaxed run would prove nothing",
            total.pair
        )),
        (false, n @ 1..) => Err(format!(
            "linked without R_RISCV_RELAX, yet {n} ifunc sites are `jal`/`c.j` ({} jal, {} c.j)",
            total.jal, total.c_j
        )),
        _ => Ok(()),
    }
}

/// The numbers of the kernel's `init: I ifuncs resolved, P sites patched, R out of
/// reach, …` line: (P, R).
fn parse_init(serial: &[String]) -> Option<(usize, usize)> {
    serial.iter().find_map(|line| {
        let rest = line.trim_end().strip_prefix("init: ")?;
        let (_, rest) = rest.split_once(" ifuncs resolved, ")?;
        let (patched, rest) = rest.split_once(" sites patched, ")?;
        let (out, _) = rest.split_once(" out of reach")?;
        Some((patched.parse().ok()?, out.parse().ok()?))
    })
}

/// The boot line must account for every site of the table (patched, or out of reach
/// and left on the trampoline), and only a relaxed site (`jal` ±1 MiB, `c.j` ±2 KiB)
/// can be out of reach: a pair reaches ±2 GiB, beyond the whole kernel. Returns the
/// line's summary.
fn check_init(serial: &[String], sites: &Sites) -> Result<String, String> {
    let Some((patched, out)) = parse_init(serial) else {
        return Err("no `init: … sites patched, … out of reach` line".to_owned());
    };
    if patched + out != sites.total {
        return Err(format!(
            "init: {patched} sites patched + {out} out of reach, but the table has {} sites",
            sites.total
        ));
    }
    if out > sites.relaxed {
        return Err(format!(
            "init: {out} sites out of reach, but only {} are relaxed (jal/c.j)",
            sites.relaxed
        ));
    }
    Ok(format!(
        "{patched} sites patched + {out} out of reach (on the trampoline) = {} sites, \
         {} of them relaxed",
        sites.total, sites.relaxed
    ))
}

/// Boots the relaxed kernel once, on one CPU of `label`'s model, as run
/// `MODEL/relaxed`, and judges it as [`boot_all`] judges a run.
fn boot_relaxed(
    image: &Path,
    label: &str,
    timeout: Duration,
    has_max: bool,
    sites: &Sites,
) -> Result<u32> {
    let model = qemu::split_label(label).0;
    let label = format!("{model}/relaxed");
    let (exit, serial) = qemu::boot(&label, qemu_command(model, image, has_max), timeout)?;
    let mut verdict = judge::judge(&exit, &serial);
    verdict
        .problems
        .extend(judge::check_required_tests(&serial, REQUIRED_TESTS));
    verdict
        .problems
        .extend(judge::check_required_tests(&serial, &shared_tests_for(1)));
    verdict
        .problems
        .extend(judge::check_cpus_online(&serial, 1));
    match check_init(&serial, sites) {
        Ok(line) => println!("xtask: [{label}] {line}"),
        Err(e) => verdict.problems.push(e),
    }
    if !verdict.ok() {
        bail!(
            "[{label}] the relaxed kernel failed: {}",
            verdict.problems.join("; ")
        );
    }
    println!("xtask: [{label}] passed ({exit})");
    Ok(verdict.passed.unwrap_or(0))
}

/// `rustup target add riscv64gc-unknown-none-elf`, QEMU for RISC-V, OpenSBI (the
/// `-bios default` firmware), the cross gcc (for the C code of the test list) and its
/// objdump, each only if missing.
pub(crate) fn install_tools(sh: &Shell, qemu_tests: &Path) -> Result<()> {
    {
        let _dir = sh.push_dir(qemu_tests);
        install::rust_target(sh, TARGET)?;
    }
    install::host_tool(sh, "qemu-system-riscv64", "qemu-system-misc")?;
    install::debian_file(sh, Path::new(OPENSBI), "opensbi")?;
    install::host_tool(sh, "riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu")?;
    install::host_tool(
        sh,
        "riscv64-linux-gnu-objdump",
        "binutils-riscv64-linux-gnu",
    )
}

/// Whether `qemu-system-riscv64 -cpu help` lists a `max` CPU (QEMU 8 and later).
fn qemu_has_max_cpu() -> bool {
    Command::new("qemu-system-riscv64")
        .args(["-cpu", "help"])
        .output()
        .is_ok_and(|o| lists_max(&String::from_utf8_lossy(&o.stdout)))
}

/// Whether a `-cpu help` listing has a `max` line.
fn lists_max(listing: &str) -> bool {
    listing
        .lines()
        .any(|l| l.split_whitespace().next() == Some("max"))
}

/// The `-cpu` option of MODEL (see the module docs); other models pass through.
pub(crate) fn cpu_option(model: &str, has_max: bool) -> String {
    match model {
        "rv64" => RV64_BASE.to_owned(),
        "rv64-zbb" => RV64_ZBB.to_owned(),
        "max" if !has_max => format!("rv64,{MAX_EXTENSIONS}"),
        other => other.to_owned(),
    }
}

/// The QEMU command line of run `label` (`riscv64-MODEL[-smpN]`).
pub(crate) fn qemu_command(label: &str, image: &Path, has_max: bool) -> Command {
    let (model, cpus) = qemu::split_label(label.strip_prefix(PREFIX).unwrap_or(label));
    let mut command = Command::new("qemu-system-riscv64");
    command.args([
        "-M",
        "virt",
        "-cpu",
        &cpu_option(model, has_max),
        "-m",
        "256M",
    ]);
    if cpus > 1 {
        command
            .args(["-smp", &cpus.to_string()])
            .args(["-accel", "tcg,thread=multi"]);
    }
    command
        .args(["-bios", "default", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot", "-kernel"])
        .arg(image);
    command
}

fn boot_all(
    image: &Path,
    labels: &[String],
    timeout: Duration,
    has_max: bool,
    sites: &Sites,
) -> Result<u32> {
    if !has_max && labels.iter().any(|l| l.contains("-max")) {
        println!(
            "xtask: this qemu-system-riscv64 has no `max` CPU: `max` runs boot `rv64,{MAX_EXTENSIONS}`"
        );
    }
    let mut runs = Vec::new();
    let mut features = BTreeMap::new();
    for label in labels {
        let start = Instant::now();
        let cpus = qemu::split_label(label).1;
        let limit = if cpus > 1 {
            timeout * qemu::SMP_TIMEOUT_FACTOR
        } else {
            timeout
        };
        let (exit, serial) = qemu::boot(label, qemu_command(label, image, has_max), limit)?;
        let mut verdict = judge::judge(&exit, &serial);
        verdict
            .problems
            .extend(judge::check_required_tests(&serial, REQUIRED_TESTS));
        verdict.problems.extend(judge::check_required_tests(
            &serial,
            &shared_tests_for(cpus),
        ));
        verdict
            .problems
            .extend(judge::check_cpus_online(&serial, cpus));
        match check_init(&serial, sites) {
            Ok(line) => println!("xtask: [{label}] {line}"),
            Err(e) => verdict.problems.push(e),
        }
        if let Some(passed) = verdict.passed.filter(|&n| n < REQUIRED_TESTS.len() as u32) {
            verdict.problems.push(format!(
                "{passed} tests passed, expected at least {}",
                REQUIRED_TESTS.len()
            ));
        }
        if let Some(f) = parse_features(&serial) {
            features.insert(label.clone(), f);
        }
        println!(
            "xtask: [{label}] {} ({exit})",
            if verdict.ok() { "passed" } else { "FAILED" }
        );
        runs.push(Run {
            model: label.clone(),
            verdict,
            choices: judge::parse_choices(&serial),
            elapsed: start.elapsed(),
        });
    }
    println!();
    print!("{}", qemu::summary(&runs));
    let mut failures: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.verdict
                .problems
                .iter()
                .map(|p| format!("[{}] {p}", r.model))
        })
        .collect();
    let (base, zbb) = ("riscv64-rv64", "riscv64-rv64-zbb");
    if labels.iter().any(|l| l == base) && labels.iter().any(|l| l == zbb) {
        match check_features_differ(features.get(base), features.get(zbb)) {
            Ok(differ) => {
                println!("cross-model check ({base} vs {zbb}): ok, features differ: {differ}")
            }
            Err(e) => failures.push(e),
        }
        let choices = |l| runs.iter().find(|r| r.model == l).map(|r| &r.choices);
        match check_choices_differ(
            choices(base).unwrap_or(&BTreeMap::new()),
            choices(zbb).unwrap_or(&BTreeMap::new()),
        ) {
            Ok(differ) => println!("ifunc choices ({base} vs {zbb}): ok, differ: {differ}"),
            Err(e) => failures.push(format!("cross-model ifunc check: {e}")),
        }
    } else {
        println!("cross-model check skipped (needs both {base} and {zbb})");
    }
    if failures.is_empty() {
        Ok(runs.iter().map(|r| r.verdict.passed.unwrap_or(0)).sum())
    } else {
        bail!("riscv64 qemu runs failed:\n  {}", failures.join("\n  "))
    }
}

/// Every ifunc of [`MUST_DIFFER`] is reported by both runs, with different choices.
/// Returns `name: rv64-choice / rv64-zbb-choice` for the report.
pub(crate) fn check_choices_differ(
    base: &BTreeMap<String, String>,
    zbb: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut shown = Vec::new();
    for name in MUST_DIFFER {
        match (base.get(*name), zbb.get(*name)) {
            (Some(b), Some(z)) if b != z => shown.push(format!("{name} {b} / {z}")),
            (b, z) => {
                return Err(format!(
                    "{name}: rv64 chose {b:?}, rv64-zbb chose {z:?} (expected two different \
                     implementations)"
                ));
            }
        }
    }
    Ok(shown.join(", "))
}

/// `rv64` must lack Zbb and `rv64-zbb` have it, and at least one more feature must
/// differ, so the resolvers have real choices. Returns the differing features.
pub(crate) fn check_features_differ(
    base: Option<&BTreeMap<String, bool>>,
    zbb: Option<&BTreeMap<String, bool>>,
) -> Result<String, String> {
    let (Some(base), Some(zbb)) = (base, zbb) else {
        return Err("no `features: …` line from riscv64-rv64 or riscv64-rv64-zbb".to_owned());
    };
    if base.get("zbb") != Some(&false) || zbb.get("zbb") != Some(&true) {
        return Err(format!(
            "Zbb: rv64 {:?}, rv64-zbb {:?} (expected absent, present)",
            base.get("zbb"),
            zbb.get("zbb")
        ));
    }
    let differ: Vec<&str> = base
        .iter()
        .filter(|(name, has)| zbb.get(*name).is_some_and(|z| z != *has))
        .map(|(name, _)| name.as_str())
        .collect();
    if differ.len() < 2 {
        return Err(format!(
            "rv64 and rv64-zbb differ only in {differ:?}; expected Zbb and at least one more"
        ));
    }
    Ok(differ.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(arches: &[Arch], cpus: &[&str]) -> QemuArgs {
        QemuArgs {
            arches: arches.to_vec(),
            cpus: cpus.iter().map(|c| (*c).to_owned()).collect(),
            ..QemuArgs::default()
        }
    }

    fn owned(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn riscv64_runs_are_split_off() {
        let (runs, rest) = split_runs(&args(&[], &[])).unwrap();
        assert_eq!(runs, owned(DEFAULT_RUNS));
        let rest = rest.unwrap();
        assert!(rest.arches.is_empty() && rest.cpus.is_empty());

        let (runs, rest) = split_runs(&args(&[Arch::Riscv64], &[])).unwrap();
        assert_eq!(runs, owned(DEFAULT_RUNS));
        assert!(rest.is_none(), "x86_64 and aarch64 are skipped");

        let (runs, rest) = split_runs(&args(&[Arch::Aarch64], &[])).unwrap();
        assert_eq!(runs, None);
        assert_eq!(rest.unwrap().arches, [Arch::Aarch64]);

        // `--arch riscv64 --cpu rv64` names riscv64-rv64.
        let (runs, rest) = split_runs(&args(&[Arch::Riscv64], &["rv64", "max-smp4"])).unwrap();
        assert_eq!(runs, owned(&["riscv64-rv64", "riscv64-max-smp4"]));
        assert!(rest.is_none());

        // Without --arch, --cpu boots only what it names.
        let (runs, rest) = split_runs(&args(&[], &["riscv64-rv64-zbb"])).unwrap();
        assert_eq!(runs, owned(&["riscv64-rv64-zbb"]));
        assert!(rest.is_none());
        let (runs, rest) = split_runs(&args(&[], &["qemu64", "riscv64-rv64"])).unwrap();
        assert_eq!(runs, owned(&["riscv64-rv64"]));
        assert_eq!(rest.unwrap().cpus, ["qemu64"]);
        let (runs, rest) = split_runs(&args(&[], &["max"])).unwrap();
        assert_eq!(runs, None);
        assert_eq!(rest.unwrap().cpus, ["max"]);

        assert!(split_runs(&args(&[Arch::X86_64], &["riscv64-rv64"])).is_err());
        assert!(split_runs(&args(&[Arch::Riscv64, Arch::X86_64], &["max"])).is_err());
    }

    #[test]
    fn cpu_models() {
        assert!(cpu_option("rv64", false).contains("zbb=false"));
        assert!(cpu_option("rv64-zbb", true).contains("zbb=true"));
        assert_eq!(cpu_option("max", true), "max");
        assert_eq!(cpu_option("max", false), format!("rv64,{MAX_EXTENSIONS}"));
        assert_eq!(cpu_option("sifive-u54", false), "sifive-u54");
        assert!(lists_max("any\nmax\nrv64\n"));
        assert!(!lists_max("any\nrv64\nsifive-u54\n"));
    }

    #[test]
    fn features_must_differ_in_zbb_and_one_more() {
        let lines = |s: &str| vec![format!("features: {s} (from the device tree, bits 0x3f)")];
        let base = parse_features(&lines("zba=0 zbb=0 zbc=0 v=0")).unwrap();
        let zbb = parse_features(&lines("zba=1 zbb=1 zbc=1 v=0")).unwrap();
        assert_eq!(
            check_features_differ(Some(&base), Some(&zbb)).unwrap(),
            "zba, zbb, zbc"
        );
        assert!(check_features_differ(Some(&zbb), Some(&base)).is_err());
        assert!(check_features_differ(Some(&base), Some(&base)).is_err());
        let only_zbb = parse_features(&lines("zba=0 zbb=1 zbc=0 v=0")).unwrap();
        assert!(check_features_differ(Some(&base), Some(&only_zbb)).is_err());
        assert!(check_features_differ(None, Some(&zbb)).is_err());
    }

    #[test]
    fn ifunc_choices_must_differ() {
        let serial = |pop: &str, crc: &str| {
            vec![
                format!("ifunc-choice kfuncs::popcount {pop}"),
                format!("ifunc-choice kfuncs::crc32c {crc}"),
                "ifunc-choice kfuncs::fetch_add fetch_add_amo".to_owned(),
            ]
        };
        let base = judge::parse_choices(&serial("popcount_soft", "crc32c_table"));
        let zbb = judge::parse_choices(&serial("popcount_cpop", "crc32c_clmul"));
        assert_eq!(
            check_choices_differ(&base, &zbb).unwrap(),
            "kfuncs::popcount popcount_soft / popcount_cpop, \
             kfuncs::crc32c crc32c_table / crc32c_clmul"
        );
        assert!(check_choices_differ(&base, &base).is_err());
        let same_crc = judge::parse_choices(&serial("popcount_cpop", "crc32c_table"));
        let err = check_choices_differ(&base, &same_crc).unwrap_err();
        assert!(err.contains("kfuncs::crc32c"), "{err}");
        assert!(check_choices_differ(&base, &BTreeMap::new()).is_err());
    }

    #[test]
    fn shared_tests_without_far_modules() {
        let one = shared_tests_for(1);
        let four = shared_tests_for(4);
        assert!(one.contains(&"ifunc_init_patches_every_site"));
        assert!(one.contains(&"smp_tests_skipped_on_one_cpu"));
        assert!(one.contains(&"module_load_rust_and_c"));
        assert!(!one.contains(&"module_probe_live_toggle_while_aps_run_it"));
        assert!(four.contains(&"smp_stress_live_patching"));
        assert!(four.contains(&"module_probe_live_toggle_while_aps_run_it"));
        assert!(!four.iter().any(|t| t.starts_with("module_far_")));
    }

    #[test]
    fn init_line_accounts_for_every_site() {
        let serial = |line: &str| vec!["ksites: boot".to_owned(), line.to_owned()];
        let line = "init: 9 ifuncs resolved, 40 sites patched, 2 out of reach, 1 sync rounds";
        assert_eq!(parse_init(&serial(line)), Some((40, 2)));
        let relaxed = Sites {
            total: 42,
            relaxed: 5,
        };
        assert!(check_init(&serial(line), &relaxed).is_ok());
        // A site neither patched nor out of reach, or more out of reach than relaxed.
        let short = Sites {
            total: 43,
            relaxed: 5,
        };
        assert!(check_init(&serial(line), &short).is_err());
        let pairs = Sites {
            total: 42,
            relaxed: 0,
        };
        assert!(check_init(&serial(line), &pairs).is_err());
        assert!(check_init(&serial("init: failed"), &relaxed).is_err());
        assert_eq!(parse_init(&serial("init: x ifuncs resolved")), None);
    }

    #[test]
    fn relaxed_link_needs_relaxed_sites() {
        let forms = |pair, jal, c_j| crosscheck::FormCounts { pair, jal, c_j };
        assert!(check_forms(true, &forms(10, 3, 1)).is_ok());
        assert!(check_forms(true, &forms(10, 0, 0)).is_err());
        assert!(check_forms(false, &forms(10, 0, 0)).is_ok());
        assert!(check_forms(false, &forms(10, 0, 1)).is_err());
    }

    #[test]
    fn command_line() {
        let c = qemu_command("riscv64-max-smp4", Path::new("/k"), true);
        let line: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = line.join(" ");
        assert_eq!(c.get_program(), "qemu-system-riscv64");
        assert!(
            line.starts_with("-M virt -cpu max -m 256M -smp 4 -accel tcg,thread=multi "),
            "{line}"
        );
        assert!(line.contains("-bios default"), "{line}");
        assert!(line.ends_with("-no-reboot -kernel /k"), "{line}");
        let one = qemu_command("riscv64-rv64", Path::new("/k"), false);
        assert!(!one.get_args().any(|a| a == "-smp"));
    }
}
