//! x86-64 static-key sites: the instruction a `static_branch_*!` site is, and the
//! protocol that rewrites it live.
//!
//! A key site is compiled as the probe site NOP (`0f 1f 44 00 00`) and holds either
//! that NOP (falls through) or `e9 rel32` to its label (jumps): exactly a `probe!`
//! site's two forms ([`ProbeKind::RustJmp`](crate::arch::ProbeKind::RustJmp)), so key batches run the probe sites' int3
//! protocol ([`Live`]: trap byte 0, write bytes 1..5, write byte 0, a `sync_cores`
//! after each round) and a CPU trapping on a key site mid-batch is emulated by
//! [`super::probe::emulate`] (continue at the label, or after the site).

use crate::arch::Stubs;
pub use crate::arch::{key_site_ref as site_ref, key_stubs as stubs};

use super::probe::site_word as probe_word;
pub use super::probe::{Live, OutOfReach, SITE_LEN, SiteWord};

/// The instruction every key site is compiled as, and holds while it falls through.
pub const NOP: [u8; SITE_LEN] = super::branch::NOP5;

/// The key site's bytes, as a word: `jmp rel32` to `target` when `jumps`, else the
/// NOP; [`OutOfReach`] past rel32.
#[inline]
pub fn site_word(addr: u64, target: u64, jumps: bool) -> Result<SiteWord, OutOfReach> {
    probe_word(&site_ref(addr, target), jumps, &Stubs::NONE)
}

/// The trap frame of a CPU that executed its `int3` (RIP after it) at `site` (the crate's tests
/// simulate traps with it).
#[cfg(test)]
pub(crate) fn trap_frame_at(site: u64) -> super::probe::Int3Frame {
    super::probe::Int3Frame {
        rip: site + 1,
        ..Default::default()
    }
}

/// Where a trap frame resumes (after the #BP hook emulated it).
#[cfg(test)]
pub(crate) fn resume_addr(f: &super::probe::Int3Frame) -> u64 {
    f.rip
}

/// The directive opening the key site record section (`.ksites_key_sites`), as an
/// `asm!` template string. Hidden: used by `static_branch_likely!`/`_unlikely!`.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __ksites_key_section_asm {
    () => {
        ".pushsection .ksites_key_sites,\"awR\",@progbits"
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_site_is_the_nop_or_a_jmp_to_its_label() {
        assert_eq!(NOP, [0x0f, 0x1f, 0x44, 0x00, 0x00]);
        let w = site_word(0x1000, 0x1000 + 5 + 0x20, true).unwrap();
        assert_eq!(super::super::probe::bytes_of(w), [0xe9, 0x20, 0, 0, 0]);
        let w = site_word(0x1000, 0x800, true).unwrap();
        assert_eq!(
            super::super::probe::bytes_of(w),
            [0xe9, 0xfb, 0xf7, 0xff, 0xff]
        );
        let nop = site_word(0x1000, 0x1800, false).unwrap();
        assert_eq!(super::super::probe::bytes_of(nop), NOP);
        assert_eq!(
            site_word(0x1000, 0x1_0000_1000, true),
            Err(OutOfReach {
                target: 0x1_0000_1000
            })
        );
        // Out of reach matters only for the jump.
        assert!(site_word(0x1000, 0x1_0000_1000, false).is_ok());
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
