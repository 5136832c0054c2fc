-- End-to-end: the verification stores upstream TLS shares (src/tls.c keeps
-- one per CA file, by path and content digest, and one for the system
-- store): many upstreams on one CA file all verify, a reload after the file
-- was replaced by another CA verifies against the new one only, two CA files
-- stay apart, and the system store (here SSL_CERT_FILE, as OpenSSL reads it)
-- follows a bundle replaced before a reload. Against the real binary with
-- two workers (every worker builds its own contexts from the shared stores).
local ffi = require "ffi"
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"

pcall(ffi.cdef, [[
int setenv(const char *name, const char *value, int overwrite);
int unsetenv(const char *name);
]])

local HEAD = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local function up(name, server, tls)
  local u = proxy.upstream(name) { servers = { server }, tls = tls, retries = 0,
                                   timeouts = { connect = 2, send = 5, read = 5 } }
  proxy.route { prefix = "/" .. name .. "/", upstream = u }
end
]=]

-- The status of GET /NAME/x through the proxy.
local function status(proxy, name)
    return assert(raw.get(proxy.port, "/" .. name .. "/x", nil, { timeout = 10 })).status
end

-- POST /reload, which answers once every worker runs the new generation.
local function reload(proxy)
    local res = assert(proxy:admin("POST", "/reload"))
    assert.equal(200, res.status, res.body)
end

describe("upstream TLS verification stores #tls", function()
    local pki, other_ca, a, b

    lazy_setup(function()
        pki = tls.pki()
        -- origin a: signed by the test CA; origin b: by another CA, for the same names
        other_ca = pki:new_ca("other_server_ca", "moonproxy other server CA")
        local b_pair = pki:issue("b_localhost", { sans = { "DNS:localhost", "IP:127.0.0.1" } }, other_ca)
        a = tls.start_origin("a", pki.localhost)
        b = tls.start_origin("b", b_pair)
    end)

    lazy_teardown(function()
        if a then a:stop() end
        if b then b:stop() end
        if pki then pki:remove() end
    end)

    describe("50 upstreams on one ca file", function()
        local proxy

        lazy_setup(function()
            proxy = h.start_proxy { workers = 2, vars = { a = a.addr, b = b.addr, ca = pki.ca }, config = HEAD .. [=[
for i = 1, 50 do up("u" .. i, "${a}", { ca = "${ca}" }) end
for i = 1, 50 do up("n" .. i, "${b}", { ca = "${ca}" }) end
]=] }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("verifies the origin on every one of them, and refuses another CA's origin on every one", function()
            for i = 1, 50 do
                local e = h.echo(raw.get(proxy.port, "/u" .. i .. "/x", nil, { timeout = 10 }))
                assert.equal("a", e.name, "upstream u" .. i)
            end
            for i = 1, 50 do assert.equal(502, status(proxy, "n" .. i), "upstream n" .. i) end
            assert.equal(50, proxy:log_count("certificate verify failed"))
        end)

        it("verifies on every one after a reload of the same script", function()
            reload(proxy)
            for i = 1, 50 do assert.equal(200, status(proxy, "u" .. i), "upstream u" .. i) end
            assert.equal(502, status(proxy, "n1"))
        end)
    end)

    describe("a ca file replaced by another CA, then a reload", function()
        local proxy, ca_path

        lazy_setup(function()
            ca_path = h.tmpname(".ca.pem")
            h.write_file(ca_path, assert(h.read_file(pki.ca)))
            proxy = h.start_proxy { workers = 2, vars = { a = a.addr, b = b.addr, ca = ca_path }, config = HEAD .. [=[
up("a", "${a}", { ca = "${ca}" })
up("b", "${b}", { ca = "${ca}" })
]=] }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("verifies against the new CA only: the old CA's origin fails, the new one's passes", function()
            assert.equal(200, status(proxy, "a"))
            assert.equal(502, status(proxy, "b"))
            h.write_file(ca_path, assert(h.read_file(other_ca.cert)))
            reload(proxy)
            -- twice each: a pooled connection to a from before the reload must not serve either
            for _ = 1, 2 do
                assert.equal(502, status(proxy, "a"))
                assert.equal(200, status(proxy, "b"))
            end
            -- and back: the first CA's store is built again from the file
            h.write_file(ca_path, assert(h.read_file(pki.ca)))
            reload(proxy)
            assert.equal(200, status(proxy, "a"))
            assert.equal(502, status(proxy, "b"))
        end)
    end)

    describe("two ca files on two pairs of upstreams", function()
        local proxy

        lazy_setup(function()
            proxy = h.start_proxy { workers = 2, vars = { a = a.addr, b = b.addr, ca = pki.ca, ca2 = other_ca.cert },
                config = HEAD .. [=[
up("a_by_ca", "${a}", { ca = "${ca}" })
up("b_by_ca", "${b}", { ca = "${ca}" })
up("a_by_ca2", "${a}", { ca = "${ca2}" })
up("b_by_ca2", "${b}", { ca = "${ca2}" })
]=] }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("keeps them apart: each verifies only the origin its CA signed", function()
            for _ = 1, 2 do
                assert.equal("a", h.echo(raw.get(proxy.port, "/a_by_ca/x")).name)
                assert.equal("b", h.echo(raw.get(proxy.port, "/b_by_ca2/x")).name)
                assert.equal(502, status(proxy, "b_by_ca"))
                assert.equal(502, status(proxy, "a_by_ca2"))
            end
        end)
    end)

    describe("the system store (SSL_CERT_FILE)", function()
        local proxy, bundle

        lazy_setup(function()
            bundle = h.tmpname(".bundle.pem")
            h.write_file(bundle, assert(h.read_file(pki.ca)))
            ffi.C.setenv("SSL_CERT_FILE", bundle, 1)
            proxy = h.start_proxy { workers = 2, vars = { a = a.addr, b = b.addr }, config = HEAD .. [=[
for i = 1, 20 do up("a" .. i, "${a}", {}) end
up("b", "${b}", {})
up("named", "${a}", { server_name = "api.example.test" })
up("late", "${a}", {})
local http = require "moonproxy.http"
for name, addr in pairs { a = "${a}", b = "${b}" } do
  proxy.route { path = "/https-" .. name, handler = function(req)
    local res, err = http.request { url = "https://" .. addr .. "/x", timeout = 2 }
    return req:respond(200, res and (res.status .. " " .. tostring(res.headers["x-origin"])) or ("error: " .. err))
  end }
end
]=] }
            ffi.C.unsetenv("SSL_CERT_FILE")
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("verifies the origin and its name on every upstream", function()
            for i = 1, 20 do assert.equal(200, status(proxy, "a" .. i), "upstream a" .. i) end
            assert.equal(502, status(proxy, "b"))
            assert.equal(502, status(proxy, "named")) -- the certificate is for localhost, not api.example.test
        end)

        it("verifies https URLs of hooks against it too", function()
            for _ = 1, 2 do -- on each worker, as the connection lands
                assert.equal("200 a", assert(raw.get(proxy.port, "/https-a")).body)
                assert.matches("^error: TLS handshake failed: .*certificate verify failed",
                    assert(raw.get(proxy.port, "/https-b")).body)
            end
        end)

        it("follows a bundle replaced before a reload, also over connections pooled before it", function()
            h.write_file(bundle, assert(h.read_file(other_ca.cert)))
            reload(proxy)
            assert.equal(502, status(proxy, "late")) -- no connection of its own before the reload
            assert.equal(502, status(proxy, "a1"))  -- its pooled one was verified against the old bundle
            assert.equal(200, status(proxy, "b"))
        end)
    end)
end)
