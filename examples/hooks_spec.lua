-- examples/hooks.lua, run for real: the example's own text with its
-- addresses swapped for free loopback ports and an origin behind it. The
-- maintenance switch is flipped the way the example says: by editing the
-- MAINTENANCE line and reloading (SIGHUP, then POST /reload to undo it).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local EXAMPLE = "examples/hooks.lua"
local BYPASS = "staff-7c1e"

describe("examples/hooks.lua", function()
  local origin, proxy, template

  lazy_setup(function()
    origin = h.start_origin("app")
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:8085", "${admin}" },
      { "127.0.0.1:9001", "${origin}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
    })
    template = text
    proxy = h.start_proxy { workers = 2, config = template, vars = { origin = origin.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function get(target, headers)
    return assert(raw.get(proxy.port, target, headers, { timeout = 10 }))
  end

  local function counters()
    local res = get("/_stats")
    assert.equal(200, res.status)
    local t = {}
    for k, v in res.body:gmatch("(%w+)=(%d+)") do t[k] = tonumber(v) end
    return t
  end

  -- Rewrites the MAINTENANCE line of the running configuration.
  local function set_maintenance(on)
    local text, n = template:gsub("local MAINTENANCE = false", "local MAINTENANCE = " .. tostring(on))
    assert.equal(1, n)
    proxy:rewrite_config(text)
  end

  it("passes moonproxy -t", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(3, #cfg.routes)
  end)

  it("refuses, at load, a response hook that calls req:respond (at the hook's line)", function()
    local text = assert(h.read_file(EXAMPLE))
    local bad, n = text:gsub('res%.headers%["server"%] = nil',
      'if res.status == 500 then return req:respond(502, "hidden\\n") end')
    assert.equal(1, n)
    local path = h.write_file(h.tmpname(".lua"), bad)
    local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
    assert.equal(1, rc, out)
    assert.matches(path:match("[^/]+$") .. ":" .. h.line_of(bad, "proxy.on_response(function") .. ":", out, 1, true)
    assert.matches("req:respond", out, 1, true)
  end)

  describe("request header rewrites (proxy.on_request)", function()
    it("sets X-Real-IP over the client's, removes X-Debug and the bypass token", function()
      local e = h.echo(get("/page", { { "X-Real-IP", "203.0.113.9" }, { "X-Debug", "1" },
        { "X-Maintenance-Bypass", BYPASS } }))
      assert.same({ "127.0.0.1" }, h.echo_headers(e, "x-real-ip"))
      assert.same({}, h.echo_headers(e, "x-debug"))
      assert.same({}, h.echo_headers(e, "x-maintenance-bypass"))
    end)

    it("adds Accept-Language: en only when the client sent none", function()
      assert.equal("en", h.echo_header(h.echo(get("/page")), "accept-language"))
      assert.equal("fr-CH", h.echo_header(h.echo(get("/page", { { "Accept-Language", "fr-CH" } })), "accept-language"))
    end)
  end)

  describe("response header rewrites (proxy.on_response)", function()
    it("drops Server and X-Powered-By, adds X-Content-Type-Options and X-Response-Time", function()
      local res = get("/page?resp_header=Server:Apache/2.4&resp_header=X-Powered-By:PHP/8.3&resp_header=X-Kept:yes")
      assert.equal(200, res:header("x-origin") and res.status)
      assert.is_nil(res:header("server"))
      assert.is_nil(res:header("x-powered-by"))
      assert.equal("yes", res:header("x-kept"))
      assert.equal("nosniff", res:header("x-content-type-options"))
      assert.matches("^%d+%.%dms$", res:header("x-response-time"))
    end)

    it("runs on responses the proxy makes itself (a handler's req:respond)", function()
      local res = get("/_stats")
      assert.equal("nosniff", res:header("x-content-type-options"))
      assert.matches("^%d+%.%dms$", res:header("x-response-time"))
    end)
  end)

  describe("the legacy route (rewrite with captures, req.ctx, route on_response)", function()
    it("sends /old/items/42?x=1 as /items/42?x=1 and adds the deprecation headers", function()
      local res = get("/old/items/42?x=1")
      assert.equal("/items/42?x=1", h.echo(res).target)
      assert.equal("true", res:header("deprecation"))
      assert.equal('</items/42>; rel="successor-version"', res:header("link"))
      assert.equal("nosniff", res:header("x-content-type-options")) -- the global hook ran too
    end)

    it("leaves paths the regex does not match to the catch-all", function()
      local res = get("/old/items/abc")
      assert.equal("/old/items/abc", h.echo(res).target)
      assert.is_nil(res:header("deprecation"))
    end)
  end)

  describe("proxy.on_log", function()
    it("counts statuses, legacy hits and slow requests in the shared dictionary", function()
      local before = counters()
      for i = 1, 3 do assert.equal(200, get("/ok?i=" .. i).status) end
      assert.equal(200, get("/old/items/7").status)
      assert.equal(404, get("/status/404").status)
      assert.equal(500, get("/status/500").status)
      assert.equal(200, get("/slow?ms=600").status)
      -- on_log runs after the response was sent: wait for the last ones
      local after = h.eventually(function()
        local c = counters()
        return c.slow > before.slow and c["5xx"] > before["5xx"] and c["4xx"] > before["4xx"]
          and c.legacy > before.legacy and c
      end)
      assert.equal(before["4xx"] + 1, after["4xx"])
      assert.equal(before["5xx"] + 1, after["5xx"])
      assert.equal(before.legacy + 1, after.legacy)
      -- 5 + the first /_stats itself (logged after it answered) + any polls
      assert(after["2xx"] >= before["2xx"] + 6, after["2xx"] .. " vs " .. before["2xx"])
      -- only the /slow request, unless this machine is very slow
      assert(after.slow - before.slow <= 9, "slow " .. after.slow .. " vs " .. before.slow)
    end)

    it("counts from every worker into the same counters", function()
      local before = counters()
      for i = 1, 30 do get("/status/404?i=" .. i) end -- 30 connections, both workers
      h.eventually(function() return counters()["4xx"] == before["4xx"] + 30 end)
    end)
  end)

  describe("the maintenance switch (edit MAINTENANCE, reload)", function()
    local before_reload

    local kept -- a keep-alive connection opened before the reload

    lazy_setup(function()
      kept = assert(raw.connect(proxy.port, { timeout = 10 }))
      assert.equal(200, assert(kept:request { target = "/before" }).status)
      before_reload = counters()
      set_maintenance(true)
      proxy:kill("HUP")
      -- both workers switch: a dozen new connections (spread over them by
      -- SO_REUSEPORT) in a row must all see the new configuration
      h.eventually(function()
        for _ = 1, 12 do
          if get("/page").status ~= 503 then return false end
        end
        return true
      end)
    end)

    lazy_teardown(function()
      kept:close()
    end)

    it("drops no connection: one opened before the reload gets the new configuration", function()
      local res = assert(kept:request { target = "/after" })
      assert.equal(503, res.status)
    end)

    it("answers 503 with Retry-After from on_request, contacting no upstream", function()
      local n = origin:stats().requests
      for _, target in ipairs { "/", "/page?x=1", "/old/items/42", "/status/200" } do
        local res = get(target)
        assert.equal(503, res.status, target)
        assert.equal("Down for maintenance, back soon.\n", res.body)
        assert.equal("300", res:header("retry-after"))
        assert.equal("nosniff", res:header("x-content-type-options")) -- response hooks still run
        assert.matches("^%d+%.%dms$", res:header("x-response-time"))
      end
      assert.equal(n, origin:stats().requests)
    end)

    it("lets staff with the bypass token through, without forwarding the token", function()
      local e = h.echo(get("/page", { { "X-Maintenance-Bypass", BYPASS } }))
      assert.same({}, h.echo_headers(e, "x-maintenance-bypass"))
      assert.equal(503, get("/page", { { "X-Maintenance-Bypass", "guess" } }).status)
    end)

    it("keeps /healthz and /_stats open", function()
      assert.equal("/healthz", h.echo(get("/healthz")).target)
      assert.equal(200, get("/_stats").status)
    end)

    it("kept the counters across the reload, and counts the 503s", function()
      local c = h.eventually(function()
        local c = counters()
        return c["5xx"] >= before_reload["5xx"] + 6 and c
      end)
      assert(c["2xx"] >= before_reload["2xx"])
      assert.equal(before_reload["4xx"], c["4xx"])
    end)

    it("is switched off the same way (POST /reload)", function()
      set_maintenance(false)
      local res, doc = proxy:admin("POST", "/reload")
      assert(res, doc)
      assert.equal(200, res.status, res.body)
      assert.equal("app", get("/page"):header("x-origin"))
      assert.equal(200, get("/page").status)
    end)
  end)
end)

-- The same configuration tested offline: moonproxy.testing runs the hooks,
-- the route's rewrite and the response hooks, with no proxy and no backend.
describe("examples/hooks.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local cfg = testing.load(EXAMPLE)

  it("rewrites the request headers the backend receives", function()
    local r = cfg:request { path = "/page", remote_addr = "192.0.2.7",
      headers = { ["x-real-ip"] = "203.0.113.9", ["x-debug"] = "1", ["x-maintenance-bypass"] = BYPASS } }
    assert.equal("192.0.2.7", r.headers["x-real-ip"], testing.format(r))
    assert.is_nil(r.headers["x-debug"])
    assert.is_nil(r.headers["x-maintenance-bypass"])
    assert.equal("en", r.headers["accept-language"])
  end)

  it("sends /old/items/42 as /items/42 and adds the deprecation headers to the response", function()
    local r = cfg:request { path = "/old/items/42?x=1" }
    assert.equal("legacy", r.route, testing.format(r))
    assert.equal("/items/42?x=1", r.target)
    local resp = cfg:response(r, { status = 200, headers = { server = "Apache/2.4", ["content-type"] = "text/plain" },
      body = "item 42\n" })
    assert.equal("true", resp.headers["deprecation"], testing.format(resp))
    assert.equal('</items/42>; rel="successor-version"', resp.headers["link"])
    assert.is_nil(resp.headers["server"])
    assert.equal("nosniff", resp.headers["x-content-type-options"])
  end)

  it("answers 503 in maintenance, except for staff (a variant loaded as text)", function()
    local text = assert(h.read_file(EXAMPLE)):gsub("local MAINTENANCE = false", "local MAINTENANCE = true")
    local down = testing.load(text, { text = true, name = "hooks-maintenance.lua" })
    local r = down:request { path = "/page" }
    assert.equal(503, r.status, testing.format(r))
    assert.equal("300", r.headers["retry-after"])
    assert.is_nil(r.upstream)
    r = down:request { path = "/page", headers = { ["x-maintenance-bypass"] = BYPASS } }
    assert.equal("app", r.upstream, testing.format(r))
    assert.equal("/healthz", down:request({ path = "/healthz" }).target)
  end)
end)
