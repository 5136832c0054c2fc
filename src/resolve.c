/* resolve.c: upstream names on c-ares. A lookup reads settings.resolver's
 * hosts file first (ours to parse: c-ares 1.18 takes no hosts path), then
 * asks DNS (/etc/hosts too when no hosts file is given). Configuration builds
 * drive their channel with poll() until an answer or the timeout; the watch
 * drives its channels from the main thread's loop (ev_io per socket, a timer
 * for c-ares' retries and one for the deadline). Answers live in one cache
 * under a mutex, which only builds and the watch touch. */
#include "resolve.h"

#include "log.h"

#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>

#define FRESH_SECONDS 5.0  /* an answer no watch keeps serves the builds of this long */
#define MAX_SOCKS 8        /* sockets of one watched lookup */
#define PENDING_RETRY 30.0 /* seconds between rebuilds for an answer the last one refused */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- answers ------------------------------------------------------------ */

typedef struct {
    mp_sockaddr_t addrs[MP_RESOLVE_MAX];
    int n;
    int ttl; /* seconds; 0 for a hosts file's */
} answer_t;

static int addr_cmp(const void *a, const void *b)
{
    const mp_sockaddr_t *x = a, *y = b;
    if (x->ss.ss_family != y->ss.ss_family)
        return x->ss.ss_family < y->ss.ss_family ? -1 : 1;
    if (x->ss.ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)&x->ss)->sin_addr, &((const struct sockaddr_in *)&y->ss)->sin_addr,
                      4);
    return memcmp(&((const struct sockaddr_in6 *)&x->ss)->sin6_addr, &((const struct sockaddr_in6 *)&y->ss)->sin6_addr,
                  16);
}

/* Adds sa (port cleared) unless it is there already. */
static void answer_add(answer_t *a, const struct sockaddr *sa)
{
    mp_sockaddr_t m = {0};
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&m.ss;
        *in = *(const struct sockaddr_in *)sa;
        in->sin_port = 0;
        m.sslen = sizeof(*in);
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&m.ss;
        *in6 = *(const struct sockaddr_in6 *)sa;
        in6->sin6_port = 0;
        m.sslen = sizeof(*in6);
    } else {
        return;
    }
    for (int i = 0; i < a->n; i++)
        if (addr_cmp(&a->addrs[i], &m) == 0)
            return;
    if (a->n < MP_RESOLVE_MAX)
        a->addrs[a->n++] = m;
}

static void answer_sort(answer_t *a)
{
    qsort(a->addrs, (size_t)a->n, sizeof(a->addrs[0]), addr_cmp);
}

static int answer_same(const answer_t *a, const answer_t *b)
{
    if (a->n != b->n)
        return 0;
    for (int i = 0; i < a->n; i++)
        if (addr_cmp(&a->addrs[i], &b->addrs[i]) != 0)
            return 0;
    return 1;
}

static void addr_text(const mp_sockaddr_t *m, char *buf, size_t len)
{
    const void *p = m->ss.ss_family == AF_INET ? (const void *)&((const struct sockaddr_in *)&m->ss)->sin_addr
                                               : (const void *)&((const struct sockaddr_in6 *)&m->ss)->sin6_addr;
    if (!inet_ntop(m->ss.ss_family, p, buf, (socklen_t)len))
        snprintf(buf, len, "?");
}

/* "a, b" of the addresses of a not in b (all of a when b is NULL). */
static void answer_list(const answer_t *a, const answer_t *b, char *buf, size_t len)
{
    size_t n = 0;
    buf[0] = '\0';
    for (int i = 0; i < a->n; i++) {
        int found = 0;
        for (int k = 0; b && !found && k < b->n; k++)
            found = addr_cmp(&a->addrs[i], &b->addrs[k]) == 0;
        if (found)
            continue;
        char t[INET6_ADDRSTRLEN];
        addr_text(&a->addrs[i], t, sizeof(t));
        int w = snprintf(buf + n, len - n, "%s%s", n ? ", " : "", t);
        if (w < 0 || (size_t)w >= len - n)
            break;
        n += (size_t)w;
    }
}

