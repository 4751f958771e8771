//! `cargo xtask qemu`: build, embed, cross-check against objdump, boot on each CPU model.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use object::LittleEndian;
use object::elf::{ET_DYN, ET_EXEC, FileHeader64, PT_LOAD, PT_NOTE, ProgramHeader64};
use object::read::elf::{FileHeader, ProgramHeader};
use xshell::{Shell, cmd};

use crate::judge::{self, Exit, Verdict};
use crate::{crosscheck, install, modules, qemu_aarch64, qemu_riscv64};

/// The CPU models booted when `--cpu` is not given. `MODEL-smpN` boots `MODEL` with N
/// CPUs under multi-threaded TCG (see [`split_label`]).
pub(crate) const DEFAULT_CPUS: &[&str] = &["qemu64", "max", "Haswell", "qemu64-smp4", "max-smp4"];
const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// An SMP run may take this many times `--timeout` (it runs the live-patching stress).
pub(crate) const SMP_TIMEOUT_FACTOR: u32 = 3;
const KERNEL_TARGET: &str = "x86_64-unknown-none";
/// Extra rustflags for [`KERNEL_TARGET`] (cargo adds them to `.cargo/config.toml`'s).
const STATIC_RUSTFLAGS_ENV: &str = "CARGO_TARGET_X86_64_UNKNOWN_NONE_RUSTFLAGS";

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct QemuArgs {
    /// Architecture whose test kernel to build and boot; repeat for several
    /// [default: all three]
    #[arg(long = "arch", value_enum, value_name = "ARCH")]
    pub(crate) arches: Vec<Arch>,
    /// CPU model to boot, `MODEL-smpN` for N CPUs; repeat to boot several. x86_64:
    /// [default: qemu64, max, Haswell, qemu64-smp4, max-smp4]; aarch64 (`aarch64-MODEL`,
    /// or `MODEL` with `--arch aarch64`): [default: aarch64-cortex-a57, aarch64-max,
    /// aarch64-max-smp4]; riscv64 (`riscv64-MODEL`, or `MODEL` with `--arch riscv64`):
    /// [default: riscv64-rv64, riscv64-rv64-zbb, riscv64-max-smp4]. Without `--arch`,
    /// `--cpu` boots only the architectures it names
    #[arg(long = "cpu", value_name = "MODEL")]
    pub(crate) cpus: Vec<String>,
    /// Seconds each single-CPU QEMU run may take before it is killed (SMP runs: 3x)
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = DEFAULT_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) timeout: u64,
    /// Do not build the build tool or the test kernel; use what is already built
    #[arg(long)]
    pub(crate) no_build: bool,
}

/// The architectures the test kernel boots on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Arch {
    /// qemu-system-x86_64, PVH entry, the ksites test list.
    #[value(name = "x86_64")]
    X86_64,
    /// qemu-system-aarch64 -M virt, the platform tests.
    Aarch64,
    /// qemu-system-riscv64 -M virt -bios default (OpenSBI), the platform tests.
    Riscv64,
}

impl Default for QemuArgs {
    fn default() -> Self {
        QemuArgs {
            arches: Vec::new(),
            cpus: Vec::new(),
            timeout: DEFAULT_TIMEOUT_SECS,
            no_build: false,
        }
    }
}

/// Where everything lives, relative to the project root.
#[derive(Debug)]
pub(crate) struct Paths {
    pub(crate) root: PathBuf,
    pub(crate) qemu_tests: PathBuf,
    ksites: PathBuf,
    kernel: PathBuf,
    kernel_gnu_ld: PathBuf,
    embedded: PathBuf,
}

impl Paths {
    pub(crate) fn new(root: &Path) -> Self {
        let qemu_tests = root.join("qemu-tests");
        Paths {
            root: root.to_path_buf(),
            ksites: root.join("target/release/ksites"),
            kernel: qemu_tests.join("target/x86_64-unknown-none/release/qemu-tests-kernel"),
            kernel_gnu_ld: qemu_tests
                .join("target/gnu-ld/x86_64-unknown-none/release/qemu-tests-kernel"),
            embedded: root.join("target/ksites/qemu-tests-kernel.ksites"),
            qemu_tests,
        }
    }
}

