/* tls.h: TLS contexts over OpenSSL 3 (L0: no loop, no socket I/O): the
 * certificates of a listener (chosen by SNI) with their protocols, ciphers,
 * client CA and session tickets; an upstream's client context (verify, CA,
 * client certificate, sessions to resume); and what a finished handshake
 * tells (mp_tls_info_t). The transport that reads and writes through a
 * session is io.c's (mp_io_tls). Contexts are built when a configuration
 * loads (start, -t, reload, the simulator) and are immutable after that; any
 * thread may make sessions from them. */
#ifndef MP_TLS_H
#define MP_TLS_H

#include "common.h"

#include <stddef.h>

typedef struct ssl_st SSL;                 /* <openssl/ssl.h> */
typedef struct ssl_session_st SSL_SESSION; /* <openssl/ssl.h> */

/* Protocol versions (bits). */
enum { MP_TLS_V12 = 1, MP_TLS_V13 = 2 };

typedef struct {
    const char *cert; /* PEM file: the leaf, then its chain */
    const char *key;  /* PEM private key of the leaf */
} mp_tls_pair_t;

/* A listener's TLS (SPEC "TLS"). Paths are as the configuration resolved
 * them (relative to the script's folder already). */
typedef struct {
    mp_tls_pair_t def;         /* the default certificate: no SNI, or a name no certificate covers */
    const mp_tls_pair_t *more; /* more certificates, chosen by SNI against their names */
    size_t nmore;
    unsigned protocols;    /* MP_TLS_V12 | MP_TLS_V13 (never 0) */
    const char *ciphers;   /* OpenSSL cipher list for TLS 1.2, or NULL: the default set */
    const char *client_ca; /* PEM bundle: clients must present a certificate it signed; NULL: none asked */
} mp_tls_server_def_t;

typedef struct mp_tls_server mp_tls_server_t;

/* Loads every certificate and key of def and builds the contexts. A file
 * that is missing or unreadable, a key that does not match its
 * certificate, a certificate that is expired or not yet valid, an unknown
 * protocol set or cipher list: NULL with a message in err (no file:line;
 * the caller adds it), e.g. "certs/site.pem: certificate expired on
 * 2026-01-01 00:00:00 UTC". */
mp_tls_server_t *mp_tls_server_new(const mp_tls_server_def_t *def, char *err, size_t errlen);

/* Drops the configuration's hold; sessions made from it keep what they use
 * (OpenSSL reference counts), so a reload never cuts a connection. NULL: a
 * no-op. */
void mp_tls_server_free(mp_tls_server_t *s);

/* The SHA-256 (hex) of each certificate's leaf, the default first, with
 * its first name (or ""): at most max, returns how many there are. For a
 * reload's preview (reload.h). */
#define MP_TLS_DIGEST_LEN 65
size_t mp_tls_server_digests(const mp_tls_server_t *s, char (*digest)[MP_TLS_DIGEST_LEN], const char **names,
                             size_t max);

/* A server session for the accepted socket fd (accept state: the handshake
 * runs within the first reads), or NULL when out of memory. */
SSL *mp_tls_server_session(mp_tls_server_t *s, int fd);

/* An upstream's TLS (SPEC "TLS": tls = { verify, ca, server_name, cert, key }). */
typedef struct {
    int verify;             /* check the server's certificate and name */
    const char *ca;         /* PEM bundle to verify against; NULL: the system store */
    const char *cert, *key; /* a client certificate (both or neither) */
    int lazy_store;         /* the system store as some upstream already shares it, else one from its
                             * hashed directory, each CA read when first needed, instead of the whole
                             * bundle now (SSL_CERT_FILE, when set, still loads now) */
} mp_tls_client_def_t;

typedef struct mp_tls_client mp_tls_client_t;

/* Loads ca and cert/key (the same checks as the server's). NULL with a
 * message in err. The store verified against is shared: one per CA file
 * (path and content) and one for the system store, across upstreams,
 * workers and generations, loaded by the first context that needs it
 * (another caller needing it meanwhile waits) and freed with the last. Any
 * thread may call it. */
mp_tls_client_t *mp_tls_client_new(const mp_tls_client_def_t *def, char *err, size_t errlen);

void mp_tls_client_free(mp_tls_client_t *c);

/* What c verifies and presents, with the name (NULL: each server's host),
 * as a string in buf (len bytes): two upstream definitions whose keys
 * differ must not share pooled connections. Returns buf. */
const char *mp_tls_client_key(const mp_tls_client_t *c, const char *name, char *buf, size_t len);

/* A client session for the connected socket fd, sending SNI name (unless it
 * is an IP literal) and, when verifying, checking the certificate against
 * name (host name or IP address). *slot is where sessions the server hands
 * out are kept for resumption (one per server and thread: no lock): the
 * session in it is offered, and a newer one replaces it (the old one is
 * freed). slot must outlive the session's connection; free it with
 * mp_tls_session_free. NULL when out of memory. */
SSL *mp_tls_client_session(mp_tls_client_t *c, int fd, const char *name, SSL_SESSION **slot);

/* The session's connection outlives its slot (a tunnel keeps it after the
 * pool it came from may be gone): session tickets it still receives are
 * dropped from now on. */
void mp_tls_client_unslot(SSL *ssl);

void mp_tls_session_free(SSL_SESSION **slot);

/* One more hold on c, for a caller that keeps it past its configuration (a
 * health probe between reloads); mp_tls_client_free drops a hold, the last
 * one frees c. Returns c (NULL: a no-op). */
mp_tls_client_t *mp_tls_client_hold(mp_tls_client_t *c);

/* The name a server is verified against and sent as SNI: name when set (an
 * upstream's tls.server_name), else the host of addr ("host:port",
 * "[v6]:port"), written into buf. */
const char *mp_tls_server_name(const char *name, const char *addr, char *buf, size_t len);

/* What a finished handshake tells, for req.tls and the access log. The
 * strings live as long as the session (client_subject: until the next call
 * on the same buffer). */
typedef struct {
    const char *version;        /* "TLSv1.3" */
    const char *cipher;         /* "TLS_AES_128_GCM_SHA256" */
    const char *sni;            /* the name the client asked for, or NULL */
    const char *client_subject; /* the client certificate's subject (RFC 2253), or NULL */
    int resumed;                /* the session was resumed */
} mp_tls_info_t;

/* Fills info from a session whose handshake is done; client_subject (the
 * peer certificate's subject) is written into buf (len bytes, truncated),
 * or left NULL when len is 0. */
void mp_tls_info(SSL *ssl, mp_tls_info_t *info, char *buf, size_t len);

/* Why the last failed call on ssl failed, for a log line: the verify
 * result when the peer's certificate did not verify ("certificate verify
 * failed: self-signed certificate"), else OpenSSL's error queue (which it
 * clears), else "connection closed". */
const char *mp_tls_error(SSL *ssl, char *buf, size_t len);

/* Whether the last failed call on ssl (a server session's handshake) failed
 * because the client spoke plain HTTP on the TLS port (OpenSSL's
 * SSL_R_HTTP_REQUEST, or SSL_R_HTTPS_PROXY_REQUEST for CONNECT): the caller
 * answers it with a plain-text 400. It reads the error queue, so ask it
 * before mp_tls_error (which clears the queue). */
int mp_tls_plain_http(SSL *ssl);

/* Clears the calling thread's OpenSSL error queue. */
void mp_tls_clear_errors(void);

#endif
