/* metrics.h: per-worker request counters, written by their worker only and
 * summed by the main thread on a scrape of GET /metrics (Prometheus text
 * format 0.0.4). The hot path takes no lock, does no malloc and no atomic
 * read-modify-write: a relaxed store of load + 1 (a plain add on x86). */
#ifndef MP_METRICS_H
#define MP_METRICS_H

#include "common.h"
#include "config.h"

#include <stdatomic.h>
#include <stdint.h>

#define MP_METRICS_ROUTES 1024    /* route names per worker; the last slot is "_other" */
#define MP_METRICS_CODES 16       /* distinct statuses per route; then status="other" */
#define MP_METRICS_BUCKETS 12     /* histogram buckets, the last one +Inf */
#define MP_METRICS_NONE "_none"   /* route label of requests no route matched */
#define MP_METRICS_OTHER "_other" /* route label past MP_METRICS_ROUTES names */

/* The counters of one route name in one worker. Published once complete,
 * never moved nor freed while the worker runs. */
typedef struct mp_route_stats {
    char *name;                                     /* owned; immutable once published */
    _Atomic uint16_t codes[MP_METRICS_CODES];       /* status of each slot; 0: free */
    _Atomic uint64_t by_code[MP_METRICS_CODES + 1]; /* last: any other status */
    _Atomic uint64_t buckets[MP_METRICS_BUCKETS];   /* per bucket, not cumulative */
    _Atomic double sum;                             /* seconds */
} mp_route_stats_t;

/* How a TLS handshake ended (moonproxy_tls_handshakes_total{result}). */
enum mp_tls_result { MP_TLS_FULL, MP_TLS_RESUMED, MP_TLS_FAILED, MP_TLS_RESULTS };

/* Why tunnels closed (req.h mp_tunnel_close), counted apart. */
#define MP_METRICS_TUNNEL_REASONS 5

/* A worker's counters; a zeroed struct is a valid empty one. */
typedef struct {
    mp_route_stats_t *routes[MP_METRICS_ROUTES]; /* [0, nroutes) published */
    _Atomic size_t nroutes;                      /* stored with release after routes[n] */
    mp_route_stats_t *none;                      /* the worker's "_none" entry, cached */
    _Atomic uint64_t conns;                      /* open client connections */
    _Atomic uint64_t idle_up;                    /* idle pooled upstream connections */
    _Atomic uint64_t tls[2][MP_TLS_RESULTS];     /* TLS handshakes: [0] of clients, [1] to upstreams */
    _Atomic uint64_t tunnels;                    /* open tunnels (also counted in conns) */
    _Atomic uint64_t tunnel_bytes[2];            /* relayed by tunnels: [0] to upstreams, [1] to clients */
    _Atomic uint64_t tunnels_closed[MP_METRICS_TUNNEL_REASONS]; /* by reason */
} mp_metrics_t;

/* Worker side: the entry of a route name (NULL: no route matched), created
 * on first use (the "_other" one past capacity; NULL only when out of
 * memory). Callers cache it per route and generation. */
mp_route_stats_t *mp_metrics_route(mp_metrics_t *m, const char *name);

/* Worker side: counts one finished request (status sent, duration in
 * seconds). s may be NULL (out of memory): nothing is counted. */
void mp_metrics_request(mp_route_stats_t *s, int status, double duration);

/* Frees the entries; only once the worker stopped. */
void mp_metrics_dispose(mp_metrics_t *m);

/* What a scrape reads besides the workers' counters (main thread). */
typedef struct {
    const mp_metrics_t *const *workers; /* one per worker */
    int nworkers;
    const mp_config_t *cfg; /* current: which servers are reported */
    uint64_t generation, reloads_ok, reloads_refused;
} mp_metrics_src_t;

/* One route name's counters summed over the workers (the status page). */
typedef struct {
    char name[64];                        /* cut to fit */
    uint64_t requests;                    /* answered, every status */
    uint64_t errors;                      /* of them 5xx */
    uint64_t buckets[MP_METRICS_BUCKETS]; /* durations, per bucket (not cumulative) */
} mp_route_total_t;

/* Main thread: every route name's totals (at most max, by name). Returns
 * the count, or -1 when out of memory. */
int mp_metrics_route_totals(const mp_metrics_src_t *src, mp_route_total_t *out, size_t max);

/* The upper bound in seconds of histogram bucket i (INFINITY for the last). */
double mp_metrics_bucket_bound(int i);

/* Main thread: the Prometheus text of everything, malloc'd (*len set), or
 * NULL when out of memory. The caller frees it. */
char *mp_metrics_render(const mp_metrics_src_t *src, size_t *len);

/* Worker side gauges: a relaxed store, read by the scrape. */
static inline void mp_metrics_add(_Atomic uint64_t *g, int64_t d)
{
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + (uint64_t)d, memory_order_relaxed);
}

#endif
