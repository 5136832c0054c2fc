/* scripts/bench/malloc_count.c: the LD_PRELOAD shim of MALLOC_CHECK=1 (scripts/bench/malloc.sh).
 * Counts malloc/calloc/realloc/memalign/free calls into a MAP_SHARED file named by
 * MALLOC_COUNT_FILE (five unsigned longs), so that bash reads them with od at any
 * moment and forked workers add to the same counters; prints the totals at exit. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* glibc's real allocator entry points: no dlsym, so no recursion at start. */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

enum { C_MALLOC, C_CALLOC, C_REALLOC, C_MEMALIGN, C_FREE, C_N };
static _Atomic unsigned long early[C_N];           /* until the map exists */
static _Atomic unsigned long *ctr = early;
#define COUNT(i) atomic_fetch_add_explicit(&ctr[i], 1, memory_order_relaxed)

void *malloc(size_t n) { COUNT(C_MALLOC); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { COUNT(C_CALLOC); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { COUNT(C_REALLOC); return __libc_realloc(p, n); }
void free(void *p) { if (p) COUNT(C_FREE); __libc_free(p); }
void *memalign(size_t a, size_t n) { COUNT(C_MEMALIGN); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { COUNT(C_MEMALIGN); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    COUNT(C_MEMALIGN);
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

__attribute__((constructor)) static void mc_init(void) {
    const char *path = getenv("MALLOC_COUNT_FILE");
    if (!path) return;
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, sizeof early) != 0) return;
    void *m = mmap(NULL, sizeof early, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return;
    _Atomic unsigned long *shared = m;
    for (int i = 0; i < C_N; i++) shared[i] = early[i];
    ctr = shared;
}

__attribute__((destructor)) static void mc_fini(void) {
    char buf[160];
    int n = snprintf(buf, sizeof buf, "malloc-count[%d]: malloc=%lu calloc=%lu realloc=%lu memalign=%lu free=%lu\n",
                     (int)getpid(), ctr[0], ctr[1], ctr[2], ctr[3], ctr[4]);
    if (n > 0) (void)!write(2, buf, (size_t)n);
}
