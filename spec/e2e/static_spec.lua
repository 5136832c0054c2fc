-- End-to-end: static routes beyond what examples/static_site_spec.lua shows:
-- directory redirects, hooks on static routes (rewrites, req:respond, header
-- and status edits, a failing hook), HTTP/1.0, special files, and the
-- sending path: a slow reader, a client that stalls or leaves mid-file (the
-- file is closed: the proxy's descriptors come back to where they were).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local socket = require "socket"

local MiB = 1024 * 1024
local HUGE = 32 * MiB -- more than loopback socket buffers hold: sending must wait for the reader

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", client_body_timeout = 1 }
proxy.route { name = "docs", prefix = "/docs", static = { root = "${root}" } }
proxy.route { name = "strip", prefix = "/s/", strip_prefix = true, static = { root = "${root}" } }
proxy.route { name = "site", prefix = "/site", strip_prefix = true, static = { root = "${root}/guide" } }
proxy.route { name = "versioned", regex = [[^/v\d+/(.*)$]], static = { root = "${root}" },
  rewrite = function(req, m) req:set_path("/" .. m[1]) end }
proxy.route { name = "guarded", prefix = "/private/", static = { root = "${root}" },
  on_request = function(req)
    if req.headers["x-key"] ~= "k1" then return req:respond(401, "no key\n") end
  end }
proxy.route { name = "edited", prefix = "/edited/", static = { root = "${root}" },
  on_response = function(req, res)
    res.headers["etag"] = nil
    res.headers["content-type"] = "text/x-custom"
    res.headers["x-file-type"] = "static"
    if req.query == "gone" then res.status = 410 end
  end }
proxy.route { name = "broken", prefix = "/broken/", static = { root = "${root}" },
  on_response = function(req, res) error("boom") end }
proxy.route { name = "unavailable", prefix = "/unavailable/", static = { root = "${root}" },
  on_response = function(req, res) res.status = 503 end }
proxy.route { name = "all", prefix = "/", static = { root = "${root}" } }
]=]

local function fd_count(pid)
  local p = io.popen("ls /proc/" .. pid .. "/fd | wc -l")
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end

