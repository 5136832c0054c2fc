/* fuzz.c: the parsers' libFuzzer entry points (spec/fuzz/ drives them):
 * every input parsed whole, in pieces and byte by byte, with the results
 * checked against each other and against the input's bounds. Linked only
 * into the fuzz targets. */
#include "http1.h"

#include <string.h>

#define FUZZ_MAX 16384

static int slice_inside(mp_slice s, const char *base, size_t n)
{
    uintptr_t p = (uintptr_t)s.p, b = (uintptr_t)base;

    return s.len == 0 || (p >= b && s.len <= n && p - b <= n - s.len);
}

static void check_request_result(const char *base, size_t n, int rc, const mp_http_request_t *req)
{
    MP_BUG_ON(rc == 0 || rc < MP_EPROTO || (rc > 0 && (size_t)rc > n));
    if (rc == MP_EPROTO)
        MP_BUG_ON(!req->error ||
                  (req->status != 400 && req->status != 414 && req->status != 431 && req->status != 501 &&
                   req->status != 505));
    if (rc <= 0)
        return;
    MP_BUG_ON(req->head_len != (size_t)rc || req->nheaders > MP_HTTP_MAX_HEADERS);
    MP_BUG_ON(!slice_inside(req->method, base, n) || !slice_inside(req->target, base, n) ||
              !slice_inside(req->query, base, n) || !slice_inside(req->host, base, n));
    /* an absolute-form target without a path gets a static "/" */
    MP_BUG_ON(!slice_inside(req->path, base, n) && !(req->path.len == 1 && req->path.p[0] == '/'));
    MP_BUG_ON(req->content_length < -1 || req->content_length > MP_HTTP_MAX_LENGTH);
    MP_BUG_ON(req->chunked && req->content_length >= 0);
    for (unsigned i = 0; i < req->nheaders; i++)
        MP_BUG_ON(!slice_inside(req->headers[i].name, base, n) ||
                  !slice_inside(req->headers[i].value, base, n));
}

/* Two parses of the same bytes agree (slices may point into different copies). */
static void check_same_request(int ra, const mp_http_request_t *a, int rb, const mp_http_request_t *b)
{
    MP_BUG_ON(ra != rb);
    if (ra == MP_EPROTO)
        MP_BUG_ON(a->status != b->status || a->error != b->error);
    if (ra <= 0)
        return;
    MP_BUG_ON(!mp_slice_eq(a->method, b->method) || !mp_slice_eq(a->target, b->target) ||
              !mp_slice_eq(a->path, b->path) || !mp_slice_eq(a->query, b->query) ||
              !mp_slice_eq(a->host, b->host));
    MP_BUG_ON(a->minor != b->minor || a->content_length != b->content_length || a->chunked != b->chunked ||
              a->conn_close != b->conn_close || a->expect_continue != b->expect_continue ||
              a->nheaders != b->nheaders);
    for (unsigned i = 0; i < a->nheaders; i++)
        MP_BUG_ON(!mp_slice_eq(a->headers[i].name, b->headers[i].name) ||
                  !mp_slice_eq(a->headers[i].value, b->headers[i].value));
}

/* The head parsed whole, in two pieces (the first in its own copy, so that a
 * read past its end is caught), byte by byte, and the pipelined rest. */
