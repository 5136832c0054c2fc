/* config.h: a configuration as the C core uses it, built from the table the
 * Lua DSL (lua/moonproxy.lua) returns, which holds every field: the defaults
 * are the DSL's alone. Immutable once built. */
#ifndef MP_CONFIG_H
#define MP_CONFIG_H

#include "common.h"
#include "router.h"
#include "tls.h"

#include <netinet/in.h>
#include <sys/socket.h>

typedef struct lua_State lua_State;

typedef struct {
    struct sockaddr_storage ss;
    socklen_t sslen;
    char *text; /* "host:port" as written */
} mp_addr_t;

/* A server of an upstream. A server given by DNS name is one per address
 * it resolved to (resolve.h): addr is that address ("10.0.0.7:8080", the key
 * of its health and pool), name the name as written ("api.internal:8080");
 * for an IP literal both are the text as written. */
typedef struct {
    mp_addr_t addr;
    char *name;
    int weight;
    int by_name; /* resolved from name (DNS or a hosts file) */
} mp_server_def_t;

/* settings.resolver: where names are looked up (NULL: /etc/resolv.conf,
 * /etc/hosts). */
typedef struct {
    char *nameservers; /* "127.0.0.1:5353,[::1]:53" or NULL */
    char *hosts;       /* a hosts file read instead of /etc/hosts, or NULL */
    double timeout;    /* seconds a lookup may take */
} mp_resolver_def_t;

/* An address a name resolved to (port 0). */
typedef struct {
    struct sockaddr_storage ss;
    socklen_t sslen;
} mp_sockaddr_t;

/* Resolves host (a DNS name, no port) for a configuration build: writes at
 * most max addresses to out and returns how many (> 0), or < 0 with the
 * reason in err. Process-wide: the server and the Lua module install
 * resolve.c's; without one, names are refused. */
typedef int (*mp_config_resolve_fn)(const mp_resolver_def_t *r, const char *host, mp_sockaddr_t *out, int max,
                                    char *err, size_t errlen);
void mp_config_set_resolver(mp_config_resolve_fn fn);

#define MP_RESOLVE_MAX 32 /* addresses used per name */

#define MP_MAX_STATUSES 16

typedef struct {
    int n;
    uint16_t codes[MP_MAX_STATUSES];
} mp_statuses_t;

/* Active health checks of an upstream's servers (SPEC `health`). */
typedef struct {
    char *path;
    char *host;               /* NULL: the server's address */
    double interval, timeout; /* seconds */
    int rise, fall;
    mp_statuses_t statuses; /* n == 0: any 2xx or 3xx */
} mp_health_def_t;

typedef struct {
    char *name;
    mp_server_def_t *servers;
    size_t nservers;
    char *balancer;   /* a built-in name, or "lua" for an operator's policy */
    int balancer_ref; /* the Lua pick function (custom, or lua_balancers), or LUA_NOREF */
    char *hash_key;   /* chash: "header:NAME", "cookie:NAME", "ip", "function" (hash_key_ref), or NULL */
    int hash_key_ref;
    int fail_open;                  /* when every server is down, try them anyway */
    double retry_budget;            /* retries at most this share of the requests of the last 10 s */
    int passive_failures;           /* consecutive failures that eject a server; 0: never */
    double passive_cooldown;        /* seconds */
    mp_statuses_t passive_statuses; /* responses that count as failures */
    mp_health_def_t *health;        /* NULL: no active checks */
    int keepalive;                  /* idle pooled connections per server per worker */
    double keepalive_timeout;       /* seconds an idle pooled connection is kept */
    double connect_timeout, send_timeout, read_timeout; /* seconds */
    double tunnel_timeout; /* seconds a tunnel may go without a byte either way (timeouts.tunnel) */
    int retries;
    char *host;                      /* NULL: pass the client's Host */
    mp_tls_client_t *tls;            /* NULL: plain TCP to the servers (owned) */
    char *tls_name;                  /* SNI and the name verified; NULL: the host of each server's address */
    double resolve_min, resolve_max; /* seconds: bounds on a server name's TTL (resolve.h) */
    char *src;                       /* "file:line" */
} mp_upstream_def_t;

typedef struct {
    uint8_t family; /* AF_INET or AF_INET6 */
    uint8_t bits;
    uint8_t addr[16];
} mp_cidr_t;

/* Response compression (SPEC "Compression"): the encodings, in the
 * Content-Encoding names "gzip", "br", "zstd". */
enum { MP_ENC_NONE = 0, MP_ENC_GZIP = 1, MP_ENC_BR = 2, MP_ENC_ZSTD = 3 };

/* A route's compress = {...} (or settings' default for every route). */
typedef struct {
    uint8_t on;          /* 0: responses are relayed as they come */
    uint8_t nalgs;       /* algs used: the preference when the client accepts several */
    uint8_t algs[3];     /* MP_ENC_* */
    int level;           /* 0: each algorithm's default */
    uint64_t min_length; /* a Content-Length under this is not compressed */
    char **types;        /* media types ("text/html", or "text/" + "*": any text type), lowercase (owned) */
    size_t ntypes;
} mp_compress_def_t;

