-- core.shared(): the shared dictionaries (src/shdict.c) against SPEC "Shared
-- state". Every method takes an optional trailing `now` (monotonic seconds),
-- which these specs pin so that TTLs and refills need no sleeping.
local core = require "moonproxy.core"

-- Dicts live as long as the process, so each spec takes a name of its own.
local serial = 0
local function dict(size)
  serial = serial + 1
  return core.shared("spec" .. serial, size or 65536)
end

describe("core.shared()", function()
  -- a script must not add a __gc (one that raises where C allocates outside
  -- a protected call ends the process: src/vm.c guard_finalizers)
  it("hides its objects' metatable", function()
    assert.is_false(getmetatable(dict()))
    assert.is_false(getmetatable(assert(core.router({}))))
  end)

  it("returns the same data for the same name", function()
    local a = core.shared("same", "64k")
    local b = core.shared("same", 65536)
    assert(a:set("k", "v"))
    assert.equal("v", b:get("k"))
  end)

  it("refuses the same name with another size", function()
    core.shared("sized", "64k")
    assert.has_error(function()
      core.shared("sized", "1m")
    end, "shared dict 'sized' already exists with size 65536")
  end)

  it("reads sizes with k, m and g suffixes in any case", function()
    assert.equal(1024, core.shared("s1k", "1k"):stats().capacity)
    assert.equal(2 * 1048576, core.shared("s2m", "2M"):stats().capacity)
    assert.equal(5000, core.shared("s5000", "5000"):stats().capacity)
  end)

  it("raises on a bad name or size", function()
    assert.has_error(function()
      core.shared("", 65536)
    end)
    assert.has_error(function()
      core.shared("bad", "64 kb")
    end)
    assert.has_error(function()
      core.shared("bad", 1.5)
    end)
    assert.has_error(function()
      core.shared("tiny", 100)
    end)
  end)

  it("prints its name", function()
    assert.equal("shared dict 'printed'", tostring(core.shared("printed", 4096)))
  end)
end)

describe("core.now()", function()
  it("returns monotonic seconds", function()
    local a = core.now()
    local b = core.now()
    assert.is_number(a)
    assert.is_true(b >= a)
  end)
end)

describe("dict:get() and dict:set()", function()
  it("stores strings, numbers and booleans with their types", function()
    local d = dict()
    assert.is_true(d:set("s", "text"))
    assert.is_true(d:set("n", 42.5))
    assert.is_true(d:set("t", true))
    assert.is_true(d:set("f", false))
    assert.equal("text", d:get("s"))
    assert.equal(42.5, d:get("n"))
    assert.equal(true, d:get("t"))
    assert.equal(false, d:get("f"))
  end)

  it("keeps a numeric string a string", function()
    local d = dict()
    d:set("k", "5")
    assert.equal("5", d:get("k"))
  end)

  it("returns nil for an absent key", function()
    assert.is_nil(dict():get("nope"))
  end)

  it("stores binary-safe strings that span many chunks", function()
    local d = dict()
    local v = ("\0\1\255abc"):rep(3000)
    assert.is_true(d:set("bin", v))
    assert.equal(v, d:get("bin"))
    assert.is_true(d:set("empty", ""))
    assert.equal("", d:get("empty"))
  end)

  it("replaces a value, also with one of another type and size", function()
    local d = dict()
    d:set("k", ("x"):rep(1000))
    d:set("k", 7)
    assert.equal(7, d:get("k"))
    d:set("k", "short")
    assert.equal("short", d:get("k"))
    assert.equal(1, d:stats().entries)
  end)

  it("refuses a value that can never fit and keeps the old one", function()
    local d = dict(4096)
    d:set("k", "old")
    local ok, err = d:set("k", ("x"):rep(5000))
    assert.is_nil(ok)
    assert.equal("too large", err)
    assert.equal("old", d:get("k"))
  end)

  it("refuses other value types", function()
    local d = dict()
    assert.has_error(function()
      d:set("k", {})
    end)
    assert.has_error(function()
      d:set("k", nil)
    end)
  end)

  it("answers nil, reason for an empty or too long key", function()
    local d = dict()
    assert.same({ nil, "empty key" }, { d:set("", 1) })
    assert.same({ nil, "key too long" }, { d:get(("k"):rep(65537)) })
  end)

  it("takes keys up to 64 KiB", function()
    local d = dict("1m")
    local k = ("k"):rep(65536)
    assert.is_true(d:set(k, "v"))
    assert.equal("v", d:get(k))
  end)

  it("raises on misuse", function()
    local d = dict()
    assert.has_error(function()
      d.get("k")
    end)
    assert.has_error(function()
      d:get({})
    end)
    assert.has_error(function()
      d:set("k", 1, -1)
    end)
  end)
end)

