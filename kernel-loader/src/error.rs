//! [`Error`]: one error type that every public error of the crate converts into, so a
//! kernel can chain `?` across table lookup, patching, probes, static keys and modules.

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
    Patch(PatchError),
    /// The kernel's text poker failed.
    Poke(PokeError),
    /// A probe operation failed.
    Probe(ProbeError),
    /// A static-key operation failed.
    Key(crate::key::KeyError),
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
            Error::Key(e) => fmt::Display::fmt(e, f),
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

impl From<PatchError> for Error {
    fn from(e: PatchError) -> Error {
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

impl From<crate::key::KeyError> for Error {
    fn from(e: crate::key::KeyError) -> Error {
        Error::Key(e)
    }
}

#[cfg(feature = "module")]
impl From<crate::module::ModuleError> for Error {
    fn from(e: crate::module::ModuleError) -> Error {
        Error::Module(e)
    }
}

#[cfg(test)]
mod tests {
    use core::ops::Range;

    use super::Error;
    use crate::cell::CellError;
    use crate::format::{FormatError, Table};
    use crate::patch::{PokeError, TextPoker};
    use crate::{CpuFeatures, cell, patch, probe};

    struct NoPoker;

    impl TextPoker for NoPoker {
        unsafe fn write(&mut self, _: u64, _: &[u8]) -> Result<(), PokeError> {
            Ok(())
        }
        fn sync_cores(&mut self) {}
        fn end(&mut self) {}
    }

    /// The README's boot sequence: `?` across cell, patch, poke, probe and format errors
    /// into one `kernel_loader::Error`.
    fn boot(exec: &[Range<u64>], poker: &mut NoPoker) -> Result<u32, Error> {
        // SAFETY: this test binary was not processed by `ksites embed`: the cell is
        // empty and nothing is read through it.
        let table = unsafe { cell::image_table(exec) }?;
        // SAFETY: not reached (the cell is empty); it would be the image's own table.
        let report = unsafe { patch::init(&table, exec, &CpuFeatures::detect(), poker) }?;
        poker.begin()?;
        let n = probe::register_image(table, poker)?;
        let again = Table::parse(table.bytes(), table.base(), exec)?;
        Ok(report.sites_patched + n + again.site_count())
    }

    #[test]
    fn question_mark_chains_every_error_into_error() {
        let r = boot(core::slice::from_ref(&(0..0)), &mut NoPoker);
        assert_eq!(r, Err(Error::Cell(CellError::Empty)));
        let e: Error = FormatError::BadMagic.into();
        assert_eq!(
            std::format!("{e}"),
            std::format!("{}", FormatError::BadMagic)
        );
    }
}
