/* conn.c: the client side of the proxy: read and parse request heads, route
 * them, answer errors made here, keep-alive and pipelining, timeouts, close. */
#include "conn.h"

#include "head.h"
#include "l_request.h"
#include "path.h"
#include "pool.h"
#include "gen.h"
#include "static.h"
#include "upstream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <lauxlib.h>
#include <lua.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define LINGER_SECONDS 2.0
#define SENDFILE_TURN (2u << 20) /* bytes of a file sent per loop turn: one fast client does not hold the worker */

enum { MP_CS_LINGER = MP_CS_LOCAL + 1 }; /* response sent; reading what the client still sends, then close */

static void on_io(struct ev_loop *loop, ev_io *io, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void on_readable(mp_conn_t *c);
static void flush_local(mp_conn_t *c);
static void send_static(mp_conn_t *c);

void mp_conn_want(mp_conn_t *c, int events)
{
    if ((c->io.events & (EV_READ | EV_WRITE)) == events && (events == 0) == !ev_is_active(&c->io))
        return;
    ev_io_stop(c->w->loop, &c->io);
    ev_io_modify(&c->io, events);
    if (events)
        ev_io_start(c->w->loop, &c->io);
}

void mp_conn_timer(mp_conn_t *c, double seconds)
{
    c->timer.repeat = seconds;
    ev_timer_again(c->w->loop, &c->timer);
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
    mp_worker_t *w = c->w;
    c->state = MP_CS_IDLE;
    c->idle_prev = NULL;
    c->idle_next = w->idle_newest;
    if (w->idle_newest)
        w->idle_newest->idle_prev = c;
    else
        w->idle_oldest = c;
    w->idle_newest = c;
}

static void idle_leave(mp_conn_t *c)
{
    mp_worker_t *w = c->w;
    if (c->state != MP_CS_IDLE)
        return;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        w->idle_newest = c->idle_next;
    if (c->idle_next)
        c->idle_next->idle_prev = c->idle_prev;
    else
        w->idle_oldest = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
}

#define RECLAIM_SCAN 8 /* idle connections looked at, oldest first: O(1) */

int mp_conn_reclaim_idle(mp_worker_t *w)
{
    /* A request that arrived but was not read yet is not idle: closing with
     * unread bytes sends a RST, and the client loses that request. */
    mp_conn_t *c = w->idle_oldest;
    char byte;
    int i = 0;
    while (c && i < RECLAIM_SCAN && recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0)
        c = c->idle_prev, i++;
    if (!c || i == RECLAIM_SCAN)
        return 0;
    static mp_log_limit_t lim;
    mp_log_limited(&lim, MP_LOG_INFO, "w%d: max_connections (%d) reached: closing the oldest idle connection",
                   w->id, w->cfg->settings.max_connections);
    mp_conn_close(c);
    return 1;
}

void mp_conn_accept(mp_worker_t *w, int fd, const struct sockaddr *peer)
{
    mp_conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    c->w = w;
    c->fd = fd;
    if (peer->sa_family == AF_INET6) {
        memcpy(&c->peer, peer, sizeof(c->peer));
    } else {
        const struct sockaddr_in *in = (const struct sockaddr_in *)peer;
        c->peer.sin6_family = AF_INET6;
        c->peer.sin6_port = in->sin_port;
        c->peer.sin6_addr.s6_addr[10] = c->peer.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&c->peer.sin6_addr.s6_addr[12], &in->sin_addr, 4);
    }
    link_conn(&w->conns, c);
    w->nconns++;
    mp_metrics_add(&w->metrics.conns, 1);
    w->stats.accepted++;
    c->state = MP_CS_HEAD;
    ev_io_init(&c->io, on_io, fd, EV_READ);
    ev_init(&c->timer, on_timer);
    mp_conn_timer(c, w->cfg->settings.client_header_timeout);
    ev_io_start(w->loop, &c->io);
    /* The listener defers accept until data arrives: read it now. */
    on_readable(c);
}

