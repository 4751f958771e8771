//! The real macros on the host: `static_key!` and `static_branch_*!` compiled into this
//! test binary, their `.ksites_key_sites` records read back from its own memory (the
//! build tool's input), a table built from them, registered the way the module loader
//! does (which writes the likely site's initial jump), then toggled live with the host
//! poker while other threads run the sites (a thread reaching a site mid-batch takes
//! `SIGTRAP`, which the host handler sends to `probe::handle_int3`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::vec::Vec;

use object::read::elf::ElfFile64;
use object::{LittleEndian, Object, ObjectSection};

use super::tests::{Area, kernel};
use crate::format::test_table::key_table;
use crate::host::{HostPoker, exec_ranges, install_int3_handler};
use crate::probe::{self, register_loaded_module, unregister_module};

crate::static_key!(HOST_KEY: default false);

#[inline(never)]
fn unlikely() -> bool {
    crate::static_branch_unlikely!(HOST_KEY)
}

#[inline(never)]
fn likely() -> bool {
    crate::static_branch_likely!(HOST_KEY)
}

/// The main program's load bias (`dlpi_addr` of the first object `dl_iterate_phdr`
/// reports).
fn load_bias() -> u64 {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `u64` below; `info` is valid during the callback.
        unsafe { *data.cast::<u64>() = (*info).dlpi_addr };
        1
    }
    let mut bias = 0u64;
    // SAFETY: the callback writes only `bias`, synchronously.
    unsafe { libc::dl_iterate_phdr(Some(first), (&raw mut bias).cast()) };
    bias
}

/// This binary's key site records, as `(flags, site, target, key)`, read from memory
/// (relocated by the dynamic loader).
fn records() -> Vec<(u32, u64, u64, u64)> {
    let file = std::fs::read("/proc/self/exe").unwrap();
    let elf = ElfFile64::<LittleEndian>::parse(&*file).unwrap();
    let sec = elf.section_by_name(super::SITE_RECORD_SECTION).unwrap();
    assert_eq!(sec.size() % super::SITE_RECORD_SIZE as u64, 0);
    let at = load_bias() + sec.address();
    (0..sec.size() / super::SITE_RECORD_SIZE as u64)
        .map(|i| {
            let p = (at + i * super::SITE_RECORD_SIZE as u64) as *const u64;
            // SAFETY: the section is mapped data of this process, 8-aligned records.
            let w = |k| unsafe { core::ptr::read_volatile(p.add(k)) };
            let head = w(0);
            assert_eq!(head as u32, super::SITE_RECORD_MAGIC);
            ((head >> 32) as u32, w(1), w(2), w(3))
        })
        .collect()
}

#[test]
fn the_real_macros_toggle_live_while_threads_run_them() {
    kernel();
    assert!(install_int3_handler());
    // Before registration: the compiled NOPs fall through.
    assert!(!unlikely() && likely());
    let mut mine: Vec<_> = records()
        .into_iter()
        .filter(|r| r.3 == HOST_KEY.addr())
        .collect();
    mine.sort_by_key(|r| r.1);
    assert_eq!(mine.len(), 2, "one record per site: {mine:x?}");
    let exec = exec_ranges();
    for &(flags, site, target, _) in &mine {
        assert!(flags <= super::SITE_RECORD_LIKELY);
        assert!(
            exec.iter()
                .any(|r| r.contains(&site) && r.contains(&target))
        );
    }
    static AREA: Area = Area::new();
    let sites: Vec<_> = mine
        .iter()
        .map(|&(flags, site, target, _)| (site, target, flags & super::SITE_RECORD_LIKELY != 0, 0))
        .collect();
    let keys = [(HOST_KEY.addr(), HOST_KEY.name(), false, false)];
    let bytes = key_table(AREA.table_base(), &keys, &sites);
    let table = AREA.table_with(&bytes, &exec);
    let text =
        exec.iter().map(|r| r.start).min().unwrap()..exec.iter().map(|r| r.end).max().unwrap();
    let mut poker = HostPoker::new();
    // As the module loader registers: the likely site of the disabled key gets its
    // jump (what `ksites embed` would have written).
    // SAFETY: no other thread runs the sites yet; the table names HOST_KEY.
    let h = unsafe { register_loaded_module(table, text, &mut poker) }.unwrap();
    assert!(!unlikely() && !likely(), "registered: both say disabled");

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let runners: Vec<_> = (0..2)
        .map(|_| {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (u, l) = (unlikely(), likely());
                    seen[usize::from(u)].fetch_add(1, Ordering::Relaxed);
                    seen[usize::from(l)].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Enough batches that the runners hit sites holding the trap (they usually do,
    // thousands of times; not asserted: on a loaded machine they may not run then).
    const ROUNDS: u64 = 1000;
    let traps = probe::int3_emulations();
    for i in 0..ROUNDS {
        // SAFETY: the host poker writes this process's text; SIGTRAP goes to
        // `handle_int3` (installed above).
        unsafe { HOST_KEY.enable(&mut poker) }.unwrap();
        assert!(unlikely() && likely(), "enabled, round {i}");
        // SAFETY: as above.
        unsafe { HOST_KEY.disable(&mut poker) }.unwrap();
        assert!(!unlikely() && !likely(), "disabled, round {i}");
    }
    stop.store(true, Ordering::Relaxed);
    for r in runners {
        r.join().unwrap();
    }
    std::println!(
        "static key host toggle: {} batches, {} writes, {} syncs, int3 emulations {}, runs seen false/true {}/{}",
        2 * ROUNDS,
        poker.writes,
        poker.syncs,
        probe::int3_emulations() - traps,
        seen[0].load(Ordering::Relaxed),
        seen[1].load(Ordering::Relaxed)
    );
    assert_eq!(
        poker.writes,
        1 + ROUNDS * 2 * 2 * 3,
        "3 writes per site per batch"
    );
    // SAFETY: as above; the key is disabled, the sites back in their registered form.
    unsafe { unregister_module(&h, 0..0, &mut poker) }.unwrap();
}
