-- moonproxy.plugins.util: what the bundled plugins share: option checking
-- that raises plain messages (the loader adds the operator's file:line), header
-- names and values, IP/CIDR sets in a fast form, base64 decoding.
local schema = require "moonproxy.schema"
local bit = require "bit"

local type, ipairs, tonumber, tostring, error, unpack = type, ipairs, tonumber, tostring, error, unpack
local byte, char, sub, fmt, concat = string.byte, string.char, string.sub, string.format, table.concat
local band, bor, lshift, rshift = bit.band, bit.bor, bit.lshift, bit.rshift
local floor = math.floor

local _M = { size = schema.size, boolean = schema.boolean, string = schema.string, list = schema.list }

-- Checks the keys of t (nil reads as {}) against spec { key = checker }, where
-- a checker is function(v, path) -> value, or nil, "must be ..., got ..."
-- (or nil, message, true when the message already names the path). Returns a
-- new table of checked values, or nil and a message naming the path.
local function check_table(t, spec, path)
  if t == nil then
    t = {}
  elseif type(t) ~= "table" then
    return nil, fmt("%s must be a table, got %s", path or "options", schema.show(t))
  end
  local out, prefix = {}, path and path .. "." or ""
  for _, k in ipairs(schema.sorted_keys(t)) do
    local checker = spec[k]
    if type(k) ~= "string" then
      return nil, fmt("unexpected value %s at [%s] (options are name = value)", schema.show(t[k]), schema.show(k))
    elseif not checker then
      local hint = schema.suggest(k, schema.sorted_keys(spec))
      return nil, fmt("unknown option '%s%s'%s", prefix, k, hint and fmt(" (did you mean '%s'?)", hint) or "")
    end
    local v, err, placed = checker(t[k], prefix .. k)
    if err ~= nil then
      return nil, placed and err or fmt("'%s%s' %s", prefix, k, err)
    end
    out[k] = v
  end
  return out
end

-- The plugin's entry point: check_table that raises the message as it is
-- (the loader prefixes "file:line: plugin 'name': ").
function _M.check(conf, spec)
  local out, err = check_table(conf, spec)
  if not out then
    error(err, 0)
  end
  return out
end

-- A checker for a nested table of options.
function _M.options(spec)
  return function(v, path)
    local out, err = check_table(v, spec, path)
    return out, err, true
  end
end

function _M.fail(...)
  error(fmt(...), 0)
end

local function bad(v, msg)
  return nil, msg .. ", got " .. schema.show(v)
end
_M.bad = bad

-- A header name (an RFC 9110 token), lowercased.
function _M.header_name(v)
  if type(v) ~= "string" or not v:match("^[%w!#$%%&'*+.^_`|~-]+$") then
    return bad(v, "must be a header name")
  end
  return v:lower()
end

-- A header name that hooks may write: not one the proxy manages (framing and
-- connection), which the runtime refuses to change.
local managed = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true, ["keep-alive"] = true,
  te = true, trailer = true, upgrade = true, ["proxy-connection"] = true }

function _M.writable_header_name(v)
  local name, err = _M.header_name(v)
  if name and managed[name] then
    return nil, "must not be a header the proxy manages (framing and connection), got " .. schema.show(v)
  end
  return name, err
end

-- A header value: a string (or a number, kept as text) without CR, LF or NUL.
function _M.header_value(v)
  if type(v) == "number" then
    v = tostring(v)
  end
  if type(v) ~= "string" or v:find("[\r\n%z]") then
    return bad(v, "must be a header value (a string without CR, LF or NUL)")
  end
  return v
end

