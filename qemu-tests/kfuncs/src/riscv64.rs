//! The riscv64 implementations of the ifuncs. The kernel is RV64GC: the baselines use
//! nothing more; the fast ones need an extension the device tree must list (the
//! resolvers get `CpuFeatures` from it). QEMU's `rv64` without the B extensions and
//! `rv64` with Zba/Zbb/Zbc/Zbs (or `max`) choose differently for `popcount` (Zbb) and
//! `crc32c` (Zbc); `xor3` differs where one model has V and the other not.
//!
//! | ifunc       | fast (extension)                                 | baseline (default)     |
//! |-------------|--------------------------------------------------|------------------------|
//! | `popcount`  | `cpop` (Zbb)                                     | 4-bit table (shared)   |
//! | `crc32c`    | `clmul`/`clmulr` Barrett reduction, 8 bytes a step (Zbc) | 256-entry table (shared) |
//! | `fetch_add` | `amoadd.d.aqrl` (A)                              | `lr.d.aqrl`/`sc.d.rl` loop |
//! | `xor3`      | `vle8`/`vxor.vv`/`vse8`, LMUL 8 (V)              | 64-bit scalar words    |
//!
//! Every accelerated body is assembly under `.option arch, +EXT` (the target, RV64GC,
//! has none of these extensions), so the two implementations really run different
//! instructions.

use core::arch::asm;

use kernel_loader::CpuFeatures;

use crate::{crc32c_table, popcount_soft};

// ---------------------------------------------------------------------------------------
// popcount

/// Zbb: one `cpop`.
///
/// # Safety
///
/// The CPU must have Zbb.
pub unsafe extern "C" fn popcount_cpop(x: u64) -> u32 {
    let n: u64;
    // SAFETY: register-only; Zbb exists (caller's contract).
    unsafe {
        asm!(
            ".option push",
            ".option arch, +zbb",
            "cpop {n}, {x}",
            ".option pop",
            x = in(reg) x,
            n = lateout(reg) n,
            options(pure, nomem, nostack),
        );
    }
    n as u32
}

// ---------------------------------------------------------------------------------------
// crc32c (Castagnoli), no pre/post inversion: the table version is `crate::crc32c_table`.

/// The reflected polynomial, shifted into the high half for `clmulr`.
const POLY_HI: u64 = (crate::CRC32C_POLY as u64) << 32;
/// The Barrett constant: ⌊x^96 / P(x)⌋ bit-reflected as a 65-bit value, without its
/// lowest bit (x^64's, which the `slli`/`xor` pair supplies).
const QUOTIENT: u64 = 0xa434_f61c_6f53_89f8;

/// Zbc: 8 bytes a step by Barrett reduction with carry-less multiplies (the 64-bit
/// word xor the CRC, times the quotient, the top of which times the polynomial is the
/// remainder), then the bytes past the last full step by table.
///
/// # Safety
///
/// The CPU must have Zbc; `data` is valid for `len` bytes.
pub unsafe extern "C" fn crc32c_clmul(crc: u32, data: *const u8, len: usize) -> u32 {
    let mut c = crc;
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: i + 8 <= len: inside the caller's range; unaligned read is allowed.
        let w = unsafe { data.add(i).cast::<u64>().read_unaligned() };
        let s = u64::from_le(w) ^ u64::from(c);
        let r: u64;
        // SAFETY: register-only; Zbc exists (caller's contract). `t` is an `out`, so it
        // is not `s`, which the `xor` reads after `t` is written.
        unsafe {
            asm!(
                ".option push",
                ".option arch, +zbc",
                "clmul {t}, {s}, {q}",
                "slli {t}, {t}, 1",
                "xor {t}, {t}, {s}",
                "clmulr {t}, {t}, {p}",
                ".option pop",
                s = in(reg) s, q = in(reg) QUOTIENT, p = in(reg) POLY_HI, t = out(reg) r,
                options(pure, nomem, nostack),
            );
        }
        c = (r >> 32) as u32;
        i += 8;
    }
    // SAFETY: `i <= len`: the rest of the caller's range.
    unsafe { crc32c_table(c, data.add(i), len - i) }
}

// ---------------------------------------------------------------------------------------
// fetch_add

