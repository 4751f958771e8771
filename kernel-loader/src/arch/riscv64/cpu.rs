//! riscv64 CPU identification: [`CpuFeatures`], the ISA extensions resolvers receive
//! (re-exported as `kernel_loader::CpuFeatures` on riscv64; its bits are the first
//! argument of the C resolver ABI), read from the device tree the firmware passes.
//!
//! S-mode cannot read `misa`, and there is no architected register listing the `Z*`
//! extensions, so the kernel reads them from the device tree (OpenSBI passes its address
//! in `a1`): each `/cpus/cpu@N` node's `riscv,isa-extensions` string list, or failing
//! that its `riscv,isa` string (`rv64imafdc_zicsr_zba_zbb…`). [`CpuFeatures::from_fdt`]
//! parses it (with [`super::dtb`]) and intersects the harts' sets, since a resolver's
//! choice runs on every hart; the kernel records the result once at boot
//! ([`set_detected`], or [`init_from_fdt`]) and `CpuFeatures::detect` returns it, less
//! what `sstatus` keeps from use.
//!
//! Also the register-state setup F/D and V need in S-mode: `sstatus.FS` and `sstatus.VS`
//! must not be Off, or every FP/vector instruction traps (`enable_simd_state`,
//! `CpuFeatures::unusable`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::dtb::{Dtb, trim_nul};

/// `sstatus.FS` (bits 13..15): FP state Off (0) / Initial / Clean / Dirty.
pub const SSTATUS_FS: u64 = 0b11 << 13;
/// `sstatus.FS` = Initial.
pub const SSTATUS_FS_INITIAL: u64 = 0b01 << 13;
/// `sstatus.VS` (bits 9..11): vector state Off (0) / Initial / Clean / Dirty.
pub const SSTATUS_VS: u64 = 0b11 << 9;
/// `sstatus.VS` = Initial.
pub const SSTATUS_VS_INITIAL: u64 = 0b01 << 9;
/// Bytes of the F/D state: 32 × 64-bit f registers and `fcsr` (padded to 16).
pub const FP_SAVE_AREA_SIZE: u32 = 32 * 8 + 16;

