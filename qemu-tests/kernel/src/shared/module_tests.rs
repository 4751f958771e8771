//! Loadable modules, checked inside the booted kernel: the x86_64 kernel's module tests
//! (`src/module_tests.rs`) by name, where they apply.
//!
//! The xtask builds `rmod` (Rust), `cmod` and `badmod` (C, the cross gcc), and the
//! platform's extra modules (`testing::EXTRA_MODULES`, aarch64's `farmod`), for the
//! kernel's architecture and `ksites embed`s them (`xtask/src/modules.rs`); `build.rs`
//! includes them here ([`RMOD`], [`CMOD`], [`BADMOD`], …). They are
//! loaded into the module block (`module_arena::ModuleArena`: pages RX / R / RW, never
//! W+X, patched through the writable alias by `mmu::AliasPoker`) against the kernel's
//! exports (the loader's runtime entry points and the `kfuncs` ifuncs `popcount` and
//! `crc32c`) and its `.ksites` table, after [`super::ksites_init`] patched the kernel.
//! The platform adds its own module tests (`testing::module_tests`, e.g. aarch64's far
//! module reached through veneers).

use core::ops::Range;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kernel_loader::CpuFeatures;
use kernel_loader::arch::Arch;
use kernel_loader::format::{SiteKind, Table};
use kernel_loader::module::{
    Export, Kernel, Module, ModuleError, ModuleMemory, Prot, RUNTIME_EXPORTS,
};
use kernel_loader::patch::TextPoker;
use kernel_loader::probe::{self, ProbeError, ProbeId};

use super::testing;
use crate::arch::exceptions::{try_call, try_store};
use crate::arch::mmu::{self, AliasPoker};
use crate::arch::module_arena::{self, ModuleArena};
use crate::arch::smp;
use crate::harness::{Harness, Msg};
use crate::{ensure, msg, println};

/// Bytes aligned for the ELF reader (section headers and symbols are read in place).
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(pub T);

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

mod live;

