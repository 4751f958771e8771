//! [`Machine`]: the architecture an object was compiled for, from its `e_machine`, and
//! the one place the loader dispatches to that architecture's relocations
//! ([`crate::arch::x86_64::reloc`], [`crate::arch::aarch64::reloc`],
//! [`crate::arch::riscv64::reloc`]). Every
//! architecture's relocation module compiles on every host, so `check-module` relocates
//! any supported architecture's module on any host; [`super::Module::load`] accepts
//! only the architecture it runs on.

use crate::arch::{aarch64, riscv64, x86_64};

/// An architecture whose modules the loader relocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// x86-64 ([`crate::arch::x86_64::reloc::MACHINE`]).
    X86_64,
    /// aarch64 ([`crate::arch::aarch64::reloc::MACHINE`]).
    Aarch64,
    /// riscv64 ([`crate::arch::riscv64::reloc::MACHINE`]).
    Riscv64,
}

/// Bytes of the longest veneer of any machine.
pub(super) const MAX_VENEER_LEN: usize = riscv64::reloc::VENEER_LEN;

/// Why a relocation could not be applied, whatever the architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// The type is not implemented.
    Unsupported,
    /// The result does not fit (with the range, where the architecture gives it).
    Overflow {
        value: i64,
        range: Option<(i64, i64)>,
    },
    /// The result's dropped low bits are not zero.
    Misaligned { value: i64, align: u8 },
    /// What an alignment relocation covers is not padding.
    NotPadding,
}

impl Machine {
    /// Every machine, in the order messages list them.
    pub const ALL: [Machine; 3] = [Machine::X86_64, Machine::Aarch64, Machine::Riscv64];

    /// The machine of `e_machine`, if the loader relocates it.
    pub fn from_e_machine(e_machine: u16) -> Option<Machine> {
        Machine::ALL
            .into_iter()
            .find(|m| m.e_machine() == e_machine)
    }

    /// The machine this crate is compiled for.
    pub fn native() -> Machine {
        Machine::from_e_machine(crate::arch::native::reloc::MACHINE).unwrap_or(Machine::X86_64)
    }

    /// `e_machine`.
    pub fn e_machine(self) -> u16 {
        match self {
            Machine::X86_64 => x86_64::reloc::MACHINE,
            Machine::Aarch64 => aarch64::reloc::MACHINE,
            Machine::Riscv64 => riscv64::reloc::MACHINE,
        }
    }

