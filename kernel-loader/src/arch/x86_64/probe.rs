//! x86-64 probe sites: the disabled and enabled bytes of every probe form, the live-patch
//! (int3) protocol's rounds, the trap frame and its emulation, and the dispatcher entry
//! stubs that use the SysV calling convention.
//!
//! The generic probe code (`crate::probe`) talks to this module only through names an
//! `aarch64` or `riscv64` module defines too: [`SITE_LEN`], [`SiteBytes`]/[`SiteWord`]
//! ([`word`], [`bytes_of`]), [`site_bytes`]/[`site_word`]/[`site_word_again`], [`Stubs`],
//! [`SINGLE_STORE`]/[`ROUNDS`]/[`round`]/[`RoundPiece`]/[`round_uses_new`]/[`is_residue`], [`Int3Frame`],
//! [`trap_site`]/[`trap_args`]/[`emulate`]/[`call_site`], the entry stubs, and the
//! `c_entry!`, `__ksites_probe_site_asm!` and `__ksites_probe_section_asm!` macros.
//!
//! The enabled `probe!` fire path: the site branches to its out-of-line block, which
//! stores the six arguments on its stack and calls `ksites_probe_fire(&record, &args)`
//! (C ABI: the record in the first argument register, the array's address in the
//! second), then branches back after the site. The dispatcher reads the CPU's index with
//! [`read_cpu_word`] ([`CPU_BASE`]: `gs` (freestanding) or `fs` (hosted)), one load and no call; everything
//! else on the path is generic (`crate::probe`'s `dispatch` and `percpu`).
//!
//! This module imports nothing outside `crate::arch`: sites come as the neutral
//! [`ProbeSiteRef`].

use core::convert::Infallible;

pub use crate::arch::RoundPiece;
use crate::arch::{LiveProtocol, ProbeKind, ProbeSiteRef};

use super::branch::{CALL_REL32, JMP_REL32, NOP5, rel32};

/// Length of every probe site: one 5-byte instruction.
pub const SITE_LEN: usize = 5;

/// The bytes of one probe site.
pub type SiteBytes = [u8; SITE_LEN];

/// The one-byte trap instruction (`int3`) the live-patch protocol writes first.
const TRAP: [u8; 1] = [0xcc];

/// Disabled C tail call: `ret`, then NOPs.
pub const C_TAIL_OFF: SiteBytes = [0xc3, 0x90, 0x90, 0x90, 0x90];
/// Enabled C tail call: `int3` (fires, then emulates `ret`), then NOPs.
pub const C_TAIL_ON: SiteBytes = [0xcc, 0x90, 0x90, 0x90, 0x90];
/// Disabled is-enabled check: `mov eax, 0` (one instruction; DTrace's `xor eax,eax` +
/// NOPs is two, and a CPU stopped between them during a live toggle would resume
/// inside the new `mov`).
pub const C_ENABLED_OFF: SiteBytes = [0xb8, 0x00, 0x00, 0x00, 0x00];
/// Enabled is-enabled check: `mov eax, 1`.
pub const C_ENABLED_ON: SiteBytes = [0xb8, 0x01, 0x00, 0x00, 0x00];

pub use crate::arch::{OutOfReach, STUB_SYMBOLS, Stubs};

