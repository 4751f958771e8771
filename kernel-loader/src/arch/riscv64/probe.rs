//! riscv64 probe sites: the disabled and enabled instruction of every probe form, the
//! live-patch protocol (one store per site, one synchronisation round per batch), the
//! `ebreak` trap frame and its emulation, the dispatcher entry stubs (RISC-V psABI), and
//! how `ksites embed` rewrites a C probe call.
//!
//! The generic probe code (`crate::probe`) uses the same names as on the other
//! architectures: [`SITE_LEN`], [`SiteBytes`]/[`SiteWord`] ([`word`], [`bytes_of`]),
//! [`site_bytes`]/[`site_word`]/[`site_word_again`], [`Stubs`],
//! [`SINGLE_STORE`]/[`ROUNDS`]/[`round`]/[`RoundPiece`]/[`round_uses_new`]/[`is_residue`],
//! [`Int3Frame`] (here the `ebreak` frame), [`trap_site`]/[`trap_args`]/[`emulate`]/
//! [`call_site`], [`CPU_BASE`]/[`read_cpu_word`] (the fire path's index word), the entry
//! stubs and the `c_entry!`, `__ksites_probe_site_asm!` and
//! `__ksites_probe_section_asm!` macros.
//!
//! # Forms
//!
//! Every site is one 4-byte instruction at a 4-aligned address (`.option norvc` around
//! it), in both states:
//!
//! | kind | disabled | enabled |
//! |---|---|---|
//! | `RustJmp` (`probe!`) | `nop` | `jal x0, block` |
//! | `RustEnabled` (`probe_enabled!`) | `nop` | `jal x0, block` (sets `true`) |
//! | `CCall` (`call __dtrace_probe_*`) | `nop` | `jal ra, ksites_probe_c_entry`, or `ebreak` beyond ±1 MiB |
//! | `CTail` (`tail __dtrace_probe_*`) | `ret` | `ebreak`: fires, then returns |
//! | `CEnabled` (`call __dtraceenabled_*`) | `li a0, 0` | `li a0, 1` |
//! | `CEnabledTail` (`tail __dtraceenabled_*`) | `jal x0, ksites_probe_ret0` | `jal x0, ksites_probe_ret1`, or `ebreak` beyond ±1 MiB |
//!
//! `jal` reaches only ±1 MiB, less than a large kernel's text, so an *enabled* C form
//! whose stub is farther is `ebreak` instead, which [`emulate`] turns into exactly what
//! the branch would have done (the dispatcher fires an enabled C call or tail first):
//! slower, never wrong, never [`OutOfReach`] (enabling requires the trap route anyway).
//! A *disabled* form never traps (a kernel need not declare a trap route until it
//! enables a probe), so the one disabled form that branches, the is-enabled tail's `jal
//! x0, ksites_probe_ret0`, is [`OutOfReach`] beyond ±1 MiB: embed and the module loader
//! refuse it. A `probe!` block is in its own function, so its `jal` is out of reach only
//! in a function over 1 MiB ([`OutOfReach`]).
//!
//! # C probe calls (what `ksites embed` writes)
//!
//! gcc compiles a DTrace probe to `call __dtrace_probe_P___N` (or `tail`, or the
//! `__dtraceenabled_` versions): an 8-byte `auipc`+`jalr` pair, or after linker
//! relaxation a 4-byte `jal`. With the C extension the pair may start at a 2-aligned
//! address, but the site must be 4-aligned, so [`c_site_disabled`] lays the 8 bytes out
//! as `site; nop` (4-aligned pair) or `c.nop; site; c.nop` (pair at 2 mod 4), the site
//! being its disabled form; a 4-aligned `jal` becomes just the site (a `jal` at 2 mod 4
//! cannot hold a 4-aligned site: refused). Embed must also drop the call's relocations
//! (`R_RISCV_CALL_PLT`/`R_RISCV_JAL`, and `R_RISCV_RELAX`, so the linker does not move
//! or shorten the 8 bytes); the `jal` forms to `ksites_probe_ret0` take an
//! `R_RISCV_JAL` relocation at the site instead ([`c_stub_target`]).
//!
//! **Relaxation and C probes.** The site's 4-alignment is decided in the object; if the
//! linker relaxes *other* calls earlier in the same section (each shrinks 8 → 4 or 2
//! bytes), code after them moves by 2 and the site ends up at 2 mod 4, which the table
//! reader refuses (`ProbeSiteMisaligned`: an error at embed/verify/boot, never a torn
//! store). So C objects with probes are compiled with `-mno-relax` (or linked with
//! `--no-relax`); Rust `probe!` sites need nothing (their `.p2align 2` carries an
//! `R_RISCV_ALIGN` the linker honours when it relaxes).
//!
//! # The live-patch protocol
//!
//! RISC-V (unprivileged ISA, "Zifencei") makes a store to instruction memory visible to
//! the storing hart's fetch after its `fence.i`, and to another hart's after that hart
//! runs `fence.i`; a naturally aligned 32-bit store is single-copy atomic (RVWMO), and a
//! 4-aligned 4-byte instruction is fetched whole, so a hart sees the old or the new
//! instruction, never a mix (what Linux's riscv jump labels, `nop` ↔ `jal`, rely on;
//! the formal guarantee is the Ziccif extension, mandatory in the RVA20/RVA22/RVA23
//! profiles: an aligned instruction of up to XLEN bits is fetched atomically, so
//! concurrent modification and execution see the old or the new one).
//! So a batch is ([`SINGLE_STORE`]): check every site holds its old instruction; publish
//! the new state; one aligned 32-bit store per site, then a local `fence.i`
//! (`super::fence_i`, by the kernel's `TextPoker::write`); **one**
//! `TextPoker::sync_cores` for the batch: a `fence.i` on every hart (SBI RFENCE
//! `remote_fence_i`, or an IPI whose handler runs `fence.i`). A failed store rolls the
//! batch back with the same single round.

