-- End-to-end: byte ranges of static files (RFC 9110 §14: one range, suffix
-- and open-ended forms, If-Range, 416) and precompressed siblings
-- (static = { precompressed = true }: .br / .zst / .gz chosen by
-- Accept-Encoding with q-values, Vary, their own ETag, ranges of them).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = false }
proxy.route { name = "packed", prefix = "/packed/", strip_prefix = true,
  static = { root = "${root}", precompressed = true } }
proxy.route { name = "all", prefix = "/", static = { root = "${root}" } }
]=]

-- 100,000 bytes where every offset shows: a shifted slice cannot pass.
local function body()
  local t = {}
  for i = 0, 9999 do t[#t + 1] = string.format("%09d\n", i * 10) end
  return table.concat(t)
end

describe("static ranges and precompressed files", function()
  local proxy, tmp, root
  local BODY = body()

  lazy_setup(function()
    tmp = os.tmpname()
    os.remove(tmp)
    root = tmp .. "/root"
    assert(os.execute("mkdir -p " .. h.quote(root)))
    h.write_file(root .. "/f.txt", BODY)
    h.write_file(root .. "/f.txt.gz", "GZ:" .. BODY:sub(1, 500))   -- the bytes stand for the codings:
    h.write_file(root .. "/f.txt.br", "BR:" .. BODY:sub(1, 400))   -- the proxy never decodes them
    h.write_file(root .. "/only.js", "plain();\n")
    h.write_file(root .. "/only.js.zst", "ZSTD:plain();\n")
    proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { root = root } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy)
    if tmp then h.run("rm -rf " .. h.quote(tmp)) end
  end)

  local function get(target, headers, method)
    return assert(raw.request(proxy.port, { method = method or "GET", target = target, headers = headers },
      { timeout = 10 }))
  end

  describe("Range", function()
    it("answers a range with 206, Content-Range and exactly those bytes", function()
      local res = get("/f.txt", { Range = "bytes=10-29" })
      assert.equal(206, res.status)
      assert.equal("bytes 10-29/100000", res:header("content-range"))
      assert.equal("20", res:header("content-length"))
      assert.equal(BODY:sub(11, 30), res.body)
      assert.equal("bytes", res:header("accept-ranges"))
    end)

    it("serves open-ended and suffix ranges, and clamps a last byte past the end", function()
      local open = get("/f.txt", { Range = "bytes=99990-" })
      assert.same({ 206, "bytes 99990-99999/100000", BODY:sub(99991) }, { open.status, open:header("content-range"), open.body })
      local suffix = get("/f.txt", { Range = "bytes=-15" })
      assert.same({ 206, "bytes 99985-99999/100000", BODY:sub(-15) }, { suffix.status, suffix:header("content-range"), suffix.body })
      local whole = get("/f.txt", { Range = "bytes=-500000" })
      assert.same({ 206, "bytes 0-99999/100000" }, { whole.status, whole:header("content-range") })
      assert.equal(BODY, whole.body)
      local clamped = get("/f.txt", { Range = "bytes=99999-200000" })
      assert.same({ 206, "bytes 99999-99999/100000", "\n" }, { clamped.status, clamped:header("content-range"), clamped.body })
    end)

    it("answers a range that starts past the end 416 with the length, and keeps the connection", function()
      local c = assert(raw.connect(proxy.port, { timeout = 10 }))
      local res = assert(c:request({ method = "GET", target = "/f.txt", headers = { Range = "bytes=100000-" } }))
      assert.equal(416, res.status)
      assert.equal("bytes */100000", res:header("content-range"))
      assert.equal(416, get("/f.txt", { Range = "bytes=-0" }).status)
      local again = assert(c:request({ method = "GET", target = "/f.txt", headers = { Range = "bytes=0-3" } }))
      assert.same({ 206, BODY:sub(1, 4) }, { again.status, again.body })
      c:close()
    end)

    it("serves the whole file for what it does not honour: several ranges, another unit, bad syntax", function()
      for _, v in ipairs { "bytes=0-1,5-6", "items=0-1", "bytes=5-3", "bytes=abc", "bytes=1-2x", "bytes=" } do
        local res = get("/f.txt", { Range = v })
        assert.equal(200, res.status, v)
        assert.equal(BODY, res.body, v)
        assert.is_nil(res:header("content-range"), v)
      end
    end)

    it("applies the range only while If-Range names the file's ETag or date", function()
      local full = get("/f.txt")
      local etag, date = full:header("etag"), full:header("last-modified")
      assert.equal(206, get("/f.txt", { Range = "bytes=0-9", ["If-Range"] = etag }).status)
      assert.equal(206, get("/f.txt", { Range = "bytes=0-9", ["If-Range"] = date }).status)
      local stale = get("/f.txt", { Range = "bytes=0-9", ["If-Range"] = '"0-0"' })
      assert.same({ 200, BODY }, { stale.status, stale.body })
      assert.equal(200, get("/f.txt", { Range = "bytes=0-9", ["If-Range"] = "W/" .. etag }).status) -- strong comparison
      assert.equal(200, get("/f.txt", { Range = "bytes=0-9", ["If-Range"] = "Mon, 01 Jan 2001 00:00:00 GMT" }).status)
    end)

    it("leaves HEAD and conditional requests as they were", function()
      local head = get("/f.txt", { Range = "bytes=0-9" }, "HEAD")
      assert.same({ 200, "100000", "" }, { head.status, head:header("content-length"), head.body })
      local etag = get("/f.txt"):header("etag")
      assert.equal(304, get("/f.txt", { Range = "bytes=0-9", ["If-None-Match"] = etag }).status)
    end)
  end)

  describe("precompressed", function()
    it("serves the sibling the client accepts, with Content-Encoding, Vary and its own ETag", function()
      local plain = get("/packed/f.txt")
      assert.same({ 200, BODY, "Accept-Encoding" }, { plain.status, plain.body, plain:header("vary") })
      assert.is_nil(plain:header("content-encoding"))
      local gz = get("/packed/f.txt", { ["Accept-Encoding"] = "gzip" })
      assert.same({ 200, "gzip", "Accept-Encoding", "GZ:" .. BODY:sub(1, 500) },
        { gz.status, gz:header("content-encoding"), gz:header("vary"), gz.body })
      assert.equal("text/plain; charset=utf-8", gz:header("content-type")) -- the file's type, not .gz's
      assert.not_equal(plain:header("etag"), gz:header("etag"))
      assert.equal(304, get("/packed/f.txt", { ["Accept-Encoding"] = "gzip", ["If-None-Match"] = gz:header("etag") }).status)
      assert.equal(200, get("/packed/f.txt", { ["If-None-Match"] = gz:header("etag") }).status)
    end)

    it("prefers br, then zstd, then gzip, unless q-values say otherwise", function()
      local function coding(ae) return get("/packed/f.txt", { ["Accept-Encoding"] = ae }):header("content-encoding") end
      assert.equal("br", coding("gzip, deflate, br"))
      assert.equal("gzip", coding("br;q=0.5, gzip"))
      assert.equal("gzip", coding("br;q=0, gzip;q=0.1"))
      assert.equal("br", coding("*"))
      assert.is_nil(coding("br;q=0, gzip;q=0"))
      assert.is_nil(coding("identity"))
      assert.equal("gzip", coding("x-gzip"))
      -- a coding whose sibling is missing falls to the next one the client accepts
      assert.equal("zstd", get("/packed/only.js", { ["Accept-Encoding"] = "br, zstd" }):header("content-encoding"))
      assert.is_nil(get("/packed/only.js", { ["Accept-Encoding"] = "br, gzip" }):header("content-encoding"))
    end)

    it("ranges apply to the encoded bytes", function()
      local res = get("/packed/f.txt", { ["Accept-Encoding"] = "br", Range = "bytes=0-2" })
      assert.same({ 206, "br", "BR:", "bytes 0-2/403" },
        { res.status, res:header("content-encoding"), res.body, res:header("content-range") })
    end)

    it("never serves siblings on a route without precompressed", function()
      local res = get("/f.txt", { ["Accept-Encoding"] = "gzip, br" })
      assert.same({ 200, BODY }, { res.status, res.body })
      assert.is_nil(res:header("content-encoding"))
      assert.is_nil(res:header("vary"))
    end)
  end)
end)
