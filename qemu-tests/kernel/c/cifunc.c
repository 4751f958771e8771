/*
 * A GNU ifunc in C (`__attribute__((ifunc))`), compiled by gcc into the test kernel.
 * The linker routes its calls through an IPLT entry and records an R_X86_64_IRELATIVE
 * relocation; `ksites embed` turns those into an ordinary table entry, so kernel-loader
 * resolves it at boot and patches every call into a direct call.
 *
 * kernel-loader calls the resolver with the CpuFeatures bits as its first argument.
 */
#define KSITES_CPU_POPCNT (1ul << 9) /* CpuFeatures::POPCNT */

static long c_scale_soft(long x)
{
    return x * 3;
}

static long c_scale_fast(long x)
{
    return (x << 1) + x;
}

/* Both implementations, for the in-kernel test to identify the choice. */
long (*const c_scale_impls[2])(long) = {c_scale_soft, c_scale_fast};

static long (*pick_c_scale(unsigned long features))(long)
{
    return (features & KSITES_CPU_POPCNT) ? c_scale_fast : c_scale_soft;
}

long c_scale(long x) __attribute__((ifunc("pick_c_scale")));

/* Two call sites. */
long c_scale_sum(long x)
{
    return c_scale(x) + c_scale(x + 1);
}

/* A tail call. */
long c_scale_tail(long x)
{
    return c_scale(x ^ 1);
}
