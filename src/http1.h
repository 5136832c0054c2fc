/* http1.h: strict, incremental, zero-copy HTTP/1.1 parsing of request and
 * response heads and of chunked framing (RFC 9110, RFC 9112). Pure: no I/O,
 * no malloc, no global state. Every slice points into the caller's buffer. */
#ifndef MP_HTTP1_H
#define MP_HTTP1_H

#include "common.h"

#include <stdint.h>
#include <sys/types.h>

#define MP_HTTP_MAX_HEADERS 100               /* more fields than this: 431 */
#define MP_HTTP_MAX_LENGTH ((int64_t)1 << 62) /* largest Content-Length or chunk size */
#define MP_HTTP_MAX_METHOD 32                 /* a longer method: 400 */

typedef struct {
    mp_slice name;  /* as received (case preserved) */
    mp_slice value; /* leading/trailing OWS removed */
} mp_header_t;

typedef struct {
    size_t max_header_size; /* whole head incl. request line; 431 beyond */
    size_t max_uri_size;    /* request target; 414 beyond */
} mp_http_limits_t;

typedef struct {
    mp_slice method;
    mp_slice target; /* the request-target exactly as received */
    mp_slice path;   /* origin-form: target up to '?'; absolute-form: the path after the authority ("/" if none) */
    mp_slice query;  /* after '?', without it; len 0 if none (has_query says whether '?' was there) */
    mp_slice host;   /* authority of an absolute-form target, else the Host field value; may include ":port" */
    int minor;       /* HTTP/1.<minor>: 0 or 1 (a higher minor counts as 1) */
    int64_t content_length; /* -1 when absent */
    unsigned chunked : 1;   /* Transfer-Encoding: chunked */
    unsigned has_query : 1;
    unsigned conn_close : 1;      /* Connection: close */
    unsigned conn_keepalive : 1;  /* Connection: keep-alive */
    unsigned expect_continue : 1; /* Expect: 100-continue */
    unsigned upgrade : 1;         /* an Upgrade field is present */
    unsigned nheaders;
    mp_header_t headers[MP_HTTP_MAX_HEADERS];
    size_t head_len;   /* bytes of the head including the final empty line */
    int status;        /* on MP_EPROTO: 400, 414, 431, 501 or 505 */
    const char *error; /* on MP_EPROTO: static reason, e.g. "conflicting Content-Length" */
} mp_http_request_t;

typedef struct {
    int minor;
    int status; /* 100..999 */
    mp_slice reason;
    int64_t content_length; /* -1 when absent */
    unsigned chunked : 1;
    unsigned conn_close : 1;
    unsigned conn_keepalive : 1;
    unsigned nheaders;
    mp_header_t headers[MP_HTTP_MAX_HEADERS];
    size_t head_len;
    const char *error; /* on MP_EPROTO */
} mp_http_response_t;

/* Parses a request head from buf[0..len). The caller calls again with the
 * same buffer grown by newly read bytes; *scanned (start at 0) remembers how
 * far the search for the end of the head got, so a head that arrives one byte
 * at a time is not rescanned from the start. It is opaque (it packs offsets
 * and a phase): pass it back unchanged, reset it to 0 for a new head. The
 * bytes may move between calls (offsets only are kept).
 * Returns the head length (> 0) with req filled, MP_EAGAIN when the head is
 * not complete yet (and still within limits), or MP_EPROTO with req->status
 * (400 bad syntax / bad framing / missing Host on 1.1 / method longer than
 * MP_HTTP_MAX_METHOD, a final Transfer-Encoding other than chunked, 414
 * target too long, 431 head too large or too many fields, 501 a coding
 * before chunked (e.g. "gzip, chunked"), 505 an HTTP major version other
 * than 1) and req->error set. HTTP/1.2 and above are read as HTTP/1.1. A bad or too
 * long request line is refused as soon as it shows, before the head is
 * complete. Leading empty lines before the request line are skipped
 * (RFC 9112 §2.2) and count into head_len. Limits above 1 GiB are clamped. */
int mp_http1_parse_request(const char *buf, size_t len, size_t *scanned, const mp_http_limits_t *lim,
                           mp_http_request_t *req);

/* Parses a response head from buf[0..len) the same way (max bounds the head).
 * Returns the head length, MP_EAGAIN, or MP_EPROTO with res->error. When both
 * Transfer-Encoding: chunked and Content-Length are present the response is
 * refused (MP_EPROTO). A Transfer-Encoding other than chunked, or any in an
 * HTTP/1.0 response (RFC 9112 §6.1): MP_EPROTO. */
int mp_http1_parse_response(const char *buf, size_t len, size_t *scanned, size_t max, mp_http_response_t *res);

/* Chunked transfer-coding decoder (RFC 9112 §7.1). A zeroed struct is ready. */
typedef struct {
    int state;
    uint64_t remaining; /* bytes left in the current chunk's data */
    unsigned digits;
    unsigned line_len;       /* bytes of the current size line, bounded */
    uint64_t ext_bytes;      /* framing overhead so far: chunk-ext bytes and leading zeros of sizes */
    uint64_t trailer_bytes;  /* bytes of the trailer field lines so far, their CRLFs included: the
                             * trailer section is these and its final CRLF (2 more bytes) */
    unsigned in_trailer : 1; /* the last chunk was read: the trailer section follows */
    unsigned done : 1;       /* the last chunk and the trailer section were consumed */
} mp_chunked_t;

