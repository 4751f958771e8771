//! The static key fixture of `tests/keys.rs`: assembly for each architecture with the
//! contract's `.ksites_key_sites` records and `StaticKey` objects written out by hand
//! (so the build tool is tested against the bytes, not against a macro), and the
//! expected branch encodings, computed here independently of the tool.
#![allow(dead_code)]

use kernel_loader::cell::{CELL_MAGIC, CELL_SYMBOL};

/// How one architecture's fixture is written.
pub struct Arch {
    /// The gcc driver.
    pub gcc: &'static str,
    /// Key site length.
    pub site_len: u64,
    /// The NOP every key site is compiled as.
    pub nop: &'static [u8],
    /// Directives before a site's label (alignment).
    pub site_pre: &'static str,
    /// The site instruction.
    pub site_asm: &'static str,
    /// `return 0` and `return 1`.
    pub ret0: &'static str,
    pub ret1: &'static str,
    /// The section-type prefix (`@` or `%`).
    pub ty: &'static str,
    /// Directives at the top of the file.
    pub head: &'static str,
    /// The branch form of a site at `site` to `label`.
    pub branch: fn(u64, u64) -> Vec<u8>,
}

fn x86_jmp(site: u64, label: u64) -> Vec<u8> {
    let rel = i32::try_from(label as i64 - (site as i64 + 5)).unwrap();
    let mut v = vec![0xe9];
    v.extend_from_slice(&rel.to_le_bytes());
    v
}

fn a64_b(site: u64, label: u64) -> Vec<u8> {
    let off = label as i64 - site as i64;
    assert!(off % 4 == 0 && off.abs() < 128 << 20);
    (0x1400_0000u32 | ((off >> 2) as u32 & 0x03ff_ffff))
        .to_le_bytes()
        .to_vec()
}

fn rv_jal_x0(site: u64, label: u64) -> Vec<u8> {
    let off = label as i64 - site as i64;
    assert!(off % 2 == 0 && off.abs() < 1 << 20);
    let i = off as u32;
    let insn = 0x6f
        | ((i >> 20) & 1) << 31
        | ((i >> 1) & 0x3ff) << 21
        | ((i >> 11) & 1) << 20
        | ((i >> 12) & 0xff) << 12;
    insn.to_le_bytes().to_vec()
}

pub const X86_64: Arch = Arch {
    gcc: "gcc",
    site_len: 5,
    nop: &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    site_pre: "",
    site_asm: ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    ret0: "xor %eax, %eax\n    ret",
    ret1: "mov $1, %eax\n    ret",
    ty: "@",
    head: "",
    branch: x86_jmp,
};

pub const AARCH64: Arch = Arch {
    gcc: "aarch64-linux-gnu-gcc",
    site_len: 4,
    nop: &[0x1f, 0x20, 0x03, 0xd5],
    site_pre: "",
    site_asm: "nop",
    ret0: "mov w0, #0\n    ret",
    ret1: "mov w0, #1\n    ret",
    ty: "%",
    head: "",
    branch: a64_b,
};

pub const RISCV64: Arch = Arch {
    gcc: "riscv64-linux-gnu-gcc",
    site_len: 4,
    nop: &[0x13, 0, 0, 0],
    site_pre: "    .p2align 2\n",
    site_asm: "nop",
    ret0: "li a0, 0\n    ret",
    ret1: "li a0, 1\n    ret",
    ty: "@",
    head: "    .option norvc\n    .option norelax\n",
    branch: rv_jal_x0,
};

/// One site of the fixture, by its symbols.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    pub site: &'static str,
    pub label: &'static str,
    pub likely: bool,
    /// The key's name.
    pub key: &'static str,
    /// The key's index in the table.
    pub index: u32,
    /// The key's default (`None`: imported).
    pub default: Option<bool>,
}

impl Site {
    /// Whether `embed` gives the site its branch form: its key is defined and its
    /// default differs from its likeliness.
    pub fn jumps(&self) -> bool {
        self.default.is_some_and(|d| d != self.likely)
    }
}

