-- End-to-end: request smuggling through chunked framing (issue 9, defects 1,
-- 5 and 9; SPEC "Behaviour on the wire"). The origin behind the proxy is a
-- naive one (helpers/crlf_origin.lua): it ends lines at CRLF only, ignores
-- chunk extensions and records every request it parses on each connection.
-- The proxy must refuse every chunk line not ended by CRLF and every bad
-- extension or trailer line (400), bound extensions and trailers, and send
-- chunked bodies re-framed, so that such an origin can never read a second
-- request out of a body.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local cjson = require "cjson.safe"

local HERE = debug.getinfo(1, "S").source:sub(2):match("^(.*)/e2e/[^/]*$") or "spec"
local CRLF_ORIGIN = HERE .. "/helpers/crlf_origin.lua"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", max_body_size = "${max_body}", max_header_size = "${max_head}" }
proxy.route { prefix = "/", upstream = proxy.upstream("naive", {
  servers = { "${a}" }, keepalive = 8 }) }
]=]

local RETRY_CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
proxy.route { prefix = "/", upstream = proxy.upstream("pair", {
  servers = { "${a}", "${b}" }, keepalive = 0, retries = 1, passive = { failures = 0 } }) }
]=]

-- Starts the naive origin on a free port (mode: nil or "reset").
local function start_naive(mode)
    local port = h.free_port()
    local argv = { "luajit", CRLF_ORIGIN, tostring(port) }
    if mode then
        argv[#argv + 1] = "--mode"
        argv[#argv + 1] = mode
    end
    local o = h.spawn(argv)
    o.port, o.addr = port, "127.0.0.1:" .. port
    h.eventually(function()
        assert(o:alive(), "crlf_origin exited: " .. o:stderr())
        return h.port_open(port)
    end, 10)
    return o
end

-- The requests the origin parsed so far.
local function origin_log(o)
    local res = assert(raw.get(o.port, "/_log", nil, { timeout = 5 }))
    assert.equal(200, res.status)
    return assert(cjson.decode(res.body))
end

local function targets(list)
    local t = {}
    for _, r in ipairs(list) do t[#t + 1] = r.target end
    return t
end

-- Parses chunked framing as strictly as RFC 9112 §7.1 reads: lowercase hex
-- sizes without extensions, CRLF everywhere. Returns data and trailer lines,
-- or raises naming what is not strict.
local function strict_chunked(s)
    local pos, data = 1, {}
    for _ = 1, 100000 do
        local size_hex, nxt = s:match("^([0-9a-f]+)\r\n()", pos)
        assert(size_hex, "not a strict size line at byte " .. pos .. ": " .. string.format("%q", s:sub(pos, pos + 20)))
        local size = tonumber(size_hex, 16)
        pos = nxt
        if size == 0 then break end
        data[#data + 1] = s:sub(pos, pos + size - 1)
        pos = pos + size
        assert(s:sub(pos, pos + 1) == "\r\n", "no CRLF after chunk data at byte " .. pos)
        pos = pos + 2
    end
    local trailers = {}
    for _ = 1, 1000 do
        local line, nxt = s:match("^([^\r\n]*)\r\n()", pos)
        assert(line, "trailer section not CRLF-framed at byte " .. pos)
        pos = nxt
        if line == "" then break end
        assert(line:match("^[%w!#$%%&'*+.^_`|~-]+: ?[^\r\n]*$"), "not a field line: " .. line)
        trailers[#trailers + 1] = line
    end
    assert.equal(#s + 1, pos, "bytes after the chunked body")
    return table.concat(data), trailers
end

local POST = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
local SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

-- Sends bytes on a new connection; returns the first response and, with
-- check_close, whether the proxy then closed the connection (within 3 s).
local function exchange(port, bytes, check_close)
    local c = assert(raw.connect(port))
    local ok, err = c:send(bytes)
    local res, rerr = c:read_response { timeout = 5 }
    assert(res, "no response (send: " .. tostring(ok or err) .. "): " .. tostring(rerr))
    local closed = check_close and c:wait_closed(3)
    c:close()
    return res, closed
end

describe("moonproxy chunked request bodies (smuggling)", function()
    local a, proxy

    lazy_setup(function()
        a = start_naive()
        proxy = h.start_proxy { workers = 1, config = CONFIG,
            vars = { a = a.addr, max_body = "1k", max_head = "16k" } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    -- Asserts that body (after POST's head) is refused with status, that the
    -- origin parsed no request from it (no /smuggled above all), and that a
    -- good request still goes through afterwards.
    local function assert_refused(body, status)
        local before = #origin_log(a)
        local res = exchange(proxy.port, POST .. body)
        assert.equal(status, res.status)
        local after = origin_log(a)
        assert.equal(before, #after, "the origin parsed: " .. table.concat(targets(after), " "))
        local ok = assert(raw.get(proxy.port, "/after"))
        assert.equal(200, ok.status)
        local final = origin_log(a)
        assert.equal("/after", final[#final].target)
        for _, r in ipairs(final) do assert.are_not.equal("/smuggled", r.target) end
    end

    it("refuses the issue's example, a bare LF after a bare ';', and the origin never parses /smuggled", function()
        local prefix = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\nX-Pad: "
        local inner = prefix .. ("p"):rep(0x57 - #prefix)
        assert_refused("2;\nxx\r\n57\r\n" .. inner .. "\r\n0\r\n\r\n", 400)
    end)

    for name, body in pairs {
        ["a bare LF after the size"] = "3\nabc\r\n0\r\n\r\n" .. SMUGGLED,
        ["a bare LF after an extension"] = "3;x=1\nabc\r\n0\r\n\r\n" .. SMUGGLED,
        ["a bare LF after the data"] = "3\r\nabc\n0\r\n\r\n" .. SMUGGLED,
        ["a bare LF in the last chunk"] = "3\r\nabc\r\n0\n\r\n" .. SMUGGLED,
        ["a bare LF ending a trailer line"] = "3\r\nabc\r\n0\r\nT: 1\n\r\n" .. SMUGGLED,
        ["a bare LF ending the trailer section"] = "3\r\nabc\r\n0\r\nT: 1\r\n\n" .. SMUGGLED,
        ["a bare CR after the size"] = "3\rabc\r\n0\r\n\r\n" .. SMUGGLED,
        ["a bare CR in a trailer line"] = "0\r\nT: 1\r2\r\n\r\n" .. SMUGGLED,
        ["a bare ';'"] = "3;\r\nabc\r\n0\r\n\r\n",
        ["an extension name that is not a token"] = "3;a(b\r\nabc\r\n0\r\n\r\n",
        ["an unterminated quoted extension value"] = "3;a=\"x\r\nabc\r\n0\r\n\r\n",
        ["a trailer line without a colon"] = "3\r\nabc\r\n0\r\nNoColon\r\n\r\n",
        ["an obs-folded trailer line"] = "3\r\nabc\r\n0\r\nT: 1\r\n folded\r\n\r\n",
    } do
        it("answers 400 to a chunked body with " .. name .. ", and the origin parses no request", function()
            assert_refused(body, 400)
        end)
    end

    it("sends a valid body re-framed: strict sizes, no extensions, forbidden trailer fields dropped", function()
        local parts = { "hello ", ("w"):rep(700), "!" }
        local body = string.format("%x;name=first\r\n%s\r\n", #parts[1], parts[1])
            .. string.format("%X ; a=1;b=\"q;\\\"x\"\r\n%s\r\n", #parts[2], parts[2])
            .. string.format("00%x\r\n%s\r\n", #parts[3], parts[3])
            .. "0;last\r\nX-Sum: 42\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: evil\r\n"
            .. "Authorization: Basic eA==\r\nX-Forwarded-For: 10.0.0.1\r\nContent-Type: text/evil\r\n"
            .. "X-Checksum:abc\r\n\r\n"
        local res = exchange(proxy.port, POST .. body)
        assert.equal(200, res.status)
        local log = origin_log(a)
        local got = log[#log]
        assert.equal("/upload", got.target)
        local data, trailers = strict_chunked(got.framing)
        assert.equal(table.concat(parts), data)
        assert.equal(table.concat(parts), got.body)
        assert.same({ "X-Sum: 42", "X-Checksum:abc" }, trailers)
        assert.is_nil(got.framing:find(";", 1, true), "an extension reached the origin")
    end)

    it("re-frames the same body sent in 3-byte pieces", function()
        local body = "5;a=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\nHost: evil\r\n\r\n"
        local bytes, pieces = POST .. body, {}
        for i = 1, #bytes, 3 do pieces[#pieces + 1] = bytes:sub(i, i + 2) end
        local c = assert(raw.connect(proxy.port))
        finally(function() c:close() end)
        assert(c:send_pieces(pieces, 0.002))
        local res = assert(c:read_response { timeout = 5 })
        assert.equal(200, res.status)
        local log = origin_log(a)
        local data, trailers = strict_chunked(log[#log].framing)
        assert.same({ "hello world", { "X-Sum: 42" } }, { data, trailers })
    end)

    it("keeps the client connection for the next request after a re-framed body", function()
        local c = assert(raw.connect(proxy.port))
        finally(function() c:close() end)
        assert(c:send(POST .. "3;e=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n" .. "GET /second HTTP/1.1\r\nHost: x\r\n\r\n"))
        local r1 = assert(c:read_response { timeout = 5 })
        local r2 = assert(c:read_response { timeout = 5 })
        assert.same({ 200, 200 }, { r1.status, r2.status })
        local log = origin_log(a)
        assert.same({ "/upload", "/second" }, { log[#log - 1].target, log[#log].target })
        assert.equal("abc", log[#log - 1].body)
    end)

    it("counts chunk extensions against max_body_size (413)", function()
        local chunk = "1;" .. ("e"):rep(200) .. "\r\nx\r\n"
        assert_refused(chunk:rep(8) .. "0\r\n\r\n", 413)
    end)

    it("counts trailer fields against max_body_size (413)", function()
        local field = "X-T: " .. ("t"):rep(200) .. "\r\n"
        assert_refused("1\r\nx\r\n0\r\n" .. field:rep(8) .. "\r\n", 413)
    end)

    it("counts the leading zeros of chunk sizes against max_body_size (413)", function()
        local chunk = ("0"):rep(300) .. "1\r\nx\r\n"
        assert_refused(chunk:rep(8) .. "0\r\n\r\n", 413)
    end)

    it("takes a chunked body of max_body_size data bytes as a Content-Length one: 200, and 413 past it", function()
        local function send(data, chunked)
            local head = "POST /size HTTP/1.1\r\nHost: x\r\n"
            if chunked then
                return exchange(proxy.port, head .. "Transfer-Encoding: chunked\r\n\r\n"
                    .. string.format("%x\r\n%s\r\n0\r\n\r\n", #data, data))
            end
            return exchange(proxy.port, head .. "Content-Length: " .. #data .. "\r\n\r\n" .. data)
        end
        for _, n in ipairs { 1023, 1024 } do
            local data = ("d"):rep(n)
            for _, chunked in ipairs { false, true } do
                local res = send(data, chunked)
                assert.equal(200, res.status, n .. " bytes, chunked: " .. tostring(chunked))
                local log = origin_log(a)
                assert.same({ "/size", n }, { log[#log].target, #log[#log].body })
            end
        end
        assert.equal(413, send(("d"):rep(1025), false).status)
        assert_refused(string.format("%x\r\n%s\r\n0\r\n\r\n", 1025, ("d"):rep(1025)), 413)
    end)

    for _, te in ipairs { "gzip", "chunked, gzip" } do
        it("answers 400 and closes to Transfer-Encoding: " .. te, function()
            local before = #origin_log(a)
            local res, closed = exchange(proxy.port, "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " .. te
                .. "\r\n\r\n3\r\nabc\r\n0\r\n\r\n" .. SMUGGLED, true)
            assert.equal(400, res.status)
            assert.truthy(closed, "the connection stayed open")
            assert.equal(before, #origin_log(a))
        end)
    end

    it("serves an HTTP/1.2 request as HTTP/1.1 (RFC 9112 §2.3)", function()
        local res = exchange(proxy.port, "GET /v12 HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert.equal(200, res.status)
        assert.equal("HTTP/1.1", res.version)
        local log = origin_log(a)
        assert.same({ "/v12", "HTTP/1.1" }, { log[#log].target, log[#log].version })
    end)

    it("answers 505 to an HTTP/2.0 request line", function()
        local before = #origin_log(a)
        local res = exchange(proxy.port, "GET /v2 HTTP/2.0\r\nHost: x\r\n\r\n")
        assert.equal(505, res.status)
        assert.equal(before, #origin_log(a))
    end)
end)

describe("moonproxy chunked trailer section bound", function()
    local a, proxy

    lazy_setup(function()
        a = start_naive()
        proxy = h.start_proxy { workers = 1, config = CONFIG,
            vars = { a = a.addr, max_body = "1m", max_head = "2k" } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("answers 431 to a trailer section larger than max_header_size, and the origin gets no request", function()
        local field = "X-T: " .. ("t"):rep(200) .. "\r\n"
        local before = #origin_log(a)
        local res = exchange(proxy.port, POST .. "1\r\nx\r\n0\r\n" .. field:rep(12) .. "\r\n")
        assert.equal(431, res.status)
        assert.equal(before, #origin_log(a))
    end)

    it("forwards a body larger than the buffer with its trailers intact", function()
        local chunks, data = {}, {}
        for i = 1, 300 do
            local d = string.format("%07d", i):rep(143) -- 1001 bytes
            data[i] = d
            chunks[i] = string.format("%x;i=%d\r\n%s\r\n", #d, i, d)
        end
        local fields = {}
        for i = 1, 6 do fields[i] = "X-T" .. i .. ": " .. ("t"):rep(250) end
        local body = table.concat(chunks) .. "0\r\n" .. table.concat(fields, "\r\n") .. "\r\n\r\n"
        local res = exchange(proxy.port, POST .. body)
        assert.equal(200, res.status)
        local log = origin_log(a)
        local got, trailers = strict_chunked(log[#log].framing)
        assert.equal(table.concat(data), got)
        assert.same(fields, trailers)
    end)

    it("compares the trailer section, its final CRLF included, with max_header_size", function()
        local function section(n) -- a trailer section of n bytes: one field line and the final CRLF
            return "X-T: " .. ("t"):rep(n - 9) .. "\r\n\r\n"
        end
        assert.equal(2048, #section(2048))
        local res = exchange(proxy.port, POST .. "1\r\nx\r\n0\r\n" .. section(2048))
        assert.equal(200, res.status)
        local before = #origin_log(a)
        res = exchange(proxy.port, POST .. "1\r\nx\r\n0\r\n" .. section(2049))
        assert.equal(431, res.status)
        assert.equal(before, #origin_log(a))
    end)

    it("forwards a trailer section within max_header_size", function()
        local field = "X-T: " .. ("t"):rep(200) .. "\r\n"
        local res = exchange(proxy.port, POST .. "1\r\nx\r\n0\r\n" .. field:rep(4) .. "\r\n")
        assert.equal(200, res.status)
        local log = origin_log(a)
        local _, trailers = strict_chunked(log[#log].framing)
        assert.equal(4, #trailers)
    end)
end)

describe("moonproxy chunked body replay", function()
    local a, b, proxy

    lazy_setup(function()
        a = start_naive("reset")
        b = start_naive()
        proxy = h.start_proxy { workers = 1, config = RETRY_CONFIG, vars = { a = a.addr, b = b.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    it("retries a chunked PUT broken on the first server with the same data, re-framed", function()
        local parts = { ("a"):rep(1000), ("b"):rep(3000), "c" }
        local body = ""
        for i, p in ipairs(parts) do body = body .. string.format("%x;n=%d\r\n%s\r\n", #p, i, p) end
        body = body .. "0\r\nX-Sum: 7\r\nHost: evil\r\n\r\n"
        -- round robin over two servers: of three requests, at least one goes
        -- to the resetting server first and is retried on the other
        for i = 1, 3 do
            local res = exchange(proxy.port, "PUT /put" .. i .. " HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. body)
            assert.equal(200, res.status)
        end
        local broken, served = origin_log(a), origin_log(b)
        assert.truthy(#broken >= 1, "no request went to the resetting server first")
        assert.same({ "/put1", "/put2", "/put3" }, targets(served))
        for _, got in ipairs(broken) do served[#served + 1] = got end
        for _, got in ipairs(served) do
            local data, trailers = strict_chunked(got.framing)
            assert.equal(table.concat(parts), data)
            assert.same({ "X-Sum: 7" }, trailers)
        end
    end)
end)
