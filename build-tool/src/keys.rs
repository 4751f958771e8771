//! Static keys: the `.ksites_key_sites` records `static_branch_likely!`/
//! `static_branch_unlikely!` (and C's `KSITES_STATIC_BRANCH_*`) leave, and the
//! `StaticKey` objects they name, read from a linked image ([`find_keys`]); the checks
//! every site must pass, and the numbering and initial forms shared with modules
//! (`embed::rel::keys`).
//!
//! A site is the architecture's probe-site NOP as compiled; it holds the branch form
//! (to its label) exactly when its key's state differs from its likeliness. `embed`
//! writes that form into a site whose key is defined in the file and whose default
//! differs from its likeliness, so the image boots in every key's default state.

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use object::{ObjectSection, SectionIndex};

use crate::elf::Image;
use crate::record_section::{self, RecordKind, Relative, u32_at, u64_at};
use crate::table::{KeyEntry, KeySiteEntry};
use crate::target::{KeyForm, ProbeBytes, Target};

pub use kernel_loader::key::{
    KEY_MAGIC, KEY_SIZE, SITE_RECORD_LIKELY, SITE_RECORD_MAGIC, SITE_RECORD_SECTION,
    SITE_RECORD_SIZE, layout as key_object,
};

/// Offsets of a key site record's fields (`kernel_loader::key`'s macros write them).
pub mod site_record {
    /// `u32` flags ([`super::SITE_RECORD_LIKELY`]).
    pub const FLAGS: usize = 4;
    /// `u64` address of the site instruction.
    pub const SITE: usize = 8;
    /// `u64` address of the label.
    pub const TARGET: usize = 16;
    /// `u64` address of the `StaticKey`.
    pub const KEY: usize = 24;
}

/// Key site records.
pub const KEY_SITE_RECORDS: RecordKind = RecordKind {
    section: SITE_RECORD_SECTION,
    what: "key site",
    size: SITE_RECORD_SIZE,
    magic: SITE_RECORD_MAGIC,
    version: None,
};

/// Every key and key site of a file, as the table records them.
#[derive(Clone, Debug, Default)]
pub struct KeyScan {
    /// Keys, sorted by name (then address): a key's index is its position.
    pub keys: Vec<KeyEntry>,
    /// Sites, sorted by address.
    pub sites: Vec<KeySiteEntry>,
    /// Each site's `function+0xoff`, in the order of `sites`.
    pub locations: Vec<String>,
    /// The sites `embed` gives their branch form: (site address, bytes).
    pub initial: Vec<(u64, ProbeBytes)>,
}

impl KeyScan {
    /// Whether the file has no key site.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty() && self.keys.is_empty()
    }
}

/// A key as read, before numbering.
#[derive(Clone, Debug)]
pub(crate) struct RawKey {
    pub(crate) addr: u64,
    pub(crate) name: String,
    /// The default state; `None` for an imported key.
    pub(crate) default: Option<bool>,
}

/// A key site as read, before numbering.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawSite {
    pub(crate) addr: u64,
    pub(crate) target: u64,
    pub(crate) likely: bool,
    /// The key's address (a [`RawKey::addr`]).
    pub(crate) key: u64,
}

/// The flags of the key site record at `off` of its section: whether it is a likely
/// site; other bits set are an error.
pub(crate) fn record_likely(path: &str, off: usize, r: &[u8]) -> Result<bool> {
    let flags = u32_at(r, site_record::FLAGS);
    ensure!(
        flags & !SITE_RECORD_LIKELY == 0,
        "{path}: {SITE_RECORD_SECTION}+{off:#x}: key site record flags {flags:#x} (only bit 0, \
         likely, is defined; rebuild with the matching kernel-loader)"
    );
    Ok(flags & SITE_RECORD_LIKELY != 0)
}

/// The default state of the key object `b` (its [`KEY_SIZE`] bytes), checking its
/// magic; `what` names it for errors.
pub(crate) fn key_default(b: &[u8], what: &dyn Fn() -> String) -> Result<bool> {
    let magic = u32_at(b, 0);
    ensure!(
        magic == KEY_MAGIC,
        "{}: not a StaticKey (magic {magic:#010x}, expected {KEY_MAGIC:#010x} \"KSKY\"; a stale \
         record, or a kernel-loader version mismatch)",
        what()
    );
    match u32_at(b, key_object::DEFAULT) {
        0 => Ok(false),
        1 => Ok(true),
        d => bail!("{}: default state {d}, expected 0 or 1", what()),
    }
}

