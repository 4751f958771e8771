//! Boot-time patching of ifunc call sites.
//!
//! [`init`] runs each ifunc's resolver exactly once, stores the result in the ifunc's
//! slot, and rewrites the target field of every recorded call/jump site so it targets the
//! chosen implementation directly. It is all-or-nothing: each site is checked before its
//! write, and if anything fails after writing began (a site that is not the original, a
//! failed write), every site written and every slot is put back the way it was.
//!
//! The kernel owns the hardware side through [`TextPoker`] (how to write text, how to
//! make every CPU serialize); this module owns the protocol.

use core::fmt;
use core::ops::Range;

use crate::CpuFeatures;
pub use crate::arch::InsnBytes;
use crate::arch::{Arch, BranchSite, MAX_TRAMPOLINE_LEN};
use crate::format::{FormatError, Ifunc, Site, Table};
use crate::name::Name;

mod failure;
use failure::{Stop, check_site, first_bad_site, roll_back};

/// Why a [`TextPoker`] could not write text. A small set that every poker maps its
/// failures into, so errors own their data (no borrowed strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PokeFailure {
    /// Changing the text's protection (making it writable, or read-only again) failed,
    /// e.g. `mprotect`.
    Protect,
    /// The address is outside the text this poker may write (e.g. not in an executable
    /// segment of the main program).
    NotText,
    /// The text page is not mapped.
    NotMapped,
    /// The text is mapped with a large page, which this poker cannot alias.
    LargePage,
    /// The poker's write window is in use by another writer.
    Busy,
    /// The bytes read back through the text mapping differ from those written.
    ReadBack,
    /// A test injected this failure.
    Injected,
}

impl fmt::Display for PokeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PokeFailure::Protect => "changing the text's page protection failed",
            PokeFailure::NotText => "not in text this poker may write",
            PokeFailure::NotMapped => "text page not mapped",
            PokeFailure::LargePage => "text mapped with a large page, which cannot be aliased",
            PokeFailure::Busy => "the poke window is in use",
            PokeFailure::ReadBack => "read-back through the text mapping differs",
            PokeFailure::Injected => "injected failure",
        })
    }
}

/// A failed text write, as reported by a [`TextPoker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PokeError {
    /// Address of the write that failed.
    pub addr: u64,
    /// Why.
    pub reason: PokeFailure,
}

impl PokeError {
    /// A failed write at `addr`.
    pub const fn new(addr: u64, reason: PokeFailure) -> PokeError {
        PokeError { addr, reason }
    }
}

impl fmt::Display for PokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "text write at {:#x} failed: {}", self.addr, self.reason)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PokeError {}

/// How the kernel writes to its text. The patch engine calls `begin`, any number of
/// `write`s, `sync_cores`, then `end`. The loader owns the protocol (what is written
/// when, and how many synchronisation rounds: `arch::native::probe`), the kernel the
/// hardware (the mapping, the IPIs).
pub trait TextPoker {
    /// Prepares for writes (map a writable alias, or on x86-64 clear CR0.WP on the boot
    /// CPU).
    fn begin(&mut self) -> Result<(), PokeError> {
        Ok(())
    }

    /// Writes `bytes` at `addr`, and makes them visible to instruction fetch on the
    /// running CPU.
    ///
    /// On an architecture with fixed 4-byte instructions (aarch64), the engine writes a
    /// whole, aligned instruction at a time: the poker must store it with **one**
    /// aligned 32-bit store (single-copy atomic, so no CPU ever fetches half of it),
    /// then clean and invalidate the caches for that address
    /// (`arch::aarch64::sync_icache`, on the site's own address). On riscv64 likewise
    /// one aligned 32-bit store for a probe site (a boot-time ifunc site, 2 to 8
    /// bytes, may be written in any number of stores), then `fence.i`
    /// (`arch::riscv64::fence_i`).
    ///
    /// # Safety
    ///
    /// The caller guarantees that `addr .. addr + bytes.len()` lies inside one recorded
    /// site of a validated table and that no CPU is executing those bytes unless the
    /// live-patching protocol is in use.
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError>;

