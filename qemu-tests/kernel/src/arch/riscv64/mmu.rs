//! Sv39 paging: an identity map with W^X permissions, and a writable alias of the kernel
//! image through which text is patched.
//!
//! | VA | maps | as |
//! |---|---|---|
//! | 0 .. 1 GiB | the same PA (UART, sifive_test, CLINT, PLIC…) | one gigapage R W, never executable |
//! | 2 .. 2.25 GiB | RAM (the same PA) | 2 MiB megapages R W, not executable |
//! | the kernel's 2 MiB blocks | RAM | 4 KiB pages: text R X, rodata R, the rest R W |
//! | `addr` + [`ALIAS_OFFSET`] | the kernel image's PA | 4 KiB pages R W: the patching alias |
//! | [`MODULE_BASE`], [`FAR_MODULE_BASE`]: 2 MiB each | RAM | 4 KiB pages, each R X, R or R W ([`protect_module`]) |
//! | each module block + [`ALIAS_OFFSET`] | the block's PA | one 2 MiB megapage R W |
//!
//! Text is never writable through its own mapping: a patch writes through the alias and
//! then runs `fence.i` (the store and the fetch reach the same physical memory; `fence.i`
//! orders this hart's fetches after its stores). Other harts get a `fence.i` from
//! [`super::smp::sync_cores`]. Every leaf has A (and, when writable, D) set, so no
//! access/dirty update is ever needed.

use core::ptr::addr_of;

use kernel_loader::patch::PokeFailure;
use kernel_loader::{PokeError, TextPoker};

use super::{boot, sbi, smp};

/// Start of RAM on QEMU `virt`.
pub const RAM_BASE: u64 = 0x8000_0000;
/// RAM the kernel maps (the xtask boots with `-m 256M`).
pub const RAM_SIZE: u64 = 256 << 20;
/// The alias of a kernel address `a` is `a + ALIAS_OFFSET` (root entry 3).
pub const ALIAS_OFFSET: u64 = 0x4000_0000;
const BLOCK_2M: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// The kernel image may span this many 2 MiB blocks (each gets a level-0 table).
const KERNEL_BLOCKS: usize = 2;

// PTE bits (privileged spec, Sv39).
const V: u64 = 1 << 0;
const R: u64 = 1 << 1;
const W: u64 = 1 << 2;
const X: u64 = 1 << 3;
const G: u64 = 1 << 5;
const A: u64 = 1 << 6;
const D: u64 = 1 << 7;
const RW: u64 = R | W | A | D | G | V;
/// `satp.MODE` = Sv39.
const SATP_SV39: u64 = 8 << 60;

/// A PTE pointing at physical address `pa` with `flags`.
const fn pte(pa: u64, flags: u64) -> u64 {
    ((pa >> 12) << 10) | flags
}

/// The physical address a PTE points at.
const fn pte_pa(pte: u64) -> u64 {
    ((pte >> 10) & ((1 << 44) - 1)) << 12
}

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[repr(C)]
struct Tables {
    root: Table,
    l1_ram: Table,
    l1_alias: Table,
    l0_kernel: [Table; KERNEL_BLOCKS],
    l0_alias: [Table; KERNEL_BLOCKS],
    l0_modules: [Table; 2],
}

const EMPTY: Table = Table([0; 512]);
static mut TABLES: Tables = Tables {
    root: EMPTY,
    l1_ram: EMPTY,
    l1_alias: EMPTY,
    l0_kernel: [EMPTY, EMPTY],
    l0_alias: [EMPTY, EMPTY],
    l0_modules: [EMPTY, EMPTY],
};

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

/// The leaf PTE of kernel page `pa` under its own (identity) mapping.
fn kernel_page(l: &Layout, pa: u64) -> u64 {
    let perms = if (l.text_start..l.text_end).contains(&pa) {
        R | X | A | G | V
    } else if (l.rodata_start..l.data_start).contains(&pa) {
        R | A | G | V
    } else {
        RW
    };
    pte(pa, perms)
}

