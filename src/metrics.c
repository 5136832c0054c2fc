/* metrics.c: per-worker request counters by route name, and GET /metrics:
 * the workers' counters summed on the main thread, with the process-wide
 * server state (health.h) and the reloader's counts, as Prometheus text. */
#include "metrics.h"

#include "health.h"
#include "strbuf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

/* Upper bounds of the histogram's finite buckets, in seconds. */
static const double bounds[MP_METRICS_BUCKETS - 1] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

/* The status classes of moonproxy_upstream_requests_total (health.h by_class). */
static const char *const classes[MP_PEER_CLASSES] = {"1xx", "2xx", "3xx", "4xx", "5xx", "error"};

/* Only the owning worker writes: no read-modify-write needed. */
static inline void bump(_Atomic uint64_t *c)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1, memory_order_relaxed);
}

/* ---- worker side ---- */

static mp_route_stats_t *find_or_add(mp_metrics_t *m, const char *name)
{
    size_t n = atomic_load_explicit(&m->nroutes, memory_order_relaxed); /* we are the writer */
    for (size_t i = 0; i < n; i++)
        if (strcmp(m->routes[i]->name, name) == 0)
            return m->routes[i];
    if (n >= MP_METRICS_ROUTES)
        return NULL;
    /* The last slot is kept for the names past capacity. */
    if (n == MP_METRICS_ROUTES - 1 && strcmp(name, MP_METRICS_OTHER) != 0)
        return find_or_add(m, MP_METRICS_OTHER);
    mp_route_stats_t *s = calloc(1, sizeof(*s));
    if (!s || !(s->name = strdup(name))) {
        free(s);
        return NULL;
    }
    m->routes[n] = s;
    atomic_store_explicit(&m->nroutes, n + 1, memory_order_release);
    return s;
}

mp_route_stats_t *mp_metrics_route(mp_metrics_t *m, const char *name)
{
    if (name)
        return find_or_add(m, name);
    if (!m->none)
        m->none = find_or_add(m, MP_METRICS_NONE);
    return m->none;
}

void mp_metrics_request(mp_route_stats_t *s, int status, double duration)
{
    if (!s)
        return;
    int i;
    for (i = 0; i < MP_METRICS_CODES; i++) {
        int code = LOAD(s->codes[i]);
        if (code == status)
            break;
        if (code == 0 && status > 0 && status <= UINT16_MAX) {
            atomic_store_explicit(&s->codes[i], (uint16_t)status, memory_order_release);
            break;
        }
    }
    bump(&s->by_code[i]);
    int b = 0;
    while (b < MP_METRICS_BUCKETS - 1 && duration > bounds[b])
        b++;
    bump(&s->buckets[b]);
    atomic_store_explicit(&s->sum, LOAD(s->sum) + duration, memory_order_relaxed);
}

void mp_metrics_dispose(mp_metrics_t *m)
{
    size_t n = atomic_load_explicit(&m->nroutes, memory_order_relaxed);
    for (size_t i = 0; i < n; i++) {
        free(m->routes[i]->name);
        free(m->routes[i]);
    }
    memset(m, 0, sizeof(*m));
}

/* ---- main thread: the scrape ---- */

/* A label value, quoted and escaped (text format 0.0.4: \\, \" and \n). */
static void sb_label(mp_strbuf_t *b, const char *s)
{
    if (mp_strbuf_reserve(b, strlen(s) * 2 + 2) != 0)
        return;
    b->p[b->len++] = '"';
    for (; *s; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n')
            b->p[b->len++] = '\\';
        b->p[b->len++] = *s == '\n' ? 'n' : *s;
    }
    b->p[b->len++] = '"';
    b->p[b->len] = '\0';
}

