//! `rmod`: the Rust test module of the ksites test kernel.
//!
//! The xtask compiles this crate alone into one relocatable object (`cargo rustc
//! --emit=obj`, one codegen unit), runs `ksites embed` on it and hands the result to the
//! kernel build, which `include_bytes!`s it; the kernel's module tests load it with
//! `kernel_loader::module::Module::load` and call the functions below by symbol name.
//!
//! What it exercises:
//!
//! * calls to two **kernel ifuncs** (`popcount`, `crc32c`, imported with
//!   [`kernel_loader::ifunc_import!`]): after loading, each call site must be a direct
//!   `call` to the implementation the kernel chose;
//! * its **own ifunc**, [`rmod_mix`], resolved by the module loader from the CPU
//!   features: AVX2 → [`MIX_AVX2`], else POPCNT → [`MIX_POPCNT`], else [`MIX_BASE`]
//!   (each implementation XORs its own tag into the argument); built for aarch64:
//!   LSE atomics → [`MIX_LSE`], else CRC32 → [`MIX_CRC32`], else [`MIX_BASE`]; built
//!   for riscv64: Zbb → [`MIX_ZBB`], else Zbc → [`MIX_ZBC`], else [`MIX_BASE`];
//! * a **probe** `rmod:hit` with three arguments and an is-enabled check of it;
//! * `ksites_module_init` / `ksites_module_exit`, which count in [`rmod_state`];
//! * on x86_64 (issue 18, the kernel's `key_tests` and `retarget_tests`): sites of the
//!   kernel's **static key** `ksites_test_key` ([`rmod_kkey_unlikely`],
//!   [`rmod_kkey_likely`]), a key of its own ([`RMOD_KEY`], [`rmod_own_unlikely`]), and
//!   calls to the kernel ifunc `retarget_tag` ([`rmod_tag_call`]), which the kernel
//!   retargets live.
//!
//! The object must not reference anything from `core` by a mangled name (the kernel
//! exports only unmangled symbols): no panicking paths, only wrapping arithmetic and
//! raw-pointer loops. The xtask checks the object's undefined symbols.
#![no_std]

use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::{CpuFeatures, ifunc, probe, probe_enabled};

kernel_loader::ifunc_import! {
    /// The kernel's popcount (kfuncs), exported as `popcount`.
    pub fn popcount(x: u64) -> u32;
    /// The kernel's CRC-32C (kfuncs), exported as `crc32c`.
    pub fn crc32c(crc: u32, data: *const u8, len: usize) -> u32;
}

/// Tag [`rmod_mix`]'s AVX2 implementation XORs in.
pub const MIX_AVX2: u64 = 0xa2a2_0000_0000_0000;
/// Tag of the POPCNT implementation.
pub const MIX_POPCNT: u64 = 0x9c9c_0000_0000_0000;
/// Tag of the baseline implementation (also the default).
pub const MIX_BASE: u64 = 0xbaba_0000_0000_0000;

/// Tag of the aarch64 LSE-atomics implementation.
pub const MIX_LSE: u64 = 0x15e0_0000_0000_0000;
/// Tag of the aarch64 CRC32 implementation.
pub const MIX_CRC32: u64 = 0xc3c3_0000_0000_0000;
/// Tag of the riscv64 Zbb implementation.
pub const MIX_ZBB: u64 = 0x2bb0_0000_0000_0000;
/// Tag of the riscv64 Zbc implementation.
pub const MIX_ZBC: u64 = 0x2bc0_0000_0000_0000;

