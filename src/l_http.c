/* l_http.c: the HTTP call-out of moonproxy.http (l_http.h).
 *
 * core.start(opts) checks the request and formats it, then the hook
 * yields (mp_hook_yield); start() picks a server and connects once no Lua
 * runs; the answer, read whole, resumes the hook (mp_hook_resume), which
 * takes it with core.answer(). One call is one exchange on one connection:
 * a pooled connection the server had closed is retried once on a new one,
 * and a connect failure to an upstream goes to another server, as the
 * upstream's retries allow. The call's timeout covers all of it. */
#include "l_http.h"

#include "balancer.h"
#include "ctx.h"
#include "gen.h"
#include "health.h"
#include "http1.h"
#include "l_request.h"
#include "pool.h"
#include "resolve.h"
#include "strbuf.h"
#include "vm.h"

#include <arpa/inet.h>
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <pthread.h>
#include <stdlib.h>
#include <strings.h>

#define DEFAULT_TIMEOUT 10.0 /* seconds, the whole call */
#define DEFAULT_MAX_BODY ((size_t)1 << 20)
#define MAX_HEAD ((size_t)64 << 10) /* a response head longer than this is refused */
#define READ_STEP ((size_t)16 << 10)
#define URL_KEEPALIVE 16 /* idle connections kept per URL address per worker */
#define URL_KEEPALIVE_TIMEOUT 60.0

enum { RD_HEAD, RD_BODY, RD_DONE };

typedef struct {
    mp_callout_t base;
    mp_req_t *r;
    mp_io_ctx_t *ctx;
    int upstream;           /* index in the generation's upstreams, or -1: a URL */
    mp_addr_t addr;         /* a URL's address (text owned) */
    char *tls_name;         /* an https URL's host: SNI and the name verified (owned); NULL: plain */
    char *dns_name;         /* a URL's host when it is a name (owned): resolved before the attempt */
    int port;               /* ... and its port */
    mp_resolve_query_t *dq; /* its lookup under way */
    mp_server_pool_t *sp;   /* the pool of the current attempt */
    int server;             /* the upstream's server of the current attempt, -1 */
    mp_peer_t *peer;        /* its health state, while an attempt counts */
    int trial, reported, tries;
    double attempt_start;
    mp_upconn_t *u;
    char *out; /* head and body to send */
    size_t out_len, out_off;
    int is_head; /* a HEAD request: the answer has no body */
    double timeout;
    size_t max_body;
    ev_timer timer; /* the call's deadline */
    mp_strbuf_t in; /* bytes read, not yet consumed */
    size_t scanned; /* response head parser resume point */
    int rd;         /* RD_* */
    int status;
    char *head; /* the response head, copied once complete */
    size_t head_len;
    uint32_t (*fields)[4]; /* its fields: name offset and length, value offset and length, in head */
    unsigned nfields;
    int kind;      /* body framing: MP_BODY_* */
    uint64_t left; /* MP_BODY_LENGTH: bytes still to come */
    mp_chunked_t chunk;
    int reusable; /* the connection may go back to its pool at the end */
    mp_strbuf_t body;
    char err[200]; /* set: the call failed */
    int starting;  /* inside start() */
    int over;      /* complete() ran */
} call_t;

/* What https URLs are verified with: the system's CA store (or
 * SSL_CERT_FILE / SSL_CERT_DIR), the URL's host as SNI and the name
 * checked. Made by the process's first https call: OpenSSL 3's SSL_CTX_new
 * costs a few milliseconds and some 200,000 allocations, which a
 * configuration without https URLs should not pay in every VM. */
static mp_tls_client_t *url_tls;
static char url_tls_err[160];
static pthread_once_t url_tls_once = PTHREAD_ONCE_INIT;

static void make_url_tls(void)
{
    /* every VM makes one, and most configurations never call an https URL:
     * the CA directory is read as handshakes need it, not the whole bundle */
    mp_tls_client_def_t def = {.verify = 1, .lazy_store = 1};
    url_tls = mp_tls_client_new(&def, url_tls_err, sizeof(url_tls_err));
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents);
static void on_conn_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void attempt(call_t *c, int avoid, int fresh);
static void pump(call_t *c);

static call_t *call_of(mp_upconn_t *u)
{
    return container_of(u->req->callout, call_t, base);
}

static const mp_upstream_def_t *udef(call_t *c)
{
    return &c->r->gen->cfg->upstreams[c->upstream];
}

static const char *target_name(call_t *c)
{
    return c->upstream >= 0 ? udef(c)->name : c->addr.text;
}

/* ---- the end of a call ---- */

static void close_conn(call_t *c)
{
    if (!c->u)
        return;
    c->u->req = NULL;
    mp_upconn_close(c->u);
    c->u = NULL;
}

