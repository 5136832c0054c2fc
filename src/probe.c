/* probe.c: active health checks on the main thread's loop: one small HTTP
 * exchange per server per interval, non-blocking, with a timeout; over TLS
 * when the upstream's servers speak it (the handshake is part of the check,
 * and its failure a failed probe). A probe holds the TLS context of the
 * configuration it was last synced with (mp_tls_client_hold), so a reload
 * never frees it under a probe. */
#include "probe.h"

#include "health.h"
#include "log.h"
#include "pool.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

enum { IDLE, CONNECTING, HANDSHAKE, SENDING, READING };

typedef struct probe {
    mp_probes_t *pr;
    mp_peer_t *peer;
    struct sockaddr_storage ss;
    socklen_t sslen;
    char *path, *host;
    double interval, timeout;
    int rise, fall;
    mp_statuses_t statuses;
    mp_tls_client_t *tls; /* held; NULL: plain TCP */
    char *tls_name;       /* SNI and the name verified */
    SSL_SESSION *session; /* to resume the next probe's handshake with */
    int stale_session;    /* synced since: the next probe starts without it */
    ev_timer timer;       /* the next probe, or the current one's timeout */
    ev_io io;
    mp_io_t sock;
    int state;
    char buf[1024]; /* the request, then the start of the response */
    size_t len, sent;
    int ok, bad; /* streaks */
    int seen;    /* in the configuration being synced */
    struct probe *next;
} probe_t;

struct mp_probes {
    struct ev_loop *loop;
    probe_t *list;
    uint64_t rng;
};

static void on_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void on_io(struct ev_loop *loop, ev_io *io, int revents);

static void stop_exchange(probe_t *p)
{
    ev_io_stop(p->pr->loop, &p->io);
    if (p->sock.fd >= 0)
        mp_io_close(&p->sock);
    p->state = IDLE;
}

static int expected(const probe_t *p, int status)
{
    if (p->statuses.n == 0)
        return status >= 200 && status < 400;
    for (int i = 0; i < p->statuses.n; i++)
        if (p->statuses.codes[i] == status)
            return 1;
    return 0;
}

/* One probe ended: count it, maybe flip the server, schedule the next. */
static void verdict(probe_t *p, int good, const char *why)
{
    stop_exchange(p);
    mp_peer_t *peer = p->peer;
    if (good) {
        p->bad = 0;
        if (++p->ok >= p->rise && !peer->probe_up) {
            peer->probe_up = 1;
            mp_log_warn("health: upstream %s server %s is up (%d good probes)", peer->upstream, peer->addr, p->ok);
        }
    } else {
        p->ok = 0;
        if (++p->bad >= p->fall && peer->probe_up) {
            peer->probe_up = 0;
            mp_log_warn("health: upstream %s server %s is down after %d failed probes (last: %s)", peer->upstream,
                        peer->addr, p->bad, why);
        }
    }
    ev_timer_stop(p->pr->loop, &p->timer);
    ev_timer_set(&p->timer, p->interval, 0);
    ev_timer_start(p->pr->loop, &p->timer);
}

/* The proxy could not open the probe's socket (mp_upconn_local_error): no
 * verdict on the server, the next probe after an interval. */
static void skip(probe_t *p, int err)
{
    static mp_log_limit_t lim;
    mp_log_limited(&lim, MP_LOG_ERROR, "health: cannot probe upstream %s server %s: %s (not counted against it)",
                   p->peer->upstream, p->peer->addr, strerror(err));
    stop_exchange(p);
    ev_timer_stop(p->pr->loop, &p->timer);
    ev_timer_set(&p->timer, p->interval, 0);
    ev_timer_start(p->pr->loop, &p->timer);
}

/* Waits until the exchange can go on in direction want (MP_IO_READ or
 * MP_IO_WRITE): over TLS that may be the other readiness (io.h). */
static void wait_for(probe_t *p, int want)
{
    mp_io_wait_for(p->pr->loop, &p->io, &p->sock, want);
}

