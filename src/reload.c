/* reload.c: configuration generations, the main thread's side: built and
 * validated for every worker, handed over (each worker installs and drains
 * them: worker.c), the script's history and settings.watch. */
#include "reload.h"

#include "health.h"
#include "l_http.h"
#include "l_redis.h"
#include "log.h"
#include "strbuf.h"
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

/* ---- what a reload changes (mp_config_diff) ---- */

typedef struct {
    const char *name;
    mp_strbuf_t added, removed, changed; /* JSON array items, comma-separated */
    int na, nr, nc;
    mp_strbuf_t text; /* the names, for the one-line summary */
} diff_section_t;

static void json_str(mp_strbuf_t *b, const char *s)
{
    size_t n = strlen(s);
    if (mp_strbuf_reserve(b, n * 6 + 2) != 0)
        return;
    b->p[b->len++] = '"';
    b->len = mp_json_escape(b->p, b->len, b->cap, (mp_slice){s, n});
    b->p[b->len++] = '"';
    b->p[b->len] = '\0';
}

/* Adds item (kind '+', '-' or '~') to the section; fields (for '~': the
 * ones that differ, comma-separated) may be NULL. */
static void diff_item(diff_section_t *d, char kind, const char *item, const char *fields)
{
    mp_strbuf_t *b = kind == '+' ? &d->added : kind == '-' ? &d->removed : &d->changed;
    int *n = kind == '+' ? &d->na : kind == '-' ? &d->nr : &d->nc;
    mp_strbuf_printf(b, "%s", *n ? "," : "");
    if (kind == '~' && fields) {
        mp_strbuf_printf(b, "{\"name\":");
        json_str(b, item);
        mp_strbuf_printf(b, ",\"fields\":[");
        const char *f = fields;
        for (int first = 1; *f; first = 0) {
            const char *e = strchr(f, ',');
            size_t len = e ? (size_t)(e - f) : strlen(f);
            char one[64];
            snprintf(one, sizeof(one), "%.*s", (int)len, f);
            mp_strbuf_printf(b, "%s", first ? "" : ",");
            json_str(b, one);
            f += len + (e ? 1 : 0);
        }
        mp_strbuf_printf(b, "]}");
    } else {
        json_str(b, item);
    }
    (*n)++;
    mp_strbuf_printf(&d->text, "%s%c%s", d->text.len ? " " : "", kind, item);
    if (kind == '~' && fields)
        mp_strbuf_printf(&d->text, "(%s)", fields);
}

static int eq_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Appends name to the comma-separated list in fields when the values differ. */
#define FIELD_NUM(list, a, b, name)                                                                                    \
    do {                                                                                                               \
        if ((a) != (b))                                                                                                \
            mp_strbuf_printf(list, "%s%s", (list)->len ? "," : "", name);                                              \
    } while (0)
#define FIELD_STR(list, a, b, name)                                                                                    \
    do {                                                                                                               \
        if (!eq_str(a, b))                                                                                             \
            mp_strbuf_printf(list, "%s%s", (list)->len ? "," : "", name);                                              \
    } while (0)

/* A route's identity across generations: its name, else what it matches. */
static void route_key(const mp_route_t *r, char *out, size_t len)
{
    char index[16];
    snprintf(index, sizeof(index), "%d", r->index);
    if (r->name && strcmp(r->name, index) != 0) /* a name given, not the default (its index) */
        snprintf(out, len, "%s", r->name);
    else
        snprintf(out, len, "%s%s%s%s%s%s", r->host ? r->host : "", r->host ? " " : "", r->path ? r->path : "",
                 r->prefix ? r->prefix : "", r->regex ? "~" : "", r->regex ? r->regex : "");
}

static const mp_route_t *find_route(const mp_config_t *cfg, const char *key)
{
    char k[512];
    for (size_t i = 0; i < mp_router_count(cfg->router); i++) {
        const mp_route_t *r = mp_router_get(cfg->router, i);
        route_key(r, k, sizeof(k));
        if (strcmp(k, key) == 0)
            return r;
    }
    return NULL;
}

