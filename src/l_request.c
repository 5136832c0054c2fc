/* l_request.c: the `req`, `res` and headers objects of hooks, and running
 * the hook chains. A Lua object holds a box {request pointer}; the request's
 * end clears the pointer, so a stale object raises "request finished" and
 * never touches freed memory (STYLE "Buffers and lifetimes" 6). */
#include "l_request.h"

#include "l_core.h"
#include "log.h"
#include "reload.h"
#include "vm.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>

#define REQ_MT "moonproxy.req"
#define RES_MT "moonproxy.res"
#define HDR_MT "moonproxy.headers"

enum { BOX_REQ, BOX_RES };

typedef struct mp_lbox {
    mp_req_t *r;  /* NULL once the request ended */
    int self_ref; /* anchors the box while the request lives */
    int ctx_ref;  /* req.ctx */
    int hdr_ref;  /* the headers object */
    uint8_t which;
} mp_lbox_t;

typedef struct {
    mp_req_t *r; /* NULL once the request ended (cleared with its box) */
    uint8_t which;
} mp_lhdr_t;

static mp_req_t *live(lua_State *L, mp_lbox_t *b)
{
    if (!b->r)
        luaL_error(L, "request finished: this object belongs to a request that has ended");
    return b->r;
}

static void need_phase(lua_State *L, mp_req_t *r, int phase, const char *what)
{
    static const char *const names[] = {"a request hook", "a response hook", "on_log", "no hook"};
    if (r->phase != phase)
        luaL_error(L, "%s is only allowed in %s (this is %s)", what, names[phase], names[r->phase]);
}

/* Bump allocation from the request's arena (one buffer block). */
static char *arena_alloc(lua_State *L, mp_req_t *r, size_t n)
{
    mp_buf_t *a = &r->arena;
    if (mp_buf_acquire(a, &r->conn->w->bufs) != 0)
        luaL_error(L, "out of memory");
    size_t at = (a->end + 7u) & ~(size_t)7u;
    if (at + n > a->cap)
        luaL_error(L, "the request's changes exceed %d bytes", (int)a->cap);
    a->end = (uint32_t)(at + n);
    return a->data + at;
}

static mp_slice arena_copy(lua_State *L, mp_req_t *r, const char *p, size_t n)
{
    char *d = arena_alloc(L, r, n ? n : 1);
    memcpy(d, p, n);
    return (mp_slice){d, n};
}

/* ---- headers objects ---- */

static mp_slice check_name(lua_State *L, int idx)
{
    size_t n;
    const char *p = luaL_checklstring(L, idx, &n);
    return (mp_slice){p, n};
}

static void push_values(lua_State *L, const mp_slice *v, unsigned n)
{
    if (n == 0) {
        lua_pushnil(L);
    } else if (n == 1) {
        lua_pushlstring(L, v[0].p, v[0].len);
    } else {
        lua_createtable(L, (int)n, 0);
        for (unsigned i = 0; i < n; i++) {
            lua_pushlstring(L, v[i].p, v[i].len);
            lua_rawseti(L, -2, (int)i + 1);
        }
    }
}

/* Pushes the received fields named name: nil, a string, or a list. */
static void push_received(lua_State *L, const mp_header_t *h, unsigned n, mp_slice name)
{
    mp_slice found[MP_HTTP_MAX_HEADERS];
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++)
        if (mp_header_name_eq(h[i].name, name))
            found[k++] = h[i].value;
    push_values(L, found, k);
}

/* The metamethods are reachable only through their own objects
 * (__metatable hides the tables), so the userdata's type is known. */
static mp_req_t *live_hdr(lua_State *L, mp_lhdr_t *o)
{
    if (!o->r)
        luaL_error(L, "request finished: this object belongs to a request that has ended");
    return o->r;
}

