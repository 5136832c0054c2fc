-- End-to-end: rate_limit with policy = "redis" against a real redis-server
-- (helpers.redis: a free 127.0.0.1 port, persistence off, stopped by PID): two
-- moonproxy processes of two workers each, sharing one Redis, enforce one
-- limit (fixed window, token bucket, and batch leases); while Redis cannot be
-- reached each on_error does what it says, and the circuit keeps a Redis that
-- never answers from costing a timeout per request; a Redis restarted (its
-- scripts gone) is counted in again, and while the circuit is half-open
-- only one of 20 requests sent at once probes Redis.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local rh = require "helpers.redis"
local socket = require "socket"

-- redis-server: helpers.redis. redis_cmd sends one command on a connection
-- of its own and reads a status, integer, bulk or flat array reply.

local function redis_cmd(port, ...)
  local s = socket.tcp()
  s:settimeout(1)
  if s:connect("127.0.0.1", port) ~= 1 then
    s:close()
    return nil
  end
  local args = { ... }
  local out = { "*" .. #args .. "\r\n" }
  for _, a in ipairs(args) do
    a = tostring(a)
    out[#out + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  s:send(table.concat(out))
  local line = s:receive("*l")
  local reply = line
  if line and line:match("^%*%d+") then -- an array of bulk strings (TIME)
    reply = {}
    for i = 1, tonumber(line:sub(2)) do
      s:receive("*l")
      reply[i] = s:receive("*l")
    end
  elseif line and line:match("^%$%d+") then
    reply = s:receive("*l")
  end
  s:close()
  return reply
end

-- Seconds left in Redis' current window of w seconds.
local function left_in_window(port, w)
  local t = redis_cmd(port, "TIME")
  return w - tonumber(t[1]) % w
end

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
local app = proxy.upstream "app" { servers = { "${app}" } }
local R = proxy.redis { addr = "127.0.0.1:${redis}", timeout = 0.5 }
local dead = proxy.redis { addr = "127.0.0.1:${dead}", timeout = 0.2 }  -- nothing listens
local mute = proxy.redis { addr = "${mute}", timeout = 0.2 }            -- accepts, never answers
local function limited(path, opts)
  opts[1], opts.key = "rate_limit", "header:x-key"
  proxy.route { path = path, upstream = app, plugins = { opts } }
end
limited("/win", { limit = 5, window = 3600, policy = "redis", redis = R })
limited("/bucket", { rate = 0.001, burst = 5, policy = "redis", redis = R })
limited("/batch", { limit = 10, window = 3600, policy = "redis", redis = R, batch = 3 })
limited("/real-deny", { limit = 100, window = 3600, policy = "redis", redis = R, on_error = "deny" })
limited("/down-local", { limit = 2, window = 3600, policy = "redis", redis = dead })
limited("/down-allow", { limit = 2, window = 3600, policy = "redis", redis = dead, on_error = "allow" })
limited("/down-deny", { limit = 2, window = 3600, policy = "redis", redis = dead, on_error = "deny" })
limited("/mute", { limit = 1000, window = 3600, policy = "redis", redis = mute, on_error = "allow" })
]=]

