//! [`Error`]: one error type that every public error of the crate converts into, so a
//! kernel can chain `?` across table lookup, patching, probes and modules.

use core::fmt;

use crate::cell::CellError;
use crate::format::FormatError;
use crate::patch::{PatchError, PokeError};
use crate::probe::ProbeError;

/// Any error the loader returns. Each variant wraps the error of one job; `Display`
/// prints the wrapped error's message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A `.ksites` table is malformed.
    Format(FormatError),
    /// The image's table cell is missing or invalid.
    Cell(CellError),
    /// Boot-time ifunc patching failed.
    Patch(PatchError<'static>),
    /// The kernel's text poker failed.
    Poke(PokeError),
    /// A probe operation failed.
    Probe(ProbeError),
    /// Loading, checking or unloading a module failed.
    #[cfg(feature = "module")]
    Module(crate::module::ModuleError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(e) => fmt::Display::fmt(e, f),
            Error::Cell(e) => fmt::Display::fmt(e, f),
            Error::Patch(e) => fmt::Display::fmt(e, f),
            Error::Poke(e) => fmt::Display::fmt(e, f),
            Error::Probe(e) => fmt::Display::fmt(e, f),
            #[cfg(feature = "module")]
            Error::Module(e) => fmt::Display::fmt(e, f),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Error {
        Error::Format(e)
    }
}

impl From<CellError> for Error {
    fn from(e: CellError) -> Error {
        Error::Cell(e)
    }
}

impl From<PatchError<'static>> for Error {
    fn from(e: PatchError<'static>) -> Error {
        Error::Patch(e)
    }
}

impl From<PokeError> for Error {
    fn from(e: PokeError) -> Error {
        Error::Poke(e)
    }
}

impl From<ProbeError> for Error {
    fn from(e: ProbeError) -> Error {
        Error::Probe(e)
    }
}

#[cfg(feature = "module")]
impl From<crate::module::ModuleError> for Error {
    fn from(e: crate::module::ModuleError) -> Error {
        Error::Module(e)
    }
}
