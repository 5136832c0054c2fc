/* router.c: the compiled route table. Host groups live in two hashes (exact
 * names, wildcard suffixes) plus one group for routes without a host; each
 * group holds an exact-path hash, its regex routes in declaration order and a
 * prefix hash probed at the '/' boundaries of the path, longest first. A
 * match allocates nothing. */
#include "router.h"

#include "regex.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* Routes in declaration order; entries are borrowed except in router->routes. */
typedef struct {
    mp_route_t **v;
    size_t n, cap;
} route_list_t;

typedef struct {
    char *key; /* owned; NULL marks an empty slot */
    size_t len;
    uint32_t hash;
    void *val;
} slot_t;

/* Open addressing with linear probing, at most half full. */
typedef struct {
    slot_t *slots;
    size_t cap; /* 0 or a power of two */
    size_t n;
    int ci; /* hosts: keys are stored lowercase and looked up in any case */
} map_t;

typedef struct {
    map_t paths;          /* exact path -> route_list_t * */
    route_list_t regexes; /* declaration order */
    map_t prefixes;       /* prefix -> route_list_t * */
    size_t max_prefix;    /* longest key in prefixes: longer candidates are skipped */
} group_t;

typedef struct {
    char *p;
    size_t len;
} str_t;

typedef struct {
    str_t name;  /* lowercase */
    str_t value; /* exact value, or the pattern when re is set */
    mp_regex_t *re;
} header_filter_t;

/* A route with its filters; pub.priv points back here. */
typedef struct {
    mp_route_t pub;
    mp_regex_t *re; /* regex routes */
    str_t *methods;
    size_t nmethods;
    header_filter_t *headers;
    size_t nheaders;
} route_t;

struct mp_router {
    route_list_t routes; /* owns the routes */
    map_t hosts;         /* lowercase exact host -> group_t * */
    map_t wildcards;     /* ".example.com" (from "*.example.com") -> group_t * */
    group_t any;         /* routes without a host */
    mp_regex_md_t *md;   /* shared by every regex of this router's thread */
};

/* ---- small containers ---- */

static int list_reserve(route_list_t *l, size_t extra)
{
    if (l->n + extra <= l->cap)
        return 0;
    size_t cap = l->cap ? l->cap * 2 : 4;
    while (cap < l->n + extra)
        cap *= 2;
    mp_route_t **v = realloc(l->v, cap * sizeof(*v));
    if (!v)
        return MP_ENOMEM;
    l->v = v;
    l->cap = cap;
    return 0;
}

static int list_push(route_list_t *l, mp_route_t *route)
{
    if (list_reserve(l, 1) < 0)
        return MP_ENOMEM;
    l->v[l->n++] = route;
    return 0;
}

static void list_free(route_list_t *l)
{
    free(l->v);
    *l = (route_list_t){0};
}

/* FNV-1a. */
static uint32_t hash_key(const char *p, size_t n, int ci)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)(ci ? mp_lower(p[i]) : p[i]);
        h *= 16777619u;
    }
    return h;
}

static int key_eq(const slot_t *s, const char *k, size_t n, int ci)
{
    if (s->len != n)
        return 0;
    if (!ci)
        return memcmp(s->key, k, n) == 0;
    for (size_t i = 0; i < n; i++)
        if (s->key[i] != mp_lower(k[i]))
            return 0;
    return 1;
}

/* The slot holding k, or the empty slot where k would go. cap must be > 0. */
static slot_t *map_slot(const map_t *m, const char *k, size_t n, uint32_t h)
{
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        slot_t *s = &m->slots[i];
        if (!s->key || (s->hash == h && key_eq(s, k, n, m->ci)))
            return s;
    }
}

/* The value stored under k[0..n), or NULL. No key is ever empty. */
static void *map_get(const map_t *m, const char *k, size_t n)
{
    if (m->n == 0 || n == 0)
        return NULL;
    slot_t *s = map_slot(m, k, n, hash_key(k, n, m->ci));
    return s->key ? s->val : NULL;
}

static int map_grow(map_t *m)
{
    size_t cap = m->cap ? m->cap * 2 : 8;
    slot_t *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return MP_ENOMEM;
    map_t bigger = {slots, cap, m->n, m->ci};
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].key)
            *map_slot(&bigger, m->slots[i].key, m->slots[i].len, m->slots[i].hash) = m->slots[i];
    free(m->slots);
    *m = bigger;
    return 0;
}

