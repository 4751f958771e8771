//! The module arena: where loaded modules live.
//!
//! [`ARENA_PAGES`] 4 KiB pages of `.bss` (page aligned), so the arena lies inside the
//! 4 KiB-mapped first 16 MiB ([`paging`]) and within `rel32` reach of the kernel's
//! text: a module's calls into the kernel and the kernel's patched calls into a module
//! are plain 5-byte `call`s. A bitmap allocator (no heap) hands out runs of pages;
//! [`protect`] gives each page its final permissions through its own page-table entry
//! (read + execute, read-only + NX, or read + write + NX), never writable and
//! executable at once, and flushes the TLB of every online CPU.
//!
//! Pages are handed out zeroed, writable + NX; [`Arena::free`] makes them writable +
//! NX again and zeroes them.

use core::cell::UnsafeCell;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::{cpu, paging, smp};

/// Pages in the arena (2 MiB).
pub const ARENA_PAGES: usize = 512;
/// Bytes in the arena.
pub const ARENA_SIZE: usize = ARENA_PAGES * PAGE;
const PAGE: usize = paging::PAGE_SIZE as usize;
const WORDS: usize = ARENA_PAGES / 64;

#[repr(C, align(4096))]
struct Memory(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the bytes are only reached through raw pointers handed out by the allocator,
// whose bookkeeping is behind `LOCK`; each allocation has one owner.
unsafe impl Sync for Memory {}

static MEMORY: Memory = Memory(UnsafeCell::new([0; ARENA_SIZE]));

/// Bit `i` set: page `i` is allocated.
struct Bitmap(UnsafeCell<[u64; WORDS]>);

// SAFETY: only touched while `LOCK` is held.
unsafe impl Sync for Bitmap {}

static BITMAP: Bitmap = Bitmap(UnsafeCell::new([0; WORDS]));
static LOCK: AtomicBool = AtomicBool::new(false);

/// What a page is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Read + execute (text).
    ReadExec,
    /// Read-only, NX (rodata, the `.ksites` table).
    Read,
    /// Read + write, NX (data, bss; also every free page).
    ReadWrite,
}

/// A run of arena pages.
#[derive(Debug, PartialEq, Eq)]
pub struct Pages {
    /// First byte (page aligned).
    pub addr: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: usize,
}

impl Pages {
    /// The address range.
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.len as u64
    }

    /// A pointer to the first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.addr as usize as *mut u8
    }
}

/// The whole arena's address range.
pub fn range() -> Range<u64> {
    let start = MEMORY.0.get() as u64;
    start..start + ARENA_SIZE as u64
}

/// The allocator (a handle; the state is global and locked per call).
#[derive(Debug, Default)]
pub struct Arena;

/// Free and used page counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Pages allocated.
    pub used: usize,
    /// Pages free.
    pub free: usize,
}

fn with_bitmap<R>(f: impl FnOnce(&mut [u64; WORDS]) -> R) -> R {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: LOCK is held, so this is the only reference to the bitmap.
    let r = f(unsafe { &mut *BITMAP.0.get() });
    LOCK.store(false, Ordering::Release);
    r
}

fn used(map: &[u64; WORDS], page: usize) -> bool {
    map[page / 64] & (1 << (page % 64)) != 0
}

fn set(map: &mut [u64; WORDS], pages: Range<usize>, on: bool) {
    for p in pages {
        if on {
            map[p / 64] |= 1 << (p % 64);
        } else {
            map[p / 64] &= !(1 << (p % 64));
        }
    }
}

impl Arena {
    /// `len` bytes (rounded up to pages), zeroed, writable + NX, first fit. `None` if
    /// `len` is 0 or no run of free pages is long enough.
    pub fn alloc(&mut self, len: usize) -> Option<Pages> {
        let n = len.div_ceil(PAGE);
        if n == 0 || n > ARENA_PAGES {
            return None;
        }
        let first = with_bitmap(|map| {
            let mut start = 0;
            while start + n <= ARENA_PAGES {
                match (start..start + n).find(|&p| used(map, p)) {
                    Some(busy) => start = busy + 1,
                    None => {
                        set(map, start..start + n, true);
                        return Some(start);
                    }
                }
            }
            None
        })?;
        Some(Pages {
            addr: range().start + (first * PAGE) as u64,
            len: n * PAGE,
        })
    }

