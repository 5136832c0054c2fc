-- moonproxy.plugins.rate_limit: requests per client (or per any key), as a
-- token bucket or in fixed windows, counted by the process (all its workers,
-- through proxy.shared) or in Redis (every proxy sharing it: the scripts,
-- circuits and leases are moonproxy.plugins.rate_limit_redis).
--
--   { "rate_limit", rate = 10, burst = 20, key = "header:x-api-key" }
--   { "rate_limit", limit = 100, window = 60 }                 -- 100 a minute
--   { "rate_limit", limit = 100, window = 60, policy = "redis", redis = R, batch = 10 }
--
-- rate       token bucket: requests per second refilled (fractional: 0.5 is
--            one every two seconds).
-- burst      bucket size: requests allowed at once (default max(1, rate)).
-- limit      fixed windows: at most limit requests per key in each window of
--            window seconds (an integer), aligned to the clock: window k is
--            [k * window, (k + 1) * window). Exclusive with rate and burst.
--            Locally the clock is proxy.now() (monotonic, one for the host's
--            processes); in Redis it is Redis' TIME, one for every proxy.
-- key        "remote_addr" (default), "header:NAME", or function(req) -> string.
--            A request without a key (the header is absent, the function
--            returns nil) is let through and not counted.
-- scope      a name for the counts (default: derived from the numbers and
--            key). Instances with the same scope share counts: give routes
--            that must be limited apart a scope each.
-- dict       the shared dictionary (default "rate_limit"), of dict_size bytes
--            (default "10m").
-- policy     "local" (default) or "redis": counted atomically in Redis, one
--            script per algorithm (SCRIPT LOAD once per worker, EVALSHA, EVAL
--            when Redis lost it). Token buckets refill by Redis' TIME.
-- redis      with policy = "redis", required: a proxy.redis client.
-- on_error   what a request gets while Redis cannot be reached (a failed or
--            timed-out call, an error reply, the circuit below open): "local"
--            (default) counts it in dict as policy = "local" would; "allow"
--            lets it through uncounted; "deny" answers 503 with Retry-After
--            (the seconds until Redis is tried again): the limiter's
--            dependency is down, not the client over its limit (a 429 would
--            tell a well-behaved client it was), and a 5xx is what alerting
--            counts. Guards (proxy.expect) and --explain cannot call out:
--            they see on_error's answer.
--            The circuit: after a failure, each worker skips Redis for 1 s,
--            doubling while it keeps failing up to 30 s; then one request
--            tries it again (the others go on with on_error until it
--            answers), and a success closes it. At most one log line per
--            second per worker.
-- batch      with policy = "redis", an integer N >= 1 (default 1), at most
--            limit (burst): a worker takes N units in one script call and
--            admits from its lease until it is used up (fixed windows: or the
--            window ends). Redis sees one call per N requests per worker and
--            key (while a lease is asked for, the worker's other requests for
--            the key ask for 1). Accuracy, with W workers in all the proxies
--            sharing Redis: each holds at most N - 1 unused units per key.
--            Fixed windows never admit more than limit per window; up to
--            (W - 1) * (N - 1) requests may be refused early while other
--            workers hold units, which lapse at the window's end. A token bucket may
--            admit up to W * (N - 1) more than burst at once (units taken
--            earlier and spent later; leases do not lapse), never more than
--            rate over time. A worker keeps leases for at most 10,000 keys
--            (past that it drops them, their units unused).
--
-- When the dictionary cannot hold a count (it is full, or the key names
-- another kind of entry), the request is let through: a limiter that fails
-- closed would turn a full dictionary into an outage.
--
-- Over the limit: 429 with Retry-After (whole seconds, at least 1: for a
-- window, to its end) and RateLimit-Limit, RateLimit-Remaining,
-- RateLimit-Reset (draft-ietf-httpapi-ratelimit-headers). Allowed requests
-- get RateLimit-Limit, RateLimit-Remaining (with batch: Redis' count plus
-- the worker's lease) and RateLimit-Reset on their response; with several
-- instances on one request, the one with the fewest requests left shows.
local util = require "moonproxy.plugins.util"
local in_redis = require "moonproxy.plugins.rate_limit_redis"

local type, tostring, require, ipairs = type, tostring, require, ipairs
local floor, ceil, max, huge, fmt = math.floor, math.ceil, math.max, math.huge, string.format

local function rate(v)
  if type(v) ~= "number" or v ~= v or v <= 0 or v == huge then
    return util.bad(v, "must be a number of requests per second greater than 0")
  end
  return v
end

local function integer(what)
  return function(v)
    if type(v) ~= "number" or v < 1 or v ~= floor(v) or v > 2 ^ 31 then
      return util.bad(v, "must be an integer >= 1" .. what)
    end
    return v
  end
end

local function key(v)
  if v == "remote_addr" or type(v) == "function" then
    return v
  end
  local name = type(v) == "string" and v:match("^header:(.+)$")
  local h = name and util.header_name(name)
  if not h then
    return util.bad(v, 'must be "remote_addr", "header:NAME" or a function(req) -> string')
  end
  return { header = h }
end

local function one_of(list)
  local set = {}
  for _, v in ipairs(list) do
    set[v] = true
  end
  local names = '"' .. table.concat(list, '" or "') .. '"'
  return function(v)
    if not set[v] then
      return util.bad(v, "must be " .. names)
    end
    return v
  end
end

local function client(v)
  if type(v) ~= "table" or type(v.call) ~= "function" or type(v.addr) ~= "string" then
    return util.bad(v, "must be a Redis client (proxy.redis { addr = ... })")
  end
  return v
end

local spec = {
  rate = rate, burst = integer(""), limit = integer(""), window = integer(" (seconds)"), key = key,
  scope = util.string, dict = util.string, dict_size = util.size, policy = one_of { "local", "redis" },
  redis = client, on_error = one_of { "local", "allow", "deny" }, batch = integer(""),
}

local function key_of(conf, req)
  local k = conf.key
  if k == "remote_addr" then
    return req.remote_addr
  elseif type(k) == "function" then
    local v = k(req)
    return v ~= nil and tostring(v) or nil
  end
  local v = req.headers[k.header]
  return type(v) == "table" and v[1] or v
end

-- Counts one request in the process: allowed, remaining, seconds (to wait
-- when refused, until the count is whole when allowed); nil when the dict
-- cannot hold the count.
local function count_local(conf, k)
  if conf.window then
    local w = conf.window
    local now = conf.proxy.now()
    local id = floor(now / w)
    local left = (id + 1) * w - now
    local n = conf.dict:incr(conf.prefix .. id .. "|" .. k, 1, 0, left + 1)
    if not n then
      return nil
    end
    return n <= conf.limit, max(0, conf.limit - n), left
  end
  local allowed, remaining, retry_after = conf.dict:take(conf.prefix .. k, conf.rate, conf.burst, 1)
  if allowed == nil then
    return nil
  end
  remaining = max(0, floor(remaining))
  if not allowed then
    return false, 0, retry_after or 1
  end
  return true, remaining, (conf.burst - remaining) / conf.rate
end

return {
  name = "rate_limit",

  schema = function(conf)
    local c = util.check(conf, spec)
    local window = c.limit or c.window
    if window and (c.rate or c.burst) then
      util.fail("counts either as a token bucket (rate, burst) or in fixed windows (limit, window), not both")
    elseif window and not (c.limit and c.window) then
      util.fail("fixed windows need both limit = N and window = seconds")
    elseif not window and not c.rate then
      util.fail("needs rate = N (requests per second), or limit = N and window = seconds")
    end
    local redis = c.policy == "redis"
    if redis and not c.redis then
      util.fail('policy = "redis" needs redis = a client (proxy.redis { addr = ... })')
    end
    for _, k in ipairs { "redis", "on_error", "batch" } do
      if c[k] ~= nil and not redis then
        util.fail("'%s' needs policy = \"redis\"", k)
      end
    end
    local b = not window and (c.burst or max(1, c.rate)) or nil
    if c.batch and c.batch > (b or c.limit) then
      util.fail("'batch' must be at most %s (%d), got %d", b and "burst" or "limit", b or c.limit, c.batch)
    end
    local kind = type(c.key) == "table" and "header:" .. c.key.header or type(c.key) == "function" and "fn"
      or "remote_addr"
    local prefix = (c.scope or (window and fmt("w%d/%d/%s", c.limit, c.window, kind)
      or fmt("%s/%s/%s", tostring(c.rate), tostring(b), kind))) .. "|"
    local batch = c.batch or 1
    local leasing = redis and batch > 1
    local proxy = require("moonproxy") -- here rather than at the top: require has no dependency on the runtime
    return {
      rate = c.rate, burst = b, window = c.window, limit = c.limit or b, key = c.key or "remote_addr",
      limit_header = tostring(floor(c.limit or b)), prefix = prefix, proxy = proxy,
      dict = proxy.shared(c.dict or "rate_limit", c.dict_size or "10m"),
      redis = redis and c.redis or nil, on_error = c.on_error or "local", batch = batch,
      algo = window and "window" or "bucket", rprefix = "moonproxy:rate_limit:" .. prefix,
      args = window and { tostring(c.limit), tostring(c.window * 1000) } or { fmt("%.17g", c.rate), tostring(b) },
      leases = leasing and {} or nil, nleases = 0, pending = leasing and {} or nil, npending = 0,
    }
  end,

  on_request = function(conf, req)
    local k = key_of(conf, req)
    if k == nil then
      return
    end
    local allowed, remaining, secs
    if conf.redis then
      local c
      allowed, remaining, secs = in_redis.count(conf, k)
      if allowed == nil then
        c = remaining
        if conf.on_error == "allow" then
          return
        elseif conf.on_error == "deny" then
          local wait = tostring(max(1, ceil(c.open_until - conf.proxy.now() - 0.001)))
          return req:respond(503, "rate limit unavailable\n", { ["Retry-After"] = wait })
        end
        allowed, remaining, secs = count_local(conf, k)
      end
    else
      allowed, remaining, secs = count_local(conf, k)
    end
    if allowed == nil then
      return -- the dict cannot hold the count (a huge key, or full of other entries): fail open
    end
    if not allowed then
      local wait = tostring(max(1, ceil(secs)))
      return req:respond(429, "too many requests\n", {
        ["Retry-After"] = wait, ["RateLimit-Limit"] = conf.limit_header,
        ["RateLimit-Remaining"] = "0", ["RateLimit-Reset"] = wait,
      })
    end
    local prev = req.ctx.rate_limit
    if not prev or remaining < prev.remaining then
      req.ctx.rate_limit = { limit = conf.limit_header, remaining = remaining, reset = ceil(secs) }
    end
  end,

  on_response = function(_, req, res)
    local rl = req.ctx.rate_limit
    if rl then
      local h = res.headers
      h["ratelimit-limit"] = rl.limit
      h["ratelimit-remaining"] = tostring(rl.remaining)
      h["ratelimit-reset"] = tostring(rl.reset)
    end
  end,
}
