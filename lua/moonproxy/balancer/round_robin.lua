-- moonproxy.balancer.round_robin: even round robin over the available servers,
-- in index order (the same sequence as mp_pick_round_robin in src/balance.c).
--
-- README: the balancer interface. Every module of lua/moonproxy/balancer (and
-- an operator's policy: a function of this shape, or a module { pick = it })
-- provides
--
--   pick(servers, req, upstream) -> server | nil
--
--   servers   the AVAILABLE servers of the upstream, in index order: the
--             healthy ones, or all of them when every one is down and the
--             upstream says fail_open. May be empty. Read-only objects with
--               addr      "host:port"
--               weight    1..1000
--               healthy   boolean (false only when failing open)
--               active    in-flight requests, all workers
--               latency   EWMA of response latency in ms; 0 = unknown
--               failures  consecutive passive failures
--               index     1-based position in the upstream's full list
--   req       the request object (req.headers, req.remote_addr, req.ctx, ...)
--   upstream  read-only { name = "api", hash_key = nil | "header:NAME" |
--             "cookie:NAME" | "ip" | function(req) -> string, servers = the
--             full list (available or not), same objects }. May be nil for a
--             policy called with two arguments: state then goes under "".
--
-- It returns one of `servers` (the object itself), or nil: the core answers
-- 503. A policy runs in each worker's VM; state it keeps in upvalues (keyed by
-- upstream.name) is per worker. Randomness comes from math.random.
local _M = {}

local cursors = {} -- upstream name -> the least index to try next

function _M.pick(servers, _, upstream)
  local m = #servers
  if m == 0 then
    return nil
  end
  local name = upstream and upstream.name or ""
  local cursor = cursors[name] or 1
  local s, idx = servers[1], servers[1].index or 1
  for i = 1, m do
    local k = servers[i].index or i
    if k >= cursor then
      s, idx = servers[i], k
      break
    end
  end
  cursors[name] = idx + 1
  return s
end

return _M
