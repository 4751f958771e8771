//! The [`ifunc!`](crate::ifunc!) macro and the descriptor record it emits.
//!
//! For each ifunc the macro emits, in the user's crate:
//!
//! * the **trampoline**: a naked `extern "C"` function with the ifunc's name and
//!   signature whose body jumps through the slot (the architecture's
//!   `__ksites_arch_trampoline!`, see [`crate::arch`]). Callers call it normally;
//!   `ksites embed` records every `call`/`jmp` to it and the loader later rewrites those
//!   into direct calls of the chosen implementation;
//! * the **slot** (`.data.ksites_slot`): initialised to the default implementation, so
//!   calls before [`crate::patch::init`], and references that are not calls (a function
//!   pointer taken to the ifunc), always work;
//! * a **descriptor record** in section [`RECORD_SECTION`] (flags `awR`, writable so PIE images can relocate it; SHF_GNU_RETAIN, so
//!   `--gc-sections` keeps it and everything it names): magic, version, trampoline,
//!   slot, resolver adapter, default, name pointer, name length. The build tool reads
//!   these records from the linked image to build the `.ksites` table.
//!
//! [`retarget_raw`] (and the signature-checked `name::retarget` each ifunc gets, or
//! [`retarget!`](crate::retarget!)) rewrites an ifunc's sites and slot live, in one
//! batch; [`reresolve_all`] reruns every resolver and retargets what changed (see
//! [`retarget`]'s docs for the protocol).

mod error;
pub mod retarget;
#[cfg(all(test, feature = "std", target_os = "linux", target_arch = "x86_64"))]
mod retarget_live_tests;
#[cfg(test)]
mod retarget_tests;

pub(crate) use retarget::emulate_retarget_trap;
#[allow(unused_imports)] // Module load calls it (`crate::probe` registry, under its lock).
pub(crate) use retarget::refresh_imports;
pub use retarget::{
    MAX_PREFIXED_SITES, ReresolveError, ReresolveReport, RetargetError, RetargetReport,
    reresolve_all, retarget_int3_emulations, retarget_raw, retarget_stale_traps,
};

/// Section holding ifunc descriptor records.
pub const RECORD_SECTION: &str = ".ksites_ifuncs";
/// First word of a record ("KSIF").
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KSIF");
/// Record layout version.
pub const RECORD_VERSION: u32 = 1;
/// Size of one record: `u32 magic, u32 version`, then six `u64`s.
pub const RECORD_SIZE: usize = 56;

/// Byte offsets of the record's `u64` fields.
pub mod record {
    /// The trampoline (the ifunc's own symbol).
    pub const TRAMPOLINE: usize = 8;
    /// The slot.
    pub const SLOT: usize = 16;
    /// `extern "C" fn(features: u64) -> usize`, wrapping the user's resolver.
    pub const RESOLVER: usize = 24;
    /// The default implementation.
    pub const DEFAULT: usize = 32;
    /// Address of the (not NUL-terminated) name.
    pub const NAME_PTR: usize = 40;
    /// Length of the name.
    pub const NAME_LEN: usize = 48;
}

