-- api_gateway.lua: one public address in front of three services, each with
-- its own URL prefix, all behind API keys. Check it, then run it:
--   moonproxy -t -c examples/api_gateway.lua
--   moonproxy -c examples/api_gateway.lua
-- and try:
--   curl -i localhost:8080/users/42                                  # 401: no key
--   curl -i -H 'x-api-key: k-alice-7f3a' localhost:8080/users/42     # users gets GET /42
--   curl -i -H 'x-api-key: k-alice-7f3a' localhost:8080/health       # answered by the proxy
--
-- What it shows:
--   * prefix routes with strip_prefix: /users/42 reaches the users service as /42;
--   * a global plugin (key_auth) guarding every request, and what it leaves
--     for the hooks after it (req.ctx.consumer);
--   * route plugins: request_size on orders, rate_limit per API key on search;
--   * the order in which plugins and hooks run, and why it matters here;
--   * a route answered by the proxy itself (a handler, no upstream);
--   * X-Request-ID, which the proxy handles without any configuration.
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }

proxy.settings {
  workers = "auto",
  -- The process-wide ceiling on request bodies (413 beyond). It also covers
  -- chunked bodies, which have no Content-Length: the core counts them as they
  -- stream. The orders route below is stricter.
  max_body_size = "10m",
  access_log = "stdout",
}

-- The three services. Each is a named group of servers; list more addresses
-- to balance over several instances of one service.
local users = proxy.upstream "users" { servers = { "127.0.0.1:9001" }, keepalive = 32 }
local orders = proxy.upstream "orders" { servers = { "127.0.0.1:9002" }, keepalive = 32 }
local search = proxy.upstream "search" { servers = { "127.0.0.1:9003" }, keepalive = 32 }

-- API keys and who they belong to ("consumers"). In a real deployment read
-- them from a file here (the script is plain Lua: io.open works at load time)
-- rather than writing them into the configuration.
local KEYS = {
  ["k-alice-7f3a"] = "alice",
  ["k-bob-91cc"] = "bob",
  ["k-monitor-0d2e"] = "monitor", -- for the load balancer's health checks, see /health
}

-- A global plugin runs for EVERY request, before routing: a request without a
-- known key gets 401 with WWW-Authenticate, whatever its path (so a client
-- without a key cannot even tell which paths exist: it never sees a 404).
-- On success the plugin sets req.ctx.consumer to the key's consumer name.
--
-- hide_credentials stays false on purpose: the search route below rate-limits
-- on the x-api-key header, and route plugins run after global ones, so the
-- header must still be there when they run. The routes remove it themselves,
-- last, before forwarding (see drop_key).
proxy.plugin { "key_auth", keys = KEYS, header = "x-api-key", realm = "api" }

-- Global hooks run after the global plugins, still before routing. Tell the
-- services who is calling. Assigning a header replaces every field of that
-- name, so a client cannot smuggle in its own X-Consumer.
proxy.on_request(function(req)
  req.headers["x-consumer"] = req.ctx.consumer
end)

-- A route's on_request runs after the route's plugins: the last word before
-- the request leaves. The services never see the API key.
local function drop_key(req)
  req.headers["x-api-key"] = nil
end

-- The services. A prefix without a trailing "/" matches the path itself and
-- anything below it: /users and /users/42, not /usersfoo. strip_prefix removes
-- the prefix and keeps the leading "/": /users/42?x=1 reaches the users
-- service as /42?x=1, and /users as /.
proxy.route { name = "users", prefix = "/users", strip_prefix = true, upstream = users,
  on_request = drop_key }

-- request_size answers 413 before anything is forwarded when the declared
-- Content-Length is above max. (A chunked body declares no length: it is let
-- through here and only settings.max_body_size applies to it.)
proxy.route { name = "orders", prefix = "/orders", strip_prefix = true, upstream = orders,
  plugins = { { "request_size", max = "64k" } },
  on_request = drop_key }

-- rate_limit: a token bucket per API key, shared by all workers: bursts of up
-- to 5 requests, refilled at 2 per second. Over the limit the client gets 429
-- with Retry-After; allowed responses carry RateLimit-Limit/-Remaining/-Reset.
-- Each key has its own bucket, so one busy client does not slow the others,
-- and the limit is on search only: the same key is not limited on /users.
proxy.route { name = "search", prefix = "/search", strip_prefix = true, upstream = search,
  plugins = { { "rate_limit", rate = 2, burst = 5, key = "header:x-api-key" } },
  on_request = drop_key }

-- /health is answered by the proxy itself: a handler that responds, no
-- upstream. It is behind key_auth like everything else (a global plugin runs
-- before routing), so the health checker uses its own key, k-monitor-0d2e.
-- req.id is the request's id, the same value as the X-Request-ID header of
-- the response.
proxy.route { name = "health", path = "/health", method = { "GET", "HEAD" },
  handler = function(req)
    return req:respond(200, '{"status":"ok","request_id":"' .. req.id .. '"}\n',
      { ["content-type"] = "application/json", ["cache-control"] = "no-store" })
  end }

-- There is no catch-all: any other path, with a valid key, gets 404.

-- X-Request-ID needs no configuration. A client's X-Request-ID (1 to 128
-- characters from A-Za-z0-9._:-) is kept; otherwise the proxy makes one (32 hex
-- digits). Either way it is sent to the service and echoed in the response,
-- also on responses the proxy makes itself (401, 413, 429, /health), so a
-- client can quote it and the access log (field "id") finds the request.
