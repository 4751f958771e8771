/*
 * farmod: an aarch64-only C test module the kernel loads 160 MiB away from its text,
 * out of `bl`/`b` reach (±128 MiB), so every branch to the kernel goes through a veneer
 * the module loader builds in the module's own RX veneer area. It has no ksites records
 * (a C probe's enabled form and an imported ifunc's site must reach the kernel directly).
 *
 *   - farmod_call: a `bl` to the kernel's ksites_test_kernel_add (R_AARCH64_CALL26);
 *   - farmod_tail: a tail call to it, `b` (R_AARCH64_JUMP26);
 *   - farmod_ptr: its address through `adrp`/`add` (ADR_PREL_PG_HI21, ADD_ABS_LO12_NC:
 *     ±4 GiB, no veneer) and as data (R_AARCH64_ABS64);
 *   - init counts in farmod_state().
 */
#include "ksites_module.h"

unsigned long ksites_test_kernel_add(unsigned long a, unsigned long b);

static volatile unsigned long state;
/* A global, so gcc keeps the R_AARCH64_ABS64 in .data. */
unsigned long (*farmod_kernel_add)(unsigned long, unsigned long) = ksites_test_kernel_add;

int ksites_module_init(void)
{
    state += 1;
    return 0;
}

unsigned long farmod_state(void)
{
    return state;
}

unsigned long farmod_call(unsigned long a, unsigned long b)
{
    return ksites_test_kernel_add(a, b) + 1;
}

unsigned long farmod_tail(unsigned long a, unsigned long b)
{
    return ksites_test_kernel_add(a, b);
}

/* The kernel function's address, computed (adrp/add) and loaded from data (ABS64):
 * 1 if both agree. */
unsigned long farmod_ptr_agrees(void)
{
    unsigned long (*volatile computed)(unsigned long, unsigned long) = ksites_test_kernel_add;
    return computed == farmod_kernel_add;
}

unsigned long farmod_ptr(void)
{
    return (unsigned long)farmod_kernel_add;
}
