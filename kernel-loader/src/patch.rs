//! Boot-time patching of ifunc call sites.
//!
//! [`init`] runs each ifunc's resolver exactly once, stores the result in the ifunc's
//! slot, and rewrites the rel32 of every recorded `call`/`jmp`/`jcc` so it targets the
//! chosen implementation directly. It is all-or-nothing: every byte is checked before the
//! first write, and if anything fails after writing began, every site and slot is put
//! back the way it was.
//!
//! The kernel owns the hardware side through [`TextPoker`] (how to write text, how to
//! make every CPU serialize); this module owns the protocol.

use core::fmt;
use core::ops::Range;

use crate::CpuFeatures;
use crate::arch::x86_64::{self as x86, JMP_RIP_INDIRECT, TRAMPOLINE_LEN};
use crate::format::{FormatError, Ifunc, Site, Table};

/// A failed text write, as reported by a [`TextPoker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PokeError {
    /// Address of the write that failed.
    pub addr: u64,
    /// Why.
    pub reason: &'static str,
}

impl fmt::Display for PokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "text write at {:#x} failed: {}", self.addr, self.reason)
    }
}

/// How the kernel writes to its text. The patch engine calls `begin`, any number of
/// `write`s, `sync_cores`, then `end`.
pub trait TextPoker {
    /// Prepares for writes (map a writable alias, or clear CR0.WP on the boot CPU).
    fn begin(&mut self) -> Result<(), PokeError> {
        Ok(())
    }

    /// Writes `bytes` at `addr`.
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

    /// Makes every CPU that may execute the patched text execute a serializing
    /// instruction (on one CPU at boot: just this one).
    fn sync_cores(&mut self);

    /// Writing is over: text must be read-only again when this returns.
    fn end(&mut self);
}

/// Up to eight instruction bytes, for error messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InsnBytes {
    len: u8,
    bytes: [u8; 8],
}

