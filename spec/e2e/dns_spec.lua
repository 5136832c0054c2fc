-- End-to-end: upstream servers by DNS name (SPEC "Upstreams by name"),
-- against helpers/dns.lua on loopback (settings.resolver.nameservers): a name
-- is resolved at load (one server per address), an unknown one refuses the
-- configuration with file:line, answers that change while requests flow make
-- servers join and drain with no request failing, a lookup that times out
-- keeps the last answer (one log line), and settings.resolver.hosts. Origins
-- listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3, one port for all three.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local dns = require "helpers.dns"
local socket = require "socket"

-- An origin (helpers/origin.lua) on host:port, named name.
local function start_origin(name, host, port)
    local o = h.spawn { "luajit", h.ORIGIN_SCRIPT, tostring(port), name, "--host", host }
    o.name, o.addr = name, host .. ":" .. port
    h.eventually(function()
        assert(o:alive(), "origin " .. name .. " exited: " .. o:stderr())
        local c = raw.connect(port, { host = host, timeout = 1 })
        if c then c:close() end
        return c
    end, 10)
    return o
end

-- Which origin answered a GET of /x (its X-Origin), or nil, the error.
local function who(port)
    local res, err = raw.get(port, "/x", nil, { timeout = 10 })
    if not res then return nil, err end
    if res.status ~= 200 then return nil, "status " .. res.status .. ": " .. tostring(res.body) end
    return res:header("x-origin")
end

-- The sorted addresses /upstreams lists for upstream, and name -> its names.
local function servers(proxy, upstream)
    local list, names = {}, {}
    for _, s in ipairs(proxy:upstreams()[upstream].servers) do
        list[#list + 1] = s.addr
        names[s.addr] = s.name
    end
    table.sort(list)
    return list, names
end

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", resolver = { nameservers = { "${dns}" }, timeout = 1 } }
local api = proxy.upstream "api" { servers = { "api.test:${port_o}" }, resolve = { min = 0.2, max = 0.5 } }
proxy.route { path = "/marker", handler = function(req) return req:respond(200, "${marker}") end }
proxy.route { prefix = "/", upstream = api }
]=]

