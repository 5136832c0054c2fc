/* upstream.c: one proxied exchange. The request head is rewritten into the
 * upstream connection's out buffer; body bytes are relayed from the client's
 * in buffer and response bytes from the upstream's in buffer, each side
 * reading only while the other can take more (back-pressure). */
#include "upstream.h"

#include "balancer.h"
#include "compress.h"
#include "err.h"
#include "gen.h"
#include "head.h"
#include "l_request.h"
#include "pool.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>

static void on_up_io(struct ev_loop *loop, ev_io *io, int revents);
static void on_up_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void connect_to(mp_req_t *r, int server, int fresh);
static void pump_request(mp_req_t *r);
static int request_pending(mp_req_t *r);
static void pump_response(mp_req_t *r);
static void connected(mp_req_t *r);
static const char *head_out(mp_req_t *r, const mp_http_response_t *rh, int shown);

/* begin_response's answer while the response hooks wait for a call-out. */
static const char hook_waits[] = "a response hook waits";

static mp_io_ctx_t *ctx_of(mp_req_t *r)
{
    return mp_client_side(r)->ctx;
}

/* Reports to the client connection (mp_exchange_ops_t). */
static void client_fail(mp_req_t *r, int status)
{
    mp_client_side_t *c = mp_client_side(r);
    c->ops->fail(c->arg, status);
}

static void client_abort(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    c->ops->abort(c->arg);
}

static void client_done(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    c->ops->done(c->arg);
}

static const mp_upstream_def_t *udef(mp_req_t *r)
{
    return &r->gen->cfg->upstreams[r->upstream];
}

static mp_pool_t *pool_of(mp_req_t *r)
{
    return &r->gen->pools[r->upstream];
}

static void attach(mp_req_t *r, mp_upconn_t *u)
{
    MP_ASSERT(!r->up && !u->req && (u->state == MP_UP_CONNECTING || u->state == MP_UP_ACTIVE));
    r->up = u;
    u->req = r;
    u->scanned = 0;
}

static mp_upconn_t *detach(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    if (u) {
        u->req = NULL;
        r->up = NULL;
    }
    return u;
}

static mp_balancer_t *balancer_of(mp_req_t *r)
{
    return &r->gen->balancers[r->upstream];
}

/* The passive outcome of the current attempt, once (health.h); status: the
 * response's, 0 when none came. */
static void peer_result(mp_req_t *r, enum mp_outcome out, int status, const char *reason)
{
    if (!r->peer || r->peer_reported)
        return;
    r->peer_reported = 1;
    if (out != MP_OUT_NEUTRAL)
        mp_peer_count(r->peer, status);
    double ms = out == MP_OUT_NEUTRAL ? -1 : (ev_time() - r->attempt_start) * 1000;
    mp_peer_result(r->peer, out, ms, r->peer_trial, &balancer_of(r)->passive, reason);
}

/* The attempt is over: it no longer counts as in flight. */
static void peer_done(mp_req_t *r)
{
    if (!r->peer)
        return;
    peer_result(r, MP_OUT_NEUTRAL, 0, NULL);
    mp_peer_done(r->peer);
    r->peer = NULL;
}

void mp_upstream_cancel(mp_req_t *r)
{
    if (r->rh_held) { /* the response hooks waiting on it are abandoned with the request */
        free(r->rh_held);
        r->rh_held = NULL;
        r->rh = NULL;
    }
    mp_upconn_t *u = detach(r);
    if (u)
        mp_upconn_close(u);
    peer_done(r);
    if (r->zenc) {
        mp_compress_free(r->zenc);
        r->zenc = NULL;
    }
    if (r->zout.data)
        mp_buf_release(&r->zout, &ctx_of(r)->bufs);
    r->enc = 0;
    /* Body bytes not yet written are never read as the next request: it
     * starts after the body (for chunked, after the client's framing). */
    if (r->body.done && r->body.kind == MP_BODY_CHUNKED && r->body.scan)
        mp_client_side(r)->in.start = r->body.scan;
    else if (r->body.done && r->body.kind == MP_BODY_LENGTH)
        mp_client_side(r)->in.start = r->body_ready;
}

/* Request body framing: nothing forwarded, from the first body byte. A
 * chunked body already decoded in place is kept and sent again re-framed
 * (a replay never decodes twice); a Content-Length body is counted anew. */
static void reset_request_body(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    r->head_sent = 0;
    c->in.start = r->body_start;
    if (r->h.chunked && r->body.kind == MP_BODY_CHUNKED && r->body.scan) {
        mp_reframe_restart(&r->body);
        return;
    }
    memset(&r->body, 0, sizeof(r->body));
    mp_req_body_framing(r);
    if (r->body.kind == MP_BODY_CHUNKED)
        r->body.scan = r->body_start;
    r->body_ready = r->body_start;
}

/* Asks the balancer for a server (avoid: one that just failed) and starts
 * the attempt; no server available is a 503 with Retry-After. */
static void pick_and_connect(mp_req_t *r, int avoid)
{
    mp_balancer_t *b = balancer_of(r);
    int trial;
    int server = mp_balancer_pick(b, &mp_req_pick, r, avoid, &trial);
    if (server == MP_PICK_ERROR)
        return client_fail(r, 500);
    if (server < 0) {
        static mp_log_limit_t lim;
        mp_req_log_limited(&lim, r, MP_LOG_WARN, "upstream %s: no server available", b->def->name);
        return client_fail(r, mp_req_unavailable(r, b));
    }
    r->peer_trial = (unsigned)trial;
    connect_to(r, server, 0);
}

