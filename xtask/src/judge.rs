//! Judge one QEMU run from its exit status and serial output, and compare the ifunc
//! choices of different CPU models.

use std::collections::BTreeMap;
use std::fmt;

/// How QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// QEMU exited with this status.
    Code(i32),
    /// QEMU ended without an exit status (killed by a signal).
    Signal,
    /// We killed QEMU after this many seconds.
    Timeout(u64),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit status {code}"),
            Exit::Signal => f.write_str("killed by a signal"),
            Exit::Timeout(secs) => write!(f, "timeout after {secs} s"),
        }
    }
}

/// QEMU's status when the kernel writes `0x10` (success) to isa-debug-exit: `(0x10 << 1) | 1`.
pub(crate) const EXIT_SUCCESS: i32 = 33;
/// QEMU's status when the kernel writes `0x11` (failure): `(0x11 << 1) | 1`.
pub(crate) const EXIT_FAILURE: i32 = 35;

/// The verdict on one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// From the last `N passed, M failed` line, if any.
    pub(crate) passed: Option<u32>,
    pub(crate) failed: Option<u32>,
    /// Why the run failed; empty when it passed.
    pub(crate) problems: Vec<String>,
}

impl Verdict {
    pub(crate) fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A run passes only with exit status 33, a `N passed, 0 failed` line with N > 0, and no
/// line starting with `FAIL `, `FAULT` or `PANIC`.
pub(crate) fn judge(exit: &Exit, serial: &[String]) -> Verdict {
    let mut problems = Vec::new();
    match exit {
        Exit::Code(EXIT_SUCCESS) => {}
        Exit::Code(EXIT_FAILURE) => {
            problems.push(format!(
                "kernel reported failure (exit status {EXIT_FAILURE})"
            ));
        }
        Exit::Code(code) => problems.push(format!(
            "QEMU exit status {code}: crash, triple fault or QEMU error (expected {EXIT_SUCCESS})"
        )),
        Exit::Signal => problems.push("QEMU was killed by a signal".to_owned()),
        Exit::Timeout(_) => problems.push(exit.to_string()),
    }

    let summary = serial.iter().rev().find_map(|line| parse_summary(line));
    let (passed, failed) = match summary {
        Some((passed, failed)) => (Some(passed), Some(failed)),
        None => (None, None),
    };
    match summary {
        None => problems.push("no `N passed, 0 failed` line in the output".to_owned()),
        Some((_, failed @ 1..)) => problems.push(format!("{failed} test(s) failed")),
        Some((0, 0)) => problems.push("0 tests passed".to_owned()),
        Some(_) => {}
    }

    let bad: Vec<&str> = serial
        .iter()
        .map(|line| line.trim_end())
        .filter(|line| {
            line.starts_with("FAIL ") || line.starts_with("FAULT") || line.starts_with("PANIC")
        })
        .collect();
    if let Some(first) = bad.first() {
        problems.push(format!(
            "{} FAIL/FAULT/PANIC line(s), first: `{first}`",
            bad.len()
        ));
    }

    Verdict {
        passed,
        failed,
        problems,
    }
}

/// `N passed, M failed` (the whole line) → `(N, M)`.
fn parse_summary(line: &str) -> Option<(u32, u32)> {
    let (passed, failed) = line
        .trim_end()
        .strip_suffix(" failed")?
        .split_once(" passed, ")?;
    Some((parse_decimal(passed)?, parse_decimal(failed)?))
}

fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The CPU count of the last `smp: N CPU online` / `smp: N CPUs online …` line.
pub(crate) fn parse_cpus_online(serial: &[String]) -> Option<u32> {
    serial.iter().rev().find_map(|line| {
        let rest = line.trim_end().strip_prefix("smp: ")?;
        let (n, rest) = rest.split_once(' ')?;
        (rest.starts_with("CPU online") || rest.starts_with("CPUs online"))
            .then(|| parse_decimal(n))
            .flatten()
    })
}

/// A problem unless the kernel reported exactly `expected` CPUs online (so an SMP run
/// whose application processors did not come up fails, even if every test passed).
pub(crate) fn check_cpus_online(serial: &[String], expected: u32) -> Option<String> {
    match parse_cpus_online(serial) {
        Some(n) if n == expected => None,
        Some(n) => Some(format!(
            "the kernel brought {n} CPU(s) online, expected {expected}"
        )),
        None => Some(format!(
            "no `smp: N CPUs online` line (expected {expected} CPU(s))"
        )),
    }
}

/// The last `load: runtime R link L delta D` line (hex numbers) → `(R, L, D)`.
pub(crate) fn parse_load(serial: &[String]) -> Option<(u64, u64, u64)> {
    serial.iter().rev().find_map(|line| {
        let rest = line.trim_end().strip_prefix("load: runtime ")?;
        let (runtime, rest) = rest.split_once(" link ")?;
        let (link, delta) = rest.split_once(" delta ")?;
        let hex = |t: &str| u64::from_str_radix(t.strip_prefix("0x")?, 16).ok();
        Some((hex(runtime)?, hex(link)?, hex(delta)?))
    })
}

/// A problem unless the kernel reported (`load: …`, from the test
/// `pie_image_runs_at_its_load_address`) that it runs `expected` bytes above its link
/// address, consistently. The relocated run expects its non-zero move, so it cannot
/// pass by booting at the link address.
pub(crate) fn check_load_delta(serial: &[String], expected: u64) -> Option<String> {
    match parse_load(serial) {
        Some((runtime, link, delta))
            if delta == expected && runtime.wrapping_sub(link) == delta =>
        {
            None
        }
        Some((runtime, link, delta)) => Some(format!(
            "the kernel ran at {runtime:#x}, linked at {link:#x} (delta {delta:#x}), \
             expected a delta of {expected:#x}"
        )),
        None => Some(format!(
            "no `load: runtime R link L delta D` line (expected delta {expected:#x})"
        )),
    }
}

/// Collect `ifunc-choice <name> <impl_name>` lines: ifunc name → implementation.
pub(crate) fn parse_choices(serial: &[String]) -> BTreeMap<String, String> {
    serial
        .iter()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("ifunc-choice ")?;
            let (name, choice) = rest.split_once(' ')?;
            (!name.is_empty() && !choice.is_empty() && !choice.contains(' '))
                .then(|| (name.to_owned(), choice.to_owned()))
        })
        .collect()
}

