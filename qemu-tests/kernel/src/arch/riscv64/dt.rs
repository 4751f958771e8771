//! What the device tree OpenSBI passes in `a1` says about the machine, read once on CPU
//! 0 with the `fdt` crate ([`init`]): the harts (their ids, in the tree's order), the
//! timer's frequency, the RAM, and each hart's `riscv,isa` string (S-mode cannot read
//! `misa`: the tree is where the ISA extensions are named).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use fdt::Fdt;

use super::smp::MAX_CPUS;

/// Bytes of the `riscv,isa` string kept.
pub const ISA_CAPACITY: usize = 256;

/// The machine, as the device tree describes it.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// The device tree's physical address.
    pub dtb: u64,
    /// Its size in bytes.
    pub dtb_size: usize,
    /// Hart ids of the `cpu` nodes whose `status` is not "disabled" (at most
    /// [`MAX_CPUS`]).
    pub harts: [usize; MAX_CPUS],
    /// How many of `harts` are valid.
    pub hart_count: usize,
    /// `timebase-frequency`: ticks of the `time` CSR per second.
    pub timebase: u64,
    /// The first memory region: (base, size).
    pub memory: (u64, u64),
    isa: [u8; ISA_CAPACITY],
    isa_len: usize,
    /// Whether every hart's `riscv,isa` equals the first one's.
    pub isa_uniform: bool,
}

impl Machine {
    /// The first hart's `riscv,isa` string (cut at [`ISA_CAPACITY`] bytes).
    pub fn isa(&self) -> &str {
        core::str::from_utf8(&self.isa[..self.isa_len]).unwrap_or("?")
    }

    /// Whether the `riscv,isa` string names extension `name`: a single letter in the
    /// base part (after `rv64`, before the first `_`), a longer name as a `_`-separated
    /// part. A plain reading of the string, independent of the loader's parser.
    pub fn has_extension(&self, name: &str) -> bool {
        let mut parts = self.isa().split('_');
        let base = parts.next().unwrap_or("").trim_start_matches("rv64");
        if name.len() == 1 {
            return base.contains(name);
        }
        parts.any(|p| p == name)
    }

    /// The hart ids.
    pub fn harts(&self) -> &[usize] {
        &self.harts[..self.hart_count]
    }
}

struct Once(UnsafeCell<Option<Machine>>);
// SAFETY: written once by `init` on CPU 0 before any other hart starts; read-only after.
unsafe impl Sync for Once {}
static MACHINE: Once = Once(UnsafeCell::new(None));
static READY: AtomicBool = AtomicBool::new(false);

/// Reads the device tree at `dtb`. Call once, on CPU 0, before the other harts start.
///
/// # Safety
///
/// `dtb` is the device tree OpenSBI passed (mapped, or paging off), which nothing
/// changes.
pub unsafe fn init(dtb: u64) -> Result<Machine, &'static str> {
    // SAFETY: the caller's contract.
    let fdt = unsafe { Fdt::from_ptr(dtb as *const u8) }.map_err(|_| "not a device tree")?;
    let mut m = Machine {
        dtb,
        dtb_size: fdt.total_size(),
        harts: [0; MAX_CPUS],
        hart_count: 0,
        timebase: 0,
        memory: (0, 0),
        isa: [0; ISA_CAPACITY],
        isa_len: 0,
        isa_uniform: true,
    };
    let cpus = fdt.find_node("/cpus").ok_or("no /cpus node")?;
    let mut timebase = cpus
        .property("timebase-frequency")
        .and_then(|p| p.as_usize());
    for node in cpus.children() {
        if node.property("device_type").and_then(|p| p.as_str()) != Some("cpu") {
            continue;
        }
        if node.property("status").and_then(|p| p.as_str()) == Some("disabled") {
            continue;
        }
        let id = node
            .reg()
            .and_then(|mut r| r.next())
            .map(|r| r.starting_address as usize)
            .ok_or("a cpu node without reg")?;
        if m.hart_count < MAX_CPUS {
            m.harts[m.hart_count] = id;
            m.hart_count += 1;
        }
        if timebase.is_none() {
            timebase = node
                .property("timebase-frequency")
                .and_then(|p| p.as_usize());
        }
        let isa = node
            .property("riscv,isa")
            .and_then(|p| p.as_str())
            .unwrap_or("");
        if m.isa_len == 0 && !isa.is_empty() {
            let n = isa.len().min(ISA_CAPACITY);
            m.isa[..n].copy_from_slice(&isa.as_bytes()[..n]);
            m.isa_len = n;
        } else if isa.as_bytes() != &m.isa[..m.isa_len] {
            m.isa_uniform = false;
        }
    }
    if m.hart_count == 0 {
        return Err("no cpu nodes");
    }
    m.timebase = timebase.ok_or("no timebase-frequency")? as u64;
    if let Some(r) = fdt.memory().regions().next() {
        m.memory = (r.starting_address as u64, r.size.unwrap_or(0) as u64);
    }
    // SAFETY: the only write (see `Once`).
    unsafe { *MACHINE.0.get() = Some(m) };
    READY.store(true, Ordering::Release);
    Ok(m)
}

/// The machine [`init`] read, if it did.
pub fn machine() -> Option<Machine> {
    if !READY.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: written once before READY was set; never again.
    unsafe { *MACHINE.0.get() }
}
