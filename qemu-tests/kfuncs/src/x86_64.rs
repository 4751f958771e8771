//! The x86_64 implementations of the ifuncs, and the helpers that only x86_64 has.
//!
//! | ifunc      | fast (feature)          | baseline (default)      |
//! |------------|-------------------------|-------------------------|
//! | `memcpy`   | `rep movsb` (ERMS)      | 16-byte SSE2 loop       |
//! | `popcount` | `popcnt` (POPCNT)       | SWAR bit tricks         |
//! | `crc32c`   | `crc32` (SSE4.2)        | 256-entry table         |
//! | `sum_u32`  | 256-bit adds (AVX2)     | scalar loop             |

use core::arch::x86_64::*;

use kernel_loader::CpuFeatures;

use crate::{crc32c_table, memcpy, sum_u32};

// ---------------------------------------------------------------------------------------
// memcpy

/// `rep movsb`: fastest on CPUs with Enhanced REP MOVSB.
///
/// # Safety
///
/// `src` and `dst` are valid for `n` bytes and do not overlap.
pub unsafe extern "C" fn memcpy_erms(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; rep movsb copies
    // exactly rcx bytes forward (DF is clear in this kernel, per the SysV ABI).
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") n => _,
            options(nostack, preserves_flags),
        );
    }
    dst
}

/// 16 bytes at a time with unaligned SSE2 loads and stores (`movdqu`), then bytes.
///
/// Written in assembly: `x86_64-unknown-none` is a soft-float target on which LLVM
/// neither allocates vector registers nor lowers `__m128i` intrinsics correctly, even
/// inside `#[target_feature]` functions. The code saves and restores `xmm0`, which
/// compiled code on this target never uses, so the asm is transparent to its caller.
///
/// # Safety
///
/// As [`memcpy_erms`]; SSE must be enabled (CR0.EM clear, CR4.OSFXSR set).
pub unsafe extern "C" fn memcpy_sse2(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes and disjoint; the
    // loop reads/writes exactly n bytes; xmm0 is saved and restored on the stack.
    unsafe {
        core::arch::asm!(
            "sub rsp, 16",
            "movdqu [rsp], xmm0",
            "2:",
            "cmp rcx, 16",
            "jb 3f",
            "movdqu xmm0, [rsi]",
            "movdqu [rdi], xmm0",
            "add rsi, 16",
            "add rdi, 16",
            "sub rcx, 16",
            "jmp 2b",
            "3:",
            "movdqu xmm0, [rsp]",
            "add rsp, 16",
            "test rcx, rcx",
            "jz 5f",
            "4:",
            "mov al, [rsi]",
            "mov [rdi], al",
            "inc rsi",
            "inc rdi",
            "dec rcx",
            "jnz 4b",
            "5:",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") n => _,
            out("al") _,
        );
    }
    dst
}

pub(crate) fn pick_memcpy(
    f: &CpuFeatures,
) -> unsafe extern "C" fn(*mut u8, *const u8, usize) -> *mut u8 {
    if f.contains(CpuFeatures::ERMS) {
        memcpy_erms
    } else {
        memcpy_sse2
    }
}

// ---------------------------------------------------------------------------------------
// popcount

/// The POPCNT instruction.
///
/// # Safety
///
/// The CPU must support POPCNT.
#[target_feature(enable = "popcnt")]
pub unsafe extern "C" fn popcount_popcnt(x: u64) -> u32 {
    x.count_ones()
}

