-- moonproxy.balancer.*: the Lua reference policies against SPEC "Balancers",
-- fed as the core feeds them: the available servers, the request, and
-- { name, hash_key, servers = the full list }.
local POLICIES = { "round_robin", "weighted", "least_conn", "p2c", "ewma", "chash" }

local serial = 0

-- A fake upstream of n servers; fields: { weight = {...}, active = {...}, ... }.
local function upstream(n, fields, hash_key)
  serial = serial + 1
  local full = {}
  for i = 1, n do
    full[i] = { addr = "10.0.0." .. i .. ":80", weight = 1, healthy = true, active = 0, latency = 0,
      failures = 0, index = i }
    for k, v in pairs(fields or {}) do
      full[i][k] = v[i]
    end
  end
  return { name = "up" .. serial, hash_key = hash_key or "header:x-user", servers = full }
end

local function available(up)
  local list = {}
  for _, s in ipairs(up.servers) do
    if s.healthy then
      list[#list + 1] = s
    end
  end
  return list
end

local function request(key)
  return { headers = { ["x-user"] = key }, remote_addr = "192.0.2.1" }
end

-- Index of the server the policy picks (nil for none).
local function pick(policy, up, key)
  local s = require("moonproxy.balancer." .. policy).pick(available(up), request(key), up)
  return s and s.index
end

local function counts(policy, up, n, keyed)
  local c = {}
  for i = 1, n do
    local k = pick(policy, up, keyed and "user-" .. i or "k")
    c[k or "none"] = (c[k or "none"] or 0) + 1
  end
  return c
end

describe("balancer.round_robin", function()
  it("spreads 3,000 picks evenly over 3 servers", function()
    local c = counts("round_robin", upstream(3), 3000)
    for i = 1, 3 do
      assert.is_true(math.abs(c[i] - 1000) <= 20, "server " .. i .. ": " .. c[i])
    end
  end)

  it("keeps one cursor per upstream name", function()
    local a, b = upstream(3), upstream(3)
    assert.equal(1, pick("round_robin", a))
    assert.equal(2, pick("round_robin", a))
    assert.equal(1, pick("round_robin", b))
  end)

  it("works as a two-argument function", function()
    local rr = require "moonproxy.balancer.round_robin"
    local servers = { { addr = "a" }, { addr = "b" } }
    assert.not_equal(rr.pick(servers, {}), rr.pick(servers, {}))
  end)
end)

describe("balancer.weighted", function()
  it("gives weights 1:3 25% and 75% of the picks", function()
    local c = counts("weighted", upstream(2, { weight = { 1, 3 } }), 4000)
    assert.is_true(math.abs(c[1] / 4000 - 0.25) <= 0.03)
    assert.is_true(math.abs(c[2] / 4000 - 0.75) <= 0.03)
  end)

  it("interleaves like nginx: weights 5,1,1 give a a b a c a a", function()
    local up, seq = upstream(3, { weight = { 5, 1, 1 } }), {}
    for i = 1, 7 do
      seq[i] = pick("weighted", up)
    end
    assert.same({ 1, 1, 2, 1, 3, 1, 1 }, seq)
  end)
end)

describe("balancer.least_conn", function()
  it("prefers the idle server", function()
    local c = counts("least_conn", upstream(3, { active = { 4, 0, 2 } }), 100)
    assert.equal(100, c[2])
  end)

  it("compares active relative to weight", function()
    assert.equal(2, pick("least_conn", upstream(2, { active = { 3, 5 }, weight = { 1, 2 } })))
  end)

  it("takes turns among equally loaded servers", function()
    local c = counts("least_conn", upstream(3, { active = { 1, 1, 1 } }), 3000)
    assert.same({ 1000, 1000, 1000 }, { c[1], c[2], c[3] })
  end)
end)

describe("balancer.p2c", function()
  before_each(function()
    math.randomseed(11)
  end)

  it("takes the less loaded of two", function()
    local c = counts("p2c", upstream(2, { active = { 9, 1 } }), 1000)
    assert.equal(1000, c[2])
  end)

  it("never picks the most loaded of three, nor an unavailable one", function()
    local up = upstream(4, { active = { 0, 5, 10, 0 }, healthy = { true, true, true, false } })
    local c = counts("p2c", up, 3000)
    assert.is_nil(c[3])
    assert.is_nil(c[4])
    assert.is_true(math.abs(c[1] / 3000 - 2 / 3) <= 0.03, c[1])
  end)
end)

describe("balancer.ewma", function()
  before_each(function()
    math.randomseed(11)
  end)

  it("prefers the fast server (5 vs 50 ms)", function()
    local c = counts("ewma", upstream(3, { latency = { 50, 5, 50 } }), 3000)
    assert.is_true(c[2] / 3000 >= 0.64, c[2])
  end)

  it("weighs in-flight requests: a fast but busy server loses", function()
    local c = counts("ewma", upstream(2, { latency = { 5, 8 }, active = { 3, 0 } }), 100)
    assert.equal(100, c[2])
  end)
end)

describe("balancer.chash", function()
  local chash = require "moonproxy.balancer.chash"

  it("spreads 10,000 keys within 10% of even over 3 servers", function()
    local c = counts("chash", upstream(3), 10000, true)
    for i = 1, 3 do
      assert.is_true(math.abs(c[i] - 10000 / 3) <= 1000 / 3, "server " .. i .. ": " .. c[i])
    end
  end)

  it("moves only keys to a 4th server when it joins (about a quarter)", function()
    local three, four = upstream(3), upstream(4)
    local stay, moved = 0, 0
    for i = 1, 10000 do
      local a, b = pick("chash", three, "user-" .. i), pick("chash", four, "user-" .. i)
      if b == 4 then
        moved = moved + 1
      elseif a == b then
        stay = stay + 1
      end
    end
    assert.equal(10000 - moved, stay)
    assert.is_true(math.abs(moved / 10000 - 0.25) <= 0.05, moved)
  end)

  it("sends an unavailable server's keys to the next on the ring; others stay", function()
    local up, before = upstream(3), {}
    for i = 1, 3000 do
      before[i] = pick("chash", up, "user-" .. i)
    end
    up.servers[2].healthy = false
    for i = 1, 3000 do
      local now = pick("chash", up, "user-" .. i)
      assert.not_equal(2, now)
      if before[i] ~= 2 then
        assert.equal(before[i], now)
      end
    end
  end)

  it("maps keys the same without upstream.servers (ring of the available ones)", function()
    local up = upstream(3)
    up.servers[3].healthy = false
    local bare = { name = up.name .. "-bare", hash_key = up.hash_key }
    for i = 1, 1000 do
      local s = chash.pick(available(up), request("user-" .. i), bare)
      assert.equal(pick("chash", up, "user-" .. i), s.index)
    end
  end)

  it("rebuilds its ring when a weight changes", function()
    local up = upstream(2)
    local c1 = counts("chash", up, 4000, true)
    up.servers[2].weight = 3
    local c2 = counts("chash", up, 4000, true)
    assert.is_true(c2[2] > c1[2] + 600, c1[2] .. " -> " .. c2[2])
  end)

  it("reads the key from a header, a cookie, the client address or a function", function()
    local up = upstream(5)
    local function with(hash_key, req)
      up.hash_key = hash_key
      return chash.pick(available(up), req, up).index
    end
    local want = with("header:x-user", request("alice"))
    assert.equal(want, with("cookie:sid", { headers = { cookie = "a=1; sid=alice; b=2" } }))
    assert.equal(want, with("cookie:sid", { headers = { cookie = { "a=1", "sid=alice " } } }))
    assert.equal(want, with("ip", { headers = {}, remote_addr = "alice" }))
    assert.equal(want, with(function(req) return req.ctx.user end, { headers = {}, ctx = { user = "alice" } }))
    assert.equal(want, with("header:x-user", { headers = {}, remote_addr = "alice" }))
  end)
end)

describe("balancer policies with no available server", function()
  for _, policy in ipairs(POLICIES) do
    it(policy .. " returns nil", function()
      assert.is_nil(pick(policy, upstream(3, { healthy = { false, false, false } })))
    end)
  end
end)

describe("balancer policies and unavailable servers", function()
  for _, policy in ipairs(POLICIES) do
    it(policy .. " never picks one", function()
      local up = upstream(5, { active = { 3, 0, 1, 0, 2 }, latency = { 9, 1, 5, 0, 2 },
        weight = { 1, 5, 2, 3, 1 }, healthy = { true, false, true, false, true } })
      local c = counts(policy, up, 2000, true)
      assert.is_nil(c[2])
      assert.is_nil(c[4])
      assert.is_nil(c.none)
    end)
  end
end)

describe("balancer modules", function()
  it("load without touching globals", function()
    local before = {}
    for k in pairs(_G) do
      before[k] = true
    end
    for _, policy in ipairs(POLICIES) do
      package.loaded["moonproxy.balancer." .. policy] = nil
      assert.is_function(require("moonproxy.balancer." .. policy).pick)
    end
    for k in pairs(_G) do
      assert.is_true(before[k], "new global " .. tostring(k))
    end
  end)
end)
