-- End-to-end: the bundled plugins (lua/moonproxy/plugins/*.lua) through the
-- real binary and an origin: headers, key_auth, basic_auth, ip_restriction,
-- cors, rate_limit (also shared by two workers), request_size; global plugins
-- (proxy.plugin) and their order against route plugins; a custom plugin from
-- settings.plugin_path; bad plugin options refused by -t with file:line.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local mime = require "mime"
local socket = require "socket"

-- One worker (a rate-limit bucket is shared anyway; one worker keeps each
-- plugin instance's per-VM caches simple). Each route carries one plugin.
local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", trusted_proxies = { "127.0.0.1/32" },
                 plugin_path = "${plugin_path}" }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }

proxy.route { prefix = "/hdr", upstream = a, plugins = { { "headers",
  request = { set = { ["x-env"] = "prod", ["x-list"] = { "l1", "l2" } }, append = { via = "moonproxy" },
              remove = { "cookie", "x-secret" } },
  response = { set = { ["x-set"] = "s", ["cache-control"] = "no-store" }, append = { ["x-app"] = "added" },
               remove = { "x-origin" } } } } }

proxy.route { prefix = "/ka", upstream = a, plugins = {
  { "key_auth", keys = { "k-123", ["k-456"] = "search" }, query = "apikey", realm = "api" } } }
proxy.route { prefix = "/kh", upstream = a, plugins = {
  { "key_auth", keys = { "k-123" }, header = "x-api-key", query = "key", hide_credentials = true } } }

proxy.route { prefix = "/ba", upstream = a, plugins = {
  { "basic_auth", users = { alice = "secret", bob = "hunter2" }, realm = "admin" } } }
proxy.route { prefix = "/bh", upstream = a, plugins = {
  { "basic_auth", users = { alice = "secret" }, hide_credentials = true } } }
proxy.route { prefix = "/kr", upstream = a, plugins = { { "key_auth", keys = { "k-123" } },
  { "headers", response = { set = { ["x-hdr"] = "route" } } } } }

proxy.route { prefix = "/ip-allow", upstream = a, plugins = { { "ip_restriction", allow = { "127.0.0.1" } } } }
proxy.route { prefix = "/ip-deny", upstream = a, plugins = { { "ip_restriction", deny = { "127.0.0.0/8" } } } }
proxy.route { prefix = "/ip-xff-allow", upstream = a, plugins = {
  { "ip_restriction", allow = { "203.0.113.0/24", "2001:db8::/32" } } } }
proxy.route { prefix = "/ip-xff-deny", upstream = a, plugins = { { "ip_restriction", deny = { "203.0.113.66" } } } }

proxy.route { prefix = "/cors-any", upstream = a, plugins = { { "cors", origins = "*" } } }
proxy.route { prefix = "/cors", upstream = a, plugins = { { "cors", origins = { "https://app.example" },
  methods = { "GET", "POST" }, headers = { "content-type", "x-token" }, expose_headers = { "x-request-id" },
  credentials = true, max_age = 600 } } }

proxy.route { prefix = "/rl-main", upstream = a, plugins = { { "rate_limit", rate = 2, burst = 3, scope = "main" } } }
proxy.route { prefix = "/rl-key", upstream = a, plugins = {
  { "rate_limit", rate = 2, burst = 3, key = "header:x-client", scope = "bykey" } } }

proxy.route { prefix = "/rs", upstream = a, plugins = { { "request_size", max = "1k" } } }

proxy.route { prefix = "/custom", upstream = a, plugins = { { "mp_test_stamp", stamp = "hello" } } }

proxy.route { prefix = "/", upstream = a }
]=]

-- A custom plugin (settings.plugin_path): checks its option, stamps the
-- request and the response, answers 418 itself for ?teapot.
local STAMP_PLUGIN = [=[
return {
  name = "mp_test_stamp",
  schema = function(conf)
    for k in pairs(conf) do
      if k ~= "stamp" then error("unknown option '" .. tostring(k) .. "'", 0) end
    end
    if type(conf.stamp) ~= "string" then error("stamp must be a string", 0) end
    return { stamp = conf.stamp, seen = "checked" }
  end,
  on_request = function(conf, req)
    if req.query == "boom" then
      error("boom in mp_test_stamp")
    end
    if req.query == "teapot" then
      return req:respond(418, "short and stout\n", { ["x-stamp"] = conf.stamp })
    end
    req.headers["x-stamp"] = conf.stamp .. "/" .. conf.seen
  end,
  on_response = function(conf, req, res)
    res.headers["x-stamped"] = conf.stamp
  end,
}
]=]

local function basename(path)
    return path:match("[^/]+$")
end

local function basic(user, pass)
    return "Basic " .. (mime.b64(user .. ":" .. pass))
end

describe("plugins end to end", function()
    local a, proxy, plugin_dir

    lazy_setup(function()
        a = h.start_origin("a")
        plugin_dir = h.tmpname(".plugins")
        assert(os.execute("mkdir -p " .. h.quote(plugin_dir)) == 0)
        h.write_file(plugin_dir .. "/mp_test_stamp.lua", STAMP_PLUGIN)
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr, plugin_path = plugin_dir } }
    end)

    lazy_teardown(function()
        if plugin_dir then os.execute("rm -rf " .. h.quote(plugin_dir)) end
        h.shutdown(proxy, a)
    end)

    local function get(target, headers)
        return raw.get(proxy.port, target, headers)
    end

    -- Runs fn and asserts the origin received no request meanwhile.
    local function origin_untouched(fn)
        local before = a:stats().requests
        local r = fn()
        assert.equal(before, a:stats().requests, "the origin was contacted")
        return r
    end

    describe("headers", function()
        it("sets, appends and removes request headers before forwarding", function()
            local e = h.echo(get("/hdr/x", {
                { "X-Env", "dev" }, { "Via", "1.1 client" }, { "Cookie", "sid=1" }, { "X-Secret", "s" },
                { "X-Kept", "k" },
            }))
            assert.equal("/hdr/x", e.target)
            assert.same({ "prod" }, h.echo_headers(e, "x-env"))
            assert.same({ "l1", "l2" }, h.echo_headers(e, "x-list"))
            assert.same({ "1.1 client", "moonproxy" }, h.echo_headers(e, "via"))
            assert.same({}, h.echo_headers(e, "cookie"))
            assert.same({}, h.echo_headers(e, "x-secret"))
            assert.equal("k", h.echo_header(e, "x-kept"))
        end)

        it("sets, appends and removes response headers before they reach the client", function()
            local res = assert(get("/hdr/r?resp_header=X-Set:orig&resp_header=X-App:orig"))
            assert.equal(200, res.status)
            assert.same({ "s" }, res:header_all("x-set"))
            assert.same({ "orig", "added" }, res:header_all("x-app"))
            assert.same({ "no-store" }, res:header_all("cache-control"))
            assert.same({}, res:header_all("x-origin"))
            assert.equal("/hdr/r?resp_header=X-Set:orig&resp_header=X-App:orig", h.echo(res).target)
        end)

        it("leaves other routes alone", function()
            local res = assert(get("/other", { { "Cookie", "sid=1" } }))
            assert.equal("a", res:header("x-origin"))
            assert.equal("sid=1", h.echo_header(h.echo(res), "cookie"))
        end)
    end)

    describe("key_auth", function()
        it("answers 401 with WWW-Authenticate without a key, and contacts no origin", function()
            local res = origin_untouched(function() return assert(get("/ka/x")) end)
            assert.equal(401, res.status)
            assert.equal('Key realm="api"', res:header("www-authenticate"))
        end)

        it("answers 401 to a wrong key (header or query), and contacts no origin", function()
            origin_untouched(function()
                local r1 = assert(get("/ka/x", { { "apikey", "k-999" } }))
                assert.equal(401, r1.status)
                assert.truthy(r1:header("www-authenticate"))
                local r2 = assert(get("/ka/x?apikey=k-999"))
                assert.equal(401, r2.status)
                local r3 = assert(get("/ka/x", { { "apikey", "" } }))
                assert.equal(401, r3.status)
            end)
        end)

        it("forwards a request with a listed or mapped key in the header", function()
            local e = h.echo(get("/ka/x", { { "apikey", "k-123" } }))
            assert.equal("/ka/x", e.target)
            assert.equal("k-123", h.echo_header(e, "apikey")) -- kept without hide_credentials
            h.echo(get("/ka/y", { { "ApiKey", "k-456" } }))
        end)

        it("forwards a request with the key in the query, which stays without hide_credentials", function()
            local e = h.echo(get("/ka/x?z=1&apikey=k-456"))
            assert.equal("/ka/x?z=1&apikey=k-456", e.target)
        end)

        it("decodes a percent-encoded key in the query", function()
            h.echo(get("/ka/x?apikey=k%2D123"))
        end)

        it("lets the route's other plugins change its 401 on the way out", function()
            local res = origin_untouched(function() return assert(get("/kr/x")) end)
            assert.equal(401, res.status)
            assert.equal("route", res:header("x-hdr"))
            assert.equal("route", assert(get("/kr/x", { { "apikey", "k-123" } })):header("x-hdr"))
        end)

        it("answers 401 to a key sent twice", function()
            local res = origin_untouched(function()
                return assert(get("/ka/x", { { "apikey", "k-123" }, { "apikey", "k-123" } }))
            end)
            assert.equal(401, res.status)
        end)

        it("with hide_credentials removes the header before forwarding", function()
            local e = h.echo(get("/kh/x?z=1", { { "X-Api-Key", "k-123" } }))
            assert.same({}, h.echo_headers(e, "x-api-key"))
            assert.equal("/kh/x?z=1", e.target)
        end)

        it("with hide_credentials removes the query parameter before forwarding", function()
            assert.equal("/kh/x?z=1&y=2", h.echo(get("/kh/x?z=1&key=k-123&y=2")).target)
            assert.equal("/kh/x", h.echo(get("/kh/x?key=k-123")).target)
        end)

        it("with header and query both sent and hide_credentials, removes both", function()
            local e = h.echo(get("/kh/x?key=k-123&z=1", { { "X-Api-Key", "k-123" } }))
            assert.same({}, h.echo_headers(e, "x-api-key"))
            assert.equal("/kh/x?z=1", e.target)
        end)

        it("with a custom header ignores the default apikey header", function()
            local res = origin_untouched(function() return assert(get("/kh/x", { { "apikey", "k-123" } })) end)
            assert.equal(401, res.status)
            assert.equal('Key realm="moonproxy"', res:header("www-authenticate"))
        end)
    end)

    describe("basic_auth", function()
        it("answers 401 with WWW-Authenticate: Basic realm when Authorization is missing", function()
            local res = origin_untouched(function() return assert(get("/ba/x")) end)
            assert.equal(401, res.status)
            assert.equal('Basic realm="admin"', res:header("www-authenticate"))
        end)

        it("answers 401 to a wrong password, an unknown user or a malformed header", function()
            origin_untouched(function()
                for _, auth in ipairs { basic("alice", "wrong"), basic("mallory", "secret"), basic("alice", ""),
                                        "Basic !!!", "Bearer abc", basic("bob", "secret") } do
                    local res = assert(get("/ba/x", { { "Authorization", auth } }))
                    assert.equal(401, res.status, auth)
                    assert.equal('Basic realm="admin"', res:header("www-authenticate"), auth)
                end
            end)
        end)

        it("forwards a request with the right credentials (any case of the scheme)", function()
            local e = h.echo(get("/ba/x", { { "Authorization", basic("alice", "secret") } }))
            assert.equal("/ba/x", e.target)
            assert.equal(basic("alice", "secret"), h.echo_header(e, "authorization"))
            local auth = basic("bob", "hunter2"):gsub("^Basic", "bASIC")
            h.echo(get("/ba/y", { { "Authorization", auth } }))
        end)
    end)

    describe("basic_auth with hide_credentials", function()
        it("removes Authorization before forwarding", function()
            local e = h.echo(get("/bh/x", { { "Authorization", basic("alice", "secret") } }))
            assert.same({}, h.echo_headers(e, "authorization"))
            local res = origin_untouched(function() return assert(get("/bh/x")) end)
            assert.equal(401, res.status)
            assert.equal('Basic realm="moonproxy"', res:header("www-authenticate"))
        end)
    end)

    describe("ip_restriction", function()
        it("lets an allowed client through", function()
            assert.equal("/ip-allow/x", h.echo(get("/ip-allow/x")).target)
        end)

        it("answers 403 to a denied client, and contacts no origin", function()
            local res = origin_untouched(function() return assert(get("/ip-deny/x")) end)
            assert.equal(403, res.status)
        end)

        it("uses the forwarded client behind a trusted proxy (allow)", function()
            h.echo(get("/ip-xff-allow/x", { { "X-Forwarded-For", "203.0.113.5" } }))
            origin_untouched(function()
                local r1 = assert(get("/ip-xff-allow/x", { { "X-Forwarded-For", "198.51.100.1" } }))
                assert.equal(403, r1.status)
                local r2 = assert(get("/ip-xff-allow/x")) -- 127.0.0.1 itself is not allowed here
                assert.equal(403, r2.status)
            end)
        end)

        it("uses the forwarded client behind a trusted proxy (deny)", function()
            local res = origin_untouched(function()
                return assert(get("/ip-xff-deny/x", { { "X-Forwarded-For", "198.51.100.1, 203.0.113.66" } }))
            end)
            assert.equal(403, res.status)
            h.echo(get("/ip-xff-deny/x", { { "X-Forwarded-For", "203.0.113.67" } }))
            h.echo(get("/ip-xff-deny/x"))
        end)

        it("matches IPv6 and IPv4-mapped forwarded clients", function()
            h.echo(get("/ip-xff-allow/x", { { "X-Forwarded-For", "2001:db8::5" } }))
            h.echo(get("/ip-xff-allow/x", { { "X-Forwarded-For", "::ffff:203.0.113.5" } }))
            local res = origin_untouched(function()
                return assert(get("/ip-xff-allow/x", { { "X-Forwarded-For", "2001:db9::1" } }))
            end)
            assert.equal(403, res.status)
        end)

        it("judges the forwarded client, not the trusted peer", function()
            -- the allow-127.0.0.1 route: a forwarded client other than 127.0.0.1 is denied
            local res = origin_untouched(function()
                return assert(get("/ip-allow/x", { { "X-Forwarded-For", "203.0.113.5" } }))
            end)
            assert.equal(403, res.status)
        end)
    end)

    describe("cors", function()
        local PREFLIGHT = {
            { "Origin", "https://app.example" },
            { "Access-Control-Request-Method", "POST" },
            { "Access-Control-Request-Headers", "content-type" },
        }

        it("answers a preflight 204 with Access-Control-Allow-*, without the origin", function()
            local res = origin_untouched(function()
                return assert(raw.request(proxy.port, { method = "OPTIONS", target = "/cors/x", headers = PREFLIGHT }))
            end)
            assert.equal(204, res.status)
            assert.same({ "https://app.example" }, res:header_all("access-control-allow-origin"))
            assert.equal("GET, POST", res:header("access-control-allow-methods"))
            assert.equal("content-type, x-token", res:header("access-control-allow-headers"))
            assert.equal("true", res:header("access-control-allow-credentials"))
            assert.equal("600", res:header("access-control-max-age"))
            assert.equal("", res.body)
        end)

        it("adds Access-Control-Allow-Origin (and the rest) to a simple GET from an allowed origin", function()
            local res = assert(get("/cors/x", { { "Origin", "https://app.example" } }))
            assert.equal("/cors/x", h.echo(res).target)
            assert.same({ "https://app.example" }, res:header_all("access-control-allow-origin"))
            assert.equal("true", res:header("access-control-allow-credentials"))
            assert.equal("x-request-id", res:header("access-control-expose-headers"))
            assert.truthy((res:header("vary") or ""):lower():find("origin", 1, true))
        end)

        it("adds no CORS header for a disallowed origin and forwards the request", function()
            local res = assert(get("/cors/x", { { "Origin", "https://evil.example" } }))
            assert.equal("/cors/x", h.echo(res).target)
            assert.is_nil(res:header("access-control-allow-origin"))
            assert.is_nil(res:header("access-control-allow-credentials"))
        end)

        it("forwards a preflight from a disallowed origin, without CORS headers", function()
            local res = assert(raw.request(proxy.port, { method = "OPTIONS", target = "/cors/x", headers = {
                { "Origin", "https://evil.example" }, { "Access-Control-Request-Method", "POST" } } }))
            assert.equal(200, res.status)
            assert.equal("OPTIONS", h.echo(res).method)
            assert.is_nil(res:header("access-control-allow-origin"))
        end)

        it("answers '*' with origins = \"*\"", function()
            local res = assert(get("/cors-any/x", { { "Origin", "https://whoever.example" } }))
            assert.equal(200, res.status)
            assert.equal("*", res:header("access-control-allow-origin"))
            local pre = origin_untouched(function()
                return assert(raw.request(proxy.port, { method = "OPTIONS", target = "/cors-any/x", headers = {
                    { "Origin", "https://whoever.example" }, { "Access-Control-Request-Method", "PUT" } } }))
            end)
            assert.equal(204, pre.status)
            assert.equal("*", pre:header("access-control-allow-origin"))
        end)
    end)

    describe("rate_limit", function()
        local function status_of(target, headers)
            local res = assert(get(target, headers))
            return res.status, res
        end

        it("passes burst requests, then 429 with Retry-After and RateLimit-*, then one more after a wait", function()
            local remaining = {}
            for i = 1, 3 do
                local st, res = status_of("/rl-main/x")
                assert.equal(200, st, "request " .. i)
                assert.equal("3", res:header("ratelimit-limit"))
                remaining[i] = res:header("ratelimit-remaining")
                assert.truthy(tonumber(res:header("ratelimit-reset")))
            end
            assert.same({ "2", "1", "0" }, remaining)
            local res = origin_untouched(function() return assert(get("/rl-main/x")) end)
            local t429 = socket.gettime()
            assert.equal(429, res.status)
            local retry = tonumber(res:header("retry-after"))
            assert(retry and retry >= 1 and retry == math.floor(retry), "Retry-After: " .. tostring(res:header("retry-after")))
            assert.equal("3", res:header("ratelimit-limit"))
            assert.equal("0", res:header("ratelimit-remaining"))
            assert(tonumber(res:header("ratelimit-reset")) >= 1, "RateLimit-Reset: " .. tostring(res:header("ratelimit-reset")))
            -- one token comes back every 0.5 s
            h.eventually(function() return status_of("/rl-main/x") == 200 end, 3, 0.1)
            assert(socket.gettime() - t429 >= 0.25, "passed again too soon")
            assert.equal(429, (status_of("/rl-main/x")))
        end)

        it("keeps one bucket per key with key = header:NAME", function()
            for i = 1, 3 do
                assert.equal(200, (status_of("/rl-key/x", { { "X-Client", "alpha" } })), "alpha " .. i)
            end
            assert.equal(429, (status_of("/rl-key/x", { { "X-Client", "alpha" } })))
            for i = 1, 3 do
                assert.equal(200, (status_of("/rl-key/x", { { "X-Client", "beta" } })), "beta " .. i)
            end
            assert.equal(429, (status_of("/rl-key/x", { { "X-Client", "beta" } })))
        end)

        it("lets a request without the key through, uncounted", function()
            for i = 1, 6 do
                assert.equal(200, (status_of("/rl-key/x")), "request " .. i)
            end
        end)
    end)

    describe("request_size", function()
        it("answers 413 to a Content-Length over max, without contacting the origin", function()
            local res = origin_untouched(function()
                return assert(raw.request(proxy.port, { method = "POST", target = "/rs/x", body = ("b"):rep(2000) }))
            end)
            assert.equal(413, res.status)
        end)

        it("answers 413 before any 100 Continue", function()
            local res = origin_untouched(function()
                local c = assert(raw.connect(proxy.port))
                finally(function() c:close() end)
                assert(c:send(raw.build { method = "POST", target = "/rs/x", headers = {
                    { "Host", "x" }, { "Content-Length", "5000" }, { "Expect", "100-continue" } } }))
                return assert(c:read_response { interim = true })
            end)
            assert.equal(413, res.status)
        end)

        it("lets a chunked body through (its size is unknown up front)", function()
            local e = h.echo(raw.request(proxy.port, { method = "POST", target = "/rs/x",
                headers = { { "Host", "x" }, { "Transfer-Encoding", "chunked" } },
                body = "7d0\r\n" .. ("c"):rep(2000) .. "\r\n0\r\n\r\n" }))
            assert.equal(2000, e.body_len)
        end)

        it("forwards a body up to max", function()
            local e = h.echo(raw.request(proxy.port, { method = "POST", target = "/rs/x", body = ("b"):rep(1024) }))
            assert.equal(1024, e.body_len)
        end)
    end)

    describe("a custom plugin from settings.plugin_path", function()
        it("runs on the request and the response with its checked options", function()
            local res = assert(get("/custom/x"))
            assert.equal("hello/checked", h.echo_header(h.echo(res), "x-stamp"))
            assert.equal("hello", res:header("x-stamped"))
        end)

        it("answers 500 to an error it raises, logged with the plugin's file:line", function()
            local res = assert(get("/custom/x?boom", { { "X-Request-ID", "stamp-boom-1" } }))
            assert.equal(500, res.status)
            local at = "mp_test_stamp.lua:" .. h.line_of(STAMP_PLUGIN, 'error("boom in mp_test_stamp")') .. ":"
            h.eventually(function() return #h.lines_with(proxy:stderr(), at, "stamp-boom-1") == 1 end, 5)
            assert.equal("hello", assert(get("/custom/y")):header("x-stamped"))
        end)

        it("can answer itself", function()
            local res = origin_untouched(function() return assert(get("/custom/x?teapot")) end)
            assert.equal(418, res.status)
            assert.equal("short and stout\n", res.body)
            assert.equal("hello", res:header("x-stamp"))
        end)
    end)
end)

describe("global plugins", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, vars = { a = a.addr, down = "127.0.0.1:" .. h.free_port() }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", trusted_proxies = { "127.0.0.1/32" } }
local a = proxy.upstream "a" { servers = { "${a}" } }
proxy.plugin { "headers", request = { set = { ["x-order"] = "global" } },
                          response = { set = { ["x-res-order"] = "global" } } }
proxy.plugin { "ip_restriction", deny = { "203.0.113.66" } }
proxy.route { prefix = "/one", upstream = a }
proxy.route { prefix = "/down", upstream = proxy.upstream "down" { servers = { "${down}" }, retries = 0 } }
proxy.route { prefix = "/two", upstream = a, plugins = { { "headers",
  request = { append = { ["x-order"] = "route" } }, response = { append = { ["x-res-order"] = "route" } } } } }
proxy.route { path = "/handled", handler = function(req)
  return req:respond(200, tostring(req.headers["x-order"]))
end }
]=] }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("apply to every route", function()
        local r1 = assert(raw.get(proxy.port, "/one/x", { { "X-Order", "client" } }))
        assert.same({ "global" }, h.echo_headers(h.echo(r1), "x-order"))
        assert.same({ "global" }, r1:header_all("x-res-order"))
        local r3 = assert(raw.get(proxy.port, "/handled"))
        assert.equal(200, r3.status)
        assert.equal("global", r3.body)
        assert.same({ "global" }, r3:header_all("x-res-order"))
    end)

    it("run before the route's plugins, on the request and on the response", function()
        local res = assert(raw.get(proxy.port, "/two/x"))
        assert.same({ "global", "route" }, h.echo_headers(h.echo(res), "x-order"))
        assert.same({ "global", "route" }, res:header_all("x-res-order"))
    end)

    it("can refuse a request on every route, even one no route matches", function()
        local before = a:stats().requests
        for _, target in ipairs { "/one/x", "/two/x", "/handled", "/no-route-here" } do
            local res = assert(raw.get(proxy.port, target, { { "X-Forwarded-For", "203.0.113.66" } }))
            assert.equal(403, res.status, target)
        end
        assert.equal(before, a:stats().requests)
        assert.equal(404, assert(raw.get(proxy.port, "/no-route-here")).status)
    end)

    it("change a response a global plugin made", function()
        local res = assert(raw.get(proxy.port, "/one/x", { { "X-Forwarded-For", "203.0.113.66" } }))
        assert.equal(403, res.status)
        assert.same({ "global" }, res:header_all("x-res-order"))
    end)

    it("change the 404 of a request no route matched", function()
        local res = assert(raw.get(proxy.port, "/no-route-here"))
        assert.equal(404, res.status)
        assert.same({ "global" }, res:header_all("x-res-order"))
    end)

    it("change the 502 the proxy makes when the upstream is down", function()
        local res = assert(raw.get(proxy.port, "/down/x"))
        assert.equal(502, res.status)
        assert.same({ "global" }, res:header_all("x-res-order"))
    end)
end)

describe("rate_limit shared by two workers", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        -- x-vm: which VM answered (a number drawn from a shared counter at load)
        proxy = h.start_proxy { workers = 2, vars = { a = a.addr }, config = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local vm = tostring(proxy.shared("mp_test_vm", "64k"):incr("id", 1, 0))
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 32 }
proxy.on_response(function(req, res) res.headers["x-vm"] = vm end)
proxy.route { prefix = "/", upstream = a, plugins = { { "rate_limit", rate = 0.1, burst = 3 } } }
]=] }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("passes only burst requests of a burst spread over many connections", function()
        local conns = {}
        for i = 1, 24 do conns[i] = { { target = "/burst/" .. i } } end
        local out = h.fan_out(proxy.port, conns)
        local passed, limited, vms, nvm = 0, 0, {}, 0
        for _, list in ipairs(out) do
            local res = list[1]
            if res.status == 200 then
                passed = passed + 1
            elseif res.status == 429 then
                limited = limited + 1
            else
                error("unexpected status " .. res.status .. ": " .. tostring(res.body))
            end
            local vm = res:header("x-vm")
            if vm and not vms[vm] then
                vms[vm] = true
                nvm = nvm + 1
            end
        end
        assert(nvm >= 2, "the connections all went to one worker; cannot show sharing")
        assert.equal(3, passed)
        assert.equal(21, limited)
    end)

    it("keeps its buckets across a reload", function()
        -- the burst above emptied the bucket of 127.0.0.1 (one token per 10 s)
        assert.equal(429, assert(raw.get(proxy.port, "/after")).status)
        local res, err = proxy:admin("POST", "/reload")
        assert(res, "POST /reload: " .. tostring(err))
        assert.equal(200, res.status, res.body)
        for i = 1, 6 do
            assert.equal(429, assert(raw.get(proxy.port, "/after-reload/" .. i)).status, "request " .. i)
        end
    end)
end)

describe("plugins refused at load time", function()
    local dir

    lazy_setup(function()
        dir = h.tmpname(".plugins")
        assert(os.execute("mkdir -p " .. h.quote(dir)) == 0)
        h.write_file(dir .. "/mp_test_stamp.lua", STAMP_PLUGIN)
        h.write_file(dir .. "/mp_test_notplugin.lua", "return { name = 'x' }\n")
        h.write_file(dir .. "/mp_test_broken.lua", "return {\n  on_request = function(conf, req) end\n") -- unclosed
    end)

    lazy_teardown(function()
        if dir then os.execute("rm -rf " .. h.quote(dir)) end
        h.cleanup()
    end)

    local HEAD = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:${port}" }
proxy.settings { plugin_path = "${plugin_path}" }
local a = proxy.upstream "a" { servers = { "127.0.0.1:9" } }
]=]

    local function check(body, plugin_path)
        local text = HEAD .. body
        local path = h.write_config(text, { port = h.free_port(), plugin_path = plugin_path or dir })
        local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
        return out, rc, text, path
    end

    -- -t on HEAD .. body: exit 1, and the output names the line holding
    -- needle and contains every one of the words.
    local function refused(body, needle, ...)
        local out, rc, text, path = check(body)
        assert.equal(1, rc, out)
        local at = basename(path) .. ":" .. h.line_of(text, needle) .. ":"
        assert.truthy(out:find(at, 1, true), "expected " .. at .. " in: " .. out)
        for i = 1, select("#", ...) do
            local w = select(i, ...)
            assert.truthy(out:find(w, 1, true), "expected '" .. w .. "' in: " .. out)
        end
        return out
    end

    it("refuses rate_limit with an unknown option, naming it", function()
        refused('proxy.route { prefix = "/", upstream = a,\n  plugins = { { "rate_limit", rate = 2, brust = 3 } } }\n',
            "proxy.route", "rate_limit", "brust", "burst")
    end)

    it("refuses a bad option value", function()
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "rate_limit", rate = -1 } } }\n',
            "proxy.route", "rate_limit", "rate")
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "ip_restriction", allow = { "10.0.0.0/99" } } } }\n',
            "proxy.route", "ip_restriction")
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "key_auth" } } }\n', "proxy.route", "keys")
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "request_size", max = "lots" } } }\n',
            "proxy.route", "request_size")
    end)

    it("refuses a global plugin with a bad option at its proxy.plugin line", function()
        refused('proxy.route { prefix = "/", upstream = a }\nproxy.plugin { "cors", origins = { "not an origin" } }\n',
            "proxy.plugin", "cors")
    end)

    it("refuses an unknown plugin name", function()
        refused('proxy.route { prefix = "/", upstream = a }\nproxy.plugin { "no_such_plugin_xyz" }\n',
            "proxy.plugin", "no_such_plugin_xyz")
        refused('proxy.route { prefix = "/", upstream = a,\n  plugins = { { "no_such_plugin_abc" } } }\n',
            "proxy.route", "no_such_plugin_abc")
    end)

    it("refuses a custom plugin's bad option with its own message", function()
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "mp_test_stamp", stamp = 42 } } }\n',
            "proxy.route", "mp_test_stamp", "stamp must be a string")
    end)

    it("refuses a module that is not a plugin, or does not compile", function()
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "mp_test_notplugin" } } }\n',
            "proxy.route", "mp_test_notplugin")
        refused('proxy.route { prefix = "/", upstream = a, plugins = { { "mp_test_broken" } } }\n',
            "proxy.route", "mp_test_broken")
    end)

    it("accepts good plugins, and a plugin_path relative to the configuration's folder", function()
        local body = 'proxy.plugin { "cors", origins = "*" }\n'
            .. 'proxy.route { prefix = "/", upstream = a, plugins = { { "rate_limit", rate = 2, burst = 3 },\n'
            .. '  { "mp_test_stamp", stamp = "x" } } }\n'
        local out, rc = check(body)
        assert.equal(0, rc, out)
        out, rc = check(body, basename(dir)) -- the config is written next to dir (both temp files)
        assert.equal(0, rc, out)
    end)
end)
