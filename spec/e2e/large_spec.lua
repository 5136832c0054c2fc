-- End-to-end: large bodies stream through the proxy, intact and without the
-- proxy holding them in memory. Tagged #slow (a few seconds each); they run
-- in `make test`.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", max_body_size = 0 }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8, timeouts = { connect = 1, send = 30, read = 30 } }
proxy.route { prefix = "/", upstream = a }
]=]

local MiB = 1024 * 1024

describe("moonproxy large bodies #slow", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("forwards a 20 MiB chunked upload sent in pieces intact, without holding it", function()
        local size = 20 * MiB
        local c = assert(raw.connect(proxy.port, { timeout = 60 }))
        finally(function() c:close() end)
        local base_rss = assert(h.rss_kb(proxy.pid))
        local max_rss = base_rss
        assert(c:send("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"))
        local sent = 0
        origin.pattern_each(size, function(piece)
            if sent % MiB == 0 then max_rss = math.max(max_rss, h.rss_kb(proxy.pid) or 0) end
            -- uneven chunks, each sent in two writes, so chunk and write edges differ
            local cut = 1 + sent % 1000
            local ok, err = c:send(string.format("%x\r\n", #piece) .. piece:sub(1, cut))
            assert(ok, err)
            ok, err = c:send(piece:sub(cut + 1) .. "\r\n")
            assert(ok, err)
            sent = sent + #piece
        end)
        assert(c:send("0\r\n\r\n"))
        local e = h.echo(c:read_response { timeout = 60 })
        assert.equal(size, e.body_len)
        assert.equal(origin.pattern_sum(size), e.body_sum)
        assert.is_true(max_rss - base_rss < 16 * 1024,
            "proxy RSS grew by " .. (max_rss - base_rss) .. " KiB during the upload")
    end)

    it("streams a 200 MiB download intact while the proxy's RSS stays under 64 MiB", function()
        local size = 200 * MiB
        local st = origin.sum_new()
        local got, next_sample, max_rss = 0, 0, 0
        local res = assert(raw.get(proxy.port, "/big?size=" .. size, nil, {
            timeout = 120,
            sink = function(piece)
                origin.sum_update(st, piece)
                got = got + #piece
                if got >= next_sample then
                    max_rss = math.max(max_rss, h.rss_kb(proxy.pid) or 0)
                    next_sample = got + 4 * MiB
                end
            end,
        }))
        assert.equal(200, res.status)
        assert.equal(size, res.body_len)
        assert.equal(origin.pattern_sum(size), origin.sum_hex(st))
        assert.is_true(max_rss > 0, "no RSS sample")
        assert.is_true(max_rss < 64 * 1024, "proxy RSS reached " .. max_rss .. " KiB")
    end)

    it("holds back the origin when the client stops reading (RSS stays under 48 MiB)", function()
        local size = 128 * MiB
        local c = assert(raw.connect(proxy.port, { timeout = 60 }))
        finally(function() c:close() end)
        assert(c:send("GET /big?size=" .. size .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function()
            c:fill(socket.gettime() + 0.05)
            return #c.buf >= MiB
        end, 5)
        -- the client reads nothing for a second; the proxy must not buffer the origin's bytes
        local max_rss = 0
        for _ = 1, 20 do
            max_rss = math.max(max_rss, h.rss_kb(proxy.pid) or 0)
            socket.sleep(0.05)
        end
        local st = origin.sum_new()
        local res = assert(c:read_response { timeout = 60, sink = function(p) origin.sum_update(st, p) end })
        assert.equal(size, res.body_len)
        assert.equal(origin.pattern_sum(size), origin.sum_hex(st))
        assert.is_true(max_rss < 48 * 1024, "proxy RSS reached " .. max_rss .. " KiB")
    end)
end)
