//! Steps 1–4 of a load: lay the sections out in a region, resolve every symbol,
//! apply every relocation (through the object's [`Machine`]), and validate the
//! module's table in place.
//!
//! The region is the layout contract's three groups from offset 0, then the loader's
//! bookkeeping (with, on riscv64, the index of PC-relative high parts below), then (on
//! architectures with veneers, and only if the module may need one) a page-aligned
//! veneer area mapped read + execute. Neither changes a section's address. The veneer
//! area has room for one veneer per branch relocation to a symbol outside the module
//! (at most one per such symbol); a branch that overflows goes through a veneer to its
//! target, one veneer per distinct target.
//!
//! On riscv64 a PC-relative low part (`PCREL_LO12_I`/`_S`) names the label of the
//! `auipc` whose high part (`PCREL_HI20`) it completes, possibly in another section and
//! anywhere in the relocation order. Before relocating, the linker records every high
//! part of the module — the `auipc`'s address and the target — in an index in its
//! bookkeeping (24 bytes each, counted when the region is laid out) and sorts it by
//! address once; each low part then finds its high part by binary search: O(n log n)
//! for the module, without allocating. Label differences (an `ADDn`/`SETn` then a
//! `SUBn` at the same place) are checked to fit their field once both halves are
//! applied, and an `ALIGN`'s padding is checked to be NOPs (the loader does not relax;
//! see [`crate::arch::riscv64::reloc`]).
//!
//! The linker writes the region only through raw pointers ([`Linker::write`], bounds
//! checked), never through a `&mut` slice made from `&self` (the one `&mut` slice, over
//! the high-part index alone, lives inside [`Linker::index_pcrel_highs`] to sort it,
//! while nothing else refers to the region); the one shared slice into
//! the region, the `.ksites` table handed to [`Table::parse_module`], is made after the
//! last write of the linker and covers bytes nothing writes afterwards (see
//! [`Linker::table`]).

use core::ops::Range;

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{Rela as _, SectionHeader as _, Sym as _};
use object::read::{SectionIndex, SymbolIndex};

use crate::Name;
use crate::arch::{self, Arch, LiveProtocol as _};
use crate::format::{FormatError, PROBE_SITE_LEN, Table};
use crate::patch;
use crate::probe::{self, ProbeError, STUB_SYMBOLS};

use super::error::{
    Malformed, ModuleError, RelocFailure, RelocationProblem, SectionSymbol, SymbolProblem,
};
use super::layout::{PAGE_SIZE, SectionHeader};
use super::machine::{Failure, MAX_VENEER_LEN, Machine};
use super::object::{ElfSym, Object, Shdr, elf_err};
use super::{Kernel, LoadReport, MAX_KERNEL_EXEC, ModuleMemory, Region};

/// Where the three groups and the bookkeeping lie, as offsets in the region.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Layout {
    pub(super) text: usize,
    pub(super) ro: usize,
    pub(super) rw: usize,
    /// Bookkeeping: one `u64` address per section, then one per symbol.
    pub(super) meta: usize,
    /// The index of PC-relative high parts (riscv64): `pcrel_len` entries of
    /// [`HI_ENTRY`] bytes, after the addresses.
    pub(super) pcrel: usize,
    pub(super) pcrel_len: usize,
    /// The veneer area (page-aligned; up to `end`, empty if the module needs none).
    pub(super) veneers: usize,
    pub(super) end: usize,
    pub(super) sections: usize,
    pub(super) symbols: usize,
}

/// The sort key of a high-part index entry: the `auipc`'s address.
fn hi_key(e: &[u8; HI_ENTRY]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&e[..8]);
    u64::from_le_bytes(a)
}

/// Whether a section is loaded (has a group in the layout contract).
pub(super) fn is_loaded(sh: &Shdr) -> bool {
    super::layout::from_elf(sh).group().is_some()
}

