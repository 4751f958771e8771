//! The records a probe site leaves in the image: the per-site record in
//! [`SITE_RECORD_SECTION`], the per-probe [`ProbeRecord`] static, their layout constants
//! (which the build tool reads), and the `probe!`/`probe_enabled!` macros that emit
//! them. The site instruction itself comes from the architecture
//! (`__ksites_probe_site_asm!`).

use core::sync::atomic::{AtomicU32, Ordering};

use super::ProbeId;

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

/// Section of C probe declarations, one record per `KSITES_PROBE_DECL` in
/// `c/ksites_sdt.h`: `u32 magic, u32 nargs, u64 provider, u64 provider length, u64 name,
/// u64 name length` (the pointers relocated, the strings not NUL-terminated).
pub const DECL_SECTION: &str = ".ksites_probe_decls";
/// First word of a C declaration record ("KSPD").
pub const DECL_MAGIC: u32 = u32::from_le_bytes(*b"KSPD");
/// Size of a C declaration record.
pub const DECL_SIZE: usize = 40;

/// Byte offsets of a C declaration record's fields (see [`DECL_SECTION`]).
pub mod decl {
    /// `u32` declared argument count.
    pub const NARGS: usize = 4;
    /// Provider pointer.
    pub const PROVIDER: usize = 8;
    /// Provider length.
    pub const PROVIDER_LEN: usize = 16;
    /// Name pointer.
    pub const NAME: usize = 24;
    /// Name length.
    pub const NAME_LEN: usize = 32;
}

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
    /// The probe's global id, cached by the dispatcher at the record's first fire, tagged
    /// with the registry's id epoch (`state::ID_EPOCH`); 0 until then. Not part of the
    /// build tool's view of the record (which ends its fields at [`record::ID`]).
    cache: AtomicU32,
}

// SAFETY: the only constructor, `new`, takes `&'static str`s, so the pointers refer to
// immutable data that lives forever and are only read; `id` is atomic.
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
            cache: AtomicU32::new(0),
        }
    }

    /// The probe id `ksites embed` assigned, if any.
    pub fn id(&self) -> Option<ProbeId> {
        match self.id.load(Ordering::Relaxed) {
            UNASSIGNED => None,
            id => Some(ProbeId(id)),
        }
    }

    /// Sets the table index `ksites embed` would write (tests build records by hand).
    #[cfg(test)]
    pub(super) fn set_local_id(&self, id: u32) {
        self.id.store(id, Ordering::Relaxed);
    }

    /// The global id cached by [`ProbeRecord::cache_global`], if it was cached in id
    /// epoch `epoch` (the current one: see `state::ID_EPOCH`).
    #[inline(always)]
    pub(super) fn cached_global(&self, epoch: u32) -> Option<u32> {
        let c = self.cache.load(Ordering::Relaxed);
        let id = c ^ epoch;
        (id < super::MAX_PROBES as u32).then_some(id)
    }

    /// Caches global id `id` (`< MAX_PROBES`), found in id epoch `epoch`. Every CPU that
    /// races to cache it stores the same value (a record's global id does not change
    /// while its image is registered); the record's cache line is written once, then
    /// only read.
    #[inline]
    pub(super) fn cache_global(&self, id: u32, epoch: u32) {
        self.cache.store(epoch | id, Ordering::Relaxed);
    }
}

/// Fires probe `provider:name` with up to six integer or raw-pointer arguments.
///
/// Disabled (the default), the site is one NOP instruction: the arguments are not
/// evaluated. Enabled, the NOP becomes a jump to an out-of-line block that evaluates
/// them and dispatches, then continues after the site. With this crate's `inline-fire`
/// feature the dispatch is compiled into the block (no call but the handler's); without
/// it the block calls the unmangled `ksites_probe_fire` (what a module, linked apart
/// from the kernel, must do).
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
        $crate::__ksites_probe_site!(0, __KSITES_REC, {
            #[allow(unused_mut, unused_assignments)]
            let mut __ksites_args = [0u64; 6];
            #[allow(unused_mut, unused_assignments)]
            let mut __ksites_i = 0usize;
            $(
                __ksites_args[__ksites_i] = ($arg) as u64;
                __ksites_i += 1;
            )*
            let _ = __ksites_i;
            $crate::probe::__fire_site(&__KSITES_REC, &__ksites_args);
        });
    }};
}

/// `true` while probe `provider:name` is enabled: guards expensive argument
/// preparation. Disabled, it is one NOP instruction and evaluates to `false`.
#[macro_export]
macro_rules! probe_enabled {
    ($provider:ident, $name:ident $(,)?) => {{
        static __KSITES_REC: $crate::probe::ProbeRecord = $crate::probe::ProbeRecord::new(
            ::core::stringify!($provider),
            ::core::stringify!($name),
            $crate::probe::RECORD_NARGS_NONE,
        );
        let mut __ksites_on = false;
        $crate::__ksites_probe_site!(1, __KSITES_REC, {
            __ksites_on = true;
        });
        __ksites_on
    }};
}

/// One probe site: the architecture's disabled instruction, labelled, and its site
/// record (`kind` 0 for `probe!`, 1 for `probe_enabled!`; the record `rec`; the
/// out-of-line block `target`, which runs when the site is enabled and then continues
/// after the site). Hidden: the body of `probe!` and `probe_enabled!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_probe_site {
    ($kind:literal, $rec:ident, $target:block) => {
        // SAFETY: the asm is one NOP instruction plus a record in a data section; when
        // the loader turns the NOP into a jump to the label block, that block is
        // ordinary code.
        unsafe {
            ::core::arch::asm!(
                $crate::__ksites_probe_site_asm!(),
                $crate::__ksites_probe_section_asm!(),
                ".p2align 3",
                ".long 0x5053534b",
                ::core::concat!(".long ", $kind),
                ".quad 2b",
                ".quad {target}",
                ".quad {rec}",
                ".popsection",
                rec = sym $rec,
                target = label $target,
                options(nostack, preserves_flags),
            );
        }
    };
}
