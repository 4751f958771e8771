//! The `.ksites` writer. Layout and encodings come from `kernel_loader::format`.

use anyhow::{Context, Result, ensure};
use kernel_loader::format::{
    ARCH_X86_64, HEADER_SIZE, Header, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncDesc, IfuncSite,
    MAGIC, SiteKind, SubTable, VERSION, make_rel,
};

/// An ifunc to describe.
#[derive(Clone, Debug)]
pub struct IfuncEntry {
    /// Name for the string table.
    pub name: String,
    /// Trampoline address.
    pub trampoline: u64,
    /// Slot address.
    pub slot: u64,
    /// Resolver address.
    pub resolver: u64,
    /// Default implementation address.
    pub default: u64,
}

/// A site to record.
#[derive(Clone, Copy, Debug)]
pub struct SiteEntry {
    /// Address of the instruction's first byte.
    pub addr: u64,
    /// Its kind.
    pub kind: SiteKind,
    /// Prefix bytes.
    pub prefixes: u8,
    /// Index into the ifunc list.
    pub ifunc: u32,
}

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// The size of the table for these counts (independent of addresses), so the caller can
/// place the section before the contents are known.
pub fn table_size(ifuncs: &[IfuncEntry], sites: usize) -> usize {
    let strings: usize = ifuncs.iter().map(|f| f.name.len() + 1).sum();
    let end =
        align4(HEADER_SIZE + ifuncs.len() * IFUNC_DESC_SIZE) + sites * IFUNC_SITE_SIZE + strings;
    (end + 7) & !7
}

/// Encodes a table that will live at address `base`. Sites are sorted by address and
/// deduplicated here; every self-relative reference is range-checked.
pub fn build_table(base: u64, ifuncs: &[IfuncEntry], sites: &[SiteEntry]) -> Result<Vec<u8>> {
    let mut sites = sites.to_vec();
    sites.sort_by_key(|s| s.addr);
    sites.dedup_by_key(|s| s.addr);

    let ifunc_off = HEADER_SIZE;
    let site_off = align4(ifunc_off + ifuncs.len() * IFUNC_DESC_SIZE);
    let str_off = site_off + sites.len() * IFUNC_SITE_SIZE;
    let mut strings = Vec::new();
    let mut name_offs = Vec::new();
    for f in ifuncs {
        ensure!(
            !f.name.as_bytes().contains(&0),
            "ifunc name {:?} contains NUL",
            f.name
        );
        name_offs.push(strings.len() as u32);
        strings.extend_from_slice(f.name.as_bytes());
        strings.push(0);
    }
    let total = (str_off + strings.len() + 7) & !7;
    ensure!(
        total == table_size(ifuncs, sites.len()),
        "internal: table size mismatch"
    );
    let total32 = u32::try_from(total).context("table larger than 4 GiB")?;

    let mut out = vec![0u8; total];
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        arch: ARCH_X86_64,
        flags: 0,
        header_size: HEADER_SIZE as u32,
        total_size: total32,
        ifuncs: SubTable {
            offset: ifunc_off as u32,
            count: ifuncs.len() as u32,
        },
        ifunc_sites: SubTable {
            offset: site_off as u32,
            count: sites.len() as u32,
        },
        probes: SubTable {
            offset: str_off as u32,
            count: 0,
        },
        probe_sites: SubTable {
            offset: str_off as u32,
            count: 0,
        },
        strings: SubTable {
            offset: str_off as u32,
            count: strings.len() as u32,
        },
    };
    out[..HEADER_SIZE].copy_from_slice(&header.to_bytes());

    let rel = |field: usize, target: u64, what: &str, name: &str| -> Result<i32> {
        make_rel(base + field as u64, target).with_context(|| {
            format!("{what} of {name} at {target:#x} is out of i32 reach of the table at {base:#x}")
        })
    };
    for (i, f) in ifuncs.iter().enumerate() {
        let at = ifunc_off + i * IFUNC_DESC_SIZE;
        let d = IfuncDesc {
            trampoline: rel(at, f.trampoline, "trampoline", &f.name)?,
            slot: rel(at + 4, f.slot, "slot", &f.name)?,
            resolver: rel(at + 8, f.resolver, "resolver", &f.name)?,
            default: rel(at + 12, f.default, "default", &f.name)?,
            name: name_offs[i],
        };
        out[at..at + IFUNC_DESC_SIZE].copy_from_slice(&d.to_bytes());
    }
    for (i, s) in sites.iter().enumerate() {
        let at = site_off + i * IFUNC_SITE_SIZE;
        let info = IfuncSite::pack_info(s.kind, u32::from(s.prefixes), s.ifunc)
            .with_context(|| format!("site {:#x}: too many prefixes or ifuncs", s.addr))?;
        let e = IfuncSite {
            site: rel(at, s.addr, "site", "call site")?,
            info,
        };
        out[at..at + IFUNC_SITE_SIZE].copy_from_slice(&e.to_bytes());
    }
    out[str_off..str_off + strings.len()].copy_from_slice(&strings);
    Ok(out)
}
