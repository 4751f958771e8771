//! The validating, zero-copy reader: [`Table`] and the entries it decodes ([`Ifunc`],
//! [`Site`], [`Probe`], [`PSite`]; the keys' are in [`super::key_reader`]). Every
//! instruction fact comes from the table's [`Arch`]. Reads format v1 and v2
//! ([`Table::version`]).

use core::ops::Range;

use super::{
    FormatError, HEADER_SIZE, HEADER_SIZE_V1, Header, IFUNC_DESC_SIZE, IFUNC_SITE_SIZE, IfuncDesc,
    IfuncField, IfuncSite, KEY_DESC_SIZE, KEY_SITE_SIZE, MAGIC, NARGS_UNKNOWN, PROBE_DESC_SIZE,
    PROBE_SITE_SIZE, Part, ProbeDesc, ProbeKind, ProbeSite, SubTable, TABLE_ALIGN, VERSION,
    VERSION_1, resolve_rel,
};
use crate::arch::{Arch, BranchSite, ProbeSiteRef, SiteKind};

/// A validated table. Cheap to copy; borrows the table bytes.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) base: u64,
    pub(super) header: Header,
    pub(super) arch: Arch,
}

/// A decoded ifunc descriptor with absolute addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ifunc<'a> {
    /// Index in the table.
    pub index: u32,
    /// Name (from the string table).
    pub name: &'a str,
    /// Trampoline address.
    pub trampoline: u64,
    /// Slot address.
    pub slot: u64,
    /// Resolver address.
    pub resolver: u64,
    /// Default implementation address.
    pub default: u64,
    /// An *import*: an ifunc another image (the kernel) defines, which a module calls.
    /// Its descriptor has `slot`, `resolver` and `default` all 0 (a self-relative 0
    /// would point into the table itself, which is never code); only the trampoline is
    /// set, by the module's relocation. The decoded `slot`, `resolver` and `default`
    /// are 0; the loader patches its sites to whatever the trampoline's slot holds.
    pub imported: bool,
}

impl Ifunc<'_> {
    /// Whether a raw descriptor is an import (see [`Ifunc::imported`]).
    pub const fn desc_is_import(d: &IfuncDesc) -> bool {
        d.slot == 0 && d.resolver == 0 && d.default == 0
    }
}

/// A decoded ifunc site with its absolute address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// Index in the table.
    pub index: u32,
    /// Address of the instruction's first byte.
    pub addr: u64,
    /// The instruction.
    pub kind: SiteKind,
    /// Number of prefix bytes before the opcode; on riscv64 the site's form
    /// (`arch::riscv64::FORM_*`).
    pub prefixes: u8,
    /// Index of the ifunc it calls.
    pub ifunc: u32,
    /// Length of the instruction (from the table's architecture).
    len: u8,
    /// Offsets of the target field: the bytes patching rewrites.
    field: (u8, u8),
}

impl Site {
    /// Length of the whole instruction.
    #[inline(always)]
    pub const fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: an instruction has at least one byte.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Address range of the branch's target field, the bytes patching rewrites (where
    /// it lies is the architecture's: [`crate::arch::Arch::target_field`]).
    #[inline(always)]
    pub const fn target_field(&self) -> Range<u64> {
        self.addr + self.field.0 as u64..self.addr + self.field.1 as u64
    }

    /// Offsets (from the site's first byte) of the target field.
    #[inline(always)]
    pub const fn target_field_offsets(&self) -> Range<usize> {
        self.field.0 as usize..self.field.1 as usize
    }

    /// Address of the first byte of the branch's target field: the same as
    /// `self.target_field().start` (an older name, kept for existing callers).
    #[inline(always)]
    pub const fn rel32_addr(&self) -> u64 {
        self.addr + self.field.0 as u64
    }

    /// Address of the next instruction (what a relative branch is relative to).
    #[inline(always)]
    pub const fn end(&self) -> u64 {
        self.addr + self.len as u64
    }

    /// The site as the architecture layer sees it.
    #[inline(always)]
    pub const fn branch(&self) -> BranchSite {
        BranchSite {
            addr: self.addr,
            kind: self.kind,
            prefixes: self.prefixes,
            len: self.len,
        }
    }
}

