/* sim.c: the simulator (sim.h): the request layer (req.h) with no socket,
 * worker or loop. A request is parsed from bytes by the server's parser,
 * started, decided, framed and answered by the same req.c functions the
 * server runs, balanced by the generation's balancer and written out by the
 * server's head builders, so what it reports is what the server would do. */
#include "sim.h"

#include "balancer.h"
#include "gen.h"
#include "head.h"
#include "l_request.h"
#include "log.h"
#include "path.h"
#include "req.h"
#include "static.h"
#include "strbuf.h"
#include "vm.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define SIM_MAX_FILE (64u << 20) /* a static file's bytes a result carries at most */

struct mp_sim {
    mp_req_env_t env; /* what its requests need: buffers, rng, limits, clock (no worker: no log prefix) */
    mp_bufpool_t bufs;
    double created;             /* the requests' loop time: when the simulator was made (epoch seconds) */
    lua_State *_Atomic hook_vm; /* env's watchdog view: no watchdog looks (see running) */
    _Atomic double hook_since;
    mp_gen_t gen; /* its one generation */
    union {       /* the pretend client's address */
        struct sockaddr sa;
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } peer;
    mp_req_t req;         /* the last request, alive until the next call */
    mp_tls_info_t tls;    /* its TLS, when it came over TLS (req.tls points here) */
    char *tls_text[5];    /* the copies tls points at: sni, client_subject, the Host as SNI, version, cipher */
    int live;             /* req holds hook objects to release */
    int forwarded;        /* req went upstream (mp_sim_response may run) */
    mp_peer_t *peers;     /* private server state, every upstream's servers in a row */
    uint8_t *open;        /* by peer: the circuit is held open (mp_sim_set_server) */
    double now;           /* pinned clock, 0: real */
    mp_strbuf_t raw;      /* the request bytes the parser reads (the head's slices point here) */
    mp_strbuf_t resp_raw; /* the upstream response's */
    mp_buf_t out;         /* the head made */
    char *file_body;      /* a static route's file, as sent */
    mp_sim_step_t *trace;
    size_t ntrace, trace_cap;
    char *error;
    int route_noted;
    lua_State *caller; /* who answers call-outs (mp_sim_answer_calls): its table at index stubs */
    int stubs;
    struct { /* the request as it was before the hook being traced */
        mp_slice path, query;
        unsigned has_query;
        const mp_hedit_t *edits, *resp_edits;
        uint16_t local_status, resp_status;
    } before;
};

/* ---- trace ---- */

/* A step's text built in parts (a hook's changes, the servers a pick saw)
 * shows at most this many bytes of them. */
#define STEP_PARTS_MAX 2047

/* How much of b a step shows, from byte at. */
static int parts_shown(const mp_strbuf_t *b, size_t at)
{
    size_t n = b->len < STEP_PARTS_MAX ? b->len : STEP_PARTS_MAX;
    return n > at ? (int)(n - at) : 0;
}