fn show(choice: Option<&String>) -> &str {
    choice.map_or("(not reported)", String::as_str)
}

/// Name suffixes of the ifuncs whose choice must differ between `qemu64` and `max`
/// (`rmod_mix`: the Rust test module's own ifunc, resolved when the module loads).
pub(crate) const MUST_DIFFER: &[&str] = &["popcount", "sum_u32", "rmod_mix"];

/// In-kernel tests every run must report `ok` for: the module tests (issue 5). A kernel
/// that skipped them (e.g. built without its modules) fails instead of passing with
/// fewer tests.
pub(crate) const REQUIRED_TESTS: &[&str] = &[
    "module_arena_alloc_protect_poke_free",
    "modules_embedded_are_et_rel",
    "module_load_rust_and_c",
    "module_kernel_ifunc_sites_direct_to_choice",
    "module_calls_through_kernel_ifuncs",
    "module_own_ifunc_by_cpu_model",
    "module_probes_registry_fire_args",
    "module_unload_refused_while_held",
    "module_unload_removes_probes_and_memory",
    "module_unknown_symbol_fails_cleanly",
    "module_load_unload_load",
    "module_loader_never_allocates",
];

/// In-kernel tests of static keys and live retargeting (issue 18) every x86_64 run
/// must pass, except the C boot run (which, like the probe tests they build on, it
/// skips).
pub(crate) const KEY_RETARGET_TESTS: &[&str] = &[
    "static_key_defaults_before_any_enable",
    "static_key_enable_disable_patch_sites",
    "static_key_inc_dec_refcount_underflow",
    "static_key_failed_batch_rolls_back",
    "static_key_introspection_lists_keys",
    "static_key_module_loaded_while_enabled_gets_sites_enabled",
    "static_key_after_module_unload_still_toggles",
    "ifunc_retarget_rewrites_every_site_and_slot",
    "ifunc_retarget_failed_batch_rolls_back",
    "ifunc_retarget_modules_follow_loaded_and_later",
    "ifunc_retarget_reresolve_all_features",
];

/// Issue 18's stress tests, which need other CPUs: required on every run with more
/// than one.
pub(crate) const KEY_RETARGET_SMP_TESTS: &[&str] = &[
    "static_key_smp_10000_toggles_while_aps_run_sites",
    "ifunc_retarget_smp_10000_while_aps_call",
];

