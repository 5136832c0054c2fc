-- moonproxy.plugins.rate_limit_redis: rate_limit's counting in Redis: the two
-- scripts, and each worker's SHAs, circuits and batch leases (the options,
-- the circuit and batch's accuracy: rate_limit.lua's header).
local type, tostring, setmetatable, pcall = type, tostring, setmetatable, pcall
local min, huge, fmt = math.min, math.huge, string.format

local _M = {}

-- The scripts run in Redis (and, in spec/unit/rate_limit_spec.lua, on a fake
-- of it). Each returns { granted, remaining, retry_ms, reset_ms, window }:
-- granted of the want asked (0: refused), what is left, the milliseconds
-- until one more is possible and until the count is whole again, and the
-- window's number (0 for a bucket). TIME before the writes: Redis 7
-- replicates a script's effects.
local scripts = {
  window = [[
-- moonproxy rate_limit: fixed window (KEYS[1]; ARGV: limit, window_ms, want)
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local id = math.floor(now / window)
local left = (id + 1) * window - now
local c = redis.call("HMGET", KEYS[1], "id", "n")
local n = 0
if tonumber(c[1]) == id then
  n = tonumber(c[2]) or 0
end
local grant = math.max(0, math.min(want, limit - n))
if grant > 0 then
  n = n + grant
  redis.call("HSET", KEYS[1], "id", id, "n", n)
  redis.call("PEXPIRE", KEYS[1], left)
end
return { grant, math.max(0, limit - n), left, left, id }
]],
  bucket = [[
-- moonproxy rate_limit: token bucket (KEYS[1]; ARGV: rate, burst, want)
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call("HMGET", KEYS[1], "tokens", "at")
local tokens, at = tonumber(b[1]), tonumber(b[2])
if not tokens or not at then
  tokens, at = burst, now
elseif now > at then
  tokens, at = math.min(burst, tokens + (now - at) * rate), now
end
local grant = math.max(0, math.min(want, math.floor(tokens)))
if grant > 0 then
  tokens = tokens - grant
  redis.call("HSET", KEYS[1], "tokens", string.format("%.17g", tokens), "at", string.format("%.17g", at))
  redis.call("PEXPIRE", KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
local retry = 0
if grant == 0 then
  retry = math.ceil((1 - tokens) / rate * 1000)
end
return { grant, math.floor(tokens), retry, math.ceil((burst - tokens) / rate * 1000), 0 }
]],
}

-- Per worker (module state lives in one worker's VM): each client's script
-- SHAs and circuit; the leases and the lease calls in flight are in conf.

local shas = setmetatable({}, { __mode = "k" })     -- client -> { window = sha, bucket = sha }
local circuits = setmetatable({}, { __mode = "k" }) -- client -> { delay, open_until, probe_until }
local last_log = -huge
local MAX_DELAY, MAX_LEASES = 30, 10000

local function log(conf, c, err)
  local now = conf.proxy.now()
  if now < last_log + 1 or package.loaded["moonproxy.testing.callouts"] then
    return -- the simulator's trace shows the failed call already
  end
  last_log = now
  err = tostring(err)
  if err:sub(1, 6) ~= "redis " then -- the client's own failures name the server, error replies do not
    err = "redis " .. conf.redis.addr .. ": " .. err
  end
  io.stderr:write(fmt("%s [warn] rate_limit: %s (on_error = %s; Redis skipped for %g s)\n",
    os.date("!%Y-%m-%dT%H:%M:%SZ"), err, conf.on_error, c.delay))
end

local function circuit(r)
  local c = circuits[r]
  if not c then
    c = { delay = 0, open_until = -huge }
    circuits[r] = c
  end
  return c
end

-- r:call, where a raise is a failure too: a guard (proxy.expect) or
-- --explain cannot call out, and counts by on_error instead of failing.
local function call(r, ...)
  local ok, v, err = pcall(r.call, r, ...)
  if not ok then
    return nil, tostring(v)
  end
  return v, err
end

-- Runs the script for conf's algorithm on Redis key rk: the reply, or nil, err.
local function run_script(conf, rk, want)
  local r, which = conf.redis, conf.algo
  local s = shas[r]
  if not s then
    s = {}
    shas[r] = s
  end
  local a1, a2 = conf.args[1], conf.args[2]
  if not s[which] then
    local sha, err = call(r, "SCRIPT", "LOAD", scripts[which])
    if type(sha) ~= "string" then
      return nil, err or "SCRIPT LOAD: unexpected reply"
    end
    s[which] = sha
  end
  local v, err = call(r, "EVALSHA", s[which], 1, rk, a1, a2, want)
  if v == nil and type(err) == "string" and err:find("^NOSCRIPT") then
    -- Redis restarted or was flushed: EVAL runs it and caches it again, under the same SHA
    v, err = call(r, "EVAL", scripts[which], 1, rk, a1, a2, want)
  end
  return v, err
end

-- Counts one request for key k in Redis (or from this worker's lease):
-- allowed, remaining, seconds (to wait when refused, until the count is
-- whole when allowed); or nil and the circuit { open_until, ... } when Redis
-- cannot be reached. conf: what rate_limit's schema made (redis, algo, args,
-- batch, rprefix, window, leases, nleases, pending, npending, proxy,
-- on_error).
function _M.count(conf, k)
  local now = conf.proxy.now()
  local leases = conf.leases
  local lease = leases and leases[k]
  if lease then
    if lease.n > 0 and now < lease.expires then
      lease.n = lease.n - 1
      if lease.n == 0 then
        leases[k], conf.nleases = nil, conf.nleases - 1
      end
      return true, lease.remaining + lease.n, conf.window and lease.expires - now or lease.reset
    end
    leases[k], conf.nleases = nil, conf.nleases - 1
  end
  local c = circuit(conf.redis)
  if now < c.open_until or (c.probe_until and now < c.probe_until) then
    return nil, c
  end
  if c.delay > 0 then
    c.probe_until = now + conf.redis.timeout + 1 -- this request tries Redis; the others wait for it
  end
  -- One lease per key in flight: while one is asked for, this worker's other
  -- requests for the key ask for 1 unit, so it holds at most batch - 1.
  local want, pending = conf.batch, conf.pending
  if want > 1 then
    local p = pending[k]
    if p and now < p then
      want = 1
    else
      if not p then
        if conf.npending >= MAX_LEASES then -- calls cancelled mid-way left theirs
          pending, conf.npending = {}, 0
          conf.pending = pending
        end
        conf.npending = conf.npending + 1
      end
      pending[k] = now + conf.redis.timeout + 1
    end
  end
  local v, err = run_script(conf, conf.rprefix .. k, want)
  if want > 1 and conf.pending[k] then
    conf.pending[k], conf.npending = nil, conf.npending - 1
  end
  now = conf.proxy.now()
  if type(v) ~= "table" or type(v[1]) ~= "number" or type(v[3]) ~= "number" then
    c.delay = c.delay > 0 and min(MAX_DELAY, c.delay * 2) or 1
    c.open_until, c.probe_until = now + c.delay, nil
    log(conf, c, err or "unexpected reply to the script")
    return nil, c
  end
  c.delay, c.open_until, c.probe_until = 0, -huge, nil
  local granted, remaining, retry_ms, reset_ms, id = v[1], v[2] or 0, v[3], v[4] or 0, v[5]
  if granted < 1 then
    return false, 0, retry_ms / 1000
  end
  if granted > 1 then
    leases = conf.leases
    lease = leases[k]
    if lease and lease.id == id then -- another request of this worker leased meanwhile
      lease.n = lease.n + granted - 1
    else
      if not lease then
        if conf.nleases >= MAX_LEASES then -- many keys: drop the leases (their units lapse)
          leases, conf.nleases = {}, 0
          conf.leases = leases
        end
        conf.nleases = conf.nleases + 1
      end
      leases[k] = { n = granted - 1, id = id, expires = conf.window and now + reset_ms / 1000 or huge,
        remaining = remaining, reset = reset_ms / 1000 }
    end
  end
  return true, remaining + granted - 1, reset_ms / 1000
end

return _M
