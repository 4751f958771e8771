//! The site pass's failure paths (cold): the exact check of one site, and the rollback
//! that puts back every site written before reporting the error.

use core::ops::Range;

use super::{
    IfuncCache, PatchError, PokeError, PokeFailure, TextPoker, read_site, restore_slots, slot_of,
};
use crate::arch::Arch;
use crate::format::{Ifunc, Site, Table};
use crate::name::Name;

/// The check of the site at table entry `index`, decoded again, when the fast path did
/// not accept it: its ifunc is past the cache, or it is not the original branch (then
/// the error says exactly what it is; [`PatchError::AlreadyPatched`] compares with the
/// slot's current value, so report it with the slots at their defaults).
///
/// # Safety
///
/// As for [`patch_ifuncs`](super::patch_ifuncs).
#[cold]
#[inline(never)]
pub(super) unsafe fn check_site<P: TextPoker + ?Sized>(
    arch: Arch,
    table: &Table<'_>,
    cache: &IfuncCache,
    poker: &P,
    exec: &[Range<u64>],
    index: u32,
) -> Result<(), PatchError> {
    // The walk yields only entries that decode, which `site` decodes the same way.
    let Some(s) = table.site(index) else {
        return Ok(());
    };
    let found = read_site(poker, &s);
    let f = ifunc_of(table, &s);
    let b = s.branch();
    let ok = arch.expected_original(&b, &found, f.trampoline);
    let opcode_ok = arch.has_branch_opcode(&b, found.as_slice());
    match ok {
        Some(exp) if opcode_ok && exp == found => Ok(()),
        _ => {
            // (Without a descriptor, which a validated table always has, there is no
            // slot to read: the trampoline stands in and the site is unexpected.)
            let current = match table.ifunc(s.ifunc) {
                // SAFETY: forwarded; `f` is from `table`.
                Some(f) => unsafe { slot_of(arch, cache, poker, exec, &f) }?.read(),
                None => f.trampoline,
            };
            if opcode_ok
                && current != f.trampoline
                && arch.decode_branch_target(&b, found.as_slice()) == Some(current)
            {
                return Err(PatchError::AlreadyPatched {
                    site: s.addr,
                    ifunc: Name::new(f.name),
                });
            }
            let Some(expected) = ok else {
                return Err(PatchError::TrampolineOutOfReach {
                    site: s.addr,
                    ifunc: Name::new(f.name),
                    trampoline: f.trampoline,
                });
            };
            Err(PatchError::UnexpectedSiteBytes {
                site: s.addr,
                ifunc: Name::new(f.name),
                expected,
                found,
            })
        }
    }
}

/// Why the site pass of [`patch_ifuncs`](super::patch_ifuncs) stopped at a site.
#[derive(Clone, Copy)]
pub(super) enum Stop {
    /// The site is not the original branch to its trampoline: nothing was written to it.
    NotOriginal,
    /// The poker failed writing its target field (maybe after writing part of it).
    Poke(PokeError),
    /// The field was written but did not read back as written.
    ReadBack,
}

/// The first site, from table entry `from` on, that is not the original branch to its
/// ifunc's trampoline, as the error [`check_site`] reports for it.
///
/// # Safety
///
/// As for [`patch_ifuncs`](super::patch_ifuncs).
#[cold]
#[inline(never)]
pub(super) unsafe fn first_bad_site<P: TextPoker + ?Sized>(
    arch: Arch,
    table: &Table<'_>,
    cache: &IfuncCache,
    poker: &P,
    exec: &[Range<u64>],
    from: u32,
) -> Result<(), PatchError> {
    for i in from..table.site_count() {
        // SAFETY: forwarded; `i` is an entry of `table`.
        unsafe { check_site(arch, table, cache, poker, exec, i) }?;
    }
    Ok(())
}

/// The site pass stopped at the site at table entry `index`: puts back, last first,
/// every site written so far (for `Stop::Poke` and `Stop::ReadBack` the failed one
/// included, which may hold part of its new field), reading each back, then every slot.
/// Returns the error to report: [`PatchError::RollbackIncomplete`] if a site could not be
/// restored; else the error of the first site that is not the original (what checking
/// every site before writing any would have reported); else the poker's or the
/// read-back's.
///
/// # Safety
///
/// As for [`patch_ifuncs`](super::patch_ifuncs), called between `poker.begin()` and `poker.end()` (which
/// this calls), with every site before `index` checked to have been the original.
#[cold]
#[inline(never)]
pub(super) unsafe fn roll_back<P: TextPoker + ?Sized>(
    arch: Arch,
    table: &Table<'_>,
    cache: &IfuncCache,
    poker: &mut P,
    exec: &[Range<u64>],
    index: u32,
    stop: Stop,
) -> PatchError {
    let written = match stop {
        Stop::NotOriginal => index,
        Stop::Poke(_) | Stop::ReadBack => index + 1,
    };
    // Each site written was checked to be the original before its write, and only its
    // target field changed since: the original is its current prefix and opcode bytes
    // with the field aimed at the trampoline again.
    let mut incomplete = None;
    for s in (0..written).rev().filter_map(|i| table.site(i)) {
        let f = ifunc_of(table, &s);
        let current = read_site(poker, &s);
        let Some(orig) = arch.encode_branch(&s.branch(), &current, f.trampoline) else {
            continue;
        };
        if current == orig {
            // Not written (its implementation was out of reach), or put back already.
            continue;
        }
        let field = s.target_field_offsets();
        // SAFETY: as in the site pass; restoring the original bytes it checked.
        let w = unsafe { poker.write(s.target_field().start, &orig.as_slice()[field]) };
        if w.is_err() || read_site(poker, &s) != orig {
            incomplete = Some(PatchError::RollbackIncomplete {
                site: s.addr,
                ifunc: Name::new(f.name),
            });
        }
    }
    poker.sync_cores();
    poker.end();
    restore_slots(table, table.ifunc_count() as usize);
    if let Some(e) = incomplete {
        // (Set last by the lowest site: the first in table order that failed.)
        return e;
    }
    // With every slot back at its default, as when the sites were checked before
    // resolution: the same error for the same site.
    let from = match stop {
        Stop::NotOriginal => index,
        Stop::Poke(_) | Stop::ReadBack => index + 1,
    };
    // SAFETY: forwarded.
    if let Err(e) = unsafe { first_bad_site(arch, table, cache, poker, exec, from) } {
        return e;
    }
    let s = table.site(index);
    let ifunc = s.as_ref().map(|s| Name::new(ifunc_of(table, s).name));
    match (stop, s) {
        (Stop::Poke(error), _) => PatchError::Poke { ifunc, error },
        (Stop::ReadBack, Some(s)) => PatchError::VerifyFailed {
            site: s.addr,
            ifunc: Name::new(ifunc_of(table, &s).name),
        },
        // Not reached: a site that is not the original has an error above, and `index`
        // is an entry the pass decoded.
        (Stop::NotOriginal | Stop::ReadBack, _) => PatchError::Poke {
            ifunc,
            error: PokeError::new(0, PokeFailure::ReadBack),
        },
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
