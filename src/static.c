/* static.c: static routes' files: the path a request names under the
 * route's root (decoded, never outside root), conditional requests, and the
 * response head, through the route's response hooks. */
#include "static.h"

#include "config.h"
#include "gen.h"
#include "head.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define OPEN_FLAGS (O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY) /* O_NONBLOCK: a FIFO must not block the worker */

static const char *const MONTHS = "JanFebMarAprMayJunJulAugSepOctNovDec";

static unsigned header_values(const mp_req_t *r, const char *lower, mp_slice *out, unsigned max);

/* ---- names ---------------------------------------------------------------- */

static const struct {
    const char *ext;
    const char *type;
} TYPES[] = {
    {"html", "text/html; charset=utf-8"},
    {"htm", "text/html; charset=utf-8"},
    {"css", "text/css; charset=utf-8"},
    {"js", "text/javascript; charset=utf-8"},
    {"mjs", "text/javascript; charset=utf-8"},
    {"json", "application/json"},
    {"map", "application/json"},
    {"svg", "image/svg+xml"},
    {"png", "image/png"},
    {"jpg", "image/jpeg"},
    {"jpeg", "image/jpeg"},
    {"gif", "image/gif"},
    {"webp", "image/webp"},
    {"avif", "image/avif"},
    {"ico", "image/x-icon"},
    {"txt", "text/plain; charset=utf-8"},
    {"wasm", "application/wasm"},
    {"woff", "font/woff"},
    {"woff2", "font/woff2"},
    {"xml", "application/xml"},
    {"pdf", "application/pdf"},
};