static void step(mp_sim_t *s, const char *kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void step(mp_sim_t *s, const char *kind, const char *fmt, ...)
{
    if (s->ntrace == s->trace_cap) {
        size_t cap = s->trace_cap ? 2 * s->trace_cap : 16;
        mp_sim_step_t *t = realloc(s->trace, cap * sizeof(*t));
        if (!t)
            return;
        s->trace = t;
        s->trace_cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    s->trace[s->ntrace++] = (mp_sim_step_t){kind, text};
}

static void reset_result(mp_sim_t *s)
{
    for (size_t i = 0; i < s->ntrace; i++)
        free(s->trace[i].text);
    s->ntrace = 0;
    free(s->error);
    s->error = NULL;
    s->route_noted = 0;
    s->out.start = s->out.end = 0;
}

/* Log lines of the request (a hook's error, "no server available") go into
 * its trace instead of stderr. */
static void on_log(void *arg, int level, const char *msg)
{
    mp_sim_t *s = arg;
    if (level == MP_LOG_DEBUG)
        return;
    step(s, "log", "%s", msg); /* request lines have no "w0: ": the env names no worker */
    if (level == MP_LOG_ERROR && !s->error)
        s->error = strdup(msg);
}

/* "route 'api' at file:line" once, before the route's hooks run. */
static void note_route(mp_sim_t *s)
{
    const mp_req_t *r = &s->req;
    const mp_route_t *rt = r->match.route;
    if (s->route_noted || !rt)
        return;
    s->route_noted = 1;
    char why[1024];
    const char *host = rt->host ? rt->host : "";
    if (rt->path)
        snprintf(why, sizeof(why), "%s%s, path %s", rt->host ? "host " : "any host", host, rt->path);
    else if (rt->regex)
        snprintf(why, sizeof(why), "%s%s, regex %s (%d groups)", rt->host ? "host " : "any host", host, rt->regex,
                 r->match.ncaptures);
    else
        snprintf(why, sizeof(why), "%s%s, prefix %s%s", rt->host ? "host " : "any host", host,
                 rt->prefix ? rt->prefix : "/", rt->strip_prefix ? " (stripped)" : "");
    const mp_config_t *cfg = r->gen->cfg;
    const char *root = cfg->statics ? cfg->statics[mp_route_slot(rt)].root : NULL;
    const char *kind = rt->target >= 0 ? ", upstream '" : root ? ", static root '" : ", handler";
    const char *target = rt->target >= 0 ? cfg->upstreams[rt->target].name : root;
    step(s, "route", "route '%s' at %s matched %.*s (%s)%s%s%s; path now %.*s", rt->name, rt->src,
         (int)r->match_path.len, r->match_path.p, why, kind, target ? target : "", target ? "'" : "", (int)r->path.len,
         r->path.p);
}

static int slice_same(mp_slice a, mp_slice b)
{
    return a.p == b.p && a.len == b.len;
}

/* Appends "what name: v1, v2" for the edits made since `since`, oldest first. */
static void describe_edits(mp_strbuf_t *out, const mp_hedit_t *list, const mp_hedit_t *since, const char *what)
{
    const mp_hedit_t *e[64];
    size_t k = 0;
    const mp_hedit_t *x = list;
    for (; x && x != since && k < MP_ARRAY_LEN(e); x = x->next)
        e[k++] = x;
    if (x && x != since)
        mp_strbuf_printf(out, "; (older %s header edits not shown)", what);
    while (k-- > 0) {
        x = e[k];
        if (x->nvalues == 0) {
            mp_strbuf_printf(out, "; removed %s header %.*s", what, (int)x->name.len, x->name.p);
            continue;
        }
        mp_strbuf_printf(out, "; set %s header %.*s: ", what, (int)x->name.len, x->name.p);
        for (unsigned i = 0; i < x->nvalues; i++)
            mp_strbuf_printf(out, "%s%.*s", i ? ", " : "", (int)x->values[i].len, x->values[i].p);
    }
}

/* tracer(label, done, result): package.loaded["moonproxy.trace"] in the
 * simulator's VM; hooks.lua calls it around every step of a chain. */
static int l_tracer(lua_State *L)
{
    mp_sim_t *s = lua_touserdata(L, lua_upvalueindex(1));
    mp_req_t *r = &s->req;
    const char *label = luaL_checkstring(L, 1);
    note_route(s);
    if (!lua_toboolean(L, 2)) {
        s->before.path = r->path;
        s->before.query = r->query;
        s->before.has_query = r->has_query;
        s->before.edits = r->edits;
        s->before.resp_edits = r->resp_edits;
        s->before.local_status = r->local_status;
        s->before.resp_status = r->resp_status;
        return 0;
    }
    mp_strbuf_t what = {0};
    if (!slice_same(r->path, s->before.path))
        mp_strbuf_printf(&what, "; path %.*s -> %.*s", (int)s->before.path.len, s->before.path.p, (int)r->path.len,
                         r->path.p);
    if (r->has_query != s->before.has_query || !slice_same(r->query, s->before.query))
        mp_strbuf_printf(&what, "; query %s%.*s", r->has_query ? "" : "removed", r->has_query ? (int)r->query.len : 0,
                         r->query.p ? r->query.p : "");
    describe_edits(&what, r->edits, s->before.edits, "request");
    describe_edits(&what, r->resp_edits, s->before.resp_edits, "response");
    if (r->resp_status != s->before.resp_status)
        mp_strbuf_printf(&what, "; status -> %d", r->resp_status);
    if (r->local_status != s->before.local_status)
        mp_strbuf_printf(&what, "; responded %d", r->local_status);
    if (lua_type(L, 3) == LUA_TNUMBER) {
        lua_Integer u = lua_tointeger(L, 3);
        const mp_config_t *cfg = r->gen->cfg;
        if (u >= 0 && (size_t)u < cfg->nupstreams)
            mp_strbuf_printf(&what, "; returned upstream '%s'", cfg->upstreams[u].name);
    }
    if (parts_shown(&what, 2))
        step(s, "hook", "%s: %.*s", label, parts_shown(&what, 2), what.p + 2);
    else
        step(s, "hook", "%s: no change", label);
    mp_strbuf_free(&what);
    return 0;
}

/* ---- call-outs, answered by the spec ----
 *
 * moonproxy.http and Redis clients in the simulator's VM find
 * package.loaded["moonproxy.testing.callouts"]: a call there runs the spec's
 * opts.http or opts.redis in the caller's VM (the one running
 * cfg:request), with the arguments and the answer copied between the VMs
 * as plain data. A raise in the caller's VM must not cross the simulator's
 * frames: the spec's function runs under lua_pcall there, and reads the
 * simulator's values without converting them (no allocation on its side). */

#define COPY_DEPTH 16

/* Pushes onto to a copy of from's value at idx: nil, booleans, numbers,
 * strings, the null light userdata and tables of them. Raises (in to) for
 * anything else. */
static void copy_value(lua_State *from, int idx, lua_State *to, int depth)
{
    size_t n;
    const char *p;
    luaL_checkstack(to, 4, "copying a value");
    switch (lua_type(from, idx)) {
    case LUA_TNIL: lua_pushnil(to); return;
    case LUA_TBOOLEAN: lua_pushboolean(to, lua_toboolean(from, idx)); return;
    case LUA_TNUMBER: lua_pushnumber(to, lua_tonumber(from, idx)); return;
    case LUA_TLIGHTUSERDATA: /* only the null of lists (redis.null, cjson.null) means the same in both */
        if (lua_touserdata(from, idx) == NULL) {
            lua_pushlightuserdata(to, NULL);
            return;
        }
        luaL_error(to, "cannot pass a light userdata other than null");
        return;
    case LUA_TSTRING:
        p = lua_tolstring(from, idx, &n);
        lua_pushlstring(to, p, n);
        return;
    case LUA_TTABLE:
        if (depth >= COPY_DEPTH)
            luaL_error(to, "a table nested deeper than %d levels", COPY_DEPTH);
        idx = idx < 0 ? lua_gettop(from) + idx + 1 : idx;
        if (!lua_checkstack(from, 3))
            luaL_error(to, "stack overflow copying a table");
        lua_newtable(to);
        lua_pushnil(from);
        while (lua_next(from, idx)) {
            int t = lua_type(from, -2);
            if (t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN) {
                lua_pop(from, 2);
                luaL_error(to, "a table key must be a string or a number, not a %s", lua_typename(from, t));
            }
            copy_value(from, -2, to, depth + 1);
            copy_value(from, -1, to, depth + 1);
            lua_rawset(to, -3);
            lua_pop(from, 1);
        }
        return;
    default: luaL_error(to, "cannot pass a %s between the simulator and the spec", luaL_typename(from, idx));
    }
}

typedef struct {
    lua_State *sim; /* the simulator's VM: the arguments at 1..nargs */
    int nargs;
    const char *kind; /* "http" or "redis" */
} stub_call_t;

/* In the caller's VM, protected: stubs table at 1. Leaves the answer. */
static int stub_call(lua_State *L)
{
    stub_call_t *c = lua_touserdata(L, 2);
    lua_getfield(L, 1, c->kind);
    if (!lua_isfunction(L, -1))
        return luaL_error(L, "this simulation has no opts.%s to answer call-outs", c->kind);
    for (int i = 1; i <= c->nargs; i++)
        copy_value(c->sim, i, L, 0);
    lua_call(L, c->nargs, 2);
    return 2;
}

/* What the trace says of a call's arguments. */
static void describe_call(lua_State *L, const char *kind, mp_strbuf_t *b)
{
    if (strcmp(kind, "redis") == 0) {
        for (int i = 1; i <= lua_gettop(L) && i <= 8; i++)
            if (lua_type(L, i) == LUA_TSTRING || lua_type(L, i) == LUA_TNUMBER)
                mp_strbuf_printf(b, "%s%s", i > 1 ? " " : "", lua_type(L, i) == LUA_TSTRING ? lua_tostring(L, i) : "#");
            else if (lua_istable(L, i))
                mp_strbuf_printf(b, "%s(pipeline)", i > 1 ? " " : "");
        return;
    }
    if (!lua_istable(L, 1))
        return;
    static const char *const keys[] = {"method", "url", "upstream", "path"};
    for (size_t k = 0; k < MP_ARRAY_LEN(keys); k++) {
        lua_getfield(L, 1, keys[k]);
        if (lua_istable(L, -1)) { /* an upstream object */
            lua_getfield(L, -1, "name");
            lua_remove(L, -2);
        }
        if (lua_type(L, -1) == LUA_TSTRING)
            mp_strbuf_printf(b, "%s%s", b->len ? " " : "", lua_tostring(L, -1));
        else if (k == 0)
            mp_strbuf_printf(b, "GET");
        lua_pop(L, 1);
    }
}

/* The answer's summary for the trace. */
static void describe_answer(lua_State *L, int idx, mp_strbuf_t *b)
{
    if (lua_isnil(L, idx)) {
        mp_strbuf_printf(b, "nil, %s", lua_type(L, idx + 1) == LUA_TSTRING ? lua_tostring(L, idx + 1) : "nil");
    } else if (lua_istable(L, idx)) {
        lua_getfield(L, idx, "status");
        if (lua_type(L, -1) == LUA_TNUMBER)
            mp_strbuf_printf(b, "%d", (int)lua_tointeger(L, -1));
        else
            mp_strbuf_printf(b, "a table");
        lua_pop(L, 1);
    } else if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
        mp_strbuf_printf(b, "%s", lua_tostring(L, idx));
    } else {
        mp_strbuf_printf(b, "%s", luaL_typename(L, idx));
    }
}

/* callouts.http(opts) / callouts.redis(cmd, ...) in the simulator's VM. */
static int l_stub(lua_State *L)
{
    mp_sim_t *s = lua_touserdata(L, lua_upvalueindex(1));
    const char *kind = lua_tostring(L, lua_upvalueindex(2));
    lua_State *C = s->caller;
    const char *what_call = strcmp(kind, "http") == 0 ? "http.request" : "redis";
    const char *why;
    if (!mp_hook_context(L, &why))
        return luaL_error(L, "%s: %s", what_call, why);
    if (!C)
        return luaL_error(L,
                          "%s: a guard (proxy.expect) or --explain cannot call out (moonproxy.testing answers "
                          "call-outs through opts.%s)",
                          what_call, kind);
    if (!s->stubs)
        return luaL_error(L,
                          "%s: this simulation has no opts.%s to answer call-outs (moonproxy.testing.load(path, "
                          "{ %s = function(...) ... end }))",
                          what_call, kind, kind);
    mp_strbuf_t what = {0};
    describe_call(L, kind, &what);
    stub_call_t call = {L, lua_gettop(L), kind};
    int base = lua_gettop(C);
    if (!lua_checkstack(C, 8)) {
        mp_strbuf_free(&what);
        return luaL_error(L, "stack overflow");
    }
    lua_pushcfunction(C, stub_call);
    lua_pushvalue(C, s->stubs);
    lua_pushlightuserdata(C, &call);
    if (lua_pcall(C, 2, 2, 0) != 0) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", lua_tostring(C, -1) ? lua_tostring(C, -1) : "?");
        lua_settop(C, base);
        step(s, "call", "%s %s: raised %s", kind, what.p ? what.p : "", msg);
        mp_strbuf_free(&what);
        return luaL_error(L, "opts.%s: %s", kind, msg);
    }
    mp_strbuf_t ans = {0};
    describe_answer(C, base + 1, &ans);
    step(s, "call", "%s %s -> %s", kind, what.p ? what.p : "", ans.p ? ans.p : "");
    mp_strbuf_free(&what);
    mp_strbuf_free(&ans);
    lua_settop(L, 0);
    /* the copies are made here, in the simulator's VM: a raise stays in it */
    copy_value(C, base + 1, L, 0);
    copy_value(C, base + 2, L, 0);
    lua_settop(C, base);
    return 2;
}

