-- End-to-end: WebSocket tunnels (SPEC "WebSocket and other upgrades"):
-- echo both ways through the proxy with messages of 0 B to 5 MiB, an
-- origin refusing the upgrade, the idle timeout, half-close, a reload and a
-- SIGTERM with tunnels open, 1,000 idle tunnels and their memory, TLS on
-- both sides, on_log and the access log at the close, /metrics, and the
-- upstream connection of a tunnel never pooled. The origin is
-- spec/helpers/websocket.lua (the gate's rules: upgrade_gate_spec.lua).
local h = require "helpers.proxy"
local ws = require "helpers.websocket"
local tls = require "helpers.tls"
local cjson = require "cjson"
local socket = require "socket"
local ffi = require "ffi"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = "${access_log}", shutdown_timeout = ${shutdown} }
local o = proxy.upstream "o" { servers = { ${servers} }, timeouts = { tunnel = ${idle} } }
proxy.route { name = "${route}", prefix = "/", upstream = o,
  on_request = function(req) if req.headers["x-deny"] then return req:respond(401, "no\n") end end,
  on_response = function(req, res) res.headers["x-status-seen"] = tostring(res.status) end }
proxy.on_log(function(req, res)
  if req.tunnel then
    local f = assert(io.open("${onlog}", "a"))
    f:write(string.format("%s %d %s %s %d %d %s\n", req.route, res.status, req.path, tostring(req.headers["x-tag"]),
      req.tunnel.to_upstream, req.tunnel.to_client, req.tunnel.close))
    f:close()
  end
end)
]=]

local function start_origin(args, nofile)
  local port = h.free_port()
  local argv = { "luajit", "spec/helpers/websocket.lua", tostring(port) }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  if nofile then
    table.insert(argv, 1, "ulimit -n " .. nofile .. ' && exec "$0" "$@"')
    table.insert(argv, 1, "-c")
    table.insert(argv, 1, "sh")
  end
  local p = h.spawn(argv)
  assert.truthy(h.eventually(function()
    assert(p:alive(), "the origin exited: " .. tostring(p:stderr()))
    return (p:stdout() or ""):find("ready", 1, true)
  end, 10))
  p.port = port
  return p
end

local function origin_stats(o)
  local c = assert(socket.connect("127.0.0.1", o.port))
  c:settimeout(5)
  c:send("GET /_stats HTTP/1.1\r\nHost: x\r\n\r\n")
  local all = c:receive("*a")
  c:close()
  return cjson.decode(all:match("\r\n\r\n(.*)$"))
end

local function onlog_lines(path)
  local t = {}
  for line in (h.read_file(path) or ""):gmatch("[^\n]+") do
    local route, status, p, tag, up, down, close = line:match("^(%S+) (%d+) (%S+) (%S+) (%d+) (%d+) (%S+)$")
    t[#t + 1] = { route = route, status = tonumber(status), path = p, tag = tag, to_upstream = tonumber(up),
      to_client = tonumber(down), close = close }
  end
  return t
end

-- n bytes where every position shows (a shifted or lost block cannot pass).
local function payload(n)
  local t, i = {}, 0
  while i < n do
    t[#t + 1] = string.format("%011d|", i)
    i = i + 12
  end
  return table.concat(t):sub(1, n)
end

local function metric(proxy, name)
  local res = proxy:admin("GET", "/metrics")
  return tonumber(res.body:match(name:gsub("[%-%.%[%]{}\"=]", "%%%0") .. " (%d+)"))
end

ffi.cdef [[
struct mp_rlimit { unsigned long cur, max; };
int getrlimit(int resource, struct mp_rlimit *r);
int setrlimit(int resource, const struct mp_rlimit *r);
]]

-- This process's own descriptor limit, raised toward want (the 1,000 tunnels' clients).
local function raise_nofile(want)
  local r = ffi.new("struct mp_rlimit")
  ffi.C.getrlimit(7, r) -- RLIMIT_NOFILE
  if tonumber(r.cur) < want then
    r.cur = math.min(want, tonumber(r.max))
    ffi.C.setrlimit(7, r)
  end
  ffi.C.getrlimit(7, r)
  return tonumber(r.cur)
