//! riscv64 (RV64GC, S-mode): every encoding, protocol and register convention ksites
//! needs on this architecture, under the names `x86_64` and `aarch64` define too.
//!
//! * [`branch`]: ifunc call sites in their three forms (`auipc`+`jalr` pair, relaxed
//!   `jal`, relaxed `c.j`, the table's `prefixes` value) and the rule for relaxed sites,
//!   the `auipc`/`ld`/`jr t1` trampoline.
//! * [`probe`]: the disabled and enabled instruction of every probe form, how `ksites
//!   embed` rewrites a C probe call, the single-store live-patch protocol, `ebreak`
//!   emulation and the dispatcher entry stubs.
//! * [`key`]: static-key sites (`nop` ↔ `jal x0`, the single-store protocol).
//! * [`cpu`]: the ISA extensions resolvers receive, from the device tree
//!   (`riscv,isa-extensions` / `riscv,isa`); `sstatus.FS`/`.VS` for FP and vectors.
//! * [`dtb`]: a validating flattened-device-tree reader (the cpu nodes' properties).
//! * [`local`]: hart-local counters, `fence.i`, and SBI `remote_fence_i`.
//! * [`trap`]: how a kernel's trap handler routes a probe's `ebreak`.
//! * [`reloc`]: the ELF machine and the relocations a module may use.
//!
//! # Probe forms
//!
//! Each [`crate::arch::ProbeKind`] is one 4-byte, 4-aligned instruction in both states
//! (see [`probe`] for the protocol, the reach rule and what embed writes):
//!
//! | kind | disabled | enabled |
//! |---|---|---|
//! | `RustJmp` (`probe!`) | `nop` | `jal x0` → out-of-line block |
//! | `RustEnabled` (`probe_enabled!`) | `nop` | `jal x0` → block setting `true` |
//! | `CCall` (`call __dtrace_probe_*`) | `nop` | `jal ra, ksites_probe_c_entry` (or `ebreak`) |
//! | `CTail` (`tail __dtrace_probe_*`) | `ret` | `ebreak`: fires, then returns |
//! | `CEnabled` (`call __dtraceenabled_*`) | `li a0, 0` | `li a0, 1` |
//! | `CEnabledTail` (`tail __dtraceenabled_*`) | `jal x0, ksites_probe_ret0` (±1 MiB) | `jal x0, ksites_probe_ret1` (or `ebreak`) |

pub mod branch;
pub mod cpu;
pub mod dtb;
pub mod key;
pub mod local;
pub mod probe;
pub mod reloc;
pub mod trap;

pub use branch::*;
pub use cpu::*;
#[cfg(target_arch = "riscv64")]
pub use local::{fence_i, sbi_remote_fence_i};
