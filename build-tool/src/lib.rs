//! Library half of the `ksites` CLI (the binary is a thin clap front end).

pub mod check_module;
pub mod elf;
pub mod embed;
pub use embed::rel as embed_rel;
pub mod inspect;
pub mod keys;
pub mod link;
pub mod output;
pub mod probes;
pub mod record_section;
pub mod records;
pub mod scan;
pub mod sites;
pub mod table;
pub mod target;
pub mod verify;

/// The binaries' global allocator: the system allocator, asking the kernel for
/// transparent huge pages for blocks of 4 MiB or more (`madvise(MADV_HUGEPAGE)`, honoured
/// where THP is in `madvise` mode, as on most distributions) when they are allocated.
/// An image's millions of sites fill tens of MiB of vectors; with 4 KiB pages each
/// page's first touch is a page fault (11,500 of them for `embed` on 10^6 sites, about
/// a seventh of its time), with 2 MiB pages a few dozen. The contents, and so every output, are the same; only
/// where the kernel backs the memory differs.
#[derive(Debug)]
pub struct HugePageAlloc;

impl HugePageAlloc {
    const AT_LEAST: usize = 4 << 20;
    const HUGE: usize = 2 << 20;

    /// Advises the whole 2 MiB extents of `size` bytes at `p` to be backed by huge pages.
    fn advise(p: *mut u8, size: usize) {
        #[cfg(target_os = "linux")]
        if size >= Self::AT_LEAST && !p.is_null() {
            let start = (p as usize).next_multiple_of(Self::HUGE);
            let end = (p as usize + size) / Self::HUGE * Self::HUGE;
            if end > start {
                // SAFETY: `start..end` lies inside the block just allocated (both rounded
                // into it); MADV_HUGEPAGE changes how the kernel backs those pages, never
                // their contents or accessibility, and a failure (THP disabled) leaves
                // them as they were.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (p, size);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and
// returns its result; `advise` only hints how the returned block's pages are backed.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` has.
        let p = unsafe { std::alloc::System.alloc(layout) };
        Self::advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        Self::advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        // (Not advised: the block's old part is touched already, and an advice that
        // splits its mapping would keep the next growth from moving it without a copy.
        // Vectors that grow large are given their capacity up front instead.)
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
