/* l_http1.c: moonproxy.core bindings of the HTTP/1 parser for the specs.
 * Input is copied to end right at a PROT_NONE page, so a read past the end
 * faults; a list of pieces is fed the way a socket would deliver it. */
#include "http1.h"
#include "l_core.h"

#include <lauxlib.h>
#include <lua.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUARDED_MT "moonproxy.core.guarded"
#define MOVE_MAX 65536 /* inputs up to this size move at each call so each prefix ends at the guard */

/* A buffer whose usable bytes end at a PROT_NONE page; owned by a userdata. */
typedef struct {
    char *map;   /* mmap'ed: usable bytes, then the guard page */
    size_t size; /* of the whole mapping */
    char *end;   /* first byte of the guard page */
} guarded_t;

static int guarded_gc(lua_State *L)
{
    guarded_t *g = luaL_checkudata(L, 1, GUARDED_MT);
    if (g->map)
        munmap(g->map, g->size);
    g->map = NULL;
    return 0;
}

/* Pushes a guarded buffer with room for cap bytes. */
static guarded_t *guarded_new(lua_State *L, size_t cap)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t usable = (cap + page - 1) / page * page;
    guarded_t *g = lua_newuserdata(L, sizeof(*g));
    void *m;

    g->map = NULL;
    luaL_getmetatable(L, GUARDED_MT);
    lua_setmetatable(L, -2);
    m = mmap(NULL, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        luaL_error(L, "mmap failed");
    g->map = m;
    g->size = usable + page;
    g->end = g->map + usable;
    if (mprotect(g->end, page, PROT_NONE) != 0)
        luaL_error(L, "mprotect failed");
    return g;
}

/* Copies s[0..n) so that it ends at the guard page; returns where it starts. */
static const char *guarded_put(guarded_t *g, const char *s, size_t n)
{
    char *d = g->end - n;
    if (n)
        memmove(d, s, n);
    return d;
}

/* The input at idx, a string or a list of strings: pushes the concatenation
 * and returns the number of pieces (1 for a string). */
static int push_input(lua_State *L, int idx)
{
    luaL_Buffer b;
    int n;

    if (lua_type(L, idx) == LUA_TSTRING) {
        lua_pushvalue(L, idx);
        return 1;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    n = (int)lua_objlen(L, idx);
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "piece %d is not a string", i);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    return n;
}

/* Bytes up to and including piece k of the input at idx (k = pieces: all). */
static size_t piece_end(lua_State *L, int idx, int k, size_t *acc)
{
    if (lua_type(L, idx) == LUA_TTABLE) {
        size_t len;
        lua_rawgeti(L, idx, k);
        lua_tolstring(L, -1, &len);
        lua_pop(L, 1);
        *acc += len;
    } else {
        *acc = lua_objlen(L, idx);
    }
    return *acc;
}

static void set_str(lua_State *L, const char *key, mp_slice s)
{
    lua_pushlstring(L, s.p, s.len);
    lua_setfield(L, -2, key);
}

static void set_int(lua_State *L, const char *key, lua_Number v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, key);
}

static void set_bool(lua_State *L, const char *key, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, key);
}

static void set_headers(lua_State *L, const mp_header_t *h, unsigned n)
{
    lua_createtable(L, (int)n, 0);
    for (unsigned i = 0; i < n; i++) {
        lua_createtable(L, 2, 0);
        lua_pushlstring(L, h[i].name.p, h[i].name.len);
        lua_rawseti(L, -2, 1);
        lua_pushlstring(L, h[i].value.p, h[i].value.len);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "headers");
}

static size_t opt_size(lua_State *L, int idx, const char *key, size_t def)
{
    size_t v = def;
    if (lua_istable(L, idx)) {
        lua_getfield(L, idx, key);
        if (!lua_isnil(L, -1))
            v = (size_t)luaL_checknumber(L, -1);
        lua_pop(L, 1);
    }
    return v;
}