/* Stores a copy of k[0..n) (lowercased in a ci map) with val; k must be absent. */
static int map_put(map_t *m, const char *k, size_t n, void *val)
{
    if ((m->n + 1) * 2 > m->cap && map_grow(m) < 0)
        return MP_ENOMEM;
    char *key = malloc(n + 1);
    if (!key)
        return MP_ENOMEM;
    for (size_t i = 0; i < n; i++)
        key[i] = m->ci ? mp_lower(k[i]) : k[i];
    key[n] = '\0';
    uint32_t h = hash_key(k, n, m->ci);
    *map_slot(m, k, n, h) = (slot_t){key, n, h, val};
    m->n++;
    return 0;
}

static void map_free(map_t *m, void (*free_val)(void *))
{
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].key)
            continue;
        free(m->slots[i].key);
        free_val(m->slots[i].val);
    }
    free(m->slots);
    *m = (map_t){.ci = m->ci};
}

static void free_list_val(void *v)
{
    list_free(v);
    free(v);
}

static void group_dispose(group_t *g)
{
    map_free(&g->paths, free_list_val);
    map_free(&g->prefixes, free_list_val);
    list_free(&g->regexes);
}

static void free_group_val(void *v)
{
    group_dispose(v);
    free(v);
}

/* ---- matching ---- */

/* The request host without ":port" or a trailing dot; "[::1]:80" -> "[::1]". */
static mp_slice host_name(mp_slice h)
{
    size_t n = h.len;
    if (n == 0)
        return h;
    const char *end = h.p[0] == '[' ? memchr(h.p, ']', n) : NULL;
    if (end)
        n = (size_t)(end - h.p) + 1;
    else if ((end = memchr(h.p, ':', n)))
        n = (size_t)(end - h.p);
    if (n > 1 && h.p[n - 1] == '.')
        n--;
    return (mp_slice){h.p, n};
}

static int bytes_eq(mp_slice a, const str_t *b)
{
    return a.len == b->len && (a.len == 0 || memcmp(a.p, b->p, a.len) == 0);
}

static int method_ok(const route_t *rt, mp_slice method)
{
    if (rt->nmethods == 0)
        return 1;
    for (size_t i = 0; i < rt->nmethods; i++)
        if (bytes_eq(method, &rt->methods[i]))
            return 1;
    return 0;
}

/* Any field named f->name whose value matches: repeated fields are alternatives. */
static int header_ok(mp_router_t *r, const header_filter_t *f, const mp_route_query_t *q)
{
    for (size_t i = 0; i < q->nheaders; i++) {
        const mp_header_t *h = &q->headers[i];
        if (!mp_slice_ieq(h->name, f->name.p, f->name.len))
            continue;
        if (f->re ? mp_regex_match(f->re, r->md, h->value, NULL, 0) > 0 : bytes_eq(h->value, &f->value))
            return 1;
    }
    return 0;
}

static int headers_ok(mp_router_t *r, const route_t *rt, const mp_route_query_t *q)
{
    for (size_t i = 0; i < rt->nheaders; i++)
        if (!header_ok(r, &rt->headers[i], q))
            return 0;
    return 1;
}

/* First route of l whose filters pass; fills m. */
static int list_match(mp_router_t *r, const route_list_t *l, const mp_route_query_t *q, mp_route_match_t *m)
{
    for (size_t i = 0; i < l->n; i++) {
        const route_t *rt = l->v[i]->priv;
        if (method_ok(rt, q->method) && headers_ok(r, rt, q)) {
            m->route = l->v[i];
            m->ncaptures = 0;
            return 1;
        }
    }
    return 0;
}

static int regex_match(mp_router_t *r, const mp_route_t *route, const mp_route_query_t *q, mp_route_match_t *m)
{
    const route_t *rt = route->priv;
    if (!method_ok(rt, q->method))
        return 0;
    int rc = mp_regex_match(rt->re, r->md, q->path, m->ovector, MP_ROUTE_MAX_CAPTURES);
    /* rc < 0 is a PCRE2 failure such as the match limit: the route does not match */
    if (rc <= 0 || !headers_ok(r, rt, q))
        return 0;
    m->route = route;
    m->ncaptures = rc < MP_ROUTE_MAX_CAPTURES ? rc : MP_ROUTE_MAX_CAPTURES;
    return 1;
}

