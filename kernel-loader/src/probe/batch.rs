//! The batched live-patch protocol: moving every site of one probe between its disabled
//! and enabled bytes while other CPUs may run them (the protocol is described in the
//! [module docs](super); its per-architecture rounds come from
//! `arch::native::probe`), and rolling a failed batch back with the same routine.

use core::sync::atomic::Ordering;

use super::dispatch;
use super::state::{IN_INT3, INT3_DRAIN_WAITS, ProbeState};
use super::{ProbeError, ProbeId};
use crate::arch::native::probe::{self as arch, ROUNDS, SITE_LEN, SiteBytes, Stubs};
use crate::format::{PSite, Table};
use crate::patch::{InsnBytes, TextPoker};

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
    arch::site_bytes(&s.arch_ref(), on, stubs).map_err(|e| ProbeError::OutOfReach {
        site: s.addr,
        target: e.target,
    })
}

/// The bytes at a probe site, read one byte per `read` and assembled in a register
/// (reading a byte-filled buffer back as a word would stall store forwarding on every
/// site of a batch).
#[inline(always)]
fn read_site<P: TextPoker + ?Sized>(poker: &P, addr: u64) -> SiteBytes {
    const { assert!(SITE_LEN <= 8) };
    let mut v = 0u64;
    for i in 0..SITE_LEN as u64 {
        let mut b = [0u8; 1];
        // SAFETY: probe sites were validated, when their table was parsed, to lie in
        // the image's executable ranges, which the poker can read.
        unsafe { poker.read(addr + i, &mut b) };
        v |= u64::from(b[0]) << (8 * i);
    }
    let b = v.to_le_bytes();
    core::array::from_fn(|i| b[i])
}

/// The sites of one probe, in address order: an index loop over the table without
/// closures, so the batch loops inline it.
struct SitesOf<'t, 'a> {
    table: &'t Table<'a>,
    probe: u32,
    next: u32,
}

impl<'t, 'a> SitesOf<'t, 'a> {
    #[inline]
    fn new(table: &'t Table<'a>, id: ProbeId) -> Self {
        SitesOf {
            table,
            probe: id.0,
            next: 0,
        }
    }
}

impl Iterator for SitesOf<'_, '_> {
    type Item = PSite;

    #[inline(always)]
    fn next(&mut self) -> Option<PSite> {
        while self.next < self.table.probe_site_count() {
            let i = self.next;
            self.next += 1;
            if let Some(s) = self.table.probe_site(i)
                && s.probe == self.probe
            {
                return Some(s);
            }
        }
        None
    }
}

/// Checks every probe site of `table` holds its disabled form.
pub(super) fn check_disabled<P: TextPoker + ?Sized>(
    table: &Table<'_>,
    poker: &P,
) -> Result<(), ProbeError> {
    for s in table.probe_sites() {
        let want = site_bytes(&s, false)?;
        let found = read_site(poker, s.addr);
        if found != want {
            return Err(ProbeError::UnexpectedBytes {
                site: s.addr,
                probe: ProbeId(s.probe),
                expected: InsnBytes::new(&want),
                found: InsnBytes::new(&found),
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
    // 1. Every site must hold exactly the other state's bytes (or the residue of an
    //    interrupted batch), and the new bytes must be encodable, before anything is
    //    written.
    for s in SitesOf::new(t, local) {
        let old = site_bytes(&s, !on)?;
        let new = site_bytes(&s, on)?;
        let found = read_site(poker, s.addr);
        // A failed batch whose rollback could not finish may have left a residue
        // (`arch::is_residue`): safe to rewrite.
        if found != old && !arch::is_residue(&found, &old, &new) {
            return Err(ProbeError::UnexpectedBytes {
                site: s.addr,
                probe: id,
                expected: InsnBytes::new(&old),
                found: InsnBytes::new(&found),
            });
        }
    }
    // 2. Publish the new state: from here on, a trapping CPU is emulated into it.
    st.enabled.store(on, Ordering::SeqCst);
    if let Err(e) = poker.begin() {
        st.enabled.store(!on, Ordering::SeqCst);
        return Err(ProbeError::Poke(e));
    }
    // 3. The rounds.
    // SAFETY: the sites are validated probe sites of the live table `t`; the #BP hook
    // covers CPUs that run them mid-patch (precondition of `enable`/`disable`).
    let result = match unsafe { write_sites(t, local, id, on, poker, Mode::Apply) } {
        Ok(()) => Ok(()),
        Err(e) => {
            st.enabled.store(!on, Ordering::SeqCst);
            // SAFETY: as above; puts the same sites back into the old state.
            unsafe { write_sites(t, local, id, !on, poker, Mode::Restore) }.and(Err(e))
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

/// How [`write_sites`] treats a failed write.
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

/// Moves every site of probe `id` (`local`, its index in `t`) to state `on` with the
/// architecture's rounds (for each round: write its piece of every site, then serialize
/// every CPU): one routine for a batch and for its rollback (`mode`). A batch returns
/// the first failure; a rollback returns [`ProbeError::RollbackIncomplete`] for the
/// first site it could not restore.
///
/// # Safety
///
/// As for [`super::enable`]; every site of `id` in `t` is a validated probe site.
#[inline(always)]
unsafe fn write_sites<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    local: ProbeId,
    id: ProbeId,
    on: bool,
    poker: &mut P,
    mode: Mode,
) -> Result<(), ProbeError> {
    let sites = || SitesOf::new(t, local);
    for r in 0..ROUNDS {
        // A forward batch checked every site's new bytes encode before writing (see
        // `switch`), so a round that does not read them skips the encoding; a rollback
        // still encodes, to skip the sites it could not encode, as before.
        let encode = mode == Mode::Restore || arch::round_uses_new(r);
        for s in sites() {
            let new = if encode {
                match site_bytes(&s, on) {
                    Ok(b) => b,
                    Err(_) if mode == Mode::Restore => continue,
                    Err(e) => return Err(e),
                }
            } else {
                // Unread by this round.
                [0; SITE_LEN]
            };
            if mode == Mode::Restore && r > 0 {
                let (off, prev) = arch::round(r - 1, &new);
                let off = off as usize;
                if read_site(poker, s.addr)[off..off + prev.len()] != *prev {
                    continue;
                }
            }
            let (off, bytes) = arch::round(r, &new);
            // SAFETY: inside a validated site (this function's precondition); the
            // round's piece keeps the site one instruction for every CPU (see
            // `arch::round`).
            let w = unsafe { poker.write(s.addr + off, bytes) };
            if let Err(e) = w
                && mode == Mode::Apply
            {
                return Err(ProbeError::Poke(e));
            }
        }
        poker.sync_cores();
    }
    if mode == Mode::Restore {
        for s in sites() {
            if site_bytes(&s, on).ok() != Some(read_site(poker, s.addr)) {
                return Err(ProbeError::RollbackIncomplete {
                    site: s.addr,
                    probe: id,
                });
            }
        }
    }
    Ok(())
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