describe("dict TTL", function()
  it("returns an entry until its TTL has passed, then nil", function()
    local d = dict()
    d:set("k", "v", 10, 100)
    assert.equal("v", d:get("k", 109.9))
    assert.is_nil(d:get("k", 110))
  end)

  it("keeps an entry with ttl 0 forever", function()
    local d = dict()
    d:set("k", "v", 0, 100)
    assert.equal("v", d:get("k", 1e12))
  end)

  it("reclaims an expired entry when it is looked up", function()
    local d = dict()
    d:set("k", "v", 1, 100)
    assert.is_nil(d:get("k", 200))
    assert.equal(0, d:stats().entries)
    assert.equal(0, d:stats().used)
  end)

  it("expires by the real clock when no now is given", function()
    local d = dict()
    d:set("k", "v", 0.001)
    local deadline = core.now() + 1
    while d:get("k") and core.now() < deadline do
    end
    assert.is_nil(d:get("k"))
  end)
end)

describe("dict:add()", function()
  it("stores when the key is absent", function()
    local d = dict()
    assert.is_true(d:add("k", 1))
    assert.equal(1, d:get("k"))
  end)

  it("answers nil, 'exists' and keeps the value when the key is live", function()
    local d = dict()
    d:set("k", 1)
    assert.same({ nil, "exists" }, { d:add("k", 2) })
    assert.equal(1, d:get("k"))
  end)

  it("stores over an expired entry", function()
    local d = dict()
    d:set("k", 1, 5, 100)
    assert.is_true(d:add("k", 2, 0, 106))
    assert.equal(2, d:get("k", 106))
  end)
end)

describe("dict:incr()", function()
  it("adds to a number and returns the new value", function()
    local d = dict()
    d:set("n", 10)
    assert.equal(13, d:incr("n", 3))
    assert.equal(12.5, d:incr("n", -0.5))
    assert.equal(13.5, d:incr("n"))
    assert.equal(13.5, d:get("n"))
  end)

  it("answers nil, 'not found' for an absent key without init", function()
    assert.same({ nil, "not found" }, { dict():incr("n", 1) })
  end)

  it("creates an absent key as init + by", function()
    local d = dict()
    assert.equal(6, d:incr("n", 1, 5))
    assert.equal(7, d:incr("n", 1, 5))
  end)

  it("applies the TTL only when it creates the entry", function()
    local d = dict()
    d:incr("n", 1, 0, 10, 100)
    d:incr("n", 1, 0, 1000, 105)
    assert.equal(2, d:get("n", 109))
    assert.is_nil(d:get("n", 110))
    assert.equal(1, d:incr("n", 1, 0, 0, 110))
  end)

  it("answers nil, 'not a number' for another type", function()
    local d = dict()
    d:set("s", "1")
    assert.same({ nil, "not a number" }, { d:incr("s", 1, 0) })
    assert.equal("1", d:get("s"))
  end)
end)

describe("dict:delete()", function()
  it("removes the entry and frees its memory", function()
    local d = dict()
    d:set("k", ("v"):rep(500))
    assert.is_true(d:delete("k"))
    assert.is_nil(d:get("k"))
    assert.equal(0, d:stats().used)
  end)

  it("returns true for an absent key", function()
    assert.is_true(dict():delete("nope"))
  end)
end)

