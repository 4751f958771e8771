//! Early CPU setup (FPU/SSE/XSAVE state) and raw access to control registers, MSRs and
//! I/O ports.

use core::arch::asm;

pub use kernel_loader::arch::x86_64::cpuid;

/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM: x87 emulation (must be clear for SSE).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS: task switched (lazy FPU trap).
pub const CR0_TS: u64 = 1 << 3;
/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.OSFXSR: FXSAVE/FXRSTOR and SSE enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: unmasked SSE exceptions raise #XM.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.OSXSAVE: XSAVE and XGETBV/XSETBV enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 bits: x87, SSE (XMM), AVX (YMM upper halves).
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0.SSE.
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0.AVX.
pub const XCR0_AVX: u64 = 1 << 2;
/// XCR0 opmask | ZMM_Hi256 | Hi16_ZMM: the AVX-512 state.
pub const XCR0_AVX512: u64 = 0b111 << 5;
/// IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// IA32_EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// Early CPU setup; `kmain` calls it first, before anything may use the FPU or SSE.
///
/// * CR0: clear EM and TS, set MP, NE and WP.
/// * CR4: set OSFXSR and OSXMMEXCPT.
/// * If CPUID.1:ECX.XSAVE: set CR4.OSXSAVE and XCR0 = x87 | SSE, plus AVX if
///   CPUID.1:ECX.AVX, plus the AVX-512 state if AVX is on and CPUID.(0DH,0):EAX
///   supports all three AVX-512 components.
pub fn init() {
    let cr0 = (read_cr0() & !(CR0_EM | CR0_TS)) | CR0_MP | CR0_NE | CR0_WP;
    // SAFETY: these CR0 bits only select how the FPU behaves and make supervisor writes
    // honour read-only pages; the boot page tables map everything writable.
    unsafe { write_cr0(cr0) };

    let mut cr4 = read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    let (_, _, ecx1, _) = cpuid(1, 0);
    let xsave = ecx1 & (1 << 26) != 0;
    if xsave {
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: OSFXSR/OSXMMEXCPT are architectural on x86-64; OSXSAVE is set only when
    // CPUID reports XSAVE.
    unsafe { write_cr4(cr4) };

    if xsave {
        let mut xcr0 = XCR0_X87 | XCR0_SSE;
        if ecx1 & (1 << 28) != 0 {
            xcr0 |= XCR0_AVX;
            let (supported_lo, _, _, _) = cpuid(0xd, 0);
            if u64::from(supported_lo) & XCR0_AVX512 == XCR0_AVX512 {
                xcr0 |= XCR0_AVX512;
            }
        }
        // SAFETY: CR4.OSXSAVE is set, and every bit in `xcr0` is supported: x87 and SSE
        // always are with XSAVE, AVX when CPUID.1:ECX.AVX, AVX-512 per CPUID.(0DH,0).
        unsafe { xsetbv(0, xcr0) };
    }
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
