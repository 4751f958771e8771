//! SDT probes: the `probe!` / `probe_enabled!` macros, the registry, the dispatchers, and
//! live enable/disable with the int3 protocol.
//!
//! A disabled probe site is one 5-byte instruction that does nothing (see
//! [`ProbeKind`] for every form). Enabling a probe rewrites all its sites in one batch:
//!
//! 1. check that every site holds exactly its disabled bytes (else nothing is written);
//! 2. publish the new state, so a CPU that traps on a half-written site is emulated
//!    into the *new* instruction by [`handle_int3`];
//! 3. write `cc` at every site, serialize all CPUs; write bytes 1..5, serialize; write
//!    byte 0, serialize: three rounds of IPIs per batch, not per site;
//! 4. wait until no CPU is still inside [`handle_int3`].
//!
//! A failed write rolls every site of the batch back with the same protocol.
//!
//! The int3 handler reads only the registered table and the static per-probe state,
//! which live as long as the image; a counter of CPUs inside the handler lets a batch
//! (and, later, module unload) wait for them to leave. There is no per-batch descriptor
//! to be freed or cleared under a running handler (the bug Linux shipped twice).

use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch::x86_64::{CALL_REL32, JMP_REL32, NOP5, rel32};
use crate::format::{PROBE_SITE_LEN, PSite, ProbeKind, Table};
pub use crate::name::Name;
use crate::patch::{InsnBytes, PokeError, TextPoker};

/// Most probes the registry holds.
pub const MAX_PROBES: usize = 1024;

/// Section holding one record per `probe!`/`probe_enabled!` site.
pub const SITE_RECORD_SECTION: &str = ".ksites_probe_sites";
/// First word of a site record ("KSSP").
pub const SITE_RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KSSP");
/// Size of a site record: `u32 magic, u32 kind (0 probe!, 1 probe_enabled!), u64 site,
/// u64 out-of-line target, u64 probe record`.
pub const SITE_RECORD_SIZE: usize = 32;
/// First word of a [`ProbeRecord`] ("KSPR").
pub const PROBE_RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KSPR");
/// `nargs` of a record that comes from `probe_enabled!` (no arguments declared).
pub const RECORD_NARGS_NONE: u32 = u32::MAX;
/// Value of [`ProbeRecord`]'s id before `ksites embed` assigns one.
pub const UNASSIGNED: u32 = u32::MAX;

/// Byte offsets of [`ProbeRecord`]'s fields (the build tool reads and patches them).
pub mod record {
    /// `*const u8` provider.
    pub const PROVIDER: usize = 8;
    /// `usize` provider length.
    pub const PROVIDER_LEN: usize = 16;
    /// `*const u8` name.
    pub const NAME: usize = 24;
    /// `usize` name length.
    pub const NAME_LEN: usize = 32;
    /// `u32` probe id, written by `ksites embed`.
    pub const ID: usize = 40;
    /// Size of the record.
    pub const SIZE: usize = 48;
}

/// Per-`probe!` static: the probe's name and argument count, and its id in the image's
/// table, which `ksites embed` writes into the image.
#[repr(C)]
#[derive(Debug)]
pub struct ProbeRecord {
    magic: u32,
    nargs: u32,
    provider: *const u8,
    provider_len: usize,
    name: *const u8,
    name_len: usize,
    id: AtomicU32,
    _pad: u32,
}

// SAFETY: the pointers refer to `'static` string literals and are only read; `id` is
// atomic.
unsafe impl Sync for ProbeRecord {}

impl ProbeRecord {
    /// A record for `provider:name` with `nargs` arguments.
    pub const fn new(provider: &'static str, name: &'static str, nargs: u32) -> ProbeRecord {
        ProbeRecord {
            magic: PROBE_RECORD_MAGIC,
            nargs,
            provider: provider.as_ptr(),
            provider_len: provider.len(),
            name: name.as_ptr(),
            name_len: name.len(),
            id: AtomicU32::new(UNASSIGNED),
            _pad: 0,
        }
    }

    /// The probe id `ksites embed` assigned, if any.
    pub fn id(&self) -> Option<ProbeId> {
        match self.id.load(Ordering::Relaxed) {
            UNASSIGNED => None,
            id => Some(ProbeId(id)),
        }
    }
}

/// A probe, by its global id: the kernel's probes first (its table's indices, when it
/// registers first), each module's after, in one run from its table's index 0. Ids of
/// an unloaded module are reused by the next module that fits: look ids up again
/// (`lookup`) after loading or unloading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(pub u32);

/// Called with the probe's id and its arguments (unused ones are 0).
pub type Handler = fn(ProbeId, &[u64; 6]);

struct ProbeState {
    enabled: AtomicBool,
    handler: AtomicUsize,
    hits: AtomicU64,
    /// CPUs inside `fire` for this probe (from before the `enabled` check until the
    /// handler returned): a disable, or a handler change, waits for it to drain, so when
    /// it returns no CPU runs the old handler any more (its code may be a module's).
    inflight: AtomicU32,
}

impl ProbeState {
    const fn new() -> ProbeState {
        ProbeState {
            enabled: AtomicBool::new(false),
            handler: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
        }
    }

    /// Waits until no CPU is inside `fire` for this probe.
    fn drain(&self) {
        while self.inflight.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
    }
}

static STATES: [ProbeState; MAX_PROBES] = [const { ProbeState::new() }; MAX_PROBES];
static IMAGES: [ImageSlot; MAX_IMAGES] = [const { ImageSlot::new() }; MAX_IMAGES];
static CONTROL: spin::Mutex<()> = spin::Mutex::new(());
static IN_INT3: AtomicU32 = AtomicU32::new(0);

/// Most images (the kernel and its loaded modules) the registry holds.
pub const MAX_IMAGES: usize = 32;

const SLOT_FREE: u8 = 0;
const SLOT_LIVE: u8 = 1;

/// One registered table. Slot 0 is the kernel image ([`register_image`]), never
/// removed; the others are modules. `data` is written only under `CONTROL` while the
/// state is `SLOT_FREE` and `readers` is 0.
///
/// Lock-free readers (the int3 handler, the dispatchers) find a module's slot by
/// address through `start..end`, then count themselves in `readers` and re-check the
/// state before touching `data` (a hazard count, per slot, so unloading one module
/// waits only for CPUs inside *that* module's data, never for the steady traffic of
/// other probes); [`unregister_module`] frees the slot, then waits for `readers` to
/// drain.
struct ImageSlot {
    state: AtomicU8,
    readers: AtomicU32,
    start: AtomicU64,
    end: AtomicU64,
    data: core::cell::UnsafeCell<Option<SlotData>>,
}

