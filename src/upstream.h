/* upstream.h: one proxied exchange: pick a server, take a pooled connection
 * or connect, send the request head and stream the body (client → upstream),
 * parse the response head and stream the body back (upstream → client),
 * with back-pressure both ways, timeouts and retries. */
#ifndef MP_UPSTREAM_H
#define MP_UPSTREAM_H

#include "conn.h"

/* Starts forwarding r (routed to r->upstream). Ends in mp_conn_request_done
 * or mp_conn_fail/mp_conn_close on the client connection. */
void mp_upstream_start(mp_req_t *r);

/* The client socket became readable/writable while r is being proxied. */
void mp_upstream_on_client(mp_req_t *r, int revents);

/* The client connection's timer fired while r is being proxied. */
void mp_upstream_on_client_timeout(mp_req_t *r);

/* Drops r's upstream connection, if any (never pooled): the client went
 * away or the request failed. */
void mp_upstream_cancel(mp_req_t *r);

#endif
