//! `ksites verify`: re-checks an embedded image against its own table. Every ifunc site
//! is re-decoded and must be the recorded `call`/`jmp`/`jcc` to its trampoline; every
//! probe site must hold its disabled form; every static key site the form of its key's
//! default; the set of sites must equal what a fresh scan of the relocations (and the
//! key site records) finds; the cell must point at the table.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use kernel_loader::cell::{CELL_MAGIC, CELL_SIZE, CELL_SYMBOL};
use kernel_loader::format::{SECTION_NAME, Table};
use object::ObjectSection;

use crate::elf::Image;
use crate::probes::find_probes_in_embedded;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Ifunc sites checked.
    pub ifunc_sites: usize,
    /// Probe sites checked.
    pub probe_sites: usize,
    /// Static key sites checked.
    pub key_sites: usize,
    /// One line per mismatch; empty when the image is consistent.
    pub problems: Vec<String>,
}

fn loc(img: &Image<'_>, addr: u64) -> String {
    use object::Object;
    img.file
        .sections()
        .find(|s| s.address() <= addr && addr < s.address().saturating_add(s.size()))
        .map(|s| {
            format!(
                "{}+{:#x} ({})",
                s.name().unwrap_or("?"),
                addr - s.address(),
                img.describe(s.index(), addr)
            )
        })
        .unwrap_or_else(|| format!("{addr:#x}"))
}

