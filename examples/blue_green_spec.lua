-- examples/blue_green.lua, run for real with two workers: the example's own
-- text with its addresses swapped for free loopback ports, a "blue" and a
-- "green" origin behind it.
--
-- To see that BOTH workers follow a switch, the spec appends three lines to
-- the example: each worker VM takes a number from a shared counter when it
-- loads the script and stamps it on its responses (X-Spec-VM). Requests on
-- fresh connections spread over the workers (SO_REUSEPORT), so a sample of
-- 40 shows at least two VMs, and after a reload, only new ones.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local mime = require "mime"

local EXAMPLE = "examples/blue_green.lua"

local OBSERVER = [[

-- (added by blue_green_spec.lua) which worker VM, of which load, answered
local __spec_vm = proxy.shared("spec_vm", "16k"):incr("n", 1, 0)
proxy.on_response(function(req, res) res.headers["x-spec-vm"] = tostring(__spec_vm) end)
]]

local function basic(user, pass)
  return "Basic " .. (mime.b64(user .. ":" .. pass))
end

describe("examples/blue_green.lua", function()
  local blue, green, proxy

  lazy_setup(function()
    blue, green = h.start_origin("blue"), h.start_origin("green")
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:8085", "${admin}" },
      { "127.0.0.1:9001", "${blue}" },
      { "127.0.0.1:9002", "${green}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
    })
    proxy = h.start_proxy { workers = 2, config = text .. OBSERVER, vars = { blue = blue.addr, green = green.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, blue, green)
  end)

  local function request(method, target, headers)
    return assert(raw.request(proxy.port, { method = method, target = target, headers = headers,
      body = method == "POST" and "" or nil }, { timeout = 10 }))
  end

  local function switch(to, auth)
    local headers = { { "Authorization", auth or basic("ops", "change-me") } }
    return request("POST", "/_switch" .. (to and ("?to=" .. to) or ""), headers)
  end

  -- n GETs, each on a new connection: the origins that answered and the VMs
  -- that served them ({ [name] = count }).
  local function sample(n)
    local origins, vms = {}, {}
    for i = 1, n or 40 do
      local res = request("GET", "/page?i=" .. i)
      assert.equal(200, res.status)
      local o, vm = res:header("x-origin"), tonumber(res:header("x-spec-vm"))
      origins[o] = (origins[o] or 0) + 1
      vms[vm] = (vms[vm] or 0) + 1
    end
    return origins, vms
  end

  local function count(t)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    return n
  end

  local function live()
    local res = request("GET", "/_live")
    assert.equal(200, res.status)
    return (res.body:gsub("\n$", ""))
  end

  local first_vms -- the VMs of the first generation

  it("passes moonproxy -t", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(3, #cfg.routes)
  end)

  it("starts with blue live in every worker", function()
    local origins, vms = sample(40)
    assert.same({ blue = 40 }, origins)
    assert(count(vms) >= 2, "40 connections reached a single worker VM")
    first_vms = vms
    assert.equal("blue", live())
  end)

  it("lets GET /_switch through to the application, like any page", function()
    local res = request("GET", "/_switch?to=green")
    assert.equal("blue", res:header("x-origin"))
    assert.equal("/_switch?to=green", h.echo(res).target)
  end)

  it("refuses a switch without the right credentials (401, Basic challenge)", function()
    local res = request("POST", "/_switch?to=green")
    assert.equal(401, res.status)
    assert.equal('Basic realm="deploy"', res:header("www-authenticate"))
    assert.equal(401, switch("green", basic("ops", "wrong")).status)
    assert.equal(401, switch("green", basic("eve", "change-me")).status)
    assert.equal("blue", live())
  end)

  it("refuses an unknown color with 400 and changes nothing", function()
    for _, to in ipairs { "purple", "", false } do
      local res = switch(to or nil)
      assert.equal(400, res.status)
      assert.matches("usage", res.body)
    end
    assert.equal("blue", live())
  end)

  it("switches every worker to green at once, keep-alive connections and in-flight requests included", function()
    -- keep-alive connections opened (and used) before the switch
    local conns = {}
    finally(function() for _, c in ipairs(conns) do c:close() end end)
    for i = 1, 6 do
      conns[i] = assert(raw.connect(proxy.port, { timeout = 10 }))
      assert.equal("blue", assert(conns[i]:request { target = "/before" }):header("x-origin"))
    end
    -- a request in flight on blue during the switch
    local slow = assert(raw.connect(proxy.port, { timeout = 10 }))
    finally(function() slow:close() end)
    assert(slow:send(raw.build { target = "/slow?ms=1000" }))
    h.eventually(function() return blue:path_count("/slow") == 1 end)

    local res = switch("green")
    assert.equal(200, res.status)
    assert.equal("live: green (was blue, switched by ops)\n", res.body)

    for i = 1, 6 do
      assert.equal("green", assert(conns[i]:request { target = "/after" }):header("x-origin"), "connection " .. i)
    end
    local origins, vms = sample(40)
    assert.same({ green = 40 }, origins)
    assert(count(vms) >= 2, "40 connections reached a single worker VM")
    assert.equal("green", live())

    local done = assert(slow:read_response())
    assert.equal("blue", done:header("x-origin"))
  end)

  it("keeps green live across a reload (POST /reload on the admin port)", function()
    local res, doc = proxy:admin("POST", "/reload")
    assert(res, doc)
    assert.equal(200, res.status, res.body)
    assert.equal(2, doc.generation)

    local origins, vms = sample(40)
    assert.same({ green = 40 }, origins)
    assert(count(vms) >= 2, "40 connections reached a single worker VM")
    local oldest = 0
    for vm in pairs(first_vms) do oldest = math.max(oldest, vm) end
    for vm in pairs(vms) do
      assert(vm > oldest, "VM " .. vm .. " of the first load still answers after the reload")
    end
    assert.equal("green", live())
  end)

  it("refuses a reload that changes the dictionary's size, and green stays live", function()
    local original = assert(h.read_file(proxy.conf_path))
    finally(function() h.write_file(proxy.conf_path, original) end)
    local changed, n = original:gsub('proxy%.shared%("deploy", "64k"%)', 'proxy.shared("deploy", "128k")')
    assert.equal(1, n)
    h.write_file(proxy.conf_path, changed)
    local res, doc = proxy:admin("POST", "/reload")
    assert(res, doc)
    assert.equal(422, res.status, res.body)
    local line = h.line_of(changed, 'proxy.shared("deploy"')
    assert.matches(proxy.conf_path:match("[^/]+$") .. ":" .. line .. ":", doc.error, 1, true)
    assert.equal("green", live())
    assert.same({ green = 10 }, (sample(10)))
  end)

  it("switches back after the reload", function()
    local res = switch("blue")
    assert.equal(200, res.status)
    assert.equal("live: blue (was green, switched by ops)\n", res.body)
    local origins = sample(20)
    assert.same({ blue = 20 }, origins)
  end)
end)

-- The same configuration tested offline: moonproxy.testing runs the handlers
-- and basic_auth, with no proxy and no servers. The live color is in the
-- shared dictionary "deploy": from busted, core.shared with the name and size
-- the configuration declares returns the same dictionary, so a spec can flip
-- it directly (and must put it back: it lives as long as the process).
describe("examples/blue_green.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local deploy = require("moonproxy.core").shared("deploy", "64k")
  local cfg = testing.load(EXAMPLE)

  before_each(function() deploy:delete("live") end)
  after_each(function() deploy:delete("live") end)

  it("serves blue until the first switch", function()
    local r = cfg:request { path = "/" }
    assert.equal("blue", r.upstream, testing.format(r))
    assert.equal("127.0.0.1:9001", r.server)
  end)

  it("serves whatever color the dictionary holds", function()
    deploy:set("live", "green")
    local r = cfg:request { path = "/page" }
    assert.equal("green", r.upstream, testing.format(r))
    assert.equal("green\n", cfg:request({ path = "/_live" }).body)
  end)

  it("refuses the switch without the right password: 401 with WWW-Authenticate", function()
    local r = cfg:request { method = "POST", path = "/_switch?to=green",
      headers = { authorization = basic("ops", "wrong") } }
    assert.equal(401, r.status, testing.format(r))
    assert.equal('Basic realm="deploy"', r.headers["www-authenticate"])
    assert.is_nil(deploy:get("live"))
  end)

  it("switches with the right password, for the very next request", function()
    local r = cfg:request { method = "POST", path = "/_switch?to=green",
      headers = { authorization = basic("ops", "change-me") } }
    assert.equal(200, r.status, testing.format(r))
    assert.equal("live: green (was blue, switched by ops)\n", r.body)
    assert.equal("green", cfg:request({ path = "/" }).upstream)
  end)

  it("lets GET /_switch fall through to the live color", function()
    assert.equal("app", cfg:request({ path = "/_switch?to=green" }).route)
  end)
end)
