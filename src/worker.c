/* worker.c: a worker thread: its own loop, Lua VM, configuration, listening
 * sockets, connections and pools; nothing on its request path is shared.
 * Owns its generations' install, retirement, expiry and free (gen.h), and
 * pausing/resuming accept at max_connections. */
#include "worker.h"

#include "conn.h"
#include "gen.h"
#include "l_redis.h"
#include "pool.h"
#include "tunnel.h"
#include "vm.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FREE_BLOCKS 1024
#define EXPIRE_SECONDS 1.0

/* ---- generations (gen.h): install, retire, expire, free ---- */

static void gen_free(mp_worker_t *w, mp_gen_t *g)
{
    mp_env_log(&w->io.env, MP_LOG_DEBUG, "generation %llu freed", (unsigned long long)g->id);
    mp_gen_release(g);
    mp_pools_free(&w->io, g->pools, g->cfg->nupstreams);
    mp_config_free(g->cfg);
    mp_worker_close_vm(w, g->L);
    free(g);
}

/* free_fn of w's generations: a retired one lost its last request. */
static void gen_unreferenced(mp_gen_t *g)
{
    mp_worker_t *w = g->owner;
    MP_ASSERT(g->state == MP_GEN_RETIRED && g != w->io.gen);
    for (mp_gen_t **p = &w->retired; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            break;
        }
    gen_free(w, g);
}

int mp_worker_install(mp_worker_t *w, uint64_t id, lua_State *L, mp_config_t *cfg)
{
    mp_gen_t *g = calloc(1, sizeof(*g));
    if (g) {
        g->L = L;
        g->cfg = cfg;
    }
    if (!g || !(g->pools = mp_pools_new(&w->io, cfg)) || mp_gen_prepare(g, mp_worker_rand(w)) != 0) {
        if (g)
            mp_pools_free(&w->io, g->pools, cfg->nupstreams);
        free(g);
        mp_config_free(cfg);
        mp_vm_close(L);
        return MP_ENOMEM;
    }
    MP_ASSERT(g->state == MP_GEN_PREPARED && (!w->io.gen || id > w->io.gen->id));
    g->id = id;
    g->refs = 1;
    g->state = MP_GEN_CURRENT;
    g->free_fn = gen_unreferenced;
    g->owner = w;
    mp_gen_t *old = w->io.gen;
    w->io.gen = g;
    w->io.cfg = cfg;
    mp_req_env_limits(&w->io.env, cfg->settings.max_uri_size, cfg->settings.max_header_size);
    if (old) {
        MP_ASSERT(old->state == MP_GEN_CURRENT && old->refs > 0);
        old->state = MP_GEN_RETIRED;
        old->retired_at = ev_now(w->io.loop);
        old->next = w->retired;
        w->retired = old;
        mp_gen_unref(old);
        if (w->retired && !ev_is_active(&w->expire))
            ev_timer_again(w->io.loop, &w->expire);
    }
    return 0;
}

/* Closes the connections of requests still on generations retired for
 * longer than reload_drain_timeout (a periodic check). */
static void expire_generations(mp_worker_t *w)
{
    ev_tstamp now = ev_now(w->io.loop);
    double limit = w->io.cfg->settings.reload_drain_timeout;
    for (mp_gen_t *g = w->retired; g; g = g->next) {
        MP_ASSERT(g->state == MP_GEN_RETIRED && g->refs > 0);
        if (now - g->retired_at < limit)
            continue;
        mp_env_log(&w->io.env, MP_LOG_WARN,
                   "generation %llu still has requests after reload_drain_timeout (%gs): closing them",
                   (unsigned long long)g->id, limit);
        g->retired_at = now; /* once per period: closing frees g when the last goes */
        mp_conn_t *next;
        for (mp_conn_t *c = w->io.conns; c; c = next) {
            next = c->next;
            if (c->side.req && c->side.req->gen == g)
                mp_conn_close(c); /* may free g: the outer loop stops here */
        }
        mp_conn_abandon_orphans(&w->io, g);
        break;
    }
    if (!w->retired)
        ev_timer_stop(w->io.loop, &w->expire);
}

/* Frees every generation (worker shutdown). */
static void dispose_generations(mp_worker_t *w)
{
    while (w->retired) {
        mp_gen_t *g = w->retired;
        MP_ASSERT(g->state == MP_GEN_RETIRED);
        w->retired = g->next;
        gen_free(w, g);
    }
    if (w->io.gen)
        gen_free(w, w->io.gen);
    w->io.gen = NULL;
    w->io.cfg = NULL;
}

/* Installs a generation the main thread handed over, if any. */
static void take_handover(mp_worker_t *w)
{
    pthread_mutex_lock(&w->handover_lock);
    lua_State *L = w->next_L;
    mp_config_t *cfg = w->next_cfg;
    uint64_t id = w->next_id;
    w->next_L = NULL;
    w->next_cfg = NULL;
    pthread_mutex_unlock(&w->handover_lock);
    if (!L)
        return;
    MP_ASSERT(id > w->installed);
    if (mp_worker_install(w, id, L, cfg) != 0) {
        mp_env_log(&w->io.env, MP_LOG_ERROR, "out of memory installing generation %llu", (unsigned long long)id);
        return;
    }
    w->installed = id;
    mp_env_log(&w->io.env, MP_LOG_DEBUG, "now on generation %llu", (unsigned long long)id);
    if (w->main_ack)
        ev_async_send(w->main_loop, w->main_ack);
}

