/* strbuf.h: a growable, NUL-terminated byte string on malloc, for answers
 * built off the request path (admin JSON, the metrics scrape). Failure is
 * sticky: after an allocation fails every append is a no-op and oom stays
 * set, so a builder checks once, at the end. */
#ifndef MP_STRBUF_H
#define MP_STRBUF_H

#include "common.h"

/* A zeroed struct is a valid empty string (p NULL until the first append). */
typedef struct {
    char *p;    /* owned; p[len] == '\0' once anything was appended */
    size_t len; /* bytes, the NUL not counted */
    size_t cap;
    int oom; /* an allocation failed: the contents are incomplete */
} mp_strbuf_t;

/* Makes room for n more bytes and the NUL, for a caller that writes at
 * p + len itself. Returns 0, or MP_ENOMEM (and sets oom). */
int mp_strbuf_reserve(mp_strbuf_t *b, size_t n);

/* Appends n bytes. */
void mp_strbuf_append(mp_strbuf_t *b, const void *p, size_t n);

/* Appends printf-style. */
void mp_strbuf_printf(mp_strbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Empties b, keeping its memory; clears oom. */
void mp_strbuf_reset(mp_strbuf_t *b);

/* Frees b's memory; b is empty again. Idempotent. */
void mp_strbuf_free(mp_strbuf_t *b);

/* Hands b's string to the caller (free it) with *len set, and empties b.
 * NULL when an allocation failed (b's memory is freed then) or nothing was
 * ever appended. */
char *mp_strbuf_steal(mp_strbuf_t *b, size_t *len);

#endif
