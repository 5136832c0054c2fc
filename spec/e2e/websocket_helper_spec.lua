-- The WebSocket helpers themselves (spec/helpers/websocket.lua), client
-- straight to the echo origin with no proxy between: the handshake key, the
-- three payload length encodings up to 5 MiB, text/binary/ping/close, the
-- origin's modes (200/403 answers, close:N, bye on half-close), TLS, and a
-- thousand connections at once (poll, not select). websocket_spec.lua puts
-- moonproxy between the same two.
local h = require "helpers.proxy"
local ws = require "helpers.websocket"
local tls = require "helpers.tls"
local origin_sum = require("helpers.origin").checksum
local socket = require "socket"
local cjson = require "cjson"

local function stats(o)
    local res = assert(o.get(o.port, "/_stats", nil, { timeout = 5 }))
    return cjson.decode(res.body)
end

describe("websocket helper", function()
    it("computes RFC 6455's example Sec-WebSocket-Accept and FIPS SHA-1 vectors", function()
        assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", ws.accept_key("dGhlIHNhbXBsZSBub25jZQ=="))
        assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", ws.sha1_hex("abc"))
        assert.equal("84983e441c3bd26ebaae4aa1f95129e5e54670f1",
            ws.sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))
        assert.equal("Zm9vYmFy", ws.base64("foobar"))
        assert.equal("Zm9vYg==", ws.base64("foob"))
    end)

    it("frames lengths 125, 126 and 65536 with 7-bit, 16-bit and 64-bit lengths", function()
        assert.equal(2 + 125, #ws.frame(("a"):rep(125)))
        assert.equal(4 + 126, #ws.frame(("a"):rep(126)))
        assert.equal(10 + 65536, #ws.frame(("a"):rep(65536)))
        assert.equal("\129\126\255\255", ws.frame(("a"):rep(65535)):sub(1, 4))
        assert.equal(2 + 4 + 3, #ws.frame("abc", ws.TEXT, "mask"))
    end)

    describe("against the echo origin", function()
        local origin

        lazy_setup(function()
            origin = ws.start_origin("direct")
        end)

        lazy_teardown(function()
            h.shutdown(nil, origin)
        end)

        it("echoes 0 B, 125 B, 126 B, 64 KiB and 5 MiB messages, hash checked", function()
            local c = assert(ws.connect(origin.port, { path = "/ws" }))
            for _, n in ipairs { 0, 125, 126, 65535, 65536, 5 * 1048576 } do
                local p = require("helpers.origin").pattern(n)
                assert(c:send(p, ws.BINARY))
                local op, back = c:recv(20)
                assert.equal(ws.BINARY, op)
                assert.equal(n, #back)
                assert.equal(origin_sum(p), origin_sum(back))
            end
            assert(c:echo("text too", ws.TEXT))
            c:close()
        end)

        it("answers a ping with a pong and a close with a close", function()
            local c = assert(ws.connect(origin.port, { path = "/ws" }))
            assert(c:send("p1", ws.PING))
            local op, p = c:recv()
            assert.same({ ws.PONG, "p1" }, { op, p })
            local before = stats(origin).closes
            assert(c:send(string.char(3, 232), ws.CLOSE))
            op, p = c:recv()
            assert.same({ ws.CLOSE, string.char(3, 232) }, { op, p })
            assert.is_true((c:wait_closed(3)))
            c:drop()
            assert.equal(before + 1, stats(origin).closes)
        end)

        for _, code in ipairs { 200, 403 } do
            it("answers an upgrade with ?mode=" .. code .. " and keeps the connection", function()
                local c, err, res, conn = ws.connect(origin.port, { path = "/ws?mode=" .. code })
                assert.is_nil(c)
                assert.equal("status " .. code, err)
                assert.equal(code, res.status)
                assert.equal("upgrade refused " .. code .. "\n", res.body)
                local again = assert(conn:request { method = "GET", target = "/after", headers = { { "Host", "x" } } })
                assert.equal(200, again.status)
                assert.equal(2, cjson.decode(again.body).conn_req)
                conn:close()
            end)
        end

        it("answers the path /status/NNN with that status instead of the 101", function()
            local c, err, res, conn = ws.connect(origin.port, { path = "/status/404" })
            assert.is_nil(c)
            assert.equal("status 404", err)
            assert.equal(404, res.status)
            conn:close()
        end)

        it("sends \"hello\" first on the path /hello", function()
            local c = assert(ws.connect(origin.port, { path = "/hello" }))
            assert.same({ ws.TEXT, "hello" }, { c:recv() })
            assert(c:echo("then the echo"))
            c:close()
        end)

        it("closes after N messages with ?mode=close:N", function()
            local c = assert(ws.connect(origin.port, { path = "/ws?mode=close:2" }))
            assert(c:echo("one"))
            assert(c:echo("two"))
            local op, p = c:recv()
            assert.same({ ws.CLOSE, string.char(3, 232) }, { op, p })
            assert.is_true((c:wait_closed(3)))
            c:drop()
        end)

        it("sends a last message after the client's FIN with ?mode=bye", function()
            local c = assert(ws.connect(origin.port, { path = "/ws?mode=bye" }))
            assert(c:echo("one"))
            assert(c:echo("two"))
            assert(c:shutdown_write())
            assert.same({ ws.TEXT, "bye after 2" }, { c:recv() })
            assert.is_true((c:wait_closed(3)))
            c:drop()
        end)

        it("refuses an unmasked client frame with close 1002", function()
            local c = assert(ws.connect(origin.port, { path = "/ws" }))
            assert(c:send_raw(ws.frame("bare", ws.TEXT)))
            local op, p = c:recv()
            assert.equal(ws.CLOSE, op)
            assert.equal(string.char(3, 234), p:sub(1, 2))
            c:drop()
        end)

        it("holds 1,000 connections at once and counts them in /_stats", function()
            local conns, t0 = {}, socket.gettime()
            for i = 1, 1000 do
                conns[i] = assert(ws.connect(origin.port, { path = "/ws" }))
            end
            assert.equal(1000, stats(origin).open)
            assert(conns[1]:echo("first"))
            assert(conns[1000]:echo("last"))
            for _, c in ipairs(conns) do c:drop() end
            h.eventually(function() return stats(origin).open == 0 end, 10)
            assert.truthy(socket.gettime() - t0 < 60)
        end)
    end)

    describe("over TLS", function()
        local pki, origin

        lazy_setup(function()
            pki = tls.pki()
            origin = ws.start_origin("direct-tls", { tls = pki.localhost })
        end)

        lazy_teardown(function()
            h.shutdown(nil, origin)
            if pki then pki:remove() end
        end)

        it("upgrades and echoes 64 KiB and 5 MiB, with SNI and a verified certificate", function()
            local c = assert(ws.connect(origin.port, { path = "/ws", tls = { sni = "localhost", ca = pki.ca } }))
            for _, n in ipairs { 65536, 5 * 1048576 } do
                local p = require("helpers.origin").pattern(n)
                assert(c:send(p, ws.BINARY))
                local _, back = assert(c:recv(20))
                assert.equal(origin_sum(p), origin_sum(back))
            end
            c:close()
            assert.equal(1, stats(origin).upgrades)
        end)
    end)
end)
