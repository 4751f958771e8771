//! aarch64 CPU identification: the ID_AA64ISAR0_EL1, ID_AA64ISAR1_EL1 and
//! ID_AA64PFR0_EL1 fields ksites reads, and [`CpuFeatures`], the feature set resolvers
//! receive (re-exported as `kernel_loader::CpuFeatures` on aarch64). Its bits are the
//! first argument of the C resolver ABI (`extern "C" fn(features: u64) -> usize`).
//!
//! Also the register-state setup a kernel needs before FP/SIMD and SVE code can run:
//! `enable_simd_state` (CPACR_EL1.FPEN and .ZEN, ZCR_EL1) and `CpuFeatures::unusable`,
//! the features the CPU has whose registers CPACR_EL1 still traps.
//!
//! Field positions and values: Arm ARM (DDI 0487) D19.2, "ID_AA64ISAR0_EL1",
//! "ID_AA64ISAR1_EL1", "ID_AA64PFR0_EL1". Every field is 4 bits; the "signed" ones (FP,
//! AdvSIMD) read 0xF for "not implemented".

/// CPACR_EL1.FPEN (bits 20..22): 0b11 lets EL0 and EL1 use FP/AdvSIMD registers.
pub const CPACR_FPEN: u64 = 0b11 << 20;
/// CPACR_EL1.ZEN (bits 16..18): 0b11 lets EL0 and EL1 use SVE registers.
pub const CPACR_ZEN: u64 = 0b11 << 16;
/// Bytes of the FP/AdvSIMD state: 32 × 128-bit V registers, FPSR and FPCR (padded to
/// 16).
pub const FP_SAVE_AREA_SIZE: u32 = 32 * 16 + 16;

/// The 4-bit field at bit `lsb` of `reg`.
const fn field(reg: u64, lsb: u32) -> u64 {
    (reg >> lsb) & 0xf
}

/// Which ID register a field is in.
#[derive(Clone, Copy)]
enum Reg {
    Isar0 = 0,
    Isar1 = 1,
    Pfr0 = 2,
}

/// The unsigned fields: (register, lowest bit, value from which the feature is
/// present, feature).
const ID_FIELDS: &[(Reg, u32, u64, CpuFeatures)] = &[
    (Reg::Isar0, 4, 1, CpuFeatures::AES),
    (Reg::Isar0, 4, 2, CpuFeatures::PMULL),
    (Reg::Isar0, 8, 1, CpuFeatures::SHA1),
    (Reg::Isar0, 12, 1, CpuFeatures::SHA2),
    (Reg::Isar0, 12, 2, CpuFeatures::SHA512),
    (Reg::Isar0, 16, 1, CpuFeatures::CRC32),
    (Reg::Isar0, 20, 2, CpuFeatures::LSE),
    (Reg::Isar0, 28, 1, CpuFeatures::RDM),
    (Reg::Isar0, 32, 1, CpuFeatures::SHA3),
    (Reg::Isar0, 36, 1, CpuFeatures::SM3),
    (Reg::Isar0, 40, 1, CpuFeatures::SM4),
    (Reg::Isar0, 44, 1, CpuFeatures::DOTPROD),
    (Reg::Isar0, 48, 1, CpuFeatures::FHM),
    (Reg::Isar0, 52, 1, CpuFeatures::FLAGM),
    (Reg::Isar0, 60, 1, CpuFeatures::RNDR),
    (Reg::Isar1, 0, 1, CpuFeatures::DPB),
    (Reg::Isar1, 12, 1, CpuFeatures::JSCVT),
    (Reg::Isar1, 16, 1, CpuFeatures::FCMA),
    (Reg::Isar1, 20, 1, CpuFeatures::RCPC),
    (Reg::Isar1, 32, 1, CpuFeatures::FRINTTS),
    (Reg::Isar1, 36, 1, CpuFeatures::SB),
    (Reg::Isar1, 44, 1, CpuFeatures::BF16),
    (Reg::Isar1, 52, 1, CpuFeatures::I8MM),
    (Reg::Pfr0, 32, 1, CpuFeatures::SVE),
    (Reg::Pfr0, 48, 1, CpuFeatures::DIT),
];