/* Requests come from a per-worker free list: steady traffic does not
 * malloc. Only the bookkeeping is zeroed; the parser fills the field array. */
static mp_req_t *req_new(mp_conn_t *c)
{
    mp_worker_t *w = c->w;
    mp_req_t *r = w->free_reqs;
    if (r) {
        w->free_reqs = *(mp_req_t **)r;
        w->nfree_reqs--;
    } else if (!(r = malloc(sizeof(*r)))) {
        return NULL;
    }
    memset(r, 0, offsetof(mp_req_t, h));
    memset(&r->h, 0, offsetof(mp_http_request_t, headers));
    memset(&r->h.head_len, 0, sizeof(r->h) - offsetof(mp_http_request_t, head_len));
    memset(&r->match, 0, sizeof(*r) - offsetof(mp_req_t, match));
    r->conn = c;
    r->gen = mp_gen_ref(w->gen);
    r->upstream = r->server = -1;
    r->t_start = ev_now(c->w->loop);
    return r;
}

static int id_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
           ch == '_' || ch == ':' || ch == '-';
}

/* X-Request-ID: the client's if it is 1–128 characters of A-Za-z0-9._:-,
 * otherwise 32 random hex digits. */
static void assign_request_id(mp_req_t *r)
{
    int i = mp_http1_find(r->h.headers, r->h.nheaders, "x-request-id", 12);
    if (i >= 0) {
        mp_slice v = r->h.headers[i].value;
        size_t k = 0;
        while (k < v.len && id_char_ok(v.p[k]))
            k++;
        if (v.len >= 1 && v.len <= 128 && k == v.len) {
            memcpy(r->id, v.p, v.len);
            r->id_len = (uint8_t)v.len;
            return;
        }
    }
    static const char hex[] = "0123456789abcdef";
    mp_worker_t *w = r->conn->w;
    for (int half = 0; half < 2; half++) {
        uint64_t x = mp_worker_rand(w);
        for (int k = 0; k < 16; k++, x >>= 4)
            r->id[half * 16 + k] = hex[x & 15];
    }
    r->id_len = 32;
}

/* Dotted quad without printf (inet_ntop formats with sprintf). */
static void format_ipv4(const uint8_t *a, char *out)
{
    for (int i = 0; i < 4; i++) {
        unsigned v = a[i];
        if (v >= 100)
            *out++ = (char)('0' + v / 100);
        if (v >= 10)
            *out++ = (char)('0' + v / 10 % 10);
        *out++ = (char)('0' + v % 10);
        *out++ = i < 3 ? '.' : '\0';
    }
}

static void describe_peer(mp_req_t *r)
{
    const struct sockaddr_in6 *p = &r->conn->peer;
    if (IN6_IS_ADDR_V4MAPPED(&p->sin6_addr))
        format_ipv4(&p->sin6_addr.s6_addr[12], r->client_ip);
    else
        inet_ntop(AF_INET6, &p->sin6_addr, r->client_ip, sizeof(r->client_ip));
    const mp_settings_t *s = &r->gen->cfg->settings;
    for (size_t i = 0; i < s->ntrusted; i++)
        if (mp_cidr_match(&s->trusted[i], (const struct sockaddr *)p)) {
            r->trusted_peer = 1;
            break;
        }
}

/* Whether an address given as text is one of trusted_proxies. */
static int ip_trusted(const mp_settings_t *s, const char *text, size_t len)
{
    char ip[INET6_ADDRSTRLEN];
    if (len == 0 || len >= sizeof(ip))
        return 0;
    memcpy(ip, text, len);
    ip[len] = '\0';
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6};
    struct sockaddr_in sa4 = {.sin_family = AF_INET};
    const struct sockaddr *p = (const struct sockaddr *)&sa;
    if (inet_pton(AF_INET, ip, &sa4.sin_addr) == 1)
        p = (const struct sockaddr *)&sa4;
    else if (inet_pton(AF_INET6, ip, &sa.sin6_addr) != 1)
        return 0;
    for (size_t i = 0; i < s->ntrusted; i++)
        if (mp_cidr_match(&s->trusted[i], p))
            return 1;
    return 0;
}

