-- End-to-end: 1xx interim responses and close-delimited bodies (SPEC
-- "WebSocket and other upgrades", last bullet). 100 and 103 from an
-- upstream reach HTTP/1.1 clients before the final response (not HTTP/1.0
-- ones, never a second 100 Continue); a flood of them is a 502. A response
-- read until the upstream closes reaches an HTTP/1.1 client chunked, its
-- connection reusable, and an HTTP/1.0 client close-delimited; over TLS a
-- cut without close_notify never ends the chunked body cleanly.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"

-- A raw origin: one connection at a time, one request each (it closes
-- after every answer, so the proxy pools none); what it answers depends on
-- the path. With a certificate it speaks TLS (LuaSec).
local ORIGIN = [=[
local socket = require "socket"
local port, cert, key = tonumber(arg[1]), arg[2], arg[3]
local ssl = cert and require "ssl"
local server = assert(socket.bind("127.0.0.1", port, 16))
local function body(n)
  local t = {}
  for i = 0, n - 1, 10 do t[#t + 1] = string.format("%09d\n", i) end
  return table.concat(t):sub(1, n)
end
while true do
  local c = server:accept()
  c:settimeout(10)
  if ssl then
    c = assert(ssl.wrap(c, { mode = "server", protocol = "any", key = key, certificate = cert }))
    if not c:dohandshake() then c:close(); c = nil end
  end
  if c then
    local line = c:receive("*l") or "GET /none HTTP/1.1"
    local path = line:match("^%u+ (%S+)")
    repeat local l = c:receive("*l") until not l or l == ""
    if path == "/hundred" then
      c:send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    elseif path == "/hints" then
      c:send("HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n" ..
             "HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n" ..
             "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfinal")
    elseif path == "/big" then -- 16 large 103s fill most of a read buffer; the final head crosses its end
      local link = "Link: </" .. string.rep("l", 1880) .. ">; rel=preload\r\n"
      c:send(string.rep("HTTP/1.1 103 Early Hints\r\n" .. link .. "\r\n", 16) ..
             "HTTP/1.1 200 OK\r\nConnection: close\r\nX-Pad: " .. string.rep("p", 4000) ..
             "\r\nContent-Length: 2\r\n\r\nok")
    elseif path == "/flood" then
      c:send(string.rep("HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", 100) ..
             "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    elseif path == "/ws" then -- a 101 with bytes after it, then an echo of what comes back
      c:send("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhello")
      local got = c:receive(4)
      if got then c:send(got) end
    elseif path:match("^/noframe") then
      local n = tonumber(path:match("n=(%d+)")) or 1000
      c:send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
      local b = body(n)
      for i = 1, #b, 65536 do c:send(b:sub(i, i + 65535)) end
      if path:match("cut") then os.exit(0, false) end -- the kernel closes: no close_notify
    else
      c:send("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    end
    c:close()
  end
end
]=]

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = false }
local o = proxy.upstream "o" { servers = { "127.0.0.1:${oport}" } }
proxy.route { prefix = "/", upstream = o }
]=]

local TLS_CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.listen { addr = "${tls_listen}", tls = { cert = "${cert}", key = "${key}" } }
proxy.settings { access_log = false }
local o = proxy.upstream "o" { servers = { "127.0.0.1:${oport}" }, tls = { ca = "${ca}", server_name = "localhost" } }
proxy.route { prefix = "/", upstream = o }
]=]

