//! The kernel's `TextPoker`s.
//!
//! [`WpPoker`] writes text while CR0.WP is clear on this CPU, the way FreeBSD/amd64
//! patches at boot: the text mapping itself stays read-only, and WP is set again in
//! `end`. It is right while only this CPU runs (the test kernel does not start APs).

use core::sync::atomic::{AtomicUsize, Ordering};

use kernel_loader::patch::{PokeError, TextPoker};

use crate::{cpu, paging};

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
            return Err(PokeError {
                addr,
                reason: "injected failure",
            });
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
