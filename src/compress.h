/* compress.h: the home of response encoders: gzip (zlib), br (libbrotli) and
 * zstd (libzstd), streamed: bytes in, a flush per upstream read, a finish at
 * the body's end. Encoders are kept on a per-thread free list between
 * responses (freed when the thread ends). */
#ifndef MP_COMPRESS_H
#define MP_COMPRESS_H

#include "common.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mp_compress mp_compress_t;

/* What a step does with the input: encode it, then also flush what was
 * encoded (the client can decode every byte given so far), or finish the
 * stream (no more input comes). */
enum mp_compress_op { MP_COMPRESS_RUN = 0, MP_COMPRESS_FLUSH = 1, MP_COMPRESS_FINISH = 2 };

/* An encoder for alg (config.h MP_ENC_GZIP, MP_ENC_BR, MP_ENC_ZSTD) at level
 * (0: the algorithm's default; clamped to its range). NULL when out of
 * memory. The caller owns it until mp_compress_free. */
mp_compress_t *mp_compress_new(int alg, int level);

/* Returns z (NULL is fine) to the thread's free list, or to malloc. */
void mp_compress_free(mp_compress_t *z);

/* Encodes from *in (*in_len bytes) into *out (*out_room bytes of room),
 * advancing both. Returns 1 when op is complete (RUN: all input taken;
 * FLUSH / FINISH: all input taken and all output written), 0 when out is
 * full first (call again with room), MP_EPROTO on an encoder error. */
int mp_compress_step(mp_compress_t *z, int op, const char **in, size_t *in_len, char **out, size_t *out_room);

#endif