static const char *content_type(const char *file)
{
    const char *slash = strrchr(file, '/');
    const char *dot = strrchr(slash ? slash : file, '.');
    if (dot && dot[1])
        for (size_t i = 0; i < MP_ARRAY_LEN(TYPES); i++)
            if (strcasecmp(dot + 1, TYPES[i].ext) == 0)
                return TYPES[i].type;
    return "application/octet-stream";
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = mp_lower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decodes p into out as "a/b/c": no leading '/', no empty or "."
 * segments. Decoding comes first, so "%2e%2e" and "..%2f" are ".." too.
 * Returns 0, 400 (a bad escape, a NUL byte, a ".." segment) or 404 (longer
 * than cap). */
static int clean_path(mp_slice p, char *out, size_t cap)
{
    size_t n = 0, seg = 0; /* seg: where the current segment starts in out */
    for (size_t i = 0; i <= p.len; i++) {
        char ch = i == p.len ? '/' : p.p[i];
        if (ch == '%') { /* "%2f" decodes to a separator like any '/' */
            int hi = i + 2 < p.len ? hex_value(p.p[i + 1]) : -1;
            int lo = hi >= 0 ? hex_value(p.p[i + 2]) : -1;
            if (lo < 0)
                return 400;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (ch == '\0')
            return 400;
        if (ch == '/') {
            size_t len = n - seg;
            if (len == 2 && out[seg] == '.' && out[seg + 1] == '.')
                return 400;
            if (len == 0 || (len == 1 && out[seg] == '.')) {
                n = seg;
                continue;
            }
            if (n + 1 >= cap)
                return 404;
            out[n++] = '/';
            seg = n;
            continue;
        }
        if (n + 1 >= cap)
            return 404;
        out[n++] = ch;
    }
    if (n && out[n - 1] == '/')
        n--;
    out[n] = '\0';
    return 0;
}

/* ---- opening beneath root -------------------------------------------------- */

static int no_openat2; /* latched when the kernel has no openat2 (ENOSYS) */

/* The realpath() way: the whole path resolved, then refused unless it is
 * root's real path or under it. Races with a concurrent rename of a
 * directory inside root are possible; openat2 has none. */
static int open_checked(const char *root, const char *rel)
{
    char full[PATH_MAX], real[PATH_MAX], rroot[PATH_MAX];
    if ((size_t)snprintf(full, sizeof(full), "%s/%s", root, rel) >= sizeof(full)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (!realpath(root, rroot) || !realpath(full, real))
        return -1;
    size_t n = strlen(rroot);
    if (strcmp(rroot, "/") != 0 && (strncmp(real, rroot, n) != 0 || (real[n] != '\0' && real[n] != '/'))) {
        errno = EXDEV; /* what openat2 says for a path leading out */
        return -1;
    }
    return open(real, OPEN_FLAGS | O_NOFOLLOW);
}

/* Opens rel (relative, "." for root itself) beneath root. Returns the fd, or
 * -1 with errno: EXDEV for a symlink leading out of root. */
static int open_beneath(int rootfd, const char *root, const char *rel)
{
#ifndef MP_STATIC_NO_OPENAT2
    if (!__atomic_load_n(&no_openat2, __ATOMIC_RELAXED)) {
        struct open_how how = {.flags = OPEN_FLAGS, .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS};
        long fd = syscall(SYS_openat2, rootfd, rel, &how, sizeof(how));
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM && errno != EINVAL && errno != EXDEV))
            return (int)fd;
        if (errno == EXDEV) /* any absolute symlink: it may still lead inside root, which realpath tells */
            return open_checked(root, rel);
        if (errno == ENOSYS)
            __atomic_store_n(&no_openat2, 1, __ATOMIC_RELAXED);
        /* EPERM, EINVAL: a seccomp filter, or an old kernel: try the other way */
    }
#endif
    (void)rootfd;
    return open_checked(root, rel);
}

static int errno_status(int err, const char *root, const char *rel)
{
    switch (err) {
    case ENOENT:
    case ENOTDIR:
    case ENAMETOOLONG:
    case ELOOP:
    case ENXIO:
    case ENODEV: return 404;
    case EACCES:
    case EPERM:
    case EXDEV: return 403;
    default: mp_log_error("static: cannot open '%s' under '%s': %s", rel, root, strerror(err)); return 500;
    }
}

/* Opens rel (cleaned, in a buffer of cap bytes) into out: a regular file, or
 * a directory's index. redirect: answer 301 for a directory instead.
 * Returns 200, 301, 403, 404 or 500. */
static int open_file(int rootfd, const mp_static_def_t *def, char *rel, size_t cap, int redirect, mp_static_file_t *out)
{
    int fd = open_beneath(rootfd, def->root, rel[0] ? rel : ".");
    if (fd < 0)
        return errno_status(errno, def->root, rel);
    struct stat st;
    if (fstat(fd, &st) != 0)
        goto fail;
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        if (redirect)
            return 301;
        size_t n = strlen(rel);
        if ((size_t)snprintf(rel + n, cap - n, "%s%s", n ? "/" : "", def->index) >= cap - n)
            return 404;
        if ((fd = open_beneath(rootfd, def->root, rel)) < 0)
            return errno_status(errno, def->root, rel);
        if (fstat(fd, &st) != 0)
            goto fail;
    }
    if (!S_ISREG(st.st_mode)) { /* a FIFO, a device, a socket, a directory as index */
        close(fd);
        return 404;
    }
    out->fd = fd;
    out->size = (uint64_t)st.st_size;
    out->mtime = (int64_t)st.st_mtime;
    snprintf(out->file, sizeof(out->file), "/%s", rel);
    return 200;
fail:
    mp_log_error("static: fstat '%s' under '%s': %s", rel, def->root, strerror(errno));
    close(fd);
    return 500;
}

/* ---- conditional requests -------------------------------------------------- */

/* The values of request header `lower` as hooks left it; at most max. */
static unsigned header_values(const mp_req_t *r, const char *lower, mp_slice *out, unsigned max)
{
    mp_slice name = {lower, strlen(lower)};
    const mp_hedit_t *e = mp_hedit_find(r->edits, name);
    unsigned n = 0;
    if (e) {
        for (unsigned i = 0; i < e->nvalues && n < max; i++)
            out[n++] = e->values[i];
        return n;
    }
    for (unsigned i = 0; i < r->h.nheaders && n < max; i++)
        if (mp_slice_caseeq(r->h.headers[i].name, name))
            out[n++] = r->h.headers[i].value;
    return n;
}