    /// The name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Machine::X86_64 => x86_64::reloc::ARCH_NAME,
            Machine::Aarch64 => aarch64::reloc::ARCH_NAME,
            Machine::Riscv64 => riscv64::reloc::ARCH_NAME,
        }
    }

    /// The name of relocation type `r_type`.
    pub fn reloc_name(self, r_type: u32) -> &'static str {
        match self {
            Machine::X86_64 => x86_64::reloc::name(r_type),
            Machine::Aarch64 => aarch64::reloc::name(r_type),
            Machine::Riscv64 => riscv64::reloc::name(r_type),
        }
    }

    /// The width of the field `r_type` writes (0: nothing), `None` if unsupported.
    #[inline]
    pub(super) fn width(self, r_type: u32) -> Option<usize> {
        match self {
            Machine::X86_64 => x86_64::reloc::width(r_type),
            Machine::Aarch64 => aarch64::reloc::width(r_type),
            Machine::Riscv64 => riscv64::reloc::width(r_type),
        }
    }

    /// Applies `r_type` to `place` (its [`Machine::width`] bytes, holding what the
    /// object has there).
    #[inline]
    pub(super) fn apply(
        self,
        r_type: u32,
        place: &mut [u8],
        s: u64,
        a: i64,
        p: u64,
    ) -> Result<(), Failure> {
        match self {
            Machine::X86_64 => {
                use x86_64::reloc::RelocError as E;
                x86_64::reloc::apply(r_type, place, s, a, p).map_err(|e| match e {
                    E::Overflow { value } => Failure::Overflow { value, range: None },
                    E::Unsupported | E::Short => Failure::Unsupported,
                })
            }
            Machine::Aarch64 => {
                use aarch64::reloc::RelocError as E;
                aarch64::reloc::apply(r_type, place, s, a, p).map_err(|e| match e {
                    E::Overflow { value, min, max } => Failure::Overflow {
                        value,
                        range: Some((min, max)),
                    },
                    E::Misaligned { value, align } => Failure::Misaligned { value, align },
                    E::Unsupported | E::Short => Failure::Unsupported,
                })
            }
            Machine::Riscv64 => riscv64::reloc::apply(r_type, place, s, a, p).map_err(riscv),
        }
    }

    /// Bytes of one range-extension veneer (0: the machine has none).
    pub(super) fn veneer_len(self) -> usize {
        match self {
            Machine::X86_64 => 0,
            Machine::Aarch64 => aarch64::reloc::VENEER_LEN,
            Machine::Riscv64 => riscv64::reloc::VENEER_LEN,
        }
    }

    /// Whether an overflowing `r_type` may go through a veneer.
    #[inline]
    pub(super) fn needs_veneer(self, r_type: u32) -> bool {
        match self {
            Machine::X86_64 => false,
            Machine::Aarch64 => aarch64::reloc::needs_veneer(r_type),
            Machine::Riscv64 => riscv64::reloc::needs_veneer(r_type),
        }
    }

    /// A veneer to `target` (its first [`Machine::veneer_len`] bytes are meaningful).
    pub(super) fn veneer(self, target: u64) -> [u8; MAX_VENEER_LEN] {
        let mut v = [0; MAX_VENEER_LEN];
        match self {
            Machine::X86_64 => {}
            Machine::Aarch64 => {
                v[..aarch64::reloc::VENEER_LEN].copy_from_slice(&aarch64::reloc::veneer(target))
            }
            Machine::Riscv64 => v = riscv64::reloc::veneer(target),
        }
        v
    }

    /// The target of the veneer in `bytes`, if it is one.
    pub(super) fn veneer_target(self, bytes: &[u8; MAX_VENEER_LEN]) -> Option<u64> {
        match self {
            Machine::X86_64 => None,
            Machine::Aarch64 => {
                let mut v = [0; aarch64::reloc::VENEER_LEN];
                v.copy_from_slice(&bytes[..aarch64::reloc::VENEER_LEN]);
                aarch64::reloc::veneer_target(&v)
            }
            Machine::Riscv64 => riscv64::reloc::veneer_target(bytes),
        }
    }

    /// The relocation type of the high part a PC-relative low-part relocation refers to
    /// through its label (riscv64's `PCREL_HI20`), if the machine has such pairs.
    #[inline]
    pub(super) fn pcrel_hi(self) -> Option<u32> {
        match self {
            Machine::Riscv64 => Some(riscv64::reloc::PCREL_HI20),
            Machine::X86_64 | Machine::Aarch64 => None,
        }
    }

    /// Whether `r_type` is a low part whose symbol is the label of its high part (its
    /// value is computed from that high part's; see [`Machine::pcrel_hi`]).
    #[inline]
    pub(super) fn is_pcrel_lo(self, r_type: u32) -> bool {
        self == Machine::Riscv64 && riscv64::reloc::is_pcrel_lo(r_type)
    }

    /// Which half of a label difference `r_type` is (first or subtracted) and the bits
    /// of its field, on machines that relocate differences in two steps.
    #[inline]
    pub(super) fn difference_half(self, r_type: u32) -> Option<(bool, u32)> {
        match self {
            Machine::Riscv64 => riscv64::reloc::difference_half(r_type),
            Machine::X86_64 | Machine::Aarch64 => None,
        }
    }

    /// Checks a completed difference `d` fits `bits` bits.
    pub(super) fn check_difference(self, bits: u32, d: i64) -> Result<(), Failure> {
        riscv64::reloc::check_difference(bits, d).map_err(riscv)
    }

    /// For an alignment relocation: the bytes of padding at its place, which must all
    /// be [`Machine::padding_insn`]s.
    #[inline]
    pub(super) fn align_padding(self, r_type: u32, a: i64) -> Option<Result<usize, Failure>> {
        match self {
            Machine::Riscv64 => riscv64::reloc::align_padding(r_type, a)
                .map(|r| r.map(|(len, _)| len).map_err(riscv)),
            Machine::X86_64 | Machine::Aarch64 => None,
        }
    }

    /// The length of the padding instruction `bytes` start with (0: not padding).
    pub(super) fn padding_insn(self, bytes: &[u8]) -> usize {
        match self {
            Machine::Riscv64 => riscv64::reloc::padding_insn(bytes),
            Machine::X86_64 | Machine::Aarch64 => 0,
        }
    }
}

/// A riscv64 relocation error as a [`Failure`].
fn riscv(e: riscv64::reloc::RelocError) -> Failure {
    use riscv64::reloc::RelocError as E;
    match e {
        E::Overflow { value, min, max } => Failure::Overflow {
            value,
            range: Some((min, max)),
        },
        E::Misaligned { value, align } => Failure::Misaligned { value, align },
        E::Unsupported | E::Short => Failure::Unsupported,
    }
}
