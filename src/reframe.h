/* reframe.h: the relay's re-framing of a chunked request body, as buffer
 * arithmetic only: the client's bytes are decoded in place in one buffer
 * and written out behind the proxy's own framing (RFC 9112 §7.1). Pure: no
 * I/O, no malloc; upstream.c drives it with sockets, the fuzz target
 * (fuzz.c) with random arrivals and partial writes. */
#ifndef MP_REFRAME_H
#define MP_REFRAME_H

#include "common.h"
#include "http1.h"

#include <stdint.h>

/* Framing of one body being relayed. */
typedef struct {
    uint8_t kind;       /* mp_body_kind (req.h) */
    uint64_t left;      /* MP_BODY_LENGTH: bytes still to come */
    uint64_t total;     /* payload bytes seen (decoded for chunked) */
    mp_chunked_t chunk; /* MP_BODY_CHUNKED */
    unsigned done : 1;  /* the whole body was read (for chunked: decoded) */
    /* A chunked request body is decoded in place and re-framed by the
     * proxy (mp_reframe_*): */
    unsigned out_chunks : 1;      /* a chunk was announced: the next framing starts with CRLF */
    unsigned out_stage : 2;       /* 0 data chunks, 2 the end queued (last chunk, trailers, CRLF), 3 all written */
    uint8_t frame_len, frame_off; /* frame[frame_off, frame_len): framing still to write */
    char frame[MP_CHUNK_FRAME_MAX];
    uint8_t tail_len, tail_off; /* tail[tail_off, tail_len): the body's end, after the last data */
    char tail[8];               /* "\r\n0\r\n\r\n" after the data of a body decoded whole with no
                                 * trailer field, or the final CRLF after the trailer fields */
    uint32_t out_left;          /* bytes of the announced chunk (or of the trailers) still to write */
    uint32_t scan;              /* buffer: first byte of the client's framing not yet decoded */
    uint32_t trailers;          /* buffer: where the re-serialised trailer fields begin; 0 before the last chunk */
} mp_framing_t;

/* The buffer a chunked body is re-framed in, as offsets into data:
 * base <= start <= ready <= f->scan <= end <= cap. [base, start) was
 * written, [start, ready) is decoded and not yet written (data, then the
 * trailer fields from f->trailers), [ready, scan) a gap decoding left,
 * [scan, end) the client's bytes not yet decoded. base > 0 (a head comes
 * first): f->trailers == 0 means none yet. */
typedef struct {
    char *data;
    uint32_t cap;
    uint32_t base;  /* where the body begins (after the request head) */
    uint32_t start; /* the next byte to write */
    uint32_t ready; /* end of the decoded bytes */
    uint32_t end;   /* end of the bytes received */
} mp_reframe_buf_t;

/* Decodes b's undecoded bytes in place (mp_chunked_decode_into): data
 * moves down to b->ready, each trailer field that may be forwarded follows
 * it re-serialised. Data, framing overhead (chunk-ext, leading zeros) and
 * trailer field lines count against max_body (0: no limit), the trailer
 * section (its fields and final CRLF) against max_head. Returns 0, or 400
 * (bad framing), 413 or 431; f->done once the body ended. */
int mp_reframe_decode(mp_framing_t *f, mp_reframe_buf_t *b, uint64_t max_body, uint64_t max_head);

/* Queues what comes next once the previous framing and its data are
 * written: a size line for the decoded data not yet announced; once the
 * body has ended, the last chunk, the trailer fields and the final CRLF;
 * then stage 3, where b->start moves to f->scan (a pipelined request
 * starts after the client's framing). A body decoded whole and without
 * trailer fields goes out in one piece: its size line, its data and a tail
 * ending it (one writev, one segment to the upstream); with trailer fields
 * the end is a second piece. */
void mp_reframe_plan(mp_framing_t *f, mp_reframe_buf_t *b);

/* What to write now, in order: *frame (framing), *body (bytes of b), then
 * *tail (the body's end, once body reaches it); any may be empty. Call
 * after mp_reframe_plan. */
void mp_reframe_next(const mp_framing_t *f, const mp_reframe_buf_t *b, mp_slice *frame, mp_slice *body, mp_slice *tail);

/* The re-framed output starts over, nothing written (a replay to another
 * server): what was decoded is kept and sent again, never decoded twice. */
void mp_reframe_restart(mp_framing_t *f);

/* Accounts k bytes written of what mp_reframe_next gave (in its order). */
void mp_reframe_written(mp_framing_t *f, mp_reframe_buf_t *b, size_t k);

/* Whether bytes wait to be written (also the framing still to plan once
 * the body has ended). */
int mp_reframe_pending(const mp_framing_t *f, const mp_reframe_buf_t *b);

/* b is full: drops the bytes already written and the gap decoding left,
 * moving the rest down to b->base. *dropped is set when written bytes were
 * dropped (the body can no longer be sent again). Returns 0, or 431 when
 * the buffer holds only trailer fields and a trailer line still arriving
 * (it cannot fit). */
int mp_reframe_compact(mp_framing_t *f, mp_reframe_buf_t *b, int *dropped);

#endif
