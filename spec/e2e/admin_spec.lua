-- End-to-end: the admin port refuses what a web page in an operator's browser
-- could send (SPEC "Admin access"): any request with an Origin field (a
-- cross-site POST /rollback), and a Host that does not name the admin port
-- (DNS rebinding reading /configz). /live and /ready take any Host, so that
-- orchestrator probes by the pod's address keep working.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
]=]

local EVIL = "http://evil.example"

-- One request to proxy's admin port with these header pairs (Host only when given).
local function admin_request(proxy, method, target, headers)
    local res, err = raw.request(proxy.admin_port, { method = method, target = target, headers = headers,
        no_host = true, body = method == "POST" and "" or nil }, { timeout = 10 })
    assert(res, err)
    return res
end

describe("the admin port against browsers", function()
    local a, proxy

    local function admin(method, target, headers)
        return admin_request(proxy, method, target, headers)
    end

    local function generation()
        local res, doc = proxy:admin("GET", "/configz")
        assert.equal(200, res.status)
        return doc.generation
    end

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr } }
        proxy:wait_ready()
        -- a previous generation, so that a rollback would do something
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("refuses POST /rollback with an Origin field (403), and does not roll back", function()
        local before = generation()
        local self_host = "127.0.0.1:" .. proxy.admin_port
        local res = admin("POST", "/rollback", { { "Host", self_host }, { "Origin", EVIL } })
        assert.equal(403, res.status)
        res = admin("POST", "/reload", { { "Host", self_host }, { "Origin", "null" } })
        assert.equal(403, res.status)
        assert.equal(before, generation())
    end)

    it("refuses GET /configz with an Origin field (403)", function()
        local res = admin("GET", "/configz", { { "Host", "127.0.0.1:" .. proxy.admin_port }, { "Origin", EVIL } })
        assert.equal(403, res.status)
        assert.is_nil(res.body:find("generation", 1, true))
    end)

    it("refuses a Host that does not name the admin port (403), on every endpoint but the probes", function()
        local evil = "evil.example:" .. proxy.admin_port
        for _, t in ipairs { { "GET", "/configz" }, { "GET", "/upstreams" }, { "GET", "/metrics" },
            { "POST", "/rollback" }, { "GET", "/" } } do
            local res = admin(t[1], t[2], { { "Host", evil } })
            assert.equal(403, res.status, t[1] .. " " .. t[2])
        end
        assert.equal(403, admin("GET", "http://" .. evil .. "/configz", { { "Host", evil } }).status)
        assert.equal(403, admin("GET", "/configz", { { "Host", "127.0.0.1:1" } }).status)
    end)

    it("serves the configured address and localhost with its port", function()
        for _, host in ipairs { "127.0.0.1:" .. proxy.admin_port, "localhost:" .. proxy.admin_port,
            "LOCALHOST:" .. proxy.admin_port } do
            local res = admin("GET", "/configz", { { "Host", host } })
            assert.equal(200, res.status, host)
        end
    end)

    it("refuses bare localhost (SPEC: localhost with its port)", function()
        assert.equal(403, admin("GET", "/configz", { { "Host", "localhost" } }).status)
    end)

    it("serves an HTTP/1.0 request without Host", function()
        local res = assert(raw.request(proxy.admin_port, "GET /configz HTTP/1.0\r\n\r\n"))
        assert.equal(200, res.status)
    end)

    it("answers /live and /ready whatever the Host, but refuses them with an Origin", function()
        for _, path in ipairs { "/live", "/ready" } do
            assert.equal(200, admin("GET", path, { { "Host", "10.1.2.3:8085" } }).status, path)
            assert.equal(403, admin("GET", path, { { "Host", "localhost" }, { "Origin", EVIL } }).status, path)
        end
    end)
end)

-- An admin address on port 0: the names it answers to come from the port it
-- was bound to, not from the address as written.
describe("the admin port on port 0", function()
    local proxy, port

    lazy_setup(function()
        proxy = h.start_proxy { workers = 1, vars = { admin = "127.0.0.1:0" }, config = [[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "ok\n") end }
]] }
        -- the log does not print the admin port: it is the proxy's other listening socket
        h.eventually(function()
            local ss = io.popen("ss -Htlnp 2>/dev/null")
            local out = ss:read("*a")
            ss:close()
            for p in out:gmatch("127%.0%.0%.1:(%d+)[^\n]*pid=" .. proxy.pid .. ",") do
                if tonumber(p) ~= proxy.port then port = tonumber(p) end
            end
            return port ~= nil
        end, 5)
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
    end)

    local function configz(host)
        local res, err = raw.request(port, { method = "GET", target = "/configz", headers = { { "Host", host } } },
            { timeout = 10 })
        assert(res, err)
        return res.status
    end

    it("serves the bound address and localhost with the bound port", function()
        assert.equal(200, configz("127.0.0.1:" .. port))
        assert.equal(200, configz("localhost:" .. port))
    end)

    it("refuses the address as written (port 0)", function()
        assert.equal(403, configz("127.0.0.1:0"))
        assert.equal(403, configz("localhost:0"))
    end)
end)

local TOKEN_CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}", token = "${token}" }
proxy.settings { access_log = false }
proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
]=]

