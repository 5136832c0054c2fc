/* l_core.h: the Lua C module moonproxy.core (the offline core for
 * moonproxy.testing and the specs). Each l_*.c adds its functions. */
#ifndef MP_L_CORE_H
#define MP_L_CORE_H

#include "config.h"

typedef struct lua_State lua_State;

/* Each adds its functions to the table on top of the stack. */
void mp_l_http1_register(lua_State *L) __attribute__((weak));
void mp_l_router_register(lua_State *L) __attribute__((weak));
void mp_l_config_register(lua_State *L) __attribute__((weak));
void mp_l_shared_register(lua_State *L) __attribute__((weak));
void mp_l_balance_register(lua_State *L) __attribute__((weak));
void mp_l_sim_register(lua_State *L) __attribute__((weak));
void mp_l_path_register(lua_State *L) __attribute__((weak));

/* Pushes a configuration as plain Lua data (core.load_config's summary). */
void mp_l_push_config(lua_State *L, const mp_config_t *cfg);

/* luaopen for moonproxy.core; the server preloads it in every VM. */
int luaopen_moonproxy_core(lua_State *L);

/* What req:respond returns: hook chains stop on it (core.RESPONDED). */
extern const char mp_responded_tag;
#define MP_RESPONDED ((void *)&mp_responded_tag)

#endif
