/* l_shared.c: proxy.shared(name, size), a shared dict (shdict.c) as a Lua
 * object, and core.now(). A thin binding: the locks live in shdict.c and no
 * Lua API runs while a dict is locked (a Lua error would longjmp past the
 * unlock). Every method takes an optional trailing `now` (monotonic seconds)
 * so that specs can pin time. */
#include "l_core.h"
#include "shdict.h"

#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdlib.h>

#define SHDICT_MT "moonproxy.shdict"
#define SCRATCH_MT "moonproxy.shdict.scratch"

/* Where get copies strings before they become Lua strings: one per
 * lua_State (so per worker thread), an upvalue of every method. */
typedef struct {
    char *p; /* owned, malloc'd */
    size_t cap;
} scratch_t;

static mp_shdict_t *check_dict(lua_State *L)
{
    return *(mp_shdict_t **)luaL_checkudata(L, 1, SHDICT_MT);
}

/* The key at idx, or 0 after pushing nil and the reason it cannot be one. */
static int check_key(lua_State *L, int idx, mp_slice *key)
{
    key->p = luaL_checklstring(L, idx, &key->len);
    if (key->len > 0 && key->len <= MP_SHDICT_KEY_MAX)
        return 1;
    lua_pushnil(L);
    lua_pushstring(L, key->len ? "key too long" : "empty key");
    return 0;
}

/* Optional number >= 0 at idx (nil: def); NaN is refused too. */
static double opt_nonneg(lua_State *L, int idx, double def, const char *what)
{
    double x = luaL_optnumber(L, idx, def);
    if (!(x >= 0))
        luaL_error(L, "%s must be a number >= 0", what);
    return x;
}

static double opt_now(lua_State *L, int idx)
{
    return lua_isnoneornil(L, idx) ? mp_shdict_now() : luaL_checknumber(L, idx);
}

/* The value at idx; strings stay borrowed from the stack. */
static void check_value(lua_State *L, int idx, mp_shdict_value_t *v)
{
    memset(v, 0, sizeof(*v));
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        v->type = MP_SHDICT_STRING;
        v->str = lua_tolstring(L, idx, &v->len);
        break;
    case LUA_TNUMBER:
        v->type = MP_SHDICT_NUMBER;
        v->num = lua_tonumber(L, idx);
        break;
    case LUA_TBOOLEAN:
        v->type = MP_SHDICT_BOOLEAN;
        v->num = lua_toboolean(L, idx);
        break;
    default: luaL_error(L, "value must be a string, number or boolean, got %s", luaL_typename(L, idx));
    }
}

/* true, or nil and the reason for rc. */
static int push_result(lua_State *L, int rc)
{
    if (rc == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, rc == MP_SHDICT_EXISTS ? "exists"
                      : rc == MP_ENOMEM      ? "too large"
                      : rc == MP_ENOENT      ? "not found"
                                             : "not a number");
    return 2;
}

/* Grows the scratch buffer to at least n bytes. */
static void scratch_grow(lua_State *L, scratch_t *s, size_t n)
{
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < n)
        cap *= 2;
    char *p = realloc(s->p, cap);
    if (!p)
        luaL_error(L, "out of memory");
    s->p = p;
    s->cap = cap;
}

/* d:get(key [, now]) -> value, or nil when absent or expired. */
static int l_get(lua_State *L)
{
    mp_shdict_t *d = check_dict(L);
    mp_slice key;
    if (!check_key(L, 2, &key))
        return 2;
    double now = opt_now(L, 3);
    scratch_t *s = lua_touserdata(L, lua_upvalueindex(1));
    mp_shdict_value_t v;
    int rc;
    /* the string is copied out under the lock, turned into a Lua string after */
    while ((rc = mp_shdict_get(d, key, now, &v, s->p, s->cap)) == MP_EAGAIN)
        scratch_grow(L, s, v.len);
    if (rc != 0)
        lua_pushnil(L);
    else if (v.type == MP_SHDICT_STRING)
        lua_pushlstring(L, v.len ? v.str : "", v.len);
    else if (v.type == MP_SHDICT_BOOLEAN)
        lua_pushboolean(L, v.num != 0);
    else
        lua_pushnumber(L, v.num);
    return 1;
}

/* d:set(key, value [, ttl [, now]]) and d:add(...) -> true, or nil, err. */
static int store(lua_State *L, int add)
{
    mp_shdict_t *d = check_dict(L);
    mp_slice key;
    mp_shdict_value_t v;
    if (!check_key(L, 2, &key))
        return 2;
    check_value(L, 3, &v);
    double ttl = opt_nonneg(L, 4, 0, "ttl");
    double now = opt_now(L, 5);
    int rc = add ? mp_shdict_add(d, key, &v, ttl, now) : mp_shdict_set(d, key, &v, ttl, now);
    return push_result(L, rc);
}

static int l_set(lua_State *L)
{
    return store(L, 0);
}

static int l_add(lua_State *L)
{
    return store(L, 1);
}

/* d:incr(key [, by [, init [, ttl [, now]]]]) -> new value, or nil, err. */
static int l_incr(lua_State *L)
{
    mp_shdict_t *d = check_dict(L);
    mp_slice key;
    if (!check_key(L, 2, &key))
        return 2;
    double by = luaL_optnumber(L, 3, 1);
    double init = 0;
    int has_init = !lua_isnoneornil(L, 4);
    if (has_init)
        init = luaL_checknumber(L, 4);
    double ttl = opt_nonneg(L, 5, 0, "ttl");
    double now = opt_now(L, 6);
    double out;
    int rc = mp_shdict_incr(d, key, by, has_init ? &init : NULL, ttl, now, &out);
    if (rc != 0)
        return push_result(L, rc);
    lua_pushnumber(L, out);
    return 1;
}

