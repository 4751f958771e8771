//! Every x86-64 encoding and relocation type `ksites embed` writes or expects: the
//! disabled forms of C probe sites, the trampoline's `jmp [rip+slot]`, where a rel32
//! lies in a branch, the relocation types of record pointers, table fields and
//! rewritten probe calls, and the SystemTap argument registers. The rest of
//! [`super`] uses these names only.

use kernel_loader::arch::x86_64::reloc;
use kernel_loader::arch::x86_64::{JMP_RIP_INDIRECT, NOP5};

/// Bytes of an ifunc trampoline.
pub(super) use kernel_loader::arch::x86_64::TRAMPOLINE_LEN;
use kernel_loader::format::{PROBE_SITE_LEN, ProbeKind};
use kernel_loader::probe::{C_ENABLED_OFF, C_TAIL_OFF};

/// `R_X86_64_NONE`: what a rewritten probe call's relocation becomes.
pub(super) const RELOC_NONE: u32 = reloc::NONE;
/// `R_X86_64_64`: the pointer fields of ifunc, import and probe records.
pub(super) const RECORD_POINTER: u32 = reloc::ABS64;
/// `R_X86_64_PC32`: every self-relative field of a module's table (`.rela.ksites`).
pub(super) const TABLE_FIELD: u32 = reloc::TABLE_FIELD;

/// Applies a table-field relocation (`S + A - P`, 32-bit, overflow checked) to the
/// start of `place`, as the module loader does.
pub(super) fn apply_table_field(
    place: &mut [u8],
    s: u64,
    a: i64,
    p: u64,
) -> Result<(), reloc::RelocError> {
    reloc::apply(TABLE_FIELD, place, s, a, p)
}

/// Whether `r_type` is a place-relative 32-bit reference (`PC32` or `PLT32`), the
/// relocation of a `call`/`jmp` to a symbol.
pub(super) fn is_rel32(r_type: u32) -> bool {
    reloc::is_rel32(r_type)
}

/// The relocation's name.
pub(super) fn reloc_name(r_type: u32) -> &'static str {
    reloc::name(r_type)
}

/// Offset of the rel32 field in a probe site's 5-byte branch (after the opcode).
pub(super) const SITE_REL32_AT: u64 = 1;
/// A rel32 is relative to the end of its instruction, 4 bytes after the field: the
/// engine sees target `S + A + 4`, and a relocation to `sym` has addend `-4`.
pub(super) const REL32_BIAS: i64 = 4;

/// What a `probe!` site holds before it is enabled (the 5-byte NOP).
pub(super) fn is_disabled_rust_site(bytes: &[u8]) -> bool {
    bytes == NOP5
}

/// The disabled form of a C probe site of `kind`, or `None` for a Rust site (its
/// bytes are already disabled). A C is-enabled tail call becomes `jmp` with a zero
/// rel32, filled by its relocation ([`stub_tail_reloc`]).
pub(super) fn disabled_c_site(kind: ProbeKind) -> Option<[u8; PROBE_SITE_LEN]> {
    Some(match kind {
        ProbeKind::CCall => NOP5,
        ProbeKind::CTail => C_TAIL_OFF,
        ProbeKind::CEnabled => C_ENABLED_OFF,
        ProbeKind::CEnabledTail => [0xe9, 0, 0, 0, 0],
        ProbeKind::RustJmp | ProbeKind::RustEnabled => return None,
    })
}

/// The relocation (type, addend) of a disabled C is-enabled tail call's `jmp` to the
/// `ret0` stub: `R_X86_64_PLT32` to the stub, addend -4.
pub(super) fn stub_tail_reloc() -> (u32, i64) {
    (reloc::BRANCH32, -REL32_BIAS)
}

/// The trampoline's instruction, for messages.
pub(super) const TRAMPOLINE_ASM: &str = "jmp [rip+slot]";

/// Offset of the disp32 in a trampoline `jmp [rip+slot]` (after `ff 25`).
pub(super) const TRAMPOLINE_DISP_AT: u64 = 2;

/// Whether `bytes` (a trampoline) start with `jmp [rip+disp32]`.
pub(super) fn is_trampoline_jump(bytes: &[u8]) -> bool {
    bytes.get(..2) == Some(&JMP_RIP_INDIRECT[..])
}

/// Where a C probe's six arguments are at the call (SysV), for SystemTap notes.
pub(super) const STAPSDT_ARG_REGS: [&str; 6] = ["%rdi", "%rsi", "%rdx", "%rcx", "%r8", "%r9"];
