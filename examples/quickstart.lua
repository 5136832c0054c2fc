-- quickstart.lua: a small moonproxy configuration, in front of an HTTP
-- server on 127.0.0.1:9001. Check it, then run it:
--   moonproxy -t -c examples/quickstart.lua
--   moonproxy -c examples/quickstart.lua
-- A configuration is plain Lua: it runs once per worker and again on every
-- reload, and declares what to do through the moonproxy module.
local proxy = require "moonproxy"

-- Where clients connect. 127.0.0.1 keeps the demo local; use "0.0.0.0:8080"
-- (or "[::]:8080") to accept connections from other machines. Declare
-- several listeners by calling proxy.listen again.
proxy.listen { addr = "127.0.0.1:8080" }

-- Every setting has a default; these are the ones worth knowing first.
-- Durations are seconds; sizes are bytes or strings like "64k", "10m", "1g".
proxy.settings {
  workers = "auto",        -- one worker thread per CPU
  keepalive_timeout = 75,  -- close an idle client connection after 75 s
  max_body_size = "10m",   -- larger request bodies get 413 (0 = unlimited)
  access_log = "stdout",   -- one JSON line per request; a file path, or false
}

-- An upstream is a named group of servers ("ip:port") that requests are
-- balanced over. proxy.upstream returns an object that routes refer to.
local demo = proxy.upstream "demo" {
  servers = { "127.0.0.1:9001" },  -- add more, e.g. { addr = "127.0.0.1:9002", weight = 2 }
  keepalive = 16,                  -- idle connections kept open to each server, per worker
  timeouts = { connect = 2, read = 30 },
}

-- Routes. The order of declaration only matters among regex routes: an exact
-- path wins first, then regexes (in order), then the longest prefix.

-- A prefix route: /api/users reaches the upstream as /users (the prefix is
-- stripped; the query string is always kept).
proxy.route { name = "api", prefix = "/api/", strip_prefix = true, upstream = demo }

-- An exact path, for GET and HEAD only: other methods fall through to the
-- routes below.
proxy.route { name = "health", path = "/healthz", method = { "GET", "HEAD" }, upstream = demo }

-- A regex route (PCRE2), tried before any prefix route, so the catch-all
-- below never hides it. Long brackets [[...]] save escaping backslashes.
proxy.route { name = "user", regex = [[^/users/(\d+)$]], upstream = demo }

-- The catch-all: every other path. A route may also name its upstream as a
-- string ("demo"), which may be declared later in the file.
proxy.route { name = "default", prefix = "/", upstream = "demo" }

-- Guards: what must stay true of this configuration, declared next to it.
-- moonproxy runs each request through the configuration (the same code that
-- serves real requests, with no sockets) at start, with -t and at every
-- reload; one that does not hold refuses the configuration, showing what was
-- expected and what happens instead. To ask "where would this go and why?"
-- from a shell:
--   moonproxy -c examples/quickstart.lua --explain 'GET http://localhost/api/users?page=2'
proxy.expect { request = { path = "/api/users?page=2" }, route = "api", target = "/users?page=2" }
proxy.expect { request = { method = "DELETE", path = "/healthz" }, route = "default" }