describe("the admin port with a token", function()
    local a, proxy
    local TOKEN = "t0k3n-" .. tostring(os.time())

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { config = TOKEN_CONFIG, vars = { a = a.addr, token = TOKEN }, admin_token = TOKEN }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    local function admin(method, target, headers)
        return admin_request(proxy, method, target, headers)
    end

    local function host()
        return { "Host", "127.0.0.1:" .. proxy.admin_port }
    end

    it("answers 401 without Authorization: Bearer, on every endpoint but the probes", function()
        for _, t in ipairs { { "GET", "/configz" }, { "GET", "/metrics" }, { "GET", "/upstreams" },
            { "POST", "/reload" }, { "POST", "/rollback" }, { "GET", "/nowhere" } } do
            local res = admin(t[1], t[2], { host() })
            assert.equal(401, res.status, t[1] .. " " .. t[2])
            assert.matches("^Bearer", res:header("www-authenticate"))
        end
        assert.equal(200, admin("GET", "/live", { host() }).status)
        assert.equal(200, admin("GET", "/ready", { host() }).status)
    end)

    it("refuses a wrong token, another scheme, and the token with a byte more or less", function()
        for _, v in ipairs { "Bearer wrong", "Basic " .. TOKEN, "Bearer " .. TOKEN .. "x",
            "Bearer " .. TOKEN:sub(1, -2), "Bearer", TOKEN } do
            assert.equal(401, admin("GET", "/configz", { host(), { "Authorization", v } }).status, v)
        end
    end)

    it("serves every endpoint to the token, whatever the Host (a browser cannot send it)", function()
        local auth = { "Authorization", "Bearer " .. TOKEN }
        assert.equal(200, admin("GET", "/configz", { host(), auth }).status)
        assert.equal(200, admin("GET", "/configz", { { "Host", "other.example:1" }, { "authorization", "bearer " .. TOKEN } }).status)
        assert.equal(200, admin("GET", "/metrics", { { "Host", "10.0.0.1:8085" }, auth }).status)
        assert.equal(200, admin("POST", "/reload", { host(), auth }).status)
    end)

    it("still refuses a request with Origin (403), even with the token", function()
        local res = admin("POST", "/rollback", { host(), { "Authorization", "Bearer " .. TOKEN }, { "Origin", EVIL } })
        assert.equal(403, res.status)
    end)

    it("takes a new token on reload, and refuses the old one from then on", function()
        local NEW = TOKEN .. "-2"
        proxy:rewrite_config(TOKEN_CONFIG, { token = NEW })
        local res = assert(proxy:admin("POST", "/reload"))
        assert.equal(200, res.status)
        proxy.admin_token = NEW
        assert.equal(401, admin("GET", "/configz", { host(), { "Authorization", "Bearer " .. TOKEN } }).status)
        assert.equal(200, admin("GET", "/configz", { host(), { "Authorization", "Bearer " .. NEW } }).status)
        assert.equal(200, assert(proxy:admin("GET", "/configz")).status)
    end)
end)

-- The admin port's TLS follows the current configuration (a reload turns it
-- on or off for new connections), and health probes to a TLS upstream run a
-- verified handshake first: one that does not verify is a failed check.
describe("the admin port and health probes over TLS", function()
    local tls = require "helpers.tls"
    local HEAD = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = false }
local hc = { path = "/hc", interval = 0.2, timeout = 1, rise = 1, fall = 1 }
proxy.route { prefix = "/good/", upstream = proxy.upstream "good" { servers = { "${o}" }, tls = { ca = "${ca}" },
  health = hc } }
proxy.route { prefix = "/misnamed/", upstream = proxy.upstream "misnamed" { servers = { "${o}" },
  tls = { ca = "${ca}", server_name = "api.example.test" }, health = hc } }
]=]
    local PLAIN = HEAD .. 'proxy.admin { addr = "${admin}" }\n'
    local TLS = HEAD .. 'proxy.admin { addr = "${admin}", tls = { cert = "${cert}", key = "${key}" } }\n'
    local pki, o, proxy

    lazy_setup(function()
        pki = tls.pki()
        o = tls.start_origin("o", pki.localhost)
        proxy = h.start_proxy { workers = 1, config = PLAIN,
            vars = { o = o.addr, ca = pki.ca, cert = pki.localhost.cert, key = pki.localhost.key } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, o)
        if pki then pki:remove() end
    end)

    local function tls_admin(method, target)
        return tls.request(proxy.admin_port, { method = method, target = target,
            headers = { { "Host", "localhost:" .. proxy.admin_port } }, body = method == "POST" and "" or nil },
            { ca = pki.ca, sni = "localhost", timeout = 10 })
    end

    it("checks a TLS server with a verified handshake; one whose name does not verify is down, and says why", function()
        h.eventually(function() return o:path_count("/hc") >= 2 end, 5)
        assert.is_true(proxy:server_state("good", o.addr).probe_up)
        h.eventually(function() return proxy:server_state("misnamed", o.addr).probe_up == false end, 5)
        assert.is_true(proxy:log_count("health: upstream misnamed", "certificate verify failed: hostname mismatch") >= 1)
    end)

    it("serves TLS to new connections after a reload turns it on, and plain again after one turns it off", function()
        proxy:rewrite_config(TLS)
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
        local res = h.eventually(function() return tls_admin("GET", "/live") end, 5)
        assert.equal(200, res.status)
        assert.equal("TLSv1.3", res.tls.version)
        assert.equal(200, assert(tls_admin("GET", "/upstreams")).status)
        local plain, err = proxy:admin("GET", "/live", { timeout = 5 })
        if plain then assert.equal(400, plain.status) else assert.are_not.equal("timeout", err) end
        -- the probes kept their TLS context across the reload
        local seen = o:path_count("/hc")
        h.eventually(function() return o:path_count("/hc") >= seen + 2 end, 5)

        proxy:rewrite_config(PLAIN)
        assert.equal(200, assert(tls_admin("POST", "/reload")).status)
        assert.equal(200, assert(proxy:admin("GET", "/live")).status)
        assert.is_true(proxy:server_state("good", o.addr).probe_up)
    end)
end)
