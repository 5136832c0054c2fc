-- End-to-end: server health (SPEC "Balancers", "Admin port"). Passive checks:
-- consecutive failures (failure statuses, connect errors, timeouts) eject a
-- server for `cooldown`, then one trial request decides; GET /upstreams
-- shows the circuit and the counters. Active checks: `fall` failed probes
-- take a server out of rotation, `rise` good ones bring it back. No server
-- available: 503 with Retry-After, unless fail_open. With two workers the
-- state is the process's, not a worker's.
--
-- Every spec uses its own upstream (the state is per upstream and server) and
-- puts the origins' failure modes back to "ok" through defer() (run by an
-- after_each: busted keeps only one `finally` per spec). Origins a and b
-- take traffic; p and q are only behind the actively checked upstreams.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local cleanups = {}
local function defer(fn) cleanups[#cleanups + 1] = fn end
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }

local function up(name, t)
  t.servers = t.servers or { "${a}", "${b}" }
  t.keepalive = t.keepalive or 0
  proxy.route { prefix = "/" .. name .. "/", strip_prefix = true, upstream = proxy.upstream(name, t) }
end

up("eject",   { passive = { failures = 3, cooldown = 60 } })
up("consec",  { passive = { failures = 3, cooldown = 60 } })
up("state",   { passive = { failures = 2, cooldown = 60 } })
up("recover", { passive = { failures = 2, cooldown = 1 } })
up("refail",  { passive = { failures = 2, cooldown = 1 } })
up("onetrial", { passive = { failures = 2, cooldown = 1 } })
up("refused", { servers = { "${dead}", "${a}" }, passive = { failures = 2, cooldown = 60 }, timeouts = { connect = 1 } })
up("timeout", { passive = { failures = 2, cooldown = 60 }, retries = 0, timeouts = { connect = 1, send = 2, read = 0.3 } })
up("statuses", { passive = { failures = 2, cooldown = 60, statuses = { 500 } } })
up("never",   { passive = { failures = 0 } })
up("alldown", { passive = { failures = 1, cooldown = 5 } })
up("failopen", { passive = { failures = 1, cooldown = 60 }, fail_open = true })
up("keep",    { passive = { failures = 2, cooldown = 60 } })
up("gone",    { passive = { failures = 2, cooldown = 1 } })

-- generous probe timeouts: a loaded machine must not mark a good server down
local checks = { path = "/health", interval = 0.2, timeout = 2, rise = 2, fall = 3 }
up("active",  { servers = { "${p}", "${q}" }, health = checks, passive = { failures = 0 } })
up("actdown", { servers = { "${p}", "${q}" }, health = checks, passive = { failures = 0 } })
up("actkeep", { servers = { "${p}", "${q}" }, health = { path = "/health", interval = 0.2, timeout = 2, rise = 2, fall = 2 },
  passive = { failures = 0 } })
up("acttmo", { servers = { "${p}", "${q}" }, health = { path = "/health", interval = 0.2, timeout = 0.3, rise = 2, fall = 2 },
  passive = { failures = 0 } })
]=]

-- Two workers, one upstream: the passive state must be the process's.
local CONFIG_W2 = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
proxy.route { prefix = "/w2/", strip_prefix = true, upstream = proxy.upstream "w2" {
  servers = { "${a}", "${b}" }, keepalive = 0, passive = { failures = 3, cooldown = 60 } } }
]=]

