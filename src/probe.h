/* probe.h: active health checks (SPEC `health`), run by the main thread
 * off the request path: every `interval` each server of an upstream with a
 * `health` table gets `GET path` (over TLS, with the upstream's verification,
 * when it has `tls`); `fall` failed probes in a row mark it down
 * for every worker (mp_peer_t.probe_up), `rise` good ones bring it back.
 * Probes start spread over the first interval, so a restart does not burst. */
#ifndef MP_PROBE_H
#define MP_PROBE_H

#include "config.h"

#include <ev.h>

typedef struct mp_probes mp_probes_t;

mp_probes_t *mp_probes_new(struct ev_loop *loop);

/* Makes the probes match cfg (at start and after each reload): servers that
 * stay keep their probe and its counts; new ones start; gone ones stop (and
 * their peer is marked up again, as without checks). */
void mp_probes_sync(mp_probes_t *pr, const mp_config_t *cfg);

void mp_probes_free(mp_probes_t *pr);

#endif