/// The fixture's sites in record order (the module's has `s5`, a site of the imported
/// `kernel_key`, last; keys are indexed by name: `kernel_key`, `test::OFF`,
/// `test::ON`).
pub fn sites_of(module: bool) -> Vec<Site> {
    let i = u32::from(module);
    let off = |site, label, likely| Site {
        site,
        label,
        likely,
        key: "test::OFF",
        index: i,
        default: Some(false),
    };
    let on = |site, label, likely| Site {
        site,
        label,
        likely,
        key: "test::ON",
        index: i + 1,
        default: Some(true),
    };
    let mut v = vec![
        off("s1", "l1", false),
        on("s2", "l2", false),
        on("s3", "l3", true),
        off("s4", "l4", true),
        // Its label in another section (gcc's `.text.unlikely` for a cold path).
        on("s6", "c6", false),
    ];
    if module {
        v.push(Site {
            site: "s5",
            label: "l5",
            likely: false,
            key: "kernel_key",
            index: 0,
            default: None,
        });
    }
    v
}

/// The fixture: `_start` (s1), `f2` (s2, s3, s4, s6 with its label `c6` in
/// `.text.unlikely`), for a module `f3` (s5, whose key `kernel_key` is undefined), the
/// records, the two keys `test::OFF` (default false) and `test::ON` (default true) and,
/// for a linked image, the table cell.
pub fn fixture(a: &Arch, module: bool) -> String {
    let t = a.ty;
    let (pre, nop, r0, r1) = (a.site_pre, a.site_asm, a.ret0, a.ret1);
    let site = |s: &str| format!("{pre}{s}: {nop}\n");
    let mut o = String::new();
    o.push_str(a.head);
    o.push_str(&format!(
        "    .text\n    .globl _start\n    .type _start,{t}function\n_start:\n{}    {r0}\nl1: {r1}\n    .size _start, .-_start\n",
        site("s1")
    ));
    o.push_str(&format!(
        "    .globl f2\n    .type f2,{t}function\nf2:\n{}    {r0}\nl2: {r1}\n{}    {r1}\nl3: {r0}\n{}    {r1}\nl4: {r0}\n{}    {r0}\n    .size f2, .-f2\n",
        site("s2"),
        site("s3"),
        site("s4"),
        site("s6")
    ));
    if module {
        o.push_str(&format!(
            "    .globl f3\n    .type f3,{t}function\nf3:\n{}    {r0}\nl5: {r1}\n    .size f3, .-f3\n",
            site("s5")
        ));
    }
    o.push_str(&format!(
        "    .section .text.unlikely,\"ax\",{t}progbits\nc6: {r1}\n"
    ));
    o.push_str(&format!(
        "    .section .ksites_key_sites,\"awR\",{t}progbits\n    .p2align 3\n"
    ));
    let key_sym = |k: &str| match k {
        "test::OFF" => "key_off",
        "test::ON" => "key_on",
        _ => "kernel_key",
    };
    for s in sites_of(module) {
        o.push_str(&format!(
            "    .long 0x534b534b, {}\n    .quad {}, {}, {}\n",
            u32::from(s.likely),
            s.site,
            s.label,
            key_sym(s.key)
        ));
    }
    o.push_str(
        "    .data\n    .p2align 3\n    .globl key_off\nkey_off: .long 0x594b534b, 0\n    .quad name_off, 9\n    .long 0, 0\n    .globl key_on\nkey_on: .long 0x594b534b, 1\n    .quad name_on, 8\n    .long 1, 0\n    .section .rodata\nname_off: .ascii \"test::OFF\"\nname_on: .ascii \"test::ON\"\n");
    if !module {
        o.push_str(&format!(
            "    .section .data.cell,\"aw\",{t}progbits\n    .balign 8\n    .globl {CELL_SYMBOL}\n{CELL_SYMBOL}: .quad {CELL_MAGIC:#x}, 0, 0\n"
        ));
    }
    o
}
