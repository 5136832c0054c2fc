/* req.h: a request, from its head to the end of its response, with no
 * socket: its framing, phases and what hooks changed (mp_req_t), and what it
 * needs from the thread that runs it (mp_req_env_t). The decisions taken on
 * it are in req.c; the server (conn.c, upstream.c) and the simulator
 * (sim.c) both run them. */
#ifndef MP_REQ_H
#define MP_REQ_H

#include "buf.h"
#include "common.h"
#include "config.h"
#include "gen.h"
#include "headers.h"
#include "http1.h"
#include "log.h"
#include "reframe.h"
#include "router.h"

#include <lauxlib.h> /* LUA_NOREF: no hook */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct mp_balancer_s mp_balancer_t;
struct mp_client_side;
struct mp_upconn;
struct mp_peer;
struct mp_lbox;
struct sockaddr;

/* A call a hook made (moonproxy.http, Redis) while its coroutine waits
 * (l_request.h: mp_hook_yield). start begins its I/O once the hook has
 * yielded (no Lua runs then): it returns 0 while the call is under way, to
 * be completed through mp_hook_resume, or 1 when it is already over (a
 * failure found at once). cancel frees it, stopping whatever is under way:
 * the request no longer wants the answer, or the hook took it. */
typedef struct mp_callout {
    int (*start)(struct mp_callout *c);
    void (*cancel)(struct mp_callout *c);
} mp_callout_t;

/* Which chain a request's suspended coroutine runs (r->hook_kind). */
enum mp_hook_kind { MP_HK_NONE, MP_HK_PRE, MP_HK_ROUTE, MP_HK_RESPONSE, MP_HK_LOG };

struct mp_req;

/* What a request needs from the thread that runs it, with no socket: a
 * worker embeds one (mp_worker_t.env), the simulator owns one. */
typedef struct mp_req_env {
    int id;                     /* worker id for log lines ("w0: "); -1: none (the simulator) */
    mp_bufpool_t *bufs;         /* the thread's buffer blocks */
    uint64_t rng[2];            /* request ids (mp_req_rand) */
    mp_http_limits_t limits;    /* for the request parser (mp_req_env_limits) */
    double (*clock)(void *arg); /* the loop time (ev_now); the simulator pins it */
    void *clock_arg;
    lua_State *_Atomic *hook_vm; /* the watchdog's view of a running hook (worker.h) */
    _Atomic double *hook_since;
    double date_at; /* second of the cached Date line */
    char date[40];  /* "Date: ...\r\n" */
    size_t date_len;
    /* A suspended hook chain of r, of kind (mp_hook_kind), finished with rc
     * (MP_HOOK_*; l_request.h): the request goes on from where it waited.
     * NULL: no hook may call out (the simulator answers call-outs in Lua). */
    void (*wake)(struct mp_req *r, int kind, int rc);
} mp_req_env_t;

/* The loop time of the thread running a request. */
static inline double mp_req_now(const mp_req_env_t *e)
{
    return e->clock(e->clock_arg);
}

/* 64 random bits from the env's generator. */
uint64_t mp_req_rand(mp_req_env_t *e);

/* The cached "Date: ...\r\n" line, refreshed at most once per second. */
mp_slice mp_req_date(mp_req_env_t *e);

/* The size of a thread's buffer blocks: a head of max_header_size and
 * body_buffer_size body bytes. */
size_t mp_req_block_size(size_t max_header_size, size_t body_buffer_size);

/* The parser's limits for the settings given; a head must leave room in a buffer
 * block (whose size was fixed when the thread started). */
void mp_req_env_limits(mp_req_env_t *e, size_t max_uri_size, size_t max_header_size);

enum mp_phase { MP_PHASE_REQUEST, MP_PHASE_RESPONSE, MP_PHASE_LOG, MP_PHASE_DONE };

enum mp_body_kind { MP_BODY_NONE, MP_BODY_LENGTH, MP_BODY_CHUNKED, MP_BODY_CLOSE };

/* mp_framing_t (a body being relayed) is in reframe.h. */

