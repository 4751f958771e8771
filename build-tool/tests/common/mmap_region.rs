//! Module memory from `mmap` for the host loader tests and the host "kernel" fixture:
//! map a region at the first hint that satisfies the caller, change its protection,
//! unmap it.
#![allow(dead_code)]

use kernel_loader::module::{Prot, ProtectError};

/// Maps `size` bytes read-write at the first of `hints` (hints only: no `MAP_FIXED`)
/// where `accept(addr, size)` holds; `None` if none does.
pub fn map_near(
    size: usize,
    hints: impl Iterator<Item = u64>,
    accept: impl Fn(u64, usize) -> bool,
) -> Option<*mut u8> {
    for hint in hints {
        // SAFETY: a fresh private anonymous mapping; the hint is only a hint (no
        // MAP_FIXED), so nothing existing is replaced.
        let p = unsafe {
            libc::mmap(
                hint as usize as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        if accept(p as u64, size) {
            return Some(p.cast());
        }
        // SAFETY: the mapping just made, unused.
        unsafe { libc::munmap(p, size) };
    }
    None
}

/// `mprotect`s `len` bytes at `ptr` to `prot`.
///
/// # Safety
///
/// `ptr..ptr + len` lies in a mapping of the caller's, and nothing runs there unless
/// `prot` allows it.
pub unsafe fn protect(ptr: *mut u8, len: usize, prot: Prot) -> Result<(), ProtectError> {
    let p = match prot {
        Prot::ReadExec => libc::PROT_READ | libc::PROT_EXEC,
        Prot::Read => libc::PROT_READ,
        Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
    };
    // SAFETY: the caller's mapping (the contract above).
    let r = unsafe { libc::mprotect(ptr.cast(), len, p) };
    if r == 0 {
        Ok(())
    } else {
        Err(ProtectError::Failed)
    }
}

/// Unmaps `len` bytes at `ptr`.
///
/// # Safety
///
/// A mapping from [`map_near`] that nothing refers to any more.
pub unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: the caller's mapping, unused (the contract above).
    assert_eq!(unsafe { libc::munmap(ptr.cast(), len) }, 0);
}

/// Mapped module regions: counts, the live list, and a registry of live regions the
/// test's text poker consults (a static of the test).
#[derive(Debug, Default)]
pub struct Regions {
    /// Regions handed out.
    pub allocs: usize,
    /// Regions taken back.
    pub frees: usize,
    /// Live regions (address, size).
    pub live: Vec<(u64, usize)>,
}

impl Regions {
    /// Records the mapping `p` of `size` bytes as a live region.
    pub fn track(
        &mut self,
        registry: &std::sync::Mutex<Vec<(u64, usize)>>,
        p: *mut u8,
        size: usize,
    ) -> kernel_loader::module::Region {
        self.allocs += 1;
        self.live.push((p as u64, size));
        registry.lock().unwrap().push((p as u64, size));
        kernel_loader::module::Region {
            ptr: p,
            addr: p as u64,
            size,
        }
    }

    /// Forgets a live region and unmaps it.
    ///
    /// # Safety
    ///
    /// `region` came from [`Regions::track`] and nothing refers to it any more.
    pub unsafe fn release(
        &mut self,
        registry: &std::sync::Mutex<Vec<(u64, usize)>>,
        region: kernel_loader::module::Region,
    ) {
        let key = (region.addr, region.size);
        let i = self
            .live
            .iter()
            .position(|&r| r == key)
            .expect("freeing a region that is not live");
        self.live.remove(i);
        registry.lock().unwrap().retain(|&r| r != key);
        self.frees += 1;
        // SAFETY: a mapping of ours (the contract above), unused.
        unsafe { unmap(region.ptr, region.size) };
    }
}