/* ---- the hosts file ------------------------------------------------------ */

/* host's addresses in the hosts file at path: 1 found, 0 not there, -1
 * unreadable (err set). */
static int hosts_lookup(const char *path, const char *host, answer_t *a, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot read the hosts file %s: %s", path, strerror(errno));
        return -1;
    }
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *hash = strchr(line, '#'), *save = NULL;
        if (hash)
            *hash = '\0';
        char *ip = strtok_r(line, " \t\r\n", &save);
        if (!ip)
            continue;
        struct sockaddr_in in = {.sin_family = AF_INET};
        struct sockaddr_in6 in6 = {.sin6_family = AF_INET6};
        const struct sockaddr *sa = NULL;
        if (inet_pton(AF_INET, ip, &in.sin_addr) == 1)
            sa = (const struct sockaddr *)&in;
        else if (inet_pton(AF_INET6, ip, &in6.sin6_addr) == 1)
            sa = (const struct sockaddr *)&in6;
        for (char *name; sa && (name = strtok_r(NULL, " \t\r\n", &save));)
            if (strcasecmp(name, host) == 0)
                answer_add(a, sa);
    }
    fclose(f);
    a->ttl = 0;
    return a->n > 0;
}

/* ---- c-ares -------------------------------------------------------------- */

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int lib_rc = ARES_ENOTINITIALIZED;

static void lib_init(void)
{
    lib_rc = ares_library_init(ARES_LIB_INIT_ALL);
}

/* One lookup's state, filled by on_addrinfo. */
typedef struct {
    answer_t ans;
    int done, status;
    char err[256]; /* set when the failure is not c-ares' (the hosts file) */
} query_t;

static void on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    query_t *q = arg;
    q->done = 1;
    q->status = status;
    int ttl = -1;
    for (struct ares_addrinfo_node *n = res ? res->nodes : NULL; status == ARES_SUCCESS && n; n = n->ai_next) {
        answer_add(&q->ans, n->ai_addr);
        if (ttl < 0 || n->ai_ttl < ttl)
            ttl = n->ai_ttl;
    }
    q->ans.ttl = ttl < 0 ? 0 : ttl;
    if (status == ARES_SUCCESS && q->ans.n == 0)
        q->status = ARES_ENODATA;
    if (res)
        ares_freeaddrinfo(res);
}

/* A channel for r: its nameservers, and /etc/hosts only when r names no
 * hosts file (that one is read before, by hosts_lookup). */
static int channel_new(const mp_resolver_def_t *r, ares_channel *ch, struct ares_options *o, int mask, char *err,
                       size_t errlen)
{
    pthread_once(&lib_once, lib_init);
    if (lib_rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(lib_rc));
        return -1;
    }
    int ms = (int)(r->timeout * 1000 / 2);
    o->timeout = ms < 50 ? 50 : ms;
    o->tries = 2;
    o->lookups = r->hosts ? "b" : "fb";
    int rc = ares_init_options(ch, o, mask | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_LOOKUPS);
    if (rc == ARES_SUCCESS && r->nameservers && (rc = ares_set_servers_ports_csv(*ch, r->nameservers)) != ARES_SUCCESS)
        ares_destroy(*ch);
    if (rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(rc));
        return -1;
    }
    return 0;
}

static void query_start(ares_channel ch, const char *host, query_t *q)
{
    struct ares_addrinfo_hints hints = {.ai_family = AF_UNSPEC};
    ares_getaddrinfo(ch, host, NULL, &hints, on_addrinfo, q);
}

static void query_error(const query_t *q, const char *host, char *err, size_t errlen)
{
    if (q->err[0])
        snprintf(err, errlen, "%s", q->err);
    else if (!q->done || q->status == ARES_ECANCELLED || q->status == ARES_ETIMEOUT)
        snprintf(err, errlen, "%s: no answer in time", host);
    else
        snprintf(err, errlen, "%s: %s", host, ares_strerror(q->status));
}

