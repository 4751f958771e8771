//! x86-64 CPU identification: raw CPUID leaves, XCR0, and [`CpuFeatures`], the feature
//! set resolvers receive (re-exported as `kernel_loader::CpuFeatures`). Its bits are the
//! first argument of the C resolver ABI (`extern "C" fn(features: u64) -> usize`).

/// Raw CPUID output for the leaves [`CpuFeatures`] is built from.
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

bitflags::bitflags! {
    /// What the CPU (and the OS's XSAVE setup) allows, from CPUID leaves 1, 7 and 0xD and
    /// XCR0.
    ///
    /// AVX-class features (AVX, AVX2, FMA, F16C, AVX-512) are reported only when the OS
    /// has enabled the register state they need in XCR0; a CPU that supports AVX but
    /// runs with YMM state disabled reports no AVX.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CpuFeatures: u64 {
        /// SSE (CPUID.1:EDX.25).
        const SSE = 1 << 0;
        /// SSE2 (CPUID.1:EDX.26).
        const SSE2 = 1 << 1;
        /// SSE3 (CPUID.1:ECX.0).
        const SSE3 = 1 << 2;
        /// PCLMULQDQ (CPUID.1:ECX.1).
        const PCLMULQDQ = 1 << 3;
        /// SSSE3 (CPUID.1:ECX.9).
        const SSSE3 = 1 << 4;
        /// FMA (CPUID.1:ECX.12, needs YMM state).
        const FMA = 1 << 5;
        /// SSE4.1 (CPUID.1:ECX.19).
        const SSE4_1 = 1 << 6;
        /// SSE4.2, including the CRC32 instruction (CPUID.1:ECX.20).
        const SSE4_2 = 1 << 7;
        /// MOVBE (CPUID.1:ECX.22).
        const MOVBE = 1 << 8;
        /// POPCNT (CPUID.1:ECX.23).
        const POPCNT = 1 << 9;
        /// AES-NI (CPUID.1:ECX.25).
        const AES = 1 << 10;
        /// XSAVE (CPUID.1:ECX.26).
        const XSAVE = 1 << 11;
        /// The OS enabled XSAVE/XGETBV (CPUID.1:ECX.27).
        const OSXSAVE = 1 << 12;
        /// AVX (CPUID.1:ECX.28, needs YMM state).
        const AVX = 1 << 13;
        /// F16C (CPUID.1:ECX.29, needs YMM state).
        const F16C = 1 << 14;
        /// RDRAND (CPUID.1:ECX.30).
        const RDRAND = 1 << 15;
        /// BMI1 (CPUID.7:EBX.3).
        const BMI1 = 1 << 16;
        /// AVX2 (CPUID.7:EBX.5, needs YMM state).
        const AVX2 = 1 << 17;
        /// BMI2 (CPUID.7:EBX.8).
        const BMI2 = 1 << 18;
        /// Enhanced REP MOVSB/STOSB (CPUID.7:EBX.9).
        const ERMS = 1 << 19;
        /// AVX-512 Foundation (CPUID.7:EBX.16, needs ZMM state).
        const AVX512F = 1 << 20;
        /// RDSEED (CPUID.7:EBX.18).
        const RDSEED = 1 << 21;
        /// ADX (CPUID.7:EBX.19).
        const ADX = 1 << 22;
        /// SHA extensions (CPUID.7:EBX.29).
        const SHA = 1 << 23;
        /// AVX-512 BW (CPUID.7:EBX.30, needs ZMM state).
        const AVX512BW = 1 << 24;
        /// AVX-512 VL (CPUID.7:EBX.31, needs ZMM state).
        const AVX512VL = 1 << 25;
        /// Fast short REP MOVSB (CPUID.7:EDX.4).
        const FSRM = 1 << 26;
        /// The OS enabled SSE and AVX (YMM) state in XCR0.
        const YMM_STATE = 1 << 27;
        /// The OS enabled AVX-512 (opmask, ZMM) state in XCR0.
        const ZMM_STATE = 1 << 28;
    }
}

const fn bit(x: u32, n: u32) -> bool {
    x & (1 << n) != 0
}