pub(crate) fn read_u32(addr: u64) -> u32 {
    if !addr.is_multiple_of(4) {
        // A riscv64 site may be 2-aligned (compressed code): two halfword reads.
        // SAFETY: only called on mapped, readable addresses, at least 2-aligned.
        let half = |a: u64| unsafe { core::ptr::read_volatile(a as usize as *const u16) };
        return u32::from(half(addr)) | (u32::from(half(addr + 2)) << 16);
    }
    // SAFETY: only called on mapped, readable, 4-aligned addresses.
    unsafe { core::ptr::read_volatile(addr as usize as *const u32) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: only called on mapped, readable, 8-aligned addresses (slots).
    unsafe { core::ptr::read_volatile(addr as usize as *const u64) }
}

/// The store to `addr` (a word it already holds) faults with a permission fault.
fn store_faults(addr: u64) -> Result<(), Msg> {
    let word = read_u32(addr);
    // SAFETY: the same word goes back if the store is (wrongly) allowed.
    match unsafe { try_store(addr, word) } {
        Ok(()) => Err(msg!("a store to {addr:#x} succeeded")),
        Err(f) if testing::is_store_fault(&f, addr) => Ok(()),
        Err(f) => Err(msg!("store to {addr:#x}: unexpected fault {f:?}")),
    }
}

/// A call to `addr` faults with an instruction fetch permission fault.
fn call_faults(addr: u64) -> Result<(), Msg> {
    // SAFETY: `addr` is expected not to be executable; if it is, it holds the caller's
    // `ret_imm` code or zeroes (an illegal instruction: the fault is caught).
    match unsafe { try_call(addr) } {
        Ok(v) => Err(msg!("{addr:#x} executed (returned {v:#x})")),
        Err(f) if testing::is_exec_fault(&f, addr) => Ok(()),
        Err(f) => Err(msg!("call to {addr:#x}: unexpected fault {f:?}")),
    }
}

/// Allocate, fill, protect read + execute, run, patch through the alias, free, reuse.
fn arena_alloc_protect_poke_free() -> Result<(), Msg> {
    let mut a = ModuleArena;
    let before = a.used_pages();
    let r = a.alloc(3 * 4096 - 100).ok_or("alloc of 3 pages failed")?;
    ensure!(r.size == 3 * 4096, "size {}", r.size);
    ensure!(r.addr.is_multiple_of(4096), "addr {:#x}", r.addr);
    let block = mmu::module_range();
    let end = r.addr + r.size as u64;
    ensure!(
        block.start <= r.addr && end <= block.end,
        "{:#x}..{end:#x} outside the module block {block:#x?}",
        r.addr
    );
    ensure!(a.used_pages() == before + 3, "used {}", a.used_pages());
    let l = mmu::layout();
    let reach = end.abs_diff(l.text_start).max(l.text_end.abs_diff(r.addr));
    ensure!(
        reach < testing::DIRECT_CALL_REACH,
        "module block not within direct call reach of the kernel text"
    );
    for page in (r.addr..end).step_by(4096) {
        let p = mmu::module_page_perms(page).ok_or("arena page not in the block")?;
        ensure!(p == (true, false), "fresh page {page:#x}: (w, x) = {p:?}");
        ensure!(read_u64(page) == 0, "fresh page not zeroed");
    }

    // Code at the start of pages 0 and 1; page 2 stays data.
    let code = [r.addr, r.addr + 4096];
    for (at, imm) in code.into_iter().zip([0x111u16, 0x222]) {
        for (i, w) in testing::ret_imm(imm).into_iter().enumerate() {
            // SAFETY: writable, ours, in bounds.
            unsafe { ((at as usize + 4 * i) as *mut u32).write_volatile(w) };
        }
    }
    // SAFETY: our pages; nothing runs them yet.
    unsafe { a.protect(&r, 0, 2 * 4096, Prot::ReadExec) }.map_err(Msg::display)?;
    // SAFETY: the third page stays data; ours.
    unsafe { a.protect(&r, 2 * 4096, 4096, Prot::Read) }.map_err(Msg::display)?;
    ensure!(
        mmu::module_page_perms(r.addr) == Some((false, true)),
        "code page after protect: {:?}",
        mmu::module_page_perms(r.addr)
    );
    ensure!(
        mmu::module_page_perms(r.addr + 2 * 4096) == Some((false, false)),
        "read-only page after protect"
    );
    let run = |at: u64| -> Result<u64, Msg> {
        // SAFETY: `ret_imm` code, executable now.
        unsafe { try_call(at) }.map_err(|f| msg!("calling {at:#x}: {f:?}"))
    };
    let (x, y) = (run(code[0])?, run(code[1])?);
    ensure!(x == 0x111 && y == 0x222, "ran {x:#x} {y:#x}");
    store_faults(code[0])?;
    store_faults(r.addr + 2 * 4096)?;
    call_faults(r.addr + 2 * 4096)?;

    let mut alias = AliasPoker::default();
    alias.begin().map_err(Msg::display)?;
    for (at, imm) in code.into_iter().zip([0x333u16, 0x444]) {
        // SAFETY: the first instruction of our own code, which no other CPU runs.
        unsafe { alias.write(at, &testing::ret_imm(imm)[0].to_le_bytes()) }
            .map_err(Msg::display)?;
    }
    alias.sync_cores();
    alias.end();
    let (x, y) = (run(code[0])?, run(code[1])?);
    ensure!(x == 0x333 && y == 0x444, "after AliasPoker: {x:#x} {y:#x}");
    // The alias writes module text only: data pages are refused.
    // SAFETY: refused before any write (not executable).
    let refused = unsafe { alias.write(r.addr + 2 * 4096, &[0; 4]) };
    ensure!(
        refused.is_err(),
        "AliasPoker wrote a data page of the block"
    );
    ensure!(
        mmu::module_page_perms(r.addr) == Some((false, true)),
        "code page after poking"
    );
    ensure!(mmu::module_wx_pages() == 0, "W+X module pages");

    let addr = r.addr;
    // SAFETY: nothing runs or points into the pages any more.
    unsafe { a.free(r) };
    ensure!(
        a.used_pages() == before,
        "used after free {}",
        a.used_pages()
    );
    let again = a.alloc(3 * 4096).ok_or("realloc failed")?;
    ensure!(again.addr == addr, "reuse: {:#x} != {addr:#x}", again.addr);
    for page in (again.addr..again.addr + again.size as u64).step_by(4096) {
        ensure!(
            mmu::module_page_perms(page) == Some((true, false)),
            "reused page {page:#x} not RW NX"
        );
        ensure!(read_u64(page) == 0, "reused page not zeroed");
    }
    // SAFETY: unused.
    unsafe { a.free(again) };
    ensure!(a.alloc(0).is_none(), "alloc(0) succeeded");
    ensure!(
        a.alloc(module_arena::PAGES * 4096 + 1).is_none(),
        "alloc beyond the arena succeeded"
    );
    // SAFETY: refused before any page is touched (outside the block).
    let outside = unsafe { mmu::protect_module(l.text_start, 4096, mmu::ModulePerm::ReadWrite) };
    ensure!(
        outside.is_err(),
        "protect outside the module block accepted"
    );
    ensure!(
        a.used_pages() == before,
        "used at the end {}",
        a.used_pages()
    );
    Ok(())
}

/// Each embedded module is an ELF relocatable object of this architecture.
fn modules_embedded() -> Result<(), Msg> {
    let shared: [(&str, &[u8]); 3] = [("rmod", &RMOD.0), ("cmod", &CMOD.0), ("badmod", &BADMOD.0)];
    for &(name, bytes) in shared.iter().chain(testing::EXTRA_MODULES) {
        ensure!(
            !bytes.is_empty(),
            "{name}.ko was not built into the kernel (run `cargo xtask qemu --arch {}`)",
            Arch::native().name()
        );
        ensure!(
            bytes.starts_with(b"\x7fELF\x02\x01"),
            "{name}: not ELF64 LE"
        );
        let e_type = u16::from_le_bytes([bytes[16], bytes[17]]);
        let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
        ensure!(
            e_type == 1 && machine == testing::MODULE_MACHINE,
            "{name}: e_type {e_type}, e_machine {machine} (want ET_REL, {})",
            Arch::native().name()
        );
        println!("modules: {name}.ko embedded, {} bytes", bytes.len());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Loading modules.

/// The kernel's ifuncs modules import, under their plain names.
static KERNEL_EXPORTS: [Export; 2] = [
    kernel_loader::export!(kfuncs::popcount),
    kernel_loader::export!(kfuncs::crc32c),
];
static RUNTIME: [Export; 4] = RUNTIME_EXPORTS;

/// What the module tests load against.
pub struct Env {
    /// The kernel's table.
    pub table: Table<'static>,
    /// The kernel's text.
    pub exec: [Range<u64>; 1],
    /// The features the kernel's resolvers got.
    pub features: CpuFeatures,
}

impl Env {
    fn new() -> Result<Env, Msg> {
        let k = super::ksites_init()?;
        Ok(Env {
            table: k.table,
            exec: crate::arch::ksites_exec(),
            features: k.features,
        })
    }

    fn load(&self, name: &'static str, bytes: &'static [u8]) -> Result<Module<'static>, Msg> {
        self.try_load(name, bytes, &mut ModuleArena)
            .0
            .map_err(|e| msg!("loading {name}: {e}"))
    }

    /// Loads `bytes` as `name` into `mem`; the error, and the poker's synchronisation
    /// rounds.
    pub fn try_load(
        &self,
        name: &'static str,
        bytes: &'static [u8],
        mem: &mut dyn ModuleMemory,
    ) -> (Result<Module<'static>, ModuleError>, u64) {
        let symbols = (&RUNTIME, &KERNEL_EXPORTS);
        let kernel = Kernel {
            symbols: &symbols,
            table: Some(self.table),
            exec: &self.exec,
            features: self.features,
        };
        let mut poker = AliasPoker::default();
        // SAFETY: the module block is executable once protected and within direct call
        // reach of the kernel (veneers otherwise); the poker writes module text through the
        // alias and syncs every CPU; `kernel` is this kernel; the modules are ours.
        let r = unsafe { Module::load(name, bytes, &kernel, mem, &mut poker) };
        (r, poker.rounds)
    }
}

#[allow(clippy::result_large_err)]
fn unload(m: Module<'static>) -> Result<(), (Module<'static>, ModuleError)> {
    unload_from(m, &mut ModuleArena)
}

/// Unloads `m`, which `mem` gave its memory.
#[allow(clippy::result_large_err)]
pub fn unload_from(
    m: Module<'static>,
    mem: &mut dyn ModuleMemory,
) -> Result<(), (Module<'static>, ModuleError)> {
    let mut poker = AliasPoker::default();
    // SAFETY: module code runs only on this CPU here (the other CPUs' job has
    // finished); the module's probes are disabled by unload.
    unsafe { m.unload(mem, &mut poker) }
}

fn unload_ok(m: Module<'static>) -> Result<(), Msg> {
    let name = m.name();
    unload(m).map_err(|(_, e)| msg!("unloading {name}: {e}"))
}

pub(crate) fn sym(m: &Module<'_>, name: &str) -> Result<u64, Msg> {
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
        "{name} at {addr:#x} not in the text"
    );
    ensure!(
        size_of::<F>() == size_of::<usize>(),
        "{name}: not a fn pointer"
    );
    // SAFETY: `F` is a function pointer type of the symbol's signature (caller).
    Ok(unsafe { core::mem::transmute_copy::<usize, F>(&(addr as usize)) })
}

pub(crate) type FnU64 = extern "C" fn() -> u64;
pub(crate) type FnU64U64 = extern "C" fn(u64) -> u64;
pub(crate) type Fn3 = extern "C" fn(u64, u64, u64) -> u64;
pub(crate) type Fn2 = extern "C" fn(u64, u64) -> u64;
pub(crate) type FnI32 = extern "C" fn() -> i32;
pub(crate) type FnSum = unsafe extern "C" fn(*const u64, usize) -> u64;
pub(crate) type FnCrc = unsafe extern "C" fn(*const u8, usize) -> u32;

/// Where the branch site `s` of `m` finally goes: through a loader veneer of `m` if it
/// branches into one.
fn site_target(m: &Module<'_>, s: &kernel_loader::format::Site) -> Result<u64, Msg> {
    ensure!(
        s.kind != SiteKind::Jcc,
        "site {:#x}: a conditional branch site",
        s.addr
    );
    let b = s.branch();
    let mut bytes = [0u8; 16];
    let bytes = &mut bytes[..usize::from(b.len)];
    for (i, x) in bytes.iter_mut().enumerate() {
        // SAFETY: the site lies in the module's mapped text (checked by the caller).
        *x = unsafe { core::ptr::read_volatile((s.addr + i as u64) as *const u8) };
    }
    let dest = Arch::native()
        .decode_branch_target(&b, bytes)
        .ok_or_else(|| {
            msg!(
                "{} site {:#x} ({:?}): {bytes:02x?}",
                m.name(),
                s.addr,
                s.kind
            )
        })?;
    if m.veneers().contains(&dest) {
        return testing::veneer_target(dest).ok_or_else(|| msg!("bad veneer at {dest:#x}"));
    }
    Ok(dest)
}

/// Every site of `m` that calls a kernel ifunc is a direct call/jump to the
/// implementation the kernel's slot holds; both imports have sites.
fn check_import_sites(env: &Env, m: &Module<'_>) -> Result<(), Msg> {
    let t = m.table().ok_or_else(|| msg!("{}: no table", m.name()))?;
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
        let chosen = read_u64(k.slot);
        let mut n = 0;
        for s in t.sites().filter(|s| s.ifunc == f.index) {
            ensure!(m.text().contains(&s.addr), "site {:#x} outside", s.addr);
            let target = site_target(m, &s)?;
            ensure!(
                target == chosen,
                "{} site {:#x} ({import}) goes to {target:#x}, the kernel chose {} at {chosen:#x}",
                m.name(),
                s.addr,
                kfuncs::impl_name(chosen as usize)
            );
            n += 1;
        }
        ensure!(n >= 1, "{}: no sites call {import}", m.name());
        println!(
            "modules: {} calls {import} at {n} site(s), each a direct branch to {}",
            m.name(),
            kfuncs::impl_name(chosen as usize)
        );
    }
    Ok(())
}

