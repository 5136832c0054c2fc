-- End-to-end: requests the proxy must refuse (nothing of them reaches the
-- origin), routing misses, upstream failures and the client head timeout.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings {
  access_log = "${access_log}",
  client_header_timeout = 1,
  keepalive_timeout = 1,
  max_uri_size = "1k",
  max_header_size = "4k",
  max_body_size = "64k",
}
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }
local slow = proxy.upstream "slow" { servers = { "${a}" }, retries = 0, timeouts = { connect = 1, send = 5, read = 1 } }
local dead = proxy.upstream "dead" { servers = { "${dead}" }, timeouts = { connect = 1 } }
proxy.route { prefix = "/a/", strip_prefix = true, upstream = a }
proxy.route { prefix = "/t/", strip_prefix = true, upstream = slow }
local mixed = proxy.upstream "mixed" { servers = { "${dead}", "${a}" }, retries = 1, timeouts = { connect = 1 } }
local pair = proxy.upstream "pair" { servers = { "${a}", "${b}" }, retries = 1 }
proxy.route { prefix = "/dead/", upstream = dead }
proxy.route { prefix = "/mixed/", strip_prefix = true, upstream = mixed }
proxy.route { prefix = "/pair/", strip_prefix = true, upstream = pair }
]=]

describe("moonproxy errors", function()
    local a, b, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        proxy = h.start_proxy {
            workers = 1, config = CONFIG,
            vars = { a = a.addr, b = b.addr, dead = "127.0.0.1:" .. h.free_port() },
        }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    -- Sends bytes on a new connection and reads the answer.
    local function send_raw(bytes, timeout)
        local c = assert(raw.connect(proxy.port))
        local ok, err = c:send(bytes)
        local res, rerr = c:read_response { timeout = timeout or 5 }
        c:close()
        assert(res, "no response (send: " .. tostring(ok or err) .. "): " .. tostring(rerr))
        return res
    end

    -- Asserts that bytes get the status and that the origin received no
    -- request head (field "requests") or no complete request (field
    -- "completed") for them: a good request sent afterwards is the only new one.
    local function assert_refused(bytes, status, field)
        field = field or "requests"
        local before = a:stats()
        local res = send_raw(bytes)
        assert.equal(status, res.status)
        assert.is_nil(res:header("x-origin"), "the origin answered: " .. tostring(res.body))
        assert.equal(200, assert(raw.get(proxy.port, "/a/after")).status)
        local after = a:stats()
        assert.equal(before[field] + 1, after[field], "the origin got " .. field)
        return res
    end

    local GOOD_HEAD = "POST /a/echo HTTP/1.1\r\nHost: x\r\n"

    describe("400", function()
        it("refuses a malformed request line", function()
            assert_refused("GET /a/ech o HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        end)

        it("refuses an HTTP/1.1 request without Host", function()
            assert_refused("GET /a/echo HTTP/1.1\r\nX-A: 1\r\n\r\n", 400)
        end)

        it("refuses both Content-Length and Transfer-Encoding", function()
            assert_refused(GOOD_HEAD .. "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400)
        end)

        it("refuses two different Content-Lengths", function()
            assert_refused(GOOD_HEAD .. "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400)
        end)

        it("refuses a Content-Length list of equal values, or forwards it as one value", function()
            local res = send_raw(GOOD_HEAD .. "Content-Length: 5, 5\r\n\r\nhello")
            if res.status == 400 then
                assert.is_nil(res:header("x-origin"), "the origin answered: " .. tostring(res.body))
            else
                local e = h.echo(res)
                assert.same({ "5" }, h.echo_headers(e, "content-length"))
            end
        end)

        it("refuses a bad chunk size, and the origin gets no complete request", function()
            assert_refused(GOOD_HEAD .. "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n",
                400, "completed")
        end)

        it("refuses obs-fold", function()
            assert_refused("GET /a/echo HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", 400)
        end)

        it("refuses whitespace before a colon", function()
            assert_refused("GET /a/echo HTTP/1.1\r\nHost: x\r\nX-Space : b\r\n\r\n", 400)
        end)

        it("refuses a control byte in a header value", function()
            assert_refused("GET /a/echo HTTP/1.1\r\nHost: x\r\nX-Ctl: a\1b\r\n\r\n", 400)
        end)
    end)

    describe("size limits", function()
        it("answers 414 to a URI longer than max_uri_size", function()
            assert_refused("GET /a/" .. ("u"):rep(2000) .. " HTTP/1.1\r\nHost: x\r\n\r\n", 414)
        end)

        it("answers 431 to a head larger than max_header_size", function()
            assert_refused("GET /a/echo HTTP/1.1\r\nHost: x\r\nX-Big: " .. ("h"):rep(6000) .. "\r\n\r\n", 431)
        end)

        it("answers 413 to a Content-Length above max_body_size without waiting for the body", function()
            assert_refused(GOOD_HEAD .. "Content-Length: 100000\r\n\r\n", 413)
        end)

        it("answers 413 instead of 100 Continue to a too large Expect: 100-continue request", function()
            local res = assert_refused(GOOD_HEAD .. "Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n", 413)
            assert.same({}, res.interim)
        end)

        it("answers 413 to a chunked body growing past max_body_size, and the origin gets no complete request", function()
            local chunk = string.format("%x\r\n%s\r\n", 16384, ("c"):rep(16384))
            assert_refused(GOOD_HEAD .. "Transfer-Encoding: chunked\r\n\r\n" .. chunk:rep(6) .. "0\r\n\r\n",
                413, "completed")
        end)
    end)

    describe("other refusals", function()
        it("answers 400 to a Transfer-Encoding whose final coding is not chunked (RFC 9112 §6.3)", function()
            assert_refused(GOOD_HEAD .. "Transfer-Encoding: gzip\r\n\r\n", 400)
        end)

        it("answers 501 to an unknown Transfer-Encoding before chunked", function()
            assert_refused(GOOD_HEAD .. "Transfer-Encoding: gzip, chunked\r\n\r\n", 501)
        end)

        it("answers 404 when no route matches", function()
            assert_refused("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404)
        end)
    end)

    describe("upstream failures", function()
        it("answers 502 when the upstream refuses the connection", function()
            assert.equal(502, assert(raw.get(proxy.port, "/dead/x")).status)
        end)

        it("answers 502 when the origin closes without answering", function()
            assert.equal(502, assert(raw.get(proxy.port, "/a/reset")).status)
        end)

        it("answers 502 to an invalid response", function()
            assert.equal(502, assert(raw.get(proxy.port, "/a/garbage")).status)
        end)

        it("answers 504 when the origin answers after timeouts.read", function()
            local t0 = socket.gettime()
            local res = assert(raw.get(proxy.port, "/t/slow?ms=4000", nil, { timeout = 6 }))
            assert.equal(504, res.status)
            assert.is_true(socket.gettime() - t0 < 3.5)
        end)
    end)

    describe("retries", function()
        it("retry a request on another server when connecting fails", function()
            for i = 1, 4 do
                local e = h.echo(raw.request(proxy.port, { method = "POST", target = "/mixed/r?i=" .. i, body = "x" }))
                assert.equal("a", e.name)
            end
        end)

        it("retry a GET on another server when the connection breaks before the answer", function()
            local sa, sb = a:stats(), b:stats()
            assert.equal(502, assert(raw.get(proxy.port, "/pair/reset")).status)
            local na, nb = a:stats().requests - sa.requests, b:stats().requests - sb.requests
            assert.same({ 1, 1 }, { na, nb })
        end)

        it("do not replay a POST once it was sent", function()
            local sa, sb = a:stats(), b:stats()
            local res = assert(raw.request(proxy.port, { method = "POST", target = "/pair/reset", body = "once" }))
            assert.equal(502, res.status)
            local n = a:stats().requests - sa.requests + b:stats().requests - sb.requests
            assert.equal(1, n)
        end)
    end)

    describe("client_header_timeout", function()
        it("answers 408 to a stalled head and closes, while serving others", function()
            local loris = assert(raw.connect(proxy.port))
            finally(function() loris:close() end)
            local t0 = socket.gettime()
            assert(loris:send("GET /a/echo HTTP/1.1\r\nHost: x\r\nX-Half: "))
            local other = h.echo(raw.get(proxy.port, "/a/meanwhile"))
            assert.equal("/meanwhile", other.target)
            assert.is_true(socket.gettime() - t0 < 0.9, "the second client waited")
            local res = assert(loris:read_response { timeout = 5 })
            assert.equal(408, res.status)
            assert.is_true(socket.gettime() - t0 >= 0.9)
            assert.is_true(loris:wait_closed(3))
        end)
    end)

    describe("keepalive_timeout", function()
        it("closes a client connection idle for longer", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            assert.equal(200, assert(c:request { target = "/a/idle" }).status)
            local t0 = socket.gettime()
            assert.is_true(c:wait_closed(4))
            assert.is_true(socket.gettime() - t0 >= 0.8)
        end)
    end)
end)
