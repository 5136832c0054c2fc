-- moonproxy.plugins.basic_auth: HTTP Basic authentication (RFC 7617) against
-- a table of users.
--
--   { "basic_auth", users = { alice = "secret", bob = "hunter2" }, realm = "admin" }
--
-- users             required: { [user] = "password" } in plain text; a user
--                   name holds no ":" (RFC 7617 §2).
-- realm             the realm in WWW-Authenticate (default "moonproxy").
-- hide_credentials  remove Authorization before the request is forwarded
--                   (default false).
--
-- A missing, malformed or wrong Authorization gets 401 with
-- WWW-Authenticate: Basic realm="...". On success
-- req.ctx.consumer is the user name. Passwords are compared as interned
-- strings (one pointer comparison), also for unknown users.
local util = require "moonproxy.plugins.util"

local type, pairs, next = type, pairs, next
local b64decode = util.b64decode

local function users(v)
  if type(v) ~= "table" or next(v) == nil then
    return util.bad(v, 'must map user names to passwords { alice = "secret" }')
  end
  local out = {}
  for user, pass in pairs(v) do
    if type(user) ~= "string" or user == "" or user:find("[:%c]") then
      return util.bad(user, "must use user names without \":\" or control characters as keys")
    elseif type(pass) ~= "string" or pass:find("%c") then
      return util.bad(pass, "must map '" .. user .. "' to a password (a string without control characters)")
    end
    out[user] = pass
  end
  return out
end

local function realm(v)
  if type(v) ~= "string" or v:find('["\\%c]') then
    return util.bad(v, "must be a string without quotes, backslashes or control characters")
  end
  return v
end

local spec = { users = users, realm = realm, hide_credentials = util.boolean }

local NOBODY = {} -- compared against for unknown users, so they take the same path

local function refuse(conf, req, what)
  return req:respond(401, what .. "\n", { ["WWW-Authenticate"] = conf.challenge })
end

return {
  name = "basic_auth",

  schema = function(conf)
    local c = util.check(conf, spec)
    if not c.users then
      util.fail('needs users = { name = "password", ... }')
    end
    return {
      users = c.users,
      hide = c.hide_credentials or false,
      challenge = 'Basic realm="' .. (c.realm or "moonproxy") .. '"',
    }
  end,

  on_request = function(conf, req)
    local auth = req.headers["authorization"]
    if auth == nil then
      return refuse(conf, req, "authentication required")
    end
    -- the scheme is case-insensitive (RFC 9110 §11.1)
    local token = type(auth) == "string" and auth:match("^[Bb][Aa][Ss][Ii][Cc] +([%w+/=]+) *$")
    local plain = token and b64decode(token)
    local user, pass = nil, nil
    if plain then
      user, pass = plain:match("^([^:]*):(.*)$")
    end
    if not user then
      return refuse(conf, req, "malformed credentials")
    end
    local want = conf.users[user]
    if (want or NOBODY) ~= pass or not want then
      return refuse(conf, req, "invalid credentials")
    end
    req.ctx.consumer = user
    if conf.hide then
      req.headers["authorization"] = nil
    end
  end,
}
