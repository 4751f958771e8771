//! riscv64 (placeholder until helper R1's module lands): only the relocations.
//!
//! * [`reloc`]: the ELF machine, the relocation types a module may use (each checked
//!   for overflow as the psABI says), and the range-extension veneer for calls.

pub mod reloc;
