-- examples/sticky_tenant.lua, run for real with two workers: the example's
-- own text with its addresses swapped for free loopback ports, origins a, b
-- and c behind it, and the cooldown cut from 10 s to 1 s so that recovery
-- fits in the spec. Failures are injected with the origins' /_mode control.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local EXAMPLE = "examples/sticky_tenant.lua"

-- The example's hash, to predict each tenant's home server.
local function hash(s)
  local v = 0
  for i = 1, #s do v = (v * 31 + s:byte(i)) % 4294967296 end
  return v
end

describe("examples/sticky_tenant.lua", function()
  local origins, proxy
  local NAMES = { "a", "b", "c" }
  local homed = {} -- origin name -> list of tenants whose home it is

  lazy_setup(function()
    origins = {}
    for i, n in ipairs(NAMES) do origins[i] = h.start_origin(n) end
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:8085", "${admin}" },
      { "127.0.0.1:9001", "${a}" },
      { "127.0.0.1:9002", "${b}" },
      { "127.0.0.1:9003", "${c}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
      { "cooldown = 10,", "cooldown = 1," },
    })
    proxy = h.start_proxy { workers = 2, config = text,
      vars = { a = origins[1].addr, b = origins[2].addr, c = origins[3].addr } }
    for i = 1, 60 do
      local t = "tenant-" .. i
      local home = NAMES[hash(t) % 3 + 1]
      homed[home] = homed[home] or {}
      table.insert(homed[home], t)
    end
    for _, name in ipairs(NAMES) do assert(homed[name] and #homed[name] >= 3, "few tenants on " .. name) end
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origins[1], origins[2], origins[3])
  end)

  local function origin(name)
    for i, n in ipairs(NAMES) do if n == name then return origins[i] end end
  end

  -- GET on a new connection (tenant nil: no X-Tenant header).
  local function get(tenant, target)
    local headers = tenant and { { "X-Tenant", tenant } } or nil
    return assert(raw.get(proxy.port, target or "/", headers, { timeout = 10 }))
  end

  -- The origin serving n requests of a tenant, which must all agree.
  local function served_by(tenant, n)
    local name
    for i = 1, n or 4 do
      local res = get(tenant, "/t?i=" .. i)
      assert.equal(200, res.status, tenant)
      local o = res:header("x-origin")
      assert(name == nil or name == o, tenant .. " moved from " .. tostring(name) .. " to " .. o)
      name = o
    end
    return name
  end

  it("passes moonproxy -t", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(1, #cfg.routes)
  end)

  it("sticks each tenant to its home server (hash over all servers, by index)", function()
    for _, name in ipairs(NAMES) do
      for _, t in ipairs(homed[name]) do
        assert.equal(name, served_by(t, 3), t)
      end
    end
  end)

  it("sends requests without a tenant to the least busy server, ties in turn", function()
    -- hold one request in flight on a (a tenant of a asks for /slow)
    local slow = assert(raw.connect(proxy.port, { timeout = 10 }))
    finally(function() slow:close() end)
    assert(slow:send(raw.build { target = "/slow?ms=3000", headers = { { "X-Tenant", homed.a[1] } } }))
    h.eventually(function() return origin("a"):path_count("/slow") == 1 end)

    local counts = {}
    for i = 1, 12 do
      local o = get(nil, "/free?i=" .. i):header("x-origin")
      counts[o] = (counts[o] or 0) + 1
    end
    assert.is_nil(counts.a, h.show_counts(counts))
    assert(counts.b and counts.c, "ties did not go round: " .. h.show_counts(counts))

    -- a repeated X-Tenant header is no tenant either
    local res = assert(raw.get(proxy.port, "/twice", { { "X-Tenant", homed.a[1] }, { "X-Tenant", homed.a[2] } }))
    assert.are_not.equal("a", res:header("x-origin"))

    local done = assert(slow:read_response())
    assert.equal("a", done:header("x-origin"))
  end)

  describe("when a tenant's home server fails (b answers 503)", function()
    local b_tenant

    lazy_setup(function()
      b_tenant = homed.b[1]
      assert.equal("b", served_by(b_tenant, 1))
      origin("b"):mode("503")
    end)

    it("passes the failing answers on until 3 in a row open b's circuit, then falls back", function()
      local statuses, fallback = {}, nil
      for i = 1, 10 do
        local res = get(b_tenant, "/fail?i=" .. i)
        statuses[i] = res.status
        if res.status == 200 then
          fallback = res:header("x-origin")
          break
        end
        assert.equal("b", res:header("x-origin"))
      end
      assert.same({ 503, 503, 503, 200 }, statuses)
      assert(fallback == "a" or fallback == "c", tostring(fallback))
    end)

    it("shows b out of service on the admin port", function()
      local s = proxy:server_state("app", origin("b").addr)
      assert.is_false(s.healthy)
      assert.equal("open", s.circuit)
    end)

    it("serves every tenant of b elsewhere meanwhile, without errors, and leaves the others home", function()
      local before = origin("b"):stats().requests
      for _, t in ipairs(homed.b) do
        local res = get(t, "/meanwhile")
        assert.equal(200, res.status, t)
        assert.are_not.equal("b", res:header("x-origin"))
      end
      for _, name in ipairs { "a", "c" } do
        for _, t in ipairs(homed[name]) do assert.equal(name, served_by(t, 1), t) end
      end
      for i = 1, 6 do assert.are_not.equal("b", get(nil, "/free?i=" .. i):header("x-origin")) end
      assert.equal(before, origin("b"):stats().requests)
    end)

    it("takes b back after its cooldown once it answers again, and its tenants return", function()
      origin("b"):mode("ok")
      h.eventually(function() return get(b_tenant, "/back"):header("x-origin") == "b" end, 5, 0.1)
      assert.equal("b", served_by(b_tenant, 3))
      for _, t in ipairs(homed.b) do assert.equal("b", served_by(t, 1), t) end
      local s = proxy:server_state("app", origin("b").addr)
      assert.is_true(s.healthy)
      assert.equal("closed", s.circuit)
    end)
  end)

  describe("when a server goes away (c stops)", function()
    lazy_setup(function()
      origin("c"):stop()
    end)

    it("retries its tenants on another server at once: no error at all", function()
      for _, t in ipairs(homed.c) do
        local res = get(t, "/gone")
        assert.equal(200, res.status, t)
        assert(res:header("x-origin") == "a" or res:header("x-origin") == "b")
      end
      local s = h.eventually(function()
        local st = proxy:server_state("app", origin("c").addr)
        return st and st.healthy == false and st
      end)
      assert.equal("open", s.circuit)
    end)
  end)
end)

