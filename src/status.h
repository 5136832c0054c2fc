/* status.h: the admin port's status page (SPEC "Operations"): GET / is one
 * HTML page with no external assets that redraws itself from GET /status
 * (JSON) every two seconds: upstreams and their servers, routes with their
 * rates and latency quantiles, reloads, listeners and connections, and
 * graphs of each route's requests and errors per second over the last
 * minutes, which a one-second sampler keeps in fixed memory. Main thread
 * only (admin.c serves it). */
#ifndef MP_STATUS_H
#define MP_STATUS_H

#include "reload.h"
#include "strbuf.h"

#include <ev.h>

/* Seconds of history kept per route, and routes followed (by name, the
 * first seen; the others count in the totals only). */
#define MP_STATUS_SECONDS 300
#define MP_STATUS_ROUTES 32

typedef struct mp_status mp_status_t;

/* Starts sampling the workers' counters once a second on loop. NULL when
 * out of memory. */
mp_status_t *mp_status_start(struct ev_loop *loop, mp_reloader_t *rl);

void mp_status_free(mp_status_t *s);

/* GET /status: the JSON the page draws (appended to b). */
void mp_status_json(mp_status_t *s, mp_strbuf_t *b);

/* GET /: the page (static text). */
const char *mp_status_page(size_t *len);

#endif
