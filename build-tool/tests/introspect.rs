//! Introspection (issue 13, item 3) on the host: the fake image of `common` is read
//! through `kernel_loader::introspect` before and after `patch_ifuncs`, and its probe
//! (registered once: the registry is global) before and after enable/disable, with hits
//! counted through the #BP hook.

mod common;

use common::*;
use kernel_loader::format::{ProbeKind, SiteKind};
use kernel_loader::introspect::{
    self, IfuncInfo, LiveImage, ProbeSiteImage, ProbeSiteState, SiteState,
};
use kernel_loader::patch::{InsnBytes, TextPoker, patch_ifuncs};
use kernel_loader::probe::{self, Int3Frame, ProbeId};
use ksites::table::ProbeSiteEntry;

/// (address, kind, length, state) of each site of `f`.
fn sites(f: &IfuncInfo<'_>) -> Vec<(u64, SiteKind, u8, SiteState)> {
    f.sites()
        .map(|s| (s.addr, s.kind, s.len, s.state))
        .collect()
}

/// Writes `bytes` into the fake image's text at `off`, as a poker would.
fn poke(img: &Image, off: usize, bytes: &[u8]) {
    // SAFETY: inside the fake image's text, which nothing executes.
    unsafe { FakePoker::default().write(img.addr(off), bytes) }.unwrap();
}

#[test]
fn ifuncs_name_slot_choice_and_site_states_before_and_after_init() {
    let img = Image::new();
    let t = img.table();
    // SAFETY: the table describes `img`, whose sites, trampolines and slots are memory.
    let live = unsafe { LiveImage::new(t) };
    let f: Vec<_> = live.ifuncs().collect();
    assert_eq!(f.len(), 2);
    let (a0, b0) = (img.addr(IMPL_A0), img.addr(IMPL_B0));
    for (f, name, slot, tramp, default) in [
        (&f[0], "t::zero", SLOT0, TRAMP0, a0),
        (&f[1], "t::one", SLOT1, TRAMP1, b0),
    ] {
        assert_eq!(f.name, name);
        assert_eq!(f.slot, img.addr(slot));
        assert_eq!(f.trampoline, img.addr(tramp));
        assert_eq!(f.resolver, img.addr(RESOLVER));
        assert_eq!((f.default, f.chosen), (default, default));
        assert!(!f.resolved && f.chose_default() && !f.imported, "{f:?}");
    }
    let tr = SiteState::Trampoline;
    let zero_sites = |st| {
        vec![
            (img.addr(S_CALL), SiteKind::Call, 5, st),
            (img.addr(S_PCALL), SiteKind::Call, 6, st),
        ]
    };
    let one_sites = |st| {
        vec![
            (img.addr(S_JMP), SiteKind::Jmp, 5, st),
            (img.addr(S_JCC), SiteKind::Jcc, 6, st),
        ]
    };
    assert_eq!(sites(&f[0]), zero_sites(tr));
    assert_eq!(sites(&f[1]), one_sites(tr));
    assert_eq!(live.ifunc("t::one").map(|f| f.index), Some(1));
    assert!(live.ifunc("t::two").is_none());

    // SAFETY: as above; nothing executes the image.
    unsafe {
        patch_ifuncs(
            &t,
            &img.exec(),
            &mut FakePoker::default(),
            &mut resolve_fast(&img),
        )
    }
    .unwrap();
    let f: Vec<_> = live.ifuncs().collect();
    assert_eq!(f[0].chosen, img.addr(IMPL_A1));
    assert_eq!(f[1].chosen, img.addr(IMPL_B1));
    assert!(f.iter().all(|f| f.resolved && !f.chose_default()), "{f:?}");
    assert_eq!(sites(&f[0]), zero_sites(SiteState::Patched));
    assert_eq!(sites(&f[1]), one_sites(SiteState::Patched));

    // A site branching elsewhere, and one that is no branch, are told apart.
    img_branch(&img, S_CALL, &[0xe8], IMPL_B1);
    poke(&img, S_JMP, &[0x90]);
    let f: Vec<_> = live.ifuncs().collect();
    assert_eq!(
        f[0].sites().next().map(|s| s.state),
        Some(SiteState::Elsewhere(img.addr(IMPL_B1)))
    );
    let found = img.bytes()[S_JMP..S_JMP + 5].to_vec();
    assert_eq!(
        f[1].sites().next().map(|s| s.state),
        Some(SiteState::Unexpected(InsnBytes::new(&found)))
    );
}

/// Rewrites the branch at `at` to `target` through the poker (the image is shared).
fn img_branch(img: &Image, at: usize, op: &[u8], target: usize) {
    let end = at + op.len() + 4;
    let rel = (target as i64 - end as i64) as i32;
    poke(img, at, op);
    poke(img, at + op.len(), &rel.to_le_bytes());
}

#[test]
fn an_ifunc_that_chose_its_default_is_resolved_by_its_patched_sites() {
    let img = Image::new();
    let t = img.table();
    let mut default = |f: &kernel_loader::format::Ifunc<'_>| f.default;
    // SAFETY: as above.
    unsafe { patch_ifuncs(&t, &img.exec(), &mut FakePoker::default(), &mut default) }.unwrap();
    // SAFETY: the table describes `img`.
    let live = unsafe { LiveImage::new(t) };
    for f in live.ifuncs() {
        assert!(f.resolved && f.chose_default(), "{f:?}");
        assert!(f.sites().all(|s| s.state == SiteState::Patched), "{f:?}");
        assert_eq!(f.sites().count(), 2);
    }
}

