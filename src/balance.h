/* balance.h: the built-in balancing policies as pure functions over an
 * array of servers (SPEC "Balancers"): no Lua, no I/O, no allocation per
 * pick. lua/moonproxy/balancer/{name}.lua are the reference implementations; both
 * give the same sequences (round_robin, weighted, least_conn), the same
 * distributions (p2c, ewma) and the same key mapping (chash). */
#ifndef MP_BALANCE_H
#define MP_BALANCE_H

#include "common.h"

#include <stdint.h>

/* One server as a policy sees it; the caller fills it before each pick. */
typedef struct {
    int weight;        /* 1..1000 (below 1 counts as 1) */
    int active;        /* in-flight requests, all workers; >= 0 */
    double latency;    /* EWMA of response latency in ms; <= 0: unknown */
    uint8_t available; /* the policy may pick it (healthy, or fail-open) */
} mp_pick_server_t;

/* The cost ewma gives a server whose latency is unknown, in ms: small, so
 * that a new server is tried soon and gets a real latency. */
#define MP_EWMA_DEFAULT_MS 1.0

/* Ring points per weight unit of a chash ring. ketama and nginx use 160, which
 * leaves one server in three more than 10% off its share for ~30% of address
 * sets; 640 keeps all three within 10% for ~99% of them. */
#define MP_CHASH_POINTS 640
/* A ring holds at most this many points; beyond, weights scale down. */
#define MP_CHASH_MAX_POINTS (1 << 20)
/* A ring has at most this many servers. */
#define MP_CHASH_MAX_SERVERS 65535

/* Every pick takes the n servers s[0..n-1] (n >= 0) and returns the index of
 * an available one, or -1 when none is available. The state pointer belongs
 * to the caller: one per upstream and worker, zeroed at start (a zeroed state
 * is valid; any value is valid for cursor and rng). */

/* Even round robin over the available servers, in index order. */
int mp_pick_round_robin(unsigned *cursor, const mp_pick_server_t *s, int n);

/* nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a.
 * current: n ints, zeroed at start and kept with the server list (the entry
 * of an unavailable server is left as is). */
int mp_pick_weighted(int *current, const mp_pick_server_t *s, int n);

/* The fewest active/weight; among equals, the first from *cursor on (so
 * idle servers take turns). */
int mp_pick_least_conn(unsigned *cursor, const mp_pick_server_t *s, int n);

/* Power of two choices: two distinct available servers at random, the one
 * with the lower active/weight wins (the first drawn on a tie). */
int mp_pick_p2c(uint64_t *rng, const mp_pick_server_t *s, int n);

/* p2c on cost = (latency, or MP_EWMA_DEFAULT_MS when unknown) * (active + 1) / weight. */
int mp_pick_ewma(uint64_t *rng, const mp_pick_server_t *s, int n);

/* Consistent hashing on a ketama-like ring.
 *
 * Server i gets MP_CHASH_POINTS * weights[i] points (when the total would pass
 * MP_CHASH_MAX_POINTS, max(1, weights[i] * MP_CHASH_MAX_POINTS / total_weight)
 * instead). Its points are the successive outputs of mp_rand64() seeded with
 * mp_hash64(addrs[i]), each giving two 32-bit points (high half, then low
 * half). Points sort by (point, the rank of the address in byte order, then
 * index), so the ring depends only on the (address, weight) pairs, not on
 * their order, and is the same in every process and after every reload. A
 * key goes to the first point >= the high 32 bits of its hash, clockwise.
 * Removing a server gives the same mapping as skipping its points, so a new
 * server takes only the keys that land on its own points. */
typedef struct mp_chash mp_chash_t;

/* A ring of the n servers (1 <= n <= MP_CHASH_MAX_SERVERS); addrs are copied
 * from (not kept), weights may be NULL (all 1). NULL when n is out of range
 * or out of memory. Free with mp_chash_free(). */
mp_chash_t *mp_chash_new(const char *const *addrs, const int *weights, int n);
void mp_chash_free(mp_chash_t *h); /* NULL is fine */

/* Servers and points in the ring. */
int mp_chash_servers(const mp_chash_t *h);
int mp_chash_points(const mp_chash_t *h);

/* The server of the first point clockwise from key_hash (a mp_hash64() of the
 * key) whose server is available; s and n as for the other picks, s[i] being
 * the ring's server i (a ring server >= n counts as unavailable). O(log
 * points) plus the points skipped. */
int mp_chash_pick(const mp_chash_t *h, uint64_t key_hash, const mp_pick_server_t *s, int n);

/* FNV-1a 64 over the bytes, then MurmurHash3's fmix64 finalizer. Stable across
 * platforms and processes; lua/moonproxy/balancer/chash.lua computes the same. */
uint64_t mp_hash64(const void *p, size_t n);

/* splitmix64: advances *state by 0x9e3779b97f4a7c15 and returns its mix. Any
 * state value is valid. */
uint64_t mp_rand64(uint64_t *state);

#endif
