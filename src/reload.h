/* reload.h: the main thread's side of configuration generations (gen.h):
 * the script's history, building and validating every worker's new
 * generation (VM and config), and handing them over only when all of them
 * loaded: a refused script changes nothing anywhere. Each worker installs
 * what it was handed and drains the old one (worker.h). */
#ifndef MP_RELOAD_H
#define MP_RELOAD_H

#include "config.h"
#include "gen.h"
#include "strbuf.h"
#include "worker.h"

#include <ev.h>
#include <stdint.h>

/* Main thread: the configuration's history and the hand-over to workers. */
typedef struct mp_reloader mp_reloader_t;

/* Called when a reload ended: err NULL on success (generation set). */
typedef void (*mp_reload_cb)(void *arg, uint64_t generation, const char *err);

/* Checks a script that loaded and declares proxy.expect guards (main.c
 * runs them in a simulator): 0, or nonzero with the reason in err. */
typedef int (*mp_reload_validate_cb)(void *arg, const char *path, const char *text, size_t len, char *err,
                                     size_t errlen);

/* Creates the reloader for path and builds generation 1 for nworkers
 * workers (installed before they start); every build of the script that
 * declares guards must also pass validate (NULL: none). Returns NULL with
 * err set. */
mp_reloader_t *mp_reloader_new(const char *path, mp_worker_t *workers, int nworkers, mp_reload_validate_cb validate,
                               void *validate_arg, char *err, size_t errlen);

/* Starts watching the script (settings.watch) and listening for worker
 * acknowledgements on loop. */
void mp_reloader_start(mp_reloader_t *rl, struct ev_loop *loop);

/* Re-reads the script (rollback: the previous generation's text), builds
 * and validates it for every worker, hands it over, and calls cb once every
 * worker runs it, or at once with the error. reason is logged. */
void mp_reload(mp_reloader_t *rl, int rollback, const char *reason, mp_reload_cb cb, void *arg);

/* Rebuilds the running generation from the text it was built from (never
 * the file on disk: edits not reloaded yet stay out), for what changed
 * outside the script: upstream names' DNS answers (resolve.h). The history
 * (rollback) and the reload counts are left as they are. reason is logged.
 * Returns 0 when the new generation was handed over, nonzero when refused. */
int mp_reload_refresh(mp_reloader_t *rl, const char *reason);

/* POST /reload?dry_run=1: reads the script, loads and checks it as a reload
 * would (guards included) without handing anything over, and returns what
 * would change as JSON (malloc'd, *len set): {"dry_run", "generation" (the
 * running one, unchanged), "changes" (a count), "diff" (mp_config_diff's),
 * "summary"}. NULL with the reason ("file:line: message") in err when the
 * script is refused. */
char *mp_reload_preview(mp_reloader_t *rl, size_t *len, char *err, size_t errlen);

/* What changes from old to new (built in the VMs old_L and new_L, which
 * tell their plugins; NULL: plugins not compared): json gets an object with
 * "routes", "upstreams", "servers" ("upstream addr"), "plugins" ("name", or
 * "name on ROUTE"; changed: its options), "certificates" ("sha256 name")
 * and "settings", each {"added": [...], "removed": [...], "changed": [...]}
 * (a changed route or upstream is {"name", "fields"}), "restart_required"
 * (changed settings a reload does not apply: listen, admin, access_log,
 * error_log, workers, body_buffer_size) and "changes" (the count);
 * summary gets the same on one line ("no changes" when nothing changed).
 * Hooks and handlers are Lua functions: not compared. Returns the count. */
int mp_config_diff(const mp_config_t *old, lua_State *old_L, const mp_config_t *new, lua_State *new_L,
                   mp_strbuf_t *json, mp_strbuf_t *summary);

/* Called on the main thread with the new configuration after each
 * accepted reload (active health checks follow it). */
void mp_reloader_on_config(mp_reloader_t *rl, void (*fn)(void *arg, const mp_config_t *cfg), void *arg);

/* The current configuration as the main thread sees it (for /configz). */
const mp_config_t *mp_reloader_config(const mp_reloader_t *rl);
uint64_t mp_reloader_generation(const mp_reloader_t *rl);
double mp_reloader_loaded_at(const mp_reloader_t *rl);
/* The workers (for GET /metrics), and how many reloads (rollbacks included)
 * were accepted and refused since start. */
mp_worker_t *mp_reloader_workers(const mp_reloader_t *rl, int *n);
void mp_reloader_counts(const mp_reloader_t *rl, uint64_t *ok, uint64_t *refused);

void mp_reloader_free(mp_reloader_t *rl);

#endif
