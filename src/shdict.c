/* shdict.c: shared dictionaries: the process-wide registry, the chunk
 * arena, the hash index and LRU list, TTL and the token bucket. The layout
 * is described in shdict.h. */
#include "shdict.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define NIL UINT32_MAX /* no chunk */
#define CHUNK MP_SHDICT_CHUNK
#define MAX_CHUNKS (UINT32_MAX - 1)

/* The head chunk of an entry starts with this header. */
typedef struct {
    uint32_t next;         /* next chunk of this entry, NIL at its last; every chunk starts with it */
    uint32_t hnext;        /* next entry (head chunk) in the same hash bucket */
    uint32_t lprev, lnext; /* LRU neighbours; d->lru_head is the most recent */
    uint32_t hash;
    uint32_t klen;
    uint32_t vlen; /* STRING bytes; fixed types: 0 */
    uint8_t type;  /* mp_shdict_type */
    uint8_t pad[3];
    double expires; /* monotonic seconds; INFINITY = never */
} entry_t;

#define HEAD_PAYLOAD (CHUNK - sizeof(entry_t))
#define NEXT_PAYLOAD (CHUNK - sizeof(uint32_t))

_Static_assert(sizeof(entry_t) == 40, "entry header layout");
_Static_assert(HEAD_PAYLOAD >= 16, "fixed values live in the head chunk");

