//! The riscv64 platform tests: the FP state, what the device tree says and the CPU
//! features from it, the trap path (`ebreak` resumed, FP state preserved), SBI HSM
//! start-up of every hart, the IPI synchronisation round, jobs on every hart with its
//! paging on; and, under their riscv64 names, the shared W^X, alias-patching and
//! live-patching tests (`crate::shared::wx_tests`, `crate::shared::live_tests`). The
//! text functions those use (`ksites_rv_text_canary`, `ksites_rv_patch_page` at the
//! start of the patch page) are here; `testing.rs` hands them out.

use core::sync::atomic::{AtomicU64, Ordering};

use super::exceptions::{PLATFORM_EBREAKS, ksites_rv_clobber_site, ksites_rv_ebreak_fn};
use super::{dt, mmu, sbi, smp};
use crate::harness::{Harness, TestResult};
use crate::shared::{live_tests, wx_tests};
use crate::{ensure, println};
use kernel_loader::CpuFeatures;

core::arch::global_asm!(
    r#"
    .option push
    .option norvc
    .text
    .balign 4
    .global ksites_rv_text_canary
ksites_rv_text_canary:
    li a0, 42
    ret

    .section .text.patch_page, "ax"
    .balign 4096
    .global ksites_rv_patch_page
ksites_rv_patch_page:
    li a0, 1
    ret
    .fill 1022, 4, 0x00100073
    .option pop
"#
);

/// Runs every platform test, in boot order (the other harts start before the IPI tests).
pub fn run(h: &mut Harness) {
    h.run("riscv64_fp_state_enabled", fp_state_enabled);
    h.run("riscv64_device_tree_read", device_tree_read);
    h.run(
        "riscv64_cpu_features_match_device_tree",
        cpu_features_match_device_tree,
    );
    h.run(
        "riscv64_text_is_not_writable",
        wx_tests::text_is_not_writable,
    );
    h.run(
        "riscv64_data_is_not_executable",
        wx_tests::data_is_not_executable,
    );
    h.run(
        "riscv64_fence_i_makes_new_code_visible",
        wx_tests::sync_icache_makes_new_code_visible,
    );
    h.run(
        "riscv64_ebreak_is_trapped_and_resumed",
        ebreak_is_trapped_and_resumed,
    );
    h.run("riscv64_traps_preserve_fp_state", traps_preserve_fp_state);
    h.run("riscv64_secondary_harts_start", secondary_harts_start);
    h.run("riscv64_ipi_reaches_every_hart", ipi_reaches_every_hart);
    h.run(
        "riscv64_jobs_run_on_every_hart_with_paging",
        jobs_run_on_every_hart_with_paging,
    );
    h.run(
        "riscv64_live_patch_seen_by_every_hart",
        live_tests::live_patch_seen_by_every_cpu,
    );
}

fn fp_state_enabled() -> TestResult {
    let sstatus: u64;
    // SAFETY: reading a CSR.
    unsafe { core::arch::asm!("csrr {}, sstatus", out(reg) sstatus, options(nomem, nostack)) };
    let fs = (sstatus >> 13) & 3;
    ensure!(fs != 0, "sstatus.FS is Off (sstatus {sstatus:#x})");
    let (a, b) = (1.5f64.to_bits(), 2.25f64.to_bits());
    let sum: u64;
    // SAFETY: FP registers only, declared clobbered.
    unsafe {
        core::arch::asm!(
            "fmv.d.x ft0, {a}",
            "fmv.d.x ft1, {b}",
            "fadd.d ft2, ft0, ft1",
            "fmv.x.d {s}, ft2",
            a = in(reg) a,
            b = in(reg) b,
            s = out(reg) sum,
            out("ft0") _, out("ft1") _, out("ft2") _,
            options(nomem, nostack),
        );
    }
    ensure!(
        f64::from_bits(sum) == 3.75,
        "fadd.d gave {}",
        f64::from_bits(sum)
    );
    Ok(())
}

fn device_tree_read() -> TestResult {
    let m = dt::machine().ok_or("the device tree was not read")?;
    ensure!(m.timebase > 0, "timebase 0");
    ensure!(
        m.isa().starts_with("rv64imafdc"),
        "riscv,isa `{}` is not RV64GC",
        m.isa()
    );
    ensure!(
        smp::hart_of(0).is_some_and(|h| m.harts().contains(&h)),
        "the boot hart {:?} is not among the tree's {:?}",
        smp::hart_of(0),
        m.harts()
    );
    ensure!(
        m.memory.0 == mmu::RAM_BASE && m.memory.1 >= mmu::RAM_SIZE,
        "RAM {:#x}+{:#x}, expected at least {:#x}+{:#x}",
        m.memory.0,
        m.memory.1,
        mmu::RAM_BASE,
        mmu::RAM_SIZE
    );
    Ok(())
}

fn cpu_features_match_device_tree() -> TestResult {
    let m = dt::machine().ok_or("the device tree was not read")?;
    let f = CpuFeatures::detect();
    for (name, bit) in super::SHOWN_FEATURES {
        ensure!(
            f.contains(*bit) == m.has_extension(name),
            "{name}: CpuFeatures says {}, riscv,isa `{}` says {}",
            f.contains(*bit),
            m.isa(),
            m.has_extension(name)
        );
    }
    ensure!(
        f.contains(CpuFeatures::F | CpuFeatures::D | CpuFeatures::C),
        "RV64GC without F, D or C: {f:?}"
    );
    let unusable = CpuFeatures::unusable();
    ensure!(
        unusable.is_empty(),
        "features kept from use by sstatus after enable_simd_state: {unusable:?}"
    );
    Ok(())
}

