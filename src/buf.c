/* buf.c: per-worker block free list and buffer helpers. */
#include "buf.h"

#include <stdlib.h>

void mp_bufpool_init(mp_bufpool_t *bp, size_t block_size, unsigned max_free)
{
    memset(bp, 0, sizeof(*bp));
    bp->block_size = block_size;
    bp->max_free = max_free;
}

void mp_bufpool_dispose(mp_bufpool_t *bp)
{
    while (bp->free) {
        void *next = *(void **)bp->free;
        free(bp->free);
        bp->free = next;
    }
    bp->nfree = 0;
}

int mp_buf_acquire(mp_buf_t *b, mp_bufpool_t *bp)
{
    if (b->data)
        return 0;
    if (bp->free) {
        b->data = bp->free;
        bp->free = *(void **)bp->free;
        bp->nfree--;
    } else {
        b->data = malloc(bp->block_size);
        if (!b->data)
            return MP_ENOMEM;
        bp->allocs++;
    }
    b->start = b->end = 0;
    b->cap = (uint32_t)bp->block_size;
    return 0;
}

void mp_buf_release(mp_buf_t *b, mp_bufpool_t *bp)
{
    if (!b->data)
        return;
    if (bp->nfree < bp->max_free) {
        *(void **)b->data = bp->free;
        bp->free = b->data;
        bp->nfree++;
    } else {
        free(b->data);
    }
    memset(b, 0, sizeof(*b));
}

void mp_buf_compact(mp_buf_t *b)
{
    if (b->start == 0)
        return;
    size_t n = mp_buf_len(b);
    if (n)
        memmove(b->data, b->data + b->start, n);
    b->start = 0;
    b->end = (uint32_t)n;
}