bitflags::bitflags! {
    /// ISA extensions resolvers can test (what every hart has, per the device tree, and
    /// the kernel has enabled; see `CpuFeatures::detect`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CpuFeatures: u64 {
        /// Base integer ISA.
        const I = 1 << 0;
        /// Integer multiply/divide.
        const M = 1 << 1;
        /// Atomics.
        const A = 1 << 2;
        /// Single-precision FP.
        const F = 1 << 3;
        /// Double-precision FP.
        const D = 1 << 4;
        /// Compressed instructions.
        const C = 1 << 5;
        /// Vector extension 1.0.
        const V = 1 << 6;
        /// Hypervisor extension.
        const H = 1 << 7;
        /// Address generation: `sh1add`…
        const ZBA = 1 << 8;
        /// Basic bit manipulation: `cpop`, `clz`, `ctz`, `rev8`, `orc.b`, `andn`…
        const ZBB = 1 << 9;
        /// Carry-less multiply: `clmul`, `clmulh`, `clmulr`.
        const ZBC = 1 << 10;
        /// Single-bit instructions: `bset`, `bclr`, `binv`, `bext`.
        const ZBS = 1 << 11;
        /// Bit manipulation for cryptography.
        const ZBKB = 1 << 12;
        /// Carry-less multiply for cryptography.
        const ZBKC = 1 << 13;
        /// Crossbar permutations.
        const ZBKX = 1 << 14;
        /// AES decryption.
        const ZKND = 1 << 15;
        /// AES encryption.
        const ZKNE = 1 << 16;
        /// SHA-2 hashes.
        const ZKNH = 1 << 17;
        /// NIST suite: Zbkb, Zbkc, Zbkx, Zkne, Zknd and Zknh together.
        const ZKN = 1 << 18;
        /// Entropy source (`seed` CSR).
        const ZKR = 1 << 19;
        /// Data-independent execution latency.
        const ZKT = 1 << 20;
        /// ShangMi suite (SM3, SM4).
        const ZKS = 1 << 21;
        /// Cache-block management: `cbo.clean`, `cbo.flush`, `cbo.inval`.
        const ZICBOM = 1 << 22;
        /// Cache-block zero: `cbo.zero`.
        const ZICBOZ = 1 << 23;
        /// Cache-block prefetch hints.
        const ZICBOP = 1 << 24;
        /// Conditional zero: `czero.eqz`, `czero.nez`.
        const ZICOND = 1 << 25;
        /// Half-precision FP.
        const ZFH = 1 << 26;
        /// Additional FP instructions (`fli`, `fminm`…).
        const ZFA = 1 << 27;
        /// `pause` hint.
        const ZIHINTPAUSE = 1 << 28;
        /// Wait on reservation set.
        const ZAWRS = 1 << 29;
        /// Compare-and-swap: `amocas`.
        const ZACAS = 1 << 30;
        /// Vector basic bit manipulation.
        const ZVBB = 1 << 31;
        /// Vector carry-less multiply.
        const ZVBC = 1 << 32;
        /// Vector AES.
        const ZVKNED = 1 << 33;
        /// Vector SHA-2.
        const ZVKNHB = 1 << 34;
        /// Supervisor timer compare (`stimecmp`).
        const SSTC = 1 << 35;
        /// Page-based memory types.
        const SVPBMT = 1 << 36;
        /// NAPOT translation contiguity.
        const SVNAPOT = 1 << 37;
        /// `Zicsr` (CSR instructions).
        const ZICSR = 1 << 38;
        /// `Zifencei` (`fence.i`).
        const ZIFENCEI = 1 << 39;
    }
}

/// Multi-letter extension names and their flags (lower case).
const NAMES: &[(&str, CpuFeatures)] = &[
    ("zba", CpuFeatures::ZBA),
    ("zbb", CpuFeatures::ZBB),
    ("zbc", CpuFeatures::ZBC),
    ("zbs", CpuFeatures::ZBS),
    ("zbkb", CpuFeatures::ZBKB),
    ("zbkc", CpuFeatures::ZBKC),
    ("zbkx", CpuFeatures::ZBKX),
    ("zknd", CpuFeatures::ZKND),
    ("zkne", CpuFeatures::ZKNE),
    ("zknh", CpuFeatures::ZKNH),
    ("zkn", CpuFeatures::ZKN_SET),
    ("zkr", CpuFeatures::ZKR),
    ("zkt", CpuFeatures::ZKT),
    ("zks", CpuFeatures::ZKS),
    (
        "zk",
        CpuFeatures::ZKN_SET
            .union(CpuFeatures::ZKR)
            .union(CpuFeatures::ZKT),
    ),
    ("zicbom", CpuFeatures::ZICBOM),
    ("zicboz", CpuFeatures::ZICBOZ),
    ("zicbop", CpuFeatures::ZICBOP),
    ("zicond", CpuFeatures::ZICOND),
    ("zfh", CpuFeatures::ZFH),
    ("zfa", CpuFeatures::ZFA),
    ("zihintpause", CpuFeatures::ZIHINTPAUSE),
    ("zawrs", CpuFeatures::ZAWRS),
    ("zacas", CpuFeatures::ZACAS),
    ("zvbb", CpuFeatures::ZVBB),
    ("zvbc", CpuFeatures::ZVBC),
    ("zvkned", CpuFeatures::ZVKNED),
    ("zvknhb", CpuFeatures::ZVKNHB),
    ("sstc", CpuFeatures::SSTC),
    ("svpbmt", CpuFeatures::SVPBMT),
    ("svnapot", CpuFeatures::SVNAPOT),
    ("zicsr", CpuFeatures::ZICSR),
    ("zifencei", CpuFeatures::ZIFENCEI),
];

