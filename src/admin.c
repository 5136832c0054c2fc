/* admin.c: the admin HTTP endpoints on the main thread's loop. Requests are
 * small and rare: one per connection, answered with Connection: close. With
 * admin TLS (the current configuration's, so a reload applies to the next
 * connections) each connection is a TLS session over io.h's transport. */
#include "admin.h"

#include "health.h"
#include "http1.h"
#include "io.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "router.h"
#include "status.h"
#include "strbuf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define ADMIN_TIMEOUT 10.0
#define ADMIN_HEAD_MAX 8192
#define ADMIN_HOSTS 5 /* names a Host field may give the admin port (see own_hosts) */
#define ADMIN_HOST_MAX 64

typedef struct admin_conn admin_conn_t;

struct mp_admin {
    struct ev_loop *loop;
    int fd;
    ev_io io;
    mp_reloader_t *rl;
    const int *ready;
    const int *stuck;
    admin_conn_t *conns;
    mp_status_t *status;                     /* GET / and /status: the status page and its history */
    char hosts[ADMIN_HOSTS][ADMIN_HOST_MAX]; /* lowercase; "" unused */
};

struct admin_conn {
    mp_admin_t *a;
    mp_io_t sock; /* fd -1 once closed */
    ev_io io;
    ev_timer timer;
    char in[ADMIN_HEAD_MAX];
    size_t len, scanned;
    char *out; /* the whole response, malloc'd */
    size_t out_len, out_off;
    int waiting; /* for a reload to finish; the connection lives until then */
    admin_conn_t *next;
};

/* A JSON string (quoted), or null for NULL. */
static void sb_str(mp_strbuf_t *b, const char *s)
{
    if (!s) {
        mp_strbuf_printf(b, "null");
        return;
    }
    size_t n = strlen(s);
    if (mp_strbuf_reserve(b, n * 6 + 2) != 0)
        return;
    b->p[b->len++] = '"';
    b->len = mp_json_escape(b->p, b->len, b->cap, (mp_slice){s, n});
    b->p[b->len++] = '"';
    b->p[b->len] = '\0';
}

static void close_conn(admin_conn_t *c)
{
    mp_admin_t *a = c->a;
    ev_io_stop(a->loop, &c->io);
    ev_timer_stop(a->loop, &c->timer);
    if (c->sock.fd >= 0)
        mp_io_close(&c->sock); /* over TLS: close_notify first */
    if (c->waiting)
        return; /* freed when the reload calls back */
    for (admin_conn_t **p = &a->conns; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    free(c->out);
    free(c);
}

/* Waits until the connection can go on in direction want (EV_READ or
 * EV_WRITE): over TLS that may be the other readiness (io.h). */
static void wait_for(admin_conn_t *c, int want)
{
    mp_io_wait_for(c->a->loop, &c->io, &c->sock, want);
}

static void flush(admin_conn_t *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = mp_io_write(&c->sock, c->out + c->out_off, c->out_len - c->out_off);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return wait_for(c, EV_WRITE);
        break;
    }
    close_conn(c);
}

/* The response, with extra header lines (each ending in CRLF, or ""). */
static void respond_with(admin_conn_t *c, int status, const char *extra, const char *type, const char *body, size_t len)
{
    size_t cap = len + strlen(extra) + 256;
    c->out = malloc(cap);
    if (!c->out)
        return close_conn(c);
    int n = snprintf(c->out, cap,
                     "HTTP/1.1 %d %s\r\n%sContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", status,
                     mp_http1_reason(status), extra, type, len);
    memcpy(c->out + n, body, len);
    c->out_len = (size_t)n + len;
    flush(c);
}

static void respond(admin_conn_t *c, int status, const char *type, const char *body, size_t len)
{
    respond_with(c, status, "", type, body, len);
}

static void respond_json(admin_conn_t *c, int status, mp_strbuf_t *b)
{
    if (b->oom) {
        mp_strbuf_free(b);
        return respond(c, 500, "text/plain", "out of memory\n", 14);
    }
    respond(c, status, "application/json", b->p, b->len);
    mp_strbuf_free(b);
}

