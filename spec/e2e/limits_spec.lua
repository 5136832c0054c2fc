-- End-to-end: the proxy at its limits. At max_connections the oldest idle
-- keep-alive connection makes room for a new client; out of file
-- descriptors (a lowered RLIMIT_NOFILE), accepting pauses instead of
-- spinning, the admin port still answers, and the proxy's own failure to
-- open an upstream socket is not held against the server.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local socket = require "socket"

local IDLE = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, max_connections = 20, keepalive_timeout = 30, shutdown_timeout = 1 }
proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
]=]

describe("max_connections with idle keep-alive connections (-w 1)", function()
    local a, proxy
    local conns = {}

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = IDLE, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        for _, c in pairs(conns) do c:close() end
        h.shutdown(proxy, a)
    end)

    it("closes the oldest idle connection so that a new client is served at once", function()
        for i = 1, 20 do -- one request each, in order: conns[1] has idled longest
            conns[i] = assert(raw.connect(proxy.port, { timeout = 5 }))
            local res = assert(conns[i]:request { target = "/idle-" .. i }, "request " .. i)
            assert.equal(200, res.status)
        end
        local t0 = socket.gettime()
        local res = assert(raw.get(proxy.port, "/newcomer", nil, { timeout = 3 }))
        assert.equal(200, res.status)
        assert.is_true(socket.gettime() - t0 < 2, "served after " .. (socket.gettime() - t0) .. " s")
        assert.is_true(conns[1]:wait_closed(2), "the oldest idle connection was not closed")
        assert.is_false((conns[2]:wait_closed(0.2)))
        local again = assert(conns[20]:request { target = "/still-open" })
        assert.equal(200, again.status)
    end)

    it("keeps doing so for every new client (each takes the then-oldest idle slot)", function()
        -- the newcomer above closed: one slot is free, the next four take idle ones
        for k = 1, 5 do
            local c = assert(raw.connect(proxy.port, { timeout = 3 }))
            local res = assert(c:request { target = "/more-" .. k })
            assert.equal(200, res.status)
            conns[#conns + 1] = c -- stays idle: the cap is reached again
        end
        for i = 2, 5 do
            assert.is_true(conns[i]:wait_closed(2), "connection " .. i .. " was not reclaimed")
        end
        assert.is_false((conns[6]:wait_closed(0.2)))
    end)
end)

-- The worker blocks in a hook while the oldest idle connection's next request
-- and then a newcomer arrive: when it comes back, it accepts first (epoll
-- reports them in that order, libev runs the later one first) and must not
-- close a connection whose request is already in the kernel (close with
-- unread bytes sends a RST).
local BUSY = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, max_connections = 3, keepalive_timeout = 30, hook_timeout = 10,
  shutdown_timeout = 1 }
local ffi = require "ffi"
pcall(ffi.cdef, "int poll(void *fds, unsigned long nfds, int timeout);")
proxy.route { path = "/block", handler = function(req)
  local f = io.open("${marker}", "w") -- the spec waits for it: the worker is in the hook
  if f then f:close() end
  ffi.C.poll(nil, 0, 600)
  return req:respond(200, "late")
end }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "ok " .. req.path) end }
]=]

