-- End-to-end: retries (SPEC "Balancers", README "Failures"). A retry goes to
-- another server: any method when connecting failed (nothing was sent); only
-- idempotent methods (GET HEAD OPTIONS PUT DELETE) when the connection broke
-- before any response byte and the body is still whole; never once a
-- response byte arrived. Retries after a broken exchange are budgeted
-- (`retry_budget`, 20% of the requests of the last 10 s, at least 10);
-- retries after a failed connect are not.
--
-- The origins' failure modes (helpers/origin.lua /_mode) decide who breaks;
-- the upstreams here keep no idle connections (keepalive = 0) so that every
-- attempt is a new connection (an idempotent request broken on a reused
-- pooled connection is first sent again to the same server on a new one,
-- README "Failures"), and but for "lonely" never eject a server
-- (passive.failures = 0). Modes go back to "ok" after each spec.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", max_body_size = "4m" }

local function up(name, t)
  t.servers = t.servers or { "${a}", "${b}" }
  t.keepalive = 0
  t.passive = t.passive or { failures = 0 }
  t.timeouts = { connect = 0.5, send = 5, read = 5 }
  proxy.route { prefix = "/" .. name .. "/", strip_prefix = true, upstream = proxy.upstream(name, t) }
end

up("pair", {})
up("refused", { servers = { "${dead}", "${a}" } })
up("hole", { servers = { "${hole}", "${a}" } })
up("once", { retries = 0 })
up("three", { servers = { "${a}", "${b}", "${c}" }, retries = 2 })
up("budget", {})
up("lonely", { passive = { failures = 2, cooldown = 60 } })
up("budget2", { servers = { "${a}", "${dead}" } })
]=]