    /// Reads `out.len()` bytes of text at `addr`. The default reads memory directly,
    /// which is right whenever text is readable at its own address.
    ///
    /// # Safety
    ///
    /// `addr .. addr + out.len()` must be mapped and readable.
    unsafe fn read(&self, addr: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: the caller guarantees the range is mapped and readable.
            *b = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
        }
    }

    /// Reads `len` (at most 8) bytes of text at `addr` as a little-endian word (the
    /// higher bytes 0): how the patch engine and the probe batches read every site they
    /// check or verify. The default reads one byte at a time through
    /// [`TextPoker::read`] and assembles the word in a register, so a poker that only
    /// overrides `read` is read through it. A poker whose text is readable at its own
    /// address (the default `read`'s assumption) should override this with
    /// [`read_text_word`]: one or two loads instead of `len`, on every site of a batch.
    ///
    /// # Safety
    ///
    /// As for [`TextPoker::read`]: `addr .. addr + len` must be mapped and readable.
    #[inline(always)]
    unsafe fn read_word(&self, addr: u64, len: usize) -> u64 {
        let mut v = 0u64;
        for i in 0..len.min(8) {
            let mut b = [0u8; 1];
            // SAFETY: forwarded: the caller guarantees the range is mapped and readable.
            unsafe { self.read(addr + i as u64, &mut b) };
            v |= u64::from(b[0]) << (8 * i);
        }
        v
    }

    /// Makes every CPU that may execute the patched text execute a serializing
    /// instruction (on one CPU at boot: just this one): on x86-64 an IPI running e.g.
    /// `cpuid` or `iret`; on aarch64 an IPI running `isb` (`arch::aarch64::isb`), a
    /// context synchronisation event; on riscv64 a `fence.i` on every hart (SBI RFENCE
    /// `remote_fence_i`, or an IPI running `arch::riscv64::fence_i`). A probe batch
    /// calls it once per round of the architecture's protocol (x86-64: 3; aarch64 and
    /// riscv64: 1), never per site.
    fn sync_cores(&mut self);

    /// Writing is over: text must be read-only again when this returns.
    fn end(&mut self);
}

/// Why patching failed. Whenever this is returned, no site and no slot is changed, except
/// with [`PatchError::RollbackIncomplete`], which names the site that could not be
/// restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The table is invalid.
    Format(FormatError),
    /// A site does not hold the original branch to its ifunc's trampoline.
    UnexpectedSiteBytes {
        /// Site address.
        site: u64,
        /// The ifunc it should call.
        ifunc: Name,
        /// The bytes the engine expected.
        expected: InsnBytes,
        /// The bytes it found.
        found: InsnBytes,
    },
    /// No direct branch from the site reaches its ifunc's trampoline (it lies beyond the
    /// architecture's branch range: ±2 GiB on x86-64, ±128 MiB on aarch64; on riscv64
    /// the site's form's: ±2 GiB, ±1 MiB, ±2 KiB), so the site
    /// cannot be checked as the original: e.g. a module loaded too far from the kernel,
    /// whose calls reach the kernel through the module loader's veneers.
    TrampolineOutOfReach {
        /// Site address.
        site: u64,
        /// The ifunc it should call.
        ifunc: Name,
        /// Its trampoline.
        trampoline: u64,
    },
    /// A site already branches to its ifunc's resolved implementation: `init` ran before.
    AlreadyPatched {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
    },
    /// A trampoline is not the architecture's trampoline through its own slot (for an
    /// import: through a valid slot).
    BadTrampoline {
        /// The ifunc.
        ifunc: Name,
        /// Trampoline address.
        addr: u64,
        /// The bytes found there.
        found: InsnBytes,
    },
    /// A slot no longer holds the default implementation (already resolved, or
    /// overwritten).
    SlotNotDefault {
        /// The ifunc.
        ifunc: Name,
        /// Slot address.
        slot: u64,
        /// Value found.
        value: u64,
    },
    /// A resolver returned null or an address outside every executable range.
    BadResolution {
        /// The ifunc.
        ifunc: Name,
        /// What it returned.
        addr: u64,
    },
    /// The kernel's poker failed.
    Poke {
        /// The ifunc whose site was being written (`None` for `begin`).
        ifunc: Option<Name>,
        /// The poker's error.
        error: PokeError,
    },
    /// A batch failed and restoring a site failed too: that site may hold neither its
    /// original nor its patched bytes (its slot is restored, so the trampoline path stays
    /// valid, but the site itself needs attention).
    RollbackIncomplete {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
    },
    /// A site read back differently from what was written.
    VerifyFailed {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: Name,
    },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchError::Format(e) => write!(f, "invalid .ksites table: {e}"),
            PatchError::UnexpectedSiteBytes {
                site,
                ifunc,
                expected,
                found,
            } => write!(
                f,
                "site {site:#x} ({ifunc}): expected bytes [{expected}], found [{found}]"
            ),
            PatchError::TrampolineOutOfReach {
                site,
                ifunc,
                trampoline,
            } => write!(
                f,
                "site {site:#x} ({ifunc}): its trampoline {trampoline:#x} is out of a direct \
                 branch's reach (load the code nearer the kernel)"
            ),
            PatchError::AlreadyPatched { site, ifunc } => write!(
                f,
                "site {site:#x} ({ifunc}) already calls the resolved implementation: init ran twice"
            ),
            PatchError::BadTrampoline { ifunc, addr, found } => write!(
                f,
                "trampoline of {ifunc} at {addr:#x} is not a trampoline through its slot: [{found}]"
            ),
            PatchError::SlotNotDefault { ifunc, slot, value } => write!(
                f,
                "slot of {ifunc} at {slot:#x} holds {value:#x}, not the default implementation (already resolved?)"
            ),
            PatchError::BadResolution { ifunc, addr } => write!(
                f,
                "resolver of {ifunc} returned {addr:#x}, which is not in an executable range"
            ),
            PatchError::Poke { ifunc: None, error } => write!(f, "{error}"),
            PatchError::Poke {
                ifunc: Some(ifunc),
                error,
            } => write!(f, "patching {ifunc}: {error}"),
            PatchError::RollbackIncomplete { site, ifunc } => write!(
                f,
                "patching failed and site {site:#x} ({ifunc}) could not be restored"
            ),
            PatchError::VerifyFailed { site, ifunc } => {
                write!(f, "site {site:#x} ({ifunc}) did not read back as written")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PatchError {}

impl From<FormatError> for PatchError {
    fn from(e: FormatError) -> Self {
        PatchError::Format(e)
    }
}

/// What [`init`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitReport {
    /// Ifuncs resolved.
    pub ifuncs: u32,
    /// Sites rewritten into direct branches.
    pub sites_patched: u32,
    /// Sites left on the trampoline because the implementation is out of the branch's reach.
    pub sites_out_of_reach: u32,
    /// Of [`InitReport::sites_out_of_reach`], the sites in a short, relaxed form
    /// ([`Arch::is_relaxed_form`]: riscv64 `jal`, ±1 MiB, and `c.j`, ±2 KiB) whose
    /// implementation is beyond that form's reach. They keep calling the trampoline,
    /// which reaches the chosen implementation through its slot: correct, not direct
    /// (`arch::riscv64::branch`, "Relaxation rule"). Always 0 on x86-64 and aarch64.
    pub relaxed_sites_on_trampoline: u32,
}

