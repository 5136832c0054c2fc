/* l_redis.c: the Redis calls of moonproxy.redis (l_redis.h) on the worker's
 * clients (redis.h).
 *
 * core.start(client, args, n) copies the command (n > 0: n arguments) or
 * the pipeline (n < 0: -n commands) and yields; start() sends it on the
 * worker's mp_redis_t for that client (made on first use, kept for the
 * worker's life: a reload that keeps the client keeps its connections);
 * the callback copies the replies and resumes the hook, which takes them
 * with core.answer() as Lua values. */
#include "l_redis.h"

#include "ctx.h"
#include "gen.h"
#include "l_request.h"
#include "redis.h"
#include "resolve.h"
#include "vm.h"

#include <arpa/inet.h>
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>

#define MAX_CLIENTS 64 /* per worker: clients are declared when the configuration loads */
#define MAX_ARGS 4096  /* arguments of one call, all its commands together */

/* A reply, copied out of hiredis' (valid only in the callback). */
typedef struct reply {
    int type; /* REDIS_REPLY_* */
    long long integer;
    char *str; /* status, string, error */
    size_t len;
    size_t n; /* array */
    struct reply **elem;
} reply_t;

#define RECHECK_SECONDS 1.0 /* a name's answer is looked at again at most this often (its TTL's floor) */

/* One client of one worker. */
typedef struct client {
    char *key;     /* what the Lua client is: name, addr, password, db, pool, timeout */
    mp_redis_t *r; /* NULL while its address is a name not resolved yet */
    char *host;    /* addr's host when it is a DNS name (owned) */
    int port;
    mp_redis_opts_t o; /* what mp_redis_new takes once the name resolved (password owned) */
    char *password;
    /* a name, once resolved: followed at its answer's TTL (resolve.c bounds it to 1..300 s) */
    mp_sockaddr_t at;            /* the answer's address r uses (port 0) */
    double check_at;             /* ev_now() from which a call looks at the answer again */
    mp_resolve_query_t *refresh; /* the name looked up again, in the background */
    mp_resolver_def_t rd;        /* what refresh looks up with (strings owned: a reload may free the gen's) */
    int dns_failing;             /* the last refresh failed (logged once) */
    struct ev_loop *loop;
    struct client *next;
} client_t;

typedef struct {
    client_t *list;
    unsigned n;
} clients_t;

typedef struct {
    mp_callout_t base;
    mp_req_t *r;
    client_t *client;
    mp_redis_call_t *rc;    /* in flight, or NULL */
    mp_resolve_query_t *dq; /* the client's name being looked up for this call */
    int ncmds, nargs;
    int pipeline; /* the answer is a list of replies */
    int *argc;
    const char **argv;
    size_t *argvlen;
    char *bytes; /* the arguments' bytes */
    double timeout;
    reply_t **replies;
    int nreplies;
    char err[256]; /* set: the call failed */
    int starting, over;
} call_t;

static void reply_free(reply_t *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n; i++)
        reply_free(p->elem[i]);
    free(p->elem);
    free(p->str);
    free(p);
}

static reply_t *reply_copy(const redisReply *x)
{
    reply_t *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->type = x->type;
    p->integer = x->integer;
    if (x->str && (x->type == REDIS_REPLY_STRING || x->type == REDIS_REPLY_STATUS || x->type == REDIS_REPLY_ERROR)) {
        if (!(p->str = malloc(x->len + 1))) {
            free(p);
            return NULL;
        }
        memcpy(p->str, x->str, x->len);
        p->str[x->len] = '\0';
        p->len = x->len;
    }
    if (x->type == REDIS_REPLY_ARRAY && x->elements) {
        if (!(p->elem = calloc(x->elements, sizeof(*p->elem)))) {
            reply_free(p);
            return NULL;
        }
        for (size_t i = 0; i < x->elements; i++) {
            p->n = i + 1;
            if (!(p->elem[i] = reply_copy(x->element[i]))) {
                reply_free(p);
                return NULL;
            }
        }
    }
    return p;
}

static void free_replies(call_t *c)
{
    for (int i = 0; i < c->nreplies; i++)
        reply_free(c->replies[i]);
    free(c->replies);
    c->replies = NULL;
    c->nreplies = 0;
}

static void cancel(mp_callout_t *base)
{
    call_t *c = container_of(base, call_t, base);
    mp_resolve_cancel(c->dq);
    if (c->rc)
        mp_redis_cancel(c->rc);
    free_replies(c);
    free(c->argv);
    free(c);
}

