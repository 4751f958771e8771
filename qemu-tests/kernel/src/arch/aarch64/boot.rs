//! Entry points and the exception vector table, in assembly.
//!
//! * `_start`: QEMU `virt` enters here at EL1 on CPU 0 (`-kernel` ELF, no firmware; the
//!   other CPUs start powered off, waiting for PSCI `CPU_ON`). Interrupts masked, the
//!   boot stack, FP/AdvSIMD enabled (CPACR_EL1.FPEN: compiled Rust may use the vector
//!   registers), `.bss` zeroed, VBAR_EL1 set, then `kmain` (Rust, MMU still off).
//! * `_secondary_start`: where PSCI `CPU_ON` starts another CPU, with `x0` = the context
//!   CPU 0 passed (its stack top). Turns the MMU on from `MMU_REGS` before any Rust runs,
//!   then `secondary_main`.
//! * `exception_vectors`: 16 entries of 0x80 bytes (2 KiB aligned). Each saves x0..x30
//!   into an [`ExceptionFrame`](super::exceptions::ExceptionFrame) on the stack, the
//!   common tail adds ELR/SPSR/ESR/FAR and calls `aarch64_exception`, then restores
//!   (ELR and SPSR as the handler may have changed them) and `eret`s.

/// Bytes of the boot stack of CPU 0.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack([u8; BOOT_STACK_SIZE]);

/// CPU 0's stack (`_start` points `sp` at its end).
#[unsafe(no_mangle)]
static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    msr daifset, #0xf
    adrp x1, BOOT_STACK
    add x1, x1, :lo12:BOOT_STACK
    mov x2, #{stack_size}
    add x1, x1, x2
    mov sp, x1
    mov x1, #(3 << 20)
    msr CPACR_EL1, x1
    isb
    adrp x1, __bss_start
    add x1, x1, :lo12:__bss_start
    adrp x2, __bss_end
    add x2, x2, :lo12:__bss_end
1:  cmp x1, x2
    b.hs 2f
    stp xzr, xzr, [x1], #16
    b 1b
2:  adrp x1, exception_vectors
    add x1, x1, :lo12:exception_vectors
    msr VBAR_EL1, x1
    isb
    bl kmain
3:  wfe
    b 3b

    .global _secondary_start
_secondary_start:
    msr daifset, #0xf
    mov sp, x0
    mov x1, #(3 << 20)
    msr CPACR_EL1, x1
    isb
    adrp x1, exception_vectors
    add x1, x1, :lo12:exception_vectors
    msr VBAR_EL1, x1
    adrp x1, MMU_REGS
    add x1, x1, :lo12:MMU_REGS
    ldp x2, x3, [x1]
    ldp x4, x5, [x1, #16]
    msr MAIR_EL1, x2
    msr TCR_EL1, x3
    msr TTBR0_EL1, x4
    isb
    tlbi vmalle1
    dsb nsh
    isb
    msr SCTLR_EL1, x5
    isb
    bl secondary_main
4:  wfe
    b 4b

    .macro VECTOR kind
    .balign 0x80
    sub sp, sp, #{frame}
    stp x0, x1, [sp, #0]
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    str x30, [sp, #240]
    mov x1, #\kind
    b exception_common
    .endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global exception_vectors
exception_vectors:
    VECTOR 0
    VECTOR 1
    VECTOR 2
    VECTOR 3
    VECTOR 4
    VECTOR 5
    VECTOR 6
    VECTOR 7
    VECTOR 8
    VECTOR 9
    VECTOR 10
    VECTOR 11
    VECTOR 12
    VECTOR 13
    VECTOR 14
    VECTOR 15

exception_common:
    mrs x2, ELR_EL1
    mrs x3, SPSR_EL1
    stp x2, x3, [sp, #248]
    mrs x2, ESR_EL1
    mrs x3, FAR_EL1
    stp x2, x3, [sp, #264]
    str x1, [sp, #280]
    /* The handlers are compiled Rust (and the loader's BRK route), which may use the
       FP/SIMD registers: save q0-q31, FPSR and FPCR of the interrupted code below the
       frame, and restore them before returning. */
    sub sp, sp, #528
    stp q0, q1, [sp, #0]
    stp q2, q3, [sp, #32]
    stp q4, q5, [sp, #64]
    stp q6, q7, [sp, #96]
    stp q8, q9, [sp, #128]
    stp q10, q11, [sp, #160]
    stp q12, q13, [sp, #192]
    stp q14, q15, [sp, #224]
    stp q16, q17, [sp, #256]
    stp q18, q19, [sp, #288]
    stp q20, q21, [sp, #320]
    stp q22, q23, [sp, #352]
    stp q24, q25, [sp, #384]
    stp q26, q27, [sp, #416]
    stp q28, q29, [sp, #448]
    stp q30, q31, [sp, #480]
    mrs x2, FPSR
    mrs x3, FPCR
    str x2, [sp, #512]
    str x3, [sp, #520]
    add x0, sp, #528
    bl aarch64_exception
    ldr x2, [sp, #512]
    ldr x3, [sp, #520]
    msr FPSR, x2
    msr FPCR, x3
    ldp q0, q1, [sp, #0]
    ldp q2, q3, [sp, #32]
    ldp q4, q5, [sp, #64]
    ldp q6, q7, [sp, #96]
    ldp q8, q9, [sp, #128]
    ldp q10, q11, [sp, #160]
    ldp q12, q13, [sp, #192]
    ldp q14, q15, [sp, #224]
    ldp q16, q17, [sp, #256]
    ldp q18, q19, [sp, #288]
    ldp q20, q21, [sp, #320]
    ldp q22, q23, [sp, #352]
    ldp q24, q25, [sp, #384]
    ldp q26, q27, [sp, #416]
    ldp q28, q29, [sp, #448]
    ldp q30, q31, [sp, #480]
    add sp, sp, #528
    ldp x2, x3, [sp, #248]
    msr ELR_EL1, x2
    msr SPSR_EL1, x3
    ldp x0, x1, [sp, #0]
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    ldr x30, [sp, #240]
    add sp, sp, #{frame}
    eret
"#,
    stack_size = const BOOT_STACK_SIZE,
    frame = const core::mem::size_of::<super::exceptions::ExceptionFrame>(),
);