fn in_exec(exec: &[Range<u64>], addr: u64) -> bool {
    addr != 0 && exec.iter().any(|r| r.contains(&addr))
}

fn read_site<P: TextPoker + ?Sized>(poker: &P, site: &Site) -> InsnBytes {
    let len = site.len().min(8);
    InsnBytes::from_word(read_word(poker, site.addr, len), len)
}

/// Reads `len` (≤ 8) bytes of text at `addr` into a little-endian `u64`, through the
/// poker ([`TextPoker::read_word`]).
#[inline(always)]
fn read_word<P: TextPoker + ?Sized>(poker: &P, addr: u64, len: usize) -> u64 {
    // SAFETY: callers pass a range inside a validated site, which lies in an
    // executable range the kernel declared mapped.
    unsafe { poker.read_word(addr, len) }
}

/// Reads `len` (at most 8) bytes of memory at `addr` as a little-endian word (the higher
/// bytes 0) with volatile loads of any alignment: one for 1, 2, 4 or 8 bytes, else two
/// overlapping ones (5 to 7 bytes: the first four and the last four; 3: the first two
/// and the last two), with no branch on the length beyond its range. The
/// [`TextPoker::read_word`] of a poker whose text is readable at its own address.
/// Volatile, so a read-back after a write is a real load, never the value the compiler
/// knows was stored.
///
/// # Safety
///
/// `addr .. addr + len` must be mapped and readable.
#[inline(always)]
pub unsafe fn read_text_word(addr: u64, len: usize) -> u64 {
    /// An unaligned integer: a volatile load of it is one load of its width wherever
    /// the target allows unaligned loads (else the compiler splits it).
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned<T: Copy>(T);
    let p = addr as usize;
    // SAFETY: inside `addr .. addr + len`, which the caller guarantees is mapped and
    // readable; `Unaligned` has alignment 1.
    let load64 = |at: usize| unsafe { core::ptr::read_volatile(at as *const Unaligned<u64>).0 };
    // SAFETY: as above.
    let load32 = |at: usize| unsafe { core::ptr::read_volatile(at as *const Unaligned<u32>).0 };
    // SAFETY: as above.
    let load16 = |at: usize| unsafe { core::ptr::read_volatile(at as *const Unaligned<u16>).0 };
    // SAFETY: as above.
    let load8 = |at: usize| unsafe { core::ptr::read_volatile(at as *const u8) };
    match len {
        0 => 0,
        1 => u64::from(load8(p)),
        2 => u64::from(load16(p)),
        3 => u64::from(load16(p)) | u64::from(load16(p + 1)) << 8,
        4 => u64::from(load32(p)),
        // The bytes both loads cover are the same bytes, at the same place in the word.
        5..=7 => u64::from(load32(p)) | u64::from(load32(p + len - 4)) << (8 * (len - 4)),
        _ => load64(p),
    }
}