/// A (Zaamo): one `amoadd.d.aqrl`.
///
/// # Safety
///
/// The CPU must have the A extension's AMOs; `p` is valid, 8-aligned and only accessed
/// atomically.
pub unsafe extern "C" fn fetch_add_amo(p: *mut u64, v: u64) -> u64 {
    let old: u64;
    // SAFETY: `p` is valid and aligned (caller); the AMO exists (caller).
    unsafe {
        asm!("amoadd.d.aqrl {old}, {v}, ({p})", p = in(reg) p, v = in(reg) v,
             old = lateout(reg) old, options(nostack));
    }
    old
}

/// Load-reserved / store-conditional loop, sequentially consistent (`lr.d.aqrl`,
/// `sc.d.rl`).
///
/// # Safety
///
/// `p` is valid, 8-aligned and only accessed atomically.
pub unsafe extern "C" fn fetch_add_lrsc(p: *mut u64, v: u64) -> u64 {
    let old: u64;
    // SAFETY: `p` is valid and aligned (caller); the loop retries until the
    // store-conditional succeeds, so exactly one add lands.
    unsafe {
        asm!(
            "2:",
            "lr.d.aqrl {old}, ({p})",
            "add {new}, {old}, {v}",
            "sc.d.rl {st}, {new}, ({p})",
            "bnez {st}, 2b",
            p = in(reg) p, v = in(reg) v, old = out(reg) old, new = out(reg) _, st = out(reg) _,
            options(nostack),
        );
    }
    old
}

// ---------------------------------------------------------------------------------------
// xor3: dst ^= a ^ b.

/// V: `vsetvli` e8/m8 (up to 8 vector registers a group), three loads, two `vxor.vv`,
/// one store, until done.
///
/// # Safety
///
/// The CPU must have V with its state enabled (`sstatus.VS`); `dst`, `a` and `b` are
/// valid for `n` bytes and `dst` does not overlap the others.
pub unsafe extern "C" fn xor3_vector(dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
    // SAFETY: the loop reads and writes exactly `n` bytes of the caller's ranges, `vl`
    // bytes a step; V is usable (caller's contract); the vector registers it uses
    // (v0..v23) are declared clobbered, and nothing else in the kernel keeps state in
    // `vl`/`vtype`.
    unsafe {
        asm!(
            ".option push",
            ".option arch, +v",
            "beqz {n}, 3f",
            "2:",
            "vsetvli {vl}, {n}, e8, m8, ta, ma",
            "vle8.v v0, ({d})",
            "vle8.v v8, ({a})",
            "vle8.v v16, ({b})",
            "vxor.vv v8, v8, v16",
            "vxor.vv v0, v0, v8",
            "vse8.v v0, ({d})",
            "add {d}, {d}, {vl}",
            "add {a}, {a}, {vl}",
            "add {b}, {b}, {vl}",
            "sub {n}, {n}, {vl}",
            "bnez {n}, 2b",
            "3:",
            ".option pop",
            d = inout(reg) dst => _, a = inout(reg) a => _, b = inout(reg) b => _,
            n = inout(reg) n => _, vl = out(reg) _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            options(nostack),
        );
    }
}

/// RV64GC: 8 bytes a step with scalar `xor`s, then byte by byte.
///
/// # Safety
///
/// Ranges as for [`xor3_vector`].
pub unsafe extern "C" fn xor3_scalar(dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n: inside the caller's ranges; unaligned accesses are allowed.
        unsafe {
            let d = dst.add(i).cast::<u64>();
            let x = a.add(i).cast::<u64>().read_unaligned();
            let y = b.add(i).cast::<u64>().read_unaligned();
            d.write_unaligned(d.read_unaligned() ^ x ^ y);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n: inside the caller's ranges.
        unsafe { *dst.add(i) ^= *a.add(i) ^ *b.add(i) };
        i += 1;
    }
}

// The resolvers and the implementations by name (the table at the top).
implementations!(ZBB ? popcount_cpop : popcount_soft, ZBC ? crc32c_clmul : crc32c_table,
    A ? fetch_add_amo : fetch_add_lrsc, V ? xor3_vector : xor3_scalar);
