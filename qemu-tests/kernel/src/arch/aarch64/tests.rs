//! The aarch64 platform tests: CPU features against the raw ID registers, the SIMD
//! state, the BRK route, FP/SIMD state kept across exceptions, PSCI start-up of every
//! CPU and the SGI synchronisation round; and, under their aarch64 names, the shared W^X,
//! alias-patching and live-patching tests (`crate::shared::wx_tests`,
//! `crate::shared::live_tests`).

use core::sync::atomic::Ordering;

use kernel_loader::arch::aarch64::CpuFeatures;
use kernel_loader::arch::aarch64::probe::{BRK_IMM, Int3Frame};
use kernel_loader::arch::aarch64::trap::is_probe_brk;

use super::exceptions::PLATFORM_BRKS;
use super::{psci, smp};
use crate::harness::{Harness, Msg, TestResult};
use crate::shared::{live_tests, wx_tests};
use crate::{ensure, println};

core::arch::global_asm!(
    r#"
    .text
    .global ksites_a64_brk_fn
ksites_a64_brk_fn:
    mov x0, #0
    .global ksites_a64_brk_site
ksites_a64_brk_site:
    brk #{probe_brk}
    ret
"#,
    probe_brk = const BRK_IMM,
);

unsafe extern "C" {
    fn ksites_a64_brk_fn() -> u64;
    fn ksites_a64_brk_site();
}

/// Runs every platform test, in boot order (CPU features and SIMD first, the other CPUs
/// started before the SGI test).
pub fn run(h: &mut Harness) {
    h.run("aarch64_simd_state_enabled", simd_state_enabled);
    h.run(
        "aarch64_cpu_features_match_id_registers",
        cpu_features_match_id_registers,
    );
    h.run(
        "aarch64_text_is_not_writable",
        wx_tests::text_is_not_writable,
    );
    h.run(
        "aarch64_data_is_not_executable",
        wx_tests::data_is_not_executable,
    );
    h.run(
        "aarch64_sync_icache_makes_new_code_visible",
        wx_tests::sync_icache_makes_new_code_visible,
    );
    h.run(
        "aarch64_brk_is_trapped_and_resumed",
        brk_is_trapped_and_resumed,
    );
    h.run(
        "aarch64_exceptions_preserve_fp_simd_state",
        exceptions_preserve_fp_simd_state,
    );
    h.run("aarch64_secondary_cpus_start", secondary_cpus_start);
    h.run("aarch64_sgi_reaches_every_cpu", sgi_reaches_every_cpu);
    h.run(
        "aarch64_live_patch_seen_by_every_cpu",
        live_tests::live_patch_seen_by_every_cpu,
    );
}

fn simd_state_enabled() -> TestResult {
    // SAFETY: EL1 on QEMU virt without EL2/EL3 traps; nothing holds FP state to save.
    let state = unsafe { kernel_loader::arch::aarch64::enable_simd_state() };
    ensure!(state.fp, "enable_simd_state: no FP/AdvSIMD: {state:?}");
    let unusable = CpuFeatures::unusable();
    ensure!(
        unusable.is_empty(),
        "still trapped after enabling: {unusable:?}"
    );
    let (a, b) = ([1u32, 2, 3, 40_000], [10u32, 20, 30, 1]);
    let mut sum = [0u32; 4];
    // SAFETY: reads 16 bytes at `a` and `b` and writes 16 at `sum`, all arrays of four
    // u32; the vector registers used are declared clobbered.
    unsafe {
        core::arch::asm!(
            "ld1 {{v0.4s}}, [{a}]",
            "ld1 {{v1.4s}}, [{b}]",
            "add v2.4s, v0.4s, v1.4s",
            "st1 {{v2.4s}}, [{sum}]",
            a = in(reg) a.as_ptr(),
            b = in(reg) b.as_ptr(),
            sum = in(reg) sum.as_mut_ptr(),
            out("v0") _, out("v1") _, out("v2") _,
            options(nostack),
        );
    }
    ensure!(sum == [11, 22, 33, 40_001], "AdvSIMD add gave {sum:?}");
    if CpuFeatures::implemented().contains(CpuFeatures::SVE) {
        let vl: u64;
        // SAFETY: `rdvl x0, #1` (encoded: the assembler's default target lacks SVE)
        // reads the vector length; SVE is enabled (ZEN) by enable_simd_state.
        unsafe { core::arch::asm!(".inst 0x04bf5020", out("x0") vl, options(nomem, nostack)) };
        ensure!(
            state.sve && u64::from(state.sve_vector_bytes) == vl && vl >= 16,
            "SVE: state {state:?}, rdvl {vl}"
        );
    }
    println!(
        "simd: fp {} sve {} ({} byte vectors), save area {} bytes",
        state.fp, state.sve, state.sve_vector_bytes, state.save_area_size
    );
    Ok(())
}