#[derive(Clone)]
struct SlotData {
    table: Table<'static>,
    /// Global id of the table's probe 0.
    base: u32,
}

// SAFETY: `data` is written only under `CONTROL` while `state` is `SLOT_FREE` and no
// reader counts itself in `readers` (see `unregister_module`); readers only read it
// after an Acquire load of `SLOT_LIVE`, counted in `readers` for module slots.
unsafe impl Sync for ImageSlot {}

impl ImageSlot {
    const fn new() -> ImageSlot {
        ImageSlot {
            state: AtomicU8::new(SLOT_FREE),
            readers: AtomicU32::new(0),
            start: AtomicU64::new(0),
            end: AtomicU64::new(0),
            data: core::cell::UnsafeCell::new(None),
        }
    }

    /// The slot's data, if live. Only for the kernel's slot (never freed) and under
    /// `CONTROL` (which every writer holds).
    #[inline(always)]
    fn get(&self) -> Option<&SlotData> {
        if self.state.load(Ordering::Acquire) != SLOT_LIVE {
            return None;
        }
        // SAFETY: live slots are not written (type-level invariant above); callers hold
        // `CONTROL` or this is the kernel's slot.
        unsafe { (*self.data.get()).as_ref() }
    }

    #[inline(always)]
    fn owns(&self, addr: u64) -> bool {
        self.start.load(Ordering::Acquire) <= addr && addr < self.end.load(Ordering::Acquire)
    }
}

/// Live images, kernel first. Under `CONTROL`.
fn images() -> impl Iterator<Item = &'static SlotData> {
    IMAGES.iter().filter_map(ImageSlot::get)
}

/// Runs `f` on the image owning address `addr`: the module whose memory contains it,
/// else the kernel. Lock-free (int3 handler and dispatchers).
#[inline(always)]
fn with_image_at<R>(addr: u64, f: impl FnOnce(&SlotData) -> R) -> Option<R> {
    for slot in &IMAGES[1..] {
        if slot.state.load(Ordering::Acquire) != SLOT_LIVE || !slot.owns(addr) {
            continue;
        }
        slot.readers.fetch_add(1, Ordering::SeqCst);
        // Re-check after counting in: a concurrent unregister either sees the count, or
        // freed the slot before it, which the re-check sees.
        let r = if slot.state.load(Ordering::SeqCst) == SLOT_LIVE && slot.owns(addr) {
            // SAFETY: live and counted in: `data` is not written until `readers` is 0.
            unsafe { (*slot.data.get()).as_ref() }.map(f)
        } else {
            None
        };
        slot.readers.fetch_sub(1, Ordering::Release);
        return r;
    }
    IMAGES[0].get().map(f)
}

/// The image holding global probe `id`, and the probe's index in its table.
fn image_of(id: ProbeId) -> Option<(&'static SlotData, u32)> {
    images().find_map(|d| {
        let local = id.0.checked_sub(d.base)?;
        (local < d.table.probe_count()).then_some((d, local))
    })
}
static INT3_EMULATIONS: AtomicU64 = AtomicU64::new(0);
static INT3_DRAIN_WAITS: AtomicU64 = AtomicU64::new(0);

