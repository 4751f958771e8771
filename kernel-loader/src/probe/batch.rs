//! The batched live-patch protocol: moving every site of one probe between its disabled
//! and enabled bytes while other CPUs may run them (the protocol is described in the
//! [module docs](super); its per-architecture rounds come from
//! `arch::native::probe`), and rolling a failed batch back with the same routine.

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use super::dispatch;
use super::state::{IN_INT3, INT3_DRAIN_WAITS, ProbeState};
use super::{ProbeError, ProbeId};
use crate::arch::native::probe::{self as arch, Live as Native, SiteBytes, SiteWord, Stubs};
use crate::arch::{LiveProtocol, RoundPiece};
use crate::format::{PSite, Table};
use crate::patch::{InsnBytes, PokeError, TextPoker};

/// The bytes a site holds in state `on`, in this image.
#[inline(always)]
pub fn site_bytes(s: &PSite, on: bool) -> Result<SiteBytes, ProbeError> {
    site_bytes_with(s, on, &dispatch::this_image_stubs())
}

/// The bytes a site holds in state `on`, with the given stub addresses.
///
/// Every form is **one** instruction in both states, so a CPU stopped at any point of
/// the live-patch protocol resumes at an instruction boundary.
#[inline(always)]
pub fn site_bytes_with(s: &PSite, on: bool, stubs: &Stubs) -> Result<SiteBytes, ProbeError> {
    site_word::<Native>(s, on, stubs).map(arch::bytes_of)
}

/// [`site_bytes_with`] as a word (what the batch loops compare and write), for
/// protocol `A`.
#[inline(always)]
fn site_word<A: LiveProtocol>(
    s: &PSite,
    on: bool,
    stubs: &A::Stubs,
) -> Result<SiteWord, ProbeError> {
    A::site_word(&s.arch_ref(), on, stubs).map_err(|target| ProbeError::OutOfReach {
        site: s.addr,
        target,
    })
}

/// The bytes at a probe site, as a word ([`TextPoker::read_word`]: one or two loads with
/// a poker that reads text directly, never a byte-filled buffer loaded back as a word,
/// which would stall store forwarding on every site of a batch).
#[inline(always)]
fn read_site<A: LiveProtocol, P: TextPoker + ?Sized>(poker: &P, addr: u64) -> SiteWord {
    const { assert!(A::SITE_LEN <= 8) };
    // SAFETY: probe sites were validated, when their table was parsed, to lie in the
    // image's executable ranges, which the poker can read.
    unsafe { poker.read_word(addr, A::SITE_LEN) }
}

/// An error's view of a site word.
fn insn<A: LiveProtocol>(w: SiteWord) -> InsnBytes {
    InsnBytes::from_word(w, A::SITE_LEN)
}

/// Checks every probe site of `table` holds its disabled form.
pub(super) fn check_disabled<P: TextPoker + ?Sized>(
    table: &Table<'_>,
    poker: &P,
) -> Result<(), ProbeError> {
    let stubs = dispatch::this_image_stubs();
    for s in table.probe_sites() {
        let want = site_word::<Native>(&s, false, &stubs)?;
        let found = read_site::<Native, P>(poker, s.addr);
        if found != want {
            return Err(ProbeError::UnexpectedBytes {
                site: s.addr,
                probe: ProbeId(s.probe),
                expected: insn::<Native>(want),
                found: insn::<Native>(found),
            });
        }
    }
    Ok(())
}

/// Moves every site of probe `id` (`local`, its index in `t`; `st`, its state) to
/// state `on`: steps 1 to 4 of the protocol, rolling back on a failed write. The caller
/// holds the registry lock and has checked the probe is not already in state `on`.
///
/// # Safety
///
/// As for [`super::enable`]; `t` is the live table of the probe's image.
pub(super) unsafe fn switch<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    local: ProbeId,
    id: ProbeId,
    st: &ProbeState,
    on: bool,
    poker: &mut P,
) -> Result<(), ProbeError> {
    let b = Batch::<Native> {
        t,
        local,
        id,
        stubs: dispatch::this_image_stubs(),
        arch: PhantomData,
    };
    // SAFETY: forwarded.
    unsafe { b.switch(st, on, poker) }
}

