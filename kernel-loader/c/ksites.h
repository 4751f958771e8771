/*
 * ksites.h: everything a C kernel (or C program) needs from ksites. Includes
 * ksites_sdt.h (KSITES_PROBE*) and ksites_module.h (KSITES_IFUNC_IMPORT).
 *
 *   KSITES_TABLE_CELL();
 *       at file scope, once per image: defines `__ksites_table_cell`, the 24-byte cell
 *       `ksites embed` fills with the table's self-relative offset and size (the layout
 *       of kernel-loader's `cell::TableCell`: the magic "KSCELL\0\1", then two zero
 *       u64s). Only for images that do NOT link kernel-loader (or
 *       libkernel_loader_capi.a): the library defines the cell itself.
 *
 *   The C API (libkernel_loader_capi.a, crate kernel-loader-capi): every `int` function
 *   returns 0 or a negative KSITES_E* code; ksites_strerror() names it.
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

/* kernel-loader's Int3Frame: the registers the #BP hook reads; it writes back rip, rsp
 * and rax. */
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
};
KSITES_STATIC_ASSERT_(sizeof(struct ksites_int3_frame) == 72, "ksites_int3_frame layout");

/* A probe handler: the probe's id and its six arguments (unused ones are 0). Runs on
 * the CPU that fired the probe, possibly in trap context (#BP) with no vector
 * registers saved: build it with -mgeneral-regs-only -mno-red-zone. It must not call
 * the registry (lookup, enable, disable, hits). */
typedef void (*ksites_handler)(uint32_t id, const uint64_t args[6]);

/* Boot, once, on one CPU, with SSE/XSAVE state set up: finds the image's table through
 * its cell, validates it against `exec` (at most 16 ranges), resolves every ifunc for
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

#ifdef __cplusplus
}
#endif

#endif
