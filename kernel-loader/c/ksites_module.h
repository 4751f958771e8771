/*
 * ksites_module.h: what a C module (an ET_REL object loaded by kernel-loader's module
 * loader) declares.
 *
 *   KSITES_IFUNC_IMPORT(popcount);
 *       at file scope, next to the prototype of a kernel ifunc the module calls. It
 *       records the symbol in the non-allocated section `.ksites_ifunc_imports`, so
 *       `ksites embed` makes every call to it a site of the module's `.ksites` table and
 *       the loader patches those calls into direct calls to the implementation the
 *       kernel chose. Without it, calls still work, through the kernel's trampoline.
 *
 *   int ksites_module_init(void)   optional; run by Module::load, nonzero fails the load
 *   void ksites_module_exit(void)  optional; run by Module::unload
 *
 * On x86-64, build modules with `-fno-pic -mcmodel=kernel` (or small, if the kernel runs below
 * 2 GiB), `-fno-common`, and without `-fPIC`/`-fno-plt` GOT relocations (the loader
 * implements R_X86_64_64, PC32, PLT32, 32, 32S and PC64, and names anything else).
 * Rust modules: `--emit=obj -C relocation-model=static` (PIC/PIE code calls through the
 * GOT), `-C panic=abort`, and nothing that pulls mangled `core` symbols;
 * `ksites check-module` lists whatever would not resolve.
 */
#ifndef KSITES_MODULE_H
#define KSITES_MODULE_H

#include "ksites_arch.h"

#define KSITES_IFUNC_IMPORT(fn)                                \
    __asm__(".pushsection .ksites_ifunc_imports,\"\"," KSITES_PROGBITS "\n" \
            ".p2align 3\n"                                     \
            ".quad " #fn "\n"                                  \
            ".popsection\n")

#endif
