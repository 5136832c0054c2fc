-- core.pick(): the C policies of src/balance.c against SPEC "Balancers", and
-- their agreement with the Lua modules of lua/moonproxy/balancer (the same
-- sequences, the same distributions, chash key for key).
local core = require "moonproxy.core"
local bit = require "bit"

local POLICIES = { "round_robin", "weighted", "least_conn", "p2c", "ewma", "chash" }

-- servers: list of { weight, active, latency, available, addr }; returns a
-- function(key) -> the 1-based index core.pick gives.
local function picker(policy, servers, seed)
  local addrs, weights = {}, {}
  for i, s in ipairs(servers) do
    addrs[i], weights[i] = s.addr or ("10.0.0." .. i .. ":80"), s.weight or 1
  end
  local st = core.pick_state(policy, addrs, weights, seed or 1)
  return function(key)
    return core.pick(st, servers, key or "k")
  end
end

local function counts(pick, n, key_of)
  local c = {}
  for i = 1, n do
    local k = pick(key_of and key_of(i))
    c[k or "none"] = (c[k or "none"] or 0) + 1
  end
  return c
end

local function servers_of(n, fields)
  local list = {}
  for i = 1, n do
    list[i] = { addr = "10.0.0." .. i .. ":80" }
    for k, v in pairs(fields or {}) do
      list[i][k] = v[i]
    end
  end
  return list
end

local function key(i)
  return "user-" .. i
end

describe("core.pick() round_robin", function()
  it("spreads 3,000 picks evenly over 3 servers", function()
    local c = counts(picker("round_robin", servers_of(3)), 3000)
    for i = 1, 3 do
      assert.is_true(math.abs(c[i] - 1000) <= 20, "server " .. i .. ": " .. c[i])
    end
  end)

  it("skips an unavailable server and stays even over the rest", function()
    local c = counts(picker("round_robin", servers_of(3, { available = { true, false, true } })), 3000)
    assert.is_nil(c[2])
    assert.equal(1500, c[1])
    assert.equal(1500, c[3])
  end)
end)

describe("core.pick() weighted", function()
  it("gives weights 1:3 25% and 75% of the picks", function()
    local c = counts(picker("weighted", servers_of(2, { weight = { 1, 3 } })), 4000)
    assert.is_true(math.abs(c[1] / 4000 - 0.25) <= 0.03)
    assert.is_true(math.abs(c[2] / 4000 - 0.75) <= 0.03)
  end)

  it("interleaves like nginx: weights 5,1,1 give a a b a c a a", function()
    local pick = picker("weighted", servers_of(3, { weight = { 5, 1, 1 } }))
    local seq = {}
    for i = 1, 14 do
      seq[i] = pick()
    end
    assert.same({ 1, 1, 2, 1, 3, 1, 1, 1, 1, 2, 1, 3, 1, 1 }, seq)
  end)
end)

describe("core.pick() least_conn", function()
  it("prefers the idle server", function()
    local c = counts(picker("least_conn", servers_of(3, { active = { 4, 0, 2 } })), 100)
    assert.equal(100, c[2])
  end)

  it("compares active relative to weight", function()
    local pick = picker("least_conn", servers_of(2, { active = { 3, 5 }, weight = { 1, 2 } }))
    assert.equal(2, pick())
  end)

  it("takes turns among equally loaded servers", function()
    local c = counts(picker("least_conn", servers_of(3, { active = { 1, 1, 1 } })), 3000)
    assert.same({ 1000, 1000, 1000 }, { c[1], c[2], c[3] })
  end)
end)

