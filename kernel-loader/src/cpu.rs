//! CPU features, as resolvers see them: the feature set of the architecture this crate
//! is compiled for ([`crate::arch::native`]'s `CpuFeatures`, a `bitflags` set over
//! `u64`; see [`crate::arch`] for what every architecture defines).

pub use crate::arch::native::CpuFeatures;
