/* vm.c: lua_State life (a VM with moonproxy's Lua modules on its path) and
 * mp_vm_call(), the one protected way into Lua. */
#include "vm.h"

#include "l_core.h"
#include "log.h"

#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <lualib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
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

/* A finalizer ffi.gc or ffi.metatype was given, called protected: LuaJIT runs finalizers
 * in whatever allocation steps the collector, also one C makes outside a
 * protected call (pushing a hook's arguments), and a raise there is a Lua
 * panic; inside a hook it would fail an unrelated request. Logged instead. */
static int safe_finalizer(lua_State *L)
{
    static mp_log_limit_t lim;
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    if (lua_pcall(L, lua_gettop(L) - 1, 0, 0) != 0) {
        const char *msg = lua_tostring(L, -1);
        mp_log_limited(&lim, MP_LOG_ERROR, "an FFI finalizer failed: %s", msg ? msg : "?");
    }
    return 0;
}

/* ffi.gc(cdata, finalizer) with the finalizer wrapped in safe_finalizer. */
static int safe_gc(lua_State *L)
{
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    if (lua_isfunction(L, 3)) /* nil removes one; what else ffi.gc refuses */
        lua_pushcclosure(L, safe_finalizer, 1);
    lua_call(L, 2, LUA_MULTRET);
    return lua_gettop(L);
}

/* ffi.metatype(ct, mt) with a __gc function of mt wrapped the same way (the
 * FFI reads mt once: it must not change afterwards). */
static int safe_metatype(lua_State *L)
{
    lua_settop(L, 2);
    if (lua_istable(L, 2)) {
        lua_pushliteral(L, "__gc");
        lua_rawget(L, 2);
        if (lua_isfunction(L, -1)) {
            lua_pushcclosure(L, safe_finalizer, 1);
            lua_setfield(L, 2, "__gc");
        } else {
            lua_pop(L, 1);
        }
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, LUA_MULTRET);
    return lua_gettop(L);
}

/* Every way a hook has to give an object a Lua finalizer runs it
 * protected (ffi.gc, ffi.metatype), or is closed: no newproxy, no
 * debug.setmetatable/getmetatable/getregistry, and the file handles'
 * metatable is hidden (getmetatable(io.stdout) is false). moonproxy.core's
 * objects hide theirs too (l_request.c, l_shared.c, l_router.c, ...). */
static void guard_finalizers(lua_State *L)
{
    lua_pushnil(L);
    lua_setglobal(L, "newproxy");
    lua_getglobal(L, "debug");
    lua_pushnil(L);
    lua_setfield(L, -2, "setmetatable");
    lua_pushnil(L);
    lua_setfield(L, -2, "getmetatable");
    lua_pushnil(L);
    lua_setfield(L, -2, "getregistry"); /* every metatable by name */
    lua_pop(L, 1);
    luaL_getmetatable(L, LUA_FILEHANDLE);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "ffi");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "gc");
    lua_pushcclosure(L, safe_gc, 1);
    lua_setfield(L, -2, "gc");
    lua_getfield(L, -1, "metatype");
    lua_pushcclosure(L, safe_metatype, 1);
    lua_setfield(L, -2, "metatype");
    lua_pop(L, 1);
}

/* Runs under lua_cpcall so that an out-of-memory error cannot escape. */
static int vm_setup(lua_State *L)
{
    const char *dir = lua_touserdata(L, 1);
    luaL_openlibs(L);
    /* A finalizer that raises where C allocates outside a protected call
     * (pushing a hook's arguments) would be a Lua panic. */
    guard_finalizers(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 1);
    /* The C core, for the DSL, hooks and plugins: the same module the specs load. */
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, mp_l_core_open);
    lua_setfield(L, -2, "moonproxy.core");
    lua_pop(L, 2);
    /* mp_vm_call's message handler, made once: every VM made here gets it
     * at the same reference (their set-up is identical). */
    lua_pushcfunction(L, on_error);
    int ref = luaL_ref(L, LUA_REGISTRYINDEX), none = 0;
    atomic_compare_exchange_strong(&handler_ref, &none, ref);
    return 0;
}

/* settings.lua_memory: what one VM's allocator may hold. The VM belongs to
 * one thread at a time (a build thread, then its worker, handed over under a
 * lock), so plain fields do: no atomics on every allocation.
 *
 * Debian's LuaJIT (2.1-20230119) crashes when a memory error is raised in
 * compiled code (the rethrow at a trace exit, LuaJIT issues #946, #1247), so
 * passing the budget raises nothing there: it arms a count hook, which
 * raises "lua_memory exceeded" at the next interpreted instruction, and
 * makes the collector finish a cycle at once, whose atomic phase cannot run
 * on a trace: compiled code exits to the interpreter within a few
 * allocations. Only an allocation past twice the budget is refused outright
 * (a memory error where it happens). */
