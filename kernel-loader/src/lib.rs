//! # kernel-loader
//!
//! The `#![no_std]`, allocation-free run-time half of ksites.
//!
//! * [`format`]: the `.ksites` table format (v2; v1 still read) and its validating,
//!   zero-copy reader.
//! * [`arch`]: everything architecture-specific ([`arch::x86_64`], [`arch::aarch64`],
//!   [`arch::riscv64`]), behind names every architecture defines; [`arch::Arch`] is a
//!   table's architecture.
//! * [`cpu`]: [`CpuFeatures`], the compiled-for architecture's feature set (on x86-64:
//!   from CPUID leaves 1, 7 and 0xD and XGETBV; on aarch64 from the ID registers; on
//!   riscv64 from the device tree's ISA extensions).
//! * [`ifunc!`]: declares an ifunc (trampoline, slot, descriptor record); [`retarget!`],
//!   [`ifunc::retarget_raw`] and [`ifunc::reresolve_all`] retarget ifuncs live.
//! * [`patch`]: boot-time patching of ifunc call sites through a kernel-supplied [`TextPoker`].
//! * [`introspect`]: what each ifunc resolved to, and every ifunc and probe site's state.
//! * [`cell`]: the table cell through which a linked image finds its own table.
//! * [`probe`](mod@probe): SDT probes (`probe!`, `probe_enabled!`, dtrace-style C probes), the
//!   registry, and live enable/disable with the architecture's live-patch protocol.
//! * [`key`]: static keys (`static_key!`, `static_branch_unlikely!`,
//!   `static_branch_likely!`): sites rewritten live between a NOP and a jump.
//! * `module` (feature `module`): the ET_REL module loader ([`module::Module::load`]).
//! * `host` (feature `std`, Linux x86-64): a [`TextPoker`] and a `SIGTRAP` hook for a
//!   normal process, so a host binary can patch itself (tests and benchmarks).
//!
//! The build tool (`ksites embed`) writes the table; a kernel calls [`cell::image_table`]
//! and [`patch::init`] once at boot.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "std", test))]
extern crate std;

pub mod arch;
pub mod cell;
pub mod cpu;
pub mod error;
pub mod format;
#[cfg(all(feature = "std", target_os = "linux", target_arch = "x86_64"))]
pub mod host;
pub mod ifunc;
pub mod introspect;
pub mod key;
#[cfg(feature = "module")]
pub mod module;
pub mod name;
pub mod patch;
pub mod probe;

pub use cpu::CpuFeatures;
pub use error::Error;
pub use name::Name;
pub use patch::{InitReport, PatchError, PokeError, TextPoker};