/// What must hold of one site's bytes, wherever it was read: `bytes` (at `site`) are
/// the NOP, and the site is aligned. `Err` says why not. (Whether its branch form
/// reaches its label is checked by `number`, at the addresses of the file or of the
/// module layout.)
pub(crate) fn check_site(t: Target, bytes: &[u8], site: u64) -> Result<(), String> {
    if bytes != t.key_nop() {
        return Err(format!(
            "holds {bytes:02x?}, expected the {}-byte NOP {:02x?} (every key site is \
             compiled as the NOP)",
            t.probe_site_len(),
            t.key_nop()
        ));
    }
    match t.probe_site_misaligned(site) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Whether the label `target` (in section `tsec`) belongs to the function holding the
/// site (in `ssec`), when sized function symbols tell: the same function, or its
/// out-of-line part (gcc's `f.cold`). Addresses are section offsets in an object.
pub(crate) fn check_same_function(
    img: &Image<'_>,
    ssec: SectionIndex,
    site: u64,
    tsec: SectionIndex,
    target: u64,
) -> Result<(), String> {
    let sized = |sec, a| {
        img.enclosing_symbol(sec, a)
            .filter(|s| s.is_func && s.size != 0)
    };
    let Some(f) = sized(ssec, site) else {
        return Ok(());
    };
    if tsec == ssec && (f.addr..f.addr.saturating_add(f.size)).contains(&target) {
        return Ok(());
    }
    match sized(tsec, target) {
        Some(g) if !g.name.starts_with(&format!("{}.", f.name)) => Err(format!(
            "its label at {target:#x} is in function {}, not in the site's function {}",
            crate::elf::demangle(&g.name),
            crate::elf::demangle(&f.name)
        )),
        _ => Ok(()),
    }
}

/// Numbers `keys` (sorted by name, then address) and `sites` (sorted by address, none
/// overlapping another), checks that every site's branch form reaches its label, and
/// lists the initial forms: every site of a defined key whose default differs from its
/// likeliness gets its branch form. `loc(addr)` names a
/// site for messages; `target` is the file's.
pub(crate) fn number(
    path: &str,
    target: Target,
    keys: Vec<RawKey>,
    mut sites: Vec<RawSite>,
    loc: &dyn Fn(u64) -> String,
) -> Result<KeyScan> {
    let mut keys = keys;
    keys.sort_by(|a, b| (&a.name, a.addr).cmp(&(&b.name, b.addr)));
    keys.dedup_by_key(|k| k.addr);
    let index: HashMap<u64, u32> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.addr, i as u32))
        .collect();
    sites.sort_by_key(|s| s.addr);
    let len = target.probe_site_len() as u64;
    for w in sites.windows(2) {
        ensure!(
            w[0].addr.saturating_add(len) <= w[1].addr,
            "{path}: key sites at {} and {} overlap (two records for one site?)",
            loc(w[0].addr),
            loc(w[1].addr)
        );
    }
    let mut out = KeyScan::default();
    for s in &sites {
        let i = *index
            .get(&s.key)
            .with_context(|| format!("internal: key site {:#x} names no key", s.addr))?;
        let k = &keys[i as usize];
        let form = target.key_branch(s.addr, s.target).map_err(|reach| {
            anyhow::anyhow!(
                "{path}: key site {} (key {}): its label at {:#x} is beyond {reach}",
                loc(s.addr),
                k.name,
                s.target
            )
        })?;
        if k.default.is_some_and(|d| d != s.likely) {
            out.initial.push((s.addr, form));
        }
        out.sites.push(KeySiteEntry {
            addr: s.addr,
            target: s.target,
            likely: s.likely,
            key: i,
        });
        out.locations.push(loc(s.addr));
    }
    out.keys = keys
        .into_iter()
        .map(|k| KeyEntry {
            name: k.name,
            addr: k.addr,
            default: k.default.unwrap_or(false),
            imported: k.default.is_none(),
        })
        .collect();
    Ok(out)
}

/// The form a site of a key with state `enabled` holds: the branch form iff the state
/// differs from the site's likeliness.
pub fn expected_form(t: Target, site: &KeySiteEntry, enabled: bool) -> Result<ProbeBytes, String> {
    if enabled == site.likely {
        Ok(t.key_nop())
    } else {
        t.key_branch(site.addr, site.target)
            .map_err(|reach| format!("its label at {:#x} is beyond {reach}", site.target))
    }
}

