/* status.c: the status page and its data (status.h). Once a second the
 * sampler sums the workers' route counters (metrics.h) and stores each
 * followed route's requests and 5xx of that second in a ring; servers'
 * rates come from the peers' totals (health.h) between two samples. */
#include "status.h"

#include "health.h"
#include "log.h"
#include "metrics.h"
#include "router.h"
#include "worker.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STATUS_SERVERS 256 /* servers whose rates are followed */
#define STATUS_RELOADS 8   /* the last reloads shown */
#define GRAPH_SECONDS 120  /* what the page draws of the history */

typedef struct {
    char name[64];
    uint64_t total_req, total_err; /* at the last sample */
    uint32_t req[MP_STATUS_SECONDS], err[MP_STATUS_SECONDS];
    double rps, err_rate; /* over the last 10 s */
    uint64_t buckets[MP_METRICS_BUCKETS];
} series_t;

typedef struct {
    const mp_peer_t *peer;
    uint64_t requests, failures; /* at the last sample */
    double rps, err_rate;        /* between the last two samples */
} server_rate_t;

typedef struct {
    uint64_t generation;
    double at; /* epoch seconds */
    int ok;
} reload_event_t;

struct mp_status {
    struct ev_loop *loop;
    mp_reloader_t *rl;
    ev_timer tick;
    double started; /* epoch seconds */
    unsigned head;  /* ring slot of the newest second */
    uint64_t samples;
    series_t routes[MP_STATUS_ROUTES];
    int nroutes;
    server_rate_t servers[STATUS_SERVERS];
    int nservers;
    uint64_t generation, ok, refused;
    reload_event_t reloads[STATUS_RELOADS]; /* newest first */
    int nreloads;
    mp_route_total_t totals[MP_STATUS_ROUTES * 2];
};

static series_t *series_of(mp_status_t *s, const char *name)
{
    for (int i = 0; i < s->nroutes; i++)
        if (strcmp(s->routes[i].name, name) == 0)
            return &s->routes[i];
    if (s->nroutes == MP_STATUS_ROUTES)
        return NULL;
    series_t *r = &s->routes[s->nroutes++];
    memset(r, 0, sizeof(*r));
    size_t n = strlen(name) < sizeof(r->name) ? strlen(name) : sizeof(r->name) - 1; /* cut to fit */
    memcpy(r->name, name, n);
    r->name[n] = '\0';
    return r;
}

static server_rate_t *rate_of(mp_status_t *s, const mp_peer_t *p)
{
    for (int i = 0; i < s->nservers; i++)
        if (s->servers[i].peer == p)
            return &s->servers[i];
    if (s->nservers == STATUS_SERVERS)
        return NULL;
    server_rate_t *r = &s->servers[s->nservers++];
    memset(r, 0, sizeof(*r));
    r->peer = p;
    r->requests = atomic_load_explicit(&p->requests, memory_order_relaxed);
    r->failures = atomic_load_explicit(&p->failures, memory_order_relaxed);
    return r;
}

/* The sum of the last n seconds of ring (the newest at head). */
static uint64_t last_seconds(const uint32_t *ring, unsigned head, int n)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += ring[(head + MP_STATUS_SECONDS - (unsigned)i) % MP_STATUS_SECONDS];
    return sum;
}

static void note_reloads(mp_status_t *s)
{
    uint64_t gen = mp_reloader_generation(s->rl), ok, refused;
    mp_reloader_counts(s->rl, &ok, &refused);
    if (s->samples && (ok != s->ok || refused != s->refused)) {
        memmove(&s->reloads[1], &s->reloads[0], sizeof(s->reloads[0]) * (STATUS_RELOADS - 1));
        s->reloads[0] = (reload_event_t){gen, ev_now(s->loop), refused == s->refused};
        if (s->nreloads < STATUS_RELOADS)
            s->nreloads++;
    }
    s->generation = gen;
    s->ok = ok;
    s->refused = refused;
}

