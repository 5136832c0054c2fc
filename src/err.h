/* err.h: moonproxy's error constants, and which set is for what.
 *
 *  - MP_E* (negative ints, MP_OK 0): the return of pure functions (parser,
 *    buffers, chunked decoder, config, bindings). The caller maps one to what
 *    it means where it is; never smuggle another set through these ints.
 *  - mp_err_* (const char *): why an exchange or a connection failed, as
 *    h2o's h2o_socket_error_* do. A failure is a pointer to one of them (NULL:
 *    none), compared by address (err == mp_err_reset), and its text is what
 *    the log line and the peer's result say, printed as is.
 *
 * Not errors, so not here: a balancer pick's MP_PICK_NONE / MP_PICK_ERROR
 * (balancer.h) are its outcomes besides a server index (503 / 500); a hook
 * chain's MP_HOOK_* (l_request.h) are its outcomes (go on, responded, 500).
 * The parser's `error` field (http1.h) describes an MP_EPROTO for the log,
 * beside the status it gives; it is read, never compared. */
#ifndef MP_ERR_H
#define MP_ERR_H

enum {
    MP_OK = 0,
    MP_EAGAIN = -1, /* need more input / would block */
    MP_EPROTO = -2, /* peer bytes violate the protocol */
    MP_ENOMEM = -3,
    MP_ETIMEDOUT = -4,
    MP_EINVAL = -5, /* bad argument or configuration */
    MP_ENOENT = -6, /* nothing matched */
    MP_EIO = -7,    /* a syscall failed; see errno */
};

/* Why an upstream exchange failed (upstream.c maps them to 502/504 and
 * retries). A timeout is one of the three *_timeout: they answer 504. */
extern const char mp_err_connect[];         /* connecting failed (refused, unreachable) */
extern const char mp_err_connect_timeout[]; /* no connection within connect_timeout */
extern const char mp_err_tls[];             /* the TLS handshake failed (the certificate did not verify, ...) */
extern const char mp_err_send_timeout[];    /* the request could not be written in time */
extern const char mp_err_read_timeout[];    /* no response (head) in time */
extern const char mp_err_reset[];           /* the connection broke before a response head */
extern const char mp_err_invalid[];         /* the response head is not HTTP/1.x we accept */
extern const char mp_err_hook[];            /* a response hook failed on the head */

#endif