impl InsnBytes {
    /// Up to the first eight bytes of `src`.
    pub fn new(src: &[u8]) -> InsnBytes {
        let mut bytes = [0u8; 8];
        let len = src.len().min(8);
        bytes[..len].copy_from_slice(&src[..len]);
        InsnBytes {
            len: len as u8,
            bytes,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why patching failed. Whenever this is returned, no site and no slot is changed, except
/// with [`PatchError::RollbackIncomplete`], which names the site that could not be
/// restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError<'a> {
    /// The table is invalid.
    Format(FormatError),
    /// A site does not hold the original branch to its ifunc's trampoline.
    UnexpectedSiteBytes {
        /// Site address.
        site: u64,
        /// The ifunc it should call.
        ifunc: &'a str,
        /// The bytes the engine expected.
        expected: InsnBytes,
        /// The bytes it found.
        found: InsnBytes,
    },
    /// A site already branches to its ifunc's resolved implementation: `init` ran before.
    AlreadyPatched {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: &'a str,
    },
    /// A trampoline is not `jmp [rip+slot]` through its own slot.
    BadTrampoline {
        /// The ifunc.
        ifunc: &'a str,
        /// Trampoline address.
        addr: u64,
        /// The bytes found there.
        found: InsnBytes,
    },
    /// A slot no longer holds the default implementation (already resolved, or
    /// overwritten).
    SlotNotDefault {
        /// The ifunc.
        ifunc: &'a str,
        /// Slot address.
        slot: u64,
        /// Value found.
        value: u64,
    },
    /// A resolver returned null or an address outside every executable range.
    BadResolution {
        /// The ifunc.
        ifunc: &'a str,
        /// What it returned.
        addr: u64,
    },
    /// The kernel's poker failed.
    Poke {
        /// The ifunc whose site was being written (empty for `begin`).
        ifunc: &'a str,
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
        ifunc: &'a str,
    },
    /// A site read back differently from what was written.
    VerifyFailed {
        /// Site address.
        site: u64,
        /// The ifunc.
        ifunc: &'a str,
    },
}

impl fmt::Display for PatchError<'_> {
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
            PatchError::AlreadyPatched { site, ifunc } => write!(
                f,
                "site {site:#x} ({ifunc}) already calls the resolved implementation: init ran twice"
            ),
            PatchError::BadTrampoline { ifunc, addr, found } => write!(
                f,
                "trampoline of {ifunc} at {addr:#x} is not `jmp [rip+slot]` through its slot: [{found}]"
            ),
            PatchError::SlotNotDefault { ifunc, slot, value } => write!(
                f,
                "slot of {ifunc} at {slot:#x} holds {value:#x}, not the default implementation (already resolved?)"
            ),
            PatchError::BadResolution { ifunc, addr } => write!(
                f,
                "resolver of {ifunc} returned {addr:#x}, which is not in an executable range"
            ),
            PatchError::Poke { ifunc, error } => {
                if ifunc.is_empty() {
                    write!(f, "{error}")
                } else {
                    write!(f, "patching {ifunc}: {error}")
                }
            }
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
impl std::error::Error for PatchError<'_> {}

impl From<FormatError> for PatchError<'_> {
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
    /// Sites left on the trampoline because the implementation is out of rel32 reach.
    pub sites_out_of_reach: u32,
}

fn in_exec(exec: &[Range<u64>], addr: u64) -> bool {
    addr != 0 && exec.iter().any(|r| r.contains(&addr))
}

/// The bytes a site holds when its rel32 targets `target`, given the current prefix and
/// opcode bytes. `None` if `target` is out of reach.
fn site_bytes(site: &Site, current: &InsnBytes, target: u64) -> Option<InsnBytes> {
    let rel = x86::rel32(site.end(), target)?;
    let mut b = *current;
    let at = site.len() - 4;
    b.bytes[at..at + 4].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

fn read_site<P: TextPoker + ?Sized>(poker: &P, site: &Site) -> InsnBytes {
    let len = site.len().min(8);
    InsnBytes {
        len: len as u8,
        bytes: read_word(poker, site.addr, len).to_le_bytes(),
    }
}

/// Reads `len` (≤ 8) bytes of text at `addr` into a little-endian `u64`, one byte per
/// `read`: assembled in a register, it avoids the store-forwarding stall of reading a
/// byte-filled buffer back as a word (the engine's hot path reads every site).
#[inline(always)]
fn read_word<P: TextPoker + ?Sized>(poker: &P, addr: u64, len: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..len.min(8) {
        let mut b = [0u8; 1];
        // SAFETY: callers pass a range inside a validated site, which lies in an
        // executable range the kernel declared mapped.
        unsafe { poker.read(addr + i as u64, &mut b) };
        v |= u64::from(b[0]) << (8 * i);
    }
    v
}

/// Whether the site's bytes `v` (`site.len()` of them, little-endian) are exactly an
/// unpatched site: valid prefixes, the opcode of its kind, and a rel32 that reaches
/// `trampoline` (the fast path of the check pass; on `false` the engine works out which
/// error to report).
#[inline(always)]
fn is_original(site: &Site, v: u64, trampoline: u64) -> bool {
    let p = site.prefixes as usize;
    let byte = |i: usize| (v >> (8 * i)) as u8;
    if site.len() > 8 || !(0..p).all(|i| x86::is_branch_prefix(byte(i))) {
        return false;
    }
    let opcode_ok = match site.kind {
        crate::format::SiteKind::Call => byte(p) == x86::CALL_REL32,
        crate::format::SiteKind::Jmp => byte(p) == x86::JMP_REL32,
        crate::format::SiteKind::Jcc => {
            byte(p) == x86::TWO_BYTE_ESCAPE && byte(p + 1) & 0xf0 == 0x80
        }
    };
    let rel = (v >> (8 * (site.len() - 4))) as u32 as i32;
    opcode_ok && x86::rel32(site.end(), trampoline) == Some(rel)
}

/// The bytes an unpatched site must hold: valid prefixes, the opcode of its kind, and a
/// rel32 that reaches `trampoline`.
fn expected_original(site: &Site, found: &InsnBytes, trampoline: u64) -> Option<InsnBytes> {
    let p = site.prefixes as usize;
    let mut exp = site_bytes(site, found, trampoline)?;
    // Normalise prefix/opcode bytes we expect, so the error shows what was wanted.
    for b in &mut exp.bytes[..p] {
        if !x86::is_branch_prefix(*b) {
            *b = 0x3e;
        }
    }
    match site.kind {
        crate::format::SiteKind::Call => exp.bytes[p] = x86::CALL_REL32,
        crate::format::SiteKind::Jmp => exp.bytes[p] = x86::JMP_REL32,
        crate::format::SiteKind::Jcc => {
            exp.bytes[p] = x86::TWO_BYTE_ESCAPE;
            if exp.bytes[p + 1] & 0xf0 != 0x80 {
                exp.bytes[p + 1] = 0x85;
            }
        }
    }
    Some(exp)
}

fn read_slot(slot: u64) -> u64 {
    // SAFETY: the table was validated (slot 8-aligned, outside text), and the caller of
    // `init`/`patch_ifuncs` guarantees the table describes live memory of this image.
    unsafe { core::ptr::read_volatile(slot as usize as *const u64) }
}

fn write_slot(slot: u64, value: u64) {
    // SAFETY: as in `read_slot`; slots live in writable data and nothing else writes
    // them while the engine runs (boot, single writer).
    unsafe { core::ptr::write_volatile(slot as usize as *mut u64, value) }
}

/// Checks a trampoline: `ff 25 disp32` whose target is the ifunc's slot (for an
/// import, any slot: the defining image's). Returns the slot it jumps through.
fn check_trampoline<'t, P: TextPoker + ?Sized>(
    poker: &P,
    f: &Ifunc<'t>,
) -> Result<u64, PatchError<'t>> {
    match trampoline_slot(poker, f.trampoline) {
        Some(slot) if f.imported || slot == f.slot => Ok(slot),
        _ => {
            let mut b = [0u8; TRAMPOLINE_LEN];
            // SAFETY: as in `trampoline_slot`.
            unsafe { poker.read(f.trampoline, &mut b) };
            Err(PatchError::BadTrampoline {
                ifunc: f.name,
                addr: f.trampoline,
                found: InsnBytes::new(&b),
            })
        }
    }
}

