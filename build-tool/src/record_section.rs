//! Walking a record section (`.ksites_ifuncs`, `.ksites_probe_sites`): fixed-size records
//! laid out by `kernel-loader`'s macros, each starting with a `u32` magic, 8-aligned, with
//! zero words between input sections (linker or assembler padding). One walker for linked
//! images (`records`, `probes`) and relocatable objects (`embed::rel`), and one check of
//! the probe declarations they carry. In a position-independent image the records'
//! pointers are read through their `RELATIVE` dynamic relocations ([`Relative`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::{Result, bail, ensure};
use kernel_loader::format::ProbeKind;
use kernel_loader::ifunc::{RECORD_MAGIC, RECORD_SECTION, RECORD_SIZE, RECORD_VERSION};
use kernel_loader::probe::{
    DECL_MAGIC, DECL_SECTION, DECL_SIZE, SITE_RECORD_MAGIC, SITE_RECORD_SECTION, SITE_RECORD_SIZE,
};

/// One kind of record section.
#[derive(Clone, Copy, Debug)]
pub struct RecordKind {
    /// The section's name.
    pub section: &'static str,
    /// What a record is, for messages (`ifunc`, `probe site`).
    pub what: &'static str,
    /// Size of one record.
    pub size: usize,
    /// The record's first `u32`.
    pub magic: u32,
    /// The record's second `u32`, when it is a layout version.
    pub version: Option<u32>,
}

/// `ifunc!` records.
pub const IFUNC_RECORDS: RecordKind = RecordKind {
    section: RECORD_SECTION,
    what: "ifunc",
    size: RECORD_SIZE,
    magic: RECORD_MAGIC,
    version: Some(RECORD_VERSION),
};

/// `probe!` / `probe_enabled!` site records.
pub const PROBE_SITE_RECORDS: RecordKind = RecordKind {
    section: SITE_RECORD_SECTION,
    what: "probe site",
    size: SITE_RECORD_SIZE,
    magic: SITE_RECORD_MAGIC,
    version: None,
};

/// C probe declarations (`KSITES_PROBE_DECL`).
pub const PROBE_DECLS: RecordKind = RecordKind {
    section: DECL_SECTION,
    what: "C probe declaration",
    size: DECL_SIZE,
    magic: DECL_MAGIC,
    version: None,
};

/// The little-endian `u32` at `at` of a record (in bounds: records are checked whole).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at` of a record.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The link-time values of the absolute pointers of a position-independent (ET_DYN)
/// image, from its `RELATIVE` dynamic relocations (`r_offset` -> `r_addend`). ld.bfd
/// also writes the value into the pointer's bytes, lld by default leaves them zero: the
/// addend is what the dynamic loader (or a self-relocating kernel) uses, so it wins.
/// Empty for any other image, whose bytes are read as they are.
#[derive(Debug)]
pub struct Relative {
    /// Sorted by address.
    values: Vec<(u64, u64)>,
}

impl Relative {
    /// The `RELATIVE` relocations of `img` (none unless it is ET_DYN).
    pub fn of(img: &crate::elf::Image<'_>) -> Relative {
        let mut values: Vec<(u64, u64)> = if img.kind == crate::elf::ElfKind::Dyn {
            let t = img.target.relative_reloc();
            img.raw_relas()
                .filter(|r| r.r_type == t)
                .map(|r| (r.offset, r.addend as u64))
                .collect()
        } else {
            Vec::new()
        };
        values.sort_unstable();
        Relative { values }
    }

    /// `bytes` (the contents at address `addr`) with every 8-byte pointer a relocation
    /// wholly inside them fills replaced by its link-time value; borrowed when none is.
    pub fn apply<'b>(&self, addr: u64, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        let end = addr.saturating_add(bytes.len() as u64);
        let from = self.values.partition_point(|&(at, _)| at < addr);
        let mut out = Cow::Borrowed(bytes);
        for &(at, value) in self.values[from..].iter().take_while(|&&(at, _)| at < end) {
            let off = (at - addr) as usize;
            if let Some(field) = out.to_mut().get_mut(off..off.saturating_add(8)) {
                field.copy_from_slice(&value.to_le_bytes());
            }
        }
        out
    }

    /// [`Image::read_va`](crate::elf::Image::read_va), relocated by [`Relative::apply`].
    pub fn read_va<'d>(
        &self,
        img: &crate::elf::Image<'d>,
        addr: u64,
        len: u64,
    ) -> Option<Cow<'d, [u8]>> {
        img.read_va(addr, len).map(|b| self.apply(addr, b))
    }
}