mp_slice mp_req_remote_addr(const mp_req_t *r)
{
    const mp_settings_t *s = &r->gen->cfg->settings;
    mp_slice best = {r->client_ip, strlen(r->client_ip)};
    if (r->trusted_peer) {
        const mp_header_t *h = r->h.headers;
        for (int i = (int)r->h.nheaders - 1; i >= 0; i--) {
            if (!MP_SLICE_IEQ(h[i].name, "x-forwarded-for"))
                continue;
            mp_slice toks[32];
            size_t pos = 0, k = 0;
            while (k < MP_ARRAY_LEN(toks) && mp_http1_next_token(h[i].value, &pos, &toks[k]))
                k++;
            while (k-- > 0) {
                best = toks[k];
                if (!ip_trusted(s, best.p, best.len))
                    goto done;
            }
        }
    }
done:
    return best;
}

/* A hook chain's outcome as mp_req_decide reports it. */
static int hook_outcome(int rc)
{
    return rc == MP_HOOK_RESPONDED ? MP_DECIDE_RESPONDED : 500;
}

/* The asterisk-form target of OPTIONS * (the parser allows it only there). */
static int is_asterisk(mp_slice path)
{
    return path.len == 1 && path.p[0] == '*';
}

/* OPTIONS * on a static route: answered here (RFC 9110 §9.3.7) with the
 * methods a static route serves, as req:respond would answer. */
static int answer_options(mp_req_t *r)
{
    static const char allow[] = "GET, HEAD";
    mp_hedit_t *e = (mp_hedit_t *)mp_req_arena(r, sizeof(*e) + sizeof(mp_slice));
    if (!e || !(r->local_body = malloc(1)))
        return 500;
    e->name = MP_SLICE_LIT("Allow");
    e->nvalues = 1;
    e->values[0] = MP_SLICE_LIT(allow);
    e->next = r->resp_edits;
    r->resp_edits = e;
    r->local_body_len = 0;
    r->local_status = 200;
    return MP_DECIDE_RESPONDED;
}

/* What a route's target makes of a request its hooks let through. */
static int route_outcome(mp_req_t *r, int go)
{
    return go == MP_DECIDE_STATIC && is_asterisk(r->path) ? answer_options(r) : go;
}

/* Routes r by its (possibly hook-changed) path and runs the route's request
 * chain. OPTIONS * is routed as "/" (host rules apply) and forwarded as
 * "*", as HAProxy does. Returns what mp_req_decide returns. */
static int route_request(mp_req_t *r)
{
    const mp_config_t *cfg = r->gen->cfg;
    mp_http_request_t *h = &r->h;
    int asterisk = is_asterisk(r->path);
    r->match_path = asterisk ? MP_SLICE_LIT("/") : r->path;
    mp_route_query_t q = {h->method, h->host, r->match_path, h->headers, h->nheaders};
    if (mp_router_match(cfg->router, &q, &r->match) != 0)
        return 404;
    const mp_route_t *route = r->match.route;
    if (route->strip_prefix && route->prefix && !asterisk) {
        /* the path keeps its leading '/': "/v1/users" less "/v1/" is "/users" */
        size_t strip = route->prefix_len - (route->prefix[route->prefix_len - 1] == '/');
        r->path.p += strip;
        r->path.len -= strip;
        if (!r->path.len)
            r->path = MP_SLICE_LIT("/");
    }
    r->upstream = route->target;
    int go = cfg->statics[route->index - 1].root ? MP_DECIDE_STATIC : MP_DECIDE_UPSTREAM;
    const mp_route_hooks_t *hooks = &cfg->route_hooks[route->index - 1];
    if (hooks->request == LUA_NOREF)
        return route_outcome(r, go);
    int up = -1;
    int rc = mp_hook_route(r->gen->L, r, hooks, &up);
    if (rc != MP_HOOK_NEXT)
        return hook_outcome(rc);
    if (hooks->handler) {
        if (up < 0 || (size_t)up >= cfg->nupstreams) {
            mp_log_error("w%d: route '%s' (%s): the handler neither responded nor returned an upstream "
                         "(request %.*s)", r->conn->w->id, route->name, route->src, r->id_len, r->id);
            return 500;
        }
        r->upstream = up;
    }
    return route_outcome(r, go);
}

