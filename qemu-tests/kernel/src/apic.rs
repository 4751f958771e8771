//! The local APIC in xAPIC mode (memory-mapped at `IA32_APIC_BASE`, inside the uncached
//! 3–4 GiB hole [`crate::paging`] maps), and a PIT-based busy delay for the
//! INIT-SIPI-SIPI timing.
//!
//! Only what SMP bring-up and cross-CPU serialization need: the APIC ID, software
//! enable with a spurious vector, EOI, and sending fixed, INIT and STARTUP IPIs to one
//! CPU by APIC ID (physical destination mode).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{self, inb, outb};

/// `IA32_APIC_BASE`.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// `IA32_APIC_BASE`: the APIC is globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// `IA32_APIC_BASE`: x2APIC mode (this kernel uses xAPIC MMIO and refuses it).
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// `IA32_APIC_BASE`: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// ICR: delivery status (send pending).
const ICR_PENDING: u32 = 1 << 12;
/// ICR: level assert.
const ICR_ASSERT: u32 = 1 << 14;
/// ICR: level triggered.
const ICR_LEVEL: u32 = 1 << 15;
/// ICR delivery modes.
const ICR_FIXED: u32 = 0 << 8;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;

/// The spurious-interrupt vector (its handler must not send an EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

static BASE: AtomicU64 = AtomicU64::new(0);

/// Physical (= virtual, identity mapped) base of the local APIC's registers, from
/// `IA32_APIC_BASE`.
pub fn base() -> u64 {
    match BASE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (x86-64 has one).
            let b = unsafe { cpu::rdmsr(MSR_APIC_BASE) } & 0x000f_ffff_ffff_f000;
            BASE.store(b, Ordering::Relaxed);
            b
        }
        b => b,
    }
}

fn read(reg: u64) -> u32 {
    // SAFETY: `base()` is the local APIC's MMIO page, mapped uncached (paging::init
    // maps 3–4 GiB as device memory); register reads have no side effects.
    unsafe { core::ptr::read_volatile((base() + reg) as *const u32) }
}

fn write(reg: u64, v: u32) {
    // SAFETY: as in `read`; the callers write only registers whose effect they own.
    unsafe { core::ptr::write_volatile((base() + reg) as *mut u32, v) }
}

/// Checks this CPU's APIC is globally enabled and in xAPIC mode. Returns the MSR value.
pub fn check_mode() -> Result<u64, &'static str> {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let msr = unsafe { cpu::rdmsr(MSR_APIC_BASE) };
    if msr & APIC_BASE_ENABLE == 0 {
        return Err("local APIC globally disabled (IA32_APIC_BASE.EN = 0)");
    }
    if msr & APIC_BASE_X2APIC != 0 {
        return Err("local APIC in x2APIC mode; this kernel drives the xAPIC (MMIO)");
    }
    let page = msr & 0x000f_ffff_ffff_f000;
    if !(crate::paging::MMIO_START..1 << 32).contains(&page) {
        return Err("local APIC base outside the mapped 3-4 GiB hole");
    }
    Ok(msr)
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Software-enables this CPU's local APIC (spurious vector [`SPURIOUS_VECTOR`]), accepts
/// every priority (TPR 0) and clears the error status. LVT entries keep their reset
/// state (masked on an AP; the firmware's setup on the boot CPU).
pub fn enable() {
    write(REG_TPR, 0);
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_ESR, 0);
    write(REG_ESR, 0);
}

/// Arms this CPU's APIC timer to raise `vector` once after `ticks` timer ticks (divide
/// by 1: bus clock ticks; QEMU's is 1 GHz). 0 disarms it.
pub fn timer_oneshot(vector: u8, ticks: u32) {
    write(REG_TIMER_DIVIDE, 0b1011);
    write(REG_LVT_TIMER, u32::from(vector));
    write(REG_TIMER_INITIAL, ticks);
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Waits (bounded) until the previous IPI left the ICR.
fn wait_icr_idle() -> bool {
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_PENDING == 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn send(apic_id: u32, low: u32) -> Result<(), &'static str> {
    if !wait_icr_idle() {
        return Err("local APIC ICR stuck busy");
    }
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, low);
    if !wait_icr_idle() {
        return Err("IPI not delivered (ICR stuck busy)");
    }
    Ok(())
}

/// Sends fixed interrupt `vector` to the CPU with APIC ID `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) -> Result<(), &'static str> {
    send(apic_id, ICR_FIXED | ICR_ASSERT | u32::from(vector))
}

/// INIT IPI to `apic_id` (level assert, then de-assert, as the MP spec asks).
pub fn send_init(apic_id: u32) -> Result<(), &'static str> {
    write(REG_ESR, 0);
    send(apic_id, ICR_INIT | ICR_LEVEL | ICR_ASSERT)?;
    delay_us(10_000);
    send(apic_id, ICR_INIT | ICR_LEVEL)
}

/// STARTUP IPI to `apic_id`: the AP starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) -> Result<(), &'static str> {
    write(REG_ESR, 0);
    send(apic_id, ICR_STARTUP | u32::from(page))
}

const PIT_HZ: u64 = 1_193_182;
const PIT_CH2_DATA: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
const PORT_B: u16 = 0x61;

/// Busy-waits at least `us` microseconds, timed by PIT channel 2 (one-shot, polled
/// through port 0x61 bit 5; the speaker stays off). Only the boot CPU may call it.
pub fn delay_us(us: u64) {
    let mut left = us;
    while left > 0 {
        let chunk = left.min(50_000);
        left -= chunk;
        let count = (chunk * PIT_HZ / 1_000_000).clamp(1, 0xffff) as u16;
        // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and its gate; nothing
        // else in this kernel uses them, and the speaker output bit (1) stays clear.
        unsafe {
            let b = inb(PORT_B);
            outb(PORT_B, (b & !0x02) | 0x01); // gate on, speaker off
            outb(PIT_COMMAND, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
            outb(PIT_CH2_DATA, count as u8);
            outb(PIT_CH2_DATA, (count >> 8) as u8);
            // Mode 0: OUT goes high when the count reaches 0. Bounded, in case no PIT.
            for _ in 0..50_000_000u64 {
                if inb(PORT_B) & 0x20 != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            outb(PORT_B, inb(PORT_B) & !0x03);
        }
    }
}
