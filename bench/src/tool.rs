//! Build-tool throughput: a generated static image with 10^6 calls to four ifunc
//! trampolines (10^6 `R_X86_64_PLT32` relocations kept by `--emit-relocs`), assembled and
//! linked by gcc/GNU ld; `ksites embed` and `ksites scan` on it against
//! `objcopy --add-section` of a section the size of the table embed writes; and the
//! peak memory (max RSS, from `wait4`) of each of them on that image.

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

/// `ksites embed IMAGE -o OUT -q`.
fn embed_cmd(ksites: &Path, i: &Inputs) -> Command {
    let mut c = Command::new(ksites);
    c.arg("embed")
        .arg(&i.image)
        .arg("-o")
        .arg(i.dir.join("embedded.elf"))
        .arg("-q");
    c
}

/// `ksites scan --calls-to 'tramp_*' IMAGE`, output discarded.
fn scan_cmd(ksites: &Path, i: &Inputs) -> Command {
    let mut c = Command::new(ksites);
    c.args(["scan", "--calls-to", "tramp_*"])
        .arg(&i.image)
        .stdout(Stdio::null());
    c
}

/// `objcopy --add-section .blob=BLOB IMAGE OUT`.
fn objcopy_cmd(i: &Inputs) -> Command {
    let mut arg = std::ffi::OsString::from(".blob=");
    arg.push(&i.blob);
    let mut c = Command::new("objcopy");
    c.arg("--add-section")
        .arg(arg)
        .arg(&i.image)
        .arg(i.dir.join("objcopy.elf"));
    c
}

/// `ksites embed IMAGE -o OUT -q`.
pub fn embed(ksites: &Path, i: &Inputs) {
    run(&mut embed_cmd(ksites, i));
}

/// `ksites scan --calls-to 'tramp_*' IMAGE`, output discarded.
pub fn scan(ksites: &Path, i: &Inputs) {
    run(&mut scan_cmd(ksites, i));
}

/// `objcopy --add-section .blob=BLOB IMAGE OUT`.
pub fn objcopy(i: &Inputs) {
    run(&mut objcopy_cmd(i));
}

/// Peak resident set (bytes) of one run of `cmd`, from `wait4`'s `ru_maxrss`; panics
/// unless it exits with status 0.
fn peak_rss(cmd: &mut Command) -> u64 {
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    let mut status: libc::c_int = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `pid` is our child, which nothing else waits for (`child` is never waited
    // on through std); `status` and `ru` are valid, writable out-parameters.
    let r = unsafe { libc::wait4(pid, &mut status, 0, ru.as_mut_ptr()) };
    assert_eq!(r, pid, "wait4 {cmd:?}: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: wait status {status:#x}"
    );
    // SAFETY: wait4 succeeded and filled `ru`, which was zeroed (a valid rusage) anyway.
    let ru = unsafe { ru.assume_init() };
    drop(child);
    u64::try_from(ru.ru_maxrss).expect("ru_maxrss is not negative") * 1024
}

/// Peak RSS of each command (the highest of `runs` runs): `(label, bytes)`.
pub fn peak_rss_rows(ksites: &Path, i: &Inputs, runs: usize) -> Vec<(&'static str, u64)> {
    let max = |mk: &dyn Fn() -> Command| (0..runs).map(|_| peak_rss(&mut mk())).max().unwrap_or(0);
    vec![
        ("ksites embed", max(&|| embed_cmd(ksites, i))),
        (
            "ksites scan --calls-to 'tramp_*'",
            max(&|| scan_cmd(ksites, i)),
        ),
        ("objcopy --add-section (for scale)", max(&|| objcopy_cmd(i))),
    ]
}
