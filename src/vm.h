/* vm.h: lua_State life: create a VM with moonproxy's Lua modules on its
 * path, and the one place that calls into Lua (protected, with traceback). */
#ifndef MP_VM_H
#define MP_VM_H

#include "common.h"

typedef struct lua_State lua_State;

/* Where lua/ lives: $MOONPROXY_LUA_PATH, else next to the executable
 * (<exe dir>/../lua, <exe dir>/lua, <exe dir>/../share/lua/5.1), else
 * the compiled-in MP_LUA_DIR. */
const char *mp_vm_lua_dir(void);

/* A new VM with the standard libraries and package.path/cpath set so that
 * require "moonproxy" finds lua/moonproxy.lua. NULL on out of memory. */
lua_State *mp_vm_new(void);
void mp_vm_close(lua_State *L);

/* settings.lua_memory: a VM from mp_vm_new starts with this budget. */
#define MP_VM_MEMORY_DEFAULT ((size_t)256 << 20)

/* Sets the bytes L's allocator may hold (mp_vm_new's VMs; others: no-op).
 * Inside mp_vm_call, passing it raises "lua_memory exceeded" at the next
 * interpreted instruction (compiled code exits to the interpreter first, see
 * vm.c), and one allocation past twice it fails where it is made (a Lua
 * memory error). Outside a call nothing is checked, so C never meets an
 * unprotected error. Returns 0, or MP_ENOMEM (the old limit stays) when L
 * holds more than limit even after a full collection. */
int mp_vm_set_memory(lua_State *L, size_t limit);

/* For another count hook (the watchdog's) that replaced the VM's hooks and
 * found nothing to do: puts the budget's hook back while the budget is
 * passed (it must still raise), else clears the hooks. */
void mp_vm_rehook(lua_State *L);

/* Raises, in the hook running in L, the error that stops a hook that ran
 * longer than hook_timeout seconds: the worker's watchdog and the
 * simulator's budget (each with its own clock) say the same. */
void mp_vm_overran(lua_State *L, double hook_timeout) __attribute__((noreturn));

/* Makes require(name) in L open the module with open (package.preload). */
void mp_vm_preload(lua_State *L, const char *name, int (*open)(lua_State *L));

/* Bytes L's allocator holds now. */
size_t mp_vm_memory(lua_State *L);

/* lua_pcall with a traceback handler. On error returns MP_EINVAL, pops the
 * error and copies its message (first line: "file:line: message") into err.
 * When the call passed the VM's budget the message says "lua_memory
 * exceeded", and (error or not) a full collection gives the memory back. */
int mp_vm_call(lua_State *L, int nargs, int nresults, char *err, size_t errlen);

/* lua_resume of co, a coroutine of L's VM anchored at registry reference
 * co_ref, with nargs arguments on its stack (the function below them on
 * its first run), under the budget as mp_vm_call runs. Returns 0 when the
 * function returned (its results on co's stack), MP_EAGAIN when it
 * yielded, or MP_EINVAL when it raised: the message, with co's traceback,
 * is copied into err as mp_vm_call copies it, and co is let go (co_ref is
 * released), so that the collection after a passed budget frees what its
 * frames held. */
int mp_vm_resume(lua_State *L, lua_State *co, int co_ref, int nargs, char *err, size_t errlen);

#endif