/// A decoded probe descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe<'a> {
    /// Index in the table.
    pub index: u32,
    /// Provider.
    pub provider: &'a str,
    /// Name.
    pub name: &'a str,
    /// Declared argument count, or [`NARGS_UNKNOWN`].
    pub nargs: u16,
}

/// A decoded probe site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PSite {
    /// Index in the table.
    pub index: u32,
    /// Address of the instruction (the architecture's probe site length long).
    pub addr: u64,
    /// Out-of-line target (Rust sites), else 0.
    pub target: u64,
    /// The kind.
    pub kind: ProbeKind,
    /// Index of its probe.
    pub probe: u32,
}

impl PSite {
    /// The site as the architecture's probe functions take it.
    #[inline(always)]
    pub const fn arch_ref(&self) -> ProbeSiteRef {
        ProbeSiteRef {
            addr: self.addr,
            target: self.target,
            kind: self.kind,
        }
    }
}

pub(super) fn in_ranges(exec: &[Range<u64>], start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    exec.iter().any(|r| r.start <= start && end <= r.end)
}

fn sub_end(part: Part, st: SubTable, entry: usize, total: u32) -> Result<u32, FormatError> {
    let oob = FormatError::OutOfBounds {
        part,
        offset: st.offset,
        count: st.count,
    };
    let size = (st.count as u64).checked_mul(entry as u64).ok_or(oob)?;
    let end = (st.offset as u64).checked_add(size).ok_or(oob)?;
    if end > total as u64 {
        return Err(oob);
    }
    Ok(end as u32)
}

