/* l_redis.h: moonproxy.redis's C side (README "Redis"): a Redis call a hook
 * makes, on the worker's clients (redis.h), while the hook's coroutine
 * waits (l_request.h); the replies come back as Lua values. */
#ifndef MP_L_REDIS_H
#define MP_L_REDIS_H

#include "ctx.h"

typedef struct lua_State lua_State;

/* Makes require "moonproxy.rediscore" give the binding in L (a worker's VM:
 * the simulator's VMs answer Redis calls in Lua, through opts.redis). */
void mp_l_redis_preload(lua_State *L);

/* Closes the worker's Redis clients (worker end; no call may be pending). */
void mp_l_redis_dispose(mp_io_ctx_t *ctx);

#endif
