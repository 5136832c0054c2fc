/* log.c: error log lines and JSON access log lines. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int mp_log_level = MP_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int mp_log_parse_level(const char *s)
{
    for (int i = 0; i < (int)MP_ARRAY_LEN(level_names); i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

static size_t format_time(char *out, size_t n, double t)
{
    time_t sec = (time_t)t;
    struct tm tm;
    gmtime_r(&sec, &tm);
    size_t len = strftime(out, n, "%Y-%m-%dT%H:%M:%S", &tm);
    len += (size_t)snprintf(out + len, n - len, ".%03dZ", (int)((t - (double)sec) * 1000));
    return len;
}

static double now_epoch(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static _Thread_local void (*capture_fn)(void *arg, int level, const char *msg);
static _Thread_local void *capture_arg;

void mp_log_capture(void (*fn)(void *arg, int level, const char *msg), void *arg)
{
    capture_fn = fn;
    capture_arg = arg;
}

static void log_v(int level, const char *suffix, const char *fmt, va_list ap)
{
    if (capture_fn) {
        char text[1024];
        vsnprintf(text, sizeof(text), fmt, ap);
        return capture_fn(capture_arg, level, text);
    }
    if (level < mp_log_level)
        return;
    char line[2048];
    size_t len = format_time(line, sizeof(line), now_epoch());
    len += (size_t)snprintf(line + len, sizeof(line) - len, " [%s] ", level_names[level]);
    char msg[1024];
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    if (n >= 0 && suffix && (size_t)n < sizeof(msg))
        n += snprintf(msg + n, sizeof(msg) - (size_t)n, "%s", suffix);
    size_t mlen = n < 0 ? 0 : ((size_t)n >= sizeof(msg) ? sizeof(msg) - 1 : (size_t)n);
    /* One event, one line: bytes from peers or scripts cannot break it. */
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < mlen && len + 5 < sizeof(line); i++) {
        unsigned char c = (unsigned char)msg[i];
        if (c >= 0x20 && c != 0x7f) {
            line[len++] = (char)c;
        } else {
            line[len++] = '\\';
            line[len++] = 'x';
            line[len++] = hex[c >> 4];
            line[len++] = hex[c & 15];
        }
    }
    line[len++] = '\n';
    ssize_t unused = write(2, line, len); /* a lost log line is all we can do */
    (void)unused;
}

void mp_log(int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_v(level, NULL, fmt, ap);
    va_end(ap);
}

static int64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int mp_log_limit_claim(mp_log_limit_t *lim, int level, char *suffix, size_t n)
{
    suffix[0] = '\0';
    if (level < mp_log_level && !capture_fn)
        return 0;
    int64_t now = monotonic_ms(), next = atomic_load(&lim->next_ms);
    /* one thread wins the second; the others only count */
    if (now < next || !atomic_compare_exchange_strong(&lim->next_ms, &next, now + 1000)) {
        atomic_fetch_add(&lim->suppressed, 1);
        return 0;
    }
    uint64_t dropped = atomic_exchange(&lim->suppressed, 0);
    if (dropped)
        snprintf(suffix, n, " (%llu more suppressed)", (unsigned long long)dropped);
    return 1;
}

int mp_log_limited(mp_log_limit_t *lim, int level, const char *fmt, ...)
{
    char suffix[64];
    if (!mp_log_limit_claim(lim, level, suffix, sizeof(suffix)))
        return 0;
    va_list ap;
    va_start(ap, fmt);
    log_v(level, suffix, fmt, ap);
    va_end(ap);
    return 1;
}

int mp_alog_open(const char *target)
{
    if (!target)
        return -1;
    if (strcmp(target, "stdout") == 0)
        return 1;
    int fd = open(target, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    return fd < 0 ? MP_EIO : fd;
}

size_t mp_json_escape(char *out, size_t len, size_t cap, mp_slice s)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < s.len && len + 6 < cap; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c == '"' || c == '\\') {
            out[len++] = '\\';
            out[len++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(out + len, "\\u00", 4);
            out[len + 4] = hex[c >> 4];
            out[len + 5] = hex[c & 15];
            len += 6;
        } else {
            out[len++] = (char)c;
        }
    }
    return len;
}

static size_t json_field(char *out, size_t len, size_t cap, const char *key, mp_slice v)
{
    len += (size_t)snprintf(out + len, cap - len, ",\"%s\":\"", key);
    if (len >= cap)
        return cap;
    len = mp_json_escape(out, len, cap, v);
    if (len < cap)
        out[len++] = '"';
    return len;
}

