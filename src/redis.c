/* redis.c: the Redis client of redis.h. A connection carries one call at a
 * time: its commands go out in one write, hiredis' reader parses what comes
 * back, and the connection then serves the next waiting call or idles. The
 * client reconnects lazily: a failure starts a delay (backoff_min doubling
 * to backoff_max) during which calls fail at once; the first call after it
 * tries again, and a connection that gets through AUTH/SELECT ends it. */
#include "redis.h"

#include "io.h"
#include "log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* CONNECTING -> HELLO (AUTH/SELECT sent, their replies awaited; skipped
 * without password and db) -> BUSY (a call's commands out, its replies
 * awaited) <-> IDLE; any -> closed and freed (conn_close). */
enum { C_CONNECTING, C_HELLO, C_BUSY, C_IDLE };

typedef struct rconn rconn_t;

struct rconn {
    mp_redis_t *r;
    mp_io_t sock;
    ev_io io;
    ev_timer timer; /* while CONNECTING and HELLO: connect_timeout */
    uint8_t state;
    uint8_t want;          /* the events io watches */
    redisReader *reader;   /* owned */
    mp_redis_call_t *call; /* the call it opened for (CONNECTING, HELLO; NULL once that call ended) or
                            * carries (BUSY); NULL when idle */
    const char *out;       /* what is being written: r->hello or call->cmd (borrowed) */
    size_t outlen, outpos;
    int expect, got;      /* replies of this step (hello or call), and how many came */
    unsigned addr_gen;    /* r->addr_gen when opened: another means an address the server left */
    rconn_t *prev, *next; /* r->conns */
};

struct mp_redis_call {
    mp_redis_t *r;
    mp_redis_cb cb;
    void *arg;
    char *cmd; /* the commands in RESP, owned */
    size_t cmdlen;
    int ncmds;
    redisReply **replies; /* ncmds slots, filled as they come; owned */
    ev_timer timer;
    rconn_t *conn;                /* NULL: waiting in r's queue */
    int cancelled;                /* the callback is not to be called */
    int leaves_state;             /* its commands change the connection (SELECT, MULTI, ...): closed after */
    mp_redis_call_t *prev, *next; /* r's queue */
};

struct mp_redis {
    struct ev_loop *loop;
    struct sockaddr_storage ss;
    socklen_t sslen;
    unsigned addr_gen;                /* counts mp_redis_set_addr's changes */
    char addr[INET6_ADDRSTRLEN + 10]; /* "127.0.0.1:6379", "[::1]:6379" */
    char *hello;                      /* AUTH and SELECT in RESP, NULL when neither; owned */
    size_t hellolen;
    int nhello;
    int has_auth, db;
    double timeout, connect_timeout, backoff_min, backoff_max;
    unsigned pool, queue_max;
    rconn_t *conns;
    unsigned nconns;
    mp_redis_call_t *qhead, *qtail;
    unsigned nqueued, ncancelled;
    double backoff;  /* the current reconnect delay, 0 while the server is fine */
    double retry_at; /* mono_now() before which calls fail at once */
    int closing;
    int in_cb; /* a callback runs (mp_redis_free may not) */
    unsigned long connects, failures;
    char last_failure[200]; /* why the server is unavailable */
    char send_err[512];     /* mp_redis_send's *err */
    char cb_err[512];       /* a callback's err */
    mp_log_limit_t log;     /* one line a second per client */
};

static void dispatch(mp_redis_t *r);

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* How long ago the loop read its clock: a timer started now counts from
 * then, so a timeout starts this much later to count from now (a busy
 * iteration would shorten it). Within [0, 1 s]: a wall clock step is not
 * a delay. */
static double loop_lag(struct ev_loop *loop)
{
    double d = ev_time() - ev_now(loop);
    return d > 0 && d < 1 ? d : 0;
}

static const char *cb_msg(mp_redis_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *cb_msg(mp_redis_t *r, const char *fmt, ...)
{
    int n = snprintf(r->cb_err, sizeof(r->cb_err), "redis %s: ", r->addr);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->cb_err + n, sizeof(r->cb_err) - (size_t)n, fmt, ap);
    va_end(ap);
    return r->cb_err;
}

static const char *send_msg(mp_redis_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *send_msg(mp_redis_t *r, const char *fmt, ...)
{
    int n = snprintf(r->send_err, sizeof(r->send_err), "redis %s: ", r->addr);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->send_err + n, sizeof(r->send_err) - (size_t)n, fmt, ap);
    va_end(ap);
    return r->send_err;
}

