-- moonproxy.schema: argument checks for the configuration DSL: tables of
-- known keys, integers, sizes, durations, addresses. A checker is
-- function(v, src, what) -> value, or nil, "must be ..., got ...".
local type, tostring, tonumber, pairs, ipairs, error = type, tostring, tonumber, pairs, ipairs, error
local floor, min, huge = math.floor, math.min, math.huge
local fmt, sort, concat = string.format, table.sort, table.concat

local _M = {}

function _M.show(v)
  if type(v) == "string" then
    return fmt("%q", v)
  elseif type(v) == "table" or type(v) == "function" then
    return "a " .. type(v)
  end
  return tostring(v)
end
local show = _M.show

-- Raises "src: message": src is the "file:line" of the operator's call, so the
-- message points at the declaration however deep the check runs.
function _M.fail(src, ...)
  error(src .. ": " .. fmt(...), 0)
end
local fail = _M.fail

local function bad(v, msg)
  return nil, msg .. ", got " .. show(v)
end
_M.bad = bad

local function distance(a, b)
  local prev, cur = {}, {}
  for j = 0, #b do
    prev[j] = j
  end
  for i = 1, #a do
    cur[0] = i
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev, cur = cur, prev
  end
  return prev[#b]
end

-- The candidate closest to word, if it is close enough to be a typo.
function _M.suggest(word, candidates)
  local best, best_d = nil, floor((#word + 1) / 3)
  for _, c in ipairs(candidates) do
    local d = distance(word, c)
    if d <= best_d and (d < best_d or not best) then
      best, best_d = c, d
    end
  end
  return best
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end
_M.sorted_keys = sorted_keys

-- Checks the keys of t against spec { key = checker } and returns a new table
-- of checked values. Unknown keys raise (with a suggestion); keys in later
-- (features of a coming release) raise "... is not supported yet".
function _M.check(t, spec, what, src, later)
  if type(t) ~= "table" then
    fail(src, "%s: expects a table, got %s", what, type(t) == "string" and show(t) or type(t))
  end
  local out = {}
  for _, k in ipairs(sorted_keys(t)) do
    local v = t[k]
    local checker = spec[k]
    if later and later[k] then
      fail(src, "%s: '%s' is not supported yet", what, k)
    elseif not checker then
      if type(k) ~= "string" then
        fail(src, "%s: unexpected value %s at [%s] (options are name = value)", what, show(v), show(k))
      end
      local hint = _M.suggest(k, sorted_keys(spec))
      fail(src, "%s: unknown key '%s'%s", what, k, hint and fmt(" (did you mean '%s'?)", hint) or "")
    end
    local val, err = checker(v, src, what .. ": " .. k)
    if err then
      fail(src, "%s: %s %s", what, k, err)
    end
    out[k] = val
  end
  return out
end

function _M.integer(lo, hi)
  local msg = hi and fmt("must be an integer from %d to %d", lo, hi) or fmt("must be an integer >= %d", lo)
  hi = hi or 2 ^ 31 - 1
  return function(v)
    if type(v) ~= "number" or v ~= floor(v) or v < lo or v > hi then
      return bad(v, msg)
    end
    return v
  end
end

function _M.boolean(v)
  if type(v) ~= "boolean" then
    return bad(v, "must be true or false")
  end
  return v
end

-- One of the strings in list: one_of { "reject", "keep" }.
function _M.one_of(list)
  local shown = {}
  for i, v in ipairs(list) do
    shown[i] = show(v)
  end
  local msg = "must be " .. concat(shown, ", ", 1, #shown - 1) .. " or " .. shown[#shown]
  return function(v)
    for _, ok in ipairs(list) do
      if v == ok then
        return v
      end
    end
    return bad(v, msg)
  end
end

function _M.func(v)
  if type(v) == "function" then
    return v
  end
  return bad(v, "must be a function")
end

function _M.string(v)
  if type(v) ~= "string" or v == "" then
    return bad(v, "must be a non-empty string")
  end
  return v
end

local units = { [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3 }

-- A number of bytes, or "64k", "10m", "1g" (k = 1024).
function _M.size(v)
  local n = v
  if type(v) == "string" then
    local digits, unit = v:match("^(%d+)([kKmMgG]?)$")
    n = digits and tonumber(digits) * units[unit:lower()]
  end
  if type(n) ~= "number" or n < 0 or n ~= floor(n) or n >= 2 ^ 53 then
    return bad(v, 'must be a size: a number of bytes or a string like "64k", "10m", "1g"')
  end
  return n
end

function _M.duration(v)
  if type(v) ~= "number" or v ~= v or v <= 0 or v == huge then
    return bad(v, "must be a number of seconds greater than 0")
  end
  return v
end

local function ipv4(h)
  local parts = { h:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #parts ~= 4 then
    return false
  end
  for _, p in ipairs(parts) do
    if #p > 3 or tonumber(p) > 255 then
      return false
    end
  end
  return true
end

-- A DNS name: labels of letters, digits, "-" and "_" (at most 63 each, 253 in all).
local function dns_name(h)
  if #h > 253 then
    return false
  end
  for label in (h .. "."):gmatch("([^.]*)%.") do
    if label == "" or #label > 63 or not label:match("^[%w_%-]+$") then
      return false
    end
  end
  return true
end

local function addr(v, listener)
  if type(v) ~= "string" then
    return bad(v, 'must be a string "host:port"')
  end
  local host, port = v:match("^%[([%x:%.]+)%]:(%d+)$")
  if not host then
    host, port = v:match("^([^:%[%]]*):(%d+)$")
    if not host then
      return bad(v, 'must be "host:port" or "[ipv6]:port"')
    elseif host == "" or host == "*" then
      if not listener then
        return bad(v, "needs a host")
      end
    elseif host ~= "localhost" and not ipv4(host) then
      if listener then
        return bad(v, "must use a numeric IP address or localhost (host names are not supported yet)")
      elseif host:match("^[%d.]+$") or not dns_name(host) then
        return bad(v, "must use a numeric IP address or a DNS name (letters, digits, \"-\", \"_\", dots)")
      end
    end
  end
  local n = tonumber(port)
  -- a listener may ask for port 0 (any free port; the tests use it)
  if #port > 5 or n > 65535 or (n == 0 and not listener) then
    return bad(v, listener and "needs a port from 0 to 65535" or "needs a port from 1 to 65535")
  end
  return v
end

-- Where to listen: "ip:port", "[ipv6]:port", "*:port" or ":port" (any address).
function _M.listen_addr(v)
  return addr(v, true)
end

-- Where to connect: "ip:port", "[ipv6]:port" or "name:port" (resolved: src/resolve.c).
function _M.server_addr(v)
  return addr(v, false)
end

-- A list (no holes, no other keys) whose elements pass elem.
function _M.list(elem, nonempty)
  return function(v, src, what)
    if type(v) ~= "table" then
      return bad(v, "must be a list")
    end
    local n = 0
    for _ in pairs(v) do
      n = n + 1
    end
    if n ~= #v then
      return bad(v, "must be a list (no holes, no named keys)")
    elseif nonempty and n == 0 then
      return nil, "must not be empty"
    end
    local out = {}
    for i, e in ipairs(v) do
      local val, err = elem(e, src, fmt("%s[%d]", what, i))
      if err then
        return nil, fmt("[%d] %s", i, err)
      end
      out[i] = val
    end
    return out
  end
end

-- "GET", or a list of methods; normalized to an uppercase list.
function _M.methods(v, src, what)
  local list = type(v) == "string" and { v } or v
  local out, err = _M.list(_M.string, true)(list, src, what)
  if err then
    return bad(v, 'must be a method ("GET") or a list of methods')
  end
  for i, m in ipairs(out) do
    if not m:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      return bad(m, "must be HTTP method names")
    end
    out[i] = m:upper()
  end
  return out
end

-- An upstream's Host header value.
function _M.host_header(v)
  if type(v) ~= "string" or not v:match("^[%w.%-_:%[%]]+$") then
    return bad(v, 'must be a host name like "api.internal" (optionally with ":port")')
  end
  return v
end

-- A route's host: "api.example.com" or "*.example.com", lowercased.
function _M.route_host(v)
  local h = type(v) == "string" and v:lower()
  local name = h and (h:match("^%*%.(.+)$") or h)
  if not name or not (name:match("^[%w%-_]+[%w.%-_]*$") or name:match("^%[[%x:.]+%]$")) then
    return bad(v, 'must be a host name like "api.example.com" or "*.example.com" (no port)')
  end
  return h
end

-- A route's path or prefix.
function _M.uri_path(v)
  if type(v) ~= "string" or not v:match("^/[^%s?#]*$") then
    return bad(v, 'must start with "/" and hold no spaces, "?" or "#"')
  end
  return v
end

-- Route header filters { name = "value" | "~regex" } -> sorted list of
-- { name = lowercase, value =, regex = bool }.
function _M.header_filters(v)
  if type(v) ~= "table" then
    return bad(v, 'must be a table of name = "value" or name = "~regex"')
  end
  local out = {}
  for _, k in ipairs(sorted_keys(v)) do
    local val = v[k]
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      return bad(k, "must use header names as keys")
    elseif type(val) ~= "string" or val == "~" then
      return bad(val, fmt("['%s'] must be a string (\"value\" or \"~regex\")", k))
    end
    local is_re = val:sub(1, 1) == "~"
    out[#out + 1] = { name = k:lower(), value = is_re and val:sub(2) or val, regex = is_re }
  end
  return out
end

return _M