describe("core.pick() p2c", function()
  it("takes the less loaded of two", function()
    local c = counts(picker("p2c", servers_of(2, { active = { 9, 1 } })), 1000)
    assert.equal(1000, c[2])
  end)

  it("never picks the most loaded of three, nor an unavailable one", function()
    local c = counts(picker("p2c", servers_of(4, { active = { 0, 5, 10, 0 },
      available = { true, true, true, false } })), 3000)
    assert.is_nil(c[3])
    assert.is_nil(c[4])
    -- the idle server wins every pair it is drawn in: 2/3 of them
    assert.is_true(math.abs(c[1] / 3000 - 2 / 3) <= 0.03, c[1])
  end)
end)

describe("core.pick() ewma", function()
  it("prefers the fast server (5 vs 50 ms)", function()
    local c = counts(picker("ewma", servers_of(3, { latency = { 50, 5, 50 } })), 3000)
    assert.is_true(c[2] / 3000 >= 0.64, c[2])
  end)

  it("weighs in-flight requests: a fast but busy server loses", function()
    local c = counts(picker("ewma", servers_of(2, { latency = { 5, 8 }, active = { 3, 0 } })), 100)
    assert.equal(100, c[2])
  end)
end)

describe("core.pick() chash", function()
  it("spreads 10,000 keys within 10% of even over 3 servers", function()
    local c = counts(picker("chash", servers_of(3)), 10000, key)
    for i = 1, 3 do
      assert.is_true(math.abs(c[i] - 10000 / 3) <= 1000 / 3, "server " .. i .. ": " .. c[i])
    end
  end)

  it("moves only keys to a 4th server when it joins (about a quarter)", function()
    local three, four = picker("chash", servers_of(3)), picker("chash", servers_of(4))
    local stay, moved = 0, 0
    for i = 1, 10000 do
      local a, b = three(key(i)), four(key(i))
      if b == 4 then
        moved = moved + 1
      elseif a == b then
        stay = stay + 1
      end
    end
    assert.equal(10000 - moved, stay)
    assert.is_true(math.abs(moved / 10000 - 0.25) <= 0.05, moved)
  end)

  it("maps a key the same whatever the order of the servers", function()
    local list = servers_of(4, { weight = { 1, 2, 3, 4 } })
    local rev = { list[4], list[3], list[2], list[1] }
    local a, b = picker("chash", list), picker("chash", rev)
    for i = 1, 1000 do
      assert.equal(a(key(i)), 5 - b(key(i)))
    end
  end)

  it("sends an unavailable server's keys to the next on the ring; others stay", function()
    local list = servers_of(3)
    local before = {}
    local pick = picker("chash", list)
    for i = 1, 3000 do
      before[i] = pick(key(i))
    end
    list[2].available = false
    for i = 1, 3000 do
      local now = pick(key(i))
      assert.not_equal(2, now)
      if before[i] ~= 2 then
        assert.equal(before[i], now)
      end
    end
  end)

  it("gives weights their share of keys", function()
    local c = counts(picker("chash", servers_of(2, { weight = { 1, 3 } })), 10000, key)
    assert.is_true(math.abs(c[2] / 10000 - 0.75) <= 0.05, c[2])
  end)
end)

describe("core.pick() with no available server", function()
  for _, policy in ipairs(POLICIES) do
    it(policy .. " returns nil", function()
      local pick = picker(policy, servers_of(3, { available = { false, false, false } }))
      assert.is_nil(pick())
    end)
  end

  it("returns nil on an empty list (every policy but chash)", function()
    for _, policy in ipairs(POLICIES) do
      if policy ~= "chash" then
        assert.is_nil(core.pick(core.pick_state(policy, {}), {}))
      end
    end
  end)
end)

describe("core.pick() unavailable servers", function()
  for _, policy in ipairs(POLICIES) do
    it(policy .. " never picks one", function()
      local list = servers_of(5, { active = { 3, 0, 1, 0, 2 }, latency = { 9, 1, 5, 0, 2 },
        weight = { 1, 5, 2, 3, 1 }, available = { true, false, true, false, true } })
      local c = counts(picker(policy, list), 2000, key)
      assert.is_nil(c[2])
      assert.is_nil(c[4])
      assert.is_nil(c.none)
    end)
  end
end)

