/* pool.c: upstream connections: non-blocking connect, idle keep-alive lists
 * per server, stale detection, delayed free; and the round robin pick. */
#include "pool.h"

#include <errno.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int mp_pool_init_all(mp_worker_t *w)
{
    size_t n = w->cfg->nupstreams;
    w->pools = calloc(n ? n : 1, sizeof(*w->pools));
    if (!w->pools)
        return MP_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        mp_pool_t *p = &w->pools[i];
        p->def = &w->cfg->upstreams[i];
        p->servers = calloc(p->def->nservers, sizeof(*p->servers));
        if (!p->servers)
            return MP_ENOMEM;
    }
    return 0;
}

void mp_pool_dispose_all(mp_worker_t *w)
{
    if (!w->pools)
        return;
    for (size_t i = 0; i < w->cfg->nupstreams; i++) {
        mp_pool_t *p = &w->pools[i];
        for (size_t s = 0; p->servers && s < p->def->nservers; s++)
            while (p->servers[s].idle)
                mp_upconn_close(p->servers[s].idle);
        free(p->servers);
    }
    free(w->pools);
    w->pools = NULL;
    mp_upconn_reap(w);
}

void mp_upconn_want(mp_upconn_t *u, int events)
{
    if ((u->io.events & (EV_READ | EV_WRITE)) == events && (events == 0) == !ev_is_active(&u->io))
        return;
    ev_io_stop(u->w->loop, &u->io);
    ev_io_modify(&u->io, events);
    if (events)
        ev_io_start(u->w->loop, &u->io);
}

void mp_upconn_timer(mp_upconn_t *u, double seconds)
{
    u->timer.repeat = seconds;
    ev_timer_again(u->w->loop, &u->timer);
}

static void unlink_idle(mp_upconn_t *u)
{
    mp_server_pool_t *sp = &u->w->pools[u->upstream].servers[u->server];
    if (u->prev)
        u->prev->next = u->next;
    else
        sp->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->prev = u->next = NULL;
    sp->nidle--;
}

/* Idle for less than this, a pooled connection is taken without a peek:
 * servers close idle connections after seconds, and the idle watcher has
 * already seen anything that arrived before this loop turn. */
#define PEEK_AFTER_IDLE 1.0

/* A pooled connection is usable when the server has neither closed it nor
 * sent anything: a peek must find nothing to read (RFC 9112 §9.3.1 lets a
 * server close an idle connection at any time). */
static int still_open(int fd)
{
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

mp_upconn_t *mp_pool_take(mp_worker_t *w, int upstream, int server)
{
    mp_server_pool_t *sp = &w->pools[upstream].servers[server];
    while (sp->idle) {
        mp_upconn_t *u = sp->idle;
        unlink_idle(u);
        if (ev_now(w->loop) - u->idle_since >= PEEK_AFTER_IDLE && !still_open(u->fd)) {
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

mp_upconn_t *mp_upconn_connect(mp_worker_t *w, int upstream, int server, mp_io_cb io_cb, mp_timer_cb timer_cb)
{
    const mp_addr_t *a = &w->cfg->upstreams[upstream].servers[server].addr;
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = connect(fd, (const struct sockaddr *)&a->ss, a->sslen);
    if (rc != 0 && errno != EINPROGRESS) {
        int saved = errno;
        close(fd);
        errno = saved;
        return NULL;
    }
    mp_upconn_t *u = calloc(1, sizeof(*u));
    if (!u) {
        close(fd);
        errno = ENOMEM;
        return NULL;
    }
    u->w = w;
    u->fd = fd;
    u->upstream = upstream;
    u->server = server;
    u->state = rc == 0 ? MP_UP_ACTIVE : MP_UP_CONNECTING;
    ev_io_init(&u->io, io_cb, fd, 0);
    ev_init(&u->timer, timer_cb);
    return u;
}

void mp_pool_put(mp_upconn_t *u)
{
    mp_worker_t *w = u->w;
    mp_pool_t *p = &w->pools[u->upstream];
    mp_server_pool_t *sp = &p->servers[u->server];
    if (w->stopping || sp->nidle >= (unsigned)p->def->keepalive)
        return mp_upconn_close(u);
    mp_buf_release(&u->in, &w->bufs);
    mp_buf_release(&u->out, &w->bufs);
    u->state = MP_UP_IDLE;
    u->req = NULL;
    u->idle_since = ev_now(w->loop);
    u->prev = NULL;
    u->next = sp->idle;
    if (sp->idle)
        sp->idle->prev = u;
    sp->idle = u;
    sp->nidle++;
    mp_upconn_want(u, EV_READ);
    mp_upconn_timer(u, p->def->keepalive_timeout);
}

void mp_pool_idle_event(mp_upconn_t *u)
{
    mp_upconn_close(u);
}

void mp_upconn_close(mp_upconn_t *u)
{
    mp_worker_t *w = u->w;
    if (u->state == MP_UP_CLOSED)
        return;
    if (u->state == MP_UP_IDLE)
        unlink_idle(u);
    u->state = MP_UP_CLOSED;
    ev_io_stop(w->loop, &u->io);
    ev_timer_stop(w->loop, &u->timer);
    close(u->fd);
    u->fd = -1;
    mp_buf_release(&u->in, &w->bufs);
    mp_buf_release(&u->out, &w->bufs);
    u->next = w->up_graveyard;
    w->up_graveyard = u;
}

void mp_upconn_reap(mp_worker_t *w)
{
    while (w->up_graveyard) {
        mp_upconn_t *u = w->up_graveyard;
        w->up_graveyard = u->next;
        free(u);
    }
}

int mp_balancer_pick(mp_pool_t *p, int avoid)
{
    unsigned n = (unsigned)p->def->nservers;
    unsigned i = p->rr++ % n;
    if (n > 1 && (int)i == avoid)
        i = p->rr++ % n;
    return (int)i;
}