static void header(mp_strbuf_t *b, const char *name, const char *type, const char *help)
{
    mp_strbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One route name summed over the workers. */
typedef struct {
    const char *name; /* borrowed from a worker's entry (never freed while it runs) */
    int *codes;       /* ncodes distinct statuses */
    uint64_t *counts; /* per codes[i] */
    size_t ncodes;
    uint64_t other; /* status="other" */
    uint64_t buckets[MP_METRICS_BUCKETS];
    double sum;
} merged_t;

typedef struct {
    merged_t *v;
    size_t n, cap;
    size_t code_cap; /* room for every worker's distinct statuses */
} routes_t;

static merged_t *merged_get(routes_t *rs, const char *name)
{
    for (size_t i = 0; i < rs->n; i++)
        if (strcmp(rs->v[i].name, name) == 0)
            return &rs->v[i];
    if (rs->n == rs->cap) {
        size_t cap = rs->cap ? rs->cap * 2 : 16;
        merged_t *v = realloc(rs->v, cap * sizeof(*v));
        if (!v)
            return NULL;
        rs->v = v;
        rs->cap = cap;
    }
    merged_t *m = &rs->v[rs->n];
    memset(m, 0, sizeof(*m));
    m->codes = malloc(rs->code_cap * sizeof(*m->codes));
    m->counts = malloc(rs->code_cap * sizeof(*m->counts));
    if (!m->codes || !m->counts) {
        free(m->codes);
        free(m->counts);
        return NULL;
    }
    m->name = name;
    rs->n++;
    return m;
}

static void merge_code(merged_t *m, int code, uint64_t count)
{
    for (size_t i = 0; i < m->ncodes; i++)
        if (m->codes[i] == code) {
            m->counts[i] += count;
            return;
        }
    m->codes[m->ncodes] = code;
    m->counts[m->ncodes++] = count;
}

static int merge_one(routes_t *rs, const mp_route_stats_t *s)
{
    merged_t *m = merged_get(rs, s->name);
    if (!m)
        return -1;
    for (int i = 0; i < MP_METRICS_CODES; i++) {
        int code = atomic_load_explicit(&s->codes[i], memory_order_acquire);
        if (code)
            merge_code(m, code, LOAD(s->by_code[i]));
    }
    m->other += LOAD(s->by_code[MP_METRICS_CODES]);
    for (int i = 0; i < MP_METRICS_BUCKETS; i++)
        m->buckets[i] += LOAD(s->buckets[i]);
    m->sum += LOAD(s->sum);
    return 0;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const merged_t *)a)->name, ((const merged_t *)b)->name);
}

static int merge(routes_t *rs, const mp_metrics_src_t *src)
{
    rs->code_cap = (size_t)MP_METRICS_CODES * (size_t)(src->nworkers > 0 ? src->nworkers : 1);
    for (int w = 0; w < src->nworkers; w++) {
        const mp_metrics_t *m = src->workers[w];
        size_t n = atomic_load_explicit(&m->nroutes, memory_order_acquire);
        for (size_t i = 0; i < n; i++)
            if (merge_one(rs, m->routes[i]) != 0)
                return -1;
    }
    if (rs->n)
        qsort(rs->v, rs->n, sizeof(*rs->v), by_name);
    return 0;
}

static void routes_free(routes_t *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        free(rs->v[i].codes);
        free(rs->v[i].counts);
    }
    free(rs->v);
}

int mp_metrics_route_totals(const mp_metrics_src_t *src, mp_route_total_t *out, size_t max)
{
    routes_t rs = {0};
    if (merge(&rs, src) != 0) {
        routes_free(&rs);
        return -1;
    }
    size_t n = 0;
    for (size_t i = 0; i < rs.n && n < max; i++, n++) {
        const merged_t *m = &rs.v[i];
        mp_route_total_t *t = &out[n];
        memset(t, 0, sizeof(*t));
        snprintf(t->name, sizeof(t->name), "%s", m->name);
        t->requests = m->other;
        for (size_t c = 0; c < m->ncodes; c++) {
            t->requests += m->counts[c];
            if (m->codes[c] >= 500)
                t->errors += m->counts[c];
        }
        memcpy(t->buckets, m->buckets, sizeof(t->buckets));
    }
    routes_free(&rs);
    return (int)n;
}

double mp_metrics_bucket_bound(int i)
{
    return i >= 0 && i < MP_METRICS_BUCKETS - 1 ? bounds[i] : INFINITY;
}

static void render_requests(mp_strbuf_t *b, const routes_t *rs)
{
    header(b, "moonproxy_requests_total", "counter",
           "Requests answered, by route name (" MP_METRICS_NONE ": no route matched) and status sent.");
    for (size_t i = 0; i < rs->n; i++) {
        const merged_t *m = &rs->v[i];
        for (size_t c = 0; c < m->ncodes; c++) {
            mp_strbuf_printf(b, "moonproxy_requests_total{route=");
            sb_label(b, m->name);
            mp_strbuf_printf(b, ",status=\"%d\"} %llu\n", m->codes[c], (unsigned long long)m->counts[c]);
        }
        if (m->other) {
            mp_strbuf_printf(b, "moonproxy_requests_total{route=");
            sb_label(b, m->name);
            mp_strbuf_printf(b, ",status=\"other\"} %llu\n", (unsigned long long)m->other);
        }
    }
}