/// The slot a `jmp [rip+disp32]` trampoline at `addr` jumps through, or `None` if the
/// bytes there are not that instruction (or the slot would be misaligned).
fn trampoline_slot<P: TextPoker + ?Sized>(poker: &P, addr: u64) -> Option<u64> {
    let mut b = [0u8; TRAMPOLINE_LEN];
    // SAFETY: trampoline addresses were validated to lie, with all 6 bytes, in an
    // executable range (the image's, or for an import the defining image's).
    unsafe { poker.read(addr, &mut b) };
    let disp = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let slot = (addr + TRAMPOLINE_LEN as u64).checked_add_signed(i64::from(disp))?;
    (b[..2] == JMP_RIP_INDIRECT && slot.is_multiple_of(8) && slot != 0).then_some(slot)
}

/// The patch engine, with resolution abstracted: `resolve` is called exactly once per
/// ifunc, in table order, and returns the chosen implementation's address.
///
/// # Safety
///
/// 1. `table` describes this running image (or a loaded module): its sites, trampolines
///    and slots are mapped, and `exec` is the executable ranges it was validated with.
/// 2. No CPU other than the caller's executes the sites while this runs (boot or module
///    load); live patching uses the int3 protocol instead.
pub unsafe fn patch_ifuncs<'t, P: TextPoker + ?Sized>(
    table: &Table<'t>,
    exec: &[Range<u64>],
    poker: &mut P,
    resolve: &mut dyn FnMut(&Ifunc<'t>) -> u64,
) -> Result<InitReport, PatchError<'t>> {
    // 1. Check everything before anything is written: trampolines, then sites (a site
    //    already aimed at its slot's current value means `init` ran before), then slots.
    // The first CACHED ifuncs' trampolines and, once resolved, targets, on the stack (no
    // allocator): the per-site loops then decode only the site entries.
    let mut cache = IfuncCache::default();
    for f in table.ifuncs() {
        check_trampoline(poker, &f)?;
        cache.set_trampoline(f.index, f.trampoline);
    }
    // An import's slot belongs to the image that defines it: it is read, never written.
    let slot_of = |f: &Ifunc<'t>| {
        if f.imported {
            trampoline_slot(poker, f.trampoline).unwrap_or(0)
        } else {
            f.slot
        }
    };
    // Index loops (not `table.sites()`): the engine's hot paths, kept inlinable.
    for i in 0..table.site_count() {
        let Some(s) = table.site(i) else { continue };
        if let Some(trampoline) = cache.trampoline(table, s.ifunc)
            && is_original(&s, read_word(poker, s.addr, s.len()), trampoline)
        {
            continue;
        }
        let found = read_site(poker, &s);
        let f = ifunc_of(table, &s);
        let ok = expected_original(&s, &found, f.trampoline);
        let prefixes_ok = found.as_slice()[..s.prefixes as usize]
            .iter()
            .all(|&b| x86::is_branch_prefix(b));
        let opcode_ok = x86::opcode_matches(s.kind, &found.as_slice()[s.prefixes as usize..]);
        match ok {
            Some(exp) if prefixes_ok && opcode_ok && exp == found => {}
            _ => {
                let current = read_slot(slot_of(&f));
                if prefixes_ok
                    && opcode_ok
                    && current != f.trampoline
                    && site_bytes(&s, &found, current) == Some(found)
                {
                    return Err(PatchError::AlreadyPatched {
                        site: s.addr,
                        ifunc: f.name,
                    });
                }
                return Err(PatchError::UnexpectedSiteBytes {
                    site: s.addr,
                    ifunc: f.name,
                    expected: ok.unwrap_or(found),
                    found,
                });
            }
        }
    }
    for f in table.ifuncs().filter(|f| !f.imported) {
        let value = read_slot(f.slot);
        if value != f.default {
            return Err(PatchError::SlotNotDefault {
                ifunc: f.name,
                slot: f.slot,
                value,
            });
        }
    }

    // 2. Resolve each ifunc once, into its slot. An import is already resolved: its
    //    sites go wherever the defining image's slot points now.
    let mut report = InitReport::default();
    for (i, f) in table.ifuncs().enumerate() {
        let addr = if f.imported {
            read_slot(slot_of(&f))
        } else {
            resolve(&f)
        };
        if !in_exec(exec, addr) {
            restore_slots(table, i);
            return Err(PatchError::BadResolution {
                ifunc: f.name,
                addr,
            });
        }
        if !f.imported {
            write_slot(f.slot, addr);
        }
        cache.set_target(f.index, addr);
        report.ifuncs += 1;
    }

    // 3. Rewrite every site's rel32 to the chosen implementation.
    if let Err(error) = poker.begin() {
        restore_slots(table, table.ifunc_count() as usize);
        return Err(PatchError::Poke { ifunc: "", error });
    }
    let mut failed = None;
    for i in 0..table.site_count() {
        let Some(s) = table.site(i) else { continue };
        // The ifunc's name is decoded only for an error.
        // Only the rel32 changes: the prefix and opcode bytes were checked in step 1 and
        // are not written, so the rel32 is what is written and read back.
        let Some(rel) = x86::rel32(s.end(), cache.target(table, poker, s.ifunc)) else {
            report.sites_out_of_reach += 1;
            continue;
        };
        let rel = rel.to_le_bytes();
        let at = s.rel32_addr();
        // SAFETY: the rel32 field lies inside a validated site; precondition 2.
        if let Err(error) = unsafe { poker.write(at, &rel) } {
            // The failed write may have changed part of the rel32: restore this site too.
            failed = Some((
                s.index + 1,
                PatchError::Poke {
                    ifunc: ifunc_of(table, &s).name,
                    error,
                },
            ));
            break;
        }
        if read_word(poker, at, 4) != u64::from(u32::from_le_bytes(rel)) {
            failed = Some((
                s.index + 1,
                PatchError::VerifyFailed {
                    site: s.addr,
                    ifunc: ifunc_of(table, &s).name,
                },
            ));
            break;
        }
        report.sites_patched += 1;
    }
    if let Some((touched, err)) = failed {
        // Put back every site touched so far (the failed one included), then read each
        // back: the original bytes were checked in step 1, so they are known exactly.
        let mut incomplete = None;
        for s in table.sites().take(touched as usize) {
            let f = ifunc_of(table, &s);
            let current = read_site(poker, &s);
            let Some(orig) = site_bytes(&s, &current, f.trampoline) else {
                continue;
            };
            // SAFETY: as above; restoring the original bytes the check pass saw.
            let w = unsafe { poker.write(s.rel32_addr(), &orig.as_slice()[s.len() - 4..]) };
            if (w.is_err() || read_site(poker, &s) != orig) && incomplete.is_none() {
                incomplete = Some(PatchError::RollbackIncomplete {
                    site: s.addr,
                    ifunc: f.name,
                });
            }
        }
        poker.sync_cores();
        poker.end();
        restore_slots(table, table.ifunc_count() as usize);
        return Err(incomplete.unwrap_or(err));
    }
    poker.sync_cores();
    poker.end();
    Ok(report)
}

