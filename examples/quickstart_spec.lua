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