/// Why a registry operation failed. On every error, no site is left changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// [`register_image`] has not run.
    NotRegistered,
    /// [`register_image`] already ran.
    AlreadyRegistered,
    /// The registry has no room for the table's probes ([`MAX_PROBES`] in all).
    TooManyProbes(u32),
    /// The registry already holds [`MAX_IMAGES`] images.
    TooManyImages,
    /// A module cannot be unregistered: an enabled probe's handler lies in its code.
    HandlerInModule {
        /// The probe whose handler is in the module.
        probe: ProbeId,
        /// The handler's address.
        handler: u64,
    },
    /// No probe with this id.
    NoSuchProbe(ProbeId),
    /// A site does not hold the bytes its state calls for.
    UnexpectedBytes {
        /// Site address.
        site: u64,
        /// The probe's id.
        probe: ProbeId,
        /// Expected bytes.
        expected: InsnBytes,
        /// Found bytes.
        found: InsnBytes,
    },
    /// An enabled form cannot reach its target with a rel32.
    OutOfReach {
        /// Site address.
        site: u64,
        /// Target.
        target: u64,
    },
    /// The kernel's poker failed; every site of the batch was restored.
    Poke(PokeError),
    /// The kernel's poker failed, and restoring failed too at this site. The probe is
    /// in its old state; the site may still be `cc` (emulated by the int3 handler) and
    /// the next enable/disable accepts and rewrites it.
    RollbackIncomplete {
        /// The first site that could not be restored.
        site: u64,
        /// The probe.
        probe: ProbeId,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NotRegistered => write!(f, "no probe table registered"),
            ProbeError::AlreadyRegistered => {
                write!(f, "the image's probe table is already registered")
            }
            ProbeError::TooManyProbes(n) => {
                write!(
                    f,
                    "no room for {n} more probes in the registry (capacity {MAX_PROBES})"
                )
            }
            ProbeError::TooManyImages => {
                write!(f, "the probe registry already holds {MAX_IMAGES} images")
            }
            ProbeError::HandlerInModule { probe, handler } => write!(
                f,
                "probe {} is enabled with a handler at {handler:#x} inside the module: \
                 disable it first",
                probe.0
            ),
            ProbeError::NoSuchProbe(id) => write!(f, "no probe with id {}", id.0),
            ProbeError::UnexpectedBytes {
                site,
                probe,
                expected,
                found,
            } => write!(
                f,
                "probe {} site {site:#x}: expected bytes [{expected}], found [{found}]",
                probe.0
            ),
            ProbeError::OutOfReach { site, target } => {
                write!(
                    f,
                    "probe site {site:#x} cannot reach {target:#x} with a rel32"
                )
            }
            ProbeError::Poke(e) => write!(f, "{e} (batch rolled back)"),
            ProbeError::RollbackIncomplete { site, probe } => write!(
                f,
                "probe {}: a write failed and site {site:#x} could not be restored (it is \
                 emulated through int3 until the next batch rewrites it)",
                probe.0
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProbeError {}

/// Addresses of the loader's entry points that C probe sites branch to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stubs {
    /// [`ksites_probe_c_entry`]: what an enabled C call site calls.
    pub c_entry: u64,
    /// [`ksites_probe_ret0`]: a disabled C is-enabled tail site jumps here.
    pub ret0: u64,
    /// [`ksites_probe_ret1`]: an enabled C is-enabled tail site jumps here.
    pub ret1: u64,
}

/// Symbol names of [`Stubs`], in field order (the build tool looks them up).
pub const STUB_SYMBOLS: [&str; 3] = [
    "ksites_probe_c_entry",
    "ksites_probe_ret0",
    "ksites_probe_ret1",
];

impl Stubs {
    /// This image's stubs.
    #[inline]
    pub fn this_image() -> Stubs {
        Stubs {
            c_entry: ksites_probe_c_entry as *const () as u64,
            ret0: ksites_probe_ret0 as *const () as u64,
            ret1: ksites_probe_ret1 as *const () as u64,
        }
    }
}

/// The 5 bytes a site holds in state `on`, in this image.
#[inline(always)]
pub fn site_bytes(s: &PSite, on: bool) -> Result<[u8; 5], ProbeError> {
    site_bytes_with(s, on, &Stubs::this_image())
}

/// The 5 bytes a site holds in state `on`, with the given stub addresses.
///
/// Every form is **one** instruction in both states, so a CPU stopped at any point of
/// the int3 protocol resumes at an instruction boundary: only the first byte (`cc`) or
/// the operand bytes change.
#[inline(always)]
pub fn site_bytes_with(s: &PSite, on: bool, stubs: &Stubs) -> Result<[u8; 5], ProbeError> {
    let branch = |op: u8, target: u64| -> Result<[u8; 5], ProbeError> {
        let r = rel32(s.addr + PROBE_SITE_LEN as u64, target).ok_or(ProbeError::OutOfReach {
            site: s.addr,
            target,
        })?;
        let r = r.to_le_bytes();
        Ok([op, r[0], r[1], r[2], r[3]])
    };
    Ok(match (s.kind, on) {
        (ProbeKind::RustJmp | ProbeKind::RustEnabled | ProbeKind::CCall, false) => NOP5,
        (ProbeKind::RustJmp | ProbeKind::RustEnabled, true) => branch(JMP_REL32, s.target)?,
        (ProbeKind::CCall, true) => branch(CALL_REL32, stubs.c_entry)?,
        (ProbeKind::CTail, false) => C_TAIL_OFF,
        (ProbeKind::CTail, true) => C_TAIL_ON,
        (ProbeKind::CEnabled, false) => C_ENABLED_OFF,
        (ProbeKind::CEnabled, true) => C_ENABLED_ON,
        (ProbeKind::CEnabledTail, false) => branch(JMP_REL32, stubs.ret0)?,
        (ProbeKind::CEnabledTail, true) => branch(JMP_REL32, stubs.ret1)?,
    })
}

/// Disabled C tail call: `ret`, then NOPs.
pub const C_TAIL_OFF: [u8; 5] = [0xc3, 0x90, 0x90, 0x90, 0x90];
/// Enabled C tail call: `int3` (fires, then emulates `ret`), then NOPs.
pub const C_TAIL_ON: [u8; 5] = [0xcc, 0x90, 0x90, 0x90, 0x90];
/// Disabled is-enabled check: `mov eax, 0` (one instruction; DTrace's `xor eax,eax` +
/// NOPs is two, and a CPU stopped between them during a live toggle would resume
/// inside the new `mov`).
pub const C_ENABLED_OFF: [u8; 5] = [0xb8, 0x00, 0x00, 0x00, 0x00];
/// Enabled is-enabled check: `mov eax, 1`.
pub const C_ENABLED_ON: [u8; 5] = [0xb8, 0x01, 0x00, 0x00, 0x00];

/// A disabled C is-enabled tail site jumps here: returns 0 for the site's function.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret0() -> u32 {
    core::arch::naked_asm!("xor eax, eax", "ret")
}

/// An enabled C is-enabled tail site jumps here: returns 1 for the site's function.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_ret1() -> u32 {
    core::arch::naked_asm!("mov eax, 1", "ret")
}

/// The 5 bytes at a probe site, read one byte per `read` and assembled in a register
/// (reading a byte-filled buffer back as a word would stall store forwarding on every
/// site of a batch).
#[inline(always)]
fn read5<P: TextPoker + ?Sized>(poker: &P, addr: u64) -> [u8; 5] {
    let mut v = 0u64;
    for i in 0..5 {
        let mut b = [0u8; 1];
        // SAFETY: probe sites were validated to lie in the image's executable ranges.
        unsafe { poker.read(addr + i, &mut b) };
        v |= u64::from(b[0]) << (8 * i);
    }
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4]]
}

/// Five site bytes as a little-endian integer.
#[inline(always)]
fn word5(b: [u8; 5]) -> u64 {
    u64::from(b[0])
        | u64::from(b[1]) << 8
        | u64::from(b[2]) << 16
        | u64::from(b[3]) << 24
        | u64::from(b[4]) << 32
}

/// The sites of one probe, in address order: an index loop over the table without
/// closures, so the batch loops inline it.
struct SitesOf<'t, 'a> {
    table: &'t Table<'a>,
    probe: u32,
    next: u32,
}

impl<'t, 'a> SitesOf<'t, 'a> {
    #[inline]
    fn new(table: &'t Table<'a>, id: ProbeId) -> Self {
        SitesOf {
            table,
            probe: id.0,
            next: 0,
        }
    }
}

impl Iterator for SitesOf<'_, '_> {
    type Item = PSite;

    #[inline(always)]
    fn next(&mut self) -> Option<PSite> {
        while self.next < self.table.probe_site_count() {
            let i = self.next;
            self.next += 1;
            if let Some(s) = self.table.probe_site(i)
                && s.probe == self.probe
            {
                return Some(s);
            }
        }
        None
    }
}

