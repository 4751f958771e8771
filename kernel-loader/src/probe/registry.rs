//! The probe registry's operations: registering the kernel's and modules' tables (each
//! gets a run of global ids), unregistering a module, enabling and disabling probes
//! (through [`super::batch`]), and queries (`lookup`, `matching`, `info`, `count`,
//! `handler_in`). Its storage lives in [`super::state`].

use core::ops::Range;
use core::sync::atomic::Ordering;

use super::batch::{self, check_disabled};
use super::glob::glob_match;
use super::percpu;
use super::state::{self, Control, STATES, images};
use super::trap::check_route;
use super::{Handler, MAX_PROBES, Name, ProbeError, ProbeId};
use crate::arch::Arch;
use crate::format::Table;
use crate::patch::TextPoker;

/// Registers the kernel image's table: checks every probe site holds its disabled form,
/// and every static-key site the form of its key's default (as the build tool wrote it;
/// keys cannot change before this: `crate::key` refuses with `NotRegistered`).
/// It reads each key object the table names (its magic): pass the running image's own
/// table (from [`crate::cell::image_table`]).
/// Call once at boot (after [`crate::patch::init`] or before: they touch different
/// sites). The kernel's probes get the first free run of ids (`0..n` when it registers
/// before any module, as at boot). Returns `n`.
pub fn register_image<P: TextPoker + ?Sized>(
    table: Table<'static>,
    poker: &P,
) -> Result<u32, ProbeError> {
    native_only(table.arch())?;
    let mut lock = state::lock();
    if state::kernel_registered(&lock) {
        return Err(ProbeError::AlreadyRegistered);
    }
    check_disabled(&table, poker)?;
    // SAFETY: the kernel's table names its own key objects (the build tool wrote their
    // addresses from the image's key site records).
    unsafe { crate::key::registry::check_sites(&table, poker) }.map_err(ProbeError::Key)?;
    let n = table.probe_count();
    let base = state::free_ids(n, &lock).ok_or(ProbeError::TooManyProbes(n))?;
    state::publish(0, table, base, 0..0, &mut lock);
    Ok(n)
}

/// Refuses a table written for another architecture than the native one: batches
/// write the native architecture's probe bytes.
fn native_only(arch: Arch) -> Result<(), ProbeError> {
    check_arch_id(arch.id())
}