/* -- calls -------------------------------------------------------------- */

static void queue_unlink(mp_redis_t *r, mp_redis_call_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        r->qhead = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        r->qtail = c->prev;
    c->prev = c->next = NULL;
    r->nqueued--;
}

static void queue_push(mp_redis_t *r, mp_redis_call_t *c)
{
    c->prev = r->qtail;
    c->next = NULL;
    if (r->qtail)
        r->qtail->next = c;
    else
        r->qhead = c;
    r->qtail = c;
    r->nqueued++;
}

static void call_free(mp_redis_call_t *c)
{
    for (int i = 0; i < c->ncmds; i++)
        if (c->replies[i])
            freeReplyObject(c->replies[i]);
    free(c->replies);
    free(c->cmd);
    free(c);
}

/* Ends c (off its connection or out of the queue already): its callback
 * with err or, err NULL, its replies; then frees it. */
static void call_end(mp_redis_call_t *c, const char *err)
{
    mp_redis_t *r = c->r;
    MP_ASSERT(!c->conn);
    ev_timer_stop(r->loop, &c->timer);
    if (c->cancelled) {
        r->ncancelled--;
    } else {
        r->in_cb++;
        if (err)
            c->cb(c->arg, NULL, 0, err);
        else
            c->cb(c->arg, c->replies, c->ncmds, NULL);
        r->in_cb--;
    }
    call_free(c);
}

/* -- connections -------------------------------------------------------- */

static void set_want(rconn_t *c, int events)
{
    if (c->want == events)
        return;
    ev_io_stop(c->r->loop, &c->io);
    ev_io_set(&c->io, c->sock.fd, events);
    if (events)
        ev_io_start(c->r->loop, &c->io);
    c->want = (uint8_t)events;
}

/* Closes c and frees it; its call, if any, must be detached first. */
static void conn_close(rconn_t *c)
{
    mp_redis_t *r = c->r;
    MP_ASSERT(!c->call);
    ev_io_stop(r->loop, &c->io);
    ev_timer_stop(r->loop, &c->timer);
    mp_io_close(&c->sock);
    redisReaderFree(c->reader);
    if (c->prev)
        c->prev->next = c->next;
    else
        r->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    r->nconns--;
    free(c);
}

static mp_redis_call_t *conn_detach(rconn_t *c)
{
    mp_redis_call_t *call = c->call;
    if (call)
        call->conn = NULL;
    c->call = NULL;
    return call;
}

/* A failure that says the server is not there (connect, AUTH/SELECT, a
 * broken connection): calls fail at once for the next delay. Failures
 * during a delay do not lengthen it. */
static void backoff_start(mp_redis_t *r, const char *why)
{
    double now = mono_now();
    r->failures++;
    snprintf(r->last_failure, sizeof(r->last_failure), "%s", why);
    if (now < r->retry_at)
        return;
    r->backoff = r->backoff > 0 ? r->backoff * 2 : r->backoff_min;
    if (r->backoff > r->backoff_max)
        r->backoff = r->backoff_max;
    r->retry_at = now + r->backoff;
    mp_log_limited(&r->log, MP_LOG_WARN, "redis %s: %s (reconnecting in %.1f s)", r->addr, why, r->backoff);
}

/* c failed (why: what happened, for the log and the call's err): closed,
 * its call ended, the waiting calls served (or failed, when down says the
 * server is not there and the reconnect delay starts). */
