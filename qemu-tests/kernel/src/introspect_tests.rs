//! Introspection (`kernel_loader::introspect`) inside the booted kernel: after boot
//! patching, every ifunc reports the implementation CPUID calls for and every site is a
//! direct branch to it; a probe reports its sites' states and exact hits through
//! enable, firing and disable.

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::cell;
use kernel_loader::introspect::{self, LiveImage, ProbeSiteImage, ProbeSiteState, SiteState};
use kernel_loader::module::Module;
use kernel_loader::probe::{self, ProbeId};

use crate::harness::{Harness, Msg};
use crate::ifunc_tests::{expected_impl, impl_name, raw_choice, read_slot};
use crate::poker::AliasPoker;
use crate::{ensure, msg, paging, println};

/// A probe only these tests enable.
#[inline(never)]
fn tick(x: u64) -> u64 {
    kernel_loader::probe!(itest, tick, x);
    black_box(x) + 1
}

static HANDLED: AtomicU64 = AtomicU64::new(0);

fn handler(_: ProbeId, _: &[u64; 6]) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// Each ifunc's chosen implementation is the one CPUID calls for (and what its slot
/// holds), and every one of its sites is patched to it.
fn ifuncs(live: &LiveImage<'_>) -> Result<(), Msg> {
    let c = raw_choice();
    let mut n = 0;
    for f in live.ifuncs() {
        let chosen = impl_name(f.chosen);
        let want = expected_impl(f.name, &c);
        ensure!(
            chosen == want,
            "{}: reports {chosen}, CPUID calls for {want}",
            f.name
        );
        ensure!(
            f.chosen == read_slot(f.slot),
            "{}: chosen is not the slot",
            f.name
        );
        ensure!(f.resolved && !f.imported, "{}: {f:?}", f.name);
        let mut sites = 0;
        for s in f.sites() {
            ensure!(
                s.state == SiteState::Patched,
                "{} site {:#x} ({}): {:?}",
                f.name,
                s.addr,
                s.kind.name(),
                s.state
            );
            sites += 1;
        }
        let recorded = live.table().sites().filter(|s| s.ifunc == f.index).count();
        ensure!(sites == recorded && sites >= 2, "{}: {sites} sites", f.name);
        println!(
            "introspect ifunc {} -> {chosen} ({sites} sites patched)",
            f.name
        );
        n += 1;
    }
    ensure!(
        n == live.table().ifunc_count() && n >= 5,
        "{n} ifuncs listed"
    );
    Ok(())
}

/// Every site of `id` is in state `want`, in the kernel image; returns how many.
fn sites_in(id: ProbeId, want: ProbeSiteState) -> Result<usize, Msg> {
    let mut n = 0;
    for s in introspect::probe_sites(id) {
        ensure!(
            s.state == want && s.image == ProbeSiteImage::Kernel,
            "site {:#x}: {:?} in {:?}, expected {want:?}",
            s.addr,
            s.state,
            s.image
        );
        n += 1;
    }
    ensure!(n >= 1, "probe {} lists no sites", id.0);
    Ok(n)
}

/// (enabled, hits) of `id`, as `introspect::probes` lists it.
fn listed(id: ProbeId) -> Result<(bool, u64), Msg> {
    introspect::probes()
        .find(|p| p.id == id)
        .map(|p| (p.enabled, p.hits))
        .ok_or_else(|| msg!("probe {} not listed", id.0))
}

fn probes() -> Result<(), Msg> {
    ensure!(
        introspect::probes().count() as u32 == probe::count(),
        "probes() lists {}, the registry holds {}",
        introspect::probes().count(),
        probe::count()
    );
    let id = probe::lookup("itest:tick").ok_or_else(|| msg!("itest:tick not registered"))?;
    let p = introspect::probes()
        .find(|p| p.id == id)
        .ok_or_else(|| msg!("not listed"))?;
    ensure!(
        p.provider == "itest" && p.name == "tick" && p.nargs == 1,
        "{p:?}"
    );
    ensure!(!p.enabled && p.hits == 0, "{p:?}");
    let n = sites_in(id, ProbeSiteState::Disabled)?;
    ensure!(
        n as u32 == p.sites,
        "{n} sites listed, info says {}",
        p.sites
    );

    let mut poker = AliasPoker::default();
    // SAFETY: the #BP hook is installed (probe tests); AliasPoker writes through an
    // alias and serializes every online CPU.
    unsafe { probe::enable(id, handler, &mut poker) }.map_err(Msg::display)?;
    sites_in(id, ProbeSiteState::Enabled)?;
    const N: u64 = 25;
    let handled = HANDLED.load(Ordering::Relaxed);
    for i in 0..N {
        ensure!(tick(i) == i + 1);
    }
    ensure!(
        HANDLED.load(Ordering::Relaxed) - handled == N,
        "handler runs"
    );
    ensure!(
        listed(id)? == (true, N),
        "after {N} fires: {:?}",
        listed(id)?
    );

    let mut poker = AliasPoker::default();
    // SAFETY: as above.
    unsafe { probe::disable(id, &mut poker) }.map_err(Msg::display)?;
    sites_in(id, ProbeSiteState::Disabled)?;
    tick(0);
    ensure!(
        listed(id)? == (false, N),
        "after disable: {:?}",
        listed(id)?
    );
    println!("introspect probe itest:tick: {n} site(s), {N} hits");
    Ok(())
}