/// Declares an ifunc: a function whose implementation is chosen once, at boot, from the
/// CPU's features, and whose call sites are then patched into direct calls.
///
/// ```ignore
/// use kernel_loader::{ifunc, CpuFeatures};
///
/// unsafe extern "C" fn popcount_soft(x: u64) -> u32 { /* bit tricks */ }
/// #[target_feature(enable = "popcnt")]
/// unsafe extern "C" fn popcount_hw(x: u64) -> u32 { x.count_ones() }
///
/// fn pick_popcount(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 {
///     if f.contains(CpuFeatures::POPCNT) { popcount_hw } else { popcount_soft }
/// }
///
/// ifunc! {
///     /// Number of set bits.
///     pub fn popcount(x: u64) -> u32;
///     default = popcount_soft;
///     resolver = pick_popcount;
/// }
/// ```
///
/// * The ifunc has the C ABI; implementations are `extern "C"` functions (usually
///   `unsafe`, with `#[target_feature]`) of exactly the declared signature, checked at
///   compile time.
/// * `default` must run on every CPU the kernel boots on: the slot holds it until
///   resolution.
/// * The resolver is `fn(&CpuFeatures) -> unsafe extern "C" fn(..) -> ..`. It runs
///   exactly once, during [`crate::patch::init`]. Calling the ifunc is safe, so the
///   resolver is what guarantees the chosen implementation is valid on this CPU.
/// * `default` and `resolver` are paths resolved in the module that invokes the macro.
///   The macro also defines a hidden, uninhabited type with the ifunc's name and
///   visibility (types and functions live in different namespaces), which holds the
///   resolver adapter and `retarget`.
///
/// # Live retargeting
///
/// `popcount::retarget(popcount_hw, &mut poker)` (or
/// [`retarget!(popcount, popcount_hw, &mut poker)`](crate::retarget!)) rewrites every
/// site of `popcount` in the kernel and every registered module, then its slot, in one
/// live batch ([`retarget_raw`], whose safety contract it has). The new implementation
/// must have exactly the ifunc's signature:
///
/// ```
/// # #[cfg(target_arch = "x86_64")] mod m {
/// unsafe extern "C" fn soft(x: u64) -> u32 { x.count_ones() }
/// fn pick(_: &kernel_loader::CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 { soft }
/// kernel_loader::ifunc! {
///     pub fn popcount(x: u64) -> u32;
///     default = soft;
///     resolver = pick;
/// }
/// unsafe extern "C" fn other(x: u64) -> u32 { 64 - x.count_zeros() }
/// pub fn switch<P: kernel_loader::TextPoker>(poker: &mut P) {
///     // SAFETY: `other` runs on every CPU (no target feature).
///     let _ = unsafe { kernel_loader::retarget!(popcount, other, poker) };
/// }
/// # }
/// ```
///
/// ```compile_fail,E0308
/// # #[cfg(target_arch = "x86_64")] mod m {
/// unsafe extern "C" fn soft(x: u64) -> u32 { x.count_ones() }
/// fn pick(_: &kernel_loader::CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 { soft }
/// kernel_loader::ifunc! {
///     pub fn popcount(x: u64) -> u32;
///     default = soft;
///     resolver = pick;
/// }
/// // Not the ifunc's signature: `u64` returned, not `u32`.
/// unsafe extern "C" fn wrong(x: u64) -> u64 { x }
/// pub fn switch<P: kernel_loader::TextPoker>(poker: &mut P) {
///     let _ = unsafe { popcount::retarget(wrong, poker) };
/// }
/// # }
/// # #[cfg(not(target_arch = "x86_64"))] compile_error!("x86-64 only");
/// ```
#[macro_export]
macro_rules! ifunc {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)?;
        default = $default:path;
        resolver = $resolver:path $(;)?
    ) => {
        $(#[$attr])*
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                $crate::__ksites_arch_trampoline!(),
                $crate::__ksites_arch_pushsection!(".data.ksites_slot", "aw"),
                ".p2align 3",
                "2: .quad {default}",
                ".popsection",
                $crate::__ksites_arch_pushsection!(".rodata.ksites_name", "a"),
                concat!("3: .ascii \"", module_path!(), "::", stringify!($name), "\""),
                "4:",
                ".popsection",
                $crate::__ksites_arch_pushsection!(".ksites_ifuncs", "awR"),
                ".p2align 3",
                ".long 0x4649534b",
                ".long 1",
                ".quad {tramp}",
                ".quad 2b",
                ".quad {resolve}",
                ".quad {default}",
                ".quad 3b",
                ".quad 4b - 3b",
                ".popsection",
                tramp = sym $name,
                default = sym $default,
                resolve = sym $name::__ksites_resolve,
            )
        }

        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        $vis enum $name {}

        #[allow(dead_code)]
        impl $name {
            #[doc(hidden)]
            const __KSITES_DEFAULT: unsafe extern "C" fn($($ty),*) $(-> $ret)? = $default;

            #[doc(hidden)]
            extern "C" fn __ksites_resolve(features: u64) -> usize {
                let features = $crate::CpuFeatures::from_bits_retain(features);
                let chosen: unsafe extern "C" fn($($ty),*) $(-> $ret)? = $resolver(&features);
                chosen as usize
            }

            /// Rewrites every site of this ifunc, in the kernel and every registered
            /// module, to call `new`, then its slot: one live batch.
            ///
            /// # Safety
            ///
            /// As for `kernel_loader::ifunc::retarget_raw`: `new` (whose signature is
            /// checked here) runs on every CPU and stays mapped.
            #[doc(hidden)]
            pub unsafe fn retarget<P: $crate::TextPoker + ?Sized>(
                new: unsafe extern "C" fn($($ty),*) $(-> $ret)?,
                poker: &mut P,
            ) -> ::core::result::Result<
                $crate::ifunc::RetargetReport,
                $crate::ifunc::RetargetError,
            > {
                // SAFETY: forwarded to the caller; `new` has the ifunc's signature.
                unsafe {
                    $crate::ifunc::retarget_raw(
                        $name as *const () as usize,
                        new as *const () as usize,
                        poker,
                    )
                }
            }
        }
    };
}

