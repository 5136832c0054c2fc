-- proxy.expect guards in the running server: a configuration whose guard
-- fails never goes live, at start or at a reload (SIGHUP or POST /reload),
-- and the refusal says what was expected and what the configuration does.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local api = proxy.upstream "api" { servers = { "${origin}" } }
proxy.route { name = "v1", prefix = "/v1/", strip_prefix = ${strip}, upstream = api }
proxy.expect { request = { host = "api.example.com", path = "/v1/users" }, upstream = "api", target = "/users" }
]]

describe("proxy.expect in the server", function()
  local origin, proxy

  lazy_setup(function()
    origin = h.start_origin("api")
    proxy = h.start_proxy { config = CONFIG, vars = { origin = origin.addr, strip = "true" } }
    proxy:wait_ready()
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function target_seen()
    local e = h.echo(raw.get(proxy.port, "/v1/users", { Host = "api.example.com" }, { timeout = 10 }))
    return e.target
  end

  it("serves a configuration whose guards hold", function()
    assert.equal("/users", target_seen())
  end)

  it("refuses a reload that breaks a guard, and keeps serving the old configuration", function()
    proxy:rewrite_config(CONFIG, { strip = "false" })
    local res = proxy:admin("POST", "/reload")
    assert.equal(422, res.status)
    assert.truthy(res.body:find("proxy.expect failed for GET api.example.com/v1/users: target: expected '/users', " ..
      "got '/v1/users'", 1, true), res.body)
    assert.equal("/users", target_seen())
    h.eventually(function() return #h.lines_with(proxy:stderr(), "reload refused", "proxy.expect failed") >= 1 end, 5)
  end)

  it("refuses it on SIGHUP too", function()
    local before = #h.lines_with(proxy:stderr(), "reload refused", "proxy.expect failed")
    proxy:kill("HUP")
    h.eventually(function()
      return #h.lines_with(proxy:stderr(), "reload refused", "proxy.expect failed") == before + 1
    end, 5)
    assert.equal("/users", target_seen())
  end)

  it("accepts the reload once the configuration keeps its promise again", function()
    proxy:rewrite_config(CONFIG, { strip = "true" })
    local res = proxy:admin("POST", "/reload")
    assert.equal(200, res.status)
    assert.equal("/users", target_seen())
  end)

  it("does not start on a configuration that breaks a guard", function()
    local p = h.start_proxy { config = CONFIG, vars = { origin = origin.addr, strip = "false" }, wait = false }
    local code = p:wait(10)
    assert.equal(1, code)
    assert.truthy(p:stderr():find("proxy.expect failed", 1, true), p:stderr())
  end)
end)
