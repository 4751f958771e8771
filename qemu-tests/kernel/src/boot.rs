//! PVH entry: from 32-bit protected mode to long mode and `kmain`, wherever the image
//! was loaded.
//!
//! QEMU's `-kernel` loads an ELF image that carries a `XEN_ELFNOTE_PHYS32_ENTRY` note
//! (each `PT_LOAD` at its `p_paddr`) and jumps to the address in that note with the CPU
//! in 32-bit protected mode, paging off, interrupts off, flat 4 GiB segments, no stack,
//! and `%ebx` holding the physical address of the `hvm_start_info` structure. The stub
//! is position independent (the rust-lld kernel is a PIE, and one QEMU run loads it
//! 8 MiB above its link address); it:
//!
//! 1. finds its run-time address (`call`/`pop`), writes the links of the static boot
//!    page tables (in `.data`, so zeroing `.bss` cannot clobber them; they identity-map
//!    the first 1 GiB with 2 MiB pages) and the GDT pointer's base, enables PAE and
//!    points CR3 at them;
//! 2. sets EFER.LME, and EFER.NXE when the CPU has NX; turns paging on;
//! 3. loads a 64-bit GDT and far-returns to 64-bit code;
//! 4. loads the data segments, zeroes `.bss`, switches to a 64 KiB stack in `.bss`;
//! 5. relocates the image: applies `.rela.dyn` with the load delta ([`load_address`]);
//! 6. calls `kmain(start_info)`.
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
    /// Run-time minus link-time address of the image, written once by the boot stub.
    static boot_load_delta: u64;
    /// The first byte of the image, at its run-time address (linker.ld).
    static __kernel_start: u8;
}

/// Where the image runs: its first byte's run-time address, the address it was linked
/// at, and the difference the boot stub relocated it by (0 at the link address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadAddress {
    /// Run-time address of `__kernel_start`.
    pub runtime: u64,
    /// Link-time address of `__kernel_start`.
    pub link: u64,
    /// `runtime - link` (wrapping).
    pub delta: u64,
}

/// Where the boot stub found the image (see [`LoadAddress`]).
pub fn load_address() -> LoadAddress {
    let runtime = (&raw const __kernel_start) as u64;
    // SAFETY: written once by the boot stub before kmain, only read afterwards.
    let delta = unsafe { (&raw const boot_load_delta).read() };
    LoadAddress {
        runtime,
        link: runtime.wrapping_sub(delta),
        delta,
    }
}

global_asm!(
    // The PVH note. QEMU finds the entry at note header + 12 + ALIGN_UP(namesz, p_align),
    // so the note (and thus its PT_NOTE) must be 4-aligned and the name padded to 4. The
    // entry is the *link* address, an absolute symbol (linker.ld) so that a PIE needs no
    // dynamic relocation in this read-only note; a boot loader that places the image
    // elsewhere moves the entry with it (QEMU loads at p_paddr and jumps to this value).
    r#"
    .pushsection .note.pvh, "a", @note
    .p2align 2
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad __pvh_entry_link
    .p2align 2
    .popsection
    "#,
    // 32-bit entry. Position independent: %ebp holds the run-time address of label 1
    // and every address is `sym - 1b(%ebp)` (a PC32 relocation), so the stub works
    // wherever the image was loaded.
    r#"
    .pushsection .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    /* No stack yet: borrow hvm_start_info.magic (4 bytes at %ebx) as one for the call
       that finds where the stub runs, and put the magic back (Linux does the same). */
    movl (%ebx), %edx
    leal 4(%ebx), %esp
    call 1f
1:
    popl %ebp
    movl %edx, (%ebx)
    movl %ebx, %esi             /* start_info; CPUID below clobbers %ebx */
    leal (boot_stack_top - 1b)(%ebp), %esp

    /* The boot tables' links and the GDT pointer's base hold run-time addresses. */
    leal (boot_pdpt - 1b + 3)(%ebp), %eax   /* present | writable */
    movl %eax, (boot_pml4 - 1b)(%ebp)
    leal (boot_pd - 1b + 3)(%ebp), %eax
    movl %eax, (boot_pdpt - 1b)(%ebp)
    leal (boot_gdt - 1b)(%ebp), %eax
    movl %eax, (boot_gdt_ptr + 2 - 1b)(%ebp)
    lgdt (boot_gdt_ptr - 1b)(%ebp)

    movl %cr4, %eax
    orl $(1 << 5), %eax         /* CR4.PAE */
    movl %eax, %cr4

    leal (boot_pml4 - 1b)(%ebp), %eax
    movl %eax, %cr3

    /* EFER.NXE only when CPUID.80000001H:EDX.NX[20]; setting it otherwise is a #GP. */
    xorl %edi, %edi
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 2f
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 20), %edx
    jz 2f
    movl $(1 << 11), %edi