static void unstick(mp_worker_t *w);

static void on_expire(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    expire_generations(container_of(t, mp_worker_t, expire));
}

static void on_wake(struct ev_loop *loop, ev_async *a, int revents)
{
    (void)revents;
    mp_worker_t *w = container_of(a, mp_worker_t, wake);
    take_handover(w);
    if (!w->stop_requested || w->io.stopping)
        return;
    w->io.stopping = 1;
    mp_listener_close(&w->listen);
    mp_conn_drain(&w->io);
    /* tunnels close in shutdown_timeout's last second, before the process ends at it */
    double t = w->io.cfg->settings.shutdown_timeout;
    mp_tunnel_drain(&w->io, t > 1 ? t - 1 : 0, t > 0.1 ? t - 0.05 : 0);
    ev_feed_event(loop, &w->flush, EV_PREPARE);
}

/* Before each poll: write buffered access log lines, free what callbacks
 * closed, and end the loop once a stopping worker has no connection left. */
static void on_prepare(struct ev_loop *loop, ev_prepare *p, int revents)
{
    (void)revents;
    mp_worker_t *w = container_of(p, mp_worker_t, flush);
    if (w->io.alog.len)
        mp_alog_flush(&w->io.alog);
    mp_conn_reap(&w->io);
    mp_upconn_reap(&w->io);
    /* a connection closed or went idle at the cap: one waiting may take its place */
    if (w->io.room_freed && w->listen.paused && !w->io.stopping)
        mp_worker_accept_pause(w, 0);
    w->io.room_freed = 0;
    if (atomic_load(&w->stuck) == 1)
        unstick(w);
    if (w->io.stopping && w->io.nconns == 0 && !w->io.orphans)
        ev_break(loop, EVBREAK_ALL);
}

void mp_worker_accept_pause(mp_worker_t *w, int on)
{
    if (w->listen.paused == on)
        return;
    w->listen.paused = on;
    static mp_log_limit_t lim;
    if (on)
        mp_env_log_limited(&lim, &w->io.env, MP_LOG_WARN,
                           "max_connections (%d) reached, none idle: not accepting for now",
                           w->io.cfg->settings.max_connections);
    mp_listener_sync(&w->listen);
}

/* The listeners' full callback: at max_connections with none idle to reclaim. */
static void accept_full(void *w)
{
    mp_worker_accept_pause(w, 1);
}

/* The worker this thread runs: hooks run on their worker's thread. */
static _Thread_local mp_worker_t *running;

/* The count hook the watchdog sets: raises in the hook that overran, and
 * clears itself in a call that did not (the worker may have moved on).
 * While the call overruns it fires at every instruction: a loop that
 * catches the error with pcall meets it again on the pcall's return. It
 * fires in coroutines the hook started too (the VM's hook is global). */
static void on_budget(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    mp_worker_t *w = running;
    double since = w && w->lua_vm ? w->lua_since : 0;
    if (since > 0 && ev_time() - since > w->io.cfg->settings.hook_timeout) {
        lua_sethook(L, on_budget, LUA_MASKCOUNT, 1);
        mp_vm_overran(L, w->io.cfg->settings.hook_timeout);
    }
    mp_vm_rehook(L); /* it may have replaced lua_memory's hook */
}

/* Main thread, vm_lock held: w's hook cannot be interrupted. Its listening
 * sockets leave the SO_REUSEPORT group (shutdown keeps them bound and the fd
 * valid), and the wake-up makes the worker re-open them once it returns. */
static void mark_stuck(mp_worker_t *w, double seconds)
{
    atomic_store(&w->stuck, 1);
    mp_env_log(&w->io.env, MP_LOG_ERROR,
               "a hook has run for %.1fs and cannot be interrupted (LuaJIT-compiled code and C calls do "
               "not run count hooks); the worker stops accepting new connections until it returns",
               seconds);
    for (size_t k = 0; k < w->listen.n; k++)
        if (w->listen.v[k].fd >= 0)
            shutdown(w->listen.v[k].fd, SHUT_RD);
    ev_async_send(w->io.loop, &w->wake);
}

int mp_watchdog_check(mp_worker_t *workers, int n, double hook_timeout)
{
    int stuck = 0;
    double now = ev_time();
    for (int i = 0; i < n; i++) {
        mp_worker_t *w = &workers[i];
        pthread_mutex_lock(&w->vm_lock);
        lua_State *L = w->lua_vm;
        double since = w->lua_since;
        if (L && since > 0 && now - since > hook_timeout)
            lua_sethook(L, on_budget, LUA_MASKCOUNT, 100);
        if (L && since > 0 && now - since > 3 * hook_timeout && !atomic_load(&w->stuck))
            mark_stuck(w, now - since);
        pthread_mutex_unlock(&w->vm_lock);
        stuck += atomic_load(&w->stuck) != 0;
    }
    return stuck;
}

