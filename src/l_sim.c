/* l_sim.c: moonproxy.core.simulator, the simulator (sim.h) as a Lua object
 * for moonproxy.testing. Results come back as plain tables: the simulator's
 * VM is its own, the caller's only sees copies. */
#include "l_core.h"
#include "resolve.h"
#include "sim.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>

#define SIM_MT "moonproxy.simulator"
#define MAX_FIELDS 100

static mp_sim_t **check_box(lua_State *L)
{
    return luaL_checkudata(L, 1, SIM_MT);
}

static mp_sim_t *check_sim(lua_State *L)
{
    mp_sim_t **box = check_box(L);
    if (!*box)
        luaL_error(L, "this configuration was closed");
    return *box;
}

/* core.simulator(path, text|nil, seed) -> simulator, or nil, "file:line: message" */
static int l_simulator(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    size_t len = 0;
    const char *text = luaL_optlstring(L, 2, NULL, &len);
    uint64_t seed = (uint64_t)luaL_optnumber(L, 3, 1);
    mp_sim_t **box = lua_newuserdata(L, sizeof(*box));
    *box = NULL;
    luaL_getmetatable(L, SIM_MT);
    lua_setmetatable(L, -2);
    char err[2048];
    if (!(*box = mp_sim_new(path, text, len, seed, err, sizeof(err)))) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int l_close(lua_State *L)
{
    mp_sim_t **box = check_box(L);
    mp_sim_free(*box);
    *box = NULL;
    return 0;
}

/* Headers at index t (sim.h's mp_sim_lua_headers), raising for bad ones.
 * Leaves the table anchoring numbers' texts on the stack. */
static size_t read_fields(lua_State *L, int t, mp_sim_header_t *h, size_t max)
{
    int bad;
    lua_newtable(L);
    size_t n = mp_sim_lua_headers(L, t, lua_gettop(L), h, max, &bad);
    if (bad)
        luaL_error(L,
                   "headers: { name = \"value\" | { values } | false } or { { \"name\", \"value\" }, ... }, "
                   "at most %d fields",
                   (int)max);
    return n;
}

/* A string field (or nil; false for host); the argument table keeps it. */
static const char *field_string(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    int type = lua_type(L, -1);
    if (type != LUA_TSTRING && type != LUA_TNIL && !(type == LUA_TBOOLEAN && !lua_toboolean(L, -1)))
        luaL_error(L, "request: %s must be a string, got %s", k, lua_typename(L, type));
    const char *v = type == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1);
    return v;
}

/* { name = value | { values } } from a head's fields (names lowercased). */
static void push_head(lua_State *L, const char *head, size_t len)
{
    const char *end = head + len;
    const char *eol = memchr(head, '\r', len);
    lua_pushlstring(L, head, eol ? (size_t)(eol - head) : len);
    lua_setfield(L, -2, "line");
    lua_newtable(L);
    const char *p = eol ? memchr(eol, '\n', (size_t)(end - eol)) : NULL;
    while (p && ++p < end) {
        const char *e = memchr(p, '\r', (size_t)(end - p));
        const char *colon = e ? memchr(p, ':', (size_t)(e - p)) : NULL;
        if (!colon)
            break;
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (const char *c = p; c < colon; c++)
            luaL_addchar(&b, (*c >= 'A' && *c <= 'Z') ? (char)(*c + 32) : *c);
        luaL_pushresult(&b);
        const char *v = colon + 1;
        while (v < e && *v == ' ')
            v++;
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, v, (size_t)(e - v));
        } else if (lua_istable(L, -1)) {
            lua_pushlstring(L, v, (size_t)(e - v));
            lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
        } else {
            lua_createtable(L, 2, 0);
            lua_insert(L, -2);
            lua_rawseti(L, -2, 1);
            lua_pushlstring(L, v, (size_t)(e - v));
            lua_rawseti(L, -2, 2);
        }
        lua_rawset(L, -3);
        p = memchr(e, '\n', (size_t)(end - e));
    }
    lua_setfield(L, -2, "headers");
}