void mp_upstream_start(mp_req_t *r, const mp_exchange_ops_t *ops, void *arg)
{
    mp_client_side_t *c = mp_client_side(r);
    MP_ASSERT(c->req == r && !c->closed && !r->up && !r->peer);
    c->ops = ops;
    c->arg = arg;
    r->body_replayable = 1;
    r->body.scan = 0; /* nothing decoded yet */
    reset_request_body(r);
    mp_balancer_count(balancer_of(r), 0, ev_now(ctx_of(r)->loop));
    pick_and_connect(r, -1);
}

/* Which events each side waits for and which timer runs, derived from the
 * exchange's state after every step. */
static void sync_events(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_upconn_t *u = r->up;
    const mp_settings_t *s = &r->gen->cfg->settings;
    int pending_resp = mp_buf_len(&c->out) || (u && r->resp_ready > u->in.start) ||
                       (MP_UNLIKELY(r->rechunk) && (r->chunk_tail || r->chunk_hdr_off < r->chunk_hdr_len)) ||
                       (MP_UNLIKELY(r->enc) && (mp_buf_len(&r->zout) || r->zflush || (r->resp.done && !r->zdone)));
    int need_body = !r->body.done && !r->body_abandoned;
    int client_room = c->in.data ? mp_buf_room(&c->in) > 0 : 1;

    int cev = (pending_resp ? EV_WRITE : 0) | (!c->read_eof && client_room ? EV_READ : 0);
    int ctimed = pending_resp || (need_body && client_room && !(u && u->state == MP_UP_CONNECTING));
    const mp_exchange_ops_t *ops = c->ops;
    void *arg = c->arg;
    ops->want(arg, cev);
    ops->timer(arg, ctimed ? s->client_body_timeout : 0);

    if (!u)
        return;
    if (r->rh_held) { /* response hooks wait: nothing is read (the head is in u->in), the call has its timeout */
        mp_upconn_want(u, 0);
        mp_upconn_timer(u, 0);
        return;
    }
    const mp_upstream_def_t *d = udef(r);
    if (u->state == MP_UP_CONNECTING) {
        mp_upconn_want(u, EV_WRITE);
        mp_upconn_timer(u, d->connect_timeout);
        return;
    }
    int pending_req = !r->body_abandoned && request_pending(r);
    int up_room = u->in.data ? mp_buf_room(&u->in) > 0 : 1;
    int uev = (pending_req ? EV_WRITE : 0) | (!pending_resp && up_room ? EV_READ : 0);
    mp_upconn_want(u, uev);
    if (pending_req)
        mp_upconn_timer(u, d->send_timeout);
    else if ((uev & EV_READ) && (r->body.done || r->body_abandoned || r->resp_head_done))
        mp_upconn_timer(u, d->read_timeout);
    else
        mp_upconn_timer(u, 0);
}

static int is_idempotent(mp_slice m)
{
    static const char *const names[] = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"};
    for (size_t i = 0; i < MP_ARRAY_LEN(names); i++)
        if (m.len == strlen(names[i]) && memcmp(m.p, names[i], m.len) == 0)
            return 1;
    return 0;
}

/* The one place where a failed exchange (err: an mp_err_* of err.h) is
 * retried or mapped to a status: connect errors retry any method on another
 * server; a connection broken before any response byte retries idempotent
 * requests whose body is still whole; a pooled connection the server had
 * closed is replaced once. */
static void up_error(mp_req_t *r, const char *err)
{
    mp_io_ctx_t *ctx = ctx_of(r);
    mp_upconn_t *u = detach(r);
    const mp_upstream_def_t *d = udef(r);
    int reused = u && u->reused;
    int got_bytes = u && (u->in.end > 0 || r->resp_head_done);
    int server = r->server;
    if (u)
        mp_upconn_close(u);
    ctx->stats.upstream_errors++;

    int nothing_sent = err == mp_err_connect || err == mp_err_connect_timeout || err == mp_err_tls;
    int replayable = r->body_replayable && !r->resp_started && !got_bytes;
    if (replayable && reused && err == mp_err_reset && (is_idempotent(r->h.method) || !r->head_sent)) {
        /* the server had closed an idle connection: not its failure */
        mp_env_log(r->env, MP_LOG_DEBUG, "pooled connection to %s was closed; request %.*s retried on a new one",
                   d->servers[server].addr.text, r->id_len, r->id);
        reset_request_body(r);
        return connect_to(r, server, 1);
    }
    peer_result(r, MP_OUT_FAIL, 0, err);
    peer_done(r);
    mp_req_log(r, MP_LOG_WARN, "upstream %s server %s: %s", d->name, d->servers[server].addr.text, err);
    mp_balancer_t *b = balancer_of(r);
    double now = ev_now(ctx->loop);
    if (r->tries <= d->retries && d->nservers > 1 && replayable &&
        (nothing_sent || (err == mp_err_reset && is_idempotent(r->h.method)))) {
        /* A retry after connecting failed adds no load (nothing reached a
         * server); one after a broken exchange does, and is budgeted. */
        int trial, next = -1;
        if ((nothing_sent || mp_balancer_retry_allowed(b, now)) &&
            (next = mp_balancer_pick(b, &mp_req_pick, r, server, &trial)) >= 0) {
            if (!nothing_sent)
                mp_balancer_count(b, 1, now);
            reset_request_body(r);
            r->peer_trial = (unsigned)trial;
            return connect_to(r, next, 0);
        }
        if (next == MP_PICK_ERROR)
            return client_fail(r, 500);
        if (next == -1 && !nothing_sent && !mp_balancer_retry_allowed(b, now))
            mp_env_log(r->env, MP_LOG_WARN, "upstream %s: retry budget exhausted, request %.*s not retried", d->name,
                       r->id_len, r->id);
    }
    int timed_out = err == mp_err_connect_timeout || err == mp_err_send_timeout || err == mp_err_read_timeout;
    client_fail(r, timed_out ? 504 : 502);
}

