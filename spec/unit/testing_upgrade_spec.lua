-- moonproxy.testing: the upgrade decision (SPEC "WebSocket and other
-- upgrades") as the server's req.c takes it: cfg:request reports
-- upgrade = "websocket" for a handshake forwarded as one, or upgrade = false
-- and upgrade_refused = why; the trace has an "upgrade" step.
local testing = require "moonproxy.testing"

local TEXT = [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18080" }
local u = proxy.upstream "u" { servers = { "127.0.0.1:9001" }, timeouts = { tunnel = 30 } }
proxy.route { name = "closed", prefix = "/closed/", upgrade = false, upstream = u }
proxy.route { name = "pick", prefix = "/pick/", handler = function(req) return u end }
proxy.route { name = "all", prefix = "/", upstream = u }
]]

local WS = { connection = "Upgrade", upgrade = "websocket", ["sec-websocket-key"] = "dGhlIHNhbXBsZSBub25jZQ==" }

local function with(extra)
  local t = {}
  for k, v in pairs(WS) do t[k] = v end
  for k, v in pairs(extra) do t[k] = v end
  return t
end

local function step(r, kind)
  for _, s in ipairs(r.trace) do if s.step == kind then return s.text end end
end

describe("moonproxy.testing upgrade decision", function()
  local cfg
  lazy_setup(function() cfg = testing.load(TEXT, { text = true }) end)
  lazy_teardown(function() cfg:close() end)

  it("forwards a WebSocket handshake as one, with Upgrade and Connection", function()
    for _, path in ipairs { "/chat", "/pick/chat" } do
      local r = cfg:request { path = path, headers = WS }
      assert.equal("websocket", r.upgrade, path)
      assert.is_nil(r.upgrade_refused)
      assert.equal("websocket", r.headers.upgrade)
      assert.equal("upgrade", r.headers.connection)
      assert.matches("a 101 naming websocket opens a tunnel", step(r, "upgrade"))
    end
  end)

  it("says why an Upgrade is not forwarded", function()
    local cases = {
      { { path = "/closed/x", headers = WS }, "upgrade = false" },
      { { path = "/x", headers = { connection = "Upgrade", upgrade = "h2c" } }, "no websocket" },
      { { path = "/x", headers = { upgrade = "websocket" } }, "no websocket" },
      { { method = "POST", path = "/x", headers = with { ["content-length"] = "0" } }, "must be a GET" },
    }
    for _, c in ipairs(cases) do
      local r = cfg:request(c[1])
      assert.is_false(r.upgrade, c[2])
      assert.matches(c[2], r.upgrade_refused, 1, true)
      assert.is_nil(r.headers.upgrade, c[2])
      assert.matches(c[2], step(r, "upgrade"), 1, true)
    end
  end)

  it("answers a body on a handshake 400, saying why", function()
    local r = cfg:request { path = "/x", headers = WS, body = "abc" }
    assert.equal(400, r.status)
    assert.is_false(r.upgrade)
    assert.equal("a body on a WebSocket upgrade: 400", r.upgrade_refused)
  end)

  it("reports nothing about upgrades for a request without Upgrade", function()
    local r = cfg:request { path = "/x" }
    assert.is_nil(r.upgrade)
    assert.is_nil(step(r, "upgrade"))
  end)

  it("checks timeouts.tunnel like the other timeouts", function()
    local bad, err = testing.try_load(TEXT:gsub("tunnel = 30", "tunnel = -1"), { text = true })
    assert.is_nil(bad)
    assert.matches("tunnel", err)
    local bad2, err2 = testing.try_load(TEXT:gsub("upgrade = false", 'upgrade = "no"'), { text = true })
    assert.is_nil(bad2)
    assert.matches("upgrade", err2)
  end)
end)

