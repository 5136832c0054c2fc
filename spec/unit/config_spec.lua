-- The configuration DSL (lua/moonproxy.lua) and its C build (src/config.c),
-- loaded the way the server loads a file: moonproxy.core.load_config.
local core = require "moonproxy.core"

local HEAD = 'local proxy = require "moonproxy"'
local LISTEN = 'proxy.listen { addr = "127.0.0.1:8080" }'
local API = 'local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }'

local tmpfiles = {}

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  tmpfiles[#tmpfiles + 1] = path
end

-- Writes the lines (after the require on line 1) to a temp file and loads it.
-- Returns the summary (or nil), the error, and the file's path.
local function load(lines, path)
  path = path or os.tmpname()
  write(path, HEAD .. "\n" .. table.concat(lines, "\n") .. "\n")
  local cfg, err = core.load_config(path)
  return cfg, err, path
end

-- Asserts that the lines fail at line (counting the require as line 1) with a
-- message containing text.
local function fails_at(lines, line, text)
  local cfg, err, path = load(lines)
  assert.is_nil(cfg)
  assert.is_string(err)
  local where = path .. ":" .. line .. ":"
  assert(err:sub(1, #where) == where, "expected the error at " .. where .. " got: " .. err)
  assert(err:find(text, 1, true), "expected '" .. text .. "' in: " .. err)
  assert(not err:find("stack traceback", 1, true), "traceback in: " .. err)
  return err
end

local function ok(lines)
  local cfg, err = load(lines)
  assert(cfg, err)
  return cfg
end

teardown(function()
  for _, p in ipairs(tmpfiles) do
    os.remove(p)
  end
end)

describe("require 'moonproxy'", function()
  it("has no side effects and declares no globals", function()
    local before = {}
    for k in pairs(_G) do
      before[k] = true
    end
    package.loaded.moonproxy = nil
    local proxy = require "moonproxy"
    assert.is_function(proxy.listen)
    for k in pairs(_G) do
      assert(before[k], "new global " .. tostring(k))
    end
  end)

  it("forgets every declaration on _reset()", function()
    local proxy = require "moonproxy"
    proxy._reset()
    proxy.listen { addr = "127.0.0.1:1" }
    proxy._reset()
    assert.has_error(function() proxy._finish("x.lua") end)
    proxy._reset()
  end)
end)

describe("load_config() defaults", function()
  local cfg = ok { LISTEN, API, 'proxy.route { upstream = api }' }

  it("applies every settings default", function()
    assert.same({
      workers = 0, client_header_timeout = 10, client_body_timeout = 60, keepalive_timeout = 75,
      max_header_size = 16384, max_uri_size = 8192, max_body_size = 10485760, max_connections = 10000,
      shutdown_timeout = 30, trusted_proxies = {}, access_log = "stdout", resolver = { timeout = 2 },
    }, cfg.settings)
  end)

  it("applies every upstream default", function()
    local u = cfg.upstreams.api
    assert.same({ "127.0.0.1:9001" }, u.servers)
    assert.same({ 1 }, u.weights)
    assert.equal("round_robin", u.balancer)
    assert.equal(32, u.keepalive)
    assert.equal(60, u.keepalive_timeout)
    assert.same({ connect = 5, send = 60, read = 60, tunnel = 3600 }, u.timeouts)
    assert.equal(1, u.retries)
    assert.is_nil(u.host)
    assert.equal(1, u.index)
  end)

  it("names a route by its index, targets its upstream, matches every path", function()
    assert.equal(1, #cfg.routes)
    local r = cfg.routes[1]
    assert.equal("1", r.name)
    assert.equal(1, r.index)
    assert.equal("api", r.upstream)
    assert.is_false(r.strip_prefix)
    assert.equal("/", r.prefix) -- no path, prefix or regex: a catch-all
  end)

  it("has no admin port unless declared", function()
    assert.is_nil(cfg.admin)
    assert.same({ "127.0.0.1:8080" }, cfg.listen)
  end)
end)

describe("load_config() settings", function()
  local function settings(body)
    return ok { LISTEN, "proxy.settings { " .. body .. " }" }.settings
  end

  it("reads sizes as bytes or k/m/g strings", function()
    local s = settings 'max_header_size = "64k", max_uri_size = 4096, max_body_size = "1g"'
    assert.equal(65536, s.max_header_size)
    assert.equal(4096, s.max_uri_size)
    assert.equal(1024 ^ 3, s.max_body_size)
    assert.equal(10 * 1024 * 1024, settings('max_body_size = "10M"').max_body_size)
  end)

  it("takes max_body_size = 0 as unlimited", function()
    assert.equal(0, settings("max_body_size = 0").max_body_size)
  end)

  it("reads durations in seconds, fractions included", function()
    local s = settings "client_header_timeout = 2.5, client_body_timeout = 1, keepalive_timeout = 0.25, shutdown_timeout = 5"
    assert.equal(2.5, s.client_header_timeout)
    assert.equal(1, s.client_body_timeout)
    assert.equal(0.25, s.keepalive_timeout)
    assert.equal(5, s.shutdown_timeout)
  end)

  it("takes workers = 'auto' as 0 and a number as itself", function()
    assert.equal(0, settings('workers = "auto"').workers)
    assert.equal(3, settings("workers = 3").workers)
  end)

  it("parses trusted_proxies as CIDRs (a bare address is one host)", function()
    local s = settings 'trusted_proxies = { "10.0.0.0/8", "192.168.1.7", "::1", "fd00::/8" }'
    assert.same({ "10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8" }, s.trusted_proxies)
  end)

  it("takes access_log as a path or false", function()
    assert.equal("/var/log/mp.log", settings('access_log = "/var/log/mp.log"').access_log)
    assert.is_false(settings("access_log = false").access_log)
  end)

  it("takes max_connections", function()
    assert.equal(5, settings("max_connections = 5").max_connections)
  end)

  it("takes merge_slashes, escaped_slashes and underscores_in_headers", function()
    ok { LISTEN, 'proxy.settings { merge_slashes = false, escaped_slashes = "keep", underscores_in_headers = true }' }
    for _, mode in ipairs { "reject", "keep", "decode" } do
      ok { LISTEN, 'proxy.settings { escaped_slashes = "' .. mode .. '" }' }
    end
  end)
end)

describe("load_config() declarations", function()
  it("keeps every listener and the admin port", function()
    local cfg = ok { LISTEN, 'proxy.listen { addr = "[::1]:8081" }', 'proxy.listen "*:8082"',
      'proxy.admin { addr = "127.0.0.1:8085" }' }
    assert.same({ "127.0.0.1:8080", "[::1]:8081", "*:8082" }, cfg.listen)
    assert.equal("127.0.0.1:8085", cfg.admin)
  end)

  it("reads servers with weights and every upstream option", function()
    local cfg = ok { LISTEN, 'proxy.upstream "api" {',
      '  servers = { "127.0.0.1:9001", { addr = "[::1]:9002", weight = 3 }, "localhost:9003" },',
      '  keepalive = 0, keepalive_timeout = 5, retries = 0, host = "api.internal",',
      '  timeouts = { connect = 0.5, read = 10, tunnel = 90 },', '}' }
    local u = cfg.upstreams.api
    assert.same({ "127.0.0.1:9001", "[::1]:9002", "localhost:9003" }, u.servers)
    assert.same({ 1, 3, 1 }, u.weights)
    assert.same({ connect = 0.5, send = 60, read = 10, tunnel = 90 }, u.timeouts)
    assert.equal(0, u.keepalive)
    assert.equal(5, u.keepalive_timeout)
    assert.equal(0, u.retries)
    assert.equal("api.internal", u.host)
    assert.equal(u.src, cfg.path .. ":3")
  end)

  it("accepts proxy.upstream(name, table) and a route naming the upstream by string", function()
    local cfg = ok { LISTEN, 'proxy.route { upstream = "late" }',
      'proxy.upstream("late", { servers = { "127.0.0.1:1" } })' }
    assert.equal("late", cfg.routes[1].upstream)
  end)

  it("reads every route field and records each route's file:line", function()
    local cfg = ok { LISTEN, API,
      'proxy.route { name = "v1", host = "API.example.com", method = { "get", "Post" }, prefix = "/v1/",',
      '              strip_prefix = true, headers = { ["X-Env"] = "prod", ["x-id"] = "~^[0-9]+$" }, upstream = api }',
      'proxy.route { host = "*.example.com", path = "/exact", upstream = api }',
      'proxy.route { regex = [[^/u/(\\d+)$]], method = "DELETE", upstream = "api" }' }
    local r1, r2, r3 = cfg.routes[1], cfg.routes[2], cfg.routes[3]
    assert.equal("v1", r1.name)
    assert.equal("api.example.com", r1.host)
    assert.equal("/v1/", r1.prefix)
    assert.is_true(r1.strip_prefix)
    assert.equal(cfg.path .. ":4", r1.src)
    assert.equal("*.example.com", r2.host)
    assert.equal("/exact", r2.path)
    assert.equal(cfg.path .. ":6", r2.src)
    assert.equal("3", r3.name)
    assert.equal([[^/u/(\d+)$]], r3.regex)
  end)

  it("normalizes methods and header filters", function()
    local proxy = require "moonproxy"
    proxy._reset()
    proxy.listen "127.0.0.1:1"
    proxy.upstream "a" { servers = { "127.0.0.1:2" } }
    proxy.route { method = { "get", "Post" }, headers = { ["X-B"] = "~^x", ["X-A"] = "v" }, upstream = "a" }
    proxy.route { method = "put", upstream = "a" }
    local t = proxy._finish("inline")
    proxy._reset()
    assert.same({ "GET", "POST" }, t.routes[1].methods)
    assert.same({ { name = "x-a", value = "v", regex = false }, { name = "x-b", value = "^x", regex = true } },
      t.routes[1].headers)
    assert.same({ "PUT" }, t.routes[2].methods)
    assert.is_nil(t.routes[2].headers)
    assert.matches("config_spec.lua:%d+$", t.routes[1].src)
  end)

  it("lets a configuration require a module next to it", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir))
    write(dir .. "/mp_sibling_routes.lua", table.concat({
      "local proxy = require 'moonproxy'",
      "return function(up) proxy.route { prefix = '/from-sibling/', upstream = up } end",
    }, "\n"))
    local cfg, err = load({ LISTEN, API, 'require "mp_sibling_routes"(api)' }, dir .. "/main.lua")
    assert(cfg, err)
    assert.equal("/from-sibling/", cfg.routes[1].prefix)
    assert.equal(dir .. "/mp_sibling_routes.lua:2", cfg.routes[1].src)
    tmpfiles[#tmpfiles + 1] = dir
  end)

  it("loads a configuration file itself named moonproxy.lua", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir))
    local cfg, err = load({ LISTEN, API, "proxy.route { upstream = api }" }, dir .. "/moonproxy.lua")
    assert(cfg, err)
    assert.equal(1, #cfg.routes)
    tmpfiles[#tmpfiles + 1] = dir
  end)

  it("runs every load from a clean slate", function()
    local a = ok { LISTEN, API, 'proxy.route { upstream = api }' }
    local b = ok { LISTEN, API, 'proxy.route { upstream = api }' }
    assert.equal(1, #a.routes)
    assert.equal(1, #b.routes)
  end)
end)

describe("load_config() errors", function()
  it("reports a missing file", function()
    local cfg, err = core.load_config("/nonexistent/moonproxy.lua")
    assert.is_nil(cfg)
    assert.matches("cannot open /nonexistent/moonproxy.lua", err, 1, true)
  end)

  it("reports a syntax error at its line", function()
    fails_at({ LISTEN, "local x = = 1" }, 3, "unexpected symbol")
  end)

  it("reports a runtime error in the script at its line", function()
    fails_at({ LISTEN, "", "local t = nil; t.x = 1" }, 4, "attempt to index")
  end)

  it("needs a listener", function()
    local cfg, err, path = load { API }
    assert.is_nil(cfg)
    assert.equal(path .. ": no listener: declare one with proxy.listen { addr = \"127.0.0.1:8080\" }", err)
  end)

  it("refuses unknown keys, suggesting the near one", function()
    local err = fails_at({ LISTEN, "proxy.settings { worker = 2 }" }, 3, "settings: unknown key 'worker'")
    assert.matches("(did you mean 'workers'?)", err, 1, true)
    fails_at({ LISTEN, API, 'proxy.route { prefx = "/", upstream = api }' }, 4, "route: unknown key 'prefx'")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, keepalives = 2 }' }, 3,
      "upstream 'a': unknown key 'keepalives'")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", port = 80 }' }, 2, "listen: unknown key 'port'")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, timeouts = { conect = 1 } }' }, 3,
      "upstream 'a': timeouts: unknown key 'conect'")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { { addr = "127.0.0.1:1", wieght = 2 } } }' }, 3,
      "upstream 'a': servers[1]: unknown key 'wieght'")
  end)

  it("points at the line where a multi-line declaration starts", function()
    fails_at({ LISTEN, "", "proxy.settings {", "  workers = 2,", "  bogus = 1,", "}" }, 4, "unknown key 'bogus'")
  end)

  it("refuses bad sizes", function()
    fails_at({ LISTEN, 'proxy.settings { max_body_size = "10 MB" }' }, 3, "settings: max_body_size must be a size")
    fails_at({ LISTEN, "proxy.settings { max_header_size = -1 }" }, 3, "max_header_size must be a size")
    fails_at({ LISTEN, "proxy.settings { max_uri_size = 1.5 }" }, 3, "max_uri_size must be a size")
    fails_at({ LISTEN, "proxy.settings { max_header_size = 0 }" }, 3, "max_header_size must be greater than 0")
  end)

  it("refuses bad durations", function()
    fails_at({ LISTEN, "proxy.settings { keepalive_timeout = 0 }" }, 3, "keepalive_timeout must be a number of seconds")
    fails_at({ LISTEN, 'proxy.settings { client_header_timeout = "10s" }' }, 3, "client_header_timeout must be")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, timeouts = { read = -1 } }' }, 3,
      "upstream 'a': timeouts: read must be a number of seconds")
  end)

  it("refuses bad workers, max_connections, access_log and trusted_proxies", function()
    fails_at({ LISTEN, "proxy.settings { workers = 0 }" }, 3, "workers must be an integer from 1 to 1024")
    fails_at({ LISTEN, 'proxy.settings { workers = "many" }' }, 3, "workers must be")
    fails_at({ LISTEN, "proxy.settings { max_connections = 0 }" }, 3, "max_connections must be an integer")
    fails_at({ LISTEN, "proxy.settings { access_log = true }" }, 3, "access_log must be")
    fails_at({ LISTEN, 'proxy.settings { trusted_proxies = "10.0.0.0/8" }' }, 3, "trusted_proxies must be a list")
    fails_at({ LISTEN, 'proxy.settings { trusted_proxies = { "10.0.0.0/33" } }' }, 3,
      "settings: trusted_proxies[1] is not an address or CIDR")
    fails_at({ LISTEN, 'proxy.settings { trusted_proxies = { "example.com" } }' }, 3, "trusted_proxies[1]")
  end)

  it("refuses bad merge_slashes, escaped_slashes and underscores_in_headers", function()
    fails_at({ LISTEN, 'proxy.settings { merge_slashes = "yes" }' }, 3, "settings: merge_slashes must be true or false")
    fails_at({ LISTEN, 'proxy.settings { escaped_slashes = "allow" }' }, 3,
      'settings: escaped_slashes must be "reject", "keep" or "decode", got "allow"')
    fails_at({ LISTEN, "proxy.settings { escaped_slashes = true }" }, 3, "settings: escaped_slashes must be")
    fails_at({ LISTEN, "proxy.settings { underscores_in_headers = 1 }" }, 3,
      "settings: underscores_in_headers must be true or false")
  end)

  it("refuses a route path or prefix that no normalised path can match", function()
    fails_at({ LISTEN, API, 'proxy.route { prefix = "/a//b", upstream = api }' }, 4,
      "route '1': prefix '/a//b' never matches a normalised path; write '/a/b'")
    fails_at({ LISTEN, API, 'proxy.route { path = "/caf%c3%a9", upstream = api }' }, 4, "write '/caf%C3%A9'")
    fails_at({ LISTEN, API, 'proxy.route { name = "up", path = "/x/../y", upstream = api }' }, 4,
      "route 'up': path '/x/../y' never matches a normalised path; write '/y'")
    fails_at({ LISTEN, API, 'proxy.route { prefix = "/ids/a%2fb", upstream = api }' }, 4,
      "never matches: such a path is refused with 400")
    ok { LISTEN, API, 'proxy.settings { merge_slashes = false, escaped_slashes = "keep" }',
      'proxy.route { prefix = "/a//b/%2F", upstream = api }' }
  end)

  it("refuses a second settings or admin declaration", function()
    fails_at({ LISTEN, "proxy.settings { workers = 1 }", "proxy.settings { workers = 2 }" }, 4,
      "settings: already declared at")
    fails_at({ LISTEN, 'proxy.admin "127.0.0.1:1"', 'proxy.admin "127.0.0.1:2"' }, 4, "admin: already declared")
  end)

  it("refuses bad addresses", function()
    fails_at({ 'proxy.listen { addr = "8080" }' }, 2, 'listen: addr must be "host:port"')
    fails_at({ 'proxy.listen { addr = "127.0.0.1:70000" }' }, 2, "needs a port from 0 to 65535")
    fails_at({ 'proxy.listen { addr = "example.com:80" }' }, 2, "host names are not supported yet")
    fails_at({ 'proxy.listen { addr = "::1:80" }' }, 2, 'must be "host:port" or "[ipv6]:port"')
    fails_at({ 'proxy.listen { addr = "[::zz]:80" }' }, 2, "listen: addr must be")
    fails_at({ 'proxy.listen { addr = "[1::2::3]:80" }' }, 2, "listen: bad address '[1::2::3]:80'")
    fails_at({ "proxy.listen {}" }, 2, 'listen: needs addr = "host:port"')
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:0" } }' }, 3, "needs a port from 1 to 65535")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "*:80" } }' }, 3, "needs a host")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "300.1.1.1:80" } }' }, 3, "numeric IP address")
  end)

  it("refuses an admin port other machines can reach without a token", function()
    fails_at({ LISTEN, 'proxy.admin "0.0.0.0:8085"' }, 3, "admin: 0.0.0.0:8085 is not a loopback address: it needs a token")
    fails_at({ LISTEN, 'proxy.admin "*:8085"' }, 3, "admin: *:8085 is not a loopback address")
    fails_at({ LISTEN, 'proxy.admin { addr = "[::]:8085" }' }, 3, "is not a loopback address")
    fails_at({ LISTEN, 'proxy.admin { addr = "10.1.2.3:8085" }' }, 3, "is not a loopback address")
    fails_at({ LISTEN, 'proxy.admin { addr = "0.0.0.0:8085", token = "" }' }, 3, "admin: token must be a non-empty string")
    fails_at({ LISTEN, 'proxy.admin { addr = "127.0.0.1:8085", token = 42 }' }, 3, "admin: token must be")
    for _, addr in ipairs { "0.0.0.0:8085", "*:8085", "[::]:8085" } do
      assert.equal(addr, ok({ LISTEN, 'proxy.admin { addr = "' .. addr .. '", token = "s3cret" }' }).admin)
    end
    for _, addr in ipairs { "127.0.0.1:8085", "127.9.9.9:8085", "[::1]:8085", "localhost:8085" } do
      assert.equal(addr, ok({ LISTEN, 'proxy.admin "' .. addr .. '"' }).admin)
    end
  end)

  it("refuses a listener declared twice and an admin port on a listener", function()
    fails_at({ LISTEN, LISTEN }, 3, "listen: 127.0.0.1:8080 is already declared at")
    fails_at({ LISTEN, 'proxy.admin "127.0.0.1:8080"' }, 3, "admin: 127.0.0.1:8080 is also a listener")
  end)

  it("refuses bad upstream declarations", function()
    fails_at({ LISTEN, 'proxy.upstream { servers = { "127.0.0.1:1" } }' }, 3, "upstream: expects a name")
    fails_at({ LISTEN, 'proxy.upstream "a" {}' }, 3, "upstream 'a': needs servers")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = {} }' }, 3, "upstream 'a': servers must list at least one server")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { 5 } }' }, 3, 'servers[1] must be "host:port" or {')
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = "127.0.0.1:1" }' }, 3, "servers must be a list")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { { addr = "127.0.0.1:1", weight = 0 } } }' }, 3,
      "servers[1]: weight must be an integer from 1 to 1000")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1", "127.0.0.1:1" } }' }, 3, "listed twice")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, retries = -1 }' }, 3, "retries must be")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, host = "a b" }' }, 3, "host must be")
  end)

  it("refuses duplicate upstream names at the second declaration", function()
    fails_at({ LISTEN, API, "", 'proxy.upstream "api" { servers = { "127.0.0.1:2" } }' }, 5,
      "upstream 'api' is already declared at")
  end)

  it("refuses duplicate route names at the second route", function()
    fails_at({ LISTEN, API, 'proxy.route { name = "x", upstream = api }', 'proxy.route { name = "x", upstream = api }' },
      5, "route: name 'x' is already used by the route at")
    fails_at({ LISTEN, API, 'proxy.route { name = "2", upstream = api }', 'proxy.route { upstream = api }' },
      5, "name '2' is already used")
  end)

  it("refuses a route naming an upstream that does not exist, at the route's line", function()
    local err = fails_at({ LISTEN, API, "", 'proxy.route { prefix = "/", upstream = "apii" }' }, 5,
      "route '1': unknown upstream 'apii'")
    assert.matches("did you mean 'api'", err, 1, true)
  end)

  it("refuses bad routes", function()
    fails_at({ LISTEN, API, 'proxy.route { prefix = "/" }' }, 4, "route: needs one target")
    fails_at({ LISTEN, API, 'proxy.route { path = "/a", prefix = "/b", upstream = api }' }, 4,
      "set only one of path, prefix, regex")
    fails_at({ LISTEN, API, 'proxy.route { path = "/a", strip_prefix = true, upstream = api }' }, 4,
      "strip_prefix needs a prefix")
    fails_at({ LISTEN, API, 'proxy.route { prefix = "v1", upstream = api }' }, 4, 'prefix must start with "/"')
    fails_at({ LISTEN, API, 'proxy.route { host = "a.com:80", upstream = api }' }, 4, "host must be a host name")
    fails_at({ LISTEN, API, 'proxy.route { method = {}, upstream = api }' }, 4, "method must be")
    fails_at({ LISTEN, API, 'proxy.route { headers = { ["x-a"] = 1 }, upstream = api }' }, 4, "headers ['x-a']")
    fails_at({ LISTEN, API, 'proxy.route { upstream = proxy.upstream "api" }' }, 4, "upstream must be an upstream")
    fails_at({ LISTEN, API, 'proxy.route { strip_prefix = "yes", prefix = "/", upstream = api }' }, 4,
      "strip_prefix must be true or false")
  end)

  it("reports a bad regex at the route's line (compiled by the C router)", function()
    fails_at({ LISTEN, API, "", 'proxy.route { regex = "^/(a", upstream = api }' }, 5, "^/(a")
  end)

  it("reports a bad header regex at the route's line", function()
    fails_at({ LISTEN, API, 'proxy.route { headers = { ["x-a"] = "~(" }, upstream = api }' }, 4, "(")
  end)
