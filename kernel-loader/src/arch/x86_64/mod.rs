//! x86-64: every encoding, protocol and register convention ksites needs on this
//! architecture. `aarch64` and `riscv64` modules define the same names.
//!
//! * [`branch`]: call/jmp/jcc site encodings, prefixes, rel32 reach, the trampoline.
//! * [`probe`]: the disabled and enabled bytes of every probe form, the int3 protocol,
//!   trap-frame emulation and the dispatcher entry stubs.
//! * [`reloc`]: the ELF machine and the relocation types a module may use.
//! * [`cpu`]: CPUID/XGETBV and the feature set resolvers receive.

pub mod branch;
pub mod cpu;
pub mod probe;
pub mod reloc;

pub use branch::*;
pub use cpu::*;
