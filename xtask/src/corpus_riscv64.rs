//! `cargo xtask corpus-riscv64` (a step of `cargo xtask test`): `ksites check-module` and
//! `ksites embed` on a few hundred riscv64 objects of real C code
//! ([`crate::corpus_modules`] runs the checks; this is what riscv64's corpus is made of).
//!
//! The C corpus is compiled with `riscv64-linux-gnu-gcc` and kernel-like flags
//! (`-mcmodel=medany -fno-pic -ffreestanding -fno-common -march=rv64gc -mabi=lp64d`),
//! with linker relaxation on (gcc's default: every call and PC-relative pair carries
//! `R_RISCV_RELAX`, alignment is `R_RISCV_ALIGN` padding, switch tables are label
//! differences), every file once, and a part of it again with `-mno-relax`,
//! `-mcmodel=medlow` (absolute `lui` pairs), `-ffunction-sections -fdata-sections` with
//! aligned functions and loops (`R_RISCV_ALIGN` padding), and
//! `-fasynchronous-unwind-tables` (a loaded `.eh_frame`: `32_PCREL`, `SET6`/`SUB6` and
//! the other label differences); see [`RISCV64`]'s variants.
//!
//! The far check lays each module out 4 GiB above the kernel functions it only calls:
//! out of an `auipc`+`jalr` call's reach (±2 GiB), so every such call goes through a
//! veneer. A PC-relative data reference reaches no further than a call (and the loader
//! builds no veneer for data), so the kernel symbols an object refers to otherwise are
//! placed 1 GiB below it, in reach. Not the `-mcmodel=medlow` objects: their absolute
//! addresses must lie within 2 GiB of 0.

use crate::corpus_modules::{ArchCorpus, Variant};

/// The riscv64 corpus.
pub(crate) const RISCV64: ArchCorpus = ArchCorpus {
    name: "riscv64",
    cc: ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
    readelf: ("riscv64-linux-gnu-readelf", "binutils-riscv64-linux-gnu"),
    // A riscv64 kernel object's code model and ABI, no GOT (`-w`: these are user-space
    // libraries built freestanding).
    cflags: &[
        "-O2",
        "-mcmodel=medany",
        "-fno-pic",
        "-ffreestanding",
        "-fno-common",
        "-march=rv64gc",
        "-mabi=lp64d",
        "-fno-strict-aliasing",
        "-fno-stack-protector",
        "-w",
    ],
    // As on aarch64: zstd's tracing hooks are weak undefined functions, which the
    // kernel's copy of zstd is built without.
    library_flags: &[("zstd-sys", &["-DZSTD_TRACE=0"])],
    no_fpu: None,
    variants: &[
        Variant {
            dir: "medany",
            flags: &[],
            crates: &[],
            far: true,
        },
        // What Linux builds riscv modules with: no relaxation relocations, exact
        // alignment from the assembler, label differences it resolves itself.
        Variant {
            dir: "norelax",
            flags: &["-mno-relax"],
            crates: &["lua-src", "libz-sys", "bzip2-sys"],
            far: true,
        },
        // Absolute `lui` + `addi`/load/store pairs (HI20, LO12_I, LO12_S): the module
        // and the kernel within 2 GiB of address 0, so not checked far away.
        Variant {
            dir: "medlow",
            flags: &["-mcmodel=medlow"],
            crates: &["lcms2-sys"],
            far: false,
        },
        // A section per function and per datum: calls, branches and PC-relative pairs
        // between sections the loader places apart. Aligned functions and loops: with
        // relaxation on, each alignment is NOP padding with an R_RISCV_ALIGN (gcc -O2
        // aligns nothing beyond 2 bytes on rv64gc by default).
        Variant {
            dir: "sections",
            flags: &[
                "-ffunction-sections",
                "-fdata-sections",
                "-falign-functions=16",
                "-falign-loops=8",
            ],
            crates: &["zstd-sys", "libdeflate-sys"],
            far: true,
        },
        // A loaded `.eh_frame` (an allocated section, as in a kernel with unwind
        // tables): 32_PCREL, ADD32/SUB32 and SET6/SUB6 .. SET32/SUB32 advances.
        Variant {
            dir: "unwind",
            flags: &["-fasynchronous-unwind-tables"],
            crates: &["libz-sys", "bzip2-sys"],
            far: true,
        },
    ],
    far_load: 0x1_4000_0000,
    far_kernel: 0x4000_0000,
    near_kernel: Some(0x1_0000_0000),
    far_text: "with the kernel functions they only call 4 GiB away (other symbols 1 GiB away, in reach)",
    branch_types: &["R_RISCV_CALL", "R_RISCV_CALL_PLT", "R_RISCV_JAL"],
    no_op_types: &["R_RISCV_NONE", "R_RISCV_RELAX"],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_like_flags_and_reach() {
        for f in [
            "-mcmodel=medany",
            "-fno-pic",
            "-ffreestanding",
            "-fno-common",
        ] {
            assert!(RISCV64.cflags.contains(&f), "{f}");
        }
        assert!(
            RISCV64.variants[0].crates.is_empty(),
            "every file compiled at least once"
        );
        // Calls to the far kernel are out of reach (±2 GiB); the near symbols in reach.
        let reach = 1u64 << 31;
        assert!(RISCV64.far_load - RISCV64.far_kernel > reach);
        assert!(RISCV64.far_load - RISCV64.near_kernel.unwrap() < reach - (1 << 28));
    }
}