describe("moonproxy.testing upgrade answers and reasons", function()
  local cfg
  lazy_setup(function()
    cfg = testing.load(TEXT .. 'proxy.route { name = "files", prefix = "/files/", static = { root = "." } }\n'
      .. 'proxy.route { name = "auth", prefix = "/auth/", upstream = u,'
      .. ' on_request = function(req) return req:respond(401, "no\\n") end }\n', { text = true })
  end)
  lazy_teardown(function() cfg:close() end)

  -- The head's lines that name a field.
  local function lines_of(head, name)
    local out = {}
    for line in head:gmatch("([^\r\n]+)\r\n") do
      if line:lower():sub(1, #name + 1) == name .. ":" then out[#out + 1] = line end
    end
    return out
  end

  it("opens a tunnel on a 101 naming websocket, as the server does", function()
    local r = cfg:request { path = "/chat", headers = WS }
    local res = cfg:response(r, { status = 101, headers = { Connection = "Upgrade", Upgrade = "WebSocket",
      ["Sec-WebSocket-Accept"] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" } })
    assert.same({ 101, true }, { res.status, res.tunnel })
    assert.same({ "Upgrade: websocket" }, lines_of(res.head, "upgrade"))
    assert.same({ "Connection: upgrade" }, lines_of(res.head, "connection"))
    assert.same({ "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" }, lines_of(res.head, "sec-websocket-accept"))
    assert.matches("becomes a tunnel", step(res, "upgrade"))
  end)

  it("relays another answer to a handshake and closes the connection", function()
    local r = cfg:request { path = "/chat", headers = WS }
    local res = cfg:response(r, { status = 403, body = "no\n" })
    assert.same({ 403, "close" }, { res.status, res.headers.connection })
    assert.is_nil(res.tunnel)
    assert.matches("answered 403, not 101", step(res, "upgrade"))
  end)

  it("answers 502 for a 101 the server would refuse", function()
    local r = cfg:request { path = "/chat", headers = WS }
    assert.equal(502, cfg:response(r, { status = 101, headers = { Connection = "Upgrade", Upgrade = "h2c" } }).status)
    r = cfg:request { path = "/closed/x", headers = WS } -- forwarded without Upgrade
    assert.equal(502, cfg:response(r, { status = 101, headers = { Connection = "Upgrade", Upgrade = "websocket" } })
      .status)
    r = cfg:request { path = "/plain" }
    assert.equal(502, cfg:response(r, { status = 101, headers = { Connection = "Upgrade", Upgrade = "websocket" } })
      .status)
  end)

  it("says why when the gate never saw the request", function()
    local r = cfg:request { path = "/files/none", headers = WS }
    assert.same({ false, "a static route: Upgrade not forwarded" }, { r.upgrade, r.upgrade_refused })
    r = cfg:request { path = "/auth/x", headers = WS }
    assert.same({ 401, false, "answered here: Upgrade not forwarded" }, { r.status, r.upgrade, r.upgrade_refused })
    local only = testing.load('local proxy = require "moonproxy"\nproxy.listen { addr = "127.0.0.1:18080" }\n'
      .. 'proxy.route { path = "/only", upstream = proxy.upstream "u" { servers = { "127.0.0.1:1" } } }\n',
      { text = true })
    r = only:request { path = "/elsewhere", headers = WS }
    assert.same({ 404, false, "not routed: Upgrade not forwarded" }, { r.status, r.upgrade, r.upgrade_refused })
    only:close()
  end)

  it("puts timeouts.tunnel and each route's upgrade in the summary", function()
    local s = cfg:summary()
    assert.equal(30, s.upstreams.u.timeouts.tunnel)
    local by = {}
    for _, rt in ipairs(cfg:routes()) do by[rt.name] = rt.upgrade end
    assert.same({ closed = false, pick = true, all = true, files = false, auth = true }, by)
    local other = testing.load('local proxy = require "moonproxy"\nproxy.listen { addr = "127.0.0.1:18080" }\n'
      .. 'proxy.upstream "d" { servers = { "127.0.0.1:1" } }\n', { text = true })
    assert.equal(3600, other:summary().upstreams.d.timeouts.tunnel)
    other:close()
  end)

  it("refuses upgrade on a static route, with file:line", function()
    local bad, err = testing.try_load('local proxy = require "moonproxy"\nproxy.listen { addr = "127.0.0.1:18080" }\n'
      .. 'proxy.route { prefix = "/", static = { root = "." }, upgrade = false }\n', { text = true, name = "bad.lua" })
    assert.is_nil(bad)
    assert.matches("^bad.lua:3: route: upgrade applies to routes to an upstream", err)
  end)
end)
