/* headers.h: header changes made by hooks, and which fields are the
 * proxy's (hop-by-hop, framing). The parsed head stays as it was received
 * (slices of the read buffer); each change is an edit owned by the
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

/* Whether a field is hop-by-hop (RFC 9110 §7.6.1: Connection, Keep-Alive,
 * Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade): never
 * forwarded. Inline: it runs on every field of every head. */
static inline int mp_header_is_hop_by_hop(mp_slice name);

/* Whether a field belongs to the proxy: message framing and the connection
 * (Content-Length and the hop-by-hop fields). Hooks may not set these. */
int mp_header_is_framing(mp_slice name);

/* Whether s is a valid field name (token) / field value (no CR, LF, NUL or
 * other controls but HTAB): hooks cannot split a head. */
int mp_header_name_ok(mp_slice s);
int mp_header_value_ok(mp_slice s);

static inline int mp_header_is_hop_by_hop(mp_slice n)
{
    switch (n.len) {
    case 2: return MP_SLICE_IEQ(n, "te");
    case 7: return MP_SLICE_IEQ(n, "trailer") || MP_SLICE_IEQ(n, "upgrade");
    case 10: return MP_SLICE_IEQ(n, "connection") || MP_SLICE_IEQ(n, "keep-alive");
    case 16: return MP_SLICE_IEQ(n, "proxy-connection");
    case 17: return MP_SLICE_IEQ(n, "transfer-encoding");
    default: return 0;
    }
}

#endif