/* The attempt's passive outcome (upstreams only), once. */
static void peer_result(call_t *c, enum mp_outcome out, int status, const char *reason)
{
    if (!c->peer || c->reported)
        return;
    c->reported = 1;
    const mp_balancer_t *b = &c->r->gen->balancers[c->upstream];
    if (out != MP_OUT_NEUTRAL)
        mp_peer_count(c->peer, status);
    double ms = out == MP_OUT_NEUTRAL ? -1 : (ev_time() - c->attempt_start) * 1000;
    mp_peer_result(c->peer, out, ms, c->trial, &b->passive, reason);
}

static void peer_done(call_t *c)
{
    if (!c->peer)
        return;
    peer_result(c, MP_OUT_NEUTRAL, 0, NULL);
    mp_peer_done(c->peer);
    c->peer = NULL;
}

/* Stops everything under way; the answer (or error) stays for the hook. */
static void stop(call_t *c)
{
    ev_timer_stop(c->ctx->loop, &c->timer);
    mp_resolve_cancel(c->dq);
    c->dq = NULL;
    peer_done(c);
    if (c->u && c->rd == RD_DONE && c->reusable && c->in.len == 0) {
        mp_upconn_t *u = c->u;
        c->u = NULL;
        u->requests++;
        mp_pool_put(u); /* sets u->req = NULL */
    } else {
        close_conn(c);
    }
}

/* The call is over: the hook goes on (and takes the answer). Nothing of c
 * may be touched after this. */
static void complete(call_t *c)
{
    stop(c);
    c->over = 1;
    if (!c->starting)
        mp_hook_resume(c->r);
}

static void fail(call_t *c, const char *fmt, const char *detail)
{
    snprintf(c->err, sizeof(c->err), fmt, detail);
    complete(c);
}

static void cancel(mp_callout_t *base)
{
    call_t *c = container_of(base, call_t, base);
    stop(c);
    free(c->out);
    free(c->head);
    free(c->fields);
    free(c->addr.text);
    free(c->tls_name);
    free(c->dns_name);
    mp_strbuf_free(&c->in);
    mp_strbuf_free(&c->body);
    free(c);
}

/* ---- connecting ---- */

/* Something went wrong before any response byte: another attempt when it
 * is safe (nothing reached the server, or a pooled connection had been
 * closed), else the call fails. */
static void attempt_failed(call_t *c, const char *why, int nothing_sent)
{
    int reused = c->u && c->u->reused;
    int got = c->in.len > 0 || c->rd != RD_HEAD;
    close_conn(c);
    if (reused && !got && !nothing_sent) /* the server had closed an idle connection */
        return attempt(c, c->server, 1);
    peer_result(c, MP_OUT_FAIL, 0, why);
    peer_done(c);
    if (c->upstream >= 0 && nothing_sent && c->tries <= udef(c)->retries && udef(c)->nservers > 1)
        return attempt(c, c->server, 0);
    fail(c, "%s", why);
}

static void want(call_t *c, int events)
{
    mp_upconn_want(c->u, events);
}

static void connected(call_t *c)
{
    mp_upconn_t *u = c->u;
    mp_tls_client_t *tls = c->upstream >= 0 ? udef(c)->tls : c->tls_name ? url_tls : NULL;
    if (tls && !u->sock.ops) {
        char name[256];
        const char *sni = c->upstream >= 0 ? mp_tls_server_name(udef(c)->tls_name, u->sp->addr.text, name, sizeof(name))
                                           : c->tls_name;
        SSL *ssl = mp_tls_client_session(tls, u->sock.fd, sni, &u->sp->tls_session);
        if (!ssl)
            return fail(c, "%s", "out of memory");
        mp_io_tls(&u->sock, ssl);
        u->state = MP_UP_CONNECTING;
    }
    if (u->sock.handshaking) {
        int rc = mp_io_handshake(&u->sock);
        if (rc == MP_EAGAIN)
            return want(c, EV_READ);
        if (rc != 0) {
            char why[160];
            mp_tls_error(u->sock.session, why, sizeof(why));
            char msg[200];
            snprintf(msg, sizeof(msg), "TLS handshake failed: %s", why);
            return attempt_failed(c, msg, 1);
        }
    }
    u->state = MP_UP_ACTIVE;
    pump(c);
}

/* One attempt: a server (an upstream's pick, avoiding avoid) or the URL's
 * address; a pooled connection unless fresh. */
