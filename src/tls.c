/* tls.c: TLS contexts over OpenSSL 3 (tls.h). A listener's certificates,
 * one SSL_CTX each with the same settings, chosen by SNI; an upstream's
 * client context; the proxy's session-ticket keys; what a finished
 * handshake tells, and why a failed one failed. L0: no loop, no socket I/O
 * (io.c reads and writes through the sessions made here).
 *
 * Session tickets: the keys are the proxy's, process-wide (every worker's
 * contexts share them, and a reload keeps them), made with RAND_bytes. The
 * ticket callback makes a new key every TICKET_ROTATE_S (one hour) and keeps
 * the previous TICKET_KEYS - 1 (two): a ticket under one of those is still
 * accepted and renewed (a new ticket under the current key). So a ticket
 * resumes for at least (TICKET_KEYS - 1) * TICKET_ROTATE_S, which is also
 * the session lifetime the contexts announce (SSL_CTX_set_timeout). Those two
 * constants are the one place to change either. The keys are under a mutex:
 * any thread may issue, accept and rotate. The server session cache is off
 * (tickets only).
 *
 * Lifetime: mp_tls_server_t is reference-counted, one reference for the
 * configuration (mp_tls_server_free drops it) and one per session
 * (dropped by the SSL's ex_data free callback), because a connection
 * accepted before a reload may handshake after it, and the SNI callback
 * reads the certificate list. A client context's sessions use only its
 * SSL_CTX, which OpenSSL counts; the context itself is counted for callers
 * that keep it past the configuration's life (mp_tls_client_hold: the health
 * probes). The X509_STORE a client context verifies against is shared
 * (see "shared verification stores"): parsing ~150 system CAs per upstream
 * per worker per reload was most of a big configuration's load time and
 * memory.
 *
 * Errors: a handshake failure leaves OpenSSL's error queue filled;
 * mp_tls_plain_http must be asked before mp_tls_error, which empties it. */
#include "tls.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Session tickets (see the header comment). A test build may shorten the
 * period (-DTICKET_ROTATE_S=2) to see keys retire. */
#ifndef TICKET_ROTATE_S
#define TICKET_ROTATE_S 3600
#endif
#define TICKET_KEYS 3 /* the current key and the two before it */

/* Kernel TLS where OpenSSL and the kernel have it: static files then go out
 * with sendfile (io.c). Without the kernel's tls module OpenSSL silently
 * stays in user space. */
#ifdef SSL_OP_ENABLE_KTLS
#define SERVER_KTLS SSL_OP_ENABLE_KTLS
#else
#define SERVER_KTLS 0
#endif

/* Mozilla's "intermediate" TLS 1.2 set: forward secrecy, AEAD only. */
static const char default_ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";

static const unsigned char alpn_http11[] = "\x08http/1.1";

/* One certificate of a listener: its context and the names it covers. */
typedef struct {
    SSL_CTX *ctx;
    char **names; /* lowercased; "*.example.com" for a wildcard */
    size_t nnames;
} server_cert_t;

struct mp_tls_server {
    atomic_int refs;
    server_cert_t *certs; /* certs[0] is the default */
    size_t ncerts;
};

typedef struct ca_store ca_store_t;

struct mp_tls_client {
    atomic_int refs; /* the configuration's, and each mp_tls_client_hold */
    SSL_CTX *ctx;
    ca_store_t *store; /* the shared verification store it uses (one use), or NULL: its own or none */
    int verify;
    /* SHA-256 (hex) of the CA bundle's bytes ("system-" and that of the
     * system bundle file, "" for a store of its own) and of the client
     * certificate ("" for none): what mp_tls_client_key tells apart, also
     * across a reload that changed a file under the same path */
    char ca_digest[2 * SHA256_DIGEST_LENGTH + 8];
    char cert_digest[2 * SHA256_DIGEST_LENGTH + 1];
};

/* ---- ex_data indexes (process-wide, made once) ---- */

static int server_idx = -1; /* SSL -> mp_tls_server_t * (one reference) */
static int slot_idx = -1;   /* SSL -> SSL_SESSION ** (the caller's resumption slot) */
static pthread_once_t idx_once = PTHREAD_ONCE_INIT;

static void server_unref(mp_tls_server_t *s);

static void on_session_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    if (ptr)
        server_unref(ptr);
}

static void make_indexes(void)
{
    server_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, on_session_free);
    slot_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static int indexes_ready(void)
{
    pthread_once(&idx_once, make_indexes);
    return server_idx >= 0 && slot_idx >= 0;
}

/* ---- errors ---- */

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    ERR_clear_error();
    return MP_EINVAL;
}

/* OpenSSL's reason for the last failure, for a message ("no start line"). */
static const char *ossl_reason(void)
{
    const char *r = ERR_reason_error_string(ERR_peek_last_error());
    return r ? r : "unknown error";
}

/* Opens and closes path, so that a missing or unreadable file says so
 * rather than with OpenSSL's words. */
static int check_readable(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return fail(err, errlen, "%s: %s", path, strerror(errno));
    fclose(f);
    return 0;
}

/* ---- certificates ---- */

