/* listener.h: listening sockets (one per worker per address, SO_REUSEPORT,
 * so the kernel spreads connections) and accepting on them. A worker embeds
 * its set (mp_listeners_t) and fills it; accepted connections go to the set's
 * I/O context (conn.h). */
#ifndef MP_LISTENER_H
#define MP_LISTENER_H

#include "config.h"
#include "ctx.h"

#include <ev.h>
#include <pthread.h>

typedef struct mp_listener {
    int fd;
    ev_io io;
    struct mp_listeners *set; /* the set it belongs to */
} mp_listener_t;

/* A worker's listening sockets and what decides whether they are watched. */
typedef struct mp_listeners {
    mp_io_ctx_t *ctx;         /* where accepted connections go; its loop, cfg, nconns, stopping */
    mp_listener_t *v;         /* one socket per listen address (fd -1: closed) */
    size_t n;                 /* how many */
    int paused;               /* at max_connections, no idle connection to reclaim (the worker sets it) */
    int backoff;              /* out of descriptors or memory: retry restarts accepting */
    ev_timer retry;           /* ends a backoff */
    _Atomic int *stuck;       /* the worker's hook watchdog state (worker.h): non-zero, its sockets are shut down */
    pthread_mutex_t *fd_lock; /* held to close a socket the watchdog may shut down (the worker's vm_lock) */
    void (*full)(void *arg);  /* at max_connections with none idle to reclaim: the worker pauses accepting */
    void *arg;                /* full's argument */
} mp_listeners_t;

/* Opens a non-blocking listening socket on a. When a's port is 0 the
 * chosen port is written back into a, so that the next sockets for the same
 * address (other workers) share it. Returns the fd or MP_EIO (errno set). */
int mp_listener_open(mp_addr_t *a);

/* Client connections leave the last descriptors below RLIMIT_NOFILE (limit;
 * 0: none) to upstream sockets, probes and the admin port. Called once,
 * before the workers start. */
void mp_listener_fd_limit(long long limit);

/* Starts accepting on ls's sockets. */
void mp_listener_start(mp_listeners_t *ls);

/* Stops accepting: accepts what is already queued, then closes. */
void mp_listener_close(mp_listeners_t *ls);

/* Watches the listeners, or not, as the state says: stopping, paused at
 * max_connections (mp_worker_accept_pause), backing off after EMFILE, stuck
 * in a hook. */
void mp_listener_sync(mp_listeners_t *ls);

/* listen(2) again on sockets the watchdog shut down (which left them bound
 * but out of the SO_REUSEPORT group). Returns 0 or MP_EIO (errno set). */
int mp_listener_relisten(mp_listeners_t *ls);

#endif
