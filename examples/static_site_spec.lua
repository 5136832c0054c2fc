-- examples/static_site.lua, run for real: the example's own text with its
-- addresses swapped for free loopback ports, an origin behind /api/, and its
-- root swapped for a temp copy of examples/static_site/public to which the
-- spec adds what is not committed: a ~1 MB file, and a symlink pointing out
-- of root at a "secret" file.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local EXAMPLE = "examples/static_site.lua"
local PUBLIC = "examples/static_site/public"
local BIG_SIZE = 1024 * 1024 + 123
local SECRET = "top secret: never served\n"

-- BIG_SIZE bytes of every byte value, so that a lost or shifted block shows.
local function big_body()
  local block = {}
  for i = 0, 255 do block[#block + 1] = string.char((i * 7 + 3) % 256) end
  local s = string.rep(table.concat(block), math.ceil(BIG_SIZE / 256))
  return s:sub(1, BIG_SIZE)
end

describe("examples/static_site.lua", function()
  local origin, proxy, tmp, root

  lazy_setup(function()
    tmp = os.tmpname()
    os.remove(tmp)
    local out, rc = h.run("mkdir " .. h.quote(tmp) .. " && cp -r " .. PUBLIC .. " " .. h.quote(tmp .. "/public"))
    assert(rc == 0, out)
    root = tmp .. "/public"
    h.write_file(tmp .. "/secret.txt", SECRET)
    h.write_file(root .. "/big.bin", big_body())
    out, rc = h.run("ln -s " .. h.quote(tmp .. "/secret.txt") .. " " .. h.quote(root .. "/leak.txt"))
    assert(rc == 0, out)
    origin = h.start_origin("backend")
    local text = h.example_text(EXAMPLE, {
      { "127.0.0.1:8080", "${listen}" },
      { "127.0.0.1:9001", "${origin}" },
      { 'access_log = "stdout"', 'access_log = "${access_log}"' },
      { '"./static_site/public"', '"${root}"' },
    })
    proxy = h.start_proxy { workers = 2, config = text, vars = { origin = origin.addr, root = root } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
    if tmp then h.run("rm -rf " .. h.quote(tmp)) end
  end)

  local function get(target, headers)
    return assert(raw.get(proxy.port, target, headers, { timeout = 10 }))
  end

  local function file(name)
    return assert(h.read_file(PUBLIC .. name))
  end

  it("passes moonproxy -t (its root found next to the script)", function()
    local cfg = h.check_example(EXAMPLE)
    assert.equal(3, #cfg.routes)
  end)

  describe("files", function()
    it("serves / as index.html, with the headers of a file", function()
      local res = get("/")
      assert.equal(200, res.status)
      assert.equal(file("/index.html"), res.body)
      assert.equal("text/html; charset=utf-8", res:header("content-type"))
      assert.equal(tostring(#res.body), res:header("content-length"))
      assert.matches('^"%x+%-%x+"$', res:header("etag"))
      assert.matches("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$", res:header("last-modified"))
      assert.matches("^%x+$", res:header("x-request-id"))
      assert.is_string(res:header("date"))
      assert.equal("bytes", res:header("accept-ranges")) -- ranges: spec/e2e/static_range_spec.lua
    end)

    it("gives each file the content type of its extension", function()
      for path, ctype in pairs {
        ["/style.css"] = "text/css; charset=utf-8",
        ["/app.js"] = "text/javascript; charset=utf-8",
        ["/assets/logo.svg"] = "image/svg+xml",
        ["/big.bin"] = "application/octet-stream",
      } do
        local res = get(path)
        assert.equal(200, res.status, path)
        assert.equal(ctype, res:header("content-type"), path)
      end
    end)

    it("runs the response hooks on files (global and the route's)", function()
      local page, logo = get("/"), get("/assets/logo.svg")
      assert.equal("no-cache", page:header("cache-control"))
      assert.equal("public, max-age=604800", logo:header("cache-control"))
      assert.equal("nosniff", logo:header("x-content-type-options"))
      assert.equal(file("/assets/logo.svg"), logo.body)
    end)

    it("answers 404 for a missing file on the route without a fallback", function()
      local res = get("/missing.css")
      assert.equal(404, res.status)
      assert.equal("nosniff", res:header("x-content-type-options"))
    end)
  end)

  describe("the app's fallback", function()
    it("serves index.html for any /app/ URL that is not a file", function()
      for _, path in ipairs { "/app/", "/app/settings", "/app/settings/42?tab=2" } do
        local res = get(path)
        assert.equal(200, res.status, path)
        assert.equal(file("/index.html"), res.body, path)
        assert.equal("no-cache", res:header("cache-control"))
      end
    end)

    it("removes the prefix: /app/style.css is the file under root", function()
      assert.equal(file("/style.css"), get("/app/style.css").body)
    end)
  end)

  describe("conditional requests and methods", function()
    it("answers 304 to If-None-Match with the file's ETag, without a body", function()
      local first = get("/style.css")
      local etag = first:header("etag")
      local res = get("/style.css", { { "If-None-Match", etag } })
      assert.equal(304, res.status)
      assert.equal("", res.body)
      assert.equal(etag, res:header("etag"))
      assert.equal(304, get("/style.css", { { "If-None-Match", '"other", W/' .. etag } }).status)
      assert.equal(200, get("/style.css", { { "If-None-Match", '"other"' } }).status)
    end)

    it("answers 304 to If-Modified-Since not older than Last-Modified", function()
      local lm = get("/app.js"):header("last-modified")
      assert.equal(304, get("/app.js", { { "If-Modified-Since", lm } }).status)
      assert.equal(200, get("/app.js", { { "If-Modified-Since", "Thu, 01 Jan 1998 00:00:00 GMT" } }).status)
    end)

    it("answers HEAD with the file's length and no body", function()
      local res = assert(raw.request(proxy.port, { method = "HEAD", target = "/big.bin" }))
      assert.equal(200, res.status)
      assert.equal(tostring(BIG_SIZE), res:header("content-length"))
      assert.equal("", res.body)
    end)

    it("refuses other methods with 405 and Allow: GET, HEAD", function()
      for _, m in ipairs { "POST", "PUT", "DELETE" } do
        local res = assert(raw.request(proxy.port, { method = m, target = "/index.html", body = "x" }))
        assert.equal(405, res.status, m)
        assert.equal("GET, HEAD", res:header("allow"))
      end
    end)
  end)

  describe("nothing outside root", function()
    it("refuses .. segments, plain or percent-encoded", function()
      for _, target in ipairs { "/../secret.txt", "/app/../../secret.txt", "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt", "/app/..%2f..%2fsecret.txt", "/assets/%2e%2e/%2e%2e/secret.txt" } do
        local res = get(target)
        assert(res.status == 400 or res.status == 404, target .. ": " .. res.status)
        assert.is_nil(res.body:find("secret", 1, true), target)
      end
    end)

    it("refuses a NUL byte and a bad escape", function()
      assert.equal(400, get("/index.html%00.css").status)
      assert.equal(400, get("/index%zz.html").status)
    end)

    it("does not follow a symlink out of root", function()
      local res = get("/leak.txt")
      assert.equal(403, res.status)
      assert.is_nil(res.body:find("secret", 1, true))
      assert.equal(403, get("/app/leak.txt").status) -- not the fallback either
    end)
  end)

  it("sends /api/ to the backend without the prefix", function()
    local res = get("/api/hello?x=1")
    assert.equal("/hello?x=1", h.echo(res).target)
    assert.equal("backend", res:header("x-origin"))
  end)

  describe("the connection", function()
    it("stays open after static responses, and pipelines", function()
      local c = assert(raw.connect(proxy.port, { timeout = 10 }))
      local a = assert(c:request { target = "/style.css" })
      local b = assert(c:request { target = "/api/one" })
      local d = assert(c:request { method = "HEAD", target = "/app.js" })
      local e = assert(c:request { target = "/missing" })
      assert.same({ 200, 200, 200, 404 }, { a.status, b.status, d.status, e.status })
      local list = assert(raw.pipeline(c, { { target = "/app.js" }, { target = "/api/two" },
        { target = "/assets/logo.svg", headers = { { "If-None-Match", a:header("etag") } } },
        { target = "/style.css", headers = { { "If-None-Match", a:header("etag") } } } }))
      assert.equal(file("/app.js"), list[1].body)
      assert.equal("/two", h.echo(list[2]).target)
      assert.equal(200, list[3].status)
      assert.equal(304, list[4].status)
      c:close()
    end)

    it("delivers a large file whole, then serves the next request", function()
      local c = assert(raw.connect(proxy.port, { timeout = 20 }))
      local res = assert(c:request { target = "/big.bin" })
      assert.equal(200, res.status)
      assert.equal(BIG_SIZE, #res.body)
      assert(res.body == big_body(), "the body differs from the file")
      assert.equal(200, assert(c:request { target = "/style.css" }).status)
      c:close()
    end)

    it("logs static responses with their status and bytes", function()
      local res = get("/style.css?log=1")
      local id = res:header("x-request-id")
      local e = h.eventually(function()
        for _, x in ipairs(proxy:access_log_entries()) do
          if x.id == id then return x end
        end
      end)
      assert.equal(200, e.status)
      assert.equal("site", e.route)
      assert.equal(#res.raw_head + #res.body, e.bytes)
    end)
  end)
end)
