//! `ksites embed`: discover sites, write the `.ksites` table, and write the output
//! atomically.
//!
//! * [`exec`]: linked images (ET_EXEC): the table in a new `PT_LOAD`, the table cell
//!   filled, C probe sites disabled.
//! * [`rel`]: relocatable objects (ET_REL modules): `.ksites` and `.rela.ksites`, laid
//!   out by the module layout contract ([`kernel_loader::module::layout`]).
//! * `report`: [`EmbedReport`] and [`AlreadyEmbedded`].

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kernel_loader::format::SECTION_NAME;

use crate::elf::{ElfKind, Image};

pub mod exec;
pub mod rel;
mod report;

pub use exec::{append_segment, stapsdt_notes};
pub use report::{AlreadyEmbedded, EmbedReport};

/// Embeds into an in-memory image; returns the new file contents.
pub fn embed_bytes(path: &str, data: &[u8]) -> Result<(Vec<u8>, EmbedReport)> {
    let img = Image::parse(path, data)?;
    if img.section_by_name(SECTION_NAME).is_some() {
        return Err(AlreadyEmbedded(path.to_string()).into());
    }
    if img.kind == ElfKind::Rel {
        // A module: `.ksites` + `.rela.ksites`, always (even an empty table).
        return rel::embed_rel(path, data);
    }
    exec::embed_exec(path, data, &img)
}

/// Embeds `input` into `output`, writing a temporary file beside `output` and renaming
/// it, so `output` is either untouched or complete. `input` is never modified.
pub fn embed_file(input: &Path, output: &Path) -> Result<EmbedReport> {
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        bail!(
            "{}: refusing to overwrite the input; write to a different -o path",
            input.display()
        );
    }
    let data = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let (out, report) = embed_bytes(&input.display().to_string(), &data)?;
    let perms = std::fs::metadata(input)?.permissions();
    write_atomically(output, &out, perms)?;
    Ok(report)
}

/// Writes `bytes` to a temporary file in `path`'s directory, syncs it, and renames it
/// over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8], perms: std::fs::Permissions) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ksites-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    // Test hook (fault injection for the "killed mid-write" test): write in 64 KiB chunks
    // with a pause between them, so a kill can land inside the write.
    let delay = std::env::var("KSITES_TEST_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    match delay {
        Some(ms) => {
            for chunk in bytes.chunks(64 * 1024) {
                tmp.write_all(chunk)?;
                tmp.as_file().sync_data()?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        None => tmp.write_all(bytes)?,
    }
    tmp.as_file().sync_all()?;
    tmp.as_file().set_permissions(perms)?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("cannot rename into {}: {}", path.display(), e.error))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
