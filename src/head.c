/* head.c: every head moonproxy writes (head.h): the upstream request, the
 * client response, local answers and static files, on the helpers below.
 * Field order, spelling and spacing are part of the contract: the specs
 * compare heads byte for byte. */
#include "head.h"

#include "gen.h"

#include <string.h>

#define MAX_CONN_TOKENS 16

static const mp_upstream_def_t *udef(mp_req_t *r)
{
    return &r->gen->cfg->upstreams[r->upstream];
}

/* ---- appending ---- */

static int put(mp_buf_t *b, const char *p, size_t n)
{
    return mp_buf_append(b, p, n);
}

static int put_s(mp_buf_t *b, mp_slice s)
{
    return mp_buf_append(b, s.p, s.len);
}

#define PUT_LIT(b, lit) put((b), (lit), sizeof(lit) - 1)

/* The decimal digits of n, written backwards from the end of d[20]
 * (printf costs more than the rest of a head). */
static mp_slice digits_of(uint64_t n, char d[20])
{
    size_t i = 20;
    do
        d[--i] = (char)('0' + n % 10);
    while ((n /= 10) != 0);
    return (mp_slice){d + i, 20 - i};
}

/* "<a><sep><v>\r\n" with one room check, the form of most lines in a
 * head. When it does not fit, the parts that do are appended one by one, as
 * separate appends would leave them. Always inline: sep is a literal whose
 * copy is then a move, not a call. */
static inline __attribute__((always_inline)) int put_line(mp_buf_t *b, mp_slice a, mp_slice sep, mp_slice v)
{
    size_t n = a.len + sep.len + v.len + 2;
    if (MP_UNLIKELY(n > mp_buf_room(b)))
        return put_s(b, a) || put_s(b, sep) || put_s(b, v) || PUT_LIT(b, "\r\n");
    char *p = mp_buf_tail(b);
    memcpy(p, a.p, a.len);
    p += a.len;
    memcpy(p, sep.p, sep.len);
    p += sep.len;
    memcpy(p, v.p, v.len);
    memcpy(p + v.len, "\r\n", 2);
    b->end += (uint32_t)n;
    return 0;
}

/* "Name: value\r\n" (inline too: a literal name is then a move). */
static inline __attribute__((always_inline)) int put_field(mp_buf_t *b, mp_slice name, mp_slice value)
{
    return put_line(b, name, MP_SLICE_LIT(": "), value);
}

/* "HTTP/1.1 <status> <reason>\r\n": every head we send a client. */
static int put_status(mp_buf_t *b, int status, mp_slice reason)
{
    char d[20];
    return PUT_LIT(b, "HTTP/1.1 ") || put_line(b, digits_of((uint64_t)status, d), MP_SLICE_LIT(" "), reason);
}

static mp_slice reason_of(int status)
{
    const char *t = mp_http1_reason(status);
    return (mp_slice){t, strlen(t)};
}

static int put_request_id(mp_buf_t *b, mp_req_t *r)
{
    return put_field(b, MP_SLICE_LIT("X-Request-ID"), (mp_slice){r->id, r->id_len});
}

/* Content-Length: n, or nothing when n < 0. */
static int put_length(mp_buf_t *b, int64_t n)
{
    if (n < 0)
        return 0;
    char d[20];
    return put_field(b, MP_SLICE_LIT("Content-Length"), digits_of((uint64_t)n, d));
}

static int put_close(mp_buf_t *b, int close)
{
    return close ? PUT_LIT(b, "Connection: close\r\n") : 0;
}

/* ---- what is forwarded ---- */

/* Collects the field names listed in Connection fields. */
static unsigned connection_tokens(const mp_header_t *h, unsigned n, mp_slice *toks)
{
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++) {
        if (!MP_SLICE_IEQ(h[i].name, "connection"))
            continue;
        size_t pos = 0;
        mp_slice t;
        while (k < MAX_CONN_TOKENS && mp_http1_next_token(h[i].value, &pos, &t))
            toks[k++] = t;
    }
    return k;
}

/* Whether a field is dropped when forwarding: hop-by-hop, or named in
 * Connection. */