/* Tries the prefix key path[0..len); *last skips a length already tried. */
static int try_prefix(mp_router_t *r, const group_t *g, const mp_route_query_t *q, size_t len, size_t *last,
                      mp_route_match_t *m)
{
    if (len == 0 || len == *last || len > g->max_prefix)
        return 0;
    *last = len;
    const route_list_t *l = map_get(&g->prefixes, q->path.p, len);
    return l && list_match(r, l, q, m);
}

/* A key ending in '/' matches by string and one without matches at a '/' or
 * the end, so the only candidates are the whole path and, for each '/', the
 * path up to and including it, then up to it: lengths never increase. */
static int prefix_match(mp_router_t *r, const group_t *g, const mp_route_query_t *q, mp_route_match_t *m)
{
    const char *p = q->path.p;
    size_t n = q->path.len, last = SIZE_MAX;
    if (try_prefix(r, g, q, n, &last, m))
        return 1;
    /* a '/' at i > max_prefix only yields candidates longer than any key */
    for (size_t i = n < g->max_prefix + 1 ? n : g->max_prefix + 1; i-- > 0;) {
        if (p[i] != '/')
            continue;
        if (try_prefix(r, g, q, i + 1, &last, m) || try_prefix(r, g, q, i, &last, m))
            return 1;
    }
    return 0;
}

static int group_match(mp_router_t *r, const group_t *g, const mp_route_query_t *q, mp_route_match_t *m)
{
    const route_list_t *l = map_get(&g->paths, q->path.p, q->path.len);
    if (l && list_match(r, l, q, m))
        return 1;
    for (size_t i = 0; i < g->regexes.n; i++)
        if (regex_match(r, g->regexes.v[i], q, m))
            return 1;
    return g->prefixes.n && prefix_match(r, g, q, m);
}

/* Wildcard groups by suffix, longest first: "a.b.example.com" tries
 * ".b.example.com", then ".example.com", then ".com". */
static int wildcard_match(mp_router_t *r, mp_slice host, const mp_route_query_t *q, mp_route_match_t *m)
{
    for (size_t i = 1; i < host.len; i++) {
        if (host.p[i] != '.')
            continue;
        const group_t *g = map_get(&r->wildcards, host.p + i, host.len - i);
        if (g && group_match(r, g, q, m))
            return 1;
    }
    return 0;
}

int mp_router_match(mp_router_t *r, const mp_route_query_t *q, mp_route_match_t *m)
{
    mp_slice host = host_name(q->host);
    m->route = NULL;
    m->ncaptures = 0;
    if (r->hosts.n) {
        const group_t *g = map_get(&r->hosts, host.p, host.len);
        if (g && group_match(r, g, q, m))
            return 0;
    }
    if (r->wildcards.n && wildcard_match(r, host, q, m))
        return 0;
    return group_match(r, &r->any, q, m) ? 0 : MP_ENOENT;
}

/* ---- building ---- */

mp_router_t *mp_router_new(void)
{
    mp_router_t *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->hosts.ci = 1;
    r->wildcards.ci = 1;
    r->md = mp_regex_md_new(MP_ROUTE_MAX_CAPTURES - 1);
    if (!r->md) {
        free(r);
        return NULL;
    }
    return r;
}

/* Writes "src: message" into err; returns MP_EINVAL. */
static int fail(char *err, size_t errlen, const char *src, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, const char *src, const char *fmt, ...)
{
    if (errlen == 0)
        return MP_EINVAL;
    int off = src ? snprintf(err, errlen, "%s: ", src) : 0;
    if (off < 0 || (size_t)off >= errlen)
        return MP_EINVAL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + off, errlen - (size_t)off, fmt, ap);
    va_end(ap);
    return MP_EINVAL;
}

static int is_host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_';
}

