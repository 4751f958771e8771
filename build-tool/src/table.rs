//! The `.ksites` writer. Layout and encodings come from `kernel_loader::format`.

use anyhow::{Context, Result, ensure};
use kernel_loader::format::{
    HEADER_SIZE, Header, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncDesc, IfuncSite, KEY_DESC_SIZE,
    KEY_SITE_SIZE, KeyDesc, KeySite, MAGIC, PROBE_DESC_SIZE, PROBE_SITE_SIZE, ProbeDesc, ProbeKind,
    ProbeSite, SiteKind, SubTable, VERSION, make_rel,
};

use crate::target::Target;

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

/// A probe to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEntry {
    /// Provider.
    pub provider: String,
    /// Name.
    pub name: String,
    /// Argument count, or `NARGS_UNKNOWN`.
    pub nargs: u16,
}

/// A probe site to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSiteEntry {
    /// Address of the 5-byte instruction.
    pub addr: u64,
    /// Out-of-line target (Rust sites), else 0.
    pub target: u64,
    /// Kind.
    pub kind: ProbeKind,
    /// Index into the probe list.
    pub probe: u32,
}

/// A static key to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Its name (`module::path::NAME`, or a C key's identifier; for an imported key,
    /// the symbol's name).
    pub name: String,
    /// Address of its `StaticKey` object (in a module, an undefined symbol's for an
    /// imported key).
    pub addr: u64,
    /// Its state at boot (`false` for an imported key, whose default is the defining
    /// image's).
    pub default: bool,
    /// Another image's key (a module's reference to a kernel key).
    pub imported: bool,
}

/// A static key site to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySiteEntry {
    /// Address of the site instruction.
    pub addr: u64,
    /// Its label: where the branch form goes.
    pub target: u64,
    /// `static_branch_likely!` (falls through while the key is enabled).
    pub likely: bool,
    /// Index into the key list.
    pub key: u32,
}

/// Everything a table holds.
#[derive(Clone, Debug, Default)]
pub struct TableInput {
    /// Ifuncs.
    pub ifuncs: Vec<IfuncEntry>,
    /// Ifunc sites.
    pub sites: Vec<SiteEntry>,
    /// Probes.
    pub probes: Vec<ProbeEntry>,
    /// Probe sites.
    pub probe_sites: Vec<ProbeSiteEntry>,
    /// Static keys, sorted by name.
    pub keys: Vec<KeyEntry>,
    /// Static key sites, sorted by address.
    pub key_sites: Vec<KeySiteEntry>,
}

fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// The size of the table for these counts (independent of addresses), so the caller can
/// place the section before the contents are known.
pub fn table_size(ifuncs: &[IfuncEntry], sites: usize) -> usize {
    let input = TableInput {
        ifuncs: ifuncs.to_vec(),
        ..Default::default()
    };
    layout(&input, sites).total
}

/// The size of the table for `input`.
pub fn table_size_for(input: &TableInput) -> usize {
    layout(input, input.sites.len()).total
}

/// The size of the table for `input` with `sites` ifunc sites given apart from it
/// (its own `sites` are not counted), as [`build_sites_for`] builds it.
pub fn table_size_with(input: &TableInput, sites: usize) -> usize {
    layout(input, sites).total
}

struct Layout {
    ifunc_off: usize,
    site_off: usize,
    probe_off: usize,
    psite_off: usize,
    key_off: usize,
    ksite_off: usize,
    str_off: usize,
    strings: Vec<u8>,
    ifunc_names: Vec<u32>,
    probe_names: Vec<(u32, u32)>,
    key_names: Vec<u32>,
    total: usize,
}

