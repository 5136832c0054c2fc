/* balancer.c: the bridge between an upstream's policy and its servers'
 * state: which servers are available, the C fast paths, Lua policies (with
 * server objects reading the shared state live), chash keys, and the retry
 * budget. */
#include "balancer.h"

#include "log.h"

#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdlib.h>

#define SERVER_MT "moonproxy.server"
#define MIN_RETRIES 10 /* retries always allowed per window, however few the requests */

enum { P_ROUND_ROBIN, P_WEIGHTED, P_LEAST_CONN, P_P2C, P_CHASH, P_EWMA, P_LUA };

static const char *const policy_names[] = {"round_robin", "weighted", "least_conn", "p2c", "chash", "ewma"};

/* A server as Lua policies see it: a table with the fixed fields (addr,
 * weight, index) and, at key 0, its shared state, which __index reads when
 * a policy asks for a live one. */
static int server_index(lua_State *L)
{
    lua_rawgeti(L, 1, 0);
    mp_peer_t *p = lua_touserdata(L, -1);
    const char *k = lua_tostring(L, 2);
    if (!p || !k)
        lua_pushnil(L);
    else if (strcmp(k, "active") == 0)
        lua_pushinteger(L, p->active);
    else if (strcmp(k, "latency") == 0)
        lua_pushnumber(L, mp_peer_latency(p));
    else if (strcmp(k, "healthy") == 0)
        lua_pushboolean(L, mp_peer_healthy(p, mp_health_now()));
    else if (strcmp(k, "failures") == 0)
        lua_pushinteger(L, p->fails);
    else
        lua_pushnil(L);
    return 1;
}

