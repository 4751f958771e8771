//! The riscv64 encoders against GNU binutils: instructions assembled and linked with
//! `riscv64-linux-gnu-as`/`-ld` (package `binutils-riscv64-linux-gnu`, pulled in by
//! `gcc-riscv64-linux-gnu`), relaxation off so every call stays the pair, compared
//! byte by byte with `kernel_loader::arch::riscv64`'s encodings of the same
//! instructions at the same addresses; then the same source linked with relaxation on,
//! whose `call`s become `jal`/`c.j` sites the decoders must read. Like the build tool's
//! tests with `gcc`, it fails with a clear message when the tool is missing.

use std::path::PathBuf;
use std::process::Command;

use kernel_loader::arch::SiteKind;
use kernel_loader::arch::riscv64::probe::{C_ENABLED_OFF, C_ENABLED_ON, C_TAIL_OFF, C_TAIL_ON};
use kernel_loader::arch::riscv64::{
    self, C_NOP, EBREAK, FORM_C_J, FORM_JAL, FORM_PAIR, NOP, RA, RET, ZERO,
};

/// Where `.text` is linked (`-Ttext`).
const TEXT: u64 = 0x8020_0000;

/// The test's source. Offsets (from `_start`): pair call at 0, pair tail at 8, `jal ra`
/// at 0x10, `j` at 0x14, `c.j` at 0x18, `nop` 0x1a (`c.nop`), `nop` at 0x1c, `ebreak`
/// 0x20, `ret` 0x24, `li a0,0` 0x28, `li a0,1` 0x2c, trampoline at 0x30, `jal ra` far
/// back at 0x3c; `far` at +0xfff00, `slot` at +0x81238, `near` right after.
const SOURCE: &str = "\
.option norvc
.text
.globl _start
_start:
call far
tail far2
jal ra, near
j near
.option rvc
c.j near
c.nop
.option norvc
nop
ebreak
ret
li a0, 0
li a0, 1
tramp: auipc t1, %pcrel_hi(slot)
1: ld t1, %pcrel_lo(tramp)(t1)
jr t1
back: jal ra, _start
near: ret
.org 0x81238
slot: .quad 0
.org 0xfff00
far: ret
far2: ret
";

fn tool(name: &str) -> String {
    format!("riscv64-linux-gnu-{name}")
}

/// Runs `cmd`, failing with what to install when the tool is missing.
fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{:?}: {e}: the riscv64 encoding tests need GNU binutils for riscv64 \
             (apt-get install binutils-riscv64-linux-gnu, or gcc-riscv64-linux-gnu)",
            cmd.get_program()
        )
    });
    assert!(st.success(), "{cmd:?} failed");
}

