/* util.c: process-wide helpers with no better home (fatal invariant breach,
 * the monotonic clock). */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Thread_local double pinned_now;

double mp_now(void)
{
    if (pinned_now > 0)
        return pinned_now;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void mp_now_pin(double t)
{
    pinned_now = t;
}

void mp_bug(const char *file, int line, const char *expr)
{
    fprintf(stderr, "moonproxy: BUG at %s:%d: %s\n", file, line, expr);
    abort();
}