end)

describe("load_config() hooks and plugins", function()
  for _, key in ipairs { "rewrite", "on_request", "on_response" } do
    it("refuses a route " .. key .. " that is not a function", function()
      fails_at({ LISTEN, API, "proxy.route { upstream = api, " .. key .. " = {} }" }, 4,
        key .. " must be a function")
    end)
  end

  it("refuses a route with both an upstream and a handler", function()
    fails_at({ LISTEN, API, "proxy.route { upstream = api, handler = function() end }" }, 4, "needs one target")
  end)

  it("accepts a handler route without an upstream", function()
    ok { LISTEN, API, "proxy.route { prefix = '/h', handler = function(req) return api end }" }
  end)

  it("refuses an unknown plugin at the route's line", function()
    fails_at({ LISTEN, API, 'proxy.route { upstream = api, plugins = { { "no_such_plugin" } } }' }, 4,
      "unknown plugin 'no_such_plugin'")
  end)

  it("refuses a response hook that calls a request-only method, at the hook's line", function()
    fails_at({ LISTEN, API, "proxy.route { prefix = '/', upstream = api,",
      "  on_response = function(req, res) return req:respond(200, 'x') end }" }, 5,
      "on_response calls req:respond, which only request hooks")
  end)

  it("refuses an on_log hook that calls req:set_path", function()
    fails_at({ LISTEN, API, "proxy.on_log(function(req, res)", "  req:set_path('/x')", "end)" }, 4,
      "proxy.on_log calls req:set_path")
  end)

  it("refuses a global hook that is not a function", function()
    fails_at({ LISTEN, API, "proxy.on_request(42)" }, 4, "proxy.on_request expects a function")
  end)
end)

