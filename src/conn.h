/* conn.h: a client connection: its socket, buffers and timer, the request
 * state machine (head, proxying, local response, keep-alive, close) and the
 * request it is serving. */
#ifndef MP_CONN_H
#define MP_CONN_H

#include "buf.h"
#include "common.h"
#include "headers.h"
#include "http1.h"
#include "reframe.h"
#include "router.h"
#include "worker.h"

#include <ev.h>
#include <netinet/in.h>

enum mp_conn_state {
    MP_CS_IDLE,  /* keep-alive, no request bytes yet */
    MP_CS_HEAD,  /* receiving a request head */
    MP_CS_PROXY, /* the exchange (upstream.c) drives the socket */
    MP_CS_LOCAL, /* writing a response made here (error, 404) */
};

enum mp_phase { MP_PHASE_REQUEST, MP_PHASE_RESPONSE, MP_PHASE_LOG, MP_PHASE_DONE };

enum mp_body_kind { MP_BODY_NONE, MP_BODY_LENGTH, MP_BODY_CHUNKED, MP_BODY_CLOSE };

/* mp_framing_t (a body being relayed) is in reframe.h. */

/* A response made here. */
typedef struct {
    mp_slice body;  /* respond()'s body (in the request), or text */
    char text[64];  /* an error's body: "404 Not Found\n" */
} mp_local_t;

/* One request, from its head to the end of its response. Lives in the
 * worker while the connection serves it; the head's slices point into
 * conn->in, which stays pinned at [0, head_len) until the request ends. */
typedef struct mp_req {
    mp_conn_t *conn;
    mp_gen_t *gen;            /* the configuration generation it runs on (pinned) */
    mp_upconn_t *up;          /* the upstream connection in use, or NULL */
    mp_http_request_t h;      /* parsed head */
    mp_route_match_t match;
    int upstream;             /* index in cfg->upstreams, -1 */
    int server;               /* index in the upstream's servers, -1 */
    int tries;                /* connection attempts that counted against retries */
    mp_framing_t body;        /* request body, client → upstream */
    mp_framing_t resp;        /* response body, upstream → client */
    uint32_t body_start;      /* offset in conn->in where the request body begins */
    uint32_t body_ready;      /* conn->in [in.start, body_ready): body bytes to forward (chunked: decoded) */
    uint32_t resp_scan;       /* up->in: response bytes whose framing was checked */
    uint32_t resp_ready;      /* up->in [in.start, resp_ready): body bytes to send the client */
    int status;               /* response status sent (or to send) to the client */
    uint64_t bytes_sent;      /* to the client, head included */
    ev_tstamp t_start, t_up_start, t_up_end;
    mp_slice path;            /* what the upstream gets: the received path, stripped or rewritten */
    mp_slice query;           /* likewise; valid when has_query */
    /* Hooks (l_request.c): the Lua objects, and what hooks changed. */
    struct mp_lbox *lbox;     /* the Lua slot of its hook objects (l_request.c), or NULL */
    mp_buf_t arena;           /* strings and edits written by hooks */
    mp_hedit_t *edits;        /* request header edits, newest first */
    mp_hedit_t *resp_edits;   /* response header edits (and respond()'s headers) */
    const mp_http_response_t *rh; /* the upstream's response head, during response hooks */
    mp_slice match_path;      /* the path the router matched (regex captures index it) */
    mp_slice client_path;     /* the received path once normalised: what the client asked for */
    mp_local_t local;         /* a response made here (an error's text stays here while it is sent) */
    const char *local_out;    /* body of a local response still to write after c->out */
    size_t local_out_len;
    char *local_body;         /* respond()'s body (malloc'd) */
    size_t local_body_len;
    uint16_t local_status;    /* respond()'s status; 0 when no hook responded */
    uint16_t resp_status;     /* response status as hooks set it; 0: the upstream's */
    uint8_t phase;            /* mp_phase: what hooks may do now */
    uint16_t retry_after;     /* a 503 from the proxy: seconds for Retry-After (0: none) */
    struct mp_peer *peer;     /* the server of the current attempt (health.h), or NULL */
    double attempt_start;     /* when the current attempt began (ev_time) */
    unsigned peer_trial : 1;  /* the attempt is a half-open circuit's trial */
    unsigned peer_reported : 1; /* its outcome was reported */
    char id[129];             /* X-Request-ID sent upstream and echoed */
    uint8_t id_len;
    char client_ip[46];
    unsigned keepalive : 1;      /* keep the client connection after this response */
    unsigned is_head : 1;        /* HEAD request */
    unsigned trusted_peer : 1;   /* the peer is one of trusted_proxies */
    unsigned body_replayable : 1; /* every body byte is still in conn->in */
    unsigned head_sent : 1;      /* the upstream request head was written */
    unsigned resp_started : 1;   /* a response byte reached the client */
    unsigned resp_head_done : 1; /* the upstream response head was parsed */
    unsigned dechunk : 1;        /* HTTP/1.0 client: strip chunked framing */
    unsigned sent_continue : 1;  /* 100 Continue was sent to the client */
    unsigned up_reusable : 1;    /* the upstream connection may go back to the pool */
    unsigned body_abandoned : 1; /* the upstream answered before the whole body; stop sending it */
    unsigned has_query : 1;      /* query is present ('?' was there) */
    unsigned hook_failed : 1;    /* a hook raised: no more hooks for this request */
    unsigned has_file : 1;       /* file_fd is open: a static response's body (closed at request end) */
    int file_fd;
    uint64_t file_off, file_left; /* bytes of the file sent, still to send */
} mp_req_t;