bitflags::bitflags! {
    /// CPU features resolvers can test (what the CPU has and the kernel has enabled;
    /// see [`CpuFeatures::detect`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CpuFeatures: u64 {
        /// Floating point (ID_AA64PFR0.FP ≠ 0xF).
        const FP = 1 << 0;
        /// AdvSIMD (NEON) (ID_AA64PFR0.AdvSIMD ≠ 0xF).
        const ASIMD = 1 << 1;
        /// Half-precision arithmetic (ID_AA64PFR0.FP = 1).
        const FP16 = 1 << 2;
        /// AES instructions (ID_AA64ISAR0.AES ≥ 1).
        const AES = 1 << 3;
        /// 64-bit polynomial multiply, PMULL/PMULL2 (ID_AA64ISAR0.AES ≥ 2).
        const PMULL = 1 << 4;
        /// SHA1 instructions (ID_AA64ISAR0.SHA1 ≥ 1).
        const SHA1 = 1 << 5;
        /// SHA-256 instructions (ID_AA64ISAR0.SHA2 ≥ 1).
        const SHA2 = 1 << 6;
        /// SHA-512 instructions (ID_AA64ISAR0.SHA2 ≥ 2).
        const SHA512 = 1 << 7;
        /// SHA3 instructions: EOR3, RAX1, XAR, BCAX (ID_AA64ISAR0.SHA3 ≥ 1).
        const SHA3 = 1 << 8;
        /// SM3 (ID_AA64ISAR0.SM3 ≥ 1).
        const SM3 = 1 << 9;
        /// SM4 (ID_AA64ISAR0.SM4 ≥ 1).
        const SM4 = 1 << 10;
        /// CRC32/CRC32C instructions (ID_AA64ISAR0.CRC32 ≥ 1).
        const CRC32 = 1 << 11;
        /// Large System Extensions atomics: CAS, LDADD, SWP… (ID_AA64ISAR0.Atomic ≥ 2).
        const LSE = 1 << 12;
        /// SQRDMLAH/SQRDMLSH (ID_AA64ISAR0.RDM ≥ 1).
        const RDM = 1 << 13;
        /// SDOT/UDOT (ID_AA64ISAR0.DP ≥ 1).
        const DOTPROD = 1 << 14;
        /// FMLAL/FMLSL (ID_AA64ISAR0.FHM ≥ 1).
        const FHM = 1 << 15;
        /// CFINV, RMIF, SETF8/16 (ID_AA64ISAR0.TS ≥ 1).
        const FLAGM = 1 << 16;
        /// RNDR/RNDRRS random numbers (ID_AA64ISAR0.RNDR ≥ 1).
        const RNDR = 1 << 17;
        /// DC CVAP (ID_AA64ISAR1.DPB ≥ 1).
        const DPB = 1 << 18;
        /// Pointer authentication, architected or IMPDEF algorithm (ID_AA64ISAR1.APA
        /// or .API ≠ 0).
        const PAUTH = 1 << 19;
        /// FJCVTZS (ID_AA64ISAR1.JSCVT ≥ 1).
        const JSCVT = 1 << 20;
        /// FCMLA/FCADD (ID_AA64ISAR1.FCMA ≥ 1).
        const FCMA = 1 << 21;
        /// LDAPR (ID_AA64ISAR1.LRCPC ≥ 1).
        const RCPC = 1 << 22;
        /// FRINT32Z… (ID_AA64ISAR1.FRINTTS ≥ 1).
        const FRINTTS = 1 << 23;
        /// SB speculation barrier (ID_AA64ISAR1.SB ≥ 1).
        const SB = 1 << 24;
        /// BFloat16 (ID_AA64ISAR1.BF16 ≥ 1).
        const BF16 = 1 << 25;
        /// Int8 matrix multiply (ID_AA64ISAR1.I8MM ≥ 1).
        const I8MM = 1 << 26;
        /// Scalable Vector Extension (ID_AA64PFR0.SVE ≥ 1).
        const SVE = 1 << 27;
        /// Data-independent timing, PSTATE.DIT (ID_AA64PFR0.DIT ≥ 1).
        const DIT = 1 << 28;
    }
}

impl CpuFeatures {
    /// What the CPU implements, from the raw ID registers (pure; testable on any host).
    pub fn from_id_registers(isar0: u64, isar1: u64, pfr0: u64) -> CpuFeatures {
        let regs = [isar0, isar1, pfr0];
        let mut f = CpuFeatures::empty();
        for &(reg, lsb, min, flag) in ID_FIELDS {
            if field(regs[reg as usize], lsb) >= min {
                f |= flag;
            }
        }
        // FP and AdvSIMD read 0xF when absent, 0 (or 1 with half precision) when present.
        let fp = field(pfr0, 16);
        let simd = field(pfr0, 20);
        f.set(CpuFeatures::FP, fp != 0xf);
        f.set(CpuFeatures::ASIMD, simd != 0xf);
        f.set(CpuFeatures::FP16, fp == 1 && simd == 1);
        f.set(
            CpuFeatures::PAUTH,
            field(isar1, 4) != 0 || field(isar1, 8) != 0,
        );
        f
    }