/* The proxy could not open a socket (errno err, mp_upconn_local_error):
 * the server is not blamed. Nothing was sent, so as after a connect error
 * any method goes to another server while retries remain (EADDRNOTAVAIL is
 * per destination); with none left the request gets 503. The log is
 * rate-limited (this repeats with every request while it lasts). */
static void local_failure(mp_req_t *r, int err)
{
    static mp_log_limit_t lim;
    const mp_upstream_def_t *d = udef(r);
    int server = r->server, trial, next = -1;
    ctx_of(r)->stats.upstream_errors++;
    peer_done(r);
    if (r->tries <= d->retries && d->nservers > 1 && r->body_replayable && !r->resp_started)
        next = mp_balancer_pick(balancer_of(r), &mp_req_pick, r, server, &trial);
    if (next == MP_PICK_ERROR)
        return client_fail(r, 500);
    int retry = next >= 0 && next != server;
    mp_env_log_limited(&lim, r->env, MP_LOG_ERROR,
                       "cannot open a connection to upstream %s server %s: %s (not "
                       "counted against the server; request %.*s %s)",
                       d->name, d->servers[server].addr.text, strerror(err), r->id_len, r->id,
                       retry ? "tries another server" : "gets 503");
    if (retry) {
        reset_request_body(r);
        r->peer_trial = (unsigned)trial;
        return connect_to(r, next, 0);
    }
    r->retry_after = 1;
    client_fail(r, 503);
}

static void connect_to(mp_req_t *r, int server, int fresh)
{
    mp_io_ctx_t *ctx = ctx_of(r);
    r->server = server;
    if (!r->t_up_start)
        r->t_up_start = ev_now(ctx->loop);
    mp_server_pool_t *sp = pool_of(r)->servers[server];
    if (!r->peer) {
        r->peer = balancer_of(r)->peers[server];
        r->peer_reported = 0;
        mp_peer_begin(r->peer);
    }
    r->attempt_start = ev_time();
    mp_upconn_t *u = fresh ? NULL : mp_pool_take(sp, ctx);
    if (u) {
        ctx->stats.upstream_reused++;
        u->reused = 1;
        ev_set_cb(&u->io, on_up_io); /* a call-out (l_http.c) may have made it */
        ev_set_cb(&u->timer, on_up_timer);
    } else {
        r->tries++;
        u = mp_upconn_connect(ctx, sp, on_up_io, on_up_timer);
        if (!u) {
            r->up = NULL;
            if (mp_upconn_local_error(errno))
                return local_failure(r, errno);
            return up_error(r, mp_err_connect);
        }
        ctx->stats.upstream_connects++;
        u->reused = 0;
    }
    attach(r, u);
    if (u->state == MP_UP_CONNECTING)
        return sync_events(r);
    if (!u->reused)
        return connected(r);
    pump_request(r);
}

/* c->in as the re-framing helpers (reframe.h) see it, and back. */
static mp_reframe_buf_t reframe_buf(mp_req_t *r)
{
    mp_buf_t *in = &mp_client_side(r)->in;
    return (mp_reframe_buf_t){in->data, in->cap, r->body_start, in->start, r->body_ready, in->end};
}

static void reframe_store(mp_req_t *r, const mp_reframe_buf_t *b)
{
    mp_client_side(r)->in.start = b->start;
    mp_client_side(r)->in.end = b->end;
    r->body_ready = b->ready;
}

/* Decodes the client's chunked framing in c->in in place
 * (mp_reframe_decode): nothing of the client's framing is kept. Returns 0,
 * 400, 413 or 431. */
static int decode_request_body(mp_req_t *r)
{
    const mp_settings_t *s = &r->gen->cfg->settings;
    mp_reframe_buf_t b = reframe_buf(r);
    int st = mp_reframe_decode(&r->body, &b, s->max_body_size, s->max_header_size);
    reframe_store(r, &b);
    return st;
}

/* Advances r->body_ready over the request body bytes in c->in, checking
 * their framing. Returns 0, or the status for a framing error. */
static int frame_request_body(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_framing_t *f = &r->body;
    if (f->kind == MP_BODY_CHUNKED)
        return decode_request_body(r);
    if (f->kind == MP_BODY_LENGTH) {
        uint64_t n = c->in.end - r->body_ready;
        if (n > f->left)
            n = f->left;
        r->body_ready += (uint32_t)n;
        f->left -= n;
        f->total += n;
        f->done = f->left == 0;
    }
    return 0;
}

/* Whether request bytes wait to be written: the head, body bytes, or the
 * rest of a re-framed chunked body. */
static int request_pending(mp_req_t *r)
{
    const mp_framing_t *f = &r->body;
    if ((r->up && mp_buf_len(&r->up->out)) || r->body_ready > mp_client_side(r)->in.start)
        return 1;
    mp_reframe_buf_t b = reframe_buf(r);
    return f->kind == MP_BODY_CHUNKED && mp_reframe_pending(f, &b);
}

/* c->in is full: makes room after the head by dropping the body bytes
 * already forwarded (the body is then no longer replayable) and the gap
 * decoding left. Returns 0, or 431 when a chunked body's trailer section
 * cannot fit in the buffer. */
static int make_body_room(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_framing_t *f = &r->body;
    if (f->kind != MP_BODY_CHUNKED) {
        if (c->in.start != c->in.end)
            return 0;
        if (c->in.start > r->body_start)
            r->body_replayable = 0;
        c->in.start = c->in.end = r->body_ready = r->body_start;
        return 0;
    }
    mp_reframe_buf_t b = reframe_buf(r);
    int dropped, st = mp_reframe_compact(f, &b, &dropped);
    if (dropped)
        r->body_replayable = 0;
    reframe_store(r, &b);
    return st;
}

