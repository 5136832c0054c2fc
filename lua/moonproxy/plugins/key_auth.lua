-- moonproxy.plugins.key_auth: lets a request through only with a known API key.
--
--   { "key_auth", keys = { ["k-123"] = "billing", ["k-456"] = "search" },
--     header = "apikey", query = "apikey", hide_credentials = true }
--
-- keys              required: a list of keys { "k1", "k2" } and/or a map
--                   { [key] = "consumer name" }. A listed key's consumer is
--                   "key#N", its position (the key itself never reaches logs).
-- header            the request header holding the key (default "apikey"), or
--                   false to read the query string only.
-- query             a query parameter also holding the key (default: none); the
--                   header wins when both are present.
-- hide_credentials  remove the header (and the query parameter) before the
--                   request is forwarded (default false).
-- realm             the realm in WWW-Authenticate (default "moonproxy").
--
-- A missing or unknown key, or a header sent twice, gets 401 with
-- WWW-Authenticate: Key realm="...". On success req.ctx.consumer is set.
-- Keys are found by one hash lookup of the interned key string, so no
-- byte-by-byte comparison leaks how much of a key was right.
local util = require "moonproxy.plugins.util"

local type, pairs, next, tonumber, floor = type, pairs, next, tonumber, math.floor
local char, concat = string.char, table.concat

local function keys(v)
  if type(v) ~= "table" or next(v) == nil then
    return util.bad(v, 'must list keys { "k1", ... } or map them to consumers { k1 = "name" }')
  end
  local out = {}
  for k, name in pairs(v) do
    local key, consumer = k, name
    if type(k) == "number" then
      key, consumer = name, "key#" .. k
      if k ~= floor(k) or k < 1 or k > #v then
        return util.bad(k, "must be a list or a map of keys")
      end
    end
    if type(key) ~= "string" or key == "" or key:find("[%s%z]") then
      return util.bad(key, "must hold keys: non-empty strings without spaces")
    elseif type(consumer) ~= "string" or consumer == "" then
      return util.bad(consumer, "must map keys to consumer names (non-empty strings)")
    elseif out[key] then
      return nil, "lists a key twice"
    end
    out[key] = consumer
  end
  return out
end

local function header(v)
  if v == false then
    return v
  end
  return util.writable_header_name(v)
end

local function realm(v)
  if type(v) ~= "string" or v:find('["\\%c]') then
    return util.bad(v, 'must be a string without quotes, backslashes or control characters')
  end
  return v
end

local spec = { keys = keys, header = header, query = util.string, hide_credentials = util.boolean, realm = realm }

local function unescape(s)
  s = s:gsub("%+", " ")
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- The first value of parameter name in query, and the query without it.
local function from_query(query, name)
  local found, rest = nil, {}
  for pair in query:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    if unescape(k) == name then
      found = found or unescape(v)
    else
      rest[#rest + 1] = pair
    end
  end
  return found, concat(rest, "&")
end

local function refuse(conf, req, what)
  return req:respond(401, what .. "\n", { ["WWW-Authenticate"] = conf.challenge })
end

return {
  name = "key_auth",

  schema = function(conf)
    local c = util.check(conf, spec)
    if not c.keys then
      util.fail('needs keys = { "k1", ... } or { k1 = "consumer" }')
    elseif c.header == false and not c.query then
      util.fail("header = false needs query = \"name\"")
    end
    return {
      keys = c.keys,
      header = c.header == nil and "apikey" or c.header,
      query = c.query,
      hide = c.hide_credentials or false,
      challenge = 'Key realm="' .. (c.realm or "moonproxy") .. '"',
    }
  end,

  on_request = function(conf, req)
    local key = conf.header and req.headers[conf.header] or nil
    local in_query, rest
    if conf.query and req.query and (key == nil or conf.hide) then
      in_query, rest = from_query(req.query, conf.query)
      key = key or in_query
    end
    if key == nil or key == "" then
      return refuse(conf, req, "missing API key")
    end
    local consumer = type(key) == "string" and conf.keys[key]
    if not consumer then
      return refuse(conf, req, "invalid API key")
    end
    req.ctx.consumer = consumer
    if conf.hide then
      if conf.header then
        req.headers[conf.header] = nil
      end
      if in_query then
        req:set_query(rest ~= "" and rest or nil)
      end
    end
  end,
}