use core::convert::Infallible;

pub use crate::arch::RoundPiece;
use crate::arch::{LiveProtocol, ProbeKind, ProbeSiteRef};

use super::branch::{A0, C_NOP, EBREAK, NOP, RA, RET, ZERO, jal, jal_wrapping, li};

/// Length of every probe site: one 4-byte instruction.
pub const SITE_LEN: usize = 4;

/// The bytes of one probe site.
pub type SiteBytes = [u8; SITE_LEN];

/// Enabled C tail call: `ebreak` (fires, then emulates `ret`).
pub const C_TAIL_ON: SiteBytes = EBREAK.to_le_bytes();
/// Disabled C tail call: `ret`.
pub const C_TAIL_OFF: SiteBytes = RET.to_le_bytes();
/// Disabled C is-enabled call: `li a0, 0`.
pub const C_ENABLED_OFF: SiteBytes = li(A0, 0).to_le_bytes();
/// Enabled C is-enabled call: `li a0, 1`.
pub const C_ENABLED_ON: SiteBytes = li(A0, 1).to_le_bytes();

pub use crate::arch::{OutOfReach, STUB_SYMBOLS, Stubs};

/// The instruction site `s` holds in state `on`, with the given stub addresses (the
/// table in the module docs).
#[inline(always)]
pub fn site_bytes(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteBytes, OutOfReach> {
    site_word(s, on, stubs).map(bytes_of)
}

/// [`site_bytes`] as a [`SiteWord`].
#[inline(always)]
pub fn site_word(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> Result<SiteWord, OutOfReach> {
    encode(s, on, stubs, |pc, target| {
        jal(ZERO, target.wrapping_sub(pc) as i64)
            .map(|_| target.wrapping_sub(pc) as i64)
            .ok_or(OutOfReach { target })
    })
}

/// What [`site_word`] returned for the same site, state and stubs, when it returned
/// `Ok`.
#[inline(always)]
pub fn site_word_again(s: &ProbeSiteRef, on: bool, stubs: &Stubs) -> SiteWord {
    match encode::<Infallible>(s, on, stubs, |pc, t| Ok(t.wrapping_sub(pc) as i64)) {
        Ok(w) => w,
        Err(never) => match never {},
    }
}

/// The instruction of site `s` in state `on`; `off(pc, target)` checks the offset of
/// a `jal` that has no fallback (to a `probe!` block, and the disabled is-enabled tail's
/// to `ksites_probe_ret0`).
#[inline(always)]
fn encode<E>(
    s: &ProbeSiteRef,
    on: bool,
    stubs: &Stubs,
    off: impl Fn(u64, u64) -> Result<i64, E>,
) -> Result<SiteWord, E> {
    // An enabled C form's branch to a stub, or `ebreak` when the stub is out of reach
    // (enabling requires the trap route; a disabled form never traps).
    let to_stub = |link: u32, stub: u64| -> SiteWord {
        u64::from(jal(link, stub.wrapping_sub(s.addr) as i64).unwrap_or(EBREAK))
    };
    Ok(match (s.kind, on) {
        (ProbeKind::RustJmp | ProbeKind::RustEnabled | ProbeKind::CCall, false) => u64::from(NOP),
        (ProbeKind::RustJmp | ProbeKind::RustEnabled, true) => {
            u64::from(jal_wrapping(ZERO, off(s.addr, s.target)?))
        }
        (ProbeKind::CCall, true) => to_stub(RA, stubs.c_entry),
        (ProbeKind::CTail, false) => word(&C_TAIL_OFF),
        (ProbeKind::CTail, true) => word(&C_TAIL_ON),
        (ProbeKind::CEnabled, false) => word(&C_ENABLED_OFF),
        (ProbeKind::CEnabled, true) => word(&C_ENABLED_ON),
        (ProbeKind::CEnabledTail, false) => u64::from(jal_wrapping(ZERO, off(s.addr, stubs.ret0)?)),
        (ProbeKind::CEnabledTail, true) => to_stub(ZERO, stubs.ret1),
    })
}

/// Whether a batch writes each site's new instruction with one store and then
/// synchronises every hart once (true here). With it, the generic batch checks every
/// site before writing any, and [`ROUNDS`] is 1.
pub const SINGLE_STORE: bool = true;

/// Number of rounds of the live-patch protocol: one store per site, then one
/// `sync_cores` (a remote `fence.i`).
pub const ROUNDS: usize = 1;

/// What round `r` writes at a site that becomes `new`: the whole instruction, at
/// offset 0 (one aligned 32-bit store).
#[inline(always)]
pub const fn round(_r: usize, new: SiteWord) -> RoundPiece {
    RoundPiece {
        offset: 0,
        bytes: new,
        len: SITE_LEN,
    }
}

/// Whether [`round`] `r` reads its `new` argument: always.
#[inline(always)]
pub const fn round_uses_new(_r: usize) -> bool {
    true
}

/// Whether `found` is what an interrupted batch between `old` and `new` may have left:
/// only the complete new instruction (an aligned store is never torn).
#[inline(always)]
pub const fn is_residue(found: SiteWord, _old: SiteWord, new: SiteWord) -> bool {
    found == new
}

/// The single-store protocol, for the generic batch ([`LiveProtocol`]).
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

/// The instruction of a probe site, in the low 4 bytes of a word (the rest 0).
pub type SiteWord = u64;

/// Site bytes as a [`SiteWord`].
#[inline(always)]
pub const fn word(b: &SiteBytes) -> SiteWord {
    u32::from_le_bytes(*b) as u64
}

/// A [`SiteWord`]'s bytes.
#[inline(always)]
pub const fn bytes_of(w: SiteWord) -> SiteBytes {
    (w as u32).to_le_bytes()
}

/// Why [`c_site_disabled`] cannot rewrite a C probe call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CSiteError {
    /// The call is neither an 8-byte pair nor a 4-byte `jal`.
    BadLength,
    /// A 4-byte `jal` at an address that is not 4-aligned: no room for an aligned site.
    Misaligned,
    /// A `probe!` kind: those sites are not calls.
    NotACall,
    /// The disabled form's branch to `ksites_probe_ret0` does not reach it.
    OutOfReach,
}

/// What `ksites embed` writes over a C probe call ([`c_site_disabled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CSiteRewrite {
    /// The probe site's address (4-aligned): what the table records.
    pub site: u64,
    /// The bytes replacing the call (`len` of them).
    pub bytes: [u8; 8],
    /// As many as the call had.
    pub len: usize,
}

