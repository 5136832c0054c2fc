/* headers.c: hook edits of header fields. */
#include "headers.h"

static inline int name_eq(mp_slice a, mp_slice b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++)
        if (a.p[i] != b.p[i] && mp_lower(a.p[i]) != mp_lower(b.p[i]))
            return 0;
    return 1;
}

int mp_header_name_eq(mp_slice a, mp_slice b)
{
    return name_eq(a, b);
}

const mp_hedit_t *mp_hedit_find(const mp_hedit_t *list, mp_slice name)
{
    for (; list; list = list->next)
        if (name_eq(list->name, name))
            return list;
    return NULL;
}

int mp_hedit_put(mp_buf_t *b, const mp_hedit_t *list, const char *skip)
{
    int rc = 0;
    for (const mp_hedit_t *e = list; e; e = e->next) {
        if (mp_hedit_find(list, e->name) != e)
            continue; /* a newer edit of the same name wins */
        if (skip && name_eq(e->name, (mp_slice){skip, strlen(skip)}))
            continue;
        for (unsigned i = 0; i < e->nvalues; i++) {
            size_t n = e->name.len, v = e->values[i].len;
            if (n + v + 4 > mp_buf_room(b)) {
                rc = 1;
                break;
            }
            char *p = mp_buf_tail(b);
            memcpy(p, e->name.p, n);
            memcpy(p + n, ": ", 2);
            memcpy(p + n + 2, e->values[i].p, v);
            memcpy(p + n + 2 + v, "\r\n", 2);
            b->end += (uint32_t)(n + v + 4);
        }
    }
    return rc ? MP_ENOMEM : 0;
}

static int is_tchar(unsigned char c)
{
    /* RFC 9110 §5.6.2: ALPHA, DIGIT and !#$%&'*+-.^_`|~, as a bitmap */
    static const uint32_t tchar[8] = {0, 0x03ff6cfa, 0xc7fffffe, 0x57ffffff, 0, 0, 0, 0};
    return (tchar[c >> 5] >> (c & 31)) & 1;
}

int mp_header_name_ok(mp_slice s)
{
    if (!s.len)
        return 0;
    for (size_t i = 0; i < s.len; i++)
        if (!is_tchar((unsigned char)s.p[i]))
            return 0;
    return 1;
}

int mp_header_value_ok(mp_slice s)
{
    for (size_t i = 0; i < s.len; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return 0;
    }
    return 1;
}

int mp_header_is_framing(mp_slice n)
{
    switch (n.len) {
    case 2: return MP_SLICE_IEQ(n, "te");
    case 7: return MP_SLICE_IEQ(n, "trailer") || MP_SLICE_IEQ(n, "upgrade");
    case 10: return MP_SLICE_IEQ(n, "connection") || MP_SLICE_IEQ(n, "keep-alive");
    case 14: return MP_SLICE_IEQ(n, "content-length");
    case 16: return MP_SLICE_IEQ(n, "proxy-connection");
    case 17: return MP_SLICE_IEQ(n, "transfer-encoding");
    default: return 0;
    }
}
