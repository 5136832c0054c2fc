/* l_request.c: the `req`, `res` and headers objects of hooks, and running
 * the hook chains.
 *
 * A request that enters Lua takes a slot from its VM's free list. Slots are
 * made on demand and kept for the VM's life, each with registry references
 * of its own, so a request's objects are anchored (and pushed again by later
 * hooks of the request) without luaL_ref/luaL_unref per request. An object
 * is a small userdata {slot, serial}; the request's end bumps the slot's
 * serial, so a stale object raises "request finished" and never touches
 * freed memory (STYLE "Buffers and lifetimes" 6). */
#include "l_request.h"

#include "gen.h"
#include "l_core.h"
#include "log.h"
#include "vm.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define REQ_MT "moonproxy.req"
#define RES_MT "moonproxy.res"
#define HDR_MT "moonproxy.headers"
#define RES_HDR_MT "moonproxy.res_headers"

/* What a slot anchors for its request; the first four are userdata objects. */
enum { OBJ_REQ, OBJ_RES, OBJ_REQ_HDR, OBJ_RES_HDR, OBJ_CTX, OBJ_LOG, OBJ_COUNT };

typedef struct lstate lstate_t;

typedef struct mp_lbox {
    mp_req_t *r;          /* the request using the slot; NULL when free */
    uint64_t serial;      /* bumped when the request ends: its objects go stale */
    unsigned made;        /* bit OBJ_*: made for the current request */
    int ref[OBJ_COUNT];   /* registry references the slot owns for the VM's life */
    lstate_t *st;         /* the VM's bookkeeping (owns the slot) */
    struct mp_lbox *next; /* st->free */
} mp_lbox_t;

/* A coroutine that ran a chain to its end, kept for the next one. */
typedef struct {
    lua_State *co;
    int ref;
} co_t;

#define CO_KEEP 64 /* idle coroutines kept per VM */

/* One per VM, a userdata anchored in the req metatable (at [1]). */
struct lstate {
    mp_lbox_t *free; /* slots of no request */
    int mt[OBJ_CTX]; /* registry references of the objects' metatables */
    int pick_ref;    /* pick_call (made once: pushing a C function allocates) */
    int nidle;
    co_t idle[CO_KEEP];
};

static int pick_call(lua_State *L);

/* The payload of every object: valid while serial == s->serial. */
typedef struct {
    mp_lbox_t *s;
    uint64_t serial;
} lobj_t;

static mp_req_t *live(lua_State *L, const lobj_t *o)
{
    if (MP_UNLIKELY(o->serial != o->s->serial))
        luaL_error(L, "request finished: this object belongs to a request that has ended");
    return o->s->r;
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
    char *p = mp_req_arena(r, n);
    if (MP_UNLIKELY(!p) && !r->arena.data)
        luaL_error(L, "out of memory");
    if (MP_UNLIKELY(!p))
        luaL_error(L, "the request's changes exceed %d bytes", (int)r->arena.cap);
    return p;
}

static mp_slice arena_copy(lua_State *L, mp_req_t *r, const char *p, size_t n)
{
    char *d = arena_alloc(L, r, n ? n : 1);
    memcpy(d, p, n);
    return (mp_slice){d, n};
}

/* The string at idx (a number is converted in place, as luaL_checklstring
 * does); raises for other types. */
static const char *key_at(lua_State *L, int idx, size_t *n)
{
    const char *k = lua_tolstring(L, idx, n);
    return MP_LIKELY(k != NULL) ? k : luaL_checklstring(L, idx, n);
}

/* ---- slots and objects ---- */

static lstate_t *state_of(lua_State *L, mp_req_t *r)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->gen->lua_mt[MP_MT_REQ]);
    lua_rawgeti(L, -1, 1);
    lstate_t *st = lua_touserdata(L, -1);
    lua_pop(L, 2);
    return st;
}

/* The request's slot, taken from the free list (or made) when it first
 * enters Lua. */
