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

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kernel_loader::format::{SiteKind, Table};
use kernel_loader::module::{Export, Kernel, Module, ModuleError, RUNTIME_EXPORTS};
use kernel_loader::patch::TextPoker;
use kernel_loader::probe::{self, ProbeId};
use kernel_loader::key::StaticKey;
use kernel_loader::{CpuFeatures, cell};

use crate::arena::{self, Arena, Perm};
use crate::harness::{Harness, Msg};
use crate::ifunc_tests::{raw_choice, read_bytes, read_slot, ref_crc32c, ref_popcount};
use crate::poker::{ALIAS_STATS, AliasPoker, WpPoker};
use crate::{ensure, msg, paging, println, retarget_tests, smp};

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

// ---------------------------------------------------------------------------------------
// Loading modules.

/// The kernel's exports besides the loader's runtime entry points: its ifuncs, under
/// their plain names (what `ifunc_import!` / `KSITES_IFUNC_IMPORT` declare), the
/// retarget tests' ifunc, and the static key the modules use
/// ([`crate::key_tests::KEY_MOD`], as `ksites_test_key`).
static KERNEL_EXPORTS: [Export; 6] = [
    kernel_loader::export!(kfuncs::popcount),
    kernel_loader::export!(kfuncs::crc32c),
    kernel_loader::export!(kfuncs::memcpy),
    kernel_loader::export!(kfuncs::sum_u32),
    kernel_loader::export!(retarget_tests::retarget_tag),
    Export::new(
        "ksites_test_key",
        &crate::key_tests::KEY_MOD as *const StaticKey as *const (),
    ),
];
static RUNTIME: [Export; RUNTIME_EXPORTS.len()] = RUNTIME_EXPORTS;

/// What the module tests load against.
pub(crate) struct Env {
    table: Table<'static>,
    exec: [Range<u64>; 1],
    features: CpuFeatures,
}

impl Env {
    pub(crate) fn new() -> Result<Env, Msg> {
        let exec = [paging::text_range()];
        // SAFETY: as in ifunc_tests: the image was embedded; the table is mapped
        // read-only and nothing writes it.
        let table = unsafe { cell::image_table(&exec) }.map_err(Msg::display)?;
        Ok(Env {
            table,
            exec,
            features: CpuFeatures::detect(),
        })
    }

    /// Loads `bytes` as `name` into the arena, patching through an [`AliasPoker`].
    pub(crate) fn load(&self, name: &'static str, bytes: &'static [u8]) -> Result<Module<'static>, Msg> {
        let (m, _) = self.try_load(name, bytes);
        m.map_err(|e| msg!("loading {name}: {e}"))
    }

    /// Like [`Env::load`], returning the error and the poker's write count.
    fn try_load(
        &self,
        name: &'static str,
        bytes: &'static [u8],
    ) -> (Result<Module<'static>, ModuleError>, usize) {
        let symbols = (&RUNTIME, &KERNEL_EXPORTS);
        let kernel = Kernel {
            symbols: &symbols,
            table: Some(self.table),
            exec: &self.exec,
            features: self.features,
        };
        let mut poker = AliasPoker::default();
        // SAFETY: the arena is executable once protected and within rel32 of the kernel;
        // the poker writes any arena page and syncs every CPU; `kernel` is this kernel;
        // the #BP hook calls `probe::handle_int3`; the modules are ours (trusted).
        let r = unsafe { Module::load(name, bytes, &kernel, &mut Arena, &mut poker) };
        (r, poker.writes)
    }
}

/// Unloads `m` (through an [`AliasPoker`]).
#[allow(clippy::result_large_err)]
fn unload(m: Module<'static>) -> Result<(), (Module<'static>, ModuleError)> {
    let mut poker = AliasPoker::default();
    // SAFETY: the tests call module code only from this CPU and not concurrently; the
    // module's probes are disabled by unload.
    unsafe { m.unload(&mut Arena, &mut poker) }
}

pub(crate) fn unload_ok(m: Module<'static>) -> Result<(), Msg> {
    let name = m.name();
    unload(m).map_err(|(_, e)| msg!("unloading {name}: {e}"))
}

fn sym(m: &Module<'_>, name: &str) -> Result<u64, Msg> {
    m.symbol(name)
        .ok_or_else(|| msg!("{}: no symbol {name}", m.name()))
}

