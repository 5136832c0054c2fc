/* admin.h: the admin port (SPEC "Admin port"), served by the main thread:
 * GET /live, GET /ready, GET /configz, POST /reload, POST /rollback. One
 * request per connection; never on the proxy's listeners. */
#ifndef MP_ADMIN_H
#define MP_ADMIN_H

#include "config.h"
#include "reload.h"

#include <ev.h>

typedef struct mp_admin mp_admin_t;

/* Listens on addr with loop. *ready tells /ready (non-zero: ready), *stuck
 * /live (non-zero: workers stuck in a hook, 503). Returns NULL with err set
 * when the port cannot be opened. */
mp_admin_t *mp_admin_start(struct ev_loop *loop, mp_addr_t *addr, mp_reloader_t *rl, const int *ready, const int *stuck,
                           char *err, size_t errlen);

void mp_admin_free(mp_admin_t *a);

#endif
