//! The probe registry on the host, with fault injection: a fake image with Rust probe
//! sites is registered (once: the registry is global), then enabled and disabled through
//! pokers that fail on the Nth write, once or for good.

mod common;

use common::*;
use kernel_loader::format::Table;
use kernel_loader::probe::{self, ProbeError, ProbeId};

fn handler(_: ProbeId, _: &[u64; 6]) {}

fn en(p: ProbeId, poker: &mut FakePoker) -> Result<(), ProbeError> {
    // SAFETY: the fake image is never executed; the poker writes into it.
    unsafe { probe::enable(p, handler, poker) }
}

fn dis(p: ProbeId, poker: &mut FakePoker) -> Result<(), ProbeError> {
    // SAFETY: as in `en`.
    unsafe { probe::disable(p, poker) }
}

#[test]
fn probe_batches_under_fault_injection() {
    // Only the Rust site: a C call site would need this process's dispatcher within
    // rel32 reach of the heap.
    let img: &'static mut Image = Box::leak(Box::new(Image::new()));
    let mut input = img.table_input();
    input.probe_sites.truncate(1);
    img.write_table(&input);
    let img: &'static Image = img;
    let t = Table::parse(img.table_bytes(), img.addr(TABLE), &img.exec()).unwrap();
    probe::register_image(t, &FakePoker::default()).unwrap();
    assert_eq!(
        probe::register_image(t, &FakePoker::default()),
        Err(ProbeError::AlreadyRegistered)
    );
    let p = probe::lookup("p:one").unwrap();
    // SAFETY: the fake image is never executed: no `int3` of its sites can trap.
    unsafe { probe::declare_int3_route() };
    assert_eq!(probe::matching("p:*").count(), 1);
    let site = |img: &Image| img.bytes()[P_RUST..P_RUST + 5].to_vec();
    let off = site(img);
    assert_eq!(off, [0x0f, 0x1f, 0x44, 0x00, 0x00]);

    let mut good = FakePoker::default();
    en(p, &mut good).unwrap();
    assert_eq!(good.syncs, 3, "one batch, three serializations");
    let on = site(img);
    assert_eq!(on[0], 0xe9);
    let rel = i32::from_le_bytes(on[1..5].try_into().unwrap());
    assert_eq!(
        (img.addr(P_RUST) as i64 + 5 + rel as i64) as u64,
        img.addr(P_TARGET)
    );
    dis(p, &mut FakePoker::default()).unwrap();
    assert_eq!(site(img), off);

    // Each write of an enable batch, then of a disable batch, failing once: restored.
    for enable in [true, false] {
        if !enable {
            en(p, &mut FakePoker::default()).unwrap();
        }
        let before = site(img);
        for fail_at in 0..3 {
            for partial in [0, 2] {
                let mut f = FakePoker {
                    fail_at: Some(fail_at),
                    partial,
                    ..Default::default()
                };
                let r = if enable {
                    en(p, &mut f)
                } else {
                    dis(p, &mut f)
                };
                assert!(matches!(r, Err(ProbeError::Poke(_))), "{r:?}");
                assert_eq!(site(img), before, "enable={enable} fail_at={fail_at}");
                assert_eq!(probe::is_enabled(p), !enable);
                assert_eq!(f.ended, 1);
            }
        }
    }
    dis(p, &mut FakePoker::default()).unwrap();

    // Failing for good after the first write: the rollback cannot finish and says so;
    // the next batch with a working poker accepts the `cc` residue and repairs it.
    let mut f = FakePoker {
        fail_at: Some(1),
        fail_forever: true,
        ..Default::default()
    };
    let r = en(p, &mut f);
    assert_eq!(
        r,
        Err(ProbeError::RollbackIncomplete {
            site: img.addr(P_RUST),
            probe: p
        })
    );
    assert_eq!(site(img)[0], 0xcc, "residue");
    assert!(!probe::is_enabled(p));
    en(p, &mut FakePoker::default()).unwrap();
    assert_eq!(site(img), on);
    dis(p, &mut FakePoker::default()).unwrap();
    assert_eq!(site(img), off);
    // Something else in the site: refused before any write.
    // SAFETY: writes one byte of the fake image's text, as the engine's poker does.
    unsafe {
        kernel_loader::patch::TextPoker::write(
            &mut FakePoker::default(),
            img.addr(P_RUST) + 2,
            &[0x99],
        )
    }
    .unwrap();
    let mut f = FakePoker::default();
    let r = en(p, &mut f);
    assert!(
        matches!(r, Err(ProbeError::UnexpectedBytes { .. })),
        "{r:?}"
    );
    assert_eq!(f.writes, 0);
}
