//! The riscv64 target's decoding, on code `riscv64-linux-gnu-as` assembled and `ld
//! --no-relax -Ttext=0x10000 -Tdata=0x20000` linked (the bytes and addresses below are
//! what `objdump -d` shows for it).

use super::*;

/// At 0x10000: `call far` (auipc ra + jalr ra), `tail _start` (auipc t1 + jr t1), `jal
/// ra, mid`, `j _start` (c.j), `c.j mid`, `beq a0, a1, _start`, `c.beqz a0, mid`,
/// `c.bnez a5, _start`, `la a0, far` (auipc a0 + addi), `jal t0, _start`, `call t0,
/// far` (auipc t1 + jalr t0, t1), `c.addiw a0, 1`; at 0x10036 (`mid`) the trampoline
/// through the slot at 0x20000; `far` is 0x13042.
const CODE: [u8; 66] = [
    0x97, 0x30, 0x00, 0x00, 0xe7, 0x80, 0x20, 0x04, 0x17, 0x03, 0x00, 0x00, 0x67, 0x00, 0x83, 0xff,
    0xef, 0x00, 0x60, 0x02, 0xf5, 0xb7, 0x05, 0xa0, 0xe3, 0x04, 0xb5, 0xfe, 0x09, 0xcd, 0xed, 0xf3,
    0x17, 0x35, 0x00, 0x00, 0x13, 0x05, 0x25, 0x02, 0xef, 0xf2, 0x9f, 0xfd, 0x17, 0x33, 0x00, 0x00,
    0xe7, 0x02, 0x63, 0x01, 0x05, 0x25, 0x17, 0x03, 0x01, 0x00, 0x03, 0x33, 0xa3, 0xfc, 0x67, 0x00,
    0x03, 0x00,
];
const START: u64 = 0x10000;
const MID: u64 = 0x10036;
const FAR: u64 = 0x13042;

fn at(addr: u64) -> &'static [u8] {
    &CODE[(addr - START) as usize..]
}

#[test]
fn every_form_classifies_from_its_bytes() {
    let mut c = Cursor::new(&CODE, START);
    let site = |addr, len, kind, form| {
        Ok(SiteInsn {
            addr,
            len,
            kind,
            prefixes: form,
        })
    };
    use SiteKind::{Call, Jcc, Jmp};
    assert_eq!(
        c.classify(0x10000, Some(FAR)),
        site(0x10000, 8, Call, FORM_PAIR)
    );
    assert_eq!(
        c.classify(0x10008, Some(START)),
        site(0x10008, 8, Jmp, FORM_PAIR)
    );
    assert_eq!(
        c.classify(0x10010, Some(MID)),
        site(0x10010, 4, Call, FORM_JAL)
    );
    assert_eq!(
        c.classify(0x10014, Some(START)),
        site(0x10014, 2, Jmp, FORM_C_J)
    );
    assert_eq!(
        c.classify(0x10016, Some(MID)),
        site(0x10016, 2, Jmp, FORM_C_J)
    );
    assert_eq!(c.classify(0x10018, Some(START)), site(0x10018, 4, Jcc, 0));
    assert_eq!(c.classify(0x1001c, Some(MID)), site(0x1001c, 2, Jcc, 0));
    assert_eq!(c.classify(0x1001e, None), site(0x1001e, 2, Jcc, 0));
    // Not sites: an address taken, a `jal`/pair linking t0, `c.addiw` (RV32's `c.jal`
    // encoding), a misaligned or out-of-range relocation, the wrong target.
    assert!(
        c.classify(0x10020, None)
            .unwrap_err()
            .starts_with("auipc a0")
    );
    assert!(
        c.classify(0x10028, None)
            .unwrap_err()
            .contains("not patched")
    );
    assert!(
        c.classify(0x1002c, None)
            .unwrap_err()
            .contains("not patched")
    );
    assert!(
        c.classify(0x10034, None)
            .unwrap_err()
            .contains("compressed")
    );
    assert!(c.classify(0x10001, None).unwrap_err().contains("boundary"));
    assert!(c.classify(0xfffe, None).is_err());
    assert!(c.classify(0x10042, None).is_err());
    assert!(
        c.classify(0x10000, Some(START))
            .unwrap_err()
            .contains("does not reach")
    );
    // One instruction at a time, as `verify` decodes a table's site.
    let i = decode_insn(at(0x10008), 0x10008);
    assert_eq!((i.kind, i.len, i.branch_target), (Some(Jmp), 8, START));
    let i = decode_insn(at(0x10016), 0x10016);
    assert_eq!((i.kind, i.len, i.branch_target), (Some(Jmp), 2, MID));
    assert_eq!(decode_insn(at(0x10020), 0x10020).kind, None);
    assert_eq!(
        disasm(at(0x10000), 0x10000),
        "auipc ra + jalr ra, ra 0x13042"
    );
    assert_eq!(disasm(at(0x10014), 0x10014), "c.j 0x10000");
    assert_eq!(disasm(at(0x10018), 0x10018), "beq 0x10000");
    // The field reading the generic probe check uses: unconditional forms only.
    assert_eq!(branch_field_dest(&at(0x10000)[..8], 0x10000), Some(FAR));
    assert_eq!(branch_field_dest(&at(0x10010)[..8], 0x10010), Some(MID));
    assert_eq!(branch_field_dest(&at(0x10016)[..8], 0x10016), Some(MID));
    assert_eq!(branch_field_dest(&at(0x10018)[..8], 0x10018), None);
    assert_eq!(branch_field_dest(&at(0x10000)[1..9], 0x10001), None);
}

