//! Stage 1 translation at EL1 with the 4 KiB granule: an identity map with W^X
//! permissions, and a writable alias of the kernel image through which text is patched.
//!
//! 39-bit virtual addresses (TCR_EL1.T0SZ = 25), so the walk starts at level 1:
//!
//! | VA | maps | as |
//! |---|---|---|
//! | 0 .. 1 GiB | the same PA (GIC, PL011…) | one device-nGnRnE block, never executable |
//! | 1 .. 1.25 GiB | RAM (the same PA) | 2 MiB normal blocks, RW, NX |
//! | the kernel's 2 MiB blocks | RAM | 4 KiB pages: text RO + X, rodata RO NX, the rest RW NX |
//! | `addr` + [`ALIAS_OFFSET`] | the kernel image's PA | 4 KiB pages RW NX: the patching alias |
//! | [`MODULE_BASE`], [`FAR_MODULE_BASE`]: 2 MiB each | RAM | 4 KiB pages, each RX, R NX or RW NX ([`protect_module`]) |
//! | each module block + [`ALIAS_OFFSET`] | the block's PA | one 2 MiB block RW NX |
//!
//! Text is never writable through its own mapping: a patch writes through the alias
//! ([`AliasPoker`]) and then cleans the D-cache and invalidates the I-cache for the
//! executable address (`kernel_loader::arch::aarch64::sync_icache`). Loaded modules'
//! text (the module block's RX pages) is patched the same way.

use core::ptr::addr_of;

use kernel_loader::arch::aarch64::sync_icache;
use kernel_loader::patch::PokeFailure;
use kernel_loader::{PokeError, TextPoker};

/// Start of RAM on QEMU `virt`.
pub const RAM_BASE: u64 = 0x4000_0000;
/// RAM the kernel maps (the xtask boots with `-m 256M`).
pub const RAM_SIZE: u64 = 256 << 20;
/// The alias of a kernel address `a` is `a + ALIAS_OFFSET` (level-1 entry 2).
pub const ALIAS_OFFSET: u64 = 0x4000_0000;
const BLOCK_2M: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// The kernel image may span this many 2 MiB blocks (each gets a level-3 table).
const KERNEL_BLOCKS: usize = 2;

// Descriptor bits (Arm ARM D8.3).
const VALID: u64 = 1 << 0;
/// Table descriptor (levels 1, 2) or page descriptor (level 3).
const TABLE_OR_PAGE: u64 = 1 << 1;
/// MAIR_EL1 attribute index 0: Device-nGnRnE.
const ATTR_DEVICE: u64 = 0 << 2;
/// MAIR_EL1 attribute index 1: Normal, write-back cacheable.
const ATTR_NORMAL: u64 = 1 << 2;
/// AP[2]: read-only (AP[1] = 0: no EL0 access).
const AP_RO: u64 = 1 << 7;
const SH_INNER: u64 = 3 << 8;
/// The access flag (no access-flag faults).
const AF: u64 = 1 << 10;
/// Privileged execute-never.
const PXN: u64 = 1 << 53;
/// Unprivileged execute-never.
const UXN: u64 = 1 << 54;
const NORMAL_RW_NX: u64 = ATTR_NORMAL | SH_INNER | AF | PXN | UXN;

/// MAIR_EL1: attr0 Device-nGnRnE (0x00), attr1 Normal inner/outer write-back (0xff).
const MAIR: u64 = 0xff << 8;
/// TCR_EL1: T0SZ = 25, inner/outer write-back walks, inner shareable, 4 KiB granule
/// (TG0 = 0), TTBR1 walks off (EPD1), 40-bit intermediate physical addresses (IPS = 2).
const TCR: u64 = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32);
/// SCTLR_EL1: M (MMU on), C (data caches), I (instruction caches).
const SCTLR_ON: u64 = (1 << 0) | (1 << 2) | (1 << 12);
/// SCTLR_EL1.A: alignment checking (off).
const SCTLR_A: u64 = 1 << 1;

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[repr(C)]
struct Tables {
    l1: Table,
    l2_ram: Table,
    l2_alias: Table,
    l3_kernel: [Table; KERNEL_BLOCKS],
    l3_alias: [Table; KERNEL_BLOCKS],
    l3_modules: [Table; 2],
}

