/* tunnel.c: an upgraded connection, bytes both ways (tunnel.h). Each side
 * has a watcher and the buffer of what was read from it for the other
 * side. A direction reads only while its buffer is empty and writes what it
 * read at once; what the other side cannot take yet stays in the buffer and
 * stops the reading (back-pressure), and an empty buffer goes back to the
 * worker's free list, so an idle tunnel holds none. Between two plain
 * sockets the buffer may be a pipe, the bytes moving by splice(2), never
 * through user space (MOONPROXY_SPLICE=1; the worker keeps a few empty
 * pipes for reuse). */
#include "tunnel.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Reads from one side per readiness event before the loop serves others:
 * level-triggered readiness brings it back for the rest. */
#define TUNNEL_ROUNDS 8

/* The most one splice(2) moves from a socket into a pipe: the pipe's
 * default capacity. */
#define SPLICE_CHUNK 65536

enum { CLIENT = 0, UPSTREAM = 1 };

typedef struct {
    mp_io_t sock;
    ev_io w;
    uint8_t eof;  /* its read ended: nothing more comes from it */
    uint8_t shut; /* our writing to it ended (shutdown sent) */
    mp_buf_t buf; /* bytes read from it, for the other side; no block while empty */
    int pipe[2];  /* splice: the pipe holding bytes read from it, -1 while none */
    size_t piped; /* bytes in that pipe */
} tside_t;

struct mp_tunnel {
    mp_io_ctx_t *ctx;
    tside_t s[2];     /* CLIENT, UPSTREAM */
    ev_timer timer;   /* idle timeout, and the shutdown's moment */
    double idle;      /* seconds without a byte before it closes */
    double last;      /* loop time of the last byte moved */
    double close_at;  /* loop time the worker's shutdown closes it; 0: not stopping */
    int8_t first_eof; /* the side whose read ended first, -1 */
    uint8_t splice;   /* both sides plain: bytes move through pipes, never through user space */
    mp_tunnel_info_t info;
    mp_tunnel_closed_fn closed;
    void *arg;
    mp_tunnel_t *prev, *next; /* ctx->tunnels */
};

_Static_assert(MP_TC_REASONS == MP_METRICS_TUNNEL_REASONS, "metrics.h counts every close reason");

static void on_io(struct ev_loop *loop, ev_io *w, int revents);
static void on_timer(struct ev_loop *loop, ev_timer *w, int revents);

/* A pipe for side s (a direction takes one only while it moves bytes,
 * from ctx's empty ones first); 0, or -1 when none can be had (then s
 * copies through a buffer). */
static int pipe_take(mp_io_ctx_t *ctx, tside_t *s)
{
    if (s->pipe[0] >= 0)
        return 0;
    if (ctx->ntunnel_pipes) {
        ctx->ntunnel_pipes--;
        s->pipe[0] = ctx->tunnel_pipes[ctx->ntunnel_pipes][0];
        s->pipe[1] = ctx->tunnel_pipes[ctx->ntunnel_pipes][1];
        return 0;
    }
    return pipe2(s->pipe, O_NONBLOCK | O_CLOEXEC);
}

/* Gives s's pipe back to ctx (it must be empty), or closes it (close_it:
 * it may hold bytes). */
static void pipe_give(mp_io_ctx_t *ctx, tside_t *s, int close_it)
{
    if (s->pipe[0] < 0)
        return;
    if (!close_it && ctx->ntunnel_pipes < MP_ARRAY_LEN(ctx->tunnel_pipes)) {
        ctx->tunnel_pipes[ctx->ntunnel_pipes][0] = s->pipe[0];
        ctx->tunnel_pipes[ctx->ntunnel_pipes][1] = s->pipe[1];
        ctx->ntunnel_pipes++;
    } else {
        close(s->pipe[0]);
        close(s->pipe[1]);
    }
    s->pipe[0] = s->pipe[1] = -1;
    s->piped = 0;
}

/* Bytes read from s that the other side has not taken yet. */
static size_t pending(const tside_t *s)
{
    return mp_buf_len(&s->buf) + s->piped;
}

/* Closes both sockets, tells the opener, frees t. Returns -1, for the
 * callers' "t is gone". */
static int close_tunnel(mp_tunnel_t *t, int reason)
{
    mp_io_ctx_t *ctx = t->ctx;
    for (int i = 0; i < 2; i++) {
        ev_io_stop(ctx->loop, &t->s[i].w);
        mp_io_close(&t->s[i].sock);
        mp_buf_release(&t->s[i].buf, &ctx->bufs);
        pipe_give(ctx, &t->s[i], t->s[i].piped > 0);
    }
    ev_timer_stop(ctx->loop, &t->timer);
    if (t->prev)
        t->prev->next = t->next;
    else
        ctx->tunnels = t->next;
    if (t->next)
        t->next->prev = t->prev;
    ctx->nconns--;
    ctx->room_freed = 1;
    mp_metrics_add(&ctx->metrics.conns, -1);
    mp_metrics_add(&ctx->metrics.tunnels, -1);
    mp_metrics_add(&ctx->metrics.tunnels_closed[reason], 1);
    t->info.close = (uint8_t)reason;
    t->closed(t->arg, &t->info);
    free(t);
    return -1;
}