/* Drops the fields whose name has '_' (settings.underscores_in_headers =
 * false, nginx's default): CGI-style backends map '-' and '_' to one
 * variable, so X_Forwarded_For would pose as X-Forwarded-For. Dropped from
 * the parsed list, they are absent for hooks, route `headers` filters and
 * the upstream alike, as in nginx. */
static void drop_underscored(mp_http_request_t *h)
{
    unsigned k = 0;
    for (unsigned i = 0; i < h->nheaders; i++)
        if (!memchr(h->headers[i].name.p, '_', h->headers[i].name.len))
            h->headers[k++] = h->headers[i];
    h->nheaders = k;
}

static int refuse_target(mp_req_t *r, const char *why)
{
    mp_log_debug("w%d: bad request target from client: %s (request %.*s)", r->conn->w->id, why, r->id_len, r->id);
    r->h.error = why;
    r->path = (mp_slice){NULL, 0}; /* refused like a bad head: no response hook sees it */
    return 400;
}

/* Normalises r->path (SPEC "Behaviour on the wire", path.h) before anything
 * looks at it: a path that changes is written to the request's arena, which
 * is still empty (no hook ran) and as large as a head. The query is passed
 * on untouched, once checked. Returns 0, or the status to answer. */
static int normalize_target(mp_req_t *r)
{
    const mp_settings_t *s = &r->gen->cfg->settings;
    mp_path_opts_t o = {(uint8_t)s->merge_slashes, (uint8_t)s->escaped_slashes};
    mp_slice p = r->path;
    const char *why = NULL;
    if (r->has_query && mp_path_check_query(r->query.p, r->query.len, &why) != 0)
        return refuse_target(r, why);
    if (is_asterisk(p) || mp_path_is_normal(p.p, p.len, &o))
        return 0;
    char *out = mp_req_arena(r, p.len);
    if (!out)
        return 500;
    ssize_t n = mp_path_normalize(p.p, p.len, &o, out, &why);
    if (n < 0)
        return refuse_target(r, why);
    r->arena.end -= (uint32_t)(p.len - (size_t)n);
    r->path = (mp_slice){out, (size_t)n};
    return 0;
}

void mp_req_identify(mp_req_t *r)
{
    if (!r->id_len)
        assign_request_id(r);
    if (!r->client_ip[0])
        describe_peer(r);
}

int mp_req_decide(mp_req_t *r)
{
    mp_http_request_t *h = &r->h;
    const mp_config_t *cfg = r->gen->cfg;
    if (!cfg->settings.underscores_in_headers)
        drop_underscored(h);
    r->path = h->path;
    r->query = h->query;
    r->has_query = h->has_query;
    assign_request_id(r);
    describe_peer(r);
    int bad = normalize_target(r);
    if (bad)
        return bad;
    r->client_path = r->path;
    if (cfg->settings.max_body_size && h->content_length > 0 &&
        (uint64_t)h->content_length > cfg->settings.max_body_size)
        return 413;
    if (cfg->pre_ref != LUA_NOREF) {
        int rc = mp_hook_pre(r->gen->L, r, cfg->pre_ref);
        if (rc != MP_HOOK_NEXT)
            return hook_outcome(rc);
    }
    return route_request(r);
}

/* A complete, valid head is in c->in: decide framing, then what
 * mp_req_decide decides: the exchange, or an answer made here. */
