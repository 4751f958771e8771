//! riscv64 `ebreak` route: how a kernel's trap handler recognises the `ebreak` of a
//! probe site and hands it to `crate::probe::handle_ebreak` (which runs the generic
//! `handle_int3`, named after x86-64's `int3`).
//!
//! The trap vector (`stvec`) is the kernel's own, so the loader supplies the test, the
//! frame and the write-back rule rather than a ready stub:
//!
//! 1. On a synchronous trap from S-mode with `scause` = [`SCAUSE_BREAKPOINT`] whose
//!    instruction at a 4-aligned `sepc` is the 4-byte `ebreak` ([`is_probe_ebreak`];
//!    read the 32 bits at `sepc` only when it is 4-aligned: it is 2-aligned in general), build an
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

/// Whether a trap with cause `scause` at `sepc`, where the instruction's first 4 bytes
/// are `insn`, is a probe site's `ebreak`: a breakpoint exception (not an interrupt) on
/// the 4-byte `ebreak` at a 4-aligned `sepc` (every probe site is 4-aligned; a
/// `c.ebreak` is never a probe site's).
///
/// `sepc` is only 2-aligned in general (compressed code), so the caller reads `insn`
/// as a 32-bit load only when `sepc % 4 == 0` (else as two 16-bit halves, or passes 0:
/// this returns `false` for a `sepc` that is not 4-aligned whatever `insn` is).
pub const fn is_probe_ebreak(scause: u64, sepc: u64, insn: u32) -> bool {
    scause == SCAUSE_BREAKPOINT && sepc.is_multiple_of(4) && insn == super::branch::EBREAK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_ebreak_is_told_from_others() {
        assert!(is_probe_ebreak(3, 0x8020_1000, 0x0010_0073));
        // c.ebreak (0x9002) in the low half, an interrupt with code 3, an ecall.
        assert!(!is_probe_ebreak(3, 0x8020_1000, 0x0000_9002));
        assert!(!is_probe_ebreak((1 << 63) | 3, 0x8020_1000, 0x0010_0073));
        assert!(!is_probe_ebreak(8, 0x8020_1000, 0x0000_0073));
        // An `ebreak` at 2 mod 4 is no probe site's (and not 32-bit readable there).
        assert!(!is_probe_ebreak(3, 0x8020_1002, 0x0010_0073));
    }
}
