//! Introspection: what each ifunc resolved to and the state of every ifunc and probe
//! site, read from the live image, for a kernel shell or a test.
//!
//! * Ifuncs: [`LiveImage::ifuncs`] yields an [`IfuncInfo`] per ifunc (name, slot, the
//!   chosen implementation the slot holds now, the default, whether it was resolved),
//!   and [`IfuncInfo::sites`] each call site with its [`SiteState`], decoded from the
//!   site's current bytes by the table's architecture.
//! * Probes: [`probes`] yields the registry's [`ProbeInfo`] for every registered probe
//!   of the kernel and its loaded modules (id, name, enabled, hits summed over CPUs), and
//!   [`ProbeInfo::sites`] / [`probe_sites`] each site with its [`ProbeSiteState`].
//!
//! Nothing allocates: names are borrowed from the table's string pool (ifuncs) or
//! copied into a [`crate::Name`] (probes, whose tables a module unload frees), and every
//! iterator walks the table in place. Implementation names are not in the table: an
//! implementation is given by address, for the kernel's own symbolizer.
//!
//! The iterators over probes take the registry lock at each step: call them from a
//! shell or a test, never from a probe handler.
//!
//! ```no_run
//! # extern crate std;
//! # use std::println;
//! use kernel_loader::introspect::{self, LiveImage};
//! # fn show(table: kernel_loader::format::Table<'static>) {
//! let image = unsafe { LiveImage::new(table) }; // SAFETY: the table of this image
//! for f in image.ifuncs() {
//!     println!("{} -> {:#x} (default {:#x})", f.name, f.chosen, f.default);
//!     for s in f.sites() {
//!         println!("  {:#x} {} {:?}", s.addr, s.kind.name(), s.state); // Patched, Trampoline, ...
//!     }
//! }
//! for p in introspect::probes() {
//!     println!("{}:{} enabled={} hits={}", p.provider, p.name, p.enabled, p.hits);
//!     for s in p.sites() {
//!         println!("  {:#x} {:?} {:?}", s.addr, s.image, s.state); // Enabled, Disabled, ...
//!     }
//! }
//! # }
//! ```

use crate::arch::{InsnBytes, MAX_TRAMPOLINE_LEN, SiteKind};
use crate::format::{Ifunc, SiteWalk, Table};

pub use crate::probe::{
    ProbeInfo, ProbeSiteImage, ProbeSiteInfo, ProbeSiteState, ProbeSites, probe_sites, probes,
};

/// A table that describes the running image (the kernel, or a loaded module): the only
/// way to read its slots and sites, so the reads are safe once it is made.
#[derive(Clone, Copy, Debug)]
pub struct LiveImage<'t> {
    table: Table<'t>,
}

impl<'t> LiveImage<'t> {
    /// Wraps `table` for introspection.
    ///
    /// # Safety
    ///
    /// `table` describes this running image or a module loaded into it, as for
    /// [`crate::patch::init`]: its sites and trampolines (an import's: the kernel's) are
    /// mapped and readable at their addresses, and so are its slots (an import's: the
    /// slot its trampoline jumps through), for all of `'t`: the `IfuncInfo`s and site
    /// iterators it hands out are `Copy` and may outlive it, and they read those
    /// addresses. For a module (whose table is `'static`), drop everything obtained
    /// from its `LiveImage` before unloading it.
    pub unsafe fn new(table: Table<'t>) -> LiveImage<'t> {
        LiveImage { table }
    }

    /// The table.
    pub fn table(&self) -> &Table<'t> {
        &self.table
    }

    /// Every ifunc, in table order.
    pub fn ifuncs(&self) -> impl Iterator<Item = IfuncInfo<'t>> + '_ {
        self.table.ifuncs().map(|f| self.info(f))
    }

    /// The ifunc named `name` (as [`IfuncInfo::name`] prints it).
    pub fn ifunc(&self, name: &str) -> Option<IfuncInfo<'t>> {
        self.ifuncs().find(|f| f.name == name)
    }

    fn info(&self, f: Ifunc<'t>) -> IfuncInfo<'t> {
        let slot = if f.imported {
            self.import_slot(f.trampoline)
        } else {
            f.slot
        };
        let chosen = if slot != 0 && slot.is_multiple_of(8) {
            // SAFETY: `new`'s precondition: the slot (a defined ifunc's, 8-aligned as
            // `Table::parse` checked; or the one an import's trampoline jumps through,
            // checked non-null and aligned above) is mapped, readable data.
            unsafe { core::ptr::read_volatile(slot as usize as *const u64) }
        } else {
            0
        };
        let (default, trampoline) = (f.default, f.trampoline);
        let mut info = IfuncInfo {
            index: f.index,
            name: f.name,
            trampoline,
            slot,
            resolver: f.resolver,
            default,
            imported: f.imported,
            chosen,
            resolved: false,
            table: self.table,
        };
        // A resolver may choose the default: then a site branching to it directly
        // shows that `init` ran.
        info.resolved = if f.imported {
            chosen != 0
        } else {
            chosen != default || info.sites().any(|s| s.state == SiteState::Patched)
        };
        info
    }

    /// The slot an import's trampoline jumps through (0 if it is not a trampoline).
    fn import_slot(&self, trampoline: u64) -> u64 {
        let arch = self.table.arch();
        let len = arch.trampoline_len();
        let mut b = [0u8; MAX_TRAMPOLINE_LEN];
        read_text(trampoline, &mut b[..len]);
        arch.trampoline_slot(&b[..len], trampoline).unwrap_or(0)
    }
}