/// An ifunc's slot, readable: an 8-byte word the engine may load with a volatile read.
///
/// Only [`Slot::defined`], [`Slot::own`] and [`Slot::import`] make one, all `unsafe`: the proof
/// that the address is mapped, readable memory comes from the caller of
/// [`patch_ifuncs`] (its preconditions 1 and 3), and the constructors add what can be
/// checked: non-null, 8-aligned, 8 bytes inside the address space, and not executable
/// text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot(u64);

/// A slot of an ifunc the table defines: readable, and writable by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OwnSlot(Slot);

impl Slot {
    /// The slot of a defined ifunc `f`; `None` for an import.
    ///
    /// # Safety
    ///
    /// `f` comes from a table satisfying precondition 1 of [`patch_ifuncs`]: its slots
    /// are mapped, writable data of the image that nothing else writes while the engine
    /// runs. (`Table::parse` already checked the slot is 8-aligned, does not overflow,
    /// and lies outside the executable ranges.)
    unsafe fn defined(f: &Ifunc<'_>) -> Option<OwnSlot> {
        if f.imported {
            return None;
        }
        // SAFETY: forwarded: `f.slot` is the slot of a defined ifunc of such a table.
        unsafe { Slot::own(f.slot) }
    }

    /// The slot at `addr`, of an ifunc the table defines; `None` if null, misaligned or
    /// overflowing.
    ///
    /// # Safety
    ///
    /// As for [`Slot::defined`]: `addr` is the slot of a defined ifunc of a table
    /// satisfying precondition 1 of [`patch_ifuncs`].
    #[inline(always)]
    unsafe fn own(addr: u64) -> Option<OwnSlot> {
        (addr != 0 && addr.is_multiple_of(8) && addr.checked_add(8).is_some())
            .then_some(OwnSlot(Slot(addr)))
    }

    /// The slot the trampoline at `trampoline` jumps through, decoded by `arch` from the
    /// trampoline's bytes; `None` if they are not a trampoline, or the slot is null,
    /// misaligned, overflows or overlaps `exec` (a slot is data, never text).
    ///
    /// # Safety
    ///
    /// `trampoline` lies with all its bytes in an executable range the caller declared
    /// mapped, and is a trampoline of an ifunc defined by an image satisfying
    /// precondition 1 (for an import: precondition 3 of [`patch_ifuncs`]), so the slot it
    /// jumps through is mapped and readable.
    unsafe fn import<P: TextPoker + ?Sized>(
        arch: Arch,
        poker: &P,
        trampoline: u64,
        exec: &[Range<u64>],
    ) -> Option<Slot> {
        let len = arch.trampoline_len();
        let mut b = [0u8; MAX_TRAMPOLINE_LEN];
        // SAFETY: precondition: the trampoline's bytes are mapped and readable.
        unsafe { poker.read(trampoline, &mut b[..len]) };
        let slot = arch.trampoline_slot(&b[..len], trampoline)?;
        let outside_text = !exec
            .iter()
            .any(|r| r.start < slot.saturating_add(8) && slot < r.end);
        (slot != 0 && slot.is_multiple_of(8) && slot.checked_add(8).is_some() && outside_text)
            .then_some(Slot(slot))
    }

    fn addr(self) -> u64 {
        self.0
    }

