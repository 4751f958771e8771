//! Reads the ifunc descriptor records the `ifunc!` macro leaves in `.ksites_ifuncs`.

use anyhow::{Context, Result, bail, ensure};
use kernel_loader::arch::x86_64::{JMP_RIP_INDIRECT, TRAMPOLINE_LEN};
use kernel_loader::ifunc::{RECORD_MAGIC, RECORD_SECTION, RECORD_SIZE, RECORD_VERSION, record};
use object::{Object, ObjectSection};

use crate::elf::{ElfKind, Image};

/// One ifunc, with absolute addresses in the linked image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfuncInfo {
    /// `module::path::name`.
    pub name: String,
    /// The trampoline (the ifunc's own symbol).
    pub trampoline: u64,
    /// Raw symbol name of the trampoline, if the image has one.
    pub trampoline_symbol: String,
    /// The slot.
    pub slot: u64,
    /// The resolver adapter.
    pub resolver: u64,
    /// The default implementation.
    pub default: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// All ifunc records of a linked image, sorted by trampoline address. An image without
/// the section has no ifuncs (not an error).
pub fn read_ifuncs(img: &Image<'_>) -> Result<Vec<IfuncInfo>> {
    let Some(sec) = img.section_by_name(RECORD_SECTION) else {
        return Ok(Vec::new());
    };
    if img.kind != ElfKind::Exec {
        bail!(
            "{}: ifunc records can only be read from ET_EXEC images so far (this file is {:?})",
            img.path,
            img.kind
        );
    }
    let data = sec
        .data()
        .with_context(|| format!("{}: cannot read section {RECORD_SECTION}", img.path))?;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        // The linker may pad between input sections; records are 8-aligned and start with
        // a non-zero magic, so skip zero words.
        if data.len() - off >= 8 && u64_at(data, off) == 0 {
            off += 8;
            continue;
        }
        ensure!(
            data.len() - off >= RECORD_SIZE,
            "{}: {RECORD_SECTION}+{off:#x}: truncated ifunc record ({} bytes left, need {RECORD_SIZE})",
            img.path,
            data.len() - off
        );
        let r = &data[off..off + RECORD_SIZE];
        let (magic, version) = (u32_at(r, 0), u32_at(r, 4));
        ensure!(
            magic == RECORD_MAGIC,
            "{}: {RECORD_SECTION}+{off:#x}: bad ifunc record magic {magic:#x}",
            img.path
        );
        ensure!(
            version == RECORD_VERSION,
            "{}: {RECORD_SECTION}+{off:#x}: ifunc record version {version}, this tool reads {RECORD_VERSION} \
             (rebuild with the matching kernel-loader)",
            img.path
        );
        let name_ptr = u64_at(r, record::NAME_PTR);
        let name_len = u64_at(r, record::NAME_LEN);
        let name = img
            .read_va(name_ptr, name_len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .with_context(|| {
                format!(
                    "{}: {RECORD_SECTION}+{off:#x}: unreadable ifunc name at {name_ptr:#x}",
                    img.path
                )
            })?
            .to_string();
        let trampoline = u64_at(r, record::TRAMPOLINE);
        let slot = u64_at(r, record::SLOT);
        let info = IfuncInfo {
            trampoline_symbol: img
                .file
                .symbols()
                .find(|s| {
                    use object::ObjectSymbol;
                    s.address() == trampoline && s.kind() == object::SymbolKind::Text
                })
                .and_then(|s| {
                    use object::ObjectSymbol;
                    s.name().ok().map(str::to_string)
                })
                .unwrap_or_default(),
            name,
            trampoline,
            slot,
            resolver: u64_at(r, record::RESOLVER),
            default: u64_at(r, record::DEFAULT),
        };
        check_trampoline(img, &info)?;
        out.push(info);
        off += RECORD_SIZE;
    }
    out.sort_by_key(|f| f.trampoline);
    for w in out.windows(2) {
        ensure!(
            w[0].trampoline != w[1].trampoline,
            "{}: two ifunc records for one trampoline ({} and {})",
            img.path,
            w[0].name,
            w[1].name
        );
    }
    Ok(out)
}

/// The trampoline must be `jmp [rip+slot]`: anything else means the record is stale.
fn check_trampoline(img: &Image<'_>, f: &IfuncInfo) -> Result<()> {
    let b = img
        .read_va(f.trampoline, TRAMPOLINE_LEN as u64)
        .with_context(|| {
            format!(
                "{}: ifunc {}: trampoline {:#x} is not in the file",
                img.path, f.name, f.trampoline
            )
        })?;
    let disp = i32::from_le_bytes(b[2..6].try_into().expect("4 bytes"));
    let target = (f.trampoline + TRAMPOLINE_LEN as u64).wrapping_add_signed(i64::from(disp));
    ensure!(
        b[..2] == JMP_RIP_INDIRECT && target == f.slot,
        "{}: ifunc {}: trampoline at {:#x} is not `jmp [rip+{:#x}]` (found {:02x?})",
        img.path,
        f.name,
        f.trampoline,
        f.slot,
        b
    );
    Ok(())
}