/// The layout of a table of `input` with `sites` ifunc sites.
fn layout(input: &TableInput, sites: usize) -> Layout {
    let mut strings = Vec::new();
    let mut intern = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let ifunc_names = input.ifuncs.iter().map(|f| intern(&f.name)).collect();
    let probe_names = input
        .probes
        .iter()
        .map(|p| (intern(&p.provider), intern(&p.name)))
        .collect();
    let key_names = input.keys.iter().map(|k| intern(&k.name)).collect();
    let ifunc_off = HEADER_SIZE;
    let site_off = align4(ifunc_off + input.ifuncs.len() * IFUNC_DESC_SIZE);
    let probe_off = site_off + sites * IFUNC_SITE_SIZE;
    let psite_off = probe_off + input.probes.len() * PROBE_DESC_SIZE;
    let key_off = psite_off + input.probe_sites.len() * PROBE_SITE_SIZE;
    let ksite_off = key_off + input.keys.len() * KEY_DESC_SIZE;
    let str_off = ksite_off + input.key_sites.len() * KEY_SITE_SIZE;
    let total = (str_off + strings.len() + 7) & !7;
    Layout {
        ifunc_off,
        site_off,
        probe_off,
        psite_off,
        key_off,
        ksite_off,
        str_off,
        strings,
        ifunc_names,
        probe_names,
        key_names,
        total,
    }
}

/// The most a table field's 32-bit self-relative offset reaches, either way.
const REACH: u64 = i32::MAX as u64;

/// Refuses a table placed at `table` (`size` bytes) in `img` (a linked image) when its
/// end is more than 2 GiB from the lowest code address its 32-bit self-relative fields
/// must reach, naming what pushed it there: the allocated section that ends last (a
/// huge `.bss`, say), after which the table is placed. `embed` calls it before
/// building the table, so the error is about the layout and not one field's overflow.
pub fn check_reach(img: &crate::elf::Image<'_>, table: u64, size: usize) -> Result<()> {
    use object::read::elf::SectionHeader as _;
    use object::{Object as _, ObjectSection as _, SectionIndex};
    let Some(code) = img.exec_ranges().first().map(|r| r.start) else {
        return Ok(());
    };
    let end = table.saturating_add(size as u64);
    if end.saturating_sub(code) <= REACH && code.saturating_sub(table) <= REACH {
        return Ok(());
    }
    let flags = |s: &object::read::elf::ElfSection64<'_, '_, object::LittleEndian>| {
        s.elf_section_header().sh_flags(object::LittleEndian).0
    };
    let last = img
        .file
        .sections()
        .filter(|s| flags(s) & object::elf::SHF_ALLOC.0 != 0)
        .max_by_key(|s| s.address().saturating_add(s.size()));
    let after = match last {
        Some(s) => format!(
            " ({} ends at {:#x})",
            img.section_label(SectionIndex(s.index().0)),
            s.address().saturating_add(s.size())
        ),
        None => String::new(),
    };
    anyhow::bail!(
        "{}: the table would be placed at {table:#x}, after the last segment{after}, more \
         than 2 GiB from the code at {code:#x}: its 32-bit self-relative fields cannot reach \
         it (shrink the section, or link the code above it)",
        img.path
    )
}

/// Encodes an ifunc-only table that will live at address `base`.
pub fn build_table(base: u64, ifuncs: &[IfuncEntry], sites: &[SiteEntry]) -> Result<Vec<u8>> {
    build(
        base,
        &TableInput {
            ifuncs: ifuncs.to_vec(),
            sites: sites.to_vec(),
            ..Default::default()
        },
    )
}

/// Encodes a table for the default [`Target`] that will live at address `base`; see
/// [`build_for`].
pub fn build(base: u64, input: &TableInput) -> Result<Vec<u8>> {
    build_for(Target::default(), base, input)
}

/// Encodes a table for `target` that will live at address `base`. Sites are sorted by
/// address and deduplicated here; every self-relative reference is range-checked.
pub fn build_for(target: Target, base: u64, input: &TableInput) -> Result<Vec<u8>> {
    build_with_for(target, input, &mut |field, t| {
        make_rel(base + field as u64, t)
    })
    .with_context(|| format!("table at {base:#x}"))
}

/// [`build_with_for`] the default [`Target`].
pub fn build_with(
    input: &TableInput,
    rel: &mut dyn FnMut(usize, u64) -> Option<i32>,
) -> Result<Vec<u8>> {
    build_with_for(Target::default(), input, rel)
}

