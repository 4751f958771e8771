//! Introspection of the registry (re-exported by [`crate::introspect`]): every
//! registered probe with its state and hits, and each site's state read from the live
//! bytes, across the kernel and its loaded modules.
//!
//! Each step takes the registry lock for itself and releases it before yielding, so a
//! caller may enable or disable probes while iterating (it sees the state as of each
//! step). An iterator over one probe's sites stops if the probe's image is unloaded
//! under it.

use super::dispatch::this_image_stubs;
use super::registry::{ProbeInfo, info};
use super::state::{self, kernel_image};
use super::{MAX_PROBES, ProbeId};
use crate::arch::native::probe::{self as arch, SITE_LEN, SiteWord, Stubs};
use crate::format::{PSite, ProbeKind};
use crate::patch::InsnBytes;

/// Every registered probe, in id order, each read when the iterator reaches it.
pub fn probes() -> impl Iterator<Item = ProbeInfo> {
    (0..MAX_PROBES as u32).filter_map(|i| info(ProbeId(i)))
}

/// The sites of probe `id`, in address order (none if no such probe).
pub fn probe_sites(id: ProbeId) -> ProbeSites {
    let lock = state::lock();
    let (table, image) = state::image_of(id, &lock).map_or((0, (0, 0)), |(d, _)| {
        (d.table.base(), (d.base, d.table.probe_site_count()))
    });
    ProbeSites {
        id,
        table,
        image,
        next: 0,
    }
}

impl ProbeInfo {
    /// Its sites, in address order ([`probe_sites`]).
    pub fn sites(&self) -> ProbeSites {
        probe_sites(self.id)
    }
}

/// The sites of one probe ([`probe_sites`]).
#[derive(Clone, Debug)]
pub struct ProbeSites {
    id: ProbeId,
    /// Address of the probe's table when the iterator was made (0: none).
    table: u64,
    /// The image's first probe id and probe site count then: with the address, what
    /// tells a module loaded later at the same address (after an unload) from it.
    image: (u32, u32),
    /// Next table site index to look at.
    next: u32,
}

impl Iterator for ProbeSites {
    type Item = ProbeSiteInfo;

    fn next(&mut self) -> Option<ProbeSiteInfo> {
        let lock = state::lock();
        let (d, local) = state::image_of(self.id, &lock)?;
        if self.table == 0
            || d.table.base() != self.table
            || (d.base, d.table.probe_site_count()) != self.image
        {
            return None;
        }
        let s = (self.next..d.table.probe_site_count())
            .filter_map(|i| d.table.probe_site(i))
            .find(|s| s.probe == local)?;
        self.next = s.index + 1;
        let kernel = kernel_image().is_some_and(|k| k.table.base() == d.table.base());
        let image = if kernel {
            ProbeSiteImage::Kernel
        } else {
            ProbeSiteImage::Module {
                first_id: ProbeId(d.base),
            }
        };
        let enabled = super::is_enabled(self.id);
        Some(ProbeSiteInfo {
            addr: s.addr,
            kind: s.kind,
            image,
            state: classify(&s, &this_image_stubs()),
            probe_enabled: enabled,
        })
    }
}

/// What the bytes of site `s` are now.
fn classify(s: &PSite, stubs: &Stubs) -> ProbeSiteState {
    let found = read_site(s.addr);
    let on = arch::site_word(&s.arch_ref(), true, stubs).ok();
    let off = arch::site_word(&s.arch_ref(), false, stubs).ok();
    match (on, off) {
        (Some(on), _) if found == on => ProbeSiteState::Enabled,
        (_, Some(off)) if found == off => ProbeSiteState::Disabled,
        (Some(on), Some(off))
            if arch::is_residue(found, off, on) || arch::is_residue(found, on, off) =>
        {
            ProbeSiteState::Transitioning
        }
        _ => ProbeSiteState::Unexpected(InsnBytes::new(&arch::bytes_of(found))),
    }
}

/// The live bytes of the probe site at `addr`, one volatile load each (a batch on
/// another CPU may be writing them).
fn read_site(addr: u64) -> SiteWord {
    let mut v = 0u64;
    for i in 0..SITE_LEN.min(8) {
        // SAFETY: `addr` is a probe site of a registered table: the registry holds only
        // tables of live images (registering checked every site's bytes through the
        // poker), whose sites were validated to lie in the image's executable ranges,
        // mapped and readable at their addresses, as a batch reads them.
        let b = unsafe { core::ptr::read_volatile((addr as usize).wrapping_add(i) as *const u8) };
        v |= u64::from(b) << (8 * i);
    }
    v
}

/// One probe site, as [`probe_sites`] read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSiteInfo {
    /// Address of the site.
    pub addr: u64,
    /// Its form.
    pub kind: ProbeKind,
    /// The image it lies in.
    pub image: ProbeSiteImage,
    /// What its bytes are now.
    pub state: ProbeSiteState,
    /// Whether its probe was enabled when the site was read.
    pub probe_enabled: bool,
}

/// The image a probe site lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeSiteImage {
    /// The kernel image.
    Kernel,
    /// A loaded module, named by the id of its first probe
    /// ([`super::ImageHandle::base`]).
    Module {
        /// Global id of the module's probe 0.
        first_id: ProbeId,
    },
}

/// What a probe site's current bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeSiteState {
    /// The enabled form.
    Enabled,
    /// The disabled form.
    Disabled,
    /// Between the two: a batch is writing it, or a failed batch left its trap (the
    /// trap handler emulates it; the next batch rewrites it).
    Transitioning,
    /// Neither form: these bytes.
    Unexpected(InsnBytes),
}
