/* listener.c: bind and accept. */
#include "listener.h"

#include "conn.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64

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
    if (bind(fd, (struct sockaddr *)&a->ss, a->sslen) != 0 || listen(fd, 4096) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return MP_EIO;
    }
    socklen_t len = a->sslen;
    getsockname(fd, (struct sockaddr *)&a->ss, &len);
    return fd;
}

static void accept_some(mp_listener_t *l)
{
    mp_worker_t *w = l->w;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (w->nconns >= (unsigned)w->cfg->settings.max_connections)
            return mp_listener_pause(w, 1);
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                mp_log_warn("w%d: accept: %s", w->id, strerror(errno));
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        mp_conn_accept(w, fd, (struct sockaddr *)&ss);
    }
}

static void on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    (void)revents;
    accept_some(container_of(io, mp_listener_t, io));
}

void mp_listener_start(mp_worker_t *w)
{
    for (size_t i = 0; i < w->nlisteners; i++) {
        mp_listener_t *l = &w->listeners[i];
        l->w = w;
        ev_io_init(&l->io, on_accept, l->fd, EV_READ);
        ev_io_start(w->loop, &l->io);
    }
}

void mp_listener_pause(mp_worker_t *w, int paused)
{
    if (w->accept_paused == paused)
        return;
    w->accept_paused = paused;
    if (paused)
        mp_log_warn("w%d: max_connections (%d) reached: not accepting for now", w->id,
                    w->cfg->settings.max_connections);
    for (size_t i = 0; i < w->nlisteners; i++) {
        mp_listener_t *l = &w->listeners[i];
        if (l->fd < 0)
            continue;
        if (paused)
            ev_io_stop(w->loop, &l->io);
        else
            ev_io_start(w->loop, &l->io);
    }
}

void mp_listener_close(mp_worker_t *w)
{
    for (size_t i = 0; i < w->nlisteners; i++) {
        mp_listener_t *l = &w->listeners[i];
        if (l->fd < 0)
            continue;
        ev_io_stop(w->loop, &l->io);
        accept_some(l); /* what the kernel already queued for this socket would be reset on close */
        close(l->fd);
        l->fd = -1;
    }
}
