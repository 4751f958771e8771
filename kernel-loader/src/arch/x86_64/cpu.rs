//! x86-64 CPU identification: raw CPUID leaves, XCR0, and [`CpuFeatures`], the feature
//! set resolvers receive (re-exported as `kernel_loader::CpuFeatures`). Its bits are the
//! first argument of the C resolver ABI (`extern "C" fn(features: u64) -> usize`).
//!
//! Also the SIMD state setup a kernel needs before CPUID tells the truth about AVX:
//! [`enable_simd_state`] (CR0, CR4, XCR0; re-exported as
//! `kernel_loader::cpu::enable_simd_state`) and [`CpuFeatures::unusable`], the
//! AVX-class features the CPU has but the OS has not enabled.

/// CR0.MP (bit 1): WAIT/FWAIT honour CR0.TS.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM (bit 2): x87 emulation; must be clear for x87 and SSE instructions.
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS (bit 3): task switched; while set, the first FPU/SSE instruction raises #NM.
pub const CR0_TS: u64 = 1 << 3;
/// CR4.OSFXSR (bit 9): FXSAVE/FXRSTOR and SSE instructions enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT (bit 10): unmasked SSE floating-point exceptions raise #XM.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.OSXSAVE (bit 18): XSAVE, XGETBV and XSETBV enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 bit 0: x87 state (always set when XCR0 is written).
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0 bit 1: SSE (XMM registers, MXCSR).
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0 bit 2: AVX (the upper halves of the YMM registers).
pub const XCR0_AVX: u64 = 1 << 2;
/// XCR0 bits 5..=7: opmask, ZMM_Hi256 and Hi16_ZMM, the AVX-512 state (all three or
/// none).
pub const XCR0_AVX512: u64 = 0b111 << 5;
/// Size of the legacy FXSAVE area: what a context switch saves without XSAVE.
pub const FXSAVE_AREA_SIZE: u32 = 512;

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

/// Which state [`enable_simd_state`] enabled on the CPU it ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdState {
    /// Whether CR4.OSXSAVE was set (the CPU reports XSAVE); XCR0 was written only then.
    pub xsave: bool,
    /// The value written to XCR0 (0 when `xsave` is false): [`XCR0_X87`] | [`XCR0_SSE`],
    /// plus [`XCR0_AVX`] and [`XCR0_AVX512`] where the CPU has them.
    pub xcr0: u64,
    /// Bytes a context switch must reserve to save this CPU's SIMD state: CPUID.(0xD,0):EBX
    /// read after XCR0 was written (the XSAVE area for exactly `xcr0`, 64-byte aligned
    /// for XSAVE/XRSTOR), or [`FXSAVE_AREA_SIZE`] (16-byte aligned for FXSAVE) without
    /// XSAVE.
    pub save_area_size: u32,
}

impl SimdState {
    /// Whether AVX (YMM) state was enabled.
    pub const fn avx(&self) -> bool {
        self.xcr0 & XCR0_AVX != 0
    }

    /// Whether the AVX-512 state (opmask, ZMM_Hi256, Hi16_ZMM) was enabled.
    pub const fn avx512(&self) -> bool {
        self.xcr0 & XCR0_AVX512 == XCR0_AVX512
    }
}

impl RawCpuid {
    /// The XCR0 value [`enable_simd_state`] writes on this CPU (pure; testable on any
    /// host): 0 without XSAVE (CPUID.1:ECX.26); else x87 | SSE, plus AVX if CPUID.1:ECX.AVX,
    /// plus the three AVX-512 components if AVX is in and CPUID.(7,0):EBX.AVX512F — each
    /// only if CPUID.(0xD,0):EAX lists it as supported.
    pub const fn simd_xcr0(&self) -> u64 {
        if self.max_leaf < 1 || !bit(self.leaf1_ecx, 26) {
            return 0;
        }
        let supported = if self.max_leaf >= 0xd {
            self.leaf_d_eax as u64
        } else {
            XCR0_X87 | XCR0_SSE
        };
        // x87 must always be set in XCR0; SSE is part of every XSAVE CPU's state.
        let mut xcr0 = XCR0_X87 | XCR0_SSE;
        if bit(self.leaf1_ecx, 28) && supported & XCR0_AVX != 0 {
            xcr0 |= XCR0_AVX;
            if self.max_leaf >= 7
                && bit(self.leaf7_ebx, 16)
                && supported & XCR0_AVX512 == XCR0_AVX512
            {
                xcr0 |= XCR0_AVX512;
            }
        }
        xcr0
    }
}