static const char *route_upstream(const mp_config_t *cfg, const mp_route_t *r)
{
    return r->target >= 0 && (size_t)r->target < cfg->nupstreams ? cfg->upstreams[r->target].name : NULL;
}

static const char *route_root(const mp_config_t *cfg, const mp_route_t *r)
{
    size_t i = (size_t)r->index - 1;
    return cfg->statics && i < cfg->nstatics ? cfg->statics[i].root : NULL;
}

static void diff_routes(diff_section_t *d, const mp_config_t *old, const mp_config_t *new)
{
    char k[512];
    for (size_t i = 0; i < mp_router_count(new->router); i++) {
        const mp_route_t *r = mp_router_get(new->router, i);
        route_key(r, k, sizeof(k));
        const mp_route_t *o = find_route(old, k);
        if (!o) {
            diff_item(d, '+', k, NULL);
            continue;
        }
        mp_strbuf_t f = {0};
        FIELD_STR(&f, o->host, r->host, "host");
        FIELD_STR(&f, o->path, r->path, "path");
        FIELD_STR(&f, o->prefix, r->prefix, "prefix");
        FIELD_STR(&f, o->regex, r->regex, "regex");
        FIELD_NUM(&f, o->strip_prefix, r->strip_prefix, "strip_prefix");
        FIELD_STR(&f, route_upstream(old, o), route_upstream(new, r), "upstream");
        FIELD_NUM(&f, old->route_hooks[o->index - 1].handler, new->route_hooks[r->index - 1].handler, "handler");
        FIELD_STR(&f, route_root(old, o), route_root(new, r), "static");
        FIELD_NUM(&f, o->index, r->index, "order");
        if (f.len)
            diff_item(d, '~', k, f.p);
        mp_strbuf_free(&f);
    }
    for (size_t i = 0; i < mp_router_count(old->router); i++) {
        const mp_route_t *o = mp_router_get(old->router, i);
        route_key(o, k, sizeof(k));
        if (!find_route(new, k))
            diff_item(d, '-', k, NULL);
    }
}

static int same_statuses(const mp_statuses_t *a, const mp_statuses_t *b)
{
    return a->n == b->n && memcmp(a->codes, b->codes, (size_t)a->n * sizeof(a->codes[0])) == 0;
}

static int same_health(const mp_health_def_t *a, const mp_health_def_t *b)
{
    if (!a || !b)
        return a == b;
    return eq_str(a->path, b->path) && eq_str(a->host, b->host) && a->interval == b->interval &&
           a->timeout == b->timeout && a->rise == b->rise && a->fall == b->fall &&
           same_statuses(&a->statuses, &b->statuses);
}