/// Runs the x86_64, aarch64 and riscv64 test kernels (those `--arch`/`--cpu` select);
/// returns the number of in-kernel tests that passed, summed over every run.
pub(crate) fn run(sh: &Shell, root: &Path, args: &QemuArgs) -> Result<u32> {
    let (riscv64, others) = qemu_riscv64::split_runs(args)?;
    let (x86_64, aarch64) = match &others {
        Some(others) => qemu_aarch64::split_runs(others)?,
        None => (None, None),
    };
    let mut passed = 0;
    if let Some(cpus) = x86_64 {
        passed += run_x86_64(
            sh,
            root,
            &QemuArgs {
                cpus,
                ..args.clone()
            },
        )?;
    }
    if let Some(labels) = aarch64 {
        passed += qemu_aarch64::run(sh, root, &labels, args)?;
    }
    if let Some(labels) = riscv64 {
        passed += qemu_riscv64::run(sh, root, &labels, args)?;
    }
    Ok(passed)
}

/// The x86_64 kernel: builds, embeds, cross-checks and boots; returns the number of
/// in-kernel tests that passed, summed over the CPU models.
fn run_x86_64(sh: &Shell, root: &Path, args: &QemuArgs) -> Result<u32> {
    let paths = Paths::new(root);
    install_tools(sh, &paths)?;
    if args.no_build {
        println!("xtask: --no-build: using the existing build tool and test kernel");
    } else {
        build(sh, &paths)?;
    }
    for (what, path) in [
        ("build tool", &paths.ksites),
        ("test kernel", &paths.kernel),
    ] {
        if !path.is_file() {
            bail!(
                "the {what} is missing: {} (build it, or drop --no-build)",
                path.display()
            );
        }
    }
    let inspect = embed(sh, &paths)?;
    cross_check_objdump(sh, &paths, &inspect)?;
    cross_check_keys(&paths, &inspect)?;
    let relocated = relocated_image(&paths.embedded, RELOCATE_BY)?;
    let passed = boot_all(&paths.embedded, args)?;
    let gnu_ld = Variant {
        suffix: "gnu-ld",
        what: "the GNU ld-linked kernel",
        model: "max",
        delta: 0,
    };
    let moved = Variant {
        suffix: "relocated",
        what: "the PIE kernel loaded away from its link address",
        model: "max-smp4",
        delta: RELOCATE_BY,
    };
    Ok(passed
        + gnu_ld.boot(&paths.kernel_gnu_ld, args)?
        + moved.boot(&relocated, args)?
        + boot_c(&paths.embedded, args)?)
}

/// Boots the kernel once more (on `max`, or the first `--cpu` model, one CPU) with
/// `ksites.boot=c` on the PVH command line: C initialises ksites and loads modules
/// through the C API (`qemu-tests/kernel/c/cboot.c`); the judge requires the C boot
/// line and the C module tests on top of the usual checks.
fn boot_c(image: &Path, args: &QemuArgs) -> Result<u32> {
    let model = args.cpus.first().map_or("max", |m| split_label(m).0);
    let label = format!("{model}/c-boot");
    let mut command = qemu_command(model, image);
    command.args(["-append", "ksites.boot=c"]);
    let (exit, serial) = boot(&label, command, Duration::from_secs(args.timeout))?;
    let mut verdict = judge::judge(&exit, &serial);
    verdict.problems.extend(judge::check_required(&serial));
    verdict.problems.extend(judge::check_c_boot(&serial));
    if !verdict.ok() {
        bail!(
            "[{label}] the C boot run failed: {}",
            verdict.problems.join("; ")
        );
    }
    println!("xtask: [{label}] passed ({exit})");
    Ok(verdict.passed.unwrap_or(0))
}

