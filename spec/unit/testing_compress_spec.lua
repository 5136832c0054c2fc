-- moonproxy.testing: the compression decision (SPEC "Compression") as the
-- server's req.c takes it: cfg:response reports compress = "gzip" (the
-- encoding) with the head the client gets, or compress = false and
-- compress_why; a route that does not compress reports neither.
local testing = require "moonproxy.testing"

local TEXT = [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18080" }
proxy.settings { compress = { algorithms = { "br", "gzip" }, min_length = 100 } }
local u = proxy.upstream "u" { servers = { "127.0.0.1:9001" } }
proxy.route { name = "off", prefix = "/off/", upstream = u, compress = false }
proxy.route { name = "zstd", prefix = "/z/", upstream = u, compress = { algorithms = { "zstd" } } }
proxy.route { name = "hooked", prefix = "/h/", upstream = u, on_response = function(req, res)
  if req.path == "/h/encoded" then res.headers["content-encoding"] = "custom" end
  if req.path == "/h/plain" then res.headers["content-encoding"] = nil; res.headers["content-type"] = "text/plain" end
end }
proxy.route { name = "all", prefix = "/", upstream = u }
]]

local BODY = ("x"):rep(1000)

describe("moonproxy.testing compression decision", function()
  local cfg
  lazy_setup(function() cfg = testing.load(TEXT, { text = true }) end)
  lazy_teardown(function() cfg:close() end)

  local function answer(path, ae, headers, opts)
    opts = opts or {}
    local r = cfg:request { method = opts.method or "GET", path = path, headers = { ["accept-encoding"] = ae } }
    local h = { ["content-type"] = "text/html; charset=utf-8" }
    for k, v in pairs(headers or {}) do h[k] = v end
    return cfg:response(r, { status = opts.status or 200, headers = h, body = opts.body or BODY })
  end

  it("reports the encoding chosen, and the head carries it", function()
    local res = answer("/page", "gzip, br")
    assert.equal("br", res.compress)
    assert.is_nil(res.compress_why)
    assert.equal("br", res.headers["content-encoding"])
    assert.equal("Accept-Encoding", res.headers.vary)
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.is_nil(res.headers["content-length"])
    assert.equal("gzip", answer("/page", "br;q=0.5, gzip").compress)
    assert.equal("zstd", answer("/z/page", "gzip, zstd").compress)
  end)

  it("says why a response is not compressed", function()
    local cases = {
      { { "/page", nil }, "accepts none" },
      { { "/page", "gzip;q=0, br;q=0" }, "accepts none" },
      { { "/page", "gzip", { ["content-encoding"] = "gzip" } }, "Content-Encoding" },
      { { "/page", "gzip", { ["cache-control"] = "no-transform" } }, "no-transform" },
      { { "/page", "gzip", { ["content-type"] = "image/png" } }, "Content-Type" },
      { { "/page", "gzip", {}, { body = ("x"):rep(99) } }, "min_length" },
      { { "/page", "gzip", {}, { status = 206 } }, "206" },
      { { "/page", "gzip", {}, { status = 304, body = "" } }, "without a body" },
      { { "/page", "gzip", {}, { method = "HEAD" } }, "HEAD" },
    }
    for _, c in ipairs(cases) do
      local a = c[1]
      local res = answer(a[1], a[2], a[3], a[4])
      assert.is_false(res.compress, c[2])
      assert.matches(c[2], res.compress_why, 1, true)
      assert.is_nil(res.headers.vary, c[2])
    end
  end)

  it("decides on the head the response hooks left", function()
    local res = answer("/h/encoded", "gzip")
    assert.is_false(res.compress)
    assert.matches("Content-Encoding", res.compress_why, 1, true)
    assert.equal("custom", res.headers["content-encoding"])
    res = answer("/h/plain", "gzip", { ["content-encoding"] = "gzip", ["content-type"] = "image/png" })
    assert.equal("gzip", res.compress)
    assert.equal("gzip", res.headers["content-encoding"])
  end)

  it("reports nothing for a route that does not compress", function()
    local res = answer("/off/page", "gzip")
    assert.is_nil(res.compress)
    assert.is_nil(res.compress_why)
    assert.is_nil(res.headers["content-encoding"])
  end)

  it("has a compress step in the trace", function()
    local res = answer("/page", "gzip")
    local text
    for _, s in ipairs(res.trace) do if s.step == "compress" then text = s.text end end
    assert.equal("gzip (Accept-Encoding)", text)
  end)

  it("refuses a bad compress table", function()
    local function load(c)
      return pcall(testing.load, TEXT:gsub('proxy.settings { compress = { algorithms = { "br", "gzip" }, min_length = 100 } }',
        "proxy.settings { compress = " .. c .. " }"), { text = true })
    end
    local ok, err = load('{ algorithms = { "deflate" } }')
    assert.is_false(ok)
    assert.matches("algorithms", err)
    ok, err = load('{ algorithms = { "gzip", "gzip" } }')
    assert.is_false(ok)
    assert.matches("twice", err)
    ok, err = load('{ types = { "html" } }')
    assert.is_false(ok)
    assert.matches("media type", err)
    ok, err = load("{ level = 0 }")
    assert.is_false(ok)
    assert.matches("level", err)
    local c2 = assert(testing.load(TEXT:gsub("min_length = 100", "min_length = 100, level = 9"), { text = true }))
    c2:close()
  end)
end)
