//! A minimal, validating reader of flattened device trees (DTB, devicetree
//! specification v0.4 chapter 5), for what [`super::cpu`] needs: the properties of each
//! `/cpus/cpu@N` node.
//!
//! Every offset, length and token is checked, so a malformed tree is an error
//! ([`DtbError::Malformed`] with the offset), never a panic or an out-of-bounds read.
//! (The `fdt` crate panics on malformed structure blocks: in a test flipping bytes of a
//! QEMU `virt` tree one at a time, about a fifth of the variants panicked inside it,
//! which a loader that never panics on bad input cannot use.)

use super::cpu::DtbError;

/// The header's magic.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Header length (version 17).
pub const HEADER_LEN: usize = 40;
/// The largest `totalsize` [`Dtb::from_ptr`] accepts: 2 MiB, Linux's `MAX_FDT_SIZE`
/// (`arch/riscv`, `scripts/dtc`). A pointer's header is all that bounds the read, so a
/// corrupted `totalsize` must not make the reader walk up to 4 GiB of memory.
pub const MAX_FDT_SIZE: usize = 2 << 20;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// A device tree whose header was checked: the structure and strings blocks.
#[derive(Clone, Copy, Debug)]
pub struct Dtb<'a> {
    structure: &'a [u8],
    strings: &'a [u8],
}

/// The properties of one cpu node [`Dtb::for_each_cpu`] reports (raw values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuNode<'a> {
    /// Index among the `cpu` children of `/cpus`.
    pub index: u32,
    /// `status` (`okay\0`, `disabled\0`…), if present.
    pub status: Option<&'a [u8]>,
    /// `riscv,isa`, if present.
    pub isa: Option<&'a [u8]>,
    /// `riscv,isa-extensions`, if present.
    pub isa_extensions: Option<&'a [u8]>,
}

impl CpuNode<'_> {
    /// Whether the hart is enabled: `status` absent, `"okay"` or `"ok"`.
    pub fn is_enabled(&self) -> bool {
        matches!(
            self.status.map(trim_nul),
            None | Some(b"okay") | Some(b"ok")
        )
    }
}

/// `v` without its trailing NULs.
pub fn trim_nul(v: &[u8]) -> &[u8] {
    let mut end = v.len();
    while end > 0 && v[end - 1] == 0 {
        end -= 1;
    }
    &v[..end]
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let w = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// The NUL-terminated string at `at` of `b` (without the NUL).
fn cstr(b: &[u8], at: usize) -> Option<&[u8]> {
    let rest = b.get(at..)?;
    let n = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..n])
}

/// `n` rounded up to 4.
fn align4(n: usize) -> Option<usize> {
    Some(n.checked_add(3)? & !3)
}

impl<'a> Dtb<'a> {
    /// Checks the header of the tree at the start of `bytes`: magic, `totalsize` within
    /// `bytes`, version ≥ 17 (compatible with 16), and both blocks inside `totalsize`.
    pub fn new(bytes: &'a [u8]) -> Result<Dtb<'a>, DtbError> {
        let h = |i: usize| be32(bytes, 4 * i).ok_or(DtbError::BadHeader);
        if h(0)? != FDT_MAGIC {
            return Err(DtbError::BadHeader);
        }
        let total = h(1)? as usize;
        let (off_struct, off_strings) = (h(2)? as usize, h(3)? as usize);
        let (version, last_comp) = (h(5)?, h(6)?);
        let (size_strings, size_struct) = (h(8)? as usize, h(9)? as usize);
        if total < HEADER_LEN || total > bytes.len() || version < 17 || last_comp > 17 {
            return Err(DtbError::BadHeader);
        }
        let bytes = &bytes[..total];
        let block = |off: usize, len: usize| {
            bytes
                .get(off..off.checked_add(len)?)
                .filter(|_| off >= HEADER_LEN)
        };
        Ok(Dtb {
            structure: block(off_struct, size_struct).ok_or(DtbError::BadHeader)?,
            strings: block(off_strings, size_strings).ok_or(DtbError::BadHeader)?,
        })
    }

    /// The tree at `p`.
    ///
    /// # Safety
    ///
    /// `p` is readable for 8 bytes, and, if they hold the FDT magic and the `totalsize`
    /// the next 4 give is at most [`MAX_FDT_SIZE`], for `totalsize` bytes, none of which
    /// is written while the returned `Dtb` lives. A larger `totalsize` is
    /// [`DtbError::BadHeader`] (nothing past the 8 bytes is read).
    pub unsafe fn from_ptr(p: *const u8) -> Result<Dtb<'a>, DtbError> {
        if p.is_null() {
            return Err(DtbError::BadHeader);
        }
        // SAFETY: readable for 8 bytes (precondition); no alignment is assumed.
        let head = unsafe { core::slice::from_raw_parts(p, 8) };
        if be32(head, 0) != Some(FDT_MAGIC) {
            return Err(DtbError::BadHeader);
        }
        let total = be32(head, 4).ok_or(DtbError::BadHeader)? as usize;
        if total > MAX_FDT_SIZE {
            return Err(DtbError::BadHeader);
        }
        // SAFETY: the magic is there and `totalsize` is at most MAX_FDT_SIZE, so `p` is readable for `totalsize` bytes and not
        // written meanwhile (precondition).
        Dtb::new(unsafe { core::slice::from_raw_parts(p, total) })
    }

