/* io.c: the transport's out-of-line part: opening a connection, and the
 * calls through a transport's ops table. The calls of the request path are
 * static inline in io.h, so that over a plain socket they compile to the
 * syscalls themselves. */
#include "io.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

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