/* Why a tunnel closed (mp_tunnel_info_t.close): the side that ended it
 * first (its EOF or error), no byte for timeouts.tunnel, the worker's
 * shutdown, or our own failure (no buffer). */
enum mp_tunnel_close { MP_TC_CLIENT, MP_TC_UPSTREAM, MP_TC_IDLE, MP_TC_SHUTDOWN, MP_TC_ERROR, MP_TC_REASONS };

/* What on_log and the access log see of a tunnel (req.tunnel): the bytes
 * relayed each way after the 101's head, why it closed, and what the
 * request that opened it was routed to (its generation may be gone). */
typedef struct {
    uint64_t to_upstream, to_client;
    uint8_t close;      /* mp_tunnel_close */
    const char *route;  /* the route's name, or NULL */
    const char *server; /* the upstream server's address */
} mp_tunnel_info_t;

/* The name of a close reason: "client", "upstream", "idle", "shutdown", "error". */
const char *mp_tunnel_close_name(int close);

/* A response made here. */
typedef struct {
    mp_slice body; /* respond()'s body (in the request), or text */
    char text[64]; /* an error's body: "404 Not Found\n" */
} mp_local_t;

/* One request, from its head to the end of its response. Lives in the
 * worker while the connection serves it (or in the simulator); the head's
 * slices point into client->in (sim: its copy of the bytes), which stays pinned
 * at [0, head_len) until the request ends. */
