-- End-to-end: hooks that call out (SPEC "Calling out from hooks") against the
-- real binary and real origins: moonproxy.http to a named upstream and to a
-- URL, from request hooks, handlers, response hooks (upstream, local and
-- static answers) and on_log; the worker keeps serving while hooks wait;
-- failures, timeouts and oversized answers come back as nil, err; a client
-- that leaves cancels its hook's call; a reload while hooks wait; where a
-- call cannot be made (a balancer, coroutine.yield) the error is clear; and
-- a call to a TLS upstream. One worker, so that waiting hooks share it.
local ffi = require "ffi"
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
local http = require "moonproxy.http"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", hook_timeout = 1 }
local app = proxy.upstream "app" { servers = { "${app}" }, keepalive = 8 }
local auth = proxy.upstream "auth" { servers = { "${auth}" }, keepalive = 8 }
local pair = proxy.upstream "pair" { servers = { "127.0.0.1:${dead}", "${auth}" }, retries = 1,
                                     balancer = function(servers) return servers[1] end }
local secure = proxy.upstream "secure" { servers = { "${secure}" },
                                         tls = { ca = "${ca}", server_name = "localhost" } }
local GEN = "${gen}"

-- every answer says what its hook's call gave: "status body-length", or the error
local function show(res, err)
  if not res then return "error: " .. tostring(err) end
  return tostring(res.status) .. " " .. #res.body
end

proxy.route { prefix = "/auth/", upstream = app, on_request = function(req)
  local res, err = http.request { upstream = auth, method = "POST", path = "/slow", query = "ms=" .. (req.query or "300"),
                                  headers = { ["x-who"] = req.headers["x-who"] or "nobody" }, body = "check", timeout = 5 }
  if not res then return req:respond(503, "auth unavailable: " .. err .. "\n") end
  local echo = require("cjson").decode(res.body)
  req.headers["x-auth"] = echo.method .. " " .. echo.body_len .. " " .. GEN
end }
proxy.route { path = "/url", handler = function(req)
  local res, err = http.request { url = "http://${auth}/big?size=5000", timeout = 2 }
  return req:respond(200, show(res, err) .. " " .. tostring(res and res.headers["x-origin"]) .. "\n")
end }
proxy.route { path = "/any-case", handler = function(req)
  local res, err = http.request { url = "http://${app}/x", timeout = 2 }
  if not res then return req:respond(503, err .. "\n") end
  return req:respond(200, table.concat({ res.headers["Content-Type"], res.headers["content-type"],
    res.headers["X-Origin"], tostring(rawget(res.headers, "X-Origin")) }, " ") .. "\n")
end }
proxy.route { path = "/chunked", handler = function(req)
  local res, err = http.request { url = "http://${auth}/big?size=70000&chunked=1" }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/down", handler = function(req)
  local res, err = http.request { url = "http://127.0.0.1:${dead}/x", timeout = 2 }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/timeout", handler = function(req)
  local res, err = http.request { url = "http://${auth}/hang", timeout = 0.3 }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/oversized", handler = function(req)
  local res, err = http.request { upstream = "auth", path = "/big", query = "size=5000", max_body = 1000 }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/hangs", handler = function(req)
  local res, err = http.request { url = "http://${auth}/hang", timeout = 30 }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/retry", handler = function(req)
  local res, err = http.request { upstream = pair, path = "/x" }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/tls", handler = function(req)
  local res, err = http.request { upstream = secure, path = "/x" }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/https", handler = function(req)
  local res, err = http.request { url = "https://${secure}/x", timeout = 2 }
  return req:respond(200, show(res, err) .. " " .. tostring(res and res.headers["x-origin"]) .. "\n")
end }
proxy.route { path = "/https-wrong-name", handler = function(req)
  local res, err = http.request { url = "https://${other}/x", timeout = 2 }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/wait-long", handler = function(req)
  -- waits 1.5 s in all, past hook_timeout (1 s): waiting is not running
  local a = http.request { upstream = auth, path = "/slow", query = "ms=800", timeout = 5 }
  local b = http.request { upstream = auth, path = "/slow", query = "ms=800", timeout = 5 }
  return req:respond(200, show(a) .. " " .. show(b) .. "\n")
end }
proxy.route { path = "/two", handler = function(req)
  local a = http.request { upstream = auth, path = "/a" }
  local b = http.request { upstream = auth, path = "/b" }
  return req:respond(200, show(a) .. " " .. show(b) .. "\n")
end }
proxy.route { path = "/misuse", handler = function(req)
  local ok, err = pcall(http.request, { url = "ftp://x" })
  local ok2, err2 = pcall(http.request, { upstream = auth, headers = { ["content-length"] = "1" } })
  local ok3, res3 = pcall(http.request, { upstream = auth, path = "/in-pcall" }) -- it waits inside pcall
  return req:respond(200, tostring(ok) .. " " .. tostring(err) .. "\n" .. tostring(ok2) .. " " .. tostring(err2)
    .. "\n" .. tostring(ok3) .. " " .. show(res3) .. "\n")
end }
proxy.route { path = "/yield", handler = function(req)
  coroutine.yield()
end }
proxy.route { path = "/own-coroutine", handler = function(req)
  local co = coroutine.wrap(function() return http.request { upstream = auth, path = "/x" } end)
  return req:respond(200, tostring(co()) .. "\n")
end }
local picker = proxy.upstream "picker" { servers = { "${app}" }, balancer = function(servers, req)
  http.request { upstream = "auth", path = "/from-balancer" }
  return servers[1]
end }
proxy.route { path = "/balancer", upstream = picker }
proxy.route { prefix = "/resp/", upstream = app, on_response = function(req, res)
  local r2, err = http.request { upstream = auth, path = "/from-response" }
  res.headers["x-called"] = show(r2, err)
end }
proxy.route { prefix = "/resp-hang/", upstream = app, on_response = function(req, res)
  local r2, err = http.request { url = "http://${auth}/hang", timeout = 30 }
  res.headers["x-called"] = show(r2, err)
end }
proxy.route { path = "/local-resp", handler = function(req) return req:respond(201, "made here\n") end,
  on_response = function(req, res)
    local r2, err = http.request { upstream = auth, path = "/from-local-response" }
    res.headers["x-called"] = show(r2, err)
  end }
