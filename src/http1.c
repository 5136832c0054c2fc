/* http1.c: strict, incremental, zero-copy parsing of HTTP/1.1 request and
 * response heads and of chunked framing (RFC 9110, RFC 9112). Pure: no I/O,
 * no malloc, no mutable globals (the one table, mp_http1_ctype, is const). */
#include "http1.h"

#include <limits.h>

#define MAX_LINE MP_CHUNK_MAX_LINE /* chunk size and trailer lines */

/* Character classes: RFC 9110 §5.6.2 (token), §5.5 (field values), RFC 9112
 * §3.2 (request-target), and what we accept in an authority. */
enum {
    C_TCHAR = MP_HTTP_C_TCHAR, /* token (http1.h: mp_http_is_tchar) */
    C_VALUE = 2,               /* field-vchar, SP, HTAB, obs-text */
    C_TARGET = 4,              /* VCHAR: no CTL, SP, DEL or byte >= 0x80 */
    C_HOST = 8,                /* not CTL, SP, DEL, '/', '\\', '?', '#', '@' */
    C_HEX = 16,
};

const uint8_t mp_http1_ctype[256] = {
    0,  0,  0,  0,  0,  0,  0,  0,  0,  2,  0,  0,  0,  0,  0,  0,  /* 0x0_ */
    0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  /* 0x1_ */
    2,  15, 14, 7,  15, 15, 15, 15, 14, 14, 15, 15, 14, 15, 15, 6,  /* 0x2_ */
    31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 14, 14, 14, 14, 14, 6,  /* 0x3_ */
    6,  31, 31, 31, 31, 31, 31, 15, 15, 15, 15, 15, 15, 15, 15, 15, /* 0x4_ */
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 14, 6,  14, 15, 15, /* 0x5_ */
    15, 31, 31, 31, 31, 31, 31, 15, 15, 15, 15, 15, 15, 15, 15, 15, /* 0x6_ */
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 14, 15, 14, 15, 0,  /* 0x7_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0x8_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0x9_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xA_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xB_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xC_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xD_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xE_ */
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, /* 0xF_ */
};

#define IS(c, cls) (mp_http1_ctype[(unsigned char)(c)] & (cls))

static const char empty[] = "";
static const char slash[] = "/";

static inline int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static inline int failed(const char **err, const char *msg, int status)
{
    *err = msg;
    return status;
}

/* Length of the line p..lf without its terminator (LF or CRLF). */
static inline size_t line_len(const char *p, const char *lf)
{
    size_t n = (size_t)(lf - p);
    return (n && lf[-1] == '\r') ? n - 1 : n;
}

/* ---- finding the end of a head ---- */

/* Where the search for the empty line that ends a head stopped. It is packed
 * into the caller's *scanned so that each byte is examined once however the
 * head arrives: pos (where to resume), start (first byte of the start line),
 * phase. 0 is the initial state. */
enum {
    SC_LEAD,  /* at a line start before the start line: empty lines are skipped */
    SC_START, /* inside the start line, no LF yet */
    SC_MID,   /* inside a field line */
    SC_BOL,   /* at the start of a field line, or at its first CR */
};

typedef struct {
    size_t pos;
    size_t start;
    unsigned phase;
} scan_t;

#define SCAN_BITS 30
#define SCAN_MAX (((size_t)1 << SCAN_BITS) - 1) /* heads are capped at 1 GiB */

_Static_assert(sizeof(size_t) * CHAR_BIT >= 2 * SCAN_BITS + 2, "*scanned packs pos, start and phase");

static size_t scan_pack(scan_t s)
{
    return s.pos | s.start << SCAN_BITS | (size_t)s.phase << (2 * SCAN_BITS);
}

/* A state that does not fit the buffer (a caller bug) restarts the search. */
static scan_t scan_unpack(size_t v, size_t n)
{
    scan_t s = {v & SCAN_MAX, (v >> SCAN_BITS) & SCAN_MAX, (unsigned)(v >> (2 * SCAN_BITS))};

    if (s.pos > n || s.start > s.pos || s.phase > SC_BOL)
        return (scan_t){0, 0, SC_LEAD};
    return s;
}

/* Resumes the search in buf[0..n). Returns the head length (through the empty
 * line), 0 when more bytes are needed, or -1 for a bare CR before the start
 * line. Bare CRs elsewhere are left to the line parsers. */