impl<A: LiveProtocol> Batch<'_, '_, A> {
    /// [`switch`] with protocol `A` (the native one in a kernel; any in tests).
    ///
    /// # Safety
    ///
    /// As for [`switch`].
    unsafe fn switch<P: TextPoker + ?Sized>(
        &self,
        st: &ProbeState,
        on: bool,
        poker: &mut P,
    ) -> Result<(), ProbeError> {
        let b = self;
        poker.begin().map_err(ProbeError::Poke)?;
        // 1. The first round fused with the check: every site must hold exactly the other
        //    state's bytes (or the residue of an interrupted batch), and its new bytes must
        //    encode, before its trap is written; a site that fails stops the batch, and the
        //    sites already trapped are put back. Until every site passed, the old state
        //    stays published, so a CPU trapping on a site is emulated into the instruction
        //    still there (only its first byte changed), and a failed check never shows a
        //    handler the new state.
        // 2. Then the new state is published (before the round's serialization): from
        //    there on a trapping CPU is emulated into it.
        // 3. The other rounds.
        // (With the architecture's single-store protocol, `A::SINGLE_STORE`: step 1 only
        // checks, writing nothing, and step 3 is the one round: a store per site, then one
        // `sync_cores`. A site written before a later write fails is rolled back the same
        // way; a CPU may have run its new instruction meanwhile, as the state was published.)
        // SAFETY: the sites are validated probe sites of the live table `t`; the #BP hook
        // covers CPUs that run them mid-patch (precondition of `enable`/`disable`).
        // (Two copies, `on` a constant in each: the per-site encoding then has one form to
        // pick from instead of two.)
        let result = if on {
            // SAFETY: as above.
            unsafe { b.forward(true, st, poker) }
        } else {
            // SAFETY: as above.
            unsafe { b.forward(false, st, poker) }
        };
        let result = match result {
            Ok(()) => Ok(()),
            Err(Failed { touched: 0, error }) => Err(error),
            Err(Failed { touched, error }) => {
                st.enabled.store(!on, Ordering::SeqCst);
                // SAFETY: as above; puts the sites the batch reached (all checked) back into
                // the old state.
                unsafe { b.write_sites(!on, poker, Mode::Restore, touched) }
                    .map_err(|f| f.error)
                    .and(Err(error))
            }
        };
        poker.end();
        // 4. Wait until no CPU is still emulating a site of the old batch, and, after a
        //    disable, until no CPU still runs the handler.
        if IN_INT3.load(Ordering::Acquire) != 0 {
            INT3_DRAIN_WAITS.fetch_add(1, Ordering::Relaxed);
            while IN_INT3.load(Ordering::Acquire) != 0 {
                core::hint::spin_loop();
            }
        }
        if !on || result.is_err() {
            st.drain();
        }
        result
    }
}

/// How [`Batch::write_sites`] treats a failed write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A forward batch: stop at the first failed write (the caller then restores).
    Apply,
    /// A rollback: go on past failed writes, advance a site to the next round only if
    /// it holds what the previous round wrote (so a site is never left with one state's
    /// first byte and the other's tail), and read every site back at the end. A site
    /// left holding the trap still behaves correctly: the #BP hook emulates the
    /// restored state, and the next batch accepts the residue.
    Restore,
}

