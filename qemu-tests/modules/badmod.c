/*
 * badmod: a module that calls a function the kernel does not export. Loading it must
 * fail with an error naming `no_such_kernel_function` and leave the kernel's tables
 * untouched. Otherwise it looks like a real module: it calls a kernel ifunc and has a
 * probe, so its table has sites, and the failed load must not register `badmod:never`
 * or patch anything.
 */
#include "ksites_module.h"
#include "ksites_sdt.h"

unsigned int popcount(unsigned long x);
KSITES_IFUNC_IMPORT(popcount);

KSITES_PROBE_DECL(badmod, never, 1, (unsigned long x))

unsigned long no_such_kernel_function(unsigned long x);

int ksites_module_init(void)
{
    return 0;
}

unsigned long badmod_call(unsigned long x)
{
    KSITES_PROBE(badmod, never, x);
    return no_such_kernel_function(x) + popcount(x);
}