/// Defines the flavours of [`rmod_mix`]: each `x` XOR its tag. Which instruction it
/// could use does not matter; the tag says which one the resolver chose.
macro_rules! mix_flavours {
    ($($(#[$attr:meta])* $name:ident = $tag:ident;)+) => {
        $(
            $(#[$attr])*
            ///
            /// # Safety
            ///
            /// None: safe on every CPU (`unsafe` to match the ifunc's slot type).
            pub unsafe extern "C" fn $name(x: u64) -> u64 {
                x ^ $tag
            }
        )+
    };
}

mix_flavours! {
    /// Baseline (and default) implementation of [`rmod_mix`].
    mix_base = MIX_BASE;
    /// The POPCNT flavour of [`rmod_mix`].
    mix_popcnt = MIX_POPCNT;
    /// The AVX2 flavour of [`rmod_mix`].
    mix_avx2 = MIX_AVX2;
    /// The aarch64 LSE flavour of [`rmod_mix`].
    #[cfg(target_arch = "aarch64")]
    mix_lse = MIX_LSE;
    /// The aarch64 CRC32 flavour of [`rmod_mix`].
    #[cfg(target_arch = "aarch64")]
    mix_crc32 = MIX_CRC32;
    /// The riscv64 Zbb flavour of [`rmod_mix`].
    #[cfg(target_arch = "riscv64")]
    mix_zbb = MIX_ZBB;
    /// The riscv64 Zbc flavour of [`rmod_mix`].
    #[cfg(target_arch = "riscv64")]
    mix_zbc = MIX_ZBC;
}

/// An implementation of [`rmod_mix`].
type Flavour = unsafe extern "C" fn(u64) -> u64;

/// The flavours by preference: the first whose feature the CPU has wins, else
/// [`mix_base`].
#[cfg(target_arch = "aarch64")]
const FLAVOURS: [(CpuFeatures, Flavour); 2] =
    [(CpuFeatures::LSE, mix_lse), (CpuFeatures::CRC32, mix_crc32)];
/// The flavours by preference (see the aarch64 list).
#[cfg(target_arch = "riscv64")]
const FLAVOURS: [(CpuFeatures, Flavour); 2] =
    [(CpuFeatures::ZBB, mix_zbb), (CpuFeatures::ZBC, mix_zbc)];
/// The flavours by preference (see the aarch64 list).
#[cfg(target_arch = "x86_64")]
const FLAVOURS: [(CpuFeatures, Flavour); 2] = [
    (CpuFeatures::AVX2, mix_avx2),
    (CpuFeatures::POPCNT, mix_popcnt),
];

fn pick_mix(f: &CpuFeatures) -> Flavour {
    for &(feature, flavour) in &FLAVOURS {
        if f.contains(feature) {
            return flavour;
        }
    }
    mix_base
}

ifunc! {
    /// The module's own ifunc: `x` XOR the chosen implementation's tag.
    pub fn rmod_mix(x: u64) -> u64;
    default = mix_base;
    resolver = pick_mix;
}

/// Bumped by init (`+1`) and exit (`+0x100`): the kernel checks both ran.
static STATE: AtomicU64 = AtomicU64::new(0);

/// Run by `Module::load`; 0 means success.
#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_init() -> i32 {
    STATE.fetch_add(1, Ordering::Relaxed);
    0
}

/// Run by `Module::unload`.
#[unsafe(no_mangle)]
pub extern "C" fn ksites_module_exit() {
    STATE.fetch_add(0x100, Ordering::Relaxed);
}

/// How often init (low byte) and exit (second byte) ran in this copy of the module.
#[unsafe(no_mangle)]
pub extern "C" fn rmod_state() -> u64 {
    STATE.load(Ordering::Relaxed)
}

/// Sum of `popcount(p[i])` for `i < n`, through the kernel's popcount ifunc.
///
/// # Safety
///
/// `p` is valid for reading `n` `u64`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rmod_popcount_sum(p: *const u64, n: usize) -> u64 {
    let mut sum = 0u64;
    let mut i = 0usize;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees `p` is valid for `n` words.
        let w = unsafe { core::ptr::read(p.wrapping_add(i)) };
        sum = sum.wrapping_add(u64::from(popcount(w)));
        i = i.wrapping_add(1);
    }
    sum
}

/// CRC-32C of `len` bytes at `data`, starting from `!0`, through the kernel's crc32c.
///
/// # Safety
///
/// `data` is valid for reading `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rmod_crc(data: *const u8, len: usize) -> u32 {
    crc32c(!0, data, len)
}

/// Calls the module's own ifunc.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rmod_mix_call(x: u64) -> u64 {
    rmod_mix(x)
}

/// Fires `rmod:hit(a, b, c)`; returns `a + b + c` (wrapping).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rmod_fire(a: u64, b: u64, c: u64) -> u64 {
    probe!(rmod, hit, a, b, c);
    a.wrapping_add(b).wrapping_add(c)
}

/// 1 while `rmod:hit` is enabled, else 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rmod_hit_enabled() -> u64 {
    u64::from(probe_enabled!(rmod, hit))
}

#[cfg(target_arch = "x86_64")]
pub use keys::*;

/// Issue 18's static keys and live retargeting, on x86_64.
#[cfg(target_arch = "x86_64")]
mod keys {
    use kernel_loader::key::StaticKey;
    use kernel_loader::{static_branch_likely, static_branch_unlikely, static_key};

    unsafe extern "C" {
        /// The kernel's key `KEY_MOD`, exported as `ksites_test_key`.
        static ksites_test_key: StaticKey;
    }

    kernel_loader::ifunc_import! {
        /// The kernel's retarget test ifunc (`x ^` its implementation's tag).
        pub fn retarget_tag(x: u64) -> u64;
    }

    static_key!(pub RMOD_KEY: default false);

    /// 1 while the kernel's key is enabled (an unlikely site), else 0.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn rmod_kkey_unlikely() -> u64 {
        u64::from(static_branch_unlikely!(ksites_test_key))
    }

    /// 1 while the kernel's key is enabled (a likely site), else 0.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn rmod_kkey_likely() -> u64 {
        u64::from(static_branch_likely!(ksites_test_key))
    }

    /// 1 while [`RMOD_KEY`] is enabled, else 0.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn rmod_own_unlikely() -> u64 {
        u64::from(static_branch_unlikely!(RMOD_KEY))
    }

    /// The address of [`RMOD_KEY`], for the kernel to enable it.
    #[unsafe(no_mangle)]
    pub extern "C" fn rmod_own_key() -> u64 {
        &RMOD_KEY as *const StaticKey as u64
    }

    /// `retarget_tag(x)` through a call site (not a tail call).
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn rmod_tag_call(x: u64) -> u64 {
        core::hint::black_box(retarget_tag(x))
    }

    /// `retarget_tag(x)` as a tail call.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn rmod_tag_tail(x: u64) -> u64 {
        retarget_tag(x)
    }
}
