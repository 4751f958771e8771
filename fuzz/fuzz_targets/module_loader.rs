//! The module loader (`ksites check-module`'s path: ELF parsing, layout, symbol
//! resolution, relocation, table validation) on arbitrary objects. It must return
//! `Ok` or an error for every input: no panic, no write outside the region, no leak.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // Without a kernel every undefined symbol resolves to a placeholder in reach, so
    // relocation and the table are exercised; the default load address is 1 GiB.
    let _ = ksites::check_module::check(input, None, None);
});