struct mp_shdict {
    struct mp_shdict *next; /* registry list, guarded by reg_lock */
    /* fixed at open */
    size_t size;       /* configured bytes */
    uint64_t k0, k1;   /* SipHash key */
    char *arena;       /* nchunks * CHUNK <= size bytes, owned */
    uint32_t *buckets; /* mask + 1 entry heads: the index, owned */
    uint32_t mask;
    uint32_t nchunks;
    /* the lock guards the arena and index contents and every field below */
    pthread_mutex_t lock;
    uint32_t high;      /* chunks [high, nchunks) were never used */
    uint32_t free_head; /* recycled chunks, linked through their first word */
    uint32_t nfree;
    uint32_t used; /* chunks held by entries */
    uint32_t lru_head, lru_tail;
    uint64_t entries, evictions;
    char name[]; /* fixed at open */
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static mp_shdict_t *reg_head; /* guarded by reg_lock */

/* ---- hashing ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                                       \
    do {                                                                                                               \
        v0 += v1, v1 = ROTL(v1, 13), v1 ^= v0, v0 = ROTL(v0, 32);                                                      \
        v2 += v3, v3 = ROTL(v3, 16), v3 ^= v2;                                                                         \
        v0 += v3, v3 = ROTL(v3, 21), v3 ^= v0;                                                                         \
        v2 += v1, v1 = ROTL(v1, 17), v1 ^= v2, v2 = ROTL(v2, 32);                                                      \
    } while (0)

/* SipHash-1-3 (as in CPython and Rust's HashMap): keys come from clients, so
 * a keyed hash keeps an attacker from filling one bucket chain. Words are
 * read in host order: the hash never leaves the process. */
static uint32_t siphash13(uint64_t k0, uint64_t k1, const unsigned char *p, size_t n)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t m, b = (uint64_t)n << 56;
    const unsigned char *end = p + (n & ~(size_t)7);
    for (; p != end; p += 8) {
        memcpy(&m, p, 8);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t i = 0; i < (n & 7); i++)
        b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    uint64_t h = v0 ^ v1 ^ v2 ^ v3;
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t hash_key(const mp_shdict_t *d, mp_slice key)
{
    return siphash13(d->k0, d->k1, (const unsigned char *)key.p, key.len);
}

/* ---- chunks ---- */

static inline char *chunk(const mp_shdict_t *d, uint32_t i)
{
    return d->arena + (size_t)i * CHUNK;
}

static inline entry_t *entry(const mp_shdict_t *d, uint32_t i)
{
    return (entry_t *)chunk(d, i);
}

/* The first word of any chunk: the next chunk of its chain or free list. */
static inline uint32_t *link_of(const mp_shdict_t *d, uint32_t i)
{
    return (uint32_t *)chunk(d, i);
}

/* The fixed value (number, boolean, bucket) right after the header. */
static inline double *fixed(const mp_shdict_t *d, uint32_t i)
{
    return (double *)(chunk(d, i) + sizeof(entry_t));
}

static size_t fixed_len(int type)
{
    return type == MP_SHDICT_STRING ? 0 : type == MP_SHDICT_BUCKET ? 16 : 8;
}

/* Chunks for an entry, or 0 when it could never fit an arena. */
static uint32_t chunks_for(int type, size_t klen, size_t vlen)
{
    if (klen > MP_SHDICT_KEY_MAX || vlen > UINT32_MAX)
        return 0;
    size_t bytes = sizeof(entry_t) + fixed_len(type) + klen + vlen;
    if (bytes <= CHUNK)
        return 1;
    size_t n = 1 + (bytes - CHUNK + NEXT_PAYLOAD - 1) / NEXT_PAYLOAD;
    return n > MAX_CHUNKS ? 0 : (uint32_t)n;
}

/* A position in an entry's payload, which runs on across its chunks. */
typedef struct {
    const mp_shdict_t *d;
    uint32_t c;  /* current chunk */
    char *p;     /* next byte in it */
    size_t left; /* payload bytes left in it */
} cursor_t;

static void cursor_step(cursor_t *c)
{
    c->c = *link_of(c->d, c->c);
    MP_BUG_ON(c->c == NIL);
    c->p = chunk(c->d, c->c) + sizeof(uint32_t);
    c->left = NEXT_PAYLOAD;
}

/* The cursor at byte off of the payload of entry head. Moves into the next
 * chunk only when bytes are needed there, so the end of a chain is valid. */
static cursor_t cursor_at(const mp_shdict_t *d, uint32_t head, size_t off)
{
    cursor_t c = {d, head, chunk(d, head) + sizeof(entry_t), HEAD_PAYLOAD};
    while (off > c.left) {
        off -= c.left;
        cursor_step(&c);
    }
    c.p += off;
    c.left -= off;
    return c;
}

enum { IO_READ, IO_WRITE, IO_CMP };

/* Reads, writes or compares n bytes at the cursor and moves past them. For
 * IO_CMP, nonzero at the first difference. */
static int cursor_io(cursor_t *c, int op, const char *src, char *dst, size_t n)
{
    while (n > 0) {
        if (c->left == 0)
            cursor_step(c);
        size_t k = n < c->left ? n : c->left;
        if (op == IO_READ)
            memcpy(dst, c->p, k), dst += k;
        else if (op == IO_WRITE)
            memcpy(c->p, src, k), src += k;
        else if (memcmp(c->p, src, k) != 0)
            return 1;
        else
            src += k;
        c->p += k;
        c->left -= k;
        n -= k;
    }
    return 0;
}

/* Takes n chunks off the free list or the untouched tail; the caller has
 * made room. Returns the head of the new chain. */
static uint32_t take_chunks(mp_shdict_t *d, uint32_t n)
{
    uint32_t head = NIL, *tail = &head;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t c;
        if (d->free_head != NIL) {
            c = d->free_head;
            d->free_head = *link_of(d, c);
            d->nfree--;
        } else {
            MP_BUG_ON(d->high >= d->nchunks);
            c = d->high++;
        }
        *tail = c;
        tail = link_of(d, c);
    }
    *tail = NIL;
    d->used += n;
    return head;
}

static void free_chunks(mp_shdict_t *d, uint32_t c)
{
    while (c != NIL) {
        uint32_t next = *link_of(d, c);
        *link_of(d, c) = d->free_head;
        d->free_head = c;
        d->nfree++;
        d->used--;
        c = next;
    }
}

/* ---- LRU list and hash index ---- */

static void lru_unlink(mp_shdict_t *d, uint32_t i)
{
    entry_t *e = entry(d, i);
    if (e->lprev != NIL)
        entry(d, e->lprev)->lnext = e->lnext;
    else
        d->lru_head = e->lnext;
    if (e->lnext != NIL)
        entry(d, e->lnext)->lprev = e->lprev;
    else
        d->lru_tail = e->lprev;
}