static int is_dropped(mp_slice name, const mp_slice *toks, unsigned ntoks)
{
    if (mp_header_is_hop_by_hop(name))
        return 1;
    for (unsigned i = 0; i < ntoks; i++)
        if (mp_slice_caseeq(name, toks[i]))
            return 1;
    return 0;
}

/* ---- the upstream request ---- */

/* The upstream's request line: the path after strip_prefix, and the query. */
static int put_target(mp_buf_t *b, mp_req_t *r)
{
    int rc = put_s(b, r->path);
    if (r->has_query)
        rc |= PUT_LIT(b, "?") || put_s(b, r->query);
    return rc;
}

/* Hooks' edits replace what the proxy itself would send under that name. */
static int edited(mp_req_t *r, const char *name, size_t len)
{
    return r->edits && mp_hedit_find(r->edits, (mp_slice){name, len});
}

static int put_forwarded(mp_buf_t *b, mp_req_t *r, mp_slice host)
{
    const mp_http_request_t *h = &r->h;
    int rc = 0;
    if (!edited(r, "x-forwarded-for", 15)) {
        rc |= PUT_LIT(b, "X-Forwarded-For: ");
        for (unsigned i = 0; i < h->nheaders; i++)
            if (MP_SLICE_IEQ(h->headers[i].name, "x-forwarded-for") && h->headers[i].value.len)
                rc |= put_s(b, h->headers[i].value) || PUT_LIT(b, ", ");
        rc |= put(b, r->client_ip, strlen(r->client_ip)) || PUT_LIT(b, "\r\n");
    }
    if (!edited(r, "x-forwarded-proto", 17) &&
        (!r->trusted_peer || mp_http1_find(h->headers, h->nheaders, "x-forwarded-proto", 17) < 0))
        rc |= r->tls ? PUT_LIT(b, "X-Forwarded-Proto: https\r\n") : PUT_LIT(b, "X-Forwarded-Proto: http\r\n");
    if (!edited(r, "x-forwarded-host", 16) &&
        (!r->trusted_peer || mp_http1_find(h->headers, h->nheaders, "x-forwarded-host", 16) < 0))
        rc |= put_field(b, MP_SLICE_LIT("X-Forwarded-Host"), host);
    if (!edited(r, "x-request-id", 12))
        rc |= put_request_id(b, r);
    return rc;
}

int mp_head_request(mp_req_t *r, mp_buf_t *b)
{
    const mp_http_request_t *h = &r->h;
    const mp_upstream_def_t *d = udef(r);
    mp_slice toks[MAX_CONN_TOKENS];
    unsigned ntoks = connection_tokens(h->headers, h->nheaders, toks);
    mp_slice host = h->host;
    if (!host.len) {
        const char *t = d->servers[r->server].name; /* as written: a server's name, or its address */
        host = (mp_slice){t, strlen(t)};
    }

    mp_slice send_host = host; /* X-Forwarded-Host keeps the client's */
    const mp_hedit_t *host_edit = r->edits ? mp_hedit_find(r->edits, MP_SLICE_LIT("host")) : NULL;
    if (host_edit && host_edit->nvalues)
        send_host = host_edit->values[0];
    else if (d->host)
        send_host = (mp_slice){d->host, strlen(d->host)};
    int rc = put_s(b, h->method) || PUT_LIT(b, " ") || put_target(b, r) || PUT_LIT(b, " HTTP/1.1\r\n");
    rc |= put_field(b, MP_SLICE_LIT("Host"), send_host);
    for (unsigned i = 0; i < h->nheaders; i++) {
        mp_slice n = h->headers[i].name;
        if (is_dropped(n, toks, ntoks) || MP_SLICE_IEQ(n, "host") || MP_SLICE_IEQ(n, "x-forwarded-for") ||
            MP_SLICE_IEQ(n, "x-request-id") || MP_SLICE_IEQ(n, "expect") || MP_SLICE_IEQ(n, "content-length") ||
            MP_SLICE_IEQ(n, "traceparent") || (!r->trace_continued && MP_SLICE_IEQ(n, "tracestate")))
            continue;
        if (r->edits && mp_hedit_find(r->edits, n))
            continue;
        if (!r->trusted_peer && (MP_SLICE_IEQ(n, "x-forwarded-proto") || MP_SLICE_IEQ(n, "x-forwarded-host")))
            continue;
        rc |= put_field(b, n, h->headers[i].value);
    }
    rc |= put_forwarded(b, r, host);
    if (r->trace_id[0] && !(r->edits && mp_hedit_find(r->edits, MP_SLICE_LIT("traceparent")))) {
        char tp[55] = "00-";
        memcpy(tp + 3, r->trace_id, 32);
        tp[35] = '-';
        memcpy(tp + 36, r->span_id, 16);
        tp[52] = '-';
        memcpy(tp + 53, r->trace_flags, 2);
        rc |= put_field(b, MP_SLICE_LIT("traceparent"), (mp_slice){tp, sizeof(tp)});
    }
    rc |= mp_hedit_put(b, r->edits, "host");
    rc |= put_length(b, h->content_length); /* one value, however the client repeated it */
    if (h->chunked)
        rc |= PUT_LIT(b, "Transfer-Encoding: chunked\r\n");
    if (MP_UNLIKELY(r->upgrade)) /* the client's Connection and Upgrade were dropped as hop-by-hop */
        rc |= PUT_LIT(b, "Connection: upgrade\r\nUpgrade: websocket\r\n");
    else
        rc |= put_close(b, d->keepalive == 0);
    rc |= PUT_LIT(b, "\r\n");
    return rc ? MP_ENOMEM : 0;
}

