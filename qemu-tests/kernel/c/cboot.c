/*
 * The C boot path (PVH command line `ksites.boot=c`): a C kernel's ksites bring-up and
 * module loading, through ksites.h only. The Rust part of the test kernel has done the
 * platform bring-up (serial, IDT with the library's #BP entry at vector 3, paging) and
 * hands over a struct cboot_platform: the kernel's text range, its exports, the module
 * images, a page allocator (the module arena), a console and the test harness. Here:
 *
 *   capi_cboot_init                  #BP route checked and declared, ksites_init
 *   capi_cboot_second_init_refused   KSITES_EALREADY, no write
 *   capi_module_load                 cmod.ko: imports patched, probe registered, init ran
 *   capi_module_call                 its functions (through kernel ifuncs) give the
 *                                    reference results
 *   capi_module_probe_in_module      cmod:event enabled with a C handler, fired, disabled
 *   capi_module_unload_refused_while_held  KSITES_EBUSY, exit not run
 *   capi_module_unload               with its probe enabled: probe gone, memory back
 *   capi_module_bad_module_refused   badmod.ko: KSITES_ESYMBOL naming the symbol; junk
 *                                    and a truncated module: KSITES_EMODULE; no change
 *   capi_module_load_unload_load     a fresh copy loads, runs, unloads
 *
 * The Rust test list then runs on the state this left (capi_tests.rs, main.rs).
 */
#include "cpoker.h"

/* capi_tests.rs's `Platform`. */
struct cboot_platform {
    void *harness;
    void (*report)(void *harness, const char *test, int ok, const char *detail);
    void (*print)(const char *line);
    struct ksites_range text;
    const struct ksites_export *exports;
    size_t nexports;
    int (*alloc)(void *ctx, size_t size, struct ksites_region *out);
    int (*protect)(void *ctx, const struct ksites_region *region, size_t offset, size_t len,
                   int prot);
    void (*free)(void *ctx, const struct ksites_region *region);
    size_t (*pages_used)(void);
    const void *cmod;
    size_t cmod_len;
    const void *badmod;
    size_t badmod_len;
};

void cboot_main(const struct cboot_platform *platform);

static const struct cboot_platform *pf;
static struct wp_poker pstate;
static struct ksites_poker poker;
static struct ksites_module_env env;

/* ---- A line of text (no libc) --------------------------------------------------- */

struct line {
    char buf[320];
    size_t len;
};

static void put(struct line *l, const char *s)
{
    while (*s && l->len + 1 < sizeof l->buf)
        l->buf[l->len++] = *s++;
    l->buf[l->len] = 0;
}

static void put_num(struct line *l, uint64_t v, unsigned base)
{
    char d[24];
    int n = 0;
    do {
        d[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (base == 16)
        put(l, "0x");
    while (n--) {
        char c[2] = {d[n], 0};
        put(l, c);
    }
}

static void put_rc(struct line *l, int rc)
{
    put(l, rc < 0 ? "-" : "");
    put_num(l, (uint64_t)(rc < 0 ? -(int64_t)rc : rc), 10);
    put(l, " (");
    put(l, ksites_strerror(rc));
    put(l, ")");
}

static int contains(const char *s, const char *word)
{
    for (; *s; s++) {
        size_t i = 0;
        while (word[i] && s[i] == word[i])
            i++;
        if (!word[i])
            return 1;
    }
    return 0;
}

#define REQUIRE(cond, what)                                                              \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            put(why, what);                                                              \
            return 0;                                                                    \
        }                                                                                \
    } while (0)

#define REQUIRE_RC(expr, want, what)                                                     \
    do {                                                                                 \
        int rc_ = (expr);                                                                \
        if (rc_ != (want)) {                                                             \
            put(why, what ": ");                                                         \
            put_rc(why, rc_);                                                            \
            return 0;                                                                    \
        }                                                                                \
    } while (0)

/* ---- Boot ------------------------------------------------------------------------ */

/* The handler address in the loaded IDT's vector 3. */
static uint64_t idt_vector3(void)
{
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    const volatile uint64_t *g = (const volatile uint64_t *)(uintptr_t)(idtr.base + 16 * 3);
    uint64_t lo = g[0], hi = g[1];
    return (lo & 0xffff) | ((lo >> 32) & 0xffff0000) | (hi << 32);
}

