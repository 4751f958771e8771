//! Passes the kernel's linker script to the linker with an absolute path, and compiles
//! the C code (dtrace-style probes in c/cprobes.c, a GNU ifunc in c/cifunc.c) with gcc.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=c/cprobes.c");
    println!("cargo:rerun-if-changed=c/cifunc.c");
    println!("cargo:rerun-if-changed=../../kernel-loader/c/ksites_sdt.h");

    cc::Build::new()
        .compiler("gcc")
        .file("c/cprobes.c")
        .file("c/cifunc.c")
        .include("../../kernel-loader/c")
        .pic(false)
        .opt_level(2)
        .flag("-ffreestanding")
        .flag("-fno-pie")
        .flag("-mcmodel=kernel")
        .flag("-mno-red-zone")
        .flag("-mno-sse")
        .flag("-mno-mmx")
        .flag("-mno-80387")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .warnings(true)
        .extra_warnings(true)
        .compile("cprobes");
}