impl<'a> Table<'a> {
    /// Validates `bytes` as a table living at address `base` (for a table in memory,
    /// `bytes.as_ptr() as u64`; for a file, the table's virtual address).
    ///
    /// `exec` lists the executable address ranges of the image or module: every site,
    /// trampoline, resolver and default implementation must lie inside one of them.
    /// Bytes after `total_size` are ignored.
    pub fn parse(
        bytes: &'a [u8],
        base: u64,
        exec: &[Range<u64>],
    ) -> Result<Table<'a>, FormatError> {
        Table::parse_module(bytes, base, exec, exec)
    }

    /// [`Table::parse`] for a module's table: everything the module defines (sites,
    /// probe sites, its own ifuncs) must lie in `exec`, its executable ranges, while the
    /// trampolines of imported ifuncs must lie in `import_exec`, the defining image's
    /// (the kernel's) executable ranges.
    pub fn parse_module(
        bytes: &'a [u8],
        base: u64,
        exec: &[Range<u64>],
        import_exec: &[Range<u64>],
    ) -> Result<Table<'a>, FormatError> {
        let header = Header::read(bytes)?;
        if header.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let header_size = match header.version {
            VERSION => HEADER_SIZE,
            VERSION_1 => HEADER_SIZE_V1,
            v => return Err(FormatError::UnsupportedVersion(v)),
        };
        if bytes.len() < header_size {
            return Err(FormatError::Truncated {
                len: bytes.len(),
                needed: header_size,
            });
        }
        let arch = Arch::from_id(header.arch).ok_or(FormatError::WrongArch(header.arch))?;
        if header.flags != 0 {
            return Err(FormatError::UnknownFlags(header.flags));
        }
        if header.header_size as usize != header_size {
            return Err(FormatError::BadHeaderSize {
                size: header.header_size,
                version: header.version,
            });
        }
        if (header.total_size as usize) < header_size || header.total_size as usize > bytes.len() {
            return Err(FormatError::BadTotalSize {
                total_size: header.total_size,
                len: bytes.len(),
            });
        }
        if !base.is_multiple_of(TABLE_ALIGN) {
            return Err(FormatError::Misaligned {
                part: Part::Header,
                offset: 0,
            });
        }
        let bytes = &bytes[..header.total_size as usize];
        let total = header.total_size;

        // Bounds and alignment of each sub-table, then pairwise disjointness.
        let parts = [
            (Part::Ifuncs, header.ifuncs, IFUNC_DESC_SIZE, 4u32),
            (Part::IfuncSites, header.ifunc_sites, IFUNC_SITE_SIZE, 4),
            (Part::Probes, header.probes, PROBE_DESC_SIZE, 4),
            (Part::ProbeSites, header.probe_sites, PROBE_SITE_SIZE, 4),
            (Part::Keys, header.keys, KEY_DESC_SIZE, 4),
            (Part::KeySites, header.key_sites, KEY_SITE_SIZE, 4),
            (Part::Strings, header.strings, 1, 1),
        ];
        let mut spans = [(Part::Header, 0u32, header_size as u32); 8];
        for (i, &(part, st, entry, align)) in parts.iter().enumerate() {
            if !st.offset.is_multiple_of(align) {
                return Err(FormatError::Misaligned {
                    part,
                    offset: st.offset,
                });
            }
            let end = sub_end(part, st, entry, total)?;
            spans[i + 1] = (part, st.offset, end);
        }
        for i in 0..spans.len() {
            for j in i + 1..spans.len() {
                let (a, a0, a1) = spans[i];
                let (b, b0, b1) = spans[j];
                if a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1 {
                    return Err(FormatError::Overlap { a, b });
                }
            }
        }
        if header.strings.count > 0 {
            let last = header.strings.offset as usize + header.strings.count as usize - 1;
            if bytes.get(last) != Some(&0) {
                return Err(FormatError::StringTableUnterminated);
            }
        }

        let table = Table {
            bytes,
            base,
            header,
            arch,
        };
        table.validate_ifuncs(exec, import_exec)?;
        table.validate_sites(exec)?;
        table.validate_probes(exec)?;
        table.validate_keys(exec)?;
        Ok(table)
    }

    fn validate_ifuncs(
        &self,
        exec: &[Range<u64>],
        import_exec: &[Range<u64>],
    ) -> Result<(), FormatError> {
        let n = self.header.ifuncs.count;
        let tramp_len = self.arch.trampoline_len() as u64;
        for i in 0..n {
            let f = self.try_ifunc(i)?;
            if f.imported {
                // Only the trampoline is known; it lies in the defining image's text,
                // which the caller includes in `exec`.
                if !in_ranges(import_exec, f.trampoline, tramp_len) {
                    return Err(FormatError::BadIfuncPointer {
                        ifunc: i,
                        field: IfuncField::Trampoline,
                        addr: f.trampoline,
                    });
                }
                continue;
            }
            for (field, addr, len) in [
                (IfuncField::Trampoline, f.trampoline, tramp_len),
                (IfuncField::Resolver, f.resolver, 1),
                (IfuncField::Default, f.default, 1),
            ] {
                if !in_ranges(exec, addr, len) {
                    return Err(FormatError::BadIfuncPointer {
                        ifunc: i,
                        field,
                        addr,
                    });
                }
            }
            // A defined ifunc's slot is never 0 (the patcher would take it for an
            // import's and report its trampoline instead).
            if f.slot == 0
                || !f.slot.is_multiple_of(8)
                || f.slot.checked_add(8).is_none()
                || exec_overlaps(exec, f.slot, 8)
            {
                return Err(FormatError::BadIfuncPointer {
                    ifunc: i,
                    field: IfuncField::Slot,
                    addr: f.slot,
                });
            }
        }
        // Defined descriptors come first, sorted by trampoline address, which makes
        // "distinct trampolines" a linear check (no allocation, no quadratic scan).
        // Imports follow, sorted by name: their trampolines are only known once the
        // module is relocated, so their address order is not known when the table is
        // written.
        let mut prev = None;
        let mut prev_import: Option<&str> = None;
        for i in 0..n {
            let f = self.try_ifunc(i)?;
            if f.imported {
                match prev_import {
                    Some(p) if f.name == p => return Err(FormatError::DuplicateIfunc { ifunc: i }),
                    Some(p) if f.name < p => return Err(FormatError::IfuncsUnsorted { ifunc: i }),
                    _ => {}
                }
                prev_import = Some(f.name);
                continue;
            }
            if prev_import.is_some() {
                return Err(FormatError::IfuncsUnsorted { ifunc: i });
            }
            let t = f.trampoline;
            match prev {
                Some(p) if t == p => return Err(FormatError::DuplicateIfunc { ifunc: i }),
                Some(p) if t < p => return Err(FormatError::IfuncsUnsorted { ifunc: i }),
                _ => {}
            }
            prev = Some(t);
        }
        Ok(())
    }

    fn validate_sites(&self, exec: &[Range<u64>]) -> Result<(), FormatError> {
        let n = self.header.ifunc_sites.count;
        let mut prev_end = 0u64;
        for i in 0..n {
            let s = self.try_site(i)?;
            if s.len() > self.arch.max_site_len() {
                return Err(FormatError::SiteTooLong { site: i });
            }
            if !self.arch.supports_site(s.kind, s.prefixes, s.addr) {
                return Err(FormatError::SiteUnsupported {
                    site: i,
                    addr: s.addr,
                });
            }
            if i > 0 && s.addr < prev_end {
                return Err(FormatError::Unsorted { site: i });
            }
            if !in_ranges(exec, s.addr, s.len() as u64) {
                return Err(FormatError::SiteNotExecutable {
                    site: i,
                    addr: s.addr,
                });
            }
            prev_end = s.end();
        }
        Ok(())
    }

    fn validate_probes(&self, exec: &[Range<u64>]) -> Result<(), FormatError> {
        for i in 0..self.header.probes.count {
            let p = self.try_probe(i)?;
            if p.nargs > 6 && p.nargs != NARGS_UNKNOWN {
                return Err(FormatError::BadProbeDesc { probe: i });
            }
        }
        let mut prev_end = 0u64;
        let len = self.arch.probe_site_len() as u64;
        for i in 0..self.header.probe_sites.count {
            let s = self.try_psite(i)?;
            if i > 0 && s.addr < prev_end {
                return Err(FormatError::ProbeSitesUnsorted { site: i });
            }
            if !s.addr.is_multiple_of(self.arch.probe_align()) {
                return Err(FormatError::ProbeSiteMisaligned {
                    site: i,
                    addr: s.addr,
                });
            }
            if !in_ranges(exec, s.addr, len) {
                return Err(FormatError::ProbeSiteNotExecutable {
                    site: i,
                    addr: s.addr,
                });
            }
            if s.kind.is_rust() && !in_ranges(exec, s.target, 1) {
                return Err(FormatError::ProbeSiteNotExecutable {
                    site: i,
                    addr: s.target,
                });
            }
            prev_end = s.addr + len;
        }
        Ok(())
    }

    fn try_probe(&self, i: u32) -> Result<Probe<'a>, FormatError> {
        let off = self.header.probes.offset as usize + i as usize * PROBE_DESC_SIZE;
        let d = ProbeDesc::read(&self.bytes[off..off + PROBE_DESC_SIZE]);
        if d.flags != 0 {
            return Err(FormatError::BadProbeDesc { probe: i });
        }
        Ok(Probe {
            index: i,
            provider: self.string(d.provider)?,
            name: self.string(d.name)?,
            nargs: d.nargs,
        })
    }

    #[inline(always)]
    fn try_psite(&self, i: u32) -> Result<PSite, FormatError> {
        let off = self.header.probe_sites.offset as usize + i as usize * PROBE_SITE_SIZE;
        let e = &self.bytes[off..off + PROBE_SITE_SIZE];
        decode_psite(i, e, self.field_addr(off), self.header.probes.count)
    }

    /// Number of probes.
    pub fn probe_count(&self) -> u32 {
        self.header.probes.count
    }

    /// Number of probe sites.
    #[inline]
    pub fn probe_site_count(&self) -> u32 {
        self.header.probe_sites.count
    }

    /// Probe `i`.
    pub fn probe(&self, i: u32) -> Option<Probe<'a>> {
        if i >= self.probe_count() {
            return None;
        }
        self.try_probe(i).ok()
    }

    /// Probe site `i`.
    #[inline]
    pub fn probe_site(&self, i: u32) -> Option<PSite> {
        if i >= self.probe_site_count() {
            return None;
        }
        self.try_psite(i).ok()
    }

    /// All probes.
    pub fn probes(&self) -> impl Iterator<Item = Probe<'a>> + '_ {
        (0..self.probe_count()).filter_map(|i| self.probe(i))
    }

    /// All probe sites, in address order.
    pub fn probe_sites(&self) -> impl Iterator<Item = PSite> + '_ {
        (0..self.probe_site_count()).filter_map(|i| self.probe_site(i))
    }

    /// The sites of probe `probe`, in address order: one walk over the entries that
    /// decodes only that probe's (what a batch's passes iterate). Yields what
    /// [`Table::probe_sites`] yields for that probe.
    #[inline]
    pub fn probe_sites_of(&self, probe: u32) -> ProbeSitesOf<'a> {
        // Entries of a probe past the count do not decode (and the index must fit in
        // an entry's 24 bits): none to yield.
        let valid = probe < self.header.probes.count && probe < 1 << 24;
        let mut walk = self.entries(self.header.probe_sites, PROBE_SITE_SIZE);
        if !valid {
            walk.rest = &[];
        }
        ProbeSitesOf {
            walk,
            probe_bits: probe << 8,
        }
    }

    /// A walk over the `entry`-byte entries of sub-table `st`.
    #[inline]
    pub(super) fn entries(&self, st: SubTable, entry: usize) -> Entries<'a> {
        let start = st.offset as usize;
        // `parse` checked the sub-table lies inside the table.
        let end = start.saturating_add(st.count as usize * entry);
        let entries = self.bytes.get(start..end).unwrap_or(&[]);
        let first = self.field_addr(start);
        let (lo, span) = resolution_bounds(first);
        Entries {
            entries,
            rest: entries,
            first,
            lo,
            span,
        }
    }

    /// The probe site starting exactly at `addr` (binary search).
    pub fn probe_site_at(&self, addr: u64) -> Option<PSite> {
        let (mut lo, mut hi) = (0u32, self.probe_site_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = self.probe_site(mid)?;
            if addr < s.addr {
                hi = mid;
            } else if addr > s.addr {
                lo = mid + 1;
            } else {
                return Some(s);
            }
        }
        None
    }

    #[inline]
    pub(super) fn field_addr(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    pub(super) fn string(&self, offset: u32) -> Result<&'a str, FormatError> {
        let st = self.header.strings;
        if offset >= st.count {
            return Err(FormatError::StringOutOfBounds { offset });
        }
        let start = st.offset as usize + offset as usize;
        let end = st.offset as usize + st.count as usize;
        let s = &self.bytes[start..end];
        // The table ends in NUL (checked in parse), so this always finds one.
        let len = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        core::str::from_utf8(&s[..len]).map_err(|_| FormatError::StringNotUtf8 { offset })
    }

    fn try_ifunc(&self, i: u32) -> Result<Ifunc<'a>, FormatError> {
        let off = self.header.ifuncs.offset as usize + i as usize * IFUNC_DESC_SIZE;
        let d = IfuncDesc::read(&self.bytes[off..off + IFUNC_DESC_SIZE]);
        let ovf = FormatError::AddressOverflow {
            part: Part::Ifuncs,
            index: i,
        };
        let at = |field: usize, rel: i32| resolve_rel(self.field_addr(off + field), rel).ok_or(ovf);
        if Ifunc::desc_is_import(&d) {
            return Ok(Ifunc {
                index: i,
                name: self.string(d.name)?,
                trampoline: at(0, d.trampoline)?,
                slot: 0,
                resolver: 0,
                default: 0,
                imported: true,
            });
        }
        Ok(Ifunc {
            index: i,
            name: self.string(d.name)?,
            trampoline: at(0, d.trampoline)?,
            slot: at(4, d.slot)?,
            resolver: at(8, d.resolver)?,
            default: at(12, d.default)?,
            imported: false,
        })
    }

    #[inline]
    fn try_site(&self, i: u32) -> Result<Site, FormatError> {
        let off = self.header.ifunc_sites.offset as usize + i as usize * IFUNC_SITE_SIZE;
        let e = IfuncSite::read(&self.bytes[off..off + IFUNC_SITE_SIZE]);
        let kind = SiteKind::from_bits(e.info & 3).ok_or(FormatError::BadSiteKind { site: i })?;
        if e.info & 0xe0 != 0 {
            return Err(FormatError::ReservedSiteBits { site: i });
        }
        let prefixes = ((e.info >> 2) & 7) as u8;
        let ifunc = e.info >> 8;
        if ifunc >= self.header.ifuncs.count {
            return Err(FormatError::IfuncIndexOutOfRange {
                site: i,
                ifunc,
                count: self.header.ifuncs.count,
            });
        }
        let addr =
            resolve_rel(self.field_addr(off), e.site).ok_or(FormatError::AddressOverflow {
                part: Part::IfuncSites,
                index: i,
            })?;
        let field = self.arch.target_field(kind, prefixes);
        Ok(Site {
            index: i,
            addr,
            kind,
            prefixes,
            ifunc,
            len: self.arch.site_len(kind, prefixes) as u8,
            field: (field.start as u8, field.end as u8),
        })
    }

    /// The format version of the table: [`VERSION`] (2) or [`VERSION_1`] (a v1 table,
    /// which has no keys).
    #[inline]
    pub fn version(&self) -> u16 {
        self.header.version
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The architecture the table was written for.
    #[inline(always)]
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The address the table was validated at.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The table's bytes (exactly `total_size` of them).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of ifunc descriptors.
    #[inline]
    pub fn ifunc_count(&self) -> u32 {
        self.header.ifuncs.count
    }

    /// Number of ifunc sites.
    #[inline]
    pub fn site_count(&self) -> u32 {
        self.header.ifunc_sites.count
    }

    /// Descriptor `i`, or `None` if out of range.
    pub fn ifunc(&self, i: u32) -> Option<Ifunc<'a>> {
        if i >= self.ifunc_count() {
            return None;
        }
        self.try_ifunc(i).ok()
    }

    /// Trampoline and slot addresses of ifunc `i`, without decoding its name (what the
    /// patch engine needs for every site). `None` if out of range. The slot of an
    /// import is 0 here (the engine reads it from the trampoline).
    #[inline]
    pub fn ifunc_trampoline_slot(&self, i: u32) -> Option<(u64, u64)> {
        if i >= self.ifunc_count() {
            return None;
        }
        let off = self.header.ifuncs.offset as usize + i as usize * IFUNC_DESC_SIZE;
        let d = IfuncDesc::read(&self.bytes[off..off + IFUNC_DESC_SIZE]);
        let trampoline = resolve_rel(self.field_addr(off), d.trampoline)?;
        if Ifunc::desc_is_import(&d) {
            return Some((trampoline, 0));
        }
        Some((trampoline, resolve_rel(self.field_addr(off + 4), d.slot)?))
    }

    /// Site `i`, or `None` if out of range.
    #[inline]
    pub fn site(&self, i: u32) -> Option<Site> {
        if i >= self.site_count() {
            return None;
        }
        self.try_site(i).ok()
    }

    /// All descriptors, in table order.
    pub fn ifuncs(&self) -> impl Iterator<Item = Ifunc<'a>> + '_ {
        (0..self.ifunc_count()).filter_map(|i| self.ifunc(i))
    }

    /// All sites, in address order.
    #[inline]
    pub fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        (0..self.site_count()).filter_map(|i| self.site(i))
    }

    /// The same sites as [`Table::sites`], in the same order, as one walk over the
    /// entries (no per-index bounds check or multiplication; each address resolved with
    /// one range test): what the patch engine's passes iterate.
    #[inline]
    pub fn site_walk(&self) -> SiteWalk<'a> {
        let st = self.header.ifunc_sites;
        let start = st.offset as usize;
        // `parse` checked the sub-table lies inside the table.
        let end = start.saturating_add(st.count as usize * IFUNC_SITE_SIZE);
        SiteWalk {
            rest: self.bytes.get(start..end).unwrap_or(&[]),
            index: 0,
            entry_addr: self.field_addr(start),
            ifuncs: self.header.ifuncs.count,
            arch: self.arch,
        }
    }

    /// The site whose instruction contains `addr` (binary search).
    pub fn site_containing(&self, addr: u64) -> Option<Site> {
        let (mut lo, mut hi) = (0u32, self.site_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = self.site(mid)?;
            if addr < s.addr {
                hi = mid;
            } else if addr >= s.end() {
                lo = mid + 1;
            } else {
                return Some(s);
            }
        }
        None
    }
}

