/* head.h: every head moonproxy writes, on one set of helpers: the request
 * an upstream receives, the response a client receives for an upstream's,
 * the answers made here and static files' heads. Each appends to a buffer
 * and touches no socket; the bytes are compared byte for byte by the specs. */
#ifndef MP_HEAD_H
#define MP_HEAD_H

#include "buf.h"
#include "headers.h"
#include "http1.h"
#include "req.h"

#include <stdint.h>

/* The request head sent to r's server (r->server picked): the request line
 * with the rewritten target, Host, the forwarded headers (hop-by-hop ones,
 * those named in Connection, and those hooks edited dropped), X-Forwarded-*,
 * X-Request-ID, the hooks' edits, the framing (HTTP/1.1 always). Appends to
 * b; MP_ENOMEM when it does not fit. */
int mp_head_request(mp_req_t *r, mp_buf_t *b);

/* The response head sent to the client for the upstream's head rh, with the
 * response hooks' changes (r->resp framed first): status line, the
 * upstream's fields but hop-by-hop ones, edits, Date when the upstream sent
 * none, X-Request-ID, framing and Connection. Appends to b; MP_ENOMEM when
 * it does not fit. */
int mp_head_response(mp_req_t *r, const mp_http_response_t *rh, mp_buf_t *b);

/* An interim (1xx) response of the upstream as relayed to the client:
 * status line and its fields but hop-by-hop ones. Appends to b; MP_ENOMEM
 * when it does not fit. */
int mp_head_interim(const mp_http_response_t *rh, mp_buf_t *b);

/* The head of an answer made here (an error, or req:respond's): status
 * line, Date, Content-Length: body_len (HEAD too: RFC 9110 §9.3.2),
 * X-Request-ID, Retry-After on a 503 when r->retry_after is set,
 * Connection: close when r->keepalive is off, Content-Type: text/plain
 * unless edits set one, then edits. Appends to b; MP_ENOMEM when it does
 * not fit. */
int mp_head_local(mp_req_t *r, int status, const mp_hedit_t *edits, size_t body_len, mp_buf_t *b);

/* The head of a static route's response: status line, Date,
 * Content-Length: content_length (none when negative: a bodiless status),
 * X-Request-ID, Connection: close when r->keepalive is off, then
 * r->resp_edits (Content-Type, ETag, Last-Modified, ... as hooks left
 * them). Appends to b; MP_ENOMEM when it does not fit. */
int mp_head_static(mp_req_t *r, int status, int64_t content_length, mp_buf_t *b);

#endif