/// How far the `relocated` run moves the PIE kernel from its link address: 8 MiB, a
/// multiple of 2 MiB that keeps the image (linked at 1 MiB, a few MiB long) inside the
/// 16 MiB the kernel maps with 4 KiB pages.
const RELOCATE_BY: u64 = 8 << 20;

/// A kernel variant booted once, as run `MODEL/suffix`, besides the runs of
/// [`boot_all`]: the GNU ld-linked static kernel, and the PIE loaded [`RELOCATE_BY`]
/// above its link address (on 4 CPUs, so the APs' start-up and the live patching run
/// relocated too).
struct Variant {
    suffix: &'static str,
    what: &'static str,
    /// The run label booted unless `--cpu` is given (then its first model).
    model: &'static str,
    /// How far above its link address the kernel must report it runs.
    delta: u64,
}

impl Variant {
    /// Boots `image` and judges it like the other runs; the kernel must also report
    /// that it runs `delta` bytes above its link address.
    fn boot(&self, image: &Path, args: &QemuArgs) -> Result<u32> {
        let model = args.cpus.first().map_or(self.model, String::as_str);
        let label = format!("{model}/{}", self.suffix);
        let cpus = split_label(model).1;
        let mut timeout = Duration::from_secs(args.timeout);
        if cpus > 1 {
            timeout *= SMP_TIMEOUT_FACTOR;
        }
        let (exit, serial) = boot(&label, qemu_command(model, image), timeout)?;
        let mut verdict = judge::judge(&exit, &serial);
        verdict.problems.extend(judge::check_required(&serial));
        verdict
            .problems
            .extend(judge::check_key_retarget(&serial, cpus));
        verdict
            .problems
            .extend(judge::check_cpus_online(&serial, cpus));
        verdict
            .problems
            .extend(judge::check_load_delta(&serial, self.delta));
        if !verdict.ok() {
            bail!(
                "[{label}] {} failed: {}",
                self.what,
                verdict.problems.join("; ")
            );
        }
        println!("xtask: [{label}] passed ({exit})");
        Ok(verdict.passed.unwrap_or(0))
    }
}

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH note that gives the 32-bit entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The ELF type (`e_type`) of the image at `path`.
fn elf_type(path: &Path) -> Result<u16> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = FileHeader64::<LittleEndian>::parse(&*data).map_err(|e| {
        anyhow!(
            "{}: not a 64-bit little-endian ELF file: {e}",
            path.display()
        )
    })?;
    Ok(header.e_type(LittleEndian).0)
}

/// Acts as a boot loader that places the kernel `delta` bytes above where it was linked:
/// writes `IMAGE.relocated` (beside `image`), a copy whose every `PT_LOAD` has its
/// `p_paddr` (where QEMU loads it) and whose PVH note has its entry moved by `delta`.
/// Nothing else changes: the kernel finds where it runs and relocates itself.
fn relocated_image(image: &Path, delta: u64) -> Result<PathBuf> {
    let data = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let moved =
        relocate(&data, delta).with_context(|| format!("relocating {}", image.display()))?;
    let out = image.with_extension("relocated");
    std::fs::write(&out, moved).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "xtask: {} is the kernel to be loaded {delta:#x} above its link address",
        out.display()
    );
    Ok(out)
}