/// For sub-table entries at `first`: `(lo, span)` such that the address `first + x`,
/// for an `x` (a field's offset plus its `i32`) of magnitude below 2^40, lies inside
/// the address space exactly when `x - lo`, unsigned, is at most `span`. One compare
/// per field instead of an overflow check of each addition.
fn resolution_bounds(first: u64) -> (i64, u64) {
    const CLIP: i128 = 1 << 40;
    let c = i128::from(first);
    let lo = (-c).max(-CLIP) as i64;
    let hi = (i128::from(u64::MAX) - c).min(CLIP) as i64;
    (lo, hi.wrapping_sub(lo) as u64)
}

/// Decodes probe site entry `i` (`e`, its bytes, at address `field_addr`) of a table
/// with `probes` probes.
#[inline(always)]
fn decode_psite(i: u32, e: &[u8], field_addr: u64, probes: u32) -> Result<PSite, FormatError> {
    let e = ProbeSite::read(e);
    // The kind (3 bits) and the reserved bits above it, in one test.
    let kind = match e.info & 0xf8 {
        0 => ProbeKind::from_bits(e.info & 7),
        _ => None,
    }
    .ok_or(FormatError::BadProbeSite { site: i })?;
    let probe = e.info >> 8;
    if probe >= probes {
        return Err(FormatError::ProbeIndexOutOfRange {
            site: i,
            probe,
            count: probes,
        });
    }
    let ovf = FormatError::AddressOverflow {
        part: Part::ProbeSites,
        index: i,
    };
    let addr = resolve_rel(field_addr, e.site).ok_or(ovf)?;
    let target = if kind.is_rust() {
        resolve_rel(field_addr + 4, e.target).ok_or(ovf)?
    } else {
        0
    };
    Ok(PSite {
        index: i,
        addr,
        target,
        kind,
        probe,
    })
}