/// The bytes site `s` holds in state `on`, with the given stub addresses.
///
/// Every form is **one** instruction in both states, so a CPU stopped at any point of
/// the int3 protocol resumes at an instruction boundary: only the first byte (`cc`) or
/// the operand bytes change.
#[inline(always)]
pub fn site_bytes(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteBytes, OutOfReach> {
    site_word(s, on, stubs).map(bytes_of)
}

/// [`site_bytes`] as a [`SiteWord`]: built in a register, so a batch compares and
/// writes it without a buffer (bytes stored one by one and loaded back as a word stall
/// store forwarding on every site).
#[inline(always)]
pub fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteWord, OutOfReach> {
    encode(s, on, stubs, |next, target| {
        rel32(next, target).ok_or(OutOfReach { target })
    })
}

/// What [`site_word`] returned for the same site, state and stubs, when it returned
/// `Ok` (a batch's later rounds, after its check encoded every site): the branch
/// displacement is not range-checked again, so a round that uses only some of the
/// bytes computes only those.
#[inline(always)]
pub fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> SiteWord {
    let wrapped = |next: u64, target: u64| Ok(target.wrapping_sub(next) as i32);
    match encode::<Infallible>(s, on, stubs, wrapped) {
        Ok(w) => w,
        Err(never) => match never {},
    }
}

/// The bytes of site `s` in state `on`, with `rel(next, target)` for a branch's
/// displacement.
#[inline(always)]
fn encode<E>(
    s: &ProbeSiteRef,
    on: bool,
    stubs: &Stubs,
    rel: impl Fn(u64, u64) -> Result<i32, E>,
) -> Result<SiteWord, E> {
    let branch = |op: u8, target: u64| -> Result<SiteWord, E> {
        let r = rel(s.addr + SITE_LEN as u64, target)?;
        Ok(u64::from(op) | u64::from(r as u32) << 8)
    };
    Ok(match (s.kind, on) {
        (ProbeKind::RustJmp | ProbeKind::RustEnabled | ProbeKind::CCall, false) => word(&NOP5),
        (ProbeKind::RustJmp | ProbeKind::RustEnabled, true) => branch(JMP_REL32, s.target)?,
        (ProbeKind::CCall, true) => branch(CALL_REL32, stubs.c_entry)?,
        (ProbeKind::CTail, false) => word(&C_TAIL_OFF),
        (ProbeKind::CTail, true) => word(&C_TAIL_ON),
        (ProbeKind::CEnabled, false) => word(&C_ENABLED_OFF),
        (ProbeKind::CEnabled, true) => word(&C_ENABLED_ON),
        (ProbeKind::CEnabledTail, false) => branch(JMP_REL32, stubs.ret0)?,
        (ProbeKind::CEnabledTail, true) => branch(JMP_REL32, stubs.ret1)?,
    })
}

/// Whether a batch writes each site's new bytes in one store (false: x86-64 sites are
/// 5 bytes, and a CPU may run a site while it is written, so the int3 protocol traps
/// every site first; aarch64 defines it true).
pub const SINGLE_STORE: bool = false;

/// Number of rounds of the live-patch protocol. Each round writes one piece of every
/// site of a batch, then serializes every CPU.
pub const ROUNDS: usize = 3;

/// What round `r` (`0..ROUNDS`) writes at a site that becomes `new`: the offset in the
/// site, and the bytes (the low `len` bytes of the returned word). Round 0 writes
/// `int3` over byte 0 (a CPU reaching the site now traps and is emulated); round 1
/// writes the new bytes 1..5 (no CPU decodes them, byte 0 is `int3`); round 2 writes
/// the new byte 0 (a single-byte store is atomic).
#[inline(always)]
pub const fn round(r: usize, new: SiteWord) -> RoundPiece {
    match r {
        0 => RoundPiece {
            offset: 0,
            bytes: TRAP[0] as u64,
            len: 1,
        },
        1 => RoundPiece {
            offset: 1,
            bytes: new >> 8,
            len: SITE_LEN - 1,
        },
        _ => RoundPiece {
            offset: 0,
            bytes: new & 0xff,
            len: 1,
        },
    }
}

/// Whether [`round`] `r` reads its `new` argument (round 0 writes only the trap, so a
/// forward batch need not encode the new bytes for it).
#[inline(always)]
pub const fn round_uses_new(r: usize) -> bool {
    r != 0
}

/// Whether `found` is what an interrupted batch between `old` and `new` (in either
/// direction) may have left: the complete new bytes, or `int3` followed by either
/// state's tail. All are safe to rewrite with the protocol.
#[inline(always)]
pub const fn is_residue(found: SiteWord, old: SiteWord, new: SiteWord) -> bool {
    let (o, n, f) = (old, new, found);
    f == n || (f & 0xff == TRAP[0] as u64 && (f >> 8 == o >> 8 || f >> 8 == n >> 8))
}

/// The int3 protocol, for the generic batch ([`LiveProtocol`]).
#[derive(Clone, Copy, Debug)]
pub struct Live;

impl LiveProtocol for Live {
    type Stubs = Stubs;
    const SITE_LEN: usize = SITE_LEN;
    const SINGLE_STORE: bool = SINGLE_STORE;
    const ROUNDS: usize = ROUNDS;
    #[inline(always)]
    fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<u64, u64> {
        site_word(s, on, stubs).map_err(|e| e.target)
    }
    #[inline(always)]
    fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> u64 {
        site_word_again(s, on, stubs)
    }
    #[inline(always)]
    fn round(r: usize, new: u64) -> RoundPiece {
        round(r, new)
    }
    #[inline(always)]
    fn is_residue(found: u64, old: u64, new: u64) -> bool {
        is_residue(found, old, new)
    }
}

/// The bytes of a probe site, little-endian in the low [`SITE_LEN`] bytes of a word (the
/// rest 0).
pub type SiteWord = u64;

/// Site bytes as a [`SiteWord`].
#[inline(always)]
pub const fn word(b: &SiteBytes) -> SiteWord {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], 0, 0, 0])
}

