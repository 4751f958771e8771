//! The aarch64 implementations of the ifuncs, and the helpers that only aarch64 has.
//! QEMU's `cortex-a57` (Armv8.0) has AdvSIMD and CRC32 but neither LSE atomics nor
//! SHA3; `max` has all four, so `fetch_add` and `xor3` choose differently on the two.
//!
//! | ifunc       | fast (feature)                 | baseline (default)          |
//! |-------------|--------------------------------|-----------------------------|
//! | `popcount`  | `cnt` + `addv` (ASIMD)         | 4-bit table (shared)        |
//! | `crc32c`    | `crc32cx`/`crc32cb` (CRC32)    | 256-entry table (shared)    |
//! | `fetch_add` | `ldaddal` (LSE)                | `ldaxr`/`stlxr` loop        |
//! | `xor3`      | `eor3`, 16 bytes a step (SHA3) | two `eor`, 16 bytes a step  |
//!
//! Every accelerated body is assembly (or an intrinsic of the instruction itself), so
//! the two implementations really run different instructions: LLVM would otherwise
//! turn a bit-trick popcount into `cnt` on this NEON target.

use core::arch::asm;

use kernel_loader::CpuFeatures;

use crate::{crc32c_table, popcount_soft};

// ---------------------------------------------------------------------------------------
// popcount

/// AdvSIMD: `cnt` counts the bits of each byte, `addv` adds the eight counts.
///
/// # Safety
///
/// FP/AdvSIMD must be enabled (CPACR_EL1.FPEN).
pub unsafe extern "C" fn popcount_cnt(x: u64) -> u32 {
    let n: u32;
    // SAFETY: register-only instructions; `v` is a scratch vector register declared
    // clobbered; AdvSIMD is usable per the caller's contract.
    unsafe {
        asm!(
            "fmov {v:d}, {x}",
            "cnt {v:v}.8b, {v:v}.8b",
            "addv {v:b}, {v:v}.8b",
            "fmov {n:w}, {v:s}",
            x = in(reg) x,
            v = out(vreg) _,
            n = lateout(reg) n,
            options(pure, nomem, nostack),
        );
    }
    n
}

// ---------------------------------------------------------------------------------------
// crc32c (Castagnoli), no pre/post inversion: the table version is `crate::crc32c_table`.

/// The CRC32 extension: `crc32cx` 8 bytes at a time, then `crc32cb`.
///
/// # Safety
///
/// The CPU must have the CRC32 instructions; `data` is valid for `len` bytes.
#[target_feature(enable = "crc")]
pub unsafe extern "C" fn crc32c_hw(crc: u32, data: *const u8, len: usize) -> u32 {
    let mut c = crc;
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: i + 8 <= len: inside the caller's range; unaligned read is allowed.
        let w = unsafe { data.add(i).cast::<u64>().read_unaligned() };
        // SAFETY: register-only; the CRC32 instructions exist (caller's contract).
        unsafe {
            asm!("crc32cx {c:w}, {c:w}, {w}", c = inout(reg) c, w = in(reg) w,
                 options(pure, nomem, nostack));
        }
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        let b = u32::from(unsafe { data.add(i).read() });
        // SAFETY: as above.
        unsafe {
            asm!("crc32cb {c:w}, {c:w}, {b:w}", c = inout(reg) c, b = in(reg) b,
                 options(pure, nomem, nostack));
        }
        i += 1;
    }
    c
}

// ---------------------------------------------------------------------------------------
// fetch_add

/// LSE: one `ldaddal` (acquire-release, like `fetch_add(AcqRel)`).
///
/// # Safety
///
/// The CPU must have LSE atomics; `p` is valid, 8-aligned and only accessed atomically.
#[target_feature(enable = "lse")]
pub unsafe extern "C" fn fetch_add_lse(p: *mut u64, v: u64) -> u64 {
    let old: u64;
    // SAFETY: `p` is valid and aligned (caller); LSE exists (caller).
    unsafe {
        asm!("ldaddal {v}, {old}, [{p}]", p = in(reg) p, v = in(reg) v, old = lateout(reg) old,
             options(nostack));
    }
    old
}

