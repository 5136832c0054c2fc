-- End-to-end: response compression (SPEC "Compression"): gzip, br and zstd
-- decoded and compared with what the origin sent, the negotiation
-- (Accept-Encoding q-values, ties by the route's algorithms), every rule
-- that leaves a response alone, the head changes (Vary, weak ETag, no
-- Content-Length), HTTP/1.0 clients, a 5 MiB body and an SSE stream that
-- must arrive event by event.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local origin = require "helpers.origin"
local socket = require "socket"
local ffi = require "ffi"

ffi.cdef [[
typedef struct mp_spec_z_stream {
  const uint8_t *next_in; unsigned avail_in; unsigned long total_in;
  uint8_t *next_out; unsigned avail_out; unsigned long total_out;
  const char *msg; void *state; void *zalloc; void *zfree; void *opaque;
  int data_type; unsigned long adler; unsigned long reserved;
} mp_spec_z_stream;
int inflateInit2_(mp_spec_z_stream *strm, int windowBits, const char *version, int stream_size);
int inflate(mp_spec_z_stream *strm, int flush);
int inflateEnd(mp_spec_z_stream *strm);
const char *zlibVersion(void);
]]
local zlib = ffi.load("z")

-- A streaming gzip decoder: feed(bytes) returns what they decode to.
local function inflater()
  local s = ffi.new("mp_spec_z_stream")
  assert(zlib.inflateInit2_(s, 15 + 16, zlib.zlibVersion(), ffi.sizeof(s)) == 0)
  local out = ffi.new("uint8_t[65536]")
  local keep
  return {
    feed = function(bytes)
      keep = bytes
      s.next_in, s.avail_in = ffi.cast("const uint8_t *", keep), #keep
      local parts = {}
      repeat
        s.next_out, s.avail_out = out, 65536
        local rc = zlib.inflate(s, 0)
        assert(rc == 0 or rc == 1 or rc == -5, "inflate: " .. rc)
        parts[#parts + 1] = ffi.string(out, 65536 - s.avail_out)
      until s.avail_out ~= 0 or rc == 1
      return table.concat(parts)
    end,
    close = function() zlib.inflateEnd(s) end,
  }
end

-- The body decoded by the gzip, brotli or zstd command.
local DECODERS = { gzip = "gzip -dc", br = "brotli -dc", zstd = "zstd -dcq" }
local function decode(enc, body)
  local path = h.tmpname("." .. enc)
  local f = assert(io.open(path, "wb"))
  f:write(body)
  f:close()
  local p = assert(io.popen(DECODERS[enc] .. " < " .. h.quote(path) .. " 2>/dev/null"))
  local out = p:read("*a")
  p:close()
  os.remove(path)
  return out
end

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", compress = {
  types = { "application/json", "text/*", "application/octet-stream" }, min_length = 0 } }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }
local sse = proxy.upstream "sse" { servers = { "${sse}" }, keepalive = 0 }
proxy.route { prefix = "/events", upstream = sse }
proxy.route { prefix = "/off/", strip_prefix = true, upstream = a, compress = false }
proxy.route { prefix = "/min/", strip_prefix = true, upstream = a,
  compress = { min_length = 4096, types = { "application/octet-stream" } } }
proxy.route { prefix = "/json/", strip_prefix = true, upstream = a, compress = { types = { "application/json" } } }
proxy.route { prefix = "/gz1/", strip_prefix = true, upstream = a,
  compress = { algorithms = { "gzip" }, level = 1, types = { "application/octet-stream" } } }
proxy.route { prefix = "/", upstream = a }
]=]

