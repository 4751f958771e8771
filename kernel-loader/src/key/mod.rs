//! Static keys (jump labels): a `static_branch_unlikely!(FOO)` compiles to one
//! instruction, the architecture's probe site NOP, that falls through; enabling `FOO`
//! rewrites every such site, in the kernel and in every registered module, into a
//! branch to its label, in one live batch. No load, no compare on the fast path.
//!
//! ```ignore
//! kernel_loader::static_key!(pub TRACE_IRQS: default false);
//!
//! fn irq() {
//!     if kernel_loader::static_branch_unlikely!(TRACE_IRQS) {
//!         trace_irq(); // out of line, reached only while TRACE_IRQS is enabled
//!     }
//! }
//! // Later, on any CPU (the kernel's table registered with probe::register_image):
//! unsafe { TRACE_IRQS.enable(&mut poker) }?;
//! ```
//!
//! * A site **jumps** (holds the branch form) iff `enabled != likely`:
//!   `static_branch_unlikely!` is `false` on the fall-through and `true` at the label,
//!   `static_branch_likely!` the other way round. The build tool writes each site of a
//!   key the image defines in the form for the key's default; sites of a key another
//!   image defines (a module's sites of a kernel key) stay NOPs and the module loader
//!   sets them to the key's state before the module is published.
//! * [`StaticKey::enable`]/[`StaticKey::disable`] are idempotent (Linux's
//!   `static_key_enable`/`_disable`); [`StaticKey::inc`]/[`StaticKey::dec`] count
//!   (`static_key_slow_inc`/`_dec`), patching on 0↔1 only. The count is the key's
//!   state: enabled iff `count() > 0`.
//! * One batch per change, holding the registry lock (so it serialises with probe
//!   batches and module load and unload): every site of the key in every registered
//!   image, each checked to hold its old form before anything is written, written with
//!   the architecture's protocol (x86-64: int3, then the tail, then byte 0, a
//!   `sync_cores` after each round; aarch64 and riscv64: one store per site, one
//!   `sync_cores`), rolled back on a failed write. On any error the key's count is
//!   unchanged. Nothing allocates; text is written only through the [`TextPoker`].
//! * A CPU that reaches an x86-64 site while it holds the `int3` is emulated by
//!   [`crate::probe::handle_int3`] into the key's *published* state: the old one until
//!   every site passed the check, the new one after.
//!
//! Files: `batch` (the live batch over every image's sites of one key), `registry`
//! (changes under the registry lock, registering tables' key sites, the #BP emulation,
//! introspection), `macros` (`static_key!`, `static_branch_likely!`,
//! `static_branch_unlikely!` and the site record they emit).

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::name::Name;
use crate::patch::{InsnBytes, PokeError, TextPoker};

mod batch;
#[cfg(all(
    test,
    feature = "std",
    feature = "module",
    target_os = "linux",
    target_arch = "x86_64"
))]
mod host_tests;
mod macros;
pub(crate) mod registry;
#[cfg(test)]
mod tests;

pub use registry::{KeyInfo, Keys, keys};

/// First word of a [`StaticKey`] ("KSKY").
pub const KEY_MAGIC: u32 = u32::from_le_bytes(*b"KSKY");
/// Size of a [`StaticKey`] (and of C's `struct ksites_static_key`).
pub const KEY_SIZE: usize = 32;
/// Section holding one record per `static_branch_*!` site.
pub const SITE_RECORD_SECTION: &str = ".ksites_key_sites";
/// First word of a key site record ("KSKS").
pub const SITE_RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KSKS");
/// Size of a key site record: `u32 magic, u32 flags (bit 0: likely), u64 site, u64
/// target (the label), u64 key`.
pub const SITE_RECORD_SIZE: usize = 32;
/// Bit 0 of a key site record's flags: a `static_branch_likely!` site.
pub const SITE_RECORD_LIKELY: u32 = 1;

/// Byte offsets of a [`StaticKey`]'s fields (the build tool reads them).
pub mod layout {
    /// `u32` default: 0 or 1.
    pub const DEFAULT: usize = 4;
    /// `*const u8` name (not NUL-terminated).
    pub const NAME: usize = 8;
    /// `u64` name length.
    pub const NAME_LEN: usize = 16;
    /// `u32` enable count (starts at the default).
    pub const COUNT: usize = 24;
    /// `u32` the loader's published state (0 in the image).
    pub const STATE: usize = 28;
}

