-- canary.lua: a canary release. A new version of the application (the
-- canary) gets 5% of the traffic next to the stable version; testers and
-- opted-in users can force it. Check it, then run it:
--   moonproxy -t -c examples/canary.lua
--   moonproxy -c examples/canary.lua
-- and try:
--   curl -i localhost:8080/                          # 95% stable, 5% canary
--   curl -i -H 'x-canary: always' localhost:8080/    # always the canary
--   curl -i -b 'canary=1' localhost:8080/            # the same, by cookie
--   curl -i -H 'x-canary: never' localhost:8080/     # always stable
--
-- What it shows:
--   * the "weighted" balancer (smooth weighted round robin) splitting traffic
--     95:5 between two servers;
--   * a handler route choosing the upstream per request (override by header
--     or cookie), instead of a fixed `upstream =`;
--   * req.ctx carrying a decision from the request to the response hook;
--   * what happens when the canary breaks.
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }
-- The admin port: POST /reload after changing the weights, and
-- GET /upstreams to see each server's state (is the canary ejected?).
proxy.admin { addr = "127.0.0.1:8085" }
proxy.settings { workers = "auto", access_log = "stdout" }

-- Where each version runs. With several instances of a version, list them all
-- in its upstream below, and in the split with weights that add up per version.
local STABLE = "127.0.0.1:9001"
local CANARY = "127.0.0.1:9002"

-- Passive health checks, for every upstream below: after 3 consecutive
-- failures (refused connections, timeouts, 502/503/504 answers) a server is
-- taken out of its upstream for 30 s, then tried again with one request. Each
-- upstream keeps its own count for its servers, even for an address that
-- several upstreams list, as CANARY is here.
local PASSIVE = { failures = 3, cooldown = 30 }

-- One upstream per version, for the requests that must reach that version.
local stable = proxy.upstream "stable" { servers = { STABLE }, passive = PASSIVE }
local canary = proxy.upstream "canary" { servers = { CANARY }, passive = PASSIVE }

-- The split: both versions in one upstream, weighted 95:5. "weighted" is
-- smooth weighted round robin: every run of 100 requests a worker sends has
-- exactly 95 on stable and 5 on canary (while both are up), spread out rather
-- than in a block (no dice are rolled; with several workers each one keeps its
-- own turn, so the share is 5% overall). To move the release on, change the
-- weights (95:5, 75:25, 50:50, ...) and reload: SIGHUP or POST /reload.
--
-- The split is per request, not per user: one user's page and its images may
-- come from both versions. When a user must stay on one version, balance on a
-- key instead (balancer = "chash", hash_key = "cookie:session"): each session
-- then sticks to one server, and the canary's share is only roughly its
-- weight, as it depends on how the sessions hash.
--
-- If the canary breaks, the split protects its users: a request that cannot
-- connect to the canary is retried on stable (retries = 1; an answer such as
-- a 500 or 503 is passed on, not retried), and after 3 failures the canary is
-- out of the split (PASSIVE) and stable takes all of it. Users who forced the
-- canary get its errors: 502 (no connection), then, once it is out of the
-- canary upstream too, 503 with Retry-After.
local split = proxy.upstream "split" {
  servers = {
    { addr = STABLE, weight = 95 },
    { addr = CANARY, weight = 5 },
  },
  balancer = "weighted",
  retries = 1,
  passive = PASSIVE,
}

-- The override, from a header (for testers and scripts: X-Canary: always or
-- never) or a cookie (for browsers, e.g. set by a "try the new version" page:
-- canary=1 or canary=0). always/1 force the canary; never/0 force stable, to
-- compare both; the header wins over the cookie. Returns the upstream and why
-- it was chosen, or nil when nothing forces a version.
local function forced(req)
  local h = req.headers["x-canary"]
  if h == "always" then return canary, "header" end
  if h == "never" then return stable, "header" end
  -- All cookies come in one Cookie header ("a=1; canary=1; b=2"); a repeated
  -- header reads as a list, so join the parts. Match the whole name and value:
  -- neither "mycanary=1" nor "canary=10" forces anything.
  local cookie = req.headers["cookie"]
  if type(cookie) == "table" then cookie = table.concat(cookie, "; ") end
  if cookie then
    local v = (";" .. cookie .. ";"):match(";%s*canary=([^;]*);")
    if v then v = v:match("^%s*(.-)%s*$") end
    if v == "1" then return canary, "cookie" end
    if v == "0" then return stable, "cookie" end
  end
end

-- A handler decides where each request goes: it returns an upstream object
-- (or its name). It may also answer by itself with req:respond.
proxy.route { name = "app", prefix = "/",
  handler = function(req)
    local u, why = forced(req)
    req.ctx.canary = why or "split" -- read again by on_response below
    return u or split
  end,
  -- How the version was chosen, for whoever debugs a report (which version
  -- answered is the application's to say, e.g. in a header of its own).
  on_response = function(req, res)
    res.headers["x-canary-decision"] = req.ctx.canary
  end }
