//! The kernel's `TextPoker`s.
//!
//! * [`WpPoker`] writes text while CR0.WP is clear on this CPU, the way FreeBSD/amd64
//!   patches at boot: the text mapping itself stays read-only, and WP is set again in
//!   `end`. It serializes only this CPU, so it is for boot patching before the APs
//!   start (the ifunc call sites).
//! * [`AliasPoker`] never touches CR0.WP and never makes text writable: each write maps
//!   the target's physical frame(s) at the *poke window* ([`paging::POKE_WINDOW`]),
//!   writable + NX, writes there, unmaps the window and flushes that TLB entry
//!   (`invlpg`), then reads the bytes back through the executable mapping.
//!   `sync_cores` serializes every online CPU ([`smp::sync_all_cores`]). It is used
//!   for all live probe patching. It writes any 4 KiB-mapped page, the kernel's text
//!   or a module's in the arena ([`crate::arena`]). While the alias is mapped it checks
//!   from the page tables that kernel text stays read-only + executable (any other
//!   target page: never writable and executable at once) and the alias writable + NX,
//!   and once per batch it scans every mapping for W^X ([`paging::wx_scan`]); every
//!   finding is counted in [`ALIAS_STATS`].

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use kernel_loader::patch::{PokeError, PokeFailure, TextPoker};

use crate::{cpu, paging, smp};

/// Writes with CR0.WP clear; counts writes; can be told to fail the Nth write.
#[derive(Debug, Default)]
pub struct WpPoker {
    /// Writes done.
    pub writes: usize,
    /// `sync_cores` calls.
    pub syncs: usize,
    /// Fail the write with this index (0-based), once.
    pub fail_at: Option<usize>,
}

/// Every text write any poker made, for tests that count them.
pub static TOTAL_WRITES: AtomicUsize = AtomicUsize::new(0);

impl TextPoker for WpPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        paging::set_write_protect(false);
        Ok(())
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at == Some(self.writes) {
            self.fail_at = None;
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: the engine only writes inside validated sites in mapped text, and
            // CR0.WP is clear (begin), so the read-only mapping accepts the write.
            unsafe { core::ptr::write_volatile((addr as usize + i) as *mut u8, b) };
        }
        self.writes += 1;
        TOTAL_WRITES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.syncs += 1;
        cpu::serialize();
    }

    fn end(&mut self) {
        paging::set_write_protect(true);
    }
}

/// What every [`AliasPoker`] did and found, since boot.
#[derive(Debug)]
pub struct AliasStats {
    /// Writes through the poke window.
    pub writes: AtomicU64,
    /// Page-table checks made while the window was mapped (text page and alias).
    pub checks: AtomicU64,
    /// Full W^X scans of the page tables made while the window was mapped.
    pub scans: AtomicU64,
    /// Checks or scans that found a text page writable, an executable page writable,
    /// an alias that is executable or read-only or maps another frame, or CR0.WP clear.
    pub violations: AtomicU64,
    /// Address of the first violation.
    pub first_violation: AtomicU64,
}

/// See [`AliasStats`].
pub static ALIAS_STATS: AliasStats = AliasStats {
    writes: AtomicU64::new(0),
    checks: AtomicU64::new(0),
    scans: AtomicU64::new(0),
    violations: AtomicU64::new(0),
    first_violation: AtomicU64::new(0),
};

