/*
 * badmod: a module that calls a function the kernel does not export. Loading it must
 * fail with an error naming `no_such_kernel_function` and leave the kernel's tables
 * (ifunc sites, probe registry) untouched.
 */
#include "ksites_module.h"

unsigned long no_such_kernel_function(unsigned long x);

int ksites_module_init(void)
{
    return 0;
}

unsigned long badmod_call(unsigned long x)
{
    return no_such_kernel_function(x) + 1;
}