static void fuzz_request(const char *in, size_t n, size_t split, const mp_http_limits_t *lim)
{
    mp_http_request_t whole, part;
    char first[split ? split : 1];
    size_t sw = 0, sp = 0;
    int rw = mp_http1_parse_request(in, n, &sw, lim, &whole), rp;

    check_request_result(in, n, rw, &whole);
    memcpy(first, in, split);
    rp = mp_http1_parse_request(first, split, &sp, lim, &part);
    check_request_result(first, split, rp, &part);
    if (rp == MP_EAGAIN) {
        rp = mp_http1_parse_request(in, n, &sp, lim, &part);
        check_request_result(in, n, rp, &part);
    }
    if (rp != MP_EAGAIN)
        check_same_request(rw, &whole, rp, &part);
    if (n <= 1024) {
        rp = MP_EAGAIN;
        sp = 0;
        for (size_t k = 1; k <= n && rp == MP_EAGAIN; k++)
            rp = mp_http1_parse_request(in, k, &sp, lim, &part);
        if (rp != MP_EAGAIN)
            check_same_request(rw, &whole, rp, &part);
    }
    for (int k = 0; k < 4 && rw > 0 && (size_t)rw < n; k++) {
        in += rw;
        n -= (size_t)rw;
        sw = 0;
        rw = mp_http1_parse_request(in, n, &sw, lim, &whole);
        check_request_result(in, n, rw, &whole);
    }
}

static void check_response_result(const char *base, size_t n, int rc, const mp_http_response_t *res)
{
    MP_BUG_ON(rc == 0 || rc < MP_EPROTO || (rc > 0 && (size_t)rc > n));
    MP_BUG_ON(rc == MP_EPROTO && !res->error);
    if (rc <= 0)
        return;
    MP_BUG_ON(res->head_len != (size_t)rc || res->nheaders > MP_HTTP_MAX_HEADERS);
    MP_BUG_ON(res->status < 100 || res->status > 999 || !slice_inside(res->reason, base, n));
    MP_BUG_ON(res->chunked && res->content_length >= 0);
    for (unsigned i = 0; i < res->nheaders; i++)
        MP_BUG_ON(!slice_inside(res->headers[i].name, base, n) ||
                  !slice_inside(res->headers[i].value, base, n));
}

static void fuzz_response(const char *in, size_t n, size_t split, size_t max)
{
    mp_http_response_t whole, part;
    char first[split ? split : 1];
    size_t sw = 0, sp = 0;
    int rw = mp_http1_parse_response(in, n, &sw, max, &whole), rp;

    check_response_result(in, n, rw, &whole);
    memcpy(first, in, split);
    rp = mp_http1_parse_response(first, split, &sp, max, &part);
    check_response_result(first, split, rp, &part);
    if (rp == MP_EAGAIN) {
        rp = mp_http1_parse_response(in, n, &sp, max, &part);
        check_response_result(in, n, rp, &part);
    }
    if (rp == MP_EAGAIN)
        return;
    MP_BUG_ON(rp != rw || (rw == MP_EPROTO && whole.error != part.error));
    MP_BUG_ON(rw > 0 && (whole.status != part.status || whole.nheaders != part.nheaders ||
                         whole.content_length != part.content_length || whole.chunked != part.chunked));
}

void mp_fuzz_http1(const uint8_t *data, size_t size)
{
    mp_http_limits_t lim;
    size_t n, split;
    const char *in;

    if (size < 2 || size > FUZZ_MAX)
        return;
    /* data[1] picks the limits (head 64..3904, target 8..968), data[0] the split */
    lim.max_header_size = 64 + (size_t)(data[1] & 15) * 256;
    lim.max_uri_size = 8 + (size_t)(data[1] >> 4) * 64;
    in = (const char *)data + 2;
    n = size - 2;
    split = (size_t)data[0] * n / 255;
    fuzz_request(in, n, split, &lim);
    fuzz_response(in, n, split, lim.max_header_size);
}

typedef struct {
    ssize_t rc;      /* 0 or MP_EPROTO */
    size_t consumed; /* when the message ended */
    size_t out;      /* data bytes */
    uint64_t hash;   /* FNV-1a of the data */
    int done;
} chunked_run_t;

static void hash_data(chunked_run_t *r, mp_slice d)
{
    for (size_t i = 0; i < d.len; i++)
        r->hash = (r->hash ^ (unsigned char)d.p[i]) * 1099511628211u;
    r->out += d.len;
}

