/* listener.c: bind and accept. */
#include "listener.h"

#include "conn.h"

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64
#define BACKLOG 4096
#define BACKOFF_SECONDS 0.1 /* a pause on EMFILE: long enough not to spin, short against a full backlog */

#define FD_HEADROOM_MIN 16

static int fd_ceiling = INT_MAX; /* written before the workers start, then only read */

void mp_listener_fd_limit(long long limit)
{
    long long headroom = limit / 64 > FD_HEADROOM_MIN ? limit / 64 : FD_HEADROOM_MIN;
    fd_ceiling = limit <= 0 || limit - headroom > INT_MAX ? INT_MAX : (int)(limit - headroom);
    if (fd_ceiling < FD_HEADROOM_MIN)
        fd_ceiling = FD_HEADROOM_MIN;
}

int mp_listener_open(mp_addr_t *a)
{
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return MP_EIO;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (a->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    /* Accept only once the first bytes are there: no idle accept, no wasted wakeup. */
    int defer = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof(defer));
    if (bind(fd, (struct sockaddr *)&a->ss, a->sslen) != 0 || listen(fd, BACKLOG) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return MP_EIO;
    }
    socklen_t len = a->sslen;
    getsockname(fd, (struct sockaddr *)&a->ss, &len);
    return fd;
}

/* Whether ls's sockets are to be watched now. */
static int want_accept(mp_listeners_t *ls)
{
    return !ls->ctx->stopping && !ls->paused && !ls->backoff && !atomic_load(ls->stuck);
}

void mp_listener_sync(mp_listeners_t *ls)
{
    int on = want_accept(ls);
    for (size_t i = 0; i < ls->n; i++) {
        mp_listener_t *l = &ls->v[i];
        if (l->fd < 0)
            continue;
        if (on)
            ev_io_start(ls->ctx->loop, &l->io);
        else
            ev_io_stop(ls->ctx->loop, &l->io);
    }
}

static void on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_listeners_t *ls = container_of(t, mp_listeners_t, retry);
    ls->backoff = 0;
    mp_listener_sync(ls);
}

/* Out of descriptors or memory: the listener is level-triggered, so
 * retrying at once would spin on the same error. What is queued waits in the
 * kernel's backlog meanwhile (nginx and HAProxy pause the same way). */
static void back_off(mp_listeners_t *ls, const char *why)
{
    static mp_log_limit_t lim;
    if (ls->ctx->stopping)
        return; /* mp_listener_close's last accepts: the sockets close, and the timer may be running */
    mp_env_log_limited(&lim, &ls->ctx->env, MP_LOG_WARN, "accept: %s: not accepting for %.0f ms", why,
                       BACKOFF_SECONDS * 1000);
    ls->backoff = 1;
    mp_listener_sync(ls);
    ev_timer_set(&ls->retry, BACKOFF_SECONDS, 0);
    ev_timer_start(ls->ctx->loop, &ls->retry);
}

/* The TLS of listener l in the current configuration (NULL: plain). A
 * reload that changed the listen addresses keeps the sockets (they apply
 * at the next restart): a socket past the new list is plain. */
static mp_tls_server_t *listen_tls(mp_listeners_t *ls, mp_listener_t *l)
{
    const mp_config_t *cfg = ls->ctx->cfg;
    size_t i = (size_t)(l - ls->v);
    return cfg->listen_tls && i < cfg->nlistens ? cfg->listen_tls[i] : NULL;
}

/* accept(2) passes errors of a connection that died in the queue through. */
static int dead_in_queue(int err)
{
    return err == EINTR || err == ECONNABORTED || err == EPROTO || err == ENETDOWN || err == ENOPROTOOPT ||
           err == EHOSTDOWN || err == ENONET || err == EHOSTUNREACH || err == EOPNOTSUPP || err == ENETUNREACH;
}

static void accept_some(mp_listener_t *l)
{
    mp_listeners_t *ls = l->set;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        /* At the cap, the oldest idle keep-alive connection makes room for
         * one the readiness said is queued; later in the batch that is not
         * known, and the level-triggered watcher calls again if one is. */
        if (ls->ctx->nconns >= (unsigned)ls->ctx->cfg->settings.max_connections) {
            if (i > 0)
                return;
            if (!mp_conn_reclaim_idle(ls->ctx))
                return ls->full(ls->arg);
        }
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (dead_in_queue(errno))
                continue;
            if (errno == EAGAIN)
                return;
            if (errno == EINVAL && atomic_load(ls->stuck))
                return mp_listener_sync(ls); /* the watchdog shut it down: mp_worker_unstick re-opens it */
            return back_off(ls, strerror(errno));
        }
        if (fd >= fd_ceiling) {
            /* accept takes the lowest free number: the descriptors below are
             * all in use, and the headroom is kept for the upstream sockets
             * (a client the proxy cannot forward is no use) and the admin port */
            close(fd);
            return back_off(ls, "file descriptors nearly exhausted (RLIMIT_NOFILE), connection closed");
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        mp_conn_accept(ls->ctx, fd, (struct sockaddr *)&ss, listen_tls(ls, l));
    }
}

static void on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    (void)revents;
    accept_some(container_of(io, mp_listener_t, io));
}

void mp_listener_start(mp_listeners_t *ls)
{
    ev_init(&ls->retry, on_retry);
    for (size_t i = 0; i < ls->n; i++) {
        mp_listener_t *l = &ls->v[i];
        l->set = ls;
        ev_io_init(&l->io, on_accept, l->fd, EV_READ);
    }
    mp_listener_sync(ls);
}

int mp_listener_relisten(mp_listeners_t *ls)
{
    int rc = 0;
    for (size_t i = 0; i < ls->n; i++)
        if (ls->v[i].fd >= 0 && listen(ls->v[i].fd, BACKLOG) != 0)
            rc = MP_EIO;
    return rc;
}

void mp_listener_close(mp_listeners_t *ls)
{
    for (size_t i = 0; i < ls->n; i++) {
        mp_listener_t *l = &ls->v[i];
        if (l->fd < 0)
            continue;
        ev_io_stop(ls->ctx->loop, &l->io);
        if (!atomic_load(ls->stuck))
            accept_some(l); /* what the kernel already queued for this socket would be reset on close */
        /* the watchdog's mark_stuck shuts these fds down under fd_lock (the worker's vm_lock): it
         * must never meet a number close() freed and another socket took */
        pthread_mutex_lock(ls->fd_lock);
        close(l->fd);
        l->fd = -1;
        pthread_mutex_unlock(ls->fd_lock);
    }
    ev_timer_stop(ls->ctx->loop, &ls->retry);
}
