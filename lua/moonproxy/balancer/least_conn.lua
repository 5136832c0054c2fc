-- moonproxy.balancer.least_conn: the server with the fewest in-flight requests
-- relative to its weight (active / weight); among equals, the first from a
-- round-robin cursor on, so idle servers take turns. The same sequence as
-- mp_pick_least_conn in src/balance.c. Interface: see round_robin.lua.
local _M = {}

local cursors = {} -- upstream name -> the least index to start the scan at

local function weight_of(s)
  local w = s.weight or 1
  return w < 1 and 1 or w
end

-- a carries less load than b (cross-multiplied: no division)
local function lighter(a, b)
  return (a.active or 0) * weight_of(b) < (b.active or 0) * weight_of(a)
end

function _M.pick(servers, _, upstream)
  local m = #servers
  if m == 0 then
    return nil
  end
  local name = upstream and upstream.name or ""
  local cursor = cursors[name] or 1
  local start = 1
  for i = 1, m do
    if (servers[i].index or i) >= cursor then
      start = i
      break
    end
  end
  local best, best_i = servers[start], start
  for step = 1, m - 1 do
    local i = (start + step - 1) % m + 1
    if lighter(servers[i], best) then
      best, best_i = servers[i], i
    end
  end
  cursors[name] = (best.index or best_i) + 1
  return best
end

return _M