typedef struct mp_req {
    struct mp_client_side *client; /* the client side of its connection (upstream.h: only L3 code looks in), or NULL */
    mp_req_env_t *env;             /* the thread running it: buffers, rng, limits, clock, log prefix */
    const struct sockaddr *client_addr; /* the peer (v4, or v6 which may be v4-mapped); lives as long as r */
    const mp_tls_info_t *tls;           /* the client's TLS session (req.tls, scheme https), NULL when plain */
    mp_gen_t *gen;                      /* the configuration generation it runs on (pinned) */
    struct mp_upconn *up;               /* the upstream connection in use, or NULL */
    mp_http_request_t h;                /* parsed head */
    /* W3C Trace Context (req.c): the trace the request is part of, and the
     * proxy's span in it, as lowercase hex ("" until decided; not zeroed
     * whole by mp_req_reset); the upstream gets traceparent. */
    char trace_id[33];
    char span_id[17];
    char trace_flags[3]; /* "01": sampled, "00": not */
    mp_route_match_t match;
    int upstream;        /* index in cfg->upstreams, -1 */
    int server;          /* index in the upstream's servers, -1 */
    int tries;           /* connection attempts that counted against retries */
    mp_framing_t body;   /* request body, client → upstream */
    mp_framing_t resp;   /* response body, upstream → client */
    uint32_t body_start; /* offset in client->in where the request body begins */
    uint32_t body_ready; /* client->in [in.start, body_ready): body bytes to forward (chunked: decoded) */
    uint32_t resp_scan;  /* up->in: response bytes whose framing was checked */
    uint32_t resp_ready; /* up->in [in.start, resp_ready): body bytes to send the client */
    int status;          /* response status sent (or to send) to the client */
    uint64_t bytes_sent; /* to the client, head included */
    double t_start, t_up_start, t_up_end; /* loop time */
    mp_slice path;                        /* what the upstream gets: the received path, stripped or rewritten */
    mp_slice query;                       /* likewise; valid when has_query */
    /* Hooks (l_request.c): the Lua objects, and what hooks changed. */
    struct mp_lbox *lbox;         /* the Lua slot of its hook objects (l_request.c), or NULL */
    mp_buf_t arena;               /* strings and edits written by hooks */
    mp_hedit_t *edits;            /* request header edits, newest first */
    mp_hedit_t *resp_edits;       /* response header edits (and respond()'s headers) */
    const mp_http_response_t *rh; /* the upstream's response head, during response hooks */
    mp_slice match_path;          /* the path the router matched (regex captures index it) */
    mp_slice client_path;         /* the received path once normalised: what the client asked for */
    mp_local_t local;             /* a response made here (an error's text stays here while it is sent) */
    const char *local_out;        /* body of a local response still to write after c->out */
    size_t local_out_len;
    char *local_body; /* respond()'s body (malloc'd) */
    size_t local_body_len;
    uint16_t local_status;      /* respond()'s status; 0 when no hook responded */
    uint16_t local_asked;       /* the status mp_local_response was asked for (0: respond()'s) */
    uint16_t resp_status;       /* response status as hooks set it; 0: the upstream's */
    uint8_t phase;              /* mp_phase: what hooks may do now */
    uint16_t retry_after;       /* a 503 from the proxy: seconds for Retry-After (0: none) */
    struct mp_peer *peer;       /* the server of the current attempt (health.h), or NULL */
    double attempt_start;       /* when the current attempt began (ev_time) */
    unsigned peer_trial : 1;    /* the attempt is a half-open circuit's trial */
    unsigned peer_reported : 1; /* its outcome was reported */
    char id[129];               /* X-Request-ID sent upstream and echoed */
    uint8_t id_len;
    char client_ip[46];
    unsigned keepalive : 1;       /* keep the client connection after this response */
    unsigned is_head : 1;         /* HEAD request */
    unsigned trusted_peer : 1;    /* the peer is one of trusted_proxies */
    unsigned body_replayable : 1; /* every body byte is still in client->in */
    unsigned head_sent : 1;       /* the upstream request head was written */
    unsigned resp_started : 1;    /* a response byte reached the client */
    unsigned resp_head_done : 1;  /* the upstream response head was parsed */
    unsigned dechunk : 1;         /* HTTP/1.0 client: strip chunked framing */
    unsigned sent_continue : 1;   /* 100 Continue was sent to the client */
    unsigned up_reusable : 1;     /* the upstream connection may go back to the pool */
    unsigned body_abandoned : 1;  /* the upstream answered before the whole body; stop sending it */
    unsigned has_query : 1;       /* query is present ('?' was there) */
    unsigned hook_failed : 1;     /* a hook raised: no more hooks for this request */
    unsigned has_file : 1;        /* file_fd is open: a static response's body (closed at request end) */
    unsigned upgrade : 1;         /* a WebSocket handshake (req.c's gate): forwarded with Upgrade and
                                     Connection; a 101 naming websocket opens a tunnel (tunnel.c) */
    unsigned tunnel_open : 1;     /* its 101 opens a tunnel once the head is written (upstream.c) */
    uint8_t hook_kind;            /* mp_hook_kind: the chain r->co runs while it waits */
    int handler_up;               /* a handler's returned upstream once its chain finished (-1: none) */
    lua_State *co;                /* the coroutine of the hook chain running or suspended, or NULL */
    int co_ref;                   /* its registry reference */
    mp_callout_t *callout;        /* the call-out the hook waits for (or whose answer it has not taken) */
    mp_http_response_t *rh_held;  /* the upstream's response head, kept while response hooks wait (upstream.c) */
    struct mp_req *prev, *next;   /* the worker's requests whose on_log waits after their connection moved on */
    /* a tunnel's request, made when it closed (conn.c): what it relayed; NULL for any other */
    const mp_tunnel_info_t *tunnel;
    const char *upgrade_why;      /* an Upgrade the gate did not forward: why (static text; the simulator's trace) */
    unsigned trace_continued : 1; /* a trusted client's traceparent was valid: its tracestate goes on too */
    /* A close-delimited response to an HTTP/1.1 client is sent chunked
     * (upstream.c): each run of bytes read becomes one chunk. */
    unsigned rechunk : 1;   /* this response is */
    unsigned chunk_end : 1; /* the last chunk ("0" CRLF CRLF) was queued */
    uint8_t chunk_hdr_len;  /* the current chunk's size line in chunk_hdr */
    uint8_t chunk_hdr_off;  /*   and how much of it went out */
    uint8_t chunk_tail;     /* bytes of the CRLF after its data (or of the last chunk) still to go */
    uint8_t interims;       /* 1xx heads the upstream sent before its final one */
    char chunk_hdr[20];
    uint64_t chunk_left; /* data bytes of the current chunk still to go */
    int file_fd;
    uint64_t file_off, file_left; /* bytes of the file sent, still to send */
    /* Response compression (mp_req_compress decides; upstream.c encodes). */
    uint8_t enc;              /* MP_ENC_* the response is sent in (0: as it came) */
    unsigned zflush : 1;      /* input went in since the encoder's last complete flush */
    unsigned zdone : 1;       /* the encoder's stream is finished */
    const char *enc_why;      /* why not compressed (static text), or NULL: the route does not compress */
    struct mp_compress *zenc; /* the encoder (compress.h; owned, freed by mp_upstream_cancel) */
    mp_buf_t zout;            /* its output not yet sent (a block from the worker's pool) */
} mp_req_t;

