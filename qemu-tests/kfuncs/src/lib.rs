//! Real ifuncs for the ksites test kernels, each with a baseline and an accelerated
//! implementation chosen from the CPU's features, plus helpers that call them from
//! several functions (and, from the kernel crate, from another crate), including tail
//! calls. The implementations are per architecture (the private `x86_64`, `aarch64` and
//! `riscv64` modules, re-exported here); `popcount` and `crc32c` and their callers exist
//! on all three, `fetch_add` and `xor3` on aarch64 and riscv64, which also list every
//! implementation by name (`POPCOUNT_IMPLS`, …) for the kernel's tests.
//!
//! | ifunc | x86_64: fast / baseline | aarch64: fast / baseline | riscv64: fast / baseline |
//! |---|---|---|---|
//! | `memcpy` | `rep movsb` (ERMS) / SSE2 loop | — | — |
//! | `popcount` | `popcnt` (POPCNT) / SWAR | AdvSIMD `cnt`+`addv` (ASIMD) / nibble table | `cpop` (Zbb) / nibble table |
//! | `crc32c` | `crc32` (SSE4.2) / table | `crc32cx`/`crc32cb` (CRC32) / table | `clmul` Barrett (Zbc) / table |
//! | `sum_u32` | 256-bit adds (AVX2) / scalar | — | — |
//! | `fetch_add` | — | `ldaddal` (LSE) / `ldaxr`/`stlxr` loop | `amoadd.d` (A) / `lr.d`/`sc.d` loop |
//! | `xor3` | — | `eor3` (SHA3) / two AdvSIMD `eor` | `vxor.vv` (V) / scalar words |
#![no_std]

/// Lists an architecture's implementations as `FEATURE ? fast : baseline` for
/// `popcount`, `crc32c`, `fetch_add` and `xor3`, in that order, and defines from it: the
/// resolvers (`pick_popcount`, …: the fast one if the CPU has `CpuFeatures::FEATURE`,
/// else the baseline), `POPCOUNT_IMPLS`, `CRC32C_IMPLS`, `FETCH_ADD_IMPLS`, `XOR3_IMPLS`
/// (`[(name, function); 2]`, fast first), and `fetch_add_default`/`xor3_default` (the
/// baselines).
#[cfg(not(target_arch = "x86_64"))]
macro_rules! implementations {
    ($pe:ident ? $pf:ident : $pb:ident, $ce:ident ? $cf:ident : $cb:ident,
     $fe:ident ? $ff:ident : $fb:ident, $xe:ident ? $xf:ident : $xb:ident) => {
        implementations!(@one $pe, $pf, $pb, pick_popcount, POPCOUNT_IMPLS, PopcountFn);
        implementations!(@one $ce, $cf, $cb, pick_crc32c, CRC32C_IMPLS, Crc32cFn);
        implementations!(@one $fe, $ff, $fb, pick_fetch_add, FETCH_ADD_IMPLS, FetchAddFn);
        implementations!(@one $xe, $xf, $xb, pick_xor3, XOR3_IMPLS, Xor3Fn);
        pub(crate) use $fb as fetch_add_default;
        pub(crate) use $xb as xor3_default;
    };
    (@one $feature:ident, $fast:ident, $base:ident, $pick:ident, $list:ident, $ty:ident) => {
        pub(crate) fn $pick(f: &CpuFeatures) -> $crate::$ty {
            if f.contains(CpuFeatures::$feature) { $fast } else { $base }
        }
        #[doc = concat!("`", stringify!($fast), "` (", stringify!($feature), ") and `",
                        stringify!($base), "`.")]
        pub const $list: [(&str, $crate::$ty); 2] =
            [(stringify!($fast), $fast), (stringify!($base), $base)];
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "riscv64")]
mod riscv64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "riscv64")]
pub use riscv64::*;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
use kernel_loader::ifunc;
#[cfg(target_arch = "riscv64")]
use riscv64 as arch;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;

// ---------------------------------------------------------------------------------------
// crc32c (Castagnoli, reflected polynomial 0x82f63b78), no pre/post inversion.

pub(crate) const CRC32C_POLY: u32 = 0x82f6_3b78;

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

/// Bits set in each 4-bit value.
#[cfg(not(target_arch = "x86_64"))]
const NIBBLE_BITS: [u8; 16] = [0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4];

