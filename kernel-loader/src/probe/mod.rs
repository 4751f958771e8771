//! SDT probes: the `probe!` / `probe_enabled!` macros, the registry, the dispatchers, and
//! live enable/disable with the architecture's live-patch (trap) protocol.
//!
//! A disabled probe site is one instruction that does nothing (see
//! [`ProbeKind`](crate::format::ProbeKind) for every form). Enabling a probe rewrites all its sites in one batch:
//!
//! 1. check each site holds exactly its old bytes and write the architecture's trap over
//!    its first byte (on x86-64, `cc`), in one walk; a site that fails the check stops
//!    the batch and the sites already trapped are put back (a trapping CPU is emulated
//!    into the old instruction meanwhile), so no handler ever sees the new state (an
//!    architecture whose forms may be overwritten in one store, `SINGLE_STORE` — aarch64
//!    — only checks here, and writes nothing);
//! 2. publish the new state, so a CPU that traps on a half-written site is emulated
//!    into the *new* instruction by [`handle_int3`];
//! 3. the architecture's rounds (on x86-64: serialize all CPUs; write the operand bytes,
//!    serialize; write byte 0, serialize; on aarch64 one round: store each site's new
//!    instruction, then one `ISB` on every CPU): rounds of IPIs per batch, not per site;
//! 4. wait until no CPU is still inside [`handle_int3`].
//!
//! A failed write rolls every site of the batch back with the same routine.
//!
//! The trap handler reads only the registered table and the static per-probe state,
//! which live as long as the image; a counter of CPUs inside the handler lets a batch
//! wait for them to leave. There is no per-batch descriptor to be freed or cleared under
//! a running handler (the bug Linux shipped twice).
//!
//! Firing an enabled probe writes only the firing CPU's own data (its read-side section
//! depth and hit counters, `percpu`, given a CPU index: a word at a fixed offset from
//! the per-CPU base register, [`set_cpu_index_word`], read with one load, or a hook,
//! [`set_cpu_index`]), except that the first fire of a `probe!` site's record caches
//! the probe's global id in the record (then it is only read, and dispatch needs no
//! image lookup); a
//! disable, a live handler change and a module unload publish the change, serialize
//! every CPU through the poker and wait for the sections still open (RCU-like). A
//! handler must therefore not wait for the registry lock (a drain holds it while it
//! waits for the handler), nor for anything a thread that enables or disables probes
//! may hold.
//!
//! Files, by job (each imports only those listed after it, and the architecture's
//! `arch::native::probe` imports none of them):
//!
//! * `registry`: registering tables, enable/disable, queries;
//! * `batch`: the live-patch protocol over one probe's sites, and its rollback;
//! * `dispatch`: `fire`, the entry points, the #BP hook;
//! * `trap`: the ready #BP entry stub ([`int3_entry`]), its hook and fallback, and the
//!   route declaration [`enable`] requires ([`declare_int3_route`]);
//! * `state`: the registry's storage and its lock;
//! * `percpu`: the dispatchers' per-CPU read-side sections and hit counters, and the
//!   writers' wait for them;
//! * `records`: the records and the `probe!`/`probe_enabled!` macros;
//! * `glob`: name matching;
//! * `inspect`: introspection (every probe, each site's state from its live bytes).

use core::fmt;

use crate::arch::{Arch, ids};
pub use crate::name::Name;
use crate::patch::{InsnBytes, PokeError};

mod batch;
mod dispatch;
mod glob;
mod inspect;
mod percpu;
mod records;
mod registry;
pub(crate) mod state;
mod trap;

