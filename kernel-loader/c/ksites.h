/*
 * ksites.h: everything a C kernel (or C program) needs from ksites. Includes
 * ksites_sdt.h (KSITES_PROBE*), ksites_key.h (KSITES_STATIC_KEY_*, KSITES_STATIC_BRANCH*)
 * and ksites_module.h (KSITES_IFUNC_IMPORT).
 *
 *   KSITES_TABLE_CELL();
 *       at file scope, once per image: defines `__ksites_table_cell`, the 24-byte cell
 *       `ksites embed` fills with the table's self-relative offset and size (the layout
 *       of kernel-loader's `cell::TableCell`: the magic "KSCELL\0\1", then two zero
 *       u64s). Only for images that do NOT link kernel-loader (or
 *       libkernel_loader_capi.a): the library defines the cell itself.
 *
 *   The C API (libkernel_loader_capi.a, crate kernel-loader-capi): boot init, probes,
 *   the #BP hook, module load/unload. Every `int` function returns 0 or a negative
 *   KSITES_E* code; ksites_strerror() names it. Every `ksites_*` function the library
 *   defines is declared here (build-tool/tests/c_api.rs checks the prototypes).
 *
 *   Build flags: probe handlers and the #BP hook run in trap context, and neither the
 *   library's #BP entry stub nor the hook saves vector (SSE/AVX/x87) registers. C probe
 *   handlers, and the kernel's own #BP handler that calls ksites_handle_int3(), must be
 *   built with -mgeneral-regs-only -mno-red-zone (as kernels normally are).
 */
#ifndef KSITES_H
#define KSITES_H

#include <stddef.h>
#include <stdint.h>

#include "ksites_arch.h"
#include "ksites_key.h"
#include "ksites_module.h"
#include "ksites_sdt.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
#define KSITES_STATIC_ASSERT_ static_assert
#else
#define KSITES_STATIC_ASSERT_ _Static_assert
#endif

/* The cell: kernel-loader's CELL_MAGIC, CELL_SIZE and CELL_SYMBOL. */
#define KSITES_CELL_MAGIC 0x01004c4c4543534bULL /* b"KSCELL\x00\x01", little-endian */
#define KSITES_CELL_SIZE 24

#if defined(__has_attribute)
#if __has_attribute(retain)
#define KSITES_RETAIN_ __attribute__((retain))
#endif
#endif
#ifndef KSITES_RETAIN_
#define KSITES_RETAIN_
#endif

/* Writable data, like the Rust cell (an UnsafeCell static): never read-only or
 * mergeable, since `ksites embed` rewrites it after compilation. Read it only through
 * volatile loads. */
#define KSITES_TABLE_CELL()                                                             \
    __attribute__((used, aligned(8), section(".data.__ksites_table_cell"))) KSITES_RETAIN_ \
    volatile uint64_t __ksites_table_cell[3] = {KSITES_CELL_MAGIC, 0, 0};               \
    KSITES_STATIC_ASSERT_(sizeof(__ksites_table_cell) == KSITES_CELL_SIZE, "ksites cell size")

/* ---- The C API ---------------------------------------------------------------- */

/* Error codes (negated). */
#define KSITES_OK 0
#define KSITES_EINVAL (-1)      /* null pointer (or poker without write/sync_cores/end),
                                   bad string, too many ranges */
#define KSITES_ENOTFOUND (-2)   /* no such probe */
#define KSITES_ECELL (-3)       /* the image's table cell is empty or invalid */
#define KSITES_EFORMAT (-4)     /* the .ksites table is malformed */
#define KSITES_EPATCH (-5)      /* ifunc patching failed (every site was put back) */
#define KSITES_EPOKE (-6)       /* the poker's write failed */
#define KSITES_ENOTRAP (-7)     /* enable before ksites_declare_int3_route() */
#define KSITES_EREGISTERED (-8) /* table not registered yet, or registered twice (by a
                                   Rust part) */
#define KSITES_EPROBE (-9)      /* another probe registry error */
#define KSITES_EOTHER (-10)     /* any other error */
#define KSITES_EROLLBACK (-11)  /* a write failed and restoring a site failed too:
                                   from ksites_init the text is inconsistent (that site
                                   may hold neither its original nor patched bytes);
                                   from probe enable/disable the probe is in its old
                                   state, a site may still hold an int3 (emulated by
                                   the #BP hook), and the next enable/disable rewrites
                                   it */
#define KSITES_EALREADY (-12)   /* ksites_init already ran (the image is patched and
                                   registered, by it or by a Rust part) */
