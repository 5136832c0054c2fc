/* listener.h: listening sockets (one per worker per address, SO_REUSEPORT,
 * so the kernel spreads connections) and accepting on them. */
#ifndef MP_LISTENER_H
#define MP_LISTENER_H

#include "config.h"
#include "worker.h"

/* Opens a non-blocking listening socket on a. When a's port is 0 the
 * chosen port is written back into a, so that the next sockets for the same
 * address (other workers) share it. Returns the fd or MP_EIO (errno set). */
int mp_listener_open(mp_addr_t *a);

/* Client connections leave the last descriptors below RLIMIT_NOFILE (limit;
 * 0: none) to upstream sockets, probes and the admin port. Called once,
 * before the workers start. */
void mp_listener_fd_limit(long long limit);

/* Starts accepting on w->listeners. */
void mp_listener_start(mp_worker_t *w);

/* Stops accepting: accepts what is already queued, then closes. */
void mp_listener_close(mp_worker_t *w);

/* Watches the listeners, or not, as the worker's state says: stopping,
 * paused at max_connections (mp_worker_accept_pause), backing off after
 * EMFILE, stuck in a hook. */
void mp_listener_sync(mp_worker_t *w);

/* listen(2) again on sockets the watchdog shut down (which left them bound
 * but out of the SO_REUSEPORT group). Returns 0 or MP_EIO (errno set). */
int mp_listener_relisten(mp_worker_t *w);

#endif