    fn read(self) -> u64 {
        // SAFETY: a `Slot` is only made by `defined`/`import`, whose callers vouch that
        // the address is mapped, readable memory; it is non-null and 8-aligned (checked
        // there), so an 8-byte volatile load is in bounds and aligned.
        unsafe { core::ptr::read_volatile(self.0 as usize as *const u64) }
    }
}

impl OwnSlot {
    fn slot(self) -> Slot {
        self.0
    }

    fn write(self, value: u64) {
        // SAFETY: an `OwnSlot` is only made by `Slot::defined`, whose caller vouches that
        // the slot is mapped, writable data of the image that nothing else writes while
        // the engine runs (boot or module load, single writer); aligned as in `read`.
        unsafe { core::ptr::write_volatile(self.0.0 as usize as *mut u64, value) }
    }
}

/// Checks a trampoline: the architecture's trampoline whose target is the ifunc's slot
/// (for an import, any valid slot: the defining image's). Returns the slot it jumps
/// through.
///
/// # Safety
///
/// As for [`patch_ifuncs`], with `f` from its table.
unsafe fn check_trampoline<P: TextPoker + ?Sized>(
    arch: Arch,
    poker: &P,
    f: &Ifunc<'_>,
    exec: &[Range<u64>],
) -> Result<Slot, PatchError> {
    // SAFETY: `Table::parse` checked that the trampoline lies with all its bytes in an
    // executable range (the image's, or for an import the defining image's);
    // preconditions 1 and 3 of `patch_ifuncs` make it a trampoline of a live image.
    match unsafe { Slot::import(arch, poker, f.trampoline, exec) } {
        Some(slot) if f.imported || slot.addr() == f.slot => Ok(slot),
        _ => {
            let len = arch.trampoline_len();
            let mut b = [0u8; MAX_TRAMPOLINE_LEN];
            // SAFETY: as above: the trampoline's bytes are mapped and readable.
            unsafe { poker.read(f.trampoline, &mut b[..len]) };
            Err(PatchError::BadTrampoline {
                ifunc: Name::new(f.name),
                addr: f.trampoline,
                found: InsnBytes::new(&b[..len]),
            })
        }
    }
}

/// The patch engine, with resolution abstracted: `resolve` is called exactly once per
/// ifunc, in table order, and returns the chosen implementation's address.
///
/// # Safety
///
/// 1. `table` describes this running image (or a loaded module): its sites, trampolines
///    and slots are mapped, its slots are writable data that nothing else writes while
///    this runs, and `exec` is the executable ranges it was validated with.
/// 2. No CPU other than the caller's executes the sites while this runs (boot or module
///    load); live patching uses the architecture's live-patch protocol instead.
/// 3. The trampoline of every imported ifunc is the trampoline of an ifunc the defining
///    image (the kernel) defines, so the slot it jumps through is mapped and readable
///    (the module loader checks imports against the kernel's table when it has one).
pub unsafe fn patch_ifuncs<'t, P: TextPoker + ?Sized>(
    table: &Table<'t>,
    exec: &[Range<u64>],
    poker: &mut P,
    resolve: &mut dyn FnMut(&Ifunc<'t>) -> u64,
) -> Result<InitReport, PatchError> {
    // One copy of the engine per architecture: in each, every `arch.*` call of the
    // per-site loops folds to that architecture's code (a run-time match per call cost
    // about a quarter of the engine's time once a second architecture existed).
    match table.arch() {
        // SAFETY: the caller's preconditions, passed on.
        Arch::X86_64 => unsafe {
            patch_ifuncs_for::<{ crate::arch::ids::X86_64 }, P>(table, exec, poker, resolve)
        },
        // SAFETY: as above.
        Arch::Aarch64 => unsafe {
            patch_ifuncs_for::<{ crate::arch::ids::AARCH64 }, P>(table, exec, poker, resolve)
        },
        // SAFETY: as above.
        Arch::Riscv64 => unsafe {
            patch_ifuncs_for::<{ crate::arch::ids::RISCV64 }, P>(table, exec, poker, resolve)
        },
    }
}