/* ---- the client response to an upstream's ---- */

/* Whether a Vary value lists Accept-Encoding (or "*", which covers it). */
static int varies_on_encoding(mp_slice v)
{
    for (size_t i = 0; i < v.len; i++) {
        if (v.p[i] == '*')
            return 1;
        if (v.len - i >= 15 && mp_slice_ieq((mp_slice){v.p + i, 15}, "accept-encoding", 15))
            return 1;
    }
    return 0;
}

/* A compressed response's field (SPEC "Compression"): the first Vary gets
 * Accept-Encoding (once: *vary_done), a strong ETag becomes weak. Returns
 * 1 when it wrote the field (rc in *rc), 0 to write it as it came. */
static int put_encoded_field(mp_buf_t *b, mp_slice name, mp_slice value, int *vary_done, int *rc)
{
    if (MP_SLICE_IEQ(name, "vary") && !*vary_done) {
        *vary_done = 1;
        if (varies_on_encoding(value))
            return 0;
        *rc |= put_s(b, name) || PUT_LIT(b, ": ") || put_s(b, value) || PUT_LIT(b, ", Accept-Encoding\r\n");
        return 1;
    }
    if (MP_SLICE_IEQ(name, "etag") && value.len && value.p[0] == '"') {
        *rc |= put_line(b, name, MP_SLICE_LIT(": W/"), value);
        return 1;
    }
    return 0;
}

