-- End-to-end: the admin port (/live, /ready, /configz) and reloads (POST
-- /reload, SIGHUP, /rollback) against the real binary: refused scripts keep
-- the running configuration, connections and in-flight requests survive,
-- upstream pools are kept, and a reload storm under load fails no request.
-- Each spec rewrites the configuration file in place and then reloads.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"
local cjson = require "cjson"

-- /x answers the marker itself; every response carries it as x-marker; the
-- rest goes to the origin.
local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 16 }
proxy.on_response(function(req, res) res.headers["x-marker"] = "${marker}" end)
proxy.route { name = "marker", path = "/x", handler = function(req) return req:respond(200, "${marker}") end }
proxy.route { name = "proxied", prefix = "/", upstream = a }
]=]

-- The same with a syntax error (a missing comma) on the /x route's line.
local SYNTAX_ERROR = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 16 }
proxy.route { name = "marker", path = "/x" handler = function(req) return req:respond(200, "broken") end }
proxy.route { name = "proxied", prefix = "/", upstream = a }
]=]

-- The same with a route naming an upstream nobody declared.
local UNKNOWN_UPSTREAM = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 16 }
proxy.route { name = "marker", path = "/x", handler = function(req) return req:respond(200, "broken") end }
proxy.route { name = "proxied", prefix = "/", upstream = "no_such_upstream" }
]=]

-- Two route tables for the reload storm: /x answers A or B.
local TABLE = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 16 }
proxy.route { name = "x", path = "/x", handler = function(req) return req:respond(200, "${table}") end }
proxy.route { name = "table_${table}", path = "/only-${table}",
              handler = function(req) return req:respond(200, "${table}") end }
proxy.route { name = "proxied", prefix = "/", upstream = a }
]=]

-- An upstream whose server is ${server}; a shared dict that on_log writes
-- the marker of the last /slow request into, read back at /last; /incr
-- counts in the same dict.
local STATEFUL = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local d = proxy.shared("reload_state", "1m")
local a = proxy.upstream "a" { servers = { "${server}" }, keepalive = 16 }
proxy.on_log(function(req, res)
  if req.path == "/slow" then d:set("last_slow", "${marker}") end
end)
proxy.route { path = "/x", handler = function(req) return req:respond(200, "${marker}") end }
proxy.route { path = "/incr", handler = function(req) return req:respond(200, tostring(d:incr("n", 1, 0))) end }
proxy.route { path = "/last", handler = function(req) return req:respond(200, tostring(d:get("last_slow"))) end }
proxy.route { prefix = "/", upstream = a }
]=]

-- A load generator run as its own process, so that its requests really
-- overlap the reloads: luajit LOADER PORT STOPFILE OUTFILE. Until STOPFILE
-- exists (at most 30 s) it sends GET /x and GET /p?n=N in turn over 4
-- keep-alive connections and writes one line per request to OUTFILE:
-- "N T_SENT T_ANSWERED STATUS BODY" (BODY: /x's body, or "echo-ok" /
-- "echo-bad" for /p), or "ERR N T_SENT message" (then it reconnects).
local LOADER = [=[
local socket = require "socket"
local port, stopfile, outfile = tonumber(arg[1]), arg[2], arg[3]
local out = assert(io.open(outfile, "w"))
local function connect()
  local c = socket.tcp()
  c:settimeout(5)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:setoption("tcp-nodelay", true)
  return c
end
local function exchange(c, target)
  local ok, err = c:send("GET " .. target .. " HTTP/1.1\r\nHost: load\r\n\r\n")
  if not ok then return nil, "send: " .. tostring(err) end
  local line, rerr = c:receive("*l")
  if not line then return nil, "status line: " .. tostring(rerr) end
  local status = tonumber(line:match("^HTTP/1%.1 (%d%d%d)"))
  if not status then return nil, "bad status line: " .. line end
  local len
  while true do
    local hl, herr = c:receive("*l")
    if not hl then return nil, "head: " .. tostring(herr) end
    if hl == "" or hl == "\r" then break end
    local v = hl:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
    if v then len = tonumber(v) end
  end
  if not len then return nil, "no Content-Length" end
  local body, berr = c:receive(len)
  if not body then return nil, "body: " .. tostring(berr) end
  return status, body
end
local conns = {}
for i = 1, 4 do conns[i] = assert(connect()) end
local deadline = socket.gettime() + 30
local n = 0
while socket.gettime() < deadline do
  if n % 16 == 0 then
    local f = io.open(stopfile, "r")
    if f then f:close() break end
  end
  n = n + 1
  local i = n % 4 + 1
  local target = n % 2 == 0 and "/x" or ("/p?n=" .. n)
  local t1 = socket.gettime()
  local status, body = exchange(conns[i], target)
  local t2 = socket.gettime()
  if not status then
    out:write(string.format("ERR %d %.6f %s %s\n", n, t1, target, tostring(body)))
    conns[i]:close()
    conns[i] = assert(connect())
  else
    if target ~= "/x" then
      body = body:find('"target":"\\/p?n=' .. n .. '"', 1, true) and "echo-ok" or "echo-bad"
    end
    out:write(string.format("%d %.6f %.6f %d %s\n", n, t1, t2, status, body))
  end
end
out:close()
]=]