/// A problem for every test of [`KEY_RETARGET_TESTS`] (and, with `cpus` > 1, of
/// [`KEY_RETARGET_SMP_TESTS`]) without an `ok <name>` line.
pub(crate) fn check_key_retarget(serial: &[String], cpus: u32) -> Vec<String> {
    let mut problems = check_required_tests(serial, KEY_RETARGET_TESTS);
    if cpus > 1 {
        problems.extend(check_required_tests(serial, KEY_RETARGET_SMP_TESTS));
    }
    problems
}

/// A problem for every test in [`REQUIRED_TESTS`] without an `ok <name>` line.
pub(crate) fn check_required(serial: &[String]) -> Vec<String> {
    check_required_tests(serial, REQUIRED_TESTS)
}

/// What the C boot path (`ksites.boot=c`, `qemu-tests/kernel/c/cboot.c`) prints once
/// `ksites_init` succeeded from C.
pub(crate) const C_BOOT_LINE: &str = "ksites: initialised from C";

/// In-kernel tests the C boot run must pass besides [`REQUIRED_TESTS`]: the C init and
/// the C module API's tests.
pub(crate) const C_BOOT_TESTS: &[&str] = &[
    "capi_cboot_init",
    "capi_cboot_second_init_refused",
    "capi_module_load",
    "capi_module_call",
    "capi_module_probe_in_module",
    "capi_module_unload_refused_while_held",
    "capi_module_unload",
    "capi_module_bad_module_refused",
    "capi_module_load_unload_load",
    "capi_c_probe_lookup_enable_fire_disable",
];

/// The C boot run's problems: no [`C_BOOT_LINE`], or a test of [`C_BOOT_TESTS`] that did
/// not pass.
pub(crate) fn check_c_boot(serial: &[String]) -> Vec<String> {
    let mut problems = check_required_tests(serial, C_BOOT_TESTS);
    if !serial.iter().any(|line| line.starts_with(C_BOOT_LINE)) {
        problems.push(format!(
            "no `{C_BOOT_LINE}` line: ksites was not initialised from C"
        ));
    }
    problems
}

/// A problem for every test in `required` without an `ok <name>` line.
pub(crate) fn check_required_tests(serial: &[String], required: &[&str]) -> Vec<String> {
    required
        .iter()
        .filter(|name| {
            !serial
                .iter()
                .any(|line| line.trim_end().strip_prefix("ok ") == Some(**name))
        })
        .map(|name| format!("required test `{name}` did not pass (no `ok {name}` line)"))
        .collect()
}

