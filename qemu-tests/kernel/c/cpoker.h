/*
 * The C test code's text poker (capi.c, cboot.c): writes text with CR0.WP clear on
 * this CPU, as a FreeBSD-style kernel patches, and serializes with CPUID. Only for
 * text no other CPU runs meanwhile (boot, or sites the tests alone execute).
 */
#ifndef CPOKER_H
#define CPOKER_H

#include "ksites.h"

#define CR0_WP (1UL << 16)

static inline unsigned long read_cr0(void)
{
    unsigned long v;
    __asm__ volatile("mov %%cr0, %0" : "=r"(v));
    return v;
}

static inline void write_cr0(unsigned long v)
{
    __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory");
}

/* What the poker did. */
struct wp_poker {
    unsigned long writes, syncs, begins, ends;
};

static inline int wp_begin(void *ctx)
{
    ((struct wp_poker *)ctx)->begins++;
    write_cr0(read_cr0() & ~CR0_WP);
    return 0;
}

static inline int wp_write(void *ctx, uint64_t addr, const uint8_t *bytes, size_t len)
{
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
    for (size_t i = 0; i < len; i++)
        p[i] = bytes[i];
    ((struct wp_poker *)ctx)->writes++;
    return 0;
}

static inline void wp_sync_cores(void *ctx)
{
    unsigned int a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
    ((struct wp_poker *)ctx)->syncs++;
}

static inline void wp_end(void *ctx)
{
    write_cr0(read_cr0() | CR0_WP);
    ((struct wp_poker *)ctx)->ends++;
}

/* A struct ksites_poker over `state`. */
static inline struct ksites_poker wp_poker(struct wp_poker *state)
{
    struct ksites_poker p = {state, wp_begin, wp_write, wp_sync_cores, wp_end};
    return p;
}

#endif