static void attempt(call_t *c, int avoid, int fresh)
{
    mp_req_t *r = c->r;
    c->in.len = 0;
    c->scanned = 0;
    c->out_off = 0;
    c->rd = RD_HEAD;
    if (c->upstream >= 0) {
        if (!fresh || c->server < 0) {
            int trial = 0;
            int s = mp_balancer_pick(&r->gen->balancers[c->upstream], &mp_req_pick, r, avoid, &trial);
            if (s == MP_PICK_ERROR)
                return fail(c, "%s", "the upstream's balancer failed");
            if (s < 0)
                return fail(c, "upstream %s: no server available", udef(c)->name);
            c->server = s;
            c->trial = trial;
        }
        c->sp = r->gen->pools[c->upstream].servers[c->server];
        if (!c->peer) {
            c->peer = r->gen->balancers[c->upstream].peers[c->server];
            c->reported = 0;
            mp_peer_begin(c->peer);
        }
    } else if (!c->sp) {
        char key[512];
        if (c->tls_name) /* the first https call of the process makes the context (a few ms, once) */
            pthread_once(&url_tls_once, make_url_tls);
        if (c->tls_name && !url_tls)
            return fail(c, "https: %s", url_tls_err);
        const char *tls = c->tls_name ? mp_tls_client_key(url_tls, c->tls_name, key, sizeof(key)) : NULL;
        if (!(c->sp = mp_pool_standalone(c->ctx, &c->addr, tls, URL_KEEPALIVE, URL_KEEPALIVE_TIMEOUT)))
            return fail(c, "%s", "out of memory");
    }
    c->attempt_start = ev_time();
    mp_upconn_t *u = fresh ? NULL : mp_pool_take(c->sp, c->ctx);
    if (u) {
        u->reused = 1;
        ev_set_cb(&u->io, on_io);
        ev_set_cb(&u->timer, on_conn_timer);
    } else {
        c->tries++;
        if (!(u = mp_upconn_connect(c->ctx, c->sp, on_io, on_conn_timer))) {
            int e = errno;
            if (mp_upconn_local_error(e))
                return fail(c, "cannot open a connection: %s", strerror(e));
            return attempt_failed(c, "connect failed", 1);
        }
        u->reused = 0;
        c->ctx->stats.upstream_connects++;
    }
    u->req = r;
    c->u = u;
    if (u->state == MP_UP_CONNECTING)
        return want(c, EV_WRITE);
    if (!u->reused)
        return connected(c);
    pump(c);
}

static void on_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    call_t *c = container_of(t, call_t, timer);
    if (c->rd == RD_HEAD)
        peer_result(c, MP_OUT_FAIL, 0, "timeout");
    snprintf(c->err, sizeof(c->err), "timeout");
    complete(c);
}

/* The URL's name resolved to addrs: one of them, in turn, is the call's. */
static int use_address(call_t *c, const mp_sockaddr_t *addrs, int n)
{
    static _Thread_local unsigned turn;
    const mp_sockaddr_t *a = &addrs[turn++ % (unsigned)n];
    char ip[INET6_ADDRSTRLEN], text[INET6_ADDRSTRLEN + 10];
    c->addr.ss = a->ss;
    c->addr.sslen = a->sslen;
    if (a->ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&c->addr.ss;
        in6->sin6_port = htons((uint16_t)c->port);
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        snprintf(text, sizeof(text), "[%s]:%d", ip, c->port);
    } else {
        struct sockaddr_in *in = (struct sockaddr_in *)&c->addr.ss;
        in->sin_port = htons((uint16_t)c->port);
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
        snprintf(text, sizeof(text), "%s:%d", ip, c->port);
    }
    free(c->addr.text);
    return (c->addr.text = strdup(text)) ? 0 : -1;
}

static void resolved(void *arg, const mp_sockaddr_t *addrs, int n, const char *err)
{
    call_t *c = arg;
    c->dq = NULL;
    if (!n)
        return fail(c, "cannot resolve the URL's host: %s", err ? err : "no address");
    if (use_address(c, addrs, n) != 0)
        return fail(c, "%s", "out of memory");
    attempt(c, -1, 0);
}

static int start(mp_callout_t *base)
{
    call_t *c = container_of(base, call_t, base);
    ev_timer_init(&c->timer, on_deadline, c->timeout, 0);
    ev_timer_start(c->ctx->loop, &c->timer);
    c->server = -1;
    c->starting = 1; /* an end found now is reported by the return value, not by a resume */
    if (c->dns_name) {
        const mp_resolver_def_t *rd = &c->r->gen->cfg->settings.resolver;
        mp_sockaddr_t addrs[MP_RESOLVE_MAX];
        int n = mp_resolve_cached(rd, c->dns_name, addrs, MP_RESOLVE_MAX);
        if (n > 0 && use_address(c, addrs, n) != 0)
            fail(c, "%s", "out of memory");
        else if (n > 0)
            attempt(c, -1, 0);
        else if (!(c->dq = mp_resolve_start(c->ctx->loop, rd, c->dns_name, resolved, c)))
            fail(c, "%s", "out of memory");
    } else {
        attempt(c, -1, 0);
    }
    c->starting = 0;
    return c->over;
}