impl CSiteRewrite {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The site's offset from the call's first byte.
    pub fn site_offset(&self, call: u64) -> u64 {
        self.site - call
    }
}

/// The stub the disabled form of a C site of `kind` branches to, if any: `ret0` for
/// `CEnabledTail` (`jal x0, ksites_probe_ret0`, the one disabled form that branches).
pub const fn c_stub_target(kind: ProbeKind, stubs: &Stubs) -> Option<u64> {
    match kind {
        ProbeKind::CEnabledTail => Some(stubs.ret0),
        _ => None,
    }
}

/// How `ksites embed` rewrites the C probe call of `kind` that is `call_len` bytes long
/// (8: `auipc`+`jalr`; 4: a relaxed `jal`) at `call`: the site (4-aligned) and the
/// bytes, the site holding its disabled form (see the module docs). `stubs`: the
/// image's stubs, or `None` in a relocatable object, where the `jal` to
/// `ksites_probe_ret0` keeps offset 0 for an `R_RISCV_JAL` relocation at the site.
pub fn c_site_disabled(
    kind: ProbeKind,
    call: u64,
    call_len: usize,
    stubs: Option<&Stubs>,
) -> Result<CSiteRewrite, CSiteError> {
    if kind.is_rust() {
        return Err(CSiteError::NotACall);
    }
    let site = match (call_len, call % 4) {
        (8, 0) | (4, 0) => call,
        (8, 2) => call + 2,
        (4, 2) => return Err(CSiteError::Misaligned),
        _ => return Err(CSiteError::BadLength),
    };
    let insn = match (c_stub_target(kind, &Stubs::default_zero()), stubs) {
        (Some(_), None) => jal_wrapping(ZERO, 0),
        (Some(_), Some(st)) => {
            let r = ProbeSiteRef {
                addr: site,
                target: 0,
                kind,
            };
            site_word(&r, false, st).map_err(|_| CSiteError::OutOfReach)? as u32
        }
        (None, _) => {
            let r = ProbeSiteRef {
                addr: site,
                target: 0,
                kind,
            };
            site_word_again(&r, false, &Stubs::default_zero()) as u32
        }
    };
    let mut bytes = [0u8; 8];
    let at = (site - call) as usize;
    if at == 2 {
        bytes[..2].copy_from_slice(&C_NOP.to_le_bytes());
        bytes[6..].copy_from_slice(&C_NOP.to_le_bytes());
    } else if call_len == 8 {
        bytes[4..].copy_from_slice(&NOP.to_le_bytes());
    }
    bytes[at..at + 4].copy_from_slice(&insn.to_le_bytes());
    Ok(CSiteRewrite {
        site,
        bytes,
        len: call_len,
    })
}