static int hdr_index(lua_State *L)
{
    mp_lhdr_t *o = lua_touserdata(L, 1);
    mp_req_t *r = live_hdr(L, o);
    mp_slice name = check_name(L, 2);
    int res = o->which == BOX_RES;
    const mp_hedit_t *e = mp_hedit_find(res ? r->resp_edits : r->edits, name);
    if (e)
        push_values(L, e->values, e->nvalues);
    else if (!res)
        push_received(L, r->h.headers, r->h.nheaders, name);
    else if (r->rh)
        push_received(L, r->rh->headers, r->rh->nheaders, name);
    else
        lua_pushnil(L);
    return 1;
}

static mp_slice check_value(lua_State *L, int idx, mp_slice name)
{
    size_t n;
    const char *p = lua_tolstring(L, idx, &n);
    if (!p)
        luaL_error(L, "header '%s': a value is a string, a number or a list of them", name.p);
    mp_slice v = {p, n};
    if (!mp_header_value_ok(v))
        luaL_error(L, "header '%s': the value has a control character (CR, LF...)", name.p);
    return v;
}

/* Records headers[name at kidx] = value at vidx for the request (res = 0)
 * or the response (res = 1). Raises for the Lua code that asked. */
static void set_header(lua_State *L, mp_req_t *r, int res, int kidx, int vidx)
{
    mp_slice name = check_name(L, kidx);
    if (!mp_header_name_ok(name))
        luaL_error(L, "'%s' is not a valid header name", name.p);
    if (mp_header_is_framing(name))
        luaL_error(L, "header '%s' is managed by the proxy (message framing and connection)", name.p);
    unsigned n = lua_istable(L, vidx) ? (unsigned)lua_objlen(L, vidx) : !lua_isnil(L, vidx);
    if (n > MP_HTTP_MAX_HEADERS)
        luaL_error(L, "header '%s': too many values", name.p);
    mp_hedit_t *e = (mp_hedit_t *)arena_alloc(L, r, sizeof(*e) + n * sizeof(mp_slice));
    e->name = arena_copy(L, r, name.p, name.len);
    e->nvalues = n;
    for (unsigned i = 0; i < n; i++) {
        if (lua_istable(L, vidx))
            lua_rawgeti(L, vidx, (int)i + 1);
        else
            lua_pushvalue(L, vidx);
        mp_slice v = check_value(L, -1, name);
        e->values[i] = arena_copy(L, r, v.p, v.len);
        lua_pop(L, 1);
    }
    mp_hedit_t **list = res ? &r->resp_edits : &r->edits;
    e->next = *list;
    *list = e;
}

/* headers[name] = string | number | { values } | nil */
static int hdr_newindex(lua_State *L)
{
    mp_lhdr_t *o = lua_touserdata(L, 1);
    mp_req_t *r = live_hdr(L, o);
    int res = o->which == BOX_RES;
    if (r->phase > MP_PHASE_RESPONSE || (res && r->phase != MP_PHASE_RESPONSE))
        need_phase(L, r, res ? MP_PHASE_RESPONSE : MP_PHASE_REQUEST, "changing headers");
    set_header(L, r, res, 2, 3);
    return 0;
}

static void push_headers(lua_State *L, mp_lbox_t *b)
{
    if (b->hdr_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, b->hdr_ref);
        return;
    }
    mp_lhdr_t *o = lua_newuserdata(L, sizeof(*o));
    *o = (mp_lhdr_t){b->r, b->which};
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->r->gen->lua_mt[MP_MT_HEADERS]);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    b->hdr_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* ---- req ---- */

static void push_remote_addr(lua_State *L, mp_req_t *r)
{
    mp_slice a = mp_req_remote_addr(r);
    lua_pushlstring(L, a.p, a.len);
}

static int req_set_path(lua_State *L)
{
    mp_req_t *r = live(L, luaL_checkudata(L, 1, REQ_MT));
    need_phase(L, r, MP_PHASE_REQUEST, "req:set_path");
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (n == 0 || p[0] != '/')
        luaL_error(L, "req:set_path: the path must start with '/'");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f || p[i] == '?' || p[i] == '#')
            luaL_error(L, "req:set_path: '%s' has a byte not allowed in a path", p);
    r->path = arena_copy(L, r, p, n);
    return 0;
}