/* Looks host up, blocking at most r->timeout seconds: 0 with a, or -1 with
 * err. */
static int lookup_now(const mp_resolver_def_t *r, const char *host, answer_t *a, char *err, size_t errlen)
{
    memset(a, 0, sizeof(*a));
    if (r->hosts) {
        int found = hosts_lookup(r->hosts, host, a, err, errlen);
        if (found > 0)
            answer_sort(a);
        if (found != 0)
            return found > 0 ? 0 : -1;
    }
    struct ares_options o = {0};
    ares_channel ch;
    if (channel_new(r, &ch, &o, 0, err, errlen) != 0)
        return -1;
    query_t q = {0};
    query_start(ch, host, &q);
    double deadline = now_s() + r->timeout;
    while (!q.done) {
        ares_socket_t socks[ARES_GETSOCK_MAXNUM];
        /* the bits unsigned: c-ares' ARES_GETSOCK_WRITABLE shifts an int by 31 */
        unsigned bits = (unsigned)ares_getsock(ch, socks, ARES_GETSOCK_MAXNUM);
        int n = 0;
        struct pollfd p[ARES_GETSOCK_MAXNUM];
        for (int i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
            short ev = (short)(((bits >> i) & 1u ? POLLIN : 0) |
                               ((bits >> (i + ARES_GETSOCK_MAXNUM)) & 1u ? POLLOUT : 0));
            if (ev)
                p[n++] = (struct pollfd){.fd = socks[i], .events = ev};
        }
        double left = deadline - now_s();
        if (n == 0 || left <= 0)
            break;
        struct timeval tv, *tvp = ares_timeout(ch, NULL, &tv);
        double wait = tvp ? (double)tvp->tv_sec + (double)tvp->tv_usec / 1e6 : left;
        int ms = (int)((wait < left ? wait : left) * 1000) + 1;
        int ready = poll(p, (nfds_t)n, ms);
        if (ready < 0 && errno != EINTR)
            break;
        if (ready <= 0) {
            ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD); /* c-ares' own timeouts */
            continue;
        }
        for (int i = 0; i < n && !q.done; i++)
            if (p[i].revents)
                ares_process_fd(ch, (p[i].revents & (POLLIN | POLLERR | POLLHUP)) ? p[i].fd : ARES_SOCKET_BAD,
                                (p[i].revents & POLLOUT) ? p[i].fd : ARES_SOCKET_BAD);
    }
    if (!q.done)
        ares_cancel(ch);
    ares_destroy(ch);
    if (q.status != ARES_SUCCESS) {
        query_error(&q, host, err, errlen);
        return -1;
    }
    *a = q.ans;
    answer_sort(a);
    return 0;
}

/* ---- the cache ----------------------------------------------------------- */

typedef struct entry {
    char *key; /* host, nameservers and hosts file */
    answer_t ans;
    double fetched; /* now_s() of the answer */
    int tracked;    /* watches keeping it current */
    struct entry *next;
} entry_t;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;  /* the list and each entry */
static pthread_mutex_t lookup_lock = PTHREAD_MUTEX_INITIALIZER; /* builds' lookups, one at a time */
static entry_t *cache;

static char *make_key(const mp_resolver_def_t *r, const char *host)
{
    size_t n = strlen(host) + (r->nameservers ? strlen(r->nameservers) : 0) + (r->hosts ? strlen(r->hosts) : 0) + 3;
    char *k = malloc(n);
    if (k)
        snprintf(k, n, "%s\n%s\n%s", host, r->nameservers ? r->nameservers : "", r->hosts ? r->hosts : "");
    return k;
}

/* Under cache_lock. */
static entry_t *find(const char *key)
{
    for (entry_t *e = cache; e; e = e->next)
        if (strcmp(e->key, key) == 0)
            return e;
    return NULL;
}

