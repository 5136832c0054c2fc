-- End-to-end: GET /metrics on the admin port (SPEC "Admin port"): the
-- Prometheus text format 0.0.4, request counts by route name and status
-- summed over the workers, the duration histogram, the servers' state and
-- attempts by status class, connections, reloads and the generation.
--
-- Counters only grow and the proxy lives for the whole file, so every spec
-- compares two scrapes (before and after its own requests), on routes and
-- upstreams of its own.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
-- ${marker}
local app = proxy.upstream "app" { servers = { "${a}" }, keepalive = 4 }
proxy.route { name = "api", prefix = "/api/", upstream = app }
proxy.route { name = "hist", prefix = "/hist/", upstream = app }
proxy.route { name = [[q"uo\te]], prefix = "/quote/", upstream = app }
proxy.route { name = "busy", prefix = "/busy/", upstream = app }
proxy.route { name = "bad", prefix = "/bad/", upstream = proxy.upstream "bad" {
  servers = { "${b}" }, keepalive = 0, retries = 0, passive = { failures = 0 } } }
proxy.route { name = "dead", prefix = "/dead/", upstream = proxy.upstream "dead" {
  servers = { "${dead}" }, keepalive = 0, retries = 0, passive = { failures = 0 }, timeouts = { connect = 1 } } }
proxy.route { name = "checked", prefix = "/checked/", upstream = proxy.upstream "checked" {
  servers = { "${c}" }, passive = { failures = 0 },
  health = { path = "/health", interval = 0.2, timeout = 2, rise = 2, fall = 2 } } }
]=]

local SYNTAX_ERROR = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.route { prefix = "/" upstream = nil }
]=]

local BOUNDS = { "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf" }

-- A label value's escapes undone (\\, \" and \n).
local function unescape(s)
    return (s:gsub("\\(.)", function(ch) return ch == "n" and "\n" or ch end))
end