/* Whether the If-None-Match list v names etag (weak comparison, RFC 9110
 * §13.1.2), or is "*". */
static int etag_listed(mp_slice v, const char *etag)
{
    size_t elen = strlen(etag), i = 0;
    while (i < v.len) {
        if (v.p[i] == ' ' || v.p[i] == '\t' || v.p[i] == ',') {
            i++;
            continue;
        }
        if (v.p[i] == '*')
            return 1;
        if (v.len - i >= 2 && v.p[i] == 'W' && v.p[i + 1] == '/')
            i += 2;
        if (i >= v.len || v.p[i] != '"')
            return 0;
        size_t start = i++;
        while (i < v.len && v.p[i] != '"')
            i++;
        if (i++ >= v.len)
            return 0;
        if (i - start == elen && memcmp(v.p + start, etag, elen) == 0)
            return 1;
    }
    return 0;
}

/* An HTTP-date in any of its three forms (RFC 9110 §5.6.7), or -1. */
static int64_t parse_http_date(mp_slice v)
{
    char s[64], mon[4] = "";
    int d, y, hh, mm, ss;
    if (v.len >= sizeof(s))
        return -1;
    memcpy(s, v.p, v.len);
    s[v.len] = '\0';
    if (sscanf(s, "%*[A-Za-z], %2d %3s %4d %2d:%2d:%2d GMT", &d, mon, &y, &hh, &mm, &ss) == 6) {
    } else if (sscanf(s, "%*[A-Za-z], %2d-%3[A-Za-z]-%2d %2d:%2d:%2d GMT", &d, mon, &y, &hh, &mm, &ss) == 6) {
        y += y < 70 ? 2000 : 1900;
    } else if (sscanf(s, "%*[A-Za-z] %3s %2d %2d:%2d:%2d %4d", mon, &d, &hh, &mm, &ss, &y) != 6) {
        return -1;
    }
    const char *m = strlen(mon) == 3 ? strstr(MONTHS, mon) : NULL;
    if (!m || (m - MONTHS) % 3 || d < 1 || d > 31 || hh > 23 || mm > 59 || ss > 60 || y < 1970 || hh < 0 || mm < 0 ||
        ss < 0)
        return -1;
    struct tm tm = {
        .tm_year = y - 1900, .tm_mon = (int)(m - MONTHS) / 3, .tm_mday = d, .tm_hour = hh, .tm_min = mm, .tm_sec = ss};
    return (int64_t)timegm(&tm);
}

/* ---- ranges ---------------------------------------------------------------- */

/* Digits at v[*i..) as a number; -1 when none or past 2^62. */
static int64_t range_number(mp_slice v, size_t *i)
{
    int64_t n = 0;
    size_t start = *i;
    while (*i < v.len && v.p[*i] >= '0' && v.p[*i] <= '9') {
        if (n > ((int64_t)1 << 62) / 10)
            return -1;
        n = n * 10 + (v.p[(*i)++] - '0');
    }
    return *i > start ? n : -1;
}

/* Whether If-Range (absent: yes) lets the range apply: its entity tag is
 * the file's (strong comparison), or its date is the file's mtime. */
static int if_range_holds(const mp_req_t *r, const mp_static_file_t *f)
{
    mp_slice v[1];
    if (header_values(r, "if-range", v, 1) == 0)
        return 1;
    if (v[0].len && (v[0].p[0] == '"' || (v[0].len > 1 && v[0].p[0] == 'W' && v[0].p[1] == '/')))
        return v[0].len == strlen(f->etag) && memcmp(v[0].p, f->etag, v[0].len) == 0;
    int64_t t = parse_http_date(v[0]);
    return t >= 0 && t == f->mtime;
}