typedef struct {
    int workers; /* 0 = auto (number of CPUs) */
    double client_header_timeout, client_body_timeout, keepalive_timeout, shutdown_timeout; /* seconds */
    size_t max_header_size, max_uri_size;
    uint64_t max_body_size;  /* 0 = unlimited */
    size_t body_buffer_size; /* room for body bytes beside the head; a body this small stays replayable */
    size_t lua_memory;       /* bytes each VM may hold (vm.c: mp_vm_set_memory) */
    int max_connections;     /* per worker */
    mp_cidr_t *trusted;
    size_t ntrusted;
    double trace_sample;      /* tracing.sample: the share of new traces flagged sampled */
    mp_cidr_t *trace_trusted; /* tracing.trust: whose traceparent is continued; NULL: trusted_proxies */
    size_t ntrace_trusted;
    /* paths and names (SPEC "Behaviour on the wire", path.h) */
    int merge_slashes;           /* "a//b" is "a/b" before routing */
    int escaped_slashes;         /* mp_escaped_slashes: %2F and %5C refused, kept or decoded */
    int underscores_in_headers;  /* forward fields whose name has '_' (default: dropped) */
    char *access_log;            /* NULL: off; "stdout"; else a path */
    char *error_log;             /* a path for the error log; NULL: stderr */
    uint32_t access_log_fields;  /* log.h MP_ALOG_* bits: the fields written (MP_ALOG_ALL by default) */
    double reload_drain_timeout; /* seconds an old generation may keep requests */
    double hook_timeout;         /* seconds one call into Lua may take before the watchdog reports it */
    int watch;                   /* reload when the script changes */
    mp_resolver_def_t resolver;  /* upstream servers by name */
    mp_compress_def_t compress;  /* the default of routes that set none */
} mp_settings_t;

/* A route's Lua chains (lua/moonproxy/hooks.lua): registry references in
 * the VM that built the configuration; LUA_NOREF where nothing is attached. */
typedef struct {
    int request;      /* rewrite, plugins, on_request, handler */
    int response;     /* plugins and on_response, on the response head */
    uint8_t captures; /* the request chain takes the regex captures */
    uint8_t handler;  /* the chain's result is the upstream (a handler route) */
} mp_route_hooks_t;

/* A static route's files (SPEC "Routes": static = {...}; served by static.c). */
typedef struct {
    char *root;        /* the folder (relative paths resolved from the script's folder); NULL: not static */
    char *index;       /* file served for a directory: "index.html" */
    char *fallback;    /* "/index.html": served (200) when a file is missing, or NULL */
    int precompressed; /* serve file.br / file.zst / file.gz beside a file when the client accepts it */
} mp_static_def_t;

typedef struct mp_config {
    char *path; /* the script */
    mp_settings_t settings;
    mp_addr_t *listens;
    size_t nlistens;
    mp_tls_server_t **listen_tls; /* by listen index: the listener's TLS, NULL when plain (owned) */
    mp_addr_t *admin;             /* NULL when no admin port */
    mp_tls_server_t *admin_tls;   /* the admin port's TLS, or NULL (owned) */
    char *admin_token;            /* Authorization: Bearer on the admin port (SPEC "Admin access"), or NULL */
    mp_upstream_def_t *upstreams;
    size_t nupstreams;
    mp_router_t *router;           /* route targets are indexes into upstreams; -1 for handler routes */
    int pre_ref;                   /* global request chain, before routing (LUA_NOREF: none) */
    int log_ref;                   /* on_log chain, after the response (LUA_NOREF: none) */
    int response_ref;              /* global response chain, for responses made before routing */
    mp_route_hooks_t *route_hooks; /* by route index - 1 */
    mp_static_def_t *statics;      /* by route index - 1; root NULL for routes that are not static */
    uint8_t *no_upgrade;           /* by route index - 1: upgrade = false (no WebSocket handshake forwarded) */
    mp_compress_def_t *compress;   /* by route index - 1: its compress (settings' when it sets none) */
    size_t nstatics;
    int has_hooks;  /* any chain at all: requests need a Lua object */
    int expect_ref; /* the proxy.expect guards, a list in the VM (nexpects > 0) */
    size_t nexpects;
} mp_config_t;

/* Builds a configuration from the normalized table at stack index idx (see
 * lua/moonproxy.lua, M._finish). Returns 0 with *out owned by the caller, or
 * MP_EINVAL with "file:line: message" in err. Does not pop the table. */
int mp_config_build(lua_State *L, int idx, mp_config_t **out, char *err, size_t errlen);

/* Loads the script at path in L (see vm.h) and builds it: the whole
 * "load a configuration file" step used by the server, -t and the tests. */
int mp_config_load(lua_State *L, const char *path, mp_config_t **out, char *err, size_t errlen);

/* The same from the script's text (a reload's or rollback's copy); path
 * still names it in errors and locates its sibling modules. */
int mp_config_load_text(lua_State *L, const char *path, const char *text, size_t len, mp_config_t **out, char *err,
                        size_t errlen);

void mp_config_free(mp_config_t *cfg);

/* Parses "host:port", "[v6]:port" or ":port" / "*:port" (any address). */
int mp_addr_parse(const char *text, mp_addr_t *out);
int mp_cidr_parse(const char *text, mp_cidr_t *out);
int mp_cidr_match(const mp_cidr_t *c, const struct sockaddr *sa);

/* Upstream index by name, or -1. */
int mp_config_upstream(const mp_config_t *cfg, const char *name);

#endif
