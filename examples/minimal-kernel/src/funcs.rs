//! The kernel's ifuncs (`popcount`, `byte_sum`), its probe (`demo:tick`) and its static
//! key (`COUNT_SUMS`).

use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::{CpuFeatures, ifunc, probe, static_branch_unlikely, static_key};

#[target_feature(enable = "popcnt")]
unsafe extern "C" fn popcount_popcnt(x: u64) -> u32 {
    x.count_ones()
}

/// The portable popcount (also what `main.rs` retargets `popcount` to).
pub unsafe extern "C" fn popcount_soft(x: u64) -> u32 {
    let x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    let x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    let x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

fn pick_popcount(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 {
    if f.contains(CpuFeatures::POPCNT) {
        popcount_popcnt
    } else {
        popcount_soft
    }
}

ifunc! {
    /// Number of set bits.
    pub fn popcount(x: u64) -> u32;
    default = popcount_soft;   // what calls before init use
    resolver = pick_popcount;  // runs exactly once, in init
}

/// AVX2: `vpsadbw` adds each 8 bytes of a 32-byte block into a 64-bit lane.
///
/// Assembly: `x86_64-unknown-none` is a soft-float target, on which the compiler
/// allocates no vector registers even in `#[target_feature]` functions; the code saves
/// and restores the three it uses.
///
/// # Safety
///
/// AVX2 is enabled (CPUID and XCR0); `p` is valid for `n` bytes.
unsafe extern "C" fn byte_sum_avx2(p: *const u8, n: usize) -> u64 {
    let blocks = n & !31;
    let mut sum: u64;
    // SAFETY: reads `blocks` (<= n) bytes at p; ymm0..ymm2 are saved and restored; AVX2
    // per the caller's contract.
    unsafe {
        core::arch::asm!(
            "sub rsp, 96",
            "vmovdqu [rsp], ymm0",
            "vmovdqu [rsp + 32], ymm1",
            "vmovdqu [rsp + 64], ymm2",
            "vpxor ymm0, ymm0, ymm0",
            "vpxor ymm2, ymm2, ymm2",
            "test rcx, rcx",
            "jz 3f",
            "2:",
            "vpsadbw ymm1, ymm2, [rsi]",
            "vpaddq ymm0, ymm0, ymm1",
            "add rsi, 32",
            "sub rcx, 32",
            "jnz 2b",
            "3:",
            "vextracti128 xmm1, ymm0, 1",
            "vpaddq xmm0, xmm0, xmm1",
            "vpshufd xmm1, xmm0, 0x4e",
            "vpaddq xmm0, xmm0, xmm1",
            "vmovq rax, xmm0",
            "vmovdqu ymm0, [rsp]",
            "vmovdqu ymm1, [rsp + 32]",
            "vmovdqu ymm2, [rsp + 64]",
            "add rsp, 96",
            inout("rsi") p => _,
            inout("rcx") blocks => _,
            out("rax") sum,
        );
    }
    // SAFETY: the tail, blocks..n, is inside the caller's n bytes.
    sum + unsafe { byte_sum_scalar(p.add(blocks), n - blocks) }
}

/// # Safety
///
/// `p` is valid for `n` bytes.
unsafe extern "C" fn byte_sum_scalar(p: *const u8, n: usize) -> u64 {
    // SAFETY: the caller's contract.
    let bytes = unsafe { core::slice::from_raw_parts(p, n) };
    bytes.iter().map(|&b| u64::from(b)).sum()
}

fn pick_byte_sum(f: &CpuFeatures) -> unsafe extern "C" fn(*const u8, usize) -> u64 {
    if f.contains(CpuFeatures::AVX2) {
        byte_sum_avx2
    } else {
        byte_sum_scalar
    }
}

ifunc! {
    /// Sum of the `n` bytes at `p` (valid for `n` bytes).
    pub fn byte_sum(p: *const u8, n: usize) -> u64;
    default = byte_sum_scalar;
    resolver = pick_byte_sum;
}

static_key!(
    /// Whether [`sum`] counts its calls: off at boot, so each call pays one 5-byte NOP.
    pub COUNT_SUMS: default false
);

/// Calls of [`sum`] made while [`COUNT_SUMS`] was enabled.
pub static SUMS_COUNTED: AtomicU64 = AtomicU64::new(0);

/// `byte_sum` of a slice: the safe wrapper callers use.
pub fn sum(bytes: &[u8]) -> u64 {
    if static_branch_unlikely!(COUNT_SUMS) {
        SUMS_COUNTED.fetch_add(1, Ordering::Relaxed);
    }
    byte_sum(bytes.as_ptr(), bytes.len())
}

/// The probe `demo:tick`, with one argument. Disabled, its site is one 5-byte NOP.
#[inline(never)]
pub fn tick(n: u64) {
    probe!(demo, tick, n);
}

/// The implementations, by address, for the introspection listing: the table has no
/// names for them (a bigger kernel symbolizes with its symbol table).
pub fn impl_name(addr: u64) -> &'static str {
    let known: [(u64, &'static str); 4] = [
        (popcount_popcnt as *const () as u64, "popcount_popcnt"),
        (popcount_soft as *const () as u64, "popcount_soft"),
        (byte_sum_avx2 as *const () as u64, "byte_sum_avx2"),
        (byte_sum_scalar as *const () as u64, "byte_sum_scalar"),
    ];
    known
        .iter()
        .find(|(a, _)| *a == addr)
        .map_or("?", |(_, name)| name)
}
