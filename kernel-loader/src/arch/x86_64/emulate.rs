//! x86-64 emulation of a branch site (`call`/`jmp`/`jcc rel32`, after up to seven prefix
//! bytes) that a CPU trapped on while a live ifunc retarget rewrites it: the #BP hook
//! makes the interrupted context resume as if the branch to the ifunc's current target
//! had run.
//!
//! * `call`: push the return address (the next instruction) on the interrupted stack,
//!   continue at the target. The push writes below the interrupted RSP, which the #BP
//!   entry stub allows for (`trap`: it moves its iret frame out of the way first).
//! * `jmp`: continue at the target.
//! * `jcc`: evaluate the condition (`0f 80+cc`, the `cc` nibble) against the
//!   interrupted RFLAGS ([`jcc_taken`]): continue at the target or after the site.
//!
//! The prefixes a compiler puts before a near branch (segment overrides as hints,
//! `bnd`, `notrack`) do not change what it does in 64-bit mode, so the emulation
//! ignores them.

use super::probe::Int3Frame;
use crate::arch::{BranchSite, SiteKind};

/// RFLAGS.CF.
pub const CF: u64 = 1 << 0;
/// RFLAGS.PF.
pub const PF: u64 = 1 << 2;
/// RFLAGS.ZF.
pub const ZF: u64 = 1 << 6;
/// RFLAGS.SF.
pub const SF: u64 = 1 << 7;
/// RFLAGS.OF.
pub const OF: u64 = 1 << 11;

/// Whether `jcc` with condition `cc` (the low nibble of its opcode, `0f 80+cc`, or
/// `70+cc` for the short form) branches with flags `rflags`. Even conditions test a
/// predicate, odd ones its negation (Intel SDM vol. 2, "Jcc"):
///
/// | cc | taken if | cc | taken if |
/// |---|---|---|---|
/// | 0 `jo` | OF | 1 `jno` | !OF |
/// | 2 `jb` | CF | 3 `jae` | !CF |
/// | 4 `je` | ZF | 5 `jne` | !ZF |
/// | 6 `jbe` | CF or ZF | 7 `ja` | !(CF or ZF) |
/// | 8 `js` | SF | 9 `jns` | !SF |
/// | a `jp` | PF | b `jnp` | !PF |
/// | c `jl` | SF != OF | d `jge` | SF == OF |
/// | e `jle` | ZF or SF != OF | f `jg` | !(ZF or SF != OF) |
#[inline]
pub const fn jcc_taken(cc: u8, rflags: u64) -> bool {
    let (cf, pf, zf) = (rflags & CF != 0, rflags & PF != 0, rflags & ZF != 0);
    let (sf, of) = (rflags & SF != 0, rflags & OF != 0);
    let lt = sf != of;
    let predicate = match (cc & 0xf) >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => lt,
        _ => zf || lt,
    };
    predicate != (cc & 1 != 0)
}

/// The condition nibble of a `jcc rel32` site whose opcode byte after `0f` is `op`.
#[inline]
pub const fn jcc_condition(op: u8) -> u8 {
    op & 0xf
}

/// Address of the byte holding a `jcc` site's condition (`0f 8x`: the `8x`), which the
/// live protocol never writes (it writes byte 0 and the rel32).
#[inline]
pub const fn condition_byte(site: &BranchSite) -> u64 {
    site.addr + site.prefixes as u64 + 1
}

