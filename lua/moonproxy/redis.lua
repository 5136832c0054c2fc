-- moonproxy.redis: Redis clients for hooks and plugins (README "Redis").
--
--   local r = proxy.redis { addr = "127.0.0.1:6379", password = nil, db = 0, timeout = 0.2, pool = 16 }
--   local n, err = r:call("INCR", "seen:" .. user)        -- in a hook: it waits without blocking
--   local res, err = r:pipeline { { "INCR", "a" }, { "GET", "b" } }
--
-- Replies become Lua values: a status ("OK") or bulk string is a string, an
-- integer a number, an array a list, a nil bulk or nil array nil at the top
-- and redis.null (the NULL light userdata, equal to cjson.null) inside lists.
-- An error reply is nil, "ERR ..." from call and { err = "ERR ..." } as an
-- entry of a list. Failures (unreachable, timeout) are nil, err; they never
-- raise. A pipeline returns the list of its replies.
--
-- The server's binding is src/l_redis.c ("moonproxy.rediscore": connections
-- per worker, on its loop); in moonproxy.testing the spec answers the calls
-- (opts.redis = function(cmd, ...) ... end).
local schema = require "moonproxy.schema"
local binding = require "moonproxy.binding"

local type, setmetatable, select, tostring, error, require = type, setmetatable, select, tostring, error, require
local fmt = string.format

local _M = {}

-- The NULL light userdata: what a nil reply is inside a list.
_M.null = require("moonproxy.core").null

local Client = {}
Client.__index = Client
Client.__tostring = function(c) return "redis " .. c.addr end

local spec = {
  addr = schema.server_addr,
  password = schema.string,
  db = schema.integer(0, 65535),
  timeout = schema.duration,
  pool = schema.integer(1, 1024),
  name = schema.string,
}

local count = 0

-- Checks the options (errors at src, the declaration's file:line).
function _M.new(t, src)
  local o = schema.check(t, spec, "proxy.redis", src)
  if not o.addr then
    schema.fail(src, 'proxy.redis: needs addr = "host:port"')
  end
  count = count + 1
  return setmetatable({
    addr = o.addr, password = o.password, db = o.db or 0, timeout = o.timeout or 1, pool = o.pool or 16,
    name = o.name or fmt("%s#%d", o.addr, count),
  }, Client)
end

local function server()
  return binding.find("moonproxy.rediscore", "redis", "redis", 3)
end

local function check_args(n, ...)
  if n == 0 then
    error("redis: call expects a command", 3)
  end
  for i = 1, n do
    local v = select(i, ...)
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" then
      error(fmt("redis: argument %d must be a string or a number, got %s", i, tv), 3)
    end
  end
end

-- r:call(cmd, ...) -> value | nil, err
function Client:call(...)
  local n = select("#", ...)
  check_args(n, ...)
  local stub = package.loaded["moonproxy.testing.callouts"]
  if stub then
    return stub.redis(...)
  end
  local b = server()
  b.start(self, { ... }, n)
  return b.answer()
end

-- r:pipeline { { cmd, ... }, ... } -> { reply, ... } | nil, err
function Client:pipeline(cmds)
  if type(cmds) ~= "table" or #cmds == 0 then
    error("redis: pipeline expects a list of commands { { \"SET\", \"k\", \"v\" }, ... }", 2)
  end
  for i = 1, #cmds do
    local c = cmds[i]
    if type(c) ~= "table" then
      error(fmt("redis: pipeline command %d must be a list, got %s", i, type(c)), 2)
    end
    check_args(#c, unpack(c))
  end
  local stub = package.loaded["moonproxy.testing.callouts"]
  if stub then
    local out = {}
    for i = 1, #cmds do
      local v, err = stub.redis(unpack(cmds[i]))
      if v == nil and err ~= nil then
        out[i] = { err = tostring(err) }
      elseif v == nil then
        out[i] = _M.null
      else
        out[i] = v
      end
    end
    return out
  end
  local b = server()
  b.start(self, cmds, -#cmds)
  return b.answer()
end

return _M
