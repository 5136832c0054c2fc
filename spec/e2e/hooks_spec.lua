-- End-to-end: Lua hooks against the real binary and an origin. The global
-- hooks, the per-route rewrite/on_request/on_response/plugins/handler, their
-- order, the request and response objects, direct responses, error
-- boundaries (500 + file:line), a request used after it finished, and
-- remote_addr behind trusted proxies. One worker, so that the Lua upvalues a
-- hook keeps (on_log's record, a stashed request) are seen by later requests.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

-- Each hook appends its name to req.ctx.trace; the request side's last hook
-- sends the trace upstream as x-trace, the response side's last one returns
-- it to the client as x-trace, and on_log records it per request id (read
-- back through /_logged?ID).
local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", plugin_path = "${plugin_path}",
                 trusted_proxies = { "127.0.0.1/32", "10.0.0.0/8" } }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }

local function step(req, name)
  local t = req.ctx.trace
  if t == nil then
    t = {}
    req.ctx.trace = t
  end
  t[#t + 1] = name
end
local function trace(req)
  return table.concat(req.ctx.trace or {}, ",")
end

local logged = {}  -- request id -> what on_log saw
local stash = {}   -- a request (and response) kept after they finished

proxy.on_request(function(req)
  step(req, "on_request")
  local at = req.headers["x-respond-at"]
  if at == "global" then
    return req:respond(299, "from global on_request\n", { ["x-from"] = "global", ["content-type"] = "text/plain" })
  end
  if req.headers["x-fail-at"] == "global_request" then
    error("boom in global on_request")
  end
end)

proxy.on_response(function(req, res)
  step(req, "on_response")
  res.headers["x-global-response"] = "seen " .. tostring(res.status)
  if req.headers["x-fail-at"] == "global_response" then
    error("boom in global on_response")
  end
end)

proxy.on_log(function(req, res)
  step(req, "on_log")
  logged[req.id] = trace(req) .. " status=" .. tostring(res.status)
  if req.headers["x-fail-at"] == "log" then
    error("boom in on_log")
  end
end)

proxy.route { path = "/_logged", handler = function(req)
  return req:respond(200, logged[req.query or ""] or "none")
end }

-- order: regex route with every hook, proxied
proxy.route { name = "order", regex = [[^/order/(\w+)$]], upstream = a,
  rewrite = function(req, m)
    step(req, "rewrite:" .. m[1])
    if m[1] == "respond" then
      return req:respond(298, "from rewrite\n", { ["x-from"] = "rewrite" })
    end
    if m[1] == "fail" then
      error("boom in rewrite")
    end
    req:set_path("/echo/" .. m[1])
  end,
  on_request = function(req)
    step(req, "route_on_request")
    req.headers["x-trace"] = trace(req)
  end,
  on_response = function(req, res)
    step(req, "route_on_response")
    res.headers["x-trace"] = trace(req)
  end }

-- the same with a plugin (from plugin_path) between rewrite and on_request
proxy.route { name = "plugged", regex = [[^/plugged/(\w+)$]], upstream = a,
  plugins = { { "mp_test_trace", tag = "p1" }, { "mp_test_trace", tag = "p2" } },
  rewrite = function(req, m) step(req, "rewrite:" .. m[1]) end,
  on_request = function(req)
    step(req, "route_on_request")
    req.headers["x-trace"] = trace(req)
  end,
  on_response = function(req, res)
    step(req, "route_on_response")
    res.headers["x-trace"] = trace(req)
  end }

-- captures
proxy.route { regex = [[^/cap/(\d+)/(\w+)$]], upstream = a,
  rewrite = function(req, m)
    req:set_path("/u/" .. m[1] .. "/" .. m[2])
    req.headers["x-m0"] = m[0]
  end }

-- handlers
proxy.route { path = "/handler/proxy", on_request = function(req) step(req, "route_on_request") end,
  handler = function(req)
    step(req, "handler")
    req.headers["x-trace"] = trace(req)
    return a
  end }
proxy.route { path = "/handler/respond", handler = function(req)
  step(req, "handler")
  return req:respond(201, "made by the handler\n", { ["x-handler"] = "yes" })
end }
proxy.route { path = "/handler/empty", handler = function(req) return req:respond(204) end }
proxy.route { path = "/handler/fail", handler = function(req)
  error("boom in handler")
end }

-- respond from a route's on_request
proxy.route { prefix = "/respond/", upstream = a, on_request = function(req)
  step(req, "route_on_request")
  return req:respond(297, "from route on_request\n", { ["x-from"] = "route", ["x-trace"] = trace(req) })
end }

-- every field of req, sent upstream as headers
proxy.route { prefix = "/fields", upstream = a, on_request = function(req)
  local h = req.headers
  h["x-f-method"] = req.method
  h["x-f-path"] = req.path
  h["x-f-query"] = req.query == nil and "(nil)" or ("[" .. req.query .. "]")
  h["x-f-host"] = req.host
  h["x-f-scheme"] = req.scheme
  h["x-f-remote"] = req.remote_addr
  h["x-f-id"] = req.id
  h["x-f-ctx"] = type(req.ctx)
  h["x-f-lower"] = h["x-mixed-case"]
  h["x-f-upper"] = h["X-MIXED-CASE"]
  local multi = h["x-multi"]
  h["x-f-multi"] = type(multi) == "table" and table.concat(multi, "|") or ("single:" .. tostring(multi))
  h["x-f-absent"] = tostring(h["x-not-sent"])
end }

-- a repeated response header read as a list and removed
proxy.route { prefix = "/cookies", upstream = a, on_response = function(req, res)
  local v = res.headers["Set-Cookie"]
  res.headers["x-cookies"] = type(v) == "table" and table.concat(v, "|") or ("single:" .. tostring(v))
  res.headers["set-cookie"] = nil
end }

-- header and target changes
proxy.route { prefix = "/change", upstream = a, on_request = function(req)
  req.headers["x-added"] = "added"
  req.headers["X-Replace"] = "new"
  req.headers["x-remove"] = nil
  req.headers["x-multi"] = "one"
  if req.path == "/change/target" then
    req:set_path("/changed")
    req:set_query("a=1&b=2")
  elseif req.path == "/change/path" then
    req:set_path("/changed-path")
  end
end }

-- response changes
local function change_response(req, res)
  res.headers["x-saw-origin"] = res.headers["X-ORIGIN"]
  res.headers["x-origin"] = nil
  res.headers["x-added"] = "r"
  if res.status == 200 then
    res.status = 203
  end
end
proxy.route { prefix = "/res", upstream = a, on_response = change_response }
proxy.route { path = "/big", upstream = a, on_response = change_response }

-- remote_addr
proxy.route { path = "/remote", handler = function(req) return req:respond(200, req.remote_addr) end }

-- errors in a route's hooks
proxy.route { path = "/fail/on_request", upstream = a, on_request = function(req)
  error("boom in route on_request")
end }
proxy.route { path = "/fail/on_response", upstream = a, on_response = function(req, res)
  error("boom in route on_response")
end }
proxy.route { path = "/fail/table", upstream = a, on_request = function(req)
  error({ code = 42 })
end }

-- a request and a response used after they finished
proxy.route { path = "/stash", upstream = a,
  on_request = function(req) stash.req = req end,
  on_response = function(req, res) stash.res = res end }
proxy.route { path = "/stale", handler = function(req)
  local old, what = stash.req, req.query
  if what == "set_path" then
    old:set_path("/late")
  elseif what == "set_query" then
    old:set_query("late=1")
  elseif what == "respond" then
    old:respond(200, "late")
  elseif what == "header" then
    old.headers["x-late"] = "1"
  elseif what == "status" then
    stash.res.status = 201
  elseif what == "res_header" then
    stash.res.headers["x-late"] = "1"
  end
  return req:respond(200, "no error")
end }

-- values a hook may not produce (the "\r\n" are real CR LF in the script)
proxy.route { prefix = "/bad/", upstream = a, on_request = function(req)
  local what = req.path
  if what == "/bad/header-value" then
    req.headers["x-bad"] = "a\r\nInjected: 1"
  elseif what == "/bad/header-name" then
    req.headers["x-bad\r\nInjected"] = "1"
  elseif what == "/bad/path" then
    req:set_path("/a HTTP/1.1\r\nInjected: 1\r\n\r\nGET /b")
  elseif what == "/bad/query" then
    req:set_query("a=1 HTTP/1.1\r\nInjected: 1")
  -- (not `return req:respond(...)`: a tail call leaves no caller line for the error)
  elseif what == "/bad/respond-header" then
    local answered = req:respond(200, "x", { ["x-bad"] = "a\r\nInjected: 1" })
    return answered
  elseif what == "/bad/respond-status" then
    local answered = req:respond(1000, "bad status")
    return answered
  elseif what == "/bad/content-length" then
    req.headers["content-length"] = "2"
  elseif what == "/bad/transfer-encoding" then
    req.headers["transfer-encoding"] = "chunked"
  end
end }
proxy.route { prefix = "/badres/", upstream = a, on_response = function(req, res)
  local what = req.path
  if what == "/badres/header-value" then
    res.headers["x-bad"] = "a\r\nInjected: 1"
  elseif what == "/badres/content-length" then
    res.headers["content-length"] = "1"
  elseif what == "/badres/status" then
    res.status = 99
  end
end }

-- several values for one header
proxy.route { path = "/list", upstream = a, on_request = function(req) req.headers["x-l"] = { "1", "2" } end }
-- a big direct response, and one to a HEAD
proxy.route { path = "/respond/big", handler = function(req) return req:respond(200, ("0123456789"):rep(100000)) end }
proxy.route { path = "/respond/head", handler = function(req) return req:respond(200, "hello body") end }

proxy.route { prefix = "/", upstream = a }
]=]

