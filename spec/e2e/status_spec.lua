-- End-to-end: the admin port's status page (SPEC "Operations"): GET / is
-- one self-contained HTML page, GET /status its JSON, which follows the
-- proxy's state: servers up or down, routes' counts, rates, quantiles and
-- per-second history, reloads, listeners and connections. The page drawn
-- by a browser: spec/browser/status_page_browser.lua (make test-browser).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local api = proxy.upstream "api" { servers = { "${origin}", { addr = "127.0.0.1:${dead}", weight = 2 } },
  passive = { failures = 1, cooldown = 60 } }
proxy.route { name = "api", prefix = "/api/", upstream = api }
proxy.route { name = "broken", prefix = "/broken", handler = function(req) return req:respond(503, "no\n") end }
]=]

describe("status page", function()
  local origin, proxy

  lazy_setup(function()
    origin = h.start_origin("o")
    proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { origin = origin.addr, dead = h.free_port() } }
    proxy:wait_ready() -- the admin port, not only the listener
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function status()
    local res = assert(proxy:admin("GET", "/status"))
    assert.equal(200, res.status)
    return cjson.decode(res.body)
  end

  it("serves one HTML page that needs nothing from elsewhere", function()
    local res = assert(proxy:admin("GET", "/"))
    assert.equal(200, res.status)
    assert.equal("text/html; charset=utf-8", res:header("content-type"))
    assert.matches("<title>moonproxy status</title>", res.body, 1, true)
    assert.matches('name="viewport"', res.body, 1, true) -- readable on a phone
    assert.matches("fetch%('status'", res.body)
    assert.matches("setInterval%(refresh,2000%)", res.body)
    local body = res.body:gsub("http://www%.w3%.org/2000/svg", "") -- a namespace name, not a fetch
    assert.is_nil(body:find("https?://", 1)) -- no external asset
    assert.is_nil(res.body:find("<script src", 1, true))
    assert.is_nil(res.body:find("<link", 1, true))
  end)

  it("reports upstreams, servers, routes, rates and quantiles as they are", function()
    for i = 1, 30 do assert.equal(200, assert(raw.get(proxy.port, "/api/x" .. i)).status) end
    for i = 1, 5 do assert.equal(503, assert(raw.get(proxy.port, "/broken/" .. i)).status) end
    local st
    assert.truthy(h.eventually(function()
      st = status()
      local n = 0
      for _, r in ipairs(st.routes) do n = n + (r.name == "api" and r.requests or 0) end
      return n == 30
    end, 5))
    assert.equal(2, st.workers)
    assert.equal(1, st.generation)
    assert.equal("127.0.0.1:" .. proxy.port, st.listeners[1].addr)
    local api = st.upstreams[1]
    assert.equal("api", api.name)
    local by = {}
    for _, s in ipairs(api.servers) do by[s.addr] = s end
    assert.is_true(by[origin.addr].up)
    assert.is_false(by["127.0.0.1:" .. proxy.vars.dead].up) -- refused: its circuit opened
    assert.equal("open", by["127.0.0.1:" .. proxy.vars.dead].circuit)
    assert.equal(2, by["127.0.0.1:" .. proxy.vars.dead].weight)
    assert.truthy(by[origin.addr].requests >= 30)
    local routes = {}
    for _, r in ipairs(st.routes) do routes[r.name] = r end
    assert.same({ 30, 0 }, { routes.api.requests, routes.api.errors })
    assert.same({ 5, 5 }, { routes.broken.requests, routes.broken.errors })
    assert.truthy(routes.api.p50_ms > 0 and routes.api.p50_ms <= routes.api.p99_ms)
    assert.equal(120, #routes.api.history.requests)
    assert.equal(st.history_seconds, #routes.api.history.errors)
    -- the history: a second holds what happened in it (the first sample is the baseline)
    assert.truthy(h.eventually(function()
      local sum, errs, rate = 0, 0, 0
      for _, r in ipairs(status().routes) do
        if r.name == "api" then for _, v in ipairs(r.history.requests) do sum = sum + v end end
        if r.name == "broken" then
          for _, v in ipairs(r.history.errors) do errs = errs + v end
          rate = r.error_rate -- over the last 10 s, from the same samples
        end
      end
      return sum == 30 and errs == 5 and rate == 1
    end, 5))
  end)

  it("shows a server an operator drained", function()
    local function control(body)
      return assert(raw.request(proxy.admin_port, { method = "POST", target = "/upstreams/api/servers/" .. origin.addr,
        headers = { { "Host", "localhost:" .. proxy.admin_port } }, body = body }, { timeout = 5 }))
    end
    local res = control('{"drain": true}')
    finally(function() control('{"reset": true}') end)
    assert.equal(200, res.status)
    local s
    for _, x in ipairs(status().upstreams[1].servers) do if x.addr == origin.addr then s = x end end
    assert.same({ "draining", false }, { s.state, s.up })
  end)

  it("lists reloads with their result", function()
    local res = assert(proxy:admin("POST", "/reload"))
    assert.equal(200, res.status)
    local st = status()
    assert.equal(2, st.generation)
    assert.same({ 1, 0 }, { st.reloads.ok, st.reloads.refused })
    assert.same({ 2, "ok" }, { st.reloads.last[1].generation, st.reloads.last[1].result })
    assert.truthy(math.abs(st.reloads.last[1].at - st.time) < 30)
  end)

  it("needs the admin token like every other endpoint but /live and /ready", function()
    local p = h.start_proxy { workers = 1, admin_token = "s3cret", config = [[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}", token = "s3cret" }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "ok\n") end }
]] }
    finally(function() h.shutdown(p) end)
    p:wait_ready()
    assert.equal(200, assert(p:admin("GET", "/status")).status)
    assert.equal(200, assert(p:admin("GET", "/")).status)
    for _, path in ipairs { "/", "/status" } do
      local res = assert(raw.get(p.admin_port, path, { { "Host", "localhost:" .. p.admin_port } }))
      assert.equal(401, res.status, path)
    end
  end)

end)
