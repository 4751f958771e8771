//! PSCI calls through `hvc` (QEMU `virt` without firmware emulates PSCI itself, with
//! the `hvc` conduit when EL2 is absent): `PSCI_VERSION`, `CPU_ON`, `SYSTEM_OFF`.

/// `PSCI_VERSION` (SMC32 function id).
const PSCI_VERSION: u64 = 0x8400_0000;
/// `CPU_ON` (SMC64 function id): x1 = target MPIDR, x2 = entry (physical), x3 = context.
const CPU_ON_64: u64 = 0xc400_0003;
/// `SYSTEM_OFF` (SMC32 function id).
const SYSTEM_OFF: u64 = 0x8400_0008;

/// PSCI's `INVALID_PARAMETERS`: `CPU_ON` for an MPIDR that names no CPU.
pub const INVALID_PARAMETERS: i64 = -2;
/// PSCI's `ALREADY_ON`.
pub const ALREADY_ON: i64 = -4;

/// One PSCI call through `hvc #0`; returns x0.
fn call(function: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: u64;
    // SAFETY: QEMU's PSCI emulation handles the `hvc` at EL1 (EL2 absent) and returns
    // to the next instruction with the result in x0; SMCCC lets x0..x17 change.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") function => ret,
            inout("x1") a1 => _,
            inout("x2") a2 => _,
            inout("x3") a3 => _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    ret as i64
}

/// The PSCI version as (major, minor).
pub fn version() -> (u16, u16) {
    let v = call(PSCI_VERSION, 0, 0, 0) as u64;
    ((v >> 16) as u16, v as u16)
}

/// Starts the CPU with affinity `mpidr` at physical address `entry` with `x0 = context`;
/// returns PSCI's status (0 = success).
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> i64 {
    call(CPU_ON_64, mpidr, entry, context)
}

/// Powers the machine off (QEMU exits with status 0); returns only if PSCI refused.
pub fn system_off() {
    call(SYSTEM_OFF, 0, 0, 0);
}
