-- moonproxy: the configuration DSL (SPEC "The configuration script").
-- Each call checks its arguments at once and raises "file:line: message" at
-- the operator's line. The loader (src/config.c) calls M._reset() before it
-- runs a script and M._finish(script_path) after it; _finish does the checks
-- that need the whole script and returns the normalized table that
-- mp_config_build() reads. require "moonproxy" has no side effects.
local schema = require "moonproxy.schema"
local hooks = require "moonproxy.hooks"

local type, ipairs, setmetatable, getmetatable, getinfo = type, ipairs, setmetatable, getmetatable, debug.getinfo
local error, tostring, pairs = error, tostring, pairs
local fmt, sort = string.format, table.sort
local check, fail, bad, show = schema.check, schema.fail, schema.bad, schema.show

local _M = {}

-- Every default, in this one place: the DSL writes each field into the table
-- _finish returns, and src/config.c only copies and checks (it refuses a
-- missing field). Fields left out here are optional: nil means "none".
local DEFAULTS = {
  settings = {
    merge_slashes = true, escaped_slashes = "reject", underscores_in_headers = false,
    workers = 0, client_header_timeout = 10, client_body_timeout = 60, keepalive_timeout = 75,
    max_header_size = 16384, max_uri_size = 8192, max_body_size = 10485760, max_connections = 10000,
    shutdown_timeout = 30, trusted_proxies = {}, access_log = "stdout",
    reload_drain_timeout = 30, hook_timeout = 1, watch = false, body_buffer_size = 16384,
    lua_memory = 256 * 1024 * 1024,
  },
  upstream = { balancer = "round_robin", keepalive = 32, keepalive_timeout = 60, retries = 1, retry_budget = 0.2,
    fail_open = false },
  server = { weight = 1 },
  timeouts = { connect = 5, send = 60, read = 60, tunnel = 3600 },
  passive = { failures = 5, cooldown = 10, statuses = { 502, 503, 504 } },
  health = { path = "/", interval = 2, timeout = 1, rise = 2, fall = 3 },
  route = { strip_prefix = false },
  static = { index = "index.html", precompressed = false },
  compress = { algorithms = { "zstd", "br", "gzip" }, min_length = 256,
    types = { "text/*", "application/json", "application/javascript", "application/xml", "image/svg+xml" } },
  tls = { protocols = { "TLSv1.2", "TLSv1.3" } },
  upstream_tls = { verify = true },
  resolver = { timeout = 2 },
  resolve = { min = 1, max = 300 },
}

-- Fills t's missing fields from DEFAULTS[kind] (a list is copied: each
-- configuration gets its own) and returns t.
local function with_defaults(t, kind)
  for k, v in pairs(DEFAULTS[kind]) do
    if t[k] == nil then
      if type(v) == "table" then
        local copy = {}
        for i, x in ipairs(v) do
          copy[i] = x
        end
        v = copy
      end
      t[k] = v
    end
  end
  return t
end

local function new_state()
  return { listen = {}, upstreams = {}, upstream_by_name = {}, routes = {}, route_by_name = {},
    global = { on_request = {}, on_response = {}, on_log = {}, plugins = {} }, expects = {} }
end

local state = new_state() -- what the script declared so far; a new one per load

-- Forgets every declaration: the loader calls it before each script.
function _M._reset()
  state = new_state()
end

-- "file:line" of the first Lua caller of the DSL function that called where().
local function where()
  for level = 3, 12 do
    local info = getinfo(level, "Sl")
    if not info then
      break
    elseif info.what ~= "C" then
      return info.short_src .. ":" .. info.currentline
    end
  end
  return "?"
end

