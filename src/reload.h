/* reload.h: configuration generations. A generation is one worker's Lua VM
 * with the configuration it built (route table, upstreams, hook chains) and
 * the pools it uses. Requests pin the generation they started with; a
 * reload installs a new one and the old one is freed when its last request
 * ends, or its requests are cut after reload_drain_timeout.
 *
 * The main thread builds every worker's new generation (VM and config),
 * and hands it over only when all of them loaded: a refused script changes
 * nothing anywhere. */
#ifndef MP_RELOAD_H
#define MP_RELOAD_H

#include "config.h"
#include "worker.h"

#include <ev.h>
#include <stdint.h>

typedef struct mp_gen {
    uint64_t id;          /* generation number, the same in every worker */
    lua_State *L;         /* owned; its hooks are what cfg's refs point to */
    mp_config_t *cfg;     /* owned */
    mp_pool_t *pools;     /* one per cfg->upstreams */
    struct mp_balancer_s *balancers; /* one per cfg->upstreams */
    struct mp_route_stats **route_stats; /* metrics.h entries by route index - 1, set on first
                                            use; NULL when out of memory (looked up each time) */
    int lua_mt[3];        /* the hook objects' metatables in L (l_request.h) */
    unsigned refs;        /* requests, plus one while current */
    ev_tstamp retired_at; /* when a newer one was installed */
    struct mp_gen *next;  /* the worker's retired generations */
} mp_gen_t;

/* Installs a (L, cfg) pair built for w as its current generation; the
 * previous one retires. Runs on the worker's thread (or before it starts).
 * Returns 0 or MP_ENOMEM (then L and cfg are freed). */
int mp_gen_install(mp_worker_t *w, uint64_t id, lua_State *L, mp_config_t *cfg);

static inline mp_gen_t *mp_gen_ref(mp_gen_t *g)
{
    g->refs++;
    return g;
}

/* Drops a reference; a retired generation without any is freed. */
void mp_gen_unref(mp_worker_t *w, mp_gen_t *g);

/* Closes the connections of requests still on generations retired for
 * longer than reload_drain_timeout (a periodic check). */
void mp_gen_expire(mp_worker_t *w);

/* Frees every generation (worker shutdown). */
void mp_gen_dispose_all(mp_worker_t *w);

/* Main thread: the configuration's history and the hand-over to workers. */
typedef struct mp_reloader mp_reloader_t;

/* Called when a reload ended: err NULL on success (generation set). */
typedef void (*mp_reload_cb)(void *arg, uint64_t generation, const char *err);

/* Creates the reloader for path and builds generation 1 for nworkers
 * workers (installed before they start). Returns NULL with err set. */
mp_reloader_t *mp_reloader_new(const char *path, mp_worker_t *workers, int nworkers, char *err, size_t errlen);

/* Starts watching the script (settings.watch) and listening for worker
 * acknowledgements on loop. */
void mp_reloader_start(mp_reloader_t *rl, struct ev_loop *loop);

/* Re-reads the script (rollback: the previous generation's text), builds
 * and validates it for every worker, hands it over, and calls cb once every
 * worker runs it, or at once with the error. reason is logged. */
void mp_reload(mp_reloader_t *rl, int rollback, const char *reason, mp_reload_cb cb, void *arg);

/* Called on the main thread with the new configuration after each
 * accepted reload (active health checks follow it). */
void mp_reloader_on_config(mp_reloader_t *rl, void (*fn)(void *arg, const mp_config_t *cfg), void *arg);

/* The current configuration as the main thread sees it (for /configz). */
const mp_config_t *mp_reloader_config(const mp_reloader_t *rl);
uint64_t mp_reloader_generation(const mp_reloader_t *rl);
double mp_reloader_loaded_at(const mp_reloader_t *rl);
/* The workers (for GET /metrics), and how many reloads (rollbacks included)
 * were accepted and refused since start. */
mp_worker_t *mp_reloader_workers(const mp_reloader_t *rl, int *n);
void mp_reloader_counts(const mp_reloader_t *rl, uint64_t *ok, uint64_t *refused);

void mp_reloader_free(mp_reloader_t *rl);

#endif
