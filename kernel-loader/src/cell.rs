//! The table cell: how a linked image finds its own `.ksites` table.
//!
//! The build tool appends the table in a new `PT_LOAD` segment and then fills this cell,
//! found by its symbol name [`CELL_SYMBOL`], with the table's offset relative to the cell
//! and its size. No linker-script reservation or size guess is needed, and because the
//! reference is self-relative it stays right wherever the image is loaded. A linker
//! script may still reserve a zero-filled `.ksites` section (README, "Finding the
//! table"): the build tool then writes the table there and the cell points into it.

use core::ops::Range;

use crate::format::{FormatError, Table};

/// Symbol name of the cell; the build tool looks it up in the image's symbol table.
pub const CELL_SYMBOL: &str = "__ksites_table_cell";
/// Magic in an unfilled or filled cell ("KSCELL", version 1).
pub const CELL_MAGIC: u64 = u64::from_le_bytes(*b"KSCELL\x00\x01");
/// Size of the cell in bytes.
pub const CELL_SIZE: usize = 24;

/// The cell's layout: three little-endian `u64`s: [`CELL_MAGIC`], then the table's
/// address minus the cell's address, then the table's size. Both are 0 until
/// `ksites embed` fills them.
///
/// Interior mutability tells the compiler the contents are not the initial constant
/// (the build tool rewrites them after compilation); it also keeps the cell out of
/// read-only, mergeable sections.
#[repr(C, align(8))]
#[derive(Debug)]
pub struct TableCell(core::cell::UnsafeCell<[u64; 3]>);

// SAFETY: the cell is never written at run time; it is only read with volatile loads.
unsafe impl Sync for TableCell {}

/// The cell itself.
#[used]
#[unsafe(export_name = "__ksites_table_cell")]
pub static TABLE_CELL: TableCell = TableCell(core::cell::UnsafeCell::new([CELL_MAGIC, 0, 0]));

/// Why the image's own table cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellError {
    /// The cell was not filled: `ksites embed` has not run on this image (or found no
    /// sites and wrote no table).
    Empty,
    /// The cell's magic is wrong (memory corruption, or an incompatible build tool).
    BadMagic(u64),
    /// The cell points outside the address space.
    BadOffset(i64),
    /// The table failed validation.
    Format(FormatError),
}

impl core::fmt::Display for CellError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CellError::Empty => write!(
                f,
                "{CELL_SYMBOL} is empty: run `ksites embed` on the linked image"
            ),
            CellError::BadMagic(m) => write!(f, "{CELL_SYMBOL} has bad magic {m:#x}"),
            CellError::BadOffset(o) => write!(f, "{CELL_SYMBOL} has impossible offset {o:#x}"),
            CellError::Format(e) => write!(f, "image table: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CellError {}

/// The raw bytes of this image's table, as the cell describes them.
///
/// # Safety
///
/// 1. The image must have been processed by `ksites embed`, or not at all: the cell is
///    trusted to describe memory that is mapped and readable for `'static`.
/// 2. That memory must not be written while the returned slice lives.
pub unsafe fn image_table_bytes() -> Result<&'static [u8], CellError> {
    let cell = TABLE_CELL.0.get();
    // SAFETY: the cell is a valid, aligned static that nothing writes at run time;
    // volatile because the build tool changes its contents after compilation.
    let [magic, offset, size] = unsafe { core::ptr::read_volatile(cell) };
    let offset = offset as i64;
    if magic != CELL_MAGIC {
        return Err(CellError::BadMagic(magic));
    }
    if size == 0 {
        return Err(CellError::Empty);
    }
    let addr = (cell as u64)
        .checked_add_signed(offset)
        .filter(|a| a.checked_add(size).is_some())
        .ok_or(CellError::BadOffset(offset))?;
    // SAFETY: precondition 1: `ksites embed` wrote `offset`/`size` so they describe the
    // table segment it added, which the image loader mapped; precondition 2 covers aliasing.
    Ok(unsafe { core::slice::from_raw_parts(addr as usize as *const u8, size as usize) })
}

/// This image's table, validated against the image's executable ranges.
///
/// # Safety
///
/// As for [`image_table_bytes`].
pub unsafe fn image_table(exec: &[Range<u64>]) -> Result<Table<'static>, CellError> {
    // SAFETY: forwarded to the caller.
    let bytes = unsafe { image_table_bytes()? };
    Table::parse(bytes, bytes.as_ptr() as u64, exec).map_err(CellError::Format)
}