-- Global hooks, run for every request in declaration order (README "Hooks").
local function global_hook(phase)
  return function(fn)
    local src = where()
    if type(fn) ~= "function" then
      fail(src, "proxy.%s expects a function, got %s", phase, show(fn))
    end
    local list = state.global[phase]
    list[#list + 1] = fn
  end
end

_M.on_request = global_hook("on_request")
_M.on_response = global_hook("on_response")
_M.on_log = global_hook("on_log")

-- proxy.plugin { "name", option = value }: a plugin for every request.
function _M.plugin(entry)
  local list = state.global.plugins
  list[#list + 1] = { entry = entry, src = where() }
end

-- Run-time helpers, for hooks and plugins.
local core = require "moonproxy.core"
_M.now = core.now

-- proxy.shared(name, size): a dictionary shared by all workers (SPEC "Shared state").
function _M.shared(name, size)
  if type(name) ~= "string" or name == "" then
    error("proxy.shared expects a name, got " .. show(name), 2)
  end
  local bytes, err = schema.size(size)
  if not bytes or bytes <= 0 then
    error("proxy.shared '" .. name .. "': size " .. (err or "must be greater than 0"), 2)
  end
  return core.shared(name, bytes)
end

-- proxy.redis { addr, password, db, timeout, pool }: a Redis client for hooks
-- and plugins (README "Redis"); declare it when the configuration loads.
function _M.redis(t)
  return require("moonproxy.redis").new(t, where())
end

-- listen / admin ---------------------------------------------------------------

-- TLS (SPEC "TLS"). Paths are as the operator wrote them here; _finish
-- resolves them against the script's folder and src/config.c loads them.
local PROTOCOLS = { ["TLSv1.2"] = true, ["TLSv1.3"] = true }

local function protocols(v)
  local list, err = schema.list(schema.string, true)(v)
  if err then
    return bad(v, 'must be a non-empty list of "TLSv1.2", "TLSv1.3"')
  end
  local seen = {}
  for _, p in ipairs(list) do
    if p == "TLSv1" or p == "TLSv1.0" or p == "TLSv1.1" or p:match("^SSL") then
      return nil, fmt('%s is refused: it is broken (use "TLSv1.2" and "TLSv1.3")', show(p))
    elseif not PROTOCOLS[p] then
      return bad(p, 'must list "TLSv1.2" or "TLSv1.3"')
    elseif seen[p] then
      return nil, fmt("lists %s twice", show(p))
    end
    seen[p] = true
  end
  return list
end

local pair_spec = { cert = schema.string, key = schema.string }

-- { cert = PEM, key = PEM }: both are needed.
local function cert_pair(t, what, src)
  local p = check(t, pair_spec, what, src)
  if not p.cert or not p.key then
    fail(src, '%s: needs cert = "site.pem" and key = "site.key" (both)', what)
  end
  return p
end

local function more_certs(v, src, what)
  local list, err = schema.list(function(e) return e end, true)(v, src, what)
  if err then
    return bad(v, "must be a non-empty list of { cert = ..., key = ... }")
  end
  for i, e in ipairs(list) do
    list[i] = cert_pair(e, fmt("%s[%d]", what, i), src)
  end
  return list
end

local tls_server_spec = { cert = schema.string, key = schema.string, certs = more_certs, protocols = protocols,
  ciphers = schema.string, client_ca = schema.string }

local function tls_server(v, src, what)
  local t = check(v, tls_server_spec, what, src)
  if not t.cert or not t.key then
    fail(src, '%s: needs cert = "site.pem" and key = "site.key" (the default certificate; both)', what)
  end
  return with_defaults(t, "tls")
end

local listen_spec = { addr = schema.listen_addr, tls = tls_server }

local function listener(t, spec, what, src)
  local l = check(type(t) == "string" and { addr = t } or t, spec, what, src)
  if not l.addr then
    fail(src, '%s: needs addr = "host:port"', what)
  end
  l.src = src
  return l
end

function _M.listen(t)
  local src = where()
  local l = listener(t, listen_spec, "listen", src)
  for _, other in ipairs(state.listen) do
    if other.addr == l.addr then
      fail(src, "listen: %s is already declared at %s", l.addr, other.src)
    end
  end
  state.listen[#state.listen + 1] = l
end

local admin_spec = { addr = schema.listen_addr, token = schema.string, tls = tls_server }

-- Whether a listen address can be reached from this machine only.
local function loopback(addr)
  local host = addr:match("^%[(.*)%]:%d+$") or addr:match("^(.*):%d+$")
  return host == "localhost" or host == "::1" or (host:match("^127%.%d+%.%d+%.%d+$") ~= nil)
end

-- The admin port (SPEC "Admin access"): with a token every endpoint but
-- /live and /ready needs Authorization: Bearer; one reachable from other
-- machines must have one.
function _M.admin(t)
  local src = where()
  if state.admin then
    fail(src, "admin: already declared at %s (there is one admin port)", state.admin.src)
  end
  local a = listener(t, admin_spec, "admin", src)
  if not a.token and not loopback(a.addr) then
    fail(src, "admin: %s is not a loopback address: it needs a token (token = os.getenv(\"MOONPROXY_ADMIN_TOKEN\"))",
      a.addr)
  end
  state.admin = a
end

-- settings ---------------------------------------------------------------------

local function workers(v)
  if v == "auto" then
    return 0
  end
  return schema.integer(1, 1024)(v, nil, nil)
end

-- access_log = "stdout" | PATH | false | { path = "stdout" | PATH, fields = { "time", "status", ... } }:
-- the table is split in _M.settings (access_log, access_log_fields); src/config.c checks the names.
local function access_log(v)
  if v == false or (type(v) == "string" and v ~= "") then
    return v
  end
  if type(v) == "table" then
    for k in pairs(v) do
      if k ~= "path" and k ~= "fields" then
        return bad(v, 'takes path and fields (unknown key "' .. tostring(k) .. '")')
      end
    end
    if type(v.path) ~= "string" or v.path == "" then
      return bad(v, '{ path = "stdout" or a file path, fields = {...} }: path is missing')
    end
    local fields = v.fields
    if fields ~= nil then
      if type(fields) ~= "table" or #fields == 0 then return bad(v, "fields must be a list of field names") end
      for i, f in ipairs(fields) do
        if type(f) ~= "string" then return bad(v, "fields[" .. i .. "] must be a field name") end
      end
    end
    return { path = v.path, fields = fields }
  end
  return bad(v, 'must be "stdout", a file path, false, or { path = ..., fields = {...} }')
end

-- settings.lua_memory: each VM's budget (src/vm.c), at least 1m; the loader
-- (src/config.c) sets _apply_lua_memory so that it holds from proxy.settings on.
local function lua_memory(v)
  local n, err = schema.size(v)
  if n and n < 1024 * 1024 then
    return bad(v, 'must be at least "1m"')
  end
  return n, err
end

-- settings.resolver = { nameservers = { "127.0.0.1:5353" }, hosts = "path", timeout = 2 }:
-- where upstream names are looked up (src/resolve.c); defaults: /etc/resolv.conf, /etc/hosts.
local function nameserver(v)
  if type(v) == "string" then
    local host, port = v:match("^([%d.]+):(%d+)$")
    host = host or v:match("^([%d.]+)$")
    if not host then
      host, port = v:match("^%[([%x:.]+)%]:(%d+)$")
      host = host or v:match("^%[([%x:.]+)%]$")
    end
    if host and (not port or (#port <= 5 and tonumber(port) >= 1 and tonumber(port) <= 65535)) and
      (host:find(":", 1, true) or schema.server_addr(host .. ":53")) then
      return v
    end
  end
  return bad(v, 'must be a numeric address "ip", "ip:port" or "[ipv6]:port"')
end

local resolver_spec = { nameservers = schema.list(nameserver, true), hosts = schema.string, timeout = schema.duration }

local function resolver(v, src, what)
  local r = with_defaults(check(v, resolver_spec, what, src), "resolver")
  if r.timeout > 60 then
    fail(src, "%s: timeout must be at most 60 seconds, got %s", what, show(r.timeout))
  end
  return r
end

-- settings.tracing = { sample = 0.05, trust = { CIDRs } }: W3C Trace Context
-- (README "Traces"); trust defaults to trusted_proxies.
local function sample_ratio(v)
  if type(v) ~= "number" or v ~= v or v < 0 or v > 1 then
    return bad(v, "must be a number from 0 to 1")
  end
  return v
end
local tracing_spec = { sample = sample_ratio, trust = schema.list(schema.string) }
local function tracing(v, src, what)
  return check(v, tracing_spec, what, src)
end

-- compress = { algorithms = { "zstd", "br", "gzip" }, types = { "text/*", ... }, min_length = 256,
-- level = nil } (SPEC "Compression"), true for those defaults, or false (off). On a route, or in
-- proxy.settings as the default of every route that sets none.
local function media_type(v)
  if type(v) == "string" and (v:match("^[%w!#$&^_.+-]+/[%w!#$&^_.+-]+$") or v:match("^[%w!#$&^_.+-]+/%*$")) then
    return v:lower()
  end
  return bad(v, 'must be a media type like "text/html" or "text/*"')
end

local compress_spec = {
  algorithms = schema.list(schema.one_of { "zstd", "br", "gzip" }, true),
  types = schema.list(media_type, true),
  min_length = schema.size,
  level = schema.integer(1, 22),
}

local function compress(v, src, what)
  if v == false then
    return false
  elseif v == true then
    v = {}
  end
  local c = check(v, compress_spec, what, src)
  local seen = {}
  for _, a in ipairs(c.algorithms or {}) do
    if seen[a] then
      fail(src, "%s: algorithms names '%s' twice", what, a)
    end
    seen[a] = true
  end
  return with_defaults(c, "compress")
end

local settings_spec = {
  resolver = resolver,
  tracing = tracing,
  compress = compress,
  workers = workers,
  client_header_timeout = schema.duration,
  client_body_timeout = schema.duration,
  keepalive_timeout = schema.duration,
  shutdown_timeout = schema.duration,
  max_header_size = schema.size,
  max_uri_size = schema.size,
  max_body_size = schema.size,
  body_buffer_size = schema.size,
  lua_memory = lua_memory,
  max_connections = schema.integer(1),
  trusted_proxies = schema.list(schema.string),
  -- paths and names (SPEC "Behaviour on the wire")
  merge_slashes = schema.boolean,
  escaped_slashes = schema.one_of { "reject", "keep", "decode" },
  underscores_in_headers = schema.boolean,
  access_log = access_log,
  error_log = schema.string,
  plugin_path = schema.string,
  lua_balancers = schema.boolean,
  reload_drain_timeout = schema.duration,
  hook_timeout = schema.duration,
  watch = schema.boolean,
}

function _M.settings(t)
  local src = where()
  if state.settings then
    fail(src, "settings: already declared at %s (use one proxy.settings call)", state.settings.src)
  end
  local s = check(t, settings_spec, "settings", src)
  for _, k in ipairs({ "max_header_size", "max_uri_size" }) do
    if s[k] == 0 then
      fail(src, "settings: %s must be greater than 0", k)
    end
  end
  if type(s.access_log) == "table" then
    s.access_log, s.access_log_fields = s.access_log.path, s.access_log.fields
  end
  with_defaults(s, "settings")
  s.resolver = s.resolver or with_defaults({}, "resolver")
  s.src = src
  state.settings = s
  local fits, held = true, 0
  if _M._apply_lua_memory then
    fits, held = _M._apply_lua_memory(s.lua_memory)
  end
  if not fits then
    fail(src, "settings: lua_memory (%s) is less than this VM holds already (%d bytes)",
      show(t.lua_memory or s.lua_memory), held)
  end
end

-- upstreams --------------------------------------------------------------------

local upstream_mt = { __tostring = function(u) return "upstream '" .. u.name .. "'" end }

local server_spec = { addr = schema.server_addr, weight = schema.integer(1, 1000) }

local function servers(v, src, what)
  local shape = '"host:port" or { addr = "host:port", weight = N }'
  local list, err = schema.list(function(e) return e end, true)(v, src, what)
  if err then
    return bad(v, type(v) == "table" and #v == 0 and "must list at least one server" or "must be a list of " .. shape)
  end
  local seen = {}
  for i, e in ipairs(list) do
    local label = fmt("%s[%d]", what, i)
    if type(e) ~= "string" and type(e) ~= "table" then
      fail(src, "%s must be %s, got %s", label, shape, show(e))
    end
    e = check(type(e) == "string" and { addr = e } or e, server_spec, label, src)
    if not e.addr then
      fail(src, '%s: needs addr = "host:port"', label)
    elseif seen[e.addr] then
      fail(src, "%s: %s is listed twice (use weight instead)", label, e.addr)
    end
    seen[e.addr] = true
    list[i] = with_defaults({ addr = e.addr, weight = e.weight }, "server")
  end
  return list
end

local BALANCERS = { round_robin = true, weighted = true, least_conn = true, p2c = true, chash = true, ewma = true }

-- A built-in name, a function(servers, req, upstream), or a module { pick = ... }.
local function balancer(v)
  if type(v) == "string" and BALANCERS[v] then
    return v
  elseif type(v) == "function" then
    return v
  elseif type(v) == "table" and type(v.pick) == "function" then
    return v
  elseif type(v) == "string" then
    return nil, fmt("%s is not a balancer (built in: chash, ewma, least_conn, p2c, round_robin, weighted)", show(v))
  end
  return bad(v, "must be a built-in name, a function(servers, req, upstream), or a module { pick = function }")
end

local function hash_key(v)
  if type(v) == "function" or v == "ip" then
    return v
  elseif type(v) == "string" and (v:match("^header:[%w!#$%%&'*+.^_`|~-]+$") or v:match("^cookie:[^%s;=]+$")) then
    return v
  end
  return bad(v, 'must be "header:NAME", "cookie:NAME", "ip", or a function(req)')
end

local function statuses(v)
  local list, err = schema.list(schema.integer(100, 599), true)(v)
  if not list then
    return nil, err
  end
  return list
end

local health_spec = {
  path = schema.uri_path, interval = schema.duration, timeout = schema.duration, rise = schema.integer(1, 100),
  fall = schema.integer(1, 100), statuses = statuses, host = schema.host_header,
}

local function health(v, src, what)
  return with_defaults(check(v, health_spec, what, src), "health")
end

local passive_spec = { failures = schema.integer(0, 1000000), cooldown = schema.duration, statuses = statuses }

local function passive(v, src, what)
  return with_defaults(check(v, passive_spec, what, src), "passive")
end

local function ratio(v)
  if type(v) == "number" and v >= 0 and v <= 1 then
    return v
  end
  return bad(v, "must be a number from 0 to 1")
end

local timeouts_spec = { connect = schema.duration, send = schema.duration, read = schema.duration,
                        tunnel = schema.duration }

local function timeouts(v, src, what)
  return with_defaults(check(v, timeouts_spec, what, src), "timeouts")
end

-- tls = { verify = true, ca, server_name, cert, key }: TLS to the servers.
local function server_name(v)
  if type(v) == "string" and (v:match("^[%w_][%w.%-_]*$") or v:match("^[%x:]+$")) then
    return v
  end
  return bad(v, 'must be a host name like "api.internal" or an IP address (no port)')
end

local upstream_tls_spec = { verify = schema.boolean, ca = schema.string, server_name = server_name,
  cert = schema.string, key = schema.string }

local function upstream_tls(v, src, what)
  local t = check(v, upstream_tls_spec, what, src)
  if (t.cert == nil) ~= (t.key == nil) then
    fail(src, "%s: a client certificate needs both cert and key", what)
  end
  return with_defaults(t, "upstream_tls")
end

-- resolve = { min = 1, max = 300 }: bounds, in seconds, on the TTL of a server name's answer.
local resolve_spec = { min = schema.duration, max = schema.duration }

local function resolve(v, src, what)
  local r = with_defaults(check(v, resolve_spec, what, src), "resolve")
  if r.min > r.max then
    fail(src, "%s: min (%s) is greater than max (%s)", what, show(r.min), show(r.max))
  end
  return r
end

local upstream_spec = {
  resolve = resolve,
  servers = servers, tls = upstream_tls, balancer = balancer, keepalive = schema.integer(0, 100000),
  keepalive_timeout = schema.duration, timeouts = timeouts, retries = schema.integer(0, 100), host = schema.host_header,
  hash_key = hash_key, health = health, passive = passive, fail_open = schema.boolean, retry_budget = ratio,
}
local upstream_later = {}

local function declare_upstream(name, t, src)
  local what = "upstream '" .. name .. "'"
  local u = check(t, upstream_spec, what, src, upstream_later)
  if not u.servers then
    fail(src, '%s: needs servers = { "host:port", ... }', what)
  end
  local prev = state.upstream_by_name[name]
  if prev then
    fail(src, "%s is already declared at %s", what, prev.src)
  end
  u.name, u.src = name, src
  with_defaults(u, "upstream")
  u.timeouts = u.timeouts or timeouts({}, src, what)
  u.passive = u.passive or passive({}, src, what)
  u.resolve = u.resolve or with_defaults({}, "resolve")
  if u.balancer == "chash" and not u.hash_key then
    fail(src, '%s: balancer "chash" needs hash_key ("header:NAME", "cookie:NAME", "ip", or a function)', what)
  end
  -- A Lua policy: the function the core calls (settings.lua_balancers makes the
  -- built-in names use their Lua modules too).
  if type(u.balancer) == "table" then
    u.balancer_fn, u.balancer = u.balancer.pick, "lua"
  elseif type(u.balancer) == "function" then
    u.balancer_fn, u.balancer = u.balancer, "lua"
  end
  if type(u.hash_key) == "function" then
    u.hash_key_fn, u.hash_key = u.hash_key, "function"
  end
  state.upstreams[#state.upstreams + 1] = u
  state.upstream_by_name[name] = u
  return setmetatable({ name = name, src = src }, upstream_mt)
end

-- proxy.upstream "name" { ... } (or proxy.upstream("name", { ... })) returns
-- an upstream object for routes' `upstream = `.
function _M.upstream(name, t)
  local src = where()
  if type(name) ~= "string" or not name:match("^[%w.%-_]+$") then
    fail(src, 'upstream: expects a name (letters, digits, ".-_"): proxy.upstream "api" { servers = {...} }, got %s',
      show(name))
  end
  if t ~= nil then
    return declare_upstream(name, t, src)
  end
  return function(spec)
    return declare_upstream(name, spec, where())
  end
end

-- routes -----------------------------------------------------------------------

local function upstream_ref(v)
  if type(v) == "string" and v ~= "" then
    return v
  elseif getmetatable(v) == upstream_mt then
    return v.name
  end
  return bad(v, 'must be an upstream (local api = proxy.upstream "api" {...}) or its name')
end

-- static = { root = DIR, index = "index.html", fallback = "/index.html", precompressed = false }:
-- files under root (relative to the script's folder: resolved in _finish;
-- src/config.c checks that it is a directory).
local function static_index(v)
  if type(v) == "string" and v ~= "" and v ~= "." and v ~= ".." and not v:find("[/%z]") then
    return v
  end
  return bad(v, 'must be a file name without "/", like "index.html"')
end

local function static_fallback(v)
  local p, err = schema.uri_path(v)
  if p and (("/" .. p .. "/"):find("/%.%.?/") or p:find("%%")) then
    return bad(v, 'must be a plain path inside root (no "." or ".." segments, no "%")')
  end
  return p, err
end

local static_spec = { root = schema.string, index = static_index, fallback = static_fallback,
                      precompressed = schema.boolean }

local function static_files(v, src, what)
  local s = check(v, static_spec, what, src)
  if not s.root then
    fail(src, '%s: needs root = "./public" (a folder, relative to the configuration file)', what)
  end
  return with_defaults(s, "static")
end

local route_spec = {
  name = schema.string, host = schema.route_host, method = schema.methods,
  path = schema.uri_path, prefix = schema.uri_path, regex = schema.string,
  headers = schema.header_filters, strip_prefix = schema.boolean, upstream = upstream_ref, upgrade = schema.boolean,
  rewrite = schema.func, on_request = schema.func, on_response = schema.func, handler = schema.func,
  plugins = schema.list(function(e) return e end), static = static_files, compress = compress,
}

function _M.route(t)
  local src = where()
  local r = check(t, route_spec, "route", src)
  if ((r.path and 1 or 0) + (r.prefix and 1 or 0) + (r.regex and 1 or 0)) > 1 then
    fail(src, "route: set only one of path, prefix, regex")
  elseif r.strip_prefix and not r.prefix then
    fail(src, "route: strip_prefix needs a prefix")
  elseif (r.upstream and 1 or 0) + (r.handler and 1 or 0) + (r.static and 1 or 0) ~= 1 then
    fail(src, "route: needs one target: upstream = api (an upstream or its name), handler = function(req), "
      .. 'or static = { root = "./public" }')
  elseif r.static and r.upgrade ~= nil then
    fail(src, "route: upgrade applies to routes to an upstream (a static route never upgrades)")
  elseif r.static and r.compress then
    fail(src, "route: compress applies to proxied responses (a static route serves precompressed = true files)")
  end
  r.index = #state.routes + 1
  r.name = r.name or tostring(r.index)
  local prev = state.route_by_name[r.name]
  if prev then
    fail(src, "route: name '%s' is already used by the route at %s (a route without a name is named by its index)",
      r.name, prev.src)
  end
  r.methods, r.method = r.method, nil
  with_defaults(r, "route")
  r.src = src
  state.routes[r.index] = r
  state.route_by_name[r.name] = r
end

-- proxy.expect { request = {...}, upstream =, target =, ... }: a guard. The
-- server runs the request through the configuration (src/sim.c) at start,
-- at -t and at every reload, and refuses the configuration if the result
-- differs (README "Testing configurations").
local header_map = function(v)
  if type(v) ~= "table" then
    return bad(v, "must be a table of name = value")
  end
  for k, x in pairs(v) do
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      return bad(k, "must use header names as keys")
    elseif type(x) ~= "string" and type(x) ~= "number" and type(x) ~= "table" and x ~= false then
      return bad(x, fmt("['%s'] must be a string, a list of strings, or false (absent)", k))
    end
  end
  return v
end
local expect_request = {
  method = schema.string, host = schema.string, path = schema.string, headers = header_map,
  body = function(v) return type(v) == "string" and v or bad(v, "must be a string") end,
  remote_addr = schema.string,
}
local expect_spec = {
  request = function(v, src, what) return check(v, expect_request, what, src) end,
  upstream = upstream_ref, target = schema.string, route = function(v)
    return (type(v) == "string" or type(v) == "number") and v or bad(v, "must be a route name or index")
  end,
  status = schema.integer(100, 599), server = schema.string, headers = header_map,
}

function _M.expect(t)
  local src = where()
  local e = check(t, expect_spec, "expect", src)
  if not e.request then
    fail(src, 'expect: needs request = { method = "GET", host = "...", path = "/..." }')
  elseif e.upstream == nil and e.target == nil and e.route == nil and e.status == nil and e.server == nil
    and e.headers == nil then
    fail(src, "expect: says nothing to check (give upstream, target, route, status, server or headers)")
  end
  e.src = src
  state.expects[#state.expects + 1] = e
end

-- whole-script checks ------------------------------------------------------------

-- Loads every plugin (plugin_path is relative to the script's folder) and
-- builds the per-phase chains (moonproxy.hooks).
local function build_hooks(s, script)
  local path = s.settings.plugin_path
  if path and path:sub(1, 1) ~= "/" and script then
    path = (script:match("^(.*)/[^/]*$") or ".") .. "/" .. path
  end
  local global = s.global
  local plugins = {}
  for i, p in ipairs(global.plugins) do
    plugins[i] = hooks.plugin(p.entry, p.src, path)
  end
  for _, r in ipairs(s.routes) do
    if r.plugins then
      for i, p in ipairs(r.plugins) do
        r.plugins[i] = hooks.plugin(p, r.src, path)
      end
    end
  end
  local index = {}
  for i, u in ipairs(s.upstreams) do
    index[u.name] = i - 1
  end
  return hooks.build({ plugins = plugins, on_request = global.on_request, on_response = global.on_response,
    on_log = global.on_log }, s.routes, index)
end

-- A path the script gave, relative to its folder dir (absolute ones as they are).
local function relative_to(dir, path)
  if path:sub(1, 1) == "/" or dir == "." then
    return path
  end
  return dir .. "/" .. path:gsub("^%./+", "")
end

local TLS_PATHS = { "cert", "key", "client_ca", "ca" }

-- Resolves the files of a tls = {...} table (nil: none) in place.
local function resolve_tls(dir, t)
  if not t then
    return
  end
  for _, k in ipairs(TLS_PATHS) do
    if t[k] then
      t[k] = relative_to(dir, t[k])
    end
  end
  for _, c in ipairs(t.certs or {}) do
    resolve_tls(dir, c)
  end
end

-- Returns the normalized configuration (see src/config.h); raises the first
-- problem found with the src of the declaration at fault. script names the
-- file for problems that have no declaration (no listener).
function _M._finish(script)
  local s = state
  if #s.listen == 0 then
    error(fmt('%s: no listener: declare one with proxy.listen { addr = "127.0.0.1:8080" }', script or "config"), 0)
  end
  if s.admin then
    for _, l in ipairs(s.listen) do
      if l.addr == s.admin.addr then
        fail(s.admin.src, "admin: %s is also a listener (declared at %s)", l.addr, l.src)
      end
    end
  end
  for _, r in ipairs(s.routes) do
    if r.upstream and not s.upstream_by_name[r.upstream] then
      local names = {}
      for _, u in ipairs(s.upstreams) do
        names[#names + 1] = u.name
      end
      sort(names)
      local hint = schema.suggest(r.upstream, names)
      fail(r.src, "route '%s': unknown upstream '%s'%s", r.name, r.upstream,
        hint and fmt(" (did you mean '%s'?)", hint) or (#names == 0 and " (no upstream is declared)" or ""))
    end
  end
  local dir = script and script:match("^(.*)/[^/]*$") or "."
  for _, r in ipairs(s.routes) do
    if r.static then
      r.static.root = relative_to(dir, r.static.root)
    end
  end
  for _, l in ipairs(s.listen) do
    resolve_tls(dir, l.tls)
  end
  resolve_tls(dir, s.admin and s.admin.tls)
  for _, u in ipairs(s.upstreams) do
    resolve_tls(dir, u.tls)
  end
  if not s.settings then
    s.settings = with_defaults({}, "settings")
    s.settings.resolver = with_defaults({}, "resolver")
  end
  if s.settings.resolver.hosts then
    s.settings.resolver.hosts = relative_to(dir, s.settings.resolver.hosts)
  end
  for _, u in ipairs(s.upstreams) do
    if s.settings.lua_balancers and BALANCERS[u.balancer] then
      u.balancer_fn = require("moonproxy.balancer." .. u.balancer).pick
    end
  end
  for _, e in ipairs(s.expects) do
    if type(e.upstream) == "string" and not s.upstream_by_name[e.upstream] then
      fail(e.src, "expect: unknown upstream '%s'", e.upstream)
    end
  end
  return { listen = s.listen, admin = s.admin, settings = s.settings, upstreams = s.upstreams, routes = s.routes,
    hooks = build_hooks(s, script), expects = #s.expects > 0 and s.expects or nil }
end

-- A value as canonical text (keys sorted), to tell a plugin's options apart.
local function canonical(v, depth)
  local t = type(v)
  if t == "string" then
    return fmt("%q", v)
  elseif t ~= "table" then
    return tostring(t == "function" and "function" or v)
  elseif depth > 8 then
    return "{...}"
  end
  local keys = {}
  for k in pairs(v) do
    keys[#keys + 1] = k
  end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i, k in ipairs(keys) do
    parts[i] = "[" .. canonical(k, depth + 1) .. "]=" .. canonical(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- The plugins of the script loaded last, for a reload's preview
-- (src/reload.c): { { route = index (0: global), name =, conf = text }, ... }.
function _M._plugins()
  local out = {}
  for _, p in ipairs(state.global.plugins) do
    local conf = {}
    for k, v in pairs(type(p.entry) == "table" and p.entry or {}) do
      if k ~= 1 then
        conf[k] = v
      end
    end
    out[#out + 1] = { route = 0, name = tostring(type(p.entry) == "table" and p.entry[1]), conf = canonical(conf, 0) }
  end
  for i, r in ipairs(state.routes) do
    for _, p in ipairs(r.plugins or {}) do
      out[#out + 1] = { route = i, name = tostring(p.name), conf = canonical(p.conf, 0) }
    end
  end
  return out
end

return _M