/// Registers the kernel image's table: checks every probe site holds its disabled form.
/// Call once at boot (after [`crate::patch::init`] or before: they touch different
/// sites). The kernel's probes get the first free run of ids (`0..n` when it registers
/// before any module, as at boot). Returns `n`.
pub fn register_image<P: TextPoker + ?Sized>(
    table: Table<'static>,
    poker: &P,
) -> Result<u32, ProbeError> {
    let _g = CONTROL.lock();
    if IMAGES[0].get().is_some() {
        return Err(ProbeError::AlreadyRegistered);
    }
    check_disabled(&table, poker)?;
    let n = table.probe_count();
    let base = free_ids(n).ok_or(ProbeError::TooManyProbes(n))?;
    publish(0, table, base, 0..0);
    Ok(n)
}

/// A module's place in the registry, from [`register_module`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHandle {
    slot: usize,
    base: u32,
    count: u32,
}

impl ImageHandle {
    /// Global id of the module's probe 0.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Number of probes.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The module's probe ids.
    pub fn ids(&self) -> impl Iterator<Item = ProbeId> + use<> {
        (self.base..self.base + self.count).map(ProbeId)
    }
}

/// Registers a loaded module's table, whose probes get the next free run of global ids.
/// Every site must hold its disabled form; `range` is the module's whole memory (its
/// `ProbeRecord`s and sites lie there).
///
/// # Safety
///
/// The table's memory stays valid and unchanged until [`unregister_module`] returns.
pub unsafe fn register_module<P: TextPoker + ?Sized>(
    table: Table<'_>,
    range: Range<u64>,
    poker: &P,
) -> Result<ImageHandle, ProbeError> {
    // SAFETY: the caller keeps the table alive until it is unregistered, which removes
    // every reference the registry holds.
    let table: Table<'static> = unsafe { core::mem::transmute::<Table<'_>, Table<'static>>(table) };
    let _g = CONTROL.lock();
    check_disabled(&table, poker)?;
    let n = table.probe_count();
    let slot = (1..MAX_IMAGES)
        .find(|&i| IMAGES[i].state.load(Ordering::Acquire) == SLOT_FREE)
        .ok_or(ProbeError::TooManyImages)?;
    let base = free_ids(n).ok_or(ProbeError::TooManyProbes(n))?;
    publish(slot, table, base, range);
    Ok(ImageHandle {
        slot,
        base,
        count: n,
    })
}

/// Removes a module from the registry: refuses (nothing changed) while an enabled probe
/// of another image has its handler in `code`; disables the module's enabled probes
/// (one batch each; each disable waits until no CPU emulates its sites or runs its
/// handler); re-checks both under the lock; frees the slot, waiting for CPUs still
/// inside a lookup of its table; clears its probes' state. On an error the module stays
/// registered, its probes in whatever state the failed batch rolled back to.
///
/// # Safety
///
/// As for [`enable`]; `handle` came from [`register_module`] and is not used again after
/// success.
pub unsafe fn unregister_module<P: TextPoker + ?Sized>(
    handle: &ImageHandle,
    code: Range<u64>,
    poker: &mut P,
) -> Result<(), ProbeError> {
    {
        let _g = CONTROL.lock();
        if let Some((probe, handler)) = handlers_into(handle, &code) {
            return Err(ProbeError::HandlerInModule { probe, handler });
        }
    }
    for id in handle.ids() {
        if is_enabled(id) {
            // SAFETY: forwarded.
            unsafe { disable(id, poker)? };
        }
    }
    let _g = CONTROL.lock();
    // Re-check under the lock that frees the slot: an enable between the check above
    // and here (of one of its probes, or of any probe with a handler in its code) wins.
    if let Some((probe, handler)) = enabled_into(handle, &code) {
        return Err(ProbeError::HandlerInModule { probe, handler });
    }
    let slot = &IMAGES[handle.slot];
    slot.state.store(SLOT_FREE, Ordering::SeqCst);
    // A reader counts itself in, then re-checks the state: once the count is 0 after the
    // store above, no reader holds this slot's data, and none will.
    while slot.readers.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    slot.start.store(0, Ordering::Release);
    slot.end.store(0, Ordering::Release);
    // SAFETY: the slot is free and no reader is inside it (above); `CONTROL` is held.
    unsafe { *slot.data.get() = None };
    for id in handle.ids() {
        let st = &STATES[id.0 as usize];
        st.enabled.store(false, Ordering::Relaxed);
        st.handler.store(0, Ordering::Relaxed);
        st.hits.store(0, Ordering::Relaxed);
    }
    Ok(())
}

/// An enabled probe (other than those of `except`) whose handler lies in `code`: what
/// must not outlive a module.
pub fn handler_in(code: &Range<u64>, except: Option<&ImageHandle>) -> Option<(ProbeId, u64)> {
    let none = ImageHandle {
        slot: 0,
        base: 0,
        count: 0,
    };
    let _g = CONTROL.lock();
    handlers_into(except.unwrap_or(&none), code)
}

/// An enabled probe of another image whose handler lies in `code`. Under `CONTROL`.
fn handlers_into(handle: &ImageHandle, code: &Range<u64>) -> Option<(ProbeId, u64)> {
    for d in images() {
        for local in 0..d.table.probe_count() {
            let id = d.base + local;
            let st = &STATES[id as usize];
            let h = st.handler.load(Ordering::Acquire) as u64;
            let theirs = id >= handle.base && id < handle.base + handle.count;
            if !theirs && st.enabled.load(Ordering::Acquire) && code.contains(&h) {
                return Some((ProbeId(id), h));
            }
        }
    }
    None
}

/// [`handlers_into`], or an enabled probe of the module itself. Under `CONTROL`.
fn enabled_into(handle: &ImageHandle, code: &Range<u64>) -> Option<(ProbeId, u64)> {
    handlers_into(handle, code).or_else(|| {
        handle
            .ids()
            .find(|id| STATES[id.0 as usize].enabled.load(Ordering::Acquire))
            .map(|id| {
                (
                    id,
                    STATES[id.0 as usize].handler.load(Ordering::Acquire) as u64,
                )
            })
    })
}

/// Disables every enabled probe whose handler lies in `code`: what a module that failed
/// to load (its init enabled a probe, then returned an error) must not leave behind.
/// Returns how many it disabled.
///
/// # Safety
///
/// As for [`enable`].
pub unsafe fn disable_handlers_in<P: TextPoker + ?Sized>(
    code: Range<u64>,
    poker: &mut P,
) -> Result<u32, ProbeError> {
    let mut n = 0;
    for i in 0..MAX_PROBES as u32 {
        let st = &STATES[i as usize];
        let h = st.handler.load(Ordering::Acquire) as u64;
        if st.enabled.load(Ordering::Acquire) && code.contains(&h) {
            // SAFETY: forwarded.
            unsafe { disable(ProbeId(i), poker)? };
            n += 1;
        }
    }
    Ok(n)
}

