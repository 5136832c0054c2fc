-- End-to-end: the balancers (SPEC "Balancers") against real origins on
-- loopback: round_robin and weighted distributions, least_conn / p2c / ewma
-- preferring the idle or fast server, chash stickiness and its stability
-- when a server is added by a reload, and operator policies written in Lua
-- (what they see, nil, errors). The built-in names are run twice: through
-- the C fast paths and through their Lua modules (settings.lua_balancers),
-- when those modules exist.
--
-- Origins a, b, c (and d, only listed after a reload) are shared by every
-- upstream; a spec that slows one down with its failure mode puts it back to
-- "ok" through defer() (run by an after_each: busted keeps only one
-- `finally` per spec).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local cleanups = {}
local function defer(fn) cleanups[#cleanups + 1] = fn end

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", lua_balancers = ${lua_balancers} }

local plain = { failures = 0 } -- no passive ejection: a slow server stays available
proxy.route { prefix = "/rr/", strip_prefix = true, upstream = proxy.upstream "rr" {
  servers = { "${a}", "${b}", "${c}" }, balancer = "round_robin", passive = plain } }
proxy.route { prefix = "/wt/", strip_prefix = true, upstream = proxy.upstream "wt" {
  servers = { { addr = "${a}", weight = 1 }, { addr = "${b}", weight = 3 } }, balancer = "weighted", passive = plain } }
proxy.route { prefix = "/lc/", strip_prefix = true, upstream = proxy.upstream "lc" {
  servers = { "${a}", "${b}" }, balancer = "least_conn", passive = plain } }
proxy.route { prefix = "/p2c/", strip_prefix = true, upstream = proxy.upstream "p2c" {
  servers = { "${a}", "${b}" }, balancer = "p2c", passive = plain } }
proxy.route { prefix = "/ewma/", strip_prefix = true, upstream = proxy.upstream "ewma" {
  servers = { "${a}", "${b}" }, balancer = "ewma", passive = plain } }
proxy.route { prefix = "/ch/", strip_prefix = true, upstream = proxy.upstream "ch" {
  servers = { ${ch_servers} }, balancer = "chash", hash_key = "header:x-key", passive = plain } }
proxy.route { prefix = "/chc/", strip_prefix = true, upstream = proxy.upstream "chc" {
  servers = { "${a}", "${b}", "${c}" }, balancer = "chash", hash_key = "cookie:sid", passive = plain } }
proxy.route { prefix = "/chf/", strip_prefix = true, upstream = proxy.upstream "chf" {
  servers = { "${a}", "${b}", "${c}" }, balancer = "chash", passive = plain,
  hash_key = function(req) return req.headers["x-tenant"] end } }
proxy.route { prefix = "/chh/", strip_prefix = true, upstream = proxy.upstream "chh" {
  servers = { "${a}", "${b}", "${c}" }, balancer = "chash", hash_key = "header:x-key", passive = plain,
  health = { path = "/health", interval = 0.2, timeout = 2, rise = 1, fall = 2 } } }

-- An operator's policy: sticky to the server named by X-Backend, else the
-- first available one. It records what it was given in a shared dictionary.
local seen = proxy.shared("seen", "256k")
local function sticky(servers, req, upstream)
  local rows = {}
  for i, s in ipairs(servers) do
    rows[i] = table.concat({ tostring(s.addr), tostring(s.weight), tostring(s.healthy), tostring(s.active),
      tostring(s.latency), tostring(s.failures), tostring(s.index) }, "|")
  end
  seen:set("servers", table.concat(rows, "\n"))
  seen:set("n", #servers)
  seen:set("upstream", upstream and tostring(upstream.name) or "nil")
  seen:set("upstream_hash_key", upstream and tostring(upstream.hash_key) or "nil")
  seen:set("upstream_servers", upstream and type(upstream.servers) == "table" and #upstream.servers or -1)
  seen:set("req_header", tostring(req.headers["x-backend"]))
  local want = req.headers["x-backend"]
  for _, s in ipairs(servers) do
    if s.addr == want then return s end
  end
  return servers[1]
end
proxy.route { prefix = "/sticky/", strip_prefix = true, upstream = proxy.upstream "sticky" {
  servers = { { addr = "${a}", weight = 2 }, { addr = "${b}", weight = 5 } }, balancer = sticky, passive = plain } }
-- The same policy as a module { pick = ... }.
proxy.route { prefix = "/module/", strip_prefix = true, upstream = proxy.upstream "module" {
  servers = { "${a}", "${b}" }, balancer = { pick = sticky }, passive = plain } }
proxy.route { prefix = "/nil/", strip_prefix = true, upstream = proxy.upstream "none" {
  servers = { "${a}", "${b}" }, balancer = function() return nil end, passive = plain } }
proxy.route { prefix = "/err/", strip_prefix = true, upstream = proxy.upstream "err" {
  servers = { "${a}", "${b}" }, passive = plain,
  balancer = function(servers, req)
    if req.headers["x-fail"] then error("policy exploded") end
    return servers[#servers]
  end } }
proxy.route { prefix = "/alien/", strip_prefix = true, upstream = proxy.upstream "alien" {
  servers = { "${a}", "${b}" }, passive = plain, balancer = function() return { addr = "${a}" } end } }

proxy.route { path = "/seen", handler = function(req)
  local k = req.query or "servers"
  return req:respond(200, tostring(seen:get(k)))
end }
]=]

-- Whether the built-in balancers have Lua modules to run with lua_balancers.
local function lua_modules_exist()
    for _, n in ipairs { "round_robin", "weighted", "least_conn", "p2c", "chash", "ewma" } do
        if not package.searchpath("moonproxy.balancer." .. n, package.path) then return false end
    end
    return true
end

local chash_c_map -- key -> origin seen through the C chash, for the Lua module's comparison

-- The origins, shared by both suites (so that both hash the same addresses).
local a, b, c, d

local function suite(lua_balancers)
    local label = lua_balancers and "balancers as Lua modules (lua_balancers = true)" or "balancers (C fast paths)"
    describe(label, function()
        local proxy, vars

        lazy_setup(function()
            vars = { a = a.addr, b = b.addr, c = c.addr, d = d.addr, lua_balancers = tostring(lua_balancers),
                ch_servers = string.format('"%s", "%s", "%s"', a.addr, b.addr, c.addr) }
            proxy = h.start_proxy { workers = 1, config = CONFIG, vars = vars }
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        local function get(target, headers)
            return assert(raw.get(proxy.port, target, headers, { timeout = 10 }))
        end

        -- n GETs of target over conc connections; the X-Origin counts.
        local function spread(target, n, conc, headers)
            local results, counts = h.load(proxy.port, { total = n, concurrency = conc or 8,
                request = function(i) return { target = target .. "?i=" .. i, headers = headers } end })
            for i = 1, n do
                assert(results[i] and results[i].status == 200,
                    "request " .. i .. ": " .. tostring(results[i] and (results[i].status or results[i].err)))
            end
            return counts
        end

        local function within(counts, name, expected, tolerance)
            local got = counts[name] or 0
            assert(math.abs(got - expected) <= tolerance, string.format("%s got %d, expected %d ± %d (%s)",
                name, got, expected, tolerance, h.show_counts(counts)))
        end

        it("round_robin spreads 3,000 requests evenly over 3 servers (±2%)", function()
            local counts = spread("/rr/x", 3000, 8)
            for _, n in ipairs { "a", "b", "c" } do within(counts, n, 1000, 60) end
        end)

        it("round_robin takes the servers in turn on one connection", function()
            local order = {}
            local conn = assert(raw.connect(proxy.port))
            defer(function() conn:close() end)
            for i = 1, 6 do
                local res = assert(conn:request { target = "/rr/turn?i=" .. i })
                order[i] = res:header("x-origin")
            end
            -- whatever the starting point, a cycle of the three names repeats
            assert.same({ order[1], order[2], order[3] }, { order[4], order[5], order[6] })
            table.sort(order, function(x, y) return x < y end)
            assert.same({ "a", "a", "b", "b", "c", "c" }, order)
        end)

        it("weighted 1:3 gives 25% / 75% of 3,000 requests (±3%)", function()
            local counts = spread("/wt/x", 3000, 8)
            within(counts, "a", 750, 90)
            within(counts, "b", 2250, 90)
        end)

        -- A slowed down to `ms` per request for the duration of fn.
        local function with_slow_a(ms, fn)
            a:mode("slow:" .. ms)
            defer(function() a:mode("ok") end)
            return fn()
        end

        it("least_conn sends most requests to the idle server when the other is slow", function()
            with_slow_a(200, function()
                local counts = spread("/lc/x", 400, 8)
                assert((counts.b or 0) >= 0.9 * 400, "fast b got too few: " .. h.show_counts(counts))
                assert((counts.a or 0) >= 1, "slow a got nothing at all: " .. h.show_counts(counts))
            end)
        end)

        it("p2c sends most requests to the idle server when the other is slow", function()
            with_slow_a(200, function()
                local counts = spread("/p2c/x", 400, 8)
                assert((counts.b or 0) >= 0.9 * 400, "fast b got too few: " .. h.show_counts(counts))
            end)
        end)

        it("ewma prefers the server with the lower latency", function()
            with_slow_a(50, function()
                local counts = spread("/ewma/x", 200, 1)
                assert((counts.b or 0) >= 0.9 * 200, "fast b got too few: " .. h.show_counts(counts))
            end)
        end)

        it("chash sends the same key to the same server every time, and spreads keys", function()
            local first, per = {}, {}
            for round = 1, 3 do
                for k = 1, 30 do
                    local o = get("/ch/x", { ["x-key"] = "user-" .. k }):header("x-origin")
                    if round == 1 then
                        first[k] = o
                        per[o] = (per[o] or 0) + 1
                    else
                        assert.equal(first[k], o, "key user-" .. k .. " moved in round " .. round)
                    end
                end
            end
            assert.truthy(per.a and per.b and per.c, "30 keys used fewer than 3 servers: " .. h.show_counts(per))
        end)

        -- The X-Origin of GET target for each of n keys (headers_of(i) -> headers).
        local function key_map(target, n, headers_of)
            local results = h.load(proxy.port, { total = n, concurrency = 8, request = function(i)
                return { target = target, headers = headers_of(i) } end })
            local m = {}
            for i = 1, n do
                assert(results[i].status == 200, "key " .. i .. ": " .. tostring(results[i].status or results[i].err)
                    .. "\n" .. proxy:stderr():sub(-1500))
                m[i] = results[i]:header("x-origin")
            end
            return m
        end

        it("chash treats a key header sent as two fields like the values joined by a comma", function()
            local two = key_map("/ch/x", 40, function(i) return { { "X-Key", "k" .. i }, { "X-Key", "v" } } end)
            local one = key_map("/ch/x", 40, function(i) return { ["x-key"] = "k" .. i .. ", v" } end)
            local differ = 0
            for i = 1, 40 do if two[i] ~= one[i] then differ = differ + 1 end end
            assert.equal(0, differ, differ .. " of 40 keys went elsewhere when sent as two fields")
        end)

        it("chash on a cookie: the same value reaches the same server whatever the other cookies", function()
            local per = {}
            for k = 1, 30 do
                local o = get("/chc/x", { cookie = "sid=s" .. k }):header("x-origin")
                per[o] = (per[o] or 0) + 1
                assert.equal(o, get("/chc/x", { cookie = "theme=dark; sid=s" .. k .. "; lang=en" }):header("x-origin"))
                assert.equal(o, get("/chc/x", { cookie = "xsid=zz; sid=s" .. k }):header("x-origin"))
            end
            assert.truthy(per.a and per.b and per.c, "30 cookies used fewer than 3 servers: " .. h.show_counts(per))
        end)

        it("chash on a function of the request", function()
            local per = {}
            for k = 1, 30 do
                local o = get("/chf/x", { ["x-tenant"] = "t" .. k }):header("x-origin")
                per[o] = (per[o] or 0) + 1
                assert.equal(o, get("/chf/y", { ["x-tenant"] = "t" .. k, ["x-other"] = k }):header("x-origin"))
            end
            assert.truthy(per.a and per.b and per.c, "30 tenants used fewer than 3 servers: " .. h.show_counts(per))
        end)

        it("chash moves only the keys of a server that goes down, and they come back with it", function()
            local function headers_of(i) return { ["x-key"] = "down-" .. i } end
            local before = key_map("/chh/x", 300, headers_of)
            a:mode(nil, "500")
            defer(function() a:mode(nil, "follow") end)
            h.eventually(function() return proxy:server_state("chh", a.addr).probe_up == false end, 5)
            local during = key_map("/chh/x", 300, headers_of)
            local moved_a, moved_other = 0, 0
            for i = 1, 300 do
                assert.is_not.equal("a", during[i])
                if before[i] == "a" then moved_a = moved_a + 1
                elseif during[i] ~= before[i] then moved_other = moved_other + 1 end
            end
            assert.is_true(moved_a > 0)
            assert.equal(0, moved_other, moved_other .. " keys of b and c moved while a was down")
            a:mode(nil, "follow")
            h.eventually(function() return proxy:server_state("chh", a.addr).probe_up == true end, 5)
            assert.same(before, key_map("/chh/x", 300, headers_of))
        end)

        it("chash keeps keys on their server when a 4th server is added by a reload", function()
            local N = 1000
            local function map()
                return key_map("/ch/k", N, function(i) return { ["x-key"] = "key-" .. i } end)
            end
            local before = map()
            if not lua_balancers then chash_c_map = before end
            defer(function()
                proxy:rewrite_config(CONFIG, vars)
                local res = proxy:admin("POST", "/reload")
                assert(res and res.status == 200, "reload back to 3 servers failed")
            end)
            proxy:rewrite_config(CONFIG, { ch_servers = string.format('"%s", "%s", "%s", "%s"',
                a.addr, b.addr, c.addr, d.addr) })
            local res = proxy:admin("POST", "/reload")
            assert(res and res.status == 200, "reload with a 4th server: " .. tostring(res and res.body))
            local after = map()
            local kept, to_d, elsewhere = 0, 0, 0
            for i = 1, N do
                if after[i] == before[i] then
                    kept = kept + 1
                elseif after[i] == "d" then
                    to_d = to_d + 1
                else
                    elsewhere = elsewhere + 1
                end
            end
            -- Consistent hashing: only the keys the new server takes move (about 1/4),
            -- no key moves between the servers that stayed.
            assert(elsewhere <= N * 0.01, string.format("%d keys moved between old servers (kept %d, to d %d)",
                elsewhere, kept, to_d))
            assert(kept >= N * 0.65 and to_d >= N * 0.15, string.format(
                "kept %d of %d, %d moved to the new server (expected about 1/4)", kept, N, to_d))
        end)

        if lua_balancers then
            it("the Lua chash module maps keys as the C fast path does", function()
                if not chash_c_map then pending("the C suite did not run") return end
                local m = key_map("/ch/k", 200, function(i) return { ["x-key"] = "key-" .. i } end)
                local differ = {}
                for i = 1, 200 do
                    if m[i] ~= chash_c_map[i] then differ[#differ + 1] = "key-" .. i end
                end
                assert(#differ == 0, #differ .. " of 200 keys map elsewhere than in C: "
                    .. table.concat(differ, " ", 1, math.min(#differ, 10)))
            end)
        end

        describe("a Lua policy", function()
            local function seen(what)
                return get("/seen?" .. what).body
            end

            it("picks the server it returns (sticky by header, with a fallback)", function()
                for _ = 1, 3 do
                    assert.equal("b", get("/sticky/x", { ["x-backend"] = b.addr }):header("x-origin"))
                    assert.equal("a", get("/sticky/x", { ["x-backend"] = a.addr }):header("x-origin"))
                    assert.equal("a", get("/sticky/x"):header("x-origin"))
                    assert.equal("a", get("/sticky/x", { ["x-backend"] = "127.0.0.1:1" }):header("x-origin"))
                end
            end)

            it("works as a module { pick = function }", function()
                assert.equal("b", get("/module/x", { ["x-backend"] = b.addr }):header("x-origin"))
                assert.equal("a", get("/module/x"):header("x-origin"))
            end)

            it("sees every server's addr, weight, healthy, active, latency, failures and index", function()
                get("/sticky/warm", { ["x-backend"] = b.addr })
                get("/sticky/x", { ["x-backend"] = b.addr })
                local rows = {}
                for line in seen("servers"):gmatch("[^\n]+") do
                    local f = {}
                    for v in (line .. "|"):gmatch("([^|]*)|") do f[#f + 1] = v end
                    rows[#rows + 1] = f
                end
                assert.equal(2, #rows, seen("servers"))
                assert.same({ a.addr, "2", "true", "0" }, { rows[1][1], rows[1][2], rows[1][3], rows[1][4] })
                assert.same({ b.addr, "5", "true", "0" }, { rows[2][1], rows[2][2], rows[2][3], rows[2][4] })
                assert.is_true(tonumber(rows[2][5]) > 0, "b's latency after requests: " .. rows[2][5])
                assert.same({ "0", "1" }, { rows[1][6], rows[1][7] })
                assert.same({ "0", "2" }, { rows[2][6], rows[2][7] })
                assert.equal(b.addr, seen("req_header"))
            end)

            it("gets the upstream: its name, hash_key and its full server list", function()
                get("/sticky/x")
                assert.equal("sticky", seen("upstream"))
                assert.equal("2", seen("upstream_servers"), "upstream.servers (documented in "
                    .. "lua/moonproxy/balancer/round_robin.lua) is missing or wrong")
            end)

            it("sees the requests in flight in `active`", function()
                -- a request held at a for 600 ms, then a pick while it runs
                local slow = assert(raw.connect(proxy.port, { timeout = 10 }))
                defer(function() slow:close() end)
                assert(slow:send(raw.build { target = "/sticky/slow?ms=600", headers = { ["x-backend"] = a.addr } }))
                h.eventually(function()
                    get("/sticky/x", { ["x-backend"] = b.addr })
                    return seen("servers"):match("^[^\n]*|1|[^|\n]*|[^|\n]*|1\n")
                end, 3)
                assert.equal(200, assert(slow:read_response { timeout = 5 }).status)
            end)

            it("answers 503 with Retry-After when it returns nil", function()
                local res = get("/nil/x")
                assert.equal(503, res.status)
                assert.is_nil(res:header("x-origin"))
                assert.is_true(tonumber(res:header("retry-after")) >= 1, "Retry-After: " .. tostring(res:header("retry-after")))
            end)

            it("answers 500 when it raises, and the next request is fine", function()
                local res = get("/err/x", { ["x-fail"] = "1" })
                assert.equal(500, res.status)
                assert.is_nil(res:header("x-origin"))
                assert.equal("b", get("/err/x"):header("x-origin"))
                h.eventually(function() return proxy:stderr():find("policy exploded", 1, true) end, 2)
            end)

            it("answers 500 when it returns something that is not one of its servers", function()
                local res = get("/alien/x")
                assert.equal(500, res.status)
                assert.equal(200, get("/rr/after").status)
            end)
        end)

        it("leaves every server's in-flight count at 0 afterwards", function()
            proxy:wait_all_idle()
        end)
    end)
end

describe("moonproxy balancing", function()
    lazy_setup(function()
        a, b, c, d = h.start_origin("a"), h.start_origin("b"), h.start_origin("c"), h.start_origin("d")
    end)

    lazy_teardown(function()
        h.shutdown(nil, a, b, c, d)
    end)

    -- Cleanups of the current spec, run after it whatever happened (latest first).
    after_each(function()
        for i = #cleanups, 1, -1 do pcall(cleanups[i]) end
        cleanups = {}
    end)

    suite(false)
    if lua_modules_exist() then
        suite(true)
    else
        describe("balancers as Lua modules", function()
            it("exist in lua/moonproxy/balancer", function() pending("modules not written yet") end)
        end)
    end
end)