static void start_request(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    mp_http_request_t *h = &r->h;

    r->is_head = h->method.len == 4 && memcmp(h->method.p, "HEAD", 4) == 0;
    r->keepalive = h->minor == 1 ? !h->conn_close : (h->conn_keepalive && !h->conn_close);
    if (c->w->stopping)
        r->keepalive = 0;
    r->body_start = (uint32_t)h->head_len;
    c->in.start = r->body_start;
    if (h->chunked) {
        r->body.kind = MP_BODY_CHUNKED;
    } else if (h->content_length > 0) {
        r->body.kind = MP_BODY_LENGTH;
        r->body.left = (uint64_t)h->content_length;
    } else {
        r->body.done = 1;
    }
    int d = mp_req_decide(r);
    if (d == MP_DECIDE_RESPONDED)
        return mp_conn_respond(c);
    if (d == MP_DECIDE_STATIC)
        return send_static(c);
    if (d != MP_DECIDE_UPSTREAM)
        return mp_conn_fail(c, d);
    c->state = MP_CS_PROXY;
    mp_upstream_start(r);
}

/* Parses what c->in holds. Returns 1 when a request was started or
 * answered, 0 when more bytes are needed. */
static int try_parse(mp_conn_t *c)
{
    if (!c->req && !(c->req = req_new(c))) {
        mp_conn_close(c);
        return 1;
    }
    int rc = mp_http1_parse_request(mp_buf_head(&c->in), mp_buf_len(&c->in), &c->scanned, &c->w->limits,
                                    &c->req->h);
    if (rc == MP_EAGAIN) {
        if (mp_buf_room(&c->in) == 0) { /* the limits are below the block size; keep it an invariant */
            c->req->h.status = 431;
            rc = MP_EPROTO;
        } else {
            return 0;
        }
    }
    if (rc < 0) {
        mp_log_debug("w%d: bad request from client: %s", c->w->id, c->req->h.error ? c->req->h.error : "?");
        c->req->keepalive = 0;
        c->req->body.done = 1;
        mp_conn_fail(c, c->req->h.status ? c->req->h.status : 400);
        return 1;
    }
    start_request(c);
    return 1;
}

static void on_readable(mp_conn_t *c)
{
    mp_worker_t *w = c->w;
    if (mp_buf_acquire(&c->in, &w->bufs) != 0)
        return mp_conn_close(c);
    for (;;) {
        if (mp_buf_len(&c->in) && try_parse(c))
            return;
        ssize_t n = read(c->fd, mp_buf_tail(&c->in), mp_buf_room(&c->in));
        if (n > 0) {
            c->in.end += (uint32_t)n;
            if (c->state == MP_CS_IDLE) {
                idle_leave(c);
                c->state = MP_CS_HEAD;
                mp_conn_timer(c, w->cfg->settings.client_header_timeout);
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            if (c->state == MP_CS_IDLE || mp_buf_len(&c->in) == 0)
                mp_buf_release(&c->in, &w->bufs); /* an idle connection holds no block */
            return;
        }
        return mp_conn_close(c); /* EOF or error: nothing to answer */
    }
}

static void linger_read(mp_conn_t *c)
{
    char sink[4096];
    for (;;) {
        ssize_t n = read(c->fd, sink, sizeof(sink));
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        return mp_conn_close(c);
    }
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    mp_conn_t *c = container_of(io, mp_conn_t, io);
    switch (c->state) {
    case MP_CS_PROXY:
        return mp_upstream_on_client(c->req, revents);
    case MP_CS_LOCAL:
        if (revents & EV_WRITE)
            flush_local(c);
        return;
    case MP_CS_LINGER:
        return linger_read(c);
    default:
        return on_readable(c);
    }
}

static void on_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_conn_t *c = container_of(t, mp_conn_t, timer);
    switch (c->state) {
    case MP_CS_HEAD:
        if (c->in.end > 0) {
            if (!c->req && !(c->req = req_new(c)))
                return mp_conn_close(c);
            c->req->keepalive = 0;
            c->req->body.done = 1;
            mp_log_info("w%d: client_header_timeout: 408 to a client that sent %u bytes", c->w->id,
                        (unsigned)c->in.end);
            return mp_conn_fail(c, 408);
        }
        return mp_conn_close(c);
    case MP_CS_PROXY:
        return mp_upstream_on_client_timeout(c->req);
    default: /* idle keep-alive, a stalled local response, lingering */
        return mp_conn_close(c);
    }
}

