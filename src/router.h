/* router.h: the compiled route table (SPEC "Routes"). Host groups (exact
 * host, then wildcard suffix, then no host); in each group an exact-path
 * hash, the regex routes in declaration order, and the prefixes looked up
 * longest first. Pure: no I/O, no global state. One router belongs to one
 * thread (it owns the PCRE2 match data it matches with). */
#ifndef MP_ROUTER_H
#define MP_ROUTER_H

#include "common.h"
#include "http1.h"

#define MP_ROUTE_MAX_CAPTURES 16 /* capture groups reported to a rewrite; more are compiled but not reported */

typedef struct mp_router mp_router_t;

typedef struct {
    const char *name; /* value to match, or a regex when is_regex; name lowercase */
    const char *value;
    int is_regex; /* the DSL's "~regex" form, with the "~" removed */
} mp_route_header_def_t;

/* What the configuration declares for one route; copied by mp_router_add. */
typedef struct {
    const char *name;           /* NULL: the route's index as a decimal string */
    const char *host;           /* NULL: any host; "api.example.com" or "*.example.com" (any case) */
    const char *const *methods; /* NULL or nmethods uppercase method names */
    size_t nmethods;
    const char *path;   /* exact path, or NULL */
    const char *prefix; /* must start with '/', or NULL */
    const char *regex;  /* PCRE2 pattern matched against the path, or NULL */
    const mp_route_header_def_t *headers;
    size_t nheaders;
    int strip_prefix; /* remove the prefix before forwarding (prefix routes only) */
    int target;       /* the caller's index (e.g. upstream), passed back untouched */
    const char *src;  /* "file:line" of the declaration, for error messages */
} mp_route_def_t;

/* A compiled route; fields are read-only for callers. */
typedef struct mp_route {
    char *name;
    int index; /* 1-based declaration order */
    int target;
    int strip_prefix;
    char *host; /* NULL, or lowercase */
    char *path;
    char *prefix;
    size_t prefix_len;
    char *regex;
    char *src;
    void *priv; /* router's own data (filters, compiled regexes) */
} mp_route_t;

/* The route's 0-based slot in per-route arrays (cfg->route_hooks, cfg->statics,
 * a generation's route_stats). */
static inline int mp_route_slot(const mp_route_t *rt)
{
    return rt->index - 1;
}

/* The request as the router sees it. host may carry ":port" and any case. */
typedef struct {
    mp_slice method;
    mp_slice host;
    mp_slice path; /* without the query */
    const mp_header_t *headers;
    size_t nheaders;
} mp_route_query_t;

typedef struct {
    const mp_route_t *route;
    int ncaptures;                             /* regex routes: groups incl. group 0; else 0 */
    size_t ovector[2 * MP_ROUTE_MAX_CAPTURES]; /* offsets into query.path; PCRE2_UNSET for unset groups */
} mp_route_match_t;

mp_router_t *mp_router_new(void);

/* Adds a route. Returns 0, or MP_EINVAL with "src: message" in err (bad
 * regex with PCRE2's message and offset, prefix not starting with '/', two of
 * path/prefix/regex set, bad header regex). A route with none of
 * path/prefix/regex is a prefix "/" route. */
int mp_router_add(mp_router_t *r, const mp_route_def_t *def, char *err, size_t errlen);

/* Finds the route for q per SPEC precedence. Returns 0 with m filled, or
 * MP_ENOENT. */
int mp_router_match(mp_router_t *r, const mp_route_query_t *q, mp_route_match_t *m);

size_t mp_router_count(const mp_router_t *r);
const mp_route_t *mp_router_get(const mp_router_t *r, size_t i); /* 0-based declaration order */

void mp_router_free(mp_router_t *r);

void mp_fuzz_router(const uint8_t *data, size_t size);

#endif