static void configz_routes(mp_strbuf_t *b, const mp_config_t *cfg)
{
    mp_strbuf_printf(b, "[");
    for (size_t i = 0; i < mp_router_count(cfg->router); i++) {
        const mp_route_t *r = mp_router_get(cfg->router, i);
        mp_strbuf_printf(b, "%s{\"index\":%d,\"name\":", i ? "," : "", r->index);
        sb_str(b, r->name);
        mp_strbuf_printf(b, ",\"host\":");
        sb_str(b, r->host);
        mp_strbuf_printf(b, ",\"path\":");
        sb_str(b, r->path);
        mp_strbuf_printf(b, ",\"prefix\":");
        sb_str(b, r->prefix);
        mp_strbuf_printf(b, ",\"regex\":");
        sb_str(b, r->regex);
        mp_strbuf_printf(b, ",\"upstream\":");
        sb_str(b, r->target >= 0 ? cfg->upstreams[r->target].name : NULL);
        mp_strbuf_printf(b, ",\"handler\":%s,\"src\":", cfg->route_hooks[i].handler ? "true" : "false");
        sb_str(b, r->src);
        mp_strbuf_printf(b, "}");
    }
    mp_strbuf_printf(b, "]");
}

/* One upstream's key and the opening of its object, with its balancer:
 * ,"name":{"balancer":"..." (no comma before the first). */
static void upstream_open(mp_strbuf_t *b, size_t i, const mp_upstream_def_t *u)
{
    mp_strbuf_printf(b, "%s", i ? "," : "");
    sb_str(b, u->name);
    mp_strbuf_printf(b, ":{\"balancer\":");
    sb_str(b, u->balancer);
}

static void configz(admin_conn_t *c)
{
    const mp_reloader_t *rl = c->a->rl;
    const mp_config_t *cfg = mp_reloader_config(rl);
    mp_strbuf_t b = {0};
    mp_strbuf_printf(&b, "{\"generation\":%llu,\"loaded_at\":%.3f,\"source\":",
                     (unsigned long long)mp_reloader_generation(rl), mp_reloader_loaded_at(rl));
    sb_str(&b, cfg->path);
    mp_strbuf_printf(&b, ",\"routes\":");
    configz_routes(&b, cfg);
    mp_strbuf_printf(&b, ",\"upstreams\":{");
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const mp_upstream_def_t *u = &cfg->upstreams[i];
        upstream_open(&b, i, u);
        mp_strbuf_printf(&b, ",\"keepalive\":%d,\"retries\":%d,\"servers\":[", u->keepalive, u->retries);
        for (size_t s = 0; s < u->nservers; s++) {
            mp_strbuf_printf(&b, "%s{\"addr\":", s ? "," : "");
            sb_str(&b, u->servers[s].addr.text);
            mp_strbuf_printf(&b, ",\"name\":");
            sb_str(&b, u->servers[s].name);
            mp_strbuf_printf(&b, ",\"weight\":%d}", u->servers[s].weight);
        }
        mp_strbuf_printf(&b, "]}");
    }
    mp_strbuf_printf(&b, "}}\n");
    respond_json(c, 200, &b);
}

static void json_error(admin_conn_t *c, int status, const char *msg)
{
    mp_strbuf_t b = {0};
    mp_strbuf_printf(&b, "{\"error\":");
    sb_str(&b, msg);
    mp_strbuf_printf(&b, "}\n");
    respond_json(c, status, &b);
}

static int hexval(char ch)
{
    return ch >= '0' && ch <= '9' ? ch - '0' : (ch | 32) >= 'a' && (ch | 32) <= 'f' ? (ch | 32) - 'a' + 10 : -1;
}

/* Percent-decodes s into out (NUL-terminated); -1 when malformed or too long. */
static int url_decode(mp_slice s, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < s.len; i++) {
        char ch = s.p[i];
        if (ch == '%') {
            int hi = i + 2 < s.len ? hexval(s.p[i + 1]) : -1, lo = hi >= 0 ? hexval(s.p[i + 2]) : -1;
            if (lo < 0)
                return -1;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (ch == '\0' || o + 1 >= cap)
            return -1;
        out[o++] = ch;
    }
    out[o] = '\0';
    return 0;
}