/// [`patch_ifuncs`] for the architecture whose table id is `ID` (the table's).
///
/// # Safety
///
/// As [`patch_ifuncs`]; `table.arch()` is `ID`'s architecture.
unsafe fn patch_ifuncs_for<'t, const ID: u16, P: TextPoker + ?Sized>(
    table: &Table<'t>,
    exec: &[Range<u64>],
    poker: &mut P,
    resolve: &mut dyn FnMut(&Ifunc<'t>) -> u64,
) -> Result<InitReport, PatchError> {
    let arch: Arch = const {
        match Arch::from_id(ID) {
            Some(a) => a,
            None => panic!("not an architecture id"),
        }
    };
    debug_assert!(arch == table.arch());
    // 1. Check what can be checked without the sites: trampolines, then slots.
    // The first CACHED ifuncs' trampolines and, once resolved, targets, on the stack (no
    // allocator): the per-site loop then decodes only the site entries.
    // Each cached ifunc keeps the slot its trampoline was checked to jump through, so
    // later steps never read (and never re-validate) a trampoline again.
    let mut cache = IfuncCache::default();
    for f in table.ifuncs() {
        // SAFETY: forwarded (preconditions 1 and 3); `f` is from `table`.
        let slot = unsafe { check_trampoline(arch, poker, &f, exec)? };
        cache.set_checked(f.index, f.trampoline, slot);
    }
    for f in table.ifuncs() {
        // SAFETY: precondition 1; `f` is from `table`.
        let Some(slot) = (unsafe { Slot::defined(&f) }) else {
            continue;
        };
        let value = slot.slot().read();
        if value != f.default {
            // Sites are reported before slots (a site already aimed at its slot's
            // current value means `init` ran before).
            // SAFETY: forwarded (preconditions 1 and 3).
            unsafe { first_bad_site(arch, table, &cache, poker, exec, 0) }?;
            return Err(PatchError::SlotNotDefault {
                ifunc: Name::new(f.name),
                slot: f.slot,
                value,
            });
        }
    }

    // 2. Resolve each ifunc once, into its slot. An import is already resolved: its
    //    sites go wherever the defining image's slot points now.
    let mut report = InitReport::default();
    for (i, f) in table.ifuncs().enumerate() {
        // SAFETY: precondition 1; `f` is from `table`.
        let own = unsafe { Slot::defined(&f) };
        let addr = match own {
            Some(_) => resolve(&f),
            // SAFETY: forwarded (preconditions 1 and 3); `f` is from `table`.
            None => match unsafe { slot_of(arch, &cache, poker, exec, &f) } {
                Ok(slot) => slot.read(),
                Err(e) => {
                    // Earlier ifuncs' slots are resolved already: keep "no slot
                    // changed on error".
                    restore_slots(table, i);
                    // SAFETY: as above.
                    unsafe { first_bad_site(arch, table, &cache, poker, exec, 0) }?;
                    return Err(e);
                }
            },
        };
        if !in_exec(exec, addr) {
            restore_slots(table, i);
            // SAFETY: as above.
            unsafe { first_bad_site(arch, table, &cache, poker, exec, 0) }?;
            return Err(PatchError::BadResolution {
                ifunc: Name::new(f.name),
                addr,
            });
        }
        if let Some(slot) = own {
            slot.write(addr);
        }
        cache.set_target(f.index, addr);
        report.ifuncs += 1;
    }

    // 3. One pass over the sites: check each one is the original branch to its
    //    trampoline, then rewrite its target field and read that back. No other CPU runs
    //    this text (precondition 2), so checking site N only after sites 0..N-1 are
    //    written is as all-or-nothing as checking every site first: on the first
    //    failure, every site written so far is put back (from its original form, which
    //    the check established) before anything is reported.
    if let Err(error) = poker.begin() {
        restore_slots(table, table.ifunc_count() as usize);
        // SAFETY: as above.
        unsafe { first_bad_site(arch, table, &cache, poker, exec, 0) }?;
        return Err(PatchError::Poke { ifunc: None, error });
    }
    // The entry index of the site where the pass stopped, and why.
    let mut failed = None;
    // The loop keeps nothing of a site but what the next step needs (no `Site` kept for
    // a possible error: that made the compiler spill it to the stack on every site),
    // takes lengths and field offsets from the constant `arch`, and hands anything
    // unusual (an ifunc past the cache, a site that is not the original) to a cold
    // function that decodes the entry again and reports it exactly.
    for s in table.site_walk() {
        let b = branch_of(arch, &s);
        // The trampoline (for the check) and the resolved implementation (for the write)
        // of the site's ifunc, if cached: one bounds check for both.
        let (trampoline, target) = match cache.ifuncs.get(s.ifunc as usize) {
            Some(c) => (Some(c.trampoline), Some(c.target)),
            None => (None, None),
        };
        let original = match trampoline {
            Some(t) => arch.is_original(&b, read_word(poker, b.addr, b.len as usize), t),
            None => false,
        };
        // SAFETY: forwarded (preconditions 1 and 3); `s.index` is a site of `table`.
        if !original && unsafe { check_site(arch, table, &cache, poker, exec, s.index) }.is_err() {
            failed = Some((s.index, Stop::NotOriginal));
            break;
        }
        // Only the target field changes: the other bytes were just checked and are not
        // written, so the field is what is written and read back.
        let target = match target {
            Some(t) => Some(t),
            None => cache.target_uncached(table, poker, exec, s.ifunc),
        };
        let Some(field) = target.and_then(|t| arch.encode_target(&b, t)) else {
            report.sites_out_of_reach += 1;
            if arch.is_relaxed_form(s.kind, s.prefixes) {
                report.relaxed_sites_on_trampoline += 1;
            }
            continue;
        };
        let len = field.len as usize;
        let at = b.addr + arch.target_field(s.kind, s.prefixes).start as u64;
        // SAFETY: the target field lies inside a validated site; precondition 2.
        if let Err(error) = unsafe { poker.write(at, &field.bytes()[..len]) } {
            failed = Some((s.index, Stop::Poke(error)));
            break;
        }
        // The read-back: through the text mapping (`TextPoker::read_word`), which a
        // poker writing through an alias does not otherwise check.
        if read_word(poker, at, len) != field.value {
            failed = Some((s.index, Stop::ReadBack));
            break;
        }
        report.sites_patched += 1;
    }
    if let Some((index, stop)) = failed {
        // SAFETY: forwarded; `index` is the site the pass stopped at.
        return Err(unsafe { roll_back(arch, table, &cache, poker, exec, index, stop) });
    }
    poker.sync_cores();
    poker.end();
    Ok(report)
}