/// Whether `bytes` at `call` are what [`c_site_disabled`] writes there for `kind`
/// (for `verify`/`inspect`): the padding exact, and the site's instruction its disabled
/// form for `stubs` (with `None`, any `jal x0` where the form branches to a stub).
pub fn is_c_site_disabled(kind: ProbeKind, call: u64, bytes: &[u8], stubs: Option<&Stubs>) -> bool {
    let Ok(want) = c_site_disabled(kind, call, bytes.len(), stubs) else {
        return false;
    };
    if stubs.is_none() && c_stub_target(kind, &Stubs::default_zero()).is_some() {
        let at = (want.site - call) as usize;
        let mut masked = [0u8; 8];
        masked[..bytes.len()].copy_from_slice(bytes);
        let insn = u32::from_le_bytes(masked[at..at + 4].try_into().unwrap_or([0; 4]));
        // Only the offset may differ (the linker fills it).
        if insn & 0xfff != jal_wrapping(ZERO, 0) {
            return false;
        }
        masked[at..at + 4].copy_from_slice(&jal_wrapping(ZERO, 0).to_le_bytes());
        return &masked[..bytes.len()] == want.as_slice();
    }
    bytes == want.as_slice()
}

impl Stubs {
    /// Every stub at 0 (only for forms that branch to none).
    const fn default_zero() -> Stubs {
        Stubs {
            c_entry: 0,
            ret0: 0,
            ret1: 0,
        }
    }
}