-- A plugin module (plugin_path): on each side it appends "plugin:TAG" and
-- "plugin_response:TAG" to the trace.
local TRACE_PLUGIN = [=[
local function step(req, name)
  local t = req.ctx.trace
  if t == nil then
    t = {}
    req.ctx.trace = t
  end
  t[#t + 1] = name
end
return {
  name = "mp_test_trace",
  on_request = function(conf, req) step(req, "plugin:" .. tostring(conf.tag)) end,
  on_response = function(conf, req, res) step(req, "plugin_response:" .. tostring(conf.tag)) end,
}
]=]

local function basename(path)
    return path:match("[^/]+$")
end

describe("hooks", function()
    local a, proxy, plugin_dir, conf_text, where

    lazy_setup(function()
        a = h.start_origin("a")
        plugin_dir = h.tmpname(".plugins")
        assert(os.execute("mkdir -p " .. h.quote(plugin_dir)) == 0)
        h.write_file(plugin_dir .. "/mp_test_trace.lua", TRACE_PLUGIN)
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr, plugin_path = plugin_dir } }
        conf_text = h.read_file(proxy.conf_path)
        -- "file:line" of the first line of the configuration that contains needle
        where = function(needle)
            return basename(proxy.conf_path) .. ":" .. h.line_of(conf_text, needle)
        end
    end)

    lazy_teardown(function()
        if plugin_dir then os.execute("rm -rf " .. h.quote(plugin_dir)) end
        h.shutdown(proxy, a)
    end)

    local function get(target, headers)
        return raw.get(proxy.port, target, headers)
    end

    -- What on_log recorded for request id (it runs after the response is sent).
    local function logged(id)
        return h.eventually(function()
            local res = get("/_logged?" .. id)
            return res and res.status == 200 and res.body ~= "none" and res.body
        end, 5)
    end

    describe("order", function()
        it("runs global on_request, rewrite, route on_request, then forwards", function()
            local e = h.echo(get("/order/abc"))
            assert.equal("/echo/abc", e.target)
            assert.equal("on_request,rewrite:abc,route_on_request", h.echo_header(e, "x-trace"))
        end)

        it("runs global on_response before the route's on_response", function()
            local res = assert(get("/order/abc"))
            assert.equal(200, res.status)
            assert.equal("on_request,rewrite:abc,route_on_request,on_response,route_on_response",
                (res:header("x-trace")))
            assert.equal("seen 200", (res:header("x-global-response")))
        end)

        it("runs on_log last, after the response, with its status", function()
            local res = assert(get("/order/abc", { { "X-Request-ID", "order-log-1" } }))
            assert.equal(200, res.status)
            assert.equal("on_request,rewrite:abc,route_on_request,on_response,route_on_response,on_log status=200",
                logged("order-log-1"))
        end)

        it("runs a route's plugins after rewrite and before on_request, in their order", function()
            local res = assert(get("/plugged/x", { { "X-Request-ID", "plugged-1" } }))
            local e = h.echo(res)
            assert.equal("on_request,rewrite:x,plugin:p1,plugin:p2,route_on_request", h.echo_header(e, "x-trace"))
            assert.equal("on_request,rewrite:x,plugin:p1,plugin:p2,route_on_request,"
                .. "on_response,plugin_response:p1,plugin_response:p2,route_on_response", (res:header("x-trace")))
        end)

        it("runs the route's on_request before its handler", function()
            local e = h.echo(get("/handler/proxy"))
            assert.equal("/handler/proxy", e.target)
            assert.equal("on_request,route_on_request,handler", h.echo_header(e, "x-trace"))
        end)

        it("shares one req.ctx table across the hooks of a request only", function()
            local r1 = assert(get("/order/one"))
            local r2 = assert(get("/order/two"))
            assert.equal("on_request,rewrite:one,route_on_request,on_response,route_on_response",
                (r1:header("x-trace")))
            assert.equal("on_request,rewrite:two,route_on_request,on_response,route_on_response",
                (r2:header("x-trace")))
        end)
    end)

    describe("rewrite", function()
        it("gets the regex captures in m[1].. and the whole match in m[0]", function()
            local e = h.echo(get("/cap/42/bob?q=1"))
            assert.equal("/u/42/bob?q=1", e.target)
            assert.equal("/cap/42/bob", h.echo_header(e, "x-m0"))
        end)
    end)

    describe("the request object", function()
        local e

        lazy_setup(function()
            e = h.echo(get("/fields/x?a=1&b=2", {
                { "Host", "fields.example" },
                { "X-Request-ID", "fields-1" },
                { "X-Mixed-Case", "mc" },
                { "X-Multi", "1" },
                { "X-Multi", "2" },
            }))
        end)

        it("has method, path, query, host and scheme", function()
            assert.equal("GET", h.echo_header(e, "x-f-method"))
            assert.equal("/fields/x", h.echo_header(e, "x-f-path"))
            assert.equal("[a=1&b=2]", h.echo_header(e, "x-f-query"))
            assert.equal("fields.example", h.echo_header(e, "x-f-host"))
            assert.equal("http", h.echo_header(e, "x-f-scheme"))
        end)

        it("has the request id and a ctx table", function()
            assert.equal("fields-1", h.echo_header(e, "x-f-id"))
            assert.equal("table", h.echo_header(e, "x-f-ctx"))
        end)

        it("has a generated request id equal to the X-Request-ID sent upstream and back", function()
            local res = assert(get("/fields/gen"))
            local ge = h.echo(res)
            local id = h.echo_header(ge, "x-f-id")
            assert.is_string(id)
            assert.equal(h.echo_header(ge, "x-request-id"), id)
            assert.equal(res:header("x-request-id"), id)
        end)

        it("has the peer as remote_addr when no X-Forwarded-For was sent", function()
            assert.equal("127.0.0.1", h.echo_header(e, "x-f-remote"))
        end)

        it("has a nil query without '?' and an empty one with a bare '?'", function()
            assert.equal("(nil)", h.echo_header(h.echo(get("/fields/noq")), "x-f-query"))
            assert.equal("[]", h.echo_header(h.echo(get("/fields/emptyq?")), "x-f-query"))
        end)

        it("reads headers case-insensitively", function()
            assert.equal("mc", h.echo_header(e, "x-f-lower"))
            assert.equal("mc", h.echo_header(e, "x-f-upper"))
            assert.equal("nil", h.echo_header(e, "x-f-absent"))
        end)

        it("reads a repeated header as a list", function()
            assert.equal("1|2", h.echo_header(e, "x-f-multi"))
            local single = h.echo(get("/fields/one", { { "X-Multi", "solo" } }))
            assert.equal("single:solo", h.echo_header(single, "x-f-multi"))
        end)

        it("reads the method of a POST", function()
            local pe = h.echo(raw.request(proxy.port, { method = "POST", target = "/fields/post", body = "abc" }))
            assert.equal("POST", h.echo_header(pe, "x-f-method"))
            assert.equal(3, pe.body_len)
        end)
    end)

    describe("changes made by request hooks", function()
        it("set, replace and remove the headers the upstream receives", function()
            local e = h.echo(get("/change/h", {
                { "X-Replace", "old" }, { "X-Remove", "gone" }, { "X-Multi", "1" }, { "X-Multi", "2" },
                { "X-Kept", "kept" },
            }))
            assert.equal("added", h.echo_header(e, "x-added"))
            assert.equal("new", h.echo_header(e, "x-replace"))
            assert.same({}, h.echo_headers(e, "x-remove"))
            assert.same({ "one" }, h.echo_headers(e, "x-multi"))
            assert.equal("kept", h.echo_header(e, "x-kept"))
        end)

        it("set the path and the query the upstream receives", function()
            assert.equal("/changed?a=1&b=2", h.echo(get("/change/target?x=9")).target)
        end)

        it("keep the query when only the path is set", function()
            assert.equal("/changed-path?keep=1", h.echo(get("/change/path?keep=1")).target)
        end)
    end)

    describe("changes made by response hooks", function()
        it("set the status and set, read and remove the headers the client receives", function()
            local res = assert(get("/res/x"))
            assert.equal(203, res.status)
            assert.equal("a", (res:header("x-saw-origin")))
            assert.same({}, res:header_all("x-origin"))
            assert.equal("r", (res:header("x-added")))
            assert.equal("/res/x", h.echo({ status = 200, body = res.body }).target)
        end)

        it("read a repeated header as a list and remove every line of it", function()
            local res = assert(get("/cookies?resp_header=Set-Cookie:a%3D1&resp_header=Set-Cookie:b%3D2"))
            assert.equal(200, res.status)
            assert.equal("a=1|b=2", (res:header("x-cookies")))
            assert.same({}, res:header_all("set-cookie"))
        end)

        it("leave the body and its framing intact", function()
            local res = assert(get("/big?size=100000"))
            assert.equal(203, res.status)
            assert.equal(100000, #res.body)
        end)
    end)

    describe("req:respond", function()
        it("answers from the global on_request with its headers, without the upstream", function()
            local before = a:stats().requests
            local res = assert(get("/order/abc", { { "X-Respond-At", "global" } }))
            assert.equal(299, res.status)
            assert.equal("from global on_request\n", res.body)
            assert.equal("global", (res:header("x-from")))
            assert.equal("text/plain", (res:header("content-type")))
            assert.equal(before, a:stats().requests)
        end)

        it("skips the route's hooks after a response made by the global on_request", function()
            assert(get("/order/abc", { { "X-Respond-At", "global" }, { "X-Request-ID", "respond-global-1" } }))
            local rec = logged("respond-global-1")
            assert.falsy(rec:find("rewrite", 1, true), rec)
            assert.falsy(rec:find("route_on_request", 1, true), rec)
            assert.truthy(rec:find("status=299", 1, true), rec)
        end)

        it("lets the global on_response see a response made by a hook", function()
            local res = assert(get("/order/abc", { { "X-Respond-At", "global" } }))
            assert.equal(299, res.status)
            assert.equal("seen 299", (res:header("x-global-response")))
        end)

        it("answers from a rewrite", function()
            local before = a:stats().requests
            local res = assert(get("/order/respond"))
            assert.equal(298, res.status)
            assert.equal("from rewrite\n", res.body)
            assert.equal("rewrite", (res:header("x-from")))
            assert.equal(before, a:stats().requests)
        end)

        it("answers from a route's on_request", function()
            local before = a:stats().requests
            local res = assert(get("/respond/x"))
            assert.equal(297, res.status)
            assert.equal("from route on_request\n", res.body)
            assert.equal("route", (res:header("x-from")))
            assert.equal("on_request,route_on_request", (res:header("x-trace")))
            assert.equal(before, a:stats().requests)
        end)

        it("answers from a handler", function()
            local before = a:stats().requests
            local res = assert(get("/handler/respond"))
            assert.equal(201, res.status)
            assert.equal("made by the handler\n", res.body)
            assert.equal("yes", (res:header("x-handler")))
            assert.equal(before, a:stats().requests)
        end)

        it("answers 204 without a body", function()
            local res = assert(get("/handler/empty"))
            assert.equal(204, res.status)
            assert.equal("", res.body)
        end)

        it("keeps the connection usable for the next request", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local r1 = assert(c:request { target = "/handler/respond" })
            assert.equal(201, r1.status)
            local r2 = assert(c:request { target = "/after-respond" })
            assert.equal("/after-respond", h.echo(r2).target)
            local r3 = assert(c:request { target = "/x", headers = { { "Host", "x" }, { "X-Respond-At", "global" } } })
            assert.equal(299, r3.status)
            assert.equal("/again", h.echo(c:request { target = "/again" }).target)
        end)
    end)

    describe("a handler route", function()
        it("forwards to the upstream it returns", function()
            local res = assert(get("/handler/proxy?q=1"))
            assert.equal("a", (res:header("x-origin")))
            assert.equal("/handler/proxy?q=1", h.echo(res).target)
        end)
    end)

    describe("a Lua error", function()
        -- Sends target (with extra headers), expects a 500 and one stderr
        -- line naming needle's file:line and the request id; then a normal
        -- request on the same worker succeeds.
        local n = 0
        local function fails(target, needle, headers, status)
            n = n + 1
            local id = "hook-error-" .. n
            local hs = { { "X-Request-ID", id } }
            for _, x in ipairs(headers or {}) do hs[#hs + 1] = x end
            local res = assert(get(target, hs))
            assert.equal(status or 500, res.status)
            local at = where(needle)
            local ok = pcall(h.eventually, function() return #h.lines_with(proxy:stderr(), at .. ":", id) == 1 end, 5)
            assert(ok, "expected one line with " .. at .. ": and " .. id .. " in the error log, got:\n"
                .. table.concat(h.lines_with(proxy:stderr(), id), "\n"))
            assert.equal("/after-error", h.echo(get("/after-error")).target)
            assert.is_true(proxy:alive())
        end

        it("in the global on_request answers 500 and logs file:line with the request id", function()
            fails("/x", 'error("boom in global on_request")', { { "X-Fail-At", "global_request" } })
        end)

        it("in a rewrite answers 500 and logs file:line", function()
            fails("/order/fail", 'error("boom in rewrite")')
        end)

        it("in a route's on_request answers 500 and logs file:line", function()
            fails("/fail/on_request", 'error("boom in route on_request")')
        end)

        it("in a handler answers 500 and logs file:line", function()
            fails("/handler/fail", 'error("boom in handler")')
        end)

        it("in the global on_response answers 500 and logs file:line", function()
            fails("/x", 'error("boom in global on_response")', { { "X-Fail-At", "global_response" } })
        end)

        it("in a route's on_response answers 500 and logs file:line", function()
            fails("/fail/on_response", 'error("boom in route on_response")')
        end)

        it("in on_log leaves the response alone and logs file:line", function()
            fails("/x", 'error("boom in on_log")', { { "X-Fail-At", "log" } }, 200)
        end)

        it("with a table as the error object answers 500", function()
            local res = assert(get("/fail/table"))
            assert.equal(500, res.status)
            assert.equal("/after-error", h.echo(get("/after-error")).target)
        end)

        it("answers 500 on a keep-alive connection that stays usable", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local r1 = assert(c:request { target = "/handler/fail" })
            assert.equal(500, r1.status)
            if r1:has_token("connection", "close") then return end -- closing after a 500 is allowed
            assert.equal("/next", h.echo(c:request { target = "/next" }).target)
        end)
    end)

    describe("a value a hook may not produce", function()
        -- Sends target with a request id; returns the response and the id.
        local n = 0
        local function send(target)
            n = n + 1
            local id = "bad-" .. n
            return assert(get(target, { { "X-Request-ID", id } })), id
        end

        for _, what in ipairs { "header-value", "header-name", "path", "query" } do
            it("(a CR LF in the request's " .. what .. ") answers 500 and forwards nothing", function()
                local before = a:stats().requests
                local res = send("/bad/" .. what)
                assert.equal(500, res.status)
                assert.same({}, res:header_all("injected"))
                assert.equal(before, a:stats().requests)
            end)
        end

        it("(a CR LF in a response header) answers 500 and the client never sees it", function()
            for _, target in ipairs { "/badres/header-value", "/bad/respond-header" } do
                local res = send(target)
                assert.equal(500, res.status, target)
                assert.same({}, res:header_all("injected"), target)
            end
        end)

        it("(a status out of range) answers 500", function()
            assert.equal(500, send("/bad/respond-status").status)
            assert.equal(500, send("/badres/status").status)
        end)

        it("(request framing headers) never reaches the origin with a body it does not describe", function()
            for _, target in ipairs { "/bad/content-length", "/bad/transfer-encoding" } do
                local before = a:stats()
                local res = assert(raw.request(proxy.port, { method = "POST", target = target, body = "abcdef" }))
                if res.status ~= 500 then
                    local e = h.echo(res)
                    assert.equal(6, e.body_len, target)
                    assert.same({ "6" }, h.echo_headers(e, "content-length"), target)
                end
                local after = a:stats()
                assert.truthy(after.requests - before.requests <= 1, target)
                assert.equal(after.requests - before.requests, after.completed - before.completed, target)
            end
            assert.equal("/after-framing", h.echo(get("/after-framing")).target)
        end)

        it("(a response Content-Length) leaves the keep-alive connection in sync", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local r1 = assert(c:request { target = "/badres/content-length" })
            if r1.status == 200 then assert.equal("/badres/content-length", h.echo(r1).target) end
            if r1:has_token("connection", "close") then return end
            assert.equal("/in-sync", h.echo(c:request { target = "/in-sync" }).target)
        end)

        it("is reported at the script's line when req:respond is misused", function()
            for _, case in ipairs {
                { "/bad/respond-status", 'req:respond(1000, "bad status")' },
                { "/bad/respond-header", 'req:respond(200, "x", { ["x-bad"]' },
            } do
                local _, id = send(case[1])
                local at = where(case[2]) .. ":"
                local lines
                h.eventually(function()
                    lines = h.lines_with(proxy:stderr(), id)
                    return #lines > 0
                end, 5)
                assert.equal(1, #h.lines_with(proxy:stderr(), id, at),
                    "expected " .. at .. " in the error line of " .. id .. ":\n" .. table.concat(lines, "\n"))
            end
        end)

        it("keeps control characters out of the error log line", function()
            local _, id = send("/bad/path")
            local at = where("/a HTTP/1.1") .. ":"
            h.eventually(function() return #h.lines_with(proxy:stderr(), id, at) == 1 end, 5)
            local line = h.lines_with(proxy:stderr(), id, at)[1]
            assert.falsy(line:find("[%c]"), "control character in: " .. line:gsub("%c", function(c)
                return string.format("\\x%02x", c:byte())
            end))
        end)
    end)

    describe("header lists, big and HEAD responses, pipelining", function()
        it("a list assigned to a request header sends one line per value", function()
            assert.same({ "1", "2" }, h.echo_headers(h.echo(get("/list")), "x-l"))
        end)

        it("req:respond sends a 1 MB body whole", function()
            local res = assert(get("/respond/big"))
            assert.equal(200, res.status)
            assert.equal(1000000, #res.body)
            assert.equal(("0123456789"):rep(100000), res.body)
        end)

        it("req:respond answers a HEAD without a body and the connection goes on", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local r1 = assert(c:request { method = "HEAD", target = "/respond/head" })
            assert.equal(200, r1.status)
            assert.equal("/after-head", h.echo(c:request { target = "/after-head" }).target)
        end)

        it("req:respond gives a HEAD the Content-Length of the body a GET gets", function()
            local res = assert(raw.request(proxy.port, { method = "HEAD", target = "/respond/head" }))
            assert.equal(200, res.status)
            local cl = res:header("content-length")
            assert.truthy(cl == nil or cl == "10", "HEAD Content-Length: " .. tostring(cl) .. " (GET body: 10 bytes)")
        end)

        it("answers pipelined requests in order when the middle one fails in a hook", function()
            local c = assert(raw.connect(proxy.port))
            finally(function() c:close() end)
            local list = assert(raw.pipeline(c, { { target = "/p1" }, { target = "/handler/fail" },
                                                  { target = "/handler/respond" }, { target = "/p4" } }))
            assert.equal("/p1", h.echo(list[1]).target)
            assert.equal(500, list[2].status)
            assert.equal(201, list[3].status)
            assert.equal("/p4", h.echo(list[4]).target)
        end)
    end)

    describe("on_log and the access log", function()
        local function entry(id)
            return h.eventually(function()
                for _, e in ipairs(proxy:access_log_entries()) do
                    if e.id == id then return e end
                end
            end, 5)
        end

        it("see the status a response hook set", function()
            assert.equal(203, assert(get("/res/logged", { { "X-Request-ID", "log-203" } })).status)
            assert.truthy(logged("log-203"):find("status=203", 1, true))
            assert.equal(203, entry("log-203").status)
        end)

        it("see the 500 of a request whose hook failed", function()
            assert.equal(500, assert(get("/handler/fail", { { "X-Request-ID", "log-500" } })).status)
            assert.truthy(logged("log-500"):find("status=500", 1, true))
            assert.equal(500, entry("log-500").status)
        end)

        it("see a response made by a hook, with no upstream", function()
            assert.equal(201, assert(get("/handler/respond", { { "X-Request-ID", "log-201" } })).status)
            assert.truthy(logged("log-201"):find("status=201", 1, true))
            local e = entry("log-201")
            assert.equal(201, e.status)
            assert.is_nil(e.upstream)
        end)
    end)

    describe("a request used after it finished", function()
        lazy_setup(function()
            assert.equal("/stash", h.echo(get("/stash")).target)
        end)

        for _, what in ipairs { "set_path", "set_query", "respond", "header", "status", "res_header" } do
            it("raises 'request finished' (" .. what .. ") and the worker keeps serving", function()
                local id = "stale-" .. what
                local res = assert(get("/stale?" .. what, { { "X-Request-ID", id } }))
                assert.equal(500, res.status, res.body)
                h.eventually(function() return #h.lines_with(proxy:stderr(), "request finished", id) == 1 end, 5)
                assert.is_true(proxy:alive())
                assert.equal("/after-stale", h.echo(get("/after-stale")).target)
            end)
        end
    end)

    describe("remote_addr from a trusted peer", function()
        local function remote(xffs)
            local hs = {}
            for _, v in ipairs(xffs) do hs[#hs + 1] = { "X-Forwarded-For", v } end
            local res = assert(get("/remote", hs))
            assert.equal(200, res.status)
            return res.body
        end

        it("is the peer without X-Forwarded-For", function()
            assert.equal("127.0.0.1", remote {})
        end)

        it("is the address in X-Forwarded-For", function()
            assert.equal("203.0.113.7", remote { "203.0.113.7" })
        end)

        it("is the rightmost address that is not a trusted proxy", function()
            assert.equal("203.0.113.9", remote { "198.51.100.1, 203.0.113.9, 10.0.0.5" })
            assert.equal("203.0.113.9", remote { "198.51.100.1, 203.0.113.9, 10.1.2.3, 127.0.0.1" })
        end)

        it("reads several X-Forwarded-For lines as one list", function()
            assert.equal("203.0.113.9", remote { "198.51.100.1", "203.0.113.9, 10.0.0.5" })
        end)

        it("survives a malformed X-Forwarded-For", function()
            local res = assert(get("/remote", { { "X-Forwarded-For", "not an address,,, ::::" } }))
            assert.equal(200, res.status)
        end)
    end)
end)

describe("hooks without a catch-all route, behind an untrusted peer", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, vars = { a = a.addr, dead = h.free_port() }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", trusted_proxies = { "10.0.0.0/8" } }
local logged = {}
proxy.on_request(function(req) req.ctx.seen = "on_request" end)
proxy.on_response(function(req, res) res.headers["x-seen"] = req.ctx.seen .. "," .. tostring(res.status) end)
proxy.on_log(function(req, res) logged[req.id] = tostring(res.status) end)
proxy.route { path = "/_logged", handler = function(req) return req:respond(200, logged[req.query] or "none") end }
proxy.route { path = "/remote", handler = function(req) return req:respond(200, req.remote_addr) end }
proxy.route { prefix = "/o/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
proxy.route { prefix = "/dead/", upstream = proxy.upstream "dead" { servers = { "127.0.0.1:${dead}" }, retries = 0 } }
]=] }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("gives the peer as remote_addr whatever X-Forwarded-For says", function()
        local res = assert(raw.get(proxy.port, "/remote", { { "X-Forwarded-For", "203.0.113.7" } }))
        assert.equal(200, res.status)
        assert.equal("127.0.0.1", res.body)
    end)

    for _, case in ipairs { { "/no-route", 404 }, { "/dead/x", 502 } } do
        it("runs the global hooks and on_log for a " .. case[2] .. " made by the proxy", function()
            local id = "proxy-made-" .. case[2]
            local res = assert(raw.get(proxy.port, case[1], { { "X-Request-ID", id } }))
            assert.equal(case[2], res.status)
            assert.equal("on_request," .. case[2], (res:header("x-seen")))
            h.eventually(function()
                local r = raw.get(proxy.port, "/_logged?" .. id)
                return r and r.body == tostring(case[2])
            end, 5)
        end)
    end
end)

describe("hooks refused at load time", function()
    lazy_teardown(function() h.cleanup() end)

    local HEAD = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:${port}" }
local a = proxy.upstream "a" { servers = { "127.0.0.1:9" } }
]=]

    -- -t on HEAD .. body: exit 1 and the output names the body's line (counted from 1 at HEAD's start).
    local function refused(body, needle)
        local text = HEAD .. body
        local path = h.write_config(text, { port = h.free_port() })
        local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
        assert.equal(1, rc, out)
        local at = basename(path) .. ":" .. h.line_of(text, needle) .. ":"
        assert.truthy(out:find(at, 1, true), "expected " .. at .. " in: " .. out)
        return out
    end

    it("names the line of a route with an unknown plugin", function()
        local out = refused('proxy.route { prefix = "/", upstream = a,\n  plugins = { { "no_such_plugin_xyz" } } }\n',
            "proxy.route")
        assert.truthy(out:find("no_such_plugin_xyz", 1, true), out)
    end)

    it("names the line of a route with a bad regex", function()
        refused('proxy.route { regex = "^/(unclosed", upstream = a }\n', "proxy.route")
    end)

    it("names the line of a bad CIDR in trusted_proxies", function()
        refused('proxy.settings { trusted_proxies = { "10.0.0.0/99" } }\n', "proxy.settings")
    end)

    it("names the line of a hook that is not a function", function()
        refused('proxy.on_request("not a function")\n', "proxy.on_request")
    end)

    it("names the line of a route whose rewrite is not a function", function()
        refused('proxy.route { prefix = "/", upstream = a, rewrite = "nope" }\n', "proxy.route")
    end)

    it("names the line of a route with neither upstream nor handler", function()
        refused('proxy.route { prefix = "/" }\n', "proxy.route")
    end)

    it("accepts a handler route without an upstream", function()
        local path = h.write_config(HEAD .. 'proxy.route { prefix = "/", handler = function(req) return a end }\n',
            { port = h.free_port() })
        local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
        assert.equal(0, rc, out)
    end)
end)