impl Object<'_> {
    /// The region layout: the contract's groups from offset 0, then the bookkeeping.
    fn region_layout(&self) -> Result<Layout, ModuleError> {
        let too_big = ModuleError::OutOfMemory { size: usize::MAX };
        let g = self.layout(&mut |_, _| {})?;
        let off = |v: u64| usize::try_from(v).map_err(|_| too_big);
        let meta = off(g.end())?;
        let n = self.sections.len() + self.symtab.len();
        let pcrel = n
            .checked_mul(8)
            .and_then(|b| meta.checked_add(b))
            .ok_or(too_big)?;
        let pcrel_len = self.pcrel_highs()?;
        let veneers = pcrel_len
            .checked_mul(HI_ENTRY)
            .and_then(|b| pcrel.checked_add(b))
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(too_big)?
            .max(PAGE_SIZE);
        let end = self
            .veneer_slots()?
            .checked_mul(self.machine.veneer_len())
            .and_then(|b| veneers.checked_add(b))
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(too_big)?;
        Ok(Layout {
            text: off(g.exec.start)?,
            ro: off(g.read_only.start)?,
            rw: off(g.writable.start)?,
            meta,
            pcrel,
            pcrel_len,
            veneers,
            end,
            sections: self.sections.len(),
            symbols: self.symtab.len(),
        })
    }
}

/// Bytes of one entry of the high-part index: the `auipc`'s address, the target
/// (`S + A`), and whether the target is known (8 bytes each, little-endian).
const HI_ENTRY: usize = 24;

impl Object<'_> {
    /// The relocations of loaded sections, with the index of the section each applies
    /// to, section by section.
    fn loaded_relas(
        &self,
    ) -> impl Iterator<Item = Result<(usize, &[elf::Rela64<LE>]), ModuleError>> + '_ {
        self.sections.iter().filter_map(|rs| {
            let target = rs.sh_info.get(LE) as usize;
            if rs.sh_type.get(LE) != elf::SHT_RELA
                || !self.sections.get(target).is_some_and(is_loaded)
            {
                return None;
            }
            match rs.rela(LE, self.bytes) {
                Ok(Some((relas, _))) => Some(Ok((target, relas))),
                Ok(None) => None,
                Err(e) => Some(Err(elf_err(e))),
            }
        })
    }

    /// How many PC-relative high parts the module's loaded sections have (0 on
    /// machines without low parts that refer to them).
    fn pcrel_highs(&self) -> Result<usize, ModuleError> {
        let Some(hi) = self.machine.pcrel_hi() else {
            return Ok(0);
        };
        let mut n = 0usize;
        for r in self.loaded_relas() {
            let (_, relas) = r?;
            n += relas.iter().filter(|r| r.r_type(LE, false).0 == hi).count();
        }
        Ok(n)
    }

    /// Whether symbol `i` lies outside the module's memory (undefined, absolute, or in
    /// a section that is not loaded): a branch to it may need a veneer.
    fn outside(&self, i: usize) -> bool {
        let Ok(sym) = self.symtab.symbol(SymbolIndex(i)) else {
            return false;
        };
        if i == 0 {
            return false;
        }
        match self.symtab.symbol_section(LE, sym, SymbolIndex(i)) {
            Ok(Some(SectionIndex(s))) => !self.sections.get(s).is_some_and(is_loaded),
            _ => true,
        }
    }

    /// How many veneers the module may need (one per distinct target, at most): one
    /// per veneer-capable branch relocation (in a loaded section) to a symbol outside the module
    /// with a non-zero addend, plus those with a zero addend, but no more of these
    /// than there are symbols outside the module.
    fn veneer_slots(&self) -> Result<usize, ModuleError> {
        if self.machine.veneer_len() == 0 {
            return Ok(0);
        }
        let (mut plain, mut offset) = (0usize, 0usize);
        for r in self.loaded_relas() {
            let (_, relas) = r?;
            for r in relas {
                if self.machine.needs_veneer(r.r_type(LE, false).0)
                    && self.outside(r.r_sym(LE, false) as usize)
                {
                    match r.r_addend(LE) {
                        0 => plain += 1,
                        _ => offset += 1,
                    }
                }
            }
        }
        if plain > 0 {
            plain = plain.min((1..self.symtab.len()).filter(|&i| self.outside(i)).count());
        }
        Ok(plain + offset)
    }
}

/// The loader's working state over one region.
struct Linker<'b, 'k, 'm> {
    obj: Object<'b>,
    kernel: &'k Kernel<'k>,
    region: &'m Region,
    layout: Layout,
    report: LoadReport,
    /// Entries of the high-part index written (see [`Linker::index_pcrel_highs`]).
    highs: usize,
}

/// The first half of a label difference, until its second half is applied.
#[derive(Clone, Copy)]
struct FirstHalf {
    offset: u64,
    bits: u32,
    value: u64,
}

