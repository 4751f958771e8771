//! Cross-check the static keys `ksites inspect` lists against the key site records
//! (`.ksites_key_sites`, 32 bytes each: magic `KSKS`, flags (bit 0 likely), site,
//! label, key) the macros left in the linked kernel: every inspected key's sites (site,
//! label, likely) must be exactly the records that name one key object, and every
//! record must be listed.
//!
//! The records' pointer fields are read in place (a static `ET_EXEC`) or, in a PIE,
//! from the `R_X86_64_RELATIVE` dynamic relocation that fills them at boot (the linker
//! leaves the field itself 0).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use object::elf::R_X86_64_RELATIVE;
use object::{Object, ObjectSection, RelocationFlags};

/// The record section.
pub(crate) const SECTION: &str = ".ksites_key_sites";
const RECORD_SIZE: usize = 32;
const MAGIC: &[u8; 4] = b"KSKS";

/// One key site: where, its label, likely or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct KeySite {
    pub(crate) site: u64,
    pub(crate) label: u64,
    pub(crate) likely: bool,
}

/// One `key NAME default=… imported=… sites=N` line of `ksites inspect` and its
/// `  site 0xADDR likely|unlikely LOCATION label=0xADDR form=…` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InspectedKey {
    pub(crate) name: String,
    pub(crate) sites: BTreeSet<KeySite>,
}

fn hex(text: &str) -> Option<u64> {
    let digits = text.strip_prefix("0x")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(digits, 16).ok())
        .flatten()
}

/// The keys of `ksites inspect` output, each with its sites; a key line whose
/// `sites=N` disagrees with the site lines under it, or a malformed line, is an error.
pub(crate) fn parse_inspect(text: &str) -> Result<Vec<InspectedKey>, String> {
    let mut keys: Vec<(InspectedKey, usize)> = Vec::new();
    let mut in_key = false;
    for (index, line) in text.lines().enumerate() {
        let bad = |what: &str| format!("ksites inspect, line {}: {what}: `{line}`", index + 1);
        if let Some(rest) = line.strip_prefix("key ") {
            let fields: Vec<&str> = rest.split(' ').collect();
            let (Some(name), Some(count)) = (fields.first(), fields.last()) else {
                return Err(bad("expected `key NAME … sites=N`"));
            };
            let count = count
                .strip_prefix("sites=")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| bad("expected `key NAME … sites=N`"))?;
            keys.push((
                InspectedKey {
                    name: (*name).to_owned(),
                    sites: BTreeSet::new(),
                },
                count,
            ));
            in_key = true;
        } else if !line.starts_with(' ') {
            in_key = false;
        } else if let (true, Some(rest)) = (in_key, line.strip_prefix("  site ")) {
            let fields: Vec<&str> = rest.split(' ').collect();
            let site = fields.first().and_then(|a| hex(a));
            let likely = match fields.get(1) {
                Some(&"likely") => Some(true),
                Some(&"unlikely") => Some(false),
                _ => None,
            };
            let label = fields
                .iter()
                .find_map(|f| f.strip_prefix("label="))
                .and_then(hex);
            let (Some(site), Some(likely), Some(label)) = (site, likely, label) else {
                return Err(bad(
                    "expected `  site 0xADDR likely|unlikely LOCATION label=0xADDR …`",
                ));
            };
            if let Some((key, _)) = keys.last_mut() {
                key.sites.insert(KeySite {
                    site,
                    label,
                    likely,
                });
            }
        }
    }
    keys.into_iter()
        .map(|(key, count)| {
            if key.sites.len() == count {
                Ok(key)
            } else {
                Err(format!(
                    "ksites inspect: key {} says sites={count} but lists {}",
                    key.name,
                    key.sites.len()
                ))
            }
        })
        .collect()
}

/// The key site records of an x86_64 ELF image, grouped by key object address.
pub(crate) fn records(elf: &[u8]) -> Result<BTreeMap<u64, BTreeSet<KeySite>>, String> {
    let file = object::File::parse(elf).map_err(|e| format!("not an ELF file: {e}"))?;
    let Some(section) = file.section_by_name(SECTION) else {
        return Ok(BTreeMap::new());
    };
    let data = section.data().map_err(|e| format!("{SECTION}: {e}"))?;
    if data.len() % RECORD_SIZE != 0 {
        return Err(format!(
            "{SECTION} is {} bytes, not a multiple of {RECORD_SIZE}",
            data.len()
        ));
    }
    let mut relative = BTreeMap::new();
    for (offset, r) in file.dynamic_relocations().into_iter().flatten() {
        if r.flags()
            == (RelocationFlags::Elf {
                r_type: R_X86_64_RELATIVE,
            })
        {
            relative.insert(offset, r.addend() as u64);
        }
    }
    let base = section.address();
    let field = |record: usize, at: usize| {
        let off = record * RECORD_SIZE + at;
        let in_place = u64::from_le_bytes(data[off..off + 8].try_into().expect("8 bytes"));
        relative
            .get(&(base + off as u64))
            .copied()
            .unwrap_or(in_place)
    };
    let mut groups: BTreeMap<u64, BTreeSet<KeySite>> = BTreeMap::new();
    for i in 0..data.len() / RECORD_SIZE {
        let rec = &data[i * RECORD_SIZE..(i + 1) * RECORD_SIZE];
        if &rec[..4] != MAGIC {
            return Err(format!(
                "{SECTION} record {i}: bad magic {:02x?}",
                &rec[..4]
            ));
        }
        let flags = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes"));
        groups.entry(field(i, 24)).or_default().insert(KeySite {
            site: field(i, 8),
            label: field(i, 16),
            likely: flags & 1 != 0,
        });
    }
    Ok(groups)
}

