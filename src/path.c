/* path.c: request-path normalisation (path.h): percent-decoding of
 * unreserved characters, dot-segment removal, slash merging, and the
 * refusals that keep a backend from reading the path another way than the
 * router did. Pure: no I/O, no malloc. */
#include "path.h"

/* What one step of reading a path gives. */
enum { U_BYTES, U_SEP, U_ERR };

static const char hex_upper[] = "0123456789ABCDEF";

static int refuse(const char **why, const char *reason)
{
    *why = reason;
    return U_ERR;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* RFC 3986 §2.3 */
static int is_unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

/* A byte that stands for itself in a normal path. */
static int is_plain(unsigned char c)
{
    return c > ' ' && c < 0x7f && c != '%' && c != '\\' && c != '#';
}

/* A %XX escape at p[0..2] (p[0] is '%', two bytes follow): its bytes in
 * out (*n of them), a separator, or a refusal. */
static int read_escape(const char *p, const mp_path_opts_t *o, char *out, size_t *n, const char **why)
{
    int hi = hex_value(p[1]), lo = hex_value(p[2]);
    if (hi < 0 || lo < 0)
        return refuse(why, "bad percent-encoding in the path");
    unsigned char v = (unsigned char)(hi << 4 | lo);
    if (v == 0)
        return refuse(why, "%00 in the path");
    if (v == '/' || v == '\\') {
        if (o->escaped_slashes == MP_SLASHES_DECODE)
            return U_SEP;
        if (o->escaped_slashes != MP_SLASHES_KEEP)
            return refuse(why, "an encoded slash (%2F or %5C) in the path (settings.escaped_slashes)");
    } else if (is_unreserved(v)) {
        out[0] = (char)v;
        *n = 1;
        return U_BYTES;
    }
    out[0] = '%';
    out[1] = hex_upper[v >> 4];
    out[2] = hex_upper[v & 15];
    *n = 3;
    return U_BYTES;
}

/* Reads the unit at p[*i] (len > *i): a byte, an escape or a separator;
 * advances *i past it. */
static int read_unit(const char *p, size_t len, size_t *i, const mp_path_opts_t *o, char *out, size_t *n,
                     const char **why)
{
    unsigned char c = (unsigned char)p[*i];
    if (c == '/') {
        *i += 1;
        return U_SEP;
    }
    if (c == '%') {
        if (len - *i < 3)
            return refuse(why, "bad percent-encoding in the path");
        *i += 3;
        return read_escape(p + *i - 3, o, out, n, why);
    }
    if (c == '\\')
        return refuse(why, "a backslash in the path");
    if (c == '#')
        return refuse(why, "'#' in the request target");
    if (!is_plain(c))
        return refuse(why, "a control byte, space or non-ASCII byte in the path");
    out[0] = (char)c;
    *n = 1;
    *i += 1;
    return U_BYTES;
}

/* Whether s[0..n) is "." or ".." followed by ';' (path parameters): Java
 * servlet containers (Tomcat, Jetty, Spring) drop each segment's ";params"
 * before removing dot segments, so "/x/..;/admin" is "/admin" to them. */
static int is_dot_params(const char *s, size_t n)
{
    size_t d = n && s[0] == '.' ? (n > 1 && s[1] == '.' ? 2 : 1) : 0;
    return d && n > d && s[d] == ';';
}

/* Ends the segment out[seg..*w) (out[seg - 1] is '/'): a "." segment is
 * removed, a ".." one with the segment before it (RFC 3986 §5.2.4 B-D).
 * Returns 1 when it was a dot segment, 0 when not, -1 when ".." would
 * climb above the root, -2 for a dot segment with path parameters. */
static int end_segment(const char *out, size_t seg, size_t *w)
{
    size_t n = *w - seg;
    if (is_dot_params(out + seg, n))
        return -2;
    if (n == 1 && out[seg] == '.') {
        *w = seg;
        return 1;
    }
    if (n != 2 || out[seg] != '.' || out[seg + 1] != '.')
        return 0;
    if (seg == 1)
        return -1;
    size_t j = seg - 2;
    while (out[j] != '/')
        j--;
    *w = j + 1;
    return 1;
}

/* A refusal from end_segment (dots < 0). */
static ssize_t bad_segment(int dots, const char **why)
{
    *why = dots == -2 ? "a dot segment with path parameters (\"..;\" or \".;\") in the path"
                      : "the path climbs above /";
    return MP_EPROTO;
}

ssize_t mp_path_normalize(const char *p, size_t len, const mp_path_opts_t *o, char *out, const char **why)
{
    if (len == 0 || p[0] != '/') {
        *why = "the path does not start with '/'";
        return MP_EPROTO;
    }
    size_t i = 1, w = 1, seg = 1; /* out[seg..w): the segment being read */
    out[0] = '/';
    while (i < len) {
        char unit[3];
        size_t n = 0;
        int k = read_unit(p, len, &i, o, unit, &n, why);
        if (k == U_ERR)
            return MP_EPROTO;
        if (k == U_BYTES) { /* w + n <= i: out may be p, whose unread bytes stay ahead */
            memcpy(out + w, unit, n);
            w += n;
            continue;
        }
        int dots = end_segment(out, seg, &w);
        if (dots < 0)
            return bad_segment(dots, why);
        /* a dot segment takes its separator along; an empty one is merged */
        if (!dots && !(w == seg && o->merge_slashes))
            out[w++] = '/';
        seg = w;
    }
    /* the last segment: a dot segment there leaves the '/' before it */
    int dots = end_segment(out, seg, &w);
    if (dots < 0)
        return bad_segment(dots, why);
    return (ssize_t)w;
}

int mp_path_is_normal(const char *p, size_t len, const mp_path_opts_t *o)
{
    if (len == 0 || p[0] != '/')
        return 0;
    for (size_t i = 0; i < len; i++) {
        if (!is_plain((unsigned char)p[i]))
            return 0;
        if (p[i] != '/')
            continue;
        const char *s = p + i + 1;
        size_t rest = len - i - 1;
        if ((o->merge_slashes && rest && s[0] == '/') || (rest && s[0] == '.' && (rest == 1 || s[1] == '/')) ||
            (rest >= 2 && s[0] == '.' && s[1] == '.' && (rest == 2 || s[2] == '/')) || is_dot_params(s, rest))
            return 0;
    }
    return 1;
}

int mp_path_check_query(const char *q, size_t len, const char **why)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)q[i];
        if (c == '#' || c == '\\') {
            *why = c == '#' ? "'#' in the request target" : "a backslash in the query";
            return MP_EPROTO;
        }
        if (c <= ' ' || c >= 0x7f) {
            *why = "a control byte, space or non-ASCII byte in the query";
            return MP_EPROTO;
        }
    }
    return 0;
}