static void skip_ws(const char **q, const char *end)
{
    while (*q < end && (**q == ' ' || **q == '\t' || **q == '\r' || **q == '\n'))
        (*q)++;
}

static int literal(const char **q, const char *end, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(end - *q) < n || memcmp(*q, word, n) != 0)
        return 0;
    *q += n;
    return 1;
}

/* The body of POST /upstreams/NAME/servers/ADDR: a JSON object of drain,
 * down (booleans), weight (an integer 1..MP_CTL_WEIGHT_MAX) and reset
 * (true). 0, or -1 with why set. */
static int parse_control(mp_slice body, mp_peer_ctl_t *c, const char **why)
{
    const char *q = body.p, *end = body.p + body.len;
    *c = MP_PEER_CTL_NONE;
    int fields = 0;
    *why = "expected a JSON object: {\"drain\": true}, {\"down\": true}, {\"weight\": N} or {\"reset\": true}";
    skip_ws(&q, end);
    if (!literal(&q, end, "{"))
        return -1;
    skip_ws(&q, end);
    if (literal(&q, end, "}"))
        return -1;
    for (;;) {
        skip_ws(&q, end);
        const char *k = q;
        if (!literal(&q, end, "\""))
            return -1;
        while (q < end && *q != '"' && *q != '\\')
            q++;
        if (q >= end || *q != '"')
            return -1;
        mp_slice key = {k + 1, (size_t)(q - k - 1)};
        q++;
        skip_ws(&q, end);
        if (!literal(&q, end, ":"))
            return -1;
        skip_ws(&q, end);
        int *flag = MP_SLICE_IEQ(key, "drain") ? &c->drain : MP_SLICE_IEQ(key, "down") ? &c->down : NULL;
        if (flag) {
            if (literal(&q, end, "true"))
                *flag = 1;
            else if (literal(&q, end, "false"))
                *flag = 0;
            else
                return *why = "drain and down are true or false", -1;
        } else if (MP_SLICE_IEQ(key, "reset")) {
            if (!literal(&q, end, "true"))
                return *why = "reset is true", -1;
            c->reset = 1;
        } else if (MP_SLICE_IEQ(key, "weight")) {
            long w = 0;
            int digits = 0;
            while (q < end && *q >= '0' && *q <= '9' && digits < 8)
                w = w * 10 + (*q++ - '0'), digits++;
            if (digits == 0 || (q < end && (*q == '.' || *q == 'e' || *q == 'E' || (*q >= '0' && *q <= '9'))) ||
                w < 1 || w > MP_CTL_WEIGHT_MAX)
                return *why = "weight is an integer from 1 to 1000", -1;
            c->weight = (int)w;
        } else {
            return *why = "unknown field: drain, down, weight and reset are known", -1;
        }
        fields++;
        skip_ws(&q, end);
        if (literal(&q, end, ","))
            continue;
        if (!literal(&q, end, "}"))
            return -1;
        skip_ws(&q, end);
        return q == end && fields > 0 ? 0 : -1;
    }
}

/* One server as /upstreams shows it, from the configured weight w. */
static void server_json(mp_strbuf_t *b, mp_peer_t *p, const char *name, int w, double now)
{
    mp_strbuf_printf(b, "{\"addr\":");
    sb_str(b, p->addr);
    mp_strbuf_printf(b, ",\"name\":");
    sb_str(b, name);
    double open = p->open_until;
    mp_strbuf_printf(b,
                     ",\"weight\":%d,\"configured_weight\":%d,\"state\":\"%s\",\"drain\":%s,\"down\":%s,"
                     "\"set_by\":",
                     mp_peer_weight(p, w), w, mp_peer_state(p, now), p->ctl_drain ? "true" : "false",
                     p->ctl_down ? "true" : "false");
    sb_str(b, mp_ctl_by_name(p->ctl_by));
    mp_strbuf_printf(b,
                     ",\"healthy\":%s,\"probe_up\":%s,\"circuit\":\"%s\",\"active\":%d,"
                     "\"failures\":%d,\"latency_ms\":%.3f,\"requests\":%llu,\"failed\":%llu}",
                     mp_peer_healthy(p, now) ? "true" : "false", p->probe_up ? "true" : "false",
                     open <= 0 ? "closed" : (now < open ? "open" : "half-open"), (int)p->active, (int)p->fails,
                     mp_peer_latency(p), (unsigned long long)p->requests, (unsigned long long)p->failures);
}

