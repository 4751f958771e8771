//! The reader's part for format v2's static keys: [`Key`], [`KSite`], their
//! validation, and the accessors on [`Table`] (`key_count`, `keys`, `key_sites`,
//! `key_site_at`, `key_sites_of`, ...).

use core::ops::Range;

use super::reader::{Entries, in_ranges};
use super::{
    FormatError, KEY_DEFAULT_TRUE, KEY_DESC_SIZE, KEY_IMPORTED, KEY_SITE_LIKELY, KEY_SITE_SIZE,
    KeyDesc, KeySite, Part, Table, resolve_rel,
};

/// A decoded static-key descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key<'a> {
    /// Index in the table.
    pub index: u32,
    /// Address of the key object (a `kernel_loader::key::StaticKey`).
    pub addr: u64,
    /// Name (from the string table).
    pub name: &'a str,
    /// The key's boot state: its sites as written by the build tool (when not
    /// imported) jump iff `default != likely`.
    pub default: bool,
    /// Another image's key (a module's sites of a kernel key): the sites are written
    /// as NOPs and the loader sets them to the key's current state.
    pub imported: bool,
}

/// A decoded static-key site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KSite {
    /// Index in the table.
    pub index: u32,
    /// Address of the site instruction (the architecture's probe site length long).
    pub addr: u64,
    /// The branch target (the asm-goto label).
    pub target: u64,
    /// A `static_branch_likely!` site: it jumps iff its key is disabled (an unlikely
    /// site jumps iff its key is enabled).
    pub likely: bool,
    /// Index of its key in the table.
    pub key: u32,
}

impl KSite {
    /// Whether the site holds the branch form when its key's enabled state is
    /// `enabled`.
    #[inline(always)]
    pub const fn jumps(&self, enabled: bool) -> bool {
        enabled != self.likely
    }
}

impl<'a> Table<'a> {
    pub(super) fn validate_keys(&self, exec: &[Range<u64>]) -> Result<(), FormatError> {
        let mut prev: Option<&str> = None;
        for i in 0..self.header.keys.count {
            let k = self.try_key(i)?;
            if prev.is_some_and(|p| k.name < p) {
                return Err(FormatError::KeysUnsorted { key: i });
            }
            prev = Some(k.name);
        }
        let mut prev_end = 0u64;
        let len = self.arch.probe_site_len() as u64;
        for i in 0..self.header.key_sites.count {
            let s = self.try_ksite(i)?;
            if i > 0 && s.addr < prev_end {
                return Err(FormatError::KeySitesUnsorted { site: i });
            }
            if !s.addr.is_multiple_of(self.arch.probe_align()) {
                return Err(FormatError::KeySiteMisaligned {
                    site: i,
                    addr: s.addr,
                });
            }
            for (addr, len) in [(s.addr, len), (s.target, 1)] {
                if !in_ranges(exec, addr, len) {
                    return Err(FormatError::KeySiteNotExecutable { site: i, addr });
                }
            }
            prev_end = s.addr + len;
        }
        Ok(())
    }

