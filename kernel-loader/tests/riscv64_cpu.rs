//! riscv64 CPU features from device trees: the DTBs QEMU `virt` passes its firmware
//! (dumped with `qemu-system-riscv64 -M virt,dumpdtb=F -cpu …`, QEMU 7.2, truncated to
//! the header's `totalsize`, in `tests/fixtures`), and small trees built here to check
//! what QEMU's do not show: several harts that disagree, a disabled hart, the
//! `riscv,isa-extensions` list, and malformed input (never a panic).

use kernel_loader::arch::riscv64::{CpuFeatures as F, DtbError};

/// `-cpu rv64,zbb=true -smp 2`: `rv64imafdch_zicsr_zifencei_zihintpause_zba_zbb_zbc_zbs_sstc`.
const RV64_ZBB: &[u8] = include_bytes!("fixtures/riscv64-virt-rv64-zbb.dtb");
/// `-cpu rv64,zbb=false -smp 2`: the same without `zbb`.
const RV64_NOZBB: &[u8] = include_bytes!("fixtures/riscv64-virt-rv64-nozbb.dtb");
/// `-cpu rv64,v=true,vlen=128,zbb=true,zbkb=true,zbkc=true,zbkx=true,zknd=true,zkne=true,
/// zknh=true,zkr=true,Zfh=true -smp 4`.
const RV64_V_ZK: &[u8] = include_bytes!("fixtures/riscv64-virt-rv64-v-zk-smp4.dtb");

fn base() -> F {
    F::I | F::M | F::A | F::F | F::D | F::C | F::H | F::ZICSR | F::ZIFENCEI | F::ZIHINTPAUSE
}

#[test]
fn qemu_virt_rv64_with_and_without_zbb() {
    let with = F::from_fdt_bytes(RV64_ZBB).unwrap();
    assert_eq!(
        with,
        base() | F::ZBA | F::ZBB | F::ZBC | F::ZBS | F::SSTC,
        "extra {:?}",
        with - base()
    );
    let without = F::from_fdt_bytes(RV64_NOZBB).unwrap();
    assert_eq!(without, with - F::ZBB);
    // Through the raw pointer, as a kernel calls it with a1.
    // SAFETY: the fixture is a complete DTB, readable for its totalsize.
    let p = unsafe { F::from_fdt(RV64_ZBB.as_ptr()) }.unwrap();
    assert_eq!(p, with);
}

#[test]
fn qemu_virt_vector_and_crypto_on_four_harts() {
    let f = F::from_fdt_bytes(RV64_V_ZK).unwrap();
    assert!(f.contains(F::V | F::ZFH | F::ZBB | F::ZKR), "{f:?}");
    // Zbkb, Zbkc, Zbkx, Zknd, Zkne, Zknh: the whole NIST suite.
    assert!(f.contains(F::ZKN_SET), "{f:?}");
    assert!(!f.contains(F::ZICBOM) && !f.contains(F::ZKT));
}

/// A flattened device tree built by hand: `/cpus` with one `cpu@N` node per entry of
/// `cpus` (its properties), plus a `cpu-map` node that is not a cpu.
fn dtb(cpus: &[&[(&str, &[u8])]]) -> Vec<u8> {
    let mut strings: Vec<u8> = Vec::new();
    let name_off = |name: &str, strings: &mut Vec<u8>| -> u32 {
        let off = strings.len() as u32;
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
        off
    };
    let mut s: Vec<u8> = Vec::new();
    let be = |s: &mut Vec<u8>, v: u32| s.extend_from_slice(&v.to_be_bytes());
    let begin = |s: &mut Vec<u8>, name: &str| {
        be(s, 1);
        s.extend_from_slice(name.as_bytes());
        s.push(0);
        while !s.len().is_multiple_of(4) {
            s.push(0);
        }
    };
    let prop = |s: &mut Vec<u8>, strings: &mut Vec<u8>, name: &str, value: &[u8]| {
        be(s, 3);
        be(s, value.len() as u32);
        be(s, name_off(name, strings));
        s.extend_from_slice(value);
        while !s.len().is_multiple_of(4) {
            s.push(0);
        }
    };
    begin(&mut s, "");
    prop(&mut s, &mut strings, "#address-cells", &2u32.to_be_bytes());
    prop(&mut s, &mut strings, "#size-cells", &2u32.to_be_bytes());
    begin(&mut s, "cpus");
    prop(&mut s, &mut strings, "#address-cells", &1u32.to_be_bytes());
    prop(&mut s, &mut strings, "#size-cells", &0u32.to_be_bytes());
    for (i, props) in cpus.iter().enumerate() {
        begin(&mut s, &format!("cpu@{i}"));
        prop(&mut s, &mut strings, "reg", &(i as u32).to_be_bytes());
        prop(&mut s, &mut strings, "device_type", b"cpu\0");
        for (name, value) in *props {
            prop(&mut s, &mut strings, name, value);
        }
        be(&mut s, 2);
    }
    begin(&mut s, "cpu-map");
    be(&mut s, 2);
    be(&mut s, 2); // cpus
    be(&mut s, 2); // root
    be(&mut s, 9); // FDT_END
    let header = 40u32;
    let rsv = header;
    let off_struct = rsv + 16;
    let off_strings = off_struct + s.len() as u32;
    let total = off_strings + strings.len() as u32;
    let mut v = Vec::new();
    for w in [
        0xd00d_feed,
        total,
        off_struct,
        off_strings,
        rsv,
        17,
        16,
        0,
        strings.len() as u32,
        s.len() as u32,
    ] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(&s);
    v.extend_from_slice(&strings);
    v
}

