-- End-to-end: running under systemd (moonproxy.service, Type=notify). The
-- spec plays systemd's part: a datagram socket given as NOTIFY_SOCKET, on
-- which the proxy reports READY=1 once its listener accepts, RELOADING=1
-- then READY=1 around a SIGHUP reload (accepted or refused), and
-- STOPPING=1 when it drains. MOONPROXY_CONFIG stands for -c, as the unit
-- uses it.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local unix = require "socket.unix"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:${port}" }
proxy.settings { access_log = false, shutdown_timeout = 2 }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "${text}\n") end }
]=]

describe("systemd notification #slow", function()
  local sock, sock_path, proc, conf, port

  lazy_setup(function()
    sock_path = h.tmpname(".notify")
    os.remove(sock_path)
    sock = assert(unix.dgram())
    assert(sock:bind(sock_path))
    sock:settimeout(10)
    port = h.free_port()
    conf = h.write_file(h.tmpname(".lua"), h.expand_template(CONFIG, { port = port, text = "one" }))
    proc = h.spawn { "env", "NOTIFY_SOCKET=" .. sock_path, "MOONPROXY_CONFIG=" .. conf, h.bin(), "-w", "1" }
  end)

  lazy_teardown(function()
    if proc and proc:alive() then proc:kill("KILL") end
    if sock then sock:close() end
    if sock_path then os.remove(sock_path) end
  end)

  -- The next notification, as a table of its assignments.
  local function next_state()
    local msg, err = sock:receive()
    assert(msg, "no notification: " .. tostring(err))
    local t = {}
    for k, v in msg:gmatch("([%u_]+)=([^\n]*)") do t[k] = v end
    return t, msg
  end

  it("reports READY=1 with its PID once the listener accepts (configuration from MOONPROXY_CONFIG)", function()
    local st, msg = next_state()
    assert.equal("1", st.READY, msg)
    assert.equal(tostring(proc.pid), st.MAINPID)
    assert.matches("serving generation 1", st.STATUS)
    local res = assert(raw.get(port, "/", nil, { timeout = 5 }))
    assert.same({ 200, "one\n" }, { res.status, res.body })
  end)

  it("reports RELOADING=1 then READY=1 around a SIGHUP reload, accepted or refused", function()
    h.write_file(conf, h.expand_template(CONFIG, { port = port, text = "two" }))
    proc:kill("HUP")
    assert.equal("1", next_state().RELOADING)
    local st = next_state()
    assert.equal("1", st.READY)
    assert.matches("serving generation 2", st.STATUS)
    assert.equal("two\n", assert(raw.get(port, "/", nil, { timeout = 5 })).body)

    h.write_file(conf, "this is not lua")
    proc:kill("HUP")
    assert.equal("1", next_state().RELOADING)
    st = next_state()
    assert.equal("1", st.READY)
    assert.matches("reload refused", st.STATUS)
    assert.equal("two\n", assert(raw.get(port, "/", nil, { timeout = 5 })).body) -- the previous one serves
  end)

  it("reports STOPPING=1 on SIGTERM and exits 0", function()
    proc:kill("TERM")
    assert.equal("1", next_state().STOPPING)
    local code = proc:wait(10)
    assert.equal(0, code)
  end)
end)
