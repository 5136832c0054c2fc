/* guard.c: a script's proxy.expect guards (sim.h): each guard's request
 * runs through a simulator and its result is compared with what the guard
 * expects; also reading headers from the Lua tables guards and specs give. */
#include "sim.h"
#include "strbuf.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <string.h>

#define MAX_GUARD_HEADERS 64

/* The value of a field in a head made by the simulator, repeated fields
 * joined with ", " (RFC 9110 §5.3), appended to out. Returns how many
 * there were. */
static int head_field(const char *head, size_t len, const char *name, mp_strbuf_t *out)
{
    size_t nlen = strlen(name);
    int count = 0;
    const char *p = memchr(head, '\n', len), *end = head + len;
    while (p && ++p < end) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol || eol == p)
            break;
        if ((size_t)(eol - p) > nlen + 1 && p[nlen] == ':' &&
            mp_slice_caseeq((mp_slice){p, nlen}, (mp_slice){name, nlen})) {
            const char *v = p + nlen + 1;
            while (v < eol && *v == ' ')
                v++;
            mp_strbuf_printf(out, "%s%.*s", count ? ", " : "", (int)(eol - v), v);
            count++;
        }
        p = memchr(eol, '\n', (size_t)(end - eol));
    }
    return count;
}

/* A string field of the table at t (NULL when absent or not a string: the
 * DSL checked the guards' shapes); the table keeps it alive. Never raises
 * (lua_getfield would only with a metatable: the guards' tables have none). */
static const char *opt_string(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1);
    return v;
}

/* The string at idx, or a number's text, which is kept alive in the anchor
 * table (a converted number exists only in its stack slot); NULL for other
 * types. */
static const char *anchored(lua_State *L, int idx, int anchor)
{
    int type = lua_type(L, idx);
    if (type == LUA_TSTRING)
        return lua_tostring(L, idx);
    if (type != LUA_TNUMBER)
        return NULL;
    lua_pushvalue(L, idx);
    const char *v = lua_tostring(L, -1);
    lua_rawseti(L, anchor, (int)lua_objlen(L, anchor) + 1);
    return v;
}

size_t mp_sim_lua_headers(lua_State *L, int t, int anchor, mp_sim_header_t *h, size_t max, int *bad)
{
    size_t n = 0;
    *bad = 0;
    if (lua_isnoneornil(L, t))
        return 0;
    if (!lua_istable(L, t))
        return *bad = 1, 0;
    for (lua_pushnil(L); lua_next(L, t); lua_pop(L, 1)) {
        int pair = lua_type(L, -2) == LUA_TNUMBER && lua_istable(L, -1);
        const char *name = NULL;
        if (pair) { /* { "name", "value" } */
            lua_rawgeti(L, -1, 1);
            name = anchored(L, lua_gettop(L), anchor);
            lua_pop(L, 1);
        } else if (lua_type(L, -2) == LUA_TSTRING) {
            name = lua_tostring(L, -2);
        }
        if (!name) {
            *bad = 1;
            continue;
        }
        if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))
            continue; /* false: absent */
        if (!lua_istable(L, -1)) {
            const char *v = anchored(L, lua_gettop(L), anchor);
            if (!v || n == max)
                *bad = 1;
            else
                h[n++] = (mp_sim_header_t){name, v};
            continue;
        }
        for (int i = pair ? 2 : 1; !pair || i == 2; i++) { /* a list of values, or the pair's one */
            lua_rawgeti(L, -1, i);
            const char *v = anchored(L, lua_gettop(L), anchor);
            lua_pop(L, 1);
            if (!v) {
                *bad |= pair;
                break;
            }
            if (n == max) {
                *bad = 1;
                break;
            }
            h[n++] = (mp_sim_header_t){name, v};
        }
    }
    return n;
}

/* 'text' into out[cap], the text cut to fit. */
static void quote(char *out, size_t cap, const mp_strbuf_t *text)
{
    size_t n = text->len < cap - 3 ? text->len : cap - 3;
    snprintf(out, cap, "'%.*s'", (int)n, text->p ? text->p : "");
}

