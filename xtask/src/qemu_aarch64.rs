//! `cargo xtask qemu --arch aarch64`: build the aarch64 test kernel and boot it on
//! `qemu-system-aarch64 -M virt` on each run label, and judge the runs.
//!
//! The kernel (`qemu-tests/kernel/src/arch/aarch64/`) is linked through `ksites-ld`
//! (rust-lld, then `ksites embed` into the `.ksites` slot its linker script reserves),
//! as the x86_64 kernel is; the build tool is built first. It exits
//! through semihosting with the x86_64 kernel's statuses (33 = success, 35 = failure),
//! so [`judge::judge`] applies unchanged; on top, every run must pass every platform
//! test ([`REQUIRED_TESTS`]), ifunc test ([`IFUNC_TESTS`]), probe test
//! ([`PROBE_TESTS`], and on SMP runs [`SMP_TESTS`]) and module test ([`MODULE_TESTS`];
//! on SMP runs [`SMP_MODULE_TESTS`] too) and bring the expected
//! CPUs online, and `cortex-a57` and `max` must report different CPU features (LSE
//! atomics and at least one more) and choose different implementations for the ifuncs
//! of [`MUST_DIFFER`]. Before booting, the image is `ksites verify`-ed, its `ksites
//! inspect` printed, and its site counts cross-checked against
//! `aarch64-linux-gnu-objdump -dr` ([`crosscheck`]).

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

/// The Rust target of the aarch64 kernel.
pub(crate) const TARGET: &str = "aarch64-unknown-none";
/// The runs booted when `--cpu` names none: `aarch64-MODEL[-smpN]`.
pub(crate) const DEFAULT_RUNS: &[&str] = &["aarch64-cortex-a57", "aarch64-max", "aarch64-max-smp4"];
const PREFIX: &str = "aarch64-";

/// The platform tests every aarch64 run must pass.
pub(crate) const REQUIRED_TESTS: &[&str] = &[
    "aarch64_simd_state_enabled",
    "aarch64_cpu_features_match_id_registers",
    "aarch64_text_is_not_writable",
    "aarch64_data_is_not_executable",
    "aarch64_sync_icache_makes_new_code_visible",
    "aarch64_brk_is_trapped_and_resumed",
    "aarch64_exceptions_preserve_fp_simd_state",
    "aarch64_secondary_cpus_start",
    "aarch64_sgi_reaches_every_cpu",
    "aarch64_live_patch_seen_by_every_cpu",
];

/// The module tests every aarch64 run must pass (`src/arch/aarch64/module_tests.rs`:
/// rmod and cmod built for aarch64, loaded, relocated, patched, probed and unloaded).
pub(crate) const MODULE_TESTS: &[&str] = &[
    "module_arena_alloc_protect_poke_free",
    "modules_embedded_are_et_rel",
    "module_load_rust_and_c",
    "module_kernel_ifunc_sites_direct_to_choice",
    "module_calls_through_kernel_ifuncs",
    "module_own_ifunc_by_cpu_model",
    "module_probes_registry_fire_args",
    "module_kernel_sites_unchanged_by_loads",
    "module_unload_refused_while_held",
    "module_unload_refused_while_its_handler_is_enabled",
    "module_unload_removes_probes_and_memory",
    "module_unknown_symbol_fails_cleanly",
    "module_far_calls_through_veneers",
    "module_far_ifunc_import_refused_clearly",
    "module_load_unload_load",
    "module_loader_never_allocates",
];

/// The module tests an SMP run must pass as well.
pub(crate) const SMP_MODULE_TESTS: &[&str] = &["module_probe_live_toggle_while_aps_run_it"];

/// The ifunc tests (`src/arch/aarch64/ifunc_tests.rs`) every aarch64 run must pass.
pub(crate) const IFUNC_TESTS: &[&str] = &[
    "ksites_table_valid",
    "ifunc_calls_before_init_use_default",
    "ifunc_init_fault_injection_restores",
    "ifunc_init_patches_every_site",
    "ifunc_choice_matches_id_registers",
    "ifunc_sites_are_direct_branches_to_choice",
    "ifunc_results_after_init",
    "ifunc_implementations_agree",
    "text_read_only_after_patching",
    "ifunc_second_init_refused_unchanged",
    "ifunc_one_sync_round_per_batch",
    "ifunc_init_never_allocates",
];