describe("rate_limit policy = redis #slow", function()
  local redis_port, redis, app, a, b, mute, serial, a_started

  lazy_setup(function()
    redis = rh.start()
    redis_port = redis.port
    mute = assert(socket.bind("127.0.0.1", 0))
    local _, mute_port = mute:getsockname()
    app = h.start_origin("app")
    local vars = { app = app.addr, redis = redis_port, dead = h.free_port(), mute = "127.0.0.1:" .. mute_port }
    a = h.start_proxy { workers = 2, config = CONFIG, vars = vars }
    a_started = socket.gettime()
    b = h.start_proxy { workers = 2, config = CONFIG, vars = vars }
    serial = 0
  end)

  lazy_teardown(function()
    if mute then mute:close() end
    local ok, err = pcall(h.shutdown, b) -- checks b's exit and log as it does a's
    h.shutdown(a, app)
    if redis then redis:cleanup() end
    assert(ok, err)
  end)

  -- A key no other test has used.
  local function new_key()
    serial = serial + 1
    return string.format("k%d-%d", serial, math.random(1, 1e9))
  end

  local function get(p, path, key)
    return assert(raw.get(p.port, path, { ["x-key"] = key }, { timeout = 10 }))
  end

  -- n requests alternating between the two proxies (each on a new
  -- connection, so on either worker): how many were let through.
  local function admitted(path, key, n)
    local ok = 0
    for i = 1, n do
      local res = get(i % 2 == 1 and a or b, path, key)
      if res.status == 200 then
        ok = ok + 1
      else
        assert.equal(429, res.status, res.body)
      end
    end
    return ok
  end

  -- Waits for a fresh hour window when the current one ends within 5 s.
  local function not_near_the_window_end()
    local left = left_in_window(redis_port, 3600)
    if left < 5 then socket.sleep(left + 0.1) end
  end

  it("two proxies sharing Redis admit one limit per fixed window", function()
    not_near_the_window_end()
    local key = new_key()
    assert.equal(5, admitted("/win", key, 12))
    local res = get(a, "/win", key)
    assert.equal(429, res.status)
    local wait = tonumber(res:header("retry-after"))
    assert(wait >= 1 and wait <= 3600, res:header("retry-after"))
    assert.equal(200, get(b, "/win", new_key()).status) -- another key has its own count
  end)

  it("two proxies sharing Redis admit one token bucket", function()
    assert.equal(5, admitted("/bucket", new_key(), 12))
  end)

  it("with batch never admits more than the limit across proxies and workers", function()
    not_near_the_window_end()
    local key = new_key()
    local n = admitted("/batch", key, 30)
    -- 4 workers each hold at most batch - 1 = 2 units: at least 10 - 3 * 2
    assert(n <= 10 and n >= 4, n .. " admitted")
    local rkey = "moonproxy:rate_limit:w10/3600/header:x-key|" .. key
    local counted = redis_cmd(redis_port, "HGET", rkey, "n")
    assert(tonumber(counted) <= 10, tostring(counted))
  end)

  -- n requests sent at once, half to each proxy: how many were let through.
  local function admitted_at_once(path, key, n)
    local conns = {}
    for i = 1, n do
      conns[i] = assert(raw.connect((i % 2 == 1 and a or b).port, { timeout = 10 }))
      conns[i]:send(raw.build { target = path, headers = { host = "a", ["x-key"] = key } })
    end
    local ok = 0
    for i = 1, n do
      local res = assert(conns[i]:read_response())
      conns[i]:close()
      if res.status == 200 then
        ok = ok + 1
      else
        assert.equal(429, res.status, res.body)
      end
    end
    return ok
  end

  it("holds the limit under requests sent at once (fixed window, bucket, batch)", function()
    not_near_the_window_end()
    assert.equal(5, admitted_at_once("/win", new_key(), 40))
    assert.equal(5, admitted_at_once("/bucket", new_key(), 40))
    local n = admitted_at_once("/batch", new_key(), 40)
    assert(n <= 10 and n >= 4, n .. " admitted")
  end)

  it("on_error = local counts in the process while Redis cannot be reached", function()
    local key = new_key()
    local st = {}
    for i = 1, 4 do st[i] = get(a, "/down-local", key).status end
    assert.same({ 200, 200, 429, 429 }, st)
    assert.equal(200, get(b, "/down-local", key).status) -- the other process counts its own
  end)

  it("on_error = allow lets every request through", function()
    local key = new_key()
    for _ = 1, 5 do
      local res = get(a, "/down-allow", key)
      assert.equal(200, res.status)
      assert.is_nil(res:header("ratelimit-limit"))
    end
  end)

  it("on_error = deny answers 503 with Retry-After", function()
    local res = get(a, "/down-deny", new_key())
    assert.equal(503, res.status)
    assert.equal("rate limit unavailable\n", res.body)
    local wait = tonumber(res:header("retry-after"))
    assert(wait >= 1 and wait <= 30, res:header("retry-after"))
  end)

  it("a Redis that never answers costs one timeout, not one per request (the circuit)", function()
    local key = new_key()
    local t0 = socket.gettime()
    for _ = 1, 30 do
      assert.equal(200, get(a, "/mute", key).status)
    end
    -- each worker waits 0.2 s once, then skips Redis for 1 s; 30 timeouts would be 6 s
    local took = socket.gettime() - t0
    assert(took < 2, "30 requests took " .. took .. " s")
  end)

  it("logs Redis failures at most once per second per worker", function()
    local key = new_key()
    for _ = 1, 20 do
      assert.equal(200, get(a, "/down-allow", key).status)
    end
    local n = select(2, a:stderr():gsub("%[warn%] rate_limit: redis 127%.0%.0%.1:%d+: ", ""))
    local bound = 2 * (math.ceil(socket.gettime() - a_started) + 1) -- 2 workers
    assert(n >= 1 and n <= bound, n .. " lines, at most " .. bound .. ":\n" .. a:stderr())
  end)

  it("a Redis that went away and came back (its scripts gone) counts again", function()
    local key = new_key()
    assert.equal(200, get(a, "/real-deny", key).status)
    redis:stop()
    assert.equal(503, get(a, "/real-deny", key).status)
    redis:start() -- the same port, nothing in it
    -- the circuit is open for 1 s, then 2 s...: bounded by the 30 s cap
    h.eventually(function() return get(a, "/real-deny", key).status == 200 end, 10, 0.2)
    h.eventually(function() return get(b, "/real-deny", key).status == 200 end, 10, 0.2)
    local rkey = "moonproxy:rate_limit:w100/3600/header:x-key|" .. key
    assert(tonumber(redis_cmd(redis_port, "HGET", rkey, "n")) >= 2)
  end)
end)

