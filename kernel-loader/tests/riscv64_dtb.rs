//! riscv64 device-tree reader on hostile input: randomised multi-byte corruption of the
//! QEMU `virt` device trees and random `riscv,isa` strings — the DTB reader and the ISA
//! parsers must return `Ok` or an error, never panic (a hang would time the test out) —
//! and the `totalsize` cap of a tree read through a pointer.

use kernel_loader::arch::riscv64::CpuFeatures as F;
use kernel_loader::arch::riscv64::DtbError;
use kernel_loader::arch::riscv64::dtb::{Dtb, MAX_FDT_SIZE};

const TREES: [&[u8]; 3] = [
    include_bytes!("fixtures/riscv64-virt-rv64-zbb.dtb"),
    include_bytes!("fixtures/riscv64-virt-rv64-nozbb.dtb"),
    include_bytes!("fixtures/riscv64-virt-rv64-v-zk-smp4.dtb"),
];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_multi_byte_corruption_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0u32, 0u32);
    for round in 0..30_000 {
        let mut d = TREES[round % 3].to_vec();
        // Header words set to edge values, random words anywhere, or truncation.
        for _ in 0..1 + rng.below(6) {
            match rng.below(5) {
                0 if d.len() >= 40 => {
                    let w = 4 * rng.below(10);
                    let v = [
                        0u32,
                        1,
                        3,
                        0x7fff_ffff,
                        0xffff_ffff,
                        0xffff_fffc,
                        d.len() as u32,
                    ][rng.below(7)];
                    d[w..w + 4].copy_from_slice(&v.to_be_bytes());
                }
                1 if d.len() >= 4 => {
                    let i = rng.below(d.len() / 4) * 4;
                    let tok = [1u32, 2, 3, 4, 9, 0xffff_ffff][rng.below(6)];
                    d[i..i + 4].copy_from_slice(&tok.to_be_bytes());
                }
                2 if !d.is_empty() => {
                    let i = rng.below(d.len());
                    d[i] = rng.next() as u8;
                }
                3 => d.truncate(rng.below(d.len() + 1)),
                _ => {
                    let i = rng.below(d.len().max(1));
                    if i < d.len() {
                        d[i] = 0;
                    }
                }
            }
            if d.len() < 4 {
                break;
            }
        }
        match std::panic::catch_unwind(|| F::from_fdt_bytes(&d)) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("round {round} panicked on {} bytes", d.len()),
        }
    }
    assert!(ok > 100 && err > 10_000, "ok {ok} err {err}");
}

#[test]
fn random_isa_strings_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let alphabet = b"rv64imafdcvhgbzsxp0123456789_ZBKNE\xc3\xa9\x00";
    for _ in 0..200_000 {
        let n = rng.below(48);
        let mut s: Vec<u8> = b"rv64".to_vec();
        if rng.below(4) == 0 {
            s.clear();
        }
        for _ in 0..n {
            s.push(alphabet[rng.below(alphabet.len())]);
        }
        let r = std::panic::catch_unwind(|| {
            if let Ok(st) = core::str::from_utf8(&s) {
                let _ = F::from_isa_str(st);
                let _ = F::from_extension(st);
            }
            let _ = F::from_isa_extensions(&s);
        });
        assert!(r.is_ok(), "panicked on {s:?}");
    }
}

/// A tree read through a pointer is bounded only by its header's `totalsize`: above
/// 2 MiB (Linux's `MAX_FDT_SIZE`) it is refused without reading past the header, at
/// the cap it is read.
#[test]
fn a_pointer_trees_totalsize_is_capped_at_2_mib() {
    assert_eq!(MAX_FDT_SIZE, 2 << 20);
    for (size, ok) in [
        (MAX_FDT_SIZE, true),
        (MAX_FDT_SIZE + 4, false),
        (3 << 20, false),
    ] {
        // A real tree padded to `size`, its header saying so: a valid tree of that size.
        let mut d = vec![0u8; size];
        d[..TREES[0].len()].copy_from_slice(TREES[0]);
        d[4..8].copy_from_slice(&(size as u32).to_be_bytes());
        assert!(
            F::from_fdt_bytes(&d).is_ok(),
            "the padded tree itself is valid"
        );
        // SAFETY: `d` is readable for `size` bytes and not written while in use.
        let tree = unsafe { Dtb::from_ptr(d.as_ptr()) };
        // SAFETY: as above.
        let feats = unsafe { F::from_fdt(d.as_ptr()) };
        if ok {
            assert!(tree.is_ok() && feats.is_ok(), "{size:#x}: {feats:?}");
        } else {
            assert_eq!(tree.err(), Some(DtbError::BadHeader), "{size:#x}");
            assert_eq!(feats, Err(DtbError::BadHeader), "{size:#x}");
        }
    }
}
