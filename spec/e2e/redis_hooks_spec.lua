-- End-to-end: Redis from hooks (README "Redis") against the real binary and a
-- real redis-server (helpers/redis.lua: a free loopback port, persistence
-- off, stopped by PID): every reply type as a Lua value, pipelines, AUTH and
-- SELECT, an error reply, a wrong password, hooks waiting on a blocking
-- command while the worker serves others, a client leaving while its hook
-- waits, Redis down (nil, err at once, not a timeout per request) and a
-- restart mid-test (the client reconnects); a client by DNS name whose
-- answer moves to another server (helpers/dns.lua) or stops resolving; a
-- server at [::1]. One worker.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local rh = require "helpers.redis"
local socket = require "socket"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
local cjson = require "cjson"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, hook_timeout = 2 }
local r = proxy.redis { addr = "${redis}", password = "${password}", db = 2, timeout = 0.5, pool = 8 }
local wrong = proxy.redis { addr = "${redis}", password = "not-it", timeout = 0.5 }
local slow = proxy.redis { addr = "${redis}", password = "${password}", db = 2, timeout = 3, pool = 32 }

-- a reply as JSON text: null for nil, the error as { err = }
local function show(v, err)
  if v == nil then return cjson.encode({ error = err or cjson.null }) end
  return cjson.encode({ value = v })
end

proxy.route { path = "/types", handler = function(req)
  r:call("DEL", "s", "l", "h", "n")
  local out = {
    set = show(r:call("SET", "s", "text\0with zero")),
    get = show(r:call("GET", "s")),
    missing = show(r:call("GET", "nope")),
    incr = show(r:call("INCRBY", "n", 41)),
    push = show(r:call("RPUSH", "l", "a", "", "c")),
    list = show(r:call("LRANGE", "l", 0, -1)),
    empty = show(r:call("LRANGE", "nope", 0, -1)),
    mget = show(r:call("MGET", "s", "nope")),
    err = show(r:call("INCR", "s")),
    db = show(r:call("CLIENT", "INFO")),
  }
  return req:respond(200, cjson.encode(out))
end }
proxy.route { path = "/pipeline", handler = function(req)
  local p, err = r:pipeline { { "SET", "p", "1" }, { "INCR", "p" }, { "GET", "p" }, { "NOPE" }, { "GET", "nope" } }
  return req:respond(200, show(p, err))
end }
proxy.route { path = "/wrong", handler = function(req)
  return req:respond(200, show(wrong:call("PING")))
end }
proxy.route { path = "/incr", handler = function(req)
  local n, err = r:call("INCR", "count")
  if not n then return req:respond(503, "redis: " .. err .. "\n") end
  return req:respond(200, tostring(n) .. "\n")
end }
proxy.route { path = "/pop", handler = function(req)
  return req:respond(200, show(slow:call("BLPOP", "queue:" .. req.query, 2)))
end }
proxy.route { path = "/push", handler = function(req)
  return req:respond(200, show(r:call("RPUSH", "queue:" .. req.query, "job")))
end }
proxy.route { path = "/raw-db", handler = function(req)
  return req:respond(200, show(r:call("EXISTS", "only-in-db-2")))
end }
]=]