static ssize_t scan_head(const char *buf, size_t n, scan_t *st)
{
    size_t i = st->pos;
    const char *lf;

    for (;;) {
        switch (st->phase) {
        case SC_LEAD: /* RFC 9112 §2.2: empty lines before the request line */
            if (i == n || (buf[i] == '\r' && i + 1 == n))
                goto more;
            if (buf[i] == '\r' && buf[i + 1] != '\n')
                return -1;
            if (buf[i] == '\r' || buf[i] == '\n') {
                i += buf[i] == '\r' ? 2 : 1;
                break;
            }
            st->start = i;
            st->phase = SC_START;
            break;
        case SC_START:
        case SC_MID:
            lf = memchr(buf + i, '\n', n - i);
            if (!lf) {
                i = n;
                goto more;
            }
            i = (size_t)(lf - buf) + 1;
            st->phase = SC_BOL;
            break;
        default: /* SC_BOL; a lone CR at the end waits for the next byte */
            if (i == n || (buf[i] == '\r' && i + 1 == n))
                goto more;
            if (buf[i] == '\n')
                return (ssize_t)(i + 1);
            if (buf[i] == '\r' && buf[i + 1] == '\n')
                return (ssize_t)(i + 2);
            st->phase = SC_MID;
            break;
        }
    }
more:
    st->pos = i;
    return 0;
}

/* ---- start lines ---- */

/* "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3). A 1.x above 1.1 is served as
 * 1.1 (§2.3: a recipient treats a higher minor version as the highest it
 * supports), so *minor is 0 or 1. With partial, v[0..n) may be a prefix,
 * followed at most by the line's CR. Returns 0 (valid, or a valid prefix),
 * 1 for a well-formed version whose major is not 1 (505), or -1. */
static int parse_version(const char *v, size_t n, int partial, int *minor)
{
    static const char form[] = "HTTP/9.9"; /* '9': any digit */
    size_t k = n < 8 ? n : 8;

    if (!partial && n == 8 && memcmp(v, "HTTP/1.", 7) == 0 && (v[7] == '1' || v[7] == '0')) {
        *minor = v[7] - '0'; /* the common case, in one compare */
        return 0;
    }
    for (size_t i = 0; i < k; i++)
        if (form[i] == '9' ? (v[i] < '0' || v[i] > '9') : v[i] != form[i])
            return -1;
    if (partial)
        return (n <= 8 || (n == 9 && v[8] == '\r')) ? 0 : -1;
    if (n != 8)
        return -1;
    if (v[5] != '1')
        return 1;
    *minor = v[7] == '0' ? 0 : 1;
    return 0;
}

static int valid_host(mp_slice h)
{
    for (size_t i = 0; i < h.len; i++)
        if (!IS(h.p[i], C_HOST))
            return 0;
    return 1;
}

/* Splits s at its first '?' into req->path and req->query. */
static void split_path(mp_http_request_t *req, mp_slice s)
{
    const char *q = memchr(s.p, '?', s.len);
    size_t plen = q ? (size_t)(q - s.p) : s.len;

    req->path = plen ? (mp_slice){s.p, plen} : (mp_slice){slash, 1};
    req->has_query = q != NULL;
    req->query = q ? (mp_slice){q + 1, s.len - plen - 1} : (mp_slice){s.p + s.len, 0};
}

/* Length of a leading "http://" or "https://" (case-insensitive), else 0. */
static size_t scheme_len(mp_slice t)
{
    if (t.len >= 7 && mp_slice_ieq((mp_slice){t.p, 7}, "http://", 7))
        return 7;
    if (t.len >= 8 && mp_slice_ieq((mp_slice){t.p, 8}, "https://", 8))
        return 8;
    return 0;
}

/* RFC 9112 §3.2: origin-form, absolute-form (its authority becomes host) and
 * asterisk-form for OPTIONS. authority-form (CONNECT) is not served.
 * Returns 0 or 400. */
static int parse_target(mp_http_request_t *req, const char **err)
{
    mp_slice t = req->target;
    const char *a, *end = t.p + t.len, *p;
    size_t skip;

    if (mp_slice_eq(req->method, MP_SLICE_LIT("CONNECT")))
        return failed(err, "CONNECT is not supported", 400);
    if (t.p[0] == '/') {
        split_path(req, t);
        return 0;
    }
    if (t.len == 1 && t.p[0] == '*') {
        if (!mp_slice_eq(req->method, MP_SLICE_LIT("OPTIONS")))
            return failed(err, "asterisk-form without OPTIONS", 400);
        req->path = t;
        req->query = (mp_slice){end, 0};
        return 0;
    }
    skip = scheme_len(t);
    if (!skip)
        return failed(err, "bad request target", 400);
    for (a = p = t.p + skip; p < end && *p != '/' && *p != '?'; p++)
        ;
    req->host = (mp_slice){a, (size_t)(p - a)};
    if (!req->host.len || !valid_host(req->host))
        return failed(err, "bad authority in request target", 400);
    split_path(req, (mp_slice){p, (size_t)(end - p)});
    return 0;
}

/* Parses the request line p[0..n) (no terminator): method SP target SP
 * version (RFC 9112 §3). With partial, p[0..n) is a line still arriving:
 * MP_EAGAIN says it is a valid prefix so far, and the checks run in the same
 * order so that a prefix fails exactly as the whole line would. Returns 0
 * with the line's fields of req set, MP_EAGAIN, or 400/414/505 with *err. */
