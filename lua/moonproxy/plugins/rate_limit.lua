-- moonproxy.plugins.rate_limit: a token bucket per client (or per any key),
-- shared by all workers through proxy.shared.
--
--   { "rate_limit", rate = 10, burst = 20, key = "header:x-api-key" }
--
-- rate       required: requests per second refilled (fractional: 0.5 is one
--            every two seconds).
-- burst      bucket size: requests allowed at once (default max(1, rate)).
-- key        "remote_addr" (default), "header:NAME", or function(req) -> string.
--            A request without a key (the header is absent, the function
--            returns nil) is let through and not counted.
-- scope      a name for the buckets (default: derived from rate, burst and
--            key). Instances with the same scope share buckets: give routes
--            that must be limited apart a scope each.
-- dict       the shared dictionary (default "rate_limit"), of dict_size bytes
--            (default "10m").
--
-- When the dictionary cannot hold a bucket (it is full, or the key names
-- another kind of entry), the request is let through: a limiter that fails
-- closed would turn a full dictionary into an outage.
--
-- Over the limit: 429 with Retry-After (whole seconds, at least 1) and
-- RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset
-- (draft-ietf-httpapi-ratelimit-headers). Allowed requests get RateLimit-Limit,
-- RateLimit-Remaining and RateLimit-Reset on their response; with several
-- instances on one request, the one with the fewest requests left shows.
local util = require "moonproxy.plugins.util"

local type, tostring, require = type, tostring, require
local floor, ceil, max, huge, fmt = math.floor, math.ceil, math.max, math.huge, string.format

local function rate(v)
  if type(v) ~= "number" or v ~= v or v <= 0 or v == huge then
    return util.bad(v, "must be a number of requests per second greater than 0")
  end
  return v
end

local function burst(v)
  if type(v) ~= "number" or v < 1 or v ~= floor(v) or v > 2 ^ 31 then
    return util.bad(v, "must be an integer >= 1")
  end
  return v
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

local spec = {
  rate = rate, burst = burst, key = key, scope = util.string, dict = util.string, dict_size = util.size,
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

-- Whole seconds until the bucket holding remaining tokens is full again.
local function reset_after(conf, remaining)
  return ceil((conf.burst - remaining) / conf.rate)
end

return {
  name = "rate_limit",

  schema = function(conf)
    local c = util.check(conf, spec)
    if not c.rate then
      util.fail("needs rate = N (requests per second)")
    end
    local b = c.burst or max(1, c.rate)
    local kind = type(c.key) == "table" and "header:" .. c.key.header or type(c.key) == "function" and "fn"
      or "remote_addr"
    return {
      rate = c.rate, burst = b, key = c.key or "remote_addr", limit = tostring(floor(b)),
      prefix = (c.scope or fmt("%s/%s/%s", tostring(c.rate), tostring(b), kind)) .. "|",
      -- required here rather than at the top, so require has no dependency on the runtime
      dict = require("moonproxy").shared(c.dict or "rate_limit", c.dict_size or "10m"),
    }
  end,

  on_request = function(conf, req)
    local k = key_of(conf, req)
    if k == nil then
      return
    end
    local allowed, remaining, retry_after = conf.dict:take(conf.prefix .. k, conf.rate, conf.burst, 1)
    if allowed == nil then
      return -- the dict cannot hold the bucket (a huge key, or full of other entries): fail open
    end
    remaining = max(0, floor(remaining))
    if not allowed then
      local wait = tostring(max(1, ceil(retry_after or 1)))
      return req:respond(429, "too many requests\n", {
        ["Retry-After"] = wait, ["RateLimit-Limit"] = conf.limit,
        ["RateLimit-Remaining"] = "0", ["RateLimit-Reset"] = wait,
      })
    end
    local prev = req.ctx.rate_limit
    if not prev or remaining < prev.remaining then
      req.ctx.rate_limit = { limit = conf.limit, remaining = remaining, reset = reset_after(conf, remaining) }
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
