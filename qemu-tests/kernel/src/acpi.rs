//! Just enough ACPI to find the CPUs: the RSDP (from PVH's `hvm_start_info.rsdp_paddr`,
//! else by scanning the EBDA and `0xe0000..0x100000` as the spec says), the RSDT or XSDT,
//! and the MADT's local APIC and local x2APIC entries. Every table's signature, length
//! and checksum is checked; everything is read through the identity mapping of the
//! first 1 GiB.

use core::fmt;

/// Most CPUs [`Cpus`] records.
pub const MAX_CPUS: usize = 16;

/// Where the RSDP came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsdpSource {
    /// `hvm_start_info.rsdp_paddr`.
    StartInfo,
    /// Found by scanning low memory.
    Scan,
}

/// The processors the MADT lists as enabled.
#[derive(Clone, Copy)]
pub struct Cpus {
    /// APIC IDs, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    /// How many of `apic_ids` are valid.
    pub count: usize,
    /// Entries beyond [`MAX_CPUS`] that were dropped.
    pub dropped: usize,
    /// The MADT's local APIC address.
    pub lapic_address: u32,
    /// Physical address of the RSDP.
    pub rsdp: u64,
    /// Where the RSDP was found.
    pub source: RsdpSource,
    /// Whether the XSDT (ACPI 2.0+) was used rather than the RSDT.
    pub xsdt: bool,
}

impl Cpus {
    /// The valid APIC IDs.
    pub fn ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

impl fmt::Debug for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cpus")
            .field("apic_ids", &self.ids())
            .field("dropped", &self.dropped)
            .field("rsdp", &self.rsdp)
            .field("source", &self.source)
            .finish()
    }
}

/// Why the CPUs could not be listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP in the start info or in low memory.
    NoRsdp,
    /// A table lies outside the identity-mapped first 1 GiB.
    Unmapped(u64),
    /// A table's checksum or length is wrong.
    BadTable(&'static str, u64),
    /// The RSDT/XSDT has no MADT.
    NoMadt,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp => write!(f, "no ACPI RSDP found"),
            AcpiError::Unmapped(a) => write!(f, "ACPI table at {a:#x} is not mapped"),
            AcpiError::BadTable(what, a) => write!(f, "ACPI {what} at {a:#x} is invalid"),
            AcpiError::NoMadt => write!(f, "no MADT (APIC) table"),
        }
    }
}

const MAPPED_END: u64 = crate::paging::IDENTITY_END;

fn read_u8(addr: u64) -> u8 {
    // SAFETY: callers check `addr` lies below MAPPED_END and off page 0 (see `check`),
    // which the kernel maps readable; firmware tables are plain RAM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes(core::array::from_fn(|i| read_u8(addr + i as u64)))
}

fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(core::array::from_fn(|i| read_u8(addr + i as u64)))
}

/// `addr .. addr + len` is readable through the kernel's mapping.
fn check(addr: u64, len: u64) -> Result<(), AcpiError> {
    let end = addr.checked_add(len).ok_or(AcpiError::Unmapped(addr))?;
    if addr < crate::paging::PAGE_SIZE || end > MAPPED_END {
        return Err(AcpiError::Unmapped(addr));
    }
    Ok(())
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read_u8(addr + i))) == 0
}

fn rsdp_at(addr: u64) -> bool {
    (0..8).all(|i| read_u8(addr + i) == b"RSD PTR "[i as usize]) && checksum_ok(addr, 20)
}

fn scan(start: u64, end: u64) -> Option<u64> {
    (start..end).step_by(16).find(|&a| rsdp_at(a))
}