describe("upstreams by name", function()
    local d, one, two, three, proxy, port_o

    lazy_setup(function()
        port_o = h.free_port()
        one = start_origin("one", "127.0.0.1", port_o)
        two = start_origin("two", "127.0.0.2", port_o)
        three = start_origin("three", "127.0.0.3", port_o)
        d = dns.start { ["api.test"] = { ttl = 1, "127.0.0.1", "127.0.0.2" } }
        proxy = h.start_proxy { workers = 2, config = CONFIG,
            vars = { dns = d.addr, port_o = port_o, marker = "first" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, one, two, three, d)
    end)

    -- Waits (bounded) until /upstreams lists exactly addrs for api.
    local function wait_servers(addrs, timeout)
        h.eventually(function()
            local list = servers(proxy, "api")
            if table.concat(list, " ") ~= table.concat(addrs, " ") then error(table.concat(list, " ")) end
            return true
        end, timeout or 10)
    end

    local function addr(ip) return ip .. ":" .. port_o end

    it("resolves a name at load into one server per address, with the name shown", function()
        local list, names = servers(proxy, "api")
        assert.same({ addr("127.0.0.1"), addr("127.0.0.2") }, list)
        assert.equal("api.test:" .. port_o, names[addr("127.0.0.1")])
        assert.equal("api.test:" .. port_o, names[addr("127.0.0.2")])
        local seen = {}
        for _ = 1, 8 do seen[assert(who(proxy.port))] = true end
        assert.same({ one = true, two = true }, seen)
        local _, cfgz = proxy:admin("GET", "/configz")
        assert.equal("api.test:" .. port_o, cfgz.upstreams.api.servers[1].name)
    end)

    it("sends the name as Host to a client that gave none (HTTP/1.0)", function()
        local res = assert(raw.request(proxy.port, { target = "/echo", version = "HTTP/1.0", no_host = true },
            { timeout = 10 }))
        assert.equal(200, res.status)
        assert.equal("api.test:" .. port_o, h.echo_header(h.echo(res), "host"))
    end)

    it("labels a server given by name with its name in /metrics", function()
        local res = assert(proxy:admin("GET", "/metrics"))
        for _, ip in ipairs { "127.0.0.1", "127.0.0.2" } do
            local want = string.format('moonproxy_upstream_server_up{upstream="api",server="%s",name="api.test:%d"}',
                addr(ip), port_o)
            assert(res.body:find(want, 1, true), "no " .. want .. " in:\n" .. res.body)
        end
    end)

    it("refuses a name that does not resolve, with file:line (-t, and a reload)", function()
        local text = h.expand_template(CONFIG, { listen = "127.0.0.1:1", admin = "127.0.0.1:2", access_log = "stdout",
            dns = d.addr, port_o = port_o, marker = "x" }):gsub("api%.test", "nope.test")
        local path = h.write_file(h.tmpname(".lua"), text)
        local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. path)
        assert.are_not.equal(0, rc)
        assert.truthy(out:find(path .. ":5: upstream api: server nope.test:" .. port_o .. ": cannot resolve: nope.test: ",
            1, true), out)
        -- the same name in a reload: refused, the running servers stay
        proxy:rewrite_config(CONFIG:gsub("api%.test", "nope.test"), { marker = "first" })
        local res = assert(proxy:admin("POST", "/reload"))
        assert.are_not.equal(200, res.status)
        assert.truthy(res.body:find("cannot resolve: nope.test", 1, true), res.body)
        proxy:rewrite_config(CONFIG, { marker = "first" })
        assert.same({ addr("127.0.0.1"), addr("127.0.0.2") }, (servers(proxy, "api")))
    end)

    it("follows changed answers while requests flow: servers join and drain, none fails", function()
        local before = proxy:server_state("api", addr("127.0.0.2")).requests
        -- an edit on disk that was never reloaded must not go live with the refresh
        proxy:rewrite_config(CONFIG, { marker = "unsaved" })
        d:set { ["api.test"] = { ttl = 1, "127.0.0.2", "127.0.0.3" } }
        local seen, failed, n = {}, {}, 0
        local deadline = socket.gettime() + 15
        repeat
            local name, err = who(proxy.port)
            n = n + 1
            if name then seen[name] = (seen[name] or 0) + 1 else failed[#failed + 1] = err end
            local ok, list = pcall(servers, proxy, "api")
            local done = ok and table.concat(list, " ") == addr("127.0.0.2") .. " " .. addr("127.0.0.3")
        until (done and (seen.three or 0) >= 3) or socket.gettime() > deadline or n > 5000
        assert.same({}, failed)
        assert(seen.three and seen.three >= 3, "three never answered: " .. n .. " requests")
        wait_servers { addr("127.0.0.2"), addr("127.0.0.3") }
        -- 127.0.0.1 drained: no request reaches it any more
        local after = {}
        for _ = 1, 10 do after[assert(who(proxy.port))] = true end
        assert.same({ two = true, three = true }, after)
        assert.equal(1, proxy:log_count("resolve: api.test: added [127.0.0.3], removed [127.0.0.1]"))
        -- the server that stayed kept its counters (its health and pool)
        assert(proxy:server_state("api", addr("127.0.0.2")).requests >= before, "127.0.0.2 lost its state")
        assert.equal("first", raw.get(proxy.port, "/marker", nil, { timeout = 5 }).body)
        proxy:rewrite_config(CONFIG, { marker = "first" })

        d:set { ["api.test"] = { ttl = 1, "127.0.0.1", "127.0.0.2" } }
        wait_servers { addr("127.0.0.1"), addr("127.0.0.2") }
    end)

    it("keeps the last answer when a lookup times out, and says so once", function()
        wait_servers { addr("127.0.0.1"), addr("127.0.0.2") }
        local failure = "resolve: api.test: lookup failed (api.test: no answer in time): keeping the last answer ("
        assert.equal(0, proxy:log_count(failure))
        d:set { ["api.test"] = "silent" }
        h.eventually(function() return proxy:log_count(failure) == 1 end, 10)
        -- more lookups fail (a retry every resolve.min after each 1 s timeout): still one line
        local q = d:queries("api.test")
        h.eventually(function() return d:queries("api.test") >= q + 4 end, 10)
        assert.equal(1, proxy:log_count(failure))
        assert.equal(1, proxy:log_count(failure .. "127.0.0.1, 127.0.0.2)"))
        assert.same({ addr("127.0.0.1"), addr("127.0.0.2") }, (servers(proxy, "api")))
        local seen = {}
        for _ = 1, 8 do seen[assert(who(proxy.port))] = true end
        assert.same({ one = true, two = true }, seen)
        -- answers again: said once, and nothing changed
        d:set { ["api.test"] = { ttl = 1, "127.0.0.1", "127.0.0.2" } }
        h.eventually(function() return proxy:log_count("resolve: api.test answers again") == 1 end, 10)
        assert.same({ addr("127.0.0.1"), addr("127.0.0.2") }, (servers(proxy, "api")))
    end)
end)

describe("upstreams by name from settings.resolver.hosts", function()
    local d, two, proxy, port_o

    lazy_setup(function()
        port_o = h.free_port()
        two = start_origin("two", "127.0.0.2", port_o)
        d = dns.start {} -- knows no name: the hosts file answers
        local hosts = h.write_file(h.tmpname(".hosts"), "# spec\n127.0.0.2  web.test  www.web.test\n")
        proxy = h.start_proxy { workers = 1, vars = { dns = d.addr, hosts = hosts, port_o = port_o }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", resolver = { nameservers = { "${dns}" }, hosts = "${hosts}" } }
proxy.route { prefix = "/", upstream = proxy.upstream "web" { servers = { "www.web.test:${port_o}" } } }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, two, d)
    end)

    it("resolves a name from the hosts file, without asking DNS", function()
        local list, names = servers(proxy, "web")
        assert.same({ "127.0.0.2:" .. port_o }, list)
        assert.equal("www.web.test:" .. port_o, names["127.0.0.2:" .. port_o])
        for _ = 1, 3 do assert.equal("two", assert(who(proxy.port))) end
        assert.equal(0, d:queries("www.web.test"))
    end)
end)

describe("upstreams by name when the rebuild for a new answer is refused", function()
    local d, one, two, proxy, port_o

    lazy_setup(function()
        port_o = h.free_port()
        one = start_origin("one", "127.0.0.1", port_o)
        two = start_origin("two", "127.0.0.2", port_o)
        d = dns.start { ["api.test"] = { ttl = 1, "127.0.0.1" } }
        -- a guard that holds for the answer at start only
        proxy = h.start_proxy { workers = 1, vars = { dns = d.addr, port_o = port_o }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", resolver = { nameservers = { "${dns}" }, timeout = 1 } }
local api = proxy.upstream "api" { servers = { "api.test:${port_o}" }, resolve = { min = 0.2, max = 0.3 } }
proxy.route { prefix = "/", upstream = api }
proxy.expect { request = { path = "/x" }, server = "127.0.0.1:${port_o}" }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, one, two, d)
    end)

    it("keeps the running servers, and says so once, not at every lookup", function()
        d:set { ["api.test"] = { ttl = 1, "127.0.0.2" } }
        h.eventually(function() return proxy:log_count("reload refused (DNS: api.test changed)") == 1 end, 10)
        -- lookups go on (every 0.3 s) with the same answer: no second refusal
        local q = d:queries("api.test")
        h.eventually(function() return d:queries("api.test") >= q + 8 end, 10)
        assert.equal(1, proxy:log_count("reload refused"))
        assert.equal(1, proxy:log_count("resolve: api.test: added [127.0.0.2], removed [127.0.0.1]"))
        assert.same({ "127.0.0.1:" .. port_o }, (servers(proxy, "api")))
        for _ = 1, 3 do assert.equal("one", assert(who(proxy.port))) end
    end)
end)

describe("upstreams by name over TLS", function()
    local tls = require "helpers.tls"
    local pki, origin, proxy

    lazy_setup(function()
        pki = tls.pki()
        origin = tls.start_origin("secure", pki.api) -- a certificate for api.example.test only
        local hosts = h.write_file(h.tmpname(".hosts"), "127.0.0.1 api.example.test\n")
        proxy = h.start_proxy { workers = 1, vars = { hosts = hosts, port_o = origin.port, ca = pki.ca }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", resolver = { hosts = "${hosts}", nameservers = { "127.0.0.1:1" } } }
proxy.route { prefix = "/", upstream = proxy.upstream "secure" { servers = { "api.example.test:${port_o}" },
                                                                  tls = { ca = "${ca}" } } }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, origin)
        if pki then pki:remove() end
    end)

    it("verifies the server's certificate against the name, sent as SNI", function()
        assert.equal("secure", assert(who(proxy.port)))
        assert.same({ "127.0.0.1:" .. origin.port }, (servers(proxy, "secure")))
        -- the proxy's handshakes asked for the name (the spec's own /_stats connections send no SNI: "")
        local asked = {}
        for _, name in ipairs(origin:stats().tls_sni) do asked[name] = true end
        asked[""] = nil
        assert.same({ ["api.example.test"] = true }, asked)
    end)
end)
