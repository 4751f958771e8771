//! Host mode (feature `std`, Linux x86-64): patching a normal process's own text.
//!
//! A host binary linked non-PIE (`-C relocation-model=static`) with `--emit-relocs` and
//! processed by `ksites embed` can patch itself at start, exactly as a kernel does at
//! boot, so the whole pipeline (build, embed, patch, call, toggle probes) runs natively:
//!
//! ```ignore
//! let exec = kernel_loader::host::exec_ranges();
//! // SAFETY: the binary was processed by `ksites embed`; its table is mapped read-only.
//! let table = unsafe { kernel_loader::cell::image_table(&exec) }?;
//! let mut poker = kernel_loader::host::HostPoker::new();
//! // SAFETY: called once, before other threads run the patched code.
//! unsafe { kernel_loader::patch::init(&table, &exec, &CpuFeatures::detect(), &mut poker) }?;
//! ```
//!
//! * [`exec_ranges`]: the executable `PT_LOAD` segments of the main program
//!   (`dl_iterate_phdr`).
//! * [`HostPoker`]: `begin` makes those segments writable (`mprotect` to R+W+X, so code
//!   sharing a page with a site keeps running), `write` stores, `sync_cores` runs
//!   `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` so every thread of the process executes a
//!   core-serializing instruction (a local `cpuid` where the kernel lacks it), and `end`
//!   restores the segments' original protection.
//! * [`install_int3_handler`]: a `SIGTRAP` handler that forwards to
//!   [`crate::probe::handle_int3`], so probes can be toggled while other threads run
//!   their sites (the int3 protocol's trap path, as a kernel's #BP hook does). Probe
//!   handlers may then run in signal context, so they must be async-signal-safe.

use core::ops::Range;
use std::vec::Vec;

use crate::arch::native::probe as probe_arch;
use crate::patch::{PokeError, PokeFailure, TextPoker};

/// One executable segment of the main program: its exact range and its `PROT_*` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    start: u64,
    end: u64,
    prot: i32,
}

struct Collect {
    segments: Vec<Segment>,
    first: bool,
}