/// Makes `f` resume as if the branch at `site` (of kind `site.kind`; for a `jcc`, with
/// condition `cc`) had run with target `target`: see the module docs. Writes `rip`,
/// and for a `call` `rsp` and the word below the interrupted RSP.
///
/// # Safety
///
/// `f` is the live interrupted context of a trap on `site`'s first byte; for a `call`,
/// the 8 bytes below `f.rsp` are the interrupted stack's, free to be pushed to (the
/// kernel builds without a red zone, and the #BP entry keeps its own frame clear of
/// them), and the kernel writes `rip` and `rsp` back before returning from the trap.
#[inline]
pub unsafe fn emulate_branch(f: &mut Int3Frame, site: &BranchSite, cc: u8, target: u64) {
    let next = site.end();
    match site.kind {
        SiteKind::Call => {
            let sp = f.rsp.wrapping_sub(8);
            // SAFETY: the precondition: the word below the interrupted RSP is the
            // interrupted stack's, free to be pushed to (as the `call` itself would).
            unsafe { core::ptr::write_volatile(sp as usize as *mut u64, next) };
            f.rsp = sp;
            f.rip = target;
        }
        SiteKind::Jmp => f.rip = target,
        SiteKind::Jcc => {
            f.rip = if jcc_taken(cc, f.rflags) {
                target
            } else {
                next
            }
        }
    }
}

/// Makes `f` resume at `addr` (a trapped instruction whose trap is gone, to be run
/// again).
#[inline]
pub fn resume_at(f: &mut Int3Frame, addr: u64) {
    f.rip = addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag combinations of the five flags a condition reads.
    fn flag_sets() -> impl Iterator<Item = u64> {
        (0..32u64).map(|b| {
            [CF, PF, ZF, SF, OF]
                .iter()
                .enumerate()
                .filter(|(i, _)| b >> i & 1 != 0)
                .fold(0, |v, (_, f)| v | f)
        })
    }

    /// What the CPU's own `setcc` says for condition `cc` with flags `rflags` (loaded
    /// into RFLAGS with `popfq`): `setcc` uses the same conditions as `jcc`.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn cpu_says(cc: u8, rflags: u64) -> bool {
        macro_rules! setcc {
            ($insn:literal) => {{
                let r: u8;
                // SAFETY: pushes and pops one word of this function's stack (no red
                // zone is used: the asm is not `nostack`), loads RFLAGS with only
                // arithmetic flags changed (bit 1, reserved, is always set), reads one.
                unsafe {
                    core::arch::asm!(
                        "pushfq",
                        "push {f}",
                        "popfq",
                        concat!($insn, " {r}"),
                        "popfq",
                        f = in(reg) rflags | 2,
                        r = out(reg_byte) r,
                    )
                };
                r != 0
            }};
        }
        match cc {
            0x0 => setcc!("seto"),
            0x1 => setcc!("setno"),
            0x2 => setcc!("setb"),
            0x3 => setcc!("setae"),
            0x4 => setcc!("sete"),
            0x5 => setcc!("setne"),
            0x6 => setcc!("setbe"),
            0x7 => setcc!("seta"),
            0x8 => setcc!("sets"),
            0x9 => setcc!("setns"),
            0xa => setcc!("setp"),
            0xb => setcc!("setnp"),
            0xc => setcc!("setl"),
            0xd => setcc!("setge"),
            0xe => setcc!("setle"),
            _ => setcc!("setg"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn all_sixteen_conditions_match_the_cpu_for_every_flag_combination() {
        let mut taken = [0u32; 16];
        for flags in flag_sets() {
            for cc in 0..16u8 {
                let cpu = cpu_says(cc, flags);
                assert_eq!(jcc_taken(cc, flags), cpu, "cc {cc:#x}, rflags {flags:#x}");
                taken[cc as usize] += u32::from(cpu);
            }
        }
        // Each condition is taken for some combinations and not for others, and a
        // condition and its negation split them.
        for cc in (0..16).step_by(2) {
            assert!(taken[cc] > 0 && taken[cc] < 32, "cc {cc:#x}: {}", taken[cc]);
            assert_eq!(taken[cc] + taken[cc + 1], 32);
        }
    }

    #[test]
    fn call_pushes_the_return_address_jmp_and_jcc_only_move_rip() {
        let mut stack = [0u64; 4];
        let top = stack.as_mut_ptr() as u64 + 32;
        let site = |kind, prefixes| BranchSite {
            addr: 0x1000,
            kind,
            prefixes,
            len: super::super::branch::site_len(kind, prefixes) as u8,
        };
        let mut f = Int3Frame {
            rip: 0x1001,
            rsp: top,
            ..Int3Frame::default()
        };
        // SAFETY: `f.rsp` is the top of `stack`, so the push lands in `stack[3]`.
        unsafe { emulate_branch(&mut f, &site(SiteKind::Call, 2), 0, 0x5000) };
        assert_eq!((f.rip, f.rsp, stack[3]), (0x5000, top - 8, 0x1007));

        let mut f = Int3Frame {
            rip: 0x1001,
            rsp: top,
            ..Int3Frame::default()
        };
        // SAFETY: a `jmp` writes no memory.
        unsafe { emulate_branch(&mut f, &site(SiteKind::Jmp, 0), 0, 0x5000) };
        assert_eq!((f.rip, f.rsp), (0x5000, top));

        for (flags, want) in [(ZF, 0x5000), (0, 0x1007)] {
            let mut f = Int3Frame {
                rip: 0x1001,
                rsp: top,
                rflags: flags,
                ..Int3Frame::default()
            };
            // SAFETY: a `jcc` writes no memory. `3e 0f 84 rel32`: `je`.
            unsafe { emulate_branch(&mut f, &site(SiteKind::Jcc, 1), 0x4, 0x5000) };
            assert_eq!((f.rip, f.rsp), (want, top));
        }
        assert_eq!(condition_byte(&site(SiteKind::Jcc, 1)), 0x1002);
        assert_eq!(jcc_condition(0x8f), 0xf);
    }
}

/// For host tests of the emulation outside this module (which may not name registers).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A #BP frame trapped on the first byte of the site at `site`, with stack pointer
    /// `sp` and flags `rflags`.
    pub(crate) fn trapped_at(site: u64, sp: u64, rflags: u64) -> Int3Frame {
        Int3Frame {
            rip: site + 1,
            rsp: sp,
            rflags,
            ..Int3Frame::default()
        }
    }

    /// Where `f` resumes, and its stack pointer.
    pub(crate) fn resumes(f: &Int3Frame) -> (u64, u64) {
        (f.rip, f.rsp)
    }

    /// What the CPU's `setcc` says for condition `cc` with flags `rflags`.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn cpu_condition(cc: u8, rflags: u64) -> bool {
        super::tests::cpu_says(cc, rflags)
    }

    /// The flags a real `cmp a, b` leaves.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn flags_of_cmp(a: u64, b: u64) -> u64 {
        let f: u64;
        // SAFETY: compares two registers and reads the flags with a push and a pop of
        // this function's stack.
        unsafe {
            core::arch::asm!(
                "cmp {a}, {b}",
                "pushfq",
                "pop {f}",
                a = in(reg) a,
                b = in(reg) b,
                f = out(reg) f,
            )
        };
        f
    }
}

