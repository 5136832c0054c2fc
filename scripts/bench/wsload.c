/* scripts/bench/wsload.c - WebSocket load client for scripts/bench/websocket.sh.
 *
 *   wsload -p PORT [-T] [-c CONNS] [-s SIZE] [-d SECONDS] [-w WINDOW] [-t TIMEOUT]
 *   wsload -p PORT [-T] -i -c CONNS [-s SIZE] [-f STOPFILE] [-H HOLD]
 *
 * Opens CONNS connections to 127.0.0.1:PORT, does the WebSocket handshake on
 * each (a 101 with the right Sec-WebSocket-Accept, or it fails), then keeps
 * WINDOW masked binary messages of SIZE bytes in flight on every connection for
 * SECONDS: each echo received whole (its payload compared with what was sent)
 * sends the next. After SECONDS no new message is sent and the ones in flight
 * are awaited (at most TIMEOUT s). Prints one line:
 *   ok conns=K msgs=M bytes=B secs=S msgs_per_s=R mib_per_s=T
 * with secs from the end of the handshakes to the last echo. On any failure
 * (refused handshake, connection closed, wrong echo, no progress for TIMEOUT
 * seconds) it prints "error: WHY" and exits 1, so a proxy that does not
 * tunnel fails fast instead of hanging.
 *
 * -i (idle): opens CONNS tunnels (at most 100 handshakes at a time), one echo
 * of SIZE on each, prints "opened K" and holds them idle until STOPFILE exists
 * or HOLD seconds (default 120) have passed; then prints
 * "closed_by_peer N" (tunnels the far side closed while idle) and exits.
 *
 * -T: TLS to the proxy (OpenSSL, no certificate verification), one full
 * handshake per connection.
 *
 * The mask key is the same for every frame (fine for a benchmark: no proxy
 * here looks at it), so the frames sent are one prebuilt buffer. Built by
 * websocket.sh with `cc -O2 ... -lssl -lcrypto`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum { ST_CONNECT, ST_HS, ST_RUN, ST_IDLE, ST_DONE };

struct conn {
    int fd, st;
    SSL *ssl; /* -T: TLS to the proxy */
    int tls_done;
    char hs[4096];
    size_t hslen, hsoff; /* handshake: response bytes read / request bytes sent */
    uint64_t qsend;      /* bytes of frames queued and not yet written */
    size_t spos;         /* where in the frame buffer the next write starts */
    int inflight;        /* messages sent (or queued) whose echo is not whole yet */
    uint64_t msgs;
    unsigned char hdr[10];
    size_t hlen;
    uint64_t left, poff; /* payload bytes left / offset in the current echo */
};

static int port = 0, nconns = 1, window = 1, idle = 0, use_tls = 0;
static SSL_CTX *tls_ctx;
static size_t size = 32;
static double duration = 5, io_timeout = 5, hold = 120;
static const char *stopfile = NULL;

static unsigned char *payload; /* what every message carries */
static unsigned char *frames;  /* REP masked frames back to back */
static size_t flen, fbuflen;   /* one frame, the whole buffer */
static const unsigned char mkey[4] = {0x37, 0xfa, 0x21, 0x3d};

static struct conn *conns;
static int ep;
static uint64_t total_msgs, total_inflight;
static double last_progress;