/// Encodes a table, asking `rel(field_offset, target)` for the value of every
/// self-relative field (`field_offset` from the table start, `target` an address as
/// given in `input`; `None`: out of i32 reach). [`build_for`] computes them for a table at a
/// known address; for a relocatable object the caller records a relocation per field
/// and returns 0.
/// Sites are sorted by address and deduplicated here. The header names `target`'s
/// architecture.
pub fn build_with_for(
    target: Target,
    input: &TableInput,
    rel: &mut dyn FnMut(usize, u64) -> Option<i32>,
) -> Result<Vec<u8>> {
    // Sorted with no duplicate, as the site finder gives them, the input is used as it
    // is (a sort and a dedup would change nothing); otherwise a sorted copy.
    let in_order = input.sites.windows(2).all(|w| w[0].addr < w[1].addr)
        && input.probe_sites.windows(2).all(|w| w[0].addr < w[1].addr)
        && input.key_sites.windows(2).all(|w| w[0].addr < w[1].addr);
    let input: std::borrow::Cow<'_, TableInput> = if in_order {
        std::borrow::Cow::Borrowed(input)
    } else {
        let mut input = input.clone();
        input.sites.sort_by_key(|s| s.addr);
        input.sites.dedup_by_key(|s| s.addr);
        input.probe_sites.sort_by_key(|s| s.addr);
        input.probe_sites.dedup_by_key(|s| s.addr);
        input.key_sites.sort_by_key(|s| s.addr);
        input.key_sites.dedup_by_key(|s| s.addr);
        std::borrow::Cow::Owned(input)
    };
    let sites = &input.sites;
    encode(target, &input, sites.len(), &|i| sites[i], rel)
}

/// [`build_for`] with the ifunc sites given apart from `input` (whose own `sites` are
/// ignored): `sites` of them, site `i` being `site(i)`, read where they are (an image's
/// million sites are not copied into a [`TableInput`] first). If they are not sorted
/// by address without duplicates, they are collected, sorted and deduplicated, as
/// [`build_for`] does.
pub fn build_sites_for(
    target: Target,
    base: u64,
    input: &TableInput,
    sites: usize,
    site: &dyn Fn(usize) -> SiteEntry,
) -> Result<Vec<u8>> {
    let in_order = (1..sites).all(|i| site(i - 1).addr < site(i).addr)
        && input.probe_sites.windows(2).all(|w| w[0].addr < w[1].addr)
        && input.key_sites.windows(2).all(|w| w[0].addr < w[1].addr);
    let rel = &mut |field: usize, t: u64| make_rel(base + field as u64, t);
    if in_order {
        encode(target, input, sites, site, rel)
    } else {
        let input = TableInput {
            sites: (0..sites).map(site).collect(),
            ..input.clone()
        };
        build_with_for(target, &input, rel)
    }
    .with_context(|| format!("table at {base:#x}"))
}