static void lru_push(mp_shdict_t *d, uint32_t i)
{
    entry_t *e = entry(d, i);
    e->lprev = NIL;
    e->lnext = d->lru_head;
    if (d->lru_head != NIL)
        entry(d, d->lru_head)->lprev = i;
    else
        d->lru_tail = i;
    d->lru_head = i;
}

static void touch(mp_shdict_t *d, uint32_t i)
{
    if (d->lru_head != i) {
        lru_unlink(d, i);
        lru_push(d, i);
    }
}

static int key_equal(const mp_shdict_t *d, uint32_t i, mp_slice key)
{
    const entry_t *e = entry(d, i);
    cursor_t c = cursor_at(d, i, fixed_len(e->type));
    return cursor_io(&c, IO_CMP, key.p, NULL, key.len) == 0;
}

/* The entry holding key, expired or not, or NIL. */
static uint32_t find(const mp_shdict_t *d, uint32_t hash, mp_slice key)
{
    uint32_t i = d->buckets[hash & d->mask];
    for (; i != NIL; i = entry(d, i)->hnext) {
        const entry_t *e = entry(d, i);
        if (e->hash == hash && e->klen == key.len && key_equal(d, i, key))
            return i;
    }
    return NIL;
}

/* Unlinks entry i from its bucket and the LRU list and frees its chunks. */
static void remove_entry(mp_shdict_t *d, uint32_t i)
{
    uint32_t *l = &d->buckets[entry(d, i)->hash & d->mask];
    while (*l != i) {
        MP_BUG_ON(*l == NIL);
        l = &entry(d, *l)->hnext;
    }
    *l = entry(d, i)->hnext;
    lru_unlink(d, i);
    free_chunks(d, i);
    d->entries--;
}

/* The live entry holding key, or NIL; an expired one is reclaimed here. */
static uint32_t lookup(mp_shdict_t *d, uint32_t hash, mp_slice key, double now)
{
    uint32_t i = find(d, hash, key);
    if (i != NIL && entry(d, i)->expires <= now) {
        remove_entry(d, i);
        return NIL;
    }
    return i;
}

/* Frees LRU-tail entries until n chunks are available; n <= nchunks, and
 * every chunk not available belongs to an entry, so the loop ends. */
static void make_room(mp_shdict_t *d, uint32_t n, double now)
{
    while (d->nfree + (d->nchunks - d->high) < n) {
        uint32_t victim = d->lru_tail;
        MP_BUG_ON(victim == NIL);
        if (entry(d, victim)->expires > now)
            d->evictions++;
        remove_entry(d, victim);
    }
}

/* A new most-recent entry of n chunks holding key; the caller writes the
 * value. Any entry index held before this call may have been evicted. */
static uint32_t create(mp_shdict_t *d, uint32_t n, uint32_t hash, mp_slice key, int type, size_t vlen, double expires,
                       double now)
{
    make_room(d, n, now);
    uint32_t i = take_chunks(d, n);
    entry_t *e = entry(d, i);
    e->hash = hash;
    e->klen = (uint32_t)key.len;
    e->vlen = (uint32_t)vlen;
    e->type = (uint8_t)type;
    e->expires = expires;
    cursor_t c = cursor_at(d, i, fixed_len(type));
    cursor_io(&c, IO_WRITE, key.p, NULL, key.len);
    uint32_t *b = &d->buckets[hash & d->mask];
    e->hnext = *b;
    *b = i;
    lru_push(d, i);
    d->entries++;
    return i;
}

static double expiry(double ttl_s, double now)
{
    return ttl_s > 0 ? now + ttl_s : INFINITY;
}

static int key_ok(mp_slice key)
{
    return key.len > 0 && key.len <= MP_SHDICT_KEY_MAX;
}

/* ---- registry ---- */

static void seed(mp_shdict_t *d)
{
    uint64_t k[2];
    if (getrandom(k, sizeof(k), GRND_NONBLOCK) != (ssize_t)sizeof(k)) {
        /* early boot without entropy: still unpredictable enough per process */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        k[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)d;
        k[1] = (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 32);
    }
    d->k0 = k[0];
    d->k1 = k[1];
}