/// Reads `out.len()` bytes of live text at `addr`, one volatile load each (as the patch
/// engine's read-back does: another CPU may be patching them).
fn read_text(addr: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: only called with a site or trampoline of a `LiveImage`'s table, which
        // `LiveImage::new`'s caller vouched is mapped and readable.
        *b = unsafe { core::ptr::read_volatile((addr as usize).wrapping_add(i) as *const u8) };
    }
}

/// One ifunc of a [`LiveImage`].
#[derive(Clone, Copy, Debug)]
pub struct IfuncInfo<'t> {
    /// Index in the table.
    pub index: u32,
    /// Name, from the table's string pool.
    pub name: &'t str,
    /// Trampoline address (what unpatched sites branch to).
    pub trampoline: u64,
    /// Slot address (for an import: the kernel's slot its trampoline jumps through; 0 if
    /// that trampoline does not decode).
    pub slot: u64,
    /// Resolver address (0 for an import).
    pub resolver: u64,
    /// Default implementation: what the slot holds before `init` (0 for an import; for a
    /// GNU ifunc, which has none, the trampoline).
    pub default: u64,
    /// An ifunc the kernel defines and this module calls.
    pub imported: bool,
    /// The chosen implementation: what the slot holds now (the kernel symbolizes it).
    pub chosen: u64,
    /// Whether `init` resolved it: the slot no longer holds the default, or a site
    /// branches to it directly (the resolver chose the default). For an import: the
    /// kernel's slot is readable.
    pub resolved: bool,
    table: Table<'t>,
}

impl<'t> IfuncInfo<'t> {
    /// Whether the chosen implementation is the default one.
    pub fn chose_default(&self) -> bool {
        self.chosen == self.default
    }

    /// Its call sites, in address order, each with its state read now.
    pub fn sites(&self) -> IfuncSites<'t> {
        IfuncSites {
            walk: self.table.site_walk(),
            table: self.table,
            ifunc: self.index,
            chosen: self.chosen,
            trampoline: self.trampoline,
        }
    }
}

/// The sites of one ifunc ([`IfuncInfo::sites`]).
#[derive(Clone, Debug)]
pub struct IfuncSites<'t> {
    walk: SiteWalk<'t>,
    table: Table<'t>,
    ifunc: u32,
    chosen: u64,
    trampoline: u64,
}

impl Iterator for IfuncSites<'_> {
    type Item = SiteInfo;

    fn next(&mut self) -> Option<SiteInfo> {
        let s = self.walk.find(|s| s.ifunc == self.ifunc)?;
        let mut b = [0u8; 8];
        let len = s.len().min(b.len());
        read_text(s.addr, &mut b[..len]);
        let bytes = InsnBytes::new(&b[..len]);
        let arch = self.table.arch();
        let branch = s.branch();
        let target = arch
            .has_branch_opcode(&branch, bytes.as_slice())
            .then(|| arch.decode_branch_target(&branch, bytes.as_slice()))
            .flatten();
        let state = match target {
            Some(t) if t == self.trampoline => SiteState::Trampoline,
            Some(t) if t == self.chosen => SiteState::Patched,
            Some(t) => SiteState::Elsewhere(t),
            None => SiteState::Unexpected(bytes),
        };
        Some(SiteInfo {
            addr: s.addr,
            kind: s.kind,
            len: s.len() as u8,
            state,
        })
    }
}

/// One ifunc call site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteInfo {
    /// Address of the instruction.
    pub addr: u64,
    /// Call, jmp or jcc.
    pub kind: SiteKind,
    /// Length of the instruction.
    pub len: u8,
    /// What its bytes do now.
    pub state: SiteState,
}

/// What an ifunc site's current bytes do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteState {
    /// A direct branch to the chosen implementation (patched by `init`).
    Patched,
    /// Still the branch to the trampoline (before `init`, or the implementation is out
    /// of the branch's reach).
    Trampoline,
    /// A branch of the site's kind to another address (neither the trampoline nor what
    /// the slot holds now).
    Elsewhere(u64),
    /// Not a branch of the site's kind: these bytes.
    Unexpected(InsnBytes),
}
