-- End-to-end: request paths and names as SPEC "Behaviour on the wire" says
-- (issue 9, defects 2 and 10, and OPTIONS *): paths are normalised before
-- routing, hooks and forwarding, so no spelling of a protected path gets
-- past its route; what cannot be normalised safely is refused with 400;
-- header names with '_' are dropped; OPTIONS * is routed as "/" and
-- forwarded as "*".
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", trusted_proxies = { "127.0.0.1/32" } ${extra} }
local echo = proxy.upstream "echo" { servers = { "${echo}" } }
local inner = proxy.upstream "inner" { servers = { "${inner}" } }
proxy.route { name = "deny", prefix = "/admin", handler = function(req) return req:respond(403, "denied\n") end }
proxy.route { name = "keyed", prefix = "/keyed", upstream = echo, plugins = { { "key_auth", keys = { "k-1" } } } }
proxy.route { name = "local", prefix = "/local", upstream = echo,
  plugins = { { "ip_restriction", deny = { "127.0.0.0/8" } } } }
proxy.route { name = "inner", prefix = "/inner", upstream = inner }
proxy.route { name = "role", prefix = "/role", headers = { x_role = "admin" },
  handler = function(req) return req:respond(200, "role route\n") end }
proxy.route { name = "files", host = "files.example.com", prefix = "/", static = { root = "${root}" } }
proxy.route { name = "hooked", prefix = "/hooked", upstream = echo, on_request = function(req)
  req.headers["x-seen-path"] = req.path
  req.headers["x-seen-addr"] = req.remote_addr
  req.headers["x-seen-underscore"] = tostring(req.headers["x_forwarded_for"])
end }
proxy.route { name = "all", prefix = "/", upstream = echo }
]=]

-- The protected routes: what a request that reached each one gets.
local PROTECTED = {
  { prefix = "admin", reached = function(res) return res.status == 403 end },
  { prefix = "keyed", reached = function(res) return res.status == 401 end },
  { prefix = "local", reached = function(res) return res.status == 403 end },
  { prefix = "inner", reached = function(res) return res.status == 200 and res:header("x-origin") == "inner" end },
}

-- Spellings of /P that a backend would serve as /P (nginx behind the proxy
-- does for each): every one must reach P's route, or be refused.
local SPELLINGS = {
  "/x/../P", "//P", "/%ENC", "/./P", "/x/%2e%2e/P", "/x/..%2fP", "/P/", "/%2e/P", "/P%2f", "/a/b/../../P",
  "/P/./x", "/x/.%2e/P", "/x/%2E%2E/P", "/X/../P", "//x/../P", "/x//../P", "///P//x", "/x/..%2FP",
  "/x/..%5cP", "/x/..\\P", "/%2e%2e/P", "/x/../%ENC", "/P;x/../P", "/P/..%2f..%2fP", "/x/%252e%252e/../../P",
  -- servlet containers drop ";params" from each segment before removing dot segments
  "/x/..;/P", "/x/..;x=1/P", "/x/.;/../P", "/x/%2e%2e;/P", "/x/.%2E;a/P", "/x/y/..;/..;/P",
}

local function spelled(s, prefix)
  local enc = string.format("%%%02x", prefix:byte(1)) .. prefix:sub(2)
  return (s:gsub("%%ENC", (enc:gsub("%%", "%%%%"))):gsub("P", prefix))
end

local function start(origins, extra)
  local root = h.tmpname(".d")
  os.execute("mkdir -p " .. h.quote(root))
  return h.start_proxy { workers = 1, config = CONFIG,
    vars = { echo = origins.echo.addr, inner = origins.inner.addr, root = root, extra = extra or "" } }
end

local function get(proxy, target, headers)
  local res, err = raw.request(proxy.port, { target = target, headers = headers }, { timeout = 10 })
  assert(res, tostring(target) .. ": " .. tostring(err))
  return res
end

