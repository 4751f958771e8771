//! Architecture-specific pieces: instruction encodings and CPU identification.
//!
//! Only x86-64 exists today; an `aarch64` module would sit beside it.

pub mod x86_64;