/* ---- fuzzing ---- */

/* What a normalised path promises: it starts with '/', holds no dot
 * segment, no "//" when merging, nothing refused, and normalises to itself. */
static void check_normal(const char *p, size_t n, const mp_path_opts_t *o, char *tmp)
{
    MP_BUG_ON(n == 0 || p[0] != '/');
    for (size_t i = 0; i < n; i++) {
        MP_BUG_ON(p[i] == '\\' || p[i] == '#' || (unsigned char)p[i] <= ' ' || (unsigned char)p[i] >= 0x7f);
        if (p[i] != '/')
            continue;
        const char *s = p + i + 1;
        size_t rest = n - i - 1;
        MP_BUG_ON(o->merge_slashes && rest && s[0] == '/');
        MP_BUG_ON(rest && s[0] == '.' && (rest == 1 || s[1] == '/'));
        MP_BUG_ON(rest >= 2 && s[0] == '.' && s[1] == '.' && (rest == 2 || s[2] == '/'));
        MP_BUG_ON(is_dot_params(s, rest));
    }
    const char *why = NULL;
    ssize_t again = mp_path_normalize(p, n, o, tmp, &why);
    MP_BUG_ON(again != (ssize_t)n || memcmp(tmp, p, n) != 0);
}

void mp_fuzz_path(const uint8_t *data, size_t size)
{
    static char in[4096], out[4096], tmp[4096];
    if (size > sizeof(in))
        return;
    for (int merge = 0; merge < 2; merge++)
        for (int mode = MP_SLASHES_REJECT; mode <= MP_SLASHES_DECODE; mode++) {
            mp_path_opts_t o = {(uint8_t)merge, (uint8_t)mode};
            const char *why = NULL, *why2 = NULL;
            ssize_t n = mp_path_normalize((const char *)data, size, &o, out, &why);
            memcpy(in, data, size);
            ssize_t m = mp_path_normalize(in, size, &o, in, &why2); /* in place: the same result */
            MP_BUG_ON(n != m || (n >= 0 && memcmp(in, out, (size_t)n) != 0));
            if (n < 0) {
                MP_BUG_ON(n != MP_EPROTO || !why || why != why2 || mp_path_is_normal((const char *)data, size, &o));
                continue;
            }
            MP_BUG_ON((size_t)n > size);
            if (mp_path_is_normal((const char *)data, size, &o))
                MP_BUG_ON((size_t)n != size || memcmp(out, data, size) != 0);
            check_normal(out, (size_t)n, &o, tmp);
        }
}