/// The bytes of [`relocated_image`]: `data` with each `PT_LOAD`'s `p_paddr` and the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note's entry (4 or 8 bytes) moved up by `delta`. Only an
/// `ET_DYN` image (a PIE) can be moved.
fn relocate(data: &[u8], delta: u64) -> Result<Vec<u8>> {
    let e = LittleEndian;
    let header = FileHeader64::<LittleEndian>::parse(data)
        .map_err(|err| anyhow!("not a 64-bit little-endian ELF file: {err}"))?;
    if header.e_type(e) != ET_DYN {
        bail!("only a PIE (ET_DYN) can be loaded away from its link address");
    }
    let phdrs = header
        .program_headers(e, data)
        .map_err(|err| anyhow!("program headers: {err}"))?;
    let mut out = data.to_vec();
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    let phoff = usize::try_from(header.e_phoff(e))?;
    let (mut loads, mut entries) = (0, 0);
    for (i, ph) in phdrs.iter().enumerate() {
        match ph.p_type(e) {
            PT_LOAD => {
                let at = phoff
                    + i * usize::from(header.e_phentsize(e))
                    + std::mem::offset_of!(ProgramHeader64<LittleEndian>, p_paddr);
                put(at, &(ph.p_paddr(e) + delta).to_le_bytes());
                loads += 1;
            }
            PT_NOTE => {
                let mut notes = ph
                    .notes(e, data)
                    .map_err(|err| anyhow!("notes: {err}"))?
                    .ok_or_else(|| anyhow!("PT_NOTE {i} is not a note segment"))?;
                while let Some(note) = notes.next().map_err(|err| anyhow!("notes: {err}"))? {
                    if note.name() != b"Xen" || note.n_type(e).0 != XEN_ELFNOTE_PHYS32_ENTRY {
                        continue;
                    }
                    let desc = note.desc();
                    let at = desc.as_ptr() as usize - data.as_ptr() as usize;
                    match *desc {
                        [a, b, c, d, ..] if desc.len() < 8 => {
                            let entry = u32::from_le_bytes([a, b, c, d]);
                            let moved = u64::from(entry) + delta;
                            put(at, &u32::try_from(moved)?.to_le_bytes());
                        }
                        [a, b, c, d, f, g, h, k, ..] => {
                            let entry = u64::from_le_bytes([a, b, c, d, f, g, h, k]);
                            put(at, &(entry + delta).to_le_bytes());
                        }
                        _ => bail!("the PVH entry note's descriptor is {} bytes", desc.len()),
                    }
                    entries += 1;
                }
            }
            _ => {}
        }
    }
    if loads == 0 || entries != 1 {
        bail!("{loads} PT_LOAD segments and {entries} PVH entry notes (expected 1)");
    }
    Ok(out)
}

/// The Rust target for the kernel, QEMU, and objdump (for the cross-check).
fn install_tools(sh: &Shell, paths: &Paths) -> Result<()> {
    install_kernel_target(sh, paths)?;
    install::host_tool(sh, "qemu-system-x86_64", "qemu-system-x86")?;
    install::host_tool(sh, "objdump", "binutils")
}

/// `rustup target add x86_64-unknown-none` if needed, for the toolchain that builds the kernel.
pub(crate) fn install_kernel_target(sh: &Shell, paths: &Paths) -> Result<()> {
    let _dir = paths
        .qemu_tests
        .is_dir()
        .then(|| sh.push_dir(&paths.qemu_tests));
    install::rust_target(sh, KERNEL_TARGET)
}

fn build(sh: &Shell, paths: &Paths) -> Result<()> {
    let _dir = sh.push_dir(&paths.root);
    cmd!(sh, "cargo build --release -p build-tool")
        .run()
        .context("building the build tool (build-tool) failed")?;
    // The test modules first: the kernel includes them (kernel/build.rs reads the
    // directory from KSITES_MODULE_DIR).
    let module_dir = modules::build(sh, &paths.root, &paths.ksites)?;
    let _modules = sh.push_env(modules::MODULE_DIR_ENV, &module_dir);
    // qemu-tests/.cargo/config.toml selects the target and links through `ksites-ld`
    // (the linker wrapper: rust-lld + `ksites embed`), so build from inside it.
    let _dir = sh.push_dir(&paths.qemu_tests);
    cmd!(sh, "cargo build --release")
        .run()
        .context("building the test kernel (qemu-tests) failed")?;
    // The same kernel linked by GNU ld through the same wrapper, as a static ET_EXEC
    // (the rust-lld one is a PIE): cargo appends these flags to the config's.
    let _env = sh.push_env("KSITES_LINKER", "bfd");
    let _static = sh.push_env(STATIC_RUSTFLAGS_ENV, "-C relocation-model=static");
    cmd!(sh, "cargo build --release --target-dir target/gnu-ld")
        .run()
        .context("building the test kernel with GNU ld failed")?;
    Ok(())
}

