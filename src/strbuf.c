/* strbuf.c: the growable string of strbuf.h (admin answers, the metrics scrape). */
#include "strbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define FIRST_CAP 1024

int mp_strbuf_reserve(mp_strbuf_t *b, size_t n)
{
    if (b->oom)
        return MP_ENOMEM;
    if (b->len + n + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : FIRST_CAP;
    while (cap < b->len + n + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return MP_ENOMEM;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void mp_strbuf_append(mp_strbuf_t *b, const void *p, size_t n)
{
    if (mp_strbuf_reserve(b, n) != 0)
        return;
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void mp_strbuf_printf(mp_strbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || mp_strbuf_reserve(b, (size_t)n) != 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void mp_strbuf_reset(mp_strbuf_t *b)
{
    b->len = 0;
    b->oom = 0;
    if (b->p)
        b->p[0] = '\0';
}

void mp_strbuf_free(mp_strbuf_t *b)
{
    free(b->p);
    *b = (mp_strbuf_t){0};
}

char *mp_strbuf_steal(mp_strbuf_t *b, size_t *len)
{
    char *p = b->oom ? NULL : b->p;
    *len = b->oom ? 0 : b->len;
    if (b->oom)
        free(b->p);
    *b = (mp_strbuf_t){0};
    return p;
}
