//! CPU features, as resolvers see them: the feature set of the architecture this crate
//! is compiled for ([`crate::arch::native`]'s `CpuFeatures`, a `bitflags` set over
//! `u64`; see [`crate::arch`] for what every architecture defines), and the helper that
//! enables the SIMD register state those features need (`enable_simd_state`, returning a
//! `SimdState`).

pub use crate::arch::native::{CpuFeatures, SimdState, enable_simd_state};