static void diff_upstreams(diff_section_t *d, diff_section_t *sv, const mp_config_t *old, const mp_config_t *new)
{
    char key[1024];
    for (size_t i = 0; i < new->nupstreams; i++) {
        const mp_upstream_def_t *u = &new->upstreams[i];
        int oi = mp_config_upstream(old, u->name);
        const mp_upstream_def_t *o = oi >= 0 ? &old->upstreams[oi] : NULL;
        for (size_t s = 0; s < u->nservers; s++) {
            size_t t = 0;
            while (o && t < o->nservers && strcmp(o->servers[t].addr.text, u->servers[s].addr.text) != 0)
                t++;
            snprintf(key, sizeof(key), "%s %s", u->name, u->servers[s].addr.text);
            if (!o || t == o->nservers)
                diff_item(sv, '+', key, NULL);
            else if (o->servers[t].weight != u->servers[s].weight)
                diff_item(sv, '~', key, "weight");
        }
        if (!o) {
            diff_item(d, '+', u->name, NULL);
            continue;
        }
        for (size_t t = 0; t < o->nservers; t++) {
            size_t s = 0;
            while (s < u->nservers && strcmp(o->servers[t].addr.text, u->servers[s].addr.text) != 0)
                s++;
            snprintf(key, sizeof(key), "%s %s", o->name, o->servers[t].addr.text);
            if (s == u->nservers)
                diff_item(sv, '-', key, NULL);
        }
        mp_strbuf_t f = {0};
        FIELD_STR(&f, o->balancer, u->balancer, "balancer");
        FIELD_STR(&f, o->hash_key, u->hash_key, "hash_key");
        FIELD_NUM(&f, o->fail_open, u->fail_open, "fail_open");
        FIELD_NUM(&f, o->retry_budget, u->retry_budget, "retry_budget");
        FIELD_NUM(&f,
                  o->passive_failures != u->passive_failures || o->passive_cooldown != u->passive_cooldown ||
                      !same_statuses(&o->passive_statuses, &u->passive_statuses),
                  0, "passive");
        FIELD_NUM(&f, same_health(o->health, u->health), 1, "health");
        FIELD_NUM(&f, o->keepalive, u->keepalive, "keepalive");
        FIELD_NUM(&f, o->keepalive_timeout, u->keepalive_timeout, "keepalive_timeout");
        FIELD_NUM(&f,
                  o->connect_timeout != u->connect_timeout || o->send_timeout != u->send_timeout ||
                      o->read_timeout != u->read_timeout || o->tunnel_timeout != u->tunnel_timeout,
                  0, "timeouts");
        FIELD_NUM(&f, o->retries, u->retries, "retries");
        FIELD_STR(&f, o->host, u->host, "host");
        FIELD_NUM(&f, o->tls != NULL, u->tls != NULL, "tls");
        FIELD_STR(&f, o->tls_name, u->tls_name, "tls_name");
        if (f.len)
            diff_item(d, '~', u->name, f.p);
        mp_strbuf_free(&f);
    }
    for (size_t i = 0; i < old->nupstreams; i++) {
        const mp_upstream_def_t *o = &old->upstreams[i];
        if (mp_config_upstream(new, o->name) >= 0)
            continue;
        diff_item(d, '-', o->name, NULL);
        for (size_t t = 0; t < o->nservers; t++) {
            snprintf(key, sizeof(key), "%s %s", o->name, o->servers[t].addr.text);
            diff_item(sv, '-', key, NULL);
        }
    }
}

#define MAX_CERTS 64

/* Every certificate of cfg (listeners and the admin port): "digest name". */
static size_t cert_list(const mp_config_t *cfg, char (*out)[MP_TLS_DIGEST_LEN + 256], size_t max)
{
    size_t n = 0;
    for (size_t l = 0; l <= cfg->nlistens; l++) {
        const mp_tls_server_t *t = l < cfg->nlistens ? (cfg->listen_tls ? cfg->listen_tls[l] : NULL) : cfg->admin_tls;
        char digests[MAX_CERTS][MP_TLS_DIGEST_LEN];
        const char *names[MAX_CERTS];
        size_t k = t ? mp_tls_server_digests(t, digests, names, MAX_CERTS) : 0;
        for (size_t i = 0; i < k && i < MAX_CERTS; i++) {
            char one[MP_TLS_DIGEST_LEN + 256];
            snprintf(one, sizeof(one), "%.64s %.200s", digests[i], names[i]);
            size_t j = 0;
            while (j < n && strcmp(out[j], one) != 0)
                j++;
            if (j == n && n < max)
                memcpy(out[n++], one, sizeof(one));
        }
    }
    return n;
}

