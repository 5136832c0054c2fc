-- helpers.fake_req: stand-ins for what a plugin gets from the runtime (SPEC
-- "The request and response objects", "Shared state"), for unit specs.
--
--   local fake = require "helpers.fake_req"
--   local req = fake.request { method = "GET", headers = { apikey = "k1" }, remote_addr = "10.0.0.1" }
--   local res = fake.response { status = 200, headers = { server = "x" } }
--   req.response          -- after req:respond(): { status, body, headers }
--   fake.list(h, "vary")  -- every value of a header, as a list ({} when absent)
--
--   local proxy = fake.proxy()          -- proxy.now(), proxy.advance(dt), proxy.shared(name, size)
--   local restore = fake.install(proxy) -- package.loaded.moonproxy = proxy, until restore()
--   local plugin = fake.plugin("cors")  -- a fresh require of moonproxy.plugins.cors
--
-- The fakes are strict where the runtime raises: a header value must be a
-- string or a list of strings, a dict method must be called with a colon.
local setmetatable, getmetatable, type, ipairs, pairs, assert, error = setmetatable, getmetatable, type, ipairs, pairs,
  assert, error
local huge, min, max = math.huge, math.min, math.max

local _M = {}

_M.RESPONDED = setmetatable({}, { __tostring = function() return "<responded>" end })

local stores = setmetatable({}, { __mode = "k" }) -- headers object -> { lowercase name -> list }

local function values(name, v)
  if type(v) == "string" then
    return { v }
  elseif type(v) == "table" and #v > 0 then
    local out = {}
    for i, s in ipairs(v) do
      if type(s) ~= "string" then
        error("header " .. name .. ": value [" .. i .. "] is a " .. type(s) .. ", not a string", 3)
      end
      out[i] = s
    end
    return out
  end
  error("header " .. name .. ": value must be a string, a non-empty list of strings or nil, got " .. type(v), 3)
end

local headers_mt = {
  __index = function(h, name)
    local list = stores[h][name:lower()]
    if list == nil then
      return nil
    elseif #list == 1 then
      return list[1]
    end
    return { unpack(list) }
  end,
  __newindex = function(h, name, v)
    assert(type(name) == "string", "header names are strings")
    stores[h][name:lower()] = v ~= nil and values(name, v) or nil
  end,
}

-- Case-insensitive headers; init is { name = "value" | { "v1", "v2" } }.
function _M.headers(init)
  local h = setmetatable({}, headers_mt)
  stores[h] = {}
  for k, v in pairs(init or {}) do
    h[k] = v
  end
  return h
end

-- Every value of header name in h, as a list.
function _M.list(h, name)
  return { unpack(stores[h][name:lower()] or {}) }
end

-- Names (lowercase, sorted) of the headers in h.
function _M.names(h)
  local out = {}
  for k in pairs(stores[h]) do
    out[#out + 1] = k
  end
  table.sort(out)
  return out
end

function _M.request(t)
  t = t or {}
  local req = {
    method = t.method or "GET", path = t.path or "/", query = t.query, host = t.host or "example.test",
    scheme = "http", remote_addr = t.remote_addr or "127.0.0.1", id = t.id or "req-1", ctx = {},
    headers = _M.headers(t.headers),
  }
  if t.remote_addr == false then
    req.remote_addr = nil
  end
  function req:set_path(p)
    assert(type(p) == "string", "set_path takes a string")
    self.path = p
  end
  function req:set_query(q)
    assert(q == nil or type(q) == "string", "set_query takes a string or nil")
    self.query = q
  end
  function req:respond(status, body, headers)
    assert(not self.response, "responded twice")
    assert(type(status) == "number", "respond takes a status")
    assert(body == nil or type(body) == "string", "respond takes a string body")
    self.response = { status = status, body = body, headers = _M.headers(headers) }
    return _M.RESPONDED
  end
  return req
end

function _M.response(t)
  t = t or {}
  return { status = t.status or 200, headers = _M.headers(t.headers) }
end

-- Shared dictionaries ----------------------------------------------------------

local dict = {}
local dict_mt = { __index = dict }

local function self_check(self)
  if getmetatable(self) ~= dict_mt then
    error("call shared dictionary methods with a colon (dict:get(k))", 3)
  end
end

local function live(self, key)
  local e = self.data[key]
  if e and e.expires <= self.proxy.clock then
    self.data[key], e = nil, nil
  end
  return e
end

function dict:get(key)
  self_check(self)
  local e = live(self, key)
  return e and e.value
end

function dict:set(key, value, ttl)
  self_check(self)
  self.data[key] = value ~= nil and { value = value, expires = ttl and ttl > 0 and self.proxy.clock + ttl or huge } or nil
  return true
end

function dict:add(key, value, ttl)
  self_check(self)
  if live(self, key) then
    return nil, "exists"
  end
  return self:set(key, value, ttl)
end

function dict:incr(key, by, init, ttl)
  self_check(self)
  local e = live(self, key)
  if not e then
    if init == nil then
      return nil, "not found"
    end
    self:set(key, init, ttl)
    e = self.data[key]
  end
  e.value = e.value + (by or 1)
  return e.value
end

function dict:delete(key)
  self_check(self)
  self.data[key] = nil
end

-- Token bucket: full (burst) when new, refilled at rate per second.
function dict:take(key, rate, burst, cost)
  self_check(self)
  cost = cost or 1
  self.takes = self.takes + 1
  local now = self.proxy.clock
  local b = self.buckets[key] or { tokens = burst, at = now }
  b.tokens, b.at = min(burst, b.tokens + (now - b.at) * rate), now
  self.buckets[key] = b
  if b.tokens >= cost then
    b.tokens = b.tokens - cost
    return true, b.tokens, 0
  end
  return false, b.tokens, max(0, (cost - b.tokens) / rate)
end

-- A fake `moonproxy` module: a clock that moves only by advance(), shared
-- dictionaries, and shared_calls (every proxy.shared(name, size) call).
function _M.proxy()
  local p = { clock = 1000, dicts = {}, shared_calls = {} }
  function p.now()
    return p.clock
  end
  function p.advance(dt)
    p.clock = p.clock + dt
  end
  function p.shared(name, size)
    assert(type(name) == "string" and name ~= "", "proxy.shared needs a name")
    assert(type(size) == "number" or (type(size) == "string" and size:match("^%d+[kKmMgG]?$")), "proxy.shared: bad size")
    p.shared_calls[#p.shared_calls + 1] = { name = name, size = size }
    p.dicts[name] = p.dicts[name] or setmetatable({ proxy = p, data = {}, buckets = {}, takes = 0 }, dict_mt)
    return p.dicts[name]
  end
  return p
end

-- Makes fake the `moonproxy` module; returns a function that puts back the old one.
function _M.install(fake)
  local saved = package.loaded.moonproxy
  package.loaded.moonproxy = fake
  return function()
    package.loaded.moonproxy = saved
  end
end

-- A fresh copy of plugin name (so it sees the module installed now).
function _M.plugin(name)
  local mod = "moonproxy.plugins." .. name
  package.loaded[mod] = nil
  return require(mod)
end

return _M
