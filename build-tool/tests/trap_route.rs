//! The #BP route check: `probe::enable` refuses with `ProbeError::NoTrapRoute`, writing
//! nothing, until the kernel declared that #BP reaches `probe::handle_int3`. Its own
//! test binary: the declaration is process-wide and is never withdrawn.

mod common;

use common::*;
use kernel_loader::format::Table;
use kernel_loader::probe::{self, ProbeError, ProbeId};

fn handler(_: ProbeId, _: &[u64; 6]) {}

#[test]
fn enabling_a_probe_without_the_trap_route_declared_fails_with_no_trap_route() {
    let img: &'static mut Image = Box::leak(Box::new(Image::new()));
    let mut input = img.table_input();
    input.probe_sites.truncate(1);
    img.write_table(&input);
    let img: &'static Image = img;
    let t = Table::parse(img.table_bytes(), img.addr(TABLE), &img.exec()).unwrap();
    probe::register_image(t, &FakePoker::default()).unwrap();
    let p = probe::lookup("p:one").unwrap();
    let site = |img: &Image| img.bytes()[P_RUST..P_RUST + 5].to_vec();
    let off = site(img);

    assert!(!probe::int3_route_declared());
    let mut poker = FakePoker::default();
    // SAFETY: the fake image is never executed; the poker writes into it.
    let r = unsafe { probe::enable(p, handler, &mut poker) };
    assert_eq!(r, Err(ProbeError::NoTrapRoute));
    assert_eq!(site(img), off, "nothing written");
    assert_eq!(
        (poker.writes, poker.began, poker.syncs, poker.ended),
        (0, 0, 0, 0),
        "no batch started"
    );
    assert!(!probe::is_enabled(p));
    let msg = ProbeError::NoTrapRoute.to_string();
    for part in [
        "probes need a #BP route",
        "kernel_loader::probe::int3_entry in IDT vector 3",
        "probe::handle_int3",
        "probe::declare_int3_route()",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
    let e: kernel_loader::Error = ProbeError::NoTrapRoute.into();
    assert_eq!(e.to_string(), msg);

    // SAFETY: as above: no site of the fake image runs.
    unsafe { probe::declare_int3_route() };
    assert!(probe::int3_route_declared());
    // SAFETY: as above.
    unsafe { probe::enable(p, handler, &mut FakePoker::default()) }.unwrap();
    assert!(probe::is_enabled(p));
    assert_eq!(site(img)[0], 0xe9, "enabled once declared");
}
