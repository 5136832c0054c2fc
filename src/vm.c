/* vm.c: lua_State life (a VM with moonproxy's Lua modules on its path) and
 * mp_vm_call(), the one protected way into Lua. */
#include "vm.h"

#include "l_core.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef MP_LUA_DIR
#define MP_LUA_DIR "/usr/local/share/moonproxy/lua"
#endif

static char lua_dir[PATH_MAX];
static pthread_once_t lua_dir_once = PTHREAD_ONCE_INIT;

static int has_dsl(const char *dir)
{
    char path[PATH_MAX];
    int n = snprintf(path, sizeof(path), "%s/moonproxy.lua", dir);
    return n > 0 && (size_t)n < sizeof(path) && access(path, R_OK) == 0;
}

static void find_lua_dir(void)
{
    const char *env = getenv("MOONPROXY_LUA_PATH");
    if (env && *env && strlen(env) < sizeof(lua_dir)) {
        memcpy(lua_dir, env, strlen(env) + 1);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            /* a build tree, a copy beside it, or an install under a prefix */
            static const char *const rel[] = {"/../lua", "/lua", "/../share/lua/5.1"};
            for (size_t i = 0; i < MP_ARRAY_LEN(rel); i++) {
                char dir[PATH_MAX];
                int len = snprintf(dir, sizeof(dir), "%s%s", exe, rel[i]);
                if (len > 0 && (size_t)len < sizeof(dir) && has_dsl(dir)) {
                    memcpy(lua_dir, dir, (size_t)len + 1);
                    return;
                }
            }
        }
    }
    snprintf(lua_dir, sizeof(lua_dir), "%s", MP_LUA_DIR);
}

const char *mp_vm_lua_dir(void)
{
    /* workers create their VMs concurrently; the answer is computed once */
    pthread_once(&lua_dir_once, find_lua_dir);
    return lua_dir;
}

static _Atomic int handler_ref; /* 0: not known yet */

static int on_error(lua_State *L);

/* Runs under lua_cpcall so that an out-of-memory error cannot escape. */
static int vm_setup(lua_State *L)
{
    const char *dir = lua_touserdata(L, 1);
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 1);
    /* The C core, for the DSL, hooks and plugins: the same module the specs load. */
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_moonproxy_core);
    lua_setfield(L, -2, "moonproxy.core");
    lua_pop(L, 2);
    /* mp_vm_call's message handler, made once: every VM made here gets it
     * at the same reference (their set-up is identical). */
    lua_pushcfunction(L, on_error);
    int ref = luaL_ref(L, LUA_REGISTRYINDEX), none = 0;
    atomic_compare_exchange_strong(&handler_ref, &none, ref);
    return 0;
}

lua_State *mp_vm_new(void)
{
    lua_State *L = luaL_newstate();
    if (!L)
        return NULL;
    if (lua_cpcall(L, vm_setup, (void *)mp_vm_lua_dir()) != 0) {
        lua_close(L);
        return NULL;
    }
    return L;
}

void mp_vm_close(lua_State *L)
{
    if (L)
        lua_close(L);
}

/* Message handler: the error as a string, then the stack traceback. */
static int on_error(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Copies msg into err; the traceback (which starts on a line of its own) is
 * kept only as far as whole lines fit, so the first line always survives. */
static void copy_error(const char *msg, size_t len, char *err, size_t errlen)
{
    if (!err || errlen == 0)
        return;
    const char *tb = strstr(msg, "\nstack traceback:");
    size_t head = tb ? (size_t)(tb - msg) : len;
    if (head >= errlen)
        head = errlen - 1;
    size_t keep = head;
    if (tb && len < errlen) {
        keep = len;
    } else if (tb) {
        for (size_t i = head; i < errlen - 1; i++)
            if (msg[i] == '\n')
                keep = i;
        if (keep <= head + strlen("\nstack traceback:"))
            keep = head; /* not even one frame fits */
    }
    memcpy(err, msg, keep);
    err[keep] = '\0';
}

int mp_vm_call(lua_State *L, int nargs, int nresults, char *err, size_t errlen)
{
    int base = lua_gettop(L) - nargs; /* the function's slot */
    int ref = handler_ref;
    if (ref > 0)
        lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    if (ref <= 0 || lua_tocfunction(L, -1) != on_error) { /* a VM not made by mp_vm_new */
        if (ref > 0)
            lua_pop(L, 1);
        lua_pushcfunction(L, on_error);
    }
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (rc == 0)
        return 0;
    size_t len = 0;
    const char *msg = lua_tolstring(L, -1, &len);
    if (msg)
        copy_error(msg, len, err, errlen);
    else
        copy_error("(error object is not a string)", 30, err, errlen);
    lua_pop(L, 1);
    return MP_EINVAL;
}
