/* gen.c: the request layer's part of a generation (gen.h): balancers, the
 * route_stats cache and the hook metatables, made and freed without a worker
 * (the server's worker.c and the simulator both use it). */
#include "gen.h"

#include "balancer.h"
#include "config.h"
#include "l_request.h"
#include "router.h"

#include <stdlib.h>

int mp_gen_prepare(mp_gen_t *g, uint64_t seed)
{
    if (!(g->balancers = mp_balancers_new(g->L, g->cfg, seed)))
        return MP_ENOMEM;
    size_t nroutes = mp_router_count(g->cfg->router);
    g->route_stats = nroutes ? calloc(nroutes, sizeof(*g->route_stats)) : NULL;
    mp_l_request_setup(g->L, g->lua_mt);
    g->state = MP_GEN_PREPARED;
    return 0;
}

void mp_gen_release(mp_gen_t *g)
{
    if (g->balancers)
        mp_balancers_free(g->balancers, g->cfg->nupstreams);
    free(g->route_stats);
    g->balancers = NULL;
    g->route_stats = NULL;
}
