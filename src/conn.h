/* conn.h: a client connection: its socket, buffers and timer, and the
 * request state machine (head, proxying, local response, keep-alive,
 * close) around the request it is serving (req.h). */
#ifndef MP_CONN_H
#define MP_CONN_H

#include "buf.h"
#include "common.h"
#include "io.h"
#include "req.h"
#include "worker.h"

#include <ev.h>
#include <netinet/in.h>

enum mp_conn_state {
    MP_CS_IDLE,  /* keep-alive, no request bytes yet */
    MP_CS_HEAD,  /* receiving a request head */
    MP_CS_PROXY, /* the exchange (upstream.c) drives the socket */
    MP_CS_LOCAL, /* writing a response made here (error, 404) */
};

struct mp_conn {
    mp_worker_t *w;
    mp_io_t sock;  /* the client socket (ev_io watches sock.fd) */
    uint8_t state; /* mp_conn_state */
    uint8_t closed;
    uint8_t read_eof; /* the client half-closed or vanished */
    ev_io io;
    ev_timer timer;
    mp_buf_t in;                      /* client bytes; a request's head pinned at the front */
    mp_buf_t out;                     /* response head or local response to write */
    size_t scanned;                   /* parser resume point for the head in progress */
    mp_req_t *req;                    /* NULL between requests */
    struct sockaddr_in6 peer;         /* v4 peers stored v4-mapped */
    unsigned requests;                /* served on this connection */
    mp_conn_t *prev, *next;           /* worker->conns, or worker->graveyard */
    mp_conn_t *idle_prev, *idle_next; /* worker's idle LRU while MP_CS_IDLE (prev: newer) */
};

/* Takes ownership of an accepted, non-blocking fd. */
void mp_conn_accept(mp_worker_t *w, int fd, const struct sockaddr *peer);

/* Sets the events the client watcher waits for (EV_READ | EV_WRITE). */
void mp_conn_want(mp_conn_t *c, int events);

/* Arms the connection timer for `seconds` (ev_timer_again); 0 stops it. */
void mp_conn_timer(mp_conn_t *c, double seconds);

/* The exchange finished: the response was fully written. Logs the request,
 * then serves the next pipelined one, idles, or closes. */
void mp_conn_request_done(mp_conn_t *c);

/* Answers the current request with a response made here (status, a short
 * text body) when nothing of a response was sent yet; otherwise closes. The
 * connection closes after it unless the request can be cleanly followed. */
void mp_conn_fail(mp_conn_t *c, int status);

/* Answers the current request with what a hook gave req:respond. */
void mp_conn_respond(mp_conn_t *c);

/* Closes the client connection (and cancels its exchange). Memory is freed
 * before the worker's next poll, so a caller's pointers stay valid until it
 * returns to the loop. */
void mp_conn_close(mp_conn_t *c);

/* At max_connections: closes the worker's oldest idle keep-alive connection
 * (no request in progress; RFC 9112 §9.6 lets a server close those at any
 * time) to make room for a new one; one with request bytes the kernel holds
 * unread is skipped (at most 8 looked at). Returns 1 when one was closed, 0
 * when none is idle. O(1). */
int mp_conn_reclaim_idle(mp_worker_t *w);

/* Frees closed connections; called by the worker before each poll. */
void mp_conn_reap(mp_worker_t *w);

/* Graceful stop: close idle connections, let busy ones finish. */
void mp_conn_drain(mp_worker_t *w);

#endif