static void conn_fail(rconn_t *c, int down, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void conn_fail(rconn_t *c, int down, const char *fmt, ...)
{
    mp_redis_t *r = c->r;
    char why[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    if (down)
        backoff_start(r, why);
    else
        mp_log_limited(&r->log, MP_LOG_WARN, "redis %s: %s; connection closed", r->addr, why);
    mp_redis_call_t *call = conn_detach(c);
    conn_close(c);
    if (call)
        call_end(call, cb_msg(r, "%s", why));
    dispatch(r);
}

/* Starts a step: writes what it can of out now (no wait for the loop: the
 * socket is writable nearly always), the rest when the socket is writable.
 * An error is left to the watcher, which meets it again and fails c from
 * the loop: this runs inside mp_redis_send, which calls no callback. */
static void conn_write_step(rconn_t *c, const char *out, size_t len, int expect)
{
    c->out = out;
    c->outlen = len;
    c->outpos = 0;
    c->expect = expect;
    c->got = 0;
    while (c->outpos < c->outlen) {
        ssize_t n = mp_io_write(&c->sock, c->out + c->outpos, c->outlen - c->outpos);
        if (n > 0)
            c->outpos += (size_t)n;
        else if (!(n < 0 && errno == EINTR))
            break;
    }
    set_want(c, c->outpos < c->outlen ? EV_READ | EV_WRITE : EV_READ);
}

static void conn_idle(rconn_t *c)
{
    MP_ASSERT(!c->call);
    c->state = C_IDLE;
    c->out = NULL;
    c->expect = c->got = 0;
    set_want(c, EV_READ);
}

/* c has no call: idle in the pool, or closed when it is to an address the
 * client left (mp_redis_set_addr). */
static void conn_park(rconn_t *c)
{
    if (c->addr_gen != c->r->addr_gen)
        conn_close(c);
    else
        conn_idle(c);
}

/* c is ready: its call's commands go out, or (the call it was opened for
 * ended meanwhile) c serves the next waiting call; it may be gone after. */
static void conn_begin(rconn_t *c)
{
    mp_redis_t *r = c->r;
    mp_redis_call_t *call = c->call;
    ev_timer_stop(r->loop, &c->timer);
    if (!call) {
        conn_park(c);
        dispatch(r);
        return;
    }
    c->state = C_BUSY;
    conn_write_step(c, call->cmd, call->cmdlen, call->ncmds);
}

/* Connected: AUTH/SELECT first, if any. */
static void conn_connected(rconn_t *c)
{
    mp_redis_t *r = c->r;
    if (r->nhello) {
        c->state = C_HELLO;
        conn_write_step(c, r->hello, r->hellolen, r->nhello);
        return;
    }
    r->backoff = r->retry_at = 0;
    conn_begin(c);
}

static void on_conn_io(struct ev_loop *loop, ev_io *w, int revents);

/* Connecting, or AUTH/SELECT, took longer than connect_timeout: the server
 * does not answer (a call that gave up sooner left c going). */
static void on_conn_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    rconn_t *c = container_of(w, rconn_t, timer);
    conn_fail(c, 1, "%s", c->state == C_CONNECTING ? "connect timeout" : "AUTH/SELECT timeout");
}

/* A new connection for call (attached to it), or NULL with errno. */
static rconn_t *conn_open(mp_redis_t *r, mp_redis_call_t *call)
{
    rconn_t *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->reader = redisReaderCreate();
    if (!c->reader) {
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    int rc = mp_io_connect(&c->sock, (const struct sockaddr *)&r->ss, r->sslen);
    if (rc < 0) {
        int saved = errno;
        redisReaderFree(c->reader);
        free(c);
        errno = saved;
        return NULL;
    }
    c->r = r;
    c->addr_gen = r->addr_gen;
    ev_io_init(&c->io, on_conn_io, c->sock.fd, 0);
    c->next = r->conns;
    if (r->conns)
        r->conns->prev = c;
    r->conns = c;
    r->nconns++;
    r->connects++;
    c->call = call;
    call->conn = c;
    c->state = C_CONNECTING;
    ev_timer_init(&c->timer, on_conn_timeout, r->connect_timeout + loop_lag(r->loop), 0);
    ev_timer_start(r->loop, &c->timer);
    if (rc == 0)
        conn_connected(c);
    else
        set_want(c, EV_WRITE);
    return c;
}

/* An idle connection that still looks open (nothing to read, no EOF: a
 * server restart or its idle timeout closed the others, which are closed
 * here), or NULL. */
static rconn_t *conn_take_idle(mp_redis_t *r)
{
    rconn_t *c = r->conns, *next;
    for (; c; c = next) {
        next = c->next;
        if (c->state != C_IDLE)
            continue;
        ssize_t n = mp_io_peek(&c->sock);
        if (n < 0 && errno == EAGAIN)
            return c;
        conn_close(c);
    }
    return NULL;
}

static void conn_assign(rconn_t *c, mp_redis_call_t *call)
{
    c->call = call;
    call->conn = c;
    conn_begin(c);
}

/* The replies of the hello step: an error reply fails the connection.
 * Returns -1 when c is gone or done with the step (c must not be used). */
static int hello_reply(rconn_t *c, redisReply *rep)
{
    mp_redis_t *r = c->r;
    int idx = c->got++;
    if (rep->type == REDIS_REPLY_ERROR) {
        char what[24];
        if (idx == 0 && r->has_auth)
            snprintf(what, sizeof(what), "AUTH");
        else
            snprintf(what, sizeof(what), "SELECT %d", r->db);
        conn_fail(c, 1, "%s failed: %.*s", what, (int)(rep->len > 150 ? 150 : rep->len), rep->str);
        freeReplyObject(rep);
        return -1;
    }
    freeReplyObject(rep);
    if (c->got < c->expect)
        return 0;
    r->backoff = r->retry_at = 0;
    conn_begin(c);
    return -1; /* the call's replies cannot come before its commands are written */
}

/* c's call has all its replies. Bytes past them (none were asked for) mean
 * the connection is out of step, and a call that changed the connection's
 * state would leak it into the next one: c is closed rather than reused. */
static void conn_done(rconn_t *c)
{
    mp_redis_t *r = c->r;
    mp_redis_call_t *call = conn_detach(c);
    if (c->reader->len > c->reader->pos) {
        mp_log_limited(&r->log, MP_LOG_WARN, "redis %s: bytes past the replies; connection closed", r->addr);
        conn_close(c);
    } else if (call->leaves_state) {
        conn_close(c);
    } else {
        conn_park(c);
    }
    call_end(call, NULL);
    dispatch(r);
}

/* Takes the parsed replies off c's reader. Returns -1 when c is gone. */
static int conn_parse(rconn_t *c)
{
    for (;;) {
        void *p = NULL;
        if (redisReaderGetReply(c->reader, &p) != REDIS_OK) {
            conn_fail(c, 0, "protocol error: %s", c->reader->errstr);
            return -1;
        }
        if (!p)
            return 0;
        redisReply *rep = p;
        switch (c->state) {
        case C_HELLO:
            if (hello_reply(c, rep) < 0)
                return -1;
            break;
        case C_BUSY:
            c->call->replies[c->got++] = rep;
            if (c->got == c->expect) {
                conn_done(c);
                return -1;
            }
            break;
        default:
            freeReplyObject(rep);
            conn_fail(c, 0, "a reply nobody asked for");
            return -1;
        }
    }
}

static int conn_write(rconn_t *c)
{
    while (c->outpos < c->outlen) {
        ssize_t n = mp_io_write(&c->sock, c->out + c->outpos, c->outlen - c->outpos);
        if (n > 0) {
            c->outpos += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0;
        conn_fail(c, 1, "write: %s", n < 0 ? strerror(errno) : "nothing written");
        return -1;
    }
    set_want(c, EV_READ);
    return 0;
}

static void conn_read(rconn_t *c)
{
    char buf[16384];
    ssize_t n = mp_io_read(&c->sock, buf, sizeof(buf));
    if (n > 0) {
        if (c->state == C_IDLE) { /* out of step with us: not reused, but the server is there */
            mp_log_limited(&c->r->log, MP_LOG_WARN, "redis %s: bytes on an idle connection; closed", c->r->addr);
            conn_close(c);
            return;
        }
        if (redisReaderFeed(c->reader, buf, (size_t)n) != REDIS_OK) {
            conn_fail(c, 0, "reader: %s", c->reader->errstr);
            return;
        }
        conn_parse(c);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (c->state == C_IDLE) { /* the server's idle timeout, or a restart: the next call opens another */
        conn_close(c);
        return;
    }
    conn_fail(c, 1, "%s", n == 0 ? "connection closed by the server" : strerror(errno));
}

static void on_conn_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    rconn_t *c = container_of(w, rconn_t, io);
    if (c->state == C_CONNECTING) {
        int rc = mp_io_connect_result(&c->sock);
        if (rc != 0) {
            conn_fail(c, 1, "connect: %s", strerror(rc < 0 ? errno : rc));
            return;
        }
        conn_connected(c);
        return;
    }
    if ((revents & EV_WRITE) && conn_write(c) < 0)
        return;
    if (revents & EV_READ)
        conn_read(c);
}

/* -- the client --------------------------------------------------------- */

static int in_backoff(const mp_redis_t *r)
{
    return r->retry_at > mono_now();
}

/* Serves the waiting calls in order: an idle connection, a new one while
 * the pool has room, or (the server unavailable) an error at once. */
static void dispatch(mp_redis_t *r)
{
    while (r->qhead && !r->closing) {
        mp_redis_call_t *call = r->qhead;
        rconn_t *c = conn_take_idle(r);
        if (c) {
            queue_unlink(r, call);
            conn_assign(c, call);
            continue;
        }
        if (in_backoff(r)) {
            queue_unlink(r, call);
            call_end(call, cb_msg(r, "unavailable (reconnecting): %s", r->last_failure));
            continue;
        }
        if (r->nconns >= r->pool)
            return;
        queue_unlink(r, call);
        if (!conn_open(r, call)) {
            char what[200];
            snprintf(what, sizeof(what), "connect: %s", strerror(errno));
            backoff_start(r, what);
            call_end(call, cb_msg(r, "%s", what));
        }
    }
}

static void on_call_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    mp_redis_call_t *call = container_of(w, mp_redis_call_t, timer);
    mp_redis_t *r = call->r;
    rconn_t *c = call->conn;
    if (!c) {
        queue_unlink(r, call);
        call_end(call, cb_msg(r, "timeout"));
        return;
    }
    conn_detach(c);
    if (c->state == C_CONNECTING || c->state == C_HELLO) {
        /* nothing of the call was sent: the connection goes on, for the next call */
        call_end(call, cb_msg(r, "timeout"));
        return;
    }
    /* Its replies would come later, into the next call: the connection goes. */
    conn_close(c);
    call_end(call, cb_msg(r, "timeout"));
    dispatch(r);
}

static int format_hello(mp_redis_t *r, const mp_redis_opts_t *o)
{
    char dbs[16];
    const char *argv[2];
    size_t lens[2];
    char *cmds[2] = {NULL, NULL};
    int lenc[2] = {0, 0}, n = 0;
    if (r->has_auth) {
        argv[0] = "AUTH";
        lens[0] = 4;
        argv[1] = o->password;
        lens[1] = o->password_len ? o->password_len : strlen(o->password);
        if ((lenc[n] = redisFormatCommandArgv(&cmds[n], 2, argv, lens)) < 0)
            return -1;
        n++;
    }
    if (r->db) {
        argv[0] = "SELECT";
        lens[0] = 6;
        lens[1] = (size_t)snprintf(dbs, sizeof(dbs), "%d", r->db);
        argv[1] = dbs;
        if ((lenc[n] = redisFormatCommandArgv(&cmds[n], 2, argv, lens)) < 0) {
            redisFreeCommand(cmds[0]);
            return -1;
        }
        n++;
    }
    if (n == 0)
        return 0;
    r->hello = malloc((size_t)lenc[0] + (size_t)lenc[1]);
    if (r->hello) {
        memcpy(r->hello, cmds[0], (size_t)lenc[0]);
        if (n > 1)
            memcpy(r->hello + lenc[0], cmds[1], (size_t)lenc[1]);
        r->hellolen = (size_t)lenc[0] + (size_t)lenc[1];
        r->nhello = n;
    }
    for (int i = 0; i < n; i++)
        redisFreeCommand(cmds[i]);
    return r->hello ? 0 : -1;
}

static int addr_ok(const struct sockaddr *a, socklen_t len)
{
    return a && len <= sizeof(struct sockaddr_storage) &&
           ((a->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) ||
            (a->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)));
}

/* Whether a is r's address (family, address and port). */
static int addr_same(const mp_redis_t *r, const struct sockaddr *a)
{
    if (a->sa_family != r->ss.ss_family)
        return 0;
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)&r->ss;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)&r->ss;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

