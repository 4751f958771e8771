/*
 * ksites_key.h: static keys (jump labels) for C code compiled into a kernel (or a
 * module) processed by `ksites embed`; kernel-loader's `key` module rewrites them live.
 *
 *   KSITES_STATIC_KEY_FALSE(trace_irqs);     at file scope: a key, disabled at boot
 *   KSITES_STATIC_KEY_TRUE(fast_path);       ... enabled at boot
 *   extern struct ksites_static_key trace_irqs;   elsewhere (or in a module)
 *
 *   if (KSITES_STATIC_BRANCH_UNLIKELY(trace_irqs)) { ... }   usually not taken
 *   if (KSITES_STATIC_BRANCH_LIKELY(fast_path)) { ... }      usually taken
 *   KSITES_STATIC_BRANCH(key)                                = the unlikely form
 *
 * Each branch is one instruction, the architecture's probe site NOP (KSITES_KEY_SITE in
 * ksites_arch.h), plus a 32-byte record in `.ksites_key_sites` (magic "KSKS", flags
 * bit 0 = likely, the site, the asm-goto label, the key). A site jumps to its label iff
 * the key's state differs from its likeliness: `ksites embed` writes each site in the
 * form of its key's default, the loader moves every site of a key, in the kernel and in
 * every loaded module, in one live batch (Rust: `StaticKey::enable`/`disable`/`inc`/
 * `dec`). The argument is the key object itself (not its address), as the Rust
 * macros take the static's name. Needs GNU C (asm goto, statement expressions); the
 * key must be a global (its address an assemble-time constant: build kernel code
 * -fno-pic, as ksites_arch.h says).
 */
#ifndef KSITES_KEY_H
#define KSITES_KEY_H

#include <stdint.h>

#include "ksites_arch.h"

/* kernel-loader's `key::StaticKey` (32 bytes, writable data). `count` and `state` are
 * the loader's: change the key through it, never by hand. */
struct ksites_static_key {
    uint32_t magic;    /* "KSKY" */
    uint32_t dflt;     /* 0 or 1: the state at boot */
    const char *name;  /* not NUL-terminated; `name_len` bytes */
    uint64_t name_len;
    uint32_t count;    /* enable count, starts at `dflt`; enabled iff > 0 */
    uint32_t state;    /* the loader's published state (0 in the image) */
};

_Static_assert(sizeof(struct ksites_static_key) == 32, "struct ksites_static_key: 32 bytes");
_Static_assert(__builtin_offsetof(struct ksites_static_key, count) == 24,
               "struct ksites_static_key: count at 24");

#define KSITES_KEY_MAGIC_ 0x594b534bu /* "KSKY" little-endian */

#define KSITES_STATIC_KEY_INIT_(key, d)                                               \
    { KSITES_KEY_MAGIC_, (d), #key, sizeof(#key) - 1, (d), 0 }

/* Defines key `key` (name string: the identifier), disabled or enabled at boot. */
#define KSITES_STATIC_KEY_FALSE(key)                                                  \
    struct ksites_static_key key __attribute__((aligned(8))) =                        \
        KSITES_STATIC_KEY_INIT_(key, 0)
#define KSITES_STATIC_KEY_TRUE(key)                                                   \
    struct ksites_static_key key __attribute__((aligned(8))) =                        \
        KSITES_STATIC_KEY_INIT_(key, 1)

/* One site: the NOP, labelled, and its record; jumps to `label` when patched. */
#define KSITES_KEY_SITE_(key, likely, label)                                          \
    __asm__ goto(KSITES_KEY_SITE "\n"                                                 \
                 ".pushsection .ksites_key_sites,\"awR\"," KSITES_PROGBITS_X "\n"     \
                 ".p2align 3\n"                                                       \
                 ".long 0x534b534b, " #likely "\n"                                    \
                 ".quad 1b, %l[" #label "], " KSITES_KEY_ADDR "\n"                    \
                 ".popsection\n"                                                      \
                 :                                                                    \
                 : "i"(&(key))                                                        \
                 :                                                                    \
                 : label)

/* 1 while `key` is enabled; the site falls through (0) while it is disabled. */
#define KSITES_STATIC_BRANCH_UNLIKELY(key)                                            \
    __extension__({                                                                   \
        __label__ ksites_key_yes_, ksites_key_done_;                                  \
        int ksites_key_on_ = 0;                                                       \
        KSITES_KEY_SITE_(key, 0, ksites_key_yes_);                                    \
        goto ksites_key_done_;                                                        \
    ksites_key_yes_:                                                                  \
        ksites_key_on_ = 1;                                                           \
    ksites_key_done_:                                                                 \
        ksites_key_on_;                                                               \
    })

/* 1 while `key` is enabled; the site falls through (1) while it is enabled. */
#define KSITES_STATIC_BRANCH_LIKELY(key)                                              \
    __extension__({                                                                   \
        __label__ ksites_key_no_, ksites_key_done_;                                   \
        int ksites_key_on_ = 1;                                                       \
        KSITES_KEY_SITE_(key, 1, ksites_key_no_);                                     \
        goto ksites_key_done_;                                                        \
    ksites_key_no_:                                                                   \
        ksites_key_on_ = 0;                                                           \
    ksites_key_done_:                                                                 \
        ksites_key_on_;                                                               \
    })

/* The unlikely form (Linux's static_branch_unlikely). */
#define KSITES_STATIC_BRANCH(key) KSITES_STATIC_BRANCH_UNLIKELY(key)

#endif
