/* l_http.h: moonproxy.http's C side (SPEC "Calling out from hooks"): an
 * HTTP/1.1 request a hook makes, on the worker's loop, while the hook's
 * coroutine waits (l_request.h). To a named upstream it goes through that
 * upstream's balancer, pools, health and TLS settings; to a URL through a
 * small keep-alive pool per address. The answer is read whole, bounded by
 * max_body. */
#ifndef MP_L_HTTP_H
#define MP_L_HTTP_H

typedef struct lua_State lua_State;

/* Makes require "moonproxy.callout" give the binding in L (a worker's VM:
 * the simulator's VMs answer call-outs in Lua, through opts.http). */
void mp_l_http_preload(lua_State *L);

#endif
