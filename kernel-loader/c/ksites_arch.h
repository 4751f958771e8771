/*
 * ksites_arch.h: the architecture-specific spellings the other ksites headers use.
 * Included by ksites_module.h and ksites_sdt.h; a new architecture adds its branch here
 * (e.g. `%progbits` on 32-bit ARM, where `@` starts a comment).
 *
 *   KSITES_PROGBITS   the `progbits` section type, as the assembler spells it
 *   KSITES_PROGBITS_X the same inside an extended asm template (a `%` doubled)
 *   KSITES_KEY_SITE   a static-key site (ksites_key.h): the probe site NOP, labelled `1:`
 *                     (x86_64 `0f 1f 44 00 00`; aarch64 `nop`; riscv64 a 4-aligned
 *                     4-byte `nop`), as an asm string
 *   KSITES_KEY_ADDR   how an asm template prints operand 0, a key's address
 *                     constant (`%c0`: without the immediate prefix)
 *
 * aarch64 (kernel-loader's arch::aarch64): `ksites embed` rewrites `bl __dtrace_probe_*`
 * into `nop`, a tail `b __dtrace_probe_*` into `b ksites_probe_ret0`, and
 * `bl`/`b __dtraceenabled_*` into `bl`/`b ksites_probe_ret0`; enabling makes them `bl
 * ksites_probe_c_entry`, `brk #KSITES_PROBE_BRK_IMM` and `bl`/`b ksites_probe_ret1`
 * (each state one B/BL/NOP/BRK instruction, which the Arm ARM lets a CPU rewrite while
 * others run it). A kernel's synchronous exception handler passes a BRK whose ESR_EL1
 * has EC 0x3c and this comment to the loader (kernel-loader's `probe::handle_brk`, with
 * struct ksites_brk_frame), then writes pc back to ELR_EL1 and x0 to the saved x0.
 * Build C kernel code with -fno-pic -mgeneral-regs-only.
 *
 * riscv64 (kernel-loader's arch::riscv64::probe): gcc emits each probe as `call`/`tail`
 * (an 8-byte auipc+jalr pair, or a relaxed 4-byte jal). `ksites embed` rewrites the 8
 * bytes as `site; nop` (pair 4-aligned) or `c.nop; site; c.nop` (pair at 2 mod 4), so
 * the site is one 4-aligned 4-byte instruction: disabled `nop` (call), `ret` (tail),
 * `li a0, 0` (is-enabled call), `jal x0, ksites_probe_ret0` (is-enabled tail);
 * enabled `jal ra, ksites_probe_c_entry`, `ebreak`, `li a0, 1`, `jal x0,
 * ksites_probe_ret1` (a jal whose stub is beyond +-1 MiB is `ebreak` instead). Each
 * state is one aligned 32-bit store, then fence.i on every hart (Ziccif, mandatory in
 * RVA20 and later profiles, makes the fetch of an aligned instruction atomic). A kernel's trap
 * handler passes every breakpoint trap (scause 3) at a 4-aligned sepc to the loader,
 * which decides by the address; it must not check for an `ebreak` at sepc first, as a
 * live batch on another hart may already have rewritten the site (e.g. to `ret`)
 * (kernel-loader's `probe::handle_ebreak`, with struct ksites_ebreak_frame), then
 * writes pc back to sepc and ra, a0 to the saved ra, a0. Build C kernel code with
 * -fno-pic -mcmodel=medany -mno-relax: a probe site's 4-alignment is decided in the
 * object, and relaxing earlier calls in the same section would move it to 2 mod 4
 * (which the loader's table reader then refuses).
 */
#ifndef KSITES_ARCH_H
#define KSITES_ARCH_H

#include <stdint.h>

#if defined(__x86_64__)
#define KSITES_PROGBITS "@progbits"
#define KSITES_PROGBITS_X "@progbits"
#define KSITES_KEY_SITE "1: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
#define KSITES_KEY_ADDR "%c0"
#elif defined(__aarch64__)
#define KSITES_PROGBITS "%progbits"
#define KSITES_PROGBITS_X "%%progbits"
#define KSITES_KEY_SITE "1: nop"
#define KSITES_KEY_ADDR "%c0"
/* The `brk` comment of an enabled C tail probe site ("KS"). */
#define KSITES_PROBE_BRK_IMM 0x4b53
/* kernel-loader's aarch64 Int3Frame (the BRK frame): pc = ELR_EL1 (the brk itself),
 * lr = x30, then x0..x5; the loader writes back pc and x0. */
struct ksites_brk_frame {
    uint64_t pc;
    uint64_t lr;
    uint64_t x0, x1, x2, x3, x4, x5;
};
#elif defined(__riscv) && __riscv_xlen == 64
/* riscv64 (kernel-loader's arch::riscv64): `ksites embed` rewrites each `call`/`tail`
 * of __dtrace_probe_* / __dtraceenabled_* (an auipc+jalr pair, or a relaxed 4-aligned
 * jal) into one 4-aligned disabled instruction padded with nop/c.nop
 * (arch::riscv64::probe::c_site_disabled). Compile C code with probes with -mno-relax
 * (or link with --no-relax): a relaxed jal at 2 mod 4 cannot hold an aligned site. */
#define KSITES_PROGBITS "@progbits"
#define KSITES_PROGBITS_X "@progbits"
#define KSITES_KEY_SITE ".option push\n.p2align 2\n.option norvc\n1: nop\n.option pop"
#define KSITES_KEY_ADDR "%0"
/* A probe site's trap instruction: the 4-byte `ebreak`. */
#define KSITES_PROBE_EBREAK 0x00100073u
/* kernel-loader's riscv64 Int3Frame (the ebreak frame): pc = sepc (the ebreak itself),
 * ra, then a0..a5; the loader writes back pc, ra and a0. */
struct ksites_ebreak_frame {
    uint64_t pc;
    uint64_t ra;
    uint64_t a0, a1, a2, a3, a4, a5;
};
#else
#error "ksites: unsupported architecture"
#endif

#endif
