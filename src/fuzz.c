/* fuzz.c: the parsers' libFuzzer entry points (spec/fuzz/ drives them):
 * every input parsed whole, in pieces and byte by byte, with the results
 * checked against each other and against the input's bounds. Linked only
 * into the fuzz targets. */
#include "http1.h"
#include "reframe.h"

#include <stdlib.h>
#include <string.h>

#if defined(__has_include)
#if __has_include(<sanitizer/asan_interface.h>)
#include <sanitizer/asan_interface.h>
#endif
#endif
#ifndef ASAN_POISON_MEMORY_REGION
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

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
        MP_BUG_ON(!req->error || (req->status != 400 && req->status != 414 && req->status != 431 &&
                                  req->status != 501 && req->status != 505));
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
        MP_BUG_ON(!slice_inside(req->headers[i].name, base, n) || !slice_inside(req->headers[i].value, base, n));
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
              !mp_slice_eq(a->path, b->path) || !mp_slice_eq(a->query, b->query) || !mp_slice_eq(a->host, b->host));
    MP_BUG_ON(a->minor != b->minor || a->content_length != b->content_length || a->chunked != b->chunked ||
              a->conn_close != b->conn_close || a->expect_continue != b->expect_continue || a->nheaders != b->nheaders);
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
        MP_BUG_ON(!slice_inside(res->headers[i].name, base, n) || !slice_inside(res->headers[i].value, base, n));
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
            MP_BUG_ON(part.field.name.len &&
                      (part.field.name.p < piece + k || part.field.value.p + part.field.value.len > piece + k + got));
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


/* ---- differential: decode, re-frame as the relay does, check strictly ---- */

/* A strict decode of a whole chunked body: its data and its forwardable
 * trailer fields re-serialised, each written to its own buffer. */
typedef struct {
    int ok;  /* the message was complete and valid */
    int bad; /* the decoder refused it */
    size_t consumed;
    size_t data_len, trailer_len;
} strict_t;

static strict_t strict_decode(const char *in, size_t n, char *data, char *trailers)
{
    strict_t s = {0, 0, 0, 0, 0};
    mp_chunked_t c = {0};

    while (s.consumed < n && !c.done) {
        mp_chunk_part_t part;
        ssize_t k = mp_chunked_next(&c, in + s.consumed, n - s.consumed, &part);

        s.bad = k < 0;
        if (k <= 0)
            return s;
        memcpy(data + s.data_len, part.data.p, part.data.len);
        s.data_len += part.data.len;
        if (part.field.name.len && mp_http1_trailer_allowed(part.field.name))
            s.trailer_len += mp_chunked_put_trailer(trailers + s.trailer_len, &part.field);
        s.consumed += (size_t)k;
    }
    s.ok = c.done;
    return s;
}

/* An independent check of what the proxy writes (not mp_chunked_next):
 * 1*(size CRLF data CRLF) with sizes in lower-case hex without leading
 * zeros, "0" CRLF, lines token ":" [SP] value CRLF (the value neither
 * starting nor ending with whitespace, no CTL but HTAB), CRLF, and nothing
 * after. Returns 1 with the data and the trailer lines (CRLF included)
 * copied out, else 0. */
static int crlf_at(const char *s, size_t n, size_t *i)
{
    if (n - *i < 2 || s[*i] != '\r' || s[*i + 1] != '\n')
        return 0;
    *i += 2;
    return 1;
}

static int strict_chunks(const char *s, size_t n, size_t *i, char *data, size_t *dlen)
{
    for (;;) {
        uint64_t size = 0;
        size_t d = 0;
        while (*i < n && ((s[*i] >= '0' && s[*i] <= '9') || (s[*i] >= 'a' && s[*i] <= 'f'))) {
            size = size << 4 | (uint64_t)(s[*i] <= '9' ? s[*i] - '0' : s[*i] - 'a' + 10);
            if (++d > 16)
                return 0;
            *i += 1;
        }
        if (d == 0 || (d > 1 && s[*i - d] == '0') || !crlf_at(s, n, i))
            return 0;
        if (size == 0)
            return 1;
        if (n - *i < size + 2)
            return 0;
        memcpy(data + *dlen, s + *i, (size_t)size);
        *dlen += (size_t)size;
        *i += (size_t)size;
        if (!crlf_at(s, n, i))
            return 0;
    }
}

static int strict_reframed(const char *s, size_t n, char *data, size_t *dlen, char *tr, size_t *tlen)
{
    size_t i = 0;
    *dlen = *tlen = 0;
    if (!strict_chunks(s, n, &i, data, dlen))
        return 0;
    while (!crlf_at(s, n, &i)) {
        size_t start = i, v;
        while (i < n && mp_http_is_tchar((unsigned char)s[i]))
            i++;
        if (i == start || i == n || s[i] != ':')
            return 0;
        i += 1 + (i + 1 < n && s[i + 1] == ' ');
        for (v = i; i < n && (s[i] == '\t' || ((unsigned char)s[i] >= 0x20 && s[i] != 0x7f)); i++)
            ;
        if (i > v && (s[v] == ' ' || s[v] == '\t' || s[i - 1] == ' ' || s[i - 1] == '\t'))
            return 0;
        if (!crlf_at(s, n, &i))
            return 0;
        memcpy(tr + *tlen, s + start, i - start);
        *tlen += i - start;
    }
    return i == n;
}

static uint32_t fuzz_rand(uint32_t *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    return *seed >> 16;
}

/* The relay's buffer: a head of base bytes, then the body as it arrives;
 * the bytes that have not arrived, [end, cap), are poisoned. */
