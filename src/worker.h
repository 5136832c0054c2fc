/* worker.h: a worker thread: its libev loop, its Lua VM and configuration
 * generations (installed, retired, expired and freed here), its listening
 * sockets and accept pause, its connections, upstream pools and buffers. */
#ifndef MP_WORKER_H
#define MP_WORKER_H

#include "common.h"
#include "config.h"
#include "ctx.h"
#include "listener.h"
#include "log.h"
#include "req.h"

#include <ev.h>
#include <pthread.h>
#include <stdint.h>

typedef struct mp_worker {
    int id;
    pthread_t thread;
    mp_io_ctx_t io;    /* what its connections and pools use (ctx.h): loop, buffers, generation, lists */
    mp_gen_t *retired; /* generations older than io.gen, until their last request ends */
    ev_timer expire;   /* cuts requests of generations drained too long */
    /* Hand-over of a new generation from the main thread (reload.c). */
    pthread_mutex_t handover_lock;
    lua_State *next_L;
    mp_config_t *next_cfg;
    uint64_t next_id;
    _Atomic uint64_t installed; /* the generation this worker runs */
    struct ev_loop *main_loop;  /* where to acknowledge an installed generation */
    ev_async *main_ack;
    /* The hook watchdog (mp_watchdog_check): which VM runs a hook since when. */
    lua_State *_Atomic lua_vm;  /* non-NULL while a hook runs */
    _Atomic double lua_since;   /* loop time the hook started */
    pthread_mutex_t vm_lock;    /* held by the watchdog touching lua_vm, and to close a VM */
    _Atomic int stuck;          /* a hook could not be interrupted: its listeners are shut down
                                 * (main thread) until the worker re-opens them (mp_worker_unstick) */
    mp_listeners_t listen;      /* its listening sockets and accept state (listener.h) */
    ev_async wake;              /* main thread → worker: see `stop` */
    ev_prepare flush;           /* before each poll: access log, delayed frees */
    _Atomic int stop_requested; /* set by the main thread before wake */
} mp_worker_t;

/* Prepares w (loop, buffers for a head of max_header_size and
 * body_buffer_size body bytes); listener fds
 * are given by the main thread, the configuration by the reloader. Returns 0
 * or MP_ENOMEM. */
int mp_worker_init(mp_worker_t *w, int id, size_t max_header_size, size_t body_buffer_size, const int *fds,
                   size_t nfds);
/* Runs the worker's loop on the calling thread until it stopped and drained. */
void mp_worker_run(mp_worker_t *w);

/* Asks a running worker to stop accepting and drain (thread-safe). */
void mp_worker_stop(mp_worker_t *w);
void mp_worker_join(mp_worker_t *w);
void mp_worker_dispose(mp_worker_t *w);

/* Main thread, periodically: interrupts hooks that ran longer than
 * hook_timeout (a count hook raising an error: the request gets 500). Code
 * LuaJIT compiled and C calls do not run hooks; a worker stuck there for 3
 * times the budget is reported and stops accepting, so other workers take
 * its share, until the hook returns and the worker listens again.
 * Returns the number of stuck workers (for /live). */
int mp_watchdog_check(mp_worker_t *workers, int n, double hook_timeout);

/* Installs a (L, cfg) pair built for w (reload.c) as its current
 * generation; the previous one retires, and is freed when its last request
 * ends or its requests are cut after reload_drain_timeout. Runs on the
 * worker's thread (or before it starts). Returns 0 or MP_ENOMEM (then L and
 * cfg are freed). */
int mp_worker_install(mp_worker_t *w, uint64_t id, lua_State *L, mp_config_t *cfg);

/* Stops (on: at max_connections with no idle connection to reclaim) or
 * resumes accepting. A paused worker resumes by itself before its next poll
 * once a connection closed or went idle. */
void mp_worker_accept_pause(mp_worker_t *w, int on);

/* Closes a VM the watchdog may be looking at. */
void mp_worker_close_vm(mp_worker_t *w, lua_State *L);

/* 64 random bits from the worker's generator. */
uint64_t mp_worker_rand(mp_worker_t *w);

#endif