static void render_durations(mp_strbuf_t *b, const routes_t *rs)
{
    const char *name = "moonproxy_request_duration_seconds";
    header(b, name, "histogram", "Time from the request's first byte to its end, by route name.");
    for (size_t i = 0; i < rs->n; i++) {
        const merged_t *m = &rs->v[i];
        uint64_t total = 0;
        for (int k = 0; k < MP_METRICS_BUCKETS; k++) {
            total += m->buckets[k];
            mp_strbuf_printf(b, "%s_bucket{route=", name);
            sb_label(b, m->name);
            if (k < MP_METRICS_BUCKETS - 1)
                mp_strbuf_printf(b, ",le=\"%g\"} %llu\n", bounds[k], (unsigned long long)total);
            else
                mp_strbuf_printf(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)total);
        }
        mp_strbuf_printf(b, "%s_sum{route=", name);
        sb_label(b, m->name);
        mp_strbuf_printf(b, "} %.9g\n%s_count{route=", m->sum, name);
        sb_label(b, m->name);
        mp_strbuf_printf(b, "} %llu\n", (unsigned long long)total);
    }
}

/* Whether server s of u was listed before (the same address twice). */
static int seen_before(const mp_upstream_def_t *u, size_t s)
{
    for (size_t i = 0; i < s; i++)
        if (strcmp(u->servers[i].addr.text, u->servers[s].addr.text) == 0)
            return 1;
    return 0;
}

/* The servers of the current configuration (those of upstreams since
 * removed are left out); fn renders one. */
static void each_server(mp_strbuf_t *b, const mp_config_t *cfg,
                        void (*fn)(mp_strbuf_t *b, const mp_server_def_t *sd, mp_peer_t *p, double now))
{
    double now = mp_health_now();
    for (size_t i = 0; cfg && i < cfg->nupstreams; i++) {
        const mp_upstream_def_t *u = &cfg->upstreams[i];
        for (size_t s = 0; s < u->nservers; s++) {
            mp_peer_t *p = seen_before(u, s) ? NULL : mp_peer_get(u->name, u->servers[s].addr.text);
            if (p)
                fn(b, &u->servers[s], p, now);
        }
    }
}

/* upstream, server (the address) and, for a server given by DNS name, name
 * (as written): an IP literal's series keep the labels they always had. */
static void server_labels(mp_strbuf_t *b, const mp_server_def_t *sd, const mp_peer_t *p)
{
    mp_strbuf_printf(b, "{upstream=");
    sb_label(b, p->upstream);
    mp_strbuf_printf(b, ",server=");
    sb_label(b, p->addr);
    if (sd->by_name) {
        mp_strbuf_printf(b, ",name=");
        sb_label(b, sd->name);
    }
}

static void render_up(mp_strbuf_t *b, const mp_server_def_t *sd, mp_peer_t *p, double now)
{
    mp_strbuf_printf(b, "moonproxy_upstream_server_up");
    server_labels(b, sd, p);
    mp_strbuf_printf(b, "} %d\n", mp_peer_healthy(p, now) ? 1 : 0);
}

static void render_peer_requests(mp_strbuf_t *b, const mp_server_def_t *sd, mp_peer_t *p, double now)
{
    (void)now;
    for (int k = 0; k < MP_PEER_CLASSES; k++) {
        mp_strbuf_printf(b, "moonproxy_upstream_requests_total");
        server_labels(b, sd, p);
        mp_strbuf_printf(b, ",status=\"%s\"} %llu\n", classes[k], (unsigned long long)LOAD(p->by_class[k]));
    }
}