/// A module function `extern "C" fn(..) -> R` by name.
///
/// # Safety
///
/// The module defines `name` with exactly type `F`, and stays loaded while it is used.
pub(crate) unsafe fn func<F: Copy>(m: &Module<'_>, name: &str) -> Result<F, Msg> {
    let addr = sym(m, name)?;
    ensure!(
        m.text().contains(&addr),
        "{name} at {addr:#x} not in the module's text"
    );
    ensure!(
        size_of::<F>() == size_of::<usize>(),
        "{name}: not a function pointer type"
    );
    // SAFETY: `F` is a function pointer type of the symbol's signature (caller).
    Ok(unsafe { core::mem::transmute_copy::<usize, F>(&(addr as usize)) })
}

// rmod's `rmod_mix` tags (qemu-tests/modules/rmod/src/lib.rs; the kernel must not
// link the module crate itself).
const MIX_AVX2: u64 = 0xa2a2_0000_0000_0000;
const MIX_POPCNT: u64 = 0x9c9c_0000_0000_0000;
const MIX_BASE: u64 = 0xbaba_0000_0000_0000;

type FnU64 = extern "C" fn() -> u64;
type FnU64U64 = extern "C" fn(u64) -> u64;
type Fn3 = extern "C" fn(u64, u64, u64) -> u64;
type Fn2 = extern "C" fn(u64, u64) -> u64;
type FnI32 = extern "C" fn() -> i32;
type FnSum = unsafe extern "C" fn(*const u64, usize) -> u64;
type FnCrc = unsafe extern "C" fn(*const u8, usize) -> u32;

/// Every site of `m` that calls a kernel ifunc is a direct branch to the implementation
/// the kernel's slot holds; both imports have sites. Returns the number checked.
fn check_import_sites(env: &Env, m: &Module<'_>) -> Result<usize, Msg> {
    let t = m.table().ok_or_else(|| msg!("{}: no table", m.name()))?;
    let mut checked = 0;
    for import in ["popcount", "crc32c"] {
        let f = t
            .ifuncs()
            .find(|f| f.imported && f.name == import)
            .ok_or_else(|| msg!("{}: no import {import}", m.name()))?;
        let k = env
            .table
            .ifuncs()
            .find(|k| k.trampoline == f.trampoline)
            .ok_or_else(|| msg!("{}: {import} is not a kernel ifunc", m.name()))?;
        let chosen = read_slot(k.slot);
        let mut n = 0;
        for s in t.sites().filter(|s| s.ifunc == f.index) {
            ensure!(
                m.text().contains(&s.addr),
                "site {:#x} outside the module",
                s.addr
            );
            let b: [u8; 8] = read_bytes(s.addr);
            let p = s.prefixes as usize;
            let op_ok = match s.kind {
                SiteKind::Call => b[p] == 0xe8,
                SiteKind::Jmp => b[p] == 0xe9,
                SiteKind::Jcc => b[p] == 0x0f && b[p + 1] & 0xf0 == 0x80,
            };
            ensure!(
                op_ok,
                "{} site {:#x} ({import}): {:02x?}",
                m.name(),
                s.addr,
                &b[..s.len()]
            );
            let at = s.len() - 4;
            let rel = i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let target = s.end().wrapping_add_signed(i64::from(rel));
            ensure!(
                target == chosen,
                "{} site {:#x} ({import}) targets {target:#x}, the kernel chose {} at {chosen:#x}",
                m.name(),
                s.addr,
                kfuncs::impl_name(chosen as usize)
            );
            n += 1;
        }
        ensure!(n >= 1, "{}: no sites call {import}", m.name());
        println!(
            "modules: {} calls {import} at {n} site(s), each a direct {} to {}",
            m.name(),
            if n == 1 { "branch" } else { "branches" },
            kfuncs::impl_name(chosen as usize)
        );
        checked += n;
    }
    Ok(checked)
}

const WORDS: [u64; 5] = [0, 1, u64::MAX, 0x8000_0000_0000_0001, 0x0123_4567_89ab_cdef];

fn data() -> [u8; 100] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
}

