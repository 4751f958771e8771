//! A module's static keys: its `.ksites_key_sites` records read through their
//! relocations, each site checked as in a linked image ([`crate::keys`]), and the key
//! objects they name: a defined `StaticKey` read from the object's data (its name
//! through its own relocation), an undefined symbol taken as an imported kernel key
//! (its name is the symbol's; its default is the kernel's, so its sites stay NOP and
//! the module loader sets them).

use anyhow::{Result, bail, ensure};
use object::{Object, ObjectSection, SectionIndex};

use super::layout::Target;
use super::read::Obj;
use crate::keys::{
    KEY_SITE_RECORDS, KEY_SIZE, SITE_RECORD_SECTION, SITE_RECORD_SIZE, check_same_function,
    check_site, key_default, key_object, record_likely, site_record,
};
use crate::record_section::{self, u64_at};

/// A key the module's sites name.
pub(super) struct RelKey {
    pub(super) key: Target,
    pub(super) name: String,
    /// `None`: imported (an undefined symbol).
    pub(super) default: Option<bool>,
}

/// A key site of the module.
pub(super) struct RelKeySite {
    pub(super) site: Target,
    pub(super) target: Target,
    pub(super) likely: bool,
    pub(super) key: Target,
}

/// Every key site record of the module and the keys they name (each key once, in the
/// order first named). Sites are checked as [`crate::keys::check_site`] and
/// [`crate::keys::check_same_function`] say, with the section offsets; whether the
/// branch form reaches its label is decided at the module layout.
pub(super) fn read_keys(o: &Obj<'_, '_>) -> Result<(Vec<RelKey>, Vec<RelKeySite>)> {
    let mut keys: Vec<RelKey> = Vec::new();
    let mut sites = Vec::new();
    let path = o.path;
    let arch = o.img.target;
    for sec in o.img.file.sections() {
        if sec.name().ok() != Some(SITE_RECORD_SECTION) {
            continue;
        }
        let data = o.data_of(&sec)?;
        let relocs = o.relocs(&sec)?;
        for off in record_section::walk(path, &KEY_SITE_RECORDS, data, |_| true)? {
            let r = &data[off..off + SITE_RECORD_SIZE];
            let likely = record_likely(path, off, r)?;
            let f = |field: usize| o.field(&relocs, SITE_RECORD_SECTION, (off + field) as u64);
            let (site, target, key) = (
                f(site_record::SITE)?,
                f(site_record::TARGET)?,
                f(site_record::KEY)?,
            );
            let at = || {
                format!(
                    "{path}: key site {} ({SITE_RECORD_SECTION}+{off:#x})",
                    o.describe(site)
                )
            };
            if !keys.iter().any(|k| k.key == key) {
                keys.push(read_key(o, key, &at)?);
            }
            let name = &keys.iter().find(|k| k.key == key).expect("just added").name;
            let (
                Target::Sec {
                    sec: ssec,
                    off: soff,
                },
                Target::Sec {
                    sec: tsec,
                    off: toff,
                },
            ) = (site, target)
            else {
                bail!(
                    "{} (key {name}): the site or its label {} is an undefined symbol",
                    at(),
                    o.describe(target)
                );
            };
            ensure!(
                o.is_exec(ssec),
                "{} (key {name}): the site is not in an executable section",
                at()
            );
            ensure!(
                o.is_exec(tsec),
                "{} (key {name}): its label {} is not in an executable section",
                at(),
                o.describe(target)
            );
            let bytes = o.bytes_at(site, arch.probe_site_len() as u64, "key site")?;
            // The alignment in its section: the module layout keeps it.
            check_site(arch, bytes, soff)
                .and_then(|()| {
                    check_same_function(o.img, SectionIndex(ssec), soff, SectionIndex(tsec), toff)
                })
                .map_err(|why| anyhow::anyhow!("{} (key {name}): {why}", at()))?;
            sites.push(RelKeySite {
                site,
                target,
                likely,
                key,
            });
        }
    }
    Ok((keys, sites))
}

/// The key at `key`: a defined `StaticKey` (magic, default, name through the
/// relocation of its name pointer) or an imported one (an undefined symbol + 0).
fn read_key(o: &Obj<'_, '_>, key: Target, at: &dyn Fn() -> String) -> Result<RelKey> {
    let (sec, off) = match key {
        Target::Undef { sym, addend } => {
            let name = o.img.symbol_name(sym);
            ensure!(
                addend == 0,
                "{}: its key is the undefined symbol {name} with addend {addend} (an imported \
                 key is the symbol itself)",
                at()
            );
            ensure!(
                !name.is_empty(),
                "{}: its key is an undefined symbol with no name",
                at()
            );
            return Ok(RelKey {
                key,
                name: o.img.raw_symbol_name(sym).to_string(),
                default: None,
            });
        }
        Target::Sec { sec, off } => (sec, off),
    };
    let what = || format!("{}: key object at {}", at(), o.describe(key));
    let b = o.bytes_at(key, KEY_SIZE as u64, "key object")?;
    let default = key_default(b, &what)?;
    let ksec = o
        .img
        .file
        .section_by_index(SectionIndex(sec))
        .map_err(|e| anyhow::anyhow!("{}: {e}", what()))?;
    let krelocs = o.relocs(&ksec)?;
    let name_t = o.field(&krelocs, "StaticKey", off + key_object::NAME as u64)?;
    let name = o.string(
        name_t,
        u64_at(b, key_object::NAME_LEN),
        &format!("name of the key object at {}", o.describe(key)),
    )?;
    Ok(RelKey {
        key,
        name,
        default: Some(default),
    })
}