static int req_set_query(lua_State *L)
{
    mp_req_t *r = live(L, luaL_checkudata(L, 1, REQ_MT));
    need_phase(L, r, MP_PHASE_REQUEST, "req:set_query");
    if (lua_isnoneornil(L, 2)) {
        r->has_query = 0;
        return 0;
    }
    size_t n;
    const char *q = luaL_checklstring(L, 2, &n);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)q[i] <= ' ' || q[i] == 0x7f || q[i] == '#')
            luaL_error(L, "req:set_query: '%s' has a byte not allowed in a query", q);
    r->query = arena_copy(L, r, q, n);
    r->has_query = 1;
    return 0;
}

/* req:respond(status, body, headers): answers here; returns core.RESPONDED. */
static int req_respond(lua_State *L)
{
    mp_lbox_t *b = luaL_checkudata(L, 1, REQ_MT);
    mp_req_t *r = live(L, b);
    need_phase(L, r, MP_PHASE_REQUEST, "req:respond");
    if (r->local_status)
        luaL_error(L, "req:respond: this request was already answered");
    lua_Integer status = luaL_checkinteger(L, 2);
    if (status < 200 || status > 599)
        luaL_error(L, "req:respond: status %d is not between 200 and 599", (int)status);
    size_t n = 0;
    const char *body = luaL_optlstring(L, 3, "", &n);
    if (!lua_isnoneornil(L, 4)) {
        luaL_checktype(L, 4, LUA_TTABLE);
        for (lua_pushnil(L); lua_next(L, 4); lua_pop(L, 1))
            set_header(L, r, 1, lua_gettop(L) - 1, lua_gettop(L));
    }
    if (!(r->local_body = malloc(n ? n : 1)))
        luaL_error(L, "out of memory");
    memcpy(r->local_body, body, n);
    r->local_body_len = n;
    r->local_status = (uint16_t)status;
    lua_pushlightuserdata(L, MP_RESPONDED);
    return 1;
}

static void push_ctx(lua_State *L, mp_lbox_t *b)
{
    if (b->ctx_ref == LUA_NOREF) {
        lua_newtable(L);
        lua_pushvalue(L, -1);
        b->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->ctx_ref);
}

#define KEY_IS(k, n, lit) ((n) == sizeof(lit) - 1 && memcmp((k), (lit), (n)) == 0)

static int req_index(lua_State *L)
{
    mp_lbox_t *b = lua_touserdata(L, 1);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1)); /* methods */
    if (!lua_isnil(L, -1))
        return 1;
    mp_req_t *r = live(L, b);
    if (KEY_IS(k, n, "method"))
        lua_pushlstring(L, r->h.method.p, r->h.method.len);
    else if (KEY_IS(k, n, "path"))
        lua_pushlstring(L, r->path.p, r->path.len);
    else if (KEY_IS(k, n, "query"))
        r->has_query ? lua_pushlstring(L, r->query.p, r->query.len) : lua_pushnil(L);
    else if (KEY_IS(k, n, "host"))
        lua_pushlstring(L, r->h.host.p, r->h.host.len);
    else if (KEY_IS(k, n, "headers"))
        push_headers(L, b);
    else if (KEY_IS(k, n, "ctx"))
        push_ctx(L, b);
    else if (KEY_IS(k, n, "id"))
        lua_pushlstring(L, r->id, r->id_len);
    else if (KEY_IS(k, n, "remote_addr"))
        push_remote_addr(L, r);
    else if (KEY_IS(k, n, "scheme"))
        lua_pushliteral(L, "http");
    else if (KEY_IS(k, n, "route"))
        r->match.route ? (void)lua_pushstring(L, r->match.route->name) : lua_pushnil(L);
    else
        lua_pushnil(L);
    return 1;
}

static int req_newindex(lua_State *L)
{
    return luaL_error(L, "req.%s cannot be assigned (use req:set_path, req:set_query, req.headers[name] = v, "
                         "or req.ctx for your own data)",
                      luaL_checkstring(L, 2));
}