static void start(probe_t *p)
{
    struct ev_loop *loop = p->pr->loop;
    if (p->stale_session) {
        /* made under the previous configuration's context: its checks may
         * have changed, and a resumed session is not verified again */
        mp_tls_session_free(&p->session);
        p->stale_session = 0;
    }
    if (mp_io_connect(&p->sock, (struct sockaddr *)&p->ss, p->sslen) < 0)
        return mp_upconn_local_error(errno) ? skip(p, errno) : verdict(p, 0, strerror(errno));
    int n = snprintf(p->buf, sizeof(p->buf),
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: moonproxy-health\r\nConnection: close\r\n\r\n",
                     p->path, p->host ? p->host : p->peer->addr);
    p->len = n < (int)sizeof(p->buf) ? (size_t)n : sizeof(p->buf) - 1;
    p->sent = 0;
    p->state = CONNECTING;
    wait_for(p, MP_IO_WRITE);
    ev_timer_stop(loop, &p->timer);
    ev_timer_set(&p->timer, p->timeout, 0);
    ev_timer_start(loop, &p->timer);
}

static void on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    probe_t *p = container_of(t, probe_t, timer);
    if (p->state == IDLE)
        return start(p);
    verdict(p, 0, "timed out");
}

/* Connected: over TLS, the session (the handshake comes next). */
static void connected(probe_t *p)
{
    p->state = SENDING;
    if (!p->tls)
        return;
    SSL *ssl = mp_tls_client_session(p->tls, p->sock.fd, p->tls_name, &p->session);
    if (!ssl)
        return skip(p, ENOMEM);
    mp_io_tls(&p->sock, ssl);
    p->state = HANDSHAKE;
}

static void on_writable(probe_t *p)
{
    if (p->state == CONNECTING) {
        int err = mp_io_connect_result(&p->sock);
        if (err != 0)
            return verdict(p, 0, err > 0 ? strerror(err) : "connect failed");
        connected(p);
        if (p->state == IDLE)
            return; /* skipped */
    }
    if (p->state == HANDSHAKE) {
        int rc = mp_io_handshake(&p->sock);
        if (rc == MP_EAGAIN)
            return wait_for(p, MP_IO_WRITE);
        char why[160];
        if (rc != 0)
            return verdict(p, 0, mp_tls_error(p->sock.session, why, sizeof(why)));
        p->state = SENDING;
    }
    ssize_t n = mp_io_write(&p->sock, p->buf + p->sent, p->len - p->sent);
    if (n < 0 && errno != EAGAIN && errno != EINTR)
        return verdict(p, 0, strerror(errno));
    if (n > 0 && (p->sent += (size_t)n) == p->len) {
        p->state = READING;
        p->len = 0;
        return wait_for(p, MP_IO_READ);
    }
    wait_for(p, MP_IO_WRITE);
}

/* Only the status line matters: "HTTP/1.x NNN". */
static void on_readable(probe_t *p)
{
    ssize_t n = mp_io_read(&p->sock, p->buf + p->len, sizeof(p->buf) - 1 - p->len);
    if (n < 0 && errno == EINTR)
        return on_readable(p);
    if (n < 0 && errno == EAGAIN)
        return wait_for(p, MP_IO_READ);
    if (n <= 0)
        return verdict(p, 0, n == 0 ? "closed before answering" : strerror(errno));
    p->len += (size_t)n;
    if (p->len < 12)
        return mp_io_pending(&p->sock) ? on_readable(p) : wait_for(p, MP_IO_READ);
    const char *b = p->buf;
    if (memcmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ' || b[9] < '1' || b[9] > '9' || b[10] < '0' || b[10] > '9' ||
        b[11] < '0' || b[11] > '9')
        return verdict(p, 0, "not an HTTP response");
    int status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    char why[32];
    snprintf(why, sizeof(why), "status %d", status);
    verdict(p, expected(p, status), why);
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    probe_t *p = container_of(io, probe_t, io);
    revents = mp_io_revents(&p->sock, revents);
    if (p->state == READING && (revents & MP_IO_READ))
        on_readable(p);
    else if (p->state != READING && (revents & MP_IO_WRITE))
        on_writable(p);
}

