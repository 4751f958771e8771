//! Loadable modules (issue 5), checked inside the booted kernel.
//!
//! The xtask builds three modules before the kernel and `ksites embed`s them (see
//! `xtask/src/modules.rs`); `build.rs` includes them here ([`RMOD`], [`CMOD`],
//! [`BADMOD`]):
//!
//! * `rmod`: Rust `#![no_std]` (`qemu-tests/modules/rmod`);
//! * `cmod`: C, gcc (`qemu-tests/modules/cmod.c`);
//! * `badmod`: C, calls `no_such_kernel_function`, which the kernel does not export.
//!
//! Modules live in the [`arena`]; these tests check it first (allocate, protect,
//! patch module text through both pokers, free, reuse).

use kernel_loader::patch::TextPoker;

use crate::arena::{self, Arena, Perm};
use crate::harness::{Harness, Msg};
use crate::poker::{ALIAS_STATS, AliasPoker, WpPoker};
use crate::{ensure, paging, println};

/// Bytes aligned for the ELF reader (section headers and symbols are read in place).
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(pub T);

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// `mov eax, imm32; ret`.
fn ret_imm(imm: u32) -> [u8; 6] {
    let i = imm.to_le_bytes();
    [0xb8, i[0], i[1], i[2], i[3], 0xc3]
}

/// Calls the `ret_imm` code at `addr`.
///
/// # Safety
///
/// `addr` holds `ret_imm` code in an executable page.
unsafe fn call_at(addr: u64) -> u32 {
    // SAFETY: the caller guarantees a complete `mov eax, imm32; ret` there, executable;
    // it follows the C ABI for `fn() -> u32`.
    let f = unsafe { core::mem::transmute::<usize, extern "C" fn() -> u32>(addr as usize) };
    f()
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: only called on mapped arena pages.
    unsafe { core::ptr::read_volatile(addr as usize as *const u8) }
}

