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
 *   - init/exit, counted in cmod_state();
 *   - on x86_64 (issue 18): sites of the kernel's static key ksites_test_key and of a key
 *     of its own (cmod_key), and calls to the kernel ifunc retarget_tag, which the
 *     kernel retargets live.
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

#if defined(__x86_64__)
unsigned long retarget_tag(unsigned long x);
KSITES_IFUNC_IMPORT(retarget_tag);

/* retarget_tag(x) through a call site (the result is used after it). */
unsigned long cmod_tag_call(unsigned long x)
{
    return retarget_tag(x) ^ state ^ state;
}

/* retarget_tag(x) as a tail call. */
unsigned long cmod_tag_tail(unsigned long x)
{
    return retarget_tag(x);
}
#endif

#if defined(__x86_64__) && __has_include("ksites_key.h")
#include "ksites_key.h"

/* The kernel's key KEY_MOD, exported as ksites_test_key. */
extern struct ksites_static_key ksites_test_key;
KSITES_STATIC_KEY_FALSE(cmod_key);

/* 1 while the kernel's key is enabled (an unlikely site), else 0. */
unsigned long cmod_kkey_unlikely(void)
{
    return KSITES_STATIC_BRANCH_UNLIKELY(ksites_test_key) ? 1 : 0;
}

/* 1 while the kernel's key is enabled (a likely site), else 0. */
unsigned long cmod_kkey_likely(void)
{
    return KSITES_STATIC_BRANCH_LIKELY(ksites_test_key) ? 1 : 0;
}

/* 1 while cmod_key is enabled, else 0. */
unsigned long cmod_own_unlikely(void)
{
    return KSITES_STATIC_BRANCH(cmod_key) ? 1 : 0;
}

/* The address of cmod_key, for the kernel to enable it. */
unsigned long cmod_own_key(void)
{
    return (unsigned long)&cmod_key;
}

#endif
