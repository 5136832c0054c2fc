/* pool.c: upstream connections: non-blocking connect, idle keep-alive lists
 * per server, stale detection, delayed free; and the round robin pick. */
#include "pool.h"

#include <errno.h>
#include <stdlib.h>

/* A server's pool is its upstream's name, its address and, for TLS, what
 * its connections were verified as: a reload that changes any of them
 * starts a new pool, so no connection made for other settings is reused. */
static int same_tls(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

static void server_pool_free(mp_server_pool_t *sp)
{
    free(sp->upstream);
    free(sp->addr.text);
    free(sp->tls);
    mp_tls_session_free(&sp->tls_session);
    free(sp);
}

static void on_purge(struct ev_loop *loop, ev_timer *t, int revents);
static void purge_surplus(mp_server_pool_t *sp, struct ev_loop *loop);

/* The worker's pool of (name, addr, tls), found or made. */
static mp_server_pool_t *pool_get(mp_io_ctx_t *ctx, const char *name, const mp_addr_t *addr, const char *tls)
{
    for (mp_server_pool_t *sp = ctx->server_pools; sp; sp = sp->next)
        if (strcmp(sp->upstream, name) == 0 && strcmp(sp->addr.text, addr->text) == 0 && same_tls(sp->tls, tls))
            return sp;
    mp_server_pool_t *sp = calloc(1, sizeof(*sp));
    if (!sp || !(sp->upstream = strdup(name)) || !(sp->addr.text = strdup(addr->text)) ||
        (tls && !(sp->tls = strdup(tls)))) {
        if (sp)
            server_pool_free(sp);
        return NULL;
    }
    sp->addr.ss = addr->ss;
    sp->addr.sslen = addr->sslen;
    ev_init(&sp->purge, on_purge);
    sp->next = ctx->server_pools;
    ctx->server_pools = sp;
    return sp;
}

static mp_server_pool_t *server_pool(mp_io_ctx_t *ctx, const mp_upstream_def_t *def, const mp_server_def_t *srv)
{
    char key[512];
    const char *tls = def->tls ? mp_tls_client_key(def->tls, def->tls_name, key, sizeof(key)) : NULL;
    return pool_get(ctx, def->name, &srv->addr, tls);
}

static void server_pool_unref(mp_io_ctx_t *ctx, mp_server_pool_t *sp)
{
    if (--sp->refs)
        return;
    ev_timer_stop(ctx->loop, &sp->purge);
    while (sp->idle)
        mp_upconn_close(sp->idle);
    for (mp_server_pool_t **p = &ctx->server_pools; *p; p = &(*p)->next)
        if (*p == sp) {
            *p = sp->next;
            break;
        }
    server_pool_free(sp);
}

mp_pool_t *mp_pools_new(mp_io_ctx_t *ctx, const mp_config_t *cfg)
{
    size_t n = cfg->nupstreams;
    mp_pool_t *pools = calloc(n ? n : 1, sizeof(*pools));
    for (size_t i = 0; pools && i < n; i++) {
        mp_pool_t *p = &pools[i];
        p->def = &cfg->upstreams[i];
        p->servers = calloc(p->def->nservers, sizeof(*p->servers));
        for (size_t s = 0; p->servers && s < p->def->nservers; s++) {
            mp_server_pool_t *sp = server_pool(ctx, p->def, &p->def->servers[s]);
            if (!sp)
                break;
            sp->refs++;
            sp->keepalive = p->def->keepalive;
            sp->keepalive_timeout = p->def->keepalive_timeout;
            /* a reload that lowers keepalive makes surplus of what idles */
            if (sp->nidle > (unsigned)sp->keepalive && !ev_is_active(&sp->purge))
                purge_surplus(sp, ctx->loop);
            p->servers[s] = sp;
        }
        if (!p->servers || !p->servers[p->def->nservers - 1]) {
            mp_pools_free(ctx, pools, i + 1);
            return NULL;
        }
    }
    return pools;
}

void mp_pools_free(mp_io_ctx_t *ctx, mp_pool_t *pools, size_t n)
{
    for (size_t i = 0; pools && i < n; i++) {
        mp_pool_t *p = &pools[i];
        for (size_t s = 0; p->servers && s < p->def->nservers && p->servers[s]; s++)
            server_pool_unref(ctx, p->servers[s]);
        free(p->servers);
    }
    free(pools);
}

static void watch(mp_upconn_t *u, int events)
{
    if ((u->io.events & (EV_READ | EV_WRITE)) == events && (events == 0) == !ev_is_active(&u->io))
        return;
    ev_io_stop(u->ctx->loop, &u->io);
    ev_io_modify(&u->io, events);
    if (events)
        ev_io_start(u->ctx->loop, &u->io);
}

/* TLS: what to watch follows the blocked calls (io.h), and bytes the
 * session holds are read without waiting. Out of the plain path. */
static MP_IO_COLD __attribute__((noinline)) void tls_want(mp_upconn_t *u, int events)
{
    u->want = (uint8_t)events;
    watch(u, mp_io_events(&u->sock, events));
    if ((events & EV_READ) && mp_io_pending(&u->sock))
        ev_feed_event(u->ctx->loop, &u->io, EV_READ);
}

void mp_upconn_want(mp_upconn_t *u, int events)
{
    MP_ASSERT(u->state != MP_UP_CLOSED);
    if (MP_UNLIKELY(u->sock.ops != NULL))
        return tls_want(u, events);
    watch(u, events);
}

int mp_upconn_revents(mp_upconn_t *u, int revents)
{
    revents = mp_io_revents(&u->sock, revents);
    if (mp_io_pending(&u->sock))
        revents |= EV_READ;
    return revents;
}

void mp_upconn_timer(mp_upconn_t *u, double seconds)
{
    MP_ASSERT(u->state != MP_UP_CLOSED);
    u->timer.repeat = seconds;
    ev_timer_again(u->ctx->loop, &u->timer);
}

static void unlink_idle(mp_upconn_t *u)
{
    mp_server_pool_t *sp = u->sp;
    MP_ASSERT(u->state == MP_UP_IDLE && sp->nidle > 0);
    if (u->prev)
        u->prev->next = u->next;
    else
        sp->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    else
        sp->idle_tail = u->prev;
    u->prev = u->next = NULL;
    sp->nidle--;
    mp_metrics_add(&u->ctx->metrics.idle_up, -1);
}

/* Closes the surplus past keepalive that has idled MP_POOL_SURPLUS_IDLE,
 * the coldest first (the list is in idle_since order, so the tail is the
 * next to expire), and arms sp->purge for the next one; stops it once no
 * surplus is left. A timer fired a little early re-arms for what is left. */
static void purge_surplus(mp_server_pool_t *sp, struct ev_loop *loop)
{
    ev_tstamp now = ev_now(loop);
    while (sp->nidle > (unsigned)sp->keepalive) {
        ev_tstamp left = sp->idle_tail->idle_since + MP_POOL_SURPLUS_IDLE - now;
        if (left > 0.001) {
            sp->purge.repeat = left;
            ev_timer_again(loop, &sp->purge);
            return;
        }
        mp_upconn_close(sp->idle_tail);
    }
    ev_timer_stop(loop, &sp->purge);
}

static void on_purge(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    purge_surplus(container_of(t, mp_server_pool_t, purge), loop);
}

/* Idle for less than this, a pooled connection is taken without a peek:
 * servers close idle connections after seconds, and the idle watcher has
 * already seen anything that arrived before this loop turn. */
#define PEEK_AFTER_IDLE 1.0

/* A pooled connection is usable when the server has neither closed it nor
 * sent anything: a peek must find nothing to read (RFC 9112 §9.3.1 lets a
 * server close an idle connection at any time). */
static int still_open(mp_io_t *sock)
{
    ssize_t n = mp_io_peek(sock);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

mp_upconn_t *mp_pool_take(mp_server_pool_t *sp, mp_io_ctx_t *ctx)
{
    while (sp->idle) {
        mp_upconn_t *u = sp->idle;
        MP_ASSERT(!u->req);
        unlink_idle(u);
        if (ev_now(ctx->loop) - u->idle_since >= PEEK_AFTER_IDLE && !still_open(&u->sock)) {
            u->state = MP_UP_ACTIVE; /* not in the idle list any more */
            mp_upconn_close(u);
            continue;
        }
        u->state = MP_UP_ACTIVE;
        mp_upconn_want(u, 0);
        mp_upconn_timer(u, 0);
        return u;
    }
    return NULL;
}

int mp_upconn_local_error(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM || err == EADDRNOTAVAIL || err == EAGAIN;
}

mp_upconn_t *mp_upconn_connect(mp_io_ctx_t *ctx, mp_server_pool_t *sp, mp_io_cb io_cb, mp_timer_cb timer_cb)
{
    const mp_addr_t *a = &sp->addr;
    mp_io_t sock;
    int rc = mp_io_connect(&sock, (const struct sockaddr *)&a->ss, a->sslen);
    if (rc < 0)
        return NULL;
    mp_upconn_t *u = calloc(1, sizeof(*u));
    if (!u) {
        mp_io_close(&sock);
        errno = ENOMEM;
        return NULL;
    }
    u->ctx = ctx;
    u->sock = sock;
    u->sp = sp;
    u->state = rc == 0 ? MP_UP_ACTIVE : MP_UP_CONNECTING;
    ev_io_init(&u->io, io_cb, sock.fd, 0);
    ev_init(&u->timer, timer_cb);
    return u;
}

void mp_pool_put(mp_upconn_t *u)
{
    mp_io_ctx_t *ctx = u->ctx;
    mp_server_pool_t *sp = u->sp;
    MP_ASSERT(u->state == MP_UP_ACTIVE);
    if (ctx->stopping || sp->keepalive <= 0)
        return mp_upconn_close(u);
    /* at the cap the coldest goes: u is the one the next request takes */
    while (sp->nidle >= (unsigned)sp->keepalive * MP_POOL_CAP_FACTOR)
        mp_upconn_close(sp->idle_tail);
    mp_buf_release(&u->in, &ctx->bufs);
    mp_buf_release(&u->out, &ctx->bufs);
    u->state = MP_UP_IDLE;
    u->req = NULL;
    u->idle_since = ev_now(ctx->loop);
    u->prev = NULL;
    u->next = sp->idle;
    if (sp->idle)
        sp->idle->prev = u;
    else
        sp->idle_tail = u;
    sp->idle = u;
    sp->nidle++;
    mp_metrics_add(&ctx->metrics.idle_up, 1);
    mp_upconn_want(u, EV_READ);
    mp_upconn_timer(u, sp->keepalive_timeout);
    if (sp->nidle > (unsigned)sp->keepalive && !ev_is_active(&sp->purge))
        purge_surplus(sp, ctx->loop);
}

void mp_pool_idle_event(mp_upconn_t *u)
{
    MP_ASSERT(u->state == MP_UP_IDLE && !u->req);
    mp_upconn_close(u);
}

void mp_upconn_close(mp_upconn_t *u)
{
    mp_io_ctx_t *ctx = u->ctx;
    if (u->state == MP_UP_CLOSED)
        return;
    if (u->state == MP_UP_IDLE)
        unlink_idle(u);
    u->state = MP_UP_CLOSED;
    ev_io_stop(ctx->loop, &u->io);
    ev_timer_stop(ctx->loop, &u->timer);
    mp_io_close(&u->sock);
    mp_buf_release(&u->in, &ctx->bufs);
    mp_buf_release(&u->out, &ctx->bufs);
    u->next = ctx->up_graveyard;
    ctx->up_graveyard = u;
}

void mp_upconn_reap(mp_io_ctx_t *ctx)
{
    while (ctx->up_graveyard) {
        mp_upconn_t *u = ctx->up_graveyard;
        MP_ASSERT(u->state == MP_UP_CLOSED);
        ctx->up_graveyard = u->next;
        free(u);
    }
}

mp_server_pool_t *mp_pool_standalone(mp_io_ctx_t *ctx, const mp_addr_t *addr, const char *tls, int keepalive,
                                     double keepalive_timeout)
{
    mp_server_pool_t *sp = pool_get(ctx, "", addr, tls); /* no upstream is named "" */
    if (sp && !sp->refs) {
        sp->refs = 1; /* until mp_pools_dispose */
        sp->keepalive = keepalive;
        sp->keepalive_timeout = keepalive_timeout;
    }
    return sp;
}

void mp_pools_dispose(mp_io_ctx_t *ctx)
{
    while (ctx->server_pools) {
        mp_server_pool_t *sp = ctx->server_pools;
        sp->refs = 1;
        server_pool_unref(ctx, sp);
    }
}
