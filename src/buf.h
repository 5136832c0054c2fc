/* buf.h: byte buffers for socket I/O, taken from and returned to a
 * per-worker free list of equal-sized blocks, so steady-state traffic does
 * not call malloc and an idle connection holds no block. */
#ifndef MP_BUF_H
#define MP_BUF_H

#include "common.h"

#include <stdint.h>

typedef struct {
    char *data;     /* NULL: holds no block */
    uint32_t start; /* first unconsumed byte */
    uint32_t end;   /* one past the last valid byte */
    uint32_t cap;   /* block size */
} mp_buf_t;

typedef struct {
    void *free; /* singly linked list of free blocks */
    size_t block_size;
    unsigned nfree;
    unsigned max_free; /* blocks kept beyond this are given back to malloc */
    uint64_t allocs;   /* blocks taken from malloc, ever (to check steady state) */
} mp_bufpool_t;

void mp_bufpool_init(mp_bufpool_t *bp, size_t block_size, unsigned max_free);
void mp_bufpool_dispose(mp_bufpool_t *bp);

/* Gives b a block if it has none. Returns 0 or MP_ENOMEM. */
int mp_buf_acquire(mp_buf_t *b, mp_bufpool_t *bp);

/* Returns b's block to the pool; b becomes empty. Idempotent. */
void mp_buf_release(mp_buf_t *b, mp_bufpool_t *bp);

/* Moves the unconsumed bytes to the front of the block. */
void mp_buf_compact(mp_buf_t *b);


static inline size_t mp_buf_len(const mp_buf_t *b)
{
    return b->end - b->start;
}

static inline size_t mp_buf_room(const mp_buf_t *b)
{
    return b->cap - b->end;
}

static inline char *mp_buf_head(const mp_buf_t *b)
{
    return b->data + b->start;
}

static inline char *mp_buf_tail(const mp_buf_t *b)
{
    return b->data + b->end;
}

/* Appends n bytes; returns 0, or MP_ENOMEM when they do not fit. */
static inline int mp_buf_append(mp_buf_t *b, const void *p, size_t n)
{
    if (MP_UNLIKELY(n > mp_buf_room(b)))
        return MP_ENOMEM;
    memcpy(b->data + b->end, p, n);
    b->end += (uint32_t)n;
    return 0;
}

#define MP_BUF_LIT(b, lit) mp_buf_append((b), (lit), sizeof(lit) - 1)

#endif