/// Builds the page tables (on CPU 0, paging off) and records `satp` for the other
/// harts. Returns an error message if the image does not fit the tables.
pub fn init() -> Result<(), &'static str> {
    let l = layout();
    if l.kernel_start < RAM_BASE || l.kernel_end > RAM_BASE + RAM_SIZE {
        return Err("the kernel image is outside the RAM mmu.rs maps");
    }
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
    t.root.0[0] = pte(0, RW);
    t.root.0[2] = pte(addr_of!(t.l1_ram) as u64, V);
    t.root.0[3] = pte(addr_of!(t.l1_alias) as u64, V);
    for i in 0..(RAM_SIZE / BLOCK_2M) as usize {
        t.l1_ram.0[i] = pte(RAM_BASE + i as u64 * BLOCK_2M, RW);
    }
    for j in 0..=(last - first) as usize {
        let block = first as usize + j;
        let base = RAM_BASE + block as u64 * BLOCK_2M;
        for k in 0..512 {
            let pa = base + k as u64 * PAGE;
            t.l0_kernel[j].0[k] = kernel_page(&l, pa);
            t.l0_alias[j].0[k] = pte(pa, RW);
        }
        t.l1_ram.0[block] = pte(addr_of!(t.l0_kernel[j]) as u64, V);
        t.l1_alias.0[block] = pte(addr_of!(t.l0_alias[j]) as u64, V);
    }
    for (table, base) in t.l0_modules.iter_mut().zip(MODULE_BLOCKS) {
        let block = ((base - RAM_BASE) / BLOCK_2M) as usize;
        for (k, d) in table.0.iter_mut().enumerate() {
            *d = module_page(base + k as u64 * PAGE, ModulePerm::ReadWrite);
        }
        t.l1_ram.0[block] = pte(addr_of!(*table) as u64, V);
        t.l1_alias.0[block] = pte(base, RW);
    }
    let satp = SATP_SV39 | (addr_of!(t.root) as u64 >> 12);
    // SAFETY: CPU 0 alone writes MMU_SATP, before it starts any other hart.
    unsafe { core::ptr::addr_of_mut!(boot::MMU_SATP).write_volatile(satp) };
    Ok(())
}

/// Turns paging on, on the running hart, with the tables [`init`] built.
///
/// # Safety
///
/// [`init`] succeeded; the caller runs identity mapped code (all of the kernel is), so
/// execution continues at the next instruction under translation.
pub unsafe fn enable() {
    // SAFETY: init() wrote MMU_SATP; only read here.
    let satp = unsafe { core::ptr::addr_of!(boot::MMU_SATP).read_volatile() };
    // SAFETY: the caller's contract: the tables identity map the kernel.
    unsafe {
        core::arch::asm!(
            "sfence.vma",
            "csrw satp, {satp}",
            "sfence.vma",
            satp = in(reg) satp,
            options(nostack),
        );
    }
}

/// `satp` as the running hart has it.
pub fn satp() -> u64 {
    let v: u64;
    // SAFETY: reading a CSR.
    unsafe { core::arch::asm!("csrr {}, satp", out(reg) v, options(nomem, nostack)) };
    v
}

/// Whether the running hart's page tables let the kernel read (`write` false) or write
/// `addr`: a software walk of the Sv39 tables `satp` names (RISC-V has no instruction
/// that translates without accessing). `false` with paging off, for an address outside
/// Sv39's range, an invalid entry, or a leaf without the permission.
pub fn translates(addr: u64, write: bool) -> bool {
    let satp = satp();
    if satp >> 60 != 8 || (addr as i64) << 25 >> 25 != addr as i64 {
        return false;
    }
    let mut table = (satp & ((1 << 44) - 1)) << 12;
    for level in (0..3).rev() {
        let index = (addr >> (12 + 9 * level)) & 0x1ff;
        // SAFETY: `table` is a page table this kernel built (identity mapped, R W);
        // reading an entry has no side effect.
        let e = unsafe { ((table + index * 8) as *const u64).read_volatile() };
        if e & V == 0 {
            return false;
        }
        if e & (R | W | X) != 0 {
            return e & if write { W } else { R } != 0;
        }
        table = pte_pa(e);
    }
    false
}

/// The writable alias of kernel address `addr`, if `addr` is in the image.
pub fn alias(addr: u64) -> Option<u64> {
    let l = layout();
    (l.kernel_start..l.kernel_end)
        .contains(&addr)
        .then_some(addr + ALIAS_OFFSET)
}