/// Real code for a host test that runs ifunc sites while a retarget has them trapped
/// (`crate::ifunc`'s tests): two implementations, a trampoline through a slot, and
/// three functions holding a site each (a `call`, a prefixed `jmp` tail call, a
/// doubly prefixed `jb`).
#[cfg(all(test, feature = "std", target_os = "linux", target_arch = "x86_64"))]
pub(crate) mod live_code {
    core::arch::global_asm!(
        ".pushsection .text.ksites_rt_live,\"ax\",@progbits",
        ".p2align 4",
        "ksites_rt_code_start:",
        "ksites_rt_a:",
        "mov eax, 1",
        "ret",
        ".p2align 4",
        "ksites_rt_b:",
        "mov eax, 2",
        "ret",
        ".p2align 4",
        "ksites_rt_tramp:",
        "jmp qword ptr [rip + ksites_rt_slot]",
        "int3",
        "int3",
        ".p2align 4",
        // `fn() -> u32`: calls the ifunc.
        "ksites_rt_call_fn:",
        "push rbx",
        "ksites_rt_call_site:",
        ".byte 0xe8",
        ".long ksites_rt_tramp - (. + 4)",
        "pop rbx",
        "ret",
        ".p2align 4",
        // `fn() -> u32`: tail-calls it (`cs jmp`).
        "ksites_rt_jmp_fn:",
        "ksites_rt_jmp_site:",
        ".byte 0x2e, 0xe9",
        ".long ksites_rt_tramp - (. + 4)",
        ".p2align 4",
        // `fn(a: u64, b: u64) -> u32`: tail-calls it if `a < b` (`ds cs jb`), else 7.
        "ksites_rt_jcc_fn:",
        "cmp rdi, rsi",
        "ksites_rt_jcc_site:",
        ".byte 0x3e, 0x2e, 0x0f, 0x82",
        ".long ksites_rt_tramp - (. + 4)",
        "mov eax, 7",
        "ret",
        "ksites_rt_code_end:",
        ".popsection",
        ".pushsection .data.ksites_rt_live,\"aw\",@progbits",
        ".p2align 3",
        "ksites_rt_slot:",
        ".quad ksites_rt_a",
        ".popsection",
        ".globl ksites_rt_code_start, ksites_rt_code_end, ksites_rt_a, ksites_rt_b",
        ".globl ksites_rt_tramp, ksites_rt_slot, ksites_rt_call_fn, ksites_rt_call_site",
        ".globl ksites_rt_jmp_fn, ksites_rt_jmp_site, ksites_rt_jcc_fn, ksites_rt_jcc_site",
    );

