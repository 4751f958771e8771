//! riscv64 probe-function check of `ksites embed` (code that reaches a probe function
//! without a relocation): it must not read a branch out of the middle of an instruction
//! (`lui a5, imm` whose upper 16 bits happen to be a `c.j` to a probe function was
//! refused: "the jmp at crafted+0x2 reaches probe function ... but has no relocation"),
//! must not miss a relocation-less `c.j` in the last bytes of a section, and refuses a
//! `probe!` site that relaxation padding left at 2 mod 4 in an object. Needs
//! gcc-riscv64-linux-gnu.

use std::path::Path;
use std::process::Command;

const ASM: &str = r#"
    .section .text.tramp,"ax",@progbits
    .option push
    .option norvc
    .option norelax
    .balign 4
    .globl fixture_add
    .type fixture_add,@function
fixture_add:
1:  auipc t1, %pcrel_hi(fixture_add_slot)
    ld t1, %pcrel_lo(1b)(t1)
    jr t1
    .size fixture_add, .-fixture_add
    .option pop
    # `beq a0, a1, fixture_add` and `c.bnez a0, fixture_add`, as words (the assembler
    # would turn a branch to a global symbol into a branch around a `j`); near the
    # trampoline, in reach of `c.bnez`.
    .globl c_condbr_unused
    .type c_condbr_unused,@function
c_condbr_unused:
    .reloc ., R_RISCV_BRANCH, fixture_add
    .4byte 0x00b50063
    .reloc ., R_RISCV_RVC_BRANCH, fixture_add
    .2byte 0xe101
    ret
    .size c_condbr_unused, .-c_condbr_unused
    .text
    .globl add_impl
    .type add_impl,@function
add_impl:
    add a0, a0, a1
    ret
    .size add_impl, .-add_impl
    .globl ksites_probe_c_entry
    .type ksites_probe_c_entry,@function
ksites_probe_c_entry:
    ret
    .size ksites_probe_c_entry, .-ksites_probe_c_entry
    .globl ksites_probe_ret0
    .type ksites_probe_ret0,@function
ksites_probe_ret0:
    li a0, 0
    ret
    .size ksites_probe_ret0, .-ksites_probe_ret0
    .globl ksites_probe_ret1
    .type ksites_probe_ret1,@function
ksites_probe_ret1:
    li a0, 1
    ret
    .size ksites_probe_ret1, .-ksites_probe_ret1
    .data
    .balign 8
fixture_add_slot: .quad add_impl
    .section .rodata
n1: .ascii "fixture::add"
n1e:
    .section .ksites_ifuncs,"awR",@progbits
    .balign 8
    .long 0x4649534b, 1
    .quad fixture_add, fixture_add_slot, add_impl, add_impl, n1, n1e - n1
    .section .data.cell,"aw",@progbits
    .balign 8
    .globl __ksites_table_cell
__ksites_table_cell: .quad 0x01004c4c4543534b, 0, 0
"#;
const C: &str = r#"#include <stdint.h>
#include "ksites_sdt.h"
extern volatile uint64_t sink;
volatile uint64_t sink;
KSITES_PROBE_DECL(zz, qq, 1, (unsigned long n))
__attribute__((noinline)) void crafted(void) {
    __asm__ volatile("lui a5, " IMM "\n" ::: "a5");
}
__attribute__((noinline)) void c_probe(unsigned long n) { KSITES_PROBE(zz, qq, n); sink = n; }
void c_condbr(void) {}
void _start(void) { crafted(); c_probe(5); for (;;) {} }
"#;

fn run(c: &mut Command) -> std::process::Output {
    c.output().expect("run")
}

