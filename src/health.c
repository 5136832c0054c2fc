/* health.c: the process-wide state of upstream servers: in-flight counts,
 * latency, and the passive circuit breaker, read and written by every
 * worker through atomics; the registry itself is guarded by a mutex and
 * only touched when a configuration is installed. */
#include "health.h"

#include "log.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EWMA_ALPHA 0.3 /* weight of the newest latency sample */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static mp_peer_t *registry;

double mp_health_now(void)
{
    return mp_now();
}

mp_peer_t *mp_peer_get(const char *upstream, const char *addr)
{
    pthread_mutex_lock(&registry_lock);
    mp_peer_t *p = registry;
    while (p && (strcmp(p->upstream, upstream) != 0 || strcmp(p->addr, addr) != 0))
        p = p->next;
    if (!p && (p = calloc(1, sizeof(*p)))) {
        p->upstream = strdup(upstream);
        p->addr = strdup(addr);
        if (!p->upstream || !p->addr) {
            free(p->upstream);
            free(p->addr);
            free(p);
            p = NULL;
        } else {
            p->probe_up = 1;
            p->next = registry;
            registry = p;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    return p;
}

int mp_peer_healthy(mp_peer_t *p, double now)
{
    return p->probe_up && !p->ctl_down && !(p->open_until > 0 && now < p->open_until);
}

const char *mp_peer_state(mp_peer_t *p, double now)
{
    if (!p->probe_up || p->ctl_down)
        return "down";
    if (p->ctl_drain)
        return "draining";
    return p->open_until > 0 && now < p->open_until ? "circuit open" : "up";
}

const char *mp_ctl_by_name(int by)
{
    return by == MP_CTL_ADMIN ? "admin" : by == MP_CTL_TESTING ? "testing" : NULL;
}

void mp_peer_control(mp_peer_t *p, const mp_peer_ctl_t *c, int by)
{
    int drain = p->ctl_drain, down = p->ctl_down, weight = p->ctl_weight;
    int ndrain = c->reset ? 0 : drain, ndown = c->reset ? 0 : down, nweight = c->reset ? 0 : weight;
    if (c->drain >= 0)
        ndrain = c->drain != 0;
    if (c->down >= 0)
        ndown = c->down != 0;
    if (c->weight >= 0)
        nweight = c->weight;
    p->ctl_drain = ndrain;
    p->ctl_down = ndown;
    p->ctl_weight = nweight;
    p->ctl_by = ndrain || ndown || nweight ? by : MP_CTL_NONE;
    if ((ndrain == drain && ndown == down && nweight == weight) || by == MP_CTL_TESTING)
        return; /* the simulator's changes are the test's own: not logged */
    char w[32] = "configured";
    if (nweight > 0)
        snprintf(w, sizeof(w), "%d", nweight);
    mp_log_info("upstream %s server %s: set by %s: drain %s, down %s, weight %s", p->upstream, p->addr,
                mp_ctl_by_name(by) ? mp_ctl_by_name(by) : "?", ndrain ? "on" : "off", ndown ? "on" : "off", w);
}

void mp_health_forget_control(int (*keep)(void *arg, const char *upstream, const char *addr), void *arg)
{
    pthread_mutex_lock(&registry_lock);
    for (mp_peer_t *p = registry; p; p = p->next)
        if ((p->ctl_drain || p->ctl_down || p->ctl_weight) && !keep(arg, p->upstream, p->addr)) {
            p->ctl_drain = p->ctl_down = p->ctl_weight = 0;
            p->ctl_by = MP_CTL_NONE;
            mp_log_info("upstream %s server %s: removed by the reload, its operator control is forgotten", p->upstream,
                        p->addr);
        }
    pthread_mutex_unlock(&registry_lock);
}

int mp_peer_available(mp_peer_t *p, double now, int *trial)
{
    *trial = 0;
    if (!p->probe_up)
        return 0;
    double until = p->open_until;
    if (until <= 0)
        return 1;
    if (now < until)
        return 0;
    /* Half-open: the cooldown is over, one request may try it. */
    int expected = 0;
    if (!atomic_compare_exchange_strong(&p->trial, &expected, 1))
        return 0;
    *trial = 1;
    return 1;
}

void mp_peer_begin(mp_peer_t *p)
{
    p->active++;
    p->requests++;
}

static void update_latency(mp_peer_t *p, double ms)
{
    union {
        uint64_t u;
        double d;
    } old, new;
    old.u = p->latency_bits;
    do {
        new.d = old.d > 0 ? old.d + EWMA_ALPHA *(ms - old.d) : ms;
    } while (!atomic_compare_exchange_weak(&p->latency_bits, &old.u, new.u));
}

void mp_peer_done(mp_peer_t *p)
{
    p->active--;
}

void mp_peer_count(mp_peer_t *p, int status)
{
    int k = status >= 100 && status < 600 ? status / 100 - 1 : MP_PEER_CLASSES - 1;
    atomic_fetch_add_explicit(&p->by_class[k], 1, memory_order_relaxed);
}

void mp_peer_result(mp_peer_t *p, enum mp_outcome out, double latency_ms, int trial, const mp_passive_t *pc,
                    const char *reason)
{
    if (latency_ms >= 0 && out != MP_OUT_NEUTRAL)
        update_latency(p, latency_ms);
    if (out == MP_OUT_NEUTRAL) {
        if (trial)
            p->trial = 0; /* nothing learned: the next request tries again */
        return;
    }
    if (out == MP_OUT_OK) {
        p->fails = 0;
        if (trial || p->open_until > 0) {
            if (p->open_until > 0)
                mp_log_warn("upstream %s server %s: trial request succeeded, back in rotation", p->upstream, p->addr);
            p->open_until = 0;
            p->trial = 0;
        }
        return;
    }
    p->failures++;
    int fails = ++p->fails;
    if (pc->failures <= 0)
        return;
    if (trial) {
        p->open_until = mp_health_now() + pc->cooldown;
        p->trial = 0;
        mp_log_warn("upstream %s server %s: trial request failed (%s), ejected for another %gs", p->upstream, p->addr,
                    reason, pc->cooldown);
        return;
    }
    if (fails == pc->failures) {
        p->open_until = mp_health_now() + pc->cooldown;
        mp_log_warn("upstream %s server %s: ejected for %gs after %d consecutive failures (last: %s)", p->upstream,
                    p->addr, pc->cooldown, fails, reason);
    }
}

void mp_health_each(void (*fn)(mp_peer_t *p, void *arg), void *arg)
{
    pthread_mutex_lock(&registry_lock);
    for (mp_peer_t *p = registry; p; p = p->next)
        fn(p, arg);
    pthread_mutex_unlock(&registry_lock);
}

void mp_health_close_all(void)
{
    pthread_mutex_lock(&registry_lock);
    while (registry) {
        mp_peer_t *p = registry;
        registry = p->next;
        free(p->upstream);
        free(p->addr);
        free(p);
    }
    pthread_mutex_unlock(&registry_lock);
}
