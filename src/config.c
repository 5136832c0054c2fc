/* config.c: loads a configuration script and turns the normalized table the
 * DSL returns (lua/moonproxy.lua, _finish) into an mp_config_t, loading
 * the certificates of its TLS listeners, admin port and upstreams (tls.h);
 * parses addresses and CIDRs. */
#include "config.h"

#include "log.h"
#include "path.h"
#include "vm.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <luajit.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* ---- addresses ---------------------------------------------------------- */

/* resolve.c's lookup, installed by the server and the Lua module (config.h). */
static _Atomic(mp_config_resolve_fn) resolver;

void mp_config_set_resolver(mp_config_resolve_fn fn)
{
    atomic_store(&resolver, fn);
}

static int parse_port(const char *s, unsigned *port)
{
    unsigned v = 0;
    size_t n = 0;
    for (; s[n] >= '0' && s[n] <= '9'; n++) {
        if (n == 5)
            return MP_EINVAL;
        v = v * 10 + (unsigned)(s[n] - '0');
    }
    if (n == 0 || s[n] != '\0' || v > 65535)
        return MP_EINVAL;
    *port = v;
    return 0;
}

int mp_addr_parse(const char *text, mp_addr_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!text)
        return MP_EINVAL;
    char host[INET6_ADDRSTRLEN];
    const char *h = text, *colon;
    int v6 = text[0] == '[';
    if (v6) {
        const char *close = strchr(text, ']');
        if (!close || close[1] != ':')
            return MP_EINVAL;
        h = text + 1;
        colon = close + 1;
    } else {
        colon = strrchr(text, ':');
        if (!colon || memchr(text, ':', (size_t)(colon - text)))
            return MP_EINVAL; /* no port, or an IPv6 address without brackets */
    }
    size_t hlen = (size_t)(colon - h) - (size_t)v6;
    unsigned port;
    if (hlen >= sizeof(host) || parse_port(colon + 1, &port) != 0)
        return MP_EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';

    if (v6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&out->ss;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            return MP_EINVAL;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        out->sslen = sizeof(*sin6);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&out->ss;
        if (hlen == 0 || strcmp(host, "*") == 0)
            sin->sin_addr.s_addr = htonl(INADDR_ANY);
        else if (strcmp(host, "localhost") == 0)
            sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        else if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            return MP_EINVAL;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        out->sslen = sizeof(*sin);
    }
    out->text = strdup(text);
    if (!out->text) {
        memset(out, 0, sizeof(*out));
        return MP_ENOMEM;
    }
    return 0;
}

static unsigned addr_port(const mp_addr_t *a)
{
    if (a->ss.ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port);
    return ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
}

int mp_cidr_parse(const char *text, mp_cidr_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!text)
        return MP_EINVAL;
    char host[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    size_t hlen = slash ? (size_t)(slash - text) : strlen(text);
    if (hlen == 0 || hlen >= sizeof(host))
        return MP_EINVAL;
    memcpy(host, text, hlen);
    host[hlen] = '\0';

    unsigned max;
    if (inet_pton(AF_INET, host, out->addr) == 1) {
        out->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, host, out->addr) == 1) {
        out->family = AF_INET6;
        max = 128;
    } else {
        return MP_EINVAL;
    }
    unsigned bits = max;
    if (slash) {
        bits = 0;
        const char *p = slash + 1;
        if (*p == '\0' || strlen(p) > 3)
            return MP_EINVAL;
        for (; *p; p++) {
            if (*p < '0' || *p > '9')
                return MP_EINVAL;
            bits = bits * 10 + (unsigned)(*p - '0');
        }
        if (bits > max)
            return MP_EINVAL;
    }
    out->bits = (uint8_t)bits;
    /* host bits are meaningless ("10.1.2.3/8" is 10.0.0.0/8): clear them */
    for (unsigned i = 0; i < max / 8; i++) {
        unsigned keep = bits > i * 8 ? bits - i * 8 : 0;
        if (keep < 8)
            out->addr[i] &= (uint8_t)(0xff00u >> keep);
    }
    return 0;
}

static int prefix_eq(const uint8_t *a, const uint8_t *b, unsigned bits)
{
    unsigned whole = bits / 8, rest = bits % 8;
    if (memcmp(a, b, whole) != 0)
        return 0;
    if (rest == 0)
        return 1;
    uint8_t mask = (uint8_t)(0xff00u >> rest);
    return (a[whole] & mask) == (b[whole] & mask);
}

