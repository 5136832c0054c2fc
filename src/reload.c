/* reload.c: configuration generations, the main thread's side: built and
 * validated for every worker, handed over (each worker installs and drains
 * them: worker.c), the script's history and settings.watch. */
#include "reload.h"

#include "health.h"
#include "l_http.h"
#include "l_redis.h"
#include "log.h"
#include "vm.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>

#define MAX_WATCHED 64
#define WATCH_SECONDS 1.0

/* A file settings.watch follows, and how it looked. */
typedef struct {
    char *path;
    struct stat seen;
} watched_t;

typedef struct waiter {
    uint64_t generation;
    mp_reload_cb cb;
    void *arg;
    struct waiter *next;
} waiter_t;

struct mp_reloader {
    char *path;
    mp_worker_t *workers;
    int nworkers;
    char *text, *prev_text; /* the scripts of the current and the previous generation */
    size_t len, prev_len;
    uint64_t generation;
    uint64_t reloads_ok, reloads_refused; /* mp_reload() calls, rollbacks included */
    double loaded_at;
    lua_State *L; /* the main thread's view of the current generation */
    mp_config_t *cfg;
    struct ev_loop *loop;
    ev_async ack;   /* a worker installed a generation */
    ev_timer watch; /* settings.watch: polls the script and the modules it required */
    watched_t files[MAX_WATCHED];
    int nfiles;
    waiter_t *waiters;
    mp_reload_validate_cb validate;
    void *validate_arg;
    void (*on_config)(void *arg, const mp_config_t *cfg);
    void *on_config_arg;
};

static double epoch_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (size_t k; buf && (k = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += k;
        if (n == cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger)
                free(buf);
            buf = bigger;
        }
    }
    fclose(f);
    if (!buf)
        snprintf(err, errlen, "%s: out of memory", path);
    *len = n;
    return buf;
}

typedef struct {
    const char *path, *text;
    size_t len;
    lua_State *L;
    mp_config_t *cfg;
    int rc;
    char err[1024];
} build_job_t;

static void *build_one(void *arg)
{
    build_job_t *j = arg;
    j->L = mp_vm_new();
    if (j->L) { /* a worker's VM: its hooks may call out */
        mp_l_http_preload(j->L);
        mp_l_redis_preload(j->L);
    }
    j->rc = j->L ? mp_config_load_text(j->L, j->path, j->text, j->len, &j->cfg, j->err, sizeof(j->err)) : MP_ENOMEM;
    if (!j->L)
        snprintf(j->err, sizeof(j->err), "out of memory");
    return NULL;
}

/* Builds n (VM, configuration) pairs from text, in parallel threads (the
 * VMs are independent until handed over); all or nothing. */
static int same_text(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int same_listens(const mp_config_t *old, const mp_config_t *new)
{
    int same = old->nlistens == new->nlistens;
    for (size_t i = 0; same && i < old->nlistens; i++)
        same = same_text(old->listens[i].text, new->listens[i].text);
    return same;
}

static int any_tls(const mp_config_t *cfg)
{
    for (size_t i = 0; cfg->listen_tls && i < cfg->nlistens; i++)
        if (cfg->listen_tls[i])
            return 1;
    return 0;
}

/* The open sockets stay until a restart and take the TLS of the listener
 * declared at their position: with TLS on either side, a changed list would
 * put one port's TLS (or none: plain HTTP on a mutual-TLS port) on another.
 * Such a reload is refused. */
static int listens_moved_under_tls(const mp_config_t *old, const mp_config_t *new, char *err, size_t errlen)
{
    if (!old || same_listens(old, new) || (!any_tls(old) && !any_tls(new)))
        return 0;
    snprintf(err, errlen,
             "%s: the listen addresses changed and TLS listeners are involved: restart to apply (a reload keeps "
             "the open sockets)",
             new->path ? new->path : "config");
    return 1;
}

static int build(const mp_reloader_t *rl, const char *text, size_t len, int n, lua_State **Ls, mp_config_t **cfgs,
                 char *err, size_t errlen)
{
    build_job_t *jobs = calloc((size_t)n, sizeof(*jobs));
    pthread_t *threads = calloc((size_t)n, sizeof(*threads));
    if (!jobs || !threads) {
        free(jobs);
        free(threads);
        snprintf(err, errlen, "out of memory");
        return MP_ENOMEM;
    }
    int started[n];
    for (int i = 0; i < n; i++) {
        jobs[i] = (build_job_t){.path = rl->path, .text = text, .len = len};
        started[i] = i > 0 && pthread_create(&threads[i], NULL, build_one, &jobs[i]) == 0;
    }
    build_one(&jobs[0]); /* one on this thread meanwhile */
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (started[i])
            pthread_join(threads[i], NULL);
        else if (i > 0)
            build_one(&jobs[i]);
        if (jobs[i].rc != 0 && rc == 0) {
            rc = MP_EINVAL;
            snprintf(err, errlen, "%s", jobs[i].err);
        }
    }
    /* proxy.expect guards: main's validate runs them apart (a simulator of
     * their own), so no worker's VM or balancer state is touched by them */
    if (rc == 0 && listens_moved_under_tls(rl->cfg, jobs[0].cfg, err, errlen))
        rc = MP_EINVAL;
    if (rc == 0 && jobs[0].cfg->nexpects && rl->validate &&
        rl->validate(rl->validate_arg, rl->path, text, len, err, errlen) != 0)
        rc = MP_EINVAL;
    for (int i = 0; i < n; i++) {
        Ls[i] = jobs[i].L;
        cfgs[i] = jobs[i].cfg;
        if (rc != 0) {
            mp_config_free(cfgs[i]);
            if (Ls[i])
                mp_vm_close(Ls[i]);
        }
    }
    free(jobs);
    free(threads);
    return rc;
}