/// ID register field `lsb + 4 .. lsb` of `reg`.
fn field(reg: u64, lsb: u32) -> u64 {
    (reg >> lsb) & 0xf
}

fn cpu_features_match_id_registers() -> TestResult {
    let (isar0, isar1, pfr0, midr): (u64, u64, u64, u64);
    // SAFETY: ID registers are readable at EL1; no side effect.
    unsafe {
        core::arch::asm!(
            "mrs {0}, ID_AA64ISAR0_EL1",
            "mrs {1}, ID_AA64ISAR1_EL1",
            "mrs {2}, ID_AA64PFR0_EL1",
            "mrs {3}, MIDR_EL1",
            out(reg) isar0, out(reg) isar1, out(reg) pfr0, out(reg) midr,
            options(nomem, nostack),
        );
    }
    let f = CpuFeatures::detect();
    let implemented = CpuFeatures::implemented();
    ensure!(
        CpuFeatures::from_id_registers(isar0, isar1, pfr0) == implemented,
        "from_id_registers differs from implemented(): {implemented:?}"
    );
    ensure!(
        f == implemented,
        "detect() {f:?} != implemented() {implemented:?}"
    );
    // Independent decoding of the fields the resolvers care most about.
    let expected = [
        ("lse", field(isar0, 20) >= 2, CpuFeatures::LSE),
        ("crc32", field(isar0, 16) >= 1, CpuFeatures::CRC32),
        ("aes", field(isar0, 4) >= 1, CpuFeatures::AES),
        ("pmull", field(isar0, 4) >= 2, CpuFeatures::PMULL),
        ("sha1", field(isar0, 8) >= 1, CpuFeatures::SHA1),
        ("sha2", field(isar0, 12) >= 1, CpuFeatures::SHA2),
        ("sha3", field(isar0, 32) >= 1, CpuFeatures::SHA3),
        ("rndr", field(isar0, 60) >= 1, CpuFeatures::RNDR),
        ("sve", field(pfr0, 32) >= 1, CpuFeatures::SVE),
    ];
    let mut line = Msg::new();
    for (name, has, flag) in expected {
        ensure!(
            f.contains(flag) == has,
            "{name}: ID registers say {has}, detect() says {} (ISAR0 {isar0:#x} PFR0 {pfr0:#x})",
            f.contains(flag)
        );
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!(" {name}={}", u8::from(has)));
    }
    // Cortex-A57 (MIDR part 0xd07) is Armv8.0: no LSE atomics, no SHA3, no SVE.
    let part = (midr >> 4) & 0xfff;
    if midr >> 24 == 0x41 && part == 0xd07 {
        ensure!(
            !f.intersects(CpuFeatures::LSE | CpuFeatures::SHA3 | CpuFeatures::SVE),
            "a Cortex-A57 reports {f:?}"
        );
    }
    println!("features:{line} (MIDR {midr:#x})");
    Ok(())
}

/// The int3/BRK hook of [`brk_is_trapped_and_resumed`]: resumes its one site's `brk`
/// after itself with x0 = 0x4b54.
fn brk_hook(f: &mut Int3Frame) -> bool {
    if f.pc != ksites_a64_brk_site as *const () as u64 {
        return false;
    }
    f.pc += 4;
    f.x0 = 0x4b54;
    true
}

fn brk_is_trapped_and_resumed() -> TestResult {
    let before = PLATFORM_BRKS.load(Ordering::SeqCst);
    // SAFETY: the vector resumes the platform BRK at the next instruction.
    unsafe { core::arch::asm!("brk #0x7a", options(nomem, nostack)) };
    let seen = PLATFORM_BRKS.load(Ordering::SeqCst) - before;
    ensure!(seen == 1, "platform BRK seen {seen} times");
    let esr = (0x3c << 26) | (1 << 25) | u64::from(BRK_IMM);
    ensure!(
        is_probe_brk(esr),
        "is_probe_brk rejects the probe BRK's ESR"
    );
    // SAFETY: the hook is a plain function that only edits the frame it gets.
    unsafe { kernel_loader::probe::set_int3_hook(Some(brk_hook)) };
    // SAFETY: `mov x0, #0; brk #0x4b53; ret`; the hook resumes after the brk.
    let v = unsafe { ksites_a64_brk_fn() };
    // SAFETY: removing the hook.
    unsafe { kernel_loader::probe::set_int3_hook(None) };
    ensure!(
        v == 0x4b54,
        "the probe BRK returned {v:#x}, not the hook's 0x4b54"
    );
    Ok(())
}

