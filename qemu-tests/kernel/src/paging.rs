//! The kernel's own page tables: identity mapping with W^X.
//!
//! [`init`] builds 4-level tables in `.bss` and switches CR3 to them:
//!
//! * `0 .. 16 MiB` with 4 KiB pages: the kernel image and the table segment that
//!   `ksites embed` appends after `__kernel_end`. Text pages (`[__text_start,
//!   __text_end)`) are present, read-only and executable; every other page is present,
//!   writable and NX. Page 0 (null) and the boot stack's guard page are not mapped.
//! * `16 MiB .. 1 GiB` with 2 MiB pages, writable + NX.
//! * `3 GiB .. 4 GiB` with 2 MiB pages, writable + NX + uncached: the MMIO hole
//!   (local APIC at `0xfee0_0000`, I/O APIC at `0xfec0_0000`).
//!
//! NX is used only when the boot stub could set EFER.NXE (the CPU has NX).
//!
//! Page tables are read through the identity mapping, so [`translate`] only follows
//! tables that lie in the first 1 GiB.

use core::ops::Range;

use crate::boot;
use crate::cpu::{self, CR0_WP};

/// Paging entry: present.
pub const PRESENT: u64 = 1 << 0;
/// Paging entry: writable.
pub const WRITABLE: u64 = 1 << 1;
/// Paging entry: user accessible.
pub const USER: u64 = 1 << 2;
/// Paging entry: write-through.
pub const WRITE_THROUGH: u64 = 1 << 3;
/// Paging entry: cache disabled.
pub const NO_CACHE: u64 = 1 << 4;
/// Paging entry (PDPTE/PDE): maps a 1 GiB / 2 MiB page.
pub const HUGE: u64 = 1 << 7;
/// Paging entry: no execute (needs EFER.NXE).
pub const NO_EXECUTE: u64 = 1 << 63;
/// Physical address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// End of the range mapped with 4 KiB pages.
pub const SMALL_PAGES_END: u64 = 16 << 20;
/// End of the identity-mapped RAM.
pub const IDENTITY_END: u64 = 1 << 30;
/// Start of the mapped MMIO hole.
pub const MMIO_START: u64 = 3 << 30;

const SMALL_PAGE_TABLES: usize = (SMALL_PAGES_END / LARGE_PAGE_SIZE) as usize;

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __kernel_start: u8;
    static __kernel_end: u8;
}

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[repr(C)]
struct Tables {
    pml4: Table,
    pdpt: Table,
    pd: Table,
    pd_mmio: Table,
    pt: [Table; SMALL_PAGE_TABLES],
}

const EMPTY: Table = Table([0; 512]);

static mut TABLES: Tables = Tables {
    pml4: EMPTY,
    pdpt: EMPTY,
    pd: EMPTY,
    pd_mmio: EMPTY,
    pt: [EMPTY; SMALL_PAGE_TABLES],
};

/// The kernel's text: `[__text_start, __text_end)`, page aligned.
pub fn text_range() -> Range<u64> {
    (&raw const __text_start) as u64..(&raw const __text_end) as u64
}

/// The loaded image: `[__kernel_start, __kernel_end)` (without the segment `ksites
/// embed` appends after it).
pub fn kernel_range() -> Range<u64> {
    (&raw const __kernel_start) as u64..(&raw const __kernel_end) as u64
}

/// The boot stack's guard page.
pub fn guard_page() -> u64 {
    (&raw const boot::boot_stack_guard) as u64
}