const EMPTY: Table = Table([0; 512]);
static mut TABLES: Tables = Tables {
    l1: EMPTY,
    l2_ram: EMPTY,
    l2_alias: EMPTY,
    l3_kernel: [EMPTY, EMPTY],
    l3_alias: [EMPTY, EMPTY],
    l3_modules: [EMPTY, EMPTY],
};

/// What every CPU writes to MAIR_EL1, TCR_EL1, TTBR0_EL1 and SCTLR_EL1 (in that order)
/// to turn its MMU on; the secondary entry (`boot.rs`) reads it with the MMU still off,
/// so [`init`] cleans it to the point of coherency.
#[unsafe(no_mangle)]
pub static mut MMU_REGS: [u64; 4] = [0; 4];

unsafe extern "C" {
    static __kernel_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __kernel_end: u8;
    static __patch_page: u8;
}

/// The linker script's boundaries (4 KiB aligned).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// `[kernel_start, kernel_end)`: the whole image.
    pub kernel_start: u64,
    /// End of the image.
    pub kernel_end: u64,
    /// `[text_start, text_end)`: executable, read-only.
    pub text_start: u64,
    /// End of text (start of rodata).
    pub text_end: u64,
    /// Start of `.rodata`.
    pub rodata_start: u64,
    /// Start of `.data` (end of rodata).
    pub data_start: u64,
    /// The page of text the patching test rewrites.
    pub patch_page: u64,
}

/// The image's layout.
pub fn layout() -> Layout {
    Layout {
        kernel_start: addr_of!(__kernel_start) as u64,
        kernel_end: addr_of!(__kernel_end) as u64,
        text_start: addr_of!(__text_start) as u64,
        text_end: addr_of!(__text_end) as u64,
        rodata_start: addr_of!(__rodata_start) as u64,
        data_start: addr_of!(__data_start) as u64,
        patch_page: addr_of!(__patch_page) as u64,
    }
}

/// The level-3 descriptor of kernel page `pa` under its own (identity) mapping.
fn kernel_page(l: &Layout, pa: u64) -> u64 {
    let perms = if (l.text_start..l.text_end).contains(&pa) {
        ATTR_NORMAL | SH_INNER | AF | AP_RO | UXN
    } else if (l.rodata_start..l.data_start).contains(&pa) {
        ATTR_NORMAL | SH_INNER | AF | AP_RO | PXN | UXN
    } else {
        NORMAL_RW_NX
    };
    pa | perms | VALID | TABLE_OR_PAGE
}