-- The target the echo origin received for a request (raises when the
-- request did not reach the echo origin).
local function echoed(proxy, target, headers)
  local res = get(proxy, target, headers)
  assert(res:header("x-origin") == "echo", target .. " did not reach the echo origin: " .. res.status)
  return h.echo(res).target, h.echo(res)
end

describe("paths and names #slow", function()
  local origins = {}

  lazy_setup(function()
    origins.echo = h.start_origin("echo")
    origins.inner = h.start_origin("inner")
  end)

  lazy_teardown(function()
    h.shutdown(nil, origins.echo, origins.inner)
  end)

  describe("with the default settings", function()
    local proxy

    lazy_setup(function()
      proxy = start(origins)
    end)

    lazy_teardown(function()
      h.shutdown(proxy)
    end)

    it("lets no spelling of a protected path past its route", function()
      local before = origins.echo:stats().requests
      local leaks = {}
      for _, p in ipairs(PROTECTED) do
        for _, s in ipairs(SPELLINGS) do
          local target = spelled(s, p.prefix)
          local res = get(proxy, target)
          if not (p.reached(res) or res.status == 400) then
            leaks[#leaks + 1] = string.format("%s -> %d from %s", target, res.status, tostring(res:header("x-origin")))
          end
        end
      end
      assert(#leaks == 0, "bypassed:\n" .. table.concat(leaks, "\n"))
      assert.equal(before, origins.echo:stats().requests)
    end)

    it("forwards the normalised path with the query untouched", function()
      local cases = {
        { "/a/./b//c?x=/../y", "/a/b/c?x=/../y" },
        { "/%61%62c/%7euser", "/abc/~user" },
        { "/caf%c3%a9?q=%c3%a9", "/caf%C3%A9?q=%c3%a9" },
        { "/a/b/..", "/a/" },
        { "/a/b/../c/.", "/a/c/" },
        { "/x?", "/x?" },
        { "/x?a=1&b=%2F..%2F", "/x?a=1&b=%2F..%2F" },
        { "http://localhost/a/../b?q=1", "/b?q=1" },
      }
      for _, c in ipairs(cases) do
        assert.equal(c[2], (echoed(proxy, c[1])))
      end
    end)

    it("gives hooks the normalised path", function()
      local _, e = echoed(proxy, "/x/../hooked/./a//%62")
      assert.equal("/hooked/a/b", h.echo_header(e, "x-seen-path"))
      assert.equal("/hooked/a/b", e.target)
    end)

    it("refuses a path that climbs above /, and \\, #, %00 or a bad escape in the target", function()
      local before = origins.echo:stats().requests
      for _, t in ipairs { "/../x", "/a/../../x", "/%2e%2e/x", "/a\\b", "/a#b", "/a%00b", "/a%zz", "/a%2",
        "/a%2fb", "/x?a#b", "/x?a\\b" } do
        local res = get(proxy, t)
        assert(res.status == 400, t .. " got " .. res.status)
      end
      assert.equal(before, origins.echo:stats().requests)
    end)

    it("logs the path as the client sent it", function()
      get(proxy, "/x/../admin/log-check")
      local entry = h.eventually(function()
        for _, e in ipairs(proxy:access_log_entries()) do
          if e.path == "/x/../admin/log-check" then return e end
        end
      end, 5)
      assert.same({ "deny", 403 }, { entry.route, entry.status })
    end)

    it("drops header names with '_', for the origin, hooks and route filters alike", function()
      local _, e = echoed(proxy, "/hooked", { { "X_Forwarded_For", "6.6.6.6" }, { "X_Role", "admin" },
        { "X-Kept", "1" } })
      for _, hd in ipairs(e.headers) do
        assert(not hd[1]:find("_", 1, true), "forwarded: " .. hd[1] .. ": " .. hd[2])
      end
      assert.equal("1", h.echo_header(e, "x-kept"))
      assert.equal("127.0.0.1", h.echo_header(e, "x-forwarded-for"))
      assert.equal("127.0.0.1", h.echo_header(e, "x-seen-addr"))
      assert.equal("nil", h.echo_header(e, "x-seen-underscore"))
      -- the route filtering on x_role never sees it: the catch-all serves /role
      local t = echoed(proxy, "/role", { { "X_Role", "admin" } })
      assert.equal("/role", t)
    end)

    it("forwards OPTIONS * as OPTIONS * to the route of /", function()
      local res = raw.request(proxy.port, { method = "OPTIONS", target = "*" }, { timeout = 10 })
      local e = h.echo(res)
      assert.same({ "OPTIONS", "*", "echo" }, { e.method, e.target, res:header("x-origin") })
    end)

    it("answers OPTIONS * itself for a static route, and refuses * with another method", function()
      local res = raw.request(proxy.port, { method = "OPTIONS", target = "*", headers = { Host = "files.example.com" } },
        { timeout = 10 })
      assert.same({ 200, "GET, HEAD", "0", "" }, { res.status, res:header("allow"), res:header("content-length"), res.body })
      assert.equal(400, raw.request(proxy.port, { method = "GET", target = "*" }, { timeout = 10 }).status)
    end)
  end)

  describe("with escaped_slashes = \"keep\"", function()
    local proxy

    lazy_setup(function()
      proxy = start(origins, ', escaped_slashes = "keep"')
    end)

    lazy_teardown(function()
      h.shutdown(proxy)
    end)

    it("passes encoded slashes on encoded, never as separators", function()
      assert.equal("/ids/a%2Fb", (echoed(proxy, "/ids/a%2fb")))
      assert.equal("/x/..%2Fadmin", (echoed(proxy, "/x/..%2fadmin")))
      assert.equal("/a%5Cb", (echoed(proxy, "/a%5cb")))
      assert.equal(403, get(proxy, "/x/../admin").status)
    end)
  end)

  describe("with escaped_slashes = \"decode\"", function()
    local proxy

    lazy_setup(function()
      proxy = start(origins, ', escaped_slashes = "decode"')
    end)

    lazy_teardown(function()
      h.shutdown(proxy)
    end)

    it("decodes encoded slashes, then normalises", function()
      assert.equal("/a/b", (echoed(proxy, "/a%2fb")))
      assert.equal("/a/b", (echoed(proxy, "/a%5Cb")))
      assert.equal(403, get(proxy, "/x/..%2fadmin").status)
      assert.equal(400, get(proxy, "/%2e%2e%2fx").status)
    end)
  end)

  describe("with merge_slashes = false", function()
    local proxy

    lazy_setup(function()
      proxy = start(origins, ", merge_slashes = false")
    end)

    lazy_teardown(function()
      h.shutdown(proxy)
    end)

    it("keeps repeated slashes, and still removes dot segments", function()
      assert.equal("//admin", (echoed(proxy, "//admin")))
      assert.equal("/a//c", (echoed(proxy, "/a//b/../c")))
      assert.equal(403, get(proxy, "/x/../admin").status)
    end)
  end)

  describe("with underscores_in_headers = true", function()
    local proxy

    lazy_setup(function()
      proxy = start(origins, ", underscores_in_headers = true")
    end)

    lazy_teardown(function()
      h.shutdown(proxy)
    end)

    it("forwards header names with '_', and still believes only X-Forwarded-For", function()
      local _, e = echoed(proxy, "/hooked", { { "X_Forwarded_For", "6.6.6.6" } })
      assert.equal("6.6.6.6", h.echo_header(e, "x_forwarded_for"))
      assert.equal("6.6.6.6", h.echo_header(e, "x-seen-underscore"))
      assert.equal("127.0.0.1", h.echo_header(e, "x-forwarded-for"))
      assert.equal("127.0.0.1", h.echo_header(e, "x-seen-addr"))
    end)
  end)
end)