static void complete(call_t *c)
{
    c->rc = NULL;
    c->over = 1;
    if (!c->starting)
        mp_hook_resume(c->r);
}

static void on_reply(void *arg, redisReply **replies, int n, const char *err)
{
    call_t *c = arg;
    if (err) {
        snprintf(c->err, sizeof(c->err), "%s", err);
    } else if (!(c->replies = calloc((size_t)(n ? n : 1), sizeof(*c->replies)))) {
        snprintf(c->err, sizeof(c->err), "out of memory");
    } else {
        for (int i = 0; i < n; i++) {
            c->nreplies = i + 1;
            if (!(c->replies[i] = reply_copy(replies[i]))) {
                free_replies(c);
                snprintf(c->err, sizeof(c->err), "out of memory");
                break;
            }
        }
    }
    complete(c);
}

static void send_call(call_t *c)
{
    const char *err = NULL;
    c->rc = mp_redis_send(c->client->r, c->ncmds, c->argc, c->argv, c->argvlen, c->timeout, on_reply, c, &err);
    if (!c->rc && !c->over) {
        snprintf(c->err, sizeof(c->err), "%s", err ? err : "redis: the call could not be sent");
        complete(c);
    }
}

static void with_port(const client_t *k, const mp_sockaddr_t *a, struct sockaddr_storage *ss)
{
    *ss = a->ss;
    if (ss->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)k->port);
    else
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)k->port);
}

/* The client's server from its first address (a name's, once resolved). */
static int client_open(client_t *k, mp_io_ctx_t *ctx, const mp_sockaddr_t *a)
{
    struct sockaddr_storage ss;
    with_port(k, a, &ss);
    k->o.addr = (const struct sockaddr *)&ss;
    k->o.addrlen = a->sslen;
    k->r = mp_redis_new(ctx->loop, &k->o);
    k->o.addr = NULL;
    k->at = *a;
    k->loop = ctx->loop;
    k->check_at = ev_now(ctx->loop) + RECHECK_SECONDS;
    return k->r ? 0 : -1;
}

static int same_host(const mp_sockaddr_t *a, const mp_sockaddr_t *b)
{
    if (a->ss.ss_family != b->ss.ss_family)
        return 0;
    if (a->ss.ss_family == AF_INET)
        return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr ==
               ((const struct sockaddr_in *)&b->ss)->sin_addr.s_addr;
    return memcmp(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr, &((const struct sockaddr_in6 *)&b->ss)->sin6_addr,
                  sizeof(struct in6_addr)) == 0;
}

/* A new answer for k's name: k stays on its address while the answer has
 * it, else moves to the answer's first (redis.c closes the idle connections
 * to the old one). */
static void client_follow(client_t *k, const mp_sockaddr_t *addrs, int n)
{
    for (int i = 0; i < n; i++)
        if (same_host(&addrs[i], &k->at))
            return;
    struct sockaddr_storage ss;
    with_port(k, &addrs[0], &ss);
    char was[64];
    snprintf(was, sizeof(was), "%s", mp_redis_addr(k->r));
    if (mp_redis_set_addr(k->r, (const struct sockaddr *)&ss, addrs[0].sslen) > 0)
        mp_log_info("redis %s:%d: the name moved from %s to %s", k->host, k->port, was, mp_redis_addr(k->r));
    k->at = addrs[0];
}

/* An answer, from a lookup or the cache (another worker's lookup). */
static void client_answer(client_t *k, const mp_sockaddr_t *addrs, int n)
{
    if (k->dns_failing)
        mp_log_warn("redis %s:%d: resolves again", k->host, k->port);
    k->dns_failing = 0;
    client_follow(k, addrs, n);
}

static void on_refresh(void *arg, const mp_sockaddr_t *addrs, int n, const char *err)
{
    client_t *k = arg;
    k->refresh = NULL;
    if (n > 0)
        return client_answer(k, addrs, n);
    if (!k->dns_failing)
        mp_log_warn("redis %s:%d: cannot resolve: %s; calls stay on %s", k->host, k->port, err ? err : "no address",
                    mp_redis_addr(k->r));
    k->dns_failing = 1;
}

static void resolver_free(mp_resolver_def_t *rd)
{
    free(rd->nameservers);
    free(rd->hosts);
    rd->nameservers = rd->hosts = NULL;
}

