/* sim.h: the simulator. Runs one request through a configuration with the
 * server's own code, and no sockets: the parser, mp_req_decide (request id,
 * global hooks, the router, the route's hooks), the balancer's pick over
 * server states the caller sets, the upstream request head of upstream.c,
 * and the response hooks and head. moonproxy.testing (l_sim.c), --explain
 * and the proxy.expect guards are all this one machinery.
 *
 * A simulator owns a VM loaded from the script exactly as a worker's, with
 * its hook chains traced (hooks.lua): every result carries the ordered
 * decision steps. Server state (health, in-flight, latency) is private to
 * the simulator; shared dicts are the process's, as in the server. */
#ifndef MP_SIM_H
#define MP_SIM_H

#include "common.h"
#include "config.h"
#include "health.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mp_sim mp_sim_t;
typedef struct lua_State lua_State;


typedef struct {
    const char *name, *value;
} mp_sim_header_t;

/* A client request. */
typedef struct {
    const char *method; /* NULL: GET */
    const char *host;   /* NULL: "localhost" */
    int no_host;        /* send no Host field at all (HTTP/1.1 requires one: 400) */
    const char *target; /* path and query; NULL: "/" */
    const mp_sim_header_t *headers;
    size_t nheaders;
    const char *body; /* its length is sent as Content-Length */
    size_t body_len;
    const char *remote_addr; /* the client's address; NULL: 127.0.0.1 */
    /* Over TLS (scheme https, req.tls): what the handshake told (copied; a
     * NULL version or cipher reads "TLSv1.3", "TLS_AES_128_GCM_SHA256"), or
     * NULL: plain HTTP, unless https is set: TLS with those defaults and the
     * Host (without its port; none for an IP address) as the SNI. */
    const mp_tls_info_t *tls;
    int https;
} mp_sim_request_t;

/* An upstream's response, for the response hooks. */
typedef struct {
    int status;
    const mp_sim_header_t *headers;
    size_t nheaders;
    size_t body_len;
} mp_sim_response_t;

/* One decision step: kind is "request", "hook", "route", "balancer",
 * "static", "forward", "response" or "log". */
typedef struct {
    const char *kind;
    char *text;
} mp_sim_step_t;

typedef struct {
    int forwarded;        /* the request goes to upstream/server with head */
    int status;           /* otherwise the response made here */
    const char *route;    /* the matched route's name, or NULL */
    int route_index;      /* 1-based; 0: none */
    const char *upstream; /* where it went; NULL when the proxy answered */
    const char *server;   /* the balancer's pick; NULL when the proxy answered */
    const char *head;     /* the upstream request head, or the response head */
    size_t head_len;
    const char *body; /* the response body (responses only) */
    size_t body_len;
    const char *error;           /* the first error logged while it ran (a hook's), or NULL */
    int has_upgrade;             /* the request had an Upgrade field: */
    int upgrade;                 /*   forwarded as a WebSocket handshake (a 101 would open a tunnel), */
    const char *upgrade_refused; /*   or why not (static text) */
    int tunnel;                  /* a response: the 101 that opens the handshake's tunnel */
    const char *compress;        /* a response on a compressing route: the encoding ("gzip"), */
    const char *compress_why;    /*   or why not (static text); both NULL when the route does not compress */
    const mp_sim_step_t *trace;
    size_t ntrace;
} mp_sim_result_t;

/* Server state a balancer sees (SPEC "Balancers"). */
typedef struct {
    int down;       /* the active checks say down */
    int open;       /* the passive circuit is open */
    int active;     /* requests in flight */
    int failures;   /* consecutive failures */
    double latency; /* EWMA latency, ms (0: unknown) */
    int drain;      /* the operator drains it (no new requests) */
    int weight;     /* the operator's weight; 0: the configured one */
} mp_sim_state_t;

/* Loads the script at path (or its text, when text is not NULL; path then
 * names it) as the server would. seed fixes the randomness (request ids,
 * balancers, math.random). Returns NULL with "file:line: message" in err. */
mp_sim_t *mp_sim_new(const char *path, const char *text, size_t len, uint64_t seed, char *err, size_t errlen);
void mp_sim_free(mp_sim_t *s);

lua_State *mp_sim_vm(mp_sim_t *s);
const mp_config_t *mp_sim_config(mp_sim_t *s);

/* Pins the clock of hooks, shared dicts and health while the simulator runs
 * (monotonic seconds; 0: the real clock). */
void mp_sim_set_now(mp_sim_t *s, double now);

/* Sets what the balancer sees of one server. Returns 0, or MP_ENOENT. */
int mp_sim_set_server(mp_sim_t *s, const char *upstream, const char *addr, const mp_sim_state_t *st);

/* Applies operator control to a server, as POST /upstreams/NAME/servers/ADDR
 * does (health.h's mp_peer_control), leaving its other state as it is.
 * MP_ENOENT when the upstream has no such server. */
int mp_sim_control(mp_sim_t *s, const char *upstream, const char *addr, const mp_peer_ctl_t *c);

/* Who answers the call-outs hooks make (moonproxy.http, Redis) during the
 * next requests and responses: the functions `http` and `redis` of the
 * table at idx on L's stack, called in L (the caller's VM, which must stay
 * inside the call that runs them). idx 0: the caller gave none; L NULL: a
 * guard's simulation. A call-out nobody answers raises. */
void mp_sim_answer_calls(mp_sim_t *s, lua_State *L, int idx);

/* Runs a request. The result (and its strings) stays valid until the
 * simulator's next call. Returns 0, or MP_ENOMEM. */
int mp_sim_request(mp_sim_t *s, const mp_sim_request_t *rq, mp_sim_result_t *out);

/* Runs the response hooks of the last request (which must have been
 * forwarded) on rs. Returns 0, MP_EINVAL (no forwarded request) or MP_ENOMEM. */
int mp_sim_response(mp_sim_t *s, const mp_sim_response_t *rs, mp_sim_result_t *out);

/* Ends the last request: its hook objects go stale, and mp_sim_response
 * has no request to answer. */
void mp_sim_release(mp_sim_t *s);

/* ---- guard.c ---- */

/* Reads request or response headers from a Lua table at index t of L:
 * { name = "value" | { "v1", "v2" } | false (absent) } or a list of
 * { "name", "value" } pairs (to keep an order). The strings stay in the
 * table; a number's text is kept in the table at index anchor (absolute), to
 * be kept until the request ran. Sets *bad for entries of another shape or
 * beyond max; raises only when out of memory. */
size_t mp_sim_lua_headers(lua_State *L, int t, int anchor, mp_sim_header_t *h, size_t max, int *bad);

/* Checks the configuration's proxy.expect guards. Returns 0, or MP_EINVAL
 * with the first failing guard (expected and actual, and the trace) in err. */
int mp_sim_check_guards(mp_sim_t *s, char *err, size_t errlen);

/* The same for a script's text, in a simulator of its own (start, -t and
 * reload call it when the script declares guards). */
int mp_sim_check_script(const char *path, const char *text, size_t len, char *err, size_t errlen);

#endif