describe("core.pick_state()", function()
  it("refuses an unknown policy, a bad weight and a wrong server count", function()
    assert.has_error(function() core.pick_state("random", { "a" }) end)
    assert.has_error(function() core.pick_state("chash", { "a" }, { 0 }) end)
    assert.has_error(function() core.pick_state("chash", {}) end)
    local st = core.pick_state("round_robin", { "a", "b" })
    assert.has_error(function() core.pick(st, { {} }) end)
    assert.has_error(function() core.pick(st, { { weight = 0 }, {} }) end)
  end)
end)

-- The Lua modules, fed what the core gives them: the available servers.
local function lua_picker(policy, full, hash_key)
  local mod = require("moonproxy.balancer." .. policy)
  local up = { name = "agree-" .. tostring({}), servers = full, hash_key = hash_key or "header:x-user" }
  return function(k)
    local avail = {}
    for _, s in ipairs(full) do
      if s.available ~= false then
        avail[#avail + 1] = s
      end
    end
    local s = mod.pick(avail, { headers = { ["x-user"] = k or "k" }, remote_addr = "10.9.9.9" }, up)
    return s and s.index
  end
end

local function indexed(list)
  for i, s in ipairs(list) do
    s.index = i
  end
  return list
end

describe("the C and Lua balancers", function()
  it("compute the same hash64", function()
    local chash = require "moonproxy.balancer.chash"
    local inputs = { "", "a", "10.0.0.1:80", ("x"):rep(1000), "\0\255\128" }
    for i = 1, 1000 do
      inputs[#inputs + 1] = key(i)
    end
    for _, s in ipairs(inputs) do
      assert.equal(core.hash64(s), bit.tohex(chash.hash64(s)))
    end
    assert.equal("efd01f60ba992926", core.hash64(""))
  end)

  for _, policy in ipairs({ "round_robin", "weighted", "least_conn" }) do
    it(policy .. " gives the same sequence", function()
      local list = indexed(servers_of(5, { weight = { 1, 5, 2, 3, 1 }, active = { 0, 0, 0, 0, 0 } }))
      local c, l = picker(policy, list), lua_picker(policy, list)
      for i = 1, 2000 do
        list[(i * 7) % 5 + 1].available = i % 3 ~= 0 -- servers come and go
        list[(i * 3) % 5 + 1].active = i % 4
        assert.equal(c(), l())
      end
    end)
  end

  for _, policy in ipairs({ "p2c", "ewma" }) do
    it(policy .. " gives the same distribution", function()
      math.randomseed(7)
      local list = indexed(servers_of(4, { weight = { 1, 2, 1, 1 }, active = { 0, 3, 6, 1 },
        latency = { 10, 20, 0, 40 } }))
      local c, l = counts(picker(policy, list), 20000), counts(lua_picker(policy, list), 20000)
      for i = 1, 4 do
        assert.is_true(math.abs((c[i] or 0) - (l[i] or 0)) / 20000 <= 0.02, policy .. " server " .. i)
      end
    end)
  end

  it("chash maps 1,000 keys the same, weighted, and with a server down", function()
    local list = indexed(servers_of(4, { weight = { 1, 2, 3, 1 } }))
    local c, l = picker("chash", list), lua_picker("chash", list)
    for i = 1, 1000 do
      assert.equal(c(key(i)), l(key(i)))
    end
    list[3].available = false
    for i = 1, 1000 do
      assert.equal(c(key(i)), l(key(i)))
    end
  end)

  it("chash agrees on a ring scaled down to its maximum size", function()
    local list = indexed(servers_of(8, { weight = { 1000, 1000, 999, 1000, 1000, 1000, 1000, 7 } }))
    local c, l = picker("chash", list), lua_picker("chash", list)
    for i = 1, 1000 do
      assert.equal(c(key(i)), l(key(i)))
    end
  end)
end)