/* The status of a 200 once Range is read (RFC 9110 §14): 206 with f->off
 * and f->len set to one satisfiable range, 416 when it starts past the
 * end, or 200 when there is none to honour. */
static int byte_range(const mp_req_t *r, mp_static_file_t *f)
{
    mp_slice v[2];
    if (header_values(r, "range", v, 2) != 1 || !if_range_holds(r, f))
        return 200;
    mp_slice s = v[0];
    size_t i = 0;
    while (i < s.len && (s.p[i] == ' ' || s.p[i] == '\t'))
        i++;
    if (s.len - i < 6 || strncasecmp(s.p + i, "bytes=", 6) != 0)
        return 200;
    i += 6;
    while (i < s.len && (s.p[i] == ' ' || s.p[i] == '\t'))
        i++;
    int64_t first = -1, last = -1;
    if (i < s.len && s.p[i] == '-') { /* the last n bytes */
        i++;
        int64_t n = range_number(s, &i);
        if (n < 0)
            return 200;
        if (n == 0)
            return 416;
        first = (uint64_t)n >= f->size ? 0 : (int64_t)f->size - n;
        last = (int64_t)f->size - 1;
    } else {
        if ((first = range_number(s, &i)) < 0 || i >= s.len || s.p[i++] != '-')
            return 200;
        if (i < s.len && s.p[i] >= '0' && s.p[i] <= '9') {
            if ((last = range_number(s, &i)) < first) /* or past 2^62 */
                return 200;
        } else {
            last = INT64_MAX; /* open-ended: to the end */
        }
    }
    while (i < s.len && (s.p[i] == ' ' || s.p[i] == '\t'))
        i++;
    if (i != s.len) /* a list of ranges, or junk after one */
        return 200;
    if ((uint64_t)first >= f->size)
        return 416;
    if ((uint64_t)last >= f->size)
        last = (int64_t)f->size - 1;
    f->off = (uint64_t)first;
    f->len = (uint64_t)(last - first + 1);
    return 206;
}

/* RFC 9110 §13.2.2: If-None-Match decides when present, else
 * If-Modified-Since. */
static int not_modified(const mp_req_t *r, const mp_static_file_t *f)
{
    mp_slice v[8];
    unsigned n = header_values(r, "if-none-match", v, 8);
    if (n) {
        for (unsigned i = 0; i < n; i++)
            if (etag_listed(v[i], f->etag))
                return 1;
        return 0;
    }
    if (header_values(r, "if-modified-since", v, 1) == 1) {
        int64_t since = parse_http_date(v[0]);
        return since >= 0 && f->mtime <= since;
    }
    return 0;
}

/* ---- resolve --------------------------------------------------------------- */

/* r->path without the route's prefix (already gone with strip_prefix; a
 * path a hook moved out of the prefix is looked up whole). */
static mp_slice lookup_path(const mp_req_t *r)
{
    mp_slice p = r->path;
    const mp_route_t *rt = r->match.route;
    if (rt->prefix && !rt->strip_prefix) {
        size_t strip = rt->prefix_len - (rt->prefix[rt->prefix_len - 1] == '/');
        if (p.len >= strip && memcmp(p.p, rt->prefix, strip) == 0 && (p.len == strip || p.p[strip] == '/')) {
            p.p += strip;
            p.len -= strip;
        }
    }
    return p;
}

/* ---- precompressed siblings ------------------------------------------------ */

static const struct {
    const char *coding, *ext;
} ENCODINGS[MP_STATIC_ENCODINGS] = {{"br", ".br"}, {"zstd", ".zst"}, {"gzip", ".gz"}};