local function pattern(n)
  local t = {}
  for i = 0, n - 1, 10 do t[#t + 1] = string.format("%09d\n", i) end
  return table.concat(t):sub(1, n)
end

local function start_origin(args)
  local port = h.free_port()
  local script = h.write_file(h.tmpname(".lua"), ORIGIN)
  local argv = { "luajit", script, tostring(port) }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = h.spawn(argv)
  assert.truthy(h.eventually(function() return h.port_open(port) end, 10), "origin did not start")
  p.port = port
  return p
end

describe("1xx and close-delimited responses", function()
  local origin, proxy

  lazy_setup(function()
    origin = start_origin()
    proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { oport = origin.port } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function conn() return assert(raw.connect(proxy.port, { timeout = 10 })) end

  it("relays 103 Early Hints to an HTTP/1.1 client before the final response, hop-by-hop fields dropped", function()
    local c = conn()
    local res = assert(c:request({ method = "GET", target = "/hints" }))
    assert.same({ 200, "final" }, { res.status, res.body })
    assert.equal(2, #res.interim)
    assert.same({ 103, "</a.css>; rel=preload" }, { res.interim[1].status, res.interim[1]:header("link") })
    assert.is_nil(res.interim[1]:header("x-hop"))
    assert.is_nil(res.interim[1]:header("connection"))
    assert.equal("</b.js>; rel=preload", res.interim[2]:header("link"))
    c:close()
  end)

  it("relays no 1xx to an HTTP/1.0 client", function()
    local c = conn()
    local res = assert(c:request({ method = "GET", target = "/hints", version = "HTTP/1.0" }))
    assert.same({ 200, "final", 0 }, { res.status, res.body, #res.interim })
    c:close()
  end)

  it("relays an upstream's 100 Continue, and never a second one after the proxy's own", function()
    local c = conn()
    local res = assert(c:request({ method = "GET", target = "/hundred" }))
    assert.same({ 200, "ok", 1, 100 }, { res.status, res.body, #res.interim, res.interim[1] and res.interim[1].status })
    -- with Expect, the proxy answers 100 itself once the upstream connection is ready
    res = assert(c:request({ method = "POST", target = "/hundred", headers = { { "Expect", "100-continue" } }, body = "abc" }))
    assert.same({ 200, "ok", 1 }, { res.status, res.body, #res.interim })
    c:close()
  end)

  it("relays 16 large interim responses and a final head that follows them past a buffer's end", function()
    local c = conn()
    local res = assert(c:request({ method = "GET", target = "/big" }))
    assert.same({ 200, "ok", 16 }, { res.status, res.body, #res.interim })
    assert.equal(1896, #res.interim[16]:header("link")) -- </...>; rel=preload
    assert.equal(4000, #res:header("x-pad"))
    c:close()
  end)

  it("answers 502 to an upstream that sends interim responses without end", function()
    local res = assert(raw.get(proxy.port, "/flood", nil, { timeout = 10 }))
    assert.equal(502, res.status)
    assert.equal(200, assert(raw.get(proxy.port, "/hints", nil, { timeout = 10 })).status) -- the worker goes on
  end)

  it("sends a close-delimited body chunked to an HTTP/1.1 client, on a connection it can reuse", function()
    local c = conn()
    local n = 1024 * 1024 + 7
    local res = assert(c:request({ method = "GET", target = "/noframe?n=" .. n }))
    assert.equal(200, res.status)
    assert.truthy(res.chunked)
    assert.equal("chunked", res:header("transfer-encoding"))
    assert.is_nil(res:header("content-length"))
    assert.is_falsy(res:has_token("connection", "close"))
    assert.equal(pattern(n), res.body)
    local again = assert(c:request({ method = "GET", target = "/noframe?n=10" }))
    assert.same({ 200, pattern(10) }, { again.status, again.body })
    local empty = assert(c:request({ method = "GET", target = "/noframe?n=0" }))
    assert.same({ 200, "" }, { empty.status, empty.body })
    c:close()
  end)

  it("relays a 101 and the tunnel's bytes unframed (a 101 has no body to chunk)", function()
    local c = conn()
    assert(c:send("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" ..
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"))
    local res = assert(c:read_response({ interim = true }))
    assert.equal(101, res.status)
    assert.is_nil(res:header("transfer-encoding"))
    local deadline = require("socket").gettime() + 10
    while #c.buf < 5 and c:fill(deadline) do end
    assert.equal("hello", c.buf)
    c.buf = ""
    assert(c:send("ping"))
    while #c.buf < 4 and c:fill(deadline) do end
    assert.equal("ping", c.buf)
    c:close()
  end)

  it("sends it close-delimited to an HTTP/1.0 client", function()
    local c = conn()
    local res = assert(c:request({ method = "GET", target = "/noframe?n=5000", version = "HTTP/1.0" }))
    assert.same({ 200, pattern(5000) }, { res.status, res.body })
    assert.truthy(res.close_delimited)
    assert.is_nil(res:header("transfer-encoding"))
    c:close()
  end)
end)

describe("close-delimited responses from a TLS upstream", function()
  local pki, origin, proxy, tls_port

  lazy_setup(function()
    pki = tls.pki()
    origin = start_origin { pki.localhost.cert, pki.localhost.key }
    tls_port = h.free_port()
    proxy = h.start_proxy { workers = 1, config = TLS_CONFIG, vars = { oport = origin.port, ca = pki.ca,
      tls_listen = "127.0.0.1:" .. tls_port, cert = pki.localhost.cert, key = pki.localhost.key } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
    if pki then pki:remove() end
  end)

  it("ends the chunked body after the upstream's close_notify", function()
    local c = assert(raw.connect(proxy.port, { timeout = 10 }))
    local res = assert(c:request({ method = "GET", target = "/noframe?n=200000" }))
    assert.same({ 200, true, pattern(200000) }, { res.status, res.chunked, res.body })
    c:close()
  end)

  it("sends it chunked to an HTTP/1.1 client over TLS too, on a connection it can reuse", function()
    local c = assert(tls.connect(tls_port, { timeout = 10 }))
    local n = 1024 * 1024 + 3
    local res = assert(c:request({ method = "GET", target = "/noframe?n=" .. n }))
    assert.same({ 200, true, true }, { res.status, res.chunked, res.body == pattern(n) })
    assert.is_falsy(res:has_token("connection", "close"))
    local again = assert(c:request({ method = "GET", target = "/noframe?n=100" }))
    assert.same({ 200, true, pattern(100) }, { again.status, again.chunked, again.body })
    c:close()
  end)

  it("never ends it cleanly when the upstream's TLS is cut without close_notify", function()
    local c = assert(raw.connect(proxy.port, { timeout = 10 }))
    local res, err = c:request({ method = "GET", target = "/noframe?n=200000&cut=1" })
    assert.is_nil(res, "a cut response was relayed as whole")
    assert.truthy(err)
    c:close()
  end)
end)
