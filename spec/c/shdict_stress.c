/* shdict_stress.c: N threads hammer shared dicts (src/shdict.c) with mixed
 * get/set/add/incr/delete/take on overlapping keys for a bounded time, then
 * check invariants: incr totals add up exactly, add is mutually exclusive,
 * no string is ever read torn, the bucket never grants more than
 * burst + rate * elapsed, memory stays within size and the structure is
 * consistent. Built with -fsanitize=thread by scripts/tsan.sh.
 * Usage: shdict_stress [seconds=2] [threads=4]; exit 0 when every check holds. */
#include "shdict.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NCOUNTERS 8
#define NSTRINGS 64
#define NLOCKS 4
#define MAX_THREADS 64
#define RATE 2000.0 /* bucket tokens per second */
#define BURST 100.0
#define BIG_SIZE (1 << 20)    /* holds every key below: never evicts */
#define CHURN_SIZE (16 << 10) /* evicts all the time */

typedef struct {
    int id;
    uint64_t rng;
    uint64_t incrs[NCOUNTERS]; /* this thread's successful incr per counter */
    uint64_t allowed;          /* tokens granted to this thread */
    uint64_t ops;
} worker_t;

static atomic_int stop;
static atomic_int failures;
static mp_shdict_t *big, *churn;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "shdict_stress: %s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                    \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fputc('\n', stderr);                                                                                       \
            atomic_fetch_add(&failures, 1);                                                                            \
        }                                                                                                              \
    } while (0)

static uint32_t next_rand(worker_t *w)
{
    w->rng ^= w->rng << 13; /* xorshift64 */
    w->rng ^= w->rng >> 7;
    w->rng ^= w->rng << 17;
    return (uint32_t)(w->rng >> 32);
}

static mp_slice key_of(char *buf, size_t cap, const char *prefix, unsigned k)
{
    int n = snprintf(buf, cap, "%s%u", prefix, k);
    return (mp_slice){buf, (size_t)n};
}

/* A self-describing value of len >= 5 bytes: [len:4][seed][seed+5][seed+6]...
 * Any mix of two writes breaks the pattern. */
static void fill(char *v, uint32_t len, unsigned char seed)
{
    memcpy(v, &len, 4);
    v[4] = (char)seed;
    for (uint32_t i = 5; i < len; i++)
        v[i] = (char)(seed + i);
}

static int intact(const char *v, size_t len)
{
    uint32_t n;
    if (len < 5)
        return 0;
    memcpy(&n, v, 4);
    if (n != len)
        return 0;
    for (size_t i = 5; i < len; i++)
        if ((unsigned char)v[i] != (unsigned char)(v[4] + i))
            return 0;
    return 1;
}

static void op_set(worker_t *w, mp_shdict_t *d, mp_slice key, uint32_t maxlen)
{
    char v[4096];
    uint32_t len = 5 + next_rand(w) % (maxlen - 5);
    fill(v, len, (unsigned char)next_rand(w));
    mp_shdict_value_t val = {.type = MP_SHDICT_STRING, .str = v, .len = len};
    int rc = mp_shdict_set(d, key, &val, (next_rand(w) & 7) ? 0 : 0.001, mp_shdict_now());
    CHECK(rc == 0, "set rc %d", rc);
}

static void op_get(mp_shdict_t *d, mp_slice key)
{
    char v[4096];
    mp_shdict_value_t val;
    int rc = mp_shdict_get(d, key, mp_shdict_now(), &val, v, sizeof(v));
    CHECK(rc == 0 || rc == MP_ENOENT, "get rc %d", rc);
    if (rc == 0)
        CHECK(val.type == MP_SHDICT_STRING && intact(v, val.len), "torn value (type %d len %zu)", val.type, val.len);
}

static void op_incr(worker_t *w)
{
    char kb[32];
    unsigned k = next_rand(w) % NCOUNTERS;
    double init = 0, out = 0;
    int rc = mp_shdict_incr(big, key_of(kb, sizeof(kb), "c", k), 1, &init, 0, mp_shdict_now(), &out);
    CHECK(rc == 0 && out >= 1, "incr rc %d out %g", rc, out);
    w->incrs[k] += rc == 0;
}

/* add is a lock: whoever adds l<k> owns it until it deletes it. */
static void op_lock(worker_t *w)
{
    char kb[32];
    mp_slice key = key_of(kb, sizeof(kb), "l", next_rand(w) % NLOCKS);
    mp_shdict_value_t me = {.type = MP_SHDICT_NUMBER, .num = w->id}, got = {0};
    int rc = mp_shdict_add(big, key, &me, 0, mp_shdict_now());
    CHECK(rc == 0 || rc == MP_SHDICT_EXISTS, "add rc %d", rc);
    if (rc != 0)
        return;
    for (int i = 0; i < 3; i++) {
        rc = mp_shdict_get(big, key, mp_shdict_now(), &got, NULL, 0);
        CHECK(rc == 0 && got.num == w->id, "lock owned by %d taken by %g (rc %d)", w->id, got.num, rc);
    }
    CHECK(mp_shdict_delete(big, key) == 0, "owner could not delete its lock");
}