/// Enables the x87/SSE/AVX/AVX-512 register state on the running CPU, so that
/// [`CpuFeatures::detect`] reports (and resolvers may pick) what the CPU has:
///
/// * CR0: sets MP, clears EM and TS;
/// * CR4: sets OSFXSR and OSXMMEXCPT;
/// * if CPUID.1:ECX.XSAVE: sets CR4.OSXSAVE and writes XCR0 = [`RawCpuid::simd_xcr0`]
///   (x87 | SSE, plus AVX if CPUID has AVX, plus the AVX-512 state if CPUID.7 has
///   AVX512F; only components CPUID.(0xD,0):EAX lists as supported).
///
/// Call it on every CPU (the registers are per CPU), before anything uses SIMD registers
/// and before [`CpuFeatures::detect`] and `patch::init`. It returns what it enabled and
/// [`SimdState::save_area_size`]: a kernel that switches between contexts that use SIMD
/// registers must reserve that many bytes per context for XSAVE/XRSTOR (or FXSAVE) —
/// the AVX-512 state makes it about 2.7 KiB.
///
/// # Safety
///
/// * The caller runs at CPL 0 in 64-bit mode (CR0/CR4 writes and XSETBV raise #GP
///   otherwise).
/// * XCR0 is overwritten, not extended: register state in components it already had but
///   the new value lacks (e.g. AMX tile data a firmware enabled) is discarded, and
///   nothing on this CPU may be relying on such state, or be in the middle of an
///   XSAVE/XRSTOR of it (interrupts that save SIMD state should be off).
/// * CR0.TS is cleared: a kernel that uses TS for lazy FPU switching must not call this
///   while a context's state is not loaded.
#[cfg(target_arch = "x86_64")]
pub unsafe fn enable_simd_state() -> SimdState {
    let raw = read_cpuid();
    let cr0 = (read_cr0() & !(CR0_EM | CR0_TS)) | CR0_MP;
    // SAFETY: CPL 0 per the contract; MP, EM and TS only select how x87/SSE
    // instructions behave, and every other bit is written back as read.
    unsafe { write_cr0(cr0) };
    let xcr0 = raw.simd_xcr0();
    let xsave = xcr0 != 0;
    let mut cr4 = read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if xsave {
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: CPL 0 per the contract; OSFXSR and OSXMMEXCPT exist on every x86-64 CPU,
    // OSXSAVE is set only when CPUID.1:ECX.XSAVE says it exists, and every other bit is
    // written back as read.
    unsafe { write_cr4(cr4) };
    let save_area_size = if xsave {
        // SAFETY: CR4.OSXSAVE was just set; `xcr0` has x87 set and only components
        // CPUID.(0xD,0):EAX lists, with AVX before AVX-512 and the three AVX-512
        // components together, as XSETBV requires. Discarding state is the caller's
        // call (contract above).
        unsafe { xsetbv0(xcr0) };
        // EBX of leaf 0xD, sub-leaf 0 is the XSAVE area size for the XCR0 now in force;
        // without that leaf (only x87|SSE can be on), the legacy area and the header.
        if raw.max_leaf >= 0xd {
            cpuid(0xd, 0).1
        } else {
            FXSAVE_AREA_SIZE + 64
        }
    } else {
        FXSAVE_AREA_SIZE
    };
    SimdState {
        xsave,
        xcr0,
        save_area_size,
    }
}

#[cfg(target_arch = "x86_64")]
fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effect; the callers run at CPL 0.
    unsafe {
        core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// # Safety
///
/// CPL 0, and `v` must be a valid CR0 value whose effects the caller accepts.
#[cfg(target_arch = "x86_64")]
unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

#[cfg(target_arch = "x86_64")]
fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effect; the callers run at CPL 0.
    unsafe {
        core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// # Safety
///
/// CPL 0, and every bit of `v` must be supported by this CPU, keeping PAE set.
#[cfg(target_arch = "x86_64")]
unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes XCR0.
///
/// # Safety
///
/// CPL 0, CR4.OSXSAVE set, and `v` a valid XCR0 value for this CPU.
#[cfg(target_arch = "x86_64")]
unsafe fn xsetbv0(v: u64) {
    // SAFETY: the caller upholds the preconditions.
    unsafe {
        core::arch::asm!(
            "xsetbv",
            in("ecx") 0u32,
            in("eax") v as u32,
            in("edx") (v >> 32) as u32,
            options(nomem, nostack, preserves_flags),
        );
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

    /// Reads the running CPU (CPUID leaves 0, 1, 7, 0xD and XGETBV): the features usable
    /// now, so AVX-class ones only if the OS enabled their state (see
    /// [`enable_simd_state`] and [`CpuFeatures::unusable`]).
    #[cfg(target_arch = "x86_64")]
    pub fn detect() -> CpuFeatures {
        CpuFeatures::from_raw(&read_cpuid())
    }

    /// The features that need register state the OS enables in XCR0: FMA, AVX, F16C,
    /// AVX2 (YMM) and AVX512F/BW/VL (opmask and ZMM).
    pub const NEEDS_OS_STATE: CpuFeatures = CpuFeatures::FMA
        .union(CpuFeatures::AVX)
        .union(CpuFeatures::F16C)
        .union(CpuFeatures::AVX2)
        .union(CpuFeatures::AVX512F)
        .union(CpuFeatures::AVX512BW)
        .union(CpuFeatures::AVX512VL);

    /// The features the CPU has (CPUID) that are not usable because the OS has not
    /// enabled their state (CR4.OSXSAVE clear, or XCR0 missing AVX or AVX-512 bits) but
    /// [`enable_simd_state`] would (pure; testable on any host). Empty when everything
    /// the CPU has is usable; a subset of [`CpuFeatures::NEEDS_OS_STATE`].
    pub fn unusable_from_raw(raw: &RawCpuid) -> CpuFeatures {
        let wanted = raw.simd_xcr0();
        if wanted == 0 {
            return CpuFeatures::empty();
        }
        let enabled = RawCpuid {
            leaf1_ecx: raw.leaf1_ecx | (1 << 27),
            xcr0: wanted,
            ..*raw
        };
        CpuFeatures::from_raw(&enabled)
            .difference(CpuFeatures::from_raw(raw))
            .intersection(CpuFeatures::NEEDS_OS_STATE)
    }

    /// Reads the running CPU: the AVX-class features it has that [`CpuFeatures::detect`]
    /// does not report because the OS has not enabled their state (see
    /// [`CpuFeatures::unusable_from_raw`]). A kernel that expects AVX should check this is
    /// empty after [`enable_simd_state`] and warn otherwise: resolvers silently pick the
    /// scalar implementations.
    #[cfg(target_arch = "x86_64")]
    pub fn unusable() -> CpuFeatures {
        CpuFeatures::unusable_from_raw(&read_cpuid())
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

    /// CPUID.1:ECX of a CPU with FMA, XSAVE and AVX (OSXSAVE as given).
    const AVX_CPU: u32 = (1 << 12) | (1 << 26) | (1 << 28) | (1 << 29);
    /// CPUID.(7,0):EBX of a CPU with AVX2 and AVX-512 F/BW/VL.
    const AVX512_CPU: u32 = AVX2 | (1 << 16) | (1 << 30) | (1 << 31);
    const YMM_FEATURES: CpuFeatures = CpuFeatures::FMA
        .union(CpuFeatures::AVX)
        .union(CpuFeatures::F16C)
        .union(CpuFeatures::AVX2);
    const ZMM_FEATURES: CpuFeatures = CpuFeatures::AVX512F
        .union(CpuFeatures::AVX512BW)
        .union(CpuFeatures::AVX512VL);

    fn osxsave(c1: u32) -> u32 {
        c1 | (1 << 27)
    }

    #[test]
    fn unusable_without_osxsave_is_every_avx_feature_the_cpu_has() {
        // The OS never set CR4.OSXSAVE: XCR0 is unreadable (0), nothing AVX is usable.
        let r = raw(AVX_CPU, AVX512_CPU, 0);
        let usable = CpuFeatures::from_raw(&r);
        assert!(
            !usable.intersects(CpuFeatures::NEEDS_OS_STATE),
            "{usable:?}"
        );
        assert_eq!(
            CpuFeatures::unusable_from_raw(&r),
            YMM_FEATURES | ZMM_FEATURES
        );
    }

    #[test]
    fn unusable_with_xcr0_lacking_avx_is_the_ymm_and_zmm_features() {
        let r = raw(osxsave(AVX_CPU), AVX2, 0b011);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), YMM_FEATURES);
        let r = raw(osxsave(AVX_CPU), AVX512_CPU, 0b011);
        assert_eq!(
            CpuFeatures::unusable_from_raw(&r),
            YMM_FEATURES | ZMM_FEATURES
        );
    }

    #[test]
    fn unusable_with_ymm_but_not_zmm_state_on_an_avx512_cpu_is_avx512() {
        let r = raw(osxsave(AVX_CPU), AVX512_CPU, 0b111);
        let usable = CpuFeatures::from_raw(&r);
        assert!(usable.contains(YMM_FEATURES) && !usable.intersects(ZMM_FEATURES));
        assert_eq!(CpuFeatures::unusable_from_raw(&r), ZMM_FEATURES);
        // Only part of the AVX-512 state enabled counts as none of it.
        let r = raw(osxsave(AVX_CPU), AVX512_CPU, 0b0110_0111);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), ZMM_FEATURES);
    }

    #[test]
    fn unusable_is_empty_when_everything_is_enabled() {
        let r = raw(osxsave(AVX_CPU), AVX512_CPU, 0xe7);
        assert!(CpuFeatures::from_raw(&r).contains(YMM_FEATURES | ZMM_FEATURES));
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
        let r = raw(osxsave(AVX_CPU), AVX2, 0b111);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
    }

    #[test]
    fn unusable_is_empty_on_cpus_without_avx_or_xsave() {
        // qemu64: SSE3 and XSAVE-less; no state to enable, nothing unusable.
        let r = raw(1, 0, 0);
        assert_eq!(r.simd_xcr0(), 0);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
        // XSAVE without AVX: only x87|SSE to enable, nothing unusable.
        let r = raw(1 << 26, 0, 0);
        assert_eq!(r.simd_xcr0(), XCR0_X87 | XCR0_SSE);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
        // An AVX bit without XSAVE cannot be enabled: not reported.
        let r = raw(1 << 28, AVX2, 0);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
    }

    #[test]
    fn simd_xcr0_enables_only_what_cpuid_lists() {
        let r = raw(AVX_CPU, AVX512_CPU, 0);
        assert_eq!(r.simd_xcr0(), XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512);
        // AVX-512 state without AVX512F in leaf 7: not enabled.
        let r = raw(AVX_CPU, AVX2, 0);
        assert_eq!(r.simd_xcr0(), 0b111);
        // Leaf 0xD lists AVX but only two of the three AVX-512 components.
        let mut r = raw(AVX_CPU, AVX512_CPU, 0);
        r.leaf_d_eax = 0b0110_0111;
        assert_eq!(r.simd_xcr0(), 0b111);
        // Leaf 0xD lists no AVX: neither AVX nor AVX-512.
        r.leaf_d_eax = 0b1110_0011;
        assert_eq!(r.simd_xcr0(), 0b011);
        assert_eq!(CpuFeatures::unusable_from_raw(&r), CpuFeatures::empty());
        // No leaf 0xD: x87|SSE only.
        r.max_leaf = 7;
        assert_eq!(r.simd_xcr0(), 0b011);
    }

    #[test]
    fn simd_state_flags() {
        let s = SimdState {
            xsave: true,
            xcr0: 0xe7,
            save_area_size: 2696,
        };
        assert!(s.avx() && s.avx512());
        let s = SimdState {
            xcr0: 0b0110_0111,
            ..s
        };
        assert!(s.avx() && !s.avx512());
    }

    /// README "Using it in your kernel" step 4's SIMD setup, as written (compiled, never
    /// run: `enable_simd_state` needs CPL 0).
    #[allow(dead_code)]
    fn readme_step_4_simd_setup() -> bool {
        use crate::CpuFeatures;

        // SAFETY: never called (see above).
        let simd = unsafe { crate::cpu::enable_simd_state() };
        let unusable = CpuFeatures::unusable();
        simd.save_area_size >= FXSAVE_AREA_SIZE && unusable.is_empty()
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