/* Stores a for key (under cache_lock); NULL when out of memory. */
static entry_t *store(const char *key, const answer_t *a)
{
    entry_t *e = find(key);
    if (!e) {
        if (!(e = calloc(1, sizeof(*e))) || !(e->key = strdup(key))) {
            free(e);
            return NULL;
        }
        e->next = cache;
        cache = e;
    }
    e->ans = *a;
    e->fetched = now_s();
    return e;
}

int mp_resolve_lookup(const mp_resolver_def_t *r, const char *host, mp_sockaddr_t *out, int max, char *err,
                      size_t errlen)
{
    char *key = make_key(r, host);
    if (!key) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    answer_t a;
    int rc = -1, have = 0;
    pthread_mutex_lock(&lookup_lock);
    pthread_mutex_lock(&cache_lock);
    entry_t *e = find(key);
    if (e && (e->tracked || now_s() - e->fetched < FRESH_SECONDS)) {
        a = e->ans;
        have = 1;
    }
    pthread_mutex_unlock(&cache_lock);
    if (have || lookup_now(r, host, &a, err, errlen) == 0) {
        rc = 0;
        pthread_mutex_lock(&cache_lock);
        if (!have && !store(key, &a)) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
        }
        pthread_mutex_unlock(&cache_lock);
    }
    pthread_mutex_unlock(&lookup_lock);
    free(key);
    if (rc != 0)
        return -1;
    int n = a.n < max ? a.n : max;
    memcpy(out, a.addrs, (size_t)n * sizeof(*out));
    return n;
}

/* ---- the watch ----------------------------------------------------------- */

/* A name the running configuration uses, re-resolved at its TTL. */
typedef struct name {
    char *key, *host;
    mp_resolver_def_t r; /* owned copies */
    double min, max;     /* bounds on the TTL */
    ev_timer next;       /* the next lookup */
    /* a lookup in flight */
    ares_channel ch;
    int busy;
    query_t q;
    ev_io io[MAX_SOCKS];
    ev_timer retry, deadline;
    int failing;       /* the last lookup failed (said once) */
    int pending;       /* the answer changed and no rebuild took it yet */
    double pending_at; /* when the last rebuild for it was tried */
    int seen;          /* for mp_resolve_watch_sync */
    struct mp_resolve_watch *w;
    struct name *link;
} name_t;

struct mp_resolve_watch {
    struct ev_loop *loop;
    mp_resolve_changed_cb changed;
    void *arg;
    name_t *names;
};

static void lookup_end(name_t *n);

static void on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    name_t *n = data;
    ev_io *free_slot = NULL, *io = NULL;
    for (int i = 0; i < MAX_SOCKS; i++) {
        if (ev_is_active(&n->io[i]) && n->io[i].fd == fd)
            io = &n->io[i];
        else if (!free_slot && !ev_is_active(&n->io[i]))
            free_slot = &n->io[i];
    }
    if (io)
        ev_io_stop(n->w->loop, io);
    else if (!(io = free_slot))
        return; /* more sockets than slots: c-ares' timeouts still move it on */
    if (!readable && !writable)
        return;
    ev_io_set(io, fd, (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));
    ev_io_start(n->w->loop, io);
}

/* Re-arms the timer of c-ares' own retries. */
static void arm_retry(name_t *n)
{
    struct timeval tv, *tvp = ares_timeout(n->ch, NULL, &tv);
    ev_timer_stop(n->w->loop, &n->retry);
    if (tvp) {
        ev_timer_set(&n->retry, (double)tvp->tv_sec + (double)tvp->tv_usec / 1e6 + 0.001, 0);
        ev_timer_start(n->w->loop, &n->retry);
    }
}

static void after_process(name_t *n)
{
    if (n->q.done)
        lookup_end(n);
    else
        arm_retry(n);
}

static void on_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    name_t *n = io->data;
    int fd = io->fd;
    ares_process_fd(n->ch, (revents & EV_READ) ? fd : ARES_SOCKET_BAD, (revents & EV_WRITE) ? fd : ARES_SOCKET_BAD);
    after_process(n);
}

static void on_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    name_t *n = t->data;
    ares_process_fd(n->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    after_process(n);
}

