//! Architecture-specific pieces. Each architecture is a module defining the same names
//! (instruction encodings, probe bytes, the live-patch protocol, trap emulation,
//! relocations, CPU features); the rest of the crate uses [`native`], the one for the
//! architecture being compiled for. The modules compile on every host (only `asm!` is
//! behind `cfg(target_arch)`), so the build tool can use any architecture's encoders.

pub mod x86_64;

/// The architecture this crate is compiled for.
#[cfg(target_arch = "x86_64")]
pub use x86_64 as native;
