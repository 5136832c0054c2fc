/* l_core.h: the Lua C module moonproxy.core (the offline core for
 * moonproxy.testing and the specs, and what the server preloads in every
 * VM). Each l_*.c is one part: a list of functions, and metatables it sets
 * up first where it has objects; l_core.c lists the parts every build has. */
#ifndef MP_L_CORE_H
#define MP_L_CORE_H

#include "config.h"

#include <lauxlib.h>

/* The parts: NULL-terminated function lists for the module table, and
 * their metatables, made once per state before the functions are set. */
extern const luaL_Reg mp_l_http1_funcs[];
extern const luaL_Reg mp_l_router_funcs[];
extern const luaL_Reg mp_l_config_funcs[];
extern const luaL_Reg mp_l_shared_funcs[];
extern const luaL_Reg mp_l_balance_funcs[];
extern const luaL_Reg mp_l_path_funcs[];
void mp_l_http1_setup(lua_State *L);
void mp_l_router_setup(lua_State *L);
void mp_l_shared_setup(lua_State *L);
void mp_l_balance_setup(lua_State *L);

/* Pushes the moonproxy.core table of the parts every build has (the
 * server's: vm.c preloads it). luaopen_moonproxy_core, the Lua module's
 * entry, is in l_sim.c, the module build's alone: this plus the simulator. */
int mp_l_core_open(lua_State *L);

/* Pushes a configuration as plain Lua data (core.load_config's summary). */
void mp_l_push_config(lua_State *L, const mp_config_t *cfg);

/* What req:respond returns: hook chains stop on it (core.RESPONDED). */
extern const char mp_responded_tag;
#define MP_RESPONDED ((void *)&mp_responded_tag)

#endif