/// A loaded module through introspection: its imports report the kernel's choice and
/// its own ifunc its slot, every site of either patched; its probes' sites lie in the
/// module and hold the form their probe's state calls for.
pub fn module(m: &Module<'_>) -> Result<(), Msg> {
    let text = paging::text_range();
    // SAFETY: as in `run`.
    let kernel = unsafe { cell::image_table(&[text]) }.map_err(Msg::display)?;
    // SAFETY: this kernel's table.
    let kernel = unsafe { LiveImage::new(kernel) };
    let t = m.table().ok_or_else(|| msg!("{}: no table", m.name()))?;
    // SAFETY: `m` is loaded (its sites and slots are mapped while it is borrowed) and
    // its imports' trampolines are this kernel's.
    let live = unsafe { LiveImage::new(t) };
    let (mut imports, mut sites) = (0, 0);
    for f in live.ifuncs() {
        let want = if f.imported {
            imports += 1;
            let k = kernel
                .ifuncs()
                .find(|k| k.trampoline == f.trampoline)
                .ok_or_else(|| msg!("{}: import {} not in the kernel", m.name(), f.name))?;
            ensure!(f.slot == k.slot, "{}: import {} slot", m.name(), f.name);
            k.chosen
        } else {
            read_slot(f.slot)
        };
        ensure!(
            f.resolved && f.chosen == want,
            "{} {}: chosen {:#x}, expected {want:#x}",
            m.name(),
            f.name,
            f.chosen
        );
        for s in f.sites() {
            ensure!(
                s.state == SiteState::Patched && m.text().contains(&s.addr),
                "{} {} site {:#x}: {:?}",
                m.name(),
                f.name,
                s.addr,
                s.state
            );
            sites += 1;
        }
    }
    ensure!(
        imports >= 1 && sites >= 2,
        "{}: {imports} imports, {sites} sites",
        m.name()
    );
    let ids = m.probe_ids();
    let image = ProbeSiteImage::Module {
        first_id: ProbeId(ids.start),
    };
    let mut psites = 0;
    for id in ids.map(ProbeId) {
        for s in introspect::probe_sites(id) {
            let want = if s.probe_enabled {
                ProbeSiteState::Enabled
            } else {
                ProbeSiteState::Disabled
            };
            ensure!(
                s.image == image && s.state == want && m.text().contains(&s.addr),
                "{} probe {} site {:#x}: {:?} in {:?}",
                m.name(),
                id.0,
                s.addr,
                s.state,
                s.image
            );
            psites += 1;
        }
    }
    ensure!(psites >= 1, "{}: no probe sites listed", m.name());
    println!(
        "introspect module {}: {imports} imports, {sites} ifunc sites patched, {psites} probe sites",
        m.name()
    );
    Ok(())
}

/// Runs the introspection tests: after boot patching and after the probe tests
/// registered the image and installed the #BP hook.
pub fn run(h: &mut Harness) {
    let text = paging::text_range();
    // SAFETY: as in ifunc_tests: the image was embedded; the table is mapped, read-only.
    let table = match unsafe { cell::image_table(&[text]) } {
        Ok(t) => t,
        Err(e) => {
            h.check("introspect_table", Err(e));
            return;
        }
    };
    // SAFETY: the table describes this running kernel: its sites, trampolines and
    // slots are mapped and readable.
    let live = unsafe { LiveImage::new(table) };
    h.check("introspect_ifuncs_choice_and_sites_patched", ifuncs(&live));
    h.check("introspect_probe_sites_state_and_hits", probes());
}
