//! The `.ksites` reader and the boot patch engine on arbitrary tables.
//!
//! The input is split into a fake image: 4 KiB of "text" (from the input, or int3
//! padding), 4 KiB of "data", and the table. Every address the table can name is either
//! validated into the text range by the reader or checked against the data range here
//! before patching (the engine trusts slots to be in the image's data; a kernel's table
//! comes from its own build).
#![no_main]

use kernel_loader::format::Table;
use kernel_loader::patch::{PokeError, TextPoker, patch_ifuncs};
use kernel_loader::probe::{Stubs, site_bytes_with};
use libfuzzer_sys::fuzz_target;

const TEXT: usize = 4096;
const DATA: usize = 4096;

struct BufPoker;

impl TextPoker for BufPoker {
    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the engine writes only inside validated sites, which lie in the text
        // part of the image buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn sync_cores(&mut self) {}

    fn end(&mut self) {}
}

fuzz_target!(|input: &[u8]| {
    let (text_in, table_in) = input.split_at(input.len().min(TEXT / 4));
    let mut mem = vec![0u64; (TEXT + DATA + table_in.len()).div_ceil(8) + 1];
    let base = mem.as_mut_ptr() as *mut u8;
    // SAFETY: `mem` is large enough for text + data + table.
    let img = unsafe { std::slice::from_raw_parts_mut(base, TEXT + DATA + table_in.len()) };
    img[..TEXT].fill(0xcc);
    img[..text_in.len()].copy_from_slice(text_in);
    img[TEXT + DATA..].copy_from_slice(table_in);
    let start = base as u64;
    let exec = [start..start + TEXT as u64];
    let data = start + TEXT as u64..start + (TEXT + DATA) as u64;
    let table_addr = start + (TEXT + DATA) as u64;
    let table_bytes = &img[TEXT + DATA..];
    let Ok(t) = Table::parse(table_bytes, table_addr, &exec) else {
        return;
    };
    let _ = t.site_containing(start + 100);
    let stubs = Stubs {
        c_entry: start,
        ret0: start + 1,
        ret1: start + 2,
    };
    for s in t.probe_sites() {
        let _ = site_bytes_with(&s, true, &stubs);
        let _ = site_bytes_with(&s, false, &stubs);
    }
    if t.ifuncs().all(|f| data.contains(&f.slot) && f.slot + 8 <= data.end) {
        let target = start + 64;
        // SAFETY: sites are in the text buffer, slots in the data buffer (checked above).
        let _ = unsafe { patch_ifuncs(&t, &exec, &mut BufPoker, &mut |_| target) };
    }
    drop(mem);
});