/// The flag of a single-letter extension (`g` = `imafd_zicsr_zifencei`, `b` = `zba_zbb_zbs`).
const fn letter(c: u8) -> Option<CpuFeatures> {
    Some(match c {
        b'i' | b'e' => CpuFeatures::I,
        b'm' => CpuFeatures::M,
        b'a' => CpuFeatures::A,
        b'f' => CpuFeatures::F,
        b'd' => CpuFeatures::D,
        b'c' => CpuFeatures::C,
        b'v' => CpuFeatures::V,
        b'h' => CpuFeatures::H,
        b'g' => CpuFeatures::I
            .union(CpuFeatures::M)
            .union(CpuFeatures::A)
            .union(CpuFeatures::F)
            .union(CpuFeatures::D)
            .union(CpuFeatures::ZICSR)
            .union(CpuFeatures::ZIFENCEI),
        b'b' => CpuFeatures::ZBA
            .union(CpuFeatures::ZBB)
            .union(CpuFeatures::ZBS),
        _ => return None,
    })
}

/// `name` without a trailing version (`2p0`, `1`), if anything is left.
fn strip_version(name: &str) -> &str {
    let b = name.as_bytes();
    let mut end = b.len();
    while end > 0 && b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    // `…<major>p<minor>`: strip the `p` and the major too.
    if end < b.len() && end >= 2 && b[end - 1] == b'p' && b[end - 2].is_ascii_digit() {
        end -= 1;
        while end > 0 && b[end - 1].is_ascii_digit() {
            end -= 1;
        }
    }
    if end == 0 { name } else { &name[..end] }
}

impl CpuFeatures {
    /// Zkn and the six extensions it stands for.
    pub const ZKN_SET: CpuFeatures = CpuFeatures::ZKN
        .union(CpuFeatures::ZBKB)
        .union(CpuFeatures::ZBKC)
        .union(CpuFeatures::ZBKX)
        .union(CpuFeatures::ZKNE)
        .union(CpuFeatures::ZKND)
        .union(CpuFeatures::ZKNH);

    /// The features that execute in F/D registers (trapped while `sstatus.FS` is Off).
    pub const NEEDS_FP_STATE: CpuFeatures = CpuFeatures::F
        .union(CpuFeatures::D)
        .union(CpuFeatures::ZFH)
        .union(CpuFeatures::ZFA);

    /// The features that execute in vector registers (trapped while `sstatus.VS` is
    /// Off).
    pub const NEEDS_VECTOR_STATE: CpuFeatures = CpuFeatures::V
        .union(CpuFeatures::ZVBB)
        .union(CpuFeatures::ZVBC)
        .union(CpuFeatures::ZVKNED)
        .union(CpuFeatures::ZVKNHB);

    /// The flags of one extension name as the device tree spells it (`"zbb"`, `"v"`,
    /// `"zicbom"`; any case; a trailing version such as `2p0` is ignored); empty for
    /// a name this set has no flag for.
    pub fn from_extension(name: &str) -> CpuFeatures {
        let mut buf = [0u8; 32];
        let Some(lower) = buf.get_mut(..name.len()) else {
            return CpuFeatures::empty();
        };
        for (d, s) in lower.iter_mut().zip(name.bytes()) {
            *d = s.to_ascii_lowercase();
        }
        let Ok(name) = core::str::from_utf8(lower) else {
            return CpuFeatures::empty();
        };
        let name = strip_version(name);
        if name.len() == 1 {
            return letter(name.as_bytes()[0]).unwrap_or(CpuFeatures::empty());
        }
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(CpuFeatures::empty(), |&(_, f)| f)
            .with_implied()
    }