static void hand_over(mp_worker_t *w, uint64_t id, lua_State *L, mp_config_t *cfg)
{
    MP_ASSERT(id > atomic_load(&w->installed));
    pthread_mutex_lock(&w->handover_lock);
    lua_State *old_L = w->next_L; /* a hand-over the worker has not taken yet is superseded */
    mp_config_t *old_cfg = w->next_cfg;
    w->next_L = L;
    w->next_cfg = cfg;
    w->next_id = id;
    pthread_mutex_unlock(&w->handover_lock);
    if (old_L) {
        mp_config_free(old_cfg);
        mp_vm_close(old_L);
    }
    ev_async_send(w->io.loop, &w->wake);
}

static int all_installed(const mp_reloader_t *rl, uint64_t generation)
{
    for (int i = 0; i < rl->nworkers; i++)
        if (rl->workers[i].installed < generation)
            return 0;
    return 1;
}

static void on_ack(struct ev_loop *loop, ev_async *a, int revents)
{
    (void)loop;
    (void)revents;
    mp_reloader_t *rl = container_of(a, mp_reloader_t, ack);
    for (waiter_t **p = &rl->waiters; *p;) {
        waiter_t *wt = *p;
        if (!all_installed(rl, wt->generation)) {
            p = &wt->next;
            continue;
        }
        *p = wt->next;
        if (wt->cb)
            wt->cb(wt->arg, wt->generation, NULL);
        free(wt);
    }
}

static int stat_changed(const struct stat *a, const struct stat *b)
{
    return a->st_ino != b->st_ino || a->st_size != b->st_size || a->st_mtim.tv_sec != b->st_mtim.tv_sec ||
           a->st_mtim.tv_nsec != b->st_mtim.tv_nsec;
}

/* A periodic stat of every watched file (nanosecond mtimes: an edit within
 * the same second is seen too). */
static void on_watch(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_reloader_t *rl = container_of(t, mp_reloader_t, watch);
    for (int i = 0; i < rl->nfiles; i++) {
        struct stat now;
        if (stat(rl->files[i].path, &now) != 0 || !stat_changed(&now, &rl->files[i].seen))
            continue;
        rl->files[i].seen = now;
        mp_log_info("watch: %s changed", rl->files[i].path);
        mp_reload(rl, 0, "a watched file changed (settings.watch)", NULL, NULL);
        return;
    }
}

static void unwatch(mp_reloader_t *rl)
{
    for (int i = 0; i < rl->nfiles; i++)
        free(rl->files[i].path);
    rl->nfiles = 0;
}

static void watch_file(mp_reloader_t *rl, const char *path)
{
    if (rl->nfiles == MAX_WATCHED)
        return;
    watched_t *f = &rl->files[rl->nfiles];
    if (!(f->path = strdup(path)))
        return;
    if (stat(path, &f->seen) != 0)
        memset(&f->seen, 0, sizeof(f->seen));
    rl->nfiles++;
}

/* settings.watch covers the script and the modules it required: their files
 * are found in the main thread's VM (package.loaded, package.searchpath),
 * leaving out moonproxy's own. */