/* ---- the exchange ---- */

/* The response head is complete at c->in[0, n): its framing. */
static int head_done(call_t *c, const mp_http_response_t *rh)
{
    c->status = rh->status;
    if (!(c->head = malloc(rh->head_len)) ||
        !(c->fields = malloc((rh->nheaders ? rh->nheaders : 1) * sizeof(*c->fields))))
        return -1;
    memcpy(c->head, c->in.p, rh->head_len);
    c->head_len = rh->head_len;
    for (unsigned i = 0; i < rh->nheaders; i++) {
        const mp_header_t *f = &rh->headers[i];
        c->fields[i][0] = (uint32_t)(f->name.p - c->in.p);
        c->fields[i][1] = (uint32_t)f->name.len;
        c->fields[i][2] = (uint32_t)(f->value.p - c->in.p);
        c->fields[i][3] = (uint32_t)f->value.len;
    }
    c->nfields = rh->nheaders;
    c->reusable = !rh->conn_close && (rh->minor == 1 || rh->conn_keepalive);
    if (c->is_head || rh->status == 204 || rh->status == 304) {
        c->kind = MP_BODY_NONE;
    } else if (rh->chunked) {
        c->kind = MP_BODY_CHUNKED;
    } else if (rh->content_length >= 0) {
        c->kind = MP_BODY_LENGTH;
        c->left = (uint64_t)rh->content_length;
        if (c->left > c->max_body)
            return 1;
    } else {
        c->kind = MP_BODY_CLOSE;
        c->reusable = 0;
    }
    if (c->upstream >= 0) {
        const mp_balancer_t *b = &c->r->gen->balancers[c->upstream];
        char reason[24];
        int failed = mp_balancer_failure_status(b, rh->status);
        snprintf(reason, sizeof(reason), "status %d", rh->status);
        peer_result(c, failed ? MP_OUT_FAIL : MP_OUT_OK, rh->status, failed ? reason : NULL);
    }
    memmove(c->in.p, c->in.p + rh->head_len, c->in.len - rh->head_len);
    c->in.len -= rh->head_len;
    c->rd = c->kind == MP_BODY_NONE ? RD_DONE : RD_BODY;
    return 0;
}

static int body_add(call_t *c, const char *p, size_t n)
{
    if (c->body.len + n > c->max_body)
        return 1;
    mp_strbuf_append(&c->body, p, n);
    return c->body.oom ? -1 : 0;
}

/* Consumes what c->in holds. Returns 0 (more is needed, or RD_DONE), or
 * fails the call and returns -1. */
static int consume(call_t *c)
{
    static __thread mp_http_response_t rh;
    while (c->rd == RD_HEAD) {
        int rc = mp_http1_parse_response(c->in.p, c->in.len, &c->scanned, MAX_HEAD, &rh);
        if (rc == MP_EAGAIN) {
            if (c->in.len >= MAX_HEAD)
                goto invalid;
            return 0;
        }
        if (rc < 0)
            goto invalid;
        if (rh.status >= 100 && rh.status < 200) { /* interim: the final answer follows */
            memmove(c->in.p, c->in.p + rh.head_len, c->in.len - rh.head_len);
            c->in.len -= rh.head_len;
            c->scanned = 0;
            continue;
        }
        int hd = head_done(c, &rh);
        if (hd < 0)
            goto oom;
        if (hd > 0)
            goto too_big;
    }
    if (c->rd == RD_BODY && c->kind == MP_BODY_LENGTH) {
        size_t n = c->in.len < c->left ? c->in.len : (size_t)c->left;
        int rc = body_add(c, c->in.p, n);
        if (rc)
            goto body_failed;
        memmove(c->in.p, c->in.p + n, c->in.len - n);
        c->in.len -= n;
        c->left -= n;
        if (c->left == 0)
            c->rd = RD_DONE;
    } else if (c->rd == RD_BODY && c->kind == MP_BODY_CLOSE) {
        int rc = body_add(c, c->in.p, c->in.len);
        if (rc)
            goto body_failed;
        c->in.len = 0;
    } else if (c->rd == RD_BODY) {
        size_t off = 0;
        while (off < c->in.len && !c->chunk.done) {
            mp_slice data;
            ssize_t k = mp_chunked_decode(&c->chunk, c->in.p + off, c->in.len - off, &data);
            if (k < 0)
                goto invalid;
            int rc = data.len ? body_add(c, data.p, data.len) : 0;
            if (rc)
                goto body_failed;
            off += (size_t)k;
            if (k == 0)
                break;
        }
        memmove(c->in.p, c->in.p + off, c->in.len - off);
        c->in.len -= off;
        if (c->chunk.done)
            c->rd = RD_DONE;
    }
    return 0;
body_failed:
    if (c->body.oom)
        goto oom;
too_big:
    c->reusable = 0;
    snprintf(c->err, sizeof(c->err), "response body larger than max_body (%zu bytes)", c->max_body);
    complete(c);
    return -1;
invalid:
    peer_result(c, MP_OUT_FAIL, 0, "invalid response");
    c->reusable = 0;
    snprintf(c->err, sizeof(c->err), "invalid response from %s", target_name(c));
    complete(c);
    return -1;
oom:
    c->reusable = 0;
    snprintf(c->err, sizeof(c->err), "out of memory");
    complete(c);
    return -1;
}