/* Before a call on a name's client: the answer, at most once a
 * RECHECK_SECONDS; once it is past its TTL, looked up again in the
 * background (the call goes on to the current address meanwhile, and stays
 * there when DNS fails). */
static void client_check(client_t *k, const mp_resolver_def_t *rd)
{
    if (!k->host || k->refresh || ev_now(k->loop) < k->check_at)
        return;
    k->check_at = ev_now(k->loop) + RECHECK_SECONDS;
    mp_sockaddr_t addrs[MP_RESOLVE_MAX];
    int n = mp_resolve_cached(rd, k->host, addrs, MP_RESOLVE_MAX);
    if (n > 0)
        return client_answer(k, addrs, n);
    resolver_free(&k->rd);
    k->rd.timeout = rd->timeout;
    if ((rd->nameservers && !(k->rd.nameservers = strdup(rd->nameservers))) ||
        (rd->hosts && !(k->rd.hosts = strdup(rd->hosts))))
        return; /* out of memory: tried again at the next check */
    k->refresh = mp_resolve_start(k->loop, &k->rd, k->host, on_refresh, k);
}

static void resolved(void *arg, const mp_sockaddr_t *addrs, int n, const char *err)
{
    call_t *c = arg;
    client_t *k = c->client;
    c->dq = NULL;
    if (!k->r && n > 0 && client_open(k, container_of(c->r->env, mp_io_ctx_t, env), &addrs[0]) != 0)
        err = "out of memory";
    if (!k->r) {
        snprintf(c->err, sizeof(c->err), "redis %s:%d: cannot resolve: %s", k->host, k->port, err ? err : "no address");
        return complete(c);
    }
    send_call(c);
}

static int start(mp_callout_t *base)
{
    call_t *c = container_of(base, call_t, base);
    client_t *k = c->client;
    c->starting = 1;
    if (!k->r) { /* a name: looked up on this worker's first use */
        mp_io_ctx_t *ctx = container_of(c->r->env, mp_io_ctx_t, env);
        const mp_resolver_def_t *rd = &c->r->gen->cfg->settings.resolver;
        mp_sockaddr_t addrs[MP_RESOLVE_MAX];
        int n = mp_resolve_cached(rd, k->host, addrs, MP_RESOLVE_MAX);
        if (n > 0 && client_open(k, ctx, &addrs[0]) != 0) {
            snprintf(c->err, sizeof(c->err), "out of memory");
            c->over = 1;
        } else if (n == 0 && !(c->dq = mp_resolve_start(ctx->loop, rd, k->host, resolved, c))) {
            snprintf(c->err, sizeof(c->err), "out of memory");
            c->over = 1;
        }
    } else {
        client_check(k, &c->r->gen->cfg->settings.resolver);
    }
    if (k->r && !c->over)
        send_call(c);
    c->starting = 0;
    return c->over;
}

/* ---- the worker's clients ---- */

static clients_t *clients_of(mp_io_ctx_t *ctx)
{
    if (!ctx->redis)
        ctx->redis = calloc(1, sizeof(clients_t));
    return ctx->redis;
}

void mp_l_redis_dispose(mp_io_ctx_t *ctx)
{
    clients_t *cs = ctx->redis;
    if (!cs)
        return;
    while (cs->list) {
        client_t *k = cs->list;
        cs->list = k->next;
        mp_resolve_cancel(k->refresh);
        resolver_free(&k->rd);
        mp_redis_free(k->r);
        free(k->key);
        free(k->host);
        free(k->password);
        free(k);
    }
    free(cs);
    ctx->redis = NULL;
}

static const char *field(lua_State *L, int t, const char *k, size_t *len)
{
    lua_getfield(L, t, k);
    const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, len) : NULL;
    lua_pop(L, 1); /* the client table keeps the string */
    return v;
}