static void format_asn1_time(const ASN1_TIME *t, char *out, size_t len)
{
    struct tm tm;
    if (!ASN1_TIME_to_tm(t, &tm) || strftime(out, len, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(out, len, "(unreadable date)");
}

static int check_validity(X509 *x, const char *path, char *err, size_t errlen)
{
    char when[64];
    const ASN1_TIME *after = X509_get0_notAfter(x), *before = X509_get0_notBefore(x);
    if (X509_cmp_current_time(after) == 0 || X509_cmp_current_time(before) == 0)
        return fail(err, errlen, "%s: certificate has an unreadable validity date", path);
    if (X509_cmp_current_time(after) < 0) {
        format_asn1_time(after, when, sizeof(when));
        return fail(err, errlen, "%s: certificate expired on %s", path, when);
    }
    if (X509_cmp_current_time(before) > 0) {
        format_asn1_time(before, when, sizeof(when));
        return fail(err, errlen, "%s: certificate not valid before %s", path, when);
    }
    return 0;
}

static int no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1; /* an encrypted key cannot be read: the proxy never prompts */
}

/* Loads a certificate chain and its key into ctx, with the checks every
 * certificate gets: readable, PEM, valid now, key matching. */
static int load_pair(SSL_CTX *ctx, const mp_tls_pair_t *pair, char *err, size_t errlen)
{
    if (!pair->cert || !pair->key)
        return fail(err, errlen, "a certificate needs both cert and key");
    int rc = check_readable(pair->cert, err, errlen);
    if (rc == 0)
        rc = check_readable(pair->key, err, errlen);
    if (rc < 0)
        return rc;
    SSL_CTX_set_default_passwd_cb(ctx, no_password);
    if (SSL_CTX_use_certificate_chain_file(ctx, pair->cert) != 1)
        return fail(err, errlen, "%s: not a PEM certificate", pair->cert);
    rc = check_validity(SSL_CTX_get0_certificate(ctx), pair->cert, err, errlen);
    if (rc < 0)
        return rc;
    BIO *bio = BIO_new_file(pair->key, "r");
    EVP_PKEY *pkey = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL) : NULL;
    BIO_free(bio);
    if (!pkey)
        return fail(err, errlen, "%s: not a PEM private key (or an encrypted one)", pair->key);
    int ok = SSL_CTX_use_PrivateKey(ctx, pkey) == 1 && SSL_CTX_check_private_key(ctx) == 1;
    EVP_PKEY_free(pkey);
    if (!ok)
        return fail(err, errlen, "%s: key does not match the certificate %s", pair->key, pair->cert);
    return 0;
}

static char *lower_dup(const unsigned char *p, size_t len)
{
    char *s = malloc(len + 1);
    if (!s)
        return NULL;
    for (size_t i = 0; i < len; i++)
        s[i] = (char)tolower(p[i]);
    s[len] = '\0';
    return s;
}

static int add_name(server_cert_t *c, const unsigned char *p, size_t len)
{
    if (len == 0 || memchr(p, '\0', len))
        return 0; /* an empty or embedded-NUL name covers nothing */
    char **names = realloc(c->names, (c->nnames + 1) * sizeof(*names));
    if (!names)
        return MP_ENOMEM;
    c->names = names;
    if (!(names[c->nnames] = lower_dup(p, len)))
        return MP_ENOMEM;
    c->nnames++;
    return 0;
}

/* The leaf's names: its subjectAltName DNS entries, or its CN when it has
 * none (RFC 6125 6.4.4). */
static int collect_names(server_cert_t *c, X509 *x)
{
    int rc = 0;
    GENERAL_NAMES *sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; rc == 0 && i < sk_GENERAL_NAME_num(sans); i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
        if (gn->type == GEN_DNS)
            rc = add_name(c, ASN1_STRING_get0_data(gn->d.dNSName), (size_t)ASN1_STRING_length(gn->d.dNSName));
    }
    GENERAL_NAMES_free(sans);
    if (rc < 0 || c->nnames > 0)
        return rc;
    X509_NAME *subject = X509_get_subject_name(x);
    int at = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (at < 0)
        return 0;
    unsigned char *cn = NULL;
    int len = ASN1_STRING_to_UTF8(&cn, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at)));
    if (len > 0)
        rc = add_name(c, cn, (size_t)len);
    OPENSSL_free(cn);
    return rc;
}

/* ---- session tickets ---- */

typedef struct {
    unsigned char name[16];
    unsigned char aes[32];
    unsigned char hmac[32];
} ticket_key_t;

static struct {
    pthread_mutex_t lock;
    ticket_key_t keys[TICKET_KEYS]; /* keys[0] is the current one */
    int nkeys;                      /* 0 until the first ticket */
    time_t born;                    /* when keys[0] became current (CLOCK_MONOTONIC seconds) */
} tickets = {.lock = PTHREAD_MUTEX_INITIALIZER};

static time_t monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

/* Makes keys[0] current for now: one new key per period gone by (all new
 * after TICKET_KEYS periods). Under tickets.lock. */