/* Stops reading requests and closes once the client has had time to read
 * the response: closing with unread bytes would reset the connection and
 * could destroy the response in flight (RFC 9112 §9.6). */
static void linger_close(mp_conn_t *c)
{
    if (shutdown(c->fd, SHUT_WR) != 0)
        return mp_conn_close(c);
    c->state = MP_CS_LINGER;
    mp_buf_release(&c->in, &c->w->bufs);
    mp_buf_release(&c->out, &c->w->bufs);
    mp_conn_want(c, EV_READ);
    mp_conn_timer(c, LINGER_SECONDS);
    linger_read(c);
}

/* The request's metrics entry: by route name, cached per route in the
 * worker's generation so that a request does no lookup. */
static mp_route_stats_t *route_stats(mp_worker_t *w, mp_req_t *r)
{
    const mp_route_t *rt = r->match.route;
    if (!rt)
        return mp_metrics_route(&w->metrics, NULL);
    mp_route_stats_t **cache = r->gen->route_stats;
    if (!cache)
        return mp_metrics_route(&w->metrics, rt->name);
    if (!cache[rt->index - 1])
        cache[rt->index - 1] = mp_metrics_route(&w->metrics, rt->name);
    return cache[rt->index - 1];
}

static void log_request(mp_conn_t *c, mp_req_t *r)
{
    mp_worker_t *w = c->w;
    w->stats.requests++;
    ev_tstamp now = ev_now(w->loop);
    mp_metrics_request(route_stats(w, r), r->status, now - r->t_start);
    if (w->alog.fd < 0)
        return;
    mp_alog_entry_t e = {0};
    e.time = ev_time() - (now - r->t_start);
    e.id = (mp_slice){r->id, r->id_len};
    e.client = (mp_slice){r->client_ip, strlen(r->client_ip)};
    e.method = r->h.method;
    e.path = r->h.path;
    if (r->match.route)
        e.route = (mp_slice){r->match.route->name, strlen(r->match.route->name)};
    e.status = r->status;
    e.bytes = r->bytes_sent;
    e.upstream_time = -1;
    if (r->server >= 0) {
        const mp_upstream_def_t *u = &r->gen->cfg->upstreams[r->upstream];
        const char *addr = u->servers[r->server].addr.text;
        e.upstream_server = (mp_slice){addr, strlen(addr)};
        e.upstream_time = (r->t_up_end ? r->t_up_end : now) - r->t_up_start;
    }
    e.duration = now - r->t_start;
    mp_alog_write(&w->alog, &e);
}

static void end_request(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    if (!r)
        return;
    mp_upstream_cancel(r);
    if (r->has_file) {
        close(r->file_fd);
        r->has_file = 0;
    }
    const mp_config_t *cfg = r->gen->cfg;
    if (r->status && cfg->log_ref != LUA_NOREF)
        mp_hook_log(r->gen->L, r, cfg->log_ref);
    mp_hook_release(r->gen->L, r);
    if (r->status)
        log_request(c, r);
    mp_worker_t *w = c->w;
    mp_gen_unref(r->gen);
    if (w->nfree_reqs < 256) {
        *(mp_req_t **)r = w->free_reqs;
        w->free_reqs = r;
        w->nfree_reqs++;
    } else {
        free(r);
    }
    c->req = NULL;
    c->requests++;
}