/// The ifuncs `cortex-a57` and `max` must resolve differently: LSE atomics
/// (`ldaddal` vs an exclusive loop) and SHA3 (`eor3` vs two `eor`).
pub(crate) const MUST_DIFFER: &[&str] = &["kfuncs::fetch_add", "kfuncs::xor3"];

/// The probe and BRK-route tests (`src/arch/aarch64/probe_tests.rs`, `trap_tests.rs`)
/// every aarch64 run must pass.
pub(crate) const PROBE_TESTS: &[&str] = &[
    "probe_registry_lookup_glob_nargs",
    "probe_disabled_sites_are_nops",
    "probe_enable_refused_without_brk_route",
    "probe_enable_c_probe_patches_only_its_sites",
    "probe_enable_patches_only_its_sites",
    "probe_arguments_0_1_6_rust_and_c",
    "probe_is_enabled_reports_state",
    "probe_c_tail_call_returns",
    "probe_toggle_10000_counts_exact",
    "probe_one_sync_round_per_batch",
    "probe_failed_batch_restores_sites",
    "probe_text_read_only_after",
    "trap_int3_entry_keeps_registers_and_writes_back_the_frame",
    "trap_int3_entry_lands_on_an_emulated_ret",
];

/// The SMP tests (`src/arch/aarch64/smp_tests.rs`) every run with more than one CPU
/// must pass.
pub(crate) const SMP_TESTS: &[&str] = &[
    "smp_stress_live_patching",
    "smp_text_never_writable",
    "smp_drain_waits_for_handlers_on_aps",
];

/// The probe and SMP tests a run with `cpus` CPUs must pass: with one CPU, the SMP
/// tests' `ok smp_tests_skipped_on_one_cpu` instead of the SMP tests.
pub(crate) fn probe_tests_for(cpus: u32) -> Vec<&'static str> {
    let smp: &[&str] = if cpus > 1 {
        SMP_TESTS
    } else {
        &["smp_tests_skipped_on_one_cpu"]
    };
    PROBE_TESTS.iter().chain(smp).copied().collect()
}

/// Run labels for one architecture, or `None` to skip it.
pub(crate) type Runs = Option<Vec<String>>;

/// Which runs each architecture gets from `--arch` and `--cpu`: `None` skips it.
/// Without `--cpu`, each selected architecture boots its defaults (x86_64: an empty
/// list, which means [`qemu::DEFAULT_CPUS`]). With `--cpu`, labels starting with
/// `aarch64-` are aarch64 runs (with `--arch aarch64` alone, every label is); the rest
/// are x86_64's, and an architecture no label names is skipped unless `--arch` asks
/// for it (an error then).
pub(crate) fn split_runs(args: &QemuArgs) -> Result<(Runs, Runs)> {
    let explicit = !args.arches.is_empty();
    let wants = |a| !explicit || args.arches.contains(&a);
    if args.cpus.is_empty() {
        let a64 = DEFAULT_RUNS.iter().map(|r| (*r).to_owned()).collect();
        return Ok((
            wants(Arch::X86_64).then(Vec::new),
            wants(Arch::Aarch64).then_some(a64),
        ));
    }
    let only_aarch64 = explicit && !wants(Arch::X86_64);
    let (mut a64, mut x86) = (Vec::new(), Vec::new());
    for label in &args.cpus {
        if label.starts_with(PREFIX) {
            a64.push(label.clone());
        } else if only_aarch64 {
            a64.push(format!("{PREFIX}{label}"));
        } else {
            x86.push(label.clone());
        }
    }
    let pick = |arch, labels: Vec<String>| -> Result<Runs> {
        match (wants(arch), labels.is_empty()) {
            (true, false) => Ok(Some(labels)),
            (false, false) => bail!("--cpu {} is not a run of the selected --arch", labels[0]),
            (true, true) if explicit => {
                bail!("--arch {arch:?} is selected but no --cpu names one of its runs")
            }
            _ => Ok(None),
        }
    };
    Ok((pick(Arch::X86_64, x86)?, pick(Arch::Aarch64, a64)?))
}

/// The kernel image cargo builds.
pub(crate) fn kernel_path(root: &Path) -> PathBuf {
    root.join("qemu-tests/target")
        .join(TARGET)
        .join("release/qemu-tests-kernel")
}