describe("load_config() balancing and health", function()
  local UP = 'proxy.upstream "a" { servers = { "127.0.0.1:1", "127.0.0.1:2" }, '

  it("accepts every built-in balancer", function()
    for _, b in ipairs { "round_robin", "weighted", "least_conn", "p2c", "ewma" } do
      local cfg = ok { LISTEN, UP .. 'balancer = "' .. b .. '" }' }
      assert.equal(b, cfg.upstreams.a.balancer)
    end
  end)

  it("accepts a Lua function or module as the balancer", function()
    ok { LISTEN, UP .. "balancer = function(servers, req) return servers[1] end }" }
    ok { LISTEN, UP .. "balancer = { pick = function(servers, req) return servers[1] end } }" }
  end)

  it("refuses an unknown balancer name at the upstream's line", function()
    fails_at({ LISTEN, UP .. 'balancer = "fastest" }' }, 3, '"fastest" is not a balancer')
  end)

  it("needs a hash_key for chash, and refuses a malformed one", function()
    fails_at({ LISTEN, UP .. 'balancer = "chash" }' }, 3, "needs hash_key")
    fails_at({ LISTEN, UP .. 'balancer = "chash", hash_key = "query:x" }' }, 3, "hash_key must be")
    ok { LISTEN, UP .. 'balancer = "chash", hash_key = "cookie:sid" }' }
    ok { LISTEN, UP .. 'balancer = "chash", hash_key = function(req) return req.path end }' }
  end)

  it("checks health and passive tables", function()
    ok { LISTEN, UP .. 'health = { path = "/health", interval = 2, timeout = 1, rise = 2, fall = 3 } }' }
    fails_at({ LISTEN, UP .. "health = { rise = 0 } }" }, 3, "rise")
    fails_at({ LISTEN, UP .. "passive = { failures = 3, colldown = 1 } }" }, 3, "colldown")
    fails_at({ LISTEN, UP .. "passive = { statuses = { 600 } } }" }, 3, "statuses")
  end)
end)

