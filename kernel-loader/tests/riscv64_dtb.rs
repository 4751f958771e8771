//! Review (riscv64 port): randomised multi-byte corruption of the QEMU `virt` device
//! trees and random `riscv,isa` strings — the DTB reader and the ISA parsers must return
//! `Ok` or an error, never panic (a hang would time the test out).

use kernel_loader::arch::riscv64::CpuFeatures as F;

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
