/* req.c: the decisions taken on a request, once each, with no socket: its
 * id and client address, routing and the request hooks (mp_req_decide),
 * request framing and the keep-alive policy, what a refused head or an
 * error answers, response framing, the response-hook call, answers made
 * here, the hash key balancers use, and request-scoped log lines. The
 * server (conn.c, upstream.c, static.c) and the simulator (sim.c) call the
 * same functions, so what the simulator reports is what the server does. */
#include "req.h"

#include "balancer.h"
#include "gen.h"
#include "head.h"
#include "l_request.h"
#include "path.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* ---- the thread's env ---- */

uint64_t mp_req_rand(mp_req_env_t *e)
{
    /* xorshift128+: request IDs need to be unique, not secret. */
    uint64_t s1 = e->rng[0];
    const uint64_t s0 = e->rng[1];
    e->rng[0] = s0;
    s1 ^= s1 << 23;
    e->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return e->rng[1] + s0;
}

mp_slice mp_req_date(mp_req_env_t *e)
{
    double now = mp_req_now(e);
    if ((long)now != (long)e->date_at || !e->date_len) {
        time_t t = (time_t)now;
        struct tm tm;
        gmtime_r(&t, &tm);
        e->date_len = strftime(e->date, sizeof(e->date), "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        e->date_at = now;
    }
    return (mp_slice){e->date, e->date_len};
}

#define MIN_BLOCK_SIZE (32 * 1024)

size_t mp_req_block_size(size_t max_header_size, size_t body_buffer_size)
{
    size_t block = max_header_size + body_buffer_size;
    return block < MIN_BLOCK_SIZE ? MIN_BLOCK_SIZE : block;
}

void mp_req_env_limits(mp_req_env_t *e, size_t max_uri_size, size_t max_header_size)
{
    e->limits.max_uri_size = max_uri_size;
    /* the read buffer's size was fixed at start: a head must leave room in it */
    size_t room = e->bufs->block_size - 1024;
    e->limits.max_header_size = max_header_size < room ? max_header_size : room;
}

/* ---- log lines about a request ---- */

static int vlog(mp_log_limit_t *lim, const mp_req_env_t *e, const mp_req_t *r, int level, const char *fmt, va_list ap)
{
    char suffix[64] = "";
    /* a dropped line is not even formatted: below the level (as mp_log_debug
     * and mp_log_info), or rate-limited (the check comes first) */
    if (lim ? !mp_log_limit_claim(lim, level, suffix, sizeof(suffix)) : !MP_LOG_WANTED(level))
        return 0;
    char msg[1024];
    size_t n = e->id >= 0 ? (size_t)snprintf(msg, sizeof(msg), "w%d: ", e->id) : 0;
    int k = vsnprintf(msg + n, sizeof(msg) - n, fmt, ap);
    if (k > 0)
        n = n + (size_t)k < sizeof(msg) ? n + (size_t)k : sizeof(msg) - 1;
    if (r && n < sizeof(msg) - 1)
        snprintf(msg + n, sizeof(msg) - n, " (request %.*s)", r->id_len, r->id);
    mp_log(level, "%s%s", msg, suffix);
    return 1;
}

void mp_req_logf(const mp_req_t *r, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(NULL, r->env, r, level, fmt, ap);
    va_end(ap);
}

void mp_env_logf(const mp_req_env_t *e, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(NULL, e, NULL, level, fmt, ap);
    va_end(ap);
}

int mp_req_log_limited(mp_log_limit_t *lim, const mp_req_t *r, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vlog(lim, r->env, r, level, fmt, ap);
    va_end(ap);
    return rc;
}

int mp_env_log_limited(mp_log_limit_t *lim, const mp_req_env_t *e, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vlog(lim, e, NULL, level, fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- a request's start ---- */

int mp_req_parse_failed(mp_req_t *r, int rc)
{
    if (rc == MP_EAGAIN) /* the buffer is full: the limits are below the block size; keep it an invariant */
        r->h.status = 431;
    mp_env_log(r->env, MP_LOG_DEBUG, "bad request from client: %s", r->h.error ? r->h.error : "?");
    r->keepalive = 0;
    r->body.done = 1;
    return r->h.status ? r->h.status : 400;
}

void mp_req_keepalive_after(mp_req_t *r, int status)
{
    if (!r->body.done || status == 408 || status == 400)
        r->keepalive = 0;
}

/* ---- the response ---- */

int mp_req_run_on_log(mp_req_t *r)
{
    return mp_hook_log(r->gen->L, r, r->gen->cfg->log_ref) == MP_HOOK_WAIT;
}

int mp_req_upgrade_answer(mp_req_t *r, const mp_http_response_t *rh)
{
    if (!r->upgrade)
        return rh->status == 101 ? -1 : 0;
    r->keepalive = 0;
    if (rh->status != 101)
        return 0;
    int i = mp_http1_find(rh->headers, rh->nheaders, "upgrade", 7);
    mp_slice tok;
    size_t pos = 0;
    while (i >= 0 && mp_http1_next_token(rh->headers[i].value, &pos, &tok))
        if (MP_SLICE_IEQ(tok, "websocket")) {
            memset(&r->resp, 0, sizeof(r->resp));
            r->resp.kind = MP_BODY_NONE;
            r->resp.done = 1;
            r->rechunk = 0; /* no body: what follows the head is the tunnel's */
            r->tunnel_open = 1;
            return 1;
        }
    return -1;
}

const char *mp_tunnel_close_name(int close)
{
    static const char *const names[MP_TC_REASONS] = {"client", "upstream", "idle", "shutdown", "error"};
    return close >= 0 && close < MP_TC_REASONS ? names[close] : "?";
}

int mp_req_unavailable(mp_req_t *r, const mp_balancer_t *b)
{
    r->retry_after = (uint16_t)mp_balancer_retry_after(b, mp_health_now());
    return 503;
}

/* ---- id, client address, routing ---- */

static int id_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' ||
           ch == ':' || ch == '-';
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
    /* a byte at a time, low nibble first: the digits of x from its least
     * significant end, two per table lookup (the id is on every request) */
    static const char hex2[256][2] = {
#define HEX(d) (char)((d) < 10 ? '0' + (d) : 'a' + (d)-10)
#define H1(lo, hi) {HEX(lo), HEX(hi)}
#define H16(hi)                                                                                                        \
    H1(0, hi), H1(1, hi), H1(2, hi), H1(3, hi), H1(4, hi), H1(5, hi), H1(6, hi), H1(7, hi), H1(8, hi), H1(9, hi),      \
        H1(10, hi), H1(11, hi), H1(12, hi), H1(13, hi), H1(14, hi), H1(15, hi)
        H16(0), H16(1), H16(2),  H16(3),  H16(4),  H16(5),  H16(6),  H16(7),
        H16(8), H16(9), H16(10), H16(11), H16(12), H16(13), H16(14), H16(15),
#undef H16
#undef H1
#undef HEX
    };
    for (int half = 0; half < 2; half++) {
        uint64_t x = mp_req_rand(r->env);
        for (int k = 0; k < 8; k++, x >>= 8)
            memcpy(r->id + half * 16 + 2 * k, hex2[x & 255], 2);
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

/* The peer's address as text (an IPv4-mapped one as a dotted quad), and
 * whether it is one of trusted_proxies. */
static void describe_peer(mp_req_t *r)
{
    const struct sockaddr *p = r->client_addr;
    const struct in6_addr *a6 = &((const struct sockaddr_in6 *)p)->sin6_addr;
    const uint8_t *v4 = p->sa_family == AF_INET    ? (const uint8_t *)&((const struct sockaddr_in *)p)->sin_addr
                        : IN6_IS_ADDR_V4MAPPED(a6) ? &a6->s6_addr[12]
                                                   : NULL;
    if (v4)
        format_ipv4(v4, r->client_ip);
    else
        inet_ntop(AF_INET6, a6, r->client_ip, sizeof(r->client_ip));
    const mp_settings_t *s = &r->gen->cfg->settings;
    for (size_t i = 0; i < s->ntrusted; i++)
        if (mp_cidr_match(&s->trusted[i], p)) {
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

/* ---- upgrades (SPEC "WebSocket and other upgrades") ---- */

/* Whether a field `name` (lowercase, n bytes) of h lists token (any case). */
static int lists_token(const mp_http_request_t *h, const char *name, size_t n, const char *token)
{
    size_t tlen = strlen(token);
    for (unsigned i = 0; i < h->nheaders; i++) {
        if (!mp_slice_caseeq(h->headers[i].name, (mp_slice){name, n}))
            continue;
        mp_slice t;
        size_t pos = 0;
        while (mp_http1_next_token(h->headers[i].value, &pos, &t))
            if (t.len == tlen && strncasecmp(t.p, token, tlen) == 0)
                return 1;
    }
    return 0;
}

/* The client asks for a WebSocket: Connection lists upgrade, Upgrade lists websocket. */
static int asks_websocket(const mp_http_request_t *h)
{
    return h->upgrade && lists_token(h, "connection", 10, "upgrade") && lists_token(h, "upgrade", 7, "websocket");
}

/* A request going upstream: a WebSocket handshake is forwarded as one
 * (r->upgrade) when it is a GET over HTTP/1.1 and the route allows it;
 * any other Upgrade (h2c, ...) is dropped with the hop-by-hop fields. */
static void upgrade_gate(mp_req_t *r)
{
    const mp_http_request_t *h = &r->h;
    if (MP_LIKELY(!h->upgrade))
        return;
    if (!asks_websocket(h))
        r->upgrade_why = "Upgrade names no websocket (with Connection: upgrade): dropped";
    else if (!(h->method.len == 3 && memcmp(h->method.p, "GET", 3) == 0))
        r->upgrade_why = "a WebSocket handshake must be a GET: Upgrade dropped";
    else if (h->minor == 0)
        r->upgrade_why = "HTTP/1.0 has no upgrade: Upgrade dropped";
    else if (r->match.route && r->gen->cfg->no_upgrade[mp_route_slot(r->match.route)])
        r->upgrade_why = "the route has upgrade = false: Upgrade dropped";
    else
        r->upgrade = 1;
}

/* What a route's target makes of a request its hooks let through. */
static int route_outcome(mp_req_t *r, int go)
{
    if (go == MP_DECIDE_UPSTREAM)
        upgrade_gate(r);
    return go == MP_DECIDE_STATIC && is_asterisk(r->path) ? answer_options(r) : go;
}

static int route_hooked(mp_req_t *r, int rc);

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
    int go = cfg->statics[mp_route_slot(route)].root ? MP_DECIDE_STATIC : MP_DECIDE_UPSTREAM;
    const mp_route_hooks_t *hooks = &cfg->route_hooks[mp_route_slot(route)];
    if (hooks->request == LUA_NOREF)
        return route_outcome(r, go);
    int rc = mp_hook_route(r->gen->L, r, hooks);
    return rc == MP_HOOK_WAIT ? MP_DECIDE_WAIT : route_hooked(r, rc);
}

/* The route's request chain ended with rc. */
static int route_hooked(mp_req_t *r, int rc)
{
    const mp_config_t *cfg = r->gen->cfg;
    const mp_route_t *route = r->match.route;
    int go = cfg->statics[mp_route_slot(route)].root ? MP_DECIDE_STATIC : MP_DECIDE_UPSTREAM;
    if (rc != MP_HOOK_NEXT)
        return hook_outcome(rc);
    if (cfg->route_hooks[mp_route_slot(route)].handler) {
        int up = r->handler_up;
        if (up < 0 || (size_t)up >= cfg->nupstreams) {
            mp_req_log(r, MP_LOG_ERROR, "route '%s' (%s): the handler neither responded nor returned an upstream",
                       route->name, route->src);
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
    mp_req_log(r, MP_LOG_DEBUG, "bad request target from client: %s", why);
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

/* ---- traces (W3C Trace Context) ---- */

/* The 8 nibbles of x as 8 lowercase hex digits, one per byte (in an order
 * of their own: the ids made of them are random bits anyway). */
static inline uint64_t hex8(uint32_t x)
{
    uint64_t v = x;
    v = (v | (v << 16)) & 0x0000FFFF0000FFFFull;
    v = (v | (v << 8)) & 0x00FF00FF00FF00FFull;
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0Full;
    uint64_t letters = ((v + 0x0606060606060606ull) >> 4) & 0x0101010101010101ull; /* the nibbles >= 10 */
    return v + 0x3030303030303030ull + letters * ('a' - '0' - 10);
}

/* n (a multiple of 8) random bytes of r's generator as lowercase hex into
 * out (2n + 1). */
static void rand_hex(mp_req_t *r, char *out, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t x = mp_req_rand(r->env), lo = hex8((uint32_t)x), hi = hex8((uint32_t)(x >> 32));
        memcpy(out + 2 * i, &lo, 8);
        memcpy(out + 2 * i + 8, &hi, 8);
    }
    out[2 * n] = '\0';
}

static int lower_hex(const char *p, size_t n, int nonzero)
{
    int any = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
        any |= c != '0';
    }
    return !nonzero || any;
}

/* Whether v is a traceparent to continue: version-traceid-parentid-flags,
 * lowercase hex, ids not all zero, version not ff; a later version may add
 * fields after a '-' (W3C Trace Context §3.2). */
static int traceparent_ok(mp_slice v)
{
    const char *p = v.p;
    if (v.len < 55 || p[2] != '-' || p[35] != '-' || p[52] != '-' || !lower_hex(p, 2, 0) ||
        (p[0] == 'f' && p[1] == 'f') || !lower_hex(p + 3, 32, 1) || !lower_hex(p + 36, 16, 1) ||
        !lower_hex(p + 53, 2, 0))
        return 0;
    if (p[0] == '0' && p[1] == '0')
        return v.len == 55;
    return v.len == 55 || p[55] == '-';
}

/* Whether the peer may continue a trace: tracing.trust, else trusted_proxies. */
static int trace_trusted(const mp_req_t *r)
{
    const mp_settings_t *s = &r->gen->cfg->settings;
    if (!s->trace_trusted)
        return r->trusted_peer;
    for (size_t i = 0; i < s->ntrace_trusted; i++)
        if (mp_cidr_match(&s->trace_trusted[i], r->client_addr))
            return 1;
    return 0;
}

/* The request's trace: a trusted client's valid traceparent is continued
 * (its trace id and sampled flag), any other starts a trace, sampled at
 * tracing.sample; the proxy's span is new either way. */
static void assign_trace(mp_req_t *r)
{
    int i = mp_http1_find(r->h.headers, r->h.nheaders, "traceparent", 11);
    mp_slice v = i >= 0 ? r->h.headers[i].value : (mp_slice){NULL, 0};
    if (i >= 0 && mp_http1_find(r->h.headers + i + 1, r->h.nheaders - (unsigned)i - 1, "traceparent", 11) < 0 &&
        traceparent_ok(v) && trace_trusted(r)) {
        memcpy(r->trace_id, v.p + 3, 32);
        r->trace_id[32] = '\0';
        int sampled = (v.p[54] >= 'a' ? v.p[54] - 'a' + 10 : v.p[54] - '0') & 1;
        memcpy(r->trace_flags, sampled ? "01" : "00", 3);
        r->trace_continued = 1;
    } else {
        rand_hex(r, r->trace_id, 16);
        double u = (double)(mp_req_rand(r->env) >> 11) / 9007199254740992.0; /* [0, 1) */
        memcpy(r->trace_flags, u < r->gen->cfg->settings.trace_sample ? "01" : "00", 3);
    }
    rand_hex(r, r->span_id, 8);
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
    assign_trace(r);
    int bad = normalize_target(r);
    if (bad)
        return bad;
    r->client_path = r->path;
    if (cfg->settings.max_body_size && h->content_length > 0 &&
        (uint64_t)h->content_length > cfg->settings.max_body_size)
        return 413;
    if (MP_UNLIKELY(h->upgrade) && (h->content_length > 0 || h->chunked) && asks_websocket(h)) {
        /* which bytes would be the body and which the tunnel's? (RFC 9110 §7.8) */
        mp_req_log(r, MP_LOG_DEBUG, "bad request from client: a body on a WebSocket upgrade");
        h->error = "a body on a WebSocket upgrade";
        r->upgrade_why = "a body on a WebSocket upgrade: 400";
        return 400;
    }
    if (cfg->pre_ref != LUA_NOREF) {
        int rc = mp_hook_pre(r->gen->L, r, cfg->pre_ref);
        if (rc == MP_HOOK_WAIT)
            return MP_DECIDE_WAIT;
        if (rc != MP_HOOK_NEXT)
            return hook_outcome(rc);
    }
    return route_request(r);
}

int mp_req_decide_resume(mp_req_t *r, int kind, int rc)
{
    if (kind == MP_HK_ROUTE)
        return route_hooked(r, rc);
    MP_ASSERT(kind == MP_HK_PRE);
    if (rc != MP_HOOK_NEXT)
        return hook_outcome(rc);
    return route_request(r);
}

/* ---- the balancer's view ---- */

/* The chash key of r per hash_key; returns 0 when the request has none. */
static int hash_of(mp_req_t *r, const mp_upstream_def_t *d, uint64_t *hash)
{
    const char *k = d->hash_key;
    const mp_http_request_t *h = &r->h;
    if (d->hash_key_ref != LUA_NOREF) {
        lua_State *L = r->gen->L;
        if (mp_hook_hash_key(L, r, d->hash_key_ref) != MP_HOOK_NEXT)
            return MP_PICK_ERROR;
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (s)
            *hash = mp_hash64(s, n);
        lua_pop(L, 1);
        return s != NULL;
    }
    if (!k)
        return 0;
    if (strcmp(k, "ip") == 0) {
        mp_slice a = mp_req_remote_addr(r);
        *hash = mp_hash64(a.p, a.len);
        return 1;
    }
    if (strncmp(k, "header:", 7) == 0) {
        /* repeated fields count as their values joined by ", " (RFC 9110 §5.3),
         * as the Lua module does */
        char joined[4096];
        size_t len = 0, nlen = strlen(k + 7);
        int found = 0;
        for (unsigned i = 0; i < h->nheaders; i++) {
            if (!mp_slice_ieq(h->headers[i].name, k + 7, nlen))
                continue;
            mp_slice v = h->headers[i].value;
            if (found++ && len + 2 <= sizeof(joined))
                memcpy(joined + len, ", ", 2), len += 2;
            size_t take = v.len < sizeof(joined) - len ? v.len : sizeof(joined) - len;
            memcpy(joined + len, v.p, take);
            len += take;
        }
        if (found)
            *hash = mp_hash64(joined, len);
        return found > 0;
    }
    /* cookie:NAME: the first NAME=value pair of the Cookie fields */
    size_t nlen = strlen(k + 7);
    for (unsigned i = 0; i < h->nheaders; i++) {
        if (!MP_SLICE_IEQ(h->headers[i].name, "cookie"))
            continue;
        mp_slice v = h->headers[i].value;
        for (size_t at = 0; at < v.len;) {
            while (at < v.len && (v.p[at] == ' ' || v.p[at] == ';'))
                at++;
            size_t end = at;
            while (end < v.len && v.p[end] != ';')
                end++;
            if (end - at > nlen && memcmp(v.p + at, k + 7, nlen) == 0 && v.p[at + nlen] == '=') {
                *hash = mp_hash64(v.p + at + nlen + 1, end - at - nlen - 1);
                return 1;
            }
            at = end;
        }
    }
    return 0;
}

int mp_req_hash_key(mp_req_t *r, const mp_upstream_def_t *d, uint64_t *out)
{
    int has = hash_of(r, d, out);
    if (has < 0)
        return has;
    if (!has) { /* no key: the client's address, as the Lua module does */
        mp_slice a = mp_req_remote_addr(r);
        *out = mp_hash64(a.p, a.len);
    }
    return 0;
}

static int pick_hash(void *arg, const mp_upstream_def_t *d, uint64_t *out)
{
    return mp_req_hash_key(arg, d, out);
}

static int pick_lua(lua_State *L, void *arg, int ref, const mp_pick_server_t *s, int n, int navailable)
{
    return mp_hook_pick(L, arg, ref, s, n, navailable);
}

const mp_pick_ctx_t mp_req_pick = {pick_hash, pick_lua};

/* ---- answers made here ---- */

int mp_req_run_response_hooks(mp_req_t *r, int ref, int status, const mp_http_response_t *rh)
{
    r->status = status;
    int rc = mp_hook_response(r->gen->L, r, ref, rh);
    return rc == MP_HOOK_WAIT ? MP_RESP_WAIT : mp_req_response_resume(r, rc);
}

int mp_req_response_resume(mp_req_t *r, int rc)
{
    if (rc != MP_HOOK_NEXT)
        return 0;
    return r->resp_status ? r->resp_status : r->status;
}

static void error_body(int status, mp_local_t *out)
{
    int n = snprintf(out->text, sizeof(out->text), "%d %s\n", status, mp_http1_reason(status));
    out->body = (mp_slice){out->text, (size_t)n};
}

/* The head and body of a response made here once its response hooks
 * ended (shown: what they left, 0 when they failed). */
static int local_finish(mp_req_t *r, int status, int shown, mp_buf_t *b, mp_local_t *out)
{
    const mp_hedit_t *edits;
    if (status == 0 && shown) {
        /* what req:respond gave, as the response hooks left it */
        out->body = (mp_slice){r->local_body, r->local_body_len};
        edits = r->resp_edits;
    } else if (status == 0) { /* a response hook failed on it */
        shown = 500;
        r->resp_edits = NULL;
        error_body(500, out);
        edits = NULL;
    } else {
        error_body(status, out);
        if (!shown) {
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

int mp_local_response(mp_req_t *r, int status, mp_buf_t *b, mp_local_t *out)
{
    int shown;
    r->local_asked = (uint16_t)status;
    if (status == 0) {
        shown = mp_req_response_hooks(r, r->local_status, NULL);
    } else {
        /* Response hooks see the proxy's own errors too, once the head was
         * valid (and not when a hook is what failed). */
        r->resp_edits = NULL;
        shown = r->path.p && !r->hook_failed ? mp_req_response_hooks(r, status, NULL) : status;
    }
    if (shown == MP_RESP_WAIT)
        return MP_LOCAL_WAIT;
    return local_finish(r, status, shown, b, out);
}

int mp_local_response_resume(mp_req_t *r, int rc, mp_buf_t *b, mp_local_t *out)
{
    return local_finish(r, r->local_asked, mp_req_response_resume(r, rc), b, out);
}

/* ---- response compression ---- */

const char *mp_req_encoding_name(int enc)
{
    static const char *const names[] = {NULL, "gzip", "br", "zstd"};
    return enc > 0 && enc <= MP_ENC_ZSTD ? names[enc] : NULL;
}

/* The i-th field line named name (lowercase) of the response as the hooks
 * left it: an edit replaces every line of its name. Returns 0 past the last. */
static int resp_field(const mp_req_t *r, const mp_http_response_t *rh, mp_slice name, unsigned i, mp_slice *out)
{
    const mp_hedit_t *e = r->resp_edits ? mp_hedit_find(r->resp_edits, name) : NULL;
    if (e) {
        if (i >= e->nvalues)
            return 0;
        *out = e->values[i];
        return 1;
    }
    for (unsigned k = 0; k < rh->nheaders; k++)
        if (mp_slice_ieq(rh->headers[k].name, name.p, name.len) && i-- == 0) {
            *out = rh->headers[k].value;
            return 1;
        }
    return 0;
}

/* The next element of a comma-separated list from *p (up to end), trimmed;
 * 0 when none is left. */
static int next_elem(const char **p, const char *end, mp_slice *out)
{
    while (*p < end && (**p == ',' || **p == ' ' || **p == '\t'))
        (*p)++;
    if (*p >= end)
        return 0;
    const char *b = *p;
    while (*p < end && **p != ',')
        (*p)++;
    const char *e = *p;
    while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    *out = (mp_slice){b, (size_t)(e - b)};
    return 1;
}

/* An element's q-value in thousandths (RFC 9110 §12.4.2): 1000 without one. */
static int qvalue(mp_slice params)
{
    const char *p = params.p, *end = params.p + params.len;
    while ((p = memchr(p, ';', (size_t)(end - p))) != NULL) {
        p++;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (end - p >= 2 && (*p == 'q' || *p == 'Q') && p[1] == '=') {
            p += 2;
            if (p < end && *p == '1')
                return 1000;
            int q = 0, scale = 100;
            if (p < end && *p == '0' && ++p < end && *p == '.')
                for (p++; p < end && *p >= '0' && *p <= '9' && scale; p++, scale /= 10)
                    q += (*p - '0') * scale;
            return q;
        }
    }
    return 1000;
}

/* The client's weight for coding name (lowercase) in its Accept-Encoding
 * values: its own element's q, else "*"'s, else 0. */
static int accepted(const mp_req_t *r, const char *name)
{
    int q = -1, star = -1;
    size_t n = strlen(name);
    for (unsigned i = 0; i < r->h.nheaders; i++) {
        if (!MP_SLICE_IEQ(r->h.headers[i].name, "accept-encoding"))
            continue;
        const char *p = r->h.headers[i].value.p, *end = p + r->h.headers[i].value.len;
        mp_slice el;
        while (next_elem(&p, end, &el)) {
            const char *semi = memchr(el.p, ';', el.len);
            mp_slice tok = {el.p, semi ? (size_t)(semi - el.p) : el.len};
            while (tok.len && (tok.p[tok.len - 1] == ' ' || tok.p[tok.len - 1] == '\t'))
                tok.len--;
            int v = qvalue(el);
            if (mp_slice_ieq(tok, name, n) || (n == 4 && MP_SLICE_IEQ(tok, "x-gzip")))
                q = v > q ? v : q;
            else if (MP_SLICE_IEQ(tok, "*"))
                star = v;
        }
    }
    return q >= 0 ? q : star > 0 ? star : 0;
}

/* Whether the Content-Type value v (parameters ignored) is one of types
 * (a type ending in "/" and "*" matches any subtype). */
static int type_listed(const mp_compress_def_t *c, mp_slice v)
{
    const char *semi = memchr(v.p, ';', v.len);
    mp_slice t = {v.p, semi ? (size_t)(semi - v.p) : v.len};
    while (t.len && (t.p[t.len - 1] == ' ' || t.p[t.len - 1] == '\t'))
        t.len--;
    for (size_t i = 0; i < c->ntypes; i++) {
        size_t n = strlen(c->types[i]);
        if (n >= 2 && c->types[i][n - 1] == '*' && t.len > n - 1 &&
            mp_slice_ieq((mp_slice){t.p, n - 1}, c->types[i], n - 1))
            return 1;
        if (mp_slice_ieq(t, c->types[i], n))
            return 1;
    }
    return 0;
}

/* Why the response is not compressed, or NULL when nothing rules it out. */
static const char *compress_refusal(mp_req_t *r, const mp_http_response_t *rh, const mp_compress_def_t *c)
{
    mp_slice v;
    if (r->is_head)
        return "a HEAD request";
    if (r->status == 204 || r->status == 304 || r->status == 206 || r->status < 200)
        return r->status == 206 ? "a 206 (partial content)" : "a response without a body";
    if (r->tunnel_open || r->resp.kind == MP_BODY_NONE)
        return "a response without a body";
    if (resp_field(r, rh, MP_SLICE_LIT("content-encoding"), 0, &v))
        return "the response already has a Content-Encoding";
    for (unsigned i = 0; resp_field(r, rh, MP_SLICE_LIT("cache-control"), i, &v); i++) {
        const char *p = v.p, *end = p + v.len;
        mp_slice el;
        while (next_elem(&p, end, &el))
            if (MP_SLICE_IEQ(el, "no-transform"))
                return "Cache-Control: no-transform";
    }
    if (!rh->chunked && rh->content_length >= 0 && (uint64_t)rh->content_length < c->min_length)
        return "Content-Length under min_length";
    if (!resp_field(r, rh, MP_SLICE_LIT("content-type"), 0, &v) || !type_listed(c, v))
        return "its Content-Type is not in types";
    return NULL;
}

int mp_req_compress(mp_req_t *r, const mp_http_response_t *rh)
{
    r->enc = 0;
    r->enc_why = NULL;
    if (!r->match.route)
        return 0;
    const mp_compress_def_t *c = &r->gen->cfg->compress[mp_route_slot(r->match.route)];
    if (!c->on)
        return 0;
    if ((r->enc_why = compress_refusal(r, rh, c)) != NULL)
        return 0;
    int best = 0, best_q = 0;
    for (unsigned i = 0; i < c->nalgs; i++) {
        int q = accepted(r, mp_req_encoding_name(c->algs[i]));
        if (q > best_q)
            best = c->algs[i], best_q = q;
    }
    if (!best) {
        r->enc_why = "the client accepts none of algorithms";
        return 0;
    }
    r->enc = (uint8_t)best;
    /* the encoder takes the body without the upstream's framing; the client
     * gets it chunked (HTTP/1.1) or until close (HTTP/1.0) */
    r->dechunk = r->resp.kind == MP_BODY_CHUNKED;
    r->rechunk = r->h.minor == 1;
    if (r->h.minor == 0)
        r->keepalive = 0;
    return best;
}
