-- End-to-end: message framing through the proxy: keep-alive, pipelining,
-- HTTP/1.0, request bodies (Content-Length, chunked, 100-continue) and
-- responses without bodies or with chunked / close-delimited bodies.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }
proxy.route { prefix = "/", upstream = a }
]=]

describe("moonproxy framing", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    local function connect()
        return assert(raw.connect(proxy.port))
    end

    describe("connections", function()
        it("serves several requests on one keep-alive client connection", function()
            local c = connect()
            finally(function() c:close() end)
            for i = 1, 3 do
                local e = h.echo(c:request { target = "/ka?n=" .. i })
                assert.equal("/ka?n=" .. i, e.target)
            end
        end)

        it("answers 3 pipelined requests in order", function()
            local c = connect()
            finally(function() c:close() end)
            local list = assert(raw.pipeline(c, {
                { target = "/p?n=1" }, { target = "/p?n=2" }, { target = "/p?n=3" },
            }))
            for i = 1, 3 do assert.equal("/p?n=" .. i, h.echo(list[i]).target) end
        end)

        it("answers pipelined requests with bodies in order", function()
            local c = connect()
            finally(function() c:close() end)
            local list = assert(raw.pipeline(c, {
                { method = "POST", target = "/p?n=1", body = "first" },
                { target = "/p?n=2" },
                { method = "POST", target = "/p?n=3", body = ("x"):rep(5000) },
            }))
            assert.equal(origin.checksum("first"), h.echo(list[1]).body_sum)
            assert.equal("/p?n=2", h.echo(list[2]).target)
            assert.equal(origin.checksum(("x"):rep(5000)), h.echo(list[3]).body_sum)
        end)

        it("answers pipelined requests in order when the first one is slow", function()
            local c = connect()
            finally(function() c:close() end)
            local list = assert(raw.pipeline(c, {
                { target = "/slow?ms=300" }, { target = "/p?n=2" }, { target = "/p?n=3" },
            }))
            assert.equal("/slow?ms=300", h.echo(list[1]).target)
            assert.equal("/p?n=2", h.echo(list[2]).target)
            assert.equal("/p?n=3", h.echo(list[3]).target)
        end)

        it("parses a request sent in small pieces", function()
            local c = connect()
            finally(function() c:close() end)
            local bytes = raw.build { method = "POST", target = "/pieces?x=1", headers = { { "Host", "x" }, { "X-A", "b" } },
                                      body = "0123456789" }
            local pieces = {}
            for i = 1, #bytes, 7 do pieces[#pieces + 1] = bytes:sub(i, i + 6) end
            assert(c:send_pieces(pieces, 0.002))
            local e = h.echo(c:read_response())
            assert.equal("/pieces?x=1", e.target)
            assert.equal("b", h.echo_header(e, "x-a"))
            assert.equal(origin.checksum("0123456789"), e.body_sum)
        end)

        it("serves slow requests on 10 connections in parallel", function()
            local conns = {}
            finally(function() for _, c in ipairs(conns) do c:close() end end)
            local t0 = socket.gettime()
            for i = 1, 10 do
                conns[i] = connect()
                assert(conns[i]:send(raw.build { target = "/slow?ms=600&i=" .. i }))
            end
            for i = 1, 10 do
                assert.equal("/slow?ms=600&i=" .. i, h.echo(conns[i]:read_response()).target)
            end
            assert.is_true(socket.gettime() - t0 < 2.5, "took " .. (socket.gettime() - t0) .. " s")
        end)

        it("answers an HTTP/1.0 client and closes the connection", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { target = "/old", version = "HTTP/1.0" })
            assert.equal("/old", h.echo(res).target)
            assert.is_true(c:wait_closed(3))
        end)

        it("keeps an HTTP/1.0 connection with Connection: keep-alive open", function()
            local c = connect()
            finally(function() c:close() end)
            local req = { target = "/old-ka", version = "HTTP/1.0", headers = { { "Host", "x" }, { "Connection", "keep-alive" } } }
            local res = assert(c:request(req))
            assert.equal(200, res.status)
            assert.is_true(res:has_token("connection", "keep-alive"))
            assert.equal("/old-ka", h.echo(assert(c:request(req))).target)
        end)
    end)

    describe("request bodies", function()
        it("forwards a Content-Length body intact", function()
            local body = origin.pattern(100000)
            local e = h.echo(raw.request(proxy.port, { method = "POST", target = "/cl", body = body }))
            assert.equal(#body, e.body_len)
            assert.equal(origin.checksum(body), e.body_sum)
        end)

        it("forwards a chunked body with extensions and a trailer intact", function()
            local parts = { "hello ", ("w"):rep(3000), "!" }
            local bytes = "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                .. string.format("%x;name=first\r\n%s\r\n", #parts[1], parts[1])
                .. string.format("%X;a=1;b=\"q\"\r\n%s\r\n", #parts[2], parts[2])
                .. string.format("%x\r\n%s\r\n", #parts[3], parts[3])
                .. "0;last\r\nX-Sum: 42\r\n\r\n"
            local body = table.concat(parts)
            local e = h.echo(raw.request(proxy.port, bytes))
            assert.equal(#body, e.body_len)
            assert.equal(origin.checksum(body), e.body_sum)
        end)

        it("sends 100 Continue before the body of an Expect: 100-continue request", function()
            local c = connect()
            finally(function() c:close() end)
            local body = origin.pattern(20000)
            assert(c:send("POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #body
                .. "\r\nExpect: 100-continue\r\n\r\n"))
            local interim = assert(c:read_response { interim = true, timeout = 3 })
            assert.equal(100, interim.status)
            assert.equal("HTTP/1.1 100 Continue", interim.status_line)
            assert(c:send(body))
            local e = h.echo(c:read_response())
            assert.equal(#body, e.body_len)
            assert.equal(origin.checksum(body), e.body_sum)
        end)
    end)

    describe("responses without a body", function()
        it("answers HEAD with the headers and no body", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { method = "HEAD", target = "/head" })
            assert.equal(200, res.status)
            assert.equal(0, res.body_len)
            assert.equal("/next", h.echo(c:request { target = "/next" }).target)
            assert.equal("", c.buf)
        end)

        it("answers HEAD for a chunked resource without waiting for a body", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { method = "HEAD", target = "/big?size=5000&chunked=1" })
            assert.equal(200, res.status)
            assert.equal(0, res.body_len)
            assert.equal("/next", h.echo(c:request { target = "/next" }).target)
        end)

        it("passes 204 without a body and keeps the connection usable", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { target = "/status/204" })
            assert.equal(204, res.status)
            assert.equal(0, res.body_len)
            assert.equal("/next", h.echo(c:request { target = "/next" }).target)
        end)

        it("passes 304 without a body and keeps the connection usable", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { target = "/status/304?cl=10" })
            assert.equal(304, res.status)
            assert.equal(0, res.body_len)
            assert.equal("/next", h.echo(c:request { target = "/next" }).target)
        end)
    end)

    describe("response bodies", function()
        it("reach an HTTP/1.1 client chunked when the origin chunks", function()
            local res = assert(raw.get(proxy.port, "/big?size=300000&chunked=1"))
            assert.equal(200, res.status)
            assert.is_true(res.chunked)
            assert.equal(300000, res.body_len)
            assert.equal(origin.pattern_sum(300000), origin.checksum(res.body))
        end)

        it("reach an HTTP/1.0 client de-chunked and close-delimited", function()
            local c = connect()
            finally(function() c:close() end)
            local res = assert(c:request { target = "/big?size=300000&chunked=1", version = "HTTP/1.0" })
            assert.equal(200, res.status)
            assert.is_nil(res.chunked)
            assert.same({}, res:header_all("transfer-encoding"))
            assert.equal(300000, res.body_len)
            assert.equal(origin.pattern_sum(300000), origin.checksum(res.body))
            assert.is_true(c:wait_closed(3))
        end)

        it("stream: the head reaches the client before the origin sends the body", function()
            local c = connect()
            finally(function() c:close() end)
            local t0 = socket.gettime()
            assert(c:send(raw.build { target = "/slowbody?ms=1500" }))
            h.eventually(function()
                c:fill(socket.gettime() + 0.05)
                return c.buf:find("\r\n\r\n", 1, true)
            end, 3)
            assert.is_true(socket.gettime() - t0 < 1.2, "the head came after " .. (socket.gettime() - t0) .. " s")
            local res = assert(c:read_response())
            assert.equal("slow body\n", res.body)
            assert.is_true(socket.gettime() - t0 >= 1.2)
        end)

        it("are cut, not completed, when the origin closes before the Content-Length", function()
            local c = connect()
            finally(function() c:close() end)
            local res, err = c:request { target = "/truncated?size=100000" }
            assert.is_nil(res, "a complete response came back")
            assert.equal("closed", err)
        end)

        it("are cut, not completed, when the origin closes inside a chunk", function()
            local c = connect()
            finally(function() c:close() end)
            local res, err = c:request { target = "/truncated?size=100000&chunked=1" }
            assert.is_nil(res, "a complete response came back")
            assert.equal("closed", err)
        end)

        it("reach the client whole when the origin ends the body by closing", function()
            local res = assert(raw.get(proxy.port, "/noframe?size=50000"))
            assert.equal(200, res.status)
            assert.equal(50000, res.body_len)
            assert.equal(origin.pattern_sum(50000), origin.checksum(res.body))
        end)
    end)
end)