/// Ok (a table of keys and their site counts) if every inspected key's sites are
/// exactly the records of one key object and every record is listed; there must be at
/// least one key.
pub(crate) fn check(
    inspected: &[InspectedKey],
    records: &BTreeMap<u64, BTreeSet<KeySite>>,
) -> Result<String, String> {
    if inspected.is_empty() {
        return Err("ksites inspect reported no static keys in the test kernel".to_owned());
    }
    let width = inspected
        .iter()
        .map(|k| k.name.len())
        .max()
        .unwrap_or(0)
        .max(3);
    let mut out = format!("{:<width$}  inspect  records\n", "key");
    let mut problems = Vec::new();
    let mut matched = BTreeSet::new();
    for key in inspected {
        let group = records
            .iter()
            .find(|(_, sites)| key.sites.first().is_some_and(|s| sites.contains(s)));
        let n = group.map_or(0, |(_, sites)| sites.len());
        let _ = writeln!(out, "{:<width$}  {:>7}  {n:>7}", key.name, key.sites.len());
        match group {
            Some((addr, sites)) if *sites == key.sites => {
                matched.insert(*addr);
            }
            Some((addr, sites)) => problems.push(format!(
                "key {}: inspect lists {:x?}, the records of key {addr:#x} are {:x?}",
                key.name, key.sites, sites
            )),
            None if key.sites.is_empty() => {}
            None => problems.push(format!(
                "key {}: no record names its sites {:x?}",
                key.name, key.sites
            )),
        }
    }
    for (addr, sites) in records {
        if !matched.contains(addr) && !problems.iter().any(|p| p.contains(&format!("{addr:#x}"))) {
            problems.push(format!(
                "{} record(s) of key {addr:#x} not listed by ksites inspect",
                sites.len()
            ));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(format!(
            "key sites disagree with the records:\n  {}",
            problems.join("\n  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = "\
.ksites table v2 at 0x200000 (100 bytes): 1 ifuncs, 2 sites, 0 probes, 0 probe sites, 2 keys, 3 key sites
ifunc kfuncs::popcount trampoline=0x101000 popcount sites=1
  site 0x101234 call f+0x4
key k::KEY_OFF default=false imported=no sites=2
  site 0x101100 unlikely off_unlikely+0x4 label=0x101120 form=nop
  site 0x101200 likely off_likely+0x4 label=0x101220 form=jump
key k::KEY_ON default=true imported=no sites=1
  site 0x101300 unlikely on_unlikely+0x4 label=0x101320 form=jump
";

    fn site(site: u64, label: u64, likely: bool) -> KeySite {
        KeySite {
            site,
            label,
            likely,
        }
    }

    #[test]
    fn parses_keys_and_their_sites_only() {
        let keys = parse_inspect(INSPECT).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name, "k::KEY_OFF");
        assert_eq!(
            keys[0].sites,
            BTreeSet::from([
                site(0x101100, 0x101120, false),
                site(0x101200, 0x101220, true)
            ])
        );
        assert_eq!(keys[1].sites.len(), 1);
        let short = INSPECT.replace("KEY_ON default=true imported=no sites=1", "KEY_ON sites=2");
        assert!(parse_inspect(&short).unwrap_err().contains("sites=2"));
        let bad = INSPECT.replace("label=0x101320", "label=zz");
        assert!(parse_inspect(&bad).unwrap_err().contains("line 8"));
    }

    #[test]
    fn checks_against_records() {
        let keys = parse_inspect(INSPECT).unwrap();
        let mut records = BTreeMap::from([
            (
                0x300000,
                BTreeSet::from([
                    site(0x101100, 0x101120, false),
                    site(0x101200, 0x101220, true),
                ]),
            ),
            (0x300020, BTreeSet::from([site(0x101300, 0x101320, false)])),
        ]);
        let table = check(&keys, &records).unwrap();
        assert!(table.contains("k::KEY_OFF        2        2"), "{table}");
        // A record inspect does not list.
        records
            .get_mut(&0x300020)
            .unwrap()
            .insert(site(0x101400, 0x101420, true));
        let err = check(&keys, &records).unwrap_err();
        assert!(err.contains("KEY_ON"), "{err}");
        records.remove(&0x300020);
        records.insert(0x300040, BTreeSet::from([site(0x101300, 0x101320, false)]));
        records.insert(0x300060, BTreeSet::from([site(0x101500, 0x101520, false)]));
        let err = check(&keys, &records).unwrap_err();
        assert!(err.contains("record(s) of key 0x300060"), "{err}");
        assert!(
            check(&[], &BTreeMap::new())
                .unwrap_err()
                .contains("no static keys")
        );
    }
}