static void dict_free(mp_shdict_t *d)
{
    pthread_mutex_destroy(&d->lock);
    free(d->arena);
    free(d->buckets);
    free(d);
}

/* A new empty dict; NULL when out of memory. */
static mp_shdict_t *dict_new(const char *name, size_t size)
{
    size_t nlen = strlen(name);
    mp_shdict_t *d = calloc(1, sizeof(*d) + nlen + 1);
    if (!d)
        return NULL;
    memcpy(d->name, name, nlen + 1);
    d->size = size;
    d->nchunks = (uint32_t)(size / CHUNK);
    /* at most nchunks entries: two per bucket at worst when every entry is one chunk */
    uint32_t nb = 1;
    while (nb < d->nchunks / 2)
        nb <<= 1;
    d->mask = nb - 1;
    d->buckets = malloc((size_t)nb * sizeof(uint32_t));
    /* not zeroed: pages are touched only as chunks get used */
    if (!d->buckets || posix_memalign((void **)&d->arena, CHUNK, (size_t)d->nchunks * CHUNK) != 0) {
        free(d->buckets);
        free(d);
        return NULL;
    }
    memset(d->buckets, 0xff, (size_t)nb * sizeof(uint32_t));
    d->free_head = d->lru_head = d->lru_tail = NIL;
    pthread_mutex_init(&d->lock, NULL);
    seed(d);
    return d;
}

mp_shdict_t *mp_shdict_open(const char *name, size_t size, char *err, size_t errlen)
{
    if (size < MP_SHDICT_MIN_SIZE || size / CHUNK > MAX_CHUNKS) {
        snprintf(err, errlen, "shared dict '%s': size %zu out of range (%d .. %llu bytes)", name, size,
                 MP_SHDICT_MIN_SIZE, (unsigned long long)MAX_CHUNKS * CHUNK);
        return NULL;
    }
    pthread_mutex_lock(&reg_lock);
    mp_shdict_t *d = reg_head;
    while (d && strcmp(d->name, name) != 0)
        d = d->next;
    if (d && d->size != size) {
        snprintf(err, errlen, "shared dict '%s' already exists with size %zu", name, d->size);
        d = NULL;
    } else if (!d) {
        d = dict_new(name, size);
        if (d) {
            d->next = reg_head;
            reg_head = d;
        } else {
            snprintf(err, errlen, "shared dict '%s': out of memory", name);
        }
    }
    pthread_mutex_unlock(&reg_lock);
    return d;
}

void mp_shdict_close_all(void)
{
    pthread_mutex_lock(&reg_lock);
    while (reg_head) {
        mp_shdict_t *d = reg_head;
        reg_head = d->next;
        dict_free(d);
    }
    pthread_mutex_unlock(&reg_lock);
}

const char *mp_shdict_name(const mp_shdict_t *d)
{
    return d->name;
}

double mp_shdict_now(void)
{
    return mp_now();
}

/* ---- operations ---- */

int mp_shdict_get(mp_shdict_t *d, mp_slice key, double now, mp_shdict_value_t *out, char *buf, size_t cap)
{
    if (!key_ok(key))
        return MP_EINVAL;
    uint32_t hash = hash_key(d, key);
    int rc = 0;
    pthread_mutex_lock(&d->lock);
    uint32_t i = lookup(d, hash, key, now);
    if (i == NIL) {
        rc = MP_ENOENT;
        goto out;
    }
    touch(d, i);
    const entry_t *e = entry(d, i);
    out->type = e->type;
    out->num = e->type == MP_SHDICT_STRING ? 0 : fixed(d, i)[0];
    out->str = buf;
    out->len = e->vlen;
    if (e->type == MP_SHDICT_STRING && e->vlen > cap) {
        rc = MP_EAGAIN;
    } else if (e->type == MP_SHDICT_STRING) {
        cursor_t c = cursor_at(d, i, e->klen);
        cursor_io(&c, IO_READ, NULL, buf, e->vlen);
    }
out:
    pthread_mutex_unlock(&d->lock);
    return rc;
}