/// The writable alias of `[addr, addr + len)` if all of it is kernel text or
/// executable module pages, else `None`.
pub fn text_alias(addr: u64, len: usize) -> Option<u64> {
    let l = layout();
    let end = addr.checked_add(len as u64)?;
    if module_text(addr..end) {
        return Some(addr + ALIAS_OFFSET);
    }
    if addr < l.text_start || end > l.text_end {
        return None;
    }
    alias(addr)
}

/// Writes `bytes` at text address `addr` through the alias (one aligned 32-bit store per
/// aligned 4-byte instruction, else bytes), then `fence.i` on this hart. Returns
/// `false`, writing nothing, if `addr..` is not text.
///
/// # Safety
///
/// No hart executes the bytes being changed while they change, unless each change is
/// one aligned 32-bit store of a whole instruction.
pub unsafe fn write_text(addr: u64, bytes: &[u8]) -> bool {
    let Some(alias) = text_alias(addr, bytes.len()) else {
        return false;
    };
    if addr.is_multiple_of(4) && bytes.len() == 4 {
        let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        // SAFETY: `alias` maps the text page RW, 4-aligned.
        let old = unsafe { (alias as *const u32).read_volatile() };
        if tears_harmfully(old, word) {
            // SAFETY: as above: the low half alone, one aligned 16-bit store.
            unsafe { (alias as *mut u16).write_volatile(word as u16) };
            riscv::asm::fence_i();
            // Every other hart takes an interrupt, so a translation that read the old
            // low half has finished before the high half changes.
            smp::tear_barrier();
        }
        // SAFETY: `alias` maps the text page RW; one aligned 32-bit store, single-copy
        // atomic for a hart fetching `addr`.
        unsafe { (alias as *mut u32).write_volatile(word) };
    } else {
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: as above, byte by byte (the caller's contract: nobody runs them).
            unsafe { ((alias as usize + i) as *mut u8).write_volatile(b) };
        }
    }
    riscv::asm::fence_i();
    true
}

/// `nop` (`addi x0, x0, 0`) and `ret` (`jalr x0, 0(ra)`): the low halves of the
/// disabled forms of the probe sites that change both halves of their word.
const NOP_LOW: u16 = 0x0013;
const RET_LOW: u16 = 0x8067;
/// The high half of `ebreak` (the enabled C tail site).
const EBREAK_HIGH: u16 = 0x0010;

/// Whether replacing instruction `old` by `new` with one 32-bit store can be *fetched
/// torn* in a way that runs something neither is, so [`write_text`] first stores the
/// new low half alone.
///
/// QEMU's RISC-V translator reads a 32-bit instruction as two 16-bit loads, low half
/// first, and with multi-threaded TCG another hart can translate a site while CPU 0's
/// store to it lands between the two loads (its host thread may be preempted there):
/// it then runs (old low half, new high half) — not the atomic fetch (Ziccif) that
/// the single-store protocol relies on and hardware gives. For a disable that is harmful:
/// `jal rd, stub` -> `nop` tears into `jal rd, (imm[15:12] << 12)` (the SMP stress
/// jumped from `c_fire_zero` into the middle of an unrelated function and faulted,
/// "unexpected exception 5 … stval=0x30"), and `ebreak` -> `ret` into `ecall`. The
/// enables are harmless torn (`nop`'s low half with any high half is `addi x0`, a
/// no-op; `ret`'s low half with `ebreak`'s high half is `jalr x0, 1(ra)`, a `ret`).
/// So [`write_text`] stores the new low half first, waits for one interrupt on every
/// other hart ([`smp::tear_barrier`]: a translation that read the old low half is
/// finished by then), then stores the word: a hart fetches old, (new low, old high)
/// or new, and the middle one is a harmless mix: `addi x0, …` (a no-op hint) for a
/// `nop`, `jalr x0, 1(ra)` for a `ret` over `ebreak`. Each state behaves as the old or
/// the new instruction, so the protocol's guarantee holds (on hardware too), at the
/// cost of a second store and an uncounted round for such a disable.
fn tears_harmfully(old: u32, new: u32) -> bool {
    let (old_high, new_low, new_high) = (old >> 16, new as u16, new >> 16);
    old_high != new_high
        && (new_low == NOP_LOW || (new_low == RET_LOW && old_high == u32::from(EBREAK_HIGH)))
}