/* POST /upstreams/NAME/servers/ADDR (rest: after "/upstreams/"): an
 * operator's control of one server, for every worker at once (health.h). */
static void server_control(admin_conn_t *c, mp_slice rest, mp_slice body)
{
    const char *slash = memchr(rest.p, '/', rest.len);
    if (!slash || (size_t)(rest.p + rest.len - slash) < 10 || memcmp(slash, "/servers/", 9) != 0)
        return json_error(c, 404, "not found: POST /upstreams/NAME/servers/ADDR");
    char name[256], addr[512];
    mp_slice addr_part = {slash + 9, (size_t)(rest.p + rest.len - slash - 9)};
    if (url_decode((mp_slice){rest.p, (size_t)(slash - rest.p)}, name, sizeof(name)) != 0 ||
        url_decode(addr_part, addr, sizeof(addr)) != 0)
        return json_error(c, 400, "bad percent-encoding in the upstream name or server address");
    const mp_config_t *cfg = mp_reloader_config(c->a->rl);
    const mp_upstream_def_t *u = NULL;
    for (size_t i = 0; i < cfg->nupstreams && !u; i++)
        if (strcmp(cfg->upstreams[i].name, name) == 0)
            u = &cfg->upstreams[i];
    if (!u)
        return json_error(c, 404, "no such upstream");
    size_t s = 0;
    while (s < u->nservers && strcmp(u->servers[s].addr.text, addr) != 0)
        s++;
    if (s == u->nservers)
        return json_error(c, 404, "the upstream has no such server (the address as GET /upstreams shows it)");
    mp_peer_ctl_t ctl;
    const char *why;
    if (parse_control(body, &ctl, &why) != 0)
        return json_error(c, 400, why);
    mp_peer_t *p = mp_peer_get(u->name, addr);
    if (!p)
        return json_error(c, 500, "out of memory");
    mp_peer_control(p, &ctl, MP_CTL_ADMIN);
    mp_strbuf_t b = {0};
    mp_strbuf_printf(&b, "{\"upstream\":");
    sb_str(&b, u->name);
    mp_strbuf_printf(&b, ",\"server\":");
    server_json(&b, p, u->servers[s].name, u->servers[s].weight, mp_health_now());
    mp_strbuf_printf(&b, "}\n");
    respond_json(c, 200, &b);
}

/* GET /upstreams: every server's live state (SPEC "Admin port"). */
static void upstreams(admin_conn_t *c)
{
    const mp_config_t *cfg = mp_reloader_config(c->a->rl);
    double now = mp_health_now();
    mp_strbuf_t b = {0};
    mp_strbuf_printf(&b, "{");
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const mp_upstream_def_t *u = &cfg->upstreams[i];
        upstream_open(&b, i, u);
        mp_strbuf_printf(&b, ",\"servers\":[");
        for (size_t s = 0; s < u->nservers; s++) {
            mp_peer_t *p = mp_peer_get(u->name, u->servers[s].addr.text);
            if (!p)
                continue;
            mp_strbuf_printf(&b, "%s", s ? "," : "");
            server_json(&b, p, u->servers[s].name, u->servers[s].weight, now);
        }
        mp_strbuf_printf(&b, "]}");
    }
    mp_strbuf_printf(&b, "}\n");
    respond_json(c, 200, &b);
}

/* GET / (page: the status page) and GET /status (its JSON, status.h). */
static void status(admin_conn_t *c, int page)
{
    if (page) {
        size_t len;
        const char *html = mp_status_page(&len);
        return respond_with(c, 200,
                            "Cache-Control: no-store\r\nContent-Security-Policy: default-src 'self'; "
                            "script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\n",
                            "text/html; charset=utf-8", html, len);
    }
    mp_strbuf_t b = {0};
    mp_status_json(c->a->status, &b);
    respond_json(c, 200, &b);
}

