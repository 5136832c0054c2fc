/* balance.c: the built-in balancing policies (see balance.h). Loads compare
 * as active * other weight in 64 bits, so no division and no float on the
 * integer policies. */
#include "balance.h"

#include <stdlib.h>
#include <string.h>

static inline int weight_of(const mp_pick_server_t *s)
{
    return s->weight > 0 ? s->weight : 1;
}

/* a carries less load than b: a.active / a.weight < b.active / b.weight */
static inline int lighter(const mp_pick_server_t *a, const mp_pick_server_t *b)
{
    return (int64_t)a->active * weight_of(b) < (int64_t)b->active * weight_of(a);
}

static inline double ewma_cost(const mp_pick_server_t *s)
{
    double lat = s->latency > 0 ? s->latency : MP_EWMA_DEFAULT_MS;
    return lat * (s->active + 1) / weight_of(s);
}

uint64_t mp_rand64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t mp_hash64(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    /* FNV-1a alone leaves short keys clustered in the high bits the ring uses */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

/* Uniform in [0, m) (Lemire's multiply; the bias is below 2^-32 * m). */
static inline int rand_below(uint64_t *rng, int m)
{
    return (int)(((mp_rand64(rng) >> 32) * (uint64_t)m) >> 32);
}

int mp_pick_round_robin(unsigned *cursor, const mp_pick_server_t *s, int n)
{
    if (n <= 0)
        return -1;
    int i = (int)(*cursor % (unsigned)n);
    for (int k = 0; k < n; k++, i = i + 1 < n ? i + 1 : 0) {
        if (s[i].available) {
            *cursor = (unsigned)i + 1;
            return i;
        }
    }
    return -1;
}

int mp_pick_weighted(int *current, const mp_pick_server_t *s, int n)
{
    int best = -1, total = 0;
    for (int i = 0; i < n; i++) {
        if (!s[i].available)
            continue;
        int w = weight_of(&s[i]);
        current[i] += w;
        total += w;
        if (best < 0 || current[i] > current[best])
            best = i;
    }
    if (best >= 0)
        current[best] -= total;
    return best;
}

int mp_pick_least_conn(unsigned *cursor, const mp_pick_server_t *s, int n)
{
    if (n <= 0)
        return -1;
    int best = -1, i = (int)(*cursor % (unsigned)n);
    for (int k = 0; k < n; k++, i = i + 1 < n ? i + 1 : 0)
        if (s[i].available && (best < 0 || lighter(&s[i], &s[best])))
            best = i;
    if (best >= 0)
        *cursor = (unsigned)best + 1;
    return best;
}

/* Index of the k-th (0-based) available server; k < the available count. */
static int nth_available(const mp_pick_server_t *s, int n, int k)
{
    for (int i = 0; i < n; i++)
        if (s[i].available && k-- == 0)
            return i;
    return -1;
}

/* Two distinct available servers drawn at random into *a and *b; returns how
 * many there are to choose from (0: none, 1: only *a). */
static int draw_two(uint64_t *rng, const mp_pick_server_t *s, int n, int *a, int *b)
{
    int m = 0;
    for (int i = 0; i < n; i++)
        m += s[i].available != 0;
    if (m == 0)
        return 0;
    if (m == 1) {
        *a = nth_available(s, n, 0);
        return 1;
    }
    int x = rand_below(rng, m), y = rand_below(rng, m - 1);
    y += y >= x;
    if (m == n) {
        *a = x;
        *b = y;
    } else {
        *a = nth_available(s, n, x);
        *b = nth_available(s, n, y);
    }
    return m;
}

int mp_pick_p2c(uint64_t *rng, const mp_pick_server_t *s, int n)
{
    int a, b, m = draw_two(rng, s, n, &a, &b);
    if (m == 0)
        return -1;
    if (m == 1)
        return a;
    return lighter(&s[b], &s[a]) ? b : a;
}

int mp_pick_ewma(uint64_t *rng, const mp_pick_server_t *s, int n)
{
    int a, b, m = draw_two(rng, s, n, &a, &b);
    if (m == 0)
        return -1;
    if (m == 1)
        return a;
    return ewma_cost(&s[b]) < ewma_cost(&s[a]) ? b : a;
}

struct mp_chash {
    int nservers;
    int npoints;
    uint32_t *points; /* sorted ascending, npoints */
    uint32_t *server; /* the server of points[j] */
};

typedef struct {
    const char *addr; /* borrowed from the caller */
    int index;
} ranked_t;

static int cmp_ranked(const void *pa, const void *pb)
{
    const ranked_t *a = pa, *b = pb;
    int c = strcmp(a->addr, b->addr);
    return c ? c : (a->index > b->index) - (a->index < b->index);
}

static int cmp_u64(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    return (a > b) - (a < b);
}

/* Points of each server into count[] (see balance.h); returns the total. */
static int64_t count_points(const int *weights, int n, int *count)
{
    int64_t total_weight = 0, total = 0;
    for (int i = 0; i < n; i++)
        total_weight += weights && weights[i] > 0 ? weights[i] : 1;
    int scale = total_weight * MP_CHASH_POINTS > MP_CHASH_MAX_POINTS;
    for (int i = 0; i < n; i++) {
        int64_t w = weights && weights[i] > 0 ? weights[i] : 1;
        int64_t c = scale ? w * MP_CHASH_MAX_POINTS / total_weight : w * MP_CHASH_POINTS;
        count[i] = c > 0 ? (int)c : 1;
        total += count[i];
    }
    return total;
}

mp_chash_t *mp_chash_new(const char *const *addrs, const int *weights, int n)
{
    if (n < 1 || n > MP_CHASH_MAX_SERVERS)
        return NULL;
    mp_chash_t *h = NULL;
    ranked_t *rank = malloc(sizeof(*rank) * (size_t)n);
    int *count = malloc(sizeof(*count) * (size_t)n);
    uint64_t *keys = NULL;
    if (!rank || !count)
        goto out;
    int64_t total = count_points(weights, n, count);
    keys = malloc(sizeof(*keys) * (size_t)total);
    h = malloc(sizeof(*h) + sizeof(uint32_t) * 2 * (size_t)total);
    if (!keys || !h) {
        free(h);
        h = NULL;
        goto out;
    }
    for (int i = 0; i < n; i++)
        rank[i] = (ranked_t){addrs[i], i};
    qsort(rank, (size_t)n, sizeof(*rank), cmp_ranked);
    /* keys: point << 32 | rank, so that equal points order by address */
    int64_t k = 0;
    for (int r = 0; r < n; r++) {
        const char *addr = rank[r].addr;
        uint64_t seed = mp_hash64(addr, strlen(addr)), z = 0;
        for (int j = 0; j < count[rank[r].index]; j++) {
            if (j % 2 == 0)
                z = mp_rand64(&seed);
            uint32_t point = j % 2 == 0 ? (uint32_t)(z >> 32) : (uint32_t)z;
            keys[k++] = (uint64_t)point << 32 | (uint64_t)r;
        }
    }
    qsort(keys, (size_t)total, sizeof(*keys), cmp_u64);
    h->nservers = n;
    h->npoints = (int)total;
    h->points = (uint32_t *)(h + 1);
    h->server = h->points + total;
    for (int64_t j = 0; j < total; j++) {
        h->points[j] = (uint32_t)(keys[j] >> 32);
        h->server[j] = (uint32_t)rank[(uint32_t)keys[j]].index;
    }
out:
    free(keys);
    free(count);
    free(rank);
    return h;
}

void mp_chash_free(mp_chash_t *h)
{
    free(h);
}

int mp_chash_servers(const mp_chash_t *h)
{
    return h->nservers;
}

int mp_chash_points(const mp_chash_t *h)
{
    return h->npoints;
}

int mp_chash_pick(const mp_chash_t *h, uint64_t key_hash, const mp_pick_server_t *s, int n)
{
    int m = n < h->nservers ? n : h->nservers, any = 0;
    for (int i = 0; i < m && !any; i++)
        any = s[i].available;
    if (!any)
        return -1;
    uint32_t pos = (uint32_t)(key_hash >> 32);
    int lo = 0, hi = h->npoints; /* the first point >= pos */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (h->points[mid] < pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (int j = lo, step = 0; step < h->npoints; step++, j++) {
        if (j == h->npoints)
            j = 0;
        uint32_t srv = h->server[j];
        if ((int)srv < m && s[srv].available)
            return (int)srv;
    }
    return -1;
}