static void diff_certs(diff_section_t *d, const mp_config_t *old, const mp_config_t *new)
{
    static char a[MAX_CERTS][MP_TLS_DIGEST_LEN + 256], b[MAX_CERTS][MP_TLS_DIGEST_LEN + 256]; /* the main thread's */
    size_t na = cert_list(old, a, MAX_CERTS), nb = cert_list(new, b, MAX_CERTS);
    for (size_t i = 0; i < nb; i++) {
        size_t j = 0;
        while (j < na && strcmp(a[j], b[i]) != 0)
            j++;
        if (j == na)
            diff_item(d, '+', b[i], NULL);
    }
    for (size_t j = 0; j < na; j++) {
        size_t i = 0;
        while (i < nb && strcmp(a[j], b[i]) != 0)
            i++;
        if (i == nb)
            diff_item(d, '-', a[j], NULL);
    }
}

static int same_trusted(const mp_settings_t *a, const mp_settings_t *b)
{
    return a->ntrusted == b->ntrusted &&
           (a->ntrusted == 0 || memcmp(a->trusted, b->trusted, a->ntrusted * sizeof(*a->trusted)) == 0);
}

/* The settings that changed (d), and among them those only a restart applies (restart). */
static void diff_settings(diff_section_t *d, diff_section_t *restart, const mp_config_t *old, const mp_config_t *new)
{
    const mp_settings_t *a = &old->settings, *b = &new->settings;
    mp_strbuf_t f = {0}, r = {0};
    FIELD_NUM(&r, same_listens(old, new), 1, "listen");
    FIELD_STR(&r, old->admin ? old->admin->text : NULL, new->admin ? new->admin->text : NULL, "admin");
    FIELD_STR(&r, a->access_log, b->access_log, "access_log");
    FIELD_STR(&r, a->error_log, b->error_log, "error_log");
    FIELD_NUM(&r, a->workers, b->workers, "workers");
    FIELD_NUM(&r, a->body_buffer_size, b->body_buffer_size, "body_buffer_size");
    FIELD_NUM(&f, a->client_header_timeout, b->client_header_timeout, "client_header_timeout");
    FIELD_NUM(&f, a->client_body_timeout, b->client_body_timeout, "client_body_timeout");
    FIELD_NUM(&f, a->keepalive_timeout, b->keepalive_timeout, "keepalive_timeout");
    FIELD_NUM(&f, a->shutdown_timeout, b->shutdown_timeout, "shutdown_timeout");
    FIELD_NUM(&f, a->max_header_size, b->max_header_size, "max_header_size");
    FIELD_NUM(&f, a->max_uri_size, b->max_uri_size, "max_uri_size");
    FIELD_NUM(&f, a->max_body_size, b->max_body_size, "max_body_size");
    FIELD_NUM(&f, a->lua_memory, b->lua_memory, "lua_memory");
    FIELD_NUM(&f, a->max_connections, b->max_connections, "max_connections");
    FIELD_NUM(&f, same_trusted(a, b), 1, "trusted_proxies");
    FIELD_NUM(&f, a->merge_slashes, b->merge_slashes, "merge_slashes");
    FIELD_NUM(&f, a->escaped_slashes, b->escaped_slashes, "escaped_slashes");
    FIELD_NUM(&f, a->underscores_in_headers, b->underscores_in_headers, "underscores_in_headers");
    FIELD_NUM(&f, a->access_log_fields, b->access_log_fields, "access_log.fields");
    FIELD_NUM(&f, a->reload_drain_timeout, b->reload_drain_timeout, "reload_drain_timeout");
    FIELD_NUM(&f, a->hook_timeout, b->hook_timeout, "hook_timeout");
    FIELD_NUM(&f, a->watch, b->watch, "watch");
    FIELD_NUM(&f,
              eq_str(a->resolver.nameservers, b->resolver.nameservers) &&
                  eq_str(a->resolver.hosts, b->resolver.hosts) && a->resolver.timeout == b->resolver.timeout,
              1, "resolver");
    FIELD_STR(&f, old->admin_token, new->admin_token, "admin.token");
    FIELD_NUM(&f, old->admin_tls != NULL, new->admin_tls != NULL, "admin.tls");
    for (int pass = 0; pass < 2; pass++) {
        for (const char *s = pass ? r.p : f.p; s && *s;) {
            const char *e = strchr(s, ',');
            size_t len = e ? (size_t)(e - s) : strlen(s);
            char one[64];
            snprintf(one, sizeof(one), "%.*s", (int)len, s);
            diff_item(d, '~', one, NULL);
            if (pass) {
                mp_strbuf_printf(&restart->added, "%s", restart->na++ ? "," : "");
                json_str(&restart->added, one);
                mp_strbuf_printf(&restart->text, "%s%s", restart->text.len ? " " : "", one);
            }
            s += len + (e ? 1 : 0);
        }
    }
    mp_strbuf_free(&f);
    mp_strbuf_free(&r);
}