    /// What `riscv,isa` (`rv64imafdc_zicsr_zba_zbb…`, any case, versions allowed) says;
    /// `None` if it does not start with `rv64` or `rv32`.
    pub fn from_isa_str(isa: &str) -> Option<CpuFeatures> {
        let b = isa.as_bytes();
        if b.len() < 4
            || !(b[..4].eq_ignore_ascii_case(b"rv64") || b[..4].eq_ignore_ascii_case(b"rv32"))
        {
            return None;
        }
        let mut f = CpuFeatures::empty();
        // Each `_`-separated part: a run of single letters (each with an optional
        // version, `<major>[p<minor>]`) up to a multi-letter (z/s/x) name, or just the
        // name.
        for part in isa[4..].split('_') {
            let b = part.as_bytes();
            let mut i = 0;
            while i < b.len() {
                let c = b[i].to_ascii_lowercase();
                if matches!(c, b'z' | b's' | b'x') {
                    f |= CpuFeatures::from_extension(&part[i..]);
                    break;
                }
                f |= letter(c).unwrap_or(CpuFeatures::empty());
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if i + 1 < b.len() && b[i].eq_ignore_ascii_case(&b'p') && b[i + 1].is_ascii_digit()
                {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
        }
        Some(f.with_implied())
    }

    /// What a `riscv,isa-extensions` string list (the property's raw value: names,
    /// each NUL-terminated) says.
    pub fn from_isa_extensions(list: &[u8]) -> CpuFeatures {
        let mut f = CpuFeatures::empty();
        for name in list.split(|&b| b == 0) {
            if let Ok(name) = core::str::from_utf8(name) {
                f |= CpuFeatures::from_extension(name);
            }
        }
        f.with_implied()
    }

    /// `self` with the extensions it implies: Zkn from its six parts (and the parts
    /// from Zkn), F from D or Zfh.
    pub const fn with_implied(self) -> CpuFeatures {
        let mut f = self;
        if f.contains(CpuFeatures::ZKN) {
            f = f.union(CpuFeatures::ZKN_SET);
        }
        if f.contains(CpuFeatures::ZKN_SET.difference(CpuFeatures::ZKN)) {
            f = f.union(CpuFeatures::ZKN);
        }
        if f.contains(CpuFeatures::D) || f.contains(CpuFeatures::ZFH) {
            f = f.union(CpuFeatures::F);
        }
        f
    }

    /// What every enabled hart of the device tree `dtb` has: the intersection over the
    /// `/cpus/cpu@N` nodes whose `status` is absent or `"okay"` of each one's
    /// `riscv,isa-extensions` (or, without it, `riscv,isa`). The tree is read by
    /// [`super::dtb`], which checks every offset and token: a malformed tree is an error.
    ///
    /// # Safety
    ///
    /// `dtb` points at a flattened device tree (the `a1` OpenSBI passes), readable for
    /// 8 bytes and, when they hold the FDT magic, for the `totalsize` its header gives,
    /// and not written while this runs.
    pub unsafe fn from_fdt(dtb: *const u8) -> Result<CpuFeatures, DtbError> {
        // SAFETY: forwarded.
        let tree = unsafe { Dtb::from_ptr(dtb) }?;
        CpuFeatures::from_dtb(&tree)
    }

    /// [`CpuFeatures::from_fdt`] on a device tree in a buffer.
    pub fn from_fdt_bytes(dtb: &[u8]) -> Result<CpuFeatures, DtbError> {
        CpuFeatures::from_dtb(&Dtb::new(dtb)?)
    }

    fn from_dtb(tree: &Dtb<'_>) -> Result<CpuFeatures, DtbError> {
        let mut all: Option<CpuFeatures> = None;
        tree.for_each_cpu(&mut |cpu| {
            if !cpu.is_enabled() {
                return Ok(());
            }
            let f = if let Some(list) = cpu.isa_extensions {
                CpuFeatures::from_isa_extensions(list)
            } else {
                let isa = cpu.isa.ok_or(DtbError::NoIsa { cpu: cpu.index })?;
                core::str::from_utf8(trim_nul(isa))
                    .ok()
                    .and_then(CpuFeatures::from_isa_str)
                    .ok_or(DtbError::BadIsa { cpu: cpu.index })?
            };
            all = Some(all.map_or(f, |a| a & f));
            Ok(())
        })?;
        all.ok_or(DtbError::NoCpus)
    }

    /// What the kernel recorded at boot ([`set_detected`]), less what `sstatus` keeps
    /// from use on the running hart (`CpuFeatures::unusable`); empty if nothing was
    /// recorded (S-mode cannot ask the hardware).
    #[cfg(target_arch = "riscv64")]
    pub fn detect() -> CpuFeatures {
        let has = detected().unwrap_or(CpuFeatures::empty());
        has.difference(CpuFeatures::unusable_from(has, read_sstatus()))
    }

    /// Of the features `has`, those `sstatus` keeps from use: the FP ones while FS is
    /// Off, the vector ones while VS is Off (pure).
    pub const fn unusable_from(has: CpuFeatures, sstatus: u64) -> CpuFeatures {
        let mut out = CpuFeatures::empty();
        if sstatus & SSTATUS_FS == 0 {
            out = out.union(has.intersection(CpuFeatures::NEEDS_FP_STATE));
        }
        if sstatus & SSTATUS_VS == 0 {
            out = out.union(has.intersection(CpuFeatures::NEEDS_VECTOR_STATE));
        }
        out
    }

    /// The recorded features that `sstatus` keeps from use on the running hart. A
    /// kernel that expects FP or vectors should check this is empty after
    /// `enable_simd_state`.
    #[cfg(target_arch = "riscv64")]
    pub fn unusable() -> CpuFeatures {
        CpuFeatures::unusable_from(detected().unwrap_or(CpuFeatures::empty()), read_sstatus())
    }
}

/// Why [`CpuFeatures::from_fdt`] found no feature set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbError {
    /// Not a flattened device tree (magic, size or version).
    BadHeader,
    /// The structure block is malformed at this offset (a bad token, a length or name
    /// offset out of bounds, unbalanced nodes).
    Malformed {
        /// Offset in the structure block.
        offset: u32,
    },
    /// No `/cpus` node, or no enabled `cpu@N` under it.
    NoCpus,
    /// The `n`th cpu node has neither `riscv,isa-extensions` nor `riscv,isa`.
    NoIsa {
        /// Index among `/cpus`'s `cpu` children.
        cpu: u32,
    },
    /// The `n`th cpu node's `riscv,isa` does not start with `rv64`/`rv32`.
    BadIsa {
        /// Index among `/cpus`'s `cpu` children.
        cpu: u32,
    },
}

impl core::fmt::Display for DtbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DtbError::BadHeader => f.write_str("not a flattened device tree"),
            DtbError::Malformed { offset } => {
                write!(
                    f,
                    "device tree structure block malformed at offset {offset:#x}"
                )
            }
            DtbError::NoCpus => f.write_str("device tree has no enabled /cpus/cpu node"),
            DtbError::NoIsa { cpu } => write!(f, "cpu node {cpu} has no riscv,isa"),
            DtbError::BadIsa { cpu } => write!(f, "cpu node {cpu}: riscv,isa is not rv64/rv32"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DtbError {}

/// The recorded features' bits, and whether any were recorded.
static DETECTED: AtomicU64 = AtomicU64::new(0);
static RECORDED: AtomicBool = AtomicBool::new(false);

/// Records what every hart has (from the device tree, or the kernel's own knowledge):
/// what `CpuFeatures::detect` then returns. Call it once at boot, before `patch::init`.
pub fn set_detected(features: CpuFeatures) {
    DETECTED.store(features.bits(), Ordering::SeqCst);
    RECORDED.store(true, Ordering::SeqCst);
}

/// What [`set_detected`] recorded, if it was called.
pub fn detected() -> Option<CpuFeatures> {
    RECORDED
        .load(Ordering::SeqCst)
        .then(|| CpuFeatures::from_bits_retain(DETECTED.load(Ordering::SeqCst)))
}

/// [`CpuFeatures::from_fdt`], then [`set_detected`] with the result.
///
/// # Safety
///
/// As for [`CpuFeatures::from_fdt`].
pub unsafe fn init_from_fdt(dtb: *const u8) -> Result<CpuFeatures, DtbError> {
    // SAFETY: forwarded.
    let f = unsafe { CpuFeatures::from_fdt(dtb) }?;
    set_detected(f);
    Ok(f)
}

/// Reads `sstatus`.
#[cfg(target_arch = "riscv64")]
pub fn read_sstatus() -> u64 {
    let v: u64;
    // SAFETY: `sstatus` is readable in S-mode (where the loader runs); no side effect.
    unsafe { core::arch::asm!("csrr {}, sstatus", out(reg) v, options(nomem, nostack)) };
    v
}

/// Which state `enable_simd_state` enabled on the hart it ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdState {
    /// `sstatus.FS` was set to Initial (the harts have F or D).
    pub fp: bool,
    /// `sstatus.VS` was set to Initial (the harts have V).
    pub vector: bool,
    /// `vlenb`: the vector register length in bytes (0 without V).
    pub vector_bytes: u32,
    /// Bytes a context switch must reserve for this hart's FP and vector state:
    /// [`FP_SAVE_AREA_SIZE`], plus with V [`SimdState::vector_save_area_size`].
    pub save_area_size: u32,
}

impl SimdState {
    /// The vector state for `vlenb` bytes: 32 registers, and `vstart`, `vl`, `vtype`,
    /// `vcsr` (padded to 32).
    pub const fn vector_save_area_size(vlenb: u32) -> u32 {
        32 * vlenb + 32
    }
}

/// Turns on the FP (`sstatus.FS` = Initial, with F or D) and vector (`sstatus.VS` =
/// Initial, with V) register state on the running hart, for the features
/// [`set_detected`] recorded, so `CpuFeatures::detect` reports them; with V, reads
/// `vlenb`.
///
/// Call it on every hart (`sstatus` is per hart), after [`set_detected`] and before
/// anything uses FP/vector registers, `CpuFeatures::detect` and `patch::init`.
///
/// # Safety
///
/// * The caller runs in S-mode.
/// * The kernel saves and restores the FP (and vector) state of every context from now
///   on (Initial/Clean/Dirty tracking is the kernel's).
#[cfg(target_arch = "riscv64")]
pub unsafe fn enable_simd_state() -> SimdState {
    let has = detected().unwrap_or(CpuFeatures::empty());
    let fp = has.intersects(CpuFeatures::F | CpuFeatures::D);
    let vector = has.contains(CpuFeatures::V);
    let mut set = 0u64;
    if fp {
        set |= SSTATUS_FS_INITIAL;
    }
    if vector {
        set |= SSTATUS_VS_INITIAL;
    }
    // SAFETY: S-mode per the contract; only FS/VS change (from Off to Initial; a state
    // already beyond Off stays, as `csrs` only sets bits).
    unsafe { core::arch::asm!("csrs sstatus, {}", in(reg) set, options(nostack)) };
    let mut vlenb = 0u32;
    if vector {
        let v: u64;
        // SAFETY: the hart has V and VS is on: `vlenb` (CSR 0xc22) is readable.
        unsafe { core::arch::asm!("csrr {}, 0xc22", out(reg) v, options(nomem, nostack)) };
        vlenb = v as u32;
    }
    SimdState {
        fp,
        vector,
        vector_bytes: vlenb,
        save_area_size: FP_SAVE_AREA_SIZE
            + if vector {
                SimdState::vector_save_area_size(vlenb)
            } else {
                0
            },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_strings_parse() {
        let f = CpuFeatures::from_isa_str(
            "rv64imafdch_zicsr_zifencei_zihintpause_zba_zbb_zbc_zbs_sstc",
        )
        .unwrap();
        let want = CpuFeatures::I
            | CpuFeatures::M
            | CpuFeatures::A
            | CpuFeatures::F
            | CpuFeatures::D
            | CpuFeatures::C
            | CpuFeatures::H
            | CpuFeatures::ZICSR
            | CpuFeatures::ZIFENCEI
            | CpuFeatures::ZIHINTPAUSE
            | CpuFeatures::ZBA
            | CpuFeatures::ZBB
            | CpuFeatures::ZBC
            | CpuFeatures::ZBS
            | CpuFeatures::SSTC;
        assert_eq!(f, want);
        // `g`, versions, upper case, an unknown extension, and a multi-letter name glued
        // to the base.
        let f =
            CpuFeatures::from_isa_str("RV64I2p1M2P0a2p1F_D2p2C2p0V1p0_Zicbom1p0_xfoo_zkn").unwrap();
        assert!(f.contains(CpuFeatures::I | CpuFeatures::M | CpuFeatures::A | CpuFeatures::V));
        assert!(f.contains(CpuFeatures::ZICBOM | CpuFeatures::ZKN_SET));
        let g = CpuFeatures::from_isa_str("rv64gczbb").unwrap();
        assert!(
            g.contains(CpuFeatures::D | CpuFeatures::ZIFENCEI | CpuFeatures::C | CpuFeatures::ZBB)
        );
        assert!(!g.contains(CpuFeatures::ZBA));
        assert_eq!(CpuFeatures::from_isa_str("x86"), None);
        assert_eq!(CpuFeatures::from_isa_str(""), None);
        // Zkn's parts make Zkn; one missing does not.
        let parts = CpuFeatures::from_isa_str("rv64i_zbkb_zbkc_zbkx_zkne_zknd_zknh").unwrap();
        assert!(parts.contains(CpuFeatures::ZKN));
        let five = CpuFeatures::from_isa_str("rv64i_zbkb_zbkc_zbkx_zkne_zknd").unwrap();
        assert!(!five.contains(CpuFeatures::ZKN));
    }

    #[test]
    fn isa_extension_lists_parse() {
        let f = CpuFeatures::from_isa_extensions(b"i\0m\0a\0f\0d\0c\0v\0zicbom\0zba\0zbb\0zbs\0\0");
        assert!(
            f.contains(CpuFeatures::V | CpuFeatures::ZICBOM | CpuFeatures::ZBB | CpuFeatures::ZBS)
        );
        assert!(!f.contains(CpuFeatures::ZBC));
        assert_eq!(CpuFeatures::from_extension("zbb2p0"), CpuFeatures::ZBB);
        assert_eq!(
            CpuFeatures::from_extension("nonsense"),
            CpuFeatures::empty()
        );
        assert_eq!(
            CpuFeatures::from_extension("a-name-longer-than-thirty-two-bytes"),
            CpuFeatures::empty()
        );
    }

    #[test]
    fn sstatus_gates_fp_and_vector() {
        let has = CpuFeatures::F | CpuFeatures::D | CpuFeatures::V | CpuFeatures::ZBB;
        assert_eq!(
            CpuFeatures::unusable_from(has, 0),
            CpuFeatures::F | CpuFeatures::D | CpuFeatures::V
        );
        assert_eq!(
            CpuFeatures::unusable_from(has, SSTATUS_FS_INITIAL),
            CpuFeatures::V
        );
        assert!(CpuFeatures::unusable_from(has, SSTATUS_FS | SSTATUS_VS_INITIAL).is_empty());
        assert_eq!(SimdState::vector_save_area_size(16), 32 * 16 + 32);
    }

    #[test]
    fn recorded_features_are_returned() {
        // (The only test that records.)
        set_detected(CpuFeatures::ZBB | CpuFeatures::I);
        assert_eq!(detected(), Some(CpuFeatures::ZBB | CpuFeatures::I));
    }
}