fn ebreak_is_trapped_and_resumed() -> TestResult {
    let before = PLATFORM_EBREAKS.load(Ordering::SeqCst);
    // SAFETY: `li a0, 0; ebreak; li a0, 7; ret`; the handler resumes after the ebreak.
    let v = unsafe { ksites_rv_ebreak_fn() };
    let after = PLATFORM_EBREAKS.load(Ordering::SeqCst);
    ensure!(
        v == 7,
        "returned {v} (expected 7: resumed after the ebreak)"
    );
    ensure!(after == before + 1, "{} ebreaks handled", after - before);
    Ok(())
}

fn traps_preserve_fp_state() -> TestResult {
    let values = [
        0x3ff8_0000_0000_0001u64,
        0x4000_0000_0000_0002,
        0xc010_0000_0000_0003,
    ];
    let (f0, f8, f31, frm): (u64, u64, u64, u64);
    // SAFETY: the clobber site is `ebreak; ret`, whose trap handler overwrites f0, f8,
    // f31 and `fcsr.frm` (restored from the trap frame if the entry saved them); every
    // register the call may change is declared.
    unsafe {
        core::arch::asm!(
            "fmv.d.x f0, {a}",
            "fmv.d.x f8, {b}",
            "fmv.d.x f31, {c}",
            "fsrmi 1",
            "jalr ra, 0({site})",
            "fmv.x.d {a}, f0",
            "fmv.x.d {b}, f8",
            "fmv.x.d {c}, f31",
            "frrm {rm}",
            "fsrmi 0",
            site = in(reg) ksites_rv_clobber_site as *const () as u64,
            a = inout(reg) values[0] => f0,
            b = inout(reg) values[1] => f8,
            c = inout(reg) values[2] => f31,
            rm = out(reg) frm,
            out("ra") _,
            out("f0") _, out("f8") _, out("f31") _,
            options(nostack),
        );
    }
    ensure!(
        [f0, f8, f31] == values,
        "after a trap: f0 {f0:#x} f8 {f8:#x} f31 {f31:#x}, expected {values:x?}"
    );
    ensure!(frm == 1, "after a trap: frm {frm} (expected 1)");
    Ok(())
}

fn secondary_harts_start() -> TestResult {
    let m = dt::machine().ok_or("the device tree was not read")?;
    let s = smp::start_secondaries();
    let online = smp::online();
    let harts: [usize; smp::MAX_CPUS] =
        core::array::from_fn(|c| smp::hart_of(c).unwrap_or(usize::MAX));
    println!(
        "smp: {online} CPU{} online (SBI HSM hart_start accepted {}; harts by CPU {:?})",
        if online == 1 { "" } else { "s" },
        s.accepted,
        &harts[..online as usize]
    );
    ensure!(
        s.missing == 0,
        "{} harts started but never reported in",
        s.missing
    );
    ensure!(
        s.stop_status == 0,
        "hart_start failed: SBI error {}",
        s.stop_status
    );
    let expected = m.hart_count.min(smp::MAX_CPUS) as u32;
    ensure!(
        online == expected,
        "{online} online, the device tree lists {expected}"
    );
    for cpu in 0..online as usize {
        ensure!(smp::is_online(cpu), "CPU {cpu} did not report in");
    }
    // A second hart_start for a running hart is refused (SBI_ERR_ALREADY_AVAILABLE).
    if let Some(hart) = smp::hart_of(1) {
        let again = sbi::hart_start(hart, 0x8020_0000, 1);
        ensure!(again == -6, "hart_start for a running hart: {again}");
    }
    Ok(())
}

fn ipi_reaches_every_hart() -> TestResult {
    const ROUNDS: u64 = 100;
    let n = smp::online() as usize;
    let before: [u64; smp::MAX_CPUS] =
        core::array::from_fn(|c| smp::IPIS_HANDLED[c].load(Ordering::SeqCst));
    let rounds = smp::ROUNDS.load(Ordering::SeqCst);
    for _ in 0..ROUNDS {
        smp::sync_cores();
    }
    ensure!(
        smp::ROUNDS.load(Ordering::SeqCst) == rounds + ROUNDS,
        "rounds not counted"
    );
    for (cpu, was) in before.iter().enumerate().take(n).skip(1) {
        let now = smp::IPIS_HANDLED[cpu].load(Ordering::SeqCst);
        ensure!(
            now - was == ROUNDS,
            "CPU {cpu} handled {} IPIs for {ROUNDS} rounds",
            now - was
        );
    }
    Ok(())
}

static JOB_RUNS: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];
static JOB_SATP: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];

fn record_job(cpu: usize) {
    JOB_RUNS[cpu].fetch_add(1, Ordering::SeqCst);
    JOB_SATP[cpu].store(mmu::satp(), Ordering::SeqCst);
}

fn jobs_run_on_every_hart_with_paging() -> TestResult {
    let n = smp::online() as usize;
    let before: [u64; smp::MAX_CPUS] = core::array::from_fn(|c| JOB_RUNS[c].load(Ordering::SeqCst));
    let round = smp::start_job(record_job);
    ensure!(
        smp::wait_job(round, smp::ACK_TIMEOUT_US),
        "a hart did not finish the job"
    );
    let satp = mmu::satp();
    ensure!(satp >> 60 == 8, "CPU 0's satp {satp:#x} is not Sv39");
    for cpu in 1..n {
        let runs = JOB_RUNS[cpu].load(Ordering::SeqCst) - before[cpu];
        ensure!(runs == 1, "CPU {cpu} ran the job {runs} times");
        let theirs = JOB_SATP[cpu].load(Ordering::SeqCst);
        ensure!(
            theirs == satp,
            "CPU {cpu}'s satp {theirs:#x}, CPU 0's {satp:#x}"
        );
    }
    Ok(())
}