/// `ksites embed` the kernel, print `ksites inspect` of the result, and return that text.
/// The kernel comes out of `cargo build` already embedded (linked through
/// `ksites-ld`): check the rust-lld variant is a PIE and the GNU ld one a static
/// ET_EXEC, verify both, check the GNU ld one really is, copy the rust-lld
/// one to the image QEMU boots, and list its table.
fn embed(sh: &Shell, paths: &Paths) -> Result<String> {
    let Paths {
        ksites,
        kernel,
        kernel_gnu_ld,
        embedded,
        ..
    } = paths;
    if let Some(dir) = embedded.parent() {
        sh.create_dir(dir)?;
    }
    for (k, want, form) in [
        (kernel, ET_DYN.0, "a PIE (ET_DYN)"),
        (kernel_gnu_ld, ET_EXEC.0, "a static ET_EXEC"),
    ] {
        if elf_type(k)? != want {
            bail!("{} is not {form}", k.display());
        }
        cmd!(sh, "{ksites} verify {k}")
            .run()
            .with_context(|| format!("ksites verify failed on {}", k.display()))?;
    }
    let comment = cmd!(sh, "readelf -p .comment {kernel_gnu_ld}").read()?;
    if comment.contains("LLD") {
        bail!("{} was linked by LLD, not GNU ld", kernel_gnu_ld.display());
    }
    sh.copy_file(kernel, embedded)?;
    let inspect = cmd!(sh, "{ksites} inspect {embedded}")
        .read()
        .context("ksites inspect failed")?;
    println!("{inspect}");
    Ok(inspect)
}

/// Every ifunc's site count must match objdump's count of branches to its trampoline.
fn cross_check_objdump(sh: &Shell, paths: &Paths, inspect: &str) -> Result<()> {
    let kernel = &paths.kernel;
    let objdump = cmd!(sh, "objdump -dr --no-show-raw-insn {kernel}")
        .read()
        .context("objdump failed")?;
    let ifuncs = crosscheck::parse_inspect(inspect).map_err(|e| anyhow!(e))?;
    let rows = crosscheck::compare(&ifuncs, &crosscheck::count_branch_relocs(&objdump));
    println!("xtask: objdump cross-check of {}", kernel.display());
    print!("{}", crosscheck::render(&rows));
    crosscheck::check(&rows).map_err(|e| anyhow!("objdump cross-check failed: {e}"))
}

/// Every static key `ksites inspect` lists must have exactly the sites its records in
/// the linked kernel name (and there must be keys: the test kernel defines several).
fn cross_check_keys(paths: &Paths, inspect: &str) -> Result<()> {
    let data = std::fs::read(&paths.kernel)
        .with_context(|| format!("reading {}", paths.kernel.display()))?;
    let keys = crosscheck::keys::parse_inspect(inspect).map_err(|e| anyhow!(e))?;
    let records = crosscheck::keys::records(&data).map_err(|e| anyhow!(e))?;
    println!(
        "xtask: static key cross-check of {} ({} records in {})",
        paths.kernel.display(),
        records.values().map(|s| s.len()).sum::<usize>(),
        crosscheck::keys::SECTION
    );
    let table = crosscheck::keys::check(&keys, &records)
        .map_err(|e| anyhow!("static key cross-check failed: {e}"))?;
    print!("{table}");
    Ok(())
}

/// One finished QEMU run.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) model: String,
    pub(crate) verdict: Verdict,
    pub(crate) choices: BTreeMap<String, String>,
    pub(crate) elapsed: Duration,
}