int mp_cidr_match(const mp_cidr_t *c, const struct sockaddr *sa)
{
    static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    uint8_t a[16];
    if (sa->sa_family == AF_INET) {
        const uint8_t *ip = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
        if (c->family == AF_INET)
            return prefix_eq(ip, c->addr, c->bits);
        memcpy(a, v4mapped, 12); /* a v6 CIDR such as ::ffff:10.0.0.0/104 */
        memcpy(a + 12, ip, 4);
        return c->family == AF_INET6 && prefix_eq(a, c->addr, c->bits);
    }
    if (sa->sa_family == AF_INET6) {
        const uint8_t *ip = (const uint8_t *)&((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (c->family == AF_INET6)
            return prefix_eq(ip, c->addr, c->bits);
        return c->family == AF_INET && memcmp(ip, v4mapped, 12) == 0 && prefix_eq(ip + 12, c->addr, c->bits);
    }
    return 0;
}

/* ---- the build ----------------------------------------------------------- */

/* The walk runs protected (see mp_config_build): a problem raises
 * "src: message". Every allocation is attached to the config at once, so an
 * error leaks nothing: mp_config_free takes a half-built config.
 *
 * Defaults live in the DSL alone (lua/moonproxy.lua), which writes every
 * field into the table: here a field is copied and checked, and a missing
 * one is refused (only optional ones, whose absence means "none", may be
 * nil). */

static int fail(lua_State *L, const char *src, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(lua_State *L, const char *src, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    lua_pushfstring(L, "%s: %s", src ? src : "config", msg);
    return lua_error(L);
}

static char *xstrdup(lua_State *L, const char *s)
{
    char *d = s ? strdup(s) : NULL;
    if (s && !d)
        fail(L, NULL, "out of memory");
    return d;
}

static void *xcalloc(lua_State *L, size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        fail(L, NULL, "out of memory");
    return p;
}

static int missing(lua_State *L, const char *src, const char *what, const char *k)
{
    return fail(L, src, "%s: %s is missing", what, k);
}

/* A string field of the table at t: borrowed (valid while the table lives),
 * NULL when nil. */
static const char *get_str(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    lua_getfield(L, t, k);
    size_t len = 0;
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING) {
        s = lua_tolstring(L, -1, &len);
        if (strlen(s) != len)
            fail(L, src, "%s: %s holds a NUL byte", what, k);
    } else if (!lua_isnil(L, -1)) {
        fail(L, src, "%s: %s must be a string, got %s", what, k, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return s;
}

/* The same for a field that must be there. */
static const char *need_str(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    const char *v = get_str(L, t, k, src, what);
    if (!v)
        missing(L, src, what, k);
    return v;
}

#define DURATION_MIN 1e-9 /* seconds; the DSL refuses 0 */
#define DURATION_MAX 1e9  /* seconds; anything larger is a typo */

/* Pushes field k of the table at t, which must be there and of type type
 * (a_type names it in the error). */
static void push_need(lua_State *L, int t, const char *k, int type, const char *a_type, const char *src,
                      const char *what)
{
    lua_getfield(L, t, k);
    if (lua_isnil(L, -1))
        missing(L, src, what, k);
    if (lua_type(L, -1) != type)
        fail(L, src, "%s: %s must be %s, got %s", what, k, a_type, luaL_typename(L, -1));
}

static double get_num(lua_State *L, int t, const char *k, double lo, double hi, int integer, const char *src,
                      const char *what)
{
    push_need(L, t, k, LUA_TNUMBER, "a number", src, what);
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (!(v >= lo && v <= hi) || (integer && (double)(long long)v != v))
        fail(L, src, "%s: %s is out of range (%g)", what, k, v);
    return v;
}

static double get_dur(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    return get_num(L, t, k, DURATION_MIN, DURATION_MAX, 0, src, what);
}

static int get_bool(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    push_need(L, t, k, LUA_TBOOLEAN, "a boolean", src, what);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* Pushes the table field k and returns 1, or pushes nothing and returns 0 when nil. */
static int get_table(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    lua_getfield(L, t, k);
    if (lua_istable(L, -1))
        return 1;
    if (!lua_isnil(L, -1))
        fail(L, src, "%s: %s must be a table, got %s", what, k, luaL_typename(L, -1));
    lua_pop(L, 1);
    return 0;
}

/* Pushes the table field k, which must be there. */
static void need_table(lua_State *L, int t, const char *k, const char *src, const char *what)
{
    if (!get_table(L, t, k, src, what))
        missing(L, src, what, k);
}

/* settings.merge_slashes, escaped_slashes, underscores_in_headers (the
 * DSL checked them; a table built another way gets the same refusals). */
static void build_wire_settings(lua_State *L, int t, mp_settings_t *s, const char *src)
{
    static const char *const modes[] = {"reject", "keep", "decode"}; /* by mp_escaped_slashes */
    s->merge_slashes = get_bool(L, t, "merge_slashes", src, "settings");
    s->underscores_in_headers = get_bool(L, t, "underscores_in_headers", src, "settings");
    const char *mode = need_str(L, t, "escaped_slashes", src, "settings");
    s->escaped_slashes = -1;
    for (int i = 0; i < (int)MP_ARRAY_LEN(modes); i++)
        if (strcmp(mode, modes[i]) == 0)
            s->escaped_slashes = i;
    if (s->escaped_slashes < 0)
        fail(L, src, "settings: escaped_slashes must be \"reject\", \"keep\" or \"decode\", got \"%s\"", mode);
}

/* settings.resolver = { nameservers = { "127.0.0.1:5353" }, hosts, timeout }:
 * the nameservers joined for c-ares ("a,b"). */
static void build_resolver(lua_State *L, int t, mp_resolver_def_t *r, const char *src)
{
    const char *w = "settings.resolver";
    need_table(L, t, "resolver", src, "settings");
    int rt = lua_gettop(L);
    r->timeout = get_num(L, rt, "timeout", 0.01, 60, 0, src, w);
    r->hosts = xstrdup(L, get_str(L, rt, "hosts", src, w));
    if (get_table(L, rt, "nameservers", src, w)) {
        size_t n = lua_objlen(L, -1);
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -1, (int)i + 1);
            if (lua_type(L, -1) != LUA_TSTRING)
                fail(L, src, "%s: nameservers[%zu] must be a string", w, i + 1);
            lua_pop(L, 1);
        }
        if (n) {
            lua_getglobal(L, "table");
            lua_getfield(L, -1, "concat");
            lua_pushvalue(L, -3);
            lua_pushliteral(L, ",");
            lua_call(L, 2, 1);
            r->nameservers = xstrdup(L, lua_tostring(L, -1));
            lua_pop(L, 2);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* compress = {...} at field k of the table at t (the DSL checked and
 * defaulted it): into *c. Returns 1 when set (a table or false), 0 when nil. */
static int build_compress(lua_State *L, int t, const char *k, mp_compress_def_t *c, const char *src, const char *what)
{
    lua_getfield(L, t, k);
    int ct = lua_gettop(L);
    if (lua_isnil(L, ct) || (lua_isboolean(L, ct) && !lua_toboolean(L, ct))) {
        int set = !lua_isnil(L, ct);
        lua_pop(L, 1);
        return set;
    }
    if (!lua_istable(L, ct))
        fail(L, src, "%s: %s must be a table or false, got %s", what, k, luaL_typename(L, ct));
    c->on = 1;
    c->min_length = (uint64_t)get_num(L, ct, "min_length", 0, 9007199254740991.0, 1, src, what);
    lua_getfield(L, ct, "level");
    c->level = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
    lua_pop(L, 1);
    static const char *const names[] = {NULL, "gzip", "br", "zstd"};
    push_need(L, ct, "algorithms", LUA_TTABLE, "a list", src, what);
    for (int i = 1; c->nalgs < 3; i++) {
        lua_rawgeti(L, -1, i);
        const char *a = lua_tostring(L, -1);
        lua_pop(L, 1);
        if (!a)
            break;
        for (uint8_t e = MP_ENC_GZIP; e <= MP_ENC_ZSTD; e++)
            if (strcmp(a, names[e]) == 0)
                c->algs[c->nalgs++] = e;
    }
    lua_pop(L, 1);
    push_need(L, ct, "types", LUA_TTABLE, "a list", src, what);
    size_t n = lua_objlen(L, -1);
    c->types = xcalloc(L, n ? n : 1, sizeof(*c->types));
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        const char *ty = lua_tostring(L, -1);
        if (ty) {
            char *d = xstrdup(L, ty);
            for (char *q = d; *q; q++)
                *q = (char)(*q >= 'A' && *q <= 'Z' ? *q + 32 : *q);
            c->types[c->ntypes++] = d;
        }
        lua_pop(L, 1);
    }
    lua_settop(L, ct - 1);
    return 1;
}

/* A copy of c (its types too) for a route that takes settings' default. */
static void copy_compress(lua_State *L, mp_compress_def_t *to, const mp_compress_def_t *c)
{
    *to = *c;
    to->types = xcalloc(L, c->ntypes ? c->ntypes : 1, sizeof(*to->types));
    for (size_t i = 0; i < c->ntypes; i++)
        to->types[i] = xstrdup(L, c->types[i]);
}

static void compress_dispose(mp_compress_def_t *c)
{
    for (size_t i = 0; i < c->ntypes; i++)
        free(c->types[i]);
    free(c->types);
}

static void build_settings(lua_State *L, mp_settings_t *s)
{
    need_table(L, 1, "settings", NULL, "config");
    int t = lua_gettop(L);
    const char *src = get_str(L, t, "src", NULL, "settings");
    const char *w = "settings";
    s->workers = (int)get_num(L, t, "workers", 0, 1024, 1, src, w);
    s->client_header_timeout = get_dur(L, t, "client_header_timeout", src, w);
    s->client_body_timeout = get_dur(L, t, "client_body_timeout", src, w);
    s->keepalive_timeout = get_dur(L, t, "keepalive_timeout", src, w);
    s->shutdown_timeout = get_dur(L, t, "shutdown_timeout", src, w);
    s->max_header_size = (size_t)get_num(L, t, "max_header_size", 1, 1e9, 1, src, w);
    s->max_uri_size = (size_t)get_num(L, t, "max_uri_size", 1, 1e9, 1, src, w);
    s->body_buffer_size = (size_t)get_num(L, t, "body_buffer_size", 1024, 64 * 1024 * 1024, 1, src, w);
    s->max_body_size = (uint64_t)get_num(L, t, "max_body_size", 0, 9007199254740991.0, 1, src, w);
    s->lua_memory = (size_t)get_num(L, t, "lua_memory", 1 << 20, 9007199254740991.0, 1, src, w);
    s->max_connections = (int)get_num(L, t, "max_connections", 1, INT_MAX, 1, src, w);
    build_wire_settings(L, t, s, src);
    s->reload_drain_timeout = get_dur(L, t, "reload_drain_timeout", src, w);
    s->hook_timeout = get_dur(L, t, "hook_timeout", src, w);
    s->watch = get_bool(L, t, "watch", src, w);
    build_resolver(L, t, &s->resolver, src);
    build_compress(L, t, "compress", &s->compress, src, w);

    s->error_log = xstrdup(L, get_str(L, t, "error_log", src, w));
    s->access_log_fields = MP_ALOG_ALL;
    lua_getfield(L, t, "access_log_fields");
    if (lua_istable(L, -1)) {
        s->access_log_fields = 0;
        for (int i = 1;; i++) {
            lua_rawgeti(L, -1, i);
            const char *f = lua_tostring(L, -1);
            lua_pop(L, 1);
            if (!f)
                break;
            int bit = mp_alog_field(f);
            if (bit < 0)
                fail(L, src,
                     "settings: access_log fields: unknown field '%s' (time, id, trace_id, span_id, client, method, "
                     "path, route, tls, sni, status, bytes, upstream, upstream_time, tunnel, duration)",
                     f);
            s->access_log_fields |= 1u << bit;
        }
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "access_log"); /* false: off */
    if (lua_isnil(L, -1))
        missing(L, src, w, "access_log");
    else if (lua_type(L, -1) != LUA_TBOOLEAN || lua_toboolean(L, -1))
        s->access_log = xstrdup(L, get_str(L, t, "access_log", src, w));
    lua_pop(L, 1);

    if (get_table(L, t, "tracing", src, w)) {
        int tt = lua_gettop(L);
        lua_getfield(L, tt, "sample");
        s->trace_sample = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 0;
        lua_pop(L, 1);
        if (get_table(L, tt, "trust", src, "tracing")) {
            size_t k = lua_objlen(L, -1);
            s->trace_trusted = xcalloc(L, k ? k : 1, sizeof(*s->trace_trusted));
            s->ntrace_trusted = k;
            for (size_t i = 0; i < k; i++) {
                lua_rawgeti(L, -1, (int)i + 1);
                const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
                if (!text || mp_cidr_parse(text, &s->trace_trusted[i]) != 0)
                    fail(L, src, "settings: tracing.trust[%zu] is not an address or CIDR: %s", i + 1,
                         text ? text : luaL_typename(L, -1));
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
        lua_settop(L, tt - 1);
    }
    need_table(L, t, "trusted_proxies", src, w);
    size_t n = lua_objlen(L, -1);
    s->trusted = xcalloc(L, n, sizeof(*s->trusted));
    s->ntrusted = n;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        const char *text = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (!text || mp_cidr_parse(text, &s->trusted[i]) != 0)
            fail(L, src,
                 "settings: trusted_proxies[%zu] is not an address or CIDR (\"10.0.0.0/8\", "
                 "\"::1/128\"): %s",
                 i + 1, text ? text : luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 2); /* the list, the settings */
}

/* The address at field k of the table on top; listeners may use port 0. */
static void build_addr(lua_State *L, mp_addr_t *a, const char *k, const char *src, const char *what, int listener)
{
    const char *text = get_str(L, lua_gettop(L), k, src, what);
    if (!text)
        fail(L, src, "%s: needs %s", what, k);
    int rc = mp_addr_parse(text, a);
    if (rc == MP_ENOMEM)
        fail(L, src, "out of memory");
    if (rc != 0 || (!listener && addr_port(a) == 0))
        fail(L, src, "%s: bad address '%s' (numeric \"ip:port\" or \"[ipv6]:port\")", what, text);
}

/* ---- TLS (SPEC "TLS") ---------------------------------------------------- */

/* protocols = { "TLSv1.2", "TLSv1.3" } of the tls table at t, as bits. */
static unsigned build_protocols(lua_State *L, int t, const char *src, const char *what)
{
    need_table(L, t, "protocols", src, what);
    unsigned bits = 0;
    for (size_t i = 1; i <= lua_objlen(L, -1); i++) {
        lua_rawgeti(L, -1, (int)i);
        const char *p = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
        if (strcmp(p, "TLSv1.2") == 0)
            bits |= MP_TLS_V12;
        else if (strcmp(p, "TLSv1.3") == 0)
            bits |= MP_TLS_V13;
        else
            fail(L, src, "%s: protocols[%zu] must be \"TLSv1.2\" or \"TLSv1.3\", got \"%s\"", what, i, p);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (!bits)
        fail(L, src, "%s: protocols must not be empty", what);
    return bits;
}

/* cert and key of the table at t (borrowed from it). */
static void build_pair(lua_State *L, int t, mp_tls_pair_t *p, const char *src, const char *what)
{
    p->cert = need_str(L, t, "cert", src, what);
    p->key = need_str(L, t, "key", src, what);
}

/* The contexts of the tls = {...} table on top of the stack (left there),
 * for the port the message names ("listen 127.0.0.1:8443"). Every string
 * and the certs array are borrowed from the table or a userdata on the
 * stack: a raise leaks nothing. */
static mp_tls_server_t *build_tls_server(lua_State *L, const char *src, const char *port)
{
    int t = lua_gettop(L);
    char what[300];
    snprintf(what, sizeof(what), "%s: tls", port);
    mp_tls_server_def_t def = {0};
    build_pair(L, t, &def.def, src, what);
    def.protocols = build_protocols(L, t, src, what);
    def.ciphers = get_str(L, t, "ciphers", src, what);
    def.client_ca = get_str(L, t, "client_ca", src, what);
    if (get_table(L, t, "certs", src, what)) {
        size_t n = lua_objlen(L, -1);
        mp_tls_pair_t *more = lua_newuserdata(L, (n ? n : 1) * sizeof(*more));
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -2, (int)i + 1);
            if (!lua_istable(L, -1))
                fail(L, src, "%s: certs[%zu] must be a table", what, i + 1);
            build_pair(L, lua_gettop(L), &more[i], src, what);
            lua_pop(L, 1);
        }
        def.more = more, def.nmore = n;
    }
    char err[512];
    mp_tls_server_t *s = mp_tls_server_new(&def, err, sizeof(err));
    if (!s)
        fail(L, src, "%s: %s", what, err);
    lua_settop(L, t);
    return s;
}

/* tls = { verify, ca, server_name, cert, key } of the upstream table at t. */
static void build_tls_client(lua_State *L, int t, mp_upstream_def_t *u, const char *src)
{
    if (!get_table(L, t, "tls", src, "upstream"))
        return;
    int tt = lua_gettop(L);
    char what[300];
    snprintf(what, sizeof(what), "upstream %s: tls", u->name);
    mp_tls_client_def_t def = {0};
    def.verify = get_bool(L, tt, "verify", src, what);
    def.ca = get_str(L, tt, "ca", src, what);
    def.cert = get_str(L, tt, "cert", src, what);
    def.key = get_str(L, tt, "key", src, what);
    if (!def.cert != !def.key)
        fail(L, src, "%s: a client certificate needs both cert and key", what);
    u->tls_name = xstrdup(L, get_str(L, tt, "server_name", src, what));
    char err[512];
    if (!(u->tls = mp_tls_client_new(&def, err, sizeof(err))))
        fail(L, src, "%s: %s", what, err);
    lua_pop(L, 1);
}

/* The listener's or admin port's tls table, if any, of the table on top. */
static mp_tls_server_t *port_tls(lua_State *L, const mp_addr_t *a, const char *kind, const char *src)
{
    if (!get_table(L, lua_gettop(L), "tls", src, kind))
        return NULL;
    char port[280];
    snprintf(port, sizeof(port), "%s %s", kind, a->text);
    mp_tls_server_t *s = build_tls_server(L, src, port);
    lua_pop(L, 1);
    return s;
}

static void build_listeners(lua_State *L, mp_config_t *cfg)
{
    if (!get_table(L, 1, "listen", NULL, "config") || lua_objlen(L, -1) == 0)
        fail(L, cfg->path, "no listener: declare one with proxy.listen { addr = \"127.0.0.1:8080\" }");
    size_t n = lua_objlen(L, -1);
    cfg->listen_tls = xcalloc(L, n, sizeof(*cfg->listen_tls));
    cfg->listens = xcalloc(L, n, sizeof(*cfg->listens));
    cfg->nlistens = n;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (!lua_istable(L, -1))
            fail(L, NULL, "listen[%zu] must be a table", i + 1);
        const char *src = get_str(L, -1, "src", NULL, "listen");
        build_addr(L, &cfg->listens[i], "addr", src, "listen", 1);
        cfg->listen_tls[i] = port_tls(L, &cfg->listens[i], "listen", src);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    if (get_table(L, 1, "admin", NULL, "config")) {
        cfg->admin = xcalloc(L, 1, sizeof(*cfg->admin));
        const char *src = get_str(L, -1, "src", NULL, "admin");
        build_addr(L, cfg->admin, "addr", src, "admin", 1);
        cfg->admin_token = xstrdup(L, get_str(L, -1, "token", src, "admin"));
        cfg->admin_tls = port_tls(L, cfg->admin, "admin", src);
        lua_pop(L, 1);
    }
}

/* A registry reference to the function at field k of the table at t, or
 * LUA_NOREF. */
static int ref_field_at(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void build_statuses(lua_State *L, int t, const char *k, mp_statuses_t *out, const char *src)
{
    lua_getfield(L, t, k);
    if (lua_istable(L, -1)) {
        size_t n = lua_objlen(L, -1);
        if (n > MP_MAX_STATUSES)
            fail(L, src, "%s: at most %d statuses", k, MP_MAX_STATUSES);
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -1, (int)i + 1);
            out->codes[out->n++] = (uint16_t)lua_tointeger(L, -1);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

static void build_passive(lua_State *L, int t, mp_upstream_def_t *u, const char *src)
{
    need_table(L, t, "passive", src, "upstream");
    int pt = lua_gettop(L);
    u->passive_failures = (int)get_num(L, pt, "failures", 0, 1000000, 1, src, "upstream passive");
    u->passive_cooldown = get_dur(L, pt, "cooldown", src, "upstream passive");
    build_statuses(L, pt, "statuses", &u->passive_statuses, src);
    lua_pop(L, 1);
}

static void build_health(lua_State *L, int t, mp_upstream_def_t *u, const char *src)
{
    if (!get_table(L, t, "health", src, "upstream"))
        return;
    int ht = lua_gettop(L);
    mp_health_def_t *h = u->health = xcalloc(L, 1, sizeof(*h));
    const char *w = "upstream health";
    h->path = xstrdup(L, need_str(L, ht, "path", src, w));
    h->host = xstrdup(L, get_str(L, ht, "host", src, w));
    h->interval = get_dur(L, ht, "interval", src, w);
    h->timeout = get_dur(L, ht, "timeout", src, w);
    h->rise = (int)get_num(L, ht, "rise", 1, 100, 1, src, w);
    h->fall = (int)get_num(L, ht, "fall", 1, 100, 1, src, w);
    build_statuses(L, ht, "statuses", &h->statuses, src);
    lua_pop(L, 1);
}

static void addr_dispose(mp_addr_t *a);

/* Appends a server to u (a's text is taken); an address already there (a
 * name that resolved to a listed one) is left out. */
static void add_server(lua_State *L, mp_upstream_def_t *u, size_t *cap, mp_addr_t *a, const char *name, int weight,
                       int by_name)
{
    for (size_t i = 0; i < u->nservers; i++)
        if (strcmp(u->servers[i].addr.text, a->text) == 0) {
            addr_dispose(a);
            return;
        }
    if (u->nservers == *cap) {
        mp_server_def_t *more = realloc(u->servers, *cap * 2 * sizeof(*more));
        if (!more) {
            addr_dispose(a);
            fail(L, NULL, "out of memory");
        }
        u->servers = more;
        *cap *= 2;
    }
    mp_server_def_t *s = &u->servers[u->nservers];
    *s = (mp_server_def_t){.addr = *a, .weight = weight, .by_name = by_name};
    u->nservers++; /* owned by the config from here: freed with it */
    s->name = xstrdup(L, name);
}

/* "name:port" with a DNS name (letters, digits, "-", "_", dots), not an
 * IP address: a server resolve_server looks up. */
static int dns_name(const char *text)
{
    const char *colon = strrchr(text, ':');
    unsigned port;
    if (!colon || colon == text || (size_t)(colon - text) > 253 || parse_port(colon + 1, &port) != 0 || port == 0)
        return 0;
    int letter = 0;
    size_t label = 0;
    for (const char *p = text; p < colon; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '.') {
            if (label == 0)
                return 0;
            label = 0;
        } else if (isalnum(c) || c == '-' || c == '_') {
            letter |= !isdigit(c);
            if (++label > 63)
                return 0;
        } else {
            return 0;
        }
    }
    return letter;
}

/* A server written "name:port": one server per address the name resolves
 * to (resolve.h), each with the name's weight. */
static void resolve_server(lua_State *L, mp_config_t *cfg, mp_upstream_def_t *u, size_t *cap, const char *text,
                           int weight)
{
    const char *colon = strrchr(text, ':');
    char host[256], err[512];
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    unsigned port = 0;
    parse_port(colon + 1, &port);
    mp_sockaddr_t addrs[MP_RESOLVE_MAX];
    mp_config_resolve_fn fn = atomic_load(&resolver);
    int n = -1;
    if (!fn)
        snprintf(err, sizeof(err), "%s: names are not resolved here (no resolver)", host);
    else
        n = fn(&cfg->settings.resolver, host, addrs, MP_RESOLVE_MAX, err, sizeof(err));
    if (n <= 0)
        fail(L, u->src, "upstream %s: server %s: cannot resolve: %s", u->name, text, n == 0 ? "no address" : err);
    for (int i = 0; i < n; i++) {
        mp_addr_t a = {.ss = addrs[i].ss, .sslen = addrs[i].sslen};
        char ip[INET6_ADDRSTRLEN], t[INET6_ADDRSTRLEN + 8];
        if (a.ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a.ss;
            in6->sin6_port = htons((uint16_t)port);
            inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
            snprintf(t, sizeof(t), "[%s]:%u", ip, port);
        } else {
            struct sockaddr_in *in = (struct sockaddr_in *)&a.ss;
            in->sin_port = htons((uint16_t)port);
            inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
            snprintf(t, sizeof(t), "%s:%u", ip, port);
        }
        if (!(a.text = strdup(t)))
            fail(L, NULL, "out of memory");
        add_server(L, u, cap, &a, text, weight, 1);
    }
}

/* TLS to servers given by name: SNI and the name verified are that name
 * (not the address it resolved to) unless tls.server_name says otherwise;
 * servers of more than one name, or of names and addresses, need it said. */
static void tls_name_of_servers(lua_State *L, mp_upstream_def_t *u)
{
    int any = 0;
    for (size_t i = 0; i < u->nservers; i++)
        any |= u->servers[i].by_name;
    if (!u->tls || u->tls_name || !any)
        return;
    const char *first = u->servers[0].name;
    size_t hlen = (size_t)(strrchr(first, ':') - first);
    for (size_t i = 0; i < u->nservers; i++) {
        const char *n = u->servers[i].name;
        if (!u->servers[i].by_name || strncmp(n, first, hlen) != 0 || n[hlen] != ':')
            fail(L, u->src,
                 "upstream %s: tls: servers given by more than one name (or by name and by address) "
                 "need tls.server_name",
                 u->name);
    }
    if (!(u->tls_name = strndup(first, hlen)))
        fail(L, NULL, "out of memory");
}

static void build_upstream(lua_State *L, mp_config_t *cfg, mp_upstream_def_t *u)
{
    int t = lua_gettop(L);
    u->src = xstrdup(L, get_str(L, t, "src", NULL, "upstream"));
    const char *src = u->src;
    const char *name = get_str(L, t, "name", src, "upstream");
    if (!name || !*name)
        fail(L, src, "upstream: needs a name");
    if (mp_config_upstream(cfg, name) >= 0)
        fail(L, src, "upstream '%s' is declared twice", name);
    u->name = xstrdup(L, name);
    const char *w = "upstream";
    u->balancer = xstrdup(L, need_str(L, t, "balancer", src, w));
    u->balancer_ref = ref_field_at(L, t, "balancer_fn");
    u->hash_key = xstrdup(L, get_str(L, t, "hash_key", src, w));
    u->hash_key_ref = ref_field_at(L, t, "hash_key_fn");
    u->fail_open = get_bool(L, t, "fail_open", src, w);
    u->retry_budget = get_num(L, t, "retry_budget", 0, 1, 0, src, w);
    build_passive(L, t, u, src);
    build_health(L, t, u, src);
    u->keepalive = (int)get_num(L, t, "keepalive", 0, 100000, 1, src, w);
    u->keepalive_timeout = get_dur(L, t, "keepalive_timeout", src, w);
    u->retries = (int)get_num(L, t, "retries", 0, 100, 1, src, w);
    u->host = xstrdup(L, get_str(L, t, "host", src, w));
    build_tls_client(L, t, u, src);
    need_table(L, t, "timeouts", src, w);
    int tt = lua_gettop(L);
    u->connect_timeout = get_dur(L, tt, "connect", src, "upstream timeouts");
    u->send_timeout = get_dur(L, tt, "send", src, "upstream timeouts");
    u->read_timeout = get_dur(L, tt, "read", src, "upstream timeouts");
    u->tunnel_timeout = get_dur(L, tt, "tunnel", src, "upstream timeouts");
    lua_pop(L, 1);
    need_table(L, t, "resolve", src, w);
    u->resolve_min = get_dur(L, lua_gettop(L), "min", src, "upstream resolve");
    u->resolve_max = get_dur(L, lua_gettop(L), "max", src, "upstream resolve");
    lua_pop(L, 1);
    if (u->resolve_min > u->resolve_max)
        fail(L, src, "upstream '%s': resolve: min (%g) is greater than max (%g)", name, u->resolve_min, u->resolve_max);
    if (!get_table(L, t, "servers", src, w) || lua_objlen(L, -1) == 0)
        fail(L, src, "upstream '%s': needs at least one server", name);
    size_t n = lua_objlen(L, -1), cap = n;
    u->servers = xcalloc(L, cap, sizeof(*u->servers));
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (!lua_istable(L, -1))
            fail(L, src, "upstream '%s': servers[%zu] must be a table", name, i + 1);
        int weight = (int)get_num(L, lua_gettop(L), "weight", 1, 1000, 1, src, "upstream server");
        const char *text = get_str(L, lua_gettop(L), "addr", src, "upstream server");
        if (!text)
            fail(L, src, "upstream server: needs addr");
        mp_addr_t a;
        int rc = mp_addr_parse(text, &a);
        if (rc == MP_ENOMEM)
            fail(L, src, "out of memory");
        if (rc == 0 && addr_port(&a) == 0) {
            addr_dispose(&a);
            rc = MP_EINVAL;
        }
        if (rc == 0) {
            add_server(L, u, &cap, &a, text, weight, 0);
        } else if (dns_name(text)) {
            resolve_server(L, cfg, u, &cap, text, weight);
        } else {
            fail(L, src, "upstream server: bad address '%s' (\"ip:port\", \"[ipv6]:port\" or \"name:port\")", text);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    tls_name_of_servers(L, u);
}

static void build_upstreams(lua_State *L, mp_config_t *cfg)
{
    if (!get_table(L, 1, "upstreams", NULL, "config"))
        return;
    size_t n = lua_objlen(L, -1);
    cfg->upstreams = xcalloc(L, n, sizeof(*cfg->upstreams));
    cfg->nupstreams = n;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (!lua_istable(L, -1))
            fail(L, NULL, "upstreams[%zu] must be a table", i + 1);
        build_upstream(L, cfg, &cfg->upstreams[i]);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Route methods and headers: the pointer arrays live in a userdata left on
 * the stack (collected by Lua, so a raise leaks nothing); the strings stay
 * borrowed from the route table, which is alive until mp_router_add copies. */
static void route_filters(lua_State *L, int t, mp_route_def_t *def, const char *src)
{
    if (get_table(L, t, "methods", src, "route")) {
        size_t n = lua_objlen(L, -1);
        const char **m = lua_newuserdata(L, (n ? n : 1) * sizeof(*m));
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -2, (int)i + 1);
            if (lua_type(L, -1) != LUA_TSTRING)
                fail(L, src, "route: methods[%zu] must be a string", i + 1);
            m[i] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
        def->methods = m, def->nmethods = n;
        lua_replace(L, -2); /* keep the userdata, drop the list */
    } else {
        lua_pushnil(L);
    }
    if (get_table(L, t, "headers", src, "route")) {
        size_t n = lua_objlen(L, -1);
        mp_route_header_def_t *h = lua_newuserdata(L, (n ? n : 1) * sizeof(*h));
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -2, (int)i + 1);
            if (!lua_istable(L, -1))
                fail(L, src, "route: headers[%zu] must be a table", i + 1);
            int e = lua_gettop(L);
            h[i].name = get_str(L, e, "name", src, "route header");
            h[i].value = get_str(L, e, "value", src, "route header");
            if (!h[i].name || !h[i].value)
                fail(L, src, "route: headers[%zu] needs name and value", i + 1);
            lua_getfield(L, e, "regex");
            h[i].is_regex = lua_toboolean(L, -1);
            lua_pop(L, 2);
        }
        def->headers = h, def->nheaders = n;
        lua_replace(L, -2);
    } else {
        lua_pushnil(L);
    }
}

/* The static = {...} table on top of the stack, for the route about to be
 * added: root must be a directory now, fallback a file under it. */
static void build_static(lua_State *L, mp_config_t *cfg, const char *name, const char *src)
{
    int t = lua_gettop(L);
    mp_static_def_t *s = &cfg->statics[mp_router_count(cfg->router)];
    const char *w = "route static";
    s->root = xstrdup(L, get_str(L, t, "root", src, w));
    if (!s->root)
        fail(L, src, "route '%s': static needs root", name);
    s->index = xstrdup(L, need_str(L, t, "index", src, w));
    s->fallback = xstrdup(L, get_str(L, t, "fallback", src, w));
    s->precompressed = get_bool(L, t, "precompressed", src, w);
    struct stat st;
    if (stat(s->root, &st) != 0)
        fail(L, src, "route '%s': static root '%s' %s", name, s->root,
             errno == ENOENT || errno == ENOTDIR ? "does not exist" : strerror(errno));
    if (!S_ISDIR(st.st_mode))
        fail(L, src, "route '%s': static root '%s' is not a directory", name, s->root);
    if (s->fallback) {
        char *p = lua_newuserdata(L, strlen(s->root) + strlen(s->fallback) + 1);
        strcat(strcpy(p, s->root), s->fallback);
        if (stat(p, &st) != 0 || !S_ISREG(st.st_mode))
            fail(L, src, "route '%s': static fallback '%s' is not a file in root '%s'", name, s->fallback, s->root);
    }
    lua_settop(L, t);
}

/* A route's path or prefix p (field k) meets normalised paths only
 * (path.h): one that normalisation would change could never match, so it
 * is refused, with the spelling that would. */
static void check_route_path(lua_State *L, const mp_settings_t *s, const char *p, const char *k, const char *name,
                             const char *src)
{
    mp_path_opts_t o = {(uint8_t)s->merge_slashes, (uint8_t)s->escaped_slashes};
    size_t len = p ? strlen(p) : 0;
    if (!p || mp_path_is_normal(p, len, &o))
        return;
    char *out = lua_newuserdata(L, len);
    const char *why = NULL;
    ssize_t n = mp_path_normalize(p, len, &o, out, &why);
    if (n < 0)
        fail(L, src, "route '%s': %s '%s' never matches: such a path is refused with 400 (%s)", name, k, p, why);
    if ((size_t)n != len || memcmp(out, p, len) != 0)
        fail(L, src, "route '%s': %s '%s' never matches a normalised path; write '%.*s'", name, k, p, (int)n, out);
    lua_pop(L, 1);
}

static void build_route(lua_State *L, mp_config_t *cfg)
{
    int t = lua_gettop(L);
    const char *src = get_str(L, t, "src", NULL, "route");
    mp_route_def_t def = {0};
    def.src = src;
    def.name = get_str(L, t, "name", src, "route");
    def.host = get_str(L, t, "host", src, "route");
    def.path = get_str(L, t, "path", src, "route");
    def.prefix = get_str(L, t, "prefix", src, "route");
    def.regex = get_str(L, t, "regex", src, "route");
    check_route_path(L, &cfg->settings, def.path, "path", def.name ? def.name : "?", src);
    check_route_path(L, &cfg->settings, def.prefix, "prefix", def.name ? def.name : "?", src);
    def.strip_prefix = get_bool(L, t, "strip_prefix", src, "route");
    lua_getfield(L, t, "upgrade"); /* default true: WebSocket handshakes are forwarded */
    cfg->no_upgrade[mp_router_count(cfg->router)] = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
    lua_pop(L, 1);
    mp_compress_def_t *cz = &cfg->compress[mp_router_count(cfg->router)];
    if (!build_compress(L, t, "compress", cz, src, "route") && cfg->settings.compress.on)
        copy_compress(L, cz, &cfg->settings.compress);
    const char *up = get_str(L, t, "upstream", src, "route");
    lua_getfield(L, t, "handler");
    int handler = lua_isfunction(L, -1);
    lua_pop(L, 1);
    int is_static = get_table(L, t, "static", src, "route");
    if (is_static) {
        build_static(L, cfg, def.name ? def.name : "?", src);
        lua_pop(L, 1);
    }
    if (!!up + handler + is_static != 1)
        fail(L, src, "route: needs one target: upstream = ..., handler = function(req) or static = {...}");
    def.target = up ? mp_config_upstream(cfg, up) : -1;
    if (up && def.target < 0)
        fail(L, src, "route '%s': unknown upstream '%s'", def.name ? def.name : "?", up);
    route_filters(L, t, &def, src);
    char err[512];
    if (mp_router_add(cfg->router, &def, err, sizeof(err)) != 0) {
        lua_pushstring(L, err); /* already "src: message" */
        lua_error(L);
    }
    lua_settop(L, t);
}

static void build_routes(lua_State *L, mp_config_t *cfg)
{
    cfg->router = mp_router_new();
    if (!cfg->router)
        fail(L, NULL, "out of memory");
    if (!get_table(L, 1, "routes", NULL, "config"))
        return;
    size_t n = lua_objlen(L, -1);
    cfg->statics = xcalloc(L, n, sizeof(*cfg->statics));
    cfg->nstatics = n;
    cfg->no_upgrade = xcalloc(L, n ? n : 1, sizeof(*cfg->no_upgrade));
    cfg->compress = xcalloc(L, n ? n : 1, sizeof(*cfg->compress));
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (!lua_istable(L, -1))
            fail(L, NULL, "routes[%zu] must be a table", i + 1);
        build_route(L, cfg);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* A registry reference to the function at field k of the table on top, or
 * LUA_NOREF. */
static int ref_field(lua_State *L, const char *k)
{
    lua_getfield(L, -1, k);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* The chains lua/moonproxy/hooks.lua built, as references in this VM. */
static void build_hooks(lua_State *L, mp_config_t *cfg)
{
    size_t n = mp_router_count(cfg->router);
    cfg->route_hooks = xcalloc(L, n ? n : 1, sizeof(*cfg->route_hooks));
    cfg->pre_ref = cfg->log_ref = cfg->response_ref = LUA_NOREF;
    for (size_t i = 0; i < n; i++)
        cfg->route_hooks[i].request = cfg->route_hooks[i].response = LUA_NOREF;
    if (!get_table(L, 1, "hooks", NULL, "config"))
        return;
    cfg->pre_ref = ref_field(L, "pre");
    cfg->log_ref = ref_field(L, "log");
    cfg->response_ref = ref_field(L, "response");
    lua_getfield(L, -1, "routes");
    for (size_t i = 0; i < n && lua_istable(L, -1); i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (lua_istable(L, -1)) {
            mp_route_hooks_t *h = &cfg->route_hooks[i];
            h->request = ref_field(L, "request");
            h->response = ref_field(L, "response");
            lua_getfield(L, -1, "captures");
            h->captures = (uint8_t)lua_toboolean(L, -1);
            lua_pop(L, 1);
            h->handler = mp_router_get(cfg->router, i)->target < 0 && !cfg->statics[i].root;
            cfg->has_hooks |= h->request != LUA_NOREF || h->response != LUA_NOREF;
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
    cfg->has_hooks |= cfg->pre_ref != LUA_NOREF || cfg->log_ref != LUA_NOREF;
}

/* lua_CFunction: (normalized table, cfg lightuserdata). */
static int build(lua_State *L)
{
    mp_config_t *cfg = lua_touserdata(L, 2);
    luaL_checktype(L, 1, LUA_TTABLE);
    build_settings(L, &cfg->settings);
    build_listeners(L, cfg);
    build_upstreams(L, cfg);
    build_routes(L, cfg);
    build_hooks(L, cfg);
    lua_getfield(L, 1, "expects");
    cfg->nexpects = lua_istable(L, -1) ? lua_objlen(L, -1) : 0;
    cfg->expect_ref = cfg->nexpects ? luaL_ref(L, LUA_REGISTRYINDEX) : (lua_pop(L, 1), LUA_NOREF);
    return 0;
}

/* Cuts the traceback mp_vm_call appends: configuration errors are the
 * operator's, and "file:line: message" is what they need. */
static void strip_traceback(char *err)
{
    char *tb = err ? strstr(err, "\nstack traceback:") : NULL;
    if (tb)
        *tb = '\0';
}

int mp_config_build(lua_State *L, int idx, mp_config_t **out, char *err, size_t errlen)
{
    *out = NULL;
    mp_config_t *cfg = calloc(1, sizeof(*cfg));
    if (!cfg) {
        snprintf(err, errlen, "out of memory");
        return MP_ENOMEM;
    }
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    lua_pushcfunction(L, build);
    lua_pushvalue(L, idx);
    lua_pushlightuserdata(L, cfg);
    if (mp_vm_call(L, 2, 0, err, errlen) != 0) {
        strip_traceback(err);
        mp_config_free(cfg);
        return MP_EINVAL;
    }
    *out = cfg;
    return 0;
}

/* Set while mp_config_load_text runs the script on this thread: a hook that
 * kept a reference to _apply_lua_memory cannot lift its budget later. */
static _Thread_local int loading;

/* lua_CFunction: the DSL's _apply_lua_memory(bytes) -> fits, bytes held:
 * settings.lua_memory holds from the proxy.settings call on. Raises outside
 * a configuration load. */
static int apply_lua_memory(lua_State *L)
{
    if (!loading)
        return luaL_error(L, "_apply_lua_memory: only while the configuration loads");
    size_t limit = (size_t)luaL_checknumber(L, 1);
    lua_pushboolean(L, mp_vm_set_memory(L, limit) == 0);
    lua_pushnumber(L, (double)mp_vm_memory(L));
    return 2;
}

/* The budget of what the script built: what it holds must fit in it. */
static int check_lua_memory(lua_State *L, const mp_config_t *cfg, char *err, size_t errlen)
{
    if (mp_vm_set_memory(L, cfg->settings.lua_memory) == 0)
        return 0;
    snprintf(err, errlen, "%s: settings: lua_memory (%zu bytes) is less than the configuration holds (%zu bytes)",
             cfg->path, cfg->settings.lua_memory, mp_vm_memory(L));
    return MP_EINVAL;
}

/* lua_CFunction: (script path) -> the moonproxy module, reset, with the
 * script's folder on package.path so that a configuration can require its
 * sibling modules. That folder goes after moonproxy's own lua/ (see
 * mp_vm_new), and the DSL is loaded before: the script must not shadow it
 * (the default configuration file is itself called moonproxy.lua). */
static int prepare(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "moonproxy");
    lua_call(L, 1, 1); /* 2: the module */
    lua_getfield(L, 2, "_reset");
    lua_call(L, 0, 0);
    lua_pushcfunction(L, apply_lua_memory);
    lua_setfield(L, 2, "_apply_lua_memory");

    const char *slash = strrchr(path, '/');
    if (!slash)
        lua_pushliteral(L, ".");
    else
        lua_pushlstring(L, path, slash == path ? 1 : (size_t)(slash - path));
    const char *dir = lua_tostring(L, 3);
    const char *sep = slash == path ? "" : "/";
    const char *mine = lua_pushfstring(L, "%s%s?.lua;%s%s?/init.lua;", dir, sep, dir, sep);
    const char *lua_dir = mp_vm_lua_dir();
    const char *ours = lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", lua_dir, lua_dir);
    lua_getglobal(L, "package"); /* 6 */
    lua_getfield(L, 6, "path");
    const char *old = lua_isstring(L, 7) ? lua_tostring(L, 7) : "";
    size_t skip = strncmp(old, ours, strlen(ours)) == 0 ? strlen(ours) : 0;
    if (strncmp(old + skip, mine, strlen(mine)) != 0) {
        lua_pushlstring(L, old, skip);
        lua_pushstring(L, mine);
        lua_pushstring(L, old + skip);
        lua_concat(L, 3);
        lua_setfield(L, 6, "path");
    }
    lua_settop(L, 2);
    return 1;
}

int mp_config_load(lua_State *L, const char *path, mp_config_t **out, char *err, size_t errlen)
{
    return mp_config_load_text(L, path, NULL, 0, out, err, errlen);
}

int mp_config_load_text(lua_State *L, const char *path, const char *text, size_t len, mp_config_t **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    int top = lua_gettop(L), rc;
    loading = 1;
    lua_pushcfunction(L, prepare);
    lua_pushstring(L, path);
    rc = mp_vm_call(L, 1, 1, err, errlen);
    /* The script runs once: compiling its declarations into traces would
     * cost more than running them (each trace is an mprotect) and slow
     * reloads down; hooks are compiled later, when requests run them. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    if (rc == 0) {
        /* the chunk is named "@path": errors read "path:line:" */
        lua_pushfstring(L, "@%s", path);
        int bad = text ? luaL_loadbuffer(L, text, len, lua_tostring(L, -1)) : luaL_loadfile(L, path);
        lua_remove(L, -2);
        if (bad) {
            snprintf(err, errlen, "%s", lua_tostring(L, -1));
            rc = MP_EINVAL;
        } else {
            rc = mp_vm_call(L, 0, 0, err, errlen);
        }
    }
    if (rc == 0) {
        lua_getfield(L, top + 1, "_finish");
        lua_pushstring(L, path);
        rc = mp_vm_call(L, 1, 1, err, errlen);
    }
    if (rc == 0)
        rc = mp_config_build(L, -1, out, err, errlen);
    if (rc == 0 && !((*out)->path = strdup(path))) {
        mp_config_free(*out);
        *out = NULL;
        snprintf(err, errlen, "out of memory");
        rc = MP_ENOMEM;
    }
    loading = 0;
    if (lua_istable(L, top + 1)) { /* the module: its hook serves this load only */
        lua_pushnil(L);
        lua_setfield(L, top + 1, "_apply_lua_memory");
    }
    if (rc == 0 && (rc = check_lua_memory(L, *out, err, errlen)) != 0) {
        mp_config_free(*out);
        *out = NULL;
    } else if (rc != 0 && strncmp(err, "lua_memory", 10) == 0) {
        char msg[256]; /* a memory error has no file:line: name the script */
        snprintf(msg, sizeof(msg), "%s", err);
        snprintf(err, errlen, "%s: %s", path, msg);
    }
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_ON);
    if (rc != 0)
        strip_traceback(err);
    lua_settop(L, top);
    return rc;
}

static void addr_dispose(mp_addr_t *a)
{
    free(a->text);
    a->text = NULL;
}

void mp_config_free(mp_config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        mp_upstream_def_t *u = &cfg->upstreams[i];
        for (size_t j = 0; j < u->nservers; j++) {
            addr_dispose(&u->servers[j].addr);
            free(u->servers[j].name);
        }
        free(u->servers);
        free(u->name);
        free(u->balancer);
        free(u->host);
        free(u->src);
        free(u->hash_key);
        mp_tls_client_free(u->tls);
        free(u->tls_name);
        if (u->health) {
            free(u->health->path);
            free(u->health->host);
            free(u->health);
        }
    }
    free(cfg->upstreams);
    for (size_t i = 0; i < cfg->nlistens; i++) {
        addr_dispose(&cfg->listens[i]);
        if (cfg->listen_tls)
            mp_tls_server_free(cfg->listen_tls[i]);
    }
    free(cfg->listens);
    free(cfg->listen_tls);
    mp_tls_server_free(cfg->admin_tls);
    if (cfg->admin)
        addr_dispose(cfg->admin);
    free(cfg->admin);
    free(cfg->admin_token);
    free(cfg->settings.trusted);
    free(cfg->settings.trace_trusted);
    free(cfg->settings.access_log);
    free(cfg->settings.error_log);
    free(cfg->settings.resolver.nameservers);
    free(cfg->settings.resolver.hosts);
    if (cfg->router)
        mp_router_free(cfg->router);
    free(cfg->route_hooks);
    for (size_t i = 0; i < cfg->nstatics; i++) {
        free(cfg->statics[i].root);
        free(cfg->statics[i].index);
        free(cfg->statics[i].fallback);
        if (cfg->compress)
            compress_dispose(&cfg->compress[i]);
    }
    free(cfg->compress);
    compress_dispose(&cfg->settings.compress);
    free(cfg->statics);
    free(cfg->no_upgrade);
    free(cfg->path);
    free(cfg);
}

int mp_config_upstream(const mp_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nupstreams; i++)
        if (cfg->upstreams[i].name && strcmp(cfg->upstreams[i].name, name) == 0)
            return (int)i;
    return -1;
}