static void set_string(lua_State *L, const char *k, const char *v)
{
    if (v) {
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
}

static void push_result(lua_State *L, const mp_sim_result_t *r)
{
    lua_createtable(L, 0, 12);
    set_string(L, "route", r->route);
    if (r->route_index) {
        lua_pushinteger(L, r->route_index);
        lua_setfield(L, -2, "route_index");
    }
    set_string(L, "upstream", r->upstream);
    set_string(L, "server", r->server);
    set_string(L, "error", r->error);
    if (r->has_upgrade) { /* upgrade = "websocket", or false and why */
        r->upgrade ? lua_pushliteral(L, "websocket") : lua_pushboolean(L, 0);
        lua_setfield(L, -2, "upgrade");
        set_string(L, "upgrade_refused", r->upgrade_refused);
    }
    if (r->tunnel) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "tunnel");
    }
    if (r->compress || r->compress_why) { /* compress = "gzip", or false and why */
        r->compress ? lua_pushstring(L, r->compress) : lua_pushboolean(L, 0);
        lua_setfield(L, -2, "compress");
        set_string(L, "compress_why", r->compress_why);
    }
    lua_pushlstring(L, r->head, r->head_len);
    lua_setfield(L, -2, "head");
    if (r->head_len)
        push_head(L, r->head, r->head_len);
    if (r->forwarded) {
        /* "GET /users?x=1 HTTP/1.1": the method and the target */
        const char *sp = memchr(r->head, ' ', r->head_len);
        const char *sp2 = sp ? memchr(sp + 1, ' ', r->head_len - (size_t)(sp + 1 - r->head)) : NULL;
        if (sp && sp2) {
            lua_pushlstring(L, r->head, (size_t)(sp - r->head));
            lua_setfield(L, -2, "method");
            lua_pushlstring(L, sp + 1, (size_t)(sp2 - sp - 1));
            lua_setfield(L, -2, "target");
        }
    } else {
        lua_pushinteger(L, r->status);
        lua_setfield(L, -2, "status");
        if (r->body) {
            lua_pushlstring(L, r->body, r->body_len);
            lua_setfield(L, -2, "body");
        }
    }
    lua_createtable(L, (int)r->ntrace, 0);
    for (size_t i = 0; i < r->ntrace; i++) {
        lua_createtable(L, 0, 2);
        set_string(L, "step", r->trace[i].kind);
        set_string(L, "text", r->trace[i].text);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "trace");
}

/* The request's tls field into rq: true (the defaults, sim.h), or
 * { version, cipher, sni, client_subject } (strings kept by the table). */
static void read_tls(lua_State *L, mp_sim_request_t *rq, mp_tls_info_t *info)
{
    lua_getfield(L, 2, "tls");
    int t = lua_gettop(L);
    if (lua_istable(L, t)) {
        *info = (mp_tls_info_t){field_string(L, t, "version"), field_string(L, t, "cipher"), field_string(L, t, "sni"),
                                field_string(L, t, "client_subject"), 0};
        rq->tls = info;
    } else if (lua_isboolean(L, t)) {
        rq->https = lua_toboolean(L, t);
    } else if (!lua_isnil(L, t)) {
        luaL_error(L, "request: tls must be true or { version =, cipher =, sni =, client_subject = }, got %s",
                   luaL_typename(L, t));
    }
}