/// rmod's and cmod's functions, through their imports, give the reference results.
fn check_results(rmod: &Module<'_>, cmod: &Module<'_>) -> Result<(), Msg> {
    let want_pop: u64 = WORDS.iter().map(|&w| u64::from(ref_popcount(w))).sum();
    let d = data();
    let want_crc = !ref_crc32c(&d);
    for (m, pre) in [(rmod, "rmod"), (cmod, "cmod")] {
        // SAFETY: both modules define these with these C signatures, and stay loaded.
        let (sum, crc, state) = unsafe {
            (
                func::<FnSum>(m, &fmt_name(pre, "_popcount_sum"))?,
                func::<FnCrc>(m, &fmt_name(pre, "_crc"))?,
                func::<FnU64>(m, &fmt_name(pre, "_state"))?,
            )
        };
        // SAFETY: valid pointers and lengths.
        let (s, c) = unsafe { (sum(WORDS.as_ptr(), WORDS.len()), crc(d.as_ptr(), d.len())) };
        ensure!(s == want_pop, "{pre}_popcount_sum = {s}, want {want_pop}");
        ensure!(c == want_crc, "{pre}_crc = {c:#x}, want {want_crc:#x}");
        ensure!(
            state() == 1,
            "{pre}: init ran {} time(s), exit {}",
            state() & 0xff,
            state() >> 8
        );
    }
    Ok(())
}

/// `pre` + `suffix` in a small stack buffer (no allocator).
pub(crate) fn fmt_name(pre: &str, suffix: &str) -> NameBuf {
    let mut b = NameBuf {
        buf: [0; 48],
        len: 0,
    };
    for part in [pre, suffix] {
        let n = part.len().min(b.buf.len() - b.len);
        b.buf[b.len..b.len + n].copy_from_slice(&part.as_bytes()[..n]);
        b.len += n;
    }
    b
}

pub(crate) struct NameBuf {
    buf: [u8; 48],
    len: usize,
}