static int rotate_locked(time_t now)
{
    int periods = tickets.nkeys == 0 ? TICKET_KEYS : (int)((now - tickets.born) / TICKET_ROTATE_S);
    if (periods <= 0)
        return 0;
    if (periods > TICKET_KEYS)
        periods = TICKET_KEYS;
    for (int i = 0; i < periods; i++) {
        ticket_key_t k;
        if (RAND_bytes(k.name, sizeof(k.name)) != 1 || RAND_bytes(k.aes, sizeof(k.aes)) != 1 ||
            RAND_bytes(k.hmac, sizeof(k.hmac)) != 1)
            return -1;
        memmove(&tickets.keys[1], &tickets.keys[0], (TICKET_KEYS - 1) * sizeof(k));
        tickets.keys[0] = k;
        if (tickets.nkeys < TICKET_KEYS)
            tickets.nkeys++;
    }
    /* Keep the schedule: the current key is as old as the time since its period began. */
    tickets.born = tickets.born == 0 || periods == TICKET_KEYS ? now : tickets.born + (time_t)periods * TICKET_ROTATE_S;
    return 0;
}

/* Copies out the key to issue under (enc) or the key named name (-1: none),
 * returning its age in keys (0: current). */
static int ticket_key(const unsigned char *name, ticket_key_t *out)
{
    int at = -1;
    pthread_mutex_lock(&tickets.lock);
    if (rotate_locked(monotonic_s()) == 0) {
        for (int i = 0; i < tickets.nkeys && at < 0; i++)
            if (!name || memcmp(name, tickets.keys[i].name, sizeof(tickets.keys[i].name)) == 0)
                at = i;
        if (at >= 0)
            *out = tickets.keys[at];
    }
    pthread_mutex_unlock(&tickets.lock);
    return at;
}

static int ticket_hmac(EVP_MAC_CTX *hctx, unsigned char *key)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, 32),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    return EVP_MAC_CTX_set_params(hctx, params);
}

/* SSL_CTX_set_tlsext_ticket_key_evp_cb: 1 issued / accepted, 2 accepted
 * under an older key (OpenSSL issues a new ticket), 0 no ticket issued or an
 * unknown key (a full handshake), -1 a failure decrypting. */
static int on_ticket_key(SSL *ssl, unsigned char key_name[16], unsigned char iv[EVP_MAX_IV_LENGTH],
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    (void)ssl;
    ticket_key_t k;
    int rc = enc ? 0 : -1; /* a ticket that cannot be made is not sent: the handshake goes on */
    if (enc) {
        if (ticket_key(NULL, &k) == 0 && RAND_bytes(iv, 16) == 1 &&
            EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv) == 1 && ticket_hmac(hctx, k.hmac) == 1) {
            memcpy(key_name, k.name, sizeof(k.name));
            rc = 1;
        }
    } else {
        int age = ticket_key(key_name, &k);
        if (age < 0)
            rc = 0;
        else if (ticket_hmac(hctx, k.hmac) == 1 && EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv) == 1)
            rc = age == 0 ? 1 : 2;
    }
    OPENSSL_cleanse(&k, sizeof(k));
    return rc;
}

/* ---- server contexts ---- */

static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                   unsigned int inlen, void *arg)
{
    (void)ssl, (void)arg;
    unsigned char *sel;
    if (SSL_select_next_proto(&sel, outlen, alpn_http11, sizeof(alpn_http11) - 1, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int covers(const char *pattern, const char *name)
{
    if (pattern[0] != '*' || pattern[1] != '.')
        return 0;
    const char *dot = strchr(name, '.');
    return dot && dot != name && strcmp(dot, pattern + 1) == 0; /* exactly one label before the suffix */
}

static SSL_CTX *choose_ctx(const mp_tls_server_t *s, const char *name)
{
    for (size_t i = 0; i < s->ncerts; i++)
        for (size_t j = 0; j < s->certs[i].nnames; j++)
            if (strcmp(s->certs[i].names[j], name) == 0)
                return s->certs[i].ctx;
    for (size_t i = 0; i < s->ncerts; i++)
        for (size_t j = 0; j < s->certs[i].nnames; j++)
            if (covers(s->certs[i].names[j], name))
                return s->certs[i].ctx;
    return s->certs[0].ctx;
}

static int on_servername(SSL *ssl, int *alert, void *arg)
{
    (void)alert;
    const mp_tls_server_t *s = arg;
    const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!sni)
        return SSL_TLSEXT_ERR_OK; /* the default certificate, which the session starts with */
    char name[256];
    size_t len = strlen(sni);
    if (len >= sizeof(name))
        return SSL_TLSEXT_ERR_OK; /* longer than a DNS name: nothing covers it */
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)tolower((unsigned char)sni[i]);
    SSL_CTX *ctx = choose_ctx(s, name);
    if (ctx != SSL_get_SSL_CTX(ssl) && !SSL_set_SSL_CTX(ssl, ctx))
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    return SSL_TLSEXT_ERR_OK;
}

/* What client certificates must verify against: one store and CA name list
 * for every context of a listener, and the session id context that ties a
 * resumed session to that CA set. */
typedef struct {
    X509_STORE *store;
    STACK_OF(X509_NAME) * names;
    unsigned char sid[SHA256_DIGEST_LENGTH];
} client_ca_t;

static int load_client_ca(client_ca_t *ca, const char *path, char *err, size_t errlen)
{
    int rc = check_readable(path, err, errlen);
    if (rc < 0)
        return rc;
    if (!(ca->store = X509_STORE_new()) || X509_STORE_load_file(ca->store, path) != 1)
        return fail(err, errlen, "%s: not a PEM CA bundle (%s)", path, ossl_reason());
    if (!(ca->names = SSL_load_client_CA_file(path)))
        return fail(err, errlen, "%s: no CA certificate in it", path);
    /* A resumed session skips verification: it must have been verified
     * against the same CAs, so the context is a digest of them. */
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1;
    STACK_OF(X509_OBJECT) *objs = X509_STORE_get0_objects(ca->store);
    for (int i = 0; ok && i < sk_X509_OBJECT_num(objs); i++) {
        X509 *x = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));
        unsigned char d[EVP_MAX_MD_SIZE];
        unsigned int dlen;
        ok = !x || (X509_digest(x, EVP_sha256(), d, &dlen) == 1 && EVP_DigestUpdate(md, d, dlen) == 1);
    }
    ok = ok && EVP_DigestFinal_ex(md, ca->sid, NULL) == 1;
    EVP_MD_CTX_free(md);
    return ok ? 0 : fail(err, errlen, "%s: cannot digest the CA bundle (%s)", path, ossl_reason());
}

