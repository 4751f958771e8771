/*
 * ksites_arch.h: the architecture-specific spellings the other ksites headers use.
 * Included by ksites_module.h and ksites_sdt.h; a new architecture adds its branch here
 * (e.g. `%progbits` on 32-bit ARM, where `@` starts a comment).
 *
 *   KSITES_PROGBITS   the `progbits` section type, as the assembler spells it
 */
#ifndef KSITES_ARCH_H
#define KSITES_ARCH_H

#if defined(__x86_64__)
#define KSITES_PROGBITS "@progbits"
#else
#error "ksites: unsupported architecture"
#endif

#endif