void mp_sim_answer_calls(mp_sim_t *s, lua_State *L, int idx)
{
    s->caller = L;
    s->stubs = L && idx ? (idx < 0 ? lua_gettop(L) + idx + 1 : idx) : 0;
}

/* ---- the hooks' time budget ---- */

/* The simulator runs on the caller's thread (the main thread, for guards),
 * where no watchdog looks: a count hook stops a hook that runs longer than
 * hook_timeout. Its VM runs interpreted, so the count hook always fires. */
static _Thread_local double budget_end, budget_len;

static double real_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_budget(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    if (real_now() > budget_end)
        mp_vm_overran(L, budget_len);
}

/* Enters (on) or leaves a call of the simulator: the clock pin, the log
 * capture and the budget. */
static void running(mp_sim_t *s, int on);

/* ---- set up ---- */

#define SIM_FREE_BLOCKS 16

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The loop time of its requests: a loop that never runs stays at its start. */
static double sim_clock(void *arg)
{
    return ((const mp_sim_t *)arg)->created;
}

static void install_peers(mp_sim_t *s)
{
    const mp_config_t *cfg = s->gen.cfg;
    lua_State *L = s->gen.L;
    size_t k = 0;
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        mp_balancer_t *b = &s->gen.balancers[u];
        lua_rawgeti(L, LUA_REGISTRYINDEX, b->servers_ref); /* LUA_NOREF pushes nil */
        for (size_t i = 0; i < cfg->upstreams[u].nservers; i++, k++) {
            mp_peer_t *p = &s->peers[k];
            p->upstream = cfg->upstreams[u].name;
            p->addr = cfg->upstreams[u].servers[i].addr.text;
            p->probe_up = 1;
            b->peers[i] = p;
            if (lua_istable(L, -1)) { /* the Lua policy's server objects read it too */
                lua_rawgeti(L, -1, (int)i + 1);
                lua_pushlightuserdata(L, p);
                lua_rawseti(L, -2, 0);
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
    }
}

mp_sim_t *mp_sim_new(const char *path, const char *text, size_t len, uint64_t seed, char *err, size_t errlen)
{
    mp_sim_t *s = calloc(1, sizeof(*s));
    lua_State *L = mp_vm_new();
    mp_config_t *cfg = NULL;
    if (!s || !L) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* traced chains (hooks.lua): set before the script builds them */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushlightuserdata(L, s);
    lua_pushcclosure(L, l_tracer, 1);
    lua_setfield(L, -2, "moonproxy.trace");
    lua_createtable(L, 0, 2); /* call-outs answered by the spec (l_stub) */
    static const char *const kinds[] = {"http", "redis"};
    for (size_t i = 0; i < MP_ARRAY_LEN(kinds); i++) {
        lua_pushlightuserdata(L, s);
        lua_pushstring(L, kinds[i]);
        lua_pushcclosure(L, l_stub, 2);
        lua_setfield(L, -2, kinds[i]);
    }
    lua_setfield(L, -2, "moonproxy.testing.callouts");
    lua_pop(L, 2);
    lua_getglobal(L, "math");
    lua_getfield(L, -1, "randomseed");
    lua_pushnumber(L, (double)(seed % 2147483647u));
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    int rc = text ? mp_config_load_text(L, path, text, len, &cfg, err, errlen)
                  : mp_config_load(L, path, &cfg, err, errlen);
    if (rc != 0)
        goto fail;
    const mp_settings_t *st = &cfg->settings;
    mp_bufpool_init(&s->bufs, mp_req_block_size(st->max_header_size, st->body_buffer_size), SIM_FREE_BLOCKS);
    s->created = wall_now();
    s->env = (mp_req_env_t){.id = -1,
                            .bufs = &s->bufs,
                            .clock = sim_clock,
                            .clock_arg = s,
                            .hook_vm = &s->hook_vm,
                            .hook_since = &s->hook_since};
    s->env.rng[0] = seed ^ 0x9e3779b97f4a7c15ull;
    s->env.rng[1] = seed * 0xbf58476d1ce4e5b9ull + 1;
    mp_req_env_limits(&s->env, st->max_uri_size, st->max_header_size);
    size_t npeers = 0;
    for (size_t u = 0; u < cfg->nupstreams; u++)
        npeers += cfg->upstreams[u].nservers;
    s->gen = (mp_gen_t){.id = 1, .L = L, .cfg = cfg, .refs = 1};
    if (!(s->peers = calloc(npeers ? npeers : 1, sizeof(*s->peers))) || !(s->open = calloc(npeers ? npeers : 1, 1)) ||
        mp_gen_prepare(&s->gen, seed) != 0 || mp_buf_acquire(&s->out, &s->bufs) != 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    install_peers(s);
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    return s;
fail:
    if (s && s->gen.L) {
        mp_sim_free(s);
        return NULL;
    }
    mp_config_free(cfg);
    if (L)
        mp_vm_close(L);
    free(s);
    return NULL;
}

void mp_sim_release(mp_sim_t *s)
{
    if (s->live)
        mp_hook_release(s->gen.L, &s->req);
    s->live = s->forwarded = 0;
}

static void free_tls(mp_sim_t *s)
{
    for (size_t i = 0; i < MP_ARRAY_LEN(s->tls_text); i++) {
        free(s->tls_text[i]);
        s->tls_text[i] = NULL;
    }
}

void mp_sim_free(mp_sim_t *s)
{
    if (!s)
        return;
    mp_sim_release(s);
    reset_result(s);
    free(s->trace);
    mp_buf_release(&s->out, &s->bufs);
    mp_gen_release(&s->gen);
    mp_config_free(s->gen.cfg);
    mp_vm_close(s->gen.L);
    mp_bufpool_dispose(&s->bufs);
    free(s->peers);
    free(s->open);
    mp_strbuf_free(&s->raw);
    mp_strbuf_free(&s->resp_raw);
    free(s->file_body);
    free_tls(s);
    free(s);
}

lua_State *mp_sim_vm(mp_sim_t *s)
{
    return s->gen.L;
}

const mp_config_t *mp_sim_config(mp_sim_t *s)
{
    return s->gen.cfg;
}

void mp_sim_set_now(mp_sim_t *s, double now)
{
    s->now = now;
}

int mp_sim_set_server(mp_sim_t *s, const char *upstream, const char *addr, const mp_sim_state_t *st)
{
    const mp_config_t *cfg = s->gen.cfg;
    size_t k = 0;
    for (size_t u = 0; u < cfg->nupstreams; u++)
        for (size_t i = 0; i < cfg->upstreams[u].nservers; i++, k++) {
            if (strcmp(cfg->upstreams[u].name, upstream) != 0 || strcmp(cfg->upstreams[u].servers[i].addr.text, addr))
                continue;
            mp_peer_t *p = &s->peers[k];
            p->probe_up = !st->down;
            p->active = st->active;
            p->fails = st->failures;
            union {
                double d;
                uint64_t u;
            } lat = {.d = st->latency};
            p->latency_bits = lat.u;
            s->open[k] = (uint8_t)(st->open != 0);
            p->open_until = 0;
            mp_peer_ctl_t c = {st->drain != 0, 0, st->weight, 1};
            mp_peer_control(p, &c, MP_CTL_TESTING);
            return 0;
        }
    return MP_ENOENT;
}

int mp_sim_control(mp_sim_t *s, const char *upstream, const char *addr, const mp_peer_ctl_t *c)
{
    const mp_config_t *cfg = s->gen.cfg;
    size_t k = 0;
    for (size_t u = 0; u < cfg->nupstreams; u++)
        for (size_t i = 0; i < cfg->upstreams[u].nservers; i++, k++)
            if (strcmp(cfg->upstreams[u].name, upstream) == 0 &&
                strcmp(cfg->upstreams[u].servers[i].addr.text, addr) == 0) {
                mp_peer_control(&s->peers[k], c, MP_CTL_TESTING);
                return 0;
            }
    return MP_ENOENT;
}

/* ---- running ---- */

static mp_slice cstr(const char *s)
{
    return (mp_slice){s, strlen(s)};
}

static int has_field(const mp_sim_header_t *h, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (mp_slice_caseeq(cstr(h[i].name), cstr(name)))
            return 1;
    return 0;
}

/* The fields, and a Content-Length of body_len unless they frame the
 * body themselves, then the blank line: the end of a head the simulator
 * parses. */
static void put_fields(mp_strbuf_t *b, const mp_sim_header_t *h, size_t n, size_t body_len, int body_needs_length)
{
    for (size_t i = 0; i < n; i++)
        mp_strbuf_printf(b, "%s: %s\r\n", h[i].name, h[i].value);
    if (body_needs_length && !has_field(h, n, "content-length") && !has_field(h, n, "transfer-encoding"))
        mp_strbuf_printf(b, "Content-Length: %zu\r\n", body_len);
    mp_strbuf_append(b, "\r\n", 2);
}

/* The pretend client is at text, an IPv4 or IPv6 address. */
static int set_peer_addr(mp_sim_t *s, const char *text)
{
    memset(&s->peer, 0, sizeof(s->peer));
    if (inet_pton(AF_INET, text, &s->peer.v4.sin_addr) == 1) {
        s->peer.v4.sin_family = AF_INET;
        return 0;
    }
    s->peer.v6.sin6_family = AF_INET6;
    return inet_pton(AF_INET6, text, &s->peer.v6.sin6_addr) == 1 ? 0 : MP_EINVAL;
}

static void new_request(mp_sim_t *s)
{
    mp_req_reset(&s->req, &s->env, &s->gen, &s->peer.sa, mp_req_now(&s->env));
    s->live = 1;
}

/* host without its port, or NULL for an IP address (clients send no SNI
 * for one) or no host. */
static char *host_sni(const char *host)
{
    if (!host || host[0] == '[')
        return NULL;
    size_t n = strcspn(host, ":");
    char *name = strndup(host, n);
    struct in_addr a;
    if (name && inet_pton(AF_INET, name, &a) == 1) {
        free(name);
        return NULL;
    }
    return name;
}

/* The request's TLS (sim.h: mp_sim_request_t.tls, https), copied so that
 * its response hooks still see it; "tls TLSv1.3 sni api.example.com" in the
 * trace. Returns 0, or MP_ENOMEM. */
static int set_tls(mp_sim_t *s, const mp_sim_request_t *rq, const char *host)
{
    free_tls(s);
    if (!rq->tls && !rq->https)
        return 0;
    const mp_tls_info_t *t = rq->tls;
    const char *texts[5] = {t ? t->sni : NULL, t ? t->client_subject : NULL, NULL,
                            t && t->version ? t->version : "TLSv1.3",
                            t && t->cipher ? t->cipher : "TLS_AES_128_GCM_SHA256"};
    for (size_t i = 0; i < MP_ARRAY_LEN(texts); i++)
        if (texts[i] && !(s->tls_text[i] = strdup(texts[i])))
            return MP_ENOMEM;
    s->tls = (mp_tls_info_t){s->tls_text[3], s->tls_text[4], NULL, NULL, 0};
    if (!t)
        s->tls_text[2] = host_sni(host); /* NULL when out of memory too: no SNI */
    s->tls.sni = t ? s->tls_text[0] : s->tls_text[2];
    s->tls.client_subject = s->tls_text[1];
    s->req.tls = &s->tls;
    step(s, "request", "tls %s sni %s%s%s", s->tls.version, s->tls.sni ? s->tls.sni : "(none)",
         s->tls.client_subject ? ", client " : "", s->tls.client_subject ? s->tls.client_subject : "");
    return 0;
}

static const char *balancer_name(const mp_upstream_def_t *d)
{
    return d->balancer ? d->balancer : "round_robin";
}

/* "addr (up, 2 active, 12.0 ms)" for every server, as the pick saw them. */
static void note_pick(mp_sim_t *s, const mp_balancer_t *b, int server)
{
    const mp_upstream_def_t *d = b->def;
    mp_strbuf_t list = {0};
    double now = mp_health_now();
    for (size_t i = 0; i < d->nservers; i++) {
        mp_peer_t *p = b->peers[i];
        const char *state = mp_peer_state(p, now);
        mp_strbuf_printf(&list, "%s%s (%s, weight %d, %d active, %.1f ms, %d failures)", i ? ", " : "",
                         d->servers[i].addr.text, state, mp_peer_weight(p, d->servers[i].weight), (int)p->active,
                         mp_peer_latency(p), (int)p->fails);
    }
    const char *text = list.p ? list.p : "";
    if (server >= 0)
        step(s, "balancer", "upstream '%s' (%s) picked %s among %.*s", d->name, balancer_name(d),
             d->servers[server].addr.text, parts_shown(&list, 0), text);
    else
        step(s, "balancer", "upstream '%s' (%s) found no server available among %.*s", d->name, balancer_name(d),
             parts_shown(&list, 0), text);
    mp_strbuf_free(&list);
}

static void answer(mp_sim_t *s, int status, const char *why)
{
    mp_req_t *r = &s->req;
    mp_req_identify(r);
    mp_req_keepalive_after(r, status);
    s->out.start = s->out.end = 0;
    int shown = mp_local_response(r, status, &s->out, &s->req.local);
    step(s, "response", "answered here: %d %s (%s)", shown > 0 ? shown : 500, mp_http1_reason(shown > 0 ? shown : 500),
         why);
    mp_req_on_log(&s->req); /* the outcome is known: on_log runs, as once the server sent it */
}

/* A static route: the file it names, read into file_body, and the head. */
static void serve_static(mp_sim_t *s)
{
    mp_req_t *r = &s->req;
    mp_static_file_t f;
    mp_req_keepalive_after(r, 0); /* the server does not read the body */
    int st = mp_static_resolve(r, &f);
    if (f.file[0])
        step(s, "static", "%s%s: %d %s%s%s", f.file, f.fallback ? " (the fallback: the path asked for is missing)" : "",
             st, mp_http1_reason(st), f.content_type ? ", " : "", f.content_type ? f.content_type : "");
    else
        step(s, "static", "%d %s", st, mp_http1_reason(st));
    s->out.start = s->out.end = 0;
    int shown = mp_static_response(r, &f, &s->out, &s->req.local);
    if (shown > 0 && f.fd >= 0) {
        free(s->file_body);
        size_t got = 0;
        size_t want = f.len < SIM_MAX_FILE ? (size_t)f.len : SIM_MAX_FILE; /* the body reported is cut there */
        if ((s->file_body = malloc(want ? want : 1)))
            while (got < want) {
                ssize_t n = pread(f.fd, s->file_body + got, want - got, (off_t)(f.off + got));
                if (n <= 0)
                    break;
                got += (size_t)n;
            }
        s->req.local.body = (mp_slice){s->file_body, s->file_body ? got : 0};
    }
    mp_static_dispose(&f);
    if (shown < 0)
        return answer(s, 500, "the response head is too large");
    step(s, "response", "answered here: %d %s (static route)", shown, mp_http1_reason(shown));
    mp_req_on_log(&s->req);
}

/* Why a request with Upgrade that the gate never saw (req.c decides on a
 * request going to an upstream) was not forwarded as a handshake. */
static const char *unforwarded_why(const mp_sim_t *s)
{
    const mp_req_t *r = &s->req;
    if (!r->h.upgrade)
        return NULL;
    if (!r->match.route)
        return "not routed: Upgrade not forwarded";
    if (s->gen.cfg->statics[mp_route_slot(r->match.route)].root)
        return "a static route: Upgrade not forwarded";
    return "answered here: Upgrade not forwarded";
}

static void fill_result(mp_sim_t *s, mp_sim_result_t *out)
{
    const mp_req_t *r = &s->req;
    const mp_config_t *cfg = s->gen.cfg;
    memset(out, 0, sizeof(*out));
    out->forwarded = s->forwarded;
    out->has_upgrade = r->h.upgrade;
    out->upgrade = r->upgrade;
    out->upgrade_refused = r->upgrade ? NULL : r->upgrade_why ? r->upgrade_why : unforwarded_why(s);
    out->compress = mp_req_encoding_name(r->enc);
    out->compress_why = r->enc ? NULL : r->enc_why;
    out->tunnel = r->tunnel_open;
    out->status = s->forwarded ? 0 : r->status;
    if (r->match.route) {
        out->route = r->match.route->name;
        out->route_index = r->match.route->index;
    }
    if (s->forwarded && r->upstream >= 0 && (size_t)r->upstream < cfg->nupstreams) {
        out->upstream = cfg->upstreams[r->upstream].name;
        if (r->server >= 0)
            out->server = cfg->upstreams[r->upstream].servers[r->server].addr.text;
    }
    out->head = mp_buf_head(&s->out);
    out->head_len = mp_buf_len(&s->out);
    if (!s->forwarded) {
        out->body = s->req.local.body.p;
        out->body_len = r->is_head ? 0 : s->req.local.body.len;
    }
    out->error = s->error;
    out->trace = s->trace;
    out->ntrace = s->ntrace;
}

/* Traces what mp_req_decide is about to do to the request before any hook
 * sees it: the fields it drops (a name with '_') and the path it normalises
 * (SPEC "Behaviour on the wire"); a refused path is traced with the answer. */
static void note_normalised(mp_sim_t *s, const mp_http_request_t *h)
{
    const mp_settings_t *st = &s->gen.cfg->settings;
    for (unsigned i = 0; !st->underscores_in_headers && i < h->nheaders; i++)
        if (memchr(h->headers[i].name.p, '_', h->headers[i].name.len))
            step(s, "request", "field %.*s dropped (a name with '_': underscores_in_headers = false)",
                 (int)h->headers[i].name.len, h->headers[i].name.p);
    mp_path_opts_t o = {(uint8_t)st->merge_slashes, (uint8_t)st->escaped_slashes};
    char out[8192]; /* max_uri_size's default; a longer path goes untraced here */
    const char *why = NULL;
    if (h->path.len > sizeof(out) || (h->path.len == 1 && h->path.p[0] == '*') ||
        mp_path_is_normal(h->path.p, h->path.len, &o))
        return;
    ssize_t n = mp_path_normalize(h->path.p, h->path.len, &o, out, &why);
    if (n > 0)
        step(s, "request", "path %.*s normalised to %.*s", (int)h->path.len, h->path.p, (int)n, out);
}

/* Who answered a request mp_req_decide says was responded to. */
static const char *responded_why(const mp_sim_t *s)
{
    const mp_req_t *r = &s->req;
    const mp_route_t *rt = r->match.route;
    if (rt && s->gen.cfg->statics[mp_route_slot(rt)].root && r->path.len == 1 && r->path.p[0] == '*')
        return "OPTIONS * on a static route: the proxy answers it";
    return "a hook called req:respond";
}

static int run_request(mp_sim_t *s, const mp_sim_request_t *rq)
{
    mp_req_t *r = &s->req;
    const char *method = rq->method ? rq->method : "GET";
    const char *target = rq->target ? rq->target : "/";
    mp_strbuf_t *raw = &s->raw;
    mp_strbuf_reset(raw);
    mp_strbuf_printf(raw, "%s %s HTTP/1.1\r\n", method, target);
    const char *host = rq->no_host ? NULL : rq->host ? rq->host : "localhost";
    if (host)
        mp_strbuf_printf(raw, "Host: %s\r\n", host);
    put_fields(raw, rq->headers, rq->nheaders, rq->body_len, rq->body_len > 0);
    if (raw->oom)
        return MP_ENOMEM;
    const char *addr = rq->remote_addr ? rq->remote_addr : "127.0.0.1";
    new_request(s);
    if (set_peer_addr(s, addr) != 0) {
        step(s, "request", "remote_addr '%s' is not an IP address", addr);
        return MP_EINVAL;
    }
    step(s, "request", "%s %s%s%s from %s", method,
         !host                  ? ""
         : rq->tls || rq->https ? "https://"
                                : "http://",
         host ? host : "", target, addr);
    if (set_tls(s, rq, host) != 0)
        return MP_ENOMEM;
    size_t scanned = 0;
    int rc = mp_http1_parse_request(raw->p, raw->len, &scanned, &s->env.limits, &r->h);
    if (rc < 0) {
        int st = mp_req_parse_failed(r, rc);
        char why[160];
        snprintf(why, sizeof(why), "the parser refused the head: %s", r->h.error ? r->h.error : "too large");
        answer(s, st, why);
        return 0;
    }
    mp_req_begin(r, 0);
    note_normalised(s, &r->h);
    int d = mp_req_decide(r);
    note_route(s);
    if (d == MP_DECIDE_RESPONDED)
        return answer(s, 0, responded_why(s)), 0;
    if (d == MP_DECIDE_STATIC)
        return serve_static(s), 0;
    if (d != MP_DECIDE_UPSTREAM) {
        char refused[160];
        snprintf(refused, sizeof(refused), "the request target is refused: %s", r->h.error ? r->h.error : "?");
        const char *why = d == 404                     ? "no route matched"
                          : d == 413                   ? "the body is larger than max_body_size"
                          : d == 400 && r->upgrade_why ? r->upgrade_why
                          : d == 400                   ? refused
                          : s->error                   ? "a hook failed"
                                                       : "error";
        return answer(s, d, why), 0;
    }
    if (r->h.upgrade)
        step(s, "upgrade", "%s",
             r->upgrade
                 ? "a WebSocket handshake: forwarded with Upgrade: websocket; a 101 naming websocket opens a tunnel"
                 : r->upgrade_why);
    mp_balancer_t *b = &s->gen.balancers[r->upstream];
    int trial = 0;
    int server = mp_balancer_pick(b, &mp_req_pick, r, -1, &trial);
    if (server == MP_PICK_ERROR)
        return answer(s, 500, "the balancer failed"), 0;
    note_pick(s, b, server);
    if (server < 0)
        return answer(s, mp_req_unavailable(r, b), "no server available"), 0;
    if (trial) /* a half-open circuit's trial: nobody reports its outcome here */
        b->peers[server]->trial = 0;
    r->server = server;
    s->out.start = s->out.end = 0;
    if (mp_head_request(r, &s->out) != 0)
        return answer(s, 431, "the upstream request head is too large"), 0;
    s->forwarded = 1;
    const char *eol = memchr(mp_buf_head(&s->out), '\r', mp_buf_len(&s->out));
    step(s, "forward", "%.*s to %s", eol ? (int)(eol - mp_buf_head(&s->out)) : 0, mp_buf_head(&s->out),
         b->def->servers[server].addr.text);
    return 0;
}

/* A circuit held open stays open for its cooldown from now, whatever the
 * clock says: no half-open trial while the caller keeps it open. */
static void hold_open(mp_sim_t *s)
{
    const mp_config_t *cfg = s->gen.cfg;
    size_t k = 0;
    double now = mp_health_now();
    for (size_t u = 0; u < cfg->nupstreams; u++)
        for (size_t i = 0; i < cfg->upstreams[u].nservers; i++, k++)
            if (s->open[k])
                s->peers[k].open_until = now + (cfg->upstreams[u].passive_cooldown > 0
                                                    ? cfg->upstreams[u].passive_cooldown
                                                    : 10);
}

static void running(mp_sim_t *s, int on)
{
    lua_State *L = s->gen.L;
    if (on) {
        mp_now_pin(s->now);
        mp_log_capture(on_log, s);
        budget_len = s->gen.cfg->settings.hook_timeout > 0 ? s->gen.cfg->settings.hook_timeout : 1;
        budget_end = real_now() + budget_len;
        lua_sethook(L, on_budget, LUA_MASKCOUNT, 1000);
    } else {
        lua_sethook(L, NULL, 0, 0);
        mp_log_capture(NULL, NULL);
        mp_now_pin(0);
    }
}

int mp_sim_request(mp_sim_t *s, const mp_sim_request_t *rq, mp_sim_result_t *out)
{
    mp_sim_release(s);
    reset_result(s);
    running(s, 1);
    hold_open(s);
    int rc = run_request(s, rq);
    running(s, 0);
    fill_result(s, out);
    return rc;
}

static int run_response(mp_sim_t *s, const mp_sim_response_t *rs)
{
    mp_req_t *r = &s->req;
    mp_strbuf_t *b = &s->resp_raw;
    mp_strbuf_reset(b);
    mp_strbuf_printf(b, "HTTP/1.1 %d %s\r\n", rs->status, mp_http1_reason(rs->status));
    put_fields(b, rs->headers, rs->nheaders, rs->body_len, 1);
    if (b->oom)
        return MP_ENOMEM;
    static _Thread_local mp_http_response_t rh;
    memset(&rh, 0, sizeof(rh));
    size_t scanned = 0;
    step(s, "response", "upstream answered %d", rs->status);
    if (mp_http1_parse_response(b->p, b->len, &scanned, b->len, &rh) < 0) {
        s->forwarded = 0;
        return answer(s, 502, "the upstream's response head is invalid"), 0;
    }
    mp_req_response_framing(r, &rh);
    if (MP_UNLIKELY(r->upgrade || rh.status == 101) && mp_req_upgrade_answer(r, &rh) < 0) { /* as upstream.c */
        s->forwarded = 0;
        return answer(s, 502,
                      r->upgrade ? "a 101 whose Upgrade does not name websocket"
                                 : "a 101 that no WebSocket handshake asked for"),
               0;
    }
    if (r->tunnel_open)
        step(s, "upgrade", "101 naming websocket: the connection becomes a tunnel");
    else if (r->upgrade)
        step(s, "upgrade", "answered %d, not 101: relayed, then the client connection closes", rh.status);
    r->status = rh.status;
    int shown = mp_req_response_hooks(r, rh.status, &rh);
    if (!shown) {
        s->forwarded = 0;
        /* the server closes the connection without a response: 502 in the access log */
        r->status = 502;
        step(s, "response", "a response hook failed: the client connection is closed");
        s->out.start = s->out.end = 0;
        mp_req_on_log(&s->req);
        return 0;
    }
    r->status = shown;
    s->out.start = s->out.end = 0;
    if (mp_req_compress(r, &rh))
        step(s, "compress", "%s (Accept-Encoding)", mp_req_encoding_name(r->enc));
    else if (r->enc_why)
        step(s, "compress", "not compressed: %s", r->enc_why);
    if (mp_head_response(r, &rh, &s->out) != 0)
        return MP_ENOMEM;
    step(s, "response", "sent %d to the client", r->status);
    mp_req_on_log(&s->req);
    return 0;
}

int mp_sim_response(mp_sim_t *s, const mp_sim_response_t *rs, mp_sim_result_t *out)
{
    if (!s->forwarded)
        return MP_EINVAL;
    reset_result(s);
    s->route_noted = 1;
    running(s, 1);
    int rc = run_response(s, rs);
    running(s, 0);
    fill_result(s, out);
    if (rc == 0 && s->forwarded) { /* a response, not a request: report it as one */
        out->forwarded = 0;
        out->status = s->req.status;
        out->body = NULL;
        out->body_len = rs->body_len;
    }
    s->forwarded = 0;
    return rc;
}
