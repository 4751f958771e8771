//! Where the kernel runs: the rust-lld kernel is a PIE (`ET_DYN`) that the boot stub
//! relocates to wherever it was loaded ([`crate::boot`]); `cargo xtask qemu` boots it
//! once moved away from its link address (`max-smp4/relocated`). These tests check that the
//! dynamic relocations were applied (pointers held in data point at the run-time image)
//! and that the ksites table, which is self-relative, agrees: every ifunc's trampoline,
//! slot, implementations and sites, and every probe site, lie in the run-time image,
//! not where it was linked. The line `load: runtime R link L delta D` is what the xtask
//! judges the relocated run by.

use core::ops::Range;

use kernel_loader::cell;
use kernel_loader::introspect::{self, LiveImage, ProbeSiteImage};
use kernel_loader::probe;

use crate::boot::{self, LoadAddress};
use crate::harness::{Harness, Msg};
use crate::{ensure, paging, println};

/// `R_X86_64_RELATIVE`: the PIE's relocations the boot stub applies.
const R_RELATIVE: u32 = 8;
/// `R_X86_64_IRELATIVE`: GNU ifuncs' slots, which the ksites loader resolves.
const R_IRELATIVE: u32 = 37;

unsafe extern "C" {
    /// `[__rela_dyn_start, __rela_dyn_end)`: the image's `Elf64_Rela` entries (linker.ld).
    static __rela_dyn_start: [u64; 3];
    static __rela_dyn_end: [u64; 3];
}

/// A byte whose address a static below holds: a PIE has a dynamic relocation for it.
static MARKER: u8 = 0x5a;
/// Data that holds addresses (a PIE's `R_X86_64_RELATIVE` targets).
static POINTERS: [&u8; 2] = [&MARKER, &MARKER];
static FUNCTION: fn() -> u64 = marker_function;

#[inline(never)]
fn marker_function() -> u64 {
    0x4c6f_6164
}

/// The image's dynamic relocations: (R_X86_64_RELATIVE count, IRELATIVE count, other).
fn dynamic_relocations() -> (usize, usize, usize) {
    let start = (&raw const __rela_dyn_start).cast::<[u64; 3]>();
    let end = (&raw const __rela_dyn_end).cast::<[u64; 3]>();
    // SAFETY: linker.ld brackets the .rela.dyn output section with the two symbols; the
    // section holds whole 24-byte, 8-aligned entries, read-only after boot.
    let entries = unsafe {
        let n = end.offset_from(start);
        core::slice::from_raw_parts(start, usize::try_from(n).unwrap_or(0))
    };
    let (mut relative, mut irelative, mut other) = (0, 0, 0);
    for [_, info, _] in entries {
        match *info as u32 {
            R_RELATIVE => relative += 1,
            R_IRELATIVE => irelative += 1,
            _ => other += 1,
        }
    }
    (relative, irelative, other)
}

/// `addr` lies in `run` (the run-time range); and, when the image moved, not in the
/// same range at its link address.
fn in_image(what: &str, addr: u64, run: &Range<u64>, load: &LoadAddress) -> Result<(), Msg> {
    ensure!(
        run.contains(&addr),
        "{what} {addr:#x} is outside the run-time image {:#x}..{:#x}",
        run.start,
        run.end
    );
    if load.delta != 0 {
        let linked = run.start.wrapping_sub(load.delta)..run.end.wrapping_sub(load.delta);
        ensure!(
            !linked.contains(&addr),
            "{what} {addr:#x} is a link-time address"
        );
    }
    Ok(())
}

/// The boot stub found the image where it runs and applied its relocations; the ksites
/// table's addresses are the run-time ones.
fn image_runs_at_its_load_address() -> Result<(), Msg> {
    let load = boot::load_address();
    let (relative, irelative, other) = dynamic_relocations();
    println!(
        "load: runtime {:#x} link {:#x} delta {:#x}",
        load.runtime, load.link, load.delta
    );
    println!(
        "load: {relative} R_X86_64_RELATIVE applied, {irelative} R_X86_64_IRELATIVE moved for ksites"
    );
    ensure!(other == 0, "{other} unsupported dynamic relocations");
    ensure!(
        load.runtime == paging::kernel_range().start && load.runtime.is_multiple_of(4096),
        "{load:?}"
    );
    ensure!(
        relative > 0 || load.delta == 0,
        "a static image cannot run away from its link address: {load:?}"
    );

    // Pointers held in data (relocated at boot in a PIE) equal the run-time addresses
    // the code computes (RIP-relative).
    let image = paging::kernel_range();
    let text = paging::text_range();
    // SAFETY: plain reads of statics; volatile so the compiler cannot fold them into
    // the addresses it knows.
    let (pointers, function) = unsafe {
        (
            core::ptr::read_volatile(&raw const POINTERS),
            core::ptr::read_volatile(&raw const FUNCTION),
        )
    };
    for p in pointers {
        ensure!(
            core::ptr::eq(p, &MARKER) && *p == 0x5a,
            "a pointer in data is {:#x}, MARKER is at {:#x}",
            p as *const u8 as u64,
            (&raw const MARKER) as u64
        );
        in_image("a pointer in data", p as *const u8 as u64, &image, &load)?;
    }
    in_image(
        "a function pointer in data",
        function as usize as u64,
        &text,
        &load,
    )?;
    ensure!(function() == 0x4c6f_6164);

    // SAFETY: the image was embedded; the table is mapped, read-only.
    let table = unsafe { cell::image_table(core::slice::from_ref(&text)) }.map_err(Msg::display)?;
    // SAFETY: the table describes this running kernel: its sites, trampolines and slots
    // are mapped and readable.
    let live = unsafe { LiveImage::new(table) };
    let (mut ifuncs, mut sites) = (0, 0);
    for f in live.ifuncs() {
        let name = f.name;
        in_image(name, f.trampoline, &text, &load)?;
        in_image(name, f.default, &text, &load)?;
        in_image(name, f.resolver, &text, &load)?;
        in_image(name, f.slot, &image, &load)?;
        ensure!(f.resolved, "{name} is not resolved");
        in_image(name, f.chosen, &text, &load)?;
        for s in f.sites() {
            in_image(name, s.addr, &text, &load)?;
            sites += 1;
        }
        ifuncs += 1;
    }
    ensure!(ifuncs >= 5 && sites >= 20, "{ifuncs} ifuncs, {sites} sites");
    let mut probe_sites = 0;
    for id in (0..probe::count()).map(probe::ProbeId) {
        for s in introspect::probe_sites(id) {
            if s.image == ProbeSiteImage::Kernel {
                in_image("a probe site", s.addr, &text, &load)?;
                probe_sites += 1;
            }
        }
    }
    ensure!(probe_sites >= 10, "{probe_sites} kernel probe sites");
    println!(
        "load: {ifuncs} ifuncs ({sites} sites) and {probe_sites} probe sites at run-time addresses"
    );
    Ok(())
}

/// Runs the load-address test (after the probe tests registered the image).
pub fn run(h: &mut Harness) {
    h.check(
        "pie_image_runs_at_its_load_address",
        image_runs_at_its_load_address(),
    );
}
