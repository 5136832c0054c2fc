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
                  (req->status != 400 && req->status != 414 && req->status != 431 && req->status != 501));
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

/* Decodes in[0..n) whole (seed 0) or in pieces of 1..64 bytes drawn from seed,
 * each piece in its own copy so that a read past its end is caught. */
static chunked_run_t chunked_run(const char *in, size_t n, uint32_t seed)
{
    chunked_run_t r = {0, 0, 0, 14695981039346656037u, 0};
    mp_chunked_t c = {0};
    size_t off = 0;

    while (off < n && !c.done) {
        size_t plen = n - off, k = 0;

        if (seed) {
            seed = seed * 1103515245u + 12345u;
            plen = plen < 1 + (seed >> 16) % 64 ? plen : 1 + (seed >> 16) % 64;
        }
        char piece[plen];
        memcpy(piece, in + off, plen);
        while (k < plen && !c.done) {
            mp_slice d;
            ssize_t got = mp_chunked_decode(&c, piece + k, plen - k, &d);

            if (got < 0) {
                MP_BUG_ON(got != MP_EPROTO);
                r.rc = got;
                return r;
            }
            MP_BUG_ON(got == 0 || (size_t)got > plen - k || d.len > (size_t)got);
            MP_BUG_ON(d.len && (d.p < piece + k || d.p + d.len > piece + k + got));
            MP_BUG_ON((size_t)got < plen - k && !d.len && !c.done);
            hash_data(&r, d);
            k += (size_t)got;
        }
        off += k;
    }
    r.consumed = off;
    r.done = c.done;
    MP_BUG_ON(r.out > n);
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