static void on_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    name_t *n = t->data;
    if (!n->q.done)
        ares_cancel(n->ch); /* calls on_addrinfo with ARES_ECANCELLED */
    if (!n->q.done)
        n->q = (query_t){.done = 1, .status = ARES_ETIMEOUT};
    lookup_end(n);
}

static double clamp_ttl(const name_t *n, double ttl)
{
    return ttl < n->min ? n->min : ttl > n->max ? n->max : ttl;
}

static void schedule(name_t *n, double after)
{
    ev_timer_stop(n->w->loop, &n->next);
    ev_timer_set(&n->next, after, 0);
    ev_timer_start(n->w->loop, &n->next);
}

/* Stops a lookup in flight and its watchers. */
static void lookup_stop(name_t *n)
{
    if (!n->busy)
        return;
    n->busy = 0;
    ev_timer_stop(n->w->loop, &n->retry);
    ev_timer_stop(n->w->loop, &n->deadline);
    ares_destroy(n->ch); /* closes the sockets: on_sock_state stops their watchers */
    for (int i = 0; i < MAX_SOCKS; i++)
        ev_io_stop(n->w->loop, &n->io[i]);
}

/* The answer of the lookup in flight: into the cache, said when it changed
 * or failed, and the next lookup scheduled. */
static void lookup_end(name_t *n)
{
    query_t q = n->q;
    lookup_stop(n);
    char err[256];
    answer_t a = q.ans;
    int ok = q.status == ARES_SUCCESS && q.done;
    if (!ok)
        query_error(&q, n->host, err, sizeof(err));
    if (ok)
        answer_sort(&a);

    pthread_mutex_lock(&cache_lock);
    entry_t *e = find(n->key);
    answer_t old = e ? e->ans : (answer_t){0};
    int changed = ok && (!e || !answer_same(&old, &a));
    if (ok && !store(n->key, &a))
        ok = changed = 0;
    pthread_mutex_unlock(&cache_lock);

    if (!ok) {
        if (!n->failing) {
            char kept[512];
            answer_list(&old, NULL, kept, sizeof(kept));
            mp_log_warn("resolve: %s: lookup failed (%s): keeping the last answer (%s) and retrying every %gs", n->host,
                        err, kept, n->min);
        }
        n->failing = 1;
        schedule(n, n->min);
        return;
    }
    if (n->failing)
        mp_log_info("resolve: %s answers again", n->host);
    n->failing = 0;
    schedule(n, clamp_ttl(n, a.ttl));
    if (!changed && (!n->pending || ev_now(n->w->loop) < n->pending_at + PENDING_RETRY))
        return;
    char why[1200];
    if (changed) {
        char added[512], removed[512];
        answer_list(&a, &old, added, sizeof(added));
        answer_list(&old, &a, removed, sizeof(removed));
        mp_log_info("resolve: %s: added [%s], removed [%s]", n->host, added, removed);
        snprintf(why, sizeof(why), "DNS: %s changed", n->host);
    } else {
        snprintf(why, sizeof(why), "DNS: %s changed (the rebuild for it was refused: again)", n->host);
    }
    /* pending until a rebuild is accepted: a refused one is tried again with
     * an answer PENDING_RETRY seconds later (one refusal logged each time, no
     * more). The rebuild syncs the watch: n is found again by key. */
    mp_resolve_watch_t *w = n->w;
    char *key = strdup(n->key);
    n->pending = 1;
    n->pending_at = ev_now(w->loop);
    int rc = w->changed(w->arg, why);
    for (name_t *m = w->names; key && rc == 0 && m; m = m->link)
        if (strcmp(m->key, key) == 0)
            m->pending = 0;
    free(key);
}