/// Writes a round's piece at the site at `site`.
///
/// # Safety
///
/// As for [`TextPoker::write`]: `site` is a validated probe site, and the piece one the
/// protocol allows now.
#[inline(always)]
unsafe fn write_piece<P: TextPoker + ?Sized>(
    poker: &mut P,
    site: u64,
    piece: RoundPiece,
) -> Result<(), PokeError> {
    let b = piece.bytes.to_le_bytes();
    // SAFETY: forwarded; the piece lies inside the site (`arch::round`).
    unsafe { poker.write(site + piece.offset, &b[..piece.len.min(b.len())]) }
}

/// A batch stopped: `error`, after writing at most the probe's sites before table entry
/// `touched` (a [`PSite::index`]; 0: it wrote nothing).
struct Failed {
    touched: u32,
    error: ProbeError,
}

/// One batch: the sites of probe `id` (`local`, its index in `t`), encoded with `stubs`
/// and written with protocol `A`.
struct Batch<'t, 'a, A: LiveProtocol> {
    t: &'t Table<'a>,
    local: ProbeId,
    id: ProbeId,
    stubs: A::Stubs,
    arch: PhantomData<A>,
}

impl<A: LiveProtocol> Batch<'_, '_, A> {
    /// The rounds of a forward batch: [`Batch::check_and_trap`], then the other rounds.
    ///
    /// # Safety
    ///
    /// As for [`Batch::write_sites`].
    #[inline(always)]
    unsafe fn forward<P: TextPoker + ?Sized>(
        &self,
        on: bool,
        st: &ProbeState,
        poker: &mut P,
    ) -> Result<(), Failed> {
        // SAFETY: forwarded.
        unsafe { self.check_and_trap(on, st, poker) }?;
        // SAFETY: forwarded; every site was checked and trapped.
        unsafe { self.write_sites(on, poker, Mode::Apply, u32::MAX) }
    }

    /// Round 0 of a forward batch, fused with its check (one walk over the sites instead of
    /// two): for each site of the batch, in table order, checks
    /// it holds the old state's bytes or a residue and that its new bytes encode, then
    /// writes its round-0 piece; then publishes state `on` in `st` and serializes every
    /// CPU. On failure (nothing published), returns the table entry before which it may
    /// have written (every site before it checked). With [`LiveProtocol::SINGLE_STORE`] it only
    /// checks and publishes: nothing is written, and there is nothing to serialize.
    ///
    /// # Safety
    ///
    /// As for [`Batch::write_sites`].
    #[inline(always)]
    unsafe fn check_and_trap<P: TextPoker + ?Sized>(
        &self,
        on: bool,
        st: &ProbeState,
        poker: &mut P,
    ) -> Result<(), Failed> {
        let stubs = &self.stubs;
        let fail = |touched, error| Err(Failed { touched, error });
        // The table entry after the last site written (0: none).
        let mut touched = 0;
        for s in self.t.probe_sites_of(self.local.0) {
            let (old, new) = match (
                site_word::<A>(&s, !on, stubs),
                site_word::<A>(&s, on, stubs),
            ) {
                (Ok(old), Ok(new)) => (old, new),
                (Err(e), _) | (_, Err(e)) => return fail(touched, e),
            };
            let found = read_site::<A, P>(poker, s.addr);
            // A failed batch whose rollback could not finish may have left a residue
            // (`arch::is_residue`): safe to rewrite.
            if found != old && !A::is_residue(found, old, new) {
                let error = ProbeError::UnexpectedBytes {
                    site: s.addr,
                    probe: self.id,
                    expected: insn::<A>(old),
                    found: insn::<A>(found),
                };
                return fail(touched, error);
            }
            if A::SINGLE_STORE {
                continue;
            }
            touched = s.index + 1;
            let piece = A::round(0, new);
            // SAFETY: as in `Batch::write_sites`.
            if let Err(e) = unsafe { write_piece(poker, s.addr, piece) } {
                return fail(touched, ProbeError::Poke(e));
            }
        }
        // Every site checked and trapped: publish the new state. The serialization below
        // makes every CPU see it before any operand byte changes.
        st.enabled.store(on, Ordering::SeqCst);
        if !A::SINGLE_STORE {
            poker.sync_cores();
        }
        Ok(())
    }