static void readable(call_t *c)
{
    for (;;) {
        if (mp_strbuf_reserve(&c->in, READ_STEP) != 0) {
            c->reusable = 0;
            return fail(c, "%s", "out of memory");
        }
        ssize_t n = mp_io_read(&c->u->sock, c->in.p + c->in.len, READ_STEP);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return want(c, EV_READ);
        if (n <= 0) {
            if (c->rd == RD_BODY && c->kind == MP_BODY_CLOSE && n == 0) {
                c->rd = RD_DONE;
                return complete(c);
            }
            if (c->rd == RD_HEAD)
                return attempt_failed(c, n == 0 ? "connection closed before the response" : "connection reset", 0);
            c->reusable = 0;
            return fail(c, "%s", "connection closed mid-response");
        }
        c->in.len += (size_t)n;
        if (consume(c) != 0)
            return;
        if (c->rd == RD_DONE)
            return complete(c);
    }
}

/* Writes what is left of the request, then reads. */
static void pump(call_t *c)
{
    while (c->out_off < c->out_len) {
        struct iovec iov = {c->out + c->out_off, c->out_len - c->out_off};
        ssize_t n = mp_io_writev(&c->u->sock, &iov, 1);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return want(c, EV_WRITE);
        return attempt_failed(c, "connection reset", 0);
    }
    want(c, EV_READ); /* the answer cannot be there yet: no read that would find nothing */
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    mp_upconn_t *u = container_of(io, mp_upconn_t, io);
    if (!u->req)
        return mp_pool_idle_event(u);
    call_t *c = call_of(u);
    if (u->state == MP_UP_CONNECTING) {
        if (!u->sock.ops && mp_io_connect_result(&u->sock) != 0)
            return attempt_failed(c, "connect failed", 1);
        return connected(c);
    }
    if (MP_UNLIKELY(u->sock.ops != NULL))
        revents = mp_upconn_revents(u, revents);
    if (c->out_off < c->out_len)
        return pump(c);
    if (revents & EV_READ)
        readable(c);
}

/* Only an idle connection's timer runs (the call has its own deadline). */
static void on_conn_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_upconn_t *u = container_of(t, mp_upconn_t, timer);
    if (!u->req)
        return mp_pool_idle_event(u);
    mp_upconn_timer(u, 0);
}

/* ---- the binding ---- */

static int is_tchar(unsigned char ch)
{
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static int is_token(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)p[i]))
            return 0;
    return n > 0;
}

/* A field value or a target: no CR, LF, NUL or other controls but HTAB
 * (a target: not even spaces). */
static int clean(const char *p, size_t n, int target)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f || (target && (ch == ' ' || ch == '\t' || ch == '#')))
            return 0;
    }
    return 1;
}

/* Fields the call frames or manages itself. */
static int reserved(const char *k, size_t n)
{
    static const char *const names[] = {"content-length", "transfer-encoding", "connection",      "keep-alive", "te",
                                        "upgrade",        "trailer",           "proxy-connection"};
    for (size_t i = 0; i < MP_ARRAY_LEN(names); i++)
        if (strlen(names[i]) == n && strncasecmp(names[i], k, n) == 0)
            return 1;
    return 0;
}

/* The host of "host:port" / "[v6]:port" (malloc'd). */
static char *tls_name(const char *hp)
{
    char buf[300];
    return strdup(mp_tls_server_name(NULL, hp, buf, sizeof(buf)));
}

/* The URL's address (text "host:port" in hp) and its host as written. */
/* Returns 0 for an IP literal (addr set), or the length of the DNS name
 * that starts hp (*dns_port set). */