void mp_conn_request_done(mp_conn_t *c)
{
    mp_worker_t *w = c->w;
    mp_req_t *r = c->req;
    int keep = r->keepalive && r->body.done && !w->stopping && !c->read_eof;
    int unread = !r->body.done || c->in.start < c->in.end;
    end_request(c);
    mp_buf_release(&c->out, &w->bufs);
    if (!keep && unread)
        return linger_close(c);
    if (!keep)
        return mp_conn_close(c);

    /* Pipelined bytes after this request move to the front. */
    mp_buf_compact(&c->in);
    c->scanned = 0;
    if (mp_buf_len(&c->in)) {
        c->state = MP_CS_HEAD;
        mp_conn_timer(c, w->cfg->settings.client_header_timeout);
        mp_conn_want(c, EV_READ);
        ev_feed_event(w->loop, &c->io, EV_READ); /* next loop turn: no recursion through pipelines */
        return;
    }
    mp_buf_release(&c->in, &w->bufs);
    idle_enter(c);
    mp_conn_want(c, EV_READ);
    mp_conn_timer(c, w->cfg->settings.keepalive_timeout);
}

/* Waits until the client can take more, at most client_body_timeout. */
static void wait_writable(mp_conn_t *c)
{
    mp_conn_want(c, EV_WRITE);
    mp_conn_timer(c, c->w->cfg->settings.client_body_timeout);
}

/* Sends the rest of a static response's file (after the head). Returns 0
 * once it is all sent, -1 when waiting for the socket or closed. */
static int send_file(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    size_t turn = 0;
    while (r->file_left) {
        if (turn >= SENDFILE_TURN) { /* the socket is likely writable: the next loop turn goes on */
            wait_writable(c);
            return -1;
        }
        off_t off = (off_t)r->file_off;
        size_t want = r->file_left < SENDFILE_TURN ? (size_t)r->file_left : SENDFILE_TURN;
        ssize_t n = sendfile(c->fd, r->file_fd, &off, want);
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
            mp_log_info("w%d: static file shrank while sent (request %.*s)", c->w->id, r->id_len, r->id);
        mp_conn_close(c);
        return -1;
    }
    return 0;
}

