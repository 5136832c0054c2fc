/* headers.h: header changes made by hooks. The parsed head stays as it was
 * received (slices of the read buffer); each change is an edit owned by the
 * request's arena that masks every received field of its name. */
#ifndef MP_HEADERS_H
#define MP_HEADERS_H

#include "buf.h"
#include "common.h"
#include "http1.h"

typedef struct mp_hedit {
    struct mp_hedit *next; /* older edits */
    mp_slice name;         /* as the hook wrote it; compared case-insensitively */
    unsigned nvalues;      /* 0: the field is removed */
    mp_slice values[];
} mp_hedit_t;

/* The newest edit of name, or NULL. */
const mp_hedit_t *mp_hedit_find(const mp_hedit_t *list, mp_slice name);

/* Appends "Name: value\r\n" for the newest edit of every edited name but
 * skip (NULL: none). Returns 0 or MP_ENOMEM. */
int mp_hedit_put(mp_buf_t *b, const mp_hedit_t *list, const char *skip);

/* Case-insensitive equality of two field names. */
int mp_header_name_eq(mp_slice a, mp_slice b);

/* Whether a field belongs to the proxy: message framing and the connection
 * (Content-Length, Transfer-Encoding, Connection, Keep-Alive, TE, Trailer,
 * Upgrade, Proxy-Connection). Hooks may not set these. */
int mp_header_is_framing(mp_slice name);

/* Whether s is a valid field name (token) / field value (no CR, LF, NUL or
 * other controls but HTAB): hooks cannot split a head. */
int mp_header_name_ok(mp_slice s);
int mp_header_value_ok(mp_slice s);

#endif