/// SWAR bit counting (no special instructions).
///
/// # Safety
///
/// None: safe on every CPU (the signature is `unsafe` to match the ifunc's slot type).
pub unsafe extern "C" fn popcount_soft(x: u64) -> u32 {
    let x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    let x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    let x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

pub(crate) fn pick_popcount(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 {
    if f.contains(CpuFeatures::POPCNT) {
        popcount_popcnt
    } else {
        popcount_soft
    }
}

// ---------------------------------------------------------------------------------------
// crc32c: the table fallback is shared (`crate::crc32c_table`).

/// The SSE4.2 `crc32` instruction, 8 bytes at a time.
///
/// # Safety
///
/// The CPU must support SSE4.2; `data` is valid for `len` bytes.
#[target_feature(enable = "sse4.2")]
pub unsafe extern "C" fn crc32c_sse42(crc: u32, data: *const u8, len: usize) -> u32 {
    let mut c = u64::from(crc);
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: i + 8 <= len: inside the caller's range; unaligned read is allowed.
        let w = unsafe { data.add(i).cast::<u64>().read_unaligned() };
        c = _mm_crc32_u64(c, w);
        i += 8;
    }
    let mut c = c as u32;
    while i < len {
        // SAFETY: i < len.
        c = _mm_crc32_u8(c, unsafe { data.add(i).read() });
        i += 1;
    }
    c
}

pub(crate) fn pick_crc32c(f: &CpuFeatures) -> unsafe extern "C" fn(u32, *const u8, usize) -> u32 {
    if f.contains(CpuFeatures::SSE4_2) {
        crc32c_sse42
    } else {
        crc32c_table
    }
}

// ---------------------------------------------------------------------------------------
// sum_u32

/// AVX2: `vpmovzxdq` widens four u32 to u64 per step, `vpaddq` accumulates four lanes.
///
/// Assembly for the reason given at [`memcpy_sse2`]; `ymm0`/`ymm1` are saved and
/// restored around it.
///
/// # Safety
///
/// The CPU must support AVX2 with YMM state enabled in XCR0; `p` is valid for `n`
/// elements.
pub unsafe extern "C" fn sum_u32_avx2(p: *const u32, n: usize) -> u64 {
    let vec_n = n & !3;
    let mut s: u64;
    // SAFETY: reads exactly vec_n (<= n) elements at p; ymm0/ymm1 are saved and restored
    // on the stack; AVX2 is available per the caller's contract.
    unsafe {
        core::arch::asm!(
            "sub rsp, 64",
            "vmovdqu [rsp], ymm0",
            "vmovdqu [rsp + 32], ymm1",
            "vpxor ymm0, ymm0, ymm0",
            "test rcx, rcx",
            "jz 3f",
            "2:",
            "vpmovzxdq ymm1, [rsi]",
            "vpaddq ymm0, ymm0, ymm1",
            "add rsi, 16",
            "sub rcx, 4",
            "jnz 2b",
            "3:",
            "vextracti128 xmm1, ymm0, 1",
            "vpaddq xmm0, xmm0, xmm1",
            "vpshufd xmm1, xmm0, 0x4e",
            "vpaddq xmm0, xmm0, xmm1",
            "vmovq rax, xmm0",
            "vmovdqu ymm0, [rsp]",
            "vmovdqu ymm1, [rsp + 32]",
            "add rsp, 64",
            inout("rsi") p => _,
            inout("rcx") vec_n => _,
            out("rax") s,
        );
    }
    for i in vec_n..n {
        // SAFETY: i < n.
        s = s.wrapping_add(u64::from(unsafe { p.add(i).read() }));
    }
    s
}

/// Scalar loop.
///
/// # Safety
///
/// `p` is valid for `n` elements.
pub unsafe extern "C" fn sum_u32_scalar(p: *const u32, n: usize) -> u64 {
    let mut s = 0u64;
    for i in 0..n {
        // SAFETY: i < n.
        s = s.wrapping_add(u64::from(unsafe { p.add(i).read() }));
    }
    s
}

pub(crate) fn pick_sum(f: &CpuFeatures) -> unsafe extern "C" fn(*const u32, usize) -> u64 {
    if f.contains(CpuFeatures::AVX2) {
        sum_u32_avx2
    } else {
        sum_u32_scalar
    }
}

// ---------------------------------------------------------------------------------------
// Callers: several functions, loops and tail calls, so the sites are varied.

/// Copies `src` into the front of `dst` (panics if it does not fit).
#[inline(never)]
pub fn copy_into(dst: &mut [u8], src: &[u8]) {
    assert!(src.len() <= dst.len());
    memcpy(dst.as_mut_ptr(), src.as_ptr(), src.len());
}

/// Tail call of `memcpy`.
#[inline(never)]
pub extern "C" fn memcpy_tail(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    memcpy(dst, src, n)
}

/// Sum of a slice.
#[inline(never)]
pub fn sum_of(v: &[u32]) -> u64 {
    sum_u32(v.as_ptr(), v.len())
}

/// Tail call of `sum_u32`.
#[inline(never)]
pub extern "C" fn sum_tail(p: *const u32, n: usize) -> u64 {
    sum_u32(p, n)
}

/// The name of a known implementation, for reports.
pub fn impl_name(addr: usize) -> &'static str {
    type Named = (usize, &'static str);
    let known: [Named; 8] = [
        (memcpy_erms as *const () as usize, "memcpy_erms"),
        (memcpy_sse2 as *const () as usize, "memcpy_sse2"),
        (popcount_popcnt as *const () as usize, "popcount_popcnt"),
        (popcount_soft as *const () as usize, "popcount_soft"),
        (crc32c_sse42 as *const () as usize, "crc32c_sse42"),
        (crc32c_table as *const () as usize, "crc32c_table"),
        (sum_u32_avx2 as *const () as usize, "sum_u32_avx2"),
        (sum_u32_scalar as *const () as usize, "sum_u32_scalar"),
    ];
    known.iter().find(|k| k.0 == addr).map_or("?", |k| k.1)
}