proxy.route { prefix = "/static/", static = { root = "${root}" }, on_response = function(req, res)
  local r2, err = http.request { upstream = auth, path = "/from-static-response" }
  res.headers["x-called"] = show(r2, err)
end }
proxy.route { prefix = "/", upstream = app }
proxy.on_log(function(req, res)
  if req.path == "/logged" then
    http.request { upstream = auth, path = "/from-log", query = "id=" .. req.id }
  end
end)
]=]

pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")

describe("hooks that call out", function()
    local pki, app, auth, secure, other, proxy, root, vars

    lazy_setup(function()
        pki = tls.pki()
        app = h.start_origin("app")
        auth = h.start_origin("auth")
        secure = tls.start_origin("secure", pki.localhost)
        other = tls.start_origin("other", pki.api) -- a certificate for api.example.test, not 127.0.0.1
        root = h.tmpname() .. ".root"
        assert(os.execute("mkdir -p " .. h.quote(root)))
        h.write_file(root .. "/f.txt", "a static file\n")
        vars = { app = app.addr, auth = auth.addr, dead = h.free_port(), secure = secure.addr, other = other.addr,
                 ca = pki.ca, root = root, gen = "one" }
        -- https URLs verify against the system store: here, the test CA (OpenSSL reads SSL_CERT_FILE)
        ffi.C.setenv("SSL_CERT_FILE", pki.ca, 1)
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = vars, log_level = "debug" }
        ffi.C.unsetenv("SSL_CERT_FILE")
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, app, auth, secure, other)
    end)

    it("calls an upstream from on_request, and the request goes on with what it answered", function()
        local res = assert(raw.get(proxy.port, "/auth/x?100", { ["X-Who"] = "ann" }, { timeout = 10 }))
        assert.equal(200, res.status, res.body)
        local echo = h.echo(res)
        assert.equal("POST 5 one", h.echo_header(echo, "x-auth"))
        assert.equal("app", echo.name)
    end)

    it("does not block the worker: 20 hooks waiting 300 ms each finish together", function()
        local conns = {}
        for i = 1, 20 do
            conns[i] = assert(raw.connect(proxy.port, { timeout = 10 }))
            conns[i]:send(raw.build { method = "GET", target = "/auth/" .. i .. "?300",
                                      headers = { host = "a", ["x-who"] = "c" .. i } })
        end
        local t0 = socket.gettime()
        for i = 1, 20 do
            local res = assert(conns[i]:read_response())
            assert.equal(200, res.status, res.body)
            conns[i]:close()
        end
        -- one after the other they would take 6 s; together about 0.3 s
        local took = socket.gettime() - t0
        assert.is_true(took < 3, "20 waiting hooks took " .. took .. " s")
    end)

    it("reads res.headers in any case, the names stored lowercase", function()
        local res = assert(raw.get(proxy.port, "/any-case"))
        assert.equal(200, res.status, res.body)
        assert.equal("application/json application/json app nil\n", res.body)
    end)

    it("calls a URL, with its own keep-alive pool, and reads chunked answers", function()
        local before = auth:stats().connections
        for _ = 1, 3 do
            local res = assert(raw.get(proxy.port, "/url"))
            assert.equal("200 5000 auth\n", res.body)
        end
        assert.equal(before + 1, auth:stats().connections)
        local res = assert(raw.get(proxy.port, "/chunked"))
        assert.equal("200 70000\n", res.body)
    end)

    it("returns nil, err for a server that is down, a timeout and an oversized answer", function()
        assert.equal("error: connect failed\n", assert(raw.get(proxy.port, "/down")).body)
        assert.equal("error: timeout\n", assert(raw.get(proxy.port, "/timeout")).body)
        assert.equal("error: response body larger than max_body (1000 bytes)\n",
            assert(raw.get(proxy.port, "/oversized")).body)
    end)

    it("retries a connect failure on the upstream's other server", function()
        assert.matches("^200 %d+\n$", assert(raw.get(proxy.port, "/retry")).body)
    end)

    it("calls a TLS upstream, verified", function()
        local res = assert(raw.get(proxy.port, "/tls"))
        assert.equal(200, res.status)
        assert.matches("^200 %d+\n$", res.body)
    end)

    it("calls an https URL, verified against the CA store and the URL's host", function()
        local res = assert(raw.get(proxy.port, "/https"))
        assert.matches("^200 %d+ secure\n$", res.body)
        res = assert(raw.get(proxy.port, "/https-wrong-name"))
        assert.matches("^error: TLS handshake failed: .*certificate verify failed", res.body)
        assert.equal(0, other:stats().requests)
    end)

    it("does not count waiting against hook_timeout", function()
        local res = assert(raw.get(proxy.port, "/wait-long", nil, { timeout = 10 }))
        assert.equal(200, res.status, res.body)
        assert.matches("^200 %d+ 200 %d+\n$", res.body)
    end)

    it("makes two calls in a row from one hook, on one pooled connection", function()
        local res = assert(raw.get(proxy.port, "/two"))
        assert.matches("^200 %d+ 200 %d+\n$", res.body)
    end)

    it("raises for misuse (a hook may catch it), and refuses hop-by-hop fields", function()
        local res = assert(raw.get(proxy.port, "/misuse"))
        assert.equal(200, res.status)
        assert.matches("false [^\n]*url must start with http://", res.body)
        assert.matches("\nfalse [^\n]*header content%-length is set by the call itself", res.body)
        assert.matches("\ntrue 200 %d+\n$", res.body)
    end)

    it("gives a clear error where a call cannot be made: a balancer, a coroutine of the hook's, coroutine.yield", function()
        assert.equal(500, assert(raw.get(proxy.port, "/balancer")).status)
        assert.equal(500, assert(raw.get(proxy.port, "/own-coroutine")).status)
        assert.equal(500, assert(raw.get(proxy.port, "/yield")).status)
        h.eventually(function()
            local log = proxy:stderr()
            return log:find("only hooks can call out", 1, true)
                and log:find("not from a coroutine it made", 1, true)
                and log:find("a hook yielded outside a call%-out")
        end, 5)
        assert.equal(0, auth:path_count("/from-balancer"))
    end)

    it("calls out from response hooks: an upstream's answer, one made here, a static file", function()
        local res = assert(raw.get(proxy.port, "/resp/x"))
        assert.equal(200, res.status)
        assert.matches("^200 %d+$", res:header("x-called"))
        assert.equal("app", h.echo(res).name)
        res = assert(raw.get(proxy.port, "/local-resp"))
        assert.equal(201, res.status)
        assert.equal("made here\n", res.body)
        assert.matches("^200 %d+$", res:header("x-called"))
        res = assert(raw.get(proxy.port, "/static/f.txt"))
        assert.equal(200, res.status)
        assert.equal("a static file\n", res.body)
        assert.matches("^200 %d+$", res:header("x-called"))
        -- a static route's own error answer runs the hooks too
        res = assert(raw.get(proxy.port, "/static/missing.txt"))
        assert.equal(404, res.status)
        assert.matches("^200 %d+$", res:header("x-called"))
    end)

    it("calls out from on_log without delaying the response", function()
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        local res = assert(c:request { target = "/logged" })
        assert.equal(200, res.status)
        -- the connection serves the next request while on_log's call runs
        assert.equal(200, assert(c:request { target = "/next" }).status)
        h.eventually(function() return auth:path_count("/from-log") >= 1 end, 5)
    end)

    it("cancels the call of a hook whose client went away", function()
        local before, hangs = auth:stats().closed_by_peer, auth:path_count("/hang")
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        c:send(raw.build { method = "GET", target = "/hangs", headers = { host = "a" } })
        h.eventually(function() return auth:path_count("/hang") > hangs end, 5)
        c:close()
        -- the call's connection is closed at once, long before its 30 s timeout
        h.eventually(function() return auth:stats().closed_by_peer > before end, 5)
        assert.equal(200, assert(raw.get(proxy.port, "/url")).status)
    end)

    it("cancels the call of a response hook whose client went away, and on_log still runs", function()
        local before, hangs = auth:stats().closed_by_peer, auth:path_count("/hang")
        local logged = auth:path_count("/from-log")
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        c:send(raw.build { method = "GET", target = "/resp-hang/x", headers = { host = "a" } })
        h.eventually(function() return auth:path_count("/hang") > hangs end, 5)
        c:close()
        h.eventually(function() return auth:stats().closed_by_peer > before end, 5)
        -- the next request's on_log (a call-out of its own) runs as usual
        assert.equal(200, assert(raw.get(proxy.port, "/logged")).status)
        h.eventually(function() return auth:path_count("/from-log") > logged end, 5)
        assert.is_true(proxy:alive())
    end)

    it("finishes hooks that wait across a reload on their generation", function()
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        local _, cz = proxy:admin("GET", "/configz")
        local old = assert(cz).generation
        local freed = "generation " .. old .. " freed"
        local slow = auth:path_count("/slow")
        c:send(raw.build { method = "GET", target = "/auth/r?1000", headers = { host = "a" } })
        h.eventually(function() return auth:path_count("/slow") > slow end, 5)
        proxy:rewrite_config(CONFIG, { gen = "two" })
        local rl = assert(proxy:admin("POST", "/reload"))
        assert.equal(200, rl.status, rl.body)
        local res = assert(raw.get(proxy.port, "/auth/n?10"))
        assert.equal("POST 5 two", h.echo_header(h.echo(res), "x-auth"))
        -- the waiting hook holds its generation: not freed before it is done
        assert.falsy(proxy:stderr():find(freed, 1, true))
        res = assert(c:read_response())
        assert.equal(200, res.status, res.body)
        assert.equal("POST 5 one", h.echo_header(h.echo(res), "x-auth"))
        h.eventually(function() return proxy:stderr():find(freed, 1, true) ~= nil end, 10)
        assert.is_true(proxy:alive())
    end)