static void client_ca_dispose(client_ca_t *ca)
{
    X509_STORE_free(ca->store);
    sk_X509_NAME_pop_free(ca->names, X509_NAME_free);
}

/* The modes every context has: an idle connection holds no buffers, and
 * io.c may write part of a buffer and retry from another address. */
static void set_modes(SSL_CTX *ctx)
{
    SSL_CTX_set_mode(ctx,
                     SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
}

static const unsigned char sid_plain[] = "moonproxy";

/* One listener context, for pair; every certificate's is built here, so
 * they differ only in the certificate. */
static SSL_CTX *server_ctx(const mp_tls_server_def_t *def, mp_tls_server_t *s, const client_ca_t *ca,
                           const mp_tls_pair_t *pair, server_cert_t *c, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        fail(err, errlen, "out of memory");
        return NULL;
    }
    int min = def->protocols & MP_TLS_V12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    int max = def->protocols & MP_TLS_V13 ? TLS1_3_VERSION : TLS1_2_VERSION;
    int rc = 0;
    if (!SSL_CTX_set_min_proto_version(ctx, min) || !SSL_CTX_set_max_proto_version(ctx, max))
        rc = fail(err, errlen, "protocols: OpenSSL refuses the set (%s)", ossl_reason());
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_COMPRESSION | SERVER_KTLS);
    set_modes(ctx);
    const char *ciphers = def->ciphers ? def->ciphers : default_ciphers;
    if (rc == 0 && SSL_CTX_set_cipher_list(ctx, ciphers) != 1)
        rc = fail(err, errlen, "ciphers: OpenSSL knows none of \"%s\"", ciphers);
    SSL_CTX_set_dh_auto(ctx, 1);
    SSL_CTX_set_alpn_select_cb(ctx, on_alpn, NULL);
    SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
    SSL_CTX_set_tlsext_servername_arg(ctx, s);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_timeout(ctx, (TICKET_KEYS - 1) * TICKET_ROTATE_S);
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on_ticket_key);
    if (rc == 0 && ca->store) {
        STACK_OF(X509_NAME) *names = SSL_dup_CA_list(ca->names);
        if (!names) {
            rc = fail(err, errlen, "out of memory");
        } else {
            SSL_CTX_set1_cert_store(ctx, ca->store);
            SSL_CTX_set_client_CA_list(ctx, names);
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
            SSL_CTX_set_session_id_context(ctx, ca->sid, sizeof(ca->sid));
        }
    } else if (rc == 0) {
        SSL_CTX_set_session_id_context(ctx, sid_plain, sizeof(sid_plain) - 1);
    }
    if (rc == 0)
        rc = load_pair(ctx, pair, err, errlen);
    if (rc == 0 && collect_names(c, SSL_CTX_get0_certificate(ctx)) < 0)
        rc = fail(err, errlen, "out of memory");
    if (rc < 0) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static void server_unref(mp_tls_server_t *s)
{
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < s->ncerts; i++) {
        SSL_CTX_free(s->certs[i].ctx);
        for (size_t j = 0; j < s->certs[i].nnames; j++)
            free(s->certs[i].names[j]);
        free(s->certs[i].names);
    }
    free(s->certs);
    free(s);
}