static size_t mismatch(char *out, size_t n, size_t cap, const char *what, const char *want, const char *got)
{
    if (n >= cap)
        return n;
    return n + (size_t)snprintf(out + n, cap - n, "; %s: expected %s, got %s", what, want, got);
}

/* Compares one guard (the table on top of L's stack) with the result;
 * appends the differences to out. */
static size_t compare(lua_State *L, const mp_sim_result_t *res, char *out, size_t cap)
{
    int t = lua_gettop(L);
    size_t n = 0;
    char want[512], got[512];
    lua_getfield(L, t, "route");
    if (!lua_isnil(L, -1)) {
        int by_index = lua_type(L, -1) == LUA_TNUMBER;
        int ok = by_index ? res->route_index == (int)lua_tointeger(L, -1)
                          : res->route && strcmp(res->route, lua_tostring(L, -1)) == 0;
        if (!ok) {
            snprintf(want, sizeof(want), by_index ? "%s" : "'%s'", lua_tostring(L, -1));
            if (by_index)
                snprintf(got, sizeof(got), "%d", res->route_index);
            else if (res->route)
                snprintf(got, sizeof(got), "'%s'", res->route);
            else
                snprintf(got, sizeof(got), "no route");
            n = mismatch(out, n, cap, "route", want, got);
        }
    }
    lua_pop(L, 1);
    static const char *const names[] = {"upstream", "server"};
    for (int i = 0; i < 2; i++) {
        const char *w = opt_string(L, t, names[i]);
        const char *g = i == 0 ? res->upstream : res->server;
        if (w && (!g || strcmp(w, g) != 0 || (!res->forwarded && i == 1))) {
            snprintf(want, sizeof(want), "'%s'", w);
            if (!res->forwarded)
                snprintf(got, sizeof(got), "an answer %d from the proxy", res->status);
            else
                snprintf(got, sizeof(got), "'%s'", g ? g : "none");
            n = mismatch(out, n, cap, names[i], want, got);
        }
    }
    const char *target = opt_string(L, t, "target");
    if (target) {
        const char *sp = res->forwarded ? memchr(res->head, ' ', res->head_len) : NULL;
        const char *sp2 = sp ? memchr(sp + 1, ' ', res->head_len - (size_t)(sp + 1 - res->head)) : NULL;
        if (!sp2 || strlen(target) != (size_t)(sp2 - sp - 1) || memcmp(target, sp + 1, strlen(target)) != 0) {
            snprintf(want, sizeof(want), "'%s'", target);
            if (sp2)
                snprintf(got, sizeof(got), "'%.*s'", (int)(sp2 - sp - 1), sp + 1);
            else
                snprintf(got, sizeof(got), "an answer %d from the proxy", res->status);
            n = mismatch(out, n, cap, "target", want, got);
        }
    }
    lua_getfield(L, t, "status");
    if (!lua_isnil(L, -1) && (res->forwarded || res->status != (int)lua_tointeger(L, -1))) {
        snprintf(want, sizeof(want), "%d", (int)lua_tointeger(L, -1));
        if (res->forwarded)
            snprintf(got, sizeof(got), "forwarded to upstream '%s'", res->upstream);
        else
            snprintf(got, sizeof(got), "%d", res->status);
        n = mismatch(out, n, cap, "status", want, got);
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "headers");
    if (lua_istable(L, -1)) {
        int ht = lua_gettop(L);
        for (lua_pushnil(L); lua_next(L, ht); lua_pop(L, 1)) {
            if (lua_type(L, -2) != LUA_TSTRING) /* the DSL allows none; never convert a key in place */
                continue;
            const char *name = lua_tostring(L, -2);
            char what[160];
            snprintf(what, sizeof(what), "header %s", name);
            mp_strbuf_t gv = {0}, wv = {0};
            int count = head_field(res->head, res->head_len, name, &gv);
            quote(got, sizeof(got), &gv);
            mp_strbuf_free(&gv);
            if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
                if (count)
                    n = mismatch(out, n, cap, what, "none", got);
                continue;
            }
            if (lua_istable(L, -1)) {
                for (int i = 1;; i++) {
                    lua_rawgeti(L, -1, i);
                    const char *v = lua_tostring(L, -1); /* used before the pop: a number's text lives there */
                    if (v)
                        mp_strbuf_printf(&wv, "%s%s", i > 1 ? ", " : "", v);
                    lua_pop(L, 1);
                    if (!v)
                        break;
                }
            } else {
                mp_strbuf_printf(&wv, "%s", lua_tostring(L, -1));
            }
            quote(want, sizeof(want), &wv);
            mp_strbuf_free(&wv);
            if (!count || strcmp(want, got) != 0)
                n = mismatch(out, n, cap, what, want, count ? got : "none");
        }
    }
    lua_pop(L, 1);
    return n;
}