/* The client's body broke its framing or grew too large: the upstream
 * request is aborted so that no complete request reaches the server. */
static void body_error(mp_req_t *r, int status)
{
    mp_env_log(r->env, MP_LOG_INFO, "request %.*s: bad request body (%d)", r->id_len, r->id, status);
    mp_upstream_cancel(r);
    r->keepalive = 0;
    client_fail(r, status);
}

static void send_continue(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    if (!r->h.expect_continue || r->h.minor < 1 || r->body.done || r->sent_continue || c->in.end != r->body_start)
        return;
    r->sent_continue = 1;
    if (mp_buf_acquire(&c->out, &c->ctx->bufs) == 0)
        MP_BUF_LIT(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
}

/* Accounts k bytes written from iov (head, framing, body) to their owners. */
static void request_written(mp_req_t *r, size_t k)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_upconn_t *u = r->up;
    mp_framing_t *f = &r->body;
    size_t head = mp_buf_len(&u->out) < k ? mp_buf_len(&u->out) : k;
    u->out.start += (uint32_t)head;
    k -= head;
    if (head && !mp_buf_len(&u->out)) {
        mp_buf_release(&u->out, &c->ctx->bufs);
        r->head_sent = 1;
    }
    if (f->kind != MP_BODY_CHUNKED) {
        c->in.start += (uint32_t)k;
        return;
    }
    mp_reframe_buf_t b = reframe_buf(r);
    mp_reframe_written(f, &b, k);
    reframe_store(r, &b);
}

/* Writes the pending request head and the body bytes; a chunked body goes
 * out re-framed: the proxy's size lines around the decoded data. */
static void pump_request(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_upconn_t *u = r->up;
    mp_framing_t *f = &r->body;
    int chunked = f->kind == MP_BODY_CHUNKED;
    MP_ASSERT(u && u->state == MP_UP_ACTIVE && u->req == r);
    if (!r->head_sent && !mp_buf_len(&u->out)) {
        if (mp_buf_acquire(&u->out, &c->ctx->bufs) != 0 || mp_head_request(r, &u->out) != 0) {
            mp_upstream_cancel(r);
            return client_fail(r, 431);
        }
        send_continue(r);
    }
    int st = r->body_abandoned ? 0 : frame_request_body(r);
    if (st)
        return body_error(r, st);
    for (;;) {
        struct iovec iov[4];
        int n = 0;
        mp_slice frame = {NULL, 0}, body = {c->in.data + c->in.start, 0}, tail = {NULL, 0};
        if (chunked && !r->body_abandoned) {
            mp_reframe_buf_t b = reframe_buf(r);
            mp_reframe_plan(f, &b);
            mp_reframe_next(f, &b, &frame, &body, &tail);
            reframe_store(r, &b);
        } else if (!r->body_abandoned && r->body_ready > c->in.start) {
            body.len = r->body_ready - c->in.start;
        }
        if (mp_buf_len(&u->out))
            iov[n++] = (struct iovec){mp_buf_head(&u->out), mp_buf_len(&u->out)};
        if (frame.len)
            iov[n++] = (struct iovec){(void *)frame.p, frame.len};
        if (body.len)
            iov[n++] = (struct iovec){(void *)body.p, body.len};
        if (tail.len)
            iov[n++] = (struct iovec){(void *)tail.p, tail.len};
        if (n == 0)
            break;
        ssize_t k = mp_io_writev(&u->sock, iov, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EAGAIN)
            break;
        if (k < 0)
            return up_error(r, mp_err_reset);
        request_written(r, (size_t)k);
    }
    if (!r->body.done && !r->body_abandoned && !mp_buf_room(&c->in) && (st = make_body_room(r)) != 0)
        return body_error(r, st);
    if (mp_buf_len(&c->out))
        return pump_response(r); /* a 100 Continue to flush */
    sync_events(r);
}

/* The upstream's response head is complete: decide the body's framing and
 * both connections' fate, and queue the head for the client. Returns NULL,
 * mp_err_hook (a response hook failed) or mp_err_invalid (no buffer). */
static const char *begin_response(mp_req_t *r, const mp_http_response_t *rh)
{
    MP_ASSERT(!r->resp_head_done && r->up->state == MP_UP_ACTIVE);
    mp_req_response_framing(r, rh);
    if (MP_UNLIKELY(r->upgrade || rh->status == 101) && mp_req_upgrade_answer(r, rh) < 0) {
        mp_env_log(r->env, MP_LOG_DEBUG, "request %.*s: a 101 from upstream that no WebSocket handshake asked for",
                   r->id_len, r->id);
        return mp_err_invalid;
    }
    r->up_reusable = !rh->conn_close && (rh->minor == 1 || rh->conn_keepalive) && r->resp.kind != MP_BODY_CLOSE &&
                     udef(r)->keepalive > 0 && !r->upgrade; /* it carried a handshake: never pooled */
    if (!r->body.done || request_pending(r)) {
        /* RFC 9110 §15: the server answered before the whole body; stop sending it. */
        r->body_abandoned = 1;
        r->up_reusable = 0;
        r->keepalive = 0;
    }
    r->status = rh->status;
    char reason[24];
    int failed = mp_balancer_failure_status(balancer_of(r), rh->status);
    if (failed)
        snprintf(reason, sizeof(reason), "status %d", rh->status);
    peer_result(r, failed ? MP_OUT_FAIL : MP_OUT_OK, rh->status, failed ? reason : NULL);
    int shown = mp_req_response_hooks(r, rh->status, rh);
    if (shown == MP_RESP_WAIT) {
        /* the head's slices point into u->in, which stays as it is (nothing
         * is read meanwhile: sync_events); the parsed head is the thread's */
        if (!(r->rh_held = malloc(sizeof(*r->rh_held)))) {
            mp_hook_abandon(r->gen->L, r);
            return mp_err_hook;
        }
        *r->rh_held = *rh;
        r->rh = r->rh_held;
        return hook_waits;
    }
    return head_out(r, rh, shown);
}

