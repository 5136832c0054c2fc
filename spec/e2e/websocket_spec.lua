-- End-to-end: WebSocket tunnels through moonproxy (SPEC "WebSocket and other
-- upgrades", issue 13) to the echo origin of spec/helpers/websocket.lua:
-- messages of 0 B to 5 MiB both ways (hash checked), an origin answering 200
-- or 403 to the upgrade (relayed, no tunnel, the connection kept), the idle
-- timeout, half-close passed on, on_log and the access log line at close
-- (bytes each way, why it closed), /metrics, the upstream connection never
-- pooled, a reload with open tunnels (the old generation freed, the tunnels
-- still echo), SIGTERM with open tunnels, 1,000 idle tunnels with a bounded
-- RSS, and TLS on both sides. The gate itself (h2c, bodies, upgrade = false)
-- is upgrade_gate_spec.lua's.
local h = require "helpers.proxy"
local ws = require "helpers.websocket"
local tls = require "helpers.tls"
local raw = require "helpers.raw_http"
local origin_lib = require "helpers.origin"
local socket = require "socket"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", shutdown_timeout = ${shutdown} }
local seen = proxy.shared("seen", "1m")
local echo = proxy.upstream "echo" { servers = { "${ws}" }, keepalive = 8 }
local idle = proxy.upstream "idle" { servers = { "${ws}" }, keepalive = 8, timeouts = { tunnel = 1 } }
proxy.route { path = "/_seen", name = "seen", handler = function(req)
  return req:respond(200, seen:get(req.query) or "none")
end }
proxy.route { prefix = "/idle/", name = "idle", upstream = idle }
proxy.route { prefix = "/guarded/", name = "guarded", upstream = echo,
  on_request = function(req) if req.headers["x-key"] ~= "k1" then return req:respond(401, "no key\n") end end,
  on_response = function(req, res) res.headers["x-seen-status"] = tostring(res.status) end }
proxy.route { prefix = "/", name = "echo", upstream = echo }
proxy.on_log(function(req, res)
  local id, t = req.headers["x-test-id"], req.tunnel
  if id and t then
    seen:set(id, string.format("%s %s %s %s %s %s", "${gen}", tostring(req.status), tostring(res and res.status),
      tostring(t.to_upstream), tostring(t.to_client), tostring(t.close)))
  end
end)
]=]

local TLS_CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}" } }
proxy.settings { access_log = "${access_log}", shutdown_timeout = 2 }
proxy.route { prefix = "/", upstream = proxy.upstream "wss" { servers = { "${ws}" }, keepalive = 8,
  tls = { ca = "${ca}", server_name = "localhost" } } }
]=]

-- Bytes of a client frame (masked) and a server frame with n payload bytes.
local function wire(n, masked)
    local ext = n < 126 and 0 or (n < 65536 and 2 or 8)
    return 2 + ext + (masked and 4 or 0) + n
end

local function stats(o)
    local res = assert(o.get(o.port, "/_stats", nil, { timeout = 5 }))
    return cjson.decode(res.body)
end

-- The samples of a Prometheus text whose name is name and whose labels
-- include every pair of want, summed (0 when none).
local function metric(text, name, want)
    local sum = 0
    for line in text:gmatch("[^\n]+") do
        local n, labels, v = line:match("^([%w_:]+){(.-)} (%S+)$")
        if not n then
            n, v = line:match("^([%w_:]+) (%S+)$")
            labels = ""
        end
        if n == name then
            local have = {}
            for k, lv in labels:gmatch('([%w_]+)="(.-)"') do have[k] = lv end
            local ok = true
            for k, wv in pairs(want or {}) do
                if have[k] ~= wv then ok = false end
            end
            if ok then sum = sum + tonumber(v) end
        end
    end
    return sum
end

local function scrape(proxy)
    local res, err = proxy:admin("GET", "/metrics")
    assert(res, "admin /metrics: " .. tostring(err))
    assert.equal(200, res.status)
    return res.body
end

local function open_tunnels(proxy)
    return metric(scrape(proxy), "moonproxy_tunnels", { state = "open" })
end

-- What on_log recorded for test id ("GEN REQ.STATUS RES.STATUS TO_UPSTREAM TO_CLIENT CLOSE"),
-- once it is there (bounded).
local function seen(proxy, id)
    local rec
    h.eventually(function()
        local res = raw.get(proxy.port, "/_seen?" .. id, nil, { timeout = 5 })
        rec = res and res.status == 200 and res.body ~= "none" and res.body
        return rec
    end, 5)
    local gen, status, res_status, up, down, close = rec:match("^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$")
    return { gen = gen, status = tonumber(status), res_status = tonumber(res_status), to_upstream = tonumber(up),
        to_client = tonumber(down), close = close }
