-- moonproxy.testing: prove what a configuration does, offline, with busted
-- (README "Testing configurations"). A loaded configuration runs requests
-- through the server's own code (src/sim.c, through moonproxy.core): the
-- parser, the router and its PCRE2 regexes, the hooks and plugins, the
-- balancer, and the head the upstream would receive. No sockets.
--
--   local testing = require "moonproxy.testing"
--   local cfg = testing.load("examples/quickstart.lua")
--   local r = cfg:request { method = "GET", host = "api.example.com", path = "/v1/users?x=1" }
--   assert.equal("api", r.upstream); assert.equal("/users?x=1", r.target)
--   print(testing.format(r))
local core = require "moonproxy.core"

local type, pairs, ipairs, error, setmetatable, tostring = type, pairs, ipairs, error, setmetatable, tostring
local fmt, concat = string.format, table.concat

local _M = {}

local Config = {}
Config.__index = Config

-- A path, or the text of a script (it has a newline, or opts.text is true).
local function source(path_or_text, opts)
  if type(path_or_text) ~= "string" then
    error("testing.load: expects a script path or a script's text, got " .. type(path_or_text), 3)
  end
  if opts.text or path_or_text:find("\n", 1, true) then
    return opts.name or "config.lua", path_or_text
  end
  return path_or_text, nil
end

local function apply_servers(sim, servers)
  for upstream, list in pairs(servers or {}) do
    for addr, state in pairs(list) do
      sim:set_server(upstream, addr, state)
    end
  end
end

-- testing.try_load(path_or_text, opts) -> cfg, or nil, "file:line: message".
-- opts: seed (randomness: request ids, balancers, math.random; default 1),
-- now (pins the clock of shared dicts, rate limits and health, in seconds),
-- servers = { upstream = { ["addr"] = { down, open, active, failures,
-- latency, drain, weight } } } (what balancers see; drain and weight as
-- cfg:server_state sets them), name (names a script given as text),
-- http = function(request) -> response | nil, err (answers the hooks'
-- moonproxy.http calls: request is the table the hook gave, the response
-- { status =, headers =, body = }), redis = function(cmd, ...) -> value |
-- nil, err (answers Redis calls). The trace shows each call and its answer.
function _M.try_load(path_or_text, opts)
  opts = opts or {}
  local path, text = source(path_or_text, opts)
  local seed = opts.seed or 1
  local sim, err = core.simulator(path, text, seed)
  if not sim then
    return nil, err
  end
  -- Guards (proxy.expect) refuse the configuration as the server would;
  -- they run in a simulator of their own, so this one starts fresh.
  if sim:summary().guards > 0 then
    local ok, gerr = sim:check_guards()
    sim:close()
    if not ok then
      return nil, gerr
    end
    sim = assert(core.simulator(path, text, seed))
  end
  local stubs
  if opts.http ~= nil or opts.redis ~= nil then
    for _, k in ipairs { "http", "redis" } do
      if opts[k] ~= nil and type(opts[k]) ~= "function" then
        sim:close()
        error(fmt("testing.load: opts.%s must be a function, got %s", k, type(opts[k])), 3)
      end
    end
    stubs = { http = opts.http, redis = opts.redis }
  end
  local cfg = setmetatable({ sim = sim, path = path, serial = 0, stubs = stubs }, Config)
  cfg:set_now(opts.now)
  apply_servers(sim, opts.servers)
  return cfg
end

-- testing.load(path_or_text, opts) -> cfg; raises the load error (the one
-- the server would print) when the configuration is refused.
function _M.load(path_or_text, opts)
  local cfg, err = _M.try_load(path_or_text, opts)
  if not cfg then
    error(err, 2)
  end
  return cfg
end

-- Pins the clock (seconds, any origin) or, with nil, lets it run.
function Config:set_now(now)
  if now ~= nil and (type(now) ~= "number" or now <= 0) then
    error("set_now: expects a positive number of seconds, or nil", 2)
  end
  self.now = now
  self.sim:set_now(now or 0)
end

-- Sets what the balancers see: { upstream = { ["addr"] = { down = true } } }.
function Config:servers(servers)
  apply_servers(self.sim, servers)
end