/// A key site's form as `inspect` prints it: `nop`, `jump` (to its label), or what
/// else it holds.
pub fn form_name(t: Target, bytes: Option<&[u8]>, site: u64, label: u64) -> String {
    match bytes.map(|b| t.key_form(b, site)) {
        None => "not in the file".to_string(),
        Some(KeyForm::Nop) => "nop".to_string(),
        Some(KeyForm::Branch(d)) if d == label => "jump".to_string(),
        Some(KeyForm::Branch(d)) => format!("jump to {d:#x}, not its label"),
        Some(KeyForm::Other) => format!("other bytes {:02x?}", bytes.unwrap_or_default()),
    }
}

/// The executable section of a linked image holding `addr`.
fn exec_section(img: &Image<'_>, addr: u64) -> Option<SectionIndex> {
    img.exec_sections()
        .find(|s| s.address() <= addr && addr < s.address().saturating_add(s.size()))
        .map(|s| s.index())
}

/// `function+0xoff` of `addr` in a linked image (its address if no section holds it).
fn location(img: &Image<'_>, addr: u64) -> String {
    exec_section(img, addr).map_or_else(|| format!("{addr:#x}"), |s| img.describe(s, addr))
}

/// The key site records of a linked image, with their pointers read through the
/// image's `RELATIVE` relocations (a PIE): (offset in the section, site).
fn read_records(img: &Image<'_>, rel: &Relative) -> Result<Vec<(usize, RawSite)>> {
    let Some(sec) = img.section_by_name(SITE_RECORD_SECTION) else {
        return Ok(Vec::new());
    };
    let path = &img.path;
    let data = sec
        .data()
        .with_context(|| format!("{path}: cannot read section {SITE_RECORD_SECTION}"))?;
    let data = &*rel.apply(sec.address(), data);
    let mut out = Vec::new();
    for off in record_section::walk(path, &KEY_SITE_RECORDS, data, |_| true)? {
        let r = &data[off..off + SITE_RECORD_SIZE];
        out.push((
            off,
            RawSite {
                addr: u64_at(r, site_record::SITE),
                target: u64_at(r, site_record::TARGET),
                likely: record_likely(path, off, r)?,
                key: u64_at(r, site_record::KEY),
            },
        ));
    }
    Ok(out)
}

