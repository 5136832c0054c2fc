/* l_request.h: the `req` and `res` objects hooks see (SPEC "The request and
 * response objects"), and the calls into a configuration's hook chains. */
#ifndef MP_L_REQUEST_H
#define MP_L_REQUEST_H

#include "balance.h"
#include "req.h"

typedef struct lua_State lua_State;

enum { MP_MT_REQ, MP_MT_RES, MP_MT_HEADERS, MP_MT_COUNT };

/* Creates the metatables of the objects hooks see in L (once per VM: a
 * generation keeps the references). */
void mp_l_request_setup(lua_State *L, int refs[MP_MT_COUNT]);

/* Outcome of running a chain: outcomes, not error codes (err.h says which set is for what). */
enum {
    MP_HOOK_NEXT = 0,      /* go on */
    MP_HOOK_RESPONDED = 1, /* a hook called req:respond: r->local_status is set */
    MP_HOOK_ERROR = -1,    /* a hook raised: logged with file:line; answer 500 */
    MP_HOOK_WAIT = 2,      /* the chain waits for a call-out: env->wake reports its end */
};

/* The chains run in coroutines (DESIGN "Hooks that call out"). Each returns
 * NEXT, RESPONDED or ERROR, or WAIT when the chain waits for a call-out:
 * r->env->wake(r, kind, rc) then reports how it ended, with what the
 * function would have returned, and nothing of r may change meanwhile
 * but what the owner watches (the client going away: mp_hook_abandon).
 * A chain that cannot wait (env->wake NULL) is refused its call-outs. */

/* Runs the global request chain (before routing). */
int mp_hook_pre(lua_State *L, mp_req_t *r, int ref);

/* Runs a route's request chain. For handler routes r->handler_up receives
 * the index the handler returned (-1 when it returned none). */
int mp_hook_route(lua_State *L, mp_req_t *r, const mp_route_hooks_t *h);

/* Runs a route's response chain on rh (the upstream's response head, which
 * must stay valid while the chain waits). */
int mp_hook_response(lua_State *L, mp_req_t *r, int ref, const mp_http_response_t *rh);

/* Runs the on_log chain once the response was sent. Errors are logged. */
int mp_hook_log(lua_State *L, mp_req_t *r, int ref);

/* For call-out bindings. The request whose chain runs in L, when L is that
 * chain's own coroutine and it may wait; else NULL with the reason (the
 * binding raises it). */
mp_req_t *mp_hook_caller(lua_State *L, const char **why);

/* mp_hook_caller's test of where L runs, alone: the simulator answers
 * call-outs itself, only where the server could make them. */
mp_req_t *mp_hook_context(lua_State *L, const char **why);

/* Suspends the chain until c is over: `return mp_hook_yield(L, r, c);`.
 * c->start runs once no Lua runs; the binding's caller (Lua) then takes the
 * answer with mp_hook_answer. */
int mp_hook_yield(lua_State *L, mp_req_t *r, mp_callout_t *c);

/* The call-out the running chain waited for, now over (the request still
 * owns it: a raise while its answer is pushed frees it with the request).
 * Raises when there is none. mp_hook_answered frees it once taken. */
mp_callout_t *mp_hook_answer(lua_State *L);
void mp_hook_answered(lua_State *L);

/* r's call-out is over: its chain goes on (and may wait again). */
void mp_hook_resume(mp_req_t *r);

/* r no longer waits for its chain: the call-out is cancelled and the
 * coroutine let go. Safe when nothing waits. */
void mp_hook_abandon(lua_State *L, mp_req_t *r);

/* Calls a Lua balancer pick(servers, req, upstream), with all the servers'
 * objects and the upstream the two values on top of the stack (replaced by
 * the result); the policy gets the list of the available ones (s[i].available,
 * navailable of n), made inside the protected call. */
int mp_hook_pick(lua_State *L, mp_req_t *r, int ref, const mp_pick_server_t *s, int n, int navailable);

/* Calls a hash_key function(req); leaves its result on the stack. */
int mp_hook_hash_key(lua_State *L, mp_req_t *r, int ref);

/* The request ended: its Lua objects become stale ("request finished"),
 * the arena and respond()'s body are released. Safe when no hook ran. */
void mp_hook_release(lua_State *L, mp_req_t *r);

/* The fields on_log (or any hook) put in req.log, rendered for the access
 * log line: ,"name":value for each string key of 1-64 characters from
 * [A-Za-z0-9_] that no built-in field has, whose value is a string, a
 * finite number or a boolean (others are skipped), at most cap bytes (a
 * field that does not fit is left out). Returns the length, 0 without any. */
size_t mp_hook_log_fields(lua_State *L, mp_req_t *r, char *out, size_t cap);

#endif
