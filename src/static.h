/* static.h: files served by static routes (SPEC "Routes": static = {...}):
 * which file under the route's root a request names (never one outside it),
 * conditional requests, and the response head. The body is sent by conn.c
 * with sendfile(2); the simulator (sim.c) uses the same two calls. */
#ifndef MP_STATIC_H
#define MP_STATIC_H

#include "req.h"

#include <limits.h>
#include <stdint.h>

/* The precompressed siblings a static route may serve, in the order the
 * proxy prefers them when the client accepts several equally. */
#define MP_STATIC_ENCODINGS 3

/* What a request to a static route resolves to. */
typedef struct mp_static_file {
    int status;               /* 200, 206, 301, 304, 400, 403, 404, 405, 416 or 500 */
    int fd;                   /* 200 to a GET: the open file (owned: mp_static_dispose); else -1 */
    uint64_t size;            /* 200, 304: the file's size in bytes */
    int64_t mtime;            /* 200, 304: its modification time, seconds since the epoch */
    const char *content_type; /* 200, 304: from the file name's extension (static storage) */
    char etag[48];            /* 200, 304: "\"<mtime hex>-<size hex>\"" (quotes included) */
    char file[PATH_MAX];      /* 200, 304: the path under root that answers ("/app/index.html"); else "" */
    unsigned fallback : 1;    /* file is the route's fallback: the path asked for is missing */
    unsigned vary : 1;        /* the answer depends on Accept-Encoding (a precompressed route) */
    const char *encoding;     /* 200, 206, 304: the sibling's Content-Encoding ("br", "zstd", "gzip"), or NULL */
    uint64_t off, len;        /* 200, 206: the bytes of the file to send (206: the range asked for) */
} mp_static_file_t;

/* Resolves r (routed to a static route, its request hooks run) to a file.
 *  - precompressed = true: the file's sibling with ".br", ".zst" or ".gz"
 *    added answers instead (Content-Encoding, its own ETag, the file's
 *    Content-Type) when the client accepts that coding (Accept-Encoding,
 *    q-values; the highest q wins, then br, zstd, gzip); every answer of
 *    such a route varies by Accept-Encoding.
 *  - A GET with one byte range (Range: bytes=a-b, a-, -n), unless If-Range
 *    names another ETag or date: 206 with that slice, or 416 when it
 *    starts past the end. Several ranges, another unit or a bad one: the
 *    whole file (RFC 9110 §14.2 lets a server ignore Range).
 * Touches no socket and changes nothing in r.
 *  - Method other than GET or HEAD: 405.
 *  - The path looked up is r->path (what hooks left) without the route's
 *    prefix, percent-decoded; an invalid escape, a NUL byte or a ".."
 *    segment: 400.
 *  - The file is opened beneath root: openat2(RESOLVE_BENEATH), or, on a
 *    kernel without it, realpath() with a check that the result is under
 *    root's real path. A symlink is followed only when its target is inside
 *    root; one leading out: 403.
 *  - A directory: its index file; a directory asked for without a final '/'
 *    (and received without one): 301 to the received path with '/' added
 *    (query kept), as nginx does, so that relative links in the index work.
 *  - Missing (or not a regular file): the fallback when the route has one
 *    (200, fallback set), else 404. Not readable: 403.
 *  - A found file: 304 when If-None-Match matches its ETag (weak comparison,
 *    "*" matches), or, without If-None-Match, when If-Modified-Since (any of
 *    the three HTTP-date forms) is not older than its mtime; else 200.
 * Request headers are read as hooks left them. Returns out->status. */
int mp_static_resolve(const mp_req_t *r, mp_static_file_t *out);

/* Closes f's file, if open. Idempotent. */
void mp_static_dispose(mp_static_file_t *f);

/* Runs the route's response hooks on the response f describes (they see
 * Content-Type, ETag, Last-Modified, Location or Allow in res.headers and
 * may change or remove them, and the status), then appends the head to b:
 * status line, Date, Content-Length (not on a 304), X-Request-ID, the
 * headers, Connection: close when r->keepalive is off. Error statuses are
 * mp_local_response's. Sets r->status to the status sent. Afterwards
 * f->fd >= 0 means "send f->size bytes of that file after the head" (the
 * caller owns it); otherwise the body, if any, is out->body (HEAD: none).
 * Returns the status sent, or -1 when b has no room (f is disposed). */
int mp_static_response(mp_req_t *r, mp_static_file_t *f, mp_buf_t *b, mp_local_t *out);

/* mp_static_response returned MP_STATIC_WAIT: its response hooks wait
 * (f, b and out kept meanwhile; f's descriptor stays open). Once they
 * ended, shown being what they return (mp_req_response_resume), this
 * finishes it as mp_static_response would have. A response made here for
 * the file (an error) may return MP_LOCAL_WAIT instead (req.h). */
#define MP_STATIC_WAIT (-3)
int mp_static_finish(mp_req_t *r, mp_static_file_t *f, int shown, mp_buf_t *b, mp_local_t *out);

#endif
