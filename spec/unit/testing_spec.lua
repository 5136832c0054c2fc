-- moonproxy.testing: a configuration loaded offline runs requests through the
-- server's own code (src/sim.c). These specs check the module's contract; the
-- agreement with the running server is spec/e2e/agreement_spec.lua.
local testing = require "moonproxy.testing"
local core = require "moonproxy.core"
local h = require "helpers.proxy"

local HEAD = [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18080" }
]]

local function load(body, opts)
  opts = opts or {}
  opts.text = true
  return testing.load(HEAD .. body, opts)
end

describe("moonproxy.testing", function()
  describe("load", function()
    it("loads a file, and a script's text", function()
      local cfg = testing.load("examples/quickstart.lua")
      assert.equal("api", cfg:routes()[1].name)
      cfg:close()
      cfg = load('proxy.route { prefix = "/", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } } }')
      assert.equal(1, #cfg:routes())
    end)

    it("refuses what the server refuses, with the same file:line", function()
      local text = HEAD .. 'proxy.route { prefix = "/", upstream = "nope" }\n'
      local cfg, err = testing.try_load(text, { text = true, name = "bad.lua" })
      assert.is_nil(cfg)
      assert.matches("^bad.lua:3: route '1': unknown upstream 'nope'", err)
      -- the same text through the binary's -t
      local path = h.write_file(h.tmpname(".lua"), text)
      local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. path)
      assert.are_not.equal(0, rc)
      assert.truthy(out:find(err:gsub("^bad.lua", path), 1, true), out)
      assert.has_error(function() testing.load(text, { text = true, name = "bad.lua" }) end)
    end)
  end)

  describe("request", function()
    local cfg
    lazy_setup(function()
      cfg = load([=[
local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }
local web = proxy.upstream "web" { servers = { "127.0.0.1:9002", "127.0.0.1:9003" } }
proxy.on_request(function(req)
  if req.headers["x-block"] then return req:respond(403, "blocked\n", { ["x-why"] = "x-block" }) end
  req.headers["x-seen"] = "1"
end)
proxy.route { name = "v1", host = "api.example.com", prefix = "/v1/", strip_prefix = true, upstream = api }
proxy.route { name = "user", regex = [[^/users/(\d+)$]], upstream = api,
  rewrite = function(req, m) req:set_path("/u/" .. m[1]) end }
proxy.route { name = "boom", path = "/boom", upstream = api, on_request = function(req) error("kaput") end }
proxy.route { name = "web", prefix = "/", upstream = web,
  on_response = function(req, res) res.headers["x-served-by"] = "web"; if res.status == 404 then res.status = 410 end end }
]=])
    end)
    lazy_teardown(function() cfg:close() end)

    it("gives the route, the upstream, the server and the target", function()
      local r = cfg:request { method = "GET", host = "api.example.com", path = "/v1/users?x=1" }
      assert.same({ "v1", 1, "api", "127.0.0.1:9001", "GET", "/users?x=1" },
        { r.route, r.route_index, r.upstream, r.server, r.method, r.target })
      assert.is_nil(r.status)
    end)

    it("gives the headers the upstream receives", function()
      local r = cfg:request { host = "api.example.com", path = "/v1/a", headers = { ["X-Thing"] = { "a", "b" } },
        remote_addr = "10.1.2.3" }
      assert.equal("api.example.com", r.headers.host)
      assert.same({ "a", "b" }, r.headers["x-thing"])
      assert.equal("1", r.headers["x-seen"])
      assert.equal("10.1.2.3", r.headers["x-forwarded-for"])
      assert.equal("http", r.headers["x-forwarded-proto"])
      assert.equal("api.example.com", r.headers["x-forwarded-host"])
      assert.matches("^%x+$", r.headers["x-request-id"])
    end)

    it("takes headers as ordered pairs too, and refuses other shapes", function()
      local r = cfg:request { path = "/v1/a", host = "api.example.com",
        headers = { { "X-B", "1" }, { "X-A", "2" }, { "X-B", "3" } } }
      assert.same({ "1", "3" }, r.headers["x-b"])
      local b = r.head:find("X-B: 1", 1, true)
      assert.truthy(b and b < r.head:find("X-A: 2", 1, true) and r.head:find("X-A: 2", 1, true) < r.head:find("X-B: 3", 1, true))
      assert.has_error(function() cfg:request { path = "/", headers = { ["x-a"] = {} , [1] = 5 } } end)
      assert.has_error(function() cfg:request { path = "/", headers = { ["x-a"] = print } } end)
    end)

    it("keeps numbers given as header values, whatever the garbage collector does", function()
      local pause, stepmul = collectgarbage("setpause", 1), collectgarbage("setstepmul", 1000)
      local ok, err = pcall(function()
        for round = 1, 20 do
          local headers = {}
          for i = 1, 40 do headers[#headers + 1] = { "x-n" .. i, 1000000 + round * 100 + i } end
          local r = cfg:request { path = "/v1/a", host = "api.example.com", headers = headers }
          for i = 1, 40 do
            assert.equal(tostring(1000000 + round * 100 + i), r.headers["x-n" .. i])
          end
        end
      end)
      collectgarbage("setpause", pause)
      collectgarbage("setstepmul", stepmul)
      assert(ok, err)
    end)

    it("runs rewrites with the regex captures", function()
      local r = cfg:request { path = "/users/42?full=1" }
      assert.same({ "user", "/u/42?full=1" }, { r.route, r.target })
    end)

    it("gives the answer a hook made, with its headers", function()
      local r = cfg:request { path = "/v1/x", headers = { ["x-block"] = "yes" } }
      assert.same({ 403, "blocked\n", "x-block" }, { r.status, r.body, r.headers["x-why"] })
      assert.is_nil(r.upstream)
    end)

    it("reports a hook's error with file:line, and the 500", function()
      local r = cfg:request { path = "/boom" }
      assert.equal(500, r.status)
      assert.matches("config.lua:12: kaput", r.error)
    end)

    it("answers 404 when no route matches, and 400 for what the parser refuses", function()
      local c2 = load('proxy.route { host = "only.example.com", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } } }')
      assert.equal(404, c2:request({ path = "/" }).status)
      assert.equal(400, c2:request({ path = "/", host = false }).status)
      assert.equal(400, c2:request({ path = "/", headers = { ["bad name"] = "x" } }).status)
      c2:close()
    end)

    it("balances over the servers (round robin)", function()
      local picks = {}
      for i = 1, 4 do
        picks[i] = cfg:request({ path = "/page" }).server
      end
      assert.same({ "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9002", "127.0.0.1:9003" }, picks)
    end)

    it("traces every decision", function()
      local r = cfg:request { host = "api.example.com", path = "/v1/users" }
      local steps = {}
      for i, s in ipairs(r.trace) do steps[i] = s.step end
      assert.same({ "request", "hook", "route", "balancer", "forward" }, steps)
      assert.matches("proxy.on_request at config.lua:5: set request header x%-seen: 1", r.trace[2].text)
      assert.matches("route 'v1' at config.lua:9 matched /v1/users", r.trace[3].text)
      assert.matches("path now /users", r.trace[3].text)
      assert.matches("picked 127.0.0.1:9001", r.trace[4].text)
      local text = testing.format(r)
      assert.matches("^forwarded to upstream 'api', server 127.0.0.1:9001: GET /users\n 1%. request", text)
      assert.matches("\n 5%. forward  GET /users HTTP/1.1 to 127.0.0.1:9001", text)
    end)
  end)

  describe("request paths and names", function()
    local ROUTES = [[
local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }
proxy.route { name = "admin", prefix = "/admin", handler = function(req) return req:respond(403, "no\n") end }
proxy.route { name = "files", host = "files.example.com", prefix = "/", static = { root = "." } }
proxy.route { name = "all", prefix = "/", upstream = api,
  on_request = function(req) req.headers["x-path"] = req.path end }
]]

    it("normalises the path before routing, hooks and the target, as the server does", function()
      local cfg = load(ROUTES)
      assert.same({ "admin", 403 }, { cfg:request({ path = "/x/../%61dmin" }).route, cfg:request({ path = "//admin" }).status })
      local r = cfg:request { path = "/a/./b//c?x=/../y" }
      assert.same({ "all", "/a/b/c?x=/../y", "/a/b/c" }, { r.route, r.target, r.headers["x-path"] })
      assert.matches("path /a/./b//c normalised to /a/b/c", r.trace[2].text)
      assert.matches("matched /a/b/c ", r.trace[3].text)
      local u = cfg:request { path = "/", headers = { X_Forwarded_For = "6.6.6.6" } }
      assert.matches("field X_Forwarded_For dropped", u.trace[2].text)
      cfg:close()
    end)

    it("refuses what the server refuses (status = 400), saying why", function()
      local cfg = load(ROUTES)
      for _, p in ipairs { "/../x", "/a%00", "/a\\b", "/a#b", "/x/..%2fadmin", "/x?a#b" } do
        local r = cfg:request { path = p }
        assert.same({ 400, nil }, { r.status, r.route }, p)
      end
      assert.matches("refused: the path climbs above /", cfg:request({ path = "/../x" }).trace[2].text)
      cfg:close()
    end)

    it("follows settings.escaped_slashes and merge_slashes", function()
      local cfg = load('proxy.settings { escaped_slashes = "keep", merge_slashes = false }\n' .. ROUTES)
      assert.equal("/x/..%2Fadmin", cfg:request({ path = "/x/..%2fadmin" }).target)
      assert.equal("//admin", cfg:request({ path = "//admin" }).target)
      cfg:close()
      cfg = load('proxy.settings { escaped_slashes = "decode" }\n' .. ROUTES)
      assert.equal(403, cfg:request({ path = "/x/..%2fadmin" }).status)
      cfg:close()
    end)

    it("drops header names with '_' unless underscores_in_headers = true", function()
      local cfg = load(ROUTES)
      local r = cfg:request { path = "/", headers = { X_Forwarded_For = "6.6.6.6" } }
      assert.same({ nil, "127.0.0.1" }, { r.headers["x_forwarded_for"], r.headers["x-forwarded-for"] })
      cfg:close()
      cfg = load("proxy.settings { underscores_in_headers = true }\n" .. ROUTES)
      r = cfg:request { path = "/", headers = { X_Forwarded_For = "6.6.6.6" } }
      assert.same({ "6.6.6.6", "127.0.0.1" }, { r.headers["x_forwarded_for"], r.headers["x-forwarded-for"] })
      cfg:close()
    end)

    it("routes OPTIONS * as / and forwards it as *, or answers it for a static route", function()
      local cfg = load(ROUTES)
      local r = cfg:request { method = "OPTIONS", path = "*" }
      assert.same({ "all", "OPTIONS", "*" }, { r.route, r.method, r.target })
      r = cfg:request { method = "OPTIONS", path = "*", host = "files.example.com" }
      assert.same({ "files", 200, "GET, HEAD" }, { r.route, r.status, r.headers.allow })
      assert.equal(400, cfg:request({ method = "GET", path = "*" }).status)
      cfg:close()
      cfg = load('proxy.route { host = "only.example.com", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } } }')
      assert.equal(404, cfg:request({ method = "OPTIONS", path = "*" }).status)
      cfg:close()
    end)
  end)

  describe("response", function()
    it("runs the response hooks on what the upstream answers", function()
      local cfg = load([[
proxy.route { prefix = "/", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } },
  on_response = function(req, res) res.headers["server"] = nil; res.headers["x-route"] = req.route
    if res.status == 404 then res.status = 410 end end }
]])
      local r = cfg:request { path = "/a" }
      local res = cfg:response(r, { status = 200, headers = { Server = "apache", ["Content-Type"] = "text/plain" },
        body = "hello" })
      assert.same({ 200, "1", "text/plain", "5" },
        { res.status, res.headers["x-route"], res.headers["content-type"], res.headers["content-length"] })
      assert.is_nil(res.headers.server)
      assert.equal("hello", res.body)
      -- an earlier result is run again first
      local first = cfg:request { path = "/first" }
      cfg:request { path = "/second" }
      assert.equal(410, cfg:response(first, { status = 404 }).status)
      assert.has_error(function() cfg:response(cfg:request { path = "/x", host = false }, { status = 200 }) end)
      -- the same result twice: its request runs again
      local again = cfg:request { path = "/again" }
      assert.equal(200, cfg:response(again, { status = 200 }).status)
      assert.equal(410, cfg:response(again, { status = 404 }).status)
    end)
  end)

  describe("server state, time and randomness", function()
    local TEXT = [[
local u = proxy.upstream "u" { servers = { "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3" }, balancer = "p2c" }
local f = proxy.upstream "f" { servers = { "127.0.0.1:4" }, fail_open = true }
proxy.route { path = "/f", upstream = f }
proxy.route { prefix = "/", upstream = u, plugins = { { "rate_limit", rate = 1, burst = 2, scope = "testing_spec" } } }
]]

    it("never picks a server marked down; 503 when none is left, unless fail_open", function()
      local cfg = load(TEXT, { servers = { u = { ["127.0.0.1:1"] = { down = true }, ["127.0.0.1:2"] = { open = true } } } })
      for i = 1, 10 do
        assert.equal("127.0.0.1:3", cfg:request({ path = "/", remote_addr = "10.0.0." .. i }).server)
      end
      cfg:servers { u = { ["127.0.0.1:3"] = { down = true } }, f = { ["127.0.0.1:4"] = { down = true } } }
      local r = cfg:request { path = "/", remote_addr = "10.0.1.1" }
      assert.equal(503, r.status)
      assert.truthy(r.headers["retry-after"])
      assert.equal("127.0.0.1:4", cfg:request({ path = "/f" }).server)
      assert.has_error(function() cfg:servers { u = { ["127.0.0.1:9"] = { down = true } } } end)
    end)

    it("p2c prefers the server with fewer requests in flight", function()
      -- of two servers drawn at random, the less busy one: 3 wins whenever it
      -- is drawn (two draws in three), 1 and 2 only against each other
      local cfg = load(TEXT, { servers = { u = { ["127.0.0.1:1"] = { active = 50 }, ["127.0.0.1:2"] = { active = 50 } } } })
      local n = 0
      for i = 1, 30 do
        n = n + (cfg:request({ path = "/", remote_addr = "10.0.2." .. i }).server == "127.0.0.1:3" and 1 or 0)
      end
      assert(n >= 14 and n <= 28, n .. " picks of the idle server out of 30")
    end)

    it("gives the same picks and ids for the same seed", function()
      local a, b = load(TEXT, { seed = 7 }), load(TEXT, { seed = 7 })
      for i = 1, 5 do
        local ra = a:request { path = "/", remote_addr = "10.0.3." .. i }
        local rb = b:request { path = "/", remote_addr = "10.0.3." .. i }
        assert.same({ ra.server, ra.headers["x-request-id"] }, { rb.server, rb.headers["x-request-id"] })
      end
    end)

    it("pins the clock: a rate limit refills only when time moves", function()
      local cfg = load(TEXT, { now = 1000 })
      local addr = "10.9.9." .. math.random(1, 250)
      local st = {}
      for i = 1, 3 do st[i] = cfg:request({ path = "/", remote_addr = addr }).status or 200 end
      assert.same({ 200, 200, 429 }, st)
      assert.equal(429, cfg:request({ path = "/", remote_addr = addr }).status)
      cfg:set_now(1001)
      assert.is_nil(cfg:request({ path = "/", remote_addr = addr }).status)
      assert.equal(429, cfg:request({ path = "/", remote_addr = addr }).status)
    end)
  end)

  describe("proxy.expect guards", function()
    local GUARDED = [[
local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }
proxy.route { name = "v1", prefix = "/v1/", strip_prefix = true, upstream = api }
proxy.on_request(function(req) if req.headers["x-block"] then return req:respond(403, "no\n") end end)
proxy.expect { request = { host = "api.example.com", path = "/v1/users" }, upstream = "api", target = "/users",
  route = "v1", headers = { ["x-forwarded-host"] = "api.example.com", ["x-block"] = false } }
proxy.expect { request = { path = "/v1/x", headers = { ["x-block"] = "1" } }, status = 403 }
]]

    it("load when they hold", function()
      assert.truthy(load(GUARDED))
    end)

    it("refuse the configuration with the expected and actual result", function()
      local cfg, err = testing.try_load(HEAD .. GUARDED .. [[
proxy.expect { request = { path = "/v1/users" }, upstream = api, target = "/v1/users" }
]], { text = true })
      assert.is_nil(cfg)
      assert.matches("^config.lua:9: proxy.expect failed for GET localhost/v1/users: target: expected '/v1/users', got '/users'",
        err)
      assert.matches("trace: 1%. request: GET http://localhost/v1/users", err)
    end)

    it("are checked for their own shape at load", function()
      local _, err = testing.try_load(HEAD .. 'proxy.expect { upstream = "x" }', { text = true })
      assert.matches("config.lua:3: expect: needs request", err)
      _, err = testing.try_load(HEAD .. 'proxy.expect { request = { path = "/" } }', { text = true })
      assert.matches("says nothing to check", err)
      _, err = testing.try_load(HEAD .. 'proxy.expect { request = { path = "/" }, upstream = "nope" }', { text = true })
      assert.matches("unknown upstream 'nope'", err)
      _, err = testing.try_load(HEAD .. 'proxy.expect { request = { path = "/" }, target = "/", stauts = 200 }',
        { text = true })
      assert.matches("unknown key 'stauts' %(did you mean 'status'%?%)", err)
    end)

    it("do not take an answer made by the proxy for the upstream", function()
      local _, err = testing.try_load(HEAD .. GUARDED ..
        'proxy.expect { request = { path = "/v1/x", headers = { ["x-block"] = "1" } }, upstream = "api" }\n',
        { text = true })
      assert.matches("upstream: expected 'api', got an answer 403 from the proxy", err)
      local r = load(GUARDED):request { path = "/v1/x", headers = { ["x-block"] = "1" } }
      assert.same({ 403 }, { r.status, r.upstream, r.server })
    end)

    it("refuse a request they cannot make", function()
      local _, err = testing.try_load(HEAD .. GUARDED ..
        'proxy.expect { request = { path = "/v1/x", remote_addr = "10.0.0" }, upstream = "api" }\n', { text = true })
      assert.matches("config.lua:9: proxy.expect failed for GET localhost/v1/x: request: remote_addr '10.0.0' is not an IP address", err)
    end)

    it("stop a hook that never returns (hook_timeout) and refuse the configuration", function()
      local text = HEAD .. [[
proxy.settings { hook_timeout = 0.2 }
proxy.route { path = "/spin", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } },
  on_request = function(req) while true do end end }
]]
      local cfg = testing.load(text, { text = true })
      local r = cfg:request { path = "/spin" }
      assert.equal(500, r.status)
      assert.matches("stopped: the hook ran longer than hook_timeout", r.error)
      local _, err = testing.try_load(text .. 'proxy.expect { request = { path = "/spin" }, upstream = "u" }\n',
        { text = true })
      assert.matches("proxy.expect failed for GET localhost/spin: upstream: expected 'u', got an answer 500", err)
    end)

    it("survive a route with a very long host", function()
      local host = string.rep("h", 600) .. ".example.com"
      local cfg, err = testing.try_load(HEAD .. 'proxy.route { host = "' .. host ..
        '", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } } }\n' ..
        'proxy.expect { request = { host = "' .. host .. '", path = "/" }, upstream = "u" }\n', { text = true })
      assert(cfg, err)
      assert.matches("route '1' at config.lua:3 matched", cfg:request({ host = host, path = "/" }).trace[2].text)
    end)

    it("are checked by -t", function()
      local ok = h.write_file(h.tmpname(".lua"), HEAD .. GUARDED)
      local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. ok)
      assert.same({ 0, "ok\n" }, { rc, out })
      local bad = h.write_file(h.tmpname(".lua"), HEAD .. GUARDED ..
        'proxy.expect { request = { path = "/v1/x", headers = { ["x-block"] = "1" } }, upstream = "api" }\n')
      out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. bad)
      assert.are_not.equal(0, rc)
      assert.truthy(out:find(bad .. ":9: proxy.expect failed for GET localhost/v1/x: upstream: expected 'api', got an answer 403 from the proxy", 1, true), out)
    end)
  end)

  describe("requests over TLS", function()
    local cfg
    lazy_setup(function()
      cfg = load([=[
local api = proxy.upstream "api" { servers = { "127.0.0.1:9001" } }
proxy.route { prefix = "/", upstream = api,
  on_request = function(req)
    req.headers["x-scheme"] = req.scheme
    local t = req.tls
    req.headers["x-tls"] = t and table.concat({ t.version, t.cipher, tostring(t.sni), tostring(t.client_subject) }, "|")
      or "plain"
  end,
  on_response = function(req, res) res.headers["x-tls-sni"] = req.tls and req.tls.sni or "none" end }
]=])
    end)
    lazy_teardown(function() cfg:close() end)

    it("are plain unless tls is given: scheme http, req.tls nil, X-Forwarded-Proto http", function()
      local r = cfg:request { host = "api.example.com", path = "/a" }
      assert.same({ "http", "plain", "http" },
        { r.headers["x-scheme"], r.headers["x-tls"], r.headers["x-forwarded-proto"] })
      assert.equal("request", r.trace[1].step)
      assert.equal("GET http://api.example.com/a from 127.0.0.1", r.trace[1].text)
      assert.is_nil(r.trace[2].text:find("tls", 1, true))
    end)

    it("take tls = true: TLSv1.3, its default cipher, the host as SNI", function()
      local r = cfg:request { host = "api.example.com:8443", path = "/a", tls = true }
      assert.equal("https", r.headers["x-scheme"])
      assert.equal("TLSv1.3|TLS_AES_128_GCM_SHA256|api.example.com|nil", r.headers["x-tls"])
      assert.equal("https", r.headers["x-forwarded-proto"])
      assert.equal("GET https://api.example.com:8443/a from 127.0.0.1", r.trace[1].text)
      assert.same({ step = "request", text = "tls TLSv1.3 sni api.example.com" }, r.trace[2])
      -- no SNI for an IP address, as clients send none
      r = cfg:request { host = "127.0.0.1", path = "/a", tls = true }
      assert.equal("TLSv1.3|TLS_AES_128_GCM_SHA256|nil|nil", r.headers["x-tls"])
      assert.equal("tls TLSv1.3 sni (none)", r.trace[2].text)
    end)

    it("take the handshake's fields, and the response hooks see them too", function()
      local r = cfg:request { host = "api.example.com", path = "/a", tls = { version = "TLSv1.2",
        cipher = "ECDHE-RSA-AES128-GCM-SHA256", sni = "www.example.com", client_subject = "CN=client-one" } }
      assert.equal("TLSv1.2|ECDHE-RSA-AES128-GCM-SHA256|www.example.com|CN=client-one", r.headers["x-tls"])
      assert.equal("tls TLSv1.2 sni www.example.com, client CN=client-one", r.trace[2].text)
      assert.equal("www.example.com", cfg:response(r, { status = 200 }).headers["x-tls-sni"])
      r = cfg:request { path = "/a", tls = { sni = "only.example.com" } }
      assert.equal("TLSv1.3|TLS_AES_128_GCM_SHA256|only.example.com|nil", r.headers["x-tls"])
      assert.has_error(function() cfg:request { path = "/a", tls = "yes" } end,
        "request: tls must be true or { version =, cipher =, sni =, client_subject = }, got string")
      assert.has_error(function() cfg:request { path = "/a", tls = { sni = 5 } } end)
    end)

    it("keep an X-Forwarded-Proto from a trusted proxy, and drop a client's", function()
      local trusted = load([=[
proxy.settings { trusted_proxies = { "10.0.0.0/8" } }
proxy.route { prefix = "/", upstream = proxy.upstream "api" { servers = { "127.0.0.1:9001" } } }
]=])
      local r = trusted:request { path = "/", tls = true, remote_addr = "10.1.1.1",
        headers = { ["X-Forwarded-Proto"] = "http" } }
      assert.equal("http", r.headers["x-forwarded-proto"])
      r = trusted:request { path = "/", tls = true, remote_addr = "192.0.2.1", headers = { ["X-Forwarded-Proto"] = "http" } }
      assert.equal("https", r.headers["x-forwarded-proto"])
      trusted:close()
    end)
  end)

  describe("moonproxy --explain", function()
    it("prints where a request goes and why", function()
      local out, rc = h.run(h.quote(h.bin()) .. " -c examples/quickstart.lua --explain 'GET http://api.example.com/api/users?x=1' -H 'X-Thing: 1'")
      assert.equal(0, rc, out)
      assert.matches("route:    api\nupstream: demo\nserver:   127.0.0.1:9001\nthe upstream receives:\n  GET /users%?x=1 HTTP/1.1\n  Host: api.example.com\n", out)
      assert.matches("\n  X%-Thing: 1\n", out)
      assert.matches("trace:\n   1%. request  GET http://api.example.com/api/users%?x=1 from 127.0.0.1\n", out)
    end)

    it("takes an https:// URL as a request over TLS", function()
      local out, rc = h.run(h.quote(h.bin()) .. " -c examples/quickstart.lua --explain 'GET https://api.example.com/api/users'")
      assert.equal(0, rc, out)
      assert.matches("\n  X%-Forwarded%-Proto: https\n", out)
      assert.matches("trace:\n   1%. request  GET https://api.example.com/api/users from 127.0.0.1\n"
        .. "   2%. request  tls TLSv1.3 sni api.example.com\n", out)
    end)

    it("prints the answer the proxy makes", function()
      local out, rc = h.run(h.quote(h.bin()) .. " -c examples/api_gateway.lua --explain 'GET /v1/users'")
      assert.equal(0, rc, out)
      assert.matches("answered: 401 Unauthorized\n", out)
    end)

    it("refuses a malformed request", function()
      local out, rc = h.run(h.quote(h.bin()) .. " -c examples/quickstart.lua --explain 'GET'")
      assert.equal(2, rc)
      assert.matches("%-%-explain takes 'METHOD URL'", out)
      out, rc = h.run(h.quote(h.bin()) .. " -c examples/quickstart.lua --explain 'GET /' -H 'nocolon'")
      assert.equal(2, rc)
      assert.matches("%-H takes 'Name: value'", out)
    end)
  end)

  it("fails a hook past lua_memory with 500, as the server does, and stays usable", function()
    local cfg = load([[
proxy.settings { lua_memory = "16m" }
local u = proxy.upstream "u" { servers = { "127.0.0.1:1" } }
proxy.route { path = "/grow", upstream = u, on_request = function(req)
  local t = {}
  for i = 1, 100000 do t[i] = string.rep("x", 1000) .. i end
end }
proxy.route { prefix = "/", upstream = u }
]])
    local r = cfg:request { path = "/grow" }
    assert.equal(500, r.status)
    assert.matches("lua_memory", r.error, 1, true)
    r = cfg:request { path = "/after" }
    assert.same({ nil, "u" }, { r.status, r.upstream })
    cfg:close()
  end)

  it("exposes the same shared dicts as the configuration", function()
    local cfg = load([[
local flags = proxy.shared("testing_flags", "64k")
proxy.route { prefix = "/", handler = function(req)
  return flags:get("color") == "green" and "green" or "blue" end }
proxy.upstream "blue" { servers = { "127.0.0.1:1" } }
proxy.upstream "green" { servers = { "127.0.0.1:2" } }
]])
    local flags = core.shared("testing_flags", "64k")
    flags:delete("color")
    assert.equal("blue", cfg:request({ path = "/" }).upstream)
    flags:set("color", "green")
    assert.equal("green", cfg:request({ path = "/" }).upstream)
    flags:delete("color")
  end)
