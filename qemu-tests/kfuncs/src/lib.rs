//! Real ifuncs for the ksites test kernels, each with a baseline and an accelerated
//! implementation chosen from the CPU's features, plus helpers that call them from
//! several functions (and, from the kernel crate, from another crate), including tail
//! calls. The implementations are per architecture (the private `x86_64` and `aarch64`
//! modules, re-exported here); `popcount` and `crc32c` and their callers exist on both.
//!
//! | ifunc | x86_64: fast / baseline | aarch64: fast / baseline |
//! |---|---|---|
//! | `memcpy` | `rep movsb` (ERMS) / SSE2 loop | — |
//! | `popcount` | `popcnt` (POPCNT) / SWAR | AdvSIMD `cnt`+`addv` (ASIMD) / nibble table |
//! | `crc32c` | `crc32` (SSE4.2) / table | `crc32cx`/`crc32cb` (CRC32) / table |
//! | `sum_u32` | 256-bit adds (AVX2) / scalar | — |
//! | `fetch_add` | — | `ldaddal` (LSE) / `ldaxr`/`stlxr` loop |
//! | `xor3` | — | `eor3` (SHA3) / two AdvSIMD `eor` |
#![no_std]

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
use kernel_loader::ifunc;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;

// ---------------------------------------------------------------------------------------
// crc32c (Castagnoli, reflected polynomial 0x82f63b78), no pre/post inversion.

const CRC32C_POLY: u32 = 0x82f6_3b78;

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Byte-at-a-time table lookup.
///
/// # Safety
///
/// `data` is valid for `len` bytes.
pub unsafe extern "C" fn crc32c_table(crc: u32, data: *const u8, len: usize) -> u32 {
    let mut c = crc;
    for i in 0..len {
        // SAFETY: i < len.
        let b = unsafe { data.add(i).read() };
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

// ---------------------------------------------------------------------------------------
// The ifuncs, declared here so their table names are `kfuncs::NAME` on both architectures
// (`ifunc!` names them by `module_path!()`); the implementations and resolvers are the
// architecture module's (`arch`).

ifunc! {
    /// Number of set bits in `x`.
    pub fn popcount(x: u64) -> u32;
    default = arch::popcount_soft;
    resolver = arch::pick_popcount;
}

ifunc! {
    /// CRC-32C update of `crc` over `len` bytes at `data` (no inversion; callers invert).
    /// `data` must be valid for `len` bytes.
    pub fn crc32c(crc: u32, data: *const u8, len: usize) -> u32;
    default = crc32c_table;
    resolver = arch::pick_crc32c;
}

#[cfg(target_arch = "x86_64")]
ifunc! {
    /// Copies `n` bytes from `src` to `dst` (which must not overlap); returns `dst`.
    /// Callers must pass valid, disjoint ranges (the C `memcpy` contract).
    pub fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
    default = arch::memcpy_sse2;
    resolver = arch::pick_memcpy;
}

#[cfg(target_arch = "x86_64")]
ifunc! {
    /// Sum of `n` u32s at `p`, as u64. `p` must be valid for `n` elements.
    pub fn sum_u32(p: *const u32, n: usize) -> u64;
    default = arch::sum_u32_scalar;
    resolver = arch::pick_sum;
}

#[cfg(target_arch = "aarch64")]
ifunc! {
    /// Atomically adds `v` to `*p` (acquire-release); returns the old value. `p` must be
    /// valid, 8-aligned and accessed only atomically.
    pub fn fetch_add(p: *mut u64, v: u64) -> u64;
    default = arch::fetch_add_llsc;
    resolver = arch::pick_fetch_add;
}

#[cfg(target_arch = "aarch64")]
ifunc! {
    /// `dst[i] ^= a[i] ^ b[i]` for `i < n`. All three must be valid for `n` bytes and
    /// `dst` must not overlap `a` or `b`.
    pub fn xor3(dst: *mut u8, a: *const u8, b: *const u8, n: usize);
    default = arch::xor3_neon;
    resolver = arch::pick_xor3;
}

// ---------------------------------------------------------------------------------------
// Callers shared by both architectures: a loop, tail calls, a probe.

/// Number of set bits in a bitmap: a call site in a loop.
#[inline(never)]
pub fn bitmap_weight(words: &[u64]) -> u64 {
    kernel_loader::probe!(kfuncs, bitmap, words.len());
    let mut w = 0u64;
    for &x in words {
        w += u64::from(popcount(x));
    }
    w
}

/// Tail call of `popcount`.
#[inline(never)]
pub extern "C" fn popcount_tail(x: u64) -> u32 {
    popcount(x)
}

/// Hamming distance: popcount of the xor.
#[inline(never)]
pub extern "C" fn hamming(a: u64, b: u64) -> u32 {
    popcount(a ^ b)
}

/// Standard CRC-32C of `data` (inverted in and out).
#[inline(never)]
pub fn crc32c_of(data: &[u8]) -> u32 {
    !crc32c(!0, data.as_ptr(), data.len())
}

/// Tail call of `crc32c`.
#[inline(never)]
pub extern "C" fn crc32c_tail(crc: u32, data: *const u8, len: usize) -> u32 {
    crc32c(crc, data, len)
}