#define MP_CHUNK_MAX_LINE 4096 /* longest size line or trailer field line, CRLF excluded */
#define MP_CHUNK_FRAME_MAX 24  /* longest framing mp_chunked_frame writes */

/* What one call of mp_chunked_next found: at most one of the two. */
typedef struct {
    mp_slice data;     /* a run of chunk data (a slice of the input); len 0 when none */
    mp_header_t field; /* a trailer field; name.len 0 when none */
} mp_chunk_part_t;

/* Consumes chunked framing from p[0..len) and reports at most one part: a
 * run of chunk data, or one trailer field line parsed as a head's field line
 * is (name a token, no whitespace before the colon, no obs-fold, no CTL in
 * the value). Returns the bytes consumed, which is less than len only when a
 * part was reported, the message ended (c->done; bytes after it are never
 * consumed), or a trailer line has not fully arrived (its bytes are not
 * consumed: pass them again with more); or MP_EPROTO, after which c stays
 * failed. Refused (RFC 9112 §7.1): a bad chunk size (non-hex, overflow past
 * 2^62, empty, leading whitespace), any line not ended by CRLF (a bare LF or
 * CR after the size, the extensions, the data, the last chunk or a trailer
 * line), chunk extensions outside the grammar of §7.1.1 (a bare ';', a name
 * that is not a token, a bad quoted-string, whitespace before the CRLF), a
 * size line or a trailer line longer than MP_CHUNK_MAX_LINE. Framing
 * overhead (extensions, leading zeros of a size) and trailer field lines are
 * counted in c (ext_bytes, trailer_bytes), not bounded: a caller counts
 * ext_bytes and trailer_bytes against its body limit (a body without
 * extensions, leading zeros or trailer fields counts its data only), and
 * the trailer section, trailer_bytes + 2, against its head limit. */
ssize_t mp_chunked_next(mp_chunked_t *c, const char *p, size_t len, mp_chunk_part_t *out);

/* mp_chunked_next reporting data runs only (trailer fields are checked and
 * skipped): at most one run per call, in *data (len 0 when none). */
ssize_t mp_chunked_decode(mp_chunked_t *c, const char *p, size_t len, mp_slice *data);

/* One step of decoding a chunked body in place, as the relay does: the part
 * mp_chunked_next finds in p[0..len) is written at dst (dst <= p in the same
 * buffer): a data run as it is, a trailer field re-serialised
 * (mp_chunked_put_trailer) if mp_http1_trailer_allowed, else nothing.
 * Returns what mp_chunked_next returns, with *written the bytes put at dst
 * (never more than consumed). c->in_trailer tells data from fields. */
ssize_t mp_chunked_decode_into(mp_chunked_t *c, char *dst, const char *p, size_t len, size_t *written);

/* Writes into out (MP_CHUNK_FRAME_MAX bytes) the strict framing that
 * announces n bytes of chunk data: the CRLF that ends the previous chunk's
 * data when after_data, then n in lowercase hex and CRLF (n == 0: the last
 * chunk). Returns its length. */
size_t mp_chunked_frame(char *out, uint64_t n, int after_data);

/* Whether a trailer field may be forwarded: not one RFC 9110 §6.5.1 keeps
 * out of trailers (framing, routing, request modifiers, authentication,
 * response control, Content-*), not hop-by-hop, not one the proxy sets
 * (X-Forwarded-*, Forwarded, X-Request-ID, X-Real-IP), no '_' in its name. */
int mp_http1_trailer_allowed(mp_slice name);

/* Writes f (as mp_chunked_next parsed it) re-serialised as
 * "name:" [SP] value CRLF at dst and returns its length. The SP is written
 * when the line had OWS after the colon, so the result is never longer than
 * the line: dst may be at or before f->name.p in the same buffer. */
size_t mp_chunked_put_trailer(char *dst, const mp_header_t *f);

/* Finds a header by lowercase name; returns its index or -1. */
int mp_http1_find(const mp_header_t *h, unsigned n, const char *lower_name, size_t name_len);

/* Iterates the comma-separated tokens of a field value (e.g. Connection).
 * Start with *pos = 0; returns 1 with *tok set (OWS trimmed, empty elements
 * skipped) or 0 at the end. */
int mp_http1_next_token(mp_slice value, size_t *pos, mp_slice *tok);

/* The reason phrase for a status ("Not Found"), or "Unknown". */
const char *mp_http1_reason(int status);

/* libFuzzer entry points (fuzz.c): feed arbitrary bytes; must never crash. */
void mp_fuzz_http1(const uint8_t *data, size_t size);
void mp_fuzz_chunked(const uint8_t *data, size_t size);
void mp_fuzz_reframe(const uint8_t *data, size_t size);

/* The parser's character classes, one byte per character; MP_HTTP_C_TCHAR
 * is RFC 9110 §5.6.2's tchar (ALPHA, DIGIT and !#$%&'*+-.^_`|~), the other
 * bits are http1.c's own. */
#define MP_HTTP_C_TCHAR 1
extern const uint8_t mp_http1_ctype[256];

/* Whether c may appear in a token (a method, a field name). */
static inline int mp_http_is_tchar(unsigned char c)
{
    return mp_http1_ctype[c] & MP_HTTP_C_TCHAR;
}

#endif
