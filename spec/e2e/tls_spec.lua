-- End-to-end: TLS (SPEC "TLS", "Admin access") against the real binary with
-- real TLS clients (LuaSec, `openssl s_client`): listeners (handshake,
-- keep-alive, SNI, versions, ALPN, resumption, mutual TLS, what hooks, the
-- origin and the access log see), mistakes (plain HTTP to a TLS port, TLS to
-- a plain one, failed handshakes counted, slow handshakes cut off), reloads
-- (certificates swapped, bad ones refused with file:line), large bodies
-- with a bounded RSS, upstream TLS (verify, names, pooling, client
-- certificates, health checks) and the admin port over TLS. The certificates
-- are made once for the file by helpers/tls.lua.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"
local origin = require "helpers.origin"
local socket = require "socket"
local cjson = require "cjson"

local MiB = 1024 * 1024

-- The TLS listener (${listen}: default localhost, more: api and the
-- wildcard) beside a plain one (${plain}). /info answers what a hook sees,
-- one "key=value" a line; everything else goes to the origin.
local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}",
  certs = { { cert = "${api_cert}", key = "${api_key}" }, { cert = "${wild_cert}", key = "${wild_key}" } } } }
proxy.listen { addr = "${plain}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", client_header_timeout = 2, max_body_size = 0 }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8, timeouts = { connect = 1, send = 30, read = 30 } }
proxy.route { path = "/info", handler = function(req)
  local t = req.tls or {}
  return req:respond(200, "scheme=" .. tostring(req.scheme) .. "\ntls=" .. tostring(req.tls ~= nil)
    .. "\nversion=" .. tostring(t.version) .. "\ncipher=" .. tostring(t.cipher) .. "\nsni=" .. tostring(t.sni)
    .. "\nclient_subject=" .. tostring(t.client_subject) .. "\n")
end }
proxy.route { prefix = "/", upstream = a }
]=]

-- The "key=value" lines of an /info answer as a table.
local function info(res, err)
    assert(res, "no response: " .. tostring(err))
    assert.equal(200, res.status, res.body)
    local t = {}
    for k, v in res.body:gmatch("([%w_]+)=([^\n]*)\n") do t[k] = v end
    return t
end

-- /metrics as { [result] = count } for moonproxy_tls_handshakes_total
-- (summed over any other label).
local function handshakes(proxy)
    local res, err = proxy:admin("GET", "/metrics")
    assert(res, "admin /metrics: " .. tostring(err))
    assert.equal(200, res.status)
    local t = {}
    for line in res.body:gmatch("[^\n]+") do
        local labels, v = line:match("^moonproxy_tls_handshakes_total{(.-)}%s+(%S+)")
        if labels then
            local r = labels:match('result="([^"]*)"') or "?"
            t[r] = (t[r] or 0) + tonumber(v)
        end
    end
    return t
end

