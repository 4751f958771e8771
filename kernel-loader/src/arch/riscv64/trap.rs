//! riscv64 `ebreak` route: how a kernel's trap handler recognises the `ebreak` of a
//! probe site and hands it to `crate::probe::handle_ebreak` (which runs the generic
//! `handle_int3`, named after x86-64's `int3`).
//!
//! The trap vector (`stvec`) is the kernel's own, so the loader supplies the test, the
//! frame and the write-back rule rather than a ready stub:
//!
//! 1. On a synchronous trap from S-mode with `scause` = [`SCAUSE_BREAKPOINT`] whose
//!    instruction at `sepc` is the 4-byte `ebreak` ([`is_probe_ebreak`]), build an
//!    [`Int3Frame`](super::probe::Int3Frame) from `sepc` (`pc`), `ra` and `a0`..`a5` of
//!    the saved registers.
//! 2. Call `handle_ebreak(&mut frame)`. If it returns `true`, write `frame.pc` to
//!    `sepc`, and `frame.ra` and `frame.a0` to the saved `ra` and `a0`, then `sret`. If
//!    `false`, the `ebreak` is not a probe site's (a debugger's, a `BUG()`): handle it
//!    as any other.
//!
//! `sepc` of a breakpoint is the `ebreak` itself (not the next instruction), which is
//! what [`super::probe::trap_site`] expects. Which sites trap: an enabled C tail site,
//! and a C call / is-enabled tail site whose stub is out of a `jal`'s ±1 MiB (see
//! [`super::probe`]); patching itself never makes a hart trap.
//!
//! `handle_ebreak` and the probe handlers are compiled Rust: on `riscv64gc` they may
//! use the F/D registers, so the trap entry must save `f0`-`f31` and `fcsr` of the
//! interrupted code when `sstatus.FS` is on (or the kernel builds this path soft-float).

/// `scause` of a breakpoint (`ebreak`) exception.
pub const SCAUSE_BREAKPOINT: u64 = 3;

/// Whether a trap with cause `scause` at an instruction whose first 4 bytes are `insn`
/// (read at `sepc`) is a probe site's `ebreak`: a breakpoint exception (not an
/// interrupt) on the 4-byte `ebreak` (a `c.ebreak` is never a probe site's).
pub const fn is_probe_ebreak(scause: u64, insn: u32) -> bool {
    scause == SCAUSE_BREAKPOINT && insn == super::branch::EBREAK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_ebreak_is_told_from_others() {
        assert!(is_probe_ebreak(3, 0x0010_0073));
        // c.ebreak (0x9002) in the low half, an interrupt with code 3, an ecall.
        assert!(!is_probe_ebreak(3, 0x0000_9002));
        assert!(!is_probe_ebreak((1 << 63) | 3, 0x0010_0073));
        assert!(!is_probe_ebreak(8, 0x0000_0073));
    }
}