describe("static routes #slow", function()
  local proxy, tmp, root, base_fds

  lazy_setup(function()
    tmp = os.tmpname()
    os.remove(tmp)
    root = tmp .. "/root"
    local out, rc = h.run(string.format("mkdir -p %s/guide %s/empty && truncate -s %d %s/huge.bin && mkfifo %s/pipe",
      h.quote(root), h.quote(root), HUGE, h.quote(root), h.quote(root)))
    assert(rc == 0, out)
    h.write_file(root .. "/index.html", "<h1>root</h1>\n")
    h.write_file(root .. "/guide/index.html", "<h1>guide</h1>\n")
    h.write_file(root .. "/a.txt", "a\n")
    -- an absolute symlink that stays inside root is followed like a relative one
    out, rc = h.run("ln -s " .. h.quote(root .. "/a.txt") .. " " .. h.quote(root .. "/abs.txt"))
    assert(rc == 0, out)
    proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { root = root } }
    assert.equal(200, assert(raw.get(proxy.port, "/docs/a.txt")).status) -- the worker is warm
    base_fds = fd_count(proxy.pid)
  end)

  lazy_teardown(function()
    h.shutdown(proxy)
    if tmp then h.run("rm -rf " .. h.quote(tmp)) end
  end)

  local function get(target, headers, opts)
    return assert(raw.get(proxy.port, target, headers, opts or { timeout = 10 }))
  end

  local function log_entry(id)
    return h.eventually(function()
      for _, e in ipairs(proxy:access_log_entries()) do
        if e.id == id then return e end
      end
    end)
  end

  describe("directories", function()
    it("redirects a directory asked for without '/' (301, query kept), then serves its index", function()
      local res = get("/docs/guide?x=1")
      assert.equal(301, res.status)
      assert.equal("/docs/guide/?x=1", res:header("location"))
      assert.equal("<h1>guide</h1>\n", get("/docs/guide/").body)
    end)

    it("redirects the prefix itself (/docs to /docs/): the rest is root", function()
      assert.equal("/docs/", get("/docs"):header("location"))
      assert.equal("<h1>root</h1>\n", get("/docs/").body)
    end)

    it("never redirects to another host (//host/dir)", function()
      local res = get("//guide?x")
      assert.equal(301, res.status)
      assert.equal("/guide/?x", res:header("location"))
    end)

    it("redirects a stripped prefix that names root (/site to /site/), so relative links work", function()
      local res = get("/site?x=1")
      assert.equal(301, res.status)
      assert.equal("/site/?x=1", res:header("location"))
      assert.equal("<h1>guide</h1>\n", get("/site/").body)
    end)

    it("redirects to the normalised path, never echoing dot segments or escapes back", function()
      local res = get("/docs/x/../%67uide?x=1")
      assert.equal(301, res.status)
      assert.equal("/docs/guide/?x=1", res:header("location"))
      assert.equal("/site/", get("/site/../site"):header("location"))
    end)

    it("answers 404 for a directory without an index", function()
      assert.equal(404, get("/docs/empty/").status)
    end)
  end)

  describe("hooks", function()
    it("looks up the path as strip_prefix and a rewrite leave it", function()
      assert.equal("a\n", get("/s/a.txt").body)
      assert.equal("a\n", get("/v2/a.txt").body)
      assert.equal("<h1>guide</h1>\n", get("/v1/guide/index.html").body)
    end)

    it("lets a request hook answer instead of the file", function()
      local res = get("/private/a.txt")
      assert.equal(401, res.status)
      assert.equal("no key\n", res.body)
      assert.equal("a\n", get("/private/a.txt", { { "X-Key", "k1" } }).body)
    end)

    it("lets response hooks change the file's headers and status", function()
      local res = get("/edited/a.txt")
      assert.equal(200, res.status)
      assert.is_nil(res:header("etag"))
      assert.equal("text/x-custom", res:header("content-type"))
      assert.equal("static", res:header("x-file-type"))
      assert.is_string(res:header("last-modified"))
      assert.equal("a\n", res.body)
      assert.equal(410, get("/edited/a.txt?gone").status)
    end)

    it("keeps the head whole with the longest id, a long reason and Connection: close", function()
      local id = string.rep("a", 128)
      local res = get("/unavailable/a.txt", { { "X-Request-ID", id }, { "Connection", "close" } })
      assert.equal(503, res.status)
      assert.equal(id, res:header("x-request-id"))
      assert.equal("close", res:header("connection"))
      assert.equal("a\n", res.body)
    end)

    it("follows an absolute symlink that stays inside root", function()
      assert.equal("a\n", get("/docs/abs.txt").body)
    end)

    it("answers 500 when a response hook fails, and goes on serving", function()
      local res = get("/broken/a.txt")
      assert.equal(500, res.status)
      assert.equal("a\n", get("/docs/a.txt").body)
    end)
  end)

  describe("requests", function()
    it("answers an HTTP/1.0 client and closes", function()
      local c = assert(raw.connect(proxy.port))
      local res = assert(c:request { target = "/docs/a.txt", version = "HTTP/1.0" })
      assert.equal("a\n", res.body)
      assert.is_true(c:wait_closed(3))
      c:close()
    end)

    it("does not block on a FIFO in root (404)", function()
      assert.equal(404, get("/docs/pipe").status)
    end)

    it("serves a GET that carries a body, then closes (the body is not read)", function()
      local c = assert(raw.connect(proxy.port))
      local res = assert(c:request { target = "/docs/a.txt", body = "ignored" })
      assert.equal("a\n", res.body)
      assert.is_true(res:has_token("connection", "close"))
      c:close()
    end)
  end)

  describe("sending", function()
    it("sends a large file to a reader that pauses, then the next request", function()
      local c = assert(raw.connect(proxy.port, { timeout = 30 }))
      assert(c:send("GET /docs/huge.bin HTTP/1.1\r\nHost: x\r\n\r\n"))
      socket.sleep(0.3) -- the socket buffers fill: sendfile says EAGAIN, the proxy waits
      local got, zeros = 0, true
      local res = assert(c:read_response { timeout = 30, sink = function(piece)
        got = got + #piece
        if zeros and piece:find("[^%z]") then zeros = false end
      end })
      assert.equal(200, res.status)
      assert.equal(HUGE, got)
      assert.is_true(zeros)
      assert.equal("a\n", assert(c:request { target = "/docs/a.txt" }).body)
      c:close()
      local e = log_entry(res:header("x-request-id"))
      assert.equal(200, e.status)
      assert.equal(#res.raw_head + HUGE, e.bytes)
    end)

    it("closes the file when the client leaves mid-transfer", function()
      for _ = 1, 3 do
        local c = assert(raw.connect(proxy.port))
        assert(c:send("GET /docs/huge.bin HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert(c.sock:receive(100000))
        c:close()
      end
      h.eventually(function() return fd_count(proxy.pid) == base_fds end, 5)
    end)

    it("closes a client that stops reading after client_body_timeout", function()
      local c = assert(raw.connect(proxy.port, { timeout = 10 }))
      assert(c:send("GET /docs/huge.bin HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert(c.sock:receive(1000))
      socket.sleep(1.6) -- past client_body_timeout = 1 with the socket full
      local got = 0
      c.sock:settimeout(5)
      while true do
        local data, err, partial = c.sock:receive(MiB)
        got = got + #(data or partial or "")
        if not data then
          assert.equal("closed", err)
          break
        end
      end
      assert.is_true(got < HUGE)
      c:close()
      h.eventually(function() return fd_count(proxy.pid) == base_fds end, 5)
    end)
  end)
end)