/* The response hooks have shown the head (0: they failed): it is queued
 * for the client. */
static const char *head_out(mp_req_t *r, const mp_http_response_t *rh, int shown)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_upconn_t *u = r->up;
    if (!shown)
        return mp_err_hook;
    if (MP_UNLIKELY(r->tunnel_open) && shown != 101)
        r->tunnel_open = 0; /* a hook answered otherwise: relayed without a body, then both close */
    r->status = shown;
    if (mp_buf_acquire(&c->out, &c->ctx->bufs) != 0)
        return mp_err_invalid;
    if (MP_UNLIKELY(mp_req_compress(r, rh))) {
        r->zenc = mp_compress_new(r->enc, r->gen->cfg->compress[mp_route_slot(r->match.route)].level);
        if (!r->zenc)
            return mp_err_invalid;
    }
    uint32_t mark = c->out.end; /* a head that does not fit leaves nothing behind (a 100 Continue stays) */
    if (mp_head_response(r, rh, &c->out) != 0) {
        c->out.end = mark;
        return mp_err_invalid;
    }
    u->in.start += (uint32_t)rh->head_len;
    r->resp_ready = r->resp_scan = u->in.start;
    r->resp_head_done = 1;
    return NULL;
}

/* The head's failure as the client sees it. */
static void head_failed(mp_req_t *r, const char *err)
{
    if (err == mp_err_hook) {
        mp_upstream_cancel(r);
        return client_fail(r, 500);
    }
    up_error(r, err);
}

void mp_upstream_hooked(mp_req_t *r, int rc)
{
    mp_http_response_t *rh = r->rh_held;
    MP_ASSERT(rh && r->up && !r->resp_head_done);
    const char *err = head_out(r, rh, mp_req_response_resume(r, rc));
    r->rh_held = NULL;
    free(rh);
    if (err)
        return head_failed(r, err);
    pump_response(r);
}

/* Most interim responses an upstream may send before its final one: past
 * them it is not answering (502). */
#define MAX_INTERIMS 16

/* A 1xx (not 101) from the upstream: relayed to an HTTP/1.1 client (103
 * Early Hints, or a 100 Continue when the proxy sent none itself), before
 * the final head in the client's out buffer; dropped for an HTTP/1.0 one. */
static const char *interim(mp_req_t *r, const mp_http_response_t *rh)
{
    if (++r->interims > MAX_INTERIMS) {
        mp_env_log(r->env, MP_LOG_WARN, "request %.*s: more than %d interim responses from upstream", r->id_len, r->id,
                   MAX_INTERIMS);
        return mp_err_invalid;
    }
    if (r->h.minor == 0 || (rh->status == 100 && r->sent_continue))
        return NULL;
    mp_client_side_t *c = mp_client_side(r);
    if (mp_buf_acquire(&c->out, &c->ctx->bufs) != 0)
        return mp_err_invalid;
    uint32_t mark = c->out.end;
    if (mp_head_interim(rh, &c->out) != 0) { /* the client reads none of them: no room for more */
        c->out.end = mark;
        return mp_err_invalid;
    }
    if (rh->status == 100)
        r->sent_continue = 1;
    return NULL;
}

/* Parses the response head from u->in; 1xx interim responses are relayed
 * (interim) or dropped, a 101 may open a tunnel. Returns NULL
 * when there is no failure (the head is complete once r->resp_head_done is
 * set, else more bytes are needed) or the failure's mp_err_*. */
static const char *parse_response_head(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    static __thread mp_http_response_t rh;
    for (;;) {
        int rc = mp_http1_parse_response(mp_buf_head(&u->in), mp_buf_len(&u->in), &u->scanned, u->in.cap, &rh);
        if (rc == MP_EAGAIN && !mp_buf_room(&u->in) && u->in.start > 0) {
            mp_buf_compact(&u->in); /* interim heads went: the final one has the whole buffer */
            return NULL;
        }
        if (rc == MP_EAGAIN)
            return mp_buf_room(&u->in) ? NULL : mp_err_invalid;
        if (rc < 0) {
            mp_env_log(r->env, MP_LOG_DEBUG, "invalid upstream response: %s", rh.error ? rh.error : "?");
            return mp_err_invalid;
        }
        if (rh.status >= 100 && rh.status < 200) {
            if (rh.status == 101)
                return begin_response(r, &rh);
            const char *err = interim(r, &rh);
            if (err)
                return err;
            u->in.start += (uint32_t)rh.head_len;
            u->scanned = 0;
            continue;
        }
        return begin_response(r, &rh);
    }
}

/* Advances r->resp_ready over response body bytes in u->in; for HTTP/1.0
 * clients chunked framing is removed in place. Returns 0 or MP_EPROTO. */
static int frame_response_body(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    mp_framing_t *f = &r->resp;
    if (f->kind == MP_BODY_LENGTH) {
        uint64_t n = u->in.end - r->resp_scan;
        if (n > f->left)
            n = f->left;
        r->resp_scan += (uint32_t)n;
        r->resp_ready = r->resp_scan;
        f->left -= n;
        f->done = f->left == 0;
    } else if (f->kind == MP_BODY_CLOSE) {
        r->resp_scan = r->resp_ready = u->in.end;
    }
    while (f->kind == MP_BODY_CHUNKED && !f->done && r->resp_scan < u->in.end) {
        mp_slice data;
        ssize_t k = mp_chunked_decode(&f->chunk, u->in.data + r->resp_scan, u->in.end - r->resp_scan, &data);
        if (k < 0)
            return MP_EPROTO;
        if (r->dechunk && data.len) {
            memmove(u->in.data + r->resp_ready, data.p, data.len);
            r->resp_ready += (uint32_t)data.len;
        }
        r->resp_scan += (uint32_t)k;
        if (!r->dechunk)
            r->resp_ready = r->resp_scan;
        f->done = f->chunk.done;
        if (k == 0)
            break;
    }
    return 0;
}

