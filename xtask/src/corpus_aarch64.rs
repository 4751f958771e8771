//! `cargo xtask corpus-aarch64` (a step of `cargo xtask test`): `ksites check-module` and
//! `ksites embed` on a few hundred arm64 objects of real C code ([`crate::corpus_modules`]
//! runs the checks; this is what arm64's corpus is made of).
//!
//! The C corpus is compiled with `aarch64-linux-gnu-gcc` and kernel-like flags
//! (`-fno-pic -mgeneral-regs-only -ffreestanding`, no unwind tables), every file once,
//! and a part of it again with `-mcmodel=large`, `-mcmodel=tiny` and
//! `-ffunction-sections` (see [`AARCH64`]'s variants). The far check lays each module
//! out 1 GiB above the kernel's symbols: out of `bl` reach (±128 MiB), so every call to
//! the kernel goes through a veneer, and in reach of everything else (`adrp` ±4 GiB,
//! PREL32 ±2 GiB, ABS32 below 4 GiB); not the `-mcmodel=tiny` objects, whose `adr`
//! reaches 1 MiB.

use crate::corpus_modules::{ArchCorpus, Variant};

/// The arm64 corpus.
pub(crate) const AARCH64: ArchCorpus = ArchCorpus {
    name: "aarch64",
    cc: ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    readelf: ("aarch64-linux-gnu-readelf", "binutils-aarch64-linux-gnu"),
    // What Kbuild passes for an arm64 kernel object, reduced to what matters for code
    // shape (`-w`: these are user-space libraries built freestanding).
    cflags: &[
        "-O2",
        "-ffreestanding",
        "-fno-pic",
        "-fno-PIE",
        "-mgeneral-regs-only",
        "-fno-asynchronous-unwind-tables",
        "-fno-common",
        "-fno-strict-aliasing",
        "-fno-stack-protector",
        "-w",
    ],
    // zstd's tracing hooks are weak undefined functions whose address it tests; gcc
    // reaches a weak undefined symbol through the GOT even with `-fno-pic`
    // (`R_AARCH64_ADR_GOT_PAGE`, `LD64_GOT_LO12_NC`), which no kernel module loader
    // applies (Linux's arm64 `apply_relocate_add` refuses them; the kernel's own copy of
    // zstd is built without tracing), so tracing is off, as in the kernel.
    library_flags: &[("zstd-sys", &["-DZSTD_TRACE=0"])],
    // Kbuild's arm64 `CC_FLAGS_NO_FPU`.
    no_fpu: Some("-mgeneral-regs-only"),
    variants: &[
        Variant {
            dir: "small",
            flags: &[],
            crates: &[],
            far: true,
        },
        // Literal pools in the text (ABS64 in `.text`) instead of `adrp` + `:lo12:`: how
        // Linux once built arm64 modules (`CONFIG_ARM64_MODULE_CMODEL_LARGE`).
        Variant {
            dir: "large",
            flags: &["-mcmodel=large", "-mpc-relative-literal-loads"],
            crates: &["lua-src"],
            far: true,
        },
        // `adr` (ADR_PREL_LO21, ±1 MiB) for every address: the module and what it uses
        // within 1 MiB, so not checked with the kernel far away.
        Variant {
            dir: "tiny",
            flags: &["-mcmodel=tiny"],
            crates: &["libz-sys", "bzip2-sys"],
            far: false,
        },
        // A section per function and per datum: calls and references between sections
        // the loader places apart, relocated against section symbols.
        Variant {
            dir: "sections",
            flags: &["-ffunction-sections", "-fdata-sections"],
            crates: &["zstd-sys", "libdeflate-sys"],
            far: true,
        },
    ],
    far_load: 0x8000_0000,
    far_kernel: 0x4000_0000,
    near_kernel: None,
    far_text: "with them 1 GiB away",
    branch_types: &["R_AARCH64_CALL26", "R_AARCH64_JUMP26"],
    no_op_types: &["R_AARCH64_NONE"],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_like_flags() {
        // Kernel-like: no PIC/PIE (no GOT), no FP/SIMD registers by default.
        let no_fpu = AARCH64.no_fpu.unwrap();
        assert!(AARCH64.cflags.contains(&"-fno-pic") && AARCH64.cflags.contains(&no_fpu));
        assert!(
            AARCH64.variants[0].crates.is_empty(),
            "every file compiled at least once"
        );
        // The far kernel is out of `bl` reach and in `adrp` reach.
        let d = AARCH64.far_load - AARCH64.far_kernel;
        assert!(d > 128 << 20 && d < 4 << 30);
    }
}
