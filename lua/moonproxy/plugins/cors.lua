-- moonproxy.plugins.cors: Cross-Origin Resource Sharing (Fetch standard §3.2).
--
--   { "cors", origins = { "https://app.example" }, methods = { "GET", "POST" },
--     headers = { "content-type", "authorization" }, expose_headers = { "x-request-id" },
--     credentials = true, max_age = 600 }
--
-- origins         "*" or a list of origins ("https://a.example", "http://b:8080");
--                 required. With "*" and credentials, the request's Origin is
--                 echoed (browsers refuse "*" with credentials).
-- methods         allowed in a preflight (default GET, HEAD, PUT, PATCH, POST, DELETE).
-- headers         request headers allowed in a preflight (default: whatever the
--                 preflight asks for in Access-Control-Request-Headers).
-- expose_headers  response headers the page may read (default none).
-- credentials     send Access-Control-Allow-Credentials: true (default false).
-- max_age         seconds a preflight may be cached (default: not sent).
--
-- A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an
-- allowed origin is answered 204 here; put cors before auth plugins, as a
-- preflight carries no credentials. Other requests from an allowed origin get
-- Access-Control-Allow-Origin on the response. A request from another origin
-- gets no CORS headers and goes on as usual. Unless origins is "*" (without
-- credentials), every response gets Vary: Origin so caches keep them apart.
local util = require "moonproxy.plugins.util"
local schema = require "moonproxy.schema"

local type, ipairs, tostring, concat = type, ipairs, tostring, table.concat

local function origins(v)
  if v == "*" then
    return v
  end
  local list, err = util.list(schema.string, true)(type(v) == "string" and { v } or v)
  if err then
    return util.bad(v, 'must be "*" or a list of origins like "https://a.example"')
  end
  local set = {}
  for _, o in ipairs(list) do
    local norm = o:lower():gsub("/$", "")
    if norm ~= "null" and not norm:match("^[%a][%w+.-]*://[^/%s?#]+$") then
      return util.bad(o, 'must hold origins: scheme://host[:port] without a path')
    end
    set[norm] = true
  end
  return set
end

local function joined(check)
  return function(v, path)
    local list, err = util.list(check, true)(type(v) == "string" and { v } or v, nil, path)
    return list and concat(list, ", "), err
  end
end

local function methods(v)
  local list, err = schema.methods(v)
  return list and concat(list, ", "), err
end

local spec = {
  origins = origins, methods = methods, headers = joined(util.header_name), expose_headers = joined(util.header_name),
  credentials = util.boolean, max_age = schema.integer(0, 86400 * 365),
}

-- The value of Access-Control-Allow-Origin for origin, or nil.
local function allow_origin(conf, origin)
  if type(origin) ~= "string" then
    return nil
  elseif conf.any then
    return conf.credentials and origin or "*"
  end
  return (conf.origins[origin] or conf.origins[origin:lower()]) and origin or nil
end

-- Adds Origin to Vary unless it is there (or Vary is "*").
local function vary_origin(headers)
  local cur = headers["vary"]
  if cur == nil then
    headers["vary"] = "Origin"
    return
  end
  local all = "," .. (type(cur) == "table" and concat(cur, ",") or cur):lower():gsub("[ \t]", "") .. ","
  if not all:find(",origin,", 1, true) and not all:find(",*,", 1, true) then
    util.append_header(headers, "vary", "Origin")
  end
end

return {
  name = "cors",

  schema = function(conf)
    local c = util.check(conf, spec)
    if not c.origins then
      util.fail('needs origins = "*" or { "https://a.example", ... }')
    end
    local any = c.origins == "*"
    return {
      any = any, origins = not any and c.origins, credentials = c.credentials or false,
      methods = c.methods or "GET, HEAD, PUT, PATCH, POST, DELETE", headers = c.headers,
      expose = c.expose_headers, max_age = c.max_age and tostring(c.max_age),
      vary = not any or c.credentials or nil, -- the answer depends on Origin
    }
  end,

  on_request = function(conf, req)
    if req.method ~= "OPTIONS" then
      return
    end
    local h = req.headers
    local acrm = h["access-control-request-method"]
    local allowed = acrm and allow_origin(conf, h["origin"])
    if not allowed then
      return
    end
    local asked = h["access-control-request-headers"]
    local out = {
      ["Access-Control-Allow-Origin"] = allowed,
      ["Access-Control-Allow-Methods"] = conf.methods,
      ["Access-Control-Allow-Headers"] = conf.headers or (type(asked) == "table" and concat(asked, ", ") or asked),
      ["Access-Control-Allow-Credentials"] = conf.credentials and "true" or nil,
      ["Access-Control-Max-Age"] = conf.max_age,
      ["Vary"] = conf.vary and "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        or (not conf.headers and "Access-Control-Request-Headers" or nil),
    }
    return req:respond(204, "", out)
  end,

  on_response = function(conf, req, res)
    local h = res.headers
    if conf.vary then
      vary_origin(h)
    end
    local allowed = allow_origin(conf, req.headers["origin"])
    if allowed then
      h["access-control-allow-origin"] = allowed
      if conf.credentials then
        h["access-control-allow-credentials"] = "true"
      end
      if conf.expose then
        h["access-control-expose-headers"] = conf.expose
      end
    end
  end,
}