pub use crate::arch::native::probe::CPU_BASE;
#[cfg(any(target_arch = "x86_64", target_arch = "riscv64"))]
pub use crate::arch::native::probe::{C_ENABLED_OFF, C_ENABLED_ON, C_TAIL_OFF};
pub use crate::arch::native::probe::{
    C_TAIL_ON, Int3Frame, STUB_SYMBOLS, Stubs, ksites_probe_ret0, ksites_probe_ret1,
};
pub use batch::{site_bytes, site_bytes_with};
pub use dispatch::{
    handle_int3, int3_drain_waits, int3_emulations, ksites_probe_c_entry, ksites_probe_fire,
};
pub use glob::{glob_match, glob_match_str};
pub use inspect::{ProbeSiteImage, ProbeSiteInfo, ProbeSiteState, ProbeSites, probe_sites, probes};
pub use percpu::{CpuIndex, MAX_CPUS, set_cpu_index, set_cpu_index_word};
pub use records::{
    DECL_MAGIC, DECL_SECTION, DECL_SIZE, PROBE_RECORD_MAGIC, ProbeRecord, RECORD_NARGS_NONE,
    SITE_RECORD_MAGIC, SITE_RECORD_SECTION, SITE_RECORD_SIZE, UNASSIGNED, decl, record,
};
pub use registry::{
    ImageHandle, ProbeInfo, count, disable, disable_handlers_in, enable, handler_in, info,
    is_enabled, lookup, matching, register_image, register_loaded_module, register_module,
    unregister_module,
};
pub use state::MAX_IMAGES;
pub(crate) use state::lock_images;
#[cfg(target_arch = "x86_64")]
pub(crate) use state::with_table_at;
#[cfg(target_arch = "aarch64")]
pub use trap::handle_brk;
#[cfg(target_arch = "riscv64")]
pub use trap::handle_ebreak;
pub use trap::{
    Int3Hook, declare_int3_route, int3_route_declared, set_int3_fallback, set_int3_hook,
};
#[cfg(target_arch = "x86_64")]
pub use trap::{int3_entry, int3_entry_address};

/// Most probes the registry holds.
pub const MAX_PROBES: usize = 1024;

/// A probe, by its global id: the kernel's probes first (its table's indices, when it
/// registers first), each module's after, in one run from its table's index 0. Ids of
/// an unloaded module are reused by the next module that fits: look ids up again
/// (`lookup`) after loading or unloading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(pub u32);

/// Called with the probe's id and its arguments (unused ones are 0).
///
/// A handler runs on the CPU that fired the probe, possibly in trap context (see
/// [`handle_int3`]). It must not wait for the registry lock (call [`info`], [`lookup`],
/// [`matching`], [`count`], [`enable`], …) nor for anything a CPU that enables or
/// disables probes may hold: `disable`, a handler change and module unload wait, under
/// the lock, for every CPU inside a handler. It may fire probes (nesting is counted).
pub type Handler = fn(ProbeId, &[u64; 6]);

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
    /// The table was written for another architecture than the one this kernel runs
    /// (its header's architecture id): its sites would be patched with the wrong bytes.
    WrongArch(u16),
    /// An enabled form cannot reach its target from the site's branch.
    OutOfReach {
        /// Site address.
        site: u64,
        /// Target.
        target: u64,
    },
    /// The kernel's poker failed; every site of the batch was restored.
    Poke(PokeError),
    /// [`enable`] before [`declare_int3_route`]: a CPU reaching a site while a batch
    /// writes it (or an enabled C tail site) executes `int3`, which must reach
    /// [`handle_int3`]. Nothing was written.
    NoTrapRoute,
    /// The kernel's poker failed, and restoring failed too at this site. The probe is
    /// in its old state; the site may still start with the architecture's trap
    /// (emulated by the trap handler) and the next enable/disable accepts and rewrites
    /// it.
    RollbackIncomplete {
        /// The first site that could not be restored.
        site: u64,
        /// The probe.
        probe: ProbeId,
    },
    /// The table's static keys: a key address that is no key object, a key site not in
    /// the form its key's state calls for, or (a module's) a failed write setting them.
    Key(crate::key::KeyError),
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
            ProbeError::WrongArch(id) => {
                write!(f, "probe table is for architecture {id}")?;
                if let Some(name) = ids::name(*id) {
                    write!(f, " ({name})")?;
                }
                let native = Arch::native();
                write!(f, ", this kernel runs {native} ({})", native.id())
            }
            ProbeError::OutOfReach { site, target } => {
                write!(
                    f,
                    "probe site {site:#x} cannot reach {target:#x} from the site's branch"
                )
            }
            ProbeError::Poke(e) => write!(f, "{e} (batch rolled back)"),
            ProbeError::NoTrapRoute => write!(
                f,
                "probes need a #BP route: install kernel_loader::probe::int3_entry in IDT \
                 vector 3 (or call probe::handle_int3 from your own #BP handler) and call \
                 probe::declare_int3_route()"
            ),
            ProbeError::RollbackIncomplete { site, probe } => write!(
                f,
                "probe {}: a write failed and site {site:#x} could not be restored (it is \
                 emulated through the trap handler until the next batch rewrites it)",
                probe.0
            ),
            ProbeError::Key(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProbeError {}
