/* io.c: the transport's out-of-line part: opening a connection, the calls
 * through a transport's ops table, and the TLS transport (OpenSSL). The calls of the request path are
 * static inline in io.h, so that over a plain socket they compile to the
 * syscalls themselves. */
#include "io.h"

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <string.h>

int mp_io_connect(mp_io_t *io, const struct sockaddr *addr, socklen_t addrlen)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, addr, addrlen) == 0) {
        mp_io_init(io, fd);
        return 0;
    }
    if (errno == EINPROGRESS) {
        mp_io_init(io, fd);
        return 1;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

ssize_t mp_io_ops_read(mp_io_t *io, void *buf, size_t n)
{
    return io->ops->read(io, buf, n);
}

ssize_t mp_io_ops_writev(mp_io_t *io, const struct iovec *iov, int n)
{
    return io->ops->writev(io, iov, n);
}

ssize_t mp_io_ops_write(mp_io_t *io, const void *buf, size_t n)
{
    struct iovec iov = {(void *)buf, n};
    return io->ops->writev(io, &iov, 1);
}

ssize_t mp_io_ops_sendfile(mp_io_t *io, int file_fd, off_t *off, size_t n)
{
    return io->ops->sendfile(io, file_fd, off, n);
}

ssize_t mp_io_ops_peek(mp_io_t *io)
{
    return io->ops->peek(io);
}

int mp_io_ops_shutdown_write(mp_io_t *io)
{
    return io->ops->shutdown_write(io);
}

void mp_io_ops_close(mp_io_t *io)
{
    io->ops->close(io);
    io->ops = NULL;
    io->session = NULL;
}

/* TLS over the socket: an OpenSSL session (tls.c made it) whose record
 * layer reads and writes the non-blocking fd itself. Each call starts with
 * an empty error queue (SSL_get_error needs one), and a call that blocks
 * records which readiness it waits for in read_needs / write_needs. */

#define TLS_RECORD 16384 /* the largest plaintext of one record: what a write gathers */

static _Thread_local char tls_scratch[TLS_RECORD];

/* The result of an SSL call that returned rc <= 0, as a syscall would say
 * it; *needs is the blocked direction's readiness. */
static ssize_t tls_failed(mp_io_t *io, int rc, uint8_t *needs)
{
    SSL *ssl = io->session;
    int saved = errno;
    switch (SSL_get_error(ssl, rc)) {
    case SSL_ERROR_WANT_READ:
        *needs = MP_IO_READ;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        *needs = MP_IO_WRITE;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN: return 0; /* close_notify (or EOF: SSL_OP_IGNORE_UNEXPECTED_EOF) */
    case SSL_ERROR_SYSCALL:
        SSL_set_quiet_shutdown(ssl, 1);
        errno = saved ? saved : ECONNRESET;
        return -1;
    default: /* a protocol error: the session is unusable, say nothing more on it */
        SSL_set_quiet_shutdown(ssl, 1);
        errno = EPROTO;
        return -1;
    }
}

static int tls_len(size_t n)
{
    return n > INT_MAX ? INT_MAX : (int)n;
}

static ssize_t tls_read(mp_io_t *io, void *buf, size_t n)
{
    ERR_clear_error();
    int k = SSL_read(io->session, buf, tls_len(n));
    if (k > 0) {
        io->read_needs = MP_IO_READ;
        return k;
    }
    return tls_failed(io, k, &io->read_needs);
}

static ssize_t tls_write(mp_io_t *io, const void *buf, size_t n)
{
    if (n == 0)
        return 0;
    ERR_clear_error();
    int k = SSL_write(io->session, buf, tls_len(n));
    if (k > 0) {
        io->write_needs = MP_IO_WRITE;
        return k;
    }
    return tls_failed(io, k, &io->write_needs);
}

/* Small pieces (a head, then a body) go out as one record, gathered in a
 * scratch buffer; a large first piece is written in place. What is gathered
 * depends only on the bytes, so a write retried after EAGAIN with the same
 * (or more) bytes offers OpenSSL the same record, as it requires. */
static ssize_t tls_writev(mp_io_t *io, const struct iovec *iov, int n)
{
    int i = 0, more = 0;
    while (i < n && iov[i].iov_len == 0)
        i++;
    if (i == n)
        return 0;
    for (int j = i + 1; j < n && !more; j++)
        more = iov[j].iov_len > 0;
    if (iov[i].iov_len >= TLS_RECORD || !more)
        return tls_write(io, iov[i].iov_base, iov[i].iov_len);
    size_t len = 0;
    for (; i < n && len < TLS_RECORD; i++) {
        size_t k = iov[i].iov_len < TLS_RECORD - len ? iov[i].iov_len : TLS_RECORD - len;
        if (k) /* an empty piece may have no base */
            memcpy(tls_scratch + len, iov[i].iov_base, k);
        len += k;
    }
    return tls_write(io, tls_scratch, len);
}

/* A file over TLS: the kernel encrypts it when kernel TLS is on for this
 * session, else it is read here a record at a time (pread: a retry reads
 * the same bytes again). */
static ssize_t tls_sendfile(mp_io_t *io, int file_fd, off_t *off, size_t n)
{
#ifndef OPENSSL_NO_KTLS
    if (BIO_get_ktls_send(SSL_get_wbio(io->session))) {
        ERR_clear_error();
        ossl_ssize_t k = SSL_sendfile(io->session, file_fd, *off, n, 0);
        if (k > 0) {
            *off += k;
            io->write_needs = MP_IO_WRITE;
            return k;
        }
        return tls_failed(io, (int)k, &io->write_needs);
    }
#endif
    ssize_t got = pread(file_fd, tls_scratch, n < TLS_RECORD ? n : TLS_RECORD, *off);
    if (got <= 0)
        return got;
    ssize_t k = tls_write(io, tls_scratch, (size_t)got);
    if (k > 0)
        *off += k;
    return k;
}

static ssize_t tls_peek(mp_io_t *io)
{
    if (SSL_has_pending(io->session))
        return 1;
    char byte;
    return recv(io->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
}

/* close_notify, when the session is sound and it was not sent yet (best
 * effort: a full socket buffer drops it, as a close would). */
static void tls_notify(mp_io_t *io)
{
    SSL *ssl = io->session;
    if (io->handshaking || SSL_get_quiet_shutdown(ssl) || (SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN))
        return;
    ERR_clear_error();
    SSL_shutdown(ssl);
}

static int tls_shutdown_write(mp_io_t *io)
{
    tls_notify(io);
    return shutdown(io->fd, SHUT_WR);
}

static void tls_close(mp_io_t *io)
{
    tls_notify(io);
    SSL_free(io->session);
    ERR_clear_error();
}

static const mp_io_ops_t tls_ops = {
    .read = tls_read,
    .writev = tls_writev,
    .sendfile = tls_sendfile,
    .peek = tls_peek,
    .shutdown_write = tls_shutdown_write,
    .close = tls_close,
};

void mp_io_tls(mp_io_t *io, SSL *ssl)
{
    io->ops = &tls_ops;
    io->session = ssl;
    io->handshaking = 1;
}

int mp_io_handshake(mp_io_t *io)
{
    if (!io->handshaking)
        return 0;
    ERR_clear_error();
    int rc = SSL_do_handshake(io->session);
    if (rc == 1) {
        io->handshaking = 0;
        io->read_needs = MP_IO_READ;
        io->write_needs = MP_IO_WRITE;
        return 0;
    }
    uint8_t needs = MP_IO_READ;
    if (tls_failed(io, rc, &needs) < 0 && errno == EAGAIN) {
        io->read_needs = io->write_needs = needs;
        return MP_EAGAIN;
    }
    SSL_set_quiet_shutdown(io->session, 1);
    return MP_EIO;
}

/* Decrypted bytes only (SSL_pending): SSL_has_pending also counts the
 * start of a record still arriving, which no read can return yet, and
 * feeding a read for it would spin. Without read-ahead (the contexts never
 * set it) OpenSSL takes one record at a time from the socket, so nothing
 * whole waits behind the current record. */
void mp_io_ops_abort(mp_io_t *io)
{
    if (io->ops == &tls_ops)
        SSL_set_quiet_shutdown(io->session, 1);
}

int mp_io_ops_pending(const mp_io_t *io)
{
    return io->session && !io->handshaking && SSL_pending(io->session) > 0;
}
