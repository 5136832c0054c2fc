-- sticky_tenant.lua: a balancing policy of your own, written in Lua. Each
-- tenant (named by the X-Tenant header) sticks to one server, so that
-- server's caches hold that tenant's data; requests without a tenant, and a
-- tenant whose server is out of service, go to the least busy server.
-- Check it, then run it:
--   moonproxy -t -c examples/sticky_tenant.lua
--   moonproxy -c examples/sticky_tenant.lua
-- and try:
--   curl -i -H 'x-tenant: acme' localhost:8080/       # always the same server
--   curl -i localhost:8080/                           # the least busy server
--   curl -s localhost:8085/upstreams                  # each server's state
--
-- What it shows:
--   * balancer = function(servers, req, upstream): what a policy gets and
--     what it returns;
--   * passive health checks taking a failing server out, and the policy's
--     fallback taking over; the server coming back after its cooldown.
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }
proxy.admin { addr = "127.0.0.1:8085" }
proxy.settings { workers = "auto", access_log = "stdout" }

-- A string hash (31 * h + byte, kept below 2^32 so it stays exact in a Lua
-- number). Any function works as long as it depends on the tenant alone.
local function hash(s)
  local h = 0
  for i = 1, #s do
    h = (h * 31 + s:byte(i)) % 4294967296
  end
  return h
end

-- The least busy server: the fewest requests in flight (`active` counts them
-- in all workers). A Lua balancer may keep state between calls in upvalues
-- like `turn`; each worker has its own copy. Here it makes ties go round in
-- turn instead of always to the first server.
local turn = 0
local function least_active(servers)
  turn = turn + 1
  local best
  for k = 0, #servers - 1 do
    local s = servers[(turn + k) % #servers + 1]
    if not best or s.active < best.active then
      best = s
    end
  end
  return best
end

-- The policy. The core calls it for every request with:
--   servers   the AVAILABLE servers only (never one whose circuit is open or
--             that failed its active health checks), each { addr, weight,
--             healthy, active, latency, failures, index };
--   req       the request (headers, path, ...; read it, do not change it);
--   upstream  { name, hash_key, servers = ALL the servers, available or not }.
-- It returns one of `servers` (returning nil answers 503). When a retry is
-- due (the chosen server refused the connection), it is called again
-- without the server that failed.
--
-- The tenant's home is chosen among ALL the servers (upstream.servers), not
-- among the available ones: when one server is out, only its own tenants
-- move, and they come back to it when it recovers. Hashing over `servers`
-- instead would reshuffle many other tenants every time a server goes out.
local function by_tenant(servers, req, upstream)
  local tenant = req.headers["x-tenant"]
  if type(tenant) == "string" and tenant ~= "" then -- a repeated header is a list: no tenant
    local home = hash(tenant) % #upstream.servers + 1
    for _, s in ipairs(servers) do
      if s.index == home then -- index: the position in the upstream's list
        return s
      end
    end
    -- the home server is unavailable: fall through
  end
  return least_active(servers)
end

local app = proxy.upstream "app" {
  servers = { "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003" },
  balancer = by_tenant,
  -- Passive health: 3 failures in a row (refused connections, timeouts, or
  -- the answers listed in statuses), counted across all workers, open the
  -- server's circuit for `cooldown` seconds: the policy no longer sees it and
  -- its tenants fall back to the least busy server. The client still gets the
  -- failing answers that opened it (a 503 is a response: it is not retried).
  -- After the cooldown one trial request goes to the server: a success
  -- closes the circuit and its tenants return; a failure opens it again.
  passive = { failures = 3, cooldown = 10, statuses = { 502, 503, 504 } },
  -- A refused connection is retried at once on another server (the policy is
  -- asked again, without the failed one).
  retries = 1,
  timeouts = { connect = 2, read = 30 },
}

proxy.route { name = "app", prefix = "/", upstream = app }