static void addr_set(mp_redis_t *r, const struct sockaddr *a, socklen_t len)
{
    memset(&r->ss, 0, sizeof(r->ss));
    memcpy(&r->ss, a, len);
    r->sslen = len;
    char host[INET6_ADDRSTRLEN];
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)a;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(r->addr, sizeof(r->addr), "%s:%u", host, ntohs(in->sin_port));
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        snprintf(r->addr, sizeof(r->addr), "[%s]:%u", host, ntohs(in6->sin6_port));
    }
}

mp_redis_t *mp_redis_new(struct ev_loop *loop, const mp_redis_opts_t *o)
{
    if (!addr_ok(o->addr, o->addrlen) || o->db < 0) {
        errno = EINVAL;
        return NULL;
    }
    mp_redis_t *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->loop = loop;
    addr_set(r, o->addr, o->addrlen);
    r->has_auth = o->password && (o->password_len || o->password[0]);
    r->db = o->db;
    r->timeout = o->timeout > 0 ? o->timeout : 1;
    r->connect_timeout = o->connect_timeout > 0 ? o->connect_timeout : r->timeout;
    r->pool = o->pool > 0 ? (unsigned)o->pool : 8;
    r->queue_max = o->queue > 0 ? (unsigned)o->queue : 64 * r->pool;
    r->backoff_min = o->backoff_min > 0 ? o->backoff_min : 0.1;
    r->backoff_max = o->backoff_max > 0 ? o->backoff_max : 5;
    if (r->backoff_max < r->backoff_min)
        r->backoff_max = r->backoff_min;
    if (format_hello(r, o) < 0) {
        free(r);
        errno = ENOMEM;
        return NULL;
    }
    return r;
}