describe("max_connections and an idle connection whose request is unread (-w 1)", function()
    local proxy, marker

    lazy_setup(function()
        marker = h.tmpname(".blocked")
        os.remove(marker)
        proxy = h.start_proxy { workers = 1, config = BUSY, vars = { marker = marker } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
        os.remove(marker)
    end)

    it("skips it and closes the next oldest idle one", function()
        local c1 = assert(raw.connect(proxy.port, { timeout = 5 }))
        local c2 = assert(raw.connect(proxy.port, { timeout = 5 }))
        local c3 = assert(raw.connect(proxy.port, { timeout = 5 }))
        local new
        finally(function() c1:close(); c2:close(); c3:close(); if new then new:close() end end)
        assert.equal(200, assert(c1:request { target = "/one" }).status)
        assert.equal(200, assert(c2:request { target = "/two" }).status)
        -- c3 was accepted before: the worker blocks with no accept of its own pending
        assert.equal(200, assert(c3:request { target = "/three" }).status)
        assert(c3:send("GET /block HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function() -- the worker is in the hook
            local f = io.open(marker)
            return f and f:close()
        end, 5)
        assert(c1:send("GET /again HTTP/1.1\r\nHost: x\r\n\r\n"))
        socket.sleep(0.05) -- ordering only: c1's bytes are queued before the newcomer connects
        new = assert(raw.connect(proxy.port, { timeout = 5 }))
        assert(new:send("GET /new HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert.equal(200, assert(c3:read_response { timeout = 5 }).status)
        local res, err = c1:read_response { timeout = 5 }
        assert.equal(200, res and res.status, "the oldest connection lost its request: " .. tostring(err))
        assert.equal("ok /again", res.body)
        assert.equal(200, assert(new:read_response { timeout = 5 }).status)
        assert.is_true(c2:wait_closed(2), "the next oldest idle connection was not closed")
    end)
end)

local FEW_FDS = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, max_connections = 1000, client_header_timeout = 30, shutdown_timeout = 1 }
proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
]=]

local NOFILE = 64

-- How many lines text has.
local function count_lines(text) return #h.lines_with(text, "") end

describe("out of file descriptors (RLIMIT_NOFILE " .. NOFILE .. ", -w 1)", function()
    local a, proxy
    local held = {}

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, nofile = NOFILE, config = FEW_FDS, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        for _, c in pairs(held) do c:close() end
        h.shutdown(proxy, a)
    end)

    it("warns once at start that the limit is below what max_connections needs", function()
        assert.equal(1, proxy:log_count("RLIMIT_NOFILE is " .. NOFILE))
    end)

    it("pauses accepting instead of spinning, and the admin port still answers", function()
        -- more clients than descriptors, each holding an unfinished head
        for i = 1, NOFILE + 16 do
            local c = assert(raw.connect(proxy.port, { timeout = 2 }))
            held[i] = c
            assert(c:send("GET /held-" .. i .. " HTTP/1.1\r\nHost: x\r\n"))
        end
        h.eventually(function()
            local log = proxy:stderr()
            return log:find("Too many open files", 1, true) or log:find("nearly exhausted", 1, true)
        end, 5)
        local lines0 = count_lines(proxy:stderr())
        local share = h.cpu_share(proxy.pid, 1.5)
        local lines = count_lines(proxy:stderr()) - lines0
        assert.is_true(share < 0.2, string.format("%.0f%% of a core while out of descriptors", share * 100))
        assert.is_true(lines <= 6, lines .. " log lines in 1.5 s:\n" .. proxy:stderr():sub(-1500))
        local live = assert(proxy:admin("GET", "/live"))
        assert.equal(200, live.status)
        local up = assert(proxy:admin("GET", "/upstreams"))
        assert.equal(200, up.status)
    end)

    it("serves again once the connections close", function()
        for i, c in pairs(held) do
            c:close()
            held[i] = nil
        end
        h.eventually(function()
            local res = raw.get(proxy.port, "/again", nil, { timeout = 1 })
            return res and res.status == 200
        end, 5)
    end)
end)

local UPSTREAM_EMFILE = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, shutdown_timeout = 1 }
local a = proxy.upstream "a" { servers = { "${a}" }, passive = { failures = 5, cooldown = 30 },
  health = { path = "/health", interval = 0.1, timeout = 0.5, rise = 5, fall = 1 } }
