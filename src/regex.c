/* regex.c: PCRE2 (8-bit) patterns compiled once and JIT-compiled when the
 * platform allows it; matched with per-thread match data whose match
 * context caps backtracking, so a pathological pattern fails one match
 * instead of hanging a worker. */
#include "regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>

/* Backtracking steps per match. PCRE2's default (10 million) lets one
 * catastrophic pattern stall a worker for seconds; route patterns over an
 * 8k URI stay far below this, and a match that hits it counts as no match. */
#define MATCH_LIMIT 1000000
/* Nested backtracking frames (interpreter only; the JIT has its own stack):
 * enough for one frame per byte of a maximal URI. */
#define DEPTH_LIMIT 20000

struct mp_regex {
    pcre2_code *code;
    int jit;         /* pcre2_jit_compile succeeded: match with pcre2_jit_match */
    unsigned groups; /* capture groups, not counting group 0 */
};

struct mp_regex_md {
    pcre2_match_data *data;
    pcre2_match_context *mctx; /* carries the match limits */
};

mp_regex_t *mp_regex_compile(const char *pattern, char *err, size_t errlen)
{
    int code;
    PCRE2_SIZE offset;
    pcre2_code *pc = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, 0, &code, &offset, NULL);
    if (!pc) {
        PCRE2_UCHAR msg[256];
        if (pcre2_get_error_message(code, msg, sizeof(msg)) < 0)
            snprintf((char *)msg, sizeof(msg), "error %d", code);
        snprintf(err, errlen, "bad regex '%s': %s at offset %zu", pattern, (const char *)msg, (size_t)offset);
        return NULL;
    }
    mp_regex_t *re = calloc(1, sizeof(*re));
    if (!re) {
        pcre2_code_free(pc);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    re->code = pc;
    /* JIT may be unavailable (no support built in, or W^X policy): the
     * interpreter gives the same results, only slower. */
    re->jit = pcre2_jit_compile(pc, PCRE2_JIT_COMPLETE) == 0;
    uint32_t n = 0;
    pcre2_pattern_info(pc, PCRE2_INFO_CAPTURECOUNT, &n);
    re->groups = n;
    return re;
}

void mp_regex_free(mp_regex_t *re)
{
    if (!re)
        return;
    pcre2_code_free(re->code);
    free(re);
}

unsigned mp_regex_groups(const mp_regex_t *re)
{
    return re->groups;
}

mp_regex_md_t *mp_regex_md_new(unsigned max_groups)
{
    mp_regex_md_t *md = calloc(1, sizeof(*md));
    if (!md)
        return NULL;
    md->data = pcre2_match_data_create(max_groups + 1, NULL);
    md->mctx = pcre2_match_context_create(NULL);
    if (!md->data || !md->mctx) {
        mp_regex_md_free(md);
        return NULL;
    }
    pcre2_set_match_limit(md->mctx, MATCH_LIMIT);
    pcre2_set_depth_limit(md->mctx, DEPTH_LIMIT);
    return md;
}

void mp_regex_md_free(mp_regex_md_t *md)
{
    if (!md)
        return;
    pcre2_match_data_free(md->data);
    pcre2_match_context_free(md->mctx);
    free(md);
}

int mp_regex_match(const mp_regex_t *re, mp_regex_md_t *md, mp_slice subject, size_t *ovector, unsigned ovcap)
{
    /* PCRE2 before 10.43 rejects a NULL subject even when it is empty. */
    PCRE2_SPTR s = (PCRE2_SPTR)(subject.p ? subject.p : "");
    int rc;
    if (re->jit)
        rc = pcre2_jit_match(re->code, s, subject.len, 0, 0, md->data, md->mctx);
    else
        rc = pcre2_match(re->code, s, subject.len, 0, 0, md->data, md->mctx);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0)
        return MP_EINVAL;
    /* rc == 0: more groups were set than md holds; md is filled to capacity. */
    unsigned set = rc > 0 ? (unsigned)rc : pcre2_get_ovector_count(md->data);
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md->data);
    unsigned ncopy = set < ovcap ? set : ovcap;
    for (unsigned i = 0; i < 2 * ncopy; i++)
        ovector[i] = ov[i];
    return (int)set;
}