    /// Returns `pages` to the arena: writable + NX again, zeroed.
    ///
    /// # Safety
    ///
    /// `pages` came from [`Arena::alloc`] and nothing uses them any more (no code in
    /// them runs, no pointer into them is used).
    pub unsafe fn free(&mut self, pages: Pages) {
        // SAFETY: the pages are ours (caller), so changing their mapping is fine.
        let made_writable = unsafe { protect(pages.addr, pages.len, Perm::ReadWrite) };
        assert!(made_writable.is_ok(), "freeing pages outside the arena");
        // SAFETY: writable now, `len` bytes long, unused (caller).
        unsafe { core::ptr::write_bytes(pages.ptr(), 0, pages.len) };
        let first = ((pages.addr - range().start) as usize) / PAGE;
        with_bitmap(|map| set(map, first..first + pages.len / PAGE, false));
    }

    /// How many pages are in use.
    pub fn usage(&self) -> Usage {
        let used = with_bitmap(|map| map.iter().map(|w| w.count_ones() as usize).sum());
        Usage {
            used,
            free: ARENA_PAGES - used,
        }
    }
}

/// The page-table entry for identity-mapped `addr` with `perm`.
fn entry(addr: u64, perm: Perm) -> u64 {
    let nx = if cpu::nx_enabled() {
        paging::NO_EXECUTE
    } else {
        0
    };
    addr | match perm {
        Perm::ReadExec => paging::PRESENT,
        Perm::Read => paging::PRESENT | nx,
        Perm::ReadWrite => paging::PRESENT | paging::WRITABLE | nx,
    }
}

/// Gives every page that overlaps `[addr, addr + len)` the permissions `perm`, then
/// flushes the TLB of every online CPU. `Err` if the range is not inside the arena.
///
/// # Safety
///
/// The pages are allocated and their owner agrees: making a page read-only while
/// something writes it, or non-executable while code in it runs, faults.
pub unsafe fn protect(addr: u64, len: usize, perm: Perm) -> Result<(), &'static str> {
    let arena = range();
    let end = addr.checked_add(len as u64).ok_or("range overflows")?;
    if addr < arena.start || end > arena.end {
        return Err("range not inside the module arena");
    }
    let mut page = addr & !(paging::PAGE_SIZE - 1);
    while page < end {
        // SAFETY: the arena is in the kernel's `.bss`, which `paging::init` checked lies
        // below `SMALL_PAGES_END` (4 KiB pages); the caller owns the page.
        unsafe { paging::set_page(page, entry(page, perm)) };
        page += paging::PAGE_SIZE;
    }
    flush_other_cpus();
    Ok(())
}

fn reload_cr3(_cpu: usize) {
    // SAFETY: rewriting CR3 with its own value only flushes this CPU's TLB.
    unsafe { cpu::write_cr3(cpu::read_cr3()) };
}

/// `set_page` flushed this CPU; the others (parked APs) reload CR3.
fn flush_other_cpus() {
    if smp::online() > 1 && smp::cpu_index() == 0 {
        smp::run_on_aps(reload_cr3);
        if let Err(cpu) = smp::wait_aps(1_000_000_000) {
            panic!("arena: CPU {cpu} did not flush its TLB");
        }
    }
}

impl kernel_loader::module::ModuleMemory for Arena {
    fn alloc(&mut self, size: usize) -> Option<kernel_loader::module::Region> {
        let pages = Arena::alloc(self, size)?;
        Some(kernel_loader::module::Region {
            ptr: pages.ptr(),
            addr: pages.addr,
            size: pages.len,
        })
    }

    unsafe fn protect(
        &mut self,
        region: &kernel_loader::module::Region,
        offset: usize,
        len: usize,
        prot: kernel_loader::module::Prot,
    ) -> Result<(), kernel_loader::module::ProtectError> {
        use kernel_loader::module::{Prot, ProtectError};
        if offset.checked_add(len).is_none_or(|end| end > region.size) {
            return Err(ProtectError::OutOfRange);
        }
        let perm = match prot {
            Prot::ReadExec => Perm::ReadExec,
            Prot::Read => Perm::Read,
            Prot::ReadWrite => Perm::ReadWrite,
        };
        // SAFETY: the region is one of ours (trait contract) and the loader agrees.
        // Its only errors are ranges outside the arena.
        unsafe { protect(region.addr + offset as u64, len, perm) }
            .map_err(|_| ProtectError::OutOfRange)
    }

    unsafe fn free(&mut self, region: kernel_loader::module::Region) {
        // SAFETY: from `alloc`, unused (trait contract).
        unsafe {
            Arena::free(
                self,
                Pages {
                    addr: region.addr,
                    len: region.size,
                },
            )
        };
    }
}
