/* redis.h: a Redis client on a worker's loop (L3): RESP over our own
 * non-blocking sockets and timers, hiredis' reader parsing the replies. One
 * client is one server (an address, a password, a db) with a pool of
 * connections, in one thread; a call is one command or a pipeline, and its
 * completion is a callback (the Lua binding yields on it and resumes).
 *
 * A connection carries one call at a time. A call takes an idle connection,
 * else opens one while the pool has room, else waits in a bounded queue.
 * When the server looks gone (a connect refused or past connect_timeout,
 * AUTH/SELECT refused or past it, a connection broken during a call) the client waits
 * before it tries again, backoff_min doubling to backoff_max while it stays
 * gone: meanwhile every call fails at once, even one an idle connection
 * could carry, so that a caller with a fallback (a rate limit's circuit)
 * pays no timeout. The first call after the delay tries again; a
 * connection that gets through AUTH/SELECT ends the delays. A server
 * closing an idle connection (its `timeout`, a restart) is not a failure:
 * the connection is dropped, found closed at the latest when a call would
 * take it. */
#ifndef MP_REDIS_H
#define MP_REDIS_H

#include "common.h"

#include <ev.h>
#include <hiredis/hiredis.h>
#include <sys/socket.h>

typedef struct mp_redis mp_redis_t;
typedef struct mp_redis_call mp_redis_call_t;

/* What mp_redis_new copies; a zeroed struct but addr takes every default. */
typedef struct {
    const struct sockaddr *addr; /* the server (IPv4 or IPv6; a name is resolved before) */
    socklen_t addrlen;
    const char *password;   /* NULL or "": no AUTH; else AUTH password on every new connection */
    size_t password_len;    /* 0 with a password: strlen(password) */
    int db;                 /* SELECT db on every new connection when not 0 */
    double timeout;         /* a call's default timeout, seconds (<= 0: 1 s) */
    double connect_timeout; /* connecting and AUTH/SELECT, seconds (<= 0: timeout): past it the server
                             * is taken for gone; a call that gives up sooner leaves it going */
    int pool;               /* connections at most (<= 0: 8) */
    int queue;              /* calls waiting for a connection at most (<= 0: 64 per connection) */
    double backoff_min;     /* the first reconnect delay after a failure, seconds (<= 0: 0.1) */
    double backoff_max;     /* ... doubling up to this (<= 0: 5) */
} mp_redis_opts_t;

/* A call's end, called once from the loop (never from inside mp_redis_send
 * or mp_redis_cancel): err NULL and n replies, one per command, in order (a
 * command Redis refused is a REDIS_REPLY_ERROR entry); or err set, replies
 * NULL and n 0. err is "redis ADDR: what" ("redis 127.0.0.1:6379: timeout",
 * "...: AUTH failed: WRONGPASS ...", "...: connection closed by the server",
 * "...: unavailable (reconnecting): connect: Connection refused": the last
 * failure, during the delay after it); it
 * and the replies are the client's, valid until the callback returns (copy
 * what you keep). The callback may send calls; it may not free the client. */
typedef void (*mp_redis_cb)(void *arg, redisReply **replies, int n, const char *err);

/* How the pool stands (for tests and metrics). */
typedef struct {
    unsigned conns;                   /* open or opening */
    unsigned idle;                    /* of them, waiting for a call */
    unsigned queued;                  /* calls waiting for a connection */
    unsigned cancelled;               /* cancelled calls whose replies are still read and dropped */
    unsigned long connects, failures; /* connections opened, and failures that started or met a reconnect
                                       * delay (connect, AUTH/SELECT, a broken connection), ever */
} mp_redis_stats_t;

/* A client on loop (the calling thread's; every call of this API runs on
 * it), or NULL with errno (EINVAL: no address or a bad one; ENOMEM). Opens
 * no connection yet: the first call does. The process ignores SIGPIPE (as
 * main.c does): a write to a connection the server closed is an error. */
mp_redis_t *mp_redis_new(struct ev_loop *loop, const mp_redis_opts_t *o);

/* Fails every pending call with "redis ADDR: client closed" (their callbacks
 * run here, and any call they send fails at once), drops the cancelled
 * ones, closes the connections and frees r. NULL: nothing. Not from inside
 * one of r's callbacks. */
void mp_redis_free(mp_redis_t *r);

/* Sends ncmds commands as one pipeline, written in one write on one
 * connection: command i is argc[i] arguments, taken in turn from argv (with
 * lengths argvlen: binary safe; NULL: strlen), all copied. timeout in
 * seconds covers the whole call (waiting for a connection, connecting,
 * AUTH/SELECT, the replies); <= 0 takes the client's. Returns the call,
 * owned by r until its callback returns or it is cancelled; or NULL, no
 * callback to come, with *err (when err is not NULL) set to why, valid
 * until r's next call: no command or an empty one, the queue full, the
 * server down and its reconnect delay not over ("unavailable
 * (reconnecting)": fails at once, costing no timeout), the client closing,
 * no memory. */
mp_redis_call_t *mp_redis_send(mp_redis_t *r, int ncmds, const int *argc, const char *const *argv,
                               const size_t *argvlen, double timeout, mp_redis_cb cb, void *arg, const char **err);

/* A call whose commands change the connection's state for later calls
 * (SELECT, AUTH, HELLO, CLIENT, RESET, SUBSCRIBE and the like, MONITOR,
 * MULTI or WATCH left open at its end) runs on its connection as any other,
 * which is then closed rather than pooled: every call starts on a connection
 * in the client's db with its password, outside a transaction. */

/* One command: mp_redis_send with ncmds 1. */
mp_redis_call_t *mp_redis_command(mp_redis_t *r, int argc, const char *const *argv, const size_t *argvlen,
                                  double timeout, mp_redis_cb cb, void *arg, const char **err);

/* The caller went away: c's callback is never called and c must not be
 * used again. A call in flight keeps its connection until its replies came
 * (read and dropped, then the connection serves the next call) or its
 * timeout closes it; a waiting one is dropped at once, and so is one whose
 * connection is still opening (which goes on, for the next call). */
void mp_redis_cancel(mp_redis_call_t *c);

void mp_redis_stats(const mp_redis_t *r, mp_redis_stats_t *st);

/* "ADDR" of the messages: "127.0.0.1:6379", "[::1]:6379". */
const char *mp_redis_addr(const mp_redis_t *r);

/* The server moved (its name now resolves elsewhere): new connections go to
 * addr (copied); idle ones to the old address are closed at once, and those
 * carrying or opening for a call when that call ends; a reconnect delay the
 * old address started is over. Returns 1 when the address changed, 0 when
 * it was r's already, -1 (nothing changed) for a bad address. */
int mp_redis_set_addr(mp_redis_t *r, const struct sockaddr *addr, socklen_t addrlen);

#endif
