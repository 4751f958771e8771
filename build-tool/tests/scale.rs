//! Bounded resources: the reader and the patch engine on 10^5 sites and 10^4 ifuncs
//! (no quadratic path may hide here: these sizes would take minutes if one did).

#![allow(clippy::single_range_in_vec_init)] // one executable range is the point

use kernel_loader::format::{SiteKind, Table};
use kernel_loader::patch::{PokeError, TextPoker, patch_ifuncs};
use ksites::table::{IfuncEntry, SiteEntry, build_table};

struct Poker {
    writes: usize,
}

impl TextPoker for Poker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the engine writes only inside validated sites of the test buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        self.writes += 1;
        Ok(())
    }

    fn sync_cores(&mut self) {}

    fn end(&mut self) {}
}

#[test]
fn a_hundred_thousand_sites_and_ten_thousand_ifuncs() {
    const IFUNCS: usize = 10_000;
    const SITES: usize = 100_000;
    let tramp_bytes = IFUNCS * 8;
    let impl_off = tramp_bytes;
    let site_off = impl_off + 16;
    let text_len = site_off + SITES * 5;
    let data_off = text_len.next_multiple_of(4096);
    let table_off = data_off + IFUNCS * 8;
    let mut mem = vec![0u64; (table_off + 2 * 1024 * 1024) / 8];
    let base = mem.as_mut_ptr() as u64;
    let buf = mem.as_mut_ptr() as *mut u8;
    // SAFETY: `mem` is one allocation of the size used below.
    let b = unsafe { std::slice::from_raw_parts_mut(buf, mem.len() * 8) };
    let mut ifuncs = Vec::new();
    for i in 0..IFUNCS {
        let t = i * 8;
        let slot = data_off + i * 8;
        let disp = (slot as i64 - (t as i64 + 6)) as i32;
        b[t..t + 2].copy_from_slice(&[0xff, 0x25]);
        b[t + 2..t + 6].copy_from_slice(&disp.to_le_bytes());
        b[slot..slot + 8].copy_from_slice(&(base + impl_off as u64).to_le_bytes());
        ifuncs.push(IfuncEntry {
            name: format!("f{i}"),
            trampoline: base + t as u64,
            slot: base + slot as u64,
            resolver: base + impl_off as u64,
            default: base + impl_off as u64,
        });
    }
    let mut sites = Vec::new();
    for i in 0..SITES {
        let at = site_off + i * 5;
        let f = i % IFUNCS;
        let rel = ((f * 8) as i64 - (at as i64 + 5)) as i32;
        b[at] = 0xe8;
        b[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
        sites.push(SiteEntry {
            addr: base + at as u64,
            kind: SiteKind::Call,
            prefixes: 0,
            ifunc: f as u32,
        });
    }
    let table = build_table(base + table_off as u64, &ifuncs, &sites).unwrap();
    b[table_off..table_off + table.len()].copy_from_slice(&table);
    let exec = [base..base + text_len as u64];
    let t = Table::parse(
        &b[table_off..table_off + table.len()],
        base + table_off as u64,
        &exec,
    )
    .unwrap();
    assert_eq!(
        (t.ifunc_count(), t.site_count()),
        (IFUNCS as u32, SITES as u32)
    );
    let target = base + impl_off as u64 + 8;
    let mut p = Poker { writes: 0 };
    // SAFETY: the table describes the test buffer, which nothing executes.
    let r = unsafe { patch_ifuncs(&t, &exec, &mut p, &mut |_| target) }.unwrap();
    assert_eq!(r.sites_patched as usize, SITES);
    assert_eq!(p.writes, SITES);
    // Every site now calls the target directly.
    for i in (0..SITES).step_by(997) {
        let at = site_off + i * 5;
        let rel = i32::from_le_bytes(b[at + 1..at + 5].try_into().unwrap());
        assert_eq!((base as i64 + at as i64 + 5 + rel as i64) as u64, target);
    }
    drop(mem);
}
