/* common.h: the few types and macros every moonproxy module shares:
 * borrowed byte slices, error codes (err.h), assertions, container_of. */
#ifndef MP_COMMON_H
#define MP_COMMON_H

#include "err.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A borrowed view of bytes; valid until its owner's next read or compaction. */
typedef struct {
    const char *p;
    size_t len;
} mp_slice;

#define MP_SLICE_LIT(s) ((mp_slice){(s), sizeof(s) - 1})

#define MP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* The release: --version, the start line, the status page. */
#define MP_VERSION "0.1.0"

#define MP_LIKELY(x) __builtin_expect(!!(x), 1)
#define MP_UNLIKELY(x) __builtin_expect(!!(x), 0)

void mp_bug(const char *file, int line, const char *expr) __attribute__((noreturn));

/* MP_BUG_ON stays in release builds: its breach means memory corruption. */
#define MP_BUG_ON(cond)                                                                                                \
    do {                                                                                                               \
        if (MP_UNLIKELY(cond))                                                                                         \
            mp_bug(__FILE__, __LINE__, #cond);                                                                         \
    } while (0)

#ifdef MP_DEBUG
#define MP_ASSERT(cond) MP_BUG_ON(!(cond))
#else
#define MP_ASSERT(cond) ((void)0)
#endif

static inline int mp_slice_eq(mp_slice a, mp_slice b)
{
    return a.len == b.len && memcmp(a.p, b.p, a.len) == 0;
}

static inline char mp_lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
}

/* Case-insensitive comparison of a slice with a lowercase NUL-terminated literal. */
static inline int mp_slice_ieq(mp_slice a, const char *lower, size_t n)
{
    if (a.len != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (mp_lower(a.p[i]) != lower[i])
            return 0;
    return 1;
}

#define MP_SLICE_IEQ(s, lit) mp_slice_ieq((s), (lit), sizeof(lit) - 1)

/* Case-insensitive (ASCII) equality of two slices, either side in any case:
 * field names as peers and hooks wrote them. */
static inline int mp_slice_caseeq(mp_slice a, mp_slice b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++)
        if (a.p[i] != b.p[i] && mp_lower(a.p[i]) != mp_lower(b.p[i]))
            return 0;
    return 1;
}

/* Monotonic seconds (CLOCK_MONOTONIC): the clock of shared dicts, health and
 * proxy.now(). mp_now_pin(t) makes the calling thread read t instead (the
 * simulator pins time for deterministic specs); mp_now_pin(0) unpins. */
double mp_now(void);
void mp_now_pin(double t);

#endif