/// Installs what is missing, builds the kernel (unless `--no-build`) and boots `labels`;
/// returns the tests passed, summed over the runs.
pub(crate) fn run(sh: &Shell, root: &Path, labels: &[String], args: &QemuArgs) -> Result<u32> {
    let qemu_tests = root.join("qemu-tests");
    install_tools(sh, &qemu_tests)?;
    if args.no_build {
        println!("xtask: --no-build: using the existing aarch64 test kernel");
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
        let module_dir = modules::build_aarch64(sh, root, &ksites)?;
        let _modules = sh.push_env(modules::AARCH64_MODULE_DIR_ENV, &module_dir);
        let _dir = sh.push_dir(&qemu_tests);
        cmd!(sh, "cargo build --release -p qemu-tests --target {TARGET}")
            .run()
            .context("building the aarch64 test kernel failed")?;
    }
    let image = kernel_path(root);
    if !image.is_file() {
        bail!(
            "the aarch64 test kernel is missing: {} (build it, or drop --no-build)",
            image.display()
        );
    }
    check_image(sh, root, &image)?;
    boot_all(&image, labels, Duration::from_secs(args.timeout))
}

/// `ksites verify` the kernel, print its `ksites inspect`, and check every ifunc's site
/// count equals `aarch64-linux-gnu-objdump -dr`'s `bl`/`b` to its trampoline.
fn check_image(sh: &Shell, root: &Path, image: &Path) -> Result<()> {
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
        "aarch64-linux-gnu-objdump -dr --no-show-raw-insn {image}"
    )
    .read()
    .context("aarch64-linux-gnu-objdump failed")?;
    let ifuncs = crosscheck::parse_inspect(&inspect).map_err(|e| anyhow::anyhow!(e))?;
    let rows = crosscheck::compare(&ifuncs, &crosscheck::count_branch_relocs(&objdump));
    println!(
        "xtask: aarch64-linux-gnu-objdump cross-check of {}",
        image.display()
    );
    print!("{}", crosscheck::render(&rows));
    crosscheck::check(&rows).map_err(|e| anyhow::anyhow!("objdump cross-check failed: {e}"))
}

/// Every ifunc of [`MUST_DIFFER`] is reported by both runs, with different choices.
/// Returns `name: a57-choice / max-choice` for the report.
pub(crate) fn check_choices_differ(
    a57: &BTreeMap<String, String>,
    max: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut shown = Vec::new();
    for name in MUST_DIFFER {
        match (a57.get(*name), max.get(*name)) {
            (Some(a), Some(m)) if a != m => shown.push(format!("{name} {a} / {m}")),
            (a, m) => {
                return Err(format!(
                    "{name}: cortex-a57 chose {a:?}, max chose {m:?} (expected two \
                     different implementations)"
                ));
            }
        }
    }
    Ok(shown.join(", "))
}

/// `rustup target add aarch64-unknown-none`, QEMU for Arm, and the cross gcc (for the
/// C code of the aarch64 test list), each only if missing.
pub(crate) fn install_tools(sh: &Shell, qemu_tests: &Path) -> Result<()> {
    {
        let _dir = sh.push_dir(qemu_tests);
        install::rust_target(sh, TARGET)?;
    }
    install::host_tool(sh, "qemu-system-aarch64", "qemu-system-arm")?;
    install::host_tool(sh, "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")?;
    install::host_tool(
        sh,
        "aarch64-linux-gnu-objdump",
        "binutils-aarch64-linux-gnu",
    )
}

/// The QEMU command line of run `label` (`aarch64-MODEL[-smpN]`).
pub(crate) fn qemu_command(label: &str, image: &Path) -> Command {
    let (model, cpus) = qemu::split_label(label.strip_prefix(PREFIX).unwrap_or(label));
    let mut command = Command::new("qemu-system-aarch64");
    command.args(["-M", "virt", "-cpu", model, "-m", "256M"]);
    if cpus > 1 {
        command
            .args(["-smp", &cpus.to_string()])
            .args(["-accel", "tcg,thread=multi"]);
    }
    command
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-semihosting", "-kernel"])
        .arg(image);
    command
}