fn boot_all(image: &Path, args: &QemuArgs) -> Result<u32> {
    let models: Vec<String> = if args.cpus.is_empty() {
        DEFAULT_CPUS.iter().map(|m| (*m).to_owned()).collect()
    } else {
        args.cpus.clone()
    };
    let mut runs = Vec::new();
    for model in &models {
        let start = Instant::now();
        let cpus = split_label(model).1;
        let mut timeout = Duration::from_secs(args.timeout);
        if cpus > 1 {
            timeout *= SMP_TIMEOUT_FACTOR;
        }
        let (exit, serial) = boot(model, qemu_command(model, image), timeout)?;
        let mut verdict = judge::judge(&exit, &serial);
        verdict.problems.extend(judge::check_required(&serial));
        verdict
            .problems
            .extend(judge::check_key_retarget(&serial, cpus));
        if let Some(problem) = judge::check_cpus_online(&serial, cpus) {
            verdict.problems.push(problem);
        }
        verdict.problems.extend(judge::check_load_delta(&serial, 0));
        println!(
            "xtask: [{model}] {} ({exit})",
            if verdict.ok() { "passed" } else { "FAILED" }
        );
        runs.push(Run {
            model: model.clone(),
            choices: judge::parse_choices(&serial),
            verdict,
            elapsed: start.elapsed(),
        });
    }

    let find = |name: &str| runs.iter().find(|r| r.model == name);
    let cross = match (find("qemu64"), find("max")) {
        (Some(a), Some(b)) => Some(judge::check_choices_differ(
            (&a.model, &a.choices),
            (&b.model, &b.choices),
        )),
        _ => None,
    };
    // The SMP runs boot the same kernel: their choices must differ the same way.
    let cross_smp = match (find("qemu64-smp4"), find("max-smp4")) {
        (Some(a), Some(b)) => Some(judge::check_choices_differ(
            (&a.model, &a.choices),
            (&b.model, &b.choices),
        )),
        _ => None,
    };

    println!();
    print!("{}", summary(&runs));
    let mut failures: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.verdict
                .problems
                .iter()
                .map(|p| format!("[{}] {p}", r.model))
        })
        .collect();
    match &cross {
        Some(Ok(())) => println!("cross-model check (qemu64 vs max): ok"),
        Some(Err(e)) => failures.push(e.clone()),
        None => println!("cross-model check skipped (needs both qemu64 and max)"),
    }
    match cross_smp {
        Some(Ok(())) => println!("cross-model check (qemu64-smp4 vs max-smp4): ok"),
        Some(Err(e)) => failures.push(e),
        None => {}
    }
    if failures.is_empty() {
        Ok(runs.iter().map(|r| r.verdict.passed.unwrap_or(0)).sum())
    } else {
        bail!("qemu runs failed:\n  {}", failures.join("\n  "))
    }
}

pub(crate) fn summary(runs: &[Run]) -> String {
    let width = runs.iter().map(|r| r.model.len()).max().unwrap_or(0).max(5);
    let count = |n: Option<u32>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut out = format!("{:<width$}  result  passed  failed     time\n", "model");
    for run in runs {
        out.push_str(&format!(
            "{:<width$}  {:<6}  {:>6}  {:>6}  {:>6.1} s\n",
            run.model,
            if run.verdict.ok() { "ok" } else { "FAIL" },
            count(run.verdict.passed),
            count(run.verdict.failed),
            run.elapsed.as_secs_f64(),
        ));
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Serial,
    Stderr,
}

/// A run label → (CPU model, CPU count): `max-smp4` → (`max`, 4), `Haswell` → (`Haswell`, 1).
pub(crate) fn split_label(label: &str) -> (&str, u32) {
    let smp = label.rsplit_once("-smp").and_then(|(model, n)| {
        let canonical = !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit());
        let n: u32 = n.parse().ok().filter(|_| canonical)?;
        (!model.is_empty()).then_some((model, n))
    });
    smp.unwrap_or((label, 1))
}