/// For every suffix in [`MUST_DIFFER`], at least one ifunc with that suffix must be reported
/// by both models, and every such ifunc must have picked different implementations.
pub(crate) fn check_choices_differ(
    (model_a, a): (&str, &BTreeMap<String, String>),
    (model_b, b): (&str, &BTreeMap<String, String>),
) -> Result<(), String> {
    let mut problems = Vec::new();
    for suffix in MUST_DIFFER {
        let names: Vec<&String> = a
            .keys()
            .chain(b.keys())
            .filter(|name| name.ends_with(suffix))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.is_empty() {
            problems.push(format!(
                "no `ifunc-choice …{suffix} …` line from {model_a} or {model_b}"
            ));
        }
        for name in names {
            let (ca, cb) = (a.get(name), b.get(name));
            if ca.is_none() || cb.is_none() || ca == cb {
                problems.push(format!(
                    "{name}: {model_a} chose {}, {model_b} chose {} (expected different \
                     implementations)",
                    show(ca),
                    show(cb)
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "cross-model check failed:\n  {}",
            problems.join("\n  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const GOOD: &str = "\
ksites test kernel
ifunc-choice kfuncs::popcount popcount_popcnt
ifunc-choice kfuncs::sum_u32 sum_u32_avx2
ok   boot::table_valid
ok   ifunc::popcount_matches_cpuid
2 passed, 0 failed\r
";

    #[test]
    fn passing_run() {
        let verdict = judge(&Exit::Code(33), &lines(GOOD));
        assert_eq!(verdict.problems, Vec::<String>::new());
        assert!(verdict.ok());
        assert_eq!((verdict.passed, verdict.failed), (Some(2), Some(0)));
    }

    #[test]
    fn failing_runs() {
        let v = judge(&Exit::Code(35), &lines(GOOD));
        assert!(!v.ok() && v.problems[0].contains("kernel reported failure"));

        let v = judge(&Exit::Code(0), &lines(GOOD));
        assert!(v.problems[0].contains("exit status 0"), "{:?}", v.problems);

        let v = judge(&Exit::Timeout(120), &lines(GOOD));
        assert_eq!(v.problems, vec!["timeout after 120 s".to_owned()]);

        let v = judge(&Exit::Signal, &lines(GOOD));
        assert!(!v.ok());

        let v = judge(&Exit::Code(33), &lines("1 passed, 1 failed\n"));
        assert_eq!(v.problems, vec!["1 test(s) failed".to_owned()]);
        assert_eq!((v.passed, v.failed), (Some(1), Some(1)));

        let v = judge(&Exit::Code(33), &lines("0 passed, 0 failed\n"));
        assert_eq!(v.problems, vec!["0 tests passed".to_owned()]);

        let v = judge(&Exit::Code(33), &lines("tests: 3 passed, 0 failed\n"));
        assert_eq!((v.passed, v.problems.len()), (None, 1));

        for bad in [
            "FAIL ifunc::x",
            "FAULT #GP at 0x1000",
            "PANIC at src/main.rs",
        ] {
            let v = judge(&Exit::Code(33), &lines(&format!("{GOOD}{bad}\n")));
            assert_eq!(v.problems.len(), 1, "{bad}");
            assert!(v.problems[0].contains(bad), "{:?}", v.problems);
        }
        // `FAILED` or an indented FAIL is not a failure line.
        let v = judge(
            &Exit::Code(33),
            &lines(&format!("{GOOD}  FAIL x\nFAILURES: none\n")),
        );
        assert!(v.ok(), "{:?}", v.problems);
    }

    #[test]
    fn summaries() {
        assert_eq!(parse_summary("12 passed, 0 failed"), Some((12, 0)));
        assert_eq!(parse_summary("12 passed, 3 failed\r"), Some((12, 3)));
        assert_eq!(parse_summary("+1 passed, 0 failed"), None);
        assert_eq!(parse_summary(" 1 passed, 0 failed"), None);
        assert_eq!(parse_summary("1 passed, 0 failed."), None);
        assert_eq!(parse_summary("passed, 0 failed"), None);
    }

    #[test]
    fn load_delta() {
        let moved = lines(
            "load: runtime 0x900000 link 0x100000 delta 0x800000\n\
             load: 983 R_X86_64_RELATIVE applied\n",
        );
        assert_eq!(parse_load(&moved), Some((0x90_0000, 0x10_0000, 0x80_0000)));
        assert_eq!(check_load_delta(&moved, 0x80_0000), None);
        // A relocated run that booted at its link address fails.
        let err = check_load_delta(&moved, 0).unwrap();
        assert!(
            err.contains("delta 0x800000), expected a delta of 0x0"),
            "{err}"
        );
        let home = lines("load: runtime 0x100000 link 0x100000 delta 0x0\n");
        assert_eq!(check_load_delta(&home, 0), None);
        assert!(check_load_delta(&home, 0x80_0000).is_some());
        // Inconsistent numbers, a missing or malformed line.
        let odd = lines("load: runtime 0x900000 link 0x100000 delta 0x400000\n");
        assert!(check_load_delta(&odd, 0x40_0000).is_some());
        assert!(
            check_load_delta(&lines(GOOD), 0)
                .unwrap()
                .contains("no `load:")
        );
        assert_eq!(
            parse_load(&lines("load: runtime 900000 link 0x0 delta 0x0\n")),
            None
        );
    }

    #[test]
    fn cpus_online() {
        let out = lines(
            "smp: 4 CPUs online (APIC ids [0, 1, 2, 3]; the MADT lists 4)\n\
             smp: RSDP at 0xf59d0\n",
        );
        assert_eq!(parse_cpus_online(&out), Some(4));
        assert_eq!(check_cpus_online(&out, 4), None);
        let err = check_cpus_online(&out, 2).unwrap();
        assert!(err.contains("4 CPU(s) online, expected 2"), "{err}");
        let one = lines("smp: 1 CPU online (APIC ids [0])\n");
        assert_eq!(check_cpus_online(&one, 1), None);
        assert!(check_cpus_online(&one, 4).is_some());
        assert!(
            check_cpus_online(&lines(GOOD), 1)
                .unwrap()
                .contains("no `smp:")
        );
        assert_eq!(parse_cpus_online(&lines("smp: x CPUs online\n")), None);
        assert_eq!(parse_cpus_online(&lines("smp: 4 CPUs offline\n")), None);
    }

    #[test]
    fn c_boot_needs_its_line_and_tests() {
        let mut all: String = C_BOOT_TESTS.iter().map(|t| format!("ok {t}\n")).collect();
        let problems = check_c_boot(&lines(&all));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(C_BOOT_LINE));
        all.push_str("ksites: initialised from C: 6 ifuncs resolved\n");
        assert_eq!(check_c_boot(&lines(&all)), Vec::<String>::new());
        let failed = all.replace("ok capi_module_unload\n", "FAIL capi_module_unload: x\n");
        assert_eq!(
            check_c_boot(&lines(&failed)),
            ["required test `capi_module_unload` did not pass (no `ok capi_module_unload` line)"]
        );
    }

    #[test]
    fn required_tests() {
        let all: String = REQUIRED_TESTS
            .iter()
            .map(|t| format!("ok {t}\r\n"))
            .collect();
        assert_eq!(check_required(&lines(&all)), Vec::<String>::new());
        let missing = all.replace(
            "ok module_load_unload_load",
            "FAIL module_load_unload_load: x",
        );
        let problems = check_required(&lines(&missing));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("`module_load_unload_load`"),
            "{problems:?}"
        );
        assert_eq!(check_required(&lines(GOOD)).len(), REQUIRED_TESTS.len());
    }

    #[test]
    fn key_retarget_tests_required_and_smp_ones_on_smp_runs() {
        let one: String = KEY_RETARGET_TESTS
            .iter()
            .map(|t| format!("ok {t}\n"))
            .collect();
        assert_eq!(check_key_retarget(&lines(&one), 1), Vec::<String>::new());
        let smp = check_key_retarget(&lines(&one), 4);
        assert_eq!(smp.len(), KEY_RETARGET_SMP_TESTS.len(), "{smp:?}");
        assert!(smp[0].contains("static_key_smp_10000"), "{smp:?}");
        let all: String = KEY_RETARGET_SMP_TESTS
            .iter()
            .map(|t| format!("ok {t}\n"))
            .collect::<String>()
            + &one;
        assert_eq!(check_key_retarget(&lines(&all), 4), Vec::<String>::new());
        let failed = all.replace(
            "ok ifunc_retarget_reresolve_all_features",
            "FAIL ifunc_retarget_reresolve_all_features: x",
        );
        assert_eq!(check_key_retarget(&lines(&failed), 4).len(), 1);
        assert_eq!(
            check_key_retarget(&lines(GOOD), 4).len(),
            KEY_RETARGET_TESTS.len() + KEY_RETARGET_SMP_TESTS.len()
        );
    }

    #[test]
    fn choices() {
        let qemu64 = parse_choices(&lines(
            "ifunc-choice kfuncs::popcount popcount_generic\n\
             ifunc-choice kfuncs::sum_u32 sum_u32_scalar\n\
             ifunc-choice kfuncs::memcpy memcpy_sse2\n\
             ifunc-choice rmod::rmod_mix mix_base\n\
             ifunc-choice broken\n",
        ));
        assert_eq!(qemu64.len(), 4);
        assert_eq!(qemu64["kfuncs::popcount"], "popcount_generic");
        let max = parse_choices(&lines(
            "ifunc-choice kfuncs::popcount popcount_popcnt\n\
             ifunc-choice kfuncs::sum_u32 sum_u32_avx2\n\
             ifunc-choice kfuncs::memcpy memcpy_sse2\n\
             ifunc-choice rmod::rmod_mix mix_avx2\n",
        ));
        assert_eq!(
            check_choices_differ(("qemu64", &qemu64), ("max", &max)),
            Ok(())
        );

        let mut same = max.clone();
        same.insert("kfuncs::sum_u32".into(), "sum_u32_scalar".into());
        let err = check_choices_differ(("qemu64", &qemu64), ("max", &same)).unwrap_err();
        assert!(
            err.contains("kfuncs::sum_u32: qemu64 chose sum_u32_scalar, max chose sum_u32_scalar"),
            "{err}"
        );
        assert!(!err.contains("popcount"), "{err}");

        let mut missing = max.clone();
        missing.remove("kfuncs::popcount");
        let err = check_choices_differ(("qemu64", &qemu64), ("max", &missing)).unwrap_err();
        assert!(err.contains("max chose (not reported)"), "{err}");

        let err = check_choices_differ(("qemu64", &BTreeMap::new()), ("max", &BTreeMap::new()))
            .unwrap_err();
        assert!(
            err.contains("popcount") && err.contains("sum_u32") && err.contains("rmod_mix"),
            "{err}"
        );
    }
}
