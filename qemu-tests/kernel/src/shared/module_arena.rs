//! The module arena of the aarch64 and riscv64 platforms: the pages of the module block
//! ([`mmu::MODULE_BASE`], 2 MiB, within direct-call reach of the kernel text: `bl` on
//! aarch64, `auipc`+`jalr` on riscv64) handed out to loaded modules. Each platform
//! re-exports it as `arch::module_arena`; it reaches the platform only through
//! `arch::mmu` (`MODULE_BASE`, `MODULE_SIZE`, `FAR_MODULE_BASE`, `PAGE_SIZE`,
//! `protect_module`, `ModulePerm`).
//!
//! A bitmap (no heap) of the block's 512 pages; a run is handed out zeroed and RW + NX;
//! [`ModuleMemory::protect`] sets each page's permissions through
//! [`mmu::protect_module`] (RX, R or RW, never W+X); [`ModuleMemory::free`] makes the
//! pages RW + NX and zeroes them. Module text is patched through the block's writable
//! alias (`mmu::AliasPoker`), never through its own mapping.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use kernel_loader::module::{ModuleMemory, Prot, ProtectError, Region};

use crate::arch::mmu::{self, ModulePerm};

/// Pages in the arena.
pub const PAGES: usize = (mmu::MODULE_SIZE / mmu::PAGE_SIZE) as usize;
const PAGE: usize = mmu::PAGE_SIZE as usize;

/// Bit `i` set: page `i` is in use.
struct Bitmap(UnsafeCell<[u64; PAGES / 64]>);

// SAFETY: only touched while `LOCK` is held.
unsafe impl Sync for Bitmap {}

static BITMAP: Bitmap = Bitmap(UnsafeCell::new([0; PAGES / 64]));
static LOCK: AtomicBool = AtomicBool::new(false);

fn locked<R>(f: impl FnOnce(&mut [u64; PAGES / 64]) -> R) -> R {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: `LOCK` is held: this is the only reference.
    let r = f(unsafe { &mut *BITMAP.0.get() });
    LOCK.store(false, Ordering::Release);
    r
}

fn used(b: &[u64; PAGES / 64], i: usize) -> bool {
    b[i / 64] & (1 << (i % 64)) != 0
}

fn set(b: &mut [u64; PAGES / 64], pages: core::ops::Range<usize>, on: bool) {
    for i in pages {
        if on {
            b[i / 64] |= 1 << (i % 64);
        } else {
            b[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// Zeroes `len` bytes at `addr` (RW pages of the block).
fn zero(addr: u64, len: usize) {
    for off in (0..len).step_by(8) {
        // SAFETY: the caller's pages, mapped RW, 8-aligned.
        unsafe { ((addr as usize + off) as *mut u64).write_volatile(0) };
    }
}

/// The module arena (a handle: the state is global).
#[derive(Debug, Default, Clone, Copy)]
pub struct ModuleArena;

impl ModuleArena {
    /// Pages in use.
    pub fn used_pages(&self) -> usize {
        locked(|b| b.iter().map(|w| w.count_ones() as usize).sum())
    }
}

impl ModuleMemory for ModuleArena {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        let n = size.checked_add(PAGE - 1)? / PAGE;
        if n == 0 || n > PAGES {
            return None;
        }
        let first = locked(|b| {
            let mut run = 0;
            for i in 0..PAGES {
                run = if used(b, i) { 0 } else { run + 1 };
                if run == n {
                    let first = i + 1 - n;
                    set(b, first..i + 1, true);
                    return Some(first);
                }
            }
            None
        })?;
        let addr = mmu::MODULE_BASE + (first * PAGE) as u64;
        // Free pages are RW + NX and zero (`free` leaves them so); zero again in case.
        zero(addr, n * PAGE);
        Some(Region {
            ptr: addr as usize as *mut u8,
            addr,
            size: n * PAGE,
        })
    }

    unsafe fn protect(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        prot: Prot,
    ) -> Result<(), ProtectError> {
        if offset.checked_add(len).is_none_or(|end| end > region.size) {
            return Err(ProtectError::OutOfRange);
        }
        let perm = match prot {
            Prot::ReadExec => ModulePerm::ReadExec,
            Prot::Read => ModulePerm::Read,
            Prot::ReadWrite => ModulePerm::ReadWrite,
        };
        let addr = region.addr + offset as u64;
        // SAFETY: the region is ours (from `alloc`), and the loader executes or writes
        // it only as `prot` allows (the trait's contract).
        // Its only errors are ranges outside the block (or not page aligned).
        unsafe { mmu::protect_module(addr, len, perm) }.map_err(|_| ProtectError::OutOfRange)
    }

    unsafe fn free(&mut self, region: Region) {
        let m = mmu::module_range();
        if region.addr < m.start || region.addr + region.size as u64 > m.end {
            return;
        }
        // SAFETY: ours, and nothing refers to it any more (the trait's contract).
        if unsafe { mmu::protect_module(region.addr, region.size, ModulePerm::ReadWrite) }.is_err()
        {
            return;
        }
        zero(region.addr, region.size);
        let first = ((region.addr - m.start) as usize) / PAGE;
        locked(|b| set(b, first..first + region.size / PAGE, false));
    }
}

/// The far module block ([`mmu::FAR_MODULE_BASE`]: out of `bl` reach of the kernel text
/// on aarch64; 160 MiB into RAM on riscv64, in `auipc`+`jalr` reach) as module memory: one region at a time, from its start.
#[derive(Debug, Default, Clone, Copy)]
pub struct FarArena;

static FAR_IN_USE: AtomicBool = AtomicBool::new(false);

impl FarArena {
    /// Whether a region of the far block is handed out.
    pub fn in_use(&self) -> bool {
        FAR_IN_USE.load(Ordering::SeqCst)
    }
}

impl ModuleMemory for FarArena {
    fn alloc(&mut self, size: usize) -> Option<Region> {
        let size = size.checked_add(PAGE - 1)? / PAGE * PAGE;
        if size == 0 || size as u64 > mmu::MODULE_SIZE || FAR_IN_USE.swap(true, Ordering::SeqCst) {
            return None;
        }
        let addr = mmu::FAR_MODULE_BASE;
        zero(addr, size);
        Some(Region {
            ptr: addr as usize as *mut u8,
            addr,
            size,
        })
    }

    unsafe fn protect(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        prot: Prot,
    ) -> Result<(), ProtectError> {
        // SAFETY: forwarded (the same block table and rules).
        unsafe { ModuleArena.protect(region, offset, len, prot) }
    }

    unsafe fn free(&mut self, region: Region) {
        if region.addr != mmu::FAR_MODULE_BASE {
            return;
        }
        // SAFETY: ours, and nothing refers to it any more (the trait's contract).
        if unsafe { mmu::protect_module(region.addr, region.size, ModulePerm::ReadWrite) }.is_ok() {
            zero(region.addr, region.size);
            FAR_IN_USE.store(false, Ordering::SeqCst);
        }
    }
}
