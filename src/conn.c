/* conn.c: the client socket and its state machine (L3): read and parse
 * request heads and hand them to the request layer (req.c), write answers
 * made here and static files, keep-alive and pipelining, timeouts, close. */
#include "conn.h"

#include "gen.h"
#include "head.h"
#include "l_request.h"
#include "static.h"
#include "tunnel.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define LINGER_SECONDS 2.0
#define SENDFILE_TURN (2u << 20) /* bytes of a file sent per loop turn: one fast client does not hold the worker */


static void on_io(struct ev_loop *loop, ev_io *io, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void on_readable(mp_conn_t *c);
static void flush_local(mp_conn_t *c);
static void send_static(mp_conn_t *c);
static void request_done(mp_conn_t *c);
static void conn_fail(mp_conn_t *c, int status);
static void respond(mp_conn_t *c);
static void decided(mp_conn_t *c, int d);
static void response_woke(mp_conn_t *c, int rc);
static void req_free(mp_io_ctx_t *ctx, mp_req_t *r);
static void log_and_free(mp_io_ctx_t *ctx, mp_req_t *r);
static void end_request(mp_conn_t *c);
static void orphan_done(mp_req_t *r);

_Static_assert((int)EV_READ == (int)MP_IO_READ && (int)EV_WRITE == (int)MP_IO_WRITE, "io.h directions are libev's");

/* Points the client watcher at the socket readiness events. */
static void watch(mp_conn_t *c, int events)
{
    if ((c->io.events & (EV_READ | EV_WRITE)) == events && (events == 0) == !ev_is_active(&c->io))
        return;
    ev_io_stop(c->side.ctx->loop, &c->io);
    ev_io_modify(&c->io, events);
    if (events)
        ev_io_start(c->side.ctx->loop, &c->io);
}

/* TLS: what to watch follows the blocked calls (io.h), and bytes the
 * session holds are read without waiting. Out of the plain path. */
static MP_IO_COLD __attribute__((noinline)) void tls_want(mp_conn_t *c, int events)
{
    c->want = (uint8_t)events;
    watch(c, mp_io_events(&c->side.sock, events));
    if ((events & EV_READ) && mp_io_pending(&c->side.sock))
        ev_feed_event(c->side.ctx->loop, &c->io, EV_READ);
}

/* Sets the events the connection waits for (EV_READ | EV_WRITE). */
static void conn_want(mp_conn_t *c, int events)
{
    if (MP_UNLIKELY(c->side.sock.ops != NULL))
        return tls_want(c, events);
    watch(c, events);
}

/* Arms the connection timer for `seconds` (ev_timer_again); 0 stops it. */
static void conn_timer(mp_conn_t *c, double seconds)
{
    c->timer.repeat = seconds;
    ev_timer_again(c->side.ctx->loop, &c->timer);
}

static void link_conn(mp_conn_t **head, mp_conn_t *c)
{
    c->prev = NULL;
    c->next = *head;
    if (*head)
        (*head)->prev = c;
    *head = c;
}

static void unlink_conn(mp_conn_t **head, mp_conn_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        *head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

/* An idle connection goes in at the newest end of the worker's LRU. */
static void idle_enter(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    c->state = MP_CS_IDLE;
    c->idle_prev = NULL;
    c->idle_next = ctx->idle_newest;
    if (ctx->idle_newest)
        ctx->idle_newest->idle_prev = c;
    else
        ctx->idle_oldest = c;
    ctx->idle_newest = c;
}

static void idle_leave(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    if (c->state != MP_CS_IDLE)
        return;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        ctx->idle_newest = c->idle_next;
    if (c->idle_next)
        c->idle_next->idle_prev = c->idle_prev;
    else
        ctx->idle_oldest = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
}

#define RECLAIM_SCAN 8 /* idle connections looked at, oldest first: O(1) */

int mp_conn_reclaim_idle(mp_io_ctx_t *ctx)
{
    /* A request that arrived but was not read yet is not idle: closing with
     * unread bytes sends a RST, and the client loses that request. */
    mp_conn_t *c = ctx->idle_oldest;
    int i = 0;
    while (c && i < RECLAIM_SCAN && mp_io_peek(&c->side.sock) > 0)
        c = c->idle_prev, i++;
    if (!c || i == RECLAIM_SCAN)
        return 0;
    static mp_log_limit_t lim;
    mp_env_log_limited(&lim, &ctx->env, MP_LOG_INFO, "max_connections (%d) reached: closing the oldest idle connection",
                       ctx->cfg->settings.max_connections);
    mp_conn_close(c);
    return 1;
}

void mp_conn_accept(mp_io_ctx_t *ctx, int fd, const struct sockaddr *peer, mp_tls_server_t *tls)
{
    mp_conn_t *c = calloc(1, sizeof(*c));
    SSL *ssl = c && tls ? mp_tls_server_session(tls, fd) : NULL;
    if (!c || (tls && !ssl)) {
        free(c);
        mp_io_close(&(mp_io_t){.fd = fd});
        return;
    }
    c->side.ctx = ctx;
    mp_io_init(&c->side.sock, fd);
    if (ssl)
        mp_io_tls(&c->side.sock, ssl);
    if (peer->sa_family == AF_INET6) {
        memcpy(&c->peer, peer, sizeof(c->peer));
    } else {
        const struct sockaddr_in *in = (const struct sockaddr_in *)peer;
        c->peer.sin6_family = AF_INET6;
        c->peer.sin6_port = in->sin_port;
        c->peer.sin6_addr.s6_addr[10] = c->peer.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&c->peer.sin6_addr.s6_addr[12], &in->sin_addr, 4);
    }
    link_conn(&ctx->conns, c);
    ctx->nconns++;
    mp_metrics_add(&ctx->metrics.conns, 1);
    ctx->stats.accepted++;
    c->state = MP_CS_HEAD;
    c->want = EV_READ;
    ev_io_init(&c->io, on_io, fd, EV_READ);
    ev_init(&c->timer, on_timer);
    conn_timer(c, ctx->cfg->settings.client_header_timeout);
    ev_io_start(ctx->loop, &c->io);
    /* The listener defers accept until data arrives: read it now. */
    on_readable(c);
}

/* What a TLS connection keeps of its handshake, for its requests. */
struct mp_conn_tls {
    mp_tls_info_t info;
    char subject[256]; /* info.client_subject points here */
};

/* Requests come from a per-worker free list: steady traffic does not
 * malloc. */
static mp_req_t *req_alloc(mp_io_ctx_t *ctx)
{
    mp_req_t *r = ctx->free_reqs;
    if (r) {
        ctx->free_reqs = *(mp_req_t **)r;
        ctx->nfree_reqs--;
    } else if (!(r = malloc(sizeof(*r)))) {
        return NULL;
    }
    return r;
}

static mp_req_t *req_new(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    mp_req_t *r = req_alloc(ctx);
    if (!r)
        return NULL;
    mp_req_reset(r, &ctx->env, mp_gen_ref(ctx->gen), (const struct sockaddr *)&c->peer, ev_now(ctx->loop));
    r->client = &c->side;
    r->tls = c->tls ? &c->tls->info : NULL;
    return r;
}

/* The handshake failed: counted, and logged at most once a second (a
 * scanner must not fill the log). A plain HTTP request sent to the TLS port
 * is told so in plain HTTP; anything else is closed. */
static void tls_failed(mp_conn_t *c)
{
    static mp_log_limit_t lim;
    mp_io_ctx_t *ctx = c->side.ctx;
    SSL *ssl = c->side.sock.session;
    int plain = mp_tls_plain_http(ssl);
    char why[160];
    mp_metrics_add(&ctx->metrics.tls[0][MP_TLS_FAILED], 1);
    mp_env_log_limited(&lim, &ctx->env, MP_LOG_INFO, "TLS handshake failed: %s",
                       plain ? "a plain HTTP request on a TLS port (400)" : mp_tls_error(ssl, why, sizeof(why)));
    if (!plain)
        return mp_conn_close(c);
    mp_io_ops_close(&c->side.sock); /* plain from here on, for the answer */
    if (!c->side.req && !(c->side.req = req_new(c)))
        return mp_conn_close(c);
    c->side.req->keepalive = 0; /* and the request is left unread, so the answer lingers (no reset) */
    conn_fail(c, 400);
}

/* The handshake did not finish within client_header_timeout. */
static void tls_timed_out(mp_conn_t *c)
{
    static mp_log_limit_t lim;
    mp_metrics_add(&c->side.ctx->metrics.tls[0][MP_TLS_FAILED], 1);
    mp_env_log_limited(&lim, &c->side.ctx->env, MP_LOG_INFO, "TLS handshake failed: timed out (client_header_timeout)");
    mp_conn_close(c);
}

/* Drives the TLS handshake of a new connection. Returns 0 once it is done
 * (what it told is kept for the requests), -1 while it waits or when it
 * failed (the connection is then answered or closed). */
static int tls_handshake(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    int rc = mp_io_handshake(&c->side.sock);
    if (rc == MP_EAGAIN) {
        conn_want(c, EV_READ);
        return -1;
    }
    if (rc != 0) {
        tls_failed(c);
        return -1;
    }
    if (!(c->tls = malloc(sizeof(*c->tls)))) {
        mp_conn_close(c);
        return -1;
    }
    mp_tls_info(c->side.sock.session, &c->tls->info, c->tls->subject, sizeof(c->tls->subject));
    mp_metrics_add(&ctx->metrics.tls[0][c->tls->info.resumed ? MP_TLS_RESUMED : MP_TLS_FULL], 1);
    return 0;
}

/* How the exchange (upstream.c) reports to its connection (arg: the mp_conn_t). */
static void exchange_done(void *c)
{
    request_done(c);
}

static void exchange_fail(void *c, int status)
{
    conn_fail(c, status);
}

static void exchange_abort(void *c)
{
    mp_io_abort(&((mp_conn_t *)c)->side.sock);
    mp_conn_close(c);
}

static void exchange_want(void *c, int events)
{
    conn_want(c, events);
}

static void exchange_timer(void *c, double seconds)
{
    conn_timer(c, seconds);
}

/* ---- tunnels: what their close logs ---- */

/* What a tunnel's on_log and access log line need of the request that
 * opened it, kept without that request, its connection or its generation:
 * a copy of its head (parsed again when the tunnel closes), the path and
 * query it was forwarded with, and the names of its route, server and TLS
 * session. r->tunnel of the request made at the close points here (info
 * first), and req_free frees it. */
typedef struct {
    mp_tunnel_info_t info;
    mp_io_ctx_t *ctx;
    struct sockaddr_in6 peer;
    mp_tls_info_t tls;
    int has_tls;
    double t_start, t_up_start, t_up_end;
    uint64_t head_bytes; /* the 101's head, as sent to the client */
    char id[129];
    uint8_t id_len;
    char client_ip[46];
    char trace_id[33], span_id[17];
    size_t head_len;
    mp_slice path, query;
    unsigned has_query : 1;
    char data[]; /* the head, then the strings */
} tunnel_log_t;

/* Appends n bytes of p at *w (and a NUL when z); returns where they went. */
static char *put_copy(char **w, const char *p, size_t n, int z)
{
    char *at = *w;
    memcpy(at, p, n);
    if (z)
        at[n++] = '\0';
    *w += n;
    return at;
}

static tunnel_log_t *tunnel_log_new(mp_conn_t *c, mp_req_t *r)
{
    const char *route = r->match.route ? r->match.route->name : NULL;
    const char *server = r->gen->cfg->upstreams[r->upstream].servers[r->server].addr.text;
    const mp_tls_info_t *ti = r->tls;
    const char *sni = ti ? ti->sni : NULL, *subject = ti ? ti->client_subject : NULL;
    size_t n = r->h.head_len + r->path.len + r->query.len + strlen(server) + 1 + (route ? strlen(route) + 1 : 0) +
               (sni ? strlen(sni) + 1 : 0) + (subject ? strlen(subject) + 1 : 0);
    tunnel_log_t *l = malloc(sizeof(*l) + n);
    if (!l)
        return NULL;
    memset(l, 0, sizeof(*l));
    char *w = l->data;
    l->ctx = c->side.ctx;
    l->peer = c->peer;
    l->t_start = r->t_start;
    l->t_up_start = r->t_up_start;
    l->t_up_end = r->t_up_end;
    l->head_bytes = r->bytes_sent;
    memcpy(l->id, r->id, r->id_len);
    l->id_len = r->id_len;
    memcpy(l->client_ip, r->client_ip, sizeof(l->client_ip));
    memcpy(l->trace_id, r->trace_id, sizeof(l->trace_id));
    memcpy(l->span_id, r->span_id, sizeof(l->span_id));
    l->head_len = r->h.head_len;
    put_copy(&w, c->side.in.data, r->h.head_len, 0);
    l->path = (mp_slice){put_copy(&w, r->path.p, r->path.len, 0), r->path.len};
    l->query = (mp_slice){put_copy(&w, r->query.p, r->query.len, 0), r->query.len};
    l->has_query = r->has_query;
    l->info.server = put_copy(&w, server, strlen(server), 1);
    l->info.route = route ? put_copy(&w, route, strlen(route), 1) : NULL;
    if (ti) { /* version and cipher are OpenSSL's constants; the rest lives with the session */
        l->has_tls = 1;
        l->tls = *ti;
        l->tls.sni = sni ? put_copy(&w, sni, strlen(sni), 1) : NULL;
        l->tls.client_subject = subject ? put_copy(&w, subject, strlen(subject), 1) : NULL;
    }
    return l;
}

/* The tunnel closed: its request is made again from the record, on the
 * worker's current generation, for on_log and the access log line. */
static void tunnel_closed(void *arg, const mp_tunnel_info_t *info)
{
    tunnel_log_t *l = arg;
    mp_io_ctx_t *ctx = l->ctx;
    l->info.to_upstream = info->to_upstream;
    l->info.to_client = info->to_client;
    l->info.close = info->close;
    mp_req_t *r = ctx->gen ? req_alloc(ctx) : NULL;
    if (!r) {
        free(l);
        return;
    }
    mp_req_reset(r, &ctx->env, mp_gen_ref(ctx->gen), (const struct sockaddr *)&l->peer, l->t_start);
    /* the bytes parsed once before: no limit of a newer configuration refuses them */
    static const mp_http_limits_t any = {(size_t)1 << 30, (size_t)1 << 30};
    size_t scanned = 0;
    if (mp_http1_parse_request(l->data, l->head_len, &scanned, &any, &r->h) <= 0)
        r->h.nheaders = 0;
    r->path = l->path;
    r->query = l->query;
    r->has_query = l->has_query;
    memcpy(r->id, l->id, l->id_len);
    r->id_len = l->id_len;
    memcpy(r->client_ip, l->client_ip, sizeof(r->client_ip));
    memcpy(r->trace_id, l->trace_id, sizeof(r->trace_id));
    memcpy(r->span_id, l->span_id, sizeof(r->span_id));
    r->tls = l->has_tls ? &l->tls : NULL;
    r->t_up_start = l->t_up_start;
    r->t_up_end = l->t_up_end;
    r->status = 101;
    r->bytes_sent = l->head_bytes + info->to_client;
    r->tunnel = &l->info;
    log_and_free(ctx, r);
}

/* The 101 went out: the connection becomes a tunnel with the upstream
 * socket. The request ends here without a log (the tunnel's close logs
 * it), and the connection without closing its socket. */
static void exchange_upgrade(void *arg, mp_io_t *up, mp_buf_t *up_in)
{
    mp_conn_t *c = arg;
    mp_io_ctx_t *ctx = c->side.ctx;
    mp_req_t *r = c->side.req;
    tunnel_log_t *l = tunnel_log_new(c, r);
    double idle = r->gen->cfg->upstreams[r->upstream].tunnel_timeout;
    mp_buf_t held = c->side.in; /* after the head: what the client sent for the tunnel */
    c->side.in.start = r->body_start;
    if (!l || !mp_tunnel_open(ctx, &c->side.sock, &c->side.in, up, up_in, idle, tunnel_closed, l)) {
        c->side.in = held;
        free(l);
        mp_env_log(&ctx->env, MP_LOG_WARN, "request %.*s: out of memory for its tunnel", r->id_len, r->id);
        return mp_conn_close(c);
    }
    r->status = 0;
    end_request(c);
    mp_conn_close(c);
}

static const mp_exchange_ops_t exchange_ops = {.done = exchange_done,
                                               .fail = exchange_fail,
                                               .abort = exchange_abort,
                                               .want = exchange_want,
                                               .timer = exchange_timer,
                                               .upgrade = exchange_upgrade};

/* A hook waits for a call-out: the connection waits with it, watching only
 * for the client going away (the call has its own timeout). */
static void wait_hook(mp_conn_t *c)
{
    c->state = MP_CS_WAIT;
    conn_timer(c, 0);
    conn_want(c, EV_READ);
}

/* What mp_req_decide decided: the exchange, or an answer made here. */
static void decided(mp_conn_t *c, int d)
{
    mp_req_t *r = c->side.req;
    if (d == MP_DECIDE_WAIT)
        return wait_hook(c);
    if (d == MP_DECIDE_RESPONDED)
        return respond(c);
    if (d == MP_DECIDE_STATIC)
        return send_static(c);
    if (d != MP_DECIDE_UPSTREAM)
        return conn_fail(c, d);
    c->state = MP_CS_PROXY;
    mp_upstream_start(r, &exchange_ops, c);
}

/* While a hook waits: readable is either the client gone (a FIN or an
 * error, seen without reading: RDHUP) or bytes that are not ours to read
 * yet (its body, a pipelined request), and then the socket is not watched
 * until the hook is done. A client gone cancels the call. */
static void wait_readable(mp_conn_t *c)
{
    struct pollfd p = {.fd = c->side.sock.fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
        mp_req_log(c->side.req, MP_LOG_DEBUG, "the client went away while a hook waited: its call-out is cancelled");
        return mp_conn_close(c);
    }
    conn_want(c, 0);
}

void mp_conn_hook_woke(mp_req_t *r, int kind, int rc)
{
    if (kind == MP_HK_LOG)
        return orphan_done(r);
    mp_conn_t *c = container_of(r->client, mp_conn_t, side);
    MP_ASSERT(c->side.req == r);
    if (kind == MP_HK_RESPONSE && c->state == MP_CS_PROXY)
        return mp_upstream_hooked(r, rc);
    MP_ASSERT(c->state == MP_CS_WAIT);
    if (kind == MP_HK_RESPONSE)
        return response_woke(c, rc);
    c->state = MP_CS_HEAD;
    decided(c, mp_req_decide_resume(r, kind, rc));
}

/* A complete, valid head is in c->side.in: decide framing, then what
 * mp_req_decide decides. */
static void start_request(mp_conn_t *c)
{
    mp_req_t *r = c->side.req;
    MP_ASSERT(c->state == MP_CS_HEAD);
    mp_req_begin(r, c->side.ctx->stopping);
    c->side.in.start = r->body_start;
    decided(c, mp_req_decide(r));
}

/* Parses what c->side.in holds. Returns 1 when a request was started or
 * answered, 0 when more bytes are needed. */
static int try_parse(mp_conn_t *c)
{
    MP_ASSERT(c->state == MP_CS_HEAD);
    if (!c->side.req && !(c->side.req = req_new(c))) {
        mp_conn_close(c);
        return 1;
    }
    int rc = mp_http1_parse_request(mp_buf_head(&c->side.in), mp_buf_len(&c->side.in), &c->scanned,
                                    &c->side.ctx->env.limits, &c->side.req->h);
    if (rc == MP_EAGAIN && mp_buf_room(&c->side.in) != 0)
        return 0;
    if (rc < 0) { /* MP_EAGAIN: the buffer is full */
        conn_fail(c, mp_req_parse_failed(c->side.req, rc));
        return 1;
    }
    start_request(c);
    return 1;
}

static void on_readable(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    MP_ASSERT(c->state == MP_CS_IDLE || c->state == MP_CS_HEAD);
    if (MP_UNLIKELY(c->side.sock.handshaking) && tls_handshake(c) != 0)
        return;
    if (mp_buf_acquire(&c->side.in, &ctx->bufs) != 0)
        return mp_conn_close(c);
    for (;;) {
        if (mp_buf_len(&c->side.in) && try_parse(c))
            return;
        ssize_t n = mp_io_read(&c->side.sock, mp_buf_tail(&c->side.in), mp_buf_room(&c->side.in));
        if (n > 0) {
            c->side.in.end += (uint32_t)n;
            if (c->state == MP_CS_IDLE) {
                idle_leave(c);
                c->state = MP_CS_HEAD;
                conn_timer(c, ctx->cfg->settings.client_header_timeout);
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            if (c->state == MP_CS_IDLE || mp_buf_len(&c->side.in) == 0)
                mp_buf_release(&c->side.in, &ctx->bufs); /* an idle connection holds no block */
            return;
        }
        return mp_conn_close(c); /* EOF or error: nothing to answer */
    }
}

static void linger_read(mp_conn_t *c)
{
    MP_ASSERT(c->state == MP_CS_LINGER);
    char sink[4096];
    for (;;) {
        ssize_t n = mp_io_read(&c->side.sock, sink, sizeof(sink));
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        return mp_conn_close(c);
    }
}

static void dispatch(mp_conn_t *c, int revents)
{
    switch (c->state) {
    case MP_CS_PROXY: return mp_upstream_on_client(c->side.req, revents);
    case MP_CS_LOCAL:
        if (revents & EV_WRITE)
            flush_local(c);
        return;
    case MP_CS_LINGER: return linger_read(c);
    case MP_CS_WAIT: return wait_readable(c);
    default: return on_readable(c);
    }
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    mp_conn_t *c = container_of(io, mp_conn_t, io);
    if (MP_LIKELY(!c->side.sock.ops))
        return dispatch(c, revents);
    /* TLS: readiness for what a blocked call waits for is that call's, and
     * what the calls left blocked may have changed what to watch */
    revents = mp_io_revents(&c->side.sock, revents);
    if (mp_io_pending(&c->side.sock))
        revents |= EV_READ;
    dispatch(c, revents);
    if (!c->side.closed && c->side.sock.ops)
        conn_want(c, c->want);
}

static void on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_conn_t *c = container_of(t, mp_conn_t, timer);
    if (MP_UNLIKELY(c->side.sock.handshaking))
        return tls_timed_out(c);
    switch (c->state) {
    case MP_CS_HEAD:
        if (c->side.in.end > 0) {
            if (!c->side.req && !(c->side.req = req_new(c)))
                return mp_conn_close(c);
            c->side.req->keepalive = 0;
            c->side.req->body.done = 1;
            mp_env_log(&c->side.ctx->env, MP_LOG_INFO, "client_header_timeout: 408 to a client that sent %u bytes",
                       (unsigned)c->side.in.end);
            return conn_fail(c, 408);
        }
        return mp_conn_close(c);
    case MP_CS_PROXY: return mp_upstream_on_client_timeout(c->side.req);
    default: /* idle keep-alive, a stalled local response, lingering */ return mp_conn_close(c);
    }
}

/* Stops reading requests and closes once the client has had time to read
 * the response: closing with unread bytes would reset the connection and
 * could destroy the response in flight (RFC 9112 §9.6). */
static void linger_close(mp_conn_t *c)
{
    MP_ASSERT(c->state == MP_CS_LOCAL || c->state == MP_CS_PROXY);
    if (mp_io_shutdown_write(&c->side.sock) != 0)
        return mp_conn_close(c);
    c->state = MP_CS_LINGER;
    mp_buf_release(&c->side.in, &c->side.ctx->bufs);
    mp_buf_release(&c->side.out, &c->side.ctx->bufs);
    conn_want(c, EV_READ);
    conn_timer(c, LINGER_SECONDS);
    linger_read(c);
}

/* The request's metrics entry: by route name, cached per route in the
 * worker's generation so that a request does no lookup. */
static mp_route_stats_t *route_stats(mp_io_ctx_t *ctx, mp_req_t *r)
{
    const mp_route_t *rt = r->match.route;
    if (!rt)
        return mp_metrics_route(&ctx->metrics, NULL);
    mp_route_stats_t **cache = r->gen->route_stats;
    if (!cache)
        return mp_metrics_route(&ctx->metrics, rt->name);
    int i = mp_route_slot(rt);
    if (!cache[i])
        cache[i] = mp_metrics_route(&ctx->metrics, rt->name);
    return cache[i];
}

static void log_request(mp_io_ctx_t *ctx, mp_req_t *r)
{
    ctx->stats.requests++;
    ev_tstamp now = ev_now(ctx->loop);
    const mp_tunnel_info_t *tun = r->tunnel;
    if (MP_UNLIKELY(tun)) /* its route may be another generation's: found by name */
        mp_metrics_request(mp_metrics_route(&ctx->metrics, tun->route), r->status, now - r->t_start);
    else
        mp_metrics_request(route_stats(ctx, r), r->status, now - r->t_start);
    if (ctx->alog.fd < 0)
        return;
    mp_alog_entry_t e = {0};
    e.time = ev_time() - (now - r->t_start);
    e.id = (mp_slice){r->id, r->id_len};
    e.trace_id = (mp_slice){r->trace_id, strlen(r->trace_id)};
    e.span_id = (mp_slice){r->span_id, strlen(r->span_id)};
    e.client = (mp_slice){r->client_ip, strlen(r->client_ip)};
    e.method = r->h.method;
    e.path = r->h.path;
    if (r->match.route)
        e.route = (mp_slice){r->match.route->name, strlen(r->match.route->name)};
    else if (tun && tun->route)
        e.route = (mp_slice){tun->route, strlen(tun->route)};
    e.status = r->status;
    e.bytes = r->bytes_sent;
    e.upstream_time = -1;
    if (r->server >= 0) {
        const mp_upstream_def_t *u = &r->gen->cfg->upstreams[r->upstream];
        const char *addr = u->servers[r->server].addr.text;
        e.upstream_server = (mp_slice){addr, strlen(addr)};
        e.upstream_time = (r->t_up_end ? r->t_up_end : now) - r->t_up_start;
    } else if (tun) {
        e.upstream_server = (mp_slice){tun->server, strlen(tun->server)};
        e.upstream_time = r->t_up_end - r->t_up_start;
        e.tunnel_close = mp_tunnel_close_name(tun->close);
        e.tunnel_to_upstream = tun->to_upstream;
        e.tunnel_to_client = tun->to_client;
    }
    e.duration = now - r->t_start;
    if (r->tls) {
        e.tls = (mp_slice){r->tls->version, strlen(r->tls->version)};
        if (r->tls->sni)
            e.sni = (mp_slice){r->tls->sni, strlen(r->tls->sni)};
    }
    char extra[1024];
    e.extra = (mp_slice){extra, r->lbox ? mp_hook_log_fields(r->gen->L, r, extra, sizeof(extra)) : 0};
    mp_alog_write(&ctx->alog, &e, r->gen->cfg->settings.access_log_fields);
}

static void end_request(mp_conn_t *c)
{
    mp_req_t *r = c->side.req;
    if (!r)
        return;
    mp_upstream_cancel(r);
    if (r->has_file) {
        close(r->file_fd);
        r->has_file = 0;
    }
    /* a hook still waiting (the client went away) is abandoned before on_log runs */
    if (MP_UNLIKELY(r->co || r->callout))
        mp_hook_abandon(r->gen->L, r);
    mp_io_ctx_t *ctx = c->side.ctx;
    c->side.req = NULL;
    c->requests++;
    log_and_free(ctx, r);
}

/* The request is over: on_log runs, the access log line is written, and r
 * is freed, or kept (without its connection) while its on_log waits. */
static void log_and_free(mp_io_ctx_t *ctx, mp_req_t *r)
{
    if (mp_req_on_log(r)) { /* it waits: logged now, and the connection goes on without it */
        if (r->status)
            log_request(ctx, r);
        r->client = NULL;
        r->prev = NULL;
        r->next = ctx->orphans;
        if (ctx->orphans)
            ctx->orphans->prev = r;
        ctx->orphans = r;
        return;
    }
    if (r->status)
        log_request(ctx, r);
    req_free(ctx, r);
}

/* Gives back what a request holds, and the request. */
static void req_free(mp_io_ctx_t *ctx, mp_req_t *r)
{
    mp_hook_release(r->gen->L, r);
    mp_gen_unref(r->gen);
    if (MP_UNLIKELY(r->tunnel))
        free((void *)r->tunnel); /* the tunnel's record (tunnel_log_t), which r's fields point into */
    if (ctx->nfree_reqs < 256) {
        *(mp_req_t **)r = ctx->free_reqs;
        ctx->free_reqs = r;
        ctx->nfree_reqs++;
    } else {
        free(r);
    }
}

/* A request whose on_log waited: done (its chain ended, or abandoned). */
static void orphan_done(mp_req_t *r)
{
    mp_io_ctx_t *ctx = container_of(r->env, mp_io_ctx_t, env);
    if (r->prev)
        r->prev->next = r->next;
    else
        ctx->orphans = r->next;
    if (r->next)
        r->next->prev = r->prev;
    req_free(ctx, r);
}

void mp_conn_abandon_orphans(mp_io_ctx_t *ctx, const mp_gen_t *gen)
{
    mp_req_t *next;
    for (mp_req_t *r = ctx->orphans; r; r = next) {
        next = r->next;
        if (!gen || r->gen == gen)
            orphan_done(r);
    }
}

/* The exchange or a local answer finished: the response was fully written.
 * Logs the request, then serves the next pipelined one, idles, or closes. */
static void request_done(mp_conn_t *c)
{
    mp_io_ctx_t *ctx = c->side.ctx;
    mp_req_t *r = c->side.req;
    MP_ASSERT(r && (c->state == MP_CS_LOCAL || c->state == MP_CS_PROXY));
    int keep = r->keepalive && r->body.done && !ctx->stopping && !c->side.read_eof;
    int unread = !r->body.done || c->side.in.start < c->side.in.end;
    end_request(c);
    mp_buf_release(&c->side.out, &ctx->bufs);
    if (!keep && unread)
        return linger_close(c);
    if (!keep)
        return mp_conn_close(c);

    /* Pipelined bytes after this request move to the front. */
    mp_buf_compact(&c->side.in);
    c->scanned = 0;
    if (mp_buf_len(&c->side.in)) {
        c->state = MP_CS_HEAD;
        conn_timer(c, ctx->cfg->settings.client_header_timeout);
        conn_want(c, EV_READ);
        ev_feed_event(ctx->loop, &c->io, EV_READ); /* next loop turn: no recursion through pipelines */
        return;
    }
    mp_buf_release(&c->side.in, &ctx->bufs);
    idle_enter(c);
    ctx->room_freed = 1; /* it can be reclaimed for one waiting at max_connections */
    conn_want(c, EV_READ);
    conn_timer(c, ctx->cfg->settings.keepalive_timeout);
}

/* Waits until the client can take more, at most client_body_timeout. */
static void wait_writable(mp_conn_t *c)
{
    conn_want(c, EV_WRITE);
    conn_timer(c, c->side.ctx->cfg->settings.client_body_timeout);
}

/* Sends the rest of a static response's file (after the head). Returns 0
 * once it is all sent, -1 when waiting for the socket or closed. */
static int send_file(mp_conn_t *c)
{
    mp_req_t *r = c->side.req;
    size_t turn = 0;
    while (r->file_left) {
        if (turn >= SENDFILE_TURN) { /* the socket is likely writable: the next loop turn goes on */
            wait_writable(c);
            return -1;
        }
        off_t off = (off_t)r->file_off;
        size_t want = r->file_left < SENDFILE_TURN ? (size_t)r->file_left : SENDFILE_TURN;
        ssize_t n = mp_io_sendfile(&c->side.sock, r->file_fd, &off, want);
        if (n > 0) {
            r->file_off += (uint64_t)n;
            r->file_left -= (uint64_t)n;
            r->bytes_sent += (uint64_t)n;
            turn += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            wait_writable(c);
            return -1;
        }
        if (n == 0) /* the file shrank: Content-Length cannot be kept */
            mp_req_log(r, MP_LOG_INFO, "static file shrank while sent");
        mp_conn_close(c);
        return -1;
    }
    return 0;
}

static void flush_local(mp_conn_t *c)
{
    mp_req_t *r = c->side.req;
    MP_ASSERT(c->state == MP_CS_LOCAL);
    while (mp_buf_len(&c->side.out) || r->local_out_len) {
        struct iovec iov[2] = {{mp_buf_head(&c->side.out), mp_buf_len(&c->side.out)},
                               {(char *)r->local_out, r->local_out_len}};
        ssize_t n = mp_io_writev(&c->side.sock, iov, 2);
        if (n > 0) {
            size_t head = mp_buf_len(&c->side.out) < (size_t)n ? mp_buf_len(&c->side.out) : (size_t)n;
            c->side.out.start += (uint32_t)head;
            r->local_out += (size_t)n - head;
            r->local_out_len -= (size_t)n - head;
            r->bytes_sent += (uint64_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return wait_writable(c);
        return mp_conn_close(c);
    }
    if (r->has_file && send_file(c) != 0)
        return;
    request_done(c);
}

/* What a connection waiting for response hooks does when they end (c->resume). */
enum { RESUME_NONE, RESUME_LOCAL, RESUME_STATIC };

static void wait_response(mp_conn_t *c, int what)
{
    c->resume = (uint8_t)what;
    wait_hook(c);
}

/* The response made here has its head in c->side.out (shown: its status,
 * -1 when it did not fit): the body after it (or, when it does not fit,
 * from the request's local_body), then it is sent. */
static void local_ready(mp_conn_t *c, int shown)
{
    mp_req_t *r = c->side.req;
    mp_local_t *local = &r->local;
    mp_buf_t *b = &c->side.out;
    if (shown < 0)
        return mp_conn_close(c);
    size_t blen = r->is_head ? 0 : local->body.len;
    if (blen <= mp_buf_room(b)) {
        mp_buf_append(b, local->body.p, blen);
        blen = 0;
    }
    /* a body that did not fit is sent from the request (respond()'s, or local->text) */
    r->local_out = local->body.p;
    r->local_out_len = blen;
    r->resp_started = 1;
    c->state = MP_CS_LOCAL;
    conn_want(c, 0);
    flush_local(c);
}

/* Writes the response made here (status, or 0 for req:respond's). */
static void send_local(mp_conn_t *c, int status)
{
    mp_req_t *r = c->side.req;
    mp_buf_t *b = &c->side.out;
    MP_ASSERT(c->state == MP_CS_HEAD || c->state == MP_CS_PROXY);
    if (mp_buf_acquire(b, &c->side.ctx->bufs) != 0)
        return mp_conn_close(c);
    int shown = mp_local_response(r, status, b, &r->local);
    if (shown == MP_LOCAL_WAIT)
        return wait_response(c, RESUME_LOCAL);
    local_ready(c, shown);
}

/* A static response's head is in c->side.out (shown: its status, -1 when
 * it did not fit): then the file with sendfile (flush_local), or the short
 * body of a 301, 405 or error. */
static void static_ready(mp_conn_t *c, mp_static_file_t *f, int shown)
{
    mp_req_t *r = c->side.req;
    mp_local_t *local = &r->local;
    if (shown < 0 || mp_buf_append(&c->side.out, local->body.p, r->is_head ? 0 : local->body.len) != 0) {
        mp_static_dispose(f);
        return mp_conn_close(c);
    }
    if (f->fd >= 0) {
        r->file_fd = f->fd;
        r->file_off = f->off;
        r->file_left = f->len;
        r->has_file = 1;
    }
    r->resp_started = 1;
    c->state = MP_CS_LOCAL;
    conn_want(c, 0);
    flush_local(c);
}

/* A static route (static.h). */
static void send_static(mp_conn_t *c)
{
    mp_req_t *r = c->side.req;
    mp_static_file_t f;
    MP_ASSERT(c->state == MP_CS_HEAD);
    mp_req_keepalive_after(r, 0); /* the body is not read */
    mp_static_resolve(r, &f);
    if (mp_buf_acquire(&c->side.out, &c->side.ctx->bufs) != 0) {
        mp_static_dispose(&f);
        return mp_conn_close(c);
    }
    int shown = mp_static_response(r, &f, &c->side.out, &r->local);
    if (shown == MP_LOCAL_WAIT)
        return wait_response(c, RESUME_LOCAL);
    if (shown == MP_STATIC_WAIT) {
        if (!(c->file = malloc(sizeof(*c->file)))) {
            mp_static_dispose(&f);
            return mp_conn_close(c);
        }
        *c->file = f;
        return wait_response(c, RESUME_STATIC);
    }
    static_ready(c, &f, shown);
}

/* The response hooks a local or static answer waited for ended with rc. */
static void response_woke(mp_conn_t *c, int rc)
{
    mp_req_t *r = c->side.req;
    int what = c->resume;
    c->resume = RESUME_NONE;
    if (what == RESUME_LOCAL)
        return local_ready(c, mp_local_response_resume(r, rc, &c->side.out, &r->local));
    mp_static_file_t f = *c->file;
    free(c->file);
    c->file = NULL;
    int shown = mp_static_finish(r, &f, mp_req_response_resume(r, rc), &c->side.out, &r->local);
    if (shown == MP_LOCAL_WAIT) /* not after a hook failed; an error answer's own hooks */
        return wait_response(c, RESUME_LOCAL);
    static_ready(c, &f, shown);
}

/* A hook answered: the response hooks see that answer like any other. */
static void respond(mp_conn_t *c)
{
    MP_ASSERT(c->state == MP_CS_HEAD);
    mp_req_keepalive_after(c->side.req, 0);
    send_local(c, 0);
}

/* Answers the current request with a response made here (status, a short
 * text body) when nothing of a response was sent yet; otherwise closes. The
 * connection closes after it unless the request can be cleanly followed. */
static void conn_fail(mp_conn_t *c, int status)
{
    mp_req_t *r = c->side.req;
    if (c->side.closed)
        return;
    if (!r || r->resp_started)
        return mp_conn_close(c);
    mp_upstream_cancel(r);
    mp_req_identify(r);
    mp_req_keepalive_after(r, status);
    if (status >= 500)
        mp_env_log(r->env, MP_LOG_INFO, "%d for request %.*s", status, r->id_len, r->id);
    send_local(c, status);
}

void mp_conn_close(mp_conn_t *c)
{
    if (c->side.closed)
        return;
    mp_io_ctx_t *ctx = c->side.ctx;
    c->side.closed = 1;
    idle_leave(c);
    if (c->side.req && c->side.req->status == 0 && (c->state == MP_CS_PROXY || c->state == MP_CS_WAIT))
        c->side.req->status = 499; /* the client went away first (nginx's convention) */
    end_request(c);
    if (c->file) { /* a static answer's hooks waited */
        mp_static_dispose(c->file);
        free(c->file);
        c->file = NULL;
    }
    ev_io_stop(ctx->loop, &c->io);
    ev_timer_stop(ctx->loop, &c->timer);
    mp_io_close(&c->side.sock);
    free(c->tls);
    c->tls = NULL;
    mp_buf_release(&c->side.in, &ctx->bufs);
    mp_buf_release(&c->side.out, &ctx->bufs);
    unlink_conn(&ctx->conns, c);
    link_conn(&ctx->graveyard, c);
    ctx->nconns--;
    ctx->room_freed = 1;
    mp_metrics_add(&ctx->metrics.conns, -1);
}

void mp_conn_reap(mp_io_ctx_t *ctx)
{
    while (ctx->graveyard) {
        mp_conn_t *c = ctx->graveyard;
        ctx->graveyard = c->next;
        free(c);
    }
}

void mp_conn_drain(mp_io_ctx_t *ctx)
{
    mp_conn_t *next;
    for (mp_conn_t *c = ctx->conns; c; c = next) {
        next = c->next;
        if (c->state == MP_CS_IDLE || (c->state == MP_CS_HEAD && c->side.in.end == 0))
            mp_conn_close(c);
        else if (c->side.req)
            c->side.req->keepalive = 0;
    }
}
