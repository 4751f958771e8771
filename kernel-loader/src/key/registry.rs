//! Keys and the probe registry's images: a count change and its batch under the
//! registry lock ([`change`]), the key sites of a table being registered (checked for
//! the kernel, set for a module before it is published), the #BP emulation of a key
//! site, and introspection ([`keys`]).

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use super::batch::{Batch, insn, read_site};
use super::{KeyError, Op, StaticKey};
use crate::arch::LiveProtocol;
use crate::arch::native::key as arch;
use crate::arch::native::probe::{self as probe_arch, Int3Frame};
use crate::format::{KSite, Table};
use crate::name::Name;
use crate::patch::TextPoker;
use crate::probe::state::{self, Control, INT3_EMULATIONS, images};

/// The key object a registered table names at `addr`.
///
/// # Safety
///
/// `addr` is a key address of a table that passed [`check_keys`] and whose image is
/// still registered (or being registered), and the caller is inside a read-side
/// section or holds the registry lock, so a module's key is not freed meanwhile.
#[inline(always)]
unsafe fn key_at<'k>(addr: u64) -> &'k StaticKey {
    // SAFETY: forwarded: `check_keys` read a `StaticKey`'s magic there, 8-aligned.
    unsafe { &*(addr as usize as *const StaticKey) }
}

/// Checks every key `t` names is a key object (its magic, 8-aligned).
///
/// # Safety
///
/// Every key address of `t` is mapped, readable memory: the image's relocated table
/// names its own key objects (and a module's imports, the kernel's).
pub(crate) unsafe fn check_keys(t: &Table<'_>) -> Result<(), KeyError> {
    for i in 0..t.key_count() {
        let addr = t.key_object(i).unwrap_or(0);
        if addr == 0 || !addr.is_multiple_of(8) {
            return Err(KeyError::NotAKey { addr });
        }
        // SAFETY: mapped and readable (precondition), 8-aligned, and a `StaticKey`'s
        // magic is its first, plain `u32`.
        let magic = unsafe { core::ptr::read_volatile(addr as usize as *const u32) };
        if magic != super::KEY_MAGIC {
            return Err(KeyError::NotAKey { addr });
        }
    }
    Ok(())
}

/// The form site `s` of `t` should hold now, and the form of the other state.
///
/// # Safety
///
/// `t` passed [`check_keys`]; as for [`key_at`].
unsafe fn forms<A: LiveProtocol>(
    t: &Table<'_>,
    s: &KSite,
    stubs: &A::Stubs,
    site_ref: fn(u64, u64) -> crate::arch::ProbeSiteRef,
) -> Result<(u64, u64, Name), KeyError> {
    let addr = t.key_object(s.key).unwrap_or(0);
    // SAFETY: forwarded.
    let key = unsafe { key_at(addr) };
    let on = key.published();
    let word = |enabled: bool| {
        A::site_word(&site_ref(s.addr, s.target), s.jumps(enabled), stubs).map_err(|target| {
            KeyError::OutOfReach {
                site: s.addr,
                target,
            }
        })
    };
    Ok((word(on)?, word(!on)?, Name::new(key.name())))
}

/// Checks every key site of `t` holds the form of its key's current state (the
/// kernel's table at registration: the build tool wrote each site in its key's
/// default form, and no key can change before the kernel's table is registered).
///
/// # Safety
///
/// As for [`check_keys`], which this runs first.
pub(crate) unsafe fn check_sites<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    poker: &P,
) -> Result<(), KeyError> {
    // SAFETY: forwarded.
    unsafe { check_keys(t) }?;
    let stubs = arch::stubs();
    for s in t.key_sites() {
        // SAFETY: `check_keys` passed.
        let (want, _, key) = unsafe { forms::<arch::Live>(t, &s, &stubs, arch::site_ref) }?;
        let found = read_site::<arch::Live, P>(poker, s.addr);
        if found != want {
            return Err(KeyError::UnexpectedBytes {
                site: s.addr,
                key,
                expected: insn::<arch::Live>(want),
                found: insn::<arch::Live>(found),
            });
        }
    }
    Ok(())
}