static int parse_url(lua_State *L, const char *url, size_t n, mp_addr_t *addr, char hp[300], mp_slice *host,
                     mp_slice *path, int *tls, int *dns_port)
{
    *tls = n >= 8 && strncasecmp(url, "https://", 8) == 0;
    if (!*tls && (n < 7 || strncasecmp(url, "http://", 7) != 0))
        luaL_error(L, "http.request: url must start with http:// or https://, got '%s'", url);
    const char *h = url + (*tls ? 8 : 7), *end = url + n;
    const char *slash = h;
    while (slash < end && *slash != '/' && *slash != '?')
        slash++;
    size_t hl = (size_t)(slash - h);
    if (hl == 0 || hl > 255 || memchr(h, '@', hl))
        luaL_error(L, "http.request: url '%s' has no host (or has userinfo)", url);
    const char *close = memchr(h, ']', hl);
    const char *colon = memrchr(h, ':', hl);
    int has_port = colon && (!close || colon > close);
    snprintf(hp, 300, "%.*s%s", (int)hl, h, has_port ? "" : *tls ? ":443" : ":80");
    *host = (mp_slice){h, hl};
    *path = (mp_slice){slash, (size_t)(end - slash)};
    if (hl == 1 && h[0] == '*')
        luaL_error(L, "http.request: url '%s' has no host", url);
    if (mp_addr_parse(hp, addr) == 0) {
        free(addr->text); /* the call keeps its own copy of hp */
        addr->text = NULL;
        return 0;
    }
    /* a DNS name: letters, digits, '-' and '.', and a port */
    const char *pc = strrchr(hp, ':');
    size_t nl = pc ? (size_t)(pc - hp) : 0;
    int port = pc ? atoi(pc + 1) : 0;
    int name_ok = nl > 0 && nl < 254 && port > 0 && port < 65536 && strspn(pc + 1, "0123456789") == strlen(pc + 1);
    for (size_t i = 0; name_ok && i < nl; i++)
        name_ok = (hp[i] >= 'a' && hp[i] <= 'z') || (hp[i] >= 'A' && hp[i] <= 'Z') || (hp[i] >= '0' && hp[i] <= '9') ||
                  hp[i] == '-' || hp[i] == '.';
    if (!name_ok)
        luaL_error(L, "http.request: url host must be an IP address or a DNS name, and a port, got '%.*s'", (int)hl, h);
    *dns_port = port;
    return (int)nl;
}

/* Which upstream opts.upstream names (an upstream object or its name). */
static int find_upstream(lua_State *L, mp_req_t *r)
{
    lua_getfield(L, 1, "upstream");
    if (lua_istable(L, -1))
        lua_getfield(L, -1, "name");
    else
        lua_pushvalue(L, -1);
    const char *name = lua_tostring(L, -1);
    if (!name)
        luaL_error(L, "http.request: upstream must be an upstream or its name");
    const mp_config_t *cfg = r->gen->cfg;
    for (size_t i = 0; i < cfg->nupstreams; i++)
        if (strcmp(cfg->upstreams[i].name, name) == 0) {
            lua_pop(L, 2);
            return (int)i;
        }
    return luaL_error(L, "http.request: no upstream named '%s'", name);
}

/* A header value at idx: a string, or a number written as Lua writes it
 * (into num, so that no Lua string is made). */
static const char *value_at(lua_State *L, int idx, const char *k, char num[32], size_t *vn)
{
    if (lua_type(L, idx) == LUA_TSTRING)
        return lua_tolstring(L, idx, vn);
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "http.request: header %s: a value must be a string or a number", k);
    *vn = (size_t)snprintf(num, 32, "%.14g", lua_tonumber(L, idx));
    return num;
}

/* Walks opts.headers (at t): checks every field (raising for a bad one)
 * when out is NULL and returns the bytes its lines take; else writes them
 * at out (nothing raises then). *host: a Host field was given. */
static size_t header_lines(lua_State *L, int t, char *out, int *host)
{
    size_t total = 0;
    char num[32];
    lua_pushnil(L);
    while (lua_next(L, t)) {
        size_t kn;
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "http.request: header names must be strings");
        const char *k = lua_tolstring(L, -2, &kn);
        if (!out) {
            if (!is_token(k, kn))
                luaL_error(L, "http.request: '%s' is not a header name", k);
            if (reserved(k, kn))
                luaL_error(L, "http.request: header %s is set by the call itself", k);
            *host |= kn == 4 && strncasecmp(k, "host", 4) == 0;
        }
        int v = lua_gettop(L), list = lua_istable(L, v);
        for (int i = 1;; i++) {
            if (list)
                lua_rawgeti(L, v, i);
            else if (i > 1)
                break;
            else
                lua_pushvalue(L, v);
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                break;
            }
            size_t vn;
            const char *val = value_at(L, -1, k, num, &vn);
            if (!out && (!clean(val, vn, 0) || memchr(val, '\0', vn)))
                luaL_error(L, "http.request: header %s: the value has a control character", k);
            if (out) {
                memcpy(out + total, k, kn);
                memcpy(out + total + kn, ": ", 2);
                memcpy(out + total + kn + 2, val, vn);
                memcpy(out + total + kn + 2 + vn, "\r\n", 2);
            }
            total += kn + vn + 4;
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    return total;
}