fn boot_all(image: &Path, labels: &[String], timeout: Duration) -> Result<u32> {
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
        let (exit, serial) = qemu::boot(label, qemu_command(label, image), limit)?;
        let mut verdict = judge::judge(&exit, &serial);
        verdict
            .problems
            .extend(judge::check_required_tests(&serial, REQUIRED_TESTS));
        let smp_modules: &[&str] = if cpus > 1 { SMP_MODULE_TESTS } else { &[] };
        for tests in [MODULE_TESTS, smp_modules] {
            verdict
                .problems
                .extend(judge::check_required_tests(&serial, tests));
        }
        verdict
            .problems
            .extend(judge::check_required_tests(&serial, IFUNC_TESTS));
        verdict
            .problems
            .extend(judge::check_required_tests(&serial, &probe_tests_for(cpus)));
        verdict
            .problems
            .extend(judge::check_cpus_online(&serial, cpus));
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
    let (a57, max) = ("aarch64-cortex-a57", "aarch64-max");
    if labels.iter().any(|l| l == a57) && labels.iter().any(|l| l == max) {
        match check_features_differ(features.get(a57), features.get(max)) {
            Ok(differ) => {
                println!("cross-model check ({a57} vs {max}): ok, features differ: {differ}")
            }
            Err(e) => failures.push(e),
        }
        let choices = |l| runs.iter().find(|r| r.model == l).map(|r| &r.choices);
        match check_choices_differ(
            choices(a57).unwrap_or(&BTreeMap::new()),
            choices(max).unwrap_or(&BTreeMap::new()),
        ) {
            Ok(differ) => println!("ifunc choices ({a57} vs {max}): ok, differ: {differ}"),
            Err(e) => failures.push(format!("cross-model ifunc check: {e}")),
        }
    } else {
        println!("cross-model check skipped (needs both {a57} and {max})");
    }
    if failures.is_empty() {
        Ok(runs.iter().map(|r| r.verdict.passed.unwrap_or(0)).sum())
    } else {
        bail!("aarch64 qemu runs failed:\n  {}", failures.join("\n  "))
    }
}

/// The last `features: NAME=0|1 … (MIDR …)` line → feature name → present.
pub(crate) fn parse_features(serial: &[String]) -> Option<BTreeMap<String, bool>> {
    serial.iter().rev().find_map(|line| {
        let rest = line.trim_end().strip_prefix("features:")?;
        let map: BTreeMap<String, bool> = rest
            .split_whitespace()
            .filter_map(|word| match word.split_once('=')? {
                (name, "0") => Some((name.to_owned(), false)),
                (name, "1") => Some((name.to_owned(), true)),
                _ => None,
            })
            .collect();
        (!map.is_empty()).then_some(map)
    })
}