/// A [`SiteWord`]'s bytes.
#[inline(always)]
pub const fn bytes_of(w: SiteWord) -> SiteBytes {
    let b = w.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4]]
}

/// The registers the #BP hook (`crate::probe::handle_int3`) reads and may change: of
/// these, [`emulate`] writes only `rip`, `rsp` and `rax`, and the emulation of an ifunc
/// site being retargeted (`super::emulate`) only `rip` and `rsp` (a `call` also pushes
/// its return address below the interrupted RSP), which the trap handler must write
/// back. `rflags` is read only (a `jcc` site's condition).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Int3Frame {
    /// RIP after the `int3` (site + 1).
    pub rip: u64,
    /// RSP of the interrupted code.
    pub rsp: u64,
    /// RAX.
    pub rax: u64,
    /// First argument register.
    pub rdi: u64,
    /// Second.
    pub rsi: u64,
    /// Third.
    pub rdx: u64,
    /// Fourth.
    pub rcx: u64,
    /// Fifth.
    pub r8: u64,
    /// Sixth.
    pub r9: u64,
    /// RFLAGS of the interrupted code (read only: a trapped `jcc` site's condition).
    pub rflags: u64,
}

// `struct ksites_int3_frame` in kernel-loader/c/ksites.h has this layout (80 bytes).
const _: () = assert!(core::mem::size_of::<Int3Frame>() == 80);

/// The address of the site whose trap instruction produced `f` (the `int3` is the
/// site's byte 0, and RIP points after it).
#[inline(always)]
pub fn trap_site(f: &Int3Frame) -> u64 {
    f.rip.wrapping_sub(1)
}

/// The six integer argument registers of the trapped code (a C probe's arguments).
#[inline(always)]
pub fn trap_args(f: &Int3Frame) -> [u64; 6] {
    [f.rdi, f.rsi, f.rdx, f.rcx, f.r8, f.r9]
}

/// Makes `f` resume as if site `s` had executed its form for state `on`, except for
/// firing the probe (the caller fires an enabled C call or tail site first):
///
/// * `probe!`/`probe_enabled!`: continue after the site, or at its out-of-line block;
/// * C call: continue after the site (the call's effect is the firing);
/// * C tail: `ret` (after firing, if enabled);
/// * C is-enabled: `eax` = `on`, then continue after the site, or `ret` for a tail.
///
/// # Safety
///
/// `f` is the live interrupted context of a trap at `s` (so for a tail site the top of
/// its stack is the return address its function was called with); the kernel writes
/// `rip`, `rsp` and `rax` back before returning from the trap.
#[inline(always)]
pub unsafe fn emulate(f: &mut Int3Frame, s: &ProbeSiteRef, on: bool) {
    let next = s.addr + SITE_LEN as u64;
    let ret = |f: &mut Int3Frame| {
        // SAFETY: the site is a tail call: the interrupted stack's top is the return
        // address its function was called with (this function's precondition).
        f.rip = unsafe { core::ptr::read(f.rsp as usize as *const u64) };
        f.rsp += 8;
    };
    match s.kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => f.rip = if on { s.target } else { next },
        ProbeKind::CCall => f.rip = next,
        ProbeKind::CTail => ret(f),
        ProbeKind::CEnabled => {
            f.rax = u64::from(on);
            f.rip = next;
        }
        ProbeKind::CEnabledTail => {
            f.rax = u64::from(on);
            ret(f);
        }
    }
}

/// The address of the probe site whose enabled `call` pushed return address `ret`.
#[inline(always)]
pub fn call_site(ret: u64) -> u64 {
    ret.wrapping_sub(SITE_LEN as u64)
}

/// Host (Linux user space): the trap frame of a `SIGTRAP`'s `ucontext_t`, and writing
/// the registers [`emulate`] may change back into it.
#[cfg(all(feature = "std", target_os = "linux", target_arch = "x86_64"))]
pub mod host {
    use super::Int3Frame;

    /// The frame of the interrupted context `uc`.
    pub fn frame(uc: &libc::ucontext_t) -> Int3Frame {
        let g = &uc.uc_mcontext.gregs;
        let r = |i: libc::c_int| g[i as usize] as u64;
        Int3Frame {
            rip: r(libc::REG_RIP),
            rsp: r(libc::REG_RSP),
            rax: r(libc::REG_RAX),
            rdi: r(libc::REG_RDI),
            rsi: r(libc::REG_RSI),
            rdx: r(libc::REG_RDX),
            rcx: r(libc::REG_RCX),
            r8: r(libc::REG_R8),
            r9: r(libc::REG_R9),
            rflags: r(libc::REG_EFL),
        }
    }