/* d:delete(key) -> true, whether or not the key was there. */
static int l_delete(lua_State *L)
{
    mp_shdict_t *d = check_dict(L);
    mp_slice key;
    if (!check_key(L, 2, &key))
        return 2;
    mp_shdict_delete(d, key);
    lua_pushboolean(L, 1);
    return 1;
}

/* d:take(key, rate, burst [, cost [, now]]) -> allowed, remaining,
 * retry_after; or nil, err when key holds another value or cannot fit. */
static int l_take(lua_State *L)
{
    mp_shdict_t *d = check_dict(L);
    mp_slice key;
    if (!check_key(L, 2, &key))
        return 2;
    double rate = luaL_checknumber(L, 3), burst = luaL_checknumber(L, 4);
    double cost = luaL_optnumber(L, 5, 1);
    double now = opt_now(L, 6);
    luaL_argcheck(L, rate > 0 && rate < INFINITY, 3, "rate must be a number > 0");
    luaL_argcheck(L, burst > 0 && burst < INFINITY, 4, "burst must be a number > 0");
    luaL_argcheck(L, cost >= 0 && cost <= burst, 5, "cost must be between 0 and burst");
    mp_shdict_take_t t;
    int rc = mp_shdict_take(d, key, rate, burst, cost, now, &t);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, rc == MP_ENOMEM ? "too large" : "not a bucket");
        return 2;
    }
    lua_pushboolean(L, t.allowed);
    lua_pushnumber(L, t.remaining);
    lua_pushnumber(L, t.retry_after_s);
    return 3;
}

/* d:stats() -> { capacity, used, index_bytes, entries, evictions }. */
static int l_stats(lua_State *L)
{
    mp_shdict_stats_t st;
    mp_shdict_stats(check_dict(L), &st);
    lua_createtable(L, 0, 5);
    lua_pushnumber(L, (lua_Number)st.capacity);
    lua_setfield(L, -2, "capacity");
    lua_pushnumber(L, (lua_Number)st.used);
    lua_setfield(L, -2, "used");
    lua_pushnumber(L, (lua_Number)st.index_bytes);
    lua_setfield(L, -2, "index_bytes");
    lua_pushnumber(L, (lua_Number)st.entries);
    lua_setfield(L, -2, "entries");
    lua_pushnumber(L, (lua_Number)st.evictions);
    lua_setfield(L, -2, "evictions");
    return 1;
}

static int l_tostring(lua_State *L)
{
    lua_pushfstring(L, "shared dict '%s'", mp_shdict_name(check_dict(L)));
    return 1;
}

/* A size: bytes as a number, or a string "<digits>[k|m|g]" (powers of
 * 1024, any case). 0 when it is neither. */
static size_t parse_size(lua_State *L, int idx)
{
    if (lua_type(L, idx) == LUA_TNUMBER) {
        double x = lua_tonumber(L, idx);
        return x >= 1 && x < 1e18 && x == floor(x) ? (size_t)x : 0;
    }
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (!s)
        return 0;
    size_t n = 0, i = 0;
    for (; i < len && s[i] >= '0' && s[i] <= '9' && n < (SIZE_MAX >> 31); i++)
        n = n * 10 + (size_t)(s[i] - '0');
    if (i == 0 || len - i > 1)
        return 0;
    int unit = i < len ? (s[i] | 0x20) : 0;
    int shift = unit == 'k' ? 10 : unit == 'm' ? 20 : unit == 'g' ? 30 : unit == 0 ? 0 : -1;
    return shift < 0 ? 0 : n << shift;
}

/* core.shared(name, size) -> the dict called name, created on first use. */
static int l_shared(lua_State *L)
{
    size_t nlen;
    const char *name = luaL_checklstring(L, 1, &nlen);
    luaL_argcheck(L, nlen > 0 && strlen(name) == nlen, 1, "name must be a non-empty string without NUL");
    size_t size = parse_size(L, 2);
    luaL_argcheck(L, size > 0, 2, "size must be a number of bytes or a string like \"64k\", \"10m\", \"1g\"");
    char err[256];
    mp_shdict_t *d = mp_shdict_open(name, size, err, sizeof(err));
    if (!d)
        return luaL_error(L, "%s", err);
    *(mp_shdict_t **)lua_newuserdata(L, sizeof(d)) = d;
    luaL_getmetatable(L, SHDICT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* core.now() -> monotonic seconds, the clock the dicts use. */
static int l_now(lua_State *L)
{
    lua_pushnumber(L, mp_shdict_now());
    return 1;
}

static int scratch_gc(lua_State *L)
{
    scratch_t *s = luaL_checkudata(L, 1, SCRATCH_MT);
    free(s->p);
    s->p = NULL;
    s->cap = 0;
    return 0;
}

static const luaL_Reg methods[] = {
    {"get", l_get},       {"set", l_set},   {"add", l_add},     {"incr", l_incr},
    {"delete", l_delete}, {"take", l_take}, {"stats", l_stats}, {NULL, NULL},
};

const luaL_Reg mp_l_shared_funcs[] = {
    {"shared", l_shared},
    {"now", l_now},
    {NULL, NULL},
};

void mp_l_shared_setup(lua_State *L)
{
    luaL_newmetatable(L, SHDICT_MT);
    lua_newtable(L);
    scratch_t *s = lua_newuserdata(L, sizeof(*s));
    s->p = NULL;
    s->cap = 0;
    luaL_newmetatable(L, SCRATCH_MT);
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    luaL_setfuncs(L, methods, 1); /* the scratch is every method's upvalue */
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushboolean(L, 0); /* getmetatable is false: no __gc a script adds (vm.c guard_finalizers) */
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
}