unsafe extern "C" fn collect_main(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Collect` passed to `dl_iterate_phdr` in `segments`,
    // which calls this function synchronously.
    let c = unsafe { &mut *data.cast::<Collect>() };
    if !c.first {
        return 1; // only the main program, which is always reported first
    }
    c.first = false;
    // SAFETY: `info` is valid for the duration of the callback (dl_iterate_phdr's
    // contract).
    let info = unsafe { &*info };
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers of a loaded object.
    let phdrs = unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    for p in phdrs {
        if p.p_type != libc::PT_LOAD || p.p_flags & libc::PF_X == 0 || p.p_memsz == 0 {
            continue;
        }
        let start = info.dlpi_addr + p.p_vaddr;
        let mut prot = libc::PROT_EXEC;
        if p.p_flags & libc::PF_R != 0 {
            prot |= libc::PROT_READ;
        }
        if p.p_flags & libc::PF_W != 0 {
            prot |= libc::PROT_WRITE;
        }
        c.segments.push(Segment {
            start,
            end: start + p.p_memsz,
            prot,
        });
    }
    1
}

/// The main program's executable `PT_LOAD` segments, sorted.
fn segments() -> Vec<Segment> {
    let mut c = Collect {
        segments: Vec::new(),
        first: true,
    };
    // SAFETY: the callback only touches `c`, through the pointer, synchronously.
    unsafe { libc::dl_iterate_phdr(Some(collect_main), (&raw mut c).cast()) };
    c.segments.sort_by_key(|s| s.start);
    c.segments
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// The executable ranges of the main program: its `PT_LOAD` segments with `PF_X`
/// (exact, not page-rounded), sorted. This is what [`crate::cell::image_table`] and
/// [`crate::patch::init`] validate sites against.
pub fn exec_ranges() -> Vec<Range<u64>> {
    segments().iter().map(|s| s.start..s.end).collect()
}

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) by value and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    }
}

/// Registers the process for `membarrier` core serialization; `true` if it can be used.
fn register_sync_core() -> bool {
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    supported >= 0
        && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE != 0
        && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) == 0
}

/// A [`TextPoker`] for the running process: `mprotect` around each batch.
#[derive(Debug)]
pub struct HostPoker {
    segments: Vec<Segment>,
    sync_core: bool,
    /// Number of `sync_cores` calls so far.
    pub syncs: u64,
    /// Number of `write` calls so far.
    pub writes: u64,
}

impl HostPoker {
    /// A poker for the main program's executable segments. Registers the process for
    /// `membarrier` core serialization when the kernel offers it.
    pub fn new() -> HostPoker {
        let page = page_size();
        let segments = segments()
            .into_iter()
            .map(|s| Segment {
                start: s.start & !(page - 1),
                end: s.end.div_ceil(page) * page,
                prot: s.prot,
            })
            .collect();
        HostPoker {
            segments,
            sync_core: register_sync_core(),
            syncs: 0,
            writes: 0,
        }
    }

    /// Whether `sync_cores` serializes every thread (`membarrier`) rather than only the
    /// calling one.
    pub fn serializes_all_threads(&self) -> bool {
        self.sync_core
    }

    fn protect(&self, writable: bool) -> Result<(), PokeError> {
        for s in &self.segments {
            let prot = if writable {
                s.prot | libc::PROT_READ | libc::PROT_WRITE
            } else {
                s.prot
            };
            // SAFETY: the range is a page-aligned executable segment of this program, so
            // it is mapped; adding PROT_WRITE (keeping EXEC) does not unmap running code.
            let r = unsafe {
                libc::mprotect(
                    s.start as usize as *mut libc::c_void,
                    (s.end - s.start) as usize,
                    prot,
                )
            };
            if r != 0 {
                return Err(PokeError::new(s.start, PokeFailure::Protect));
            }
        }
        Ok(())
    }

    #[inline]
    fn contains(&self, addr: u64, len: usize) -> bool {
        self.segments
            .iter()
            .any(|s| addr >= s.start && addr.checked_add(len as u64).is_some_and(|e| e <= s.end))
    }
}

impl Default for HostPoker {
    fn default() -> Self {
        HostPoker::new()
    }
}

impl TextPoker for HostPoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.protect(true)
    }

    #[inline]
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if !self.contains(addr, bytes.len()) {
            return Err(PokeError::new(addr, PokeFailure::NotText));
        }
        // SAFETY: inside an executable segment made writable by `begin`; the engine
        // only writes inside validated sites (the caller's contract).
        unsafe { store_text(addr, bytes) };
        self.writes += 1;
        Ok(())
    }

    #[inline]
    unsafe fn read_word(&self, addr: u64, len: usize) -> u64 {
        // SAFETY: forwarded; this poker's text is readable at its own address.
        unsafe { crate::patch::read_text_word(addr, len) }
    }

    fn sync_cores(&mut self) {
        self.syncs += 1;
        if !self.sync_core || membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) != 0 {
            // Only this thread: a serializing instruction.
            let _ = crate::arch::x86_64::cpuid(0, 0);
        }
    }

    fn end(&mut self) {
        // Nothing sensible to do on failure but report it loudly: text stays writable.
        if let Err(e) = self.protect(false) {
            std::eprintln!("ksites host poker: cannot make text read-only again: {e}");
        }
    }
}

/// Stores `bytes` at `addr` as a kernel's poker copies them into its alias mapping: one
/// store for 1, 2, 4 or 8 bytes (a probe round's piece, an ifunc site's rel32), else
/// byte by byte. Volatile, so every store happens, in order, even though nothing in this
/// program reads the bytes back.
///
/// # Safety
///
/// `addr .. addr + bytes.len()` is mapped and writable.
#[inline(always)]
unsafe fn store_text(addr: u64, bytes: &[u8]) {
    /// An unaligned integer (alignment 1): a volatile store of it is one store.
    #[repr(C, packed)]
    struct Unaligned<T>(T);
    let p = addr as usize;
    let w = |at: usize, b: u8| {
        // SAFETY: `at` is in the caller's range.
        unsafe { core::ptr::write_volatile(at as *mut u8, b) }
    };
    // SAFETY: `bytes.len()` bytes at `addr`, the caller's range; `Unaligned` has
    // alignment 1.
    unsafe {
        match *bytes {
            [a] => w(p, a),
            [a, b] => core::ptr::write_volatile(
                p as *mut Unaligned<u16>,
                Unaligned(u16::from_le_bytes([a, b])),
            ),
            [a, b, c, d] => core::ptr::write_volatile(
                p as *mut Unaligned<u32>,
                Unaligned(u32::from_le_bytes([a, b, c, d])),
            ),
            [a, b, c, d, e, f, g, h] => core::ptr::write_volatile(
                p as *mut Unaligned<u64>,
                Unaligned(u64::from_le_bytes([a, b, c, d, e, f, g, h])),
            ),
            _ => {
                for (i, &b) in bytes.iter().enumerate() {
                    w(p + i, b);
                }
            }
        }
    }
}

/// The `SIGTRAP` handler. It runs in signal context on the trapping thread, and
/// through [`crate::probe::handle_int3`] it may run a probe's handler (an enabled C call
/// or tail site fires from the trap): see [`install_int3_handler`] for what that asks of
/// handlers.
extern "C" fn on_sigtrap(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // A SIGTRAP sent by a process (`kill`, `tgkill`, `sigqueue`: `si_code <= 0`) is not
    // a trap: its context does not point after a trap instruction, and emulating a site
    // there would corrupt the thread.
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler.
    let from_kernel = unsafe { (*info).si_code } > 0;
    // SAFETY: the kernel passes a valid `ucontext_t` to an SA_SIGINFO handler; nothing
    // else refers to it while the handler runs.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let mut f = probe_arch::host::frame(uc);
    // The probe handler may call functions that set `errno`; the interrupted code must
    // find it unchanged.
    // SAFETY: `__errno_location` returns this thread's `errno`, valid for its lifetime.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: `f` is this thread's interrupted context of a trap (checked `si_code`);
    // the registers `emulate` changes are written back below and restored by
    // sigreturn.
    let handled = from_kernel && unsafe { crate::probe::handle_int3(&mut f) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    if handled {
        probe_arch::host::write_back(&f, uc);
    } else {
        // Not a probe site: die as an unhandled SIGTRAP would.
        // SAFETY: `signal` and `raise` are async-signal-safe; restoring the default
        // disposition and re-raising terminates the process as the default would.
        unsafe {
            libc::signal(libc::SIGTRAP, libc::SIG_DFL);
            libc::raise(libc::SIGTRAP);
        }
    }
}

/// Installs a `SIGTRAP` handler that emulates probe sites caught mid-patch (and fires
/// enabled C tail sites). Needed when threads other than the one toggling probes may
/// run probe sites. Returns `false` if `sigaction` failed; on success it declares the
/// #BP route ([`crate::probe::declare_int3_route`]) that `probe::enable` requires.
///
/// Probe handlers then run **in signal context** whenever a site fires from the trap
/// (an enabled C tail site always does; any site may while a batch is writing it): a
/// handler must be async-signal-safe (no locks another thread or the interrupted code
/// may hold, no allocation, no stdio), and must not itself run a probe site that may be
/// mid-patch (`SIGTRAP` is blocked inside the handler, so a second trap kills the
/// process). In a kernel the same handlers run in #BP trap context, with the same
/// restrictions.
pub fn install_int3_handler() -> bool {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
    // SA_SIGINFO signature. What the handler does is sound in signal context as long
    // as probe handlers are async-signal-safe, which is their documented contract
    // (above): the rest touches only the trapping thread's context and `errno`, and the
    // probe registry's lock-free paths (atomics and immutable registered tables). The
    // handler, once installed, is the route `declare_int3_route` asks for, on every
    // thread of the process.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigtrap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut()) != 0 {
            return false;
        }
        // The handler forwards every SIGTRAP from an `int3` to `handle_int3` and writes
        // the registers back: the route `probe::enable` requires.
        crate::probe::declare_int3_route();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poker(start: u64, end: u64) -> HostPoker {
        HostPoker {
            segments: std::vec![Segment {
                start,
                end,
                prot: 0
            }],
            sync_core: false,
            syncs: 0,
            writes: 0,
        }
    }

    #[test]
    fn contains_takes_whole_ranges_only_and_never_wraps() {
        let p = poker(0x1000, 0x2000);
        assert!(p.contains(0x1000, 0x1000));
        assert!(!p.contains(0x1ffc, 5));
        assert!(!p.contains(0xfff, 1));
        // A segment reaching the top of the address space: a range that would wrap
        // past it is not inside, though a saturating end would say it is.
        let top = poker(u64::MAX - 0xfff, u64::MAX);
        assert!(top.contains(u64::MAX - 8, 5));
        assert!(!top.contains(u64::MAX - 2, 5));
    }
}