    unsafe extern "C" {
        fn ksites_rt_code_start();
        fn ksites_rt_code_end();
        fn ksites_rt_a();
        fn ksites_rt_b();
        fn ksites_rt_tramp();
        static ksites_rt_slot: u64;
        fn ksites_rt_call_fn() -> u32;
        fn ksites_rt_call_site();
        fn ksites_rt_jmp_fn() -> u32;
        fn ksites_rt_jmp_site();
        fn ksites_rt_jcc_fn(a: u64, b: u64) -> u32;
        fn ksites_rt_jcc_site();
    }

    /// The code's addresses, and callers of its three functions.
    pub(crate) struct LiveCode {
        pub(crate) code: core::ops::Range<u64>,
        /// The implementations: return 1 and 2.
        pub(crate) a: u64,
        pub(crate) b: u64,
        pub(crate) trampoline: u64,
        pub(crate) slot: u64,
        /// (address, prefix count) of the `call`, `jmp` and `jcc` sites.
        pub(crate) call_site: (u64, u8),
        pub(crate) jmp_site: (u64, u8),
        pub(crate) jcc_site: (u64, u8),
    }

    pub(crate) fn code() -> LiveCode {
        let a = |f: unsafe extern "C" fn()| f as *const () as u64;
        LiveCode {
            code: a(ksites_rt_code_start)..a(ksites_rt_code_end),
            a: a(ksites_rt_a),
            b: a(ksites_rt_b),
            trampoline: a(ksites_rt_tramp),
            slot: (&raw const ksites_rt_slot) as u64,
            call_site: (a(ksites_rt_call_site), 0),
            jmp_site: (a(ksites_rt_jmp_site), 1),
            jcc_site: (a(ksites_rt_jcc_site), 2),
        }
    }

    /// Runs the three functions: the `call`'s result, the `jmp`'s, and the `jcc`'s with
    /// `a < b` and with `a > b`.
    pub(crate) fn run() -> [u32; 4] {
        // SAFETY: the functions above, with the signatures they are declared with; the
        // sites they hold branch to an implementation (or are emulated into one).
        unsafe {
            [
                ksites_rt_call_fn(),
                ksites_rt_jmp_fn(),
                ksites_rt_jcc_fn(1, 2),
                ksites_rt_jcc_fn(2, 1),
            ]
        }
    }
}