/// Per-ifunc addresses the per-site loops need, for the first [`IfuncCache::LEN`] ifuncs
/// (tables have tens); later ones are decoded from the table each time.
struct IfuncCache {
    trampolines: [u64; IfuncCache::LEN],
    targets: [u64; IfuncCache::LEN],
}

impl Default for IfuncCache {
    fn default() -> Self {
        IfuncCache {
            trampolines: [0; IfuncCache::LEN],
            targets: [0; IfuncCache::LEN],
        }
    }
}

impl IfuncCache {
    const LEN: usize = 64;

    fn set_trampoline(&mut self, i: u32, addr: u64) {
        if let Some(t) = self.trampolines.get_mut(i as usize) {
            *t = addr;
        }
    }

    fn set_target(&mut self, i: u32, addr: u64) {
        if let Some(t) = self.targets.get_mut(i as usize) {
            *t = addr;
        }
    }

    #[inline(always)]
    fn trampoline(&self, table: &Table<'_>, i: u32) -> Option<u64> {
        match self.trampolines.get(i as usize) {
            Some(&t) => Some(t),
            None => table.ifunc_trampoline_slot(i).map(|(t, _)| t),
        }
    }

    /// The resolved implementation (what the slot holds after step 2).
    #[inline(always)]
    fn target<P: TextPoker + ?Sized>(&self, table: &Table<'_>, poker: &P, i: u32) -> u64 {
        match self.targets.get(i as usize) {
            Some(&t) => t,
            None => match table.ifunc_trampoline_slot(i) {
                // An import: read through the trampoline to the defining image's slot.
                Some((t, 0)) => trampoline_slot(poker, t).map_or(0, read_slot),
                Some((_, slot)) => read_slot(slot),
                None => 0,
            },
        }
    }
}

fn ifunc_of<'t>(table: &Table<'t>, s: &Site) -> Ifunc<'t> {
    // Validated in `Table::parse`: the index is in range and the descriptor decodes.
    table.ifunc(s.ifunc).unwrap_or(Ifunc {
        index: s.ifunc,
        name: "?",
        trampoline: 0,
        slot: 0,
        resolver: 0,
        default: 0,
        imported: false,
    })
}

fn restore_slots(table: &Table<'_>, n: usize) {
    for f in table.ifuncs().take(n).filter(|f| !f.imported) {
        write_slot(f.slot, f.default);
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
) -> Result<InitReport, PatchError<'t>> {
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
