/* scripts/bench/wsecho.c - a fast WebSocket echo origin for scripts/bench/websocket.sh.
 *
 *   wsecho PORT [THREADS]
 *
 * Listens on 127.0.0.1:PORT (THREADS threads, default 1, each with its own
 * SO_REUSEPORT listener and epoll loop). On each connection: reads an HTTP/1.1
 * request up to the blank line, answers a WebSocket handshake (RFC 6455:
 * Sec-WebSocket-Accept = base64(SHA-1(key + GUID))) with 101, anything else
 * with 400 and a close. After the 101 it parses the client's frames, unmasks
 * them and echoes each one unmasked with the same FIN bit and opcode (a ping
 * is answered with a pong, a close with a close and then the connection
 * ends), streaming: a frame's payload is echoed as it arrives.
 *
 * Back-pressure: a connection reads only as many bytes as its output buffer
 * has room for (an echoed frame is never longer than the frame read: its
 * header has no mask key), and stops reading while output is pending.
 * Memory per connection is fixed (OUT_CAP). Built by websocket.sh with
 * `cc -O2 ... -lcrypto -lpthread`. No timeouts of its own: websocket.sh kills
 * it by PID.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define OUT_CAP (128 * 1024)
#define REQ_CAP 8192

enum { ST_REQ, ST_HDR, ST_PAY, ST_CLOSING };

struct conn {
    int fd;
    int st;
    size_t reqlen;
    char *req; /* the handshake request, freed after it */
    unsigned char hdr[14];
    size_t hlen;
    uint64_t left; /* payload bytes left in the current frame */
    unsigned char mask[4];
    unsigned moff; /* mask offset */
    int closing;   /* a close frame was echoed: end once out is written */
    unsigned char out[OUT_CAP];
    size_t olen, ooff;
    int want_out;
};

static int port, nthreads = 1;

static void die(const char *m)
{
    perror(m);
    exit(1);
}

static void b64(const unsigned char *in, size_t n, char *out)
{
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        unsigned v = in[i] << 16 | in[i + 1] << 8 | in[i + 2];
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = t[v >> 6 & 63];
        out[o++] = t[v & 63];
    }
    if (i < n) {
        unsigned v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

/* ws_accept KEY -> OUT (29 bytes with the NUL). */
static void ws_accept(const char *key, size_t klen, char *out)
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char buf[128], md[SHA_DIGEST_LENGTH];
    if (klen > 64)
        klen = 64;
    memcpy(buf, key, klen);
    memcpy(buf + klen, guid, sizeof guid - 1);
    SHA1(buf, klen + sizeof guid - 1, md);
    b64(md, sizeof md, out);
}

/* header FIELD's value in the request (case-insensitive name), or NULL. */
static const char *field(const char *req, const char *name, size_t *vlen)
{
    size_t n = strlen(name);
    const char *p = strstr(req, "\r\n");
    while (p && p[2] != '\r') {
        p += 2;
        const char *e = strstr(p, "\r\n");
        if (!e)
            return NULL;
        if ((size_t)(e - p) > n && p[n] == ':' && strncasecmp(p, name, n) == 0) {
            const char *v = p + n + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            const char *ve = e;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
        p = e;
    }
    return NULL;
}

static void out_put(struct conn *c, const void *p, size_t n)
{
    memcpy(c->out + c->olen, p, n);
    c->olen += n;
}

/* handshake C: 0 to go on, -1 to close after writing the answer. */
static int handshake(struct conn *c)
{
    size_t klen = 0, ulen = 0;
    const char *key = field(c->req, "Sec-WebSocket-Key", &klen);
    const char *up = field(c->req, "Upgrade", &ulen);
    if (strncmp(c->req, "GET ", 4) != 0 || !key || !up || ulen != 9 || strncasecmp(up, "websocket", 9) != 0) {
        static const char bad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        out_put(c, bad, sizeof bad - 1);
        return -1;
    }
    char acc[32], resp[256];
    ws_accept(key, klen, acc);
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n\r\n",
                     acc);
    out_put(c, resp, (size_t)n);
    return 0;
}

/* Unmask N bytes from IN to OUT with C's mask at its offset. */
static void unmask(struct conn *c, const unsigned char *in, unsigned char *out, size_t n)
{
    size_t i = 0;
    if (n >= 16) {
        unsigned char m8[8];
        for (int k = 0; k < 8; k++)
            m8[k] = c->mask[(c->moff + k) & 3];
        uint64_t m;
        memcpy(&m, m8, 8);
        for (; i + 8 <= n; i += 8) {
            uint64_t v;
            memcpy(&v, in + i, 8);
            v ^= m;
            memcpy(out + i, &v, 8);
        }
    }
    for (; i < n; i++)
        out[i] = in[i] ^ c->mask[(c->moff + i) & 3];
    c->moff = (unsigned)((c->moff + n) & 3);
}

/* The length of the frame header being read: 2 until its second byte is in. */
static size_t hdr_need(const struct conn *c)
{
    if (c->hlen < 2)
        return 2;
    unsigned l7 = c->hdr[1] & 127;
    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((c->hdr[1] & 128) ? 4 : 0);
}