    fn try_key(&self, i: u32) -> Result<Key<'a>, FormatError> {
        let off = self.header.keys.offset as usize + i as usize * KEY_DESC_SIZE;
        let d = KeyDesc::read(&self.bytes[off..off + KEY_DESC_SIZE]);
        if d.key == 0 || d.flags & !(KEY_DEFAULT_TRUE | KEY_IMPORTED) != 0 {
            return Err(FormatError::BadKeyDesc { key: i });
        }
        let addr =
            resolve_rel(self.field_addr(off), d.key).ok_or(FormatError::AddressOverflow {
                part: Part::Keys,
                index: i,
            })?;
        Ok(Key {
            index: i,
            addr,
            name: self.string(d.name)?,
            default: d.flags & KEY_DEFAULT_TRUE != 0,
            imported: d.flags & KEY_IMPORTED != 0,
        })
    }

    #[inline(always)]
    fn try_ksite(&self, i: u32) -> Result<KSite, FormatError> {
        let off = self.header.key_sites.offset as usize + i as usize * KEY_SITE_SIZE;
        let e = &self.bytes[off..off + KEY_SITE_SIZE];
        decode_ksite(i, e, self.field_addr(off), self.header.keys.count)
    }

    /// Number of static keys.
    #[inline]
    pub fn key_count(&self) -> u32 {
        self.header.keys.count
    }

    /// Number of static-key sites.
    #[inline]
    pub fn key_site_count(&self) -> u32 {
        self.header.key_sites.count
    }

    /// Key `i`, or `None` if out of range.
    pub fn key(&self, i: u32) -> Option<Key<'a>> {
        if i >= self.key_count() {
            return None;
        }
        self.try_key(i).ok()
    }

    /// The address of key `i`'s object, without decoding its name (what a key batch
    /// matches a key by); `None` if out of range.
    #[inline]
    pub fn key_object(&self, i: u32) -> Option<u64> {
        if i >= self.key_count() {
            return None;
        }
        let off = self.header.keys.offset as usize + i as usize * KEY_DESC_SIZE;
        let d = KeyDesc::read(self.bytes.get(off..off + KEY_DESC_SIZE)?);
        resolve_rel(self.field_addr(off), d.key)
    }

    /// Key site `i`, or `None` if out of range.
    #[inline]
    pub fn key_site(&self, i: u32) -> Option<KSite> {
        if i >= self.key_site_count() {
            return None;
        }
        self.try_ksite(i).ok()
    }

    /// All keys, in table order (by name).
    pub fn keys(&self) -> impl Iterator<Item = Key<'a>> + '_ {
        (0..self.key_count()).filter_map(|i| self.key(i))
    }

    /// All key sites, in address order.
    pub fn key_sites(&self) -> impl Iterator<Item = KSite> + '_ {
        (0..self.key_site_count()).filter_map(|i| self.key_site(i))
    }

    /// The sites of key `key` (a [`Key::index`]), in address order: one walk over the
    /// entries that decodes only that key's. Yields what [`Table::key_sites`] yields
    /// for that key.
    #[inline]
    pub fn key_sites_of(&self, key: u32) -> KeySitesOf<'a> {
        let mut walk = self.entries(self.header.key_sites, KEY_SITE_SIZE);
        if key >= self.header.keys.count || key >= 1 << 24 {
            walk.rest = &[];
        }
        KeySitesOf {
            walk,
            key_bits: key << 8,
        }
    }

    /// The key site starting exactly at `addr` (binary search).
    pub fn key_site_at(&self, addr: u64) -> Option<KSite> {
        let (mut lo, mut hi) = (0u32, self.key_site_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = self.key_site(mid)?;
            if addr < s.addr {
                hi = mid;
            } else if addr > s.addr {
                lo = mid + 1;
            } else {
                return Some(s);
            }
        }
        None
    }
}

/// Decodes key site entry `i` (`e`, its bytes, at address `field_addr`) of a table with
/// `keys` keys.
#[inline(always)]
fn decode_ksite(i: u32, e: &[u8], field_addr: u64, keys: u32) -> Result<KSite, FormatError> {
    let e = KeySite::read(e);
    if e.info & 0xff & !KEY_SITE_LIKELY != 0 {
        return Err(FormatError::BadKeySite { site: i });
    }
    let key = e.info >> 8;
    if key >= keys {
        return Err(FormatError::KeyIndexOutOfRange {
            site: i,
            key,
            count: keys,
        });
    }
    let ovf = FormatError::AddressOverflow {
        part: Part::KeySites,
        index: i,
    };
    Ok(KSite {
        index: i,
        addr: resolve_rel(field_addr, e.site).ok_or(ovf)?,
        target: resolve_rel(field_addr + 4, e.target).ok_or(ovf)?,
        likely: e.info & KEY_SITE_LIKELY != 0,
        key,
    })
}

/// The sites of one static key, in address order ([`Table::key_sites_of`]). Entries
/// that do not decode are skipped (a parsed table has none).
#[derive(Clone, Debug)]
pub struct KeySitesOf<'a> {
    walk: Entries<'a>,
    /// The key's index, shifted to its place in an entry's `info`.
    key_bits: u32,
}

impl Iterator for KeySitesOf<'_> {
    type Item = KSite;

    #[inline]
    fn next(&mut self) -> Option<KSite> {
        while let Some((off, e)) = self.walk.next::<KEY_SITE_SIZE>() {
            let entry = KeySite::read(e);
            // This key's entry with no reserved bit set: `info - key_bits` is 0 or 1.
            let bits = entry.info.wrapping_sub(self.key_bits);
            if bits > KEY_SITE_LIKELY {
                continue;
            }
            let (Some(addr), Some(target)) = (
                self.walk.resolve(off, entry.site),
                self.walk.resolve(off + 4, entry.target),
            ) else {
                continue;
            };
            return Some(KSite {
                index: (off / KEY_SITE_SIZE) as u32,
                addr,
                target,
                likely: bits == KEY_SITE_LIKELY,
                key: self.key_bits >> 8,
            });
        }
        None
    }
}