describe("load_config() static routes", function()
  local dir -- a temp folder: conf.lua beside site/ (index.html, app.js) and a plain file

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/site/sub"))
    write(dir .. "/site/index.html", "<h1>hi</h1>\n")
    write(dir .. "/plain.txt", "not a folder\n")
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  local function static_route(fields)
    return "proxy.route { prefix = \"/\", static = { " .. fields .. " } }"
  end

  it("accepts a root relative to the script's folder, whatever the current one", function()
    local cfg, err = load({ LISTEN, static_route('root = "./site", fallback = "/index.html"'),
      (static_route('root = "site/sub"'):gsub('"/"', '"/sub/"')) }, dir .. "/conf.lua")
    assert(cfg, err)
    assert.equal(2, #cfg.routes)
  end)

  it("refuses a root that does not exist, at the route's line", function()
    fails_at({ LISTEN, API, static_route('root = "./no-such-folder"') }, 4,
      "route '1': static root '/tmp/no-such-folder' does not exist")
  end)

  it("refuses a root that is not a directory", function()
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/plain.txt"') }, 3, "is not a directory")
  end)

  it("refuses a fallback that is not a file in root", function()
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/site", fallback = "/app.html"') }, 3,
      "static fallback '/app.html' is not a file in root")
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/site", fallback = "/sub"') }, 3,
      "is not a file in root")
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/site", fallback = "/../plain.txt"') }, 3,
      "fallback must be a plain path inside root")
  end)

  it("needs root, and checks index", function()
    fails_at({ LISTEN, static_route('index = "index.html"') }, 3, "route: static: needs root")
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/site", index = "a/b.html"') }, 3,
      'index must be a file name without "/"')
    fails_at({ LISTEN, static_route('root = "' .. dir .. '/site", indx = "a.html"') }, 3,
      "unknown key 'indx' (did you mean 'index'?)")
  end)

  it("refuses a route with static and another target", function()
    local site = 'static = { root = "' .. dir .. '/site" }'
    fails_at({ LISTEN, API, "proxy.route { upstream = api, " .. site .. " }" }, 4, "route: needs one target")
    fails_at({ LISTEN, "proxy.route { handler = function() end, " .. site .. " }" }, 3, "route: needs one target")
  end)
