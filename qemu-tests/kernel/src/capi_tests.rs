//! The C API (`kernel-loader-capi`, `ksites.h`) from C: `c/capi.c` looks up the C probe
//! `ctest:one`, enables it with a C handler through its own C poker, fires it, checks the
//! handler's count and `ksites_probe_hits`, disables it and checks nothing more counts.

use core::ffi::c_int;

use crate::ensure;
use crate::harness::{Harness, TestResult};

// Link the C API into the kernel (its `ksites_*` functions are what capi.c calls).
use kernel_loader_capi as _;

unsafe extern "C" {
    /// `c/capi.c`: 0, or the failed step (and the C API's error code in `*err`).
    fn capi_probe_roundtrip(err: *mut c_int) -> c_int;
}

/// Runs the C API tests.
pub fn run(h: &mut Harness) {
    h.run("capi_c_probe_lookup_enable_fire_disable", roundtrip);
}

fn roundtrip() -> TestResult {
    let mut err: c_int = 0;
    // SAFETY: the kernel's probes are registered and the #BP route declared (probe and
    // trap tests); `err` is writable; no other CPU runs ctest:one's site meanwhile.
    let step = unsafe { capi_probe_roundtrip(&mut err) };
    let msg = kernel_loader_capi::ksites_strerror(err);
    // SAFETY: ksites_strerror returns a static NUL-terminated string.
    let msg = unsafe { core::ffi::CStr::from_ptr(msg) }
        .to_str()
        .unwrap_or("?");
    ensure!(
        step == 0,
        "capi.c failed at step {step}: error {err} ({msg})"
    );
    Ok(())
}
