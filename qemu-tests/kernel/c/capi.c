/*
 * A C kernel's use of ksites, through ksites.h and the C API only: look up the C probe
 * ctest:one (c/cprobes.c), enable it with a C handler, fire it, check the handler's
 * count and ksites_probe_hits, disable it, fire again and check nothing more counted.
 * capi_tests.rs runs it. Its poker (cpoker.h) writes text with CR0.WP clear on this
 * CPU (as a FreeBSD-style kernel patches); no other CPU runs ctest:one's site meanwhile.
 */
#include "cpoker.h"

unsigned long c_fire_one(unsigned long x);

static volatile unsigned long handler_calls;
static volatile uint64_t handler_arg;
static volatile uint32_t handler_id;

static void count(uint32_t id, const uint64_t args[6])
{
    handler_calls++;
    handler_id = id;
    handler_arg = args[0];
}

/* 0 on success; otherwise the number of the failed step (the C API's error, if any, in
 * *err). */
int capi_probe_roundtrip(int *err)
{
    struct wp_poker state = {0, 0, 0, 0};
    struct ksites_poker poker = wp_poker(&state);
    uint32_t id = 0xffffffffu, missing = 0xffffffffu;
    int r;

    *err = 0;
    if ((r = ksites_probe_lookup("ctest:nope", &missing)) != KSITES_ENOTFOUND) {
        *err = r;
        return 1;
    }
    if ((r = ksites_probe_lookup("ctest:one", &id)) != KSITES_OK) {
        *err = r;
        return 2;
    }
    uint64_t hits0 = ksites_probe_hits(id);
    unsigned long calls0 = handler_calls;
    if ((r = ksites_probe_enable(id, count, &poker)) != KSITES_OK) {
        *err = r;
        return 3;
    }
    if (state.writes == 0 || state.begins != state.ends || state.syncs == 0)
        return 4;
    if (c_fire_one(41) != 42 || c_fire_one(7) != 8)
        return 5;
    if (handler_calls - calls0 != 2 || handler_id != id || handler_arg != 7)
        return 6;
    if (ksites_probe_hits(id) - hits0 != 2)
        return 7;
    if ((r = ksites_probe_disable(id, &poker)) != KSITES_OK) {
        *err = r;
        return 8;
    }
    if (c_fire_one(1) != 2)
        return 9;
    if (handler_calls - calls0 != 2 || ksites_probe_hits(id) - hits0 != 2)
        return 10;
    if ((r = ksites_probe_enable(0xffffffu, count, &poker)) != KSITES_ENOTFOUND) {
        *err = r;
        return 11;
    }
    if (read_cr0() & CR0_WP) {
        struct ksites_int3_frame f = {.rip = 1};
        if (ksites_handle_int3(&f) != 0 || f.rip != 1)
            return 12;
    } else {
        return 13;
    }
    return 0;
}