mp_tls_server_t *mp_tls_server_new(const mp_tls_server_def_t *def, char *err, size_t errlen)
{
    if (def->protocols == 0 || (def->protocols & ~(unsigned)(MP_TLS_V12 | MP_TLS_V13))) {
        fail(err, errlen, "protocols: only TLSv1.2 and TLSv1.3, at least one");
        return NULL;
    }
    if (!indexes_ready()) {
        fail(err, errlen, "out of memory");
        return NULL;
    }
    mp_tls_server_t *s = calloc(1, sizeof(*s));
    if (s)
        s->certs = calloc(def->nmore + 1, sizeof(*s->certs));
    if (!s || !s->certs) {
        free(s);
        fail(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&s->refs, 1);
    client_ca_t ca = {0};
    int rc = def->client_ca ? load_client_ca(&ca, def->client_ca, err, errlen) : 0;
    for (size_t i = 0; rc == 0 && i <= def->nmore; i++) {
        server_cert_t *c = &s->certs[s->ncerts];
        c->ctx = server_ctx(def, s, &ca, i == 0 ? &def->def : &def->more[i - 1], c, err, errlen);
        s->ncerts++; /* counted also when it failed: its names are freed with the rest */
        if (!c->ctx)
            rc = MP_EINVAL;
    }
    client_ca_dispose(&ca);
    if (rc < 0) {
        server_unref(s);
        return NULL;
    }
    return s;
}

void mp_tls_server_free(mp_tls_server_t *s)
{
    if (s)
        server_unref(s);
}

size_t mp_tls_server_digests(const mp_tls_server_t *s, char (*digest)[MP_TLS_DIGEST_LEN], const char **names,
                             size_t max)
{
    for (size_t i = 0; s && i < s->ncerts && i < max; i++) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int n = 0;
        X509 *x = SSL_CTX_get0_certificate(s->certs[i].ctx);
        digest[i][0] = '\0';
        if (x && X509_digest(x, EVP_sha256(), md, &n) == 1)
            for (unsigned int k = 0; k < n && 2 * k + 2 < MP_TLS_DIGEST_LEN; k++)
                snprintf(digest[i] + 2 * k, 3, "%02x", md[k]);
        names[i] = s->certs[i].nnames ? s->certs[i].names[0] : "";
    }
    return s ? s->ncerts : 0;
}

SSL *mp_tls_server_session(mp_tls_server_t *s, int fd)
{
    SSL *ssl = SSL_new(s->certs[0].ctx);
    if (!ssl)
        return NULL;
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    if (!SSL_set_ex_data(ssl, server_idx, s)) {
        server_unref(s);
        SSL_free(ssl);
        return NULL;
    }
    if (!SSL_set_fd(ssl, fd)) {
        SSL_free(ssl); /* drops the reference */
        return NULL;
    }
    SSL_set_accept_state(ssl);
    return ssl;
}

/* ---- client contexts ---- */

static void hex(const unsigned char *d, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The SHA-256 of a file's bytes, in hex. */
static int digest_file(const char *path, char *out, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = f && md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1;
    unsigned char buf[4096], d[SHA256_DIGEST_LENGTH];
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof(buf), f)) > 0)
        ok = EVP_DigestUpdate(md, buf, n) == 1;
    ok = ok && !ferror(f) && EVP_DigestFinal_ex(md, d, NULL) == 1;
    int saved = errno;
    if (f)
        fclose(f);
    EVP_MD_CTX_free(md);
    if (!ok)
        return fail(err, errlen, "%s: %s", path, f ? "cannot digest it" : strerror(saved));
    hex(d, sizeof(d), out);
    return 0;
}

/* A session the server handed out: a copy into the connection's slot,
 * replacing (and freeing) the one there. A copy, because the session given
 * is also the connection's, which SSL_free marks not resumable when the
 * connection ends without a close_notify exchange (an upstream closing an
 * idle connection, a reset): the ticket in it stays good. 0: OpenSSL keeps
 * its reference. */
static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    SSL_SESSION **slot = SSL_get_ex_data(ssl, slot_idx);
    SSL_SESSION *copy = slot ? SSL_SESSION_dup(sess) : NULL;
    if (copy) {
        SSL_SESSION_free(*slot);
        *slot = copy;
    }
    return 0;
}

void mp_tls_client_unslot(SSL *ssl)
{
    SSL_set_ex_data(ssl, slot_idx, NULL);
}

/* ---- shared verification stores ---- */

/* One X509_STORE per distinct CA set, shared by every client context that
 * verifies against it (all upstreams, all workers' generations): a CA file
 * is keyed by its path and the SHA-256 of its bytes, the system store by
 * the file and directory OpenSSL takes it from and that file's digest. So a
 * reload reuses an unchanged set and builds a new one for a changed file;
 * the store goes with the last context using it (each SSL_CTX holds its own
 * reference, so sessions still open keep theirs). Stores are loaded outside
 * the lock (a worker freeing a generation must not wait for a parse): the
 * first caller of a key inserts it still empty, and the others, which are
 * configuration builds, wait on stores_loaded. */
struct ca_store {
    ca_store_t *next;
    char *key;         /* what it is loaded from: "ca\nPATH\nDIGEST", "system\nDIR\nFILE\nDIGEST" */
    X509_STORE *store; /* the cache's reference; NULL while its first user loads it */
    int users;         /* client contexts using it, and callers waiting for it */
    int linked;        /* in the list: a failed load unlinks it, the last user frees it */
};

static pthread_mutex_t stores_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stores_loaded = PTHREAD_COND_INITIALIZER;
static ca_store_t *stores; /* newest first; under stores_lock */

/* Fills a new store; 0 or a negative MP_E* with a message in err. */
typedef int store_load_fn(X509_STORE *st, const void *arg, char *err, size_t errlen);

static void store_put(ca_store_t *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&stores_lock);
    int last = --e->users == 0;
    if (last && e->linked) {
        ca_store_t **p = &stores;
        while (*p != e)
            p = &(*p)->next;
        *p = e->next;
    }
    pthread_mutex_unlock(&stores_lock);
    if (!last)
        return;
    X509_STORE_free(e->store);
    free(e->key);
    free(e);
}

