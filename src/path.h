/* path.h: the home of request-path normalisation (SPEC "Behaviour on the
 * wire"): what routing, hooks and the upstream see of a client's path.
 * Pure: no I/O, no malloc, no global state. */
#ifndef MP_PATH_H
#define MP_PATH_H

#include "common.h"

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* settings.escaped_slashes: what %2F and %5C in a path become. */
enum mp_escaped_slashes {
    MP_SLASHES_REJECT, /* 400 (the default) */
    MP_SLASHES_KEEP,   /* passed on encoded ("%2F", "%5C"), never a separator */
    MP_SLASHES_DECODE, /* decoded to '/', then normalised like any separator */
};

typedef struct {
    uint8_t merge_slashes;   /* settings.merge_slashes: "a//b" is "a/b" */
    uint8_t escaped_slashes; /* mp_escaped_slashes */
} mp_path_opts_t;

/* Whether the path p[0..len) is already normal under o: 1 only when
 * mp_path_normalize would return it unchanged (no '%' at all, no dot
 * segment, no "//" when merging, nothing it refuses), else 0. Cheap: it
 * lets a caller skip finding room for the output. */
int mp_path_is_normal(const char *p, size_t len, const mp_path_opts_t *o);

/* Normalises the path p[0..len) (origin-form: it starts with '/' and holds
 * no '?') into out, which has room for len bytes and may be p itself:
 * - %XX of an unreserved character is decoded (RFC 3986 §2.3); the hex
 *   digits of every other %XX are upper-cased (§6.2.2.1);
 * - "." and ".." segments are removed (RFC 3986 §5.2.4), their encoded
 *   forms (%2e) too; repeated slashes are merged when o->merge_slashes;
 * - %2F and %5C follow o->escaped_slashes ("decode" makes both '/').
 * Refused (MP_EPROTO with *why, a static reason): a path that climbs above
 * "/", one not starting with '/', '\' (RFC 3986 has no place for it), '#'
 * (a fragment is never sent, RFC 9112 §3.2), %00, a '%' not followed by
 * two hex digits, a control byte, space or byte >= 0x80, an escaped slash
 * under "reject", a segment whose part before its first ';' is "." or ".."
 * ("..;x", "%2e;": servlet containers drop ";params" before removing dot
 * segments). Other path parameters ("/admin;x") are kept as they are.
 * Returns the normalised length (>= 1). */
ssize_t mp_path_normalize(const char *p, size_t len, const mp_path_opts_t *o, char *out, const char **why);

/* Checks a query q[0..len) (after '?', passed on untouched): 0, or
 * MP_EPROTO with *why for '#', '\' or a control byte. */
int mp_path_check_query(const char *q, size_t len, const char **why);

/* libFuzzer entry point (spec/fuzz/fuzz_path.c): normalises arbitrary
 * bytes under every option set and checks what the output promises. */
void mp_fuzz_path(const uint8_t *data, size_t size);

#endif