struct mp_conn {
    mp_worker_t *w;
    int fd;
    uint8_t state;     /* mp_conn_state */
    uint8_t closed;
    uint8_t read_eof;  /* the client half-closed or vanished */
    uint16_t refs;
    ev_io io;
    ev_timer timer;
    mp_buf_t in;       /* client bytes; a request's head pinned at the front */
    mp_buf_t out;      /* response head or local response to write */
    size_t scanned;    /* parser resume point for the head in progress */
    mp_req_t *req;     /* NULL between requests */
    struct sockaddr_in6 peer; /* v4 peers stored v4-mapped */
    unsigned requests; /* served on this connection */
    mp_conn_t *prev, *next; /* worker->conns, or worker->graveyard */
    mp_conn_t *idle_prev, *idle_next; /* worker's idle LRU while MP_CS_IDLE (prev: newer) */
};

/* What a request's head decides (mp_req_decide): go upstream, answer what a
 * hook answered with req:respond, serve a static route's file (static.h), or
 * (any other value) answer that status. */
enum { MP_DECIDE_UPSTREAM = 0, MP_DECIDE_RESPONDED = 1, MP_DECIDE_STATIC = 2 };

/* Runs everything between a parsed head and the exchange: the request id,
 * the client address, the body size limit, the global request hooks,
 * routing and the route's request hooks. Touches no socket, so the
 * simulator (sim.h) runs the very same decision. */
int mp_req_decide(mp_req_t *r);

/* Gives r its request id and client address if it has none yet (a head the
 * parser refused never reached mp_req_decide). */
void mp_req_identify(mp_req_t *r);

/* Runs the response hooks on the response made here for r (status: the
 * proxy's own error, or 0 for what req:respond gave), and appends its head
 * to b. Returns the status to send, or -1 when b has no room. */
int mp_local_response(mp_req_t *r, int status, mp_buf_t *b, mp_local_t *out);

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

/* The real client: the peer, or, from a trusted peer, the rightmost
 * X-Forwarded-For address that is not itself a trusted proxy (the leftmost
 * when all are). Borrowed from the request. */
mp_slice mp_req_remote_addr(const mp_req_t *r);

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

/* n bytes (8-aligned) from the request's arena, freed with the request; NULL
 * when no buffer block can be had (r->arena.data is then NULL) or the block
 * is full. */
static inline void *mp_req_arena(mp_req_t *r, size_t n)
{
    mp_buf_t *a = &r->arena;
    if (MP_UNLIKELY(!a->data) && mp_buf_acquire(a, &r->conn->w->bufs) != 0)
        return NULL;
    size_t at = (a->end + 7u) & ~(size_t)7u;
    if (at + n > a->cap)
        return NULL;
    a->end = (uint32_t)(at + n);
    return a->data + at;
}

#endif