typedef struct {
    lua_State *L;       /* the VM's main thread: hooks and GC tuning are per VM */
    size_t used;        /* bytes the VM holds */
    size_t limit;       /* bytes; checked only while armed */
    int armed;          /* protected calls running: only there can an error be caught */
    int over;           /* the budget was passed since the outermost call began */
    int hooked;         /* our count hook is set; saved_* is what it replaced */
    int pause, stepmul; /* the collector's settings, while over (else -1) */
    lua_Hook saved_hook;
    int saved_mask, saved_count;
} budget_t;

static void unhook(budget_t *b)
{
    if (!b->hooked)
        return;
    b->hooked = 0;
    lua_sethook(b->L, b->saved_hook, b->saved_mask, b->saved_count);
}

/* The count hook armed by over_budget(): raises in interpreted code only. */
static void on_memory(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    void *ud = NULL;
    lua_getallocf(L, &ud);
    budget_t *b = ud;
    luaL_where(L, 0); /* still hooked: these allocations do not arm it again */
    lua_pushfstring(L, "lua_memory exceeded: the VM would hold more than %d MiB (settings.lua_memory)",
                    (int)(b->limit >> 20));
    lua_concat(L, 2);
    unhook(b);
    lua_error(L);
}

/* Safe inside the allocator: lua_sethook may be called at any time, and these
 * lua_gc calls only store settings (no allocation, no collection). */
static void over_budget(budget_t *b)
{
    b->over = 1;
    if (b->hooked)
        return;
    b->saved_hook = lua_gethook(b->L);
    b->saved_mask = lua_gethookmask(b->L);
    b->saved_count = lua_gethookcount(b->L);
    b->hooked = 1;
    lua_sethook(b->L, on_memory, LUA_MASKCOUNT, 1);
    if (b->pause < 0) {
        b->pause = lua_gc(b->L, LUA_GCSETPAUSE, 1);
        b->stepmul = lua_gc(b->L, LUA_GCSETSTEPMUL, 100000);
    }
    lua_gc(b->L, LUA_GCRESTART, 0); /* a step at the next check */
}

/* lua_Alloc. Frees and shrinks always succeed (LuaJIT cannot fail them), and
 * outside mp_vm_call nothing is checked: C that pushes values outside a
 * protected call must never reach the panic function. */
static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    budget_t *b = ud;
    if (nsize == 0) {
        free(ptr);
        b->used -= osize;
        return NULL;
    }
    if (nsize > osize && b->armed) {
        size_t after = b->used - osize + nsize;
        if (after > b->limit && after - b->limit > b->limit) {
            over_budget(b);
            return NULL;
        }
        if (after > b->limit)
            over_budget(b);
    }
    void *p = realloc(ptr, nsize);
    if (p)
        b->used = b->used - osize + nsize;
    return p;
}

static budget_t *budget_of(lua_State *L)
{
    void *ud = NULL;
    return lua_getallocf(L, &ud) == vm_alloc ? ud : NULL;
}

void mp_vm_overran(lua_State *L, double hook_timeout)
{
    lua_pushfstring(L, "stopped: the hook ran longer than hook_timeout (%fs)", hook_timeout);
    lua_error(L);
    __builtin_unreachable(); /* lua_error does not return */
}

void mp_vm_rehook(lua_State *L)
{
    budget_t *b = budget_of(L);
    if (b && b->hooked)
        lua_sethook(L, on_memory, LUA_MASKCOUNT, 1);
    else
        lua_sethook(L, NULL, 0, 0);
}

static int on_panic(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "moonproxy: unprotected error in call to Lua API (%s)\n", msg ? msg : "?");
    return 0;
}

lua_State *mp_vm_new(void)
{
    budget_t *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->limit = MP_VM_MEMORY_DEFAULT;
    b->pause = b->stepmul = -1;
    /* a custom allocator needs a GC64 LuaJIT on x86-64 (else NULL) */
    lua_State *L = b->L = lua_newstate(vm_alloc, b);
    if (!L) {
        free(b);
        return NULL;
    }
    lua_atpanic(L, on_panic);
    if (lua_cpcall(L, vm_setup, (void *)mp_vm_lua_dir()) != 0) {
        mp_vm_close(L);
        return NULL;
    }
    return L;
}