/// Builds the kernel's page tables and switches CR3 to them. Call once on the boot CPU.
///
/// Panics if the image does not fit in the 4 KiB-mapped range.
pub fn init() {
    let text = text_range();
    let guard = guard_page();
    let kernel_end = kernel_range().end;
    assert!(
        kernel_end <= SMALL_PAGES_END,
        "kernel image ends at {kernel_end:#x}, beyond the 4 KiB-mapped {SMALL_PAGES_END:#x}"
    );
    assert!(text.start.is_multiple_of(PAGE_SIZE) && text.end.is_multiple_of(PAGE_SIZE));
    let nx = if cpu::nx_enabled() { NO_EXECUTE } else { 0 };
    let data = PRESENT | WRITABLE | nx;

    let t = &raw mut TABLES;
    // SAFETY: init runs once on the boot CPU. TABLES is in .bss, which nothing else
    // uses, so these writes alias nothing; CR3 still points at the boot tables while
    // they are built. The new tables map everything the kernel uses (text, rodata,
    // data, bss incl. the stack and the tables themselves, the start info in low
    // memory) at the same addresses as the boot tables, so switching CR3 is seamless.
    unsafe {
        for (i, pt) in (*t).pt.iter_mut().enumerate() {
            for (j, entry) in pt.0.iter_mut().enumerate() {
                let addr = (i as u64 * 512 + j as u64) * PAGE_SIZE;
                *entry = if addr == 0 || addr == guard {
                    0
                } else if text.contains(&addr) {
                    addr | PRESENT
                } else {
                    addr | data
                };
            }
        }
        for (i, entry) in (*t).pd.0.iter_mut().enumerate() {
            *entry = match (*t).pt.get(i) {
                Some(pt) => pt as *const Table as u64 | PRESENT | WRITABLE,
                None => (i as u64 * LARGE_PAGE_SIZE) | HUGE | data,
            };
        }
        for (i, entry) in (*t).pd_mmio.0.iter_mut().enumerate() {
            *entry =
                (MMIO_START + i as u64 * LARGE_PAGE_SIZE) | HUGE | NO_CACHE | WRITE_THROUGH | data;
        }
        (*t).pdpt.0[0] = &raw const (*t).pd as u64 | PRESENT | WRITABLE;
        (*t).pdpt.0[(MMIO_START >> 30) as usize] =
            &raw const (*t).pd_mmio as u64 | PRESENT | WRITABLE;
        (*t).pml4.0[0] = &raw const (*t).pdpt as u64 | PRESENT | WRITABLE;
        cpu::write_cr3(&raw const (*t).pml4 as u64);
    }
}

/// Turns CR0.WP on or off. With WP off, supervisor writes ignore read-only pages (the
/// boot-time way to patch text on one CPU); it must be turned back on afterwards.
pub fn set_write_protect(on: bool) {
    let cr0 = cpu::read_cr0();
    let cr0 = if on { cr0 | CR0_WP } else { cr0 & !CR0_WP };
    // SAFETY: only WP changes; PE/PG and the FPU bits are preserved.
    unsafe { cpu::write_cr0(cr0) };
}

/// Whether CR0.WP is set.
pub fn write_protect_enabled() -> bool {
    cpu::read_cr0() & CR0_WP != 0
}

/// How a virtual address is mapped, with permissions combined across all levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    /// The physical address `addr` translates to (page base + offset).
    pub phys: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Writable at every level (what CR0.WP = 1 enforces for the kernel).
    pub writable: bool,
    /// No level sets NX (or NX is not enabled).
    pub executable: bool,
    /// User accessible at every level.
    pub user: bool,
}

/// Walks the live page tables (from CR3) for `addr`. `None` if it is not mapped, not
/// canonical, or a table lies outside the identity-mapped first 1 GiB.
pub fn translate(addr: u64) -> Option<PageInfo> {
    let canonical = ((addr as i64) << 16 >> 16) as u64 == addr;
    if !canonical {
        return None;
    }
    let nx_enabled = cpu::nx_enabled();
    let mut table = cpu::read_cr3() & ADDR_MASK;
    let (mut writable, mut user, mut no_exec) = (true, true, false);
    for shift in [39u32, 30, 21, 12] {
        if table >= IDENTITY_END {
            return None;
        }
        let index = (addr >> shift) & 0x1ff;
        // SAFETY: `table` is a page-table page below 1 GiB (checked above), which the
        // live tables identity-map; reading one aligned u64 of it has no side effects.
        let entry = unsafe { core::ptr::read_volatile((table + index * 8) as *const u64) };
        if entry & PRESENT == 0 {
            return None;
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        no_exec |= entry & NO_EXECUTE != 0;
        let leaf = shift == 12 || ((shift == 30 || shift == 21) && entry & HUGE != 0);
        if leaf {
            let size = 1u64 << shift;
            // For large pages bit 12 is PAT, not an address bit.
            let base = entry & ADDR_MASK & !(size - 1);
            return Some(PageInfo {
                phys: base | (addr & (size - 1)),
                size,
                writable,
                executable: !(nx_enabled && no_exec),
                user,
            });
        }
        table = entry & ADDR_MASK;
    }
    None
}