static const char req_fmt[] =
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
static char req[512];
static size_t reqlen;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("error: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static void build_frames(void)
{
    payload = malloc(size ? size : 1);
    for (size_t i = 0; i < size; i++)
        payload[i] = (unsigned char)(i * 131 + 7);
    unsigned char h[14];
    size_t hl;
    h[0] = 0x82; /* FIN, binary */
    if (size < 126) {
        h[1] = 0x80 | (unsigned char)size;
        hl = 2;
    } else if (size < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (unsigned char)(size >> 8);
        h[3] = (unsigned char)size;
        hl = 4;
    } else {
        h[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
        hl = 10;
    }
    memcpy(h + hl, mkey, 4);
    hl += 4;
    flen = hl + size;
    size_t rep = 65536 / flen;
    if (rep < 1)
        rep = 1;
    if (rep > (size_t)window)
        rep = (size_t)window;
    fbuflen = rep * flen;
    frames = malloc(fbuflen);
    for (size_t r = 0; r < rep; r++) {
        unsigned char *f = frames + r * flen;
        memcpy(f, h, hl);
        for (size_t i = 0; i < size; i++)
            f[hl + i] = payload[i] ^ mkey[i & 3];
    }
}

/* read(2)/write(2), or their TLS versions: -1 with errno EAGAIN when TLS
 * wants either direction, 0 at the end. */
static ssize_t tls_result(struct conn *c, int r)
{
    if (r > 0)
        return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    errno = EPROTO;
    return -1;
}

static ssize_t io_read(struct conn *c, void *b, size_t n)
{
    if (!c->ssl)
        return read(c->fd, b, n);
    return tls_result(c, SSL_read(c->ssl, b, (int)(n > 1 << 30 ? 1 << 30 : n)));
}

static ssize_t io_write(struct conn *c, const void *b, size_t n)
{
    if (!c->ssl)
        return write(c->fd, b, n);
    return tls_result(c, SSL_write(c->ssl, b, (int)(n > 1 << 30 ? 1 << 30 : n)));
}

static void want(struct conn *c, unsigned ev)
{
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void conn_open(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0)
        fail("socket: %s", strerror(errno));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)
        fail("connect: %s", strerror(errno));
    c->fd = fd;
    c->st = ST_CONNECT;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

static void queue_msg(struct conn *c)
{
    c->qsend += flen;
    c->inflight++;
    total_inflight++;
}

/* write what is queued; EPOLLOUT while some is left. */
static void send_some(struct conn *c)
{
    while (c->qsend > 0) {
        size_t n = fbuflen - c->spos;
        if (n > c->qsend)
            n = (size_t)c->qsend;
        ssize_t w = io_write(c, frames + c->spos, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            fail("write: %s", strerror(errno));
        }
        c->qsend -= (uint64_t)w;
        c->spos = (c->spos + (size_t)w) % fbuflen;
        /* spos stays on a frame boundary modulo flen only when the buffer
         * is whole frames: it is (fbuflen = rep * flen). */
    }
    want(c, c->qsend > 0 ? EPOLLIN | EPOLLOUT : EPOLLIN);
}

static size_t hdr_need(const struct conn *c)
{
    if (c->hlen < 2)
        return 2;
    unsigned l7 = c->hdr[1] & 127;
    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0);
}

/* one whole echo on C: count it, maybe send the next. */
static int running = 1;
static void echoed(struct conn *c)
{
    c->msgs++;
    total_msgs++;
    c->inflight--;
    total_inflight--;
    if (c->st == ST_RUN && running) {
        queue_msg(c);
        send_some(c);
    }
}

/* parse N bytes of the server's frames (unmasked, FIN, binary, SIZE long). */
static void feed(struct conn *c, const unsigned char *p, size_t n)
{
    while (n > 0) {
        if (c->left == 0 && c->hlen < hdr_need(c)) {
            c->hdr[c->hlen++] = *p++;
            n--;
            if (c->hlen < hdr_need(c))
                continue;
            unsigned l7 = c->hdr[1] & 127;
            uint64_t len = l7;
            if (l7 == 126)
                len = (uint64_t)c->hdr[2] << 8 | c->hdr[3];
            else if (l7 == 127) {
                len = 0;
                for (int i = 0; i < 8; i++)
                    len = len << 8 | c->hdr[2 + i];
            }
            if (c->hdr[0] != 0x82 || (c->hdr[1] & 0x80)) {
                char shown[16];
                size_t k = 0;
                for (int i = 0; i < 2; i++) {
                    unsigned char b = c->hdr[i];
                    k += (size_t)snprintf(shown + k, sizeof shown - k,
                                          b == '\r'            ? "\\r"
                                          : b == '\n'          ? "\\n"
                                          : b >= 32 && b < 127 ? "%c"
                                                               : "\\x%02x",
                                          b);
                }
                fail("after the 101, bytes that are not the echo's frame header (\"%s\"): the proxy did not tunnel?",
                     shown);
            }
            if (len != size)
                fail("echo of %llu bytes, sent %zu", (unsigned long long)len, size);
            c->left = len;
            c->poff = 0;
            if (len == 0) {
                c->hlen = 0;
                echoed(c);
            }
            continue;
        }
        size_t k = c->left < n ? (size_t)c->left : n;
        if (memcmp(p, payload + c->poff, k) != 0)
            fail("echoed payload differs from what was sent (at byte %llu)", (unsigned long long)c->poff);
        c->poff += k;
        c->left -= k;
        p += k;
        n -= k;
        if (c->left == 0) {
            c->hlen = 0;
            echoed(c);
        }
    }
}

static int handshakes_left;

static void on_handshake(struct conn *c)
{
    if (c->st == ST_CONNECT) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err)
            fail("connect to 127.0.0.1:%d: %s", port, strerror(err));
        c->st = ST_HS;
        if (use_tls) {
            c->ssl = SSL_new(tls_ctx);
            SSL_set_fd(c->ssl, c->fd);
        }
    }
    if (c->ssl && !c->tls_done) {
        int r = SSL_connect(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                want(c, e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT);
                return;
            }
            unsigned long ee = ERR_get_error();
            fail("TLS handshake with 127.0.0.1:%d failed: %s", port, ee ? ERR_reason_error_string(ee) : "closed");
        }
        c->tls_done = 1;
    }
    while (c->hsoff < reqlen) {
        ssize_t w = io_write(c, req + c->hsoff, reqlen - c->hsoff);
        if (w < 0) {
            if (errno == EAGAIN) {
                want(c, EPOLLIN | EPOLLOUT);
                return;
            }
            fail("write (handshake): %s", strerror(errno));
        }
        c->hsoff += (size_t)w;
    }
    want(c, EPOLLIN);
    for (;;) {
        ssize_t r = io_read(c, c->hs + c->hslen, sizeof c->hs - 1 - c->hslen);
        if (r < 0) {
            if (errno == EAGAIN)
                return;
            fail("read (handshake): %s", strerror(errno));
        }
        if (r == 0)
            fail("connection closed before a handshake answer%s%.*s", c->hslen ? ": " : "",
                 (int)(strcspn(c->hs, "\r\n")), c->hs);
        c->hslen += (size_t)r;
        c->hs[c->hslen] = 0;
        char *e = strstr(c->hs, "\r\n\r\n");
        if (!e) {
            if (c->hslen >= sizeof c->hs - 1)
                fail("handshake answer head too long");
            continue;
        }
        if (strncmp(c->hs, "HTTP/1.1 101", 12) != 0)
            fail("handshake answered \"%.*s\", not 101", (int)strcspn(c->hs, "\r\n"), c->hs);
        if (!strcasestr(c->hs, "\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"))
            fail("101 without the right Sec-WebSocket-Accept");
        size_t rest = c->hslen - (size_t)(e + 4 - c->hs);
        c->st = idle ? ST_IDLE : ST_RUN;
        handshakes_left--;
        if (rest)
            feed(c, (unsigned char *)e + 4, rest);
        return;
    }
}

