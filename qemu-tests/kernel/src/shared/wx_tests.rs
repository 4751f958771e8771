//! W^X of the kernel's own mappings and patching through the alias, checked with
//! caught faults: text and rodata refuse stores, data and rodata refuse execution (each
//! with a control that the same path works where it should), and code patched through
//! `AliasPoker` runs after its synchronisation. The platform runs them under its own
//! names (`<arch>_text_is_not_writable`, `<arch>_data_is_not_executable`,
//! `<arch>_sync_icache_makes_new_code_visible`).

use core::sync::atomic::{AtomicU32, Ordering};

use kernel_loader::TextPoker;

use super::testing::{self, ret_imm};
use crate::arch::exceptions::{try_call, try_store};
use crate::arch::mmu::{self, AliasPoker};
use crate::harness::{Msg, TestResult};
use crate::{ensure, msg};

static RODATA_WORD: u32 = 0x1234_5678;
static DATA_WORD: AtomicU32 = AtomicU32::new(5);

/// `ret_imm(7)` in writable data.
static DATA_CODE: [AtomicU32; 2] = [AtomicU32::new(ret_imm(7)[0]), AtomicU32::new(ret_imm(7)[1])];
/// `ret_imm(8)` in rodata.
static RODATA_CODE: [u32; 2] = ret_imm(8);

/// Stores to text (the canary function) and rodata fault as permission faults of a
/// store and change nothing; a store to data works.
pub fn text_is_not_writable() -> TestResult {
    let canary = testing::text_canary();
    let text = canary as usize as u64;
    // SAFETY: text is mapped readable.
    let before = unsafe { (text as *const u32).read_volatile() };
    // SAFETY: a store to text is expected to fault; were it to succeed it would write
    // the canary's own first instruction back inverted, which the test then reports.
    match unsafe { try_store(text, !before) } {
        Ok(()) => return Err(msg!("a store to text at {text:#x} succeeded")),
        Err(fault) => ensure!(
            testing::is_store_fault(&fault, text),
            "text: expected a store permission fault at {text:#x}, got {fault:?}"
        ),
    }
    // SAFETY: as above.
    let after = unsafe { (text as *const u32).read_volatile() };
    ensure!(after == before, "text changed: {before:#x} -> {after:#x}");
    // SAFETY: the canary returns 42.
    let v = unsafe { canary() };
    ensure!(v == 42, "the canary returns {v}, not 42");
    let ro = core::ptr::addr_of!(RODATA_WORD) as u64;
    // SAFETY: expected to fault (rodata); a success is reported.
    match unsafe { try_store(ro, 0) } {
        Ok(()) => return Err(msg!("a store to rodata at {ro:#x} succeeded")),
        Err(fault) => ensure!(
            testing::is_store_fault(&fault, ro),
            "rodata: expected a store permission fault at {ro:#x}, got {fault:?}"
        ),
    }
    // The control: data is writable through the same path.
    let data = DATA_WORD.as_ptr() as u64;
    // SAFETY: DATA_WORD is this test's own word.
    unsafe { try_store(data, 9) }.map_err(|f| msg!("a store to data faulted: {f:?}"))?;
    ensure!(
        DATA_WORD.load(Ordering::SeqCst) == 9,
        "the data store was lost"
    );
    Ok(())
}

/// Calls into data and rodata (holding `ret_imm` code) fault as fetch permission
/// faults at the called address; a call to text works.
pub fn data_is_not_executable() -> TestResult {
    for (what, addr) in [
        ("data", DATA_CODE.as_ptr() as u64),
        ("rodata", RODATA_CODE.as_ptr() as u64),
    ] {
        // SAFETY: expected to fault (NX); were it executable it is `ret_imm(N)`.
        match unsafe { try_call(addr) } {
            Ok(v) => return Err(msg!("{what} at {addr:#x} executed (returned {v})")),
            Err(fault) => ensure!(
                testing::is_exec_fault(&fault, addr),
                "{what}: expected a fetch permission fault at {addr:#x}, got {fault:?}"
            ),
        }
    }
    // The control: text runs through the same path.
    let text = testing::text_canary() as usize as u64;
    // SAFETY: the canary returns 42.
    let v = unsafe { try_call(text) }.map_err(|f| msg!("calling text faulted: {f:?}"))?;
    ensure!(v == 42, "the canary returned {v}");
    Ok(())
}

/// The patch page is not writable at its own address; each `ret_imm(n)` first word
/// written through `AliasPoker` and synchronised runs at once; the poker refuses data.
pub fn sync_icache_makes_new_code_visible() -> TestResult {
    let f = testing::patch_page();
    let page = f as usize as u64;
    ensure!(
        page == mmu::layout().patch_page,
        "the patch page is not at __patch_page"
    );
    // SAFETY: expected to fault (text); were it writable, the page is the test's own.
    match unsafe { try_store(page, ret_imm(0)[1]) } {
        Ok(()) => return Err(msg!("the patch page is writable at its own address")),
        Err(fault) => ensure!(
            testing::is_store_fault(&fault, page),
            "patch page: expected a store permission fault at {page:#x}, got {fault:?}"
        ),
    }
    let mut poker = AliasPoker::default();
    // SAFETY: the page is this test's own code; nothing else executes it.
    let call = || unsafe { f() };
    ensure!(
        call() == 1,
        "the patch page returns {} before patching",
        call()
    );
    for n in [1234u16, 1432, 7] {
        // SAFETY: an aligned instruction of the test's own page, which no CPU runs now.
        unsafe { poker.write(page, &ret_imm(n)[0].to_le_bytes()) }.map_err(Msg::display)?;
        poker.sync_cores();
        let got = call();
        ensure!(
            got == u64::from(n),
            "after patching in ret_imm({n}) the page returns {got}"
        );
    }
    // The poker refuses anything but text.
    let data = DATA_WORD.as_ptr() as u64;
    // SAFETY: refused before any write (not text).
    let refused = unsafe { poker.write(data, &[0; 4]) };
    ensure!(refused.is_err(), "the poker wrote to data at {data:#x}");
    Ok(())
}
