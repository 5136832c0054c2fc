/* l_core.h: the Lua C module moonproxy.core (the offline core for
 * moonproxy.testing and the specs). Each l_*.c adds its functions. */
#ifndef MP_L_CORE_H
#define MP_L_CORE_H

typedef struct lua_State lua_State;

/* Each adds its functions to the table on top of the stack. */
void mp_l_http1_register(lua_State *L) __attribute__((weak));
void mp_l_router_register(lua_State *L) __attribute__((weak));
void mp_l_config_register(lua_State *L) __attribute__((weak));
void mp_l_shared_register(lua_State *L) __attribute__((weak));
void mp_l_balance_register(lua_State *L) __attribute__((weak));

/* luaopen for moonproxy.core; the server preloads it in every VM. */
int luaopen_moonproxy_core(lua_State *L);

/* What req:respond returns: hook chains stop on it (core.RESPONDED). */
extern const char mp_responded_tag;
#define MP_RESPONDED ((void *)&mp_responded_tag)

#endif