describe("moonproxy health", function()
    local a, b, p, q, proxy, dead

    lazy_setup(function()
        a, b = h.start_origin("a"), h.start_origin("b")
        p, q = h.start_origin("p"), h.start_origin("q")
        dead = "127.0.0.1:" .. h.free_port()
        proxy = h.start_proxy { workers = 1, config = CONFIG,
            vars = { a = a.addr, b = b.addr, p = p.addr, q = q.addr, dead = dead } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b, p, q)
    end)

    -- Cleanups of the current spec, run after it whatever happened (latest first).
    after_each(function()
        for i = #cleanups, 1, -1 do pcall(cleanups[i]) end
        cleanups = {}
    end)

    local function get(target, headers, port)
        return assert(raw.get(port or proxy.port, target, headers, { timeout = 10 }))
    end

    -- origin's mode for the rest of the spec, back to ok afterwards
    local function mode(o, m, health)
        o:mode(m, health)
        defer(function() o:mode("ok", "follow") end)
    end

    local function state(up, o)
        return assert(proxy:server_state(up, type(o) == "string" and o or o.addr))
    end

    -- Requests to /up/x until the server's circuit is open (at most n).
    local function until_open(up, o, n)
        for _ = 1, n do
            get("/" .. up .. "/x")
            if state(up, o).circuit == "open" then return end
        end
        error(up .. ": " .. tostring(o.name or o) .. " not ejected after " .. n .. " requests")
    end

    describe("passive", function()
        it("ejects a server after `failures` consecutive 503s, and only the other one gets requests", function()
            mode(a, "503")
            local before = a:path_count("/x")
            local statuses, origins = {}, {}
            for i = 1, 16 do
                local res = get("/eject/x?i=" .. i)
                statuses[#statuses + 1] = res.status
                origins[#origins + 1] = res:header("x-origin")
            end
            assert.equal(3, a:path_count("/x") - before,
                "a got other than `failures` requests: " .. table.concat(origins, " "))
            local n503 = 0
            for i, s in ipairs(statuses) do
                if s == 503 then n503 = n503 + 1 else assert.equal("b", origins[i]) end
            end
            assert.equal(3, n503)
            for i = 7, 16 do assert.equal("b", origins[i], "request " .. i .. " went to " .. origins[i]) end
            -- logged once, with the reason
            local lines = h.lines_with(proxy:stderr(), "upstream eject ", a.addr, "ejected")
            assert.equal(1, #lines, table.concat(lines, "\n"))
            assert.truthy(lines[1]:find("503", 1, true), lines[1])
        end)

        it("counts consecutive failures only: a success in between resets the count", function()
            -- -w 1 round robin over a fresh upstream: a, b, a, b...; a answers 503 503 200 503 503 200
            local seq = { "503", "503", "ok", "503", "503", "ok" }
            local got = {}
            for i, m in ipairs(seq) do
                a:mode(m)
                defer(function() a:mode("ok") end)
                local r1 = get("/consec/x?i=" .. i)
                local r2 = get("/consec/y?i=" .. i)
                got[i] = (r1:header("x-origin") or "-") .. (r2:header("x-origin") or "-")
            end
            assert.same({ "ab", "ab", "ab", "ab", "ab", "ab" }, got)
            local sa = state("consec", a)
            assert.same({ "closed", 4, 0 }, { sa.circuit, sa.failed, sa.failures })
        end)

        it("shows the open circuit and the counters in GET /upstreams", function()
            mode(a, "503")
            until_open("state", a, 8)
            local doc = proxy:upstreams()
            local u = assert(doc.state, "no upstream 'state'")
            assert.equal("round_robin", u.balancer)
            local sa, sb = state("state", a), state("state", b)
            assert.same({ healthy = false, probe_up = true, circuit = "open" },
                { healthy = sa.healthy, probe_up = sa.probe_up, circuit = sa.circuit })
            assert.equal(2, sa.failures)
            assert.equal(2, sa.failed)
            assert.equal(2, sa.requests)
            assert.equal(0, sa.active)
            assert.equal(1, sa.weight)
            assert.equal("number", type(sa.latency_ms))
            assert.same({ healthy = true, probe_up = true, circuit = "closed", failures = 0, failed = 0 },
                { healthy = sb.healthy, probe_up = sb.probe_up, circuit = sb.circuit, failures = sb.failures,
                  failed = sb.failed })
            assert.is_true(sb.requests >= 1)
        end)

        it("after the cooldown, one successful trial puts the server back in rotation", function()
            mode(a, "503")
            until_open("recover", a, 8)
            a:mode("ok")
            h.eventually(function() return state("recover", a).circuit == "half-open" end, 3)
            local origins = {}
            for i = 1, 8 do origins[i] = get("/recover/x?i=" .. i):header("x-origin") end
            local na = 0
            for _, o in ipairs(origins) do if o == "a" then na = na + 1 end end
            assert.is_true(na >= 3, "a got " .. na .. " of 8 after its trial: " .. table.concat(origins, " "))
            local sa = state("recover", a)
            assert.same({ "closed", true, 0 }, { sa.circuit, sa.healthy, sa.failures })
            assert.equal(1, #h.lines_with(proxy:stderr(), "upstream recover ", a.addr, "back in rotation"))
        end)

        it("after the cooldown, a failed trial ejects the server again", function()
            mode(a, "503")
            until_open("refail", a, 8)
            local before = a:path_count("/x")
            h.eventually(function() return state("refail", a).circuit == "half-open" end, 3)
            local origins = {}
            for i = 1, 10 do origins[i] = get("/refail/x?i=" .. i):header("x-origin") end
            assert.equal(before + 1, a:path_count("/x"), "a's trials: " .. table.concat(origins, " "))
            assert.equal("open", state("refail", a).circuit)
            local lines = h.lines_with(proxy:stderr(), "upstream refail ", a.addr, "trial request failed")
            assert.equal(1, #lines, table.concat(lines, "\n"))
        end)

        it("sends one trial at a time while half-open; the others go to the healthy server", function()
            mode(a, "503")
            until_open("onetrial", a, 8)
            a:mode("slow:1500")
            h.eventually(function() return state("onetrial", a).circuit == "half-open" end, 3)
            local before = a:path_count("/t")
            -- requests on their own connections until one is held by a (the trial)
            local held
            for i = 1, 3 do
                local conn = assert(raw.connect(proxy.port, { timeout = 10 }))
                defer(function() conn:close() end)
                assert(conn:send(raw.build { target = "/onetrial/t?i=" .. i }))
                local res = conn:read_response { timeout = 0.5 }
                if not res then
                    held = conn
                    break
                end
                assert.equal("b", res:header("x-origin"))
            end
            assert(held, "no request was sent to a as its trial")
            assert.equal(before + 1, a:path_count("/t"))
            local sa = state("onetrial", a)
            assert.same({ "half-open", 1 }, { sa.circuit, sa.active })
            -- meanwhile, everything goes to b
            local _, counts = h.load(proxy.port, { total = 40, concurrency = 4,
                request = function(i) return { target = "/onetrial/t?load=" .. i } end })
            assert.same({ b = 40 }, counts)
            assert.equal(before + 1, a:path_count("/t"))
            local res = assert(held:read_response { timeout = 5 })
            assert.equal("a", res:header("x-origin"))
            assert.equal("closed", state("onetrial", a).circuit)
        end)

        it("gives another trial when the client of the trial went away", function()
            mode(a, "503")
            until_open("gone", a, 8)
            a:mode("slow:3000")
            h.eventually(function() return state("gone", a).circuit == "half-open" end, 3)
            local held
            for i = 1, 3 do
                local conn = assert(raw.connect(proxy.port, { timeout = 10 }))
                defer(function() conn:close() end)
                assert(conn:send(raw.build { target = "/gone/t?i=" .. i }))
                if not conn:read_response { timeout = 0.5 } then
                    held = conn
                    break
                end
            end
            assert(held, "no request was sent to a as its trial")
            held:close() -- the trial's client goes away: nothing learned
            h.eventually(function() return state("gone", a).active == 0 end, 3)
            a:mode("ok")
            local origins = {}
            for i = 1, 6 do origins[i] = get("/gone/x?i=" .. i):header("x-origin") end
            assert.equal("closed", state("gone", a).circuit, table.concat(origins, " "))
        end)

        it("counts refused connections (retried elsewhere) as failures", function()
            for i = 1, 6 do
                local res = get("/refused/x?i=" .. i)
                assert.equal(200, res.status)
                assert.equal("a", res:header("x-origin"))
            end
            local sd = state("refused", dead)
            assert.equal("open", sd.circuit)
            assert.equal(1, #h.lines_with(proxy:stderr(), "upstream refused ", dead, "ejected"))
        end)

        it("counts timeouts as failures", function()
            mode(a, "stall")
            local statuses = {}
            for i = 1, 6 do statuses[i] = get("/timeout/x?i=" .. i).status end
            assert.equal("open", state("timeout", a).circuit, table.concat(statuses, " "))
            local n504 = 0
            for _, s in ipairs(statuses) do if s == 504 then n504 = n504 + 1 end end
            assert.equal(2, n504, table.concat(statuses, " "))
        end)

        it("counts only the statuses listed in passive.statuses", function()
            mode(a, "503")
            for i = 1, 8 do get("/statuses/x?i=" .. i) end
            assert.equal("closed", state("statuses", a).circuit, "503 is not in statuses = { 500 }")
            a:mode("500")
            until_open("statuses", a, 6)
        end)

        it("keeps an ejection across a reload that keeps the server", function()
            mode(a, "503")
            until_open("keep", a, 8)
            local res = proxy:admin("POST", "/reload")
            assert(res and res.status == 200, "reload: " .. tostring(res and res.body))
            a:mode("ok")
            assert.equal("open", state("keep", a).circuit)
            for i = 1, 6 do assert.equal("b", get("/keep/x?i=" .. i):header("x-origin")) end
        end)

        it("never ejects with failures = 0", function()
            mode(a, "503")
            for i = 1, 12 do get("/never/x?i=" .. i) end
            local sa = state("never", a)
            assert.equal("closed", sa.circuit)
            assert.equal(6, sa.failed)
        end)
    end)

    describe("no server available", function()
        it("answers 503 with Retry-After (>= 1, <= the cooldown) without contacting any server", function()
            mode(a, "503")
            mode(b, "503")
            until_open("alldown", a, 4)
            until_open("alldown", b, 4)
            local na, nb = a:stats().requests, b:stats().requests
            local res = get("/alldown/x")
            assert.equal(503, res.status)
            assert.is_nil(res:header("x-origin"))
            local ra = tonumber(res:header("retry-after"))
            assert(ra and ra >= 1 and ra <= 5, "Retry-After: " .. tostring(res:header("retry-after")))
            assert.same({ na, nb }, { a:stats().requests, b:stats().requests })
        end)

        it("with fail_open = true still sends the request to a server", function()
            mode(a, "503")
            mode(b, "503")
            until_open("failopen", a, 4)
            until_open("failopen", b, 4)
            a:mode("ok")
            b:mode("ok")
            local res = get("/failopen/x")
            assert.equal(200, res.status)
            assert.truthy(res:header("x-origin"))
        end)
    end)

    describe("active checks", function()
        it("start with every server up", function()
            local sp, sq = state("active", p), state("active", q)
            assert.same({ true, true, true, true }, { sp.probe_up, sp.healthy, sq.probe_up, sq.healthy })
        end)

        it("mark a server whose /health answers 500 down after `fall` probes; it then gets no traffic", function()
            mode(p, nil, "500")
            local t0, probes0 = socket.gettime(), p:path_count("/health")
            h.eventually(function() return state("active", p).probe_up == false end, 5)
            local probes = p:path_count("/health") - probes0
            assert.is_true(probes >= 3, "down after " .. probes .. " probes (fall = 3)")
            assert.is_true(socket.gettime() - t0 >= 0.35, "down too early for fall = 3, interval = 0.2")
            local sp = state("active", p)
            assert.same({ false, "closed" }, { sp.healthy, sp.circuit })
            local before = p:path_count("/x")
            local _, counts = h.load(proxy.port, { total = 30, concurrency = 3,
                request = function(i) return { target = "/active/x?i=" .. i } end })
            assert.same({ q = 30 }, counts)
            assert.equal(before, p:path_count("/x"))
            h.eventually(function()
                return #h.lines_with(proxy:stderr(), "health", "upstream active ", p.addr, "down") == 1
            end, 2)
        end)

        it("bring it back after `rise` good probes", function()
            -- p is down from the spec before when run in order; make sure of it
            p:mode(nil, "500")
            defer(function() p:mode("ok", "follow") end)
            h.eventually(function() return state("active", p).probe_up == false end, 5)
            p:mode(nil, "follow")
            local probes0 = p:path_count("/health")
            h.eventually(function() return state("active", p).probe_up == true end, 5)
            assert.is_true(p:path_count("/health") - probes0 >= 2, "up after fewer than rise = 2 probes")
            local _, counts = h.load(proxy.port, { total = 20, concurrency = 1,
                request = function(i) return { target = "/active/x?i=" .. i } end })
            assert.is_true((counts.p or 0) >= 8, "p back in rotation: " .. h.show_counts(counts))
            h.eventually(function()
                return #h.lines_with(proxy:stderr(), "health", "upstream active ", p.addr, " up") >= 1
            end, 2)
        end)

        it("count a probe that times out as failed", function()
            -- p is shared with the other upstreams' checks: start from "up" here
            h.eventually(function() return state("acttmo", p).probe_up == true end, 6)
            mode(p, nil, "stall")
            h.eventually(function() return state("acttmo", p).probe_up == false end, 6)
            h.eventually(function()
                return #h.lines_with(proxy:stderr(), "upstream acttmo ", p.addr, "down", "timed out") >= 1
            end, 2)
        end)

        it("keep a server down across a reload that keeps it", function()
            mode(p, nil, "500")
            h.eventually(function() return state("actkeep", p).probe_up == false end, 5)
            local res = proxy:admin("POST", "/reload")
            assert(res and res.status == 200, "reload: " .. tostring(res and res.body))
            assert.equal(false, state("actkeep", p).probe_up)
            local _, counts = h.load(proxy.port, { total = 10, request = function(i)
                return { target = "/actkeep/x?i=" .. i } end })
            assert.same({ q = 10 }, counts)
            -- and the probes go on: p comes back
            p:mode(nil, "follow")
            h.eventually(function() return state("actkeep", p).probe_up == true end, 5)
        end)

        it("answer 503 with Retry-After >= 1 when every server is down", function()
            mode(p, nil, "500")
            mode(q, nil, "500")
            h.eventually(function()
                return state("actdown", p).probe_up == false and state("actdown", q).probe_up == false
            end, 5)
            local res = get("/actdown/x")
            assert.equal(503, res.status)
            assert.is_nil(res:header("x-origin"))
            assert.is_true(tonumber(res:header("retry-after") or "0") >= 1, tostring(res:header("retry-after")))
        end)
    end)

    describe("with two workers", function()
        local p2

        lazy_setup(function()
            p2 = h.start_proxy { workers = 2, config = CONFIG_W2, vars = { a = a.addr, b = b.addr } }
        end)

        lazy_teardown(function()
            h.shutdown(p2)
        end)

        it("counts failures across workers and no worker sends to the ejected server", function()
            mode(a, "503")
            local before = a:path_count("/w")
            local opened
            for i = 1, 20 do
                get("/w2/w?i=" .. i, nil, p2.port) -- a new connection each: both workers take some
                local s = assert(p2:server_state("w2", a.addr))
                if s.circuit == "open" then
                    opened = i
                    break
                end
            end
            assert(opened, "a never ejected")
            assert.equal(3, a:path_count("/w") - before, "ejection after a different number of failures")
            local _, counts = h.load(p2.port, { total = 60, concurrency = 6,
                request = function(i) return { target = "/w2/w?load=" .. i, headers = { connection = "close" } } end })
            assert.same({ b = 60 }, counts)
            assert.equal(3, a:path_count("/w") - before)
            assert.equal(1, #h.lines_with(p2:stderr(), "upstream w2 ", a.addr, "ejected"))
        end)
    end)

    describe("afterwards", function()
        it("every server's in-flight count is back to 0", function()
            proxy:wait_all_idle()
        end)
    end)
end)