/* Which side ended the tunnel when side i failed: the one whose read
 * ended first, if one did (the other side's failure follows from it). */
static int blame(const mp_tunnel_t *t, int i)
{
    return t->first_eof >= 0 ? t->first_eof : i;
}

/* Why the tunnel ends when side i fails or ends it. */
static int reason_of(int i)
{
    return i == CLIENT ? MP_TC_CLIENT : MP_TC_UPSTREAM;
}

/* k bytes read from side `from` reached the other side. */
static void moved_bytes(mp_tunnel_t *t, int from, size_t k)
{
    *(from == CLIENT ? &t->info.to_upstream : &t->info.to_client) += k;
    mp_metrics_add(&t->ctx->metrics.tunnel_bytes[from], (int64_t)k);
    t->last = ev_now(t->ctx->loop);
}

/* Side i's read ended. */
static void ended(mp_tunnel_t *t, int i)
{
    t->s[i].eof = 1;
    if (t->first_eof < 0)
        t->first_eof = (int8_t)i;
}

/* Moves bytes read from side `from` to the other side: what its buffer
 * holds first, then reads more, until the other side blocks, this one has
 * nothing, or TUNNEL_ROUNDS reads were made. An ended read is passed on as
 * a shutdown of the other side's writing once everything before it went;
 * both ended close the tunnel. Returns 0, or -1 when the tunnel closed. */