end)

describe("load_config() lua_memory", function()
  -- ~40 MB of distinct strings the script keeps
  local HOLD = "local keep = {} for i = 1, 40000 do keep[i] = string.rep('y', 1000) .. i end"

  it("lets a script hold what fits in the budget", function()
    ok { LISTEN, 'proxy.settings { lua_memory = "64m" }', HOLD }
  end)

  it("refuses a script that holds more after proxy.settings, at the line that passed it", function()
    local cfg, err, path = load { LISTEN, 'proxy.settings { lua_memory = "16m" }', HOLD }
    assert.is_nil(cfg)
    assert.matches("^" .. path:gsub("%p", "%%%0") .. ":4: lua_memory exceeded", err)
  end)

  it("refuses a budget below what the script holds already, at the settings line", function()
    fails_at({ LISTEN, HOLD, 'proxy.settings { lua_memory = "8m" }' }, 4,
      'settings: lua_memory ("8m") is less than this VM holds already')
  end)

  it("refuses a lua_memory that is not a size of at least 1m", function()
    fails_at({ LISTEN, 'proxy.settings { lua_memory = "512k" }' }, 3, 'settings: lua_memory must be at least "1m"')
    fails_at({ LISTEN, 'proxy.settings { lua_memory = "lots" }' }, 3, "settings: lua_memory must be a size")
  end)
end)

