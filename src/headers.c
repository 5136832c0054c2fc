/* headers.c: hook edits of header fields. */
#include "headers.h"

int mp_header_name_eq(mp_slice a, mp_slice b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++)
        if (mp_lower(a.p[i]) != mp_lower(b.p[i]))
            return 0;
    return 1;
}

const mp_hedit_t *mp_hedit_find(const mp_hedit_t *list, mp_slice name)
{
    for (; list; list = list->next)
        if (mp_header_name_eq(list->name, name))
            return list;
    return NULL;
}

int mp_hedit_put(mp_buf_t *b, const mp_hedit_t *list, const char *skip)
{
    int rc = 0;
    for (const mp_hedit_t *e = list; e; e = e->next) {
        if (mp_hedit_find(list, e->name) != e)
            continue; /* a newer edit of the same name wins */
        if (skip && mp_header_name_eq(e->name, (mp_slice){skip, strlen(skip)}))
            continue;
        for (unsigned i = 0; i < e->nvalues; i++)
            rc |= mp_buf_append(b, e->name.p, e->name.len) | mp_buf_append(b, ": ", 2) |
                  mp_buf_append(b, e->values[i].p, e->values[i].len) | mp_buf_append(b, "\r\n", 2);
    }
    return rc ? MP_ENOMEM : 0;
}

static int is_tchar(unsigned char c)
{
    /* RFC 9110 §5.6.2 */
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
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