/// Builds the page tables (on CPU 0, MMU off) and fills [`MMU_REGS`]. Returns an error
/// message if the image does not fit the tables.
pub fn init() -> Result<(), &'static str> {
    let l = layout();
    let first = (l.kernel_start - RAM_BASE) / BLOCK_2M;
    let last = (l.kernel_end - 1 - RAM_BASE) / BLOCK_2M;
    if last - first >= KERNEL_BLOCKS as u64 {
        return Err("the kernel image spans more 2 MiB blocks than mmu.rs has tables for");
    }
    if l.kernel_end > MODULE_BASE {
        return Err("the kernel image reaches into the module block");
    }
    // SAFETY: only CPU 0 runs, once, before any translation uses the tables; this is
    // the only reference to them.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    t.l1.0[0] = VALID | ATTR_DEVICE | AF | PXN | UXN;
    t.l1.0[1] = addr_of!(t.l2_ram) as u64 | VALID | TABLE_OR_PAGE;
    t.l1.0[2] = addr_of!(t.l2_alias) as u64 | VALID | TABLE_OR_PAGE;
    for i in 0..(RAM_SIZE / BLOCK_2M) as usize {
        t.l2_ram.0[i] = (RAM_BASE + i as u64 * BLOCK_2M) | NORMAL_RW_NX | VALID;
    }
    for j in 0..=(last - first) as usize {
        let block = first as usize + j;
        let base = RAM_BASE + block as u64 * BLOCK_2M;
        for k in 0..512 {
            let pa = base + k as u64 * PAGE;
            t.l3_kernel[j].0[k] = kernel_page(&l, pa);
            t.l3_alias[j].0[k] = pa | NORMAL_RW_NX | VALID | TABLE_OR_PAGE;
        }
        t.l2_ram.0[block] = addr_of!(t.l3_kernel[j]) as u64 | VALID | TABLE_OR_PAGE;
        t.l2_alias.0[block] = addr_of!(t.l3_alias[j]) as u64 | VALID | TABLE_OR_PAGE;
    }
    for (table, base) in t.l3_modules.iter_mut().zip(MODULE_BLOCKS) {
        let block = ((base - RAM_BASE) / BLOCK_2M) as usize;
        for (k, d) in table.0.iter_mut().enumerate() {
            *d = module_page(base + k as u64 * PAGE, ModulePerm::ReadWrite);
        }
        t.l2_ram.0[block] = addr_of!(*table) as u64 | VALID | TABLE_OR_PAGE;
        t.l2_alias.0[block] = base | NORMAL_RW_NX | VALID;
    }
    // The tables were written with the MMU (so the data cache) off, and the walker reads
    // them cacheable (TCR IRGN0/ORGN0): drop any line a cache may still hold for them,
    // as Linux does for its boot tables.
    let start = addr_of!(*t) as u64;
    let end = start + core::mem::size_of::<Tables>() as u64;
    for line in (start..end).step_by(64) {
        // SAFETY: cleaning and invalidating a data cache line of our own tables only
        // writes back (nothing dirty: caches were off) and drops it.
        unsafe { core::arch::asm!("dc civac, {}", in(reg) line, options(nostack)) };
    }
    // SAFETY: a barrier only.
    unsafe { core::arch::asm!("dsb sy", options(nostack)) };
    let sctlr: u64;
    // SAFETY: reading SCTLR_EL1 at EL1 has no side effect.
    unsafe { core::arch::asm!("mrs {}, SCTLR_EL1", out(reg) sctlr, options(nomem, nostack)) };
    let regs = [
        MAIR,
        TCR,
        addr_of!(t.l1) as u64,
        (sctlr | SCTLR_ON) & !SCTLR_A,
    ];
    // SAFETY: CPU 0 alone writes MMU_REGS, before it starts any other CPU; the other
    // CPUs read it with their MMU off, so the line is cleaned to the point of coherency.
    unsafe {
        let p = core::ptr::addr_of_mut!(MMU_REGS);
        p.write_volatile(regs);
        core::arch::asm!("dc civac, {}", "dsb sy", in(reg) p as u64, options(nostack));
    }
    Ok(())
}

/// Turns the MMU on, on the running CPU, with the tables [`init`] built.
///
/// # Safety
///
/// [`init`] succeeded; the caller runs identity mapped code at EL1 (all of the kernel
/// is), so execution continues at the next instruction under translation.
pub unsafe fn enable() {
    // SAFETY: init() filled MMU_REGS and only reads it here.
    let [mair, tcr, ttbr0, sctlr] = unsafe { core::ptr::addr_of!(MMU_REGS).read_volatile() };
    // SAFETY: the caller's contract: the tables identity map all of the kernel, so the
    // instruction after `msr SCTLR_EL1` is fetched from the same address translated.
    unsafe {
        core::arch::asm!(
            "msr MAIR_EL1, {mair}",
            "msr TCR_EL1, {tcr}",
            "msr TTBR0_EL1, {ttbr0}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            "msr SCTLR_EL1, {sctlr}",
            "isb",
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr0 = in(reg) ttbr0,
            sctlr = in(reg) sctlr,
            options(nostack),
        );
    }
}

