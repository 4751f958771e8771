//! PVH entry: from 32-bit protected mode to long mode and `kmain`.
//!
//! QEMU's `-kernel` loads an ELF image that carries a `XEN_ELFNOTE_PHYS32_ENTRY` note and
//! jumps to the address in that note with the CPU in 32-bit protected mode, paging off,
//! interrupts off, flat 4 GiB segments and `%ebx` holding the physical address of the
//! `hvm_start_info` structure. The stub here:
//!
//! 1. enables PAE and points CR3 at static boot page tables (in `.data`, so zeroing
//!    `.bss` cannot clobber them) that identity-map the first 1 GiB with 2 MiB pages;
//! 2. sets EFER.LME, and EFER.NXE when the CPU has NX; turns paging on;
//! 3. loads a 64-bit GDT and far-jumps to 64-bit code;
//! 4. loads the data segments, zeroes `.bss`, switches to a 64 KiB stack in `.bss` and
//!    calls `kmain(start_info)`.
//!
//! [`crate::paging::init`] later replaces the boot tables with the kernel's own.
//!
//! The GDT has two spare slots at selector [`TSS_SELECTOR`] that [`crate::idt::init`]
//! fills with a TSS descriptor (for the double-fault stack).

use core::arch::global_asm;

/// 64-bit kernel code segment selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the (initially empty) 16-byte TSS descriptor in [`boot_gdt`].
pub const TSS_SELECTOR: u16 = 0x18;
/// `hvm_start_info.magic` ("xEn3" with the high bit set on the 'x').
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

unsafe extern "C" {
    /// The boot GDT: null, code64, data, then two zeroed slots for a TSS descriptor.
    pub static mut boot_gdt: [u64; 5];
    /// Lowest address of the boot stack (64 KiB); the page below it is a guard page.
    pub static boot_stack_bottom: u8;
    /// One past the highest address of the boot stack.
    pub static boot_stack_top: u8;
    /// The 4 KiB guard page below the boot stack, left unmapped by [`crate::paging`].
    pub static boot_stack_guard: u8;
}

global_asm!(
    // The PVH note. QEMU finds the entry at note header + 12 + ALIGN_UP(namesz, p_align),
    // so the note (and thus its PT_NOTE) must be 4-aligned and the name padded to 4.
    r#"
    .pushsection .note.pvh, "a", @note
    .p2align 2
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32
    .p2align 2
    .popsection
    "#,
    // 32-bit entry.
    r#"
    .pushsection .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    movl %ebx, %esi             /* start_info; CPUID below clobbers %ebx */

    lgdt boot_gdt_ptr

    movl %cr4, %eax
    orl $(1 << 5), %eax         /* CR4.PAE */
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.NXE only when CPUID.80000001H:EDX.NX[20]; setting it otherwise is a #GP. */
    xorl %edi, %edi
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 1f
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 20), %edx
    jz 1f
    movl $(1 << 11), %edi
1:
    movl $0xc0000080, %ecx      /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax         /* LME */
    orl %edi, %eax              /* NXE, if supported */
    wrmsr

    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0

    ljmp $0x08, $pvh_start64
    .size pvh_start32, . - pvh_start32
    "#,
    // 64-bit continuation.
    r#"
    .code64
    .type pvh_start64, @function
pvh_start64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs

    /* Zero .bss (the stack and the kernel's page tables live there). */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb

    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp             /* terminates the frame-pointer chain */
    movl %esi, %edi             /* zero-extends start_info into the first argument */
    call kmain
2:
    cli
    hlt
    jmp 2b
    .size pvh_start64, . - pvh_start64
    .popsection
    "#,
    // Boot page tables and GDT: in .data, never zeroed.
    r#"
    .pushsection .data.boot, "aw", @progbits
    .p2align 12
boot_pml4:
    .quad boot_pdpt + 0x3       /* present | writable */
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x3
    .fill 511, 8, 0
boot_pd:
    .set .Lpage, 0
    .rept 512
    .quad (.Lpage << 21) | 0x83 /* present | writable | 2 MiB */
    .set .Lpage, .Lpage + 1
    .endr

    .p2align 3
    .globl boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, DPL 0, accessed */
    .quad 0x00cf93000000ffff    /* 0x10: data, DPL 0, accessed */
    .quad 0                     /* 0x18: TSS descriptor (16 bytes), see idt::init */
    .quad 0
.Lboot_gdt_end:
    .p2align 3
    .word 0
    .word 0
    .word 0
boot_gdt_ptr:                   /* limit, then a base lgdt reads as 32 or 64 bits */
    .word .Lboot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection
    "#,
    // The boot stack, with a guard page below it.
    r#"
    .pushsection .bss.boot_stack, "aw", @nobits
    .p2align 12
    .globl boot_stack_guard
boot_stack_guard:
    .skip 4096
    .globl boot_stack_bottom
boot_stack_bottom:
    .skip 65536
    .globl boot_stack_top
boot_stack_top:
    .popsection
    "#,
    options(att_syntax)
);