impl core::ops::Deref for NameBuf {
    type Target = str;
    fn deref(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// rmod's own ifunc picked what CPUID calls for, and its site calls it directly.
fn check_own_ifunc(rmod: &Module<'_>) -> Result<(), Msg> {
    let c = raw_choice();
    let (want_tag, want_name) = if c.avx2 {
        (MIX_AVX2, "mix_avx2")
    } else if c.popcnt {
        (MIX_POPCNT, "mix_popcnt")
    } else {
        (MIX_BASE, "mix_base")
    };
    let t = rmod.table().ok_or("rmod: no table")?;
    let f = t
        .ifuncs()
        .find(|f| !f.imported && f.name.ends_with("rmod_mix"))
        .ok_or("rmod: its own ifunc rmod_mix is not in its table")?;
    let chosen = read_slot(f.slot);
    ensure!(
        rmod.text().contains(&chosen),
        "rmod_mix slot {chosen:#x} outside rmod"
    );
    // SAFETY: the slot holds one of rmod_mix's implementations, `extern "C" fn(u64) -> u64`.
    let imp = unsafe { core::mem::transmute::<usize, FnU64U64>(chosen as usize) };
    let tag = imp(0);
    let name = match tag {
        MIX_AVX2 => "mix_avx2",
        MIX_POPCNT => "mix_popcnt",
        MIX_BASE => "mix_base",
        _ => "?",
    };
    println!("ifunc-choice {} {name}", f.name);
    ensure!(
        tag == want_tag,
        "rmod_mix chose {name}, CPUID calls for {want_name}"
    );
    let mut n = 0;
    for s in t.sites().filter(|s| s.ifunc == f.index) {
        let b: [u8; 8] = read_bytes(s.addr);
        let at = s.len() - 4;
        let rel = i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let target = s.end().wrapping_add_signed(i64::from(rel));
        ensure!(
            target == chosen,
            "rmod_mix site {:#x} targets {target:#x}, not {chosen:#x}",
            s.addr
        );
        n += 1;
    }
    ensure!(n >= 1, "rmod_mix has no sites");
    // SAFETY: rmod defines `rmod_mix_call(u64) -> u64` and stays loaded.
    let call = unsafe { func::<FnU64U64>(rmod, "rmod_mix_call") }?;
    for x in [0u64, 1, 0x1234_5678] {
        ensure!(
            call(x) == x ^ want_tag,
            "rmod_mix_call({x:#x}) = {:#x}",
            call(x)
        );
    }
    Ok(())
}

// The module probes' handler records what it saw.
static HITS: AtomicU64 = AtomicU64::new(0);
static LAST_ID: AtomicU32 = AtomicU32::new(u32::MAX);
static LAST_ARGS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

fn handler(id: ProbeId, args: &[u64; 6]) {
    HITS.fetch_add(1, Ordering::SeqCst);
    LAST_ID.store(id.0, Ordering::SeqCst);
    for (slot, &a) in LAST_ARGS.iter().zip(args) {
        slot.store(a, Ordering::SeqCst);
    }
}

fn last_args() -> [u64; 6] {
    core::array::from_fn(|i| LAST_ARGS[i].load(Ordering::SeqCst))
}

/// `rmod:hit` and `cmod:event` are in the registry with the modules' ids, fire with
/// their arguments when enabled, report their state, and are silent when disabled.
fn check_probes(rmod: &Module<'_>, cmod: &Module<'_>) -> Result<(), Msg> {
    // SAFETY: both modules define these with these signatures and stay loaded.
    let (rfire, ron, cfire, con) = unsafe {
        (
            func::<Fn3>(rmod, "rmod_fire")?,
            func::<FnU64>(rmod, "rmod_hit_enabled")?,
            func::<Fn2>(cmod, "cmod_fire")?,
            func::<FnI32>(cmod, "cmod_event_enabled")?,
        )
    };
    let hit = probe::lookup("rmod:hit").ok_or("rmod:hit not registered")?;
    let event = probe::lookup("cmod:event").ok_or("cmod:event not registered")?;
    ensure!(
        rmod.probe_ids().contains(&hit.0),
        "rmod:hit id {} not rmod's {:?}",
        hit.0,
        rmod.probe_ids()
    );
    ensure!(
        cmod.probe_ids().contains(&event.0),
        "cmod:event id {} not cmod's {:?}",
        event.0,
        cmod.probe_ids()
    );
    ensure!(
        probe::matching("rmod:*").count() == 1,
        "rmod:* matches {}",
        probe::matching("rmod:*").count()
    );
    ensure!(
        probe::info(hit).is_some_and(|i| i.nargs == 3),
        "rmod:hit nargs"
    );

    // Disabled: NOPs, no hit.
    let before = HITS.load(Ordering::SeqCst);
    ensure!(
        rfire(1, 2, 3) == 6 && cfire(5, 7) == 22,
        "results while disabled"
    );
    ensure!(
        ron() == 0 && con() == 0,
        "is-enabled while disabled: {} {}",
        ron(),
        con()
    );
    ensure!(
        HITS.load(Ordering::SeqCst) == before,
        "a disabled probe fired"
    );

    let mut poker = AliasPoker::default();
    for id in [hit, event] {
        // SAFETY: `handler` is a plain function; the poker syncs every CPU.
        unsafe { probe::enable(id, handler, &mut poker) }
            .map_err(|e| msg!("enable {}: {e}", id.0))?;
    }
    ensure!(rfire(10, 20, 30) == 60, "rmod_fire result while enabled");
    ensure!(
        LAST_ID.load(Ordering::SeqCst) == hit.0 && last_args()[..3] == [10, 20, 30],
        "rmod:hit saw id {} args {:?}",
        LAST_ID.load(Ordering::SeqCst),
        last_args()
    );
    ensure!(cfire(4, 9) == 21, "cmod_fire result while enabled");
    ensure!(
        LAST_ID.load(Ordering::SeqCst) == event.0 && last_args()[..2] == [4, 9],
        "cmod:event saw id {} args {:?}",
        LAST_ID.load(Ordering::SeqCst),
        last_args()
    );
    ensure!(
        ron() == 1 && con() == 1,
        "is-enabled while enabled: {} {}",
        ron(),
        con()
    );
    ensure!(
        HITS.load(Ordering::SeqCst) == before + 2,
        "hits {}",
        HITS.load(Ordering::SeqCst) - before
    );
    for id in [hit, event] {
        // SAFETY: as above.
        unsafe { probe::disable(id, &mut poker) }.map_err(|e| msg!("disable {}: {e}", id.0))?;
    }
    ensure!(
        rfire(1, 1, 1) == 3 && cfire(1, 1) == 4,
        "results after disable"
    );
    ensure!(ron() == 0 && con() == 0, "is-enabled after disable");
    ensure!(
        HITS.load(Ordering::SeqCst) == before + 2,
        "a disabled probe fired"
    );
    println!(
        "modules: probes rmod:hit (id {}) and cmod:event (id {}) fired with their arguments; {} probes registered",
        hit.0,
        event.0,
        probe::count()
    );
    Ok(())
}

// Live toggling of a module probe while the APs run its site.

static AP_FIRE: AtomicU64 = AtomicU64::new(0);
static AP_STOP: AtomicBool = AtomicBool::new(false);
static AP_STARTED: AtomicU32 = AtomicU32::new(0);
static AP_CALLS: AtomicU64 = AtomicU64::new(0);
static AP_WRONG: AtomicU64 = AtomicU64::new(0);
static SMP_HITS: AtomicU64 = AtomicU64::new(0);
static SMP_BAD_ARGS: AtomicU64 = AtomicU64::new(0);

/// Counts hits; an AP fires `rmod:hit(cpu, n, 7)` with `1 <= cpu < online`.
fn smp_handler(_id: ProbeId, args: &[u64; 6]) {
    SMP_HITS.fetch_add(1, Ordering::SeqCst);
    let cpu_ok = args[0] >= 1 && args[0] < smp::online() as u64;
    if !cpu_ok || args[2] != 7 || args[3..] != [0, 0, 0] {
        SMP_BAD_ARGS.fetch_add(1, Ordering::SeqCst);
    }
}

/// An AP's job: call `rmod_fire(cpu, n, 7)` until told to stop.
fn ap_worker(cpu: usize) {
    // SAFETY: AP_FIRE holds rmod's `rmod_fire`, and rmod stays loaded (and held) until
    // every AP finished this job.
    let fire =
        unsafe { core::mem::transmute::<usize, Fn3>(AP_FIRE.load(Ordering::Acquire) as usize) };
    AP_STARTED.fetch_add(1, Ordering::AcqRel);
    let cpu = cpu as u64;
    let mut n = 0u64;
    while !AP_STOP.load(Ordering::Relaxed) {
        if fire(cpu, n, 7) != cpu.wrapping_add(n).wrapping_add(7) {
            AP_WRONG.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        // Do not starve the host: QEMU runs each CPU on a host thread (see smp::nap).
        smp::nap(20);
    }
    AP_CALLS.fetch_add(n, Ordering::AcqRel);
}

/// With every AP calling `rmod_fire` in a loop, CPU 0 enables and disables `rmod:hit`
/// 100 times: every result stays right, every hit has the AP's arguments, and the
/// handler and the registry count the same hits. rmod is held meanwhile.
fn probe_toggle_while_aps_run(rmod: &Module<'_>) -> Result<(), Msg> {
    let hit = probe::lookup("rmod:hit").ok_or("rmod:hit not registered")?;
    AP_FIRE.store(sym(rmod, "rmod_fire")?, Ordering::Release);
    for c in [&AP_CALLS, &AP_WRONG, &SMP_HITS, &SMP_BAD_ARGS] {
        c.store(0, Ordering::SeqCst);
    }
    AP_STOP.store(false, Ordering::SeqCst);
    AP_STARTED.store(0, Ordering::SeqCst);
    let registry_before = probe::info(hit).map_or(0, |i| i.hits);
    rmod.hold();
    smp::run_on_aps(ap_worker);
    let aps = smp::online() as u32 - 1;
    let mut spins = 0u64;
    while AP_STARTED.load(Ordering::Acquire) < aps && spins < 2_000_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    let mut poker = AliasPoker::default();
    let mut r = Ok(());
    for _ in 0..100 {
        // SAFETY: `smp_handler` is a plain function; the poker syncs every CPU, and
        // the int3 protocol covers APs running the site mid-patch.
        r = unsafe { probe::enable(hit, smp_handler, &mut poker) }
            .and_then(|()| {
                crate::apic::delay_us(300);
                // SAFETY: as above.
                unsafe { probe::disable(hit, &mut poker) }
            })
            .map_err(|e| msg!("toggling rmod:hit: {e}"));
        if r.is_err() {
            break;
        }
        crate::apic::delay_us(100);
    }
    AP_STOP.store(true, Ordering::SeqCst);
    let stopped = smp::wait_aps(4_000_000_000).map_err(|cpu| msg!("CPU {cpu} did not stop"));
    rmod.release();
    r?;
    stopped?;
    ensure!(
        AP_STARTED.load(Ordering::SeqCst) == aps,
        "only {} APs started",
        AP_STARTED.load(Ordering::SeqCst)
    );
    let (calls, hits) = (
        AP_CALLS.load(Ordering::SeqCst),
        SMP_HITS.load(Ordering::SeqCst),
    );
    let registry = probe::info(hit).map_or(0, |i| i.hits) - registry_before;
    println!(
        "modules: rmod:hit toggled 100 times while {aps} APs called rmod_fire {calls} times: {hits} hits (registry {registry}), {} syncs",
        poker.syncs
    );
    ensure!(
        AP_WRONG.load(Ordering::SeqCst) == 0,
        "{} wrong results",
        AP_WRONG.load(Ordering::SeqCst)
    );
    ensure!(
        SMP_BAD_ARGS.load(Ordering::SeqCst) == 0,
        "{} hits with wrong arguments",
        SMP_BAD_ARGS.load(Ordering::SeqCst)
    );
    ensure!(calls > 0 && hits > 0, "calls {calls}, hits {hits}");
    ensure!(
        hits == registry,
        "handler counted {hits} hits, registry {registry}"
    );
    ensure!(!probe::is_enabled(hit), "rmod:hit left enabled");
    Ok(())
}

/// FNV-1a over every kernel ifunc site's and probe site's bytes.
fn kernel_sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |addr: u64, n: usize| {
        let b: [u8; 8] = read_bytes(addr);
        for x in &b[..n] {
            h = (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3);
        }
    };
    for s in t.sites() {
        eat(s.addr, s.len());
    }
    for s in t.probe_sites() {
        eat(s.addr, 5);
    }
    h
}

fn report(m: &Module<'_>) {
    let r = m.report();
    println!(
        "modules: {} loaded at {:#x} ({} bytes, text {:#x}..{:#x}): {} relocations, {} kernel symbols, {} ifuncs ({} imported), {} sites patched, {} probes ({} sites)",
        m.name(),
        m.memory().start,
        m.memory().end - m.memory().start,
        m.text().start,
        m.text().end,
        r.relocations,
        r.kernel_symbols,
        r.ifuncs,
        r.imports,
        r.patch.sites_patched,
        r.probes,
        r.probe_sites
    );
}

/// The module's text is read + execute, the rest of its memory never executable, and
/// no page anywhere is writable and executable.
fn check_mapping(m: &Module<'_>) -> Result<(), Msg> {
    let nx = crate::cpu::nx_enabled();
    let mem = m.memory();
    let mut page = mem.start;
    while page < mem.end {
        let p = paging::translate(page).ok_or_else(|| msg!("{}: {page:#x} unmapped", m.name()))?;
        if m.text().contains(&page) {
            ensure!(
                !p.writable && p.executable,
                "{} text page {page:#x}: {:?}",
                m.name(),
                p
            );
        } else {
            ensure!(
                !p.executable || !nx,
                "{} data page {page:#x} executable",
                m.name()
            );
        }
        page += paging::PAGE_SIZE;
    }
    let wx = paging::wx_scan();
    ensure!(
        wx.violations == 0,
        "W^X after loading {}: {:?}",
        m.name(),
        wx
    );
    Ok(())
}

/// Loading badmod fails, names the missing symbol, and changes nothing.
fn check_bad_module(env: &Env) -> Result<(), Msg> {
    let probes = probe::count();
    let usage = Arena.usage();
    let digest = kernel_sites_digest(&env.table);
    let (r, writes) = env.try_load("badmod", &BADMOD.0);
    match r {
        Ok(m) => {
            let _ = unload(m);
            return Err(msg!("badmod loaded"));
        }
        Err(e) => {
            let text = msg!("{e}");
            println!("modules: badmod refused: {text}");
            ensure!(
                text.as_str().contains("no_such_kernel_function"),
                "the error does not name the symbol: {text}"
            );
        }
    }
    ensure!(writes == 0, "{writes} text writes for a refused module");
    ensure!(
        probe::lookup("badmod:never").is_none(),
        "badmod:never registered by a refused module"
    );
    ensure!(
        probe::count() == probes,
        "probe count {} -> {}",
        probes,
        probe::count()
    );
    ensure!(
        Arena.usage() == usage,
        "arena {:?} -> {:?}",
        usage,
        Arena.usage()
    );
    ensure!(
        kernel_sites_digest(&env.table) == digest,
        "kernel sites changed"
    );
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

    let env = match Env::new() {
        Ok(e) => e,
        Err(e) => {
            h.check("module_env", Err(e));
            return;
        }
    };
    let probes_before = probe::count();
    let usage_before = Arena.usage();
    let digest_before = kernel_sites_digest(&env.table);

    let loaded = env
        .load("rmod", &RMOD.0)
        .and_then(|r| match env.load("cmod", &CMOD.0) {
            Ok(c) => Ok((r, c)),
            Err(e) => {
                let _ = unload(r);
                Err(e)
            }
        });
    let (rmod, cmod) = match loaded {
        Ok(x) => x,
        Err(e) => {
            h.check("module_load_rust_and_c", Err(e));
            return;
        }
    };
    report(&rmod);
    report(&cmod);
    h.check(
        "module_load_rust_and_c",
        check_mapping(&rmod).and(check_mapping(&cmod)),
    );
    h.check(
        "module_kernel_ifunc_sites_direct_to_choice",
        check_import_sites(&env, &rmod).and_then(|_| check_import_sites(&env, &cmod).map(|_| ())),
    );
    h.check(
        "module_calls_through_kernel_ifuncs",
        check_results(&rmod, &cmod),
    );
    h.check("module_own_ifunc_by_cpu_model", check_own_ifunc(&rmod));
    h.check(
        "module_probes_registry_fire_args",
        check_probes(&rmod, &cmod),
    );
    h.check(
        "introspect_module_ifuncs_and_probes",
        crate::introspect_tests::module(&rmod).and(crate::introspect_tests::module(&cmod)),
    );
    if smp::online() > 1 {
        h.check(
            "module_probe_live_toggle_while_aps_run_it",
            probe_toggle_while_aps_run(&rmod),
        );
    }
    h.check(
        "module_kernel_sites_unchanged_by_loads",
        if kernel_sites_digest(&env.table) == digest_before {
            Ok(())
        } else {
            Err(msg!("loading modules changed kernel sites"))
        },
    );

    // Unload refused while held.
    rmod.hold();
    let rmod = match unload(rmod) {
        Ok(()) => {
            h.check(
                "module_unload_refused_while_held",
                Err(msg!("unloaded while held")),
            );
            let _ = unload(cmod);
            return;
        }
        Err((m, e)) => {
            let held_ok =
                matches!(e, ModuleError::InUse { users: 1 }) && probe::lookup("rmod:hit").is_some();
            h.check(
                "module_unload_refused_while_held",
                if held_ok {
                    Ok(())
                } else {
                    Err(msg!("unexpected: {e}"))
                },
            );
            m.release();
            m
        }
    };

    let unloaded = unload_ok(rmod)
        .and_then(|()| unload_ok(cmod))
        .and_then(|()| {
            ensure!(
                probe::lookup("rmod:hit").is_none(),
                "rmod:hit still registered"
            );
            ensure!(
                probe::lookup("cmod:event").is_none(),
                "cmod:event still registered"
            );
            ensure!(
                probe::count() == probes_before,
                "probe count {} -> {}",
                probes_before,
                probe::count()
            );
            ensure!(
                Arena.usage() == usage_before,
                "arena {:?} -> {:?}",
                usage_before,
                Arena.usage()
            );
            ensure!(
                kernel_sites_digest(&env.table) == digest_before,
                "kernel sites changed"
            );
            Ok(())
        });
    h.check("module_unload_removes_probes_and_memory", unloaded);

    h.check(
        "module_unknown_symbol_fails_cleanly",
        check_bad_module(&env),
    );

    let again = env.load("rmod", &RMOD.0).and_then(|m| {
        let r = check_own_ifunc(&m).and_then(|()| {
            // SAFETY: rmod defines `rmod_state() -> u64` and stays loaded.
            let state = unsafe { func::<FnU64>(&m, "rmod_state") }?;
            ensure!(state() == 1, "fresh copy has state {:#x}", state());
            let hit = probe::lookup("rmod:hit").ok_or("rmod:hit not registered again")?;
            // Unload must disable an enabled probe itself.
            let mut poker = AliasPoker::default();
            // SAFETY: `handler` is a plain function; the poker syncs every CPU.
            unsafe { probe::enable(hit, handler, &mut poker) }.map_err(Msg::display)?;
            ensure!(probe::is_enabled(hit), "rmod:hit not enabled");
            Ok(())
        });
        let u = unload_ok(m);
        r.and(u)?;
        ensure!(
            probe::count() == probes_before,
            "probe count {} -> {}",
            probes_before,
            probe::count()
        );
        ensure!(Arena.usage() == usage_before, "arena leaked");
        Ok(())
    });
    h.check("module_load_unload_load", again);
    h.check(
        "module_loader_never_allocates",
        match crate::no_alloc::requests() {
            0 => Ok(()),
            n => Err(msg!("{n} allocation request(s)")),
        },
    );
}