/* "name", "[v6 literal]", or "*." followed by a name; '*' nowhere else. */
static int host_valid(const char *h)
{
    if (h[0] == '*') {
        if (h[1] != '.' || h[2] == '\0' || h[2] == '.')
            return 0;
        h += 2;
    } else if (h[0] == '[') {
        size_t n = strlen(h);
        return n > 2 && h[n - 1] == ']' && strspn(h + 1, "0123456789abcdefABCDEF:.") == n - 2;
    }
    if (*h == '\0')
        return 0;
    for (; *h; h++)
        if (!is_host_char(*h))
            return 0;
    return 1;
}

/* RFC 9110 §5.6.2 token. */
static int is_token(const char *s)
{
    if (!s || !*s)
        return 0;
    return strspn(s, "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") == strlen(s);
}

static int check_def(const mp_route_def_t *d, char *err, size_t errlen)
{
    const char *src = d->src;
    if (d->path && d->prefix)
        return fail(err, errlen, src, "route sets both path and prefix");
    if (d->path && d->regex)
        return fail(err, errlen, src, "route sets both path and regex");
    if (d->prefix && d->regex)
        return fail(err, errlen, src, "route sets both prefix and regex");
    if (d->path && d->path[0] != '/')
        return fail(err, errlen, src, "path must start with '/'");
    if (d->prefix && d->prefix[0] != '/')
        return fail(err, errlen, src, "prefix must start with '/'");
    if (d->host && !host_valid(d->host))
        return fail(err, errlen, src, "bad host '%s'", d->host);
    for (size_t i = 0; d->methods && i < d->nmethods; i++)
        if (!is_token(d->methods[i]))
            return fail(err, errlen, src, "bad method '%s'", d->methods[i] ? d->methods[i] : "");
    for (size_t i = 0; d->headers && i < d->nheaders; i++) {
        const mp_route_header_def_t *h = &d->headers[i];
        if (!is_token(h->name))
            return fail(err, errlen, src, "bad header name '%s'", h->name ? h->name : "");
        if (!h->value)
            return fail(err, errlen, src, "header '%s' has no value", h->name);
    }
    return 0;
}

/* *out = copy of s (NULL stays NULL). */
static int copy_str(char **out, const char *s)
{
    *out = NULL;
    if (!s)
        return 0;
    size_t n = strlen(s);
    *out = malloc(n + 1);
    if (!*out)
        return MP_ENOMEM;
    memcpy(*out, s, n + 1);
    return 0;
}

static void route_free(route_t *rt)
{
    if (!rt)
        return;
    mp_route_t *p = &rt->pub;
    free(p->name);
    free(p->host);
    free(p->path);
    free(p->prefix);
    free(p->regex);
    free(p->src);
    mp_regex_free(rt->re);
    for (size_t i = 0; i < rt->nmethods; i++)
        free(rt->methods[i].p);
    free(rt->methods);
    for (size_t i = 0; i < rt->nheaders; i++) {
        free(rt->headers[i].name.p);
        free(rt->headers[i].value.p);
        mp_regex_free(rt->headers[i].re);
    }
    free(rt->headers);
    free(rt);
}

/* Copies the strings of d into rt->pub: host lowercased without a trailing
 * dot, the default name, and prefix "/" when no path, prefix or regex. */
static int copy_strings(route_t *rt, const mp_route_def_t *d, int index)
{
    mp_route_t *p = &rt->pub;
    char num[24];
    snprintf(num, sizeof(num), "%d", index);
    const char *prefix = d->prefix ? d->prefix : (d->path || d->regex) ? NULL : "/";
    if (copy_str(&p->name, d->name ? d->name : num) < 0 || copy_str(&p->host, d->host) < 0 ||
        copy_str(&p->path, d->path) < 0 || copy_str(&p->prefix, prefix) < 0 || copy_str(&p->regex, d->regex) < 0 ||
        copy_str(&p->src, d->src) < 0)
        return MP_ENOMEM;
    p->prefix_len = prefix ? strlen(prefix) : 0;
    for (char *c = p->host; c && *c; c++)
        *c = mp_lower(*c);
    size_t hn = p->host ? strlen(p->host) : 0;
    if (hn > 1 && p->host[hn - 1] == '.')
        p->host[hn - 1] = '\0';
    return 0;
}