-- Adds value (a string or a list) to headers[name], keeping the values there.
function _M.append_header(headers, name, value)
  local cur = headers[name]
  if cur == nil then
    headers[name] = value
    return
  end
  local list = type(cur) == "table" and { unpack(cur) } or { cur }
  if type(value) == "table" then
    for _, v in ipairs(value) do
      list[#list + 1] = v
    end
  else
    list[#list + 1] = value
  end
  headers[name] = list
end

-- IP addresses ---------------------------------------------------------------
-- Every address becomes 16 bytes; IPv4 a.b.c.d is ::ffff:a.b.c.d, so an
-- IPv4-mapped client address matches IPv4 rules and a.b.c.d/n is ::ffff:0:0/(96+n).

local function ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then
    return nil
  end
  local out = { a, b, c, d }
  for i = 1, 4 do
    local p = out[i]
    if #p > 3 or (#p > 1 and byte(p) == 48) or tonumber(p) > 255 then -- no "010": octal to some
      return nil
    end
    out[i] = tonumber(p)
  end
  return out
end

local function groups(s, out)
  if s ~= "" then
    for g in (s .. ":"):gmatch("([^:]*):") do
      if not g:match("^%x%x?%x?%x?$") then
        return nil
      end
      out[#out + 1] = tonumber(g, 16)
    end
  end
  return out
end

local function ipv6(s)
  local tail = {}
  if s:find(".", 1, true) then
    local at = s:match("^.*():")
    local v4 = at and ipv4(s:sub(at + 1))
    if not v4 then
      return nil
    end
    tail = { v4[1] * 256 + v4[2], v4[3] * 256 + v4[4] }
    s = s:sub(at - 1, at) == "::" and s:sub(1, at) or s:sub(1, at - 1)
  end
  local left, right = s:match("^(.-)::(.*)$")
  local g
  if left then
    local l, r = groups(left, {}), not right:find("::", 1, true) and groups(right, {})
    if not l or not r or #l + #r + #tail > 7 then
      return nil
    end
    g = l
    for _ = 1, 8 - #l - #r - #tail do
      g[#g + 1] = 0
    end
    for _, x in ipairs(r) do
      g[#g + 1] = x
    end
  else
    g = groups(s, {})
    if not g or #g + #tail ~= 8 then
      return nil
    end
  end
  for _, x in ipairs(tail) do
    g[#g + 1] = x
  end
  local b = {}
  for i = 1, 8 do
    b[2 * i - 1], b[2 * i] = rshift(g[i], 8), band(g[i], 255)
  end
  return char(unpack(b))
end

-- "10.1.2.3" or "2001:db8::1" (also "::ffff:10.1.2.3") -> 16 bytes and
-- whether it was written as IPv4; nil if s is not a numeric address.
function _M.parse_ip(s)
  local v4 = ipv4(s)
  if v4 then
    return "\0\0\0\0\0\0\0\0\0\0\255\255" .. char(v4[1], v4[2], v4[3], v4[4]), true
  end
  return ipv6(s), false
end

-- The first len bits of a 16-byte address, as a string key.
local function prefix(addr, len)
  local full, rest = floor(len / 8), len % 8
  if rest == 0 then
    return sub(addr, 1, full)
  end
  return sub(addr, 1, full) .. char(band(byte(addr, full + 1), lshift(0xff, 8 - rest)))
end

-- "ip" or "ip/len" -> 16-byte address, prefix length over 128 bits; or nil.
local function parse_cidr(c)
  if type(c) ~= "string" then
    return nil
  end
  local ip, len = c:match("^([^/]+)/(%d%d?%d?)$")
  local addr, is4 = _M.parse_ip(ip or c)
  local bits = is4 and 32 or 128
  len = tonumber(len) or bits
  if addr and len <= bits then
    return addr, is4 and len + 96 or len
  end
end

-- A checker: a list of "ip" or "ip/len" -> a set { lens = {...}, [len] = { [prefix] = true } }
-- (host bits past len are ignored: "10.1.2.3/8" is 10.0.0.0/8).
function _M.cidrs(v, path)
  local list, err = schema.list(function(e) return e end)(type(v) == "string" and { v } or v, nil, path)
  if err then
    return bad(v, 'must be a list of addresses or CIDRs ("10.0.0.0/8", "2001:db8::/32")')
  end
  local set = { lens = {} }
  for i, c in ipairs(list) do
    local addr, len = parse_cidr(c)
    if not addr then
      return nil, fmt("'%s[%d]' must be an address or CIDR, got %s", path, i, schema.show(c)), true
    end
    if not set[len] then
      set[len] = {}
      set.lens[#set.lens + 1] = len
    end
    set[len][prefix(addr, len)] = true
  end
  return set
end

-- Whether the 16-byte addr is in a set made by cidrs(): one hash lookup per
-- distinct prefix length.
function _M.cidr_match(set, addr)
  local lens = set.lens
  for i = 1, #lens do
    local len = lens[i]
    if set[len][prefix(addr, len)] then
      return true
    end
  end
  return false
end

-- base64 ----------------------------------------------------------------------

local b64 = {}
for i = 1, 64 do
  b64[byte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", i)] = i - 1
end

-- Decodes standard base64 (RFC 4648 §4); "=" padding is optional but, when
-- present, must complete the last quantum. Returns nil on any other byte.
function _M.b64decode(s)
  local n = #s
  local data = s:match("^([^=]*)=?=?$")
  if not data or (#data ~= n and (n % 4 ~= 0 or data == "")) or #data % 4 == 1 then
    return nil
  end
  local out, m = {}, #data
  for i = 1, m, 4 do
    local a, b, c, d = byte(data, i, i + 3)
    a, b, c, d = b64[a], b64[b], c and b64[c], d and b64[d]
    if not a or not b or (c == nil and i + 2 <= m) or (d == nil and i + 3 <= m) then
      return nil
    end
    local w = bor(lshift(a, 18), lshift(b, 12), lshift(c or 0, 6), d or 0)
    out[#out + 1] = char(rshift(w, 16), band(rshift(w, 8), 255), band(w, 255)):sub(1, (d and 3) or (c and 2) or 1)
  end
  return concat(out)
end

return _M