/// Verifies `data` (the contents of `path`).
pub fn verify(path: &str, data: &[u8]) -> Result<VerifyReport> {
    let img = Image::parse(path, data)?;
    crate::inspect::ensure_not_embedded_object(&img)?;
    let sec = img
        .section_by_name(SECTION_NAME)
        .with_context(|| format!("{path}: no {SECTION_NAME} section: not embedded"))?;
    let exec = img.exec_ranges();
    let bytes = sec.data().map_err(|e| {
        anyhow::anyhow!(
            "{path}: {}: cannot read its contents: {e}",
            img.section_label(sec.index())
        )
    })?;
    if crate::inspect::is_unfilled_slot(bytes) {
        bail!(
            "{path}: {SECTION_NAME} at {:#x} is a reserved slot `ksites embed` did not fill: the \
             image has no ifuncs or probes (embed copies it unchanged)",
            sec.address()
        );
    }
    let t = match Table::parse(bytes, sec.address(), &exec) {
        Ok(t) => t,
        Err(e) => bail!("{path}: {SECTION_NAME} at {:#x}: {e}", sec.address()),
    };
    let mut r = VerifyReport::default();
    let mut bad = |s: String| r.problems.push(format!("{path}: {s}"));

    // The table must be loaded where its section header says: a PT_LOAD maps its file
    // bytes to exactly that address (binutils may move one but not the other).
    {
        use object::read::elf::ProgramHeader;
        let e = object::LittleEndian;
        let (off, size) = sec.file_range().unwrap_or((0, 0));
        let mapped = img.file.elf_program_headers().iter().find(|p| {
            p.p_type(e).0 == object::elf::PT_LOAD.0
                && p.p_offset(e) <= off
                && off.saturating_add(size) <= p.p_offset(e).saturating_add(p.p_filesz(e))
        });
        // Its physical placement must follow the image's own virtual-to-physical offset
        // (that of the segment holding the cell): a kernel is loaded by p_paddr.
        let delta = |p: &object::elf::ProgramHeader64<object::LittleEndian>| {
            p.p_paddr(e).wrapping_sub(p.p_vaddr(e))
        };
        let cell_delta = img.symbol(CELL_SYMBOL).and_then(|c| {
            img.file.elf_program_headers().iter().find(|p| {
                p.p_type(e).0 == object::elf::PT_LOAD.0
                    && p.p_vaddr(e) <= c.addr
                    && c.addr < p.p_vaddr(e).saturating_add(p.p_memsz(e))
            })
        });
        match mapped {
            Some(p) if cell_delta.is_some_and(|c| delta(c) != delta(p)) => bad(format!(
                "the PT_LOAD holding {SECTION_NAME} has physical address {:#x} for virtual {:#x}, \
                 unlike the rest of the image (was it rewritten by objcopy/strip after embedding?)",
                p.p_paddr(e),
                p.p_vaddr(e)
            )),
            Some(p) if p.p_vaddr(e).wrapping_add(off - p.p_offset(e)) == sec.address() => {}
            Some(p) => bad(format!(
                "{SECTION_NAME} says {:#x}, but its PT_LOAD loads its bytes at {:#x} \
                 (was the image rewritten by objcopy/strip after embedding?)",
                sec.address(),
                p.p_vaddr(e).wrapping_add(off - p.p_offset(e))
            )),
            None => bad(format!("{SECTION_NAME} is not in any PT_LOAD segment")),
        }
    }

    // The cell.
    match img.symbol(CELL_SYMBOL) {
        None => bad(format!("no {CELL_SYMBOL} symbol")),
        Some(c) => match img.read_va(c.addr, CELL_SIZE as u64) {
            None => bad(format!(
                "{CELL_SYMBOL} at {:#x} has no file contents",
                c.addr
            )),
            Some(cb) => {
                let magic = u64::from_le_bytes(cb[0..8].try_into()?);
                let off = i64::from_le_bytes(cb[8..16].try_into()?);
                let size = u64::from_le_bytes(cb[16..24].try_into()?);
                if magic != CELL_MAGIC
                    || c.addr.wrapping_add_signed(off) != t.base()
                    // The table's own size: a slot the linker script reserved
                    // may be larger.
                    || size != t.bytes().len() as u64
                {
                    bad(format!(
                        "{CELL_SYMBOL} at {:#x} says table at {:#x} ({size} bytes), table is at {:#x} ({} bytes)",
                        c.addr,
                        c.addr.wrapping_add_signed(off),
                        t.base(),
                        t.bytes().len()
                    ));
                }
            }
        },
    }

    // Trampolines and ifunc sites.
    let target = img.target;
    for f in t.ifuncs() {
        let b = img.read_va(f.trampoline, target.trampoline_len() as u64);
        let read = |len| img.read_va(f.trampoline, len);
        match target.entry_slot(read, f.trampoline) {
            Some(to) => {
                if to != f.slot {
                    bad(format!(
                        "ifunc {}: trampoline at {} jumps through {to:#x}, table says slot {:#x}",
                        f.name,
                        loc(&img, f.trampoline),
                        f.slot
                    ));
                }
            }
            None => bad(format!(
                "ifunc {}: trampoline at {} is not {}: {:02x?}",
                f.name,
                loc(&img, f.trampoline),
                target.trampoline_text(None),
                b
            )),
        }
    }
    for s in t.sites() {
        r.ifunc_sites += 1;
        let Some(f) = t.ifunc(s.ifunc) else { continue };
        let Some(code) = img.read_va(s.addr, s.len() as u64) else {
            bad(format!("ifunc site {:#x}: not in the file", s.addr));
            continue;
        };
        let insn = target.decode_insn(code, s.addr);
        if insn.kind != Some(s.kind) || insn.len != s.len() || insn.branch_target != f.trampoline {
            bad(format!(
                "ifunc site {} at {}: table says {} ({} bytes) to {} trampoline {:#x}; found {:02x?} = `{}`",
                s.index,
                loc(&img, s.addr),
                s.kind.name(),
                s.len(),
                f.name,
                f.trampoline,
                code,
                target.disasm(code, s.addr)
            ));
        }
    }

    // Probe sites hold their disabled forms.
    let stubs = crate::probes::image_stubs(&img);
    for s in t.probe_sites() {
        r.probe_sites += 1;
        let want = match target.disabled_probe(&s, &stubs) {
            Ok(w) => w,
            Err(e) => {
                bad(format!("probe site {:#x}: {e}", s.addr));
                continue;
            }
        };
        let found = img.read_va(s.addr, img.target.probe_site_len() as u64);
        let len = img.target.probe_site_len() as u64;
        if !s.kind.is_rust()
            && let Some(why) = img
                .read_va(s.addr + len, len)
                .and_then(|after| target.c_probe_remnant(s.addr, after))
        {
            bad(format!(
                "probe site {} at {} ({}): {why}",
                s.index,
                loc(&img, s.addr),
                s.kind.name()
            ));
        }
        if found != Some(&want[..]) {
            let name = t
                .probe(s.probe)
                .map(|p| format!("{}:{}", p.provider, p.name))
                .unwrap_or_default();
            bad(format!(
                "probe site {} at {} ({name}, {}): expected disabled bytes {want:02x?}, found {:02x?}",
                s.index,
                loc(&img, s.addr),
                s.kind.name(),
                found
            ));
        }
    }

    // The table's sites are exactly what the relocations say.
    let records = crate::records::read_ifuncs(&img)?;
    let scan = crate::records::find_ifunc_sites_checked(&img, &records, false)?;
    let from_relocs: BTreeSet<u64> = scan.sites.iter().map(|s| s.addr).collect();
    let in_table: BTreeSet<u64> = t.sites().map(|s| s.addr).collect();
    for a in from_relocs.difference(&in_table) {
        bad(format!(
            "call site at {} targets an ifunc trampoline but is not in the table",
            loc(&img, *a)
        ));
    }
    for a in in_table.difference(&from_relocs) {
        bad(format!(
            "table site at {} is not a branch to a trampoline per the relocations",
            loc(&img, *a)
        ));
    }
    let probe_sites: BTreeSet<u64> = find_probes_in_embedded(&img)?.into_iter().collect();
    let probe_table: BTreeSet<u64> = t.probe_sites().map(|s| s.addr).collect();
    for a in probe_sites.symmetric_difference(&probe_table) {
        bad(format!(
            "probe site at {} is {} the table but {} the image's probe records/relocations",
            loc(&img, *a),
            if probe_table.contains(a) {
                "in"
            } else {
                "not in"
            },
            if probe_sites.contains(a) {
                "in"
            } else {
                "not in"
            }
        ));
    }
    check_keys(&img, &t, &mut r.key_sites, &mut bad)?;
    Ok(r)
}