void mp_vm_close(lua_State *L)
{
    if (!L)
        return;
    budget_t *b = budget_of(L);
    lua_close(L);
    free(b);
}

void mp_vm_preload(lua_State *L, const char *name, int (*open)(lua_State *L))
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}

size_t mp_vm_memory(lua_State *L)
{
    budget_t *b = budget_of(L);
    return b ? b->used : (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024;
}

static int collect_full(lua_State *L)
{
    lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}

/* A full collection from C, outside mp_vm_call: it runs finalizers (a
 * userdata's __gc, ffi.gc), and one that raises would reach the panic
 * function and end the process. Protected, a failed finalizer is logged and
 * the collection goes on (bounded: a retry runs the finalizers still due). */
static void collect(lua_State *L)
{
    static mp_log_limit_t lim;
    for (int i = 0; i < 8 && lua_cpcall(L, collect_full, NULL) != 0; i++) {
        const char *msg = lua_tostring(L, -1);
        mp_log_limited(&lim, MP_LOG_ERROR, "a finalizer (__gc) failed during a collection: %s", msg ? msg : "?");
        lua_pop(L, 1);
    }
}

int mp_vm_set_memory(lua_State *L, size_t limit)
{
    budget_t *b = budget_of(L);
    if (!b)
        return 0; /* a VM not made by mp_vm_new (the specs' own) has no budget */
    if (b->used > limit) {
        int armed = b->armed;
        b->armed = 0; /* the collector may grow the string table */
        collect(L);
        b->armed = armed;
    }
    if (b->used > limit)
        return MP_ENOMEM;
    b->limit = limit;
    return 0;
}

/* After a call that passed the budget: the hook and the collector's
 * settings are put back, a full collection gives the memory back, and glibc
 * returns the freed pages to the system. */
static void give_back(lua_State *L, budget_t *b)
{
    unhook(b);
    if (b->pause >= 0) {
        lua_gc(L, LUA_GCSETPAUSE, b->pause);
        lua_gc(L, LUA_GCSETSTEPMUL, b->stepmul);
        b->pause = b->stepmul = -1;
    }
    collect(L);
    b->over = 0;
#ifdef __GLIBC__
    malloc_trim(0);
#endif
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

/* What a call that raised leaves for its caller: the message (or the
 * budget's, when the call passed it) in err; the budget given back. */
static void call_failed(lua_State *L, budget_t *b, int over, const char *msg, size_t len, char *err, size_t errlen)
{
    if (over && (!msg || !strstr(msg, "lua_memory exceeded")) && err && errlen)
        snprintf(err, errlen, "lua_memory exceeded: the VM would hold more than %d MiB (settings.lua_memory)",
                 (int)(b->limit >> 20));
    else if (msg)
        copy_error(msg, len, err, errlen);
    else
        copy_error("(error object is not a string)", 30, err, errlen);
    if (over)
        give_back(L, b);
}

int mp_vm_resume(lua_State *L, lua_State *co, int co_ref, int nargs, char *err, size_t errlen)
{
    budget_t *b = budget_of(L);
    if (b)
        b->armed++;
    int rc = lua_resume(co, nargs);
    int over = b && --b->armed == 0 && b->over;
    if (rc == 0 || rc == LUA_YIELD) {
        if (over)
            give_back(L, b);
        return rc == 0 ? 0 : MP_EAGAIN;
    }
    /* co is dead but its frames are still there: the traceback is co's */
    const char *msg = lua_tostring(co, -1);
    if (!msg)
        msg = "(error object is not a string)";
    luaL_traceback(L, co, msg, 0);
    /* what the dead coroutine's frames hold is garbage before the budget's
     * collection runs */
    lua_settop(co, 0);
    luaL_unref(L, LUA_REGISTRYINDEX, co_ref);
    size_t len = 0;
    msg = lua_tolstring(L, -1, &len);
    call_failed(L, b, over, msg, len, err, errlen);
    lua_pop(L, 1);
    return MP_EINVAL;
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
    budget_t *b = budget_of(L);
    if (b)
        b->armed++;
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    int over = b && --b->armed == 0 && b->over;
    if (rc == 0) {
        if (over) /* the script caught the error, or ended before the hook ran */
            give_back(L, b);
        return 0;
    }
    size_t len = 0;
    const char *msg = lua_tolstring(L, -1, &len);
    call_failed(L, b, over, msg, len, err, errlen);
    lua_pop(L, 1);
    return MP_EINVAL;
}