/* The q-value of a coding's element ("gzip;q=0.5"): 1000 for 1, 0 for 0. */
static int qvalue(mp_slice params)
{
    size_t i = 0;
    while (i < params.len) {
        while (i < params.len && (params.p[i] == ';' || params.p[i] == ' ' || params.p[i] == '\t'))
            i++;
        if (params.len - i >= 2 && (params.p[i] | 0x20) == 'q' && params.p[i + 1] == '=') {
            i += 2;
            int q = 0, scale = 1000, digits = 0;
            if (i < params.len && params.p[i] == '1')
                return 1000;
            if (i < params.len && params.p[i] == '0')
                i++;
            if (i < params.len && params.p[i] == '.')
                for (i++; i < params.len && params.p[i] >= '0' && params.p[i] <= '9' && digits < 3; i++, digits++)
                    q += (params.p[i] - '0') * (scale /= 10);
            return q;
        }
        while (i < params.len && params.p[i] != ';')
            i++;
    }
    return 1000;
}

/* The q-value (0..1000) the client's Accept-Encoding gives each of
 * ENCODINGS ("*" for those it does not name; none: 0). */
static void accepted(const mp_req_t *r, int q[MP_STATIC_ENCODINGS])
{
    mp_slice v[8];
    unsigned n = header_values(r, "accept-encoding", v, 8);
    int star = 0, named[MP_STATIC_ENCODINGS] = {0};
    for (int k = 0; k < MP_STATIC_ENCODINGS; k++)
        q[k] = 0;
    for (unsigned i = 0; i < n; i++) {
        mp_slice el;
        size_t pos = 0;
        while (mp_http1_next_token(v[i], &pos, &el)) {
            size_t c = 0;
            while (c < el.len && el.p[c] != ';' && el.p[c] != ' ' && el.p[c] != '\t')
                c++;
            mp_slice name = {el.p, c}, params = {el.p + c, el.len - c};
            int qv = qvalue(params);
            if (MP_SLICE_IEQ(name, "*"))
                star = qv;
            for (int k = 0; k < MP_STATIC_ENCODINGS; k++)
                if (mp_slice_caseeq(name, (mp_slice){ENCODINGS[k].coding, strlen(ENCODINGS[k].coding)}) ||
                    (k == 2 && MP_SLICE_IEQ(name, "x-gzip"))) {
                    q[k] = qv;
                    named[k] = 1;
                }
        }
    }
    for (int k = 0; k < MP_STATIC_ENCODINGS; k++)
        if (!named[k])
            q[k] = star;
}

/* The file found (rel, under rootfd) has siblings with its codings added:
 * the one the client accepts most (ties: ENCODINGS' order) answers instead. */
static void precompressed(const mp_req_t *r, int rootfd, const mp_static_def_t *def, const char *rel,
                          mp_static_file_t *out)
{
    int q[MP_STATIC_ENCODINGS];
    accepted(r, q);
    for (;;) {
        int best = -1;
        for (int k = 0; k < MP_STATIC_ENCODINGS; k++)
            if (q[k] > 0 && (best < 0 || q[k] > q[best]))
                best = k;
        if (best < 0)
            return;
        q[best] = 0;
        char sib[PATH_MAX];
        if ((size_t)snprintf(sib, sizeof(sib), "%s%s", rel, ENCODINGS[best].ext) >= sizeof(sib))
            continue;
        int fd = open_beneath(rootfd, def->root, sib);
        struct stat st;
        if (fd < 0)
            continue;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            close(fd);
            continue;
        }
        close(out->fd);
        out->fd = fd;
        out->size = (uint64_t)st.st_size;
        out->mtime = (int64_t)st.st_mtime;
        out->encoding = ENCODINGS[best].coding;
        return;
    }
}

