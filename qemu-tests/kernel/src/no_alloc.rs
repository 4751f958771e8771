//! The kernel has no heap. `kernel-loader`'s module loader reads ELF with `object`,
//! which links the `alloc` crate, so a `#[global_allocator]` must exist; this one
//! refuses every request (returns null) and counts it. The loader never allocates:
//! the module tests check the count stays 0.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

/// Allocation requests seen since boot.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);

struct NoAlloc;

// SAFETY: `alloc` always fails (null), which `GlobalAlloc` permits; `dealloc` can then
// never be called with a pointer this allocator returned, so it does nothing.
unsafe impl GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _layout: Layout) -> *mut u8 {
        REQUESTS.fetch_add(1, Ordering::SeqCst);
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: NoAlloc = NoAlloc;

/// Allocation requests seen since boot.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::SeqCst)
}