#[test]
fn harts_are_intersected_and_disabled_ones_skipped() {
    let isa = |s: &str| -> Vec<u8> { format!("{s}\0").into_bytes() };
    let a = isa("rv64imafdc_zba_zbb_zbs");
    let b = isa("rv64imafdc_zbb_zicbom");
    let c = isa("rv64imac");
    let t = dtb(&[
        &[("riscv,isa", &a), ("status", b"okay\0")],
        &[("riscv,isa", &b)],
        // Disabled: its missing F/D/Zbb do not count.
        &[("riscv,isa", &c), ("status", b"disabled\0")],
    ]);
    let f = F::from_fdt_bytes(&t).unwrap();
    assert_eq!(f, F::I | F::M | F::A | F::F | F::D | F::C | F::ZBB, "{f:?}");
    // `riscv,isa-extensions` wins over `riscv,isa` on the same node.
    let list = b"i\0m\0a\0f\0d\0c\0v\0zicbom\0zkn\0";
    let t = dtb(&[&[("riscv,isa", &c), ("riscv,isa-extensions", list)]]);
    let f = F::from_fdt_bytes(&t).unwrap();
    assert!(f.contains(F::V | F::ZICBOM | F::ZKN_SET | F::D), "{f:?}");
}

#[test]
fn bad_device_trees_are_errors_not_panics() {
    assert_eq!(F::from_fdt_bytes(&[]), Err(DtbError::BadHeader));
    assert_eq!(F::from_fdt_bytes(&[0u8; 64]), Err(DtbError::BadHeader));
    let mut short = RV64_ZBB.to_vec();
    short.truncate(100);
    assert_eq!(F::from_fdt_bytes(&short), Err(DtbError::BadHeader));
    // No cpu nodes, only a disabled one, one without an ISA, one with a bad ISA.
    assert_eq!(F::from_fdt_bytes(&dtb(&[])), Err(DtbError::NoCpus));
    let off: &[(&str, &[u8])] = &[("riscv,isa", b"rv64i\0"), ("status", b"fail\0")];
    assert_eq!(F::from_fdt_bytes(&dtb(&[off])), Err(DtbError::NoCpus));
    assert_eq!(
        F::from_fdt_bytes(&dtb(&[&[("riscv,isa", b"rv64i\0")], &[]])),
        Err(DtbError::NoIsa { cpu: 1 })
    );
    assert_eq!(
        F::from_fdt_bytes(&dtb(&[&[("riscv,isa", b"x86_64\0")]])),
        Err(DtbError::BadIsa { cpu: 0 })
    );
    assert!(
        DtbError::NoIsa { cpu: 1 }
            .to_string()
            .contains("cpu node 1")
    );
    // A bad token (the root's FDT_BEGIN_NODE, at structure offset 0, made 7), and a
    // property running past the block.
    let mut t = dtb(&[&[("riscv,isa", b"rv64i\0")]]);
    t[56..60].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(
        F::from_fdt_bytes(&t),
        Err(DtbError::Malformed { offset: 0 })
    );
    let mut t = dtb(&[&[("riscv,isa", b"rv64i\0")]]);
    // The root's first property (`#address-cells`, 4 bytes) claims 0x10000.
    t[56 + 8 + 4..56 + 8 + 8].copy_from_slice(&0x1_0000u32.to_be_bytes());
    assert_eq!(
        F::from_fdt_bytes(&t),
        Err(DtbError::Malformed { offset: 8 })
    );
}

/// Every single-byte corruption of a real tree (three flips per byte) is an `Ok` or an
/// error, never a panic (the reader checks every offset, length and token).
#[test]
fn corrupted_trees_never_panic() {
    let mut errors = 0;
    for i in 0..RV64_ZBB.len() {
        for x in [0xffu8, 0x01, 0x80] {
            let mut d = RV64_ZBB.to_vec();
            d[i] ^= x;
            match std::panic::catch_unwind(|| F::from_fdt_bytes(&d)) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => errors += 1,
                Err(_) => panic!("byte {i} ^ {x:#x} panicked"),
            }
        }
    }
    // The header and the structure block are most of the tree: many flips are caught.
    assert!(errors > 1000, "{errors}");
}