-- Sets an operator's control of one server, as POST
-- /upstreams/NAME/servers/ADDR does: cfg:server_state("api", "10.0.0.1:80",
-- { drain = true }); also down = true, weight = N (1..1000), reset = true
-- (back to the configuration); drain = false and down = false undo. Other
-- state (down by the checks, circuits) is left as it is.
function Config:server_state(upstream, addr, state)
  if type(upstream) ~= "string" or type(addr) ~= "string" or type(state) ~= "table" then
    error("server_state: expects (upstream, addr, { drain =, down =, weight =, reset = })", 2)
  end
  for k in pairs(state) do
    if k ~= "drain" and k ~= "down" and k ~= "weight" and k ~= "reset" then
      error("server_state: unknown field '" .. tostring(k) .. "'", 2)
    end
  end
  local ok, err = pcall(self.sim.control, self.sim, upstream, addr, state)
  if not ok then
    error(err, 2)
  end
end

-- cfg:request { method = "GET", host =, path = "/p?q", headers = {}, body =,
-- remote_addr =, tls = } -> result. tls: the request came over TLS (scheme
-- https, req.tls, X-Forwarded-Proto: https): true (TLSv1.3,
-- TLS_AES_128_GCM_SHA256, the host as SNI) or { version =, cipher =, sni =,
-- client_subject = } (version and cipher default as with true). Result:
--   route, route_index   the route matched (nil: none)
--   upstream, server     where it goes (server: the balancer's pick); nil
--                        when the proxy answered (the trace tells why)
--   method, target       the request line the upstream receives
--   headers              what it receives ({ name = value | { values } },
--                        names lowercase), or, when the proxy answered, the
--                        response's headers
--   status, body         when the proxy answered (a hook or plugin, or an error)
--   error                a hook's error, "file:line: message"
--   head                 the whole head, as bytes
--   trace                the decision steps: { { step =, text = }, ... }
function Config:request(req)
  if type(req) ~= "table" then
    error("request: expects a table { method =, host =, path =, headers =, body =, remote_addr =, tls = }", 2)
  end
  local r = self.sim:request(req, self.stubs)
  self.serial = self.serial + 1
  r.request = req
  r.serial = self.serial
  return r
end

-- cfg:response(result, { status = 200, headers = {}, body = "" }) -> the
-- response the client receives after the response hooks: status, headers,
-- body, trace. result is what cfg:request returned (a forwarded request).
-- On a route that compresses (SPEC "Compression") it also has compress: the
-- encoding ("gzip", "br", "zstd"), or false and compress_why.
function Config:response(result, resp)
  if type(result) ~= "table" or not result.request then
    error("response: expects the result of cfg:request, then { status =, headers =, body = }", 2)
  elseif result.status then
    error(fmt("response: the proxy answered this request itself (%d); there is no upstream response", result.status), 2)
  end
  if result.serial ~= self.serial then -- not the latest, or already answered: run it again
    self:request(result.request)
  end
  self.serial = self.serial + 1 -- the next response for it runs the request again
  return self.sim:response(resp or {}, self.stubs)
end

-- The compiled route table: { { name, index, upstream, host, path, prefix,
-- regex, strip_prefix, src }, ... } in declaration order.
function Config:routes()
  return self.sim:summary().routes
end

-- The whole configuration as plain data (listen, settings, upstreams, routes).
function Config:summary()
  return self.sim:summary()
end

function Config:close()
  self.sim:close()
end

local function trace_of(x)
  if type(x) == "table" and x.trace then
    return x.trace, x
  end
  return x, nil
end

-- testing.format(result or trace) -> text a person reads: the outcome, then
-- the numbered decision steps.
function _M.format(x)
  local trace, result = trace_of(x)
  if type(trace) ~= "table" then
    error("format: expects a result of cfg:request/cfg:response, or its trace", 2)
  end
  local out = {}
  if result then
    if result.status then
      out[#out + 1] = fmt("answered %d%s", result.status, result.error and (" (" .. result.error .. ")") or "")
    elseif result.upstream then
      out[#out + 1] = fmt("forwarded to upstream '%s', server %s: %s %s", result.upstream, tostring(result.server),
        tostring(result.method), tostring(result.target))
    end
  end
  for i, s in ipairs(trace) do
    out[#out + 1] = fmt("%2d. %-8s %s", i, s.step, s.text)
  end
  return concat(out, "\n")
end

return _M