/// Sets every key site of `t`, a module's table not yet published, to the form of its
/// key's current state (a kernel key enabled since boot, say): checks every site holds
/// one of its two forms, then writes those that need it (a whole site per write: no
/// CPU runs the module's text yet), then serializes every CPU once. Returns how many
/// sites it wrote. A failed write is returned as is: the module is then not
/// registered, and its text, which no CPU ran, is freed by the module loader.
///
/// # Safety
///
/// As for [`check_keys`]; no CPU executes `t`'s image's text yet, and `poker` can
/// write it. The caller holds the registry lock (`_lock`), so no key changes meanwhile.
pub(crate) unsafe fn set_sites<P: TextPoker + ?Sized>(
    t: &Table<'_>,
    poker: &mut P,
    _lock: &Control,
) -> Result<u32, KeyError> {
    // SAFETY: forwarded.
    unsafe { set_sites_with::<arch::Live, P>(t, poker, arch::stubs(), arch::site_ref) }
}

/// [`set_sites`] with protocol `A`'s encodings.
///
/// # Safety
///
/// As for [`set_sites`].
pub(super) unsafe fn set_sites_with<A: LiveProtocol, P: TextPoker + ?Sized>(
    t: &Table<'_>,
    poker: &mut P,
    stubs: A::Stubs,
    site_ref: fn(u64, u64) -> crate::arch::ProbeSiteRef,
) -> Result<u32, KeyError> {
    // SAFETY: forwarded.
    unsafe { check_keys(t) }?;
    let mut stale = 0;
    for s in t.key_sites() {
        // SAFETY: `check_keys` passed.
        let (want, other, key) = unsafe { forms::<A>(t, &s, &stubs, site_ref) }?;
        let found = read_site::<A, P>(poker, s.addr);
        if found == other {
            stale += 1;
        } else if found != want {
            return Err(KeyError::UnexpectedBytes {
                site: s.addr,
                key,
                expected: insn::<A>(want),
                found: insn::<A>(found),
            });
        }
    }
    if stale == 0 {
        return Ok(0);
    }
    poker.begin().map_err(KeyError::Poke)?;
    let mut written = 0;
    let mut result = Ok(());
    for s in t.key_sites() {
        // SAFETY: as above; checked in the first pass.
        let (want, other, _) = unsafe { forms::<A>(t, &s, &stubs, site_ref) }?;
        if read_site::<A, P>(poker, s.addr) != other {
            continue;
        }
        let b = want.to_le_bytes();
        // SAFETY: a validated site of the module's text, which no CPU runs yet.
        if let Err(e) = unsafe { poker.write(s.addr, &b[..A::SITE_LEN]) } {
            result = Err(KeyError::Poke(e));
            break;
        }
        written += 1;
    }
    poker.sync_cores();
    poker.end();
    result.map(|()| written)
}

/// Applies `op` to `key`'s count under the registry lock, with one batch over every
/// registered image's sites of the key on a 0↔1 change.
///
/// # Safety
///
/// As for [`StaticKey::enable`].
pub(super) unsafe fn change<P: TextPoker + ?Sized>(
    key: &'static StaticKey,
    op: Op,
    poker: &mut P,
) -> Result<(), KeyError> {
    let lock = state::lock();
    if !state::kernel_registered(&lock) {
        return Err(KeyError::NotRegistered);
    }
    let count = key.count.load(Ordering::Acquire);
    let name = || Name::new(key.name());
    let (new, to) = match (op, count) {
        (Op::Enable, 0) | (Op::Inc, 0) => (1, Some(true)),
        (Op::Enable, _) | (Op::Disable, 0) => return Ok(()),
        (Op::Disable, _) | (Op::Dec, 1) => (0, Some(false)),
        (Op::Inc, n) => (
            n.checked_add(1).ok_or(KeyError::Overflow { key: name() })?,
            None,
        ),
        (Op::Dec, 0) => return Err(KeyError::Underflow { key: name() }),
        (Op::Dec, n) => (n - 1, None),
    };
    if let Some(on) = to {
        if !<arch::Live as LiveProtocol>::SINGLE_STORE && !crate::probe::int3_route_declared() {
            return Err(KeyError::NoTrapRoute);
        }
        let b = Batch::<arch::Live, _> {
            key,
            images: images(&lock).map(|d| &d.table),
            stubs: arch::stubs(),
            site_ref: arch::site_ref,
            arch: PhantomData,
        };
        // SAFETY: the live images' tables, under the lock; the rest is forwarded.
        unsafe { b.switch(on, poker) }?;
    }
    key.count.store(new, Ordering::Release);
    Ok(())
}

