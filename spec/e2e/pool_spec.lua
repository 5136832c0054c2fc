-- End-to-end: upstream keep-alive pools: reuse, connections the origin closed,
-- and cancellation of an upstream request when its client goes away.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8, keepalive_timeout = 60 }
local idle = proxy.upstream "idle" { servers = { "${idle}" }, keepalive = 8, keepalive_timeout = 60 }
proxy.route { prefix = "/idle/", strip_prefix = true, upstream = idle }
proxy.route { prefix = "/", upstream = a }
]=]

describe("moonproxy upstream pool", function()
    local a, idle, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        idle = h.start_origin("idle", { idle = 0.5 }) -- closes connections idle for 0.5 s
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr, idle = idle.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, idle)
    end)

    local function post(target, body)
        return h.echo(raw.request(proxy.port, { method = "POST", target = target, body = body }))
    end

    it("reuses pooled upstream connections for 50 requests from new client connections", function()
        local before = a:stats()
        for i = 1, 50 do
            assert.equal("/seq?i=" .. i, h.echo(raw.get(proxy.port, "/seq?i=" .. i)).target)
        end
        local after = a:stats()
        assert.equal(before.requests + 50, after.requests)
        assert.is_true(after.connections - before.connections <= 3,
            "new upstream connections: " .. (after.connections - before.connections))
    end)

    it("does not reuse a connection the origin closed with Connection: close", function()
        assert.equal(200, assert(raw.get(proxy.port, "/close")).status)
        local e = post("/after-close", "payload")
        assert.equal(origin.checksum("payload"), e.body_sum)
    end)

    it("does not reuse a pooled connection the origin closed while idle", function()
        assert.equal(200, assert(raw.get(proxy.port, "/idle/first")).status)
        h.eventually(function() return idle:stats().open == 0 end, 5)
        local e = post("/idle/second", "payload")
        assert.equal("/second", e.target)
        assert.equal(origin.checksum("payload"), e.body_sum)
        assert.equal(1, e.conn_req)
    end)

    it("closes the upstream connection when the client goes away, and does not pool it", function()
        local before = a:stats()
        local c = assert(raw.connect(proxy.port))
        assert(c:send("GET /hang HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function() return a:stats().requests == before.requests + 1 end, 5)
        c:close()
        h.eventually(function() return a:stats().closed_by_peer == before.closed_by_peer + 1 end, 5)
        local e = h.echo(raw.get(proxy.port, "/after-hang"))
        assert.equal("/after-hang", e.target)
        assert.equal(before.closed_by_peer + 1, a:stats().closed_by_peer)
    end)

    it("cancels a download when the client goes away", function()
        local before = a:stats()
        local c = assert(raw.connect(proxy.port))
        assert(c:send("GET /big?size=" .. 200 * 1024 * 1024 .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function()
            c:fill(socket.gettime() + 0.05)
            return #c.buf >= 1024 * 1024
        end, 5)
        c:close()
        h.eventually(function() return a:stats().closed_by_peer == before.closed_by_peer + 1 end, 5)
        assert.equal(200, assert(raw.get(proxy.port, "/after-cancel")).status)
    end)
end)