/* The 101 reached the client: the upstream socket and what it sent after
 * the head go to the tunnel the client connection opens. */
static void upgraded(mp_req_t *r)
{
    mp_io_ctx_t *ctx = ctx_of(r);
    r->t_up_end = ev_now(ctx->loop);
    peer_done(r);
    mp_upconn_t *u = detach(r);
    if (u->sock.ops)
        mp_tls_client_unslot(u->sock.session); /* its pool's ticket slot may go before the tunnel */
    mp_client_side_t *c = mp_client_side(r);
    c->ops->upgrade(c->arg, &u->sock, &u->in);
    mp_upconn_close(u);
}

static void finish(mp_req_t *r)
{
    mp_io_ctx_t *ctx = ctx_of(r);
    MP_ASSERT(r->resp_head_done && r->resp.done);
    if (MP_UNLIKELY(r->tunnel_open))
        return upgraded(r);
    r->t_up_end = ev_now(ctx->loop);
    peer_done(r);
    mp_upconn_t *u = detach(r);
    if (u) {
        int clean = r->up_reusable && r->body.done && !r->body_abandoned && !request_pending(r) &&
                    u->in.end == r->resp_scan;
        mp_buf_release(&u->in, &ctx->bufs);
        mp_buf_release(&u->out, &ctx->bufs);
        if (clean) {
            u->requests++;
            mp_pool_put(u);
        } else {
            mp_upconn_close(u);
        }
    }
    client_done(r);
}

/* A compressed response: feeds the encoder the body bytes ready in u->in
 * and appends its output to r->zout: a flush once it has taken what was
 * read (so each upstream read reaches the client whole, as SSE needs), the
 * stream's end once the body ended. Bounded by r->zout's room: input it
 * could not take waits in u->in, and the upstream is not read meanwhile
 * (sync_events). Returns 0, or -1 when the encoder failed. */
static int encode(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    mp_buf_t *z = &r->zout;
    if (r->zdone)
        return 0;
    if (mp_buf_acquire(z, &ctx_of(r)->bufs) != 0)
        return -1;
    if (z->start == z->end)
        z->start = z->end = 0;
    size_t in_len = u && u->in.data ? r->resp_ready - u->in.start : 0;
    int op = r->resp.done ? MP_COMPRESS_FINISH : in_len || r->zflush ? MP_COMPRESS_FLUSH : -1;
    size_t room = z->cap - z->end;
    if (op < 0 || !room)
        return 0;
    const char *in = in_len ? u->in.data + u->in.start : "", *in0 = in;
    char *out = z->data + z->end;
    int rc = mp_compress_step(r->zenc, op, &in, &in_len, &out, &room);
    if (in != in0)
        u->in.start += (uint32_t)(in - in0);
    z->end = (uint32_t)(out - z->data);
    if (rc < 0) {
        mp_env_log(r->env, MP_LOG_WARN, "request %.*s: the response encoder failed", r->id_len, r->id);
        return -1;
    }
    r->zflush = rc == 0; /* out of room: the flush goes on once the client took some */
    r->zdone = rc == 1 && op == MP_COMPRESS_FINISH;
    return 0;
}

/* The body bytes ready for the client (the encoder's output when the
 * response is compressed): their length, at *p. */
static size_t body_out(mp_req_t *r, char **p)
{
    mp_upconn_t *u = r->up;
    if (MP_UNLIKELY(r->enc)) {
        *p = r->zout.data ? r->zout.data + r->zout.start : NULL;
        return mp_buf_len(&r->zout);
    }
    *p = u && u->in.data ? u->in.data + u->in.start : NULL;
    return u && r->resp_ready > u->in.start ? r->resp_ready - u->in.start : 0;
}

/* k bytes of body_out went to the client. */
static void body_sent(mp_req_t *r, size_t k)
{
    if (MP_UNLIKELY(r->enc))
        r->zout.start += (uint32_t)k;
    else if (r->up)
        r->up->in.start += (uint32_t)k;
}

/* The body is all out of the upstream (and of the encoder). */
static int body_ended(const mp_req_t *r)
{
    return r->resp.done && (!r->enc || (r->zdone && !mp_buf_len(&r->zout)));
}

/* The rest of a close-delimited response to an HTTP/1.1 client, chunked:
 * the head (c->out), then for each run of bytes read a chunk (its size
 * line, the bytes, CRLF), and once the upstream ended cleanly the last
 * chunk. Returns 0 when all that can go went, 1 when the client blocks,
 * -1 when it failed. */
