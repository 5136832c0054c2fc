-- End-to-end: forwarding, routing, forwarded headers, hop-by-hop headers and
-- the access log, against the real binary and two origins ("a" and "b").
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }
local b = proxy.upstream "b" { servers = { "${b}" }, keepalive = 8 }
local a_host = proxy.upstream "a_host" { servers = { "${a}" }, host = "backend.internal" }
proxy.route { host = "b.example", prefix = "/", upstream = b }
proxy.route { prefix = "/api/", strip_prefix = true, upstream = a }
proxy.route { prefix = "/m/", method = "DELETE", upstream = b }
proxy.route { prefix = "/m/", upstream = a }
proxy.route { regex = [[^/re/\d+$]], upstream = b }
proxy.route { prefix = "/re/", upstream = a }
proxy.route { prefix = "/to-b/", upstream = b }
proxy.route { prefix = "/override/", upstream = a_host }
proxy.route { prefix = "/", upstream = a }
]=]

local REQUEST_ID = "^[A-Za-z0-9._:%-]+$"

describe("moonproxy forwarding", function()
    local a, b, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr, b = b.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    local function get(target, headers)
        return raw.get(proxy.port, target, headers)
    end

    describe("a GET", function()
        it("returns the origin's answer", function()
            local res = assert(get("/hello"))
            local e = h.echo(res)
            assert.equal("a", e.name)
            assert.equal("GET", e.method)
            assert.equal("/hello", e.target)
            assert.equal("a", res:header("x-origin"))
        end)

        it("preserves the query string", function()
            local e = h.echo(get("/q/x?a=1&b=two%20words&c"))
            assert.equal("/q/x?a=1&b=two%20words&c", e.target)
        end)

        it("passes the client's Host through", function()
            local e = h.echo(get("/host", { { "Host", "client.example" } }))
            assert.equal("client.example", h.echo_header(e, "host"))
        end)

        it("sends the upstream's host setting as Host", function()
            local e = h.echo(get("/override/x", { { "Host", "client.example" } }))
            assert.equal("backend.internal", h.echo_header(e, "host"))
        end)

        it("strips the route prefix and keeps the query", function()
            local e = h.echo(get("/api/users?x=1"))
            assert.equal("a", e.name)
            assert.equal("/users?x=1", e.target)
        end)
    end)

    describe("routing", function()
        it("sends a request for a routed host to that host's upstream", function()
            assert.equal("b", h.echo(get("/hello", { { "Host", "b.example" } })).name)
            assert.equal("a", h.echo(get("/hello", { { "Host", "other.example" } })).name)
        end)

        it("filters by method", function()
            local del = h.echo(raw.request(proxy.port, { method = "DELETE", target = "/m/x" }))
            local got = h.echo(get("/m/x"))
            assert.equal("b", del.name)
            assert.equal("a", got.name)
        end)

        it("tries a regex route before a prefix route", function()
            assert.equal("b", h.echo(get("/re/123")).name)
            assert.equal("a", h.echo(get("/re/abc")).name)
        end)

        it("picks the longest prefix", function()
            assert.equal("b", h.echo(get("/to-b/x")).name)
            assert.equal("a", h.echo(get("/to-c/x")).name)
        end)
    end)

    describe("forwarded headers", function()
        it("appends the client address to X-Forwarded-For", function()
            local e = h.echo(get("/xff", { { "X-Forwarded-For", "1.2.3.4" } }))
            assert.equal("1.2.3.4, 127.0.0.1", h.echo_header(e, "x-forwarded-for"))
        end)

        it("appends to several X-Forwarded-For lines as one list", function()
            local e = h.echo(get("/xff", { { "Host", "x" }, { "X-Forwarded-For", "1.1.1.1" }, { "X-Forwarded-For", "2.2.2.2" } }))
            assert.equal("1.1.1.1, 2.2.2.2, 127.0.0.1", h.echo_header(e, "x-forwarded-for"))
        end)

        it("sets X-Forwarded-For when the client sent none", function()
            local e = h.echo(get("/xff"))
            assert.equal("127.0.0.1", h.echo_header(e, "x-forwarded-for"))
        end)

        it("sets X-Forwarded-Proto to http", function()
            local e = h.echo(get("/xfp"))
            assert.equal("http", h.echo_header(e, "x-forwarded-proto"))
        end)

        it("replaces X-Forwarded-Proto and X-Forwarded-Host sent by the client", function()
            local e = h.echo(get("/xf", { { "Host", "real.example" }, { "X-Forwarded-Proto", "https" },
                                          { "X-Forwarded-Host", "spoofed.example" } }))
            assert.equal("http", h.echo_header(e, "x-forwarded-proto"))
            assert.equal("real.example", h.echo_header(e, "x-forwarded-host"))
        end)

        it("sets X-Forwarded-Host to the client's Host", function()
            local e = h.echo(get("/override/xfh", { { "Host", "client.example:8080" } }))
            assert.equal("client.example:8080", h.echo_header(e, "x-forwarded-host"))
        end)

        it("keeps a sane X-Request-ID and echoes it", function()
            local res = assert(get("/rid", { { "X-Request-ID", "abc-123" } }))
            local e = h.echo(res)
            assert.equal("abc-123", h.echo_header(e, "x-request-id"))
            assert.equal("abc-123", res:header("x-request-id"))
        end)

        it("generates an X-Request-ID when the client sent none", function()
            local res = assert(get("/rid"))
            local id = h.echo_header(h.echo(res), "x-request-id")
            assert.is_string(id)
            assert.truthy(#id >= 1 and #id <= 128 and id:match(REQUEST_ID), id)
            assert.equal(id, res:header("x-request-id"))
        end)

        it("replaces an X-Request-ID with a space in it", function()
            local res = assert(get("/rid", { { "X-Request-ID", "abc 123" } }))
            local id = h.echo_header(h.echo(res), "x-request-id")
            assert.is_string(id)
            assert.not_equal("abc 123", id)
            assert.truthy(#id >= 1 and #id <= 128 and id:match(REQUEST_ID), id)
            assert.equal(id, res:header("x-request-id"))
        end)

        it("keeps an X-Request-ID of 128 characters", function()
            local id = ("A1._:-"):rep(22):sub(1, 128)
            local res = assert(get("/rid", { { "X-Request-ID", id } }))
            assert.equal(id, h.echo_header(h.echo(res), "x-request-id"))
            assert.equal(id, res:header("x-request-id"))
        end)

        it("replaces an X-Request-ID of 129 characters", function()
            local long = ("r"):rep(129)
            local res = assert(get("/rid", { { "X-Request-ID", long } }))
            local id = h.echo_header(h.echo(res), "x-request-id")
            assert.not_equal(long, id)
            assert.truthy(#id >= 1 and #id <= 128 and id:match(REQUEST_ID), id)
        end)

        it("replaces an X-Request-ID of 200 characters", function()
            local long = ("r"):rep(200)
            local res = assert(get("/rid", { { "X-Request-ID", long } }))
            local id = h.echo_header(h.echo(res), "x-request-id")
            assert.is_string(id)
            assert.not_equal(long, id)
            assert.truthy(#id >= 1 and #id <= 128 and id:match(REQUEST_ID), id)
            assert.equal(id, res:header("x-request-id"))
        end)
    end)

    describe("hop-by-hop headers", function()
        it("are not forwarded to the origin", function()
            local e = h.echo(get("/hop", {
                { "Connection", "close, x-secret" },
                { "X-Secret", "s3cr3t" },
                { "Keep-Alive", "timeout=5" },
                { "Proxy-Connection", "keep-alive" },
                { "TE", "trailers" },
                { "Trailer", "X-Checksum" },
                { "Upgrade", "foo/1" },
                { "X-Kept", "yes" },
            }))
            for _, name in ipairs { "x-secret", "keep-alive", "proxy-connection", "te", "trailer", "upgrade" } do
                assert.same({}, h.echo_headers(e, name), name .. " was forwarded")
            end
            for _, v in ipairs(h.echo_headers(e, "connection")) do
                assert.falsy(v:lower():find("x-secret", 1, true), "Connection: " .. v)
            end
            assert.equal("yes", h.echo_header(e, "x-kept"))
        end)

        it("are not forwarded from the origin's response", function()
            local res = assert(get("/hop?resp_header=X-Hop:1&conn=X-Hop&resp_header=Keep-Alive:timeout%3D5"
                .. "&resp_header=Proxy-Connection:keep-alive&resp_header=Upgrade:foo%2F1"
                .. "&resp_header=Trailer:X-Checksum&resp_header=X-Kept:yes"))
            assert.equal(200, res.status)
            for _, name in ipairs { "x-hop", "keep-alive", "proxy-connection", "upgrade", "trailer" } do
                assert.same({}, res:header_all(name), name .. " was forwarded")
            end
            assert.is_false(res:has_token("connection", "x-hop"))
            assert.equal("yes", res:header("x-kept"))
        end)
    end)

    describe("the access log", function()
        it("has one JSON line per request with the documented fields", function()
            local before = #proxy:settled_access_log()
            local res = assert(get("/logged", { { "X-Request-ID", "log-1" } }))
            assert.equal(200, res.status)
            local missing = assert(get("/status/404"))
            assert.equal(404, missing.status)
            local entries = h.eventually(function()
                local t = proxy:access_log_entries()
                return #t >= before + 2 and t
            end, 5)
            assert.equal(before + 2, #entries)
            local e1, e2 = entries[before + 1], entries[before + 2]
            for _, f in ipairs { "time", "id", "client", "method", "path", "status", "bytes",
                                 "upstream", "upstream_time", "duration" } do
                assert.is_not_nil(e1[f], "field " .. f)
            end
            assert.equal("GET", e1.method)
            assert.equal("/logged", e1.path)
            assert.equal(200, e1.status)
            assert.equal("log-1", e1.id)
            assert.equal("/status/404", e2.path)
            assert.equal(404, e2.status)
        end)
    end)
end)

describe("moonproxy with 2 workers", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { a = a.addr, b = a.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("serves 50 concurrent connections with 10 pipelined requests each", function()
        local conns = {}
        finally(function() for _, c in ipairs(conns) do c:close() end end)
        for i = 1, 50 do
            conns[i] = assert(raw.connect(proxy.port))
            local reqs = {}
            for j = 1, 10 do
                reqs[j] = raw.build { method = "POST", target = "/c?i=" .. i .. "&j=" .. j, body = ("b"):rep(i * j) }
            end
            assert(conns[i]:send(table.concat(reqs)))
        end
        for i = 1, 50 do
            for j = 1, 10 do
                local e = h.echo(conns[i]:read_response())
                assert.equal("/c?i=" .. i .. "&j=" .. j, e.target)
                assert.equal(i * j, e.body_len)
            end
        end
    end)

    it("serves 40 requests from new connections", function()
        for i = 1, 40 do
            assert.equal("/w?i=" .. i, h.echo(raw.get(proxy.port, "/w?i=" .. i)).target)
        end
    end)
end)