impl CpuFeatures {
    /// Derives the features from raw CPUID/XCR0 values (pure; testable on any host).
    pub fn from_raw(raw: &RawCpuid) -> CpuFeatures {
        let mut f = CpuFeatures::empty();
        let mut set = |flag: CpuFeatures, on: bool| f.set(flag, on);
        let (c1, d1) = if raw.max_leaf >= 1 {
            (raw.leaf1_ecx, raw.leaf1_edx)
        } else {
            (0, 0)
        };
        let (b7, d7) = if raw.max_leaf >= 7 {
            (raw.leaf7_ebx, raw.leaf7_edx)
        } else {
            (0, 0)
        };
        let osxsave = bit(c1, 27);
        // A state component counts only if the OS enabled it in XCR0 and, where leaf 0xD
        // exists, the CPU lists it as supported.
        let supported = if raw.max_leaf >= 0xd {
            u64::from(raw.leaf_d_eax)
        } else {
            u64::MAX
        };
        let xcr0 = if osxsave { raw.xcr0 & supported } else { 0 };
        // XCR0 bits: 1 = SSE, 2 = AVX (YMM upper halves), 5..=7 = opmask, ZMM_Hi256, Hi16_ZMM.
        let ymm = osxsave && xcr0 & 0b110 == 0b110;
        let zmm = ymm && xcr0 & 0xe0 == 0xe0;

        set(CpuFeatures::SSE, bit(d1, 25));
        set(CpuFeatures::SSE2, bit(d1, 26));
        set(CpuFeatures::SSE3, bit(c1, 0));
        set(CpuFeatures::PCLMULQDQ, bit(c1, 1));
        set(CpuFeatures::SSSE3, bit(c1, 9));
        set(CpuFeatures::FMA, ymm && bit(c1, 12));
        set(CpuFeatures::SSE4_1, bit(c1, 19));
        set(CpuFeatures::SSE4_2, bit(c1, 20));
        set(CpuFeatures::MOVBE, bit(c1, 22));
        set(CpuFeatures::POPCNT, bit(c1, 23));
        set(CpuFeatures::AES, bit(c1, 25));
        set(CpuFeatures::XSAVE, bit(c1, 26));
        set(CpuFeatures::OSXSAVE, osxsave);
        set(CpuFeatures::AVX, ymm && bit(c1, 28));
        set(CpuFeatures::F16C, ymm && bit(c1, 29));
        set(CpuFeatures::RDRAND, bit(c1, 30));
        set(CpuFeatures::BMI1, bit(b7, 3));
        set(CpuFeatures::AVX2, ymm && bit(c1, 28) && bit(b7, 5));
        set(CpuFeatures::BMI2, bit(b7, 8));
        set(CpuFeatures::ERMS, bit(b7, 9));
        set(CpuFeatures::AVX512F, zmm && bit(b7, 16));
        set(CpuFeatures::RDSEED, bit(b7, 18));
        set(CpuFeatures::ADX, bit(b7, 19));
        set(CpuFeatures::SHA, bit(b7, 29));
        set(CpuFeatures::AVX512BW, zmm && bit(b7, 16) && bit(b7, 30));
        set(CpuFeatures::AVX512VL, zmm && bit(b7, 16) && bit(b7, 31));
        set(CpuFeatures::FSRM, bit(d7, 4));
        set(CpuFeatures::YMM_STATE, ymm);
        set(CpuFeatures::ZMM_STATE, zmm);
        f
    }

    /// Reads the running CPU (CPUID leaves 0, 1, 7, 0xD and XGETBV).
    #[cfg(target_arch = "x86_64")]
    pub fn detect() -> CpuFeatures {
        CpuFeatures::from_raw(&read_cpuid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(c1: u32, b7: u32, xcr0: u64) -> RawCpuid {
        RawCpuid {
            max_leaf: 0xd,
            leaf1_ecx: c1,
            leaf1_edx: (1 << 25) | (1 << 26),
            leaf7_ebx: b7,
            leaf7_ecx: 0,
            leaf7_edx: 0,
            xcr0,
            leaf_d_eax: 0xe7,
        }
    }

    const AVX_OSXSAVE: u32 = (1 << 28) | (1 << 27) | (1 << 26);
    const AVX2: u32 = 1 << 5;

    #[test]
    fn avx2_needs_ymm_state_enabled_by_the_os() {
        let f = CpuFeatures::from_raw(&raw(AVX_OSXSAVE | (1 << 23), AVX2 | (1 << 9), 0b111));
        assert!(f.contains(CpuFeatures::AVX | CpuFeatures::AVX2 | CpuFeatures::YMM_STATE));
        assert!(f.contains(CpuFeatures::POPCNT | CpuFeatures::ERMS | CpuFeatures::SSE2));

        // Same CPU, OS enabled only x87+SSE state: no AVX of any kind.
        let f = CpuFeatures::from_raw(&raw(AVX_OSXSAVE, AVX2, 0b011));
        assert!(!f.intersects(CpuFeatures::AVX | CpuFeatures::AVX2 | CpuFeatures::YMM_STATE));

        // OSXSAVE clear: XCR0 is not trusted even if a value was passed in.
        let f = CpuFeatures::from_raw(&raw(AVX_OSXSAVE & !(1 << 27), AVX2, 0b111));
        assert!(!f.contains(CpuFeatures::AVX2));
    }

    #[test]
    fn avx512_needs_zmm_state() {
        let b7 = AVX2 | (1 << 16) | (1 << 30) | (1 << 31);
        let f = CpuFeatures::from_raw(&raw(AVX_OSXSAVE, b7, 0b111));
        assert!(f.contains(CpuFeatures::AVX2) && !f.contains(CpuFeatures::AVX512F));
        let f = CpuFeatures::from_raw(&raw(AVX_OSXSAVE, b7, 0xe7));
        assert!(f.contains(CpuFeatures::AVX512F | CpuFeatures::AVX512BW | CpuFeatures::AVX512VL));
    }

    #[test]
    fn state_the_cpu_does_not_list_in_leaf_0xd_does_not_count() {
        let mut r = raw(AVX_OSXSAVE, AVX2, 0b111);
        r.leaf_d_eax = 0b011; // x87 + SSE only
        assert!(!CpuFeatures::from_raw(&r).contains(CpuFeatures::AVX2));
    }

    #[test]
    fn leaf7_ignored_when_max_leaf_is_low() {
        let mut r = raw(0, AVX2 | (1 << 9), 0);
        r.max_leaf = 1;
        assert!(!CpuFeatures::from_raw(&r).contains(CpuFeatures::ERMS));
    }

    #[test]
    fn detect_agrees_with_std_on_this_host() {
        let f = CpuFeatures::detect();
        assert_eq!(
            f.contains(CpuFeatures::POPCNT),
            std::is_x86_feature_detected!("popcnt")
        );
        assert_eq!(
            f.contains(CpuFeatures::AVX2),
            std::is_x86_feature_detected!("avx2")
        );
        assert_eq!(
            f.contains(CpuFeatures::SSE4_2),
            std::is_x86_feature_detected!("sse4.2")
        );
    }
}