/* What a request's head decides (mp_req_decide): go upstream, answer what a
 * hook answered with req:respond, serve a static route's file (static.h),
 * wait for a hook's call-out (mp_req_decide_resume goes on), or (any other
 * value) answer that status. */
enum { MP_DECIDE_UPSTREAM = 0, MP_DECIDE_RESPONDED = 1, MP_DECIDE_STATIC = 2, MP_DECIDE_WAIT = 3 };

/* n bytes (8-aligned) from the request's arena, freed with the request; NULL
 * when no buffer block can be had (r->arena.data is then NULL) or the block
 * is full. */
static inline void *mp_req_arena(mp_req_t *r, size_t n)
{
    mp_buf_t *a = &r->arena;
    if (MP_UNLIKELY(!a->data) && mp_buf_acquire(a, r->env->bufs) != 0)
        return NULL;
    size_t at = (a->end + 7u) & ~(size_t)7u;
    if (at + n > a->cap)
        return NULL;
    a->end = (uint32_t)(at + n);
    return a->data + at;
}

/* ---- what the request layer decides (req.c; the small steps inline here):
 * the server and the simulator call these ---- */

/* Readies r for a request run by env on gen (the caller holds its
 * reference) for the peer at client (kept: it must outlive r), started at
 * loop time now. Only the bookkeeping is zeroed; the parser fills the field
 * array. */
static inline void mp_req_reset(mp_req_t *r, mp_req_env_t *env, mp_gen_t *gen, const struct sockaddr *client,
                                double now)
{
    memset(r, 0, offsetof(mp_req_t, h));
    memset(&r->h, 0, offsetof(mp_http_request_t, headers));
    memset(&r->h.head_len, 0, sizeof(r->h) - offsetof(mp_http_request_t, head_len));
    memset(&r->match, 0, sizeof(*r) - offsetof(mp_req_t, match));
    r->trace_id[0] = r->span_id[0] = '\0';
    r->env = env;
    r->gen = gen;
    r->client_addr = client;
    r->upstream = r->server = -1;
    r->t_start = now;
}

/* r->body (zeroed) from the head alone: chunked, Content-Length, or none
 * (done). */
static inline void mp_req_body_framing(mp_req_t *r)
{
    const mp_http_request_t *h = &r->h;
    if (h->chunked) {
        r->body.kind = MP_BODY_CHUNKED;
    } else if (h->content_length > 0) {
        r->body.kind = MP_BODY_LENGTH;
        r->body.left = (uint64_t)h->content_length;
    } else {
        r->body.done = 1;
    }
}

/* A complete, valid head is in r->h: whether it is HEAD, the request body's
 * framing (mp_req_body_framing) and keep-alive (HTTP/1.1 unless
 * "Connection: close"; HTTP/1.0 only with "Connection: keep-alive"; never
 * while the thread is stopping). Inline, as the request path had it. */
static inline void mp_req_begin(mp_req_t *r, int stopping)
{
    const mp_http_request_t *h = &r->h;
    r->is_head = h->method.len == 4 && memcmp(h->method.p, "HEAD", 4) == 0;
    r->keepalive = h->minor == 1 ? !h->conn_close : (h->conn_keepalive && !h->conn_close);
    if (stopping)
        r->keepalive = 0;
    r->body_start = (uint32_t)h->head_len;
    mp_req_body_framing(r);
}

/* The parser refused the head (rc: MP_EAGAIN when the buffer is full, or
 * its error): the connection closes after the answer and no body is read.
 * Returns the status to answer: 431, the parser's, or 400. */
int mp_req_parse_failed(mp_req_t *r, int rc);