/* The store for key, loaded by load(arg) when no one has it yet: *out is
 * the entry (one use; store_put drops it). */
static int store_get(const char *key, store_load_fn *load, const void *arg, ca_store_t **out, char *err, size_t errlen)
{
    pthread_mutex_lock(&stores_lock);
    for (;;) {
        ca_store_t *e = stores;
        while (e && strcmp(e->key, key) != 0)
            e = e->next;
        if (!e)
            break;
        e->users++;
        while (!e->store && e->linked)
            pthread_cond_wait(&stores_loaded, &stores_lock);
        if (e->store) {
            pthread_mutex_unlock(&stores_lock);
            *out = e;
            return 0;
        }
        pthread_mutex_unlock(&stores_lock); /* its load failed: try ours, for our own message */
        store_put(e);
        pthread_mutex_lock(&stores_lock);
    }
    ca_store_t *e = calloc(1, sizeof(*e));
    if (e && !(e->key = strdup(key))) {
        free(e);
        e = NULL;
    }
    if (!e) {
        pthread_mutex_unlock(&stores_lock);
        return fail(err, errlen, "out of memory");
    }
    e->users = 1, e->linked = 1, e->next = stores, stores = e;
    pthread_mutex_unlock(&stores_lock);
    X509_STORE *st = X509_STORE_new();
    int rc = st ? load(st, arg, err, errlen) : fail(err, errlen, "out of memory");
    pthread_mutex_lock(&stores_lock);
    if (rc == 0) {
        e->store = st;
    } else {
        X509_STORE_free(st);
        ca_store_t **p = &stores;
        while (*p != e)
            p = &(*p)->next;
        *p = e->next;
        e->linked = 0;
    }
    pthread_cond_broadcast(&stores_loaded);
    pthread_mutex_unlock(&stores_lock);
    if (rc < 0) {
        store_put(e);
        return rc;
    }
    *out = e;
    return 0;
}

/* The newest loaded store whose key starts with prefix, or NULL: never
 * waits. */
static ca_store_t *store_peek(const char *prefix)
{
    size_t n = strlen(prefix);
    pthread_mutex_lock(&stores_lock);
    ca_store_t *e = stores;
    while (e && !(e->store && strncmp(e->key, prefix, n) == 0))
        e = e->next;
    if (e)
        e->users++;
    pthread_mutex_unlock(&stores_lock);
    return e;
}