/// The registers the `ebreak` hook (`crate::probe::handle_int3`, named after x86-64's
/// `int3`) reads and may change: of these, [`emulate`] writes only `pc`, `ra` (an
/// enabled C call's, as its `jal ra` would) and `a0`, which the kernel's trap handler
/// must write back (`pc` into `sepc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Int3Frame {
    /// `sepc`: the address of the `ebreak` itself.
    pub pc: u64,
    /// `ra` (x1) of the interrupted code.
    pub ra: u64,
    /// a0 (x10): first argument and return register.
    pub a0: u64,
    /// a1.
    pub a1: u64,
    /// a2.
    pub a2: u64,
    /// a3.
    pub a3: u64,
    /// a4.
    pub a4: u64,
    /// a5.
    pub a5: u64,
}

// `struct ksites_int3_frame` in kernel-loader/c/ksites.h has this layout (64 bytes).
const _: () = assert!(core::mem::size_of::<Int3Frame>() == 64);

/// The address of the site whose `ebreak` produced `f` (`sepc` points at it).
#[inline(always)]
pub fn trap_site(f: &Int3Frame) -> u64 {
    f.pc
}

/// The first six argument registers of the trapped code (a C probe's arguments).
#[inline(always)]
pub fn trap_args(f: &Int3Frame) -> [u64; 6] {
    [f.a0, f.a1, f.a2, f.a3, f.a4, f.a5]
}

/// Makes `f` resume as if site `s` had executed its form for state `on`, except for
/// firing the probe (the caller fires an enabled C call or tail site first):
///
/// * `probe!`/`probe_enabled!`: continue after the site, or at its out-of-line block;
/// * C call: continue after the site, with `ra` = the site + 4 as the `jal ra` it
///   stands for leaves it (the call's effect is the firing);
/// * C tail: return (`pc = ra`), after firing if enabled;
/// * C is-enabled: `a0` = `on`, then continue after the site, or return for a tail.
///
/// # Safety
///
/// `f` is the live interrupted context of an `ebreak` at `s`; the kernel writes `pc`,
/// `ra` and `a0` back before `sret`.
#[inline(always)]
pub unsafe fn emulate(f: &mut Int3Frame, s: &ProbeSiteRef, on: bool) {
    let next = s.addr.wrapping_add(SITE_LEN as u64);
    match s.kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => f.pc = if on { s.target } else { next },
        ProbeKind::CCall => {
            if on {
                f.ra = next;
            }
            f.pc = next;
        }
        ProbeKind::CTail => f.pc = f.ra,
        ProbeKind::CEnabled => {
            f.a0 = u64::from(on);
            f.pc = next;
        }
        ProbeKind::CEnabledTail => {
            f.a0 = u64::from(on);
            f.pc = f.ra;
        }
    }
}

/// The address of the probe site whose enabled `jal ra` set return address `ret`.
#[inline(always)]
pub fn call_site(ret: u64) -> u64 {
    ret.wrapping_sub(SITE_LEN as u64)
}

/// The per-CPU base register the probe dispatchers read a CPU's index through
/// (`crate::probe::set_cpu_index_word`): `tp`, which a RISC-V kernel points at its
/// per-CPU (or per-task) block and a hosted thread at its TLS block. A kernel that keeps
/// something else in `tp` (the ksites test kernel keeps the index itself) uses
/// `crate::probe::set_cpu_index` instead.
pub const CPU_BASE: &str = "tp";

