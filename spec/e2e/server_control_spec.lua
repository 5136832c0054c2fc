-- End-to-end: runtime server control on the admin port (SPEC "Admin port"):
-- POST /upstreams/NAME/servers/ADDR with {"drain": ...}, {"down": ...},
-- {"weight": N} or {"reset": true}, under a steady load of requests over two
-- origins: zero failed requests while a server is drained, an in-flight
-- request on a drained server finishes, a weight shifts the share, down and
-- reset, the state kept across a reload while the server stays (and
-- forgotten when a reload removes it), 400/404 JSON errors and 401 without
-- the token.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}", token = "${token}" }
proxy.settings { access_log = false }
local plain = { failures = 0 }
proxy.route { prefix = "/rr/", strip_prefix = true, upstream = proxy.upstream "api" {
  servers = { "${a}", ${b_server} }, balancer = "round_robin", passive = plain } }
proxy.route { prefix = "/wt/", strip_prefix = true, upstream = proxy.upstream "wt" {
  servers = { "${a}", "${b}" }, balancer = "weighted", passive = plain } }
${extra}
]=]

local TOKEN = "ctl-token"

describe("runtime server control", function()
    local a, b, proxy

    local function vars(extra, with_b)
        return { b_server = with_b == false and "" or '"' .. b.addr .. '"', extra = extra or "" }
    end

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        local v = vars()
        v.a, v.b, v.token = a.addr, b.addr, TOKEN
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = v, admin_token = TOKEN }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    -- POST body to the admin port (with the token unless token == false).
    local function post(target, body, token)
        local headers = { { "Host", "localhost:" .. proxy.admin_port } }
        if token ~= false then headers[2] = { "Authorization", "Bearer " .. (token or TOKEN) } end
        local res = assert(raw.request(proxy.admin_port, { method = "POST", target = target, headers = headers,
            body = body }, { timeout = 10 }))
        local ok, doc = pcall(cjson.decode, res.body or "")
        return res, ok and type(doc) == "table" and doc or nil
    end

    local function control(upstream, addr, body)
        local res, doc = post("/upstreams/" .. upstream .. "/servers/" .. addr, body)
        assert(res.status == 200, tostring(res.status) .. ": " .. tostring(res.body))
        return doc
    end

    local function reset_all()
        for _, u in ipairs { "api", "wt" } do
            for _, o in ipairs { a, b } do
                if proxy:server_state(u, o.addr) then control(u, o.addr, '{"reset": true}') end
            end
        end
    end

    after_each(function() reset_all() end)

    -- n requests to prefix over 4 connections; at request `at` (if given),
    -- fn() runs (the others are in flight meanwhile). Returns the counts by
    -- X-Origin and the number of requests that were not a 200.
    local function load(prefix, n, at, fn)
        local results, counts = h.load(proxy.port, { total = n, concurrency = 4, request = function(i)
            if i == at then fn() end
            return { target = prefix .. "x?i=" .. i }
        end })
        local failed = 0
        for i = 1, n do
            if not (results[i] and results[i].status == 200) then failed = failed + 1 end
        end
        return counts, failed
    end

    it("drain: no new requests to the server, zero failed requests, and undo", function()
        local before = proxy:log_count("upstream api server " .. a.addr, "set by admin: drain on")
        local counts, failed = load("/rr/", 400, 200, function()
            local doc = control("api", a.addr, '{"drain": true}')
            assert.equal("draining", doc.server.state)
            assert.is_true(doc.server.drain)
        end)
        assert.equal(0, failed)
        assert(counts.a and counts.a <= 215, "a kept getting requests: " .. h.show_counts(counts))
        assert(counts.b and counts.b >= 185, h.show_counts(counts))
        local after_counts = load("/rr/", 100)
        assert.same({ b = 100 }, after_counts)
        local st = proxy:server_state("api", a.addr)
        assert.equal("draining", st.state)
        assert.equal("admin", st.set_by)
        assert.equal(before + 1, proxy:log_count("upstream api server " .. a.addr, "set by admin: drain on"))
        control("api", a.addr, '{"drain": false}')
        local again = load("/rr/", 100)
        assert(math.abs((again.a or 0) - 50) <= 10, h.show_counts(again))
        st = proxy:server_state("api", a.addr)
        assert.equal("up", st.state)
        assert.equal(cjson.null, st.set_by)
    end)

    it("drain lets a request in flight on the drained server finish", function()
        local conn = assert(raw.connect(proxy.port))
        conn:send(raw.build { method = "GET", target = "/rr/slow?ms=800", headers = { host = "x" } })
        local busy
        h.eventually(function()
            for _, o in ipairs { a, b } do
                if proxy:server_state("api", o.addr).active == 1 then busy = o end
            end
            return busy ~= nil
        end, 5)
        control("api", busy.addr, '{"drain": true}')
        local res = assert(conn:read_response { timeout = 5 })
        conn:close()
        assert.equal(200, res.status)
        assert.equal(busy == a and "a" or "b", res:header("x-origin"))
        local counts = load("/rr/", 20)
        assert.is_nil(counts[busy == a and "a" or "b"])
    end)

    it("weight shifts the share of a weighted upstream, and reset puts it back", function()
        local even = load("/wt/", 400)
        assert(math.abs((even.a or 0) - 200) <= 20, h.show_counts(even))
        local doc = control("wt", b.addr, '{"weight": 3}')
        assert.equal(3, doc.server.weight)
        assert.equal(1, doc.server.configured_weight)
        local counts, failed = load("/wt/", 400)
        assert.equal(0, failed)
        assert(math.abs((counts.b or 0) - 300) <= 20, "expected b ~300 of 400: " .. h.show_counts(counts))
        control("wt", b.addr, '{"reset": true}')
        assert.equal(1, proxy:server_state("wt", b.addr).weight)
        local back = load("/wt/", 400)
        assert(math.abs((back.a or 0) - 200) <= 20, h.show_counts(back))
    end)

    it("down takes the server out as a failed check would, and reset brings it back", function()
        local counts, failed = load("/rr/", 200, 100, function()
            control("api", b.addr, '{"down": true}')
        end)
        assert.equal(0, failed)
        assert(counts.b <= 110, h.show_counts(counts))
        local st = proxy:server_state("api", b.addr)
        assert.equal("down", st.state)
        assert.is_false(st.healthy)
        assert.is_true(st.probe_up) -- the checks' own verdict is unchanged
        assert.same({ a = 50 }, (load("/rr/", 50)))
        control("api", b.addr, '{"reset": true}')
        assert.equal("up", proxy:server_state("api", b.addr).state)
        local back = load("/rr/", 100)
        assert(math.abs((back.b or 0) - 50) <= 10, h.show_counts(back))
    end)

    it("keeps the state across a reload while the server stays, forgets it when it goes", function()
        control("api", a.addr, '{"drain": true}')
        proxy:rewrite_config(CONFIG, vars('proxy.route { path = "/extra", handler = function(req) return req:respond(200, "x") end }'))
        local res = assert(proxy:admin("POST", "/reload"))
        assert.equal(200, res.status, res.body)
        assert.equal("draining", proxy:server_state("api", a.addr).state)
        assert.same({ b = 40 }, (load("/rr/", 40)))
        -- b leaves the api upstream and comes back: its control is forgotten
        control("api", b.addr, '{"weight": 7}')
        proxy:rewrite_config(CONFIG, vars(nil, false))
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
        assert.is_nil(proxy:server_state("api", b.addr))
        proxy:rewrite_config(CONFIG, vars())
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
        local st = proxy:server_state("api", b.addr)
        assert.equal(1, st.weight)
        assert.equal(cjson.null, st.set_by)
        assert.equal("draining", proxy:server_state("api", a.addr).state) -- a stayed all along
    end)

    it("answers 404 for an unknown upstream or server, 400 for a bad body, 401 without the token", function()
        local res, doc = post("/upstreams/nope/servers/" .. a.addr, '{"drain": true}')
        assert.equal(404, res.status)
        assert.truthy(doc and doc.error)
        res, doc = post("/upstreams/api/servers/127.0.0.1:1", '{"drain": true}')
        assert.equal(404, res.status)
        assert.truthy(doc.error:find("no such server", 1, true))
        res = post("/upstreams/api/nothing", '{"drain": true}')
        assert.equal(404, res.status)
        for _, body in ipairs { "", "{}", "[]", '{"drain": 1}', '{"weight": 0}', '{"weight": 1.5}',
            '{"weight": 1001}', '{"reset": false}', '{"color": "red"}', '{"drain": true', '{"drain": true} x' } do
            res, doc = post("/upstreams/api/servers/" .. a.addr, body)
            assert.equal(400, res.status, body)
            assert.truthy(doc and doc.error, body)
        end
        assert.equal("up", proxy:server_state("api", a.addr).state)
        res = post("/upstreams/api/servers/" .. a.addr, '{"drain": true}', false)
        assert.equal(401, res.status)
        assert.equal("up", proxy:server_state("api", a.addr).state)
        -- the address percent-encoded, several fields at once
        doc = control("api", a.addr:gsub(":", "%%3A"), '{"drain": true, "weight": 5}')
        assert.equal("draining", doc.server.state)
        assert.equal(5, doc.server.weight)
    end)
end)
