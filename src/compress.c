/* compress.c: streaming response encoders over zlib, libbrotli and libzstd.
 * One object per response; a few are kept per thread (FREE_MAX of each
 * algorithm) so that steady traffic reuses their windows and tables rather
 * than allocating them per response. */
#include "compress.h"

#include "config.h"
#include "err.h"

#include <brotli/encode.h>
#include <pthread.h>
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>

struct mp_compress {
    int alg, level;
    int started; /* a step ran since the last reset */
    int ended;   /* FINISH completed */
    struct mp_compress *next;
    union {
        z_stream gz;
        BrotliEncoderState *br;
        ZSTD_CCtx *zs;
    } u;
};

#define FREE_MAX 8

/* The thread's free encoders, by algorithm; freed when the thread ends. */
typedef struct {
    mp_compress_t *list[4];
    unsigned count[4];
} free_lists_t;

static __thread free_lists_t *spare;
static pthread_key_t spare_key;
static pthread_once_t spare_once = PTHREAD_ONCE_INIT;

static void destroy(mp_compress_t *z);

static void spare_free(void *p)
{
    free_lists_t *f = p;
    for (int a = 0; a < 4; a++)
        while (f->list[a]) {
            mp_compress_t *z = f->list[a];
            f->list[a] = z->next;
            destroy(z);
        }
    free(f);
    spare = NULL;
}

static void spare_key_make(void)
{
    pthread_key_create(&spare_key, spare_free);
}

/* The thread's free lists, made on first use (NULL when out of memory). */
static free_lists_t *spares(void)
{
    if (MP_LIKELY(spare != NULL))
        return spare;
    pthread_once(&spare_once, spare_key_make);
    if ((spare = calloc(1, sizeof(*spare))) != NULL)
        pthread_setspecific(spare_key, spare);
    return spare;
}