/// The writable alias of kernel address `addr`, if `addr` is in the image.
pub fn alias(addr: u64) -> Option<u64> {
    let l = layout();
    (l.kernel_start..l.kernel_end)
        .contains(&addr)
        .then_some(addr + ALIAS_OFFSET)
}

/// The `TextPoker` for this kernel: writes text through the alias mapping (one aligned
/// 32-bit store per instruction), then `sync_icache` on the executable address;
/// `sync_cores` is [`super::smp::sync_cores`] (an `isb` on every online CPU).
#[derive(Debug, Default)]
pub struct AliasPoker {
    /// Synchronisation rounds run so far.
    pub rounds: u64,
}

impl TextPoker for AliasPoker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        let l = layout();
        let end = addr.checked_add(bytes.len() as u64);
        let alias = if end.is_some_and(|e| module_text(addr..e)) {
            addr + ALIAS_OFFSET
        } else if addr < l.text_start || end.is_none_or(|e| e > l.text_end) {
            return Err(PokeError::new(addr, PokeFailure::NotText));
        } else if let Some(alias) = alias(addr) {
            alias
        } else {
            return Err(PokeError::new(addr, PokeFailure::NotMapped));
        };
        if addr.is_multiple_of(4) && bytes.len() == 4 {
            let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            // SAFETY: `alias` maps the text page RW (it is in the image); the store is
            // one aligned 32-bit store, single-copy atomic for a CPU fetching `addr`.
            unsafe { (alias as *mut u32).write_volatile(word) };
        } else {
            for (i, &b) in bytes.iter().enumerate() {
                // SAFETY: as above, byte by byte (not a live instruction: the caller's
                // contract says no CPU executes these bytes).
                unsafe { ((alias as usize + i) as *mut u8).write_volatile(b) };
            }
        }
        // SAFETY: `addr .. addr + len` is mapped (text, readable) at `addr`.
        unsafe { sync_icache(addr, bytes.len()) };
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.rounds += 1;
        super::smp::sync_cores();
    }

    fn end(&mut self) {}
}

// ---------------------------------------------------------------------------------------
// The module block: where loaded modules live (see `module_arena`).

/// First byte of the module block (the 2 MiB block after the kernel's two; within
/// `bl`/`b` reach, ±128 MiB, of the kernel text both ways).
pub const MODULE_BASE: u64 = RAM_BASE + 4 * BLOCK_2M;
/// First byte of the far module block, 160 MiB into RAM: out of `bl` reach of the kernel
/// text, so a module there calls the kernel through the loader's veneers.
pub const FAR_MODULE_BASE: u64 = RAM_BASE + 80 * BLOCK_2M;
const MODULE_BLOCKS: [u64; 2] = [MODULE_BASE, FAR_MODULE_BASE];
/// Size of the module block.
pub const MODULE_SIZE: u64 = BLOCK_2M;
/// Page size of the module block.
pub const PAGE_SIZE: u64 = PAGE;

/// The permissions of one module page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModulePerm {
    /// Read + execute (module text, veneers).
    ReadExec,
    /// Read-only, never executable.
    Read,
    /// Read + write, never executable (data, bss, free pages).
    ReadWrite,
}

/// The module block's address range.
pub fn module_range() -> core::ops::Range<u64> {
    MODULE_BASE..MODULE_BASE + MODULE_SIZE
}

/// The far module block's address range.
pub fn far_module_range() -> core::ops::Range<u64> {
    FAR_MODULE_BASE..FAR_MODULE_BASE + MODULE_SIZE
}

/// The module block (index into `l3_modules`) holding all of `range`.
fn module_block(range: &core::ops::Range<u64>) -> Option<usize> {
    MODULE_BLOCKS
        .iter()
        .position(|&b| b <= range.start && range.end <= b + MODULE_SIZE)
}