static double number(lua_State *L, int t, const char *k, double dflt)
{
    lua_getfield(L, t, k);
    double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

/* Keeps k in the Lua client at t for its next calls (a light userdata:
 * the client lives as long as the worker, which owns the VM). */
static client_t *remember(lua_State *L, int t, client_t *k)
{
    lua_pushliteral(L, "_worker_client");
    lua_pushlightuserdata(L, k);
    lua_rawset(L, t);
    return k;
}

/* The worker's client for the Lua client at t, made on first use (a name
 * is looked up by the first call: start). */
static client_t *client_for(lua_State *L, mp_io_ctx_t *ctx, int t)
{
    /* found before: the Lua client (one per VM, so per worker) keeps it */
    lua_pushliteral(L, "_worker_client");
    lua_rawget(L, t);
    client_t *known = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (known)
        return known;
    size_t alen = 0, plen = 0, nlen = 0;
    const char *addr = field(L, t, "addr", &alen), *password = field(L, t, "password", &plen);
    const char *name = field(L, t, "name", &nlen);
    int db = (int)number(L, t, "db", 0), pool = (int)number(L, t, "pool", 16);
    double timeout = number(L, t, "timeout", 1);
    if (!addr || !name)
        luaL_error(L, "redis: not a client made by proxy.redis");
    lua_pushfstring(L, "%s\n%s\n%s\n%d\n%d\n%f", name, addr, password ? password : "", db, pool, timeout);
    size_t klen;
    const char *key = lua_tolstring(L, -1, &klen);
    clients_t *cs = clients_of(ctx);
    if (!cs)
        luaL_error(L, "out of memory");
    for (client_t *k = cs->list; k; k = k->next)
        if (strcmp(k->key, key) == 0) {
            lua_pop(L, 1);
            return remember(L, t, k);
        }
    if (cs->n >= MAX_CLIENTS)
        luaL_error(L,
                   "redis: more than %d clients in this worker: declare them with proxy.redis when the "
                   "configuration loads, not in hooks",
                   MAX_CLIENTS);
    mp_addr_t a;
    int literal = mp_addr_parse(addr, &a) == 0;
    const char *colon = strrchr(addr, ':');
    client_t *k = calloc(1, sizeof(*k));
    int ok = k && (k->key = strdup(key)) && (!password || (k->password = strdup(password)));
    if (ok) {
        k->o = (mp_redis_opts_t){
            .password = k->password, .password_len = plen, .db = db, .timeout = timeout, .pool = pool};
        if (literal) {
            k->o.addr = (const struct sockaddr *)&a.ss;
            k->o.addrlen = a.sslen;
            ok = (k->r = mp_redis_new(ctx->loop, &k->o)) != NULL;
            k->o.addr = NULL;
        } else { /* a DNS name (the DSL checked its form) */
            ok = colon && (k->host = strndup(addr, (size_t)(colon - addr))) != NULL;
            k->port = colon ? atoi(colon + 1) : 0;
        }
    }
    if (literal)
        free(a.text);
    if (!ok) {
        if (k) {
            mp_redis_free(k->r);
            free(k->key);
            free(k->host);
            free(k->password);
        }
        free(k);
        luaL_error(L, "redis %s: %s", addr, strerror(errno ? errno : ENOMEM));
    }
    k->next = cs->list;
    cs->list = k;
    cs->n++;
    lua_pop(L, 1);
    return remember(L, t, k);
}

/* ---- the binding ---- */

/* One argument's bytes at idx of the table at t (a string or a number). */
static const char *arg_at(lua_State *L, int t, int i, size_t *len)
{
    lua_rawgeti(L, t, i);
    int ty = lua_type(L, -1);
    if (ty != LUA_TSTRING && ty != LUA_TNUMBER)
        luaL_error(L, "redis: argument %d must be a string or a number, got %s", i, lua_typename(L, ty));
    return lua_tolstring(L, -1, len); /* left on the stack: it stays alive */
}

/* core.start(client, args, n): n > 0 one command of n arguments, n < 0 a
 * pipeline of -n commands (each a list). */
static int l_start(lua_State *L)
{
    const char *why;
    mp_req_t *r = mp_hook_caller(L, &why);
    if (!r)
        return luaL_error(L, "redis: %s", why);
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)luaL_checkinteger(L, 3);
    lua_settop(L, 3);
    mp_io_ctx_t *ctx = container_of(r->env, mp_io_ctx_t, env);
    client_t *client = client_for(L, ctx, 1);
    int ncmds = n > 0 ? 1 : -n, nargs = 0;
    size_t bytes = 0;
    /* first pass: count (the values stay on the stack for the copy) */
    int base = lua_gettop(L);
    for (int k = 1; k <= ncmds; k++) {
        int t = 2, m = n;
        if (n < 0) {
            lua_rawgeti(L, 2, k);
            t = lua_gettop(L);
            m = (int)lua_objlen(L, t);
            if (m == 0)
                return luaL_error(L, "redis: pipeline command %d is empty", k);
        }
        if (nargs + m > MAX_ARGS)
            return luaL_error(L, "redis: more than %d arguments in one call", MAX_ARGS);
        luaL_checkstack(L, m + 2, "redis arguments");
        for (int i = 1; i <= m; i++) {
            size_t len;
            arg_at(L, t, i, &len);
            bytes += len;
        }
        nargs += m;
    }
    call_t *c = calloc(1, sizeof(*c));
    size_t sz = (size_t)ncmds * sizeof(int) + (size_t)nargs * (sizeof(char *) + sizeof(size_t)) + bytes + 1;
    char *block = c ? malloc(sz) : NULL;
    if (!block) {
        free(c);
        return luaL_error(L, "out of memory");
    }
    /* pointers and sizes first, then the ints, then the bytes: each at its alignment */
    c->argv = (const char **)block;
    c->argvlen = (size_t *)(block + (size_t)nargs * sizeof(char *));
    c->argc = (int *)(block + (size_t)nargs * (sizeof(char *) + sizeof(size_t)));
    c->bytes = block + (size_t)nargs * (sizeof(char *) + sizeof(size_t)) + (size_t)ncmds * sizeof(int);
    /* second pass: the values are on the stack in order, each command's list before its arguments */
    int at = base + 1, a = 0;
    char *w = c->bytes;
    for (int k = 1; k <= ncmds; k++) {
        int m = n > 0 ? n : (int)lua_objlen(L, at++);
        c->argc[k - 1] = m;
        for (int i = 0; i < m; i++, a++, at++) {
            size_t len;
            const char *p = lua_tolstring(L, at, &len);
            memcpy(w, p, len);
            c->argv[a] = w;
            c->argvlen[a] = len;
            w += len;
        }
    }
    c->base.start = start;
    c->base.cancel = cancel;
    c->r = r;
    c->client = client;
    c->ncmds = ncmds;
    c->nargs = nargs;
    c->pipeline = n < 0;
    c->timeout = number(L, 1, "timeout", 1);
    lua_settop(L, 3);
    return mp_hook_yield(L, r, &c->base);
}