/// Links `ifunc.S`, `p.c` (its `lui a5` immediate `imm`) and, if `tail` is given, an
/// object whose one section (the last of `.text`) holds the parcel `tail`.
fn build(dir: &Path, imm: &str, tail: Option<u16>) -> std::path::PathBuf {
    let flags = [
        "-O2",
        "-march=rv64gc",
        "-mabi=lp64d",
        "-mcmodel=medany",
        "-fno-pic",
        "-ffreestanding",
        "-mno-relax",
        "-c",
    ];
    let inc = format!("-I{}/../kernel-loader/c", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(dir.join("ifunc.S"), ASM).unwrap();
    std::fs::write(dir.join("p.c"), C).unwrap();
    for (src, obj, def) in [("ifunc.S", "ifunc.o", None), ("p.c", "p.o", Some(imm))] {
        let mut c = Command::new("riscv64-linux-gnu-gcc");
        c.args(flags).arg(&inc);
        if let Some(i) = def {
            c.arg(format!("-DIMM=\"{i}\""));
        }
        let o = run(c.arg(dir.join(src)).arg("-o").arg(dir.join(obj)));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut objs = vec![dir.join("ifunc.o"), dir.join("p.o")];
    if let Some(h) = tail {
        let src = format!(
            ".section .text.zz_tail,\"ax\",@progbits\n.globl zz_tail\nzz_tail: .2byte {h:#x}\n"
        );
        std::fs::write(dir.join("tail.S"), src).unwrap();
        let o = run(Command::new("riscv64-linux-gnu-gcc")
            .args(flags)
            .arg(dir.join("tail.S"))
            .arg("-o")
            .arg(dir.join("tail.o")));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        objs.push(dir.join("tail.o"));
    }
    let k = dir.join(format!("k-{imm}-{tail:?}"));
    let o = run(Command::new("riscv64-linux-gnu-ld")
        .args(["--emit-relocs", "-static", "-e", "_start", "--no-relax"])
        .args(&objs)
        .arg("-o")
        .arg(&k));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    k
}

fn sym(k: &Path, name: &str) -> u64 {
    let o = run(Command::new("riscv64-linux-gnu-nm").arg(k));
    let s = String::from_utf8(o.stdout).unwrap();
    let l = s
        .lines()
        .find(|l| l.ends_with(&format!(" {name}")))
        .unwrap();
    u64::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap()
}

fn embed(k: &Path, out: &Path) -> std::process::Output {
    run(Command::new(env!("CARGO_BIN_EXE_ksites"))
        .arg("embed")
        .arg(k)
        .arg("-o")
        .arg(out))
}

#[test]
fn an_instruction_whose_upper_half_looks_like_c_j_to_a_probe_function_is_no_branch() {
    let dir = std::env::temp_dir().join(format!("ksites-rv-probe-scan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k0 = build(&dir, "0", None);
    let (probe, crafted) = (sym(&k0, "__dtrace_probe_zz___qq"), sym(&k0, "crafted"));
    // The `lui`'s upper parcel, at crafted + 2, read as `c.j` to the probe function.
    let off = probe.wrapping_sub(crafted + 2) as i64;
    let h = kernel_loader::arch::riscv64::c_j(off).expect("within 2 KiB") as u32;
    let k1 = build(&dir, &format!("{:#x}", h << 4), None);
    assert_eq!(sym(&k1, "crafted"), crafted, "same layout");
    let o = embed(&k1, &dir.join("k1.out"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        o.status.success(),
        "a plain `lui` was taken for a branch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_relocation_less_c_j_in_a_sections_last_bytes_is_found() {
    let dir = std::env::temp_dir().join(format!("ksites-rv-probe-tail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // First with a `c.nop` there, for the layout; then a `c.j` to the probe function.
    let k0 = build(&dir, "0", Some(0x0001));
    let (probe, at) = (sym(&k0, "__dtrace_probe_zz___qq"), sym(&k0, "zz_tail"));
    let ok = embed(&k0, &dir.join("k0.out"));
    let h = kernel_loader::arch::riscv64::c_j(probe.wrapping_sub(at) as i64).expect("2 KiB");
    let k1 = build(&dir, "0", Some(h));
    assert_eq!(sym(&k1, "zz_tail"), at, "same layout");
    let o = embed(&k1, &dir.join("k1.out"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("reaches probe function")
            && err.contains(&format!("{at:#x}")),
        "a `c.j` at the end of .text was missed: {err}"
    );
}

/// A `probe!` site as rustc emits it (`.p2align 2`, `.option norvc`, `nop`, and its
/// records) after a 4-byte instruction: with relaxation the assembler pads with a
/// `c.nop` + `R_RISCV_ALIGN`, leaving the site at 2 mod 4 in the object.
const RUST_SITE: &str = r#"
    .text
    .globl f
    .type f,@function
f:  .option push
    .option norvc
    addi sp, sp, -16
    .option pop
    .option push
    .p2align 2
    .option norvc
2:  nop
    .option pop
    ret
3:  ret
    .size f, .-f
    .section .ksites_probe_sites,"aw",@progbits
    .balign 8
    .long 0x5053534b, 0
    .quad 2b, 3b, rec
    .data
    .balign 8
rec: .long 0x5250534b, 0
    .quad prov, 2, name, 2, 0xffffffff, 0
    .section .rodata
prov: .ascii "pp"
name: .ascii "nn"
"#;

#[test]
fn a_probe_site_left_at_2_mod_4_by_relaxation_is_refused_naming_the_build_flags() {
    let dir = std::env::temp_dir().join(format!("ksites-rv-probe-align-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("site.S"), RUST_SITE).unwrap();
    let mut outs = Vec::new();
    for relax in ["-mrelax", "-mno-relax"] {
        let obj = dir.join(format!("site{relax}.o"));
        let o = run(Command::new("riscv64-linux-gnu-gcc")
            .args(["-march=rv64gc", "-mabi=lp64d", relax, "-c"])
            .arg(dir.join("site.S"))
            .arg("-o")
            .arg(&obj));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push(embed(&obj, &dir.join(format!("site{relax}.emb.o"))));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&outs[0].stderr);
    assert!(
        !outs[0].status.success()
            && err.contains("(pp:nn) is at 0x6, not 4-aligned")
            && err.contains("-C target-feature=-relax")
            && err.contains("-mno-relax"),
        "{err}"
    );
    assert!(
        outs[1].status.success(),
        "{}",
        String::from_utf8_lossy(&outs[1].stderr)
    );
}
