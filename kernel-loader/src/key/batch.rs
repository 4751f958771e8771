//! The live batch of one key change: every site of the key in every image given, moved
//! between its two forms with the architecture's live-patch protocol (the probe sites'
//! rounds, [`LiveProtocol`]), checked before anything is written and rolled back on a
//! failed write. The same steps as a probe batch (see `crate::probe`): check and trap,
//! publish, the other rounds, wait for CPUs still in the #BP hook.

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use super::{KeyError, StaticKey};
use crate::arch::{LiveProtocol, ProbeSiteRef, RoundPiece};
use crate::format::{KSite, Table};
use crate::name::Name;
use crate::patch::{InsnBytes, PokeError, TextPoker};
use crate::probe::state::{IN_INT3, INT3_DRAIN_WAITS};

/// One batch: the sites of `key` in `images`, written with protocol `A`.
pub(super) struct Batch<'k, A: LiveProtocol, I> {
    /// The key (published for the #BP hook; its address names its sites).
    pub(super) key: &'k StaticKey,
    /// The tables to walk (the registry's live images; a list in tests).
    pub(super) images: I,
    /// What `A`'s encoders take (no key form uses a stub).
    pub(super) stubs: A::Stubs,
    /// The architecture's view of a key site (`arch::*::key::site_ref`).
    pub(super) site_ref: fn(u64, u64) -> ProbeSiteRef,
    pub(super) arch: PhantomData<A>,
}

/// How [`Batch::write_sites`] treats a failed write (as in a probe batch).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Stop at the first failed write (the caller restores).
    Apply,
    /// Go on past failed writes, advance a site to the next round only if it holds the
    /// previous round's piece, read every site back at the end.
    Restore,
}

/// A batch stopped with `error` after writing at most its first `touched` sites.
struct Failed {
    touched: usize,
    error: KeyError,
}

