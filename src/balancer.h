/* balancer.h: choosing an upstream server for a request. The upstream's
 * policy runs over the servers that are available (active checks up, circuit
 * not open): a C fast path for the built-in names, or a Lua function (an
 * operator's policy, or the built-ins' Lua modules with
 * settings.lua_balancers). One balancer per upstream, per worker and
 * generation; the server state it reads is process-wide (health.h). Also
 * the retry budget. */
#ifndef MP_BALANCER_H
#define MP_BALANCER_H

#include "balance.h"
#include "config.h"
#include "health.h"

typedef struct lua_State lua_State;

#define MP_RETRY_WINDOW 10 /* seconds the retry budget looks back */

typedef struct mp_balancer_s {
    const mp_upstream_def_t *def;
    lua_State *L;      /* the VM it was built in (the generation's) */
    mp_peer_t **peers; /* def->nservers */
    mp_passive_t passive;
    int policy;      /* enum in balancer.c */
    unsigned cursor; /* round robin, least_conn ties */
    int *current;    /* smooth weighted round robin */
    uint64_t rng;
    mp_chash_t *ring;
    int servers_ref;                                              /* Lua policies: the list of all server objects */
    int upstream_ref;                                             /* Lua policies: { name =, hash_key = } */
    uint32_t requests[MP_RETRY_WINDOW], retries[MP_RETRY_WINDOW]; /* per second of the window */
    int64_t window_second[MP_RETRY_WINDOW];
} mp_balancer_t;

/* The balancers of every upstream of cfg, built in L (the generation's VM).
 * Returns NULL when out of memory. */
mp_balancer_t *mp_balancers_new(lua_State *L, const mp_config_t *cfg, uint64_t seed);
void mp_balancers_free(mp_balancer_t *b, size_t n);

/* A pick's outcomes besides a server index, not error codes (err.h says which set is for what). */
enum { MP_PICK_NONE = -1, MP_PICK_ERROR = -2 };

/* What a pick needs from what is balanced (a request: req.h's mp_req_pick),
 * given its arg, without knowing it:
 *  - hash: the chash key's hash (0), or MP_PICK_ERROR when it failed;
 *  - lua_pick: with all the servers' objects and the upstream's on top of
 *    L's stack, calls the policy at ref with the available ones
 *    (s[i].available, navailable of n) under a protected call, leaving its
 *    result in their place; returns 0, or non-zero when the policy failed
 *    (nothing left).
 * They run only for the chash and Lua policies. */
typedef struct mp_pick_ctx {
    int (*hash)(void *arg, const mp_upstream_def_t *d, uint64_t *out);
    int (*lua_pick)(lua_State *L, void *arg, int ref, const mp_pick_server_t *s, int n, int navailable);
} mp_pick_ctx_t;

/* A server for arg as ctx sees it: its index, MP_PICK_NONE when no server is available
 * (503; fail_open upstreams then try them all), or MP_PICK_ERROR when a Lua
 * policy failed (500). avoid (-1: none) is left out when another server is
 * available. *trial is set when the pick is a half-open circuit's trial. */
int mp_balancer_pick(mp_balancer_t *b, const mp_pick_ctx_t *ctx, void *arg, int avoid, int *trial);

/* The retry budget: a retry is allowed while retries stay within
 * retry_budget of the requests of the last MP_RETRY_WINDOW seconds (and
 * always the first few). count records a request or a retry. */
int mp_balancer_retry_allowed(mp_balancer_t *b, double now);
void mp_balancer_count(mp_balancer_t *b, int retry, double now);

/* Seconds until a server of the upstream may be tried again (for
 * Retry-After), at least 1. */
int mp_balancer_retry_after(const mp_balancer_t *b, double now);

/* The passive outcome of a response status. */
int mp_balancer_failure_status(const mp_balancer_t *b, int status);

#endif
