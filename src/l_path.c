/* l_path.c: moonproxy.core bindings of path normalisation (path.h) for the
 * specs. The path is copied to end right at a PROT_NONE page and normalised
 * in place, so a read past its end faults and the in-place use the server
 * could make is the one tested. */
#include "l_core.h"
#include "path.h"

#include <lauxlib.h>
#include <lua.h>
#include <sys/mman.h>
#include <unistd.h>

/* opts = { merge_slashes = true, escaped_slashes = "reject" | "keep" | "decode" } */
static mp_path_opts_t check_opts(lua_State *L, int idx)
{
    mp_path_opts_t o = {1, MP_SLASHES_REJECT};
    if (lua_isnoneornil(L, idx))
        return o;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "merge_slashes");
    if (!lua_isnil(L, -1))
        o.merge_slashes = (uint8_t)lua_toboolean(L, -1);
    lua_getfield(L, idx, "escaped_slashes");
    static const char *const modes[] = {"reject", "keep", "decode", NULL};
    if (!lua_isnil(L, -1))
        o.escaped_slashes = (uint8_t)luaL_checkoption(L, -1, NULL, modes);
    lua_pop(L, 2);
    return o;
}

/* Maps len bytes ending at a PROT_NONE page; returns where they start, or
 * NULL. *map and *size describe the whole mapping. */
static char *guarded(size_t len, void **map, size_t *size)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t usable = (len + page - 1) / page * page;
    *size = usable + page;
    *map = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (*map == MAP_FAILED)
        return NULL;
    if (mprotect((char *)*map + usable, page, PROT_NONE) != 0) {
        munmap(*map, *size);
        return NULL;
    }
    return (char *)*map + usable - len;
}

/* core.path_normalize(path [, opts]) -> normalised path | nil, reason */
static int l_normalize(lua_State *L)
{
    size_t len;
    const char *p = luaL_checklstring(L, 1, &len);
    mp_path_opts_t o = check_opts(L, 2);
    void *map;
    size_t size;
    char *buf = guarded(len, &map, &size);
    if (!buf)
        return luaL_error(L, "path_normalize: out of memory");
    memcpy(buf, p, len);
    const char *why = NULL;
    ssize_t n = mp_path_normalize(buf, len, &o, buf, &why);
    if (n < 0) {
        munmap(map, size);
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    lua_pushlstring(L, buf, (size_t)n);
    munmap(map, size);
    return 1;
}

/* core.path_is_normal(path [, opts]) -> boolean */
static int l_is_normal(lua_State *L)
{
    size_t len;
    const char *p = luaL_checklstring(L, 1, &len);
    mp_path_opts_t o = check_opts(L, 2);
    lua_pushboolean(L, mp_path_is_normal(p, len, &o));
    return 1;
}

/* core.path_check_query(query) -> true | nil, reason */
static int l_check_query(lua_State *L)
{
    size_t len;
    const char *q = luaL_checklstring(L, 1, &len);
    const char *why = NULL;
    if (mp_path_check_query(q, len, &why) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

const luaL_Reg mp_l_path_funcs[] = {
    {"path_normalize", l_normalize},
    {"path_is_normal", l_is_normal},
    {"path_check_query", l_check_query},
    {NULL, NULL},
};