/// Checks every probe site of `table` holds its disabled form.
fn check_disabled<P: TextPoker + ?Sized>(table: &Table<'_>, poker: &P) -> Result<(), ProbeError> {
    for s in table.probe_sites() {
        let want = site_bytes(&s, false)?;
        let found = read5(poker, s.addr);
        if found != want {
            return Err(ProbeError::UnexpectedBytes {
                site: s.addr,
                probe: ProbeId(s.probe),
                expected: InsnBytes::new(&want),
                found: InsnBytes::new(&found),
            });
        }
    }
    Ok(())
}

/// The first run of `n` global ids no live image uses (first fit). Under `CONTROL`.
fn free_ids(n: u32) -> Option<u32> {
    let mut start = 0u32;
    loop {
        let end = start.checked_add(n)?;
        if end as usize > MAX_PROBES {
            return None;
        }
        match images().find(|d| d.base < end && start < d.base + d.table.probe_count()) {
            None => return Some(start),
            Some(d) => start = d.base + d.table.probe_count(),
        }
    }
}

/// Fills a free slot and makes it live. Under `CONTROL`.
fn publish(slot: usize, table: Table<'static>, base: u32, range: Range<u64>) {
    let sl = &IMAGES[slot];
    for i in base..base + table.probe_count() {
        let st = &STATES[i as usize];
        st.enabled.store(false, Ordering::Relaxed);
        st.handler.store(0, Ordering::Relaxed);
        st.hits.store(0, Ordering::Relaxed);
    }
    // SAFETY: the slot is free (callers checked under `CONTROL`), so no reader looks at
    // its data.
    unsafe { *sl.data.get() = Some(SlotData { table, base }) };
    sl.start.store(range.start, Ordering::Release);
    sl.end.store(range.end, Ordering::Release);
    sl.state.store(SLOT_LIVE, Ordering::Release);
}

/// What the registry knows about a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// Its id.
    pub id: ProbeId,
    /// Provider.
    pub provider: Name,
    /// Name.
    pub name: Name,
    /// Declared argument count, or `NARGS_UNKNOWN`.
    pub nargs: u16,
    /// Number of sites (firing and is-enabled).
    pub sites: u32,
    /// Times it fired while enabled.
    pub hits: u64,
    /// Whether it is enabled.
    pub enabled: bool,
}

/// Information about probe `id`.
pub fn info(id: ProbeId) -> Option<ProbeInfo> {
    let _g = CONTROL.lock();
    let (d, local) = image_of(id)?;
    let p = d.table.probe(local)?;
    let st = &STATES[id.0 as usize];
    Some(ProbeInfo {
        id,
        provider: Name::new(p.provider),
        name: Name::new(p.name),
        nargs: p.nargs,
        sites: d.table.probe_sites().filter(|s| s.probe == local).count() as u32,
        hits: st.hits.load(Ordering::Relaxed),
        enabled: st.enabled.load(Ordering::Relaxed),
    })
}

/// Number of registered probes, in all images.
pub fn count() -> u32 {
    let _g = CONTROL.lock();
    images().map(|d| d.table.probe_count()).sum()
}

/// The probe named `provider:name` (the first image that has it, kernel first).
pub fn lookup(spec: &str) -> Option<ProbeId> {
    let (prov, name) = spec.split_once(':')?;
    let _g = CONTROL.lock();
    images().find_map(|d| {
        d.table
            .probes()
            .find(|p| p.provider == prov && p.name == name)
            .map(|p| ProbeId(d.base + p.index))
    })
}

/// Every probe whose `provider:name` matches `glob` (`*` any run, `?` one character),
/// in id order, as of the call.
pub fn matching(glob: &str) -> impl Iterator<Item = ProbeId> + use<> {
    let mut set = [0u64; MAX_PROBES / 64];
    {
        let _g = CONTROL.lock();
        for d in images() {
            for p in d.table.probes() {
                if glob_match(glob, p.provider, p.name) {
                    let id = (d.base + p.index) as usize;
                    set[id / 64] |= 1 << (id % 64);
                }
            }
        }
    }
    (0..MAX_PROBES as u32)
        .filter(move |&i| set[i as usize / 64] & (1 << (i % 64)) != 0)
        .map(ProbeId)
}

/// Matches `provider:name` against `glob` without allocating.
pub fn glob_match(glob: &str, provider: &str, name: &str) -> bool {
    let (p, n) = (provider.as_bytes(), name.as_bytes());
    let at = |i: usize| match i.cmp(&p.len()) {
        core::cmp::Ordering::Less => p[i],
        core::cmp::Ordering::Equal => b':',
        core::cmp::Ordering::Greater => n[i - p.len() - 1],
    };
    wildcard(glob.as_bytes(), p.len() + 1 + n.len(), at)
}

/// Matches `text` against `glob` (`*` any run, `?` one byte).
pub fn glob_match_str(glob: &str, text: &str) -> bool {
    let t = text.as_bytes();
    wildcard(glob.as_bytes(), t.len(), |i| t[i])
}

