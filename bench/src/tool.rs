//! Build-tool throughput: a generated static image with 10^6 calls to four ifunc
//! trampolines (10^6 `R_X86_64_PLT32` relocations kept by `--emit-relocs`), assembled and
//! linked by gcc/GNU ld; `ksites embed` and `ksites scan` on it against
//! `objcopy --add-section` of a section the size of the table embed writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Functions in the generated image.
pub const FUNCS: usize = 1000;
/// Calls per function.
pub const CALLS_PER_FUNC: usize = 1000;
const IFUNCS: usize = 4;

/// The generated files.
#[derive(Debug)]
pub struct Inputs {
    /// The linked image (input of every command).
    pub image: PathBuf,
    /// A blob the size of the table `ksites embed` writes.
    pub blob: PathBuf,
    /// Where outputs go.
    pub dir: PathBuf,
}

fn assembly() -> String {
    let mut s = String::with_capacity(FUNCS * CALLS_PER_FUNC * 24);
    s.push_str(".intel_syntax noprefix\n.text\n.globl _start\n_start:\n  ret\n");
    // The ifunc trampolines, slots, defaults and records, as `ifunc!` emits them.
    for k in 0..IFUNCS {
        let _ = write!(
            s,
            "\n.globl tramp_{k}\n.type tramp_{k},@function\ntramp_{k}:\n  jmp qword ptr [rip + slot_{k}]\n  int3\n  int3\n.size tramp_{k}, .-tramp_{k}\n\
             .type impl_{k},@function\nimpl_{k}:\n  mov eax, {k}\n  ret\n.size impl_{k}, .-impl_{k}\n\
             .pushsection .data.ksites_slot,\"aw\",@progbits\n.p2align 3\nslot_{k}: .quad impl_{k}\n.popsection\n\
             .pushsection .rodata.ksites_name,\"a\",@progbits\nname_{k}: .ascii \"gen::f{k}\"\nname_{k}_end:\n.popsection\n\
             .pushsection .ksites_ifuncs,\"aw\",@progbits\n.p2align 3\n.long 0x4649534b\n.long 1\n\
             .quad tramp_{k}\n.quad slot_{k}\n.quad resolve\n.quad impl_{k}\n.quad name_{k}\n.quad name_{k}_end - name_{k}\n.popsection\n"
        );
    }
    s.push_str(
        ".type resolve,@function\nresolve:\n  lea rax, [rip + impl_0]\n  ret\n.size resolve, .-resolve\n\
         .data\n.p2align 3\n.globl __ksites_table_cell\n__ksites_table_cell:\n.ascii \"KSCELL\"\n.byte 0, 1\n.quad 0, 0\n.text\n",
    );
    for f in 0..FUNCS {
        let _ = writeln!(s, ".globl f{f}\n.type f{f},@function\nf{f}:");
        for c in 0..CALLS_PER_FUNC {
            let _ = writeln!(s, "  call tramp_{}", (f + c) % IFUNCS);
        }
        let _ = writeln!(s, "  ret\n.size f{f}, .-f{f}");
    }
    s
}

fn run(cmd: &mut Command) {
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed: {st}");
}

/// Generates (once) the image in `dir`.
pub fn generate(dir: &Path) -> Inputs {
    std::fs::create_dir_all(dir).expect("create the work directory");
    let asm = dir.join("gen.s");
    let obj = dir.join("gen.o");
    let image = dir.join("gen.elf");
    let blob = dir.join("blob.bin");
    if !image.is_file() {
        std::fs::write(&asm, assembly()).expect("write gen.s");
        run(Command::new("gcc").arg("-c").arg(&asm).arg("-o").arg(&obj));
        run(Command::new("gcc")
            .args(["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs", "-o"])
            .arg(&image)
            .arg(&obj));
        let _ = std::fs::remove_file(&asm);
        let _ = std::fs::remove_file(&obj);
    }
    // The table embed writes: 64-byte header, one 20-byte descriptor per ifunc, 8 bytes
    // per site, the names.
    let size = 64 + 20 * IFUNCS + 8 * FUNCS * CALLS_PER_FUNC + 64;
    std::fs::write(&blob, vec![0x5au8; size]).expect("write blob");
    Inputs {
        image,
        blob,
        dir: dir.to_path_buf(),
    }
}

/// `ksites embed IMAGE -o OUT`.
pub fn embed(ksites: &Path, i: &Inputs) {
    let out = i.dir.join("embedded.elf");
    run(Command::new(ksites)
        .arg("embed")
        .arg(&i.image)
        .arg("-o")
        .arg(&out)
        .arg("-q"));
}

/// `ksites scan --calls-to 'tramp_*' IMAGE`, output discarded.
pub fn scan(ksites: &Path, i: &Inputs) {
    run(Command::new(ksites)
        .args(["scan", "--calls-to", "tramp_*"])
        .arg(&i.image)
        .stdout(Stdio::null()));
}

/// `objcopy --add-section .blob=BLOB IMAGE OUT`.
pub fn objcopy(i: &Inputs) {
    let out = i.dir.join("objcopy.elf");
    let mut arg = std::ffi::OsString::from(".blob=");
    arg.push(&i.blob);
    run(Command::new("objcopy")
        .arg("--add-section")
        .arg(arg)
        .arg(&i.image)
        .arg(&out));
}