/* Module load/unload (ksites_module_*): */
#define KSITES_EMODULE (-13)      /* not a valid module: malformed ELF, not a relocatable
                                     object for this architecture, bad relocation/layout */
#define KSITES_ENOTEMBEDDED (-14) /* the module has no .ksites table: `ksites embed` it */
#define KSITES_ESYMBOL (-15)      /* it needs a symbol the kernel does not export */
#define KSITES_EUNSUPPORTED (-16) /* unsupported symbol (GNU ifunc, TLS, common) or
                                     relocation type */
#define KSITES_EOVERFLOW (-17)    /* a relocation overflows: the module is out of reach */
#define KSITES_ENOMEM (-18)       /* the alloc callback gave no memory */
#define KSITES_EPROTECT (-19)     /* the protect callback failed */
#define KSITES_ENOTIFUNC (-20)    /* an imported ifunc is not one of the kernel's table */
#define KSITES_EINIT (-21)        /* ksites_module_init returned non-zero (load undone) */
#define KSITES_ELEAKED (-22)      /* the module's memory is leaked, not freed: a failed
                                     load could not unregister its probes, or an unload
                                     could not disable a probe whose C handler lies in it
                                     (that probe still calls into the module's code) */
#define KSITES_EBUSY (-23)        /* held, an enabled probe's handler lies in it, or a
                                     load or unload of its slot is in progress (another
                                     CPU, or the module's init or exit calling back) */
#define KSITES_EMODULES (-24)     /* KSITES_MAX_MODULES modules are loaded already */

/* What a poker's write returns besides 0 (kernel-loader's PokeFailure). */
#define KSITES_POKE_PROTECT 1
#define KSITES_POKE_NOT_TEXT 2
#define KSITES_POKE_NOT_MAPPED 3
#define KSITES_POKE_LARGE_PAGE 4
#define KSITES_POKE_BUSY 5
#define KSITES_POKE_READ_BACK 6

/* How the kernel writes its text (kernel-loader's TextPoker): begin, writes,
 * sync_cores (a serializing instruction on every CPU that may run the text), end (text
 * read-only again). `begin` and `write` return 0 or a KSITES_POKE_* code.
 * `write`, `sync_cores` and `end` are required: every function taking a poker returns
 * KSITES_EINVAL if one is NULL (live patching without serialization, or text left
 * writable, is refused; make `end` a no-op function if the text never becomes
 * writable). `begin` may be NULL only if `write` needs no preparation (e.g. it writes
 * through a writable alias mapping, or text is writable by design). */
struct ksites_poker {
    void *ctx;
    int (*begin)(void *ctx);
    int (*write)(void *ctx, uint64_t addr, const uint8_t *bytes, size_t len);
    void (*sync_cores)(void *ctx);
    void (*end)(void *ctx);
};

/* An executable range of the image: [start, end). */
struct ksites_range {
    uint64_t start;
    uint64_t end;
};

#if defined(__aarch64__)
/* kernel-loader's Int3Frame on aarch64: what the exception handler of a probe's `brk`
 * passes to ksites_handle_int3 (the same layout as ksites_arch.h's ksites_brk_frame);
 * it writes back pc (to ELR_EL1) and x0. */
struct ksites_int3_frame {
    uint64_t pc; /* ELR_EL1: the brk itself */
    uint64_t lr; /* x30 */
    uint64_t x0, x1, x2, x3, x4, x5;
};
KSITES_STATIC_ASSERT_(sizeof(struct ksites_int3_frame) == 64, "ksites_int3_frame layout");
#elif defined(__riscv) && __riscv_xlen == 64
/* kernel-loader's Int3Frame on riscv64: what the trap handler of a probe's `ebreak`
 * passes to ksites_handle_int3 (the same layout as ksites_arch.h's
 * ksites_ebreak_frame); it writes back pc (to sepc), ra and a0. */
struct ksites_int3_frame {
    uint64_t pc; /* sepc: the ebreak itself */
    uint64_t ra; /* x1 */
    uint64_t a0, a1, a2, a3, a4, a5;
};
KSITES_STATIC_ASSERT_(sizeof(struct ksites_int3_frame) == 64, "ksites_int3_frame layout");
#else
/* kernel-loader's Int3Frame: the registers the #BP hook reads; it writes back rip, rsp
 * and rax (an emulated call also pushes its return address below rsp). */
struct ksites_int3_frame {
    uint64_t rip; /* after the int3 */
    uint64_t rsp;
    uint64_t rax;
    uint64_t rdi;
    uint64_t rsi;
    uint64_t rdx;
    uint64_t rcx;
    uint64_t r8;
    uint64_t r9;
    uint64_t rflags; /* read only: a trapped jcc site's condition */
};
KSITES_STATIC_ASSERT_(sizeof(struct ksites_int3_frame) == 80, "ksites_int3_frame layout");
#endif

/* A probe handler: the probe's id and its six arguments (unused ones are 0). Runs on
 * the CPU that fired the probe, possibly in trap context (#BP) with no vector
 * registers saved: build it with -mgeneral-regs-only -mno-red-zone. It must not call
 * the registry (lookup, enable, disable, hits). */
typedef void (*ksites_handler)(uint32_t id, const uint64_t args[6]);

/* Boot, once, on one CPU, with SSE/XSAVE state set up: finds the image's table through
 * its cell, validates it against `exec` (at most 16 ranges; a kernel that loads modules
 * passes the same ranges in ksites_module_env.exec, which takes at most 7), resolves every ifunc for
 * the detected CPU features and patches its call sites, and registers the image's
 * probes. `ifuncs` (may be NULL) gets the number of ifuncs resolved. A second call
 * returns KSITES_EALREADY. */
int ksites_init(const struct ksites_range *exec, size_t nexec,
                const struct ksites_poker *poker, uint32_t *ifuncs);

/* The id of probe "provider:name". */
int ksites_probe_lookup(const char *spec, uint32_t *id);

/* Enables probe `id` with `handler` (replacing any handler it had; on error the old
 * handler stays). */
int ksites_probe_enable(uint32_t id, ksites_handler handler, const struct ksites_poker *poker);

/* Disables probe `id`. */
int ksites_probe_disable(uint32_t id, const struct ksites_poker *poker);

/* How many times probe `id` fired while enabled (0 for an unknown id). */
uint64_t ksites_probe_hits(uint32_t id);

/* Static keys (ksites_key.h; `key` defined with KSITES_STATIC_KEY_FALSE/TRUE): enable
 * and disable are idempotent, inc and dec count (patching on 0 <-> 1; dec at 0 is
 * KSITES_EPROBE); each change is one live batch over the key's sites in the kernel and
 * every loaded module (needs the image registered by ksites_init, and on x86-64 the #BP
 * route declared). On an error the key's count and every site are unchanged. */
int ksites_static_key_enable(struct ksites_static_key *key, const struct ksites_poker *poker);
int ksites_static_key_disable(struct ksites_static_key *key, const struct ksites_poker *poker);
int ksites_static_key_inc(struct ksites_static_key *key, const struct ksites_poker *poker);
int ksites_static_key_dec(struct ksites_static_key *key, const struct ksites_poker *poker);

/* The key's enable count (enabled iff > 0; 0 for NULL). */
uint32_t ksites_static_key_count(const struct ksites_static_key *key);

/* The #BP hook, for a kernel's own #BP handler: 1 if the int3 was a probe site's (write
 * rip, rsp and rax back), 0 if not. It runs the probe's handler and saves no vector
 * registers: build the calling #BP handler with -mgeneral-regs-only -mno-red-zone. */
int ksites_handle_int3(struct ksites_int3_frame *frame);

/* The address of the ready #BP entry stub (install it in IDT vector 3 as a 64-bit
 * interrupt gate), which calls the hook itself. */
uint64_t ksites_int3_entry_address(void);

/* Declares that every #BP on every CPU reaches the hook; ksites_probe_enable refuses
 * with KSITES_ENOTRAP until then. */
void ksites_declare_int3_route(void);

/* A static string naming error code `err`. */
const char *ksites_strerror(int err);

/* ---- Modules (kernel-loader's module loader) ------------------------------------ */

#define KSITES_MAX_MODULES 16

/* Page permissions `protect` is asked for. */
#define KSITES_PROT_RX 1 /* read + execute: code */
#define KSITES_PROT_R 2  /* read-only: rodata, the module's table */
#define KSITES_PROT_RW 3 /* read + write: data, bss, bookkeeping, and freed memory */
/* What `protect` returns for a range outside the region (anything else non-zero: the
 * mapping could not be changed). */
#define KSITES_PROTECT_RANGE 1

/* A kernel symbol modules may link against. */
struct ksites_export {
    const char *name; /* NUL-terminated */
    uint64_t addr;
};

/* Memory for one module: `ptr` is where the loader writes, `addr` where the module runs
 * (normally the same), `size` a multiple of 4096. */
struct ksites_region {
    void *ptr;
    uint64_t addr;
    size_t size;
};

/* What modules are loaded against. Every ksites_module_load also exports the loader's
 * runtime entry points (what probe sites call) and ksites_probe_lookup/enable/disable/
 * hits and ksites_strerror; then `exports`, then `lookup` (may be NULL; `name` is
 * `len` bytes, not NUL-terminated; returns 1 and the address, or 0).
 * `exec` (1 to 7 ranges) is the kernel's text: the kernel's table is found through its
 * cell and validated against it, and every ifunc a module imports must be one of it.
 * `alloc` returns 0 and page-aligned, zeroed or not, read-write memory within rel32
 * reach (+-2 GiB) of the kernel's text and data; `protect` sets the permissions of
 * `len` bytes at `offset` in the region (both page-aligned) and flushes TLBs; `free`
 * takes the region back (already KSITES_PROT_RW). All three are required; the module
 * keeps them (and `ctx`) for its unload. */
struct ksites_module_env {
    void *ctx;
    const struct ksites_export *exports;
    size_t nexports;
    int (*lookup)(void *ctx, const char *name, size_t len, uint64_t *addr);
    const struct ksites_range *exec;
    size_t nexec;
    int (*alloc)(void *ctx, size_t size, struct ksites_region *out);
    int (*protect)(void *ctx, const struct ksites_region *region, size_t offset, size_t len,
                   int prot);
    void (*free)(void *ctx, const struct ksites_region *region);
};

/* What loading did. */
struct ksites_module_info {
    uint64_t text_start, text_end; /* its code */
    uint64_t mem_start, mem_end;   /* all of its memory */
    uint32_t sections;             /* allocated sections placed */
    uint32_t relocations;          /* relocations applied */
    uint32_t kernel_symbols;       /* undefined symbols resolved against the kernel */
    uint32_t ifuncs;               /* its own ifuncs (resolved for this CPU) */
    uint32_t imports;              /* kernel ifuncs it imports */
    uint32_t sites_patched;        /* ifunc call sites made direct branches */
    uint32_t probes;               /* its probes: ids first_probe .. first_probe+probes */
    uint32_t probe_sites;
    uint32_t first_probe;
    uint32_t users;                /* outstanding ksites_module_hold()s */
};
KSITES_STATIC_ASSERT_(sizeof(struct ksites_module_info) == 72, "ksites_module_info layout");

/* A loaded module (opaque; one of KSITES_MAX_MODULES slots). A handle names one load:
 * once that module is unloaded, every call with it returns KSITES_EINVAL, even after
 * its slot holds another module. ksites_module_symbol, _info, _hold and _release may run
 * on any number of CPUs at once; they return KSITES_EBUSY only while a load or unload
 * of the same slot is in progress (so a module's init or exit calling them on itself
 * gets KSITES_EBUSY). */
struct ksites_module;

/* Loads the module `image` (`len` bytes of an ET_REL object `ksites embed` processed)
 * as `name`: lays it out in memory from env->alloc, resolves its symbols, relocates it,
 * validates its table, protects it (text RX, never W+X), patches its calls to kernel
 * ifuncs into direct calls to the kernel's choice and resolves its own ifuncs, registers
 * its probes, runs its ksites_module_init. `*out` gets the handle. On error nothing is
 * left patched, registered or allocated, and `msg` (may be NULL) gets the loader's
 * message, naming the symbol, relocation or section (truncated to `msg_len` bytes,
 * NUL-terminated). `name` and `image` must stay valid until the module is unloaded. */
int ksites_module_load(const char *name, const void *image, size_t len,
                       const struct ksites_module_env *env,
                       const struct ksites_poker *poker, struct ksites_module **out,
                       char *msg, size_t msg_len);

/* Unloads `m`: KSITES_EBUSY while held (nothing run); otherwise runs its
 * ksites_module_exit, then KSITES_EBUSY if an enabled probe's Rust handler still lies
 * in its code (it stays loaded); otherwise disables and unregisters its probes,
 * disables every probe still enabled with a C handler in its code (as a failed load
 * does), and frees its memory; the handle is then invalid. If the poker fails to
 * disable such a probe, the module is unloaded but its memory is kept and this returns
 * KSITES_ELEAKED. No CPU may run its code any more. */
int ksites_module_unload(struct ksites_module *m, const struct ksites_poker *poker);

/* The address of a global symbol `m` defines (KSITES_ENOTFOUND). */
int ksites_module_symbol(const struct ksites_module *m, const char *name, uint64_t *addr);

/* What loading `m` did. */
int ksites_module_info(const struct ksites_module *m, struct ksites_module_info *info);

/* Something depends on `m`: ksites_module_unload refuses until ksites_module_release. */
int ksites_module_hold(const struct ksites_module *m);
int ksites_module_release(const struct ksites_module *m);

#ifdef __cplusplus
}
#endif

#endif