/// The `u32` at `offset` from the running CPU's [`CPU_BASE`]: one load, no call.
///
/// # Safety
///
/// `tp` + `offset` is a readable, 4-aligned `u32` on this CPU (the kernel or thread set
/// it up first).
#[inline(always)]
pub unsafe fn read_cpu_word(offset: isize) -> u32 {
    let v: u32;
    #[cfg(target_arch = "riscv64")]
    {
        let b: usize;
        // SAFETY: reading a register has no side effect.
        unsafe {
            core::arch::asm!("mv {}, tp", out(reg) b, options(nomem, nostack, preserves_flags))
        };
        // SAFETY: the caller's precondition: a readable, aligned u32 there.
        v = unsafe { core::ptr::read_volatile(b.wrapping_add_signed(offset) as *const u32) };
    }
    // (Compiled on every host for the build tool; only a riscv64 kernel calls it.)
    #[cfg(not(target_arch = "riscv64"))]
    {
        let _ = offset;
        v = u32::MAX;
    }
    v
}

/// Returns 0: a disabled C is-enabled tail site branches here.
#[cfg(target_arch = "riscv64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret0() -> u32 {
    core::arch::naked_asm!("li a0, 0", "ret")
}

/// Returns 1: an enabled C is-enabled tail site branches here.
#[cfg(target_arch = "riscv64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret1() -> u32 {
    core::arch::naked_asm!("li a0, 1", "ret")
}

/// Defines `pub extern "C" fn ksites_probe_c_entry()`, what an enabled C site
/// (`jal ra, ksites_probe_c_entry`) lands in: it saves the six argument registers and
/// passes them, with the return address (the site + 4), to `$fire: extern "C" fn(ret:
/// u64, args: &[u64; 6])`. The frame is 64 bytes (sp stays 16-aligned); only what the
/// replaced C call may clobber is clobbered (the psABI's caller-saved registers).
#[cfg(target_arch = "riscv64")]
macro_rules! c_entry {
    ($fire:path) => {
        /// What an enabled C site (`jal ra, ksites_probe_c_entry`) lands in: saves the
        /// six argument registers and passes them, with the return address, to the
        /// dispatcher.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ksites_probe_c_entry() {
            core::arch::naked_asm!(
                "addi sp, sp, -64",
                "sd ra, 56(sp)",
                "sd a0, 0(sp)",
                "sd a1, 8(sp)",
                "sd a2, 16(sp)",
                "sd a3, 24(sp)",
                "sd a4, 32(sp)",
                "sd a5, 40(sp)",
                "mv a0, ra",
                "mv a1, sp",
                "call {fire}",
                "ld ra, 56(sp)",
                "addi sp, sp, 64",
                "ret",
                fire = sym $fire,
            )
        }
    };
}
#[cfg(target_arch = "riscv64")]
pub(crate) use c_entry;

/// The instruction a `probe!`/`probe_enabled!` site assembles to while disabled
/// (`nop`, 4 bytes, 4-aligned), labelled `2:`, as an `asm!` template string. Hidden:
/// used by the macros.
#[cfg(target_arch = "riscv64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_site_asm {
    () => {
        ".option push\n.p2align 2\n.option norvc\n2: nop\n.option pop"
    };
}

