//! aarch64 static-key sites: the instruction a `static_branch_*!` site is, and the
//! protocol that rewrites it live.
//!
//! A key site is compiled as the probe site `nop` and holds either that `nop` (falls
//! through) or `b label` (jumps, ±128 MiB): exactly a `probe!` site's two forms
//! ([`ProbeKind::RustJmp`](crate::arch::ProbeKind::RustJmp)). Both are instructions the Arm ARM lets a CPU overwrite
//! while others execute it, so key batches use the probe sites' single-store protocol
//! ([`Live`]: every site checked, then one 4-byte store per site and one `sync_cores`
//! for the batch). A `b` out of reach is [`OutOfReach`].

use crate::arch::Stubs;
pub use crate::arch::{key_site_ref as site_ref, key_stubs as stubs};

use super::probe::site_word as probe_word;
pub use super::probe::{Live, OutOfReach, SITE_LEN, SiteWord};

/// The instruction every key site is compiled as, and holds while it falls through.
pub const NOP: u32 = super::branch::NOP;

/// The key site's bytes, as a word: `b` to `target` when `jumps`, else the `nop`;
/// [`OutOfReach`] past ±128 MiB (or misaligned).
#[inline]
pub fn site_word(addr: u64, target: u64, jumps: bool) -> Result<SiteWord, OutOfReach> {
    probe_word(&site_ref(addr, target), jumps, &Stubs::NONE)
}

/// The trap frame of a CPU that executed its `brk` (PC at it) at `site` (the crate's tests
/// simulate traps with it).
#[cfg(test)]
pub(crate) fn trap_frame_at(site: u64) -> super::probe::Int3Frame {
    super::probe::Int3Frame {
        pc: site,
        ..Default::default()
    }
}

/// Where a trap frame resumes (after the #BP hook emulated it).
#[cfg(test)]
pub(crate) fn resume_addr(f: &super::probe::Int3Frame) -> u64 {
    f.pc
}

/// The directive opening the key site record section (`.ksites_key_sites`), as an
/// `asm!` template string. Hidden: used by `static_branch_likely!`/`_unlikely!`.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_key_section_asm {
    () => {
        ".pushsection .ksites_key_sites,\"awR\",%progbits"
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_site_is_the_nop_or_a_b_to_its_label() {
        assert_eq!(NOP, 0xd503_201f);
        assert_eq!(site_word(0x1000, 0x1000, false), Ok(u64::from(NOP)));
        // b +0x20: imm26 = 8.
        assert_eq!(site_word(0x1000, 0x1020, true), Ok(0x1400_0008));
        // b -0x20: imm26 = -8.
        assert_eq!(site_word(0x1000, 0x0fe0, true), Ok(0x17ff_fff8));
        let far = 0x1000 + (128 << 20);
        assert_eq!(
            site_word(0x1000, far, true),
            Err(OutOfReach { target: far })
        );
        assert!(site_word(0x1000, far, false).is_ok());
    }
    #[test]
    fn a_trapped_key_site_resumes_at_its_label_or_after_it() {
        for (jumps, want) in [(true, 0x1800), (false, 0x1000 + SITE_LEN as u64)] {
            let mut f = trap_frame_at(0x1000);
            // SAFETY: a key site's forms never read the stack (only a C tail site's
            // emulation does); the frame is ours.
            unsafe { super::super::probe::emulate(&mut f, &site_ref(0x1000, 0x1800), jumps) };
            assert_eq!(resume_addr(&f), want);
        }
    }
}