/// The #BP hook's part for keys: if `addr` is a key site of `t` (the table of the
/// image owning `addr`), makes `f` resume as the site's form for its key's published
/// state (at the label, or after the site) and returns `true`.
///
/// # Safety
///
/// `f` is the live context of a trap at `addr`; `t` is a registered image's table,
/// read inside a read-side section (so a module's key outlives the call).
#[inline]
pub(crate) unsafe fn emulate_trap(t: &Table<'_>, f: &mut Int3Frame, addr: u64) -> bool {
    let Some(s) = t.key_site_at(addr) else {
        return false;
    };
    let Some(k) = t.key_object(s.key) else {
        return false;
    };
    // SAFETY: the table was registered, so `check_keys` passed; the caller's section.
    let key = unsafe { key_at(k) };
    INT3_EMULATIONS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `f` is the live context of a trap at the site (precondition).
    unsafe {
        probe_arch::emulate(
            f,
            &arch::site_ref(s.addr, s.target),
            s.jumps(key.published()),
        )
    };
    true
}

/// What the registry knows about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its name (as its defining image's table gives it).
    pub name: Name,
    /// Address of the key object.
    pub addr: u64,
    /// Its boot state.
    pub default: bool,
    /// Whether it is enabled.
    pub enabled: bool,
    /// Its enable count.
    pub count: u32,
    /// Its sites, in every registered image.
    pub sites: u32,
    /// How many registered images have sites of it (the defining one and importers).
    pub images: u32,
}

/// Every key a registered image defines (imports are counted with the key they
/// import), image by image, kernel first. Each step takes the registry lock (so a
/// handler may not iterate it), and sees the images registered then.
pub fn keys() -> Keys {
    Keys { image: 0, key: 0 }
}

/// The iterator [`keys`] returns.
#[derive(Clone, Debug)]
pub struct Keys {
    image: usize,
    key: u32,
}

impl Iterator for Keys {
    type Item = KeyInfo;

    fn next(&mut self) -> Option<KeyInfo> {
        let lock = state::lock();
        loop {
            let d = images(&lock).nth(self.image)?;
            let Some(k) = d.table.key(self.key) else {
                if self.key >= d.table.key_count() {
                    self.image += 1;
                    self.key = 0;
                } else {
                    self.key += 1;
                }
                continue;
            };
            self.key += 1;
            if k.imported {
                continue;
            }
            let (mut sites, mut holders) = (0, 0);
            for d in images(&lock) {
                let t = &d.table;
                let n: usize = (0..t.key_count())
                    .filter(|&i| t.key_object(i) == Some(k.addr))
                    .map(|i| t.key_sites_of(i).count())
                    .sum();
                sites += n as u32;
                holders += u32::from(n > 0);
            }
            // SAFETY: a registered table's key (`check_keys` passed), under the lock.
            let obj = unsafe { key_at(k.addr) };
            return Some(KeyInfo {
                name: Name::new(k.name),
                addr: k.addr,
                default: k.default,
                enabled: obj.is_enabled(),
                count: obj.count(),
                sites,
                images: holders,
            });
        }
    }
}
