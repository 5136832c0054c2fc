-- moonproxy.hooks: turns the hooks and plugins a configuration declares into
-- one function per phase and route, so the C core enters Lua at most once per
-- phase, and not at all where nothing is attached.
--
-- Order (README "Hooks"): global plugins, then global hooks, then the
-- route's rewrite, plugins, on_request and handler; on the response head:
-- global plugins, global on_response, the route's plugins, its on_response.
local core = require "moonproxy.core"
local schema = require "moonproxy.schema"

local type, ipairs, pairs, pcall, error, tostring = type, ipairs, pairs, pcall, error, tostring
local fail, fmt = schema.fail, string.format
local RESPONDED = core.RESPONDED

local _M = {}

-- Calls only request hooks may make. A response or log hook naming one is
-- refused at load (a static look at its constants, nested functions
-- included), rather than failing requests later.
local REQUEST_ONLY = { set_path = true, set_query = true, respond = true }
local ok_jutil, jutil = pcall(require, "jit.util")

local function request_only_call(fn)
  local info = jutil.funcinfo(fn)
  for i = -1, -(info.gcconsts or 0), -1 do
    local k = jutil.funck(fn, i)
    if type(k) == "string" and REQUEST_ONLY[k] then
      return k, info
    elseif type(k) == "proto" then
      local name, where = request_only_call(k)
      if name then
        return name, where
      end
    end
  end
end

local function check_phase(fn, what)
  if not ok_jutil or type(fn) ~= "function" then
    return
  end
  local name, info = request_only_call(fn)
  if name then
    local src = (info.source or "?"):gsub("^@", "") .. ":" .. tostring(info.linedefined)
    fail(src, "%s calls req:%s, which only request hooks (on_request, rewrite, handler) may call", what, name)
  end
end

-- Steps: { call = function(step, a, b) -> RESPONDED | nil, ... }.
local function call_hook(s, a, b) return s.fn(a, b) end
local function call_plugin_request(s, req) return s.fn(s.conf, req) end
local function call_plugin_response(s, req, res) return s.fn(s.conf, req, res) end

local function call_handler(s, req)
  local u = s.fn(req)
  if u == nil or u == RESPONDED then
    return u
  end
  local index = s.upstream_index[type(u) == "table" and u.name or u]
  if not index then
    error(fmt("handler returned %s, which is not a declared upstream", tostring(u)), 0)
  end
  return index
end

-- The simulator (src/sim.c, behind moonproxy.testing, --explain and
-- proxy.expect) sets package.loaded["moonproxy.trace"] to a function called
-- around every step, tracer(label, done, result), to record what each hook
-- changed. The server never sets it: its chains have no such calls.
local function traced_chain(steps, tracer)
  local n = #steps
  return function(a, b)
    for i = 1, n do
      local s = steps[i]
      tracer(s.label, false)
      local ret = s.call(s, a, b)
      tracer(s.label, true, ret)
      if ret == RESPONDED or i == n then
        return ret
      end
    end
  end
end

-- One function running the steps in order; it stops at a response made by
-- req:respond (or returns what the last step, a handler, returns).
local function chain(steps)
  local n = #steps
  if n == 0 then
    return nil
  end
  local tracer = package.loaded["moonproxy.trace"]
  if type(tracer) == "function" then
    return traced_chain(steps, tracer)
  end
  if n == 1 and steps[1].call == call_hook then
    return steps[1].fn -- the common case: no wrapper at all
  end
  return function(a, b)
    for i = 1, n do
      local s = steps[i]
      local ret = s.call(s, a, b)
      if ret == RESPONDED or i == n then
        return ret
      end
    end
  end
end

local function find_plugin(name, plugin_path)
  if plugin_path then
    local path = plugin_path .. "/" .. name .. ".lua"
    local f = io.open(path, "r")
    if f then
      f:close()
      local chunk, err = loadfile(path)
      if not chunk then
        return nil, err
      end
      return chunk()
    end
  end
  local ok, mod = pcall(require, "moonproxy.plugins." .. name)
  if not ok then
    if type(mod) == "string" and mod:find("module 'moonproxy.plugins." .. name .. "' not found", 1, true) then
      return nil
    end
    return nil, mod
  end
  return mod
end