-- Settings that a reload applies: trusted_proxies and max_body_size.
local SETTINGS = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, trusted_proxies = { ${trusted} }, max_body_size = "${max_body}" }
proxy.route { path = "/remote", handler = function(req) return req:respond(200, req.remote_addr) end }
proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
]=]

local function basename(path)
    return path:match("[^/]+$")
end

-- Lines of text that mention "reload" (any case) and the number n as a whole number.
local function reload_lines(text, n)
    local out = {}
    for line in text:gmatch("[^\n]+") do
        -- "generation N": a bare N would also match the time stamp ("09:38:10.202")
        if line:lower():find("reload", 1, true) and line:find("generation " .. n .. "%f[%D]") then
            out[#out + 1] = line
        end
    end
    return out
end

-- The body of a 200 answer to GET target (nil otherwise).
local function body(port, target)
    local res = raw.get(port, target)
    return res and res.status == 200 and res.body or nil
end

local function configz(proxy)
    local res, doc = proxy:admin("GET", "/configz")
    assert(res, "GET /configz failed")
    assert.equal(200, res.status)
    assert(doc, "/configz is not JSON: " .. tostring(res.body))
    return doc
end

-- Rewrites the configuration from template (vars added) and POSTs /reload:
-- returns the response and its JSON.
local function reload(proxy, template, vars)
    proxy:rewrite_config(template, vars)
    local res, doc = proxy:admin("POST", "/reload")
    assert(res, "POST /reload failed: " .. tostring(doc))
    return res, doc
end

-- Reloads to CONFIG with marker; asserts success and returns the generation.
local function reload_ok(proxy, marker)
    local res, doc = reload(proxy, CONFIG, { marker = marker })
    assert.equal(200, res.status, res.body)
    assert(doc and type(doc.generation) == "number", "no generation in " .. tostring(res.body))
    return doc.generation
end

describe("the admin port", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { a = a.addr, marker = "v1" } }
        h.eventually(function() return h.port_open(proxy.admin_port) end, 5)
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("answers GET /live with 200", function()
        local res = assert(proxy:admin("GET", "/live"))
        assert.equal(200, res.status)
    end)

    it("answers GET /ready with 200 once the configuration is loaded", function()
        proxy:wait_ready()
        assert.equal("v1", body(proxy.port, "/x"))
    end)

    it("answers GET /configz with the generation, load time, source, routes and upstreams", function()
        local doc = configz(proxy)
        assert.is_number(doc.generation)
        assert.truthy(doc.generation >= 1)
        assert.is_not_nil(doc.loaded_at)
        assert.is_string(doc.source)
        assert.truthy(#doc.source > 0)
        assert.is_table(doc.routes)
        assert.is_table(doc.upstreams)
        local routes, upstreams = cjson.encode(doc.routes), cjson.encode(doc.upstreams)
        assert.truthy(routes:find('"marker"', 1, true), routes)
        assert.truthy(routes:find('"proxied"', 1, true), routes)
        assert.truthy(upstreams:find('"a"', 1, true), upstreams)
        assert.truthy(upstreams:find(a.addr, 1, true), upstreams)
    end)

    it("answers 404 for an unknown path", function()
        local res = assert(proxy:admin("GET", "/no-such-admin-page"))
        assert.equal(404, res.status)
    end)

    it("answers a garbage request with 400 and keeps working", function()
        local res = assert(raw.request(proxy.admin_port, "GARBAGE\r\n\r\n"))
        assert.equal(400, res.status)
        assert.equal(200, assert(proxy:admin("GET", "/live")).status)
    end)

    it("is not served on the proxy's listener", function()
        local e = h.echo(raw.get(proxy.port, "/configz"))
        assert.equal("/configz", e.target)
    end)
end)

describe("reload", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { a = a.addr, marker = "v1" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    describe("by POST /reload", function()
        it("switches every worker to the new routes and answers the new generation", function()
            local before = configz(proxy).generation
            local g = reload_ok(proxy, "post-1")
            assert.truthy(g > before, g .. " after " .. before)
            for _ = 1, 20 do -- new connections, spread over both workers
                assert.equal("post-1", body(proxy.port, "/x"))
            end
            assert.equal(g, configz(proxy).generation)
        end)

        it("logs one line with the new generation number", function()
            local g = reload_ok(proxy, "post-log")
            h.eventually(function() return #reload_lines(proxy:stderr(), g) >= 1 end, 5)
            assert.equal(1, #reload_lines(proxy:stderr(), g), proxy:stderr():sub(-3000))
        end)

        it("gives increasing generation numbers", function()
            local last = configz(proxy).generation
            for i = 1, 4 do
                local g = reload_ok(proxy, "inc-" .. i)
                assert.truthy(g > last, g .. " after " .. last)
                last = g
            end
            assert.equal("inc-4", body(proxy.port, "/x"))
        end)

        it("reloads the proxied routes too", function()
            reload_ok(proxy, "post-proxied")
            local res = assert(raw.get(proxy.port, "/through"))
            assert.equal("/through", h.echo(res).target)
            assert.equal("post-proxied", (res:header("x-marker")))
        end)
    end)

    describe("with a stalled admin client", function()
        it("still reloads at once", function()
            local stalled = assert(raw.connect(proxy.admin_port))
            finally(function() stalled:close() end)
            assert(stalled:send("POST /reload HTTP/1.1\r\nHost: x\r\n"))
            local t0 = socket.gettime()
            reload_ok(proxy, "not-stalled")
            assert.truthy(socket.gettime() - t0 < 2, "POST /reload took " .. (socket.gettime() - t0) .. " s")
            assert.equal("not-stalled", body(proxy.port, "/x"))
        end)
    end)

    describe("by SIGHUP", function()
        it("switches to the new routes", function()
            local before = configz(proxy).generation
            proxy:rewrite_config(CONFIG, { marker = "hup-1" })
            proxy:kill("HUP")
            h.eventually(function()
                for _ = 1, 6 do
                    if body(proxy.port, "/x") ~= "hup-1" then return false end
                end
                return true
            end, 5)
            local g = configz(proxy).generation
            assert.truthy(g > before, g .. " after " .. before)
            h.eventually(function() return #reload_lines(proxy:stderr(), g) >= 1 end, 5)
            assert.equal(1, #reload_lines(proxy:stderr(), g), proxy:stderr():sub(-3000))
            assert.is_true(proxy:alive())
        end)
    end)

    describe("a refused script", function()
        local function keeps_serving(marker, generation)
            assert.equal(marker, body(proxy.port, "/x"))
            assert.equal("/still", h.echo(raw.get(proxy.port, "/still")).target)
            assert.equal(generation, configz(proxy).generation)
            assert.is_true(proxy:alive())
        end

        it("with a syntax error answers 422 with file:line and keeps the running configuration", function()
            local g = reload_ok(proxy, "good-1")
            local res, doc = reload(proxy, SYNTAX_ERROR)
            assert.equal(422, res.status, res.body)
            assert(doc and type(doc.error) == "string", "no error in " .. tostring(res.body))
            local at = basename(proxy.conf_path) .. ":" .. h.line_of(SYNTAX_ERROR, 'path = "/x" handler') .. ":"
            assert.truthy(doc.error:find(at, 1, true), "expected " .. at .. " in " .. doc.error)
            keeps_serving("good-1", g)
        end)

        it("with a syntax error is logged on one line with file:line and the running generation", function()
            local g = reload_ok(proxy, "good-2")
            local at = basename(proxy.conf_path) .. ":" .. h.line_of(SYNTAX_ERROR, 'path = "/x" handler') .. ":"
            local before = h.lines_with(proxy:stderr(), at)
            local res = reload(proxy, SYNTAX_ERROR)
            assert.equal(422, res.status)
            h.eventually(function() return #h.lines_with(proxy:stderr(), at) == #before + 1 end, 5)
            local line = h.lines_with(proxy:stderr(), at)[#before + 1]
            assert.truthy(line:find("%f[%d]" .. g .. "%f[%D]"), "no generation " .. g .. " in: " .. line)
        end)

        it("naming an unknown upstream answers 422 with file:line", function()
            local g = reload_ok(proxy, "good-3")
            local res, doc = reload(proxy, UNKNOWN_UPSTREAM)
            assert.equal(422, res.status, res.body)
            assert(doc and type(doc.error) == "string", "no error in " .. tostring(res.body))
            local at = basename(proxy.conf_path) .. ":" .. h.line_of(UNKNOWN_UPSTREAM, "no_such_upstream") .. ":"
            assert.truthy(doc.error:find(at, 1, true), "expected " .. at .. " in " .. doc.error)
            assert.truthy(doc.error:find("no_such_upstream", 1, true), doc.error)
            keeps_serving("good-3", g)
        end)

        it("by SIGHUP is logged with file:line and the running configuration stays", function()
            local g = reload_ok(proxy, "good-4")
            local at = basename(proxy.conf_path) .. ":" .. h.line_of(SYNTAX_ERROR, 'path = "/x" handler') .. ":"
            local before = #h.lines_with(proxy:stderr(), at)
            proxy:rewrite_config(SYNTAX_ERROR)
            proxy:kill("HUP")
            h.eventually(function() return #h.lines_with(proxy:stderr(), at) == before + 1 end, 5)
            keeps_serving("good-4", g)
        end)

        it("does not stop the next good reload", function()
            reload(proxy, SYNTAX_ERROR)
            reload_ok(proxy, "good-5")
            assert.equal("good-5", body(proxy.port, "/x"))
        end)
    end)

    describe("POST /rollback", function()
        it("goes back to the previous configuration, past a refused reload", function()
            reload_ok(proxy, "roll-1")
            local g2 = reload_ok(proxy, "roll-2")
            assert.equal("roll-2", body(proxy.port, "/x"))
            local refused = reload(proxy, SYNTAX_ERROR)
            assert.equal(422, refused.status)
            local res, doc = proxy:admin("POST", "/rollback")
            assert(res, "POST /rollback failed")
            assert.equal(200, res.status, res.body)
            assert(doc and type(doc.generation) == "number", "no generation in " .. tostring(res.body))
            assert.not_equal(g2, doc.generation)
            for _ = 1, 10 do
                assert.equal("roll-1", body(proxy.port, "/x"))
            end
            assert.equal(doc.generation, configz(proxy).generation)
        end)
    end)

    describe("POST /rollback after a configuration that fails at run time", function()
        it("brings the working configuration back", function()
            reload_ok(proxy, "works")
            local broken = CONFIG:gsub('return req:respond%(200, "%${marker}"%)', 'error("fails at run time")')
            local res = reload(proxy, broken, { marker = "broken" })
            assert.equal(200, res.status, res.body)
            assert.equal(500, raw.get(proxy.port, "/x").status)
            local rb = assert(proxy:admin("POST", "/rollback"))
            assert.equal(200, rb.status, rb.body)
            assert.equal("works", body(proxy.port, "/x"))
        end)
    end)

    describe("client connections", function()
        it("a keep-alive connection survives a reload and its next request uses the new configuration", function()
            reload_ok(proxy, "ka-1")
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local r1 = assert(c:request { target = "/x" })
            assert.equal("ka-1", r1.body)
            reload_ok(proxy, "ka-2")
            local r2 = assert(c:request { target = "/x" })
            assert.equal("ka-2", r2.body)
            local r3 = assert(c:request { target = "/after" })
            assert.equal("/after", h.echo(r3).target)
            assert.equal("ka-2", (r3:header("x-marker")))
        end)

        it("an in-flight request finishes with 200 on the configuration it started with", function()
            reload_ok(proxy, "flight-1")
            local before = a:stats().requests
            local c = assert(raw.connect(proxy.port, { timeout = 10 }))
            finally(function() c:close() end)
            assert(c:send(raw.build { target = "/slow?ms=800" }))
            h.eventually(function() return a:stats().requests == before + 1 end, 3)
            local t0 = socket.gettime()
            reload_ok(proxy, "flight-2")
            local took = socket.gettime() - t0
            assert.equal("flight-2", body(proxy.port, "/x"))
            reload_ok(proxy, "flight-3")
            reload_ok(proxy, "flight-2")
            local res = assert(c:read_response())
            assert.equal("/slow?ms=800", h.echo(res).target)
            assert.equal("flight-1", (res:header("x-marker")))
            assert.truthy(took < 0.7, string.format("POST /reload waited %.2fs for the in-flight request", took))
            local r2 = assert(c:request { target = "/x" })
            assert.equal("flight-2", r2.body)
        end)

        it("100 idle keep-alive connections survive a reload and see the new configuration", function()
            reload_ok(proxy, "idle-1")
            local conns = {}
            finally(function() for _, c in ipairs(conns) do c:close() end end)
            for i = 1, 100 do
                conns[i] = assert(raw.connect(proxy.port))
                assert.equal("idle-1", assert(conns[i]:request { target = "/x" }).body)
            end
            reload_ok(proxy, "idle-2")
            local bad = {}
            for i, c in ipairs(conns) do
                local res, err = c:request { target = "/x" }
                if not res or res.body ~= "idle-2" then
                    bad[#bad + 1] = i .. ": " .. tostring(res and res.body or err)
                end
            end
            assert.same({}, bad)
        end)

        it("a request pipelined behind one in flight across a reload is answered in order", function()
            reload_ok(proxy, "pipe-1")
            local before = a:stats().requests
            local c = assert(raw.connect(proxy.port, { timeout = 10 }))
            finally(function() c:close() end)
            assert(c:send(raw.build { target = "/slow?ms=500" } .. raw.build { target = "/x" }))
            h.eventually(function() return a:stats().requests == before + 1 end, 3)
            reload_ok(proxy, "pipe-2")
            local r1 = assert(c:read_response())
            assert.equal("/slow?ms=500", h.echo(r1).target)
            assert.equal("pipe-1", (r1:header("x-marker")))
            local r2 = assert(c:read_response())
            assert.equal(200, r2.status)
            assert.truthy(r2.body == "pipe-1" or r2.body == "pipe-2", r2.body)
        end)

        it("a download in flight across reloads arrives whole", function()
            reload_ok(proxy, "dl-1")
            local size = 8 * 1024 * 1024
            local c = assert(raw.connect(proxy.port, { timeout = 20 }))
            finally(function() c:close() end)
            assert(c:send(raw.build { target = "/big?size=" .. size }))
            local st, got, reloads, res, err = origin.sum_new(), 0, 0, nil, nil
            local co = coroutine.wrap(function()
                res, err = c:read_response { timeout = 20, sink = function(piece)
                    origin.sum_update(st, piece)
                    got = got + #piece
                    coroutine.yield()
                end }
                return "done"
            end)
            -- read a piece, reload every 512 KiB, until the body is in
            local next_at = 512 * 1024
            while co() ~= "done" do
                if got >= next_at and reloads < 8 then
                    reloads = reloads + 1
                    reload_ok(proxy, "dl-" .. (reloads + 1))
                    next_at = next_at + 512 * 1024
                end
            end
            assert(res, err)
            assert.equal(200, res.status)
            assert.equal(size, got)
            assert.equal(origin.pattern_sum(size), origin.sum_hex(st))
            assert.equal("dl-1", (res:header("x-marker")))
            assert.truthy(reloads >= 4, "only " .. reloads .. " reloads during the download")
        end)

        it("keeps the pooled upstream connections of an unchanged upstream", function()
            reload_ok(proxy, "pool-0")
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            for i = 1, 3 do assert.equal("/warm" .. i, h.echo(c:request { target = "/warm" .. i }).target) end
            local before = a:stats().connections
            for r = 1, 5 do
                reload_ok(proxy, "pool-" .. r)
                for i = 1, 3 do
                    local res = c:request { target = "/pooled?r=" .. r .. "&i=" .. i }
                    assert.equal("/pooled?r=" .. r .. "&i=" .. i, h.echo(res).target)
                end
            end
            assert.equal(before, a:stats().connections)
        end)
    end)
end)

describe("reload and runtime state", function()
    local a, b, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        proxy = h.start_proxy { workers = 2, config = STATEFUL, vars = { server = a.addr, marker = "s1" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    local function reload_to(server, marker)
        local res, doc = reload(proxy, STATEFUL, { server = server, marker = marker })
        assert.equal(200, res.status, res.body)
        return doc.generation
    end

    it("keeps the shared dictionaries", function()
        reload_to(a.addr, "s1")
        local n1 = tonumber(body(proxy.port, "/incr"))
        local n2 = tonumber(body(proxy.port, "/incr"))
        assert.equal(n1 + 1, n2)
        reload_to(a.addr, "s2")
        assert.equal(n2 + 1, tonumber(body(proxy.port, "/incr")))
    end)

    it("runs the old generation's on_log for a request in flight across the reload", function()
        reload_to(a.addr, "log-old")
        local before = a:stats().requests
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        assert(c:send(raw.build { target = "/slow?ms=500" }))
        h.eventually(function() return a:stats().requests == before + 1 end, 3)
        reload_to(a.addr, "log-new")
        local res = assert(c:read_response())
        assert.equal(200, res.status)
        h.eventually(function() return body(proxy.port, "/last") == "log-old" end, 5)
    end)

    it("sends new requests to an upstream's new server and finishes in-flight ones on the old", function()
        reload_to(a.addr, "srv-a")
        local before = a:stats().requests
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        assert(c:send(raw.build { target = "/slow?ms=500" }))
        h.eventually(function() return a:stats().requests == before + 1 end, 3)
        reload_to(b.addr, "srv-b")
        for i = 1, 6 do
            assert.equal("b", h.echo(raw.get(proxy.port, "/where?i=" .. i)).name)
        end
        local res = assert(c:read_response())
        assert.equal("a", h.echo(res).name)
        local r2 = assert(c:request { target = "/where-now" })
        assert.equal("b", h.echo(r2).name)
    end)

    it("closes the pooled connections to a server no configuration uses any more", function()
        reload_to(a.addr, "pool-a")
        for i = 1, 6 do assert.equal("a", h.echo(raw.get(proxy.port, "/warm?i=" .. i)).name) end
        assert.truthy(a:stats().open >= 1)
        reload_to(b.addr, "pool-b")
        assert.equal("b", h.echo(raw.get(proxy.port, "/moved")).name)
        h.eventually(function() return a:stats().open == 0 end, 5)
    end)

    it("takes two concurrent POST /reload without harm", function()
        proxy:rewrite_config(STATEFUL, { server = a.addr, marker = "concurrent" })
        local c1 = assert(raw.connect(proxy.admin_port, { timeout = 10 }))
        local c2 = assert(raw.connect(proxy.admin_port, { timeout = 10 }))
        finally(function() c1:close(); c2:close() end)
        local host = { { "Host", "localhost:" .. proxy.admin_port } }
        assert(c1:send(raw.build { method = "POST", target = "/reload", headers = host, body = "" }))
        assert(c2:send(raw.build { method = "POST", target = "/reload", headers = host, body = "" }))
        local r1, r2 = assert(c1:read_response()), assert(c2:read_response())
        local ok = 0
        for _, r in ipairs { r1, r2 } do
            assert.truthy(r.status == 200 or r.status == 409 or r.status == 429 or r.status == 503,
                "POST /reload: " .. r.status .. " " .. tostring(r.body))
            if r.status == 200 then ok = ok + 1 end
        end
        assert.truthy(ok >= 1)
        assert.equal("concurrent", body(proxy.port, "/x"))
        assert.is_true(proxy:alive())
    end)

    it("survives a burst of SIGHUPs and ends on the file's configuration", function()
        local g = configz(proxy).generation
        proxy:rewrite_config(STATEFUL, { server = a.addr, marker = "burst" })
        for _ = 1, 10 do
            proxy:kill("HUP")
            socket.sleep(0.005)
        end
        h.eventually(function() return configz(proxy).generation > g and body(proxy.port, "/x") == "burst" end, 5)
        assert.is_true(proxy:alive())
        assert.equal("a", h.echo(raw.get(proxy.port, "/after-burst")).name)
    end)

    it("refuses a missing configuration file with 422 and keeps serving", function()
        reload_to(a.addr, "present")
        local g = configz(proxy).generation
        local away = proxy.conf_path .. ".away"
        assert(os.rename(proxy.conf_path, away))
        local res, doc
        local ok, err = pcall(function() res, doc = proxy:admin("POST", "/reload") end)
        assert(os.rename(away, proxy.conf_path))
        assert(ok, err)
        assert.equal(422, res.status, res.body)
        assert.truthy(doc and type(doc.error) == "string" and doc.error:find(basename(proxy.conf_path), 1, true),
            res.body)
        assert.equal("present", body(proxy.port, "/x"))
        assert.equal(g, configz(proxy).generation)
    end)

    it("refuses a script that raises at its top level with 422 and file:line", function()
        reload_to(a.addr, "before-raise")
        local text = STATEFUL .. 'error("raised at the top level")\n'
        local res, doc = reload(proxy, text, { server = a.addr, marker = "raised" })
        assert.equal(422, res.status, res.body)
        local at = basename(proxy.conf_path) .. ":" .. h.line_of(text, "raised at the top level") .. ":"
        assert.truthy(doc and doc.error and doc.error:find(at, 1, true), "expected " .. at .. " in " .. res.body)
        assert.equal("before-raise", body(proxy.port, "/x"))
    end)

    it("does not reload on GET /reload", function()
        reload_to(a.addr, "no-get")
        local g = configz(proxy).generation
        proxy:rewrite_config(STATEFUL, { server = a.addr, marker = "got" })
        local res = assert(proxy:admin("GET", "/reload"))
        assert.truthy(res.status == 405 or res.status == 404, "GET /reload: " .. res.status)
        assert.equal("no-get", body(proxy.port, "/x"))
        assert.equal(g, configz(proxy).generation)
    end)
end)

describe("reload of settings", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = SETTINGS,
                                vars = { a = a.addr, trusted = '"127.0.0.1/32"', max_body = "1m" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    local function remote()
        local res = assert(raw.get(proxy.port, "/remote", { { "X-Forwarded-For", "203.0.113.7" } }))
        assert.equal(200, res.status)
        return res.body
    end

    local function post(size)
        return assert(raw.request(proxy.port, { method = "POST", target = "/post", body = ("b"):rep(size) })).status
    end

    it("applies new trusted_proxies and max_body_size", function()
        assert.equal("203.0.113.7", remote())
        assert.equal(200, post(4096))
        local res = reload(proxy, SETTINGS, { trusted = "", max_body = "1k" })
        assert.equal(200, res.status, res.body)
        for _ = 1, 4 do
            assert.equal("127.0.0.1", remote())
            assert.equal(413, post(4096))
        end
        assert.equal(200, post(512))
    end)

    it("keeps listening where it listened when the listen address changes, and says so", function()
        local other = "127.0.0.1:" .. h.free_port()
        local res = reload(proxy, SETTINGS, { trusted = '"127.0.0.1/32"', max_body = "1m", listen = other })
        assert.equal(200, res.status, res.body)
        assert.equal("203.0.113.7", remote())
        h.eventually(function() return #h.lines_with(proxy:stderr(), "restart") >= 1 end, 5)
    end)
end)

describe("POST /rollback without a previous configuration", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr, marker = "only" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("is refused with a 4xx and the configuration stays", function()
        local g = configz(proxy).generation
        local res = assert(proxy:admin("POST", "/rollback"))
        assert.truthy(res.status >= 400 and res.status < 500, "POST /rollback: " .. res.status .. " " .. res.body)
        assert.equal("only", body(proxy.port, "/x"))
        assert.equal(g, configz(proxy).generation)
    end)
end)

describe("reload under load #slow", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = TABLE, vars = { a = a.addr, table = "A" } }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("fails no request while reloading 20 times between two route tables", function()
        local RELOADS, UPLOAD_PIECES, PIECE = 20, 10, 4096
        local failures = {}
        local function fail(fmt, ...)
            if #failures < 50 then failures[#failures + 1] = string.format(fmt, ...) end
        end

        local kc = assert(raw.connect(proxy.port))
        local conns = { kc }
        local stopfile = h.tmpname(".stop")
        local loader_out = h.tmpname(".load")
        local loader = h.spawn { "luajit", h.write_file(h.tmpname(".lua"), LOADER), tostring(proxy.port), stopfile,
                                 loader_out }
        finally(function()
            for _, c in ipairs(conns) do c:close() end
            h.write_file(stopfile, "stop")
            loader:stop(5)
        end)
        local origin_before = a:stats()
        -- when each reload started and ended, and the table it put in place
        local windows = { { s = -math.huge, e = -math.huge, table = "A" } }
        h.eventually(function() return #(h.read_file(loader_out) or "") > 0 end, 5)

        -- Uploads: a chunked POST sent in UPLOAD_PIECES pieces, one every 0.1 s.
        local uploads, nupload, uploads_ok = {}, 0, 0
        local function start_upload()
            nupload = nupload + 1
            local c, err = raw.connect(proxy.port, { timeout = 10 })
            if not c then return fail("upload %d: connect: %s", nupload, tostring(err)) end
            conns[#conns + 1] = c
            local pieces = {}
            for i = 1, UPLOAD_PIECES do
                pieces[i] = (string.format("upload %d piece %d|", nupload, i)):rep(PIECE):sub(1, PIECE)
            end
            local whole = table.concat(pieces)
            local u = { c = c, id = nupload, pieces = pieces, sent = 0, next_at = socket.gettime(),
                        sum = origin.checksum(whole), len = #whole }
            local ok, serr = c:send("POST /upload?u=" .. u.id .. " HTTP/1.1\r\nHost: load\r\n"
                .. "Transfer-Encoding: chunked\r\n\r\n")
            if not ok then return fail("upload %d: send head: %s", u.id, tostring(serr)) end
            uploads[#uploads + 1] = u
        end
        local function pump_uploads(now)
            for i = #uploads, 1, -1 do
                local u = uploads[i]
                if now >= u.next_at then
                    u.sent = u.sent + 1
                    local p = u.pieces[u.sent]
                    local ok, err = u.c:send(string.format("%x\r\n", #p) .. p .. "\r\n"
                        .. (u.sent == #u.pieces and "0\r\n\r\n" or ""))
                    u.next_at = now + 0.1
                    if not ok then
                        fail("upload %d: send piece %d: %s", u.id, u.sent, tostring(err))
                        table.remove(uploads, i)
                    elseif u.sent == #u.pieces then
                        table.remove(uploads, i)
                        local res, rerr = u.c:read_response { timeout = 10 }
                        if not res then
                            fail("upload %d: no response: %s", u.id, tostring(rerr))
                        elseif res.status ~= 200 then
                            fail("upload %d: status %d: %s", u.id, res.status, tostring(res.body))
                        else
                            local okj, e = pcall(cjson.decode, res.body)
                            if not okj or e.body_sum ~= u.sum or e.body_len ~= u.len then
                                fail("upload %d: origin got %s", u.id, tostring(res.body):sub(1, 200))
                            else
                                uploads_ok = uploads_ok + 1
                            end
                        end
                    end
                end
            end
        end

        -- One request on the keep-alive connection; /x must answer one of
        -- `allowed` (a set), anything else the origin's echo.
        local n = 0
        local function check(target, res, err, allowed)
            if not res then
                fail("request %d %s: %s", n, target, tostring(err))
                kc:close()
                kc = assert(raw.connect(proxy.port)) -- a reload must not close it: counted as a failure
                conns[#conns + 1] = kc
            elseif res.status ~= 200 then
                fail("request %d %s: status %d", n, target, res.status)
            elseif target == "/x" then
                if not allowed[res.body] then fail("request %d /x: got %s", n, tostring(res.body)) end
            else
                local okj, e = pcall(cjson.decode, res.body)
                if not okj or e.target ~= target then fail("request %d %s: got %s", n, target, tostring(res.body)) end
            end
        end

        local current, other = "A", "B"
        local last_generation = configz(proxy).generation
        local reloads = 0
        local deadline = socket.gettime() + 15
        local next_reload = socket.gettime() + 0.15
        while socket.gettime() < deadline and n < 20000 do
            local now = socket.gettime()
            if reloads >= RELOADS and #uploads == 0 then break end
            while reloads < RELOADS and #uploads < 3 do start_upload() end
            n = n + 1
            local target = n % 2 == 0 and "/x" or "/p?n=" .. n
            if reloads < RELOADS and now >= next_reload then
                -- a request in flight across the reload: either table
                kc:send(raw.build { target = "/x" })
                proxy:rewrite_config(TABLE, { table = other })
                local t_start = socket.gettime()
                local res, doc = proxy:admin("POST", "/reload")
                windows[#windows + 1] = { s = t_start, e = socket.gettime(), table = other }
                if not res or res.status ~= 200 then
                    fail("reload %d: %s", reloads + 1,
                        res and (res.status .. " " .. tostring(res.body)) or tostring(doc))
                elseif not doc or type(doc.generation) ~= "number" or doc.generation <= last_generation then
                    fail("reload %d: generation %s after %s", reloads + 1, tostring(doc and doc.generation),
                        tostring(last_generation))
                else
                    last_generation = doc.generation
                end
                local r, err = kc:read_response()
                check("/x", r, err, { [current] = true, [other] = true })
                current, other = other, current
                reloads = reloads + 1
                next_reload = socket.gettime() + 0.15
                -- once POST /reload answered, new requests see the new table
                n = n + 1
                local r2, err2 = kc:request { target = "/x" }
                check("/x", r2, err2, { [current] = true })
                -- /only-A exists in table A only (in B it reaches the origin's echo)
                local fresh = raw.get(proxy.port, "/only-" .. current)
                if not fresh or fresh.status ~= 200 or fresh.body ~= current then
                    fail("reload %d: /only-%s on a new connection: %s %s", reloads, current,
                        tostring(fresh and fresh.status), tostring(fresh and fresh.body):sub(1, 100))
                end
            else
                local r, err = kc:request { target = target }
                check(target, r, err, { [current] = true })
            end
            pump_uploads(socket.gettime())
            socket.sleep(0.001)
        end

        -- the loader's answers: table k was live from the start of reload k
        -- to the end of reload k+1; an answer must come from a table live
        -- at some point between the request's sending and its answer
        h.write_file(stopfile, "stop")
        assert.equal(0, loader:wait(10), loader:stderr())
        local loaded, overlapping = 0, 0
        for line in (h.read_file(loader_out) or ""):gmatch("[^\n]+") do
            local ln, t1, t2, status, answer = line:match("^(%d+) (%S+) (%S+) (%d+) (.*)$")
            t1, t2 = tonumber(t1), tonumber(t2)
            if not ln then
                fail("loader: %s", line)
            elseif status ~= "200" then
                fail("loader request %s: status %s", ln, status)
            elseif answer == "echo-bad" then
                fail("loader request %s: wrong echo", ln)
            elseif answer ~= "echo-ok" then
                loaded = loaded + 1
                local ok = false
                for k, w in ipairs(windows) do
                    local live_until = windows[k + 1] and windows[k + 1].e or math.huge
                    if w.table == answer and w.s <= t2 and live_until >= t1 then ok = true end
                    if w.s <= t2 and w.e >= t1 then overlapping = overlapping + 1 end
                end
                if not ok then
                    fail("loader request %s /x sent %.6f answered %.6f: %s, not live then", ln, t1, t2, answer)
                end
            end
        end
        assert.same({}, failures)
        -- the pools survive the reloads: at most one connection per request
        -- in flight at once (8 clients) per worker, not new ones per reload
        local opened = a:stats().connections - origin_before.connections
        assert.truthy(opened <= 16, opened .. " upstream connections opened during the reloads")
        assert.truthy(loaded >= 200, "the loader made only " .. loaded .. " /x requests")
        assert.truthy(overlapping >= 1, "no loader request overlapped a reload")
        assert.equal(RELOADS, reloads)
        assert.equal(0, #uploads, "uploads still running at the deadline")
        assert.truthy(uploads_ok >= 3, "only " .. uploads_ok .. " uploads")
        assert.truthy(n >= 200, "only " .. n .. " requests")
        assert.is_true(proxy:alive())
    end)

    it("does not grow its RSS by more than 30 MiB over 200 reloads", function()
        local function reload_n(k)
            for i = 1, k do
                proxy:rewrite_config(TABLE, { table = i % 2 == 0 and "A" or "B" })
                local res = proxy:admin("POST", "/reload")
                assert(res and res.status == 200, "reload failed: " .. tostring(res and res.body))
            end
        end
        reload_n(20)
        local rss20 = assert(h.rss_kb(proxy.pid))
        reload_n(180)
        local rss200 = assert(h.rss_kb(proxy.pid))
        -- AddressSanitizer keeps freed memory in quarantine (256 MiB): no bound there
        if not os.getenv("ASAN_OPTIONS") then
            assert.truthy(rss200 - rss20 < 30 * 1024,
                string.format("RSS grew from %d KiB to %d KiB over 180 reloads", rss20, rss200))
        end
        assert.equal(200, (raw.get(proxy.port, "/x") or {}).status)
    end)
end)