static int clamp(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static int level_of(int alg, int level)
{
    switch (alg) {
    case MP_ENC_GZIP: return level ? clamp(level, 1, 9) : 6;
    case MP_ENC_BR: return level ? clamp(level, 0, 11) : 4; /* 11 (the library's default) is far too slow to stream */
    default: return level ? clamp(level, 1, ZSTD_maxCLevel()) : 3;
    }
}

static void destroy(mp_compress_t *z)
{
    switch (z->alg) {
    case MP_ENC_GZIP: deflateEnd(&z->u.gz); break;
    case MP_ENC_BR: BrotliEncoderDestroyInstance(z->u.br); break;
    default: ZSTD_freeCCtx(z->u.zs);
    }
    free(z);
}

static int init(mp_compress_t *z)
{
    switch (z->alg) {
    case MP_ENC_GZIP:
        /* windowBits 15 + 16: a gzip header and trailer */
        return deflateInit2(&z->u.gz, z->level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK ? 0 : MP_ENOMEM;
    case MP_ENC_BR:
        if (!(z->u.br = BrotliEncoderCreateInstance(NULL, NULL, NULL)))
            return MP_ENOMEM;
        BrotliEncoderSetParameter(z->u.br, BROTLI_PARAM_QUALITY, (uint32_t)z->level);
        BrotliEncoderSetParameter(z->u.br, BROTLI_PARAM_LGWIN, 18); /* 256 KiB window: bounded memory */
        return 0;
    default:
        if (!(z->u.zs = ZSTD_createCCtx()))
            return MP_ENOMEM;
        ZSTD_CCtx_setParameter(z->u.zs, ZSTD_c_compressionLevel, z->level);
        ZSTD_CCtx_setParameter(z->u.zs, ZSTD_c_windowLog, 18);
        return 0;
    }
}

/* Readies a used encoder for a new stream. Returns 0, or an error (it is
 * then destroyed by the caller). */
static int reset(mp_compress_t *z)
{
    z->started = z->ended = 0;
    switch (z->alg) {
    case MP_ENC_GZIP: return deflateReset(&z->u.gz) == Z_OK ? 0 : MP_EPROTO;
    case MP_ENC_BR: /* brotli has no reset: a fresh state (its tables are allocated lazily) */
        BrotliEncoderDestroyInstance(z->u.br);
        return init(z);
    default: return ZSTD_isError(ZSTD_CCtx_reset(z->u.zs, ZSTD_reset_session_only)) ? MP_EPROTO : 0;
    }
}

mp_compress_t *mp_compress_new(int alg, int level)
{
    if (alg < MP_ENC_GZIP || alg > MP_ENC_ZSTD)
        return NULL;
    level = level_of(alg, level);
    free_lists_t *f = spare;
    for (mp_compress_t **p = f ? &f->list[alg] : NULL; p && *p; p = &(*p)->next) {
        mp_compress_t *z = *p;
        if (z->level != level)
            continue;
        *p = z->next;
        f->count[alg]--;
        z->next = NULL;
        return z; /* reset when it was put back */
    }
    mp_compress_t *z = calloc(1, sizeof(*z));
    if (!z)
        return NULL;
    z->alg = alg;
    z->level = level;
    if (init(z) != 0) {
        free(z);
        return NULL;
    }
    return z;
}

void mp_compress_free(mp_compress_t *z)
{
    if (!z)
        return;
    free_lists_t *f = spares();
    if (!f || f->count[z->alg] >= FREE_MAX || reset(z) != 0)
        return destroy(z);
    z->next = f->list[z->alg];
    f->list[z->alg] = z;
    f->count[z->alg]++;
}

static int step_gzip(mp_compress_t *z, int op, const char **in, size_t *in_len, char **out, size_t *out_room)
{
    z_stream *s = &z->u.gz;
    static const int flush[] = {Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH};
    s->next_in = (Bytef *)*in;
    s->avail_in = (uInt)(*in_len > UINT32_MAX ? UINT32_MAX : *in_len);
    s->next_out = (Bytef *)*out;
    s->avail_out = (uInt)(*out_room > UINT32_MAX ? UINT32_MAX : *out_room);
    uInt in0 = s->avail_in, out0 = s->avail_out;
    int rc = deflate(s, flush[op]);
    *in += in0 - s->avail_in, *in_len -= in0 - s->avail_in;
    *out += out0 - s->avail_out, *out_room -= out0 - s->avail_out;
    if (rc == Z_STREAM_END)
        return 1;
    if (rc != Z_OK && rc != Z_BUF_ERROR)
        return MP_EPROTO;
    if (op == MP_COMPRESS_RUN)
        return *in_len == 0;
    /* a flush is complete when deflate left room: it had nothing more to say */
    return *in_len == 0 && s->avail_out > 0 && op == MP_COMPRESS_FLUSH;
}

static int step_br(mp_compress_t *z, int op, const char **in, size_t *in_len, char **out, size_t *out_room)
{
    static const BrotliEncoderOperation ops[] = {BROTLI_OPERATION_PROCESS, BROTLI_OPERATION_FLUSH,
                                                 BROTLI_OPERATION_FINISH};
    const uint8_t *ni = (const uint8_t *)*in;
    uint8_t *no = (uint8_t *)*out;
    if (!BrotliEncoderCompressStream(z->u.br, ops[op], in_len, &ni, out_room, &no, NULL))
        return MP_EPROTO;
    *in = (const char *)ni;
    *out = (char *)no;
    if (BrotliEncoderHasMoreOutput(z->u.br) || *in_len)
        return 0;
    return op == MP_COMPRESS_FINISH ? BrotliEncoderIsFinished(z->u.br) : 1;
}

static int step_zstd(mp_compress_t *z, int op, const char **in, size_t *in_len, char **out, size_t *out_room)
{
    static const ZSTD_EndDirective ops[] = {ZSTD_e_continue, ZSTD_e_flush, ZSTD_e_end};
    ZSTD_inBuffer ib = {*in, *in_len, 0};
    ZSTD_outBuffer ob = {*out, *out_room, 0};
    size_t left = ZSTD_compressStream2(z->u.zs, &ob, &ib, ops[op]);
    if (ZSTD_isError(left))
        return MP_EPROTO;
    *in += ib.pos, *in_len -= ib.pos;
    *out += ob.pos, *out_room -= ob.pos;
    if (op == MP_COMPRESS_RUN)
        return *in_len == 0;
    return left == 0 && *in_len == 0;
}

int mp_compress_step(mp_compress_t *z, int op, const char **in, size_t *in_len, char **out, size_t *out_room)
{
    if (z->ended)
        return 1;
    z->started = 1;
    int rc;
    switch (z->alg) {
    case MP_ENC_GZIP: rc = step_gzip(z, op, in, in_len, out, out_room); break;
    case MP_ENC_BR: rc = step_br(z, op, in, in_len, out, out_room); break;
    default: rc = step_zstd(z, op, in, in_len, out, out_room);
    }
    if (rc == 1 && op == MP_COMPRESS_FINISH)
        z->ended = 1;
    return rc;
}
