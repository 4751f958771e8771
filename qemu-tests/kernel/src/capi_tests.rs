//! The C API (`kernel-loader-capi`, `ksites.h`) from C.
//!
//! - [`run`]: `c/capi.c` looks up the C probe `ctest:one`, enables it with a C handler
//!   through its own C poker, fires it, checks the handler's count and
//!   `ksites_probe_hits`, disables it and checks nothing more counts.
//! - [`c_boot`]: the C boot path, chosen by `ksites.boot=c` on the PVH command line:
//!   instead of the Rust ifunc tests' `patch::init` and the probe tests' registration,
//!   `c/cboot.c` initialises ksites through the C API (`ksites_init`, the #BP route) and
//!   runs the C module tests (`capi_module_*`: `cmod.ko` loaded, called, its probe
//!   toggled, held, unloaded, reloaded; `badmod.ko` and garbage refused with the right
//!   code). The kernel gives it only platform services ([`Platform`]): its text range,
//!   exports, module images, pages from the module arena, a console and the harness.

use core::ffi::{CStr, c_char, c_int, c_void};

use kernel_loader_capi::module::{
    KSITES_PROT_R, KSITES_PROT_RW, KSITES_PROT_RX, KSITES_PROTECT_RANGE, KsitesExport, KsitesRegion,
};
use kernel_loader_capi::{KsitesRange, ksites_strerror};

use crate::arena::{self, Arena, Pages, Perm};
use crate::ensure;
use crate::harness::{Harness, TestResult};
use crate::module_tests::{BADMOD, CMOD};
use crate::{paging, println};

unsafe extern "C" {
    /// `c/capi.c`: 0, or the failed step (and the C API's error code in `*err`).
    fn capi_probe_roundtrip(err: *mut c_int) -> c_int;
    /// `c/cboot.c`: the C boot path; reports every step through `platform.report`.
    fn cboot_main(platform: *const Platform);
}

/// Runs the C API tests.
pub fn run(h: &mut Harness) {
    h.run("capi_c_probe_lookup_enable_fire_disable", roundtrip);
}

/// The text of C API error `err`.
fn strerror(err: c_int) -> &'static str {
    // SAFETY: ksites_strerror returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(ksites_strerror(err)) }
        .to_str()
        .unwrap_or("?")
}

fn roundtrip() -> TestResult {
    let mut err: c_int = 0;
    // SAFETY: the kernel's probes are registered and the #BP route declared (probe and
    // trap tests, or the C boot path); `err` is writable; no other CPU runs ctest:one's
    // site meanwhile.
    let step = unsafe { capi_probe_roundtrip(&mut err) };
    ensure!(
        step == 0,
        "capi.c failed at step {step}: error {err} ({})",
        strerror(err)
    );
    Ok(())
}

/// `struct cboot_platform` (c/cboot.h): what the kernel's Rust bring-up gives the C
/// boot path.
#[repr(C)]
struct Platform {
    harness: *mut c_void,
    report: unsafe extern "C" fn(*mut c_void, *const c_char, c_int, *const c_char),
    print: unsafe extern "C" fn(*const c_char),
    text: KsitesRange,
    exports: *const KsitesExport,
    nexports: usize,
    alloc: unsafe extern "C" fn(*mut c_void, usize, *mut KsitesRegion) -> c_int,
    protect: unsafe extern "C" fn(*mut c_void, *const KsitesRegion, usize, usize, c_int) -> c_int,
    free: unsafe extern "C" fn(*mut c_void, *const KsitesRegion),
    pages_used: extern "C" fn() -> usize,
    cmod: *const u8,
    cmod_len: usize,
    badmod: *const u8,
    badmod_len: usize,
}

/// The PVH command line (`hvm_start_info.cmdline_paddr`, offset 24) says
/// `ksites.boot=c`.
pub fn c_boot_requested() -> bool {
    const WORD: &[u8] = b"ksites.boot=c";
    let info = crate::start_info();
    let mapped =
        |a: u64, n: u64| a >= paging::PAGE_SIZE && a.saturating_add(n) <= paging::IDENTITY_END;
    if !mapped(info, 32) {
        return false;
    }
    // SAFETY: `hvm_start_info` is in identity-mapped RAM (checked above), read-only here.
    let cmdline = unsafe { core::ptr::read_volatile((info + 24) as *const u64) };
    let mut buf = [0u8; 256];
    let mut len = 0;
    while len < buf.len() && mapped(cmdline, len as u64 + 1) {
        // SAFETY: identity-mapped RAM (checked), the NUL-terminated command line.
        let b = unsafe { core::ptr::read_volatile((cmdline + len as u64) as *const u8) };
        if b == 0 {
            break;
        }
        buf[len] = b;
        len += 1;
    }
    buf[..len].split(|&b| b == b' ').any(|w| w == WORD)
}

