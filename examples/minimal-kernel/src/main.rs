//! A minimal x86_64 kernel that uses ksites: the README's "Using it in your kernel".
//!
//! Booted by QEMU (`-kernel`, PVH; see `boot.rs`), it enables SIMD state, patches its
//! ifuncs (`funcs.rs`) for this CPU, installs the crate's #BP entry, toggles its probe,
//! prints what each ifunc resolved to, and checks all of it against CPUID: one `ok`
//! or `FAIL` line per check, then `N passed, M failed`, then it exits QEMU through
//! isa-debug-exit (status 33 if everything passed).
#![no_std]
#![no_main]

mod boot;
mod funcs;

use core::ops::Range;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kernel_loader::introspect::{self, LiveImage, SiteState};
use kernel_loader::patch::PokeError;
use kernel_loader::probe::{self, ProbeError, ProbeId};
use kernel_loader::{CpuFeatures, TextPoker, cell, patch};
use x86_64::VirtAddr;
use x86_64::instructions::port::Port;
use x86_64::registers::control::{Cr0, Cr0Flags};
use x86_64::structures::idt::InterruptDescriptorTable;

/// Prints a line to COM1.
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        // SAFETY: COM1 is QEMU's first serial port; this kernel runs on one CPU.
        let mut port = unsafe { uart_16550::SerialPort::new(0x3f8) };
        let _ = writeln!(port, $($arg)*);
    }};
}

unsafe extern "C" {
    // From linker.ld.
    static __text_start: u8;
    static __text_end: u8;
}

/// The kernel's executable range: every ifunc and probe site lies in it.
fn exec_range() -> Range<u64> {
    (&raw const __text_start) as u64..(&raw const __text_end) as u64
}

/// How ksites writes this kernel's text: clear CR0.WP for the batch (the boot page
/// tables map everything writable; a kernel with read-only text needs this), one CPU.
struct WpPoker;

impl TextPoker for WpPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        // SAFETY: CPL 0; WP comes back in `end`.
        unsafe { Cr0::update(|f| f.remove(Cr0Flags::WRITE_PROTECT)) };
        Ok(())
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: the loader writes only inside a recorded site (the trait's contract),
            // which is mapped; WP is off.
            unsafe { ((addr as usize + i) as *mut u8).write_volatile(*b) };
        }
        Ok(())
    }

    fn sync_cores(&mut self) {
        // CPUID serializes this CPU, the only one.
        let _ = core::arch::x86_64::__cpuid(0);
    }

    fn end(&mut self) {
        // SAFETY: CPL 0; turns write protection back on.
        unsafe { Cr0::update(|f| f.insert(Cr0Flags::WRITE_PROTECT)) };
    }
}

/// Finds this image's table, patches every ifunc site for this CPU and registers the
/// probes: README step 4.
fn init_ksites(
    exec: &[Range<u64>],
    poker: &mut WpPoker,
) -> Result<kernel_loader::format::Table<'static>, kernel_loader::Error> {
    // SAFETY: `ksites-ld` embedded this image's table; nothing writes it.
    let table = unsafe { cell::image_table(exec) }?;
    let features = CpuFeatures::detect();
    // SAFETY: once, at boot, one CPU; the table is this image's.
    let report = unsafe { patch::init(&table, exec, &features, poker) }?;
    probe::register_image(table, poker)?;
    println!("ksites: {} ifunc sites patched", report.sites_patched);
    Ok(table)
}

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Prints `ok NAME` or `FAIL NAME: WHY` and counts it.
fn check(name: &str, ok: bool, why: core::fmt::Arguments<'_>) {
    if ok {
        PASSED.fetch_add(1, Ordering::Relaxed);
        println!("ok   {name}");
    } else {
        FAILED.fetch_add(1, Ordering::Relaxed);
        println!("FAIL {name}: {why}");
    }
}

/// Ends the QEMU run: isa-debug-exit (port 0xf4) turns `v` into exit status `2v + 1`.
fn exit_qemu(success: bool) -> ! {
    // SAFETY: QEMU's isa-debug-exit device is at 0xf4 (`-device isa-debug-exit`).
    unsafe { Port::<u32>::new(0xf4).write(if success { 0x10 } else { 0x11 }) };
    loop {
        x86_64::instructions::hlt();
    }
}

/// The IDT: only #BP (vector 3) is set, to the crate's ready entry.
static mut IDT: InterruptDescriptorTable = InterruptDescriptorTable::new();

/// README step 5: route #BP to ksites.
fn install_int3_route() {
    let idt = &raw mut IDT;
    // SAFETY: one CPU, interrupts off, nothing else references the IDT yet.
    let idt = unsafe { &mut *idt };
    // SAFETY: `int3_entry` is a complete #BP handler for a 64-bit interrupt gate, IST 0.
    unsafe {
        idt.breakpoint
            .set_handler_addr(VirtAddr::new(probe::int3_entry_address()))
    };
    idt.load();
    // SAFETY: vector 3 reaches `probe::handle_int3` on the only CPU from now on.
    unsafe { probe::declare_int3_route() };
}