static int resolve(const mp_req_t *r, const mp_static_def_t *def, mp_static_file_t *out)
{
    mp_slice m = r->h.method;
    if (!(m.len == 3 && memcmp(m.p, "GET", 3) == 0) && !r->is_head)
        return 405;
    char rel[PATH_MAX];
    size_t cap = sizeof(rel) - strlen(def->index) - 2; /* room for "/index.html" */
    mp_slice p = lookup_path(r);
    int rc = clean_path(p, rel, cap);
    if (rc)
        return rc;
    int rootfd = open(def->root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) {
        mp_log_error("static: root '%s': %s", def->root, strerror(errno));
        return 500;
    }
    /* a directory asked for without '/': redirect, unless the client did send
     * one (a hook took it away): no redirect loop. Root itself ("/", what
     * strip_prefix leaves of "/site") counts as asked for without one. */
    const mp_slice hp = r->client_path;
    int redirect = (p.len <= 1 || p.p[p.len - 1] != '/') && (hp.len == 0 || hp.p[hp.len - 1] != '/');
    int status = open_file(rootfd, def, rel, sizeof(rel), redirect, out);
    if (status == 404 && def->fallback) {
        clean_path((mp_slice){def->fallback, strlen(def->fallback)}, rel, cap);
        status = open_file(rootfd, def, rel, sizeof(rel), 0, out);
        out->fallback = status == 200;
        if (status != 200) {
            mp_log_error("static: fallback '%s' under '%s' cannot be served (%d)", def->fallback, def->root, status);
            status = 404;
        }
    }
    if (status == 200 && def->precompressed) {
        out->vary = 1;
        precompressed(r, rootfd, def, rel, out);
    }
    close(rootfd);
    return status;
}

int mp_static_resolve(const mp_req_t *r, mp_static_file_t *out)
{
    memset(out, 0, offsetof(mp_static_file_t, file));
    out->file[0] = '\0';
    out->fallback = 0;
    out->vary = 0;
    out->encoding = NULL;
    out->off = out->len = 0;
    out->fd = -1;
    const mp_config_t *cfg = r->gen->cfg;
    const mp_static_def_t *def = r->match.route ? &cfg->statics[mp_route_slot(r->match.route)] : NULL;
    if (!def || !def->root)
        return out->status = 500;
    out->status = resolve(r, def, out);
    if (out->status != 200)
        return out->status;
    out->content_type = content_type(out->file);
    snprintf(out->etag, sizeof(out->etag), "\"%llx-%llx%s%s\"", (unsigned long long)out->mtime,
             (unsigned long long)out->size, out->encoding ? "-" : "", out->encoding ? out->encoding : "");
    out->len = out->size;
    if (not_modified(r, out))
        out->status = 304;
    else if (!r->is_head)
        out->status = byte_range(r, out);
    if (out->status == 304 || r->is_head) {
        close(out->fd);
        out->fd = -1;
    }
    return out->status;
}

void mp_static_dispose(mp_static_file_t *f)
{
    if (f->fd >= 0)
        close(f->fd);
    f->fd = -1;
}

/* ---- the response head ----------------------------------------------------- */

/* A response header as if a hook had set it: hooks see it and may change
 * it. name is static storage. */
static int add_header(mp_req_t *r, const char *name, const char *value, size_t len)
{
    mp_hedit_t *e = mp_req_arena(r, sizeof(*e) + sizeof(mp_slice) + len);
    if (!e)
        return MP_ENOMEM;
    char *p = (char *)(e->values + 1);
    memcpy(p, value, len);
    e->name = (mp_slice){name, strlen(name)};
    e->values[0] = (mp_slice){p, len};
    e->nvalues = 1;
    e->next = r->resp_edits;
    r->resp_edits = e;
    return 0;
}

