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