/// Iterative wildcard matching with single-star backtracking: linear in practice, no
/// recursion, no allocation.
fn wildcard(g: &[u8], text_len: usize, at: impl Fn(usize) -> u8) -> bool {
    let (mut gi, mut ti) = (0usize, 0usize);
    let (mut star, mut mark) = (usize::MAX, 0usize);
    while ti < text_len {
        if gi < g.len() && (g[gi] == b'?' || g[gi] == at(ti)) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == b'*' {
            star = gi;
            mark = ti;
            gi += 1;
        } else if star != usize::MAX {
            gi = star + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == b'*' {
        gi += 1;
    }
    gi == g.len()
}

/// Whether probe `id` is enabled.
pub fn is_enabled(id: ProbeId) -> bool {
    STATES
        .get(id.0 as usize)
        .is_some_and(|s| s.enabled.load(Ordering::Relaxed))
}

/// How many times a CPU was sent through [`handle_int3`]'s emulation.
pub fn int3_emulations() -> u64 {
    INT3_EMULATIONS.load(Ordering::Relaxed)
}

/// How many batches, when done writing, found a CPU still inside [`handle_int3`] and
/// waited for it to leave (step 4 of the protocol).
pub fn int3_drain_waits() -> u64 {
    INT3_DRAIN_WAITS.load(Ordering::Relaxed)
}

/// Enables probe `id`: every site of it starts calling `handler`.
///
/// # Safety
///
/// `poker` writes the image's live text safely for the CPUs that may run it (an alias
/// mapping or CR0.WP, and a `sync_cores` that serializes every CPU), and the kernel's
/// #BP handler calls [`handle_int3`].
pub unsafe fn enable<P: TextPoker + ?Sized>(
    id: ProbeId,
    handler: Handler,
    poker: &mut P,
) -> Result<(), ProbeError> {
    // SAFETY: forwarded.
    unsafe { set_state(id, true, Some(handler), poker) }
}

/// Disables probe `id`: every site returns to its disabled form.
///
/// # Safety
///
/// As for [`enable`].
pub unsafe fn disable<P: TextPoker + ?Sized>(id: ProbeId, poker: &mut P) -> Result<(), ProbeError> {
    // SAFETY: forwarded.
    unsafe { set_state(id, false, None, poker) }
}

unsafe fn set_state<P: TextPoker + ?Sized>(
    id: ProbeId,
    on: bool,
    handler: Option<Handler>,
    poker: &mut P,
) -> Result<(), ProbeError> {
    let _g = CONTROL.lock();
    let (d, local) = image_of(id).ok_or(ProbeError::NoSuchProbe(id))?;
    let t = &d.table;
    let st = &STATES[id.0 as usize];
    if let Some(h) = handler {
        let old = st.handler.swap(h as usize, Ordering::SeqCst);
        if old != h as usize && st.enabled.load(Ordering::SeqCst) {
            // Live handler change: no CPU may still run the old one when this returns.
            st.drain();
        }
    }
    if st.enabled.load(Ordering::Acquire) == on {
        return Ok(());
    }
    // 1. Every site must hold exactly the other state's bytes (or the residue of an
    //    interrupted batch: `cc` then either state's tail bytes), and the new bytes must
    //    be encodable, before anything is written.
    let lid = ProbeId(local);
    for s in SitesOf::new(t, lid) {
        let old = site_bytes(&s, !on)?;
        let new = site_bytes(&s, on)?;
        let found = read5(poker, s.addr);
        // A failed batch whose rollback could not finish may have left `cc` plus either
        // state's tail, or the complete new bytes: all are safe to rewrite. (Compared
        // as integers: slice comparisons would go through memory.)
        let (o, n, f) = (word5(old), word5(new), word5(found));
        let residue = f == n || (f & 0xff == 0xcc && (f >> 8 == o >> 8 || f >> 8 == n >> 8));
        if f != o && !residue {
            return Err(ProbeError::UnexpectedBytes {
                site: s.addr,
                probe: id,
                expected: InsnBytes::new(&old),
                found: InsnBytes::new(&found),
            });
        }
    }
    // 2. Publish the new state: from here on, a trapping CPU is emulated into it.
    st.enabled.store(on, Ordering::SeqCst);
    if let Err(e) = poker.begin() {
        st.enabled.store(!on, Ordering::SeqCst);
        return Err(ProbeError::Poke(e));
    }
    // 3. The three rounds.
    // SAFETY: the sites are validated probe sites; the int3 handler covers CPUs that run
    // them mid-patch (precondition of `enable`/`disable`).
    let r = unsafe { write_batch(t, lid, on, poker) };
    let result = match r {
        Ok(()) => Ok(()),
        Err(e) => {
            st.enabled.store(!on, Ordering::SeqCst);
            // SAFETY: as above; rolls the same sites back to the old state.
            match unsafe { roll_back(t, lid, !on, poker) } {
                Ok(()) => Err(ProbeError::Poke(e)),
                Err(site) => Err(ProbeError::RollbackIncomplete { site, probe: id }),
            }
        }
    };
    poker.end();
    // 4. Wait until no CPU is still emulating a site of the old batch, and, after a
    //    disable, until no CPU still runs the handler.
    if IN_INT3.load(Ordering::Acquire) != 0 {
        INT3_DRAIN_WAITS.fetch_add(1, Ordering::Relaxed);
        while IN_INT3.load(Ordering::Acquire) != 0 {
            core::hint::spin_loop();
        }
    }
    if !on || result.is_err() {
        st.drain();
    }
    result
}

/// Moves every site of probe `id` (its index in `t`) to state `on` with the int3
/// protocol.
///
/// # Safety
///
/// As for [`enable`].
unsafe fn write_batch<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    id: ProbeId,
    on: bool,
    poker: &mut P,
) -> Result<(), PokeError> {
    let sites = || SitesOf::new(t, id);
    for s in sites() {
        // SAFETY: inside a validated site.
        unsafe { poker.write(s.addr, &[0xcc])? };
    }
    poker.sync_cores();
    for s in sites() {
        // Encodable: step 1 of `set` checked every site of the batch.
        let Ok(new) = site_bytes(&s, on) else {
            continue;
        };
        // SAFETY: inside a validated site; byte 0 is int3, so no CPU decodes bytes 1..5.
        unsafe { poker.write(s.addr + 1, &new[1..])? };
    }
    poker.sync_cores();
    for s in sites() {
        // Encodable: step 1 of `set` checked every site of the batch.
        let Ok(new) = site_bytes(&s, on) else {
            continue;
        };
        // SAFETY: inside a validated site; a single-byte store is atomic.
        unsafe { poker.write(s.addr, &new[..1])? };
    }
    poker.sync_cores();
    Ok(())
}

/// Puts every site of probe `id` back into state `on` with the same three rounds,
/// continuing past failed writes, then reads every site back. Returns the first site
/// that does not hold its bytes. A site left as `cc` still behaves correctly: the int3
/// handler emulates the (restored) state, and the next batch accepts the residue.
///
/// # Safety
///
/// As for [`enable`].
unsafe fn roll_back<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    id: ProbeId,
    on: bool,
    poker: &mut P,
) -> Result<(), u64> {
    let sites = || SitesOf::new(t, id);
    for s in sites() {
        // SAFETY: inside a validated site.
        let _ = unsafe { poker.write(s.addr, &[0xcc]) };
    }
    poker.sync_cores();
    // Each later step only proceeds on a site whose previous step read back right, so a
    // site is never left with one state's first byte and the other's tail.
    for s in sites() {
        if let Ok(b) = site_bytes(&s, on)
            && read5(poker, s.addr)[0] == 0xcc
        {
            // SAFETY: inside a validated site; byte 0 is int3, so no CPU decodes 1..5.
            let _ = unsafe { poker.write(s.addr + 1, &b[1..]) };
        }
    }
    poker.sync_cores();
    for s in sites() {
        if let Ok(b) = site_bytes(&s, on)
            && read5(poker, s.addr)[1..] == b[1..]
        {
            // SAFETY: inside a validated site; a single-byte store is atomic.
            let _ = unsafe { poker.write(s.addr, &b[..1]) };
        }
    }
    poker.sync_cores();
    for s in sites() {
        if site_bytes(&s, on).ok() != Some(read5(poker, s.addr)) {
            return Err(s.addr);
        }
    }
    Ok(())
}