/// The QEMU command line that boots `image` as run `label` (`MODEL` or `MODEL-smpN`:
/// N CPUs under multi-threaded TCG).
fn qemu_command(label: &str, image: &Path) -> Command {
    let (model, cpus) = split_label(label);
    let mut command = Command::new("qemu-system-x86_64");
    if cpus > 1 {
        command
            .args(["-smp", &cpus.to_string()])
            .args(["-accel", "tcg,thread=multi"]);
    }
    command
        .args(["-cpu", model, "-m", "256M", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-monitor", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(image);
    command
}

/// Run `command` (QEMU), streaming its output prefixed with `[model] `, and kill it after
/// `timeout`. Returns how it ended and its serial (stdout) lines.
pub(crate) fn boot(
    model: &str,
    mut command: Command,
    timeout: Duration,
) -> Result<(Exit, Vec<String>)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("$ {}", shell_words(&command));
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;

    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, Stream::Serial, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, Stream::Stderr, tx);
    }

    let deadline = Instant::now() + timeout;
    let mut serial = Vec::new();
    let mut show = |(stream, line): (Stream, String)| match stream {
        Stream::Serial => {
            println!("[{model}] {line}");
            serial.push(line);
        }
        Stream::Stderr => eprintln!("[{model}] {line}"),
    };

    // Stream output until both pipes close (QEMU exited) or time runs out.
    let mut timed_out = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(item) => show(item),
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => break true,
        }
    };
    let mut status = None;
    while !timed_out {
        if let Some(s) = child.try_wait()? {
            status = Some(s);
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if timed_out {
        let _ = child.kill();
        child.wait()?;
        // Show whatever was still in flight, but do not wait long for it.
        while let Ok(item) = rx.recv_timeout(Duration::from_secs(1)) {
            show(item);
        }
        return Ok((Exit::Timeout(timeout.as_secs()), serial));
    }
    let exit = match status.and_then(|s| s.code()) {
        Some(code) => Exit::Code(code),
        None => Exit::Signal,
    };
    Ok((exit, serial))
}

/// Send each line of `pipe` (lossily decoded, without its line ending) to `tx`.
fn forward_lines(pipe: impl Read + Send + 'static, stream: Stream, tx: Sender<(Stream, String)>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

fn shell_words(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_table() {
        let run = |model: &str, exit, serial: &str| Run {
            model: model.to_owned(),
            verdict: judge::judge(
                &exit,
                &serial.lines().map(str::to_owned).collect::<Vec<_>>(),
            ),
            choices: BTreeMap::new(),
            elapsed: Duration::from_millis(2500),
        };
        let table = summary(&[
            run("qemu64", Exit::Code(33), "5 passed, 0 failed"),
            run("Haswell", Exit::Timeout(120), ""),
        ]);
        assert_eq!(
            table,
            "model    result  passed  failed     time\n\
             qemu64   ok           5       0     2.5 s\n\
             Haswell  FAIL         -       -     2.5 s\n"
        );
    }

    fn script(text: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", text]);
        command
    }

    #[test]
    fn boot_collects_serial_and_exit_status() {
        let (exit, serial) = boot(
            "fake",
            script("printf 'a\\r\\nb\\n'; echo warning >&2; printf 'no newline'; exit 33"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(exit, Exit::Code(33));
        assert_eq!(serial, ["a", "b", "no newline"]);
    }

    #[test]
    fn boot_times_out() {
        let start = Instant::now();
        let (exit, serial) = boot(
            "fake",
            script("echo started; exec sleep 30"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(exit, Exit::Timeout(1));
        assert_eq!(serial, ["started"]);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn qemu_command_line() {
        let command = qemu_command("Haswell", Path::new("/k.ksites"));
        assert_eq!(
            shell_words(&command),
            "qemu-system-x86_64 -cpu Haswell -m 256M -display none -serial stdio -no-reboot \
             -monitor none -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel /k.ksites"
        );
    }

    #[test]
    fn smp_labels() {
        assert_eq!(split_label("max-smp4"), ("max", 4));
        assert_eq!(split_label("qemu64-smp2"), ("qemu64", 2));
        assert_eq!(split_label("Haswell"), ("Haswell", 1));
        for odd in ["-smp4", "max-smp", "max-smpx", "max-smp04", "max-smp+4"] {
            assert_eq!(split_label(odd), (odd, 1), "{odd}");
        }
        let command = qemu_command("max-smp4", Path::new("/k.ksites"));
        assert_eq!(
            shell_words(&command),
            "qemu-system-x86_64 -smp 4 -accel tcg,thread=multi -cpu max -m 256M -display none \
             -serial stdio -no-reboot -monitor none -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
             -kernel /k.ksites"
        );
    }

    /// A minimal ELF64 image: one PT_LOAD at 1 MiB and a PT_NOTE with the PVH entry.
    fn tiny_elf(e_type: u16, note_type: u32) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        for half in [e_type, 62, 1, 0] {
            // e_type, e_machine, e_version (low half, then high half).
            f.extend_from_slice(&half.to_le_bytes());
        }
        for word in [0x10_1000u64, 64, 0] {
            f.extend_from_slice(&word.to_le_bytes()); // e_entry, e_phoff, e_shoff
        }
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 56, 2, 64, 0, 0] {
            f.extend_from_slice(&half.to_le_bytes());
        }
        let phdr = |f: &mut Vec<u8>, p_type: u32, offset: u64, size: u64, align: u64| {
            f.extend_from_slice(&p_type.to_le_bytes());
            f.extend_from_slice(&4u32.to_le_bytes()); // p_flags: R
            for word in [
                offset,
                0x10_0000 + offset,
                0x10_0000 + offset,
                size,
                size,
                align,
            ] {
                f.extend_from_slice(&word.to_le_bytes());
            }
        };
        phdr(&mut f, PT_LOAD.0, 0, 200, 0x1000);
        phdr(&mut f, PT_NOTE.0, 176, 24, 4);
        for word in [4u32, 8, note_type] {
            f.extend_from_slice(&word.to_le_bytes());
        }
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&0x10_1000u64.to_le_bytes());
        assert_eq!(f.len(), 200);
        f
    }

    #[test]
    fn relocate_moves_the_loads_and_the_pvh_entry_only() {
        let image = tiny_elf(ET_DYN.0, XEN_ELFNOTE_PHYS32_ENTRY);
        let moved = relocate(&image, 8 << 20).unwrap();
        let e = LittleEndian;
        let header = FileHeader64::<LittleEndian>::parse(&*moved).unwrap();
        let phdrs = header.program_headers(e, &*moved).unwrap();
        assert_eq!(phdrs[0].p_paddr(e), 0x90_0000);
        assert_eq!(phdrs[0].p_vaddr(e), 0x10_0000, "virtual addresses stay");
        assert_eq!(phdrs[1].p_paddr(e), 0x10_00b0, "only PT_LOADs move");
        assert_eq!(moved[192..], 0x90_1000u64.to_le_bytes());
        // Nothing else changed.
        let differ: Vec<usize> = (0..image.len()).filter(|&i| image[i] != moved[i]).collect();
        assert_eq!(differ, [64 + 24 + 2, 192 + 2], "{differ:?}");
    }

    #[test]
    fn relocate_refuses_a_static_image_or_one_without_the_pvh_note() {
        let exec = relocate(&tiny_elf(ET_EXEC.0, XEN_ELFNOTE_PHYS32_ENTRY), 1 << 21);
        assert!(format!("{:#}", exec.unwrap_err()).contains("only a PIE (ET_DYN)"));
        let no_note = relocate(&tiny_elf(ET_DYN.0, 17), 1 << 21);
        assert!(format!("{:#}", no_note.unwrap_err()).contains("0 PVH entry notes"));
        assert!(relocate(b"not an ELF file", 1 << 21).is_err());
    }

    #[test]
    fn paths_come_from_the_root() {
        let paths = Paths::new(Path::new("/r"));
        assert_eq!(paths.ksites, Path::new("/r/target/release/ksites"));
        assert_eq!(
            paths.kernel,
            Path::new("/r/qemu-tests/target/x86_64-unknown-none/release/qemu-tests-kernel")
        );
        assert_eq!(
            paths.embedded,
            Path::new("/r/target/ksites/qemu-tests-kernel.ksites")
        );
    }
}