static void flush_local(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    while (mp_buf_len(&c->out) || r->local_out_len) {
        struct iovec iov[2] = {{mp_buf_head(&c->out), mp_buf_len(&c->out)},
                               {(char *)r->local_out, r->local_out_len}};
        ssize_t n = writev(c->fd, iov, 2);
        if (n > 0) {
            size_t head = mp_buf_len(&c->out) < (size_t)n ? mp_buf_len(&c->out) : (size_t)n;
            c->out.start += (uint32_t)head;
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
    mp_conn_request_done(c);
}

/* Runs the response hooks on a response made here (the route's chain, or
 * the global one before routing). Returns the status to send, which a hook
 * may have changed, or 0 when a hook failed. */
static int local_response_hooks(mp_req_t *r, int status)
{
    const mp_config_t *cfg = r->gen->cfg;
    int ref = r->match.route ? cfg->route_hooks[r->match.route->index - 1].response : cfg->response_ref;
    if (ref == LUA_NOREF)
        return status;
    r->status = status;
    if (mp_hook_response(r->gen->L, r, ref, NULL) != MP_HOOK_NEXT)
        return 0;
    return r->resp_status ? r->resp_status : status;
}

static void error_body(int status, mp_local_t *out)
{
    int n = snprintf(out->text, sizeof(out->text), "%d %s\n", status, mp_http1_reason(status));
    out->body = (mp_slice){out->text, (size_t)n};
}

int mp_local_response(mp_req_t *r, int status, mp_buf_t *b, mp_local_t *out)
{
    const mp_hedit_t *edits = NULL;
    int shown = 0;
    if (status == 0 && (shown = local_response_hooks(r, r->local_status))) {
        /* what req:respond gave, as the response hooks left it */
        out->body = (mp_slice){r->local_body, r->local_body_len};
        edits = r->resp_edits;
    } else {
        if (status == 0) /* a response hook failed on it */
            status = 500;
        error_body(status, out);
        /* Response hooks see the proxy's own errors too, once the head was
         * valid (and not when a hook is what failed). */
        r->resp_edits = NULL;
        shown = status;
        if (r->path.p && !r->hook_failed && !(shown = local_response_hooks(r, status))) {
            shown = 500;
            r->resp_edits = NULL;
            error_body(500, out);
        }
        edits = r->resp_edits;
    }
    r->status = shown;
    if (mp_head_local(r, shown, edits, out->body.len, b) != 0) /* Content-Length on a HEAD too: RFC 9110 §9.3.2 */
        return -1;
    return shown;
}

/* Writes the response made here (status, or 0 for req:respond's): head
 * into c->out, the body after it (or, when it does not fit, from the
 * request's local_body). */
static void send_local(mp_conn_t *c, int status)
{
    mp_req_t *r = c->req;
    mp_local_t *local = &r->local;
    mp_buf_t *b = &c->out;
    if (mp_buf_acquire(b, &c->w->bufs) != 0 || mp_local_response(r, status, b, local) < 0)
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
    mp_conn_want(c, 0);
    flush_local(c);
}

/* A static route (static.h): the head into c->out, then the file with
 * sendfile (flush_local), or the short body of a 301, 405 or error. */
static void send_static(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    mp_static_file_t f;
    mp_local_t *local = &r->local;
    if (!r->body.done)
        r->keepalive = 0; /* the body is not read */
    mp_static_resolve(r, &f);
    if (mp_buf_acquire(&c->out, &c->w->bufs) != 0 || mp_static_response(r, &f, &c->out, local) < 0 ||
        mp_buf_append(&c->out, local->body.p, r->is_head ? 0 : local->body.len) != 0) {
        mp_static_dispose(&f);
        return mp_conn_close(c);
    }
    if (f.fd >= 0) {
        r->file_fd = f.fd;
        r->file_left = f.size;
        r->has_file = 1;
    }
    r->resp_started = 1;
    c->state = MP_CS_LOCAL;
    mp_conn_want(c, 0);
    flush_local(c);
}

/* A hook answered: the response hooks see that answer like any other. */
void mp_conn_respond(mp_conn_t *c)
{
    mp_req_t *r = c->req;
    if (!r->body.done)
        r->keepalive = 0;
    send_local(c, 0);
}

void mp_conn_fail(mp_conn_t *c, int status)
{
    mp_req_t *r = c->req;
    if (c->closed)
        return;
    if (!r || r->resp_started)
        return mp_conn_close(c);
    mp_upstream_cancel(r);
    mp_req_identify(r);
    if (!r->body.done || status == 408 || status == 400)
        r->keepalive = 0;
    if (status >= 500)
        mp_log_info("w%d: %d for request %.*s", c->w->id, status, r->id_len, r->id);
    send_local(c, status);
}

void mp_conn_close(mp_conn_t *c)
{
    if (c->closed)
        return;
    mp_worker_t *w = c->w;
    c->closed = 1;
    idle_leave(c);
    if (c->req && c->req->status == 0 && c->state == MP_CS_PROXY)
        c->req->status = 499; /* the client went away first (nginx's convention) */
    end_request(c);
    ev_io_stop(w->loop, &c->io);
    ev_timer_stop(w->loop, &c->timer);
    close(c->fd);
    c->fd = -1;
    mp_buf_release(&c->in, &w->bufs);
    mp_buf_release(&c->out, &w->bufs);
    unlink_conn(&w->conns, c);
    link_conn(&w->graveyard, c);
    w->nconns--;
    mp_metrics_add(&w->metrics.conns, -1);
}

void mp_conn_reap(mp_worker_t *w)
{
    while (w->graveyard) {
        mp_conn_t *c = w->graveyard;
        w->graveyard = c->next;
        free(c);
    }
}

void mp_conn_drain(mp_worker_t *w)
{
    mp_conn_t *next;
    for (mp_conn_t *c = w->conns; c; c = next) {
        next = c->next;
        if (c->state == MP_CS_IDLE || (c->state == MP_CS_HEAD && c->in.end == 0))
            mp_conn_close(c);
        else if (c->req)
            c->req->keepalive = 0;
    }
}