/* Whether the connection can follow an answer made here (status; 0 for a
 * hook's req:respond or a static file): not with a body left unread, not
 * after 408 or 400. Clears r->keepalive otherwise. */
void mp_req_keepalive_after(mp_req_t *r, int status);

/* The response body's framing from the upstream's head rh (r->resp):
 * none for HEAD, 204 and 304; chunked (stripped for an HTTP/1.0 client);
 * Content-Length; or until close: sent chunked to an HTTP/1.1 client,
 * close-delimited (ending keep-alive) to an HTTP/1.0 one. */
static inline void mp_req_response_framing(mp_req_t *r, const mp_http_response_t *rh)
{
    mp_framing_t *f = &r->resp;
    memset(f, 0, sizeof(*f));
    if (r->is_head || rh->status == 204 || rh->status == 304) {
        f->kind = MP_BODY_NONE;
        f->done = 1;
    } else if (rh->chunked) {
        f->kind = MP_BODY_CHUNKED;
        r->dechunk = r->h.minor == 0;
    } else if (rh->content_length >= 0) {
        f->kind = MP_BODY_LENGTH;
        f->left = (uint64_t)rh->content_length;
        f->done = f->left == 0;
    } else {
        f->kind = MP_BODY_CLOSE;
        /* chunked to an HTTP/1.1 client: its connection stays reusable (not a
         * 101: what follows one is a tunnel's, or nothing) */
        r->rechunk = r->h.minor == 1 && rh->status != 101;
    }
    if ((f->kind == MP_BODY_CLOSE && !r->rechunk) || r->dechunk)
        r->keepalive = 0;
}

/* Response hooks wait for a call-out (env->wake reports their end with
 * MP_HK_RESPONSE): mp_req_response_resume then says what they would have
 * returned. */
#define MP_RESP_WAIT (-1)

/* Runs the response chain at ref (not LUA_NOREF) on a response of status;
 * what mp_req_response_hooks calls when there is one. */
int mp_req_run_response_hooks(mp_req_t *r, int ref, int status, const mp_http_response_t *rh);

/* What the response hooks that waited return, now that they ended with rc. */
int mp_req_response_resume(mp_req_t *r, int rc);

/* Runs the response hooks (the route's chain, or the global one before
 * routing) on a response of status: the upstream's (rh), or one made here
 * (rh NULL). Returns the status to send, which a hook may have changed, 0
 * when a hook failed, or MP_RESP_WAIT. Inline: most requests have no hook. */
static inline int mp_req_response_hooks(mp_req_t *r, int status, const mp_http_response_t *rh)
{
    const mp_config_t *cfg = r->gen->cfg;
    int ref = r->match.route ? cfg->route_hooks[mp_route_slot(r->match.route)].response : cfg->response_ref;
    return ref == LUA_NOREF ? status : mp_req_run_response_hooks(r, ref, status, rh);
}

/* Runs the on_log chain (cfg->log_ref, not LUA_NOREF) on r. */
int mp_req_run_on_log(mp_req_t *r);

/* The response was sent (r->status set; none when the request was
 * abandoned): the on_log chain runs. Returns 1 when it waits for a
 * call-out (env->wake reports its end, MP_HK_LOG), else 0. */
static inline int mp_req_on_log(mp_req_t *r)
{
    if (r->status && r->gen->cfg->log_ref != LUA_NOREF)
        return mp_req_run_on_log(r);
    return 0;
}

/* The upstream answered r (its framing decided) with rh: whether that
 * opens a tunnel. Only a 101 to a WebSocket handshake (r->upgrade) whose
 * Upgrade names websocket does (r->tunnel_open; no body, the connection is
 * the tunnel's); a 101 to anything else is invalid (-1: a 502). Any other
 * answer to a handshake is relayed and closes the client connection after
 * it: bytes the client sent in hope of the upgrade are never read as a
 * request. Returns 1 (tunnel), 0 (an ordinary response) or -1. */
int mp_req_upgrade_answer(mp_req_t *r, const mp_http_response_t *rh);