int mp_sim_check_guards(mp_sim_t *s, char *err, size_t errlen)
{
    const mp_config_t *cfg = mp_sim_config(s);
    lua_State *L = mp_sim_vm(s);
    if (!cfg->nexpects)
        return 0;
    int top = lua_gettop(L);
    int rc = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, cfg->expect_ref);
    for (size_t i = 1; i <= cfg->nexpects && rc == 0; i++) {
        lua_rawgeti(L, top + 1, (int)i);
        int g = lua_gettop(L);
        lua_getfield(L, g, "request");
        int q = lua_gettop(L);
        mp_sim_header_t headers[MAX_GUARD_HEADERS];
        lua_newtable(L); /* numbers' texts, until the guard is checked */
        int anchor = lua_gettop(L);
        lua_getfield(L, q, "headers");
        int bad;
        size_t nh = mp_sim_lua_headers(L, lua_gettop(L), anchor, headers, MP_ARRAY_LEN(headers), &bad);
        lua_pop(L, 1);
        size_t blen = 0;
        lua_getfield(L, q, "body");
        const char *body = lua_tolstring(L, -1, &blen);
        lua_pop(L, 1);
        mp_sim_request_t rq = {.method = opt_string(L, q, "method"),
                               .host = opt_string(L, q, "host"),
                               .target = opt_string(L, q, "path"),
                               .headers = headers,
                               .nheaders = nh,
                               .body = body,
                               .body_len = blen,
                               .remote_addr = opt_string(L, q, "remote_addr")};
        mp_sim_result_t res;
        int ran = mp_sim_request(s, &rq, &res);
        if (ran == MP_ENOMEM) {
            snprintf(err, errlen, "out of memory");
            rc = MP_ENOMEM;
            break;
        }
        char diff[2048];
        size_t n = 0;
        if (ran == MP_EINVAL) {
            n = (size_t)snprintf(diff, sizeof(diff), "; request: remote_addr '%s' is not an IP address",
                                 rq.remote_addr);
        } else {
            lua_pushvalue(L, g);
            n = compare(L, &res, diff, sizeof(diff));
        }
        if (n) {
            const char *src = opt_string(L, g, "src");
            size_t k = (size_t)snprintf(err, errlen, "%s: proxy.expect failed for %s %s%s%s: %s", src ? src : "?",
                                        rq.method ? rq.method : "GET", rq.host ? rq.host : "localhost",
                                        rq.target ? rq.target : "/", "", diff + 2);
            for (size_t j = 0; j < res.ntrace && k < errlen; j++)
                k += (size_t)snprintf(err + k, errlen - k, "%s %zu. %s: %s", j ? "" : " | trace:", j + 1,
                                      res.trace[j].kind, res.trace[j].text);
            rc = MP_EINVAL;
        }
        lua_settop(L, top + 1);
    }
    lua_settop(L, top);
    mp_sim_release(s);
    return rc;
}

int mp_sim_check_script(const char *path, const char *text, size_t len, char *err, size_t errlen)
{
    mp_sim_t *s = mp_sim_new(path, text, len, 1, err, errlen);
    if (!s)
        return MP_EINVAL;
    int rc = mp_sim_check_guards(s, err, errlen);
    mp_sim_free(s);
    return rc;
}