/* set and add: replace any entry, or only fill an absent one. */
static int store(mp_shdict_t *d, mp_slice key, const mp_shdict_value_t *v, double ttl_s, double now, int add)
{
    if (!key_ok(key) || (v->type != MP_SHDICT_STRING && v->type != MP_SHDICT_NUMBER && v->type != MP_SHDICT_BOOLEAN))
        return MP_EINVAL;
    size_t vlen = v->type == MP_SHDICT_STRING ? v->len : 0;
    uint32_t n = chunks_for(v->type, key.len, vlen);
    if (n == 0 || n > d->nchunks)
        return MP_ENOMEM;
    uint32_t hash = hash_key(d, key);
    pthread_mutex_lock(&d->lock);
    uint32_t i = lookup(d, hash, key, now);
    if (i != NIL && add) {
        touch(d, i);
        pthread_mutex_unlock(&d->lock);
        return MP_SHDICT_EXISTS;
    }
    /* freed first, so its chunks can hold the new value */
    if (i != NIL)
        remove_entry(d, i);
    i = create(d, n, hash, key, v->type, vlen, expiry(ttl_s, now), now);
    if (v->type == MP_SHDICT_STRING) {
        cursor_t c = cursor_at(d, i, key.len);
        cursor_io(&c, IO_WRITE, v->str, NULL, vlen);
    } else {
        fixed(d, i)[0] = v->type == MP_SHDICT_BOOLEAN ? (v->num != 0) : v->num;
    }
    pthread_mutex_unlock(&d->lock);
    return 0;
}

int mp_shdict_set(mp_shdict_t *d, mp_slice key, const mp_shdict_value_t *v, double ttl_s, double now)
{
    return store(d, key, v, ttl_s, now, 0);
}

int mp_shdict_add(mp_shdict_t *d, mp_slice key, const mp_shdict_value_t *v, double ttl_s, double now)
{
    return store(d, key, v, ttl_s, now, 1);
}