static size_t http_date(int64_t t, char *out, size_t n)
{
    static const char days[] = "SunMonTueWedThuFriSat";
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    return (size_t)snprintf(out, n, "%.3s, %02d %.3s %04d %02d:%02d:%02d GMT", days + 3 * tm.tm_wday, tm.tm_mday,
                            MONTHS + 3 * tm.tm_mon, tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* The received path (normalised) with '/' added (one leading '/':
 * "//evil.example/" would be another site), and the query. */
static int add_location(mp_req_t *r)
{
    mp_slice p = r->client_path;
    while (p.len > 1 && p.p[0] == '/' && p.p[1] == '/')
        p.p++, p.len--;
    size_t len = p.len + 1 + (r->h.has_query ? 1 + r->h.query.len : 0);
    char *v = mp_req_arena(r, len);
    if (!v)
        return MP_ENOMEM;
    memcpy(v, p.p, p.len);
    v[p.len] = '/';
    if (r->h.has_query) {
        v[p.len + 1] = '?';
        memcpy(v + p.len + 2, r->h.query.p, r->h.query.len);
    }
    return add_header(r, "Location", v, len);
}

/* The headers of f's response, added last first (the head lists the
 * newest edit first). */
static int add_headers(mp_req_t *r, const mp_static_file_t *f)
{
    char date[40], range[80];
    int rc;
    if (f->status == 301 || f->status == 405) {
        rc = f->status == 301 ? add_location(r) : add_header(r, "Allow", "GET, HEAD", 9);
        return rc ? rc : add_header(r, "Content-Type", "text/plain", 10);
    }
    if (f->status == 416) { /* RFC 9110 §15.5.17: the length there is */
        size_t n = (size_t)snprintf(range, sizeof(range), "bytes */%llu", (unsigned long long)f->size);
        if ((rc = add_header(r, "Content-Range", range, n)))
            return rc;
        return add_header(r, "Content-Type", "text/plain", 10);
    }
    size_t n = http_date(f->mtime, date, sizeof(date));
    if ((rc = add_header(r, "ETag", f->etag, strlen(f->etag))) || (rc = add_header(r, "Last-Modified", date, n)))
        return rc;
    if (f->vary && (rc = add_header(r, "Vary", "Accept-Encoding", 15)))
        return rc;
    if (f->status == 304)
        return 0;
    if (f->encoding && (rc = add_header(r, "Content-Encoding", f->encoding, strlen(f->encoding))))
        return rc;
    if (f->status == 206) {
        n = (size_t)snprintf(range, sizeof(range), "bytes %llu-%llu/%llu", (unsigned long long)f->off,
                             (unsigned long long)(f->off + f->len - 1), (unsigned long long)f->size);
        if ((rc = add_header(r, "Content-Range", range, n)))
            return rc;
    }
    if ((rc = add_header(r, "Accept-Ranges", "bytes", 5)))
        return rc;
    return add_header(r, "Content-Type", f->content_type, strlen(f->content_type));
}

int mp_static_response(mp_req_t *r, mp_static_file_t *f, mp_buf_t *b, mp_local_t *out)
{
    int status = f->status;
    if (status != 200 && status != 206 && status != 304 && status != 301 && status != 405 && status != 416) {
        mp_static_dispose(f);
        return mp_local_response(r, status, b, out);
    }
    if (status == 416)
        mp_static_dispose(f);
    int n = status == 200 || status == 206 || status == 304
                ? 0
                : snprintf(out->text, sizeof(out->text), "%d %s\n", status, mp_http1_reason(status));
    out->body = (mp_slice){out->text, (size_t)n};
    r->resp_edits = NULL;
    int shown = add_headers(r, f) == 0 ? mp_req_response_hooks(r, status, NULL) : (r->resp_edits = NULL, 0);
    if (shown == MP_RESP_WAIT)
        return MP_STATIC_WAIT;
    return mp_static_finish(r, f, shown, b, out);
}

int mp_static_finish(mp_req_t *r, mp_static_file_t *f, int shown, mp_buf_t *b, mp_local_t *out)
{
    int status = f->status;
    size_t n = out->body.len;
    if (!shown) {
        mp_static_dispose(f);
        return mp_local_response(r, 500, b, out);
    }
    r->status = shown;
    int bodiless = shown < 200 || shown == 204 || shown == 304; /* RFC 9112 §6.3 */
    if (bodiless || r->is_head) {
        mp_static_dispose(f);
        out->body.len = 0;
    }
    int64_t length = bodiless ? -1 : (int64_t)(status == 200 || status == 206 ? f->len : n); /* HEAD too: §9.3.2 */
    if (mp_head_static(r, shown, length, b) != 0) {
        mp_static_dispose(f);
        return -1;
    }
    return shown;
}