/// `state` bit: a batch published the state in bit 0 (until then the key's sites are
/// in the default's form).
const STATE_SET: u32 = 2;

/// A static key: a boolean whose test is a patched instruction. Define one with
/// [`static_key!`](crate::static_key) (or `KSITES_STATIC_KEY_FALSE`/`_TRUE` in C); test
/// it with [`static_branch_unlikely!`](crate::static_branch_unlikely) or
/// [`static_branch_likely!`](crate::static_branch_likely).
///
/// `#[repr(C)]`, 32 bytes, in writable data: magic `KSKY`, default, name pointer and
/// length, the enable count, the published state ([`layout`]).
#[repr(C)]
pub struct StaticKey {
    magic: u32,
    default: u32,
    name: *const u8,
    name_len: usize,
    count: AtomicU32,
    /// Written only under the registry lock; read by the #BP hook. 0 until a batch
    /// publishes a state ([`STATE_SET`] | state).
    state: AtomicU32,
}

const _: () = assert!(core::mem::size_of::<StaticKey>() == KEY_SIZE);
const _: () = assert!(core::mem::align_of::<StaticKey>() == 8);
const _: () = assert!(core::mem::offset_of!(StaticKey, count) == layout::COUNT);
const _: () = assert!(core::mem::offset_of!(StaticKey, state) == layout::STATE);
const _: () = assert!(core::mem::offset_of!(StaticKey, name_len) == layout::NAME_LEN);

// SAFETY: the only constructor takes a `&'static str`, so `name` points to immutable
// data that lives as long as the key, and is only read; the rest is atomic or
// immutable.
unsafe impl Sync for StaticKey {}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKey")
            .field("name", &self.name())
            .field("default", &self.default())
            .field("count", &self.count())
            .finish()
    }
}

impl StaticKey {
    /// A key named `name`, enabled at boot iff `default` (its count starts at 0 or 1).
    pub const fn new(name: &'static str, default: bool) -> StaticKey {
        StaticKey {
            magic: KEY_MAGIC,
            default: default as u32,
            name: name.as_ptr(),
            name_len: name.len(),
            count: AtomicU32::new(default as u32),
            state: AtomicU32::new(0),
        }
    }

    /// The key's name (`module::path::NAME` for [`static_key!`](crate::static_key)).
    pub fn name(&self) -> &str {
        // SAFETY: `new` took a `&'static str` (C keys: the macro's string literal and
        // its length), immutable for as long as the key lives.
        let b = unsafe { core::slice::from_raw_parts(self.name, self.name_len) };
        core::str::from_utf8(b).unwrap_or("?")
    }

    /// The key's state at boot.
    pub fn default(&self) -> bool {
        self.default != 0
    }

    /// Whether the key is enabled (its count is above 0). A snapshot: another CPU may
    /// be changing it.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// The enable count.
    #[inline]
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }

    /// The state the #BP hook emulates a trapped site into: the last state a batch
    /// published, or the default before any batch.
    #[inline(always)]
    pub(crate) fn published(&self) -> bool {
        let s = self.state.load(Ordering::SeqCst);
        if s & STATE_SET != 0 {
            s & 1 != 0
        } else {
            self.default != 0
        }
    }

    /// Publishes `on` for the #BP hook (the registry lock is held).
    #[inline]
    pub(crate) fn publish(&self, on: bool) {
        self.state.store(STATE_SET | on as u32, Ordering::SeqCst);
    }

    /// The key's address (what tables name it by).
    #[inline]
    pub(crate) fn addr(&self) -> u64 {
        self as *const StaticKey as u64
    }

    /// Enables the key (idempotent, as Linux's `static_key_enable`): if its count is
    /// 0, moves every site to its enabled form in one batch and sets the count to 1;
    /// otherwise changes nothing.
    ///
    /// # Safety
    ///
    /// As for [`crate::probe::enable`]: `poker` writes live text safely for every CPU
    /// that may run it, and serializes every CPU; on x86-64 the kernel's #BP handler
    /// calls [`crate::probe::handle_int3`] (and [`crate::probe::declare_int3_route`]
    /// said so).
    pub unsafe fn enable<P: TextPoker + ?Sized>(
        &'static self,
        poker: &mut P,
    ) -> Result<(), KeyError> {
        // SAFETY: forwarded.
        unsafe { registry::change(self, Op::Enable, poker) }
    }

    /// Disables the key (idempotent): if its count is above 0, moves every site to its
    /// disabled form in one batch and sets the count to 0.
    ///
    /// # Safety
    ///
    /// As for [`StaticKey::enable`].
    pub unsafe fn disable<P: TextPoker + ?Sized>(
        &'static self,
        poker: &mut P,
    ) -> Result<(), KeyError> {
        // SAFETY: forwarded.
        unsafe { registry::change(self, Op::Disable, poker) }
    }

    /// Adds one to the count (Linux's `static_key_slow_inc`); 0 → 1 enables the sites
    /// in one batch.
    ///
    /// # Safety
    ///
    /// As for [`StaticKey::enable`].
    pub unsafe fn inc<P: TextPoker + ?Sized>(&'static self, poker: &mut P) -> Result<(), KeyError> {
        // SAFETY: forwarded.
        unsafe { registry::change(self, Op::Inc, poker) }
    }

    /// Takes one from the count (Linux's `static_key_slow_dec`); 1 → 0 disables the
    /// sites in one batch; at 0, [`KeyError::Underflow`] and nothing changes.
    ///
    /// # Safety
    ///
    /// As for [`StaticKey::enable`].
    pub unsafe fn dec<P: TextPoker + ?Sized>(&'static self, poker: &mut P) -> Result<(), KeyError> {
        // SAFETY: forwarded.
        unsafe { registry::change(self, Op::Dec, poker) }
    }
}

