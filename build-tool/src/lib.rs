//! Library half of the `ksites` CLI (the binary is a thin clap front end).

pub mod check_module;
pub mod elf;
pub mod embed;
pub use embed::rel as embed_rel;
pub mod inspect;
pub mod link;
pub mod probes;
pub mod record_section;
pub mod records;
pub mod scan;
pub mod sites;
pub mod table;
pub mod target;
pub mod verify;