    /// The features that execute in FP/AdvSIMD registers (trapped unless CPACR_EL1.FPEN
    /// is 0b11).
    pub const NEEDS_FP_STATE: CpuFeatures = CpuFeatures::FP
        .union(CpuFeatures::ASIMD)
        .union(CpuFeatures::FP16)
        .union(CpuFeatures::AES)
        .union(CpuFeatures::PMULL)
        .union(CpuFeatures::SHA1)
        .union(CpuFeatures::SHA2)
        .union(CpuFeatures::SHA512)
        .union(CpuFeatures::SHA3)
        .union(CpuFeatures::SM3)
        .union(CpuFeatures::SM4)
        .union(CpuFeatures::RDM)
        .union(CpuFeatures::DOTPROD)
        .union(CpuFeatures::FHM)
        .union(CpuFeatures::JSCVT)
        .union(CpuFeatures::FCMA)
        .union(CpuFeatures::FRINTTS)
        .union(CpuFeatures::BF16)
        .union(CpuFeatures::I8MM)
        .union(CpuFeatures::SVE);

    /// Of the features `has`, those CPACR_EL1 (`cpacr`) keeps from use at EL1: the
    /// FP/AdvSIMD ones while FPEN ≠ 0b11, SVE while ZEN ≠ 0b11 (pure).
    pub const fn unusable_from(has: CpuFeatures, cpacr: u64) -> CpuFeatures {
        let mut out = CpuFeatures::empty();
        if cpacr & CPACR_FPEN != CPACR_FPEN {
            out = out.union(has.intersection(CpuFeatures::NEEDS_FP_STATE));
        }
        if cpacr & CPACR_ZEN != CPACR_ZEN {
            out = out.union(has.intersection(CpuFeatures::SVE));
        }
        out
    }

    /// Reads the running CPU: what it implements, less what CPACR_EL1 still traps (see
    /// [`enable_simd_state`]).
    #[cfg(target_arch = "aarch64")]
    pub fn detect() -> CpuFeatures {
        let has = CpuFeatures::implemented();
        has.difference(CpuFeatures::unusable_from(has, read_cpacr()))
    }

    /// Reads the running CPU: the features it implements (ID registers), usable or not.
    #[cfg(target_arch = "aarch64")]
    pub fn implemented() -> CpuFeatures {
        let (isar0, isar1, pfr0) = id_registers();
        CpuFeatures::from_id_registers(isar0, isar1, pfr0)
    }

    /// Reads the running CPU: the features it has that [`CpuFeatures::detect`] does not
    /// report because CPACR_EL1 traps their registers. A kernel that expects SIMD
    /// should check this is empty after [`enable_simd_state`].
    #[cfg(target_arch = "aarch64")]
    pub fn unusable() -> CpuFeatures {
        CpuFeatures::unusable_from(CpuFeatures::implemented(), read_cpacr())
    }
}

/// Reads ID_AA64ISAR0_EL1, ID_AA64ISAR1_EL1 and ID_AA64PFR0_EL1.
#[cfg(target_arch = "aarch64")]
pub fn id_registers() -> (u64, u64, u64) {
    let (isar0, isar1, pfr0): (u64, u64, u64);
    // SAFETY: the ID registers are readable at EL1 and above (and at EL0 through the
    // kernel's emulation on Linux); reading them has no side effect.
    unsafe {
        core::arch::asm!(
            "mrs {0}, ID_AA64ISAR0_EL1",
            "mrs {1}, ID_AA64ISAR1_EL1",
            "mrs {2}, ID_AA64PFR0_EL1",
            out(reg) isar0,
            out(reg) isar1,
            out(reg) pfr0,
            options(nomem, nostack, preserves_flags),
        );
    }
    (isar0, isar1, pfr0)
}