describe("Redis from hooks", function()
    local server, proxy

    lazy_setup(function()
        server = rh.start { password = "s3cret" }
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { redis = server.addr, password = "s3cret" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
        if server then server:stop() end
    end)

    local function json(path)
        local res = assert(raw.get(proxy.port, path, nil, { timeout = 10 }))
        assert.equal(200, res.status, res.body)
        return cjson.decode(res.body), res
    end

    -- Redis' count of clients waiting in a blocking command (BLPOP)
    local function blocked()
        local info = assert(server:cmd("INFO", "clients"))
        return tonumber(info:match("blocked_clients:(%d+)"))
    end

    -- the proxy's open client connections (GET /metrics)
    local function client_conns()
        local res = assert(proxy:admin("GET", "/metrics"))
        return tonumber(res.body:match('moonproxy_connections{state="client"} (%d+)'))
    end

    it("gives every reply type as a Lua value, in the client's db, after AUTH", function()
        local t = json("/types")
        assert.same({ value = "OK" }, cjson.decode(t.set))
        assert.same({ value = "text\0with zero" }, cjson.decode(t.get))
        assert.same({ error = cjson.null }, cjson.decode(t.missing)) -- nil, and no error
        assert.same({ value = 41 }, cjson.decode(t.incr))
        assert.same({ value = 3 }, cjson.decode(t.push))
        assert.same({ value = { "a", "", "c" } }, cjson.decode(t.list))
        assert.same({ value = {} }, cjson.decode(t.empty))
        assert.same({ value = { "text\0with zero", cjson.null } }, cjson.decode(t.mget))
        assert.matches("^ERR value is not an integer", cjson.decode(t.err).error)
        assert.matches("db=2", cjson.decode(t.db).value)
    end)

    it("runs a pipeline: one reply each, an error reply as { err = }", function()
        local t = json("/pipeline")
        local v = t.value
        assert.equal("OK", v[1])
        assert.equal(2, v[2])
        assert.equal("2", v[3])
        assert.matches("^ERR unknown command", v[4].err)
        assert.equal(cjson.null, v[5])
    end)

    it("reports a wrong password as nil, err", function()
        local t = json("/wrong")
        assert.matches("AUTH failed", t.error)
    end)

    it("waits on a blocking command without blocking the worker", function()
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        c:send(raw.build { method = "GET", target = "/pop?q1", headers = { host = "a" } })
        h.eventually(function() return blocked() == 1 end, 5)
        -- the worker answers others meanwhile, and one of them feeds the waiting hook
        assert.same({ value = 1 }, json("/push?q1"))
        local res = assert(c:read_response())
        assert.same({ value = { "queue:q1", "job" } }, cjson.decode(res.body))
    end)

    it("cancels the call of a hook whose client went away; its late reply reaches no one else", function()
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        c:send(raw.build { method = "GET", target = "/pop?q2", headers = { host = "a" } })
        h.eventually(function() return blocked() == 1 end, 5)
        c:close()
        -- the proxy saw the client go (its hook's call cancelled): no client connection is left
        h.eventually(function() return client_conns() == 0 end, 5)
        assert.equal(1, blocked())
        -- Redis still holds the abandoned BLPOP: it gets the job, and its reply is read and dropped
        assert.same({ value = 1 }, json("/push?q2"))
        -- the next BLPOP, on whichever connection, finds the queue empty: no stale reply is handed to it
        local t = json("/pop?q2")
        assert.same({ error = cjson.null }, t)
        assert.equal(200, assert(raw.get(proxy.port, "/incr")).status)
    end)

    it("fails at once while Redis is down, and reconnects once it is back", function()
        assert.equal(200, assert(raw.get(proxy.port, "/incr")).status)
        server:stop()
        local t0 = socket.gettime()
        local statuses = {}
        for i = 1, 20 do
            statuses[i] = assert(raw.get(proxy.port, "/incr", nil, { timeout = 5 })).status
        end
        local took = socket.gettime() - t0
        for i = 1, 20 do assert.equal(503, statuses[i]) end
        -- 20 requests without a 0.5 s timeout each: the reconnect delay fails them at once
        assert.is_true(took < 5, "20 requests took " .. took .. " s")
        server:restart()
        h.eventually(function()
            return assert(raw.get(proxy.port, "/incr")).status == 200
        end, 10)
        assert.is_true(proxy:alive())
    end)
end)

describe("Redis by name", function()
    local server, proxy

    lazy_setup(function()
        server = rh.start {}
        local hosts = h.write_file(h.tmpname(".hosts"), "127.0.0.1 redis.test\n")
        proxy = h.start_proxy { workers = 1, vars = { port_redis = server.port, hosts = hosts }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, resolver = { hosts = "${hosts}", nameservers = { "127.0.0.1:1" }, timeout = 0.5 } }
local r = proxy.redis { addr = "redis.test:${port_redis}", timeout = 0.5 }
local none = proxy.redis { addr = "nope.test:${port_redis}", timeout = 0.5 }
proxy.route { path = "/ping", handler = function(req)
  local v, err = r:call("PING")
  return req:respond(200, tostring(v) .. " " .. tostring(err) .. "\n")
end }
proxy.route { path = "/none", handler = function(req)
  local v, err = none:call("PING")
  return req:respond(200, tostring(v) .. " " .. tostring(err) .. "\n")
end }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
        if server then server:stop() end
    end)

    it("looks the name up on a worker's first call", function()
        for _ = 1, 3 do
            assert.equal("PONG nil\n", assert(raw.get(proxy.port, "/ping")).body)
        end
    end)

    it("gives nil, err for a name that does not resolve", function()
        assert.matches("^nil redis nope%.test:%d+: cannot resolve: ", assert(raw.get(proxy.port, "/none", nil, { timeout = 5 })).body)
    end)
end)

describe("Redis by a DNS name that moves", function()
    local dns = require "helpers.dns"
    local d, a, b, proxy

    -- connected_clients of a server's INFO clients (our own connection included)
    local function clients(server)
        local info = assert(server:cmd("INFO", "clients"))
        return tonumber(info:match("connected_clients:(%d+)"))
    end

    lazy_setup(function()
        local port = h.free_port()
        a = rh.start { host = "127.0.0.1", port = port }
        b = rh.start { host = "127.0.0.2", port = port }
        d = dns.start { ["redis.test"] = { ttl = 1, "127.0.0.1" } }
        proxy = h.start_proxy { workers = 1, log_level = "info", vars = { dns = d.addr, port_redis = port }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, resolver = { nameservers = { "${dns}" }, timeout = 0.5 } }
local r = proxy.redis { addr = "redis.test:${port_redis}", timeout = 0.5, pool = 4 }
proxy.route { path = "/incr", handler = function(req)
  local n, err = r:call("INCR", "hits")
  if not n then return req:respond(503, "redis: " .. err .. "\n") end
  return req:respond(200, tostring(n) .. "\n")
end }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, d)
        if a then a:cleanup() end
        if b then b:cleanup() end
    end)

    local function incr()
        local res = assert(raw.get(proxy.port, "/incr", nil, { timeout = 5 }))
        assert.equal(200, res.status, res.body)
    end

    it("follows the name's answer at its TTL: new calls go to the new address, idle connections to the old close", function()
        for _ = 1, 5 do incr() end
        assert.equal("5", a:cmd("GET", "hits"))
        assert.is_nil(b:cmd("GET", "hits"))
        -- the proxy's pooled connection, and ours (the GETs' connections may take a moment to go)
        h.eventually(function() return clients(a) == 2 end, 5)
        d:set { ["redis.test"] = { ttl = 1, "127.0.0.2" } }
        -- every call succeeds while the name moves (bounded: the TTL is 1 s)
        h.eventually(function()
            incr()
            return b:cmd("GET", "hits") ~= nil
        end, 10, 0.05)
        local on_a = tonumber(a:cmd("GET", "hits"))
        local on_b = tonumber(b:cmd("GET", "hits"))
        for _ = 1, 5 do incr() end
        assert.equal(on_a, tonumber(a:cmd("GET", "hits")))
        assert.equal(on_b + 5, tonumber(b:cmd("GET", "hits")))
        -- the idle connection to the old address was closed: only ours is left
        h.eventually(function() return clients(a) == 1 end, 5)
        assert.equal(1, proxy:log_count("redis redis.test:", "the name moved from 127.0.0.1:", "to 127.0.0.2:"))
    end)

    it("keeps the last good address while DNS fails, and says so once", function()
        d:set { ["redis.test"] = "silent" }
        local before = tonumber(b:cmd("GET", "hits"))
        local n = 0
        local function call()
            incr()
            n = n + 1
        end
        -- past the answer's TTL a lookup goes out, and fails (its 0.5 s timeout): calls go on meanwhile
        h.eventually(function()
            call()
            return proxy:log_count("redis redis.test:", "cannot resolve") >= 1
        end, 10, 0.05)
        -- a second failed lookup (queried, then past its timeout) is not logged again
        local q = d:queries("redis.test")
        h.eventually(function()
            call()
            return d:queries("redis.test") > q
        end, 10, 0.05)
        local t_end = socket.gettime() + 1 -- the lookup's timeout, and some
        while socket.gettime() < t_end do call() end
        assert.equal(before + n, tonumber(b:cmd("GET", "hits")))
        assert.equal(1, proxy:log_count("redis redis.test:", "cannot resolve", "calls stay on 127.0.0.2:"))
        assert.is_true(proxy:alive())
    end)
end)

