/*
 * ksites_sdt.h: dtrace-style static probes for C code compiled into a kernel (or a
 * module) processed by `ksites embed`.
 *
 *   KSITES_PROBE_DECL(net, rx, 2, (unsigned long len, unsigned long port))
 *       at file scope, once per translation unit that uses the probe: declares it,
 *       records its argument count, and defines weak do-nothing defaults for
 *       __dtrace_probe_net___rx() and __dtraceenabled_net___rx(), so the link needs no
 *       hand-written stubs.
 *
 *   KSITES_PROBE(net, rx, len, port);        fire the probe
 *   if (KSITES_PROBE_ENABLED(net, rx)) {...}  guard expensive argument preparation
 *
 * `ksites embed` rewrites every `call __dtrace_probe_*` into a 5-byte NOP (a `jmp`
 * tail call into `ret` + NOPs) and every `call __dtraceenabled_*` into
 * `xor eax,eax` + NOP; kernel-loader's registry enables and disables them at run time.
 * Up to six integer or pointer arguments.
 */
#ifndef KSITES_SDT_H
#define KSITES_SDT_H

#include "ksites_arch.h"

#define KSITES_STR_(x) #x
#define KSITES_STR(x) KSITES_STR_(x)

#define KSITES_PROBE_DECL(prov, name, nargs, params)                                  \
    __asm__(".pushsection .ksites_probe_decls,\"awR\"," KSITES_PROGBITS "\n"                      \
            ".p2align 3\n"                                                              \
            ".long 0x4450534b, " KSITES_STR(nargs) "\n"                                 \
            ".quad 1f, 2f - 1f, 3f, 4f - 3f\n"                                          \
            ".popsection\n"                                                             \
            ".pushsection .rodata.ksites_decl,\"a\"," KSITES_PROGBITS "\n"                        \
            "1: .ascii \"" #prov "\"\n"                                                 \
            "2:\n"                                                                      \
            "3: .ascii \"" #name "\"\n"                                                 \
            "4:\n"                                                                      \
            ".popsection\n");                                                           \
    _Pragma("GCC diagnostic push")                                                      \
    _Pragma("GCC diagnostic ignored \"-Wunused-parameter\"")                           \
    __attribute__((weak, noinline, used)) void __dtrace_probe_##prov##___##name params \
    {                                                                                   \
        __asm__ volatile("");                                                           \
    }                                                                                   \
    __attribute__((weak, noinline, used)) int __dtraceenabled_##prov##___##name(void)   \
    {                                                                                   \
        return 0;                                                                       \
    }                                                                                   \
    _Pragma("GCC diagnostic pop")

#define KSITES_PROBE(prov, name, ...) __dtrace_probe_##prov##___##name(__VA_ARGS__)
#define KSITES_PROBE_ENABLED(prov, name) __dtraceenabled_##prov##___##name()

#endif
