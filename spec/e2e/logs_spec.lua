-- End-to-end: log files that logrotate can move. SIGUSR1 reopens the
-- access log and settings.error_log by name while requests keep coming: the
-- lines before the signal are in the renamed file, those after in the new
-- one, and none is lost or split (two workers write the same file).
local h = require "helpers.proxy"
local socket = require "socket"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", error_log = "${error_log}" }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "ok\n") end }
]=]

-- A client process: N requests over 4 keep-alive connections, as fast as it can.
local LOAD = [=[
local socket = require "socket"
local port, n = tonumber(arg[1]), tonumber(arg[2])
local conns = {}
for i = 1, 4 do conns[i] = assert(socket.connect("127.0.0.1", port)); conns[i]:settimeout(10) end
for i = 1, n do
  local c = conns[i % 4 + 1]
  assert(c:send("GET /r" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
  local len
  repeat
    local line = assert(c:receive("*l"))
    len = len or tonumber(line:match("^[Cc]ontent%-[Ll]ength: *(%d+)"))
  until line == ""
  assert(c:receive(len))
end
]=]

local function lines(path)
  local t = {}
  for line in (h.read_file(path) or ""):gmatch("[^\n]*\n?") do
    if line ~= "" then t[#t + 1] = line end
  end
  return t
end

describe("log files and SIGUSR1 #slow", function()
  local proxy, elog

  lazy_setup(function()
    elog = h.tmpname(".error.log")
    proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { error_log = elog } }
  end)

  lazy_teardown(function()
    h.shutdown(proxy)
  end)

  it("writes the error log to settings.error_log", function()
    assert.truthy(h.eventually(function() return (h.read_file(elog) or ""):find("started with 2 workers", 1, true) end))
  end)

  it("reopens both files on SIGUSR1 under load, losing and splitting no line", function()
    local N = 3000
    local script = h.write_file(h.tmpname(".lua"), LOAD)
    local load = h.spawn { "luajit", script, tostring(proxy.port), tostring(N) }
    local moved = {}
    for k = 1, 3 do
      assert.truthy(h.eventually(function() return #lines(proxy.access_log) > 100 end, 10), "no traffic logged")
      local to = proxy.access_log .. "." .. k
      assert(os.rename(proxy.access_log, to))
      assert(os.rename(elog, elog .. "." .. k))
      moved[#moved + 1] = to
      proxy:kill(10) -- SIGUSR1
      -- the new files appear: the error log says so in the new one
      assert.truthy(h.eventually(function()
        return (h.read_file(elog) or ""):find("SIGUSR1: log files reopened", 1, true)
      end, 5))
    end
    assert.equal(0, (load:wait(60)), "the load client failed: " .. tostring(h.read_file(load.err_path)))
    moved[#moved + 1] = proxy.access_log
    local seen, total = {}, 0
    h.eventually(function()
      total = 0
      for _, f in ipairs(moved) do total = total + #lines(f) end
      return total >= N
    end, 5)
    total = 0
    for _, f in ipairs(moved) do
      for _, line in ipairs(lines(f)) do
        assert.equal("\n", line:sub(-1), "a split line in " .. f)
        local e = cjson.decode(line)
        assert.is_nil(seen[e.path], "logged twice: " .. e.path)
        seen[e.path] = true
        total = total + 1
      end
    end
    assert.equal(N, total)
    for i = 1, N do assert.truthy(seen["/r" .. i], "lost: /r" .. i) end
    for k = 1, 3 do assert.truthy(#lines(moved[k]) > 0, "nothing in " .. moved[k]) end
  end)

  it("reports a file it cannot reopen, and goes on writing to the old one", function()
    local dir = h.tmpname(".d")
    assert(os.execute("mkdir -p " .. h.quote(dir)))
    assert(os.rename(proxy.access_log, dir .. "/moved.log"))
    assert(os.execute("mkdir " .. h.quote(proxy.access_log))) -- a directory where the file was: open fails
    proxy:kill(10) -- SIGUSR1
    assert.truthy(h.eventually(function()
      return (h.read_file(elog) or ""):find("cannot reopen access_log", 1, true)
    end, 5))
    local c = assert(socket.connect("127.0.0.1", proxy.port))
    c:settimeout(5)
    assert(c:send("GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert.matches("^HTTP/1.1 200", assert(c:receive("*l")))
    c:close()
    assert.truthy(h.eventually(function()
      return (h.read_file(dir .. "/moved.log") or ""):find('"/after"', 1, true)
    end, 5))
    h.run("rm -rf " .. h.quote(proxy.access_log) .. " " .. h.quote(dir))
  end)
end)

describe("access log fields", function()
  local proxy

  local FIELDS = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = { path = "${access_log}", fields = { "status", "path", "duration" } } }
proxy.route { prefix = "/", handler = function(req) return req:respond(200, "ok\n") end }
proxy.on_log(function(req, res)
  req.log.user = "alice \"a\""
  req.log.n = 3
  req.log.cached = false
  req.log.status = "not ours" -- a built-in field's name: left out
  req.log["bad key"] = 1      -- not a plain name: left out
  req.log.nested = {}         -- not a value: left out
end)
]=]

  lazy_setup(function()
    proxy = h.start_proxy { workers = 1, config = FIELDS }
  end)

  lazy_teardown(function()
    h.shutdown(proxy)
  end)

  it("writes the chosen fields only, and what on_log put in req.log", function()
    local c = assert(socket.connect("127.0.0.1", proxy.port))
    c:settimeout(5)
    assert(c:send("GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert.matches("^HTTP/1.1 200", assert(c:receive("*l")))
    c:close()
    local e = h.eventually(function() return proxy:access_log_entries()[1] end, 5)
    assert.equal(200, e.status)
    assert.equal("/who", e.path)
    assert.is_number(e.duration)
    assert.same({ "alice \"a\"", 3, false }, { e.user, e.n, e.cached })
    local keys = {}
    for k in pairs(e) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.same({ "cached", "duration", "n", "path", "status", "user" }, keys)
  end)

  it("refuses an unknown field name with file:line", function()
    local path = h.write_file(h.tmpname(".lua"), 'local proxy = require "moonproxy"\n' ..
      'proxy.listen { addr = "127.0.0.1:1" }\n' ..
      'proxy.settings { access_log = { path = "stdout", fields = { "status", "colour" } } }\n')
    local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
    assert.are_not.equal(0, rc)
    assert.matches(":3: settings: access_log fields: unknown field 'colour'", out, 1, true)
  end)
end)