/// Reads CPACR_EL1.
#[cfg(target_arch = "aarch64")]
fn read_cpacr() -> u64 {
    let v: u64;
    // SAFETY: CPACR_EL1 is readable at EL1 (the loader runs in the kernel); no side
    // effect.
    unsafe {
        core::arch::asm!("mrs {}, CPACR_EL1", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Which state `enable_simd_state` enabled on the CPU it ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdState {
    /// CPACR_EL1.FPEN was set (the CPU has FP/AdvSIMD).
    pub fp: bool,
    /// CPACR_EL1.ZEN was set and ZCR_EL1 written (the CPU has SVE).
    pub sve: bool,
    /// The SVE vector length in bytes now in force (0 without SVE).
    pub sve_vector_bytes: u32,
    /// Bytes a context switch must reserve to save this CPU's FP/SIMD/SVE state:
    /// [`FP_SAVE_AREA_SIZE`], or with SVE [`SimdState::sve_save_area_size`].
    pub save_area_size: u32,
}

impl SimdState {
    /// The SVE state for vector length `vl` bytes: 32 Z registers, 16 P registers and
    /// FFR (`vl / 8` each), FPSR and FPCR (padded to 16).
    pub const fn sve_save_area_size(vl: u32) -> u32 {
        32 * vl + 17 * (vl / 8) + 16
    }
}

/// Enables the FP/AdvSIMD (and, where the CPU has it, SVE) register state at EL1 on the
/// running CPU, so [`CpuFeatures::detect`] reports (and resolvers may pick) the SIMD
/// features: sets CPACR_EL1.FPEN (and .ZEN), `isb`, and with SVE writes ZCR_EL1.LEN =
/// 0xF (the longest vector length EL2/EL3 allow) and reads the length back (`rdvl`).
///
/// Call it on every CPU (the registers are per CPU), before anything uses FP/SIMD
/// registers and before [`CpuFeatures::detect`] and `patch::init`.
///
/// # Safety
///
/// * The caller runs at EL1 (or at EL2 with HCR_EL2.E2H, where CPACR_EL1 names
///   CPTR_EL2); CPTR_EL2/EL3, if those levels exist, do not trap FP/SVE (QEMU `virt`
///   starting the kernel at EL1 leaves them so).
/// * Lazy FP switching through FPEN traps is turned off on this CPU: no context's state
///   may be left unsaved.
#[cfg(target_arch = "aarch64")]
pub unsafe fn enable_simd_state() -> SimdState {
    let (_, _, pfr0) = id_registers();
    let fp = field(pfr0, 16) != 0xf;
    let sve = field(pfr0, 32) >= 1;
    let mut cpacr = read_cpacr();
    if fp {
        cpacr |= CPACR_FPEN;
    }
    if sve {
        cpacr |= CPACR_ZEN;
    }
    // SAFETY: EL1 per the contract; FPEN/ZEN only stop trapping register accesses, the
    // other bits are written back as read; `isb` makes the change take effect before
    // the next instruction.
    unsafe {
        core::arch::asm!("msr CPACR_EL1, {}", "isb", in(reg) cpacr, options(nostack, preserves_flags))
    };
    let mut vl = 0u32;
    if sve {
        let v: u64;
        // SAFETY: the CPU has SVE and ZEN was just set: ZCR_EL1 (S3_0_C1_C2_0) and
        // `rdvl` (encoded, so the crate needs no `sve` target feature) do not trap.
        unsafe {
            core::arch::asm!(
                "msr S3_0_C1_C2_0, {z}",
                "isb",
                ".inst 0x04bf5020",
                z = in(reg) 0xfu64,
                out("x0") v,
                options(nostack, preserves_flags),
            )
        };
        vl = v as u32;
    }
    SimdState {
        fp,
        sve,
        sve_vector_bytes: vl,
        save_area_size: if sve {
            SimdState::sve_save_area_size(vl)
        } else {
            FP_SAVE_AREA_SIZE
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cortex-A57 as QEMU models it (`-cpu cortex-a57`): `aarch64_a57_initfn` in QEMU's
    /// target/arm/cpu64.c sets ID_AA64PFR0 = 0x00002222 and ID_AA64ISAR0 = 0x00011120
    /// and leaves ID_AA64ISAR1 at 0.
    const A57: (u64, u64, u64) = (0x0001_1120, 0, 0x0000_2222);

    /// QEMU `-cpu max`: `aarch64_max_tcg_initfn` (target/arm/tcg/cpu64.c, commit
    /// 00936783abf7) starts from the
    /// A57 values and sets, in ID_AA64ISAR0, AES=2 SHA1=1 SHA2=2 CRC32=1 ATOMIC=3 RDM=1
    /// SHA3=1 SM3=1 SM4=1 DP=1 FHM=1 TS=2 TLB=2 RNDR=1; in ID_AA64ISAR1, DPB=2
    /// APA=5 (FPACCOMBINED) API=1 JSCVT=1 FCMA=1 LRCPC=2 FRINTTS=1 SB=1 SPECRES=1 BF16=2
    /// DGH=1 I8MM=1 XS=1; in ID_AA64PFR0, FP=1 ADVSIMD=1 RAS=2 SVE=1 SEL2=1 DIT=1
    /// CSV2=3 CSV3=1 (GIC is filled in by the board). Assembled field by field:
    const MAX: (u64, u64, u64) = (
        0x1221_1111_1031_2120,
        0x0111_2111_0021_1152,
        0x1301_0011_2011_2222,
    );

    #[test]
    fn cortex_a57_has_crypto_and_crc_but_no_lse() {
        let f = CpuFeatures::from_id_registers(A57.0, A57.1, A57.2);
        let want = CpuFeatures::FP
            | CpuFeatures::ASIMD
            | CpuFeatures::AES
            | CpuFeatures::PMULL
            | CpuFeatures::SHA1
            | CpuFeatures::SHA2
            | CpuFeatures::CRC32;
        assert_eq!(f, want);
        assert!(!f.contains(CpuFeatures::LSE));
    }

    #[test]
    fn qemu_max_has_lse_sha3_sve_rndr() {
        let f = CpuFeatures::from_id_registers(MAX.0, MAX.1, MAX.2);
        assert_eq!(
            f,
            CpuFeatures::all(),
            "missing: {:?}",
            CpuFeatures::all() - f
        );
        // The field values the flags come from.
        assert_eq!(field(MAX.0, 20), 3, "Atomic");
        assert_eq!(field(MAX.0, 12), 2, "SHA2");
        assert_eq!(field(MAX.2, 32), 1, "SVE");
        assert_eq!(field(MAX.2, 16), 1, "FP");
    }

    #[test]
    fn absent_fields_clear_their_features() {
        // FP and AdvSIMD 0xF: no FP; Atomic 1 (reserved): no LSE; AES 1: AES without
        // PMULL; SHA2 1: no SHA512.
        let pfr0 = 0x0000_0000_00ff_2222;
        let isar0 = 0x0000_0000_0011_1110;
        let f = CpuFeatures::from_id_registers(isar0, 0, pfr0);
        assert_eq!(
            f,
            CpuFeatures::AES | CpuFeatures::SHA1 | CpuFeatures::SHA2 | CpuFeatures::CRC32
        );
        assert_eq!(
            CpuFeatures::from_id_registers(0, 0x10, 0xff_0000),
            CpuFeatures::PAUTH
        );
    }

    #[test]
    fn cpacr_traps_make_simd_features_unusable() {
        let has = CpuFeatures::from_id_registers(MAX.0, MAX.1, MAX.2);
        let all_off = CpuFeatures::unusable_from(has, 0);
        assert!(all_off.contains(CpuFeatures::AES | CpuFeatures::SVE | CpuFeatures::FP));
        assert!(!all_off.contains(CpuFeatures::LSE) && !all_off.contains(CpuFeatures::CRC32));
        assert!(!all_off.contains(CpuFeatures::RNDR));
        let fp_only = CpuFeatures::unusable_from(has, CPACR_FPEN);
        assert_eq!(fp_only, CpuFeatures::SVE);
        assert!(CpuFeatures::unusable_from(has, CPACR_FPEN | CPACR_ZEN).is_empty());
        // FPEN = 0b01 (EL0 traps) is not enough either.
        assert!(CpuFeatures::unusable_from(has, 1 << 20 | CPACR_ZEN).contains(CpuFeatures::ASIMD));
        let a57 = CpuFeatures::from_id_registers(A57.0, A57.1, A57.2);
        assert!(!CpuFeatures::unusable_from(a57, CPACR_FPEN).contains(CpuFeatures::SVE));
    }

    #[test]
    fn save_area_sizes() {
        assert_eq!(FP_SAVE_AREA_SIZE, 528);
        // 128-bit vectors: 32×16 + 17×2 + 16.
        assert_eq!(SimdState::sve_save_area_size(16), 562);
        assert_eq!(SimdState::sve_save_area_size(256), 8192 + 17 * 32 + 16);
    }
}
