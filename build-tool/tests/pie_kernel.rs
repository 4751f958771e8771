//! Issue 13, item 1: a kernel built for rustc's default `x86_64-unknown-none` target is
//! a static PIE (ET_DYN). Linked through `ksites-ld` (rust-lld and GNU ld), with an
//! `ifunc!`, a `probe!` and the table cell, it must embed: exit 0, an ET_DYN output that
//! `verify` finds clean and whose table `inspect` lists, program headers intact.

#[path = "common/module_build.rs"]
mod module_build;

use std::process::{Command, Output};

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");
const KSITES_LD: &str = env!("CARGO_BIN_EXE_ksites-ld");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A minimal freestanding kernel: an ifunc, a probe, and a read of its own table.
const KERNEL: &str = r#"
#![no_std]
#![no_main]
use kernel_loader::{CpuFeatures, ifunc, probe};
extern "C" fn twice_soft(x: u64) -> u64 { 2 * x }
fn pick(_: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u64 { twice_soft }
ifunc! {
    pub fn twice(x: u64) -> u64;
    default = twice_soft;
    resolver = pick;
}
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    probe!(k, boot, 1u64);
    // SAFETY: the image is processed by `ksites embed` (the test checks it).
    let t = unsafe { kernel_loader::cell::image_table_bytes() };
    core::hint::black_box((twice(core::hint::black_box(3)), t.is_ok()));
    loop {}
}
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! { loop {} }
"#;

#[test]
fn default_target_pie_kernel_links_through_ksites_ld() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kl = module_build::kernel_loader_for_none(&d.join("kl"));
    std::fs::write(d.join("k.rs"), KERNEL).unwrap();
    for linker in ["lld", "bfd"] {
        let out = format!("kernel-{linker}");
        let o = run(Command::new("rustc")
            .args(["--edition", "2024", "-O", "--target", "x86_64-unknown-none"])
            .args(["-C", "panic=abort", "k.rs", "-o", &out])
            .arg("--extern")
            .arg(format!(
                "kernel_loader={}",
                kl.join("libkernel_loader.rlib").display()
            ))
            .arg("-L")
            .arg(format!("dependency={}", kl.join("deps").display()))
            .arg("-C")
            .arg(format!("linker={KSITES_LD}"))
            .env("KSITES_LINKER", linker)
            .current_dir(d));
        assert!(o.status.success(), "{linker}: {}", text(&o.stderr));
        let data = std::fs::read(d.join(&out)).unwrap();
        assert_eq!(
            u16::from_le_bytes([data[16], data[17]]),
            object::elf::ET_DYN.0,
            "{linker}: not a PIE"
        );
        let v = run(Command::new(KSITES).arg("verify").arg(d.join(&out)));
        assert!(
            v.status.success() && text(&v.stdout).contains("ok (1 ifunc sites, 1 probe sites)"),
            "{linker}: verify: {}{}",
            text(&v.stdout),
            text(&v.stderr)
        );
        let i = run(Command::new(KSITES).arg("inspect").arg(d.join(&out)));
        let listing = text(&i.stdout);
        assert!(i.status.success(), "{linker}: inspect: {}", text(&i.stderr));
        assert!(listing.contains(": ELF Dyn "), "{linker}: {listing}");
        assert!(listing.contains("ifunc k::twice "), "{linker}: {listing}");
        assert!(listing.contains(" k::twice_soft"), "{linker}: {listing}");
        assert!(
            listing.contains("probe k:boot nargs=1 sites=1"),
            "{linker}: {listing}"
        );
        // readelf finds nothing wrong with the headers, and PT_DYNAMIC is still there.
        let r = run(Command::new("readelf").arg("-lW").arg(d.join(&out)));
        assert!(
            r.stderr.is_empty(),
            "{linker}: readelf: {}",
            text(&r.stderr)
        );
        assert!(text(&r.stdout).contains("DYNAMIC"), "{linker}");
    }
}