/// The C tail site the probe test adds (`ret`, NOPs while disabled).
const P_CTAIL: usize = 200;

fn handler(_: ProbeId, _: &[u64; 6]) {}

#[test]
fn probes_sites_state_and_hits_through_enable_fire_disable() {
    let img: &'static mut Image = Box::leak(Box::new(Image::new()));
    // The Rust site, and a C tail site (whose enabled form needs no dispatcher within
    // reach of the heap, and fires through the #BP hook).
    let mut input = img.table_input();
    input.probe_sites.truncate(1);
    input.probe_sites.push(ProbeSiteEntry {
        addr: img.addr(P_CTAIL),
        target: 0,
        kind: ProbeKind::CTail,
        probe: 0,
    });
    img.write_table(&input);
    img.bytes_mut()[P_CTAIL..P_CTAIL + 5].copy_from_slice(&probe::C_TAIL_OFF);
    let img: &'static Image = img;
    let t = img.table();
    assert!(
        introspect::probes().next().is_none(),
        "nothing registered yet"
    );
    // SAFETY: the fake image is never executed: its sites' `int3`s are fired through
    // `handle_int3` by hand below, standing in for the #BP route.
    unsafe { probe::declare_int3_route() };
    probe::register_image(t, &FakePoker::default()).unwrap();

    let all: Vec<_> = introspect::probes().collect();
    assert_eq!(all.len(), 1);
    let p = all[0];
    assert_eq!(
        (p.id, p.provider.as_str(), p.name.as_str()),
        (ProbeId(0), "p", "one")
    );
    assert_eq!((p.nargs, p.sites, p.hits, p.enabled), (1, 2, 0, false));
    let states = |want: ProbeSiteState, enabled: bool| {
        let got: Vec<_> = introspect::probe_sites(p.id)
            .map(|s| (s.addr, s.kind, s.image, s.state, s.probe_enabled))
            .collect();
        let k = ProbeSiteImage::Kernel;
        assert_eq!(
            got,
            vec![
                (img.addr(P_RUST), ProbeKind::RustJmp, k, want, enabled),
                (img.addr(P_CTAIL), ProbeKind::CTail, k, want, enabled),
            ]
        );
    };
    states(ProbeSiteState::Disabled, false);
    assert_eq!(p.sites().count(), 2);
    assert_eq!(introspect::probe_sites(ProbeId(1)).count(), 0);

    // SAFETY: the fake image is never executed; the poker writes into it.
    unsafe { probe::enable(p.id, handler, &mut FakePoker::default()) }.unwrap();
    states(ProbeSiteState::Enabled, true);
    const N: u64 = 7;
    for _ in 0..N {
        let mut ret = 0x1234u64;
        let mut f = Int3Frame {
            rip: img.addr(P_CTAIL) + 1,
            rsp: &raw mut ret as u64,
            ..Default::default()
        };
        // SAFETY: a trap at the enabled C tail site; its emulated `ret` reads `ret`.
        assert!(unsafe { probe::handle_int3(&mut f) });
        assert_eq!(f.rip, 0x1234);
    }
    let p = introspect::probes().next().unwrap();
    assert_eq!((p.hits, p.enabled), (N, true));

    // SAFETY: as above.
    unsafe { probe::disable(p.id, &mut FakePoker::default()) }.unwrap();
    states(ProbeSiteState::Disabled, false);
    let p = introspect::probes().next().unwrap();
    assert_eq!((p.hits, p.enabled), (N, false));

    // A trap left over by a failed batch, then a foreign byte.
    poke(img, P_RUST, &[0xcc]);
    let first = introspect::probe_sites(p.id).next().unwrap();
    assert_eq!(first.state, ProbeSiteState::Transitioning);
    poke(img, P_RUST, &[0x0f]);
    poke(img, P_RUST + 2, &[0x99]);
    let first = introspect::probe_sites(p.id).next().unwrap();
    let found = img.bytes()[P_RUST..P_RUST + 5].to_vec();
    assert_eq!(
        first.state,
        ProbeSiteState::Unexpected(InsnBytes::new(&found))
    );

    poke(img, P_RUST + 2, &[0x44]);

    // A module's probe is listed after the kernel's, its sites in the module; an
    // iterator over them stops once the module is unloaded.
    let m: &'static mut Image = Box::leak(Box::new(Image::new()));
    let mut input = m.table_input();
    input.probe_sites.truncate(1);
    m.write_table(&input);
    let m: &'static Image = m;
    let range = m.addr(0)..m.addr(4096);
    // SAFETY: the module's memory is leaked: it outlives its registration.
    let h =
        unsafe { probe::register_module(m.table(), range.clone(), &FakePoker::default()) }.unwrap();
    let ids: Vec<_> = introspect::probes().map(|p| (p.id, p.hits)).collect();
    assert_eq!(ids, vec![(ProbeId(0), N), (ProbeId(1), 0)]);
    let module = ProbeSiteImage::Module {
        first_id: ProbeId(1),
    };
    let got: Vec<_> = introspect::probe_sites(ProbeId(1))
        .map(|s| (s.addr, s.image, s.state))
        .collect();
    assert_eq!(
        got,
        vec![(m.addr(P_RUST), module, ProbeSiteState::Disabled)]
    );
    let mut stale = introspect::probe_sites(ProbeId(1));
    // SAFETY: as for `probe::enable`: the poker writes into the fake images only.
    unsafe { probe::unregister_module(&h, range, &mut FakePoker::default()) }.unwrap();
    assert!(stale.next().is_none());
    assert_eq!(introspect::probes().count(), 1);
}