end

describe("WebSocket tunnels #slow", function()
  local origin, proxy, onlog

  local function start(vars, opts)
    onlog = h.tmpname(".onlog")
    local v = { servers = '"127.0.0.1:' .. origin.port .. '"', idle = 3600, shutdown = 5, onlog = onlog, route = "ws" }
    for k, x in pairs(vars or {}) do v[k] = x end
    local o = { workers = 1, config = CONFIG, vars = v }
    for k, x in pairs(opts or {}) do o[k] = x end
    return h.start_proxy(o)
  end

  describe("through a plain listener to a plain origin", function()
    lazy_setup(function()
      origin = start_origin()
      proxy = start(nil, { log_level = "debug" })
    end)

    lazy_teardown(function()
      h.shutdown(proxy, origin)
    end)

    it("echoes messages of 0 B, 125 B, 64 KiB and 5 MiB both ways, whole", function()
      local c = assert(ws.connect(proxy.port, { path = "/chat", headers = { ["X-Tag"] = "sizes" } }))
      assert.equal(101, c.status)
      assert.equal("websocket", c.headers.upgrade)
      assert.equal("upgrade", (c.headers.connection or ""):lower())
      assert.equal("101", c.headers["x-status-seen"]) -- the response hooks saw the 101
      local sent = 0
      for _, n in ipairs { 0, 125, 65536, 5 * 1024 * 1024 } do
        local p = payload(n)
        assert(c:send(p, 2))
        local op, got = c:recv(30)
        assert.equal(2, op, "no echo of " .. n .. " bytes: " .. tostring(got))
        assert.equal(#p, #got)
        assert.is_true(p == got, n .. " bytes came back changed")
        sent = sent + #ws.frame(p, 2, "abcd")
      end
      c:close()
      assert.truthy(h.eventually(function() return #onlog_lines(onlog) >= 1 end, 5))
      local l = onlog_lines(onlog)[1]
      assert.same({ "ws", 101, "/chat", "sizes", "client" }, { l.route, l.status, l.path, l.tag, l.close })
      assert.equal(sent, l.to_upstream) -- the frames as the client sent them, masked
      assert.truthy(l.to_client > 5 * 1024 * 1024)
      local e = h.eventually(function()
        for _, x in ipairs(proxy:access_log_entries()) do if x.tunnel then return x end end
      end, 5)
      assert.same({ 101, "/chat", "ws", sent, l.to_client, "client" },
        { e.status, e.path, e.route, e.tunnel.to_upstream, e.tunnel.to_client, e.tunnel.close })
    end)

    it("forwards what the client sent before the 101 only once the tunnel is open, and the origin's first words", function()
      local early = ws.frame("early", 1, "wxyz")
      local c = assert(ws.connect(proxy.port, { path = "/hello", early = early }))
      assert.equal(101, c.status)
      assert.same({ 1, "hello" }, { c:recv() })
      assert.same({ 1, "early" }, { c:recv() })
      c:close()
    end)

    it("relays a refused upgrade as an ordinary answer, and no tunnel opens", function()
      local before = origin_stats(origin).upgrades
      for _, code in ipairs { 403, 200 } do
        local c = assert(ws.connect(proxy.port, { path = "/status/" .. code }))
        assert.same({ code, "status " .. code .. "\n" }, { c.status, c.body })
        assert.equal("close", (c.headers.connection or ""):lower())
        c:close()
      end
      local denied = assert(ws.connect(proxy.port, { headers = { ["X-Deny"] = "1" } })) -- a hook refuses the handshake
      assert.same({ 401, "no\n" }, { denied.status, denied.body })
      denied:close()
      assert.equal(before, origin_stats(origin).upgrades)
      assert.equal(0, metric(proxy, 'moonproxy_tunnels{state="open"}'))
    end)

    it("passes a half-close on: the client ends its sending and still gets the origin's last message", function()
      local c = assert(ws.connect(proxy.port))
      assert(c:send("one", 1))
      assert.same({ 1, "one" }, { c:recv() })
      assert(c:shutdown_write())
      assert.same({ 1, "bye" }, { c:recv() })
      assert.same({ nil, "closed" }, { c:recv(5) })
      c:close()
      assert.truthy(h.eventually(function()
        for _, l in ipairs(onlog_lines(onlog)) do if l.close == "client" and l.to_client > 0 then return true end end
      end, 5))
    end)

    it("never pools the upstream connection of a tunnel", function()
      local before = origin_stats(origin).accepted
      for _ = 1, 3 do
        local c = assert(ws.connect(proxy.port))
        assert(c:send("x", 1))
        assert.same({ 1, "x" }, { c:recv() })
        c:close()
      end
      assert.truthy(h.eventually(function() return origin_stats(origin).open == 0 end, 5))
      assert.equal(before + 3, origin_stats(origin).accepted)
    end)

    it("counts open tunnels and the bytes they move in /metrics", function()
      local up0 = metric(proxy, 'moonproxy_tunnel_bytes_total{direction="to_upstream"}')
      local c = assert(ws.connect(proxy.port))
      assert(c:send(payload(1000), 2))
      assert.equal(1000, #select(2, c:recv()))
      assert.equal(1, metric(proxy, 'moonproxy_tunnels{state="open"}'))
      assert.equal(up0 + #ws.frame(payload(1000), 2, "abcd"), metric(proxy, 'moonproxy_tunnel_bytes_total{direction="to_upstream"}'))
      local closed0 = metric(proxy, 'moonproxy_tunnels_closed_total{reason="client"}')
      c:close()
      assert.truthy(h.eventually(function() return metric(proxy, 'moonproxy_tunnels{state="open"}') == 0 end, 5))
      assert.equal(closed0 + 1, metric(proxy, 'moonproxy_tunnels_closed_total{reason="client"}'))
    end)

    it("frees the old generation at a reload while tunnels stay open and keep echoing", function()
      local c = assert(ws.connect(proxy.port))
      assert(c:send("before", 1))
      assert.same({ 1, "before" }, { c:recv() })
      local gen = cjson.decode(proxy:admin("POST", "/reload").body).generation
      assert.truthy(h.eventually(function()
        return proxy:stderr():find("generation " .. (gen - 1) .. " freed", 1, true)
      end, 5), "the old generation was not freed while a tunnel was open")
      assert(c:send("after", 1))
      assert.same({ 1, "after" }, { c:recv() })
      c:close()
      -- its on_log ran in the generation current at its close
      local moved = #ws.frame("before", 1, "abcd") + #ws.frame("after", 1, "abcd")
      assert.truthy(h.eventually(function()
        for _, l in ipairs(onlog_lines(onlog)) do if l.to_upstream == moved and l.route == "ws" then return true end end
      end, 5))
    end)
  end)

  describe("timeouts and shutdown", function()
    lazy_setup(function()
      origin = start_origin()
    end)

    lazy_teardown(function()
      h.shutdown(nil, origin)
    end)

    it("closes a tunnel with no byte either way for timeouts.tunnel", function()
      local p = start({ idle = 1 })
      finally(function() h.shutdown(p) end)
      local c = assert(ws.connect(p.port))
      assert(c:send("x", 1))
      assert.same({ 1, "x" }, { c:recv() })
      local t0 = socket.gettime()
      assert.same({ nil, "closed" }, { c:recv(10) })
      local took = socket.gettime() - t0
      assert.truthy(took > 0.8 and took < 4, "closed after " .. took .. " s")
      c:close()
      assert.truthy(h.eventually(function()
        local l = onlog_lines(onlog)[1]
        return l and l.close == "idle"
      end, 5))
    end)

    it("closes open tunnels within shutdown_timeout on SIGTERM, spread over its last second, and exits 0", function()
      local p = start({ shutdown = 2 })
      local conns = {}
      for i = 1, 5 do
        conns[i] = assert(ws.connect(p.port))
        assert(conns[i]:send("hi", 1))
        assert.same({ 1, "hi" }, { conns[i]:recv() })
      end
      local t0 = socket.gettime()
      p:kill("TERM")
      local closed_at = {}
      for i = 1, 5 do
        assert.same({ nil, "closed" }, { conns[i]:recv(10) })
        closed_at[i] = socket.gettime() - t0
        conns[i]:close()
      end
      local code = p:wait(10)
      assert.equal(0, code)
      for _, t in ipairs(closed_at) do assert.truthy(t > 0.8 and t < 2.5, "closed after " .. t .. " s") end
      local n = 0
      for _, l in ipairs(onlog_lines(onlog)) do if l.close == "shutdown" then n = n + 1 end end
      assert.equal(5, n)
    end)
  end)

  describe("1,000 idle tunnels", function()
    local origins = {}

    lazy_setup(function()
      -- four origins share them: socket.select cannot watch more than ~1,000 descriptors
      for i = 1, 4 do origins[i] = start_origin(nil, 4096) end
      origin = origins[1]
    end)

    lazy_teardown(function()
      for _, o in ipairs(origins) do h.shutdown(nil, o) end
    end)

    it("hold a bounded memory each, and all still echo", function()
      assert.truthy(raise_nofile(3000) >= 2200, "this process cannot open 1,000 sockets")
      local servers = {}
      for i, o in ipairs(origins) do servers[i] = '"127.0.0.1:' .. o.port .. '"' end
      local p = start({ servers = table.concat(servers, ", ") }, { nofile = 8192 })
      finally(function() h.shutdown(p) end)
      local warm = assert(ws.connect(p.port))
      warm:close()
      socket.sleep(0.2)
      local rss0 = h.rss_kb(p.pid)
      local conns = {}
      for i = 1, 1000 do
        conns[i] = assert(ws.connect(p.port, { timeout = 20 }))
        assert.equal(101, conns[i].status)
      end
      socket.sleep(0.5)
      local per = (h.rss_kb(p.pid) - rss0) / 1000
      assert.truthy(per < 16, string.format("%.1f KiB of RSS per idle tunnel", per))
      assert.equal(1000, metric(p, 'moonproxy_tunnels{state="open"}'))
      for i = 1, 1000, 97 do
        assert(conns[i]:send("still " .. i, 1))
        assert.same({ 1, "still " .. i }, { conns[i]:recv() })
      end
      for _, c in ipairs(conns) do c:close() end
      assert.truthy(h.eventually(function() return metric(p, 'moonproxy_tunnels{state="open"}') == 0 end, 10))
    end)
  end)

  describe("over TLS on both sides", function()
    local pki, tproxy

    local TLS_CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}", tls = { cert = "${cert}", key = "${key}" } }
proxy.settings { access_log = "${access_log}" }
local o = proxy.upstream "o" { servers = { "127.0.0.1:${oport}" }, tls = { ca = "${ca}", server_name = "localhost" } }
proxy.route { prefix = "/", upstream = o }
]=]

    lazy_setup(function()
      pki = tls.pki()
      origin = start_origin { "--tls", pki.localhost.cert, pki.localhost.key }
      tproxy = h.start_proxy { workers = 1, config = TLS_CONFIG, vars = { oport = origin.port, ca = pki.ca,
        cert = pki.localhost.cert, key = pki.localhost.key } }
    end)

    lazy_teardown(function()
      h.shutdown(tproxy, origin)
      if pki then pki:remove() end
    end)

    it("echoes both ways, 64 KiB and 5 MiB messages whole", function()
      local c = assert(ws.connect(tproxy.port, { tls = { ca = pki.ca, sni = "localhost" } }))
      assert.equal(101, c.status)
      for _, n in ipairs { 10, 65536, 5 * 1024 * 1024 } do
        local p = payload(n)
        assert(c:send(p, 2))
        local op, got = c:recv(30)
        assert.equal(2, op)
        assert.is_true(got == p, n .. " bytes came back changed")
      end
      c:close()
      local e = h.eventually(function()
        for _, x in ipairs(tproxy:access_log_entries()) do if x.tunnel then return x end end
      end, 5)
      assert.equal("TLSv1.3", e.tls)
      assert.truthy(e.tunnel.to_client > 5 * 1024 * 1024)
    end)
  end)
end)