-- The same configuration tested offline: moonproxy.testing calls the Lua
-- policy with the servers as the balancer would see them, which cfg:servers
-- sets (down, open circuit, requests in flight), with no proxy and no servers.
describe("examples/sticky_tenant.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local ADDRS = { "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003" }

  it("sends a tenant to its home server, every time", function()
    local cfg = testing.load(EXAMPLE)
    for _, t in ipairs { "acme", "globex", "initech" } do
      local home = ADDRS[hash(t) % 3 + 1]
      for i = 1, 5 do
        local r = cfg:request { path = "/?i=" .. i, headers = { ["x-tenant"] = t } }
        assert.equal(home, r.server, testing.format(r))
      end
    end
  end)

  it("moves only that tenant elsewhere while its home server's circuit is open", function()
    local home = ADDRS[hash("acme") % 3 + 1]
    local cfg = testing.load(EXAMPLE, { servers = { app = { [home] = { open = true } } } })
    local r = cfg:request { path = "/", headers = { ["x-tenant"] = "acme" } }
    assert.are_not.equal(home, r.server, testing.format(r))
  end)

  it("sends requests without a tenant to the least busy server", function()
    local cfg = testing.load(EXAMPLE, { servers = { app = {
      [ADDRS[1]] = { active = 4 }, [ADDRS[2]] = { active = 0 }, [ADDRS[3]] = { active = 7 } } } })
    for i = 1, 3 do
      local r = cfg:request { path = "/?i=" .. i }
      assert.equal(ADDRS[2], r.server, testing.format(r))
    end
  end)

  it("treats a repeated X-Tenant header as no tenant", function()
    local cfg = testing.load(EXAMPLE,
      { servers = { app = { [ADDRS[1]] = { active = 1 }, [ADDRS[3]] = { active = 1 } } } })
    assert.equal(ADDRS[3], ADDRS[hash("globex") % 3 + 1])
    local r = cfg:request { path = "/", headers = { ["x-tenant"] = { "globex", "globex" } } }
    assert.equal(ADDRS[2], r.server, testing.format(r)) -- the least busy, not globex's home
  end)
end)