/// [`native_only`] on a header id (testable with ids no [`Arch`] has yet).
fn check_arch_id(id: u16) -> Result<(), ProbeError> {
    if id == Arch::native().id() {
        Ok(())
    } else {
        Err(ProbeError::WrongArch(id))
    }
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
/// Every probe site must hold its disabled form, every static-key site the form of its
/// key's current state ([`register_loaded_module`] sets them); `range` is the module's
/// whole memory (its `ProbeRecord`s and sites lie there). Imported ifunc sites are taken
/// as they are: a loader that patched them (`patch::init`) before a retarget of the
/// kernel ifunc and registers after it leaves them on the old implementation, and the
/// next retarget then refuses them ([`register_loaded_module`], which `Module::load`
/// uses, brings them to the current one under the registry lock).
///
/// # Safety
///
/// The table's memory stays valid and unchanged until [`unregister_module`] returns;
/// its key addresses are the module's key objects or keys of registered images.
pub unsafe fn register_module<P: TextPoker + ?Sized>(
    table: Table<'_>,
    range: Range<u64>,
    poker: &P,
) -> Result<ImageHandle, ProbeError> {
    // SAFETY: forwarded.
    unsafe { register_module_keyed(table, range, KeyMode::Check(poker)) }
}

/// [`register_module`] for a module no CPU runs yet (the module loader's step 7): its
/// static-key sites are first set, under the registry lock, to the form of their keys'
/// current state (a module's sites of a kernel key enabled since boot jump from the
/// start), so a key change either sees the module or happened before it was set.
///
/// # Safety
///
/// As for [`register_module`]; no CPU executes the module's text yet, and `poker` can
/// write it.
pub unsafe fn register_loaded_module<P: TextPoker + ?Sized>(
    table: Table<'_>,
    range: Range<u64>,
    poker: &mut P,
) -> Result<ImageHandle, ProbeError> {
    // SAFETY: forwarded.
    unsafe { register_module_keyed(table, range, KeyMode::Set(poker)) }
}

/// What registering does with a module's key sites.
enum KeyMode<'p, P: ?Sized> {
    /// Check they hold their keys' forms.
    Check(&'p P),
    /// Set them (no CPU runs the module yet).
    Set(&'p mut P),
}

/// [`register_module`], with the module's key sites checked or set.
///
/// # Safety
///
/// As for [`register_module`] (and [`register_loaded_module`] with `KeyMode::Set`).
unsafe fn register_module_keyed<P: TextPoker + ?Sized>(
    table: Table<'_>,
    range: Range<u64>,
    keys: KeyMode<'_, P>,
) -> Result<ImageHandle, ProbeError> {
    // SAFETY: the caller keeps the table alive until it is unregistered, which removes
    // every reference the registry holds (`state::free` waits for lock-free readers).
    let table: Table<'static> = unsafe { core::mem::transmute::<Table<'_>, Table<'static>>(table) };
    native_only(table.arch())?;
    let mut lock = state::lock();
    let poker: &P = match &keys {
        KeyMode::Check(p) => p,
        KeyMode::Set(p) => p,
    };
    check_disabled(&table, poker)?;
    let n = table.probe_count();
    let slot = state::free_module_slot(&lock).ok_or(ProbeError::TooManyImages)?;
    let base = state::free_ids(n, &lock).ok_or(ProbeError::TooManyProbes(n))?;
    // Last, as it may write (nothing fails after it but the keys' own errors).
    let keyed = match keys {
        // SAFETY: the caller's: the table's key addresses are key objects.
        KeyMode::Check(p) => unsafe { crate::key::registry::check_sites(&table, p) },
        // SAFETY: as above; no CPU runs the module's text yet (caller).
        KeyMode::Set(p) => {
            // Its imported ifunc sites follow any retarget since `patch::init` read the
            // kernel's slots (a retarget from now on sees the module).
            let tables = state::images(&lock).map(|d| &d.table);
            // SAFETY: no CPU runs the module's text yet (caller); the images are live.
            unsafe { crate::ifunc::refresh_imports(&table, tables, p) }
                .map_err(ProbeError::Retarget)?;
            // SAFETY: as above.
            unsafe { crate::key::registry::set_sites(&table, p, &lock) }.map(|_| ())
        }
    };
    keyed.map_err(ProbeError::Key)?;
    state::publish(slot, table, base, range, &mut lock);
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
        let lock = state::lock();
        if let Some((probe, handler)) = handlers_into(handle, &code, &lock) {
            return Err(ProbeError::HandlerInModule { probe, handler });
        }
    }
    for id in handle.ids() {
        if is_enabled(id) {
            // SAFETY: forwarded.
            unsafe { disable(id, poker)? };
        }
    }
    let mut lock = state::lock();
    // Re-check under the lock that frees the slot: an enable between the check above
    // and here (of one of its probes, or of any probe with a handler in its code) wins.
    if let Some((probe, handler)) = enabled_into(handle, &code, &lock) {
        return Err(ProbeError::HandlerInModule { probe, handler });
    }
    state::free(handle.slot, handle.ids(), poker, &mut lock);
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
    let lock = state::lock();
    handlers_into(except.unwrap_or(&none), code, &lock)
}

/// An enabled probe of another image whose handler lies in `code`.
fn handlers_into(
    handle: &ImageHandle,
    code: &Range<u64>,
    lock: &Control,
) -> Option<(ProbeId, u64)> {
    for d in images(lock) {
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

/// [`handlers_into`], or an enabled probe of the module itself.
fn enabled_into(handle: &ImageHandle, code: &Range<u64>, lock: &Control) -> Option<(ProbeId, u64)> {
    handlers_into(handle, code, lock).or_else(|| {
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
    /// Times it fired while enabled (summed over the CPUs' own counters: a snapshot
    /// while it fires on other CPUs).
    pub hits: u64,
    /// Whether it is enabled.
    pub enabled: bool,
}

/// Information about probe `id`.
pub fn info(id: ProbeId) -> Option<ProbeInfo> {
    let lock = state::lock();
    let (d, local) = state::image_of(id, &lock)?;
    let p = d.table.probe(local)?;
    let st = &STATES[id.0 as usize];
    Some(ProbeInfo {
        id,
        provider: Name::new(p.provider),
        name: Name::new(p.name),
        nargs: p.nargs,
        sites: d.table.probe_sites().filter(|s| s.probe == local).count() as u32,
        hits: percpu::hits(id.0 as usize),
        enabled: st.enabled.load(Ordering::Relaxed),
    })
}

/// Number of registered probes, in all images.
pub fn count() -> u32 {
    let lock = state::lock();
    images(&lock).map(|d| d.table.probe_count()).sum()
}

/// The probe named `provider:name` (the first image that has it, kernel first).
pub fn lookup(spec: &str) -> Option<ProbeId> {
    let (prov, name) = spec.split_once(':')?;
    let lock = state::lock();
    images(&lock).find_map(|d| {
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
        let lock = state::lock();
        for d in images(&lock) {
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

/// Whether probe `id` is enabled.
pub fn is_enabled(id: ProbeId) -> bool {
    STATES
        .get(id.0 as usize)
        .is_some_and(|s| s.enabled.load(Ordering::Relaxed))
}

/// Enables probe `id`: every site of it starts calling `handler`. Refuses with
/// [`ProbeError::NoTrapRoute`] (nothing written) until the kernel called
/// [`super::declare_int3_route`].
///
/// # Safety
///
/// `poker` writes the image's live text safely for the CPUs that may run it (an alias
/// mapping or CR0.WP, and a `sync_cores` that serializes every CPU), and the kernel's
/// #BP handler calls [`super::handle_int3`].
pub unsafe fn enable<P: TextPoker + ?Sized>(
    id: ProbeId,
    handler: Handler,
    poker: &mut P,
) -> Result<(), ProbeError> {
    check_route()?;
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

/// Sets probe `id`'s handler (if given) and moves it to state `on`.
///
/// # Safety
///
/// As for [`enable`].
unsafe fn set_state<P: TextPoker + ?Sized>(
    id: ProbeId,
    on: bool,
    handler: Option<Handler>,
    poker: &mut P,
) -> Result<(), ProbeError> {
    let lock = state::lock();
    let (d, local) = state::image_of(id, &lock).ok_or(ProbeError::NoSuchProbe(id))?;
    let st = &STATES[id.0 as usize];
    if let Some(h) = handler {
        let old = st.handler.swap(h as usize, Ordering::SeqCst);
        if old != h as usize && st.enabled.load(Ordering::SeqCst) {
            // Live handler change: no CPU may still run the old one when this returns.
            // Every CPU serializes after the swap (each then reads the new handler or
            // is seen inside its section), then the drain waits for those sections.
            poker.sync_cores();
            st.drain();
        }
    }
    if st.enabled.load(Ordering::Acquire) == on {
        return Ok(());
    }
    // SAFETY: `d.table` is the probe's live table, kept from being unregistered by the
    // lock; the rest is forwarded.
    unsafe { batch::switch(&d.table, ProbeId(local), id, st, on, poker) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ids;

    #[test]
    fn a_table_of_another_architecture_is_refused() {
        assert_eq!(native_only(Arch::native()), Ok(()));
        assert_eq!(check_arch_id(Arch::native().id()), Ok(()));
        // The other supported architecture's tables too: batches write native bytes.
        let other = if Arch::native() == Arch::X86_64 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        for id in [other.id(), ids::RISCV64, 0] {
            assert_eq!(check_arch_id(id), Err(ProbeError::WrongArch(id)));
        }
        let msg = std::format!("{}", ProbeError::WrongArch(other.id()));
        let native = std::format!("{} ({})", Arch::native(), Arch::native().id());
        let named = std::format!("{} ({})", other.id(), other);
        assert!(msg.contains(&named) && msg.contains(&native), "{msg}");
        let msg = std::format!("{}", ProbeError::WrongArch(9));
        assert!(msg.contains("architecture 9,"), "{msg}");
    }
}
