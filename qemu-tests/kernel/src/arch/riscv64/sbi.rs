//! SBI calls to OpenSBI (through the `sbi-rt` crate): the base extension (version,
//! implementation, which extensions exist), HSM `hart_start`, IPIs, remote
//! `sfence.vma`, and SRST for power-off.

use sbi_rt::{HartMask, NoReason, Shutdown, SystemFailure};

/// What OpenSBI says about itself and the extensions this kernel uses.
#[derive(Clone, Copy, Debug)]
pub struct Info {
    /// SBI specification version (major, minor).
    pub spec: (usize, usize),
    /// Implementation id (1 = OpenSBI).
    pub impl_id: usize,
    /// Implementation version (OpenSBI: major << 16 | minor).
    pub impl_version: usize,
    /// Hart state management (hart_start).
    pub hsm: bool,
    /// IPIs (send_ipi).
    pub ipi: bool,
    /// Remote fences.
    pub rfence: bool,
    /// System reset.
    pub srst: bool,
}

/// Asks OpenSBI.
pub fn info() -> Info {
    let v = sbi_rt::get_spec_version();
    Info {
        spec: (v.major(), v.minor()),
        impl_id: sbi_rt::get_sbi_impl_id(),
        impl_version: sbi_rt::get_sbi_impl_version(),
        hsm: sbi_rt::probe_extension(sbi_rt::Hsm).is_available(),
        ipi: sbi_rt::probe_extension(sbi_rt::Ipi).is_available(),
        rfence: sbi_rt::probe_extension(sbi_rt::Fence).is_available(),
        srst: sbi_rt::probe_extension(sbi_rt::Reset).is_available(),
    }
}

/// SBI's error code of a failed call (0 = success).
pub type Status = isize;

/// Starts hart `hartid` at physical `entry` with `a0` = hartid, `a1` = `opaque`.
pub fn hart_start(hartid: usize, entry: usize, opaque: usize) -> Status {
    sbi_rt::hart_start(hartid, entry, opaque).error as isize
}

/// A hart mask (base 0) holding `harts` (hart ids < 64).
fn mask(harts: u64) -> HartMask {
    HartMask::from_mask_base(harts as usize, 0)
}

/// Sends a supervisor software interrupt to every hart in `harts` (bit = hart id).
pub fn send_ipi(harts: u64) -> Status {
    sbi_rt::send_ipi(mask(harts)).error as isize
}

/// `sfence.vma` of `[start, start + size)` on every hart in `harts`.
pub fn remote_sfence_vma(harts: u64, start: usize, size: usize) -> Status {
    sbi_rt::remote_sfence_vma(mask(harts), start, size).error as isize
}

/// Powers the machine off (QEMU exits with status 0); returns only if SRST refused.
pub fn shutdown(success: bool) {
    if success {
        sbi_rt::system_reset(Shutdown, NoReason);
    } else {
        sbi_rt::system_reset(Shutdown, SystemFailure);
    }
}
