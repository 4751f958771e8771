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
//! * The *poke window* ([`POKE_WINDOW`], a 4 KiB page at 1 GiB + 2 MiB): not present
//!   except while [`crate::poker::AliasPoker`] writes text through it, when it maps
//!   the text's physical frames writable + NX (see [`map_poke_window`]).
//!
//! Text stays read-only + executable for the kernel's whole life; the only other
//! executable page is the AP start-up trampoline, which [`crate::smp`] makes
//! read-only + executable after copying it (see [`set_page`]). [`wx_scan`] checks from
//! the tables that no page is both writable and executable.
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
/// The poke window: [`POKE_WINDOW_PAGES`] 4 KiB virtual page(s), not present unless
/// [`map_poke_window`] maps a text frame there (writable, NX) for one write.
pub const POKE_WINDOW: u64 = (1 << 30) + LARGE_PAGE_SIZE;
/// Pages in the poke window (the poker splits a write that straddles a page boundary).
pub const POKE_WINDOW_PAGES: usize = 1;

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
    pd_poke: Table,
    pt_poke: Table,
    pt: [Table; SMALL_PAGE_TABLES],
}

const EMPTY: Table = Table([0; 512]);

static mut TABLES: Tables = Tables {
    pml4: EMPTY,
    pdpt: EMPTY,
    pd: EMPTY,
    pd_mmio: EMPTY,
    pd_poke: EMPTY,
    pt_poke: EMPTY,
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
        // The poke window's tables: present, but every PTE stays 0 until a write.
        (*t).pd_poke.0[((POKE_WINDOW >> 21) & 0x1ff) as usize] =
            &raw const (*t).pt_poke as u64 | PRESENT | WRITABLE;
        (*t).pdpt.0[(POKE_WINDOW >> 30) as usize] =
            &raw const (*t).pd_poke as u64 | PRESENT | WRITABLE;
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

/// Flushes this CPU's TLB entry for `addr`.
pub fn invlpg(addr: u64) {
    // SAFETY: invlpg only drops a cached translation; it reads and writes no memory.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) addr, options(nostack, preserves_flags)) };
}

/// Replaces the 4 KiB page-table entry that maps `addr` (in the 4 KiB-mapped first
/// 16 MiB) with `entry`; returns the old entry. Flushes this CPU's TLB entry only.
///
/// # Safety
///
/// 1. `addr` is below [`SMALL_PAGES_END`] and [`init`] has run.
/// 2. Nothing live depends on the old mapping (unmapping a page in use, or making text
///    writable, breaks the kernel's invariants), and other CPUs that may hold the old
///    translation are flushed by the caller if that matters.
pub unsafe fn set_page(addr: u64, entry: u64) -> u64 {
    let index = (addr / PAGE_SIZE) as usize;
    let t = &raw mut TABLES;
    // SAFETY: (1) puts the entry inside `pt`; an aligned u64 store is atomic for the
    // page walker; the caller vouches for the effect (2).
    let old = unsafe {
        let e = &raw mut (*t).pt[index / 512].0[index % 512];
        let old = core::ptr::read_volatile(e);
        core::ptr::write_volatile(e, entry);
        old
    };
    invlpg(addr);
    old
}

/// Maps physical frame `frame` (4 KiB aligned) at window page `page` of the poke window,
/// writable and NX, and returns the page's virtual address. Flushes nothing: the entry
/// was not present (checked), and a not-present entry is never cached.
///
/// # Safety
///
/// 1. The caller owns the poke window (one writer at a time) and [`init`] has run.
/// 2. Writes through the window change whatever `frame` holds; the caller writes only
///    the bytes it means to.
/// 3. [`unmap_poke_window`] is called before the window is mapped again.
pub unsafe fn map_poke_window(page: usize, frame: u64) -> u64 {
    assert!(page < POKE_WINDOW_PAGES && frame.is_multiple_of(PAGE_SIZE));
    let nx = if cpu::nx_enabled() { NO_EXECUTE } else { 0 };
    let va = POKE_WINDOW + page as u64 * PAGE_SIZE;
    let index = ((va >> 12) & 0x1ff) as usize;
    let t = &raw mut TABLES;
    // SAFETY: `index` is in range; the caller owns the window (1); an aligned u64 store
    // is atomic for the page walker.
    unsafe {
        let e = &raw mut (*t).pt_poke.0[index];
        assert!(
            core::ptr::read_volatile(e) == 0,
            "poke window page {page} already mapped"
        );
        core::ptr::write_volatile(e, frame | PRESENT | WRITABLE | nx);
    }
    va
}

/// Unmaps every poke-window page and flushes this CPU's TLB entries for them. No other
/// CPU ever touches the window, so no other TLB can hold a translation it uses.
pub fn unmap_poke_window() {
    let t = &raw mut TABLES;
    for page in 0..POKE_WINDOW_PAGES {
        let va = POKE_WINDOW + page as u64 * PAGE_SIZE;
        let index = ((va >> 12) & 0x1ff) as usize;
        // SAFETY: clearing a PTE of the window, which only the poker uses (the caller
        // of `map_poke_window` owns it); an aligned u64 store is atomic.
        unsafe { core::ptr::write_volatile(&raw mut (*t).pt_poke.0[index], 0) };
        invlpg(va);
    }
}

/// What [`wx_scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WxReport {
    /// Mapped pages (of any size) visited.
    pub pages: u64,
    /// Executable pages visited.
    pub executable: u64,
    /// Pages that are writable and executable.
    pub violations: u64,
    /// The first such page's virtual address.
    pub first: Option<u64>,
}

/// Walks the live page tables (from CR3) and counts pages that are both writable and
/// executable (permissions combined over all levels). W^X holds iff `violations == 0`.
pub fn wx_scan() -> WxReport {
    let mut r = WxReport::default();
    let nx_enabled = cpu::nx_enabled();
    walk(
        cpu::read_cr3() & ADDR_MASK,
        39,
        0,
        true,
        false,
        nx_enabled,
        &mut r,
    );
    r
}

fn walk(
    table: u64,
    shift: u32,
    base: u64,
    writable: bool,
    no_exec: bool,
    nx_enabled: bool,
    r: &mut WxReport,
) {
    if table >= IDENTITY_END {
        return;
    }
    for i in 0..512u64 {
        // SAFETY: `table` is a page-table page below 1 GiB, identity mapped; reading an
        // aligned u64 of it has no side effects.
        let entry = unsafe { core::ptr::read_volatile((table + i * 8) as *const u64) };
        if entry & PRESENT == 0 {
            continue;
        }
        let mut va = base | (i << shift);
        if va & (1 << 47) != 0 {
            va |= 0xffff_0000_0000_0000;
        }
        let w = writable && entry & WRITABLE != 0;
        let nx = no_exec || entry & NO_EXECUTE != 0;
        let leaf = shift == 12 || ((shift == 30 || shift == 21) && entry & HUGE != 0);
        if leaf {
            let exec = !(nx_enabled && nx);
            r.pages += 1;
            if exec {
                r.executable += 1;
                if w {
                    r.violations += 1;
                    r.first.get_or_insert(va);
                }
            }
        } else {
            walk(entry & ADDR_MASK, shift - 9, va, w, nx, nx_enabled, r);
        }
    }
}
