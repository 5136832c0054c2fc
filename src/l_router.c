/* l_router.c: core.router(routes), the C route table as a Lua object for the
 * specs and moonproxy.testing. A thin binding: router.c decides everything. */
#include "l_core.h"
#include "router.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>

#define ROUTER_MT "moonproxy.router"

/* The userdata; its environment table maps a route index to its Lua target. */
typedef struct {
    mp_router_t *r; /* owned; NULL once collected */
} l_router_t;

/* t[k] as a C string borrowed from t, or NULL when nil. */
static const char *opt_str(lua_State *L, int t, const char *k, int route)
{
    lua_getfield(L, t, k);
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1))
        luaL_error(L, "route %d: '%s' must be a string", route, k);
    lua_pop(L, 1); /* still referenced by t */
    return s;
}

/* methods = "GET" or { "GET", "HEAD" } ("method" is accepted too); the
 * array lives in a userdata left on the stack. */
static void read_methods(lua_State *L, int t, int route, mp_route_def_t *d)
{
    lua_getfield(L, t, "methods");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_getfield(L, t, "method");
    }
    if (lua_isnil(L, -1))
        return;
    if (lua_type(L, -1) == LUA_TSTRING) {
        const char **v = lua_newuserdata(L, sizeof(*v));
        v[0] = lua_tostring(L, -2);
        d->methods = v;
        d->nmethods = 1;
        return;
    }
    if (!lua_istable(L, -1))
        luaL_error(L, "route %d: methods must be a string or a list", route);
    int list = lua_gettop(L);
    size_t n = lua_objlen(L, list);
    const char **v = lua_newuserdata(L, (n ? n : 1) * sizeof(*v));
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, list, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "route %d: methods must be strings", route);
        v[i] = lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    d->methods = v;
    d->nmethods = n;
}

/* headers = { { name = , value = , regex = bool }, ... } into a userdata left on the stack. */
static void read_headers(lua_State *L, int t, int route, mp_route_def_t *d)
{
    lua_getfield(L, t, "headers");
    if (lua_isnil(L, -1))
        return;
    if (!lua_istable(L, -1))
        luaL_error(L, "route %d: headers must be a list", route);
    int list = lua_gettop(L);
    size_t n = lua_objlen(L, list);
    mp_route_header_def_t *v = lua_newuserdata(L, (n ? n : 1) * sizeof(*v));
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, list, (int)i + 1);
        if (!lua_istable(L, -1))
            luaL_error(L, "route %d: headers[%d] must be a table", route, (int)i + 1);
        int h = lua_gettop(L);
        v[i].name = opt_str(L, h, "name", route);
        v[i].value = opt_str(L, h, "value", route);
        lua_getfield(L, h, "regex");
        v[i].is_regex = lua_toboolean(L, -1);
        lua_pop(L, 2);
    }
    d->headers = v;
    d->nheaders = n;
}

/* Fills d from the route table at t; temporaries stay on the stack. */
static void read_route(lua_State *L, int t, int route, mp_route_def_t *d)
{
    d->name = opt_str(L, t, "name", route);
    d->host = opt_str(L, t, "host", route);
    d->path = opt_str(L, t, "path", route);
    d->prefix = opt_str(L, t, "prefix", route);
    d->regex = opt_str(L, t, "regex", route);
    d->src = opt_str(L, t, "src", route);
    if (!d->src)
        d->src = lua_pushfstring(L, "route %d", route);
    lua_getfield(L, t, "strip_prefix");
    d->strip_prefix = lua_toboolean(L, -1);
    lua_pop(L, 1);
    d->target = route;
    read_methods(L, t, route, d);
    read_headers(L, t, route, d);
}

/* core.router(routes) -> router, or nil, "src: message". */
static int l_router_new(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    l_router_t *u = lua_newuserdata(L, sizeof(*u));
    u->r = NULL;
    luaL_getmetatable(L, ROUTER_MT);
    lua_setmetatable(L, 2);
    if (!(u->r = mp_router_new()))
        return luaL_error(L, "out of memory");
    lua_newtable(L); /* 3: targets */
    int n = (int)lua_objlen(L, 1);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        if (!lua_istable(L, 4))
            return luaL_error(L, "route %d must be a table", i);
        mp_route_def_t d = {0};
        read_route(L, 4, i, &d);
        char err[512];
        if (mp_router_add(u->r, &d, err, sizeof(err)) != 0) {
            lua_pushnil(L);
            lua_pushstring(L, err);
            return 2;
        }
        lua_getfield(L, 4, "target");
        lua_rawseti(L, 3, i);
        lua_settop(L, 3);
    }
    lua_setfenv(L, 2);
    return 1;
}