static void lookup_begin(name_t *n)
{
    query_t *q = &n->q;
    *q = (query_t){0};
    if (n->r.hosts) {
        int found = hosts_lookup(n->r.hosts, n->host, &q->ans, q->err, sizeof(q->err));
        if (found != 0) {
            q->done = 1;
            q->status = found > 0 ? ARES_SUCCESS : ARES_EFILE;
            lookup_end(n);
            return;
        }
    }
    struct ares_options o = {.sock_state_cb = on_sock_state, .sock_state_cb_data = n};
    if (channel_new(&n->r, &n->ch, &o, ARES_OPT_SOCK_STATE_CB, q->err, sizeof(q->err)) != 0) {
        q->done = 1;
        q->status = ARES_ENOMEM;
        lookup_end(n);
        return;
    }
    n->busy = 1;
    ev_timer_set(&n->deadline, n->r.timeout, 0);
    ev_timer_start(n->w->loop, &n->deadline);
    query_start(n->ch, n->host, &n->q);
    after_process(n);
}

static void on_next(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    name_t *n = t->data;
    if (!n->busy)
        lookup_begin(n);
}

mp_resolve_watch_t *mp_resolve_watch_new(struct ev_loop *loop, mp_resolve_changed_cb changed, void *arg)
{
    mp_resolve_watch_t *w = calloc(1, sizeof(*w));
    if (w)
        *w = (mp_resolve_watch_t){.loop = loop, .changed = changed, .arg = arg};
    return w;
}

