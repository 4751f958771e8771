//! `embed` and `check-module` on ET_REL modules whose section headers are mutated
//! structurally: the fuzzer's bytes are a list of edits (section, field, value) applied
//! to a valid module object (fuzz/seeds/rel_layout, the test modules without their
//! table), so alignments, sizes, offsets, links and flags take hostile values while the
//! rest of the file stays well formed. Both must return a result within the memory
//! limit (`cargo xtask fuzz` runs with 2 GB), never panic or abort; an accepted output
//! is read again by `check-module` and `inspect`.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Valid, un-embedded module objects.
const SEEDS: [&[u8]; 3] = [
    include_bytes!("../seeds/rel_layout/rmod.o"),
    include_bytes!("../seeds/rel_layout/cmod.o"),
    include_bytes!("../seeds/rel_layout/badmod.o"),
];

/// Offset and width of the section-header fields an edit can change.
const FIELDS: [(usize, usize); 9] = [
    (4, 4),  // sh_type
    (8, 8),  // sh_flags
    (24, 8), // sh_offset
    (32, 8), // sh_size
    (40, 4), // sh_link
    (44, 4), // sh_info
    (48, 8), // sh_addralign
    (56, 8), // sh_entsize
    (0, 4),  // sh_name
];

/// An edit's new value from its old one, by `mode`: a raw value, a power of two, a
/// small change, or a value near a size limit.
fn value(mode: u8, old: u64, raw: u64) -> u64 {
    match mode % 4 {
        0 => raw,
        1 => 1u64 << (raw % 64),
        2 => old.wrapping_add((raw as i8) as i64 as u64),
        _ => [u32::MAX as u64, i32::MAX as u64 + 1, 1 << 40, u64::MAX][(raw % 4) as usize]
            .wrapping_sub(raw >> 60),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, edits)) = input.split_first() else {
        return;
    };
    let mut obj = SEEDS[pick as usize % SEEDS.len()].to_vec();
    let shoff = u64::from_le_bytes(obj[0x28..0x30].try_into().unwrap()) as usize;
    let shnum = u16::from_le_bytes(obj[0x3c..0x3e].try_into().unwrap()) as usize;
    // Each edit: section, field, mode, 8 value bytes.
    for e in edits.chunks_exact(11) {
        let (sec, (off, width)) = (e[0] as usize % shnum, FIELDS[e[1] as usize % FIELDS.len()]);
        let at = shoff + 64 * sec + off;
        let old = match width {
            4 => u64::from(u32::from_le_bytes(obj[at..at + 4].try_into().unwrap())),
            _ => u64::from_le_bytes(obj[at..at + 8].try_into().unwrap()),
        };
        let raw = u64::from_le_bytes(e[3..11].try_into().unwrap());
        let v = value(e[2], old, raw);
        obj[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
    }
    let _ = ksites::check_module::check(&obj, None, None);
    let _ = ksites::inspect::inspect("fuzz.o", &obj);
    if let Ok((out, _)) = ksites::embed::embed_bytes("fuzz.o", &obj) {
        // What embed wrote is a module again: the loader path and inspect read it.
        let _ = ksites::check_module::check(&out, None, None);
        let _ = ksites::inspect::inspect("out.o", &out);
    }
});
