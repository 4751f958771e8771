//! riscv64 `ebreak` route: how a kernel's trap handler recognises the `ebreak` of a
//! probe site and hands it to `crate::probe::handle_ebreak` (which runs the generic
//! `handle_int3`, named after x86-64's `int3`).
//!
//! The trap vector (`stvec`) is the kernel's own, so the loader supplies the test, the
//! frame and the write-back rule rather than a ready stub:
//!
//! 1. On a synchronous trap from S-mode with `scause` = [`SCAUSE_BREAKPOINT`] at a
//!    4-aligned `sepc` ([`is_probe_ebreak`]; whatever the instruction there is *now*:
//!    a live batch may already have rewritten it), build an
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

/// Whether a trap with cause `scause` at `sepc` may be a probe site's `ebreak`, to be
/// handed to `crate::probe::handle_ebreak`: a breakpoint exception (not an interrupt)
/// at a 4-aligned `sepc` (every probe site is 4-aligned). `handle_ebreak` then decides
/// by the address (is `sepc` a registered probe site?) and returns `false` for any
/// other `ebreak` (a debugger's, a `BUG()`, a `c.ebreak`).
///
/// Do **not** decide by reading the instruction at `sepc`: a live batch on another hart
/// may rewrite the site between the trap and the handler (an enabled C tail site's
/// `ebreak` becomes `ret` when the probe is disabled), and the trap must still be
/// emulated — in the state the probe has now, which is what `handle_ebreak` does. (An
/// earlier version compared the instruction with `ebreak`, and the SMP stress on 4 harts
/// lost such a trap as "unexpected breakpoint" about one run in two.)
pub const fn is_probe_ebreak(scause: u64, sepc: u64) -> bool {
    scause == SCAUSE_BREAKPOINT && sepc.is_multiple_of(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_ebreak_is_told_from_others() {
        assert!(is_probe_ebreak(3, 0x8020_1000));
        // An interrupt with code 3, an ecall.
        assert!(!is_probe_ebreak((1 << 63) | 3, 0x8020_1000));
        assert!(!is_probe_ebreak(8, 0x8020_1000));
        // A breakpoint at 2 mod 4 is no probe site's.
        assert!(!is_probe_ebreak(3, 0x8020_1002));
    }
}
