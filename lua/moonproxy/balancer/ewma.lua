-- moonproxy.balancer.ewma: power of two choices on a latency-aware cost,
--   cost = (latency, or DEFAULT_MS when unknown) * (active + 1) / weight,
-- latency being the EWMA of the server's response time in ms (0: unknown, so
-- a new server costs little and soon gets a real latency). The lower cost
-- wins, the first drawn on a tie. The same distribution as mp_pick_ewma in
-- src/balance.c. Interface: see round_robin.lua.
local random = math.random

local _M = {}

_M.DEFAULT_MS = 1.0 -- MP_EWMA_DEFAULT_MS

local function cost(s)
  local lat, w = s.latency or 0, s.weight or 1
  if not (lat > 0) then
    lat = _M.DEFAULT_MS
  end
  return lat * ((s.active or 0) + 1) / (w < 1 and 1 or w)
end

function _M.pick(servers)
  local m = #servers
  if m < 2 then
    return servers[1]
  end
  local x = random(m)
  local y = random(m - 1)
  if y >= x then
    y = y + 1
  end
  local a, b = servers[x], servers[y]
  if cost(b) < cost(a) then
    return b
  end
  return a
end

return _M
