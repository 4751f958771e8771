//! x86-64 CPU identification: raw CPUID leaves and XCR0.

/// Raw CPUID output for the leaves [`crate::CpuFeatures`] is built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCpuid {
    /// Highest standard leaf (CPUID.0:EAX).
    pub max_leaf: u32,
    /// CPUID.1:ECX.
    pub leaf1_ecx: u32,
    /// CPUID.1:EDX.
    pub leaf1_edx: u32,
    /// CPUID.(7,0):EBX.
    pub leaf7_ebx: u32,
    /// CPUID.(7,0):ECX.
    pub leaf7_ecx: u32,
    /// CPUID.(7,0):EDX.
    pub leaf7_edx: u32,
    /// XCR0 as read by XGETBV, or 0 when CPUID.1:ECX.OSXSAVE is clear.
    pub xcr0: u64,
    /// CPUID.(0xD,0):EAX: the XCR0 state components the CPU supports (0 if leaf 0xD
    /// does not exist).
    pub leaf_d_eax: u32,
}

/// Executes CPUID for `leaf`/`subleaf`, returning (eax, ebx, ecx, edx).
#[cfg(target_arch = "x86_64")]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID exists on every x86-64 CPU, reads no memory and only writes the four
    // registers named here. LLVM reserves rbx, so it is saved in a scratch register.
    unsafe {
        core::arch::asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags, nomem),
        );
    }
    (eax, ebx, ecx, edx)
}

/// Reads XCR0. Returns 0 unless CPUID.1:ECX.OSXSAVE (bit 27) is set, since XGETBV
/// raises #UD when the OS has not enabled XSAVE.
#[cfg(target_arch = "x86_64")]
pub fn xcr0() -> u64 {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 27) == 0 {
        return 0;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set (checked above), so XGETBV with ECX=0 is defined; it reads
    // no memory and writes only eax/edx.
    unsafe {
        core::arch::asm!(
            "xgetbv",
            in("ecx") 0u32,
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags, nomem),
        );
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads leaves 0, 1, 7 and 0xD and XCR0 on the running CPU.
#[cfg(target_arch = "x86_64")]
pub fn read_cpuid() -> RawCpuid {
    let (max_leaf, _, _, _) = cpuid(0, 0);
    let (_, _, leaf1_ecx, leaf1_edx) = if max_leaf >= 1 {
        cpuid(1, 0)
    } else {
        (0, 0, 0, 0)
    };
    let (_, leaf7_ebx, leaf7_ecx, leaf7_edx) = if max_leaf >= 7 {
        cpuid(7, 0)
    } else {
        (0, 0, 0, 0)
    };
    let (leaf_d_eax, _, _, _) = if max_leaf >= 0xd {
        cpuid(0xd, 0)
    } else {
        (0, 0, 0, 0)
    };
    RawCpuid {
        max_leaf,
        leaf1_ecx,
        leaf1_edx,
        leaf7_ebx,
        leaf7_ecx,
        leaf7_edx,
        xcr0: xcr0(),
        leaf_d_eax,
    }
}