describe("dict LRU eviction", function()
  it("fills a 64k dict with 10,000 keys within its size", function()
    local d = dict("64k")
    for i = 1, 10000 do
      assert.is_true(d:set("key" .. i, i))
    end
    local st = d:stats()
    assert.equal(65536, st.capacity)
    assert.is_true(st.used <= st.capacity)
    assert.is_true(st.evictions > 0)
    assert.equal(10000, st.evictions + st.entries)
    for i = 9900, 10000 do
      assert.equal(i, d:get("key" .. i))
    end
    assert.is_nil(d:get("key1"))
  end)

  it("keeps the recently read keys and drops the least recently used", function()
    local d = dict(4096) -- 64 chunks: four entries of 16
    local v = ("x"):rep(900)
    for i = 1, 4 do
      d:set("k" .. i, v)
    end
    d:get("k1") -- now k2 is the least recently used
    d:set("k5", v)
    assert.is_nil(d:get("k2"))
    for _, k in ipairs({ "k1", "k3", "k4", "k5" }) do
      assert.equal(v, d:get(k))
    end
    assert.equal(1, d:stats().evictions)
  end)

  it("does not count expired entries as evictions", function()
    local d = dict(4096)
    for i = 1, 6 do
      d:set("k" .. i, ("x"):rep(500), 1, 100)
    end
    for i = 1, 6 do
      d:set("n" .. i, ("y"):rep(500), 0, 200)
    end
    assert.equal(0, d:stats().evictions)
  end)

  it("mixes sizes without running out of room", function()
    local d = dict("16k")
    for i = 1, 2000 do
      assert.is_true(d:set("k" .. (i % 97), ("z"):rep((i * 37) % 3000)))
    end
    local st = d:stats()
    assert.is_true(st.used <= st.capacity)
  end)
end)

describe("dict:take()", function()
  it("allows a full burst, then refuses with a sensible retry_after", function()
    local d = dict()
    for i = 1, 5 do
      local ok, remaining = d:take("ip", 1, 5, 1, 100)
      assert.is_true(ok)
      assert.equal(5 - i, remaining)
    end
    local ok, remaining, retry = d:take("ip", 1, 5, 1, 100)
    assert.is_false(ok)
    assert.equal(0, remaining)
    assert.equal(1, retry)
  end)

  it("refills at rate per second, up to burst", function()
    local d = dict()
    for _ = 1, 10 do
      d:take("ip", 2, 10, 1, 100)
    end
    assert.is_false((d:take("ip", 2, 10, 1, 100)))
    local ok, remaining = d:take("ip", 2, 10, 1, 101.5) -- 3 tokens back
    assert.is_true(ok)
    assert.equal(2, remaining)
    local _, full = d:take("ip", 2, 10, 0, 1000)
    assert.equal(10, full)
  end)

  it("reports retry_after for the cost asked", function()
    local d = dict()
    d:take("ip", 4, 8, 8, 100)
    local ok, _, retry = d:take("ip", 4, 8, 2, 100.25) -- 1 token there
    assert.is_false(ok)
    assert.equal(0.25, retry)
  end)

  it("tolerates a now slightly behind the last take", function()
    local d = dict()
    d:take("ip", 1, 2, 2, 100)
    local ok, remaining = d:take("ip", 1, 2, 1, 99.5)
    assert.is_false(ok)
    assert.equal(0, remaining)
  end)

  it("answers nil, 'not a bucket' when the key holds a value", function()
    local d = dict()
    d:set("k", 1)
    assert.same({ nil, "not a bucket" }, { d:take("k", 1, 1, 1) })
  end)

  it("raises on a bad rate, burst or cost", function()
    local d = dict()
    assert.has_error(function()
      d:take("k", 0, 1)
    end)
    assert.has_error(function()
      d:take("k", 1, 0)
    end)
    assert.has_error(function()
      d:take("k", 1, 1, 2)
    end)
  end)
end)

describe("dict:stats()", function()
  it("counts entries and the bytes they hold", function()
    local d = dict()
    d:set("a", 1)
    d:set("b", ("x"):rep(100))
    local st = d:stats()
    assert.equal(2, st.entries)
    assert.equal(64 * (1 + 3), st.used)
    assert.is_true(st.index_bytes > 0)
  end)
end)