static void name_free(mp_resolve_watch_t *w, name_t *n)
{
    lookup_stop(n);
    ev_timer_stop(w->loop, &n->next);
    pthread_mutex_lock(&cache_lock);
    entry_t *e = find(n->key);
    if (e && e->tracked > 0)
        e->tracked--;
    pthread_mutex_unlock(&cache_lock);
    free(n->key);
    free(n->host);
    free(n->r.nameservers);
    free(n->r.hosts);
    free(n);
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* Starts following host (of a server written name) for cfg's resolver. */
static void follow(mp_resolve_watch_t *w, const mp_config_t *cfg, const mp_upstream_def_t *u, const char *name)
{
    const char *colon = strrchr(name, ':');
    size_t hlen = colon ? (size_t)(colon - name) : strlen(name);
    char host[256];
    if (hlen >= sizeof(host))
        return;
    memcpy(host, name, hlen);
    host[hlen] = '\0';
    char *key = make_key(&cfg->settings.resolver, host);
    if (!key)
        return;
    for (name_t *n = w->names; n; n = n->link) {
        if (strcmp(n->key, key) != 0)
            continue;
        if (!n->seen) { /* this configuration's bounds */
            n->min = u->resolve_min;
            n->max = u->resolve_max;
            n->r.timeout = cfg->settings.resolver.timeout;
        } else {
            n->min = u->resolve_min < n->min ? u->resolve_min : n->min;
            n->max = u->resolve_max < n->max ? u->resolve_max : n->max;
        }
        n->seen = 1;
        free(key);
        return;
    }
    name_t *n = calloc(1, sizeof(*n));
    const mp_resolver_def_t *r = &cfg->settings.resolver;
    if (!n || !(n->host = strdup(host)) || (r->nameservers && !(n->r.nameservers = strdup(r->nameservers))) ||
        (r->hosts && !(n->r.hosts = dup_or_null(r->hosts)))) {
        if (n) {
            free(n->host);
            free(n->r.nameservers);
        }
        free(n);
        free(key);
        return;
    }
    n->key = key;
    n->r.timeout = r->timeout;
    n->min = u->resolve_min;
    n->max = u->resolve_max;
    n->w = w;
    n->seen = 1;
    ev_init(&n->next, on_next);
    ev_init(&n->retry, on_retry);
    ev_init(&n->deadline, on_deadline);
    n->next.data = n->retry.data = n->deadline.data = n;
    for (int i = 0; i < MAX_SOCKS; i++) {
        ev_init(&n->io[i], on_io);
        n->io[i].data = n;
    }
    double ttl = 0, age = 0;
    pthread_mutex_lock(&cache_lock);
    entry_t *e = find(key);
    if (e) {
        e->tracked++;
        ttl = e->ans.ttl;
        age = now_s() - e->fetched;
    }
    pthread_mutex_unlock(&cache_lock);
    double after = clamp_ttl(n, ttl) - age;
    n->link = w->names;
    w->names = n;
    schedule(n, after > 0 ? after : 0);
}

void mp_resolve_watch_sync(mp_resolve_watch_t *w, const mp_config_t *cfg)
{
    for (name_t *n = w->names; n; n = n->link)
        n->seen = 0;
    for (size_t i = 0; cfg && i < cfg->nupstreams; i++) {
        const mp_upstream_def_t *u = &cfg->upstreams[i];
        for (size_t s = 0; s < u->nservers; s++)
            if (u->servers[s].by_name && (s == 0 || strcmp(u->servers[s - 1].name, u->servers[s].name) != 0))
                follow(w, cfg, u, u->servers[s].name);
    }
    for (name_t **p = &w->names; *p;) {
        name_t *n = *p;
        if (n->seen) {
            p = &n->link;
            continue;
        }
        *p = n->link;
        name_free(w, n);
    }
}

void mp_resolve_watch_free(mp_resolve_watch_t *w)
{
    if (!w)
        return;
    while (w->names) {
        name_t *n = w->names;
        w->names = n->link;
        name_free(w, n);
    }
    free(w);
}

/* ---- one lookup on a worker's loop (call-out URLs) ----------------------- */

#define ASYNC_TTL_MIN 1.0   /* an answer serves the call-outs of at least this long */
#define ASYNC_TTL_MAX 300.0 /* ... and at most this long, whatever its record says */

struct mp_resolve_query {
    struct ev_loop *loop;
    mp_resolver_def_t r; /* borrowed: the configuration outlives the query's caller */
    char *key, *host;
    ares_channel ch;
    int busy;
    query_t q;
    ev_io io[MAX_SOCKS];
    ev_timer retry, deadline, soon;
    mp_resolve_cb cb;
    void *arg;
};

int mp_resolve_cached(const mp_resolver_def_t *r, const char *host, mp_sockaddr_t *out, int max)
{
    char *key = make_key(r, host);
    if (!key)
        return 0;
    int n = 0;
    pthread_mutex_lock(&cache_lock);
    entry_t *e = find(key);
    double ttl = e ? e->ans.ttl : 0;
    ttl = ttl < ASYNC_TTL_MIN ? ASYNC_TTL_MIN : ttl > ASYNC_TTL_MAX ? ASYNC_TTL_MAX : ttl;
    if (e && e->ans.n && (e->tracked || now_s() - e->fetched < ttl)) {
        n = e->ans.n < max ? e->ans.n : max;
        memcpy(out, e->ans.addrs, (size_t)n * sizeof(*out));
    }
    pthread_mutex_unlock(&cache_lock);
    free(key);
    return n;
}

static void async_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    mp_resolve_query_t *a = data;
    ev_io *free_slot = NULL, *io = NULL;
    for (int i = 0; i < MAX_SOCKS; i++) {
        if (ev_is_active(&a->io[i]) && a->io[i].fd == fd)
            io = &a->io[i];
        else if (!free_slot && !ev_is_active(&a->io[i]))
            free_slot = &a->io[i];
    }
    if (io)
        ev_io_stop(a->loop, io);
    else if (!(io = free_slot))
        return;
    if (!readable && !writable)
        return;
    ev_io_set(io, fd, (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));
    ev_io_start(a->loop, io);
}

static void async_stop(mp_resolve_query_t *a)
{
    ev_timer_stop(a->loop, &a->retry);
    ev_timer_stop(a->loop, &a->deadline);
    ev_timer_stop(a->loop, &a->soon);
    if (a->busy) {
        a->busy = 0;
        ares_destroy(a->ch);
    }
    for (int i = 0; i < MAX_SOCKS; i++)
        ev_io_stop(a->loop, &a->io[i]);
}

void mp_resolve_cancel(mp_resolve_query_t *a)
{
    if (!a)
        return;
    async_stop(a);
    free(a->key);
    free(a->host);
    free(a);
}

