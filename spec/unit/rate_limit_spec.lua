-- rate_limit's fixed windows, and its Redis policy (scripts, on_error, the
-- circuit, batch), through moonproxy.testing: the configuration loads as a
-- worker's would and requests run through the simulator. opts.redis is a
-- small Redis in Lua that runs the plugin's own scripts (their text, with
-- redis.call bound to it), so what is tested here is what Redis would run.
local testing = require "moonproxy.testing"

local floor, fmt = math.floor, string.format

-- Redis --------------------------------------------------------------------------
-- TIME (from r.clock, seconds), HMGET, HSET, PEXPIRE, SCRIPT LOAD, EVALSHA,
-- EVAL; r.down = true answers every command nil, "timeout"; r:restart()
-- forgets the scripts and the data; r.calls counts commands, r.log lists them.

local function reply(v)
  local t = type(v)
  if t == "number" then -- Redis: a Lua number becomes an integer, truncated
    return v >= 0 and floor(v) or -floor(-v)
  elseif t == "table" then
    local out = {}
    for i = 1, #v do
      out[i] = reply(v[i])
    end
    return out
  elseif t == "boolean" then
    return v and 1 or nil
  end
  return v
end

local function fake_redis()
  local r = { clock = 1700000000.25, data = {}, scripts = {}, calls = 0, log = {}, down = false }
  local function live(k)
    local e = r.data[k]
    if e and e.expires and e.expires <= r.clock then
      r.data[k], e = nil, nil
    end
    return e
  end
  local cmds = {}
  function cmds.TIME()
    local s = floor(r.clock)
    return { tostring(s), tostring(floor((r.clock - s) * 1e6 + 0.5)) }
  end
  function cmds.HMGET(k, ...)
    local e, out = live(k), {}
    for i, f in ipairs { ... } do
      out[i] = e and e.h[f] or false -- a nil bulk is false in Redis' Lua
    end
    return out
  end
  function cmds.HSET(k, ...)
    local e, a = live(k) or { h = {} }, { ... }
    r.data[k] = e
    for i = 1, #a, 2 do
      e.h[a[i]] = type(a[i + 1]) == "number" and fmt("%.17g", a[i + 1]) or a[i + 1]
    end
    return #a / 2
  end
  function cmds.PEXPIRE(k, ms)
    local e = live(k)
    if e then
      e.expires = r.clock + tonumber(ms) / 1000
    end
    return e and 1 or 0
  end
  local function run(text, nkeys, ...)
    local all, keys, argv = { ... }, {}, {}
    for i = 1, #all do
      if i <= nkeys then keys[#keys + 1] = all[i] else argv[#argv + 1] = tostring(all[i]) end
    end
    local env = {
      KEYS = keys, ARGV = argv, math = math, string = string, tonumber = tonumber, tostring = tostring,
      redis = { call = function(cmd, ...) return assert(cmds[cmd:upper()], cmd)(...) end },
    }
    local fn = assert(loadstring(text))
    setfenv(fn, env)
    return reply(fn())
  end
  function r.call(cmd, ...)
    r.calls = r.calls + 1
    local a = { ... }
    r.log[#r.log + 1] = cmd .. (cmd == "SCRIPT" and " " .. a[1] or "")
    if r.down then
      return nil, "timeout"
    elseif cmd == "SCRIPT" and a[1] == "LOAD" then
      local sha = fmt("%040x", #a[2] * 7919 + (a[2]:find("token bucket", 1, true) and 1 or 0))
      r.scripts[sha] = a[2]
      return sha
    elseif cmd == "EVALSHA" then
      local text = r.scripts[a[1]]
      if not text then
        return nil, "NOSCRIPT No matching script. Please use EVAL."
      end
      return run(text, select(2, ...))
    elseif cmd == "EVAL" then
      r.scripts[fmt("%040x", #a[1] * 7919 + (a[1]:find("token bucket", 1, true) and 1 or 0))] = a[1]
      return run(a[1], select(2, ...))
    end
    return nil, "ERR unknown command '" .. cmd .. "'"
  end
  function r.restart()
    r.scripts, r.data = {}, {}
  end
  return r
end

-- Configurations ------------------------------------------------------------------

local serial = 0

-- A configuration with one route through rate_limit with opts (Lua text);
-- R is the Redis client. Each gets a scope of its own unless opts names one
-- (the simulator's shared dicts are the process's, kept between specs).
local function text(opts)
  serial = serial + 1
  if not opts:find("scope", 1, true) then
    opts = opts .. fmt(', scope = "rl_spec_%d_%d"', serial, math.random(1, 1e6))
  end
  return fmt([[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:8080" }
local R = proxy.redis { addr = "127.0.0.1:6390", timeout = 0.2 }
local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }
proxy.route { prefix = "/", upstream = api, plugins = { { "rate_limit", %s } } }
]], opts)
end

local function load(opts, redis, now)
  return testing.load(text(opts), { now = now or 1000, redis = redis and redis.call })
end

-- The status of one request (200: forwarded) and the result.
local function hit(cfg, addr)
  local r = cfg:request { path = "/", remote_addr = addr or "192.0.2.1" }
  return r.status or 200, r
end

local function statuses(cfg, n, addr)
  local out = {}
  for i = 1, n do
    out[i] = hit(cfg, addr)
  end
  return table.concat(out, " ")
end

-- The RateLimit headers of an allowed request's response.
local function allowed_headers(cfg, addr)
  local r = cfg:request { path = "/", remote_addr = addr or "192.0.2.1" }
  assert(r.status == nil, testing.format(r))
  local res = cfg:response(r, { status = 200 })
  return res.headers["ratelimit-limit"], res.headers["ratelimit-remaining"], res.headers["ratelimit-reset"]
end

describe("rate_limit fixed windows (local)", function()
  it("allows limit requests per window, then 429 with Retry-After to the window's end", function()
    local cfg = load("limit = 3, window = 60", nil, 6000 + 45) -- 15 s left in window 100
    assert.equal("200 200 200 429 429", statuses(cfg, 5))
    local _, r = hit(cfg)
    assert.equal("15", r.headers["retry-after"])
    assert.equal("3", r.headers["ratelimit-limit"])
    assert.equal("0", r.headers["ratelimit-remaining"])
    assert.equal("15", r.headers["ratelimit-reset"])
    assert.equal("too many requests\n", r.body)
  end)

  it("starts a new count when the clock crosses into the next window", function()
    local cfg = load("limit = 2, window = 10", nil, 1009)
    assert.equal("200 200 429", statuses(cfg, 3))
    cfg:set_now(1009.9)
    assert.equal(429, hit(cfg))
    cfg:set_now(1010) -- window 101 begins
    assert.equal("200 200 429", statuses(cfg, 3))
  end)

  it("puts RateLimit headers on allowed responses, Reset at the window's end", function()
    local cfg = load("limit = 5, window = 60", nil, 6000 + 50.5)
    local limit, remaining, reset = allowed_headers(cfg)
    assert.same({ "5", "4", "10" }, { limit, remaining, reset })
    limit, remaining = allowed_headers(cfg)
    assert.same({ "5", "3" }, { limit, remaining })
  end)

  it("counts keys apart", function()
    local cfg = load("limit = 1, window = 60")
    assert.equal(200, hit(cfg, "192.0.2.1"))
    assert.equal(200, hit(cfg, "192.0.2.2"))
    assert.equal(429, hit(cfg, "192.0.2.1"))
  end)

  it("rounds Retry-After up, at least 1", function()
    local cfg = load("limit = 1, window = 1", nil, 1000.2)
    hit(cfg)
    local _, r = hit(cfg)
    assert.equal("1", r.headers["retry-after"])
  end)
end)

describe("rate_limit's configuration", function()
  local function refuses(opts, text_wanted)
    local cfg, err = testing.try_load(text(opts), { redis = function() end })
    assert.is_nil(cfg)
    assert(err:find("^config%.lua:5: "), err)
    assert(err:find(text_wanted, 1, true), "expected '" .. text_wanted .. "' in: " .. err)
  end

  it("refuses mixing a bucket and windows, or half a window, with file:line", function()
    refuses("rate = 1, limit = 5, window = 60", "either as a token bucket (rate, burst) or in fixed windows")
    refuses("burst = 2, limit = 5, window = 60", "either as a token bucket")
    refuses("limit = 5", "fixed windows need both limit = N and window = seconds")
    refuses("window = 60", "fixed windows need both")
    refuses("scope = 'x'", "needs rate = N (requests per second), or limit = N and window = seconds")
  end)

  it("refuses bad limits and windows", function()
    refuses("limit = 0, window = 60", "'limit' must be an integer >= 1, got 0")
    refuses("limit = 1.5, window = 60", "'limit' must be an integer >= 1")
    refuses("limit = 5, window = 0.5", "'window' must be an integer >= 1 (seconds), got 0.5")
    refuses("limit = 5, window = '1m'", "'window' must be an integer >= 1 (seconds)")
  end)

  it("refuses a redis policy without a client, and Redis options without the policy", function()
    refuses("limit = 5, window = 60, policy = 'redis'", 'policy = "redis" needs redis = a client')
    refuses("limit = 5, window = 60, policy = 'cluster'", "'policy' must be \"local\" or \"redis\"")
    refuses("limit = 5, window = 60, redis = R", "'redis' needs policy = \"redis\"")
    refuses("limit = 5, window = 60, on_error = 'deny'", "'on_error' needs policy = \"redis\"")
    refuses("rate = 5, batch = 2", "'batch' needs policy = \"redis\"")
    refuses("limit = 5, window = 60, policy = 'redis', redis = 'localhost'", "'redis' must be a Redis client")
    refuses("rate = 5, policy = 'redis', redis = R, on_error = 'open'",
      "'on_error' must be \"local\" or \"allow\" or \"deny\"")
  end)

  it("refuses a batch larger than the limit or the burst", function()
    refuses("limit = 5, window = 60, policy = 'redis', redis = R, batch = 6", "'batch' must be at most limit (5), got 6")
    refuses("rate = 5, burst = 3, policy = 'redis', redis = R, batch = 4", "'batch' must be at most burst (3), got 4")
    refuses("rate = 5, policy = 'redis', redis = R, batch = 0", "'batch' must be an integer >= 1")
  end)
end)

describe("rate_limit policy = redis", function()
  it("counts a fixed window in Redis, by Redis' clock, with Retry-After to its end", function()
    local redis = fake_redis()
    redis.clock = 1700000000 + (60 - 1700000000 % 60) - 20.5 -- 20.5 s before a minute's end
    local cfg = load("limit = 3, window = 60, policy = 'redis', redis = R", redis)
    assert.equal("200 200 200 429", statuses(cfg, 4))
    local _, r = hit(cfg)
    assert.equal("21", r.headers["retry-after"])
    redis.clock = redis.clock + 20.5 -- the proxy's clock has not moved: Redis' decides
    assert.equal("200 200 200 429", statuses(cfg, 4))
  end)

  it("counts a token bucket in Redis, refilled by Redis' clock", function()
    local redis = fake_redis()
    local cfg = load("rate = 2, burst = 3, policy = 'redis', redis = R", redis)
    assert.equal("200 200 200 429", statuses(cfg, 4))
    local _, r = hit(cfg)
    assert.equal("1", r.headers["retry-after"]) -- 0.5 s to a token
    redis.clock = redis.clock + 0.5
    assert.equal("200 429", statuses(cfg, 2))
    redis.clock = redis.clock + 100
    assert.equal("200 200 200 429", statuses(cfg, 4))
  end)

  it("reports the bucket's RateLimit headers from Redis", function()
    local redis = fake_redis()
    local cfg = load("rate = 1, burst = 3, policy = 'redis', redis = R", redis)
    assert.same({ "3", "2", "1" }, { allowed_headers(cfg) })
    assert.same({ "3", "1", "2" }, { allowed_headers(cfg) })
  end)

  it("enforces one limit across two proxies sharing the Redis (window and bucket)", function()
    for _, opts in ipairs { "limit = 4, window = 60", "rate = 0.001, burst = 4" } do
      local redis = fake_redis()
      local scope = fmt("scope = 'shared_%d'", math.random(1, 1e6))
      local a = load(opts .. ", policy = 'redis', redis = R, " .. scope, redis)
      local b = load(opts .. ", policy = 'redis', redis = R, " .. scope, redis)
      assert.equal("200 200", statuses(a, 2), opts)
      assert.equal("200 200 429", statuses(b, 3), opts)
      assert.equal(429, hit(a), opts)
    end
  end)

  it("loads each script once per worker, then runs it by SHA", function()
    local redis = fake_redis()
    local cfg = load("limit = 10, window = 60, policy = 'redis', redis = R", redis)
    statuses(cfg, 3)
    assert.same({ "SCRIPT LOAD", "EVALSHA", "EVALSHA", "EVALSHA" }, redis.log)
  end)

  it("falls back to EVAL when Redis has lost the script, and keeps the count", function()
    local redis = fake_redis()
    local cfg = load("limit = 3, window = 60, policy = 'redis', redis = R", redis)
    assert.equal(200, hit(cfg))
    redis.scripts = {} -- SCRIPT FLUSH
    assert.equal("200 200 429", statuses(cfg, 3))
    assert.same({ "SCRIPT LOAD", "EVALSHA", "EVALSHA", "EVAL", "EVALSHA", "EVALSHA" }, redis.log)
    redis.restart() -- the data goes too: a new count
    assert.equal("200 200 200 429", statuses(cfg, 4))
  end)
end)

describe("rate_limit while Redis is down", function()
  local function down_cfg(on_error, redis)
    return load("limit = 2, window = 60, policy = 'redis', redis = R" ..
      (on_error and ", on_error = '" .. on_error .. "'" or ""), redis)
  end

  it("counts in the process by default (on_error = local)", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg(nil, redis)
    assert.equal("200 200 429 429", statuses(cfg, 4))
  end)

  it("lets every request through uncounted with on_error = allow", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg("allow", redis)
    assert.equal("200 200 200 200", statuses(cfg, 4))
    local r = cfg:request { path = "/", remote_addr = "192.0.2.1" }
    assert.is_nil(cfg:response(r, { status = 200 }).headers["ratelimit-limit"])
  end)

  it("answers 503 with Retry-After with on_error = deny", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg("deny", redis)
    local st, r = hit(cfg)
    assert.equal(503, st)
    assert.equal("1", r.headers["retry-after"])
    assert.equal("rate limit unavailable\n", r.body)
    assert.is_nil(r.headers["ratelimit-limit"])
    assert.equal("503 503 503", statuses(cfg, 3))
  end)

  it("skips Redis while the circuit is open: 1 s, doubling, closed by a success", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg("allow", redis)
    hit(cfg)
    assert.equal(1, redis.calls) -- SCRIPT LOAD failed
    statuses(cfg, 5)
    cfg:set_now(1000.9)
    statuses(cfg, 5)
    assert.equal(1, redis.calls)
    cfg:set_now(1001.1) -- open 1 s: one request tries again, fails: open 2 s
    statuses(cfg, 5)
    assert.equal(2, redis.calls)
    cfg:set_now(1003.0)
    statuses(cfg, 5)
    assert.equal(2, redis.calls)
    cfg:set_now(1003.2) -- tries, fails: open 4 s
    statuses(cfg, 3)
    assert.equal(3, redis.calls)
    cfg:set_now(1007.1)
    statuses(cfg, 3)
    assert.equal(3, redis.calls)
    redis.down = false
    cfg:set_now(1007.3) -- tries, succeeds: closed, every request asks again
    assert.equal("200 200 429", statuses(cfg, 3))
    assert.equal(3 + 4, redis.calls) -- SCRIPT LOAD and three EVALSHA
  end)

  it("gives deny's Retry-After as the time until Redis is tried again, up to 30 s", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg("deny", redis)
    local now = 1000
    local wait
    for _ = 1, 8 do -- 1, 2, 4, 8, 16, 30, 30, 30
      local _, r = hit(cfg)
      wait = tonumber(r.headers["retry-after"])
      now = now + wait + 0.01
      cfg:set_now(now)
    end
    assert.equal(30, wait)
    assert.equal(8, redis.calls)
  end)

  it("goes back to Redis' count once it answers (on_error = local)", function()
    local redis = fake_redis()
    redis.down = true
    local cfg = down_cfg(nil, redis)
    assert.equal("200 200 429", statuses(cfg, 3)) -- locally
    redis.down = false
    cfg:set_now(1001.5)
    assert.equal("200 200 429", statuses(cfg, 3)) -- Redis' own count
  end)
end)

describe("rate_limit in a guard", function()
  it("counts by on_error where it cannot call out (proxy.expect), so the guard sees the route", function()
    local guarded = text("limit = 5, window = 60, policy = 'redis', redis = R")
      .. 'proxy.expect { request = { path = "/" }, upstream = "api" }\n'
    assert.is_table(testing.load(guarded, { redis = fake_redis().call }))
    local denied = text("limit = 5, window = 60, policy = 'redis', redis = R, on_error = 'deny'")
      .. 'proxy.expect { request = { path = "/" }, upstream = "api" }\n'
    local cfg, err = testing.try_load(denied, { redis = fake_redis().call })
    assert.is_nil(cfg)
    assert.matches("expected 'api', got an answer 503", err)
  end)
end)

describe("rate_limit batch", function()
  it("leases batch units in one call and serves from the lease (fixed window)", function()
    local redis = fake_redis()
    local cfg = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 4", redis)
    assert.equal("200 200 200 200", statuses(cfg, 4))
    assert.same({ "SCRIPT LOAD", "EVALSHA" }, redis.log)
    assert.equal("200 200 200 200 200 200 429 429", statuses(cfg, 8)) -- 4 + 4 + the last 2 of the 10
    assert.equal(6, #redis.log) -- SCRIPT LOAD, leases of 4, 4 and 2, then one call per refusal
  end)

  it("never admits more than limit per window across proxies, and refuses early while units are held", function()
    local redis = fake_redis()
    redis.clock = 1700000000 - 1700000000 % 60 + 1
    local scope = fmt("scope = 'batch_%d'", math.random(1, 1e6))
    local a = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 4, " .. scope, redis)
    local b = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 4, " .. scope, redis)
    assert.equal(200, hit(a)) -- a holds 3
    assert.equal("200 200 200 200 200 200 429", statuses(b, 7)) -- b gets 4 + 2: Redis is out
    assert.equal("200 200 200 429", statuses(a, 4)) -- a's 3 held units: 10 in all
    redis.clock = redis.clock + 60 -- the next window: the leases lapse with it
    assert.equal("200 200 200 200", statuses(a, 4))
  end)

  it("drops a lease at its window's end: its units lapse", function()
    local redis = fake_redis()
    redis.clock = 1700000000 - 1700000000 % 60 + 50 -- 10 s left
    local cfg = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 5", redis)
    assert.equal(200, hit(cfg)) -- holds 4
    assert.equal(2, #redis.log)
    redis.clock = redis.clock + 10
    cfg:set_now(1010)
    assert.equal(200, hit(cfg))
    assert.same({ "SCRIPT LOAD", "EVALSHA", "EVALSHA" }, redis.log) -- a new lease, in the new window
    assert.equal("200 200 200 200 200 200 200 200 200 429", statuses(cfg, 10))
  end)

  it("keeps leases for at most 10,000 keys per worker, then drops them", function()
    local redis = fake_redis()
    local cfg = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 3", redis)
    for i = 1, 10000 do
      hit(cfg, fmt("10.%d.%d.%d", floor(i / 65536), floor(i / 256) % 256, i % 256)) -- each holds 2
    end
    local calls = redis.calls
    assert.equal(200, hit(cfg, "10.0.0.1")) -- from its lease
    assert.equal(calls, redis.calls)
    assert.equal(200, hit(cfg, "192.0.2.99")) -- a new key: the 10,001st lease drops the others
    assert.equal(calls + 1, redis.calls)
    assert.equal(200, hit(cfg, "10.0.0.2"))   -- its lease is gone: Redis again
    assert.equal(calls + 2, redis.calls)
  end)

  it("leases from a token bucket (no more than the tokens there are)", function()
    local redis = fake_redis()
    local cfg = load("rate = 1, burst = 5, policy = 'redis', redis = R, batch = 3", redis)
    assert.equal("200 200 200 200 200 429", statuses(cfg, 6))
    redis.clock = redis.clock + 1
    assert.equal("200 429", statuses(cfg, 2))
  end)

  it("uses the lease while Redis is down, then on_error", function()
    local redis = fake_redis()
    local cfg = load("limit = 10, window = 60, policy = 'redis', redis = R, batch = 3, on_error = 'deny'", redis)
    assert.equal(200, hit(cfg))
    redis.down = true
    assert.equal("200 200 503", statuses(cfg, 3))
  end)
end)
