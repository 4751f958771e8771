//! Entry points and the trap vector, in assembly.
//!
//! * `_start`: OpenSBI (`-bios default`) enters here in S-mode on the boot hart, with
//!   `a0` = its hart id and `a1` = the device tree's physical address, paging off. The
//!   boot hart is whichever won OpenSBI's lottery, not necessarily hart 0: it becomes
//!   CPU 0 (`tp` = 0). Interrupts off, FP state on (`sstatus.FS` = Initial: compiled
//!   Rust may use the f registers), the boot stack, `.bss` zeroed, `stvec` set, then
//!   `kmain(hartid, dtb)` (Rust, paging still off).
//! * `_secondary_start`: where SBI HSM `hart_start` starts another hart, with `a0` = its
//!   hart id and `a1` = the CPU index CPU 0 gave it (`tp`, and the stack
//!   `STACKS[index]`). Turns paging on from `MMU_SATP` before any Rust runs, then
//!   `secondary_main(hartid)`.
//! * `trap_vector` (direct mode, every trap): saves x1..x31 into a
//!   [`TrapFrame`](super::exceptions::TrapFrame) on the stack with `sepc`, `sstatus`,
//!   `scause` and `stval`, and, when `sstatus.FS` is not Off, f0..f31 and `fcsr` (the
//!   handlers are compiled Rust and may use them); calls `riscv64_trap`, then restores
//!   everything (`sepc` and `sstatus` as the handler may have changed them) and `sret`s.

use super::smp::{MAX_CPUS, STACK_SIZE};

/// Bytes of the boot stack of CPU 0.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack([u8; BOOT_STACK_SIZE]);

/// CPU 0's stack (`_start` points `sp` at its end).
#[unsafe(no_mangle)]
static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// The other harts' stacks, by CPU index (`_secondary_start` takes the top of its own;
/// index 0 is unused: CPU 0 runs on [`BOOT_STACK`]).
#[unsafe(no_mangle)]
static mut SECONDARY_STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

/// `satp` of the kernel's page tables, for the other harts (written by `mmu::init`
/// before any of them starts).
#[unsafe(no_mangle)]
pub static mut MMU_SATP: u64 = 0;

/// The stack CPU `cpu` runs on, as an address range (for fault reports).
pub fn stack_of(cpu: usize) -> core::ops::Range<u64> {
    let (base, size) = if cpu == 0 {
        (core::ptr::addr_of!(BOOT_STACK) as u64, BOOT_STACK_SIZE)
    } else {
        let all = core::ptr::addr_of!(SECONDARY_STACKS) as u64;
        (all + (cpu * STACK_SIZE) as u64, STACK_SIZE)
    };
    base..base + size as u64
}

const _: () = assert!(STACK_SIZE.is_power_of_two());

/// `sstatus.FS` = Initial.
const SSTATUS_FS_INITIAL: u64 = 1 << 13;

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    csrw sie, zero
    csrci sstatus, 2
    li t0, {fs_initial}
    csrs sstatus, t0
    csrw fcsr, zero
    lla sp, BOOT_STACK
    li t0, {boot_stack}
    add sp, sp, t0
    li tp, 0
    lla t0, __bss_start
    lla t1, __bss_end
1:  bgeu t0, t1, 2f
    sd zero, 0(t0)
    addi t0, t0, 8
    j 1b
2:  lla t0, trap_vector
    csrw stvec, t0
    call kmain
3:  wfi
    j 3b

    .text
    .global _secondary_start
    .balign 4
_secondary_start:
    csrw sie, zero
    csrci sstatus, 2
    li t0, {fs_initial}
    csrs sstatus, t0
    csrw fcsr, zero
    mv tp, a1
    lla sp, SECONDARY_STACKS
    addi t1, a1, 1
    slli t1, t1, {stack_shift}
    add sp, sp, t1
    lla t0, trap_vector
    csrw stvec, t0
    lla t0, MMU_SATP
    ld t0, 0(t0)
    sfence.vma
    csrw satp, t0
    sfence.vma
    call secondary_main
4:  wfi
    j 4b

    /* Module-level assembly does not get the target's features: name the FP ones. */
    .option push
    .option arch, +d
    .balign 4
    .global trap_vector
