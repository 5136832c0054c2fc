/* conn.h: a client connection: its socket, buffers and timer, and the
 * request state machine (head, proxying, local response, keep-alive,
 * close) around the request it is serving (req.h). */
#ifndef MP_CONN_H
#define MP_CONN_H

#include "buf.h"
#include "common.h"
#include "ctx.h"
#include "req.h"
#include "upstream.h"

#include <ev.h>
#include <netinet/in.h>
#include <stddef.h>

enum mp_conn_state {
    MP_CS_IDLE,   /* keep-alive, no request bytes yet */
    MP_CS_HEAD,   /* receiving a request head */
    MP_CS_PROXY,  /* the exchange (upstream.c) drives the socket */
    MP_CS_LOCAL,  /* writing a response made here (error, 404) */
    MP_CS_LINGER, /* response sent; reading what the client still sends, then close */
    MP_CS_WAIT,   /* a hook waits for a call-out; the socket is watched for the client going away */
};

struct mp_conn {
    mp_client_side_t side; /* what upstream.c sees of it (r->client): ctx, socket, in, out, req, closed, read_eof */
    uint8_t state;         /* mp_conn_state */
    uint8_t want;          /* the events last asked for (conn_want), before the transport maps them */
    ev_io io;
    ev_timer timer;
    size_t scanned;                   /* parser resume point for the head in progress */
    struct sockaddr_in6 peer;         /* v4 peers stored v4-mapped */
    unsigned requests;                /* served on this connection */
    mp_conn_t *prev, *next;           /* ctx->conns, or ctx->graveyard */
    mp_conn_t *idle_prev, *idle_next; /* ctx's idle LRU while MP_CS_IDLE (prev: newer) */
    struct mp_conn_tls *tls;          /* what the TLS handshake told (req.tls); NULL when plain or before it */
    uint8_t resume;                   /* what goes on once waiting response hooks end (conn.c) */
    struct mp_static_file *file;      /* the static answer whose response hooks wait, or NULL */
};

/* Takes ownership of an accepted, non-blocking fd; over TLS when tls is
 * not NULL (the listener's, from the current configuration). */
void mp_conn_accept(mp_io_ctx_t *ctx, int fd, const struct sockaddr *peer, mp_tls_server_t *tls);

/* Closes the client connection (and cancels its exchange). Memory is freed
 * before the worker's next poll, so a caller's pointers stay valid until it
 * returns to the loop. */
void mp_conn_close(mp_conn_t *c);

/* At max_connections: closes the oldest idle keep-alive connection
 * (no request in progress; RFC 9112 §9.6 lets a server close those at any
 * time) to make room for a new one; one with request bytes the kernel holds
 * unread is skipped (at most 8 looked at). Returns 1 when one was closed, 0
 * when none is idle. O(1). */
int mp_conn_reclaim_idle(mp_io_ctx_t *ctx);

/* env->wake of the worker's requests (req.h): a hook that waited for a
 * call-out ended, and its request goes on. */
void mp_conn_hook_woke(mp_req_t *r, int kind, int rc);

/* Abandons the on_log hooks still waiting after their connection moved on
 * (gen: only those of that generation; NULL: all), as at worker stop. */
void mp_conn_abandon_orphans(mp_io_ctx_t *ctx, const mp_gen_t *gen);

/* Frees closed connections; called by the worker before each poll. */
void mp_conn_reap(mp_io_ctx_t *ctx);

/* Graceful stop: close idle connections, let busy ones finish. */
void mp_conn_drain(mp_io_ctx_t *ctx);

#endif
