/*
 * cmod: the C test module of the ksites test kernel (gcc, one ET_REL object).
 *
 * The xtask compiles it with gcc, runs `ksites embed` on the object and hands the
 * result to the kernel build; the kernel's module tests load it with
 * kernel_loader::module and call the functions below by symbol name.
 *
 *   - calls the kernel ifuncs popcount and crc32c (KSITES_IFUNC_IMPORT): after loading,
 *     each call site must be a direct call to the implementation the kernel chose;
 *   - a dtrace-style probe cmod:event(x, y), and an is-enabled check of it;
 *   - init/exit, counted in cmod_state().
 */
#include "ksites_module.h"
#include "ksites_sdt.h"

unsigned int popcount(unsigned long x);
KSITES_IFUNC_IMPORT(popcount);
unsigned int crc32c(unsigned int crc, const unsigned char *data, unsigned long len);
KSITES_IFUNC_IMPORT(crc32c);

KSITES_PROBE_DECL(cmod, event, 2, (unsigned long x, unsigned long y))

static volatile unsigned long state;

int ksites_module_init(void)
{
    state += 1;
    return 0;
}

void ksites_module_exit(void)
{
    state += 0x100;
}

/* How often init (low byte) and exit (second byte) ran in this copy of the module. */
unsigned long cmod_state(void)
{
    return state;
}

/* Sum of popcount(p[i]) for i < n, through the kernel's popcount ifunc. */
unsigned long cmod_popcount_sum(const unsigned long *p, unsigned long n)
{
    unsigned long sum = 0;
    for (unsigned long i = 0; i < n; i++)
        sum += popcount(p[i]);
    return sum;
}

/* CRC-32C of len bytes from ~0, through the kernel's crc32c ifunc (a tail call). */
unsigned int cmod_crc(const unsigned char *data, unsigned long len)
{
    return crc32c(~0u, data, len);
}

/* Fires cmod:event(x, y); returns x * 3 + y. */
unsigned long cmod_fire(unsigned long x, unsigned long y)
{
    KSITES_PROBE(cmod, event, x, y);
    return x * 3 + y;
}

/* 1 while cmod:event is enabled, else 0. */
int cmod_event_enabled(void)
{
    return KSITES_PROBE_ENABLED(cmod, event) ? 1 : 0;
}