/* GET /metrics: the workers' counters summed, Prometheus text (metrics.h). */
static void metrics(admin_conn_t *c)
{
    const mp_reloader_t *rl = c->a->rl;
    int n;
    mp_worker_t *workers = mp_reloader_workers(rl, &n);
    const mp_metrics_t **ms = calloc(n > 0 ? (size_t)n : 1, sizeof(*ms));
    if (!ms)
        return respond(c, 500, "text/plain", "out of memory\n", 14);
    for (int i = 0; i < n; i++)
        ms[i] = &workers[i].io.metrics;
    mp_metrics_src_t src = {
        .workers = ms, .nworkers = n, .cfg = mp_reloader_config(rl), .generation = mp_reloader_generation(rl)};
    mp_reloader_counts(rl, &src.reloads_ok, &src.reloads_refused);
    size_t len = 0;
    char *text = mp_metrics_render(&src, &len);
    free(ms);
    if (!text)
        return respond(c, 500, "text/plain", "out of memory\n", 14);
    respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

/* mp_reload_cb: the answer to POST /reload or /rollback. */
static void on_reloaded(void *arg, uint64_t generation, const char *err)
{
    admin_conn_t *c = arg;
    c->waiting = 0;
    if (c->sock.fd < 0)
        return close_conn(c); /* the client left meanwhile */
    mp_strbuf_t b = {0};
    if (err) {
        mp_strbuf_printf(&b, "{\"error\":");
        sb_str(&b, err);
        mp_strbuf_printf(&b, ",\"generation\":%llu}\n", (unsigned long long)generation);
        return respond_json(c, 422, &b);
    }
    mp_strbuf_printf(&b, "{\"generation\":%llu}\n", (unsigned long long)generation);
    respond_json(c, 200, &b);
}

/* Whether the query asks for a dry run: dry_run=1 (or true, or bare). */
static int dry_run(mp_slice q)
{
    for (size_t i = 0; i < q.len;) {
        size_t e = i;
        while (e < q.len && q.p[e] != '&')
            e++;
        mp_slice kv = {q.p + i, e - i};
        if (MP_SLICE_IEQ(kv, "dry_run") || MP_SLICE_IEQ(kv, "dry_run=1") || MP_SLICE_IEQ(kv, "dry_run=true"))
            return 1;
        i = e + 1;
    }
    return 0;
}

/* POST /reload?dry_run=1: what the script on disk would change, applied nowhere. */
static void preview(admin_conn_t *c)
{
    char err[2048];
    size_t len = 0;
    char *json = mp_reload_preview(c->a->rl, &len, err, sizeof(err));
    if (!json) {
        mp_strbuf_t b = {0};
        mp_strbuf_printf(&b, "{\"dry_run\":true,\"error\":");
        sb_str(&b, err);
        mp_strbuf_printf(&b, ",\"generation\":%llu}\n", (unsigned long long)mp_reloader_generation(c->a->rl));
        return respond_json(c, 422, &b);
    }
    respond(c, 200, "application/json", json, len);
    free(json);
}

/* The Host values that name this port: the address it is bound to (the
 * real port when it was configured as port 0), the address as configured
 * when it names that port (a host name), localhost with its port, and the
 * loopback addresses when the address is IPv6 or a wildcard. SPEC: no bare
 * "localhost" (a browser sends the port of any other). */
static void own_hosts(mp_admin_t *a, const mp_addr_t *addr)
{
    unsigned port = 0;
    char ip[INET6_ADDRSTRLEN] = "?";
    int v6 = addr->ss.ss_family == AF_INET6, any = 0;
    if (v6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&addr->ss;
        port = ntohs(sin6->sin6_port);
        any = IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr);
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        snprintf(a->hosts[0], ADMIN_HOST_MAX, "[%s]:%u", ip, port);
    } else {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)&addr->ss;
        port = ntohs(sin->sin_port);
        any = sin->sin_addr.s_addr == htonl(INADDR_ANY);
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        snprintf(a->hosts[0], ADMIN_HOST_MAX, "%s:%u", ip, port);
    }
    snprintf(a->hosts[1], ADMIN_HOST_MAX, "localhost:%u", port);
    char suffix[16];
    int n = snprintf(suffix, sizeof(suffix), ":%u", port);
    size_t len = addr->text ? strlen(addr->text) : 0;
    if (len > (size_t)n && strcmp(addr->text + len - (size_t)n, suffix) == 0)
        snprintf(a->hosts[2], ADMIN_HOST_MAX, "%s", addr->text);
    if (v6 || any)
        snprintf(a->hosts[3], ADMIN_HOST_MAX, "[::1]:%u", port);
    if (any)
        snprintf(a->hosts[4], ADMIN_HOST_MAX, "127.0.0.1:%u", port);
    for (int i = 0; i < ADMIN_HOSTS; i++)
        for (char *q = a->hosts[i]; *q; q++)
            *q = mp_lower(*q);
}