/* The options of one call, as the hook gave them (the strings stay in opts). */
typedef struct {
    mp_slice url, path, query, method, body;
    int has_upstream, headers; /* headers: its stack index, 0: none */
    double timeout, max_body;
} opts_t;

static double opt_number(lua_State *L, const char *name)
{
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "http.request: %s must be a number, got %s", name, luaL_typename(L, -1));
    double v = lua_tonumber(L, -1);
    if (!(v > 0) || v > 1e12)
        luaL_error(L, "http.request: %s must be a number above 0", name);
    return v;
}

/* Reads opts (at 1) in one pass; raises for an unknown or mistyped one. */
static void read_opts(lua_State *L, opts_t *o)
{
    static const char *const names[] = {"url", "path", "query", "method", "body"};
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        size_t kn;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kn) : NULL;
        if (!k)
            luaL_error(L, "http.request: options are name = value");
        mp_slice *strs = &o->url;
        size_t i = 0;
        while (i < MP_ARRAY_LEN(names) && strcmp(k, names[i]) != 0)
            i++;
        if (i < MP_ARRAY_LEN(names)) {
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "http.request: %s must be a string, got %s", k, luaL_typename(L, -1));
            strs[i].p = lua_tolstring(L, -1, &strs[i].len);
        } else if (strcmp(k, "upstream") == 0) {
            o->has_upstream = 1;
        } else if (strcmp(k, "headers") == 0) {
            if (!lua_istable(L, -1))
                luaL_error(L, "http.request: headers must be a table, got %s", luaL_typename(L, -1));
            o->headers = 1;
        } else if (strcmp(k, "timeout") == 0) {
            o->timeout = opt_number(L, k);
        } else if (strcmp(k, "max_body") == 0) {
            o->max_body = opt_number(L, k);
        } else {
            luaL_error(L, "http.request: unknown option '%s'", k);
        }
        lua_pop(L, 1);
    }
}

/* core.start(opts): checks and formats the request, then yields until its
 * answer is in. Misuse raises, and then holds nothing: everything is
 * checked before the request is written into memory of its own. Failures
 * are the answer's (core.answer). */