static void op_take(worker_t *w)
{
    mp_shdict_take_t t;
    int rc = mp_shdict_take(big, MP_SLICE_LIT("bucket"), RATE, BURST, 1, mp_shdict_now(), &t);
    CHECK(rc == 0 && t.remaining >= 0 && t.remaining <= BURST, "take rc %d remaining %g", rc, t.remaining);
    CHECK(t.allowed ? t.retry_after_s == 0 : t.retry_after_s > 0, "retry_after %g", t.retry_after_s);
    w->allowed += rc == 0 && t.allowed;
}

static void one_op(worker_t *w)
{
    char kb[32];
    uint32_t r = next_rand(w);
    switch (r % 10) {
    case 0:
    case 1: op_incr(w); break;
    case 2: op_set(w, big, key_of(kb, sizeof(kb), "s", r / 16 % NSTRINGS), 400); break;
    case 3: op_get(big, key_of(kb, sizeof(kb), "s", r / 16 % NSTRINGS)); break;
    case 4: mp_shdict_delete(big, key_of(kb, sizeof(kb), "s", r / 16 % NSTRINGS)); break;
    case 5: op_lock(w); break;
    case 6: op_take(w); break;
    case 7: op_set(w, churn, key_of(kb, sizeof(kb), "x", r / 16 % 1000), 3000); break;
    case 8: op_get(churn, key_of(kb, sizeof(kb), "x", r / 16 % 1000)); break;
    default: {
        mp_shdict_stats_t st;
        mp_shdict_stats(churn, &st);
        CHECK(st.used <= st.capacity, "used %zu > capacity %zu", st.used, st.capacity);
    }
    }
}

static void *run(void *arg)
{
    worker_t *w = arg;
    char err[128];
    /* every thread opens by name at once: the registry must hand out one dict */
    mp_shdict_t *b = mp_shdict_open("stress", BIG_SIZE, err, sizeof(err));
    mp_shdict_t *c = mp_shdict_open("churn", CHURN_SIZE, err, sizeof(err));
    CHECK(b == big && c == churn, "open returned another dict");
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        one_op(w);
        w->ops++;
        if ((w->ops & 0xfff) == 0)
            CHECK(mp_shdict_check(churn) == 0, "churn dict inconsistent");
    }
    return NULL;
}

/* The totals the threads counted against what the dicts hold. */
static void final_checks(worker_t *w, int n, double elapsed)
{
    uint64_t allowed = 0;
    for (int k = 0; k < NCOUNTERS; k++) {
        char kb[32];
        uint64_t sum = 0;
        for (int t = 0; t < n; t++)
            sum += w[t].incrs[k];
        mp_shdict_value_t v = {0};
        int rc = mp_shdict_get(big, key_of(kb, sizeof(kb), "c", (unsigned)k), mp_shdict_now(), &v, NULL, 0);
        CHECK(rc == 0 && v.num == (double)sum, "counter c%d: %g, threads counted %llu", k, v.num,
              (unsigned long long)sum);
    }
    for (int t = 0; t < n; t++)
        allowed += w[t].allowed;
    CHECK(allowed <= BURST + RATE * elapsed + 1, "bucket granted %llu in %.3f s", (unsigned long long)allowed, elapsed);
    CHECK(allowed >= RATE * elapsed / 2, "bucket granted only %llu in %.3f s", (unsigned long long)allowed, elapsed);
    mp_shdict_stats_t st;
    mp_shdict_stats(big, &st);
    CHECK(st.evictions == 0, "the big dict evicted %llu entries", (unsigned long long)st.evictions);
    mp_shdict_stats(churn, &st);
    CHECK(st.evictions > 0 && st.used <= st.capacity, "churn: %llu evictions, used %zu",
          (unsigned long long)st.evictions, st.used);
    CHECK(mp_shdict_check(big) == 0 && mp_shdict_check(churn) == 0, "inconsistent at the end");
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 2;
    int n = argc > 2 ? atoi(argv[2]) : 4;
    if (n < 1 || n > MAX_THREADS || !(secs > 0))
        return fprintf(stderr, "usage: %s [seconds] [threads 1..%d]\n", argv[0], MAX_THREADS), 2;
    char err[128];
    big = mp_shdict_open("stress", BIG_SIZE, err, sizeof(err));
    churn = mp_shdict_open("churn", CHURN_SIZE, err, sizeof(err));
    if (!big || !churn)
        return fprintf(stderr, "shdict_stress: %s\n", err), 1;
    static worker_t w[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    double t0 = mp_shdict_now();
    for (int t = 0; t < n; t++) {
        w[t] = (worker_t){.id = t + 1, .rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(t + 1)};
        pthread_create(&th[t], NULL, run, &w[t]);
    }
    struct timespec ts = {(time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9)};
    nanosleep(&ts, NULL);
    atomic_store(&stop, 1);
    uint64_t ops = 0;
    for (int t = 0; t < n; t++) {
        pthread_join(th[t], NULL);
        ops += w[t].ops;
    }
    double elapsed = mp_shdict_now() - t0;
    final_checks(w, n, elapsed);
    mp_shdict_close_all();
    int bad = atomic_load(&failures);
    printf("shdict_stress: %d threads, %llu ops in %.2f s, %s\n", n, (unsigned long long)ops, elapsed,
           bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
}