end)

describe("moonproxy.testing answers call-outs", function()
  local CALLS = [[
local http = require "moonproxy.http"
local redis = require "moonproxy.redis"
local r = proxy.redis { addr = "127.0.0.1:6379", timeout = 0.2 }
local auth = proxy.upstream "auth" { servers = { "127.0.0.1:2" } }
local app = proxy.upstream "app" { servers = { "127.0.0.1:1" } }
proxy.route { prefix = "/api/", upstream = app, on_request = function(req)
  local res, err = http.request { upstream = auth, method = "POST", path = "/check",
                                  headers = { authorization = req.headers.authorization } }
  if not res then return req:respond(503, "auth: " .. err .. "\n") end
  if res.status ~= 200 then return req:respond(401, "no\n") end
  req.headers["x-user"] = res.headers["x-user"]
  req.headers["x-seen"] = tostring(r:call("INCR", "seen:" .. res.headers["x-user"]))
  local p = r:pipeline { { "GET", "a" }, { "GET", "none" }, { "NOPE" } }
  req.headers["x-pipe"] = tostring(p[1]) .. "," .. tostring(p[2] == redis.null) .. "," .. tostring(p[3].err)
end, on_response = function(req, res)
  local got = http.request { url = "http://127.0.0.1:3/audit" }
  res.headers["x-audit"] = got and tostring(got.status) or "none"
end }
]]

  local function auth_stub(seen)
    return function(request)
      seen[#seen + 1] = request
      if request.headers and request.headers.authorization == "Bearer good" then
        return { status = 200, headers = { ["x-user"] = "ann" }, body = "" }
      elseif request.headers and request.headers.authorization == "down" then
        return nil, "timeout"
      elseif request.url then
        return { status = 204, headers = {}, body = "" }
      end
      return { status = 403, headers = {}, body = "" }
    end
  end

  local function redis_stub(cmd, key)
    if cmd == "INCR" then return 3 end
    if cmd == "GET" then return key == "a" and "va" or nil end
    return nil, "ERR unknown command '" .. cmd .. "'"
  end

  it("passes the hook's request to opts.http and its answer back, and traces each call", function()
    local seen = {}
    local cfg = load(CALLS, { http = auth_stub(seen), redis = redis_stub })
    local r = cfg:request { path = "/api/x", headers = { authorization = "Bearer good" } }
    assert.equal("app", r.upstream)
    assert.equal("ann", r.headers["x-user"])
    assert.equal("3", r.headers["x-seen"])
    assert.equal("va,true,ERR unknown command 'NOPE'", r.headers["x-pipe"])
    assert.equal("POST", seen[1].method)
    assert.equal("auth", seen[1].upstream.name)
    assert.equal("/check", seen[1].path)
    local text = testing.format(r)
    assert.matches("call%s+http POST auth /check %-> 200", text)
    assert.matches("call%s+redis INCR seen:ann %-> 3", text)
    local res = cfg:response(r, { status = 200 })
    assert.equal("204", res.headers["x-audit"])
    assert.matches("call%s+http GET http://127.0.0.1:3/audit %-> 204", testing.format(res))
    cfg:close()
  end)

  it("gives the hook nil, err when the stub says so, and what a denial answers", function()
    local cfg = load(CALLS, { http = auth_stub({}), redis = redis_stub })
    local r = cfg:request { path = "/api/x", headers = { authorization = "down" } }
    assert.equal(503, r.status)
    assert.equal("auth: timeout\n", r.body)
    assert.matches("call%s+http POST auth /check %-> nil, timeout", testing.format(r))
    r = cfg:request { path = "/api/x", headers = { authorization = "Bearer bad" } }
    assert.equal(401, r.status)
    cfg:close()
  end)

  it("fails a hook clearly when nothing answers, or the stub raises", function()
    local cfg = load(CALLS)
    local r = cfg:request { path = "/api/x" }
    assert.equal(500, r.status)
    assert.matches("this simulation has no opts.http", r.error)
    cfg:close()
    cfg = load(CALLS, { http = function() error("stub broke") end })
    r = cfg:request { path = "/api/x" }
    assert.equal(500, r.status)
    assert.matches("opts.http: .*stub broke", r.error)
    cfg:close()
    assert.has_error(function() load(CALLS, { http = "nope" }) end, "testing.load: opts.http must be a function, got string")
  end)

  it("refuses a call-out from a guard, and from a balancer, at once", function()
    local cfg, err = testing.try_load(HEAD .. [[
local http = require "moonproxy.http"
local app = proxy.upstream "app" { servers = { "127.0.0.1:1" } }
proxy.route { prefix = "/", upstream = app, on_request = function(req)
  http.request { url = "http://127.0.0.1:2/x" }
end }
proxy.expect { request = { path = "/" }, upstream = "app" }
]], { text = true })
    assert.is_nil(cfg)
    assert.matches("a guard %(proxy.expect%) or %-%-explain cannot call out", err)
    cfg = load([[
local http = require "moonproxy.http"
local app = proxy.upstream "app" { servers = { "127.0.0.1:1" }, balancer = function(servers)
  http.request { url = "http://127.0.0.1:2/x" }
  return servers[1]
end }
proxy.route { prefix = "/", upstream = app }
]], { http = function() return { status = 200, headers = {}, body = "" } end })
    -- a stub answers in the simulator, but not where the server could not wait
    local r = cfg:request { path = "/" }
    assert.equal(500, r.status)
    cfg:close()
  end)

  it("refuses a call-out from the configuration script itself, at its line", function()
    local ok, err = testing.try_load(HEAD .. 'require("moonproxy.http").request { url = "http://127.0.0.1:2/" }\n',
      { text = true, http = function() return { status = 200, headers = {}, body = "" } end })
    assert.is_nil(ok)
    assert.matches("^config.lua:3: .*only hooks can call out", err)
    ok, err = testing.try_load(HEAD .. 'proxy.redis { addr = "127.0.0.1:6379" }:call("PING")\n',
      { text = true, redis = function() return "PONG" end })
    assert.is_nil(ok)
    assert.matches("only hooks can call out", err)
  end)

  it("lowercases a stub's header names and reads res.headers in any case", function()
    local cfg = load([[
local http = require "moonproxy.http"
local app = proxy.upstream "app" { servers = { "127.0.0.1:1" } }
proxy.route { prefix = "/", upstream = app, on_request = function(req)
  local res = http.request { url = "http://127.0.0.1:2/x" }
  req.headers["x-got"] = table.concat({ res.headers["Content-Type"], res.headers["content-type"],
    res.headers["X-USER"], tostring(rawget(res.headers, "X-User")), tostring(res.headers["x-none"]) }, ",")
end }
]], { http = function() return { status = 200, headers = { ["Content-Type"] = "text/plain", ["X-User"] = "ann" },
                                  body = "" } end })
    local r = cfg:request { path = "/" }
    assert.equal("text/plain,text/plain,ann,nil,nil", r.headers["x-got"])
    cfg:close()
  end)

  it("checks proxy.redis options at their line", function()
    local ok, err = testing.try_load(HEAD .. 'proxy.redis { addr = "127.0.0.1:6379", pool = 0 }\n', { text = true })
    assert.is_nil(ok)
    assert.matches("^config.lua:3: proxy.redis: pool must be an integer from 1 to 1024", err)
    ok, err = testing.try_load(HEAD .. 'proxy.redis { db = 1 }\n', { text = true })
    assert.is_nil(ok)
    assert.matches('^config.lua:3: proxy.redis: needs addr = "host:port"', err)
  end)
end)