/// Static keys: every key object is a `StaticKey` whose default is the table's, every
/// key site holds the form of its key's default (an imported key's: the NOP), and the
/// table's sites are exactly the records' (site, label, likeliness, key).
fn check_keys(
    img: &Image<'_>,
    t: &Table<'_>,
    count: &mut usize,
    bad: &mut dyn FnMut(String),
) -> Result<()> {
    use crate::keys::{KEY_SIZE, expected_form, key_default, key_sites_in_embedded};
    use crate::table::KeySiteEntry;
    let target = img.target;
    let rel = crate::record_section::Relative::of(img);
    let mut keys = Vec::new();
    for k in t.keys() {
        if !k.imported {
            let what = || format!("key {} at {:#x}", k.name, k.addr);
            match rel.read_va(img, k.addr, KEY_SIZE as u64) {
                None => bad(format!("{}: not in the file", what())),
                Some(b) => match key_default(&b, &what) {
                    Err(e) => bad(e.to_string()),
                    Ok(d) if d != k.default => bad(format!(
                        "{}: the object's default is {d}, the table's {}",
                        what(),
                        k.default
                    )),
                    Ok(_) => {}
                },
            }
        }
        keys.push(k);
    }
    let len = target.probe_site_len() as u64;
    let mut in_table = Vec::new();
    for s in t.key_sites() {
        *count += 1;
        let Some(k) = keys.get(s.key as usize) else {
            continue;
        };
        in_table.push((s.addr, s.target, s.likely, k.addr));
        let entry = KeySiteEntry {
            addr: s.addr,
            target: s.target,
            likely: s.likely,
            key: s.key,
        };
        let state = if k.imported {
            "imported: NOP"
        } else if k.default {
            "default true"
        } else {
            "default false"
        };
        let want = match expected_form(target, &entry, !k.imported && k.default) {
            Ok(w) => w,
            Err(why) => {
                bad(format!(
                    "key site at {} (key {}): {why}",
                    loc(img, s.addr),
                    k.name
                ));
                continue;
            }
        };
        let found = img.read_va(s.addr, len);
        if found != Some(&want[..]) {
            bad(format!(
                "key site at {} (key {}, {}, {state}): expected {}, found {}",
                loc(img, s.addr),
                k.name,
                if s.likely { "likely" } else { "unlikely" },
                crate::keys::form_name(target, Some(&want), s.addr, s.target),
                crate::keys::form_name(target, found, s.addr, s.target),
            ));
        }
    }
    let records: BTreeSet<(u64, u64, bool, u64)> =
        key_sites_in_embedded(img)?.into_iter().collect();
    let in_table: BTreeSet<(u64, u64, bool, u64)> = in_table.into_iter().collect();
    for a in records.difference(&in_table) {
        bad(format!(
            "key site at {} (label {:#x}, key object {:#x}) has a record but is not in the table as such",
            loc(img, a.0),
            a.1,
            a.3
        ));
    }
    for a in in_table.difference(&records) {
        bad(format!(
            "table key site at {} (label {:#x}, key object {:#x}) has no such record",
            loc(img, a.0),
            a.1,
            a.3
        ));
    }
    Ok(())
}
