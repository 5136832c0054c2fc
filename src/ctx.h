/* ctx.h: what the I/O layer (conn.c, upstream.c, pool.c) needs of the thread
 * that runs it, in one struct: the loop, buffers, the request env, the
 * current generation, the connection lists and graveyards, counters and the
 * access log. A worker embeds one (mp_worker_t.io) and fills it; the I/O code
 * keeps a pointer to it (c->ctx, u->ctx) and never sees the worker. */
#ifndef MP_CTX_H
#define MP_CTX_H

#include "buf.h"
#include "common.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "req.h"

#include <ev.h>
#include <stdint.h>

typedef struct mp_conn mp_conn_t;
typedef struct mp_upconn mp_upconn_t;
typedef struct mp_server_pool mp_server_pool_t;

/* Counters of one worker; summed by whoever reports them. */
typedef struct {
    uint64_t accepted, requests, upstream_connects, upstream_reused, upstream_errors;
} mp_stats_t;

typedef struct mp_io_ctx {
    struct ev_loop *loop;      /* the thread's loop: every watcher and timer of conn, upstream, pool */
    mp_bufpool_t bufs;         /* buffer blocks of connections (in/out) and requests */
    mp_req_env_t env;          /* what its requests need (req.h): rng, limits, Date, clock, log prefix (env.id) */
    mp_gen_t *gen;             /* the current configuration generation (gen.h): a new request pins it */
    const mp_config_t *cfg;    /* gen->cfg: connection-level settings */
    int stopping;              /* draining: no keep-alive, no pooling, close idle connections */
    mp_conn_t *conns;          /* every open client connection (doubly linked) */
    unsigned nconns;           /* how many: max_connections is checked against it */
    int room_freed;            /* a connection closed or went idle since the worker last looked:
                                     * accept, paused at max_connections, may resume */
    mp_conn_t *idle_newest;    /* keep-alive connections between requests (LRU), newest end */
    mp_conn_t *idle_oldest;    /* ... and oldest end (reclaimed first) */
    mp_conn_t *graveyard;      /* closed client connections, freed before the next poll (mp_conn_reap) */
    mp_upconn_t *up_graveyard; /* closed upstream connections, likewise (mp_upconn_reap) */
    struct mp_req *free_reqs;  /* recycled request objects */
    struct mp_req *orphans;    /* requests whose on_log hook waits for a call-out (conn.c) */
    struct mp_tunnel *tunnels; /* open tunnels (tunnel.c); each counts in nconns */
    int tunnel_pipes[32][2];   /* empty pipes for the tunnels' splice(2), kept for reuse (tunnel.c) */
    unsigned ntunnel_pipes;
    void *redis;                    /* the worker's Redis clients (l_redis.c), kept across generations */
    unsigned nfree_reqs;            /* how many */
    mp_server_pool_t *server_pools; /* idle upstream connections per server, across generations (pool.h) */
    mp_alog_t alog;                 /* the access log (fd < 0: none) */
    mp_stats_t stats;               /* counters */
    mp_metrics_t metrics;           /* written here, summed by GET /metrics (metrics.h) */
} mp_io_ctx_t;

#endif