static int copy_methods(route_t *rt, const mp_route_def_t *d)
{
    if (!d->methods || d->nmethods == 0)
        return 0;
    rt->methods = calloc(d->nmethods, sizeof(*rt->methods));
    if (!rt->methods)
        return MP_ENOMEM;
    rt->nmethods = d->nmethods; /* zeroed entries are safe to free */
    for (size_t i = 0; i < d->nmethods; i++) {
        if (copy_str(&rt->methods[i].p, d->methods[i]) < 0)
            return MP_ENOMEM;
        rt->methods[i].len = strlen(d->methods[i]);
    }
    return 0;
}

static int copy_headers(route_t *rt, const mp_route_def_t *d, char *err, size_t errlen)
{
    if (!d->headers || d->nheaders == 0)
        return 0;
    rt->headers = calloc(d->nheaders, sizeof(*rt->headers));
    if (!rt->headers)
        return fail(err, errlen, d->src, "out of memory");
    rt->nheaders = d->nheaders; /* zeroed entries are safe to free */
    for (size_t i = 0; i < d->nheaders; i++) {
        const mp_route_header_def_t *h = &d->headers[i];
        header_filter_t *f = &rt->headers[i];
        if (copy_str(&f->name.p, h->name) < 0 || copy_str(&f->value.p, h->value) < 0)
            return fail(err, errlen, d->src, "out of memory");
        f->name.len = strlen(h->name);
        f->value.len = strlen(h->value);
        for (size_t k = 0; k < f->name.len; k++)
            f->name.p[k] = mp_lower(f->name.p[k]);
        char msg[512];
        if (h->is_regex && !(f->re = mp_regex_compile(h->value, msg, sizeof(msg))))
            return fail(err, errlen, d->src, "header '%s': %s", h->name, msg);
    }
    return 0;
}

/* A compiled route, or NULL with "src: message" in err. */
static route_t *route_build(const mp_route_def_t *d, int index, char *err, size_t errlen)
{
    route_t *rt = calloc(1, sizeof(*rt));
    if (!rt || copy_strings(rt, d, index) < 0 || copy_methods(rt, d) < 0) {
        route_free(rt);
        fail(err, errlen, d->src, "out of memory");
        return NULL;
    }
    rt->pub.priv = rt;
    rt->pub.index = index;
    rt->pub.target = d->target;
    rt->pub.strip_prefix = d->strip_prefix;
    char msg[512];
    if (d->regex && !(rt->re = mp_regex_compile(d->regex, msg, sizeof(msg)))) {
        fail(err, errlen, d->src, "%s", msg);
        route_free(rt);
        return NULL;
    }
    if (copy_headers(rt, d, err, errlen) < 0) {
        route_free(rt);
        return NULL;
    }
    return rt;
}

/* The group for a lowercase host (NULL: no host), created on first use. */
static group_t *group_for(mp_router_t *r, const char *host)
{
    if (!host)
        return &r->any;
    map_t *m = host[0] == '*' ? &r->wildcards : &r->hosts;
    const char *key = host[0] == '*' ? host + 1 : host; /* "*.example.com" -> ".example.com" */
    size_t n = strlen(key);
    group_t *g = map_get(m, key, n);
    if (g)
        return g;
    g = calloc(1, sizeof(*g));
    if (g && map_put(m, key, n, g) < 0) {
        free(g);
        return NULL;
    }
    return g;
}

/* Appends route to the list stored under key, created on first use. */
static int keyed_push(map_t *m, const char *key, size_t n, mp_route_t *route)
{
    route_list_t *l = map_get(m, key, n);
    if (!l) {
        if (!(l = calloc(1, sizeof(*l))))
            return MP_ENOMEM;
        if (map_put(m, key, n, l) < 0) {
            free(l);
            return MP_ENOMEM;
        }
    }
    return list_push(l, route);
}

static int group_insert(group_t *g, mp_route_t *route)
{
    if (route->path)
        return keyed_push(&g->paths, route->path, strlen(route->path), route);
    if (route->regex)
        return list_push(&g->regexes, route);
    if (keyed_push(&g->prefixes, route->prefix, route->prefix_len, route) < 0)
        return MP_ENOMEM;
    if (route->prefix_len > g->max_prefix)
        g->max_prefix = route->prefix_len;
    return 0;
}