/// Retargets an ifunc live: `retarget!(popcount, popcount_hw, &mut poker)` is
/// `popcount::retarget(popcount_hw, &mut poker)` (see [`ifunc!`](crate::ifunc!)), an
/// `unsafe` call whose implementation's signature is checked against the ifunc's at
/// compile time. The ifunc may be named by a path (`drivers::popcount`).
#[macro_export]
macro_rules! retarget {
    ($($ifunc:ident)::+, $new:expr, $poker:expr $(,)?) => {
        $($ifunc)::+::retarget($new, $poker)
    };
}

/// Section in a module object listing the kernel ifuncs it calls: one 8-byte
/// absolute reference per imported symbol (not allocated; `ksites embed` reads it).
pub const IMPORT_SECTION: &str = ".ksites_ifunc_imports";

/// Declares ifuncs that the kernel defines and a module calls: the `extern "C"`
/// declarations, plus one entry per function in [`IMPORT_SECTION`], so `ksites embed`
/// records every call to them as a site of the module's table and the module loader
/// patches those calls into direct calls to the implementation the kernel chose.
///
/// ```ignore
/// kernel_loader::ifunc_import! {
///     /// The kernel's popcount.
///     pub fn popcount(x: u64) -> u32;
/// }
/// ```
///
/// The names are the kernel's exported (unmangled) symbol names. Like the kernel's own
/// [`ifunc!`](macro@crate::ifunc) functions, they are safe to call.
#[macro_export]
macro_rules! ifunc_import {
    ($(
        $(#[$attr:meta])*
        $vis:vis fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)?;
    )+) => {
        unsafe extern "C" {
            $(
                $(#[$attr])*
                $vis safe fn $name($($arg: $ty),*) $(-> $ret)?;
            )+
        }
        $(
            ::core::arch::global_asm!(
                $crate::__ksites_arch_pushsection!(".ksites_ifunc_imports", ""),
                ".p2align 3",
                ::core::concat!(".quad ", ::core::stringify!($name)),
                ".popsection",
            );
        )+
    };
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use crate::CpuFeatures;

    unsafe extern "C" fn add_slow(a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    unsafe extern "C" fn add_fast(a: u64, b: u64) -> u64 {
        a.wrapping_add(b) | 0x8000_0000_0000_0000
    }
    fn pick_add(f: &CpuFeatures) -> unsafe extern "C" fn(u64, u64) -> u64 {
        if f.contains(CpuFeatures::SSE2) {
            add_fast
        } else {
            add_slow
        }
    }

    crate::ifunc! {
        /// Test ifunc.
        pub fn add(a: u64, b: u64) -> u64;
        default = add_slow;
        resolver = pick_add;
    }

    #[test]
    fn unresolved_ifunc_calls_the_default_through_its_slot() {
        assert_eq!(add(2, 3), 5);
        let p: extern "C" fn(u64, u64) -> u64 = add;
        assert_eq!(p(40, 2), 42);
    }

    #[test]
    fn resolver_adapter_returns_the_chosen_implementation() {
        let sse2 = add::__ksites_resolve(CpuFeatures::SSE2.bits());
        let none = add::__ksites_resolve(0);
        assert_eq!(sse2, add_fast as *const () as usize);
        assert_eq!(none, add_slow as *const () as usize);
    }
}
