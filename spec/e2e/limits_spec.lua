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
