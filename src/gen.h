/* gen.h: a configuration generation: one Lua VM with the configuration it
 * built and what requests use of it (balancers, pools, hook metatables).
 * Requests pin the generation they started with. Who installs, retires and
 * frees generations (worker.c in the server) is the owner; gen.c makes the
 * part the request layer needs without one. */
#ifndef MP_GEN_H
#define MP_GEN_H

#include "common.h"

#include <stdint.h>

typedef struct lua_State lua_State;
typedef struct mp_config mp_config_t;
struct mp_pool;
struct mp_balancer_s;
struct mp_route_stats;

/* A generation's life (MP_ASSERTed): prepared, installed as a worker's
 * current one, retired by a newer one until its last request ends. */
enum mp_gen_state { MP_GEN_PREPARED, MP_GEN_CURRENT, MP_GEN_RETIRED };

typedef struct mp_gen {
    uint64_t id;                         /* generation number, the same in every worker */
    lua_State *L;                        /* owned; its hooks are what cfg's refs point to */
    mp_config_t *cfg;                    /* owned */
    struct mp_pool *pools;               /* one per cfg->upstreams (the worker's; NULL without one) */
    struct mp_balancer_s *balancers;     /* one per cfg->upstreams */
    struct mp_route_stats **route_stats; /* metrics.h entries by route index - 1, set on first
                                            use; NULL when out of memory (looked up each time) */
    int lua_mt[3];                       /* the hook objects' metatables in L (l_request.h) */
    unsigned refs;                       /* requests, plus one while current */
    uint8_t state;                       /* mp_gen_state */
    double retired_at;                   /* loop time a newer one was installed */
    struct mp_gen *next;                 /* the owner's retired generations */
    void (*free_fn)(struct mp_gen *g);   /* the owner's: called when the last reference goes */
    void *owner;                         /* for free_fn (the worker) */
} mp_gen_t;

/* Makes what the request layer needs of g, whose L and cfg are set:
 * balancers (seeded with seed), the route_stats cache and the hook
 * objects' metatables. Returns 0 or MP_ENOMEM (then nothing is left
 * allocated; L and cfg stay the caller's). */
int mp_gen_prepare(mp_gen_t *g, uint64_t seed);

/* Frees what mp_gen_prepare made (not L, cfg or pools); idempotent. */
void mp_gen_release(mp_gen_t *g);

static inline mp_gen_t *mp_gen_ref(mp_gen_t *g)
{
    g->refs++;
    return g;
}

/* Drops a reference; the last one goes to the owner's free_fn (only a
 * retired generation can lose it: the current one holds one). */
static inline void mp_gen_unref(mp_gen_t *g)
{
    MP_ASSERT(g->refs > 0);
    if (--g->refs == 0 && g->free_fn)
        g->free_fn(g);
}

#endif