/// The linked `.text` bytes of `source` (`relax`: let the linker relax calls), built
/// in a directory named after `name` (tests run in parallel).
fn assemble(name: &str, source: &str, relax: bool) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("ksites-rv64-enc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| -> PathBuf { dir.join(n) };
    std::fs::write(p("enc.s"), source).unwrap();
    run(Command::new(tool("as"))
        .arg("-march=rv64gc")
        .arg(p("enc.s"))
        .arg("-o")
        .arg(p("enc.o")));
    run(Command::new(tool("ld"))
        .arg(format!("-Ttext={TEXT:#x}"))
        .arg(if relax { "--relax" } else { "--no-relax" })
        .arg(p("enc.o"))
        .arg("-o")
        .arg(p("enc.elf")));
    run(Command::new(tool("objcopy"))
        .args(["-O", "binary", "-j", ".text"])
        .arg(p("enc.elf"))
        .arg(p("enc.bin")));
    let bytes = std::fs::read(p("enc.bin")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn word(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn site(kind: SiteKind, form: u8, off: u64) -> kernel_loader::arch::BranchSite {
    kernel_loader::arch::BranchSite {
        addr: TEXT + off,
        kind,
        prefixes: form,
        len: riscv64::site_len(kind, form) as u8,
    }
}

#[test]
fn encoders_match_gnu_as_and_ld() {
    let bin = assemble("encoders", SOURCE, false);
    let far = TEXT + 0xf_ff00;
    let near = TEXT + 0x40;
    let cases = [
        (site(SiteKind::Call, FORM_PAIR, 0), far),
        (site(SiteKind::Jmp, FORM_PAIR, 8), far + 4),
        (site(SiteKind::Call, FORM_JAL, 0x10), near),
        (site(SiteKind::Jmp, FORM_JAL, 0x14), near),
        (site(SiteKind::Jmp, FORM_C_J, 0x18), near),
        (site(SiteKind::Call, FORM_JAL, 0x3c), TEXT),
    ];
    for (s, target) in cases {
        let off = (s.addr - TEXT) as usize;
        let f = riscv64::encode_target(&s, target).unwrap();
        let got = &bin[off..off + f.len as usize];
        assert_eq!(
            got,
            &f.value.to_le_bytes()[..f.len as usize],
            "{:?} form {} at {off:#x}",
            s.kind,
            s.prefixes
        );
        assert_eq!(riscv64::decode_branch_target(&s, got), Some(target));
        assert!(riscv64::is_original(&s, f.value, target));
        let d = riscv64::decode_site(got, s.addr).unwrap();
        assert_eq!((d.kind, d.form, d.target), (s.kind, s.prefixes, target));
    }
    assert_eq!(u16::from_le_bytes([bin[0x1a], bin[0x1b]]), C_NOP);
    let words = [
        (0x1c, NOP),
        (0x20, EBREAK),
        (0x24, RET),
        (0x24, u32::from_le_bytes(C_TAIL_OFF)),
        (0x20, u32::from_le_bytes(C_TAIL_ON)),
        (0x28, u32::from_le_bytes(C_ENABLED_OFF)),
        (0x2c, u32::from_le_bytes(C_ENABLED_ON)),
    ];
    for (off, w) in words {
        assert_eq!(word(&bin, off), w, "{off:#x}");
    }
    // The trampoline, both ways.
    let t = riscv64::trampoline(TEXT + 0x30, TEXT + 0x8_1238).unwrap();
    for (i, w) in t.iter().enumerate() {
        assert_eq!(word(&bin, 0x30 + 4 * i), *w, "trampoline word {i}");
    }
    assert_eq!(
        riscv64::trampoline_slot(&bin[0x30..0x3c], TEXT + 0x30),
        Some(TEXT + 0x8_1238)
    );
    // `jal x0`/`jal ra` helpers agree with the assembler too.
    assert_eq!(
        riscv64::jal_to(RA, TEXT + 0x10, near),
        Some(word(&bin, 0x10))
    );
    assert_eq!(
        riscv64::jal_to(ZERO, TEXT + 0x14, near),
        Some(word(&bin, 0x14))
    );
}

/// Calls at the edge of each form's reach, assembled at `_start` + 0x1000 and linked
/// without relaxation: the pair at ±(almost) 2 GiB is too far for one object, so it is
/// checked against `call` to absolute symbols.
#[test]
fn reach_limits_match_the_assembler() {
    let src = "\
.option norvc
.text
.globl _start
_start:
.org 0x100000
a: jal ra, a+0xffffe
b: jal x0, b-0x100000
.option rvc
c: c.j c+0x7fe
d: c.j d-0x800
.option norvc
e: call ext_fwd
f: tail ext_back
.org 0x300000
";
    let src = format!(
        "{src}.set ext_fwd, e+{:#x}\n.set ext_back, f-{:#x}\n",
        riscv64::PAIR_MAX_FORWARD,
        -riscv64::PAIR_MAX_BACKWARD
    );
    let bin = assemble("reach", &src, false);
    let base = 0x10_0000u64;
    let cases: [(SiteKind, u8, u64, i64); 6] = [
        (SiteKind::Call, FORM_JAL, 0, riscv64::JAL_MAX_FORWARD),
        (SiteKind::Jmp, FORM_JAL, 4, riscv64::JAL_MAX_BACKWARD),
        (SiteKind::Jmp, FORM_C_J, 8, riscv64::C_J_MAX_FORWARD),
        (SiteKind::Jmp, FORM_C_J, 10, riscv64::C_J_MAX_BACKWARD),
        (SiteKind::Call, FORM_PAIR, 12, riscv64::PAIR_MAX_FORWARD),
        (SiteKind::Jmp, FORM_PAIR, 20, riscv64::PAIR_MAX_BACKWARD),
    ];
    for (kind, form, off, delta) in cases {
        let s = site(kind, form, base + off);
        let target = s.addr.checked_add_signed(delta).unwrap();
        let f = riscv64::encode_target(&s, target).unwrap();
        let o = (base + off) as usize;
        assert_eq!(
            &bin[o..o + f.len as usize],
            &f.value.to_le_bytes()[..f.len as usize],
            "{kind:?} form {form} {delta:#x}"
        );
        // One step further is refused.
        let beyond = if delta > 0 { delta + 2 } else { delta - 2 };
        assert!(riscv64::encode_target(&s, s.addr.checked_add_signed(beyond).unwrap()).is_none());
    }
}

/// The same calls linked with relaxation on: GNU ld turns the near `call`/`tail` into
/// `jal ra`/`c.j`, and [`riscv64::decode_site`] reads every site as the form it became,
/// with the right target.
#[test]
fn relaxed_calls_decode_as_their_new_form() {
    let src = "\
.text
.globl _start
_start:
call near
tail near
call far
nop
near: ret
.org 0x200000
far: ret
";
    let bin = assemble("relaxed", src, true);
    // Walk: every site the decoder finds, in order.
    let mut found = Vec::new();
    let mut off = 0usize;
    while off + 2 <= 0x40.min(bin.len()) {
        if let Some(d) = riscv64::decode_site(&bin[off..], TEXT + off as u64) {
            found.push((off, d.kind, d.form, d.target - TEXT));
            off += d.len as usize;
        } else {
            off += if bin[off] & 3 == 3 { 4 } else { 2 };
        }
        if found.len() == 3 {
            break;
        }
    }
    let near = found[0].3;
    assert_eq!(
        found,
        vec![
            (0, SiteKind::Call, FORM_JAL, near),
            (4, SiteKind::Jmp, FORM_C_J, near),
            // `far` moved back by the 10 bytes relaxation removed before it.
            (6, SiteKind::Call, FORM_PAIR, 0x20_0000 - 10),
        ],
        "{found:x?}"
    );
}
