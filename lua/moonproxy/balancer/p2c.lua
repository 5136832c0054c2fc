-- moonproxy.balancer.p2c: power of two choices. Two distinct servers drawn at
-- random (math.random); the one with fewer in-flight requests relative to its
-- weight (active / weight) wins, the first drawn on a tie. The same
-- distribution as mp_pick_p2c in src/balance.c. Interface: see round_robin.lua.
local random = math.random

local _M = {}

local function weight_of(s)
  local w = s.weight or 1
  return w < 1 and 1 or w
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
  if (b.active or 0) * weight_of(a) < (a.active or 0) * weight_of(b) then
    return b
  end
  return a
end

return _M
