-- examples/api_gateway.lua, run for real: the example's own text with its
-- addresses swapped for free loopback ports and three origins (users, orders,
-- search) behind it. Each spec checks one claim of the example's comments.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local EXAMPLE = "examples/api_gateway.lua"
local ALICE, BOB, MONITOR = "k-alice-7f3a", "k-bob-91cc", "k-monitor-0d2e"

describe("examples/api_gateway.lua", function()
  local users, orders, search, proxy

  lazy_setup(function()
    users, orders, search = h.start_origin("users"), h.start_origin("orders"), h.start_origin("search")
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:9001", "${users}" },
      { "127.0.0.1:9002", "${orders}" },
      { "127.0.0.1:9003", "${search}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
    })
    proxy = h.start_proxy { workers = 1, config = text,
      vars = { users = users.addr, orders = orders.addr, search = search.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, users, orders, search)
  end)

  -- A request with the given API key (nil: none) and more headers ({ {name, value} }).
  local function call(method, target, key, more, body)
    local headers = {}
    if key then headers[#headers + 1] = { "x-api-key", key } end
    for _, hv in ipairs(more or {}) do headers[#headers + 1] = hv end
    if #headers == 0 then headers = nil end
    return assert(raw.request(proxy.port, { method = method, target = target, headers = headers, body = body },
      { timeout = 10 }))
  end
  local function get(target, key, more) return call("GET", target, key, more) end

  local function total_requests()
    return users:stats().requests + orders:stats().requests + search:stats().requests
  end

  it("passes moonproxy -t", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(4, #cfg.routes)
  end)

  describe("key_auth as a global plugin", function()
    it("answers 401 with WWW-Authenticate on every path without a key, forwarding nothing", function()
      local before = total_requests()
      for _, target in ipairs { "/users/42", "/orders", "/search?q=x", "/health", "/no/such/path" } do
        local res = get(target)
        assert.equal(401, res.status, target)
        assert.equal('Key realm="api"', res:header("www-authenticate"), target)
      end
      assert.equal(before, total_requests())
    end)

    it("answers 401 to an unknown key", function()
      local res = get("/users/42", "k-mallory")
      assert.equal(401, res.status)
      assert.equal("invalid API key\n", res.body)
    end)

    it("tells the service who is calling (X-Consumer), overriding a client's own", function()
      local e = h.echo(get("/users/42", ALICE, { { "X-Consumer", "admin" } }))
      assert.same({ "alice" }, h.echo_headers(e, "x-consumer"))
      e = h.echo(get("/orders/7", BOB))
      assert.equal("bob", h.echo_header(e, "x-consumer"))
    end)

    it("never forwards the API key", function()
      for _, target in ipairs { "/users/1", "/orders/1", "/search/1" } do
        local e = h.echo(get(target, BOB))
        assert.is_nil(h.echo_header(e, "x-api-key"), target)
      end
    end)

    it("answers a path no route matches with 404 once the key is valid", function()
      assert.equal(404, get("/no/such/path", ALICE).status)
    end)
  end)

  describe("prefix routes with strip_prefix", function()
    it("sends /users/42?x=1 to users as /42?x=1", function()
      local res = get("/users/42?x=1", ALICE)
      assert.equal("users", res:header("x-origin"))
      assert.equal("/42?x=1", h.echo(res).target)
    end)

    it("sends the bare prefix as /", function()
      assert.equal("/", h.echo(get("/users", ALICE)).target)
      assert.equal("/", h.echo(get("/users/", ALICE)).target)
    end)

    it("does not match /usersfoo", function()
      assert.equal(404, get("/usersfoo", ALICE).status)
    end)

    it("sends each prefix to its own service", function()
      assert.equal("orders", get("/orders/9", ALICE):header("x-origin"))
      -- (not ALICE on search: the rate-limit specs below start with her bucket full)
      local res = get("/search?q=moon", BOB)
      assert.equal("search", res:header("x-origin"))
      assert.equal("/?q=moon", h.echo(res).target)
    end)
  end)

  describe("request_size on orders", function()
    it("refuses a declared body over 64k with 413 before forwarding or asking for it", function()
      local before = orders:stats().requests
      local res = call("POST", "/orders", ALICE,
        { { "Content-Length", tostring(64 * 1024 + 1) }, { "Expect", "100-continue" } })
      assert.equal(413, res.status)
      assert.same({}, res.interim) -- no 100 Continue: the body is never read
      assert.equal(before, orders:stats().requests)
    end)

    it("forwards a body of exactly 64k", function()
      local e = h.echo(call("POST", "/orders", ALICE, nil, ("x"):rep(64 * 1024)))
      assert.equal("orders", e.name)
      assert.equal(64 * 1024, e.body_len)
    end)

    it("lets a chunked body (no declared length) through: only max_body_size applies to it", function()
      local piece = ("y"):rep(10000)
      local chunked = {}
      for i = 1, 10 do chunked[i] = string.format("%x\r\n%s\r\n", #piece, piece) end
      local body = table.concat(chunked) .. "0\r\n\r\n"
      local e = h.echo(call("POST", "/orders", ALICE, { { "Transfer-Encoding", "chunked" } }, body))
      assert.equal("orders", e.name)
      assert.equal(100000, e.body_len)
    end)

    it("does not limit bodies on the other routes", function()
      local e = h.echo(call("POST", "/users/import", ALICE, nil, ("x"):rep(100 * 1024)))
      assert.equal(100 * 1024, e.body_len)
    end)
  end)

  describe("rate_limit per API key on search", function()
    -- Sends search requests with a key until one is refused (at most n); returns
    -- the statuses, the RateLimit-Remaining values and the 429 response.
    local function until_limited(key, n)
      local statuses, remaining = {}, {}
      for i = 1, n do
        local res = get("/search?q=" .. i, key)
        statuses[i], remaining[i] = res.status, tonumber(res:header("ratelimit-remaining"))
        if res.status == 429 then return statuses, remaining, res end
      end
      return statuses, remaining
    end

    it("lets a burst of 5 through, then answers 429 with Retry-After", function()
      -- the bucket refills 2 tokens a second: on a slow machine a request or
      -- two more may pass, never fewer
      local statuses, remaining, limited = until_limited(ALICE, 12)
      assert(limited, "no 429 among " .. table.concat(statuses, " "))
      assert(#statuses >= 6, table.concat(statuses, " "))
      for i = 1, #statuses - 1 do
        assert.equal(200, statuses[i], "request " .. i)
        if i <= 5 then assert(remaining[i] <= 5 - i + 1 and remaining[i] >= 5 - i, "remaining " .. remaining[i]) end
      end
      assert(tonumber(limited:header("retry-after")) >= 1)
      assert.equal("5", limited:header("ratelimit-limit"))
      assert.equal("0", limited:header("ratelimit-remaining"))
    end)

    it("keeps a separate bucket per key", function()
      local res = get("/search?q=bob", BOB)
      assert.equal(200, res.status)
      assert.equal("search", res:header("x-origin"))
    end)

    it("limits only search: the same key still reaches users", function()
      local _, _, limited = until_limited(ALICE, 5)
      assert(limited, "alice is no longer limited on search")
      assert.equal(200, get("/users/1", ALICE).status)
    end)

    it("refills the bucket at 2 per second", function()
      h.eventually(function() return get("/search?q=later", ALICE).status == 200 end, 3, 0.1)
    end)
  end)

  describe("/health, answered by a handler", function()
    it("answers 200 JSON naming the request id, without contacting any service", function()
      local before = total_requests()
      local res = get("/health", MONITOR)
      assert.equal(200, res.status)
      assert.equal("application/json", res:header("content-type"))
      assert.equal("no-store", res:header("cache-control"))
      local id = res:header("x-request-id")
      assert.equal('{"status":"ok","request_id":"' .. id .. '"}\n', res.body)
      assert.equal(before, total_requests())
    end)

    it("answers HEAD without a body", function()
      local res = call("HEAD", "/health", MONITOR)
      assert.equal(200, res.status)
      assert.equal("", res.body)
    end)

    it("does not answer other methods (no route: 404)", function()
      assert.equal(404, call("POST", "/health", MONITOR, nil, "x").status)
    end)
  end)

  describe("X-Request-ID", function()
    it("keeps the client's id: sent to the service and echoed", function()
      local res = get("/users/1", ALICE, { { "X-Request-ID", "order-flow:42.a_b-c" } })
      assert.equal("order-flow:42.a_b-c", res:header("x-request-id"))
      assert.equal("order-flow:42.a_b-c", h.echo_header(h.echo(res), "x-request-id"))
    end)

    it("makes one (32 hex digits) when the client sent none or an invalid one, the same both ways", function()
      for _, more in ipairs { {}, { { "X-Request-ID", "has spaces in it" } } } do
        local res = get("/orders/1", ALICE, more)
        local id = res:header("x-request-id")
        assert.matches("^%x+$", id)
        assert.equal(32, #id)
        assert.equal(id, h.echo_header(h.echo(res), "x-request-id"))
      end
    end)

    it("echoes it on the proxy's own answers too (401, 413, 429, /health)", function()
      assert.equal("r-401", get("/users/1", nil, { { "X-Request-ID", "r-401" } }):header("x-request-id"))
      assert.equal("r-413", call("POST", "/orders", ALICE, { { "X-Request-ID", "r-413" },
        { "Content-Length", "100000" }, { "Expect", "100-continue" } }):header("x-request-id"))
      local res
      for _ = 1, 10 do
        res = get("/search", BOB, { { "X-Request-ID", "r-429" } })
        if res.status == 429 then break end
      end
      assert.equal(429, res.status)
      assert.equal("r-429", res:header("x-request-id"))
      res = get("/health", MONITOR, { { "X-Request-ID", "r-health" } })
      assert.equal("r-health", res:header("x-request-id"))
      assert.matches('"request_id":"r%-health"', res.body)
    end)

    it("is the access log's id", function()
      local res = get("/users/7", ALICE, { { "X-Request-ID", "find-me-in-the-log" } })
      local entry = h.eventually(function()
        for _, e in ipairs(proxy:access_log_entries()) do
          if e.id == "find-me-in-the-log" then return e end
        end
      end)
      assert.equal(200, res.status)
      assert.equal("users", entry.route)
      assert.equal(200, entry.status)
    end)
  end)
end)

-- The same configuration tested offline: moonproxy.testing runs the server's
-- own plugins, hooks and router on it, with no proxy and no services.
describe("examples/api_gateway.lua offline, with moonproxy.testing", function()
  local testing = require "moonproxy.testing"
  local cfg = testing.load(EXAMPLE)

  it("refuses a request without a key: 401 with WWW-Authenticate, nothing forwarded", function()
    local r = cfg:request { path = "/users/42" }
    assert.equal(401, r.status, testing.format(r))
    assert.equal('Key realm="api"', r.headers["www-authenticate"])
    assert.is_nil(r.upstream)
  end)

  it("sends /users/42 to users as /42, naming the consumer and dropping the key", function()
    local r = cfg:request { path = "/users/42?x=1", headers = { ["x-api-key"] = ALICE, ["x-consumer"] = "admin" } }
    assert.equal("users", r.upstream, testing.format(r))
    assert.equal("/42?x=1", r.target)
    assert.equal("alice", r.headers["x-consumer"]) -- the client's own value is replaced
    assert.is_nil(r.headers["x-api-key"])
  end)

  it("refuses a declared body over 64k on orders with 413", function()
    local r = cfg:request { method = "POST", path = "/orders",
      headers = { ["x-api-key"] = BOB, ["content-length"] = tostring(64 * 1024 + 1) } }
    assert.equal(413, r.status, testing.format(r))
  end)

  it("answers /health itself, for the monitor's key", function()
    local r = cfg:request { path = "/health", headers = { ["x-api-key"] = MONITOR } }
    assert.equal(200, r.status, testing.format(r))
    assert.equal("application/json", r.headers["content-type"])
    assert.equal('{"status":"ok","request_id":"' .. r.headers["x-request-id"] .. '"}\n', r.body)
  end)

  it("answers 404 to a path no route matches, once the key is valid", function()
    assert.equal(404, cfg:request({ path = "/usersfoo", headers = { ["x-api-key"] = ALICE } }).status)
  end)
end)