    /// Writes the registers [`super::emulate`] may change (rip, rsp, rax) back into `uc`,
    /// which `sigreturn` restores.
    pub fn write_back(f: &Int3Frame, uc: &mut libc::ucontext_t) {
        let g = &mut uc.uc_mcontext.gregs;
        g[libc::REG_RIP as usize] = f.rip as i64;
        g[libc::REG_RSP as usize] = f.rsp as i64;
        g[libc::REG_RAX as usize] = f.rax as i64;
    }
}

/// The per-CPU base register the probe dispatchers read a CPU's index through
/// (`crate::probe::set_cpu_index_word`): `gs` in a freestanding build (`target_os =
/// "none"`: a kernel's per-CPU area, as Linux's `gs:cpu_number`), `fs` in a hosted one
/// (a thread's TLS block, where a `#[thread_local]` sits at a fixed offset). Fixed at
/// build time, so the read is one instruction with no branch.
pub const CPU_BASE: &str = if cfg!(target_os = "none") { "gs" } else { "fs" };

/// The `u32` at `offset` from the running CPU's [`CPU_BASE`]: one segment-relative load,
/// no call.
///
/// # Safety
///
/// On this CPU, [`CPU_BASE`] + `offset` is a readable, 4-aligned `u32` (the kernel or
/// thread set its base up first).
#[inline(always)]
pub unsafe fn read_cpu_word(offset: isize) -> u32 {
    let v: u32;
    // SAFETY: the caller's precondition; reads 4 bytes, writes nothing.
    #[cfg(all(target_arch = "x86_64", target_os = "none"))]
    unsafe {
        core::arch::asm!(
            "mov {v:e}, dword ptr gs:[{o}]",
            v = out(reg) v,
            o = in(reg) offset,
            options(nostack, readonly, preserves_flags),
        )
    };
    // SAFETY: as above.
    #[cfg(all(target_arch = "x86_64", not(target_os = "none")))]
    unsafe {
        core::arch::asm!(
            "mov {v:e}, dword ptr fs:[{o}]",
            v = out(reg) v,
            o = in(reg) offset,
            options(nostack, readonly, preserves_flags),
        )
    };
    // (Compiled on every host for the build tool; only an x86-64 kernel calls it.)
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = offset;
        v = u32::MAX;
    }
    v
}

/// A disabled C is-enabled tail site jumps here: returns 0 for the site's function.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret0() -> u32 {
    core::arch::naked_asm!("xor eax, eax", "ret")
}

/// An enabled C is-enabled tail site jumps here: returns 1 for the site's function.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret1() -> u32 {
    core::arch::naked_asm!("mov eax, 1", "ret")
}

/// Defines `pub extern "C" fn ksites_probe_c_entry()`, what an enabled C site
/// (`call ksites_probe_c_entry`) lands in: it saves the six argument registers and
/// passes them, with the return address, to `$fire: extern "C" fn(ret: u64, args: &[u64;
/// 6])`. A macro, so the generic dispatcher names its function without this module
/// importing it.
#[cfg(target_arch = "x86_64")]
macro_rules! c_entry {
    ($fire:path) => {
        /// What an enabled C site (`call ksites_probe_c_entry`) lands in: saves the six
        /// argument registers and passes them, with the return address, to the
        /// dispatcher.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ksites_probe_c_entry() {
            core::arch::naked_asm!(
                "push rbp",
                "mov rbp, rsp",
                "sub rsp, 48",
                "mov [rsp], rdi",
                "mov [rsp + 8], rsi",
                "mov [rsp + 16], rdx",
                "mov [rsp + 24], rcx",
                "mov [rsp + 32], r8",
                "mov [rsp + 40], r9",
                "mov rdi, [rbp + 8]",
                "mov rsi, rsp",
                "call {fire}",
                "leave",
                "ret",
                fire = sym $fire,
            )
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use c_entry;

/// The instruction a `probe!`/`probe_enabled!` site assembles to while disabled (a
/// 5-byte NOP), labelled `2:`, as an `asm!` template string. Hidden: used by the macros.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_site_asm {
    () => {
        "2: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
    };
}

/// The directive opening the probe site record section (`.ksites_probe_sites`, in this
/// assembler's section-type syntax), as an `asm!` template string. Hidden: used by the
/// macros.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_section_asm {
    () => {
        ".pushsection .ksites_probe_sites,\"awR\",@progbits"
    };
}
