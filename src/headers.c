/* headers.c: hook edits of header fields, and what a field name or value may
 * be (tokens, no controls, the proxy's own framing and hop-by-hop fields). */
#include "headers.h"

const mp_hedit_t *mp_hedit_find(const mp_hedit_t *list, mp_slice name)
{
    for (; list; list = list->next)
        if (mp_slice_caseeq(list->name, name))
            return list;
    return NULL;
}

int mp_hedit_put(mp_buf_t *b, const mp_hedit_t *list, const char *skip)
{
    int rc = 0;
    for (const mp_hedit_t *e = list; e; e = e->next) {
        if (mp_hedit_find(list, e->name) != e)
            continue; /* a newer edit of the same name wins */
        if (skip && mp_slice_caseeq(e->name, (mp_slice){skip, strlen(skip)}))
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

int mp_header_name_ok(mp_slice s)
{
    if (!s.len)
        return 0;
    for (size_t i = 0; i < s.len; i++)
        if (!mp_http_is_tchar((unsigned char)s.p[i]))
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
    return mp_header_is_hop_by_hop(n) || MP_SLICE_IEQ(n, "content-length");
}