/// A 4-bit table lookup per nibble (no vector registers, no bit-count instruction):
/// `popcount`'s baseline on aarch64 and riscv64.
///
/// # Safety
///
/// None: safe on every CPU (the signature is `unsafe` to match the ifunc's slot type).
#[cfg(not(target_arch = "x86_64"))]
pub unsafe extern "C" fn popcount_soft(x: u64) -> u32 {
    let mut n = 0u32;
    let mut i = 0;
    while i < 64 {
        n += u32::from(NIBBLE_BITS[((x >> i) & 0xf) as usize]);
        i += 4;
    }
    n
}

// ---------------------------------------------------------------------------------------
// The ifuncs, declared here so their table names are `kfuncs::NAME` on both architectures
// (`ifunc!` names them by `module_path!()`); the implementations and resolvers are the
// architecture module's (`arch`).

ifunc! {
    /// Number of set bits in `x`.
    pub fn popcount(x: u64) -> u32;
    default = popcount_soft;
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

#[cfg(not(target_arch = "x86_64"))]
ifunc! {
    /// Atomically adds `v` to `*p` (acquire-release); returns the old value. `p` must be
    /// valid, 8-aligned and accessed only atomically.
    pub fn fetch_add(p: *mut u64, v: u64) -> u64;
    default = arch::fetch_add_default;
    resolver = arch::pick_fetch_add;
}

#[cfg(not(target_arch = "x86_64"))]
ifunc! {
    /// `dst[i] ^= a[i] ^ b[i]` for `i < n`. All three must be valid for `n` bytes and
    /// `dst` must not overlap `a` or `b`.
    pub fn xor3(dst: *mut u8, a: *const u8, b: *const u8, n: usize);
    default = arch::xor3_default;
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

// ---------------------------------------------------------------------------------------
// What aarch64 and riscv64 share: `fetch_add` and `xor3` and their callers, and every
// implementation listed by name (`POPCOUNT_IMPLS`, `CRC32C_IMPLS`, `FETCH_ADD_IMPLS`,
// `XOR3_IMPLS` in the architecture module: the fast one(s) first, the baseline last).

/// `popcount`'s type.
pub type PopcountFn = unsafe extern "C" fn(u64) -> u32;
/// `crc32c`'s type.
pub type Crc32cFn = unsafe extern "C" fn(u32, *const u8, usize) -> u32;
/// `fetch_add`'s type.
pub type FetchAddFn = unsafe extern "C" fn(*mut u64, u64) -> u64;
/// `xor3`'s type.
pub type Xor3Fn = unsafe extern "C" fn(*mut u8, *const u8, *const u8, usize);

/// Adds `v` to the counter; returns the old value.
#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
pub fn counter_add(c: &core::sync::atomic::AtomicU64, v: u64) -> u64 {
    fetch_add(c.as_ptr(), v)
}

/// Adds 1, `n` times: a call site in a loop.
#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
pub fn counter_bump(c: &core::sync::atomic::AtomicU64, n: u64) {
    for _ in 0..n {
        fetch_add(c.as_ptr(), 1);
    }
}

/// Tail call of `fetch_add`.
#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
pub extern "C" fn fetch_add_tail(p: *mut u64, v: u64) -> u64 {
    fetch_add(p, v)
}

/// `dst ^= a ^ b` over the shortest of the three.
#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
pub fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    let n = dst.len().min(a.len()).min(b.len());
    xor3(dst.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n);
}

/// Tail call of `xor3`.
#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
pub extern "C" fn xor3_tail(dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
    xor3(dst, a, b, n)
}

/// The name of a known implementation, for reports.
#[cfg(not(target_arch = "x86_64"))]
pub fn impl_name(addr: usize) -> &'static str {
    fn find<F: Copy>(list: &[(&'static str, F)], addr: usize) -> Option<&'static str> {
        list.iter()
            // SAFETY: `F` is a function pointer type (the lists hold only those): as
            // big as a `usize`, and its bits are the address.
            .find(|(_, f)| unsafe { core::mem::transmute_copy::<F, usize>(f) } == addr)
            .map(|(name, _)| *name)
    }
    find(&POPCOUNT_IMPLS, addr)
        .or_else(|| find(&CRC32C_IMPLS, addr))
        .or_else(|| find(&FETCH_ADD_IMPLS, addr))
        .or_else(|| find(&XOR3_IMPLS, addr))
        .unwrap_or("?")
}
