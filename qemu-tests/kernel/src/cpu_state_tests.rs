//! The SIMD state helper, checked inside the booted kernel: `cpu::init` set CR0/CR4/XCR0
//! through `kernel_loader::cpu::enable_simd_state` (on every CPU); here the boot CPU's
//! result is checked against CPUID, AVX-class features are usable and none reported
//! unusable, the AVX2 ifunc picked its AVX2 implementation, and a CPU whose OS state
//! lacks AVX (XCR0 without it, or CR4.OSXSAVE clear; set for a moment and restored)
//! loses AVX in `CpuFeatures::detect` and reports it in `CpuFeatures::unusable`.
//!
//! Runs before the APs start, so nothing else runs while the boot CPU's XCR0 is changed.

use kernel_loader::arch::x86_64::{RawCpuid, read_cpuid, xcr0};
use kernel_loader::{CpuFeatures, cell};

use crate::harness::{Harness, TestResult};
use crate::ifunc_tests::read_slot;
use crate::{cpu, ensure, paging, println};

/// Runs the CPU state tests.
pub fn run(h: &mut Harness) {
    h.run("simd_state_matches_cpuid", simd_state_matches_cpuid);
    h.run("simd_features_usable_none_unusable", features_usable);
    h.run("simd_avx2_ifunc_chose_avx2", avx2_ifunc_chose_avx2);
    h.run("simd_xcr0_without_avx_reported_unusable", || {
        lost_state_is_reported(StateLoss::Xcr0WithoutAvx)
    });
    h.run("simd_osxsave_clear_reported_unusable", || {
        lost_state_is_reported(StateLoss::OsxsaveClear)
    });
}

const fn has(x: u32, n: u32) -> bool {
    x & (1 << n) != 0
}

/// CPUID says XSAVE and AVX (so the OS can make AVX usable).
fn cpu_has_avx(r: &RawCpuid) -> bool {
    has(r.leaf1_ecx, 26) && has(r.leaf1_ecx, 28)
}

fn simd_state_matches_cpuid() -> TestResult {
    let Some(s) = cpu::boot_simd_state() else {
        return Err(crate::msg!(
            "cpu::init did not record enable_simd_state's result"
        ));
    };
    let r = read_cpuid();
    println!(
        "simd state: xsave={} xcr0={:#x} save area {} bytes",
        s.xsave, s.xcr0, s.save_area_size
    );
    let xsave = has(r.leaf1_ecx, 26);
    ensure!(
        s.xsave == xsave,
        "SimdState.xsave {} vs CPUID XSAVE {xsave}",
        s.xsave
    );
    let cr4 = cpu::read_cr4();
    ensure!(
        (cr4 & cpu::CR4_OSXSAVE != 0) == xsave,
        "CR4 {cr4:#x}: OSXSAVE vs CPUID XSAVE {xsave}"
    );
    let cr0 = cpu::read_cr0();
    ensure!(
        cr0 & (cpu::CR0_EM | cpu::CR0_TS) == 0 && cr0 & cpu::CR0_MP != 0,
        "CR0 {cr0:#x}: want MP set, EM and TS clear"
    );
    if !xsave {
        ensure!(s.xcr0 == 0, "no XSAVE, but SimdState.xcr0 = {:#x}", s.xcr0);
        ensure!(
            s.save_area_size == 512,
            "no XSAVE: save area {} bytes, want the FXSAVE area (512)",
            s.save_area_size
        );
        return Ok(());
    }
    let now = xcr0();
    ensure!(
        now == s.xcr0,
        "XCR0 {now:#x}, enable_simd_state wrote {:#x}",
        s.xcr0
    );
    ensure!(
        now == r.simd_xcr0(),
        "XCR0 {now:#x}, CPUID calls for {:#x}",
        r.simd_xcr0()
    );
    ensure!(now & 0b11 == 0b11, "XCR0 {now:#x} lacks x87|SSE");
    ensure!(
        s.avx() == cpu_has_avx(&r),
        "XCR0 {now:#x}: AVX state vs CPUID AVX {}",
        cpu_has_avx(&r)
    );
    if !cpu_has_avx(&r) {
        ensure!(
            now == 0b11,
            "CPU without AVX: XCR0 {now:#x}, want x87|SSE only"
        );
    }
    let (_, ebx, _, _) = cpu::cpuid(0xd, 0);
    ensure!(
        s.save_area_size == ebx,
        "save area {} bytes, CPUID.(0xD,0):EBX = {ebx}",
        s.save_area_size
    );
    // Legacy area (512) + XSAVE header (64), + 256 for the YMM upper halves,
    // + 64 + 512 + 1024 for opmask, ZMM_Hi256 and Hi16_ZMM.
    let min = 576 + if s.avx() { 256 } else { 0 } + if s.avx512() { 1600 } else { 0 };
    ensure!(
        s.save_area_size >= min,
        "save area {} bytes for XCR0 {now:#x}, at least {min} needed",
        s.save_area_size
    );
    Ok(())
}