int mp_head_response(mp_req_t *r, const mp_http_response_t *rh, mp_buf_t *b)
{
    mp_slice toks[MAX_CONN_TOKENS];
    unsigned ntoks = connection_tokens(rh->headers, rh->nheaders, toks);
    int rc, vary_done = !r->enc;
    if (r->enc) /* a Vary that lists Accept-Encoding already is kept as it is */
        for (unsigned i = 0; i < rh->nheaders && !vary_done; i++)
            vary_done = MP_SLICE_IEQ(rh->headers[i].name, "vary") && varies_on_encoding(rh->headers[i].value);
    if (r->resp_status && r->resp_status != rh->status)
        rc = put_status(b, r->resp_status, reason_of(r->resp_status));
    else
        rc = put_status(b, rh->status, rh->reason);
    int dated = 0;
    for (unsigned i = 0; i < rh->nheaders; i++) {
        mp_slice name = rh->headers[i].name;
        if (is_dropped(name, toks, ntoks) || MP_SLICE_IEQ(name, "x-request-id") || MP_SLICE_IEQ(name, "content-length"))
            continue;
        dated |= MP_SLICE_IEQ(name, "date");
        if (r->resp_edits && mp_hedit_find(r->resp_edits, name))
            continue;
        if (MP_UNLIKELY(r->enc) && put_encoded_field(b, name, rh->headers[i].value, &vary_done, &rc))
            continue;
        rc |= put_field(b, name, rh->headers[i].value);
    }
    rc |= mp_hedit_put(b, r->resp_edits, NULL);
    if (MP_UNLIKELY(r->enc)) {
        const char *e = mp_req_encoding_name(r->enc);
        rc |= put_field(b, MP_SLICE_LIT("Content-Encoding"), (mp_slice){e, strlen(e)});
        if (!vary_done)
            rc |= PUT_LIT(b, "Vary: Accept-Encoding\r\n");
    }
    if (!dated) /* RFC 9110 §6.6.1: a recipient with a clock adds one */
        rc |= put_s(b, mp_req_date(r->env));
    rc |= put_request_id(b, r);
    if (MP_UNLIKELY(r->tunnel_open)) /* the WebSocket handshake's answer (req.c let no other through) */
        return rc || PUT_LIT(b, "Connection: upgrade\r\nUpgrade: websocket\r\n\r\n") ? MP_ENOMEM : 0;
    if (!rh->chunked && !r->enc)
        rc |= put_length(b, rh->content_length);
    if ((r->resp.kind == MP_BODY_CHUNKED && !r->dechunk) || r->rechunk)
        rc |= PUT_LIT(b, "Transfer-Encoding: chunked\r\n");
    if (!r->keepalive)
        rc |= put_close(b, 1);
    else if (r->h.minor == 0)
        rc |= PUT_LIT(b, "Connection: keep-alive\r\n");
    rc |= PUT_LIT(b, "\r\n");
    return rc ? MP_ENOMEM : 0;
}

int mp_head_interim(const mp_http_response_t *rh, mp_buf_t *b)
{
    mp_slice toks[MAX_CONN_TOKENS];
    unsigned ntoks = connection_tokens(rh->headers, rh->nheaders, toks);
    int rc = put_status(b, rh->status, rh->reason);
    for (unsigned i = 0; i < rh->nheaders; i++)
        if (!is_dropped(rh->headers[i].name, toks, ntoks))
            rc |= put_field(b, rh->headers[i].name, rh->headers[i].value);
    rc |= PUT_LIT(b, "\r\n");
    return rc ? MP_ENOMEM : 0;
}

/* ---- heads made here ---- */

/* What local and static heads open with: status line, Date, Content-Length
 * (none when length < 0), X-Request-ID. */
static int put_own_start(mp_buf_t *b, mp_req_t *r, int status, int64_t length)
{
    return put_status(b, status, reason_of(status)) || put_s(b, mp_req_date(r->env)) || put_length(b, length) ||
           put_request_id(b, r);
}

int mp_head_local(mp_req_t *r, int status, const mp_hedit_t *edits, size_t body_len, mp_buf_t *b)
{
    int rc = put_own_start(b, r, status, (int64_t)body_len);
    char d[20];
    if (r->retry_after && status == 503)
        rc |= put_field(b, MP_SLICE_LIT("Retry-After"), digits_of(r->retry_after, d));
    rc |= put_close(b, !r->keepalive);
    if (!mp_hedit_find(edits, MP_SLICE_LIT("content-type")))
        rc |= PUT_LIT(b, "Content-Type: text/plain\r\n");
    rc |= mp_hedit_put(b, edits, NULL);
    rc |= PUT_LIT(b, "\r\n");
    return rc ? MP_ENOMEM : 0;
}

int mp_head_static(mp_req_t *r, int status, int64_t content_length, mp_buf_t *b)
{
    int rc = put_own_start(b, r, status, content_length) || put_close(b, !r->keepalive);
    rc |= mp_hedit_put(b, r->resp_edits, NULL);
    rc |= PUT_LIT(b, "\r\n");
    return rc ? MP_ENOMEM : 0;
}