    /// Calls `f` for each `cpu`/`cpu@N` child of `/cpus`, in order, with its
    /// properties, checking the structure block as it walks all of it: the first
    /// malformed token (or an error from `f`) stops the walk and is returned.
    pub fn for_each_cpu(
        &self,
        f: &mut dyn FnMut(&CpuNode<'a>) -> Result<(), DtbError>,
    ) -> Result<(), DtbError> {
        let s = self.structure;
        let bad = |at: usize| DtbError::Malformed {
            offset: u32::try_from(at).unwrap_or(u32::MAX),
        };
        let mut pos = 0usize;
        let mut depth = 0u32;
        let mut in_cpus = false;
        let mut cpu: Option<CpuNode<'a>> = None;
        let mut index = 0u32;
        loop {
            let at = pos;
            let tok = be32(s, pos).ok_or(bad(at))?;
            pos += 4;
            match tok {
                FDT_BEGIN_NODE => {
                    let name = cstr(s, pos).ok_or(bad(at))?;
                    pos = align4(pos + name.len() + 1).ok_or(bad(at))?;
                    depth += 1;
                    if depth == 2 {
                        in_cpus = name == b"cpus";
                    } else if depth == 3 && in_cpus && (name == b"cpu" || name.starts_with(b"cpu@"))
                    {
                        cpu = Some(CpuNode {
                            index,
                            ..CpuNode::default()
                        });
                        index += 1;
                    }
                }
                FDT_END_NODE => {
                    if depth == 0 {
                        return Err(bad(at));
                    }
                    if depth == 3
                        && let Some(c) = cpu.take()
                    {
                        f(&c)?;
                    }
                    if depth == 2 {
                        in_cpus = false;
                    }
                    depth -= 1;
                }
                FDT_PROP => {
                    let len = be32(s, pos).ok_or(bad(at))? as usize;
                    let name_off = be32(s, pos + 4).ok_or(bad(at))? as usize;
                    pos += 8;
                    let value = s
                        .get(pos..pos.checked_add(len).ok_or(bad(at))?)
                        .ok_or(bad(at))?;
                    pos = align4(pos + len).ok_or(bad(at))?;
                    let name = cstr(self.strings, name_off).ok_or(bad(at))?;
                    if depth == 0 {
                        return Err(bad(at));
                    }
                    if depth == 3
                        && let Some(c) = cpu.as_mut()
                    {
                        match name {
                            b"status" => c.status = Some(value),
                            b"riscv,isa" => c.isa = Some(value),
                            b"riscv,isa-extensions" => c.isa_extensions = Some(value),
                            _ => {}
                        }
                    }
                }
                FDT_NOP => {}
                FDT_END => {
                    return if depth == 0 { Ok(()) } else { Err(bad(at)) };
                }
                _ => return Err(bad(at)),
            }
        }
    }
}