/// The level-3 descriptor of module page `pa` with `perm` (never writable and executable).
fn module_page(pa: u64, perm: ModulePerm) -> u64 {
    let perms = match perm {
        ModulePerm::ReadExec => AP_RO | UXN,
        ModulePerm::Read => AP_RO | PXN | UXN,
        ModulePerm::ReadWrite => PXN | UXN,
    };
    pa | ATTR_NORMAL | SH_INNER | AF | perms | VALID | TABLE_OR_PAGE
}

/// The module page holding `addr`'s descriptor slot, if `addr` is in the block.
fn module_slot(addr: u64) -> Option<*mut u64> {
    let b = module_block(&(addr..addr.checked_add(1)?))?;
    let i = ((addr - MODULE_BLOCKS[b]) / PAGE) as usize;
    // SAFETY: only the address of an element is taken (no reference is formed).
    Some(unsafe { core::ptr::addr_of_mut!(TABLES.l3_modules[b].0[i]) })
}

/// What the translation tables say about the module page at `addr`: `(writable,
/// executable)` at EL1, or `None` outside the block.
pub fn module_page_perms(addr: u64) -> Option<(bool, bool)> {
    // SAFETY: a volatile read of an initialised descriptor (written only by CPU 0).
    let d = unsafe { module_slot(addr)?.read_volatile() };
    Some((d & AP_RO == 0, d & PXN == 0))
}

/// Module pages whose descriptor is writable and executable at once (must be 0).
pub fn module_wx_pages() -> usize {
    module_range()
        .chain(far_module_range())
        .step_by(PAGE as usize)
        .filter(|&a| module_page_perms(a) == Some((true, true)))
        .count()
}

/// Whether `range` lies in executable pages of one module block.
fn module_text(range: core::ops::Range<u64>) -> bool {
    range.start < range.end
        && module_block(&range).is_some()
        && (range.start & !(PAGE - 1)..range.end)
            .step_by(PAGE as usize)
            .all(|a| module_page_perms(a).is_some_and(|(_, x)| x))
}

/// Gives the module pages `[addr, addr + len)` the permissions `perm`, invalidates
/// their TLB entries on every CPU (`tlbi vaae1is`: inner shareable, so every CPU of
/// `virt`), and, for [`ModulePerm::ReadExec`], makes what was written through the data
/// side visible to instruction fetch (`sync_icache`). Refuses a range outside the block
/// or not page aligned, changing nothing.
///
/// # Safety
///
/// The pages belong to the caller; nothing executes them unless `perm` allows it, and
/// nothing writes them through this mapping unless `perm` is [`ModulePerm::ReadWrite`].
pub unsafe fn protect_module(addr: u64, len: usize, perm: ModulePerm) -> Result<(), &'static str> {
    let end = addr.checked_add(len as u64).ok_or("range overflows")?;
    if !addr.is_multiple_of(PAGE) || !(len as u64).is_multiple_of(PAGE) {
        return Err("not page aligned");
    }
    if module_block(&(addr..end)).is_none() {
        return Err("outside the module blocks");
    }
    for page in (addr..end).step_by(PAGE as usize) {
        let slot = module_slot(page).ok_or("outside the module block")?;
        // SAFETY: our own descriptor of a page the caller owns; a change of permissions
        // only (same output address, attributes and size: no break-before-make needed);
        // `dsb ishst` makes the store visible to the walkers before the `tlbi`.
        unsafe {
            slot.write_volatile(module_page(page, perm));
            core::arch::asm!(
                "dsb ishst",
                "tlbi vaae1is, {}",
                in(reg) page >> 12,
                options(nostack),
            );
        }
    }
    // SAFETY: barriers only: the invalidations complete on every CPU, then this CPU
    // refetches under the new permissions.
    unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
    if perm == ModulePerm::ReadExec && len > 0 {
        // SAFETY: the pages are mapped and readable at `addr`.
        unsafe { sync_icache(addr, len) };
    }
    Ok(())
}