describe("moonproxy retries", function()
    local a, b, c, proxy, dead
    -- A black hole: a listening socket that never accepts, its accept queue
    -- full, so that connecting to it times out (the SYN is dropped).
    local hole, hole_addr, fillers = nil, nil, {}

    lazy_setup(function()
        a, b, c = h.start_origin("a"), h.start_origin("b"), h.start_origin("c")
        dead = "127.0.0.1:" .. h.free_port()
        hole = assert(socket.bind("127.0.0.1", 0, 1))
        local _, hport = hole:getsockname()
        hole_addr = "127.0.0.1:" .. hport
        for i = 1, 3 do
            fillers[i] = socket.tcp()
            fillers[i]:settimeout(0.2)
            fillers[i]:connect("127.0.0.1", hport)
        end
        proxy = h.start_proxy { workers = 1, config = CONFIG,
            vars = { a = a.addr, b = b.addr, c = c.addr, dead = dead, hole = hole_addr } }
    end)

    lazy_teardown(function()
        for _, f in ipairs(fillers) do f:close() end
        if hole then hole:close() end
        h.shutdown(proxy, a, b, c)
    end)

    after_each(function()
        for _, o in ipairs { a, b, c } do pcall(o.mode, o, "ok", "follow") end
    end)

    local function counts()
        return { a = a:stats().requests, b = b:stats().requests, c = c:stats().requests }
    end

    local function delta(before)
        local now = counts()
        return { a = now.a - before.a, b = now.b - before.b, c = now.c - before.c }
    end

    local function request(method, target, body, headers)
        return raw.request(proxy.port, { method = method, target = target, body = body, headers = headers },
            { timeout = 10, method = method == "HEAD" and "HEAD" or nil })
    end

    -- Sends method to /pair/ (a resets, b answers) until a round robin pick
    -- starts at a (at most 3 tries); returns that response and the origins'
    -- request counts for it.
    local function via_a_then_b(method, body)
        for i = 1, 3 do
            local before = counts()
            local res, err = request(method, "/pair/r?i=" .. i, body)
            local d = delta(before)
            if d.a > 0 then return res, d, err end
        end
        error("round robin never started at a")
    end

    describe("after the connection broke before any response byte", function()
        it("do not retry a POST: 502, and exactly one server saw it", function()
            a:mode("reset")
            b:mode("reset")
            local before = counts()
            local res = assert(request("POST", "/pair/p", "once only"))
            assert.equal(502, res.status)
            local d = delta(before)
            assert.equal(1, d.a + d.b, "a saw " .. d.a .. ", b saw " .. d.b)
        end)

        it("do not retry a PATCH either", function()
            a:mode("reset")
            b:mode("reset")
            local before = counts()
            assert.equal(502, assert(request("PATCH", "/pair/p", "once only")).status)
            local d = delta(before)
            assert.equal(1, d.a + d.b)
        end)

        it("retry a GET on the other server: the client sees its answer, each server saw it once", function()
            a:mode("reset")
            local res, d, err = via_a_then_b("GET")
            assert(res, "no response: " .. tostring(err))
            assert.equal(200, res.status)
            assert.equal("b", res:header("x-origin"))
            assert.same({ a = 1, b = 1, c = 0 }, d)
            local id = res:header("x-request-id")
            local entry = h.eventually(function()
                for _, e in ipairs(proxy:access_log_entries()) do
                    if e.id == id then return e end
                end
            end, 3)
            assert.same({ 200, b.addr }, { entry.status, entry.upstream })
        end)

        it("retry HEAD, OPTIONS, PUT and DELETE the same way, with the body replayed whole", function()
            a:mode("reset")
            local body = origin.pattern(2000)
            for _, m in ipairs { "HEAD", "OPTIONS", "PUT", "DELETE" } do
                local res, d, err = via_a_then_b(m, (m == "PUT" or m == "DELETE") and body or nil)
                assert(res, m .. ": no response: " .. tostring(err))
                assert.equal(200, res.status, m)
                assert.equal("b", res:header("x-origin"), m)
                assert.same({ a = 1, b = 1, c = 0 }, d, m)
                if m == "PUT" or m == "DELETE" then
                    local e = h.echo(res)
                    assert.same({ m, 2000, origin.checksum(body) }, { e.method, e.body_len, e.body_sum })
                end
            end
        end)

        it("retry a PUT whose small body (20 KB, the buffers hold 32 KB) arrived in two pieces", function()
            a:mode("reset")
            local body = origin.pattern(20000)
            local head = "PUT /pair/two HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
            for _ = 1, 3 do
                local before = counts()
                local conn = assert(raw.connect(proxy.port, { timeout = 10 }))
                assert(conn:send_pieces({ head .. body:sub(1, 8000), body:sub(8001) }, 0.05))
                local res, err = conn:read_response { timeout = 5 }
                conn:close()
                local d = delta(before)
                if d.a > 0 then
                    assert(res, "no response: " .. tostring(err))
                    assert.equal(200, res.status, "not retried: the body was no longer replayable")
                    local e = h.echo(res)
                    assert.same({ "b", 20000, origin.checksum(body) }, { e.name, e.body_len, e.body_sum })
                    assert.same({ a = 1, b = 1, c = 0 }, d)
                    return
                end
            end
            error("round robin never started at a")
        end)

        it("do not retry a PUT whose body was already streamed out of the buffer", function()
            a:mode("reset")
            b:mode("reset")
            local before = counts()
            local res = assert(request("PUT", "/pair/big", origin.pattern(2 * 1024 * 1024)))
            assert.equal(502, res.status)
            local d = delta(before)
            assert.equal(1, d.a + d.b, "a saw " .. d.a .. ", b saw " .. d.b)
        end)

        it("do not retry on the same server when the other one is ejected", function()
            b:mode("503")
            for i = 1, 6 do
                request("GET", "/lonely/e?i=" .. i)
                if proxy:server_state("lonely", b.addr).circuit == "open" then break end
            end
            assert.equal("open", proxy:server_state("lonely", b.addr).circuit)
            b:mode("ok")
            a:mode("reset")
            local before = counts()
            local res = assert(request("GET", "/lonely/x"))
            local d = delta(before)
            assert.same({ a = 1, b = 0, c = 0 }, d, "a got the request " .. d.a .. " times")
            assert.equal(502, res.status)
        end)

        it("retry `retries` times at most, each time on another server", function()
            a:mode("reset")
            b:mode("reset")
            c:mode("reset")
            local before = counts()
            assert.equal(502, assert(request("GET", "/three/x")).status)
            assert.same({ a = 1, b = 1, c = 1 }, delta(before))
        end)

        it("never retry with retries = 0", function()
            a:mode("reset")
            b:mode("reset")
            local before = counts()
            assert.equal(502, assert(request("GET", "/once/x")).status)
            local d = delta(before)
            assert.equal(1, d.a + d.b)
        end)
    end)

    describe("after connecting failed", function()
        it("retry any method on another server, with the body whole", function()
            local body = origin.pattern(200000)
            local lines0 = proxy:log_count("upstream refused server " .. dead)
            for i, m in ipairs { "POST", "PATCH", "POST", "PATCH" } do
                local res = assert(request(m, "/refused/x?i=" .. i, body))
                local e = h.echo(res)
                assert.same({ "a", m, 200000, origin.checksum(body) }, { e.name, e.method, e.body_len, e.body_sum })
            end
            local refused = proxy:log_count("upstream refused server " .. dead) - lines0
            assert.is_true(refused >= 1, "the dead server was never tried first")
        end)
    end)

    describe("after connecting timed out", function()
        it("retry any method on another server", function()
            local slow = 0
            for i = 1, 3 do
                local t0 = socket.gettime()
                local e = h.echo(request("POST", "/hole/x?i=" .. i, "payload"))
                if socket.gettime() - t0 >= 0.45 then slow = slow + 1 end
                assert.same({ "a", "POST", 7 }, { e.name, e.method, e.body_len })
            end
            assert.is_true(slow >= 1, "the black hole was never tried first")
            assert.is_true(proxy:log_count("upstream hole server " .. hole_addr, "timed out") >= 1)
        end)
    end)

    describe("once a response byte arrived", function()
        it("never retry: the client gets the cut response, not another one", function()
            a:mode("partial")
            b:mode("partial")
            local before = counts()
            local conn = assert(raw.connect(proxy.port, { timeout = 10 }))
            assert(conn:send(raw.build { target = "/pair/cut" }))
            local res, err, partial = conn:read_response { timeout = 5 }
            conn:close()
            assert.is_nil(res, "a complete response: " .. tostring(res and res.status))
            assert.truthy(err == "closed" or tostring(err):find("reset"), tostring(err))
            assert.equal(200, partial and partial.status)
            local d = delta(before)
            assert.equal(1, d.a + d.b, "a saw " .. d.a .. ", b saw " .. d.b)
        end)
    end)

    describe("the retry budget", function()
        it("stops retrying broken GETs beyond 20% of the requests (at least 10 retries)", function()
            a:mode("reset")
            b:mode("reset")
            local N = 100
            local before = counts()
            local results, tally = h.load(proxy.port, { total = N, concurrency = 4,
                request = function(i) return { target = "/budget/x?i=" .. i } end })
            assert.same({ ["status 502"] = N }, tally)
            local d = delta(before)
            local retries = d.a + d.b - N
            assert(retries >= 10, "only " .. retries .. " retries: the first 10 of a window are always allowed")
            assert(retries <= 0.2 * N + 10, retries .. " retries for " .. N .. " requests")
            assert.is_true(proxy:log_count("upstream budget:", "retry budget exhausted") >= 1)
            assert(results[N])
        end)

        it("does not count retries after a failed connect: they still happen once it is spent", function()
            -- spend budget2's budget: a resets GETs (a retry from a goes to the dead
            -- server, and fails there too)
            a:mode("reset")
            h.load(proxy.port, { total = 100, concurrency = 4,
                request = function(i) return { target = "/budget2/x?i=" .. i } end })
            assert.is_true(proxy:log_count("upstream budget2:", "retry budget exhausted") >= 1)
            a:mode("ok")
            local lines0 = proxy:log_count("upstream budget2 server " .. dead)
            for i = 1, 8 do
                local e = h.echo(request("POST", "/budget2/p?i=" .. i, "payload"))
                assert.same({ "a", 7 }, { e.name, e.body_len })
            end
            assert.is_true(proxy:log_count("upstream budget2 server " .. dead) - lines0 >= 3,
                "the dead server was not tried first often enough")
        end)
    end)

    describe("afterwards", function()
        it("every server's in-flight count is back to 0", function()
            proxy:wait_all_idle()
        end)
    end)
end)