int mp_router_add(mp_router_t *r, const mp_route_def_t *def, char *err, size_t errlen)
{
    if (check_def(def, err, errlen) < 0)
        return MP_EINVAL;
    route_t *rt = route_build(def, (int)r->routes.n + 1, err, errlen);
    if (!rt)
        return MP_EINVAL;
    /* reserve first: once a group references the route, router->routes must own it */
    group_t *g = group_for(r, rt->pub.host);
    if (!g || list_reserve(&r->routes, 1) < 0 || group_insert(g, &rt->pub) < 0) {
        route_free(rt);
        fail(err, errlen, def->src, "out of memory");
        return MP_ENOMEM;
    }
    r->routes.v[r->routes.n++] = &rt->pub;
    return 0;
}

size_t mp_router_count(const mp_router_t *r)
{
    return r->routes.n;
}

const mp_route_t *mp_router_get(const mp_router_t *r, size_t i)
{
    return i < r->routes.n ? r->routes.v[i] : NULL;
}

void mp_router_free(mp_router_t *r)
{
    if (!r)
        return;
    map_free(&r->hosts, free_group_val);
    map_free(&r->wildcards, free_group_val);
    group_dispose(&r->any);
    for (size_t i = 0; i < r->routes.n; i++)
        route_free(r->routes.v[i]->priv);
    list_free(&r->routes);
    mp_regex_md_free(r->md);
    free(r);
}

/* ---- fuzzing ---- */

static mp_router_t *fuzz_router(void)
{
    static const char *const get[] = {"GET", "HEAD"};
    static const mp_route_header_def_t hdr[] = {{"x-v", "^[0-9]+$", 1}, {"x-k", "on", 0}};
    static const mp_route_def_t defs[] = {
        {.host = "api.example.com", .prefix = "/v1/", .strip_prefix = 1},
        {.host = "*.example.com", .regex = "^/u/(\\d+)(?:/(\\w+))?$", .methods = get, .nmethods = 2},
        {.host = "*.b.example.com", .path = "/x", .headers = hdr, .nheaders = 2},
        {.regex = "^(a+)+$"}, /* catastrophic backtracking: must stop at the match limit */
        {.path = "/exact", .methods = get + 1, .nmethods = 1},
        {.prefix = "/v1"},
        {.prefix = "/v1/a/", .headers = hdr, .nheaders = 1},
        {.name = "default"},
    };
    char err[256];
    mp_router_t *r = mp_router_new();
    for (size_t i = 0; r && i < MP_ARRAY_LEN(defs); i++)
        MP_BUG_ON(mp_router_add(r, &defs[i], err, sizeof(err)) != 0);
    return r;
}

/* Cuts the next '\n'-terminated field off *in. */
static mp_slice next_field(mp_slice *in)
{
    const char *nl = in->len ? memchr(in->p, '\n', in->len) : NULL;
    size_t n = nl ? (size_t)(nl - in->p) : in->len;
    mp_slice f = {in->p, n};
    in->p += nl ? n + 1 : n;
    in->len -= nl ? n + 1 : n;
    return f;
}

/* Input: host '\n' path '\n' method, then "name:value" lines. */
void mp_fuzz_router(const uint8_t *data, size_t size)
{
    static mp_router_t *r; /* built once, kept for the process */
    if (!r && !(r = fuzz_router()))
        return;
    mp_slice in = {(const char *)data, size};
    mp_header_t hs[8];
    mp_route_query_t q = {.headers = hs};
    q.host = next_field(&in);
    q.path = next_field(&in);
    q.method = next_field(&in);
    while (in.len && q.nheaders < MP_ARRAY_LEN(hs)) {
        mp_slice line = next_field(&in);
        const char *colon = line.len ? memchr(line.p, ':', line.len) : NULL;
        size_t nlen = colon ? (size_t)(colon - line.p) : line.len;
        hs[q.nheaders].name = (mp_slice){line.p, nlen};
        hs[q.nheaders].value = (mp_slice){line.p + nlen + (colon != NULL), line.len - nlen - (colon != NULL)};
        q.nheaders++;
    }
    mp_route_match_t m;
    if (mp_router_match(r, &q, &m) != 0)
        return;
    MP_BUG_ON(!m.route || m.ncaptures < 0 || m.ncaptures > MP_ROUTE_MAX_CAPTURES);
    for (int i = 0; i < 2 * m.ncaptures; i++)
        MP_BUG_ON(m.ovector[i] != (size_t)-1 && m.ovector[i] > q.path.len);
}