static void render_tunnels(mp_strbuf_t *b, const mp_metrics_src_t *src)
{
    uint64_t open = 0, bytes[2] = {0, 0}, closed[MP_METRICS_TUNNEL_REASONS] = {0};
    for (int w = 0; w < src->nworkers; w++) {
        open += LOAD(src->workers[w]->tunnels);
        for (int d = 0; d < 2; d++)
            bytes[d] += LOAD(src->workers[w]->tunnel_bytes[d]);
        for (int k = 0; k < MP_METRICS_TUNNEL_REASONS; k++)
            closed[k] += LOAD(src->workers[w]->tunnels_closed[k]);
    }
    header(b, "moonproxy_tunnels", "gauge", "Open tunnels (upgraded connections, e.g. WebSocket).");
    mp_strbuf_printf(b, "moonproxy_tunnels{state=\"open\"} %llu\n", (unsigned long long)open);
    header(b, "moonproxy_tunnel_bytes_total", "counter", "Bytes relayed by tunnels, by direction.");
    static const char *const dirs[2] = {"to_upstream", "to_client"};
    for (int d = 0; d < 2; d++)
        mp_strbuf_printf(b, "moonproxy_tunnel_bytes_total{direction=\"%s\"} %llu\n", dirs[d],
                         (unsigned long long)bytes[d]);
    header(b, "moonproxy_tunnels_closed_total", "counter",
           "Tunnels closed, by reason (client, upstream, idle, shutdown, error).");
    static const char *const reasons[MP_METRICS_TUNNEL_REASONS] = {"client", "upstream", "idle", "shutdown", "error"};
    for (int k = 0; k < MP_METRICS_TUNNEL_REASONS; k++)
        mp_strbuf_printf(b, "moonproxy_tunnels_closed_total{reason=\"%s\"} %llu\n", reasons[k],
                         (unsigned long long)closed[k]);
}

static void render_process(mp_strbuf_t *b, const mp_metrics_src_t *src)
{
    uint64_t conns = 0, idle = 0;
    for (int w = 0; w < src->nworkers; w++) {
        conns += LOAD(src->workers[w]->conns);
        idle += LOAD(src->workers[w]->idle_up);
    }
    header(b, "moonproxy_connections", "gauge",
           "Open connections: client ones, and idle pooled upstream ones (upstream_idle).");
    mp_strbuf_printf(b, "moonproxy_connections{state=\"client\"} %llu\n", (unsigned long long)conns);
    mp_strbuf_printf(b, "moonproxy_connections{state=\"upstream_idle\"} %llu\n", (unsigned long long)idle);
    static const char *const tls_results[MP_TLS_RESULTS] = {"full", "resumed", "failed"};
    static const char *const tls_names[2] = {"moonproxy_tls_handshakes_total",
                                             "moonproxy_upstream_tls_handshakes_total"};
    static const char *const tls_help[2] = {"TLS handshakes with clients, by result (full, resumed, failed).",
                                            "TLS handshakes with upstream servers, by result (full, resumed, failed)."};
    for (int side = 0; side < 2; side++) {
        header(b, tls_names[side], "counter", tls_help[side]);
        for (int k = 0; k < MP_TLS_RESULTS; k++) {
            uint64_t n = 0;
            for (int w = 0; w < src->nworkers; w++)
                n += LOAD(src->workers[w]->tls[side][k]);
            mp_strbuf_printf(b, "%s{result=\"%s\"} %llu\n", tls_names[side], tls_results[k], (unsigned long long)n);
        }
    }
    render_tunnels(b, src);
    header(b, "moonproxy_reloads_total", "counter", "Reloads and rollbacks, by result.");
    mp_strbuf_printf(b, "moonproxy_reloads_total{result=\"ok\"} %llu\n", (unsigned long long)src->reloads_ok);
    mp_strbuf_printf(b, "moonproxy_reloads_total{result=\"refused\"} %llu\n", (unsigned long long)src->reloads_refused);
    header(b, "moonproxy_config_generation", "gauge", "The configuration generation running.");
    mp_strbuf_printf(b, "moonproxy_config_generation %llu\n", (unsigned long long)src->generation);
}

char *mp_metrics_render(const mp_metrics_src_t *src, size_t *len)
{
    routes_t rs = {0};
    mp_strbuf_t b = {0};
    if (merge(&rs, src) != 0)
        b.oom = 1;
    render_requests(&b, &rs);
    render_durations(&b, &rs);
    routes_free(&rs);
    header(&b, "moonproxy_upstream_server_up", "gauge",
           "1 when the server is up by the active checks and its circuit is not open.");
    each_server(&b, src->cfg, render_up);
    header(&b, "moonproxy_upstream_requests_total", "counter",
           "Attempts sent to the server, by response status class (error: no response).");
    each_server(&b, src->cfg, render_peer_requests);
    render_process(&b, src);
    return mp_strbuf_steal(&b, len);
}