static void hash_field(chunked_run_t *r, const mp_header_t *f)
{
    hash_data(r, f->name);
    hash_data(r, (mp_slice){":", 1});
    hash_data(r, f->value);
    hash_data(r, (mp_slice){"\n", 1});
}

/* Decodes in[0..n) whole (seed 0) or in pieces of 1..64 bytes drawn from seed,
 * each piece in its own copy so that a read past its end is caught; the
 * bytes the decoder did not take (an incomplete trailer line) are passed
 * again at the front of the next piece. Data and trailer fields are hashed. */
static chunked_run_t chunked_run(const char *in, size_t n, uint32_t seed)
{
    chunked_run_t r = {0, 0, 0, 14695981039346656037u, 0};
    mp_chunked_t c = {0};
    size_t off = 0, held = 0;

    while (off + held < n && !c.done) {
        size_t plen = n - off - held, k = 0;

        if (seed) {
            seed = seed * 1103515245u + 12345u;
            plen = plen < 1 + (seed >> 16) % 64 ? plen : 1 + (seed >> 16) % 64;
        }
        plen += held;
        char piece[plen];
        memcpy(piece, in + off, plen);
        while (k < plen && !c.done) {
            mp_chunk_part_t part;
            ssize_t got = mp_chunked_next(&c, piece + k, plen - k, &part);

            if (got < 0) {
                MP_BUG_ON(got != MP_EPROTO);
                r.rc = got;
                return r;
            }
            MP_BUG_ON((size_t)got > plen - k || part.data.len > (size_t)got);
            MP_BUG_ON(part.data.len && (part.data.p < piece + k || part.data.p + part.data.len > piece + k + got));
            MP_BUG_ON(part.field.name.len && (part.field.name.p < piece + k ||
                                              part.field.value.p + part.field.value.len > piece + k + got));
            MP_BUG_ON(part.data.len && part.field.name.len);
            hash_data(&r, part.data);
            if (part.field.name.len)
                hash_field(&r, &part.field);
            k += (size_t)got;
            if (got == 0) /* an incomplete trailer line: held for the next piece */
                break;
        }
        MP_BUG_ON(k < plen && !c.done && plen - k > MP_CHUNK_MAX_LINE + 1);
        off += k;
        held = plen - k;
        if (c.done)
            held = 0;
    }
    r.consumed = off;
    r.done = c.done;
    return r;
}

void mp_fuzz_chunked(const uint8_t *data, size_t size)
{
    chunked_run_t whole, pieces;

    if (size < 1 || size > FUZZ_MAX)
        return;
    whole = chunked_run((const char *)data + 1, size - 1, 0);
    pieces = chunked_run((const char *)data + 1, size - 1, data[0] | 1u);
    MP_BUG_ON(whole.rc != pieces.rc || whole.out != pieces.out || whole.hash != pieces.hash);
    MP_BUG_ON(whole.done != pieces.done || whole.consumed != pieces.consumed);
}


/* ---- differential: decode, re-frame as the relay does, decode again ---- */

/* A strict decode of a whole chunked body: its data and its forwardable
 * trailer fields re-serialised, each written to its own buffer. */
typedef struct {
    int ok;          /* the message was complete and valid */
    size_t consumed;
    size_t data_len, trailer_len;
    uint64_t ext_bytes;
} strict_t;

static strict_t strict_decode(const char *in, size_t n, char *data, char *trailers)
{
    strict_t s = {0, 0, 0, 0, 0};
    mp_chunked_t c = {0};

    while (s.consumed < n && !c.done) {
        mp_chunk_part_t part;
        ssize_t k = mp_chunked_next(&c, in + s.consumed, n - s.consumed, &part);

        if (k <= 0)
            return s;
        memcpy(data + s.data_len, part.data.p, part.data.len);
        s.data_len += part.data.len;
        if (part.field.name.len && mp_http1_trailer_allowed(part.field.name))
            s.trailer_len += mp_chunked_put_trailer(trailers + s.trailer_len, &part.field);
        s.consumed += (size_t)k;
    }
    s.ok = c.done;
    s.ext_bytes = c.ext_bytes;
    return s;
}