/* The worker is back from the hook the watchdog gave up on: it listens
 * again (once; a socket that cannot listen stays reported on /live). */
static void unstick(mp_worker_t *w)
{
    pthread_mutex_lock(&w->vm_lock);
    if (mp_listener_relisten(&w->listen) == 0) {
        atomic_store(&w->stuck, 0);
        mp_env_log(&w->io.env, MP_LOG_WARN, "the stuck hook returned; accepting new connections again");
    } else {
        atomic_store(&w->stuck, 2);
        mp_env_log(&w->io.env, MP_LOG_ERROR, "the stuck hook returned but its sockets cannot listen again: %s",
                   strerror(errno));
    }
    pthread_mutex_unlock(&w->vm_lock);
    mp_listener_sync(&w->listen);
}

void mp_worker_close_vm(mp_worker_t *w, lua_State *L)
{
    pthread_mutex_lock(&w->vm_lock);
    mp_vm_close(L);
    pthread_mutex_unlock(&w->vm_lock);
}

uint64_t mp_worker_rand(mp_worker_t *w)
{
    return mp_req_rand(&w->io.env);
}

static double loop_now(void *loop)
{
    return ev_now(loop);
}

int mp_worker_init(mp_worker_t *w, int id, size_t max_header_size, size_t body_buffer_size, const int *fds, size_t nfds)
{
    memset(w, 0, sizeof(*w));
    w->id = id;
    w->io.alog.fd = -1;
    pthread_mutex_init(&w->handover_lock, NULL);
    pthread_mutex_init(&w->vm_lock, NULL);
    mp_bufpool_init(&w->io.bufs, mp_req_block_size(max_header_size, body_buffer_size), MAX_FREE_BLOCKS);

    w->io.loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
    mp_req_env_t *e = &w->io.env;
    *e = (mp_req_env_t){.id = id,
                        .bufs = &w->io.bufs,
                        .clock = loop_now,
                        .clock_arg = w->io.loop,
                        .hook_vm = &w->lua_vm,
                        .hook_since = &w->lua_since,
                        .wake = mp_conn_hook_woke};
    if (getrandom(e->rng, sizeof(e->rng), 0) != sizeof(e->rng))
        e->rng[0] = (uint64_t)time(NULL) ^ ((uint64_t)id << 32), e->rng[1] = (uint64_t)getpid() | 1;
    w->listen.v = calloc(nfds ? nfds : 1, sizeof(*w->listen.v));
    if (!w->io.loop || !w->listen.v)
        return MP_ENOMEM;
    w->listen.n = nfds;
    w->listen.ctx = &w->io;
    w->listen.stuck = &w->stuck;
    w->listen.fd_lock = &w->vm_lock;
    w->listen.full = accept_full;
    w->listen.arg = w;
    for (size_t i = 0; i < nfds; i++)
        w->listen.v[i].fd = fds[i];
    ev_async_init(&w->wake, on_wake);
    ev_async_start(w->io.loop, &w->wake);
    ev_prepare_init(&w->flush, on_prepare);
    ev_prepare_start(w->io.loop, &w->flush);
    ev_init(&w->expire, on_expire);
    w->expire.repeat = EXPIRE_SECONDS;
    return 0;
}

void mp_worker_run(mp_worker_t *w)
{
    running = w;
    mp_listener_start(&w->listen);
    ev_run(w->io.loop, 0);
    if (w->io.alog.len)
        mp_alog_flush(&w->io.alog);
}

void mp_worker_stop(mp_worker_t *w)
{
    w->stop_requested = 1;
    ev_async_send(w->io.loop, &w->wake);
}

void mp_worker_join(mp_worker_t *w)
{
    pthread_join(w->thread, NULL);
}

void mp_worker_dispose(mp_worker_t *w)
{
    if (w->io.loop) {
        mp_conn_t *next;
        for (mp_conn_t *c = w->io.conns; c; c = next) {
            next = c->next;
            mp_conn_close(c);
        }
        mp_tunnel_close_all(&w->io);
        mp_conn_abandon_orphans(&w->io, NULL);
        mp_conn_reap(&w->io);
        dispose_generations(w);
        mp_l_redis_dispose(&w->io);
        mp_pools_dispose(&w->io);
        mp_upconn_reap(&w->io);
        for (size_t i = 0; i < w->listen.n; i++)
            if (w->listen.v[i].fd >= 0)
                close(w->listen.v[i].fd);
        ev_loop_destroy(w->io.loop);
    }
    while (w->io.free_reqs) {
        struct mp_req *r = w->io.free_reqs;
        w->io.free_reqs = *(struct mp_req **)r;
        free(r);
    }
    free(w->listen.v);
    mp_bufpool_dispose(&w->io.bufs);
    if (w->next_L) {
        mp_config_free(w->next_cfg);
        mp_vm_close(w->next_L);
    }
    mp_metrics_dispose(&w->io.metrics);
    pthread_mutex_destroy(&w->handover_lock);
    pthread_mutex_destroy(&w->vm_lock);
    memset(w, 0, sizeof(*w));
}