-- The tiny parser: every line is a comment (# HELP name text, # TYPE name
-- type) or `name{labels} value` / `name value`. Returns the samples
-- ({name, labels, value, key}) and the HELP and TYPE seen per family;
-- raises on any other line.
local function parse(text)
    local samples, help, types = {}, {}, {}
    assert(text:sub(-1) == "\n", "the text must end with a newline")
    for line in text:gmatch("([^\n]*)\n") do
        if line:sub(1, 1) == "#" then
            local kind, name, rest = line:match("^# (%u+) ([%a_:][%w_:]*) (.+)$")
            assert(kind == "HELP" or kind == "TYPE", "bad comment line: " .. line)
            if kind == "HELP" then help[name] = rest else types[name] = rest end
        else
            local name, rest = line:match("^([%a_:][%w_:]*)(.*)$")
            assert(name, "bad sample line: " .. line)
            local labels, keys = {}, {}
            if rest:sub(1, 1) == "{" then
                local i = 2
                while rest:sub(i, i) ~= "}" do
                    local k, j = rest:match('^([%a_][%w_]*)="()', i)
                    assert(k, "bad label at " .. i .. " in: " .. line)
                    local e = j
                    while rest:sub(e, e) ~= '"' do
                        assert(e <= #rest, "unterminated label value in: " .. line)
                        e = e + (rest:sub(e, e) == "\\" and 2 or 1)
                    end
                    local v = rest:sub(j, e - 1)
                    labels[k] = unescape(v)
                    keys[#keys + 1] = k .. "=" .. unescape(v)
                    i = e + 1
                    if rest:sub(i, i) == "," then i = i + 1 end
                end
                rest = rest:sub(i + 1)
            end
            local value = rest:match("^ (%S+)$")
            assert(value, "bad value in: " .. line)
            local n = value == "+Inf" and math.huge or tonumber(value)
            assert(n, "not a number: " .. value)
            table.sort(keys)
            samples[#samples + 1] = { name = name, labels = labels, value = n,
                key = #keys > 0 and name .. "{" .. table.concat(keys, ",") .. "}" or name }
        end
    end
    return samples, help, types
end

describe("GET /metrics", function()
    local a, b, c, proxy, dead

    lazy_setup(function()
        a, b, c = h.start_origin("a"), h.start_origin("b"), h.start_origin("c")
        dead = "127.0.0.1:" .. h.free_port()
        proxy = h.start_proxy { workers = 2, config = CONFIG,
            vars = { a = a.addr, b = b.addr, c = c.addr, dead = dead, marker = "start" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b, c)
    end)

    local function scrape()
        local res, err = proxy:admin("GET", "/metrics")
        assert(res, "admin /metrics: " .. tostring(err))
        assert.equal(200, res.status)
        return res, parse(res.body)
    end

    -- The scrape as { ["name{k=v,...}"] = value } (label keys sorted).
    local function values()
        local _, samples = scrape()
        local t = {}
        for _, s in ipairs(samples) do t[s.key] = s.value end
        return t
    end

    -- The scrape once ready(values) holds, or after 5 s the last one (the
    -- assertions that follow then say what differs): a worker counts a
    -- request just after writing its response, so a client can scrape first.
    local function settled(ready)
        local v
        pcall(h.eventually, function()
            v = values()
            return ready(v)
        end, 5)
        return v
    end

    local function get(target)
        -- a new connection each time: SO_REUSEPORT spreads them over both workers
        return assert(raw.get(proxy.port, target, nil, { timeout = 10 }))
    end

    local function requests(route, status)
        return string.format("moonproxy_requests_total{route=%s,status=%s}", route, status)
    end

    local function upstream(up, server, class)
        return string.format("moonproxy_upstream_requests_total{server=%s,status=%s,upstream=%s}", server, class, up)
    end

    it("answers Prometheus text 0.0.4 with HELP and TYPE for every metric", function()
        get("/api/x")
        settled(function(v) return v[requests("api", 200)] end)
        local res, samples, help, types = scrape()
        assert.equal("text/plain; version=0.0.4; charset=utf-8", res:header("content-type"))
        local families = {}
        for _, s in ipairs(samples) do
            local family = s.name:gsub("_bucket$", ""):gsub("_sum$", ""):gsub("_count$", "")
            if not types[family] then family = s.name end
            assert.truthy(help[family], "no HELP for " .. s.name)
            assert.truthy(types[family], "no TYPE for " .. s.name)
            families[family] = types[family]
        end
        assert.same({
            moonproxy_requests_total = "counter",
            moonproxy_request_duration_seconds = "histogram",
            moonproxy_upstream_server_up = "gauge",
            moonproxy_upstream_requests_total = "counter",
            moonproxy_connections = "gauge",
            moonproxy_reloads_total = "counter",
            moonproxy_config_generation = "gauge",
            moonproxy_tls_handshakes_total = "counter",
            moonproxy_upstream_tls_handshakes_total = "counter",
            moonproxy_tunnels = "gauge",
            moonproxy_tunnel_bytes_total = "counter",
            moonproxy_tunnels_closed_total = "counter",
        }, families)
    end)

    it("counts requests by route name and exact status, summed over both workers", function()
        local before = values()
        for i = 1, 20 do assert.equal(200, get("/api/x?i=" .. i).status) end
        for i = 1, 5 do assert.equal(404, get("/nowhere/" .. i).status) end
        local after = settled(function(v)
            return (v[requests("api", 200)] or 0) - (before[requests("api", 200)] or 0) >= 20 and
                (v[requests("_none", 404)] or 0) - (before[requests("_none", 404)] or 0) >= 5
        end)
        assert.equal(20, after[requests("api", 200)] - (before[requests("api", 200)] or 0))
        assert.equal(5, after[requests("_none", 404)] - (before[requests("_none", 404)] or 0))
    end)

    it("has a cumulative duration histogram per route whose _count is the requests", function()
        for i = 1, 12 do assert.equal(200, get("/hist/x?i=" .. i).status) end
        settled(function(v) return v[requests("hist", 200)] == 12 end)
        local _, samples = scrape()
        local buckets, sum, count = {}, nil, nil
        for _, s in ipairs(samples) do
            if s.labels.route == "hist" then
                if s.name == "moonproxy_request_duration_seconds_bucket" then
                    buckets[#buckets + 1] = s
                elseif s.name == "moonproxy_request_duration_seconds_sum" then
                    sum = s.value
                elseif s.name == "moonproxy_request_duration_seconds_count" then
                    count = s.value
                end
            end
        end
        assert.equal(#BOUNDS, #buckets)
        for i, s in ipairs(buckets) do
            assert.equal(BOUNDS[i], s.labels.le)
            if i > 1 then assert.truthy(s.value >= buckets[i - 1].value, "bucket " .. s.labels.le .. " not cumulative") end
        end
        assert.equal(12, count)
        assert.equal(12, buckets[#buckets].value)
        assert.equal(12, values()[requests("hist", 200)])
        assert.truthy(sum > 0 and sum < 12 * 10, "sum " .. tostring(sum))
    end)

    it("escapes a route name's quote and backslash in label values", function()
        for _ = 1, 3 do assert.equal(200, get("/quote/x").status) end
        settled(function(v) return v[requests('q"uo\\te', 200)] == 3 end)
        local res = scrape()
        assert.truthy(res.body:find('route="q\\"uo\\\\te",status="200"} 3', 1, true), res.body)
        assert.equal(3, values()[requests('q"uo\\te', 200)])
    end)

    it("counts upstream attempts by status class, with error for no response", function()
        local before = values()
        b:mode("503")
        for _ = 1, 4 do assert.equal(503, get("/bad/x").status) end
        b:mode("ok")
        assert.equal(200, get("/bad/x").status)
        for _ = 1, 2 do assert.equal(502, get("/dead/x").status) end
        local after = settled(function(v)
            return (v[requests("dead", 502)] or 0) - (before[requests("dead", 502)] or 0) >= 2 and
                (v[requests("bad", 503)] or 0) - (before[requests("bad", 503)] or 0) >= 4
        end)
        local function delta(k) return (after[k] or 0) - (before[k] or 0) end
        assert.equal(4, delta(upstream("bad", b.addr, "5xx")))
        assert.equal(1, delta(upstream("bad", b.addr, "2xx")))
        assert.equal(0, delta(upstream("bad", b.addr, "error")))
        assert.equal(2, delta(upstream("dead", dead, "error")))
        assert.equal(4, delta(requests("bad", 503)))
        assert.equal(2, delta(requests("dead", 502)))
    end)

    it("shows a server up, then down once its active checks fail", function()
        local key = string.format("moonproxy_upstream_server_up{server=%s,upstream=checked}", c.addr)
        h.eventually(function() return values()[key] == 1 end, 5)
        c:mode("ok", "503")
        local ok, err = pcall(h.eventually, function() return values()[key] == 0 end, 10)
        c:mode("ok", "follow")
        assert(ok, err)
        h.eventually(function() return values()[key] == 1 end, 10)
    end)

    it("counts open client connections", function()
        local conn = assert(raw.connect(proxy.port, { timeout = 5 }))
        assert(conn:send(raw.build { target = "/api/held" }))
        assert.equal(200, assert(conn:read_response { timeout = 5 }).status)
        h.eventually(function()
            local v = values()
            return v["moonproxy_connections{state=client}"] >= 1 and v["moonproxy_connections{state=upstream_idle}"] >= 1
        end, 5)
        conn:close()
    end)

    it("counts ok and refused reloads, shows the generation, and keeps route counts", function()
        local before = values()
        local api0 = before[requests("api", 200)] or 0
        get("/api/before")
        local api = settled(function(v) return v[requests("api", 200)] == api0 + 1 end)[requests("api", 200)]
        proxy:rewrite_config(CONFIG, { marker = "reloaded" })
        local res, doc = proxy:admin("POST", "/reload")
        assert.equal(200, res.status)
        proxy:rewrite_config(SYNTAX_ERROR)
        local refused = proxy:admin("POST", "/reload")
        assert.equal(422, refused.status)
        proxy:rewrite_config(CONFIG, { marker = "start" })
        get("/api/after")
        local after = settled(function(v) return v[requests("api", 200)] == api + 1 end)
        assert.equal(before["moonproxy_reloads_total{result=ok}"] + 1, after["moonproxy_reloads_total{result=ok}"])
        assert.equal(before["moonproxy_reloads_total{result=refused}"] + 1,
            after["moonproxy_reloads_total{result=refused}"])
        assert.equal(doc.generation, after["moonproxy_config_generation"])
        assert.equal(before["moonproxy_config_generation"] + 1, after["moonproxy_config_generation"])
        assert.equal(api + 1, after[requests("api", 200)])
    end)

    it("can be scraped while requests run on both workers", function()
        local before = values()
        local conns = {}
        for i = 1, 8 do
            conns[i] = assert(raw.connect(proxy.port, { timeout = 10 }))
            local bytes = {}
            for j = 1, 25 do bytes[j] = raw.build { target = "/busy/" .. i .. "/" .. j } end
            assert(conns[i]:send(table.concat(bytes)))
        end
        for _ = 1, 5 do scrape() end
        for i = 1, 8 do
            for _ = 1, 25 do assert.equal(200, assert(conns[i]:read_response { timeout = 10 }).status) end
            conns[i]:close()
        end
        local busy0 = before[requests("busy", 200)] or 0
        local after = settled(function(v) return v[requests("busy", 200)] == busy0 + 200 end)
        assert.equal(200, after[requests("busy", 200)] - busy0)
    end)
end)