mp_probes_t *mp_probes_new(struct ev_loop *loop)
{
    mp_probes_t *pr = calloc(1, sizeof(*pr));
    if (pr) {
        pr->loop = loop;
        pr->rng = (uint64_t)getpid() * 0x9e3779b97f4a7c15ull | 1;
    }
    return pr;
}

static void set_params(probe_t *p, const mp_upstream_def_t *u, const mp_server_def_t *srv)
{
    const mp_health_def_t *h = u->health;
    free(p->path);
    free(p->host);
    free(p->tls_name);
    mp_tls_client_free(p->tls);
    p->path = strdup(h->path ? h->path : "/");
    p->host = h->host ? strdup(h->host) : srv->by_name ? strdup(srv->name) : NULL; /* a name: Host is the name */
    char name[256];
    p->tls = mp_tls_client_hold(u->tls);
    p->tls_name = u->tls ? strdup(mp_tls_server_name(u->tls_name, srv->addr.text, name, sizeof(name))) : NULL;
    p->stale_session = 1;
    p->interval = h->interval;
    p->timeout = h->timeout;
    p->rise = h->rise;
    p->fall = h->fall;
    p->statuses = h->statuses;
}

static void add(mp_probes_t *pr, mp_peer_t *peer, const mp_upstream_def_t *u, const mp_server_def_t *srv)
{
    const mp_health_def_t *h = u->health;
    probe_t *p = calloc(1, sizeof(*p));
    if (!p)
        return;
    p->pr = pr;
    p->peer = peer;
    p->ss = srv->addr.ss;
    p->sslen = srv->addr.sslen;
    mp_io_init(&p->sock, -1);
    p->seen = 1;
    set_params(p, u, srv);
    ev_init(&p->io, on_io);
    /* spread the first probes over one interval */
    pr->rng ^= pr->rng << 13, pr->rng ^= pr->rng >> 7, pr->rng ^= pr->rng << 17;
    double delay = h->interval * (double)(pr->rng % 1000) / 1000.0;
    ev_timer_init(&p->timer, on_timer, delay, 0);
    ev_timer_start(pr->loop, &p->timer);
    p->next = pr->list;
    pr->list = p;
}

static void drop(probe_t *p)
{
    stop_exchange(p);
    ev_timer_stop(p->pr->loop, &p->timer);
    p->peer->probe_up = 1; /* without checks a server is up */
    free(p->path);
    free(p->host);
    free(p->tls_name);
    mp_tls_client_free(p->tls);
    mp_tls_session_free(&p->session);
    free(p);
}

void mp_probes_sync(mp_probes_t *pr, const mp_config_t *cfg)
{
    for (probe_t *p = pr->list; p; p = p->next)
        p->seen = 0;
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const mp_upstream_def_t *u = &cfg->upstreams[i];
        if (!u->health)
            continue;
        for (size_t s = 0; s < u->nservers; s++) {
            mp_peer_t *peer = mp_peer_get(u->name, u->servers[s].addr.text);
            if (!peer)
                continue;
            probe_t *p = pr->list;
            while (p && p->peer != peer)
                p = p->next;
            if (p) {
                set_params(p, u, &u->servers[s]);
                p->seen = 1;
            } else {
                add(pr, peer, u, &u->servers[s]);
            }
        }
    }
    for (probe_t **pp = &pr->list; *pp;) {
        probe_t *p = *pp;
        if (p->seen) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        drop(p);
    }
}

void mp_probes_free(mp_probes_t *pr)
{
    if (!pr)
        return;
    while (pr->list) {
        probe_t *p = pr->list;
        pr->list = p->next;
        drop(p);
    }
    free(pr);
}
