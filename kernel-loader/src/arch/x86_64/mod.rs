//! x86-64: every encoding, protocol and register convention ksites needs on this
//! architecture. `aarch64` and `riscv64` modules define the same names.
//!
//! * [`branch`]: call/jmp/jcc site encodings, prefixes, rel32 reach, the trampoline.
//! * [`probe`]: the disabled and enabled bytes of every probe form, the int3 protocol,
//!   trap-frame emulation and the dispatcher entry stubs.
//! * [`key`]: static-key sites (NOP5 ↔ `jmp rel32`, the probe sites' int3 protocol).
//! * [`reloc`]: the ELF machine and the relocation types a module may use.
//! * [`emulate`]: the #BP emulation of a `call`/`jmp`/`jcc` site trapped while a live
//!   ifunc retarget rewrites it (`jcc` conditions from RFLAGS).
//! * [`cpu`]: CPUID/XGETBV and the feature set resolvers receive.
//! * [`local`]: CPU-local counters (an interrupt-atomic increment without `lock`).
//! * [`trap`]: the ready #BP entry stub (`int3_entry!`) a kernel installs in its IDT.
//!
//! # Probe forms
//!
//! How each [`crate::arch::ProbeKind`] is disabled and enabled (5-byte sites):
//!
//! | kind | disabled | enabled |
//! |---|---|---|
//! | `RustJmp` (`probe!`) | `0f 1f 44 00 00` (nop) | `e9 rel32` → out-of-line block |
//! | `RustEnabled` (`probe_enabled!`) | `0f 1f 44 00 00` | `e9 rel32` → block setting `true` |
//! | `CCall` (`call __dtrace_probe_*`) | `0f 1f 44 00 00` | `e8 rel32` → C dispatcher |
//! | `CTail` (`jmp __dtrace_probe_*`) | `c3 90 90 90 90` (ret) | `cc 90 90 90 90`: int3 fires, then returns |
//! | `CEnabled` (`call __dtraceenabled_*`) | `b8 00 00 00 00` (eax = 0) | `b8 01 00 00 00` (eax = 1) |
//! | `CEnabledTail` (`jmp __dtraceenabled_*`) | `e9 rel32` → `ksites_probe_ret0` | `e9 rel32` → `ksites_probe_ret1` |
//!
//! Each form is a single instruction in both states, so a CPU stopped anywhere during
//! the int3 protocol resumes on an instruction boundary.

pub mod branch;
pub mod cpu;
pub mod emulate;
pub mod key;
pub mod local;
pub mod probe;
pub mod reloc;
pub mod trap;

pub use branch::*;
pub use cpu::*;