/// The `TextPoker` for this kernel: writes kernel or module text through the alias
/// mapping ([`write_text`]: one aligned 32-bit store per instruction word, then a local
/// `fence.i`); `sync_cores` is [`super::smp::sync_cores`] (a `fence.i` on every online
/// hart).
#[derive(Debug, Default)]
pub struct AliasPoker {
    /// Synchronisation rounds run so far.
    pub rounds: u64,
}

impl TextPoker for AliasPoker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the engine's contract: nobody runs these bytes while they change,
        // unless the change is one aligned store of a whole instruction.
        if unsafe { write_text(addr, bytes) } {
            Ok(())
        } else {
            Err(PokeError::new(addr, PokeFailure::NotText))
        }
    }

    fn sync_cores(&mut self) {
        self.rounds += 1;
        smp::sync_cores();
    }

    fn end(&mut self) {}
}

// ---------------------------------------------------------------------------------------
// The module block: where loaded modules live (see `module_arena`).

/// First byte of the module block (the 2 MiB block after the kernel's two; within
/// `jal` reach, ±1 MiB, of nothing in particular, and `auipc`+`jalr` reach, ±2 GiB, of
/// the kernel text).
pub const MODULE_BASE: u64 = RAM_BASE + 4 * BLOCK_2M;
/// First byte of the far module block, 160 MiB into RAM (still within `auipc` reach of
/// the kernel: every module here is; the block mirrors the aarch64 platform's).
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

/// The module block (index into `l0_modules`) holding all of `range`.
fn module_block(range: &core::ops::Range<u64>) -> Option<usize> {
    MODULE_BLOCKS
        .iter()
        .position(|&b| b <= range.start && range.end <= b + MODULE_SIZE)
}

/// The leaf PTE of module page `pa` with `perm` (never writable and executable).
fn module_page(pa: u64, perm: ModulePerm) -> u64 {
    let perms = match perm {
        ModulePerm::ReadExec => R | X | A | G | V,
        ModulePerm::Read => R | A | G | V,
        ModulePerm::ReadWrite => RW,
    };
    pte(pa, perms)
}

/// The module page holding `addr`'s PTE slot, if `addr` is in a block.
fn module_slot(addr: u64) -> Option<*mut u64> {
    let b = module_block(&(addr..addr.checked_add(1)?))?;
    let i = ((addr - MODULE_BLOCKS[b]) / PAGE) as usize;
    // SAFETY: only the address of an element is taken (no reference is formed).
    Some(unsafe { core::ptr::addr_of_mut!(TABLES.l0_modules[b].0[i]) })
}

/// What the page tables say about the module page at `addr`: `(writable, executable)`,
/// or `None` outside the blocks.
pub fn module_page_perms(addr: u64) -> Option<(bool, bool)> {
    // SAFETY: a volatile read of an initialised PTE (written only by CPU 0).
    let d = unsafe { module_slot(addr)?.read_volatile() };
    debug_assert_eq!(pte_pa(d), addr & !(PAGE - 1));
    Some((d & W != 0, d & X != 0))
}

/// Module pages whose PTE is writable and executable at once (must be 0).
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

/// Gives the module pages `[addr, addr + len)` the permissions `perm`, flushes their
/// translations on this hart (`sfence.vma`) and every other online hart (SBI remote
/// `sfence.vma`), and, for [`ModulePerm::ReadExec`], runs `fence.i` here (other harts
/// get theirs from the next `sync_cores`, before they run the code). Refuses a range
/// outside the blocks or not page aligned, changing nothing.
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
        // SAFETY: our own PTE of a page the caller owns; a change of permissions only.
        unsafe { slot.write_volatile(module_page(page, perm)) };
    }
    // SAFETY: orders the PTE stores before the walks the fences restart.
    unsafe { core::arch::asm!("fence rw, rw", "sfence.vma", options(nostack)) };
    let me = smp::cpu_index();
    let others = (0..smp::MAX_CPUS)
        .filter(|&c| c != me && smp::is_online(c))
        .filter_map(smp::hart_of)
        .filter(|&h| h < 64)
        .fold(0u64, |m, h| m | (1 << h));
    if others != 0 && len > 0 {
        sbi::remote_sfence_vma(others, addr as usize, len);
    }
    if perm == ModulePerm::ReadExec && len > 0 {
        riscv::asm::fence_i();
    }
    Ok(())
}
