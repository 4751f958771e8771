//! The build tool's ELF reading on arbitrary files: embed (in memory), inspect, verify
//! and scan must return a result, never panic.
#![no_main]

use ksites::scan::{ScanOptions, scan_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ksites::embed::embed_bytes("fuzz", data);
    let _ = ksites::inspect::inspect("fuzz", data);
    let _ = ksites::inspect::inspect_json("fuzz", data);
    let _ = ksites::verify::verify("fuzz", data);
    let opts = ScanOptions {
        calls_to: vec!["*".into()],
        jumps_to: vec!["*".into()],
    };
    let _ = scan_bytes("fuzz", data, &opts);
});
