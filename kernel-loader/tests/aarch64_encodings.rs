//! The aarch64 encoders against GNU binutils: a few instructions assembled and linked
//! with `aarch64-linux-gnu-as`/`-ld` (package `binutils-aarch64-linux-gnu`, pulled in by
//! `gcc-aarch64-linux-gnu`), compared word by word with `kernel_loader::arch::aarch64`'s
//! encodings of the same instructions at the same addresses. Like the build tool's
//! tests with `gcc`, it fails with a clear message when the tool is missing.

use std::path::PathBuf;
use std::process::Command;

use kernel_loader::arch::aarch64::{self, NOP, RET, brk, probe::BRK_IMM};

/// Where `.text` is linked (`-Ttext`): high enough that the backward branches below do
/// not wrap under 0.
const TEXT: u64 = 0x1000_0000;

/// The test's source: every line's words are predicted by `expected`.
const SOURCE: &str = "\
.text
.globl _start
_start:
a0: bl a0+0x7fffffc
a1: b a1-0x8000000
a2: bl a2+0x1234
a3: b a3-8
nop
brk #0x4b53
ret
tramp: adrp x16, slot
ldr x16, [x16, :lo12:slot]
br x16
veneer: adrp x16, far
add x16, x16, :lo12:far
br x16
.org 0x20ff8
slot: .quad 0
.org 0x23ab8
far: ret
";

fn tool(name: &str) -> String {
    format!("aarch64-linux-gnu-{name}")
}

/// Runs `cmd`, failing with what to install when the tool is missing.
fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{:?}: {e}: the aarch64 encoding tests need GNU binutils for aarch64 \
             (apt-get install binutils-aarch64-linux-gnu, or gcc-aarch64-linux-gnu)",
            cmd.get_program()
        )
    });
    assert!(st.success(), "{cmd:?} failed");
}

/// The linked `.text` bytes of [`SOURCE`].
fn assemble() -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("ksites-a64-enc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| -> PathBuf { dir.join(n) };
    std::fs::write(p("enc.s"), SOURCE).unwrap();
    run(Command::new(tool("as"))
        .arg(p("enc.s"))
        .arg("-o")
        .arg(p("enc.o")));
    run(Command::new(tool("ld"))
        .arg(format!("-Ttext={TEXT:#x}"))
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

/// The words the encoders give for [`SOURCE`]'s instructions before `.org`.
fn expected() -> Vec<u32> {
    let at = |i: u64| TEXT + 4 * i;
    let slot = TEXT + 0x20ff8;
    let far = TEXT + 0x23ab8;
    let mut w = vec![
        aarch64::branch_insn(at(0), at(0) + 0x7ff_fffc, true).unwrap(),
        aarch64::branch_insn(at(1), at(1) - 0x800_0000, false).unwrap(),
        aarch64::branch_insn(at(2), at(2) + 0x1234, true).unwrap(),
        aarch64::branch_insn(at(3), at(3) - 8, false).unwrap(),
        NOP,
        brk(BRK_IMM),
        RET,
    ];
    w.extend(aarch64::trampoline(at(7), slot).unwrap());
    // The veneer: the trampoline's `adrp`, then `add x16, x16, :lo12:far`, `br x16`.
    let adrp = aarch64::trampoline(at(10), far).unwrap()[0];
    w.extend([
        adrp,
        aarch64::ADD_X16_X16 | ((far & 0xfff) as u32) << 10,
        aarch64::BR_X16,
    ]);
    w
}

#[test]
fn encoders_match_gnu_as_and_ld() {
    let bin = assemble();
    let want = expected();
    for (i, w) in want.iter().enumerate() {
        let got = u32::from_le_bytes(bin[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(got, *w, "word {i}: as {got:08x}, encoder {w:08x}");
    }
    // And the decoders read the assembler's words back.
    let tramp = &bin[28..40];
    assert_eq!(
        aarch64::trampoline_slot(tramp, TEXT + 28),
        Some(TEXT + 0x20ff8)
    );
    assert_eq!(
        aarch64::veneer_target(&bin[40..52], TEXT + 40),
        Some(TEXT + 0x23ab8)
    );
    let bl = u32::from_le_bytes(bin[0..4].try_into().unwrap());
    assert_eq!(aarch64::branch_dest(bl, TEXT), Some(TEXT + 0x7ff_fffc));
}
