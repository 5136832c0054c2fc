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