/* A file's bytes (NUL-terminated, malloc'd: the caller frees them). */
static char *read_all(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t n = 0, cap = 0;
    char *buf = NULL;
    int bad = 0;
    for (;;) {
        if (n + 1 >= cap) {
            char *bigger = cap < (size_t)1 << 30 ? realloc(buf, cap = cap ? 2 * cap : 65536) : NULL;
            if (!bigger) {
                bad = ENOMEM;
                break;
            }
            buf = bigger;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) {
            bad = ferror(f) ? (errno ? errno : EIO) : 0;
            break;
        }
    }
    fclose(f);
    if (bad) {
        free(buf);
        fail(err, errlen, "%s: %s", path, strerror(bad));
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

typedef struct {
    const char *path;
    const char *bytes;
    size_t len;
} pem_src_t;

/* What X509_load_cert_crl_file does with a PEM file, from bytes read once:
 * the store is the very bundle that was digested. */
static int load_pem(X509_STORE *st, const void *arg, char *err, size_t errlen)
{
    const pem_src_t *src = arg;
    BIO *bio = BIO_new_mem_buf(src->bytes, (int)(src->len < INT32_MAX ? src->len : INT32_MAX));
    STACK_OF(X509_INFO) *infos = bio ? PEM_X509_INFO_read_bio(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    int ok = infos != NULL, n = 0;
    for (int i = 0; ok && i < sk_X509_INFO_num(infos); i++) {
        X509_INFO *it = sk_X509_INFO_value(infos, i);
        if (it->x509)
            ok = X509_STORE_add_cert(st, it->x509) == 1, n++;
        if (ok && it->crl)
            ok = X509_STORE_add_crl(st, it->crl) == 1, n++;
    }
    sk_X509_INFO_pop_free(infos, X509_INFO_free);
    if (ok && n == 0) {
        ERR_raise(ERR_LIB_X509, X509_R_NO_CERTIFICATE_OR_CRL_FOUND);
        ok = 0;
    }
    return ok ? 0 : fail(err, errlen, "%s: not a PEM CA bundle (%s)", src->path, ossl_reason());
}

static int load_system(X509_STORE *st, const void *arg, char *err, size_t errlen)
{
    (void)arg;
    return X509_STORE_set_default_paths(st) == 1
               ? 0
               : fail(err, errlen, "cannot load the system CA store (%s)", ossl_reason());
}

/* Where OpenSSL takes the system store from (X509_STORE_set_default_paths:
 * SSL_CERT_DIR, SSL_CERT_FILE, else the built-in places), as the start of
 * its key: "system\nDIR\nFILE\n". */
static const char *system_prefix(char *buf, size_t len, const char **file)
{
    const char *dir = getenv(X509_get_default_cert_dir_env());
    *file = getenv(X509_get_default_cert_file_env());
    if (!*file)
        *file = X509_get_default_cert_file();
    snprintf(buf, len, "system\n%s\n%s\n", dir ? dir : X509_get_default_cert_dir(), *file);
    return buf;
}

static int attach(mp_tls_client_t *c, ca_store_t *e)
{
    c->store = e;
    SSL_CTX_set1_cert_store(c->ctx, e->store);
    return 0;
}

/* tls.ca: the file's store, and its digest for mp_tls_client_key. */
static int use_ca_file(mp_tls_client_t *c, const char *path, char *err, size_t errlen)
{
    pem_src_t src = {.path = path};
    char *bytes = read_all(path, &src.len, err, errlen);
    if (!bytes)
        return MP_EINVAL;
    src.bytes = bytes;
    unsigned char d[SHA256_DIGEST_LENGTH];
    int rc = EVP_Digest(bytes, src.len, d, NULL, EVP_sha256(), NULL) == 1
                 ? 0
                 : fail(err, errlen, "%s: cannot digest it (%s)", path, ossl_reason());
    ca_store_t *e = NULL;
    if (rc == 0) {
        hex(d, sizeof(d), c->ca_digest);
        size_t klen = strlen(path) + sizeof(c->ca_digest) + 8;
        char *key = malloc(klen);
        if (!key)
            rc = fail(err, errlen, "out of memory");
        else
            snprintf(key, klen, "ca\n%s\n%s", path, c->ca_digest);
        if (rc == 0)
            rc = store_get(key, load_pem, &src, &e, err, errlen);
        free(key);
    }
    free(bytes);
    return rc == 0 ? attach(c, e) : rc;
}

/* The system store, shared; a bundle file that changed (or appeared, or
 * went) since a store was loaded gets a new one. */
static int use_system_store(mp_tls_client_t *c, char *err, size_t errlen)
{
    char key[PATH_MAX * 2 + 2 * SHA256_DIGEST_LENGTH + 32], digest[2 * SHA256_DIGEST_LENGTH + 1], ignored[16];
    const char *file;
    system_prefix(key, sizeof(key), &file);
    if (digest_file(file, digest, ignored, sizeof(ignored)) < 0)
        snprintf(digest, sizeof(digest), "-"); /* OpenSSL too does without it */
    size_t n = strlen(key);
    snprintf(key + n, sizeof(key) - n, "%s", digest);
    snprintf(c->ca_digest, sizeof(c->ca_digest), "system-%s", digest);
    ca_store_t *e = NULL;
    int rc = store_get(key, load_system, NULL, &e, err, errlen);
    return rc == 0 ? attach(c, e) : rc;
}

/* lazy_store (https URLs): a system store some upstream already shares,
 * when there is one (every CA in memory: no file read at handshake time,
 * no second copy); else its own, from the hashed directory, each CA read
 * when a handshake first needs it (SSL_CERT_FILE, when set, loads now). */
static int use_lazy_store(mp_tls_client_t *c, char *err, size_t errlen)
{
    char prefix[PATH_MAX * 2 + 16];
    const char *file;
    ca_store_t *e = store_peek(system_prefix(prefix, sizeof(prefix), &file));
    if (e)
        return attach(c, e);
    const char *env_file = getenv(X509_get_default_cert_file_env());
    const char *dir = getenv(X509_get_default_cert_dir_env());
    if (env_file && *env_file && SSL_CTX_load_verify_file(c->ctx, env_file) != 1)
        return fail(err, errlen, "%s (SSL_CERT_FILE): not a PEM CA bundle (%s)", env_file, ossl_reason());
    if (SSL_CTX_load_verify_dir(c->ctx, dir && *dir ? dir : X509_get_default_cert_dir()) != 1)
        return fail(err, errlen, "cannot use the system CA directory (%s)", ossl_reason());
    return 0;
}

mp_tls_client_t *mp_tls_client_new(const mp_tls_client_def_t *def, char *err, size_t errlen)
{
    if (!indexes_ready()) {
        fail(err, errlen, "out of memory");
        return NULL;
    }
    mp_tls_client_t *c = calloc(1, sizeof(*c));
    if (c)
        c->ctx = SSL_CTX_new(TLS_client_method());
    if (!c || !c->ctx) {
        free(c);
        fail(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&c->refs, 1);
    c->verify = def->verify;
    SSL_CTX *ctx = c->ctx;
    int rc = 0;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Not SSL_OP_IGNORE_UNEXPECTED_EOF: a server that closes without
     * close_notify may have cut its response, and one read until close is
     * whole only after the alert (RFC 9112 §9.8): such an EOF is an error. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    set_modes(ctx);
    if (SSL_CTX_set_alpn_protos(ctx, alpn_http11, sizeof(alpn_http11) - 1) != 0)
        rc = fail(err, errlen, "out of memory");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
    SSL_CTX_set_verify(ctx, def->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (rc == 0 && def->ca)
        rc = use_ca_file(c, def->ca, err, errlen);
    else if (rc == 0 && def->verify && def->lazy_store)
        rc = use_lazy_store(c, err, errlen);
    else if (rc == 0 && def->verify)
        rc = use_system_store(c, err, errlen);
    if (rc == 0 && (def->cert || def->key)) {
        mp_tls_pair_t pair = {def->cert, def->key};
        rc = load_pair(ctx, &pair, err, errlen);
        unsigned char d[SHA256_DIGEST_LENGTH];
        unsigned int dlen = 0;
        if (rc == 0 && X509_digest(SSL_CTX_get0_certificate(ctx), EVP_sha256(), d, &dlen) != 1)
            rc = fail(err, errlen, "%s: cannot digest it (%s)", pair.cert, ossl_reason());
        if (rc == 0)
            hex(d, dlen, c->cert_digest);
    }
    if (rc < 0) {
        mp_tls_client_free(c);
        return NULL;
    }
    return c;
}

mp_tls_client_t *mp_tls_client_hold(mp_tls_client_t *c)
{
    if (c)
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    return c;
}

void mp_tls_client_free(mp_tls_client_t *c)
{
    if (!c || atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
        return;
    SSL_CTX_free(c->ctx); /* sessions still open hold their own reference, and so to the store */
    store_put(c->store);
    free(c);
}

const char *mp_tls_client_key(const mp_tls_client_t *c, const char *name, char *buf, size_t len)
{
    snprintf(buf, len, "verify=%d ca=%s cert=%s name=%s", c->verify, c->ca_digest[0] ? c->ca_digest : "system",
             c->cert_digest[0] ? c->cert_digest : "none", name ? name : "(host)");
    return buf;
}

const char *mp_tls_server_name(const char *name, const char *addr, char *buf, size_t len)
{
    if (name)
        return name;
    const char *port = strrchr(addr, ':');
    size_t n = port ? (size_t)(port - addr) : strlen(addr);
    if (n >= 2 && addr[0] == '[' && addr[n - 1] == ']')
        addr++, n -= 2;
    snprintf(buf, len, "%.*s", (int)n, addr);
    return buf;
}

static int is_ip_literal(const char *name)
{
    unsigned char addr[16];
    return inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1;
}

SSL *mp_tls_client_session(mp_tls_client_t *c, int fd, const char *name, SSL_SESSION **slot)
{
    SSL *ssl = SSL_new(c->ctx);
    if (!ssl)
        return NULL;
    int ok = SSL_set_fd(ssl, fd) && SSL_set_ex_data(ssl, slot_idx, slot);
    if (ok && name && is_ip_literal(name)) {
        ok = !c->verify || X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name);
    } else if (ok && name) {
        ok = SSL_set_tlsext_host_name(ssl, name) && (!c->verify || SSL_set1_host(ssl, name));
        SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS); /* "f*.example.com" covers nothing */
    }
    if (ok && slot && *slot) {
        /* A copy again: OpenSSL marks the session a connection resumed
         * not resumable, and a server that sends no new ticket after a
         * resumption (OpenSSL's own, under a current key) leaves the slot
         * with that one. The ticket in it stays good for the next one. */
        SSL_SESSION *copy = SSL_SESSION_dup(*slot);
        ok = copy && SSL_set_session(ssl, copy);
        SSL_SESSION_free(copy);
    }
    if (!ok) {
        SSL_free(ssl);
        return NULL;
    }
    SSL_set_connect_state(ssl);
    return ssl;
}

void mp_tls_session_free(SSL_SESSION **slot)
{
    if (slot && *slot) {
        SSL_SESSION_free(*slot);
        *slot = NULL;
    }
}

/* ---- after a handshake ---- */

void mp_tls_info(SSL *ssl, mp_tls_info_t *info, char *buf, size_t len)
{
    info->version = SSL_get_version(ssl);
    info->cipher = SSL_get_cipher_name(ssl);
    info->sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    info->client_subject = NULL;
    info->resumed = SSL_session_reused(ssl);
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (!peer || len == 0)
        return;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio && X509_NAME_print_ex(bio, X509_get_subject_name(peer), 0, XN_FLAG_RFC2253) >= 0) {
        int n = BIO_read(bio, buf, (int)(len - 1 < INT32_MAX ? len - 1 : INT32_MAX));
        buf[n > 0 ? n : 0] = '\0';
        info->client_subject = buf;
    }
    BIO_free(bio);
}

int mp_tls_plain_http(SSL *ssl)
{
    (void)ssl; /* the queue is the thread's; the session is named for the caller's clarity */
    unsigned long errs[] = {ERR_peek_error(), ERR_peek_last_error()};
    for (size_t i = 0; i < MP_ARRAY_LEN(errs); i++) {
        int reason = ERR_GET_REASON(errs[i]);
        if (ERR_GET_LIB(errs[i]) == ERR_LIB_SSL &&
            (reason == SSL_R_HTTP_REQUEST || reason == SSL_R_HTTPS_PROXY_REQUEST))
            return 1;
    }
    return 0;
}

const char *mp_tls_error(SSL *ssl, char *buf, size_t len)
{
    long v = SSL_get_verify_result(ssl);
    if (v != X509_V_OK && (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER)) {
        snprintf(buf, len, "certificate verify failed: %s", X509_verify_cert_error_string(v));
        ERR_clear_error();
        return buf;
    }
    unsigned long e = ERR_get_error();
    if (e) {
        ERR_error_string_n(e, buf, len);
        ERR_clear_error();
        return buf;
    }
    snprintf(buf, len, "connection closed");
    return buf;
}

void mp_tls_clear_errors(void)
{
    ERR_clear_error();
}
