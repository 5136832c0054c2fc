-- blue_green.lua: blue/green deployment. Two complete copies of the
-- application run side by side; all traffic goes to the "live" one, and a
-- single authenticated request switches every worker to the other at once.
-- Check it, then run it:
--   moonproxy -t -c examples/blue_green.lua
--   moonproxy -c examples/blue_green.lua
-- and try:
--   curl -i localhost:8080/                                      # served by blue
--   curl -i -u ops:change-me -X POST 'localhost:8080/_switch?to=green'
--   curl -i localhost:8080/                                      # served by green
--   curl -i localhost:8080/_live                                 # "green"
--
-- What it shows:
--   * a shared dictionary (proxy.shared) holding state that every worker sees
--     and that survives a reload;
--   * a handler route choosing the upstream from that state;
--   * a handler answering by itself (the switch), guarded by basic_auth.
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }
-- The admin port (reloads: POST /reload; state: GET /upstreams). Keep it
-- on a loopback or private address: it has no authentication.
proxy.admin { addr = "127.0.0.1:8085" }
proxy.settings { workers = "auto", access_log = "stdout" }

-- The two environments, by color.
local colors = {
  blue = proxy.upstream "blue" { servers = { "127.0.0.1:9001" } },
  green = proxy.upstream "green" { servers = { "127.0.0.1:9002" } },
}
local DEFAULT = "blue" -- live until the first switch

-- The live color. A shared dictionary is one table for all the workers of the
-- process (each worker has its own Lua VM, so a plain Lua variable would be
-- per worker), and it is kept across reloads as long as its name and size
-- stay the same (a reload declaring another size is refused). Its memory is
-- fixed: 64k is plenty for one key.
local deploy = proxy.shared("deploy", "64k")

-- Do NOT write the flag here, at load time: this script runs again at every
-- reload, and a deploy:set("live", DEFAULT) here would undo the last switch.
-- Read it with a default instead (or use deploy:add, which never overwrites).

-- The switch: POST /_switch?to=green (or blue). basic_auth answers 401 to a
-- request without the right user and password before the handler runs. The
-- method filter matters: a GET /_switch does not match this route and goes
-- on to the catch-all below, like any page. Pick a path the applications
-- never use (or give the switch its own host: host = "deploy.internal").
-- In production, read the password from a file or the environment
-- (os.getenv works at load time) rather than writing it here.
proxy.route { name = "switch", path = "/_switch", method = "POST",
  plugins = { { "basic_auth", users = { ops = "change-me" }, realm = "deploy" } },
  handler = function(req)
    local to = ("&" .. (req.query or "")):match("&to=([^&]*)")
    if not colors[to] then
      return req:respond(400, "usage: POST /_switch?to=blue or ?to=green\n")
    end
    local was = deploy:get("live") or DEFAULT
    deploy:set("live", to) -- no ttl: until the next switch
    local msg = string.format("live: %s (was %s, switched by %s)\n", to, was, req.ctx.consumer)
    return req:respond(200, msg, { ["content-type"] = "text/plain" })
  end }

-- Which color is live, for dashboards and deploy scripts.
proxy.route { name = "live", path = "/_live", method = "GET",
  handler = function(req)
    return req:respond(200, (deploy:get("live") or DEFAULT) .. "\n",
      { ["content-type"] = "text/plain", ["cache-control"] = "no-store" })
  end }

-- Everything else goes to the live color. The handler runs for every request
-- and reads the dictionary each time (a lookup in shared memory), so a switch
-- takes effect on the very next request in every worker, also on keep-alive
-- connections opened before it. Requests already in flight finish where they
-- started.
proxy.route { name = "app", prefix = "/",
  handler = function(req)
    return colors[deploy:get("live") or DEFAULT]
  end }