fn secondary_cpus_start() -> TestResult {
    let s = smp::start_secondaries();
    let online = smp::online();
    println!(
        "smp: {online} CPU{} online (PSCI CPU_ON accepted {}, then status {})",
        if online == 1 { "" } else { "s" },
        s.accepted,
        s.stop_status
    );
    ensure!(
        s.missing == 0,
        "{} CPUs started but never reported in",
        s.missing
    );
    ensure!(
        s.stop_status == psci::INVALID_PARAMETERS || s.accepted as usize == smp::MAX_CPUS - 1,
        "CPU_ON failed with PSCI status {}",
        s.stop_status
    );
    ensure!(
        online == 1 + s.accepted,
        "{online} online, {} started",
        s.accepted
    );
    for cpu in 0..=s.accepted as usize {
        ensure!(smp::is_online(cpu), "CPU {cpu} did not report in");
    }
    // A second CPU_ON for a running CPU is refused.
    if s.accepted > 0 {
        let again = psci::cpu_on(1, 0, 0);
        ensure!(
            again == psci::ALREADY_ON,
            "CPU_ON for a running CPU: {again}"
        );
    }
    Ok(())
}

fn sgi_reaches_every_cpu() -> TestResult {
    const ROUNDS: u64 = 100;
    let n = smp::online() as usize;
    let before: [u64; smp::MAX_CPUS] =
        core::array::from_fn(|i| smp::SGIS_HANDLED[i].load(Ordering::SeqCst));
    let rounds_before = smp::ROUNDS.load(Ordering::SeqCst);
    for _ in 0..ROUNDS {
        smp::sync_cores();
    }
    ensure!(smp::ROUNDS.load(Ordering::SeqCst) - rounds_before == ROUNDS);
    let mut handled = [0u64; smp::MAX_CPUS];
    for (i, h) in handled.iter_mut().enumerate().take(n) {
        *h = smp::SGIS_HANDLED[i].load(Ordering::SeqCst) - before[i];
    }
    println!(
        "sync_cores: {ROUNDS} rounds on {n} CPUs; SGIs handled per CPU {:?}",
        &handled[..n]
    );
    ensure!(handled[0] == 0, "CPU 0 sent itself {} SGIs", handled[0]);
    for (cpu, &h) in handled.iter().enumerate().take(n).skip(1) {
        ensure!(h == ROUNDS, "CPU {cpu} handled {h} SGIs in {ROUNDS} rounds");
    }
    Ok(())
}

/// An exception whose (compiled) handler uses vector registers and changes FPCR returns
/// to code that finds its v0, v8, v31 and FPCR as it left them.
fn exceptions_preserve_fp_simd_state() -> TestResult {
    let pattern = [0x0123_4567_89ab_cdefu64, 0xfedc_ba98_7654_3210];
    let mut after = [[0u64; 2]; 3];
    let (fpcr_before, fpcr_after): (u64, u64);
    // SAFETY: loads the pattern into v0, v8 and v31 (declared clobbered), traps to the
    // clobbering handler, which resumes after the `brk`, and stores the three registers
    // into `after`.
    unsafe {
        core::arch::asm!(
            "ld1 {{v0.2d}}, [{p}]",
            "ld1 {{v8.2d}}, [{p}]",
            "ld1 {{v31.2d}}, [{p}]",
            "mrs {fb}, FPCR",
            "brk #0x7b",
            "mrs {fa}, FPCR",
            "st1 {{v0.2d}}, [{a0}]",
            "st1 {{v8.2d}}, [{a1}]",
            "st1 {{v31.2d}}, [{a2}]",
            p = in(reg) pattern.as_ptr(),
            a0 = in(reg) after[0].as_mut_ptr(),
            a1 = in(reg) after[1].as_mut_ptr(),
            a2 = in(reg) after[2].as_mut_ptr(),
            fb = out(reg) fpcr_before,
            fa = out(reg) fpcr_after,
            out("v0") _, out("v8") _, out("v31") _,
            options(nostack),
        );
    }
    const _: () = assert!(super::exceptions::CLOBBER_BRK_IMM == 0x7b);
    for (i, r) in ["v0", "v8", "v31"].iter().enumerate() {
        ensure!(
            after[i] == pattern,
            "{r} after the exception: {:x?} (was {:x?})",
            after[i],
            pattern
        );
    }
    ensure!(
        fpcr_after == fpcr_before,
        "FPCR {fpcr_before:#x} became {fpcr_after:#x}"
    );
    Ok(())
}
