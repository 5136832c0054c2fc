/* l_balance.c: the C policies of balance.c for the specs and benchmarks:
 *
 *   local st = core.pick_state(policy, addrs, weights, seed)
 *   local i = core.pick(st, servers, key)   -- 1-based index, or nil
 *   core.hash64(s)                          -- mp_hash64 as 16 hex digits
 *
 * policy is a built-in name; addrs the upstream's server addresses (their
 * count is the state's, and chash builds its ring from them); weights an
 * optional list (default 1 each, for the ring only); seed an optional
 * integer for the random policies. servers is a list of exactly #addrs
 * { weight = 1, active = 0, latency = 0, available = true } (defaults
 * shown); key a string, required by chash only. */
#include "balance.h"
#include "l_core.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>

#define PICK_STATE_MT "moonproxy.pick_state"

enum { P_ROUND_ROBIN, P_WEIGHTED, P_LEAST_CONN, P_P2C, P_EWMA, P_CHASH };

static const char *const policies[] = {"round_robin", "weighted", "least_conn", "p2c", "ewma", "chash", NULL};

typedef struct {
    int policy;
    int n;
    unsigned cursor;
    uint64_t rng;
    mp_chash_t *ring;          /* owned; chash only */
    mp_pick_server_t *servers; /* n, scratch filled by each pick; in this block */
    int *current;              /* n, for weighted; in this block */
} pick_state_t;

/* An integer field of table t, def when nil, raising outside [lo, hi]. */
static int int_field(lua_State *L, int t, int i, const char *k, int def, int lo, int hi)
{
    lua_getfield(L, t, k);
    int v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER)
            luaL_error(L, "servers[%d].%s must be a number", i, k);
        lua_Number x = lua_tonumber(L, -1);
        if (!(x >= lo && x <= hi))
            luaL_error(L, "servers[%d].%s must be in %d..%d", i, k, lo, hi);
        v = (int)x;
    }
    lua_pop(L, 1);
    return v;
}

static int l_pick_state(lua_State *L)
{
    int policy = luaL_checkoption(L, 1, NULL, policies);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)lua_objlen(L, 2);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    uint64_t seed = (uint64_t)luaL_optinteger(L, 4, 0);
    if (n > MP_CHASH_MAX_SERVERS || (policy == P_CHASH && n < 1))
        return luaL_error(L, "addrs: 1..%d servers", MP_CHASH_MAX_SERVERS);
    size_t size = sizeof(pick_state_t) + (size_t)n * (sizeof(mp_pick_server_t) + sizeof(int));
    pick_state_t *st = lua_newuserdata(L, size);
    memset(st, 0, size);
    st->policy = policy;
    st->n = n;
    st->rng = seed;
    st->servers = (mp_pick_server_t *)(st + 1);
    st->current = (int *)(st->servers + n);
    luaL_getmetatable(L, PICK_STATE_MT);
    lua_setmetatable(L, -2);
    if (policy != P_CHASH)
        return 1;
    const char **addrs = lua_newuserdata(L, sizeof(*addrs) * (size_t)n);
    int *weights = lua_newuserdata(L, sizeof(*weights) * (size_t)n);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 2, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "addrs[%d] must be a string", i + 1);
        addrs[i] = lua_tostring(L, -1);
        lua_pop(L, 1); /* still referenced by the table at 2 */
        weights[i] = 1;
        if (lua_istable(L, 3)) {
            lua_rawgeti(L, 3, i + 1);
            lua_Number w = lua_isnil(L, -1) ? 1 : lua_tonumber(L, -1);
            if (!(w >= 1 && w <= 1000))
                return luaL_error(L, "weights[%d] must be in 1..1000", i + 1);
            weights[i] = (int)w;
            lua_pop(L, 1);
        }
    }
    st->ring = mp_chash_new(addrs, weights, n);
    if (!st->ring)
        return luaL_error(L, "out of memory");
    lua_pop(L, 2);
    return 1;
}

static int l_pick(lua_State *L)
{
    pick_state_t *st = luaL_checkudata(L, 1, PICK_STATE_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)lua_objlen(L, 2);
    if (n != st->n)
        return luaL_error(L, "servers: expected %d, got %d", st->n, n);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 2, i + 1);
        if (!lua_istable(L, -1))
            return luaL_error(L, "servers[%d] must be a table", i + 1);
        int t = lua_gettop(L);
        mp_pick_server_t *s = &st->servers[i];
        s->weight = int_field(L, t, i + 1, "weight", 1, 1, 1000);
        s->active = int_field(L, t, i + 1, "active", 0, 0, 1 << 30);
        lua_getfield(L, t, "latency");
        s->latency = lua_tonumber(L, -1);
        lua_getfield(L, t, "available");
        s->available = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_pop(L, 3);
    }
    int i = -1;
    switch (st->policy) {
    case P_ROUND_ROBIN: i = mp_pick_round_robin(&st->cursor, st->servers, n); break;
    case P_WEIGHTED: i = mp_pick_weighted(st->current, st->servers, n); break;
    case P_LEAST_CONN: i = mp_pick_least_conn(&st->cursor, st->servers, n); break;
    case P_P2C: i = mp_pick_p2c(&st->rng, st->servers, n); break;
    case P_EWMA: i = mp_pick_ewma(&st->rng, st->servers, n); break;
    case P_CHASH: {
        size_t len;
        const char *key = luaL_checklstring(L, 3, &len);
        i = mp_chash_pick(st->ring, mp_hash64(key, len), st->servers, n);
        break;
    }
    }
    if (i < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, i + 1);
    return 1;
}

static int l_pick_state_gc(lua_State *L)
{
    pick_state_t *st = luaL_checkudata(L, 1, PICK_STATE_MT);
    mp_chash_free(st->ring);
    st->ring = NULL;
    return 0;
}

static int l_hash64(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char hex[17];
    snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)mp_hash64(s, len));
    lua_pushstring(L, hex);
    return 1;
}

const luaL_Reg mp_l_balance_funcs[] = {
    {"pick_state", l_pick_state},
    {"pick", l_pick},
    {"hash64", l_hash64},
    {NULL, NULL},
};

void mp_l_balance_setup(lua_State *L)
{
    if (luaL_newmetatable(L, PICK_STATE_MT)) {
        lua_pushcfunction(L, l_pick_state_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushboolean(L, 0); /* getmetatable is false: no __gc a script adds (vm.c guard_finalizers) */
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
}