/* The lookup is over: into the cache, then the callback (a is freed). */
static void async_end(mp_resolve_query_t *a)
{
    query_t q = a->q;
    async_stop(a);
    char err[256] = "";
    answer_t ans = q.ans;
    int ok = q.done && q.status == ARES_SUCCESS;
    if (ok) {
        answer_sort(&ans);
        pthread_mutex_lock(&cache_lock);
        store(a->key, &ans);
        pthread_mutex_unlock(&cache_lock);
    } else {
        query_error(&q, a->host, err, sizeof(err));
    }
    mp_resolve_cb cb = a->cb;
    void *arg = a->arg;
    mp_resolve_cancel(a);
    cb(arg, ok ? ans.addrs : NULL, ok ? ans.n : 0, ok ? NULL : err);
}

static void async_after(mp_resolve_query_t *a)
{
    if (a->q.done)
        return async_end(a);
    struct timeval tv, *tvp = ares_timeout(a->ch, NULL, &tv);
    ev_timer_stop(a->loop, &a->retry);
    if (tvp) {
        ev_timer_set(&a->retry, (double)tvp->tv_sec + (double)tvp->tv_usec / 1e6 + 0.001, 0);
        ev_timer_start(a->loop, &a->retry);
    }
}

static void async_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    mp_resolve_query_t *a = io->data;
    int fd = io->fd;
    ares_process_fd(a->ch, (revents & EV_READ) ? fd : ARES_SOCKET_BAD, (revents & EV_WRITE) ? fd : ARES_SOCKET_BAD);
    async_after(a);
}

static void async_retry(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_resolve_query_t *a = t->data;
    ares_process_fd(a->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    async_after(a);
}

static void async_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_resolve_query_t *a = t->data;
    if (!a->q.done && a->busy)
        ares_cancel(a->ch);
    if (!a->q.done)
        a->q = (query_t){.done = 1, .status = ARES_ETIMEOUT};
    async_end(a);
}

/* An answer found at once (the hosts file, a failure to start) is told
 * from the loop's next turn, as any other. */
static void async_soon(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    async_end(t->data);
}

mp_resolve_query_t *mp_resolve_start(struct ev_loop *loop, const mp_resolver_def_t *r, const char *host,
                                     mp_resolve_cb cb, void *arg)
{
    mp_resolve_query_t *a = calloc(1, sizeof(*a));
    if (!a || !(a->key = make_key(r, host)) || !(a->host = strdup(host))) {
        if (a)
            free(a->key);
        free(a);
        return NULL;
    }
    a->loop = loop;
    a->r = *r;
    a->cb = cb;
    a->arg = arg;
    for (int i = 0; i < MAX_SOCKS; i++) {
        ev_init(&a->io[i], async_io);
        a->io[i].data = a;
    }
    ev_init(&a->retry, async_retry);
    a->retry.data = a;
    ev_init(&a->deadline, async_deadline);
    a->deadline.data = a;
    ev_timer_init(&a->soon, async_soon, 0, 0);
    a->soon.data = a;
    query_t *q = &a->q;
    int found = r->hosts ? hosts_lookup(r->hosts, host, &q->ans, q->err, sizeof(q->err)) : 0;
    struct ares_options o = {.sock_state_cb = async_sock_state, .sock_state_cb_data = a};
    if (found != 0) {
        q->done = 1;
        q->status = found > 0 ? ARES_SUCCESS : ARES_EFILE;
    } else if (channel_new(r, &a->ch, &o, ARES_OPT_SOCK_STATE_CB, q->err, sizeof(q->err)) != 0) {
        q->done = 1;
        q->status = ARES_ENOMEM;
    }
    if (q->done) {
        ev_timer_start(loop, &a->soon);
        return a;
    }
    a->busy = 1;
    ev_timer_set(&a->deadline, r->timeout > 0 ? r->timeout : 2, 0);
    ev_timer_start(loop, &a->deadline);
    query_start(a->ch, host, q);
    if (q->done) { /* c-ares answered from its own files at once */
        ev_timer_start(loop, &a->soon);
        return a;
    }
    async_after(a);
    return a;
}
