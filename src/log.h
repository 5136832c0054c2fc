/* log.h: the error log (stderr, one line per event, with level and worker)
 * and the access log (one JSON object per line, buffered per worker and
 * written once per loop iteration). */
#ifndef MP_LOG_H
#define MP_LOG_H

#include "common.h"

#include <stdarg.h>
#include <stdint.h>

enum { MP_LOG_DEBUG, MP_LOG_INFO, MP_LOG_WARN, MP_LOG_ERROR };

extern int mp_log_level;

/* Parses "debug|info|warn|error"; returns the level or -1. */
int mp_log_parse_level(const char *s);

/* Writes "<ISO time> [level] <message>\n" to stderr in one write(2), or
 * hands the message to the calling thread's capture function. */
void mp_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Sends this thread's log messages to fn instead of stderr (NULL: back to
 * stderr). The simulator keeps them with the request that caused them. */
void mp_log_capture(void (*fn)(void *arg, int level, const char *msg), void *arg);

/* A rate limit for one repeated log line (a static per call site): at most
 * one line a second, from any thread; the next line after a quiet spell
 * says how many were suppressed. A zeroed struct is ready. */
typedef struct {
    _Atomic int64_t next_ms;     /* monotonic ms before which lines are suppressed */
    _Atomic uint64_t suppressed; /* lines dropped since the last one written */
} mp_log_limit_t;

/* mp_log under lim: writes the line (with " (N more suppressed)" when some
 * were dropped) or counts it as suppressed. Returns 1 when written. */
int mp_log_limited(mp_log_limit_t *lim, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The check of mp_log_limited alone, for a caller that formats its line
 * itself: 1 when this line is to be written (suffix then holds " (N more
 * suppressed)" or ""), 0 when it is dropped (below the level and not
 * captured, or counted as suppressed). Nothing is formatted for a dropped
 * line. */
int mp_log_limit_claim(mp_log_limit_t *lim, int level, char *suffix, size_t n);

#define mp_log_debug(...) (mp_log_level <= MP_LOG_DEBUG ? mp_log(MP_LOG_DEBUG, __VA_ARGS__) : (void)0)
#define mp_log_info(...) (mp_log_level <= MP_LOG_INFO ? mp_log(MP_LOG_INFO, __VA_ARGS__) : (void)0)
#define mp_log_warn(...) mp_log(MP_LOG_WARN, __VA_ARGS__)
#define mp_log_error(...) mp_log(MP_LOG_ERROR, __VA_ARGS__)

/* Appends s to out[len..cap) as JSON string contents (no quotes): bytes
 * >= 0x80 pass through, control bytes and quotes are escaped; stops short
 * rather than overflow. Returns the new length. */
size_t mp_json_escape(char *out, size_t len, size_t cap, mp_slice s);

/* One access log sink per worker. A zeroed struct with fd = -1 is off. */
typedef struct {
    int fd; /* -1: off; shared between workers (opened O_APPEND once) */
    size_t len;
    char buf[16384];
    uint64_t dropped; /* lines lost to a failing write */
    int failing;      /* the last write failed: reported once, until one succeeds */
} mp_alog_t;

/* Opens the access log target: NULL = off (-1), "stdout" (1), or a path
 * opened O_APPEND. Returns the fd, -1 for off, or MP_EIO. */
int mp_alog_open(const char *target);

/* What one access log line records. */
typedef struct {
    double time; /* request start, epoch seconds */
    mp_slice id, trace_id, span_id, client, method, path, route, upstream_server;
    mp_slice tls, sni; /* the client's TLS version and SNI; empty (len 0): not written (plain, or no SNI) */
    int status;
    uint64_t bytes;                 /* response bytes sent to the client, head included */
    double upstream_time, duration; /* seconds; upstream_time < 0: no upstream */
    const char *tunnel_close;       /* a tunnel's line: why it closed ("client", ...); NULL: not a tunnel */
    mp_slice extra;                 /* more fields, rendered: ,"name":value... (on_log's req.log), or empty */
    uint64_t tunnel_to_upstream, tunnel_to_client; /* bytes it relayed each way */
} mp_alog_entry_t;

/* The fields of an access log line, in the order they are written
 * (settings.access_log = { fields = {...} } chooses some: a bit each). */
enum {
    MP_ALOG_TIME,
    MP_ALOG_ID,
    MP_ALOG_TRACE_ID,
    MP_ALOG_SPAN_ID,
    MP_ALOG_CLIENT,
    MP_ALOG_METHOD,
    MP_ALOG_PATH,
    MP_ALOG_ROUTE,
    MP_ALOG_TLS,
    MP_ALOG_SNI,
    MP_ALOG_STATUS,
    MP_ALOG_BYTES,
    MP_ALOG_UPSTREAM,
    MP_ALOG_UPSTREAM_TIME,
    MP_ALOG_TUNNEL,
    MP_ALOG_DURATION,
    MP_ALOG_NFIELDS
};
#define MP_ALOG_ALL ((1u << MP_ALOG_NFIELDS) - 1)

/* A field's bit number by name ("status"), or -1; its name by number, or NULL. */
int mp_alog_field(const char *name);
const char *mp_alog_field_name(int i);

/* Appends e's line with the fields whose bit is set (MP_ALOG_ALL: all);
 * e->extra goes last. */
void mp_alog_write(mp_alog_t *a, const mp_alog_entry_t *e, uint32_t fields);

/* Writes what is buffered. Called before the loop blocks. */
void mp_alog_flush(mp_alog_t *a);

#endif