impl AliasStats {
    fn violation(&self, addr: u64) {
        self.violations.fetch_add(1, Ordering::SeqCst);
        let _ = self.first_violation.compare_exchange(
            0,
            addr.max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

/// The poke window has one user at a time.
static WINDOW_BUSY: AtomicBool = AtomicBool::new(false);

/// Writes text through a writable, NX alias of its frames; text stays read-only and
/// executable on every CPU throughout. Counts writes and syncs; can be told to fail
/// the Nth write.
#[derive(Debug, Default)]
pub struct AliasPoker {
    /// Writes done.
    pub writes: usize,
    /// `sync_cores` calls.
    pub syncs: usize,
    /// Fail the write with this index (0-based), once.
    pub fail_at: Option<usize>,
    /// With `fail_at`: keep failing every write from then on.
    pub fail_forever: bool,
    /// A full W^X scan is due at the next write (set by `begin`).
    scan_due: bool,
}

impl AliasPoker {
    /// A poker whose write number `n` (0-based) fails, once.
    pub fn failing_at(n: usize) -> AliasPoker {
        AliasPoker {
            fail_at: Some(n),
            ..AliasPoker::default()
        }
    }

    /// Writes `bytes` (all inside the 4 KiB page of `addr`) through the window.
    ///
    /// # Safety
    ///
    /// As for [`TextPoker::write`]; the caller owns the window.
    unsafe fn write_in_page(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        let err = |reason| PokeError::new(addr, reason);
        let page = addr & !(paging::PAGE_SIZE - 1);
        let text = paging::translate(page).ok_or(err(PokeFailure::NotMapped))?;
        if text.size != paging::PAGE_SIZE {
            return Err(err(PokeFailure::LargePage));
        }
        // SAFETY: the caller owns the window; the frame is the text page's own, and
        // only `bytes` at its offset are written below.
        let window = unsafe { paging::map_poke_window(0, text.phys & !(paging::PAGE_SIZE - 1)) };
        // While the alias exists: the text mapping is still read-only + executable,
        // the alias is writable + NX onto the same frame, CR0.WP is set.
        let alias = paging::translate(window);
        let text_now = paging::translate(page);
        ALIAS_STATS.checks.fetch_add(1, Ordering::Relaxed);
        // Kernel text must stay read-only + executable; any other page (module text in
        // the arena, which may still be writable + NX while a module loads) must
        // simply never be writable and executable at once.
        let kernel_text = paging::text_range().contains(&page);
        let target_ok = |t: paging::PageInfo| {
            if kernel_text {
                !t.writable && t.executable
            } else {
                !(t.writable && t.executable)
            }
        };
        let ok = text_now.is_some_and(target_ok)
            && alias.is_some_and(|a| {
                a.writable && (!a.executable || !cpu::nx_enabled()) && a.phys == text.phys
            })
            && paging::write_protect_enabled();
        if !ok {
            ALIAS_STATS.violation(addr);
        }
        if self.scan_due {
            self.scan_due = false;
            ALIAS_STATS.scans.fetch_add(1, Ordering::Relaxed);
            let r = paging::wx_scan();
            if r.violations != 0 {
                ALIAS_STATS.violation(r.first.unwrap_or(window));
            }
        }
        let offset = addr - page;
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: the window maps the text frame writable; `offset + i` stays in
            // the page (the caller splits at page boundaries).
            unsafe { core::ptr::write_volatile((window + offset + i as u64) as *mut u8, b) };
        }
        paging::unmap_poke_window();
        ALIAS_STATS.writes.fetch_add(1, Ordering::Relaxed);
        // Read back through the executable mapping.
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: text is mapped readable.
            let got = unsafe { core::ptr::read_volatile((addr as usize + i) as *const u8) };
            if got != b {
                return Err(err(PokeFailure::ReadBack));
            }
        }
        Ok(())
    }
}

impl TextPoker for AliasPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.scan_due = true;
        Ok(())
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at == Some(self.writes) {
            if !self.fail_forever {
                self.fail_at = None;
            }
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        if WINDOW_BUSY.swap(true, Ordering::Acquire) {
            return Err(PokeError::new(addr, PokeFailure::Busy));
        }
        let mut r = Ok(());
        let mut done = 0usize;
        while done < bytes.len() && r.is_ok() {
            let at = addr + done as u64;
            let room = (paging::PAGE_SIZE - at % paging::PAGE_SIZE) as usize;
            let n = room.min(bytes.len() - done);
            // SAFETY: forwarded from the engine's contract; the window is ours (busy).
            r = unsafe { self.write_in_page(at, &bytes[done..done + n]) };
            done += n;
        }
        WINDOW_BUSY.store(false, Ordering::Release);
        r?;
        self.writes += 1;
        TOTAL_WRITES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.syncs += 1;
        smp::sync_all_cores();
    }

    fn end(&mut self) {
        // Nothing to undo: the window is unmapped after every write, and text was
        // never writable.
    }
}
