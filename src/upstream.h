/* upstream.h: one proxied exchange: pick a server, take a pooled connection
 * or connect, send the request head and stream the body (client → upstream),
 * parse the response head and stream the body back (upstream → client),
 * with back-pressure both ways, timeouts and retries. It reports to the
 * client connection that runs it through the callbacks it was given
 * (mp_exchange_ops_t), and sees of that connection only its client side. */
#ifndef MP_UPSTREAM_H
#define MP_UPSTREAM_H

#include "buf.h"
#include "ctx.h"
#include "io.h"
#include "req.h"

/* What the exchange tells the client connection; arg is mp_upstream_start's.
 * A close frees the connection later (before the worker's next poll), so
 * the exchange's pointers stay valid until it returns to the loop. */
typedef struct {
    void (*done)(void *arg);                  /* the response was fully written: log, keep-alive or close */
    void (*fail)(void *arg, int status);      /* answer with status if nothing was sent yet, else close */
    void (*abort)(void *arg);                 /* close the client connection (and cancel the exchange) */
    void (*want)(void *arg, int events);      /* the events the client watcher waits for (EV_READ | EV_WRITE) */
    void (*timer)(void *arg, double seconds); /* arms the client's timer (ev_timer_again); 0 stops it */
    /* The 101 that opens a tunnel was written: take the upstream socket and
     * the bytes read after its head (tunnel.h); the exchange is over. */
    void (*upgrade)(void *arg, mp_io_t *sock, mp_buf_t *in);
} mp_exchange_ops_t;

/* What the exchange reads and writes of the client connection: part of it
 * (mp_conn_t.side), reached through r->client without the connection's
 * type. */
typedef struct mp_client_side {
    mp_io_ctx_t *ctx;             /* the thread's I/O context (ctx.h) */
    mp_io_t sock;                 /* the client socket: body bytes read, response written */
    uint8_t closed;               /* closed: nothing more is done for it */
    uint8_t read_eof;             /* the client half-closed or vanished */
    mp_buf_t in;                  /* client bytes; a request's head pinned at the front, then its body */
    mp_buf_t out;                 /* response head (or 100 Continue, a local response) to write */
    mp_req_t *req;                /* the request being served; NULL between requests */
    const mp_exchange_ops_t *ops; /* how the exchange reports (set by mp_upstream_start) */
    void *arg;                    /* their argument */
} mp_client_side_t;

/* The client side of the connection serving r. */
static inline mp_client_side_t *mp_client_side(mp_req_t *r)
{
    return r->client;
}

/* Starts forwarding r (routed to r->upstream). Ends in ops->done, or
 * ops->fail / ops->abort, called with arg. */
void mp_upstream_start(mp_req_t *r, const mp_exchange_ops_t *ops, void *arg);

/* The client socket became readable/writable while r is being proxied. */
void mp_upstream_on_client(mp_req_t *r, int revents);

/* The client connection's timer fired while r is being proxied. */
void mp_upstream_on_client_timeout(mp_req_t *r);

/* Drops r's upstream connection, if any (never pooled): the client went
 * away or the request failed. */
void mp_upstream_cancel(mp_req_t *r);

/* The response hooks that waited (for a call-out) on the upstream's head
 * ended with rc (MP_HOOK_*): the response goes on. */
void mp_upstream_hooked(mp_req_t *r, int rc);

#endif