void mp_redis_free(mp_redis_t *r)
{
    if (!r)
        return;
    MP_BUG_ON(r->in_cb);
    r->closing = 1;
    while (r->qhead) {
        mp_redis_call_t *call = r->qhead;
        queue_unlink(r, call);
        call_end(call, cb_msg(r, "client closed"));
    }
    while (r->conns) {
        rconn_t *c = r->conns;
        mp_redis_call_t *call = conn_detach(c);
        conn_close(c);
        if (call)
            call_end(call, cb_msg(r, "client closed"));
    }
    free(r->hello);
    free(r);
}

static int is_cmd(const char *name, size_t len, const char *upper)
{
    return len == strlen(upper) && strncasecmp(name, upper, len) == 0;
}

/* Whether the commands leave the connection in another state than a new
 * one's, so that it must not serve another call: another db or user, a
 * transaction or a WATCH still open, subscriber or monitor mode, the
 * connection's settings (CLIENT REPLY OFF, SETNAME, ...). */
static int leaves_state(int ncmds, const int *argc, const char *const *argv, const size_t *argvlen)
{
    static const char *const changers[] = {"SELECT",     "AUTH",    "HELLO",  "SUBSCRIBE", "PSUBSCRIBE",
                                           "SSUBSCRIBE", "MONITOR", "CLIENT", "RESET",     "READONLY",
                                           "READWRITE",  "SYNC",    "PSYNC",  "REPLCONF",  "QUIT"};
    int multi = 0, watch = 0;
    size_t off = 0;
    for (int i = 0; i < ncmds; off += (size_t)argc[i++]) {
        const char *name = argv[off];
        size_t len = argvlen ? argvlen[off] : strlen(name);
        if (is_cmd(name, len, "MULTI"))
            multi = 1;
        else if (is_cmd(name, len, "EXEC") || is_cmd(name, len, "DISCARD"))
            multi = watch = 0;
        else if (is_cmd(name, len, "WATCH"))
            watch = 1;
        else if (is_cmd(name, len, "UNWATCH") && !multi)
            watch = 0;
        else
            for (size_t k = 0; k < MP_ARRAY_LEN(changers); k++)
                if (is_cmd(name, len, changers[k]))
                    return 1;
    }
    return multi || watch;
}