static void sample(mp_status_t *s)
{
    int n;
    mp_worker_t *w = mp_reloader_workers(s->rl, &n);
    const mp_metrics_t *ms[64];
    if (n > 64)
        n = 64;
    for (int i = 0; i < n; i++)
        ms[i] = &w[i].io.metrics;
    mp_metrics_src_t src = {.workers = ms, .nworkers = n, .cfg = mp_reloader_config(s->rl)};
    int nt = mp_metrics_route_totals(&src, s->totals, MP_ARRAY_LEN(s->totals));
    s->head = (s->head + 1) % MP_STATUS_SECONDS;
    for (int i = 0; i < s->nroutes; i++)
        s->routes[i].req[s->head] = s->routes[i].err[s->head] = 0;
    for (int i = 0; i < nt; i++) {
        const mp_route_total_t *t = &s->totals[i];
        series_t *r = series_of(s, t->name);
        if (!r)
            continue;
        if (s->samples && t->requests >= r->total_req) { /* the first sample only sets the baseline */
            r->req[s->head] = (uint32_t)(t->requests - r->total_req);
            r->err[s->head] = (uint32_t)(t->errors >= r->total_err ? t->errors - r->total_err : 0);
        }
        r->total_req = t->requests;
        r->total_err = t->errors;
        memcpy(r->buckets, t->buckets, sizeof(r->buckets));
    }
    int window = s->samples < 10 ? (int)s->samples : 10;
    for (int i = 0; i < s->nroutes; i++) {
        series_t *r = &s->routes[i];
        uint64_t req = last_seconds(r->req, s->head, window), err = last_seconds(r->err, s->head, window);
        r->rps = window ? (double)req / window : 0;
        r->err_rate = req ? (double)err / (double)req : 0;
    }
    const mp_config_t *cfg = src.cfg;
    for (size_t u = 0; u < cfg->nupstreams; u++)
        for (size_t k = 0; k < cfg->upstreams[u].nservers; k++) {
            mp_peer_t *p = mp_peer_get(cfg->upstreams[u].name, cfg->upstreams[u].servers[k].addr.text);
            server_rate_t *r = p ? rate_of(s, p) : NULL;
            if (!r)
                continue;
            uint64_t req = atomic_load_explicit(&p->requests, memory_order_relaxed);
            uint64_t fail = atomic_load_explicit(&p->failures, memory_order_relaxed);
            uint64_t dr = req >= r->requests ? req - r->requests : 0, df = fail >= r->failures ? fail - r->failures : 0;
            r->rps = (double)dr;
            r->err_rate = dr ? (double)df / (double)dr : 0;
            r->requests = req;
            r->failures = fail;
        }
    note_reloads(s);
    s->samples++;
}

static void on_tick(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    sample(container_of(t, mp_status_t, tick));
}

mp_status_t *mp_status_start(struct ev_loop *loop, mp_reloader_t *rl)
{
    mp_status_t *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->loop = loop;
    s->rl = rl;
    s->started = ev_time();
    sample(s);
    ev_timer_init(&s->tick, on_tick, 1, 1);
    ev_timer_start(loop, &s->tick);
    return s;
}

void mp_status_free(mp_status_t *s)
{
    if (!s)
        return;
    ev_timer_stop(s->loop, &s->tick);
    free(s);
}

/* ---- GET /status ---- */

static void json_str(mp_strbuf_t *b, const char *v)
{
    char out[512];
    size_t n = mp_json_escape(out, 0, sizeof(out), (mp_slice){v ? v : "", v ? strlen(v) : 0});
    mp_strbuf_printf(b, "\"%.*s\"", (int)n, out);
}

/* The q quantile (0..1) of a histogram, in ms, interpolated in its bucket;
 * -1 without samples; the last finite bound when it falls past it. */
static double quantile_ms(const uint64_t *buckets, double q)
{
    uint64_t total = 0;
    for (int i = 0; i < MP_METRICS_BUCKETS; i++)
        total += buckets[i];
    if (!total)
        return -1;
    double want = q * (double)total, seen = 0;
    for (int i = 0; i < MP_METRICS_BUCKETS; i++) {
        if (seen + (double)buckets[i] >= want && buckets[i]) {
            double lo = i ? mp_metrics_bucket_bound(i - 1) : 0, hi = mp_metrics_bucket_bound(i);
            if (isinf(hi))
                return lo * 1000;
            return (lo + (hi - lo) * ((want - seen) / (double)buckets[i])) * 1000;
        }
        seen += (double)buckets[i];
    }
    return mp_metrics_bucket_bound(MP_METRICS_BUCKETS - 2) * 1000;
}

static void json_history(mp_strbuf_t *b, const uint32_t *ring, unsigned head)
{
    mp_strbuf_printf(b, "[");
    for (int i = GRAPH_SECONDS - 1; i >= 0; i--) /* oldest first */
        mp_strbuf_printf(b, "%s%u", i == GRAPH_SECONDS - 1 ? "" : ",",
                         ring[(head + MP_STATUS_SECONDS - (unsigned)i) % MP_STATUS_SECONDS]);
    mp_strbuf_printf(b, "]");
}