-- Loads and checks one plugin entry { "name", option = value, ... } declared at
-- src. Returns { name, conf, on_request, on_response }.
function _M.plugin(entry, src, plugin_path)
  if type(entry) == "string" then
    entry = { entry }
  end
  if type(entry) ~= "table" or type(entry[1]) ~= "string" then
    fail(src, 'plugins: each entry is { "name", option = value, ... }, got %s', schema.show(entry))
  end
  local name = entry[1]
  local mod, err = find_plugin(name, plugin_path)
  if not mod then
    fail(src, "unknown plugin '%s'%s", name, err and (": " .. tostring(err)) or "")
  elseif type(mod) ~= "table" or (mod.on_request == nil and mod.on_response == nil) then
    fail(src, "plugin '%s' is not a plugin module (it needs on_request or on_response)", name)
  end
  local conf = {}
  for k, v in pairs(entry) do
    if k ~= 1 then
      conf[k] = v
    end
  end
  if mod.schema then
    local ok, res = pcall(mod.schema, conf)
    if not ok then
      fail(src, "plugin '%s': %s", name, tostring(res))
    end
    conf = res
  end
  return { name = name, conf = conf, on_request = mod.on_request, on_response = mod.on_response }
end

-- "file:line" where fn is defined, for traces.
local function defined_at(fn)
  local info = debug.getinfo(fn, "S")
  return info and (info.short_src .. ":" .. tostring(info.linedefined)) or "?"
end

-- Steps are labelled for traces: "route 'api': plugin key_auth".
local function add_plugins(steps, plugins, phase, owner)
  for _, p in ipairs(plugins or {}) do
    local fn = p[phase]
    if fn then
      steps[#steps + 1] = {
        call = phase == "on_request" and call_plugin_request or call_plugin_response, fn = fn, conf = p.conf,
        label = fmt("%splugin %s (%s)", owner, p.name, phase),
      }
    end
  end
end

local function add_hooks(steps, fns, label)
  for _, fn in ipairs(fns or {}) do
    steps[#steps + 1] = { call = call_hook, fn = fn, label = fmt("%s at %s", label, defined_at(fn)) }
  end
end

-- The chains of a whole configuration, for src/config.c:
-- { pre = fn|nil, log = fn|nil, response = fn|nil (the global part, for responses made
--   before a route was chosen), routes = { [i] = { request = fn|nil, response = fn|nil, captures = bool } } }.
function _M.build(global, routes, upstream_index)
  for _, fn in ipairs(global.on_response or {}) do
    check_phase(fn, "proxy.on_response")
  end
  for _, fn in ipairs(global.on_log or {}) do
    check_phase(fn, "proxy.on_log")
  end
  for _, r in ipairs(routes) do
    check_phase(r.on_response, "route '" .. r.name .. "' on_response")
  end
  local pre = {}
  add_plugins(pre, global.plugins, "on_request", "global ")
  add_hooks(pre, global.on_request, "proxy.on_request")
  local log, response = {}, {}
  add_hooks(log, global.on_log, "proxy.on_log")
  add_plugins(response, global.plugins, "on_response", "global ")
  add_hooks(response, global.on_response, "proxy.on_response")
  local out = { pre = chain(pre), log = chain(log), response = chain(response), routes = {} }
  for i, r in ipairs(routes) do
    local req, res = {}, {}
    local owner = fmt("route '%s': ", r.name)
    add_hooks(req, { r.rewrite }, owner .. "rewrite")
    add_plugins(req, r.plugins, "on_request", owner)
    add_hooks(req, { r.on_request }, owner .. "on_request")
    if r.handler then
      req[#req + 1] = { call = call_handler, fn = r.handler, upstream_index = upstream_index,
        label = fmt("%shandler at %s", owner, defined_at(r.handler)) }
    end
    add_plugins(res, global.plugins, "on_response", "global ")
    add_hooks(res, global.on_response, "proxy.on_response")
    add_plugins(res, r.plugins, "on_response", owner)
    add_hooks(res, { r.on_response }, owner .. "on_response")
    out.routes[i] = { request = chain(req), response = chain(res), captures = r.rewrite ~= nil and r.regex ~= nil }
  end
  return out
end

_M.RESPONDED = RESPONDED
return _M