int mp_shdict_incr(mp_shdict_t *d, mp_slice key, double by, const double *init, double ttl_s, double now, double *out)
{
    if (!key_ok(key))
        return MP_EINVAL;
    uint32_t n = chunks_for(MP_SHDICT_NUMBER, key.len, 0);
    uint32_t hash = hash_key(d, key);
    int rc = 0;
    pthread_mutex_lock(&d->lock);
    uint32_t i = lookup(d, hash, key, now);
    if (i == NIL && !init) {
        rc = MP_ENOENT;
    } else if (i == NIL && n > d->nchunks) {
        rc = MP_ENOMEM;
    } else if (i == NIL) {
        i = create(d, n, hash, key, MP_SHDICT_NUMBER, 0, expiry(ttl_s, now), now);
        *out = fixed(d, i)[0] = *init + by;
    } else if (entry(d, i)->type != MP_SHDICT_NUMBER) {
        rc = MP_EINVAL;
    } else {
        touch(d, i);
        *out = fixed(d, i)[0] += by;
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

int mp_shdict_delete(mp_shdict_t *d, mp_slice key)
{
    if (!key_ok(key))
        return MP_EINVAL;
    uint32_t hash = hash_key(d, key);
    pthread_mutex_lock(&d->lock);
    uint32_t i = find(d, hash, key);
    if (i != NIL)
        remove_entry(d, i);
    pthread_mutex_unlock(&d->lock);
    return i == NIL ? MP_ENOENT : 0;
}

/* Refills bucket b = {tokens, last} to now, then takes cost if it can. */
static void bucket_take(double *b, double rate, double burst, double cost, double now, mp_shdict_take_t *out)
{
    /* workers read the clock before taking the lock, so now may lag last a little */
    if (now > b[1]) {
        b[0] = fmin(burst, b[0] + (now - b[1]) * rate);
        b[1] = now;
    }
    b[0] = fmin(b[0], burst); /* burst may have shrunk since (reload) */
    out->allowed = b[0] >= cost;
    if (out->allowed)
        b[0] -= cost;
    out->remaining = b[0];
    out->retry_after_s = out->allowed ? 0 : (cost - b[0]) / rate;
}

int mp_shdict_take(mp_shdict_t *d, mp_slice key, double rate_per_s, double burst, double cost, double now,
                   mp_shdict_take_t *out)
{
    if (!key_ok(key) || !(rate_per_s > 0 && rate_per_s < INFINITY) || !(burst > 0 && burst < INFINITY) ||
        !(cost >= 0 && cost <= burst))
        return MP_EINVAL;
    uint32_t n = chunks_for(MP_SHDICT_BUCKET, key.len, 0);
    uint32_t hash = hash_key(d, key);
    int rc = 0;
    pthread_mutex_lock(&d->lock);
    uint32_t i = lookup(d, hash, key, now);
    if (i == NIL && n > d->nchunks) {
        rc = MP_ENOMEM;
    } else if (i != NIL && entry(d, i)->type != MP_SHDICT_BUCKET) {
        rc = MP_EINVAL;
    } else {
        if (i == NIL) {
            i = create(d, n, hash, key, MP_SHDICT_BUCKET, 0, INFINITY, now);
            fixed(d, i)[0] = burst;
            fixed(d, i)[1] = now;
        }
        touch(d, i);
        double *b = fixed(d, i);
        bucket_take(b, rate_per_s, burst, cost, now, out);
        /* once full again the bucket is the same as an absent one: let it go */
        entry(d, i)->expires = b[1] + (burst - b[0]) / rate_per_s;
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

void mp_shdict_stats(mp_shdict_t *d, mp_shdict_stats_t *out)
{
    pthread_mutex_lock(&d->lock);
    out->capacity = d->size;
    out->used = (size_t)d->used * CHUNK;
    out->index_bytes = ((size_t)d->mask + 1) * sizeof(uint32_t);
    out->entries = d->entries;
    out->evictions = d->evictions;
    pthread_mutex_unlock(&d->lock);
}

/* ---- consistency check (tests) ---- */

/* Walks the LRU list: links agree both ways, each entry is found through the
 * index and its chain has the length its sizes imply. Adds up chunks. */
static int check_entries(const mp_shdict_t *d, uint64_t *nentries, uint64_t *nchunks)
{
    uint32_t prev = NIL;
    for (uint32_t i = d->lru_head; i != NIL; prev = i, i = entry(d, i)->lnext) {
        const entry_t *e = entry(d, i);
        if (i >= d->high || e->lprev != prev || ++*nentries > d->entries)
            return MP_EPROTO;
        uint32_t len = 0;
        for (uint32_t c = i; c != NIL && len <= d->nchunks; c = *link_of(d, c))
            len++;
        if (len != chunks_for(e->type, e->klen, e->vlen))
            return MP_EPROTO;
        *nchunks += len;
        uint32_t h = d->buckets[e->hash & d->mask];
        while (h != NIL && h != i)
            h = entry(d, h)->hnext;
        if (h != i || e->klen == 0)
            return MP_EPROTO;
    }
    return prev == d->lru_tail ? 0 : MP_EPROTO;
}

int mp_shdict_check(mp_shdict_t *d)
{
    uint64_t nentries = 0, nchunks = 0, nfree = 0, nindexed = 0;
    pthread_mutex_lock(&d->lock);
    int rc = check_entries(d, &nentries, &nchunks);
    for (uint32_t c = d->free_head; c != NIL && nfree <= d->nchunks; c = *link_of(d, c))
        nfree++;
    for (uint32_t b = 0; b <= d->mask; b++)
        for (uint32_t i = d->buckets[b]; i != NIL && nindexed <= d->entries; i = entry(d, i)->hnext)
            nindexed += (entry(d, i)->hash & d->mask) == b;
    if (rc == 0 && (nentries != d->entries || nindexed != d->entries || nchunks != d->used || nfree != d->nfree ||
                    d->used + d->nfree != d->high || d->high > d->nchunks))
        rc = MP_EPROTO;
    pthread_mutex_unlock(&d->lock);
    return rc;
}