static void watch_files(mp_reloader_t *rl)
{
    unwatch(rl);
    if (!rl->loop)
        return;
    if (!rl->cfg->settings.watch) {
        ev_timer_stop(rl->loop, &rl->watch);
        return;
    }
    watch_file(rl, rl->path);
    lua_State *L = rl->L;
    const char *ours = mp_vm_lua_dir();
    int top = lua_gettop(L);
    lua_getglobal(L, "package");
    lua_getfield(L, top + 1, "loaded");
    lua_getfield(L, top + 1, "searchpath");
    lua_getfield(L, top + 1, "path");
    for (lua_pushnil(L); lua_next(L, top + 2); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isfunction(L, top + 3))
            continue;
        lua_pushvalue(L, top + 3);
        lua_pushvalue(L, -3);
        lua_pushvalue(L, top + 4);
        if (lua_pcall(L, 2, 1, 0) == 0 && lua_isstring(L, -1) && strncmp(lua_tostring(L, -1), ours, strlen(ours)))
            watch_file(rl, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_settop(L, top);
    if (!ev_is_active(&rl->watch))
        ev_timer_again(rl->loop, &rl->watch);
}

mp_reloader_t *mp_reloader_new(const char *path, mp_worker_t *workers, int nworkers, mp_reload_validate_cb validate,
                               void *validate_arg, char *err, size_t errlen)
{
    mp_reloader_t *rl = calloc(1, sizeof(*rl));
    lua_State **Ls = calloc((size_t)nworkers + 1, sizeof(*Ls));
    mp_config_t **cfgs = calloc((size_t)nworkers + 1, sizeof(*cfgs));
    if (!rl || !Ls || !cfgs || !(rl->path = strdup(path))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    rl->workers = workers;
    rl->nworkers = nworkers;
    rl->validate = validate;
    rl->validate_arg = validate_arg;
    if (!(rl->text = read_file(path, &rl->len, err, errlen)) ||
        build(rl, rl->text, rl->len, nworkers + 1, Ls, cfgs, err, errlen) != 0)
        goto fail;
    rl->generation = 1;
    rl->loaded_at = epoch_now();
    rl->L = Ls[nworkers];
    rl->cfg = cfgs[nworkers];
    for (int i = 0; i < nworkers; i++) {
        MP_ASSERT(!workers[i].io.gen && workers[i].installed == 0);
        if (mp_worker_install(&workers[i], 1, Ls[i], cfgs[i]) != 0) {
            snprintf(err, errlen, "out of memory");
            for (int k = i + 1; k < nworkers; k++) {
                mp_config_free(cfgs[k]);
                mp_vm_close(Ls[k]);
            }
            goto fail;
        }
        workers[i].installed = 1;
    }
    free(Ls);
    free(cfgs);
    return rl;
fail:
    free(Ls);
    free(cfgs);
    mp_reloader_free(rl);
    return NULL;
}

void mp_reloader_start(mp_reloader_t *rl, struct ev_loop *loop)
{
    rl->loop = loop;
    ev_async_init(&rl->ack, on_ack);
    ev_async_start(loop, &rl->ack);
    for (int i = 0; i < rl->nworkers; i++) {
        rl->workers[i].main_loop = loop;
        rl->workers[i].main_ack = &rl->ack;
    }
    ev_init(&rl->watch, on_watch);
    rl->watch.repeat = WATCH_SECONDS;
    watch_files(rl);
}

/* What a reload cannot change is said once, rather than silently ignored. */
static void warn_fixed_at_start(const mp_config_t *old, const mp_config_t *new)
{
    if (!same_listens(old, new))
        mp_log_warn("reload: the listen addresses changed; they apply at the next restart");
    if (!same_text(old->admin ? old->admin->text : NULL, new->admin ? new->admin->text : NULL))
        mp_log_warn("reload: the admin address changed; it applies at the next restart");
    if (!same_text(old->settings.access_log, new->settings.access_log))
        mp_log_warn("reload: access_log changed; it applies at the next restart");
    if (!same_text(old->settings.error_log, new->settings.error_log))
        mp_log_warn("reload: error_log changed; it applies at the next restart");
    if (old->settings.workers != new->settings.workers)
        mp_log_warn("reload: workers changed; it applies at the next restart");
    if (old->settings.body_buffer_size != new->settings.body_buffer_size)
        mp_log_warn("reload: body_buffer_size changed; it applies at the next restart");
}

/* Whether the configuration cfg has the server (mp_health_forget_control's keep). */
static int has_server(void *arg, const char *upstream, const char *addr)
{
    const mp_config_t *cfg = arg;
    for (size_t u = 0; u < cfg->nupstreams; u++)
        if (strcmp(cfg->upstreams[u].name, upstream) == 0)
            for (size_t i = 0; i < cfg->upstreams[u].nservers; i++)
                if (strcmp(cfg->upstreams[u].servers[i].addr.text, addr) == 0)
                    return 1;
    return 0;
}

enum { FROM_FILE, ROLLBACK, REFRESH };

static int reload(mp_reloader_t *rl, int mode, const char *reason, mp_reload_cb cb, void *arg);

void mp_reload(mp_reloader_t *rl, int rollback, const char *reason, mp_reload_cb cb, void *arg)
{
    (void)reload(rl, rollback ? ROLLBACK : FROM_FILE, reason, cb, arg);
}

int mp_reload_refresh(mp_reloader_t *rl, const char *reason)
{
    return reload(rl, REFRESH, reason, NULL, NULL);
}

/* FROM_FILE reads the script; ROLLBACK takes the previous generation's text;
 * REFRESH rebuilds the current one's (the history stays as it is). */
static int reload(mp_reloader_t *rl, int mode, const char *reason, mp_reload_cb cb, void *arg)
{
    int rollback = mode == ROLLBACK;
    char err[2048];
    size_t len = 0;
    char *text = NULL;
    int n = rl->nworkers + 1;
    lua_State **Ls = calloc((size_t)n, sizeof(*Ls));
    mp_config_t **cfgs = calloc((size_t)n, sizeof(*cfgs));
    waiter_t *wt = calloc(1, sizeof(*wt));
    if (!Ls || !cfgs || !wt) {
        snprintf(err, sizeof(err), "out of memory");
    } else if (rollback && !rl->prev_text) {
        snprintf(err, sizeof(err), "no previous configuration to roll back to");
    } else if (rollback && !(text = malloc(rl->prev_len ? rl->prev_len : 1))) {
        snprintf(err, sizeof(err), "out of memory");
    } else if (rollback) {
        memcpy(text, rl->prev_text, rl->prev_len);
        len = rl->prev_len;
    } else if (mode == REFRESH) {
        if ((text = malloc(rl->len ? rl->len : 1))) {
            memcpy(text, rl->text, rl->len);
            len = rl->len;
        } else {
            snprintf(err, sizeof(err), "out of memory");
        }
    } else {
        text = read_file(rl->path, &len, err, sizeof(err));
    }
    if (!text || build(rl, text, len, n, Ls, cfgs, err, sizeof(err)) != 0) {
        mp_log_error("reload refused (%s), generation %llu keeps running: %s", reason,
                     (unsigned long long)rl->generation, err);
        free(text);
        free(Ls);
        free(cfgs);
        free(wt);
        if (mode != REFRESH)
            rl->reloads_refused++;
        if (cb)
            cb(arg, rl->generation, err);
        return MP_EINVAL;
    }
    uint64_t id = ++rl->generation;
    if (mode != REFRESH) {
        rl->reloads_ok++;
        warn_fixed_at_start(rl->cfg, cfgs[rl->nworkers]);
    }
    mp_config_free(rl->cfg);
    mp_vm_close(rl->L);
    rl->L = Ls[rl->nworkers];
    rl->cfg = cfgs[rl->nworkers];
    if (mode == REFRESH) {
        free(text); /* the same as rl->text */
    } else {
        free(rl->prev_text);
        rl->prev_text = rl->text;
        rl->prev_len = rl->len;
        rl->text = text;
        rl->len = len;
    }
    mp_health_forget_control(has_server, rl->cfg);
    rl->loaded_at = epoch_now();
    *wt = (waiter_t){id, cb, arg, rl->waiters};
    rl->waiters = wt;
    for (int i = 0; i < rl->nworkers; i++)
        hand_over(&rl->workers[i], id, Ls[i], cfgs[i]);
    watch_files(rl);
    if (rl->on_config)
        rl->on_config(rl->on_config_arg, rl->cfg);
    mp_log_info("reload: generation %llu loaded (%s%s)", (unsigned long long)id, reason, rollback ? ", rollback" : "");
    free(Ls);
    free(cfgs);
    return 0;
}

void mp_reloader_on_config(mp_reloader_t *rl, void (*fn)(void *arg, const mp_config_t *cfg), void *arg)
{
    rl->on_config = fn;
    rl->on_config_arg = arg;
}

const mp_config_t *mp_reloader_config(const mp_reloader_t *rl)
{
    return rl->cfg;
}

uint64_t mp_reloader_generation(const mp_reloader_t *rl)
{
    return rl->generation;
}

mp_worker_t *mp_reloader_workers(const mp_reloader_t *rl, int *n)
{
    *n = rl->nworkers;
    return rl->workers;
}

void mp_reloader_counts(const mp_reloader_t *rl, uint64_t *ok, uint64_t *refused)
{
    *ok = rl->reloads_ok;
    *refused = rl->reloads_refused;
}

double mp_reloader_loaded_at(const mp_reloader_t *rl)
{
    return rl->loaded_at;
}

void mp_reloader_free(mp_reloader_t *rl)
{
    if (!rl)
        return;
    if (rl->loop)
        ev_timer_stop(rl->loop, &rl->watch);
    unwatch(rl);
    while (rl->waiters) {
        waiter_t *wt = rl->waiters;
        rl->waiters = wt->next;
        free(wt);
    }
    mp_config_free(rl->cfg);
    if (rl->L)
        mp_vm_close(rl->L);
    free(rl->text);
    free(rl->prev_text);
    free(rl->path);
    free(rl);
}
