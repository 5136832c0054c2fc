/* tunnel.h: an upgraded connection (SPEC "WebSocket and other upgrades"):
 * bytes both ways between a client socket and an upstream socket, plain or
 * TLS on either side, with back-pressure (a direction holds at most one
 * buffer, and only while bytes wait for the other side), half-close passed
 * on, an idle timeout, and the worker's shutdown. It holds no request and no
 * configuration generation: what opened it hears once, through closed, when
 * it is over. */
#ifndef MP_TUNNEL_H
#define MP_TUNNEL_H

#include "buf.h"
#include "ctx.h"
#include "io.h"
#include "req.h"

typedef struct mp_tunnel mp_tunnel_t;

/* Called once when the tunnel closed (both sockets are closed by then),
 * with arg and what it moved; info lives until closed returns. */
typedef void (*mp_tunnel_closed_fn)(void *arg, const mp_tunnel_info_t *info);

/* Opens a tunnel between client and up, which it takes over (the callers'
 * structs are left closed: fd -1, no transport), with the bytes already
 * read from each (client_in: for the upstream, up_in: for the client; taken
 * over too, left empty). idle: seconds without a byte either way before it
 * closes. Counts as one of ctx's connections (nconns) until it closes.
 * Returns NULL when out of memory: then nothing was taken. */
mp_tunnel_t *mp_tunnel_open(mp_io_ctx_t *ctx, mp_io_t *client, mp_buf_t *client_in, mp_io_t *up, mp_buf_t *up_in,
                            double idle, mp_tunnel_closed_fn closed, void *arg);

/* The worker stops: every tunnel closes (reason "shutdown") at a moment
 * spread over [first, last] seconds from now, so that clients do not all
 * reconnect in one burst. */
void mp_tunnel_drain(mp_io_ctx_t *ctx, double first, double last);

/* Closes every tunnel now (reason "shutdown"): the worker ends. */
void mp_tunnel_close_all(mp_io_ctx_t *ctx);

#endif