impl<'b> Linker<'b, '_, '_> {
    /// The region's bytes `off..off + len`, as a raw pointer, or an error if the range
    /// is not inside the region (offsets come from the layout, which fits in it, so this
    /// is never expected: it is checked, not assumed, because the loader must not panic
    /// on a module).
    #[inline]
    fn at(&self, off: usize, len: usize) -> Result<*mut u8, ModuleError> {
        if off.checked_add(len).is_none_or(|e| e > self.region.size) {
            return Err(ModuleError::Malformed(Malformed::OutsideRegion));
        }
        // SAFETY: `off + len <= size` (checked above), so the pointer stays inside the
        // region's allocation.
        Ok(unsafe { self.region.ptr.add(off) })
    }

    /// Writes `bytes` at `off` in the region.
    #[inline]
    fn write(&self, off: usize, bytes: &[u8]) -> Result<(), ModuleError> {
        let p = self.at(off, bytes.len())?;
        // SAFETY: `p..p + len` lies in the region (`at` checked it), which is writable
        // memory the loader owns while it links; no reference into the region is alive
        // while the linker writes (the table slice is made after the last write, in
        // `table`, over bytes nothing writes afterwards); `bytes` is not in the region.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off` in the region.
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), ModuleError> {
        let p = self.at(off, buf.len())?;
        // SAFETY: `p..p + len` lies in the region (checked by `at`), which is readable
        // while the loader links; `buf` is not in the region.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    // The bookkeeping (one address per section and symbol) lies in the region's last
    // group: `link` refuses a region smaller than the layout, so `read`/`write` cannot
    // fail here; were they to, an address reads as 0 ("not placed").
    fn meta(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        match self.read(self.layout.meta + 8 * i, &mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    fn set_meta(&self, i: usize, v: u64) -> Result<(), ModuleError> {
        self.write(self.layout.meta + 8 * i, &v.to_le_bytes())
    }

    fn section_addr(&self, i: usize) -> u64 {
        self.meta(i)
    }

    fn symbol_addr(&self, i: usize) -> u64 {
        self.meta(self.layout.sections + i)
    }

    /// Places every allocated section at the contract's offset: records its address
    /// and copies its bytes (a `SHT_NOBITS` section stays zero).
    fn place(&mut self) -> Result<(), ModuleError> {
        let base = self.at(0, self.region.size)?;
        // SAFETY: the whole region is writable memory the loader owns (`at` checked the
        // range); no reference into it exists yet.
        unsafe { core::ptr::write_bytes(base, 0, self.region.size) };
        // Unplaced sections keep address 0 in the (zeroed) bookkeeping.
        let mut placed = 0u32;
        let mut err = None;
        let this = &*self;
        let obj = &this.obj;
        obj.layout(&mut |i, off| {
            if err.is_some() {
                return;
            }
            let sh = &obj.sections[i];
            let hdr: SectionHeader = super::layout::from_elf(sh);
            let off = off as usize;
            if !hdr.is_nobits() {
                let written = match sh.data(LE, obj.bytes) {
                    Ok(data) => this.write(off, &data[..(hdr.size as usize).min(data.len())]),
                    Err(e) => Err(elf_err(e)),
                };
                if let Err(e) = written {
                    err = Some(e);
                    return;
                }
            }
            if let Err(e) = this.set_meta(i, this.region.addr + off as u64) {
                err = Some(e);
                return;
            }
            placed += 1;
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        self.report.sections += placed;
        Ok(())
    }

    /// Resolves every symbol's address; reports each problem to `issue`.
    fn resolve(&mut self, issue: &mut dyn FnMut(ModuleError)) {
        for (i, sym) in self.obj.symtab.enumerate() {
            let addr = match self.symbol_value(i, sym) {
                Ok(a) => a,
                Err(e) => {
                    issue(e);
                    0
                }
            };
            if let Err(e) = self.set_meta(self.layout.sections + i.0, addr) {
                issue(e);
            }
        }
    }

    fn symbol_value(&mut self, i: SymbolIndex, sym: &ElfSym) -> Result<u64, ModuleError> {
        if i.0 == 0 {
            return Ok(0);
        }
        let name = || Name::new(self.obj.symbol_name(sym));
        let unsupported = |why| ModuleError::UnsupportedSymbol { name: name(), why };
        match sym.st_type() {
            elf::STT_GNU_IFUNC => return Err(unsupported(SymbolProblem::GnuIfunc)),
            elf::STT_TLS => return Err(unsupported(SymbolProblem::ThreadLocal)),
            _ => {}
        }
        match sym.st_shndx(LE) {
            elf::SHN_ABS => return Ok(sym.st_value(LE)),
            elf::SHN_COMMON => return Err(unsupported(SymbolProblem::Common)),
            _ => {}
        }
        match self
            .obj
            .symtab
            .symbol_section(LE, sym, i)
            .map_err(elf_err)?
        {
            Some(SectionIndex(s)) => {
                let sh = self
                    .obj
                    .sections
                    .get(s)
                    .ok_or(ModuleError::Malformed(Malformed::BadSymbolSection))?;
                if !is_loaded(sh) {
                    return Ok(0);
                }
                Ok(self.section_addr(s).wrapping_add(sym.st_value(LE)))
            }
            None if sym.st_shndx(LE) != elf::SHN_UNDEF => Ok(sym.st_value(LE)),
            None => {
                let n = self.obj.symbol_name(sym);
                match self.kernel.symbols.lookup(n) {
                    Some(a) => {
                        self.report.kernel_symbols += 1;
                        Ok(a)
                    }
                    None if sym.st_bind() == elf::STB_WEAK => Ok(0),
                    None => Err(ModuleError::UnknownSymbol { name: Name::new(n) }),
                }
            }
        }
    }

    /// Whether symbol `i` failed to resolve (`resolve` reported it and recorded 0).
    fn unresolved(&self, i: SymbolIndex) -> bool {
        let Ok(sym) = self.obj.symtab.symbol(i) else {
            return false;
        };
        if i.0 == 0 {
            return false;
        }
        if matches!(sym.st_type(), elf::STT_GNU_IFUNC | elf::STT_TLS)
            || sym.st_shndx(LE) == elf::SHN_COMMON
        {
            return true;
        }
        sym.st_shndx(LE) == elf::SHN_UNDEF
            && sym.st_bind() != elf::STB_WEAK
            && self
                .kernel
                .symbols
                .lookup(self.obj.symbol_name(sym))
                .is_none()
    }

    /// Applies every relocation section that targets an allocated section; reports each
    /// problem to `issue`.
    fn relocate(&mut self, issue: &mut dyn FnMut(ModuleError)) -> Result<(), ModuleError> {
        self.index_pcrel_highs()?;
        for rs in self.obj.sections {
            let ty = rs.sh_type.get(LE);
            if ty != elf::SHT_RELA && ty != elf::SHT_REL {
                continue;
            }
            let target = rs.sh_info.get(LE) as usize;
            let Some(tsh) = self.obj.sections.get(target) else {
                return Err(ModuleError::Malformed(
                    Malformed::RelocationTargetsNoSection,
                ));
            };
            if !is_loaded(tsh) {
                continue;
            }
            let tname = self.obj.section_name(tsh);
            if ty == elf::SHT_REL {
                issue(ModuleError::BadRelocation {
                    section: Name::new(tname),
                    offset: 0,
                    why: RelocationProblem::Rel,
                });
                continue;
            }
            let Some((relas, _)) = rs.rela(LE, self.obj.bytes).map_err(elf_err)? else {
                continue;
            };
            let mut first = None;
            for r in relas {
                if let Err(e) = self.apply(target, tsh, tname, r, &mut first) {
                    issue(e);
                }
            }
        }
        Ok(())
    }

    /// Records every PC-relative high part of the module (the `auipc`'s address, the
    /// target `S + A`, and whether it is known) in the index, and sorts it by address:
    /// a low part finds its high part by its label's address ([`Linker::pcrel_high`]).
    fn index_pcrel_highs(&mut self) -> Result<(), ModuleError> {
        let Some(hi) = self.obj.machine.pcrel_hi() else {
            return Ok(());
        };
        let mut n = 0usize;
        for r in self.obj.loaded_relas() {
            let (target, relas) = r?;
            for r in relas.iter().filter(|r| r.r_type(LE, false).0 == hi) {
                if n >= self.layout.pcrel_len {
                    return Err(ModuleError::Malformed(Malformed::OutsideRegion));
                }
                let p = self.section_addr(target).wrapping_add(r.r_offset(LE));
                let sym = r.r_sym(LE, false) as usize;
                let s = self.symbol_addr(sym);
                // A bad or unresolved symbol is reported when the high part is applied;
                // its low parts are then left alone.
                let known =
                    sym < self.layout.symbols && !(s == 0 && self.unresolved(SymbolIndex(sym)));
                let mut e = [0u8; HI_ENTRY];
                e[..8].copy_from_slice(&p.to_le_bytes());
                e[8..16].copy_from_slice(&s.wrapping_add_signed(r.r_addend(LE)).to_le_bytes());
                e[16] = u8::from(known);
                self.write(self.layout.pcrel + n * HI_ENTRY, &e)?;
                n += 1;
            }
        }
        let ptr = self.at(self.layout.pcrel, n * HI_ENTRY)?;
        // SAFETY: `ptr..ptr + n * HI_ENTRY` is the index, inside the region (`at` checked
        // it) and written above; the slice is the only reference into the region while
        // it lives (it ends with this function), and `[u8; HI_ENTRY]` needs no alignment.
        let entries = unsafe { core::slice::from_raw_parts_mut(ptr.cast::<[u8; HI_ENTRY]>(), n) };
        entries.sort_unstable_by_key(hi_key);
        self.highs = n;
        Ok(())
    }

    /// The high part at `label` in the index: its target, and whether it is known.
    fn pcrel_high(&self, label: u64) -> Option<(u64, bool)> {
        let entry = |i: usize| {
            let mut e = [0u8; HI_ENTRY];
            self.read(self.layout.pcrel + i * HI_ENTRY, &mut e).ok()?;
            Some(e)
        };
        let (mut lo, mut hi) = (0, self.highs);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if hi_key(&entry(mid)?) < label {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let e = entry(lo).filter(|e| hi_key(e) == label)?;
        let mut to = [0u8; 8];
        to.copy_from_slice(&e[8..16]);
        Some((u64::from_le_bytes(to), e[16] != 0))
    }

    fn apply(
        &mut self,
        target: usize,
        tsh: &Shdr,
        tname: &str,
        r: &elf::Rela64<LE>,
        first: &mut Option<FirstHalf>,
    ) -> Result<(), ModuleError> {
        let offset = r.r_offset(LE);
        let r_type = r.r_type(LE, false).0;
        let sym = r.r_sym(LE, false) as usize;
        // Names are copied only on the error paths: this runs once per relocation.
        let section = || Name::new(tname);
        let bad = |why| ModuleError::BadRelocation {
            section: section(),
            offset,
            why,
        };
        if sym >= self.layout.symbols {
            return Err(bad(RelocationProblem::SymbolOutOfRange));
        }
        let machine = self.obj.machine;
        let a = r.r_addend(LE);
        // Names are looked up only on the error paths.
        let fail =
            |this: &Self, why: Failure| this.reloc_error(machine, r_type, tname, offset, sym, why);
        let size = tsh.sh_size.get(LE);
        if let Some(padding) = machine.align_padding(r_type, a) {
            let len = padding.map_err(|why| fail(self, why))?;
            if offset.checked_add(len as u64).is_none_or(|e| e > size) {
                return Err(bad(RelocationProblem::OutsideSection));
            }
            if !self.is_padding(target, offset, len)? {
                return Err(fail(self, Failure::NotPadding));
            }
            self.report.relocations += 1;
            return Ok(());
        }
        let width = match machine.width(r_type) {
            Some(0) => return Ok(()),
            Some(w) => w,
            None => return Err(fail(self, Failure::Unsupported)),
        };
        if offset.checked_add(width as u64).is_none_or(|e| e > size) {
            return Err(bad(RelocationProblem::OutsideSection));
        }
        let s = self.symbol_addr(sym);
        if s == 0 && self.unresolved(SymbolIndex(sym)) {
            // `resolve` already reported the symbol; a value computed from its
            // placeholder 0 would only add a spurious overflow for every reference.
            return Ok(());
        }
        let p = self.section_addr(target).wrapping_add(offset);
        // A low part is computed from its high part: `S` is the high part's target, `P`
        // its `auipc`'s address (the label, `s`).
        let (s, from) = if machine.is_pcrel_lo(r_type) {
            match self.pcrel_high(s) {
                Some((to, true)) => (to, s),
                Some((_, false)) => return Ok(()),
                None => {
                    let why = RelocFailure::NoHighPart { label: s };
                    return Err(self.failed(machine, r_type, tname, offset, sym, why));
                }
            }
        } else {
            (s, p)
        };
        // The field lies in its section (checked above), which lies in the region.
        let at = (p - self.region.addr) as usize;
        let mut buf = [0u8; 8];
        let place = &mut buf[..width];
        self.read(at, place)?;
        match machine.difference_half(r_type) {
            Some((true, bits)) => {
                *first = Some(FirstHalf {
                    offset,
                    bits,
                    value: s.wrapping_add_signed(a),
                });
            }
            Some((false, bits)) => {
                if let Some(f) = first.take()
                    && f.offset == offset
                    && f.bits == bits
                {
                    let d = f.value.wrapping_sub(s.wrapping_add_signed(a)) as i64;
                    machine
                        .check_difference(bits, d)
                        .map_err(|why| fail(self, why))?;
                }
            }
            None => *first = None,
        }
        match machine.apply(r_type, place, s, a, from) {
            Ok(()) => {}
            Err(Failure::Overflow { .. }) if machine.needs_veneer(r_type) => {
                let to = s.wrapping_add_signed(a);
                let v = self
                    .veneer(to)
                    .map_err(|why| self.failed(machine, r_type, tname, offset, sym, why))?;
                if machine.apply(r_type, place, v, 0, p).is_err() {
                    let why = RelocFailure::VeneerOutOfReach {
                        target: to,
                        veneer: v,
                    };
                    return Err(self.failed(machine, r_type, tname, offset, sym, why));
                }
            }
            Err(why) => return Err(fail(self, why)),
        }
        self.write(at, place)?;
        self.report.relocations += 1;
        Ok(())
    }

    /// Whether the `len` bytes at `offset` in section `target` are padding instructions
    /// (an alignment relocation's, which the loader leaves in place).
    fn is_padding(&self, target: usize, offset: u64, len: usize) -> Result<bool, ModuleError> {
        let at = (self.section_addr(target).wrapping_add(offset) - self.region.addr) as usize;
        let mut done = 0;
        while done < len {
            let mut b = [0u8; 4];
            let n = (len - done).min(4);
            self.read(at + done, &mut b[..n])?;
            match self.obj.machine.padding_insn(&b[..n]) {
                0 => return Ok(false),
                step => done += step,
            }
        }
        Ok(true)
    }

    /// The address of a veneer to `to` in the veneer area: an existing one to the
    /// same target, or a new one.
    fn veneer(&mut self, to: u64) -> Result<u64, RelocFailure> {
        let machine = self.obj.machine;
        let len = machine.veneer_len();
        let slots = (self.layout.end - self.layout.veneers)
            .checked_div(len)
            .unwrap_or(0);
        let mut bytes = [0u8; MAX_VENEER_LEN];
        for i in 0..self.report.veneers as usize {
            let off = self.layout.veneers + i * len;
            if self.read(off, &mut bytes[..len]).is_ok()
                && machine.veneer_target(&bytes) == Some(to)
            {
                return Ok(self.region.addr + off as u64);
            }
        }
        let i = self.report.veneers as usize;
        if i >= slots {
            return Err(RelocFailure::NoVeneerRoom { target: to });
        }
        let off = self.layout.veneers + i * len;
        if self.write(off, &machine.veneer(to)[..len]).is_err() {
            return Err(RelocFailure::NoVeneerRoom { target: to });
        }
        self.report.veneers += 1;
        Ok(self.region.addr + off as u64)
    }

    /// The error for a relocation that failed with `why`: x86-64 modules keep the
    /// variants they always had; others name the symbol ([`ModuleError::RelocationFailed`]).
    #[allow(clippy::too_many_arguments)]
    fn reloc_error(
        &self,
        machine: Machine,
        r_type: u32,
        tname: &str,
        offset: u64,
        sym: usize,
        why: Failure,
    ) -> ModuleError {
        let section = Name::new(tname);
        if machine == Machine::X86_64 {
            return match why {
                Failure::Overflow { value, .. } | Failure::Misaligned { value, .. } => {
                    ModuleError::Overflow {
                        r_type,
                        section,
                        offset,
                        value,
                    }
                }
                Failure::Unsupported | Failure::NotPadding => ModuleError::UnsupportedRelocation {
                    r_type,
                    section,
                    offset,
                },
            };
        }
        let why = match why {
            Failure::Unsupported => RelocFailure::Unsupported,
            Failure::Overflow { value, range } => {
                let (min, max) = range.unwrap_or((i64::MIN, i64::MAX));
                RelocFailure::Overflow { value, min, max }
            }
            Failure::Misaligned { value, align } => RelocFailure::Misaligned { value, align },
            Failure::NotPadding => RelocFailure::NotPadding,
        };
        self.failed(machine, r_type, tname, offset, sym, why)
    }

    /// [`ModuleError::RelocationFailed`] for relocation `r_type` at `offset` in section
    /// `tname` against symbol `sym`.
    fn failed(
        &self,
        machine: Machine,
        r_type: u32,
        tname: &str,
        offset: u64,
        sym: usize,
        why: RelocFailure,
    ) -> ModuleError {
        let symbol = match self.obj.symtab.symbol(SymbolIndex(sym)) {
            Ok(s) => {
                let n = self.obj.symbol_name(s);
                match self.obj.symtab.symbol_section(LE, s, SymbolIndex(sym)) {
                    Ok(Some(SectionIndex(i))) if n.is_empty() => self
                        .obj
                        .sections
                        .get(i)
                        .map_or("?", |sh| self.obj.section_name(sh)),
                    _ => n,
                }
            }
            Err(_) => "?",
        };
        ModuleError::RelocationFailed {
            machine: machine.e_machine(),
            r_type,
            at: SectionSymbol::new(tname, symbol),
            offset,
            why,
        }
    }

    /// The module's table, validated in place, if it has one.
    ///
    /// This makes the only shared slice into the region, over the `.ksites` section:
    /// the linker writes nothing after it, and later writes into the region (the patch
    /// engine's sites in text and slots in writable data) never touch the table, which
    /// lies in the read-only group.
    fn table(&mut self) -> Result<Option<Table<'static>>, ModuleError> {
        let Some((i, sh)) = self.obj.section_by_name(crate::format::SECTION_NAME) else {
            self.obj.check_embedded()?;
            return Ok(None);
        };
        if super::layout::from_elf(sh).group() != Some(super::layout::Group::ReadOnly) {
            return Err(ModuleError::BadTableSection);
        }
        let addr = self.section_addr(i);
        let off = addr.wrapping_sub(self.region.addr) as usize;
        let len = sh.sh_size.get(LE) as usize;
        let p = self.at(off, len)?;
        // SAFETY: `p..p + len` is the placed `.ksites` section, inside the region (`at`
        // checked it). The region outlives the `Table` (the module drops its table
        // before freeing the region; `check` drops it before freeing), and nothing
        // writes these bytes while the slice lives (see above).
        let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(p, len) };
        let text = self.text_range();
        let t = Table::parse_module(bytes, addr, core::slice::from_ref(&text), self.kernel.exec)
            .map_err(ModuleError::Table)?;
        // The module's own slots are written at load: they must be in its writable data.
        let data =
            self.region.addr + self.layout.rw as u64..self.region.addr + self.layout.meta as u64;
        for f in t.ifuncs().filter(|f| !f.imported) {
            if !(data.contains(&f.slot) && f.slot + 8 <= data.end) {
                return Err(ModuleError::Table(FormatError::BadIfuncPointer {
                    ifunc: f.index,
                    field: crate::format::IfuncField::Slot,
                    addr: f.slot,
                }));
            }
        }
        // Every import must be a kernel ifunc.
        for f in t.ifuncs().filter(|f| f.imported) {
            let known = match &self.kernel.table {
                Some(kt) => kt
                    .ifuncs()
                    .any(|k| !k.imported && k.trampoline == f.trampoline),
                None => true,
            };
            if !known {
                return Err(ModuleError::NotAKernelIfunc {
                    name: Name::new(f.name),
                    addr: f.trampoline,
                });
            }
        }
        self.report.ifuncs = t.ifuncs().filter(|f| !f.imported).count() as u32;
        self.report.imports = t.ifuncs().filter(|f| f.imported).count() as u32;
        self.report.sites = t.site_count();
        self.report.probes = t.probe_count();
        self.report.probe_sites = t.probe_site_count();
        Ok(Some(t))
    }

    fn text_range(&self) -> Range<u64> {
        self.region.addr + self.layout.text as u64..self.region.addr + self.layout.ro as u64
    }

    /// Checks every probe site holds its disabled form (read from the region, so this
    /// works for a host buffer too).
    fn check_probe_sites(&self, t: &Table<'_>) -> Result<(), ModuleError> {
        let k = self.kernel.symbols;
        let (Some(c_entry), Some(ret0), Some(ret1)) = (
            k.lookup(STUB_SYMBOLS[0]),
            k.lookup(STUB_SYMBOLS[1]),
            k.lookup(STUB_SYMBOLS[2]),
        ) else {
            return Ok(());
        };
        // The table's architecture decides the disabled form (a check on the host may
        // read another architecture's module).
        let stubs = arch::Stubs {
            c_entry,
            ret0,
            ret1,
        };
        for s in t.probe_sites() {
            let r = s.arch_ref();
            // Both forms: the disabled one is what must be there now, and the enabled
            // one must be encodable, or `probe::enable` would fail long after the load
            // (a module too far from the kernel's C entry stub).
            let (words, len) = match t.arch() {
                Arch::X86_64 => (
                    [false, true].map(|on| arch::x86_64::probe::Live::site_word(&r, on, &stubs)),
                    arch::x86_64::probe::Live::SITE_LEN,
                ),
                Arch::Aarch64 => (
                    [false, true].map(|on| arch::aarch64::probe::Live::site_word(&r, on, &stubs)),
                    arch::aarch64::probe::Live::SITE_LEN,
                ),
                Arch::Riscv64 => (
                    [false, true].map(|on| arch::riscv64::probe::Live::site_word(&r, on, &stubs)),
                    arch::riscv64::probe::Live::SITE_LEN,
                ),
            };
            let out_of_reach = |target| {
                ModuleError::Probe(ProbeError::OutOfReach {
                    site: s.addr,
                    target,
                })
            };
            words[1].map_err(out_of_reach)?;
            let want = words[0].map_err(out_of_reach)?;
            let want = &want.to_le_bytes()[..len];
            let mut found = [0u8; PROBE_SITE_LEN];
            let found = &mut found[..len];
            // The table validated the site: it lies in the module's text.
            self.read(s.addr.wrapping_sub(self.region.addr) as usize, found)?;
            if found != want {
                return Err(ModuleError::Probe(ProbeError::UnexpectedBytes {
                    site: s.addr,
                    probe: probe::ProbeId(s.probe),
                    expected: patch::InsnBytes::new(want),
                    found: patch::InsnBytes::new(found),
                }));
            }
        }
        Ok(())
    }
}

/// Steps 1–4 (lay out, resolve, relocate, validate the table) into a fresh region.
/// On success the region is returned with everything placed; on failure it is freed.
/// With `native_only`, only an object for the architecture the crate is compiled for
/// is accepted (a load); otherwise any [`Machine`] (a check).
pub(super) fn link<'k>(
    bytes: &[u8],
    kernel: &'k Kernel<'k>,
    mem: &mut dyn ModuleMemory,
    issue: &mut dyn FnMut(ModuleError),
    native_only: bool,
) -> Result<(Region, Layout, LoadReport, Option<Table<'static>>), ModuleError> {
    if kernel.exec.len() > MAX_KERNEL_EXEC {
        return Err(ModuleError::Malformed(Malformed::TooManyKernelRanges));
    }
    let obj = Object::parse(bytes, native_only)?;
    // Before resolving: an object `ksites embed` never saw names its ifunc imports as
    // undefined symbols the kernel need not export, and the cause is the missing table.
    obj.check_embedded()?;
    let layout = obj.region_layout()?;
    let region = mem
        .alloc(layout.end)
        .ok_or(ModuleError::OutOfMemory { size: layout.end })?;
    if region.size < layout.end || !region.addr.is_multiple_of(PAGE_SIZE as u64) {
        // SAFETY: the region came from `alloc` and nothing refers to it.
        unsafe { mem.free(region) };
        return Err(ModuleError::OutOfMemory { size: layout.end });
    }
    let mut l = Linker {
        obj,
        kernel,
        region: &region,
        layout,
        highs: 0,
        report: LoadReport {
            text_size: layout.ro - layout.text,
            ro_size: layout.rw - layout.ro,
            rw_size: layout.veneers - layout.rw,
            ..LoadReport::default()
        },
    };
    let first = core::cell::Cell::new(None);
    let mut note = |e: ModuleError| {
        if first.get().is_none() {
            first.set(Some(e));
        }
        issue(e);
    };
    let r = (|| {
        l.place()?;
        l.resolve(&mut note);
        l.relocate(&mut note)?;
        if let Some(e) = first.get() {
            return Err(e);
        }
        let t = l.table()?;
        if let Some(t) = &t {
            l.check_probe_sites(t)?;
        }
        Ok(t)
    })();
    let report = l.report;
    match r {
        Ok(t) => Ok((region, layout, report, t)),
        Err(e) => {
            // SAFETY: the region came from `alloc`; on an error no table came back, so
            // nothing refers to the region.
            unsafe { mem.free(region) };
            Err(e)
        }
    }
}