/// Allocate, fill, protect read + execute, run, patch through both pokers, free, reuse.
fn arena_alloc_protect_poke_free() -> Result<(), Msg> {
    let mut a = Arena;
    let before = a.usage();
    let pages = a.alloc(3 * 4096 - 100).ok_or("alloc of 3 pages failed")?;
    ensure!(pages.len == 3 * 4096, "len {}", pages.len);
    ensure!(pages.addr.is_multiple_of(4096), "addr {:#x}", pages.addr);
    let arena = arena::range();
    ensure!(
        arena.start <= pages.addr && pages.range().end <= arena.end,
        "{:#x?} outside the arena {:#x?}",
        pages.range(),
        arena
    );
    ensure!(a.usage().used == before.used + 3, "usage {:?}", a.usage());
    let text = paging::text_range();
    let reach = pages
        .range()
        .end
        .abs_diff(text.start)
        .max(text.end.abs_diff(pages.addr));
    ensure!(reach < 1 << 31, "arena not within rel32 of the kernel text");
    for off in (0..pages.len as u64).step_by(4096) {
        let p = paging::translate(pages.addr + off).ok_or("arena page not mapped")?;
        ensure!(
            p.writable && (!p.executable || !crate::cpu::nx_enabled()) && p.size == 4096,
            "fresh page {:#x}: {:?}",
            pages.addr + off,
            p
        );
        ensure!(read_u8(pages.addr + off) == 0, "fresh page not zeroed");
    }

    // Code at the start of page 0, and straddling pages 0 and 1 (the alias poker splits).
    let code = pages.addr;
    let straddle = pages.addr + 4096 - 3;
    for (at, imm) in [(code, 0x1111_1111u32), (straddle, 0x2222_2222)] {
        for (i, b) in ret_imm(imm).iter().enumerate() {
            // SAFETY: writable, ours, in bounds.
            unsafe { core::ptr::write_volatile((at as usize + i) as *mut u8, *b) };
        }
    }
    // SAFETY: our pages; nothing else uses them.
    unsafe { arena::protect(pages.addr, 2 * 4096, Perm::ReadExec) }.map_err(Msg::from)?;
    // SAFETY: the third page stays data; ours.
    unsafe { arena::protect(pages.addr + 2 * 4096, 4096, Perm::Read) }.map_err(Msg::from)?;
    let p = paging::translate(code).ok_or("code page unmapped")?;
    ensure!(
        !p.writable && p.executable,
        "code page after protect: {:?}",
        p
    );
    let r = paging::translate(pages.addr + 2 * 4096).ok_or("data page unmapped")?;
    ensure!(
        !r.writable && (!r.executable || !crate::cpu::nx_enabled()),
        "read-only page after protect: {:?}",
        r
    );
    // SAFETY: both hold `ret_imm` code, now executable.
    let (x, y) = unsafe { (call_at(code), call_at(straddle)) };
    ensure!(x == 0x1111_1111 && y == 0x2222_2222, "ran {x:#x} {y:#x}");

    let violations = ALIAS_STATS
        .violations
        .load(core::sync::atomic::Ordering::SeqCst);
    let mut alias = AliasPoker::default();
    alias.begin().map_err(Msg::display)?;
    for (at, imm) in [(code, 0x3333_3333u32), (straddle, 0x4444_4444)] {
        // SAFETY: the immediates of our own code, which no other CPU runs.
        unsafe { alias.write(at + 1, &imm.to_le_bytes()) }.map_err(Msg::display)?;
    }
    alias.sync_cores();
    alias.end();
    // SAFETY: still complete `ret_imm` code.
    let (x, y) = unsafe { (call_at(code), call_at(straddle)) };
    ensure!(
        x == 0x3333_3333 && y == 0x4444_4444,
        "after AliasPoker: {x:#x} {y:#x}"
    );
    let after = ALIAS_STATS
        .violations
        .load(core::sync::atomic::Ordering::SeqCst);
    ensure!(
        after == violations,
        "AliasPoker found {} violations",
        after - violations
    );

    let mut wp = WpPoker::default();
    wp.begin().map_err(Msg::display)?;
    // SAFETY: as above.
    unsafe { wp.write(code + 1, &0x5555_5555u32.to_le_bytes()) }.map_err(Msg::display)?;
    wp.sync_cores();
    wp.end();
    // SAFETY: as above.
    let x = unsafe { call_at(code) };
    ensure!(x == 0x5555_5555, "after WpPoker: {x:#x}");
    let p = paging::translate(code).ok_or("code page unmapped")?;
    ensure!(
        !p.writable && p.executable,
        "code page after poking: {:?}",
        p
    );
    let wx = paging::wx_scan();
    ensure!(wx.violations == 0, "W^X: {:?}", wx);

    let addr = pages.addr;
    // SAFETY: nothing runs or points into the pages any more.
    unsafe { a.free(pages) };
    ensure!(a.usage() == before, "usage after free {:?}", a.usage());
    let again = a.alloc(3 * 4096).ok_or("realloc failed")?;
    ensure!(again.addr == addr, "reuse: {:#x} != {addr:#x}", again.addr);
    for off in (0..again.len as u64).step_by(4096) {
        let p = paging::translate(again.addr + off).ok_or("page unmapped")?;
        ensure!(p.writable, "reused page {off:#x} not writable");
        ensure!(read_u8(again.addr + off) == 0, "reused page not zeroed");
    }
    // SAFETY: unused.
    unsafe { a.free(again) };

    ensure!(a.alloc(0).is_none(), "alloc(0) succeeded");
    ensure!(
        a.alloc(arena::ARENA_SIZE + 1).is_none(),
        "alloc beyond the arena succeeded"
    );
    let text_start = paging::text_range().start;
    // SAFETY: refused before any page is touched (outside the arena).
    let outside = unsafe { arena::protect(text_start, 4096, Perm::ReadWrite) };
    ensure!(outside.is_err(), "protect outside the arena accepted");
    ensure!(a.usage() == before, "usage at the end {:?}", a.usage());
    Ok(())
}

/// Each embedded module is an x86-64 ELF relocatable object.
fn modules_embedded() -> Result<(), Msg> {
    for (name, bytes) in [("rmod", &RMOD.0), ("cmod", &CMOD.0), ("badmod", &BADMOD.0)] {
        ensure!(
            !bytes.is_empty(),
            "{name}.ko was not built into the kernel (run `cargo xtask qemu`)"
        );
        ensure!(
            bytes.starts_with(b"\x7fELF\x02\x01"),
            "{name}: not ELF64 LE"
        );
        let e_type = u16::from_le_bytes([bytes[16], bytes[17]]);
        let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
        ensure!(
            e_type == 1 && machine == 62,
            "{name}: e_type {e_type}, e_machine {machine} (want ET_REL, x86-64)"
        );
        println!(
            "modules: {name}.ko embedded, {} bytes at {:#x}",
            bytes.len(),
            bytes.as_ptr() as u64
        );
    }
    Ok(())
}

/// Runs the module tests.
pub fn run(h: &mut Harness) {
    let r = arena::range();
    println!(
        "modules: arena {:#x}..{:#x} ({} pages)",
        r.start,
        r.end,
        arena::ARENA_PAGES
    );
    h.check(
        "module_arena_alloc_protect_poke_free",
        arena_alloc_protect_poke_free(),
    );
    h.check("modules_embedded_are_et_rel", modules_embedded());
}