typedef struct {
    mp_framing_t f;
    mp_reframe_buf_t b;
    const char *in;
    size_t n, arrived;
    char *out;
    size_t olen;
    uint32_t seed;
    int dropped;  /* written bytes were compacted away: no replay any more */
    int restarts; /* replays done, as a retry to another server does */
} relay_t;

static void relay_poison(relay_t *r)
{
    ASAN_POISON_MEMORY_REGION(r->b.data + r->b.end, r->b.cap - r->b.end);
}

/* Up to 64 more input bytes arrive, as many as there is room for. */
static int relay_arrive(relay_t *r)
{
    size_t k = 1 + fuzz_rand(&r->seed) % 64, room = r->b.cap - r->b.end;
    if (k > r->n - r->arrived)
        k = r->n - r->arrived;
    if (k > room)
        k = room;
    ASAN_UNPOISON_MEMORY_REGION(r->b.data + r->b.end, k);
    memcpy(r->b.data + r->b.end, r->in + r->arrived, k);
    r->b.end += (uint32_t)k;
    r->arrived += k;
    return k != 0;
}

/* Writes as pump_request does, in random partial writes (a full socket
 * after the first one at random). Returns whether a byte was written. */
static int relay_write(relay_t *r)
{
    int wrote = 0;
    for (;;) {
        mp_slice frame, body, tail;
        mp_reframe_plan(&r->f, &r->b);
        mp_reframe_next(&r->f, &r->b, &frame, &body, &tail);
        size_t avail = frame.len + body.len + tail.len;
        if (!avail || (wrote && fuzz_rand(&r->seed) % 4 == 0))
            return wrote;
        size_t k = 1 + fuzz_rand(&r->seed) % avail, fk = k < frame.len ? k : frame.len;
        size_t bk = k - fk < body.len ? k - fk : body.len;
        memcpy(r->out + r->olen, frame.p, fk);
        memcpy(r->out + r->olen + fk, body.p, bk);
        memcpy(r->out + r->olen + fk + bk, tail.p, k - fk - bk);
        r->olen += k;
        mp_reframe_written(&r->f, &r->b, k);
        wrote = 1;
    }
}

/* Relays in[0..n) through a buffer of cap bytes as upstream.c does: arrive,
 * decode, plan and write, compact when full. Returns 0 when the body went
 * out whole, -1 when it is incomplete, else the status refusing it. */
static int relay_run(relay_t *r)
{
    for (size_t steps = 0;; steps++) {
        mp_reframe_buf_t was = r->b;
        uint32_t scan = r->f.scan;
        int moved = r->arrived < r->n && relay_arrive(r);
        int st = mp_reframe_decode(&r->f, &r->b, 0, UINT64_MAX);
        if (st)
            return st;
        moved |= relay_write(r);
        if (r->f.out_stage == 3)
            return 0;
        if (!r->dropped && r->restarts < 2 && fuzz_rand(&r->seed) % 16 == 0) {
            /* the first server broke: the replay starts over (upstream.c reset_request_body) */
            mp_reframe_restart(&r->f);
            r->b.start = r->b.base;
            r->olen = 0;
            r->restarts++;
        }
        if (!r->f.done && r->b.end == r->b.cap) {
            int dropped;
            if ((st = mp_reframe_compact(&r->f, &r->b, &dropped)) != 0)
                return st;
            r->dropped |= dropped;
            relay_poison(r);
        }
        moved |= memcmp(&was, &r->b, sizeof(was)) != 0 || scan != r->f.scan;
        /* every step moves a byte on: of the input, or of an output (at most 26 per input byte) */
        MP_BUG_ON(steps > (size_t)(r->restarts + 1) * (3 * 27 * r->n + 64));
        if (!moved) {
            MP_BUG_ON(r->arrived < r->n); /* stuck with input still to come */
            return -1;
        }
    }
}

void mp_fuzz_reframe(const uint8_t *data, size_t size)
{
    static const uint32_t caps[] = {64, 104, 256, 1024, FUZZ_MAX + 64};
    static char out[FUZZ_MAX * 26 + 64], d1[FUZZ_MAX], t1[FUZZ_MAX], d2[FUZZ_MAX * 26 + 64], t2[FUZZ_MAX * 26 + 64];
    if (size < 1 || size > FUZZ_MAX)
        return;
    relay_t r = {.in = (const char *)data + 1, .n = size - 1, .out = out, .seed = data[0] | 1u};
    uint32_t base = 1 + data[0] % 24, cap = caps[(data[0] >> 5) % MP_ARRAY_LEN(caps)];
    r.b = (mp_reframe_buf_t){malloc(cap), cap, base, base, base, base};
    r.f.scan = base;
    MP_BUG_ON(!r.b.data);
    memset(r.b.data, 'H', base); /* the request head: never touched */
    relay_poison(&r);
    strict_t first = strict_decode(r.in, r.n, d1, t1);
    int st = relay_run(&r);
    ASAN_UNPOISON_MEMORY_REGION(r.b.data, cap);
    for (uint32_t i = 0; i < base; i++)
        MP_BUG_ON(r.b.data[i] != 'H');
    int in_trailer = r.f.chunk.in_trailer;
    free(r.b.data);
    /* a buffer too small for the trailer lines is the only other verdict */
    if (st == 431) {
        MP_BUG_ON(!in_trailer || cap > base + r.n);
        return;
    }
    MP_BUG_ON(st != (first.ok ? 0 : first.bad ? 400 : -1));
    if (st)
        return;
    size_t dlen, tlen;
    MP_BUG_ON(!strict_reframed(out, r.olen, d2, &dlen, t2, &tlen));
    MP_BUG_ON(dlen != first.data_len || memcmp(d2, d1, dlen) != 0);
    MP_BUG_ON(tlen != first.trailer_len || memcmp(t2, t1, tlen) != 0);
}
