//! `static_key!`, `static_branch_unlikely!`, `static_branch_likely!`, and the site
//! record they emit in `.ksites_key_sites` (see [`super::SITE_RECORD_SIZE`]). The site
//! instruction is the architecture's probe site NOP (`__ksites_probe_site_asm!`), the
//! section directive the architecture's `__ksites_key_section_asm!`.

/// Defines a [`StaticKey`](crate::key::StaticKey) static named `NAME` (the key's name
/// is `module::path::NAME`), enabled at boot iff the default is `true`.
///
/// ```ignore
/// kernel_loader::static_key!(pub TRACE_IRQS: default false);
/// kernel_loader::static_key!(FAST_PATH: default true);
/// ```
#[macro_export]
macro_rules! static_key {
    ($(#[$attr:meta])* $vis:vis $name:ident : default $default:literal $(;)?) => {
        $(#[$attr])*
        $vis static $name: $crate::key::StaticKey = $crate::key::StaticKey::new(
            ::core::concat!(::core::module_path!(), "::", ::core::stringify!($name)),
            $default,
        );
    };
}

/// `true` while key `K` is enabled, for a branch that is usually not taken: the site
/// is one NOP while `K` is disabled (falls through: `false`), a jump to the code that
/// yields `true` while enabled. `K` is a path to a `static_key!` static.
///
/// ```ignore
/// if kernel_loader::static_branch_unlikely!(TRACE_IRQS) {
///     trace_irq();
/// }
/// ```
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path $(,)?) => {{
        let mut __ksites_key_on = false;
        $crate::__ksites_key_site!(0, $key, {
            __ksites_key_on = true;
        });
        __ksites_key_on
    }};
}

/// `true` while key `K` is enabled, for a branch that is usually taken: the site is one
/// NOP while `K` is enabled (falls through: `true`), a jump to the code that yields
/// `false` while disabled.
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path $(,)?) => {{
        let mut __ksites_key_on = true;
        $crate::__ksites_key_site!(1, $key, {
            __ksites_key_on = false;
        });
        __ksites_key_on
    }};
}

/// One key site: the architecture's probe site NOP, labelled, and its record (`likely`
/// 0 or 1, the label block `target`, the key `key`). Hidden: the body of the branch
/// macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_key_site {
    ($likely:literal, $key:path, $target:block) => {
        // SAFETY: the asm is one NOP instruction plus a record in a data section; when
        // the loader turns the NOP into a jump to the label block, that block is
        // ordinary code.
        unsafe {
            ::core::arch::asm!(
                $crate::__ksites_probe_site_asm!(),
                $crate::__ksites_key_section_asm!(),
                ".p2align 3",
                ".long 0x534b534b",
                ::core::concat!(".long ", $likely),
                ".quad 2b",
                ".quad {target}",
                ".quad {key}",
                ".popsection",
                key = sym $key,
                target = label $target,
                options(nostack, preserves_flags),
            );
        }
    };
}