local ffi = require "ffi"
pcall(ffi.cdef, "int dup(int fd); int close(int fd);")
local held = {}
-- takes every free descriptor, so that the proxy cannot open an upstream socket
proxy.route { path = "/exhaust", upstream = a, on_request = function(req)
  for _ = 1, 4096 do
    local fd = ffi.C.dup(2)
    if fd < 0 then break end
    held[#held + 1] = fd
  end
end }
proxy.route { path = "/hold", handler = function(req)
  for _ = 1, 4096 do
    local fd = ffi.C.dup(2)
    if fd < 0 then break end
    held[#held + 1] = fd
  end
  return req:respond(200, "holding " .. #held)
end }
proxy.route { path = "/release", handler = function(req)
  for i = #held, 1, -1 do ffi.C.close(held[i]); held[i] = nil end
  return req:respond(200, "released " .. collectgarbage("count"))
end }
-- two servers: the policy takes every free descriptor before it picks the
-- first, and gives them back when it is asked again (for a retry)
local phase = 0
proxy.route { path = "/two", upstream = proxy.upstream "two" { servers = { "${a}", "${b}" },
  passive = { failures = 1, cooldown = 30 }, balancer = function(servers)
    if phase == 0 then
      phase = 1
      for _ = 1, 4096 do
        local fd = ffi.C.dup(2)
        if fd < 0 then break end
        held[#held + 1] = fd
      end
      for _, s in ipairs(servers) do if s.addr == "${a}" then return s end end
    end
    phase = 0
    for i = #held, 1, -1 do ffi.C.close(held[i]); held[i] = nil end
    return servers[1]
  end } }
proxy.route { path = "/reset", handler = function(req)
  phase = 0
  for i = #held, 1, -1 do ffi.C.close(held[i]); held[i] = nil end
  return req:respond(200, "reset")
end }
proxy.route { prefix = "/", upstream = a }
]=]

describe("the proxy's own EMFILE opening an upstream socket (-w 1)", function()
    local a, b, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        proxy = h.start_proxy { workers = 1, nofile = NOFILE, config = UPSTREAM_EMFILE,
            vars = { a = a.addr, b = b.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    it("answers 503 and does not count it against the server", function()
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        finally(function() c:close() end)
        for i = 1, 7 do
            local res = assert(c:request { target = "/exhaust" }, "round " .. i)
            assert.equal(503, res.status)
            local rel = assert(c:request { target = "/release" })
            assert.equal(200, rel.status)
        end
        local s = proxy:server_state("a", a.addr)
        assert.is_true(s.healthy, "the server was ejected")
        assert.equal(0, s.failures)
        assert.equal(1, proxy:log_count("Too many open files", "not counted against the server"))
        local res = assert(c:request { target = "/served" })
        assert.equal(200, res.status)
    end)

    it("skips a health probe it cannot open a socket for instead of failing the server", function()
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        finally(function() c:close() end)
        h.eventually(function() return proxy:server_state("a", a.addr).probe_up end, 5)
        local before = proxy:log_count("cannot probe upstream a")
        local down0 = proxy:log_count("upstream a server", "is down")
        assert.equal(200, assert(c:request { target = "/hold" }).status)
        -- a descriptor the proxy closes late (an admin connection of the
        -- scrape above) would let a probe through: each round takes it again
        local ok = pcall(h.eventually, function()
            assert.equal(200, assert(c:request { target = "/hold" }).status)
            return proxy:log_count("cannot probe upstream a") > before or proxy:log_count("upstream a server", "is down") > down0
        end, 5)
        assert.equal(200, assert(c:request { target = "/release" }).status)
        assert.is_true(ok, "no probe ran while the descriptors were taken")
        local s = proxy:server_state("a", a.addr)
        assert.is_true(s.probe_up, "a probe that could not open its socket marked the server down")
        assert.equal(down0, proxy:log_count("upstream a server", "is down"))
    end)

    it("tries another server, not blaming the first, when a second one is there", function()
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        finally(function() c:close() end)
        for i = 1, 3 do
            local res = assert(c:request { target = "/two" }, "round " .. i)
            local reset = assert(c:request { target = "/reset" }) -- the descriptors back whatever happened
            assert.equal(200, reset.status)
            assert.equal(200, res.status, "round " .. i)
            assert.equal("b", h.echo(res).name)
        end
        local s = proxy:server_state("two", a.addr)
        assert.is_true(s.healthy, "the first server was ejected")
        assert.equal(0, s.failures) -- (the log line is rate-limited: the test above may have used this second's)
    end)
end)