-- The results whose count grew by at least n from before to after.
local function grown(before, after, n)
    local out = {}
    for r, v in pairs(after) do
        if v - (before[r] or 0) >= n then out[#out + 1] = r end
    end
    table.sort(out)
    return out
end

-- A handshake (and one request) that must fail: LuaSec reports a TLS 1.3
-- server's refusal of a client certificate only at the first read.
local function refused(port, opts)
    local c, err = tls.connect(port, opts)
    if not c then return true, err end
    local res, rerr = c:request { target = "/info" }
    c:close()
    if res then return false, "answered " .. res.status end
    return true, rerr
end

local function basename(p) return (p:match("[^/]+$")) end

-- Samples pid's RSS each time a byte count passes another 4 MiB: at(n) with
-- the count so far; peak (KiB) is the highest sample.
local function rss_sampler(pid)
    local s = { peak = 0, bytes = 0, next = 0 }
    function s.at(n)
        s.bytes = n
        if n >= s.next then
            s.peak = math.max(s.peak, h.rss_kb(pid) or 0)
            s.next = n + 4 * MiB
        end
    end
    return s
end

-- Under AddressSanitizer freed blocks stay in its quarantine (256 MiB), and
-- OpenSSL frees its record buffers whenever they empty (RELEASE_BUFFERS): no
-- RSS bound means anything there.
local function asan(pid)
    return (h.read_file("/proc/" .. pid .. "/maps") or ""):find("libasan", 1, true) ~= nil
end

-- The start of the configurations that need no listener option of their own.
local HEAD = [=[
local proxy = require "moonproxy"
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
]=]

describe("TLS #tls", function()
    local pki

    lazy_setup(function()
        pki = tls.pki()
    end)

    lazy_teardown(function()
        if pki then pki:remove() end
    end)

    local function vars(extra)
        local v = {
            cert = pki.localhost.cert, key = pki.localhost.key, api_cert = pki.api.cert, api_key = pki.api.key,
            wild_cert = pki.wild.cert, wild_key = pki.wild.key,
        }
        for k, x in pairs(extra or {}) do v[k] = x end
        return v
    end

    describe("on a listener", function()
        local a, proxy, plain

        lazy_setup(function()
            a = h.start_origin("a")
            plain = h.free_port()
            proxy = h.start_proxy { workers = 2, config = CONFIG, vars = vars { a = a.addr, plain = "127.0.0.1:" .. plain } }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy, a)
        end)

        it("completes a verified handshake and serves several requests on one connection", function()
            local c = assert(tls.connect(proxy.port, { ca = pki.ca, sni = "localhost" }))
            finally(function() c:close() end)
            assert.equal("localhost", c.tls.subject)
            for i = 1, 5 do
                local e = h.echo(c:request { target = "/ka/" .. i })
                assert.equal("/ka/" .. i, e.target)
            end
            local t = info(c:request { target = "/info" })
            assert.equal("https", t.scheme)
            -- the same client connection all along: it was never closed under us
            assert.is_nil(c.eof)
        end)

        it("chooses the certificate by SNI: exact name, wildcard of one label, else the default", function()
            local cases = {
                { "api.example.test", "api.example.test" },
                { "a.wild.example.test", "*.wild.example.test" },
                { "x.a.wild.example.test", "localhost" }, -- two labels: the wildcard does not cover it
                { "wild.example.test", "localhost" },
                { "unknown.test", "localhost" },
                { nil, "localhost" },
            }
            for _, case in ipairs(cases) do
                local c, err = tls.connect(proxy.port, { sni = case[1] })
                assert(c, tostring(case[1]) .. ": " .. tostring(err))
                c:close()
                assert.equal(case[2], c.tls.subject, "SNI " .. tostring(case[1]))
            end
        end)

        it("verifies against the test CA for the SNI name it chose", function()
            local c = assert(tls.connect(proxy.port, { ca = pki.ca, sni = "api.example.test" }))
            c:close()
            assert.same({ "api.example.test" }, c.tls.names)
        end)

        it("speaks TLS 1.2 and 1.3 and refuses 1.1", function()
            local c12 = assert(tls.connect(proxy.port, { protocol = "tlsv1_2" }))
            c12:close()
            assert.equal("TLSv1.2", c12.tls.version)
            local c13 = assert(tls.connect(proxy.port, { protocol = "tlsv1_3" }))
            c13:close()
            assert.equal("TLSv1.3", c13.tls.version)
            -- SECLEVEL=0: our own client would refuse 1.1 otherwise; the alert must be the proxy's
            local c11, err = tls.connect(proxy.port, { protocol = "tlsv1_1", ciphers = "DEFAULT@SECLEVEL=0" })
            if c11 then c11:close() end
            assert.is_nil(c11, "TLS 1.1 was accepted")
            assert.truthy(tostring(err):find("protocol version", 1, true), err)
        end)

        it("answers ALPN with http/1.1, never h2", function()
            local c = assert(tls.connect(proxy.port, { alpn = { "http/1.1" } }))
            c:close()
            assert.equal("http/1.1", c.tls.alpn)
            local c2 = assert(tls.connect(proxy.port, { alpn = { "h2", "http/1.1" } }))
            finally(function() c2:close() end)
            assert.equal("http/1.1", c2.tls.alpn)
            assert.equal(200, assert(c2:request { target = "/alpn" }).status)
        end)

        for _, v in ipairs { "-tls1_3", "-tls1_2" } do
            it("resumes the session on the second connection (" .. v .. ")", function()
                local sess = h.tmpname(".sess")
                local req = "GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                local out1, rc1 = tls.s_client(proxy.port, v .. " -ign_eof -sess_out " .. h.quote(sess), req)
                assert.equal(0, rc1, out1)
                assert.truthy(out1:find("HTTP/1.1 200", 1, true), out1)
                assert.truthy(out1:find("New, TLSv1", 1, true), out1)
                local out2, rc2 = tls.s_client(proxy.port, v .. " -ign_eof -sess_in " .. h.quote(sess), req)
                assert.equal(0, rc2, out2)
                assert.truthy(out2:find("Reused, TLSv1", 1, true), "not resumed:\n" .. out2)
                assert.truthy(out2:find("HTTP/1.1 200", 1, true), out2)
            end)
        end

        it("shows req.scheme https and req.tls { version, cipher, sni } to hooks", function()
            local c = assert(tls.connect(proxy.port, { sni = "api.example.test", protocol = "tlsv1_3" }))
            finally(function() c:close() end)
            local t = info(c:request { target = "/info" })
            assert.same({ scheme = "https", tls = "true", version = "TLSv1.3", sni = "api.example.test",
                client_subject = "nil" },
                { scheme = t.scheme, tls = t.tls, version = t.version, sni = t.sni, client_subject = t.client_subject })
            assert.equal(c.tls.cipher, t.cipher)
            local t2 = info(tls.get(proxy.port, "/info", nil, { protocol = "tlsv1_2" }))
            assert.equal("TLSv1.2", t2.version)
            assert.equal("nil", t2.sni)
        end)

        it("sends X-Forwarded-Proto: https to the origin (http from the plain listener)", function()
            local e = h.echo(tls.get(proxy.port, "/xfp"))
            assert.equal("https", h.echo_header(e, "x-forwarded-proto"))
            local e2 = h.echo(raw.get(plain, "/xfp"))
            assert.equal("http", h.echo_header(e2, "x-forwarded-proto"))
        end)

        it("serves the plain listener beside it as plain HTTP (no req.tls)", function()
            local t = info(raw.get(plain, "/info"))
            assert.same({ "http", "false" }, { t.scheme, t.tls })
        end)

        it("writes the TLS version and the SNI to the access log", function()
            local mark = "/logged-" .. math.random(1e9)
            assert.equal(200, assert(tls.get(proxy.port, mark, nil, { sni = "api.example.test",
                protocol = "tlsv1_3" })).status)
            assert.equal(200, assert(raw.get(plain, mark .. "-plain")).status)
            local entry, plain_entry
            h.eventually(function()
                for _, e in ipairs(proxy:access_log_entries()) do
                    if e.path == mark or e.target == mark then entry = e end
                    if e.path == mark .. "-plain" or e.target == mark .. "-plain" then plain_entry = e end
                end
                return entry and plain_entry
            end, 5)
            assert.equal("TLSv1.3", entry.tls, cjson.encode(entry))
            assert.equal("api.example.test", entry.sni, cjson.encode(entry))
            assert.is_nil(plain_entry.tls, cjson.encode(plain_entry))
        end)

        it("answers a plain HTTP request on the TLS port with 400 or a close, never a hang", function()
            local c = assert(raw.connect(proxy.port, { timeout = 5 }))
            finally(function() c:close() end)
            local t0 = socket.gettime()
            assert(c:send("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
            local res, err = c:read_response { timeout = 5 }
            if res then
                assert.equal(400, res.status)
            else
                assert.are_not.equal("timeout", err)
            end
            assert.is_true(socket.gettime() - t0 < 4, "took " .. (socket.gettime() - t0) .. " s")
        end)

        it("answers a TLS ClientHello on the plain port with 400 or a close at once, never a hang", function()
            local t0 = socket.gettime()
            local c, err = tls.connect(plain, { timeout = 5 })
            if c then c:close() end
            assert.is_nil(c, "a TLS handshake succeeded on the plain port")
            assert.is_nil(tostring(err):find("timeout", 1, true), err)
            assert.is_true(socket.gettime() - t0 < 1.5, "took " .. (socket.gettime() - t0) .. " s")
            -- a whole hello record with no LF byte in it (a real one may have none): its first byte
            -- (22) cannot start a method, so there is nothing to wait for (client_header_timeout is 2 s)
            local rc = assert(raw.connect(plain, { timeout = 5 }))
            finally(function() rc:close() end)
            t0 = socket.gettime()
            assert(rc:send(tls.partial_hello() .. ("\0"):rep(512 - 20)))
            local res, rerr = rc:read_response { timeout = 5 }
            if res then assert.equal(400, res.status) else assert.are_not.equal("timeout", rerr) end
            assert.is_true(socket.gettime() - t0 < 1.5, "answered after " .. (socket.gettime() - t0) .. " s")
        end)

        it("counts failed handshakes in /metrics and does not log one line per client", function()
            -- the results that grow by n (once the workers counted them) from the scrape before
            local function settle(from, n)
                local m = h.eventually(function()
                    local now = handshakes(proxy)
                    return #grown(from, now, n) > 0 and now
                end, 5)
                return m, grown(from, m, n)
            end
            local before = handshakes(proxy)
            for _ = 1, 3 do assert(tls.connect(proxy.port, {})):close() end
            local mid, ok_results = settle(before, 3)
            local log_before = #h.lines_with(proxy:stderr(), "")
            for _ = 1, 20 do
                assert.is_true((refused(proxy.port, { protocol = "tlsv1_1", ciphers = "DEFAULT@SECLEVEL=0" })))
            end
            local _, failed_results = settle(mid, 20)
            for _, r in ipairs(failed_results) do
                for _, okr in ipairs(ok_results) do
                    assert.are_not.equal(okr, r, "failures counted as " .. r .. " like successes")
                end
            end
            socket.sleep(0.2)
            local logged = #h.lines_with(proxy:stderr(), "") - log_before
            assert.is_true(logged <= 2, logged .. " log lines for 20 failed handshakes:\n" .. proxy:stderr():sub(-2000))
        end)

        it("cuts off a client that stops halfway through its ClientHello (client_header_timeout)", function()
            local c = assert(raw.connect(proxy.port, { timeout = 10 }))
            finally(function() c:close() end)
            local t0 = socket.gettime()
            assert(c:send(tls.partial_hello()))
            -- meanwhile the proxy waits for it without spinning, and serves others (on both workers)
            local share = h.cpu_share(proxy.pid, 0.5)
            assert.is_true(share < 0.3, "the proxy used " .. share .. " of a core waiting for a stalled handshake")
            for i = 1, 4 do
                local res, err = tls.get(proxy.port, "/meanwhile", nil, { timeout = 3 })
                assert(res, "request " .. i .. " during the stalled handshake: " .. tostring(err))
                assert.equal(200, res.status)
            end
            local closed = c:wait_closed(8)
            local took = socket.gettime() - t0
            assert.is_true(closed, "the stalled handshake was not closed")
            assert.is_true(took >= 1.5 and took < 6, "closed after " .. took .. " s (client_header_timeout 2)")
        end)

        it("streams a 200 MiB download through TLS intact, the proxy's RSS under 64 MiB #slow", function()
            local size, rss, st = 200 * MiB, rss_sampler(proxy.pid), origin.sum_new()
            local res = assert(tls.get(proxy.port, "/big?size=" .. size, nil, { timeout = 120, sink = function(piece)
                origin.sum_update(st, piece)
                rss.at(rss.bytes + #piece)
            end }))
            assert.same({ 200, size, origin.pattern_sum(size) }, { res.status, res.body_len, origin.sum_hex(st) })
            assert.is_true(rss.peak > 0, "no RSS sample")
            if not asan(proxy.pid) then assert.is_true(rss.peak < 64 * 1024, "proxy RSS reached " .. rss.peak .. " KiB") end
        end)

        it("forwards a 20 MiB chunked upload through TLS intact, without holding it #slow", function()
            local size = 20 * MiB
            local c = assert(tls.connect(proxy.port, { timeout = 60 }))
            finally(function() c:close() end)
            local base, rss = assert(h.rss_kb(proxy.pid)), rss_sampler(proxy.pid)
            assert(c:send("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"))
            origin.pattern_each(size, function(piece)
                assert(c:send(string.format("%x\r\n", #piece) .. piece .. "\r\n"))
                rss.at(rss.bytes + #piece)
            end)
            assert(c:send("0\r\n\r\n"))
            local e = h.echo(c:read_response { timeout = 60 })
            assert.same({ size, origin.pattern_sum(size) }, { e.body_len, e.body_sum })
            if not asan(proxy.pid) then
                assert.is_true(rss.peak - base < 16 * 1024, "proxy RSS grew by " .. (rss.peak - base) .. " KiB")
            end
        end)
    end)

    describe("with client_ca and protocols", function()
        -- ${listen}: mutual TLS; ${only13}: TLS 1.3 alone.
        local MTLS = HEAD .. [=[
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}", client_ca = "${client_ca}" } }
proxy.listen { addr = "${only13}", tls = { cert = "${cert}", key = "${key}", protocols = { "TLSv1.3" } } }
proxy.route { path = "/info", handler = function(req)
  local t = req.tls or {}
  return req:respond(200, "scheme=" .. tostring(req.scheme) .. "\nversion=" .. tostring(t.version)
    .. "\nclient_subject=" .. tostring(t.client_subject) .. "\n")
end }
]=]
        local proxy, only13

        lazy_setup(function()
            only13 = h.free_port()
            proxy = h.start_proxy { workers = 1, config = MTLS,
                vars = vars { client_ca = pki.client_ca, only13 = "127.0.0.1:" .. only13 } }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("accepts a client certificate the CA signed and shows its subject to hooks", function()
            for _, v in ipairs { "tlsv1_2", "tlsv1_3" } do
                local t = info(tls.get(proxy.port, "/info", nil,
                    { protocol = v, cert = pki.client.cert, key = pki.client.key }))
                assert.truthy(t.client_subject:find("CN=client-one", 1, true), v .. ": " .. t.client_subject)
            end
        end)

        it("refuses a client without a certificate, or with one from another CA", function()
            for _, v in ipairs { "tlsv1_2", "tlsv1_3" } do
                assert.is_true((refused(proxy.port, { protocol = v })), v .. ": no certificate accepted")
                local bad, why = refused(proxy.port, { protocol = v, cert = pki.other_client.cert,
                    key = pki.other_client.key })
                assert.is_true(bad, v .. ": another CA's certificate accepted: " .. tostring(why))
            end
            proxy:wait_ready() -- and it still serves
        end)

        it("protocols = { \"TLSv1.3\" } refuses TLS 1.2", function()
            local c = assert(tls.connect(only13, { protocol = "tlsv1_3" }))
            c:close()
            assert.equal("TLSv1.3", c.tls.version)
            local c12, err = tls.connect(only13, { protocol = "tlsv1_2" })
            if c12 then c12:close() end
            assert.is_nil(c12, "TLS 1.2 accepted")
            assert.truthy(tostring(err):find("protocol version", 1, true), err)
        end)
    end)

    describe("certificates at start, -t and reload", function()
        -- The whole listen statement on one line: file:line is that line whatever part of it a message names.
        local ONE = HEAD .. [=[
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}" } }
proxy.route { path = "/x", handler = function(req) return req:respond(200, "${marker}") end }
]=]
        local LINE = h.line_of(ONE, "tls = {")
        local proxy

        local function bad_cases()
            return {
                { "a missing certificate", { cert = pki.dir .. "/no-such.pem", key = pki.localhost.key } },
                { "a key that does not match", { cert = pki.localhost.cert, key = pki.stray_key } },
                { "an expired certificate", { cert = pki.expired.cert, key = pki.expired.key } },
                { "a certificate not yet valid", { cert = pki.future.cert, key = pki.future.key } },
            }
        end

        lazy_setup(function()
            proxy = h.start_proxy { workers = 2, config = ONE, vars = { cert = pki.localhost.cert,
                key = pki.localhost.key, marker = "v1" } }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("swaps the certificate on reload for new connections; an open one keeps working", function()
            local old = assert(tls.connect(proxy.port, { sni = "localhost" }))
            finally(function() old:close() end)
            assert.equal("localhost", old.tls.subject)
            assert.equal("v1", assert(old:request { target = "/x" }).body)
            proxy:rewrite_config(ONE, { cert = pki.ecdsa.cert, key = pki.ecdsa.key, marker = "v2" })
            local res = assert(proxy:admin("POST", "/reload"))
            assert.equal(200, res.status, res.body)
            local new = assert(tls.connect(proxy.port, { sni = "localhost", ca = pki.ca }))
            finally(function() new:close() end)
            assert.equal("ec.example.test", new.tls.subject)
            assert.equal("v2", assert(new:request { target = "/x" }).body)
            -- the connection from before the reload: still open, still answering
            local again = assert(old:request { target = "/x" })
            assert.equal(200, again.status)
            assert.equal("localhost", old.tls.subject)
        end)

        it("refuses a bad certificate on reload with file:line and keeps serving the old one", function()
            local good = { cert = pki.localhost.cert, key = pki.localhost.key, marker = "good" }
            proxy:rewrite_config(ONE, good)
            assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
            for _, case in ipairs(bad_cases()) do
                case[2].marker = "bad"
                proxy:rewrite_config(ONE, case[2])
                local res, doc = proxy:admin("POST", "/reload")
                assert(res, tostring(doc))
                assert.equal(422, res.status, case[1] .. ": " .. res.body)
                local at = basename(proxy.conf_path) .. ":" .. LINE .. ":"
                assert.truthy(doc and doc.error and doc.error:find(at, 1, true),
                    case[1] .. ": expected " .. at .. " in " .. tostring(res.body))
                local c = assert(tls.connect(proxy.port, { sni = "localhost", ca = pki.ca }))
                local body = assert(c:request { target = "/x" }).body
                c:close()
                assert.same({ "localhost", "good" }, { c.tls.subject, body }, case[1])
            end
        end)

        it("refuses a bad certificate at start and with -t, with file:line", function()
            for _, case in ipairs(bad_cases()) do
                case[2].marker = "bad"
                case[2].admin = "127.0.0.1:" .. h.free_port()
                case[2].listen = "127.0.0.1:" .. h.free_port()
                local conf = h.write_config(ONE, case[2])
                local at = basename(conf) .. ":" .. LINE .. ":"
                local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(conf))
                assert.are_not.equal(0, rc, case[1] .. ": -t accepted it: " .. out)
                assert.truthy(out:find(at, 1, true), case[1] .. ": -t: expected " .. at .. " in " .. out)
                local p = h.spawn { h.bin(), "-c", conf }
                local code = p:wait(10)
                if code == nil then p:stop() end
                assert.are_not.equal(0, code, case[1] .. ": started anyway")
                assert.truthy(p:stderr():find(at, 1, true), case[1] .. ": expected " .. at .. " in " .. p:stderr())
            end
        end)
    end)

    describe("to upstreams", function()
        -- Every upstream's servers speak TLS only (helpers/origin.lua --tls).
        local UP = HEAD .. [=[
proxy.listen { addr = "${listen}" }
-- /NAME/... goes to upstream NAME over TLS with those settings (more: other upstream fields)
local function up(name, server, tls, more)
  local def = { servers = { server }, timeouts = { connect = 2, send = 10, read = 10 }, tls = tls }
  for k, v in pairs(more or {}) do def[k] = v end
  proxy.route { prefix = "/" .. name .. "/", upstream = proxy.upstream(name)(def) }
end
up("ok", "${s1}", { ca = "${ca}" }, { keepalive = 8 })
up("badca", "${s1}", { ca = "${client_ca}" })
up("system", "${s1}", {})
up("named", "${s2}", { ca = "${ca}", server_name = "api.example.test" })
up("misnamed", "${s1}", { ca = "${ca}", server_name = "api.example.test" })
up("noverify", "${s2}", { verify = false })
up("mtls", "${s3}", { ca = "${ca}", cert = "${ccert}", key = "${ckey}" })
up("nocert", "${s3}", { ca = "${ca}" })
up("health", "${s4}", { ca = "${ca}" }, { health = { path = "/health", interval = 0.2, timeout = 1, rise = 1, fall = 1 } })
up("resume", "${s5}", { ca = "${ca}" })
]=]
        local proxy, s1, s2, s3, s4, s5

        lazy_setup(function()
            s5 = tls.s_server(pki.localhost)
            s1 = tls.start_origin("s1", pki.localhost)
            s2 = tls.start_origin("s2", pki.api)
            s3 = tls.start_origin("s3", pki.localhost, { client_ca = pki.client_ca, client_pair = pki.client })
            s4 = tls.start_origin("s4", pki.localhost)
            proxy = h.start_proxy { workers = 1, config = UP, vars = { s1 = s1.addr, s2 = s2.addr, s3 = s3.addr,
                s4 = s4.addr, s5 = s5.addr, ca = pki.ca, client_ca = pki.client_ca, ccert = pki.client.cert, ckey = pki.client.key } }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy, s1, s2, s3, s4, s5)
        end)

        it("verifies the origin's certificate against ca (the address's IP as the name)", function()
            local e = h.echo(raw.get(proxy.port, "/ok/a"))
            assert.equal("s1", e.name)
            assert.equal("/ok/a", e.target)
        end)

        it("reuses pooled TLS connections: one handshake at the origin over 20 sequential requests", function()
            h.echo(raw.get(proxy.port, "/ok/warm"))
            local before = s1:stats().tls_handshakes
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            for i = 1, 20 do
                assert.equal("s1", h.echo(c:request { target = "/ok/" .. i }).name)
            end
            assert.equal(before, s1:stats().tls_handshakes, "new handshakes at the origin")
            assert.is_true(before >= 1)
        end)

        it("answers 502 when the certificate does not verify, counts the server failed, logs the reason once", function()
            for _, path in ipairs { "/badca/", "/system/" } do
                for i = 1, 4 do
                    local res = assert(raw.get(proxy.port, path .. i))
                    assert.equal(502, res.status, path)
                end
            end
            local sv = assert(proxy:server_state("badca", s1.addr))
            assert.is_true((sv.failed or 0) + (sv.failures or 0) >= 1, cjson.encode(sv))
            local lines = h.lines_with(proxy:stderr(), "verify")
            assert.is_true(#lines >= 1, "the reason is not logged:\n" .. proxy:stderr():sub(-2000))
            assert.is_true(#lines <= 2, #lines .. " lines for 8 failures:\n" .. table.concat(lines, "\n"))
        end)

        it("sends server_name as SNI and checks the certificate against it", function()
            local e = h.echo(raw.get(proxy.port, "/named/x"))
            assert.equal("s2", e.name)
            local sni = s2:stats().tls_sni
            local seen = false
            for _, n in ipairs(sni) do if n == "api.example.test" then seen = true end end
            assert.is_true(seen, "SNI at the origin: " .. cjson.encode(sni))
            -- s1's certificate does not name api.example.test
            assert.equal(502, assert(raw.get(proxy.port, "/misnamed/x")).status)
        end)

        it("resumes the TLS session on the next connection to the same server", function()
            -- s_server answers HTTP/1.0 and closes: every request is a new upstream connection
            local pages = {}
            for i = 1, 3 do
                local res = assert(raw.get(proxy.port, "/resume/" .. i))
                assert.equal(200, res.status, res.body)
                pages[i] = res.body
            end
            assert.truthy(pages[1]:find("New, TLSv1", 1, true), pages[1])
            for i = 2, 3 do
                assert.truthy(pages[i]:find("Reused, TLSv1", 1, true), "connection " .. i .. " not resumed:\n" .. pages[i])
            end
        end)

        it("does not verify with verify = false", function()
            assert.equal("s2", h.echo(raw.get(proxy.port, "/noverify/x")).name)
        end)

        it("presents the client certificate to an origin that asks for one", function()
            assert.equal("s3", h.echo(raw.get(proxy.port, "/mtls/x")).name)
            local seen = false
            for _, cn in ipairs(s3:stats().tls_clients) do if cn == "client-one" then seen = true end end
            assert.is_true(seen)
            assert.equal(502, assert(raw.get(proxy.port, "/nocert/x")).status)
        end)

        it("runs active health checks over TLS", function()
            h.eventually(function() return s4:path_count("/health") >= 2 end, 5)
            local sv = assert(proxy:server_state("health", s4.addr))
            assert.is_true(sv.healthy ~= false and sv.probe_up ~= false, cjson.encode(sv))
            assert.equal("s4", h.echo(raw.get(proxy.port, "/health/x")).name)
        end)
    end)

    describe("the admin port over TLS", function()
        local ADMIN = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}", token = "${token}", tls = { cert = "${cert}", key = "${key}" } }
proxy.settings { access_log = false }
proxy.route { path = "/x", handler = function(req) return req:respond(200, "x") end }
]=]
        local TOKEN = "t0ken-" .. math.random(1e9)
        local proxy

        lazy_setup(function()
            proxy = h.start_proxy { workers = 1, config = ADMIN, vars = vars { token = TOKEN } }
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        local function get(path, token)
            local headers = { { "Host", "localhost:" .. proxy.admin_port } }
            if token then headers[2] = { "Authorization", "Bearer " .. token } end
            return tls.get(proxy.admin_port, path, headers, { ca = pki.ca })
        end

        it("serves /live without the token and the rest with it, over TLS", function()
            local live = h.eventually(function() return get("/live") end, 5)
            assert.equal(200, live.status)
            assert.equal(401, assert(get("/upstreams")).status)
            assert.equal(401, assert(get("/upstreams", TOKEN .. "x")).status)
            assert.equal(200, assert(get("/upstreams", TOKEN)).status)
        end)

        it("does not answer plain HTTP on the admin port", function()
            local res, err = raw.get(proxy.admin_port, "/live", { Host = "localhost:" .. proxy.admin_port },
                { timeout = 5 })
            if res then assert.equal(400, res.status) else assert.are_not.equal("timeout", err) end
        end)
    end)
end)