2:
    movl $0xc0000080, %ecx      /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax         /* LME */
    orl %edi, %eax              /* NXE, if supported */
    wrmsr

    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0

    /* Far return to the 64-bit code segment at the run-time pvh_start64. */
    leal (pvh_start64 - 1b)(%ebp), %eax
    pushl $0x08
    pushl %eax
    lret
    .size pvh_start32, . - pvh_start32
    "#,
    // 64-bit continuation: zero .bss, apply the image's own dynamic relocations, call
    // kmain.
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
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    leaq boot_stack_top(%rip), %rsp

    /* Self-relocation, before any Rust code reads a pointer from data: the load
       delta is where __kernel_start is minus where it was linked. A PIE's .rela.dyn
       holds R_X86_64_RELATIVE entries (*(r_offset + delta) = r_addend + delta),
       applied at every boot (lld leaves the words themselves 0), and GNU ifuncs'
       R_X86_64_IRELATIVE. The stub moves every IRELATIVE slot by the delta
       (*(r_offset + delta) += delta) without looking at the table: `ksites embed`
       made each called GNU ifunc's slot hold its trampoline's link-time address, the
       "default" the ksites loader checks for and later resolves. (A GNU ifunc whose
       address is only taken, never called, is not in the table; its IRELATIVE would
       need its resolver run, which this kernel never does: it has none.) Anything else is reported on COM1 and the CPU
       halts. A static ET_EXEC has only the IRELATIVE ones, and delta 0. */
    leaq __kernel_start(%rip), %rax
    movabsq $__kernel_link_start, %rdx
    subq %rdx, %rax
    movq %rax, boot_load_delta(%rip)
    leaq __rela_dyn_start(%rip), %rbx
    leaq __rela_dyn_end(%rip), %rcx
3:
    cmpq %rcx, %rbx
    jae 5f
    movq (%rbx), %rdi           /* r_offset */
    movl 8(%rbx), %edx          /* ELF64_R_TYPE(r_info) */
    cmpl $37, %edx              /* R_X86_64_IRELATIVE */
    je 9f
    cmpl $8, %edx               /* R_X86_64_RELATIVE */
    jne 6f
    movq 16(%rbx), %rdx         /* r_addend */
    addq %rax, %rdx
    movq %rdx, (%rax, %rdi)
    jmp 4f
9:
    addq %rax, (%rax, %rdi)
4:
    addq $24, %rbx
    jmp 3b
5:
    xorl %ebp, %ebp             /* terminates the frame-pointer chain */
    movl %esi, %edi             /* zero-extends start_info into the first argument */
    call kmain
    jmp 8f
6:
    /* An unsupported dynamic relocation: say so on COM1 (no set-up needed under QEMU). */
    leaq boot_reloc_error(%rip), %rsi
    movw $0x3f8, %dx
7:
    lodsb
    testb %al, %al
    jz 8f
    outb %al, %dx
    jmp 7b
8:
    cli
    hlt
    jmp 8b
    .size pvh_start64, . - pvh_start64
    .popsection

    .pushsection .rodata.boot, "a", @progbits
boot_reloc_error:
    .asciz "boot: unsupported dynamic relocation type in .rela.dyn; halting\r\n"
    .popsection
    "#,
    // Boot page tables and GDT: in .data, never zeroed. The links between the tables
    // and the GDT pointer's base are written by the stub (run-time addresses).
    r#"
    .pushsection .data.boot, "aw", @progbits
    .p2align 12
boot_pml4:
    .quad 0                     /* -> boot_pdpt */
    .fill 511, 8, 0
boot_pdpt:
    .quad 0                     /* -> boot_pd */
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
    .quad 0                     /* boot_gdt */

    .p2align 3
    .globl boot_load_delta
boot_load_delta:
    .quad 0
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
