/* reframe.c: re-framing a chunked request body in its buffer (reframe.h). */
#include "reframe.h"

#include <string.h>

int mp_reframe_decode(mp_framing_t *f, mp_reframe_buf_t *b, uint64_t max_body, uint64_t max_head)
{
    while (!f->done && f->scan < b->end) {
        size_t put;
        ssize_t k = mp_chunked_decode_into(&f->chunk, b->data + b->ready, b->data + f->scan, b->end - f->scan, &put);
        if (k < 0)
            return 400;
        if (f->chunk.in_trailer && !f->trailers)
            f->trailers = b->ready; /* put is a trailer field then, never data */
        if (!f->chunk.in_trailer)
            f->total += put;
        b->ready += (uint32_t)put;
        f->scan += (uint32_t)k;
        if (f->chunk.in_trailer && f->chunk.trailer_bytes + 2 > max_head)
            return 431;
        if (max_body && f->total + f->chunk.ext_bytes + f->chunk.trailer_bytes > max_body)
            return 413;
        f->done = f->chunk.done;
        if (k == 0)
            break;
    }
    return 0;
}

void mp_reframe_plan(mp_framing_t *f, mp_reframe_buf_t *b)
{
    uint32_t data_end = f->trailers ? f->trailers : b->ready;
    if (f->frame_off < f->frame_len || f->out_left || f->tail_off < f->tail_len || f->out_stage == 3)
        return;
    f->frame_off = f->frame_len = 0;
    f->tail_off = f->tail_len = 0;
    if (f->out_stage == 0 && b->start < data_end) {
        f->out_left = data_end - b->start;
        f->frame_len = (uint8_t)mp_chunked_frame(f->frame, f->out_left, f->out_chunks);
        f->out_chunks = 1;
        if (f->done && data_end == b->ready) { /* the whole rest, no trailer field: end it in the same write */
            memcpy(f->tail, "\r\n0\r\n\r\n", 7);
            f->tail_len = 7;
            f->out_stage = 2;
        }
    } else if (f->out_stage == 0 && f->done) {
        f->frame_len = (uint8_t)mp_chunked_frame(f->frame, 0, f->out_chunks);
        f->out_left = b->ready - b->start; /* the trailer fields, then the final CRLF */
        memcpy(f->tail, "\r\n", 2);
        f->tail_len = 2;
        f->out_stage = 2;
    } else if (f->out_stage == 2) {
        f->out_stage = 3;
        b->start = f->scan;
    }
}

void mp_reframe_next(const mp_framing_t *f, const mp_reframe_buf_t *b, mp_slice *frame, mp_slice *body, mp_slice *tail)
{
    size_t n = b->ready > b->start ? b->ready - b->start : 0;
    *frame = (mp_slice){f->frame + f->frame_off, (size_t)(f->frame_len - f->frame_off)};
    *body = (mp_slice){b->data + b->start, n < f->out_left ? n : f->out_left};
    *tail = (mp_slice){f->tail + f->tail_off, body->len == f->out_left ? (size_t)(f->tail_len - f->tail_off) : 0};
}

void mp_reframe_restart(mp_framing_t *f)
{
    f->out_chunks = 0;
    f->out_stage = 0;
    f->frame_len = f->frame_off = 0;
    f->tail_len = f->tail_off = 0;
    f->out_left = 0;
}

void mp_reframe_written(mp_framing_t *f, mp_reframe_buf_t *b, size_t k)
{
    size_t fr = (size_t)(f->frame_len - f->frame_off) < k ? (size_t)(f->frame_len - f->frame_off) : k;
    f->frame_off += (uint8_t)fr;
    k -= fr;
    size_t data = f->out_left < k ? f->out_left : k;
    f->out_left -= (uint32_t)data;
    b->start += (uint32_t)data;
    f->tail_off += (uint8_t)(k - data);
}

int mp_reframe_pending(const mp_framing_t *f, const mp_reframe_buf_t *b)
{
    return b->ready > b->start || f->frame_off < f->frame_len || f->tail_off < f->tail_len ||
           (f->done && f->out_stage < 3);
}

int mp_reframe_compact(mp_framing_t *f, mp_reframe_buf_t *b, int *dropped)
{
    uint32_t sent = b->start - b->base, unsent = b->ready - b->start;
    uint32_t raw = b->end - f->scan, data_end = f->trailers ? f->trailers : b->ready;
    *dropped = sent != 0;
    if (sent == 0 && f->scan == b->ready)
        return data_end > b->start ? 0 : 431; /* full of data to write, or of trailers */
    memmove(b->data + b->base, b->data + b->start, unsent);
    memmove(b->data + b->base + unsent, b->data + f->scan, raw);
    if (f->trailers)
        f->trailers -= sent;
    b->start = b->base;
    b->ready = f->scan = b->base + unsent;
    b->end = f->scan + raw;
    return 0;
}