static int t_init(struct line *why)
{
    uint32_t n = 0, id;
    struct line out = {{0}, 0};
    REQUIRE(idt_vector3() == ksites_int3_entry_address(),
            "IDT vector 3 is not ksites_int3_entry_address()");
    ksites_declare_int3_route();
    REQUIRE_RC(ksites_init(&pf->text, 1, &poker, &n), KSITES_OK, "ksites_init");
    REQUIRE(n >= 5, "fewer than 5 ifuncs resolved");
    REQUIRE(pstate.writes > 0 && pstate.begins == pstate.ends && (read_cr0() & CR0_WP),
            "poker: no write, or text left writable");
    REQUIRE_RC(ksites_probe_lookup("ctest:one", &id), KSITES_OK, "ctest:one not registered");
    put(&out, "ksites: initialised from C: ");
    put_num(&out, n, 10);
    put(&out, " ifuncs resolved, ");
    put_num(&out, pstate.writes, 10);
    put(&out, " text writes, probes registered, #BP route declared");
    pf->print(out.buf);
    return 1;
}

static int t_second_init(struct line *why)
{
    uint32_t n = 77;
    unsigned long writes = pstate.writes;
    REQUIRE_RC(ksites_init(&pf->text, 1, &poker, &n), KSITES_EALREADY, "second ksites_init");
    REQUIRE(n == 77 && pstate.writes == writes, "a refused init wrote something");
    return 1;
}

/* ---- Modules --------------------------------------------------------------------- */

typedef unsigned long (*sum_fn)(const unsigned long *, unsigned long);
typedef unsigned int (*crc_fn)(const unsigned char *, unsigned long);
typedef unsigned long (*state_fn)(void);
typedef unsigned long (*fire_fn)(unsigned long, unsigned long);
typedef int (*enabled_fn)(void);

struct cmod {
    struct ksites_module *m;
    sum_fn sum;
    crc_fn crc;
    state_fn state;
    fire_fn fire;
    enabled_fn enabled;
};

static struct cmod cmod;
static size_t pages_before;
static struct ksites_module_info info;

static int symbol(struct ksites_module *m, const char *name, uint64_t *addr, struct line *why)
{
    int rc = ksites_module_symbol(m, name, addr);
    if (rc != KSITES_OK) {
        put(why, "ksites_module_symbol ");
        put(why, name);
        put(why, ": ");
        put_rc(why, rc);
        return 0;
    }
    return 1;
}

/* Loads cmod.ko into `c` and finds its functions. */
static int load_cmod(struct cmod *c, struct line *why)
{
    char msg[160];
    uint64_t a[5];
    int rc = ksites_module_load("cmod", pf->cmod, pf->cmod_len, &env, &poker, &c->m, msg,
                                sizeof msg);
    if (rc != KSITES_OK) {
        put(why, "ksites_module_load cmod: ");
        put_rc(why, rc);
        put(why, ": ");
        put(why, msg);
        return 0;
    }
    if (!symbol(c->m, "cmod_popcount_sum", &a[0], why) || !symbol(c->m, "cmod_crc", &a[1], why) ||
        !symbol(c->m, "cmod_state", &a[2], why) || !symbol(c->m, "cmod_fire", &a[3], why) ||
        !symbol(c->m, "cmod_event_enabled", &a[4], why))
        return 0;
    c->sum = (sum_fn)(uintptr_t)a[0];
    c->crc = (crc_fn)(uintptr_t)a[1];
    c->state = (state_fn)(uintptr_t)a[2];
    c->fire = (fire_fn)(uintptr_t)a[3];
    c->enabled = (enabled_fn)(uintptr_t)a[4];
    return 1;
}

static int t_load(struct line *why)
{
    struct line out = {{0}, 0};
    uint64_t missing;
    pages_before = pf->pages_used();
    if (!load_cmod(&cmod, why))
        return 0;
    REQUIRE_RC(ksites_module_info(cmod.m, &info), KSITES_OK, "ksites_module_info");
    REQUIRE(info.imports == 3 && info.sites_patched >= 4,
            "cmod's calls to popcount/crc32c/retarget_tag were not patched");
    REQUIRE(info.probes == 1 && info.probe_sites >= 1, "cmod:event not registered");
    REQUIRE(info.text_start < info.text_end && info.mem_start <= info.text_start &&
                info.text_end <= info.mem_end,
            "bad text/memory ranges");
    REQUIRE(pf->pages_used() > pages_before, "no arena pages in use");
    REQUIRE(cmod.state() == 1, "ksites_module_init did not run exactly once");
    REQUIRE_RC(ksites_module_symbol(cmod.m, "no_such_symbol", &missing), KSITES_ENOTFOUND,
               "ksites_module_symbol of a missing name");
    put(&out, "cboot: cmod loaded at ");
    put_num(&out, info.text_start, 16);
    put(&out, ": ");
    put_num(&out, info.relocations, 10);
    put(&out, " relocations, ");
    put_num(&out, info.kernel_symbols, 10);
    put(&out, " kernel symbols, ");
    put_num(&out, info.sites_patched, 10);
    put(&out, " import sites patched, probe ids ");
    put_num(&out, info.first_probe, 10);
    put(&out, "+");
    put_num(&out, info.probes, 10);
    pf->print(out.buf);
    return 1;
}