/// Encodes a table of `input` with `sites` ifunc sites (`site(i)`), sorted by address
/// without duplicates, as are `input.probe_sites` and `input.key_sites`; `input.keys`
/// sorted by name.
fn encode(
    target: Target,
    input: &TableInput,
    sites: usize,
    site: &dyn Fn(usize) -> SiteEntry,
    rel: &mut dyn FnMut(usize, u64) -> Option<i32>,
) -> Result<Vec<u8>> {
    for f in &input.ifuncs {
        ensure!(
            !f.name.as_bytes().contains(&0),
            "ifunc name {:?} contains NUL",
            f.name
        );
    }
    for p in &input.probes {
        ensure!(
            !p.provider.as_bytes().contains(&0) && !p.name.as_bytes().contains(&0),
            "probe name {}:{} contains NUL",
            p.provider,
            p.name
        );
    }
    for k in &input.keys {
        ensure!(
            !k.name.as_bytes().contains(&0),
            "key name {:?} contains NUL",
            k.name
        );
    }
    ensure!(
        input.keys.windows(2).all(|w| w[0].name <= w[1].name),
        "internal: keys not sorted by name"
    );
    for s in &input.key_sites {
        ensure!(
            (s.key as usize) < input.keys.len(),
            "internal: key site {:#x} names key {} of {}",
            s.addr,
            s.key,
            input.keys.len()
        );
    }
    let l = layout(input, sites);
    let total32 = u32::try_from(l.total).context("table larger than 4 GiB")?;
    let mut out = vec![0u8; l.total];
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        arch: target.table_arch(),
        flags: 0,
        header_size: HEADER_SIZE as u32,
        total_size: total32,
        ifuncs: SubTable {
            offset: l.ifunc_off as u32,
            count: input.ifuncs.len() as u32,
        },
        ifunc_sites: SubTable {
            offset: l.site_off as u32,
            count: sites as u32,
        },
        probes: SubTable {
            offset: l.probe_off as u32,
            count: input.probes.len() as u32,
        },
        probe_sites: SubTable {
            offset: l.psite_off as u32,
            count: input.probe_sites.len() as u32,
        },
        strings: SubTable {
            offset: l.str_off as u32,
            count: l.strings.len() as u32,
        },
        keys: SubTable {
            offset: l.key_off as u32,
            count: input.keys.len() as u32,
        },
        key_sites: SubTable {
            offset: l.ksite_off as u32,
            count: input.key_sites.len() as u32,
        },
    };
    out[..HEADER_SIZE].copy_from_slice(&header.to_bytes());

    let mut rel = |field: usize, target: u64, what: &str, name: &str| -> Result<i32> {
        rel(field, target).with_context(|| {
            format!(
                "{what} of {name} at {target:#x} is out of i32 reach of table offset {field:#x}"
            )
        })
    };
    for (i, f) in input.ifuncs.iter().enumerate() {
        let at = l.ifunc_off + i * IFUNC_DESC_SIZE;
        let d = IfuncDesc {
            trampoline: rel(at, f.trampoline, "trampoline", &f.name)?,
            slot: rel(at + 4, f.slot, "slot", &f.name)?,
            resolver: rel(at + 8, f.resolver, "resolver", &f.name)?,
            default: rel(at + 12, f.default, "default", &f.name)?,
            name: l.ifunc_names[i],
        };
        out[at..at + IFUNC_DESC_SIZE].copy_from_slice(&d.to_bytes());
    }
    for i in 0..sites {
        let s = site(i);
        let at = l.site_off + i * IFUNC_SITE_SIZE;
        let info = IfuncSite::pack_info(s.kind, u32::from(s.prefixes), s.ifunc)
            .with_context(|| format!("site {:#x}: too many prefixes or ifuncs", s.addr))?;
        let e = IfuncSite {
            site: rel(at, s.addr, "site", "call site")?,
            info,
        };
        out[at..at + IFUNC_SITE_SIZE].copy_from_slice(&e.to_bytes());
    }
    for (i, p) in input.probes.iter().enumerate() {
        let at = l.probe_off + i * PROBE_DESC_SIZE;
        let d = ProbeDesc {
            provider: l.probe_names[i].0,
            name: l.probe_names[i].1,
            nargs: p.nargs,
            flags: 0,
        };
        out[at..at + PROBE_DESC_SIZE].copy_from_slice(&d.to_bytes());
    }
    for (i, s) in input.probe_sites.iter().enumerate() {
        let at = l.psite_off + i * PROBE_SITE_SIZE;
        let info = ProbeSite::pack_info(s.kind, s.probe)
            .with_context(|| format!("probe site {:#x}: probe index too large", s.addr))?;
        let e = ProbeSite {
            site: rel(at, s.addr, "probe site", "probe")?,
            target: if s.kind.is_rust() {
                rel(at + 4, s.target, "out-of-line target", "probe")?
            } else {
                0
            },
            info,
        };
        out[at..at + PROBE_SITE_SIZE].copy_from_slice(&e.to_bytes());
    }
    for (i, k) in input.keys.iter().enumerate() {
        let at = l.key_off + i * KEY_DESC_SIZE;
        let d = KeyDesc {
            key: rel(at, k.addr, "key object", &k.name)?,
            name: l.key_names[i],
            flags: KeyDesc::pack_flags(k.default, k.imported),
        };
        out[at..at + KEY_DESC_SIZE].copy_from_slice(&d.to_bytes());
    }
    for (i, s) in input.key_sites.iter().enumerate() {
        let at = l.ksite_off + i * KEY_SITE_SIZE;
        let name = input
            .keys
            .get(s.key as usize)
            .map_or("?", |k| k.name.as_str());
        let info = KeySite::pack_info(s.likely, s.key)
            .with_context(|| format!("key site {:#x}: key index too large", s.addr))?;
        let e = KeySite {
            site: rel(at, s.addr, "key site", name)?,
            target: rel(at + 4, s.target, "key site label", name)?,
            info,
        };
        out[at..at + KEY_SITE_SIZE].copy_from_slice(&e.to_bytes());
    }
    out[l.str_off..l.str_off + l.strings.len()].copy_from_slice(&l.strings);
    Ok(out)
}