/// The C boot path (see the module docs); `false` (and nothing run) unless
/// [`c_boot_requested`].
pub fn c_boot(h: &mut Harness) -> bool {
    if !c_boot_requested() {
        return false;
    }
    println!("ksites.boot=c: ksites is initialised by c/cboot.c through the C API");
    let exports = [
        export(c"popcount", kfuncs::popcount as *const ()),
        export(c"crc32c", kfuncs::crc32c as *const ()),
        export(c"memcpy", kfuncs::memcpy as *const ()),
        export(c"sum_u32", kfuncs::sum_u32 as *const ()),
        // cmod's imports of issue 18 (see `module_tests::KERNEL_EXPORTS`).
        export(
            c"retarget_tag",
            crate::retarget_tests::retarget_tag as *const (),
        ),
        export(
            c"ksites_test_key",
            &crate::key_tests::KEY_MOD as *const kernel_loader::key::StaticKey as *const (),
        ),
    ];
    let text = paging::text_range();
    let platform = Platform {
        harness: (h as *mut Harness).cast(),
        report,
        print,
        text: KsitesRange {
            start: text.start,
            end: text.end,
        },
        exports: exports.as_ptr(),
        nexports: exports.len(),
        alloc,
        protect,
        free,
        pages_used,
        cmod: CMOD.0.as_ptr(),
        cmod_len: CMOD.0.len(),
        badmod: BADMOD.0.as_ptr(),
        badmod_len: BADMOD.0.len(),
    };
    // SAFETY: one CPU runs (before `smp::init`), with SIMD state set up and the IDT's
    // #BP gate the crate's entry; `platform` and everything it points to (the harness,
    // the exports, the embedded modules) outlive the call.
    unsafe { cboot_main(&platform) };
    true
}

fn export(name: &'static CStr, addr: *const ()) -> KsitesExport {
    KsitesExport {
        name: name.as_ptr(),
        addr: addr as u64,
    }
}

/// Records the C boot path's test `name` (`ok` non-zero) with `detail`.
unsafe extern "C" fn report(
    harness: *mut c_void,
    name: *const c_char,
    ok: c_int,
    detail: *const c_char,
) {
    let text = |p: *const c_char| {
        // SAFETY: cboot.c passes NUL-terminated strings (or null).
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?"))
    };
    // SAFETY: `harness` is the `&mut Harness` `c_boot` passed, not otherwise used
    // while `cboot_main` runs.
    let h = unsafe { &mut *harness.cast::<Harness>() };
    let name = text(name).unwrap_or("capi_unnamed");
    h.check(
        name,
        if ok != 0 {
            Ok(())
        } else {
            Err(text(detail).unwrap_or("failed"))
        },
    );
}

/// Prints one line for cboot.c.
unsafe extern "C" fn print(line: *const c_char) {
    if !line.is_null() {
        // SAFETY: cboot.c passes a NUL-terminated string.
        let line = unsafe { CStr::from_ptr(line) };
        println!("{}", line.to_str().unwrap_or("?"));
    }
}

/// Module memory from the arena (within rel32 of the kernel).
unsafe extern "C" fn alloc(_: *mut c_void, size: usize, out: *mut KsitesRegion) -> c_int {
    let Some(p) = Arena.alloc(size) else {
        return 1;
    };
    // SAFETY: the C API passes a writable region.
    unsafe {
        *out = KsitesRegion {
            ptr: p.ptr().cast(),
            addr: p.addr,
            size: p.len,
        }
    };
    0
}

unsafe extern "C" fn protect(
    _: *mut c_void,
    r: *const KsitesRegion,
    offset: usize,
    len: usize,
    prot: c_int,
) -> c_int {
    // SAFETY: the C API passes the region `alloc` returned.
    let Some(r) = (unsafe { r.as_ref() }) else {
        return KSITES_PROTECT_RANGE;
    };
    if offset.checked_add(len).is_none_or(|end| end > r.size) {
        return KSITES_PROTECT_RANGE;
    }
    let perm = match prot {
        KSITES_PROT_RX => Perm::ReadExec,
        KSITES_PROT_R => Perm::Read,
        KSITES_PROT_RW => Perm::ReadWrite,
        _ => return 2,
    };
    // SAFETY: the region is the arena's, owned by the loader, which agrees.
    unsafe { arena::protect(r.addr + offset as u64, len, perm) }
        .map_or(KSITES_PROTECT_RANGE, |()| 0)
}

unsafe extern "C" fn free(_: *mut c_void, r: *const KsitesRegion) {
    // SAFETY: the C API passes the region `alloc` returned, now unused.
    if let Some(r) = unsafe { r.as_ref() } {
        // SAFETY: as above.
        unsafe {
            Arena.free(Pages {
                addr: r.addr,
                len: r.size,
            })
        };
    }
}

extern "C" fn pages_used() -> usize {
    Arena.usage().used
}