end

local function connect(port, path, id, opts)
    local o = { path = path, headers = { { "X-Test-Id", id } }, timeout = 10 }
    for k, v in pairs(opts or {}) do o[k] = v end
    local c, err, res = ws.connect(port, o)
    assert(c, "handshake " .. path .. ": " .. tostring(err) .. (res and ("\n" .. tostring(res.raw_head)) or ""))
    finally(function() c:drop() end) -- a failed case leaves no tunnel open for the next one
    return c
end

local function sanitized(pid)
    local maps = h.read_file("/proc/" .. pid .. "/maps") or ""
    return maps:find("libasan", 1, true) or maps:find("libtsan", 1, true)
end

describe("WebSocket tunnels", function()
    local origin, proxy

    lazy_setup(function()
        origin = ws.start_origin("echo")
        proxy = h.start_proxy { workers = 2, log_level = "debug", config = CONFIG,
            vars = { ws = origin.addr, gen = "one", shutdown = 2 } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, origin)
    end)

    it("echoes 0 B, 125 B, 64 KiB and 5 MiB messages both ways, hash checked", function()
        local c = connect(proxy.port, "/ws", "sizes")
        for _, n in ipairs { 0, 125, 65536, 5 * 1048576 } do
            local p = origin_lib.pattern(n)
            assert(c:send(p, ws.BINARY))
            local op, back = c:recv(30)
            assert.equal(ws.BINARY, op, tostring(back))
            assert.equal(n, #back)
            assert.equal(origin_lib.checksum(p), origin_lib.checksum(back))
        end
        assert(c:echo("and a text message", ws.TEXT))
        c:close()
    end)

    it("lets request hooks decide the handshake, and shows response hooks the 101", function()
        local refused, err, res = ws.connect(proxy.port, { path = "/guarded/ws", timeout = 10 })
        assert.is_nil(refused, "a handshake without the key was tunnelled")
        assert.same({ 401, "no key\n" }, { res and res.status, res and res.body }, tostring(err))
        local c = connect(proxy.port, "/guarded/ws", "guarded", { headers = { { "X-Key", "k1" } } })
        assert.equal("101", c.headers["x-seen-status"])
        assert(c:echo("let in"))
    end)

    it("forwards what the client sent with its handshake, after the 101 and in order", function()
        local sock = assert(socket.connect("127.0.0.1", proxy.port))
        sock:settimeout(10)
        finally(function() sock:close() end)
        -- the handshake and a first frame in one write: the frame must wait for the 101
        assert(sock:send("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" ..
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" ..
            ws.frame("early bird", ws.TEXT, "\1\2\3\4")))
        local head = {}
        repeat
            local line = assert(sock:receive("*l"))
            head[#head + 1] = line
        until line == ""
        assert.matches("^HTTP/1.1 101", head[1])
        local want = ws.frame("early bird", ws.TEXT)
        assert.equal(want, assert(sock:receive(#want)))
    end)

    for _, code in ipairs { 200, 403 } do
        it("relays an origin's " .. code .. " to the upgrade and keeps the client connection", function()
            local before = stats(origin)
            local c, err, res, conn = ws.connect(proxy.port, { path = "/ws?mode=" .. code, timeout = 10 })
            assert.is_nil(c)
            assert.equal("status " .. code, err)
            assert.equal(code, res.status)
            assert.equal("upgrade refused " .. code .. "\n", res.body)
            assert.is_nil(res:header("upgrade"))
            -- no tunnel: HTTP goes on by the usual rules. An answer with
            -- Connection: close ends the connection (cleanly, nothing else
            -- on it); without it, the connection carries the next request.
            if res:has_token("connection", "close") then
                assert.is_true((conn:wait_closed(5)))
                assert.equal("", conn.buf)
            else
                local again = assert(conn:request { method = "GET", target = "/after", headers = { { "Host", "x" } } })
                assert.equal(200, again.status)
                assert.equal("/after", cjson.decode(again.body).target)
            end
            conn:close()
            h.eventually(function() return open_tunnels(proxy) == 0 end, 5)
            local fresh = assert(raw.get(proxy.port, "/after", nil, { timeout = 5 }))
            assert.equal(200, fresh.status)
            assert.equal(before.upgrades, stats(origin).upgrades)
        end)
    end

    it("closes a tunnel idle for timeouts.tunnel, on_log close = idle", function()
        local c = connect(proxy.port, "/idle/ws", "idle")
        assert(c:echo("before the pause"))
        local t0 = socket.gettime()
        assert.is_true((c:wait_closed(5)))
        local dt = socket.gettime() - t0
        c:drop()
        assert.truthy(dt > 0.8 and dt < 3, "closed after " .. dt .. " s")
        local rec = seen(proxy, "idle")
        assert.equal("idle", rec.close)
        assert.equal(101, rec.res_status)
    end)

    it("passes a half-close on: the origin sees EOF and its last message reaches the client", function()
        local eofs = stats(origin).eofs
        local c = connect(proxy.port, "/ws?mode=bye", "half")
        assert(c:echo("one"))
        assert(c:echo("two"))
        assert(c:shutdown_write())
        assert.same({ ws.TEXT, "bye after 2" }, { c:recv(5) })
        assert.is_true((c:wait_closed(5)))
        c:drop()
        assert.equal(eofs + 1, stats(origin).eofs)
    end)

    it("gives on_log and the access log the bytes each way when the client closes", function()
        local c = connect(proxy.port, "/ws?log=client", "by-client")
        assert(c:echo(("c"):rep(100), ws.TEXT))
        c:drop()
        local rec = seen(proxy, "by-client")
        rec.status = nil -- req.status: its own case below
        assert.same({ gen = "one", res_status = 101, to_upstream = wire(100, true),
            to_client = wire(100), close = "client" }, rec)
        local e
        h.eventually(function()
            e = nil
            for _, x in ipairs(proxy:access_log_entries()) do
                if x.tunnel and x.tunnel.to_upstream == wire(100, true) and x.tunnel.close == "client" then e = x end
            end
            return e
        end, 5)
        assert.equal(101, e.status)
        assert.same({ to_upstream = wire(100, true), to_client = wire(100), close = "client" }, e.tunnel)
    end)

    it("says close = upstream when the origin ends the tunnel", function()
        local c = connect(proxy.port, "/ws?mode=close:1", "by-upstream")
        assert(c:echo(("u"):rep(300), ws.BINARY))
        assert.same({ ws.CLOSE, string.char(3, 232) }, { c:recv(5) })
        assert.is_true((c:wait_closed(5)))
        c:drop()
        local rec = seen(proxy, "by-upstream")
        rec.status = nil
        assert.same({ gen = "one", res_status = 101, to_upstream = wire(300, true),
            to_client = wire(300) + wire(2), close = "upstream" }, rec)
    end)

    it("shows on_log res.status = 101 for a tunnel (req has no status, as for any request)", function()
        local c = connect(proxy.port, "/ws", "req-status")
        assert(c:echo("s"))
        c:drop()
        local rec = seen(proxy, "req-status")
        assert.same({ 101 }, { rec.res_status, rec.status }) -- tonumber("nil"): nil
    end)

    it("counts tunnels and their bytes in /metrics", function()
        h.eventually(function() return open_tunnels(proxy) == 0 end, 5)
        local m0 = scrape(proxy)
        local c = connect(proxy.port, "/ws", "metrics")
        assert(c:echo(("m"):rep(1000), ws.BINARY))
        h.eventually(function() return open_tunnels(proxy) == 1 end, 5)
        c:drop()
        h.eventually(function() return open_tunnels(proxy) == 0 end, 5)
        local m1
        h.eventually(function()
            m1 = scrape(proxy)
            local d = metric(m1, "moonproxy_tunnels_closed_total", { reason = "client" })
                - metric(m0, "moonproxy_tunnels_closed_total", { reason = "client" })
            return d == 1
        end, 5)
        local function delta(dir)
            return metric(m1, "moonproxy_tunnel_bytes_total", { direction = dir })
                - metric(m0, "moonproxy_tunnel_bytes_total", { direction = dir })
        end
        assert.equal(wire(1000, true), delta("to_upstream"))
        assert.equal(wire(1000), delta("to_client"))
    end)

    it("never pools the upstream connection of a tunnel", function()
        local c = connect(proxy.port, "/ws", "nopool")
        local tunnel_conn = tonumber(c.headers["x-conn-id"])
        assert(c:echo("x"))
        c:drop()
        -- the proxy closed its side: the origin's tunnel ended (a pooled one would stay open)
        h.eventually(function() return stats(origin).open == 0 end, 5)
        for _ = 1, 4 do
            local res = assert(raw.get(proxy.port, "/plain", nil, { timeout = 5 }))
            assert.equal(200, res.status)
            assert.are_not.equal(tunnel_conn, cjson.decode(res.body).conn_id)
        end
    end)

    it("frees the old generation on a reload while tunnels stay open and echo", function()
        local _, cz = proxy:admin("GET", "/configz")
        local old = assert(cz).generation
        local freed = "generation " .. old .. " freed"
        local a = connect(proxy.port, "/ws", "reload-a")
        local b = connect(proxy.port, "/ws", "reload-b")
        assert(a:echo("before"))
        assert(b:echo("before"))
        proxy:rewrite_config(CONFIG, { gen = "two" })
        local rl = assert(proxy:admin("POST", "/reload"))
        assert.equal(200, rl.status, rl.body)
        h.eventually(function() return proxy:stderr():find(freed, 1, true) ~= nil end, 10)
        assert(a:echo(origin_lib.pattern(70000), ws.BINARY))
        assert(b:echo("after"))
        a:drop()
        -- on_log is the current generation's
        assert.equal("two", seen(proxy, "reload-a").gen)
        assert(b:echo("still"))
        b:close()
        proxy:rewrite_config(CONFIG, { gen = "one" })
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
    end)
end)

describe("WebSocket tunnels at SIGTERM", function()
    local origin, proxy

    lazy_setup(function()
        origin = ws.start_origin("term")
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { ws = origin.addr, gen = "t", shutdown = 2 } }
    end)

    lazy_teardown(function()
        if proxy then proxy:stop() end
        h.shutdown(nil, origin)
    end)

    it("closes open tunnels by shutdown_timeout and exits 0", function()
        local conns = {}
        for i = 1, 6 do
            conns[i] = connect(proxy.port, "/ws", "term-" .. i)
            assert(conns[i]:echo("hi " .. i))
        end
        local t0 = socket.gettime()
        proxy:kill("TERM")
        local times = {}
        for i, c in ipairs(conns) do
            assert.is_true((c:wait_closed(6)), "tunnel " .. i .. " still open")
            times[i] = socket.gettime() - t0
            c:drop()
        end
        local code = proxy:wait(6)
        assert.equal(0, code, proxy:stderr():sub(-2000))
        for i, t in ipairs(times) do
            -- shutdown_timeout = 2, closes spread over its last second
            assert.truthy(t > 0.7 and t < 3.5, "tunnel " .. i .. " closed after " .. t .. " s")
        end
        local n = 0
        for _, e in ipairs(proxy:access_log_entries()) do
            if e.tunnel and e.tunnel.close == "shutdown" then n = n + 1 end
        end
        assert.equal(6, n)
    end)
end)

describe("1,000 idle WebSocket tunnels", function()
    local origin, proxy

    lazy_setup(function()
        origin = ws.start_origin("many")
        proxy = h.start_proxy { workers = 1, nofile = 8192, config = CONFIG,
            vars = { ws = origin.addr, gen = "m", shutdown = 2 } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, origin)
    end)

    it("hold a bounded RSS each and all still echo", function()
        local t0 = socket.gettime()
        local conns = {}
        for i = 1, 20 do conns[i] = connect(proxy.port, "/ws", "many") end
        assert(conns[1]:echo("warm"))
        local rss0 = assert(h.rss_kb(proxy.pid))
        for i = 21, 1000 do conns[i] = connect(proxy.port, "/ws", "many") end
        h.eventually(function() return stats(origin).open == 1000 end, 20)
        assert.equal(1000, open_tunnels(proxy))
        local rss1 = assert(h.rss_kb(proxy.pid))
        local per = (rss1 - rss0) / 980
        -- an idle tunnel holds no buffer (about 1 KiB each measured); 16 KiB
        -- catches one that keeps a buffer per direction while idle
        if not sanitized(proxy.pid) then
            assert.truthy(per < 16, string.format("%.1f KiB RSS per idle tunnel (%d -> %d KiB)", per, rss0, rss1))
        end
        for _, i in ipairs { 1, 500, 1000 } do assert(conns[i]:echo("still " .. i)) end
        for _, c in ipairs(conns) do c:drop() end
        h.eventually(function() return open_tunnels(proxy) == 0 end, 20)
        assert.truthy(socket.gettime() - t0 < 120)
    end)
end)

describe("a WebSocket tunnel over TLS on both sides", function()
    local pki, origin, proxy

    lazy_setup(function()
        pki = tls.pki()
        origin = ws.start_origin("wss", { tls = pki.localhost })
        proxy = h.start_proxy { workers = 1, config = TLS_CONFIG,
            vars = { ws = origin.addr, cert = pki.localhost.cert, key = pki.localhost.key, ca = pki.ca } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, origin)
        if pki then pki:remove() end
    end)

    it("echoes 125 B, 64 KiB and 5 MiB, hash checked", function()
        local c = connect(proxy.port, "/ws", "tls", { tls = { sni = "localhost", ca = pki.ca } })
        for _, n in ipairs { 125, 65536, 5 * 1048576 } do
            local p = origin_lib.pattern(n)
            assert(c:send(p, ws.BINARY))
            local op, back = c:recv(30)
            assert.equal(ws.BINARY, op, tostring(back))
            assert.equal(origin_lib.checksum(p), origin_lib.checksum(back))
        end
        c:close()
        assert.equal(1, stats(origin).upgrades)
    end)
end)