/// A change of a key's count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Enable,
    Disable,
    Inc,
    Dec,
}

/// Why a key operation (or registering a table's keys) failed. On every error the
/// key's count is unchanged and no site is left changed (but see
/// [`KeyError::RollbackIncomplete`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The kernel's table is not registered (`probe::register_image`), so the
    /// registry does not know the key's sites.
    NotRegistered,
    /// x86-64: a batch writes `int3` over live sites, and no #BP route was declared
    /// (`probe::declare_int3_route`). Nothing was written.
    NoTrapRoute,
    /// `dec` of a key whose count is 0.
    Underflow {
        /// The key's name.
        key: Name,
    },
    /// `inc` of a key whose count is `u32::MAX`.
    Overflow {
        /// The key's name.
        key: Name,
    },
    /// A table names, as a key, an object that is not one (wrong magic, or
    /// misaligned).
    NotAKey {
        /// The address the table gives.
        addr: u64,
    },
    /// A site does not hold the form its key's state calls for.
    UnexpectedBytes {
        /// The site.
        site: u64,
        /// The key's name.
        key: Name,
        /// What it should hold.
        expected: InsnBytes,
        /// What it holds.
        found: InsnBytes,
    },
    /// A site's branch cannot reach its label.
    OutOfReach {
        /// The site.
        site: u64,
        /// The label.
        target: u64,
    },
    /// The kernel's poker failed; every site of the batch was restored.
    Poke(PokeError),
    /// A write failed, and restoring failed too at this site. The key keeps its old
    /// count and state; the site may still start with the trap (emulated by the #BP
    /// hook), and the next batch accepts and rewrites it.
    RollbackIncomplete {
        /// The first site that could not be restored.
        site: u64,
        /// The key's name.
        key: Name,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotRegistered => write!(
                f,
                "static keys need the kernel's table registered (probe::register_image)"
            ),
            KeyError::NoTrapRoute => write!(
                f,
                "static keys need a #BP route: install kernel_loader::probe::int3_entry in \
                 IDT vector 3 (or call probe::handle_int3 from your own #BP handler) and \
                 call probe::declare_int3_route()"
            ),
            KeyError::Underflow { key } => {
                write!(f, "static key {key}: dec with a count of 0")
            }
            KeyError::Overflow { key } => {
                write!(f, "static key {key}: inc past a count of {}", u32::MAX)
            }
            KeyError::NotAKey { addr } => write!(
                f,
                "the table names {addr:#x} as a static key, but no key is there (bad magic \
                 or alignment)"
            ),
            KeyError::UnexpectedBytes {
                site,
                key,
                expected,
                found,
            } => write!(
                f,
                "static key {key} site {site:#x}: expected bytes [{expected}], found [{found}]"
            ),
            KeyError::OutOfReach { site, target } => write!(
                f,
                "static key site {site:#x} cannot reach its label {target:#x} with the \
                 architecture's branch"
            ),
            KeyError::Poke(e) => write!(f, "{e} (key batch rolled back)"),
            KeyError::RollbackIncomplete { site, key } => write!(
                f,
                "static key {key}: a write failed and site {site:#x} could not be restored \
                 (it is emulated through the trap handler until the next batch rewrites it)"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for KeyError {}