/* ---- res ---- */

static int res_index(lua_State *L)
{
    mp_lbox_t *b = lua_touserdata(L, 1);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    mp_req_t *r = live(L, b);
    if (KEY_IS(k, n, "status"))
        lua_pushinteger(L, r->resp_status ? r->resp_status : r->status);
    else if (KEY_IS(k, n, "headers"))
        push_headers(L, b);
    else
        lua_pushnil(L);
    return 1;
}

static int res_newindex(lua_State *L)
{
    mp_lbox_t *b = lua_touserdata(L, 1);
    mp_req_t *r = live(L, b);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    if (!KEY_IS(k, n, "status"))
        return luaL_error(L, "res.%s cannot be assigned (res.status and res.headers[name] can)", k);
    need_phase(L, r, MP_PHASE_RESPONSE, "setting res.status");
    lua_Integer st = luaL_checkinteger(L, 3);
    if (st < 200 || st > 599)
        return luaL_error(L, "res.status: %d is not between 200 and 599", (int)st);
    r->resp_status = (uint16_t)st;
    return 0;
}

/* ---- objects and chains ---- */

static int new_metatable(lua_State *L, const char *name, lua_CFunction index, lua_CFunction newindex)
{
    luaL_newmetatable(L, name);
    if (index == req_index) {
        static const luaL_Reg methods[] = {
            {"set_path", req_set_path}, {"set_query", req_set_query}, {"respond", req_respond}, {NULL, NULL}};
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_pushcclosure(L, req_index, 1);
    } else {
        lua_pushcfunction(L, index);
    }
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable"); /* getmetatable(req) is false: the metamethods stay ours */
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

void mp_l_request_setup(lua_State *L, int refs[MP_MT_COUNT])
{
    refs[MP_MT_REQ] = new_metatable(L, REQ_MT, req_index, req_newindex);
    refs[MP_MT_RES] = new_metatable(L, RES_MT, res_index, res_newindex);
    refs[MP_MT_HEADERS] = new_metatable(L, HDR_MT, hdr_index, hdr_newindex);
}

static void push_box(lua_State *L, mp_req_t *r, int which)
{
    mp_lbox_t *b = r->lbox[which];
    if (b) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, b->self_ref);
        return;
    }
    b = lua_newuserdata(L, sizeof(*b));
    *b = (mp_lbox_t){.r = r, .ctx_ref = LUA_NOREF, .hdr_ref = LUA_NOREF, .which = (uint8_t)which};
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->gen->lua_mt[which == BOX_REQ ? MP_MT_REQ : MP_MT_RES]);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    b->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    r->lbox[which] = b;
}

/* Calls the function below its nargs arguments (already on the stack) under
 * the watchdog; leaves one result on success. */
static int call(lua_State *L, mp_req_t *r, int nargs, const char *phase)
{
    char err[1024];
    mp_worker_t *w = r->conn->w;
    w->lua_since = ev_now(w->loop);
    w->lua_vm = L;
    int rc = mp_vm_call(L, nargs, 1, err, sizeof(err));
    w->lua_vm = NULL;
    w->lua_since = 0;
    if (rc != 0) {
        r->hook_failed = 1;
        char *nl = strchr(err, '\n');
        if (nl)
            *nl = '\0';
        const mp_route_t *route = r->match.route;
        mp_log_error("w%d: %s%s%s%s%s failed for request %.*s: %s", w->id, phase, route ? " of route '" : "",
                     route ? route->name : "", route ? "' at " : "", route ? route->src : "", r->id_len, r->id, err);
        return MP_HOOK_ERROR;
    }
    return MP_HOOK_NEXT;
}

/* Calls the chain at ref with (req, arg): arg is pushed by the caller as
 * the top value when nargs is 2. Leaves one result on the stack on success. */