/// A walk over the entries of one sub-table: each step yields an entry and its offset,
/// and [`Entries::resolve`] turns a self-relative field into an address.
#[derive(Clone, Debug)]
pub(super) struct Entries<'a> {
    /// Every entry of the sub-table.
    entries: &'a [u8],
    /// The entries not yet visited (a tail of `entries`).
    pub(super) rest: &'a [u8],
    /// Address of `entries`.
    first: u64,
    /// [`resolution_bounds`] of `first`.
    lo: i64,
    span: u64,
}

impl<'a> Entries<'a> {
    /// The next entry (`N` bytes) and its offset in `entries`.
    #[inline(always)]
    pub(super) fn next<const N: usize>(&mut self) -> Option<(usize, &'a [u8; N])> {
        let (e, rest) = self.rest.split_first_chunk::<N>()?;
        let off = self.entries.len() - self.rest.len();
        self.rest = rest;
        Some((off, e))
    }

    /// The address the self-relative `rel` at offset `off` of `entries` refers to:
    /// [`resolve_rel`] of the field's address, as one range test.
    #[inline(always)]
    pub(super) fn resolve(&self, off: usize, rel: i32) -> Option<u64> {
        let x = off as i64 + i64::from(rel);
        (x.wrapping_sub(self.lo) as u64 <= self.span).then(|| self.first.wrapping_add(x as u64))
    }

