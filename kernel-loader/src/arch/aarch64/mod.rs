//! aarch64: every encoding, protocol and register convention ksites needs on this
//! architecture. `x86_64` and `riscv64` modules define the same names.
//!
//! * [`reloc`]: the ELF machine, the relocation types a module may use (each checked
//!   for overflow as aaelf64 says), and the range-extension veneer for `bl`/`b`.

pub mod reloc;