static unsigned ref_popcount(unsigned long x)
{
    unsigned n = 0;
    for (; x; x &= x - 1)
        n++;
    return n;
}

/* CRC-32C update from ~0, not inverted (what crc32c(~0u, ...) returns). */
static unsigned ref_crc(const unsigned char *d, unsigned long n)
{
    unsigned c = ~0u;
    for (unsigned long i = 0; i < n; i++) {
        c ^= d[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
    }
    return c;
}

static int t_call(struct line *why)
{
    static const unsigned long words[5] = {0, 1, ~0UL, 0x8000000000000001UL,
                                           0x0123456789abcdefUL};
    unsigned char data[100];
    unsigned long want = 0;
    for (int i = 0; i < 5; i++)
        want += ref_popcount(words[i]);
    for (int i = 0; i < 100; i++)
        data[i] = (unsigned char)(i * 37 + 11);
    REQUIRE(cmod.sum(words, 5) == want, "cmod_popcount_sum != reference");
    REQUIRE(cmod.crc(data, 100) == ref_crc(data, 100), "cmod_crc != reference");
    REQUIRE(cmod.crc(data, 0) == ~0u, "cmod_crc of nothing");
    return 1;
}

static volatile unsigned long event_calls;
static volatile uint64_t event_args[2];
static volatile uint32_t event_id;

static void on_event(uint32_t id, const uint64_t args[6])
{
    event_calls++;
    event_id = id;
    event_args[0] = args[0];
    event_args[1] = args[1];
}

static int t_probe(struct line *why)
{
    uint32_t id;
    REQUIRE_RC(ksites_probe_lookup("cmod:event", &id), KSITES_OK, "lookup cmod:event");
    REQUIRE(id >= info.first_probe && id < info.first_probe + info.probes,
            "cmod:event's id is not the module's");
    uint64_t hits0 = ksites_probe_hits(id);
    REQUIRE(cmod.fire(5, 2) == 17 && event_calls == 0 && cmod.enabled() == 0,
            "disabled probe fired or reports enabled");
    REQUIRE_RC(ksites_probe_enable(id, on_event, &poker), KSITES_OK, "enable cmod:event");
    REQUIRE(cmod.enabled() == 1, "is-enabled check says disabled");
    REQUIRE(cmod.fire(5, 2) == 17 && cmod.fire(7, 1) == 22, "cmod_fire's result changed");
    REQUIRE(event_calls == 2 && event_id == id && event_args[0] == 7 && event_args[1] == 1,
            "handler not called with (7, 1)");
    REQUIRE(ksites_probe_hits(id) - hits0 == 2, "hits != 2");
    REQUIRE_RC(ksites_probe_disable(id, &poker), KSITES_OK, "disable cmod:event");
    REQUIRE(cmod.fire(1, 1) == 4 && event_calls == 2 && cmod.enabled() == 0,
            "disabled probe still fires");
    return 1;
}

static int t_held(struct line *why)
{
    struct ksites_module_info i;
    REQUIRE_RC(ksites_module_hold(cmod.m), KSITES_OK, "hold");
    REQUIRE_RC(ksites_module_info(cmod.m, &i), KSITES_OK, "info");
    REQUIRE(i.users == 1, "users != 1 while held");
    REQUIRE_RC(ksites_module_unload(cmod.m, &poker), KSITES_EBUSY, "unload while held");
    REQUIRE(cmod.state() == 1, "exit ran on a refused unload");
    REQUIRE_RC(ksites_module_release(cmod.m), KSITES_OK, "release");
    return 1;
}

static int t_unload(struct line *why)
{
    uint32_t id;
    uint64_t a;
    /* Unload must disable the module's enabled probe itself. */
    REQUIRE_RC(ksites_probe_lookup("cmod:event", &id), KSITES_OK, "lookup cmod:event");
    REQUIRE_RC(ksites_probe_enable(id, on_event, &poker), KSITES_OK, "enable cmod:event");
    REQUIRE_RC(ksites_module_unload(cmod.m, &poker), KSITES_OK, "unload cmod");
    REQUIRE_RC(ksites_probe_lookup("cmod:event", &id), KSITES_ENOTFOUND,
               "cmod:event after unload");
    REQUIRE_RC(ksites_module_symbol(cmod.m, "cmod_state", &a), KSITES_EINVAL,
               "symbol through a stale handle");
    REQUIRE_RC(ksites_module_unload(cmod.m, &poker), KSITES_EINVAL, "second unload");
    REQUIRE(pf->pages_used() == pages_before, "arena pages not all freed");
    return 1;
}

static int t_bad(struct line *why)
{
    static const unsigned char junk[64] = "this is not an ELF relocatable object";
    char msg[160];
    struct ksites_module *m = 0;
    uint32_t id;
    size_t pages = pf->pages_used();
    unsigned long writes = pstate.writes;
    int rc = ksites_module_load("badmod", pf->badmod, pf->badmod_len, &env, &poker, &m, msg,
                                sizeof msg);
    if (rc != KSITES_ESYMBOL) {
        put(why, "badmod: ");
        put_rc(why, rc);
        return 0;
    }
    struct line out = {{0}, 0};
    put(&out, "cboot: badmod refused: ");
    put(&out, msg);
    pf->print(out.buf);
    REQUIRE(contains(msg, "no_such_kernel_function"), "the message does not name the symbol");
    REQUIRE(m == 0, "*out set on failure");
    REQUIRE_RC(ksites_probe_lookup("badmod:never", &id), KSITES_ENOTFOUND,
               "badmod:never registered");
    REQUIRE(pf->pages_used() == pages && pstate.writes == writes,
            "a refused module left memory or wrote text");
    REQUIRE_RC(ksites_module_load("junk", junk, sizeof junk, &env, &poker, &m, 0, 0),
               KSITES_EMODULE, "junk");
    REQUIRE_RC(ksites_module_load("cut", pf->cmod, 200, &env, &poker, &m, msg, sizeof msg),
               KSITES_EMODULE, "truncated cmod");
    REQUIRE_RC(ksites_module_load("cmod", pf->cmod, pf->cmod_len, 0, &poker, &m, 0, 0),
               KSITES_EINVAL, "null env");
    REQUIRE(m == 0 && pf->pages_used() == pages, "a refused load changed something");
    return 1;
}

static int t_reload(struct line *why)
{
    struct cmod again;
    static const unsigned long w[2] = {3, 0xff};
    if (!load_cmod(&again, why))
        return 0;
    REQUIRE(again.state() == 1, "the new copy's init did not run once");
    REQUIRE(again.sum(w, 2) == 10, "the new copy's popcount sum");
    REQUIRE_RC(ksites_module_unload(again.m, &poker), KSITES_OK, "unload the new copy");
    REQUIRE(pf->pages_used() == pages_before, "arena pages not all freed");
    return 1;
}

/* ---- Driver ---------------------------------------------------------------------- */

static int run(const char *name, int (*test)(struct line *))
{
    struct line why = {{0}, 0};
    int ok = test(&why);
    pf->report(pf->harness, name, ok, why.buf);
    return ok;
}

void cboot_main(const struct cboot_platform *platform)
{
    pf = platform;
    poker = wp_poker(&pstate);
    env.ctx = 0;
    env.exports = pf->exports;
    env.nexports = pf->nexports;
    env.lookup = 0;
    env.exec = &pf->text;
    env.nexec = 1;
    env.alloc = pf->alloc;
    env.protect = pf->protect;
    env.free = pf->free;
    if (!run("capi_cboot_init", t_init))
        return;
    run("capi_cboot_second_init_refused", t_second_init);
    if (run("capi_module_load", t_load)) {
        run("capi_module_call", t_call);
        run("capi_module_probe_in_module", t_probe);
        run("capi_module_unload_refused_while_held", t_held);
        run("capi_module_unload", t_unload);
    }
    run("capi_module_bad_module_refused", t_bad);
    run("capi_module_load_unload_load", t_reload);
}