const WORDS: [u64; 5] = [0, 1, u64::MAX, 0x8000_0000_0000_0001, 0x0123_4567_89ab_cdef];

fn data() -> [u8; 100] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
}

/// CRC-32C update from `crc` over `d`, bit by bit (no inversion), as `crc32c` computes.
fn ref_crc32c_update(mut crc: u32, d: &[u8]) -> u32 {
    for &b in d {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

const RMOD_FNS: [&str; 3] = ["rmod_popcount_sum", "rmod_crc", "rmod_state"];
const CMOD_FNS: [&str; 3] = ["cmod_popcount_sum", "cmod_crc", "cmod_state"];

/// rmod's and cmod's functions, through their imports, give the reference results.
fn check_results(rmod: &Module<'_>, cmod: &Module<'_>) -> Result<(), Msg> {
    check_results_of(&[(rmod, RMOD_FNS), (cmod, CMOD_FNS)])
}

/// Each module's `*_popcount_sum`, `*_crc` and `*_state` give the reference results.
fn check_results_of(modules: &[(&Module<'_>, [&str; 3])]) -> Result<(), Msg> {
    let want_pop: u64 = WORDS.iter().map(|w| u64::from(w.count_ones())).sum();
    let d = data();
    let want_crc = ref_crc32c_update(!0, &d);
    for &(m, names) in modules {
        // SAFETY: both modules define these with these C signatures, and stay loaded.
        let (sum, crc, state) = unsafe {
            (
                func::<FnSum>(m, names[0])?,
                func::<FnCrc>(m, names[1])?,
                func::<FnU64>(m, names[2])?,
            )
        };
        // SAFETY: valid pointers and lengths.
        let (s, c) = unsafe { (sum(WORDS.as_ptr(), WORDS.len()), crc(d.as_ptr(), d.len())) };
        ensure!(s == want_pop, "{} = {s}, want {want_pop}", names[0]);
        ensure!(c == want_crc, "{} = {c:#x}, want {want_crc:#x}", names[1]);
        ensure!(state() == 1, "{}: init/exit state {:#x}", m.name(), state());
    }
    Ok(())
}

/// rmod's own ifunc picked what the CPU's features call for, and its site calls it
/// directly.
fn check_own_ifunc(env: &Env, rmod: &Module<'_>) -> Result<(), Msg> {
    let (_, want_tag, want_name) = testing::RMOD_MIX
        .into_iter()
        .find(|m| env.features.contains(m.0))
        .ok_or("no rmod_mix flavour for these features")?;
    let t = rmod.table().ok_or("rmod: no table")?;
    let f = t
        .ifuncs()
        .find(|f| !f.imported && f.name.ends_with("rmod_mix"))
        .ok_or("rmod: its own ifunc rmod_mix is not in its table")?;
    let chosen = read_u64(f.slot);
    ensure!(
        rmod.text().contains(&chosen),
        "slot {chosen:#x} outside rmod"
    );
    // SAFETY: the slot holds one of rmod_mix's implementations, `extern "C" fn(u64) -> u64`.
    let imp = unsafe { core::mem::transmute::<usize, FnU64U64>(chosen as usize) };
    let tag = imp(0);
    let name = testing::RMOD_MIX
        .iter()
        .find(|m| m.1 == tag)
        .map_or("?", |m| m.2);
    println!("modules: rmod's own ifunc {} chose {name}", f.name);
    ensure!(
        tag == want_tag,
        "rmod_mix chose {name}, the CPU calls for {want_name}"
    );
    let mut n = 0;
    for s in t.sites().filter(|s| s.ifunc == f.index) {
        let target = site_target(rmod, &s)?;
        ensure!(
            target == chosen,
            "rmod_mix site {:#x} goes to {target:#x}",
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
    ensure!(rmod.probe_ids().contains(&hit.0), "rmod:hit id {}", hit.0);
    ensure!(
        cmod.probe_ids().contains(&event.0),
        "cmod:event id {}",
        event.0
    );
    ensure!(probe::matching("rmod:*").count() == 1, "rmod:* matches");
    ensure!(
        probe::info(hit).is_some_and(|i| i.nargs == 3),
        "rmod:hit nargs"
    );

    let before = HITS.load(Ordering::SeqCst);
    ensure!(
        rfire(1, 2, 3) == 6 && cfire(5, 7) == 22,
        "results while disabled"
    );
    ensure!(ron() == 0 && con() == 0, "is-enabled while disabled");
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
    ensure!(ron() == 1 && con() == 1, "is-enabled while enabled");
    let hits = HITS.load(Ordering::SeqCst) - before;
    ensure!(hits == 2, "hits {hits}");
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
        "modules: probes rmod:hit (id {}) and cmod:event (id {}) fired with their arguments; {} probes registered, {} sync rounds",
        hit.0,
        event.0,
        probe::count(),
        poker.rounds
    );
    Ok(())
}

/// FNV-1a over every kernel ifunc site's and probe site's instruction.
fn kernel_sites_digest(t: &Table<'_>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let addrs = t
        .sites()
        .map(|s| s.addr)
        .chain(t.probe_sites().map(|s| s.addr));
    for addr in addrs {
        for x in read_u32(addr).to_le_bytes() {
            h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

pub(crate) fn report(m: &Module<'_>) {
    let r = m.report();
    println!(
        "modules: {} loaded at {:#x} ({} bytes, text {:#x}..{:#x}): {} relocations, {} veneers, {} kernel symbols, {} ifuncs ({} imported), {} sites patched, {} probes ({} sites)",
        m.name(),
        m.memory().start,
        m.memory().end - m.memory().start,
        m.text().start,
        m.text().end,
        r.relocations,
        r.veneers,
        r.kernel_symbols,
        r.ifuncs,
        r.imports,
        r.patch.sites_patched,
        r.probes,
        r.probe_sites
    );
}

/// The module's text and veneer area are read + execute (a store to text faults), the
/// rest of its memory never executable (a call into it faults), and no module page is
/// W+X.
pub(crate) fn check_mapping(m: &Module<'_>) -> Result<(), Msg> {
    let mem = m.memory();
    let mut first_data = None;
    for page in mem.clone().step_by(mmu::PAGE_SIZE as usize) {
        let p = mmu::module_page_perms(page).ok_or_else(|| msg!("{page:#x} not in the block"))?;
        // The veneer area (after the bookkeeping, to the end) is RX even when empty.
        let text = m.text().contains(&page) || page >= m.veneers().start & !0xfff;
        if text {
            ensure!(
                p == (false, true),
                "{} text page {page:#x}: {p:?}",
                m.name()
            );
        } else {
            ensure!(!p.1, "{} data page {page:#x} executable", m.name());
            first_data.get_or_insert(page);
        }
    }
    store_faults(m.text().start)?;
    call_faults(first_data.ok_or("no data pages")?)?;
    ensure!(
        mmu::module_wx_pages() == 0,
        "W+X module pages after loading {}",
        m.name()
    );
    Ok(())
}

/// Loading badmod fails, names the missing symbol, and changes nothing.
fn check_bad_module(env: &Env) -> Result<(), Msg> {
    let probes = probe::count();
    let used = ModuleArena.used_pages();
    let digest = kernel_sites_digest(&env.table);
    let (r, rounds) = env.try_load("badmod", &BADMOD.0, &mut ModuleArena);
    match r {
        Ok(m) => {
            let _ = unload(m);
            return Err(msg!("badmod loaded"));
        }
        Err(e) => {
            let text = msg!("{e}");
            println!("modules: badmod refused: {text}");
            let named = matches!(&e, ModuleError::UnknownSymbol { name }
                if name.as_str() == "no_such_kernel_function");
            ensure!(
                named,
                "want UnknownSymbol(no_such_kernel_function), got: {text}"
            );
            ensure!(
                text.as_str().contains("no_such_kernel_function"),
                "the error does not name the symbol: {text}"
            );
        }
    }
    ensure!(
        rounds == 0,
        "{rounds} synchronisation rounds for a refused module"
    );
    ensure!(
        probe::lookup("badmod:never").is_none(),
        "badmod:never registered"
    );
    ensure!(
        probe::count() == probes,
        "probe count {probes} -> {}",
        probe::count()
    );
    ensure!(ModuleArena.used_pages() == used, "arena pages leaked");
    ensure!(
        kernel_sites_digest(&env.table) == digest,
        "kernel sites changed"
    );
    Ok(())
}

/// An enabled probe whose handler lies in a module's code keeps that module loaded.
fn check_handler_pins(rmod: &Module<'_>, cmod: Module<'static>) -> Result<Module<'static>, Msg> {
    let hit = probe::lookup("rmod:hit").ok_or("rmod:hit not registered")?;
    let in_cmod = sym(&cmod, "cmod_state")?;
    // SAFETY: only the address matters: rmod:hit does not fire while this handler is
    // installed (nothing calls rmod_fire here), and it is disabled again below.
    let h = unsafe { core::mem::transmute::<usize, fn(ProbeId, &[u64; 6])>(in_cmod as usize) };
    let mut poker = AliasPoker::default();
    // SAFETY: see above; the poker syncs every CPU.
    unsafe { probe::enable(hit, h, &mut poker) }.map_err(Msg::display)?;
    let r = unload(cmod);
    // SAFETY: as above.
    let off = unsafe { probe::disable(hit, &mut poker) };
    let cmod = match r {
        Ok(()) => return Err(msg!("cmod unloaded while rmod:hit's handler is in it")),
        Err((m, ModuleError::Probe(ProbeError::HandlerInModule { probe, handler }))) => {
            ensure!(
                probe == hit && handler == in_cmod,
                "refused for {} {handler:#x}",
                probe.0
            );
            m
        }
        Err((m, e)) => {
            let _ = off;
            let name = m.name();
            let _ = unload(m);
            return Err(msg!("unloading {name}: unexpected {e}"));
        }
    };
    off.map_err(Msg::display)?;
    ensure!(rmod.probe_ids().contains(&hit.0), "rmod:hit moved");
    Ok(cmod)
}

/// Runs the module tests (after the platform tests: the other CPUs are online).
pub fn run(h: &mut Harness) {
    let r = mmu::module_range();
    println!(
        "modules: arena {:#x}..{:#x} ({} pages), alias +{:#x}",
        r.start,
        r.end,
        module_arena::PAGES,
        mmu::ALIAS_OFFSET
    );
    h.check(
        "module_arena_alloc_protect_poke_free",
        arena_alloc_protect_poke_free(),
    );
    h.check("modules_embedded_are_et_rel", modules_embedded());
    // SAFETY: the platform's trap vector (installed on every CPU at boot, before it
    // runs anything) sends a probe trap to `kernel_loader::probe`'s hook and writes back
    // the frame it changes, for as long as the kernel runs.
    unsafe { probe::declare_int3_route() };
    let env = match Env::new() {
        Ok(e) => e,
        Err(e) => return h.check("module_env", Err(e)),
    };
    let probes_before = probe::count();
    let used_before = ModuleArena.used_pages();
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
        Err(e) => return h.check("module_load_rust_and_c", Err(e)),
    };
    report(&rmod);
    report(&cmod);
    h.check(
        "module_load_rust_and_c",
        check_mapping(&rmod).and(check_mapping(&cmod)),
    );
    h.check(
        "module_kernel_ifunc_sites_direct_to_choice",
        check_import_sites(&env, &rmod).and(check_import_sites(&env, &cmod)),
    );
    h.check(
        "module_calls_through_kernel_ifuncs",
        check_results(&rmod, &cmod),
    );
    h.check(
        "module_own_ifunc_by_cpu_model",
        check_own_ifunc(&env, &rmod),
    );
    h.check(
        "module_probes_registry_fire_args",
        check_probes(&rmod, &cmod),
    );
    if smp::online() > 1 {
        h.check(
            "module_probe_live_toggle_while_aps_run_it",
            live::probe_toggle_while_aps_run(&rmod),
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
            let ok =
                matches!(e, ModuleError::InUse { users: 1 }) && probe::lookup("rmod:hit").is_some();
            h.check(
                "module_unload_refused_while_held",
                if ok {
                    Ok(())
                } else {
                    Err(msg!("unexpected: {e}"))
                },
            );
            m.release();
            m
        }
    };
    let cmod = match check_handler_pins(&rmod, cmod) {
        Ok(c) => {
            h.check(
                "module_unload_refused_while_its_handler_is_enabled",
                Ok::<(), Msg>(()),
            );
            Some(c)
        }
        Err(e) => {
            h.check("module_unload_refused_while_its_handler_is_enabled", Err(e));
            None
        }
    };
    let unloaded = unload_ok(rmod)
        .and_then(|()| cmod.map_or(Ok(()), unload_ok))
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
                "probe count {}",
                probe::count()
            );
            ensure!(
                ModuleArena.used_pages() == used_before,
                "arena pages leaked"
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
    testing::module_tests(h, &env);

    let again = env.load("rmod", &RMOD.0).and_then(|m| {
        let r = check_own_ifunc(&env, &m).and_then(|()| {
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
            "probe count {}",
            probe::count()
        );
        ensure!(ModuleArena.used_pages() == used_before, "arena leaked");
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
