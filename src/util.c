/* util.c: process-wide helpers with no better home (fatal invariant breach). */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>

void mp_bug(const char *file, int line, const char *expr)
{
    fprintf(stderr, "moonproxy: BUG at %s:%d: %s\n", file, line, expr);
    abort();
}