/* Pushes a reply; nested: nil is core.null and an error { err = ... }. */
static void push_reply(lua_State *L, const reply_t *p, int nested)
{
    luaL_checkstack(L, 4, "redis reply");
    switch (p->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS: lua_pushlstring(L, p->str ? p->str : "", p->len); return;
    case REDIS_REPLY_INTEGER: lua_pushnumber(L, (lua_Number)p->integer); return;
    case REDIS_REPLY_ARRAY:
        lua_createtable(L, (int)p->n, 0);
        for (size_t i = 0; i < p->n; i++) {
            push_reply(L, p->elem[i], 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        return;
    case REDIS_REPLY_ERROR:
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, p->str ? p->str : "", p->len);
        lua_setfield(L, -2, "err");
        return;
    default: /* REDIS_REPLY_NIL */
        if (nested)
            lua_pushlightuserdata(L, NULL);
        else
            lua_pushnil(L);
    }
}

/* core.answer(): the reply (a pipeline: the list of them), or nil, err. */
static int l_answer(lua_State *L)
{
    call_t *c = container_of(mp_hook_answer(L), call_t, base);
    int nret = 1;
    if (c->err[0]) {
        lua_pushnil(L);
        lua_pushstring(L, c->err);
        nret = 2;
    } else if (c->pipeline) {
        lua_createtable(L, c->nreplies, 0);
        for (int i = 0; i < c->nreplies; i++) {
            push_reply(L, c->replies[i], 1);
            lua_rawseti(L, -2, i + 1);
        }
    } else if (c->nreplies == 1 && c->replies[0]->type == REDIS_REPLY_ERROR) {
        lua_pushnil(L);
        lua_pushlstring(L, c->replies[0]->str ? c->replies[0]->str : "", c->replies[0]->len);
        nret = 2;
    } else if (c->nreplies == 1) {
        push_reply(L, c->replies[0], 0);
    } else {
        lua_pushnil(L);
        lua_pushstring(L, "redis: no reply");
        nret = 2;
    }
    mp_hook_answered(L);
    return nret;
}

static const luaL_Reg funcs[] = {{"start", l_start}, {"answer", l_answer}, {NULL, NULL}};

static int open_rediscore(lua_State *L)
{
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}

void mp_l_redis_preload(lua_State *L)
{
    mp_vm_preload(L, "moonproxy.rediscore", open_rediscore);
}
