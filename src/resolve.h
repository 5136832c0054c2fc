/* resolve.h: upstream servers by DNS name (SPEC "Upstreams by name"): one
 * process-wide cache name -> addresses on c-ares, filled by the blocking
 * lookups of configuration builds (never on a worker loop: builds run on the
 * main thread and its build threads) and kept current by a watch on the main
 * thread's loop that re-resolves each name at its record's TTL and says when
 * an answer changed (the reloader then rebuilds the running script). */
#ifndef MP_RESOLVE_H
#define MP_RESOLVE_H

#include "config.h"

#include <ev.h>

/* An mp_config_resolve_fn (config.h), installed with mp_config_set_resolver
 * by the server and the Lua module: host's addresses (no port), sorted, from
 * the cache when the watch keeps the name or the answer is a few seconds
 * old, else looked up at once (settings.resolver's hosts file first, then
 * DNS; at most r->timeout seconds). Every build of one generation sees the
 * same answer. */
int mp_resolve_lookup(const mp_resolver_def_t *r, const char *host, mp_sockaddr_t *out, int max, char *err,
                      size_t errlen);

typedef struct mp_resolve_watch mp_resolve_watch_t;

/* Called on the loop when a name's addresses changed (the cache holds the
 * new answer); why says which name. Returns 0 when the running configuration
 * took them; otherwise the call is made again after the name's next answer. */
typedef int (*mp_resolve_changed_cb)(void *arg, const char *why);

mp_resolve_watch_t *mp_resolve_watch_new(struct ev_loop *loop, mp_resolve_changed_cb changed, void *arg);

/* Follows the names cfg's upstreams use (resolve = { min, max } bounds each
 * one's TTL); names it no longer uses are forgotten. */
void mp_resolve_watch_sync(mp_resolve_watch_t *w, const mp_config_t *cfg);

void mp_resolve_watch_free(mp_resolve_watch_t *w);

/* For call-out URLs, on a worker's loop. A fresh answer for host from the
 * process-wide cache (within its record's TTL, bounded to 1..300 s, or one
 * the watch keeps): up to max addresses into out, their count; 0 when there
 * is none. */
int mp_resolve_cached(const mp_resolver_def_t *r, const char *host, mp_sockaddr_t *out, int max);

/* Looks host up without blocking (r's hosts file first, then DNS through
 * c-ares on loop, at most r->timeout seconds); the answer goes into the
 * cache. cb runs once, from the loop (never inside mp_resolve_start), with
 * the addresses (sorted; port 0) or err, unless the query is cancelled
 * first. r must outlive the query. NULL when out of memory. */
typedef struct mp_resolve_query mp_resolve_query_t;
typedef void (*mp_resolve_cb)(void *arg, const mp_sockaddr_t *addrs, int n, const char *err);
mp_resolve_query_t *mp_resolve_start(struct ev_loop *loop, const mp_resolver_def_t *r, const char *host,
                                     mp_resolve_cb cb, void *arg);
void mp_resolve_cancel(mp_resolve_query_t *q);

#endif