static int l_start(lua_State *L)
{
    const char *why;
    mp_req_t *r = mp_hook_caller(L, &why);
    if (!r)
        return luaL_error(L, "http.request: %s", why);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    opts_t o = {.timeout = DEFAULT_TIMEOUT, .max_body = (double)DEFAULT_MAX_BODY};
    read_opts(L, &o);
    if (!o.url.p == !o.has_upstream)
        return luaL_error(L, "http.request: give either url or upstream");
    mp_addr_t addr = {0};
    char hp[300] = "";
    mp_slice host = {NULL, 0}, path = {NULL, 0};
    int upstream = -1, tls = 0, dns_port = 0, dns_len = 0;
    if (o.url.p)
        dns_len = parse_url(L, o.url.p, o.url.len, &addr, hp, &host, &path, &tls, &dns_port);
    else
        upstream = find_upstream(L, r);
    if (o.path.p)
        path = o.path;
    int query_only = path.len && path.p[0] == '?';
    if (!path.len)
        path = MP_SLICE_LIT("/");
    if (path.p[0] != '/' && !query_only)
        return luaL_error(L, "http.request: path must start with '/', got '%s'", path.p);
    if (!clean(path.p, path.len, 1) || (o.query.p && !clean(o.query.p, o.query.len, 1)))
        return luaL_error(L, "http.request: the path or query has a space or a control character");
    mp_slice method = o.method.p ? o.method : MP_SLICE_LIT("GET");
    if (!is_token(method.p, method.len))
        return luaL_error(L, "http.request: '%s' is not a method", method.p);
    int own_host = 0;
    size_t fields = 0;
    if (o.headers) {
        lua_getfield(L, 1, "headers");
        o.headers = lua_gettop(L);
        fields = header_lines(L, o.headers, NULL, &own_host);
    }
    if (!own_host && !host.p) {
        const mp_upstream_def_t *d = &r->gen->cfg->upstreams[upstream];
        const char *h = d->host ? d->host : d->servers[0].addr.text;
        host = (mp_slice){h, strlen(h)};
    }
    int is_post = MP_SLICE_IEQ(method, "POST") || MP_SLICE_IEQ(method, "PUT");
    char cl[48] = "";
    if (o.body.p || is_post)
        snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", o.body.len);

    /* everything is checked: from here on nothing raises but "out of memory" before any is held */
    size_t clen = strlen(cl);
    size_t total = method.len + 2 + path.len + (o.query.p ? 1 + o.query.len : 0) + 11 + fields +
                   (own_host ? 0 : 8 + host.len) + clen + 2 + o.body.len;
    call_t *c = calloc(1, sizeof(*c));
    if (!c || !(c->out = malloc(total)) || (o.url.p && !dns_len && !(c->addr.text = strdup(hp))) ||
        (tls && !(c->tls_name = tls_name(hp))) || (dns_len && !(c->dns_name = strndup(hp, (size_t)dns_len)))) {
        if (c) {
            free(c->out);
            free(c->addr.text);
            free(c->tls_name);
        }
        free(c);
        return luaL_error(L, "out of memory");
    }
    char *w = c->out;
#define PUT(p, n) (memcpy(w, (p), (n)), w += (n))
    PUT(method.p, method.len);
    PUT(query_only ? " /" : " ", query_only ? 2 : 1);
    PUT(path.p, path.len);
    if (o.query.p) {
        PUT(memchr(path.p, '?', path.len) ? "&" : "?", 1);
        PUT(o.query.p, o.query.len);
    }
    PUT(" HTTP/1.1\r\n", 11);
    if (fields)
        w += header_lines(L, o.headers, w, &own_host);
    if (!own_host) {
        PUT("Host: ", 6);
        PUT(host.p, host.len);
        PUT("\r\n", 2);
    }
    PUT(cl, clen);
    PUT("\r\n", 2);
    if (o.body.p)
        PUT(o.body.p, o.body.len);
#undef PUT
    MP_ASSERT((size_t)(w - c->out) <= total);
    c->out_len = (size_t)(w - c->out);
    if (o.url.p && !dns_len) {
        c->addr.ss = addr.ss;
        c->addr.sslen = addr.sslen;
    }
    c->port = dns_port;
    c->base.start = start;
    c->base.cancel = cancel;
    c->r = r;
    c->ctx = container_of(r->env, mp_io_ctx_t, env);
    c->upstream = upstream;
    c->server = -1;
    c->timeout = o.timeout;
    c->max_body = (size_t)o.max_body;
    c->is_head = MP_SLICE_IEQ(method, "HEAD");
    lua_settop(L, 1);
    return mp_hook_yield(L, r, &c->base);
}

/* core.answer(): { status, headers, body } or nil, err. */
static int l_answer(lua_State *L)
{
    call_t *c = container_of(mp_hook_answer(L), call_t, base);
    if (c->err[0]) {
        lua_pushnil(L);
        lua_pushstring(L, c->err);
        mp_hook_answered(L);
        return 2;
    }
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, c->status);
    lua_setfield(L, -2, "status");
    lua_createtable(L, 0, (int)c->nfields);
    char name[256];
    for (unsigned i = 0; i < c->nfields; i++) {
        const char *np = c->head + c->fields[i][0], *vp = c->head + c->fields[i][2];
        size_t n = c->fields[i][1] < sizeof(name) ? c->fields[i][1] : sizeof(name) - 1, vn = c->fields[i][3];
        for (size_t k = 0; k < n; k++)
            name[k] = (char)(np[k] >= 'A' && np[k] <= 'Z' ? np[k] + 32 : np[k]);
        lua_pushlstring(L, name, n);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) { /* the first: a string */
            lua_pop(L, 1);
            lua_pushlstring(L, vp, vn);
            lua_rawset(L, -3);
        } else if (lua_istable(L, -1)) { /* a third or later */
            lua_pushlstring(L, vp, vn);
            lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
            lua_pop(L, 2);
        } else { /* the second: a list of both */
            lua_createtable(L, 2, 0);
            lua_insert(L, -2);
            lua_rawseti(L, -2, 1);
            lua_pushlstring(L, vp, vn);
            lua_rawseti(L, -2, 2);
            lua_rawset(L, -3);
        }
    }
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, c->body.p ? c->body.p : "", c->body.len);
    lua_setfield(L, -2, "body");
    mp_hook_answered(L);
    return 1;
}

static const luaL_Reg funcs[] = {{"start", l_start}, {"answer", l_answer}, {NULL, NULL}};

static int open_callout(lua_State *L)
{
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}

void mp_l_http_preload(lua_State *L)
{
    mp_vm_preload(L, "moonproxy.callout", open_callout);
}