    /// Stops before byte `end` of `entries`.
    #[inline]
    fn until(&mut self, end: usize) {
        if end < self.entries.len() {
            // Both cut at the same place, so the offsets `next` computes stay right.
            let n = end.saturating_sub(self.entries.len() - self.rest.len());
            self.entries = &self.entries[..end];
            self.rest = self.rest.get(..n).unwrap_or(&[]);
        }
    }
}

/// The sites of one probe, in address order ([`Table::probe_sites_of`]). Entries that
/// do not decode are skipped, as [`Table::probe_sites`] skips them (a parsed table has
/// none).
#[derive(Clone, Debug)]
pub struct ProbeSitesOf<'a> {
    walk: Entries<'a>,
    /// The probe's index, shifted to its place in an entry's `info`.
    probe_bits: u32,
}

impl ProbeSitesOf<'_> {
    /// Stops before the entry with table index `end` (a [`PSite::index`]).
    #[inline]
    pub fn until(mut self, end: u32) -> Self {
        self.walk.until(end as usize * PROBE_SITE_SIZE);
        self
    }
}

impl Iterator for ProbeSitesOf<'_> {
    type Item = PSite;

    #[inline(always)]
    fn next(&mut self) -> Option<PSite> {
        while let Some((off, e)) = self.walk.next::<PROBE_SITE_SIZE>() {
            let entry = ProbeSite::read(e);
            // In one compare: the entry is this probe's (`info >> 8`), its reserved
            // bits are 0 and its kind is valid (`info & 0xff` is a kind); another
            // probe's entry, or one that does not decode, is skipped.
            let bits = entry.info.wrapping_sub(self.probe_bits);
            let Some(kind) = (if bits <= 7 {
                ProbeKind::from_bits(bits)
            } else {
                None
            }) else {
                continue;
            };
            // Both fields resolved, then one test of their overflows (the target's
            // counts for a Rust site only, as in `decode_psite`).
            let site = self.walk.resolve(off, entry.site);
            let target = self.walk.resolve(off + 4, entry.target);
            let rust = kind.is_rust();
            let (Some(addr), Some(target)) = (site, if rust { target } else { Some(0) }) else {
                continue;
            };
            return Some(PSite {
                index: (off / PROBE_SITE_SIZE) as u32,
                addr,
                target,
                kind,
                probe: self.probe_bits >> 8,
            });
        }
        None
    }
}

