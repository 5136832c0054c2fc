/* regex.h: PCRE2 patterns compiled once with JIT, matched with match data
 * owned by the caller's thread. */
#ifndef MP_REGEX_H
#define MP_REGEX_H

#include "common.h"

typedef struct mp_regex mp_regex_t;
typedef struct mp_regex_md mp_regex_md_t; /* per-thread match data */

/* Compiles pattern; returns NULL with PCRE2's message and offset in err. */
mp_regex_t *mp_regex_compile(const char *pattern, char *err, size_t errlen);
void mp_regex_free(mp_regex_t *re);
unsigned mp_regex_groups(const mp_regex_t *re); /* capture groups, not counting group 0 */

mp_regex_md_t *mp_regex_md_new(unsigned max_groups);
void mp_regex_md_free(mp_regex_md_t *md);

/* Matches subject; returns the number of groups set (>= 1, incl. group 0)
 * with offsets copied into ovector (2 per group, at most ovcap groups), 0 for
 * no match, or MP_EINVAL on a PCRE2 error (e.g. match limit). */
int mp_regex_match(const mp_regex_t *re, mp_regex_md_t *md, mp_slice subject, size_t *ovector, unsigned ovcap);

#endif