static int write_rechunked(mp_req_t *r)
{
    static const char tail[] = "\r\n0\r\n\r\n"; /* a chunk's CRLF, then the last chunk */
    mp_client_side_t *c = mp_client_side(r);
    for (;;) {
        char *data;
        size_t ready;
        if (!r->chunk_left && !r->chunk_tail && r->chunk_hdr_off == r->chunk_hdr_len) {
            if (MP_UNLIKELY(r->enc) && encode(r) != 0)
                return -1;
            if ((ready = body_out(r, &data)) > 0) { /* a new chunk of what is ready */
                r->chunk_left = ready;
                r->chunk_hdr_len = (uint8_t)snprintf(r->chunk_hdr, sizeof(r->chunk_hdr), "%llx\r\n",
                                                     (unsigned long long)r->chunk_left);
                r->chunk_hdr_off = 0;
                r->chunk_tail = 2;
            } else if (body_ended(r) && !r->chunk_end) {
                r->chunk_end = 1;
                r->chunk_tail = 5;
            }
        }
        struct iovec iov[4];
        int n = 0;
        if (mp_buf_len(&c->out))
            iov[n++] = (struct iovec){mp_buf_head(&c->out), mp_buf_len(&c->out)};
        if (r->chunk_hdr_off < r->chunk_hdr_len)
            iov[n++] = (struct iovec){r->chunk_hdr + r->chunk_hdr_off, (size_t)(r->chunk_hdr_len - r->chunk_hdr_off)};
        if (r->chunk_left && body_out(r, &data))
            iov[n++] = (struct iovec){data, r->chunk_left};
        if (r->chunk_tail) /* CRLF ("\r\n" of tail), or the last chunk after a CRLF already sent */
            iov[n++] = (struct iovec){(char *)(r->chunk_end ? tail + 7 - r->chunk_tail : tail + 2 - r->chunk_tail),
                                      r->chunk_tail};
        if (n == 0)
            return 0;
        ssize_t k = mp_io_writev(&c->sock, iov, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EAGAIN)
            return 1;
        if (k < 0)
            return -1;
        r->bytes_sent += (uint64_t)k;
        r->resp_started = 1;
        size_t left = (size_t)k, x;
        x = mp_buf_len(&c->out) < left ? mp_buf_len(&c->out) : left;
        c->out.start += (uint32_t)x;
        left -= x;
        x = (size_t)(r->chunk_hdr_len - r->chunk_hdr_off) < left ? (size_t)(r->chunk_hdr_len - r->chunk_hdr_off) : left;
        r->chunk_hdr_off += (uint8_t)x;
        left -= x;
        x = r->chunk_left < left ? (size_t)r->chunk_left : left;
        r->chunk_left -= x;
        body_sent(r, x);
        left -= x;
        r->chunk_tail -= (uint8_t)left;
    }
}

/* Writes the pending client output (100 Continue, the response head) and
 * the framed response body bytes, until done or the client blocks. */
static void pump_response(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    mp_upconn_t *u = r->up;
    if (u && r->resp_head_done && frame_response_body(r) != 0) {
        mp_env_log(r->env, MP_LOG_WARN, "request %.*s: bad chunked framing from upstream", r->id_len, r->id);
        return client_abort(r);
    }
    if (MP_UNLIKELY(r->rechunk) && r->resp_head_done) {
        int rc = write_rechunked(r);
        if (rc < 0)
            return client_abort(r);
        if (rc > 0)
            return sync_events(r);
    }
    for (;;) {
        struct iovec iov[2];
        int n = 0;
        char *data;
        size_t ready;
        if (MP_UNLIKELY(r->enc) && !r->rechunk && r->resp_head_done && encode(r) != 0)
            return client_abort(r);
        if (mp_buf_len(&c->out))
            iov[n++] = (struct iovec){mp_buf_head(&c->out), mp_buf_len(&c->out)};
        if ((ready = body_out(r, &data)) > 0)
            iov[n++] = (struct iovec){data, ready};
        if (n == 0)
            break;
        ssize_t k = mp_io_writev(&c->sock, iov, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EAGAIN)
            return sync_events(r);
        if (k < 0)
            return client_abort(r);
        r->bytes_sent += (uint64_t)k;
        if (r->resp_head_done)
            r->resp_started = 1;
        size_t head = mp_buf_len(&c->out) < (size_t)k ? mp_buf_len(&c->out) : (size_t)k;
        c->out.start += (uint32_t)head;
        body_sent(r, (size_t)k - head);
    }
    mp_buf_release(&c->out, &c->ctx->bufs);
    if (r->resp_head_done && body_ended(r))
        return finish(r);
    if (u && u->in.data && u->in.start == r->resp_ready && r->resp_scan == u->in.end)
        u->in.start = u->in.end = r->resp_ready = r->resp_scan = 0;
    sync_events(r);
}

static void upstream_readable(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    MP_ASSERT(u->state == MP_UP_ACTIVE && u->req == r);
    if (mp_buf_acquire(&u->in, &ctx_of(r)->bufs) != 0)
        return client_abort(r);
    if (!mp_buf_room(&u->in) && r->resp_head_done && u->in.start == r->resp_ready && u->in.start > 0) {
        /* all sent but a trailer line the decoder waits to see whole: move it to the front */
        uint32_t held = u->in.end - r->resp_scan;
        memmove(u->in.data, u->in.data + r->resp_scan, held);
        u->in.start = r->resp_ready = r->resp_scan = 0;
        u->in.end = held;
    }
    if (!mp_buf_room(&u->in))
        return sync_events(r); /* back-pressure: the client has not taken what we hold */
    ssize_t n;
    do
        n = mp_io_read(&u->sock, mp_buf_tail(&u->in), mp_buf_room(&u->in));
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return sync_events(r);
    if (n <= 0) {
        if (!r->resp_head_done)
            return up_error(r, mp_err_reset);
        if (r->resp.kind == MP_BODY_CLOSE && n == 0) { /* over TLS: after close_notify */
            r->resp.done = 1;
            return pump_response(r);
        }
        mp_env_log(r->env, MP_LOG_WARN, "request %.*s: upstream closed mid-response", r->id_len, r->id);
        return client_abort(r); /* the client must not mistake a cut body for a whole one */
    }
    u->in.end += (uint32_t)n;
    if (!r->resp_head_done) {
        const char *err = parse_response_head(r);
        if (err == hook_waits)
            return sync_events(r);
        if (err)
            return head_failed(r, err);
        if (!r->resp_head_done)
            return sync_events(r);
    }
    pump_response(r);
}

/* The handshake with a TLS upstream failed: a connect failure (nothing was
 * sent; passive health counts it). Its reason is logged at most once a
 * second, beside the per-request line up_error writes. */