static int lua_objects(lua_State *L, mp_balancer_t *b)
{
    const mp_upstream_def_t *d = b->def;
    if (luaL_newmetatable(L, SERVER_MT)) {
        lua_pushcfunction(L, server_index);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_createtable(L, (int)d->nservers, 0);
    for (size_t i = 0; i < d->nservers; i++) {
        lua_createtable(L, 1, 3);
        lua_pushlightuserdata(L, b->peers[i]);
        lua_rawseti(L, -2, 0);
        lua_pushstring(L, d->servers[i].addr.text);
        lua_setfield(L, -2, "addr");
        lua_pushinteger(L, d->servers[i].weight);
        lua_setfield(L, -2, "weight");
        lua_pushinteger(L, (lua_Integer)i + 1);
        lua_setfield(L, -2, "index");
        luaL_getmetatable(L, SERVER_MT);
        lua_setmetatable(L, -2);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_pushvalue(L, -1);
    b->servers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_createtable(L, 0, 3);
    lua_insert(L, -2);
    lua_setfield(L, -2, "servers"); /* all of them, available or not */
    lua_pushstring(L, d->name);
    lua_setfield(L, -2, "name");
    if (d->hash_key_ref != LUA_NOREF)
        lua_rawgeti(L, LUA_REGISTRYINDEX, d->hash_key_ref);
    else
        lua_pushstring(L, d->hash_key ? d->hash_key : "");
    lua_setfield(L, -2, "hash_key");
    b->upstream_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static int init_one(lua_State *L, mp_balancer_t *b, const mp_upstream_def_t *d, uint64_t seed)
{
    b->def = d;
    b->L = L;
    b->passive = (mp_passive_t){d->passive_failures, d->passive_cooldown};
    b->rng = seed | 1;
    b->servers_ref = b->upstream_ref = LUA_NOREF;
    b->peers = calloc(d->nservers, sizeof(*b->peers));
    b->current = calloc(d->nservers, sizeof(*b->current));
    if (!b->peers || !b->current)
        return MP_ENOMEM;
    for (size_t i = 0; i < d->nservers; i++)
        if (!(b->peers[i] = mp_peer_get(d->name, d->servers[i].addr.text)))
            return MP_ENOMEM;
    b->policy = P_LUA;
    for (int p = 0; p < (int)MP_ARRAY_LEN(policy_names); p++)
        if (strcmp(d->balancer, policy_names[p]) == 0)
            b->policy = p;
    if (d->balancer_ref != LUA_NOREF)
        b->policy = P_LUA;
    if (b->policy == P_LUA)
        return lua_objects(L, b);
    if (b->policy == P_CHASH) {
        const char *addrs[d->nservers];
        int weights[d->nservers];
        for (size_t i = 0; i < d->nservers; i++) {
            addrs[i] = d->servers[i].addr.text;
            weights[i] = d->servers[i].weight;
        }
        if (!(b->ring = mp_chash_new(addrs, weights, (int)d->nservers)))
            return MP_ENOMEM;
    }
    return 0;
}

mp_balancer_t *mp_balancers_new(lua_State *L, const mp_config_t *cfg, uint64_t seed)
{
    size_t n = cfg->nupstreams;
    mp_balancer_t *b = calloc(n ? n : 1, sizeof(*b));
    for (size_t i = 0; b && i < n; i++)
        if (init_one(L, &b[i], &cfg->upstreams[i], seed + i * 0x9e3779b97f4a7c15ull) != 0) {
            mp_balancers_free(b, i + 1);
            return NULL;
        }
    return b;
}

void mp_balancers_free(mp_balancer_t *b, size_t n)
{
    for (size_t i = 0; b && i < n; i++) {
        free(b[i].peers);
        free(b[i].current);
        mp_chash_free(b[i].ring);
    }
    free(b); /* Lua references die with the generation's VM */
}

/* Calls the Lua policy with the available servers (the context builds
 * their list inside its protected call). */
static int pick_lua(mp_balancer_t *b, const mp_pick_ctx_t *ctx, void *arg, const mp_pick_server_t *s, int n,
                    int navailable)
{
    lua_State *L = b->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->servers_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, b->upstream_ref);
    if (ctx->lua_pick(L, arg, b->def->balancer_ref, s, n, navailable) != 0)
        return MP_PICK_ERROR;
    int index = MP_PICK_NONE;
    if (lua_istable(L, -1)) {
        lua_rawgeti(L, -1, 0);
        mp_peer_t *peer = lua_touserdata(L, -1);
        lua_getfield(L, -2, "index");
        int i = (int)lua_tointeger(L, -1) - 1;
        lua_pop(L, 2);
        if (peer && i >= 0 && i < n && b->peers[i] == peer && s[i].available)
            index = i;
    }
    if (index < 0 && !lua_isnil(L, -1)) {
        mp_log_error("upstream %s: the balancer returned a %s that is not one of the servers it was given",
                     b->def->name, luaL_typename(L, -1));
        index = MP_PICK_ERROR;
    }
    lua_pop(L, 1);
    return index;
}

static int pick_once(mp_balancer_t *b, const mp_pick_ctx_t *ctx, void *arg, const mp_pick_server_t *s, int n,
                     int navailable)
{
    switch (b->policy) {
    case P_ROUND_ROBIN: return mp_pick_round_robin(&b->cursor, s, n);
    case P_WEIGHTED: return mp_pick_weighted(b->current, s, n);
    case P_LEAST_CONN: return mp_pick_least_conn(&b->cursor, s, n);
    case P_P2C: return mp_pick_p2c(&b->rng, s, n);
    case P_EWMA: return mp_pick_ewma(&b->rng, s, n);
    case P_CHASH: {
        uint64_t hash;
        int rc = ctx->hash(arg, b->def, &hash);
        if (rc < 0)
            return rc;
        return mp_chash_pick(b->ring, hash, s, n);
    }
    default: return pick_lua(b, ctx, arg, s, n, navailable);
    }
}

int mp_balancer_pick(mp_balancer_t *b, const mp_pick_ctx_t *ctx, void *arg, int avoid, int *trial)
{
    int n = (int)b->def->nservers;
    mp_pick_server_t s[n];
    double now = mp_health_now();
    int navailable = 0;
    for (int i = 0; i < n; i++) {
        mp_peer_t *p = b->peers[i];
        s[i] = (mp_pick_server_t){mp_peer_weight(p, b->def->servers[i].weight), p->active, mp_peer_latency(p), 0};
        s[i].available = (uint8_t)(mp_peer_healthy(p, now) && !p->ctl_drain);
        navailable += s[i].available;
    }
    if (navailable == 0 && b->def->fail_open) /* a drained server stays out, even then */
        for (int i = 0; i < n; i++)
            if (!b->peers[i]->ctl_drain)
                s[i].available = 1, navailable++;
    if (avoid >= 0 && s[avoid].available) /* a retry goes to another server, or nowhere */
        s[avoid].available = 0, navailable--;
    *trial = 0;
    /* A server whose circuit's cooldown ended is available to one trial:
     * lose the race for it and the pick is made again without it. */
    for (int attempt = 0; navailable > 0 && attempt < n; attempt++) {
        int i = pick_once(b, ctx, arg, s, n, navailable);
        if (i < 0)
            return i;
        if (b->peers[i]->open_until <= 0 || mp_peer_available(b->peers[i], now, trial))
            return i;
        if (b->def->fail_open && !mp_peer_healthy(b->peers[i], now))
            return i; /* every server is down and the operator asked to try anyway */
        s[i].available = 0;
        navailable--;
    }
    return MP_PICK_NONE;
}

static int slot(mp_balancer_t *b, double now)
{
    int64_t second = (int64_t)now;
    int i = (int)(second % MP_RETRY_WINDOW);
    if (b->window_second[i] != second) {
        b->window_second[i] = second;
        b->requests[i] = b->retries[i] = 0;
    }
    return i;
}

void mp_balancer_count(mp_balancer_t *b, int retry, double now)
{
    int i = slot(b, now);
    if (retry)
        b->retries[i]++;
    else
        b->requests[i]++;
}

int mp_balancer_retry_allowed(mp_balancer_t *b, double now)
{
    slot(b, now);
    int64_t oldest = (int64_t)now - MP_RETRY_WINDOW;
    uint64_t req = 0, ret = 0;
    for (int i = 0; i < MP_RETRY_WINDOW; i++)
        if (b->window_second[i] > oldest) {
            req += b->requests[i];
            ret += b->retries[i];
        }
    return ret < MIN_RETRIES || (double)(ret + 1) <= b->def->retry_budget * (double)req;
}

int mp_balancer_retry_after(const mp_balancer_t *b, double now)
{
    double soonest = 0;
    for (size_t i = 0; i < b->def->nservers; i++) {
        double until = b->peers[i]->open_until;
        if (until > now && (soonest == 0 || until - now < soonest))
            soonest = until - now;
    }
    if (soonest == 0 && b->def->health)
        soonest = b->def->health->interval * b->def->health->rise;
    return soonest < 1 ? 1 : (int)ceil(soonest);
}

int mp_balancer_failure_status(const mp_balancer_t *b, int status)
{
    const mp_statuses_t *st = &b->def->passive_statuses;
    if (st->n == 0)
        return status == 502 || status == 503 || status == 504;
    for (int i = 0; i < st->n; i++)
        if (st->codes[i] == status)
            return 1;
    return 0;
}
