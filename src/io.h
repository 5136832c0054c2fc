/* io.h: the transport under conn, upstream, pool and probe (L3): read,
 * write, writev, sendfile, peek, shutdown, close and connect over a plain
 * socket, or over TLS (an OpenSSL session, through an ops table). The one
 * place those files touch a socket. */
#ifndef MP_IO_H
#define MP_IO_H

#include "common.h"
#include "tls.h"

#include <ev.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* Every call returns what the syscall it stands for returns: a count (0 at
 * EOF), or -1 with errno set; EAGAIN means "call again when the socket is
 * ready", EINTR "call again now". A transport with its own framing (TLS) keeps
 * that convention: it reports a record it cannot finish yet as EAGAIN. A
 * failure stays an errno here; the caller names what it means for its
 * exchange with an err.h mp_err_* (upstream.c). */

typedef struct mp_io mp_io_t;

/* A transport other than the plain socket. Each entry has the contract of
 * the mp_io_* call of its name; sendfile may read the file and write it (a
 * TLS session cannot hand a file to the kernel). */
typedef struct mp_io_ops {
    ssize_t (*read)(mp_io_t *io, void *buf, size_t n);
    ssize_t (*writev)(mp_io_t *io, const struct iovec *iov, int n);
    ssize_t (*sendfile)(mp_io_t *io, int file_fd, off_t *off, size_t n);
    ssize_t (*peek)(mp_io_t *io);
    int (*shutdown_write)(mp_io_t *io);
    void (*close)(mp_io_t *io); /* frees the transport's state; the socket is closed after it */
} mp_io_ops_t;

/* Directions, the values of libev's EV_READ and EV_WRITE. */
enum { MP_IO_READ = 1, MP_IO_WRITE = 2 };

struct mp_io {
    int fd;                 /* the socket, -1 once closed; what the ev_io watcher watches */
    const mp_io_ops_t *ops; /* NULL: a plain socket, the calls are the syscalls themselves */
    void *session;          /* the transport's state (an SSL *), NULL when plain */
    uint8_t read_needs;     /* the socket readiness a blocked read waits for (TLS: MP_IO_WRITE */
    uint8_t write_needs;    /*   when it must send first), and a blocked write's (MP_IO_READ) */
    uint8_t handshaking;    /* a TLS handshake is not done yet (mp_io_handshake) */
};

/* A non-blocking TCP_NODELAY socket to addr, connecting: returns 0 when
 * connected at once, 1 while the connect is in progress (wait until the
 * socket is writable, then ask mp_io_connect_result), or -1 with errno set,
 * nothing left open and io untouched. A TLS transport is put on io once
 * connected: its handshake is one more step before the first request byte. */
int mp_io_connect(mp_io_t *io, const struct sockaddr *addr, socklen_t addrlen);

/* The calls over a transport with an ops table, out of line and cold: over
 * a plain socket each mp_io_* call below inlines to one compare and the
 * syscall. */
#define MP_IO_COLD __attribute__((cold))
MP_IO_COLD ssize_t mp_io_ops_read(mp_io_t *io, void *buf, size_t n);
MP_IO_COLD ssize_t mp_io_ops_writev(mp_io_t *io, const struct iovec *iov, int n);
MP_IO_COLD ssize_t mp_io_ops_write(mp_io_t *io, const void *buf, size_t n);
MP_IO_COLD ssize_t mp_io_ops_sendfile(mp_io_t *io, int file_fd, off_t *off, size_t n);
MP_IO_COLD ssize_t mp_io_ops_peek(mp_io_t *io);
MP_IO_COLD int mp_io_ops_shutdown_write(mp_io_t *io);
MP_IO_COLD void mp_io_ops_close(mp_io_t *io); /* the transport's close; io becomes plain */

/* Makes io a plain socket over fd (owned from now on). */
static inline void mp_io_init(mp_io_t *io, int fd)
{
    io->fd = fd;
    io->ops = NULL;
    io->session = NULL;
    io->read_needs = MP_IO_READ;
    io->write_needs = MP_IO_WRITE;
    io->handshaking = 0;
}

/* TLS over io (a plain socket so far; the session is owned from now on and
 * freed by mp_io_close). The caller drives the handshake with
 * mp_io_handshake before the first read or write, on either side: until it
 * returns 0 nothing else may be called but close. */
void mp_io_tls(mp_io_t *io, SSL *ssl);

/* Drives the handshake: 0 when it is done, MP_EAGAIN while it waits (for
 * the socket readiness in read_needs/write_needs, both set alike, so that a
 * caller waiting for either direction is called back), or MP_EIO when it
 * failed (the reason: mp_tls_error on io->session). Over a plain socket: 0. */
int mp_io_handshake(mp_io_t *io);

/* The socket readiness to watch for a caller that wants `events`
 * (MP_IO_READ | MP_IO_WRITE): a TLS call may need the other direction
 * first (a read that must write a record, a write that must read one). */
