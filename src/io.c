/* io.c: the transport's out-of-line part: opening a connection. The calls
 * of the request path are static inline in io.h, so that over a plain socket
 * they compile to the syscalls themselves. */
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