    /// Moves the batch's sites (those before table entry `limit`) to state `on` with the architecture's rounds (for each round: write its piece
    /// of every site, then serialize every CPU): one routine for a batch (whose round 0
    /// [`Batch::check_and_trap`] did) and for its rollback (`mode`). A batch returns the first
    /// failure; a rollback returns [`ProbeError::RollbackIncomplete`] for the first site it
    /// could not restore.
    ///
    /// # Safety
    ///
    /// As for [`super::enable`]; every site of the batch is a validated probe site, and
    /// for a batch every site passed [`Batch::check_and_trap`].
    #[inline(always)]
    unsafe fn write_sites<P: TextPoker + ?Sized>(
        &self,
        on: bool,
        poker: &mut P,
        mode: Mode,
        limit: u32,
    ) -> Result<(), Failed> {
        let stubs = &self.stubs;
        let sites = || self.t.probe_sites_of(self.local.0).until(limit);
        // A forward batch's round 0 was `check_and_trap`'s, unless it only checked.
        let first = if mode == Mode::Apply && !A::SINGLE_STORE {
            1
        } else {
            0
        };
        for r in first..A::ROUNDS {
            for s in sites() {
                let new = match mode {
                    // `check_and_trap` encoded every site's new bytes: the same again.
                    Mode::Apply => A::site_word_again(&s.arch_ref(), on, stubs),
                    // A rollback skips the sites it cannot encode.
                    Mode::Restore => match site_word::<A>(&s, on, stubs) {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                };
                if mode == Mode::Restore
                    && r > 0
                    && !A::round(r - 1, new).is_in(read_site::<A, P>(poker, s.addr))
                {
                    continue;
                }
                let piece = A::round(r, new);
                // SAFETY: inside a validated site (this function's precondition); the
                // round's piece keeps the site one instruction for every CPU (see
                // `arch::round`).
                let w = unsafe { write_piece(poker, s.addr, piece) };
                if let Err(e) = w
                    && mode == Mode::Apply
                {
                    return Err(Failed {
                        touched: limit,
                        error: ProbeError::Poke(e),
                    });
                }
            }
            poker.sync_cores();
        }
        if mode == Mode::Restore {
            for s in sites() {
                if site_word::<A>(&s, on, stubs).ok() != Some(read_site::<A, P>(poker, s.addr)) {
                    return Err(Failed {
                        touched: limit,
                        error: ProbeError::RollbackIncomplete {
                            site: s.addr,
                            probe: self.id,
                        },
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod drain_tests {
    use super::super::dispatch::fire;
    use super::super::{ProbeId, disable, enable, lookup, register_module, unregister_module};
    use crate::format::Table;
    use crate::format::{ARCH_X86_64, HEADER_SIZE, Header, MAGIC, ProbeDesc, SubTable, VERSION};
    use crate::patch::{PokeError, TextPoker};
    use core::sync::atomic::{AtomicU64, Ordering};
    use std::sync::atomic::AtomicBool;
    use std::vec::Vec;

    /// A table with one probe `t:x` and no sites (fired directly through `fire`).
    fn one_probe_table() -> &'static [u8] {
        let strings = b"t\0x\0";
        let probes = HEADER_SIZE as u32;
        let strs = probes + crate::format::PROBE_DESC_SIZE as u32;
        let total = strs + strings.len() as u32;
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            arch: ARCH_X86_64,
            flags: 0,
            header_size: HEADER_SIZE as u32,
            total_size: total,
            ifuncs: SubTable {
                offset: probes,
                count: 0,
            },
            ifunc_sites: SubTable {
                offset: probes,
                count: 0,
            },
            probes: SubTable {
                offset: probes,
                count: 1,
            },
            probe_sites: SubTable {
                offset: strs,
                count: 0,
            },
            strings: SubTable {
                offset: strs,
                count: strings.len() as u32,
            },
            keys: SubTable::default(),
            key_sites: SubTable::default(),
        };
        let d = ProbeDesc {
            provider: 0,
            name: 2,
            nargs: 0,
            flags: 0,
        };
        let mut v: Vec<u8> = Vec::new();
        v.extend_from_slice(&h.to_bytes());
        v.extend_from_slice(&d.to_bytes());
        v.extend_from_slice(strings);
        // 8-aligned, as tables are.
        let words: Vec<u64> = v
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        let words: &'static [u64] = std::boxed::Box::leak(words.into_boxed_slice());
        // SAFETY: `words` is leaked, so it lives forever; u64 → u8 reinterpretation.
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), v.len()) }
    }

    struct NoSites;
    impl TextPoker for NoSites {
        unsafe fn write(&mut self, addr: u64, _: &[u8]) -> Result<(), PokeError> {
            Err(PokeError::new(addr, crate::patch::PokeFailure::Injected))
        }
        fn sync_cores(&mut self) {}
        fn end(&mut self) {}
    }

    static INSIDE: AtomicBool = AtomicBool::new(false);
    static ENTERED: AtomicU64 = AtomicU64::new(0);
    static LEFT: AtomicU64 = AtomicU64::new(0);

    fn slow(_: ProbeId, _: &[u64; 6]) {
        ENTERED.fetch_add(1, Ordering::SeqCst);
        INSIDE.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        INSIDE.store(false, Ordering::SeqCst);
        LEFT.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn disable_waits_for_cpus_still_in_the_handler() {
        let bytes = one_probe_table();
        let base = bytes.as_ptr() as u64;
        let t = Table::parse(bytes, base, &[]).unwrap();
        // SAFETY: the table is leaked (lives forever); it has no sites.
        let h = unsafe { register_module(t, base..base + bytes.len() as u64, &NoSites) }.unwrap();
        super::super::trap::route_for_tests();
        let id = ProbeId(h.base());
        // SAFETY: no sites: nothing is written.
        unsafe { enable(id, slow, &mut NoSites) }.unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let firer = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                fire(id.0, &[0; 6]);
            }
        });
        for _ in 0..10 {
            while !INSIDE.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            // A handler is running: disable must not return before it has left.
            // SAFETY: as above.
            unsafe { disable(id, &mut NoSites) }.unwrap();
            assert!(
                !INSIDE.load(Ordering::SeqCst),
                "disable returned mid-handler"
            );
            assert_eq!(ENTERED.load(Ordering::SeqCst), LEFT.load(Ordering::SeqCst));
            // SAFETY: as above.
            unsafe { enable(id, slow, &mut NoSites) }.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        firer.join().unwrap();
        // SAFETY: as above.
        unsafe { unregister_module(&h, 0..0, &mut NoSites) }.unwrap();
        assert!(lookup("t:x").is_none());
    }
}

#[cfg(test)]
mod fused_check_tests {
    use super::super::{
        ProbeError, disable, enable, is_enabled, register_module, unregister_module,
    };
    use super::site_bytes;
    use crate::format::{ProbeKind, Table, test_table};
    use crate::patch::{PokeError, TextPoker};
    use std::vec::Vec;

    /// Writes memory directly, counting writes and whether probe `watch` was ever
    /// published enabled during one.
    #[derive(Default)]
    struct Mem {
        writes: usize,
        watch: Option<super::ProbeId>,
        saw_enabled: bool,
    }
    impl TextPoker for Mem {
        unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
            self.writes += 1;
            self.saw_enabled |= self.watch.is_some_and(is_enabled);
            // SAFETY: the test's text buffer, which nothing executes.
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
            Ok(())
        }
        fn sync_cores(&mut self) {}
        fn end(&mut self) {}
    }

    fn handler(_: super::ProbeId, _: &[u64; 6]) {}

    /// The check is fused with the first write round: a site that fails it, after
    /// earlier sites got their trap, leaves every site as it was.
    #[test]
    fn a_failed_check_puts_back_the_sites_already_trapped() {
        const N: u64 = 6;
        let text: &'static mut [u64] =
            std::boxed::Box::leak(std::vec![0u64; 16].into_boxed_slice());
        let t0 = text.as_ptr() as u64;
        // SAFETY: reinterpreting the leaked u64 buffer as bytes.
        let bytes = unsafe { core::slice::from_raw_parts_mut(t0 as *mut u8, 128) };
        let sites: Vec<_> = (0..N)
            .map(|i| (t0 + 8 * i, t0 + 8 * i + 5, ProbeKind::RustJmp, 0))
            .collect();
        let table_words: &'static mut [u64] =
            std::boxed::Box::leak(std::vec![0u64; 64].into_boxed_slice());
        let base = table_words.as_ptr() as u64;
        let tb = test_table::probe_table(base, 1, &sites);
        // SAFETY: the leaked table buffer, as bytes.
        let tbytes = unsafe { core::slice::from_raw_parts_mut(base as *mut u8, 512) };
        tbytes[..tb.len()].copy_from_slice(&tb);
        let exec: Vec<_> = core::iter::once(t0..t0 + 128).collect();
        let t = Table::parse(&tbytes[..tb.len()], base, &exec).unwrap();
        let form = |on: bool| -> Vec<u8> {
            let mut v = std::vec![0; 8 * N as usize];
            for s in t.probe_sites() {
                let at = (s.addr - t0) as usize;
                v[at..at + 5].copy_from_slice(&site_bytes(&s, on).unwrap());
            }
            v
        };
        bytes[..8 * N as usize].copy_from_slice(&form(false));
        // SAFETY: the table is leaked.
        let h = unsafe { register_module(t, t0..t0 + 128, &Mem::default()) }.unwrap();
        super::super::trap::route_for_tests();
        let id = super::ProbeId(h.base());
        let snapshot = |b: &[u8]| b[..8 * N as usize].to_vec();

        // Site 3 holds something else: sites 0..3 were trapped, then put back.
        bytes[8 * 3 + 2] = 0x99;
        let before = snapshot(bytes);
        let mut p = Mem {
            watch: Some(id),
            ..Mem::default()
        };
        // SAFETY: the sites are in the test's buffer, which nothing executes.
        let r = unsafe { enable(id, handler, &mut p) };
        assert!(
            matches!(r, Err(ProbeError::UnexpectedBytes { site, .. }) if site == t0 + 24),
            "{r:?}"
        );
        assert_eq!(snapshot(bytes), before);
        assert!(
            p.writes >= 3,
            "sites 0..3 were trapped and restored: {}",
            p.writes
        );
        assert!(!is_enabled(id));
        // The state is published only once every site passed: a CPU trapping on a
        // site of the failed batch never saw the probe enabled.
        assert!(!p.saw_enabled, "a failed check published the new state");

        // The first site wrong: nothing written at all.
        bytes[..8 * N as usize].copy_from_slice(&form(false));
        bytes[1] = 0x99;
        let before = snapshot(bytes);
        let mut p = Mem::default();
        // SAFETY: as above.
        let r = unsafe { enable(id, handler, &mut p) };
        assert!(
            matches!(r, Err(ProbeError::UnexpectedBytes { .. })),
            "{r:?}"
        );
        assert_eq!((snapshot(bytes), p.writes), (before, 0));

        // Repaired: a whole batch each way (published before the operand round).
        bytes[..8 * N as usize].copy_from_slice(&form(false));
        let mut p = Mem {
            watch: Some(id),
            ..Mem::default()
        };
        // SAFETY: as above.
        unsafe { enable(id, handler, &mut p) }.unwrap();
        assert!(p.saw_enabled);
        assert_eq!(snapshot(bytes), form(true));
        // SAFETY: as above.
        unsafe { disable(id, &mut Mem::default()) }.unwrap();
        assert_eq!(snapshot(bytes), form(false));
        // SAFETY: as above.
        unsafe { unregister_module(&h, 0..0, &mut Mem::default()) }.unwrap();
    }
}

/// The generic batch with a single-store protocol (aarch64's, riscv64's), on any host:
/// over a buffer nothing executes, with a poker that counts writes and synchronisation
/// rounds. One test module per architecture: `$arch` names its `crate::arch` module,
/// `$id` its table id, `$foreign` a word that is none of its probe forms.
#[cfg(test)]
macro_rules! single_store_tests {
    ($name:ident, $arch:ident, $id:ident, $foreign:expr) => {
        mod $name {
            use super::*;
            use crate::arch::$arch::probe::{Live as Proto, Stubs as ArchStubs, site_word as arch_word};
            use crate::arch::ids;
            use crate::format::{ProbeKind, test_table};
            use std::vec::Vec;

            /// Writes memory directly (one aligned 4-byte store per write), with an optional
            /// one-shot failure, counting writes and rounds.
            #[derive(Default)]
            struct Mem {
                writes: usize,
                syncs: usize,
                fail_at: Option<u64>,
            }
            impl TextPoker for Mem {
                unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
                    if self.fail_at == Some(addr) {
                        self.fail_at = None;
                        return Err(PokeError::new(addr, crate::patch::PokeFailure::Injected));
                    }
                    assert_eq!((bytes.len(), addr % 4), (4, 0), "one aligned store");
                    self.writes += 1;
                    let w = u32::from_le_bytes(bytes.try_into().unwrap());
                    // SAFETY: a site in the test's leaked buffer, which nothing executes;
                    // 4-aligned (checked above).
                    unsafe { core::ptr::write_volatile(addr as *mut u32, w) };
                    Ok(())
                }
                fn sync_cores(&mut self) {
                    self.syncs += 1;
                }
                fn end(&mut self) {}
            }

            const KINDS: [ProbeKind; 6] = [
                ProbeKind::RustJmp,
                ProbeKind::CCall,
                ProbeKind::CTail,
                ProbeKind::CEnabled,
                ProbeKind::CEnabledTail,
                ProbeKind::RustEnabled,
            ];
            const N: u64 = 12;

            /// A leaked text buffer holding `N` probe sites of probe 0 (every kind), a
            /// table of the architecture for them, and stubs inside the buffer.
            fn setup() -> (&'static mut [u32], Table<'static>, ArchStubs) {
                let text: &'static mut [u32] =
                    std::boxed::Box::leak(std::vec![0u32; 256].into_boxed_slice());
                let t0 = text.as_ptr() as u64;
                let sites: Vec<_> = (0..N)
                    .map(|i| (t0 + 8 * i, t0 + 0x200 + 8 * i, KINDS[i as usize % 6], 0))
                    .collect();
                let words: &'static mut [u64] =
                    std::boxed::Box::leak(std::vec![0u64; 64].into_boxed_slice());
                let base = words.as_ptr() as u64;
                let tb = test_table::probe_table_for(ids::$id, base, 1, &sites);
                // SAFETY: the leaked table buffer, as bytes (512 of them).
                let tbytes = unsafe { core::slice::from_raw_parts_mut(base as *mut u8, 512) };
                tbytes[..tb.len()].copy_from_slice(&tb);
                let exec: Vec<_> = core::iter::once(t0..t0 + 1024).collect();
                let t = Table::parse(&tbytes[..tb.len()], base, &exec).unwrap();
                let stubs = ArchStubs {
                    c_entry: t0 + 0x300,
                    ret0: t0 + 0x308,
                    ret1: t0 + 0x310,
                };
                for s in t.probe_sites() {
                    text[((s.addr - t0) / 4) as usize] =
                        arch_word(&s.arch_ref(), false, &stubs).unwrap() as u32;
                }
                (text, t, stubs)
            }

            fn form(t: &Table<'_>, stubs: &ArchStubs, on: bool) -> Vec<u32> {
                t.probe_sites()
                    .map(|s| arch_word(&s.arch_ref(), on, stubs).unwrap() as u32)
                    .collect()
            }

            fn sites_now(text: &[u32]) -> Vec<u32> {
                (0..N as usize).map(|i| text[2 * i]).collect()
            }

            #[test]
            fn one_store_per_site_and_one_round_per_batch() {
                let (text, t, stubs) = setup();
                let st = ProbeState::new();
                let b = Batch::<Proto> {
                    t: &t,
                    local: ProbeId(0),
                    id: ProbeId(0),
                    stubs,
                    arch: PhantomData,
                };
                assert_ne!(form(&t, &stubs, true), form(&t, &stubs, false));
                let mut p = Mem::default();
                // SAFETY: the sites are in the test's buffer, which nothing executes.
                unsafe { b.switch(&st, true, &mut p) }.unwrap();
                assert_eq!(sites_now(text), form(&t, &stubs, true));
                assert!(st.enabled.load(Ordering::SeqCst));
                assert_eq!((p.writes, p.syncs), (N as usize, 1), "one round per batch");
                let mut p = Mem::default();
                // SAFETY: as above.
                unsafe { b.switch(&st, false, &mut p) }.unwrap();
                assert_eq!(sites_now(text), form(&t, &stubs, false));
                assert!(!st.enabled.load(Ordering::SeqCst));
                assert_eq!((p.writes, p.syncs), (N as usize, 1));
            }

            #[test]
            fn a_failed_check_writes_nothing_and_a_failed_store_rolls_back() {
                let (text, t, stubs) = setup();
                let t0 = text.as_ptr() as u64;
                let st = ProbeState::new();
                let b = Batch::<Proto> {
                    t: &t,
                    local: ProbeId(0),
                    id: ProbeId(0),
                    stubs,
                    arch: PhantomData,
                };
                let off = form(&t, &stubs, false);
                // Site 5 holds something else: every site is checked before any is written.
                text[10] = $foreign;
                let mut p = Mem::default();
                // SAFETY: as above.
                let r = unsafe { b.switch(&st, true, &mut p) };
                assert!(
                    matches!(r, Err(ProbeError::UnexpectedBytes { site, .. }) if site == t0 + 40),
                    "{r:?}"
                );
                assert_eq!((p.writes, p.syncs), (0, 0));
                assert!(!st.enabled.load(Ordering::SeqCst));
                text[10] = off[5];
                // The store at site 7 fails: sites 0..7 were written, then every site is put
                // back, in one round.
                let mut p = Mem {
                    fail_at: Some(t0 + 56),
                    ..Mem::default()
                };
                // SAFETY: as above.
                let r = unsafe { b.switch(&st, true, &mut p) };
                assert!(
                    matches!(r, Err(ProbeError::Poke(e)) if e.addr == t0 + 56),
                    "{r:?}"
                );
                assert_eq!(sites_now(text), off);
                assert!(!st.enabled.load(Ordering::SeqCst));
                assert_eq!((p.writes, p.syncs), (7 + N as usize, 1));
                // And the next batch goes through.
                // SAFETY: as above.
                unsafe { b.switch(&st, true, &mut Mem::default()) }.unwrap();
                assert_eq!(sites_now(text), form(&t, &stubs, true));
            }
        }
    };
}

#[cfg(test)]
single_store_tests!(single_store_tests, aarch64, AARCH64, 0xd65f_03c0); // ret
#[cfg(test)]
single_store_tests!(riscv64_single_store_tests, riscv64, RISCV64, 0x0000_0073); // ecall
