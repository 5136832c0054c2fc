-- examples/canary.lua, run for real with two workers: the example's own text
-- with its addresses swapped for free loopback ports, a "stable" and a
-- "canary" origin behind it. The override is checked request by request, the
-- 95:5 split over 2,000 requests, and last, the canary going away.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local EXAMPLE = "examples/canary.lua"

describe("examples/canary.lua", function()
  local stable, canary, proxy

  lazy_setup(function()
    stable, canary = h.start_origin("stable"), h.start_origin("canary")
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:9001", "${stable}" },
      { "127.0.0.1:9002", "${canary}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
      { "127.0.0.1:8085", "${admin}" },
    })
    proxy = h.start_proxy { workers = 2, config = text, vars = { stable = stable.addr, canary = canary.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, stable, canary)
  end)

  local function get(headers, target)
    return assert(raw.get(proxy.port, target or "/", headers, { timeout = 10 }))
  end

  -- n requests with these headers over conc keep-alive connections: the
  -- X-Origin counts and the X-Canary-Decision counts.
  local function send(n, conc, headers)
    local results, counts = h.load(proxy.port, { total = n, concurrency = conc,
      request = function(i) return { target = "/page?i=" .. i, headers = headers } end })
    local decisions = {}
    for i = 1, n do
      local r = results[i]
      assert(r and r.status == 200, "request " .. i .. ": " .. tostring(r and (r.status or r.err)))
      local d = r:header("x-canary-decision")
      decisions[d] = (decisions[d] or 0) + 1
    end
    return counts, decisions
  end

  it("passes moonproxy -t", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(1, #cfg.routes)
    assert.truthy(cfg.upstreams.stable and cfg.upstreams.canary and cfg.upstreams.split)
  end)

  describe("the override", function()
    local cases = {
      { "header x-canary: always", { { "X-Canary", "always" } }, "canary", "header" },
      { "cookie canary=1", { { "Cookie", "canary=1" } }, "canary", "cookie" },
      { "cookie canary=1 among others", { { "Cookie", "theme=dark; canary=1; lang=en" } }, "canary", "cookie" },
      { "cookie canary=1 in a second Cookie header", { { "Cookie", "theme=dark" }, { "Cookie", "canary=1" } },
        "canary", "cookie" },
      { "header x-canary: never", { { "X-Canary", "never" } }, "stable", "header" },
      { "cookie canary=0", { { "Cookie", "a=b; canary=0" } }, "stable", "cookie" },
      { "the header over the cookie", { { "X-Canary", "never" }, { "Cookie", "canary=1" } }, "stable", "header" },
    }
    for _, c in ipairs(cases) do
      it("sends every request to " .. c[3] .. " on " .. c[1], function()
        local counts, decisions = send(200, 4, c[2])
        assert.same({ [c[3]] = 200 }, counts)
        assert.same({ [c[4]] = 200 }, decisions)
      end)
    end

    it("ignores look-alike cookies and other header values (the split decides)", function()
      for _, hs in ipairs { { { "Cookie", "canary=10" } }, { { "Cookie", "mycanary=1" } },
        { { "Cookie", "canary_=1" } }, { { "X-Canary", "yes" } } } do
        local _, decisions = send(20, 2, hs)
        assert.same({ split = 20 }, decisions, hs[1][1] .. ": " .. hs[1][2])
      end
    end)
  end)

  describe("the 95:5 split", function()
    it("sends 3-7% of 2,000 requests to the canary", function()
      local counts, decisions = send(2000, 8)
      assert.same({ split = 2000 }, decisions)
      local c = counts.canary or 0
      assert.equal(2000, c + (counts.stable or 0), h.show_counts(counts))
      assert(c >= 60 and c <= 140, "canary got " .. c .. " of 2000 (" .. h.show_counts(counts) .. ")")
    end)

    it("is exact and spread out on one worker: 5 of 100 consecutive requests, never two in a row", function()
      local conn = assert(raw.connect(proxy.port, { timeout = 10 }))
      finally(function() conn:close() end)
      local picks, n = {}, 0
      for i = 1, 100 do
        local res = assert(conn:request { target = "/one?i=" .. i })
        picks[i] = res:header("x-origin")
        if picks[i] == "canary" then
          n = n + 1
          assert(picks[i - 1] ~= "canary", "two canary picks in a row at " .. i)
        end
      end
      assert.equal(5, n)
    end)
  end)

  describe("when the canary goes away", function()
    lazy_setup(function()
      canary:stop()
    end)

    it("split users still get stable, without a single error", function()
      local counts = send(300, 4)
      assert.same({ stable = 300 }, counts)
    end)

    it("takes the canary out of the split (its circuit opens)", function()
      local s = h.eventually(function()
        local st = proxy:server_state("split", canary.addr)
        return st and st.healthy == false and st
      end)
      assert.is_false(s.healthy)
    end)

    it("forced canary users get 502 three times (the canary upstream's own count), then 503 with Retry-After",
      function()
        local seen, last = {}, nil
        for i = 1, 5 do
          last = get({ { "X-Canary", "always" } }, "/forced?i=" .. i)
          seen[i] = last.status
        end
        assert.same({ 502, 502, 502, 503, 503 }, seen)
        assert(tonumber(last:header("retry-after")) >= 1)
        assert.is_false(proxy:server_state("canary", canary.addr).healthy)
      end)

    it("never took stable out", function()
      assert.is_true(proxy:server_state("split", stable.addr).healthy)
      assert.is_true(proxy:server_state("stable", stable.addr).healthy)
    end)
  end)
end)

-- The same configuration tested offline: moonproxy.testing runs the handler,
-- the weighted balancer and the response hook, with no proxy and no servers.
describe("examples/canary.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local STABLE, CANARY = "127.0.0.1:9001", "127.0.0.1:9002"

  it("forces the canary, or stable, by header", function()
    local cfg = testing.load(EXAMPLE)
    local r = cfg:request { path = "/", headers = { ["x-canary"] = "always" } }
    assert.equal("canary", r.upstream, testing.format(r))
    assert.equal(CANARY, r.server)
    assert.equal("stable", cfg:request({ path = "/", headers = { ["x-canary"] = "never" } }).upstream)
  end)

  it("forces it by cookie, matching the whole name and value", function()
    local cfg = testing.load(EXAMPLE)
    assert.equal("canary", cfg:request({ path = "/", headers = { cookie = "a=1; canary=1" } }).upstream)
    assert.equal("stable", cfg:request({ path = "/", headers = { cookie = "canary=0" } }).upstream)
    local r = cfg:request { path = "/", headers = { cookie = "mycanary=1; canary=10" } }
    assert.equal("split", r.upstream, testing.format(r))
  end)

  it("splits 95:5, exactly, over 100 requests of one worker", function()
    local cfg = testing.load(EXAMPLE) -- a fresh balancer
    local counts = {}
    for i = 1, 100 do
      local s = cfg:request({ path = "/?i=" .. i }).server
      counts[s] = (counts[s] or 0) + 1
    end
    assert.same({ [STABLE] = 95, [CANARY] = 5 }, counts)
  end)

  it("tells the client how the version was chosen", function()
    local cfg = testing.load(EXAMPLE)
    local r = cfg:request { path = "/", headers = { cookie = "canary=1" } }
    local resp = cfg:response(r, { status = 200, headers = { ["content-type"] = "text/html" }, body = "<p>hi" })
    assert.equal("cookie", resp.headers["x-canary-decision"], testing.format(resp))
  end)
end)
