/*
 * C code with dtrace-style probes, compiled by gcc into the test kernel. `ksites embed`
 * rewrites the probe calls; probe_tests.rs enables, fires and checks them.
 */
#include "ksites_sdt.h"

KSITES_PROBE_DECL(ctest, zero, 0, (void))
KSITES_PROBE_DECL(ctest, one, 1, (unsigned long a))
KSITES_PROBE_DECL(ctest, six, 6,
                  (unsigned long a, unsigned long b, unsigned long c, unsigned long d,
                   unsigned long e, unsigned long f))
KSITES_PROBE_DECL(ctest, tail, 1, (unsigned long a))

volatile unsigned long c_work;

/* A plain call with no arguments. */
unsigned long c_fire_zero(void)
{
    KSITES_PROBE(ctest, zero);
    return ++c_work;
}

/* One argument, then more work after the site. */
unsigned long c_fire_one(unsigned long x)
{
    KSITES_PROBE(ctest, one, x);
    return x + 1;
}

/* Six arguments. */
unsigned long c_fire_six(unsigned long a, unsigned long b, unsigned long c, unsigned long d,
                         unsigned long e, unsigned long f)
{
    KSITES_PROBE(ctest, six, a, b, c, d, e, f);
    return a + b + c + d + e + f;
}

/* The probe is the last thing the function does: gcc emits `jmp`, a tail call. */
void c_fire_tail(unsigned long x)
{
    c_work += x;
    KSITES_PROBE(ctest, tail, x);
}

/* An is-enabled check as a tail call: `jmp __dtraceenabled_ctest___one`. */
int c_one_enabled(void)
{
    return KSITES_PROBE_ENABLED(ctest, one);
}

/* An is-enabled check guarding argument preparation (a `call`). */
unsigned long c_guarded(unsigned long x)
{
    if (KSITES_PROBE_ENABLED(ctest, six))
        KSITES_PROBE(ctest, six, x, x * 2, x * 3, x * 4, x * 5, x * 6);
    return x + c_work;
}