/// The site as the architecture sees it, its length from the constant `arch` (not the
/// one the walk computed with the table's run-time `Arch`, which then goes unused).
#[inline(always)]
fn branch_of(arch: Arch, s: &Site) -> BranchSite {
    BranchSite {
        addr: opaque(s.addr),
        kind: s.kind,
        prefixes: s.prefixes,
        len: arch.site_len(s.kind, s.prefixes) as u8,
    }
}

/// `v`, computed once: the optimizer cannot see through this, so it keeps the value in
/// a register rather than recomputing it from the values it came from wherever it is
/// used (which, for a site's address decoded from its table entry, kept more values
/// alive across the site pass and spilled them to the stack).
#[inline(always)]
fn opaque(mut v: u64) -> u64 {
    // SAFETY: an empty assembly block naming one register as input and output: it
    // executes no instruction and touches no memory, flags or stack.
    unsafe {
        core::arch::asm!("/* {0} */", inout(reg) v, options(pure, nomem, nostack, preserves_flags))
    };
    v
}

/// The slot an ifunc's sites end up at: its own, or for an import (read, never written)
/// the defining image's, which its trampoline jumps through: the one step 1 accepted, or
/// (past the cache) the trampoline checked again.
///
/// # Safety
///
/// As for [`patch_ifuncs`], with `f` from its table.
unsafe fn slot_of<P: TextPoker + ?Sized>(
    arch: Arch,
    cache: &IfuncCache,
    poker: &P,
    exec: &[Range<u64>],
    f: &Ifunc<'_>,
) -> Result<Slot, PatchError> {
    // SAFETY: `f` is from the table, which satisfies precondition 1 (defined ifuncs)
    // and 3 (imports).
    let own = unsafe { Slot::defined(f) };
    match (own, cache.slot(f.index)) {
        (Some(s), _) => Ok(s.slot()),
        (None, Some(s)) => Ok(s),
        // SAFETY: as in `check_trampoline`, which already accepted this trampoline.
        (None, None) => unsafe { check_trampoline(arch, poker, f, exec) },
    }
}

/// Per-ifunc addresses the per-site loops need, for the first [`IfuncCache::LEN`] ifuncs
/// (tables have tens); later ones are decoded from the table each time.
struct IfuncCache {
    ifuncs: [CachedIfunc; IfuncCache::LEN],
    /// The slot step 1 found each trampoline jumping through.
    slots: [Option<Slot>; IfuncCache::LEN],
}

/// What the site pass needs of a cached ifunc.
#[derive(Clone, Copy, Default)]
struct CachedIfunc {
    trampoline: u64,
    /// The resolved implementation (0 before step 2).
    target: u64,
}

