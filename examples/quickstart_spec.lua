-- examples/quickstart.lua, run for real: the example's own text with its two
-- addresses swapped for free loopback ports, an origin behind it, and the
-- access log telling which route answered.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local core = require "moonproxy.core"

local EXAMPLE = "examples/quickstart.lua"

describe("examples/quickstart.lua", function()
  local origin, proxy

  lazy_setup(function()
    origin = h.start_origin("demo")
    local text = assert(h.read_file(EXAMPLE))
    local n1, n2
    text, n1 = text:gsub("127%.0%.0%.1:8080", "${listen}")
    text, n2 = text:gsub("127%.0%.0%.1:9001", "${origin}")
    assert(n1 >= 1 and n2 >= 1, "the example no longer names 127.0.0.1:8080 and 127.0.0.1:9001")
    text = text:gsub('access_log = "stdout"', 'access_log = "${access_log}"')
    proxy = h.start_proxy { workers = 1, config = text, vars = { origin = origin.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function route_of(res)
    local id = res:header("x-request-id")
    local entry = h.eventually(function()
      for _, e in ipairs(proxy:access_log_entries()) do
        if e.id == id then return e end
      end
    end)
    return entry.route
  end

  it("passes moonproxy -t", function()
    local cfg, err = core.load_config(EXAMPLE)
    assert(cfg, err)
    assert.equal(4, #cfg.routes)
  end)

  it("sends /api/... to the demo upstream without the prefix, query kept", function()
    local res = assert(raw.get(proxy.port, "/api/hello?x=1"))
    assert.equal("/hello?x=1", h.echo(res).target)
    assert.equal("api", route_of(res))
  end)

  it("answers /healthz through its exact-path route for GET", function()
    local res = assert(raw.get(proxy.port, "/healthz"))
    assert.equal("/healthz", h.echo(res).target)
    assert.equal("health", route_of(res))
  end)

  it("lets other methods on /healthz fall through to the catch-all", function()
    local res = assert(raw.request(proxy.port, { method = "DELETE", target = "/healthz" }))
    assert.equal("DELETE", h.echo(res).method)
    assert.equal("default", route_of(res))
  end)

  it("matches the regex route before the catch-all prefix", function()
    local res = assert(raw.get(proxy.port, "/users/42"))
    assert.equal("/users/42", h.echo(res).target)
    assert.equal("user", route_of(res))
  end)

  it("sends everything else to the catch-all", function()
    local res = assert(raw.get(proxy.port, "/users/abc"))
    assert.equal("default", route_of(res))
  end)
end)

-- The same configuration tested offline: moonproxy.testing runs the server's
-- own router and request head builder on it, with no proxy and no backend.
describe("examples/quickstart.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local cfg = testing.load(EXAMPLE)

  it("declares its routes in this order", function()
    local names = {}
    for i, rt in ipairs(cfg:routes()) do names[i] = rt.name end
    assert.same({ "api", "health", "user", "default" }, names)
  end)

  it("sends /api/... to demo without the prefix, query kept", function()
    local r = cfg:request { method = "GET", path = "/api/hello?x=1" }
    -- testing.format(r) explains the decision when an assertion fails
    assert.equal("api", r.route, testing.format(r))
    assert.equal("demo", r.upstream)
    assert.equal("127.0.0.1:9001", r.server)
    assert.equal("GET /hello?x=1", r.method .. " " .. r.target)
  end)

  it("matches /healthz for GET only; DELETE falls through to the catch-all", function()
    assert.equal("health", cfg:request({ method = "GET", path = "/healthz" }).route)
    local r = cfg:request { method = "DELETE", path = "/healthz" }
    assert.equal("default", r.route, testing.format(r))
    assert.equal("/healthz", r.target)
  end)

  it("tries the regex route before the catch-all prefix", function()
    assert.equal("user", cfg:request({ path = "/users/42" }).route)
    assert.equal("default", cfg:request({ path = "/users/abc" }).route)
  end)

  it("tells the backend who the client is", function()
    local r = cfg:request { path = "/page", host = "www.example.com", remote_addr = "192.0.2.10" }
    assert.equal("192.0.2.10", r.headers["x-forwarded-for"], testing.format(r))
    assert.equal("www.example.com", r.headers["host"])
    assert.matches("^%x+$", r.headers["x-request-id"])
  end)
end)
