/* health.h: the state of every upstream server, shared by all workers of the
 * process through atomics (SPEC "Balancers"): in-flight requests, latency,
 * the active checks' verdict and the passive circuit breaker (closed → open
 * for `cooldown` after `failures` consecutive failures → half-open: one
 * trial request decides). Keyed by upstream name and address, so the state
 * outlives a reload that keeps the server. */
#ifndef MP_HEALTH_H
#define MP_HEALTH_H

#include "common.h"

#include <stdint.h>

#define MP_PEER_CLASSES 6 /* attempts by response status 1xx..5xx, then none (error) */

typedef struct mp_peer {
    char *upstream;                             /* upstream name */
    char *addr;                                 /* "host:port" */
    _Atomic int active;                         /* requests in flight, all workers */
    _Atomic int probe_up;                       /* the active checks' verdict (1 when none run) */
    _Atomic int fails;                          /* consecutive passive failures */
    _Atomic double open_until;                  /* circuit open until (mp_health_now); 0: closed */
    _Atomic int trial;                          /* half-open: a trial request is in flight */
    _Atomic uint64_t latency_bits;              /* EWMA of response latency in ms, a double's bits */
    _Atomic uint64_t requests, failures;        /* totals, for /upstreams and metrics */
    _Atomic uint64_t by_class[MP_PEER_CLASSES]; /* attempts by outcome, for metrics */
    _Atomic int ctl_drain;                      /* operator: no new requests (in-flight ones finish) */
    _Atomic int ctl_down;                       /* operator: as if the checks said down */
    _Atomic int ctl_weight;                     /* operator: the weight balancers use; 0: the configuration's */
    _Atomic int ctl_by;                         /* who set the above: enum mp_ctl_by */
    struct mp_peer *next;                       /* the registry */
} mp_peer_t;

/* How a request to a peer ended, for passive accounting. */
enum mp_outcome {
    MP_OUT_OK,      /* a response that is not a failure status */
    MP_OUT_FAIL,    /* connect error, timeout, reset, or a failure status (502/503/504 by default) */
    MP_OUT_NEUTRAL, /* the client went away, or a retry elsewhere: counts neither way */
};

/* Passive check parameters of one upstream (SPEC `passive`). */
typedef struct {
    int failures;    /* consecutive failures that open the circuit; 0: never */
    double cooldown; /* seconds it stays open */
} mp_passive_t;

/* Who set a server's operator control (mp_peer_t.ctl_*). */
enum mp_ctl_by { MP_CTL_NONE, MP_CTL_ADMIN, MP_CTL_TESTING };

#define MP_CTL_WEIGHT_MAX 1000 /* as a configured weight */

/* A change of operator control: each field -1 leaves it as it is; reset
 * first clears them all (back to the configuration and the checks). */
typedef struct {
    int drain, down, weight, reset;
} mp_peer_ctl_t;

#define MP_PEER_CTL_NONE ((mp_peer_ctl_t){-1, -1, -1, 0})

/* The process-wide peer for (upstream, addr), created on first use; never
 * freed before mp_health_close_all(). NULL when out of memory. Thread-safe. */
mp_peer_t *mp_peer_get(const char *upstream, const char *addr);

/* Monotonic seconds (CLOCK_MONOTONIC). */
double mp_health_now(void);

/* Whether a balancer may be given the peer now. A half-open peer is
 * available to one request only: the caller that gets 1 with *trial set owns
 * the trial and must report its outcome. */
int mp_peer_available(mp_peer_t *p, double now, int *trial);

/* Accounting around one attempt: begin counts it in flight and done takes
 * it out; result (once per attempt, when its fate is known: the response
 * head, or a failure) applies the outcome (latency_ms < 0: unknown). Opening
 * the circuit is logged once, with the reason. */
void mp_peer_begin(mp_peer_t *p);
void mp_peer_result(mp_peer_t *p, enum mp_outcome out, double latency_ms, int trial, const mp_passive_t *pc,
                    const char *reason);
void mp_peer_done(mp_peer_t *p);

/* Counts an attempt whose outcome is known under its response status's class
 * (status 0: no response: connect failure, reset, timeout). The peer is
 * shared by the workers: one relaxed atomic add. */
void mp_peer_count(mp_peer_t *p, int status);

/* Reads, for balancers and /upstreams. */
static inline double mp_peer_latency(const mp_peer_t *p)
{
    union {
        uint64_t u;
        double d;
    } v = {.u = p->latency_bits};
    return v.d;
}

int mp_peer_healthy(mp_peer_t *p, double now); /* up by the checks (and the operator), the circuit not open */

/* Applies an operator's change (by: enum mp_ctl_by), logging one info line
 * when anything changed. All workers see it at their next pick. */
void mp_peer_control(mp_peer_t *p, const mp_peer_ctl_t *c, int by);

/* The weight balancers use: the operator's, else the configuration's. */
static inline int mp_peer_weight(const mp_peer_t *p, int configured)
{
    int w = p->ctl_weight;
    return w > 0 ? w : configured;
}

/* "up", "down" (checks or operator), "draining" or "circuit open": for /upstreams. */
const char *mp_peer_state(mp_peer_t *p, double now);
const char *mp_ctl_by_name(int by); /* "admin", "testing", or NULL */

/* After a reload: clears the operator control of every server that the
 * new configuration no longer has (keep(arg, upstream, addr) says which
 * stay), so that a server added back later starts from its configuration. */
void mp_health_forget_control(int (*keep)(void *arg, const char *upstream, const char *addr), void *arg);

/* Walks every peer (for /upstreams and metrics). */
void mp_health_each(void (*fn)(mp_peer_t *p, void *arg), void *arg);

void mp_health_close_all(void);

#endif