/// Load-exclusive / store-exclusive loop (Armv8.0), acquire-release.
///
/// # Safety
///
/// `p` is valid, 8-aligned and only accessed atomically.
pub unsafe extern "C" fn fetch_add_llsc(p: *mut u64, v: u64) -> u64 {
    let old: u64;
    // SAFETY: `p` is valid and aligned (caller); the loop retries until the exclusive
    // store succeeds, so exactly one add lands.
    unsafe {
        asm!(
            "2:",
            "ldaxr {old}, [{p}]",
            "add {new}, {old}, {v}",
            "stlxr {st:w}, {new}, [{p}]",
            "cbnz {st:w}, 2b",
            p = in(reg) p,
            v = in(reg) v,
            old = out(reg) old,
            new = out(reg) _,
            st = out(reg) _,
            options(nostack),
        );
    }
    old
}

// ---------------------------------------------------------------------------------------
// xor3: dst ^= a ^ b (RAID parity; Linux's arm64 xor_blocks uses `eor3` when SHA3 is
// there).

/// The loop both `xor3` implementations share: 16 bytes a step (`ld1` `dst`, `a`, `b`
/// into `x`, `y`, `z`; the `$combine` instructions leave the result in `x`; `st1`), then
/// the bytes past the last full step in Rust.
macro_rules! xor3_body {
    ($dst:ident, $a:ident, $b:ident, $n:ident, $($combine:literal),+) => {{
        let vec = $n & !15;
        // SAFETY: the loop reads and writes exactly `vec` <= n bytes of the caller's
        // ranges (the function's contract); the vector registers are declared clobbered.
        unsafe {
            asm!(
                "cbz {n}, 3f",
                "2:",
                "ld1 {{{x:v}.16b}}, [{d}]",
                "ld1 {{{y:v}.16b}}, [{a}], #16",
                "ld1 {{{z:v}.16b}}, [{b}], #16",
                $($combine,)+
                "st1 {{{x:v}.16b}}, [{d}], #16",
                "subs {n}, {n}, #16",
                "b.ne 2b",
                "3:",
                d = inout(reg) $dst => _,
                a = inout(reg) $a => _,
                b = inout(reg) $b => _,
                n = inout(reg) vec => _,
                x = out(vreg) _,
                y = out(vreg) _,
                z = out(vreg) _,
                options(nostack),
            );
        }
        for i in vec..$n {
            // SAFETY: i < n: inside the caller's ranges.
            unsafe { *$dst.add(i) ^= *$a.add(i) ^ *$b.add(i) };
        }
    }};
}

/// SHA3's three-way `eor3`, 16 bytes a step.
///
/// # Safety
///
/// The CPU must have SHA3 with FP/AdvSIMD enabled; `dst`, `a` and `b` are valid for `n`
/// bytes and `dst` does not overlap the others.
#[target_feature(enable = "sha3")]
pub unsafe extern "C" fn xor3_eor3(dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
    xor3_body!(
        dst,
        a,
        b,
        n,
        "eor3 {x:v}.16b, {x:v}.16b, {y:v}.16b, {z:v}.16b"
    );
}

/// AdvSIMD: two `eor`s, 16 bytes a step.
///
/// # Safety
///
/// FP/AdvSIMD enabled; ranges as for [`xor3_eor3`].
pub unsafe extern "C" fn xor3_neon(dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
    xor3_body!(
        dst,
        a,
        b,
        n,
        "eor {y:v}.16b, {y:v}.16b, {z:v}.16b",
        "eor {x:v}.16b, {x:v}.16b, {y:v}.16b"
    );
}

// The resolvers and the implementations by name, from the table at the top.
implementations!(ASIMD ? popcount_cnt : popcount_soft, CRC32 ? crc32c_hw : crc32c_table,
    LSE ? fetch_add_lse : fetch_add_llsc, SHA3 ? xor3_eor3 : xor3_neon);