/// `cortex-a57` (Armv8.0) must lack LSE atomics and `max` have them, and at least one
/// more feature must differ, so the resolvers have two ifuncs' worth of real choices.
/// Returns the differing features.
pub(crate) fn check_features_differ(
    a57: Option<&BTreeMap<String, bool>>,
    max: Option<&BTreeMap<String, bool>>,
) -> Result<String, String> {
    let (Some(a57), Some(max)) = (a57, max) else {
        return Err("no `features: …` line from aarch64-cortex-a57 or aarch64-max".to_owned());
    };
    if a57.get("lse") != Some(&false) || max.get("lse") != Some(&true) {
        return Err(format!(
            "LSE atomics: cortex-a57 {:?}, max {:?} (expected absent, present)",
            a57.get("lse"),
            max.get("lse")
        ));
    }
    let differ: Vec<&str> = a57
        .iter()
        .filter(|(name, has)| max.get(*name).is_some_and(|m| m != *has))
        .map(|(name, _)| name.as_str())
        .collect();
    if differ.len() < 2 {
        return Err(format!(
            "cortex-a57 and max differ only in {differ:?}; expected LSE and at least one more"
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

    #[test]
    fn runs_per_architecture() {
        let owned = |v: &[&str]| Some(v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            split_runs(&args(&[], &[])).unwrap(),
            (Some(vec![]), owned(DEFAULT_RUNS))
        );
        assert_eq!(
            split_runs(&args(&[Arch::X86_64], &[])).unwrap(),
            (Some(vec![]), None)
        );
        assert_eq!(
            split_runs(&args(&[Arch::Aarch64], &[])).unwrap(),
            (None, owned(DEFAULT_RUNS))
        );
        // `--cpu max` alone stays the x86_64 run it always was.
        assert_eq!(
            split_runs(&args(&[], &["max"])).unwrap(),
            (owned(&["max"]), None)
        );
        assert_eq!(
            split_runs(&args(&[Arch::Aarch64], &["max", "aarch64-cortex-a57"])).unwrap(),
            (None, owned(&["aarch64-max", "aarch64-cortex-a57"]))
        );
        assert_eq!(
            split_runs(&args(&[], &["qemu64", "aarch64-max-smp4"])).unwrap(),
            (owned(&["qemu64"]), owned(&["aarch64-max-smp4"]))
        );
        assert!(split_runs(&args(&[Arch::X86_64], &["aarch64-max"])).is_err());
        assert!(split_runs(&args(&[Arch::X86_64, Arch::Aarch64], &["max"])).is_err());
    }

    #[test]
    fn command_line() {
        let c = qemu_command("aarch64-max-smp4", Path::new("/k"));
        let words: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = words.join(" ");
        assert_eq!(c.get_program(), "qemu-system-aarch64");
        assert!(
            line.starts_with("-M virt -cpu max -m 256M -smp 4 "),
            "{line}"
        );
        assert!(line.ends_with("-semihosting -kernel /k"), "{line}");
        let one = qemu_command("aarch64-cortex-a57", Path::new("/k"));
        assert!(!one.get_args().any(|a| a == "-smp"));
    }

    #[test]
    fn ifunc_choices_must_differ() {
        let serial = |xor3: &str, fa: &str| {
            vec![
                format!("ifunc-choice kfuncs::xor3 {xor3}"),
                "ifunc-choice kfuncs::crc32c crc32c_hw".to_owned(),
                format!("ifunc-choice kfuncs::fetch_add {fa}"),
            ]
        };
        let a57 = judge::parse_choices(&serial("xor3_neon", "fetch_add_llsc"));
        let max = judge::parse_choices(&serial("xor3_eor3", "fetch_add_lse"));
        assert_eq!(
            check_choices_differ(&a57, &max).unwrap(),
            "kfuncs::fetch_add fetch_add_llsc / fetch_add_lse, kfuncs::xor3 xor3_neon / xor3_eor3"
        );
        assert!(check_choices_differ(&a57, &a57).is_err());
        let same_xor = judge::parse_choices(&serial("xor3_neon", "fetch_add_lse"));
        let err = check_choices_differ(&a57, &same_xor).unwrap_err();
        assert!(err.contains("kfuncs::xor3"), "{err}");
        assert!(check_choices_differ(&a57, &BTreeMap::new()).is_err());
    }

    #[test]
    fn smp_tests_required_only_on_smp_runs() {
        let one = probe_tests_for(1);
        let four = probe_tests_for(4);
        assert!(one.contains(&"probe_toggle_10000_counts_exact"));
        assert!(one.contains(&"smp_tests_skipped_on_one_cpu"));
        assert!(!one.contains(&"smp_stress_live_patching"));
        assert!(four.contains(&"smp_stress_live_patching"));
        assert!(four.contains(&"smp_drain_waits_for_handlers_on_aps"));
        assert!(!four.contains(&"smp_tests_skipped_on_one_cpu"));
        assert_eq!(four.len(), PROBE_TESTS.len() + SMP_TESTS.len());
    }

    #[test]
    fn features_must_differ_in_lse_and_one_more() {
        let lines = |s: &str| vec![format!("features: {s} (MIDR 0x411fd070)")];
        let a57 = parse_features(&lines("lse=0 sha3=0 sve=0 crc32=1")).unwrap();
        let max = parse_features(&lines("lse=1 sha3=1 sve=1 crc32=1")).unwrap();
        assert_eq!(a57.len(), 4);
        assert_eq!(
            check_features_differ(Some(&a57), Some(&max)).unwrap(),
            "lse, sha3, sve"
        );
        assert!(check_features_differ(Some(&a57), Some(&a57)).is_err());
        assert!(check_features_differ(Some(&max), Some(&a57)).is_err());
        let lse_only = parse_features(&lines("lse=1 sha3=0 sve=0 crc32=1")).unwrap();
        assert!(check_features_differ(Some(&a57), Some(&lse_only)).is_err());
        assert!(check_features_differ(None, Some(&max)).is_err());
        assert!(parse_features(&["features: none".to_owned()]).is_none());
    }
}