/* SPEC "Admin access": a web page in an operator's browser must not drive
 * the admin port. Browsers send Origin on every cross-site POST and on
 * scripted requests; DNS rebinding shows as a Host naming another site.
 * /live and /ready (probe) skip the Host check: orchestrators probe them
 * by the pod's address. A request without Host (HTTP/1.0) is no browser's. */
static int from_browser(const mp_admin_t *a, const mp_http_request_t *h, int probe, int token)
{
    if (mp_http1_find(h->headers, h->nheaders, "origin", 6) >= 0)
        return 1;
    if (probe || token || h->host.len == 0) /* a browser cannot send the token: no Host check needed then */
        return 0;
    for (int i = 0; i < ADMIN_HOSTS; i++)
        if (a->hosts[i][0] && mp_slice_ieq(h->host, a->hosts[i], strlen(a->hosts[i])))
            return 0;
    return 1;
}

/* Whether h carries "Authorization: Bearer <token>". The comparison takes
 * the same time whatever the bytes (a wrong guess says nothing of how much
 * of it was right). */
static int bearer_ok(const mp_http_request_t *h, const char *token)
{
    int i = mp_http1_find(h->headers, h->nheaders, "authorization", 13);
    if (i < 0)
        return 0;
    mp_slice v = h->headers[i].value;
    if (v.len < 7 || !mp_slice_ieq((mp_slice){v.p, 7}, "bearer ", 7))
        return 0;
    v.p += 7;
    v.len -= 7;
    while (v.len && v.p[0] == ' ')
        v.p++, v.len--;
    size_t n = strlen(token);
    unsigned char d = v.len != n;
    for (size_t k = 0; k < v.len; k++)
        d |= (unsigned char)(v.p[k] ^ token[k % n]);
    return d == 0;
}