static TICKS: AtomicU64 = AtomicU64::new(0);
static LAST_ARG: AtomicU64 = AtomicU64::new(0);

/// The `demo:tick` handler: runs at each enabled `tick(n)` with `args[0] == n`.
fn on_tick(_: ProbeId, args: &[u64; 6]) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    LAST_ARG.store(args[0], Ordering::Relaxed);
}

/// A pointer to itself: an `R_X86_64_RELATIVE` relocation the boot stub applies.
struct SelfRef(*const SelfRef);
// SAFETY: never written; the pointer is only compared.
unsafe impl Sync for SelfRef {}
static SELF_REF: SelfRef = SelfRef(&raw const SELF_REF);

#[unsafe(no_mangle)]
extern "C" fn kmain(start_info: u32) -> ! {
    // SAFETY: COM1 exists on QEMU's PC; initialised once, here.
    unsafe { uart_16550::SerialPort::new(0x3f8).init() };
    println!("minimal-kernel: booted at {:#x}", exec_range().start);
    // SAFETY: identity-mapped; PVH passes hvm_start_info, whose first field is its magic.
    let magic = unsafe { (start_info as usize as *const u32).read() };
    check(
        "boot_pvh_start_info",
        magic == 0x336e_c578,
        format_args!("magic {magic:#x}"),
    );
    // A pointer in data holds its run-time value only once the boot stub applied
    // `.rela.dyn` (the linker left the field zero).
    let (stored, actual) = (SELF_REF.0 as usize, &raw const SELF_REF as usize);
    check(
        "boot_self_relocated",
        stored == actual,
        format_args!("data pointer {stored:#x}, address {actual:#x}"),
    );

    // README step 4: SIMD state first, so CPUID/XGETBV tell the truth.
    // SAFETY: CPL 0, long mode, nothing holds SIMD state yet.
    let simd = unsafe { kernel_loader::cpu::enable_simd_state() };
    let unusable = CpuFeatures::unusable();
    check(
        "simd_state_enabled",
        unusable.is_empty(),
        format_args!("xcr0 {:#x}, unusable {unusable:?}", simd.xcr0),
    );

    let exec = [exec_range()];
    let mut poker = WpPoker;
    let table = match init_ksites(&exec, &mut poker) {
        Ok(table) => table,
        Err(e) => {
            println!("FAIL ksites_init: {e}");
            exit_qemu(false);
        }
    };
    check_ifuncs(table);
    check_probe(&mut poker);
    check_key(&mut poker);
    check_retarget(&mut poker);

    let (passed, failed) = (
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    );
    println!("{passed} passed, {failed} failed");
    exit_qemu(failed == 0)
}

/// Each ifunc's choice against CPUID, its sites, and its results.
fn check_ifuncs(table: kernel_loader::format::Table<'static>) {
    // Raw CPUID, independent of `CpuFeatures`: leaf 1 ECX.POPCNT[23] and .AVX[28],
    // leaf 7 EBX.AVX2[5].
    let leaf1 = core::arch::x86_64::__cpuid(1);
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    let has_popcnt = leaf1.ecx & (1 << 23) != 0;
    let has_avx2 = leaf1.ecx & (1 << 28) != 0 && leaf7.ebx & (1 << 5) != 0;

    // README step 6: introspection.
    // SAFETY: `table` is this running image's.
    let image = unsafe { LiveImage::new(table) };
    for f in image.ifuncs() {
        let chosen = funcs::impl_name(f.chosen);
        println!("ifunc-choice {} {chosen}", f.name);
        let want = match f.name.rsplit("::").next() {
            Some("popcount") if has_popcnt => "popcount_popcnt",
            Some("popcount") => "popcount_soft",
            Some("byte_sum") if has_avx2 => "byte_sum_avx2",
            Some("byte_sum") => "byte_sum_scalar",
            _ => "?",
        };
        let patched = f.sites().filter(|s| s.state == SiteState::Patched).count();
        let sites = f.sites().count();
        println!("  {sites} site(s), {patched} patched to {chosen}");
        check(
            f.name,
            chosen == want && f.resolved && sites > 0 && patched == sites,
            format_args!("chose {chosen}, CPUID says {want}; {patched}/{sites} sites patched"),
        );
    }

    let ok = [
        0,
        1,
        0xff,
        0x8000_0000_0000_0001,
        u64::MAX,
        0x0123_4567_89ab_cdef,
    ]
    .iter()
    .all(|&x| funcs::popcount(x) == x.count_ones());
    check(
        "popcount_results",
        ok,
        format_args!("popcount differs from count_ones"),
    );
    let mut buf = [0u8; 300];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let bad = (0..buf.len()).find(|&n| {
        let want: u64 = buf[..n].iter().map(|&b| u64::from(b)).sum();
        funcs::sum(&buf[..n]) != want
    });
    check(
        "byte_sum_results",
        bad.is_none(),
        format_args!("wrong sum of {bad:?} bytes"),
    );
}