/// The ifunc sites in table order ([`Table::site_walk`]). Entries that do not decode are
/// skipped, as [`Table::sites`] skips them (a parsed table has none).
#[derive(Clone, Debug)]
pub struct SiteWalk<'a> {
    /// The entries not yet visited.
    rest: &'a [u8],
    /// Index of the next entry.
    index: u32,
    /// Address of the next entry (its `site` field's).
    entry_addr: u64,
    /// The table's ifunc count.
    ifuncs: u32,
    arch: Arch,
}

impl Iterator for SiteWalk<'_> {
    type Item = Site;

    #[inline(always)]
    fn next(&mut self) -> Option<Site> {
        // An index and the entry's address advanced by one step each, rather than
        // offsets recomputed from slices: the fewest live values in the engine's loops.
        while let Some((e, rest)) = self.rest.split_first_chunk::<IFUNC_SITE_SIZE>() {
            self.rest = rest;
            let (index, at) = (self.index, self.entry_addr);
            self.index = index.wrapping_add(1);
            self.entry_addr = at.wrapping_add(IFUNC_SITE_SIZE as u64);
            let e = IfuncSite::read(e);
            // What `try_site` checks (any failure skips the entry): the reserved bits
            // and the kind's fourth value in one test, the ifunc index, the address.
            // The kind by table lookup, not a `match` (which compiled to a jump table).
            const KINDS: [Option<SiteKind>; 4] = [
                SiteKind::from_bits(0),
                SiteKind::from_bits(1),
                SiteKind::from_bits(2),
                SiteKind::from_bits(3),
            ];
            let ifunc = e.info >> 8;
            let (Some(kind), true, Some(addr)) = (
                if e.info & 0xe0 == 0 {
                    KINDS[(e.info & 3) as usize]
                } else {
                    None
                },
                ifunc < self.ifuncs,
                resolve_rel(at, e.site),
            ) else {
                continue;
            };
            let prefixes = ((e.info >> 2) & 7) as u8;
            let field = self.arch.target_field(kind, prefixes);
            return Some(Site {
                index,
                addr,
                kind,
                prefixes,
                ifunc,
                len: self.arch.site_len(kind, prefixes) as u8,
                field: (field.start as u8, field.end as u8),
            });
        }
        None
    }
}

fn exec_overlaps(exec: &[Range<u64>], start: u64, len: u64) -> bool {
    let end = start.saturating_add(len);
    exec.iter().any(|r| r.start < end && start < r.end)
}