/* Writes n in decimal at p; returns the digits written. */
static size_t put_len(char *p, size_t n)
{
    char tmp[24];
    size_t k = 0;
    do
        tmp[k++] = (char)('0' + n % 10);
    while ((n /= 10) != 0);
    for (size_t i = 0; i < k; i++)
        p[i] = tmp[k - 1 - i];
    return k;
}

/* The commands in RESP (arrays of bulk strings), one after another, into
 * call->cmd: sized first, then written in one allocation. */
static int format_cmds(mp_redis_call_t *call, int ncmds, const int *argc, const char *const *argv,
                       const size_t *argvlen)
{
    size_t len = 0, off = 0;
    for (int i = 0; i < ncmds; i++) {
        len += 1 + 20 + 2; /* "*N\r\n" */
        for (int j = 0; j < argc[i]; j++, off++)
            len += 1 + 20 + 2 + (argvlen ? argvlen[off] : strlen(argv[off])) + 2; /* "$L\r\n" arg "\r\n" */
    }
    char *out = malloc(len), *w = out;
    if (!out)
        return -1;
    off = 0;
    for (int i = 0; i < ncmds; i++) {
        *w++ = '*';
        w += put_len(w, (size_t)argc[i]);
        *w++ = '\r';
        *w++ = '\n';
        for (int j = 0; j < argc[i]; j++, off++) {
            size_t n = argvlen ? argvlen[off] : strlen(argv[off]);
            *w++ = '$';
            w += put_len(w, n);
            *w++ = '\r';
            *w++ = '\n';
            memcpy(w, argv[off], n);
            w += n;
            *w++ = '\r';
            *w++ = '\n';
        }
    }
    call->cmd = out;
    call->cmdlen = (size_t)(w - out);
    return 0;
}