static void tls_failed(mp_req_t *r)
{
    const mp_upstream_def_t *d = udef(r);
    char why[200];
    mp_metrics_add(&ctx_of(r)->metrics.tls[1][MP_TLS_FAILED], 1);
    mp_env_log_limited(&r->up->sp->tls_log, r->env, MP_LOG_WARN, "upstream %s server %s: TLS handshake failed: %s",
                       d->name, d->servers[r->server].addr.text, mp_tls_error(r->up->sock.session, why, sizeof(why)));
    up_error(r, mp_err_tls);
}

/* The connection to the server is up. A TLS upstream's handshake comes
 * next, still CONNECTING and under connect_timeout; then the request. */
static void connected(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    const mp_upstream_def_t *d = udef(r);
    if (d->tls && !u->sock.ops) {
        char name[256];
        SSL *ssl = mp_tls_client_session(d->tls, u->sock.fd,
                                         mp_tls_server_name(d->tls_name, u->sp->addr.text, name, sizeof(name)),
                                         &u->sp->tls_session);
        if (!ssl) {
            mp_upstream_cancel(r);
            return client_fail(r, 500);
        }
        mp_io_tls(&u->sock, ssl);
        u->state = MP_UP_CONNECTING;
    }
    if (u->sock.handshaking) {
        int rc = mp_io_handshake(&u->sock);
        if (rc == MP_EAGAIN)
            return sync_events(r);
        if (rc != 0)
            return tls_failed(r);
        mp_tls_info_t info;
        mp_tls_info(u->sock.session, &info, NULL, 0);
        mp_metrics_add(&ctx_of(r)->metrics.tls[1][info.resumed ? MP_TLS_RESUMED : MP_TLS_FULL], 1);
    }
    u->state = MP_UP_ACTIVE;
    pump_request(r);
}

static void on_connected(mp_req_t *r)
{
    mp_upconn_t *u = r->up;
    MP_ASSERT(u->state == MP_UP_CONNECTING);
    if (!u->sock.ops && mp_io_connect_result(&u->sock) != 0)
        return up_error(r, mp_err_connect);
    connected(r);
}

static void on_up_io(struct ev_loop *loop, ev_io *io, int revents)
{
    (void)loop;
    mp_upconn_t *u = container_of(io, mp_upconn_t, io);
    mp_req_t *r = u->req;
    if (!r)
        return mp_pool_idle_event(u);
    if (u->state == MP_UP_CONNECTING)
        return on_connected(r);
    if (MP_UNLIKELY(u->sock.ops != NULL))
        revents = mp_upconn_revents(u, revents);
    if (revents & EV_WRITE) {
        pump_request(r);
        /* it may have ended the request (and freed r): u outlives this turn */
        if (u->req != r || r->up != u || mp_client_side(r)->closed)
            return;
    }
    if ((revents & EV_READ) && u->state == MP_UP_ACTIVE)
        upstream_readable(r);
    /* TLS: what the calls left blocked may have changed what to watch */
    if (MP_UNLIKELY(u->sock.ops != NULL) && u->req == r && r->up == u && u->state == MP_UP_ACTIVE)
        mp_upconn_want(u, u->want);
}

static void on_up_timer(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)revents;
    mp_upconn_t *u = container_of(t, mp_upconn_t, timer);
    mp_req_t *r = u->req;
    if (!r)
        return mp_pool_idle_event(u);
    if (u->state == MP_UP_CONNECTING) {
        if (u->sock.handshaking)
            mp_metrics_add(&ctx_of(r)->metrics.tls[1][MP_TLS_FAILED], 1);
        return up_error(r, mp_err_connect_timeout);
    }
    if (r->resp_started) {
        mp_env_log(r->env, MP_LOG_WARN, "request %.*s: upstream read timed out mid-response", r->id_len, r->id);
        return client_abort(r);
    }
    up_error(r, (u->io.events & EV_WRITE) ? mp_err_send_timeout : mp_err_read_timeout);
}

static void client_readable(mp_req_t *r)
{
    mp_client_side_t *c = mp_client_side(r);
    if (mp_buf_acquire(&c->in, &c->ctx->bufs) != 0)
        return client_abort(r);
    if (!mp_buf_room(&c->in))
        return sync_events(r);
    ssize_t n;
    do
        n = mp_io_read(&c->sock, mp_buf_tail(&c->in), mp_buf_room(&c->in));
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return sync_events(r);
    if (n <= 0) {
        /* The client went away (or half-closed): its request is cancelled. */
        c->read_eof = 1;
        return client_abort(r);
    }
    c->in.end += (uint32_t)n;
    if (!r->body.done && !r->body_abandoned && r->up && r->up->state == MP_UP_ACTIVE)
        return pump_request(r);
    sync_events(r);
}

void mp_upstream_on_client(mp_req_t *r, int revents)
{
    mp_client_side_t *c = mp_client_side(r);
    MP_ASSERT(c->req == r && !c->closed);
    if (revents & EV_WRITE) {
        pump_response(r);
        if (c->closed || c->req != r)
            return;
    }
    if (revents & EV_READ)
        client_readable(r);
}

void mp_upstream_on_client_timeout(mp_req_t *r)
{
    MP_ASSERT(mp_client_side(r)->req == r && !mp_client_side(r)->closed);
    if (!r->body.done && !r->body_abandoned && !r->resp_started) {
        mp_env_log(r->env, MP_LOG_INFO, "request %.*s: client_body_timeout", r->id_len, r->id);
        mp_upstream_cancel(r);
        r->keepalive = 0;
        return client_fail(r, 408);
    }
    mp_env_log(r->env, MP_LOG_INFO, "request %.*s: client stopped reading; closed", r->id_len, r->id);
    client_abort(r);
}