static mp_lbox_t *slot_of(lua_State *L, mp_req_t *r)
{
    mp_lbox_t *s = r->lbox;
    if (MP_LIKELY(s != NULL))
        return s;
    lstate_t *st = state_of(L, r);
    if ((s = st->free)) {
        st->free = s->next;
    } else {
        s = lua_newuserdata(L, sizeof(*s));
        memset(s, 0, sizeof(*s));
        s->st = st;
        luaL_ref(L, LUA_REGISTRYINDEX); /* kept for the VM's life: objects point at it */
        for (int i = 0; i < OBJ_COUNT; i++) {
            lua_pushboolean(L, 0);
            s->ref[i] = luaL_ref(L, LUA_REGISTRYINDEX);
        }
    }
    s->r = r;
    s->made = 0;
    s->next = NULL;
    r->lbox = s;
    return s;
}

/* Pushes the request's object of kind, made on first use. */
static void push_obj(lua_State *L, mp_lbox_t *s, int kind)
{
    if (s->made & (1u << kind)) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref[kind]);
        return;
    }
    if (kind == OBJ_CTX || kind == OBJ_LOG) {
        lua_newtable(L);
    } else {
        lobj_t *o = lua_newuserdata(L, sizeof(*o));
        o->s = s;
        o->serial = s->serial;
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->st->mt[kind]);
        lua_setmetatable(L, -2);
    }
    lua_pushvalue(L, -1);
    lua_rawseti(L, LUA_REGISTRYINDEX, s->ref[kind]);
    s->made |= 1u << kind;
}

/* ---- headers objects ---- */