mp_redis_call_t *mp_redis_send(mp_redis_t *r, int ncmds, const int *argc, const char *const *argv,
                               const size_t *argvlen, double timeout, mp_redis_cb cb, void *arg, const char **err)
{
    const char *dummy;
    if (!err)
        err = &dummy;
    if (r->closing)
        return *err = send_msg(r, "client closing"), NULL;
    if (ncmds < 1)
        return *err = send_msg(r, "no command"), NULL;
    for (int i = 0; i < ncmds; i++)
        if (argc[i] < 1)
            return *err = send_msg(r, "command %d of %d is empty", i + 1, ncmds), NULL;
    if (in_backoff(r))
        return *err = send_msg(r, "unavailable (reconnecting): %s", r->last_failure), NULL;
    rconn_t *idle = r->qhead ? NULL : conn_take_idle(r);
    int queue = !idle && (r->qhead || r->nconns >= r->pool);
    if (queue && r->nqueued >= r->queue_max)
        return *err = send_msg(r, "too many calls waiting (%u)", r->nqueued), NULL;

    mp_redis_call_t *call = calloc(1, sizeof(*call));
    if (!call || !(call->replies = calloc((size_t)ncmds, sizeof(*call->replies))) ||
        format_cmds(call, ncmds, argc, argv, argvlen) < 0) {
        if (call)
            free(call->replies);
        free(call);
        return *err = send_msg(r, "out of memory"), NULL;
    }
    call->r = r;
    call->cb = cb;
    call->arg = arg;
    call->ncmds = ncmds;
    call->leaves_state = leaves_state(ncmds, argc, argv, argvlen);
    ev_timer_init(&call->timer, on_call_timeout, (timeout > 0 ? timeout : r->timeout) + loop_lag(r->loop), 0);
    if (idle) {
        conn_assign(idle, call);
    } else if (queue) {
        queue_push(r, call);
    } else if (!conn_open(r, call)) {
        char what[200];
        snprintf(what, sizeof(what), "connect: %s", strerror(errno));
        backoff_start(r, what);
        call_free(call);
        return *err = send_msg(r, "%s", what), NULL;
    }
    ev_timer_start(r->loop, &call->timer);
    return call;
}

mp_redis_call_t *mp_redis_command(mp_redis_t *r, int argc, const char *const *argv, const size_t *argvlen,
                                  double timeout, mp_redis_cb cb, void *arg, const char **err)
{
    return mp_redis_send(r, 1, &argc, argv, argvlen, timeout, cb, arg, err);
}

void mp_redis_cancel(mp_redis_call_t *c)
{
    mp_redis_t *r = c->r;
    MP_ASSERT(!c->cancelled);
    if (!c->conn || c->conn->state == C_CONNECTING || c->conn->state == C_HELLO) {
        if (c->conn) /* nothing sent yet: the connection goes on, for the next call */
            conn_detach(c->conn);
        else
            queue_unlink(r, c);
        ev_timer_stop(r->loop, &c->timer);
        call_free(c);
        return;
    }
    c->cancelled = 1;
    r->ncancelled++;
}

void mp_redis_stats(const mp_redis_t *r, mp_redis_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    for (const rconn_t *c = r->conns; c; c = c->next)
        st->idle += c->state == C_IDLE;
    st->conns = r->nconns;
    st->queued = r->nqueued;
    st->cancelled = r->ncancelled;
    st->connects = r->connects;
    st->failures = r->failures;
}

const char *mp_redis_addr(const mp_redis_t *r)
{
    return r->addr;
}

int mp_redis_set_addr(mp_redis_t *r, const struct sockaddr *addr, socklen_t addrlen)
{
    if (!addr_ok(addr, addrlen))
        return -1;
    if (addr_same(r, addr))
        return 0;
    addr_set(r, addr, addrlen);
    r->addr_gen++;
    /* the delay was the old address's: the new one is tried at the next call */
    r->backoff = r->retry_at = 0;
    rconn_t *c = r->conns, *next;
    for (; c; c = next) {
        next = c->next;
        if (c->state == C_IDLE)
            conn_close(c);
    }
    return 1;
}
