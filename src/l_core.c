/* l_core.c: moonproxy.core as every build has it (l_core.h): the parts,
 * listed here. */
#include "l_core.h"

#include <lua.h>

const char mp_responded_tag = 1;

int mp_l_core_open(lua_State *L)
{
    static void (*const setups[])(lua_State * L) = {mp_l_http1_setup, mp_l_router_setup, mp_l_shared_setup,
                                                    mp_l_balance_setup};
    static const luaL_Reg *const parts[] = {mp_l_http1_funcs,  mp_l_router_funcs,  mp_l_config_funcs,
                                            mp_l_shared_funcs, mp_l_balance_funcs, mp_l_path_funcs};
    lua_newtable(L);
    lua_pushlightuserdata(L, MP_RESPONDED);
    lua_setfield(L, -2, "RESPONDED");
    lua_pushlightuserdata(L, NULL); /* a nil inside a list (Redis replies), as cjson.null */
    lua_setfield(L, -2, "null");
    for (size_t i = 0; i < MP_ARRAY_LEN(setups); i++)
        setups[i](L);
    for (size_t i = 0; i < MP_ARRAY_LEN(parts); i++)
        luaL_register(L, NULL, parts[i]);
    return 1;
}
