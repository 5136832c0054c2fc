/* l_config.c: moonproxy.core.load_config(path): loads a configuration the way
 * the server does (a fresh VM, the DSL, mp_config_build) and returns a plain
 * summary of the result, for specs and tools. */
#include "config.h"
#include "l_core.h"
#include "vm.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>

static void set_str(lua_State *L, const char *k, const char *v)
{
    if (!v)
        return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void push_cidr(lua_State *L, const mp_cidr_t *c)
{
    char text[INET6_ADDRSTRLEN];
    if (!inet_ntop(c->family, c->addr, text, sizeof(text)))
        text[0] = '\0';
    lua_pushfstring(L, "%s/%d", text, (int)c->bits);
}

static void push_settings(lua_State *L, const mp_settings_t *s)
{
    lua_createtable(L, 0, 12);
    set_num(L, "workers", s->workers);
    set_num(L, "client_header_timeout", s->client_header_timeout);
    set_num(L, "client_body_timeout", s->client_body_timeout);
    set_num(L, "keepalive_timeout", s->keepalive_timeout);
    set_num(L, "shutdown_timeout", s->shutdown_timeout);
    set_num(L, "max_header_size", (double)s->max_header_size);
    set_num(L, "max_uri_size", (double)s->max_uri_size);
    set_num(L, "max_body_size", (double)s->max_body_size);
    set_num(L, "max_connections", s->max_connections);
    if (s->access_log)
        lua_pushstring(L, s->access_log);
    else
        lua_pushboolean(L, 0);
    lua_setfield(L, -2, "access_log");
    lua_createtable(L, (int)s->ntrusted, 0);
    for (size_t i = 0; i < s->ntrusted; i++) {
        push_cidr(L, &s->trusted[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "trusted_proxies");
    lua_createtable(L, 0, 3);
    set_str(L, "nameservers", s->resolver.nameservers);
    set_str(L, "hosts", s->resolver.hosts);
    set_num(L, "timeout", s->resolver.timeout);
    lua_setfield(L, -2, "resolver");
}

static void push_upstream(lua_State *L, const mp_upstream_def_t *u, int index)
{
    lua_createtable(L, 0, 12);
    set_num(L, "index", index);
    set_str(L, "name", u->name);
    set_str(L, "balancer", u->balancer);
    set_num(L, "keepalive", u->keepalive);
    set_num(L, "keepalive_timeout", u->keepalive_timeout);
    set_num(L, "retries", u->retries);
    set_str(L, "host", u->host);
    set_str(L, "tls_name", u->tls_name);
    set_str(L, "src", u->src);
    lua_createtable(L, 0, 3);
    set_num(L, "connect", u->connect_timeout);
    set_num(L, "send", u->send_timeout);
    set_num(L, "read", u->read_timeout);
    set_num(L, "tunnel", u->tunnel_timeout);
    lua_setfield(L, -2, "timeouts");
    lua_createtable(L, (int)u->nservers, 0);
    lua_createtable(L, (int)u->nservers, 0);
    lua_createtable(L, (int)u->nservers, 0); /* each server's name as written (a name: one per address) */
    for (size_t i = 0; i < u->nservers; i++) {
        lua_pushstring(L, u->servers[i].addr.text);
        lua_rawseti(L, -4, (int)i + 1);
        lua_pushinteger(L, u->servers[i].weight);
        lua_rawseti(L, -3, (int)i + 1);
        lua_pushstring(L, u->servers[i].name);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -4, "server_names");
    lua_setfield(L, -3, "weights");
    lua_setfield(L, -2, "servers");
    lua_createtable(L, 0, 2);
    set_num(L, "min", u->resolve_min);
    set_num(L, "max", u->resolve_max);
    lua_setfield(L, -2, "resolve");
}

static void push_route(lua_State *L, const mp_config_t *cfg, const mp_route_t *r)
{
    lua_createtable(L, 0, 10);
    set_str(L, "name", r->name);
    set_num(L, "index", r->index);
    if (r->target >= 0 && (size_t)r->target < cfg->nupstreams)
        set_str(L, "upstream", cfg->upstreams[r->target].name);
    set_str(L, "host", r->host);
    set_str(L, "path", r->path);
    set_str(L, "prefix", r->prefix);
    set_str(L, "regex", r->regex);
    lua_pushboolean(L, r->strip_prefix);
    lua_setfield(L, -2, "strip_prefix");
    lua_pushboolean(L, !cfg->no_upgrade[mp_route_slot(r)] && !cfg->statics[mp_route_slot(r)].root);
    lua_setfield(L, -2, "upgrade");
    set_str(L, "src", r->src);
}

/* The configuration as plain Lua data: {listen = {"addr", ...}, admin =
 * "addr"|nil, settings = {...}, upstreams = {name = {index, servers =
 * {"addr", ...}, weights = {...}, timeouts = {...}, ...}}, routes = {{name,
 * index, upstream, host, path, prefix, regex, strip_prefix, src}, ...}}. */
void mp_l_push_config(lua_State *L, const mp_config_t *cfg)
{
    lua_createtable(L, 0, 6);
    set_str(L, "path", cfg->path);
    lua_createtable(L, (int)cfg->nlistens, 0);
    for (size_t i = 0; i < cfg->nlistens; i++) {
        lua_pushstring(L, cfg->listens[i].text);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "listen");
    if (cfg->admin)
        set_str(L, "admin", cfg->admin->text);
    push_settings(L, &cfg->settings);
    lua_setfield(L, -2, "settings");
    lua_createtable(L, 0, (int)cfg->nupstreams);
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        push_upstream(L, &cfg->upstreams[i], (int)i + 1);
        lua_setfield(L, -2, cfg->upstreams[i].name);
    }
    lua_setfield(L, -2, "upstreams");
    size_t n = cfg->router ? mp_router_count(cfg->router) : 0;
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        push_route(L, cfg, mp_router_get(cfg->router, i));
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "routes");
    set_num(L, "guards", (double)cfg->nexpects);
}

static int summary(lua_State *L)
{
    mp_l_push_config(L, lua_touserdata(L, 1));
    return 1;
}

/* load_config(path) -> summary, or nil, "file:line: message". The script runs
 * in a VM of its own (closed before returning), never the caller's. */
static int l_load_config(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    char err[1024];
    lua_State *vm = mp_vm_new();
    if (!vm)
        return luaL_error(L, "load_config: out of memory");
    mp_config_t *cfg = NULL;
    int rc = mp_config_load(vm, path, &cfg, err, sizeof(err));
    mp_vm_close(vm);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    /* protected so that cfg is freed even if the summary runs out of memory */
    lua_pushcfunction(L, summary);
    lua_pushlightuserdata(L, cfg);
    rc = lua_pcall(L, 1, 1, 0);
    mp_config_free(cfg);
    if (rc != 0)
        return lua_error(L);
    return 1;
}

const luaL_Reg mp_l_config_funcs[] = {
    {"load_config", l_load_config},
    {NULL, NULL},
};