static int parse_request_line(const char *p, size_t n, int partial, const mp_http_limits_t *lim, mp_http_request_t *req,
                              const char **err)
{
    size_t i = 0, t;
    int minor = 0, v;

    while (i < n && IS(p[i], C_TCHAR))
        i++;
    if (i > MP_HTTP_MAX_METHOD)
        return failed(err, "method too long", 400);
    if (i == n && partial)
        return MP_EAGAIN;
    if (i == 0 || i == n || p[i] != ' ')
        return failed(err, "bad request line", 400);
    t = ++i;
    while (i < n && IS(p[i], C_TARGET))
        i++;
    if (i - t > lim->max_uri_size)
        return failed(err, "request target too long", 414);
    if (i == n && partial)
        return MP_EAGAIN;
    if (i == t || i == n || p[i] != ' ')
        return failed(err, "bad request target", 400);
    v = parse_version(p + i + 1, n - i - 1, partial, &minor);
    if (v < 0)
        return failed(err, "bad HTTP version", 400);
    if (v > 0) /* HTTP/2.0 and others are not spoken on this port */
        return failed(err, "HTTP version not supported", 505);
    if (partial)
        return MP_EAGAIN;
    req->method = (mp_slice){p, t - 1};
    req->target = (mp_slice){p + t, i - t};
    req->minor = minor;
    return parse_target(req, err);
}

/* "HTTP/1.x SP 3DIGIT SP reason-phrase" (RFC 9112 §4); a missing SP and
 * reason after the code is tolerated. Returns NULL or the error. */