static void route(admin_conn_t *c, const mp_http_request_t *h, mp_slice body)
{
    int get = MP_SLICE_IEQ(h->method, "get") || MP_SLICE_IEQ(h->method, "head");
    int post = MP_SLICE_IEQ(h->method, "post");
    mp_slice p = h->path;
    int probe = MP_SLICE_IEQ(p, "/live") || MP_SLICE_IEQ(p, "/ready");
    const char *token = mp_reloader_config(c->a->rl)->admin_token; /* the current configuration's */
    if (from_browser(c->a, h, probe, token != NULL))
        return respond(c, 403, "text/plain", "forbidden: Origin, or a Host that is not the admin address\n", 59);
    if (token && !probe && !bearer_ok(h, token))
        return respond_with(c, 401, "WWW-Authenticate: Bearer realm=\"moonproxy admin\"\r\n", "text/plain",
                            "unauthorized: Authorization: Bearer <token>\n", 44);
    if (MP_SLICE_IEQ(p, "/live")) {
        if (!get)
            return respond(c, 405, "text/plain", "GET\n", 4);
        return *c->a->stuck ? respond(c, 503, "text/plain", "a worker is stuck in a hook\n", 28)
                            : respond(c, 200, "text/plain", "live\n", 5);
    }
    if (MP_SLICE_IEQ(p, "/ready")) {
        if (!get)
            return respond(c, 405, "text/plain", "GET\n", 4);
        return *c->a->ready ? respond(c, 200, "text/plain", "ready\n", 6)
                            : respond(c, 503, "text/plain", "not ready\n", 10);
    }
    if (MP_SLICE_IEQ(p, "/") || MP_SLICE_IEQ(p, "/status"))
        return get ? status(c, p.len == 1) : respond(c, 405, "text/plain", "GET\n", 4);
    if (MP_SLICE_IEQ(p, "/configz"))
        return get ? configz(c) : respond(c, 405, "text/plain", "GET\n", 4);
    if (MP_SLICE_IEQ(p, "/metrics"))
        return get ? metrics(c) : respond(c, 405, "text/plain", "GET\n", 4);
    if (MP_SLICE_IEQ(p, "/upstreams"))
        return get ? upstreams(c) : respond(c, 405, "text/plain", "GET\n", 4);
    if (p.len > 11 && memcmp(p.p, "/upstreams/", 11) == 0)
        return post ? server_control(c, (mp_slice){p.p + 11, p.len - 11}, body)
                    : respond(c, 405, "text/plain", "POST\n", 5);
    int rollback = MP_SLICE_IEQ(p, "/rollback");
    if (MP_SLICE_IEQ(p, "/reload") || rollback) {
        if (!post)
            return respond(c, 405, "text/plain", "POST\n", 5);
        if (!rollback && dry_run(h->query))
            return preview(c);
        c->waiting = 1;
        ev_io_stop(c->a->loop, &c->io);
        ev_timer_stop(c->a->loop, &c->timer);
        return mp_reload(c->a->rl, rollback, rollback ? "POST /rollback" : "POST /reload", on_reloaded, c);
    }
    respond(c, 404, "text/plain", "not found\n", 10);
}

/* The TLS handshake failed: a plain HTTP request is told so in plain HTTP
 * (as on a TLS listener), anything else is closed; logged at most once a
 * second. */
static void tls_failed(admin_conn_t *c)
{
    static mp_log_limit_t lim;
    int plain = mp_tls_plain_http(c->sock.session); /* before mp_tls_error empties the error queue */
    char why[160];
    mp_log_limited(&lim, MP_LOG_INFO, "admin: TLS handshake failed: %s",
                   plain ? "a plain HTTP request on the TLS port (400)"
                         : mp_tls_error(c->sock.session, why, sizeof(why)));
    if (!plain)
        return close_conn(c);
    mp_io_ops_close(&c->sock); /* plain from here on, for the answer */
    for (int i = 0; i < 4 && mp_io_read(&c->sock, c->in, sizeof(c->in)) > 0; i++)
        ; /* what the request sent so far: read, so that the close does not reset the answer */
    ev_io_stop(c->a->loop, &c->io);
    respond(c, 400, "text/plain", "plain HTTP on the TLS admin port: use https\n", 44);
}

/* Reads (the handshake first, over TLS) until a request head is whole. */
static void on_readable(admin_conn_t *c)
{
    if (c->sock.handshaking) {
        int rc = mp_io_handshake(&c->sock);
        if (rc == MP_EAGAIN)
            return wait_for(c, EV_READ);
        if (rc != 0)
            return tls_failed(c);
    }
    for (;;) {
        ssize_t n = mp_io_read(&c->sock, c->in + c->len, sizeof(c->in) - c->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return wait_for(c, EV_READ);
        if (n <= 0)
            return close_conn(c);
        c->len += (size_t)n;
        static mp_http_request_t h; /* the main thread's only */
        mp_http_limits_t lim = {ADMIN_HEAD_MAX, ADMIN_HEAD_MAX};
        int rc = mp_http1_parse_request(c->in, c->len, &c->scanned, &lim, &h);
        if (rc == MP_EAGAIN && c->len < sizeof(c->in)) {
            if (mp_io_pending(&c->sock))
                continue; /* bytes the session holds: no readiness will announce them */
            return wait_for(c, EV_READ);
        }
        if (rc > 0 && (h.chunked || h.content_length > (int64_t)(sizeof(c->in) - (size_t)rc))) {
            ev_io_stop(c->a->loop, &c->io);
            return respond(c, 413, "text/plain", "body too large (or chunked)\n", 28);
        }
        if (rc > 0 && h.content_length > 0 && c->len < (size_t)rc + (size_t)h.content_length) {
            c->scanned = 0; /* parsed again, whole, once the body is in */
            if (mp_io_pending(&c->sock))
                continue;
            return wait_for(c, EV_READ);
        }
        ev_io_stop(c->a->loop, &c->io);
        if (rc < 0)
            return respond(c, rc == MP_EAGAIN ? 431 : h.status ? h.status : 400, "text/plain", "bad request\n", 12);
        mp_slice body = {c->in + rc, h.content_length > 0 ? (size_t)h.content_length : 0};
        return route(c, &h, body);
    }
}

static void on_conn_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    admin_conn_t *c = container_of(io, admin_conn_t, io);
    if (c->out) /* answering: the watcher waits for what the write needs */
        return (mp_io_revents(&c->sock, revents) & EV_WRITE) ? flush(c) : (void)0;
    on_readable(c);
}