fn fire(id: u32, args: &[u64; 6]) {
    let Some(st) = STATES.get(id as usize) else {
        return;
    };
    // Counted in before looking at the state: `set_state` publishes a change, then
    // drains the count, so a CPU either sees the new state or is waited for.
    st.inflight.fetch_add(1, Ordering::SeqCst);
    if st.enabled.load(Ordering::SeqCst) {
        st.hits.fetch_add(1, Ordering::Relaxed);
        let h = st.handler.load(Ordering::SeqCst);
        if h != 0 {
            // SAFETY: `handler` only ever holds a `Handler` stored by `set_state`.
            let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
            h(ProbeId(id), args);
        }
    }
    st.inflight.fetch_sub(1, Ordering::Release);
}

/// Entry point of an enabled `probe!` site's out-of-line block (stable symbol, so
/// modules can link against it by name).
#[unsafe(no_mangle)]
pub extern "C" fn ksites_probe_fire(rec: &ProbeRecord, args: &[u64; 6]) {
    // The record's id is its index in its own image's table; the image is the one
    // whose memory holds the record.
    let Some(local) = rec.id() else { return };
    let id = with_image_at(rec as *const ProbeRecord as u64, |d| {
        (local.0 < d.table.probe_count()).then_some(d.base + local.0)
    });
    if let Some(Some(id)) = id {
        fire(id, args);
    }
}

/// What an enabled C site (`call ksites_probe_c_entry`) lands in: saves the six
/// argument registers and passes them, with the return address, to the dispatcher.
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
        fire = sym fire_c,
    )
}

extern "C" fn fire_c(ret: u64, args: &[u64; 6]) {
    let site = ret.wrapping_sub(PROBE_SITE_LEN as u64);
    let id = with_image_at(site, |d| {
        d.table
            .probe_site_at(site)
            .filter(|s| s.kind == ProbeKind::CCall)
            .map(|s| d.base + s.probe)
    });
    if let Some(Some(id)) = id {
        fire(id, args);
    }
}

/// The registers [`handle_int3`] reads and may change.
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
}

/// The #BP hook: if the trap came from a probe site, emulates the instruction the site
/// is becoming (or, for an enabled C tail site, fires and returns) and returns `true`.
/// Returns `false` for any other `int3`.
///
/// # Safety
///
/// `f` is the interrupted context of a #BP on this CPU; the kernel writes `rip`, `rsp`
/// and `rax` back before returning from the trap.
pub unsafe fn handle_int3(f: &mut Int3Frame) -> bool {
    IN_INT3.fetch_add(1, Ordering::AcqRel);
    // SAFETY: forwarded.
    let r = unsafe { emulate(f) };
    IN_INT3.fetch_sub(1, Ordering::AcqRel);
    r
}

unsafe fn emulate(f: &mut Int3Frame) -> bool {
    let addr = f.rip.wrapping_sub(1);
    // The site is copied out (it is plain data): nothing below reads the table.
    let Some(Some((s, id))) = with_image_at(addr, |d| {
        d.table.probe_site_at(addr).map(|s| (s, d.base + s.probe))
    }) else {
        return false;
    };
    INT3_EMULATIONS.fetch_add(1, Ordering::Relaxed);
    let on = STATES[id as usize].enabled.load(Ordering::Acquire);
    let next = s.addr + PROBE_SITE_LEN as u64;
    let args = [f.rdi, f.rsi, f.rdx, f.rcx, f.r8, f.r9];
    let ret = |f: &mut Int3Frame| {
        // SAFETY: the site is a tail call: the interrupted stack's top is the return
        // address its function was called with (precondition: `f` is live context).
        f.rip = unsafe { core::ptr::read(f.rsp as usize as *const u64) };
        f.rsp += 8;
    };
    match s.kind {
        ProbeKind::RustJmp | ProbeKind::RustEnabled => f.rip = if on { s.target } else { next },
        ProbeKind::CCall => {
            if on {
                fire(id, &args);
            }
            f.rip = next;
        }
        ProbeKind::CTail => {
            if on {
                fire(id, &args);
            }
            ret(f);
        }
        ProbeKind::CEnabled => {
            f.rax = u64::from(on);
            f.rip = next;
        }
        ProbeKind::CEnabledTail => {
            f.rax = u64::from(on);
            ret(f);
        }
    }
    true
}

/// Fires probe `provider:name` with up to six integer or raw-pointer arguments.
///
/// Disabled (the default), the site is one 5-byte NOP: the arguments are not
/// evaluated. Enabled, the NOP becomes a `jmp` to an out-of-line block that evaluates
/// them and calls the dispatcher, then continues after the site.
///
/// ```ignore
/// kernel_loader::probe!(net, rx, len, port);
/// ```
#[macro_export]
macro_rules! probe {
    ($provider:ident, $name:ident $(, $arg:expr)* $(,)?) => {{
        const __KSITES_NARGS: u32 = 0 $(+ { let _ = ::core::stringify!($arg); 1 })*;
        const _: () = ::core::assert!(__KSITES_NARGS <= 6, "a probe takes at most 6 arguments");
        static __KSITES_REC: $crate::probe::ProbeRecord = $crate::probe::ProbeRecord::new(
            ::core::stringify!($provider),
            ::core::stringify!($name),
            __KSITES_NARGS,
        );
        // SAFETY: the asm is a 5-byte NOP plus a record in a data section; when the
        // loader turns the NOP into `jmp` to the label block, that block is ordinary code.
        unsafe {
            ::core::arch::asm!(
                "2: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                ".pushsection .ksites_probe_sites,\"awR\",@progbits",
                ".p2align 3",
                ".long 0x5053534b",
                ".long 0",
                ".quad 2b",
                ".quad {target}",
                ".quad {rec}",
                ".popsection",
                rec = sym __KSITES_REC,
                target = label {
                    #[allow(unused_mut, unused_assignments)]
                    let mut __ksites_args = [0u64; 6];
                    #[allow(unused_mut, unused_assignments)]
                    let mut __ksites_i = 0usize;
                    $(
                        __ksites_args[__ksites_i] = ($arg) as u64;
                        __ksites_i += 1;
                    )*
                    let _ = __ksites_i;
                    $crate::probe::ksites_probe_fire(&__KSITES_REC, &__ksites_args);
                },
                options(nostack, preserves_flags),
            );
        }
    }};
}

