-- moonproxy.balancer.weighted: nginx's smooth weighted round robin (weights
-- 5, 1, 1 give a a b a c a a), the same sequence as mp_pick_weighted in
-- src/balance.c. Interface: see round_robin.lua.
--
-- Each pick adds every available server's weight to its current weight, takes
-- the server with the highest current weight (the first on a tie) and
-- subtracts the total from it. Current weights are kept per upstream name and
-- server index; an unavailable server's is left as is.
local _M = {}

local currents = {} -- upstream name -> { [index] = current weight }

function _M.pick(servers, _, upstream)
  local name = upstream and upstream.name or ""
  local cur = currents[name]
  if not cur then
    cur = {}
    currents[name] = cur
  end
  local best, best_k, best_c, total = nil, nil, 0, 0
  for i = 1, #servers do
    local s = servers[i]
    local k, w = s.index or i, s.weight or 1
    if w < 1 then
      w = 1
    end
    local c = (cur[k] or 0) + w
    cur[k] = c
    total = total + w
    if not best or c > best_c then
      best, best_k, best_c = s, k, c
    end
  end
  if best then
    cur[best_k] = best_c - total
  end
  return best
end

return _M