trap_vector:
    addi sp, sp, -{frame}
    sd x1, 8(sp)
    sd x3, 24(sp)
    sd x4, 32(sp)
    sd x5, 40(sp)
    sd x6, 48(sp)
    sd x7, 56(sp)
    sd x8, 64(sp)
    sd x9, 72(sp)
    sd x10, 80(sp)
    sd x11, 88(sp)
    sd x12, 96(sp)
    sd x13, 104(sp)
    sd x14, 112(sp)
    sd x15, 120(sp)
    sd x16, 128(sp)
    sd x17, 136(sp)
    sd x18, 144(sp)
    sd x19, 152(sp)
    sd x20, 160(sp)
    sd x21, 168(sp)
    sd x22, 176(sp)
    sd x23, 184(sp)
    sd x24, 192(sp)
    sd x25, 200(sp)
    sd x26, 208(sp)
    sd x27, 216(sp)
    sd x28, 224(sp)
    sd x29, 232(sp)
    sd x30, 240(sp)
    sd x31, 248(sp)
    addi t0, sp, {frame}
    sd t0, 16(sp)
    csrr t0, sepc
    sd t0, 256(sp)
    csrr t1, sstatus
    sd t1, 264(sp)
    csrr t0, scause
    sd t0, 272(sp)
    csrr t0, stval
    sd t0, 280(sp)
    srli t1, t1, 13
    andi t1, t1, 3
    beqz t1, 5f
    fsd f0, 288(sp)
    fsd f1, 296(sp)
    fsd f2, 304(sp)
    fsd f3, 312(sp)
    fsd f4, 320(sp)
    fsd f5, 328(sp)
    fsd f6, 336(sp)
    fsd f7, 344(sp)
    fsd f8, 352(sp)
    fsd f9, 360(sp)
    fsd f10, 368(sp)
    fsd f11, 376(sp)
    fsd f12, 384(sp)
    fsd f13, 392(sp)
    fsd f14, 400(sp)
    fsd f15, 408(sp)
    fsd f16, 416(sp)
    fsd f17, 424(sp)
    fsd f18, 432(sp)
    fsd f19, 440(sp)
    fsd f20, 448(sp)
    fsd f21, 456(sp)
    fsd f22, 464(sp)
    fsd f23, 472(sp)
    fsd f24, 480(sp)
    fsd f25, 488(sp)
    fsd f26, 496(sp)
    fsd f27, 504(sp)
    fsd f28, 512(sp)
    fsd f29, 520(sp)
    fsd f30, 528(sp)
    fsd f31, 536(sp)
    frcsr t0
    sd t0, 544(sp)
5:  mv a0, sp
    call riscv64_trap
    ld t1, 264(sp)
    srli t2, t1, 13
    andi t2, t2, 3
    beqz t2, 6f
    ld t0, 544(sp)
    fscsr t0
    fld f0, 288(sp)
    fld f1, 296(sp)
    fld f2, 304(sp)
    fld f3, 312(sp)
    fld f4, 320(sp)
    fld f5, 328(sp)
    fld f6, 336(sp)
    fld f7, 344(sp)
    fld f8, 352(sp)
    fld f9, 360(sp)
    fld f10, 368(sp)
    fld f11, 376(sp)
    fld f12, 384(sp)
    fld f13, 392(sp)
    fld f14, 400(sp)
    fld f15, 408(sp)
    fld f16, 416(sp)
    fld f17, 424(sp)
    fld f18, 432(sp)
    fld f19, 440(sp)
    fld f20, 448(sp)
    fld f21, 456(sp)
    fld f22, 464(sp)
    fld f23, 472(sp)
    fld f24, 480(sp)
    fld f25, 488(sp)
    fld f26, 496(sp)
    fld f27, 504(sp)
    fld f28, 512(sp)
    fld f29, 520(sp)
    fld f30, 528(sp)
    fld f31, 536(sp)
6:  ld t0, 256(sp)
    csrw sepc, t0
    csrw sstatus, t1
    ld x1, 8(sp)
    ld x3, 24(sp)
    ld x4, 32(sp)
    ld x5, 40(sp)
    ld x6, 48(sp)
    ld x7, 56(sp)
    ld x8, 64(sp)
    ld x9, 72(sp)
    ld x10, 80(sp)
    ld x11, 88(sp)
    ld x12, 96(sp)
    ld x13, 104(sp)
    ld x14, 112(sp)
    ld x15, 120(sp)
    ld x16, 128(sp)
    ld x17, 136(sp)
    ld x18, 144(sp)
    ld x19, 152(sp)
    ld x20, 160(sp)
    ld x21, 168(sp)
    ld x22, 176(sp)
    ld x23, 184(sp)
    ld x24, 192(sp)
    ld x25, 200(sp)
    ld x26, 208(sp)
    ld x27, 216(sp)
    ld x28, 224(sp)
    ld x29, 232(sp)
    ld x30, 240(sp)
    ld x31, 248(sp)
    addi sp, sp, {frame}
    sret
    .option pop
"#,
    fs_initial = const SSTATUS_FS_INITIAL,
    boot_stack = const BOOT_STACK_SIZE,
    stack_shift = const STACK_SIZE.trailing_zeros(),
    frame = const core::mem::size_of::<super::exceptions::TrapFrame>(),
);
