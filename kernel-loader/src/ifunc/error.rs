//! What a live retarget ([`super::retarget_raw`]) and [`super::reresolve_all`] report,
//! and why they fail.

use core::fmt;

use super::retarget::MAX_PREFIXED_SITES;
use crate::arch::{Arch, InsnBytes};
use crate::name::Name;
use crate::patch::PokeError;

/// What a retarget did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetargetReport {
    /// The implementation before (the slot's old value).
    pub previous: u64,
    /// Sites of the ifunc in every registered image.
    pub sites: u32,
    /// Of those, the sites rewritten.
    pub sites_rewritten: u32,
    /// Of [`RetargetReport::sites`], those left on (or moved to) the trampoline: the new
    /// implementation is out of their branch's reach. They reach it through the slot.
    pub sites_on_trampoline: u32,
    /// Registered images with at least one site of the ifunc.
    pub images: u32,
}

/// Why a retarget failed. Unless it is [`RetargetError::RollbackIncomplete`], every
/// site and the slot are as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetargetError {
    /// No registered image defines an ifunc with this trampoline (the kernel's table
    /// is registered with `probe::register_image`; a module's when it loads).
    NoSuchIfunc {
        /// The trampoline given.
        trampoline: u64,
    },
    /// The new implementation is null or the trampoline itself.
    BadImplementation {
        /// The ifunc.
        ifunc: Name,
        /// The address given.
        addr: u64,
    },
    /// A site does not hold the branch to the ifunc's current implementation (or, out
    /// of its reach, to the trampoline). Nothing was written.
    UnexpectedSiteBytes {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
        /// What the site should hold.
        expected: InsnBytes,
        /// What it holds.
        found: InsnBytes,
    },
    /// Neither the implementation nor the trampoline is within the site's reach.
    OutOfReach {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
        /// The implementation.
        target: u64,
    },
    /// More than [`MAX_PREFIXED_SITES`] prefixed sites would be rewritten. Nothing was
    /// written.
    TooManyPrefixedSites {
        /// The ifunc.
        ifunc: Name,
        /// How many.
        count: u32,
    },
    /// Live retargeting is not implemented on this architecture.
    Unsupported {
        /// The table's architecture.
        arch: Arch,
    },
    /// No #BP route is declared (`probe::declare_int3_route`): a CPU reaching a site
    /// mid-batch would execute an `int3` nothing handles. Nothing was written.
    NoTrapRoute,
    /// An earlier retarget of the ifunc with this trampoline could not roll back and
    /// left sites emulated through the #BP hook: no retarget runs any more.
    Stuck {
        /// That ifunc's trampoline.
        trampoline: u64,
    },
    /// The kernel's poker failed; the batch was rolled back.
    Poke {
        /// The ifunc.
        ifunc: Name,
        /// The poker's error.
        error: PokeError,
    },
    /// A site did not read back as written; the batch was rolled back.
    VerifyFailed {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
    },
    /// A batch failed and this site could not be restored. On x86-64 it may still
    /// start with `int3`, which the #BP hook keeps emulating into the old
    /// implementation ([`RetargetError::Stuck`] from then on); the slot is unchanged.
    RollbackIncomplete {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
    },
}

impl fmt::Display for RetargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetargetError::NoSuchIfunc { trampoline } => write!(
                f,
                "no registered image defines an ifunc with trampoline {trampoline:#x} \
                 (a kernel registers its table with probe::register_image)"
            ),
            RetargetError::BadImplementation { ifunc, addr } => write!(
                f,
                "cannot retarget {ifunc} to {addr:#x}: null, or its own trampoline"
            ),
            RetargetError::UnexpectedSiteBytes {
                site,
                ifunc,
                expected,
                found,
            } => write!(
                f,
                "site {site:#x} ({ifunc}): expected bytes [{expected}], found [{found}] \
                 (nothing written)"
            ),
            RetargetError::OutOfReach {
                site,
                ifunc,
                target,
            } => write!(
                f,
                "site {site:#x} ({ifunc}) reaches neither {target:#x} nor the trampoline"
            ),
            RetargetError::TooManyPrefixedSites { ifunc, count } => write!(
                f,
                "{ifunc}: {count} prefixed sites to rewrite, more than {MAX_PREFIXED_SITES} \
                 (nothing written)"
            ),
            RetargetError::Unsupported { arch } => {
                write!(f, "live ifunc retargeting is not supported on {arch}")
            }
            RetargetError::NoTrapRoute => write!(
                f,
                "retargeting needs a #BP route: install kernel_loader::probe::int3_entry \
                 (or call probe::handle_int3) and call probe::declare_int3_route()"
            ),
            RetargetError::Stuck { trampoline } => write!(
                f,
                "a failed retarget of the ifunc at {trampoline:#x} could not restore its \
                 sites; no retarget runs any more"
            ),
            RetargetError::Poke { ifunc, error } => {
                write!(f, "retargeting {ifunc}: {error} (batch rolled back)")
            }
            RetargetError::VerifyFailed { site, ifunc } => write!(
                f,
                "site {site:#x} ({ifunc}) did not read back as written (batch rolled back)"
            ),
            RetargetError::RollbackIncomplete { site, ifunc } => write!(
                f,
                "retargeting {ifunc} failed and site {site:#x} could not be restored"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for RetargetError {}

/// What [`super::reresolve_all`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReresolveReport {
    /// Defined ifuncs whose resolver ran.
    pub ifuncs: u32,
    /// Of those, the ones whose choice changed and were retargeted.
    pub retargeted: u32,
    /// Sites rewritten, over every retarget.
    pub sites_rewritten: u32,
    /// Sites on the trampoline after their retarget, over every retarget.
    pub sites_on_trampoline: u32,
}

/// Why [`super::reresolve_all`] stopped: the retarget of the ifunc with trampoline
/// `trampoline` failed with `error` (which names the ifunc where it concerns a site;
/// that retarget left nothing changed); the ifuncs before it, counted in `done`, stay
/// retargeted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReresolveError {
    /// The trampoline of the ifunc whose retarget failed (0: none was tried).
    pub trampoline: u64,
    /// Why.
    pub error: RetargetError,
    /// What was done before.
    pub done: ReresolveReport,
}

impl fmt::Display for ReresolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "re-resolving the ifunc at {:#x}: {} ({} ifuncs retargeted before it)",
            self.trampoline, self.error, self.done.retargeted
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ReresolveError {}