impl Default for IfuncCache {
    fn default() -> Self {
        IfuncCache {
            ifuncs: [CachedIfunc::default(); IfuncCache::LEN],
            slots: [None; IfuncCache::LEN],
        }
    }
}

impl IfuncCache {
    const LEN: usize = 64;

    /// Records ifunc `i`'s trampoline and the slot `check_trampoline` returned for it.
    fn set_checked(&mut self, i: u32, trampoline: u64, slot: Slot) {
        if let (Some(c), Some(s)) = (
            self.ifuncs.get_mut(i as usize),
            self.slots.get_mut(i as usize),
        ) {
            c.trampoline = trampoline;
            *s = Some(slot);
        }
    }

    /// The slot step 1 validated for ifunc `i`, if cached.
    fn slot(&self, i: u32) -> Option<Slot> {
        self.slots.get(i as usize).copied().flatten()
    }

    fn set_target(&mut self, i: u32, addr: u64) {
        if let Some(c) = self.ifuncs.get_mut(i as usize) {
            c.target = addr;
        }
    }

    /// The resolved implementation (what the slot holds after step 2) of an ifunc past
    /// the cache; `None` only if the table or a trampoline changed since step 1.
    ///
    /// Safe to call only from `patch_ifuncs` step 3, whose preconditions it relies on.
    #[cold]
    #[inline(never)]
    fn target_uncached<P: TextPoker + ?Sized>(
        &self,
        table: &Table<'_>,
        poker: &P,
        exec: &[Range<u64>],
        i: u32,
    ) -> Option<u64> {
        // The slot of an import is 0 here: it is read through the trampoline.
        let (trampoline, slot) = table.ifunc_trampoline_slot(i)?;
        let slot = if slot != 0 {
            // SAFETY: called from `patch_ifuncs` only, whose precondition 1 covers the
            // slots of the ifuncs its table defines.
            unsafe { Slot::own(slot) }?.slot()
        } else {
            // SAFETY: as above, precondition 3 for an import's trampoline (checked in
            // step 1 to lie in an executable range).
            unsafe { Slot::import(table.arch(), poker, trampoline, exec) }?
        };
        Some(slot.read())
    }
}

/// Puts the default implementation back into the slots of the first `n` ifuncs.
///
/// Called only from `patch_ifuncs`, whose precondition 1 covers the slots.
fn restore_slots(table: &Table<'_>, n: usize) {
    for f in table.ifuncs().take(n) {
        // SAFETY: precondition 1 of `patch_ifuncs` (the only caller); `f` is from `table`.
        if let Some(slot) = unsafe { Slot::defined(&f) } {
            slot.write(f.default);
        }
    }
}

/// Resolves every ifunc of `table` against `features` and patches every site: the
/// boot-time entry point.
///
/// # Safety
///
/// As for [`patch_ifuncs`], and additionally: every resolver address in the table is an
/// `extern "C" fn(u64) -> usize` (what [`crate::ifunc!`] emits), safe to call now.
pub unsafe fn init<'t, P: TextPoker + ?Sized>(
    table: &Table<'t>,
    exec: &[Range<u64>],
    features: &CpuFeatures,
    poker: &mut P,
) -> Result<InitReport, PatchError> {
    let bits = features.bits();
    let mut resolve = |f: &Ifunc<'t>| -> u64 {
        // SAFETY: precondition: the resolver address is an `extern "C" fn(u64) -> usize`
        // (validated to lie in an executable range).
        let r: extern "C" fn(u64) -> usize = unsafe { core::mem::transmute(f.resolver as usize) };
        r(bits) as u64
    };
    // SAFETY: forwarded to the caller.
    unsafe { patch_ifuncs(table, exec, poker, &mut resolve) }
}

#[cfg(test)]
mod tests {
    use super::read_text_word;

    #[test]
    fn read_text_word_reads_exactly_len_bytes_at_any_alignment() {
        let buf: [u8; 24] = core::array::from_fn(|i| 7 * i as u8 + 1);
        for off in 0..8 {
            for len in 0..=8 {
                let want = buf[off..off + len]
                    .iter()
                    .rev()
                    .fold(0u64, |v, &b| v << 8 | u64::from(b));
                // SAFETY: `off + len` ≤ 16, inside `buf`.
                let got = unsafe { read_text_word(buf.as_ptr() as u64 + off as u64, len) };
                assert_eq!(got, want, "offset {off}, {len} bytes");
            }
        }
    }
}