/* q[k] as a slice borrowed from q, or def when nil. */
static mp_slice query_field(lua_State *L, int q, const char *k, const char *def)
{
    lua_getfield(L, q, k);
    size_t n = 0;
    const char *s = lua_isnil(L, -1) ? def : luaL_checklstring(L, -1, &n);
    if (s == def)
        n = strlen(def);
    lua_pop(L, 1);
    return (mp_slice){s, n};
}

/* headers = { { name, value }, ... } */
static size_t query_headers(lua_State *L, int q, mp_header_t *hs, size_t max)
{
    lua_getfield(L, q, "headers");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    luaL_checktype(L, -1, LUA_TTABLE);
    size_t n = lua_objlen(L, -1);
    if (n > max)
        luaL_error(L, "too many headers");
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        luaL_checktype(L, -1, LUA_TTABLE);
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        hs[i].name.p = luaL_checklstring(L, -2, &hs[i].name.len);
        hs[i].value.p = luaL_checklstring(L, -1, &hs[i].value.len);
        lua_pop(L, 3);
    }
    lua_pop(L, 1);
    return n;
}

/* Pushes { [0] = whole match, group 1, ... }, false for unset groups. */
static void push_captures(lua_State *L, const mp_route_match_t *m, mp_slice path)
{
    lua_createtable(L, m->ncaptures, 1);
    for (int i = 0; i < m->ncaptures; i++) {
        size_t a = m->ovector[2 * i], b = m->ovector[2 * i + 1];
        if (a == (size_t)-1 || b < a)
            lua_pushboolean(L, 0);
        else
            lua_pushlstring(L, path.p + a, b - a);
        lua_rawseti(L, -2, i);
    }
}

/* r:match{ method=, host=, path=, headers= } -> { name, index, target,
 * strip_prefix, prefix, captures } or nil. The path's query is ignored. */
static int l_router_match(lua_State *L)
{
    l_router_t *u = luaL_checkudata(L, 1, ROUTER_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    mp_header_t hs[MP_HTTP_MAX_HEADERS];
    mp_route_query_t q = {.headers = hs};
    q.method = query_field(L, 2, "method", "GET");
    q.host = query_field(L, 2, "host", "");
    q.path = query_field(L, 2, "path", "/");
    const char *qm = memchr(q.path.p, '?', q.path.len);
    if (qm)
        q.path.len = (size_t)(qm - q.path.p);
    q.nheaders = query_headers(L, 2, hs, MP_ARRAY_LEN(hs));
    mp_route_match_t m;
    if (mp_router_match(u->r, &q, &m) != 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 6);
    lua_pushstring(L, m.route->name);
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, m.route->index);
    lua_setfield(L, -2, "index");
    lua_getfenv(L, 1);
    lua_rawgeti(L, -1, m.route->target);
    lua_setfield(L, -3, "target");
    lua_pop(L, 1);
    lua_pushboolean(L, m.route->strip_prefix);
    lua_setfield(L, -2, "strip_prefix");
    lua_pushstring(L, m.route->prefix); /* nil unless a prefix route */
    lua_setfield(L, -2, "prefix");
    push_captures(L, &m, q.path);
    lua_setfield(L, -2, "captures");
    return 1;
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    if (!v)
        return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* r:routes() -> { { name, index, host, path, prefix, regex, src, strip_prefix }, ... } */
static int l_router_routes(lua_State *L)
{
    l_router_t *u = luaL_checkudata(L, 1, ROUTER_MT);
    size_t n = mp_router_count(u->r);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        const mp_route_t *rt = mp_router_get(u->r, i);
        lua_createtable(L, 0, 8);
        set_str(L, "name", rt->name);
        set_str(L, "host", rt->host);
        set_str(L, "path", rt->path);
        set_str(L, "prefix", rt->prefix);
        set_str(L, "regex", rt->regex);
        set_str(L, "src", rt->src);
        lua_pushinteger(L, rt->index);
        lua_setfield(L, -2, "index");
        lua_pushboolean(L, rt->strip_prefix);
        lua_setfield(L, -2, "strip_prefix");
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

static int l_router_gc(lua_State *L)
{
    l_router_t *u = luaL_checkudata(L, 1, ROUTER_MT);
    mp_router_free(u->r);
    u->r = NULL;
    return 0;
}

const luaL_Reg mp_l_router_funcs[] = {
    {"router", l_router_new},
    {NULL, NULL},
};

void mp_l_router_setup(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"match", l_router_match},
        {"routes", l_router_routes},
        {NULL, NULL},
    };
    if (luaL_newmetatable(L, ROUTER_MT)) {
        lua_pushcfunction(L, l_router_gc);
        lua_setfield(L, -2, "__gc");
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushboolean(L, 0); /* getmetatable is false: no __gc a script adds (vm.c guard_finalizers) */
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
}