typedef struct {
    char *key; /* "name" (every request's) or "name on ROUTE" */
    char *conf;
} plugin_t;

/* The plugins of the configuration L built (lua/moonproxy.lua's _plugins):
 * malloc'd, *n set; NULL (n 0) when L is NULL or they cannot be read. */
static plugin_t *plugin_list(lua_State *L, const mp_config_t *cfg, size_t *n)
{
    *n = 0;
    if (!L)
        return NULL;
    int top = lua_gettop(L);
    plugin_t *out = NULL;
    lua_getglobal(L, "package");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "loaded");
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "moonproxy");
            if (lua_istable(L, -1))
                lua_getfield(L, -1, "_plugins");
        }
    }
    if (!lua_isfunction(L, -1) || lua_pcall(L, 0, 1, 0) != 0 || !lua_istable(L, -1)) {
        lua_settop(L, top);
        return NULL;
    }
    size_t len = lua_objlen(L, -1);
    out = calloc(len ? len : 1, sizeof(*out));
    for (size_t i = 0; out && i < len; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        lua_getfield(L, -1, "route");
        lua_getfield(L, -2, "name");
        lua_getfield(L, -3, "conf");
        int route = (int)lua_tointeger(L, -3);
        const char *name = lua_tostring(L, -2), *conf = lua_tostring(L, -1);
        char key[700], rk[512] = "";
        if (route > 0 && (size_t)route <= mp_router_count(cfg->router))
            route_key(mp_router_get(cfg->router, (size_t)route - 1), rk, sizeof(rk));
        snprintf(key, sizeof(key), "%s%s%s", name ? name : "?", rk[0] ? " on " : "", rk);
        out[*n].key = strdup(key);
        out[*n].conf = strdup(conf ? conf : "");
        if (out[*n].key && out[*n].conf)
            (*n)++;
        else
            free(out[*n].key), free(out[*n].conf);
        lua_pop(L, 4);
    }
    lua_settop(L, top);
    return out;
}

static void plugins_free(plugin_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(p[i].key);
        free(p[i].conf);
    }
    free(p);
}

static const plugin_t *find_plugin(const plugin_t *p, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(p[i].key, key) == 0)
            return &p[i];
    return NULL;
}

static void diff_plugins(diff_section_t *d, lua_State *old_L, const mp_config_t *old, lua_State *new_L,
                         const mp_config_t *new)
{
    size_t na, nb;
    plugin_t *a = plugin_list(old_L, old, &na), *b = plugin_list(new_L, new, &nb);
    for (size_t i = 0; i < nb; i++) {
        const plugin_t *o = find_plugin(a, na, b[i].key);
        if (!o)
            diff_item(d, '+', b[i].key, NULL);
        else if (strcmp(o->conf, b[i].conf) != 0)
            diff_item(d, '~', b[i].key, "options");
    }
    for (size_t i = 0; i < na; i++)
        if (!find_plugin(b, nb, a[i].key))
            diff_item(d, '-', a[i].key, NULL);
    plugins_free(a, na);
    plugins_free(b, nb);
}

