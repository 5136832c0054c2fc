-- End-to-end: the upgrade gate (SPEC "WebSocket and other upgrades"). Only
-- a GET over HTTP/1.1 with Connection: upgrade and Upgrade: websocket and no
-- body goes upstream as a handshake (Upgrade: websocket, Connection:
-- upgrade); other tokens and routes with upgrade = false lose Upgrade; a
-- body on a handshake is 400 and reaches nobody; an answer other than 101 is
-- relayed and the client connection closes after it. The origin here
-- answers 200 echoes, never 101: the tunnel itself is websocket_spec.lua's.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = false }
local o = proxy.upstream "o" { servers = { "${origin}" } }
proxy.route { name = "closed", prefix = "/closed/", upgrade = false, upstream = o }
proxy.route { name = "all", prefix = "/", upstream = o }
]=]

local WS = { { "Connection", "keep-alive, Upgrade" }, { "Upgrade", "websocket" },
  { "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==" }, { "Sec-WebSocket-Version", "13" } }

local function with(list, extra)
  local t = {}
  for _, v in ipairs(list) do t[#t + 1] = v end
  for _, v in ipairs(extra or {}) do t[#t + 1] = v end
  return t
end

describe("the upgrade gate", function()
  local origin, proxy

  lazy_setup(function()
    origin = h.start_origin("o")
    proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { origin = origin.addr } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  local function get(target, headers, method)
    return assert(raw.request(proxy.port, { method = method or "GET", target = target, headers = headers },
      { timeout = 5 }))
  end

  it("forwards a WebSocket handshake with Upgrade: websocket and Connection: upgrade", function()
    local res = get("/chat", WS)
    local e = h.echo(res)
    assert.same({ "websocket" }, h.echo_headers(e, "upgrade"))
    assert.same({ "upgrade" }, h.echo_headers(e, "connection"))
    assert.equal("dGhlIHNhbXBsZSBub25jZQ==", h.echo_header(e, "sec-websocket-key"))
    assert.equal("13", h.echo_header(e, "sec-websocket-version"))
  end)

  it("relays an answer other than 101 and closes the client connection after it", function()
    local c = assert(raw.connect(proxy.port, { timeout = 5 }))
    local res = assert(c:request({ method = "GET", target = "/status/403", headers = WS }))
    assert.equal(403, res.status)
    assert.truthy(res:has_token("connection", "close"))
    assert.is_nil(res:header("upgrade"))
    local again, err = c:request({ method = "GET", target = "/x" })
    assert.is_nil(again, "the connection was reused after a refused upgrade")
    assert.truthy(err)
    c:close()
    -- an ordinary request on its own connection is unaffected
    assert.equal(200, get("/plain").status)
  end)

  it("drops Upgrade for other tokens (h2c), for methods other than GET, for HTTP/1.0, and where upgrade = false", function()
    local cases = {
      { "/h2c", { { "Connection", "Upgrade, HTTP2-Settings" }, { "Upgrade", "h2c" }, { "HTTP2-Settings", "AAMAAABkAAQAAP__" } } },
      { "/closed/x", WS },
      { "/nc", { { "Upgrade", "websocket" } } }, -- no Connection: upgrade
    }
    for _, c in ipairs(cases) do
      local e = h.echo(get(c[1], c[2]))
      assert.same({}, h.echo_headers(e, "upgrade"), c[1])
      assert.same({}, h.echo_headers(e, "http2-settings"), c[1]) -- named by Connection: hop-by-hop
      for _, v in ipairs(h.echo_headers(e, "connection")) do assert.not_matches("[Uu]pgrade", v, c[1]) end
    end
    local post = h.echo(get("/post", with(WS, { { "Content-Length", "0" } }), "POST"))
    assert.same({}, h.echo_headers(post, "upgrade"))
    local c = assert(raw.connect(proxy.port, { timeout = 5 }))
    local old = assert(c:request({ method = "GET", target = "/v10", version = "HTTP/1.0", headers = with(WS, { { "Host", "x" } }) }))
    assert.same({}, h.echo_headers(h.echo(old), "upgrade"))
    c:close()
  end)

  it("refuses a body on a WebSocket handshake with 400, and nothing reaches the origin", function()
    local before = origin:stats().requests
    local cl = get("/body", with(WS, { { "Content-Length", "5" } }))
    assert.equal(400, cl.status)
    local te = assert(raw.request(proxy.port, { method = "GET", target = "/body", headers = with(WS,
      { { "Transfer-Encoding", "chunked" } }), body = "5\r\nhello\r\n0\r\n\r\n", raw_body = true }, { timeout = 5 }))
    assert.equal(400, te.status)
    assert.equal(200, get("/handshake-without-body", with(WS, { { "Content-Length", "0" } })).status)
    assert.equal(before + 1, origin:stats().requests)
  end)

  it("treats Connection: upgrade without an Upgrade field as an ordinary request", function()
    local e = h.echo(get("/conn-only", { { "Connection", "upgrade" } }))
    assert.same({}, h.echo_headers(e, "upgrade"))
  end)
end)