describe("moonproxy compression", function()
  local a, sse, proxy, flag

  lazy_setup(function()
    a = h.start_origin("a")
    flag = h.tmpname(".flag")
    os.remove(flag)
    local sse_port = h.free_port()
    sse = h.spawn { "luajit", "spec/helpers/sse_origin.lua", tostring(sse_port), flag }
    assert(h.eventually(function() return h.port_open(sse_port) end, 10), "sse origin did not start")
    proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { a = a.addr, sse = "127.0.0.1:" .. sse_port } }
  end)

  lazy_teardown(function()
    os.remove(flag)
    h.shutdown(proxy, a, sse)
  end)

  local function get(target, ae, extra)
    local headers = { { "Host", "x" } }
    if ae then headers[#headers + 1] = { "Accept-Encoding", ae } end
    for _, x in ipairs(extra or {}) do headers[#headers + 1] = x end
    return assert(raw.request(proxy.port, { target = target, headers = headers }, { timeout = 20 }))
  end

  local function assert_compressed(res, enc, want)
    assert.equal(200, res.status)
    assert.equal(enc, res:header("content-encoding"))
    assert.is_nil(res:header("content-length"))
    assert.is_true(res.chunked)
    assert.equal("Accept-Encoding", res:header("vary"))
    local body = decode(enc, res.body)
    assert.equal(#want, #body)
    assert.equal(origin.checksum(want), origin.checksum(body))
    assert.is_true(#res.body < #want, "compressed is smaller")
  end

  describe("each algorithm", function()
    local want = origin.pattern(200000)
    for _, enc in ipairs { "gzip", "br", "zstd" } do
      it("encodes a Content-Length body as " .. enc .. ", which decodes to the origin's bytes", function()
        assert_compressed(get("/big?size=200000", enc), enc, want)
      end)
      it("encodes a chunked body as " .. enc, function()
        assert_compressed(get("/big?size=200000&chunked=1", enc), enc, want)
      end)
    end

    it("encodes a close-delimited body", function()
      assert_compressed(get("/noframe?size=70000", "gzip"), "gzip", origin.pattern(70000))
    end)

    it("takes the route's level (gzip level 1 is larger than the default 6)", function()
      local l1 = get("/gz1/big?size=200000", "gzip")
      local l6 = get("/big?size=200000", "gzip")
      assert_compressed(l1, "gzip", want)
      assert.is_true(#l1.body > #l6.body, #l1.body .. " > " .. #l6.body)
    end)

    it("encodes a 5 MiB body whole", function()
      local n = 5 * 1024 * 1024
      assert_compressed(get("/big?size=" .. n, "gzip"), "gzip", origin.pattern(n))
    end)

    it("serves compressed responses one after another on a keep-alive connection", function()
      local c = assert(raw.connect(proxy.port))
      finally(function() c:close() end)
      for _, enc in ipairs { "zstd", "gzip", "br" } do
        local res = assert(c:request { target = "/big?size=30000", headers = { { "Accept-Encoding", enc } } })
        assert_compressed(res, enc, origin.pattern(30000))
      end
      local res = assert(c:request { target = "/big?size=3000" })
      assert.equal("3000", res:header("content-length"))
      assert.equal(origin.pattern(3000), res.body)
    end)

    it("serves concurrent clients on both workers, each response decoding whole", function()
      local encs = { "gzip", "br", "zstd" }
      local conns = {}
      for i = 1, 16 do
        conns[i] = {}
        for j = 1, 3 do
          conns[i][j] = { target = "/big?size=" .. (20000 + i * 100 + j) .. (j == 2 and "&chunked=1" or ""),
                          headers = { { "Accept-Encoding", encs[(i + j) % 3 + 1] } } }
        end
      end
      local out = h.fan_out(proxy.port, conns, { timeout = 20 })
      for i = 1, 16 do
        for j = 1, 3 do
          assert_compressed(out[i][j], encs[(i + j) % 3 + 1], origin.pattern(20000 + i * 100 + j))
        end
      end
    end)
  end)

  describe("negotiation", function()
    local function enc_for(ae)
      return get("/big?size=10000", ae):header("content-encoding")
    end

    it("prefers the route's order when the client accepts several equally", function()
      assert.equal("zstd", enc_for("gzip, deflate, br, zstd"))
      assert.equal("br", enc_for("gzip, br"))
    end)

    it("takes the client's highest q-value", function()
      assert.equal("gzip", enc_for("zstd;q=0.5, br;q=0.8, gzip"))
      assert.equal("br", enc_for("zstd;q=0.5, br;q=0.9, gzip;q=0.85"))
    end)

    it("never uses a coding with q=0, and * covers the others", function()
      assert.equal("gzip", enc_for("zstd;q=0, br;q=0.000, gzip"))
      assert.equal("br", enc_for("*;q=0.5, zstd;q=0"))
      assert.is_nil(enc_for("gzip;q=0"))
      assert.is_nil(enc_for("*;q=0"))
    end)

    it("sends identity when the client sends no Accept-Encoding or none it can use", function()
      for _, ae in ipairs { false, "identity", "deflate, compress" } do
        local res = get("/big?size=10000", ae or nil)
        assert.is_nil(res:header("content-encoding"))
        assert.equal("10000", res:header("content-length"))
        assert.equal(origin.pattern(10000), res.body)
      end
    end)
  end)

  describe("rules that leave a response alone", function()
    local function plain(res, status)
      assert.equal(status or 200, res.status)
      assert.is_nil(res:header("vary"))
      return res
    end

    it("a response that already has a Content-Encoding", function()
      local res = plain(get("/x?resp_header=Content-Encoding:custom", "gzip"))
      assert.equal("custom", res:header("content-encoding"))
      assert.equal("/x?resp_header=Content-Encoding:custom", h.echo(res).target)
    end)

    it("Cache-Control: no-transform", function()
      local res = plain(get("/x?resp_header=Cache-Control:public,%20no-transform", "gzip"))
      assert.is_nil(res:header("content-encoding"))
      assert.truthy(res:header("content-length"))
    end)

    it("a 206", function()
      local res = plain(get("/status/206", "gzip"), 206)
      assert.is_nil(res:header("content-encoding"))
      assert.equal("status 206\n", res.body)
    end)

    it("a HEAD request", function()
      local c = assert(raw.connect(proxy.port))
      finally(function() c:close() end)
      local res = assert(c:request { method = "HEAD", target = "/big?size=10000", headers = { { "Accept-Encoding", "gzip" } } })
      plain(res)
      assert.is_nil(res:header("content-encoding"))
      assert.equal("10000", res:header("content-length"))
    end)

    it("a 204 and a 304", function()
      for _, st in ipairs { 204, 304 } do
        local res = plain(get("/status/" .. st, "gzip"), st)
        assert.is_nil(res:header("content-encoding"))
        assert.is_nil(res:header("transfer-encoding"))
      end
    end)

    it("a Content-Length under min_length, but not one above it", function()
      local res = plain(get("/min/big?size=4095", "gzip"))
      assert.is_nil(res:header("content-encoding"))
      assert.equal("4095", res:header("content-length"))
      assert_compressed(get("/min/big?size=4096", "gzip"), "gzip", origin.pattern(4096))
    end)

    it("a Content-Type not in types", function()
      local res = plain(get("/json/big?size=10000", "gzip"))
      assert.is_nil(res:header("content-encoding"))
      assert.equal("gzip", get("/json/x", "gzip"):header("content-encoding")) -- the JSON echo is
    end)

    it("a route with compress = false", function()
      local res = plain(get("/off/big?size=10000", "gzip"))
      assert.is_nil(res:header("content-encoding"))
      assert.equal(origin.pattern(10000), res.body)
    end)
  end)

  describe("the head", function()
    it("merges Accept-Encoding into an existing Vary", function()
      local res = get("/x?resp_header=Vary:Origin", "gzip")
      assert.equal("gzip", res:header("content-encoding"))
      assert.same({ "Origin, Accept-Encoding" }, res:header_all("vary"))
      res = get("/x?resp_header=Vary:accept-encoding", "gzip")
      assert.same({ "accept-encoding" }, res:header_all("vary"))
    end)

    it("makes a strong ETag weak and keeps a weak one", function()
      local res = get("/x?resp_header=ETag:%22v1%22", "br")
      assert.equal("br", res:header("content-encoding"))
      assert.equal('W/"v1"', res:header("etag"))
      assert.equal('W/"v2"', get("/x?resp_header=ETag:W/%22v2%22", "br"):header("etag"))
      assert.equal('"v1"', get("/x?resp_header=ETag:%22v1%22"):header("etag")) -- not compressed: as it came
    end)

    it("sends an HTTP/1.0 client the body until close, not chunked", function()
      for _, target in ipairs { "/big?size=50000", "/big?size=50000&chunked=1" } do
        local c = assert(raw.connect(proxy.port, { timeout = 10 }))
        finally(function() c:close() end)
        local res = assert(c:request { version = "HTTP/1.0", target = target,
          headers = { { "Accept-Encoding", "gzip" }, { "Connection", "keep-alive" } } })
        assert.equal("gzip", res:header("content-encoding"))
        assert.is_nil(res:header("transfer-encoding"))
        assert.is_nil(res:header("content-length"))
        assert.is_true(res.close_delimited)
        assert.equal("close", res:header("connection"))
        assert.equal(origin.pattern(50000), decode("gzip", res.body))
      end
    end)
  end)

  it("streams server-sent events: the first reaches the client before the origin sends the second", function()
    local c = assert(raw.connect(proxy.port, { timeout = 10 }))
    finally(function() c:close() end)
    assert(c:send(raw.build { target = "/events", headers = { { "Accept-Encoding", "gzip" } } }))
    local z = inflater()
    finally(function() z.close() end)
    local text = ""
    local deadline = socket.gettime() + 5
    -- the head, then chunks decoded as they come
    while not c.buf:find("\r\n\r\n", 1, true) do assert(c:fill(deadline)) end
    local head_end = c.buf:find("\r\n\r\n", 1, true)
    local head = c.buf:sub(1, head_end + 3)
    local rest = c.buf:sub(head_end + 4)
    c.buf = ""
    assert.matches("Content%-Encoding: gzip\r\n", head)
    assert.matches("Transfer%-Encoding: chunked\r\n", head)
    local ended = false
    local function pump()
      while true do -- decode every whole chunk in rest
        local line_end = rest:find("\r\n", 1, true)
        if not line_end then return end
        local size = tonumber(rest:sub(1, line_end - 1), 16)
        if size == 0 then ended = true return end
        if #rest < line_end + 1 + size + 2 then return end
        text = text .. z.feed(rest:sub(line_end + 2, line_end + 1 + size))
        rest = rest:sub(line_end + 1 + size + 3)
      end
    end
    local function read_until(pred)
      while not pred() do
        pump()
        if pred() then break end
        assert(c:fill(deadline))
        rest, c.buf = rest .. c.buf, ""
      end
    end
    read_until(function() return text:find("event one", 1, true) ~= nil end)
    assert.equal("data: event one\n\n", text) -- the origin waits for the flag before the second
    h.write_file(flag, "go")
    deadline = socket.gettime() + 10
    read_until(function() return ended end)
    assert.equal("data: event one\n\ndata: event two\n\ndata: event three\n\n", text)
  end)
end)