/// The directive opening the probe site record section (`.ksites_probe_sites`), as an
/// `asm!` template string. Hidden: used by the macros.
#[cfg(target_arch = "riscv64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_section_asm {
    () => {
        ".pushsection .ksites_probe_sites,\"awR\",@progbits"
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::riscv64::branch::{jal_offset, rd};

    const STUBS: Stubs = Stubs {
        c_entry: 0x10_0000,
        ret0: 0x10_0100,
        ret1: 0x10_0108,
    };

    fn site(kind: ProbeKind, addr: u64) -> ProbeSiteRef {
        ProbeSiteRef {
            addr,
            target: addr + 0x40,
            kind,
        }
    }

    const KINDS: [ProbeKind; 6] = [
        ProbeKind::RustJmp,
        ProbeKind::RustEnabled,
        ProbeKind::CCall,
        ProbeKind::CTail,
        ProbeKind::CEnabled,
        ProbeKind::CEnabledTail,
    ];

    fn dest(w: u64, pc: u64) -> Option<(u32, u64)> {
        let w = w as u32;
        Some((rd(w), pc.checked_add_signed(jal_offset(w)?)?))
    }

    #[test]
    fn forms_go_where_the_table_says() {
        let at = |kind, on| site_word(&site(kind, 0x1000), on, &STUBS).unwrap();
        assert_eq!(at(ProbeKind::RustJmp, false), u64::from(NOP));
        assert_eq!(
            dest(at(ProbeKind::RustJmp, true), 0x1000),
            Some((0, 0x1040))
        );
        assert_eq!(
            dest(at(ProbeKind::RustEnabled, true), 0x1000),
            Some((0, 0x1040))
        );
        assert_eq!(at(ProbeKind::CCall, false), u64::from(NOP));
        assert_eq!(
            dest(at(ProbeKind::CCall, true), 0x1000),
            Some((1, STUBS.c_entry))
        );
        assert_eq!(at(ProbeKind::CTail, false), u64::from(RET));
        assert_eq!(at(ProbeKind::CTail, true), u64::from(EBREAK));
        assert_eq!(at(ProbeKind::CEnabled, false), 0x0000_0513);
        assert_eq!(at(ProbeKind::CEnabled, true), 0x0010_0513);
        assert_eq!(
            dest(at(ProbeKind::CEnabledTail, false), 0x1000),
            Some((0, STUBS.ret0))
        );
        assert_eq!(
            dest(at(ProbeKind::CEnabledTail, true), 0x1000),
            Some((0, STUBS.ret1))
        );
        for kind in KINDS {
            for on in [false, true] {
                let s = site(kind, 0x2000);
                assert_eq!(
                    site_word(&s, on, &STUBS).unwrap(),
                    site_word_again(&s, on, &STUBS)
                );
            }
        }
    }

    #[test]
    fn far_enabled_stubs_trap_and_far_blocks_are_refused() {
        let far = 0x4000_0000;
        for kind in [ProbeKind::CCall, ProbeKind::CEnabledTail] {
            let s = site(kind, far);
            assert_eq!(site_word(&s, true, &STUBS), Ok(u64::from(EBREAK)));
            assert_eq!(site_word_again(&s, true, &STUBS), u64::from(EBREAK));
        }
        // Disabled forms never trap: the far is-enabled tail is refused; the rest do not
        // branch.
        let s = site(ProbeKind::CEnabledTail, far);
        assert_eq!(
            site_word(&s, false, &STUBS),
            Err(OutOfReach { target: STUBS.ret0 })
        );
        for kind in KINDS {
            if let Ok(w) = site_word(&site(kind, far), false, &STUBS) {
                assert_ne!(w, u64::from(EBREAK), "{kind:?}");
            }
        }
        let s = ProbeSiteRef {
            addr: 0x1000,
            target: 0x1000 + (1 << 20),
            kind: ProbeKind::RustJmp,
        };
        assert_eq!(
            site_word(&s, true, &STUBS),
            Err(OutOfReach { target: s.target })
        );
        let s = ProbeSiteRef {
            target: 0x1000 + (1 << 20) - 2,
            ..s
        };
        assert!(site_word(&s, true, &STUBS).is_ok());
    }

    #[test]
    fn one_round_writes_the_whole_instruction() {
        const { assert!(SINGLE_STORE && ROUNDS == 1) };
        let new = u64::from(EBREAK);
        let p = round(0, new);
        assert_eq!((p.offset, p.bytes, p.len), (0, new, 4));
        assert!(p.is_in(new) && !p.is_in(u64::from(NOP)));
        assert!(round_uses_new(0));
        assert!(is_residue(new, u64::from(NOP), new));
        assert!(!is_residue(u64::from(NOP), u64::from(NOP), new));
    }

    #[test]
    fn emulation_resumes_where_the_form_would() {
        let regs = Int3Frame {
            pc: 0x1000,
            ra: 0x5554,
            a0: 9,
            a1: 1,
            a2: 2,
            a3: 3,
            a4: 4,
            a5: 5,
        };
        assert_eq!(trap_site(&regs), 0x1000);
        assert_eq!(trap_args(&regs), [9, 1, 2, 3, 4, 5]);
        let run = |kind, on| {
            let mut f = regs;
            // SAFETY: no memory is read by this emulation.
            unsafe { emulate(&mut f, &site(kind, 0x1000), on) };
            (f.pc, f.ra, f.a0)
        };
        assert_eq!(run(ProbeKind::RustJmp, true), (0x1040, 0x5554, 9));
        assert_eq!(run(ProbeKind::RustJmp, false), (0x1004, 0x5554, 9));
        assert_eq!(run(ProbeKind::CCall, true), (0x1004, 0x1004, 9));
        assert_eq!(run(ProbeKind::CTail, true), (0x5554, 0x5554, 9));
        assert_eq!(run(ProbeKind::CEnabled, true), (0x1004, 0x5554, 1));
        assert_eq!(run(ProbeKind::CEnabledTail, false), (0x5554, 0x5554, 0));
        assert_eq!(call_site(0x1004), 0x1000);
    }

    #[test]
    fn c_calls_are_rewritten_around_an_aligned_site() {
        let r = c_site_disabled(ProbeKind::CCall, 0x1000, 8, None).unwrap();
        assert_eq!(r.site, 0x1000);
        assert_eq!(r.as_slice(), &[0x13, 0, 0, 0, 0x13, 0, 0, 0]);
        let r = c_site_disabled(ProbeKind::CTail, 0x1002, 8, None).unwrap();
        assert_eq!((r.site, r.site_offset(0x1002)), (0x1004, 2));
        assert_eq!(r.as_slice(), &[0x01, 0, 0x67, 0x80, 0, 0, 0x01, 0]);
        let r = c_site_disabled(ProbeKind::CEnabled, 0x1000, 4, None).unwrap();
        assert_eq!(r.as_slice(), &C_ENABLED_OFF);
        assert_eq!(
            c_site_disabled(ProbeKind::CCall, 0x1002, 4, None),
            Err(CSiteError::Misaligned)
        );
        assert_eq!(
            c_site_disabled(ProbeKind::CCall, 0x1000, 6, None),
            Err(CSiteError::BadLength)
        );
        assert_eq!(
            c_site_disabled(ProbeKind::RustJmp, 0x1000, 8, None),
            Err(CSiteError::NotACall)
        );
        // The one branching disabled form: offset 0 unlinked, the stub once linked.
        let r = c_site_disabled(ProbeKind::CEnabledTail, 0x1000, 8, None).unwrap();
        assert_eq!(&r.bytes[..4], &0x0000_006fu32.to_le_bytes());
        let r = c_site_disabled(ProbeKind::CEnabledTail, 0x1000, 8, Some(&STUBS)).unwrap();
        assert_eq!(
            dest(
                u64::from(u32::from_le_bytes(r.bytes[..4].try_into().unwrap())),
                0x1000
            ),
            Some((0, STUBS.ret0))
        );
        assert!(is_c_site_disabled(
            ProbeKind::CEnabledTail,
            0x1000,
            r.as_slice(),
            None
        ));
        assert!(is_c_site_disabled(
            ProbeKind::CEnabledTail,
            0x1000,
            r.as_slice(),
            Some(&STUBS)
        ));
        let far = Stubs {
            ret0: 0x1000_0000,
            ..STUBS
        };
        assert_eq!(
            c_site_disabled(ProbeKind::CEnabledTail, 0x1000, 8, Some(&far)),
            Err(CSiteError::OutOfReach)
        );
        // Every C kind's rewrite is recognised, and a changed byte is not.
        for kind in &KINDS[2..] {
            for call in [0x2000u64, 0x2002] {
                let r = c_site_disabled(*kind, call, 8, Some(&STUBS)).unwrap();
                assert!(is_c_site_disabled(*kind, call, r.as_slice(), Some(&STUBS)));
                // The site holds the disabled form the live protocol starts from.
                let s = ProbeSiteRef {
                    addr: r.site,
                    target: 0,
                    kind: *kind,
                };
                let off = r.site_offset(call) as usize;
                assert_eq!(
                    &r.bytes[off..off + 4],
                    &site_bytes(&s, false, &STUBS).unwrap()
                );
                let mut b = r.bytes;
                b[7] ^= 0x10;
                assert!(!is_c_site_disabled(*kind, call, &b, Some(&STUBS)));
            }
        }
    }
}