/* feed N bytes of frames into C; -1 on a protocol error. */
static int feed(struct conn *c, const unsigned char *p, size_t n)
{
    while (n > 0) {
        if (c->st == ST_CLOSING)
            return 0; /* after a close frame: ignore */
        if (c->st == ST_HDR) {
            while (c->hlen < hdr_need(c)) {
                if (!n)
                    return 0;
                c->hdr[c->hlen++] = *p++;
                n--;
            }
            unsigned l7 = c->hdr[1] & 127, masked = c->hdr[1] & 128;
            size_t off = 2;
            uint64_t len = l7;
            if (l7 == 126) {
                len = (uint64_t)c->hdr[2] << 8 | c->hdr[3];
                off = 4;
            } else if (l7 == 127) {
                len = 0;
                for (int i = 0; i < 8; i++)
                    len = len << 8 | c->hdr[2 + i];
                off = 10;
            }
            if (masked)
                memcpy(c->mask, c->hdr + off, 4);
            else
                memset(c->mask, 0, 4);
            unsigned op = c->hdr[0] & 15;
            unsigned char oh[10];
            oh[0] = (unsigned char)(c->hdr[0] & 0x80) | (unsigned char)(op == 9 ? 10 : op);
            size_t ol;
            if (len < 126) {
                oh[1] = (unsigned char)len;
                ol = 2;
            } else if (len < 65536) {
                oh[1] = 126;
                oh[2] = (unsigned char)(len >> 8);
                oh[3] = (unsigned char)len;
                ol = 4;
            } else {
                oh[1] = 127;
                for (int i = 0; i < 8; i++)
                    oh[2 + i] = (unsigned char)(len >> (56 - 8 * i));
                ol = 10;
            }
            out_put(c, oh, ol);
            c->left = len;
            c->moff = 0;
            c->hlen = 0;
            c->st = ST_PAY;
            if (op == 8)
                c->closing = 1;
        }
        if (c->st == ST_PAY) {
            size_t k = c->left < n ? (size_t)c->left : n;
            unmask(c, p, c->out + c->olen, k);
            c->olen += k;
            c->left -= k;
            p += k;
            n -= k;
            if (c->left == 0)
                c->st = c->closing ? ST_CLOSING : ST_HDR;
        }
    }
    return 0;
}

static void conn_free(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->req);
    free(c);
}

static void set_events(int ep, struct conn *c, int out)
{
    if (out == c->want_out)
        return;
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

/* flush: 1 all written, 0 pending, -1 error. */
static int flush(struct conn *c)
{
    while (c->ooff < c->olen) {
        ssize_t w = write(c->fd, c->out + c->ooff, c->olen - c->ooff);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        c->ooff += (size_t)w;
    }
    c->olen = c->ooff = 0;
    return 1;
}

static void on_io(int ep, struct conn *c)
{
    for (;;) {
        int f = flush(c);
        if (f < 0)
            goto gone;
        if (f == 0) {
            set_events(ep, c, 1);
            return;
        }
        if (c->st == ST_CLOSING || c->closing == 2)
            goto gone;
        set_events(ep, c, 0);
        unsigned char buf[OUT_CAP];
        /* an echo is never longer than what was read, but for the header of
         * a frame whose first bytes came in the read before: 10 bytes */
        size_t room = OUT_CAP - 16;
        if (c->st == ST_REQ)
            room = REQ_CAP - 1 - c->reqlen;
        ssize_t r = read(c->fd, c->st == ST_REQ ? (unsigned char *)c->req + c->reqlen : buf, room);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            goto gone;
        }
        if (r == 0)
            goto gone;
        if (c->st == ST_REQ) {
            c->reqlen += (size_t)r;
            c->req[c->reqlen] = 0;
            char *e = strstr(c->req, "\r\n\r\n");
            if (!e) {
                if (c->reqlen >= REQ_CAP - 1)
                    goto gone;
                continue;
            }
            size_t rest = c->reqlen - (size_t)(e + 4 - c->req);
            if (handshake(c) < 0) {
                c->closing = 2;
                continue;
            }
            c->st = ST_HDR;
            if (rest > 0 && feed(c, (unsigned char *)e + 4, rest) < 0)
                goto gone;
            free(c->req);
            c->req = NULL;
        } else if (feed(c, buf, (size_t)r) < 0) {
            goto gone;
        }
    }
gone:
    conn_free(ep, c);
}

static int listener(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(fd, 4096) < 0)
        die("listen");
    return fd;
}

static void *loop(void *arg)
{
    int lfd = (int)(intptr_t)arg, ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c) {
                on_io(ep, c);
                continue;
            }
            for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                if (fd < 0)
                    break;
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                c = calloc(1, sizeof *c);
                if (!c || !(c->req = malloc(REQ_CAP))) {
                    close(fd);
                    free(c);
                    continue;
                }
                c->fd = fd;
                struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: wsecho PORT [THREADS]\n");
        return 2;
    }
    port = atoi(argv[1]);
    if (argc > 2)
        nthreads = atoi(argv[2]);
    if (nthreads < 1)
        nthreads = 1;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    pthread_t t;
    for (int i = 1; i < nthreads; i++)
        pthread_create(&t, NULL, loop, (void *)(intptr_t)listener());
    loop((void *)(intptr_t)listener());
    return 0;
}