/* Whether the response rh, as the response hooks left it (their header
 * edits count), is compressed (SPEC "Compression"): the route's compress,
 * the client's Accept-Encoding (q-values; ties by the route's algorithms
 * order), and the exclusions (Content-Encoding, no-transform, 206, HEAD,
 * 204/304, Content-Length under min_length, a type not in types). Sets
 * r->enc (and the framing: chunked to HTTP/1.1, close-delimited to 1.0;
 * upstream chunking removed), or r->enc_why. Returns r->enc. */
int mp_req_compress(mp_req_t *r, const mp_http_response_t *rh);

/* The Content-Encoding name of enc: "gzip", "br", "zstd"; NULL for none. */
const char *mp_req_encoding_name(int enc);

/* No server of b is available: the answer is 503, with Retry-After for
 * when one may be again. Returns 503. */
int mp_req_unavailable(mp_req_t *r, const mp_balancer_t *b);

/* The balancer's view of a request (balancer.h; its arg: the mp_req_t *):
 * the hash key and the Lua policy call. */
extern const struct mp_pick_ctx mp_req_pick;

/* The hash of r's key for a chash upstream (the upstream's hash_key: a
 * header, a cookie, the client address, or a Lua function; the client's
 * address when the request has none). Returns 0, or -2 (MP_PICK_ERROR)
 * when the Lua function failed. */
int mp_req_hash_key(mp_req_t *r, const mp_upstream_def_t *d, uint64_t *out);

/* Runs everything between a parsed head and the exchange: the request id,
 * the client address, the body size limit, the global request hooks,
 * routing and the route's request hooks. Touches no socket, so the
 * simulator (sim.h) runs the very same decision. */
int mp_req_decide(mp_req_t *r);

/* mp_req_decide returned MP_DECIDE_WAIT and the chain of kind (MP_HK_PRE or
 * MP_HK_ROUTE) has ended with rc (env->wake): the decision goes on, with
 * what mp_req_decide returns (WAIT again when the route's chain waits). */
int mp_req_decide_resume(mp_req_t *r, int kind, int rc);

/* Gives r its request id and client address if it has none yet (a head the
 * parser refused never reached mp_req_decide). */
void mp_req_identify(mp_req_t *r);

/* The real client: the peer, or, from a trusted peer, the rightmost
 * X-Forwarded-For address that is not itself a trusted proxy (the leftmost
 * when all are). Borrowed from the request. */
mp_slice mp_req_remote_addr(const mp_req_t *r);

/* Runs the response hooks on the response made here for r (status: the
 * proxy's own error, or 0 for what req:respond gave), and appends its head
 * to b. Returns the status to send, -1 when b has no room, or
 * MP_LOCAL_WAIT when the hooks wait: mp_local_response_resume finishes it
 * (b and out kept meanwhile) once they ended with rc. */
#define MP_LOCAL_WAIT (-2)
int mp_local_response(mp_req_t *r, int status, mp_buf_t *b, mp_local_t *out);
int mp_local_response_resume(mp_req_t *r, int rc, mp_buf_t *b, mp_local_t *out);

/* A log line about r: "w<id>: " (none in the simulator), the message, then
 * " (request <id>)". mp_env_log adds the prefix only (for lines that name
 * the request elsewhere); the _limited ones are mp_log_limited's. Debug and
 * info lines below mp_log_level are not even formatted: mp_req_log and
 * mp_env_log check that inline, as mp_log_debug does, and call
 * mp_req_logf / mp_env_logf only for a line that is written. */
void mp_req_logf(const mp_req_t *r, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void mp_env_logf(const mp_req_env_t *e, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#define MP_LOG_WANTED(level) ((level) > MP_LOG_INFO || mp_log_level <= (level))
#define mp_req_log(r, level, ...) (MP_LOG_WANTED(level) ? mp_req_logf((r), (level), __VA_ARGS__) : (void)0)
#define mp_env_log(e, level, ...) (MP_LOG_WANTED(level) ? mp_env_logf((e), (level), __VA_ARGS__) : (void)0)
int mp_req_log_limited(mp_log_limit_t *lim, const mp_req_t *r, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int mp_env_log_limited(mp_log_limit_t *lim, const mp_req_env_t *e, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
