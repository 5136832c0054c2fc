/* shdict.h: shared dictionaries (SPEC "Shared state"): named key/value stores
 * of a fixed size shared by every worker thread of the process, with TTL,
 * LRU eviction, and the atomic token bucket behind rate limiting.
 *
 * Memory layout. A dict owns one arena of `size` bytes allocated at open and
 * never grown, cut into 64-byte chunks, plus an index beside it (the hash
 * bucket array, 4 bytes per 2 chunks). No malloc happens per operation.
 *
 *   chunk 0          chunk 1          chunk 2 ...
 *   +----------------+----------------+----------------+
 *   | entry header   | next | payload | next | payload |   (arena)
 *   | 40 B | 24 B    | 4 B  | 60 B    | 4 B  | 60 B    |
 *   +----------------+----------------+----------------+
 *
 * An entry is a chain of chunks linked by 32-bit chunk indexes: the head
 * chunk starts with the header (chain link, hash-bucket link, LRU links,
 * hash, key and value lengths, type, expiry) and the payload continues in
 * the following chunks. The payload is [fixed value][key][string value]:
 * numbers, booleans (8 bytes) and token buckets (16 bytes) sit first, always
 * inside the head chunk, so incr and take update them in place. Since every
 * chunk fits every entry there is no fragmentation and no size-class
 * calcification: eviction frees whole entries from the LRU tail until the
 * new one fits. Freed chunks go on a free list; chunks never used yet are
 * handed out from a high-water mark, so untouched arena pages cost no RSS.
 * The hash is SipHash-1-3 keyed per dict, since keys are often client data.
 *
 * Concurrency: one pthread mutex per dict, held only inside these
 * functions, never across a callback or I/O. Time is the caller's `now`
 * (monotonic seconds, see mp_shdict_now), so expiry is checked lazily on
 * access and tests can pin it; an expired entry is never returned. */
#ifndef MP_SHDICT_H
#define MP_SHDICT_H

#include "common.h"

#define MP_SHDICT_CHUNK 64      /* bytes per arena chunk */
#define MP_SHDICT_MIN_SIZE 1024 /* smallest arena accepted by open */
#define MP_SHDICT_KEY_MAX 65536 /* longest key, in bytes */
#define MP_SHDICT_EXISTS 1      /* add: a live entry already holds the key */

typedef struct mp_shdict mp_shdict_t;

typedef enum {
    MP_SHDICT_NIL = 0,
    MP_SHDICT_BOOLEAN,
    MP_SHDICT_NUMBER,
    MP_SHDICT_STRING,
    MP_SHDICT_BUCKET, /* a token bucket made by mp_shdict_take */
} mp_shdict_type;

/* A typed value. In: str is borrowed for the call. Out: str points into the
 * caller's buffer. */
typedef struct {
    mp_shdict_type type;
    double num;      /* NUMBER; BOOLEAN as 0 or 1; BUCKET: tokens at the last take */
    const char *str; /* STRING bytes (binary-safe) */
    size_t len;      /* STRING length */
} mp_shdict_value_t;

typedef struct {
    int allowed;          /* 1 when `cost` tokens were taken */
    double remaining;     /* tokens left in the bucket (may be fractional) */
    double retry_after_s; /* 0 when allowed, else when `cost` tokens will be there */
} mp_shdict_take_t;

typedef struct {
    size_t capacity;    /* the configured size: the arena, in bytes */
    size_t used;        /* bytes of the arena held by entries (chunks x 64), <= capacity */
    size_t index_bytes; /* the hash index beside the arena */
    uint64_t entries;   /* entries stored, counting expired ones not yet reclaimed */
    uint64_t evictions; /* live entries dropped to make room */
} mp_shdict_stats_t;

/* The dictionary called `name`, created with an arena of `size` bytes
 * (MP_SHDICT_MIN_SIZE .. 64 * (2^32 - 2)) on first use; later calls with the
 * same name return the same dict, and fail when `size` differs. Thread-safe.
 * The dict lives until mp_shdict_close_all. NULL on failure, with a message
 * in err ("shared dict 'x' already exists with size N"). */
mp_shdict_t *mp_shdict_open(const char *name, size_t size, char *err, size_t errlen);

/* Frees every dict; only for the end of tests and sanitizer runs, when no
 * thread and no Lua object uses them any more. */
void mp_shdict_close_all(void);

/* The name given to open; valid as long as the dict. */
const char *mp_shdict_name(const mp_shdict_t *d);

/* Monotonic seconds (CLOCK_MONOTONIC), the clock every `now` is read from. */
double mp_shdict_now(void);

/* Every operation takes a key of 1..MP_SHDICT_KEY_MAX bytes (else MP_EINVAL)
 * and marks the entry it reads or writes as the most recently used. */

/* Copies the live value of key into *out: 0, or MP_ENOENT when absent or
 * expired. A string is copied into buf (cap bytes; NULL when cap is 0); when
 * it is longer, returns MP_EAGAIN with out->len set to the length needed:
 * grow buf and call again (the value may have changed in between). */
int mp_shdict_get(mp_shdict_t *d, mp_slice key, double now, mp_shdict_value_t *out, char *buf, size_t cap);

/* Stores v (BOOLEAN, NUMBER or STRING, copied) under key, replacing any
 * entry, expiring ttl_s seconds after now (0: never). Evicts LRU entries to
 * make room. 0, MP_ENOMEM when the entry is larger than the whole arena (the
 * old entry is then kept), MP_EINVAL on a bad key or type. */
int mp_shdict_set(mp_shdict_t *d, mp_slice key, const mp_shdict_value_t *v, double ttl_s, double now);

/* Like mp_shdict_set, but only when no live entry holds key: else returns
 * MP_SHDICT_EXISTS and changes nothing. */
int mp_shdict_add(mp_shdict_t *d, mp_slice key, const mp_shdict_value_t *v, double ttl_s, double now);

/* Adds `by` to the number under key and stores the sum in *out. An absent
 * key is created as *init + by (expiring ttl_s after now; 0: never) when
 * init is not NULL, else MP_ENOENT; the TTL of an existing entry is kept.
 * MP_EINVAL when the entry is not a number, MP_ENOMEM as for set. */
int mp_shdict_incr(mp_shdict_t *d, mp_slice key, double by, const double *init, double ttl_s, double now, double *out);

/* Removes key: 0, or MP_ENOENT when there was no entry. */
int mp_shdict_delete(mp_shdict_t *d, mp_slice key);

/* Token bucket under key, atomically: refills at rate_per_s tokens per second
 * up to burst since the last take, then takes `cost` tokens if there are
 * that many. A new bucket starts full. Requires rate_per_s > 0, burst > 0,
 * 0 <= cost <= burst, all finite (else MP_EINVAL). The entry expires once
 * the bucket would be full again, which is the same as absent. 0 and *out
 * filled; MP_EINVAL when key holds another type; MP_ENOMEM as for set. */
int mp_shdict_take(mp_shdict_t *d, mp_slice key, double rate_per_s, double burst, double cost, double now,
                   mp_shdict_take_t *out);

/* A consistent snapshot of the counters. */
void mp_shdict_stats(mp_shdict_t *d, mp_shdict_stats_t *out);

/* Walks the whole structure (hash chains, LRU list, chunk chains, free list)
 * and checks that it is consistent: 0, or MP_EPROTO. O(size); for tests. */
int mp_shdict_check(mp_shdict_t *d);

#endif
