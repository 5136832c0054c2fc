-- hooks.lua: changing requests and responses with Lua hooks. Check it, then
-- run it:
--   moonproxy -t -c examples/hooks.lua
--   moonproxy -c examples/hooks.lua
-- and try:
--   curl -i localhost:8080/anything          # response headers cleaned and added
--   curl -i localhost:8080/old/items/42      # the backend gets /items/42
--   curl -s localhost:8080/_stats            # counters kept by the log hook
-- then set MAINTENANCE = true below and reload (kill -HUP <pid>, or
-- curl -X POST localhost:8085/reload): every page answers 503, except for
-- staff sending the bypass header.
--
-- What it shows:
--   * proxy.on_request: header rewrites, and answering at once with
--     req:respond (no upstream is contacted);
--   * req.ctx: one table per request, shared by all its hooks;
--   * a route's rewrite (regex captures) and on_response;
--   * proxy.on_response: response header rewrites for every response;
--   * proxy.on_log: bookkeeping after the response was sent, into a shared
--     dictionary that every worker writes and a reload keeps.
--
-- The order for one request: proxy.on_request hooks (in declaration order),
-- then routing, then the route's rewrite, plugins, on_request and handler;
-- then the upstream; on the response head: proxy.on_response hooks, then the
-- route's on_response; on_log once the response was sent. A response made
-- with req:respond goes through the response hooks too.
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }
proxy.admin { addr = "127.0.0.1:8085" } -- for POST /reload
proxy.settings { workers = "auto", access_log = "stdout" }

-- The maintenance switch: the script runs again at every reload, so changing
-- this line and reloading is all it takes. No connection is dropped.
local MAINTENANCE = false
-- Staff send this in X-Maintenance-Bypass to use the site meanwhile.
local BYPASS = "staff-7c1e"
-- Paths that stay open during maintenance (the orchestrator's health check,
-- the counters).
local ALWAYS_OPEN = { ["/healthz"] = true, ["/_stats"] = true }

local app = proxy.upstream "app" { servers = { "127.0.0.1:9001" } }

-- Counters for on_log. A shared dictionary: one for all workers, kept
-- across reloads (a plain Lua table would be per worker and reset by a
-- reload).
local stats = proxy.shared("stats", "1m")

-- Every request, before routing.
proxy.on_request(function(req)
  -- req.ctx lives as long as the request, across all its hooks: remember
  -- when it started, for the response and log hooks below.
  req.ctx.started = proxy.now()

  -- Read the bypass header, then remove it: assigning nil removes a header,
  -- so the application never sees the token. Header names are
  -- case-insensitive.
  local staff = req.headers["x-maintenance-bypass"] == BYPASS
  req.headers["x-maintenance-bypass"] = nil

  -- Answer at once: `return req:respond(status, body, headers)` skips the
  -- rest of the chain (routing, route hooks) and contacts no upstream.
  if MAINTENANCE and not staff and not ALWAYS_OPEN[req.path] then
    return req:respond(503, "Down for maintenance, back soon.\n", {
      ["content-type"] = "text/plain", ["retry-after"] = "300", ["cache-control"] = "no-store" })
  end

  -- Request header rewrites: what the upstream receives.
  req.headers["x-real-ip"] = req.remote_addr   -- set: replaces any value the client sent
  req.headers["x-debug"] = nil                 -- clients cannot switch on the backend's debugging
  if req.headers["accept-language"] == nil then
    req.headers["accept-language"] = "en"      -- a default
  end
end)

-- Every response head, before it is sent (responses made by req:respond
-- included). Response hooks read the request and change the response; they
-- may not call req:respond, req:set_path or req:set_query: a configuration
-- doing so is refused when it loads, at that line.
proxy.on_response(function(req, res)
  res.headers["server"] = nil         -- do not advertise the backend's software
  res.headers["x-powered-by"] = nil
  res.headers["x-content-type-options"] = "nosniff"
  res.headers["x-response-time"] = string.format("%.1fms", (proxy.now() - req.ctx.started) * 1000)
end)

-- After the response was sent: nothing can change it any more, so this is the
-- place for bookkeeping. res.status is what the client got.
proxy.on_log(function(req, res)
  stats:incr(math.floor(res.status / 100) .. "xx", 1, 0) -- "2xx", "5xx", ...; created at 0
  if req.ctx.legacy then
    stats:incr("legacy", 1, 0)
  end
  if proxy.now() - req.ctx.started > 0.5 then
    stats:incr("slow", 1, 0)
  end
end)

-- Old URLs, /old/items/42, now served as /items/42. rewrite gets the regex
-- captures (m[1]; m[0] is the whole match) and runs before the route's other
-- hooks; req:set_path changes what the upstream receives (the query string
-- is kept). It also notes the hit in req.ctx, read by on_response and on_log.
proxy.route { name = "legacy", regex = [[^/old/items/(\d+)$]], upstream = app,
  rewrite = function(req, m)
    req:set_path("/items/" .. m[1])
    req.ctx.legacy = m[1]
  end,
  -- A route's on_response runs after the global ones: tell clients where the
  -- resource lives now (RFC 8594 deprecation hints).
  on_response = function(req, res)
    res.headers["deprecation"] = "true"
    res.headers["link"] = "</items/" .. req.ctx.legacy .. '>; rel="successor-version"'
  end }

-- The counters, answered by the proxy itself. Keep it internal in production
-- (add plugins = { { "ip_restriction", allow = { "10.0.0.0/8" } } }).
proxy.route { name = "stats", path = "/_stats", method = "GET",
  handler = function(req)
    local out = {}
    for _, k in ipairs { "2xx", "3xx", "4xx", "5xx", "legacy", "slow" } do
      out[#out + 1] = k .. "=" .. (stats:get(k) or 0)
    end
    return req:respond(200, table.concat(out, " ") .. "\n", { ["content-type"] = "text/plain" })
  end }

proxy.route { name = "app", prefix = "/", upstream = app }

-- A Lua error in a hook answers that one request 500 and logs the hook's
-- file:line, the route and the request id; the worker goes on serving.