describe("rate_limit policy = redis: the circuit's half-open probe #slow", function()
  local redis, app, p

  lazy_setup(function()
    redis = rh.start()
    app = h.start_origin("app")
    p = h.start_proxy { workers = 1, vars = { app = app.addr, redis = redis.port }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local app = proxy.upstream "app" { servers = { "${app}" } }
local R = proxy.redis { addr = "127.0.0.1:${redis}", timeout = 3 }
proxy.route { path = "/half", upstream = app, plugins = {
  { "rate_limit", key = "header:x-key", limit = 1000, window = 3600, policy = "redis", redis = R, on_error = "deny" } } }
]=] }
  end)

  lazy_teardown(function()
    h.shutdown(p, app)
    if redis then redis:cleanup() end
  end)

  local function get()
    return assert(raw.get(p.port, "/half", { ["x-key"] = "probe" }, { timeout = 10 }))
  end

  -- calls= of a command in Redis' INFO commandstats (0 when never called)
  local function calls(cmd)
    local info = assert(redis:cmd("INFO", "commandstats"))
    return tonumber(info:match("cmdstat_" .. cmd .. ":calls=(%d+)")) or 0
  end

  -- 20 requests sent at once: their statuses, sorted
  local function burst()
    local conns = {}
    for i = 1, 20 do
      conns[i] = assert(raw.connect(p.port, { timeout = 10 }))
      conns[i]:send(raw.build { target = "/half", headers = { host = "a", ["x-key"] = "probe" } })
    end
    local st = {}
    for i = 1, 20 do
      local res = assert(conns[i]:read_response())
      conns[i]:close()
      st[i] = res.status
      if res.status == 503 then assert.equal("rate limit unavailable\n", res.body) end
    end
    table.sort(st)
    return st
  end

  it("sends one probe while half-open, the others follow on_error; then counts in Redis again", function()
    assert.equal(200, get().status) -- the script's SHA is known from here on
    redis:stop()
    assert.equal(503, get().status) -- the circuit opens
    redis:start() -- the same port, empty: the probe meets NOSCRIPT and runs EVAL
    -- Redis holds every command for 1 s, so that the probe is still waiting
    -- when all 20 requests arrive. While the circuit is still open all 20
    -- are denied at once and none reaches Redis: sent again until the
    -- circuit lets one through (bounded).
    local st
    h.eventually(function()
      assert.equal("OK", redis:cmd("CLIENT", "PAUSE", "1000", "ALL"))
      st = burst()
      return st[1] == 200
    end, 20, 0.1)
    local expected = { 200 }
    for i = 2, 20 do expected[i] = 503 end
    assert.same(expected, st)
    -- what reached Redis: the probe's one EVALSHA (NOSCRIPT) and its EVAL
    assert.equal(1, calls("evalsha"))
    assert.equal(1, calls("eval"))
    -- closed again: each request counts in Redis
    for _ = 1, 5 do assert.equal(200, get().status) end
    assert.equal(6, calls("evalsha"))
    assert.equal("6", redis:cmd("HGET", "moonproxy:rate_limit:w1000/3600/header:x-key|probe", "n"))
  end)
end)