static void on_conn_timeout(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    close_conn(container_of(t, admin_conn_t, timer));
}

/* Out of descriptors (or memory), the level-triggered listener would call
 * on_accept again at once: it pauses for a moment instead. */
static ev_timer accept_retry;

static void on_accept_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)revents;
    ev_io_start(loop, t->data);
}

static void on_accept(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)revents;
    static mp_log_limit_t lim;
    mp_admin_t *a = container_of(io, mp_admin_t, io);
    for (int i = 0; i < 16; i++) {
        int fd = accept4(a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
            mp_log_limited(&lim, MP_LOG_WARN, "admin: accept: %s: not accepting for 100 ms", strerror(errno));
            ev_io_stop(loop, io);
            ev_timer_init(&accept_retry, on_accept_retry, 0.1, 0);
            accept_retry.data = io;
            ev_timer_start(loop, &accept_retry);
            return;
        }
        if (fd < 0)
            return;
        admin_conn_t *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            return;
        }
        mp_io_init(&c->sock, fd);
        mp_tls_server_t *tls = mp_reloader_config(a->rl)->admin_tls; /* the current configuration's */
        SSL *ssl = tls ? mp_tls_server_session(tls, fd) : NULL;
        if (tls && !ssl) {
            mp_io_close(&c->sock);
            free(c);
            return;
        }
        if (ssl)
            mp_io_tls(&c->sock, ssl);
        c->a = a;
        c->next = a->conns;
        a->conns = c;
        ev_io_init(&c->io, on_conn_io, fd, EV_READ);
        ev_io_start(loop, &c->io);
        ev_timer_init(&c->timer, on_conn_timeout, ADMIN_TIMEOUT, 0);
        ev_timer_start(loop, &c->timer);
    }
}

mp_admin_t *mp_admin_start(struct ev_loop *loop, mp_addr_t *addr, mp_reloader_t *rl, const int *ready, const int *stuck,
                           char *err, size_t errlen)
{
    mp_admin_t *a = calloc(1, sizeof(*a));
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->fd = mp_listener_open(addr);
    if (a->fd < 0) {
        snprintf(err, errlen, "cannot listen on %s (admin): %s", addr->text, strerror(errno));
        free(a);
        return NULL;
    }
    a->loop = loop;
    a->rl = rl;
    a->ready = ready;
    a->stuck = stuck;
    if (!(a->status = mp_status_start(loop, rl))) {
        snprintf(err, errlen, "out of memory");
        close(a->fd);
        free(a);
        return NULL;
    }
    own_hosts(a, addr);
    ev_io_init(&a->io, on_accept, a->fd, EV_READ);
    ev_io_start(loop, &a->io);
    return a;
}

void mp_admin_free(mp_admin_t *a)
{
    if (!a)
        return;
    mp_status_free(a->status);
    ev_io_stop(a->loop, &a->io);
    close(a->fd);
    while (a->conns) {
        admin_conn_t *c = a->conns;
        c->waiting = 0;
        close_conn(c);
    }
    free(a);
}