static void json_upstreams(mp_status_t *s, mp_strbuf_t *b, const mp_config_t *cfg)
{
    double now = mp_health_now();
    mp_strbuf_printf(b, ",\"upstreams\":[");
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        const mp_upstream_def_t *d = &cfg->upstreams[u];
        mp_strbuf_printf(b, "%s{\"name\":", u ? "," : "");
        json_str(b, d->name);
        mp_strbuf_printf(b, ",\"servers\":[");
        for (size_t k = 0; k < d->nservers; k++) {
            mp_peer_t *p = mp_peer_get(d->name, d->servers[k].addr.text);
            if (!p)
                continue;
            server_rate_t *r = rate_of(s, p);
            double open = p->open_until;
            mp_strbuf_printf(b, "%s{\"addr\":", k ? "," : "");
            json_str(b, p->addr);
            mp_strbuf_printf(b, ",\"name\":");
            json_str(b, d->servers[k].name);
            mp_strbuf_printf(b,
                             ",\"weight\":%d,\"state\":\"%s\",\"up\":%s,\"circuit\":\"%s\",\"in_flight\":%d,"
                             "\"latency_ms\":%.3f,\"rps\":%.1f,\"error_rate\":%.4f,\"requests\":%llu,\"failed\":%llu}",
                             mp_peer_weight(p, d->servers[k].weight), mp_peer_state(p, now),
                             mp_peer_healthy(p, now) && !p->ctl_drain ? "true" : "false",
                             open <= 0 ? "closed" : (now < open ? "open" : "half-open"), (int)p->active,
                             mp_peer_latency(p), r ? r->rps : 0, r ? r->err_rate : 0, (unsigned long long)p->requests,
                             (unsigned long long)p->failures);
        }
        mp_strbuf_printf(b, "]}");
    }
    mp_strbuf_printf(b, "]");
}

/* One route's entry: its totals now (t, or none yet), its recent rates and
 * history from the sampler (r, or none: not followed, or no sample yet). */
static void json_route(mp_status_t *s, mp_strbuf_t *b, const char *name, const mp_route_total_t *t, const series_t *r)
{
    static const uint32_t zeros[MP_STATUS_SECONDS];
    static const uint64_t none[MP_METRICS_BUCKETS];
    mp_strbuf_printf(b, "{\"name\":");
    json_str(b, name);
    const uint64_t *buckets = t ? t->buckets : none;
    mp_strbuf_printf(b,
                     ",\"requests\":%llu,\"errors\":%llu,\"rps\":%.2f,\"error_rate\":%.4f,\"p50_ms\":%.2f,"
                     "\"p99_ms\":%.2f,\"history\":{\"requests\":",
                     (unsigned long long)(t ? t->requests : 0), (unsigned long long)(t ? t->errors : 0), r ? r->rps : 0,
                     r ? r->err_rate : 0, quantile_ms(buckets, 0.5), quantile_ms(buckets, 0.99));
    json_history(b, r ? r->req : zeros, s->head);
    mp_strbuf_printf(b, ",\"errors\":");
    json_history(b, r ? r->err : zeros, s->head);
    mp_strbuf_printf(b, "}}");
}

/* The configuration's routes in their order, then names only the counters
 * know (_none: no route matched; a route a reload removed). */
static void json_routes(mp_status_t *s, mp_strbuf_t *b, const mp_config_t *cfg)
{
    int n;
    mp_worker_t *w = mp_reloader_workers(s->rl, &n);
    const mp_metrics_t *ms[64];
    if (n > 64)
        n = 64;
    for (int i = 0; i < n; i++)
        ms[i] = &w[i].io.metrics;
    mp_metrics_src_t src = {.workers = ms, .nworkers = n, .cfg = cfg};
    int nt = mp_metrics_route_totals(&src, s->totals, MP_ARRAY_LEN(s->totals));
    char shown[MP_ARRAY_LEN(s->totals)] = {0};
    mp_strbuf_printf(b, ",\"routes\":[");
    size_t nr = mp_router_count(cfg->router);
    int first = 1;
    for (size_t i = 0; i < nr; i++) {
        const char *name = mp_router_get(cfg->router, i)->name;
        const mp_route_total_t *t = NULL;
        for (int k = 0; k < nt; k++)
            if (strcmp(s->totals[k].name, name) == 0) {
                t = &s->totals[k];
                shown[k] = 1;
            }
        const series_t *r = NULL;
        for (int k = 0; k < s->nroutes; k++)
            if (strcmp(s->routes[k].name, name) == 0)
                r = &s->routes[k];
        mp_strbuf_printf(b, "%s", first ? "" : ",");
        first = 0;
        json_route(s, b, name, t, r);
    }
    for (int k = 0; k < nt; k++) {
        if (shown[k] || !s->totals[k].requests)
            continue;
        const series_t *r = NULL;
        for (int j = 0; j < s->nroutes; j++)
            if (strcmp(s->routes[j].name, s->totals[k].name) == 0)
                r = &s->routes[j];
        mp_strbuf_printf(b, "%s", first ? "" : ",");
        first = 0;
        json_route(s, b, s->totals[k].name, &s->totals[k], r);
    }
    mp_strbuf_printf(b, "]");
}