static void push_request(lua_State *L, const mp_http_request_t *req)
{
    lua_createtable(L, 0, 20);
    set_str(L, "method", req->method);
    set_str(L, "target", req->target);
    set_str(L, "path", req->path);
    set_str(L, "query", req->query);
    set_bool(L, "has_query", req->has_query);
    set_str(L, "host", req->host);
    set_int(L, "minor", req->minor);
    set_int(L, "content_length", (lua_Number)req->content_length);
    set_bool(L, "chunked", req->chunked);
    set_bool(L, "conn_close", req->conn_close);
    set_bool(L, "conn_keepalive", req->conn_keepalive);
    set_bool(L, "expect_continue", req->expect_continue);
    set_bool(L, "upgrade", req->upgrade);
    set_int(L, "head_len", (lua_Number)req->head_len);
    set_headers(L, req->headers, req->nheaders);
}

/* Feeds the input at idx to parse (a request or a response parser) the way
 * reads would deliver it: the buffer grows by one piece per call. Returns the
 * first result other than MP_EAGAIN (or MP_EAGAIN); *calls counts the calls. */
typedef int (*parse_fn)(const char *buf, size_t len, size_t *scanned, void *arg);

static int feed(lua_State *L, int idx, parse_fn parse, void *arg, int *calls)
{
    int pieces = push_input(L, idx);
    size_t total, acc = 0, scanned = 0;
    const char *all = lua_tolstring(L, -1, &total);
    guarded_t *g = guarded_new(L, total);
    const char *base = guarded_put(g, all, total);
    int rc = MP_EAGAIN;

    *calls = 0;
    for (int k = 1; k <= pieces && rc == MP_EAGAIN; k++) {
        size_t len = piece_end(L, idx, k, &acc);
        if (total <= MOVE_MAX)
            base = guarded_put(g, all, len); /* this prefix ends at the guard */
        rc = parse(base, len, &scanned, arg);
        (*calls)++;
    }
    return rc;
}

typedef struct {
    mp_http_limits_t lim;
    mp_http_request_t req;
} request_arg_t;

static int parse_request_cb(const char *buf, size_t len, size_t *scanned, void *arg)
{
    request_arg_t *a = arg;
    return mp_http1_parse_request(buf, len, scanned, &a->lim, &a->req);
}

/* parse_request(str | {pieces...} [, {max_header_size=, max_uri_size=}])
 * -> request table, parser calls | false (incomplete) | nil, status, error */
static int l_parse_request(lua_State *L)
{
    mp_http_limits_t lim = {opt_size(L, 2, "max_header_size", 16384), opt_size(L, 2, "max_uri_size", 8192)};
    request_arg_t *a;
    int calls, rc;

    lua_settop(L, 2);
    a = lua_newuserdata(L, sizeof(*a)); /* the request is large for the C stack of a binding */
    a->lim = lim;
    rc = feed(L, 1, parse_request_cb, a, &calls);
    if (rc == MP_EAGAIN) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushinteger(L, a->req.status);
        lua_pushstring(L, a->req.error);
        return 3;
    }
    push_request(L, &a->req);
    lua_pushinteger(L, calls);
    return 2;
}

typedef struct {
    size_t max;
    mp_http_response_t res;
} response_arg_t;

static int parse_response_cb(const char *buf, size_t len, size_t *scanned, void *arg)
{
    response_arg_t *a = arg;
    return mp_http1_parse_response(buf, len, scanned, a->max, &a->res);
}

/* parse_response(str | {pieces...} [, max]) -> response table | false | nil, error */
static int l_parse_response(lua_State *L)
{
    size_t max = (size_t)luaL_optnumber(L, 2, 16384);
    response_arg_t *a;
    int calls, rc;

    lua_settop(L, 2);
    a = lua_newuserdata(L, sizeof(*a));
    a->max = max;
    rc = feed(L, 1, parse_response_cb, a, &calls);
    if (rc == MP_EAGAIN) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, a->res.error);
        return 2;
    }
    lua_createtable(L, 0, 10);
    set_int(L, "minor", a->res.minor);
    set_int(L, "status", a->res.status);
    set_str(L, "reason", a->res.reason);
    set_int(L, "content_length", (lua_Number)a->res.content_length);
    set_bool(L, "chunked", a->res.chunked);
    set_bool(L, "conn_close", a->res.conn_close);
    set_bool(L, "conn_keepalive", a->res.conn_keepalive);
    set_int(L, "head_len", (lua_Number)a->res.head_len);
    set_headers(L, a->res.headers, a->res.nheaders);
    return 1;
}

