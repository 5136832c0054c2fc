-- End-to-end: TLS at its edges, against the real binary: TLS 1.3 key
-- updates in both directions on a kept-alive connection, a handshake that
-- times out counted as failed, a reload that would move TLS between open
-- sockets refused, and a TLS upstream's response read until close: whole
-- after close_notify, cut when the server just closes. The certificates
-- are made once for the file by helpers/tls.lua.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"

-- A TLS origin for one connection: reads a request head, answers a 200
-- with no length (read until close) and then, "clean", sends close_notify
-- and closes, or, "cut", leaves the process without it (the kernel closes
-- the socket: what a crashed or cut-off server looks like).
local CUT_ORIGIN = [=[
local socket, ssl = require "socket", require "ssl"
local port, cert, key, how = tonumber(arg[1]), arg[2], arg[3], arg[4]
local srv = assert(socket.bind("127.0.0.1", port))
srv:settimeout(20)
io.stdout:write("ready\n")
io.stdout:flush()
local c = assert(srv:accept())
c:settimeout(10)
c = assert(ssl.wrap(c, { mode = "server", protocol = "any", certificate = cert, key = key }))
assert(c:dohandshake())
repeat local line = assert(c:receive("*l")) until line == ""
assert(c:send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst-half-"))
socket.sleep(0.2)
assert(c:send("second-half\n"))
if how == "clean" then c:close() os.exit(0) end
os.exit(0, false) -- no lua_close: nothing runs SSL_shutdown, no close_notify goes out
]=]

describe("TLS edges #tls", function()
    local pki

    lazy_setup(function()
        pki = tls.pki()
    end)

    lazy_teardown(function()
        if pki then pki:remove() end
    end)

    describe("on a listener (-w 1)", function()
        local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}" } }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, client_header_timeout = 1 }
proxy.route { prefix = "/files/", strip_prefix = true, static = { root = "${root}" } }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "at " .. req.path .. "\n") end }
]=]
        local proxy, root, big

        lazy_setup(function()
            root = h.tmpname(".d")
            assert(os.execute("mkdir -p " .. h.quote(root)))
            -- past the 2 MiB a connection sends per loop turn, and not a whole number of 16 KiB records
            local parts = {}
            for i = 1, 5 * 1024 do parts[i] = string.format("%07d ", i):rep(128) end
            big = table.concat(parts) .. "tail"
            h.write_file(root .. "/big.txt", big)
            proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { cert = pki.localhost.cert,
                key = pki.localhost.key, root = root } }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
            if root then os.execute("rm -rf " .. h.quote(root)) end
        end)

        it("sends a static file over TLS whole, twice on one connection", function()
            local c = assert(tls.connect(proxy.port, { sni = "localhost", ca = pki.ca, timeout = 20 }))
            finally(function() c:close() end)
            for _ = 1, 2 do
                local res = assert(c:request({ target = "/files/big.txt" }, { timeout = 20 }))
                assert.equal(200, res.status)
                assert.equal(#big, tonumber(res:header("content-length")))
                assert.is_true(res.body == big, "the body differs (" .. #res.body .. " bytes)")
            end
        end)

        it("keeps serving a connection across TLS 1.3 key updates, asked for by the client and by the proxy", function()
            -- s_client's interactive commands: "K" sends a KeyUpdate that asks the proxy for its own, "k" one
            -- that does not; each request after one must still be answered on the same connection
            local req = function(p) return string.format([[printf 'GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n']], p) end
            local script = table.concat({ req("/one"), "sleep 0.4", "printf 'K\\n'", "sleep 0.4", req("/two"),
                "sleep 0.4", "printf 'k\\n'", "sleep 0.4", req("/three"), "sleep 0.6" }, "; ")
            local out = h.run("sh -c " .. h.quote("(" .. script .. ") | openssl s_client -connect 127.0.0.1:"
                .. proxy.port .. " -tls1_3 -servername localhost 2>&1"), 15)
            local answered = {}
            for p in out:gmatch("at (/%a+)\n") do answered[#answered + 1] = p end
            assert.same({ "/one", "/two", "/three" }, answered, out:sub(-2000))
            local _, updates = out:gsub("KEYUPDATE", "")
            assert.equal(2, updates, out:sub(-2000))
        end)

        it("counts a handshake that does not finish within client_header_timeout as failed", function()
            local function failed()
                local res = assert(proxy:admin("GET", "/metrics"))
                return tonumber(res.body:match('moonproxy_tls_handshakes_total{result="failed"} (%d+)'))
            end
            local before = failed()
            local c = assert(raw.connect(proxy.port, { timeout = 5 }))
            finally(function() c:close() end)
            assert(c:send(tls.partial_hello()))
            assert.is_true(c:wait_closed(4), "the stalled handshake was not closed")
            h.eventually(function() return failed() == before + 1 end, 3)
            assert.equal(1, proxy:log_count("TLS handshake failed: timed out"))
        end)
    end)

    describe("reloads that change the listen addresses", function()
        local CONFIG = [=[
local proxy = require "moonproxy"
${listens}
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, req.scheme .. "\n") end }
]=]
        local proxy, tls_port, plain_port, vars

        local function listens(with_plain)
            local s = string.format('proxy.listen { addr = "127.0.0.1:%d", tls = { cert = "%s", key = "%s", '
                .. 'client_ca = "%s" } }', tls_port, pki.localhost.cert, pki.localhost.key, pki.client_ca)
            if with_plain then s = string.format('proxy.listen { addr = "127.0.0.1:%d" }\n', plain_port) .. s end
            return s
        end

        lazy_setup(function()
            tls_port, plain_port = h.free_port(), h.free_port()
            vars = { listens = listens(true) }
            proxy = h.start_proxy { workers = 2, port = tls_port, config = CONFIG, vars = vars }
            proxy:wait_ready()
        end)

        lazy_teardown(function()
            h.shutdown(proxy)
        end)

        it("refuses one that would move TLS between the open sockets, and the mutual-TLS port stays TLS", function()
            vars.listens = listens(false) -- the TLS listener moves from the second position to the first
            proxy:rewrite_config(CONFIG, vars)
            local res, doc = proxy:admin("POST", "/reload")
            assert(res, tostring(doc))
            assert.equal(422, res.status, res.body)
            assert.truthy(doc and doc.error and doc.error:find("listen addresses changed", 1, true), res.body)
            -- plain HTTP on the TLS port is still refused, a client without a certificate too
            local plain = assert(raw.request(tls_port, { target = "/", headers = { { "Host", "x" } } }, { timeout = 5 }))
            assert.equal(400, plain.status)
            local c = tls.connect(tls_port, { sni = "localhost" })
            local got = c and c:request { target = "/" }
            if c then c:close() end
            assert.is_nil(got and got.status == 200 or nil, "served without a client certificate")
            local ok = assert(tls.connect(tls_port, { sni = "localhost", cert = pki.client.cert, key = pki.client.key }))
            finally(function() ok:close() end)
            assert.equal("https\n", assert(ok:request { target = "/" }).body)
            assert.equal("http\n", assert(raw.request(plain_port, { target = "/", headers = { { "Host", "x" } } })).body)
        end)
    end)

    describe("a TLS upstream's response read until close (-w 1)", function()
        local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local o = proxy.upstream "o" { servers = { "${origin}" }, tls = { ca = "${ca}" }, retries = 0 }
proxy.route { prefix = "/", upstream = o }
]=]
        -- One request through a proxy in front of a one-shot origin closing as `how` says; the response as
        -- the client read it until the proxy closed, and the proxy.
        local function through(how)
            local port, script = h.free_port(), h.tmpname(".lua")
            h.write_file(script, CUT_ORIGIN)
            local o = h.spawn { "luajit", script, tostring(port), pki.localhost.cert, pki.localhost.key, how }
            h.eventually(function()
                assert(o:alive(), "the origin exited: " .. o:stderr())
                return o:stdout():find("ready", 1, true)
            end, 5) -- no probe: it takes one client
            local proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { origin = "127.0.0.1:" .. port,
                ca = pki.ca } }
            local c = assert(raw.connect(proxy.port, { timeout = 5 }))
            -- HTTP/1.0: the client gets it close-delimited too (an HTTP/1.1 one gets it chunked:
            -- spec/e2e/interim_spec.lua), so what it reads until the close is the body as relayed
            assert(c:send("GET /x HTTP/1.0\r\nHost: x\r\n\r\n"))
            local deadline = require("socket").gettime() + 5
            while c:fill(deadline) do end -- until the proxy closes (or 5 s)
            c:close()
            o:wait(5)
            return c.buf, proxy
        end

        it("is whole after the server's close_notify", function()
            local got, proxy = through("clean")
            finally(function() h.shutdown(proxy) end)
            assert.truthy(got:find("first-half-second-half\n", 1, true), got .. proxy:stderr())
            assert.equal(0, proxy:log_count("closed mid-response"))
        end)

        it("is cut when the server closes without close_notify: the proxy says so and does not end it cleanly", function()
            local got, proxy = through("cut")
            finally(function() h.shutdown(proxy) end)
            assert.truthy(got:find("^HTTP/1.1 200"), got)
            h.eventually(function() return proxy:log_count("closed mid-response") == 1 end, 3)
        end)
    end)
end)