static const char *parse_status_line(const char *p, size_t n, mp_http_response_t *res)
{
    if (n < 12 || parse_version(p, 8, 0, &res->minor) != 0 || p[8] != ' ')
        return "bad status line";
    if (p[9] < '1' || p[9] > '9' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9')
        return "bad status code";
    res->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    res->reason = (mp_slice){p + 12, 0};
    if (n == 12)
        return NULL;
    if (p[12] != ' ')
        return "bad status line";
    for (size_t i = 13; i < n; i++)
        if (!IS(p[i], C_VALUE))
            return "bad reason phrase";
    res->reason = (mp_slice){p + 13, n - 13};
    return NULL;
}

/* ---- field lines ---- */

/* What the fields say about framing and the connection. */
typedef struct {
    int64_t content_length;       /* -1 when absent */
    mp_slice host;                /* the Host value, when hosts == 1 */
    unsigned hosts;               /* Host fields */
    unsigned te_fields;           /* Transfer-Encoding fields */
    unsigned te_codings;          /* codings listed over all of them */
    unsigned te_chunked;          /* of which "chunked" */
    unsigned te_last_chunked : 1; /* the final coding is chunked */
    unsigned conn_close : 1;
    unsigned conn_keepalive : 1;
    unsigned expect_continue : 1;
    unsigned upgrade : 1;
} fields_t;

/* Parses one field line p[0..n) (no terminator) into h (RFC 9112 §5).
 * Returns 0 or 400 with *err. */
static inline __attribute__((always_inline)) int parse_field(const char *p, size_t n, mp_header_t *h, const char **err)
{
    size_t i = 0, v, e;

    if (is_ows(p[0])) /* RFC 9112 §5.2: obs-fold is refused */
        return failed(err, "obs-fold", 400);
    while (i < n && IS(p[i], C_TCHAR))
        i++;
    if (i < n && is_ows(p[i])) /* RFC 9112 §5.1 */
        return failed(err, "whitespace before colon", 400);
    if (i == 0 || i == n || p[i] != ':')
        return failed(err, "bad field name", 400);
    for (v = i + 1; v < n && is_ows(p[v]); v++)
        ;
    for (e = n; e > v && is_ows(p[e - 1]); e--)
        ;
    for (size_t k = v; k < e; k++)
        if (!IS(p[k], C_VALUE))
            return failed(err, "control character in field value", 400);
    h->name = (mp_slice){p, i};
    h->value = (mp_slice){p + v, e - v};
    return 0;
}

/* RFC 9110 §8.6: 1*DIGIT up to 2^62. A list or a repetition of one value
 * counts as that value; differing values conflict. Returns 0 or 400. */
static int add_content_length(mp_slice v, fields_t *f, const char **err)
{
    size_t i = 0;

    for (;;) {
        size_t first = i;
        int64_t n = 0;

        for (; i < v.len && v.p[i] >= '0' && v.p[i] <= '9'; i++) {
            if (n > (MP_HTTP_MAX_LENGTH - (v.p[i] - '0')) / 10)
                return failed(err, "Content-Length too large", 400);
            n = n * 10 + (v.p[i] - '0');
        }
        if (i == first)
            return failed(err, "bad Content-Length", 400);
        if (f->content_length >= 0 && f->content_length != n)
            return failed(err, "conflicting Content-Length", 400);
        f->content_length = n;
        while (i < v.len && is_ows(v.p[i]))
            i++;
        if (i == v.len)
            return 0;
        if (v.p[i++] != ',')
            return failed(err, "bad Content-Length", 400);
        while (i < v.len && is_ows(v.p[i]))
            i++;
    }
}

static void add_transfer_encoding(mp_slice v, fields_t *f)
{
    size_t pos = 0;
    mp_slice tok;

    f->te_fields++;
    while (mp_http1_next_token(v, &pos, &tok)) {
        f->te_codings++;
        f->te_last_chunked = MP_SLICE_IEQ(tok, "chunked");
        f->te_chunked += f->te_last_chunked;
    }
}

static void add_connection(mp_slice v, fields_t *f)
{
    size_t pos = 0;
    mp_slice tok;

    while (mp_http1_next_token(v, &pos, &tok)) {
        if (MP_SLICE_IEQ(tok, "close"))
            f->conn_close = 1;
        else if (MP_SLICE_IEQ(tok, "keep-alive"))
            f->conn_keepalive = 1;
    }
}

/* Notes what a field means for framing and the connection. Returns 0 or 400. */
static int interpret_field(const mp_header_t *h, fields_t *f, const char **err)
{
    mp_slice n = h->name;

    switch (n.len) { /* the length sorts out most names in one compare */
    case 4:
        if (MP_SLICE_IEQ(n, "host")) {
            f->hosts++;
            f->host = h->value;
        }
        break;
    case 6:
        if (MP_SLICE_IEQ(n, "expect") && MP_SLICE_IEQ(h->value, "100-continue"))
            f->expect_continue = 1;
        break;
    case 7:
        if (MP_SLICE_IEQ(n, "upgrade"))
            f->upgrade = 1;
        break;
    case 10:
        if (MP_SLICE_IEQ(n, "connection"))
            add_connection(h->value, f);
        break;
    case 14:
        if (MP_SLICE_IEQ(n, "content-length"))
            return add_content_length(h->value, f, err);
        break;
    case 17:
        if (MP_SLICE_IEQ(n, "transfer-encoding"))
            add_transfer_encoding(h->value, f);
        break;
    }
    return 0;
}

/* Parses the field lines from p up to end, which closes with the empty line
 * that ends the head. Returns 0, or 400/431 with *err. */
static int parse_fields(const char *p, const char *end, mp_header_t *h, unsigned *nh, fields_t *f, const char **err)
{
    for (;;) {
        const char *lf = memchr(p, '\n', (size_t)(end - p));
        size_t n;
        int rc;

        MP_ASSERT(lf != NULL); /* scan_head found the empty line */
        n = line_len(p, lf);
        if (n == 0)
            return 0;
        if (*nh == MP_HTTP_MAX_HEADERS)
            return failed(err, "too many header fields", 431);
        rc = parse_field(p, n, &h[*nh], err);
        if (!rc)
            rc = interpret_field(&h[*nh], f, err);
        if (rc)
            return rc;
        (*nh)++;
        p = lf + 1;
    }
}

/* RFC 9112 §6.1 and §6.3: the framing of a message from its fields. Returns
 * 0, 400 (ambiguous: the final coding is not chunked, or chunked twice) or
 * 501 (chunked after a coding we do not implement, e.g. "gzip, chunked"). */
static int check_framing(const fields_t *f, int minor, const char **err)
{
    if (!f->te_fields)
        return 0;
    if (f->content_length >= 0)
        return failed(err, "both Content-Length and Transfer-Encoding", 400);
    if (minor == 0)
        return failed(err, "Transfer-Encoding in HTTP/1.0", 400);
    if (f->te_codings == 0)
        return failed(err, "empty Transfer-Encoding", 400);
    if (!f->te_last_chunked) /* §6.3: the length cannot be determined */
        return failed(err, "final Transfer-Encoding is not chunked", 400);
    if (f->te_chunked != 1) /* §6.1: chunked is applied at most once */
        return failed(err, "chunked applied more than once", 400);
    if (f->te_codings != 1)
        return failed(err, "unsupported Transfer-Encoding", 501);
    return 0;
}

/* Framing, Host (RFC 9112 §3.2) and connection flags of a request. Returns 0,
 * 400 or 501. */
static int check_request(mp_http_request_t *req, const fields_t *f, const char **err)
{
    int rc = check_framing(f, req->minor, err);

    if (rc)
        return rc;
    if (f->hosts > 1)
        return failed(err, "duplicate Host", 400);
    if (f->hosts == 0 && req->minor == 1)
        return failed(err, "missing Host", 400);
    if (f->hosts == 1 && !valid_host(f->host))
        return failed(err, "bad Host", 400);
    if (!req->host.len) /* an absolute-form authority takes precedence */
        req->host = f->hosts ? f->host : (mp_slice){empty, 0};
    req->content_length = f->content_length;
    req->chunked = f->te_fields != 0;
    req->conn_close = f->conn_close;
    req->conn_keepalive = f->conn_keepalive;
    req->expect_continue = f->expect_continue && req->minor == 1; /* RFC 9110 §10.1.1 */
    req->upgrade = f->upgrade;
    return 0;
}

/* ---- requests ---- */

static void reset_request(mp_http_request_t *req)
{
    memset(req, 0, offsetof(mp_http_request_t, headers));
    req->content_length = -1;
    req->head_len = 0;
    req->status = 0;
    req->error = NULL;
}

static int request_failed(mp_http_request_t *req, int status, const char *err)
{
    req->status = status;
    req->error = err;
    return MP_EPROTO;
}

/* Parses a complete head buf[0..head_len) whose request line starts at start. */
static int parse_request_head(const char *buf, size_t head_len, size_t start, const mp_http_limits_t *lim,
                              mp_http_request_t *req)
{
    const char *line = buf + start, *end = buf + head_len;
    const char *lf = memchr(line, '\n', (size_t)(end - line));
    fields_t f = {.content_length = -1};
    const char *err = NULL;
    int rc = parse_request_line(line, line_len(line, lf), 0, lim, req, &err);

    if (!rc)
        rc = parse_fields(lf + 1, end, req->headers, &req->nheaders, &f, &err);
    if (!rc)
        rc = check_request(req, &f, &err);
    if (rc)
        return request_failed(req, rc, err);
    req->head_len = head_len;
    return (int)head_len;
}

/* The head is not complete in buf[0..n). Judge early what can be judged so a
 * client streaming a huge target gets 414 at once; the request line is checked
 * once when it completes, or on each call while it is longer than a target
 * may be (at most MP_HTTP_MAX_METHOD + 11 calls before it must fail). */
static int request_incomplete(const char *buf, size_t n, int head_full, unsigned was, const scan_t *st,
                              const mp_http_limits_t *lim, mp_http_request_t *req)
{
    const char *line = buf + st->start, *err = NULL;
    int rc = 0;

    if (st->phase == SC_START) {
        /* the start of a request line is checked as far as it came: bytes
         * that cannot begin one (a TLS hello on a plain port) are refused
         * now, not after client_header_timeout, with the status and reason
         * the whole line would get */
        size_t len = n - st->start;
        if (len && line[len - 1] == '\r') /* its CRLF may be on the way */
            len--;
        /* its first bytes only (the method and a little more), so that a
         * line arriving byte by byte costs linear time; past max_uri_size,
         * or with the head full, all of it */
        if (len <= lim->max_uri_size && !head_full && len > MP_HTTP_MAX_METHOD + 1)
            len = MP_HTTP_MAX_METHOD + 1;
        rc = parse_request_line(line, len, 1, lim, req, &err);
    } else if (was <= SC_START && st->phase > SC_START) {
        const char *lf = memchr(line, '\n', n - st->start);
        rc = parse_request_line(line, line_len(line, lf), 0, lim, req, &err);
    }
    if (rc > 0)
        return request_failed(req, rc, err);
    if (head_full)
        return request_failed(req, 431, "request head too large");
    return MP_EAGAIN;
}

int mp_http1_parse_request(const char *buf, size_t len, size_t *scanned, const mp_http_limits_t *lim,
                           mp_http_request_t *req)
{
    size_t max = lim->max_header_size < SCAN_MAX ? lim->max_header_size : SCAN_MAX;
    size_t n = len < max ? len : max;
    scan_t st = scan_unpack(*scanned, n);
    unsigned was = st.phase;
    ssize_t end = scan_head(buf, n, &st);

    *scanned = scan_pack(st);
    reset_request(req);
    if (end > 0)
        return parse_request_head(buf, (size_t)end, st.start, lim, req);
    if (end < 0)
        return request_failed(req, 400, "bare CR before the request line");
    /* len >= max: the head cannot end within max_header_size any more */
    return request_incomplete(buf, n, len >= max, was, &st, lim, req);
}

/* ---- responses ---- */

static void reset_response(mp_http_response_t *res)
{
    memset(res, 0, offsetof(mp_http_response_t, headers));
    res->content_length = -1;
    res->head_len = 0;
    res->error = NULL;
}

static int response_failed(mp_http_response_t *res, const char *err)
{
    res->error = err;
    return MP_EPROTO;
}

static int parse_response_head(const char *buf, size_t head_len, mp_http_response_t *res)
{
    const char *end = buf + head_len, *lf = memchr(buf, '\n', head_len);
    fields_t f = {.content_length = -1};
    const char *err = parse_status_line(buf, line_len(buf, lf), res);

    if (err)
        return response_failed(res, err);
    if (parse_fields(lf + 1, end, res->headers, &res->nheaders, &f, &err) || check_framing(&f, res->minor, &err))
        return response_failed(res, err);
    res->content_length = f.content_length;
    res->chunked = f.te_fields != 0;
    res->conn_close = f.conn_close;
    res->conn_keepalive = f.conn_keepalive;
    res->head_len = head_len;
    return (int)head_len;
}

int mp_http1_parse_response(const char *buf, size_t len, size_t *scanned, size_t max, mp_http_response_t *res)
{
    size_t n;
    scan_t st;
    ssize_t end;

    if (max > SCAN_MAX)
        max = SCAN_MAX;
    n = len < max ? len : max;
    st = scan_unpack(*scanned, n);
    if (st.phase == SC_LEAD) /* no empty lines are skipped before a status line */
        st = (scan_t){0, 0, SC_START};
    end = scan_head(buf, n, &st);
    *scanned = scan_pack(st);
    reset_response(res);
    if (end > 0)
        return parse_response_head(buf, (size_t)end, res);
    if (len >= max)
        return response_failed(res, "response head too large");
    return MP_EAGAIN;
}

/* ---- chunked transfer coding (RFC 9112 §7.1) ---- */

enum {
    CK_SIZE,       /* chunk-size hex digits */
    CK_BWS,        /* whitespace after the size or a token value: only ';' may follow */
    CK_EXT_START,  /* after ';': BWS, then a chunk-ext-name */
    CK_EXT_NAME,   /* inside a chunk-ext-name */
    CK_EXT_EQ_BWS, /* whitespace after a name: '=' or ';' must follow */
    CK_EXT_VALUE,  /* after '=': BWS, then a token or a quoted-string */
    CK_EXT_TOKEN,  /* inside a token value */
    CK_EXT_QUOTED, /* inside a quoted-string */
    CK_EXT_QPAIR,  /* after a backslash in a quoted-string */
    CK_EXT_QEND,   /* after the closing quote */
    CK_SIZE_LF,    /* CR ending the size line seen */
    CK_DATA,       /* c->remaining bytes of data */
    CK_DATA_CR,    /* the CRLF after data */
    CK_DATA_LF,    /* CR after data seen */
    CK_TRAILER,    /* start of a trailer field line or of the final empty line */
    CK_END_LF,     /* CR of the final empty line seen */
    CK_DONE,
    CK_ERROR,
};

static int hex_value(char ch)
{
    return ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
}

/* Counts one byte of a size line; over-long lines are refused. */
static int count_line(mp_chunked_t *c)
{
    return ++c->line_len > MAX_LINE ? MP_EPROTO : 0;
}

/* Counts one byte of chunk extensions, moving to state. */
static int ext_byte(mp_chunked_t *c, int state)
{
    c->state = state;
    c->ext_bytes++;
    return count_line(c);
}

static int add_size_digit(mp_chunked_t *c, char ch)
{
    /* a leading zero is framing overhead, like an extension: up to a line
     * of them per chunk would otherwise ride free past max_body_size */
    if (c->digits && c->remaining == 0)
        c->ext_bytes++;
    if (c->remaining > (uint64_t)MP_HTTP_MAX_LENGTH >> 4)
        return MP_EPROTO;
    c->remaining = c->remaining << 4 | (uint64_t)hex_value(ch);
    if (c->remaining > (uint64_t)MP_HTTP_MAX_LENGTH)
        return MP_EPROTO;
    c->digits++;
    return count_line(c);
}

static int end_size_line(mp_chunked_t *c)
{
    c->line_len = 0;
    c->digits = 0;
    c->state = c->remaining ? CK_DATA : CK_TRAILER;
    c->in_trailer = c->remaining == 0;
    return 0;
}

static int to(mp_chunked_t *c, int state)
{
    c->state = state;
    return 0;
}

static int finish(mp_chunked_t *c)
{
    c->state = CK_DONE;
    c->done = 1;
    return 0;
}

/* qdtext and the second byte of a quoted-pair (RFC 9110 §5.6.4). */
static int is_qdtext(unsigned char ch)
{
    return ch == '\t' || ch == ' ' || ch == 0x21 || (ch >= 0x23 && ch <= 0x7e && ch != '\\') || ch >= 0x80;
}

static int is_qpair(unsigned char ch)
{
    return ch == '\t' || (ch >= 0x20 && ch != 0x7f);
}

/* One byte of chunk-ext (RFC 9112 §7.1.1):
 *   *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
 * with chunk-ext-name = token and chunk-ext-val = token / quoted-string.
 * The CR that ends the line is accepted only where the grammar may end. */
static int ext_step(mp_chunked_t *c, unsigned char ch)
{
    int ws = is_ows((char)ch), tchar = IS(ch, C_TCHAR) != 0;

    switch (c->state) {
    case CK_BWS: return ch == ';' ? ext_byte(c, CK_EXT_START) : ws ? ext_byte(c, CK_BWS) : MP_EPROTO;
    case CK_EXT_START: /* a bare ';' or a name that is not a token is refused */
        return tchar ? ext_byte(c, CK_EXT_NAME) : ws ? ext_byte(c, CK_EXT_START) : MP_EPROTO;
    case CK_EXT_NAME:
        if (tchar)
            return ext_byte(c, CK_EXT_NAME);
        if (ch == '=' || ch == ';')
            return ext_byte(c, ch == '=' ? CK_EXT_VALUE : CK_EXT_START);
        if (ch == '\r')
            return to(c, CK_SIZE_LF);
        return ws ? ext_byte(c, CK_EXT_EQ_BWS) : MP_EPROTO;
    case CK_EXT_EQ_BWS:
        if (ch == '=' || ch == ';')
            return ext_byte(c, ch == '=' ? CK_EXT_VALUE : CK_EXT_START);
        return ws ? ext_byte(c, CK_EXT_EQ_BWS) : MP_EPROTO;
    case CK_EXT_VALUE:
        if (ch == '"')
            return ext_byte(c, CK_EXT_QUOTED);
        return tchar ? ext_byte(c, CK_EXT_TOKEN) : ws ? ext_byte(c, CK_EXT_VALUE) : MP_EPROTO;
    case CK_EXT_TOKEN:
    case CK_EXT_QEND:
        if (tchar && c->state == CK_EXT_TOKEN)
            return ext_byte(c, CK_EXT_TOKEN);
        if (ch == ';')
            return ext_byte(c, CK_EXT_START);
        if (ch == '\r')
            return to(c, CK_SIZE_LF);
        return ws ? ext_byte(c, CK_BWS) : MP_EPROTO;
    case CK_EXT_QUOTED:
        if (ch == '"' || ch == '\\')
            return ext_byte(c, ch == '"' ? CK_EXT_QEND : CK_EXT_QPAIR);
        return is_qdtext(ch) ? ext_byte(c, CK_EXT_QUOTED) : MP_EPROTO;
    default: /* CK_EXT_QPAIR */ return is_qpair(ch) ? ext_byte(c, CK_EXT_QUOTED) : MP_EPROTO;
    }
}

/* Advances the framing state by one byte outside chunk data and trailer
 * field lines. Every line ends with CRLF: a bare LF (or CR) anywhere is
 * refused (RFC 9112 §7.1), since a recipient that ends lines at LF would
 * frame the body differently. Returns 0 or MP_EPROTO. */
static int chunked_step(mp_chunked_t *c, unsigned char ch)
{
    switch (c->state) {
    case CK_SIZE: /* 1*HEXDIG: no leading whitespace, never empty */
        if (IS(ch, C_HEX))
            return add_size_digit(c, (char)ch);
        if (c->digits == 0)
            return MP_EPROTO;
        if (ch == '\r')
            return to(c, CK_SIZE_LF);
        if (ch == ';')
            return ext_byte(c, CK_EXT_START);
        return is_ows((char)ch) ? ext_byte(c, CK_BWS) : MP_EPROTO;
    case CK_SIZE_LF: return ch == '\n' ? end_size_line(c) : MP_EPROTO;
    case CK_DATA_CR: return ch == '\r' ? to(c, CK_DATA_LF) : MP_EPROTO;
    case CK_DATA_LF: return ch == '\n' ? to(c, CK_SIZE) : MP_EPROTO;
    case CK_END_LF: return ch == '\n' ? finish(c) : MP_EPROTO;
    case CK_DATA:
    case CK_TRAILER:
    case CK_DONE:
    case CK_ERROR: return MP_EPROTO; /* handled by the caller, or an error that stays one */
    default: return ext_step(c, ch);
    }
}

/* A trailer field line at s[0..n) (RFC 9112 §7.1.2): a field line as in a
 * head (parse_field), ended by CRLF. Returns its length with *f set, 0 when
 * its end has not arrived yet, or MP_EPROTO. */
static ssize_t trailer_line(mp_chunked_t *c, const char *s, size_t n, mp_header_t *f)
{
    const char *lf = memchr(s, '\n', n < MAX_LINE + 2 ? n : MAX_LINE + 2);
    const char *err = NULL;
    size_t len;

    if (!lf)
        return n < MAX_LINE + 2 ? 0 : MP_EPROTO;
    if (lf == s || lf[-1] != '\r')
        return MP_EPROTO;
    len = (size_t)(lf - s) - 1;
    if (parse_field(s, len, f, &err) != 0)
        return MP_EPROTO;
    c->trailer_bytes += len + 2;
    return (ssize_t)(len + 2);
}

static ssize_t chunked_failed(mp_chunked_t *c)
{
    c->state = CK_ERROR;
    return MP_EPROTO;
}

ssize_t mp_chunked_next(mp_chunked_t *c, const char *p, size_t len, mp_chunk_part_t *out)
{
    size_t i = 0;

    out->data = (mp_slice){p, 0};
    out->field = (mp_header_t){{p, 0}, {p, 0}};
    while (i < len && !c->done) {
        if (c->state == CK_DATA) {
            size_t take = c->remaining < len - i ? (size_t)c->remaining : len - i;

            out->data = (mp_slice){p + i, take};
            c->remaining -= take;
            if (!c->remaining)
                c->state = CK_DATA_CR;
            return (ssize_t)(i + take);
        }
        if (c->state == CK_TRAILER && p[i] != '\r') {
            ssize_t k = trailer_line(c, p + i, len - i, &out->field);

            if (k < 0)
                return chunked_failed(c);
            return (ssize_t)i + k; /* a field, or the line start when it is incomplete */
        }
        if (c->state == CK_TRAILER) {
            c->state = CK_END_LF;
        } else if (chunked_step(c, (unsigned char)p[i]) < 0) {
            return chunked_failed(c);
        }
        i++;
    }
    return (ssize_t)i;
}

ssize_t mp_chunked_decode(mp_chunked_t *c, const char *p, size_t len, mp_slice *data)
{
    size_t i = 0;

    *data = (mp_slice){p, 0};
    while (i < len && !c->done) {
        mp_chunk_part_t part;
        ssize_t k = mp_chunked_next(c, p + i, len - i, &part);

        if (k <= 0)
            return k < 0 ? k : (ssize_t)i;
        i += (size_t)k;
        if (part.data.len) {
            *data = part.data;
            break;
        }
    }
    return (ssize_t)i;
}

/* ---- re-framing (what the proxy writes for a chunked body it relays) ---- */

ssize_t mp_chunked_decode_into(mp_chunked_t *c, char *dst, const char *p, size_t len, size_t *written)
{
    mp_chunk_part_t part;
    ssize_t k = mp_chunked_next(c, p, len, &part);

    *written = 0;
    if (k < 0)
        return k;
    if (part.data.len) {
        memmove(dst, part.data.p, part.data.len);
        *written = part.data.len;
    } else if (part.field.name.len && mp_http1_trailer_allowed(part.field.name)) {
        *written = mp_chunked_put_trailer(dst, &part.field);
    }
    return k;
}

size_t mp_chunked_frame(char *out, uint64_t n, int after_data)
{
    static const char hex[] = "0123456789abcdef";
    size_t k = 0;
    int shift = 60;

    if (after_data) {
        out[k++] = '\r';
        out[k++] = '\n';
    }
    while (shift > 0 && !(n >> shift))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        out[k++] = hex[(n >> shift) & 15];
    out[k++] = '\r';
    out[k++] = '\n';
    return k;
}

/* RFC 9110 §6.5.1: fields a sender must not put in trailers (framing,
 * routing, request modifiers, authentication, response control, how to
 * process the content), hop-by-hop fields (§7.6.1), and the fields the
 * proxy itself sets for its upstreams. content-* and x-forwarded-* are
 * dropped by prefix below. */
static const char *const trailer_denied[] = {
    "transfer-encoding",
    "host",
    "trailer",
    "te",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "cache-control",
    "expect",
    "max-forwards",
    "pragma",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "authorization",
    "proxy-authorization",
    "authentication-info",
    "proxy-authenticate",
    "www-authenticate",
    "cookie",
    "set-cookie",
    "age",
    "expires",
    "date",
    "location",
    "retry-after",
    "vary",
    "warning",
    "forwarded",
    "x-request-id",
    "x-real-ip",
};

static int has_prefix(mp_slice s, const char *lower, size_t n)
{
    return s.len >= n && mp_slice_ieq((mp_slice){s.p, n}, lower, n);
}

int mp_http1_trailer_allowed(mp_slice name)
{
    if (has_prefix(name, "content-", 8) || has_prefix(name, "x-forwarded-", 12) || memchr(name.p, '_', name.len))
        return 0;
    for (size_t i = 0; i < MP_ARRAY_LEN(trailer_denied); i++)
        if (mp_slice_ieq(name, trailer_denied[i], strlen(trailer_denied[i])))
            return 0;
    return 1;
}

size_t mp_chunked_put_trailer(char *dst, const mp_header_t *f)
{
    /* The line had OWS after the colon if the value starts past it; only
     * then is the SP written, so the result is never longer than the line. */
    int sp = f->value.p > f->name.p + f->name.len + 1;
    size_t k = f->name.len;

    memmove(dst, f->name.p, k);
    dst[k++] = ':';
    if (sp)
        dst[k++] = ' ';
    memmove(dst + k, f->value.p, f->value.len);
    k += f->value.len;
    dst[k++] = '\r';
    dst[k++] = '\n';
    return k;
}

/* ---- helpers ---- */

int mp_http1_find(const mp_header_t *h, unsigned n, const char *lower_name, size_t name_len)
{
    for (unsigned i = 0; i < n; i++)
        if (mp_slice_ieq(h[i].name, lower_name, name_len))
            return (int)i;
    return -1;
}

int mp_http1_next_token(mp_slice value, size_t *pos, mp_slice *tok)
{
    size_t i = *pos, e;
    const char *comma;

    while (i < value.len && (is_ows(value.p[i]) || value.p[i] == ','))
        i++;
    if (i >= value.len) {
        *pos = value.len;
        return 0;
    }
    comma = memchr(value.p + i, ',', value.len - i);
    *pos = comma ? (size_t)(comma - value.p) : value.len;
    for (e = *pos; is_ows(value.p[e - 1]); e--) /* stops at value.p[i], not OWS */
        ;
    *tok = (mp_slice){value.p + i, e - i};
    return 1;
}

const char *mp_http1_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}