/// The probe: refused before the #BP route, fires exactly while enabled.
fn check_probe(poker: &mut WpPoker) {
    let Some(id) = probe::lookup("demo:tick") else {
        check(
            "probe_lookup",
            false,
            format_args!("demo:tick not registered"),
        );
        return;
    };
    // SAFETY: not enabled (refused: no route yet).
    let early = unsafe { probe::enable(id, on_tick, poker) };
    check(
        "probe_refused_without_route",
        early == Err(ProbeError::NoTrapRoute),
        format_args!("{early:?}"),
    );

    install_int3_route();
    // SAFETY: `on_tick` may run at every `tick`; the #BP route is in place.
    let enabled = unsafe { probe::enable(id, on_tick, poker) };
    check("probe_enable", enabled.is_ok(), format_args!("{enabled:?}"));
    for n in 1..=3 {
        funcs::tick(n * 10);
    }
    let hits = probe::info(id).map_or(0, |p| p.hits);
    let (ticks, last) = (
        TICKS.load(Ordering::Relaxed),
        LAST_ARG.load(Ordering::Relaxed),
    );
    println!("probe demo:tick enabled: hits={hits} handler_runs={ticks} last_arg={last}");
    check(
        "probe_fires_with_argument",
        hits == 3 && ticks == 3 && last == 30,
        format_args!("hits {hits}, handler ran {ticks}x, last argument {last}"),
    );

    // SAFETY: as for enable.
    let disabled = unsafe { probe::disable(id, poker) };
    funcs::tick(40);
    let after = probe::info(id).map_or(0, |p| p.hits);
    println!("probe demo:tick disabled: hits={after}");
    check(
        "probe_silent_when_disabled",
        disabled.is_ok() && after == 3 && TICKS.load(Ordering::Relaxed) == 3,
        format_args!("{disabled:?}, hits {after}"),
    );
    for p in introspect::probes() {
        let sites = p.sites().count();
        println!(
            "probe {}:{} enabled={} hits={} sites={sites}",
            p.provider, p.name, p.enabled, p.hits
        );
    }
}

/// The static key: off at boot (the site falls through), counted exactly while enabled.
fn check_key(poker: &mut WpPoker) {
    let data = [1u8, 2, 3];
    let counted = || funcs::SUMS_COUNTED.load(Ordering::Relaxed);
    funcs::sum(&data);
    let off = counted();
    // SAFETY: the #BP route is in place (`check_probe`); `poker` writes the text.
    let on = unsafe { funcs::COUNT_SUMS.enable(poker) };
    funcs::sum(&data);
    funcs::sum(&data);
    let while_on = counted();
    // SAFETY: as above.
    let off_again = unsafe { funcs::COUNT_SUMS.disable(poker) };
    funcs::sum(&data);
    println!("key COUNT_SUMS: counted {off} while off, {while_on} after two calls while on");
    check(
        "key_counts_only_while_enabled",
        on.is_ok() && off_again.is_ok() && off == 0 && while_on == 2 && counted() == 2,
        format_args!("{on:?} {off_again:?}: {off}, {while_on}, {}", counted()),
    );
    for k in kernel_loader::key::keys() {
        println!("key {} enabled={} sites={}", k.name, k.enabled, k.sites);
    }
}

/// Live retargeting: every `popcount` site to the portable version and back.
fn check_retarget(poker: &mut WpPoker) {
    // SAFETY: `popcount_soft` runs on every CPU and stays mapped; the #BP route is in.
    let r = unsafe { funcs::popcount::retarget(funcs::popcount_soft, poker) };
    let right = funcs::popcount(0xf0f0) == 8;
    println!("retarget popcount -> popcount_soft: {r:?}");
    check(
        "retarget_popcount",
        r.is_ok_and(|r| r.sites > 0) && right,
        format_args!("{r:?}, result right: {right}"),
    );
    // SAFETY: as above, for whatever the resolvers pick.
    let back = unsafe { kernel_loader::ifunc::reresolve_all(&CpuFeatures::detect(), poker) };
    println!("reresolve_all: {back:?}");
    // Where the boot choice was not `popcount_soft` (POPCNT present), the retarget moved
    // sites and re-resolving must move them back; otherwise both changed nothing.
    let moved = r.is_ok_and(|r| r.sites_rewritten > 0);
    check(
        "reresolve_restores_the_boot_choice",
        back.is_ok_and(|b| (b.retargeted > 0) == moved) && funcs::popcount(0xf0f0) == 8,
        format_args!("{back:?} after {r:?}"),
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC {info}");
    exit_qemu(false)
}