/// Finds the RSDP: from the PVH start info if it names one, else by scanning.
fn find_rsdp(start_info: u64) -> Result<(u64, RsdpSource), AcpiError> {
    // hvm_start_info: magic u32, version u32, flags u32, nr_modules u32, modlist u64,
    // cmdline u64, rsdp_paddr u64 at offset 32.
    if start_info != 0 && check(start_info, 40).is_ok() {
        let rsdp = read_u64(start_info + 32);
        if rsdp != 0 && check(rsdp, 36).is_ok() && rsdp_at(rsdp) {
            return Ok((rsdp, RsdpSource::StartInfo));
        }
    }
    let ebda = u64::from(read_u8(0x40e)) | (u64::from(read_u8(0x40f)) << 8);
    let ebda = ebda << 4;
    if (0x8_0000..0xa_0000).contains(&ebda)
        && let Some(a) = scan(ebda, ebda + 1024)
    {
        return Ok((a, RsdpSource::Scan));
    }
    scan(0xe_0000, 0x10_0000)
        .map(|a| (a, RsdpSource::Scan))
        .ok_or(AcpiError::NoRsdp)
}

/// Checks the SDT header at `addr` (signature, length, checksum); returns its length.
fn sdt(addr: u64, what: &'static str) -> Result<u64, AcpiError> {
    check(addr, 36)?;
    let len = u64::from(read_u32(addr + 4));
    if len < 36 {
        return Err(AcpiError::BadTable(what, addr));
    }
    check(addr, len)?;
    if !checksum_ok(addr, len) {
        return Err(AcpiError::BadTable(what, addr));
    }
    Ok(len)
}

fn signature(addr: u64) -> [u8; 4] {
    core::array::from_fn(|i| read_u8(addr + i as u64))
}

/// Lists the CPUs from the MADT. `start_info` is PVH's `hvm_start_info` (0 if none).
pub fn cpus(start_info: u64) -> Result<Cpus, AcpiError> {
    let (rsdp, source) = find_rsdp(start_info)?;
    let revision = read_u8(rsdp + 15);
    let use_xsdt = revision >= 2 && checksum_ok(rsdp, u64::from(read_u32(rsdp + 20)).max(36));
    let (root, entry_size) = if use_xsdt && read_u64(rsdp + 24) != 0 {
        (read_u64(rsdp + 24), 8)
    } else {
        (u64::from(read_u32(rsdp + 16)), 4)
    };
    let root_len = sdt(root, if entry_size == 8 { "XSDT" } else { "RSDT" })?;
    let mut madt = None;
    for i in 0..(root_len - 36) / entry_size {
        let at = root + 36 + i * entry_size;
        let table = if entry_size == 8 {
            read_u64(at)
        } else {
            u64::from(read_u32(at))
        };
        if check(table, 36).is_ok() && signature(table) == *b"APIC" {
            madt = Some(table);
            break;
        }
    }
    let madt = madt.ok_or(AcpiError::NoMadt)?;
    let len = sdt(madt, "MADT")?;
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        dropped: 0,
        lapic_address: read_u32(madt + 36),
        rsdp,
        source,
        xsdt: entry_size == 8,
    };
    let mut at = madt + 44;
    while at + 2 <= madt + len {
        let (kind, elen) = (read_u8(at), u64::from(read_u8(at + 1)));
        if elen < 2 || at + elen > madt + len {
            return Err(AcpiError::BadTable("MADT entry", at));
        }
        let entry = match kind {
            // Processor local APIC: uid u8, apic id u8, flags u32.
            0 if elen >= 8 => Some((u32::from(read_u8(at + 3)), read_u32(at + 4))),
            // Processor local x2APIC: reserved u16, x2apic id u32, flags u32, uid u32.
            9 if elen >= 16 => Some((read_u32(at + 4), read_u32(at + 8))),
            _ => None,
        };
        // Flags: bit 0 enabled (bit 1, online capable, is a CPU that may be hot-added
        // later: not present now, so it is not started).
        if let Some((id, flags)) = entry
            && flags & 1 != 0
            && !cpus.ids().contains(&id)
        {
            if cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
                cpus.count += 1;
            } else {
                cpus.dropped += 1;
            }
        }
        at += elen;
    }
    Ok(cpus)
}