impl<'t, 'a: 't, 'k, A, I> Batch<'k, A, I>
where
    A: LiveProtocol,
    I: Iterator<Item = &'t Table<'a>> + Clone,
{
    /// Every site of the key, image by image, each in address order: one walk over
    /// each table's key descriptors and that key's site entries.
    fn sites(&self) -> impl Iterator<Item = KSite> + use<'t, 'a, A, I> {
        let addr = self.key.addr();
        self.images.clone().flat_map(move |t| {
            (0..t.key_count())
                .filter(move |&i| t.key_object(i) == Some(addr))
                .flat_map(move |i| t.key_sites_of(i))
        })
    }

    /// The site's word in state `enabled`.
    #[inline(always)]
    fn word(&self, s: &KSite, enabled: bool) -> Result<u64, KeyError> {
        A::site_word(
            &(self.site_ref)(s.addr, s.target),
            s.jumps(enabled),
            &self.stubs,
        )
        .map_err(|target| KeyError::OutOfReach {
            site: s.addr,
            target,
        })
    }

    fn name(&self) -> Name {
        Name::new(self.key.name())
    }

    /// Moves every site to state `on`: check and trap (publishing `on` once every site
    /// passed), the other rounds, rollback on a failure, then waits until no CPU is
    /// inside the #BP hook. On an error the old state is published again.
    ///
    /// # Safety
    ///
    /// Every table is a registered (validated, live) image's; `poker` writes live text
    /// safely and serializes every CPU; on an int3 architecture every CPU's #BP reaches
    /// `probe::handle_int3`. The caller holds the registry lock (no other batch runs).
    pub(super) unsafe fn switch<P: TextPoker + ?Sized>(
        &self,
        on: bool,
        poker: &mut P,
    ) -> Result<(), KeyError> {
        poker.begin().map_err(KeyError::Poke)?;
        // SAFETY: forwarded.
        let result = match unsafe { self.forward(on, poker) } {
            Ok(()) => Ok(()),
            Err(Failed { touched: 0, error }) => Err(error),
            Err(Failed { touched, error }) => {
                self.key.publish(!on);
                // SAFETY: as above; puts the sites the batch reached (all checked) back.
                unsafe { self.write_sites(!on, poker, Mode::Restore, touched) }
                    .map_err(|f| f.error)
                    .and(Err(error))
            }
        };
        poker.end();
        if IN_INT3.load(Ordering::Acquire) != 0 {
            INT3_DRAIN_WAITS.fetch_add(1, Ordering::Relaxed);
            while IN_INT3.load(Ordering::Acquire) != 0 {
                core::hint::spin_loop();
            }
        }
        result
    }

    /// Round 0 fused with the check, publish, then the other rounds.
    ///
    /// # Safety
    ///
    /// As for [`Batch::switch`].
    unsafe fn forward<P: TextPoker + ?Sized>(&self, on: bool, poker: &mut P) -> Result<(), Failed> {
        let fail = |touched, error| Err(Failed { touched, error });
        let mut touched = 0;
        for s in self.sites() {
            let (old, new) = match (self.word(&s, !on), self.word(&s, on)) {
                (Ok(old), Ok(new)) => (old, new),
                (Err(e), _) | (_, Err(e)) => return fail(touched, e),
            };
            let found = read_site::<A, P>(poker, s.addr);
            if found != old && !A::is_residue(found, old, new) {
                let error = KeyError::UnexpectedBytes {
                    site: s.addr,
                    key: self.name(),
                    expected: insn::<A>(old),
                    found: insn::<A>(found),
                };
                return fail(touched, error);
            }
            if A::SINGLE_STORE {
                continue;
            }
            touched += 1;
            // SAFETY: a checked site of a live table (this function's precondition).
            if let Err(e) = unsafe { write_piece(poker, s.addr, A::round(0, new)) } {
                return fail(touched, KeyError::Poke(e));
            }
        }
        // Every site checked (and trapped): from here a trapping CPU is emulated into
        // the new state.
        self.key.publish(on);
        if !A::SINGLE_STORE {
            poker.sync_cores();
        }
        // SAFETY: forwarded; every site passed the check.
        unsafe { self.write_sites(on, poker, Mode::Apply, usize::MAX) }
    }

    /// The architecture's rounds over the batch's first `limit` sites (a forward
    /// batch's round 0 was [`Batch::forward`]'s, unless the protocol is single-store).
    ///
    /// # Safety
    ///
    /// As for [`Batch::switch`]; every site was checked.
    unsafe fn write_sites<P: TextPoker + ?Sized>(
        &self,
        on: bool,
        poker: &mut P,
        mode: Mode,
        limit: usize,
    ) -> Result<(), Failed> {
        let first = if mode == Mode::Apply && !A::SINGLE_STORE {
            1
        } else {
            0
        };
        for r in first..A::ROUNDS {
            for s in self.sites().take(limit) {
                let Ok(new) = self.word(&s, on) else {
                    continue;
                };
                if mode == Mode::Restore
                    && r > 0
                    && !A::round(r - 1, new).is_in(read_site::<A, P>(poker, s.addr))
                {
                    continue;
                }
                // SAFETY: inside a checked site; the round's piece keeps it one
                // instruction for every CPU (the protocol).
                let w = unsafe { write_piece(poker, s.addr, A::round(r, new)) };
                if let Err(e) = w
                    && mode == Mode::Apply
                {
                    return Err(Failed {
                        touched: limit,
                        error: KeyError::Poke(e),
                    });
                }
            }
            poker.sync_cores();
        }
        if mode == Mode::Restore {
            for s in self.sites().take(limit) {
                if self.word(&s, on).ok() != Some(read_site::<A, P>(poker, s.addr)) {
                    return Err(Failed {
                        touched: limit,
                        error: KeyError::RollbackIncomplete {
                            site: s.addr,
                            key: self.name(),
                        },
                    });
                }
            }
        }
        Ok(())
    }
}

/// The site's bytes as a word.
#[inline(always)]
pub(super) fn read_site<A: LiveProtocol, P: TextPoker + ?Sized>(poker: &P, addr: u64) -> u64 {
    const { assert!(A::SITE_LEN <= 8) };
    // SAFETY: key sites were validated, when their table was parsed, to lie in the
    // image's executable ranges, which the poker can read.
    unsafe { poker.read_word(addr, A::SITE_LEN) }
}

/// An error's view of a site word.
pub(super) fn insn<A: LiveProtocol>(w: u64) -> InsnBytes {
    InsnBytes::from_word(w, A::SITE_LEN)
}

/// Writes a round's piece at `site`.
///
/// # Safety
///
/// As for [`TextPoker::write`]: `site` is a validated key site, the piece one the
/// protocol allows now.
#[inline(always)]
unsafe fn write_piece<P: TextPoker + ?Sized>(
    poker: &mut P,
    site: u64,
    piece: RoundPiece,
) -> Result<(), PokeError> {
    let b = piece.bytes.to_le_bytes();
    // SAFETY: forwarded; the piece lies inside the site.
    unsafe { poker.write(site + piece.offset, &b[..piece.len.min(b.len())]) }
}
