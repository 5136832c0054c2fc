/* pool.h: upstream connections and, per worker, the idle keep-alive ones of
 * each server (`keepalive` of them kept until keepalive_timeout; past that,
 * a surplus a burst left is kept while it is needed, closed coldest first
 * after MP_POOL_SURPLUS_IDLE idle, never more than MP_POOL_CAP_FACTOR x
 * keepalive in all; any is closed as soon as the server closes it or sends
 * anything while idle). A server's pool is keyed by upstream name and
 * address, so it outlives a reload that keeps them. Never chooses a server
 * (balancer.h does). */
#ifndef MP_POOL_H
#define MP_POOL_H

#include "buf.h"
#include "common.h"
#include "ctx.h"
#include "io.h"

#include <ev.h>

/* Seconds a surplus idle connection (one past `keepalive`) is kept, and the
 * hard cap on a server's idle connections as a multiple of `keepalive`.
 * Closing a connection the moment the idle list overflows churns: under a
 * steady 100 requests in flight, the number in flight dips and rises by tens
 * from one loop turn to the next, and every dip closed what the next rise
 * reopened. A connection idle for a second was not needed by any of the
 * thousands of turns in between (the list is taken warm end first), so only
 * that one is surplus; HAProxy, likewise, keeps what recent use needed and
 * purges the rest gradually. The cap bounds the descriptors a burst leaves. */
#define MP_POOL_SURPLUS_IDLE 1.0
#define MP_POOL_CAP_FACTOR 4

typedef void (*mp_io_cb)(struct ev_loop *, ev_io *, int);
typedef void (*mp_timer_cb)(struct ev_loop *, ev_timer *, int);

/* CONNECTING -> ACTIVE <-> IDLE (in its server's idle list), any -> CLOSED
 * (in the worker's graveyard until the next poll); pool.c asserts them. */
enum mp_upconn_state { MP_UP_CONNECTING, MP_UP_ACTIVE, MP_UP_IDLE, MP_UP_CLOSED };

struct mp_req;
typedef struct mp_pool mp_pool_t;

struct mp_upconn {
    mp_io_ctx_t *ctx;     /* the thread's I/O context (ctx.h) */
    mp_io_t sock;         /* the socket to the server (ev_io watches sock.fd) */
    uint8_t state;        /* mp_upconn_state */
    uint8_t reused;       /* taken from the idle pool for the current request */
    uint8_t want;         /* the events last asked for (mp_upconn_want), before the transport maps them */
    mp_server_pool_t *sp; /* its server; kept alive by the request's generation */
    ev_io io;
    ev_timer timer;
    mp_buf_t in;              /* response bytes; only while active */
    mp_buf_t out;             /* request head; only while it is written */
    size_t scanned;           /* response head parser resume point */
    struct mp_req *req;       /* the request using it, NULL when idle */
    unsigned requests;        /* served on this connection */
    ev_tstamp idle_since;     /* when it went back to the pool */
    mp_upconn_t *prev, *next; /* idle list, or the worker's graveyard */
};

/* One server of one upstream, in one worker. */
struct mp_server_pool {
    char *upstream;           /* upstream name */
    mp_addr_t addr;           /* a copy: the pool outlives the configuration */
    char *tls;                /* NULL: plain; else what its TLS connections were made for (mp_pool_tls_key) */
    SSL_SESSION *tls_session; /* the server's last session ticket, offered by the next handshake */
    mp_log_limit_t tls_log;   /* why its handshakes fail: logged once a second per server */
    int keepalive;            /* from the newest generation using it */
    double keepalive_timeout;
    mp_upconn_t *idle;      /* most recently used first (idle_since descending) */
    mp_upconn_t *idle_tail; /* the coldest, closed first */
    unsigned nidle;
    ev_timer purge;         /* armed while nidle > keepalive: the coldest surplus one's deadline */
    unsigned refs;          /* generations using it */
    mp_server_pool_t *next; /* worker->server_pools */
};

/* The servers of one upstream in one generation. */
struct mp_pool {
    const mp_upstream_def_t *def;
    mp_server_pool_t **servers; /* def->nservers */
};

/* The pools of every upstream of cfg, taking (or creating) the worker's
 * server pools. Returns NULL when out of memory. */
mp_pool_t *mp_pools_new(mp_io_ctx_t *ctx, const mp_config_t *cfg);

/* Drops a generation's hold on its server pools; a server no generation
 * uses any more has its idle connections closed. */
void mp_pools_free(mp_io_ctx_t *ctx, mp_pool_t *pools, size_t n);

/* The worker's pool for a call-out target outside any upstream (a URL's
 * address; tls: what its TLS connections are made for, mp_tls_client_key,
 * or NULL), found or made; kept until mp_pools_dispose. NULL when out of
 * memory. */
mp_server_pool_t *mp_pool_standalone(mp_io_ctx_t *ctx, const mp_addr_t *addr, const char *tls, int keepalive,
                                     double keepalive_timeout);

/* Closes and frees every server pool left (worker end, after its
 * generations). */
void mp_pools_dispose(mp_io_ctx_t *ctx);

/* A live idle connection to the server, the most recently used first, or
 * NULL. Checks the socket before handing out one that idled long. */
mp_upconn_t *mp_pool_take(mp_server_pool_t *sp, mp_io_ctx_t *ctx);

/* Whether a socket()/connect() errno is this process's or host's want of
 * resources (descriptors, buffers, memory, local ports) rather than the
 * server's failure: such a failure must not count against the server. */
int mp_upconn_local_error(int err);

/* Starts a non-blocking connect to the server; u->state is CONNECTING or
 * ACTIVE (connected at once). Returns NULL with errno set on failure. */
mp_upconn_t *mp_upconn_connect(mp_io_ctx_t *ctx, mp_server_pool_t *sp, mp_io_cb io_cb, mp_timer_cb timer_cb);

/* Gives u back to its server's idle list (its warm end), or closes it when
 * the worker stops or keepalive is 0. A list at the hard cap closes its
 * coldest connection to make room; one past `keepalive` arms the purge of
 * the surplus. u must have no request and no unread bytes. */
void mp_pool_put(mp_upconn_t *u);

/* An idle pooled connection became readable (the server closed it or sent
 * bytes nobody asked for) or idled out: it is closed. */
void mp_pool_idle_event(mp_upconn_t *u);

/* Closes u; its memory is freed before the worker's next poll. */
void mp_upconn_close(mp_upconn_t *u);
void mp_upconn_reap(mp_io_ctx_t *ctx);

/* Sets the events u waits for, and its timer (0: stopped). */
void mp_upconn_want(mp_upconn_t *u, int events);

/* The readiness libev reported for u, as its caller's directions (TLS: see
 * mp_io_revents; bytes the session holds count as readable). */
int mp_upconn_revents(mp_upconn_t *u, int revents);
void mp_upconn_timer(mp_upconn_t *u, double seconds);


#endif
