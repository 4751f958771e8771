//! Early CPU setup (FPU/SSE/XSAVE state) and raw access to control registers, MSRs and
//! I/O ports.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

pub use kernel_loader::arch::x86_64::{
    CR0_EM, CR0_MP, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, XCR0_AVX, XCR0_AVX512,
    XCR0_SSE, XCR0_X87, cpuid,
};
use kernel_loader::cpu::SimdState;

/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// IA32_EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// What `kernel_loader::cpu::enable_simd_state` returned on the boot CPU: its XCR0 and
/// XSAVE area size (`u64::MAX` until `init` ran there).
static BOOT_SIMD_XCR0: AtomicU64 = AtomicU64::new(u64::MAX);
static BOOT_SIMD_AREA: AtomicU32 = AtomicU32::new(0);
static BOOT_SIMD_XSAVE: AtomicBool = AtomicBool::new(false);

/// Early CPU setup, on every CPU; `kmain` (and `smp::ap_entry`) call it first, before
/// anything may use the FPU or SSE.
///
/// * CR0: set NE and WP.
/// * The SIMD state through the crate, as a user's kernel would:
///   `kernel_loader::cpu::enable_simd_state` (CR0.MP/EM/TS, CR4.OSFXSR/OSXMMEXCPT, and
///   with XSAVE CR4.OSXSAVE and XCR0 = x87 | SSE [| AVX [| AVX-512]]). The boot CPU's
///   result is kept for [`boot_simd_state`].
pub fn init() {
    let cr0 = read_cr0() | CR0_NE | CR0_WP;
    // SAFETY: NE only selects native x87 error reporting and WP makes supervisor writes
    // honour read-only pages; the boot page tables map everything writable.
    unsafe { write_cr0(cr0) };
    // SAFETY: CPL 0 in long mode; this runs first on each CPU, before anything has SIMD
    // state to lose, with interrupts off, and the kernel does no lazy FPU switching.
    let state = unsafe { kernel_loader::cpu::enable_simd_state() };
    if BOOT_SIMD_XCR0.load(Ordering::Relaxed) == u64::MAX {
        BOOT_SIMD_XSAVE.store(state.xsave, Ordering::Relaxed);
        BOOT_SIMD_AREA.store(state.save_area_size, Ordering::Relaxed);
        BOOT_SIMD_XCR0.store(state.xcr0, Ordering::Release);
    }
}

/// What `enable_simd_state` returned on the boot CPU (`None` before [`init`] ran).
pub fn boot_simd_state() -> Option<SimdState> {
    let xcr0 = BOOT_SIMD_XCR0.load(Ordering::Acquire);
    (xcr0 != u64::MAX).then(|| SimdState {
        xsave: BOOT_SIMD_XSAVE.load(Ordering::Relaxed),
        xcr0,
        save_area_size: BOOT_SIMD_AREA.load(Ordering::Relaxed),
    })
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects (we run at CPL 0).
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
///
/// 1. The new value must keep PE and PG set and be valid for this CPU.
/// 2. The caller accepts its effect on memory protection (WP) and on the FPU.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller upholds the preconditions. Not `nomem`: WP changes what later
    // writes do.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR3 (the physical address of the top-level page table, plus flags).
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR3, switching page tables and flushing non-global TLB entries.
///
/// # Safety
///
/// `v` must be the physical address of a valid PML4 that maps the running code, the
/// stack and every live object at their current addresses, and the tables must stay
/// valid for as long as CR3 points at them.
pub unsafe fn write_cr3(v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe { asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR4.
///
/// # Safety
///
/// Every bit set must be supported by this CPU (else #GP) and must keep PAE set.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes extended control register `xcr`.
///
/// # Safety
///
/// CR4.OSXSAVE must be set and `v` must be a valid value for `xcr` on this CPU.
pub unsafe fn xsetbv(xcr: u32, v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe {
        asm!(
            "xsetbv",
            in("ecx") xcr,
            in("eax") v as u32,
            in("edx") (v >> 32) as u32,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// Reads model-specific register `msr`.
///
/// # Safety
///
/// `msr` must exist on this CPU (else #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
             options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes model-specific register `msr`.
///
/// # Safety
///
/// `msr` must exist and accept `v`, and the effect must not break the running kernel.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

/// Whether EFER.NXE is set (the boot stub sets it when the CPU has NX).
pub fn nx_enabled() -> bool {
    // SAFETY: IA32_EFER exists on every x86-64 CPU.
    unsafe { rdmsr(MSR_EFER) & EFER_NXE != 0 }
}

/// Executes a serializing instruction (CPUID), e.g. after modifying code.
pub fn serialize() {
    let _ = cpuid(0, 0);
}

/// Reads a byte from I/O port `port`.
///
/// # Safety
///
/// Reading the port must have no side effect the caller has not accounted for.
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to I/O port `port`.
///
/// # Safety
///
/// The device behind the port must not be driven by other code and the write must not
/// make it touch memory the caller has not accounted for.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 32-bit value to I/O port `port`.
///
/// # Safety
///
/// As for [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter into edx:eax; it touches no memory.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}