static inline int mp_io_events(const mp_io_t *io, int events)
{
    if (MP_LIKELY(!io->ops))
        return events;
    return ((events & MP_IO_READ) ? io->read_needs : 0) | ((events & MP_IO_WRITE) ? io->write_needs : 0);
}

/* The readiness libev reported, as the caller's directions: readiness a
 * blocked call waits for counts as its own direction. */
static inline int mp_io_revents(const mp_io_t *io, int revents)
{
    if (MP_LIKELY(!io->ops))
        return revents;
    return ((revents & io->read_needs) ? MP_IO_READ : 0) | ((revents & io->write_needs) ? MP_IO_WRITE : 0) |
           (revents & ~(MP_IO_READ | MP_IO_WRITE));
}

/* Points watcher w (on io's socket, in loop) at what a caller waiting for
 * direction want (MP_IO_READ or MP_IO_WRITE) needs: over TLS that may be
 * the other readiness. For the main thread's one-exchange connections
 * (admin, probes); the workers' connections also read bytes the session
 * holds (conn.c, pool.c). */
static inline void mp_io_wait_for(struct ev_loop *loop, ev_io *w, const mp_io_t *io, int want)
{
    int events = mp_io_events(io, want);
    if (ev_is_active(w) && (w->events & (EV_READ | EV_WRITE)) == events)
        return;
    ev_io_stop(loop, w);
    ev_io_set(w, io->fd, events);
    ev_io_start(loop, w);
}

/* Whether the transport holds bytes that no socket readiness will announce
 * (TLS records read and not yet returned): a caller that wants to read must
 * read them without waiting (ev_feed_event). */
MP_IO_COLD int mp_io_ops_pending(const mp_io_t *io);
static inline int mp_io_pending(const mp_io_t *io)
{
    if (MP_LIKELY(!io->ops))
        return 0;
    return mp_io_ops_pending(io);
}

/* How the connect started by mp_io_connect ended (SO_ERROR): 0 connected,
 * the error's errno value when it failed, or -1 when the socket could not
 * tell (errno set). */
static inline int mp_io_connect_result(mp_io_t *io)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(io->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        return -1;
    return err;
}

static inline ssize_t mp_io_read(mp_io_t *io, void *buf, size_t n)
{
    if (MP_LIKELY(!io->ops))
        return read(io->fd, buf, n);
    return mp_io_ops_read(io, buf, n);
}

static inline ssize_t mp_io_writev(mp_io_t *io, const struct iovec *iov, int n)
{
    if (MP_LIKELY(!io->ops))
        return writev(io->fd, iov, n);
    return mp_io_ops_writev(io, iov, n);
}

static inline ssize_t mp_io_write(mp_io_t *io, const void *buf, size_t n)
{
    if (MP_LIKELY(!io->ops))
        return write(io->fd, buf, n);
    return mp_io_ops_write(io, buf, n);
}

/* Sends n bytes of file_fd from *off (advanced by what was sent). */
static inline ssize_t mp_io_sendfile(mp_io_t *io, int file_fd, off_t *off, size_t n)
{
    if (MP_LIKELY(!io->ops))
        return sendfile(io->fd, file_fd, off, n);
    return mp_io_ops_sendfile(io, file_fd, off, n);
}

/* Whether bytes wait to be read, without taking them and without blocking
 * (recv MSG_PEEK of one byte): 1 when some wait, 0 when the peer closed, -1
 * with errno EAGAIN when nothing came yet (or another errno on error). */
static inline ssize_t mp_io_peek(mp_io_t *io)
{
    if (MP_LIKELY(!io->ops)) {
        char byte;
        return recv(io->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    }
    return mp_io_ops_peek(io);
}

/* Ends our sending half (shutdown SHUT_WR; a TLS session sends close_notify
 * first). 0, or -1 with errno. */
static inline int mp_io_shutdown_write(mp_io_t *io)
{
    if (MP_LIKELY(!io->ops))
        return shutdown(io->fd, SHUT_WR);
    return mp_io_ops_shutdown_write(io);
}

/* The connection ends in error (a cut response, a timeout): its close
 * sends no TLS close_notify, so that the peer cannot take what it got for
 * whole. Over a plain socket: nothing. */
MP_IO_COLD void mp_io_ops_abort(mp_io_t *io);
static inline void mp_io_abort(mp_io_t *io)
{
    if (MP_UNLIKELY(io->ops != NULL))
        mp_io_ops_abort(io);
}

/* Closes the socket (and the transport over it); io->fd becomes -1. */
static inline void mp_io_close(mp_io_t *io)
{
    if (MP_UNLIKELY(io->ops != NULL))
        mp_io_ops_close(io);
    if (io->fd >= 0) /* a socket another owner took over (tunnel.h) is not ours to close */
        close(io->fd);
    io->fd = -1;
}

#endif
