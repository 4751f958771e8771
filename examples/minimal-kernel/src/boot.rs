//! The boot stub: QEMU's PVH entry, 32-bit protected mode to 64-bit `kmain`.
//!
//! QEMU's `-kernel` loads each `PT_LOAD` segment at its address and jumps to the address
//! in the `XEN_ELFNOTE_PHYS32_ENTRY` note in 32-bit protected mode: paging off,
//! interrupts off, flat segments, `ebx` = the physical address of `hvm_start_info`, no
//! stack. The kernel is a PIE, so this code uses no absolute address: it finds itself
//! with `call`/`pop`, reaches everything relative to that, and builds its page tables
//! at run time. Then, in 64-bit mode, it applies the image's own `R_X86_64_RELATIVE`
//! relocations (`.rela.dyn`) before any Rust code reads a pointer from data.

use core::arch::global_asm;

global_asm!(
    // The PVH note: 4-aligned, name padded to 4. QEMU reads it before anything runs, so
    // it holds the entry's link address, which is where QEMU loads it: `__pvh_entry` is
    // that address as a plain number (linker.ld), which the PIE does not relocate.
    r#"
    .pushsection .note.pvh, "a", @note
    .p2align 2
    .long 4, 8, 18              /* namesz ("Xen\0"), descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .quad __pvh_entry
    .popsection
    "#,
    r#"
    .pushsection .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    /* Where are we? `call` needs a stack: borrow the first word of hvm_start_info
       (as Linux does) and put its value (the magic) back. */
    movl (%ebx), %eax
    leal 4(%ebx), %esp
    call 1f
1:  popl %ebp                   /* ebp = run-time address of 1b */
    movl %eax, (%ebx)
    movl %ebx, %esi             /* start_info, for kmain */

    /* Zero .bss (page tables and stack live there), then use the stack. */
    leal __bss_start - 1b(%ebp), %edi
    leal __bss_end - 1b(%ebp), %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    leal boot_stack_top - 1b(%ebp), %esp

    /* Page tables: identity-map the first 1 GiB with 2 MiB pages. */
    leal boot_pdpt - 1b(%ebp), %eax
    orl $3, %eax                /* present | writable */
    movl %eax, boot_pml4 - 1b(%ebp)
    leal boot_pd - 1b(%ebp), %eax
    orl $3, %eax
    movl %eax, boot_pdpt - 1b(%ebp)
    leal boot_pd - 1b(%ebp), %edi
    movl $0x83, %eax            /* present | writable | 2 MiB page */
    movl $512, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    /* Long mode: CR4.PAE, CR3, EFER.LME, then CR0.PG. */
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    leal boot_pml4 - 1b(%ebp), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0

    /* A GDT with a 64-bit code segment (0x08): its pointer gets the run-time base. */
    leal boot_gdt - 1b(%ebp), %eax
    movl %eax, boot_gdt_ptr + 2 - 1b(%ebp)
    lgdt boot_gdt_ptr - 1b(%ebp)
    /* Far jump to 64-bit code at a run-time address: lret pops eip, then cs. */
    leal start64 - 1b(%ebp), %eax
    pushl $0x08
    pushl %eax
    lret

    .code64
start64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq boot_stack_top(%rip), %rsp

    /* Self-relocate: delta = run-time address - link address. For each Elf64_Rela
       (offset, info, addend) of type R_X86_64_RELATIVE (8): *(offset + delta) =
       addend + delta. Another type means the image needs a dynamic linker: stop. */
    leaq __kernel_start(%rip), %rax
    movabsq $__kernel_link_start, %rdx
    subq %rdx, %rax
    leaq __rela_dyn_start(%rip), %rdx
    leaq __rela_dyn_end(%rip), %rcx
3:  cmpq %rcx, %rdx
    jae 4f
    cmpl $8, 8(%rdx)
    jne 6f                      /* not R_X86_64_RELATIVE: print why, halt */
    movq (%rdx), %rdi
    movq 16(%rdx), %r8
    addq %rax, %r8
    movq %r8, (%rdi, %rax)
    addq $24, %rdx
    jmp 3b

4:  movl %esi, %edi             /* kmain(start_info) */
    xorl %ebp, %ebp
    call kmain
5:  cli
    hlt
    jmp 5b
    /* A relocation other than R_X86_64_RELATIVE (e.g. a C GNU ifunc's IRELATIVE, which
       this stub does not handle): say so on COM1 instead of hanging silently. */
6:  leaq boot_bad_reloc(%rip), %rsi
    movw $0x3f8, %dx
7:  lodsb
    testb %al, %al
    jz 5b
    outb %al, %dx
    jmp 7b
    .popsection
    "#,
    r#"
    .pushsection .rodata.boot, "a", @progbits
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
boot_bad_reloc:
    .asciz "boot: a relocation other than R_X86_64_RELATIVE in .rela.dyn; halting\n"
    .popsection

    .pushsection .data.boot, "aw", @progbits
    .p2align 3
boot_gdt_ptr:                   /* limit, 32-bit base (filled in at run time) */
    .word 3 * 8 - 1
    .long 0
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .p2align 12
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
    .skip 65536
boot_stack_top:
    .popsection
    "#,
    options(att_syntax)
);