static int run(lua_State *L, mp_req_t *r, int ref, int nargs, const char *phase)
{
    int base = lua_gettop(L) - nargs + 2; /* where the caller's argument after req is */
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    lua_insert(L, base);
    push_box(L, r, BOX_REQ);
    lua_insert(L, base + 1);
    return call(L, r, nargs, phase);
}

int mp_hook_pick(lua_State *L, mp_req_t *r, int ref)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref); /* servers, upstream, fn */
    lua_insert(L, -3);
    push_box(L, r, BOX_REQ);
    lua_insert(L, -2); /* fn, servers, req, upstream */
    return call(L, r, 3, "balancer");
}

int mp_hook_hash_key(lua_State *L, mp_req_t *r, int ref)
{
    return run(L, r, ref, 1, "hash_key function");
}

int mp_hook_pre(lua_State *L, mp_req_t *r, int ref)
{
    r->phase = MP_PHASE_REQUEST;
    lua_pushnil(L);
    int rc = run(L, r, ref, 2, "on_request hook");
    if (rc == MP_HOOK_NEXT)
        lua_pop(L, 1);
    return rc == MP_HOOK_NEXT && r->local_status ? MP_HOOK_RESPONDED : rc;
}

static void push_captures(lua_State *L, mp_req_t *r)
{
    const mp_route_match_t *m = &r->match;
    lua_createtable(L, m->ncaptures, 1);
    for (int i = 0; i < m->ncaptures; i++) {
        size_t s = m->ovector[2 * i], e = m->ovector[2 * i + 1];
        if (s == (size_t)-1)
            lua_pushboolean(L, 0);
        else
            lua_pushlstring(L, r->match_path.p + s, e - s);
        lua_rawseti(L, -2, i);
    }
}

int mp_hook_route(lua_State *L, mp_req_t *r, const mp_route_hooks_t *h, int *upstream)
{
    r->phase = MP_PHASE_REQUEST;
    if (h->captures)
        push_captures(L, r);
    else
        lua_pushnil(L);
    int rc = run(L, r, h->request, 2, "route hook");
    if (rc != MP_HOOK_NEXT)
        return rc;
    if (h->handler && lua_isnumber(L, -1))
        *upstream = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return r->local_status ? MP_HOOK_RESPONDED : MP_HOOK_NEXT;
}

int mp_hook_response(lua_State *L, mp_req_t *r, int ref, const mp_http_response_t *rh)
{
    r->phase = MP_PHASE_RESPONSE;
    r->rh = rh;
    push_box(L, r, BOX_RES);
    int rc = run(L, r, ref, 2, "on_response hook");
    r->rh = NULL;
    if (rc == MP_HOOK_NEXT)
        lua_pop(L, 1);
    return rc;
}

void mp_hook_log(lua_State *L, mp_req_t *r, int ref)
{
    r->phase = MP_PHASE_LOG;
    push_box(L, r, BOX_RES);
    if (run(L, r, ref, 2, "on_log hook") == MP_HOOK_NEXT)
        lua_pop(L, 1);
}

void mp_hook_release(lua_State *L, mp_req_t *r)
{
    for (int i = 0; i < 2; i++) {
        mp_lbox_t *b = r->lbox[i];
        if (!b)
            continue;
        b->r = NULL;
        if (b->hdr_ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, b->hdr_ref);
            ((mp_lhdr_t *)lua_touserdata(L, -1))->r = NULL;
            lua_pop(L, 1);
            luaL_unref(L, LUA_REGISTRYINDEX, b->hdr_ref);
        }
        if (b->ctx_ref != LUA_NOREF)
            luaL_unref(L, LUA_REGISTRYINDEX, b->ctx_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, b->self_ref);
        b->ctx_ref = b->hdr_ref = b->self_ref = LUA_NOREF;
        r->lbox[i] = NULL;
    }
    r->phase = MP_PHASE_DONE;
    mp_buf_release(&r->arena, &r->conn->w->bufs);
    free(r->local_body);
    r->local_body = NULL;
    r->edits = r->resp_edits = NULL;
}
