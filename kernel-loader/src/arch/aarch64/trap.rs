//! aarch64 BRK route: how a kernel's synchronous exception handler recognises the `brk`
//! of an enabled C tail probe site and hands it to `crate::probe::handle_int3` (the
//! generic name, after x86-64's `int3`).
//!
//! Unlike x86-64's IDT gate, an exception vector is the kernel's own (VBAR_EL1, its
//! register save layout, its stack), so the loader supplies the test, the frame and the
//! write-back rule rather than a ready stub:
//!
//! 1. On a synchronous exception from EL1 with `ESR_EL1.EC` = [`ESR_EC_BRK64`] and
//!    `ESR_EL1.ISS[15:0]` = [`super::probe::BRK_IMM`] ([`is_probe_brk`]), build an
//!    [`Int3Frame`](super::probe::Int3Frame) from ELR_EL1 (`pc`), x30 (`lr`) and
//!    x0..x5 of the saved registers.
//! 2. Call `handle_int3(&mut frame)`. If it returns `true`, write `frame.pc` to
//!    ELR_EL1 and `frame.x0` to the saved x0, then `eret`. If `false`, the BRK is not a
//!    probe site's: handle it as any other BRK (a debugger's, a `BUG()`).
//!
//! `handle_int3` and the probe's handler are compiled Rust: on a target with FP/AdvSIMD
//! (`aarch64-unknown-none`) they may use the vector registers and FPCR, so the
//! exception entry must save q0-q31, FPSR and FPCR of the interrupted code (or the
//! kernel must build this path for a soft-float target); the test kernel saves them
//! (`aarch64_exceptions_preserve_fp_simd_state`).
//!
//! While patching, no CPU traps (see [`super::probe`]): only enabled C tail sites
//! `brk`, so a kernel without C tail probes never reaches this path. `probe::enable`
//! still requires `declare_int3_route` (one rule for every architecture).

/// `ESR_ELx.EC` of a BRK instruction executed in AArch64 state.
pub const ESR_EC_BRK64: u64 = 0x3c;

/// Whether `esr` (ESR_EL1 of a synchronous exception) is the `brk` of a ksites probe
/// site: EC = [`ESR_EC_BRK64`] and the comment [`super::probe::BRK_IMM`].
pub const fn is_probe_brk(esr: u64) -> bool {
    (esr >> 26) & 0x3f == ESR_EC_BRK64 && esr & 0xffff == super::probe::BRK_IMM as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_brk_is_told_from_others() {
        // ESR of `brk #0x4b53`: EC 0x3c, IL 1, ISS = the comment.
        let esr = (0x3c << 26) | (1 << 25) | 0x4b53;
        assert!(is_probe_brk(esr));
        assert!(!is_probe_brk((0x3c << 26) | (1 << 25) | 0x800));
        // Same comment, another class (an SVC #0x4b53).
        assert!(!is_probe_brk((0x15 << 26) | (1 << 25) | 0x4b53));
    }
}