static int pump(mp_tunnel_t *t, int from)
{
    tside_t *a = &t->s[from], *b = &t->s[!from];
    for (int rounds = 0;;) {
        size_t len = mp_buf_len(&a->buf);
        if (len) {
            ssize_t k = mp_io_write(&b->sock, mp_buf_head(&a->buf), len);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0 && errno == EAGAIN)
                return 0;
            if (k < 0)
                return close_tunnel(t, reason_of(blame(t, !from)));
            a->buf.start += (uint32_t)k;
            moved_bytes(t, from, (size_t)k);
            continue;
        }
        if (a->buf.data)
            mp_buf_release(&a->buf, &t->ctx->bufs);
        if (a->piped) {
            ssize_t k = splice(a->pipe[0], NULL, b->sock.fd, NULL, a->piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0 && errno == EAGAIN)
                return 0;
            if (k <= 0)
                return close_tunnel(t, reason_of(blame(t, !from)));
            a->piped -= (size_t)k;
            moved_bytes(t, from, (size_t)k);
            continue;
        }
        if (a->eof) {
            if (!b->shut) {
                b->shut = 1;
                if (mp_io_shutdown_write(&b->sock) != 0 && errno != ENOTCONN)
                    return close_tunnel(t, reason_of(blame(t, !from)));
            }
            if (b->eof && a->shut)
                return close_tunnel(t, reason_of(t->first_eof));
            return 0;
        }
        if (rounds++ == TUNNEL_ROUNDS)
            return 0;
        if (t->splice && pipe_take(t->ctx, a) == 0) {
            ssize_t n = splice(a->sock.fd, NULL, a->pipe[1], NULL, SPLICE_CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno == EAGAIN)
                return 0; /* nothing to read (the pipe is empty): it goes back in sync_side */
            if (n < 0)
                return close_tunnel(t, reason_of(blame(t, from)));
            if (n == 0) {
                ended(t, from);
                continue;
            }
            a->piped = (size_t)n;
            t->last = ev_now(t->ctx->loop);
            continue;
        }
        if (mp_buf_acquire(&a->buf, &t->ctx->bufs) != 0)
            return close_tunnel(t, MP_TC_ERROR);
        ssize_t n = mp_io_read(&a->sock, mp_buf_tail(&a->buf), mp_buf_room(&a->buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0; /* the empty buffer goes back at the next turn's top */
        if (n < 0)
            return close_tunnel(t, reason_of(blame(t, from))); /* a reset, or a TLS session cut without close_notify */
        if (n == 0) {
            ended(t, from);
            continue;
        }
        a->buf.end += (uint32_t)n;
        t->last = ev_now(t->ctx->loop);
    }
}

/* Points side i's watcher at what it waits for: reading while its buffer
 * is empty and its read has not ended, writing while the other side's
 * buffer holds bytes for it. Over TLS the session may need the other
 * readiness, and bytes it holds are read without waiting. */
static void sync_side(mp_tunnel_t *t, int i)
{
    tside_t *s = &t->s[i];
    if (s->buf.data && !mp_buf_len(&s->buf))
        mp_buf_release(&s->buf, &t->ctx->bufs);
    if (s->pipe[0] >= 0 && !s->piped)
        pipe_give(t->ctx, s, 0);
    int want = (!s->eof && !pending(s) ? EV_READ : 0) | (pending(&t->s[!i]) ? EV_WRITE : 0);
    int events = mp_io_events(&s->sock, want);
    if ((s->w.events & (EV_READ | EV_WRITE)) != events || (events == 0) != !ev_is_active(&s->w)) {
        ev_io_stop(t->ctx->loop, &s->w);
        ev_io_modify(&s->w, events);
        if (events)
            ev_io_start(t->ctx->loop, &s->w);
    }
    if (MP_UNLIKELY(s->sock.ops != NULL) && (want & EV_READ) && mp_io_pending(&s->sock))
        ev_feed_event(t->ctx->loop, &s->w, EV_READ);
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    mp_tunnel_t *t = w->data;
    int i = w == &t->s[UPSTREAM].w;
    tside_t *s = &t->s[i];
    if (MP_UNLIKELY(s->sock.ops != NULL)) {
        revents = mp_io_revents(&s->sock, revents);
        if (mp_io_pending(&s->sock))
            revents |= EV_READ;
    }
    if ((revents & EV_WRITE) && pump(t, !i) < 0) /* flush into side i what the other side sent */
        return;
    if ((revents & EV_READ) && pump(t, i) < 0)
        return;
    sync_side(t, i);
    sync_side(t, !i);
}

static void arm_timer(mp_tunnel_t *t, double now)
{
    double at = t->last + t->idle;
    if (t->close_at > 0 && t->close_at < at)
        at = t->close_at;
    t->timer.repeat = at > now ? at - now : 0.001;
    ev_timer_again(t->ctx->loop, &t->timer);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    mp_tunnel_t *t = container_of(w, mp_tunnel_t, timer);
    double now = ev_now(loop);
    if (t->close_at > 0 && now >= t->close_at) {
        close_tunnel(t, MP_TC_SHUTDOWN);
        return;
    }
    if (now - t->last >= t->idle) {
        close_tunnel(t, MP_TC_IDLE);
        return;
    }
    arm_timer(t, now);
}

static void take_side(mp_tunnel_t *t, int i, mp_io_t *sock, mp_buf_t *in)
{
    tside_t *s = &t->s[i];
    s->sock = *sock;
    sock->fd = -1;
    sock->ops = NULL;
    sock->session = NULL;
    s->buf = *in;
    memset(in, 0, sizeof(*in));
    ev_io_init(&s->w, on_io, s->sock.fd, 0);
    s->w.data = t;
    s->pipe[0] = s->pipe[1] = -1;
}

/* splice(2) between plain sockets only with MOONPROXY_SPLICE=1: on
 * loopback it saved no CPU per MiB over read/write through a 32 KiB buffer
 * (0.68 against 0.63 ms/MiB) and cost a quarter more per small message
 * (18.2 against 14.0 µs), scripts/bench/websocket.sh; a real NIC may differ. */
static int splice_on(void)
{
    const char *v = getenv("MOONPROXY_SPLICE");
    return v && strcmp(v, "1") == 0;
}

mp_tunnel_t *mp_tunnel_open(mp_io_ctx_t *ctx, mp_io_t *client, mp_buf_t *client_in, mp_io_t *up, mp_buf_t *up_in,
                            double idle, mp_tunnel_closed_fn closed, void *arg)
{
    mp_tunnel_t *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->ctx = ctx;
    take_side(t, CLIENT, client, client_in);
    take_side(t, UPSTREAM, up, up_in);
    t->idle = idle > 0 ? idle : 3600;
    t->last = ev_now(ctx->loop);
    t->first_eof = -1;
    t->splice = !t->s[CLIENT].sock.ops && !t->s[UPSTREAM].sock.ops && splice_on();
    t->closed = closed;
    t->arg = arg;
    t->next = ctx->tunnels;
    if (ctx->tunnels)
        ctx->tunnels->prev = t;
    ctx->tunnels = t;
    ctx->nconns++;
    mp_metrics_add(&ctx->metrics.conns, 1);
    mp_metrics_add(&ctx->metrics.tunnels, 1);
    ev_init(&t->timer, on_timer);
    if (ctx->stopping) /* opened while the worker stops: it closes soon */
        t->close_at = t->last + 1;
    arm_timer(t, t->last);
    /* bytes read before the tunnel opened are written once the other side is writable */
    sync_side(t, CLIENT);
    sync_side(t, UPSTREAM);
    return t;
}

void mp_tunnel_drain(mp_io_ctx_t *ctx, double first, double last)
{
    double now = ev_now(ctx->loop);
    if (last < first)
        last = first;
    for (mp_tunnel_t *t = ctx->tunnels; t; t = t->next) {
        double u = (double)(mp_req_rand(&ctx->env) >> 11) / 9007199254740992.0; /* [0, 1) */
        t->close_at = now + first + u * (last - first);
        arm_timer(t, now);
    }
}

void mp_tunnel_close_all(mp_io_ctx_t *ctx)
{
    while (ctx->tunnels)
        close_tunnel(ctx->tunnels, MP_TC_SHUTDOWN);
    while (ctx->ntunnel_pipes) {
        ctx->ntunnel_pipes--;
        close(ctx->tunnel_pipes[ctx->ntunnel_pipes][0]);
        close(ctx->tunnel_pipes[ctx->ntunnel_pipes][1]);
    }
}