/// The offsets of the records in `data` (the contents of a `kind` section of `path`),
/// each checked whole: its size, magic and version. A zero word where a record could
/// start is padding when `is_padding(offset)` agrees (in an object, a zero word that a
/// relocation fills is not).
pub fn walk(
    path: &str,
    kind: &RecordKind,
    data: &[u8],
    is_padding: impl Fn(usize) -> bool,
) -> Result<Vec<usize>> {
    let RecordKind {
        section,
        what,
        size,
        magic,
        version,
    } = *kind;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        if data.len() - off >= 8 && u64_at(data, off) == 0 && is_padding(off) {
            off += 8;
            continue;
        }
        let left = data.len() - off;
        ensure!(
            left >= size,
            "{path}: {section}+{off:#x}: truncated {what} record ({left} bytes left, need {size})"
        );
        let r = &data[off..off + size];
        let found = u32_at(r, 0);
        ensure!(
            found == magic,
            "{path}: {section}+{off:#x}: bad {what} record magic {found:#x}"
        );
        if let Some(v) = version {
            let found = u32_at(r, 4);
            ensure!(
                found == v,
                "{path}: {section}+{off:#x}: {what} record version {found}, this tool reads {v} \
                 (rebuild with the matching kernel-loader)"
            );
        }
        out.push(off);
        off += size;
    }
    Ok(out)
}

/// The kind of the probe site record `r` (at `off` of its section in `path`).
pub fn probe_site_kind(path: &str, off: usize, r: &[u8]) -> Result<ProbeKind> {
    Ok(match u32_at(r, 4) {
        0 => ProbeKind::RustJmp,
        1 => ProbeKind::RustEnabled,
        k => bail!("{path}: {SITE_RECORD_SECTION}+{off:#x}: unknown probe site kind {k}"),
    })
}

/// Every probe of a file by (provider, name), with its declared argument count once one
/// is known.
pub type Declared = BTreeMap<(String, String), Option<u32>>;

/// Records that `key` is declared with `n` arguments (`None`: not said), refusing two
/// different counts for one probe.
pub fn declare(
    declared: &mut Declared,
    path: &str,
    key: &(String, String),
    n: Option<u32>,
) -> Result<()> {
    let e = declared.entry(key.clone()).or_insert(None);
    match (*e, n) {
        (Some(a), Some(b)) if a != b => bail!(
            "{path}: probe {}:{} is declared with {a} and with {b} arguments",
            key.0,
            key.1
        ),
        (None, Some(b)) => *e = Some(b),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(magic: u32, second: u32, size: usize) -> Vec<u8> {
        let mut r = vec![0u8; size];
        r[..4].copy_from_slice(&magic.to_le_bytes());
        r[4..8].copy_from_slice(&second.to_le_bytes());
        r
    }

    #[test]
    fn walks_records_across_padding() {
        let k = &IFUNC_RECORDS;
        let mut data = record(k.magic, RECORD_VERSION, k.size);
        data.extend_from_slice(&[0; 8]);
        data.extend(record(k.magic, RECORD_VERSION, k.size));
        assert_eq!(walk("f", k, &data, |_| true).unwrap(), [0, k.size + 8]);
        // A zero word that is not padding is read as a record and refused.
        let e = walk("f", k, &data, |_| false).unwrap_err().to_string();
        assert!(e.contains("bad ifunc record magic 0x0"), "{e}");
    }

    #[test]
    fn refuses_truncated_bad_magic_and_version() {
        let k = &IFUNC_RECORDS;
        let r = record(k.magic, RECORD_VERSION, k.size);
        let e = walk("f", k, &r[..k.size - 1], |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated ifunc record"), "{e}");
        let e = walk("f", k, &record(1, RECORD_VERSION, k.size), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad ifunc record magic 0x1"), "{e}");
        let e = walk("f", k, &record(k.magic, 99, k.size), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ifunc record version 99"), "{e}");
    }

    #[test]
    fn declarations_must_agree() {
        let mut d = Declared::new();
        let key = ("net".to_string(), "rx".to_string());
        declare(&mut d, "f", &key, None).unwrap();
        declare(&mut d, "f", &key, Some(2)).unwrap();
        declare(&mut d, "f", &key, None).unwrap();
        assert_eq!(d[&key], Some(2));
        let e = declare(&mut d, "f", &key, Some(3)).unwrap_err().to_string();
        assert!(e.contains("declared with 2 and with 3 arguments"), "{e}");
    }

    #[test]
    fn relative_values_replace_whole_pointers_inside_the_range_only() {
        let rel = Relative {
            values: vec![(0x0ff8, 1), (0x1000, 0xaa), (0x1010, 0xbb), (0x1014, 0xdd)],
        };
        let bytes = [0u8; 0x18];
        let out = rel.apply(0x1000, &bytes);
        assert_eq!(u64_at(&out, 0), 0xaa);
        assert_eq!(u64_at(&out, 8), 0);
        assert_eq!(
            u64_at(&out, 0x10),
            0xbb,
            "a pointer that does not fit is left"
        );
        // No relocation in range: borrowed, unchanged.
        assert!(matches!(rel.apply(0x2000, &bytes), Cow::Borrowed(_)));
        let empty = Relative { values: Vec::new() };
        assert!(matches!(empty.apply(0x1000, &bytes), Cow::Borrowed(_)));
    }
}
