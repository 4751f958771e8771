//! What `ksites embed` reports ([`EmbedReport`]) and its "already embedded" error,
//! shared by the linked-image ([`super::exec`]) and module ([`super::rel`]) paths.

use kernel_loader::format::SECTION_NAME;

use crate::keys::KeyScan;
use crate::probes::ProbeScan;
use crate::records::IfuncInfo;
use crate::sites::SiteScan;

/// The input already carries a `.ksites` table (or a filled cell).
#[derive(Debug)]
pub struct AlreadyEmbedded(pub String);

impl std::fmt::Display for AlreadyEmbedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: already processed by `ksites embed` (it has a {SECTION_NAME} section); \
             embed the linker's original output instead",
            self.0
        )
    }
}

impl std::error::Error for AlreadyEmbedded {}

/// What `embed` did.
#[derive(Debug, Default)]
pub struct EmbedReport {
    /// Ifuncs described.
    pub ifuncs: Vec<IfuncInfo>,
    /// The scan: sites recorded and references left alone.
    pub scan: SiteScan,
    /// Probes and probe sites.
    pub probes: ProbeScan,
    /// Static keys and their sites.
    pub keys: KeyScan,
    /// Address and size of the table, if one was written (for an object: 0, the table
    /// is relocated at load).
    pub table: Option<(u64, usize)>,
    /// The input was a relocatable object (a module): the table went into `.ksites`
    /// with its relocations in `.rela.ksites`.
    pub relocatable: bool,
}