/* The relay's work on in[0..n): the bytes arrive in pieces drawn from seed
 * and are decoded in place (mp_chunked_decode_into); at random points the
 * decoded data not yet sent goes out behind a size line (mp_chunked_frame),
 * and at the end the last chunk, the trailer fields and the final CRLF.
 * Returns the re-framed length in out, or 0 when the body is invalid or
 * incomplete; *trailers_at: where the trailer fields begin in buf. */
static size_t relay_reframe(const char *in, size_t n, uint32_t seed, char *buf, char *out, size_t *trailers_at)
{
    mp_chunked_t c = {0};
    size_t ready = 0, scan = 0, end = 0, sent = 0, o = 0, tr = 0;
    int chunks = 0, in_trailer = 0;

    memcpy(buf, in, n);
    while (!c.done) {
        size_t put;
        ssize_t k;

        seed = seed * 1103515245u + 12345u;
        if (end < n && (scan == end || (seed >> 20) % 4 == 0))
            end += 1 + (seed >> 16) % 64 < n - end ? 1 + (seed >> 16) % 64 : n - end;
        k = mp_chunked_decode_into(&c, buf + ready, buf + scan, end - scan, &put);
        if (k < 0 || (k == 0 && end == n))
            return 0;
        MP_BUG_ON(put > (size_t)k || ready + put > scan + (size_t)k);
        if (c.in_trailer && !in_trailer) {
            tr = ready;
            in_trailer = 1;
        }
        ready += put;
        scan += (size_t)k;
        if (!c.in_trailer && ready > sent && (seed >> 24) % 3 == 0) {
            o += mp_chunked_frame(out + o, ready - sent, chunks);
            memcpy(out + o, buf + sent, ready - sent);
            o += ready - sent;
            sent = ready;
            chunks = 1;
        }
    }
    if (tr > sent) {
        o += mp_chunked_frame(out + o, tr - sent, chunks);
        memcpy(out + o, buf + sent, tr - sent);
        o += tr - sent;
        chunks = 1;
    }
    o += mp_chunked_frame(out + o, 0, chunks);
    memcpy(out + o, buf + tr, ready - tr);
    o += ready - tr;
    memcpy(out + o, "\r\n", 2);
    *trailers_at = tr;
    return o + 2;
}

void mp_fuzz_reframe(const uint8_t *data, size_t size)
{
    static char buf[FUZZ_MAX], out[FUZZ_MAX * 26 + 64], d1[FUZZ_MAX], t1[FUZZ_MAX], d2[FUZZ_MAX * 26 + 64],
        t2[FUZZ_MAX * 26 + 64];
    const char *in = (const char *)data + 1;
    size_t n, tr = 0, olen;
    strict_t first, again;

    if (size < 1 || size > FUZZ_MAX)
        return;
    n = size - 1;
    first = strict_decode(in, n, d1, t1);
    olen = relay_reframe(in, n, data[0] | 1u, buf, out, &tr);
    MP_BUG_ON(first.ok != (olen > 0)); /* pieces or not, the same verdict */
    if (!olen)
        return;
    /* the relay's in-place result is what a plain decode finds */
    MP_BUG_ON(tr != first.data_len || memcmp(buf, d1, tr) != 0);
    MP_BUG_ON(memcmp(buf + tr, t1, first.trailer_len) != 0);
    /* the re-framed bytes parse under the strict decoder to the same data
     * and trailer fields, with no extensions and nothing left over */
    again = strict_decode(out, olen, d2, t2);
    MP_BUG_ON(!again.ok || again.consumed != olen || again.ext_bytes != 0);
    MP_BUG_ON(again.data_len != first.data_len || memcmp(d2, d1, first.data_len) != 0);
    MP_BUG_ON(again.trailer_len != first.trailer_len || memcmp(t2, t1, first.trailer_len) != 0);
}