void mp_status_json(mp_status_t *s, mp_strbuf_t *b)
{
    const mp_config_t *cfg = mp_reloader_config(s->rl);
    int n;
    mp_worker_t *w = mp_reloader_workers(s->rl, &n);
    uint64_t conns = 0, idle = 0, tunnels = 0;
    for (int i = 0; i < n; i++) {
        conns += atomic_load_explicit(&w[i].io.metrics.conns, memory_order_relaxed);
        idle += atomic_load_explicit(&w[i].io.metrics.idle_up, memory_order_relaxed);
        tunnels += atomic_load_explicit(&w[i].io.metrics.tunnels, memory_order_relaxed);
    }
    note_reloads(s);
    mp_strbuf_printf(b, "{\"version\":\"%s\",\"time\":%.3f,\"uptime\":%.0f,\"workers\":%d,\"generation\":%llu,",
                     MP_VERSION, ev_time(), ev_time() - s->started, n, (unsigned long long)s->generation);
    mp_strbuf_printf(b, "\"reloads\":{\"ok\":%llu,\"refused\":%llu,\"last\":[", (unsigned long long)s->ok,
                     (unsigned long long)s->refused);
    for (int i = 0; i < s->nreloads; i++)
        mp_strbuf_printf(b, "%s{\"generation\":%llu,\"at\":%.3f,\"result\":\"%s\"}", i ? "," : "",
                         (unsigned long long)s->reloads[i].generation, s->reloads[i].at,
                         s->reloads[i].ok ? "ok" : "refused");
    mp_strbuf_printf(b, "]},\"listeners\":[");
    for (size_t i = 0; i < cfg->nlistens; i++) {
        mp_strbuf_printf(b, "%s{\"addr\":", i ? "," : "");
        json_str(b, cfg->listens[i].text);
        mp_strbuf_printf(b, ",\"tls\":%s}", cfg->listen_tls && cfg->listen_tls[i] ? "true" : "false");
    }
    mp_strbuf_printf(b, "],\"connections\":{\"client\":%llu,\"upstream_idle\":%llu,\"tunnels\":%llu}",
                     (unsigned long long)conns, (unsigned long long)idle, (unsigned long long)tunnels);
    json_upstreams(s, b, cfg);
    json_routes(s, b, cfg);
    mp_strbuf_printf(b, ",\"history_seconds\":%d}\n", GRAPH_SECONDS);
}

/* ---- GET / ---- */