static const mp_hedit_t *find_edit(const mp_hedit_t *e, const char *name, size_t n)
{
    for (; e; e = e->next)
        if (mp_slice_caseeq(e->name, (mp_slice){name, n}))
            return e;
    return NULL;
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
static void push_received(lua_State *L, const mp_header_t *h, unsigned n, const char *name, size_t len)
{
    unsigned i = 0;
    while (i < n && !mp_slice_caseeq(h[i].name, (mp_slice){name, len}))
        i++;
    if (i == n) {
        lua_pushnil(L);
        return;
    }
    unsigned k = 1;
    for (unsigned j = i + 1; j < n; j++)
        k += mp_slice_caseeq(h[j].name, (mp_slice){name, len});
    if (k == 1) {
        lua_pushlstring(L, h[i].value.p, h[i].value.len);
        return;
    }
    lua_createtable(L, (int)k, 0);
    for (unsigned j = i, at = 1; j < n; j++)
        if (mp_slice_caseeq(h[j].name, (mp_slice){name, len})) {
            lua_pushlstring(L, h[j].value.p, h[j].value.len);
            lua_rawseti(L, -2, (int)at++);
        }
}

/* headers[name]: res = 0 for the request's, 1 for the response's. */
static int hdr_get(lua_State *L, int res)
{
    mp_req_t *r = live(L, lua_touserdata(L, 1));
    size_t n;
    const char *name = key_at(L, 2, &n);
    const mp_hedit_t *e = find_edit(res ? r->resp_edits : r->edits, name, n);
    if (e)
        push_values(L, e->values, e->nvalues);
    else if (!res)
        push_received(L, r->h.headers, r->h.nheaders, name, n);
    else if (r->rh)
        push_received(L, r->rh->headers, r->rh->nheaders, name, n);
    else
        lua_pushnil(L);
    return 1;
}

static int req_hdr_index(lua_State *L)
{
    return hdr_get(L, 0);
}

static int res_hdr_index(lua_State *L)
{
    return hdr_get(L, 1);
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
    mp_slice name;
    name.p = key_at(L, kidx, &name.len);
    if (!mp_header_name_ok(name))
        luaL_error(L, "'%s' is not a valid header name", name.p);
    if (mp_header_is_framing(name))
        luaL_error(L, "header '%s' is managed by the proxy (message framing and connection)", name.p);
    mp_hedit_t *e;
    int vtype = lua_type(L, vidx);
    if (vtype == LUA_TSTRING || vtype == LUA_TNUMBER) {
        /* one value: the edit, its name and its value in one allocation */
        mp_slice v = check_value(L, vidx, name);
        e = (mp_hedit_t *)arena_alloc(L, r, sizeof(*e) + sizeof(mp_slice) + name.len + v.len);
        char *p = (char *)(e->values + 1);
        memcpy(p, name.p, name.len);
        memcpy(p + name.len, v.p, v.len);
        e->name = (mp_slice){p, name.len};
        e->values[0] = (mp_slice){p + name.len, v.len};
        e->nvalues = 1;
    } else {
        unsigned n = vtype == LUA_TTABLE ? (unsigned)lua_objlen(L, vidx) : vtype != LUA_TNIL;
        if (n > MP_HTTP_MAX_HEADERS)
            luaL_error(L, "header '%s': too many values", name.p);
        e = (mp_hedit_t *)arena_alloc(L, r, sizeof(*e) + n * sizeof(mp_slice));
        e->name = arena_copy(L, r, name.p, name.len);
        e->nvalues = n;
        for (unsigned i = 0; i < n; i++) {
            if (vtype == LUA_TTABLE)
                lua_rawgeti(L, vidx, (int)i + 1);
            else
                lua_pushvalue(L, vidx);
            mp_slice v = check_value(L, -1, name);
            e->values[i] = arena_copy(L, r, v.p, v.len);
            lua_pop(L, 1);
        }
    }
    mp_hedit_t **list = res ? &r->resp_edits : &r->edits;
    e->next = *list;
    *list = e;
}

/* headers[name] = string | number | { values } | nil */
static int hdr_set(lua_State *L, int res)
{
    mp_req_t *r = live(L, lua_touserdata(L, 1));
    if (r->phase > MP_PHASE_RESPONSE || (res && r->phase != MP_PHASE_RESPONSE))
        need_phase(L, r, res ? MP_PHASE_RESPONSE : MP_PHASE_REQUEST, "changing headers");
    set_header(L, r, res, 2, 3);
    return 0;
}

static int req_hdr_newindex(lua_State *L)
{
    return hdr_set(L, 0);
}

static int res_hdr_newindex(lua_State *L)
{
    return hdr_set(L, 1);
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
    mp_req_t *r = live(L, luaL_checkudata(L, 1, REQ_MT));
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

#define KEY_IS(k, lit) (memcmp((k), (lit), sizeof(lit) - 1) == 0)

static void set_field(lua_State *L, const char *k, const char *v)
{
    if (v) {
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
}

/* req.tls: { version, cipher, sni, client_subject } of the client's
 * session (a fresh table: a hook may keep or change it), nil when plain. */
static int push_tls(lua_State *L, const mp_req_t *r)
{
    const mp_tls_info_t *t = r->tls;
    if (!t)
        return lua_pushnil(L), 1;
    lua_createtable(L, 0, 4);
    set_field(L, "version", t->version);
    set_field(L, "cipher", t->cipher);
    set_field(L, "sni", t->sni);
    set_field(L, "client_subject", t->client_subject);
    return 1;
}

/* req.tunnel, in the on_log of a tunnel's close: what it relayed and why
 * it closed; nil for any other request. */
static int push_tunnel(lua_State *L, const mp_tunnel_info_t *t)
{
    if (!t)
        return lua_pushnil(L), 1;
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (lua_Number)t->to_upstream);
    lua_setfield(L, -2, "to_upstream");
    lua_pushnumber(L, (lua_Number)t->to_client);
    lua_setfield(L, -2, "to_client");
    lua_pushstring(L, mp_tunnel_close_name(t->close));
    lua_setfield(L, -2, "close");
    return 1;
}

/* req.key: the methods (upvalues 1-3: set_path, set_query, respond) even on
 * a stale object, the fields only while its request lives. The switch on
 * the length keeps a lookup to one or two short compares. */
static int req_index(lua_State *L)
{
    lobj_t *o = lua_touserdata(L, 1);
    size_t n;
    const char *k = key_at(L, 2, &n);
    if ((n == 8 && KEY_IS(k, "set_path")) || (n == 9 && KEY_IS(k, "set_query")) || (n == 7 && KEY_IS(k, "respond"))) {
        lua_pushvalue(L, lua_upvalueindex(n == 8 ? 1 : n == 9 ? 2 : 3));
        return 1;
    }
    mp_req_t *r = live(L, o);
    switch (n) {
    case 2:
        if (KEY_IS(k, "id"))
            return lua_pushlstring(L, r->id, r->id_len), 1;
        break;
    case 3:
        if (KEY_IS(k, "ctx"))
            return push_obj(L, o->s, OBJ_CTX), 1;
        if (KEY_IS(k, "log"))
            return push_obj(L, o->s, OBJ_LOG), 1;
        if (KEY_IS(k, "tls"))
            return push_tls(L, r);
        break;
    case 4:
        if (KEY_IS(k, "path"))
            return lua_pushlstring(L, r->path.p, r->path.len), 1;
        if (KEY_IS(k, "host"))
            return lua_pushlstring(L, r->h.host.p, r->h.host.len), 1;
        break;
    case 5:
        if (KEY_IS(k, "query")) {
            r->has_query ? lua_pushlstring(L, r->query.p, r->query.len) : lua_pushnil(L);
            return 1;
        }
        if (KEY_IS(k, "route")) {
            const char *name = r->match.route ? r->match.route->name : r->tunnel ? r->tunnel->route : NULL;
            name ? (void)lua_pushstring(L, name) : lua_pushnil(L);
            return 1;
        }
        break;
    case 8:
        if (KEY_IS(k, "trace_id"))
            return r->trace_id[0] ? (void)lua_pushstring(L, r->trace_id) : lua_pushnil(L), 1;
        break;
    case 6:
        if (KEY_IS(k, "tunnel"))
            return push_tunnel(L, r->tunnel);
        if (KEY_IS(k, "method"))
            return lua_pushlstring(L, r->h.method.p, r->h.method.len), 1;
        if (KEY_IS(k, "scheme"))
            return r->tls ? lua_pushliteral(L, "https") : lua_pushliteral(L, "http"), 1;
        break;
    case 7:
        if (KEY_IS(k, "headers"))
            return push_obj(L, o->s, OBJ_REQ_HDR), 1;
        if (KEY_IS(k, "span_id"))
            return r->span_id[0] ? (void)lua_pushstring(L, r->span_id) : lua_pushnil(L), 1;
        break;
    case 11:
        if (KEY_IS(k, "remote_addr"))
            return push_remote_addr(L, r), 1;
        break;
    }
    lua_pushnil(L);
    return 1;
}

static int req_newindex(lua_State *L)
{
    return luaL_error(L,
                      "req.%s cannot be assigned (use req:set_path, req:set_query, req.headers[name] = v, "
                      "or req.ctx for your own data)",
                      luaL_checkstring(L, 2));
}

/* ---- res ---- */

static int res_index(lua_State *L)
{
    lobj_t *o = lua_touserdata(L, 1);
    size_t n;
    const char *k = key_at(L, 2, &n);
    mp_req_t *r = live(L, o);
    if (n == 6 && KEY_IS(k, "status"))
        lua_pushinteger(L, r->resp_status ? r->resp_status : r->status);
    else if (n == 7 && KEY_IS(k, "headers"))
        push_obj(L, o->s, OBJ_RES_HDR);
    else
        lua_pushnil(L);
    return 1;
}

static int res_newindex(lua_State *L)
{
    mp_req_t *r = live(L, lua_touserdata(L, 1));
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    if (!(n == 6 && KEY_IS(k, "status")))
        return luaL_error(L, "res.%s cannot be assigned (res.status and res.headers[name] can)", k);
    need_phase(L, r, MP_PHASE_RESPONSE, "setting res.status");
    lua_Integer st = luaL_checkinteger(L, 3);
    if (st < 200 || st > 599)
        return luaL_error(L, "res.status: %d is not between 200 and 599", (int)st);
    r->resp_status = (uint16_t)st;
    return 0;
}

/* ---- objects and chains ---- */

/* Makes the metatable registered as name; returns a registry reference. */
static int new_metatable(lua_State *L, const char *name, lua_CFunction index, lua_CFunction newindex)
{
    luaL_newmetatable(L, name);
    if (index == req_index) {
        lua_pushcfunction(L, req_set_path);
        lua_pushcfunction(L, req_set_query);
        lua_pushcfunction(L, req_respond);
        lua_pushcclosure(L, req_index, 3);
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
    lstate_t *st = NULL;
    luaL_getmetatable(L, REQ_MT);
    if (lua_istable(L, -1)) { /* set up before in this VM: share its slots */
        lua_rawgeti(L, -1, 1);
        st = lua_touserdata(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (!st) {
        st = lua_newuserdata(L, sizeof(*st));
        memset(st, 0, sizeof(*st));
        st->mt[OBJ_REQ] = new_metatable(L, REQ_MT, req_index, req_newindex);
        st->mt[OBJ_RES] = new_metatable(L, RES_MT, res_index, res_newindex);
        st->mt[OBJ_REQ_HDR] = new_metatable(L, HDR_MT, req_hdr_index, req_hdr_newindex);
        st->mt[OBJ_RES_HDR] = new_metatable(L, RES_HDR_MT, res_hdr_index, res_hdr_newindex);
        lua_pushcfunction(L, pick_call);
        st->pick_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_rawgeti(L, LUA_REGISTRYINDEX, st->mt[OBJ_REQ]);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1); /* the metatable anchors the state; Lua cannot reach it */
        lua_pop(L, 1);
    }
    refs[MP_MT_REQ] = st->mt[OBJ_REQ];
    refs[MP_MT_RES] = st->mt[OBJ_RES];
    refs[MP_MT_HEADERS] = st->mt[OBJ_REQ_HDR];
}

/* A chain raised (err: "file:line: message" and a traceback): logged with
 * the route, and no more hooks run for the request. */
static int hook_failed(mp_req_t *r, const char *phase, char *err)
{
    r->hook_failed = 1;
    char *nl = strchr(err, '\n');
    if (nl)
        *nl = '\0';
    const mp_route_t *route = r->match.route;
    mp_env_log(r->env, MP_LOG_ERROR, "%s%s%s%s%s failed for request %.*s: %s", phase, route ? " of route '" : "",
               route ? route->name : "", route ? "' at " : "", route ? route->src : "", r->id_len, r->id, err);
    return MP_HOOK_ERROR;
}

/* Calls the function below its nargs arguments (already on the stack) under
 * the watchdog; leaves one result on success. For what cannot wait (a
 * balancer policy, a hash_key function): it runs on the VM's own thread,
 * where a call-out is refused (mp_hook_caller). */
static int call(lua_State *L, mp_req_t *r, int nargs, const char *phase)
{
    char err[1024];
    mp_req_env_t *e = r->env;
    /* release stores, not fences: the watchdog re-checks under vm_lock and
     * its count hook ignores a VM that moved on */
    atomic_store_explicit(e->hook_since, mp_req_now(e), memory_order_release);
    atomic_store_explicit(e->hook_vm, L, memory_order_release);
    int rc = mp_vm_call(L, nargs, 1, err, sizeof(err));
    atomic_store_explicit(e->hook_vm, NULL, memory_order_release);
    atomic_store_explicit(e->hook_since, 0, memory_order_release);
    if (rc != 0)
        return hook_failed(r, phase, err);
    return MP_HOOK_NEXT;
}

/* ---- chains in coroutines ----
 *
 * A chain runs in a coroutine of the VM (DESIGN "Hooks that call out"): a
 * call-out yields it (mp_hook_yield), and the call's completion resumes it
 * (mp_hook_resume). A chain that ends without waiting gives its coroutine
 * back for the next one, so the common case makes none. */

static const char *const kind_names[] = {"hook", "on_request hook", "route hook", "on_response hook", "on_log hook"};

static void co_take(lua_State *L, lstate_t *st, mp_req_t *r)
{
    if (st->nidle) {
        co_t c = st->idle[--st->nidle];
        r->co = c.co;
        r->co_ref = c.ref;
        return;
    }
    r->co = lua_newthread(L);
    r->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* r's coroutine is done with: kept when it ended cleanly (reusable),
 * else let go (a dead or abandoned one). */
static void co_give(lua_State *L, lstate_t *st, mp_req_t *r, int reusable)
{
    if (reusable && st->nidle < CO_KEEP) {
        st->idle[st->nidle++] = (co_t){r->co, r->co_ref};
    } else {
        lua_settop(r->co, 0);
        luaL_unref(L, LUA_REGISTRYINDEX, r->co_ref);
    }
    r->co = NULL;
}

/* The chain being resumed on this thread now (one at a time; a resume
 * inside another, the simulator's inside a spec's, puts the outer one back). */
static _Thread_local struct {
    lua_State *co;
    mp_req_t *r;
} running;

/* Resumes r's coroutine with nargs values on its stack until it ends or
 * waits for a call-out under way. Returns MP_HOOK_WAIT, MP_HOOK_ERROR, or
 * MP_HOOK_NEXT with the chain's one result on L's stack. The watchdog
 * counts each run, never the waits between them. */
static int resume(lua_State *L, mp_req_t *r, int nargs)
{
    lstate_t *st = r->lbox->st;
    mp_req_env_t *e = r->env;
    char err[1024];
    for (;;) {
        __typeof__(running) outer = running;
        running.co = r->co;
        running.r = r;
        atomic_store_explicit(e->hook_since, mp_req_now(e), memory_order_release);
        atomic_store_explicit(e->hook_vm, L, memory_order_release);
        int rc = mp_vm_resume(L, r->co, r->co_ref, nargs, err, sizeof(err));
        atomic_store_explicit(e->hook_vm, NULL, memory_order_release);
        atomic_store_explicit(e->hook_since, 0, memory_order_release);
        running = outer;
        if (rc == MP_EAGAIN && r->callout) {
            if (r->callout->start(r->callout) == 0)
                return MP_HOOK_WAIT;
            nargs = 0; /* over at once: its answer is there to take */
            continue;
        }
        if (rc == MP_EAGAIN) { /* coroutine.yield() in the chain itself */
            snprintf(err, sizeof(err), "a hook yielded outside a call-out (coroutine.yield in the hook itself)");
            co_give(L, st, r, 0);
        } else if (rc != 0) {
            r->co = NULL; /* let go by mp_vm_resume */
        }
        if (rc != 0)
            return hook_failed(r, kind_names[r->hook_kind], err);
        int n = lua_gettop(r->co);
        if (n == 0) {
            lua_pushnil(L);
        } else {
            lua_settop(r->co, 1);
            lua_xmove(r->co, L, 1);
        }
        co_give(L, st, r, 1);
        return MP_HOOK_NEXT;
    }
}

/* Runs the chain below its nargs arguments on L's stack in a coroutine. */
static int run(lua_State *L, mp_req_t *r, int nargs, int kind)
{
    MP_ASSERT(!r->co && !r->callout);
    co_take(L, r->lbox->st, r);
    lua_xmove(L, r->co, nargs + 1);
    r->hook_kind = (uint8_t)kind;
    return resume(L, r, nargs);
}

mp_req_t *mp_hook_context(lua_State *L, const char **why)
{
    mp_req_t *r = running.r;
    if (!r) {
        *why =
            "only hooks can call out (not the configuration script, a balancer policy, a hash_key function or "
            "a guard)";
        return NULL;
    }
    if (L != running.co) {
        *why = "a hook calls out from its own code, not from a coroutine it made";
        return NULL;
    }
    return r;
}

mp_req_t *mp_hook_caller(lua_State *L, const char **why)
{
    mp_req_t *r = mp_hook_context(L, why);
    if (!r)
        return NULL;
    if (!r->env->wake) {
        *why = "the simulator answers call-outs only through opts.http and opts.redis";
        return NULL;
    }
    if (r->callout) {
        *why = "the hook has a call-out whose answer it has not taken";
        return NULL;
    }
    return r;
}

int mp_hook_yield(lua_State *L, mp_req_t *r, mp_callout_t *c)
{
    r->callout = c;
    return lua_yield(L, 0);
}

/* The request whose chain runs in L's coroutine now, or NULL. */
static mp_req_t *running_req(lua_State *L)
{
    return L == running.co ? running.r : NULL;
}

mp_callout_t *mp_hook_answer(lua_State *L)
{
    mp_req_t *r = running_req(L);
    if (!r || !r->callout)
        luaL_error(L, "no call-out answer to take");
    return r->callout;
}

void mp_hook_answered(lua_State *L)
{
    mp_req_t *r = running_req(L);
    if (!r || !r->callout)
        return;
    mp_callout_t *c = r->callout;
    r->callout = NULL;
    c->cancel(c);
}

/* Pushes the chain at ref, then req. */
static void push_chain(lua_State *L, mp_req_t *r, int ref)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    push_obj(L, slot_of(L, r), OBJ_REQ);
}

/* The servers a Lua policy may pick from (pick_call). */
typedef struct {
    const mp_pick_server_t *s;
    int n, navailable;
} pick_list_t;

/* pick_call(fn, servers, req, upstream, list), in the protected call: the
 * list of the available servers is a new table (making it may raise), then
 * the policy runs on it. */
static int pick_call(lua_State *L)
{
    const pick_list_t *a = lua_touserdata(L, 5);
    lua_settop(L, 4);
    if (a->navailable < a->n) {
        lua_createtable(L, a->navailable, 0);
        for (int i = 0, k = 0; i < a->n; i++)
            if (a->s[i].available) {
                lua_rawgeti(L, 2, i + 1);
                lua_rawseti(L, -2, ++k);
            }
        lua_replace(L, 2);
    }
    lua_call(L, 3, 1);
    return 1;
}

int mp_hook_pick(lua_State *L, mp_req_t *r, int ref, const mp_pick_server_t *s, int n, int navailable)
{
    pick_list_t list = {s, n, navailable};
    lua_rawgeti(L, LUA_REGISTRYINDEX, state_of(L, r)->pick_ref);
    lua_insert(L, -3);     /* pick, servers, upstream */
    push_chain(L, r, ref); /* pick, servers, upstream, fn, req */
    lua_insert(L, -3);     /* pick, servers, req, upstream, fn */
    lua_insert(L, -4);     /* pick, fn, servers, req, upstream */
    lua_pushlightuserdata(L, &list);
    return call(L, r, 5, "balancer");
}

int mp_hook_hash_key(lua_State *L, mp_req_t *r, int ref)
{
    push_chain(L, r, ref);
    return call(L, r, 1, "hash_key function");
}

/* What a finished chain's result means for its kind (rc from resume). */
static int finish(lua_State *L, mp_req_t *r, int rc)
{
    int kind = r->hook_kind;
    r->hook_kind = MP_HK_NONE;
    if (kind == MP_HK_RESPONSE)
        r->rh = NULL;
    if (rc != MP_HOOK_NEXT)
        return rc;
    if (kind == MP_HK_ROUTE && r->handler_up == -2) { /* a handler route: what it returned */
        r->handler_up = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : -1;
    }
    lua_pop(L, 1);
    if ((kind == MP_HK_PRE || kind == MP_HK_ROUTE) && r->local_status)
        return MP_HOOK_RESPONDED;
    return MP_HOOK_NEXT;
}

int mp_hook_pre(lua_State *L, mp_req_t *r, int ref)
{
    r->phase = MP_PHASE_REQUEST;
    push_chain(L, r, ref);
    lua_pushnil(L);
    int rc = run(L, r, 2, MP_HK_PRE);
    return rc == MP_HOOK_WAIT ? rc : finish(L, r, rc);
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

int mp_hook_route(lua_State *L, mp_req_t *r, const mp_route_hooks_t *h)
{
    r->phase = MP_PHASE_REQUEST;
    r->handler_up = h->handler ? -2 : -1;
    push_chain(L, r, h->request);
    if (h->captures)
        push_captures(L, r);
    else
        lua_pushnil(L);
    int rc = run(L, r, 2, MP_HK_ROUTE);
    return rc == MP_HOOK_WAIT ? rc : finish(L, r, rc);
}

int mp_hook_response(lua_State *L, mp_req_t *r, int ref, const mp_http_response_t *rh)
{
    r->phase = MP_PHASE_RESPONSE;
    r->rh = rh;
    push_chain(L, r, ref);
    push_obj(L, r->lbox, OBJ_RES);
    int rc = run(L, r, 2, MP_HK_RESPONSE);
    return rc == MP_HOOK_WAIT ? rc : finish(L, r, rc);
}

int mp_hook_log(lua_State *L, mp_req_t *r, int ref)
{
    r->phase = MP_PHASE_LOG;
    push_chain(L, r, ref);
    push_obj(L, r->lbox, OBJ_RES);
    int rc = run(L, r, 2, MP_HK_LOG);
    return rc == MP_HOOK_WAIT ? rc : finish(L, r, rc);
}

void mp_hook_resume(mp_req_t *r)
{
    lua_State *L = r->gen->L;
    MP_ASSERT(r->co && r->hook_kind != MP_HK_NONE);
    int kind = r->hook_kind;
    int rc = resume(L, r, 0);
    if (rc == MP_HOOK_WAIT)
        return;
    r->env->wake(r, kind, finish(L, r, rc));
}

void mp_hook_abandon(lua_State *L, mp_req_t *r)
{
    if (r->callout) {
        mp_callout_t *c = r->callout;
        r->callout = NULL;
        c->cancel(c);
    }
    if (r->co)
        co_give(L, r->lbox->st, r, 0);
    r->hook_kind = MP_HK_NONE;
    r->rh = NULL;
}

/* A req.log key an access log line may take: a short name of its own. */
static int log_key_ok(const char *k, size_t n)
{
    if (n == 0 || n > 64 || mp_alog_field(k) >= 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = k[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

size_t mp_hook_log_fields(lua_State *L, mp_req_t *r, char *out, size_t cap)
{
    mp_lbox_t *s = r->lbox;
    if (!s || !(s->made & (1u << OBJ_LOG)))
        return 0;
    size_t len = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref[OBJ_LOG]);
    lua_pushnil(L);
    while (lua_next(L, -2)) { /* no Lua runs: raw reads of a plain table */
        size_t kn, vn, at = len;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kn) : NULL;
        int t = lua_type(L, -1);
        if (k && log_key_ok(k, kn) && len + kn + 8 < cap) {
            len += (size_t)snprintf(out + len, cap - len, ",\"%s\":", k);
            if (t == LUA_TSTRING) {
                const char *v = lua_tolstring(L, -1, &vn);
                out[len++] = '"';
                len = mp_json_escape(out, len, cap - 1, (mp_slice){v, vn});
                out[len++] = '"';
            } else if (t == LUA_TNUMBER && isfinite(lua_tonumber(L, -1))) {
                len += (size_t)snprintf(out + len, cap - len, "%.17g", lua_tonumber(L, -1));
            } else if (t == LUA_TBOOLEAN) {
                len += (size_t)snprintf(out + len, cap - len, "%s", lua_toboolean(L, -1) ? "true" : "false");
            } else {
                len = at; /* a table, a function...: not a log value */
            }
            if (len >= cap - 1) /* it did not fit whole: left out */
                len = at;
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return len;
}

void mp_hook_release(lua_State *L, mp_req_t *r)
{
    if (MP_UNLIKELY(r->co || r->callout))
        mp_hook_abandon(L, r);
    mp_lbox_t *s = r->lbox;
    if (s) {
        for (int k = OBJ_CTX; k <= OBJ_LOG; k++)
            if (s->made & (1u << k)) { /* the table may be large: let it go now */
                lua_pushboolean(L, 0);
                lua_rawseti(L, LUA_REGISTRYINDEX, s->ref[k]);
            }
        s->serial++;
        s->r = NULL;
        s->made = 0;
        s->next = s->st->free;
        s->st->free = s;
        r->lbox = NULL;
    }
    r->phase = MP_PHASE_DONE;
    mp_buf_release(&r->arena, r->env->bufs);
    free(r->local_body);
    r->local_body = NULL;
    r->edits = r->resp_edits = NULL;
}