describe("Redis over IPv6", function()
    local server, proxy

    lazy_setup(function()
        server = rh.start { host = "::1" } -- fails the spec if redis-server cannot bind ::1 here
        proxy = h.start_proxy { workers = 1, vars = { redis = server.addr }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local r = proxy.redis { addr = "${redis}", timeout = 0.5 }
proxy.route { path = "/incr", handler = function(req)
  local n, err = r:call("INCR", "v6")
  return req:respond(200, tostring(n) .. " " .. tostring(err) .. "\n")
end }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
        if server then server:cleanup() end
    end)

    it("calls a server at [::1]:PORT", function()
        assert.matches("^%[::1%]:%d+$", server.addr)
        assert.equal("1 nil\n", assert(raw.get(proxy.port, "/incr")).body)
        assert.equal("2 nil\n", assert(raw.get(proxy.port, "/incr")).body)
        assert.equal("2", server:cmd("GET", "v6"))
        -- the proxy's connection is an IPv6 one
        local list = assert(server:cmd("CLIENT", "LIST"))
        assert.matches("addr=%[?::1%]?:%d+", list)
    end)

    it("names the IPv6 address in its errors", function()
        server:stop()
        assert.matches("^nil redis %[::1%]:%d+: ", assert(raw.get(proxy.port, "/incr", nil, { timeout = 5 })).body)
    end)
end)