/* sim:request{ method, host, path, headers, body, remote_addr, tls } -> result */
static int l_request(lua_State *L)
{
    mp_sim_t *s = check_sim(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int stubs = lua_istable(L, 3); /* who answers call-outs, before anything is pushed */
    mp_sim_header_t h[MAX_FIELDS];
    lua_getfield(L, 2, "headers");
    size_t nh = read_fields(L, lua_gettop(L), h, MAX_FIELDS);
    size_t blen = 0;
    lua_getfield(L, 2, "body");
    const char *body = lua_tolstring(L, -1, &blen);
    lua_getfield(L, 2, "host");
    int no_host = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
    mp_sim_request_t rq = {.method = field_string(L, 2, "method"),
                           .host = field_string(L, 2, "host"),
                           .no_host = no_host,
                           .target = field_string(L, 2, "path"),
                           .headers = h,
                           .nheaders = nh,
                           .body = body,
                           .body_len = blen,
                           .remote_addr = field_string(L, 2, "remote_addr")};
    mp_tls_info_t tls;
    read_tls(L, &rq, &tls);
    mp_sim_result_t res;
    mp_sim_answer_calls(s, L, stubs ? 3 : 0);
    int rc = mp_sim_request(s, &rq, &res);
    mp_sim_answer_calls(s, NULL, 0);
    if (rc == MP_EINVAL)
        return luaL_error(L, "request: remote_addr '%s' is not an IP address", rq.remote_addr);
    if (rc != 0)
        return luaL_error(L, "request: out of memory");
    push_result(L, &res);
    return 1;
}

/* sim:response{ status, headers, body } -> result (for the last request) */
static int l_response(lua_State *L)
{
    mp_sim_t *s = check_sim(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int stubs = lua_istable(L, 3);
    mp_sim_header_t h[MAX_FIELDS];
    lua_getfield(L, 2, "headers");
    size_t nh = read_fields(L, lua_gettop(L), h, MAX_FIELDS);
    lua_getfield(L, 2, "status");
    int status = lua_isnil(L, -1) ? 200 : (int)luaL_checkinteger(L, -1);
    if (status < 100 || status > 999)
        return luaL_error(L, "response: status %d is not an HTTP status", status);
    size_t blen = 0;
    lua_getfield(L, 2, "body");
    lua_tolstring(L, -1, &blen);
    mp_sim_response_t rs = {status, h, nh, blen};
    mp_sim_result_t res;
    mp_sim_answer_calls(s, L, stubs ? 3 : 0);
    int rc = mp_sim_response(s, &rs, &res);
    mp_sim_answer_calls(s, NULL, 0);
    if (rc == MP_EINVAL)
        return luaL_error(L, "response: the last request was not forwarded upstream");
    if (rc != 0)
        return luaL_error(L, "response: out of memory");
    push_result(L, &res);
    if (!lua_isnil(L, -2)) { /* the body passes through unchanged */
        lua_pushvalue(L, -2);
        lua_setfield(L, -2, "body");
    }
    return 1;
}

/* sim:set_server(upstream, addr, { down, open, active, failures, latency }) */
static int l_set_server(lua_State *L)
{
    mp_sim_t *s = check_sim(L);
    const char *up = luaL_checkstring(L, 2), *addr = luaL_checkstring(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    mp_sim_state_t st = {0};
    lua_getfield(L, 4, "down");
    st.down = lua_toboolean(L, -1);
    lua_getfield(L, 4, "open");
    st.open = lua_toboolean(L, -1);
    lua_getfield(L, 4, "active");
    st.active = (int)luaL_optinteger(L, -1, 0);
    lua_getfield(L, 4, "failures");
    st.failures = (int)luaL_optinteger(L, -1, 0);
    lua_getfield(L, 4, "latency");
    st.latency = luaL_optnumber(L, -1, 0);
    lua_getfield(L, 4, "drain");
    st.drain = lua_toboolean(L, -1);
    lua_getfield(L, 4, "weight");
    st.weight = (int)luaL_optinteger(L, -1, 0);
    if (st.weight < 0 || st.weight > MP_CTL_WEIGHT_MAX)
        return luaL_error(L, "servers: weight must be 1..%d", MP_CTL_WEIGHT_MAX);
    if (mp_sim_set_server(s, up, addr, &st) != 0)
        return luaL_error(L, "servers: upstream '%s' has no server %s", up, addr);
    return 0;
}

/* A boolean field of the control table at index t: -1 when absent. */
static int ctl_bool(lua_State *L, int t, const char *name)
{
    lua_getfield(L, t, name);
    int v = lua_isnil(L, -1) ? -1 : lua_toboolean(L, -1);
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
        luaL_error(L, "server_state: %s must be a boolean", name);
    lua_pop(L, 1);
    return v;
}

/* sim:control(upstream, addr, { drain =, down =, weight =, reset = }) */
static int l_control(lua_State *L)
{
    mp_sim_t *s = check_sim(L);
    const char *up = luaL_checkstring(L, 2), *addr = luaL_checkstring(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    mp_peer_ctl_t c = MP_PEER_CTL_NONE;
    c.drain = ctl_bool(L, 4, "drain");
    c.down = ctl_bool(L, 4, "down");
    c.reset = ctl_bool(L, 4, "reset") == 1;
    lua_getfield(L, 4, "weight");
    if (!lua_isnil(L, -1)) {
        lua_Number w = lua_tonumber(L, -1);
        if (!lua_isnumber(L, -1) || w != (int)w || w < 1 || w > MP_CTL_WEIGHT_MAX)
            return luaL_error(L, "server_state: weight must be an integer 1..%d", MP_CTL_WEIGHT_MAX);
        c.weight = (int)w;
    }
    lua_pop(L, 1);
    if (mp_sim_control(s, up, addr, &c) != 0)
        return luaL_error(L, "server_state: upstream '%s' has no server %s", up, addr);
    return 0;
}

static int l_set_now(lua_State *L)
{
    mp_sim_set_now(check_sim(L), luaL_optnumber(L, 2, 0));
    return 0;
}

/* sim:summary() -> the configuration as plain data (core.load_config's) */
static int l_summary(lua_State *L)
{
    mp_l_push_config(L, mp_sim_config(check_sim(L)));
    return 1;
}

/* sim:check_guards() -> true, or nil, message */
static int l_check_guards(lua_State *L)
{
    char err[4096];
    if (mp_sim_check_guards(check_sim(L), err, sizeof(err)) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg sim_funcs[] = {
    {"simulator", l_simulator},
    {NULL, NULL},
};

static void sim_setup(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"request", l_request},           {"response", l_response}, {"set_server", l_set_server},
        {"control", l_control},           {"set_now", l_set_now},   {"summary", l_summary},
        {"check_guards", l_check_guards}, {"close", l_close},       {NULL, NULL}};
    luaL_newmetatable(L, SIM_MT);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

/* luaopen for the Lua module moonproxy.core (this file is the module
 * build's alone): every build's parts, and the simulator. */
int luaopen_moonproxy_core(lua_State *L)
{
    mp_config_set_resolver(mp_resolve_lookup); /* load_config and the simulator resolve names like the server */
    mp_l_core_open(L);
    sim_setup(L);
    luaL_register(L, NULL, sim_funcs);
    return 1;
}
