//! Static keys for C (`kernel-loader/c/ksites_key.h`): `ksites_static_key_enable`,
//! `_disable`, `_inc`, `_dec` (each a live batch over the key's sites in the kernel and
//! every loaded module, as `kernel_loader::key::StaticKey`'s methods) and `_count`.

use core::ffi::c_int;

use kernel_loader::key::{KeyError, StaticKey};

use crate::{CPoker, KSITES_EINVAL, KsitesPoker, poker, result};

/// What a key function does with the key.
type Change = unsafe fn(&'static StaticKey, &mut CPoker) -> Result<(), KeyError>;

/// Runs `change` on the C key at `key` with the C poker at `poker_ptr`.
///
/// # Safety
///
/// `key` is null or a `struct ksites_static_key` defined by `KSITES_STATIC_KEY_*` (a
/// global: it lives as long as its image); `poker_ptr` as for `ksites_probe_enable`.
unsafe fn with_key(key: *const StaticKey, poker_ptr: *const KsitesPoker, change: Change) -> c_int {
    // SAFETY: the caller's precondition: a key object of a loaded image, which the
    // registry names only while the image is registered.
    let (Some(key), Some(mut p)) = (unsafe { key.as_ref() }, unsafe { poker(poker_ptr) }) else {
        return KSITES_EINVAL;
    };
    // SAFETY: forwarded.
    result(unsafe { change(key, &mut p) })
}

/// `StaticKey::enable`, `disable`, `inc` and `dec`, as [`Change`]s.
macro_rules! change {
    ($name:ident, $method:ident) => {
        /// # Safety
        ///
        /// As for [`StaticKey::enable`].
        unsafe fn $name(k: &'static StaticKey, p: &mut CPoker) -> Result<(), KeyError> {
            // SAFETY: forwarded.
            unsafe { k.$method(p) }
        }
    };
}
change!(enable, enable);
change!(disable, disable);
change!(inc, inc);
change!(dec, dec);

/// Enables `key` (idempotent): its sites jump (unlikely) or fall through (likely).
///
/// # Safety
///
/// `key` is null or a key defined with `KSITES_STATIC_KEY_*`; `poker` as for
/// `ksites_probe_enable` (on x86-64 the #BP route declared).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_static_key_enable(
    key: *const StaticKey,
    poker: *const KsitesPoker,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { with_key(key, poker, enable) }
}

/// Disables `key` (idempotent).
///
/// # Safety
///
/// As for [`ksites_static_key_enable`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_static_key_disable(
    key: *const StaticKey,
    poker: *const KsitesPoker,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { with_key(key, poker, disable) }
}

/// Adds one to `key`'s count (0 → 1 enables it).
///
/// # Safety
///
/// As for [`ksites_static_key_enable`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_static_key_inc(
    key: *const StaticKey,
    poker: *const KsitesPoker,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { with_key(key, poker, inc) }
}

/// Takes one from `key`'s count (1 → 0 disables it; at 0, `KSITES_EPROBE`).
///
/// # Safety
///
/// As for [`ksites_static_key_enable`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_static_key_dec(
    key: *const StaticKey,
    poker: *const KsitesPoker,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { with_key(key, poker, dec) }
}

/// `key`'s enable count (enabled iff above 0); 0 for a null key.
///
/// # Safety
///
/// `key` is null or a key defined with `KSITES_STATIC_KEY_*`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ksites_static_key_count(key: *const StaticKey) -> u32 {
    // SAFETY: the caller's precondition.
    unsafe { key.as_ref() }.map_or(0, StaticKey::count)
}