#[test]
fn each_relocation_type_on_its_own_forms_only() {
    let t = |r: elf::RelocationType, addr: u64| check_branch_reloc(r.0, at(addr), addr);
    for call in [elf::R_RISCV_CALL, elf::R_RISCV_CALL_PLT] {
        // The pair, and what relaxation makes of it.
        for a in [0x10000, 0x10008, 0x10010, 0x10014, 0x1002c] {
            assert_eq!(t(call, a), Ok(()), "{a:#x}");
        }
        let e = t(call, 0x10020).unwrap_err();
        assert!(e.contains("auipc a0") && e.contains("pair"), "{e}");
        assert!(t(call, 0x10018).is_err());
    }
    assert_eq!(t(elf::R_RISCV_JAL, 0x10010), Ok(()));
    assert!(t(elf::R_RISCV_JAL, 0x10000).is_err());
    assert!(t(elf::R_RISCV_JAL, 0x10014).is_err());
    assert_eq!(t(elf::R_RISCV_RVC_JUMP, 0x10016), Ok(()));
    assert!(
        t(elf::R_RISCV_RVC_JUMP, 0x10034)
            .unwrap_err()
            .contains("c.j")
    );
    assert_eq!(t(elf::R_RISCV_BRANCH, 0x10018), Ok(()));
    assert!(t(elf::R_RISCV_BRANCH, 0x1001c).is_err());
    assert_eq!(t(elf::R_RISCV_RVC_BRANCH, 0x1001e), Ok(()));
    assert!(
        check_branch_reloc(elf::R_RISCV_CALL.0, &CODE[1..], 0x10001)
            .unwrap_err()
            .contains("boundary")
    );
    assert!(check_branch_reloc(elf::R_RISCV_JAL.0, &[], 0x10000).is_err());
    // An auipc of an address taken is not checked (nor is any other type).
    assert_eq!(t(elf::R_RISCV_PCREL_HI20, 0x10020), Ok(()));
}

#[test]
fn trampoline_and_plt_forms() {
    assert_eq!(trampoline_slot(at(MID), MID), Some(0x20000));
    assert!(is_trampoline_form(at(MID)));
    // In an object: the same instructions, offsets 0.
    let unlinked = [0x17, 0x03, 0, 0, 0x03, 0x33, 0x03, 0, 0x67, 0, 0x03, 0];
    assert!(is_trampoline_form(&unlinked));
    assert!(!is_trampoline_form(at(0x10000)));
    assert!(!is_trampoline_form(&at(MID)[..10]));
    assert!(is_trampoline_slot_reloc(elf::R_RISCV_PCREL_HI20.0));
    assert!(!is_trampoline_slot_reloc(elf::R_RISCV_CALL_PLT.0));
    // `auipc t3, 0x2; ld t3, -8(t3); jalr t1, t3; nop` at 0x1000.
    let plt = [
        0x17, 0x2e, 0, 0, 0x03, 0x3e, 0x8e, 0xff, 0x67, 0x03, 0x0e, 0, 0x13, 0, 0, 0,
    ];
    assert_eq!(plt_slot(&plt, 0x1000), Some(0x2ff8));
    assert_eq!(plt_slot(&plt[..12], 0x1000), None);
}

#[test]
fn table_relocations_apply_as_the_loader_does() {
    let mut f = [0u8; 4];
    assert_eq!(apply_table_reloc(&mut f, 0x1000, 8, 0x2000), Ok(()));
    assert_eq!(i32::from_le_bytes(f), -0xff8);
    assert!(apply_table_reloc(&mut f, 1 << 40, 0, 0).is_err());
    assert!(apply_table_reloc(&mut f[..2], 0, 0, 0).is_err());
}

#[test]
fn a_relaxed_branch_at_a_section_end_is_read_whole() {
    // The `c.j mid` at 0x10016 as the section's last two bytes, the `jal ra, mid` at
    // 0x10010 as its last four.
    let t = super::super::Target::Riscv64;
    let cj = &CODE[0x16..0x18];
    let read = |n: u64| cj.get(..n as usize);
    assert_eq!(t.branch_dest_at(read, 0x10016), Some(MID));
    let jal = &CODE[0x10..0x14];
    let read = |n: u64| jal.get(..n as usize);
    assert_eq!(t.branch_dest_at(read, 0x10010), Some(MID));
    let read = |_: u64| None;
    assert_eq!(t.branch_dest_at(read, 0x10010), None);
}

#[test]
fn key_branch_is_jal_x0_and_jal_ra_is_none() {
    // `jal x0, 16` and `jal x0, -16` as riscv64-linux-gnu-as assembles them.
    assert_eq!(
        key_branch(0x1000, 0x1010),
        Some(0x0100_006fu32.to_le_bytes())
    );
    assert_eq!(
        key_branch(0x1010, 0x1000),
        Some(0xff1f_f06fu32.to_le_bytes())
    );
    assert_eq!(
        key_branch_dest(&0x0100_006fu32.to_le_bytes(), 0x1000),
        Some(0x1010)
    );
    assert_eq!(key_branch_dest(&0x0100_00efu32.to_le_bytes(), 0x1000), None);
    assert_eq!(key_branch_dest(&probe_nop(), 0x1000), None);
}
