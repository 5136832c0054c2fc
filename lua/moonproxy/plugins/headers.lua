-- moonproxy.plugins.headers: rewrites request headers (before the request is
-- forwarded) and response headers (on the response head).
--
--   { "headers",
--     request  = { set = { ["x-env"] = "prod" }, append = { via = "moonproxy" }, remove = { "cookie" } },
--     response = { set = { ["cache-control"] = "no-store" }, remove = { "server", "x-powered-by" } } }
--
-- set replaces every value of the header; append adds a value and keeps the
-- ones there; remove drops the header. A value is a string (numbers are taken
-- as text) or a list of strings (several headers of that name). Each side runs
-- remove, then set, then append, in the alphabetical order of the names.
-- Headers the proxy manages (Content-Length, Transfer-Encoding, Connection,
-- Keep-Alive, TE, Trailer, Upgrade, Proxy-Connection) cannot be named.
local util = require "moonproxy.plugins.util"

local type, ipairs = type, ipairs
local sorted_keys = require("moonproxy.schema").sorted_keys

local function value(v, path)
  if type(v) == "table" then
    local list, err = util.list(util.header_value, true)(v, nil, path)
    return list, err and "must be a header value or a non-empty list of them: " .. err
  end
  return util.header_value(v)
end

-- { name = value } -> list of { lowercase name, value }.
local function name_values(v, path)
  if type(v) ~= "table" then
    return util.bad(v, "must be a table of name = value")
  end
  local out = {}
  for _, k in ipairs(sorted_keys(v)) do
    local name, err = util.writable_header_name(k)
    if err then
      return nil, "'" .. path .. "' " .. err, true
    end
    local val, verr = value(v[k], path .. "." .. k)
    if verr then
      return nil, "'" .. path .. "." .. k .. "' " .. verr, true
    end
    out[#out + 1] = { name, val }
  end
  return out
end

local function names(v, path)
  return util.list(util.writable_header_name)(type(v) == "string" and { v } or v, nil, path)
end

local side = util.options { set = name_values, append = name_values, remove = names }

local function apply(ops, headers)
  for _, name in ipairs(ops.remove) do
    headers[name] = nil
  end
  for _, nv in ipairs(ops.set) do
    headers[nv[1]] = nv[2]
  end
  for _, nv in ipairs(ops.append) do
    util.append_header(headers, nv[1], nv[2])
  end
end

local function normalize(ops)
  if ops and (ops.set or ops.append or ops.remove) then
    return { set = ops.set or {}, append = ops.append or {}, remove = ops.remove or {} }
  end
end

return {
  name = "headers",

  schema = function(conf)
    local c = util.check(conf, { request = side, response = side })
    local out = { request = normalize(c.request), response = normalize(c.response) }
    if not out.request and not out.response then
      util.fail("needs request = { set, append, remove } or response = { ... }")
    end
    return out
  end,

  on_request = function(conf, req)
    if conf.request then
      apply(conf.request, req.headers)
    end
  end,

  on_response = function(conf, _, res)
    if conf.response then
      apply(conf.response, res.headers)
    end
  end,
}