/* Appends trailer field f to the list on top of the stack as {name, value}. */
static void add_trailer(lua_State *L, const mp_header_t *f, int *n)
{
    lua_createtable(L, 2, 0);
    lua_pushlstring(L, f->name.p, f->name.len);
    lua_rawseti(L, -2, 1);
    lua_pushlstring(L, f->value.p, f->value.len);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, ++*n);
}

/* chunked_decode(str | {pieces...}) -> data, done, consumed, trailers | nil, error
 * Each piece is decoded on its own (ending at the guard page), after the
 * bytes of the previous piece the decoder did not take (an incomplete
 * trailer line), until it is consumed or the message ends; consumed counts
 * input bytes taken; trailers is a list of {name, value}. */
static int l_chunked_decode(lua_State *L)
{
    int pieces, ntrailers = 0;
    size_t total, consumed = 0, held = 0;
    mp_chunked_t c = {0};
    guarded_t *g;
    luaL_Buffer out;

    lua_settop(L, 1);
    pieces = push_input(L, 1); /* 2: all the input */
    lua_tolstring(L, -1, &total);
    g = guarded_new(L, total); /* 3 */
    lua_newtable(L);           /* 4: trailers */
    luaL_buffinit(L, &out);
    for (int k = 1; k <= pieces && !c.done; k++) {
        size_t len, off = 0;
        const char *s;
        if (lua_type(L, 1) == LUA_TSTRING) {
            s = lua_tolstring(L, 1, &len);
        } else {
            lua_rawgeti(L, 1, k);
            s = lua_tolstring(L, -1, &len);
            lua_pop(L, 1); /* still referenced by the list */
        }
        /* the held bytes are the input's, just before this piece */
        s = guarded_put(g, lua_tostring(L, 2) + consumed, held + len);
        len += held;
        while (off < len && !c.done) {
            mp_chunk_part_t part;
            ssize_t got = mp_chunked_next(&c, s + off, len - off, &part);
            if (got < 0) {
                lua_pushnil(L);
                lua_pushstring(L, "bad chunked framing");
                return 2;
            }
            luaL_addlstring(&out, part.data.p, part.data.len);
            if (part.field.name.len) {
                lua_pushvalue(L, 4);
                add_trailer(L, &part.field, &ntrailers);
                lua_pop(L, 1);
            }
            off += (size_t)got;
            if (got == 0)
                break;
        }
        consumed += off;
        held = len - off;
    }
    luaL_pushresult(&out);
    lua_pushboolean(L, c.done);
    lua_pushnumber(L, (lua_Number)consumed);
    lua_pushvalue(L, 4);
    return 4;
}

/* http1_tokens(value) -> { token, ... } as mp_http1_next_token sees them */
static int l_tokens(lua_State *L)
{
    size_t len, pos = 0;
    const char *s = luaL_checklstring(L, 1, &len);
    mp_slice tok;
    int n = 0;

    lua_newtable(L);
    while (mp_http1_next_token((mp_slice){s, len}, &pos, &tok)) {
        lua_pushlstring(L, tok.p, tok.len);
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

/* http1_find(head, lower_name) -> 1-based index of the field in the parsed
 * request head, or nil */
static int l_find(lua_State *L)
{
    size_t len, name_len, scanned = 0;
    const char *head = luaL_checklstring(L, 1, &len);
    const char *name = luaL_checklstring(L, 2, &name_len);
    mp_http_limits_t lim = {1 << 20, 1 << 20};
    mp_http_request_t *req;
    int i;

    lua_settop(L, 2);
    req = lua_newuserdata(L, sizeof(*req));

    if (mp_http1_parse_request(head, len, &scanned, &lim, req) <= 0)
        luaL_error(L, "http1_find: not a complete, valid request head");
    i = mp_http1_find(req->headers, req->nheaders, name, name_len);
    if (i < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, i + 1);
    return 1;
}

const luaL_Reg mp_l_http1_funcs[] = {
    {"parse_request", l_parse_request},
    {"parse_response", l_parse_response},
    {"chunked_decode", l_chunked_decode},
    {"http1_tokens", l_tokens},
    {"http1_find", l_find},
    {NULL, NULL},
};

void mp_l_http1_setup(lua_State *L)
{
    luaL_newmetatable(L, GUARDED_MT);
    lua_pushcfunction(L, guarded_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushboolean(L, 0); /* getmetatable is false: no __gc a script adds (vm.c guard_finalizers) */
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
}