/// `true` while probe `provider:name` is enabled: guards expensive argument
/// preparation. Disabled, it is one 5-byte NOP and evaluates to `false`.
#[macro_export]
macro_rules! probe_enabled {
    ($provider:ident, $name:ident $(,)?) => {{
        static __KSITES_REC: $crate::probe::ProbeRecord = $crate::probe::ProbeRecord::new(
            ::core::stringify!($provider),
            ::core::stringify!($name),
            $crate::probe::RECORD_NARGS_NONE,
        );
        let mut __ksites_on = false;
        // SAFETY: as in `probe!`; the label block only sets a local.
        unsafe {
            ::core::arch::asm!(
                "2: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                ".pushsection .ksites_probe_sites,\"awR\",@progbits",
                ".p2align 3",
                ".long 0x5053534b",
                ".long 1",
                ".quad 2b",
                ".quad {target}",
                ".quad {rec}",
                ".popsection",
                rec = sym __KSITES_REC,
                target = label { __ksites_on = true; },
                options(nostack, preserves_flags),
            );
        }
        __ksites_on
    }};
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("net:*", "net", "rx"));
        assert!(glob_match("*:rx", "net", "rx"));
        assert!(glob_match("n?t:r*", "net", "rx"));
        assert!(glob_match("*", "a", "b"));
        assert!(glob_match("net:rx", "net", "rx"));
        assert!(!glob_match("net:tx", "net", "rx"));
        assert!(!glob_match("net", "net", "rx"));
        assert!(!glob_match("disk:*", "net", "rx"));
        assert!(glob_match("*x", "net", "rx"));
        assert!(super::glob_match_str(
            "__x86_indirect_thunk_*",
            "__x86_indirect_thunk_rax"
        ));
        assert!(super::glob_match_str("__fentry__", "__fentry__"));
        assert!(!super::glob_match_str("__fentry__", "__fentry"));
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;
    use crate::format::{ARCH_X86_64, HEADER_SIZE, Header, MAGIC, ProbeDesc, SubTable, VERSION};
    use std::sync::atomic::AtomicBool;
    use std::vec::Vec;

    /// A table with one probe `t:x` and no sites (fired directly through `fire`).
    fn one_probe_table() -> &'static [u8] {
        let strings = b"t\0x\0";
        let probes = HEADER_SIZE as u32;
        let strs = probes + crate::format::PROBE_DESC_SIZE as u32;
        let total = strs + strings.len() as u32;
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            arch: ARCH_X86_64,
            flags: 0,
            header_size: HEADER_SIZE as u32,
            total_size: total,
            ifuncs: SubTable {
                offset: probes,
                count: 0,
            },
            ifunc_sites: SubTable {
                offset: probes,
                count: 0,
            },
            probes: SubTable {
                offset: probes,
                count: 1,
            },
            probe_sites: SubTable {
                offset: strs,
                count: 0,
            },
            strings: SubTable {
                offset: strs,
                count: strings.len() as u32,
            },
        };
        let d = ProbeDesc {
            provider: 0,
            name: 2,
            nargs: 0,
            flags: 0,
        };
        let mut v: Vec<u8> = Vec::new();
        v.extend_from_slice(&h.to_bytes());
        v.extend_from_slice(&d.to_bytes());
        v.extend_from_slice(strings);
        // 8-aligned, as tables are.
        let words: Vec<u64> = v
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        let words: &'static [u64] = std::boxed::Box::leak(words.into_boxed_slice());
        // SAFETY: `words` is leaked, so it lives forever; u64 → u8 reinterpretation.
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), v.len()) }
    }

    struct NoSites;
    impl TextPoker for NoSites {
        unsafe fn write(&mut self, addr: u64, _: &[u8]) -> Result<(), PokeError> {
            Err(PokeError::new(addr, crate::patch::PokeFailure::Injected))
        }
        fn sync_cores(&mut self) {}
        fn end(&mut self) {}
    }

    static INSIDE: AtomicBool = AtomicBool::new(false);
    static ENTERED: AtomicU64 = AtomicU64::new(0);
    static LEFT: AtomicU64 = AtomicU64::new(0);

    fn slow(_: ProbeId, _: &[u64; 6]) {
        ENTERED.fetch_add(1, Ordering::SeqCst);
        INSIDE.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        INSIDE.store(false, Ordering::SeqCst);
        LEFT.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn disable_waits_for_cpus_still_in_the_handler() {
        let bytes = one_probe_table();
        let base = bytes.as_ptr() as u64;
        let t = Table::parse(bytes, base, &[]).unwrap();
        // SAFETY: the table is leaked (lives forever); it has no sites.
        let h = unsafe { register_module(t, base..base + bytes.len() as u64, &NoSites) }.unwrap();
        let id = ProbeId(h.base());
        // SAFETY: no sites: nothing is written.
        unsafe { enable(id, slow, &mut NoSites) }.unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let firer = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                fire(id.0, &[0; 6]);
            }
        });
        for _ in 0..10 {
            while !INSIDE.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            // A handler is running: disable must not return before it has left.
            // SAFETY: as above.
            unsafe { disable(id, &mut NoSites) }.unwrap();
            assert!(
                !INSIDE.load(Ordering::SeqCst),
                "disable returned mid-handler"
            );
            assert_eq!(ENTERED.load(Ordering::SeqCst), LEFT.load(Ordering::SeqCst));
            // SAFETY: as above.
            unsafe { enable(id, slow, &mut NoSites) }.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        firer.join().unwrap();
        // SAFETY: as above.
        unsafe { unregister_module(&h, 0..0, &mut NoSites) }.unwrap();
        assert!(lookup("t:x").is_none());
    }
}