fn features_usable() -> TestResult {
    let r = read_cpuid();
    let f = CpuFeatures::detect();
    let unusable = CpuFeatures::unusable();
    println!("cpu features: {f:?}; unusable: {unusable:?}");
    ensure!(
        unusable.is_empty(),
        "after enable_simd_state, unusable = {unusable:?}"
    );
    if cpu_has_avx(&r) {
        ensure!(
            f.contains(CpuFeatures::AVX | CpuFeatures::YMM_STATE),
            "CPUID has XSAVE+AVX, detect() = {f:?}"
        );
        if has(r.leaf7_ebx, 5) {
            ensure!(
                f.contains(CpuFeatures::AVX2),
                "CPUID has AVX2, detect() = {f:?}"
            );
        }
    } else {
        ensure!(
            !f.intersects(CpuFeatures::NEEDS_OS_STATE),
            "CPU without AVX, detect() = {f:?}"
        );
    }
    Ok(())
}

/// The `sum_u32` ifunc chose by `CpuFeatures::detect` at boot patching: with AVX2 in
/// CPUID (not XCR0: that is what enable_simd_state must have set), its AVX2 version.
fn avx2_ifunc_chose_avx2() -> TestResult {
    let r = read_cpuid();
    let avx2 = cpu_has_avx(&r) && has(r.leaf7_ebx, 5);
    let exec = [paging::text_range()];
    // SAFETY: the image was processed by `ksites embed`; the table is mapped read-only
    // and nothing writes it.
    let table = unsafe { cell::image_table(&exec) }.map_err(crate::harness::Msg::display)?;
    let Some(f) = table.ifuncs().find(|f| f.name == "kfuncs::sum_u32") else {
        return Err(crate::msg!("no kfuncs::sum_u32 ifunc in the table"));
    };
    let chosen = kfuncs::impl_name(read_slot(f.slot) as usize);
    let want = if avx2 {
        "sum_u32_avx2"
    } else {
        "sum_u32_scalar"
    };
    ensure!(
        chosen == want,
        "sum_u32 chose {chosen}; CPUID AVX2 = {avx2}, so want {want}"
    );
    Ok(())
}

/// How the boot CPU's OS state is taken away for a moment.
#[derive(Clone, Copy)]
enum StateLoss {
    /// XCR0 keeps x87|SSE only.
    Xcr0WithoutAvx,
    /// CR4.OSXSAVE cleared (XGETBV would #UD; `detect` reads XCR0 as 0).
    OsxsaveClear,
}

/// With the state taken away, `detect()` loses every AVX-class feature and `unusable()`
/// reports exactly those `detect()` had; with it restored, they are back. Skipped (passes)
/// on CPUs without XSAVE+AVX, where there is nothing to take away.
fn lost_state_is_reported(loss: StateLoss) -> TestResult {
    let r = read_cpuid();
    if !cpu_has_avx(&r) {
        println!("no XSAVE+AVX on this CPU: nothing to take away");
        return Ok(());
    }
    let before = CpuFeatures::detect();
    let saved_xcr0 = xcr0();
    let saved_cr4 = cpu::read_cr4();
    match loss {
        // SAFETY: OSXSAVE is set; x87|SSE is always valid; AVX-512 state goes with AVX
        // (XCR0 may not hold it alone). The kernel is soft-float and only this CPU runs,
        // so no live AVX state is lost; it is restored below before anything else runs.
        StateLoss::Xcr0WithoutAvx => unsafe { cpu::xsetbv(0, cpu::XCR0_X87 | cpu::XCR0_SSE) },
        // SAFETY: clearing OSXSAVE only disables XSAVE/XGETBV/XSETBV, which nothing on
        // this CPU uses until it is set again below.
        StateLoss::OsxsaveClear => unsafe { cpu::write_cr4(saved_cr4 & !cpu::CR4_OSXSAVE) },
    }
    let during = CpuFeatures::detect();
    let unusable = CpuFeatures::unusable();
    // SAFETY: the values read above, valid on this CPU (OSXSAVE is set again first).
    unsafe {
        cpu::write_cr4(saved_cr4);
        cpu::xsetbv(0, saved_xcr0);
    }
    let after = CpuFeatures::detect();
    println!("state taken away: detect() = {during:?}; unusable() = {unusable:?}");
    let lost = before & CpuFeatures::NEEDS_OS_STATE;
    ensure!(
        lost.contains(CpuFeatures::AVX),
        "before: detect() = {before:?} lacks AVX"
    );
    ensure!(
        !during.intersects(CpuFeatures::NEEDS_OS_STATE),
        "without AVX state, detect() still has {:?}",
        during & CpuFeatures::NEEDS_OS_STATE
    );
    ensure!(
        unusable == lost,
        "unusable() = {unusable:?}, want what detect() lost: {lost:?}"
    );
    if has(r.leaf7_ebx, 5) {
        ensure!(
            unusable.contains(CpuFeatures::AVX2),
            "CPUID has AVX2, unusable() = {unusable:?}"
        );
    }
    ensure!(
        after == before && xcr0() == saved_xcr0 && CpuFeatures::unusable().is_empty(),
        "after restoring: detect() = {after:?} (was {before:?}), XCR0 {:#x} (was {saved_xcr0:#x})",
        xcr0()
    );
    Ok(())
}