end)

describe("call-out URLs by DNS name", function()
    local dns = require "helpers.dns"
    local d, auth, proxy

    lazy_setup(function()
        auth = h.start_origin("auth")
        d = dns.start { ["auth.test"] = { ttl = 1, "127.0.0.1" }, ["slow.test"] = "silent" }
        proxy = h.start_proxy { workers = 1, vars = { dns = d.addr, port_auth = auth.port }, config = [=[
local proxy = require "moonproxy"
local http = require "moonproxy.http"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, resolver = { nameservers = { "${dns}" }, timeout = 0.5 } }
local function show(res, err)
  if not res then return "error: " .. tostring(err) end
  return tostring(res.status) .. " " .. tostring(res.headers["x-origin"])
end
proxy.route { path = "/byname", handler = function(req)
  local res, err = http.request { url = "http://auth.test:${port_auth}/x" }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/unknown", handler = function(req)
  local res, err = http.request { url = "http://nope.test:${port_auth}/x" }
  return req:respond(200, show(res, err) .. "\n")
end }
proxy.route { path = "/silent", handler = function(req)
  local res, err = http.request { url = "http://slow.test:${port_auth}/x", timeout = 3 }
  return req:respond(200, show(res, err) .. "\n")
end }
]=] }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, auth, d)
    end)

    it("resolves the URL's name without blocking, and keeps the answer for its TTL", function()
        assert.equal("200 auth\n", assert(raw.get(proxy.port, "/byname")).body)
        local q = d:queries("auth.test")
        assert.is_true(q >= 1)
        for _ = 1, 5 do assert.equal("200 auth\n", assert(raw.get(proxy.port, "/byname")).body) end
        assert.equal(q, d:queries("auth.test")) -- within the TTL: from the cache
        socket.sleep(1.2)
        assert.equal("200 auth\n", assert(raw.get(proxy.port, "/byname")).body)
        assert.is_true(d:queries("auth.test") > q) -- past it: asked again
    end)

    it("gives nil, err for a name that does not resolve, and for a lookup with no answer", function()
        assert.matches("^error: cannot resolve the URL's host: nope%.test: ", assert(raw.get(proxy.port, "/unknown")).body)
        local t0 = socket.gettime()
        local res = assert(raw.get(proxy.port, "/silent", nil, { timeout = 10 }))
        assert.matches("^error: cannot resolve the URL's host: slow%.test: no answer in time", res.body)
        assert.is_true(socket.gettime() - t0 < 2.5, "the lookup's own timeout (0.5 s) ends it")
        assert.equal("200 auth\n", assert(raw.get(proxy.port, "/byname")).body)
    end)
end)