static void on_data(struct conn *c)
{
    static unsigned char buf[256 * 1024];
    for (;;) {
        ssize_t r = io_read(c, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            fail("read: %s", strerror(errno));
        }
        if (r == 0) {
            if (idle && c->st == ST_IDLE && c->inflight == 0) {
                c->st = ST_DONE; /* counted by the idle loop */
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                return;
            }
            fail("connection closed by the proxy after %llu echoes", (unsigned long long)c->msgs);
        }
        last_progress = now();
        feed(c, buf, (size_t)r);
    }
}

static void dispatch(struct epoll_event *e)
{
    struct conn *c = e->data.ptr;
    if (c->st == ST_CONNECT || c->st == ST_HS) {
        on_handshake(c);
        return;
    }
    if (c->st == ST_DONE)
        return;
    if (e->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        on_data(c);
    if ((e->events & EPOLLOUT) && c->qsend > 0)
        send_some(c);
}

static int poll_once(int ms)
{
    struct epoll_event evs[256];
    int n = epoll_wait(ep, evs, 256, ms);
    if (n < 0 && errno != EINTR)
        fail("epoll_wait: %s", strerror(errno));
    for (int i = 0; i < n; i++)
        dispatch(&evs[i]);
    return n;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: wsload -p PORT [-T] [-c CONNS] [-s SIZE] [-d SECONDS] [-w WINDOW] [-t TIMEOUT]\n"
            "       wsload -p PORT [-T] -i -c CONNS [-s SIZE] [-f STOPFILE] [-H HOLD]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int o;
    while ((o = getopt(argc, argv, "p:c:s:d:w:t:if:H:T")) != -1) {
        switch (o) {
        case 'p': port = atoi(optarg); break;
        case 'c': nconns = atoi(optarg); break;
        case 's': size = (size_t)strtoull(optarg, NULL, 10); break;
        case 'd': duration = atof(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 't': io_timeout = atof(optarg); break;
        case 'T': use_tls = 1; break;
        case 'i': idle = 1; break;
        case 'f': stopfile = optarg; break;
        case 'H': hold = atof(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || nconns < 1 || window < 1)
        usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)nconns + 16)
            fail("RLIMIT_NOFILE %llu is too low for %d connections", (unsigned long long)rl.rlim_cur, nconns);
    }
    if (use_tls) {
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (!tls_ctx)
            fail("SSL_CTX_new failed");
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    }
    reqlen = (size_t)snprintf(req, sizeof req, req_fmt, port);
    if (idle)
        window = 1;
    build_frames();
    conns = calloc((size_t)nconns, sizeof *conns);
    ep = epoll_create1(0);

    /* handshakes, at most 100 under way at once */
    double t = now(), deadline = t + io_timeout + nconns / 100.0 * io_timeout;
    int opened = 0;
    handshakes_left = 0;
    while (opened < nconns || handshakes_left > 0) {
        while (opened < nconns && handshakes_left < 100) {
            conn_open(&conns[opened++]);
            handshakes_left++;
        }
        poll_once(100);
        if (now() > deadline)
            fail("handshakes not done within %.0f s (%d of %d answered)", deadline - t, opened - handshakes_left,
                 nconns);
    }

    double t0 = now(), end = t0 + duration;
    last_progress = t0;
    for (int i = 0; i < nconns; i++) {
        for (int k = 0; k < window; k++)
            queue_msg(&conns[i]);
        send_some(&conns[i]);
    }
    if (idle) {
        /* one echo on each, then idle */
        while (total_msgs < (uint64_t)nconns) {
            poll_once(100);
            if (now() - last_progress > io_timeout)
                fail("no echo for %.0f s (%llu of %d tunnels echoed)", io_timeout, (unsigned long long)total_msgs,
                     nconns);
        }
        printf("opened %d\n", nconns);
        fflush(stdout);
        double stop_at = now() + hold;
        while (now() < stop_at && !(stopfile && access(stopfile, F_OK) == 0))
            poll_once(200);
        int closed = 0;
        for (int i = 0; i < nconns; i++)
            closed += conns[i].st == ST_DONE;
        printf("closed_by_peer %d\n", closed);
        return 0;
    }
    do {
        poll_once(100);
        double tn = now();
        if (tn >= end)
            running = 0;
        if (tn - last_progress > io_timeout)
            fail("no echo for %.0f s (%llu messages echoed before)", io_timeout, (unsigned long long)total_msgs);
    } while (running || total_inflight > 0);
    for (int i = 0; i < nconns; i++)
        if (conns[i].msgs == 0)
            fail("connection %d got no echo", i);
    double secs = last_progress - t0; /* to the last bytes read */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("ok conns=%d msgs=%llu bytes=%llu secs=%.3f msgs_per_s=%.0f mib_per_s=%.1f cpu_s=%.2f\n", nconns,
           (unsigned long long)total_msgs, (unsigned long long)(total_msgs * size), secs, total_msgs / secs,
           (double)(total_msgs * size) / secs / 1048576.0, cpu);
    return 0;
}
