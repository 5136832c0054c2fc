/* l_core.c: luaopen for moonproxy.core; only the module build links it. */
#include "l_core.h"

#include <lauxlib.h>
#include <lua.h>

const char mp_responded_tag = 1;

int luaopen_moonproxy_core(lua_State *L)
{
    lua_newtable(L);
    lua_pushlightuserdata(L, MP_RESPONDED);
    lua_setfield(L, -2, "RESPONDED");
    /* weak while the parts are being written; see l_core.h */
    if (mp_l_http1_register)
        mp_l_http1_register(L);
    if (mp_l_router_register)
        mp_l_router_register(L);
    if (mp_l_config_register)
        mp_l_config_register(L);
    if (mp_l_shared_register)
        mp_l_shared_register(L);
    if (mp_l_balance_register)
        mp_l_balance_register(L);
    if (mp_l_sim_register)
        mp_l_sim_register(L);
    if (mp_l_path_register)
        mp_l_path_register(L);
    return 1;
}
