//! The GICv2 of QEMU `virt` (distributor at 0x0800_0000, CPU interface at 0x0801_0000):
//! enough for software-generated interrupts (SGIs) between CPUs.
//!
//! Without the security extensions (QEMU `virt` with `secure=off`) every interrupt is in
//! group 0 and signalled as IRQ. The SGI enables and priorities are banked per CPU, so
//! every CPU runs [`init_cpu`].

/// Distributor base.
pub const GICD_BASE: usize = 0x0800_0000;
/// CPU interface base.
pub const GICC_BASE: usize = 0x0801_0000;

const GICD_CTLR: usize = 0x000;
const GICD_ISENABLER0: usize = 0x100;
const GICD_IPRIORITYR: usize = 0x400;
const GICD_SGIR: usize = 0xf00;
const GICC_CTLR: usize = 0x000;
const GICC_PMR: usize = 0x004;
const GICC_IAR: usize = 0x00c;
const GICC_EOIR: usize = 0x010;
/// GICC_IAR's interrupt id of a spurious interrupt.
pub const SPURIOUS: u32 = 1023;
/// GICD_SGIR.TargetListFilter = 0b01: every CPU but the sender.
const SGIR_ALL_BUT_SELF: u32 = 1 << 24;

fn write(addr: usize, value: u32) {
    // SAFETY: every caller passes a GICv2 register address in the device mapping
    // (`mmu`: the first GiB is device memory); GIC registers are 32-bit.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) };
}

fn read(addr: usize) -> u32 {
    // SAFETY: as in `write`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Enables the distributor (once, on CPU 0).
pub fn init_distributor() {
    write(GICD_BASE + GICD_CTLR, 1);
}

/// On the running CPU: enables SGIs 0..15 at priority 0x80 and the CPU interface,
/// passing every priority above 0xf0.
pub fn init_cpu() {
    for i in 0..4 {
        write(GICD_BASE + GICD_IPRIORITYR + 4 * i, 0x8080_8080);
    }
    write(GICD_BASE + GICD_ISENABLER0, 0xffff);
    write(GICC_BASE + GICC_PMR, 0xf0);
    write(GICC_BASE + GICC_CTLR, 1);
}

/// Sends SGI `id` (0..15) to every CPU but the running one.
pub fn send_sgi_to_others(id: u32) {
    write(GICD_BASE + GICD_SGIR, SGIR_ALL_BUT_SELF | (id & 0xf));
}

/// Acknowledges the highest-priority pending interrupt: its GICC_IAR value (interrupt
/// id in bits 0..9, [`SPURIOUS`] if none), to hand back to [`end_of_interrupt`].
pub fn acknowledge() -> u32 {
    read(GICC_BASE + GICC_IAR)
}

/// Signals the end of the interrupt `iar` ([`acknowledge`]'s value).
pub fn end_of_interrupt(iar: u32) {
    write(GICC_BASE + GICC_EOIR, iar);
}