/// Every static key and key site of a linked image (none without a
/// `.ksites_key_sites` section: the image's relocations are never walked for keys).
/// Each site is checked ([`check_site`], [`check_same_function`], its label in an
/// executable section) and each key object ([`key_default`]); an error names the site
/// and its key.
pub fn find_keys(img: &Image<'_>) -> Result<KeyScan> {
    if img.section_by_name(SITE_RECORD_SECTION).is_none() {
        return Ok(KeyScan::default());
    }
    let path = &img.path;
    let rel = Relative::of(img);
    let records = read_records(img, &rel)?;
    let mut keys: HashMap<u64, RawKey> = HashMap::new();
    let t = img.target;
    let len = t.probe_site_len() as u64;
    let mut sites = Vec::with_capacity(records.len());
    for (off, s) in records {
        let at = || {
            format!(
                "{path}: key site {} ({SITE_RECORD_SECTION}+{off:#x})",
                location(img, s.addr)
            )
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(s.key) {
            let what = || format!("{}: key object at {:#x}", at(), s.key);
            ensure!(s.key != 0, "{}: its key pointer is 0", at());
            let b = rel
                .read_va(img, s.key, KEY_SIZE as u64)
                .with_context(|| format!("{}: not in the file", what()))?;
            let default = key_default(&b, &what)?;
            let (p, n) = (
                u64_at(&b, key_object::NAME),
                u64_at(&b, key_object::NAME_LEN),
            );
            let name = img
                .read_va(p, n)
                .and_then(|b| std::str::from_utf8(b).ok())
                .with_context(|| {
                    format!("{}: its name at {p:#x} ({n} bytes) is unreadable", what())
                })?
                .to_string();
            slot.insert(RawKey {
                addr: s.key,
                name,
                default: Some(default),
            });
        }
        let name = &keys[&s.key].name;
        let Some(ssec) = exec_section(img, s.addr) else {
            bail!(
                "{} (key {name}): the site is not in an executable section",
                at()
            );
        };
        let Some(tsec) = exec_section(img, s.target) else {
            bail!(
                "{} (key {name}): its label at {:#x} is not in an executable section",
                at(),
                s.target
            );
        };
        let bytes = img
            .read_va(s.addr, len)
            .with_context(|| format!("{} (key {name}): not in the file", at()))?;
        check_site(t, bytes, s.addr)
            .and_then(|()| check_same_function(img, ssec, s.addr, tsec, s.target))
            .map_err(|why| anyhow::anyhow!("{} (key {name}): {why}", at()))?;
        sites.push(s);
    }
    number(path, t, keys.into_values().collect(), sites, &|a| {
        location(img, a)
    })
}

/// The key sites an embedded image's records name (their bytes are their initial
/// forms now, so nothing is checked but the records): (site, label, likely, key
/// address), sorted by site.
pub fn key_sites_in_embedded(img: &Image<'_>) -> Result<Vec<(u64, u64, bool, u64)>> {
    let rel = Relative::of(img);
    let mut v: Vec<_> = read_records(img, &rel)?
        .into_iter()
        .map(|(_, s)| (s.addr, s.target, s.likely, s.key))
        .collect();
    v.sort_unstable();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: u64, name: &str, default: Option<bool>) -> RawKey {
        RawKey {
            addr,
            name: name.to_string(),
            default,
        }
    }

    fn site(addr: u64, likely: bool, key: u64) -> RawSite {
        RawSite {
            addr,
            target: addr + 0x20,
            likely,
            key,
        }
    }

    #[test]
    fn keys_by_name_then_address_sites_by_address_and_their_initial_forms() {
        let t = Target::X86_64;
        let keys = vec![
            key(0x3000, "b", Some(true)),
            key(0x2000, "a", None),
            key(0x1000, "b", Some(false)),
            key(0x3000, "b", Some(true)),
        ];
        let sites = vec![
            site(0x10, false, 0x3000),
            site(0x0, true, 0x1000),
            site(0x5, false, 0x2000),
            site(0x40, true, 0x3000),
        ];
        let s = number("f", t, keys, sites, &|a| format!("{a:#x}")).unwrap();
        let k: Vec<(&str, u64, bool, bool)> = s
            .keys
            .iter()
            .map(|k| (k.name.as_str(), k.addr, k.default, k.imported))
            .collect();
        assert_eq!(
            k,
            [
                ("a", 0x2000, false, true),
                ("b", 0x1000, false, false),
                ("b", 0x3000, true, false)
            ]
        );
        let v: Vec<(u64, u32, bool)> = s.sites.iter().map(|s| (s.addr, s.key, s.likely)).collect();
        assert_eq!(
            v,
            [
                (0x0, 1, true),
                (0x5, 0, false),
                (0x10, 2, false),
                (0x40, 2, true)
            ]
        );
        // Default false + likely, default true + unlikely: branch; imported: never.
        let initial: Vec<(u64, Vec<u8>)> =
            s.initial.iter().map(|(a, b)| (*a, b.to_vec())).collect();
        assert_eq!(
            initial,
            [
                (0x0, t.key_branch(0x0, 0x20).unwrap().to_vec()),
                (0x10, t.key_branch(0x10, 0x30).unwrap().to_vec())
            ]
        );
        assert_eq!(s.locations, ["0x0", "0x5", "0x10", "0x40"]);
    }

    #[test]
    fn overlapping_sites_and_unreachable_labels_are_refused() {
        let t = Target::Aarch64;
        let keys = || vec![key(0x9000, "k", Some(false))];
        let e = number(
            "f",
            t,
            keys(),
            vec![site(0x10, false, 0x9000), site(0x12, true, 0x9000)],
            &|a| format!("{a:#x}"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key sites at 0x10 and 0x12 overlap"), "{e}");
        let far = RawSite {
            addr: 0x10,
            target: 0x10 + (256 << 20),
            likely: false,
            key: 0x9000,
        };
        let e = number("f", t, keys(), vec![far], &|a| format!("{a:#x}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "key site 0x10 (key k): its label at 0x10000010 is beyond the ±128 MiB of a b"
            ),
            "{e}"
        );
    }

    #[test]
    fn expected_forms_and_their_names() {
        let t = Target::Riscv64;
        let s = KeySiteEntry {
            addr: 0x100,
            target: 0x140,
            likely: false,
            key: 0,
        };
        let jump = t.key_branch(0x100, 0x140).unwrap();
        assert_eq!(expected_form(t, &s, true).unwrap(), jump);
        assert_eq!(expected_form(t, &s, false).unwrap(), t.key_nop());
        let likely = KeySiteEntry { likely: true, ..s };
        assert_eq!(expected_form(t, &likely, false).unwrap(), jump);
        assert_eq!(form_name(t, Some(&jump), 0x100, 0x140), "jump");
        assert_eq!(form_name(t, Some(&t.key_nop()), 0x100, 0x140), "nop");
        assert_eq!(
            form_name(t, Some(&jump), 0x100, 0x180),
            "jump to 0x140, not its label"
        );
        assert_eq!(form_name(t, None, 0x100, 0x140), "not in the file");
        assert!(form_name(t, Some(&[0, 0, 0, 0]), 0x100, 0x140).starts_with("other bytes"));
    }
}