static void section_json(mp_strbuf_t *out, const diff_section_t *d)
{
    mp_strbuf_printf(out, "\"%s\":{\"added\":[%s],\"removed\":[%s],\"changed\":[%s]}", d->name,
                     d->added.p ? d->added.p : "", d->removed.p ? d->removed.p : "", d->changed.p ? d->changed.p : "");
}

int mp_config_diff(const mp_config_t *old, lua_State *old_L, const mp_config_t *new, lua_State *new_L,
                   mp_strbuf_t *json, mp_strbuf_t *summary)
{
    diff_section_t s[7] = {{.name = "routes"},       {.name = "upstreams"}, {.name = "servers"}, {.name = "plugins"},
                           {.name = "certificates"}, {.name = "settings"},  {.name = "restart"}};
    diff_routes(&s[0], old, new);
    diff_upstreams(&s[1], &s[2], old, new);
    diff_plugins(&s[3], old_L, old, new_L, new);
    diff_certs(&s[4], old, new);
    diff_settings(&s[5], &s[6], old, new);
    int changes = 0;
    mp_strbuf_printf(json, "{");
    for (int i = 0; i < 6; i++) {
        section_json(json, &s[i]);
        mp_strbuf_printf(json, ",");
        changes += s[i].na + s[i].nr + s[i].nc;
        if (s[i].text.len)
            mp_strbuf_printf(summary, "%s%s: %s", summary->len ? "; " : "", s[i].name, s[i].text.p);
    }
    mp_strbuf_printf(json, "\"restart_required\":[%s],\"changes\":%d}", s[6].added.p ? s[6].added.p : "", changes);
    if (s[6].na)
        mp_strbuf_printf(summary, "%sonly a restart applies: %s", summary->len ? "; " : "",
                         s[6].text.p ? s[6].text.p : "");
    if (!summary->len)
        mp_strbuf_printf(summary, "no changes");
    for (int i = 0; i < 7; i++) {
        mp_strbuf_free(&s[i].added);
        mp_strbuf_free(&s[i].removed);
        mp_strbuf_free(&s[i].changed);
        mp_strbuf_free(&s[i].text);
    }
    return changes;
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
    mp_strbuf_t changes = {0}, summary = {0};
    mp_config_diff(rl->cfg, rl->L, cfgs[rl->nworkers], Ls[rl->nworkers], &changes, &summary);
    mp_strbuf_free(&changes);
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
    mp_log_info("reload: generation %llu loaded (%s%s): %s", (unsigned long long)id, reason,
                rollback ? ", rollback" : "", summary.p ? summary.p : "changes unknown (out of memory)");
    mp_strbuf_free(&summary);
    free(Ls);
    free(cfgs);
    return 0;
}

char *mp_reload_preview(mp_reloader_t *rl, size_t *len, char *err, size_t errlen)
{
    size_t tlen = 0;
    char *text = read_file(rl->path, &tlen, err, errlen);
    lua_State *L = NULL;
    mp_config_t *cfg = NULL;
    if (!text || build(rl, text, tlen, 1, &L, &cfg, err, errlen) != 0) {
        mp_log_info("reload preview (dry run): the script is refused: %s", err);
        free(text);
        return NULL;
    }
    free(text);
    mp_strbuf_t changes = {0}, summary = {0}, b = {0};
    int n = mp_config_diff(rl->cfg, rl->L, cfg, L, &changes, &summary);
    mp_config_free(cfg);
    mp_vm_close(L);
    mp_strbuf_printf(&b, "{\"dry_run\":true,\"generation\":%llu,\"changes\":%d,\"diff\":%s,\"summary\":",
                     (unsigned long long)rl->generation, n, changes.p ? changes.p : "null");
    json_str(&b, summary.p ? summary.p : "");
    mp_strbuf_printf(&b, "}\n");
    mp_strbuf_free(&changes);
    mp_strbuf_free(&summary);
    char *out = mp_strbuf_steal(&b, len);
    if (!out)
        snprintf(err, errlen, "out of memory");
    return out;
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