static const char page[] =
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    "<title>moonproxy status</title>\n<style>\n"
    "body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d232b}\n"
    "h1{font-size:18px;margin:0 0 8px}h2{font-size:15px;margin:16px 0 6px}\n"
    ".meta{color:#5a6472;font-size:13px}.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;"
    "padding:8px;margin-bottom:10px;overflow-x:auto}\n"
    "table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 6px;border-bottom:1px solid "
    "#eef0f3;white-space:nowrap}th{font-weight:600;color:#5a6472;font-size:12px}\n"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}.up{color:#147a3d}.down{color:#b3261e;"
    "font-weight:600}\n.graphs{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}\n"
    "svg{width:100%;height:60px;display:block}.err{color:#b3261e}\n"
    "</style></head><body>\n<h1>moonproxy</h1><div class=\"meta\" id=\"meta\">loading&hellip;</div>\n"
    "<h2>Upstreams</h2><div class=\"card\"><table id=\"upstreams\"><thead><tr><th>upstream</th><th>server</th>"
    "<th>state</th><th>circuit</th><th>in flight</th><th>latency</th><th>req/s</th><th>errors</th></tr></thead>"
    "<tbody></tbody></table></div>\n"
    "<h2>Routes</h2><div class=\"card\"><table id=\"routes\"><thead><tr><th>route</th><th>req/s</th>"
    "<th>errors</th><th>p50</th><th>p99</th><th>requests</th></tr></thead><tbody></tbody></table></div>\n"
    "<h2>Last two minutes</h2><div class=\"graphs\" id=\"graphs\"></div>\n"
    "<h2>Reloads</h2><div class=\"card\"><table id=\"reloads\"><thead><tr><th>generation</th><th>when</th>"
    "<th>result</th></tr></thead><tbody></tbody></table></div>\n"
    "<script>\n"
    "'use strict';\n"
    "function el(t,c,x){const e=document.createElement(t);if(c)e.className=c;if(x!==undefined)e.textContent=x;"
    "return e}\n"
    "function row(tb,cells){const tr=document.createElement('tr');for(const c of cells){const td=el('td',c[1]||'',"
    "c[0]);tr.appendChild(td)}tb.appendChild(tr);return tr}\n"
    "function pct(x){return (100*x).toFixed(x>0&&x<0.001?3:1)+'%'}\n"
    "function ms(x){return x<0?'-':x.toFixed(x<10?2:0)+' ms'}\n"
    "function spark(name,req,err){const w=300,h=60,n=req.length,m=Math.max(1,...req);"
    "const pts=a=>a.map((v,i)=>(i*w/(n-1)).toFixed(1)+','+(h-2-v*(h-4)/m).toFixed(1)).join(' ');"
    "const d=el('div','card');d.appendChild(el('div','',name+' \\u2014 max '+m+' req/s'));"
    "const ns='http://www.w3.org/2000/svg',s=document.createElementNS(ns,'svg');"
    "s.setAttribute('viewBox','0 0 '+w+' '+h);s.setAttribute('preserveAspectRatio','none');"
    "for(const [a,col] of [[req,'#2f6fdb'],[err,'#b3261e']]){const p=document.createElementNS(ns,'polyline');"
    "p.setAttribute('points',pts(a));p.setAttribute('fill','none');p.setAttribute('stroke',col);"
    "p.setAttribute('stroke-width','1.5');s.appendChild(p)}d.appendChild(s);return d}\n"
    "function draw(st){document.getElementById('meta').textContent='moonproxy '+st.version+' \\u00b7 '+st.workers+"
    "' workers \\u00b7 generation '+st.generation+' \\u00b7 up '+Math.round(st.uptime)+' s \\u00b7 '+"
    "st.connections.client+' client connections, '+st.connections.upstream_idle+' idle upstream, '+"
    "st.connections.tunnels+' tunnels \\u00b7 listening on '+st.listeners.map(l=>l.addr+(l.tls?' (TLS)':'')).join"
    "(', ');\n"
    "let tb=document.querySelector('#upstreams tbody');tb.textContent='';\n"
    "for(const u of st.upstreams)for(const s of u.servers)row(tb,[[u.name],[s.name===s.addr?s.addr:s.name+' '+"
    "s.addr],[s.state,s.up?'up':'down'],[s.circuit],[s.in_flight,'n'],[s.latency_ms.toFixed(1)+' ms',"
    "'n'],[s.rps.toFixed(1),'n'],[pct(s.error_rate),s.error_rate>0?'n err':'n']]);\n"
    "tb=document.querySelector('#routes tbody');tb.textContent='';\n"
    "for(const r of st.routes)row(tb,[[r.name],[r.rps.toFixed(1),'n'],[pct(r.error_rate),r.error_rate>0?'n err':"
    "'n'],[ms(r.p50_ms),'n'],[ms(r.p99_ms),'n'],[r.requests,'n']]);\n"
    "const g=document.getElementById('graphs');g.textContent='';\n"
    "for(const r of st.routes)g.appendChild(spark(r.name,r.history.requests,r.history.errors));\n"
    "tb=document.querySelector('#reloads tbody');tb.textContent='';\n"
    "for(const r of st.reloads.last)row(tb,[[r.generation,'n'],[new Date(r.at*1000).toLocaleString()],[r.result,"
    "r.result==='ok'?'up':'down']]);\n"
    "if(!st.reloads.last.length)row(tb,[['none since start']])}\n"
    "async function refresh(){try{const r=await fetch('status',{cache:'no-store'});draw(await r.json())}"
    "catch(e){document.getElementById('meta').textContent='cannot read /status: '+e}}\n"
    "refresh();setInterval(refresh,2000);\n"
    "</script></body></html>\n";

const char *mp_status_page(size_t *len)
{
    *len = sizeof(page) - 1;
    return page;
}