static const char *const FIELD_NAMES[MP_ALOG_NFIELDS] = {
    "time", "id",  "trace_id", "span_id", "client",   "method",        "path",   "route",
    "tls",  "sni", "status",   "bytes",   "upstream", "upstream_time", "tunnel", "duration"};

int mp_alog_field(const char *name)
{
    for (int i = 0; i < MP_ALOG_NFIELDS; i++)
        if (strcmp(name, FIELD_NAMES[i]) == 0)
            return i;
    return -1;
}

const char *mp_alog_field_name(int i)
{
    return i >= 0 && i < MP_ALOG_NFIELDS ? FIELD_NAMES[i] : NULL;
}

#define HAS(f) (fields & (1u << (f)))

void mp_alog_write(mp_alog_t *a, const mp_alog_entry_t *e, uint32_t fields)
{
    if (a->fd < 0)
        return;
    char line[4096];
    size_t cap = sizeof(line) - 3, len = 0;
    char ts[40];
    if (HAS(MP_ALOG_TIME)) {
        format_time(ts, sizeof(ts), e->time);
        len += (size_t)snprintf(line, cap, ",\"time\":\"%s\"", ts);
    }
    static const uint8_t strs[] = {MP_ALOG_ID,     MP_ALOG_TRACE_ID, MP_ALOG_SPAN_ID, MP_ALOG_CLIENT,
                                   MP_ALOG_METHOD, MP_ALOG_PATH,     MP_ALOG_ROUTE};
    const mp_slice vals[] = {e->id, e->trace_id, e->span_id, e->client, e->method, e->path, e->route};
    for (size_t i = 0; i < sizeof(strs); i++) /* a request refused before it had a trace has none */
        if (len < cap && HAS(strs[i]) && (vals[i].len || (strs[i] != MP_ALOG_TRACE_ID && strs[i] != MP_ALOG_SPAN_ID)))
            len = json_field(line, len, cap, FIELD_NAMES[strs[i]], vals[i]);
    if (len < cap && e->tls.len && HAS(MP_ALOG_TLS))
        len = json_field(line, len, cap, "tls", e->tls);
    if (len < cap && e->sni.len && HAS(MP_ALOG_SNI))
        len = json_field(line, len, cap, "sni", e->sni);
    if (len < cap && HAS(MP_ALOG_STATUS))
        len += (size_t)snprintf(line + len, cap - len, ",\"status\":%d", e->status);
    if (len < cap && HAS(MP_ALOG_BYTES))
        len += (size_t)snprintf(line + len, cap - len, ",\"bytes\":%llu", (unsigned long long)e->bytes);
    if (len < cap && e->upstream_time >= 0 && HAS(MP_ALOG_UPSTREAM))
        len = json_field(line, len, cap, "upstream", e->upstream_server);
    if (len < cap && e->upstream_time >= 0 && HAS(MP_ALOG_UPSTREAM_TIME))
        len += (size_t)snprintf(line + len, cap - len, ",\"upstream_time\":%.3f", e->upstream_time);
    if (len < cap && e->tunnel_close && HAS(MP_ALOG_TUNNEL))
        len += (size_t)snprintf(
            line + len, cap - len, ",\"tunnel\":{\"to_upstream\":%llu,\"to_client\":%llu,\"close\":\"%s\"}",
            (unsigned long long)e->tunnel_to_upstream, (unsigned long long)e->tunnel_to_client, e->tunnel_close);
    if (len < cap && HAS(MP_ALOG_DURATION))
        len += (size_t)snprintf(line + len, cap - len, ",\"duration\":%.3f", e->duration);
    if (len < cap && e->extra.len && e->extra.len < cap - len) { /* on_log's req.log fields, rendered */
        memcpy(line + len, e->extra.p, e->extra.len);
        len += e->extra.len;
    }
    if (len > cap)
        len = cap;
    if (len == 0)
        line[len++] = '{';
    else
        line[0] = '{'; /* the first field's comma */
    line[len++] = '}';
    line[len++] = '\n';
    if (len > sizeof(a->buf) - a->len)
        mp_alog_flush(a);
    memcpy(a->buf + a->len, line, len);
    a->len += len;
}

void mp_alog_flush(mp_alog_t *a)
{
    size_t off = 0;
    while (off < a->len) {
        ssize_t n = write(a->fd, a->buf + off, a->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            a->dropped++;
            if (!a->failing)
                mp_log_error("access_log: cannot write (%s): lines are dropped until it can",
                             n < 0 ? strerror(errno) : "no room");
            a->failing = 1;
            break;
        }
        off += (size_t)n;
    }
    if (off == a->len && a->len)
        a->failing = 0;
    a->len = 0;
}