describe("examples/quickstart.lua", function()
  it("loads", function()
    local cfg, err = core.load_config("examples/quickstart.lua")
    assert(cfg, err)
    assert.same({ "127.0.0.1:8080" }, cfg.listen)
    assert.equal("stdout", cfg.settings.access_log)
    assert.same({ "127.0.0.1:9001" }, cfg.upstreams.demo.servers)
  end)
end)

describe("load_config() TLS", function()
  -- Certificates made here with the openssl command (never committed): a
  -- self-signed pair, a second key, and an expired certificate (`openssl
  -- ca -selfsign`: OpenSSL 3.0's req and x509 cannot backdate one).
  local dir = os.tmpname() .. ".tls"

  local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
    local out = p:read("*a")
    p:close()
    assert(out:match("rc=0\n$"), cmd .. ":\n" .. out)
  end

  local function selfsigned(name, extra)
    sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=localhost"
      .. " -keyout %s/%s.key -out %s/%s.pem %s"):format(dir, name, dir, name, extra or ""))
  end

  lazy_setup(function()
    sh("mkdir -p " .. dir .. "/certs " .. dir .. "/ca/issued")
    selfsigned("certs/site")
    selfsigned("certs/other")
    write(dir .. "/ca/index.txt", "")
    write(dir .. "/ca/serial", "1000\n")
    write(dir .. "/ca/ca.cnf", ("[ ca ]\ndefault_ca = c\n[ c ]\ndatabase = %s/ca/index.txt\nserial = %s/ca/serial\n"
      .. "new_certs_dir = %s/ca/issued\ndefault_md = sha256\npolicy = p\n[ p ]\ncommonName = supplied\n")
      :format(dir, dir, dir))
    sh(("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost"
      .. " -keyout %s/certs/old.key -out %s/ca/old.csr"):format(dir, dir))
    sh(("openssl ca -batch -notext -selfsign -config %s/ca/ca.cnf -keyfile %s/certs/old.key -in %s/ca/old.csr"
      .. " -out %s/certs/old.pem -startdate 20200101000000Z -enddate 20210101000000Z"):format(dir, dir, dir, dir))
  end)

  lazy_teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  local PAIR = 'cert = "certs/site.pem", key = "certs/site.key"'

  -- The lines in dir/moonproxy.lua, so that relative paths mean dir's files.
  local function load_here(lines)
    return load(lines, dir .. "/moonproxy.lua")
  end

  it("refuses bad listener tls tables at the declaration's line", function()
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = "on" }' }, 2, "listen: tls: expects a table")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { cert = "a.pem" } }' }, 2,
      'listen: tls: needs cert = "site.pem" and key = "site.key"')
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { key = "a.key" } }' }, 2, "listen: tls: needs cert")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR .. ', cipher = "x" } }' }, 2,
      "listen: tls: unknown key 'cipher' (did you mean 'ciphers'?)")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR .. ', certs = { { cert = "b.pem" } } } }' }, 2,
      "listen: tls: certs[1]: needs cert")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR .. ', certs = {} } }' }, 2,
      "listen: tls: certs must be a non-empty list")
    fails_at({ 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR .. ', client_ca = 1 } }' }, 2,
      "listen: tls: client_ca must be a non-empty string")
  end)

  it("takes only TLSv1.2 and TLSv1.3 as protocols, refusing the old ones by name", function()
    local function protocols(list)
      return { 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR .. ", protocols = " .. list .. " } }" }
    end
    for list, text in pairs {
      ["{}"] = 'listen: tls: protocols must be a non-empty list of "TLSv1.2", "TLSv1.3"',
      ['"TLSv1.3"'] = "protocols must be a non-empty list",
      ['{ "TLSv1.1" }'] = 'protocols "TLSv1.1" is refused: it is broken',
      ['{ "TLSv1.3", "TLSv1" }'] = '"TLSv1" is refused',
      ['{ "SSLv3" }'] = '"SSLv3" is refused',
      ['{ "TLSv1.4" }'] = 'protocols must list "TLSv1.2" or "TLSv1.3", got "TLSv1.4"',
      ['{ "TLSv1.3", "TLSv1.3" }'] = 'protocols lists "TLSv1.3" twice',
    } do
      fails_at(protocols(list), 2, text)
    end
  end)

  it("refuses bad admin and upstream tls tables", function()
    fails_at({ LISTEN, 'proxy.admin { addr = "127.0.0.1:1", tls = { cert = "a.pem" } }' }, 3,
      "admin: tls: needs cert")
    local function up(tls)
      return { LISTEN, 'proxy.upstream "a" { servers = { "127.0.0.1:1" }, tls = ' .. tls .. " }" }
    end
    for tls, text in pairs {
      ["true"] = "upstream 'a': tls: expects a table",
      ['{ cert = "c.pem" }'] = "upstream 'a': tls: a client certificate needs both cert and key",
      ['{ key = "c.key" }'] = "needs both cert and key",
      ['{ verify = "yes" }'] = "upstream 'a': tls: verify must be true or false",
      ['{ server_name = "a b" }'] = "upstream 'a': tls: server_name must be a host name",
      ['{ server_name = "api.internal:443" }'] = "server_name must be a host name",
      ['{ sni = "x" }'] = "upstream 'a': tls: unknown key 'sni'",
    } do
      fails_at(up(tls), 3, text)
    end
  end)

  it("resolves every path against the script's folder, with the defaults filled", function()
    local proxy = require "moonproxy"
    proxy._reset()
    proxy.listen { addr = "127.0.0.1:1", tls = { cert = "certs/a.pem", key = "./certs/a.key", client_ca = "/etc/ca.pem",
      certs = { { cert = "b.pem", key = "/k/b.key" } } } }
    proxy.admin { addr = "127.0.0.1:2", tls = { cert = "adm.pem", key = "adm.key", protocols = { "TLSv1.3" } } }
    proxy.upstream "api" { servers = { "127.0.0.1:3" }, tls = { ca = "ca.pem", cert = "c.pem", key = "c.key" } }
    proxy.upstream "plain" { servers = { "127.0.0.1:4" } }
    local t = proxy._finish("/srv/conf/moonproxy.lua")
    proxy._reset()
    local l = t.listen[1].tls
    assert.equal("/srv/conf/certs/a.pem", l.cert)
    assert.equal("/srv/conf/certs/a.key", l.key)
    assert.equal("/etc/ca.pem", l.client_ca)
    assert.same({ { cert = "/srv/conf/b.pem", key = "/k/b.key" } }, l.certs)
    assert.same({ "TLSv1.2", "TLSv1.3" }, l.protocols)
    assert.is_nil(l.ciphers)
    assert.same({ cert = "/srv/conf/adm.pem", key = "/srv/conf/adm.key", protocols = { "TLSv1.3" } }, t.admin.tls)
    assert.same({ verify = true, ca = "/srv/conf/ca.pem", cert = "/srv/conf/c.pem", key = "/srv/conf/c.key" },
      t.upstreams[1].tls)
    assert.is_nil(t.upstreams[2].tls)
  end)

  it("loads a TLS listener, admin port and upstream from files next to the script", function()
    local cfg, err = load_here { 'proxy.listen { addr = "127.0.0.1:1", tls = { ' .. PAIR
      .. ', certs = { { cert = "certs/other.pem", key = "certs/other.key" } }, protocols = { "TLSv1.3" } } }',
      'proxy.listen { addr = "127.0.0.1:2" }',
      'proxy.admin { addr = "127.0.0.1:3", tls = { ' .. PAIR .. ', client_ca = "certs/other.pem" } }',
      'proxy.upstream "api" { servers = { "127.0.0.1:4" }, tls = { ca = "certs/site.pem", server_name = "localhost",'
        .. " " .. PAIR .. " } }",
      'proxy.upstream "sys" { servers = { "127.0.0.1:5" }, tls = { verify = false } }' }
    assert(cfg, err)
    assert.same({ "127.0.0.1:1", "127.0.0.1:2" }, cfg.listen)
  end)

  it("refuses a certificate or key that does not load, at the declaration's line", function()
    local function listen(tls)
      return { LISTEN, 'proxy.listen { addr = "127.0.0.1:8443", tls = { ' .. tls .. " } }" }
    end
    local function refused(lines, line, text)
      local cfg, err, path = load_here(lines)
      assert.is_nil(cfg)
      local where = path .. ":" .. line .. ": "
      assert.equal(where, err:sub(1, #where))
      assert(err:find(text, 1, true), "expected '" .. text .. "' in: " .. err)
    end
    refused(listen 'cert = "certs/missing.pem", key = "certs/site.key"', 3,
      "listen 127.0.0.1:8443: tls: " .. dir .. "/certs/missing.pem: No such file or directory")
    refused(listen 'cert = "certs/site.pem", key = "certs/other.key"', 3,
      "listen 127.0.0.1:8443: tls: " .. dir .. "/certs/other.key: key does not match the certificate")
    refused(listen 'cert = "certs/old.pem", key = "certs/old.key"', 3,
      "listen 127.0.0.1:8443: tls: " .. dir .. "/certs/old.pem: certificate expired on 2021-01-01 00:00:00 UTC")
    refused(listen 'cert = "certs/site.key", key = "certs/site.key"', 3, "certs/site.key: not a PEM certificate")
    refused(listen(PAIR .. ', certs = { { cert = "certs/old.pem", key = "certs/old.key" } }'), 3, "certificate expired")
    refused(listen(PAIR .. ', client_ca = "certs/nope.pem"'), 3, "listen 127.0.0.1:8443: tls: ")
    refused(listen(PAIR .. ', ciphers = "NO-SUCH-CIPHER"'), 3, "listen 127.0.0.1:8443: tls: ")
    refused({ LISTEN, "", 'proxy.admin { addr = "127.0.0.1:9000", tls = { cert = "x.pem", key = "x.key" } }' }, 4,
      "admin 127.0.0.1:9000: tls: " .. dir .. "/x.pem: No such file or directory")
    refused({ LISTEN, 'proxy.upstream "api" { servers = { "127.0.0.1:4" }, tls = { ca = "certs/none.pem" } }' }, 3,
      "upstream api: tls: ")
    refused({ LISTEN, 'proxy.upstream "api" { servers = { "127.0.0.1:4" }, tls = { cert = "certs/old.pem",'
      .. ' key = "certs/old.key" } }' }, 3, "upstream api: tls: " .. dir .. "/certs/old.pem: certificate expired")
  end)
end)

-- Upstream servers by DNS name (src/resolve.c): resolved while the configuration
-- loads, here from a hosts file (settings.resolver.hosts, relative to the
-- script's folder) with DNS pointed at a closed loopback port.
describe("load_config() servers by name", function()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir) == 0)
  write(dir .. "/hosts", table.concat({
    "# names for the specs",
    "127.0.0.2   api.test   other.test",
    "127.0.0.1   api.test",
    "::1         six.test",
    "127.0.0.1   dup.test",
  }, "\n") .. "\n")
  local RESOLVER = 'proxy.settings { resolver = { hosts = "hosts", nameservers = { "127.0.0.1:1" }, timeout = 1 } }'

  local function load_in_dir(lines)
    return load(lines, dir .. "/byname.lua")
  end

  teardown(function()
    os.remove(dir .. "/byname.lua")
    os.remove(dir)
  end)

  it("expands a name into one server per address, sorted, with the name's weight", function()
    local cfg, err = load_in_dir { RESOLVER, LISTEN,
      'proxy.upstream "api" { servers = { { addr = "api.test:8080", weight = 3 }, "six.test:81", "127.0.0.1:9" },',
      '  resolve = { min = 2, max = 30 } }' }
    assert(cfg, err)
    local u = cfg.upstreams.api
    assert.same({ "127.0.0.1:8080", "127.0.0.2:8080", "[::1]:81", "127.0.0.1:9" }, u.servers)
    assert.same({ "api.test:8080", "api.test:8080", "six.test:81", "127.0.0.1:9" }, u.server_names)
    assert.same({ 3, 3, 1, 1 }, u.weights)
    assert.same({ min = 2, max = 30 }, u.resolve)
    assert.same({ hosts = dir .. "/hosts", nameservers = "127.0.0.1:1", timeout = 1 }, cfg.settings.resolver)
  end)

  it("leaves out an address a name shares with a server listed before it", function()
    local cfg, err = load_in_dir { RESOLVER, LISTEN, 'proxy.upstream "api" { servers = { "127.0.0.1:80", "dup.test:80" } }' }
    assert(cfg, err)
    assert.same({ "127.0.0.1:80" }, cfg.upstreams.api.servers)
  end)

  it("defaults resolve to min = 1, max = 300", function()
    local cfg, err = load_in_dir { RESOLVER, LISTEN, 'proxy.upstream "api" { servers = { "api.test:80" } }' }
    assert(cfg, err)
    assert.same({ min = 1, max = 300 }, cfg.upstreams.api.resolve)
  end)

  it("refuses a name that does not resolve, at the upstream's line", function()
    local cfg, err, path = load_in_dir { RESOLVER, LISTEN, 'proxy.upstream "api" { servers = { "nope.test:8080" } }' }
    assert.is_nil(cfg)
    local want = path .. ":4: upstream api: server nope.test:8080: cannot resolve: nope.test: "
    assert.equal(want, err:sub(1, #want))
  end)

  it("refuses a hosts file that cannot be read", function()
    local cfg, err, path = load_in_dir { 'proxy.settings { resolver = { hosts = "missing" } }', LISTEN,
      'proxy.upstream "api" { servers = { "api.test:8080" } }' }
    assert.is_nil(cfg)
    assert.equal(path .. ":4: upstream api: server api.test:8080: cannot resolve: cannot read the hosts file "
      .. dir .. "/missing: No such file or directory", err)
  end)

  it("refuses bad resolver and resolve options", function()
    fails_at({ 'proxy.settings { resolver = { nameservers = { "dns.example:53" } } }' }, 2,
      'settings: resolver: nameservers [1] must be a numeric address "ip", "ip:port" or "[ipv6]:port"')
    fails_at({ 'proxy.settings { resolver = { nameservers = {} } }' }, 2, "nameservers must not be empty")
    fails_at({ 'proxy.settings { resolver = { timeout = 0 } }' }, 2, "timeout must be a number of seconds")
    fails_at({ 'proxy.settings { resolver = { timeout = 600 } }' }, 2, "timeout must be at most 60 seconds")
    fails_at({ 'proxy.settings { resolver = { servers = {} } }' }, 2, "settings: resolver: unknown key 'servers'")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "a.test:80" }, resolve = { min = 10, max = 5 } }' }, 3,
      "upstream 'a': resolve: min (10) is greater than max (5)")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "a.test:80" }, resolve = { min = 0 } }' }, 3,
      "min must be a number of seconds greater than 0")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "bad$name:80" } }' }, 3, "or a DNS name")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "a..test:80" } }' }, 3, "or a DNS name")
    fails_at({ LISTEN, 'proxy.upstream "a" { servers = { "a.test" } }' }, 3, 'must be "host:port"')
  end)

  it("takes the name as the TLS server name of servers given by it", function()
    local cfg, err = load_in_dir { RESOLVER, LISTEN, 'proxy.upstream "api" { servers = { "api.test:443" }, tls = {} }' }
    assert(cfg, err)
    assert.same({ "127.0.0.1:443", "127.0.0.2:443" }, cfg.upstreams.api.servers)
    assert.equal("api.test", cfg.upstreams.api.tls_name)
    cfg, err = load_in_dir { RESOLVER, LISTEN,
      'proxy.upstream "api" { servers = { "api.test:443" }, tls = { server_name = "edge.test" } }' }
    assert(cfg, err)
    assert.equal("edge.test", cfg.upstreams.api.tls_name)
    local _, err2, path = load_in_dir { RESOLVER, LISTEN,
      'proxy.upstream "api" { servers = { "127.0.0.9:443", "api.test:443" }, tls = {} }' }
    assert.equal(path .. ":4: upstream api: tls: servers given by more than one name (or by name and by address) "
      .. "need tls.server_name", err2)
  end)

  it("resolves names in the simulator (moonproxy.testing) too", function()
    local testing = require "moonproxy.testing"
    local text = HEAD .. "\n" .. table.concat({ RESOLVER, LISTEN,
      'proxy.route { prefix = "/", upstream = proxy.upstream "api" { servers = { "api.test:8080" } } }' }, "\n")
    local cfg = testing.load(text, { text = true, name = dir .. "/sim.lua" })
    local seen = {}
    for _ = 1, 4 do seen[cfg:request({ path = "/" }).server] = true end
    cfg:close()
    assert.same({ ["127.0.0.1:8080"] = true, ["127.0.0.2:8080"] = true }, seen)
  end)
end)
